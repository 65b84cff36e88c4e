-- Autoscaling: the demand routers and agents measure (samples while apps
-- are busy, nothing while they idle), when each app last had a request,
-- the DBOS work agents report queued, the autoscaler's state per app (so
-- every control-plane replica continues the same decision), and the
-- settings `stead scale` changed until the next deploy.
CREATE TABLE demand_samples (
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT NOT NULL,
    concurrency_milli BIGINT NOT NULL,
    peak BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    waiting BIGINT NOT NULL,
    cpu_milli BIGINT NOT NULL,
    detail TEXT
);
CREATE INDEX demand_samples_end ON demand_samples (end_ms);
CREATE TABLE app_demand (
    app_id BIGINT PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    last_active_ms BIGINT NOT NULL
);
CREATE TABLE app_queue (
    app_id BIGINT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    host_id TEXT NOT NULL,
    queued BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (app_id, host_id)
);
CREATE TABLE scale_state (
    app_id BIGINT PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    version BIGINT,
    desired BIGINT NOT NULL,
    panic_until BIGINT,
    below_since BIGINT,
    below_peak BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE scale_overrides (
    app_id BIGINT PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    for_version BIGINT NOT NULL,
    settings TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
