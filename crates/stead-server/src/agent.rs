//! The host API: agents register, heartbeat (and get their intended state
//! back), run builds under leases, ship logs and move blobs; routers read
//! the route table.

use std::collections::{BTreeMap, HashMap};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use stead_api::{
    BuildComplete, BuildLogAppend, BuildTask, ClaimRequest, ClaimResponse, ErrorBody,
    HeartbeatRequest, HeartbeatResponse, InstanceLogBatch, IntendedApp, IntendedHostState,
    LeaseRequest, LeaseResponse, RegisterRequest, RegisterResponse, RunSpec, VersionInfo,
};
use stead_store::CompleteOutcome;

use crate::auth::HostAuth;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::placement::{place, Demand, HostView, Placement, Running};
use crate::AppState;

#[utoipa::path(post, path = "/v1/agent/register", tag = "agent", security(("bearer" = [])),
    request_body = RegisterRequest,
    responses((status = 200, body = RegisterResponse), (status = 403, body = ErrorBody)))]
pub(crate) async fn register(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    let name = req.name.trim();
    if name.is_empty()
        || name.len() > 253
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "host name {:?} is invalid: use 1 to 253 characters without spaces",
                req.name
            ),
        ));
    }
    let resp = state.store.register_host(&req).await?;
    tracing::info!(
        host = name,
        host_id = resp.host_id,
        session = resp.session,
        "host registered"
    );
    Ok(Json(resp))
}

/// Env an instance or build of `app` version `version` gets.
async fn env_for(
    state: &AppState,
    app_id: i64,
    app: &str,
    version: u32,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut env = state.store.env_plain(app_id).await.map_err(|e| {
        ApiError::internal(format!(
            "cannot read the environment of app {app}: {e}; check the server's secret key"
        ))
    })?;
    env.insert("STEAD_APP".into(), app.to_string());
    env.insert("STEAD_VERSION".into(), version.to_string());
    if let Some(db) = state.store.app_database(app_id).await? {
        env.insert("DBOS_SYSTEM_DATABASE_URL".into(), db.system_url.clone());
        env.insert("DBOS_DATABASE_URL".into(), db.app_url.clone());
    }
    Ok(env)
}

#[utoipa::path(post, path = "/v1/agent/heartbeat", tag = "agent", security(("bearer" = [])),
    request_body = HeartbeatRequest,
    responses((status = 200, body = HeartbeatResponse, description = "What this host should run"),
              (status = 404, body = ErrorBody, description = "Unknown host: register again"),
              (status = 409, body = ErrorBody, description = "Stale session: register again")))]
pub(crate) async fn heartbeat(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let t0 = std::time::Instant::now();
    let outcome = state
        .store
        .heartbeat_fenced(
            &req.host_id,
            &req.session,
            &req.instances,
            state.config.host_timeout,
        )
        .await?;
    // Only a report that changed something wakes the long-polls: a
    // heartbeat repeating what is stored must cost the others nothing.
    if outcome.changed {
        state.changed();
    }
    tracing::trace!(
        ms = t0.elapsed().as_secs_f64() * 1000.0,
        changed = outcome.changed,
        "heartbeat stored"
    );
    crate::scaling::record_heartbeat_signals(&state, &req).await;
    // Long-poll: held (up to `wait_ms`) while the intended state is still
    // the one the agent has, so a change reaches it within milliseconds.
    // Each check costs two small queries (the revision and the alive
    // hosts); the intended state itself is recomputed, for every host at
    // once, only when they moved.
    let wait = std::time::Duration::from_millis(req.wait_ms);
    let (intended, etag) =
        crate::scaling::long_poll(&state, req.known.as_deref(), wait, || async {
            let snapshot = snapshot(&state).await?;
            Ok(snapshot.for_host(&req.host_id))
        })
        .await?;
    tracing::debug!(host = %req.host_id, new = req.known.as_deref() != Some(etag.as_str()),
        held_ms = t0.elapsed().as_secs_f64() * 1000.0, "heartbeat answered");
    Ok(Json(HeartbeatResponse {
        intended,
        etag: Some(etag),
    }))
}

fn run_spec(config: &stead_api::AppConfig) -> RunSpec {
    RunSpec {
        start: config.start.clone(),
        port: config.port,
        health: config.health.clone(),
        memory_mb: config.memory_mb,
        grace_s: config.grace_s,
        language: config.language.clone(),
        health_timeout_s: config.health_timeout_s,
        admin_port: Some(config.admin_port),
        recovery: Some(config.recovery.clone()),
    }
}

/// What one host should run: every app's active version (and target, while
/// it starts), spread over the alive hosts; old versions that still own
/// workflows (kept, or started again, until they drain); and the recovery
/// orders this host's instances must carry out.
/// The alive hosts (sorted by id) that can run `sandbox`, and this host's
/// index among them: placement only considers hosts with the app's backend.
fn eligible(
    alive: &[(String, Vec<String>)],
    host_id: &str,
    sandbox: Option<&str>,
) -> (usize, Option<usize>) {
    let backend = sandbox.unwrap_or("process");
    let hosts: Vec<&String> = alive
        .iter()
        .filter(|(_, b)| b.iter().any(|x| x == backend) || (b.is_empty() && backend == "process"))
        .map(|(h, _)| h)
        .collect();
    (hosts.len(), hosts.iter().position(|h| *h == host_id))
}

/// The intended state of every host, computed at once from one reading of
/// the store, and valid while the store's revision and the set of alive
/// hosts stay what they were when it was computed (and, when durable
/// execution's readings are part of it, for a short while only). A cache:
/// any replica recomputes the same thing from the database.
pub(crate) struct Snapshot {
    /// When its inputs began to be read.
    read_at: std::time::Instant,
    rev: i64,
    alive: Vec<stead_store::PlacementHost>,
    expires: Option<std::time::Instant>,
    hosts: HashMap<String, (IntendedHostState, String)>,
    empty: (IntendedHostState, String),
}

impl Snapshot {
    pub(crate) fn for_host(&self, host_id: &str) -> (IntendedHostState, String) {
        self.hosts
            .get(host_id)
            .cloned()
            .unwrap_or_else(|| self.empty.clone())
    }

    /// Whether this snapshot answers for a caller that read revision `rev`
    /// and these alive hosts at `read_at`: one whose inputs were read after
    /// that always does (it is at least as fresh); an older one while the
    /// revision and the alive hosts are still what it was computed from.
    fn valid_for(
        &self,
        rev: i64,
        alive: &[stead_store::PlacementHost],
        read_at: std::time::Instant,
    ) -> bool {
        self.read_at >= read_at
            || (self.rev >= rev
                && self.alive == alive
                && self.expires.is_none_or(|e| e > std::time::Instant::now()))
    }
}

/// How long a snapshot that includes durable-execution plans (drain and
/// recovery, which follow readings of the apps' system databases and the
/// clock) stays valid: the durable-execution loop's pass period.
const DBOS_SNAPSHOT_TTL: std::time::Duration = std::time::Duration::from_millis(500);

/// The current snapshot: two small queries, and a recomputation only when
/// the revision or the alive hosts moved. Concurrent callers wait for one
/// recomputation rather than each making their own.
pub(crate) async fn snapshot(state: &AppState) -> Result<std::sync::Arc<Snapshot>, ApiError> {
    let read_at = std::time::Instant::now();
    let rev = state.store.intended_rev().await?;
    let alive = state.store.alive_hosts(state.config.host_timeout).await?;
    let mut current = state.intended.lock().await;
    if let Some(s) = current
        .as_ref()
        .filter(|s| s.valid_for(rev, &alive, read_at))
    {
        return Ok(s.clone());
    }
    // Read again now that this caller computes: everything committed while
    // it waited for the lock is included, so the callers queued behind it
    // (which read their revision earlier) all take this one computation
    // instead of each making another (at 50,000 instances, recomputing
    // once per queued heartbeat would starve them).
    let t0 = std::time::Instant::now();
    let rev = state.store.intended_rev().await?;
    let alive = state.store.alive_hosts(state.config.host_timeout).await?;
    let computed = std::sync::Arc::new(compute_all(state, t0, rev, alive).await?);
    tracing::debug!(
        rev,
        hosts = computed.hosts.len(),
        ms = t0.elapsed().as_secs_f64() * 1000.0,
        "intended state computed"
    );
    crate::metrics::INTENDED_COMPUTES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *current = Some(computed.clone());
    Ok(computed)
}

/// What every host should run: every app's active version (and target,
/// while it starts), spread over the alive hosts; old versions that still
/// own workflows (kept, or started again, until they drain); and the
/// recovery orders each host's instances must carry out. A fixed number
/// of queries for every app without a database, a few more per app with
/// one (durable execution).
async fn compute_all(
    state: &AppState,
    read_at: std::time::Instant,
    rev: i64,
    alive_hosts: Vec<stead_store::PlacementHost>,
) -> Result<Snapshot, ApiError> {
    let alive: Vec<(String, Vec<String>)> = alive_hosts
        .iter()
        .map(|h| (h.id.clone(), h.backends.clone()))
        .collect();
    let mut out: HashMap<String, IntendedHostState> = alive
        .iter()
        .map(|(h, _)| (h.clone(), IntendedHostState::default()))
        .collect();
    let mut by_app: BTreeMap<i64, Vec<stead_store::ActiveApp>> = BTreeMap::new();
    for a in state.store.active_apps().await? {
        by_app.entry(a.app_id).or_default().push(a);
    }
    let dbs = state.store.app_databases_all().await?;
    let mut app_ids: Vec<i64> = by_app.keys().copied().collect();
    app_ids.extend(dbs.keys().copied().filter(|id| !by_app.contains_key(id)));
    app_ids.sort_unstable();
    let now = stead_store::now_ms();
    let desired = state.store.desired_counts().await?;
    let inputs = state
        .store
        .placement_inputs(state.config.host_timeout)
        .await?;
    for i in inputs.instances.iter().filter(|i| i.fenced) {
        if let Some(h) = out.get_mut(&i.host_id) {
            h.fenced.push(i.id.clone());
        }
    }
    for h in out.values_mut() {
        h.fenced.sort();
    }
    let demands: Vec<Demand> = by_app
        .values()
        .flatten()
        .map(|a| Demand {
            key: (a.app_id, a.version),
            desired: version_count(desired.get(&a.app_id).copied(), a),
            memory_mb: a.config.memory_mb,
            sandbox: a.config.sandbox.clone(),
        })
        .collect();
    let placement = placement_of(&inputs, &demands);
    report_unplaced(state, &placement, &by_app).await;
    let mut env_all = state.store.env_plain_all().await.map_err(|e| {
        ApiError::internal(format!(
            "cannot read the apps' environments: {e}; check the server's secret key"
        ))
    })?;
    for app_id in app_ids {
        let entries = by_app.remove(&app_id).unwrap_or_default();
        let db = dbs.get(&app_id);
        let base_env = env_all.remove(&app_id).unwrap_or_default();
        let env_of = |name: &str, version: u32| {
            let mut env = base_env.clone();
            env.insert("STEAD_APP".into(), name.to_string());
            env.insert("STEAD_VERSION".into(), version.to_string());
            if let Some(db) = db {
                env.insert("DBOS_SYSTEM_DATABASE_URL".into(), db.system_url.clone());
                env.insert("DBOS_DATABASE_URL".into(), db.app_url.clone());
            }
            env
        };
        let expose = db
            .map(|d| crate::dbos::expose_for(state, d))
            .unwrap_or_default();
        // Durable execution: drain and recovery plans, per app with a
        // database (they need its instances and executors).
        let (rec, instances, plan) = match db {
            Some(_) => {
                let Some(rec) = state.store.app_by_id(app_id).await? else {
                    continue;
                };
                let instances = state.store.app_instances(app_id).await?;
                let dead = state.store.dead_executors(app_id).await?;
                let work = state.store.version_work(app_id).await?;
                let mut modes = HashMap::new();
                for d in &dead {
                    if let Some(v) = state.store.get_version(app_id, d.version).await? {
                        modes.insert(d.version, v.config.recovery.clone());
                    }
                }
                let plan = crate::dbos::plan(
                    rec.active_version,
                    rec.target_version,
                    &instances,
                    &work,
                    &dead,
                    &modes,
                    now,
                );
                (Some(rec), instances, plan)
            }
            None => (None, Vec::new(), crate::dbos::Plan::default()),
        };
        let mine = |host_id: &str, version: u32| {
            instances
                .iter()
                .filter(|i| {
                    i.host_id == host_id
                        && i.version == version
                        && i.state != stead_api::InstanceState::Exited
                })
                .collect::<Vec<_>>()
        };
        let admin_orders = |host_id: &str, version: u32| -> Vec<String> {
            let here = mine(host_id, version)
                .iter()
                .any(|i| i.state == stead_api::InstanceState::Ready && i.dbos_admin);
            if here {
                plan.admin.get(&version).cloned().unwrap_or_default()
            } else {
                Vec::new()
            }
        };
        let intended_app = |host_id: &str,
                            name: &str,
                            version: u32,
                            count: u32,
                            artifact: &str,
                            config: &stead_api::AppConfig,
                            env: BTreeMap<String, String>,
                            draining: bool| IntendedApp {
            app: name.to_string(),
            app_id: app_id.to_string(),
            version,
            count,
            artifact_hash: artifact.to_string(),
            run: run_spec(config),
            env,
            expose: expose.clone(),
            draining,
            recover_via_admin: admin_orders(host_id, version),
            reuse_executor_ids: plan.reuse.get(&version).cloned().unwrap_or_default(),
        };
        for app in &entries {
            let Some(counts) = placement.counts.get(&(app.app_id, app.version)) else {
                continue;
            };
            let env = env_of(&app.name, app.version);
            let spec = run_spec(&app.config);
            for (host_id, &count) in counts {
                if count == 0 {
                    continue;
                }
                let Some(h) = out.get_mut(host_id) else {
                    continue;
                };
                if db.is_none() {
                    // The common case, without the durable-execution parts.
                    h.apps.push(IntendedApp {
                        app: app.name.clone(),
                        app_id: app_id.to_string(),
                        version: app.version,
                        count,
                        artifact_hash: app.artifact_hash.clone(),
                        run: spec.clone(),
                        env: env.clone(),
                        expose: Vec::new(),
                        draining: false,
                        recover_via_admin: Vec::new(),
                        reuse_executor_ids: Vec::new(),
                    });
                } else {
                    h.apps.push(intended_app(
                        host_id,
                        &app.name,
                        app.version,
                        count,
                        &app.artifact_hash,
                        &app.config,
                        env.clone(),
                        false,
                    ));
                }
            }
        }
        let Some(rec) = rec else { continue };
        for &version in plan.draining.keys() {
            let Some(v) = state.store.get_version(app_id, version).await? else {
                continue;
            };
            let Some(artifact) = v.artifact_hash.clone() else {
                continue;
            };
            let live_anywhere = instances
                .iter()
                .filter(|i| i.version == version && i.state != stead_api::InstanceState::Exited)
                .count();
            let env = env_of(&rec.name, version);
            for (host_id, _) in &alive {
                // Keep what runs; with nothing left anywhere, the first
                // host starts one so the version's work can finish (only
                // when a reading shows work: see `Plan::start`).
                let here = mine(host_id, version).len() as u32;
                let first = eligible(&alive, host_id, v.config.sandbox.as_deref()).1 == Some(0);
                let count = if live_anywhere == 0 && first && plan.start.contains(&version) {
                    1
                } else {
                    here
                };
                if count == 0 {
                    continue;
                }
                let app = intended_app(
                    host_id,
                    &rec.name,
                    version,
                    count,
                    &artifact,
                    &v.config,
                    env.clone(),
                    true,
                );
                if let Some(h) = out.get_mut(host_id) {
                    h.apps.push(app);
                }
            }
        }
    }
    let empty = IntendedHostState::default();
    let empty_tag = crate::scaling::etag(&empty);
    Ok(Snapshot {
        read_at,
        rev,
        alive: alive_hosts,
        expires: (!dbs.is_empty()).then(|| std::time::Instant::now() + DBOS_SNAPSHOT_TTL),
        hosts: out
            .into_iter()
            .map(|(h, i)| {
                let tag = crate::scaling::etag(&i);
                (h, (i, tag))
            })
            .collect(),
        empty: (empty, empty_tag),
    })
}

/// Instances of one version of an app to run in all, from the
/// autoscaler's last decision: the decision for the active version; for a
/// version being started (the target) at least one, so it can prove it
/// starts before it takes traffic; before any decision, min/max.
fn version_count(desired: Option<u32>, app: &stead_store::ActiveApp) -> u32 {
    match desired {
        Some(d) if app.active => d,
        Some(d) => d.max(1),
        None => crate::placement::desired_count(app.min, app.max),
    }
}

/// The placement of every demand over the alive hosts, from what the
/// store says runs where (fenced instances stand for nothing).
fn placement_of(inputs: &stead_store::PlacementInputs, demands: &[Demand]) -> Placement {
    let hosts: Vec<HostView> = inputs
        .hosts
        .iter()
        .map(|h| HostView {
            id: h.id.clone(),
            memory_mb: h.memory_mb,
            backends: h.backends.clone(),
            draining: h.draining,
        })
        .collect();
    let running: Vec<Running> = inputs
        .instances
        .iter()
        .filter(|i| !i.fenced)
        .map(|i| Running {
            key: (i.app_id, i.version),
            host_id: i.host_id.clone(),
            memory_mb: i.memory_mb,
            ready: i.ready,
        })
        .collect();
    place(&hosts, demands, &running)
}

/// Instances that cannot be placed are logged and recorded as an app event
/// (`unplaced`) when the shortfall changes, so they are never dropped
/// silently; a shortfall that ends is recorded too.
async fn report_unplaced(
    state: &AppState,
    placement: &Placement,
    apps: &BTreeMap<i64, Vec<stead_store::ActiveApp>>,
) {
    let changes: Vec<(crate::placement::Key, u32, String)> = {
        let Ok(mut last) = state.unplaced.lock() else {
            return;
        };
        let mut changes = Vec::new();
        for (key, u) in &placement.unplaced {
            if last.get(key) != Some(&u.count) {
                last.insert(*key, u.count);
                changes.push((*key, u.count, u.reason.clone()));
            }
        }
        last.retain(|key, _| {
            let keep = placement.unplaced.contains_key(key);
            if !keep {
                changes.push((*key, 0, String::new()));
            }
            keep
        });
        changes
    };
    for ((app_id, version), count, reason) in changes {
        let name = apps
            .get(&app_id)
            .and_then(|v| v.first())
            .map(|a| a.name.clone())
            .unwrap_or_else(|| app_id.to_string());
        let (message, data) = if count > 0 {
            tracing::warn!(app = %name, version, count, %reason, "instances cannot be placed");
            (
                format!("{count} instance(s) of version {version} cannot be placed: {reason}"),
                serde_json::json!({"version": version, "count": count, "reason": reason}),
            )
        } else {
            tracing::info!(app = %name, version, "every instance is placed again");
            (
                format!("every instance of version {version} is placed again"),
                serde_json::json!({"version": version, "count": 0}),
            )
        };
        if let Err(e) = state
            .store
            .record_event(app_id, "unplaced", &message, data)
            .await
        {
            tracing::warn!(app = %name, error = %e, "cannot record the placement event");
        }
    }
}

async fn check_session(state: &AppState, host_id: &str, session: &str) -> Result<(), ApiError> {
    let host = state.store.get_host(host_id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "host {host_id} is not registered; register it again"
        ))
    })?;
    if host.session != session {
        return Err(ApiError::conflict(
            "stale_session",
            format!(
                "session {session} of host {} was replaced by a newer registration; register again",
                host.name
            ),
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/agent/builds/claim", tag = "agent", security(("bearer" = [])),
    request_body = ClaimRequest,
    responses((status = 200, body = ClaimResponse, description = "`task` is null when there is nothing to build"),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn claim(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    check_session(&state, &req.host_id, &req.session).await?;
    let Some(t) = state
        .store
        .claim_build(&req.host_id, &req.session, state.config.build_lease)
        .await?
    else {
        return Ok(Json(ClaimResponse { task: None }));
    };
    tracing::info!(
        app = t.app,
        version = t.version,
        build = t.id,
        host = req.host_id,
        "build claimed"
    );
    let mut env = env_for(&state, t.app_id, &t.app, t.version).await?;
    // Builds (migrations) run on the host's network, so they get the
    // database's real address rather than the in-sandbox one.
    if let Some(db) = state.store.app_database(t.app_id).await? {
        env.insert(
            "DBOS_SYSTEM_DATABASE_URL".into(),
            crate::dbos::platform_url(&state, &db, true),
        );
        env.insert(
            "DBOS_DATABASE_URL".into(),
            crate::dbos::platform_url(&state, &db, false),
        );
    }
    Ok(Json(ClaimResponse {
        task: Some(BuildTask {
            id: t.id,
            app: t.app,
            app_id: t.app_id.to_string(),
            version: t.version,
            bundle_hash: t.bundle_hash,
            build: t.config.build,
            migrate: t.config.migrate,
            env,
            memory_mb: t.config.memory_mb,
            lease_expires_at_ms: t.lease_expires_at_ms,
            attempt: t.attempt,
            language: t.config.language.clone(),
            cache: t.config.build_cache.clone(),
        }),
    }))
}

#[utoipa::path(post, path = "/v1/agent/builds/{id}/renew", tag = "agent", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Build id")),
    request_body = LeaseRequest,
    responses((status = 200, body = LeaseResponse), (status = 409, body = ErrorBody, description = "The lease is no longer this session's: stop the build")))]
pub(crate) async fn renew(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let expires = state
        .store
        .renew_build(id, &req.host_id, &req.session, state.config.build_lease)
        .await?;
    Ok(Json(LeaseResponse {
        lease_expires_at_ms: expires,
    }))
}

#[utoipa::path(post, path = "/v1/agent/builds/{id}/log", tag = "agent", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Build id")),
    request_body = BuildLogAppend,
    responses((status = 200, description = "Appended: `{\"accepted\": <lines>}`", body = Object),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn append_log(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<BuildLogAppend>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .store
        .append_build_log(id, &req.host_id, &req.session, &req.lines)
        .await?;
    state.changed();
    // A JSON body (not 204) so clients that always decode one work.
    Ok(Json(serde_json::json!({"accepted": req.lines.len()})))
}

#[utoipa::path(post, path = "/v1/agent/builds/{id}/complete", tag = "agent", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Build id")),
    request_body = BuildComplete,
    responses((status = 200, body = VersionInfo, description = "The version after the build"),
              (status = 400, body = ErrorBody, description = "Artifact not uploaded, or neither artifact nor error given"),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn complete(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<BuildComplete>,
) -> Result<Json<VersionInfo>, ApiError> {
    let result = match (&req.artifact_hash, &req.error) {
        (Some(a), None) => Ok(a.as_str()),
        (None, Some(e)) => Err(e.as_str()),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("completing build {id} needs exactly one of artifact_hash (success) or error (failure)"),
            ))
        }
    };
    let outcome = state
        .store
        .complete_build(id, &req.host_id, &req.session, result)
        .await?;
    let task = state.store.get_build(id).await?;
    match &outcome {
        CompleteOutcome::Succeeded { activated } => {
            tracing::info!(
                app = task.app,
                version = task.version,
                activated,
                "build succeeded"
            )
        }
        CompleteOutcome::Failed => {
            tracing::info!(app = task.app, version = task.version, "build failed")
        }
        CompleteOutcome::AlreadyDone => {}
    }
    state.changed();
    state
        .store
        .get_version(task.app_id, task.version)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "version {} of app {} no longer exists",
                task.version, task.app
            ))
        })
}

fn check_hash(hash: &str) -> Result<(), ApiError> {
    if hash.len() == 64
        && hash
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_hash",
            format!("{hash:?} is not a blob hash: blobs are named by their SHA-256 in 64 lowercase hex digits"),
        ))
    }
}

#[utoipa::path(get, path = "/v1/blobs/{hash}", tag = "blobs", security(("bearer" = [])),
    params(("hash" = String, Path, description = "SHA-256 of the blob, lowercase hex")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_blob(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(hash): ApiPath<String>,
) -> Result<Response, ApiError> {
    check_hash(&hash)?;
    let data = state.store.get_blob(&hash).await?.ok_or_else(|| {
        ApiError::not_found(format!("blob {hash} does not exist; upload it first"))
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, data.len().to_string()),
        ],
        data,
    )
        .into_response())
}

#[utoipa::path(put, path = "/v1/blobs/{hash}", tag = "blobs", security(("bearer" = [])),
    params(("hash" = String, Path, description = "SHA-256 of the body, lowercase hex")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204, description = "Stored (or already present)"),
              (status = 400, body = ErrorBody, description = "The body's hash is not the one named"),
              (status = 413, body = ErrorBody)))]
pub(crate) async fn put_blob(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(hash): ApiPath<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    check_hash(&hash)?;
    let upload = crate::api::receive_upload(&state, body, state.config.max_blob, |l| {
        format!(
            "blob {hash} is larger than the server's limit of {} MiB; raise the server's blob limit",
            l / (1024 * 1024)
        )
    })
    .await?;
    if upload.hash != hash {
        return Err(ApiError::bad_request(
            "hash_mismatch",
            format!(
                "the uploaded body hashes to {} but was sent as blob {hash}; upload it again",
                upload.hash
            ),
        ));
    }
    if !state.store.blob_exists(&hash).await? {
        let data = tokio::fs::read(upload.path())
            .await
            .map_err(|e| ApiError::internal(format!("cannot read the uploaded blob back: {e}")))?;
        state.store.put_blob(&hash, &data).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/agent/logs", tag = "agent", security(("bearer" = [])),
    request_body = InstanceLogBatch,
    responses((status = 200, description = "Stored: `{\"accepted\": <lines>}`; lines of unknown apps are dropped", body = Object),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn instance_logs(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(req): ApiJson<InstanceLogBatch>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let host = state.store.get_host(&req.host_id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "host {} is not registered; register it again",
            req.host_id
        ))
    })?;
    let accepted = state
        .store
        .append_instance_logs(&host.name, &req.lines)
        .await?;
    state.changed();
    Ok(Json(serde_json::json!({"accepted": accepted})))
}

#[cfg(test)]
mod eligible_tests {
    use super::eligible;

    #[test]
    fn placement_only_counts_hosts_with_the_backend() {
        let alive = vec![
            ("a".to_string(), vec!["process".to_string()]),
            (
                "b".to_string(),
                vec!["process".to_string(), "gvisor".to_string()],
            ),
            ("c".to_string(), vec![]),
        ];
        assert_eq!(eligible(&alive, "b", Some("gvisor")), (1, Some(0)));
        assert_eq!(eligible(&alive, "a", Some("gvisor")), (1, None));
        assert_eq!(eligible(&alive, "c", None), (3, Some(2)));
        assert_eq!(eligible(&alive, "a", Some("firecracker")), (0, None));
    }
}
