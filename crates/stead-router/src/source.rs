//! Where the router learns which endpoints serve which app.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stead_api::{DemandReport, RouteTable};

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

    /// Fetches the table once it differs from the one whose `etag` is
    /// `since`, waiting up to `wait` for a change (long-poll). Sources that
    /// cannot wait answer at once, with a table without an etag; the router
    /// then polls them every refresh interval instead.
    fn fetch_changed(
        &self,
        since: Option<String>,
        wait: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<RouteTable, RouterError>> + Send + '_>> {
        let _ = (since, wait);
        self.fetch()
    }

    /// Sends demand measured by the router to the autoscaler. Sources with
    /// no autoscaler behind them accept and drop it.
    fn report(
        &self,
        report: DemandReport,
    ) -> Pin<Box<dyn Future<Output = Result<(), RouterError>> + Send + '_>> {
        let _ = report;
        Box::pin(async { Ok(()) })
    }
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
    /// `{server}` for each server, for the other endpoints.
    bases: Vec<String>,
}

impl ApiRouteSource {
    pub fn new(servers: Vec<String>, token: String) -> Self {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the HTTP client for route fetches: {e}"));
        let bases: Vec<String> = servers
            .iter()
            .map(|s| s.trim_end_matches('/').to_string())
            .collect();
        let urls = bases.iter().map(|s| format!("{s}/v1/routes")).collect();
        ApiRouteSource {
            client,
            urls,
            auth: format!("Bearer {token}"),
            preferred: AtomicUsize::new(0),
            bases,
        }
    }

    async fn fetch_one(&self, url: &str) -> Result<RouteTable, RouterError> {
        self.fetch_one_with(url, None, Duration::ZERO).await
    }

    async fn fetch_one_with(
        &self,
        url: &str,
        since: Option<&str>,
        wait: Duration,
    ) -> Result<RouteTable, RouterError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| RouterError::Source(e.clone()))?;
        let mut req = client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, &self.auth);
        if let Some(since) = since {
            // Etags are hex; anything else is not sent as one.
            let since: String = since
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect();
            req = client
                .get(format!("{url}?since={since}&wait_ms={}", wait.as_millis()))
                .header(reqwest::header::AUTHORIZATION, &self.auth)
                // The server holds the answer up to `wait`.
                .timeout(FETCH_TIMEOUT + wait);
        }
        let resp = req
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
        self.fetch_any_with(None, Duration::ZERO).await
    }

    async fn fetch_any_with(
        &self,
        since: Option<&str>,
        wait: Duration,
    ) -> Result<RouteTable, RouterError> {
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
            let got = if since.is_some() {
                self.fetch_one_with(&self.urls[idx], since, wait).await
            } else {
                self.fetch_one(&self.urls[idx]).await
            };
            match got {
                Ok(table) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(table);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(RouterError::Source(errors.join("; ")))
    }

    async fn report_any(&self, report: DemandReport) -> Result<(), RouterError> {
        let client = self
            .client
            .as_ref()
            .map_err(|e| RouterError::Source(e.clone()))?;
        let n = self.bases.len();
        if n == 0 {
            return Err(RouterError::Source(
                "no control-plane server configured to report demand to".into(),
            ));
        }
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for i in 0..n {
            let url = format!("{}/v1/router/demand", self.bases[(first + i) % n]);
            match client
                .post(&url)
                .header(reqwest::header::AUTHORIZATION, &self.auth)
                .json(&report)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => errors.push(format!("POST {url}: HTTP {}", r.status())),
                Err(e) => errors.push(format!("POST {url}: {e}")),
            }
        }
        Err(RouterError::Source(errors.join("; ")))
    }
}

impl RouteSource for ApiRouteSource {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<RouteTable, RouterError>> + Send + '_>> {
        Box::pin(self.fetch_any())
    }

    fn fetch_changed(
        &self,
        since: Option<String>,
        wait: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<RouteTable, RouterError>> + Send + '_>> {
        Box::pin(async move {
            // The first fetch has nothing to compare with: ask for any
            // table, and learn its etag.
            let since = since.unwrap_or_default();
            self.fetch_any_with(Some(&since), wait).await
        })
    }

    fn report(
        &self,
        report: DemandReport,
    ) -> Pin<Box<dyn Future<Output = Result<(), RouterError>> + Send + '_>> {
        Box::pin(self.report_any(report))
    }
}
