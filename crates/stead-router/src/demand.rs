//! Reporting demand to the autoscaler.
//!
//! Every [`TICK`] the reporter samples each app's requests in flight; about
//! once per report interval it sends, for each app that was busy, the
//! average over the period, the peak, the requests received, the requests
//! held for lack of an instance and the load per instance. An app that goes
//! idle gets one last report (all zeros) and then none. A burst that takes
//! an app past its target is reported at once rather than at the end of the
//! period, and a request held by an app at zero sends a wake-up report
//! immediately (one per app at a time, shared by concurrent requests).
//!
//! Writes at the control plane follow this rhythm, not the request rate.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stead_api::{AppDemand, DemandReport, InstanceDemand};

use crate::Shared;

/// How often requests in flight are sampled for the time average.
const TICK: Duration = Duration::from_millis(50);
/// Reports sent early (bursts) are at least this far apart.
const MIN_GAP: Duration = Duration::from_millis(100);
/// Bound on sending one report: a slow control plane must not stall
/// sampling for long.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Acc {
    /// Sum of the in-flight samples, and how many were taken.
    sum: u64,
    ticks: u64,
    /// `requests` counter at the last report.
    requests_at_report: u64,
    /// Reported as busy last time (so an idle period gets one report).
    was_busy: bool,
    /// Over its target at the last early check (edge detection).
    over: bool,
}

/// Samples and reports until aborted.
pub(crate) async fn report_loop(shared: Arc<Shared>) {
    let mut acc: HashMap<String, Acc> = HashMap::new();
    let mut last_report = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let table = shared.table.load();
        let mut burst = false;
        for (app, stats) in shared.registry.all() {
            // Counting from 0: every request since the app's stats exist.
            let a = acc.entry(app.clone()).or_default();
            let now = stats.in_flight.load(Ordering::Relaxed).max(0) as u64;
            a.sum += now;
            a.ticks += 1;
            // Past the target for the instances it has: a burst.
            if let Some(entry) = table.get(&app) {
                let target = u64::from(entry.limits.target_concurrency.unwrap_or(100).max(1));
                let capacity = target * entry.endpoints.len().max(1) as u64;
                let over = now > capacity;
                if over && !a.over {
                    burst = true;
                }
                a.over = over;
            }
        }
        let since = last_report.elapsed();
        if since < shared.report_interval && !(burst && since >= MIN_GAP) {
            continue;
        }
        last_report = Instant::now();
        let mut apps = Vec::new();
        for (app, stats) in shared.registry.all() {
            let Some(a) = acc.get_mut(&app) else { continue };
            let requests_total = stats.requests.load(Ordering::Relaxed);
            let requests = requests_total.saturating_sub(a.requests_at_report);
            a.requests_at_report = requests_total;
            let mut concurrency = if a.ticks > 0 {
                a.sum as f64 / a.ticks as f64
            } else {
                0.0
            };
            a.sum = 0;
            a.ticks = 0;
            let in_flight = stats.in_flight.load(Ordering::Relaxed).max(0);
            if a.over {
                // A burst reported early: its start would be averaged away
                // over the quiet part of the period, so report what is in
                // flight now (erring towards scaling up).
                concurrency = concurrency.max(in_flight as f64);
            }
            let peak = stats.peak.swap(in_flight, Ordering::Relaxed).max(in_flight) as u64;
            let waiting = stats.waiting.load(Ordering::Relaxed).max(0) as u64;
            let busy = concurrency > 0.0 || requests > 0 || peak > 0 || waiting > 0;
            if !busy && !a.was_busy {
                continue;
            }
            a.was_busy = busy;
            let instances = table
                .get(&app)
                .map(|e| {
                    e.endpoints
                        .iter()
                        .map(|ep| InstanceDemand {
                            instance: ep.instance.to_string(),
                            in_flight: ep.outstanding.load(Ordering::Relaxed) as u64,
                        })
                        .collect()
                })
                .unwrap_or_default();
            apps.push(AppDemand {
                app,
                period_ms: u64::try_from(since.as_millis()).unwrap_or(u64::MAX),
                concurrency,
                peak,
                requests,
                waiting,
                instances,
            });
        }
        if apps.is_empty() {
            continue;
        }
        send(&shared, apps).await;
    }
}

async fn send(shared: &Shared, apps: Vec<AppDemand>) {
    let report = DemandReport {
        router: shared.router_id.clone(),
        apps,
    };
    match tokio::time::timeout(SEND_TIMEOUT, shared.source.report(report)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "demand report failed"),
        Err(_) => tracing::debug!("demand report timed out"),
    }
}

/// Tells the autoscaler at once that `app` has a request waiting for an
/// instance. Called for the first held request only: requests arriving
/// while it waits share its wake-up (the periodic reports carry how many
/// are waiting, and retry it if this report is lost).
pub(crate) fn wake(shared: &Arc<Shared>, app: &str) {
    let shared = shared.clone();
    let app = app.to_string();
    tokio::spawn(async move {
        send(
            &shared,
            vec![AppDemand {
                app,
                period_ms: 0,
                concurrency: 1.0,
                peak: 1,
                requests: 0,
                waiting: 1,
                instances: Vec::new(),
            }],
        )
        .await;
    });
}
