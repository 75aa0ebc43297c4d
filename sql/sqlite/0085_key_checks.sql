-- Check values of the key ring's secrets (issue #15): an HMAC of a fixed label under
-- each secret ("key:<id>" per encryption key, "lookup", "audit"), written the first
-- time a ring with that secret starts, compared at every later start, so a wrong
-- secret stops the program instead of mis-hashing or failing every call
-- (callctl/store/keycheck.py, docs/keys.md). They reveal nothing of the secrets.
CREATE TABLE key_checks (
    name        VARCHAR(40)  NOT NULL PRIMARY KEY,
    check_value VARCHAR(64)  NOT NULL,
    created_at  DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
);
