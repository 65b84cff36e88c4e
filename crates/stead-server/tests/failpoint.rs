//! Killing the control plane mid-deploy loses nothing and half-writes
//! nothing: a child process runs a server with a failpoint that exits at a
//! given step, then this process restarts on the same database and retries
//! the deploy with the same idempotency key.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{app_bundle, send, sha256_hex};
use reqwest::{Method, StatusCode};
use stead_server::{Server, ServerConfig};

const DIR_ENV: &str = "STEAD_FAILPOINT_TEST_DIR";

fn config(dir: &Path) -> ServerConfig {
    ServerConfig::new(
        format!("sqlite://{}/stead.db", dir.display()),
        "127.0.0.1:0".parse().unwrap(),
        dir.join("data"),
    )
}

async fn serve(dir: &Path) -> (String, stead_store::Store, tokio::sync::oneshot::Sender<()>) {
    let server = Server::bind(config(dir)).await.unwrap();
    let base = format!("http://{}", server.local_addr());
    let store = server.store().clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    (base, store, tx)
}

#[tokio::test]
#[ignore = "run in a child process by crash_mid_deploy_loses_nothing"]
async fn failpoint_child() {
    let dir = PathBuf::from(std::env::var(DIR_ENV).expect("run by crash_mid_deploy_loses_nothing"));
    let (base, store, _stop) = serve(&dir).await;
    let token = store.create_user_token("acme", "ann").await.unwrap();
    std::fs::write(dir.join("token"), &token).unwrap();
    // The server exits (86) while handling this, taking this process with it.
    let _ = reqwest::Client::new()
        .post(format!("{base}/v1/apps/crashy/deploy"))
        .bearer_auth(&token)
        .header("idempotency-key", "retry-me")
        .body(app_bundle("crashy"))
        .send()
        .await;
    panic!("the failpoint did not stop the server");
}

#[tokio::test]
async fn crash_mid_deploy_loses_nothing() {
    for failpoint in ["after_upload", "after_version"] {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "failpoint_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("STEAD_FAILPOINT", failpoint)
            .env(DIR_ENV, dir.path())
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(86),
            "{failpoint}: child did not stop at the failpoint"
        );
        let token = std::fs::read_to_string(dir.path().join("token")).unwrap();

        let (base, store, _stop) = serve(dir.path()).await;
        let bundle = app_bundle("crashy");
        assert!(
            store.blob_exists(&sha256_hex(&bundle)).await.unwrap(),
            "{failpoint}: bundle lost"
        );
        let client = reqwest::Client::new();
        let (st, _) = send(
            client
                .get(format!("{base}/v1/apps/crashy/versions"))
                .bearer_auth(&token),
        )
        .await;
        match failpoint {
            // Nothing but the content-addressed blob was written.
            "after_upload" => assert_eq!(st, StatusCode::NOT_FOUND),
            _ => assert_eq!(st, StatusCode::OK),
        }
        let (st, v) = send(
            client
                .request(Method::POST, format!("{base}/v1/apps/crashy/deploy"))
                .bearer_auth(&token)
                .header("idempotency-key", "retry-me")
                .body(bundle),
        )
        .await;
        assert_eq!(v["version"], 1, "{failpoint}: {v}");
        match failpoint {
            "after_upload" => assert_eq!(
                (st, v["replayed"].as_bool()),
                (StatusCode::CREATED, Some(false))
            ),
            _ => assert_eq!((st, v["replayed"].as_bool()), (StatusCode::OK, Some(true))),
        }
        let (_, versions) = send(
            client
                .get(format!("{base}/v1/apps/crashy/versions"))
                .bearer_auth(&token),
        )
        .await;
        assert_eq!(
            versions.as_array().unwrap().len(),
            1,
            "{failpoint}: {versions}"
        );
        assert_eq!(versions[0]["state"], "building");
        // The build is queued and claimable.
        let reg = store
            .register_host(&stead_api::RegisterRequest {
                name: "h".into(),
                capacity: Default::default(),
                backends: vec![],
                agent_version: "t".into(),
            })
            .await
            .unwrap();
        let task = store
            .claim_build(
                &reg.host_id,
                &reg.session,
                std::time::Duration::from_secs(30),
            )
            .await
            .unwrap();
        assert_eq!(task.map(|t| t.version), Some(1));
    }
}
