//! Durable execution on the control plane.
//!
//! * **App databases**: each app gets a DBOS system database and an
//!   application database, provisioned at its first deploy: SQLite files in
//!   the embedded setup, or a database pair and a login role of its own on a
//!   configured PostgreSQL server (no other app's role can connect to them).
//! * **Recovery**: the executors that ran each app's instances are recorded
//!   from heartbeats. When one dies, its PENDING workflows are recovered
//!   once a live instance of the same version is ready: through the DBOS
//!   admin endpoint of that instance (the agent does it), by re-enqueueing
//!   them in the system database (done here), or by starting the
//!   replacement under the dead executor's id (the agent does it).
//! * **Sweep**: PENDING work owned by executors nobody knows (a host that
//!   vanished before reporting) is recovered too.
//! * **Drain**: the outstanding work of every running version is read from
//!   the system database, so an old version is only stopped once it has no
//!   PENDING or ENQUEUED workflows left.
//! * **Rollouts**: each step is promoted once the previous one is fully
//!   live and every older instance has drained.
//!
//! The loop holds no state that matters: it recomputes everything from the
//! store and the system databases on each pass, so any replica can run it
//! and a crash mid-pass only repeats idempotent work.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use stead_api::{AppDatabaseInfo, InstanceInfo, InstanceState};
use stead_dbos::SystemDb;
use stead_store::{AppDatabase, RolloutStep};
use tokio::sync::Mutex;

use crate::{ApiError, AppState};

/// Where apps' databases are made.
#[derive(Debug, Clone)]
pub enum AppDatabases {
    /// SQLite files under `dir/<app>/` (embedded setup: the agents must see
    /// the same path, i.e. run on this machine).
    Sqlite { dir: PathBuf },
    /// A database pair and a role per app on this PostgreSQL server; the URL
    /// must be of a role allowed to create roles and databases.
    Postgres { admin_url: String },
}

/// How long version work read from a system database stays trustworthy:
/// an older reading keeps the version running (the safe side).
pub(crate) const WORK_FRESH: Duration = Duration::from_secs(10);

/// A dead executor is taken over by a replacement under its id only this
/// soon after its death; later, its work is re-enqueued instead.
pub(crate) const TAKEOVER_WINDOW_MS: i64 = 10_000;

/// Unknown executors owning PENDING work are recovered only after they have
/// stayed unknown this long (a brand-new instance may claim work before its
/// first heartbeat names it).
const ORPHAN_GRACE: Duration = Duration::from_secs(15);

fn pg_ident(app: &str) -> String {
    format!("stead_{}", app.replace('-', "_"))
}

fn random_password() -> String {
    let b: [u8; 24] = rand::random();
    hex::encode(b)
}

/// `postgres://user:pass@host:port/db?x` → (`host:port`, URL without path).
fn pg_host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let hostport = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    match hostport.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((hostport.to_string(), 5432)),
    }
}

/// Makes (or finds) the app's databases. Idempotent: a deploy retried
/// after a crash finds what the first attempt made.
pub(crate) async fn ensure_database(
    state: &AppState,
    app_id: i64,
    app: &str,
) -> Result<AppDatabase, ApiError> {
    if let Some(db) = state.store.app_database(app_id).await? {
        return Ok(db);
    }
    let db = match &state.config.app_databases {
        AppDatabases::Sqlite { dir } => {
            let d = dir.join(app);
            tokio::fs::create_dir_all(&d).await.map_err(|e| {
                ApiError::internal(format!(
                    "cannot create the database folder {} of app {app}: {e}",
                    d.display()
                ))
            })?;
            AppDatabase {
                kind: "sqlite".into(),
                // SQLAlchemy's form for an absolute path: four slashes.
                system_url: format!("sqlite:///{}", d.join("dbos_system.sqlite").display()),
                app_url: format!("sqlite:///{}", d.join("app.sqlite").display()),
                role: None,
            }
        }
        AppDatabases::Postgres { admin_url } => provision_postgres(admin_url, app).await?,
    };
    state.store.set_app_database(app_id, &db).await?;
    tracing::info!(app, kind = %db.kind, "provisioned the app's databases");
    Ok(db)
}

async fn provision_postgres(admin_url: &str, app: &str) -> Result<AppDatabase, ApiError> {
    let fail = |what: &str, e: sqlx::Error| {
        ApiError::unavailable(format!(
            "cannot provision the PostgreSQL databases of app {app} ({what}): {e}"
        ))
    };
    // A one-connection pool rather than a bare connection: `&Pool` is an
    // executor for any lifetime, which keeps this future `Send`.
    let conn = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .map_err(|e| fail("connecting", e))?;
    let role = pg_ident(app);
    let password = random_password();
    // Role and database names come from validated app names (lowercase
    // letters, digits, '_'), so quoting them is enough.
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_roles WHERE rolname = $1")
        .bind(&role)
        .fetch_optional(&conn)
        .await
        .map_err(|e| fail("looking up the role", e))?;
    let verb = if exists.is_some() { "ALTER" } else { "CREATE" };
    let sql = format!("{verb} ROLE \"{role}\" LOGIN PASSWORD '{password}'");
    sqlx::raw_sql(&sql)
        .execute(&conn)
        .await
        .map_err(|e| fail("creating the role", e))?;
    for db in [role.clone(), format!("{role}_sys")] {
        let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(&db)
            .fetch_optional(&conn)
            .await
            .map_err(|e| fail("looking up the database", e))?;
        if exists.is_none() {
            let sql = format!("CREATE DATABASE \"{db}\" OWNER \"{role}\"");
            sqlx::raw_sql(&sql)
                .execute(&conn)
                .await
                .map_err(|e| fail("creating the database", e))?;
        }
        // Only the app's own role (and superusers) may connect.
        let sql = format!("REVOKE ALL ON DATABASE \"{db}\" FROM PUBLIC");
        sqlx::raw_sql(&sql)
            .execute(&conn)
            .await
            .map_err(|e| fail("restricting the database", e))?;
    }
    conn.close().await;
    let (_, port) = pg_host_port(admin_url)
        .ok_or_else(|| ApiError::internal("the app-database URL has no host".to_string()))?;
    // Instances reach the server through the agent, at 127.0.0.1 inside
    // their network namespace (see `expose_for`).
    let url = |db: &str| format!("postgresql://{role}:{password}@127.0.0.1:{port}/{db}");
    Ok(AppDatabase {
        kind: "postgres".into(),
        system_url: url(&format!("{role}_sys")),
        app_url: url(&role),
        role: Some(role),
    })
}

/// Host services an instance of the app may reach: its database server.
pub(crate) fn expose_for(state: &AppState, db: &AppDatabase) -> Vec<String> {
    match (&state.config.app_databases, db.kind.as_str()) {
        (AppDatabases::Postgres { admin_url }, "postgres") => pg_host_port(admin_url)
            .map(|(h, p)| vec![format!("{h}:{p}")])
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The system database URL as the control plane opens it (instances see
/// PostgreSQL at 127.0.0.1 through their agent; here, the real address).
pub(crate) fn platform_url(state: &AppState, db: &AppDatabase, system: bool) -> String {
    let url = if system { &db.system_url } else { &db.app_url };
    match &state.config.app_databases {
        AppDatabases::Postgres { admin_url } if db.kind == "postgres" => {
            match pg_host_port(admin_url) {
                Some((h, p)) => url.replace(&format!("@127.0.0.1:{p}/"), &format!("@{h}:{p}/")),
                None => url.clone(),
            }
        }
        _ => url.clone(),
    }
}

/// Open system databases, one per app, reused across passes.
#[derive(Default)]
pub(crate) struct Pools {
    dbs: Mutex<HashMap<i64, (String, std::sync::Arc<SystemDb>)>>,
}

impl Pools {
    pub(crate) async fn get(
        &self,
        state: &AppState,
        app_id: i64,
    ) -> Result<Option<std::sync::Arc<SystemDb>>, ApiError> {
        let Some(db) = state.store.app_database(app_id).await? else {
            return Ok(None);
        };
        let url = platform_url(state, &db, true);
        let mut dbs = self.dbs.lock().await;
        if let Some((u, d)) = dbs.get(&app_id) {
            if *u == url {
                return Ok(Some(d.clone()));
            }
        }
        let d = std::sync::Arc::new(SystemDb::connect(&url).await.map_err(|e| {
            ApiError::unavailable(format!("cannot open the system database of the app: {e}"))
        })?);
        dbs.insert(app_id, (url, d.clone()));
        Ok(Some(d))
    }
}

/// The recovery mode for one dead executor: the override from its
/// version's config, else `admin` when it ran the DBOS admin server (or a
/// ready instance of its version does), else `database`. Taking over an
/// identity (`executor-id`) only makes sense for the replacement of a
/// recent death (`died_at_ms`); older or swept dead executors are
/// re-enqueued instead.
fn mode_for(
    configured: &str,
    instances: &[&InstanceInfo],
    dead_ran_admin: bool,
    died_at_ms: i64,
    now_ms: i64,
) -> &'static str {
    match configured {
        "admin" => "admin",
        "database" => "database",
        "executor-id" if now_ms - died_at_ms > TAKEOVER_WINDOW_MS => "database",
        "executor-id" => "executor-id",
        "none" => "none",
        _ if dead_ran_admin
            || instances
                .iter()
                .any(|i| i.state == InstanceState::Ready && i.dbos_admin) =>
        {
            "admin"
        }
        _ => "database",
    }
}

/// What the heartbeat adds to a host's intended state for durable
/// execution, computed per app per pass.
#[derive(Debug, Default, Clone)]
pub(crate) struct Plan {
    /// Old versions to keep (or start) because they still own work:
    /// version → draining.
    pub draining: BTreeMap<u32, ()>,
    /// Dead executors to recover through the admin endpoint, by version.
    pub admin: BTreeMap<u32, Vec<String>>,
    /// Dead executors to take over by identity, by version.
    pub reuse: BTreeMap<u32, Vec<String>>,
    /// Draining versions that may get a new instance when none is left
    /// anywhere: those the latest reading of the system database shows
    /// owning PENDING or ENQUEUED work. Only a reading can say so: a dead
    /// executor alone is no reason (the instance of a drained version that
    /// was just stopped is one, and starting its version again for it is
    /// how old versions would loop through start, drain, stop).
    pub start: BTreeSet<u32>,
}

/// Versions of an app that must keep running to finish their work, and
/// the recovery orders for agents. Pure over its inputs.
pub(crate) fn plan(
    active: Option<u32>,
    target: Option<u32>,
    instances: &[InstanceInfo],
    work: &[stead_store::VersionWork],
    dead: &[stead_store::DeadExecutor],
    modes: &HashMap<u32, String>,
    now_ms: i64,
) -> Plan {
    let mut p = Plan::default();
    let fresh = WORK_FRESH.as_millis() as i64;
    let mut versions: HashSet<u32> = instances
        .iter()
        .filter(|i| i.state != InstanceState::Exited)
        .map(|i| i.version)
        .collect();
    versions.extend(
        work.iter()
            .filter(|w| w.pending + w.enqueued > 0)
            .map(|w| w.version),
    );
    versions.extend(dead.iter().map(|d| d.version));
    for v in versions {
        if Some(v) == active || Some(v) == target {
            continue;
        }
        let w = work.iter().find(|w| w.version == v);
        let keep = match w {
            // Unknown or stale: keep it (the safe side) until a fresh
            // reading says it is done.
            None => true,
            Some(w) if now_ms - w.checked_at_ms > fresh => true,
            Some(w) => w.pending + w.enqueued > 0,
        } || dead.iter().any(|d| d.version == v);
        if keep {
            p.draining.insert(v, ());
            if w.is_some_and(|w| w.pending + w.enqueued > 0) {
                p.start.insert(v);
            }
        }
    }
    for d in dead {
        let by_version: Vec<&InstanceInfo> = instances
            .iter()
            .filter(|i| i.version == d.version)
            .collect();
        let mode = mode_for(
            modes.get(&d.version).map(String::as_str).unwrap_or("auto"),
            &by_version,
            d.admin,
            d.ended_at_ms,
            now_ms,
        );
        match mode {
            "admin" => p
                .admin
                .entry(d.version)
                .or_default()
                .push(d.executor_id.clone()),
            "executor-id" => p
                .reuse
                .entry(d.version)
                .or_default()
                .push(d.executor_id.clone()),
            _ => {}
        }
    }
    p
}

/// The lease under which one replica at a time runs [`run_loop`]'s passes.
pub(crate) const LEASE: &str = "durable-execution";

/// How long the lease lasts without renewal: how soon another replica takes
/// the loop over when its holder dies. Each pass renews it.
const LEASE_TTL: Duration = Duration::from_secs(5);

/// The background loop: version work, database recovery, sweep, rollouts.
/// Every replica runs it, but only the holder of [`LEASE`] does the passes
/// (everything they do is idempotent, so an overlap at a hand-over only
/// repeats harmless work; the lease keeps the system databases from being
/// read by every replica every half second).
pub(crate) async fn run_loop(state: AppState, pools: std::sync::Arc<Pools>) {
    let mut orphans: HashMap<(i64, String), Instant> = HashMap::new();
    let mut last_sweep = Instant::now() - Duration::from_secs(60);
    let mut holding = false;
    // When the lease was last taken or renewed: passes run on every change
    // (each heartbeat), but the lease is written only a few times per TTL.
    let mut renewed = Instant::now() - LEASE_TTL;
    loop {
        if state
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let due = !holding || renewed.elapsed() >= LEASE_TTL / 3;
        let acquired = if due {
            renewed = Instant::now();
            Some(
                state
                    .store
                    .acquire_lease(LEASE, &state.replica, LEASE_TTL)
                    .await,
            )
        } else {
            None
        };
        match acquired {
            Some(Ok(held)) if held != holding => {
                tracing::info!(replica = %state.replica, held, "durable-execution lease {}", if held { "taken" } else { "lost" });
                holding = held;
            }
            None | Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot take the durable-execution lease; retrying");
                holding = false;
            }
        }
        if !holding {
            // Another replica does the passes; check again before its lease
            // could have expired.
            tokio::time::sleep(LEASE_TTL / 3).await;
            continue;
        }
        let sweep = last_sweep.elapsed() >= Duration::from_secs(5);
        if sweep {
            last_sweep = Instant::now();
        }
        // Registered before the pass, so that a change made while the pass
        // runs (a heartbeat reporting a death) starts the next pass at once
        // instead of being missed until the timer.
        let changed = state.changes.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Err(e) = pass(&state, &pools, sweep, &mut orphans).await {
            tracing::warn!(error = %e, "durable-execution pass failed; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = changed => {}
        }
    }
}

async fn pass(
    state: &AppState,
    pools: &Pools,
    sweep: bool,
    orphans: &mut HashMap<(i64, String), Instant>,
) -> Result<(), ApiError> {
    let ended = state
        .store
        .end_executors_on_dead_hosts(state.config.host_timeout)
        .await?;
    if ended > 0 {
        tracing::info!(executors = ended, "executors of dead hosts marked dead");
    }
    for app in state.store.apps_with_databases().await? {
        if let Err(e) = app_pass(state, pools, &app, sweep, orphans).await {
            tracing::warn!(app = %app.name, error = %e, "durable-execution pass for the app failed");
        }
    }
    rollouts(state).await?;
    Ok(())
}

async fn app_pass(
    state: &AppState,
    pools: &Pools,
    app: &stead_store::AppRecord,
    sweep: bool,
    orphans: &mut HashMap<(i64, String), Instant>,
) -> Result<(), ApiError> {
    let Some(db) = pools.get(state, app.id).await? else {
        return Ok(());
    };
    let instances = state.store.app_instances(app.id).await?;
    let dead = state.store.dead_executors(app.id).await?;
    // Work of every version that runs, is active/target, or lost an executor.
    let mut versions: HashSet<u32> = instances.iter().map(|i| i.version).collect();
    versions.extend(app.active_version);
    versions.extend(app.target_version);
    versions.extend(dead.iter().map(|d| d.version));
    for v in &versions {
        match db.count_active(&v.to_string()).await {
            Ok((pending, enqueued)) => {
                state
                    .store
                    .set_version_work(app.id, *v, pending, enqueued)
                    .await?
            }
            Err(e) => {
                tracing::debug!(app = %app.name, version = v, error = %e, "cannot read version work")
            }
        }
    }
    if !dead.is_empty() {
        recover_dead(state, app, &db, &instances, &dead).await?;
    }
    if sweep {
        let known: HashMap<String, bool> = state
            .store
            .executors(app.id)
            .await?
            .into_iter()
            .map(|(e, _, alive)| (e, alive))
            .collect();
        match db.pending_executors().await {
            Ok(pending) => {
                for (executor, version, _count) in pending {
                    if known.contains_key(&executor) {
                        orphans.remove(&(app.id, executor));
                        continue;
                    }
                    let first = *orphans
                        .entry((app.id, executor.clone()))
                        .or_insert_with(Instant::now);
                    if first.elapsed() >= ORPHAN_GRACE {
                        if let Ok(v) = version.parse::<u32>() {
                            tracing::info!(app = %app.name, executor = %executor, version = v, "sweep: unknown executor owns PENDING workflows; recovering them");
                            state
                                .store
                                .record_orphan_executor(app.id, &executor, v)
                                .await?;
                            orphans.remove(&(app.id, executor));
                            state.changed();
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(app = %app.name, error = %e, "sweep could not read the system database")
            }
        }
    }
    Ok(())
}

/// Recovery of an app's dead executors, on the control plane's side.
///
/// First, a dead executor that owns no PENDING workflow needs nothing: it
/// is marked recovered at once (no event: nothing was recovered), so that
/// the death of an idle or drained instance neither holds its version up
/// nor has it started again. Then, for the `database` trigger, the dead
/// executor's PENDING workflows are re-enqueued now, at the death, without
/// waiting for a replacement to be ready: ENQUEUED work of a version waits
/// in the system database for any executor of that version, so the
/// replacement claims it on its queue's first poll, as the library does
/// with its own work after a restart (and a version that is no longer
/// active gets an instance started because the reading shows work). The
/// `admin` and `executor-id` triggers are carried out by agents (see
/// [`plan`]); `none` only records the death.
async fn recover_dead(
    state: &AppState,
    app: &stead_store::AppRecord,
    db: &SystemDb,
    instances: &[InstanceInfo],
    dead: &[stead_store::DeadExecutor],
) -> Result<(), ApiError> {
    let owners = match db.pending_executors().await {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(app = %app.name, error = %e, "cannot read who owns PENDING work; recovery waits");
            return Ok(());
        }
    };
    let owns = |executor: &str| {
        owners
            .iter()
            .any(|(e, _, n)| e.as_str() == executor && *n > 0)
    };
    let mut by_version: BTreeMap<u32, Vec<&stead_store::DeadExecutor>> = BTreeMap::new();
    for d in dead {
        by_version.entry(d.version).or_default().push(d);
    }
    let now = stead_store::now_ms();
    let alive_cutoff = now - state.config.host_timeout.as_millis() as i64;
    for (version, executors) in by_version {
        let (busy, idle): (Vec<_>, Vec<_>) =
            executors.into_iter().partition(|d| owns(&d.executor_id));
        if !idle.is_empty() {
            let ids: Vec<String> = idle.iter().map(|d| d.executor_id.clone()).collect();
            state
                .store
                .mark_recovered(app.id, version, &ids, &[], "nothing", "no PENDING workflow")
                .await?;
            tracing::debug!(app = %app.name, version, executors = ?ids, "dead executors owned no PENDING workflow");
            state.changed();
        }
        if busy.is_empty() {
            continue;
        }
        let live: Vec<&InstanceInfo> = instances
            .iter()
            .filter(|i| {
                i.version == version
                    && i.state != InstanceState::Exited
                    && i.host_heartbeat_ms >= alive_cutoff
            })
            .collect();
        let configured = version_recovery(state, app.id, version).await?;
        for d in busy {
            let ids = vec![d.executor_id.clone()];
            match mode_for(&configured, &live, d.admin, d.ended_at_ms, now) {
                "database" => {
                    let workflows = db
                        .reenqueue(&ids, &version.to_string())
                        .await
                        .map_err(|e| {
                            ApiError::unavailable(format!(
                                "re-enqueueing the workflows of executor {} (app {}, version {version}) failed: {e}",
                                d.executor_id, app.name
                            ))
                        })?;
                    let by = match live.first() {
                        Some(i) => format!("control plane; live instance {} of the version", i.id),
                        None => "control plane; an instance of the version is started to run them"
                            .to_string(),
                    };
                    let n = state
                        .store
                        .mark_recovered(app.id, version, &ids, &workflows, "database", &by)
                        .await?;
                    if n > 0 {
                        tracing::info!(app = %app.name, version, executor = %d.executor_id, workflows = workflows.len(), "re-enqueued the workflows of a dead executor");
                        state.changed();
                    }
                }
                "none" => {
                    state
                        .store
                        .mark_recovered(
                            app.id,
                            version,
                            &ids,
                            &[],
                            "none",
                            "recovery disabled in stead.toml",
                        )
                        .await?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn version_recovery(state: &AppState, app_id: i64, version: u32) -> Result<String, ApiError> {
    Ok(state
        .store
        .get_version(app_id, version)
        .await?
        .map(|v| v.config.recovery)
        .unwrap_or_else(|| "auto".into()))
}

/// Advances running rollouts whose current step is live and drained.
async fn rollouts(state: &AppState) -> Result<(), ApiError> {
    let alive_cutoff = stead_store::now_ms() - state.config.host_timeout.as_millis() as i64;
    for r in state.store.running_rollouts().await? {
        let Some(app) = state.store.app_by_id(r.app_id).await? else {
            continue;
        };
        let Some(&want) = r.versions.get(r.step as usize) else {
            continue;
        };
        let version = state.store.get_version(r.app_id, want).await?;
        if let Some(v) = &version {
            if v.state == stead_api::VersionState::Failed {
                let why = format!(
                    "version {want} failed: {}; the rollout stops here and version {} keeps serving",
                    v.error.clone().unwrap_or_default(),
                    app.active_version.map(|a| a.to_string()).unwrap_or_else(|| "none".into())
                );
                state
                    .store
                    .advance_rollout(&r, RolloutStep::Fail(why))
                    .await?;
                state.changed();
                continue;
            }
        }
        if app.active_version != Some(want) {
            continue;
        }
        let instances = state.store.app_instances(r.app_id).await?;
        let live: Vec<&InstanceInfo> = instances
            .iter()
            .filter(|i| i.host_heartbeat_ms >= alive_cutoff)
            .collect();
        let desired = crate::placement::desired_count(app.min, app.max) as usize;
        let ready = live
            .iter()
            .filter(|i| i.version == want && i.state == InstanceState::Ready)
            .count();
        let older = live
            .iter()
            .any(|i| i.version != want && i.state != InstanceState::Exited);
        if ready >= desired && !older {
            tracing::info!(app = %app.name, rollout = r.id, step = r.step, "rollout step live and drained; advancing");
            state.store.advance_rollout(&r, RolloutStep::Next).await?;
            state.changed();
        }
    }
    Ok(())
}

/// `stead db status`: the app's databases with the passwords masked (or
/// shown, when asked), and what the system database holds now.
pub(crate) async fn database_info(
    state: &AppState,
    pools: &Pools,
    app: &stead_store::AppRecord,
    reveal: bool,
) -> Result<AppDatabaseInfo, ApiError> {
    let db = ensure_database(state, app.id, &app.name).await?;
    let show = |url: &str| {
        if reveal {
            url.to_string()
        } else {
            mask_password(url)
        }
    };
    let mut info = AppDatabaseInfo {
        app: app.name.clone(),
        kind: db.kind.clone(),
        system_url: show(&db.system_url),
        app_url: show(&db.app_url),
        reachable: false,
        error: None,
        pending_workflows: 0,
        enqueued_workflows: 0,
    };
    match pools.get(state, app.id).await {
        Ok(Some(sys)) => match sys
            .list_workflows(&stead_dbos::WorkflowFilter::default())
            .await
        {
            Ok(list) => {
                info.reachable = true;
                info.pending_workflows =
                    list.iter().filter(|w| w.status == "PENDING").count() as u64;
                info.enqueued_workflows =
                    list.iter().filter(|w| w.status == "ENQUEUED").count() as u64;
            }
            Err(e) => info.error = Some(e.to_string()),
        },
        Ok(None) => info.error = Some("no database recorded".into()),
        Err(e) => info.error = Some(e.to_string()),
    }
    Ok(info)
}

/// Replaces the password in a URL with `****`.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_store::{DeadExecutor, VersionWork};

    fn inst(id: &str, version: u32, state: InstanceState, admin: bool) -> InstanceInfo {
        InstanceInfo {
            id: id.into(),
            app: "a".into(),
            version,
            host: "h".into(),
            state,
            executor_id: id.into(),
            endpoint: None,
            started_at_ms: 0,
            exit: None,
            pid: None,
            dbos_admin: admin,
            host_id: "h".into(),
            host_heartbeat_ms: 0,
        }
    }

    fn work(version: u32, pending: u64, checked_at_ms: i64) -> VersionWork {
        VersionWork {
            version,
            pending,
            enqueued: 0,
            checked_at_ms,
        }
    }

    fn dead(e: &str, version: u32) -> DeadExecutor {
        DeadExecutor {
            executor_id: e.into(),
            app_id: 1,
            version,
            ended_at_ms: 0,
            reason: String::new(),
            admin: false,
        }
    }

    #[test]
    fn old_version_drains_until_a_fresh_reading_says_done() {
        let instances = vec![
            inst("old", 1, InstanceState::Ready, false),
            inst("new", 2, InstanceState::Ready, false),
        ];
        let none = HashMap::new();
        // Unknown work: keep.
        let p = plan(Some(2), None, &instances, &[], &[], &none, 100_000);
        assert!(p.draining.contains_key(&1));
        // Fresh and busy: keep.
        let p = plan(
            Some(2),
            None,
            &instances,
            &[work(1, 2, 99_000)],
            &[],
            &none,
            100_000,
        );
        assert!(p.draining.contains_key(&1));
        // Stale reading of zero: keep.
        let p = plan(
            Some(2),
            None,
            &instances,
            &[work(1, 0, 10_000)],
            &[],
            &none,
            100_000,
        );
        assert!(p.draining.contains_key(&1));
        // Fresh zero: let it go.
        let p = plan(
            Some(2),
            None,
            &instances,
            &[work(1, 0, 99_000)],
            &[],
            &none,
            100_000,
        );
        assert!(p.draining.is_empty());
        // The active version is never "draining".
        assert!(!p.draining.contains_key(&2));
    }

    #[test]
    fn version_with_work_and_no_instance_is_started_again() {
        let p = plan(
            Some(2),
            None,
            &[],
            &[work(1, 1, 99_000)],
            &[],
            &HashMap::new(),
            100_000,
        );
        assert!(p.draining.contains_key(&1));
        let p = plan(
            Some(2),
            None,
            &[],
            &[],
            &[dead("x", 1)],
            &HashMap::new(),
            100_000,
        );
        assert!(
            p.draining.contains_key(&1),
            "a dead executor's version is kept while its work is unknown"
        );
        assert!(
            !p.start.contains(&1),
            "but a death alone does not start the version again"
        );
        let p = plan(
            Some(2),
            None,
            &[],
            &[work(1, 0, 99_000)],
            &[],
            &HashMap::new(),
            100_000,
        );
        assert!(p.start.is_empty() && p.draining.is_empty());
    }

    /// The loop the rollout e2e found: an old version's instance is stopped
    /// once a fresh reading says the version has no work; its executor is
    /// then dead (not yet marked recovered). That must not get the version
    /// started again; only a reading that shows work does.
    #[test]
    fn a_stopped_drained_version_is_not_started_again_for_its_dead_executor() {
        let stopped = vec![inst("old", 1, InstanceState::Exited, false)];
        let none = HashMap::new();
        let p = plan(
            Some(2),
            None,
            &stopped,
            &[work(1, 0, 99_000)],
            &[dead("old", 1)],
            &none,
            100_000,
        );
        assert!(!p.start.contains(&1), "{p:?}");
        // The dead executor did own work (the reading after its death says
        // so, e.g. it was killed mid-workflow): start one to recover onto.
        let p = plan(
            Some(2),
            None,
            &stopped,
            &[work(1, 1, 99_000)],
            &[dead("old", 1)],
            &none,
            100_000,
        );
        assert!(p.start.contains(&1) && p.draining.contains_key(&1));
        // Re-enqueued work counts as work too.
        let mut w = work(1, 0, 99_000);
        w.enqueued = 2;
        let p = plan(Some(2), None, &[], &[w], &[], &none, 100_000);
        assert!(p.start.contains(&1));
    }

    #[test]
    fn an_executor_that_ran_the_admin_server_is_recovered_through_it() {
        let mut d = dead("d1", 2);
        d.admin = true;
        // No ready instance yet (the replacement is starting): still admin,
        // so the control plane does not re-enqueue it itself.
        let p = plan(Some(2), None, &[], &[], &[d.clone()], &HashMap::new(), 0);
        assert_eq!(p.admin.get(&2), Some(&vec!["d1".to_string()]));
        assert_eq!(mode_for("auto", &[], true, 0, 0), "admin");
        assert_eq!(mode_for("auto", &[], false, 0, 0), "database");
        assert_eq!(mode_for("database", &[], true, 0, 0), "database");
    }

    #[test]
    fn recovery_mode_is_chosen_per_version() {
        let instances = vec![
            inst("a", 1, InstanceState::Ready, true),
            inst("b", 2, InstanceState::Ready, false),
        ];
        let mut modes = HashMap::new();
        modes.insert(3, "executor-id".to_string());
        let p = plan(
            Some(2),
            None,
            &instances,
            &[],
            &[dead("d1", 1), dead("d2", 2), dead("d3", 3)],
            &modes,
            0,
        );
        assert_eq!(
            p.admin.get(&1),
            Some(&vec!["d1".to_string()]),
            "admin server present: admin"
        );
        assert!(
            !p.admin.contains_key(&2) && !p.reuse.contains_key(&2),
            "no admin server: database, done here"
        );
        assert_eq!(
            p.reuse.get(&3),
            Some(&vec!["d3".to_string()]),
            "override: executor id"
        );
    }

    #[test]
    fn old_deaths_are_not_taken_over_by_identity() {
        let mut modes = HashMap::new();
        modes.insert(1, "executor-id".to_string());
        let p = plan(
            Some(1),
            None,
            &[],
            &[],
            &[dead("d", 1)],
            &modes,
            TAKEOVER_WINDOW_MS + 1,
        );
        assert!(
            !p.reuse.contains_key(&1),
            "a death older than the window is re-enqueued instead"
        );
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_password("postgresql://r:secret@127.0.0.1:5432/db"),
            "postgresql://r:****@127.0.0.1:5432/db"
        );
        assert_eq!(
            mask_password("sqlite:////x/y.sqlite"),
            "sqlite:////x/y.sqlite"
        );
    }

    #[test]
    fn host_and_port_are_read_from_urls() {
        assert_eq!(
            pg_host_port("postgres://u:p@db.local:6543/x"),
            Some(("db.local".into(), 6543))
        );
        assert_eq!(pg_host_port("postgres://u@db/x"), Some(("db".into(), 5432)));
        assert_eq!(pg_ident("my-app"), "stead_my_app");
    }
}
