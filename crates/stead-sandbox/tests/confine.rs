//! Integration tests of the confined process backend (user namespace,
//! pivot_root into read-only binds, seccomp, capabilities, rlimits, CPU
//! quota). They start real sandboxes: root, cgroups and python3 needed.

use std::path::PathBuf;
use std::time::Duration;

use stead_sandbox::{
    Confinement, ExitInfo, Output, ProcessSandbox, SandboxProcess, SandboxSpec, SeccompMode,
};
use tokio::io::AsyncReadExt;

const BOUND: Duration = Duration::from_secs(30);

fn sandbox() -> ProcessSandbox {
    ProcessSandbox::new(PathBuf::from(env!("CARGO_BIN_EXE_stead-sandbox-init")))
        .expect("process sandbox")
}

fn id(name: &str) -> String {
    format!("c-{name}-{}", std::process::id())
}

fn confined(name: &str, cwd: &std::path::Path, command: &str) -> SandboxSpec {
    let mut spec = SandboxSpec {
        stdout: Output::Pipe,
        stderr: Output::Pipe,
        confine: Some(Confinement::detect()),
        ..SandboxSpec::new(id(name), cwd, command)
    };
    spec.env.insert(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| stead_sandbox::DEFAULT_PATH.into()),
    );
    spec
}

struct Ran {
    exit: ExitInfo,
    stdout: String,
    stderr: String,
}

async fn collect(p: &mut SandboxProcess) -> Ran {
    let mut out = p.take_stdout().expect("stdout pipe");
    let mut err = p.take_stderr().expect("stderr pipe");
    let (mut o, mut e) = (String::new(), String::new());
    tokio::time::timeout(BOUND, async {
        let (a, b) = tokio::join!(out.read_to_string(&mut o), err.read_to_string(&mut e));
        a.expect("read stdout");
        b.expect("read stderr");
    })
    .await
    .expect("output in time");
    let exit = tokio::time::timeout(BOUND, p.wait())
        .await
        .expect("exit in time");
    Ran {
        exit,
        stdout: o,
        stderr: e,
    }
}

async fn run(spec: SandboxSpec) -> Ran {
    let sb = sandbox();
    let mut p = sb.spawn(spec).await.expect("spawn");
    collect(&mut p).await
}

fn app_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.txt"), "the app's file\n").unwrap();
    // tempdir is 0700: the sandbox's user must be able to enter its app.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn confined_root_user_and_mounts() {
    let dir = app_dir();
    let script = r#"
id -u; id -g
cat app.txt
pwd
echo HOME=$HOME
ls /
test -e /etc/shadow && echo SHADOW-VISIBLE || echo no-shadow
test -e /root/.cargo && echo CARGO-VISIBLE || echo no-cargo-home
touch /usr/x 2>/dev/null && echo USR-WRITABLE || echo usr-ro
touch ./x 2>/dev/null && echo APP-WRITABLE || echo app-ro
touch / 2>/dev/null; mkdir /newdir 2>/dev/null && echo ROOT-WRITABLE || echo root-ro
echo hi > /tmp/t && cat /tmp/t
echo data > $HOME/d && cat $HOME/d
grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status
ls /proc | grep -E '^[0-9]+$' | wc -l
ls /dev | tr '\n' ' '; echo
head -c 4 /dev/urandom | wc -c
cat /proc/self/cgroup | grep -c -v ':/$' || true
cat /proc/self/uid_map
"#;
    let r = run(confined("root", dir.path(), script)).await;
    assert_eq!(
        r.exit.code,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    let out = r.stdout;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000", "{out}");
    assert_eq!(lines[1], "1000", "{out}");
    assert!(out.contains("the app's file"), "{out}");
    assert!(
        out.contains(&format!("{}\n", dir.path().display())),
        "{out}"
    );
    assert!(out.contains("HOME=/data"), "{out}");
    assert!(out.contains("no-shadow"), "{out}");
    assert!(out.contains("usr-ro"), "{out}");
    assert!(out.contains("app-ro"), "{out}");
    assert!(out.contains("root-ro"), "{out}");
    assert!(out.contains("hi\ndata\n"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    // Host dirs that are not bound are not there.
    assert!(
        out.contains("no-cargo-home") && !out.contains("\nhome\n"),
        "{out}"
    );
    assert!(out.contains("null") && out.contains("urandom"), "{out}");
    // Its cgroups are all `/` (a cgroup namespace): nothing of the host's
    // hierarchy shows.
    assert_eq!(lines[lines.len() - 2], "0", "{out}");
    // uid 1000 inside is some unprivileged id outside.
    let map = lines.last().unwrap();
    let fields: Vec<u64> = map.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields[0], 1000);
    assert!(fields[1] >= 1_000_000, "{map}");
    assert_eq!(fields[2], 1);
}

#[tokio::test]
async fn denied_system_calls_fail_and_kill_mode_kills() {
    let dir = app_dir();
    let script = r#"
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = getattr(libc, name)(*args)
    return "ok" if r == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
print("mount", call("mount", b"none", b"/tmp", b"tmpfs", 0, None))
print("unshare", call("unshare", 0x10000000))
print("ptrace", call("ptrace", 16, 1, None, None))
print("umount", call("umount2", b"/tmp", 2))
print("chroot", call("chroot", b"/tmp"))
libc.syscall.restype = ctypes.c_long
r = libc.syscall(0x40000000 | 39)  # x32 getpid
print("x32", "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?"))
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    print("raw ok")
except OSError as e:
    print("raw", errno.errorcode[e.errno])
try:
    os.fork() or os._exit(0)
    print("fork ok")
except OSError as e:
    print("fork", e)
"#;
    std::fs::write(dir.path().join("t.py"), script).unwrap();
    let r = run(confined("seccomp", dir.path(), "exec python3 t.py")).await;
    assert_eq!(r.exit.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    for call in [
        "mount", "unshare", "ptrace", "umount", "chroot", "raw", "x32",
    ] {
        assert!(
            r.stdout.contains(&format!("{call} EPERM")),
            "{call}: {}",
            r.stdout
        );
    }
    assert!(r.stdout.contains("fork ok"), "{}", r.stdout);

    let mut spec = confined("seccompkill", dir.path(), "exec python3 t.py");
    if let Some(c) = spec.confine.as_mut() {
        c.seccomp = SeccompMode::Kill;
    }
    let r = run(spec).await;
    assert_eq!(
        r.exit.signal,
        Some(libc::SIGSYS),
        "{:?} {}",
        r.exit,
        r.stdout
    );
}

#[tokio::test]
async fn rlimits_are_set() {
    let dir = app_dir();
    let r = run(confined("rlimit", dir.path(), "ulimit -n; ulimit -c")).await;
    assert_eq!(r.exit.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "16384\n0\n");
}

#[tokio::test]
async fn data_dir_quota_holds() {
    let dir = app_dir();
    let mut spec = confined(
        "quota",
        dir.path(),
        "dd if=/dev/zero of=$HOME/big bs=1M count=64 2>&1; ls -l $HOME/big | awk '{print $5}'",
    );
    spec.memory_mb = 256;
    if let Some(c) = spec.confine.as_mut() {
        c.data_mb = 8;
    }
    let r = run(spec).await;
    assert!(r.stdout.contains("No space left on device"), "{}", r.stdout);
    let size: u64 = r.stdout.lines().last().unwrap().trim().parse().unwrap();
    assert!(size <= 8 << 20, "{size}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_quota_throttles() {
    let dir = app_dir();
    // Spin for 1 s of wall time and report the CPU time it got.
    let script = "import time, os\nt=time.time()\nwhile time.time()-t<1: pass\nprint(os.times().user + os.times().system)";
    std::fs::write(dir.path().join("spin.py"), script).unwrap();
    let mut spec = confined("cpu", dir.path(), "exec python3 spin.py");
    spec.cpu_millis = Some(200);
    let r = run(spec).await;
    assert_eq!(r.exit.code, Some(0), "{}", r.stderr);
    let cpu: f64 = r.stdout.trim().parse().unwrap();
    assert!(cpu < 0.5, "a 20% quota let it use {cpu} s of CPU in 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_server_is_reachable_with_connect_and_listen() {
    let dir = app_dir();
    let sb = sandbox();
    let port = 18080;
    let p = sb
        .spawn(SandboxSpec {
            stdout: Output::Null,
            stderr: Output::Null,
            ..confined(
                "server",
                dir.path(),
                &format!("exec python3 -m http.server {port} --bind 127.0.0.1"),
            )
        })
        .await
        .expect("spawn");
    let mut ok = false;
    for _ in 0..200 {
        if p.connect(port).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the confined server never accepted");
    let exit = tokio::time::timeout(BOUND, p.stop(Duration::from_secs(2)))
        .await
        .unwrap();
    assert!(exit.code.is_some() || exit.signal.is_some(), "{exit:?}");
}

#[tokio::test]
async fn data_dir_outlives_instances_with_a_quota() {
    let dir = app_dir();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("appdata").join("shop");
    let spec = |name: &str, cmd: &str| {
        let mut s = confined(name, dir.path(), cmd);
        if let Some(c) = s.confine.as_mut() {
            c.data_dir = Some(data.clone());
            c.data_mb = 16;
        }
        s
    };
    let r = run(spec("dd1", "echo kept > $HOME/state; echo $HOME; id -u")).await;
    assert_eq!(r.exit.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.starts_with(&format!("{}\n1000\n", data.display())),
        "{}",
        r.stdout
    );
    // Another instance of the same app sees it.
    let r = run(spec(
        "dd2",
        "cat $HOME/state; dd if=/dev/zero of=$HOME/big bs=1M count=64 2>&1; rm -f $HOME/big",
    ))
    .await;
    assert!(r.stdout.starts_with("kept\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains("No space left on device"),
        "quota: {}",
        r.stdout
    );
    // On the host: owned by the app's unprivileged id, mode 0700.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&data).unwrap();
    assert!(meta.uid() >= 1_000_000, "{}", meta.uid());
    assert_eq!(meta.mode() & 0o777, 0o700);
    assert_eq!(stead_sandbox::release_data_dirs(root.path()), 1);
    assert_eq!(stead_sandbox::release_data_dirs(root.path()), 0);
}
