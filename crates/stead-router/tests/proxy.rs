//! End-to-end tests: a real router on 127.0.0.1 in front of small real hyper
//! upstreams, with the route table supplied by a fake `RouteSource` (the
//! seam between the router and the control plane).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use stead_api::{AppRoute, DemandReport, ErrorBody, RouteEndpoint, RouteTable};
use stead_router::{RouteSource, Router, RouterConfig, RouterError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};

/// Bound on every single wait in these tests.
const T: Duration = Duration::from_secs(10);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ------------------------------------------------------------------ bodies

/// A body that is either fixed or fed chunk by chunk through a channel.
enum TestBody {
    Full(Option<Bytes>),
    Chan(mpsc::Receiver<Bytes>),
}

impl TestBody {
    fn empty() -> Self {
        TestBody::Full(None)
    }
    fn text(s: impl Into<String>) -> Self {
        TestBody::Full(Some(Bytes::from(s.into())))
    }
    fn channel() -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(4);
        (tx, TestBody::Chan(rx))
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            TestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            TestBody::Chan(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }
    fn is_end_stream(&self) -> bool {
        matches!(self, TestBody::Full(None))
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            TestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            TestBody::Chan(_) => SizeHint::default(),
        }
    }
}

// ------------------------------------------------------------------ route source

struct FakeSource {
    table: Mutex<RouteTable>,
    fetches: AtomicUsize,
    delay: Duration,
    /// When set, every fetch fails (a control plane that is down).
    failing: std::sync::atomic::AtomicBool,
    /// Demand reports received.
    reports: Mutex<Vec<DemandReport>>,
    /// When set, `fetch_changed` long-polls like the control plane: the
    /// table's etag is its generation, bumped by `set`.
    long_poll: std::sync::atomic::AtomicBool,
    generation: AtomicUsize,
    changed: Notify,
}

impl FakeSource {
    fn new(apps: Vec<AppRoute>) -> Arc<Self> {
        Self::slow(apps, Duration::ZERO)
    }
    fn slow(apps: Vec<AppRoute>, delay: Duration) -> Arc<Self> {
        Arc::new(FakeSource {
            table: Mutex::new(RouteTable {
                apps,
                ..Default::default()
            }),
            fetches: AtomicUsize::new(0),
            delay,
            failing: std::sync::atomic::AtomicBool::new(false),
            reports: Mutex::new(Vec::new()),
            long_poll: std::sync::atomic::AtomicBool::new(false),
            generation: AtomicUsize::new(1),
            changed: Notify::new(),
        })
    }
    fn set(&self, apps: Vec<AppRoute>) {
        self.table.lock().unwrap().apps = apps;
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
    fn set_limits(&self, app: &str, limits: stead_api::AppLimits) {
        self.table
            .lock()
            .unwrap()
            .limits
            .insert(app.to_string(), limits);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
    fn reports(&self) -> Vec<DemandReport> {
        self.reports.lock().unwrap().clone()
    }
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl RouteSource for FakeSource {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<RouteTable, RouterError>> + Send + '_>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(RouterError::Source("control plane is down".into()));
            }
            Ok(self.table.lock().unwrap().clone())
        })
    }

    fn fetch_changed(
        &self,
        since: Option<String>,
        wait: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<RouteTable, RouterError>> + Send + '_>> {
        if !self.long_poll.load(Ordering::SeqCst) {
            return self.fetch();
        }
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let generation = self.generation.load(Ordering::SeqCst).to_string();
                if since.as_deref() != Some(generation.as_str())
                    || tokio::time::Instant::now() >= deadline
                {
                    let mut t = self.table.lock().unwrap().clone();
                    t.etag = Some(generation);
                    return Ok(t);
                }
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        })
    }

    fn report(
        &self,
        report: DemandReport,
    ) -> Pin<Box<dyn Future<Output = Result<(), RouterError>> + Send + '_>> {
        self.reports.lock().unwrap().push(report);
        Box::pin(async { Ok(()) })
    }
}

fn app(name: &str, version: Option<u32>, endpoints: &[(&str, SocketAddr)]) -> AppRoute {
    AppRoute {
        app: name.to_string(),
        version,
        endpoints: endpoints
            .iter()
            .map(|(i, a)| RouteEndpoint {
                instance: i.to_string(),
                addr: a.to_string(),
            })
            .collect(),
    }
}

// ------------------------------------------------------------------ router

struct TestRouter {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), RouterError>>>,
    load: stead_router::LoadReport,
}

impl TestRouter {
    async fn start(source: Arc<FakeSource>, wake_wait: Duration) -> Self {
        Self::start_with(source, wake_wait, Duration::from_millis(200)).await
    }

    async fn start_with(
        source: Arc<FakeSource>,
        wake_wait: Duration,
        refresh_interval: Duration,
    ) -> Self {
        let config = RouterConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            domain: "localhost".into(),
            refresh_interval,
            wake_wait,
            ..RouterConfig::default()
        };
        let router = Router::bind(config, source).await.unwrap();
        let addr = router.local_addr();
        assert_ne!(addr.port(), 0);
        let load = router.load();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(router.serve(async move {
            let _ = stopped.await;
        }));
        TestRouter {
            addr,
            stop: Some(stop),
            task: Some(task),
            load,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the router and checks that `serve` returns cleanly.
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let res = within("router shutdown", self.task.take().unwrap())
            .await
            .unwrap();
        res.unwrap();
    }
}

// ------------------------------------------------------------------ upstreams

/// A small real HTTP/1.1 server standing in for an app instance.
///
/// - `/stream`: sends `first`, waits for `gate`, then sends `second`.
/// - `/upload`: reports every request body chunk on `uploads` as it arrives,
///   then answers with the total length.
/// - `/ws`: accepts an upgrade and echoes bytes on the upgraded connection.
/// - anything else: JSON describing the request it saw.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    gate: Arc<Notify>,
    uploads: Mutex<Option<mpsc::UnboundedReceiver<Bytes>>>,
}

#[derive(Clone)]
struct UpState {
    name: &'static str,
    hits: Arc<AtomicUsize>,
    gate: Arc<Notify>,
    uploads: mpsc::UnboundedSender<Bytes>,
}

async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let state = UpState {
        name,
        hits: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(Notify::new()),
        uploads: tx,
    };
    let up = Upstream {
        addr,
        hits: state.hits.clone(),
        gate: state.gate.clone(),
        uploads: Mutex::new(Some(rx)),
    };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(serve_upstream(state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    up
}

async fn serve_upstream(state: UpState, mut req: Request<Incoming>) -> Response<TestBody> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    match req.uri().path() {
        "/stream" => {
            let (tx, body) = TestBody::channel();
            let gate = state.gate.clone();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first")).await;
                // Longer than any test wait, so a buffering router fails the test.
                let _ = tokio::time::timeout(3 * T, gate.notified()).await;
                let _ = tx.send(Bytes::from_static(b"second")).await;
            });
            Response::new(body)
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut total = 0;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    total += data.len();
                    let _ = state.uploads.send(data);
                }
            }
            Response::new(TestBody::text(format!("{total}")))
        }
        "/ws" => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(TestBody::empty())
                .unwrap()
        }
        _ => {
            let headers: BTreeMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
                .collect();
            let json = serde_json::json!({
                "upstream": state.name,
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "headers": headers,
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("connection", "keep-alive")
                .header("keep-alive", "timeout=5")
                .body(TestBody::text(json.to_string()))
                .unwrap()
        }
    }
}

/// A port with nothing listening on it.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

// ------------------------------------------------------------------ client

type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn get(url: &str, host: Option<&str>) -> Request<TestBody> {
    let mut b = Request::get(url);
    if let Some(h) = host {
        b = b.header("host", h);
    }
    b.body(TestBody::empty()).unwrap()
}

async fn send(c: &TestClient, req: Request<TestBody>) -> Response<Incoming> {
    within("response head", c.request(req)).await.unwrap()
}

async fn text(resp: Response<Incoming>) -> String {
    let bytes = within("response body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn json(resp: Response<Incoming>) -> Value {
    let t = text(resp).await;
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
}

async fn error_body(resp: Response<Incoming>) -> ErrorBody {
    assert_eq!(resp.headers()["content-type"], "application/json");
    let t = text(resp).await;
    assert!(
        !t.trim_end().contains('\n'),
        "error body must be one line: {t}"
    );
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("not an ErrorBody ({e}): {t}"))
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn routes_by_host_and_by_path_prefix() {
    let up = upstream("one").await;
    let source = FakeSource::new(vec![app("hello", Some(7), &[("i-1", up.addr)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();

    // Host routing, port ignored, path and query untouched.
    let resp = send(
        &c,
        get(&router.url("/x/y?q=1&r=2"), Some("hello.localhost:8080")),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-stead-version"], "7");
    assert_eq!(resp.headers()["x-stead-instance"], "i-1");
    assert!(resp.headers().contains_key("x-request-id"));
    assert!(
        !resp.headers().contains_key("keep-alive"),
        "hop-by-hop header leaked"
    );
    let seen = json(resp).await;
    assert_eq!(seen["upstream"], "one");
    assert_eq!(seen["uri"], "/x/y?q=1&r=2");
    assert_eq!(seen["headers"]["host"], "hello.localhost:8080");

    // An app host keeps a path that looks like prefix routing.
    let seen = json(
        send(
            &c,
            get(&router.url("/apps/other/z"), Some("hello.localhost")),
        )
        .await,
    )
    .await;
    assert_eq!(seen["uri"], "/apps/other/z");

    // Path prefix routing strips the prefix and keeps the query.
    for (path, want) in [
        ("/apps/hello/a/b?x=1", "/a/b?x=1"),
        ("/apps/hello", "/"),
        ("/apps/hello/", "/"),
        ("/apps/hello?x=1", "/?x=1"),
        ("/apps/hello/_stead/health", "/_stead/health"),
    ] {
        let resp = send(&c, get(&router.url(path), Some("localhost"))).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["x-stead-version"], "7");
        let seen = json(resp).await;
        assert_eq!(seen["uri"], want, "{path}");
        assert_eq!(seen["method"], "GET");
    }
    router.shutdown().await;
}

#[tokio::test]
async fn forwarding_headers_and_request_id() {
    let up = upstream("one").await;
    let source = FakeSource::new(vec![app("hello", Some(2), &[("i-1", up.addr)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();

    let req = Request::post(router.url("/echo"))
        .header("host", "hello.localhost")
        .header("x-request-id", "client-id-42")
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-custom", "kept")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .body(TestBody::text("hi"))
        .unwrap();
    let resp = send(&c, req).await;
    assert_eq!(resp.headers()["x-request-id"], "client-id-42");
    let seen = json(resp).await;
    let h = &seen["headers"];
    assert_eq!(seen["method"], "POST");
    assert_eq!(h["x-request-id"], "client-id-42");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "hello.localhost");
    assert_eq!(h["x-custom"], "kept");
    assert!(
        h.get("x-drop-me").is_none(),
        "header named in Connection was forwarded: {h}"
    );

    // Without a client id one is generated, and the same one is returned.
    let resp = send(&c, get(&router.url("/"), Some("hello.localhost"))).await;
    let returned = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let seen = json(resp).await;
    let generated = seen["headers"]["x-request-id"].as_str().unwrap();
    assert_eq!(generated.len(), 32);
    assert_eq!(generated, returned);
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    router.shutdown().await;
}

#[tokio::test]
async fn balances_across_endpoints() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let source = FakeSource::new(vec![app(
        "bal",
        Some(1),
        &[("i-a", a.addr), ("i-b", b.addr)],
    )]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();

    // Idle endpoints: ties are broken round-robin, so both are used evenly.
    for _ in 0..20 {
        let resp = send(&c, get(&router.url("/"), Some("bal.localhost"))).await;
        assert_eq!(resp.status(), 200);
        text(resp).await;
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 10);
    assert_eq!(b.hits.load(Ordering::SeqCst), 10);

    // Least outstanding: while one endpoint has a request open, new ones go
    // to the other.
    let resp = send(&c, get(&router.url("/stream"), Some("bal.localhost"))).await;
    let busy = resp.headers()["x-stead-instance"]
        .to_str()
        .unwrap()
        .to_string();
    let mut open = resp.into_body();
    let first = within("first chunk", open.frame()).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    for _ in 0..6 {
        let resp = send(&c, get(&router.url("/"), Some("bal.localhost"))).await;
        assert_ne!(resp.headers()["x-stead-instance"], busy.as_str());
        text(resp).await;
    }
    a.gate.notify_one();
    b.gate.notify_one();
    while let Some(f) = within("rest of stream", open.frame()).await {
        f.unwrap();
    }
    router.shutdown().await;
}

#[tokio::test]
async fn unknown_app_is_a_fast_404() {
    let source = FakeSource::new(vec![]);
    let router = TestRouter::start(source.clone(), Duration::from_secs(3)).await;
    let c = client();
    let started = Instant::now();
    let resp = send(&c, get(&router.url("/"), Some("nope.localhost"))).await;
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-request-id"));
    let err = error_body(resp).await;
    assert_eq!(err.error, "unknown_app");
    assert!(err.message.contains("nope"), "{}", err.message);
    assert!(err.message.contains("stead deploy"), "{}", err.message);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "404 waited the whole wake wait"
    );
    assert!(source.fetches() >= 1);

    // Same by path.
    let resp = send(&c, get(&router.url("/apps/nope/x"), None)).await;
    assert_eq!(resp.status(), 404);
    router.shutdown().await;
}

#[tokio::test]
async fn app_without_endpoints_is_503_after_the_wake_wait() {
    let source = FakeSource::new(vec![app("idle", Some(4), &[])]);
    let wake = Duration::from_millis(600);
    // A long background interval: any extra fetches come from the held request.
    let router = TestRouter::start_with(source.clone(), wake, Duration::from_secs(60)).await;
    let c = client();
    let started = Instant::now();
    let resp = send(&c, get(&router.url("/"), Some("idle.localhost"))).await;
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let err = error_body(resp).await;
    assert_eq!(err.error, "no_ready_instance");
    assert!(err.message.contains("idle"), "{}", err.message);
    assert!(
        elapsed >= wake,
        "answered before the wake wait: {elapsed:?}"
    );
    assert!(
        elapsed < wake + Duration::from_secs(2),
        "waited too long: {elapsed:?}"
    );
    assert!(
        source.fetches() >= 3,
        "held request did not poll the source ({} fetches)",
        source.fetches()
    );
    router.shutdown().await;
}

#[tokio::test]
async fn endpoint_appearing_during_the_wait_serves_the_request() {
    let up = upstream("late").await;
    // The app is not even in the table yet (deploy in progress).
    let source = FakeSource::new(vec![]);
    let router = TestRouter::start_with(
        source.clone(),
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .await;
    let c = client();

    // Known with no endpoint: the request is held...
    source.set(vec![app("wake", Some(1), &[])]);
    let started = Instant::now();
    let pending = tokio::spawn({
        let c = c.clone();
        let url = router.url("/hello?a=b");
        async move { send(&c, get(&url, Some("wake.localhost"))).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // ... counted as in flight for the autoscaler ...
    assert_eq!(router.load.in_flight().get("wake"), Some(&1));
    // ... and answered once an instance is ready.
    source.set(vec![app("wake", Some(1), &[("i-late", up.addr)])]);
    let resp = within("held request", pending).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-stead-instance"], "i-late");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(json(resp).await["uri"], "/hello?a=b");
    assert_eq!(router.load.in_flight().get("wake"), Some(&0));
    router.shutdown().await;
}

#[tokio::test]
async fn concurrent_misses_share_route_fetches() {
    // Each fetch takes 200 ms, so 20 concurrent misses would take 4 s if
    // fetches were not shared, and would make 20 of them.
    let source = FakeSource::slow(vec![], Duration::from_millis(200));
    let router = TestRouter::start_with(
        source.clone(),
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    // Let the initial background fetch finish.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = source.fetches();
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        let url = router.url("/");
        tasks.push(tokio::spawn(async move {
            send(&c, get(&url, Some(&format!("ghost{i}.localhost"))))
                .await
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(within("miss", t).await.unwrap(), 404);
    }
    let used = source.fetches() - before;
    assert!(
        (1..=3).contains(&used),
        "{used} fetches for 20 concurrent misses"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn refused_connection_is_retried_on_another_endpoint() {
    let live = upstream("live").await;
    let dead = dead_addr().await;
    let source = FakeSource::new(vec![app(
        "half",
        Some(3),
        &[("i-dead", dead), ("i-live", live.addr)],
    )]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();
    for _ in 0..6 {
        let req = Request::post(router.url("/apps/half/upload"))
            .body(TestBody::text("payload"))
            .unwrap();
        let resp = send(&c, req).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-stead-instance"], "i-live");
        // The body survived the failed attempt.
        assert_eq!(text(resp).await, "7");
    }
    assert_eq!(live.hits.load(Ordering::SeqCst), 6);
    router.shutdown().await;
}

#[tokio::test]
async fn all_endpoints_dead_is_502_naming_the_instance() {
    let d1 = dead_addr().await;
    let d2 = dead_addr().await;
    let source = FakeSource::new(vec![app("gone", Some(9), &[("i-d1", d1), ("i-d2", d2)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();
    let resp = send(&c, get(&router.url("/"), Some("gone.localhost"))).await;
    assert_eq!(resp.status(), 502);
    let err = error_body(resp).await;
    assert_eq!(err.error, "upstream_error");
    assert!(err.message.contains("gone"), "{}", err.message);
    assert!(err.message.contains("version 9"), "{}", err.message);
    assert!(
        err.message.contains("i-d1") || err.message.contains("i-d2"),
        "{}",
        err.message
    );
    router.shutdown().await;
}

#[tokio::test]
async fn response_body_is_streamed_not_buffered() {
    let up = upstream("s").await;
    let source = FakeSource::new(vec![app("stream", Some(1), &[("i-1", up.addr)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();
    let resp = send(&c, get(&router.url("/stream"), Some("stream.localhost"))).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The upstream sends "second" only after the gate opens, which happens
    // only once "first" went through the router: a buffering proxy times out.
    let first = within("first chunk before upstream finished", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    up.gate.notify_one();
    let mut rest = Vec::new();
    while let Some(f) = within("second chunk", body.frame()).await {
        if let Ok(d) = f.unwrap().into_data() {
            rest.extend_from_slice(&d);
        }
    }
    assert_eq!(rest, b"second");
    router.shutdown().await;
}

#[tokio::test]
async fn request_body_is_streamed_upstream() {
    let up = upstream("u").await;
    let mut uploads = up.uploads.lock().unwrap().take().unwrap();
    let source = FakeSource::new(vec![app("up", Some(1), &[("i-1", up.addr)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();
    let (tx, body) = TestBody::channel();
    let req = Request::put(router.url("/upload"))
        .header("host", "up.localhost")
        .body(body)
        .unwrap();
    let pending = tokio::spawn({
        let c = c.clone();
        async move { send(&c, req).await }
    });
    within("send part 1", tx.send(Bytes::from_static(b"part-1")))
        .await
        .unwrap();
    // The upstream sees part 1 while the client still holds part 2.
    let got = within("part 1 upstream", uploads.recv()).await.unwrap();
    assert_eq!(got, "part-1");
    within("send part 2", tx.send(Bytes::from_static(b"part-22")))
        .await
        .unwrap();
    drop(tx);
    let resp = within("upload response", pending).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(text(resp).await, "13");
    router.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_clients_work() {
    let up = upstream("h2").await;
    let source = FakeSource::new(vec![app("hello", Some(5), &[("i-1", up.addr)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();

    let resp = send(&c, get(&router.url("/apps/hello/over/h2?x=1"), None)).await;
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-stead-version"], "5");
    assert_eq!(resp.headers()["x-stead-instance"], "i-1");
    let seen = json(resp).await;
    assert_eq!(seen["uri"], "/over/h2?x=1");
    // The upstream gets HTTP/1.1 with the public host.
    assert_eq!(seen["headers"]["host"], router.addr.to_string());

    // Streaming works over h2 as well.
    let resp = send(&c, get(&router.url("/apps/hello/stream"), None)).await;
    let mut body = resp.into_body();
    let first = within("h2 first chunk", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    up.gate.notify_one();
    while let Some(f) = within("h2 rest", body.frame()).await {
        f.unwrap();
    }
    router.shutdown().await;
}

#[tokio::test]
async fn router_endpoints_and_bad_requests() {
    let up = upstream("m").await;
    let source = FakeSource::new(vec![app("hello", Some(1), &[("i-1", up.addr)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();

    let resp = send(&c, get(&router.url("/_stead/health"), Some("localhost"))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(text(resp).await, r#"{"status":"ok"}"#);

    // No app derivable: 400 saying how to name one.
    for (path, host) in [
        ("/", Some("localhost")),
        ("/apps/", None),
        ("/x", Some("a.b.localhost")),
    ] {
        let resp = send(&c, get(&router.url(path), host)).await;
        assert_eq!(resp.status(), 400, "{path}");
        let err = error_body(resp).await;
        assert!(
            err.message.contains("Host: <app>.localhost"),
            "{}",
            err.message
        );
        assert!(err.message.contains("/apps/<app>/"), "{}", err.message);
    }

    for _ in 0..3 {
        text(send(&c, get(&router.url("/"), Some("hello.localhost"))).await).await;
    }
    // An app's own /metrics is the app's.
    let seen = json(send(&c, get(&router.url("/metrics"), Some("hello.localhost"))).await).await;
    assert_eq!(seen["uri"], "/metrics");

    let resp = send(&c, get(&router.url("/metrics"), None)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = text(resp).await;
    assert!(
        m.contains("stead_router_requests_total{app=\"hello\",class=\"2xx\"} 4"),
        "{m}"
    );
    assert!(m.contains("stead_router_in_flight{app=\"hello\"} 0"), "{m}");
    assert!(m.contains("class=\"4xx\"} 3"), "{m}");
    router.shutdown().await;
}

#[tokio::test]
async fn upgrades_are_passed_through() {
    let up = upstream("ws").await;
    let source = FakeSource::new(vec![app("sock", Some(1), &[("i-1", up.addr)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;

    let stream = within("connect", tokio::net::TcpStream::connect(router.addr))
        .await
        .unwrap();
    let (mut send_req, conn) = within(
        "handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/ws")
        .header("host", "sock.localhost")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(TestBody::empty())
        .unwrap();
    let resp = within("upgrade response", send_req.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["upgrade"], "echo");
    assert_eq!(resp.headers()["x-stead-instance"], "i-1");
    let upgraded = within("upgrade", hyper::upgrade::on(resp)).await.unwrap();
    let mut io = TokioIo::new(upgraded);
    within("write", io.write_all(b"ping")).await.unwrap();
    let mut buf = [0u8; 4];
    within("echo", io.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    drop(io);
    router.shutdown().await;
}

#[tokio::test]
async fn upstream_closing_the_connection_is_502() {
    // Accepts connections and closes them without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let source = FakeSource::new(vec![app("rude", Some(2), &[("i-rude", addr)])]);
    let router = TestRouter::start(source, Duration::from_secs(2)).await;
    let c = client();
    let resp = send(&c, get(&router.url("/"), Some("rude.localhost"))).await;
    assert_eq!(resp.status(), 502);
    let err = error_body(resp).await;
    assert_eq!(err.error, "upstream_error");
    assert!(err.message.contains("i-rude"), "{}", err.message);
    assert!(err.message.contains("version 2"), "{}", err.message);
    router.shutdown().await;
}

#[tokio::test]
async fn removed_endpoints_stop_getting_traffic() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let source = FakeSource::new(vec![app(
        "drain",
        Some(1),
        &[("i-a", a.addr), ("i-b", b.addr)],
    )]);
    let router = TestRouter::start_with(
        source.clone(),
        Duration::from_secs(2),
        Duration::from_millis(50),
    )
    .await;
    let c = client();
    for _ in 0..4 {
        text(send(&c, get(&router.url("/"), Some("drain.localhost"))).await).await;
    }
    assert!(a.hits.load(Ordering::SeqCst) > 0);
    // i-a starts draining: the control plane drops it from the routes.
    source.set(vec![app("drain", Some(2), &[("i-b", b.addr)])]);
    let deadline = Instant::now() + T;
    loop {
        let resp = send(&c, get(&router.url("/"), Some("drain.localhost"))).await;
        let v = resp.headers()["x-stead-version"]
            .to_str()
            .unwrap()
            .to_string();
        text(resp).await;
        if v == "2" {
            break;
        }
        assert!(Instant::now() < deadline, "route table never refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = a.hits.load(Ordering::SeqCst);
    for _ in 0..6 {
        let resp = send(&c, get(&router.url("/"), Some("drain.localhost"))).await;
        assert_eq!(resp.headers()["x-stead-instance"], "i-b");
        text(resp).await;
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), before);
    router.shutdown().await;
}

#[tokio::test]
async fn unreachable_control_plane_before_any_table_is_503() {
    let source = FakeSource::new(vec![]);
    source.failing.store(true, Ordering::SeqCst);
    let router = TestRouter::start(source.clone(), Duration::from_millis(500)).await;
    let c = client();
    let resp = send(&c, get(&router.url("/"), Some("any.localhost"))).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(error_body(resp).await.error, "routes_unavailable");

    // Once a table was loaded, a failing source keeps the last one serving.
    let up = upstream("kept").await;
    source.set(vec![app("kept", Some(1), &[("i-1", up.addr)])]);
    source.failing.store(false, Ordering::SeqCst);
    let resp = send(&c, get(&router.url("/"), Some("kept.localhost"))).await;
    assert_eq!(resp.status(), 200);
    text(resp).await;
    source.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = send(&c, get(&router.url("/"), Some("kept.localhost"))).await;
    assert_eq!(resp.status(), 200);
    text(resp).await;
    router.shutdown().await;
}

/// A stand-in control plane serving `GET /v1/routes`, for `ApiRouteSource`.
async fn control_plane(
    token: &'static str,
    table: RouteTable,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let body = serde_json::to_string(&table).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let body = body.clone();
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push(req.uri().path().to_string());
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok());
                        let resp = if auth != Some(&format!("Bearer {token}")) {
                            Response::builder()
                                .status(401)
                                .body(TestBody::text(
                                    r#"{"error":"unauthorized","message":"bad token"}"#,
                                ))
                                .unwrap()
                        } else if req.uri().path() != "/v1/routes" {
                            Response::builder()
                                .status(404)
                                .body(TestBody::empty())
                                .unwrap()
                        } else {
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(TestBody::text(body))
                                .unwrap()
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn api_route_source_fetches_with_token_and_fails_over() {
    use stead_router::ApiRouteSource;
    let table = RouteTable {
        etag: None,
        limits: Default::default(),
        apps: vec![app(
            "hello",
            Some(3),
            &[("i-1", "127.0.0.1:9".parse().unwrap())],
        )],
    };
    let (good, seen) = control_plane("secret", table.clone()).await;
    let dead = dead_addr().await;

    // The first server is down; the second answers.
    let src = ApiRouteSource::new(
        vec![format!("http://{dead}"), format!("http://{good}/")],
        "secret".into(),
    );
    let got = within("fetch", src.fetch()).await.unwrap();
    assert_eq!(got, table);
    assert_eq!(seen.lock().unwrap().as_slice(), ["/v1/routes"]);
    // And again (now starting from the server that answered).
    assert_eq!(within("fetch again", src.fetch()).await.unwrap(), table);

    // A wrong token is an error that says what the server said.
    let src = ApiRouteSource::new(vec![format!("http://{good}")], "wrong".into());
    let err = within("fetch", src.fetch()).await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");

    // No server at all.
    let src = ApiRouteSource::new(vec![], "x".into());
    assert!(within("fetch", src.fetch()).await.is_err());
}

#[tokio::test]
async fn router_with_api_route_source_end_to_end() {
    let up = upstream("e2e").await;
    let table = RouteTable {
        etag: None,
        limits: Default::default(),
        apps: vec![app("hello", Some(1), &[("i-1", up.addr)])],
    };
    let (cp, _) = control_plane("tok", table).await;
    let source = Arc::new(stead_router::ApiRouteSource::new(
        vec![format!("http://{cp}")],
        "tok".into(),
    ));
    let config = RouterConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..RouterConfig::default()
    };
    let router = Router::bind(config, source).await.unwrap();
    let addr = router.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(router.serve(async move {
        let _ = stopped.await;
    }));
    let c = client();
    let resp = send(&c, get(&format!("http://{addr}/apps/hello/x"), None)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await["uri"], "/x");
    let _ = stop.send(());
    within("shutdown", task).await.unwrap().unwrap();
}

// ------------------------------------------------------------------ scaling

/// The wake-up reports (`period_ms == 0`) about `app` received so far.
fn wake_reports(source: &FakeSource, app: &str) -> usize {
    source
        .reports()
        .iter()
        .flat_map(|r| r.apps.iter())
        .filter(|a| a.app == app && a.period_ms == 0)
        .count()
}

#[tokio::test]
async fn held_requests_share_one_wake_report_and_follow_the_long_poll() {
    let up = upstream("woken").await;
    let source = FakeSource::new(vec![app("asleep", Some(1), &[])]);
    source.long_poll.store(true, Ordering::SeqCst);
    // A long fallback interval: the table can only change by long-poll.
    let router = TestRouter::start_with(
        source.clone(),
        Duration::from_secs(10),
        Duration::from_secs(60),
    )
    .await;
    let c = client();
    // Let the router's first long-poll pick up the table.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fetches_before = source.fetches();
    let mut held = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        let url = router.url("/x");
        held.push(tokio::spawn(async move {
            send(&c, get(&url, Some("asleep.localhost"))).await
        }));
    }
    // One wake-up report for all of them, sent at once.
    within("wake report", async {
        while wake_reports(&source, "asleep") == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(wake_reports(&source, "asleep"), 1);
    assert_eq!(router.load.in_flight().get("asleep"), Some(&20));
    // The instance is ready: the long-poll delivers it and every held
    // request goes through at once, without polling the source.
    let ready_at = Instant::now();
    source.set(vec![app("asleep", Some(1), &[("i-1", up.addr)])]);
    for h in held {
        let resp = within("held request", h).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let took = ready_at.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "held requests waited {took:?} after the change"
    );
    assert!(
        source.fetches() - fetches_before <= 1,
        "held requests polled the source {} times although the long-poll works",
        source.fetches() - fetches_before
    );
    router.shutdown().await;
}

#[tokio::test]
async fn demand_is_reported_while_busy_and_once_when_idle() {
    let up = upstream("busy").await;
    let source = FakeSource::new(vec![app("busy", Some(1), &[("i-1", up.addr)])]);
    let router = TestRouter::start(source.clone(), Duration::from_secs(5)).await;
    let c = client();
    for _ in 0..5 {
        let resp = send(&c, get(&router.url("/"), Some("busy.localhost"))).await;
        assert_eq!(resp.status(), 200);
        text(resp).await;
    }
    // Within a report interval: one report counting the 5 requests.
    let report = within("demand report", async {
        loop {
            let found = source
                .reports()
                .into_iter()
                .flat_map(|r| r.apps)
                .find(|a| a.app == "busy" && a.requests > 0);
            if let Some(a) = found {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(report.requests, 5);
    assert!(report.peak >= 1);
    assert_eq!(report.instances.len(), 1);
    assert_eq!(report.instances[0].instance, "i-1");
    // Idle: one more (all zero) report, then silence.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let n = source.reports().len();
    let last = source.reports().last().cloned().unwrap();
    assert_eq!(last.apps[0].requests, 0);
    assert_eq!(last.apps[0].concurrency, 0.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(source.reports().len(), n, "an idle app is not reported");
    router.shutdown().await;
}

#[tokio::test]
async fn per_app_limits_on_concurrency_and_body_size() {
    let up = upstream("limited").await;
    let source = FakeSource::new(vec![app("limited", Some(1), &[("i-1", up.addr)])]);
    source.set_limits(
        "limited",
        stead_api::AppLimits {
            max_concurrency: Some(1),
            max_body_bytes: Some(10),
            target_concurrency: Some(100),
        },
    );
    let router = TestRouter::start(source.clone(), Duration::from_secs(5)).await;
    let c = client();
    // A declared length over the limit: 413 at once, nothing forwarded.
    let hits = up.hits.load(Ordering::SeqCst);
    let req = Request::post(router.url("/upload"))
        .header("host", "limited.localhost")
        .body(TestBody::text("x".repeat(20)))
        .unwrap();
    let resp = send(&c, req).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(error_body(resp).await.error, "request_too_large");
    assert_eq!(up.hits.load(Ordering::SeqCst), hits);
    // A streamed body that goes over: cut off, 413.
    let (tx, body) = TestBody::channel();
    let req = Request::post(router.url("/upload"))
        .header("host", "limited.localhost")
        .body(body)
        .unwrap();
    let pending = tokio::spawn({
        let c = c.clone();
        async move { send(&c, req).await }
    });
    tx.send(Bytes::from_static(b"12345678")).await.unwrap();
    let _ = tx.send(Bytes::from_static(b"12345678")).await;
    drop(tx);
    let resp = within("streamed upload", pending).await.unwrap();
    assert_eq!(resp.status(), 413);
    // Within the limit: fine.
    let req = Request::post(router.url("/upload"))
        .header("host", "limited.localhost")
        .body(TestBody::text("small"))
        .unwrap();
    let resp = send(&c, req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(text(resp).await, "5");
    // One request in flight (held open by /stream): the next one is refused.
    let first = send(&c, get(&router.url("/stream"), Some("limited.localhost"))).await;
    assert_eq!(first.status(), 200);
    let resp = send(&c, get(&router.url("/"), Some("limited.localhost"))).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(error_body(resp).await.error, "app_overloaded");
    up.gate.notify_waiters();
    text(first).await;
    let resp = send(&c, get(&router.url("/"), Some("limited.localhost"))).await;
    assert_eq!(resp.status(), 200);
    let metrics = text(send(&c, get(&router.url("/metrics"), None)).await).await;
    assert!(
        metrics.contains("stead_router_limited_requests_total{app=\"limited\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stead_router_instance_outstanding{app=\"limited\",instance=\"i-1\"}"),
        "{metrics}"
    );
    router.shutdown().await;
}

#[tokio::test]
async fn app_that_never_had_a_version_is_not_held_for_the_whole_wake_wait() {
    let source = FakeSource::new(vec![app("unbuilt", None, &[])]);
    let router = TestRouter::start(source.clone(), Duration::from_secs(30)).await;
    let c = client();
    let started = Instant::now();
    let resp = send(&c, get(&router.url("/"), Some("unbuilt.localhost"))).await;
    let waited = started.elapsed();
    assert_eq!(resp.status(), 503);
    let err = error_body(resp).await;
    assert_eq!(err.error, "no_ready_instance");
    assert!(err.message.contains("no ready version"), "{}", err.message);
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(8),
        "held {waited:?}"
    );
    router.shutdown().await;
}
