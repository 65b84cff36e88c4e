//! Hosts, the instances they report, and what the router needs.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rand::RngCore;
use stead_api::{
    AppConfig, AppRoute, HostCapacity, HostInfo, InstanceInfo, InstanceState, ObservedInstance,
    RegisterRequest, RegisterResponse, RouteEndpoint, RouteTable,
};

use crate::{
    get_i64, get_opt_i64, get_opt_str, get_str, insert_event, now_ms, to_u32, Result, Store,
    StoreError,
};

/// A registered host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    pub id: String,
    pub name: String,
    pub session: String,
    pub last_heartbeat_ms: i64,
}

/// An app whose active version is ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveApp {
    pub app_id: i64,
    pub name: String,
    pub version: u32,
    pub min: u32,
    pub max: u32,
    pub artifact_hash: String,
    pub config: AppConfig,
}

fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

fn instance_state(s: &str) -> Result<InstanceState> {
    InstanceState::parse(s).ok_or_else(|| StoreError::Corrupt {
        table: "instances",
        message: format!("unknown instance state {s:?}"),
    })
}

impl Store {
    /// Registers a host: the same name keeps its id; every registration
    /// starts a new session, which releases the build leases of the old one.
    pub async fn register_host(&self, req: &RegisterRequest) -> Result<RegisterResponse> {
        let backends =
            serde_json::to_string(&req.backends).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.retry("register_host", || async {
            let now = now_ms();
            let session = random_id("s-");
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO hosts (id, name, memory_mb, cpus, backends, agent_version, session, last_heartbeat, registered_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) ON CONFLICT (name) DO UPDATE SET \
                 memory_mb = excluded.memory_mb, cpus = excluded.cpus, backends = excluded.backends, \
                 agent_version = excluded.agent_version, session = excluded.session, last_heartbeat = excluded.last_heartbeat",
            )
            .bind(random_id("h-"))
            .bind(&req.name)
            .bind(i64::try_from(req.capacity.memory_mb).unwrap_or(i64::MAX))
            .bind(i64::from(req.capacity.cpus))
            .bind(&backends)
            .bind(&req.agent_version)
            .bind(&session)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let row = sqlx::query("SELECT id FROM hosts WHERE name = $1")
                .bind(&req.name)
                .fetch_one(&mut *tx)
                .await?;
            let host_id = get_str(&row, "id")?;
            tx.commit().await?;
            Ok(RegisterResponse { host_id, session })
        })
        .await
    }

    pub async fn get_host(&self, host_id: &str) -> Result<Option<HostRecord>> {
        let row = sqlx::query("SELECT id, name, session, last_heartbeat FROM hosts WHERE id = $1")
            .bind(host_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(HostRecord {
                id: get_str(&r, "id")?,
                name: get_str(&r, "name")?,
                session: get_str(&r, "session")?,
                last_heartbeat_ms: get_i64(&r, "last_heartbeat")?,
            })
        })
        .transpose()
    }

    /// Stores what a host observes, in one transaction: its instance rows are
    /// replaced by the reported ones, transitions to `ready` and `exited`
    /// become events, and the heartbeat time is updated.
    pub async fn heartbeat(
        &self,
        host_id: &str,
        session: &str,
        instances: &[ObservedInstance],
    ) -> Result<HostRecord> {
        self.retry("heartbeat", || {
            self.heartbeat_once(host_id, session, instances)
        })
        .await
    }

    async fn heartbeat_once(
        &self,
        host_id: &str,
        session: &str,
        instances: &[ObservedInstance],
    ) -> Result<HostRecord> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let host = sqlx::query(
            "UPDATE hosts SET last_heartbeat = $1 WHERE id = $2 RETURNING name, session",
        )
        .bind(now)
        .bind(host_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| {
            StoreError::NotFound(format!(
                "host {host_id} is not registered; register it again"
            ))
        })?;
        let name = get_str(&host, "name")?;
        if get_str(&host, "session")? != session {
            return Err(StoreError::Conflict(format!(
                "session {session} of host {name} was replaced by a newer registration; register again"
            )));
        }
        let prev_rows =
            sqlx::query("SELECT id, state, executor_id FROM instances WHERE host_id = $1")
                .bind(host_id)
                .fetch_all(&mut *tx)
                .await?;
        let mut previous: HashMap<String, String> = HashMap::new();
        let mut previous_executor: HashMap<String, String> = HashMap::new();
        for r in &prev_rows {
            previous.insert(get_str(r, "id")?, get_str(r, "state")?);
            previous_executor.insert(get_str(r, "id")?, get_str(r, "executor_id")?);
        }
        let mut app_ids: HashMap<&str, Option<i64>> = HashMap::new();
        for inst in instances {
            if !app_ids.contains_key(inst.app.as_str()) {
                let id = sqlx::query("SELECT id FROM apps WHERE name = $1")
                    .bind(&inst.app)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| get_i64(&r, "id"))
                    .transpose()?;
                app_ids.insert(inst.app.as_str(), id);
            }
            let app_id = app_ids.get(inst.app.as_str()).copied().flatten();
            sqlx::query(
                "INSERT INTO instances (id, app_id, app_name, version, host_id, state, executor_id, endpoint, pid, \
                 started_at, exit, updated_at, dbos_admin) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (id) DO UPDATE SET app_id = excluded.app_id, app_name = excluded.app_name, \
                 version = excluded.version, host_id = excluded.host_id, state = excluded.state, \
                 executor_id = excluded.executor_id, endpoint = excluded.endpoint, pid = excluded.pid, \
                 started_at = excluded.started_at, exit = excluded.exit, updated_at = excluded.updated_at, \
                 dbos_admin = excluded.dbos_admin",
            )
            .bind(&inst.id)
            .bind(app_id)
            .bind(&inst.app)
            .bind(i64::from(inst.version))
            .bind(host_id)
            .bind(inst.state.as_str())
            .bind(&inst.executor_id)
            .bind(inst.endpoint.clone())
            .bind(inst.pid.map(i64::from))
            .bind(inst.started_at_ms)
            .bind(inst.exit.clone())
            .bind(now)
            .bind(i64::from(inst.dbos_admin))
            .execute(&mut *tx)
            .await?;
            let Some(app_id) = app_id else { continue };
            let before = previous.get(&inst.id).map(String::as_str);
            if inst.state == InstanceState::Ready && before != Some("ready") {
                insert_event(
                    &mut tx,
                    app_id,
                    "instance_ready",
                    &format!(
                        "instance {} of version {} is ready on host {name}",
                        inst.id, inst.version
                    ),
                    serde_json::json!({"instance": inst.id, "version": inst.version, "host": name,
                        "endpoint": inst.endpoint}),
                )
                .await?;
            }
            if before.is_none() && inst.state != InstanceState::Exited {
                crate::dbos::executor_seen(
                    &mut tx,
                    app_id,
                    &inst.executor_id,
                    inst.version,
                    &inst.id,
                    host_id,
                )
                .await?;
            }
            // On every ready report, not only the first: a target whose
            // instance was already ready (e.g. a rollback to a version still
            // running) must be promoted too. Both statements are
            // conditional, so a steady state writes nothing.
            if inst.state == InstanceState::Ready {
                promote_on_ready(&mut tx, app_id, inst.version).await?;
                if before != Some("ready") {
                    crate::dbos::executor_ready(
                        &mut tx,
                        &inst.executor_id,
                        &inst.id,
                        inst.dbos_admin,
                    )
                    .await?;
                }
            }
            if inst.state == InstanceState::Exited && before != Some("exited") {
                let why = inst.exit.clone().unwrap_or_else(|| "unknown reason".into());
                crate::dbos::executor_ended(&mut tx, &inst.executor_id, &inst.id, &why).await?;
                insert_event(
                    &mut tx,
                    app_id,
                    "instance_exited",
                    &format!("instance {} of version {} on host {name} exited: {why}", inst.id, inst.version),
                    serde_json::json!({"instance": inst.id, "version": inst.version, "host": name, "exit": inst.exit}),
                )
                .await?;
                // After the event: the app row is locked first on every path
                // (events bump its sequence), so heartbeats cannot deadlock.
                fail_if_crash_looping(&mut tx, app_id, inst.version, &why).await?;
            }
        }
        for id in previous.keys() {
            if !instances.iter().any(|i| &i.id == id) {
                if let Some(executor) = previous_executor.get(id) {
                    crate::dbos::executor_ended(
                        &mut tx,
                        executor,
                        id,
                        "vanished from its host's report",
                    )
                    .await?;
                }
                sqlx::query("DELETE FROM instances WHERE id = $1 AND host_id = $2")
                    .bind(id)
                    .bind(host_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(HostRecord {
            id: host_id.to_string(),
            name,
            session: session.to_string(),
            last_heartbeat_ms: now,
        })
    }

    /// Every host with its liveness judged against `timeout`.
    pub async fn list_hosts(&self, timeout: Duration) -> Result<Vec<HostInfo>> {
        let cutoff = now_ms() - timeout.as_millis() as i64;
        let rows = sqlx::query(
            "SELECT h.id AS id, h.name AS name, h.last_heartbeat AS last_heartbeat, h.memory_mb AS memory_mb, \
             h.cpus AS cpus, h.backends AS backends, \
             (SELECT COUNT(*) FROM instances i WHERE i.host_id = h.id AND i.state <> 'exited') AS instances \
             FROM hosts h ORDER BY h.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let last = get_i64(r, "last_heartbeat")?;
                Ok(HostInfo {
                    id: get_str(r, "id")?,
                    name: get_str(r, "name")?,
                    state: if last >= cutoff { "alive" } else { "dead" }.to_string(),
                    last_heartbeat_ms: last,
                    capacity: HostCapacity {
                        memory_mb: u64::try_from(get_i64(r, "memory_mb")?).unwrap_or(0),
                        cpus: to_u32(get_i64(r, "cpus")?),
                    },
                    instances: to_u32(get_i64(r, "instances")?),
                    backends: serde_json::from_str(&get_str(r, "backends")?).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Ids of hosts that heartbeated within `timeout`, sorted.
    pub async fn alive_host_ids(&self, timeout: Duration) -> Result<Vec<String>> {
        let cutoff = now_ms() - timeout.as_millis() as i64;
        let rows = sqlx::query("SELECT id FROM hosts WHERE last_heartbeat >= $1 ORDER BY id")
            .bind(cutoff)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| get_str(r, "id")).collect()
    }

    /// Apps (of every organisation) with the versions that should run: the
    /// active one and, while it starts, the target one (one entry each).
    pub async fn active_apps(&self) -> Result<Vec<ActiveApp>> {
        let rows = sqlx::query(
            "SELECT a.id AS id, a.name AS name, v.number AS version, a.min_instances AS min_instances, \
             a.max_instances AS max_instances, v.artifact_hash AS artifact_hash, v.config AS config \
             FROM apps a JOIN versions v ON v.app_id = a.id \
             AND (v.number = a.active_version OR v.number = a.target_version) \
             WHERE v.state = 'ready' AND v.artifact_hash IS NOT NULL ORDER BY a.id, v.number",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ActiveApp {
                    app_id: get_i64(r, "id")?,
                    name: get_str(r, "name")?,
                    version: to_u32(get_i64(r, "version")?),
                    min: to_u32(get_i64(r, "min_instances")?),
                    max: to_u32(get_i64(r, "max_instances")?),
                    artifact_hash: get_opt_str(r, "artifact_hash")?.unwrap_or_default(),
                    config: serde_json::from_str(&get_str(r, "config")?).map_err(|e| {
                        StoreError::Corrupt {
                            table: "versions",
                            message: e.to_string(),
                        }
                    })?,
                })
            })
            .collect()
    }

    /// Instances of an app as last observed, with host names.
    pub async fn app_instances(&self, app_id: i64) -> Result<Vec<InstanceInfo>> {
        let rows = sqlx::query(
            "SELECT i.id AS id, i.app_name AS app, i.version AS version, h.name AS host, i.state AS state, \
             i.executor_id AS executor_id, i.endpoint AS endpoint, i.started_at AS started_at, i.exit AS exit, \
             i.pid AS pid, i.dbos_admin AS dbos_admin, h.last_heartbeat AS last_heartbeat, h.id AS host_id \
             FROM instances i JOIN hosts h ON h.id = i.host_id WHERE i.app_id = $1 ORDER BY i.started_at, i.id",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceInfo {
                    id: get_str(r, "id")?,
                    app: get_str(r, "app")?,
                    version: to_u32(get_i64(r, "version")?),
                    host: get_str(r, "host")?,
                    state: instance_state(&get_str(r, "state")?)?,
                    executor_id: get_str(r, "executor_id")?,
                    endpoint: get_opt_str(r, "endpoint")?,
                    started_at_ms: get_i64(r, "started_at")?,
                    exit: get_opt_str(r, "exit")?,
                    pid: get_opt_i64(r, "pid")?.and_then(|p| u32::try_from(p).ok()),
                    dbos_admin: get_i64(r, "dbos_admin")? != 0,
                    host_id: get_str(r, "host_id")?,
                    host_heartbeat_ms: get_i64(r, "last_heartbeat")?,
                })
            })
            .collect()
    }

    /// Every app with its active version and the endpoints of the ready
    /// instances of that version on hosts that are alive.
    pub async fn routes(&self, host_timeout: Duration) -> Result<RouteTable> {
        let cutoff = now_ms() - host_timeout.as_millis() as i64;
        let apps = sqlx::query("SELECT id, name, active_version FROM apps ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        let eps = sqlx::query(
            "SELECT i.app_id AS app_id, i.id AS id, i.endpoint AS endpoint FROM instances i \
             JOIN apps a ON a.id = i.app_id JOIN hosts h ON h.id = i.host_id \
             WHERE i.state = 'ready' AND i.version = a.active_version AND i.endpoint IS NOT NULL \
             AND h.last_heartbeat >= $1 ORDER BY i.id",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let mut by_app: BTreeMap<i64, Vec<RouteEndpoint>> = BTreeMap::new();
        for r in &eps {
            if let Some(addr) = get_opt_str(r, "endpoint")? {
                by_app
                    .entry(get_i64(r, "app_id")?)
                    .or_default()
                    .push(RouteEndpoint {
                        instance: get_str(r, "id")?,
                        addr,
                    });
            }
        }
        let mut out = RouteTable::default();
        for a in &apps {
            let id = get_i64(a, "id")?;
            out.apps.push(AppRoute {
                app: get_str(a, "name")?,
                version: get_opt_i64(a, "active_version")?.map(to_u32),
                endpoints: by_app.remove(&id).unwrap_or_default(),
            });
        }
        Ok(out)
    }
}

/// An instance of the app's target version became ready: the target becomes
/// the active version (new requests go to it; the old version's instances
/// leave the intended state and are stopped).
async fn promote_on_ready(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    app_id: i64,
    version: u32,
) -> Result<()> {
    sqlx::query(
        "UPDATE versions SET ever_ready = 1 WHERE app_id = $1 AND number = $2 AND ever_ready = 0",
    )
    .bind(app_id)
    .bind(i64::from(version))
    .execute(&mut **tx)
    .await?;
    let promoted = sqlx::query(
        "UPDATE apps SET active_version = target_version, target_version = NULL \
         WHERE id = $1 AND target_version = $2",
    )
    .bind(app_id)
    .bind(i64::from(version))
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if promoted {
        insert_event(
            tx,
            app_id,
            "activated",
            &format!("version {version} is now active"),
            serde_json::json!({"version": version}),
        )
        .await?;
    }
    Ok(())
}

/// How many instances of a target version may exit before ever becoming
/// ready before the version is declared failed.
pub const START_FAILURES: i64 = 3;

/// A target version whose instances keep exiting without ever becoming ready
/// is failed, so the active version keeps serving and the deploy reports it.
async fn fail_if_crash_looping(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    app_id: i64,
    version: u32,
    why: &str,
) -> Result<()> {
    sqlx::query("UPDATE versions SET exits = exits + 1 WHERE app_id = $1 AND number = $2 AND ever_ready = 0")
        .bind(app_id)
        .bind(i64::from(version))
        .execute(&mut **tx)
        .await?;
    let failed = sqlx::query(
        "UPDATE apps SET target_version = NULL WHERE id = $1 AND target_version = $2 \
         AND EXISTS (SELECT 1 FROM versions v WHERE v.app_id = $1 AND v.number = $2 \
                     AND v.ever_ready = 0 AND v.exits >= $3)",
    )
    .bind(app_id)
    .bind(i64::from(version))
    .bind(START_FAILURES)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    if failed {
        let error = format!(
            "version {version} failed to start: {START_FAILURES} instances exited before becoming ready; last: {why}"
        );
        sqlx::query(
            "UPDATE versions SET state = 'failed', error = $1 WHERE app_id = $2 AND number = $3",
        )
        .bind(&error)
        .bind(app_id)
        .bind(i64::from(version))
        .execute(&mut **tx)
        .await?;
        insert_event(
            tx,
            app_id,
            "version_failed",
            &error,
            serde_json::json!({"version": version}),
        )
        .await?;
    }
    Ok(())
}
