//! Handling one request: find the app, wait for an endpoint if needed,
//! forward, and stream the answer back.

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{PathAndQuery, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use stead_api::{ErrorBody, INSTANCE_HEADER, REQUEST_ID_HEADER, VERSION_HEADER};

use crate::body::{BodySlot, ForwardBody, Guards, ProxyBody};
use crate::metrics::{AppStats, Held, InFlight};
use crate::routing;
use crate::table::AppEntry;
use crate::Shared;

/// How often a held request re-fetches the table when the source's
/// long-poll is not working (it is woken by table changes anyway).
const WAKE_POLL: Duration = Duration::from_millis(150);
/// The same, while the long-poll works: a safety net only.
const WAKE_POLL_WATCHED: Duration = Duration::from_secs(1);
/// An app that has never had a ready version (its first build is running,
/// or failed) holds requests this long at most, not the whole wake wait.
const NO_VERSION_WAIT: Duration = Duration::from_secs(5);
/// After a connection to an endpoint is refused, other endpoints are
/// preferred for this long.
const AVOID_AFTER_CONNECT_ERROR_MS: u64 = 2_000;
/// A client's request id longer than this is replaced (it is logged and
/// echoed, so it must stay small).
const MAX_REQUEST_ID_LEN: usize = 128;

static X_REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
static X_STEAD_VERSION: HeaderName = HeaderName::from_static(VERSION_HEADER);
static X_STEAD_INSTANCE: HeaderName = HeaderName::from_static(INSTANCE_HEADER);
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1):
/// never forwarded. `connection` and `upgrade` are handled separately
/// because an upgrade needs them passed on.
fn hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
    ]
}

/// Removes hop-by-hop headers, including those the `Connection` header
/// names. With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay so
/// the next hop sees the upgrade request (or acceptance).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                    || token.eq_ignore_ascii_case("upgrade")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(name);
                }
            }
        }
        for name in named {
            // Never let `Connection` strip what identifies the request.
            if name != X_REQUEST_ID && name != header::HOST {
                headers.remove(name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    for name in hop_by_hop() {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (e.g. WebSocket).
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    // 32 lowercase hex digits, formatted on the stack (this runs for every
    // request): always a valid header value.
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("unknown"))
}

/// The client's request id if usable, else a new one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN && v.to_str().is_ok() => {
            v.clone()
        }
        _ => new_request_id(),
    }
}

/// A one-line JSON [`ErrorBody`] response.
fn error_response(
    status: StatusCode,
    kind: &str,
    message: String,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let body = ErrorBody {
        error: kind.to_string(),
        message,
    };
    // Serialising two strings cannot fail; an empty body is the fallback
    // rather than a panic.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::new(ProxyBody::full(bytes));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_REQUEST_ID.clone(), request_id.clone());
    resp
}

/// 413 for a body over the app's limit.
fn too_large(app: &str, max: u64, request_id: &HeaderValue) -> Response<ProxyBody> {
    let resp = error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!(
            "the request body is larger than app {app:?} accepts ({max} bytes, `run.max_body`); \
             send less, or raise it with `stead scale {app} --max-body SIZE`"
        ),
        request_id,
    );
    resp
}

/// The message of an error and of all its causes, which is where hyper's
/// errors keep the useful part ("connection refused").
fn error_chain(e: &hyper_util::client::legacy::Error) -> String {
    let mut out = String::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&c.to_string());
        cause = c.source();
    }
    if out.is_empty() {
        out = e.to_string();
    }
    out
}

/// The client of a connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub addr: SocketAddr,
    /// Its address as an `X-Forwarded-For` value, made once per connection.
    pub ip_header: Option<HeaderValue>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip_header = HeaderValue::from_str(&addr.ip().to_canonical().to_string()).ok();
        Peer { addr, ip_header }
    }
}

/// What a held request ended with.
enum Woken {
    Ready(Arc<AppEntry>),
    /// Not in the (successfully refreshed) route table.
    Unknown,
    /// Known, but no endpoint became ready in time.
    NoInstance(Option<Arc<AppEntry>>),
    /// No route table could ever be loaded.
    NoRoutes,
}

/// Where a request goes once its app is known.
struct Target {
    entry: Arc<AppEntry>,
    /// Replacement path and query (prefix routing), else the request's own.
    path_and_query: Option<PathAndQuery>,
}

impl Shared {
    /// Answers one request. Never fails: every problem becomes an HTTP
    /// error response.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let request_id = request_id(req.headers());

        // Derive the app while borrowing the request; keep only what is
        // needed afterwards (no allocation on the common, known-app path).
        let (found, missing_name, path_and_query) = {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()));
            let Some(target) = routing::derive(host, req.uri().path(), &self.domain) else {
                return self.local(&req, &request_id, start);
            };
            let pq = match target.stripped_path {
                None => None,
                Some(path) => {
                    let s = match req.uri().query() {
                        Some(q) => format!("{path}?{q}"),
                        None => path.to_string(),
                    };
                    match PathAndQuery::from_maybe_shared(Bytes::from(s)) {
                        Ok(pq) => Some(pq),
                        Err(_) => {
                            return error_response(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                "the request path is not valid".into(),
                                &request_id,
                            )
                        }
                    }
                }
            };
            match self.table.load().get(&target.app) {
                Some(e) => (Some(e.clone()), None, pq),
                None => (None, Some(target.app.into_owned()), pq),
            }
        };

        let mut in_flight = None;
        let entry = match found {
            Some(e) if e.has_endpoints() => {
                in_flight = Some(InFlight::start(&e.stats));
                e
            }
            other => {
                let name = match (&other, missing_name) {
                    (Some(e), _) => e.name.to_string(),
                    (None, Some(n)) => n,
                    (None, None) => String::new(),
                };
                match self.wake(&name, start, &mut in_flight).await {
                    Woken::Ready(e) => e,
                    Woken::Unknown => {
                        return self.finish_unrouted(
                            error_response(
                                StatusCode::NOT_FOUND,
                                "unknown_app",
                                format!(
                                    "there is no app named {name:?}: deploy it with `stead deploy` \
                                     from a directory whose stead.toml names it {name:?}"
                                ),
                                &request_id,
                            ),
                            &name,
                            start,
                            &request_id,
                        )
                    }
                    Woken::NoRoutes => {
                        let mut resp = error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "routes_unavailable",
                            "the router has not been able to load its route table from the \
                             control plane yet; retry shortly"
                                .into(),
                            &request_id,
                        );
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                        return self.finish_unrouted(resp, &name, start, &request_id);
                    }
                    Woken::NoInstance(e) => {
                        let version = e.as_ref().and_then(|e| e.version);
                        let message = match version {
                            Some(v) => format!(
                                "app {name:?} (version {v}) has no ready instance after waiting {:.1}s; \
                                 it may still be starting: retry shortly, or see `stead logs {name}`",
                                self.wake_wait.as_secs_f64()
                            ),
                            None => format!(
                                "app {name:?} has no ready version yet: its build may still be running \
                                 or may have failed; see `stead status {name}`"
                            ),
                        };
                        let mut resp = error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no_ready_instance",
                            message,
                            &request_id,
                        );
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                        if let Some(h) = e.as_ref().and_then(|e| e.version_header.clone()) {
                            resp.headers_mut().insert(X_STEAD_VERSION.clone(), h);
                        }
                        let stats = e.as_ref().map(|e| e.stats.clone());
                        drop(in_flight);
                        return self.finish(
                            resp,
                            &name,
                            version,
                            None,
                            stats.as_deref(),
                            start,
                            &request_id,
                        );
                    }
                }
            }
        };
        if let Some(resp) = self.over_limits(&req, &entry, in_flight.as_ref(), &request_id) {
            drop(in_flight);
            entry
                .stats
                .limited_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return self.finish(
                resp,
                &entry.name,
                entry.version,
                None,
                Some(&entry.stats),
                start,
                &request_id,
            );
        }
        self.forward(
            req,
            Target {
                entry,
                path_and_query,
            },
            in_flight,
            request_id,
            peer,
            start,
        )
        .await
    }

    /// The app's own limits: too many requests in flight (503 at once,
    /// rather than queueing without bound) or a body declared larger than
    /// allowed (413; bodies without a declared length are cut off when
    /// they go over, see `ForwardBody`).
    fn over_limits(
        &self,
        req: &Request<Incoming>,
        entry: &AppEntry,
        in_flight: Option<&InFlight>,
        request_id: &HeaderValue,
    ) -> Option<Response<ProxyBody>> {
        if let (Some(max), Some(f)) = (entry.limits.max_concurrency, in_flight) {
            if f.current() > i64::from(max) {
                let mut resp = error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "app_overloaded",
                    format!(
                        "app {:?} already has {max} requests in flight, its limit (`scale.max_concurrency`); \
                         retry shortly, or raise it with `stead scale {} --max-concurrency N`",
                        &*entry.name, &*entry.name
                    ),
                    request_id,
                );
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Some(resp);
            }
        }
        if let Some(max) = entry.limits.max_body_bytes {
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .or_else(|| req.body().size_hint().exact());
            if declared.is_some_and(|n| n > max) {
                return Some(too_large(&entry.name, max, request_id));
            }
        }
        None
    }

    /// Holds a request for `app` until it has a ready endpoint or the wake
    /// wait is over. The table is refreshed once first (an app deployed a
    /// moment ago may be missing from it), then polled. While waiting for a
    /// known app, the request counts as in flight for it.
    async fn wake(
        self: &Arc<Self>,
        app: &str,
        since: Instant,
        in_flight: &mut Option<InFlight>,
    ) -> Woken {
        let deadline = tokio::time::Instant::from_std(since + self.wake_wait);
        let mut changes = self.table_changed.subscribe();
        let wait = async {
            // A known app without endpoints is asleep (or restarting): ask
            // the autoscaler for an instance before anything else.
            let mut entry = match self.lookup(app) {
                Some(e) => e,
                None => {
                    // Not in this table: it may have been deployed a moment ago.
                    let loaded = self.refresh_since(since).await;
                    match self.lookup(app) {
                        Some(e) => e,
                        None if loaded
                            || self.ever_loaded.load(std::sync::atomic::Ordering::Relaxed) =>
                        {
                            return Woken::Unknown
                        }
                        None => return Woken::NoRoutes,
                    }
                }
            };
            if in_flight.is_none() {
                *in_flight = Some(InFlight::start(&entry.stats));
            }
            if entry.has_endpoints() {
                return Woken::Ready(entry);
            }
            let (_held, first) = Held::start(&entry.stats);
            if first {
                crate::demand::wake(self, app);
            }
            loop {
                changes.borrow_and_update();
                if let Some(e) = self.lookup(app) {
                    entry = e;
                } else {
                    return Woken::Unknown;
                }
                if entry.has_endpoints() {
                    return Woken::Ready(entry);
                }
                if entry.version.is_none() && since.elapsed() >= NO_VERSION_WAIT {
                    return Woken::NoInstance(Some(entry));
                }
                let poll = if self.watching.load(std::sync::atomic::Ordering::Relaxed) {
                    WAKE_POLL_WATCHED
                } else {
                    WAKE_POLL
                };
                let slept_from = Instant::now();
                tokio::select! {
                    // A new table (from the long-poll): look again at once.
                    r = changes.changed() => {
                        if r.is_err() {
                            tokio::time::sleep(poll).await;
                        }
                    }
                    _ = tokio::time::sleep(poll) => {
                        // Any fetch started while this request slept is fresh
                        // enough; all held requests share one fetch per poll.
                        self.refresh_since(slept_from).await;
                    }
                }
            }
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(woken) => woken,
            Err(_) => Woken::NoInstance(self.lookup(app)),
        }
    }

    /// Requests with no app: the router's own endpoints, else 400.
    fn local(
        &self,
        req: &Request<Incoming>,
        request_id: &HeaderValue,
        start: Instant,
    ) -> Response<ProxyBody> {
        let readable = req.method() == Method::GET || req.method() == Method::HEAD;
        let (content_type, body) = match req.uri().path() {
            "/_stead/health" if readable => (
                "application/json",
                Bytes::from_static(b"{\"status\":\"ok\"}"),
            ),
            "/metrics" if readable => (
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(self.render_metrics()),
            ),
            _ => {
                let resp = error_response(
                    StatusCode::BAD_REQUEST,
                    "no_app",
                    format!(
                        "cannot tell which app this request is for: use `Host: <app>.{}` or a path \
                         under `/apps/<app>/`",
                        self.domain
                    ),
                    request_id,
                );
                return self.finish_unrouted(resp, "", start, request_id);
            }
        };
        let mut resp = Response::new(ProxyBody::full(body));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp
    }

    fn finish_unrouted(
        &self,
        resp: Response<ProxyBody>,
        app: &str,
        start: Instant,
        request_id: &HeaderValue,
    ) -> Response<ProxyBody> {
        let stats = self.registry.unrouted().clone();
        self.finish(resp, app, None, None, Some(&stats), start, request_id)
    }

    /// Counts and logs a response the router made itself.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        resp: Response<ProxyBody>,
        app: &str,
        version: Option<u32>,
        instance: Option<&str>,
        stats: Option<&AppStats>,
        start: Instant,
        request_id: &HeaderValue,
    ) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        if let Some(s) = stats {
            s.count_status(status);
        }
        access_log(app, version, instance, status, start, request_id);
        resp
    }

    /// Sends the request to an endpoint of `target` (another one if the
    /// connection is refused before anything was sent) and streams the
    /// response back.
    async fn forward(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        target: Target,
        in_flight: Option<InFlight>,
        request_id: HeaderValue,
        peer: Peer,
        start: Instant,
    ) -> Response<ProxyBody> {
        let entry = target.entry;
        let upgrade = wants_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        let path_and_query = target
            .path_and_query
            .or_else(|| parts.uri.path_and_query().cloned())
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        let headers = &mut parts.headers;
        strip_hop_by_hop(headers, upgrade);
        // The router's server side already answers `Expect: 100-continue`
        // (by reading the body); passing it on would only make the instance
        // send an interim response nobody waits for.
        headers.remove(header::EXPECT);
        // The public host, for the app and for X-Forwarded-Host. HTTP/2
        // requests carry it in the URI rather than a Host header.
        let host = match headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        if let Some(h) = host {
            headers.insert(header::HOST, h.clone());
            headers.insert(X_FORWARDED_HOST.clone(), h);
        }
        // The client's address as a header value is made once per
        // connection (`client_ip`); only a proxy chain needs a new one.
        let prior = headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .filter(|p| !p.trim().is_empty());
        let forwarded_for = match (prior, peer.ip_header) {
            (None, Some(ip)) => Some(ip),
            (prior, _) => {
                let ip = peer.addr.ip().to_canonical().to_string();
                let v = match prior {
                    Some(p) => format!("{p}, {ip}"),
                    None => ip,
                };
                HeaderValue::from_str(&v).ok()
            }
        };
        if let Some(v) = forwarded_for {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());

        let end_stream = body.is_end_stream();
        let hint = body.size_hint();
        let slot = BodySlot::new(body);

        let mut tried: Vec<usize> = Vec::new();
        loop {
            let Some((idx, outstanding)) = entry.pick(&tried, self.now_ms()) else {
                // Unreachable in practice: forward() is only called with
                // endpoints, and a retry happens only when one is left.
                let resp = error_response(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    format!("app {:?}: no instance could be reached", &*entry.name),
                    &request_id,
                );
                return self.finish(
                    resp,
                    &entry.name,
                    entry.version,
                    None,
                    Some(&entry.stats),
                    start,
                    &request_id,
                );
            };
            let endpoint = outstanding.0.clone();
            let more_left = tried.len() + 1 < entry.endpoints.len();

            let mut uri = hyper::http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(endpoint.authority.clone());
            uri.path_and_query = Some(path_and_query.clone());
            let uri = match Uri::from_parts(uri) {
                Ok(u) => u,
                Err(e) => {
                    let resp = error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        format!("cannot build the upstream URI for {}: {e}", endpoint.addr),
                        &request_id,
                    );
                    return self.finish(
                        resp,
                        &entry.name,
                        entry.version,
                        None,
                        Some(&entry.stats),
                        start,
                        &request_id,
                    );
                }
            };
            // Headers are copied only when a retry could still need them.
            let headers = if more_left {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let mut up = Request::new(ForwardBody::new(
                slot.clone(),
                end_stream,
                hint,
                entry.limits.max_body_bytes,
            ));
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = uri;
            // Instances speak HTTP/1.1, whatever the client spoke.
            *up.version_mut() = Version::HTTP_11;
            *up.headers_mut() = headers;

            match self.client().request(up).await {
                Ok(resp) => {
                    let guards = Guards {
                        _in_flight: in_flight,
                        outstanding: Some(outstanding),
                    };
                    return self.respond(resp, &entry, guards, client_upgrade, &request_id, start);
                }
                Err(e) => {
                    if slot.too_large() {
                        drop(outstanding);
                        let max = entry.limits.max_body_bytes.unwrap_or(0);
                        entry
                            .stats
                            .limited_total
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return self.finish(
                            too_large(&entry.name, max, &request_id),
                            &entry.name,
                            entry.version,
                            Some(&endpoint.instance),
                            Some(&entry.stats),
                            start,
                            &request_id,
                        );
                    }
                    let connect_failed = e.is_connect();
                    if connect_failed {
                        endpoint.avoid_until_ms.store(
                            self.now_ms() + AVOID_AFTER_CONNECT_ERROR_MS,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    let detail = error_chain(&e);
                    // Retry only when nothing of the request went out: the
                    // connection itself failed and the body was never read.
                    if connect_failed && more_left && (end_stream || slot.untouched()) {
                        tracing::warn!(app = %entry.name, instance = %endpoint.instance, addr = %endpoint.addr,
                            error = %detail, request_id = ?request_id, "cannot connect to instance; trying another");
                        tried.push(idx);
                        continue;
                    }
                    drop(outstanding);
                    let version = entry
                        .version
                        .map_or_else(|| "unknown".to_string(), |v| v.to_string());
                    let what = if connect_failed {
                        "cannot connect to"
                    } else {
                        "lost the connection to"
                    };
                    let tried_note = if tried.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} other instance(s) also unreachable)", tried.len())
                    };
                    let resp = error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        format!(
                            "app {:?} version {version}: {what} instance {} at {}: {detail}{tried_note}",
                            &*entry.name, endpoint.instance, endpoint.addr
                        ),
                        &request_id,
                    );
                    return self.finish(
                        resp,
                        &entry.name,
                        entry.version,
                        Some(&endpoint.instance),
                        Some(&entry.stats),
                        start,
                        &request_id,
                    );
                }
            }
        }
    }

    /// Turns the upstream's response into the client's: connection headers
    /// dropped, Stead's headers added, body streamed (or, for an accepted
    /// upgrade, both connections spliced together).
    fn respond(
        &self,
        mut resp: Response<Incoming>,
        entry: &AppEntry,
        guards: Guards,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        request_id: &HeaderValue,
        start: Instant,
    ) -> Response<ProxyBody> {
        let status = resp.status();
        let upgraded = status == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_some();
        strip_hop_by_hop(resp.headers_mut(), upgraded);
        let instance = guards.outstanding.as_ref().map(|o| o.0.clone());
        {
            let h = resp.headers_mut();
            if let Some(v) = &entry.version_header {
                h.insert(X_STEAD_VERSION.clone(), v.clone());
            }
            if let Some(ep) = &instance {
                h.insert(X_STEAD_INSTANCE.clone(), ep.instance_header.clone());
            }
            h.insert(X_REQUEST_ID.clone(), request_id.clone());
        }
        entry.stats.count_status(status.as_u16());
        access_log(
            &entry.name,
            entry.version,
            instance.as_deref().map(|e| &*e.instance),
            status.as_u16(),
            start,
            request_id,
        );

        if let (true, Some(client_upgrade)) = (upgraded, client_upgrade) {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (parts, _) = resp.into_parts();
            let app = entry.name.clone();
            let tunnel = Tunnel::open(&self.tunnels);
            tokio::spawn(async move {
                // The request stays counted until the tunnel closes, and a
                // draining router waits for it.
                let _guards = guards;
                let _tunnel = tunnel;
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        if let Err(error) =
                            tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                        {
                            tracing::debug!(app = %app, %error, "upgraded connection ended with an error");
                        }
                    }
                    Err(error) => {
                        tracing::debug!(app = %app, %error, "upgrade did not complete");
                    }
                }
            });
            return Response::from_parts(parts, ProxyBody::empty());
        }

        let (mut parts, body) = resp.into_parts();
        parts.version = Version::HTTP_11;
        Response::from_parts(
            parts,
            ProxyBody::Upstream {
                body,
                _guards: guards,
            },
        )
    }
}

/// Counts an upgraded connection as open while it lives.
struct Tunnel(tokio::sync::watch::Sender<usize>);

impl Tunnel {
    fn open(count: &tokio::sync::watch::Sender<usize>) -> Tunnel {
        count.send_modify(|n| *n += 1);
        Tunnel(count.clone())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// One access-log line per request, when its response head is sent.
fn access_log(
    app: &str,
    version: Option<u32>,
    instance: Option<&str>,
    status: u16,
    start: Instant,
    request_id: &HeaderValue,
) {
    tracing::info!(
        target: "stead_router::access",
        app,
        version,
        instance,
        status,
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        request_id = request_id.to_str().unwrap_or(""),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let a = request_id(&h);
        assert_eq!(a.len(), 32);
        assert_ne!(a, request_id(&h));
        h.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(
            REQUEST_ID_HEADER,
            HeaderValue::from_str(&"x".repeat(500)).unwrap(),
        );
        assert_eq!(request_id(&h).len(), 32);
    }
}
