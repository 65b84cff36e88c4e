//! The host API: agents register, heartbeat (and get their intended state
//! back), run builds under leases, ship logs and move blobs; routers read
//! the route table.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use stead_api::{
    BuildComplete, BuildLogAppend, BuildTask, ClaimRequest, ClaimResponse, ErrorBody,
    HeartbeatRequest, HeartbeatResponse, InstanceLogBatch, IntendedApp, IntendedHostState,
    LeaseRequest, LeaseResponse, RegisterRequest, RegisterResponse, RouteTable, RunSpec,
    VersionInfo,
};
use stead_store::CompleteOutcome;

use crate::auth::HostAuth;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::placement::{desired_count, place};
use crate::AppState;

#[utoipa::path(post, path = "/v1/agent/register", tag = "agent", security(("bearer" = [])),
    request_body = RegisterRequest,
    responses((status = 200, body = RegisterResponse), (status = 403, body = ErrorBody)))]
pub(crate) async fn register(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    let name = req.name.trim();
    if name.is_empty()
        || name.len() > 253
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "host name {:?} is invalid: use 1 to 253 characters without spaces",
                req.name
            ),
        ));
    }
    let resp = state.store.register_host(&req).await?;
    tracing::info!(
        host = name,
        host_id = resp.host_id,
        session = resp.session,
        "host registered"
    );
    Ok(Json(resp))
}

/// Env an instance or build of `app` version `version` gets.
async fn env_for(
    state: &AppState,
    app_id: i64,
    app: &str,
    version: u32,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut env = state.store.env_plain(app_id).await.map_err(|e| {
        ApiError::internal(format!(
            "cannot read the environment of app {app}: {e}; check the server's secret key"
        ))
    })?;
    env.insert("STEAD_APP".into(), app.to_string());
    env.insert("STEAD_VERSION".into(), version.to_string());
    Ok(env)
}

#[utoipa::path(post, path = "/v1/agent/heartbeat", tag = "agent", security(("bearer" = [])),
    request_body = HeartbeatRequest,
    responses((status = 200, body = HeartbeatResponse, description = "What this host should run"),
              (status = 404, body = ErrorBody, description = "Unknown host: register again"),
              (status = 409, body = ErrorBody, description = "Stale session: register again")))]
pub(crate) async fn heartbeat(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    state
        .store
        .heartbeat(&req.host_id, &req.session, &req.instances)
        .await?;
    state.changed();
    let alive = state
        .store
        .alive_host_ids(state.config.host_timeout)
        .await?;
    let Some(me) = alive.iter().position(|h| h == &req.host_id) else {
        return Ok(Json(HeartbeatResponse {
            intended: IntendedHostState::default(),
        }));
    };
    let mut intended = IntendedHostState::default();
    for app in state.store.active_apps().await? {
        let counts = place(desired_count(app.min, app.max), alive.len());
        let count = counts.get(me).copied().unwrap_or(0);
        if count == 0 {
            continue;
        }
        let env = env_for(&state, app.app_id, &app.name, app.version).await?;
        intended.apps.push(IntendedApp {
            app: app.name.clone(),
            app_id: app.app_id.to_string(),
            version: app.version,
            count,
            artifact_hash: app.artifact_hash.clone(),
            run: RunSpec {
                start: app.config.start.clone(),
                port: app.config.port,
                health: app.config.health.clone(),
                memory_mb: app.config.memory_mb,
                grace_s: app.config.grace_s,
            },
            env,
        });
    }
    Ok(Json(HeartbeatResponse { intended }))
}

async fn check_session(state: &AppState, host_id: &str, session: &str) -> Result<(), ApiError> {
    let host = state.store.get_host(host_id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "host {host_id} is not registered; register it again"
        ))
    })?;
    if host.session != session {
        return Err(ApiError::conflict(
            "stale_session",
            format!(
                "session {session} of host {} was replaced by a newer registration; register again",
                host.name
            ),
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/agent/builds/claim", tag = "agent", security(("bearer" = [])),
    request_body = ClaimRequest,
    responses((status = 200, body = ClaimResponse, description = "`task` is null when there is nothing to build"),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn claim(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    check_session(&state, &req.host_id, &req.session).await?;
    let Some(t) = state
        .store
        .claim_build(&req.host_id, &req.session, state.config.build_lease)
        .await?
    else {
        return Ok(Json(ClaimResponse { task: None }));
    };
    tracing::info!(
        app = t.app,
        version = t.version,
        build = t.id,
        host = req.host_id,
        "build claimed"
    );
    let env = env_for(&state, t.app_id, &t.app, t.version).await?;
    Ok(Json(ClaimResponse {
        task: Some(BuildTask {
            id: t.id,
            app: t.app,
            app_id: t.app_id.to_string(),
            version: t.version,
            bundle_hash: t.bundle_hash,
            build: t.config.build,
            migrate: t.config.migrate,
            env,
            memory_mb: t.config.memory_mb,
            lease_expires_at_ms: t.lease_expires_at_ms,
            attempt: t.attempt,
        }),
    }))
}

#[utoipa::path(post, path = "/v1/agent/builds/{id}/renew", tag = "agent", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Build id")),
    request_body = LeaseRequest,
    responses((status = 200, body = LeaseResponse), (status = 409, body = ErrorBody, description = "The lease is no longer this session's: stop the build")))]
pub(crate) async fn renew(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let expires = state
        .store
        .renew_build(id, &req.host_id, &req.session, state.config.build_lease)
        .await?;
    Ok(Json(LeaseResponse {
        lease_expires_at_ms: expires,
    }))
}

#[utoipa::path(post, path = "/v1/agent/builds/{id}/log", tag = "agent", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Build id")),
    request_body = BuildLogAppend,
    responses((status = 200, description = "Appended: `{\"accepted\": <lines>}`", body = Object),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn append_log(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<BuildLogAppend>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .store
        .append_build_log(id, &req.host_id, &req.session, &req.lines)
        .await?;
    state.changed();
    // A JSON body (not 204) so clients that always decode one work.
    Ok(Json(serde_json::json!({"accepted": req.lines.len()})))
}

#[utoipa::path(post, path = "/v1/agent/builds/{id}/complete", tag = "agent", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Build id")),
    request_body = BuildComplete,
    responses((status = 200, body = VersionInfo, description = "The version after the build"),
              (status = 400, body = ErrorBody, description = "Artifact not uploaded, or neither artifact nor error given"),
              (status = 409, body = ErrorBody)))]
pub(crate) async fn complete(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(id): ApiPath<i64>,
    ApiJson(req): ApiJson<BuildComplete>,
) -> Result<Json<VersionInfo>, ApiError> {
    let result = match (&req.artifact_hash, &req.error) {
        (Some(a), None) => Ok(a.as_str()),
        (None, Some(e)) => Err(e.as_str()),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("completing build {id} needs exactly one of artifact_hash (success) or error (failure)"),
            ))
        }
    };
    let outcome = state
        .store
        .complete_build(id, &req.host_id, &req.session, result)
        .await?;
    let task = state.store.get_build(id).await?;
    match &outcome {
        CompleteOutcome::Succeeded { activated } => {
            tracing::info!(
                app = task.app,
                version = task.version,
                activated,
                "build succeeded"
            )
        }
        CompleteOutcome::Failed => {
            tracing::info!(app = task.app, version = task.version, "build failed")
        }
        CompleteOutcome::AlreadyDone => {}
    }
    state.changed();
    state
        .store
        .get_version(task.app_id, task.version)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "version {} of app {} no longer exists",
                task.version, task.app
            ))
        })
}

fn check_hash(hash: &str) -> Result<(), ApiError> {
    if hash.len() == 64
        && hash
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_hash",
            format!("{hash:?} is not a blob hash: blobs are named by their SHA-256 in 64 lowercase hex digits"),
        ))
    }
}

#[utoipa::path(get, path = "/v1/blobs/{hash}", tag = "blobs", security(("bearer" = [])),
    params(("hash" = String, Path, description = "SHA-256 of the blob, lowercase hex")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_blob(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(hash): ApiPath<String>,
) -> Result<Response, ApiError> {
    check_hash(&hash)?;
    let data = state.store.get_blob(&hash).await?.ok_or_else(|| {
        ApiError::not_found(format!("blob {hash} does not exist; upload it first"))
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, data.len().to_string()),
        ],
        data,
    )
        .into_response())
}

#[utoipa::path(put, path = "/v1/blobs/{hash}", tag = "blobs", security(("bearer" = [])),
    params(("hash" = String, Path, description = "SHA-256 of the body, lowercase hex")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204, description = "Stored (or already present)"),
              (status = 400, body = ErrorBody, description = "The body's hash is not the one named"),
              (status = 413, body = ErrorBody)))]
pub(crate) async fn put_blob(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiPath(hash): ApiPath<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    check_hash(&hash)?;
    let upload = crate::api::receive_upload(&state, body, state.config.max_blob, |l| {
        format!(
            "blob {hash} is larger than the server's limit of {} MiB; raise the server's blob limit",
            l / (1024 * 1024)
        )
    })
    .await?;
    if upload.hash != hash {
        return Err(ApiError::bad_request(
            "hash_mismatch",
            format!(
                "the uploaded body hashes to {} but was sent as blob {hash}; upload it again",
                upload.hash
            ),
        ));
    }
    if !state.store.blob_exists(&hash).await? {
        let data = tokio::fs::read(upload.path())
            .await
            .map_err(|e| ApiError::internal(format!("cannot read the uploaded blob back: {e}")))?;
        state.store.put_blob(&hash, &data).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/agent/logs", tag = "agent", security(("bearer" = [])),
    request_body = InstanceLogBatch,
    responses((status = 200, description = "Stored: `{\"accepted\": <lines>}`; lines of unknown apps are dropped", body = Object),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn instance_logs(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(req): ApiJson<InstanceLogBatch>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let host = state.store.get_host(&req.host_id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "host {} is not registered; register it again",
            req.host_id
        ))
    })?;
    let accepted = state
        .store
        .append_instance_logs(&host.name, &req.lines)
        .await?;
    state.changed();
    Ok(Json(serde_json::json!({"accepted": accepted})))
}

#[utoipa::path(get, path = "/v1/routes", tag = "agent", security(("bearer" = [])),
    responses((status = 200, body = RouteTable), (status = 403, body = ErrorBody)))]
pub(crate) async fn routes(
    State(state): State<AppState>,
    _auth: HostAuth,
) -> Result<Json<RouteTable>, ApiError> {
    Ok(Json(state.store.routes(state.config.host_timeout).await?))
}
