-- ix_vn_shared (0140) again, its predicate spelled with OR: PostgreSQL stores
-- `mode IN ('AXB', 'AXE')` on a varchar column as an ARRAY cast that reads back
-- differently once re-created from its own definition (the benchmark's bulk load drops
-- the secondary indexes and re-creates them from the catalog, then checks they match).
DROP INDEX ix_vn_shared;
CREATE INDEX ix_vn_shared ON virtual_numbers (tenant_id, mode, id)
    WHERE state = 'bound' AND (mode = 'AXB' OR mode = 'AXE');
