//! The user API: apps, deploys, versions, env, logs, events, hosts.

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use stead_api::{
    names, AppConfig, AppStatus, AppSummary, BuildLogPage, DeployResponse, EnvSetRequest, EnvVar,
    ErrorBody, Event, HostInfo, LogLine, RollbackRequest, ScaleSettings, ServerInfo, VersionInfo,
    VersionState, WhoAmI,
};
use stead_store::{AppRecord, NewVersion, StoreError};
use tokio::io::AsyncWriteExt;
use utoipa::IntoParams;

use crate::auth::{AnyAuth, UserAuth};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::AppState;

/// Longest a long-poll may wait.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Long-polls re-query at least this often, so writes made by another
/// control-plane replica (which cannot wake us) are seen promptly.
const POLL_EVERY: Duration = Duration::from_secs(1);

pub(crate) async fn load_app(
    state: &AppState,
    auth: &UserAuth,
    app: &str,
) -> Result<AppRecord, ApiError> {
    state
        .store
        .get_app(auth.org_id, app)
        .await?
        .ok_or_else(|| ApiError::app_not_found(app))
}

/// Waits until `check` returns something to answer with, a change is
/// signalled and the re-check answers, or the deadline passes (then the last
/// answer is returned).
async fn long_poll<T, F, Fut>(
    state: &AppState,
    wait_ms: Option<u64>,
    mut check: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(T, bool), ApiError>>,
{
    let deadline = Instant::now() + Duration::from_millis(wait_ms.unwrap_or(0)).min(MAX_WAIT);
    loop {
        let notified = state.changes.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (answer, done) = check().await?;
        let now = Instant::now();
        if done || now >= deadline || state.shutting_down.load(Ordering::SeqCst) {
            return Ok(answer);
        }
        let _ = tokio::time::timeout((deadline - now).min(POLL_EVERY), notified).await;
    }
}

#[utoipa::path(get, path = "/v1/health", tag = "meta",
    responses((status = 200, description = "The server is up", body = Object, example = json!({"status": "ok"}))))]
pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/v1/info", tag = "meta", security(("bearer" = [])),
    responses((status = 200, body = ServerInfo), (status = 401, body = ErrorBody)))]
pub(crate) async fn info(State(state): State<AppState>, _auth: AnyAuth) -> Json<ServerInfo> {
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        router_url: state.config.router_url.clone(),
        domain: state.config.domain.clone(),
        database: match state.store.backend() {
            stead_store::Backend::Sqlite => "sqlite".into(),
            stead_store::Backend::Postgres => "postgres".into(),
        },
        replica: state.replica.to_string(),
        durable_execution_replica: state
            .store
            .lease_holder(crate::dbos::LEASE)
            .await
            .ok()
            .flatten()
            .map(|(holder, _)| holder),
    })
}

#[utoipa::path(get, path = "/v1/whoami", tag = "meta", security(("bearer" = [])),
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
pub(crate) async fn whoami(AnyAuth(p): AnyAuth) -> Json<WhoAmI> {
    Json(WhoAmI {
        org: p.org.unwrap_or_default(),
        user: p.user,
        kind: p.kind,
    })
}

#[utoipa::path(get, path = "/v1/apps", tag = "apps", security(("bearer" = [])),
    responses((status = 200, body = Vec<AppSummary>), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_apps(
    State(state): State<AppState>,
    auth: UserAuth,
) -> Result<Json<Vec<AppSummary>>, ApiError> {
    Ok(Json(state.store.list_apps(auth.org_id).await?))
}

fn app_url(state: &AppState, app: &str) -> Option<String> {
    let router = state.config.router_url.as_deref()?;
    let (scheme, rest) = router.split_once("://").unwrap_or(("http", router));
    let authority = rest.split('/').next().unwrap_or("");
    let port = authority
        .rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map(|(_, p)| format!(":{p}"))
        .unwrap_or_default();
    Some(format!("{scheme}://{app}.{}{port}", state.config.domain))
}

pub(crate) async fn app_status(state: &AppState, app: &AppRecord) -> Result<AppStatus, ApiError> {
    let autoscale = crate::scaling::app_scale(state, app.id).await?;
    Ok(AppStatus {
        name: app.name.clone(),
        org: app.org.clone(),
        active_version: app.active_version,
        target_version: app.target_version,
        latest_version: app.latest_version,
        scale: ScaleSettings {
            min: app.min,
            max: app.max,
        },
        instances: state.store.app_instances(app.id).await?,
        url: app_url(state, &app.name),
        created_at_ms: app.created_at_ms,
        rollout: state
            .store
            .latest_rollout(app.id)
            .await?
            .map(|r| crate::workflows::rollout_info(&app.name, &r)),
        autoscale,
    })
}

#[utoipa::path(get, path = "/v1/apps/{app}", tag = "apps", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, body = AppStatus), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_app(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
) -> Result<Json<AppStatus>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    Ok(Json(app_status(&state, &rec).await?))
}

#[utoipa::path(delete, path = "/v1/apps/{app}", tag = "apps", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    responses((status = 204, description = "Deleted; its instances stop"), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_app(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if state.store.delete_app(auth.org_id, &app).await? {
        tracing::info!(app, org = auth.org, "app deleted");
        state.changed();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::app_not_found(&app))
    }
}

/// A temp file in the uploads folder, removed on drop unless kept.
pub(crate) struct Upload {
    file: tempfile::NamedTempFile,
    pub(crate) hash: String,
    pub(crate) size: u64,
}

impl Upload {
    pub(crate) fn path(&self) -> &std::path::Path {
        self.file.path()
    }
}

/// Streams a request body to a temp file while hashing and counting, and
/// stops (the temp file is removed) as soon as it exceeds `limit`.
pub(crate) async fn receive_upload(
    state: &AppState,
    body: Body,
    limit: u64,
    limit_msg: impl Fn(u64) -> String,
) -> Result<Upload, ApiError> {
    let file = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(state.uploads_dir())
        .map_err(|e| {
            ApiError::internal(format!("cannot create a temp file for the upload: {e}"))
        })?;
    let std_file = file
        .as_file()
        .try_clone()
        .map_err(|e| ApiError::internal(format!("cannot open the upload temp file: {e}")))?;
    let mut out = tokio::io::BufWriter::new(tokio::fs::File::from_std(std_file));
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request(
                "upload_failed",
                format!("the upload was interrupted: {e}; upload again"),
            )
        })?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                limit_msg(limit),
            ));
        }
        hasher.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("cannot write the upload to disk: {e}")))?;
    }
    out.flush()
        .await
        .map_err(|e| ApiError::internal(format!("cannot write the upload to disk: {e}")))?;
    Ok(Upload {
        file,
        hash: hex::encode(hasher.finalize()),
        size,
    })
}

/// Stops the process at a named point, so tests can prove that a crash
/// there loses nothing and half-writes nothing.
fn failpoint(name: &str) {
    if std::env::var("STEAD_FAILPOINT").ok().as_deref() == Some(name) {
        tracing::warn!(failpoint = name, "failpoint reached; exiting");
        std::process::exit(86);
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub(crate) struct DeployQuery {
    /// Build the version but do not promote it: a rollout will.
    #[serde(default)]
    hold: bool,
}

#[utoipa::path(post, path = "/v1/apps/{app}/deploy", tag = "apps", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name; overrides the name in the bundle's config"),
           ("idempotency-key" = Option<String>, Header, description = "Retrying with the same key returns the same version"),
           DeployQuery),
    request_body(content = Vec<u8>, content_type = "application/zstd", description = "The bundle: a tar archive compressed with zstd"),
    responses((status = 201, body = DeployResponse, description = "Version created, build queued"),
              (status = 200, body = DeployResponse, description = "Replay of an earlier deploy with the same idempotency key"),
              (status = 400, body = ErrorBody, description = "invalid_bundle, invalid_config"),
              (status = 409, body = ErrorBody, description = "name_taken"),
              (status = 413, body = ErrorBody)))]
pub(crate) async fn deploy(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeployQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<DeployResponse>), ApiError> {
    names::validate_app_name(&app).map_err(|m| ApiError::bad_request("invalid_name", m))?;
    let key = match headers.get(stead_api::IDEMPOTENCY_HEADER) {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= 200)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_request",
                        "the idempotency-key header must be 1 to 200 characters of text",
                    )
                })?;
            Some(k.to_string())
        }
    };
    if let Some(k) = &key {
        if let Some(prior) = state.store.find_deploy_key(auth.org_id, k).await? {
            if prior.app != app {
                return Err(ApiError::conflict(
                    "idempotency_conflict",
                    format!(
                        "idempotency key {k:?} was already used to deploy app {}; use a new key",
                        prior.app
                    ),
                ));
            }
            return Ok((StatusCode::OK, Json(prior)));
        }
    }
    if let Some(existing) = state.store.find_app(&app).await? {
        if existing.org_id != auth.org_id {
            return Err(StoreError::NameTaken(app).into());
        }
    }
    let limits = state.config.limits;
    let upload = receive_upload(&state, body, limits.max_compressed, |l| {
        format!(
            "the bundle for app {app} is larger than the server's limit of {} (max_compressed); \
             leave build output and dependencies out with .steadignore",
            mib(l)
        )
    })
    .await?;
    let path: PathBuf = upload.file.path().to_path_buf();
    let inspection = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path)?;
        Ok::<_, std::io::Error>(stead_bundle::inspect(
            BufReader::new(f),
            stead_bundle::Policy::Bundle,
            &limits,
        ))
    })
    .await
    .map_err(|e| ApiError::internal(format!("bundle check crashed: {e}")))?
    .map_err(|e| ApiError::internal(format!("cannot read the uploaded bundle back: {e}")))?
    .map_err(|e| {
        ApiError::bad_request(
            "invalid_bundle",
            format!("the bundle for app {app} was rejected: {e}"),
        )
    })?;
    let mut config = AppConfig::from_files(
        inspection.stead_toml.as_deref(),
        inspection.dbos_config.as_deref(),
    )
    .map_err(|e| ApiError::bad_request("invalid_config", format!("app {app}: {e}")))?;
    // The URL's name wins (`stead deploy --app NAME`); the config's name is
    // only the CLI's default.
    if config.name != app {
        tracing::info!(app, config_name = %config.name, "deploying under a name other than the config's");
        config.name = app.clone();
    }
    let data = tokio::fs::read(upload.file.path())
        .await
        .map_err(|e| ApiError::internal(format!("cannot read the uploaded bundle back: {e}")))?;
    state.store.put_blob(&upload.hash, &data).await?;
    drop(data);
    failpoint("after_upload");
    let outcome = state
        .store
        .create_version(&NewVersion {
            org_id: auth.org_id,
            bundle_hash: upload.hash.clone(),
            bundle_size: upload.size,
            config,
            idempotency_key: key,
            hold: query.hold,
        })
        .await?;
    failpoint("after_version");
    // The app's databases exist before its build runs its migrations.
    if let Some(rec) = state.store.find_app(&app).await? {
        crate::dbos::ensure_database(&state, rec.id, &app).await?;
    }
    let r = outcome.response;
    if r.replayed {
        return Ok((StatusCode::OK, Json(r)));
    }
    tracing::info!(app = r.app, version = r.version, build = r.build_id, org = auth.org, user = ?auth.user, "deployed");
    state.changed();
    Ok((StatusCode::CREATED, Json(r)))
}

#[utoipa::path(get, path = "/v1/apps/{app}/versions", tag = "versions", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, body = Vec<VersionInfo>, description = "Newest first"), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_versions(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
) -> Result<Json<Vec<VersionInfo>>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    Ok(Json(state.store.list_versions(rec.id).await?))
}

fn version_not_found(app: &str, n: u32) -> ApiError {
    ApiError::not_found(format!(
        "app {app} has no version {n}; run `stead versions {app}` to list them"
    ))
}

#[utoipa::path(get, path = "/v1/apps/{app}/versions/{n}", tag = "versions", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ("n" = u32, Path, description = "Version number")),
    responses((status = 200, body = VersionInfo), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_version(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath((app, n)): ApiPath<(String, u32)>,
) -> Result<Json<VersionInfo>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    state
        .store
        .get_version(rec.id, n)
        .await?
        .map(Json)
        .ok_or_else(|| version_not_found(&app, n))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PollQuery {
    /// Return only entries with a sequence number above this.
    after: Option<i64>,
    /// Wait up to this many milliseconds (at most 30000) for new entries.
    wait_ms: Option<u64>,
    /// Most entries to return.
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/apps/{app}/versions/{n}/build-log", tag = "versions", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ("n" = u32, Path, description = "Version number"), PollQuery),
    responses((status = 200, body = BuildLogPage), (status = 404, body = ErrorBody)))]
pub(crate) async fn build_log(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath((app, n)): ApiPath<(String, u32)>,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> Result<Json<BuildLogPage>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let page = long_poll(&state, q.wait_ms, || async {
        let v = state
            .store
            .get_version(rec.id, n)
            .await?
            .ok_or_else(|| version_not_found(&app, n))?;
        let lines = state.store.build_log(rec.id, n, after, limit).await?;
        let done = !lines.is_empty() || v.state != VersionState::Building;
        Ok((
            BuildLogPage {
                version: n,
                state: v.state,
                error: v.error,
                lines,
            },
            done,
        ))
    })
    .await?;
    Ok(Json(page))
}

#[utoipa::path(post, path = "/v1/apps/{app}/rollback", tag = "apps", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    request_body(content = RollbackRequest, description = "Empty body: the highest ready version below the active one"),
    responses((status = 200, body = AppStatus), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn rollback(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    body: Bytes,
) -> Result<Json<AppStatus>, ApiError> {
    let req: RollbackRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("the rollback request is not valid JSON: {e}"),
            )
        })?
    };
    let rec = load_app(&state, &auth, &app).await?;
    let v = state.store.rollback(rec.id, req.version).await?;
    tracing::info!(app, version = v, "rolled back");
    state.changed();
    let rec = load_app(&state, &auth, &app).await?;
    Ok(Json(app_status(&state, &rec).await?))
}

#[utoipa::path(get, path = "/v1/apps/{app}/env", tag = "env", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, body = Vec<EnvVar>, description = "Secrets are masked"), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_env(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
) -> Result<Json<Vec<EnvVar>>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    Ok(Json(state.store.list_env(rec.id).await?))
}

fn check_env_key(app: &str, key: &str) -> Result<(), ApiError> {
    names::validate_env_key(key)
        .map_err(|m| ApiError::bad_request("invalid_env", format!("app {app}: {m}")))?;
    if key.starts_with("STEAD_") || key.starts_with("DBOS__") || key == "PORT" {
        return Err(ApiError::bad_request(
            "reserved_env",
            format!("app {app}: {key} is reserved (the platform sets STEAD_*, DBOS__* and PORT itself); choose another name"),
        ));
    }
    Ok(())
}

#[utoipa::path(put, path = "/v1/apps/{app}/env", tag = "env", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    request_body = EnvSetRequest,
    responses((status = 200, body = Vec<EnvVar>, description = "All the app's variables after the change"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn set_env(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    ApiJson(req): ApiJson<EnvSetRequest>,
) -> Result<Json<Vec<EnvVar>>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    if req.vars.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_env",
            format!("app {app}: no variables given; pass KEY=VALUE"),
        ));
    }
    for (k, v) in &req.vars {
        check_env_key(&app, k)?;
        if v.len() > 64 * 1024 {
            return Err(ApiError::bad_request(
                "invalid_env",
                format!("app {app}: the value of {k} is longer than 64 KiB"),
            ));
        }
    }
    state.store.set_env(rec.id, &req.vars, req.secret).await?;
    state.changed();
    Ok(Json(state.store.list_env(rec.id).await?))
}

#[utoipa::path(delete, path = "/v1/apps/{app}/env/{key}", tag = "env", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ("key" = String, Path, description = "Variable name")),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)))]
pub(crate) async fn unset_env(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath((app, key)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    if state.store.unset_env(rec.id, &key).await? {
        state.changed();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "app {app} has no environment variable {key}; run `stead env {app}` to list them"
        )))
    }
}

#[utoipa::path(get, path = "/v1/apps/{app}/logs", tag = "logs", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), PollQuery),
    responses((status = 200, body = Vec<LogLine>, description = "Oldest first; without `after`, the last `limit` (default 100) lines"),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn logs(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> Result<Json<Vec<LogLine>>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let Some(after) = q.after else {
        return Ok(Json(state.store.instance_logs_tail(rec.id, limit).await?));
    };
    let lines = long_poll(&state, q.wait_ms, || async {
        let lines = state
            .store
            .instance_logs_after(rec.id, after, limit)
            .await?;
        let done = !lines.is_empty();
        Ok((lines, done))
    })
    .await?;
    Ok(Json(lines))
}

#[utoipa::path(get, path = "/v1/apps/{app}/events", tag = "logs", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), PollQuery),
    responses((status = 200, body = Vec<Event>, description = "Oldest first"), (status = 404, body = ErrorBody)))]
pub(crate) async fn events(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    ApiQuery(q): ApiQuery<PollQuery>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let events = long_poll(&state, q.wait_ms, || async {
        let ev = state.store.events(rec.id, after, limit).await?;
        let done = !ev.is_empty();
        Ok((ev, done))
    })
    .await?;
    Ok(Json(events))
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", security(("bearer" = [])),
    description = "Every data-plane host: `alive`, `draining` or `dead`, with its instance counts. Any token may list.",
    responses((status = 200, body = Vec<HostInfo>), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_hosts(
    State(state): State<AppState>,
    _auth: AnyAuth,
) -> Result<Json<Vec<HostInfo>>, ApiError> {
    Ok(Json(
        state.store.list_hosts(state.config.host_timeout).await?,
    ))
}

/// Drains or undrains a host for the platform's operator. Hosts are shared
/// by every organisation, so a user token (which acts for one of them) may
/// not move other organisations' instances: this needs a host token, the
/// platform-wide credential `stead tokens create --host` makes.
async fn set_draining(
    state: &AppState,
    auth: &AnyAuth,
    host: &str,
    draining: bool,
) -> Result<HostInfo, ApiError> {
    let verb = if draining { "drain" } else { "undrain" };
    if auth.0.kind != stead_api::TokenKind::Host {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("hosts are shared by every organisation: to {verb} one, use the platform's host token (`stead tokens create --host`), not a user token"),
        ));
    }
    let name = state
        .store
        .set_draining(host, draining)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "host {host:?} is not registered; `stead hosts list` shows the hosts by name and id"
            ))
        })?;
    tracing::info!(host = %name, draining, "host {verb}ed");
    state.changed();
    state
        .store
        .list_hosts(state.config.host_timeout)
        .await?
        .into_iter()
        .find(|h| h.name == name)
        .map(|mut h| {
            // The flag is set whatever the host's liveness.
            h.draining = draining;
            h
        })
        .ok_or_else(|| ApiError::not_found(format!("host {name} was removed meanwhile")))
}

#[utoipa::path(post, path = "/v1/hosts/{host}/drain", tag = "hosts", security(("bearer" = [])),
    description = "The host gets no new instances; those it runs are replaced elsewhere (each stopped once its replacement is ready; DBOS instances are stopped or kept by the workflow drain rules and their executors recovered elsewhere). Needs a host token.",
    params(("host" = String, Path, description = "Host name or id")),
    responses((status = 200, body = HostInfo), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn drain_host(
    State(state): State<AppState>,
    auth: AnyAuth,
    ApiPath(host): ApiPath<String>,
) -> Result<Json<HostInfo>, ApiError> {
    Ok(Json(set_draining(&state, &auth, &host, true).await?))
}

#[utoipa::path(post, path = "/v1/hosts/{host}/undrain", tag = "hosts", security(("bearer" = [])),
    description = "The host takes new instances again (nothing that already runs elsewhere moves back). Needs a host token.",
    params(("host" = String, Path, description = "Host name or id")),
    responses((status = 200, body = HostInfo), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn undrain_host(
    State(state): State<AppState>,
    auth: AnyAuth,
    ApiPath(host): ApiPath<String>,
) -> Result<Json<HostInfo>, ApiError> {
    Ok(Json(set_draining(&state, &auth, &host, false).await?))
}
