//! Sandboxes instances run in: the `process` backend (Linux namespaces,
//! cgroups).
//!
//! An instance of a user's app, or its build, runs as `/bin/sh -c <command>`
//! in its own pid, mount, uts, ipc and (unless it is a build that needs the
//! network) network namespace, inside a cgroup that limits its memory and
//! number of processes. cgroup v1 and v2 hosts are both supported.
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
//! Still to come (hence [`SandboxSpec`] is built to grow): a user namespace,
//! pivot_root into a read-only root, seccomp, no_new_privs, dropped
//! capabilities, CPU limits, egress rules for the network namespace.

mod cgroup;
mod error;
mod exit;
mod init;
mod netns;
mod process;
mod spec;
mod sys;

pub use cgroup::{CgroupPaths, CgroupVersion};
pub use error::SandboxError;
pub use exit::{signal_name, ExitInfo};
pub use init::{init_main, EXIT_EXEC_FAILED, EXIT_SETUP_FAILED, INIT_SUBCOMMAND};
pub use process::{Persisted, ProcessSandbox, SandboxProcess};
pub use spec::{
    NetworkMode, Output, SandboxSpec, DEFAULT_MEMORY_MB, DEFAULT_PATH, DEFAULT_PIDS_MAX,
    INIT_PROCESSES, MAX_HOSTNAME_LEN, MAX_ID_LEN,
};
