-- Calling hours per tenant (wall clock in tenants.time_zone; calls to customers only):
-- calls_from > calls_until crosses midnight, equal means all day.
ALTER TABLE tenants ADD COLUMN calls_from VARCHAR(5) NOT NULL DEFAULT '08:00';
ALTER TABLE tenants ADD COLUMN calls_until VARCHAR(5) NOT NULL DEFAULT '21:00';
-- Blocks are never deleted (evidence): lifting sets ends_at and records who lifted it.
ALTER TABLE blocks ADD COLUMN lifted_by VARCHAR(100);
