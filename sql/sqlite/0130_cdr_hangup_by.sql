-- Who ended the call, as the PBX saw it: 'caller' (the caller's side hung up or gave up),
-- 'callee' (the called party hung up an answered call), 'pbx' (everything else: a
-- rejection, the ring timeout, the maximum duration, a failed dial). NULL where the PBX
-- does not report it (Asterisk so far) and for calls before this migration.
ALTER TABLE cdrs ADD COLUMN hangup_by VARCHAR(8);
