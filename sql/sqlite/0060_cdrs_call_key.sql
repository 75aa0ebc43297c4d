-- A CDR is unique on (call_id, started_at), as on PostgreSQL, where the CDR table is
-- partitioned by day and every unique key must include started_at. SQLite cannot change
-- a constraint in place: the table is rebuilt.

CREATE TABLE cdrs_rebuilt (
    id             INTEGER NOT NULL PRIMARY KEY,
    call_id        VARCHAR(150) NOT NULL,
    tenant_id      INTEGER,
    binding_id     INTEGER,
    virtual_number VARCHAR(20),
    direction      VARCHAR(14),
    caller_masked  VARCHAR(24),
    callee_masked  VARCHAR(24),
    decision       VARCHAR(8)   NOT NULL,
    reject_reason  VARCHAR(20),
    started_at     DATETIME  NOT NULL,
    answered_at    DATETIME,
    ended_at       DATETIME,
    ring_seconds   DOUBLE,
    talk_seconds   DOUBLE,
    dial_status    VARCHAR(20),
    hangup_cause   INTEGER,
    node           VARCHAR(64),
    CONSTRAINT uq_cdrs_call UNIQUE (call_id, started_at)
);
INSERT INTO cdrs_rebuilt SELECT * FROM cdrs;
DROP TABLE cdrs;
ALTER TABLE cdrs_rebuilt RENAME TO cdrs;
CREATE INDEX ix_cdr_started ON cdrs (started_at);
CREATE INDEX ix_cdr_binding ON cdrs (binding_id);
