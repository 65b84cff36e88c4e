//! A real server on 127.0.0.1:0 over a fresh store, and hand-made bundles.
#![allow(dead_code)]

use std::time::Duration;

use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::Value;
use stead_server::{Server, ServerConfig};
use stead_store::testing::PgGuard;
use stead_store::Store;
use tempfile::TempDir;

pub enum Db {
    Sqlite,
    Postgres,
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub user: String,
    pub host: String,
    pub store: Store,
    pub dir: TempDir,
    /// The database URL the server uses.
    pub db_url: String,
    _guard: Option<PgGuard>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start(db: Db) -> TestServer {
    start_with(db, |_| {}).await
}

pub async fn start_with(db: Db, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let (url, guard) = match db {
        Db::Sqlite => (format!("sqlite://{}/stead.db", dir.path().display()), None),
        Db::Postgres => {
            let g = stead_store::testing::postgres_database().await;
            (g.url.clone(), Some(g))
        }
    };
    let db_url = url.clone();
    let mut config =
        ServerConfig::new(url, "127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    config.router_url = Some("http://127.0.0.1:8080".into());
    config.domain = "apps.test".into();
    tweak(&mut config);
    let server = Server::bind(config).await.unwrap();
    let store = server.store().clone();
    let base = format!("http://{}", server.local_addr());
    let user = store.create_user_token("acme", "ann").await.unwrap();
    let host = store.create_host_token().await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server
            .serve(async move {
                let _ = rx.await;
            })
            .await;
    });
    TestServer {
        base,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        user,
        host,
        store,
        dir,
        db_url,
        _guard: guard,
        shutdown: Some(tx),
    }
}

impl TestServer {
    pub fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub fn user(&self, method: Method, path: &str) -> RequestBuilder {
        self.req(method, path, Some(&self.user))
    }

    pub fn host(&self, method: Method, path: &str) -> RequestBuilder {
        self.req(method, path, Some(&self.host))
    }

    pub async fn deploy(
        &self,
        app: &str,
        bundle: Vec<u8>,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut r = self
            .user(Method::POST, &format!("/v1/apps/{app}/deploy"))
            .body(bundle);
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        send(r).await
    }

    pub fn uploads_left(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("data/uploads"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Sends and returns the status and the JSON body (Null when empty).
pub async fn send(r: RequestBuilder) -> (StatusCode, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    if !status.is_success() {
        // Every error is a one-line ErrorBody.
        assert!(!text.contains('\n'), "multi-line error body: {text}");
        assert!(
            v["error"].is_string() && v["message"].is_string(),
            "not an ErrorBody: {text}"
        );
    }
    (status, v)
}

pub fn stead_toml(name: &str) -> String {
    format!(
        "name = \"{name}\"\n[build]\ncommands = [\"make\"]\n[run]\nstart = \"./server\"\nport = 8000\nhealth = \"/healthz\"\n[scale]\nmin = 2\nmax = 3\n[database]\nmigrate = [\"./migrate\"]\n"
    )
}

/// A tar+zstd bundle, written by hand so the test does not depend on the
/// packer it is meant to check against.
pub fn bundle(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        if path.contains("..") {
            // The tar crate refuses such names; write the raw header field.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        } else {
            b.append_data(&mut h, path, *data).unwrap();
        }
    }
    let tar = b.into_inner().unwrap();
    zstd::encode_all(&tar[..], 3).unwrap()
}

pub fn app_bundle(name: &str) -> Vec<u8> {
    let toml = stead_toml(name);
    bundle(&[
        ("stead.toml", toml.as_bytes()),
        ("server", b"#!/bin/sh\necho hi\n"),
    ])
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Deploys `name` with the stead.toml `toml` and completes its build as
/// the agent of `host` (host id, session) would: claim, upload an
/// artifact, complete.
pub async fn deploy_built_toml(s: &TestServer, host: &(String, String), name: &str, toml: &str) {
    let (st, v) = s
        .deploy(
            name,
            bundle(&[("stead.toml", toml.as_bytes()), ("server", b"#!/bin/sh\n")]),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, claim) = send(
        s.host(Method::POST, "/v1/agent/builds/claim")
            .json(&serde_json::json!({"host_id": host.0, "session": host.1})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{claim}");
    let id = claim["task"]["id"].as_i64().expect("task id");
    let artifact = format!("artifact of {name}").into_bytes();
    let hash = sha256_hex(&artifact);
    let (st, _) = send(
        s.host(Method::PUT, &format!("/v1/blobs/{hash}"))
            .body(artifact),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = send(
        s.host(Method::POST, &format!("/v1/agent/builds/{id}/complete"))
            .json(
                &serde_json::json!({"host_id": host.0, "session": host.1, "artifact_hash": hash}),
            ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
}
