//! The library's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while setting up, starting, adopting or
/// signalling a sandbox. Each variant says which sandbox (by id) and which
/// path or system call was involved, so that an operator reading the agent's
/// log can act on it without reproducing the failure.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The spec cannot be run as given (bad id, zero limits, NUL bytes...).
    #[error("sandbox {id}: invalid spec: {reason}")]
    InvalidSpec { id: String, reason: String },

    /// No cgroup hierarchy with a memory controller could be found or
    /// prepared on this host.
    #[error("no usable cgroup hierarchy: {reason}")]
    CgroupUnavailable { reason: String },

    /// Preparing the agent-wide cgroup parent (at start-up) failed.
    #[error("preparing the sandboxes' cgroup parent: {op} {path}: {source}")]
    CgroupSetup {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Creating, configuring or removing one sandbox's cgroup failed.
    #[error("sandbox {id}: cgroup: {op} {path}: {source}")]
    Cgroup {
        id: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The sandbox's cgroup already exists and still contains processes.
    #[error(
        "sandbox {id}: cgroup {path} still has processes in it \
         (is a sandbox with this id already running?)"
    )]
    CgroupBusy { id: String, path: PathBuf },

    /// A file the sandbox needs (an output file, /proc entry...) could not
    /// be opened or read.
    #[error("sandbox {id}: {what} {path}: {source}")]
    Io {
        id: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A system call made on the sandbox's behalf failed.
    #[error("sandbox {id}: {call} failed: {source}")]
    Syscall {
        id: String,
        call: &'static str,
        #[source]
        source: io::Error,
    },

    /// The sandbox init binary could not be started.
    #[error("sandbox {id}: starting the sandbox init {init_exe}: {source}")]
    Spawn {
        id: String,
        init_exe: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The sandbox init started but reported that a setup step failed
    /// (e.g. changing to the working directory, executing /bin/sh).
    #[error("sandbox {id}: setting up the sandbox failed: {message}")]
    Setup { id: String, message: String },

    /// The sandbox init neither executed the command nor reported an error in
    /// time; it has been killed.
    #[error("sandbox {id}: the sandbox did not finish starting within {after:?}")]
    StartTimeout { id: String, after: Duration },

    /// Sending a signal to the sandbox failed.
    #[error("sandbox {id}: sending {signal} to pid {pid}: {source}")]
    Signal {
        id: String,
        pid: u32,
        signal: &'static str,
        #[source]
        source: io::Error,
    },

    /// The spec (or the adopted record) asks for a backend this host does
    /// not have (gvisor without `runsc`).
    #[error("sandbox {id}: the {backend} sandbox backend is not available on this host")]
    BackendUnavailable {
        id: String,
        backend: crate::spec::Backend,
    },

    /// A function that needs tokio's reactor was called outside a runtime.
    #[error("{what} must be called from within a tokio runtime")]
    NoRuntime { what: &'static str },
}
