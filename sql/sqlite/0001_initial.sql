-- callctl initial schema (SQLite). Times are UTC, stored without zone.
CREATE TABLE tenants (
    id               INTEGER NOT NULL PRIMARY KEY,
    name             VARCHAR(100) NOT NULL,
    hotline          VARCHAR(20)  NOT NULL,
    strict           BOOLEAN      NOT NULL DEFAULT true,
    ring_timeout     INTEGER      NOT NULL DEFAULT 30,
    max_call_seconds INTEGER      NOT NULL DEFAULT 3600,
    time_zone        VARCHAR(64)  NOT NULL DEFAULT 'Asia/Shanghai',
    created_at       DATETIME  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT uq_tenants_name UNIQUE (name)
);

CREATE TABLE tenant_callers (
    id        INTEGER NOT NULL PRIMARY KEY,
    tenant_id INTEGER      NOT NULL REFERENCES tenants (id),
    pattern   VARCHAR(20) NOT NULL,
    is_prefix BOOLEAN     NOT NULL DEFAULT false,
    CONSTRAINT uq_tenant_callers_pattern UNIQUE (tenant_id, pattern)
);

CREATE TABLE virtual_numbers (
    id                INTEGER NOT NULL PRIMARY KEY,
    e164              VARCHAR(20) NOT NULL,
    tenant_id         INTEGER      NOT NULL REFERENCES tenants (id),
    state             VARCHAR(12) NOT NULL DEFAULT 'free',
    quarantined_until DATETIME,
    created_at        DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT uq_vn_e164 UNIQUE (e164),
    CONSTRAINT ck_vn_state CHECK (state IN ('free','bound','quarantined','disabled'))
);
CREATE INDEX ix_vn_tenant_state ON virtual_numbers (tenant_id, state);

CREATE TABLE bindings (
    id         INTEGER NOT NULL PRIMARY KEY,
    tenant_id  INTEGER       NOT NULL REFERENCES tenants (id),
    number_id  INTEGER       NOT NULL REFERENCES virtual_numbers (id),
    mode       VARCHAR(3)   NOT NULL,
    party_a    VARCHAR(20)  NOT NULL,
    party_b    VARCHAR(20),
    extension  VARCHAR(8),
    reference  VARCHAR(100),
    status     VARCHAR(8)   NOT NULL DEFAULT 'active',
    expires_at DATETIME,
    created_at DATETIME  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    ended_at   DATETIME,
    CONSTRAINT ck_binding_mode CHECK (mode IN ('AXN','AXB','AXE')),
    CONSTRAINT ck_binding_status CHECK (status IN ('active','ended'))
);
-- AXN: X serves one customer at a time.
CREATE UNIQUE INDEX ux_binding_axn_number ON bindings (number_id)
    WHERE status = 'active' AND mode = 'AXN';
CREATE INDEX ix_binding_number_status ON bindings (number_id, status);
CREATE INDEX ix_binding_tenant_reference ON bindings (tenant_id, reference);

CREATE TABLE blocks (
    id         INTEGER NOT NULL PRIMARY KEY,
    tenant_id  INTEGER       NOT NULL REFERENCES tenants (id),
    scope      VARCHAR(8)   NOT NULL,
    direction  VARCHAR(14)  NOT NULL,
    binding_id INTEGER REFERENCES bindings (id),
    number_id  INTEGER REFERENCES virtual_numbers (id),
    caller     VARCHAR(20),
    reason     TEXT         NOT NULL,
    created_by VARCHAR(100) NOT NULL,
    starts_at  DATETIME  NOT NULL,
    ends_at    DATETIME,
    created_at DATETIME  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT ck_block_scope CHECK (scope IN ('binding','caller','number','tenant')),
    CONSTRAINT ck_block_direction CHECK (direction IN ('to_customer','from_customer','both'))
);
CREATE INDEX ix_block_tenant ON blocks (tenant_id, scope);
CREATE INDEX ix_block_number ON blocks (number_id);
CREATE INDEX ix_block_binding ON blocks (binding_id);

CREATE TABLE cdrs (
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
    CONSTRAINT uq_cdrs_call_id UNIQUE (call_id)
);
CREATE INDEX ix_cdr_started ON cdrs (started_at);
CREATE INDEX ix_cdr_binding ON cdrs (binding_id);
