//! The CLI's HTTP client for the control plane.

use std::time::Duration;

use anyhow::{anyhow, bail};
use serde::de::DeserializeOwned;
use serde::Serialize;
use stead_api::ErrorBody;

use crate::credentials;
use crate::ClientArgs;

/// An API error the CLI can act on (e.g. retry on 5xx, stop on 4xx).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the Stead control plane at {url}: {reason}. Is `stead dev` (or `stead server`) running? Point the CLI at it with --api URL or STEAD_API.")]
    Unreachable { url: String, reason: String },
    #[error("{message}")]
    Status {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("unexpected answer from the control plane: {0}")]
    Decode(String),
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
    /// Worth retrying: the server is away or failing, not refusing.
    pub fn transient(&self) -> bool {
        match self {
            ApiError::Unreachable { .. } => true,
            ApiError::Status { status, .. } => *status >= 500,
            ApiError::Decode(_) => false,
        }
    }
}

#[derive(Clone)]
pub struct Api {
    pub base: String,
    token: String,
    pub http: reqwest::Client,
}

impl Api {
    /// Resolves URL and token from flags, environment, then stored credentials.
    pub fn from_args(args: &ClientArgs) -> anyhow::Result<Api> {
        let stored = credentials::load();
        let base = args
            .api
            .clone()
            .or_else(|| stored.as_ref().map(|c| c.api.clone()))
            .ok_or_else(|| anyhow!("no control plane configured: run `stead dev`, or `stead login --api URL --token T`, or pass --api/--token"))?;
        let token = args
            .token
            .clone()
            .or_else(|| stored.as_ref().map(|c| c.token.clone()))
            .ok_or_else(|| anyhow!("no API token: run `stead login --api {base} --token T` or pass --token (STEAD_TOKEN)"))?;
        if token.trim().is_empty() {
            bail!("the API token is empty: pass a token with --token or run `stead login`");
        }
        Ok(Api::new(base, token))
    }

    pub fn new(base: String, token: String) -> Api {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Api {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
        let resp = req.send().await.map_err(|e| ApiError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => Err(ApiError::Status {
                status,
                kind: b.error,
                message: b.message,
            }),
            Err(_) => Err(ApiError::Status {
                status,
                kind: "http".into(),
                message: format!("the control plane answered {status}: {}", text.trim()),
            }),
        }
    }

    pub async fn json<R: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<R, ApiError> {
        let resp = self.send(req).await?;
        resp.json::<R>()
            .await
            .map_err(|e| ApiError::Decode(e.to_string()))
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ApiError> {
        self.json(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ApiError> {
        self.json(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    pub async fn put<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ApiError> {
        self.send(self.request(reqwest::Method::PUT, path).json(body))
            .await
            .map(|_| ())
    }

    pub async fn delete(&self, path: &str) -> Result<(), ApiError> {
        self.send(self.request(reqwest::Method::DELETE, path))
            .await
            .map(|_| ())
    }
}

fn root_cause(e: &reqwest::Error) -> String {
    let mut s: &dyn std::error::Error = e;
    while let Some(next) = s.source() {
        s = next;
    }
    s.to_string()
}
