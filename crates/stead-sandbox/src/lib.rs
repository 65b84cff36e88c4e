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
//! [`INIT_SUBCOMMAND`]; see the `init` module docs for what each process
//! does. Still to come (hence [`SandboxSpec`] is built to grow): a user
//! namespace, pivot_root into a read-only root, seccomp, dropped
//! capabilities, CPU limits.

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
