//! What the agent measures: its instances' CPU (the autoscaler's CPU
//! signal, sent with heartbeats), their connections, heartbeats and
//! drains; and `GET /metrics` in Prometheus format on an optional listen
//! address.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::decide::{Action, Phase};
use crate::traffic::{ConnTracker, Drained};
use crate::Shared;

/// CPU is sampled for heartbeats at most this often, so each sample spans
/// about a second whatever the heartbeat rate.
const CPU_PERIOD: Duration = Duration::from_millis(900);

/// The agent's measurements and counters (one per agent).
pub(crate) struct Telemetry {
    /// Numbers each observation sent in a heartbeat.
    observe_seq: AtomicU64,
    /// The highest observation number the control plane acknowledged.
    pub acked: watch::Sender<u64>,
    /// Connection trackers of the instances' endpoints, by instance id.
    trackers: Mutex<HashMap<String, Arc<ConnTracker>>>,
    cpu: Mutex<CpuState>,
    heartbeats_ok: AtomicU64,
    heartbeats_failed: AtomicU64,
    heartbeat_us: AtomicU64,
    starts: AtomicU64,
    stops: AtomicU64,
    drains_clean: AtomicU64,
    drains_timed_out: AtomicU64,
}

#[derive(Default)]
struct CpuState {
    at: Option<Instant>,
    /// Last reading per instance: µs of CPU used.
    usage: HashMap<String, u64>,
    /// Last computed cores per instance (for /metrics).
    cores: HashMap<String, f64>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            observe_seq: AtomicU64::new(0),
            acked: watch::channel(0).0,
            trackers: Mutex::new(HashMap::new()),
            cpu: Mutex::new(CpuState::default()),
            heartbeats_ok: AtomicU64::new(0),
            heartbeats_failed: AtomicU64::new(0),
            heartbeat_us: AtomicU64::new(0),
            starts: AtomicU64::new(0),
            stops: AtomicU64::new(0),
            drains_clean: AtomicU64::new(0),
            drains_timed_out: AtomicU64::new(0),
        }
    }
}

impl Telemetry {
    /// The number of the observation about to be taken; an instance marked
    /// stopping before this call is reported as such by that observation.
    pub fn next_observation(&self) -> u64 {
        self.observe_seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The current observation number (see [`crate::traffic::drain`]).
    pub fn observation_mark(&self) -> u64 {
        self.observe_seq.load(Ordering::SeqCst)
    }

    /// The control plane answered the heartbeat carrying observation `seq`.
    pub fn heartbeat_ok(&self, seq: u64, took: Duration) {
        self.heartbeats_ok.fetch_add(1, Ordering::Relaxed);
        self.heartbeat_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.acked.send_if_modified(|a| {
            if seq > *a {
                *a = seq;
                true
            } else {
                false
            }
        });
    }

    pub fn heartbeat_failed(&self) {
        self.heartbeats_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_action(&self, action: &Action) {
        match action {
            Action::Start { .. } => self.starts.fetch_add(1, Ordering::Relaxed),
            Action::Stop { .. } => self.stops.fetch_add(1, Ordering::Relaxed),
            Action::Forget { .. } => 0,
        };
    }

    pub fn count_drain(&self, d: Drained) {
        match d {
            Drained::Clean => self.drains_clean.fetch_add(1, Ordering::Relaxed),
            Drained::TimedOut { .. } => self.drains_timed_out.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// The connection tracker of instance `id`'s endpoint.
    pub fn tracker(&self, id: &str) -> Arc<ConnTracker> {
        let mut t = self.trackers.lock().unwrap_or_else(|p| p.into_inner());
        t.entry(id.to_string()).or_default().clone()
    }

    /// Forgets what is kept about instances no longer known.
    pub fn retain(&self, known: &dyn Fn(&str) -> bool) {
        self.trackers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| known(id));
        let mut cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        cpu.usage.retain(|id, _| known(id));
        cpu.cores.retain(|id, _| known(id));
    }
}

/// CPU used by each running instance since the previous sample, in
/// thousandths of a core, and the period it covers; empty when the last
/// sample is too recent (heartbeats can come faster than once a second).
pub(crate) async fn sample_cpu(shared: &Shared) -> (BTreeMap<String, u32>, u64) {
    let now = Instant::now();
    {
        let cpu = shared
            .telemetry
            .cpu
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cpu.at.is_some_and(|at| now.duration_since(at) < CPU_PERIOD) {
            return (BTreeMap::new(), 0);
        }
    }
    let processes: Vec<(String, Arc<stead_sandbox::SandboxProcess>)> = {
        let instances = shared.instances.lock().await;
        instances
            .values()
            .filter(|i| !matches!(i.phase, Phase::Exited { .. }))
            .filter_map(|i| i.process.clone().map(|p| (i.id.clone(), p)))
            .collect()
    };
    // Reading /proc or cgroup files is quick but blocking.
    let readings = tokio::task::spawn_blocking(move || {
        processes
            .into_iter()
            .filter_map(|(id, p)| p.cpu_usage_usec().map(|u| (id, u)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut cpu = shared
        .telemetry
        .cpu
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let period = cpu.at.map(|at| now.duration_since(at));
    cpu.at = Some(now);
    let mut out = BTreeMap::new();
    let mut usage = HashMap::new();
    for (id, used) in readings {
        if let (Some(period), Some(prev)) = (period, cpu.usage.get(&id)) {
            let period_us = period.as_micros().max(1) as f64;
            let cores = used.saturating_sub(*prev) as f64 / period_us;
            cpu.cores.insert(id.clone(), cores);
            out.insert(
                id.clone(),
                (cores * 1000.0).round().min(f64::from(u32::MAX)) as u32,
            );
        }
        usage.insert(id, used);
    }
    cpu.usage = usage;
    let period_ms = period.map_or(0, |p| u64::try_from(p.as_millis()).unwrap_or(u64::MAX));
    (out, period_ms)
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One instance in `/metrics`: id, app, version, state, process.
type Row = (
    String,
    String,
    u32,
    &'static str,
    Option<Arc<stead_sandbox::SandboxProcess>>,
);

/// The Prometheus text for this agent.
pub(crate) async fn render(shared: &Shared) -> String {
    let t = &shared.telemetry;
    let mut out = String::with_capacity(2048);
    let counter = |out: &mut String, name: &str, help: &str, values: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in values {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counter(
        &mut out,
        "stead_agent_heartbeats_total",
        "Heartbeats sent to the control plane, by result.",
        &[
            ("{result=\"ok\"}", ld(&t.heartbeats_ok)),
            ("{result=\"error\"}", ld(&t.heartbeats_failed)),
        ],
    );
    let _ = writeln!(
        out,
        "# HELP stead_agent_heartbeat_seconds_total Time heartbeats took, long-poll waits included.\n\
         # TYPE stead_agent_heartbeat_seconds_total counter\nstead_agent_heartbeat_seconds_total {:.6}",
        ld(&t.heartbeat_us) as f64 / 1e6
    );
    counter(
        &mut out,
        "stead_agent_instance_actions_total",
        "Instances started and stopped by the resolving loop.",
        &[
            ("{action=\"start\"}", ld(&t.starts)),
            ("{action=\"stop\"}", ld(&t.stops)),
        ],
    );
    counter(
        &mut out,
        "stead_agent_drains_total",
        "Instances drained before being stopped, by whether their requests finished in time.",
        &[
            ("{result=\"clean\"}", ld(&t.drains_clean)),
            ("{result=\"timed_out\"}", ld(&t.drains_timed_out)),
        ],
    );
    let rows: Vec<Row> = {
        let instances = shared.instances.lock().await;
        instances
            .values()
            .map(|i| {
                let state = match i.phase {
                    Phase::Starting => "starting",
                    Phase::Ready => "ready",
                    Phase::Unhealthy { .. } => "unhealthy",
                    Phase::Stopping => "stopping",
                    Phase::Exited { .. } => "exited",
                };
                (
                    i.id.clone(),
                    i.app.clone(),
                    i.version,
                    state,
                    i.process.clone(),
                )
            })
            .collect()
    };
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &rows {
        *by_state.entry(r.3).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP stead_agent_instances Instances on this host, by state.\n# TYPE stead_agent_instances gauge"
    );
    for state in ["starting", "ready", "unhealthy", "stopping", "exited"] {
        let _ = writeln!(
            out,
            "stead_agent_instances{{state=\"{state}\"}} {}",
            by_state.get(state).copied().unwrap_or(0)
        );
    }
    let cores: HashMap<String, f64> = t
        .cpu
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .cores
        .clone();
    let mut conns = String::new();
    let mut busy = String::new();
    let mut accepted = String::new();
    let mut mem = String::new();
    let mut cpu = String::new();
    for (id, app, version, _, process) in &rows {
        let labels = format!(
            "{{app=\"{}\",version=\"{version}\",instance=\"{}\"}}",
            escape(app),
            escape(id)
        );
        let tracker = t.tracker(id);
        let _ = writeln!(
            conns,
            "stead_agent_instance_connections{labels} {}",
            tracker.open()
        );
        let _ = writeln!(
            busy,
            "stead_agent_instance_busy_connections{labels} {}",
            tracker.busy()
        );
        let _ = writeln!(
            accepted,
            "stead_agent_instance_connections_total{labels} {}",
            tracker.accepted.load(Ordering::Relaxed)
        );
        if let Some(m) = process.as_ref().and_then(|p| p.memory_usage_bytes()) {
            let _ = writeln!(mem, "stead_agent_instance_memory_bytes{labels} {m}");
        }
        if let Some(c) = cores.get(id) {
            let _ = writeln!(cpu, "stead_agent_instance_cpu_cores{labels} {c:.4}");
        }
    }
    for (name, kind, help, body) in [
        (
            "stead_agent_instance_connections",
            "gauge",
            "Connections open to the instance's endpoint.",
            conns,
        ),
        (
            "stead_agent_instance_busy_connections",
            "gauge",
            "Connections carrying a request.",
            busy,
        ),
        (
            "stead_agent_instance_connections_total",
            "counter",
            "Connections forwarded to the instance.",
            accepted,
        ),
        (
            "stead_agent_instance_memory_bytes",
            "gauge",
            "Memory charged to the instance's cgroup.",
            mem,
        ),
        (
            "stead_agent_instance_cpu_cores",
            "gauge",
            "CPU used by the instance over the last sample, in cores.",
            cpu,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        out.push_str(&body);
    }
    out
}

/// Serves `GET /metrics` on `listener` until aborted. A deliberately small
/// HTTP/1.1 responder (one request per connection): the agent has no other
/// HTTP server, and scrapers need nothing more.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            let read = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read).await,
                Ok(true)
            ) {
                return;
            }
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = if (method == "GET" || method == "HEAD")
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    render(&shared).await,
                )
            } else {
                (
                    "404 Not Found",
                    "application/json",
                    "{\"error\":\"not_found\",\"message\":\"the agent serves only GET /metrics\"}"
                        .to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                if method == "HEAD" { "" } else { body.as_str() }
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// Binds the metrics listener, logging where it serves.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr).await?;
    tracing::info!(addr = %l.local_addr()?, "agent metrics at /metrics");
    Ok(l)
}
