-- Stead's intended state. Timestamps are epoch milliseconds; flags are 0/1
-- integers so the same queries decode identically on SQLite and PostgreSQL.
CREATE TABLE orgs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id INTEGER NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (org_id, name)
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    org_id INTEGER REFERENCES orgs(id) ON DELETE CASCADE,
    user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL
);
CREATE TABLE apps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    org_id INTEGER NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    active_version INTEGER,
    last_version INTEGER NOT NULL DEFAULT 0,
    min_instances INTEGER NOT NULL DEFAULT 1,
    max_instances INTEGER NOT NULL DEFAULT 4,
    event_seq INTEGER NOT NULL DEFAULT 0,
    log_seq INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE blobs (
    hash TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    state TEXT NOT NULL,
    bundle_hash TEXT NOT NULL,
    bundle_size INTEGER NOT NULL,
    artifact_hash TEXT,
    config TEXT NOT NULL,
    error TEXT,
    created_at INTEGER NOT NULL,
    UNIQUE (app_id, number)
);
CREATE TABLE build_tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_host TEXT,
    lease_session TEXT,
    lease_expires_at INTEGER,
    error TEXT,
    log_seq INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (app_id, version)
);
CREATE INDEX build_tasks_state ON build_tasks (state);
CREATE TABLE build_logs (
    task_id INTEGER NOT NULL REFERENCES build_tasks(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (task_id, seq)
);
CREATE TABLE deploy_keys (
    org_id INTEGER NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    build_id INTEGER NOT NULL,
    bundle_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (org_id, key)
);
CREATE TABLE env_vars (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT,
    ciphertext BLOB,
    nonce BLOB,
    secret INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (app_id, key)
);
CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    memory_mb INTEGER NOT NULL,
    cpus INTEGER NOT NULL,
    backends TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    session TEXT NOT NULL,
    last_heartbeat INTEGER NOT NULL,
    registered_at INTEGER NOT NULL
);
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    app_id INTEGER REFERENCES apps(id) ON DELETE CASCADE,
    app_name TEXT NOT NULL,
    version INTEGER NOT NULL,
    host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    executor_id TEXT NOT NULL,
    endpoint TEXT,
    pid INTEGER,
    started_at INTEGER NOT NULL,
    exit TEXT,
    updated_at INTEGER NOT NULL
);
CREATE INDEX instances_host ON instances (host_id);
CREATE INDEX instances_app ON instances (app_id);
CREATE TABLE instance_logs (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    version INTEGER NOT NULL,
    instance TEXT NOT NULL,
    host TEXT NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (app_id, seq)
);
CREATE TABLE events (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (app_id, seq)
);
