//! Control-plane scale benchmark (issue 6): a real control plane on a real
//! (throwaway) PostgreSQL, fed by simulated hosts that speak the real
//! heartbeat API with the host token and apply the agent's own pure
//! `decide` to an in-memory fake sandbox whose instances start instantly
//! and are ready at once.
//!
//! Apps and their ready version are inserted straight into the store (no
//! 10,000 real builds); everything after that goes through the API: the
//! hosts register, long-poll their intended state and start what placement
//! gives them; the changes measured are made with `stead scale`'s endpoint.
//!
//! Run (release, one size or several; see docs/benchmarks.md):
//!
//! ```text
//! cargo test -p stead-server --release --test bench_scale -- --ignored --nocapture
//! STEAD_BENCH_SIZES=1000,5000 STEAD_BENCH_CHANGES=60 STEAD_BENCH_WINDOW_S=20 cargo test ...
//! ```
//!
//! Per size it prints: the time for every host to start and report its
//! share from nothing; the database load over a window with no change and
//! over a window with a steady low rate of changes (statements the control
//! plane sent, counted from sqlx's own statement log, and `pg_stat_database`
//! deltas: transactions, tuples fetched/returned/written); and the
//! enactment time of a change of intended state (an app's `min` raised by
//! one through the API, until the simulated host that starts the new
//! instance has had the heartbeat reporting it ready acknowledged, i.e.
//! the control plane has recorded it), median, p95 and p99.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{send, Db, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::json;
use stead_agent::decide::{self, Action, ExitHistory, Observed, Phase, Policy};
use stead_api::{
    HeartbeatRequest, HeartbeatResponse, InstanceState, IntendedHostState, ObservedInstance,
};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Statements sent by every sqlx connection of this process (the control
/// plane's store, and the few the benchmark makes itself, subtracted).
static STATEMENTS: AtomicU64 = AtomicU64::new(0);

struct CountStatements;

impl<S: tracing::Subscriber> Layer<S> for CountStatements {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() == "sqlx::query" {
            STATEMENTS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn install_counter() {
    let counter = CountStatements.with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target("sqlx::query", tracing::Level::DEBUG),
    );
    let log = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(
            std::env::var("STEAD_BENCH_LOG")
                .ok()
                .and_then(|v| v.parse::<tracing_subscriber::filter::Targets>().ok())
                .unwrap_or_else(|| {
                    tracing_subscriber::filter::Targets::new()
                        .with_default(tracing::Level::WARN)
                        .with_target("sqlx", tracing::level_filters::LevelFilter::OFF)
                }),
        );
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(counter).with(log),
    );
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const PER_APP: u32 = 5;
const PER_HOST: u32 = 500;
const POLL: Duration = Duration::from_millis(1000);

/// What the control plane has acknowledged, summed over the hosts: per
/// app, live and ready instances.
#[derive(Default)]
struct Acked {
    apps: Mutex<HashMap<String, (u32, u32)>>,
    total_ready: AtomicU64,
    errors: AtomicU64,
    heartbeats: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Acked {
    fn get(&self, app: &str) -> (u32, u32) {
        self.apps
            .lock()
            .unwrap()
            .get(app)
            .copied()
            .unwrap_or((0, 0))
    }

    /// Waits until `check` holds or `limit` passes; returns the time taken.
    async fn wait(&self, limit: Duration, check: impl Fn(&Acked) -> bool) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            let n = self.changed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if check(self) {
                return Some(t0.elapsed());
            }
            let left = limit.checked_sub(t0.elapsed())?;
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), n).await;
        }
    }
}

struct FakeInstance {
    app: String,
    version: u32,
    state: InstanceState,
    started_at: i64,
}

fn now_ms() -> i64 {
    stead_store::now_ms()
}

/// Per-app (live, ready) counts of a host's instances.
fn summarise(instances: &BTreeMap<String, FakeInstance>) -> HashMap<String, (u32, u32)> {
    let mut out: HashMap<String, (u32, u32)> = HashMap::new();
    for i in instances.values() {
        let e = out.entry(i.app.clone()).or_default();
        if i.state != InstanceState::Exited {
            e.0 += 1;
        }
        if i.state == InstanceState::Ready {
            e.1 += 1;
        }
    }
    out
}

/// One simulated host: the agent's resolving loop (long-polled heartbeat,
/// `decide`, apply) over instances that start and become ready at once.
async fn fake_host(
    base: String,
    token: String,
    name: String,
    acked: Arc<Acked>,
    stop: Arc<tokio::sync::Notify>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let reg: stead_api::RegisterResponse = client
        .post(format!("{base}/v1/agent/register"))
        .bearer_auth(&token)
        .json(
            &json!({"name": name, "capacity": {"memory_mb": 1_000_000, "cpus": 64},
            "backends": ["process"], "agent_version": "bench"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut instances: BTreeMap<String, FakeInstance> = BTreeMap::new();
    let mut intended: Option<IntendedHostState> = None;
    let mut etag: Option<String> = None;
    let mut acknowledged: Option<Vec<(String, InstanceState)>> = None;
    let mut published: HashMap<String, (u32, u32)> = HashMap::new();
    let history = ExitHistory::default();
    let policy = Policy::default();
    let mut seq = 0u64;
    loop {
        let summary: Vec<(String, InstanceState)> = instances
            .iter()
            .map(|(id, i)| (id.clone(), i.state))
            .collect();
        let news = acknowledged.as_ref() != Some(&summary);
        let req = HeartbeatRequest {
            host_id: reg.host_id.clone(),
            session: reg.session.clone(),
            instances: instances
                .iter()
                .map(|(id, i)| ObservedInstance {
                    id: id.clone(),
                    app: i.app.clone(),
                    version: i.version,
                    state: i.state,
                    executor_id: id.clone(),
                    endpoint: Some("127.0.0.1:9".into()),
                    pid: None,
                    started_at_ms: i.started_at,
                    exit: None,
                    dbos_admin: false,
                })
                .collect(),
            wait_ms: if intended.is_some() && !news {
                POLL.as_millis() as u64
            } else {
                0
            },
            known: etag.clone(),
            cpu_millis: BTreeMap::new(),
            cpu_period_ms: 0,
            queued_workflows: BTreeMap::new(),
        };
        let sent = Instant::now();
        let reply = tokio::select! {
            r = client.post(format!("{base}/v1/agent/heartbeat")).bearer_auth(&token).json(&req).send() => r,
            _ = stop.notified() => return,
        };
        let reply = match reply {
            Ok(r) if r.status() == StatusCode::OK => r.json::<HeartbeatResponse>().await.ok(),
            _ => None,
        };
        let mut again = false;
        match reply {
            Some(resp) => {
                acked.heartbeats.fetch_add(1, Ordering::Relaxed);
                acknowledged = Some(summary);
                // What the control plane has now recorded of this host.
                let now = summarise(&instances);
                {
                    let mut apps = acked.apps.lock().unwrap();
                    let mut ready_delta: i64 = 0;
                    for (app, old) in &published {
                        if !now.contains_key(app) {
                            let e = apps.entry(app.clone()).or_default();
                            e.0 -= old.0;
                            e.1 -= old.1;
                            ready_delta -= i64::from(old.1);
                        }
                    }
                    for (app, new) in &now {
                        let old = published.get(app).copied().unwrap_or((0, 0));
                        if old != *new {
                            let e = apps.entry(app.clone()).or_default();
                            e.0 = e.0 + new.0 - old.0;
                            e.1 = e.1 + new.1 - old.1;
                            ready_delta += i64::from(new.1) - i64::from(old.1);
                        }
                    }
                    if ready_delta >= 0 {
                        acked
                            .total_ready
                            .fetch_add(ready_delta as u64, Ordering::Relaxed);
                    } else {
                        acked
                            .total_ready
                            .fetch_sub((-ready_delta) as u64, Ordering::Relaxed);
                    }
                }
                published = now;
                acked.changed.notify_waiters();
                let held = sent.elapsed() >= POLL / 2;
                // As the agent: after news, long-poll again at once.
                again = resp.etag.is_some() && (held || resp.etag != etag || news);
                etag = resp.etag;
                intended = Some(resp.intended);
            }
            None => {
                acked.errors.fetch_add(1, Ordering::Relaxed);
                etag = None;
            }
        }
        if let Some(intended) = &intended {
            let now = now_ms();
            let observed: Vec<Observed> = instances
                .iter()
                .map(|(id, i)| Observed {
                    id: id.clone(),
                    app: i.app.clone(),
                    version: i.version,
                    phase: match i.state {
                        InstanceState::Exited => Phase::Exited { at: now },
                        InstanceState::Stopping => Phase::Stopping,
                        InstanceState::Starting => Phase::Starting,
                        InstanceState::Ready => Phase::Ready,
                    },
                    started_at: i.started_at,
                    executor_id: id.clone(),
                    unhealthy_timeout: None,
                })
                .collect();
            let actions = decide::decide(&observed, intended, &history, now, &policy);
            if !actions.is_empty() {
                again = true;
            }
            for action in actions {
                match action {
                    Action::Start { app, version, .. } => {
                        seq += 1;
                        instances.insert(
                            format!("i-{name}-{seq}"),
                            FakeInstance {
                                app,
                                version,
                                // The fake sandbox starts instantly and is
                                // ready at once.
                                state: InstanceState::Ready,
                                started_at: now,
                            },
                        );
                    }
                    Action::Stop { id, .. } => {
                        if let Some(i) = instances.get_mut(&id) {
                            i.state = InstanceState::Exited;
                        }
                    }
                    Action::Forget { id } => {
                        instances.remove(&id);
                    }
                }
            }
        }
        if !again {
            tokio::select! {
                _ = tokio::time::sleep_until((sent + POLL).into()) => {}
                _ = stop.notified() => return,
            }
        }
    }
}

/// Cumulative counters of the benchmark's database.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    statements: u64,
    xact: i64,
    fetched: i64,
    returned: i64,
    inserted: i64,
    updated: i64,
    deleted: i64,
    at: Option<Instant>,
}

async fn stats(conn: &mut sqlx::PgConnection) -> Stats {
    // Other backends flush their counters about once a second; a window
    // of many seconds makes that edge negligible.
    let row: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT xact_commit + xact_rollback, tup_fetched, tup_returned, tup_inserted, tup_updated, tup_deleted \
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    Stats {
        statements: STATEMENTS.load(Ordering::Relaxed),
        xact: row.0,
        fetched: row.1,
        returned: row.2,
        inserted: row.3,
        updated: row.4,
        deleted: row.5,
        at: Some(Instant::now()),
    }
}

/// Per-second rates between two snapshots (the benchmark's own statement
/// and transaction per snapshot are subtracted).
fn rates(a: &Stats, b: &Stats) -> String {
    let secs = b.at.unwrap().duration_since(a.at.unwrap()).as_secs_f64();
    let per = |x: f64| x / secs;
    format!(
        "statements/s {:.0}, transactions/s {:.0}, tuples fetched/s {:.0}, returned/s {:.0}, written/s {:.0} (ins {:.0}, upd {:.0}, del {:.0}) over {:.1} s",
        per((b.statements - a.statements).saturating_sub(1) as f64),
        per((b.xact - a.xact - 1) as f64),
        per((b.fetched - a.fetched) as f64),
        per((b.returned - a.returned) as f64),
        per((b.inserted + b.updated + b.deleted - a.inserted - a.updated - a.deleted) as f64),
        per((b.inserted - a.inserted) as f64),
        per((b.updated - a.updated) as f64),
        per((b.deleted - a.deleted) as f64),
        secs
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Inserts `apps` apps with a ready, active version 1 straight into the
/// store (the deploy pipeline is not what is measured).
async fn populate(s: &TestServer, apps: u32) {
    let pool = s.store.pool();
    let org: (i64,) = sqlx::query_as("SELECT id FROM orgs WHERE name = 'acme'")
        .fetch_one(pool)
        .await
        .unwrap();
    let config = stead_api::AppConfig::from_stead_toml(
        "name = \"bench\"\n[run]\nstart = \"./server\"\nport = 8000\n[resources]\nmemory_mb = 64\n[scale]\nmin = 5\nmax = 20\n",
    )
    .unwrap();
    let now = now_ms();
    let artifact = "a".repeat(64);
    for chunk in (0..apps).collect::<Vec<_>>().chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| format!("('app{i:05}', {}, 1, 1, {PER_APP}, 20, {now})", org.0))
            .collect();
        sqlx::raw_sql(&format!(
            "INSERT INTO apps (name, org_id, active_version, last_version, min_instances, max_instances, created_at) VALUES {}",
            values.join(", ")
        ))
        .execute(pool)
        .await
        .unwrap();
    }
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, name FROM apps")
        .fetch_all(pool)
        .await
        .unwrap();
    for chunk in rows.chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|(id, name)| {
                let mut c = config.clone();
                c.name = name.clone();
                let text = serde_json::to_string(&c).unwrap().replace('\'', "''");
                format!("({id}, 1, 'ready', 'bundle', 0, '{artifact}', '{text}', {now}, 1)")
            })
            .collect();
        sqlx::raw_sql(&format!(
            "INSERT INTO versions (app_id, number, state, bundle_hash, bundle_size, artifact_hash, config, created_at, ever_ready) VALUES {}",
            values.join(", ")
        ))
        .execute(pool)
        .await
        .unwrap();
    }
    let _ = sqlx::raw_sql("ANALYZE").execute(pool).await;
}

async fn scale(s: &TestServer, app: &str, min: u32) {
    scale_to(s, app, json!({"min": min})).await
}

/// Lowering `min` alone waits out the autoscaler's scale-down delay (by
/// design); clamping with `max` applies at once, so that is the change
/// measured for stopping an instance.
async fn scale_to(s: &TestServer, app: &str, body: serde_json::Value) {
    let (st, v) = send(
        s.user(Method::POST, &format!("/v1/apps/{app}/scale"))
            .json(&body),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "scale {app} {body}: {v}");
}

async fn run_size(instances: u32, changes: usize, window: Duration) {
    let apps = instances / PER_APP;
    let hosts = (instances / PER_HOST).max(2);
    println!(
        "\n== {instances} instances: {hosts} hosts, {apps} apps ({PER_APP} instances each); load {}",
        uptime()
    );
    // The initial flood (every host reporting its whole share of new
    // instances at once, each a transaction of events and executors per
    // instance) takes longer than the default 30 s host timeout at 50,000
    // instances; what is measured is the steady state after it, so hosts
    // are given longer before they are judged dead.
    let s = common::start_with(Db::Postgres, |c| {
        c.host_timeout = Duration::from_secs(env_or("STEAD_BENCH_HOST_TIMEOUT_S", 600))
    })
    .await;
    let t = Instant::now();
    populate(&s, apps).await;
    println!("populated the store in {:.1} s", t.elapsed().as_secs_f64());
    let mut stat_conn: sqlx::PgConnection = {
        use sqlx::Connection;
        let url = s.db_url.clone();
        sqlx::PgConnection::connect(&url).await.unwrap()
    };

    let acked = Arc::new(Acked::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    let t = Instant::now();
    for h in 0..hosts {
        tasks.push(tokio::spawn(fake_host(
            s.base.clone(),
            s.host.clone(),
            format!("host-{h:03}"),
            acked.clone(),
            stop.clone(),
        )));
    }
    let target = u64::from(apps * PER_APP);
    let converged = acked
        .wait(Duration::from_secs(1200), |a| {
            a.total_ready.load(Ordering::Relaxed) >= target
        })
        .await;
    let Some(converged) = converged else {
        panic!(
            "only {} of {target} instances ready and acknowledged after {:.0} s ({} heartbeat errors)",
            acked.total_ready.load(Ordering::Relaxed),
            t.elapsed().as_secs_f64(),
            acked.errors.load(Ordering::Relaxed)
        );
    };
    println!(
        "initial placement: every host started and reported its share in {:.2} s ({} heartbeats, {} errors)",
        converged.as_secs_f64(),
        acked.heartbeats.load(Ordering::Relaxed),
        acked.errors.load(Ordering::Relaxed)
    );
    // Let the last acknowledgements and their follow-up passes settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Steady state: nothing changes.
    let hb0 = acked.heartbeats.load(Ordering::Relaxed);
    let a = stats(&mut stat_conn).await;
    tokio::time::sleep(window).await;
    let b = stats(&mut stat_conn).await;
    let hb = acked.heartbeats.load(Ordering::Relaxed) - hb0;
    println!(
        "steady, no changes: {}; {:.0} heartbeats/s; load {}",
        rates(&a, &b),
        hb as f64 / window.as_secs_f64(),
        uptime()
    );

    // Steady low rate of changes: 2 per second, alternating +1/-1 on
    // distinct apps, not waiting for them to be enacted.
    let names: Vec<String> = (0..apps).map(|i| format!("app{i:05}")).collect();
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let a = stats(&mut stat_conn).await;
    let t = Instant::now();
    let mut raised: Vec<String> = Vec::new();
    let mut made = 0u32;
    while t.elapsed() < window {
        let app = names[next(names.len())].clone();
        scale(&s, &app, PER_APP + 1).await;
        raised.push(app);
        made += 1;
        if let Some(prev) = (raised.len() > 4).then(|| raised.remove(0)) {
            scale_to(&s, &prev, json!({"min": PER_APP, "max": PER_APP})).await;
            scale_to(&s, &prev, json!({"max": 20})).await;
            made += 2;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let b = stats(&mut stat_conn).await;
    println!(
        "steady, {:.1} changes/s: {}; load {}",
        f64::from(made) / t.elapsed().as_secs_f64(),
        rates(&a, &b),
        uptime()
    );
    for app in raised.drain(..) {
        scale_to(&s, &app, json!({"min": PER_APP, "max": PER_APP})).await;
        scale_to(&s, &app, json!({"max": 20})).await;
    }
    let _ = acked
        .wait(Duration::from_secs(60), |a| {
            a.total_ready.load(Ordering::Relaxed) == target
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Enactment: one change at a time.
    let mut up = Vec::new();
    let mut down = Vec::new();
    for _ in 0..changes {
        let mut app = names[next(names.len())].clone();
        // An app still scaling down from the low-rate phase is skipped.
        for _ in 0..100 {
            if acked.get(&app) == (PER_APP, PER_APP) {
                break;
            }
            app = names[next(names.len())].clone();
        }
        let before = acked.get(&app);
        assert_eq!(before.0, PER_APP, "{app} has {before:?} before the change");
        let t0 = Instant::now();
        scale(&s, &app, PER_APP + 1).await;
        let waited = acked
            .wait(Duration::from_secs(60), |a| a.get(&app).1 == PER_APP + 1)
            .await;
        match waited {
            Some(_) => up.push(t0.elapsed().as_secs_f64()),
            None => panic!("scaling {app} up was not enacted within 60 s"),
        }
        let t0 = Instant::now();
        scale_to(&s, &app, json!({"min": PER_APP, "max": PER_APP})).await;
        let waited = acked
            .wait(Duration::from_secs(60), |a| a.get(&app).0 == PER_APP)
            .await;
        match waited {
            Some(_) => down.push(t0.elapsed().as_secs_f64()),
            None => panic!("scaling {app} down was not enacted within 60 s"),
        }
        scale_to(&s, &app, json!({"max": 20})).await;
    }
    for (what, v) in [
        ("up (+1 instance)", &mut up),
        ("down (-1 instance)", &mut down),
    ] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "enactment {what}: n {}, median {:.3} s, p95 {:.3} s, p99 {:.3} s, max {:.3} s",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.95),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!(
        "heartbeat errors: {}; load {}",
        acked.errors.load(Ordering::Relaxed),
        uptime()
    );
    stop.notify_waiters();
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn bench_scale() {
    install_counter();
    let sizes: Vec<u32> = std::env::var("STEAD_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,5000,10000,50000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let changes = env_or("STEAD_BENCH_CHANGES", 60usize);
    let window = Duration::from_secs(env_or("STEAD_BENCH_WINDOW_S", 20u64));
    println!(
        "control-plane scale benchmark: sizes {sizes:?}, {changes} changes each, {} s windows, {} cores",
        window.as_secs(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    for n in sizes {
        run_size(n, changes, window).await;
    }
}
