//! The sandbox init: the code that runs inside a sandbox's namespaces before
//! (and while) the user's command runs.
//!
//! Three processes, each with one job:
//!
//! * **outer init** — the binary the agent starts (`<init_exe>
//!   __sandbox-init <config-fd> <status-fd>`), already in the sandbox's
//!   cgroup and in fresh mount/uts/ipc(/net) namespaces, but still in the
//!   agent's pid namespace (unshare(CLONE_NEWPID) only applies to children).
//!   It makes mounts private, sets the hostname, brings `lo` up, forks pid 1,
//!   forwards the signals it gets to it and finally exits *like* the command
//!   did (same exit status, or re-raising the same signal) so that the agent,
//!   whose child it is, sees the command's status.
//! * **pid 1** of the new pid namespace — mounts a fresh `/proc`, forks the
//!   command, forwards signals to the command's process group, reaps zombies
//!   and exits when the command exits (the kernel then kills whatever is left
//!   in the namespace). It exists because a pid 1 ignores every signal it has
//!   no handler for: `sh -c` as pid 1 would ignore SIGTERM.
//! * **the command** — `/bin/sh -c <command>` with the spec's environment and
//!   working directory, in its own process group, with default signal
//!   dispositions.
//!
//! Setup errors are written to the status pipe (whose other end the agent
//! reads): end-of-file without a message means `/bin/sh` was executed (the
//! pipe is close-on-exec).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::confine::{self, MountOp, Rlimit, SeccompMode, APP_ID_IN_SANDBOX};

/// `argv[1]` that makes a binary run [`init_main`].
pub const INIT_SUBCOMMAND: &str = "__sandbox-init";

/// Exit status of the outer init when setting up the sandbox failed (the
/// same convention as container runtimes: 125 = the runtime failed).
pub const EXIT_SETUP_FAILED: i32 = 125;
/// Exit status when `/bin/sh` could not be executed (shell convention).
pub const EXIT_EXEC_FAILED: i32 = 127;

/// What the agent tells the init, as JSON in a memfd (not in argv or the
/// environment: the environment holds the app's secrets).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct InitConfig {
    pub id: String,
    pub hostname: String,
    pub cwd: PathBuf,
    pub command: String,
    pub env: BTreeMap<String, String>,
    /// Bring `lo` up (the sandbox has its own network namespace).
    pub loopback_up: bool,
    /// Pivot into a root of its own and run as an unprivileged user.
    #[serde(default)]
    pub confine: Option<InitConfine>,
    /// Egress: the descriptor on which the agent sends `eth0`'s address and
    /// gateway (8 bytes) once it has moved `eth0` into the namespace.
    #[serde(default)]
    pub net_fd: Option<RawFd>,
}

/// The confinement the agent planned (the init executes, never decides).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct InitConfine {
    /// Builds the new root at `staging`.
    pub ops: Vec<MountOp>,
    pub staging: PathBuf,
    /// The host uid and gid the app's id in the sandbox maps to.
    pub host_id: u32,
    pub seccomp: SeccompMode,
    pub rlimits: Vec<Rlimit>,
}

/// Signals the init processes pass on towards the command.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// A failed setup step: what we were doing, and the OS error.
struct InitError {
    step: String,
    source: io::Error,
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.source)
    }
}

trait Ctx<T> {
    fn ctx(self, step: impl Into<String>) -> Result<T, InitError>;
}

impl<T> Ctx<T> for Result<T, Errno> {
    fn ctx(self, step: impl Into<String>) -> Result<T, InitError> {
        self.map_err(|e| InitError {
            step: step.into(),
            source: io::Error::from(e),
        })
    }
}

impl<T> Ctx<T> for Result<T, io::Error> {
    fn ctx(self, step: impl Into<String>) -> Result<T, InitError> {
        self.map_err(|source| InitError {
            step: step.into(),
            source,
        })
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) is always safe; we skip atexit handlers and stdio
    // flushing on purpose (they belong to the process we forked from).
    unsafe { libc::_exit(code) }
}

/// Writes a setup error to the status pipe for the agent to read.
fn report(status: &OwnedFd, err: &InitError) {
    let msg = err.to_string();
    let mut buf = msg.as_bytes();
    while !buf.is_empty() {
        // SAFETY: writing from a valid buffer to an fd we own.
        let n = unsafe { libc::write(status.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Nobody to tell (the agent is gone); the log file is all we have.
            eprintln!("stead-sandbox init: {msg}");
            return;
        }
        buf = &buf[n as usize..];
    }
}

fn fail(status: &OwnedFd, err: &InitError, code: i32) -> ! {
    report(status, err);
    exit_now(code)
}

/// `argv[2]` of a spare init (see [`spare`]).
pub(crate) const SPARE_ARG: &str = "spare";

/// How the init was started.
#[derive(Debug, PartialEq, Eq)]
enum Args {
    /// `__sandbox-init <config-fd> <status-fd>`: configured at exec.
    Direct { config: RawFd, status: RawFd },
    /// `__sandbox-init spare <control-fd>`: a spare, configured later.
    Spare { control: RawFd },
}

fn parse_args(args: &[OsString]) -> Option<Args> {
    if args.get(1)?.as_bytes() != INIT_SUBCOMMAND.as_bytes() {
        return None;
    }
    let fd =
        |i: usize| -> Option<RawFd> { args.get(i)?.to_str()?.parse().ok().filter(|fd| *fd > 2) };
    if args.get(2)?.as_bytes() == SPARE_ARG.as_bytes() {
        return (args.len() == 4).then_some(Args::Spare { control: fd(3)? });
    }
    Some(Args::Direct {
        config: fd(2)?,
        status: fd(3)?,
    })
}

/// Body of the `__sandbox-init` hidden subcommand: the agent re-executes
/// its own binary (or a small helper) with it to set up a sandbox. Never
/// returns: it ends up exiting with the sandboxed command's status.
///
/// Call it first thing in `main`, before anything starts a thread (a tokio
/// runtime, a logging thread): it forks, and only a single-threaded process
/// can safely do arbitrary work after fork. It needs no logging setup
/// either: errors go back to the agent through the status pipe.
///
/// ```no_run
/// // First lines of the agent's `main`:
/// if std::env::args_os().nth(1).is_some_and(|a| a == stead_sandbox::INIT_SUBCOMMAND) {
///     stead_sandbox::init_main();
/// }
/// ```
pub fn init_main() -> ! {
    let args: Vec<OsString> = std::env::args_os().collect();
    match parse_args(&args) {
        Some(Args::Direct { config, status }) => {
            // SAFETY: the agent passed these two descriptors to us (it
            // cleared their close-on-exec flag for this exec) and nothing
            // else here owns them.
            let (config, status) =
                unsafe { (OwnedFd::from_raw_fd(config), OwnedFd::from_raw_fd(status)) };
            outer(config, status, None)
        }
        // SAFETY: as above, for the spare's end of its control socket.
        Some(Args::Spare { control }) => spare(unsafe { OwnedFd::from_raw_fd(control) }),
        None => {
            eprintln!(
                "usage: {INIT_SUBCOMMAND} <config-fd> <status-fd>\n\
                 (the sandbox init is started by the Stead agent, not by hand)"
            );
            exit_now(EXIT_SETUP_FAILED)
        }
    }
}

/// Namespaces a spare may still be asked to create when it is used: those
/// that must be made at that moment, not when the spare was (the mount
/// namespace copies the host's mounts as they are then, e.g. an app's data
/// directory mounted just before; the cgroup namespace is rooted at the
/// cgroup the spare is in, named after the instance by then; the pid
/// namespace is its children's anyway).
pub(crate) const SPARE_LATE_NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWCGROUP;

/// The descriptors of a start, in the order the agent sends them to a
/// spare: config memfd, status pipe, stdout, stderr, and for egress the
/// network pipe.
pub(crate) const SPARE_FDS_MIN: usize = 4;
pub(crate) const SPARE_FDS_MAX: usize = 5;

/// A spare init: already in its cgroup (joined by the agent's child before
/// exec, off any request's path) and in fresh uts, ipc and network
/// namespaces, it waits for one message on its control socket: the
/// namespaces still to create and the descriptors of a start. Then it goes
/// on exactly as an init started for that sandbox would. End-of-file (the
/// agent let it go, or died) ends it quietly: a spare carries nothing, and
/// is never used twice (the socket is closed once the message is read).
fn spare(control: OwnedFd) -> ! {
    let Some((flags, mut fds)) = receive_start(&control) else {
        exit_now(0)
    };
    drop(control);
    let net = (fds.len() == SPARE_FDS_MAX).then(|| fds.remove(4));
    let mut it = fds.into_iter();
    let (Some(config), Some(status), Some(stdout), Some(stderr)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        exit_now(EXIT_SETUP_FAILED)
    };
    for (fd, target) in [(&stdout, 1), (&stderr, 2)] {
        // SAFETY: dup2 of a descriptor we own onto stdout/stderr.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            let e = InitError {
                step: "dup2 (the sandbox's output)".into(),
                source: io::Error::last_os_error(),
            };
            fail(&status, &e, EXIT_SETUP_FAILED);
        }
    }
    drop((stdout, stderr));
    if flags & !SPARE_LATE_NAMESPACES != 0 {
        let e = InitError {
            step: format!("namespaces asked of a spare ({flags:#x})"),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        };
        fail(&status, &e, EXIT_SETUP_FAILED);
    }
    // SAFETY: plain syscall; this process is single-threaded.
    if unsafe { libc::unshare(flags) } != 0 {
        let e = InitError {
            step: format!("unshare({flags:#x}) in the spare"),
            source: io::Error::last_os_error(),
        };
        fail(&status, &e, EXIT_SETUP_FAILED);
    }
    outer(config, status, net)
}

/// Reads the spare's one message: 4 bytes of namespace flags, and the
/// descriptors. `None` on end-of-file or anything malformed.
fn receive_start(control: &OwnedFd) -> Option<(libc::c_int, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; SPARE_FDS_MAX]);
    let (n, fds) = loop {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().ok()? {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        // SAFETY: the kernel just installed these
                        // descriptors in this process for us.
                        fds.extend(
                            list.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (msg.bytes, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(_) => return None,
        }
    };
    if n != 4 || !(SPARE_FDS_MIN..=SPARE_FDS_MAX).contains(&fds.len()) {
        return None;
    }
    Some((libc::c_int::from_le_bytes(buf), fds))
}

fn read_config(fd: OwnedFd) -> Result<InitConfig, InitError> {
    let mut file = File::from(fd);
    // The agent wrote the memfd through the same open file description, so
    // its offset is at the end.
    file.seek(SeekFrom::Start(0))
        .ctx("seeking the config memfd")?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ctx("reading the config memfd")?;
    serde_json::from_slice(&buf)
        .map_err(io::Error::other)
        .ctx("parsing the sandbox config")
}

fn set_cloexec(fd: &OwnedFd) -> Result<(), InitError> {
    // SAFETY: fcntl on an fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error()).ctx("setting close-on-exec on the status pipe");
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), InitError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ctx("pipe2")
}

fn signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

fn prepare_outer(
    config: OwnedFd,
    status: &OwnedFd,
    net: Option<OwnedFd>,
) -> Result<(InitConfig, SigSet), InitError> {
    let cfg = read_config(config)?;
    // Only the command's exec may close our status pipe's last copy.
    set_cloexec(status)?;
    // Blocked signals stay pending and are taken with sigwait(): no async
    // signal handlers, and a pid 1 does not drop blocked signals.
    let signals = signal_set();
    signals.thread_block().ctx("blocking signals")?;
    // The mount namespace is a copy of the host's, where / is usually shared:
    // without this, mounting /proc below would propagate to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx("making mounts private (mount --make-rprivate /)")?;
    nix::unistd::sethostname(&cfg.hostname)
        .ctx(format!("setting the hostname to {:?}", cfg.hostname))?;
    if cfg.loopback_up {
        bring_up_loopback()?;
    }
    // A spare got its network pipe with the start message; an init started
    // for this sandbox inherited it at the number the config names.
    // SAFETY: the agent passed this descriptor for us alone.
    let net = net.or_else(|| cfg.net_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
    if let Some(fd) = net {
        let mut buf = [0u8; 8];
        let mut file = File::from(fd);
        file.read_exact(&mut buf)
            .ctx("waiting for the agent to set up the instance's network")?;
        let inside = std::net::Ipv4Addr::new(buf[0], buf[1], buf[2], buf[3]);
        let gateway = std::net::Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
        configure_eth0(inside, gateway)?;
    }
    if let Some(c) = &cfg.confine {
        confine::apply(&c.ops, &mut confine::LinuxMounts)
            .map_err(|(step, source)| InitError { step, source })?;
        // Here, while still root on the host: raising a hard limit needs
        // CAP_SYS_RESOURCE there. pid 1 and the command inherit them.
        confine::set_rlimits(&c.rlimits).ctx("setting rlimits")?;
    }
    Ok((cfg, signals))
}

/// The pipes with which pid 1 and the outer init hand over the user
/// namespace: pid 1 unshares it and says so; the outer init (still root on
/// the host) writes its id maps and says so. A process cannot map ids of
/// the host into its own new namespace; its parent can.
struct UsernsSync {
    unshared_r: OwnedFd,
    unshared_w: OwnedFd,
    mapped_r: OwnedFd,
    mapped_w: OwnedFd,
    /// The host's /proc, opened before the pivot hides it.
    host_proc: OwnedFd,
}

/// pid 1's ends of [`UsernsSync`].
struct Pid1Sync {
    unshared_w: OwnedFd,
    mapped_r: OwnedFd,
}

/// The outer init's ends of [`UsernsSync`]. Each side closes the other's
/// ends, so that a side that dies is seen as end-of-file, not waited for.
struct OuterSync {
    unshared_r: OwnedFd,
    mapped_w: OwnedFd,
    host_proc: OwnedFd,
}

impl UsernsSync {
    fn split(self) -> (Pid1Sync, OuterSync) {
        (
            Pid1Sync {
                unshared_w: self.unshared_w,
                mapped_r: self.mapped_r,
            },
            OuterSync {
                unshared_r: self.unshared_r,
                mapped_w: self.mapped_w,
                host_proc: self.host_proc,
            },
        )
    }
}

fn userns_sync() -> Result<UsernsSync, InitError> {
    let (unshared_r, unshared_w) = pipe()?;
    let (mapped_r, mapped_w) = pipe()?;
    let host_proc = File::open("/proc").ctx("opening the host's /proc")?.into();
    Ok(UsernsSync {
        unshared_r,
        unshared_w,
        mapped_r,
        mapped_w,
        host_proc,
    })
}

fn read_byte(fd: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: read into a 1-byte buffer from an fd we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return n == 1;
    }
}

fn write_byte(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: write of 1 byte from a static buffer to an fd we own.
    if unsafe { libc::write(fd.as_raw_fd(), b"x".as_ptr().cast(), 1) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In the outer init: writes pid 1's uid and gid maps once it has
/// unshared its user namespace (`sandbox id 1000 = host id host_id`).
fn map_ids(sync: &OuterSync, pid1: Pid, host_id: u32) -> Result<(), InitError> {
    if !read_byte(&sync.unshared_r) {
        // pid 1 failed before (and reported why itself) or was killed: the
        // supervision loop collects its status.
        return Ok(());
    }
    let line = format!("{APP_ID_IN_SANDBOX} {host_id} 1\n");
    for file in ["uid_map", "gid_map"] {
        let rel = CString::new(format!("{}/{file}", pid1.as_raw()))
            .map_err(io::Error::other)
            .ctx("map path")?;
        // SAFETY: openat relative to our /proc fd, with a valid C string.
        let fd = unsafe {
            libc::openat(
                sync.host_proc.as_raw_fd(),
                rel.as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error()).ctx(format!("opening /proc/{rel:?}"));
        }
        // SAFETY: a descriptor openat just gave us.
        let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        std::io::Write::write_all(&mut f, line.as_bytes())
            .ctx(format!("writing {file} ({})", line.trim()))?;
    }
    write_byte(&sync.mapped_w).ctx("telling pid 1 its ids are mapped")
}

/// In pid 1, still root on the host: mounts its /proc in the new root,
/// pivots into it, and detaches the host's tree.
fn pivot(c: &InitConfine) -> Result<(), InitError> {
    let proc_dir = confine::under(&c.staging, std::path::Path::new("/proc"));
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .ctx("mounting /proc in the new root")?;
    nix::unistd::chdir(&c.staging).ctx("entering the new root")?;
    // pivot_root(".", "."): the old root ends up stacked on the new one,
    // and is detached right away; no directory for it is needed.
    nix::unistd::pivot_root(".", ".").ctx("pivot_root")?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH).ctx("detaching the old root")?;
    nix::unistd::chdir("/").ctx("chdir /")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .ctx("making the new root read-only")
}

/// In pid 1: enters a user namespace of its own, waits for its ids to be
/// mapped, empties the bounding set and becomes the app's user with no
/// capabilities.
fn become_app_user(sync: &Pid1Sync) -> Result<(), InitError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).ctx("unshare(CLONE_NEWUSER)")?;
    write_byte(&sync.unshared_w).ctx("telling the outer init about the user namespace")?;
    if !read_byte(&sync.mapped_r) {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof)).ctx("waiting for the id maps");
    }
    confine::drop_bounding_caps().ctx("dropping the capability bounding set")?;
    nix::unistd::setgroups(&[]).ctx("setgroups([])")?;
    let id = nix::unistd::Gid::from_raw(APP_ID_IN_SANDBOX);
    nix::unistd::setresgid(id, id, id).ctx("setresgid")?;
    let id = nix::unistd::Uid::from_raw(APP_ID_IN_SANDBOX);
    nix::unistd::setresuid(id, id, id).ctx("setresuid")?;
    confine::clear_caps().ctx("clearing capabilities")?;
    // No /proc/1/mem games by the app, which runs as the same user.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).ctx("prctl(PR_SET_DUMPABLE, 0)");
    }
    Ok(())
}

fn sockaddr(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// `struct rtentry` of <linux/route.h> (not in the libc crate for glibc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// `ip addr add <inside>/30 dev eth0; ip link set eth0 up; ip route add
/// default via <gateway>`, as ioctls.
fn configure_eth0(
    inside: std::net::Ipv4Addr,
    gateway: std::net::Ipv4Addr,
) -> Result<(), InitError> {
    const SIOCSIFADDR: libc::c_ulong = 0x8916;
    const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
    const SIOCADDRT: libc::c_ulong = 0x890b;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).ctx("socket(AF_INET) to configure eth0");
    }
    // SAFETY: fd was just returned by socket(2) and is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"eth0\0") {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_addr = sockaddr(inside);
    // SAFETY: the ioctls read the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFADDR as _, &req) } < 0 {
        return Err(io::Error::last_os_error()).ctx(format!("setting eth0's address to {inside}"));
    }
    req.ifr_ifru.ifru_netmask = sockaddr(std::net::Ipv4Addr::new(255, 255, 255, 252));
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFNETMASK as _, &req) } < 0 {
        return Err(io::Error::last_os_error()).ctx("setting eth0's netmask");
    }
    // SAFETY: as above; SIOCGIFFLAGS fills the flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error()).ctx("ioctl(SIOCGIFFLAGS, eth0)");
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error()).ctx("ioctl(SIOCSIFFLAGS, eth0 up)");
    }
    let route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(std::net::Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(gateway),
        rt_genmask: sockaddr(std::net::Ipv4Addr::UNSPECIFIED),
        rt_flags: 0x1 | 0x2, // RTF_UP | RTF_GATEWAY
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads the rtentry we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCADDRT as _, &route) } < 0 {
        return Err(io::Error::last_os_error())
            .ctx(format!("adding the default route via {gateway}"));
    }
    Ok(())
}

/// `ip link set lo up`, with the two ioctls it boils down to.
fn bring_up_loopback() -> Result<(), InitError> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).ctx("socket(AF_INET) to configure lo");
    }
    // SAFETY: fd was just returned by socket(2) and is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error()).ctx("ioctl(SIOCGIFFLAGS, lo)");
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error()).ctx("ioctl(SIOCSIFFLAGS, lo up)");
    }
    Ok(())
}

fn outer(config: OwnedFd, status: OwnedFd, net: Option<OwnedFd>) -> ! {
    let (cfg, signals) = match prepare_outer(config, &status, net) {
        Ok(v) => v,
        Err(e) => fail(&status, &e, EXIT_SETUP_FAILED),
    };
    // lifeline: pid 1 checks it to learn whether we died before it could set
    // its parent-death signal. relay: pid 1 tells us how the command ended.
    let pipes = pipe().and_then(|l| Ok((l, pipe()?)));
    let ((lifeline_r, lifeline_w), (relay_r, relay_w)) = match pipes {
        Ok(p) => p,
        Err(e) => fail(&status, &e, EXIT_SETUP_FAILED),
    };
    let (pid1_sync, outer_sync) = match cfg.confine.as_ref().map(|_| userns_sync()).transpose() {
        Ok(Some(s)) => {
            let (a, b) = s.split();
            (Some(a), Some(b))
        }
        Ok(None) => (None, None),
        Err(e) => fail(&status, &e, EXIT_SETUP_FAILED),
    };
    // SAFETY: this process is single-threaded, so the child may do anything.
    match unsafe { fork() } {
        Err(e) => fail(
            &status,
            &InitError {
                step: "fork (pid 1 of the sandbox)".into(),
                source: e.into(),
            },
            EXIT_SETUP_FAILED,
        ),
        Ok(ForkResult::Child) => {
            drop(lifeline_w);
            drop(relay_r);
            drop(outer_sync);
            pid1(cfg, status, lifeline_r, relay_w, signals, pid1_sync)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(lifeline_r);
            drop(relay_w);
            drop(pid1_sync);
            if let (Some(sync), Some(c)) = (&outer_sync, &cfg.confine) {
                if let Err(e) = map_ids(sync, child, c.host_id) {
                    let _ = kill(child, Signal::SIGKILL);
                    fail(&status, &e, EXIT_SETUP_FAILED);
                }
            }
            drop(outer_sync);
            drop(status);
            supervise_pid1(child, relay_r, lifeline_w, signals)
        }
    }
}

/// How the command ended, as pid 1 relays it to the outer init.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Exit(i32),
    Signal(i32),
}

impl Ended {
    fn encode(self) -> [u8; 8] {
        let (kind, value) = match self {
            Ended::Exit(c) => (0i32, c),
            Ended::Signal(s) => (1i32, s),
        };
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&kind.to_le_bytes());
        out[4..].copy_from_slice(&value.to_le_bytes());
        out
    }

    fn decode(buf: &[u8]) -> Option<Self> {
        let kind = i32::from_le_bytes(buf.get(..4)?.try_into().ok()?);
        let value = i32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
        match kind {
            0 => Some(Ended::Exit(value)),
            1 => Some(Ended::Signal(value)),
            _ => None,
        }
    }
}

fn supervise_pid1(pid1: Pid, relay: OwnedFd, _lifeline: OwnedFd, signals: SigSet) -> ! {
    loop {
        let Ok(sig) = signals.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = kill(pid1, sig);
            continue;
        }
        let ended = match waitpid(pid1, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Ended::Exit(code),
            Ok(WaitStatus::Signaled(_, s, _)) => Ended::Signal(s as i32),
            _ => continue,
        };
        // pid 1 wrote the command's own status before exiting; if it was
        // killed instead (SIGKILL from the agent), its own status is it.
        let mut buf = [0u8; 8];
        let mut file = File::from(relay);
        let relayed = match file.read(&mut buf) {
            Ok(8) => Ended::decode(&buf),
            _ => None,
        };
        exit_like(relayed.unwrap_or(ended))
    }
}

/// Ends this (non-pid-1) process the way the command ended, so that our
/// parent's waitpid() sees the same status.
fn exit_like(ended: Ended) -> ! {
    match ended {
        Ended::Exit(code) => exit_now(code),
        Ended::Signal(sig) => {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: plain syscalls on our own process; the signal number
            // comes from the kernel.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
            }
            // Signals whose default action is not to terminate.
            exit_now(128 + sig)
        }
    }
}

/// True when the lifeline's write end (held by the outer init) is closed.
fn parent_gone(lifeline: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: lifeline.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLIN) != 0
}

/// What the command's exec needs, built before forking it.
struct Exec {
    /// A command without shell syntax, resolved to a file: executed
    /// directly, saving a shell's start (`sh -c` would only exec it).
    direct: Option<(CString, Vec<CString>)>,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

/// Words a simple command's first word may not be: they mean something to
/// the shell (builtins, keywords).
const SHELL_WORDS: &[&str] = &[
    "exec", "cd", "export", "unset", "set", "if", "then", "for", "while", "until", "case", "do",
    "done", "fi", "esac", "in", "function", ".", "source", "eval", "trap", "ulimit", "umask",
    "wait", "read", "readonly", "shift", "return", "exit", "break", "continue", "alias", "test",
    "[", "echo", "printf", "true", "false", ":", "command", "type", "hash", "times", "local",
    "kill", "jobs", "fg", "bg", "getopts",
];

/// The words of `command` when it has no shell syntax at all (no quotes,
/// variables, redirections, operators, globs, assignments, comments).
pub(crate) fn simple_words(command: &str) -> Option<Vec<&str>> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "._-/:,+@%".contains(c);
    if !command.chars().all(|c| plain(c) || c == ' ') {
        return None;
    }
    let words: Vec<&str> = command.split(' ').filter(|w| !w.is_empty()).collect();
    let first = *words.first()?;
    (!SHELL_WORDS.contains(&first)).then_some(words)
}

/// Where execvp would find `program`: as is when it has a slash, else the
/// first executable file of that name on `path`.
fn resolve(program: &str, path: &str) -> Option<String> {
    let executable = |p: &str| {
        CString::new(p)
            // SAFETY: access(2) on a valid C string.
            .map(|c| unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        return Some(program.to_owned());
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
        .find(|p| executable(p) && !std::path::Path::new(p).is_dir())
}

const SHELL: &str = "/bin/sh";

fn prepare_exec(cfg: &InitConfig) -> Result<Exec, InitError> {
    let nul = |what: &str| InitError {
        step: format!("preparing the command: {what} contains a NUL byte"),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    };
    let argv = vec![
        CString::new("sh").map_err(|_| nul("argv"))?,
        CString::new("-c").map_err(|_| nul("argv"))?,
        CString::new(cfg.command.as_str()).map_err(|_| nul("the command"))?,
    ];
    // Resolved here, in pid 1, which already sees the sandbox's root as the
    // app's user; relative paths are relative to the cwd, which the
    // command's process enters before exec.
    let direct = simple_words(&cfg.command).and_then(|words| {
        let path = cfg.env.get("PATH").map(String::as_str).unwrap_or("");
        let program = if words[0].contains('/') && !words[0].starts_with('/') {
            Some(cfg.cwd.join(words[0]).display().to_string())
        } else {
            resolve(words[0], path)
        }?;
        let args: Option<Vec<CString>> = words.iter().map(|w| CString::new(*w).ok()).collect();
        Some((CString::new(program).ok()?, args?))
    });
    let envp = cfg
        .env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")).map_err(|_| nul(&format!("env var {k}"))))
        .collect::<Result<_, _>>()?;
    Ok(Exec { direct, argv, envp })
}

fn pid1_setup(
    cfg: &InitConfig,
    lifeline: &OwnedFd,
    sync: Option<&Pid1Sync>,
) -> Result<(Exec, Vec<seccompiler::BpfProgram>), InitError> {
    // If the outer init dies, so do we, and with us (the namespace's init)
    // every process of the sandbox.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).ctx("prctl(PR_SET_PDEATHSIG)")?;
    if parent_gone(lifeline) {
        exit_now(1);
    }
    let mut filters = Vec::new();
    match (&cfg.confine, sync) {
        (Some(c), Some(sync)) => {
            pivot(c)?;
            become_app_user(sync)?;
            // Changing credentials cleared the parent-death signal.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).ctx("prctl(PR_SET_PDEATHSIG) again")?;
            if parent_gone(lifeline) {
                exit_now(1);
            }
            filters = confine::seccomp_filters(c.seccomp)
                .map_err(io::Error::other)
                .ctx("building the seccomp filters")?;
        }
        _ => {
            mount(
                Some("proc"),
                "/proc",
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .ctx("mounting a fresh /proc")?;
        }
    }
    Ok((prepare_exec(cfg)?, filters))
}

fn pid1(
    cfg: InitConfig,
    status: OwnedFd,
    lifeline: OwnedFd,
    relay: OwnedFd,
    signals: SigSet,
    sync: Option<Pid1Sync>,
) -> ! {
    let prepared = pid1_setup(&cfg, &lifeline, sync.as_ref());
    drop(sync);
    drop(lifeline);
    let (exec, filters) = match prepared {
        Ok(e) => e,
        Err(e) => fail(&status, &e, EXIT_SETUP_FAILED),
    };
    // SAFETY: single-threaded process.
    match unsafe { fork() } {
        Err(e) => fail(
            &status,
            &InitError {
                step: "fork (the sandboxed command)".into(),
                source: e.into(),
            },
            EXIT_SETUP_FAILED,
        ),
        Ok(ForkResult::Child) => {
            let err = run_command(&cfg, &exec, &filters);
            fail(&status, &err, EXIT_EXEC_FAILED)
        }
        Ok(ForkResult::Parent { child }) => {
            // Also done by the child; doing it here too closes the window in
            // which a forwarded signal would miss the group.
            let _ = nix::unistd::setpgid(child, child);
            drop(status);
            reap(child, relay, signals)
        }
    }
}

/// Pid 1's loop: forward signals to the command's process group, reap every
/// zombie, and exit when the command exits.
fn reap(command: Pid, relay: OwnedFd, signals: SigSet) -> ! {
    loop {
        let Ok(sig) = signals.wait() else { continue };
        if sig != Signal::SIGCHLD {
            if kill(Pid::from_raw(-command.as_raw()), sig).is_err() {
                let _ = kill(command, sig);
            }
            continue;
        }
        loop {
            let ended = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == command => Ended::Exit(code),
                Ok(WaitStatus::Signaled(pid, s, _)) if pid == command => Ended::Signal(s as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => break,
            };
            let buf = ended.encode();
            // SAFETY: write from a valid buffer to our relay pipe; 8 bytes
            // to an empty pipe is atomic.
            unsafe { libc::write(relay.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            exit_now(match ended {
                Ended::Exit(c) => c,
                Ended::Signal(s) => 128 + s,
            })
        }
    }
}

/// In the command's process: everything after fork up to exec. Returns only
/// on failure.
fn run_command(cfg: &InitConfig, exec: &Exec, filters: &[seccompiler::BpfProgram]) -> InitError {
    let r = (|| -> Result<Infallible, InitError> {
        // Start with default dispositions and nothing blocked, as any program
        // expects (the init binary, being Rust, ignores SIGPIPE).
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // SAFETY: resetting a disposition to the default.
                unsafe { libc::signal(sig, libc::SIG_DFL) };
            }
        }
        SigSet::empty()
            .thread_set_mask()
            .ctx("unblocking signals")?;
        nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)).ctx("setpgid")?;
        nix::unistd::chdir(&cfg.cwd).ctx(format!("changing directory to {}", cfg.cwd.display()))?;
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .ctx("opening /dev/null for stdin")?;
        // SAFETY: dup2 onto stdin, both fds valid.
        if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
            return Err(io::Error::last_os_error()).ctx("dup2(/dev/null, stdin)");
        }
        drop(null);
        let shell = CString::new(SHELL)
            .map_err(io::Error::other)
            .ctx("shell path")?;
        if cfg.confine.is_some() {
            // Last: the filter also applies to what we would call next.
            confine::lock_down(filters).ctx("no_new_privs and seccomp")?;
        }
        if let Some((program, args)) = &exec.direct {
            // On failure (not an executable after all, say) the shell
            // gets the command and says what is wrong with it.
            let _ = nix::unistd::execve(program, args, &exec.envp);
        }
        nix::unistd::execve(&shell, &exec.argv, &exec.envp).ctx(format!("executing {SHELL}"))
    })();
    match r {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_roundtrip() {
        for e in [
            Ended::Exit(0),
            Ended::Exit(255),
            Ended::Signal(9),
            Ended::Signal(15),
        ] {
            assert_eq!(Ended::decode(&e.encode()), Some(e));
        }
        assert_eq!(Ended::decode(&[1, 2, 3]), None);
        assert_eq!(Ended::decode(&[9, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn args() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            parse_args(&a(&["x", INIT_SUBCOMMAND, "5", "7"])),
            Some(Args::Direct {
                config: 5,
                status: 7
            })
        );
        assert_eq!(
            parse_args(&a(&["x", INIT_SUBCOMMAND, SPARE_ARG, "6"])),
            Some(Args::Spare { control: 6 })
        );
        assert_eq!(parse_args(&a(&["x", INIT_SUBCOMMAND, SPARE_ARG])), None);
        assert_eq!(
            parse_args(&a(&["x", INIT_SUBCOMMAND, SPARE_ARG, "2"])),
            None
        );
        assert_eq!(parse_args(&a(&["x", "serve", "5", "7"])), None);
        assert_eq!(parse_args(&a(&["x", INIT_SUBCOMMAND, "1", "7"])), None);
        assert_eq!(parse_args(&a(&["x", INIT_SUBCOMMAND, "5"])), None);
    }

    #[test]
    fn simple_commands_skip_the_shell() {
        assert_eq!(
            simple_words("./target/release/hello"),
            Some(vec!["./target/release/hello"])
        );
        assert_eq!(
            simple_words("python3  app.py --port 80"),
            Some(vec!["python3", "app.py", "--port", "80"])
        );
        for shell in [
            "exec python3 app.py",
            "echo $HOME",
            "a && b",
            "a | b",
            "A=1 b",
            "cd x; y",
            "x > f",
            "'q'",
            "a*",
            "",
            "  ",
        ] {
            assert_eq!(simple_words(shell), None, "{shell}");
        }
        assert_eq!(resolve("./x", "/bin").as_deref(), Some("./x"));
        assert_eq!(
            resolve("sh", "/nonexistent:/bin").as_deref(),
            Some("/bin/sh")
        );
        assert_eq!(resolve("no-such-program-here", "/bin:/usr/bin"), None);
    }

    #[test]
    fn exec_rejects_nul() {
        let mut cfg = InitConfig {
            id: "a".into(),
            hostname: "a".into(),
            cwd: "/".into(),
            command: "echo hi".into(),
            env: BTreeMap::from([("A".into(), "b".into())]),
            loopback_up: false,
            confine: None,
            net_fd: None,
        };
        let e = prepare_exec(&cfg)
            .ok()
            .map(|e| (e.argv.len(), e.envp.len()));
        assert_eq!(e, Some((3, 1)));
        cfg.command = "a\0b".into();
        assert!(prepare_exec(&cfg).is_err());
    }
}
