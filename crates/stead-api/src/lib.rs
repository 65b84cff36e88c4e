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

pub use config::{AppConfig, ConfigError};

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
    /// `alive` while heartbeats arrive, `dead` after they stop.
    pub state: String,
    pub last_heartbeat_ms: i64,
    pub capacity: HostCapacity,
    pub instances: u32,
    pub backends: Vec<String>,
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
}

/// What the control plane wants on one host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Default)]
pub struct IntendedHostState {
    pub apps: Vec<IntendedApp>,
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
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct HeartbeatResponse {
    pub intended: IntendedHostState,
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
