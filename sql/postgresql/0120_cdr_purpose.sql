-- Why the customer was called (the agent's caller-group purpose; AXB's other party:
-- service), on calls to customers, bridged or refused: the regulator's feed and the
-- export read it. NULL for calls from customers and for calls before this migration.
ALTER TABLE cdrs ADD COLUMN purpose VARCHAR(16);
