-- Autoscaling: the demand routers and agents measure (samples while apps
-- are busy, nothing while they idle), when each app last had a request,
-- the DBOS work agents report queued, the autoscaler's state per app (so
-- every control-plane replica continues the same decision), and the
-- settings `stead scale` changed until the next deploy.
CREATE TABLE demand_samples (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER NOT NULL,
    concurrency_milli INTEGER NOT NULL,
    peak INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    waiting INTEGER NOT NULL,
    cpu_milli INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX demand_samples_end ON demand_samples (end_ms);
CREATE TABLE app_demand (
    app_id INTEGER PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    last_active_ms INTEGER NOT NULL
);
CREATE TABLE app_queue (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    host_id TEXT NOT NULL,
    queued INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (app_id, host_id)
);
CREATE TABLE scale_state (
    app_id INTEGER PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    version INTEGER,
    desired INTEGER NOT NULL,
    panic_until INTEGER,
    below_since INTEGER,
    below_peak INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE scale_overrides (
    app_id INTEGER PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    for_version INTEGER NOT NULL,
    settings TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
);
