-- The regulator's feed (callctl/feed.py, docs/regulator.md) reads what is already written:
-- CDRs, findings and blocks (here) and the audit log (its ids are in commit order already:
-- appends are serialised by a lock held to commit). Sequence ids are not in commit order
-- with concurrent writers, so these rows also carry the id of the transaction that wrote
-- them: a row is handed out only once no transaction with a lower id can still commit,
-- which makes (feed_txid, id) an order in which nothing can appear behind a reader's cursor.
-- Rows written before this migration have no feed_txid: the feed starts here.
-- A column default: nothing changes on the call path's INSERT but this value.
ALTER TABLE cdrs ADD COLUMN feed_txid BIGINT;
ALTER TABLE cdrs ALTER COLUMN feed_txid SET DEFAULT (pg_current_xact_id()::text::bigint);
-- BRIN: the values grow with insertion order, and a BRIN entry costs a CDR insert next to nothing.
CREATE INDEX ix_cdr_feed ON cdrs USING brin (feed_txid);

ALTER TABLE anomaly_findings ADD COLUMN feed_txid BIGINT;
ALTER TABLE anomaly_findings ALTER COLUMN feed_txid SET DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX ix_finding_feed ON anomaly_findings (feed_txid, id);

ALTER TABLE blocks ADD COLUMN feed_txid BIGINT;
ALTER TABLE blocks ALTER COLUMN feed_txid SET DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX ix_block_feed ON blocks (feed_txid, id);
