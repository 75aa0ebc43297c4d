-- The feed reads CDRs a page at a time in (feed_txid, id) order from a cursor. A BRIN
-- (0101) cannot hand rows over in that order: every page read and sorted all CDRs past
-- the cursor (and the block ranges not yet summarised), so a reader catching up on a
-- large backlog paid for the whole backlog on every page. A btree makes a page cost its
-- own rows, for one more index entry per CDR insert.
DROP INDEX ix_cdr_feed;
CREATE INDEX ix_cdr_feed ON cdrs (feed_txid, id);
