//! Where the router learns which endpoints serve which app.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stead_api::RouteTable;

use crate::RouterError;

/// A source of route tables. The seam between the router and the control
/// plane: production uses [`ApiRouteSource`], tests hand in a table they
/// control. Written without `async_trait` so the trait stays object safe with
/// no extra dependency.
pub trait RouteSource: Send + Sync + 'static {
    /// Fetches the whole current table (level triggered: the complete
    /// picture every time, so a missed fetch never leaves stale state behind
    /// once a later one succeeds).
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<RouteTable, RouterError>> + Send + '_>>;
}

/// How long one `GET /v1/routes` may take before the next server is tried.
/// Short, because requests for a waking app wait on this fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Polls `GET {server}/v1/routes` with `Authorization: Bearer {token}` (JSON
/// [`RouteTable`]), failing over across the listed servers in order.
///
/// The server that answered last is tried first next time, so a dead first
/// server costs one timeout when it dies rather than one per poll.
pub struct ApiRouteSource {
    /// `Err` holds why the HTTP client could not be built (only possible
    /// when the system's resolver or TLS configuration cannot load); every
    /// fetch then reports it instead of `new` panicking.
    client: Result<reqwest::Client, String>,
    /// `{server}/v1/routes` for each server, in the configured order.
    urls: Vec<String>,
    auth: String,
    /// Index in `urls` of the server that answered last.
    preferred: AtomicUsize,
}

impl ApiRouteSource {
    pub fn new(servers: Vec<String>, token: String) -> Self {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the HTTP client for route fetches: {e}"));
        let urls = servers
            .iter()
            .map(|s| format!("{}/v1/routes", s.trim_end_matches('/')))
            .collect();
        ApiRouteSource {
            client,
            urls,
            auth: format!("Bearer {token}"),
            preferred: AtomicUsize::new(0),
        }
    }

    async fn fetch_one(&self, url: &str) -> Result<RouteTable, RouterError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| RouterError::Source(e.clone()))?;
        let resp = client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, &self.auth)
            .send()
            .await
            .map_err(|e| RouterError::Source(format!("GET {url}: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return Err(RouterError::Source(format!(
                "GET {url}: HTTP {status}: {}",
                body.trim()
            )));
        }
        resp.json::<RouteTable>()
            .await
            .map_err(|e| RouterError::Source(format!("GET {url}: invalid route table: {e}")))
    }

    async fn fetch_any(&self) -> Result<RouteTable, RouterError> {
        let n = self.urls.len();
        if n == 0 {
            return Err(RouterError::Source(
                "no control-plane server configured to fetch routes from".into(),
            ));
        }
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            match self.fetch_one(&self.urls[idx]).await {
                Ok(table) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(table);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(RouterError::Source(errors.join("; ")))
    }
}

impl RouteSource for ApiRouteSource {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<RouteTable, RouterError>> + Send + '_>> {
        Box::pin(self.fetch_any())
    }
}
