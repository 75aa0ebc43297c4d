-- Customers' real numbers at rest: AES-GCM ciphertexts "<key id>:<base64url>" (at most
-- ~95 characters) and HMAC-SHA256 lookup hashes (hex) for equality lookups
-- (callctl/store/crypto.py, docs/keys.md). Rows written before this migration are
-- encrypted by `callctl db upgrade` right after it (callctl.store.reencrypt).
ALTER TABLE bindings ALTER COLUMN party_a TYPE VARCHAR(120);
ALTER TABLE bindings ALTER COLUMN party_b TYPE VARCHAR(120);
ALTER TABLE bindings ADD COLUMN party_a_hash VARCHAR(64);
ALTER TABLE bindings ADD COLUMN party_b_hash VARCHAR(64);
CREATE INDEX ix_binding_party_a_hash ON bindings (party_a_hash);
CREATE INDEX ix_binding_party_b_hash ON bindings (party_b_hash);

ALTER TABLE blocks ALTER COLUMN caller TYPE VARCHAR(120);
ALTER TABLE blocks ADD COLUMN caller_hash VARCHAR(64);
CREATE INDEX ix_block_caller_hash ON blocks (caller_hash);
