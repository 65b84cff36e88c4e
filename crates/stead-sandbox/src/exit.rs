//! How a sandbox ended, in a form both programs and people can read.

use serde::{Deserialize, Serialize};

/// How a sandbox's process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit status, when the command exited normally.
    pub code: Option<i32>,
    /// The signal that killed the command.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed a process in the sandbox (the memory
    /// limit was reached). Usually that was the command itself.
    pub oom_killed: bool,
    /// One line for logs and the CLI, e.g. "exited with status 1",
    /// "killed by signal 9 (SIGKILL)", "killed by the kernel's OOM killer:
    /// memory limit 64 MiB reached".
    pub description: String,
}

/// "SIGKILL" for 9, and so on; "unknown signal" for numbers nix doesn't know.
pub fn signal_name(signal: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str())
        .unwrap_or("unknown signal")
}

impl ExitInfo {
    /// Builds the info and its description. `code` and `signal` are both
    /// `None` when the status is unknown (a sandbox adopted from an earlier
    /// agent is not our child, so its status cannot be collected).
    pub fn new(code: Option<i32>, signal: Option<i32>, oom_killed: bool, memory_mb: u64) -> Self {
        let status = match (code, signal) {
            // Shells report a child killed by signal N as 128+N.
            (Some(c), _) if c > 128 && signal_name(c - 128) != "unknown signal" => {
                format!("exited with status {c} (128 + {})", signal_name(c - 128))
            }
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by signal {s} ({})", signal_name(s)),
            (None, None) => "exited (exit status unknown: the sandbox was started by an \
                             earlier run of the agent)"
                .to_owned(),
        };
        let oom = format!("memory limit {memory_mb} MiB reached");
        let description = if !oom_killed {
            status
        } else if signal == Some(libc::SIGKILL) || code == Some(128 + libc::SIGKILL) {
            format!("killed by the kernel's OOM killer: {oom}")
        } else {
            format!("{status}; the kernel's OOM killer killed a process in the sandbox: {oom}")
        };
        ExitInfo {
            code,
            signal,
            oom_killed,
            description,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions() {
        assert_eq!(
            ExitInfo::new(Some(0), None, false, 64).description,
            "exited with status 0"
        );
        assert_eq!(
            ExitInfo::new(Some(1), None, false, 64).description,
            "exited with status 1"
        );
        assert_eq!(
            ExitInfo::new(None, Some(9), false, 64).description,
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            ExitInfo::new(None, Some(15), false, 64).description,
            "killed by signal 15 (SIGTERM)"
        );
        assert_eq!(
            ExitInfo::new(None, Some(9), true, 64).description,
            "killed by the kernel's OOM killer: memory limit 64 MiB reached"
        );
        assert_eq!(
            ExitInfo::new(Some(1), None, true, 128).description,
            "exited with status 1; the kernel's OOM killer killed a process in the sandbox: \
             memory limit 128 MiB reached"
        );
        assert_eq!(
            ExitInfo::new(Some(137), None, false, 64).description,
            "exited with status 137 (128 + SIGKILL)"
        );
        assert_eq!(
            ExitInfo::new(Some(137), None, true, 64).description,
            "killed by the kernel's OOM killer: memory limit 64 MiB reached"
        );
        assert_eq!(
            ExitInfo::new(Some(255), None, false, 64).description,
            "exited with status 255"
        );
        assert!(ExitInfo::new(None, None, false, 64)
            .description
            .contains("unknown"));
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(signal_name(1000), "unknown signal");
    }
}
