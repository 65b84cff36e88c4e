//! The HTTP reverse proxy in front of every app.
//!
//! A request reaches app `<app>` either as `Host: <app>.<domain>` or under
//! the path prefix `/apps/<app>/` (stripped before forwarding). The router
//! sends it to one of the ready endpoints of the app's active version, taken
//! from a [`RouteTable`](stead_api::RouteTable) that a [`RouteSource`]
//! provides (in production the control plane's `GET /v1/routes`, polled by
//! [`ApiRouteSource`]).
//!
//! The table is kept current by long-polling the source: the control plane
//! answers as soon as the table changes, so a new or removed endpoint is
//! known within milliseconds; the periodic refresh is only the fallback.
//!
//! When an app has no ready endpoint (just deployed, restarting, or scaled to
//! zero) the request is held: the router tells the autoscaler at once (one
//! wake-up report per app, however many requests arrive), and forwards the
//! request as soon as an endpoint appears, for up to
//! [`RouterConfig::wake_wait`] before answering 503. Requests held this way
//! count as in flight for their app.
//!
//! The router measures each app's demand (requests in flight averaged over
//! time, request counts, held requests, per-instance load) and reports it
//! to the autoscaler about once a second while the app is busy, earlier when
//! a burst takes it past its target, and not at all while it idles.
//!
//! Bodies are streamed both ways, never buffered; HTTP/1.1 (keep-alive,
//! upgrades such as WebSocket) and h2c are served on the same port.
//!
//! A router is replaced without refusing a connection: the new one takes
//! the listening sockets from the running one (see [`handover`]), which
//! then drains: it stops accepting, finishes the requests in flight, ends
//! each HTTP/1 keep-alive connection with `Connection: close` on its next
//! response, sends HTTP/2 connections GOAWAY, closes connections that stay
//! idle for [`RouterConfig::drain_idle`], and returns from
//! [`Router::serve`]. Asked to shut down, it drains the same way.

mod body;
mod demand;
pub mod handover;
mod metrics;
mod proxy;
mod routing;
mod source;
mod table;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use source::{ApiRouteSource, RouteSource};

use body::ForwardBody;
use metrics::Registry;
use table::Table;

/// Errors of the router's own operation (not of proxied requests, which are
/// answered with an HTTP error instead).
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The listen address could not be bound (in use, no permission...).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The route source could not produce a table.
    #[error("cannot fetch routes: {0}")]
    Source(String),
    /// Taking over from a running router failed (it keeps serving).
    #[error("cannot take over from the running router: {0}")]
    Handover(#[from] handover::HandoverError),
    /// Any other I/O failure of the listener.
    #[error("router I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// How the router listens and behaves.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Address to listen on; port 0 picks a free port (see
    /// [`Router::local_addr`]).
    pub listen: SocketAddr,
    /// Apps are served as `<app>.<domain>` (any `:port` in `Host` ignored).
    pub domain: String,
    /// How often the route table is refreshed in the background (default
    /// 500 ms). Requests for an app without a ready endpoint also trigger a
    /// refresh, so this bounds how long a *removed* endpoint keeps getting
    /// traffic, not how soon a new one gets it.
    pub refresh_interval: Duration,
    /// How long a request for an app without a ready endpoint is held
    /// waiting for one (an app waking from zero) before the router answers
    /// 503 with `Retry-After` (default 30 s).
    pub wake_wait: Duration,
    /// How often demand is reported to the autoscaler while apps are busy
    /// (default 1 s).
    pub report_interval: Duration,
    /// Threads serving connections, each with its own single-threaded
    /// runtime, listener (`SO_REUSEPORT`: the kernel spreads connections)
    /// and upstream connection pool, like nginx's workers: no work
    /// stealing or cross-thread wake-ups on the hot path. 0 serves on the
    /// caller's runtime instead. Default: one per CPU.
    pub threads: usize,
    /// The hand-over socket (see [`handover`]): a router running there
    /// hands its listening sockets over instead of this one binding, and
    /// this one then listens there for its own successor. `None` (the
    /// default) just binds. [`handover::default_socket_path`] derives one
    /// from the listen address.
    pub handover: Option<PathBuf>,
    /// While draining, an HTTP/1 connection that sends no request for this
    /// long is closed (one that does gets `Connection: close` on its
    /// response). Clients that reuse connections sooner never see a close
    /// they could race with a request. Default 5 s.
    pub drain_idle: Duration,
    /// Bound on draining: connections (and upgraded tunnels) still open
    /// this long after draining began are cut. Default 10 s.
    pub drain_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            domain: "localhost".to_string(),
            refresh_interval: Duration::from_millis(500),
            wake_wait: Duration::from_secs(30),
            report_interval: Duration::from_secs(1),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            handover: None,
            drain_idle: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

thread_local! {
    /// The upstream client of a worker thread (see [`RouterConfig::threads`]):
    /// its pooled connections live on that thread's runtime.
    static WORKER_CLIENT: std::cell::RefCell<Option<Client<HttpConnector, ForwardBody>>> =
        const { std::cell::RefCell::new(None) };
}

/// The upstream client: pooled, no Nagle, bounded connect time.
fn build_client() -> Client<HttpConnector, ForwardBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// A listener on `addr` that other listeners can share (`SO_REUSEPORT`).
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    listener.into_std()
}

/// The smallest background refresh interval accepted: a zero interval would
/// spin (and `tokio::time::interval` rejects it).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(10);
/// Bound on one route fetch, so a hung control plane cannot block refreshes
/// forever (every later refresh waits for the one in flight).
const SOURCE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one long-poll of the route table may be held by the source.
const WATCH_WAIT: Duration = Duration::from_secs(20);
/// How long a router taking over waits for its first route table before
/// it tells its predecessor to stop: requests it accepts before are held,
/// not failed, but they wait; past this it serves anyway.
const HANDOVER_ROUTES_WAIT: Duration = Duration::from_secs(5);
/// Slow-loris guard: a client must send its request head within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to an instance on the local network should take
/// milliseconds; past this, the instance is treated as unreachable.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle upstream connections are closed after this; keeps the pool from
/// holding sockets to instances that have gone.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One completed route fetch, as seen by requests waiting for a fresh table.
#[derive(Debug, Clone, Copy)]
struct Fetched {
    started: Instant,
    ok: bool,
}

/// State shared by the accept loop, every connection and the refresher.
pub(crate) struct Shared {
    domain: String,
    wake_wait: Duration,
    source: Arc<dyn RouteSource>,
    table: ArcSwap<Table>,
    registry: Registry,
    client: Client<HttpConnector, ForwardBody>,
    /// Origin of the millisecond clock used for endpoint avoidance.
    clock: Instant,
    /// True while a route fetch is running: at most one at a time.
    fetching: Mutex<bool>,
    /// The latest completed fetch; waiters subscribe to learn of the next.
    fetched: watch::Sender<Option<Fetched>>,
    /// Whether any fetch has ever succeeded (an app missing from a table
    /// that was never loaded is not known to be unknown).
    ever_loaded: AtomicBool,
    /// Whether the last fetch failed, to log a failing source once rather
    /// than on every poll.
    failing: AtomicBool,
    /// Bumped whenever a new table is installed: held requests wait on it.
    table_changed: watch::Sender<u64>,
    /// True while the source's long-poll is working, so held requests can
    /// rely on it rather than poll.
    watching: AtomicBool,
    /// Identifies this router in demand reports.
    router_id: String,
    report_interval: Duration,
    /// Set when draining begins: HTTP/1 responses then carry
    /// `Connection: close`.
    draining: AtomicBool,
    /// Upgraded connections (WebSocket tunnels) open, which draining waits
    /// for: they outlive the HTTP connection they came from.
    tunnels: watch::Sender<usize>,
    drain_idle: Duration,
    drain_timeout: Duration,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// This thread's upstream client (a worker's own), else the shared one.
    pub(crate) fn client(&self) -> Client<HttpConnector, ForwardBody> {
        WORKER_CLIENT
            .with(|c| c.borrow().clone())
            .unwrap_or_else(|| self.client.clone())
    }

    /// Waits until a route fetch that started at or after `since` has
    /// completed (starting one unless one is already running), and returns
    /// whether it succeeded. Concurrent callers share fetches.
    ///
    /// The fetch runs in its own task, so a caller that gives up (its wait
    /// timed out, its client went away) does not cancel it for the others.
    async fn refresh_since(self: &Arc<Self>, since: Instant) -> bool {
        let mut rx = self.fetched.subscribe();
        loop {
            if let Some(f) = *rx.borrow_and_update() {
                if f.started >= since {
                    return f.ok;
                }
            }
            self.start_fetch();
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    fn start_fetch(self: &Arc<Self>) {
        {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            if *fetching {
                return;
            }
            *fetching = true;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            let mut done = FetchDone {
                shared: &shared,
                fetched: Fetched {
                    started: Instant::now(),
                    ok: false,
                },
            };
            let result = tokio::time::timeout(SOURCE_TIMEOUT, shared.source.fetch()).await;
            let error = match result {
                Ok(Ok(routes)) => {
                    shared.install(routes);
                    done.fetched.ok = true;
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "route fetch took longer than {}s",
                    SOURCE_TIMEOUT.as_secs()
                )),
            };
            if let Some(error) = error {
                if shared.failing.swap(true, Ordering::Relaxed) {
                    tracing::debug!(%error, "route refresh failed; serving the last table");
                } else {
                    tracing::warn!(%error, "route refresh failed; serving the last table");
                }
            }
        });
    }

    fn lookup(&self, app: &str) -> Option<Arc<table::AppEntry>> {
        self.table.load().get(app).cloned()
    }

    /// `/metrics`: per-app counters, plus each endpoint's outstanding
    /// requests (what least-outstanding balancing reads).
    fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = self.registry.render();
        out.push_str(
            "# HELP stead_router_instance_outstanding Requests sent to an instance and not finished, by app and instance.\n\
             # TYPE stead_router_instance_outstanding gauge\n",
        );
        let table = self.table.load();
        for e in table.entries() {
            for ep in e.endpoints.iter() {
                let _ = writeln!(
                    out,
                    "stead_router_instance_outstanding{{app=\"{}\",instance=\"{}\"}} {}",
                    metrics::escape_label(&e.name),
                    metrics::escape_label(&ep.instance),
                    ep.outstanding.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP stead_router_routes_watching Whether the route table is kept current by long-poll (1) or polled (0).\n\
             # TYPE stead_router_routes_watching gauge\nstead_router_routes_watching {}",
            u8::from(self.watching.load(Ordering::Relaxed))
        );
        out
    }

    /// Makes `routes` the table requests use, and wakes held requests.
    fn install(&self, routes: stead_api::RouteTable) {
        let previous = self.table.load();
        let table = Table::build(routes, &previous, &self.registry);
        self.table.store(Arc::new(table));
        self.ever_loaded.store(true, Ordering::Relaxed);
        self.table_changed.send_modify(|v| *v = v.wrapping_add(1));
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("route source answers again");
        }
    }

    /// Keeps the table current: long-polls the source, which answers when
    /// the table changes; a source that cannot long-poll (no etag) is
    /// polled every `interval` instead, and after a failure the next
    /// attempt waits `interval` too.
    async fn watch_routes(self: Arc<Self>, interval: Duration) {
        loop {
            let since = self.table.load().etag.clone();
            let started = Instant::now();
            let got = tokio::time::timeout(
                WATCH_WAIT + SOURCE_TIMEOUT,
                self.source.fetch_changed(since.clone(), WATCH_WAIT),
            )
            .await;
            match got {
                Ok(Ok(routes)) => {
                    let long_polls = routes.etag.is_some();
                    let changed = routes.etag.is_none() || routes.etag != since;
                    if changed {
                        self.install(routes);
                    }
                    self.watching.store(long_polls, Ordering::Relaxed);
                    if !long_polls {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(
                            started + interval,
                        ))
                        .await;
                    }
                }
                other => {
                    self.watching.store(false, Ordering::Relaxed);
                    let error = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "route long-poll took too long".to_string(),
                    };
                    if self.failing.swap(true, Ordering::Relaxed) {
                        tracing::debug!(%error, "route refresh failed; serving the last table");
                    } else {
                        tracing::warn!(%error, "route refresh failed; serving the last table");
                    }
                    tokio::time::sleep(interval).await;
                }
            }
        }
    }
}

/// Ends a fetch: marks none running and wakes its waiters, also when the
/// fetch task panics or is cancelled (so waiters can never hang on it).
struct FetchDone<'a> {
    shared: &'a Arc<Shared>,
    fetched: Fetched,
}

impl Drop for FetchDone<'_> {
    fn drop(&mut self) {
        *self
            .shared
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = false;
        self.shared.fetched.send_replace(Some(self.fetched));
    }
}

/// A bound, not yet serving, router.
pub struct Router {
    /// All on the same address: one or more per serving thread, or all
    /// served on the caller's runtime.
    listeners: Vec<std::net::TcpListener>,
    threaded: bool,
    threads: usize,
    local_addr: SocketAddr,
    refresh_interval: Duration,
    shared: Arc<Shared>,
    /// The router we took the listeners from, told to drain once we serve.
    predecessor: Option<handover::Predecessor>,
    /// Where our own successor will find us.
    offer: Option<handover::Offer>,
}

/// Reads the router's per-app concurrency while it serves, for the
/// autoscaler. Cheap to clone.
#[derive(Clone)]
pub struct LoadReport {
    shared: Arc<Shared>,
}

impl LoadReport {
    /// Requests in flight per app (received and not finished, including
    /// those held waiting for a ready instance). Apps seen since the router
    /// started are listed, with 0 when idle.
    pub fn in_flight(&self) -> BTreeMap<String, u64> {
        self.shared.registry.in_flight()
    }
}

impl Router {
    /// Takes the listening sockets over from the router at
    /// [`RouterConfig::handover`], if one runs there, else binds them (so
    /// callers know the port before serving; port 0 is allowed), and
    /// prepares the upstream client. Serves nothing until
    /// [`Router::serve`]; a predecessor keeps serving until then.
    pub async fn bind(
        config: RouterConfig,
        source: Arc<dyn RouteSource>,
    ) -> Result<Router, RouterError> {
        let bind_err =
            |addr: SocketAddr| move |source: std::io::Error| RouterError::Bind { addr, source };
        let threaded = config.threads > 0;
        let threads = config.threads.clamp(1, handover::MAX_LISTENERS);

        let mut predecessor = None;
        let mut listeners = Vec::new();
        if let Some(path) = &config.handover {
            if let Some((p, taken)) = handover::take_over(path, config.listen).await? {
                tracing::info!(addr = %config.listen, path = %path.display(), listeners = taken.len(),
                    "taking over the listening sockets of the running router");
                predecessor = Some(p);
                listeners = taken;
            }
        }
        let local_addr = if let Some(first) = listeners.first() {
            let addr = first.local_addr()?;
            // A predecessor with fewer threads: more listeners join its
            // `SO_REUSEPORT` group (impossible, and skipped, if it had a
            // single plain listener).
            while threaded && listeners.len() < threads {
                match reuseport_listener(addr) {
                    Ok(l) => listeners.push(l),
                    Err(error) => {
                        tracing::debug!(%error, "serving on the listeners taken over only");
                        break;
                    }
                }
            }
            addr
        } else if threaded {
            let first = reuseport_listener(config.listen).map_err(bind_err(config.listen))?;
            let addr = first.local_addr()?;
            listeners.push(first);
            for _ in 1..threads {
                listeners.push(reuseport_listener(addr).map_err(bind_err(addr))?);
            }
            addr
        } else {
            let l = TcpListener::bind(config.listen)
                .await
                .map_err(bind_err(config.listen))?;
            let addr = l.local_addr()?;
            listeners.push(l.into_std()?);
            addr
        };
        let offer = match &config.handover {
            Some(path) => Some(handover::Offer::bind(path, &listeners)?),
            None => None,
        };
        let client = build_client();

        let shared = Arc::new(Shared {
            domain: routing::normalize_domain(&config.domain),
            wake_wait: config.wake_wait,
            source,
            table: ArcSwap::from_pointee(Table::default()),
            registry: Registry::default(),
            client,
            clock: Instant::now(),
            fetching: Mutex::new(false),
            fetched: watch::channel(None).0,
            ever_loaded: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            table_changed: watch::channel(0).0,
            watching: AtomicBool::new(false),
            router_id: format!("router-{}-{:08x}", local_addr, rand::random::<u32>()),
            report_interval: config.report_interval.max(Duration::from_millis(100)),
            draining: AtomicBool::new(false),
            tunnels: watch::channel(0).0,
            drain_idle: config.drain_idle,
            drain_timeout: config.drain_timeout,
        });
        Ok(Router {
            listeners,
            threaded,
            threads,
            local_addr,
            refresh_interval: config.refresh_interval.max(MIN_REFRESH_INTERVAL),
            shared,
            predecessor,
            offer,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether [`Router::bind`] took the listening sockets over from a
    /// running router (which drains once this one serves).
    pub fn took_over(&self) -> bool {
        self.predecessor.is_some()
    }

    /// A handle to read per-app concurrency while the router serves.
    pub fn load(&self) -> LoadReport {
        LoadReport {
            shared: self.shared.clone(),
        }
    }

    /// Refreshes the route table in the background and serves connections
    /// until `shutdown` completes or a successor has taken the listening
    /// sockets over; then drains (stops accepting, lets open requests
    /// finish, closes connections; see the crate docs) and returns.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RouterError> {
        let Router {
            listeners,
            threaded,
            threads,
            local_addr,
            refresh_interval,
            shared,
            predecessor,
            mut offer,
        } = self;

        let refresher = tokio::spawn(shared.clone().watch_routes(refresh_interval));
        let reporter = tokio::spawn(demand::report_loop(shared.clone()));

        // Listener i is served by thread i mod n.
        let n = if threaded {
            threads.min(listeners.len())
        } else {
            1
        };
        let mut groups: Vec<Vec<std::net::TcpListener>> = (0..n).map(|_| Vec::new()).collect();
        for (i, l) in listeners.into_iter().enumerate() {
            groups[i % n].push(l);
        }
        tracing::info!(addr = %local_addr, domain = %shared.domain, threads = n,
            handover = ?offer.as_ref().map(|o| o.path().display().to_string()),
            "router listening");

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut workers = Vec::new();
        let mut local = None;
        for (i, group) in groups.into_iter().enumerate() {
            let shared = shared.clone();
            let stop = stop_rx.clone();
            if !threaded {
                let mut set = tokio::task::JoinSet::new();
                for l in group {
                    set.spawn(accept_loop(
                        TcpListener::from_std(l)?,
                        shared.clone(),
                        stop.clone(),
                    ));
                }
                local = Some(set);
                continue;
            }
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("stead-router-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(error) => {
                            tracing::error!(%error, "cannot start a router thread");
                            return;
                        }
                    };
                    WORKER_CLIENT.with(|c| {
                        *c.borrow_mut() = Some(runtime.block_on(async { build_client() }))
                    });
                    runtime.block_on(async move {
                        let mut set = tokio::task::JoinSet::new();
                        for l in group {
                            match TcpListener::from_std(l) {
                                Ok(l) => {
                                    set.spawn(accept_loop(l, shared.clone(), stop.clone()));
                                }
                                Err(error) => {
                                    tracing::error!(%error, "cannot use a router listener")
                                }
                            }
                        }
                        while set.join_next().await.is_some() {}
                    });
                    drop(done_tx);
                })?;
            workers.push(done_rx);
        }

        if let Some(p) = predecessor {
            // Serve with a route table before the old router stops: requests
            // accepted before it is loaded would be held, not failed, but
            // would wait for it.
            if tokio::time::timeout(HANDOVER_ROUTES_WAIT, shared.refresh_since(Instant::now()))
                .await
                .is_err()
            {
                tracing::warn!("no route table yet; taking over anyway");
            }
            match p.release().await {
                Ok(()) => tracing::info!(addr = %local_addr, "took over from the running router"),
                // It drains anyway once it sees us go (or keeps serving
                // beside us): either way no connection is refused.
                Err(error) => tracing::warn!(%error, "could not tell the old router to drain"),
            }
        }

        let handed_over = tokio::select! {
            _ = shutdown => false,
            _ = async {
                match offer.as_mut() {
                    Some(o) => o.hand_over().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        if let Some(o) = offer.take() {
            if !handed_over {
                o.remove();
            }
            // Closes our duplicates of the listening sockets too: without a
            // successor, the kernel sockets close with the workers' copies.
        }
        tracing::info!(addr = %local_addr, handed_over, "router draining");
        shared.draining.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        if let Some(mut set) = local {
            while set.join_next().await.is_some() {}
        }
        for w in workers {
            // Each worker ends within the drain timeout (see `accept_loop`).
            let _ = w.await;
        }
        refresher.abort();
        reporter.abort();
        tracing::info!(addr = %local_addr, "router stopped");
        Ok(())
    }
}

/// Serves the connections of one listener until `stop`; then stops
/// accepting and drains its connections (see the crate docs), within the
/// drain timeout, and returns.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());

    // Connection tasks, so that any still open after the drain timeout
    // can be ended rather than outliving `serve`.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = async {
                // The guard `wait_for` returns must not live across an await.
                let _ = stop.wait_for(|s| *s).await;
            } => break,
            // Reap finished connection tasks so the set stays small.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Best effort: only latency suffers if it fails.
                    let _ = stream.set_nodelay(true);
                    let conn = serve_connection(&builder, stream, peer, shared.clone(), stop.clone());
                    conns.spawn(conn);
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of
                    // spinning, the condition may clear as connections close.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    // Stop accepting. After a hand-over the kernel socket lives on in the
    // successor, which accepts what is queued; otherwise it closes here.
    drop(listener);
    let deadline = tokio::time::Instant::now() + shared.drain_timeout;
    tracing::debug!(open = conns.len(), "draining connections");
    let drained = tokio::time::timeout_at(deadline, async {
        while conns.join_next().await.is_some() {}
        let _ = shared.tunnels.subscribe().wait_for(|n| *n == 0).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            tunnels = *shared.tunnels.borrow(),
            "connections still open {}s after draining began; closing them",
            shared.drain_timeout.as_secs()
        );
        conns.abort_all();
    }
    // Tasks (upgraded tunnels, streaming bodies) end with the runtime.
    conns.shutdown().await;
}

/// One client connection, from accept to close, including its part in
/// draining: HTTP/2 gets GOAWAY at once (in-flight streams finish); HTTP/1
/// is told `Connection: close` on its next response (see the service) and
/// closed if it stays idle for the drain-idle bound.
fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + 'static {
    let client = proxy::Peer::new(peer);
    // Set once the connection turns out to speak HTTP/2.
    let h2 = Arc::new(AtomicBool::new(false));
    let drain_idle = shared.drain_idle;
    let service = {
        let h2 = h2.clone();
        service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            let client = client.clone();
            let http1 = req.version() < hyper::Version::HTTP_2;
            if !http1 {
                h2.store(true, Ordering::Relaxed);
            }
            async move {
                let mut resp = shared.clone().handle(req, client).await;
                if http1
                    && shared.draining.load(Ordering::Relaxed)
                    && resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS
                {
                    resp.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .into_owned();
    async move {
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => Some(r),
            _ = async { let _ = stop.wait_for(|s| *s).await; } => None,
        };
        let result = match result {
            Some(r) => r,
            None => {
                let idle_closed = if h2.load(Ordering::Relaxed) {
                    None
                } else {
                    tokio::select! {
                        r = conn.as_mut() => Some(r),
                        _ = tokio::time::sleep(drain_idle) => None,
                    }
                };
                match idle_closed {
                    Some(r) => r,
                    None => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%peer, %error, "client connection ended with an error");
        }
    }
}
