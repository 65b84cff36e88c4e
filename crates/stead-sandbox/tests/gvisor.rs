//! Integration tests of the gVisor backend: root and `runsc` needed
//! (scripts/test installs Debian's runsc package).

use std::path::PathBuf;
use std::time::Duration;

use stead_sandbox::{Backend, Output, SandboxSpec, Sandboxes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOUND: Duration = Duration::from_secs(30);

fn sandboxes() -> Sandboxes {
    Sandboxes::new(
        PathBuf::from(env!("CARGO_BIN_EXE_stead-sandbox-init")),
        Backend::Gvisor,
    )
    .expect("the gvisor backend (is runsc installed?)")
}

fn spec(name: &str, cwd: &std::path::Path, command: &str, sb: &Sandboxes) -> SandboxSpec {
    let mut s = SandboxSpec {
        stdout: Output::Pipe,
        stderr: Output::Pipe,
        backend: Backend::Gvisor,
        confine: Some(sb.confinement().clone()),
        ..SandboxSpec::new(format!("g-{name}-{}", std::process::id()), cwd, command)
    };
    s.env.insert(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| stead_sandbox::DEFAULT_PATH.into()),
    );
    s
}

fn app_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.txt"), "the app's file\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn the_host_reports_gvisor() {
    assert!(sandboxes().backends().contains(&Backend::Gvisor));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_under_gvisor_with_env_cwd_and_exit_status() {
    let dir = app_dir();
    let sb = sandboxes();
    let mut s = spec(
        "run",
        dir.path(),
        "cat app.txt; echo HOME=$HOME; echo X=$X; echo kernel=$(uname -r); exit 7",
        &sb,
    );
    s.env.insert("X".into(), "y".into());
    let mut p = sb.spawn(s).await.expect("spawn");
    let mut out = p.take_stdout().unwrap();
    let mut text = String::new();
    tokio::time::timeout(BOUND, out.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    let exit = tokio::time::timeout(BOUND, p.wait()).await.unwrap();
    assert_eq!(exit.code, Some(7), "{exit:?} {text}");
    assert!(text.contains("the app's file"), "{text}");
    assert!(text.contains("HOME=/data"), "{text}");
    assert!(text.contains("X=y"), "{text}");
    // gVisor's kernel, not the host's.
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(!text.contains(&format!("kernel={}", host.trim())), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_under_gvisor_is_reached_with_connect_and_stops_with_sigterm() {
    let dir = app_dir();
    let sb = sandboxes();
    let port = 18090;
    let s = SandboxSpec {
        stdout: Output::Null,
        stderr: Output::Null,
        ..spec(
            "server",
            dir.path(),
            &format!("exec python3 -m http.server {port} --bind 0.0.0.0"),
            &sb,
        )
    };
    let p = sb.spawn(s).await.expect("spawn");
    let mut conn = None;
    for _ in 0..300 {
        if let Ok(c) = p.connect(port).await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = conn.expect("the server under gVisor never accepted");
    conn.write_all(b"GET /app.txt HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tokio::time::timeout(BOUND, conn.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(resp.contains("the app's file"), "{resp}");
    // Adoptable like any sandbox.
    let persisted = p.persisted();
    assert_eq!(persisted.backend, Backend::Gvisor);
    let t = std::time::Instant::now();
    let exit = tokio::time::timeout(BOUND, p.stop(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM reached the app: {exit:?}"
    );
    assert!(exit.code.is_some(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_holds_under_gvisor() {
    let dir = app_dir();
    let sb = sandboxes();
    let mut s = spec(
        "oom",
        dir.path(),
        "exec python3 -c 'b=[]\nwhile True: b.append(bytearray(16<<20))'",
        &sb,
    );
    s.memory_mb = 96;
    let p = sb.spawn(s).await.expect("spawn");
    let exit = match tokio::time::timeout(BOUND, p.wait()).await {
        Ok(e) => e,
        Err(_) => {
            let _ = p.kill();
            panic!("the memory hog under gVisor was not stopped by its limit");
        }
    };
    assert!(exit.code != Some(0), "{exit:?}");
    assert!(exit.oom_killed, "{exit:?}");
    // Killed as a whole, its script could not clean up: the backend does.
    let bundle = std::path::Path::new(stead_sandbox::GVISOR_DIR)
        .join("bundles")
        .join(p.id());
    for _ in 0..250 {
        if !bundle.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!bundle.exists(), "{} left behind", bundle.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_under_gvisor_hits_the_process_limit() {
    let dir = app_dir();
    let sb = sandboxes();
    let script = "import os\nn=0\ntry:\n    while n < 100000:\n        os.posix_spawn('/bin/sleep', ['sleep', '20'], {})\n        n += 1\nexcept OSError as e:\n    print('failed after', n, e.errno)\n";
    std::fs::write(dir.path().join("bomb.py"), script).unwrap();
    let mut s = spec("bomb", dir.path(), "python3 bomb.py; echo done", &sb);
    s.memory_mb = 128;
    s.pids_max = 512;
    let mut p = sb.spawn(s).await.expect("spawn");
    let mut out = p.take_stdout().unwrap();
    let mut err = p.take_stderr().unwrap();
    let (mut text, mut etext) = (String::new(), String::new());
    let r = tokio::time::timeout(BOUND, async {
        let _ = tokio::join!(
            out.read_to_string(&mut text),
            err.read_to_string(&mut etext)
        );
    })
    .await;
    let exit = p.stop(Duration::from_secs(1)).await;
    assert!(r.is_ok(), "timed out: {text} {etext} {exit:?}");
    assert!(text.contains("failed after"), "{text}\n{etext}\n{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gvisor_sandbox_is_adopted_after_the_agent_restarts() {
    let dir = app_dir();
    let sb = sandboxes();
    let port = 18091;
    let p = sb
        .spawn(SandboxSpec {
            stdout: Output::Null,
            stderr: Output::Null,
            ..spec(
                "adopt",
                dir.path(),
                &format!("exec python3 -m http.server {port} --bind 0.0.0.0"),
                &sb,
            )
        })
        .await
        .expect("spawn");
    let record = p.persisted();
    // The agent goes away: its handle is dropped, the sandbox runs on.
    drop(p);
    let again = sandboxes();
    let q = again.adopt(&record).expect("adopt").expect("still running");
    assert_eq!(q.backend(), Backend::Gvisor);
    let mut ok = false;
    for _ in 0..300 {
        if q.connect(port).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the adopted gVisor sandbox does not answer");
    // Not our child any more: the status is unknown, the exit is not.
    let t = std::time::Instant::now();
    let exit = tokio::time::timeout(BOUND, q.stop(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM reached it: {exit:?}"
    );
    assert!(q.exit_info().is_some());
}

// A database exposed with `listen` is reachable from an app under gVisor
// too (runsc --network=host uses the sandbox's namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_reaches_an_app_under_gvisor() {
    let dir = app_dir();
    let sb = sandboxes();
    std::fs::write(
        dir.path().join("client.py"),
        "import socket, time\n\
         for _ in range(500):\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('127.0.0.1', 5433), timeout=2)\n\
         \x20       break\n\
         \x20   except OSError:\n\
         \x20       time.sleep(0.01)\n\
         print(s.recv(100).decode())\n",
    )
    .unwrap();
    let mut p = sb
        .spawn(spec("listen", dir.path(), "python3 client.py", &sb))
        .await
        .expect("spawn");
    let listener = p.listen(5433).await.expect("listen inside");
    tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            let _ = c.write_all(b"hello from the host").await;
        }
    });
    let mut out = p.take_stdout().unwrap();
    let mut text = String::new();
    tokio::time::timeout(BOUND, out.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    let exit = tokio::time::timeout(BOUND, p.wait()).await.unwrap();
    assert_eq!(exit.code, Some(0), "{exit:?} {text}");
    assert_eq!(text.trim(), "hello from the host");
}
