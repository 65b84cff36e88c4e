//! The escape suite: a hostile app, deployed through the platform like any
//! other (`stead dev` + `stead deploy`), tries to get out of its sandbox,
//! one way per endpoint (`GET /attempt/<name>` answers `{attempted,
//! contained, detail}`; see tests/apps/hostile/app.py). Every attempt is
//! one that succeeds for root outside a sandbox, and where its target is
//! on the host the test first checks that the target is really there (the
//! file exists, the port accepts), so that each assertion can fail.
//!
//! Run against every backend this host has: `process` always, `gvisor`
//! when `runsc` is installed (scripts/test installs it).

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{copy_dir, repo_root, tail, Dev};

/// How much slower other apps may get while the hostile one spins every
/// CPU it can: each request must still be answered within this.
const LATENCY_BOUND: Duration = Duration::from_millis(500);

struct Suite<'a> {
    dev: &'a Dev,
    backend: &'a str,
    attempts: u32,
    contained: u32,
    failures: Vec<String>,
}

impl Suite<'_> {
    /// Runs one attempt through the router and records its verdict.
    fn attempt(&mut self, name: &str, query: &str) -> serde_json::Value {
        let v = self.raw(name, query);
        self.record(
            name,
            v["attempted"] == true,
            v["contained"] == true,
            &v["detail"].to_string(),
        );
        v
    }

    /// Runs one attempt through the router, leaving the verdict to the
    /// caller.
    fn raw(&self, name: &str, query: &str) -> serde_json::Value {
        let path = if query.is_empty() {
            format!("/attempt/{name}")
        } else {
            format!("/attempt/{name}?{query}")
        };
        let (status, _, body) = self.dev.get("hostile", &path);
        serde_json::from_str(&body).unwrap_or_else(|_| {
            serde_json::json!({"attempted": false, "contained": false,
                               "detail": format!("HTTP {status}: {body}")})
        })
    }

    fn record(&mut self, name: &str, attempted: bool, contained: bool, detail: &str) {
        self.attempts += 1;
        let ok = attempted && contained;
        if ok {
            self.contained += 1;
        } else {
            self.failures.push(format!(
                "{name}: attempted={attempted} contained={contained}: {detail}"
            ));
        }
        println!(
            "[{}] {name}: {} — {detail}",
            self.backend,
            if ok { "contained" } else { "NOT CONTAINED" }
        );
    }
}

/// One line on the real stderr (the harness captures `println!`).
fn summary(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A TCP service on the host that accepts (and drops) connections.
fn host_service(addr: &str) -> (TcpListener, u16) {
    let l = TcpListener::bind(addr).expect("bind a host service");
    let port = l.local_addr().expect("addr").port();
    let l2 = l.try_clone().expect("clone");
    std::thread::spawn(move || {
        for c in l2.incoming() {
            drop(c);
        }
    });
    (l, port)
}

/// A non-loopback address of this machine, if it has one.
fn host_address() -> Option<String> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| a.contains('.') && !a.starts_with("127."))
        .map(str::to_owned)
}

fn reachable_from_host(target: &str) -> bool {
    target
        .parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some()
}

/// The router-facing endpoints (`ip:port` on the host) of an app's ready
/// instances, from the route table.
fn endpoints(dev: &Dev, app: &str) -> Vec<String> {
    let client = reqwest::blocking::Client::new();
    let table: serde_json::Value = client
        .get(format!("{}/v1/routes", dev.api()))
        .bearer_auth(dev.host_token())
        .send()
        .and_then(|r| r.json())
        .expect("route table");
    let mut out = Vec::new();
    let routes = table["apps"].as_array().cloned().unwrap_or_default();
    for r in routes.iter().filter(|r| r["app"] == app) {
        for e in r["endpoints"].as_array().cloned().unwrap_or_default() {
            if let Some(addr) = e["addr"].as_str() {
                out.push(addr.to_owned());
            }
        }
    }
    out
}

/// Latencies of `n` requests to the victim, spaced 100 ms apart.
fn victim_latencies(dev: &Dev, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let (status, _, body) = dev.get("victim", "/");
            assert_eq!(status, 200, "the victim stopped answering: {body}");
            let d = t.elapsed();
            std::thread::sleep(Duration::from_millis(100));
            d
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn events_text(dev: &Dev, app: &str) -> String {
    let client = reqwest::blocking::Client::new();
    client
        .get(format!("{}/v1/apps/{app}/events", dev.api()))
        .bearer_auth(dev.token())
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default()
}

fn deploy(dev: &Dev, dir: &Path) {
    let out = dev.run(&["deploy", dir.to_str().expect("path"), "--timeout", "180"]);
    assert!(
        out.status.success(),
        "deploying {}: {}\n{}\ndev log:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        common::stderr(&out),
        tail(&dev.log_text(), 60)
    );
}

fn run_suite(backend: &str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let env: Vec<(&str, &str)> = vec![("STEAD_SANDBOX", backend)];
    let dev = Dev::start_with_env(tmp.path(), &env);

    // The victim: another app, with a file of its own in its build and one
    // in its data directory.
    let victim = tmp.path().join("victim");
    copy_dir(&repo_root().join("examples/hello-python"), &victim);
    let toml = std::fs::read_to_string(victim.join("stead.toml")).expect("toml");
    std::fs::write(
        victim.join("stead.toml"),
        toml.replace("name = \"hello-python\"", "name = \"victim\""),
    )
    .expect("toml");
    std::fs::write(victim.join("secret.txt"), "the victim's secret\n").expect("secret");
    deploy(&dev, &victim);
    let hostile = tmp.path().join("hostile");
    copy_dir(
        &repo_root().join("crates/stead/tests/apps/hostile"),
        &hostile,
    );
    deploy(&dev, &hostile);

    let agent_dir = dev.data_dir.join("agent");
    let victim_build = agent_dir.join("apps/victim/v1/secret.txt");
    assert!(victim_build.is_file(), "the victim's build is on the host");
    let victim_data = agent_dir.join("appdata/victim");
    std::fs::create_dir_all(&victim_data).expect("victim data dir");
    let planted = victim_data.join("planted.txt");
    std::fs::write(&planted, "victim data\n").expect("plant");

    let mut s = Suite {
        dev: &dev,
        backend,
        attempts: 0,
        contained: 0,
        failures: Vec::new(),
    };

    // Files.
    assert!(Path::new("/etc/shadow").exists());
    s.attempt("read_shadow", "");
    s.attempt(
        "read_other_app",
        &format!("path={}", urlencode(&victim_build.display().to_string())),
    );
    s.attempt(
        "read_other_app",
        &format!("path={}", urlencode(&planted.display().to_string())),
    );
    // The platform's own state: tokens, the control plane's database.
    let host_token = dev.data_dir.join("host-token");
    assert!(host_token.is_file());
    s.attempt(
        "read_other_app",
        &format!("path={}", urlencode(&host_token.display().to_string())),
    );
    let host_names: Vec<String> = std::fs::read_dir(&dev.data_dir)
        .expect("data dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "agent")
        .collect();
    assert!(!host_names.is_empty());
    s.attempt(
        "list_agent_data",
        &format!(
            "path={}&secret={}",
            urlencode(&dev.data_dir.display().to_string()),
            urlencode(&host_names.join(","))
        ),
    );
    let escape_file = agent_dir.join("escaped");
    s.attempt("write_outside", "");
    // A path on the host: judged on the host.
    let v = s.raw(
        "write_outside",
        &format!(
            "host_path={}",
            urlencode(&escape_file.display().to_string())
        ),
    );
    s.record(
        "write_host_path",
        v["attempted"] == true,
        !escape_file.exists(),
        &format!(
            "{} (on the host: exists={})",
            v["detail"],
            escape_file.exists()
        ),
    );
    let hostile_build = agent_dir.join("apps/hostile/v1");
    for f in [
        PathBuf::from("/escape"),
        PathBuf::from("/usr/escape"),
        PathBuf::from("/etc/escape"),
        escape_file.clone(),
        hostile_build.join("escape"),
    ] {
        assert!(!f.exists(), "{} was written from the sandbox", f.display());
    }

    // Processes and the kernel.
    s.attempt("see_processes", "");
    s.attempt("ptrace", "");
    s.attempt("mount", "");
    s.attempt("load_module", "");
    s.attempt("raw_socket", "");
    s.attempt("unshare", "");

    // The network: every target accepts connections from the host.
    let (_l1, loopback_port) = host_service("127.0.0.1:0");
    let (_l2, any_port) = host_service("0.0.0.0:0");
    let victim_endpoints = endpoints(&dev, "victim");
    let own_endpoints = endpoints(&dev, "hostile");
    assert!(!victim_endpoints.is_empty(), "the victim has an endpoint");
    let mut targets = vec![
        ("another app's instance", victim_endpoints[0].clone()),
        ("the control plane", format!("127.0.0.1:{}", dev.api_port)),
        ("the router", format!("127.0.0.1:{}", dev.router_port)),
        (
            "a loopback service of the host",
            format!("127.0.0.1:{loopback_port}"),
        ),
    ];
    if let Some(e) = own_endpoints.first() {
        targets.push(("the agent (its endpoint for this very app)", e.clone()));
    }
    if let Some(ip) = host_address() {
        targets.push(("the host's own address", format!("{ip}:{any_port}")));
        targets.push((
            "the control plane on the host's address",
            format!("{ip}:{}", dev.api_port),
        ));
    }
    for (what, target) in &targets {
        if !target.contains(&format!(":{}", dev.api_port)) || target.starts_with("127.") {
            assert!(
                reachable_from_host(target),
                "{what} ({target}) is not even reachable from the host"
            );
        }
        let v = s.attempt("connect", &format!("targets={}", urlencode(target)));
        println!("    ({what})");
        let _ = v;
    }

    // Limits. A fork bomb: the pids limit stops it, and the host and the
    // other app keep answering meanwhile.
    let bomb_dev = dev.api();
    let bomb = std::thread::spawn({
        let router = dev.router();
        move || {
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client");
            client
                .get(format!("{router}/apps/hostile/attempt/fork_bomb"))
                .send()
                .and_then(|r| r.text())
                .unwrap_or_default()
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let during = victim_latencies(&dev, 5);
    let t = Instant::now();
    let health =
        reqwest::blocking::get(format!("{bomb_dev}/v1/health")).map(|r| r.status().as_u16());
    assert_eq!(
        health.ok(),
        Some(200),
        "the control plane answers during the fork bomb"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let bomb = bomb.join().expect("bomb thread");
    let v: serde_json::Value = serde_json::from_str(&bomb).unwrap_or_default();
    s.record(
        "fork_bomb",
        v["attempted"] == true,
        v["contained"] == true && during.iter().all(|d| *d < Duration::from_secs(5)),
        &format!(
            "{}; victim latencies during: {during:?}",
            if v.is_null() {
                bomb.clone()
            } else {
                v["detail"].to_string()
            }
        ),
    );

    s.attempt("disk_quota", "");

    // CPU: the hostile app spins twice as many processes as there are CPUs;
    // the victim's latency stays within the bound.
    let before = median(victim_latencies(&dev, 5));
    s.attempt("spin_cpus", "seconds=6");
    std::thread::sleep(Duration::from_millis(300));
    let spinning = victim_latencies(&dev, 15);
    let worst = *spinning.iter().max().expect("latencies");
    s.record(
        "spin_cpus_latency",
        true,
        worst < LATENCY_BOUND,
        &format!(
            "victim median {:?} before, median {:?} and worst {worst:?} while spinning (bound {LATENCY_BOUND:?})",
            before,
            median(spinning.clone())
        ),
    );

    // Memory: only the hostile instance is killed, and the platform says
    // it was the OOM killer.
    let ooms = |dev: &Dev| events_text(dev, "hostile").matches("OOM killer").count();
    let before = ooms(&dev);
    s.attempt("memory", "");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = before;
    while Instant::now() < deadline {
        after = ooms(&dev);
        if after > before {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (vstatus, _, _) = dev.get("victim", "/");
    s.record(
        "memory",
        true,
        after > before && vstatus == 200,
        &format!(
            "events naming the OOM killer: {before} before, {after} after; victim answers: {vstatus}"
        ),
    );
    let status = dev.ok(&["apps", "status", "hostile"]);
    println!("{status}");

    // Straight to stderr, past the test harness's capture: the counts are
    // part of every run's output, passed or not.
    summary(&format!(
        "escape suite ({backend}): {} attempts, {} contained",
        s.attempts, s.contained
    ));
    if !s.failures.is_empty() {
        println!("hostile events: {}", events_text(&dev, "hostile"));
    }
    assert!(
        s.failures.is_empty(),
        "not contained on {backend}:\n{}\ndev log:\n{}",
        s.failures.join("\n"),
        tail(&dev.log_text(), 40)
    );
    assert!(s.attempts >= 20, "{} attempts", s.attempts);
}

#[test]
fn escape_suite_process() {
    run_suite("process");
}

#[test]
fn escape_suite_gvisor() {
    assert!(
        stead_sandbox::find_runsc().is_some(),
        "runsc is not installed (scripts/test installs Debian's runsc package)"
    );
    run_suite("gvisor");
}

/// `[run] sandbox` and `[run] egress` of an app are honoured on a host
/// whose default is the process backend, and egress opens nothing of the
/// platform or the host.
#[test]
fn per_app_sandbox_and_egress() {
    assert!(
        stead_sandbox::find_runsc().is_some(),
        "runsc is not installed"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app = tmp.path().join("hostile");
    copy_dir(&repo_root().join("crates/stead/tests/apps/hostile"), &app);
    let toml = std::fs::read_to_string(app.join("stead.toml")).expect("toml");
    std::fs::write(
        app.join("stead.toml"),
        toml.replace("[run]\n", "[run]\nsandbox = \"gvisor\"\negress = true\n"),
    )
    .expect("toml");
    deploy(&dev, &app);
    let (status, _, body) = dev.get("hostile", "/whoami");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_ne!(v["kernel"], host_kernel.trim(), "runs under gVisor: {v}");
    assert!(
        v["routes"]
            .as_array()
            .is_some_and(|r| r.iter().any(|i| i == "eth0")),
        "egress gives it a route out: {v}"
    );
    let mut s = Suite {
        dev: &dev,
        backend: "gvisor+egress",
        attempts: 0,
        contained: 0,
        failures: Vec::new(),
    };
    let (_l1, loopback_port) = host_service("127.0.0.1:0");
    let (_l2, any_port) = host_service("0.0.0.0:0");
    let mut targets = vec![
        format!("127.0.0.1:{}", dev.api_port),
        format!("127.0.0.1:{}", dev.router_port),
        format!("127.0.0.1:{loopback_port}"),
        // The host end of the first egress link (the host itself).
        "10.213.0.1:22".to_string(),
    ];
    if let Some(ip) = host_address() {
        assert!(reachable_from_host(&format!("{ip}:{any_port}")));
        targets.push(format!("{ip}:{any_port}"));
        targets.push(format!("{ip}:{}", dev.router_port));
    }
    for t in &targets {
        s.attempt("connect", &format!("targets={}", urlencode(t)));
    }
    summary(&format!(
        "per-app gvisor + egress: {} attempts, {} contained",
        s.attempts, s.contained
    ));
    assert!(s.failures.is_empty(), "{}", s.failures.join("\n"));
}
