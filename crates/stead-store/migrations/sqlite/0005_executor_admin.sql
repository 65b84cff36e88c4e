-- Whether an executor's instance ran the DBOS admin server (seen when it
-- became ready). Kept on the executor, not only on its instance row, so
-- that the recovery of a dead executor is routed to the admin endpoint
-- even after its instance row is gone.
ALTER TABLE executors ADD COLUMN dbos_admin INTEGER NOT NULL DEFAULT 0;
