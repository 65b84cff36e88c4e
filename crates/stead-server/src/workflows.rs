//! The durable-execution API: an app's databases, its workflows (read and
//! managed in its system database), rollouts, and the agents' recovery
//! reports.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use stead_api::{AppDatabaseInfo, ErrorBody, RecoveryReport, RolloutInfo, RolloutRequest};
use stead_dbos::{StepInfo, WorkflowFilter, WorkflowInfo};
use utoipa::{IntoParams, ToSchema};

use crate::api::load_app;
use crate::auth::{HostAuth, UserAuth};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::AppState;

#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct DbQuery {
    /// Show the passwords in the URLs.
    #[serde(default)]
    reveal: bool,
}

#[utoipa::path(get, path = "/v1/apps/{app}/database", tag = "workflows", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), DbQuery),
    responses((status = 200, body = AppDatabaseInfo), (status = 404, body = ErrorBody)))]
pub(crate) async fn database(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    ApiQuery(q): ApiQuery<DbQuery>,
) -> Result<Json<AppDatabaseInfo>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    Ok(Json(
        crate::dbos::database_info(&state, &state.pools, &rec, q.reveal).await?,
    ))
}

async fn system_db(
    state: &AppState,
    app_id: i64,
    app: &str,
) -> Result<std::sync::Arc<stead_dbos::SystemDb>, ApiError> {
    crate::dbos::ensure_database(state, app_id, app).await?;
    state
        .pools
        .get(state, app_id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("app {app} has no database recorded")))
}

fn dbos_err(app: &str, e: stead_dbos::DbosError) -> ApiError {
    let msg = format!("app {app}: {e}");
    match e {
        stead_dbos::DbosError::NotFound { .. } => ApiError::not_found(msg),
        stead_dbos::DbosError::Finished { .. } | stead_dbos::DbosError::AlreadyExists { .. } => {
            ApiError::conflict("workflow_conflict", msg)
        }
        stead_dbos::DbosError::InvalidUrl { .. } => ApiError::internal(msg),
        _ => ApiError::unavailable(msg),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct ListQuery {
    /// PENDING, ENQUEUED, SUCCESS, ERROR, CANCELLED, ...
    status: Option<String>,
    /// Workflow function name.
    name: Option<String>,
    /// Application version (the Stead version number).
    version: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
}

#[utoipa::path(get, path = "/v1/apps/{app}/workflows", tag = "workflows", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ListQuery),
    responses((status = 200, body = [WorkflowInfo]), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<WorkflowInfo>>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    let db = system_db(&state, rec.id, &app).await?;
    let filter = WorkflowFilter {
        status: q.status.map(|s| s.to_ascii_uppercase()),
        name: q.name,
        application_version: q.version,
        limit: Some(q.limit.unwrap_or(100).min(1000)),
        offset: q.offset,
        ..WorkflowFilter::default()
    };
    Ok(Json(
        db.list_workflows(&filter)
            .await
            .map_err(|e| dbos_err(&app, e))?,
    ))
}

async fn one(
    state: &AppState,
    auth: &UserAuth,
    app: &str,
    id: &str,
) -> Result<(std::sync::Arc<stead_dbos::SystemDb>, WorkflowInfo), ApiError> {
    let rec = load_app(state, auth, app).await?;
    let db = system_db(state, rec.id, app).await?;
    let wf = db
        .get_workflow(id)
        .await
        .map_err(|e| dbos_err(app, e))?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "app {app} has no workflow {id}; list them with `stead workflows list {app}`"
            ))
        })?;
    Ok((db, wf))
}

#[utoipa::path(get, path = "/v1/apps/{app}/workflows/{id}", tag = "workflows", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ("id" = String, Path, description = "Workflow id")),
    responses((status = 200, body = WorkflowInfo), (status = 404, body = ErrorBody)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<WorkflowInfo>, ApiError> {
    Ok(Json(one(&state, &auth, &app, &id).await?.1))
}

#[utoipa::path(get, path = "/v1/apps/{app}/workflows/{id}/steps", tag = "workflows", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ("id" = String, Path, description = "Workflow id")),
    responses((status = 200, body = [StepInfo]), (status = 404, body = ErrorBody)))]
pub(crate) async fn steps(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Vec<StepInfo>>, ApiError> {
    let (db, _) = one(&state, &auth, &app, &id).await?;
    Ok(Json(db.steps(&id).await.map_err(|e| dbos_err(&app, e))?))
}

#[utoipa::path(post, path = "/v1/apps/{app}/workflows/{id}/cancel", tag = "workflows", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ("id" = String, Path, description = "Workflow id")),
    responses((status = 200, body = WorkflowInfo), (status = 404, body = ErrorBody)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<WorkflowInfo>, ApiError> {
    let (db, _) = one(&state, &auth, &app, &id).await?;
    db.cancel(&id).await.map_err(|e| dbos_err(&app, e))?;
    state.changed();
    Ok(Json(one(&state, &auth, &app, &id).await?.1))
}

#[utoipa::path(post, path = "/v1/apps/{app}/workflows/{id}/resume", tag = "workflows", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ("id" = String, Path, description = "Workflow id")),
    responses((status = 200, body = WorkflowInfo), (status = 404, body = ErrorBody)))]
pub(crate) async fn resume(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<WorkflowInfo>, ApiError> {
    let (db, _) = one(&state, &auth, &app, &id).await?;
    db.resume(&id).await.map_err(|e| dbos_err(&app, e))?;
    state.changed();
    Ok(Json(one(&state, &auth, &app, &id).await?.1))
}

#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct ForkRequest {
    /// Re-run from this step (1 = from the start); earlier steps' recorded
    /// results are copied.
    #[serde(default = "one_step")]
    start_step: u32,
    /// Id of the new workflow (default: a new UUID).
    new_id: Option<String>,
    /// Version to run it on (default: the app's active version).
    version: Option<u32>,
}

fn one_step() -> u32 {
    1
}

#[derive(Debug, serde::Serialize, ToSchema)]
pub(crate) struct ForkResponse {
    workflow_id: String,
}

#[utoipa::path(post, path = "/v1/apps/{app}/workflows/{id}/fork", tag = "workflows", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name"), ("id" = String, Path, description = "Workflow id")),
    request_body = ForkRequest,
    responses((status = 200, body = ForkResponse), (status = 404, body = ErrorBody)))]
pub(crate) async fn fork(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<ForkRequest>,
) -> Result<Json<ForkResponse>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    let (db, _) = one(&state, &auth, &app, &id).await?;
    let version = req.version.or(rec.active_version).map(|v| v.to_string());
    let new_id = db
        .fork(&id, req.start_step, req.new_id, version)
        .await
        .map_err(|e| dbos_err(&app, e))?;
    state.changed();
    Ok(Json(ForkResponse {
        workflow_id: new_id,
    }))
}

#[utoipa::path(post, path = "/v1/apps/{app}/rollouts", tag = "apps", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    request_body = RolloutRequest,
    responses((status = 201, body = RolloutInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn start_rollout(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
    ApiJson(req): ApiJson<RolloutRequest>,
) -> Result<(axum::http::StatusCode, Json<RolloutInfo>), ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    let r = state.store.create_rollout(rec.id, &req.versions).await?;
    state.changed();
    Ok((
        axum::http::StatusCode::CREATED,
        Json(rollout_info(&app, &r)),
    ))
}

#[utoipa::path(get, path = "/v1/apps/{app}/rollouts", tag = "apps", security(("bearer" = [])),
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, body = Option<RolloutInfo>), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_rollout(
    State(state): State<AppState>,
    auth: UserAuth,
    ApiPath(app): ApiPath<String>,
) -> Result<Json<Option<RolloutInfo>>, ApiError> {
    let rec = load_app(&state, &auth, &app).await?;
    Ok(Json(
        state
            .store
            .latest_rollout(rec.id)
            .await?
            .map(|r| rollout_info(&app, &r)),
    ))
}

pub(crate) fn rollout_info(app: &str, r: &stead_store::Rollout) -> RolloutInfo {
    RolloutInfo {
        id: r.id,
        app: app.to_string(),
        versions: r.versions.clone(),
        step: r.step,
        state: r.state.clone(),
        message: r.message.clone(),
        created_at_ms: r.created_at_ms,
        updated_at_ms: r.updated_at_ms,
    }
}

#[utoipa::path(post, path = "/v1/agent/recovered", tag = "agent", security(("bearer" = [])),
    request_body = RecoveryReport,
    responses((status = 200, description = "Recorded"), (status = 404, body = ErrorBody)))]
pub(crate) async fn recovered(
    State(state): State<AppState>,
    _auth: HostAuth,
    ApiJson(r): ApiJson<RecoveryReport>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = state
        .store
        .find_app(&r.app)
        .await?
        .ok_or_else(|| ApiError::app_not_found(&r.app))?;
    let n = state
        .store
        .mark_recovered(
            app.id,
            r.version,
            &r.executor_ids,
            &r.workflows,
            &r.method,
            &format!("instance {} on host {}", r.instance, r.host_id),
        )
        .await?;
    tracing::info!(app = %r.app, version = r.version, executors = ?r.executor_ids, workflows = r.workflows.len(), method = %r.method, "recovery reported by agent");
    state.changed();
    Ok(Json(serde_json::json!({"recorded": n})))
}
