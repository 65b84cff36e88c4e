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

/// The one field of a stored config placement needs (parsing only it is
/// several times cheaper than the whole config).
#[derive(serde::Deserialize)]
struct MemoryOnly {
    memory_mb: u64,
}

/// What a heartbeat did.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatOutcome {
    pub host: HostRecord,
    /// The report differed from the one stored before (or revived the
    /// host, or promoted a target), so its rows were rewritten: waiters on
    /// the intended state should look again. False: only the heartbeat
    /// time moved.
    pub changed: bool,
}

/// An instance row as stored, to tell what a report changes.
struct StoredInstance {
    app_id: Option<i64>,
    app: String,
    version: u32,
    state: String,
    executor_id: String,
    endpoint: Option<String>,
    pid: Option<i64>,
    started_at: i64,
    exit: Option<String>,
    dbos_admin: bool,
    generation: i64,
}

impl StoredInstance {
    fn same_as(&self, i: &ObservedInstance) -> bool {
        self.app_id.is_some()
            && self.app == i.app
            && self.version == i.version
            && self.state == i.state.as_str()
            && self.executor_id == i.executor_id
            && self.endpoint == i.endpoint
            && self.pid == i.pid.map(i64::from)
            && self.started_at == i.started_at_ms
            && self.exit == i.exit
            && self.dbos_admin == i.dbos_admin
    }
}

/// A digest of everything a host reports about its instances that the
/// store keeps, independent of the order they are listed in: equal
/// digests mean the report would write exactly the rows already stored.
pub fn observed_digest(instances: &[ObservedInstance]) -> String {
    use sha2::{Digest, Sha256};
    let mut sorted: Vec<&ObservedInstance> = instances.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut h = Sha256::new();
    for i in sorted {
        // serde_json of a tuple: unambiguous field boundaries.
        let fields = (
            &i.id,
            &i.app,
            i.version,
            i.state.as_str(),
            &i.executor_id,
            &i.endpoint,
            i.pid,
            i.started_at_ms,
            &i.exit,
            i.dbos_admin,
        );
        h.update(serde_json::to_vec(&fields).unwrap_or_default());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// An alive host, for placement.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementHost {
    pub id: String,
    pub memory_mb: u64,
    pub backends: Vec<String>,
    pub draining: bool,
}

/// An instance that runs on an alive host, for placement and fencing.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementInstance {
    pub id: String,
    pub app_id: i64,
    pub version: u32,
    pub host_id: String,
    pub ready: bool,
    /// Reported by its host before (or when) it came back from the dead.
    pub fenced: bool,
    /// `memory_mb` of its version (0 if the version is gone).
    pub memory_mb: u64,
}

/// See [`Store::placement_inputs`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlacementInputs {
    pub hosts: Vec<PlacementHost>,
    pub instances: Vec<PlacementInstance>,
}

/// An app whose active version is ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveApp {
    pub app_id: i64,
    pub name: String,
    pub version: u32,
    /// It is the app's active version (else its target).
    pub active: bool,
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
    /// An existing host keeps its last heartbeat time: if it was dead, the
    /// first heartbeat of the new session is the one that brings it back,
    /// and fences what that heartbeat reports (see [`Store::heartbeat_fenced`]).
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
                 agent_version = excluded.agent_version, session = excluded.session",
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
            self.heartbeat_once(host_id, session, instances, None)
        })
        .await
        .map(|o| o.host)
    }

    /// [`Store::heartbeat`] with fencing: when the host's previous heartbeat
    /// is older than `host_timeout` (it was dead, so its instances may have
    /// been placed elsewhere and their executors recovered), the host's
    /// generation is raised and every instance it reported before or
    /// reports now keeps the old one: fenced. Fenced instances are not
    /// routed, not counted by placement, and their agent is told to stop
    /// them, so nothing runs twice on the intended state's behalf.
    pub async fn heartbeat_fenced(
        &self,
        host_id: &str,
        session: &str,
        instances: &[ObservedInstance],
        host_timeout: Duration,
    ) -> Result<HeartbeatOutcome> {
        self.retry("heartbeat", || {
            self.heartbeat_once(host_id, session, instances, Some(host_timeout))
        })
        .await
    }

    async fn heartbeat_once(
        &self,
        host_id: &str,
        session: &str,
        instances: &[ObservedInstance],
        host_timeout: Option<Duration>,
    ) -> Result<HeartbeatOutcome> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // Whether an app's pending target has a ready instance on this
        // host: that heartbeat must promote it even if it reports nothing
        // new (a rollback to a version still running). The partial index
        // on pending targets keeps this to the few apps being deployed.
        let host = sqlx::query(
            "SELECT name, session, last_heartbeat, generation, observed_digest, \
             CASE WHEN EXISTS (SELECT 1 FROM apps a JOIN instances i ON i.app_id = a.id AND i.version = a.target_version \
                     WHERE a.target_version IS NOT NULL AND i.host_id = $1 AND i.state = 'ready') \
             THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END AS promotable \
             FROM hosts WHERE id = $1",
        )
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
        let old_generation = get_i64(&host, "generation")?;
        let revived = host_timeout.is_some_and(|t| {
            get_i64(&host, "last_heartbeat").is_ok_and(|last| last < now - t.as_millis() as i64)
        });
        let generation = old_generation + i64::from(revived);
        let digest = observed_digest(instances);
        let promotable = get_i64(&host, "promotable")? != 0;
        let unchanged = !revived && !promotable && get_str(&host, "observed_digest")? == digest;
        sqlx::query(
            "UPDATE hosts SET last_heartbeat = $1, generation = $2, observed_digest = $3 WHERE id = $4",
        )
        .bind(now)
        .bind(generation)
        .bind(&digest)
        .bind(host_id)
        .execute(&mut *tx)
        .await?;
        if unchanged {
            // The report is the one already stored: its rows, events and
            // executors are as they were; only the heartbeat time moves.
            tx.commit().await?;
            return Ok(HeartbeatOutcome {
                host: HostRecord {
                    id: host_id.to_string(),
                    name,
                    session: session.to_string(),
                    last_heartbeat_ms: now,
                },
                changed: false,
            });
        }
        if revived {
            tracing::warn!(host = %name, generation, instances = instances.len(),
                "host is back after being judged dead: the instances it reports are fenced");
        }
        // What this report brings in: instances already known keep their
        // generation (the upsert leaves it alone); new ones take the host's,
        // except in the report that revives the host, which is all stale.
        let new_generation = if revived { old_generation } else { generation };
        let prev_rows = sqlx::query(
            "SELECT id, app_id, app_name, version, state, executor_id, endpoint, pid, started_at, exit, \
             dbos_admin, generation FROM instances WHERE host_id = $1",
        )
        .bind(host_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut previous: HashMap<String, StoredInstance> = HashMap::new();
        for r in &prev_rows {
            previous.insert(
                get_str(r, "id")?,
                StoredInstance {
                    app_id: get_opt_i64(r, "app_id")?,
                    app: get_str(r, "app_name")?,
                    version: to_u32(get_i64(r, "version")?),
                    state: get_str(r, "state")?,
                    executor_id: get_str(r, "executor_id")?,
                    endpoint: get_opt_str(r, "endpoint")?,
                    pid: get_opt_i64(r, "pid")?,
                    started_at: get_i64(r, "started_at")?,
                    exit: get_opt_str(r, "exit")?,
                    dbos_admin: get_i64(r, "dbos_admin")? != 0,
                    generation: get_i64(r, "generation")?,
                },
            );
        }
        let mut app_ids: HashMap<&str, Option<i64>> = HashMap::new();
        for inst in instances {
            let before_row = previous.get(&inst.id);
            // A row that already says what is reported is left alone (no
            // write, no event): only what changed costs anything. The
            // report that revives a host is all handled (fencing).
            if let Some(p) = before_row.filter(|p| !revived && p.same_as(inst)) {
                if let (Some(app_id), true) = (p.app_id, promotable) {
                    if inst.state == InstanceState::Ready && p.generation >= generation {
                        promote_on_ready(&mut tx, app_id, inst.version).await?;
                    }
                }
                continue;
            }
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
            let fenced = before_row.map_or(new_generation, |p| p.generation) < generation;
            sqlx::query(
                "INSERT INTO instances (id, app_id, app_name, version, host_id, state, executor_id, endpoint, pid, \
                 started_at, exit, updated_at, dbos_admin, generation) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
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
            .bind(new_generation)
            .execute(&mut *tx)
            .await?;
            let Some(app_id) = app_id else { continue };
            // A fenced instance only matters until its agent stops it: it
            // neither registers an executor nor promotes a version.
            if fenced {
                if revived && inst.state != InstanceState::Exited {
                    insert_event(
                        &mut tx,
                        app_id,
                        "instance_fenced",
                        &format!(
                            "instance {} of version {} on host {name} is stale (its host was judged dead and came back): it is stopped, not routed",
                            inst.id, inst.version
                        ),
                        serde_json::json!({"instance": inst.id, "version": inst.version, "host": name}),
                    )
                    .await?;
                }
                if inst.state == InstanceState::Exited
                    && before_row.map(|p| p.state.as_str()) != Some("exited")
                {
                    crate::dbos::executor_ended(&mut tx, &inst.executor_id, &inst.id, "fenced")
                        .await?;
                }
                continue;
            }
            let before = before_row.map(|p| p.state.as_str());
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
        let reported: std::collections::HashSet<&str> =
            instances.iter().map(|i| i.id.as_str()).collect();
        for (id, p) in &previous {
            if !reported.contains(id.as_str()) {
                crate::dbos::executor_ended(
                    &mut tx,
                    &p.executor_id,
                    id,
                    "vanished from its host's report",
                )
                .await?;
                sqlx::query("DELETE FROM instances WHERE id = $1 AND host_id = $2")
                    .bind(id)
                    .bind(host_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(HeartbeatOutcome {
            host: HostRecord {
                id: host_id.to_string(),
                name,
                session: session.to_string(),
                last_heartbeat_ms: now,
            },
            changed: true,
        })
    }

    /// Every host with its liveness judged against `timeout`.
    pub async fn list_hosts(&self, timeout: Duration) -> Result<Vec<HostInfo>> {
        let cutoff = now_ms() - timeout.as_millis() as i64;
        let rows = sqlx::query(
            "SELECT h.id AS id, h.name AS name, h.last_heartbeat AS last_heartbeat, h.memory_mb AS memory_mb, \
             h.cpus AS cpus, h.backends AS backends, h.draining AS draining, \
             (SELECT COUNT(*) FROM instances i WHERE i.host_id = h.id AND i.state <> 'exited' \
              AND i.generation = h.generation) AS instances, \
             (SELECT COUNT(*) FROM instances i WHERE i.host_id = h.id AND i.state <> 'exited' \
              AND i.generation < h.generation) AS fenced \
             FROM hosts h ORDER BY h.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let last = get_i64(r, "last_heartbeat")?;
                let draining = get_i64(r, "draining")? != 0;
                Ok(HostInfo {
                    id: get_str(r, "id")?,
                    name: get_str(r, "name")?,
                    state: match (last >= cutoff, draining) {
                        (false, _) => "dead",
                        (true, true) => "draining",
                        (true, false) => "alive",
                    }
                    .to_string(),
                    draining,
                    fenced: to_u32(get_i64(r, "fenced")?),
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

    /// Marks a host (by name or id) draining or not; `None` if unknown.
    pub async fn set_draining(&self, host: &str, draining: bool) -> Result<Option<String>> {
        let row =
            sqlx::query("UPDATE hosts SET draining = $1 WHERE name = $2 OR id = $2 RETURNING name")
                .bind(i64::from(draining))
                .bind(host)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| get_str(&r, "name")).transpose()
    }

    /// What placement needs, in two queries: the alive hosts and every
    /// instance that runs (not exited) on them, fenced ones marked, with
    /// the memory its version asks for.
    pub async fn placement_inputs(&self, timeout: Duration) -> Result<PlacementInputs> {
        let cutoff = now_ms() - timeout.as_millis() as i64;
        let rows = sqlx::query(
            "SELECT id, memory_mb, backends, draining FROM hosts WHERE last_heartbeat >= $1 ORDER BY id",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let mut hosts = Vec::new();
        for r in &rows {
            hosts.push(PlacementHost {
                id: get_str(r, "id")?,
                memory_mb: u64::try_from(get_i64(r, "memory_mb")?).unwrap_or(0),
                backends: serde_json::from_str(&get_str(r, "backends")?).unwrap_or_default(),
                draining: get_i64(r, "draining")? != 0,
            });
        }
        // The memory each running version asks for, once per version (not
        // once per instance: configs are the largest column there is).
        let rows = sqlx::query(
            "SELECT v.app_id AS app_id, v.number AS number, v.config AS config FROM versions v \
             WHERE EXISTS (SELECT 1 FROM instances i WHERE i.app_id = v.app_id AND i.version = v.number \
             AND i.state <> 'exited')",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut memory: HashMap<(i64, u32), u64> = HashMap::with_capacity(rows.len());
        for r in &rows {
            let m = serde_json::from_str::<MemoryOnly>(&get_str(r, "config")?)
                .map(|c| c.memory_mb)
                .unwrap_or(0);
            memory.insert((get_i64(r, "app_id")?, to_u32(get_i64(r, "number")?)), m);
        }
        let rows = sqlx::query(
            "SELECT i.id AS id, i.app_id AS app_id, i.version AS version, i.host_id AS host_id, \
             i.state AS state, i.generation AS generation, h.generation AS host_generation \
             FROM instances i JOIN hosts h ON h.id = i.host_id \
             WHERE i.state <> 'exited' AND h.last_heartbeat >= $1 AND i.app_id IS NOT NULL ORDER BY i.id",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let mut instances = Vec::with_capacity(rows.len());
        for r in &rows {
            let app_id = get_i64(r, "app_id")?;
            let version = to_u32(get_i64(r, "version")?);
            instances.push(PlacementInstance {
                id: get_str(r, "id")?,
                app_id,
                version,
                host_id: get_str(r, "host_id")?,
                ready: instance_state(&get_str(r, "state")?)? == InstanceState::Ready,
                fenced: get_i64(r, "generation")? < get_i64(r, "host_generation")?,
                memory_mb: memory.get(&(app_id, version)).copied().unwrap_or(0),
            });
        }
        Ok(PlacementInputs { hosts, instances })
    }

    /// The alive hosts as placement sees them, in one small query.
    pub async fn alive_hosts(&self, timeout: Duration) -> Result<Vec<PlacementHost>> {
        let cutoff = now_ms() - timeout.as_millis() as i64;
        let rows = sqlx::query(
            "SELECT id, memory_mb, backends, draining FROM hosts WHERE last_heartbeat >= $1 ORDER BY id",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let mut hosts = Vec::with_capacity(rows.len());
        for r in &rows {
            hosts.push(PlacementHost {
                id: get_str(r, "id")?,
                memory_mb: u64::try_from(get_i64(r, "memory_mb")?).unwrap_or(0),
                backends: serde_json::from_str(&get_str(r, "backends")?).unwrap_or_default(),
                draining: get_i64(r, "draining")? != 0,
            });
        }
        Ok(hosts)
    }

    /// The revision of the intended state: raised (by triggers, in the
    /// same transaction) by every change of what hosts should run, so
    /// that a computed intended state stays valid while it stands.
    pub async fn intended_rev(&self) -> Result<i64> {
        let row = sqlx::query("SELECT rev FROM intended_rev WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        get_i64(&row, "rev")
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
            "SELECT a.id AS id, a.name AS name, v.number AS version, a.active_version AS active_version, \
             a.min_instances AS min_instances, \
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
                    active: get_opt_i64(r, "active_version")? == Some(get_i64(r, "version")?),
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

    /// Instances of an app as last observed, with host names; fenced ones
    /// (reported by a host that came back after being judged dead) are left
    /// out: they are being stopped and stand for nothing.
    pub async fn app_instances(&self, app_id: i64) -> Result<Vec<InstanceInfo>> {
        let rows = sqlx::query(
            "SELECT i.id AS id, i.app_name AS app, i.version AS version, h.name AS host, i.state AS state, \
             i.executor_id AS executor_id, i.endpoint AS endpoint, i.started_at AS started_at, i.exit AS exit, \
             i.pid AS pid, i.dbos_admin AS dbos_admin, h.last_heartbeat AS last_heartbeat, h.id AS host_id \
             FROM instances i JOIN hosts h ON h.id = i.host_id WHERE i.app_id = $1 \
             AND i.generation = h.generation ORDER BY i.started_at, i.id",
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
             AND h.last_heartbeat >= $1 AND i.generation = h.generation ORDER BY i.id",
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

#[cfg(test)]
mod digest_tests {
    use super::*;

    fn inst(id: &str, state: InstanceState) -> ObservedInstance {
        ObservedInstance {
            id: id.into(),
            app: "web".into(),
            version: 1,
            state,
            executor_id: id.into(),
            endpoint: Some("127.0.0.1:1".into()),
            pid: Some(7),
            started_at_ms: 5,
            exit: None,
            dbos_admin: false,
        }
    }

    #[test]
    fn digest_ignores_order_and_sees_every_stored_field() {
        let a = inst("a", InstanceState::Ready);
        let b = inst("b", InstanceState::Starting);
        let base = observed_digest(&[a.clone(), b.clone()]);
        assert_eq!(base, observed_digest(&[b.clone(), a.clone()]));
        assert_ne!(base, observed_digest(std::slice::from_ref(&a)));
        assert_ne!(base, observed_digest(&[]));
        type Change = Box<dyn Fn(&mut ObservedInstance)>;
        let changes: Vec<Change> = vec![
            Box::new(|i| i.app = "api".into()),
            Box::new(|i| i.version = 2),
            Box::new(|i| i.state = InstanceState::Stopping),
            Box::new(|i| i.executor_id = "other".into()),
            Box::new(|i| i.endpoint = None),
            Box::new(|i| i.pid = None),
            Box::new(|i| i.started_at_ms = 6),
            Box::new(|i| i.exit = Some("x".into())),
            Box::new(|i| i.dbos_admin = true),
        ];
        for (n, change) in changes.iter().enumerate() {
            let mut c = a.clone();
            change(&mut c);
            assert_ne!(base, observed_digest(&[c, b.clone()]), "change {n} unseen");
        }
        // Field boundaries are unambiguous: moving text between fields differs.
        let mut x = inst("ab", InstanceState::Ready);
        x.app = "c".into();
        let mut y = inst("a", InstanceState::Ready);
        y.app = "bc".into();
        assert_ne!(observed_digest(&[x]), observed_digest(&[y]));
    }
}
