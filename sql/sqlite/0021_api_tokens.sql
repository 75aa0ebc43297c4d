-- Provisioning API tokens (issue #3). Only a SHA-256 of each token is kept: the token
-- itself is shown once, when it is made. A token has a role; a tenant token belongs to
-- one tenant and sees only its bindings. Other roles (e.g. regulator, admin) may have no
-- tenant.
CREATE TABLE api_tokens (
    id         INTEGER      NOT NULL PRIMARY KEY,
    token_hash VARCHAR(64)  NOT NULL,
    role       VARCHAR(16)  NOT NULL,
    tenant_id  INTEGER REFERENCES tenants (id),
    name       VARCHAR(100) NOT NULL,
    created_at DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
    revoked_at DATETIME,
    CONSTRAINT uq_api_tokens_hash UNIQUE (token_hash),
    CONSTRAINT ck_api_token_tenant CHECK (role <> 'tenant' OR tenant_id IS NOT NULL)
);
CREATE INDEX ix_api_tokens_tenant ON api_tokens (tenant_id);
