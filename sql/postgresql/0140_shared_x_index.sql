-- The X already serving AXB pairs or AXE customers, by tenant and mode, in id order: the
-- first place allocation looks for an AXB or AXE binding (callctl.store.allocation).
-- ix_vn_pool (tenant_id, state, id) has no mode, so that look walked every bound X of
-- the tenant, AXN ones included: 86-258 ms of the database's CPU per bind with
-- 1,000,000 AXN bindings. Partial: AXN X, the many, are not in it.
CREATE INDEX ix_vn_shared ON virtual_numbers (tenant_id, mode, id)
    WHERE state = 'bound' AND mode IN ('AXB', 'AXE');
