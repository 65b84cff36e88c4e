//! Test harness for end-to-end tests through the real `stead` binary:
//! `stead dev` as a child process on free loopback ports, and the CLI run
//! as separate processes against it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_stead");

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Copies an example app into `dest` (without build outputs).
pub fn copy_example(name: &str, dest: &Path) -> PathBuf {
    let src = repo_root().join("examples").join(name);
    let to = dest.join(name);
    copy_dir(&src, &to);
    to
}

pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for entry in std::fs::read_dir(src).expect("read_dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name == "target" || name == ".venv" || name == "__pycache__" {
            continue;
        }
        let ty = entry.file_type().expect("type");
        if ty.is_dir() {
            copy_dir(&entry.path(), &dst.join(&name));
        } else {
            std::fs::copy(entry.path(), dst.join(&name)).expect("copy");
        }
    }
}

pub struct Dev {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub config_dir: PathBuf,
    pub api_port: u16,
    pub router_port: u16,
    pub log: PathBuf,
    starts: u32,
}

impl Dev {
    /// Starts `stead dev` on fresh ports in a fresh data dir under `root`.
    pub fn start(root: &Path) -> Dev {
        Self::start_with_env(root, &[])
    }

    pub fn start_with_env(root: &Path, env: &[(&str, &str)]) -> Dev {
        let mut dev = Dev {
            child: None,
            data_dir: root.join("data"),
            config_dir: root.join("config"),
            api_port: free_port(),
            router_port: free_port(),
            log: root.join("dev.log"),
            starts: 0,
        };
        dev.spawn(env);
        dev.wait_ready();
        dev
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn router(&self) -> String {
        format!("http://127.0.0.1:{}", self.router_port)
    }

    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.args(["dev", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--api-listen", &format!("127.0.0.1:{}", self.api_port)])
            .args([
                "--router-listen",
                &format!("127.0.0.1:{}", self.router_port),
            ])
            .env("STEAD_CONFIG_DIR", &self.config_dir)
            .env(
                "STEAD_LOG",
                std::env::var("STEAD_TEST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn stead dev"));
    }

    /// Waits for the API and the router to answer their health endpoints.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        loop {
            let api_ok = client
                .get(format!("{}/v1/health", self.api()))
                .send()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            let router_ok = client
                .get(format!("{}/_stead/health", self.router()))
                .send()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if api_ok && router_ok {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "stead dev exited during startup with {status}; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "stead dev not ready after 60 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("dev-token"))
            .expect("dev token")
            .trim()
            .to_string()
    }

    pub fn host_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("host-token"))
            .expect("host token")
            .trim()
            .to_string()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A CLI command against this platform.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env("STEAD_API", self.api())
            .env("STEAD_TOKEN", self.token())
            .env("STEAD_CONFIG_DIR", &self.config_dir)
            .stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cli().args(args).output().expect("run stead");
        out
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "`stead {}` failed with {}\nstdout:\n{}\nstderr:\n{}\ndev log (tail):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log_text(), 60)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "`stead {}` printed invalid JSON ({e}):\n{out}",
                args.join(" ")
            )
        })
    }

    /// Stops `stead dev` gracefully (SIGTERM), bounded.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix_kill(child.id() as i32, 15);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "stead dev did not stop within 30 s of SIGTERM; log:\n{}",
                        tail(&self.log_text(), 60)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills `stead dev` with SIGKILL, like a crash.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself (e.g. at a failpoint).
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "stead dev did not exit within {within:?}; log:\n{}",
                    tail(&self.log_text(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self, env: &[(&str, &str)]) {
        self.spawn(env);
        self.wait_ready();
    }

    /// GET through the router with the `/apps/<app>` prefix.
    pub fn get(&self, app: &str, path: &str) -> (u16, Option<String>, String) {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        match client
            .get(format!("{}/apps/{app}{path}", self.router()))
            .send()
        {
            Ok(r) => {
                let status = r.status().as_u16();
                let version = r
                    .headers()
                    .get("x-stead-version")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                (status, version, r.text().unwrap_or_default())
            }
            Err(e) => (0, None, e.to_string()),
        }
    }

    /// GET through the router by host name.
    pub fn get_host(&self, app: &str, path: &str) -> (u16, String) {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        match client
            .get(format!("{}{path}", self.router()))
            .header("host", format!("{app}.localhost"))
            .send()
        {
            Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Polls `GET /apps/<app>/` until the body contains `needle`, bounded.
    pub fn wait_body(&self, app: &str, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            let (status, _, body) = self.get(app, "/");
            if status == 200 && body.contains(needle) {
                return body;
            }
            last = format!("{status}: {body}");
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{app} never answered with {needle:?} within {within:?}; last answer {last}\ndev log:\n{}", tail(&self.log_text(), 80));
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix_kill(child.id() as i32, 15);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn nix_kill(pid: i32, sig: i32) -> std::io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A `stead` process (server, agent, router) with its output in a log
/// file; it can be killed with SIGKILL and started again with the same
/// arguments. Dropped: SIGTERM, then SIGKILL after 20 s.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Proc {
    pub fn start(log: PathBuf, args: Vec<String>, env: Vec<(String, String)>) -> Proc {
        let mut p = Proc {
            child: None,
            log,
            args,
            env,
        };
        p.spawn();
        p
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = Command::new(BIN);
        cmd.args(&self.args)
            .env("STEAD_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn"));
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (at most `within`) for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let c = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn text(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 60)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-15", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many step executions `execs` (an app's `GET /executions`) records
/// for workflow `wf`, step `step`, event `event` ("start" or "end").
pub fn count(execs: &[serde_json::Value], wf: &str, step: u64, event: &str) -> usize {
    execs
        .iter()
        .filter(|e| {
            e["workflow_id"] == wf && e["step"].as_u64() == Some(step) && e["event"] == event
        })
        .count()
}

/// `stead tokens create --database DB ARGS...`: a user token (`--org X`)
/// or a host token (`--host`).
pub fn create_token(db: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["tokens", "create", "--database", db])
        .args(args)
        .output()
        .expect("tokens");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Polls `f` every 100 ms until it gives a value, for at most `within`;
/// then fails naming `what`, with `logs()` (the components' last lines).
pub fn wait_until<T>(
    what: &str,
    within: Duration,
    logs: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (at most `within`) for `child` to exit by itself, and fails unless
/// it exited cleanly; `what` names it and `logs` gives its last lines.
pub fn wait_clean_exit(child: &mut Child, within: Duration, what: &str, logs: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no exit within {within:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{what}: exited with {status}\n{}", logs());
}

/// Sends GET `url` back to back from `threads` threads until finished;
/// counts successes and failures (any non-2xx or error). With
/// `fresh_connections`, every request opens a new connection; otherwise
/// each thread keeps its connection alive.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, threads: usize, fresh_connections: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed, errors, url) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    errors.clone(),
                    url.to_string(),
                );
                std::thread::spawn(move || {
                    let mut b =
                        reqwest::blocking::Client::builder().timeout(Duration::from_secs(10));
                    if fresh_connections {
                        b = b.pool_max_idle_per_host(0);
                    }
                    let http = b.build().expect("client");
                    // Bounded: at most 10 minutes of requests.
                    let deadline = Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let failure = match http.get(&url).send() {
                            Ok(r) if r.status().is_success() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Ok(r) => {
                                let status = r.status();
                                format!("{status}: {}", r.text().unwrap_or_default())
                            }
                            Err(e) => e.to_string(),
                        };
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut l) = errors.lock() {
                            l.push(failure);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            errors,
            threads,
        }
    }

    pub fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the threads; (answered, failed, what the failures were).
    pub fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}
