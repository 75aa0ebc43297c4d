-- Optional per-tenant limit of calls up at once on one PBX (NULL: none). The daemon hands
-- it to the dialplan with the decision; Asterisk counts the tenant's live calls
-- (GROUP_COUNT), so the count holds across daemon restarts and several daemons.
ALTER TABLE tenants ADD COLUMN max_concurrent_calls INTEGER;
