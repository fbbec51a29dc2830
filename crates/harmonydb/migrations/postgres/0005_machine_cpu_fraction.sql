-- A node's CPU budget may be fractional (`harmony run --cpu 1.5`), and the engine schedules
-- with the exact value; the column was BIGINT, so 1.5 was stored and shown as 2. Existing
-- whole numbers convert exactly.
ALTER TABLE harmony_machines ALTER COLUMN cpu TYPE DOUBLE PRECISION;
