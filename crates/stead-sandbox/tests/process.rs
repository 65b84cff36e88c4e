//! Integration tests of the process backend: they start real sandboxes, so
//! they need root, cgroups (v1 or v2) and python3.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stead_sandbox::{
    CgroupVersion, ExitInfo, NetworkMode, Output, ProcessSandbox, SandboxError, SandboxProcess,
    SandboxSpec,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound of every wait in these tests.
const BOUND: Duration = Duration::from_secs(20);

fn sandbox() -> ProcessSandbox {
    ProcessSandbox::new(PathBuf::from(env!("CARGO_BIN_EXE_stead-sandbox-init")))
        .expect("process sandbox")
}

fn id(name: &str) -> String {
    format!("t-{name}-{}", std::process::id())
}

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn spec(name: &str, command: &str) -> SandboxSpec {
    SandboxSpec {
        stdout: Output::Pipe,
        stderr: Output::Pipe,
        ..SandboxSpec::new(id(name), "/", command)
    }
}

struct Ran {
    exit: ExitInfo,
    stdout: String,
    stderr: String,
}

/// Runs a sandbox with piped output to completion.
async fn run(spec: SandboxSpec) -> Ran {
    let sb = sandbox();
    let mut p = sb.spawn(spec).await.expect("spawn");
    let ran = collect(&mut p).await;
    assert_cgroup_gone(&p);
    ran
}

async fn collect(p: &mut SandboxProcess) -> Ran {
    let mut out = p.take_stdout().expect("stdout pipe");
    let mut err = p.take_stderr().expect("stderr pipe");
    let (mut o, mut e) = (String::new(), String::new());
    bounded("reading output", async {
        let (a, b) = tokio::join!(out.read_to_string(&mut o), err.read_to_string(&mut e));
        a.expect("read stdout");
        b.expect("read stderr");
    })
    .await;
    let exit = bounded("wait", p.wait()).await;
    Ran {
        exit,
        stdout: o,
        stderr: e,
    }
}

fn assert_cgroup_gone(p: &SandboxProcess) {
    for dir in [Some(&p.cgroup().memory), p.cgroup().pids.as_ref()]
        .into_iter()
        .flatten()
    {
        assert!(!dir.exists(), "cgroup {} was not removed", dir.display());
    }
}

fn process_exists(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // A zombie has exited; only its entry is left.
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

fn cgroup_pids(p: &SandboxProcess) -> Vec<i32> {
    std::fs::read_to_string(p.cgroup().memory.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

async fn eventually_gone(pids: &[i32]) {
    bounded("processes to disappear", async {
        while pids.iter().any(|p| process_exists(*p)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn detects_cgroup_version() {
    let sb = sandbox();
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .map(|c| c.split_whitespace().any(|x| x == "memory"))
        .unwrap_or(false);
    let expected = if v2 {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    };
    assert_eq!(sb.cgroup_version(), expected);
}

#[tokio::test]
async fn runs_as_child_of_pid_1_in_its_own_pid_namespace() {
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    let r = run(spec(
        "pidns",
        "echo $$; cut -d' ' -f4 /proc/$$/stat; ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '",
    ))
    .await;
    assert_eq!(r.exit.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines[0], "2",
        "the command's shell is pid 2: {:?}",
        r.stdout
    );
    assert_eq!(lines[1], "1", "its parent is pid 1: {:?}", r.stdout);
    let pids: Vec<u32> = lines[2]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1) && pids.contains(&2), "{pids:?}");
    assert!(
        pids.iter().all(|p| *p < 20),
        "only the sandbox's own pids: {pids:?}"
    );
    // Mounting /proc inside did not propagate to the host.
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    assert_eq!(mounts_before, mounts_after);
}

#[tokio::test]
async fn has_its_own_namespaces_and_hostname() {
    let r = run(spec(
        "ns",
        "cat /proc/sys/kernel/hostname; for n in ipc uts net mnt pid; do readlink /proc/self/ns/$n; done",
    ))
    .await;
    assert_eq!(r.exit.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], id("ns"));
    for (i, ns) in ["ipc", "uts", "net", "mnt", "pid"].iter().enumerate() {
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(
            lines[i + 1],
            host.to_str().unwrap(),
            "{ns} namespace is shared with the host"
        );
    }

    // Long ids are cut to the kernel's 64-byte hostname limit.
    let long = format!("{}-{}", "h".repeat(70), std::process::id());
    let r = run(SandboxSpec {
        stdout: Output::Pipe,
        stderr: Output::Pipe,
        ..SandboxSpec::new(long.clone(), "/", "cat /proc/sys/kernel/hostname")
    })
    .await;
    assert_eq!(r.stdout.trim(), &long[..64]);
}

const PROBE: &str = "import socket,sys
s=socket.socket(); s.settimeout(2)
try:
    s.connect(('127.0.0.1', int(sys.argv[1]))); print('reachable')
except Exception as e:
    print('unreachable', e)";

#[tokio::test]
async fn isolated_network_cannot_reach_the_host_loopback() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cmd = format!("python3 -c \"$PROBE\" {port}; cat /proc/net/dev");
    let mut s = spec("netiso", &cmd);
    s.env.insert("PROBE".into(), PROBE.into());
    let r = run(s).await;
    assert_eq!(r.exit.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("unreachable"), "{}", r.stdout);
    let ifaces: Vec<&str> = r
        .stdout
        .lines()
        .skip(3)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"], "{}", r.stdout);

    // The same probe with the host's network gets through.
    let mut s = spec("nethost", &cmd);
    s.env.insert("PROBE".into(), PROBE.into());
    s.network = NetworkMode::Host;
    let r = run(s).await;
    assert!(r.stdout.starts_with("reachable"), "{}", r.stdout);
}

/// A port nothing on the host listens on (as far as we can tell).
fn free_host_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn http_get(p: &SandboxProcess, port: u16) -> String {
    let mut conn = bounded("connecting", async {
        loop {
            match p.connect(port).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    conn.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    bounded("http response", conn.read_to_string(&mut resp))
        .await
        .unwrap();
    resp
}

// The agent's runtime is multi-threaded: so is this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reaches_a_server_inside_the_sandbox() {
    let sb = sandbox();
    let port = free_host_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hi").unwrap();
    let p = sb
        .spawn(SandboxSpec {
            cwd: dir.path().to_owned(),
            ..SandboxSpec::new(
                id("connect"),
                "/",
                format!("exec python3 -m http.server {port} --bind 127.0.0.1"),
            )
        })
        .await
        .unwrap();
    let resp = http_get(&p, port).await;
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    assert!(resp.contains("hello.txt"), "served from cwd: {resp}");
    // The server is not on the host's loopback.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
    // Closed port inside: refused, not hanging.
    assert!(bounded("refused", p.connect(1)).await.is_err());
    let exit = bounded("stop", p.stop(Duration::from_secs(5))).await;
    assert!(
        exit.signal == Some(libc::SIGTERM) || exit.code.is_some(),
        "{exit:?}"
    );
    assert_cgroup_gone(&p);
}

// What the agent will do for an app's database: a listener inside the
// sandbox's namespace, proxied to a server on the host's loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_exposes_a_host_service_inside_the_sandbox() {
    let sb = sandbox();
    let host_server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host_addr = host_server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = host_server.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let n = c.read(&mut buf).await.unwrap_or(0);
                let reply = format!("host saw {:?}", String::from_utf8_lossy(&buf[..n]));
                let _ = c.write_all(reply.as_bytes()).await;
            });
        }
    });
    let inner_port = 5432;
    let script = format!(
        "import socket, time\n\
         for _ in range(400):\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('127.0.0.1', {inner_port}), timeout=2)\n\
         \x20       break\n\
         \x20   except OSError:\n\
         \x20       time.sleep(0.01)\n\
         s.sendall(b'ping')\n\
         print(s.recv(100).decode())\n"
    );
    let mut p = sb
        .spawn(spec("listen", &format!("exec python3 -c \"{script}\"")))
        .await
        .unwrap();
    let listener = p.listen(inner_port).await.expect("listen inside");
    assert_eq!(
        listener.local_addr().unwrap(),
        "127.0.0.1:5432".parse().unwrap()
    );
    // Nothing on the host's 127.0.0.1:5432 was taken by it.
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(host_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                }
            });
        }
    });
    let r = collect(&mut p).await;
    assert_eq!(r.exit.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "host saw \"ping\"");
    // The same port can be listened on again in another sandbox: each has
    // its own loopback.
    let q = sb.spawn(spec("listen2", "exec sleep 30")).await.unwrap();
    let l2 = q
        .listen(inner_port)
        .await
        .expect("second sandbox, same port");
    drop(l2);
    bounded("stop", q.stop(Duration::from_secs(1))).await;
}

#[tokio::test]
async fn connect_with_host_network() {
    let sb = sandbox();
    let port = free_host_port();
    let p = sb
        .spawn(SandboxSpec {
            network: NetworkMode::Host,
            ..SandboxSpec::new(
                id("connecthost"),
                "/",
                format!("exec python3 -m http.server {port} --bind 127.0.0.1"),
            )
        })
        .await
        .unwrap();
    let resp = http_get(&p, port).await;
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    bounded("stop", p.stop(Duration::from_secs(5))).await;
}

#[tokio::test]
async fn output_files_are_appended() {
    let sb = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out.log"), dir.path().join("err.log"));
    for round in 0..2 {
        let p = sb
            .spawn(SandboxSpec {
                stdout: Output::File(out.clone()),
                stderr: Output::File(err.clone()),
                ..SandboxSpec::new(
                    id("files"),
                    "/",
                    format!("echo out{round}; echo err{round} >&2"),
                )
            })
            .await
            .unwrap();
        let exit = bounded("wait", p.wait()).await;
        assert_eq!(exit.code, Some(0));
    }
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "out0\nout1\n");
    assert_eq!(std::fs::read_to_string(&err).unwrap(), "err0\nerr1\n");
}

#[tokio::test]
async fn exit_statuses_are_reported() {
    let r = run(spec("exit7", "exit 7")).await;
    assert_eq!(
        (r.exit.code, r.exit.signal, r.exit.oom_killed),
        (Some(7), None, false)
    );
    assert_eq!(r.exit.description, "exited with status 7");

    let r = run(spec("exit0", "true")).await;
    assert_eq!(r.exit.code, Some(0));

    let r = run(spec("usr1", "kill -USR1 $$; sleep 5")).await;
    assert_eq!(
        (r.exit.code, r.exit.signal),
        (None, Some(libc::SIGUSR1)),
        "{:?}",
        r.exit
    );
    assert_eq!(r.exit.description, "killed by signal 10 (SIGUSR1)");

    let r = run(spec("self9", "kill -9 $$")).await;
    assert_eq!(r.exit.signal, Some(9));
    assert_eq!(r.exit.description, "killed by signal 9 (SIGKILL)");
    assert!(!r.exit.oom_killed);

    let r = run(spec("notfound", "no-such-command-xyz")).await;
    assert_eq!(r.exit.code, Some(127));
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
}

#[tokio::test]
async fn environment_is_the_specs_and_cwd_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("env", "env | sort; pwd");
    s.cwd = dir.path().to_owned();
    s.env = BTreeMap::from([("FOO".into(), "bar baz".into())]);
    let r = run(s).await;
    assert_eq!(r.exit.code, Some(0), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines.contains(&"FOO=bar baz"), "{}", r.stdout);
    assert!(lines.contains(&format!("PATH={}", stead_sandbox::DEFAULT_PATH).as_str()));
    // Nothing of the agent's (test runner's) environment leaks in.
    assert!(!r.stdout.contains("CARGO"), "{}", r.stdout);
    assert!(!r.stdout.contains("HOME="), "{}", r.stdout);
    assert_eq!(*lines.last().unwrap(), dir.path().to_str().unwrap());
}

// The agent's runtime is multi-threaded: so is this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_a_command_that_ignores_sigterm_and_its_children() {
    let sb = sandbox();
    let p = sb
        .spawn(spec("stubborn", "trap '' TERM; sleep 1000 & sleep 1000"))
        .await
        .unwrap();
    // Let the shell start both sleeps: outer init, pid 1, sh, 2 x sleep.
    let pids = bounded("children to start", async {
        loop {
            let pids = cgroup_pids(&p);
            if pids.len() >= 5 {
                break pids;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let grace = Duration::from_millis(500);
    let started = Instant::now();
    let exit = bounded("stop", p.stop(grace)).await;
    let took = started.elapsed();
    assert!(took >= grace, "killed before the grace period: {took:?}");
    assert!(took < grace + Duration::from_secs(3), "took {took:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    eventually_gone(&pids).await;
    assert_cgroup_gone(&p);
}

#[tokio::test]
async fn sigterm_reaches_the_command() {
    let sb = sandbox();
    let mut p = sb
        .spawn(spec(
            "graceful",
            "trap 'echo bye; exit 3' TERM; sleep 1000 & wait",
        ))
        .await
        .unwrap();
    let mut out = p.take_stdout().unwrap();
    // Give sh time to install its trap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let exit = bounded("stop", p.stop(Duration::from_secs(10))).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(exit.code, Some(3), "{exit:?}");
    let mut s = String::new();
    bounded("stdout", out.read_to_string(&mut s)).await.unwrap();
    assert_eq!(s, "bye\n");
}

#[tokio::test]
async fn memory_hog_is_reported_as_oom_killed() {
    let mut s = spec(
        "oom",
        "python3 -c 'b = bytearray(200 * 1024 * 1024); print(len(b))'",
    );
    s.memory_mb = 64;
    let r = run(s).await;
    assert!(r.exit.oom_killed, "{:?} {}", r.exit, r.stderr);
    // Killed by SIGKILL: either the command itself or, when sh forked it,
    // as sh reports it (128 + 9).
    assert!(
        r.exit.signal == Some(libc::SIGKILL) || r.exit.code == Some(137),
        "{:?} {}",
        r.exit,
        r.stderr
    );
    assert_eq!(
        r.exit.description,
        "killed by the kernel's OOM killer: memory limit 64 MiB reached"
    );
}

const FORKER: &str = "import os, time
n = 0
try:
    for i in range(50):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
    print('forked', n)
except OSError as e:
    print('fork failed after', n, e)";

#[tokio::test]
async fn pids_limit_stops_fork_bombs() {
    let mut s = spec("pids", "python3 -c \"$FORKER\"");
    s.env.insert("FORKER".into(), FORKER.into());
    s.pids_max = 10;
    let started = Instant::now();
    let r = run(s).await;
    assert!(
        r.stdout.starts_with("fork failed after"),
        "{:?} {} {}",
        r.exit,
        r.stdout,
        r.stderr
    );
    let n: u32 = r.stdout.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(n < 10, "{}", r.stdout);
    // The sleeping children did not keep the sandbox alive: they died with
    // its pid 1 when the command exited.
    assert!(started.elapsed() < Duration::from_secs(10));
}

// The agent's runtime is multi-threaded: so is this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_after_dropping_the_handle() {
    let sb = sandbox();
    let p = sb
        .spawn(SandboxSpec::new(
            id("adopt"),
            "/",
            "exec python3 -m http.server 8080 --bind 127.0.0.1",
        ))
        .await
        .unwrap();
    let persisted = p.persisted();
    // As an agent would: store as JSON, forget the handle.
    let json = serde_json::to_string(&persisted).unwrap();
    drop(p);
    let persisted: stead_sandbox::Persisted = serde_json::from_str(&json).unwrap();

    // A record whose start time does not match is a different process.
    let mut other = persisted.clone();
    other.start_time += 1;
    assert!(sb.adopt(&other).unwrap().is_none());

    let a = sb.adopt(&persisted).unwrap().expect("still running");
    assert_eq!(a.pid(), persisted.pid);
    assert_eq!(a.persisted(), persisted);
    assert!(a.exit_info().is_none());
    assert!(a.memory_usage_bytes().unwrap() > 0);
    // Its network namespace is found again.
    let resp = http_get(&a, 8080).await;
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");

    // Adopted ones notice their end too (via pidfd); status is unknown.
    let started = Instant::now();
    a.kill().unwrap();
    let exit = bounded("wait adopted", a.wait()).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!((exit.code, exit.signal), (None, None));
    assert!(exit.description.contains("unknown"), "{}", exit.description);
    assert_cgroup_gone(&a);

    assert!(
        sb.adopt(&persisted).unwrap().is_none(),
        "a dead sandbox is not adopted"
    );
}

// The agent's runtime is multi-threaded: so is this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_notices_a_kill_9_at_once() {
    let sb = sandbox();
    let p = sb
        .spawn(spec("kill9", "sleep 1000 & sleep 1000"))
        .await
        .unwrap();
    let pids = bounded("children to start", async {
        loop {
            let pids = cgroup_pids(&p);
            if pids.len() >= 5 {
                break pids;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let started = Instant::now();
    // SAFETY: kill(2) of the sandbox's outer init, our child.
    assert_eq!(unsafe { libc::kill(p.pid() as i32, libc::SIGKILL) }, 0);
    let exit = bounded("wait", p.wait()).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    eprintln!("kill -9 noticed after {took:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    // The rest of the sandbox died with its init.
    eventually_gone(&pids).await;
    assert_cgroup_gone(&p);
}

// The agent's runtime is multi-threaded: so is this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_from_several_tasks() {
    let sb = sandbox();
    let p = Arc::new(
        sb.spawn(spec("multiwait", "sleep 0.3; exit 4"))
            .await
            .unwrap(),
    );
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let p = Arc::clone(&p);
            tokio::spawn(async move { p.wait().await })
        })
        .collect();
    for w in waiters {
        let exit = bounded("waiter", w).await.unwrap();
        assert_eq!(exit.code, Some(4));
    }
    // And again, after the fact.
    assert_eq!(bounded("wait", p.wait()).await.code, Some(4));
    assert_eq!(p.exit_info().unwrap().code, Some(4));
    // Signalling or stopping a finished sandbox is harmless.
    p.terminate().unwrap();
    p.kill().unwrap();
    assert_eq!(
        bounded("stop", p.stop(Duration::from_secs(1))).await.code,
        Some(4)
    );
}

#[tokio::test]
async fn an_id_cannot_run_twice() {
    let sb = sandbox();
    let first = sb
        .spawn(SandboxSpec::new(id("twice"), "/", "sleep 1000"))
        .await
        .unwrap();
    let err = sb
        .spawn(SandboxSpec::new(id("twice"), "/", "sleep 1000"))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::CgroupBusy { .. }), "{err}");
    // The failed attempt did not disturb the first one.
    assert!(first.exit_info().is_none());
    assert!(process_exists(first.pid() as i32));
    bounded("stop", first.stop(Duration::from_secs(5))).await;
    // Once it is gone, the id can be reused.
    let again = sb
        .spawn(SandboxSpec::new(id("twice"), "/", "exit 0"))
        .await
        .unwrap();
    assert_eq!(bounded("wait", again.wait()).await.code, Some(0));
}

#[tokio::test]
async fn setup_errors_are_reported_and_cleaned_up() {
    let sb = sandbox();
    let s = SandboxSpec::new(id("badcwd"), "/nonexistent/dir", "true");
    let cgroup_dir = sb_cgroup_dir(&sb, &s.id).await;
    let err = sb.spawn(s).await.unwrap_err();
    match &err {
        SandboxError::Setup { message, .. } => {
            assert!(message.contains("/nonexistent/dir"), "{message}")
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(!cgroup_dir.exists(), "cgroup of a failed start is removed");

    let err = sb
        .spawn(SandboxSpec::new("bad/id", "/", "true"))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::InvalidSpec { .. }), "{err}");

    let err = sb
        .spawn(SandboxSpec {
            stdout: Output::File("/nonexistent/dir/out.log".into()),
            ..SandboxSpec::new(id("badout"), "/", "true")
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/dir/out.log"),
        "{err}"
    );

    let bad = ProcessSandbox::new("/nonexistent/init".into()).unwrap_err();
    assert!(bad.to_string().contains("/nonexistent/init"), "{bad}");
}

/// Where sandbox `id`'s memory cgroup goes (found by starting a sandbox).
async fn sb_cgroup_dir(sb: &ProcessSandbox, id: &str) -> PathBuf {
    let probe = sb
        .spawn(SandboxSpec::new(format!("{id}-probe"), "/", "true"))
        .await
        .unwrap();
    let dir = probe.cgroup().memory.parent().unwrap().join(id);
    bounded("probe", probe.wait()).await;
    dir
}

#[tokio::test]
async fn limits_are_written_to_the_cgroup() {
    let sb = sandbox();
    let mut s = SandboxSpec::new(id("limits"), "/", "sleep 1000");
    s.memory_mb = 96;
    s.pids_max = 77;
    let p = sb.spawn(s).await.unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_owned();
    let cg = p.cgroup();
    match sb.cgroup_version() {
        CgroupVersion::V2 => {
            assert_eq!(
                read(&cg.memory.join("memory.max")),
                (96u64 << 20).to_string()
            );
            assert_eq!(read(&cg.memory.join("pids.max")), "77");
        }
        CgroupVersion::V1 => {
            assert_eq!(
                read(&cg.memory.join("memory.limit_in_bytes")),
                (96u64 << 20).to_string()
            );
            if let Some(pids) = &cg.pids {
                assert_eq!(read(&pids.join("pids.max")), "77");
            }
        }
    }
    // Every process of the sandbox is in its cgroup, the outer init included.
    assert!(cgroup_pids(&p).contains(&(p.pid() as i32)));
    assert!(p.memory_usage_bytes().unwrap() > 0);
    let exit = bounded("stop", p.stop(Duration::from_secs(5))).await;
    // sleep has no SIGTERM handler: it dies of it.
    assert_eq!(exit.signal, Some(libc::SIGTERM), "{exit:?}");
    assert_cgroup_gone(&p);
}

// The agent's runtime is multi-threaded: so is this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_takes_a_few_milliseconds() {
    let sb = sandbox();
    let mut times = Vec::new();
    for i in 0..10 {
        let started = Instant::now();
        let p = sb
            .spawn(SandboxSpec::new(id(&format!("timing{i}")), "/", "exit 0"))
            .await
            .unwrap();
        times.push(started.elapsed());
        bounded("wait", p.wait()).await;
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "spawn (until /bin/sh is executed): median {median:?}, min {:?}, max {:?}",
        times[0],
        times[times.len() - 1]
    );
    assert!(
        median < Duration::from_millis(200),
        "median spawn {median:?}"
    );
}

#[test]
fn adopt_outside_a_runtime_is_an_error() {
    let sb = sandbox();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let persisted = rt.block_on(async {
        let p = sb
            .spawn(SandboxSpec::new(id("nort"), "/", "true"))
            .await
            .unwrap();
        let persisted = p.persisted();
        bounded("wait", p.wait()).await;
        persisted
    });
    let err = sb.adopt(&persisted).unwrap_err();
    assert!(matches!(err, SandboxError::NoRuntime { .. }), "{err}");
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ProcessSandbox>();
    check::<SandboxProcess>();
    check::<SandboxError>();
}

/// Env var that turns `fake_agent` from a no-op into an agent that starts
/// a sandbox, prints its `Persisted` and waits to be SIGKILLed.
const FAKE_AGENT: &str = "STEAD_SANDBOX_TEST_FAKE_AGENT";

#[tokio::test]
async fn fake_agent() {
    let Ok(dir) = std::env::var(FAKE_AGENT) else {
        return;
    };
    let sb = sandbox();
    let p = sb
        .spawn(SandboxSpec {
            stdout: Output::File(Path::new(&dir).join("ticks.log")),
            ..SandboxSpec::new(
                id("restart"),
                "/",
                "while true; do echo tick; sleep 0.05; done",
            )
        })
        .await
        .unwrap();
    println!(
        "PERSISTED {}",
        serde_json::to_string(&p.persisted()).unwrap()
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// Kills what is left in a cgroup if a test fails half-way.
struct KillCgroupOnDrop(PathBuf);

impl Drop for KillCgroupOnDrop {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) of a process in the test's own sandbox cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The real thing: the agent that started a sandbox is SIGKILLed; the
/// sandbox keeps running and logging to its file, and the next agent
/// adopts it and stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_survives_its_agent_being_killed() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["fake_agent", "--exact", "--nocapture", "--test-threads=1"])
        .env(FAKE_AGENT, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    let persisted: stead_sandbox::Persisted = bounded("fake agent", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // The harness prints "test fake_agent ... " before it.
            if let Some((_, json)) = line.split_once("PERSISTED ") {
                return serde_json::from_str(json).unwrap();
            }
        }
        panic!("the fake agent exited without starting its sandbox");
    })
    .await;
    let _cleanup = KillCgroupOnDrop(persisted.cgroup.memory.clone());
    agent.start_kill().unwrap();
    bounded("fake agent to die", agent.wait()).await.unwrap();

    let log = dir.path().join("ticks.log");
    let size = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let before = size();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        size() > before,
        "the sandbox stopped logging when its agent died"
    );

    let sb = sandbox();
    let p = sb
        .adopt(&persisted)
        .unwrap()
        .expect("the sandbox outlived its agent");
    let exit = bounded("stop", p.stop(Duration::from_secs(5))).await;
    assert_eq!((exit.code, exit.signal), (None, None), "{exit:?}");
    assert_cgroup_gone(&p);
    assert!(sb.adopt(&persisted).unwrap().is_none());
    let after = size();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(size(), after, "still logging after stop");
}
