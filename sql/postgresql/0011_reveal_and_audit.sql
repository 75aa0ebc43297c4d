-- Reveal grants (claim, complaint, AML) and the hash-chained, append-only audit log
-- (callctl/store/reveal.py, docs/reveal.md).
CREATE TABLE reveal_grants (
    id             BIGSERIAL PRIMARY KEY,
    binding_id     BIGINT        NOT NULL REFERENCES bindings (id),
    party          VARCHAR(1)    NOT NULL,
    scenario       VARCHAR(10)   NOT NULL,
    case_reference VARCHAR(100)  NOT NULL,
    requested_by   VARCHAR(100)  NOT NULL,
    requested_at   TIMESTAMPTZ   NOT NULL,
    max_uses       INTEGER       NOT NULL,
    ttl_seconds    INTEGER       NOT NULL,
    status         VARCHAR(10)   NOT NULL DEFAULT 'requested',
    decided_by     VARCHAR(100),
    decided_at     TIMESTAMPTZ,
    expires_at     TIMESTAMPTZ,
    uses           INTEGER       NOT NULL DEFAULT 0,
    CONSTRAINT ck_grant_party CHECK (party IN ('a','b')),
    CONSTRAINT ck_grant_scenario CHECK (scenario IN ('claim','complaint','aml')),
    CONSTRAINT ck_grant_status CHECK (status IN ('requested','approved','refused')),
    CONSTRAINT ck_grant_second_person CHECK (decided_by IS NULL OR decided_by <> requested_by)
);
CREATE INDEX ix_grant_binding ON reveal_grants (binding_id);

CREATE TABLE audit_log (
    id         BIGINT        NOT NULL PRIMARY KEY,
    at         TIMESTAMPTZ   NOT NULL,
    actor      VARCHAR(100)  NOT NULL,
    action     VARCHAR(30)   NOT NULL,
    grant_id   BIGINT,
    detail     TEXT          NOT NULL,
    prev_hash  VARCHAR(64)   NOT NULL,
    hash       VARCHAR(64)   NOT NULL
);

-- Append-only in the database too: no UPDATE, DELETE or TRUNCATE, whoever asks.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
