//! Per-app counters: requests by status class and requests in flight.
//!
//! Each app's counters live in an [`AppStats`] that outlives route-table
//! refreshes (the table holds an `Arc` to it), so the hot path only touches
//! atomics; the registry's lock is taken when a table is built and when
//! `/metrics` is scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Label used for requests that named no known app (404, 400), so bogus
/// host names cannot blow up the metric's cardinality.
pub(crate) const UNROUTED: &str = "_unrouted";

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Live state kept per app across route-table refreshes.
#[derive(Debug, Default)]
pub(crate) struct AppStats {
    /// Requests received and not yet finished, including those waiting for
    /// an instance to become ready: the concurrency the autoscaler scales on.
    pub in_flight: AtomicI64,
    by_class: [AtomicU64; 5],
    /// Round-robin cursor for breaking ties between equally loaded endpoints.
    pub rr: AtomicUsize,
    /// Requests received (routed to this app), for request rates.
    pub requests: AtomicU64,
    /// Most requests in flight at once since the last demand report.
    pub peak: AtomicI64,
    /// Requests held right now because the app has no ready instance.
    pub waiting: AtomicI64,
    /// Requests that found the app without a ready instance (cold starts
    /// and waits for a restarting app).
    pub held_total: AtomicU64,
    /// Requests refused by the app's concurrency or body-size limit.
    pub limited_total: AtomicU64,
}

impl AppStats {
    pub fn count_status(&self, status: u16) {
        let idx = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.by_class[idx].fetch_add(1, Ordering::Relaxed);
    }
}

/// Decrements an app's in-flight count when the request is finished (its
/// response body fully sent or dropped, or its upgraded tunnel closed).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AppStats>);

impl InFlight {
    pub fn start(stats: &Arc<AppStats>) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if now > stats.peak.load(Ordering::Relaxed) {
            stats.peak.fetch_max(now, Ordering::Relaxed);
        }
        InFlight(stats.clone())
    }

    /// Requests in flight for the app, this one included.
    pub fn current(&self) -> i64 {
        self.0.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request as held (waiting for a ready instance) while it lives.
#[derive(Debug)]
pub(crate) struct Held(Arc<AppStats>);

impl Held {
    /// Also says whether no other request was held for the app: the first
    /// one wakes it, the others share that wake-up.
    pub fn start(stats: &Arc<AppStats>) -> (Self, bool) {
        let before = stats.waiting.fetch_add(1, Ordering::Relaxed);
        stats.held_total.fetch_add(1, Ordering::Relaxed);
        (Held(stats.clone()), before <= 0)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All apps' stats, by name.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    apps: Mutex<BTreeMap<String, Arc<AppStats>>>,
    unrouted: Arc<AppStats>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<AppStats>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (each operation is a single insert or read), so poisoning is ignored.
        self.apps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stats of `app`, created on first use.
    pub fn app(&self, app: &str) -> Arc<AppStats> {
        let mut apps = self.lock();
        if let Some(s) = apps.get(app) {
            return s.clone();
        }
        let s = Arc::new(AppStats::default());
        apps.insert(app.to_string(), s.clone());
        s
    }

    pub fn unrouted(&self) -> &Arc<AppStats> {
        &self.unrouted
    }

    /// Every app's stats (a snapshot of the map, not of the counters).
    pub fn all(&self) -> Vec<(String, Arc<AppStats>)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// In-flight requests per app (apps with none included once they have
    /// been seen), for the autoscaler.
    pub fn in_flight(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|(k, v)| {
                let n = v.in_flight.load(Ordering::Relaxed).max(0) as u64;
                (k.clone(), n)
            })
            .collect()
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let apps = self.lock();
        let mut out = String::with_capacity(256 + apps.len() * 300);
        out.push_str(
            "# HELP stead_router_requests_total Requests answered by the router, by app and status class.\n\
             # TYPE stead_router_requests_total counter\n",
        );
        let all = apps
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain(std::iter::once((UNROUTED, &self.unrouted)));
        for (app, stats) in all.clone() {
            for (i, class) in CLASSES.iter().enumerate() {
                let n = stats.by_class[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "stead_router_requests_total{{app=\"{}\",class=\"{class}\"}} {n}",
                    escape_label(app)
                );
            }
        }
        out.push_str(
            "# HELP stead_router_in_flight Requests in progress (including those waiting for a ready instance), by app.\n\
             # TYPE stead_router_in_flight gauge\n",
        );
        for (app, stats) in all.clone() {
            let n = stats.in_flight.load(Ordering::Relaxed).max(0);
            let _ = writeln!(
                out,
                "stead_router_in_flight{{app=\"{}\"}} {n}",
                escape_label(app)
            );
        }
        for (name, kind, help, get) in [
            (
                "stead_router_waiting",
                "gauge",
                "Requests held because the app has no ready instance (waking from zero, restarting), by app.",
                (|s: &AppStats| s.waiting.load(Ordering::Relaxed).max(0) as u64) as fn(&AppStats) -> u64,
            ),
            (
                "stead_router_held_requests_total",
                "counter",
                "Requests that had to wait for a ready instance, by app.",
                |s: &AppStats| s.held_total.load(Ordering::Relaxed),
            ),
            (
                "stead_router_limited_requests_total",
                "counter",
                "Requests refused by the app's concurrency or body-size limit, by app.",
                |s: &AppStats| s.limited_total.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (app, stats) in all.clone() {
                let _ = writeln!(out, "{name}{{app=\"{}\"}} {}", escape_label(app), get(stats));
            }
        }
        out
    }
}

pub(crate) fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let r = Registry::default();
        let a = r.app("hello");
        a.count_status(200);
        a.count_status(503);
        let g = InFlight::start(&a);
        let text = r.render();
        assert!(text.contains("stead_router_requests_total{app=\"hello\",class=\"2xx\"} 1"));
        assert!(text.contains("stead_router_requests_total{app=\"hello\",class=\"5xx\"} 1"));
        assert!(text.contains("stead_router_in_flight{app=\"hello\"} 1"));
        assert_eq!(r.in_flight().get("hello"), Some(&1));
        drop(g);
        assert!(r
            .render()
            .contains("stead_router_in_flight{app=\"hello\"} 0"));
    }
}
