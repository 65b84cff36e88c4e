//! Replacing a running router: real router processes (this test binary run
//! again as a child, see `router_child`) on 127.0.0.1 in front of a small
//! real upstream, under a steady load of keep-alive, new-connection and
//! HTTP/2 clients.
//!
//! Each child router names the one instance of its route table after its
//! generation, so the `x-stead-instance` response header tells which
//! process answered.

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stead_api::{AppRoute, DemandReport, RouteEndpoint, RouteTable};
use stead_router::{RouteSource, Router, RouterConfig, RouterError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// Bound on every single wait in these tests.
const T: Duration = Duration::from_secs(15);

const ENV_CHILD: &str = "STEAD_HANDOVER_TEST_CHILD";

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ------------------------------------------------------------------ the child router

/// A fixed route table: app `echo` on one upstream, as instance `name`.
struct StaticSource {
    table: RouteTable,
}

impl RouteSource for StaticSource {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<RouteTable, RouterError>> + Send + '_>> {
        let t = self.table.clone();
        Box::pin(async move { Ok(t) })
    }
    fn report(
        &self,
        _: DemandReport,
    ) -> Pin<Box<dyn Future<Output = Result<(), RouterError>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
}

/// Not a test: the body of a child router process, run by the tests below
/// (`--ignored --exact router_child`) with its settings in the environment.
/// Prints `CHILD bound ADDR took_over=BOOL` once bound, `CHILD draining`
/// on SIGTERM and `CHILD exited` when `serve` has returned.
#[test]
#[ignore = "run as a child process by the hand-over tests"]
fn router_child() {
    if std::env::var_os(ENV_CHILD).is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("stead_router=debug,stead_router::access=warn")
        .try_init();
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let listen: SocketAddr = var("CHILD_LISTEN").parse().unwrap();
    let handover = match var("CHILD_HANDOVER").as_str() {
        "none" => None,
        p => Some(PathBuf::from(p)),
    };
    let instance = var("CHILD_INSTANCE");
    let upstream = var("CHILD_UPSTREAM");
    let drain_idle = Duration::from_millis(var("CHILD_DRAIN_IDLE_MS").parse().unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let source = Arc::new(StaticSource {
            table: RouteTable {
                apps: vec![AppRoute {
                    app: "echo".into(),
                    version: Some(1),
                    endpoints: vec![RouteEndpoint {
                        instance,
                        addr: upstream,
                    }],
                }],
                ..Default::default()
            },
        });
        let config = RouterConfig {
            listen,
            threads: 2,
            handover,
            drain_idle,
            ..RouterConfig::default()
        };
        let router = Router::bind(config, source).await.unwrap();
        println!(
            "CHILD bound {} took_over={}",
            router.local_addr(),
            router.took_over()
        );
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        router
            .serve(async move {
                term.recv().await;
                println!("CHILD draining");
            })
            .await
            .unwrap();
        println!("CHILD exited");
    });
}

/// A child router process; its stdout lines arrive on `lines`, its stderr
/// goes to a log file (printed when a test fails).
struct ChildRouter {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    log: PathBuf,
    generation: usize,
}

struct ChildSpec<'a> {
    listen: SocketAddr,
    handover: Option<&'a Path>,
    upstream: SocketAddr,
    drain_idle: Duration,
    dir: &'a Path,
}

impl ChildRouter {
    fn start(spec: &ChildSpec<'_>, generation: usize) -> ChildRouter {
        let log = spec.dir.join(format!("router-{generation}.log"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "router_child", "--nocapture"])
            .env(ENV_CHILD, "1")
            .env("CHILD_LISTEN", spec.listen.to_string())
            .env(
                "CHILD_HANDOVER",
                spec.handover
                    .map_or("none".to_string(), |p| p.display().to_string()),
            )
            .env("CHILD_INSTANCE", format!("gen-{generation}"))
            .env("CHILD_UPSTREAM", spec.upstream.to_string())
            .env(
                "CHILD_DRAIN_IDLE_MS",
                spec.drain_idle.as_millis().to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(l) = line.strip_prefix("CHILD ") {
                    if tx.send(l.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        ChildRouter {
            child: Some(child),
            lines,
            log,
            generation,
        }
    }

    /// Waits for the next line starting with `prefix`; returns its rest.
    fn expect_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(e) => panic!(
                    "router gen-{}: no {prefix:?} line ({e}); its log:\n{}",
                    self.generation,
                    self.log_text()
                ),
            }
        }
    }

    /// Waits for `CHILD bound`; returns the address and whether it took over.
    fn bound(&self) -> (SocketAddr, bool) {
        let rest = self.expect_line("bound ");
        let (addr, took) = rest.split_once(' ').unwrap();
        (addr.parse().unwrap(), took == "took_over=true")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&self) {
        let pid = self.child.as_ref().unwrap().id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// Waits (bounded) for the process to exit and checks it exited 0.
    fn wait_exit(&mut self) {
        let deadline = Instant::now() + T;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "router gen-{} exited with {status}; its log:\n{}",
                    self.generation,
                    self.log_text()
                );
                self.child = None;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "router gen-{} did not exit; its log:\n{}",
                self.generation,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildRouter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ------------------------------------------------------------------ upstream

/// The app: `/` answers at once, `/slow` after 200 ms (so that requests are
/// in flight at every hand-over), `/gate` when `gate` is notified.
async fn upstream(gate: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let gate = gate.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let gate = gate.clone();
                    async move {
                        match req.uri().path() {
                            "/slow" => tokio::time::sleep(Duration::from_millis(200)).await,
                            "/gate" => gate.notified().await,
                            _ => {}
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

// ------------------------------------------------------------------ load

#[derive(Default)]
struct Tally {
    /// Successful responses per router generation.
    served: Vec<usize>,
    failures: Vec<String>,
}

impl Tally {
    fn ok(&mut self, instance: Option<&str>) -> Result<(), String> {
        let generation = instance
            .and_then(|i| i.strip_prefix("gen-"))
            .and_then(|g| g.parse::<usize>().ok())
            .ok_or_else(|| format!("response without a router generation ({instance:?})"))?;
        if self.served.len() <= generation {
            self.served.resize(generation + 1, 0);
        }
        self.served[generation] += 1;
        Ok(())
    }
    fn served_by(&self, generation: usize) -> usize {
        self.served.get(generation).copied().unwrap_or(0)
    }
}

struct Load {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Woken on every response, so waits for progress need no polling.
    progress: Arc<Notify>,
}

fn record(tally: &Mutex<Tally>, progress: &Notify, what: &str, r: Result<Option<String>, String>) {
    let mut t = tally.lock().unwrap();
    let r = r.and_then(|instance| t.ok(instance.as_deref()));
    if let Err(e) = r {
        t.failures.push(format!("{what}: {e}"));
    }
    drop(t);
    progress.notify_waiters();
}

/// A request on a fresh connection (raw HTTP/1.1 with `Connection: close`),
/// read to the end; returns the instance header.
async fn new_connection_request(addr: SocketAddr) -> Result<Option<String>, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET /apps/echo/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") || !text.ends_with("ok") {
        return Err(format!("bad response {text:?}"));
    }
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("x-stead-instance: "))
        .map(|s| s.trim().to_string()))
}

impl Load {
    /// Starts the load: 3 keep-alive HTTP/1 clients (one connection each,
    /// one of them on the slow path), 2 HTTP/2 clients (one slow), and 4
    /// clients opening a connection per request, each sending requests back to back.
    fn start(addr: SocketAddr) -> Load {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        let clients: Vec<(&'static str, &'static str, bool)> = vec![
            ("keep-alive", "/apps/echo/", false),
            ("keep-alive", "/apps/echo/", false),
            ("keep-alive slow", "/apps/echo/slow", false),
            ("h2", "/apps/echo/", true),
            ("h2 slow", "/apps/echo/slow", true),
        ];
        for (what, path, h2) in clients {
            let (tally, stop, progress) = (tally.clone(), stop.clone(), progress.clone());
            tasks.push(tokio::spawn(async move {
                let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .http2_only(h2)
                    .build_http();
                let url = format!("http://{addr}{path}");
                while !stop.load(Ordering::Relaxed) {
                    let r = async {
                        let resp = tokio::time::timeout(T, client.get(url.parse().unwrap()))
                            .await
                            .map_err(|_| "timed out".to_string())?
                            .map_err(|e| format!("{e:?}"))?;
                        let status = resp.status();
                        let instance = resp
                            .headers()
                            .get("x-stead-instance")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = resp
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| format!("body: {e}"))?
                            .to_bytes();
                        if status != 200 || &body[..] != b"ok" {
                            return Err(format!("{status} {body:?}"));
                        }
                        Ok(instance)
                    }
                    .await;
                    record(&tally, &progress, what, r);
                }
            }));
        }
        for _ in 0..4 {
            let (tally, stop, progress) = (tally.clone(), stop.clone(), progress.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = match tokio::time::timeout(T, new_connection_request(addr)).await {
                        Ok(r) => r,
                        Err(_) => Err("timed out".to_string()),
                    };
                    record(&tally, &progress, "new connection", r);
                }
            }));
        }
        Load {
            tally,
            stop,
            tasks,
            progress,
        }
    }

    /// Waits until router `generation` has answered `n` requests.
    async fn wait_served(&self, generation: usize, n: usize) {
        within(&format!("gen-{generation} serving {n} requests"), async {
            loop {
                let notified = self.progress.notified();
                if self.tally.lock().unwrap().served_by(generation) >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            within("load task", t).await.unwrap();
        }
        Arc::try_unwrap(self.tally)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

// ------------------------------------------------------------------ tests

const REPLACEMENTS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_replaced_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("router.sock");
    let upstream = upstream(Arc::new(Notify::new())).await;
    let mut spec = ChildSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        handover: Some(&socket),
        upstream,
        drain_idle: Duration::from_secs(2),
        dir: dir.path(),
    };
    let mut current = ChildRouter::start(&spec, 0);
    let (addr, took) = current.bound();
    assert!(!took, "the first router has no predecessor");
    spec.listen = addr;

    let load = Load::start(addr);
    load.wait_served(0, 50).await;
    let started = Instant::now();
    for generation in 1..=REPLACEMENTS {
        let next = ChildRouter::start(&spec, generation);
        let (next_addr, took) = next.bound();
        assert_eq!(next_addr, addr);
        assert!(
            took,
            "gen-{generation} did not take over:\n{}",
            next.log_text()
        );
        // The old one drains and exits by itself once the new one serves.
        let mut old = std::mem::replace(&mut current, next);
        tokio::task::spawn_blocking(move || old.wait_exit())
            .await
            .unwrap();
        load.wait_served(generation, 50).await;
    }
    let elapsed = started.elapsed();
    let tally = load.finish().await;
    current.terminate();
    current.expect_line("draining");
    tokio::task::spawn_blocking(move || current.wait_exit())
        .await
        .unwrap();

    let total: usize = tally.served.iter().sum();
    println!(
        "{REPLACEMENTS} hand-overs in {:.1}s: {total} requests served, per generation {:?}, {} failed",
        elapsed.as_secs_f64(),
        tally.served,
        tally.failures.len()
    );
    assert!(
        tally.failures.is_empty(),
        "{} requests failed across the hand-overs: {:#?}",
        tally.failures.len(),
        &tally.failures[..tally.failures.len().min(20)]
    );
    for generation in 0..=REPLACEMENTS {
        assert!(tally.served_by(generation) >= 50, "{:?}", tally.served);
    }
}

/// The same load across the same number of replacements, but each router
/// is stopped before the next one binds (what a restart without hand-over
/// does): requests fail, which shows the load above would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_handover_replacing_the_router_fails_requests() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream(Arc::new(Notify::new())).await;
    let mut spec = ChildSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        handover: None,
        upstream,
        drain_idle: Duration::from_secs(2),
        dir: dir.path(),
    };
    let mut current = ChildRouter::start(&spec, 0);
    let (addr, _) = current.bound();
    spec.listen = addr;
    let load = Load::start(addr);
    load.wait_served(0, 50).await;
    for generation in 1..=3 {
        current.terminate();
        current.expect_line("draining");
        tokio::task::spawn_blocking(move || {
            current.wait_exit();
        })
        .await
        .unwrap();
        current = ChildRouter::start(&spec, generation);
        let (next_addr, took) = current.bound();
        assert_eq!(next_addr, addr);
        assert!(!took);
        load.wait_served(generation, 50).await;
    }
    let tally = load.finish().await;
    println!(
        "stop-then-start 3 times: per generation {:?}, {} failed, e.g. {:?}",
        tally.served,
        tally.failures.len(),
        tally.failures.first()
    );
    assert!(
        !tally.failures.is_empty(),
        "restarting without a hand-over failed no request: the load cannot see failures"
    );
}

/// Reads one HTTP/1.1 response (Content-Length bodies) from `s`: its head
/// (lowercased) and body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = within("response head", s.read(&mut byte)).await.unwrap();
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    within("response body", s.read_exact(&mut body))
        .await
        .unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Whether the peer closes `s` (EOF) within the test bound.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(T, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

const REQ: &[u8] = b"GET /apps/echo/ HTTP/1.1\r\nhost: x\r\n\r\n";

/// SIGTERM without a successor: the router stops accepting, answers the
/// request in flight, tells a keep-alive connection `Connection: close` on
/// its next response, sends an HTTP/2 connection GOAWAY, closes an idle
/// connection after the drain-idle bound, and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_connections_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Notify::new());
    let upstream = upstream(gate.clone()).await;
    let socket = dir.path().join("router.sock");
    let spec = ChildSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        handover: Some(&socket),
        upstream,
        drain_idle: Duration::from_millis(1500),
        dir: dir.path(),
    };
    let mut router = ChildRouter::start(&spec, 0);
    let (addr, _) = router.bound();

    // A keep-alive connection that will send another request while draining.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(REQ).await.unwrap();
    let (head, body) = read_response(&mut busy).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "ok");
    // A keep-alive connection that stays idle.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(REQ).await.unwrap();
    let (head, _) = read_response(&mut idle).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // A request in flight (held by the app until the gate opens).
    let mut in_flight = TcpStream::connect(addr).await.unwrap();
    in_flight
        .write_all(b"GET /apps/echo/gate HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // An HTTP/2 connection, driven by hand so its end can be observed.
    let h2_stream = TcpStream::connect(addr).await.unwrap();
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2_stream))
            .await
            .unwrap();
    let (h2_done_tx, mut h2_done) = mpsc::channel::<Result<(), String>>(1);
    tokio::spawn(async move {
        let r = h2_conn.await.map_err(|e| e.to_string());
        let _ = h2_done_tx.send(r).await;
    });
    let resp = within(
        "h2 request",
        h2.send_request(
            Request::get(format!("http://{addr}/apps/echo/"))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);

    router.terminate();
    router.expect_line("draining");
    let drain_seen = Instant::now();

    // The HTTP/2 connection is ended by the router (GOAWAY), cleanly.
    let ended = within("h2 connection ending", h2_done.recv()).await;
    assert_eq!(ended, Some(Ok(())), "h2 connection did not end cleanly");

    // The keep-alive connection's next request is answered, with
    // `Connection: close`, and then the connection is closed.
    busy.write_all(REQ).await.unwrap();
    let (head, body) = read_response(&mut busy).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "ok");
    assert!(closed_by_peer(&mut busy).await);

    // The idle one is closed after the drain-idle bound.
    assert!(closed_by_peer(&mut idle).await);
    assert!(
        drain_seen.elapsed() >= Duration::from_millis(1000),
        "idle connection closed before the drain-idle bound ({:?})",
        drain_seen.elapsed()
    );

    // New connections are refused: nothing listens any more.
    let refused = TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a draining router without successor still accepts"
    );

    // The request in flight completes; then the router exits.
    gate.notify_one();
    let (head, body) = read_response(&mut in_flight).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "ok");
    router.expect_line("exited");
    tokio::task::spawn_blocking(move || router.wait_exit())
        .await
        .unwrap();
    assert!(!socket.exists(), "the hand-over socket is left behind");
}

/// A stale hand-over socket (its router was killed) does not stop a new
/// router from binding; the new one then offers hand-over itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_handover_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("router.sock");
    let upstream = upstream(Arc::new(Notify::new())).await;
    let mut spec = ChildSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        handover: Some(&socket),
        upstream,
        drain_idle: Duration::from_secs(1),
        dir: dir.path(),
    };
    let first = ChildRouter::start(&spec, 0);
    let (addr, _) = first.bound();
    spec.listen = addr;
    drop(first); // SIGKILL: the socket file stays
    assert!(socket.exists());

    let second = ChildRouter::start(&spec, 1);
    let (a, took) = second.bound();
    assert_eq!(a, addr);
    assert!(!took, "took over from a dead router");
    let third = ChildRouter::start(&spec, 2);
    let (_, took) = third.bound();
    assert!(
        took,
        "no hand-over from the replacement:\n{}",
        third.log_text()
    );
    let mut second = second;
    tokio::task::spawn_blocking(move || second.wait_exit())
        .await
        .unwrap();
    // Any request answered after the hand-over completed is the third's.
    let r2 = within("request", new_connection_request(addr))
        .await
        .unwrap();
    assert_eq!(r2.as_deref(), Some("gen-2"));
}
