-- The anomaly job's part of the CDR table (after 0060, which rebuilds cdrs).

-- A keyed, non-reversible hash of the caller's E.164 number (never the number itself), so
-- "per caller" rules can group calls; NULL for anonymous callers and CDRs written before.
ALTER TABLE cdrs ADD COLUMN caller_hash VARCHAR(64);

-- The anomaly job reads CDRs per subject in (started_at, id) order: these indexes hand
-- them over in that order, so its window functions need not sort the whole range.
-- (binding_id, started_at, id) also serves everything the old binding index did.
CREATE INDEX ix_cdr_tenant_caller ON cdrs (tenant_id, caller_hash, started_at, id);
CREATE INDEX ix_cdr_tenant_started ON cdrs (tenant_id, started_at, id);
CREATE INDEX ix_cdr_binding_started ON cdrs (binding_id, started_at, id);
DROP INDEX ix_cdr_binding;
