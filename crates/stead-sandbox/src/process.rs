//! The `process` backend: starting, adopting, watching and stopping
//! sandboxes.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::watch;

use crate::cgroup::{CgroupLayout, CgroupPaths, CgroupVersion};
use crate::confine::{self, RealHostFs};
use crate::error::SandboxError;
use crate::exit::ExitInfo;
use crate::init::{InitConfig, InitConfine, INIT_SUBCOMMAND};
use crate::netconf::{self, NetConfig};
use crate::spec::{Backend, NetworkMode, Output, SandboxSpec};
use crate::{netns, sys};

/// How long the init may take to execute the command before we give up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a sandbox to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The `process` sandbox backend: Linux namespaces and cgroups.
///
/// Cheap to share (`Arc` it); every method takes `&self`.
#[derive(Debug)]
pub struct ProcessSandbox {
    init_exe: PathBuf,
    cgroups: CgroupLayout,
    /// Empty directory every confined sandbox mounts its new root on, each
    /// in its own mount namespace (so one serves them all).
    staging: PathBuf,
    /// Egress settings, and whether their ruleset is installed yet (on the
    /// first egress sandbox).
    net: NetConfig,
    net_installed: std::sync::Mutex<bool>,
    /// Spare sandboxes, when enabled ([`ProcessSandbox::keep_spare`]).
    spares: Option<Arc<crate::spare::SparePool>>,
}

impl Drop for ProcessSandbox {
    fn drop(&mut self) {
        // Also ends a spare whose refill task still holds the pool.
        if let Some(pool) = &self.spares {
            pool.close();
        }
    }
}

/// Where confined sandboxes build their root (see `ProcessSandbox::staging`).
pub const DEFAULT_STAGING_DIR: &str = "/run/stead-sandbox/root";

/// What an agent stores about a running sandbox so that, after a restart
/// (even a SIGKILL), it can [`ProcessSandbox::adopt`] it again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Persisted {
    pub id: String,
    /// The outer init's pid (in the agent's pid namespace).
    pub pid: u32,
    /// Its start time (clock ticks after boot, `/proc/<pid>/stat` field 22):
    /// with the pid, identifies the process across pid reuse.
    pub start_time: u64,
    pub cgroup: CgroupPaths,
    pub memory_mb: u64,
    pub network: NetworkMode,
    /// Which backend started it (records of older agents: process).
    #[serde(default)]
    pub backend: Backend,
}

/// Where [`SandboxProcess::connect`] connects.
#[derive(Debug)]
enum Netns {
    Host,
    /// `None`: the sandbox exited before its namespace could be opened.
    Isolated(Option<Arc<OwnedFd>>),
}

/// A running (or finished) sandbox.
///
/// Dropping the handle does not stop the sandbox: instances outlive agent
/// restarts. Use [`SandboxProcess::stop`] or [`SandboxProcess::kill`].
pub struct SandboxProcess {
    id: String,
    pid: u32,
    start_time: u64,
    pidfd: Arc<OwnedFd>,
    cgroup: CgroupPaths,
    memory_mb: u64,
    network: NetworkMode,
    backend: Backend,
    /// The sandbox's network namespace, for `connect`.
    netns: Netns,
    /// Egress sandboxes started by this agent: their veth's addresses.
    link: Option<netconf::Link>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    exit: watch::Receiver<Option<ExitInfo>>,
    /// Started in a spare sandbox.
    from_spare: bool,
}

impl std::fmt::Debug for SandboxProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxProcess")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("network", &self.network)
            .field("exit", &*self.exit.borrow())
            .finish_non_exhaustive()
    }
}

fn syscall_err(id: &str, call: &'static str) -> impl FnOnce(io::Error) -> SandboxError {
    let id = id.to_owned();
    move |source| SandboxError::Syscall { id, call, source }
}

fn io_err(id: &str, what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SandboxError {
    let id = id.to_owned();
    let path = path.to_owned();
    move |source| SandboxError::Io {
        id,
        what,
        path,
        source,
    }
}

/// The descriptor stdout or stderr gets; `None` for [`Output::Pipe`], whose
/// pipe the child's spawn makes.
fn open_output(
    id: &str,
    out: &Output,
    what: &'static str,
) -> Result<Option<OwnedFd>, SandboxError> {
    let path = match out {
        Output::Pipe => return Ok(None),
        Output::Null => Path::new("/dev/null"),
        Output::File(path) => path.as_path(),
    };
    let file = OpenOptions::new()
        .append(true)
        .create(matches!(out, Output::File(_)))
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(id, what, path))?;
    Ok(Some(OwnedFd::from(file)))
}

fn stdio(fd: Option<OwnedFd>) -> Stdio {
    match fd {
        Some(fd) => Stdio::from(fd),
        None => Stdio::piped(),
    }
}

/// What the child does between fork and exec. Only async-signal-safe calls:
/// the agent is multi-threaded.
pub(crate) fn child_setup(join: &[RawFd], flags: libc::c_int, keep: &[RawFd]) -> io::Result<()> {
    for fd in join {
        // Writing "0" to cgroup.procs moves the writer (v1 and v2).
        // SAFETY: write from a static buffer to an fd we own.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // Own session: no signals from the agent's terminal, and the sandbox
    // survives the agent.
    // SAFETY: plain syscalls.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::unshare(flags) != 0 {
            return Err(io::Error::last_os_error());
        }
        for fd in keep {
            if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

async fn read_status(fd: OwnedFd) -> io::Result<String> {
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
    let mut buf = Vec::new();
    rx.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).trim().to_owned())
}

/// Collects the end of a sandbox: OOM counter, leftover processes, cgroup
/// removal. Runs once per watcher, before the exit is published, so that
/// `wait()` returning means the cgroup is gone.
async fn finish(
    id: &str,
    cgroup: &CgroupPaths,
    memory_mb: u64,
    code: Option<i32>,
    signal: Option<i32>,
) -> ExitInfo {
    let oom_killed = match cgroup.oom_kills() {
        Some(n) => n > 0,
        None => signal == Some(libc::SIGKILL) && cgroup.memory_failcnt().unwrap_or(0) > 0,
    };
    cgroup.remove(id).await;
    let info = ExitInfo::new(code, signal, oom_killed, memory_mb);
    tracing::info!(sandbox = id, exit = %info.description, "sandbox exited");
    info
}

fn is_esrch(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ESRCH)
}

/// Persisted cgroup paths come from disk: before killing what they list or
/// removing them, make sure they are a sandbox's cgroup and nothing else.
fn check_persisted_cgroup(p: &Persisted) -> Result<(), SandboxError> {
    crate::spec::validate_id(&p.id).map_err(|reason| SandboxError::InvalidSpec {
        id: p.id.clone(),
        reason,
    })?;
    for dir in p.cgroup.dirs() {
        let ok = dir.starts_with("/sys/fs/cgroup")
            && dir
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && dir.file_name().and_then(|n| n.to_str()) == Some(p.id.as_str());
        if !ok {
            return Err(SandboxError::InvalidSpec {
                id: p.id.clone(),
                reason: format!("persisted cgroup {} is not a sandbox cgroup", dir.display()),
            });
        }
    }
    Ok(())
}

impl ProcessSandbox {
    /// Detects cgroup v1/v2 and prepares `<agent's cgroup>/stead`.
    /// `init_exe` is a binary that calls [`crate::init_main`] when
    /// `argv[1] == "__sandbox-init"` (usually the agent's own binary).
    pub fn new(init_exe: PathBuf) -> Result<Self, SandboxError> {
        Self::build(init_exe, None)
    }

    /// Like [`ProcessSandbox::new`], with sandbox cgroups under the given
    /// cgroup path (e.g. `/stead`, or a systemd-delegated sub-tree) instead of
    /// `<agent's own cgroup>/stead`.
    pub fn with_cgroup_parent(
        init_exe: PathBuf,
        cgroup_parent: &str,
    ) -> Result<Self, SandboxError> {
        Self::build(init_exe, Some(cgroup_parent))
    }

    fn build(init_exe: PathBuf, parent: Option<&str>) -> Result<Self, SandboxError> {
        std::fs::metadata(&init_exe).map_err(io_err(
            "-",
            "checking the sandbox init binary",
            &init_exe,
        ))?;
        let cgroups = CgroupLayout::detect(parent)?;
        let staging = PathBuf::from(DEFAULT_STAGING_DIR);
        std::fs::create_dir_all(&staging).map_err(io_err(
            "-",
            "creating the staging directory",
            &staging,
        ))?;
        Ok(ProcessSandbox {
            init_exe,
            cgroups,
            staging,
            net: NetConfig::default(),
            net_installed: std::sync::Mutex::new(false),
            spares: None,
        })
    }

    /// Keeps a spare sandbox ready (see `spare.rs`): a start that can use
    /// it skips the fork of the agent, the cgroup join (on cgroup v1 it
    /// may wait 6-15 ms for an RCU grace period) and the exec of the init.
    /// Used by instances with a network namespace of their own and output
    /// to files; a no-op on cgroup v2. The first spare is made at once when
    /// called within a tokio runtime, else at the first start.
    pub fn keep_spare(mut self) -> Self {
        if self.spares.is_none() {
            self.spares = crate::spare::SparePool::new(self.init_exe.clone(), self.cgroups.clone());
        }
        if let (Some(pool), Ok(_)) = (&self.spares, tokio::runtime::Handle::try_current()) {
            pool.schedule(Duration::ZERO);
        }
        self
    }

    /// The pid of the spare sandbox waiting now, if any (for tests and
    /// diagnostics).
    pub fn spare_pid(&self) -> Option<u32> {
        self.spares.as_ref().and_then(|p| p.waiting_pid())
    }

    /// Resolves once a spare is waiting, or after `timeout`; `false` when
    /// spares are off or none came in time.
    pub async fn spare_ready(&self, timeout: Duration) -> bool {
        let Some(pool) = &self.spares else {
            return false;
        };
        let mut rx = pool.ready();
        let ready = tokio::time::timeout(timeout, rx.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok());
        ready
    }

    /// Ends the waiting spare and makes no more (the agent stopping).
    pub fn release_spares(&self) {
        if let Some(pool) = &self.spares {
            pool.close();
        }
    }

    /// Uses `net` for egress sandboxes (pool, denied destinations) instead
    /// of [`NetConfig::default`].
    pub fn with_net_config(mut self, net: NetConfig) -> Self {
        self.net = net;
        self
    }

    pub fn net_config(&self) -> &NetConfig {
        &self.net
    }

    /// Installs the egress ruleset once per agent process (it is the same
    /// for every instance).
    fn ensure_egress_rules(&self, id: &str) -> Result<(), SandboxError> {
        let mut done = self.net_installed.lock().unwrap_or_else(|p| p.into_inner());
        if !*done {
            netconf::install(&self.net)
                .map_err(syscall_err(id, "installing the egress ruleset (nft)"))?;
            *done = true;
        }
        Ok(())
    }

    pub fn cgroup_version(&self) -> CgroupVersion {
        self.cgroups.version
    }

    pub fn init_exe(&self) -> &Path {
        &self.init_exe
    }

    /// Starts a sandbox; returns once `/bin/sh` has been executed in it (or
    /// with the setup step that failed). Takes a few milliseconds.
    pub async fn spawn(&self, spec: SandboxSpec) -> Result<SandboxProcess, SandboxError> {
        let started = Instant::now();
        spec.validate()?;
        let id = spec.id.clone();
        let memory_bytes = spec
            .memory_bytes()
            .ok_or_else(|| SandboxError::InvalidSpec {
                id: id.clone(),
                reason: "memory_mb out of range".into(),
            })?;
        if let Some(c) = &spec.confine {
            if let Some(dir) = c.data_dir.clone() {
                let (host_id, mb) = (c.host_id(&id), c.data_mb);
                let prepared =
                    tokio::task::spawn_blocking(move || crate::datadir::prepare(&dir, mb, host_id))
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .and_then(|r| r);
                if let Err(e) = prepared {
                    return Err(SandboxError::Io {
                        id: id.clone(),
                        what: "preparing the data directory",
                        path: c.data_dir.clone().unwrap_or_default(),
                        source: e,
                    });
                }
            }
        }
        let data_dir_us = started.elapsed().as_micros() as u64;
        let mut env = spec.full_env();
        let confine = spec.confine.as_ref().map(|c| {
            let host_id = c.host_id(&id);
            let path = env.get("PATH").cloned().unwrap_or_default();
            env.insert("PATH".into(), confine::sandbox_path(c, &spec.cwd, &path));
            // The app's folder is read-only: its home is the data dir.
            env.insert("HOME".into(), confine::home(c).display().to_string());
            // A tmpfs data directory is memory: it may not use more than
            // half the memory limit, or filling it would OOM-kill the app
            // rather than fail with ENOSPC.
            let mut c = c.clone();
            let half = (spec.memory_mb / 2).max(1);
            c.tmp_mb = c.tmp_mb.min(half);
            if c.data_dir.is_none() {
                c.data_mb = c.data_mb.min(half);
            }
            InitConfine {
                ops: confine::plan_root(&c, &spec.cwd, &self.staging, host_id, &RealHostFs),
                staging: self.staging.clone(),
                host_id,
                seccomp: c.seccomp,
                rlimits: c.rlimits.clone(),
            }
        });
        let net = if spec.network == NetworkMode::Egress {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(io::Error::from)
                .and_then(|(r, w)| Ok((sys::above_stdio(r)?, w)))
                .map_err(syscall_err(&id, "pipe2 (network setup)"))?;
            Some((r, w))
        } else {
            None
        };
        let config = InitConfig {
            id: id.clone(),
            hostname: spec.hostname(),
            cwd: spec.cwd.clone(),
            command: spec.command.clone(),
            env,
            loopback_up: spec.network.has_netns(),
            confine,
            net_fd: net.as_ref().map(|(r, _)| r.as_raw_fd()),
        };
        let json = serde_json::to_vec(&config)
            .map_err(io::Error::other)
            .map_err(syscall_err(&id, "serializing the init config"))?;
        let config_fd = sys::memfd_with(c"stead-sandbox-config", &json)
            .and_then(sys::above_stdio)
            .map_err(syscall_err(&id, "memfd_create (init config)"))?;
        let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(io::Error::from)
            .and_then(|(r, w)| Ok((r, sys::above_stdio(w)?)))
            .map_err(syscall_err(&id, "pipe2 (init status)"))?;
        let stdout = open_output(&id, &spec.stdout, "opening the stdout file")?;
        let stderr = open_output(&id, &spec.stderr, "opening the stderr file")?;

        let planned_us = started.elapsed().as_micros() as u64;
        let mut prepared = Prepared {
            config_fd,
            status_r,
            status_w,
            stdout,
            stderr,
            net,
        };
        let pool = self.spares.as_ref().filter(|_| {
            spec.network.has_netns() && prepared.stdout.is_some() && prepared.stderr.is_some()
        });
        if let Some(spare) = pool.and_then(|p| p.take()) {
            let pid = spare.pid;
            match self
                .start_in_spare(&spec, spare, memory_bytes, prepared)
                .await
            {
                SpareStart::Started(p) => {
                    tracing::debug!(
                        sandbox = %id,
                        pid,
                        data_dir_us,
                        planned_us,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "sandbox started (from a spare)"
                    );
                    return Ok(p);
                }
                SpareStart::Failed(e) => return Err(e),
                SpareStart::Unused(p) => prepared = p,
            }
        }
        let Prepared {
            config_fd,
            status_r,
            status_w,
            stdout,
            stderr,
            net,
        } = prepared;
        let (stdout, stderr) = (stdio(stdout), stdio(stderr));
        let cgroup = self
            .cgroups
            .create(&id, memory_bytes, spec.pids_max, spec.cpu_millis)?;
        let cgroup_us = started.elapsed().as_micros() as u64;
        let io = StartIo {
            config_fd,
            status_r,
            status_w,
            stdout,
            stderr,
            net,
        };
        match self.start(&spec, &cgroup, io).await {
            Ok(p) => {
                // The stages, in µs since the start was asked for: where a
                // cold start's time goes.
                tracing::debug!(
                    sandbox = %id,
                    pid = p.pid,
                    data_dir_us,
                    planned_us,
                    cgroup_us,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "sandbox started"
                );
                Ok(p)
            }
            Err(e) => {
                if let Err(k) = cgroup.kill_all() {
                    tracing::warn!(sandbox = %id, error = %k, "killing a sandbox that failed to start");
                }
                cgroup.remove(&id).await;
                Err(e)
            }
        }
    }

    async fn start(
        &self,
        spec: &SandboxSpec,
        cgroup: &CgroupPaths,
        io: StartIo,
    ) -> Result<SandboxProcess, SandboxError> {
        let id = spec.id.as_str();
        let join = cgroup.open_procs_for_join(id)?;
        let join_fds: Vec<RawFd> = join.iter().map(AsRawFd::as_raw_fd).collect();
        let mut keep = vec![io.config_fd.as_raw_fd(), io.status_w.as_raw_fd()];
        let (net_r, net_w) = match io.net {
            Some((r, w)) => (Some(r), Some(w)),
            None => (None, None),
        };
        if let Some(r) = &net_r {
            keep.push(r.as_raw_fd());
        }
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
        if spec.confine.is_some() {
            // After joining the cgroup (child_setup does that first): the
            // app sees its cgroup as `/`, not the host's hierarchy.
            flags |= libc::CLONE_NEWCGROUP;
        }
        if spec.network.has_netns() {
            flags |= libc::CLONE_NEWNET;
        }
        let mut cmd = tokio::process::Command::new(&self.init_exe);
        cmd.arg(INIT_SUBCOMMAND)
            .arg(keep[0].to_string())
            .arg(keep[1].to_string())
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(io.stdout)
            .stderr(io.stderr)
            .kill_on_drop(false);
        // SAFETY: child_setup only makes async-signal-safe system calls on
        // descriptors that stay open until spawn() returns.
        unsafe {
            cmd.pre_exec(move || child_setup(&join_fds, flags, &keep));
        }
        let forked = Instant::now();
        let spawned = cmd.spawn();
        // `spawn` returns once the init is executed, i.e. after the child
        // joined the sandbox's cgroups (see `child_setup`): on cgroup v1 the
        // first join after a quiet spell waits for an RCU grace period.
        tracing::debug!(
            sandbox = id,
            us = forked.elapsed().as_micros() as u64,
            "init executed (cgroups joined, namespaces unshared)"
        );
        // Close our copies: the status pipe reaches EOF only when every
        // write end is closed.
        drop(cmd);
        drop(join);
        drop(io.config_fd);
        drop(io.status_w);
        drop(net_r);
        let mut child = spawned.map_err(|source| SandboxError::Spawn {
            id: id.to_owned(),
            init_exe: self.init_exe.clone(),
            source,
        })?;
        let finished = match child.id() {
            Some(pid) => self.finish_start(spec, pid, None, io.status_r, net_w).await,
            None => Err(SandboxError::Setup {
                id: id.to_owned(),
                message: "the sandbox init exited before it could be watched".into(),
            }),
        };
        match finished {
            Ok((pid, pidfd, start_time, netns, link)) => {
                let stdout = child.stdout.take();
                let stderr = child.stderr.take();
                let exit = watch_child(id, cgroup.clone(), spec.memory_mb, child);
                Ok(SandboxProcess {
                    id: id.to_owned(),
                    pid,
                    start_time,
                    pidfd: Arc::new(pidfd),
                    cgroup: cgroup.clone(),
                    memory_mb: spec.memory_mb,
                    network: spec.network,
                    backend: spec.backend,
                    netns,
                    link,
                    stdout,
                    stderr,
                    exit,
                    from_spare: false,
                })
            }
            Err(e) => {
                let _ = cgroup.kill_all();
                let _ = child.start_kill();
                if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                    tracing::error!(sandbox = %id, "the sandbox init did not die after SIGKILL");
                }
                Err(e)
            }
        }
    }

    /// Waits for the init of `pid` to execute the command (after giving an
    /// egress sandbox its network). `opened`: the pidfd and network
    /// namespace when the caller has them already (a spare).
    async fn finish_start(
        &self,
        spec: &SandboxSpec,
        pid: u32,
        opened: Option<(OwnedFd, Netns)>,
        status_r: OwnedFd,
        net_w: Option<OwnedFd>,
    ) -> Result<(u32, OwnedFd, u64, Netns, Option<netconf::Link>), SandboxError> {
        let id = spec.id.as_str();
        let mut egress = None;
        if let Some(net_w) = net_w {
            // The init waits for eth0's addresses before it goes on: the
            // app starts with its network up.
            self.ensure_egress_rules(id)?;
            let cfg = self.net.clone();
            let link = tokio::task::spawn_blocking(move || netconf::create_link(&cfg, pid))
                .await
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|r| r)
                .map_err(syscall_err(id, "creating the instance's veth pair (ip)"))?;
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&link.inside.octets());
            msg[4..].copy_from_slice(&link.host.octets());
            std::io::Write::write_all(&mut File::from(net_w), &msg)
                .map_err(syscall_err(id, "sending the network to the init"))?;
            tracing::debug!(sandbox = id, slot = link.slot, inside = %link.inside, "egress link up");
            egress = Some(link);
        }
        let (pidfd, netns) = match opened {
            Some(o) => o,
            None => {
                // Our child is not reaped until we wait for it, so this is
                // the right process.
                let pidfd = sys::pidfd_open(pid).map_err(syscall_err(id, "pidfd_open"))?;
                // Open the namespace now, before a quick command can have
                // come and gone (a zombie has no namespaces left to open).
                let netns = match spec.network {
                    NetworkMode::Host => Netns::Host,
                    NetworkMode::Isolated | NetworkMode::Egress => {
                        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
                        match File::open(&path) {
                            Ok(f) => Netns::Isolated(Some(Arc::new(OwnedFd::from(f)))),
                            Err(e) if e.kind() == io::ErrorKind::NotFound => Netns::Isolated(None),
                            Err(e) => return Err(io_err(id, "opening", &path)(e)),
                        }
                    }
                };
                (pidfd, netns)
            }
        };
        let message = match tokio::time::timeout(START_TIMEOUT, read_status(status_r)).await {
            Ok(r) => r.map_err(syscall_err(id, "reading the init's status pipe"))?,
            Err(_) => {
                return Err(SandboxError::StartTimeout {
                    id: id.to_owned(),
                    after: START_TIMEOUT,
                })
            }
        };
        if !message.is_empty() {
            return Err(SandboxError::Setup {
                id: id.to_owned(),
                message,
            });
        }
        let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
        let start_time = sys::read_stat(pid)
            .map_err(io_err(id, "reading", &stat_path))?
            .start_time;
        Ok((pid, pidfd, start_time, netns, egress))
    }

    /// Re-attaches to a sandbox started by an earlier run of the agent (which
    /// may have been SIGKILLed). `Ok(None)` when it is gone (its cgroup, if
    /// left behind, is then removed). Its exit status cannot be known (it is
    /// not our child): `wait()` reports `code` and `signal` as `None`, but
    /// OOM kills are still detected. Must be called within a tokio runtime.
    pub fn adopt(&self, persisted: &Persisted) -> Result<Option<SandboxProcess>, SandboxError> {
        let id = persisted.id.as_str();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(SandboxError::NoRuntime {
                what: "ProcessSandbox::adopt",
            });
        }
        check_persisted_cgroup(persisted)?;
        let gone = || {
            tracing::info!(
                sandbox = id,
                pid = persisted.pid,
                "sandbox to adopt is gone"
            );
            // Never kill here: only an empty cgroup is removed.
            persisted.cgroup.remove_if_empty(id);
            Ok(None)
        };
        // Open the pidfd first: it pins the process that has this pid now,
        // and everything below is checked against it.
        let pidfd = match sys::pidfd_open(persisted.pid) {
            Ok(fd) => fd,
            Err(e) if is_esrch(&e) => return gone(),
            Err(e) => return Err(syscall_err(id, "pidfd_open")(e)),
        };
        let stat_path = PathBuf::from(format!("/proc/{}/stat", persisted.pid));
        match sys::read_stat(persisted.pid) {
            Ok(st) if !st.is_dead() && st.start_time == persisted.start_time => {}
            Ok(_) => return gone(),
            Err(e) if e.kind() == io::ErrorKind::NotFound || is_esrch(&e) => return gone(),
            Err(e) => return Err(io_err(id, "reading", &stat_path)(e)),
        }
        let netns = match persisted.network {
            NetworkMode::Host => Netns::Host,
            NetworkMode::Isolated | NetworkMode::Egress => {
                let path = PathBuf::from(format!("/proc/{}/ns/net", persisted.pid));
                match File::open(&path) {
                    Ok(f) => Netns::Isolated(Some(Arc::new(OwnedFd::from(f)))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return gone(),
                    Err(e) => return Err(io_err(id, "opening", &path)(e)),
                }
            }
        };
        // Still alive now => the stat and namespace we read were its own.
        if sys::pidfd_exited(&pidfd) {
            return gone();
        }
        let watch_fd = pidfd.try_clone().map_err(syscall_err(id, "dup (pidfd)"))?;
        // SAFETY: the AsyncFd owns watch_fd, an open pidfd that stays open
        // (and the same) for the AsyncFd's whole life.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(watch_fd, Interest::READABLE)
        }
        .map_err(io::Error::from)
        .map_err(syscall_err(id, "registering the pidfd with tokio"))?;
        let (tx, exit) = watch::channel(None);
        let (wid, wcg, mb) = (id.to_owned(), persisted.cgroup.clone(), persisted.memory_mb);
        tokio::spawn(async move {
            loop {
                match afd.readable().await {
                    Ok(mut guard) => {
                        if sys::pidfd_exited(guard.get_inner()) {
                            break;
                        }
                        guard.clear_ready();
                    }
                    Err(e) => {
                        tracing::error!(sandbox = %wid, error = %e, "polling the sandbox's pidfd");
                        break;
                    }
                }
            }
            let info = finish(&wid, &wcg, mb, None, None).await;
            tx.send_replace(Some(info));
        });
        tracing::info!(sandbox = id, pid = persisted.pid, "adopted sandbox");
        Ok(Some(SandboxProcess {
            id: id.to_owned(),
            pid: persisted.pid,
            start_time: persisted.start_time,
            pidfd: Arc::new(pidfd),
            cgroup: persisted.cgroup.clone(),
            memory_mb: persisted.memory_mb,
            network: persisted.network,
            backend: persisted.backend,
            netns,
            link: None,
            stdout: None,
            stderr: None,
            exit,
            from_spare: false,
        }))
    }

    /// Starts `spec` in `spare`. `Unused`: the spare could not be used and
    /// nothing was sent to it (it is discarded; the caller starts
    /// directly with what it prepared).
    async fn start_in_spare(
        &self,
        spec: &SandboxSpec,
        mut spare: crate::spare::Spare,
        memory_bytes: u64,
        prepared: Prepared,
    ) -> SpareStart {
        let id = spec.id.as_str();
        if prepared.stdout.is_none() || prepared.stderr.is_none() {
            // Pipes are made by a direct spawn (builds use them).
            spare.discard();
            return SpareStart::Unused(prepared);
        }
        let target = self.cgroups.paths_for(id);
        if let Err(e) = spare.cgroup.rename_to(id, &target) {
            tracing::warn!(sandbox = id, spare = %spare.name, error = %e, "cannot use the spare sandbox; starting directly");
            spare.discard();
            return SpareStart::Unused(prepared);
        }
        // Its cgroups are the sandbox's from here on.
        spare.cgroup = target.clone();
        spare.name = id.to_owned();
        let cpu = self.cgroups.cpu_millis(spec.cpu_millis);
        // The limits come before the start is sent: nothing of the app
        // runs unlimited.
        if let Err(e) = target.set_limits(id, memory_bytes, spec.pids_max, cpu) {
            spare.discard();
            return SpareStart::Failed(e);
        }
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID;
        if spec.confine.is_some() {
            flags |= libc::CLONE_NEWCGROUP;
        }
        let fds: Vec<RawFd> = [Some(&prepared.config_fd), Some(&prepared.status_w)]
            .into_iter()
            .chain([prepared.stdout.as_ref(), prepared.stderr.as_ref()])
            .chain([prepared.net.as_ref().map(|(r, _)| r)])
            .flatten()
            .map(AsRawFd::as_raw_fd)
            .collect();
        if let Err(e) = spare.send_start(flags, &fds) {
            tracing::warn!(sandbox = id, pid = spare.pid, error = %e, "the spare sandbox did not take the start; starting directly");
            spare.discard();
            return SpareStart::Unused(prepared);
        }
        // Our copies closed: the status pipe reaches end-of-file once the
        // command is executed.
        let Prepared {
            config_fd,
            status_r,
            status_w,
            stdout,
            stderr,
            net,
        } = prepared;
        drop((config_fd, status_w, stdout, stderr));
        let net_w = net.map(|(r, w)| {
            drop(r);
            w
        });
        let crate::spare::Spare {
            child,
            pid,
            pidfd,
            control,
            netns,
            ..
        } = spare;
        drop(control);
        let netns = Netns::Isolated(Some(Arc::new(netns)));
        match self
            .finish_start(spec, pid, Some((pidfd, netns)), status_r, net_w)
            .await
        {
            Ok((pid, pidfd, start_time, netns, link)) => {
                let exit = watch_child(id, target.clone(), spec.memory_mb, child);
                SpareStart::Started(SandboxProcess {
                    id: id.to_owned(),
                    pid,
                    start_time,
                    pidfd: Arc::new(pidfd),
                    cgroup: target,
                    memory_mb: spec.memory_mb,
                    network: spec.network,
                    backend: spec.backend,
                    netns,
                    link,
                    stdout: None,
                    stderr: None,
                    exit,
                    from_spare: true,
                })
            }
            Err(e) => {
                let mut child = child;
                let _ = target.kill_all();
                let _ = child.start_kill();
                if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                    tracing::error!(sandbox = %id, "the sandbox init did not die after SIGKILL");
                }
                target.remove(id).await;
                SpareStart::Failed(e)
            }
        }
    }
}

/// What `spawn` prepares before choosing between a spare and a direct
/// start.
struct Prepared {
    config_fd: OwnedFd,
    status_r: OwnedFd,
    status_w: OwnedFd,
    /// `None`: [`Output::Pipe`].
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    net: Option<(OwnedFd, OwnedFd)>,
}

enum SpareStart {
    Started(SandboxProcess),
    /// Not used, nothing sent: start directly with these.
    Unused(Prepared),
    Failed(SandboxError),
}

/// The task that waits for the sandbox's init (our child) and publishes its
/// exit once its cgroup is removed.
fn watch_child(
    id: &str,
    cgroup: CgroupPaths,
    memory_mb: u64,
    mut child: Child,
) -> watch::Receiver<Option<ExitInfo>> {
    let (tx, exit) = watch::channel(None);
    let wid = id.to_owned();
    tokio::spawn(async move {
        let (code, signal) = match child.wait().await {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                (status.code(), status.signal())
            }
            Err(e) => {
                tracing::error!(sandbox = %wid, error = %e, "waiting for the sandbox");
                (None, None)
            }
        };
        let info = finish(&wid, &cgroup, memory_mb, code, signal).await;
        tx.send_replace(Some(info));
    });
    exit
}

/// The descriptors `spawn` prepares for `start`.
struct StartIo {
    config_fd: OwnedFd,
    status_r: OwnedFd,
    status_w: OwnedFd,
    stdout: Stdio,
    stderr: Stdio,
    /// Egress: the pipe on which the init gets eth0's addresses.
    net: Option<(OwnedFd, OwnedFd)>,
}

impl SandboxProcess {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The outer init's pid, in the agent's pid namespace.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn cgroup(&self) -> &CgroupPaths {
        &self.cgroup
    }

    /// The veth pair of an egress sandbox this agent started (`None` for
    /// others, and after adoption).
    pub fn egress_link(&self) -> Option<netconf::Link> {
        self.link
    }

    /// The backend running it.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether it was started in a spare sandbox (see
    /// [`ProcessSandbox::keep_spare`]).
    pub fn started_from_spare(&self) -> bool {
        self.from_spare
    }

    /// What to store to [`ProcessSandbox::adopt`] this sandbox after an
    /// agent restart.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            id: self.id.clone(),
            pid: self.pid,
            start_time: self.start_time,
            cgroup: self.cgroup.clone(),
            memory_mb: self.memory_mb,
            network: self.network,
            backend: self.backend,
        }
    }

    /// The read end of stdout, for [`Output::Pipe`] (once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.stdout.take()
    }

    /// The read end of stderr, for [`Output::Pipe`] (once).
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.stderr.take()
    }

    /// Resolves when the sandbox has exited (and its cgroup is removed).
    /// Any number of tasks may wait at once.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        let result = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match result {
            Ok(Some(info)) => info,
            // The watcher task is gone without a verdict (runtime shutdown).
            _ => ExitInfo {
                code: None,
                signal: None,
                oom_killed: false,
                description: "unknown: the task watching the sandbox stopped".into(),
            },
        }
    }

    /// The exit, if it already happened.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// A receiver that holds `Some` once the sandbox has exited: for
    /// `select!`-style code.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    fn signal(&self, signal: i32, name: &'static str) -> Result<(), SandboxError> {
        match sys::pidfd_send_signal(&self.pidfd, signal) {
            Ok(()) => Ok(()),
            // Already gone: nothing to signal.
            Err(e) if is_esrch(&e) => Ok(()),
            Err(source) => Err(SandboxError::Signal {
                id: self.id.clone(),
                pid: self.pid,
                signal: name,
                source,
            }),
        }
    }

    /// Asks the command to stop: SIGTERM to the outer init, which forwards
    /// it through pid 1 to the command's process group.
    pub fn terminate(&self) -> Result<(), SandboxError> {
        self.signal(libc::SIGTERM, "SIGTERM")
    }

    /// SIGKILLs every process in the sandbox (all pids of its cgroup), then
    /// the outer init.
    pub fn kill(&self) -> Result<(), SandboxError> {
        self.cgroup.kill_all().map_err(syscall_err(
            &self.id,
            "killing the processes of the sandbox's cgroup",
        ))?;
        self.signal(libc::SIGKILL, "SIGKILL")
    }

    /// Stops the sandbox the polite way: SIGTERM, up to `grace` to exit,
    /// then SIGKILL. Returns how it ended; its cgroup is removed by then.
    pub async fn stop(&self, grace: Duration) -> ExitInfo {
        if let Some(info) = self.exit_info() {
            return info;
        }
        if let Err(e) = self.terminate() {
            tracing::warn!(sandbox = %self.id, error = %e, "terminating");
        }
        if let Ok(info) = tokio::time::timeout(grace, self.wait()).await {
            return info;
        }
        tracing::info!(sandbox = %self.id, ?grace, "still running after the grace period: killing");
        if let Err(e) = self.kill() {
            tracing::warn!(sandbox = %self.id, error = %e, "killing");
        }
        match tokio::time::timeout(KILL_WAIT, self.wait()).await {
            Ok(info) => info,
            Err(_) => {
                tracing::error!(sandbox = %self.id, "still running after SIGKILL");
                self.cgroup.remove(&self.id).await;
                ExitInfo {
                    code: None,
                    signal: None,
                    oom_killed: false,
                    description: format!("still running {KILL_WAIT:?} after SIGKILL"),
                }
            }
        }
    }

    /// A TCP connection to 127.0.0.1:`port` inside the sandbox's network
    /// namespace (for [`NetworkMode::Host`], the host's 127.0.0.1), usable
    /// from tokio like any other.
    pub async fn connect(&self, port: u16) -> io::Result<TcpStream> {
        match &self.netns {
            Netns::Isolated(Some(ns)) => netns::connect_inside(ns, port).await,
            Netns::Isolated(None) => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "sandbox {} exited before its network namespace could be opened",
                    self.id
                ),
            )),
            Netns::Host => TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await,
        }
    }

    /// A listener bound to 127.0.0.1:`port` inside the sandbox's network
    /// namespace, accepted from the host: how the agent exposes a service
    /// the app may use (its own database) at a loopback address inside the
    /// sandbox, without giving the sandbox any route to the host. For
    /// [`NetworkMode::Host`] it binds the host's 127.0.0.1:`port`.
    pub async fn listen(&self, port: u16) -> io::Result<TcpListener> {
        match &self.netns {
            Netns::Isolated(Some(ns)) => netns::listen_inside(ns, port).await,
            Netns::Isolated(None) => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "sandbox {} exited before its network namespace could be opened",
                    self.id
                ),
            )),
            Netns::Host => TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await,
        }
    }

    /// Memory currently charged to the sandbox's cgroup.
    pub fn memory_usage_bytes(&self) -> Option<u64> {
        self.cgroup.memory_usage()
    }

    /// CPU time the sandbox has used so far, in microseconds (the agent
    /// turns the difference between two readings into cores for the
    /// autoscaler). cgroup v2: the cgroup's `cpu.stat`. v1, where sandboxes
    /// get no cpuacct group: the user and system time of the processes in
    /// the memory cgroup, including children they reaped.
    pub fn cpu_usage_usec(&self) -> Option<u64> {
        let dir = &self.cgroup.memory;
        if self.cgroup.version == CgroupVersion::V2 {
            let text = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
            return crate::cgroup::keyed_value(&text, "usage_usec");
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
        // SAFETY: sysconf only reads a constant of the C library.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .ok()
            .filter(|h| *h > 0)
            .unwrap_or(100);
        let mut ticks = 0u64;
        for pid in procs.split_whitespace() {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the `(comm)`: state is 3rd, utime..cstime 14th..17th.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            ticks += rest
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum::<u64>();
        }
        Some(ticks.saturating_mul(1_000_000) / hz)
    }
}
