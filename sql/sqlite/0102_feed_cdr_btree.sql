-- The same index as on PostgreSQL (sql/postgresql/0102_*): one schema on both.
DROP INDEX ix_cdr_feed;
CREATE INDEX ix_cdr_feed ON cdrs (feed_txid, id);
