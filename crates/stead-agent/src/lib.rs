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
mod instance;
mod logship;

use std::collections::BTreeMap;
use std::net::IpAddr;
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
    let sandbox =
        Sandboxes::new(config.init_exe.clone(), config.sandbox).map_err(|source| AgentError::Sandbox {
            host: config.name.clone(),
            source,
        })?;
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
    let shared = Arc::new(Shared {
        client,
        sandbox,
        host_id: reg.host_id,
        session: reg.session,
        instances: Mutex::new(BTreeMap::new()),
        wake: Notify::new(),
        history: Mutex::new(ExitHistory::default()),
        config,
    });
    instance::adopt_all(&shared).await;

    let resolver = tokio::spawn(resolve_loop(shared.clone()));
    let builder = shared
        .config
        .builds
        .then(|| tokio::spawn(build::build_loop(shared.clone())));
    let shipper = tokio::spawn(logship::ship_loop(shared.clone()));
    shutdown.await;
    resolver.abort();
    if let Some(b) = builder {
        b.abort();
    }
    if shared.config.stop_instances_on_exit {
        instance::stop_all(&shared).await;
        // Leave no data-directory mounts behind (their images keep the data).
        stead_sandbox::release_data_dirs(&shared.config.data_dir);
    }
    // One last shipment so the last lines before exit reach the logs.
    logship::ship_once(&shared).await;
    shipper.abort();
    Ok(())
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
    loop {
        let observed = instance::observe(&shared).await;
        let req = HeartbeatRequest {
            host_id: shared.host_id.clone(),
            session: shared.session.clone(),
            instances: observed.iter().map(|(_, o)| o.clone()).collect(),
        };
        match shared
            .client
            .post::<_, HeartbeatResponse>("/v1/agent/heartbeat", &req)
            .await
        {
            Ok(resp) => intended = Some(resp.intended),
            Err(e) => {
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
            for action in actions {
                apply(&shared, intended, action).await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

async fn apply(shared: &Arc<Shared>, intended: &IntendedHostState, action: Action) {
    match action {
        Action::Start { app, version } => {
            let Some(spec) = intended
                .apps
                .iter()
                .find(|a| a.app == app && a.version == version)
            else {
                return;
            };
            instance::start(shared, spec.clone()).await;
        }
        Action::Stop { id, reason } => instance::stop(shared, &id, reason).await,
        Action::Forget { id } => instance::forget(shared, &id).await,
    }
}
