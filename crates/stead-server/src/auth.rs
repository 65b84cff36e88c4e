//! Bearer-token authentication. User tokens act for one organisation; host
//! tokens are for agents and routers. Using one where the other is needed is
//! a 403, so a leaked host token cannot drive the user API and vice versa.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use stead_api::TokenKind;
use stead_store::{looks_like_token, Principal};

use crate::error::ApiError;
use crate::AppState;

/// A user token's organisation.
#[derive(Debug, Clone)]
pub struct UserAuth {
    pub org_id: i64,
    pub org: String,
    pub user: Option<String>,
}

/// A host token (agent or router).
#[derive(Debug, Clone)]
pub struct HostAuth;

/// Either kind, for `whoami`.
#[derive(Debug, Clone)]
pub struct AnyAuth(pub Principal);

fn unauthorized(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        format!("{what}; run `stead login` or pass --token with a valid token"),
    )
}

async fn principal(parts: &Parts, state: &AppState) -> Result<Principal, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized("no Authorization header was sent"));
    };
    let value = value
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not valid text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    if !looks_like_token(token) {
        return Err(unauthorized(
            "the token is malformed (Stead tokens start with `stead_`)",
        ));
    }
    state
        .store
        .authenticate(token)
        .await?
        .ok_or_else(|| unauthorized("the token is unknown or was revoked"))
}

impl FromRequestParts<AppState> for UserAuth {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let p = principal(parts, state).await?;
        match (p.kind, p.org_id, p.org) {
            (TokenKind::User, Some(org_id), Some(org)) => Ok(UserAuth {
                org_id,
                org,
                user: p.user,
            }),
            _ => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this endpoint needs a user token, but a host token was sent; use the token from `stead login`",
            )),
        }
    }
}

impl FromRequestParts<AppState> for HostAuth {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let p = principal(parts, state).await?;
        if p.kind == TokenKind::Host {
            Ok(HostAuth)
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this endpoint is for agents and routers and needs a host token (`stead server` prints one), not a user token",
            ))
        }
    }
}

impl FromRequestParts<AppState> for AnyAuth {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(AnyAuth(principal(parts, state).await?))
    }
}
