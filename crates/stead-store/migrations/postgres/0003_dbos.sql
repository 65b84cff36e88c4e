-- Durable-execution support (DBOS): per-app databases, the executors that
-- ran (so their unfinished workflows can be recovered after they die), the
-- outstanding work of each version (so old versions drain before they stop),
-- and multi-step rollouts.
CREATE TABLE app_databases (
    app_id BIGINT PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    system_url_enc BYTEA NOT NULL,
    app_url_enc BYTEA NOT NULL,
    nonce_system BYTEA NOT NULL,
    nonce_app BYTEA NOT NULL,
    role TEXT,
    created_at BIGINT NOT NULL
);
CREATE TABLE executors (
    executor_id TEXT PRIMARY KEY,
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    instance_id TEXT NOT NULL,
    host_id TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    ended_at BIGINT,
    end_reason TEXT,
    recovered_at BIGINT,
    recovered_count BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX executors_app ON executors (app_id, version);
CREATE TABLE version_work (
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    pending BIGINT NOT NULL,
    enqueued BIGINT NOT NULL,
    checked_at BIGINT NOT NULL,
    PRIMARY KEY (app_id, version)
);
CREATE TABLE rollouts (
    id BIGSERIAL PRIMARY KEY,
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    versions TEXT NOT NULL,
    step BIGINT NOT NULL,
    state TEXT NOT NULL,
    message TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
ALTER TABLE versions ADD COLUMN hold BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN dbos_admin BIGINT NOT NULL DEFAULT 0;
