//! The OpenAPI document, generated from the handlers and the stead-api types
//! so it cannot drift from what the server does.

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{agent, api, scaling, workflows};

#[derive(OpenApi)]
#[openapi(
    info(title = "Stead control plane", description = "The HTTP/JSON API used by the stead CLI, agents, routers and third parties. \
        Authenticate with `Authorization: Bearer <token>`: user tokens for the app API, host tokens for /v1/agent, /v1/blobs and /v1/routes."),
    paths(
        api::health, api::info, api::whoami, api::list_apps, api::get_app, api::delete_app, api::deploy,
        api::list_versions, api::get_version, api::build_log, api::rollback, api::list_env, api::set_env,
        api::unset_env, api::logs, api::events, api::list_hosts, api::drain_host, api::undrain_host,
        agent::register, agent::heartbeat, agent::claim, agent::renew, agent::append_log, agent::complete,
        agent::get_blob, agent::put_blob, agent::instance_logs, scaling::routes, scaling::demand,
        scaling::set_scale,
        workflows::database, workflows::list, workflows::get, workflows::steps, workflows::cancel,
        workflows::resume, workflows::fork, workflows::start_rollout, workflows::get_rollout,
        workflows::recovered,
    ),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The OpenAPI 3 document as JSON text.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"openapi\",\"message\":\"{e}\"}}"))
}

pub(crate) async fn serve_openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}
