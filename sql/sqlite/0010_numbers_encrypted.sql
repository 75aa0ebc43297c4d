-- Customers' real numbers at rest: AES-GCM ciphertexts "<key id>:<base64url>" (at most
-- ~95 characters) and HMAC-SHA256 lookup hashes (hex) for equality lookups
-- (callctl/store/crypto.py, docs/keys.md). Rows written before this migration are
-- encrypted by `callctl db upgrade` right after it (callctl.store.reencrypt).
-- SQLite cannot change a column's type: the wider column replaces the old one (the
-- DEFAULT '' only satisfies ADD COLUMN ... NOT NULL; every insert gives a value).
ALTER TABLE bindings RENAME COLUMN party_a TO party_a_old;
ALTER TABLE bindings ADD COLUMN party_a VARCHAR(120) NOT NULL DEFAULT '';
UPDATE bindings SET party_a = party_a_old;
ALTER TABLE bindings DROP COLUMN party_a_old;
ALTER TABLE bindings RENAME COLUMN party_b TO party_b_old;
ALTER TABLE bindings ADD COLUMN party_b VARCHAR(120);
UPDATE bindings SET party_b = party_b_old;
ALTER TABLE bindings DROP COLUMN party_b_old;
ALTER TABLE bindings ADD COLUMN party_a_hash VARCHAR(64);
ALTER TABLE bindings ADD COLUMN party_b_hash VARCHAR(64);
CREATE INDEX ix_binding_party_a_hash ON bindings (party_a_hash);
CREATE INDEX ix_binding_party_b_hash ON bindings (party_b_hash);

ALTER TABLE blocks RENAME COLUMN caller TO caller_old;
ALTER TABLE blocks ADD COLUMN caller VARCHAR(120);
UPDATE blocks SET caller = caller_old;
ALTER TABLE blocks DROP COLUMN caller_old;
ALTER TABLE blocks ADD COLUMN caller_hash VARCHAR(64);
CREATE INDEX ix_block_caller_hash ON blocks (caller_hash);
