-- The call-time facts read only the caller's bindings on X (callctl.store.calls), not
-- all of an AXB or AXE X's (10^k of them): each index below serves one of its probes,
-- with more equality columns than any other index offers it, so the plan stays right
-- with no statistics on a skewed X (a generic plan sees ~1 binding per X).

-- The caller's bindings on X, by the parties' lookup hashes (hash-only lookups, as in
-- allocation, use the leading column as before).
DROP INDEX ix_binding_party_a_hash;
CREATE INDEX ix_binding_party_a_hash ON bindings (party_a_hash, number_id, status);
DROP INDEX ix_binding_party_b_hash;
CREATE INDEX ix_binding_party_b_hash ON bindings (party_b_hash, number_id, status);
-- X's active bindings, longest AXE extension last: the prompt's width is one probe.
DROP INDEX ix_binding_number_status;
CREATE INDEX ix_binding_number_status ON bindings (number_id, status, length(extension));
