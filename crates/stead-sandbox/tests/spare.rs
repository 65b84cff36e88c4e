//! Spare sandboxes (`ProcessSandbox::keep_spare`): a start uses the
//! waiting spare, is confined exactly like a direct start, the spare is
//! replaced after use and never shared, a dead one is not used, and the
//! spare ends with the backend. Root, cgroup v1 (spares need cgroup
//! renames) and python3 needed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stead_sandbox::{
    CgroupVersion, Confinement, ExitInfo, Output, ProcessSandbox, SandboxProcess, SandboxSpec,
};

const BOUND: Duration = Duration::from_secs(30);

fn init_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stead-sandbox-init"))
}

fn with_spare() -> ProcessSandbox {
    let sb = ProcessSandbox::new(init_exe())
        .expect("process sandbox")
        .keep_spare();
    assert_eq!(
        sb.cgroup_version(),
        CgroupVersion::V1,
        "spares need cgroup v1 (these tests run on the project's v1 host)"
    );
    sb
}

fn id(name: &str) -> String {
    format!("s-{name}-{}", std::process::id())
}

fn app_dir(marker: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.txt"), marker).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A confined spec whose output goes to files in `out` (spares are for
/// instances, whose output goes to files).
fn confined(name: &str, cwd: &Path, out: &Path, command: &str) -> SandboxSpec {
    let mut spec = SandboxSpec {
        stdout: Output::File(out.join(format!("{name}.out"))),
        stderr: Output::File(out.join(format!("{name}.err"))),
        confine: Some(Confinement::detect()),
        memory_mb: 96,
        pids_max: 300,
        cpu_millis: Some(500),
        ..SandboxSpec::new(id(name), cwd, command)
    };
    spec.env.insert(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| stead_sandbox::DEFAULT_PATH.into()),
    );
    spec
}

async fn wait(p: &SandboxProcess) -> ExitInfo {
    tokio::time::timeout(BOUND, p.wait())
        .await
        .expect("exit in time")
}

fn read(out: &Path, name: &str, ext: &str) -> String {
    std::fs::read_to_string(out.join(format!("{name}.{ext}"))).unwrap_or_default()
}

/// The limits a sandbox's cgroups hold, read on the host.
fn limits(p: &SandboxProcess) -> Vec<String> {
    let cg = p.cgroup();
    let mut files = vec![
        cg.memory.join("memory.limit_in_bytes"),
        cg.memory.join("memory.memsw.limit_in_bytes"),
    ];
    if let Some(pids) = &cg.pids {
        files.push(pids.join("pids.max"));
    }
    for dir in [Some(&cg.memory), cg.pids.as_ref(), cg.cpu.as_ref()]
        .into_iter()
        .flatten()
    {
        files.push(dir.join("cpu.cfs_quota_us"));
    }
    files
        .iter()
        .filter_map(|f| {
            std::fs::read_to_string(f)
                .ok()
                .map(|v| format!("{}={}", f.file_name().unwrap().to_string_lossy(), v.trim()))
        })
        .collect()
}

/// What a confined sandbox sees of itself, with what legitimately differs
/// between two sandboxes (ids, host ids) left out.
const PROBE: &str = r#"
id -u; id -g
cat app.txt; echo
hostname
grep -E '^(CapEff|CapBnd|CapPrm|CapInh|CapAmb|NoNewPrivs|Seccomp|Seccomp_filters):' /proc/self/status
cat /proc/self/cgroup
awk '{print $5, $6}' /proc/self/mountinfo
echo "pid $$"
cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '
grep -c . /proc/net/tcp
ulimit -a
ls -a /tmp /dev
cat /proc/self/uid_map | awk '{print $1, $3}'
sleep 0.2
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_uses_the_spare_confined_exactly_like_a_direct_start() {
    let out = tempfile::tempdir().unwrap();
    let dir = app_dir("the app's file");
    // Direct start, for comparison.
    let direct_sb = ProcessSandbox::new(init_exe()).expect("process sandbox");
    let direct = direct_sb
        .spawn(confined("direct", dir.path(), out.path(), PROBE))
        .await
        .expect("direct spawn");
    assert!(!direct.started_from_spare());
    let direct_limits = limits(&direct);
    assert_eq!(
        wait(&direct).await.code,
        Some(0),
        "{}",
        read(out.path(), "direct", "err")
    );

    let sb = with_spare();
    assert!(sb.spare_ready(BOUND).await, "a spare is made");
    let spare_pid = sb.spare_pid().expect("spare pid");
    let p = sb
        .spawn(confined("spared", dir.path(), out.path(), PROBE))
        .await
        .expect("spawn from the spare");
    assert!(p.started_from_spare());
    assert_eq!(p.pid(), spare_pid, "the waiting spare became the sandbox");
    assert!(
        p.cgroup().memory.ends_with(id("spared")),
        "its cgroup is named after it: {}",
        p.cgroup().memory.display()
    );
    // The same limits as a direct start, set before anything of it ran.
    assert_eq!(limits(&p), direct_limits);
    assert!(!direct_limits.is_empty());
    assert_eq!(
        wait(&p).await.code,
        Some(0),
        "{}",
        read(out.path(), "spared", "err")
    );
    for dir in [Some(&p.cgroup().memory), p.cgroup().pids.as_ref()]
        .into_iter()
        .flatten()
    {
        assert!(!dir.exists(), "cgroup {} was not removed", dir.display());
    }

    let a = read(out.path(), "direct", "out");
    let b = read(out.path(), "spared", "out");
    assert!(a.starts_with("1000\n1000\nthe app's file\n"), "{a}");
    assert!(
        a.contains("Seccomp:\t2") && a.contains("CapEff:\t0000000000000000"),
        "{a}"
    );
    // Only the hostname (the id) differs.
    let norm = |s: &str, name: &str| s.replace(&id(name), "<id>");
    assert_eq!(norm(&a, "direct"), norm(&b, "spared"));
    assert!(b.contains(&format!(
        "{}\n",
        &id("spared")[..id("spared").len().min(64)]
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_are_used_once_replaced_and_not_shared() {
    let out = tempfile::tempdir().unwrap();
    let sb = with_spare();
    let first_app = app_dir("first app");
    let second_app = app_dir("second app");
    assert!(sb.spare_ready(BOUND).await);
    let pid1 = sb.spare_pid().expect("spare");
    // Something the first sandbox leaves in every place it can write.
    let writer =
        "echo first > /tmp/left; echo first > $HOME/left; hostname; cat app.txt; exec sleep 30";
    let p1 = sb
        .spawn(confined("one", first_app.path(), out.path(), writer))
        .await
        .expect("first spawn");
    assert_eq!(p1.pid(), pid1);
    assert!(sb.spare_pid().is_none(), "the spare is taken, not shared");
    // A new spare comes (after a short delay), a different process.
    assert!(sb.spare_ready(BOUND).await, "the spare is replaced");
    let pid2 = sb.spare_pid().expect("second spare");
    assert_ne!(pid1, pid2);
    let reader = "cat /tmp/left 2>&1; cat $HOME/left 2>&1; hostname; cat app.txt; echo; \
                  ls /proc | grep -E '^[0-9]+$' | wc -l";
    let p2 = sb
        .spawn(confined("two", second_app.path(), out.path(), reader))
        .await
        .expect("second spawn");
    assert_eq!(p2.pid(), pid2);
    assert!(p2.started_from_spare());
    assert_eq!(wait(&p2).await.code, Some(0));
    let seen = read(out.path(), "two", "out");
    assert!(!seen.contains("first"), "{seen}");
    assert!(
        seen.contains(&id("two")) && seen.contains("second app"),
        "{seen}"
    );
    // Only its own pid 1, its command and the commands of the pipeline.
    let procs: u32 = seen.lines().last().unwrap().trim().parse().unwrap();
    assert!(procs <= 5, "{seen}");
    assert!(p1.exit_info().is_none(), "the first one still runs");
    p1.kill().unwrap();
    wait(&p1).await;
    let first = read(out.path(), "one", "out");
    assert!(
        first.contains(&id("one")) && first.contains("first app"),
        "{first}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_spare_is_not_used_and_exits_are_reported() {
    let out = tempfile::tempdir().unwrap();
    let sb = with_spare();
    let dir = app_dir("x");
    assert!(sb.spare_ready(BOUND).await);
    let pid = sb.spare_pid().expect("spare");
    // SAFETY: kill(2) of the spare we were told about.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let p = sb
        .spawn(confined("afterdead", dir.path(), out.path(), "exit 7"))
        .await
        .expect("spawn starts directly");
    assert!(!p.started_from_spare());
    assert_ne!(p.pid(), pid);
    assert_eq!(wait(&p).await.code, Some(7));
    // A fresh spare replaces the dead one, and reports exits like any start.
    assert!(sb.spare_ready(BOUND).await);
    let p = sb
        .spawn(confined("code", dir.path(), out.path(), "exit 9"))
        .await
        .expect("spawn");
    assert!(p.started_from_spare());
    assert_eq!(wait(&p).await.code, Some(9));
    // A setup error in a spare is reported, as in a direct start.
    assert!(sb.spare_ready(BOUND).await);
    let mut bad = confined("badcwd", dir.path(), out.path(), "true");
    bad.cwd = dir.path().join("missing");
    let e = sb.spawn(bad).await.expect_err("a missing cwd fails");
    assert!(e.to_string().contains("missing"), "{e}");
}

/// The spare's memory cgroup dir, from its /proc entry.
fn memory_cgroup_of(pid: u32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let path = text
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctl, path) = (parts.next()?, parts.next()?, parts.next()?);
            ctl.split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        })
        .expect("memory line");
    // The mount's root may not be `/` (containers): find the dir by name.
    let name = Path::new(&path).file_name().unwrap().to_owned();
    let mut found = None;
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup/memory")];
    for _ in 0..10_000 {
        let Some(d) = stack.pop() else { break };
        if d.file_name() == Some(&name) {
            found = Some(d);
            break;
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    found.expect("the spare's cgroup dir")
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spare_ends_with_the_backend() {
    let sb = with_spare();
    assert!(sb.spare_ready(BOUND).await);
    let pid = sb.spare_pid().expect("spare");
    let cgroup = memory_cgroup_of(pid);
    assert!(
        cgroup
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("_spare-"),
        "{}",
        cgroup.display()
    );
    assert!(alive(pid));
    drop(sb);
    assert!(
        !alive(pid),
        "the spare is killed when the backend is dropped"
    );
    assert!(
        !cgroup.exists(),
        "its cgroup is removed: {}",
        cgroup.display()
    );

    // release_spares does the same while the backend lives on.
    let sb = with_spare();
    assert!(sb.spare_ready(BOUND).await);
    let pid = sb.spare_pid().expect("spare");
    let cgroup = memory_cgroup_of(pid);
    sb.release_spares();
    assert!(!alive(pid));
    assert!(!cgroup.exists());
    assert!(sb.spare_pid().is_none());
    assert!(
        !sb.spare_ready(Duration::from_millis(600)).await,
        "no more spares"
    );
}
