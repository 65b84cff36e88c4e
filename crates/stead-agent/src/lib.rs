//! The data-plane agent.
//!
//! One agent runs per host. It registers the host, then runs two loops:
//!
//! * the **resolving loop**: every `poll_interval` (and at once when an
//!   instance changes), it sends the control plane the whole observed state
//!   of its host in a heartbeat, receives the intended state back, asks the
//!   pure [`decide::decide`] what to do, and applies those actions;
//! * the **build loop**: claims build tasks (with a lease, so a task whose
//!   agent died is retried elsewhere), runs the app's build and migration
//!   commands in a sandbox, uploads the built folder as an artifact.
//!
//! Instances run in sandboxes whose stdout/stderr go straight to files, so
//! that an agent restart neither kills them nor loses their output: a new
//! agent process adopts the sandboxes it finds recorded under its data
//! directory.

pub mod build;
pub mod client;
pub mod decide;
mod handover;
mod instance;
mod logship;
mod metrics;
mod recovery;
mod traffic;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stead_api::{
    HeartbeatRequest, HeartbeatResponse, IntendedHostState, RegisterRequest, RegisterResponse,
};
use stead_sandbox::{Backend, Sandboxes};
use tokio::sync::{Mutex, Notify};

pub use client::{ApiClient, ClientError};
use decide::{Action, ExitHistory, Policy};
use instance::Instance;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("could not register host {host} with the control plane: {source}")]
    Register { host: String, source: ClientError },
    #[error("sandbox backend unavailable on host {host}: {source}")]
    Sandbox {
        host: String,
        source: stead_sandbox::SandboxError,
    },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent of host {host}: {source}")]
    Handover {
        host: String,
        source: handover::HandoverError,
    },
    #[error("cannot serve the agent's metrics on {addr}: {source}; choose another --metrics-listen address")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub servers: Vec<String>,
    pub token: String,
    pub data_dir: PathBuf,
    /// Stable host name; the control plane keys the host by it.
    pub name: String,
    /// Binary that runs `__sandbox-init` (the `stead` binary itself).
    pub init_exe: PathBuf,
    /// Address the router uses to reach this host's instances.
    pub advertise_ip: IpAddr,
    pub poll_interval: Duration,
    pub policy: Policy,
    /// `stead dev` stops its instances when it exits; a production agent
    /// leaves them running so that restarting it costs nothing.
    pub stop_instances_on_exit: bool,
    pub build_memory_mb: u64,
    /// Run build tasks on this host.
    pub builds: bool,
    /// Sandbox backend of instances whose app names none
    /// (`stead agent --sandbox`).
    pub sandbox: Backend,
    /// Address pool and denied destinations of egress instances
    /// (`stead agent --egress-pool`).
    pub egress: stead_sandbox::NetConfig,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// When an instance is stopped, how long after the control plane
    /// acknowledged it as stopping its in-flight requests are waited for
    /// at least: the time routers take to drop it from their tables (they
    /// long-poll routes, so milliseconds; this also covers one that falls
    /// back to polling every 500 ms).
    pub drain_propagation: Duration,
}

impl AgentConfig {
    pub fn new(
        servers: Vec<String>,
        token: String,
        data_dir: PathBuf,
        name: String,
        init_exe: PathBuf,
    ) -> Self {
        AgentConfig {
            servers,
            token,
            data_dir,
            name,
            init_exe,
            advertise_ip: IpAddr::from([127, 0, 0, 1]),
            poll_interval: Duration::from_secs(1),
            policy: Policy::default(),
            stop_instances_on_exit: false,
            build_memory_mb: 4096,
            builds: true,
            sandbox: Backend::Process,
            egress: stead_sandbox::NetConfig::default(),
            metrics_listen: None,
            drain_propagation: Duration::from_millis(600),
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// State shared by the agent's tasks.
pub(crate) struct Shared {
    pub config: AgentConfig,
    pub client: ApiClient,
    pub sandbox: Sandboxes,
    pub host_id: String,
    pub session: String,
    pub instances: Mutex<BTreeMap<String, Instance>>,
    /// Woken when an instance changes phase, so the loop reacts at once.
    pub wake: Notify,
    pub history: Mutex<ExitHistory>,
    /// Admin-endpoint recoveries under way, so one order is carried out
    /// once even though every heartbeat repeats it until it is reported.
    pub recovering: Mutex<std::collections::HashSet<String>>,
    /// Deaths of admin-server instances seen here, awaiting recovery
    /// through a live instance of the same version (see `recovery`).
    pub witnessed: std::sync::Mutex<Vec<recovery::Witnessed>>,
    /// Measurements, counters and heartbeat acknowledgements.
    pub(crate) telemetry: metrics::Telemetry,
    /// Forwarders' pause and sockets for a hand-over to a successor agent,
    /// and those received from the predecessor.
    pub(crate) hub: Arc<handover::Hub>,
}

impl Shared {
    pub fn instances_dir(&self) -> PathBuf {
        self.config.data_dir.join("instances")
    }
    pub fn apps_dir(&self) -> PathBuf {
        self.config.data_dir.join("apps")
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.config.data_dir.join("tmp")
    }
}

fn mkdir(path: &Path) -> Result<(), AgentError> {
    std::fs::create_dir_all(path).map_err(|source| AgentError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let sandbox = Sandboxes::new(config.init_exe.clone(), config.sandbox)
        .map_err(|source| AgentError::Sandbox {
            host: config.name.clone(),
            source,
        })?
        .with_net_config(config.egress.clone());
    for d in ["instances", "apps", "tmp"] {
        mkdir(&config.data_dir.join(d))?;
    }
    let client = ApiClient::new(config.servers.clone(), config.token.clone());
    let capacity = host_capacity();
    let req = RegisterRequest {
        name: config.name.clone(),
        capacity,
        backends: sandbox.backends().iter().map(|b| b.to_string()).collect(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    // The control plane may still be starting (or restarting): retry for a
    // while before giving up, with backoff.
    let mut delay = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let reg: RegisterResponse = loop {
        match client.post("/v1/agent/register", &req).await {
            Ok(r) => break r,
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && e.status().is_none_or(|s| s >= 500) =>
            {
                tracing::warn!(host = %config.name, error = %e, "registering with the control plane failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(source) => {
                return Err(AgentError::Register {
                    host: config.name.clone(),
                    source,
                })
            }
        }
    };
    tracing::info!(host = %config.name, host_id = %reg.host_id, "agent registered");
    // One agent per data directory; a running one hands its sockets over
    // (after registering, so that a control plane that cannot be reached
    // leaves the running agent as it is).
    let (lock, inherited) = handover::acquire(&config.data_dir, &config.name)
        .await
        .map_err(|source| AgentError::Handover {
            host: config.name.clone(),
            source,
        })?;
    let shared = Arc::new(Shared {
        client,
        sandbox,
        host_id: reg.host_id,
        session: reg.session,
        instances: Mutex::new(BTreeMap::new()),
        wake: Notify::new(),
        history: Mutex::new(ExitHistory::default()),
        recovering: Mutex::new(std::collections::HashSet::new()),
        witnessed: std::sync::Mutex::new(Vec::new()),
        telemetry: metrics::Telemetry::default(),
        hub: handover::Hub::new(inherited),
        config,
    });
    instance::adopt_all(&shared).await;
    let unclaimed = shared.hub.drop_unclaimed();
    if !unclaimed.is_empty() {
        tracing::info!(host = %shared.config.name, instances = ?unclaimed, "closed the sockets handed over for instances that are gone");
    }
    let successors = handover::listen(&shared.config.data_dir, &lock).map_err(|source| {
        AgentError::Handover {
            host: shared.config.name.clone(),
            source,
        }
    })?;

    let metrics_server = match shared.config.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr)
                .await
                .map_err(|source| AgentError::Metrics { addr, source })?;
            Some(tokio::spawn(metrics::serve(shared.clone(), listener)))
        }
        None => None,
    };
    let resolver = tokio::spawn(resolve_loop(shared.clone()));
    let builder = shared
        .config
        .builds
        .then(|| tokio::spawn(build::build_loop(shared.clone())));
    let shipper = tokio::spawn(logship::ship_loop(shared.clone()));
    let successor = tokio::select! {
        _ = shutdown => None,
        s = handover::wait_for_successor(&successors, &shared.config.data_dir) => Some(s),
    };
    resolver.abort();
    if let Some(b) = builder {
        b.abort();
    }
    if let Some(successor) = successor {
        shipper.abort();
        hand_over(&shared, successor).await;
        if let Some(m) = metrics_server {
            m.abort();
        }
        drop(successors);
        drop(lock);
        return Ok(());
    }
    if shared.config.stop_instances_on_exit {
        instance::stop_all(&shared).await;
        // Leave no data-directory mounts behind (their images keep the data).
        stead_sandbox::release_data_dirs(&shared.config.data_dir);
    }
    // One last shipment so the last lines before exit reach the logs.
    logship::ship_once(&shared).await;
    shipper.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    Ok(())
}

/// Hands every instance's sockets to the agent that asked for them, then
/// lets this one end without stopping anything: the successor adopts the
/// instances and resumes their forwarders where this one paused them.
async fn hand_over(shared: &Arc<Shared>, successor: handover::Successor) {
    let host = &shared.config.name;
    tracing::info!(host = %host, successor_pid = successor.pid, "handing over to a new agent");
    let started = tokio::time::Instant::now();
    let cut = shared.hub.pause_all(Duration::from_secs(3)).await;
    if cut > 0 {
        tracing::warn!(host = %host, connections = cut, "connections whose peer stopped reading could not be paused; they are cut");
    }
    instance::detach_all(shared).await;
    // The successor ships from the offsets this one leaves; ship what is
    // there now so nothing waits for it.
    logship::ship_once(shared).await;
    let items = shared.hub.take_collected();
    let count = items.len();
    match handover::hand_over(successor, items).await {
        Ok(_) => {
            tracing::info!(host = %host, sockets = count, took_ms = started.elapsed().as_millis() as u64, "handed over; exiting")
        }
        Err(e) => {
            tracing::error!(host = %host, error = %e, "the hand-over failed; the next agent rebinds the endpoints (connections in flight are cut)")
        }
    }
}

fn host_capacity() -> stead_api::HostCapacity {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    stead_api::HostCapacity { memory_mb, cpus }
}

async fn resolve_loop(shared: Arc<Shared>) {
    // The last intended state received: used while the control plane is
    // unreachable, so crashed instances are still replaced.
    let mut intended: Option<IntendedHostState> = None;
    // The etag of `intended`, sent back so that the control plane holds the
    // heartbeat until the intended state changes (long-poll): changes reach
    // this host within milliseconds, not at the next poll.
    let mut etag: Option<String> = None;
    let poll_ms = u64::try_from(shared.config.poll_interval.as_millis()).unwrap_or(1000);
    // What the control plane last acknowledged of this host (each instance's
    // state): a heartbeat that reports something new is not held, so that
    // the decision that follows (replacing an instance that just died) is
    // made at once rather than when the hold ends.
    let mut acknowledged: Option<Vec<(String, stead_api::InstanceState)>> = None;
    loop {
        let seq = shared.telemetry.next_observation();
        let observed = instance::observe(&shared).await;
        let summary: Vec<(String, stead_api::InstanceState)> = observed
            .iter()
            .map(|(_, o)| (o.id.clone(), o.state))
            .collect();
        let news = acknowledged.as_ref() != Some(&summary);
        let (cpu_millis, cpu_period_ms) = metrics::sample_cpu(&shared).await;
        let req = HeartbeatRequest {
            host_id: shared.host_id.clone(),
            session: shared.session.clone(),
            instances: observed.iter().map(|(_, o)| o.clone()).collect(),
            wait_ms: if intended.is_some() && !news {
                poll_ms
            } else {
                0
            },
            known: etag.clone(),
            cpu_millis,
            cpu_period_ms,
            // The control plane reads each app's system database itself
            // (see `version_work` in the store); agents report nothing here.
            queued_workflows: BTreeMap::new(),
        };
        let sent = tokio::time::Instant::now();
        let reply = tokio::select! {
            r = shared.client.post::<_, HeartbeatResponse>("/v1/agent/heartbeat", &req) => r,
            // Something changed here while the heartbeat was held: report
            // it now rather than when the hold ends.
            _ = shared.wake.notified() => continue,
        };
        // Whether to go round again at once: the control plane held the
        // heartbeat (so it paces the loop) or sent a new intended state.
        let mut again = false;
        match reply {
            Ok(resp) => {
                shared.telemetry.heartbeat_ok(seq, sent.elapsed());
                acknowledged = Some(summary);
                let held = sent.elapsed() >= shared.config.poll_interval / 2;
                // A report of news is answered at once (not held): go
                // round again to long-poll, so a change made meanwhile is
                // not left waiting for the poll interval.
                again = resp.etag.is_some() && (held || resp.etag != etag || news);
                etag = resp.etag;
                intended = Some(resp.intended);
            }
            Err(e) => {
                shared.telemetry.heartbeat_failed();
                etag = None;
                tracing::warn!(host = %shared.config.name, error = %e, "heartbeat failed; keeping what runs")
            }
        }
        if let Some(intended) = &intended {
            let now = now_ms();
            let decision_input: Vec<decide::Observed> =
                observed.into_iter().map(|(d, _)| d).collect();
            let actions = {
                let mut history = shared.history.lock().await;
                history.prune(now, &shared.config.policy);
                decide::decide(
                    &decision_input,
                    intended,
                    &history,
                    now,
                    &shared.config.policy,
                )
            };
            recovery::admin_orders(&shared, intended).await;
            for action in actions {
                shared.telemetry.count_action(&action);
                apply(&shared, intended, action).await;
            }
        }
        {
            let instances = shared.instances.lock().await;
            shared.telemetry.retain(&|id| instances.contains_key(id));
        }
        // Without a long-poll to pace it (an error, or a control plane that
        // answers at once), the loop waits out the poll interval; a local
        // change (an instance exits, becomes ready) still wakes it at once.
        if !again {
            tokio::select! {
                _ = tokio::time::sleep_until(sent + shared.config.poll_interval) => {}
                _ = shared.wake.notified() => {}
            }
        }
    }
}

async fn apply(shared: &Arc<Shared>, intended: &IntendedHostState, action: Action) {
    match action {
        Action::Start {
            app,
            version,
            executor_id,
        } => {
            let Some(spec) = intended
                .apps
                .iter()
                .find(|a| a.app == app && a.version == version)
            else {
                return;
            };
            instance::start(shared, spec.clone(), executor_id).await;
        }
        Action::Stop { id, reason } => instance::stop(shared, &id, reason).await,
        Action::Forget { id } => instance::forget(shared, &id).await,
    }
}
