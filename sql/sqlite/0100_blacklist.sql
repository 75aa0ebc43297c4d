-- The shared harassment blacklist (callctl/store/blacklist.py, docs/regulator.md): caller
-- numbers no tenant may use to reach any customer. Platform-level: no tenant column.
-- The number is kept like customers' numbers: encrypted, found by its lookup hash. An
-- automatic proposal knows only the hash and the masked form (CDRs hold nothing more):
-- caller is NULL there; the hash is what calls are matched on.
CREATE TABLE blacklist (
    id            INTEGER NOT NULL PRIMARY KEY,
    caller        VARCHAR(120),
    caller_hash   VARCHAR(64)   NOT NULL,
    caller_masked VARCHAR(24)   NOT NULL,
    origin        VARCHAR(10)   NOT NULL,
    status        VARCHAR(10)   NOT NULL DEFAULT 'proposed',
    reason        TEXT          NOT NULL,
    proposed_by   VARCHAR(100)  NOT NULL,
    proposed_at   DATETIME      NOT NULL,
    seconds       INTEGER,
    approved_by   VARCHAR(100),
    approved_at   DATETIME,
    confirmed_by  VARCHAR(100),
    starts_at     DATETIME,
    ends_at       DATETIME,
    closed_by     VARCHAR(100),
    closed_at     DATETIME,
    close_note    TEXT,
    appeal        TEXT,
    appealed_by   VARCHAR(100),
    appealed_at   DATETIME,
    appeal_outcome VARCHAR(10),
    CONSTRAINT ck_blacklist_origin CHECK (origin IN ('manual','automatic')),
    CONSTRAINT ck_blacklist_status CHECK (status IN ('proposed','active','refused','lifted')),
    CONSTRAINT ck_blacklist_two_people CHECK (
        (approved_by IS NULL OR approved_by <> proposed_by)
        AND (confirmed_by IS NULL OR (confirmed_by <> proposed_by AND confirmed_by <> approved_by))),
    CONSTRAINT ck_blacklist_active CHECK (status <> 'active' OR (confirmed_by IS NOT NULL AND starts_at IS NOT NULL))
);
-- One open (proposed or active) entry per number.
CREATE UNIQUE INDEX ux_blacklist_open ON blacklist (caller_hash) WHERE status IN ('proposed','active');
-- The call-time lookup (callctl.store.calls): is this caller's hash in force?
CREATE INDEX ix_blacklist_caller ON blacklist (caller_hash, status);

-- Evidence per tenant: a finding and its CDR ids, or CDR ids staff named. A tenant is
-- shown its own rows only.
CREATE TABLE blacklist_evidence (
    id         INTEGER NOT NULL PRIMARY KEY,
    entry_id   INTEGER      NOT NULL REFERENCES blacklist (id),
    tenant_id  INTEGER      NOT NULL REFERENCES tenants (id),
    finding_id INTEGER      REFERENCES anomaly_findings (id),
    cdr_ids    TEXT         NOT NULL,
    added_by   VARCHAR(100) NOT NULL,
    added_at   DATETIME     NOT NULL,
    CONSTRAINT uq_blacklist_evidence_finding UNIQUE (entry_id, finding_id)
);
CREATE INDEX ix_blacklist_evidence_tenant ON blacklist_evidence (tenant_id, entry_id);
CREATE INDEX ix_blacklist_evidence_finding ON blacklist_evidence (finding_id);
