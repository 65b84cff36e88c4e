//! The `gvisor` backend: the app runs under gVisor's `runsc` (a kernel in
//! user space, `--platform=ptrace`), so the host kernel only ever sees
//! gVisor's few system calls, never the app's.
//!
//! It is built on the process backend rather than beside it: a gVisor
//! sandbox is a process sandbox (own cgroup with the memory, CPU and pids
//! limits, own pid, mount, uts, ipc and network namespaces, adoption after
//! an agent restart, exit and OOM reporting) whose command is a small
//! supervisor script that runs `runsc run` (in a session of its own) on an OCI bundle
//! generated from the spec (with `--ignore-cgroups`: gVisor's processes
//! stay in the sandbox's cgroup, whose limits bound the whole gVisor
//! sandbox, the app's memory being the sentry's). `runsc --network=host` then uses the network
//! namespace it was started in, which has only `lo`: the app's port is
//! reached with [`crate::SandboxProcess::connect`] exactly as with the
//! process backend, and a database exposed with `listen` is on its
//! 127.0.0.1. Signals the agent sends (SIGTERM to stop) are turned into
//! `runsc kill` by the script; the container's exit status becomes the
//! script's.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::backend::{BoxFuture, Sandbox};
use crate::confine::{self, Confinement, DATA_DIR};
use crate::error::SandboxError;
use crate::process::{Persisted, ProcessSandbox, SandboxProcess};
use crate::spec::{Backend, NetworkMode, SandboxSpec};

/// Where bundles and runsc's state live.
pub const GVISOR_DIR: &str = "/run/stead-sandbox/gvisor";

/// The gVisor backend (see the module docs).
#[derive(Debug)]
pub struct GvisorSandbox {
    process: ProcessSandbox,
    runsc: PathBuf,
    dir: PathBuf,
    /// The read-only host paths and limits of the bundle's root.
    confinement: Confinement,
}

/// Finds `runsc` on PATH (or the usual places).
pub fn find_runsc() -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .chain(["/usr/bin", "/usr/local/bin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join("runsc"))
        .find(|p| p.is_file())
}

impl GvisorSandbox {
    /// Available when `runsc` is installed and answers `--version`.
    pub fn detect(init_exe: PathBuf) -> Result<Self, SandboxError> {
        let unavailable = |reason: String| SandboxError::BackendUnavailable {
            id: format!("- ({reason})"),
            backend: Backend::Gvisor,
        };
        let runsc = find_runsc().ok_or_else(|| unavailable("runsc is not installed".into()))?;
        let ok = std::process::Command::new(&runsc)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(unavailable(format!("{} --version failed", runsc.display())));
        }
        let dir = PathBuf::from(GVISOR_DIR);
        std::fs::create_dir_all(dir.join("state")).map_err(|source| SandboxError::Io {
            id: "-".into(),
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        Ok(GvisorSandbox {
            process: ProcessSandbox::new(init_exe)?,
            runsc,
            dir,
            confinement: Confinement::detect(),
        })
    }

    /// See [`ProcessSandbox::with_net_config`].
    pub fn with_net_config(mut self, net: crate::netconf::NetConfig) -> Self {
        self.process = self.process.with_net_config(net);
        self
    }

    /// Keeps a spare sandbox ready for the process sandbox each gVisor
    /// sandbox runs in.
    pub fn keep_spare(mut self) -> Self {
        self.process = self.process.keep_spare();
        self
    }

    /// See [`ProcessSandbox::release_spares`].
    pub fn release_spares(&self) {
        self.process.release_spares();
    }

    pub fn runsc(&self) -> &Path {
        &self.runsc
    }

    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.dir.join("bundles").join(id)
    }

    async fn spawn_gvisor(&self, spec: SandboxSpec) -> Result<SandboxProcess, SandboxError> {
        spec.validate()?;
        if spec.network == NetworkMode::Host {
            return Err(SandboxError::InvalidSpec {
                id: spec.id.clone(),
                reason: "the gvisor backend runs instances, which never share the host network"
                    .into(),
            });
        }
        let mut conf = spec
            .confine
            .clone()
            .unwrap_or_else(|| self.confinement.clone());
        // tmpfs pages are the sentry's memory: a full /tmp or data
        // directory must leave room for the app and gVisor itself (some
        // 40 MiB), or filling it would OOM-kill the sandbox rather than
        // fail with ENOSPC.
        let quarter = (spec.memory_mb / 4).max(1);
        conf.tmp_mb = conf.tmp_mb.min(quarter);
        if conf.data_dir.is_none() {
            conf.data_mb = conf.data_mb.min(quarter);
        }
        if let Some(dir) = conf.data_dir.clone() {
            let (host_id, mb) = (conf.host_id(&spec.id), conf.data_mb);
            tokio::task::spawn_blocking(move || crate::datadir::prepare(&dir, mb, host_id))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r)
                .map_err(|source| SandboxError::Io {
                    id: spec.id.clone(),
                    what: "preparing the data directory",
                    path: conf.data_dir.clone().unwrap_or_default(),
                    source,
                })?;
        }
        let bundle = self.bundle_dir(&spec.id);
        let config = oci_config(&spec, &conf, &RealPaths);
        let io_err = |what: &'static str, path: &Path| {
            let (id, path) = (spec.id.clone(), path.to_owned());
            move |source| SandboxError::Io {
                id,
                what,
                path,
                source,
            }
        };
        let rootfs = bundle.join("rootfs");
        tokio::fs::create_dir_all(&rootfs)
            .await
            .map_err(io_err("creating", &rootfs))?;
        let cfg_path = bundle.join("config.json");
        let bytes = serde_json::to_vec_pretty(&config)
            .map_err(std::io::Error::other)
            .map_err(io_err("serializing", &cfg_path))?;
        tokio::fs::write(&cfg_path, bytes)
            .await
            .map_err(io_err("writing", &cfg_path))?;
        let script = supervisor_script(&self.runsc, &self.dir.join("state"), &bundle, &spec.id);
        let outer = SandboxSpec {
            command: script,
            // runsc needs root on the host to build its sandbox: gVisor
            // itself is the confinement here.
            confine: None,
            cwd: "/".into(),
            env: [("PATH".to_owned(), crate::DEFAULT_PATH.to_owned())].into(),
            pids_max: gvisor_host_pids(&spec),
            backend: Backend::Gvisor,
            ..spec
        };
        let result = self.process.spawn(outer).await;
        match &result {
            Ok(p) => self.clean_up_after(p),
            Err(_) => {
                let _ = tokio::fs::remove_dir_all(&bundle).await;
            }
        }
        result
    }

    /// Once the sandbox has exited, removes what its script would have
    /// removed had it not been killed (SIGKILL after the grace period, an
    /// OOM kill of the whole sandbox): the bundle and runsc's record of the
    /// container.
    fn clean_up_after(&self, p: &SandboxProcess) {
        let mut exit = p.exit_watch();
        let (id, bundle) = (p.id().to_owned(), self.bundle_dir(p.id()));
        let state = self.dir.join("state");
        let runsc = self.runsc.clone();
        tokio::spawn(async move {
            let _ = exit.wait_for(Option::is_some).await;
            let state_file = state.join(format!("{id}_sandbox:{id}.state"));
            if tokio::fs::metadata(&state_file).await.is_ok() {
                let delete = tokio::process::Command::new(&runsc)
                    .arg("--root")
                    .arg(&state)
                    .args(["delete", "-force", &id])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status();
                if tokio::time::timeout(std::time::Duration::from_secs(30), delete)
                    .await
                    .is_err()
                {
                    tracing::warn!(sandbox = %id, "runsc delete did not finish");
                }
            }
            let _ = tokio::fs::remove_dir_all(&bundle).await;
            let mut status = bundle.into_os_string();
            status.push(".status");
            let _ = tokio::fs::remove_file(&status).await;
        });
    }
}

impl Sandbox for GvisorSandbox {
    fn backend(&self) -> Backend {
        Backend::Gvisor
    }
    fn spawn(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxProcess, SandboxError>> {
        Box::pin(self.spawn_gvisor(spec))
    }
    fn adopt(&self, persisted: &Persisted) -> Result<Option<SandboxProcess>, SandboxError> {
        let adopted = self.process.adopt(persisted)?;
        if let Some(p) = &adopted {
            self.clean_up_after(p);
        }
        Ok(adopted)
    }
}

/// Quotes for `sh`: single quotes, with embedded ones spliced in.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The script the process sandbox runs: run the container, turn the
/// signals pid 1 forwards into `runsc kill`, wait for it (again after each
/// signal) and exit with its status; remove the container and the bundle
/// at the end.
pub(crate) fn supervisor_script(runsc: &Path, state: &Path, bundle: &Path, id: &str) -> String {
    // Sandbox ids are ASCII letters, digits, '-', '_' and '.' (validated),
    // so quoting them is belt and braces.
    // A container of this id left by a crash (its state file exists) is
    // removed first, and one `runsc run` could not remove (it was killed)
    // at the end; tested with a file test, as each runsc invocation costs
    // tens of milliseconds.
    let state_file = sh_quote(&format!("{}/{id}_sandbox:{id}.state", state.display()));
    let id = sh_quote(id);
    let cleanup = format!("if [ -e {state_file} ]; then r delete -force {id} >/dev/null 2>&1; fi");
    let b = sh_quote(&bundle.display().to_string());
    let status = sh_quote(&format!("{}.status", bundle.display()));
    let runsc = sh_quote(&runsc.display().to_string());
    let state = sh_quote(&state.display().to_string());
    let flags = "--platform=ptrace --network=host --ignore-cgroups --oci-seccomp";
    let mut s = format!("r() {{ {runsc} --root {state} {flags} \"$@\"; }}\n");
    s.push_str(&format!("{cleanup}\nrm -f {status}\n"));
    // `runsc run` is the only way to get the exit status of a container
    // that may exit at once (`runsc wait` loses it when the sandbox is
    // gone first). It runs in a session of its own, so the signals pid 1
    // forwards to our process group do not kill it: the traps turn them
    // into `runsc kill`.
    s.push_str(&format!(
        "setsid sh -c '\"$0\" --root \"$1\" {flags} run --bundle \"$2\" \"$3\"; echo $? > \"$4\"' \
         {runsc} {state} {b} {id} {status} &\n\
         w=$!\n"
    ));
    for sig in ["TERM", "INT", "HUP", "QUIT", "USR1", "USR2"] {
        s.push_str(&format!(
            "trap \"r kill {id} {sig} >/dev/null 2>&1\" {sig}\n"
        ));
    }
    s.push_str(&format!(
        "while kill -0 $w 2>/dev/null; do wait $w; done\n\
         st=$(cat {status} 2>/dev/null)\n\
         {cleanup}\n\
         rm -rf {b} {status}\n\
         exit \"${{st:-1}}\"\n"
    ));
    s
}

/// The container's argv: a command without shell syntax directly (a shell
/// costs milliseconds under gVisor), anything else through `/bin/sh -c`.
pub(crate) fn oci_args(spec: &SandboxSpec) -> Vec<String> {
    match crate::init::simple_words(&spec.command) {
        Some(words) => words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 && w.contains('/') && !w.starts_with('/') {
                    spec.cwd.join(w).display().to_string()
                } else {
                    (*w).to_owned()
                }
            })
            .collect(),
        None => vec!["/bin/sh".into(), "-c".into(), spec.command.clone()],
    }
}

/// The process backend's seccomp policy as an OCI profile, which gVisor
/// applies inside its sandbox (`--oci-seccomp`): the app meets the same
/// denials under both backends.
pub(crate) fn oci_seccomp(mode: confine::SeccompMode) -> Value {
    let action = match mode {
        confine::SeccompMode::Errno => "SCMP_ACT_ERRNO",
        confine::SeccompMode::Kill => "SCMP_ACT_KILL_PROCESS",
    };
    let names: Vec<&str> = confine::DENIED_SYSCALLS.iter().map(|(n, _)| *n).collect();
    let mut syscalls = vec![json!({"names": names, "action": action, "errnoRet": libc::EPERM})];
    for call in ["clone", "unshare"] {
        for flag in confine::NAMESPACE_FLAGS {
            syscalls.push(json!({
                "names": [call], "action": action, "errnoRet": libc::EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]
            }));
        }
    }
    // No clone3 rule: gVisor answers clone3 with ENOSYS itself (libc then
    // uses clone, checked above), and its OCI filters do not honour
    // errnoRet, so a rule would turn it into EPERM and break threads.
    json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": syscalls})
}

/// The app's process limit inside gVisor: one per 4 MiB of memory, 16 to
/// `pids_max`. Under --platform=ptrace each of the app's processes costs
/// host stub processes and threads and some memory, so the app's fork must
/// fail (EAGAIN, as the app can handle) well before the sandbox's cgroup
/// runs out of either, which would kill gVisor as a whole.
pub(crate) fn gvisor_nproc(spec: &SandboxSpec) -> u64 {
    (spec.memory_mb / 4).clamp(16, spec.pids_max.max(16))
}

/// Host processes (and threads) of a gVisor sandbox: the sentry's, the
/// gofer's and the stubs of the app's address spaces, several per app
/// process.
pub(crate) fn gvisor_host_pids(spec: &SandboxSpec) -> u64 {
    spec.pids_max.saturating_mul(8).clamp(1024, 32768)
}

/// What the OCI config generator needs to know about host paths.
pub(crate) trait PathKinds {
    /// None: missing. Some(true): a directory.
    fn is_dir(&self, p: &Path) -> Option<bool>;
    fn canonical(&self, p: &Path) -> Option<PathBuf>;
}

struct RealPaths;

impl PathKinds for RealPaths {
    fn is_dir(&self, p: &Path) -> Option<bool> {
        std::fs::metadata(p).ok().map(|m| m.is_dir())
    }
    fn canonical(&self, p: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(p).ok()
    }
}

/// The OCI runtime config of an instance: a read-only root made of
/// read-only binds of the host's runtime paths and the app's folder, a
/// private /tmp and data directory (tmpfs, size-limited), the app's
/// environment and limits; no capabilities, no new privileges.
pub(crate) fn oci_config(spec: &SandboxSpec, conf: &Confinement, paths: &dyn PathKinds) -> Value {
    let mut env = spec.full_env();
    let path = env.get("PATH").cloned().unwrap_or_default();
    env.insert("PATH".into(), confine::sandbox_path(conf, &spec.cwd, &path));
    env.insert("HOME".into(), confine::home(conf).display().to_string());
    // gVisor checks file ownership itself: the app runs as the owner of
    // its data directory (the sandbox's host id), a nobody elsewhere.
    let app_id = conf.host_id(&spec.id);
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", conf.tmp_mb.max(1))]}),
        match &conf.data_dir {
            Some(d) => json!({"destination": d, "type": "bind", "source": d,
                              "options": ["rbind", "rw", "nosuid", "nodev"]}),
            None => json!({"destination": DATA_DIR, "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=0700", format!("uid={app_id}"), format!("gid={app_id}"),
                           format!("size={}m", conf.data_mb.max(1))]}),
        },
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "nodev", "noexec", "mode=1777", format!("size={}m", conf.shm_mb.max(1))]}),
    ];
    for p in conf
        .ro_paths
        .iter()
        .chain(std::iter::once(&spec.cwd))
        .filter(|p| p.is_absolute())
    {
        // runsc follows the source; bind what a link resolves to at the
        // link's own path (so /bin -> usr/bin becomes a bind of /usr/bin).
        let Some(src) = paths.canonical(p) else {
            continue;
        };
        if paths.is_dir(&src).is_none() {
            continue;
        }
        mounts.push(json!({
            "destination": p, "type": "bind", "source": src,
            "options": ["rbind", "ro", "nosuid", "nodev"]
        }));
    }
    // No `linux.resources`: with them runsc moves itself into cgroups of
    // its own making. Without, gVisor's processes stay in the sandbox's
    // cgroup, whose memory, CPU and pids limits then bound the whole
    // gVisor sandbox (the app's memory is the sentry's memory).
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": app_id, "gid": app_id},
            "args": oci_args(spec),
            "env": env,
            "cwd": spec.cwd,
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "noNewPrivileges": true,
            "rlimits": conf.rlimits.iter().filter_map(|l| {
                let name = match l.resource {
                    confine::RlimitResource::Core => "RLIMIT_CORE",
                    confine::RlimitResource::Nofile => "RLIMIT_NOFILE",
                    confine::RlimitResource::Memlock => "RLIMIT_MEMLOCK",
                    confine::RlimitResource::Msgqueue => "RLIMIT_MSGQUEUE",
                    confine::RlimitResource::Fsize => "RLIMIT_FSIZE",
                    confine::RlimitResource::Nproc => return None,
                };
                Some(json!({"type": name, "hard": l.value, "soft": l.value}))
            })
            // gVisor's tasks are not host processes: the cgroup's pids
            // limit cannot count them, the sentry's RLIMIT_NPROC does (see
            // gvisor_nproc).
            .chain(std::iter::once({
                let nproc = gvisor_nproc(spec);
                json!({"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc})
            }))
            .collect::<Vec<_>>(),
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": spec.hostname(),
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "seccomp": oci_seccomp(conf.seccomp),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Fake(BTreeMap<PathBuf, (PathBuf, bool)>);
    impl PathKinds for Fake {
        fn is_dir(&self, p: &Path) -> Option<bool> {
            self.0.values().find(|(c, _)| c == p).map(|(_, d)| *d)
        }
        fn canonical(&self, p: &Path) -> Option<PathBuf> {
            self.0.get(p).map(|(c, _)| c.clone())
        }
    }

    #[test]
    fn oci_config_binds_read_only_and_limits() {
        let fake = Fake(BTreeMap::from([
            ("/usr".into(), ("/usr".into(), true)),
            ("/bin".into(), ("/usr/bin".into(), true)),
            ("/app/v1".into(), ("/app/v1".into(), true)),
            ("/etc/passwd".into(), ("/etc/passwd".into(), false)),
        ]));
        let conf = Confinement {
            ro_paths: ["/usr", "/bin", "/etc/passwd", "/lib64"]
                .iter()
                .map(PathBuf::from)
                .collect(),
            ..Confinement::default()
        };
        let mut spec = SandboxSpec::new("gv-1", "/app/v1", "exec ./server");
        spec.env.insert("PORT".into(), "8000".into());
        spec.memory_mb = 64;
        spec.cpu_millis = Some(500);
        let c = oci_config(&spec, &conf, &fake);
        assert_eq!(c["process"]["args"][2], "exec ./server");
        let mut direct = spec.clone();
        direct.command = "./bin/server --port 8000".into();
        assert_eq!(
            oci_args(&direct),
            vec!["/app/v1/./bin/server", "--port", "8000"]
        );
        assert_eq!(c["process"]["cwd"], "/app/v1");
        assert_eq!(c["process"]["user"]["uid"], conf.host_id("gv-1"));
        assert_eq!(c["process"]["noNewPrivileges"], true);
        // Limits are the sandbox cgroup's, not runsc's own.
        assert!(c["linux"]["resources"].is_null());
        let env: Vec<&str> = c["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(env.contains(&"PORT=8000"));
        assert!(env.contains(&"HOME=/data"));
        let mounts = c["mounts"].as_array().unwrap();
        let bind = |dst: &str| {
            mounts
                .iter()
                .find(|m| m["destination"] == dst && m["type"] == "bind")
                .cloned()
        };
        assert_eq!(bind("/bin").unwrap()["source"], "/usr/bin");
        assert!(bind("/app/v1").unwrap()["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro")));
        assert!(bind("/lib64").is_none(), "missing on the host: skipped");
        assert!(mounts.iter().all(
            |m| m["type"] != "bind" || m["options"].as_array().unwrap().contains(&json!("ro"))
        ));
        assert_eq!(c["root"]["readonly"], true);
        let sc = &c["linux"]["seccomp"];
        assert_eq!(sc["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(sc["syscalls"][0]["names"]
            .as_array()
            .unwrap()
            .contains(&json!("mount")));
        // No network namespace in the spec: runsc uses the sandbox's.
        assert!(!c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&json!({"type": "network"})));
    }

    #[test]
    fn supervisor_script_quotes_and_traps() {
        let s = supervisor_script(
            Path::new("/usr/bin/runsc"),
            Path::new("/run/x/state"),
            Path::new("/run/x/b/id1"),
            "id1",
        );
        assert!(
            s.contains("--platform=ptrace --network=host --ignore-cgroups --oci-seccomp \"$@\"")
        );
        assert!(s.contains(r#"run --bundle "$2" "$3"; echo $? > "$4"' '/usr/bin/runsc' '/run/x/state' '/run/x/b/id1' 'id1' '/run/x/b/id1.status' &"#), "{s}");
        assert!(s.contains("trap \"r kill 'id1' TERM >/dev/null 2>&1\" TERM"));
        assert!(
            s.contains("if [ -e '/run/x/state/id1_sandbox:id1.state' ]; then r delete -force 'id1' >/dev/null 2>&1; fi"),
            "{s}"
        );
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }
}
