//! Confinement of an instance: the root filesystem it sees, the user it runs
//! as, the system calls it may make and its rlimits.
//!
//! Everything here is split in two: a **plan**, computed by the agent from
//! the spec and what the host's filesystem holds (pure, unit-tested without
//! root), and its **execution** by the sandbox init through the [`MountSys`]
//! seam (real system calls in [`LinuxMounts`], a recorder in the tests).
//! The init only executes: it never decides what to mount.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Host directories (and files) an instance needs to run a shell, a dynamic
/// Rust binary and the distribution's interpreters. `/etc` is not bound as
/// a whole: only the files programs read (never `shadow`, `gshadow`,
/// `sudoers`...). Paths missing on a host are skipped.
pub const DEFAULT_RO_PATHS: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/mime.types",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/passwd",
    "/etc/group",
];

/// Device nodes bound into the sandbox's `/dev` from the host's.
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// The id the app runs as inside its user namespace (mapped to a host id
/// of its own, see [`Confinement::host_id`]).
pub const APP_ID_IN_SANDBOX: u32 = 1000;
/// Where the writable, size-limited data directory is inside the sandbox
/// (`HOME` points there).
pub const DATA_DIR: &str = "/data";

/// What the seccomp filter does to a denied system call.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// The call fails with EPERM: the app sees an ordinary error.
    #[default]
    Errno,
    /// The whole process is killed (SIGSYS): loud, for apps known not to
    /// try.
    Kill,
}

/// How strictly an instance is confined. `None` in [`crate::SandboxSpec`]
/// means the host's root filesystem and the agent's user (what builds use).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// Host paths bound read-only at the same path. The app's folder
    /// (the spec's `cwd`) is always bound read-only as well.
    pub ro_paths: Vec<PathBuf>,
    /// Directories prepended to PATH (interpreters' `bin` of runtimes bound
    /// from outside the system directories, e.g. a pyenv prefix).
    pub path_prefix: Vec<PathBuf>,
    /// Size of the private `/tmp` (tmpfs), MiB.
    pub tmp_mb: u64,
    /// The app's data directory on the host, bound read-write at the same
    /// path (so paths to it, like a SQLite URL, mean the same inside) and
    /// made `HOME`. It outlives instances: a loop-mounted ext4 image of
    /// `data_mb` beside it (`<dir>.img`) is its disk quota, and the
    /// sandbox's host id is derived from its path, so every instance of the
    /// app owns it and no other app does. `None`: a tmpfs at [`DATA_DIR`]
    /// that lives as long as the instance.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Size of the data directory, MiB: its disk quota (a tmpfs's pages
    /// are also charged to the memory limit).
    pub data_mb: u64,
    /// Size of `/dev/shm`, MiB.
    pub shm_mb: u64,
    pub seccomp: SeccompMode,
    /// Soft = hard limits set before the command runs.
    pub rlimits: Vec<Rlimit>,
    /// First host uid/gid sandboxes are mapped to; each sandbox gets
    /// `base + hash(id) % range`.
    pub host_id_base: u32,
    pub host_id_range: u32,
}

/// One resource limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: RlimitResource,
    pub value: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RlimitResource {
    Core,
    Nofile,
    Memlock,
    Msgqueue,
    Fsize,
    Nproc,
}

impl RlimitResource {
    fn raw(self) -> libc::__rlimit_resource_t {
        match self {
            RlimitResource::Core => libc::RLIMIT_CORE,
            RlimitResource::Nofile => libc::RLIMIT_NOFILE,
            RlimitResource::Memlock => libc::RLIMIT_MEMLOCK,
            RlimitResource::Msgqueue => libc::RLIMIT_MSGQUEUE,
            RlimitResource::Fsize => libc::RLIMIT_FSIZE,
            RlimitResource::Nproc => libc::RLIMIT_NPROC,
        }
    }
}

impl Default for Confinement {
    fn default() -> Self {
        Confinement {
            ro_paths: DEFAULT_RO_PATHS.iter().map(PathBuf::from).collect(),
            path_prefix: Vec::new(),
            tmp_mb: 64,
            data_dir: None,
            data_mb: 256,
            shm_mb: 16,
            seccomp: SeccompMode::Errno,
            rlimits: vec![
                Rlimit {
                    resource: RlimitResource::Core,
                    value: 0,
                },
                Rlimit {
                    resource: RlimitResource::Nofile,
                    value: 16384,
                },
                Rlimit {
                    resource: RlimitResource::Memlock,
                    value: 64 << 10,
                },
                Rlimit {
                    resource: RlimitResource::Msgqueue,
                    value: 800 << 10,
                },
            ],
            host_id_base: 1_500_000_000,
            host_id_range: 1 << 24,
        }
    }
}

impl Confinement {
    /// The defaults plus the runtimes found on this host's PATH outside the
    /// system directories (a pyenv Python under /root, say): their prefix is
    /// bound read-only and their `bin` comes first in PATH, so that an
    /// instance runs the interpreter its build used.
    pub fn detect() -> Self {
        let mut c = Confinement::default();
        if let Some(prefix) = python_prefix() {
            if !c.ro_paths.iter().any(|p| prefix.starts_with(p)) {
                c.path_prefix.push(prefix.join("bin"));
                c.ro_paths.push(prefix);
            }
        }
        c
    }

    /// The host uid and gid sandbox `id` runs as: stable for an id, distinct
    /// between ids (up to hash collisions in a range of 16 million), and far
    /// above any id a distribution hands out.
    pub fn host_id(&self, id: &str) -> u32 {
        let key = match &self.data_dir {
            Some(d) => d.as_os_str().as_bytes(),
            None => id.as_bytes(),
        };
        // FNV-1a: stable across Rust versions, unlike DefaultHasher.
        let mut h: u32 = 0x811c_9dc5;
        for b in key {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        self.host_id_base + h % self.host_id_range.max(1)
    }
}

/// `sys.base_prefix` of the `python3` on PATH, when it is outside /usr.
fn python_prefix() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.base_prefix)"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (p.is_absolute() && !p.starts_with("/usr") && p.is_dir()).then_some(p)
}

/// What a host path is, as far as planning the root is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKind {
    Dir,
    File,
    /// A symbolic link, with its contents and its fully resolved target.
    Symlink {
        contents: PathBuf,
        resolved: PathBuf,
    },
}

/// The seam over the host's filesystem the planner looks at.
pub trait HostFs {
    fn kind(&self, path: &Path) -> Option<HostKind>;
}

/// The real host filesystem.
pub struct RealHostFs;

impl HostFs for RealHostFs {
    fn kind(&self, path: &Path) -> Option<HostKind> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        if meta.file_type().is_symlink() {
            let contents = std::fs::read_link(path).ok()?;
            let resolved = std::fs::canonicalize(path).ok()?;
            return Some(HostKind::Symlink { contents, resolved });
        }
        if meta.is_dir() {
            Some(HostKind::Dir)
        } else {
            Some(HostKind::File)
        }
    }
}

/// One step of building the root. Targets are absolute paths *inside* the
/// staging directory already.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountOp {
    /// A tmpfs (`options` as for mount(8), e.g. `size=64m,mode=1777`).
    Tmpfs {
        target: PathBuf,
        options: String,
        noexec: bool,
    },
    /// Creates `target` (and its parents, 0755) as a directory or an empty
    /// file to mount on.
    MkMountpoint {
        target: PathBuf,
        file: bool,
    },
    /// A bind mount of a host path; read-only binds are remounted
    /// read-only, nosuid and nodev, device binds nosuid and noexec.
    Bind {
        source: PathBuf,
        target: PathBuf,
        readonly: bool,
        device: bool,
    },
    Symlink {
        contents: PathBuf,
        target: PathBuf,
    },
}

/// Joins an absolute in-sandbox path below `root`.
pub fn under(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in path.components() {
        if let Component::Normal(n) = c {
            out.push(n);
        }
    }
    out
}

/// Plans the sandbox's root: a tmpfs at `staging` holding read-only binds
/// of `conf.ro_paths` and of `app_dir` (at their own paths), `/tmp`, the
/// data directory, `/dev` and the mount point of `/proc`.
pub fn plan_root(
    conf: &Confinement,
    app_dir: &Path,
    staging: &Path,
    host_id: u32,
    host: &dyn HostFs,
) -> Vec<MountOp> {
    let mut ops = vec![MountOp::Tmpfs {
        target: staging.to_path_buf(),
        options: "size=1m,mode=0755".into(),
        noexec: false,
    }];
    let data_dir = conf.data_dir.as_ref().filter(|d| d.is_absolute());
    let bound: Vec<PathBuf> = conf
        .ro_paths
        .iter()
        .chain(std::iter::once(&app_dir.to_path_buf()))
        .filter(|p| p.is_absolute())
        .cloned()
        .collect();
    ops.push(MountOp::Tmpfs {
        target: under(staging, Path::new("/tmp")),
        options: format!("size={}m,mode=1777", conf.tmp_mb.max(1)),
        noexec: false,
    });
    let data_op = match data_dir {
        // After the other binds: it may lie below one of them... but it is
        // never read-only, so it gets its own mount point in the tmpfs.
        Some(d) => MountOp::Bind {
            source: d.clone(),
            target: under(staging, d),
            readonly: false,
            device: false,
        },
        None => MountOp::Tmpfs {
            target: under(staging, Path::new(DATA_DIR)),
            options: format!(
                "size={}m,mode=0700,uid={host_id},gid={host_id}",
                conf.data_mb.max(1)
            ),
            noexec: false,
        },
    };
    if let MountOp::Tmpfs { .. } = data_op {
        ops.push(data_op.clone());
    }
    let dev = under(staging, Path::new("/dev"));
    ops.push(MountOp::Tmpfs {
        target: dev.clone(),
        options: "size=64k,mode=0755".into(),
        noexec: true,
    });
    for d in DEVICES {
        let src = Path::new("/dev").join(d);
        if host.kind(&src).is_some() {
            let target = dev.join(d);
            ops.push(MountOp::MkMountpoint {
                target: target.clone(),
                file: true,
            });
            ops.push(MountOp::Bind {
                source: src,
                target,
                readonly: false,
                device: true,
            });
        }
    }
    ops.push(MountOp::Tmpfs {
        target: dev.join("shm"),
        options: format!("size={}m,mode=1777", conf.shm_mb.max(1)),
        noexec: true,
    });
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(MountOp::Symlink {
            contents: to.into(),
            target: dev.join(name),
        });
    }
    // Shallow targets first: a bind below /tmp (an app folder in a
    // temporary directory) must come after the /tmp tmpfs, not under it.
    let mut bound = bound;
    bound.sort_by_key(|p| p.components().count());
    let mut binds = Vec::new();
    for path in &bound {
        let target = under(staging, path);
        match host.kind(path) {
            None => continue,
            Some(HostKind::Dir) => bind_ro(&mut binds, path.clone(), target, false),
            Some(HostKind::File) => bind_ro(&mut binds, path.clone(), target, true),
            Some(HostKind::Symlink { contents, resolved }) => {
                // /bin -> usr/bin: keep the link when what it points to is
                // bound anyway; otherwise bind what it resolves to.
                let covered = bound
                    .iter()
                    .any(|b| b != path && resolved.starts_with(b) && !b.starts_with(path));
                if covered {
                    binds.push(MountOp::Symlink { contents, target });
                } else {
                    let file = !matches!(host.kind(&resolved), Some(HostKind::Dir));
                    bind_ro(&mut binds, resolved, target, file);
                }
            }
        }
    }
    ops.extend(binds);
    if let MountOp::Bind { target, .. } = &data_op {
        ops.push(MountOp::MkMountpoint {
            target: target.clone(),
            file: false,
        });
        ops.push(data_op.clone());
    }
    ops.push(MountOp::MkMountpoint {
        target: under(staging, Path::new("/proc")),
        file: false,
    });
    ops
}

fn bind_ro(ops: &mut Vec<MountOp>, source: PathBuf, target: PathBuf, file: bool) {
    ops.push(MountOp::MkMountpoint {
        target: target.clone(),
        file,
    });
    ops.push(MountOp::Bind {
        source,
        target,
        readonly: true,
        device: false,
    });
}

/// `HOME` of a confined app: its data directory.
pub fn home(conf: &Confinement) -> PathBuf {
    conf.data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DATA_DIR))
}

/// PATH inside a confined sandbox: the runtimes' `bin` directories, then
/// the entries of `path` that exist in the sandbox's root (below a bound
/// path or the app's folder); the others would only slow lookups down.
pub fn sandbox_path(conf: &Confinement, app_dir: &Path, path: &str) -> String {
    let visible = |p: &Path| {
        conf.ro_paths
            .iter()
            .chain(std::iter::once(&app_dir.to_path_buf()))
            .any(|b| p.starts_with(b))
    };
    // The app's own `bin` directories (a virtualenv's) come first: its
    // `python3` is the runtime's plus the app's packages.
    let mut out: Vec<String> = path
        .split(':')
        .filter(|e| !e.is_empty() && Path::new(e).starts_with(app_dir))
        .map(str::to_owned)
        .collect();
    for p in &conf.path_prefix {
        let p = p.display().to_string();
        if !out.contains(&p) {
            out.push(p);
        }
    }
    for entry in path.split(':') {
        if !entry.is_empty() && visible(Path::new(entry)) && !out.iter().any(|o| o == entry) {
            out.push(entry.to_owned());
        }
    }
    out.join(":")
}

/// The system calls the init makes to build the root: the seam that lets
/// [`apply`] be tested without root.
pub trait MountSys {
    fn tmpfs(&mut self, target: &Path, options: &str, noexec: bool) -> io::Result<()>;
    fn mkmountpoint(&mut self, target: &Path, file: bool) -> io::Result<()>;
    fn bind(&mut self, source: &Path, target: &Path) -> io::Result<()>;
    fn remount(&mut self, target: &Path, readonly: bool, device: bool) -> io::Result<()>;
    fn symlink(&mut self, contents: &Path, target: &Path) -> io::Result<()>;
}

/// Executes a plan; the error names the step.
pub fn apply(ops: &[MountOp], sys: &mut dyn MountSys) -> Result<(), (String, io::Error)> {
    for op in ops {
        let r = match op {
            MountOp::Tmpfs {
                target,
                options,
                noexec,
            } => sys
                .mkmountpoint(target, false)
                .and_then(|()| sys.tmpfs(target, options, *noexec)),
            MountOp::MkMountpoint { target, file } => sys.mkmountpoint(target, *file),
            MountOp::Bind {
                source,
                target,
                readonly,
                device,
            } => sys
                .bind(source, target)
                .and_then(|()| sys.remount(target, *readonly, *device)),
            MountOp::Symlink { contents, target } => sys.symlink(contents, target),
        };
        r.map_err(|e| (describe(op), e))?;
    }
    Ok(())
}

fn describe(op: &MountOp) -> String {
    match op {
        MountOp::Tmpfs { target, .. } => format!("mounting a tmpfs on {}", target.display()),
        MountOp::MkMountpoint { target, .. } => format!("creating {}", target.display()),
        MountOp::Bind { source, target, .. } => {
            format!("bind-mounting {} on {}", source.display(), target.display())
        }
        MountOp::Symlink { target, .. } => format!("creating the symlink {}", target.display()),
    }
}

/// [`MountSys`] over the real system calls.
pub struct LinuxMounts;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

impl MountSys for LinuxMounts {
    fn tmpfs(&mut self, target: &Path, options: &str, noexec: bool) -> io::Result<()> {
        use nix::mount::{mount, MsFlags};
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if noexec {
            flags |= MsFlags::MS_NOEXEC;
        }
        mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options)).map_err(io::Error::from)
    }

    fn mkmountpoint(&mut self, target: &Path, file: bool) -> io::Result<()> {
        if file {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(target)
            {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            std::fs::create_dir_all(target)
        }
    }

    fn bind(&mut self, source: &Path, target: &Path) -> io::Result<()> {
        use nix::mount::{mount, MsFlags};
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(io::Error::from)
    }

    fn remount(&mut self, target: &Path, readonly: bool, device: bool) -> io::Result<()> {
        use nix::mount::{mount, MsFlags};
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
        if readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        if !device {
            flags |= MsFlags::MS_NODEV;
        }
        if device {
            flags |= MsFlags::MS_NOEXEC;
        }
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
    }

    fn symlink(&mut self, contents: &Path, target: &Path) -> io::Result<()> {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Checked for NUL bytes like every other path we pass on.
        cpath(contents)?;
        std::os::unix::fs::symlink(contents, target)
    }
}

/// System calls denied to a confined app: they change the kernel, the
/// machine, mounts or namespaces, or look into other processes. Most would
/// fail anyway for an unprivileged user; the filter is the second wall, and
/// it shrinks the kernel's attack surface.
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("add_key", libc::SYS_add_key),
    ("keyctl", libc::SYS_keyctl),
    ("request_key", libc::SYS_request_key),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("setns", libc::SYS_setns),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    ("uselib", libc::SYS_uselib),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("io_uring_setup", libc::SYS_io_uring_setup),
];

/// Namespace flags that `clone` and `unshare` may not be given.
pub const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

/// The filters a confined app runs under, in the order they are installed.
/// Two, because one seccompiler filter has one action for every match:
/// the deny list (EPERM or kill), and `clone3` answered with ENOSYS (its
/// flags live in memory a filter cannot read; ENOSYS makes libc fall back
/// to `clone`, whose flags the first filter checks).
pub fn seccomp_filters(
    mode: SeccompMode,
) -> Result<Vec<seccompiler::BpfProgram>, seccompiler::Error> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    // The filter checks the architecture too: a call made through another
    // ABI (x32, i386 on x86_64) does not match and is killed.
    #[cfg(target_arch = "aarch64")]
    let arch = seccompiler::TargetArch::aarch64;
    #[cfg(not(target_arch = "aarch64"))]
    let arch = seccompiler::TargetArch::x86_64;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in DENIED_SYSCALLS {
        rules.insert(*nr, Vec::new());
    }
    let flag_rules = |arg: u8| -> Result<Vec<SeccompRule>, seccompiler::Error> {
        NAMESPACE_FLAGS
            .iter()
            .map(|f| {
                Ok(SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(*f),
                    *f,
                )?])?)
            })
            .collect()
    };
    rules.insert(libc::SYS_clone, flag_rules(0)?);
    rules.insert(libc::SYS_unshare, flag_rules(0)?);
    // Raw and packet sockets: craft any packet, sniff the namespace.
    let sock = |arg: u8, mask: u64, value: u64| -> Result<SeccompRule, seccompiler::Error> {
        Ok(SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )?])?)
    };
    rules.insert(
        libc::SYS_socket,
        vec![
            sock(1, 0xf, libc::SOCK_RAW as u64)?,
            sock(1, 0xf, 10)?, // SOCK_PACKET (obsolete, still served)
            sock(0, u64::from(u32::MAX), libc::AF_PACKET as u64)?,
            // AF_VSOCK: talks to the hypervisor, not to anything we route.
            sock(0, u64::from(u32::MAX), 40)?,
        ],
    );
    let action = match mode {
        SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Kill => SeccompAction::KillProcess,
    };
    let deny = SeccompFilter::new(rules, SeccompAction::Allow, action, arch)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    let mut filters: Vec<seccompiler::BpfProgram> = vec![deny.try_into()?, clone3.try_into()?];
    if cfg!(target_arch = "x86_64") {
        filters.push(x32_filter(mode));
    }
    Ok(filters)
}

/// x86_64's x32 ABI numbers its system calls from 0x40000000 under the
/// same audit architecture, so the deny list's numbers would not match
/// them: refuse every x32 call (no app of ours uses that ABI, and most
/// kernels do not even build it).
fn x32_filter(mode: SeccompMode) -> seccompiler::BpfProgram {
    use seccompiler::sock_filter;
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
    const BPF_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_KILL_PROCESS: u32 = 0x8000_0000;
    let deny = match mode {
        SeccompMode::Errno => RET_ERRNO | libc::EPERM as u32,
        SeccompMode::Kill => RET_KILL_PROCESS,
    };
    vec![
        // seccomp_data.nr is at offset 0.
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: BPF_JGE_K,
            jt: 0,
            jf: 1,
            k: 0x4000_0000,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: deny,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        },
    ]
}

/// Empties the capability bounding set and the ambient set: nothing the
/// process executes can gain a capability back. Needs CAP_SETPCAP (in the
/// sandbox's user namespace), so it runs before the switch to the app's id.
pub fn drop_bounding_caps() -> io::Result<()> {
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            // Past the last capability this kernel knows.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clears the effective, permitted and inheritable capability sets.
pub fn clear_caps() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a valid v3 header and two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets each rlimit (soft = hard), never above the current hard limit:
/// raising one needs CAP_SYS_RESOURCE, which agents in containers often
/// lack, and a sandbox never needs more than its agent has.
pub fn set_rlimits(limits: &[Rlimit]) -> io::Result<()> {
    for l in limits {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit into a valid struct.
        if unsafe { libc::getrlimit(l.resource.raw(), &mut cur) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let value = l.value.min(cur.rlim_max);
        let r = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(l.resource.raw(), &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// no_new_privs, then the filters: nothing the app executes can gain
/// privileges, and seccomp without CAP_SYS_ADMIN requires no_new_privs.
pub fn lock_down(filters: &[seccompiler::BpfProgram]) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for f in filters {
        seccompiler::apply_filter(f).map_err(io::Error::other)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost(BTreeMap<PathBuf, HostKind>);

    impl HostFs for FakeHost {
        fn kind(&self, path: &Path) -> Option<HostKind> {
            self.0.get(path).cloned()
        }
    }

    fn debian_host() -> FakeHost {
        let mut m = BTreeMap::new();
        for d in [
            "/usr",
            "/etc/ssl",
            "/etc/alternatives",
            "/app/v1",
            "/opt/py",
        ] {
            m.insert(PathBuf::from(d), HostKind::Dir);
        }
        for f in ["/etc/passwd", "/dev/null", "/dev/zero", "/dev/urandom"] {
            m.insert(PathBuf::from(f), HostKind::File);
        }
        m.insert(
            "/bin".into(),
            HostKind::Symlink {
                contents: "usr/bin".into(),
                resolved: "/usr/bin".into(),
            },
        );
        m.insert(
            "/etc/resolv.conf".into(),
            HostKind::Symlink {
                contents: "/run/systemd/resolve/stub-resolv.conf".into(),
                resolved: "/run/systemd/resolve/stub-resolv.conf".into(),
            },
        );
        FakeHost(m)
    }

    fn conf() -> Confinement {
        Confinement {
            ro_paths: [
                "/usr",
                "/bin",
                "/lib64",
                "/etc/ssl",
                "/etc/passwd",
                "/etc/resolv.conf",
            ]
            .iter()
            .map(PathBuf::from)
            .collect(),
            ..Confinement::default()
        }
    }

    #[test]
    fn plans_a_root_of_read_only_binds() {
        let ops = plan_root(
            &conf(),
            Path::new("/app/v1"),
            Path::new("/stage"),
            7,
            &debian_host(),
        );
        let binds: Vec<(String, String, bool)> = ops
            .iter()
            .filter_map(|o| match o {
                MountOp::Bind {
                    source,
                    target,
                    readonly,
                    ..
                } => Some((
                    source.display().to_string(),
                    target.display().to_string(),
                    *readonly,
                )),
                _ => None,
            })
            .collect();
        assert!(binds.contains(&("/usr".into(), "/stage/usr".into(), true)));
        assert!(binds.contains(&("/app/v1".into(), "/stage/app/v1".into(), true)));
        assert!(binds.contains(&("/etc/passwd".into(), "/stage/etc/passwd".into(), true)));
        // A link to something not bound is replaced by what it points to.
        assert!(binds.contains(&(
            "/run/systemd/resolve/stub-resolv.conf".into(),
            "/stage/etc/resolv.conf".into(),
            true
        )));
        assert!(binds.contains(&("/dev/null".into(), "/stage/dev/null".into(), false)));
        // Missing on the host: skipped (lib64, /dev/full).
        assert!(!binds
            .iter()
            .any(|b| b.0.contains("lib64") || b.0.contains("full")));
        // Nothing writable is bound from the host but devices.
        assert!(binds.iter().all(|b| b.2 || b.0.starts_with("/dev/")));
        // /bin -> usr/bin stays a link, as /usr is bound.
        assert!(ops.contains(&MountOp::Symlink {
            contents: "usr/bin".into(),
            target: "/stage/bin".into()
        }));
        // The first op is the root tmpfs; /tmp and the data dir are tmpfs
        // with their quotas, the data dir owned by the sandbox's host id.
        assert!(matches!(&ops[0], MountOp::Tmpfs { target, .. } if target == Path::new("/stage")));
        assert!(ops.contains(&MountOp::Tmpfs {
            target: "/stage/tmp".into(),
            options: "size=64m,mode=1777".into(),
            noexec: false
        }));
        assert!(ops.contains(&MountOp::Tmpfs {
            target: "/stage/data".into(),
            options: "size=256m,mode=0700,uid=7,gid=7".into(),
            noexec: false
        }));
        // Never the host's /etc as a whole (shadow, sudoers...).
        assert!(!binds
            .iter()
            .any(|b| b.0 == "/etc" || b.0.ends_with("shadow")));
    }

    #[test]
    fn an_app_below_tmp_is_bound_after_the_tmp_tmpfs() {
        let mut host = debian_host();
        host.0.insert("/tmp/app".into(), HostKind::Dir);
        let ops = plan_root(&conf(), Path::new("/tmp/app"), Path::new("/s"), 7, &host);
        let tmp = ops
            .iter()
            .position(
                |o| matches!(o, MountOp::Tmpfs { target, .. } if target == Path::new("/s/tmp")),
            )
            .unwrap();
        let app = ops
            .iter()
            .position(
                |o| matches!(o, MountOp::Bind { target, .. } if target == Path::new("/s/tmp/app")),
            )
            .unwrap();
        assert!(tmp < app);
    }

    #[derive(Default)]
    struct Recorder(Vec<String>, Option<&'static str>);

    impl MountSys for Recorder {
        fn tmpfs(&mut self, t: &Path, o: &str, _: bool) -> io::Result<()> {
            self.0.push(format!("tmpfs {} {o}", t.display()));
            Ok(())
        }
        fn mkmountpoint(&mut self, t: &Path, file: bool) -> io::Result<()> {
            self.0.push(format!("mk {} {file}", t.display()));
            Ok(())
        }
        fn bind(&mut self, s: &Path, t: &Path) -> io::Result<()> {
            if self.1 == Some("bind") {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            self.0.push(format!("bind {} {}", s.display(), t.display()));
            Ok(())
        }
        fn remount(&mut self, t: &Path, ro: bool, _: bool) -> io::Result<()> {
            self.0.push(format!("remount {} ro={ro}", t.display()));
            Ok(())
        }
        fn symlink(&mut self, c: &Path, t: &Path) -> io::Result<()> {
            self.0.push(format!("ln {} {}", c.display(), t.display()));
            Ok(())
        }
    }

    #[test]
    fn apply_runs_the_plan_in_order_and_names_the_failing_step() {
        let ops = plan_root(
            &conf(),
            Path::new("/app/v1"),
            Path::new("/stage"),
            7,
            &debian_host(),
        );
        let mut rec = Recorder::default();
        apply(&ops, &mut rec).unwrap();
        let usr = rec
            .0
            .iter()
            .position(|l| l == "bind /usr /stage/usr")
            .unwrap();
        assert_eq!(rec.0[usr + 1], "remount /stage/usr ro=true");
        assert_eq!(rec.0[0], "mk /stage false");
        assert_eq!(rec.0[1], "tmpfs /stage size=1m,mode=0755");
        let mut failing = Recorder(Vec::new(), Some("bind"));
        let (step, err) = apply(&ops, &mut failing).unwrap_err();
        assert!(
            step.starts_with("bind-mounting /dev/null on /stage/dev/null"),
            "{step}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn path_keeps_only_what_the_sandbox_has() {
        let mut c = conf();
        c.path_prefix = vec!["/opt/py/bin".into()];
        c.ro_paths.push("/opt/py".into());
        let p = sandbox_path(
            &c,
            Path::new("/app/v1"),
            "/root/.cargo/bin:/root/.pyenv/shims:/usr/local/bin:/usr/bin:/bin:/app/v1/bin:/usr/bin",
        );
        assert_eq!(p, "/app/v1/bin:/opt/py/bin:/usr/local/bin:/usr/bin:/bin");
    }

    #[test]
    fn host_ids_are_stable_and_spread() {
        let c = Confinement::default();
        assert_eq!(c.host_id("a"), c.host_id("a"));
        assert_ne!(c.host_id("a"), c.host_id("b"));
        for id in ["x", "inst-1", &"z".repeat(128)] {
            let h = c.host_id(id);
            assert!(h >= c.host_id_base && h < c.host_id_base + c.host_id_range);
        }
    }

    #[test]
    fn seccomp_filters_compile_in_both_modes() {
        for mode in [SeccompMode::Errno, SeccompMode::Kill] {
            let f = seccomp_filters(mode).unwrap();
            assert_eq!(f.len(), if cfg!(target_arch = "x86_64") { 3 } else { 2 });
            assert!(!f[0].is_empty());
        }
        let names: Vec<&str> = DENIED_SYSCALLS.iter().map(|(n, _)| *n).collect();
        for must in [
            "mount",
            "ptrace",
            "bpf",
            "init_module",
            "kexec_load",
            "setns",
        ] {
            assert!(names.contains(&must), "{must}");
        }
    }
}
