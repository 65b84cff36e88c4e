//! The router's in-memory form of a [`RouteTable`], built once per refresh
//! so that each request only does a hash lookup and a scan of its app's
//! endpoints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use stead_api::{AppLimits, RouteTable};

use crate::metrics::{AppStats, Registry};

/// One ready instance of an app's active version.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub instance: Box<str>,
    pub addr: Box<str>,
    /// `addr` parsed once, cloned (cheaply) into every upstream URI.
    pub authority: Authority,
    /// `x-stead-instance` value, prepared once.
    pub instance_header: HeaderValue,
    /// Requests sent to this endpoint whose response has not finished.
    pub outstanding: AtomicUsize,
    /// Until when (milliseconds on the router's clock) this endpoint is
    /// avoided after a failed connection; 0 when healthy.
    pub avoid_until_ms: AtomicU64,
}

/// One app: its active version and where it is served.
#[derive(Debug)]
pub(crate) struct AppEntry {
    pub name: Box<str>,
    pub version: Option<u32>,
    /// `x-stead-version` value, prepared once.
    pub version_header: Option<HeaderValue>,
    pub endpoints: Box<[Arc<Endpoint>]>,
    pub stats: Arc<AppStats>,
    pub limits: AppLimits,
}

/// A snapshot of all routes.
#[derive(Debug, Default)]
pub(crate) struct Table {
    apps: HashMap<Box<str>, Arc<AppEntry>>,
    /// The source's identifier of this table (long-poll `since`).
    pub etag: Option<String>,
}

/// Holds an endpoint's outstanding count up until dropped.
#[derive(Debug)]
pub(crate) struct Outstanding(pub Arc<Endpoint>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Table {
    pub fn get(&self, app: &str) -> Option<&Arc<AppEntry>> {
        self.apps.get(app)
    }

    /// Builds the snapshot for `routes`, reusing `previous`'s endpoint
    /// objects where instance and address are unchanged, so their
    /// outstanding-request counts (what balancing reads) survive refreshes.
    pub fn build(routes: RouteTable, previous: &Table, registry: &Registry) -> Table {
        let mut apps = HashMap::with_capacity(routes.apps.len());
        let mut limits = routes.limits;
        for route in routes.apps {
            let name = route.app;
            let old = previous.apps.get(name.as_str());
            let mut endpoints = Vec::with_capacity(route.endpoints.len());
            for ep in route.endpoints {
                let reused = old.and_then(|o| {
                    o.endpoints
                        .iter()
                        .find(|e| *e.instance == *ep.instance && *e.addr == *ep.addr)
                        .cloned()
                });
                if let Some(e) = reused {
                    endpoints.push(e);
                    continue;
                }
                let authority = match ep.addr.parse::<Authority>() {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(app = %name, instance = %ep.instance, addr = %ep.addr, error = %e,
                            "route table endpoint is not a valid ip:port; skipping it");
                        continue;
                    }
                };
                let instance_header = match HeaderValue::from_str(&ep.instance) {
                    Ok(h) => h,
                    Err(_) => {
                        tracing::warn!(app = %name, instance = %ep.instance,
                            "route table instance id is not a valid header value; skipping it");
                        continue;
                    }
                };
                endpoints.push(Arc::new(Endpoint {
                    instance: ep.instance.into(),
                    addr: ep.addr.into(),
                    authority,
                    instance_header,
                    outstanding: AtomicUsize::new(0),
                    avoid_until_ms: AtomicU64::new(0),
                }));
            }
            let stats = match old {
                Some(o) => o.stats.clone(),
                None => registry.app(&name),
            };
            let entry = AppEntry {
                version_header: route.version.map(HeaderValue::from),
                version: route.version,
                endpoints: endpoints.into_boxed_slice(),
                stats,
                limits: limits.remove(&name).unwrap_or_default(),
                name: name.as_str().into(),
            };
            apps.insert(name.into_boxed_str(), Arc::new(entry));
        }
        Table {
            apps,
            etag: routes.etag,
        }
    }

    /// Every app, for demand reports and metrics.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<AppEntry>> {
        self.apps.values()
    }
}

impl AppEntry {
    pub fn has_endpoints(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Picks the endpoint with the fewest outstanding requests, preferring
    /// ones not recently refused, skipping indexes in `tried`; ties go
    /// round-robin (the scan starts one further along on every pick). Counts
    /// the request as outstanding on the chosen endpoint.
    pub fn pick(&self, tried: &[usize], now_ms: u64) -> Option<(usize, Outstanding)> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = self.stats.rr.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, (bool, usize))> = None;
        for i in 0..n {
            let idx = (start + i) % n;
            if tried.contains(&idx) {
                continue;
            }
            let ep = &self.endpoints[idx];
            let avoided = ep.avoid_until_ms.load(Ordering::Relaxed) > now_ms;
            let key = (avoided, ep.outstanding.load(Ordering::Relaxed));
            if best.is_none_or(|(_, b)| key < b) {
                best = Some((idx, key));
            }
        }
        let (idx, _) = best?;
        let ep = self.endpoints[idx].clone();
        ep.outstanding.fetch_add(1, Ordering::Relaxed);
        Some((idx, Outstanding(ep)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stead_api::{AppRoute, RouteEndpoint};

    fn routes(eps: &[(&str, &str)]) -> RouteTable {
        RouteTable {
            etag: None,
            limits: Default::default(),
            apps: vec![AppRoute {
                app: "hello".into(),
                version: Some(3),
                endpoints: eps
                    .iter()
                    .map(|(i, a)| RouteEndpoint {
                        instance: i.to_string(),
                        addr: a.to_string(),
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn least_outstanding_with_round_robin_ties() {
        let reg = Registry::default();
        let t = Table::build(
            routes(&[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]),
            &Table::default(),
            &reg,
        );
        let app = t.get("hello").unwrap();
        // Ties alternate.
        let (i1, g1) = app.pick(&[], 0).unwrap();
        drop(g1);
        let (i2, g2) = app.pick(&[], 0).unwrap();
        drop(g2);
        assert_ne!(i1, i2);
        // A busy endpoint is avoided whatever the cursor says.
        let (busy, _held) = app.pick(&[], 0).unwrap();
        for _ in 0..4 {
            let (i, _g) = app.pick(&[], 0).unwrap();
            assert_ne!(i, busy);
        }
        // Tried endpoints are skipped; none left gives None.
        assert!(app.pick(&[0, 1], 0).is_none());
    }

    #[test]
    fn refused_endpoints_are_avoided_for_a_while() {
        let reg = Registry::default();
        let t = Table::build(
            routes(&[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")]),
            &Table::default(),
            &reg,
        );
        let app = t.get("hello").unwrap();
        app.endpoints[0]
            .avoid_until_ms
            .store(1000, Ordering::Relaxed);
        for _ in 0..3 {
            assert_eq!(app.pick(&[], 500).unwrap().0, 1);
        }
        let seen: Vec<usize> = (0..2).map(|_| app.pick(&[], 2000).unwrap().0).collect();
        assert!(seen.contains(&0));
    }

    #[test]
    fn refresh_keeps_counts_and_skips_bad_endpoints() {
        let reg = Registry::default();
        let t1 = Table::build(routes(&[("a", "127.0.0.1:1")]), &Table::default(), &reg);
        let (_, held) = t1.get("hello").unwrap().pick(&[], 0).unwrap();
        let t2 = Table::build(
            routes(&[("a", "127.0.0.1:1"), ("bad", "not an address")]),
            &t1,
            &reg,
        );
        let app = t2.get("hello").unwrap();
        assert_eq!(app.endpoints.len(), 1);
        assert_eq!(app.endpoints[0].outstanding.load(Ordering::Relaxed), 1);
        drop(held);
        assert_eq!(app.endpoints[0].outstanding.load(Ordering::Relaxed), 0);
        assert_eq!(app.version_header.as_ref().unwrap(), "3");
    }
}
