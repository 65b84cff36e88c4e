//! Autoscaling in the control plane: turning the demand routers and agents
//! report (in the store) into each app's desired instance count with the
//! pure [`crate::autoscale`], persisting its state, and the long-polls that
//! carry changes to agents and routers within milliseconds.
//!
//! Every replica computes the same decision from the same rows; the state
//! is written only when it changes, with an optimistic check, so replicas
//! deciding at once cannot both apply conflicting transitions.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use stead_api::{
    AppDemand, AppLimits, AppStatus, DemandAck, DemandReport, ErrorBody, HeartbeatRequest,
    RouteTable, ScaleRequest, ScaleStatus,
};
use stead_store::{DemandKind, DemandSample, NewDemand, ScaleApp, ScaleInputs, ScaleStateRow};
use utoipa::IntoParams;

use crate::auth::{HostAuth, UserAuth};
use crate::autoscale::{self, Decision, Sample, Settings, Signals};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::AppState;

/// Longest a long-poll may be held.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(30);
/// A held long-poll re-evaluates at least this often: for time-driven
/// transitions (idle timeout, scale-down delay) and for writes made through
/// another control-plane replica, which cannot wake this one.
const RECHECK: Duration = Duration::from_millis(1000);
/// A router's held-request count is current only this long.
const WAITING_FRESH_MS: i64 = 5_000;
/// CPU below this (cores, summed over an app's instances on a host) is not
/// recorded: idle instances would otherwise write every heartbeat.
const CPU_NOISE: f64 = 0.05;
/// Demand samples are pruned at most this often.
const PRUNE_EVERY_MS: i64 = 60_000;

static LAST_PRUNE: AtomicI64 = AtomicI64::new(0);

/// The decisions for every app, from one evaluation.
#[derive(Debug, Default)]
pub(crate) struct Decisions {
    pub apps: HashMap<i64, AppDecision>,
    /// Some app's desired count changed in this evaluation.
    pub changed: bool,
}

#[derive(Debug)]
pub(crate) struct AppDecision {
    pub app: ScaleApp,
    pub decision: Decision,
    pub ready: u32,
    pub queued: u64,
    pub now: i64,
    /// Requests in flight per instance in the routers' latest reports.
    pub by_instance: BTreeMap<String, u64>,
}

fn to_state(r: &ScaleStateRow) -> autoscale::State {
    autoscale::State {
        desired: r.desired,
        panic_until: r.panic_until,
        below_since: r.below_since,
        below_peak: r.below_peak,
    }
}

/// Requests in flight per instance, summed over the routers' latest
/// (recent) reports about the app.
fn in_flight_by_instance(inputs: &ScaleInputs, app_id: i64, now: i64) -> BTreeMap<String, u64> {
    let mut latest: BTreeMap<&str, &DemandSample> = BTreeMap::new();
    for d in inputs
        .samples
        .iter()
        .filter(|d| d.app_id == app_id && d.kind == DemandKind::Router && d.detail.is_some())
    {
        let e = latest.entry(d.source.as_str()).or_insert(d);
        if d.end_ms >= e.end_ms {
            *e = d;
        }
    }
    let mut out = BTreeMap::new();
    for d in latest
        .values()
        .filter(|d| now - d.end_ms <= WAITING_FRESH_MS)
    {
        let parsed: Vec<stead_api::InstanceDemand> = d
            .detail
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        for i in parsed {
            *out.entry(i.instance).or_default() += i.in_flight;
        }
    }
    out
}

/// The autoscaler's signals for one app from the stored samples.
fn signals(inputs: &ScaleInputs, app_id: i64, now: i64, last_activity: Option<i64>) -> Signals {
    let mut s = Signals {
        queued_workflows: inputs.queued.get(&app_id).copied().unwrap_or(0),
        ready: inputs.ready.get(&app_id).copied().unwrap_or(0),
        last_activity,
        ..Signals::default()
    };
    // The latest sample of each router says how many requests it holds.
    let mut latest: BTreeMap<&str, &DemandSample> = BTreeMap::new();
    for d in inputs.samples.iter().filter(|d| d.app_id == app_id) {
        match d.kind {
            DemandKind::Router => {
                s.concurrency.push(Sample {
                    start: d.start_ms,
                    end: d.end_ms,
                    value: d.concurrency,
                });
                if d.requests > 0 {
                    s.requests.push(Sample {
                        start: d.start_ms,
                        end: d.end_ms,
                        value: d.requests as f64,
                    });
                }
                let e = latest.entry(d.source.as_str()).or_insert(d);
                if d.end_ms >= e.end_ms {
                    *e = d;
                }
            }
            DemandKind::Agent => s.cpu.push(Sample {
                start: d.start_ms,
                end: d.end_ms,
                value: d.cpu,
            }),
        }
    }
    s.waiting = latest
        .values()
        .filter(|d| now - d.end_ms <= WAITING_FRESH_MS)
        .map(|d| d.waiting)
        .sum();
    s
}

/// The lease under which one replica at a time runs [`run_loop`].
pub(crate) const LEASE: &str = "autoscaler";
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the autoscaler looks at the apps with something going on.
const EVALUATE_EVERY: Duration = Duration::from_millis(1000);

/// The autoscaler's periodic work, on the replica holding [`LEASE`]: when
/// the intended state's revision moved (a deploy, a scale change, an
/// instance started or gone), every app is evaluated, in a fixed number of
/// queries; otherwise only the apps whose decision can change with time
/// alone ([`stead_store::Store::unsettled_apps`]: a scale-down delay or
/// panic window running, a count away from `min`, recent demand). So an
/// idle platform costs a few small queries a second whatever its size.
/// Demand reports and `stead scale` evaluate their apps at once besides.
pub(crate) async fn run_loop(state: AppState) {
    let mut last_rev: Option<i64> = None;
    let mut holding = false;
    let mut renewed = Instant::now() - LEASE_TTL;
    loop {
        if state.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        if !holding || renewed.elapsed() >= LEASE_TTL / 3 {
            renewed = Instant::now();
            match state
                .store
                .acquire_lease(LEASE, &state.replica, LEASE_TTL)
                .await
            {
                Ok(held) => {
                    if held != holding {
                        tracing::info!(replica = %state.replica, held, "autoscaler lease {}", if held { "taken" } else { "lost" });
                        // A new holder starts with a full evaluation.
                        last_rev = None;
                    }
                    holding = held;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take the autoscaler lease; retrying");
                    holding = false;
                }
            }
        }
        if holding {
            if let Err(e) = evaluate_pass(&state, &mut last_rev).await {
                tracing::warn!(error = %e, "autoscaler pass failed; retrying");
            }
        }
        tokio::time::sleep(if holding {
            EVALUATE_EVERY
        } else {
            LEASE_TTL / 3
        })
        .await;
    }
}

async fn evaluate_pass(state: &AppState, last_rev: &mut Option<i64>) -> Result<(), ApiError> {
    let rev = state.store.intended_rev().await?;
    let scope = if *last_rev == Some(rev) {
        let since = stead_store::now_ms() - stead_store::DEMAND_RETENTION.as_millis() as i64;
        Some(state.store.unsettled_apps(since).await?)
    } else {
        None
    };
    let decisions = evaluate_scope(state, scope.as_deref()).await?;
    // A decision written moves the revision: the next pass evaluates
    // everything once more (writing nothing), then settles.
    *last_rev = Some(rev);
    if decisions.changed {
        state.changed();
    }
    Ok(())
}

/// Decides the instance count of the apps in `only` (every app when
/// `None`), persisting state changes.
pub(crate) async fn evaluate_scope(
    state: &AppState,
    only: Option<&[i64]>,
) -> Result<Decisions, ApiError> {
    let inputs = state
        .store
        .scale_inputs_for(Duration::from_secs(70), state.config.host_timeout, only)
        .await?;
    let now = stead_store::now_ms();
    let mut out = Decisions::default();
    for app in &inputs.apps {
        let Some(version) = app.active_version.or(app.target_version) else {
            continue;
        };
        let prev_row = inputs.states.get(&app.app_id);
        let mut last_activity = inputs.last_active.get(&app.app_id).copied();
        // A version that just became active starts with a fresh idle clock.
        if app.active_version.is_some() && prev_row.and_then(|r| r.version) != app.active_version {
            state.store.touch_activity(app.app_id, now).await?;
            last_activity = Some(now);
        }
        let settings = Settings::new(app.min, app.max, &app.scaling);
        let sig = signals(&inputs, app.app_id, now, last_activity);
        let prev = prev_row.map(to_state);
        let decision = autoscale::decide(&settings, &sig, prev.as_ref(), now);
        let new_row = ScaleStateRow {
            version: app.active_version,
            desired: decision.state.desired,
            panic_until: decision.state.panic_until,
            below_since: decision.state.below_since,
            below_peak: decision.state.below_peak,
            updated_ms: now,
            settled: decision.state.below_since.is_none()
                && decision.state.panic_until.is_none()
                && decision.state.desired == app.min,
        };
        let differs = match prev_row {
            None => true,
            Some(p) => {
                p.version != new_row.version
                    || p.desired != new_row.desired
                    || p.panic_until != new_row.panic_until
                    || p.below_since != new_row.below_since
                    || p.below_peak != new_row.below_peak
                    || p.settled != new_row.settled
            }
        };
        let mut decision = decision;
        if differs {
            let won = state
                .store
                .save_scale_state(app.app_id, prev_row.map(|r| r.updated_ms), &new_row)
                .await?;
            if won {
                if prev.as_ref().map(|p| p.desired) != Some(new_row.desired) {
                    out.changed = true;
                    tracing::info!(app = %app.name, version, desired = new_row.desired,
                        previous = prev.as_ref().map(|p| p.desired), reason = %decision.reason, "scale changed");
                    crate::metrics::SCALE_CHANGES.fetch_add(1, Ordering::Relaxed);
                }
            } else if let Some(p) = &prev {
                // Another replica decided first; its state stands until the
                // next evaluation, which starts from it.
                decision.state = p.clone();
            }
        }
        out.apps.insert(
            app.app_id,
            AppDecision {
                app: app.clone(),
                decision,
                ready: sig.ready,
                queued: sig.queued_workflows,
                now,
                by_instance: in_flight_by_instance(&inputs, app.app_id, now),
            },
        );
    }
    Ok(out)
}

/// The scale status shown by `stead apps status`.
pub(crate) fn status(d: &AppDecision) -> ScaleStatus {
    ScaleStatus {
        desired: d.decision.state.desired,
        ready: d.ready,
        reason: d.decision.reason.clone(),
        in_flight: round2(d.decision.stable),
        in_flight_burst: round2(d.decision.burst),
        requests_per_s: round2(d.decision.requests_per_s),
        cpu_cores: round2(d.decision.cpu),
        queued_workflows: d.queued,
        panic: d.decision.panic(d.now),
        idle_ms: d.decision.idle_for,
        settings: d.app.scaling.clone(),
        in_flight_by_instance: d.by_instance.clone(),
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Records what an agent's heartbeat says about demand: CPU per app (from
/// its instances) and queued workflows. Failures are logged, not returned:
/// the heartbeat's main job (observed in, intended out) must not fail on
/// a missing signal.
pub(crate) async fn record_heartbeat_signals(state: &AppState, req: &HeartbeatRequest) {
    if !req.cpu_millis.is_empty() && req.cpu_period_ms > 0 {
        let mut by_app: BTreeMap<&str, u64> = BTreeMap::new();
        for i in &req.instances {
            if let Some(m) = req.cpu_millis.get(&i.id) {
                *by_app.entry(i.app.as_str()).or_default() += u64::from(*m);
            }
        }
        let samples: Vec<NewDemand> = by_app
            .into_iter()
            .map(|(app, m)| NewDemand {
                app: app.to_string(),
                period_ms: req.cpu_period_ms.min(60_000),
                cpu: m as f64 / 1000.0,
                ..NewDemand::default()
            })
            .filter(|d| d.cpu >= CPU_NOISE)
            .collect();
        if let Err(e) = state
            .store
            .record_demand(&req.host_id, DemandKind::Agent, &samples)
            .await
        {
            tracing::warn!(host = %req.host_id, error = %e, "cannot record CPU use");
        }
    }
    match state
        .store
        .record_queued(&req.host_id, &req.queued_workflows)
        .await
    {
        // New queued work can wake an app scaled to zero: decide for it
        // now, not at the autoscaler's next pass.
        Ok(ids) if !ids.is_empty() => match evaluate_scope(state, Some(&ids)).await {
            Ok(d) if d.changed => state.changed(),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(host = %req.host_id, error = %e, "cannot evaluate the apps with queued workflows")
            }
        },
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(host = %req.host_id, error = %e, "cannot record queued workflows")
        }
    }
}

/// A short, stable identifier of a JSON value (for `etag`s).
pub(crate) fn etag<T: serde::Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..12])
}

/// Holds a long-poll: calls `compute` until its etag differs from `known`,
/// `wait` has passed (then answers with the latest), or the server shuts
/// down. Woken by every change notification, and re-checks every
/// [`RECHECK`] besides.
pub(crate) async fn long_poll<T, F, Fut>(
    state: &AppState,
    known: Option<&str>,
    wait: Duration,
    mut compute: F,
) -> Result<(T, String), ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(T, String), ApiError>>,
{
    let deadline = Instant::now() + wait.min(MAX_WAIT);
    loop {
        let notified = state.changes.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let t0 = Instant::now();
        let (value, tag) = compute().await?;
        tracing::trace!(
            ms = t0.elapsed().as_secs_f64() * 1000.0,
            "long-poll computed"
        );
        let now = Instant::now();
        if known != Some(tag.as_str())
            || now >= deadline
            || state.shutting_down.load(Ordering::SeqCst)
        {
            return Ok((value, tag));
        }
        crate::metrics::LONG_POLL_WAITS.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::time::timeout((deadline - now).min(RECHECK), notified).await;
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RoutesQuery {
    /// The `etag` of the table the router has: answer once it differs.
    since: Option<String>,
    /// How long to hold the answer (milliseconds, at most 30000).
    #[serde(default)]
    wait_ms: u64,
}

/// The route table with each app's limits, and its etag.
async fn route_table(state: &AppState) -> Result<(RouteTable, String), ApiError> {
    let t0 = Instant::now();
    let mut table = state.store.routes(state.config.host_timeout).await?;
    for a in state.store.scale_apps(None).await? {
        let s = &a.scaling;
        table.limits.insert(
            a.name,
            AppLimits {
                max_concurrency: (s.max_concurrency > 0).then_some(s.max_concurrency),
                max_body_bytes: (s.max_body_bytes > 0).then_some(s.max_body_bytes),
                target_concurrency: Some(s.target_concurrency),
            },
        );
    }
    table.etag = None;
    let tag = etag(&table);
    table.etag = Some(tag.clone());
    tracing::trace!(
        ms = t0.elapsed().as_secs_f64() * 1000.0,
        "route table computed"
    );
    Ok((table, tag))
}

#[utoipa::path(get, path = "/v1/routes", tag = "agent", security(("bearer" = [])),
    params(RoutesQuery),
    responses((status = 200, body = RouteTable, description = "Every app's ready endpoints and limits; with `since`, held until the table differs"),
              (status = 403, body = ErrorBody)))]
pub(crate) async fn routes(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiQuery(q): ApiQuery<RoutesQuery>,
) -> Result<Json<RouteTable>, ApiError> {
    let (table, _) = long_poll(
        &state,
        q.since.as_deref(),
        Duration::from_millis(q.wait_ms),
        || route_table(&state),
    )
    .await?;
    Ok(Json(table))
}

#[utoipa::path(post, path = "/v1/router/demand", tag = "agent", security(("bearer" = [])),
    request_body = DemandReport,
    responses((status = 200, body = DemandAck), (status = 403, body = ErrorBody)))]
pub(crate) async fn demand(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(report): ApiJson<DemandReport>,
) -> Result<Json<DemandAck>, ApiError> {
    if report.router.trim().is_empty() || report.router.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`router` must name the reporting router in 1 to 200 characters",
        ));
    }
    crate::metrics::DEMAND_REPORTS.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let samples: Vec<NewDemand> = report.apps.iter().map(new_demand).collect();
    let ids = state
        .store
        .record_demand(&report.router, DemandKind::Router, &samples)
        .await?;
    let recorded = t0.elapsed();
    // Decide now for the apps reported on rather than at the next pass: a
    // wake-up or a burst reaches the agents (long-polling their intended
    // state) at once.
    let decisions = evaluate_scope(&state, Some(&ids)).await?;
    if decisions.changed {
        state.changed();
    }
    tracing::debug!(
        recorded_ms = recorded.as_secs_f64() * 1000.0,
        total_ms = t0.elapsed().as_secs_f64() * 1000.0,
        changed = decisions.changed,
        "demand report"
    );
    let now = stead_store::now_ms();
    let last = LAST_PRUNE.load(Ordering::Relaxed);
    if now - last >= PRUNE_EVERY_MS
        && LAST_PRUNE
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let before = now - stead_store::DEMAND_RETENTION.as_millis() as i64;
        match state.store.prune_demand(before).await {
            Ok(n) if n > 0 => tracing::debug!(deleted = n, "pruned old demand samples"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot prune old demand samples"),
        }
    }
    Ok(Json(DemandAck {
        changed: decisions.changed,
    }))
}

fn new_demand(a: &AppDemand) -> NewDemand {
    NewDemand {
        app: a.app.clone(),
        period_ms: a.period_ms.min(60_000),
        concurrency: if a.concurrency.is_finite() {
            a.concurrency.max(0.0)
        } else {
            0.0
        },
        peak: a.peak,
        requests: a.requests,
        waiting: a.waiting,
        cpu: 0.0,
        detail: (!a.instances.is_empty())
            .then(|| serde_json::to_string(&a.instances).unwrap_or_default()),
    }
}

#[utoipa::path(post, path = "/v1/apps/{app}/scale", tag = "apps", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    request_body = ScaleRequest,
    responses((status = 200, body = AppStatus, description = "The app with its new scale"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn set_scale(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    ApiJson(req): ApiJson<ScaleRequest>,
) -> Result<Json<AppStatus>, ApiError> {
    let rec = crate::api::load_app(&state, &auth, &app).await?;
    let set = state
        .store
        .set_scale_settings(rec.id, &req)
        .await
        .map_err(|e| match e {
            stead_store::StoreError::Invalid(m) => ApiError::bad_request("invalid_scale", m),
            other => other.into(),
        })?;
    tracing::info!(app, min = set.min, max = set.max, "scale settings changed");
    evaluate_scope(&state, Some(&[rec.id])).await?;
    state.changed();
    let rec = crate::api::load_app(&state, &auth, &app).await?;
    Ok(Json(crate::api::app_status(&state, &rec).await?))
}

/// The autoscaler's view of one app for its status, deciding afresh
/// (`None` for an app without a built version yet).
pub(crate) async fn app_scale(
    state: &AppState,
    app_id: i64,
) -> Result<Option<ScaleStatus>, ApiError> {
    let mut decisions = evaluate_scope(state, Some(&[app_id])).await?;
    if decisions.changed {
        state.changed();
    }
    Ok(decisions.apps.remove(&app_id).map(|d| status(&d)))
}
