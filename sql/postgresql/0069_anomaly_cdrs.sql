-- The anomaly job's part of the CDR table (after 0060, which rebuilds cdrs).

-- A keyed, non-reversible hash of the caller's E.164 number (never the number itself), so
-- "per caller" rules can group calls; NULL for anonymous callers and CDRs written before.
ALTER TABLE cdrs ADD COLUMN caller_hash VARCHAR(64);

-- The anomaly job reads CDRs per subject in (started_at, id) order: these indexes hand
-- them over in that order (index-only where the INCLUDE columns suffice), so its window
-- functions stream instead of sorting millions of rows. (binding_id, started_at, id)
-- also serves everything the old single-column binding index did.
CREATE INDEX ix_cdr_tenant_caller ON cdrs (tenant_id, caller_hash, started_at, id) INCLUDE (direction, binding_id);
CREATE INDEX ix_cdr_tenant_started ON cdrs (tenant_id, started_at, id) INCLUDE (direction);
CREATE INDEX ix_cdr_binding_started ON cdrs (binding_id, started_at, id)
    INCLUDE (tenant_id, direction, dial_status, hangup_cause, ended_at, answered_at, talk_seconds);
DROP INDEX ix_cdr_binding;
