//! Prometheus metrics of the control plane at `GET /metrics`.
//!
//! Served without authentication so any scraper can read it, which is why
//! it names no app or organisation: request counts by route template, and
//! platform-wide totals read from the store at scrape time (apps, versions
//! and builds by state, instances by state, hosts alive). Counters are per
//! replica, as Prometheus expects; the store gauges are the same on all.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::Row;

use crate::AppState;

/// Long-poll waits that were held (routes and agent heartbeats).
pub(crate) static LONG_POLL_WAITS: AtomicU64 = AtomicU64::new(0);
/// Demand reports received from routers.
pub(crate) static DEMAND_REPORTS: AtomicU64 = AtomicU64::new(0);
/// Times an app's desired instance count changed.
pub(crate) static SCALE_CHANGES: AtomicU64 = AtomicU64::new(0);
/// Times every host's intended state was recomputed (the revision or the
/// alive hosts moved).
pub(crate) static INTENDED_COMPUTES: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct RouteStats {
    by_class: [u64; 5],
    seconds: f64,
}

/// (method, route template) → stats.
fn requests() -> &'static Mutex<BTreeMap<(String, String), RouteStats>> {
    static R: OnceLock<Mutex<BTreeMap<(String, String), RouteStats>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Middleware counting every request by method, route template (never the
/// raw path: its app names would leak and its cardinality is unbounded) and
/// status class.
pub(crate) async fn track(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    let class = (resp.status().as_u16() / 100).clamp(1, 5) as usize - 1;
    let mut r = requests().lock().unwrap_or_else(|p| p.into_inner());
    let s = r.entry((method, route)).or_default();
    s.by_class[class] += 1;
    s.seconds += start.elapsed().as_secs_f64();
    resp
}

async fn count(state: &AppState, sql: &str) -> Vec<(String, i64)> {
    match sqlx::query(sql).fetch_all(state.store.pool()).await {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| {
                Some((
                    r.try_get::<String, _>("k").ok()?,
                    r.try_get::<i64, _>("n").ok()?,
                ))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics query failed");
            Vec::new()
        }
    }
}

/// `GET /metrics`: Prometheus text format 0.0.4.
pub(crate) async fn serve(State(state): State<AppState>) -> Response {
    let mut out = String::with_capacity(4096);
    out.push_str(
        "# HELP stead_server_http_requests_total API requests answered, by method, route and status class.\n\
         # TYPE stead_server_http_requests_total counter\n",
    );
    let mut seconds = String::new();
    {
        let r = requests().lock().unwrap_or_else(|p| p.into_inner());
        for ((method, route), s) in r.iter() {
            for (i, n) in s.by_class.iter().enumerate() {
                if *n > 0 {
                    let _ = writeln!(
                        out,
                        "stead_server_http_requests_total{{method=\"{method}\",route=\"{route}\",class=\"{}xx\"}} {n}",
                        i + 1
                    );
                }
            }
            let _ = writeln!(
                seconds,
                "stead_server_http_request_seconds_total{{method=\"{method}\",route=\"{route}\"}} {:.6}",
                s.seconds
            );
        }
    }
    out.push_str(
        "# HELP stead_server_http_request_seconds_total Time spent answering API requests (long-polls included).\n\
         # TYPE stead_server_http_request_seconds_total counter\n",
    );
    out.push_str(&seconds);
    for (name, help, v) in [
        (
            "stead_server_long_poll_waits_total",
            "Times a long-poll (routes, agent heartbeat) waited for a change.",
            &LONG_POLL_WAITS,
        ),
        (
            "stead_server_demand_reports_total",
            "Demand reports received from routers.",
            &DEMAND_REPORTS,
        ),
        (
            "stead_server_scale_changes_total",
            "Times the autoscaler changed an app's desired instance count.",
            &SCALE_CHANGES,
        ),
        (
            "stead_server_intended_computes_total",
            "Times every host's intended state was recomputed after a change.",
            &INTENDED_COMPUTES,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let cutoff = stead_store::now_ms() - state.config.host_timeout.as_millis() as i64;
    let gauges: [(&str, &str, &str, String); 5] = [
        (
            "stead_apps",
            "Apps, by whether they have an active version.",
            "active",
            "SELECT CASE WHEN active_version IS NULL THEN 'no' ELSE 'yes' END AS k, COUNT(*) AS n FROM apps GROUP BY 1"
                .to_string(),
        ),
        (
            "stead_versions",
            "App versions, by state.",
            "state",
            "SELECT state AS k, COUNT(*) AS n FROM versions GROUP BY state".to_string(),
        ),
        (
            "stead_builds",
            "Build tasks, by state.",
            "state",
            "SELECT state AS k, COUNT(*) AS n FROM build_tasks GROUP BY state".to_string(),
        ),
        (
            "stead_instances",
            "Instances as last reported by their hosts, by state.",
            "state",
            "SELECT state AS k, COUNT(*) AS n FROM instances GROUP BY state".to_string(),
        ),
        (
            "stead_hosts",
            "Registered hosts, by liveness.",
            "state",
            format!(
                "SELECT CASE WHEN last_heartbeat >= {cutoff} THEN 'alive' ELSE 'dead' END AS k, COUNT(*) AS n FROM hosts GROUP BY 1"
            ),
        ),
    ];
    for (name, help, label, sql) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (k, n) in count(&state, &sql).await {
            let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {n}");
        }
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
