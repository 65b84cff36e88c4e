//! Sandboxes instances run in: the `process` backend (Linux namespaces,
//! cgroups, a pivoted read-only root, a user namespace, seccomp) and the
//! `gvisor` backend (`runsc`), behind one interface ([`Sandbox`],
//! [`Sandboxes`]).
//!
//! An instance of a user's app, or its build, runs as `/bin/sh -c <command>`
//! (or the command itself when it has no shell syntax) in its own pid,
//! mount, uts, ipc and (unless it is a build that needs the network) network
//! namespace, inside a cgroup that limits its memory, CPU and number of
//! processes. cgroup v1 and v2 hosts are both supported.
//!
//! ```text
//! agent ──fork+unshare──▶ outer init (agent's pid ns, new mnt/uts/ipc/net ns,
//!                          │           in the sandbox cgroup)
//!                          └─fork──▶ pid 1 (new pid ns: /proc, reaper)
//!                                      └─fork──▶ /bin/sh -c <command>
//! ```
//!
//! The agent's binary must call [`init_main`] when `argv[1]` is
//! [`INIT_SUBCOMMAND`]. The outer init joins the sandbox's cgroup before it
//! executes (so everything it forks is limited), makes mounts private, sets
//! the hostname and brings `lo` up; pid 1 mounts a fresh `/proc`, forwards
//! SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the command's process
//! group, reaps zombies, and exits with the command (the kernel then kills
//! the rest of the namespace); the outer init exits the way the command did,
//! so the agent (its parent) sees the command's status.
//!
//! Sandboxes outlive the agent: dropping a [`SandboxProcess`] leaves it
//! running, and a restarted agent re-attaches with
//! [`ProcessSandbox::adopt`]. Under systemd that requires `KillMode=process`
//! (or the sandboxes' cgroups being outside the unit's); on cgroup v2 the
//! agent's cgroup must be delegated (`Delegate=yes`, ideally
//! `DelegateSubgroup=stead-agent`), or the agent moves its own cgroup's
//! processes into a `stead-agent` leaf so that it may delegate to
//! `<its cgroup>/stead`.
//!
//! **Confinement** ([`Confinement`] in the spec; what instances get, builds
//! do not): the outer init, still root on the host, builds a new root in
//! its mount namespace (a tmpfs holding read-only binds of the host's
//! runtime directories and of the app's folder at its own path, a
//! size-limited `/tmp` and data directory, a minimal `/dev`) and sets
//! rlimits; pid 1 mounts its `/proc` there, pivots into it, detaches the
//! host's tree, makes `/` read-only, then enters a user namespace of its
//! own whose id 1000 the outer init maps to an unprivileged host id, empties
//! the capability bounding set and becomes that user. The command gets
//! no_new_privs and a seccomp filter ([`confine::DENIED_SYSCALLS`]). All
//! namespaces but the user one belong to the host's user namespace, so even
//! a capability regained inside would not let the app mount, configure its
//! network or change its hostname. The plan is computed by the agent and
//! only executed by the init, behind a seam ([`confine::MountSys`]) that
//! the unit tests replace.
//!
//! Backends: [`Sandboxes`] holds the process backend and, when `runsc` is
//! installed, the gVisor one ([`GvisorSandbox`]); both implement
//! [`Sandbox`] and return the same [`SandboxProcess`] handle.

mod backend;
mod cgroup;
pub mod confine;
mod datadir;
mod error;
mod exit;
mod gvisor;
mod init;
pub mod netconf;
mod netns;
mod process;
mod spare;
mod spec;
mod sys;

pub use backend::{BoxFuture, Sandbox, Sandboxes};
pub use cgroup::{CgroupPaths, CgroupVersion};
pub use confine::{Confinement, SeccompMode};
pub use datadir::release_data_dirs;
pub use error::SandboxError;
pub use exit::{signal_name, ExitInfo};
pub use gvisor::{find_runsc, GvisorSandbox, GVISOR_DIR};
pub use init::{init_main, EXIT_EXEC_FAILED, EXIT_SETUP_FAILED, INIT_SUBCOMMAND};
pub use netconf::{Ipv4Net, NetConfig};
pub use process::{Persisted, ProcessSandbox, SandboxProcess, DEFAULT_STAGING_DIR};
pub use spec::{
    Backend, NetworkMode, Output, SandboxSpec, DEFAULT_MEMORY_MB, DEFAULT_PATH, DEFAULT_PIDS_MAX,
    INIT_PROCESSES, MAX_HOSTNAME_LEN, MAX_ID_LEN,
};
