//! cgroup detection (v1 or v2) and the per-sandbox cgroups.
//!
//! Hosts differ: some run the unified v2 hierarchy at `/sys/fs/cgroup`, others
//! mount one v1 hierarchy per controller under `/sys/fs/cgroup/<controller>`.
//! We pick v2 when `/sys/fs/cgroup/cgroup.controllers` lists `memory`, v1
//! otherwise. Sandboxes' cgroups are created under `<agent's own cgroup>/stead`
//! by default, so that whatever limits the operator put on the agent's cgroup
//! also bound its sandboxes (hierarchical accounting), and so that several
//! agents on one host do not collide.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::SandboxError;

/// Where cgroupfs is mounted on every host we support.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Directory (under the agent's own cgroup) holding one cgroup per sandbox.
const STEAD_DIR: &str = "stead";
/// On v2, the leaf the agent's own processes move to when its cgroup must
/// delegate controllers (the "no internal processes" rule).
const AGENT_LEAF: &str = "stead-agent";

/// Which cgroup hierarchy the host uses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// One hierarchy per controller (`/sys/fs/cgroup/memory`, `.../pids`).
    V1,
    /// The unified hierarchy (`/sys/fs/cgroup` with `cgroup.controllers`).
    V2,
}

/// The cgroup directories of one sandbox. Persisted with the sandbox so that
/// a restarted agent finds them again even if its own cgroup moved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CgroupPaths {
    pub version: CgroupVersion,
    /// The sandbox's memory cgroup; on v2 its one and only cgroup.
    pub memory: PathBuf,
    /// v1 only: the sandbox's cgroup in the pids hierarchy, when the host has
    /// that controller. Always `None` on v2.
    #[serde(default)]
    pub pids: Option<PathBuf>,
    /// v1 only: the sandbox's cgroup in the cpu hierarchy (CPU quota), when
    /// the host has that controller mounted on its own (when it is mounted
    /// with memory or pids, that directory already is one of the above).
    #[serde(default)]
    pub cpu: Option<PathBuf>,
}

/// The agent-wide parent directories new sandbox cgroups are created in.
#[derive(Clone, Debug)]
pub(crate) struct CgroupLayout {
    pub(crate) version: CgroupVersion,
    /// v2: the parent of every sandbox cgroup. v1: the parent in the memory
    /// hierarchy.
    memory_parent: PathBuf,
    /// v1 only: the parent in the pids hierarchy (if mounted).
    pids_parent: Option<PathBuf>,
    /// v1 only: the parent in the cpu hierarchy (if mounted).
    cpu_parent: Option<PathBuf>,
    /// Whether sandboxes can get a CPU quota here.
    pub(crate) cpu_quota: bool,
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcCgroupEntry {
    pub hierarchy: u32,
    pub controllers: Vec<String>,
    pub path: String,
}

/// A cgroup v1 hierarchy mount, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cgroup1Mount {
    /// The cgroup path of the hierarchy that is mounted (not always `/`:
    /// containers often mount their own sub-tree).
    pub root: String,
    pub mount_point: PathBuf,
    /// The mount's super options: controllers plus flags like `rw`.
    pub options: Vec<String>,
}

impl Cgroup1Mount {
    fn has(&self, controller: &str) -> bool {
        self.options.iter().any(|o| o == controller)
    }
}

/// Parses `/proc/<pid>/cgroup`.
pub(crate) fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroupEntry> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            let path = parts.next()?.to_owned();
            Some(ProcCgroupEntry {
                hierarchy,
                controllers,
                path,
            })
        })
        .collect()
}

/// Does a `cgroup.controllers` / `cgroup.subtree_control` file list `name`?
pub(crate) fn lists_controller(text: &str, name: &str) -> bool {
    text.split_whitespace().any(|c| c == name)
}

/// Undoes mountinfo's octal escaping of spaces, tabs, newlines, backslashes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the cgroup v1 hierarchies in `/proc/self/mountinfo`.
pub(crate) fn parse_cgroup1_mounts(mountinfo: &str) -> Vec<Cgroup1Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            if *fields.get(sep + 1)? != "cgroup" {
                return None;
            }
            Some(Cgroup1Mount {
                root: unescape_mountinfo(fields.get(3)?),
                mount_point: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
                options: fields.get(sep + 3)?.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// The directory of cgroup `path` inside a v1 hierarchy mounted at `mount`.
pub(crate) fn v1_dir(mount: &Cgroup1Mount, path: &str) -> PathBuf {
    let root = mount.root.trim_end_matches('/');
    let rel = path.strip_prefix(root).unwrap_or(path);
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rel)
    }
}

/// Reads one `key value` line of a flat-keyed cgroup file (memory.events,
/// memory.oom_control).
pub(crate) fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next()? == key).then_some(())?;
        it.next()?.parse().ok()
    })
}

fn setup_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SandboxError + 'a {
    move |source| SandboxError::CgroupSetup {
        op,
        path: path.to_owned(),
        source,
    }
}

fn read_pids(dir: &Path) -> io::Result<Vec<i32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Writes a cgroup control file. They must be opened without O_CREAT/O_TRUNC
/// semantics mattering; `write` is one syscall for these short values, which
/// is what cgroupfs expects.
fn write_control(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

impl CgroupLayout {
    /// Detects the hierarchy and prepares the parent directory sandboxes go
    /// in. `parent_override` is a cgroup path (e.g. `/stead`) used instead of
    /// `<agent's own cgroup>/stead`.
    pub(crate) fn detect(parent_override: Option<&str>) -> Result<Self, SandboxError> {
        let proc_path = Path::new("/proc/self/cgroup");
        let own = parse_proc_cgroup(
            &fs::read_to_string(proc_path).map_err(setup_err("reading", proc_path))?,
        );
        let root = Path::new(CGROUP_ROOT);
        let controllers = root.join("cgroup.controllers");
        if let Ok(text) = fs::read_to_string(&controllers) {
            if lists_controller(&text, "memory") {
                return Self::prepare_v2(root, &own, parent_override);
            }
        }
        let mi_path = Path::new("/proc/self/mountinfo");
        let mounts = parse_cgroup1_mounts(
            &fs::read_to_string(mi_path).map_err(setup_err("reading", mi_path))?,
        );
        Self::prepare_v1(&mounts, &own, parent_override)
    }

    fn prepare_v1(
        mounts: &[Cgroup1Mount],
        own: &[ProcCgroupEntry],
        parent_override: Option<&str>,
    ) -> Result<Self, SandboxError> {
        let parent_in = |controller: &str| -> Option<PathBuf> {
            let mount = mounts.iter().find(|m| m.has(controller))?;
            Some(match parent_override {
                Some(p) => v1_dir(mount, &mount.root).join(p.trim_start_matches('/')),
                None => {
                    let own_path = own
                        .iter()
                        .find(|e| e.controllers.iter().any(|c| c == controller))
                        .map(|e| e.path.as_str())
                        .unwrap_or("/");
                    v1_dir(mount, own_path).join(STEAD_DIR)
                }
            })
        };
        let memory_parent = parent_in("memory").ok_or_else(|| SandboxError::CgroupUnavailable {
            reason: format!(
                "{CGROUP_ROOT}/cgroup.controllers does not list memory (no cgroup v2) \
                 and no cgroup v1 memory hierarchy is mounted"
            ),
        })?;
        let pids_parent = parent_in("pids");
        if pids_parent.is_none() {
            tracing::warn!("no cgroup v1 pids hierarchy is mounted: sandboxes get no pids limit");
        }
        let cpu_parent = parent_in("cpu");
        if cpu_parent.is_none() {
            tracing::warn!("no cgroup v1 cpu hierarchy is mounted: sandboxes get no CPU quota");
        }
        let cpu_quota = cpu_parent.is_some();
        // One directory per hierarchy: skip cpu when it shares one.
        let cpu_parent =
            cpu_parent.filter(|c| c != &memory_parent && Some(c) != pids_parent.as_ref());
        for dir in std::iter::once(&memory_parent)
            .chain(pids_parent.as_ref())
            .chain(cpu_parent.as_ref())
        {
            fs::create_dir_all(dir).map_err(setup_err("creating", dir))?;
        }
        tracing::info!(memory = %memory_parent.display(), pids = ?pids_parent, cpu = ?cpu_parent, "using cgroup v1");
        Ok(CgroupLayout {
            version: CgroupVersion::V1,
            memory_parent,
            pids_parent,
            cpu_parent,
            cpu_quota,
        })
    }

    fn prepare_v2(
        root: &Path,
        own: &[ProcCgroupEntry],
        parent_override: Option<&str>,
    ) -> Result<Self, SandboxError> {
        let own_path = own
            .iter()
            .find(|e| e.hierarchy == 0 && e.controllers.is_empty())
            .map(|e| e.path.clone())
            .ok_or_else(|| SandboxError::CgroupUnavailable {
                reason: "/proc/self/cgroup has no cgroup v2 (0::) entry".into(),
            })?;
        let mut own_dir = root.join(own_path.trim_start_matches('/'));
        // After an earlier run moved the agent into its leaf (or systemd put
        // it there, with `DelegateSubgroup=stead-agent`), the cgroup to
        // delegate from is the leaf's parent: the same one as before.
        if own_dir.file_name().and_then(|n| n.to_str()) == Some(AGENT_LEAF) {
            if let Some(parent) = own_dir.parent() {
                own_dir = parent.to_path_buf();
            }
        }
        let parent = match parent_override {
            Some(p) => root.join(p.trim_start_matches('/')),
            None => own_dir.join(STEAD_DIR),
        };
        // Every cgroup from the root down to `parent` must delegate memory and
        // pids to its children, `parent` included (for the sandboxes).
        let rel = parent.strip_prefix(root).unwrap_or(Path::new(""));
        let mut dir = root.to_path_buf();
        let mut chain = vec![dir.clone()];
        for comp in rel.components() {
            dir.push(comp);
            chain.push(dir.clone());
        }
        let mut cpu_quota = true;
        for (i, d) in chain.iter().enumerate() {
            if i > 0 {
                match fs::create_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(setup_err("creating", d)(e)),
                }
            }
            Self::delegate_v2(d, *d == own_dir, &["memory", "pids"])?;
            // The CPU quota is worth having, not worth refusing to start.
            if cpu_quota {
                if let Err(e) = Self::delegate_v2(d, *d == own_dir, &["cpu"]) {
                    tracing::warn!(error = %e, "cannot delegate the cpu controller: sandboxes get no CPU quota");
                    cpu_quota = false;
                }
            }
        }
        tracing::info!(parent = %parent.display(), cpu_quota, "using cgroup v2");
        Ok(CgroupLayout {
            version: CgroupVersion::V2,
            memory_parent: parent,
            pids_parent: None,
            cpu_parent: None,
            cpu_quota,
        })
    }

    /// Makes `dir` delegate `controllers` to its children.
    fn delegate_v2(dir: &Path, is_own: bool, controllers: &[&str]) -> Result<(), SandboxError> {
        let control = dir.join("cgroup.subtree_control");
        for controller in controllers {
            let current = fs::read_to_string(&control).map_err(setup_err("reading", &control))?;
            if lists_controller(&current, controller) {
                continue;
            }
            match write_control(&control, &format!("+{controller}")) {
                Ok(()) => {}
                // "No internal processes": a non-root cgroup that has processes
                // cannot delegate (nor can the root of a container's cgroup
                // namespace, which is no real root). If that is the agent's own
                // cgroup, move its processes to a leaf (what systemd's
                // delegation docs prescribe).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && is_own => {
                    Self::move_processes_to_leaf(dir)?;
                    write_control(&control, &format!("+{controller}"))
                        .map_err(setup_err("enabling controllers in", &control))?;
                }
                Err(e) => return Err(setup_err("enabling controllers in", &control)(e)),
            }
        }
        Ok(())
    }

    fn move_processes_to_leaf(dir: &Path) -> Result<(), SandboxError> {
        let leaf = dir.join(AGENT_LEAF);
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(setup_err("creating", &leaf)(e)),
        }
        let procs = leaf.join("cgroup.procs");
        let pids = read_pids(dir).map_err(setup_err("reading processes of", dir))?;
        tracing::info!(
            from = %dir.display(),
            to = %leaf.display(),
            count = pids.len(),
            "moving the agent's cgroup's processes to a leaf so it can delegate controllers"
        );
        for pid in pids {
            match write_control(&procs, &pid.to_string()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(setup_err("moving a process into", &procs)(e)),
            }
        }
        Ok(())
    }

    /// The cgroup directories sandbox `id` gets.
    pub(crate) fn paths_for(&self, id: &str) -> CgroupPaths {
        CgroupPaths {
            version: self.version,
            memory: self.memory_parent.join(id),
            pids: self.pids_parent.as_ref().map(|p| p.join(id)),
            cpu: self.cpu_parent.as_ref().map(|p| p.join(id)),
        }
    }

    /// The parent directories, one per hierarchy (memory, then pids and cpu
    /// when they have their own).
    pub(crate) fn parents(&self) -> Vec<&Path> {
        std::iter::once(self.memory_parent.as_path())
            .chain(self.pids_parent.as_deref())
            .chain(self.cpu_parent.as_deref())
            .collect()
    }

    /// Creates cgroup(s) named `name` without limits: a spare's, whose
    /// limits are set when it becomes a sandbox, before anything of the
    /// sandbox runs.
    pub(crate) fn create_bare(&self, name: &str) -> Result<CgroupPaths, SandboxError> {
        let paths = self.paths_for(name);
        let mut created = Vec::new();
        if let Err(e) = paths.create_dirs(name, &mut created) {
            for dir in created {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
        Ok(paths)
    }

    /// Whether sandboxes get a CPU quota on this host.
    pub(crate) fn cpu_millis(&self, asked: Option<u64>) -> Option<u64> {
        asked.filter(|_| self.cpu_quota)
    }

    /// Creates sandbox `id`'s cgroup(s), fresh (a stale empty one left by a
    /// crash is removed first so that its OOM counters start at zero), with
    /// the memory and pids limits set. Swap is disabled where the kernel
    /// accounts it, so the memory limit is a real limit.
    pub(crate) fn create(
        &self,
        id: &str,
        memory_bytes: u64,
        pids_max: u64,
        cpu_millis: Option<u64>,
    ) -> Result<CgroupPaths, SandboxError> {
        let paths = self.paths_for(id);
        let mut created = Vec::new();
        let cpu = cpu_millis.filter(|_| self.cpu_quota);
        let result = paths
            .create_dirs(id, &mut created)
            .and_then(|()| paths.set_limits(id, memory_bytes, pids_max, cpu));
        if let Err(e) = result {
            for dir in created {
                if let Err(re) = fs::remove_dir(dir) {
                    tracing::warn!(sandbox = id, dir = %dir.display(), error = %re, "removing a half-created cgroup");
                }
            }
            return Err(e);
        }
        Ok(paths)
    }
}

impl CgroupPaths {
    /// Every directory of this sandbox's cgroup(s).
    pub(crate) fn dirs(&self) -> Vec<&Path> {
        std::iter::once(self.memory.as_path())
            .chain(self.pids.as_deref())
            .chain(self.cpu.as_deref())
            .collect()
    }

    fn cg_err(
        &self,
        id: &str,
        op: &'static str,
        path: &Path,
    ) -> impl FnOnce(io::Error) -> SandboxError {
        let id = id.to_owned();
        let path = path.to_owned();
        move |source| SandboxError::Cgroup {
            id,
            op,
            path,
            source,
        }
    }

    /// Creates the dirs, pushing each one made onto `created`. Fails without
    /// touching anything if a dir exists and has processes.
    fn create_dirs<'a>(
        &'a self,
        id: &str,
        created: &mut Vec<&'a Path>,
    ) -> Result<(), SandboxError> {
        for dir in self.dirs() {
            if dir.exists() {
                let pids = read_pids(dir).map_err(self.cg_err(id, "reading processes of", dir))?;
                if !pids.is_empty() {
                    return Err(SandboxError::CgroupBusy {
                        id: id.to_owned(),
                        path: dir.to_owned(),
                    });
                }
            }
        }
        for dir in self.dirs() {
            if dir.exists() {
                tracing::debug!(sandbox = id, dir = %dir.display(), "removing a stale cgroup");
                remove_dir_retrying(dir, 20).map_err(self.cg_err(id, "removing stale", dir))?;
            }
            fs::create_dir(dir).map_err(self.cg_err(id, "creating", dir))?;
            created.push(dir);
        }
        Ok(())
    }

    /// Renames these cgroup dirs to `target`'s (same parents: cgroup v1
    /// renames only within a parent, v2 not at all), first removing a stale
    /// empty `target` left by a crash; fails without renaming anything if
    /// one holds processes. On failure, what was renamed is renamed back.
    pub(crate) fn rename_to(&self, id: &str, target: &CgroupPaths) -> Result<(), SandboxError> {
        let pairs: Vec<(&Path, &Path)> = self.dirs().into_iter().zip(target.dirs()).collect();
        if pairs.len() != target.dirs().len() {
            return Err(SandboxError::InvalidSpec {
                id: id.to_owned(),
                reason: "a spare's cgroups do not match the sandbox's".into(),
            });
        }
        for (_, to) in &pairs {
            if to.exists() {
                let pids = read_pids(to).map_err(self.cg_err(id, "reading processes of", to))?;
                if !pids.is_empty() {
                    return Err(SandboxError::CgroupBusy {
                        id: id.to_owned(),
                        path: to.to_path_buf(),
                    });
                }
                remove_dir_retrying(to, 20).map_err(self.cg_err(id, "removing stale", to))?;
            }
        }
        for (i, (from, to)) in pairs.iter().enumerate() {
            if let Err(e) = fs::rename(from, to) {
                for (back_from, back_to) in pairs.iter().take(i) {
                    let _ = fs::rename(back_to, back_from);
                }
                return Err(self.cg_err(id, "renaming", from)(e));
            }
        }
        Ok(())
    }

    pub(crate) fn set_limits(
        &self,
        id: &str,
        memory_bytes: u64,
        pids_max: u64,
        cpu_millis: Option<u64>,
    ) -> Result<(), SandboxError> {
        let write = |file: PathBuf, value: String| -> Result<(), SandboxError> {
            write_control(&file, &value).map_err(self.cg_err(id, "writing", &file))
        };
        match self.version {
            CgroupVersion::V2 => {
                write(self.memory.join("memory.max"), memory_bytes.to_string())?;
                let swap = self.memory.join("memory.swap.max");
                if swap.exists() {
                    write(swap, "0".into())?;
                }
                write(self.memory.join("pids.max"), pids_max.to_string())?;
                if let Some(m) = cpu_millis {
                    let (quota, period) = cpu_quota(m);
                    write(self.memory.join("cpu.max"), format!("{quota} {period}"))?;
                }
            }
            CgroupVersion::V1 => {
                write(
                    self.memory.join("memory.limit_in_bytes"),
                    memory_bytes.to_string(),
                )?;
                // memory+swap limit = memory limit: no swapping past the limit.
                // Must come after memory.limit_in_bytes (memsw >= mem).
                let memsw = self.memory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(memsw, memory_bytes.to_string())?;
                }
                if let Some(pids) = &self.pids {
                    write(pids.join("pids.max"), pids_max.to_string())?;
                }
                if let Some(m) = cpu_millis {
                    // The cpu hierarchy's dir: its own, or shared with one
                    // of the others.
                    let dir = self
                        .dirs()
                        .into_iter()
                        .find(|d| d.join("cpu.cfs_quota_us").exists())
                        .map(Path::to_path_buf);
                    if let Some(dir) = dir {
                        let (quota, period) = cpu_quota(m);
                        write(dir.join("cpu.cfs_period_us"), period.to_string())?;
                        write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Opens each `cgroup.procs` for writing, so that the child can join by
    /// writing "0" between fork and exec (no allocation, no race: everything
    /// the sandbox init forks is already limited).
    pub(crate) fn open_procs_for_join(&self, id: &str) -> Result<Vec<File>, SandboxError> {
        self.dirs()
            .into_iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(self.cg_err(id, "opening", &path))
            })
            .collect()
    }

    /// Pids (in the agent's pid namespace) of every process in the sandbox.
    pub(crate) fn pids(&self) -> Vec<i32> {
        let mut all = BTreeSet::new();
        for dir in self.dirs() {
            if let Ok(p) = read_pids(dir) {
                all.extend(p);
            }
        }
        all.into_iter().collect()
    }

    /// SIGKILLs every process in the sandbox's cgroup. v2's `cgroup.kill`
    /// does it atomically; otherwise we kill what `cgroup.procs` lists, twice
    /// (a process forked between reading and killing is still inside the
    /// sandbox's pid namespace, which dies with its pid 1 anyway).
    pub(crate) fn kill_all(&self) -> io::Result<()> {
        if self.version == CgroupVersion::V2 {
            let kill = self.memory.join("cgroup.kill");
            match write_control(&kill, "1") {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    if !self.memory.exists() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        for _ in 0..2 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: plain kill(2); pid is a positive pid from cgroup.procs.
                if pid > 0 && unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ESRCH) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes the sandbox's cgroup dirs; true when none is left. A dir that
    /// still holds (dying) processes is left for a later attempt.
    pub(crate) fn try_remove(&self) -> bool {
        let mut all_gone = true;
        for dir in self.dirs() {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    if e.raw_os_error() != Some(libc::EBUSY) {
                        tracing::warn!(dir = %dir.display(), error = %e, "removing a sandbox cgroup");
                    }
                    all_gone = false;
                }
            }
        }
        all_gone
    }

    /// Kills what is left and removes the cgroup, retrying for a while:
    /// processes that were just killed stay in the cgroup until fully gone.
    pub(crate) async fn remove(&self, id: &str) {
        for attempt in 0..200u32 {
            if self.try_remove() {
                return;
            }
            if let Err(e) = self.kill_all() {
                tracing::warn!(sandbox = id, error = %e, "killing leftover processes");
            }
            tokio::time::sleep(Duration::from_millis(if attempt < 20 { 1 } else { 10 })).await;
        }
        tracing::warn!(sandbox = id, dirs = ?self.dirs(), "could not remove the sandbox's cgroup");
    }

    /// Removes the cgroup of a sandbox that is gone, unless processes are
    /// still in it (then they are left alone: this never kills). Retries
    /// for ~50 ms while exiting tasks leave.
    pub(crate) fn remove_if_empty(&self, id: &str) {
        for _ in 0..50 {
            if self.try_remove() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::warn!(sandbox = id, dirs = ?self.dirs(), "left a sandbox cgroup that still has processes");
    }

    /// How many processes the kernel's OOM killer killed in this cgroup.
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V2 => keyed_value(
                &fs::read_to_string(self.memory.join("memory.events")).ok()?,
                "oom_kill",
            ),
            CgroupVersion::V1 => keyed_value(
                &fs::read_to_string(self.memory.join("memory.oom_control")).ok()?,
                "oom_kill",
            ),
        }
    }

    /// v1 kernels older than 4.13 have no `oom_kill` counter: the failure
    /// count (times the limit was hit) is the best hint we have there.
    pub(crate) fn memory_failcnt(&self) -> Option<u64> {
        if self.version != CgroupVersion::V1 {
            return None;
        }
        fs::read_to_string(self.memory.join("memory.failcnt"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Current memory charged to the sandbox.
    pub(crate) fn memory_usage(&self) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V2 => "memory.current",
            CgroupVersion::V1 => "memory.usage_in_bytes",
        };
        fs::read_to_string(self.memory.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// CFS quota and period (µs) for `millis` thousandths of a CPU: a 100 ms
/// period, the kernel's default.
pub(crate) fn cpu_quota(millis: u64) -> (u64, u64) {
    let period = 100_000;
    // The kernel refuses quotas under 1 ms.
    (millis.saturating_mul(100).max(1000), period)
}

fn remove_dir_retrying(dir: &Path, attempts: u32) -> io::Result<()> {
    let mut last = None;
    for _ in 0..attempts {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(ErrorKind::ResourceBusy)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_PROC: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/x\n0::/\n";
    const V2_PROC: &str = "0::/system.slice/stead-agent.service\n";

    #[test]
    fn parses_proc_cgroup_v1() {
        let e = parse_proc_cgroup(V1_PROC);
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].controllers, vec!["name=systemd"]);
        assert_eq!(e[2].path, "/process_api/abc");
        assert_eq!(e[3].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(e[4].hierarchy, 0);
        assert!(e[4].controllers.is_empty());
    }

    #[test]
    fn parses_proc_cgroup_v2_and_colons_in_paths() {
        let e = parse_proc_cgroup(V2_PROC);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "/system.slice/stead-agent.service");
        let e = parse_proc_cgroup("0::/a:b\n");
        assert_eq!(e[0].path, "/a:b");
    }

    #[test]
    fn controller_lists() {
        assert!(lists_controller(
            "cpuset cpu io memory hugetlb pids rdma\n",
            "memory"
        ));
        assert!(!lists_controller("cpuset cpu io hugetlb pids\n", "memory"));
        assert!(!lists_controller("", "memory"));
        assert!(!lists_controller("memory_recursiveprot", "memory"));
    }

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 /docker/abc /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 31 0:39 / /mnt/with\\040space rw - cgroup cgroup rw,freezer
";

    #[test]
    fn parses_v1_mounts() {
        let m = parse_cgroup1_mounts(MOUNTINFO);
        assert_eq!(m.len(), 5, "{m:?}");
        assert!(m[0].has("cpu") && m[0].has("cpuacct"));
        assert_eq!(m[1].mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert!(m[1].has("memory"));
        assert_eq!(m[2].root, "/docker/abc");
        assert_eq!(m[4].mount_point, PathBuf::from("/mnt/with space"));
        assert!(!m.iter().any(|m| m.mount_point.ends_with("unified")));
    }

    #[test]
    fn v1_dirs_are_relative_to_the_mount_root() {
        let m = parse_cgroup1_mounts(MOUNTINFO);
        assert_eq!(
            v1_dir(&m[1], "/process_api/abc"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(v1_dir(&m[1], "/"), PathBuf::from("/sys/fs/cgroup/memory"));
        // A container sees its own sub-tree mounted at the mount point.
        assert_eq!(
            v1_dir(&m[2], "/docker/abc"),
            PathBuf::from("/sys/fs/cgroup/pids")
        );
        assert_eq!(
            v1_dir(&m[2], "/docker/abc/x"),
            PathBuf::from("/sys/fs/cgroup/pids/x")
        );
    }

    #[test]
    fn keyed_values() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(v1, "oom_kill"), Some(3));
        assert_eq!(keyed_value(v1, "under_oom"), Some(0));
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(v2, "oom_kill"), Some(1));
        assert_eq!(keyed_value(v2, "oom"), Some(1));
        assert_eq!(keyed_value("oom_kill_disable 0\n", "oom_kill"), None);
    }

    #[test]
    fn paths_for_ids() {
        let layout = CgroupLayout {
            version: CgroupVersion::V1,
            memory_parent: "/sys/fs/cgroup/memory/stead".into(),
            pids_parent: Some("/sys/fs/cgroup/pids/stead".into()),
            cpu_parent: Some("/sys/fs/cgroup/cpu/stead".into()),
            cpu_quota: true,
        };
        let p = layout.paths_for("inst-1");
        assert_eq!(p.dirs().len(), 3);
        assert_eq!(
            p.cpu,
            Some(PathBuf::from("/sys/fs/cgroup/cpu/stead/inst-1"))
        );
        assert_eq!(cpu_quota(500), (50_000, 100_000));
        assert_eq!(cpu_quota(2000), (200_000, 100_000));
        assert_eq!(cpu_quota(1), (1000, 100_000));
        assert_eq!(
            p.memory,
            PathBuf::from("/sys/fs/cgroup/memory/stead/inst-1")
        );
        let json = serde_json::to_string(&p).unwrap();
        let back: CgroupPaths = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }

    /// A fake v2 tree (plain files): path computation, and what gets written
    /// into a sandbox's cgroup. (The real v2 kernel interface is exercised
    /// by the integration tests on v2 hosts.)
    #[test]
    fn v2_layout_on_a_fake_tree() {
        // (subtree_control lists cpu already, so delegation writes nothing.)
        let root = tempfile::tempdir().unwrap();
        let own = "/system.slice/stead.service";
        let own_dir = root.path().join(own.trim_start_matches('/'));
        fs::create_dir_all(&own_dir).unwrap();
        for d in [root.path(), own_dir.parent().unwrap(), own_dir.as_path()] {
            fs::write(d.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        }
        // Already moved into the leaf by an earlier run.
        let entries = parse_proc_cgroup(&format!("0::{own}/{AGENT_LEAF}\n"));
        // `stead` will be created; pretend the kernel fills it in.
        let stead = own_dir.join(STEAD_DIR);
        fs::create_dir(&stead).unwrap();
        fs::write(stead.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        let layout = CgroupLayout::prepare_v2(root.path(), &entries, None).unwrap();
        assert_eq!(layout.version, CgroupVersion::V2);
        assert_eq!(layout.memory_parent, stead);

        fs::create_dir(stead.join("inst")).unwrap();
        fs::write(stead.join("inst").join("cgroup.procs"), "").unwrap();
        fs::write(stead.join("inst").join("memory.swap.max"), "max").unwrap();
        let paths = layout.paths_for("inst");
        assert_eq!(paths.pids, None);
        paths.set_limits("inst", 64 << 20, 100, Some(500)).unwrap();
        let read = |f: &str| fs::read_to_string(stead.join("inst").join(f)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "100");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(paths.dirs(), vec![stead.join("inst").as_path()]);

        // An explicit parent is taken from the hierarchy root.
        let alt = root.path().join("stead-sandboxes");
        fs::create_dir(&alt).unwrap();
        fs::write(alt.join("cgroup.subtree_control"), "cpu memory pids").unwrap();
        let layout =
            CgroupLayout::prepare_v2(root.path(), &entries, Some("/stead-sandboxes")).unwrap();
        assert_eq!(layout.memory_parent, alt);
    }
}
