-- Stead's intended state. Timestamps are epoch milliseconds; flags are 0/1
-- integers so the same queries decode identically on SQLite and PostgreSQL.
CREATE TABLE orgs (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    org_id BIGINT NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, name)
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    org_id BIGINT REFERENCES orgs(id) ON DELETE CASCADE,
    user_id BIGINT REFERENCES users(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL
);
CREATE TABLE apps (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    org_id BIGINT NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    active_version BIGINT,
    last_version BIGINT NOT NULL DEFAULT 0,
    min_instances BIGINT NOT NULL DEFAULT 1,
    max_instances BIGINT NOT NULL DEFAULT 4,
    event_seq BIGINT NOT NULL DEFAULT 0,
    log_seq BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE blobs (
    hash TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    data BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE versions (
    id BIGSERIAL PRIMARY KEY,
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    number BIGINT NOT NULL,
    state TEXT NOT NULL,
    bundle_hash TEXT NOT NULL,
    bundle_size BIGINT NOT NULL,
    artifact_hash TEXT,
    config TEXT NOT NULL,
    error TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (app_id, number)
);
CREATE TABLE build_tasks (
    id BIGSERIAL PRIMARY KEY,
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    state TEXT NOT NULL,
    attempt BIGINT NOT NULL DEFAULT 0,
    lease_host TEXT,
    lease_session TEXT,
    lease_expires_at BIGINT,
    error TEXT,
    log_seq BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (app_id, version)
);
CREATE INDEX build_tasks_state ON build_tasks (state);
CREATE TABLE build_logs (
    task_id BIGINT NOT NULL REFERENCES build_tasks(id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
);
CREATE TABLE deploy_keys (
    org_id BIGINT NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    build_id BIGINT NOT NULL,
    bundle_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (org_id, key)
);
CREATE TABLE env_vars (
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT,
    ciphertext BYTEA,
    nonce BYTEA,
    secret BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (app_id, key)
);
CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    memory_mb BIGINT NOT NULL,
    cpus BIGINT NOT NULL,
    backends TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    session TEXT NOT NULL,
    last_heartbeat BIGINT NOT NULL,
    registered_at BIGINT NOT NULL
);
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    app_id BIGINT REFERENCES apps(id) ON DELETE CASCADE,
    app_name TEXT NOT NULL,
    version BIGINT NOT NULL,
    host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    executor_id TEXT NOT NULL,
    endpoint TEXT,
    pid BIGINT,
    started_at BIGINT NOT NULL,
    exit TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX instances_host ON instances (host_id);
CREATE INDEX instances_app ON instances (app_id);
CREATE TABLE instance_logs (
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    version BIGINT NOT NULL,
    instance TEXT NOT NULL,
    host TEXT NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (app_id, seq)
);
CREATE TABLE events (
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    ts BIGINT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (app_id, seq)
);
