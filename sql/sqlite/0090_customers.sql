-- Customers in control (issue #16): expiry that frees X, the customer's own preferences,
-- purposes of calls, protection profiles, and the outbox of events for insurers.

-- A binding that ended by itself (past expires_at) says so: status 'ended' with
-- end_reason 'expired' (shown as status "expired"); one ended by `unbind`: 'unbound'.
ALTER TABLE bindings ADD COLUMN end_reason VARCHAR(8);
-- The purposes the customer accepts (comma-separated); NULL: all but marketing.
ALTER TABLE bindings ADD COLUMN purposes VARCHAR(200);
-- A protection profile (e.g. elderly, claims): tighter hours and anomaly thresholds.
ALTER TABLE bindings ADD COLUMN profile VARCHAR(16);
-- Housekeeping finds lapsed bindings without reading live ones.
CREATE INDEX ix_binding_expiry ON bindings (expires_at) WHERE status = 'active';

-- Why the tenant's agents on this number or prefix call (their caller group's purpose).
ALTER TABLE tenant_callers ADD COLUMN purpose VARCHAR(16) NOT NULL DEFAULT 'service';

-- The customer's own word, per tenant, by the lookup hash of the number (never plaintext).
CREATE TABLE customer_preferences (
    id             INTEGER      NOT NULL PRIMARY KEY,
    tenant_id      INTEGER      NOT NULL REFERENCES tenants (id),
    customer_hash  VARCHAR(64)  NOT NULL,
    calls          VARCHAR(12)  NOT NULL DEFAULT 'allowed',
    quiet_from     VARCHAR(5),
    quiet_until    VARCHAR(5),
    channel        VARCHAR(5)   NOT NULL DEFAULT 'phone',
    consent_source VARCHAR(100),
    consent_at     DATETIME   ,
    updated_by     VARCHAR(100) NOT NULL,
    updated_at     DATETIME     NOT NULL,
    CONSTRAINT ck_pref_calls CHECK (calls IN ('allowed','none','service_only')),
    CONSTRAINT ck_pref_channel CHECK (channel IN ('phone','app','sms','none'))
);
-- The call-time read joins a binding's party_a_hash and tenant to its row.
CREATE UNIQUE INDEX ux_pref_customer ON customer_preferences (customer_hash, tenant_id);

-- The outbox: what insurers (webhooks) and the regulator are told, in id order. Written
-- in the transaction of the thing it reports; masked, never a real number.
-- AUTOINCREMENT: an id is never reused, even after the newest rows are pruned.
CREATE TABLE events (
    id          INTEGER      NOT NULL PRIMARY KEY AUTOINCREMENT,
    tenant_id   INTEGER      NOT NULL,
    kind        VARCHAR(24)  NOT NULL,
    occurred_at DATETIME     NOT NULL,
    body        TEXT         NOT NULL
);
CREATE INDEX ix_events_tenant ON events (tenant_id, id);

CREATE TABLE webhooks (
    id         INTEGER      NOT NULL PRIMARY KEY,
    tenant_id  INTEGER      NOT NULL REFERENCES tenants (id),
    url        VARCHAR(500) NOT NULL,
    secret     VARCHAR(200) NOT NULL,
    created_at DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    removed_at DATETIME   ,
    -- events up to this id have a delivery row (or predate the webhook)
    queued_upto BIGINT      NOT NULL DEFAULT 0
);
CREATE INDEX ix_webhooks_tenant ON webhooks (tenant_id);

CREATE TABLE webhook_deliveries (
    id              INTEGER      NOT NULL PRIMARY KEY,
    webhook_id      INTEGER      NOT NULL REFERENCES webhooks (id),
    event_id        INTEGER      NOT NULL REFERENCES events (id),
    attempts        INTEGER      NOT NULL DEFAULT 0,
    next_attempt_at DATETIME     NOT NULL,
    delivered_at    DATETIME   ,
    last_status     INTEGER,
    last_error      VARCHAR(200),
    CONSTRAINT uq_delivery UNIQUE (webhook_id, event_id)
);
CREATE INDEX ix_delivery_due ON webhook_deliveries (next_attempt_at) WHERE delivered_at IS NULL;
