-- Allocation (issue #3). The mode an X serves while bound (NULL when free or
-- quarantined): an X never mixes modes, and AXB/AXE allocation looks for an X already
-- serving its mode before taking a free one.
ALTER TABLE virtual_numbers ADD COLUMN mode VARCHAR(3)
    CONSTRAINT ck_vn_mode CHECK (mode IN ('AXN','AXB','AXE'));
-- Picking X walks one state of one tenant's pool in id order.
DROP INDEX ix_vn_tenant_state;
CREATE INDEX ix_vn_pool ON virtual_numbers (tenant_id, state, id);
-- AXE: an extension serves one customer on its X at a time.
CREATE UNIQUE INDEX ux_binding_axe_extension ON bindings (number_id, extension)
    WHERE status = 'active' AND mode = 'AXE';
