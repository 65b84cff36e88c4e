//! Running instances: starting them in sandboxes, watching their exit and
//! health, forwarding the router's connections into their network
//! namespace, stopping them, and adopting them after an agent restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stead_api::{InstanceState, IntendedApp, ObservedInstance, RunSpec};
use stead_sandbox::{Backend, NetworkMode, Output, Persisted, SandboxProcess, SandboxSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::decide::{Observed, Phase, StopReason};
use crate::handover::{Item, Role};
use crate::traffic::{Pair, Paired};
use crate::{now_ms, Shared};

/// Port an app listens on inside its sandbox when its config names none.
/// Every instance has a network namespace of its own, so all can use it.
pub const DEFAULT_PORT: u16 = 8000;
const PIDS_MAX: u64 = 4096;

/// What survives an agent restart, in `instances/<id>/instance.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub id: String,
    pub app: String,
    pub version: u32,
    pub executor_id: String,
    pub port: u16,
    pub run: RunSpec,
    pub started_at: i64,
    pub sandbox: Persisted,
    /// Host services exposed inside the instance (see `IntendedApp::expose`).
    #[serde(default)]
    pub expose: Vec<String>,
    /// Port of the instance's endpoint on the host, kept across agent
    /// restarts so the routers' tables stay right.
    #[serde(default)]
    pub endpoint_port: Option<u16>,
}

pub(crate) struct Instance {
    pub id: String,
    pub app: String,
    pub version: u32,
    pub executor_id: String,
    pub phase: Phase,
    pub started_at: i64,
    pub endpoint: Option<SocketAddr>,
    pub process: Option<Arc<SandboxProcess>>,
    pub grace: Duration,
    pub exit: Option<String>,
    /// Forwarder, supervisor and health tasks: aborted when the instance is
    /// forgotten.
    pub tasks: Vec<JoinHandle<()>>,
    /// Set when the agent itself stopped it, so the exit is not counted as
    /// a crash.
    pub stopped_by_agent: bool,
    /// It answers the DBOS admin health check (so it can recover the
    /// workflows of dead executors through the admin endpoint).
    pub dbos_admin: bool,
    pub health_timeout: Duration,
    /// When it first passed its health check.
    pub ready_since: Option<i64>,
    /// Its app's `[dbos] recovery` lets this agent recover its workflows
    /// through the replacement's admin endpoint when it dies (`auto`,
    /// `admin`).
    pub admin_recovery: bool,
}

/// Whether `[dbos] recovery` lets the agent recover a dead instance's
/// workflows through the admin endpoint on its own (an older control plane
/// sends no mode: `auto`).
pub(crate) fn admin_recovery(run: &stead_api::RunSpec) -> bool {
    matches!(run.recovery.as_deref(), None | Some("auto") | Some("admin"))
}

/// An instance ready for this long before it dies was not crash-looping.
const STABLE_MS: i64 = 1_000;

pub(crate) fn instance_dir(shared: &Shared, id: &str) -> PathBuf {
    shared.instances_dir().join(id)
}

fn new_instance_id(app: &str, version: u32) -> String {
    let suffix: u32 = rand::random();
    format!("{app}-v{version}-{suffix:08x}")
}

/// The observed state, both for the decision and for the heartbeat.
pub(crate) async fn observe(shared: &Shared) -> Vec<(Observed, ObservedInstance)> {
    let instances = shared.instances.lock().await;
    instances
        .values()
        .map(|i| {
            let state = match i.phase {
                Phase::Starting => InstanceState::Starting,
                Phase::Ready | Phase::Unhealthy { .. } => InstanceState::Ready,
                Phase::Stopping => InstanceState::Stopping,
                Phase::Exited { .. } => InstanceState::Exited,
            };
            // An unhealthy instance keeps its slot until it is declared hung,
            // but the router should not send it new requests meanwhile.
            let endpoint = match i.phase {
                Phase::Ready => i.endpoint.map(|e| e.to_string()),
                _ => None,
            };
            let state = if matches!(i.phase, Phase::Unhealthy { .. }) {
                InstanceState::Starting
            } else {
                state
            };
            (
                Observed {
                    id: i.id.clone(),
                    app: i.app.clone(),
                    version: i.version,
                    phase: i.phase,
                    started_at: i.started_at,
                    executor_id: i.executor_id.clone(),
                    unhealthy_timeout: Some(i.health_timeout),
                },
                ObservedInstance {
                    id: i.id.clone(),
                    app: i.app.clone(),
                    version: i.version,
                    state,
                    executor_id: i.executor_id.clone(),
                    endpoint,
                    pid: i.process.as_ref().map(|p| p.pid()),
                    started_at_ms: i.started_at,
                    exit: i.exit.clone(),
                    dbos_admin: i.dbos_admin,
                },
            )
        })
        .collect()
}

async fn set_phase(shared: &Shared, id: &str, phase: Phase, exit: Option<String>) {
    let mut instances = shared.instances.lock().await;
    if let Some(i) = instances.get_mut(id) {
        // Exited is final; Stopping is only left for Exited.
        let allowed = match (i.phase, phase) {
            (Phase::Exited { .. }, _) => false,
            (Phase::Stopping, Phase::Exited { .. }) => true,
            (Phase::Stopping, _) => false,
            _ => true,
        };
        if allowed && i.phase != phase {
            if phase == Phase::Ready && i.ready_since.is_none() {
                i.ready_since = Some(now_ms());
            }
            if matches!(phase, Phase::Exited { .. }) && i.dbos_admin && i.admin_recovery {
                crate::recovery::witness_death(shared, &i.app, i.version, &i.executor_id);
            }
            i.phase = phase;
            if exit.is_some() {
                i.exit = exit;
            }
            drop(instances);
            shared.wake.notify_one();
        }
    }
}

/// Starts one instance of `spec`: records it as starting at once (so the
/// next pass does not start it twice), then prepares the artifact and
/// spawns the sandbox in the background.
pub(crate) async fn start(shared: &Arc<Shared>, spec: IntendedApp, executor_id: Option<String>) {
    let id = new_instance_id(&spec.app, spec.version);
    // Normally the instance id; the id of a dead instance when this one is
    // to take over its workflows by starting under its identity.
    let executor_id = executor_id.unwrap_or_else(|| id.clone());
    let now = now_ms();
    {
        let mut instances = shared.instances.lock().await;
        instances.insert(
            id.clone(),
            Instance {
                id: id.clone(),
                app: spec.app.clone(),
                version: spec.version,
                executor_id: executor_id.clone(),
                phase: Phase::Starting,
                started_at: now,
                endpoint: None,
                process: None,
                grace: Duration::from_secs(spec.run.grace_s as u64),
                exit: None,
                tasks: Vec::new(),
                stopped_by_agent: false,
                dbos_admin: false,
                ready_since: None,
                health_timeout: Duration::from_secs(u64::from(spec.run.health_timeout_s)),
                admin_recovery: admin_recovery(&spec.run),
            },
        );
    }
    tracing::info!(app = %spec.app, version = spec.version, instance = %id, host = %shared.config.name, "starting instance");
    let shared2 = shared.clone();
    let handle = tokio::spawn(async move {
        if let Err(e) = launch(&shared2, &id, &executor_id, &spec, now).await {
            tracing::warn!(app = %spec.app, version = spec.version, instance = %id, host = %shared2.config.name, error = %e, "instance failed to start");
            shared2
                .history
                .lock()
                .await
                .record(&spec.app, spec.version, now_ms());
            set_phase(&shared2, &id, Phase::Exited { at: now_ms() }, Some(e)).await;
        }
    });
    drop(handle);
}

async fn launch(
    shared: &Arc<Shared>,
    id: &str,
    executor_id: &str,
    spec: &IntendedApp,
    started_at: i64,
) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let app_dir =
        crate::build::ensure_artifact(shared, &spec.app, spec.version, &spec.artifact_hash)
            .await
            .map_err(|e| {
                format!(
                    "could not prepare the build of {} v{}: {e}",
                    spec.app, spec.version
                )
            })?;
    let dir = instance_dir(shared, id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let port = spec.run.port.unwrap_or(DEFAULT_PORT);
    let mut env = base_env();
    env.extend(spec.env.clone());
    env.insert("PORT".into(), port.to_string());
    env.insert("STEAD_INSTANCE".into(), id.to_string());
    env.insert("DBOS__VMID".into(), executor_id.to_string());
    let data_dir = app_data_dir(shared, &spec.app);
    tokio::fs::create_dir_all(&data_dir)
        .await
        .map_err(|e| format!("creating the app's data folder {}: {e}", data_dir.display()))?;
    env.insert("STEAD_DATA_DIR".into(), data_dir.display().to_string());
    if spec.run.language.as_deref() == Some("python") {
        // Run with the virtualenv the build made active, as DBOS Cloud does.
        let venv = app_dir.join(".venv");
        let path = env.get("PATH").cloned().unwrap_or_default();
        env.insert(
            "PATH".into(),
            format!("{}:{path}", venv.join("bin").display()),
        );
        env.insert("VIRTUAL_ENV".into(), venv.display().to_string());
    }
    env.insert("DBOS__APPVERSION".into(), spec.version.to_string());
    env.insert("DBOS__APPID".into(), spec.app_id.clone());
    env.insert("DBOS_APP_NAME".into(), spec.app.clone());
    env.insert("HOME".into(), app_dir.display().to_string());
    let choice = sandbox_choice(&app_dir, shared.sandbox.default_backend());
    let sandbox_spec = SandboxSpec {
        id: id.to_string(),
        cwd: app_dir,
        command: spec.run.start.clone(),
        env,
        memory_mb: spec.run.memory_mb,
        // Four processes (or threads) per MiB of memory, 256 to 4096: a
        // fork bomb hits the pids limit before the memory limit (a small
        // process costs its cgroup some 100 KiB).
        pids_max: (spec.run.memory_mb.saturating_mul(4)).clamp(256, PIDS_MAX),
        stdout: Output::File(dir.join("stdout.log")),
        stderr: Output::File(dir.join("stderr.log")),
        network: choice.1,
        // One CPU's worth per instance until apps can set their own: a
        // spinning instance cannot starve the others.
        cpu_millis: Some(1000),
        confine: Some(stead_sandbox::Confinement {
            // Bound read-write at its own path, with a disk quota.
            data_dir: Some(data_dir.clone()),
            ..shared.sandbox.confinement().clone()
        }),
        backend: choice.0,
    };
    let prepared_us = t0.elapsed().as_micros() as u64;
    let process = shared
        .sandbox
        .spawn(sandbox_spec)
        .await
        .map_err(|e| format!("could not start the sandbox: {e}"))?;
    let spawned_us = t0.elapsed().as_micros() as u64;
    let record = Record {
        id: id.to_string(),
        app: spec.app.clone(),
        version: spec.version,
        executor_id: executor_id.to_string(),
        expose: spec.expose.clone(),
        port,
        run: spec.run.clone(),
        started_at,
        sandbox: process.persisted(),
        endpoint_port: None,
    };
    write_record(&dir, &record).map_err(|e| format!("recording the instance: {e}"))?;
    attach(shared, record, process).await;
    // Where a cold start's time goes (µs since the start began).
    tracing::debug!(instance = %id, prepared_us, spawned_us,
        attached_us = t0.elapsed().as_micros() as u64, "instance launched");
    Ok(())
}

/// The backend and network of the version being started: its config's
/// `[run] sandbox` (else the host's default) and `[run] egress`, read from
/// the config file in its build, where the intended state does not carry
/// them.
fn sandbox_choice(app_dir: &Path, default: Backend) -> (Backend, NetworkMode) {
    let read = |f: &str| std::fs::read_to_string(app_dir.join(f)).ok();
    let cfg = stead_api::AppConfig::from_files(
        read(stead_api::config::STEAD_TOML).as_deref(),
        read(stead_api::config::DBOS_CONFIG).as_deref(),
    )
    .ok();
    let backend = cfg
        .as_ref()
        .and_then(|c| c.sandbox.as_deref())
        .and_then(Backend::parse)
        .unwrap_or(default);
    let network = if cfg.is_some_and(|c| c.egress) {
        NetworkMode::Egress
    } else {
        NetworkMode::Isolated
    };
    (backend, network)
}

/// Environment every sandbox starts from: enough to find the tools of the
/// host (a confined instance keeps only the PATH entries its root has).
pub(crate) fn base_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for key in ["PATH", "LANG", "RUSTUP_HOME", "CARGO_HOME", "TZ"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_string(), v);
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env
}

fn write_record(dir: &Path, record: &Record) -> std::io::Result<()> {
    let tmp = dir.join("instance.json.tmp");
    let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, dir.join("instance.json"))
}

/// Wires a running sandbox into the agent: the forwarder that gives it an
/// endpoint, the supervisor that notices its exit at once, and the health
/// checker.
async fn attach(shared: &Arc<Shared>, record: Record, process: SandboxProcess) {
    let process = Arc::new(process);
    let id = record.id.clone();
    let mut inherited = shared.hub.take_inherited(&id);
    // The previous agent's listener when it handed one over (nothing queued
    // in its backlog is lost); else the same port as before an agent
    // restart when it is still free, so routes stay valid; else a new one.
    let mut record = record;
    let handed = inherited
        .endpoint
        .take()
        .and_then(|l| TcpListener::from_std(l).ok());
    let previous = match (handed, record.endpoint_port) {
        (Some(l), _) => Some(l),
        (None, Some(p)) => TcpListener::bind(SocketAddr::new(shared.config.advertise_ip, p))
            .await
            .ok(),
        (None, None) => None,
    };
    let bound = match previous {
        Some(l) => Ok(l),
        None => TcpListener::bind(SocketAddr::new(shared.config.advertise_ip, 0)).await,
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(instance = %id, error = %e, "could not bind the instance's endpoint");
            let _ = process.kill();
            set_phase(
                shared,
                &id,
                Phase::Exited { at: now_ms() },
                Some(format!("no endpoint: {e}")),
            )
            .await;
            return;
        }
    };
    let endpoint = listener.local_addr().ok();
    if let Some(addr) = endpoint {
        if record.endpoint_port != Some(addr.port()) {
            record.endpoint_port = Some(addr.port());
            if let Err(e) = write_record(&instance_dir(shared, &id), &record) {
                tracing::warn!(instance = %id, error = %e, "could not record the instance's endpoint");
            }
        }
    }
    let mut tasks = Vec::new();
    let tracker = shared.telemetry.tracker(&id);
    // Connections the previous agent was forwarding, resumed where it
    // paused them.
    for (role, paired) in inherited.conns.drain(..) {
        let Some(pair) = resume(paired) else { continue };
        match role {
            Role::Endpoint => spawn_endpoint_splice(shared, &id, &tracker, pair),
            Role::Expose { target } => spawn_expose_splice(shared, &id, &target, pair),
        }
    }
    tasks.push(tokio::spawn(forward(
        shared.clone(),
        listener,
        process.clone(),
        record.port,
        id.clone(),
        tracker,
    )));
    // The app's own database, reachable inside its network namespace.
    for target in &record.expose {
        match expose(
            shared,
            &id,
            &process,
            target,
            inherited.expose.remove(target),
        )
        .await
        {
            Ok(task) => tasks.push(task),
            Err(e) => {
                tracing::warn!(instance = %id, target = %target, error = %e, "could not expose a host service inside the instance")
            }
        }
    }
    // Supervisor: the exit is noticed the moment it happens.
    {
        let shared = shared.clone();
        let process = process.clone();
        let record = record.clone();
        tasks.push(tokio::spawn(async move {
            let info = process.wait().await;
            let (stopped_by_agent, ready_since, stopping) = {
                let instances = shared.instances.lock().await;
                instances
                    .get(&record.id)
                    .map(|i| (i.stopped_by_agent, i.ready_since, i.phase == Phase::Stopping))
                    .unwrap_or((true, None, false))
            };
            // Being stopped by `stop`: that task records the exit with the
            // reason for the stop (e.g. a failed health check), which the
            // bare signal would hide.
            if stopping {
                return;
            }
            if !stopped_by_agent {
                tracing::warn!(app = %record.app, version = record.version, instance = %record.id, host = %shared.config.name, exit = %info.description, "instance exited");
                // Only a crash before (or right after) becoming ready counts
                // towards the crash-loop backoff: an instance that served
                // and then died is replaced at once, so its workflows
                // resume without waiting.
                let served = ready_since.is_some_and(|t| now_ms() - t >= STABLE_MS);
                if !served {
                    shared.history.lock().await.record(&record.app, record.version, now_ms());
                }
            }
            set_phase(&shared, &record.id, Phase::Exited { at: now_ms() }, Some(info.description)).await;
        }));
    }
    tasks.push(tokio::spawn(health_loop(
        shared.clone(),
        process.clone(),
        record.clone(),
    )));
    let mut instances = shared.instances.lock().await;
    match instances.get_mut(&id) {
        Some(i) => {
            i.endpoint = endpoint;
            i.process = Some(process);
            i.tasks.extend(tasks);
        }
        None => {
            // Forgotten meanwhile (e.g. stopped while starting): undo.
            for t in tasks {
                t.abort();
            }
            let _ = process.kill();
        }
    }
}

/// The instance's endpoint: accepts the routers' connections on the host
/// and splices each with a connection made inside the instance's network
/// namespace, counting them (open, busy) so that a stop can drain them.
/// On a hand-over it stops accepting and hands its listener in.
async fn forward(
    shared: Arc<Shared>,
    listener: TcpListener,
    process: Arc<SandboxProcess>,
    port: u16,
    id: String,
    tracker: Arc<crate::traffic::ConnTracker>,
) {
    let _ticket = shared.hub.ticket();
    let mut pause = shared.hub.pause_signal();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = pause.wait_for(|p| *p) => {
                if let Ok(listener) = listener.into_std() {
                    shared.hub.put(Item::Listener { instance: id, role: Role::Endpoint, listener });
                }
                return;
            }
            a = listener.accept() => a,
        };
        let (inbound, _) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "accept failed on the instance endpoint");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let process = process.clone();
        let tracker = tracker.clone();
        let shared = shared.clone();
        let id = id.clone();
        let ticket = shared.hub.ticket();
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            match process.connect(port).await {
                Ok(upstream) => {
                    let _ = upstream.set_nodelay(true);
                    // Its own ticket first, so a hand-over waits for it.
                    spawn_endpoint_splice(&shared, &id, &tracker, Pair::new(inbound, upstream));
                    drop(ticket);
                }
                Err(_) => {
                    // Closing the inbound connection without a byte tells the
                    // router the instance refused before anything was sent.
                    drop(inbound);
                }
            }
        });
    }
}

/// Turns sockets handed over by the previous agent back into a pair.
fn resume(paired: Paired) -> Option<Pair> {
    let a = tokio::net::TcpStream::from_std(paired.a).ok()?;
    let b = tokio::net::TcpStream::from_std(paired.b).ok()?;
    Some(Pair {
        a,
        b,
        a_done: paired.a_done,
        b_done: paired.b_done,
        pending: paired.pending,
    })
}

/// Forwards one router connection; on a hand-over, hands it in.
fn spawn_endpoint_splice(
    shared: &Arc<Shared>,
    id: &str,
    tracker: &Arc<crate::traffic::ConnTracker>,
    pair: Pair,
) {
    let ticket = shared.hub.ticket();
    let pause = shared.hub.pause_signal();
    let (shared, id, tracker) = (shared.clone(), id.to_string(), tracker.clone());
    tokio::spawn(async move {
        let _ticket = ticket;
        if let Some(paired) = tracker.splice(pair, pause).await {
            shared.hub.put(Item::Conn {
                instance: id,
                role: Role::Endpoint,
                paired,
            });
        }
    });
}

/// Forwards one connection of the app to a host service; on a hand-over,
/// hands it in.
fn spawn_expose_splice(shared: &Arc<Shared>, id: &str, target: &str, pair: Pair) {
    let ticket = shared.hub.ticket();
    let pause = shared.hub.pause_signal();
    let (shared, id, target) = (shared.clone(), id.to_string(), target.to_string());
    tokio::spawn(async move {
        let _ticket = ticket;
        if let Some(paired) = crate::traffic::splice_with(pair, pause, || {}, || {}).await {
            shared.hub.put(Item::Conn {
                instance: id,
                role: Role::Expose { target },
                paired,
            });
        }
    });
}

/// One health probe: an HTTP GET of the health path when there is one
/// (2xx/3xx passes), else the port accepting a connection.
async fn probe(process: &SandboxProcess, port: u16, health: Option<&str>) -> bool {
    let attempt = async {
        let mut conn = process.connect(port).await.ok()?;
        let Some(path) = health else {
            return Some(true);
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: stead-health\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 32];
        let mut n = 0;
        while n < 12 {
            let m = conn.read(&mut buf[n..]).await.ok()?;
            if m == 0 {
                break;
            }
            n += m;
        }
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// Whether the DBOS admin server of the instance answers its health check.
pub(crate) async fn probe_admin(process: &SandboxProcess, port: u16) -> bool {
    probe(process, port, Some("/dbos-healthz")).await
}

async fn health_loop(shared: Arc<Shared>, process: Arc<SandboxProcess>, record: Record) {
    let health = record.run.health.clone();
    // Fast polling until the first success: a request waiting for a cold
    // start waits on this, so every millisecond for the first half second
    // (a probe is one connection inside the sandbox), then backing off.
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        // A dead instance of this version left workflows to recover through
        // the admin endpoint: do it the moment this one's admin server
        // answers, before its app is ready and before its queue first polls.
        if let Some(admin) = record.run.admin_port {
            if crate::recovery::witnessed(&shared, &record.app, record.version) {
                crate::recovery::try_local(
                    &shared,
                    &record.id,
                    &record.app,
                    record.version,
                    &process,
                    admin,
                )
                .await;
            }
        }
        if probe(&process, record.port, health.as_deref()).await {
            tracing::info!(app = %record.app, version = record.version, instance = %record.id, host = %shared.config.name,
                probing_ms = started.elapsed().as_secs_f64() * 1000.0, "instance ready");
            if let Some(admin) = record.run.admin_port {
                if probe(&process, admin, Some("/dbos-healthz")).await {
                    if let Some(i) = shared.instances.lock().await.get_mut(&record.id) {
                        i.dbos_admin = true;
                    }
                }
            }
            set_phase(&shared, &record.id, Phase::Ready, None).await;
            break;
        }
        if started.elapsed() < Duration::from_millis(500) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    let mut unhealthy_since: Option<i64> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if probe(&process, record.port, health.as_deref()).await {
            if unhealthy_since.take().is_some() {
                set_phase(&shared, &record.id, Phase::Ready, None).await;
            }
        } else if unhealthy_since.is_none() {
            let now = now_ms();
            unhealthy_since = Some(now);
            tracing::warn!(app = %record.app, version = record.version, instance = %record.id, "instance failed its health check");
            set_phase(&shared, &record.id, Phase::Unhealthy { since: now }, None).await;
        }
    }
}

/// Stops an instance: no new traffic (it leaves the route table with the
/// next heartbeat, as its state is `stopping`), SIGTERM, grace, SIGKILL.
///
/// An instance that was serving (ready) is drained first: once the control
/// plane has acknowledged it as stopping and routers have dropped it, the
/// requests it is still answering may finish, up to its grace period; the
/// rest of the grace period then separates SIGTERM from SIGKILL.
pub(crate) async fn stop(shared: &Arc<Shared>, id: &str, reason: StopReason) {
    let (process, grace, app, version, serving, mark) = {
        let mut instances = shared.instances.lock().await;
        let Some(i) = instances.get_mut(id) else {
            return;
        };
        if matches!(i.phase, Phase::Stopping | Phase::Exited { .. }) {
            return;
        }
        let serving = i.phase == Phase::Ready;
        i.phase = Phase::Stopping;
        i.stopped_by_agent = true;
        // Read under the lock that set the phase: every later observation
        // reports the instance as stopping.
        let mark = shared.telemetry.observation_mark();
        (
            i.process.clone(),
            i.grace,
            i.app.clone(),
            i.version,
            serving,
            mark,
        )
    };
    tracing::info!(app = %app, version, instance = %id, host = %shared.config.name, reason = reason.describe(), "stopping instance");
    // Report it as stopping now, so routers stop sending it requests.
    shared.wake.notify_one();
    let shared = shared.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let desc = match process {
            Some(p) => {
                let started = tokio::time::Instant::now();
                let mut grace_left = grace;
                if serving {
                    let tracker = shared.telemetry.tracker(&id);
                    let drained = crate::traffic::drain(&shared, &id, &tracker, mark, grace).await;
                    shared.telemetry.count_drain(drained);
                    tracing::info!(app = %app, version, instance = %id, ?drained,
                        took_ms = started.elapsed().as_millis() as u64, "instance drained");
                    grace_left = grace
                        .saturating_sub(started.elapsed())
                        .max(Duration::from_secs(1).min(grace));
                }
                let info = p.stop(grace_left).await;
                format!("stopped ({}): {}", reason.describe(), info.description)
            }
            None => format!("stopped before it started ({})", reason.describe()),
        };
        set_phase(&shared, &id, Phase::Exited { at: now_ms() }, Some(desc)).await;
    });
}

/// Drops an exited instance: ships its last log lines, removes its files.
pub(crate) async fn forget(shared: &Arc<Shared>, id: &str) {
    let removed = shared.instances.lock().await.remove(id);
    let Some(instance) = removed else { return };
    for t in &instance.tasks {
        t.abort();
    }
    let shared = shared.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        crate::logship::ship_instance(&shared, &instance.app, instance.version, &id).await;
        let _ = tokio::fs::remove_dir_all(instance_dir(&shared, &id)).await;
    });
}

/// Adopts the sandboxes an earlier run of this agent left running, so an
/// agent restart neither kills nor duplicates them.
pub(crate) async fn adopt_all(shared: &Arc<Shared>) {
    let dir = shared.instances_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let record: Option<Record> = std::fs::read(path.join("instance.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(record) = record else {
            let _ = std::fs::remove_dir_all(&path);
            continue;
        };
        match shared.sandbox.adopt(&record.sandbox) {
            Ok(Some(process)) => {
                tracing::info!(app = %record.app, version = record.version, instance = %record.id, host = %shared.config.name, "adopted running instance");
                shared.instances.lock().await.insert(
                    record.id.clone(),
                    Instance {
                        id: record.id.clone(),
                        app: record.app.clone(),
                        version: record.version,
                        executor_id: record.executor_id.clone(),
                        phase: Phase::Starting,
                        started_at: record.started_at,
                        endpoint: None,
                        process: None,
                        grace: Duration::from_secs(record.run.grace_s as u64),
                        exit: None,
                        tasks: Vec::new(),
                        stopped_by_agent: false,
                        dbos_admin: false,
                        ready_since: None,
                        health_timeout: Duration::from_secs(u64::from(record.run.health_timeout_s)),
                        admin_recovery: admin_recovery(&record.run),
                    },
                );
                attach(shared, record, process).await;
            }
            Ok(None) | Err(_) => {
                // Reported as exited with the next heartbeat, so that the
                // control plane recovers the workflows it owned; forgotten
                // (logs shipped, files removed) after that.
                tracing::info!(app = %record.app, version = record.version, instance = %record.id, "instance from an earlier agent run is gone");
                shared.instances.lock().await.insert(
                    record.id.clone(),
                    Instance {
                        id: record.id.clone(),
                        app: record.app.clone(),
                        version: record.version,
                        executor_id: record.executor_id.clone(),
                        phase: Phase::Exited { at: now_ms() },
                        started_at: record.started_at,
                        endpoint: None,
                        process: None,
                        grace: Duration::from_secs(record.run.grace_s as u64),
                        exit: Some("exited while the agent was not running".into()),
                        tasks: Vec::new(),
                        stopped_by_agent: false,
                        dbos_admin: false,
                        ready_since: None,
                        health_timeout: Duration::from_secs(u64::from(record.run.health_timeout_s)),
                        admin_recovery: admin_recovery(&record.run),
                    },
                );
            }
        }
    }
}

/// Stops every instance (used by `stead dev` on exit).
pub(crate) async fn stop_all(shared: &Arc<Shared>) {
    let list: Vec<(String, Option<Arc<SandboxProcess>>, Duration)> = {
        let mut instances = shared.instances.lock().await;
        instances
            .values_mut()
            .map(|i| {
                i.stopped_by_agent = true;
                (i.id.clone(), i.process.clone(), i.grace)
            })
            .collect()
    };
    let mut waits = Vec::new();
    for (id, p, grace) in list {
        if let Some(p) = p {
            waits.push(tokio::spawn(async move {
                p.stop(grace.min(Duration::from_secs(5))).await;
                id
            }));
        }
    }
    for w in waits {
        if let Ok(id) = w.await {
            let (app, version) = {
                let instances = shared.instances.lock().await;
                match instances.get(&id) {
                    Some(i) => (i.app.clone(), i.version),
                    None => continue,
                }
            };
            crate::logship::ship_instance(shared, &app, version, &id).await;
            let _ = tokio::fs::remove_dir_all(instance_dir(shared, &id)).await;
        }
    }
}

/// The per-app folder that survives instance replacement (`STEAD_DATA_DIR`).
pub(crate) fn app_data_dir(shared: &Shared, app: &str) -> PathBuf {
    shared.config.data_dir.join("appdata").join(app)
}

/// Makes `target` (`host:port`, reachable from the agent) reachable inside
/// the instance at `127.0.0.1:<port>`: a listener inside its network
/// namespace whose connections the agent relays. This is how an isolated
/// instance reaches its own database and nothing else.
async fn expose(
    shared: &Arc<Shared>,
    id: &str,
    process: &Arc<SandboxProcess>,
    target: &str,
    handed: Option<std::net::TcpListener>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = match handed.and_then(|l| TcpListener::from_std(l).ok()) {
        Some(l) => l,
        None => {
            let port: u16 = target
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("{target:?} is not host:port")))?;
            process.listen(port).await?
        }
    };
    let target = target.to_string();
    let (shared, id) = (shared.clone(), id.to_string());
    let ticket = shared.hub.ticket();
    Ok(tokio::spawn(async move {
        let _ticket = ticket;
        let mut pause = shared.hub.pause_signal();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = pause.wait_for(|p| *p) => {
                    if let Ok(listener) = listener.into_std() {
                        shared.hub.put(Item::Listener { instance: id, role: Role::Expose { target }, listener });
                    }
                    return;
                }
                a = listener.accept() => a,
            };
            let Ok((inbound, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let ticket = shared.hub.ticket();
            let (shared, id, target) = (shared.clone(), id.clone(), target.clone());
            tokio::spawn(async move {
                if let Ok(out) = tokio::net::TcpStream::connect(&target).await {
                    let _ = out.set_nodelay(true);
                    spawn_expose_splice(&shared, &id, &target, Pair::new(inbound, out));
                    drop(ticket);
                }
            });
        }
    }))
}

/// Ends this agent's part in every instance (supervisor, health checks,
/// forwarders) without touching the instances, for a hand-over: the
/// successor adopts them.
pub(crate) async fn detach_all(shared: &Arc<Shared>) {
    let mut instances = shared.instances.lock().await;
    for instance in instances.values_mut() {
        for t in instance.tasks.drain(..) {
            t.abort();
        }
    }
}
