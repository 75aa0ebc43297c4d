-- The anomaly job (callctl/anomaly): findings, its watermark, and the link from an
-- automatic block to the finding that made it. Its columns and indexes on cdrs are in
-- 0069_anomaly_cdrs.sql: they must come after 0060, which rebuilds the cdrs table.

CREATE TABLE anomaly_findings (
    id           INTEGER NOT NULL PRIMARY KEY,
    rule         VARCHAR(32)      NOT NULL,
    tenant_id    INTEGER          NOT NULL REFERENCES tenants (id),
    subject_kind VARCHAR(8)       NOT NULL,
    subject      VARCHAR(64)      NOT NULL,
    binding_id   INTEGER,
    period       BIGINT           NOT NULL,
    window_start DATETIME         NOT NULL,
    window_end   DATETIME         NOT NULL,
    calls        INTEGER          NOT NULL,
    measure      DOUBLE NOT NULL,
    threshold    DOUBLE NOT NULL,
    severity     VARCHAR(8)       NOT NULL,
    action       VARCHAR(8)       NOT NULL,
    evidence     TEXT             NOT NULL,
    created_at   DATETIME         NOT NULL DEFAULT CURRENT_TIMESTAMP,
    -- At most one finding per rule, subject and period: re-runs insert nothing new.
    CONSTRAINT uq_finding_key UNIQUE (rule, tenant_id, subject, period),
    CONSTRAINT ck_finding_subject_kind CHECK (subject_kind IN ('caller','binding','tenant')),
    CONSTRAINT ck_finding_action CHECK (action IN ('alert','block'))
);
CREATE INDEX ix_finding_window_end ON anomaly_findings (window_end);

CREATE TABLE anomaly_state (
    job        VARCHAR(32) NOT NULL PRIMARY KEY,
    safe_id    BIGINT      NOT NULL DEFAULT 0,
    checked_id BIGINT      NOT NULL DEFAULT 0,
    checked_at DATETIME,
    seen_id    BIGINT      NOT NULL DEFAULT 0,
    seen_count BIGINT      NOT NULL DEFAULT 0,
    passes     BIGINT      NOT NULL DEFAULT 0,
    updated_at DATETIME
);

ALTER TABLE blocks ADD COLUMN finding_id INTEGER REFERENCES anomaly_findings (id);
-- One block per finding, however often the job runs.
CREATE UNIQUE INDEX ux_block_finding ON blocks (finding_id);
