-- Whether an executor's instance ran the DBOS admin server (seen when it
-- became ready). Kept on the executor, not only on its instance row, so
-- that the recovery of a dead executor is routed to the admin endpoint
-- even after its instance row is gone.
ALTER TABLE executors ADD COLUMN dbos_admin BIGINT NOT NULL DEFAULT 0;

-- Settings every control-plane replica must agree on, e.g. a check value
-- of the key secrets are encrypted with (never the key itself), so that a
-- replica started with another key refuses to start instead of failing to
-- read every secret.
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Work that one control-plane replica does at a time (the durable-execution
-- loop: recovery, sweep, drain readings, rollouts): held by `holder` until
-- `expires_at` (epoch ms), renewed while it works; when the holder dies
-- another replica takes it over once it expires.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
