//! Autoscaling state: the demand routers and agents report, the
//! autoscaler's decision state per app, and scale settings.
//!
//! Demand lives here (not in a server's memory) so that every control-plane
//! replica decides from the same facts. Writes follow activity, not
//! traffic: a router sends one report per busy period (about a second)
//! whatever the number of requests, and nothing while its apps idle; an
//! agent writes a CPU sample only for instances that used CPU, and a queue
//! length only when it changed; the decision state is written only when it
//! changes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use stead_api::{AppConfig, ScaleRequest, ScalingConfig};

use crate::{
    get_i64, get_opt_i64, get_opt_str, get_str, insert_event, now_ms, to_u32, Result, Store,
    StoreError,
};

/// Who measured a demand sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemandKind {
    /// A router: requests in flight, requests, held requests.
    Router,
    /// An agent: CPU used by the app's instances on its host.
    Agent,
}

impl DemandKind {
    fn as_str(self) -> &'static str {
        match self {
            DemandKind::Router => "router",
            DemandKind::Agent => "agent",
        }
    }
}

/// One measurement of an app's demand over a period ending when it is
/// recorded (the server's clock, so sources need not agree on time).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewDemand {
    pub app: String,
    pub period_ms: u64,
    /// Average requests in flight over the period.
    pub concurrency: f64,
    pub peak: u64,
    pub requests: u64,
    /// Requests held now for lack of a ready instance.
    pub waiting: u64,
    /// Cores used over the period.
    pub cpu: f64,
    /// Requests in flight per instance now, as JSON (latest sample only).
    pub detail: Option<String>,
}

/// A stored demand sample.
#[derive(Debug, Clone, PartialEq)]
pub struct DemandSample {
    pub app_id: i64,
    pub source: String,
    pub kind: DemandKind,
    pub start_ms: i64,
    pub end_ms: i64,
    pub concurrency: f64,
    pub peak: u64,
    pub requests: u64,
    pub waiting: u64,
    pub cpu: f64,
    pub detail: Option<String>,
}

/// The autoscaler's memory for one app (see the server's `autoscale`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScaleStateRow {
    /// The active version the state is about: a new one restarts the idle
    /// clock (a deploy counts as activity).
    pub version: Option<u32>,
    pub desired: u32,
    pub panic_until: Option<i64>,
    pub below_since: Option<i64>,
    pub below_peak: u32,
    /// When it was written; also the optimistic-concurrency token.
    pub updated_ms: i64,
    /// Nothing time-driven is pending (no scale-down delay or panic window
    /// running, the count at `min`): with no new demand and no change of
    /// intended state, evaluating the app again would decide the same, so
    /// the periodic evaluation skips it.
    pub settled: bool,
}

/// An app as the autoscaler sees it: bounds and effective settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleApp {
    pub app_id: i64,
    pub name: String,
    pub active_version: Option<u32>,
    pub target_version: Option<u32>,
    pub min: u32,
    pub max: u32,
    /// stead.toml's settings of the active (else target) version, or what
    /// `stead scale` set since.
    pub scaling: ScalingConfig,
    /// Whether `scaling` comes from `stead scale` rather than stead.toml.
    pub overridden: bool,
}

/// Everything the autoscaler needs about every app, read in a few queries.
#[derive(Debug, Clone, Default)]
pub struct ScaleInputs {
    pub apps: Vec<ScaleApp>,
    /// Samples that ended within the window asked for, oldest first.
    pub samples: Vec<DemandSample>,
    pub states: HashMap<i64, ScaleStateRow>,
    /// When each app last had a request in flight or held.
    pub last_active: HashMap<i64, i64>,
    /// Ready instances of the active version on alive hosts.
    pub ready: HashMap<i64, u32>,
    /// Queued DBOS workflows (the largest report of an alive host).
    pub queued: HashMap<i64, u64>,
}

/// Samples older than this are deleted: the longest stable window allowed.
pub const DEMAND_RETENTION: Duration = Duration::from_secs(3600 + 60);

fn milli(v: f64) -> i64 {
    if v.is_finite() && v > 0.0 {
        (v * 1000.0).round().min(i64::MAX as f64 / 2.0) as i64
    } else {
        0
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parse_config(text: &str) -> Result<AppConfig> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        table: "versions",
        message: e.to_string(),
    })
}

impl Store {
    /// Records demand measured by `source`; returns the ids of the apps it
    /// was about (unknown apps are skipped: they may have just been
    /// deleted). Apps with requests in flight, held or received get their
    /// last-activity time set to now.
    pub async fn record_demand(
        &self,
        source: &str,
        kind: DemandKind,
        samples: &[NewDemand],
    ) -> Result<Vec<i64>> {
        if samples.is_empty() {
            return Ok(Vec::new());
        }
        self.retry("record_demand", || {
            self.record_demand_once(source, kind, samples)
        })
        .await
    }

    async fn record_demand_once(
        &self,
        source: &str,
        kind: DemandKind,
        samples: &[NewDemand],
    ) -> Result<Vec<i64>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::new();
        for s in samples {
            let Some(row) = sqlx::query("SELECT id FROM apps WHERE name = $1")
                .bind(&s.app)
                .fetch_optional(&mut *tx)
                .await?
            else {
                continue;
            };
            let app_id = get_i64(&row, "id")?;
            sqlx::query(
                "INSERT INTO demand_samples (app_id, source, kind, start_ms, end_ms, concurrency_milli, \
                 peak, requests, waiting, cpu_milli, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(app_id)
            .bind(source)
            .bind(kind.as_str())
            .bind(now - clamp_i64(s.period_ms))
            .bind(now)
            .bind(milli(s.concurrency))
            .bind(clamp_i64(s.peak))
            .bind(clamp_i64(s.requests))
            .bind(clamp_i64(s.waiting))
            .bind(milli(s.cpu))
            .bind(s.detail.clone())
            .execute(&mut *tx)
            .await?;
            let active = kind == DemandKind::Router
                && (s.concurrency > 0.0 || s.peak > 0 || s.requests > 0 || s.waiting > 0);
            if active {
                sqlx::query(
                    "INSERT INTO app_demand (app_id, last_active_ms) VALUES ($1, $2) \
                     ON CONFLICT (app_id) DO UPDATE SET last_active_ms = excluded.last_active_ms",
                )
                .bind(app_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            ids.push(app_id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Records the queued DBOS workflows a host reports per app (apps not
    /// listed have none). Writes only what changed; returns the ids of the
    /// apps whose count changed (their autoscaling decision is due).
    pub async fn record_queued(
        &self,
        host_id: &str,
        queued: &BTreeMap<String, u64>,
    ) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT q.app_id AS app_id, a.name AS name, q.queued AS queued FROM app_queue q \
             JOIN apps a ON a.id = q.app_id WHERE q.host_id = $1",
        )
        .bind(host_id)
        .fetch_all(&self.pool)
        .await?;
        let mut known: HashMap<String, (i64, u64)> = HashMap::new();
        for r in &rows {
            known.insert(
                get_str(r, "name")?,
                (get_i64(r, "app_id")?, to_u64(get_i64(r, "queued")?)),
            );
        }
        let changed = queued
            .iter()
            .any(|(app, n)| known.get(app).map(|k| k.1) != Some(*n) && *n > 0)
            || known
                .iter()
                .any(|(app, _)| queued.get(app).copied().unwrap_or(0) == 0);
        if !changed {
            return Ok(Vec::new());
        }
        self.retry("record_queued", || async {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            let mut ids = Vec::new();
            for (app, (app_id, _)) in &known {
                if queued.get(app).copied().unwrap_or(0) == 0 {
                    ids.push(*app_id);
                    sqlx::query("DELETE FROM app_queue WHERE app_id = $1 AND host_id = $2")
                        .bind(app_id)
                        .bind(host_id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            for (app, n) in queued {
                if *n == 0 || known.get(app).map(|k| k.1) == Some(*n) {
                    continue;
                }
                let Some(row) = sqlx::query("SELECT id FROM apps WHERE name = $1")
                    .bind(app)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    continue;
                };
                ids.push(get_i64(&row, "id")?);
                sqlx::query(
                    "INSERT INTO app_queue (app_id, host_id, queued, updated_ms) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (app_id, host_id) DO UPDATE SET queued = excluded.queued, updated_ms = excluded.updated_ms",
                )
                .bind(get_i64(&row, "id")?)
                .bind(host_id)
                .bind(clamp_i64(*n))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(ids)
        })
        .await
    }

    /// Everything the autoscaler needs, for every app: settings, the
    /// samples that ended within the longest stable window (at least
    /// `window`), decision states, last activity, ready instances and
    /// queued work on hosts alive within `host_timeout`.
    pub async fn scale_inputs(
        &self,
        window: Duration,
        host_timeout: Duration,
    ) -> Result<ScaleInputs> {
        self.scale_inputs_for(window, host_timeout, None).await
    }

    /// [`Store::scale_inputs`] of only the apps in `apps` (all when `None`),
    /// so that evaluating the few apps with something going on costs rows
    /// in proportion to them, not to every app.
    pub async fn scale_inputs_for(
        &self,
        window: Duration,
        host_timeout: Duration,
        apps: Option<&[i64]>,
    ) -> Result<ScaleInputs> {
        let now = now_ms();
        if apps.is_some_and(|a| a.is_empty()) {
            return Ok(ScaleInputs::default());
        }
        // Ids are integers, so a literal list is safe and works on both
        // backends through `Any`.
        let only = |col: &str| match apps {
            Some(ids) => format!(
                " AND {col} IN ({})",
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            ),
            None => String::new(),
        };
        let apps = self.scale_apps_where(&only("a.id")).await?;
        let longest = apps
            .iter()
            .map(|a| a.scaling.stable_window_ms)
            .max()
            .unwrap_or(0)
            // Samples overlapping the window's start end a report later.
            .saturating_add(5_000);
        let window_ms =
            i64::try_from(window.as_millis().max(u128::from(longest))).unwrap_or(i64::MAX / 4);
        let since = now - window_ms;
        let cutoff = now - i64::try_from(host_timeout.as_millis()).unwrap_or(i64::MAX / 4);
        let mut out = ScaleInputs {
            apps,
            ..ScaleInputs::default()
        };
        let rows = sqlx::query(
            &format!("SELECT app_id, source, kind, start_ms, end_ms, concurrency_milli, peak, requests, waiting, \
             cpu_milli, detail FROM demand_samples WHERE end_ms >= $1{} ORDER BY end_ms", only("app_id")),
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            out.samples.push(DemandSample {
                app_id: get_i64(r, "app_id")?,
                source: get_str(r, "source")?,
                kind: if get_str(r, "kind")? == "agent" {
                    DemandKind::Agent
                } else {
                    DemandKind::Router
                },
                start_ms: get_i64(r, "start_ms")?,
                end_ms: get_i64(r, "end_ms")?,
                concurrency: get_i64(r, "concurrency_milli")? as f64 / 1000.0,
                peak: to_u64(get_i64(r, "peak")?),
                requests: to_u64(get_i64(r, "requests")?),
                waiting: to_u64(get_i64(r, "waiting")?),
                cpu: get_i64(r, "cpu_milli")? as f64 / 1000.0,
                detail: get_opt_str(r, "detail")?,
            });
        }
        for r in &sqlx::query(&format!(
            "SELECT app_id, version, desired, panic_until, below_since, below_peak, updated_ms, settled FROM scale_state WHERE 1 = 1{}",
            only("app_id")
        ))
        .fetch_all(&self.pool)
        .await?
        {
            out.states.insert(
                get_i64(r, "app_id")?,
                ScaleStateRow {
                    version: get_opt_i64(r, "version")?.map(to_u32),
                    desired: to_u32(get_i64(r, "desired")?),
                    panic_until: get_opt_i64(r, "panic_until")?,
                    below_since: get_opt_i64(r, "below_since")?,
                    below_peak: to_u32(get_i64(r, "below_peak")?),
                    updated_ms: get_i64(r, "updated_ms")?,
                    settled: get_i64(r, "settled")? != 0,
                },
            );
        }
        for r in &sqlx::query(&format!(
            "SELECT app_id, last_active_ms FROM app_demand WHERE 1 = 1{}",
            only("app_id")
        ))
        .fetch_all(&self.pool)
        .await?
        {
            out.last_active
                .insert(get_i64(r, "app_id")?, get_i64(r, "last_active_ms")?);
        }
        for r in &sqlx::query(&format!(
            "SELECT i.app_id AS app_id, COUNT(*) AS n FROM instances i JOIN apps a ON a.id = i.app_id \
             JOIN hosts h ON h.id = i.host_id WHERE i.state = 'ready' AND i.version = a.active_version \
             AND h.last_heartbeat >= $1{} GROUP BY i.app_id",
            only("i.app_id")
        ))
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?
        {
            out.ready
                .insert(get_i64(r, "app_id")?, to_u32(get_i64(r, "n")?));
        }
        for r in &sqlx::query(&format!(
            "SELECT q.app_id AS app_id, MAX(q.queued) AS n FROM app_queue q JOIN hosts h ON h.id = q.host_id \
             WHERE h.last_heartbeat >= $1{} GROUP BY q.app_id",
            only("q.app_id")
        ))
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?
        {
            out.queued
                .insert(get_i64(r, "app_id")?, to_u64(get_i64(r, "n")?));
        }
        // The control plane's own reading of each app's system database
        // (PENDING and ENQUEUED workflows of every version), kept fresh by
        // its durable-execution loop: an app with work is never scaled to
        // zero, and queued work counts as demand.
        for r in &sqlx::query(&format!(
            "SELECT app_id, CAST(SUM(pending + enqueued) AS BIGINT) AS n FROM version_work WHERE checked_at >= $1{} GROUP BY app_id",
            only("app_id")
        ))
        .bind(crate::now_ms() - 30_000)
        .fetch_all(&self.pool)
        .await?
        {
            let n = to_u64(get_opt_i64(r, "n")?.unwrap_or(0));
            let e = out.queued.entry(get_i64(r, "app_id")?).or_default();
            *e = (*e).max(n);
        }
        Ok(out)
    }

    /// Apps whose autoscaling decision may change with time alone: not
    /// settled (see [`ScaleStateRow::settled`]), with demand samples that
    /// ended since `since_ms`, or with queued work. Indexed, so it costs
    /// rows in proportion to those apps.
    pub async fn unsettled_apps(&self, since_ms: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT app_id FROM scale_state WHERE settled = 0 \
             UNION SELECT app_id FROM demand_samples WHERE end_ms >= $1 \
             UNION SELECT app_id FROM app_queue \
             UNION SELECT app_id FROM version_work WHERE pending + enqueued > 0",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut ids: Vec<i64> = rows
            .iter()
            .map(|r| get_i64(r, "app_id"))
            .collect::<Result<_>>()?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Every app's desired instance count as the autoscaler last decided
    /// it (`scale_state`), in one query.
    pub async fn desired_counts(&self) -> Result<HashMap<i64, u32>> {
        let rows = sqlx::query("SELECT app_id, desired FROM scale_state")
            .fetch_all(&self.pool)
            .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in &rows {
            out.insert(get_i64(r, "app_id")?, to_u32(get_i64(r, "desired")?));
        }
        Ok(out)
    }

    /// Bounds and effective settings of every app, or of one.
    pub async fn scale_apps(&self, app_id: Option<i64>) -> Result<Vec<ScaleApp>> {
        match app_id {
            Some(id) => self.scale_apps_where(&format!(" AND a.id = {id}")).await,
            None => self.scale_apps_where("").await,
        }
    }

    /// `filter`: `AND ...` conditions on `a` (apps) built from integers.
    async fn scale_apps_where(&self, filter: &str) -> Result<Vec<ScaleApp>> {
        let sql = format!(
            "SELECT a.id AS id, a.name AS name, a.active_version AS active_version, \
             a.target_version AS target_version, a.min_instances AS min_instances, \
             a.max_instances AS max_instances, v.config AS config, o.settings AS settings, \
             o.for_version AS for_version FROM apps a \
             LEFT JOIN versions v ON v.app_id = a.id AND v.number = COALESCE(a.active_version, a.target_version) \
             LEFT JOIN scale_overrides o ON o.app_id = a.id WHERE 1 = 1{filter} ORDER BY a.id"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        let mut apps = Vec::with_capacity(rows.len());
        for r in &rows {
            let active_version = get_opt_i64(r, "active_version")?.map(to_u32);
            let target_version = get_opt_i64(r, "target_version")?.map(to_u32);
            let base = match get_opt_str(r, "config")? {
                Some(c) => parse_config(&c)?.scaling,
                None => ScalingConfig::default(),
            };
            // An override holds until a version deployed after it is active.
            let current = active_version.or(target_version).map_or(0, i64::from);
            let over = match (get_opt_str(r, "settings")?, get_opt_i64(r, "for_version")?) {
                (Some(s), Some(v)) if current <= v => {
                    serde_json::from_str::<ScalingConfig>(&s).ok()
                }
                _ => None,
            };
            apps.push(ScaleApp {
                app_id: get_i64(r, "id")?,
                name: get_str(r, "name")?,
                active_version,
                target_version,
                min: to_u32(get_i64(r, "min_instances")?),
                max: to_u32(get_i64(r, "max_instances")?),
                overridden: over.is_some(),
                scaling: over.unwrap_or(base),
            });
        }
        Ok(apps)
    }

    /// Writes an app's decision state if nobody else did since it was read
    /// (`expected` is the `updated_ms` read, `None` when there was no row).
    /// Returns false when another writer won: its state stands.
    pub async fn save_scale_state(
        &self,
        app_id: i64,
        expected: Option<i64>,
        state: &ScaleStateRow,
    ) -> Result<bool> {
        let affected = match expected {
            None => sqlx::query(
                "INSERT INTO scale_state (app_id, version, desired, panic_until, below_since, below_peak, updated_ms, settled) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $9) ON CONFLICT (app_id) DO NOTHING",
            ),
            Some(_) => sqlx::query(
                "UPDATE scale_state SET version = $2, desired = $3, panic_until = $4, below_since = $5, \
                 below_peak = $6, updated_ms = $7, settled = $9 WHERE app_id = $1 AND updated_ms = $8",
            ),
        }
        .bind(app_id)
        .bind(state.version.map(i64::from))
        .bind(i64::from(state.desired))
        .bind(state.panic_until)
        .bind(state.below_since)
        .bind(i64::from(state.below_peak))
        .bind(state.updated_ms)
        .bind(expected.unwrap_or(0))
        .bind(i64::from(state.settled))
        .execute(&self.pool)
        .await;
        match affected {
            Ok(r) => Ok(r.rows_affected() == 1),
            // A concurrent writer holding the lock: its decision stands.
            Err(e) => {
                let e = StoreError::from(e);
                if e.is_retryable() {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Changes an app's scale (`stead scale`): min/max (kept until the next
    /// deploy writes stead.toml's again, like every other setting), and the
    /// autoscaler's targets and limits, which hold until a version deployed
    /// later becomes active. Records a `scale` event. Returns the new
    /// settings.
    pub async fn set_scale_settings(&self, app_id: i64, req: &ScaleRequest) -> Result<ScaleApp> {
        let current = self
            .scale_apps(Some(app_id))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("app {app_id} does not exist")))?;
        let min = req.min.unwrap_or(current.min);
        let max = req.max.unwrap_or(current.max);
        if max == 0 || min > max || max > 1000 {
            return Err(StoreError::Invalid(format!(
                "min ({min}) must not exceed max ({max}), and max must be between 1 and 1000"
            )));
        }
        let mut s = current.scaling.clone();
        if let Some(v) = req.target_concurrency {
            s.target_concurrency = v;
        }
        if let Some(v) = req.target_cpu_percent {
            s.target_cpu_percent = v;
        }
        if let Some(v) = req.idle_timeout_ms {
            s.idle_timeout_ms = v;
        }
        if let Some(v) = req.stable_window_ms {
            s.stable_window_ms = v;
        }
        if let Some(v) = req.panic_window_ms {
            s.panic_window_ms = v;
        }
        if let Some(v) = req.scale_down_delay_ms {
            s.scale_down_delay_ms = v;
        }
        if let Some(v) = req.max_concurrency {
            s.max_concurrency = v;
        }
        if let Some(v) = req.max_body_bytes {
            s.max_body_bytes = v;
        }
        s.validate().map_err(StoreError::Invalid)?;
        let settings_changed = s != current.scaling;
        let settings = serde_json::to_string(&s).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut changes = Vec::new();
        if min != current.min || max != current.max {
            changes.push(format!("min {min}, max {max}"));
        }
        if settings_changed {
            changes.push(describe(&s));
        }
        self.retry("set_scale_settings", || async {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            sqlx::query("UPDATE apps SET min_instances = $1, max_instances = $2 WHERE id = $3")
                .bind(i64::from(min))
                .bind(i64::from(max))
                .bind(app_id)
                .execute(&mut *tx)
                .await?;
            if settings_changed || current.overridden {
                let row = sqlx::query("SELECT last_version FROM apps WHERE id = $1")
                    .bind(app_id)
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO scale_overrides (app_id, for_version, settings, updated_ms) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (app_id) DO UPDATE SET for_version = excluded.for_version, \
                     settings = excluded.settings, updated_ms = excluded.updated_ms",
                )
                .bind(app_id)
                .bind(get_i64(&row, "last_version")?)
                .bind(&settings)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            if !changes.is_empty() {
                insert_event(
                    &mut tx,
                    app_id,
                    "scale",
                    &format!("scale set: {}", changes.join("; ")),
                    serde_json::json!({"min": min, "max": max, "scaling": s}),
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await?;
        Ok(ScaleApp {
            min,
            max,
            overridden: current.overridden || settings_changed,
            scaling: s,
            ..current
        })
    }

    /// Sets an app's last activity to `at_ms` (a newly active version
    /// counts as activity: a deploy does not start idle).
    pub async fn touch_activity(&self, app_id: i64, at_ms: i64) -> Result<()> {
        self.retry("touch_activity", || async {
            sqlx::query(
                "INSERT INTO app_demand (app_id, last_active_ms) VALUES ($1, $2) \
                 ON CONFLICT (app_id) DO UPDATE SET last_active_ms = excluded.last_active_ms",
            )
            .bind(app_id)
            .bind(at_ms)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// Deletes demand samples that ended before `before_ms`; returns how many.
    pub async fn prune_demand(&self, before_ms: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM demand_samples WHERE end_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

/// One line naming the settings, for events.
fn describe(s: &ScalingConfig) -> String {
    use stead_api::config::fmt_ms;
    let mut parts = vec![
        format!("target concurrency {}", s.target_concurrency),
        if s.target_cpu_percent == 0 {
            "no CPU target".to_string()
        } else {
            format!("target CPU {}%", s.target_cpu_percent)
        },
        if s.idle_timeout_ms == 0 {
            "never idle to zero".to_string()
        } else {
            format!("idle timeout {}", fmt_ms(s.idle_timeout_ms))
        },
        format!(
            "windows {}/{}, scale-down delay {}",
            fmt_ms(s.stable_window_ms),
            fmt_ms(s.panic_window_ms),
            fmt_ms(s.scale_down_delay_ms)
        ),
    ];
    if s.max_concurrency > 0 {
        parts.push(format!("max concurrency {}", s.max_concurrency));
    }
    if s.max_body_bytes > 0 {
        parts.push(format!("max body {} bytes", s.max_body_bytes));
    }
    parts.join(", ")
}
