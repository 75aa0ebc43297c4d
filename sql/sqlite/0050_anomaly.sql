-- The anomaly job (callctl/anomaly): findings, its watermark, a stable caller key on CDRs,
-- and the link from an automatic block to the finding that made it.

-- A keyed, non-reversible hash of the caller's E.164 number (never the number itself), so
-- "per caller" rules can group calls; NULL for anonymous callers and CDRs written before.
ALTER TABLE cdrs ADD COLUMN caller_hash VARCHAR(64);

-- The anomaly job reads CDRs per subject in (started_at, id) order: these indexes hand
-- them over in that order, so its window functions need not sort the whole range.
-- (binding_id, started_at, id) also serves everything the old binding index did.
CREATE INDEX ix_cdr_tenant_caller ON cdrs (tenant_id, caller_hash, started_at, id);
CREATE INDEX ix_cdr_tenant_started ON cdrs (tenant_id, started_at, id);
CREATE INDEX ix_cdr_binding_started ON cdrs (binding_id, started_at, id);
DROP INDEX ix_cdr_binding;

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
