-- Durable-execution support (DBOS): per-app databases, the executors that
-- ran (so their unfinished workflows can be recovered after they die), the
-- outstanding work of each version (so old versions drain before they stop),
-- and multi-step rollouts.
CREATE TABLE app_databases (
    app_id INTEGER PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    system_url_enc BLOB NOT NULL,
    app_url_enc BLOB NOT NULL,
    nonce_system BLOB NOT NULL,
    nonce_app BLOB NOT NULL,
    role TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE executors (
    executor_id TEXT PRIMARY KEY,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    instance_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    ended_at INTEGER,
    end_reason TEXT,
    recovered_at INTEGER,
    recovered_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX executors_app ON executors (app_id, version);
CREATE TABLE version_work (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    pending INTEGER NOT NULL,
    enqueued INTEGER NOT NULL,
    checked_at INTEGER NOT NULL,
    PRIMARY KEY (app_id, version)
);
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    versions TEXT NOT NULL,
    step INTEGER NOT NULL,
    state TEXT NOT NULL,
    message TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
ALTER TABLE versions ADD COLUMN hold INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN dbos_admin INTEGER NOT NULL DEFAULT 0;
