//! Several hosts on one machine: each host is a network namespace made by
//! the test (a veth pair to the root namespace, 10.250.N.0/30 addresses
//! used only here), running its own `stead agent`; `stead server` (on a
//! throwaway PostgreSQL) and `stead router` run in the root namespace. The
//! server listens on an address the test adds to the root namespace's
//! loopback (10.251.N.1/32), reachable from the host namespaces through
//! their veth. No packet leaves the machine.
//!
//! Scenarios: draining a host under a steady request load fails no
//! request; a host partitioned past the host timeout is replaced, and when
//! it heals its stale instance is fenced (stopped), so the app never runs
//! twice after the healing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, tail, wait_clean_exit, Load, BIN};
use serde_json::Value;

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn must(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A per-process number so that tests running at once (other test binaries,
/// other engineers) do not collide on names or addresses.
fn slot() -> u32 {
    std::process::id() % 60
}

/// The address the server listens on, on the root namespace's loopback;
/// removed on drop.
struct ServerAddr {
    ip: String,
}

impl ServerAddr {
    fn add(test: u32) -> ServerAddr {
        let ip = format!("10.251.{}.1", slot() * 4 + test);
        // (slot() * 4 + test <= 241: a valid octet.)
        sh(&["ip", "addr", "del", &format!("{ip}/32"), "dev", "lo"]);
        must(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        ServerAddr { ip }
    }
}

impl Drop for ServerAddr {
    fn drop(&mut self) {
        sh(&["ip", "addr", "del", &format!("{}/32", self.ip), "dev", "lo"]);
    }
}

/// A host: a network namespace with a veth to the root namespace, and an
/// agent in it. Dropping it kills every process of the host (its agent and
/// its instances' sandboxes) and deletes the namespace and the veth.
struct Host {
    name: String,
    netns: String,
    veth_root: String,
    ip: String,
    data_dir: PathBuf,
    log: PathBuf,
    agent: Option<Child>,
    /// The agent's `--server` list, token and builds flag, to start it again.
    servers: String,
    token: String,
    builds: bool,
}

impl Host {
    fn new(root: &Path, test: u32, index: u32, server: &str, token: &str, builds: bool) -> Host {
        let n = slot() * 4 + test;
        let netns = format!("stead-t{}-{test}-{index}", std::process::id());
        let veth_root = format!("sth{n}x{index}r");
        let veth_ns = format!("sth{n}x{index}n");
        let base = 4 * index;
        let net = |last: u32| format!("10.250.{n}.{}", base + last);
        // Leftovers of a crashed earlier run with the same numbers.
        sh(&["ip", "netns", "del", &netns]);
        sh(&["ip", "link", "del", &veth_root]);
        must(&["ip", "netns", "add", &netns]);
        let host = Host {
            name: format!("host-{index}"),
            netns: netns.clone(),
            veth_root: veth_root.clone(),
            ip: net(2),
            data_dir: root.join(format!("host-{index}")),
            log: root.join(format!("agent-{index}.log")),
            agent: None,
            servers: String::new(),
            token: token.to_string(),
            builds,
        };
        must(&[
            "ip", "link", "add", &veth_root, "type", "veth", "peer", "name", &veth_ns,
        ]);
        must(&["ip", "link", "set", &veth_ns, "netns", &netns]);
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", net(1)),
            "dev",
            &veth_root,
        ]);
        must(&["ip", "link", "set", &veth_root, "up"]);
        let ns = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &netns];
            full.extend_from_slice(args);
            must(&full);
        };
        ns(&["ip", "link", "set", "lo", "up"]);
        ns(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", net(2)),
            "dev",
            &veth_ns,
        ]);
        ns(&["ip", "link", "set", &veth_ns, "up"]);
        // `server`: one or more `ip:port`, comma-separated, on one address.
        let server_ip = server.split(':').next().unwrap_or(server);
        ns(&[
            "ip",
            "route",
            "add",
            &format!("{server_ip}/32"),
            "via",
            &net(1),
        ]);
        let mut host = host;
        host.servers = server
            .split(',')
            .map(|s| format!("http://{s}"))
            .collect::<Vec<_>>()
            .join(",");
        host.agent = Some(host.spawn_agent());
        host
    }

    /// Starts a new agent on the host's data directory while the old one
    /// runs: it takes over; waits for the old one to exit cleanly.
    fn replace_agent(&mut self, within: Duration) {
        let new = self.spawn_agent();
        if let Some(mut old) = self.agent.take() {
            let what = format!("{}'s old agent, after handing over", self.name);
            wait_clean_exit(&mut old, within, &what, || self.agent_log());
        }
        self.agent = Some(new);
    }

    fn spawn_agent(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        // nsenter, not `ip netns exec`: only the network namespace changes
        // (`ip netns exec` also remounts /sys, hiding the cgroup hierarchy
        // the sandboxes need).
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .args(["--", BIN, "agent"])
            .args(["--server", &self.servers])
            .args(["--token", &self.token])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--name", &self.name, "--advertise-ip", &self.ip])
            .args(if self.builds {
                &[][..]
            } else {
                &["--no-builds"][..]
            })
            .env("STEAD_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn agent")
    }

    /// Drops the host's link: it can neither reach the control plane nor
    /// be reached by the router.
    fn partition(&self) {
        must(&["ip", "link", "set", &self.veth_root, "down"]);
    }

    fn heal(&self) {
        must(&["ip", "link", "set", &self.veth_root, "up"]);
    }

    /// Sandbox init pids of the instances this host's agent recorded,
    /// that are still running.
    fn instance_pids(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.data_dir.join("instances")) else {
            return out;
        };
        for e in dir.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path().join("instance.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let (Some(id), Some(pid)) = (v["id"].as_str(), v["sandbox"]["pid"].as_u64()) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                out.push((id.to_string(), pid as u32));
            }
        }
        out
    }

    fn agent_log(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    /// Kills everything of the host: the agent, its instances' sandboxes
    /// and anything else left in the namespace.
    fn kill_all(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, pid) in self.instance_pids() {
            sh(&["kill", "-9", &pid.to_string()]);
        }
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                sh(&["kill", "-9", pid]);
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_all();
        // Bounded: the sandboxes' inits are gone after SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.instance_pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        sh(&["ip", "netns", "del", &self.netns]);
        sh(&["ip", "link", "del", &self.veth_root]);
        // The apps' data directories are loop-mounted images; a killed
        // agent leaves them mounted.
        let prefix = self.data_dir.display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            sh(&["umount", "-d", &m]);
        }
    }
}

/// A TCP forwarder from `listen_ip:<free port>` to `target`, so that the
/// host namespaces reach a server that listens on the root namespace's
/// 127.0.0.1 (the throwaway PostgreSQL). Stops accepting on drop.
struct Forwarder {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(listen_ip: &str, target: &str) -> Forwarder {
        let listener =
            std::net::TcpListener::bind(format!("{listen_ip}:0")).expect("bind forwarder");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, target) = (stop.clone(), target.to_string());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        let _ = inbound.set_nonblocking(false);
                        let Ok(outbound) = std::net::TcpStream::connect(&target) else {
                            continue;
                        };
                        let (Ok(mut a), Ok(mut b)) = (inbound.try_clone(), outbound.try_clone())
                        else {
                            continue;
                        };
                        let (mut inbound, mut outbound) = (inbound, outbound);
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut a, &mut outbound);
                            let _ = outbound.shutdown(std::net::Shutdown::Write);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut b, &mut inbound);
                            let _ = inbound.shutdown(std::net::Shutdown::Write);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Forwarder {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Proc(Option<Child>, PathBuf, Vec<String>);

impl Proc {
    fn start(log: PathBuf, args: &[String]) -> Proc {
        let child = Self::spawn(&log, args);
        Proc(Some(child), log, args.to_vec())
    }

    fn spawn(log: &Path, args: &[String]) -> Child {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        Command::new(BIN)
            .args(args)
            .env("STEAD_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("spawn")
    }

    /// SIGTERM, wait for a clean exit (at most `within`), start again.
    fn restart_gracefully(&mut self, within: Duration) {
        if let Some(mut c) = self.0.take() {
            sh(&["kill", "-15", &c.id().to_string()]);
            wait_clean_exit(&mut c, within, "after SIGTERM", || self.text());
        }
        self.0 = Some(Self::spawn(&self.1, &self.2));
    }

    /// Starts a second process with the same arguments, which takes over
    /// from the running one; waits (at most `within`) for the old one to
    /// exit cleanly.
    fn replace(&mut self, within: Duration) {
        let new = Self::spawn(&self.1, &self.2);
        if let Some(mut old) = self.0.take() {
            wait_clean_exit(
                &mut old,
                within,
                "the old process, after handing over",
                || self.text(),
            );
        }
        self.0 = Some(new);
    }
    fn text(&self) -> String {
        tail(&std::fs::read_to_string(&self.1).unwrap_or_default(), 60)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Cluster {
    root: PathBuf,
    api: String,
    router: String,
    user_token: String,
    host_token: String,
    // Field order is drop order: hosts (and their processes) first.
    hosts: Vec<Host>,
    builder: Option<Proc>,
    server: Proc,
    /// A second control-plane replica on the same database, if asked for.
    server2: Option<Proc>,
    router_proc: Proc,
    _forwarder: Option<Forwarder>,
    _addr: ServerAddr,
    _pg: stead_store::testing::PgGuard,
    _rt: tokio::runtime::Runtime,
}

impl Cluster {
    fn start(root: &Path, test: u32, hosts: u32, host_timeout: &str) -> Cluster {
        Self::start_with(root, test, hosts, host_timeout, false)
    }

    /// With `app_databases`, apps get PostgreSQL databases (reached from
    /// the host namespaces through a forwarder on the server's address),
    /// and builds run on a builder agent in the root namespace (the host
    /// namespaces have no way out to package indexes), which is drained at
    /// once so that it gets no instances.
    fn start_with(
        root: &Path,
        test: u32,
        hosts: u32,
        host_timeout: &str,
        app_databases: bool,
    ) -> Cluster {
        Self::start_full(root, test, hosts, host_timeout, app_databases, false)
    }

    /// With `two_replicas`, a second `stead server` on the same database
    /// (and secret key), and every agent and the router given both.
    fn start_full(
        root: &Path,
        test: u32,
        hosts: u32,
        host_timeout: &str,
        app_databases: bool,
        two_replicas: bool,
    ) -> Cluster {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let pg = rt.block_on(stead_store::testing::postgres_database());
        let db = pg.url.clone();
        let user_token = common::create_token(&db, &["--org", "acme"]);
        let host_token = common::create_token(&db, &["--host"]);
        let addr = ServerAddr::add(test);
        let api_port = free_port();
        let router_port = free_port();
        let server_ip = format!("{}:{api_port}", addr.ip);
        let api = format!("http://{server_ip}");
        let router = format!("http://127.0.0.1:{router_port}");
        let mut forwarder = None;
        let mut extra: Vec<String> = Vec::new();
        if app_databases {
            let admin = pg.admin_url().to_string();
            let pg_addr = admin
                .split('@')
                .nth(1)
                .and_then(|r| r.split('/').next())
                .expect("host:port in the admin URL")
                .to_string();
            let f = Forwarder::start(&addr.ip, &pg_addr);
            extra.push("--app-database-url".into());
            extra.push(admin.replace(&pg_addr, &f.addr));
            forwarder = Some(f);
        }
        let server_args = |listen: &str, data: &str| -> Vec<String> {
            [
                "server",
                "--database",
                &db,
                "--listen",
                listen,
                "--data-dir",
                &root.join(data).display().to_string(),
                "--router-url",
                &router,
                "--host-timeout",
                host_timeout,
                "--secret-key-file",
                &root.join("secret.key").display().to_string(),
            ]
            .into_iter()
            .map(str::to_string)
            .chain(extra.iter().cloned())
            .collect()
        };
        let server = Proc::start(root.join("server.log"), &server_args(&server_ip, "server"));
        let (server2, servers) = if two_replicas {
            // After the first has written the key file both use.
            common::wait_until(
                "the first replica",
                Duration::from_secs(60),
                || server.text(),
                || {
                    let r = reqwest::blocking::get(format!("http://{server_ip}/v1/health")).ok()?;
                    r.status().is_success().then_some(())
                },
            );
            let second = format!("{}:{}", addr.ip, free_port());
            let p = Proc::start(root.join("server2.log"), &server_args(&second, "server2"));
            (Some(p), format!("{server_ip},{second}"))
        } else {
            (None, server_ip.clone())
        };
        let server_urls = servers
            .split(',')
            .map(|s| format!("http://{s}"))
            .collect::<Vec<_>>()
            .join(",");
        let router_proc = Proc::start(
            root.join("router.log"),
            &[
                "router".into(),
                "--server".into(),
                server_urls.clone(),
                "--token".into(),
                host_token.clone(),
                "--listen".into(),
                format!("127.0.0.1:{router_port}"),
            ],
        );
        let mut c = Cluster {
            root: root.to_path_buf(),
            api,
            router,
            user_token,
            host_token: host_token.clone(),
            hosts: Vec::new(),
            builder: None,
            server,
            server2,
            router_proc,
            _forwarder: forwarder,
            _addr: addr,
            _pg: pg,
            _rt: rt,
        };
        c.wait(
            "the control plane and the router",
            Duration::from_secs(60),
            || {
                let http = c.http();
                let api = http.get(format!("{}/v1/health", c.api)).send().ok()?;
                for url in server_urls.split(',') {
                    let r = http.get(format!("{url}/v1/health")).send().ok()?;
                    if !r.status().is_success() {
                        return None;
                    }
                }
                let r = http
                    .get(format!("{}/_stead/health", c.router))
                    .send()
                    .ok()?;
                (api.status().is_success() && r.status().is_success()).then_some(())
            },
        );
        if app_databases {
            c.builder = Some(Proc::start(
                root.join("builder.log"),
                &[
                    "agent".into(),
                    "--server".into(),
                    server_urls.clone(),
                    "--token".into(),
                    host_token.clone(),
                    "--data-dir".into(),
                    root.join("builder").display().to_string(),
                    "--name".into(),
                    "builder".into(),
                ],
            ));
            c.wait("the builder to register", Duration::from_secs(60), || {
                c.host_state("builder").map(|_| ())
            });
            c.ok_with(&host_token, &["hosts", "drain", "builder"]);
        }
        for i in 0..hosts {
            let h = Host::new(root, test, i + 1, &servers, &host_token, !app_databases);
            c.hosts.push(h);
        }
        c.wait("every host to register", Duration::from_secs(60), || {
            let hosts = c.hosts_list();
            (hosts.iter().filter(|h| h["state"] == "alive").count() == hosts_len(&c)).then_some(())
        });
        c
    }

    fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    fn cli_with(&self, token: &str, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .env("STEAD_API", &self.api)
            .env("STEAD_TOKEN", token)
            .env("STEAD_CONFIG_DIR", self.root.join("config"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cli")
    }

    fn ok_with(&self, token: &str, args: &[&str]) -> String {
        let out = self.cli_with(token, args);
        assert!(
            out.status.success(),
            "`stead {}` failed:\n{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(&self.user_token, args)
    }

    fn hosts_list(&self) -> Vec<Value> {
        let out = self.cli_with(&self.user_token, &["hosts", "list", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    fn host_state(&self, name: &str) -> Option<Value> {
        self.hosts_list().into_iter().find(|h| h["name"] == name)
    }

    /// Instances of the app as the control plane lists them: (host, state).
    fn instances(&self, app: &str) -> Vec<(String, String)> {
        let out = self.cli_with(&self.user_token, &["apps", "status", app, "--json"]);
        let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
            return Vec::new();
        };
        v["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["state"] != "exited")
                    .map(|i| {
                        (
                            i["host"].as_str().unwrap_or("").to_string(),
                            i["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut s = format!(
            "server:\n{}\nrouter:\n{}\n",
            self.server.text(),
            self.router_proc.text()
        );
        for h in &self.hosts {
            s.push_str(&format!("{} agent:\n{}\n", h.name, h.agent_log()));
        }
        s
    }

    fn wait<T>(&self, what: &str, within: Duration, f: impl FnMut() -> Option<T>) -> T {
        common::wait_until(what, within, || self.logs(), f)
    }

    fn get(&self, app: &str) -> Result<u16, String> {
        self.http()
            .get(format!("{}/apps/{app}/", self.router))
            .send()
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    }
}

fn hosts_len(c: &Cluster) -> usize {
    c.hosts.len()
}

/// hello-python as `name` with a fixed instance count.
fn app_dir(root: &Path, name: &str, count: u32) -> PathBuf {
    let dir = common::copy_example("hello-python", &root.join(name));
    let toml = std::fs::read_to_string(dir.join("stead.toml")).expect("toml");
    let toml = toml.replace("name = \"hello-python\"", &format!("name = \"{name}\""));
    std::fs::write(
        dir.join("stead.toml"),
        format!("{toml}\n[scale]\nmin = {count}\nmax = {count}\n"),
    )
    .expect("write");
    dir
}

#[test]
fn drain_moves_instances_without_failing_requests() {
    let tmp = tempfile::tempdir().expect("tmp");
    let c = Cluster::start(tmp.path(), 0, 2, "5s");
    // Spread: two instances, one on each host.
    let spread = "spread";
    let dir = app_dir(tmp.path(), spread, 2);
    c.ok(&["deploy", dir.to_str().expect("p"), "--timeout", "300"]);
    c.wait(
        "one ready instance per host",
        Duration::from_secs(120),
        || {
            let mut hosts: Vec<String> = c
                .instances(spread)
                .into_iter()
                .filter(|(_, s)| s == "ready")
                .map(|(h, _)| h)
                .collect();
            hosts.sort();
            (hosts == ["host-1", "host-2"]).then_some(())
        },
    );
    // The app under load has one instance: draining its host must start
    // the replacement elsewhere and stop the old one only once the new one
    // is ready, or requests fail.
    let app = "drained";
    let dir = app_dir(tmp.path(), app, 1);
    c.ok(&["deploy", dir.to_str().expect("p"), "--timeout", "300"]);
    let victim = c.wait("a ready instance", Duration::from_secs(120), || {
        let inst = c.instances(app);
        (inst.len() == 1 && inst[0].1 == "ready").then(|| inst[0].0.clone())
    });
    let (v, other) = if victim == "host-1" {
        (0, "host-2")
    } else {
        (1, "host-1")
    };
    assert_eq!(c.get(app), Ok(200));

    // A user token may not drain (hosts are shared by every organisation);
    // unknown hosts are a clear error.
    let out = c.cli_with(&c.user_token, &["hosts", "drain", &victim]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli_with(&c.host_token, &["hosts", "drain", "nope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not registered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let load = Load::start(&format!("{}/apps/{app}/", c.router), 4, false);
    // Some requests before the drain, so the load is known to work.
    c.wait("requests flowing", Duration::from_secs(30), || {
        (load.ok.load(Ordering::Relaxed) >= 50).then_some(())
    });
    let t0 = Instant::now();
    let drained: Value =
        serde_json::from_str(&c.ok_with(&c.host_token, &["hosts", "drain", &victim, "--json"]))
            .expect("json");
    assert_eq!(drained["state"], "draining");
    assert_eq!(drained["draining"], true);
    // Every instance of both apps ends up on the other host; the drained
    // host runs nothing.
    c.wait(
        "the drained host's instances replaced",
        Duration::from_secs(120),
        || {
            let a = c.instances(app);
            let b = c.instances(spread);
            let h = c.host_state(&victim)?;
            (a.len() == 1
                && b.len() == 2
                && a.iter()
                    .chain(b.iter())
                    .all(|(h, s)| h == other && s == "ready")
                && h["instances"] == 0
                && c.hosts[v].instance_pids().is_empty())
            .then_some(())
        },
    );
    let moved = t0.elapsed();
    // A little more load on the new placement, then stop.
    let before = load.ok.load(Ordering::Relaxed);
    c.wait("requests after the move", Duration::from_secs(30), || {
        (load.ok.load(Ordering::Relaxed) >= before + 50).then_some(())
    });
    let (ok, failed, errors) = load.finish();
    println!(
        "drain under load: {ok} requests succeeded, {failed} failed; the drained host was empty {:.1} s after `stead hosts drain`",
        moved.as_secs_f64()
    );
    assert_eq!(failed, 0, "failed requests during the drain: {errors:?}");
    // In the event log, the replacement was ready before the old instance
    // exited.
    let events: Value = c
        .http()
        .get(format!("{}/v1/apps/{app}/events", c.api))
        .bearer_auth(&c.user_token)
        .send()
        .and_then(|r| r.json())
        .expect("events");
    let events = events.as_array().expect("events").clone();
    let ready_new = events
        .iter()
        .position(|e| e["kind"] == "instance_ready" && e["data"]["host"] == other);
    let exit_old = events
        .iter()
        .position(|e| e["kind"] == "instance_exited" && e["data"]["host"] == victim.as_str());
    assert!(
        matches!((ready_new, exit_old), (Some(r), Some(x)) if r < x),
        "the replacement must be ready before the old instance exits: {events:?}"
    );
    let h = c.host_state(&victim).expect("victim");
    assert_eq!(h["state"], "draining");

    // Undrain: the host takes new instances again, nothing moves back.
    let undrained: Value =
        serde_json::from_str(&c.ok_with(&c.host_token, &["hosts", "undrain", &victim, "--json"]))
            .expect("json");
    assert_eq!(undrained["state"], "alive");
    // Several heartbeats of both hosts (poll interval 1 s).
    std::thread::sleep(Duration::from_secs(3));
    let inst = c.instances(app);
    assert!(
        inst.len() == 1 && inst.iter().all(|(h, _)| h == other),
        "running instances moved after undrain: {inst:?}"
    );
    let list = c.ok(&["hosts", "list"]);
    assert!(list.contains("alive"), "{list}");
}

#[test]
fn a_partitioned_host_is_replaced_and_fenced_when_it_heals() {
    let tmp = tempfile::tempdir().expect("tmp");
    let c = Cluster::start(tmp.path(), 1, 2, "3s");
    let app = "fenced";
    let dir = app_dir(tmp.path(), app, 1);
    c.ok(&["deploy", dir.to_str().expect("p"), "--timeout", "300"]);
    let first = c.wait("a ready instance", Duration::from_secs(120), || {
        let inst = c.instances(app);
        (inst.len() == 1 && inst[0].1 == "ready").then(|| inst[0].0.clone())
    });
    let (victim, other) = if first == "host-1" {
        (&c.hosts[0], &c.hosts[1])
    } else {
        (&c.hosts[1], &c.hosts[0])
    };
    let stale = victim.instance_pids();
    assert_eq!(stale.len(), 1, "{stale:?}");

    victim.partition();
    let t0 = Instant::now();
    c.wait(
        "the partitioned host judged dead and replaced",
        Duration::from_secs(60),
        || {
            let h = c.host_state(&victim.name)?;
            // The dead host's instance is still listed (as last reported):
            // only the one on the live host counts.
            let inst: Vec<(String, String)> = c
                .instances(app)
                .into_iter()
                .filter(|(h, _)| h == &other.name)
                .collect();
            (h["state"] == "dead"
                && inst.len() == 1
                && inst[0].1 == "ready"
                && c.get(app) == Ok(200))
            .then_some(())
        },
    );
    let replaced = t0.elapsed();
    // The partitioned agent cannot know: its instance still runs there.
    assert_eq!(
        victim.instance_pids(),
        stale,
        "the stale instance kept running during the partition"
    );

    victim.heal();
    let t1 = Instant::now();
    c.wait(
        "the stale instance fenced and stopped",
        Duration::from_secs(60),
        || {
            let h = c.host_state(&victim.name)?;
            (h["state"] == "alive" && h["fenced"] == 0 && victim.instance_pids().is_empty())
                .then_some(())
        },
    );
    let fenced = t1.elapsed();
    // After healing the app runs once, on the other host, for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let inst = c.instances(app);
        let running = victim.instance_pids().len() + other.instance_pids().len();
        assert_eq!(running, 1, "instances running after healing: {inst:?}");
        assert_eq!(inst.len(), 1, "{inst:?}");
        assert_eq!(inst[0].0, other.name);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.get(app), Ok(200));
    let events = c
        .http()
        .get(format!("{}/v1/apps/{app}/events", c.api))
        .bearer_auth(&c.user_token)
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    assert!(events.contains("fenced"), "no fencing event:\n{events}");
    println!(
        "partition: replaced on {} {:.1} s after the link dropped (host timeout 3 s); stale instance stopped {:.1} s after healing",
        other.name,
        replaced.as_secs_f64(),
        fenced.as_secs_f64()
    );
}

/// Every step execution the app recorded, on every host: each instance
/// appends to `executions.jsonl` in its host's data directory for the app
/// (which stays readable after the host's processes are killed).
fn all_executions(c: &Cluster, app: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for h in &c.hosts {
        let path = h
            .data_dir
            .join("appdata")
            .join(app)
            .join("executions.jsonl");
        for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                out.push(v);
            }
        }
    }
    out
}

fn executions(c: &Cluster, app: &str) -> Vec<Value> {
    match c
        .http()
        .get(format!("{}/apps/{app}/executions", c.router))
        .send()
    {
        Ok(r) if r.status().is_success() => r.json::<Vec<Value>>().unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn count(execs: &[Value], wf: &str, step: u64, event: &str) -> usize {
    execs
        .iter()
        .filter(|e| {
            e["workflow_id"] == wf && e["step"].as_u64() == Some(step) && e["event"] == event
        })
        .count()
}

#[test]
fn a_killed_host_s_workflow_completes_on_another_host() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start_with(tmp.path(), 2, 2, "3s", true);
    let app = "wf-hosts";
    let dir = common::copy_example("dbos-python", tmp.path());
    c.ok(&[
        "deploy",
        dir.to_str().expect("p"),
        "--app",
        app,
        "--timeout",
        "900",
    ]);
    let resp = c
        .http()
        .post(format!(
            "{}/apps/{app}/workflows/start?steps=4&step_seconds=2",
            c.router
        ))
        .send()
        .expect("start workflow");
    assert!(resp.status().is_success(), "{}", resp.status());
    let wf = resp.json::<Value>().expect("json")["workflow_id"]
        .as_str()
        .expect("workflow id")
        .to_string();
    let executor = c.wait("step 2 to start", Duration::from_secs(60), || {
        executions(&c, app)
            .iter()
            .find(|e| e["workflow_id"] == wf.as_str() && e["step"] == 2 && e["event"] == "start")
            .and_then(|e| e["executor"].as_str().map(str::to_string))
    });
    let status: Value =
        serde_json::from_str(&c.ok(&["apps", "status", app, "--json"])).expect("json");
    let victim_host = status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["executor_id"] == executor.as_str())
        .and_then(|i| i["host"].as_str())
        .unwrap_or_else(|| panic!("no instance runs executor {executor}: {status}"))
        .to_string();
    let victim = c
        .hosts
        .iter()
        .position(|h| h.name == victim_host)
        .unwrap_or_else(|| panic!("the workflow runs on {victim_host}, not on a test host"));
    let killed_at = Instant::now();
    c.hosts[victim].kill_all();
    c.wait(
        "the workflow to complete on another host",
        Duration::from_secs(180),
        || {
            let out = c.cli_with(&c.user_token, &["workflows", "get", app, &wf, "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["status"] == "SUCCESS").then_some(())
        },
    );
    let took = killed_at.elapsed();
    let ex = all_executions(&c, app);
    assert_eq!(
        count(&ex, &wf, 1, "start"),
        1,
        "step 1 had completed and must not run again: {ex:?}"
    );
    assert_eq!(count(&ex, &wf, 1, "end"), 1, "{ex:?}");
    assert!(
        count(&ex, &wf, 2, "start") >= 2,
        "step 2 was interrupted and must run again: {ex:?}"
    );
    assert_eq!(count(&ex, &wf, 2, "end"), 1, "{ex:?}");
    for step in [3, 4] {
        assert_eq!(count(&ex, &wf, step, "start"), 1, "step {step}: {ex:?}");
        assert_eq!(count(&ex, &wf, step, "end"), 1, "step {step}: {ex:?}");
    }
    // The steps after the kill ran on the other host's instance.
    let finisher = ex
        .iter()
        .find(|e| e["workflow_id"] == wf.as_str() && e["step"] == 4 && e["event"] == "end")
        .and_then(|e| e["executor"].as_str())
        .unwrap_or_default()
        .to_string();
    let status: Value =
        serde_json::from_str(&c.ok(&["apps", "status", app, "--json"])).expect("json");
    let finisher_host = status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["executor_id"] == finisher.as_str() && i["state"] != "exited")
        .and_then(|i| i["host"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        !finisher_host.is_empty() && finisher_host != victim_host,
        "the workflow finished under executor {finisher} on {finisher_host:?}, expected another host than {victim_host}: {status}"
    );
    println!(
        "host kill: workflow {wf} completed on {finisher_host} {:.1} s after every process of {victim_host} was killed (host timeout 3 s)",
        took.as_secs_f64()
    );
}

/// Upgrading every process of the platform one at a time under a steady
/// request load: both control-plane replicas (SIGTERM, start again; the
/// others fail over), the router (a new one takes its listening socket
/// over), and each agent, the builder's too (a new one takes its
/// instances' sockets over), while a workflow runs. No request fails, no
/// instance is restarted or runs twice, and the workflow completes with
/// every step once.
#[test]
fn upgrading_every_process_one_by_one_fails_no_request() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start_full(tmp.path(), 3, 2, "10s", true, true);
    // One instance of `web` per host, and a DBOS app with a workflow.
    c.ok(&[
        "deploy",
        app_dir(tmp.path(), "web", 2).to_str().expect("p"),
        "--timeout",
        "600",
    ]);
    let app = "wf-upgrade";
    let dir = common::copy_example("dbos-python", tmp.path());
    c.ok(&[
        "deploy",
        dir.to_str().expect("p"),
        "--app",
        app,
        "--timeout",
        "900",
    ]);
    c.wait("web on both hosts", Duration::from_secs(120), || {
        let ready: std::collections::BTreeSet<String> = c
            .instances("web")
            .into_iter()
            .filter(|(_, state)| state == "ready")
            .map(|(h, _)| h)
            .collect();
        (ready.len() == 2).then_some(())
    });
    let resp = c
        .http()
        .post(format!(
            "{}/apps/{app}/workflows/start?steps=3&step_seconds=0.3&gate=g&gate_step=2",
            c.router
        ))
        .send()
        .expect("start workflow");
    assert!(resp.status().is_success(), "{}", resp.status());
    let wf = resp.json::<Value>().expect("json")["workflow_id"]
        .as_str()
        .expect("workflow id")
        .to_string();
    c.wait("step 2 to start", Duration::from_secs(60), || {
        (count(&executions(&c, app), &wf, 2, "start") > 0).then_some(())
    });
    // Every instance that runs, by id, host and process.
    let running = |c: &Cluster| -> Vec<String> {
        let mut all = Vec::new();
        for a in ["web", app] {
            let v: Value =
                serde_json::from_str(&c.ok(&["apps", "status", a, "--json"])).expect("json");
            for i in v["instances"].as_array().expect("instances") {
                if i["state"] != "exited" {
                    all.push(format!(
                        "{} {} {} {}",
                        i["id"], i["host"], i["pid"], i["state"]
                    ));
                }
            }
        }
        all.sort();
        all
    };
    let before = running(&c);
    assert_eq!(before.len(), 3, "{before:?}");

    let web = Load::start(&format!("{}/apps/web/", c.router), 2, false);
    let durable = Load::start(&format!("{}/apps/{app}/workflows/{wf}", c.router), 1, false);
    let progress = |c: &Cluster, what: &str| {
        let (a, b) = (
            web.ok.load(Ordering::Relaxed),
            durable.ok.load(Ordering::Relaxed),
        );
        c.wait(what, Duration::from_secs(60), || {
            (web.ok.load(Ordering::Relaxed) >= a + 20
                && durable.ok.load(Ordering::Relaxed) >= b + 5)
                .then_some(())
        });
    };
    progress(&c, "requests before the upgrade");

    c.server.restart_gracefully(Duration::from_secs(30));
    progress(&c, "requests after replica 1 restarted");
    if let Some(s) = c.server2.as_mut() {
        s.restart_gracefully(Duration::from_secs(30));
    }
    progress(&c, "requests after replica 2 restarted");
    c.router_proc.replace(Duration::from_secs(30));
    progress(&c, "requests after the router was replaced");
    for i in 0..c.hosts.len() {
        c.hosts[i].replace_agent(Duration::from_secs(60));
        progress(&c, "requests after an agent was replaced");
    }
    if let Some(b) = c.builder.as_mut() {
        b.replace(Duration::from_secs(60));
    }
    progress(&c, "requests after the builder agent was replaced");

    let (web_ok, web_failed, web_errors) = web.finish();
    let (wf_ok, wf_failed, wf_errors) = durable.finish();
    println!(
        "rolling upgrade of 2 replicas, the router and 3 agents: {web_ok} + {wf_ok} requests answered, {web_failed} + {wf_failed} failed"
    );
    assert_eq!(
        web_failed,
        0,
        "failed requests to web: {web_errors:?}\n{}",
        c.logs()
    );
    assert_eq!(
        wf_failed,
        0,
        "failed requests to {app}: {wf_errors:?}\n{}",
        c.logs()
    );
    let after = running(&c);
    assert_eq!(before, after, "instances restarted or duplicated");

    let gate = c
        .http()
        .post(format!("{}/apps/{app}/gates/g", c.router))
        .send()
        .expect("gate");
    assert!(gate.status().is_success(), "{}", gate.status());
    c.wait("the workflow to complete", Duration::from_secs(60), || {
        let out = c.cli_with(&c.user_token, &["workflows", "get", app, &wf, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["status"] == "SUCCESS").then_some(())
    });
    let ex = all_executions(&c, app);
    for step in 1..=3 {
        assert_eq!(count(&ex, &wf, step, "start"), 1, "step {step}: {ex:?}");
        assert_eq!(count(&ex, &wf, step, "end"), 1, "step {step}: {ex:?}");
    }
}
