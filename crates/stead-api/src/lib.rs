//! The contract between Stead's components.
//!
//! Every component talks to the control plane over HTTP/JSON under `/v1`; these
//! types are that wire format, so the server, the agents, the router and the
//! CLI cannot drift apart. The app config (`stead.toml`, or a DBOS
//! `dbos-config.yaml`) lives here too because both the CLI (to name the app
//! before uploading) and the server (authoritatively, from the bundle) parse it.

pub mod config;
pub mod names;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use config::{AppConfig, ConfigError, ScalingConfig};

/// Header carrying the client's idempotency key for a deploy, so that a CLI
/// retrying after a control-plane crash gets the version it already created
/// instead of a second one.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Response header the router adds so clients (and `stead deploy`) can tell
/// which version answered.
pub const VERSION_HEADER: &str = "x-stead-version";
/// Response header naming the instance that answered.
pub const INSTANCE_HEADER: &str = "x-stead-instance";
/// Request id header set (or propagated) by the router.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Every error body the server and the router send: one line of JSON.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ErrorBody {
    /// Machine-readable error kind, e.g. `not_found`, `invalid_bundle`.
    pub error: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

// ---------------------------------------------------------------- identity

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WhoAmI {
    pub org: String,
    pub user: Option<String>,
    /// `user` or `host`.
    pub kind: TokenKind,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A person (or CI) acting for one organisation.
    User,
    /// A data-plane agent or router: sees intended state of every org, but
    /// cannot use the user API.
    Host,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ServerInfo {
    pub version: String,
    /// Base URL of a router in front of the apps, when the server knows one
    /// (`stead dev` does); the CLI uses it to check a deploy answers.
    pub router_url: Option<String>,
    /// Domain under which apps are served as `<app>.<domain>`.
    pub domain: String,
    pub database: String,
    /// This control-plane replica's name.
    #[serde(default)]
    pub replica: String,
    /// The replica that runs the durable-execution loop (recovery, sweep,
    /// drain readings, rollouts) now, if any holds its lease.
    #[serde(default)]
    pub durable_execution_replica: Option<String>,
}

// ---------------------------------------------------------------- apps

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    /// Bundle stored, build task queued or running.
    Building,
    /// Built (and migrated); can be made active at any time.
    Ready,
    /// The build or a migration failed; never becomes active.
    Failed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Building => "building",
            VersionState::Ready => "ready",
            VersionState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "building" => Some(Self::Building),
            "ready" => Some(Self::Ready),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AppSummary {
    pub name: String,
    pub active_version: Option<u32>,
    pub latest_version: Option<u32>,
    pub ready_instances: u32,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ScaleSettings {
    pub min: u32,
    pub max: u32,
}

/// What the autoscaler decided for an app, and why (`stead apps status`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct ScaleStatus {
    /// Instances of the active version the app should run now.
    pub desired: u32,
    /// Ready instances of the active version.
    pub ready: u32,
    /// One line: e.g. `3 instances: 250 in-flight / target 100`.
    pub reason: String,
    /// Requests in flight at the routers, averaged over the stable window.
    pub in_flight: f64,
    /// Requests in flight averaged over the (short) panic window.
    pub in_flight_burst: f64,
    /// Requests per second over the stable window.
    pub requests_per_s: f64,
    /// CPU used by the app's instances, in cores, over the stable window.
    pub cpu_cores: f64,
    /// DBOS workflows ENQUEUED or PENDING, as the agents last reported.
    pub queued_workflows: u64,
    /// Reacting to a burst: not scaling down until the burst has passed.
    pub panic: bool,
    /// Milliseconds since the app last had a request (or a deploy), when known.
    pub idle_ms: Option<i64>,
    /// Requests in flight per instance, as the routers last reported.
    #[serde(default)]
    pub in_flight_by_instance: BTreeMap<String, u64>,
    /// The autoscaler's targets and the router's per-app limits in effect
    /// (stead.toml's, or what `stead scale` set since the last deploy).
    #[serde(default)]
    pub settings: ScalingConfig,
}

/// Changes to an app's scale (`POST /v1/apps/{app}/scale`, `stead scale`).
/// Absent fields keep their value. Everything but `min`/`max` holds until
/// the next deploy, which applies its stead.toml again (as it does for
/// `min`/`max`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct ScaleRequest {
    #[serde(default)]
    pub min: Option<u32>,
    #[serde(default)]
    pub max: Option<u32>,
    #[serde(default)]
    pub target_concurrency: Option<u32>,
    /// Percent of one core per instance; 0 disables CPU-based scaling.
    #[serde(default)]
    pub target_cpu_percent: Option<u32>,
    /// 0 disables scaling to zero.
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    #[serde(default)]
    pub stable_window_ms: Option<u64>,
    #[serde(default)]
    pub panic_window_ms: Option<u64>,
    #[serde(default)]
    pub scale_down_delay_ms: Option<u64>,
    /// 0 removes the limit.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// 0 removes the limit.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AppStatus {
    pub name: String,
    pub org: String,
    /// The version new requests go to.
    pub active_version: Option<u32>,
    /// A version being started to replace the active one (after a deploy
    /// or rollback); it becomes active once one of its instances is ready.
    #[serde(default)]
    pub target_version: Option<u32>,
    pub latest_version: Option<u32>,
    pub scale: ScaleSettings,
    pub instances: Vec<InstanceInfo>,
    /// Where the app is served, when the server knows its router.
    pub url: Option<String>,
    pub created_at_ms: i64,
    /// The rollout in progress or last finished, if any.
    #[serde(default)]
    pub rollout: Option<RolloutInfo>,
    /// The autoscaler's current decision and its reason.
    #[serde(default)]
    pub autoscale: Option<ScaleStatus>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Process started, health check not yet passed.
    Starting,
    /// Passing its health check; receives traffic if its version is active.
    Ready,
    /// No new traffic; will be stopped (SIGTERM, grace, SIGKILL).
    Stopping,
    /// Process gone.
    Exited,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Stopping => "stopping",
            InstanceState::Exited => "exited",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "starting" => Some(Self::Starting),
            "ready" => Some(Self::Ready),
            "stopping" => Some(Self::Stopping),
            "exited" => Some(Self::Exited),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct InstanceInfo {
    pub id: String,
    pub app: String,
    pub version: u32,
    /// Host name of the agent running it.
    pub host: String,
    pub state: InstanceState,
    /// `DBOS__VMID` given to the instance.
    pub executor_id: String,
    /// `ip:port` the router connects to.
    pub endpoint: Option<String>,
    pub started_at_ms: i64,
    /// Why it exited, when it did.
    pub exit: Option<String>,
    /// Host pid of the sandbox's init (killing it kills the instance).
    #[serde(default)]
    pub pid: Option<u32>,
    /// It runs the DBOS admin server.
    #[serde(default)]
    pub dbos_admin: bool,
    #[serde(default)]
    pub host_id: String,
    /// Last heartbeat of its host (epoch ms): a stale one means the host
    /// may be gone.
    #[serde(default)]
    pub host_heartbeat_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VersionInfo {
    pub app: String,
    pub number: u32,
    pub state: VersionState,
    pub bundle_hash: String,
    pub bundle_size: u64,
    pub artifact_hash: Option<String>,
    /// The build's error, when it failed.
    pub error: Option<String>,
    pub active: bool,
    pub created_at_ms: i64,
    /// The app config recorded with this version.
    pub config: AppConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DeployResponse {
    pub app: String,
    pub version: u32,
    pub bundle_hash: String,
    pub build_id: i64,
    /// True when this answer replays an earlier request with the same
    /// idempotency key.
    pub replayed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct RollbackRequest {
    /// Version to make active; default the one before the active one.
    pub version: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Lines written by the platform itself about this build or instance.
    System,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stdout" => Some(Self::Stdout),
            "stderr" => Some(Self::Stderr),
            "system" => Some(Self::System),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BuildLogLine {
    pub seq: i64,
    pub ts_ms: i64,
    pub stream: LogStream,
    pub line: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BuildLogPage {
    pub version: u32,
    pub state: VersionState,
    pub error: Option<String>,
    pub lines: Vec<BuildLogLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct EnvVar {
    pub key: String,
    /// The value; for secrets only a mask (`****` plus the last two
    /// characters when the value is long enough).
    pub value: String,
    pub secret: bool,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct EnvSetRequest {
    pub vars: BTreeMap<String, String>,
    #[serde(default)]
    pub secret: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct LogLine {
    pub seq: i64,
    pub ts_ms: i64,
    pub app: String,
    pub version: u32,
    pub instance: String,
    pub host: String,
    pub stream: LogStream,
    pub line: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    pub seq: i64,
    pub ts_ms: i64,
    pub app: String,
    /// e.g. `deploy`, `build_started`, `build_succeeded`, `build_failed`,
    /// `activated`, `rollback`, `instance_started`, `instance_exited`.
    pub kind: String,
    pub message: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

// ---------------------------------------------------------------- hosts

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HostInfo {
    pub id: String,
    pub name: String,
    /// `alive` while heartbeats arrive, `draining` while alive and drained
    /// (`stead hosts drain`), `dead` after heartbeats stop.
    pub state: String,
    pub last_heartbeat_ms: i64,
    pub capacity: HostCapacity,
    /// Instances that run there (not exited, not fenced).
    pub instances: u32,
    pub backends: Vec<String>,
    /// Gets no new instances; what runs there is replaced elsewhere.
    #[serde(default)]
    pub draining: bool,
    /// Stale instances its agent still reports after the host came back
    /// from being judged dead; they are being stopped.
    #[serde(default)]
    pub fenced: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct HostCapacity {
    pub memory_mb: u64,
    pub cpus: u32,
}

// ---------------------------------------------------------------- agent API

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RegisterRequest {
    /// Stable host name; re-registering with the same name keeps the host id.
    pub name: String,
    pub capacity: HostCapacity,
    pub backends: Vec<String>,
    pub agent_version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RegisterResponse {
    pub host_id: String,
    /// Identifies this run of the agent; build leases held by an earlier
    /// session of the same host are released at once.
    pub session: String,
}

/// What an agent sees on its host, sent with every heartbeat (level
/// triggered: the whole picture, every time).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HeartbeatRequest {
    pub host_id: String,
    pub session: String,
    pub instances: Vec<ObservedInstance>,
    /// Long-poll: when the intended state's `etag` is still `known`, the
    /// server holds the answer up to this many milliseconds (at most 30 s)
    /// until it changes, so agents learn of changes at once without
    /// polling fast. 0 answers at once.
    #[serde(default)]
    pub wait_ms: u64,
    /// The `etag` of the intended state the agent acts on.
    #[serde(default)]
    pub known: Option<String>,
    /// CPU used by each instance (by id) since the previous heartbeat, in
    /// thousandths of a core: the autoscaler's CPU signal.
    #[serde(default)]
    pub cpu_millis: BTreeMap<String, u32>,
    /// The period `cpu_millis` was measured over, in milliseconds.
    #[serde(default)]
    pub cpu_period_ms: u64,
    /// DBOS workflows ENQUEUED or PENDING per app (by name), for the apps
    /// whose system database this agent reads. An app with queued work is
    /// never scaled to zero. Apps not listed count as 0.
    #[serde(default)]
    pub queued_workflows: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ObservedInstance {
    pub id: String,
    pub app: String,
    pub version: u32,
    pub state: InstanceState,
    pub executor_id: String,
    pub endpoint: Option<String>,
    pub pid: Option<u32>,
    pub started_at_ms: i64,
    pub exit: Option<String>,
    /// The instance answers the DBOS admin health check on its admin port.
    #[serde(default)]
    pub dbos_admin: bool,
}

/// What the control plane wants on one host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct IntendedHostState {
    pub apps: Vec<IntendedApp>,
    /// Instances this host must stop at once, whatever `apps` says: they
    /// are stale (fenced), because the host was judged dead and what they
    /// stood for was placed elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<String>,
}

/// `count` instances of `version` of `app` on this host. A version that is
/// running here but absent from the list is to be stopped.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct IntendedApp {
    pub app: String,
    pub app_id: String,
    pub version: u32,
    pub count: u32,
    pub artifact_hash: String,
    pub run: RunSpec,
    /// Environment (secrets decrypted) for the instances.
    pub env: BTreeMap<String, String>,
    /// Host services (`host:port`) the agent makes reachable inside the
    /// instance at `127.0.0.1:<same port>`: the app's own database.
    #[serde(default)]
    pub expose: Vec<String>,
    /// An old version kept running only to finish its workflows: the
    /// agent must not stop its live instances.
    #[serde(default)]
    pub draining: bool,
    /// Dead executors whose workflows a ready instance of this version on
    /// this host must recover through the DBOS admin endpoint.
    #[serde(default)]
    pub recover_via_admin: Vec<String>,
    /// Executor ids of dead instances that new instances of this version
    /// must take over (recovery by restarting with the same executor id).
    #[serde(default)]
    pub reuse_executor_ids: Vec<String>,
}

/// How to run one version: what the agent needs besides the artifact.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RunSpec {
    pub start: String,
    pub port: Option<u16>,
    pub health: Option<String>,
    pub memory_mb: u64,
    /// Seconds between SIGTERM and SIGKILL when stopping.
    pub grace_s: u32,
    #[serde(default)]
    pub language: Option<String>,
    /// Seconds of failed health checks before the instance is replaced.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_s: u32,
    /// DBOS admin port to probe (`/dbos-healthz`), if any.
    #[serde(default)]
    pub admin_port: Option<u16>,
    /// `[dbos] recovery` (`auto`, `admin`, `database`, `executor-id`,
    /// `none`): with `auto` or `admin`, an agent that sees an instance
    /// running the admin server die recovers its workflows through the
    /// replacement's admin endpoint as soon as that answers.
    #[serde(default)]
    pub recovery: Option<String>,
}

fn default_health_timeout() -> u32 {
    config::DEFAULT_HEALTH_TIMEOUT_S
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HeartbeatResponse {
    pub intended: IntendedHostState,
    /// Identifies this intended state; send it back as `known` to long-poll.
    #[serde(default)]
    pub etag: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ClaimRequest {
    pub host_id: String,
    pub session: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BuildTask {
    pub id: i64,
    pub app: String,
    pub app_id: String,
    pub version: u32,
    pub bundle_hash: String,
    pub build: Vec<String>,
    pub migrate: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub memory_mb: u64,
    pub lease_expires_at_ms: i64,
    pub attempt: u32,
    #[serde(default)]
    pub language: Option<String>,
    /// `[build] cache`: folders kept between builds of the app on a host.
    #[serde(default)]
    pub cache: Vec<String>,
}

/// Sent by an agent after it recovered workflows of dead executors.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RecoveryReport {
    pub host_id: String,
    pub app: String,
    pub version: u32,
    pub executor_ids: Vec<String>,
    /// Workflow ids re-enqueued.
    pub workflows: Vec<String>,
    /// `admin` or `executor-id`.
    pub method: String,
    /// Instance that performed it.
    pub instance: String,
}

/// An app's databases, as `stead db status` shows them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AppDatabaseInfo {
    pub app: String,
    /// `sqlite` or `postgres`.
    pub kind: String,
    /// DBOS system database URL (password masked unless revealed).
    pub system_url: String,
    /// Application database URL (password masked unless revealed).
    pub app_url: String,
    /// Whether the control plane could open the system database now.
    pub reachable: bool,
    pub error: Option<String>,
    pub pending_workflows: u64,
    pub enqueued_workflows: u64,
}

/// One step of a multi-step rollout.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RolloutInfo {
    pub id: i64,
    pub app: String,
    pub versions: Vec<u32>,
    /// Index into `versions` of the step being promoted.
    pub step: u32,
    /// `running`, `done`, `failed`.
    pub state: String,
    pub message: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RolloutRequest {
    /// Ready (held) versions to promote, in order.
    pub versions: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ClaimResponse {
    pub task: Option<BuildTask>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct LeaseRequest {
    pub host_id: String,
    pub session: String,
}

/// Answer to a lease renewal: the build is still this session's until then.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct LeaseResponse {
    pub lease_expires_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BuildLogAppend {
    pub host_id: String,
    pub session: String,
    pub lines: Vec<NewLogLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NewLogLine {
    pub ts_ms: i64,
    pub stream: LogStream,
    pub line: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BuildComplete {
    pub host_id: String,
    pub session: String,
    /// Present on success: hash of the artifact already uploaded to
    /// `PUT /v1/blobs/{hash}`.
    pub artifact_hash: Option<String>,
    /// Present on failure: what failed, in the build's own words.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct InstanceLogBatch {
    pub host_id: String,
    pub lines: Vec<InstanceLogLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct InstanceLogLine {
    pub app: String,
    pub version: u32,
    pub instance: String,
    pub ts_ms: i64,
    pub stream: LogStream,
    pub line: String,
}

// ---------------------------------------------------------------- router

/// Everything the router needs: for each app, the ready instances of its
/// active version.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct RouteTable {
    pub apps: Vec<AppRoute>,
    /// Identifies this table: `GET /v1/routes?since=<etag>&wait_ms=N`
    /// answers once the table differs (long-poll).
    #[serde(default)]
    pub etag: Option<String>,
    /// Per-app traffic settings, by app name (apps not listed have none).
    #[serde(default)]
    pub limits: BTreeMap<String, AppLimits>,
}

/// What the router enforces and measures for one app.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct AppLimits {
    /// Requests in flight above this are answered 503 at once.
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// Request bodies above this are answered 413.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Requests in flight per instance the autoscaler aims at; the router
    /// reports demand early when an app goes past it, so bursts are seen
    /// within milliseconds rather than at the next report.
    #[serde(default)]
    pub target_concurrency: Option<u32>,
}

/// Demand a router measured, sent to `POST /v1/router/demand` about once a
/// second while apps are busy (nothing while all are idle) and at once when
/// a request arrives for an app without a ready instance (to wake it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct DemandReport {
    /// Identifies the router (stable for its lifetime).
    pub router: String,
    pub apps: Vec<AppDemand>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct AppDemand {
    pub app: String,
    /// Length of the period measured, ending now (0 for a wake-up).
    pub period_ms: u64,
    /// Requests in flight, averaged over the period.
    pub concurrency: f64,
    /// Most requests in flight at once during the period.
    pub peak: u64,
    /// Requests received during the period.
    pub requests: u64,
    /// Requests held now because the app has no ready instance.
    pub waiting: u64,
    /// Requests in flight per instance now.
    #[serde(default)]
    pub instances: Vec<InstanceDemand>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct InstanceDemand {
    pub instance: String,
    pub in_flight: u64,
}

/// Answer to a demand report.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct DemandAck {
    /// Some app's desired instance count changed because of it.
    pub changed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AppRoute {
    pub app: String,
    /// Active version; `None` when the app has never had a ready version.
    pub version: Option<u32>,
    pub endpoints: Vec<RouteEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RouteEndpoint {
    pub instance: String,
    /// `ip:port`.
    pub addr: String,
}

/// Masks a secret for display: never the whole value.
pub fn mask_secret(value: &str) -> String {
    let n = value.chars().count();
    if n >= 12 {
        let tail: String = value.chars().skip(n - 2).collect();
        format!("****{tail}")
    } else {
        "****".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_never_reveals_short_secrets() {
        assert_eq!(mask_secret("abc"), "****");
        assert_eq!(mask_secret("0123456789ab"), "****ab");
        assert!(!mask_secret("supersecretvalue").contains("secret"));
    }

    #[test]
    fn states_round_trip() {
        for s in [
            InstanceState::Starting,
            InstanceState::Ready,
            InstanceState::Stopping,
            InstanceState::Exited,
        ] {
            assert_eq!(InstanceState::parse(s.as_str()), Some(s));
        }
        for s in [
            VersionState::Building,
            VersionState::Ready,
            VersionState::Failed,
        ] {
            assert_eq!(VersionState::parse(s.as_str()), Some(s));
        }
    }
}
