-- The regulator's feed (callctl/feed.py): on SQLite one writer at a time commits, so ids
-- are in commit order and the feed reads by id. feed_txid (PostgreSQL's order, see
-- sql/postgresql/0101_*) stays empty here; the column and its indexes keep one schema.
ALTER TABLE cdrs ADD COLUMN feed_txid BIGINT;
CREATE INDEX ix_cdr_feed ON cdrs (feed_txid);
ALTER TABLE anomaly_findings ADD COLUMN feed_txid BIGINT;
CREATE INDEX ix_finding_feed ON anomaly_findings (feed_txid, id);
ALTER TABLE blocks ADD COLUMN feed_txid BIGINT;
CREATE INDEX ix_block_feed ON blocks (feed_txid, id);
