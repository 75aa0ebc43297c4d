-- Reveal grants (claim, complaint, AML) and the hash-chained audit log
-- (callctl/store/reveal.py, docs/reveal.md). SQLite: appends are serialised by the
-- write lock; the hash chain is what detects a changed, removed or reordered row.
CREATE TABLE reveal_grants (
    id             INTEGER NOT NULL PRIMARY KEY,
    binding_id     INTEGER       NOT NULL REFERENCES bindings (id),
    party          VARCHAR(1)    NOT NULL,
    scenario       VARCHAR(10)   NOT NULL,
    case_reference VARCHAR(100)  NOT NULL,
    requested_by   VARCHAR(100)  NOT NULL,
    requested_at   DATETIME      NOT NULL,
    max_uses       INTEGER       NOT NULL,
    ttl_seconds    INTEGER       NOT NULL,
    status         VARCHAR(10)   NOT NULL DEFAULT 'requested',
    decided_by     VARCHAR(100),
    decided_at     DATETIME,
    expires_at     DATETIME,
    uses           INTEGER       NOT NULL DEFAULT 0,
    CONSTRAINT ck_grant_party CHECK (party IN ('a','b')),
    CONSTRAINT ck_grant_scenario CHECK (scenario IN ('claim','complaint','aml')),
    CONSTRAINT ck_grant_status CHECK (status IN ('requested','approved','refused')),
    CONSTRAINT ck_grant_second_person CHECK (decided_by IS NULL OR decided_by <> requested_by)
);
CREATE INDEX ix_grant_binding ON reveal_grants (binding_id);

CREATE TABLE audit_log (
    id         INTEGER NOT NULL PRIMARY KEY,
    at         DATETIME      NOT NULL,
    actor      VARCHAR(100)  NOT NULL,
    action     VARCHAR(30)   NOT NULL,
    grant_id   INTEGER,
    detail     TEXT          NOT NULL,
    prev_hash  VARCHAR(64)   NOT NULL,
    hash       VARCHAR(64)   NOT NULL
);
