//! Egress instances: a veth pair to the host, NAT to the outside world,
//! and nothing else. "The outside world" here is a network namespace this
//! test makes (198.51.100.0/24, a documentation range): no packet leaves
//! the machine. Root, iproute2, nftables and python3 needed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stead_sandbox::{NetworkMode, Output, ProcessSandbox, SandboxSpec};
use tokio::io::AsyncReadExt;

fn sandbox() -> ProcessSandbox {
    ProcessSandbox::new(PathBuf::from(env!("CARGO_BIN_EXE_stead-sandbox-init")))
        .expect("process sandbox")
}

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().expect("sh");
    assert!(st.success(), "{cmd}");
}

/// A namespace standing for the internet, with a TCP server on
/// 198.51.100.2:8080 that answers "outside".
struct Outside {
    ns: String,
    server: Child,
}

impl Outside {
    fn new() -> Outside {
        let n = std::process::id() % 10000;
        let ns = format!("stead-test-out-{n}");
        let host_if = format!("sto{n}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let _ = Command::new("ip").args(["link", "del", &host_if]).status();
        sh(&format!(
            "ip netns add {ns} && ip link add {host_if} type veth peer name eth0 netns {ns} && \
             ip addr add 198.51.100.1/24 dev {host_if} && ip link set {host_if} up && \
             ip -n {ns} addr add 198.51.100.2/24 dev eth0 && ip -n {ns} link set eth0 up && \
             ip -n {ns} link set lo up"
        ));
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c"])
            .arg(
                "import socket\n\
                 s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('198.51.100.2', 8080)); s.listen(16)\n\
                 while True:\n    c,_=s.accept(); c.sendall(b'outside'); c.close()\n",
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("outside server");
        // Wait until it listens.
        for _ in 0..100 {
            if std::net::TcpStream::connect_timeout(
                &"198.51.100.2:8080".parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Outside { ns, server }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Runs `python3 -c <probe>` that connects to each target and prints
/// `target ok` or `target <error>`.
async fn probe(
    sb: &ProcessSandbox,
    name: &str,
    network: NetworkMode,
    targets: &[String],
) -> String {
    let script = format!(
        "import socket\nfor t in {targets:?}:\n    h,p=t.rsplit(':',1)\n    try:\n        s=socket.create_connection((h,int(p)),timeout=1.5); s.close(); print(t,'ok')\n    except OSError as e:\n        print(t, type(e).__name__, e.errno)\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("probe.py"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut p = sb
        .spawn(SandboxSpec {
            network,
            stdout: Output::Pipe,
            stderr: Output::Pipe,
            confine: Some(stead_sandbox::Confinement::detect()),
            ..SandboxSpec::new(
                format!("e-{name}-{}", std::process::id()),
                dir.path(),
                "exec python3 probe.py",
            )
        })
        .await
        .expect("spawn");
    let mut out = p.take_stdout().unwrap();
    let mut err = p.take_stderr().unwrap();
    let (mut o, mut e) = (String::new(), String::new());
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        let _ = tokio::join!(out.read_to_string(&mut o), err.read_to_string(&mut e));
    })
    .await;
    let exit = p.wait().await;
    assert_eq!(exit.code, Some(0), "{o}\n{e}");
    o
}

/// Stops the sandbox when the test ends, passed or not.
struct StopOnDrop(Option<stead_sandbox::SandboxProcess>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = p.kill();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_reaches_the_outside_and_nothing_else() {
    let outside = Outside::new();
    let sb = sandbox();
    // A service on every address of the host, and a long-running egress
    // instance to aim at.
    let host = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host.local_addr().unwrap().port();
    let other = sb
        .spawn(SandboxSpec {
            network: NetworkMode::Egress,
            ..SandboxSpec::new(
                format!("e-other-{}", std::process::id()),
                "/",
                "exec python3 -m http.server 8081 --bind 0.0.0.0",
            )
        })
        .await
        .expect("spawn the other instance");
    let mut guard = StopOnDrop(Some(other));
    let other = guard.0.as_ref().expect("other");
    let other_ip = other.egress_link().expect("the other instance's link");
    let targets = vec![
        "198.51.100.2:8080".to_string(),
        format!("198.51.100.1:{host_port}"),
        format!("{}:{host_port}", other_ip.host),
        format!("{}:8081", other_ip.inside),
        format!("127.0.0.1:{host_port}"),
    ];
    let out = probe(&sb, "egress", NetworkMode::Egress, &targets).await;
    let line = |t: &str| {
        out.lines()
            .find(|l| l.starts_with(t))
            .unwrap_or_else(|| panic!("{t} missing: {out}"))
            .to_owned()
    };
    assert!(
        line("198.51.100.2:8080").ends_with(" ok"),
        "the outside world: {out}"
    );
    for t in &targets[1..] {
        assert!(!line(t).ends_with(" ok"), "{t} must be unreachable: {out}");
    }
    // Without egress: nothing at all, not even the outside.
    let out = probe(&sb, "isolated", NetworkMode::Isolated, &targets).await;
    assert!(
        out.lines().all(|l| !l.ends_with(" ok")),
        "an isolated instance reached something: {out}"
    );
    // The link dies with the sandbox (once the handle, which holds its
    // namespace for `connect`, is gone too).
    let slot_if = format!("/sys/class/net/stv{}", other_ip.slot);
    other.stop(Duration::from_secs(2)).await;
    guard.0 = None;
    for _ in 0..100 {
        if !std::path::Path::new(&slot_if).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !std::path::Path::new(&slot_if).exists(),
        "{slot_if} left behind"
    );
    drop(outside);
}
