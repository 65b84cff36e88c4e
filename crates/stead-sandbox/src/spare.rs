//! Spare sandboxes: the slow, app-independent part of a process-backend
//! start done ahead of time, off any request's path.
//!
//! On cgroup v1 the first write of a pid into a cgroup after a quiet spell
//! waits for an RCU grace period (6-15 ms on the project's host), and
//! forking the agent, a large multi-threaded process, and executing the
//! init cost 1-3 ms more. A spare is an init that has done all of that for
//! no sandbox in particular: forked by the agent, moved into cgroups of its
//! own (named `_spare-<agent pid>-<n>`, with no limits yet), in fresh uts,
//! ipc and network namespaces (empty: `lo` is down, the hostname is the
//! host's), executed and waiting on a socket. A start takes it out of the
//! pool, renames its cgroups to the sandbox's id (v1 allows a rename within
//! a parent), sets the sandbox's limits and sends it the start: from there
//! on it is exactly the init a direct start would have executed, creating
//! the remaining namespaces (mount, pid, cgroup) at that moment.
//!
//! What a spare could carry from one sandbox to another: nothing, because
//! a spare is used once (it closes its socket when it reads the start) and
//! nothing of an app reaches it before it is used; its namespaces and
//! cgroups are made for it alone. A spare that dies while waiting is
//! discarded and the start takes the direct path; the agent dying closes
//! the socket, which ends the spare. cgroup v2 cannot rename cgroups, so
//! there are no spares there (`clone3(CLONE_INTO_CGROUP)` would be the way).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::watch;

use crate::cgroup::{CgroupLayout, CgroupPaths, CgroupVersion};
use crate::error::SandboxError;
use crate::init::{SPARE_ARG, SPARE_FDS_MAX, SPARE_FDS_MIN};
use crate::sys;

/// Prefix of spares' cgroup names: no sandbox id starts with it (app names,
/// and so instance ids, begin with a letter; builds' ids too).
pub(crate) const SPARE_PREFIX: &str = "_spare-";

/// How long after a spare was taken the next one is made: long enough that
/// making it (a fork of the agent, a cgroup join that may wait for a grace
/// period while holding the kernel's cgroup mutex) does not compete with the
/// start that used the last one, which is still executing its app.
pub(crate) const REFILL_DELAY: Duration = Duration::from_millis(300);

/// After this many spares in a row died before being used, no more are
/// made (something is wrong with the init binary or the host).
const MAX_FAILURES: u32 = 3;

/// Spares made by this process so far: unique names across its pools (one
/// per backend).
static MADE: AtomicU64 = AtomicU64::new(0);

/// One spare: see the module's documentation.
pub(crate) struct Spare {
    pub(crate) name: String,
    pub(crate) cgroup: CgroupPaths,
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    /// The agent's end of the control socket.
    pub(crate) control: OwnedFd,
    /// Its network namespace, opened while it waits.
    pub(crate) netns: OwnedFd,
}

impl Spare {
    /// Makes a spare now (a few ms; blocking system calls, and the cgroup
    /// join may wait for a grace period). Must be called within a tokio
    /// runtime (the child is reaped by it).
    fn make(init_exe: &Path, layout: &CgroupLayout, name: String) -> Result<Spare, SandboxError> {
        let id = name.as_str();
        let syscall = |call: &'static str| {
            let id = id.to_owned();
            move |source| SandboxError::Syscall { id, call, source }
        };
        let cgroup = layout.create_bare(id)?;
        let made = (|| {
            let (ours, theirs) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::SeqPacket,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(std::io::Error::from)
            .map_err(syscall("socketpair (spare control)"))?;
            let theirs = sys::above_stdio(theirs).map_err(syscall("dup (spare control)"))?;
            let join = cgroup.open_procs_for_join(id)?;
            let join_fds: Vec<RawFd> = join.iter().map(AsRawFd::as_raw_fd).collect();
            let keep = [theirs.as_raw_fd()];
            let flags = libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;
            let mut cmd = tokio::process::Command::new(init_exe);
            cmd.arg(crate::init::INIT_SUBCOMMAND)
                .arg(SPARE_ARG)
                .arg(keep[0].to_string())
                .env_clear()
                .current_dir("/")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(false);
            // SAFETY: child_setup only makes async-signal-safe system calls
            // on descriptors that stay open until spawn() returns.
            unsafe {
                cmd.pre_exec(move || crate::process::child_setup(&join_fds, flags, &keep));
            }
            let child = cmd.spawn().map_err(|source| SandboxError::Spawn {
                id: id.to_owned(),
                init_exe: init_exe.to_owned(),
                source,
            })?;
            drop((theirs, join));
            let pid = child.id().ok_or_else(|| SandboxError::Setup {
                id: id.to_owned(),
                message: "the spare exited at once".into(),
            })?;
            let pidfd = sys::pidfd_open(pid).map_err(syscall("pidfd_open (spare)"))?;
            let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
                .map_err(syscall("opening the spare's network namespace"))?;
            Ok(Spare {
                name: name.clone(),
                cgroup: cgroup.clone(),
                child,
                pid,
                pidfd,
                control: ours,
                netns: OwnedFd::from(netns),
            })
        })();
        if made.is_err() {
            let _ = cgroup.kill_all();
            cgroup.remove_if_empty(id);
        }
        made
    }

    /// Still waiting (not dead)?
    pub(crate) fn alive(&self) -> bool {
        !sys::pidfd_exited(&self.pidfd)
    }

    /// Sends the start: the namespaces still to create, and the
    /// descriptors (config, status, stdout, stderr, and the network pipe
    /// for egress). Only then is the spare committed to this sandbox.
    pub(crate) fn send_start(&self, flags: libc::c_int, fds: &[RawFd]) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        if !(SPARE_FDS_MIN..=SPARE_FDS_MAX).contains(&fds.len()) {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let bytes = flags.to_le_bytes();
        let iov = [std::io::IoSlice::new(&bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        loop {
            match sendmsg::<()>(
                self.control.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(4) => return Ok(()),
                Ok(_) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Ends an unused spare: kill, wait (bounded) for it to exit, remove
    /// its cgroups. Synchronous, so that it can run on drop.
    pub(crate) fn discard(mut self) {
        let _ = sys::pidfd_send_signal(&self.pidfd, libc::SIGKILL);
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd, at most one second.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        // Reap it if it is ours to reap now; else tokio's reaper will.
        let _ = self.child.try_wait();
        self.cgroup.remove_if_empty(&self.name);
    }
}

/// The spares of one process backend (one at a time), and how they are
/// made again after use.
pub(crate) struct SparePool {
    init_exe: PathBuf,
    layout: CgroupLayout,
    state: Mutex<PoolState>,
    /// How many spares are ready: what a test (or a metric) waits on.
    ready: watch::Sender<usize>,
}

#[derive(Default)]
struct PoolState {
    spare: Option<Spare>,
    /// A spare is being made (or scheduled): do not schedule another.
    filling: bool,
    failures: u32,
    closed: bool,
}

impl SparePool {
    /// A pool, or `None` where spares cannot work (cgroup v2: no rename).
    pub(crate) fn new(init_exe: PathBuf, layout: CgroupLayout) -> Option<Arc<SparePool>> {
        if layout.version != CgroupVersion::V1 {
            tracing::info!(
                "cgroup v2: no spare sandboxes (cgroups cannot be renamed there); starts join their cgroup directly"
            );
            return None;
        }
        Some(Arc::new(SparePool {
            init_exe,
            layout,
            state: Mutex::new(PoolState::default()),
            ready: watch::channel(0).0,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of the number of ready spares.
    pub(crate) fn ready(&self) -> watch::Receiver<usize> {
        self.ready.subscribe()
    }

    /// The pid of the spare waiting now, if any.
    pub(crate) fn waiting_pid(&self) -> Option<u32> {
        self.lock().spare.as_ref().map(|s| s.pid)
    }

    /// Takes the waiting spare, if it is alive, and schedules the next.
    pub(crate) fn take(self: &Arc<Self>) -> Option<Spare> {
        let taken = {
            let mut st = self.lock();
            let s = st.spare.take();
            self.ready.send_replace(0);
            s
        };
        let spare = match taken {
            Some(s) if s.alive() => {
                self.lock().failures = 0;
                Some(s)
            }
            Some(s) => {
                tracing::warn!(spare = %s.name, pid = s.pid, "a spare sandbox died while waiting; starting directly");
                self.lock().failures += 1;
                s.discard();
                None
            }
            None => None,
        };
        self.schedule(REFILL_DELAY);
        spare
    }

    /// Makes a spare after `delay`, unless one is ready or being made.
    pub(crate) fn schedule(self: &Arc<Self>, delay: Duration) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        {
            let mut st = self.lock();
            if st.closed || st.filling || st.spare.is_some() || st.failures >= MAX_FAILURES {
                return;
            }
            st.filling = true;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            pool.clean_stale();
            let n = MADE.fetch_add(1, Ordering::Relaxed);
            let name = format!("{SPARE_PREFIX}{}-{n}", std::process::id());
            let made = Spare::make(&pool.init_exe, &pool.layout, name);
            let mut st = pool.lock();
            st.filling = false;
            match made {
                Ok(spare) if !st.closed => {
                    tracing::debug!(spare = %spare.name, pid = spare.pid, "spare sandbox ready");
                    st.spare = Some(spare);
                    pool.ready.send_replace(1);
                }
                Ok(spare) => {
                    drop(st);
                    spare.discard();
                }
                Err(e) => {
                    st.failures += 1;
                    tracing::warn!(error = %e, failures = st.failures, "could not make a spare sandbox");
                }
            }
        });
    }

    /// Removes the empty cgroups of spares whose agent is gone (a spare
    /// ends when its agent does, but nobody removes its cgroup then).
    fn clean_stale(&self) {
        let own = format!("{SPARE_PREFIX}{}-", std::process::id());
        for parent in self.layout.parents() {
            let Ok(entries) = std::fs::read_dir(parent) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(SPARE_PREFIX) else {
                    continue;
                };
                if name.starts_with(&own) {
                    continue;
                }
                let agent_alive = rest
                    .split('-')
                    .next()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if !agent_alive {
                    // Fails (EBUSY) and leaves it if a process is still in it.
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }

    /// Ends the waiting spare and makes no more.
    pub(crate) fn close(&self) {
        let spare = {
            let mut st = self.lock();
            st.closed = true;
            st.spare.take()
        };
        self.ready.send_replace(0);
        if let Some(s) = spare {
            tracing::debug!(spare = %s.name, pid = s.pid, "ending the spare sandbox");
            s.discard();
        }
    }
}

impl std::fmt::Debug for SparePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparePool")
            .field("waiting", &self.waiting_pid())
            .finish_non_exhaustive()
    }
}

impl Drop for SparePool {
    fn drop(&mut self) {
        self.close();
    }
}
