//! The interface the agent starts and adopts sandboxes through, whatever
//! backend runs them.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::confine::Confinement;
use crate::error::SandboxError;
use crate::gvisor::GvisorSandbox;
use crate::process::{Persisted, ProcessSandbox, SandboxProcess};
use crate::spec::{Backend, SandboxSpec};

/// A boxed future, so that [`Sandbox`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A sandbox backend: starts sandboxes from a spec, and re-attaches to the
/// ones an earlier agent left running. Every backend returns the same
/// [`SandboxProcess`] handle (exit, stop with grace, kill, `connect` and
/// `listen` inside its network namespace, persisted record), so the agent
/// never needs to know which one runs an instance.
pub trait Sandbox: Send + Sync {
    fn backend(&self) -> Backend;
    /// Starts a sandbox; returns once its command is running.
    fn spawn(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxProcess, SandboxError>>;
    /// See [`ProcessSandbox::adopt`]. Must be called within a tokio runtime.
    fn adopt(&self, persisted: &Persisted) -> Result<Option<SandboxProcess>, SandboxError>;
}

impl Sandbox for ProcessSandbox {
    fn backend(&self) -> Backend {
        Backend::Process
    }
    fn spawn(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxProcess, SandboxError>> {
        Box::pin(ProcessSandbox::spawn(self, spec))
    }
    fn adopt(&self, persisted: &Persisted) -> Result<Option<SandboxProcess>, SandboxError> {
        ProcessSandbox::adopt(self, persisted)
    }
}

/// Every backend this host has, dispatching on [`SandboxSpec::backend`]
/// (and on [`Persisted::backend`] to adopt). What the agent holds.
pub struct Sandboxes {
    process: ProcessSandbox,
    gvisor: Option<GvisorSandbox>,
    default: Backend,
    confinement: Confinement,
}

impl Sandboxes {
    /// The process backend (required), and gVisor when `runsc` is found.
    /// `default` is the backend of instances whose app names none; asking
    /// for gvisor on a host without `runsc` is an error, not a silent
    /// downgrade of the isolation an operator chose.
    pub fn new(init_exe: PathBuf, default: Backend) -> Result<Self, SandboxError> {
        let process = ProcessSandbox::new(init_exe.clone())?;
        let gvisor = match GvisorSandbox::detect(init_exe) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::info!(reason = %e, "the gvisor backend is not available on this host");
                if default == Backend::Gvisor {
                    return Err(e);
                }
                None
            }
        };
        Ok(Sandboxes {
            process,
            gvisor,
            default,
            confinement: Confinement::detect(),
        })
    }

    /// The confinement detected for this host (its runtimes' paths), for
    /// instance specs: detected once, as it runs `python3`.
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// Uses `net` (egress address pool, denied destinations) for egress
    /// instances of every backend.
    pub fn with_net_config(mut self, net: crate::netconf::NetConfig) -> Self {
        self.process = self.process.with_net_config(net.clone());
        self.gvisor = self.gvisor.map(|g| g.with_net_config(net));
        self
    }

    /// Keeps a spare sandbox ready in each backend (see
    /// [`ProcessSandbox::keep_spare`]; gVisor's sandboxes are process
    /// sandboxes too).
    pub fn keep_spares(mut self) -> Self {
        self.process = self.process.keep_spare();
        self.gvisor = self.gvisor.map(GvisorSandbox::keep_spare);
        self
    }

    /// Ends the waiting spares and makes no more (the agent stopping).
    pub fn release_spares(&self) {
        self.process.release_spares();
        if let Some(g) = &self.gvisor {
            g.release_spares();
        }
    }

    /// Backends this host can run, for its registration.
    pub fn backends(&self) -> Vec<Backend> {
        let mut v = vec![Backend::Process];
        if self.gvisor.is_some() {
            v.push(Backend::Gvisor);
        }
        v
    }

    /// The host's default backend (`stead agent --sandbox`).
    pub fn default_backend(&self) -> Backend {
        self.default
    }

    pub fn process(&self) -> &ProcessSandbox {
        &self.process
    }

    fn get(&self, backend: Backend, id: &str) -> Result<&dyn Sandbox, SandboxError> {
        match backend {
            Backend::Process => Ok(&self.process),
            Backend::Gvisor => match &self.gvisor {
                Some(g) => Ok(g),
                None => Err(SandboxError::BackendUnavailable {
                    id: id.to_owned(),
                    backend,
                }),
            },
        }
    }

    /// Starts `spec` with its backend.
    pub async fn spawn(&self, spec: SandboxSpec) -> Result<SandboxProcess, SandboxError> {
        let id = spec.id.clone();
        self.get(spec.backend, &id)?.spawn(spec).await
    }

    /// Adopts with the backend that started it.
    pub fn adopt(&self, persisted: &Persisted) -> Result<Option<SandboxProcess>, SandboxError> {
        self.get(persisted.backend, &persisted.id)?.adopt(persisted)
    }
}
