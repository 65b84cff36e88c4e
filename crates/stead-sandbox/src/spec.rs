//! What to run in a sandbox, and how.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::confine::Confinement;
use crate::error::SandboxError;

/// PATH given to the command when the spec's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// A pids limit that no reasonable app reaches but that stops a fork bomb.
pub const DEFAULT_PIDS_MAX: u64 = 4096;
/// Memory limit of [`SandboxSpec::new`].
pub const DEFAULT_MEMORY_MB: u64 = 512;
/// Longest hostname the kernel accepts (HOST_NAME_MAX).
pub const MAX_HOSTNAME_LEN: usize = 64;
/// Longest sandbox id: ids name cgroup directories and must stay well below
/// NAME_MAX.
pub const MAX_ID_LEN: usize = 128;
/// Processes the sandbox's own init uses (outer init and pid 1), counted
/// against `pids_max` like the command's.
pub const INIT_PROCESSES: u64 = 2;

/// Where a sandboxed command's stdout or stderr goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Appended to this file (opened `O_APPEND|O_CREAT` by the agent and given
    /// to the process directly, so that logging goes on while the agent
    /// restarts). The directory must exist.
    File(PathBuf),
    /// A pipe whose read end the agent gets
    /// ([`crate::SandboxProcess::take_stdout`]). Dies with the agent: use it
    /// for builds, not for instances that must outlive an agent restart.
    Pipe,
    /// `/dev/null`.
    Null,
}

/// The sandbox's network.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A new network namespace with only `lo`, brought up: the app can serve
    /// on 127.0.0.1 and the agent reaches it with
    /// [`crate::SandboxProcess::connect`]; nothing else is reachable.
    Isolated,
    /// The host's network: for builds that download packages.
    Host,
    /// Like `Isolated`, plus a veth pair to the host through which the app
    /// reaches the outside world, and only that (see
    /// [`crate::netconf`]): for apps whose config asks for egress.
    Egress,
}

impl NetworkMode {
    /// A network namespace of its own (all but `Host`).
    pub fn has_netns(self) -> bool {
        self != NetworkMode::Host
    }
}

/// Which sandbox backend runs an instance.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Linux namespaces, cgroups, seccomp: starts in milliseconds.
    #[default]
    Process,
    /// gVisor's `runsc` (a user-space kernel): every system call of the app
    /// is served by gVisor, not by the host's kernel.
    Gvisor,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Process => "process",
            Backend::Gvisor => "gvisor",
        }
    }

    /// Parses `process` or `gvisor`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "process" => Some(Backend::Process),
            "gvisor" => Some(Backend::Gvisor),
            _ => None,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything needed to start a sandbox. Construct with [`SandboxSpec::new`]
/// and struct-update syntax (`SandboxSpec { memory_mb: 256,
/// ..SandboxSpec::new(id, cwd, cmd) }`) so that code keeps compiling as the
/// spec grows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Instance or build id. Names the cgroup (`.../stead/<id>`) and the
    /// hostname (truncated to 64 bytes). ASCII letters, digits, `-`, `_`
    /// and `.`, not starting with `.`, at most 128 bytes.
    pub id: String,
    /// Absolute working directory of the command.
    pub cwd: PathBuf,
    /// Run as `/bin/sh -c <command>`.
    pub command: String,
    /// The command's whole environment (nothing is inherited from the
    /// agent). PATH defaults to [`DEFAULT_PATH`] if absent.
    pub env: BTreeMap<String, String>,
    /// Memory limit in MiB (swap disabled where the kernel accounts it).
    pub memory_mb: u64,
    /// Maximum number of processes (and threads) in the sandbox, the two
    /// init processes included.
    pub pids_max: u64,
    pub stdout: Output,
    pub stderr: Output,
    pub network: NetworkMode,
    /// CPU quota in thousandths of a CPU (1000 = one CPU's worth of time
    /// per period); `None`: unlimited.
    pub cpu_millis: Option<u64>,
    /// The root filesystem, user and system calls the command is confined
    /// to; `None`: the host's root filesystem and the agent's user (builds).
    pub confine: Option<Confinement>,
    pub backend: Backend,
}

impl SandboxSpec {
    /// A spec with defaults: 512 MiB, 4096 pids, no output, isolated network,
    /// empty environment.
    pub fn new(id: impl Into<String>, cwd: impl Into<PathBuf>, command: impl Into<String>) -> Self {
        SandboxSpec {
            id: id.into(),
            cwd: cwd.into(),
            command: command.into(),
            env: BTreeMap::new(),
            memory_mb: DEFAULT_MEMORY_MB,
            pids_max: DEFAULT_PIDS_MAX,
            stdout: Output::Null,
            stderr: Output::Null,
            network: NetworkMode::Isolated,
            cpu_millis: None,
            confine: None,
            backend: Backend::Process,
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> SandboxError {
        SandboxError::InvalidSpec {
            id: self.id.clone(),
            reason: reason.into(),
        }
    }

    /// Checks everything that would otherwise fail later, inside the sandbox,
    /// with a less helpful message.
    pub fn validate(&self) -> Result<(), SandboxError> {
        validate_id(&self.id).map_err(|r| self.invalid(r))?;
        if !self.cwd.is_absolute() {
            return Err(self.invalid(format!("cwd {} is not absolute", self.cwd.display())));
        }
        if self.command.trim().is_empty() {
            return Err(self.invalid("the command is empty"));
        }
        if self.command.contains('\0') {
            return Err(self.invalid("the command contains a NUL byte"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(self.invalid(format!("invalid environment variable name {k:?}")));
            }
            if v.contains('\0') {
                return Err(self.invalid(format!("environment variable {k} contains a NUL byte")));
            }
        }
        if self.memory_mb == 0 || self.memory_bytes().is_none() {
            return Err(self.invalid(format!("memory_mb {} is out of range", self.memory_mb)));
        }
        if self.pids_max <= INIT_PROCESSES {
            return Err(self.invalid(format!(
                "pids_max {} leaves no room for the command (the sandbox's init uses {INIT_PROCESSES})",
                self.pids_max
            )));
        }
        if self.cpu_millis == Some(0) {
            return Err(self.invalid("cpu_millis 0 would never let the command run"));
        }
        if self.confine.is_some() && self.cwd.parent().is_none() {
            // The cwd (the app's folder) is bound into a confined sandbox:
            // `/` would be the host's whole tree.
            return Err(self.invalid("a confined sandbox's cwd (its app folder) cannot be /"));
        }
        if self.confine.is_some() && self.network == NetworkMode::Host {
            return Err(self.invalid("a confined sandbox cannot share the host's network"));
        }
        for (name, out) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if let Output::File(p) = out {
                if !p.is_absolute() {
                    return Err(
                        self.invalid(format!("{name} file {} is not absolute", p.display()))
                    );
                }
            }
        }
        Ok(())
    }

    /// The memory limit in bytes (None on overflow).
    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory_mb.checked_mul(1024 * 1024)
    }

    /// The hostname the sandbox gets: its id, cut to 64 bytes.
    pub fn hostname(&self) -> String {
        truncate_bytes(&self.id, MAX_HOSTNAME_LEN).to_owned()
    }

    /// The command's environment: the spec's, plus PATH if it has none.
    pub fn full_env(&self) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        env
    }
}

/// Longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Sandbox ids become directory names: keep them boring.
pub(crate) fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the id is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("the id is longer than {MAX_ID_LEN} bytes"));
    }
    if id.starts_with('.') {
        return Err(format!("the id {id:?} starts with '.'"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "the id {id:?} contains {c:?} (allowed: ASCII letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("inst-01HXYZ_a.b").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id(".").is_err());
        assert!(validate_id("..").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id("a b").is_err());
        assert!(validate_id(&"x".repeat(129)).is_err());
        assert!(validate_id(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn hostname_is_truncated() {
        let s = SandboxSpec::new("a".repeat(100), "/", "true");
        assert_eq!(s.hostname().len(), 64);
        assert_eq!(SandboxSpec::new("short", "/", "true").hostname(), "short");
        assert_eq!(truncate_bytes("ééé", 3), "é");
    }

    #[test]
    fn env_defaults_path() {
        let mut s = SandboxSpec::new("a", "/", "true");
        assert_eq!(
            s.full_env().get("PATH").map(String::as_str),
            Some(DEFAULT_PATH)
        );
        s.env.insert("PATH".into(), "/x".into());
        assert_eq!(s.full_env().get("PATH").map(String::as_str), Some("/x"));
    }

    #[test]
    fn validation() {
        let ok = SandboxSpec::new("a", "/tmp", "true");
        assert!(ok.validate().is_ok());
        let bad = |f: &dyn Fn(&mut SandboxSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            s.validate().is_err()
        };
        assert!(bad(&|s| s.cwd = "rel".into()));
        assert!(bad(&|s| s.command = "  ".into()));
        assert!(bad(&|s| s.command = "a\0".into()));
        assert!(bad(&|s| {
            s.env.insert("A=B".into(), "x".into());
        }));
        assert!(bad(&|s| {
            s.env.insert("A".into(), "x\0".into());
        }));
        assert!(bad(&|s| s.memory_mb = 0));
        assert!(bad(&|s| s.memory_mb = u64::MAX));
        assert!(bad(&|s| s.pids_max = 2));
        assert!(bad(&|s| s.stdout = Output::File("out.log".into())));
        assert!(bad(&|s| {
            s.cwd = "/".into();
            s.confine = Some(Confinement::default());
        }));
        let e = SandboxSpec::new("a/b", "/", "true")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("a/b"), "{e}");
    }
}
