//! The /v1 API against a real server.

mod common;

use common::{app_bundle, bundle, send, sha256_hex, start, start_with, stead_toml, Db, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn health_and_openapi_need_no_token() {
    let s = start(Db::Sqlite).await;
    let (st, v) = send(s.req(Method::GET, "/v1/health", None)).await;
    assert_eq!((st, v), (StatusCode::OK, json!({"status": "ok"})));
    let (st, doc) = send(s.req(Method::GET, "/v1/openapi.json", None)).await;
    assert_eq!(st, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/health",
        "/v1/apps",
        "/v1/apps/{app}",
        "/v1/apps/{app}/deploy",
        "/v1/apps/{app}/versions/{n}/build-log",
        "/v1/apps/{app}/rollback",
        "/v1/apps/{app}/env/{key}",
        "/v1/agent/heartbeat",
        "/v1/agent/builds/{id}/complete",
        "/v1/blobs/{hash}",
        "/v1/routes",
    ] {
        assert!(paths.contains_key(p), "missing {p}");
    }
    assert!(doc["components"]["schemas"]["AppStatus"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn auth_cases() {
    let s = start(Db::Sqlite).await;
    s.deploy("shop", app_bundle("shop"), None).await;

    let (st, v) = send(s.req(Method::GET, "/v1/apps", None)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(
        v["message"].as_str().unwrap().contains("stead login"),
        "{v}"
    );
    let (st, v) = send(
        s.client
            .get(format!("{}/v1/apps", s.base))
            .header("authorization", "Token abc"),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(v["message"].as_str().unwrap().contains("--token"), "{v}");
    let (st, _) = send(s.req(Method::GET, "/v1/apps", Some("not-a-token"))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v) = send(s.req(
        Method::GET,
        "/v1/apps",
        Some("stead_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    ))
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(v["message"].as_str().unwrap().contains("unknown"), "{v}");

    // Another organisation cannot see the app: 404, as for an app that does not exist.
    let other = s.store.create_user_token("globex", "bob").await.unwrap();
    let (st, v) = send(s.req(Method::GET, "/v1/apps/shop", Some(&other))).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(v["message"].as_str().unwrap().contains("shop"));
    let (_, list) = send(s.req(Method::GET, "/v1/apps", Some(&other))).await;
    assert_eq!(list, json!([]));
    let (st, _) = send(s.req(Method::DELETE, "/v1/apps/shop", Some(&other))).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send(s.req(Method::GET, "/v1/apps/shop/env", Some(&other))).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Wrong kind of token: 403.
    let (st, _) = send(s.user(Method::GET, "/v1/routes")).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = send(s.user(Method::POST, "/v1/agent/register").json(&json!({}))).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = send(s.host(Method::GET, "/v1/apps")).await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    let (st, who) = send(s.user(Method::GET, "/v1/whoami")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(who, json!({"org": "acme", "user": "ann", "kind": "user"}));
    let (_, who) = send(s.host(Method::GET, "/v1/whoami")).await;
    assert_eq!(who["kind"], "host");
    let (st, info) = send(s.user(Method::GET, "/v1/info")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(info["database"], "sqlite");
    assert_eq!(info["domain"], "apps.test");

    let (st, v) = send(s.user(Method::GET, "/v1/nope")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "not_found");
}

#[tokio::test]
async fn deploy_numbering_and_idempotency() {
    let s = start(Db::Sqlite).await;
    let b = app_bundle("hello");
    let (st, v) = s.deploy("hello", b.clone(), Some("key-1")).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["version"], 1);
    assert_eq!(v["replayed"], false);
    assert_eq!(v["bundle_hash"], sha256_hex(&b));
    let (st, again) = s.deploy("hello", b.clone(), Some("key-1")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(again["replayed"], true);
    assert_eq!(
        (again["version"].clone(), again["build_id"].clone()),
        (v["version"].clone(), v["build_id"].clone())
    );
    let (st, v2) = s.deploy("hello", b.clone(), None).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(v2["version"], 2);
    let (_, versions) = send(s.user(Method::GET, "/v1/apps/hello/versions")).await;
    let nums: Vec<u64> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["number"].as_u64().unwrap())
        .collect();
    assert_eq!(nums, vec![2, 1]);
    let (st, one) = send(s.user(Method::GET, "/v1/apps/hello/versions/1")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(one["state"], "building");
    assert_eq!(one["config"]["start"], "./server");
    assert_eq!(one["config"]["min"], 2);
    let (st, v) = send(s.user(Method::GET, "/v1/apps/hello/versions/9")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(v["message"].as_str().unwrap().contains("version 9"));

    let (_, apps) = send(s.user(Method::GET, "/v1/apps")).await;
    assert_eq!(apps[0]["name"], "hello");
    assert_eq!(apps[0]["latest_version"], 2);
    assert!(apps[0]["active_version"].is_null());
    let (_, status) = send(s.user(Method::GET, "/v1/apps/hello")).await;
    assert_eq!(status["scale"], json!({"min": 2, "max": 3}));
    assert_eq!(status["url"], "http://hello.apps.test:8080");
    let (_, events) = send(s.user(Method::GET, "/v1/apps/hello/events")).await;
    assert_eq!(events.as_array().unwrap().len(), 2);
    assert_eq!(events[0]["kind"], "deploy");
    assert_eq!(s.uploads_left(), 0);

    let (st, _) = send(s.user(Method::DELETE, "/v1/apps/hello")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = send(s.user(Method::GET, "/v1/apps/hello")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

async fn assert_nothing_left(s: &TestServer, app: &str) {
    let (st, _) = send(s.user(Method::GET, &format!("/v1/apps/{app}"))).await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "app {app} was created by a rejected deploy"
    );
    assert_eq!(s.uploads_left(), 0, "temp upload left behind");
}

#[tokio::test]
async fn bad_bundles_are_rejected_and_leave_nothing() {
    let s = start(Db::Sqlite).await;
    let (st, v) = s.deploy("bad", b"this is not zstd".to_vec(), None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"], "invalid_bundle");
    assert_nothing_left(&s, "bad").await;

    let toml = stead_toml("bad");
    let evil = bundle(&[("stead.toml", toml.as_bytes()), ("../evil", b"x")]);
    let (st, v) = s.deploy("bad", evil, None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"], "invalid_bundle");
    assert_nothing_left(&s, "bad").await;

    let (st, v) = s
        .deploy("bad", bundle(&[("main.py", b"print(1)")]), None)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "invalid_config");
    assert!(v["message"].as_str().unwrap().contains("stead.toml"), "{v}");
    assert_nothing_left(&s, "bad").await;

    let typo = "name = \"bad\"\n[run]\nstart = \"x\"\nstrat = \"y\"\n";
    let (st, v) = s
        .deploy("bad", bundle(&[("stead.toml", typo.as_bytes())]), None)
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "invalid_config");
    assert!(v["message"].as_str().unwrap().contains("strat"), "{v}");
    assert_nothing_left(&s, "bad").await;

    // The URL's name wins over the config's (`stead deploy --app NAME`).
    let (st, v) = s.deploy("renamed", app_bundle("other"), None).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["app"], "renamed");

    let (st, v) = s.deploy("Bad_Name", app_bundle("bad"), None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "invalid_name");
}

#[tokio::test]
async fn oversize_bundle_is_413() {
    let s = start_with(Db::Sqlite, |c| c.limits.max_compressed = 4096).await;
    let big: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (st, v) = s.deploy("big", big, None).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("max_compressed"),
        "{v}"
    );
    assert_nothing_left(&s, "big").await;
}

#[tokio::test]
async fn name_taken_by_another_org_is_409() {
    let s = start(Db::Sqlite).await;
    let (st, _) = s.deploy("taken", app_bundle("taken"), None).await;
    assert_eq!(st, StatusCode::CREATED);
    let other = s.store.create_user_token("globex", "bob").await.unwrap();
    let (st, v) = send(
        s.req(Method::POST, "/v1/apps/taken/deploy", Some(&other))
            .body(app_bundle("taken")),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(v["error"], "name_taken");
    assert!(v["message"].as_str().unwrap().contains("taken"));
}

#[tokio::test]
async fn env_set_list_masked_unset() {
    let s = start(Db::Sqlite).await;
    s.deploy("envy", app_bundle("envy"), None).await;
    let (st, v) = send(
        s.user(Method::PUT, "/v1/apps/envy/env")
            .json(&json!({"vars": {"API_KEY": "sk-live-0123456789abcdef"}, "secret": true})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, _) = send(
        s.user(Method::PUT, "/v1/apps/envy/env")
            .json(&json!({"vars": {"MODE": "prod"}})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (_, list) = send(s.user(Method::GET, "/v1/apps/envy/env")).await;
    let text = list.to_string();
    assert!(!text.contains("0123456789abc"), "secret leaked: {text}");
    let key = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["key"] == "API_KEY")
        .unwrap();
    assert_eq!(key["secret"], true);
    assert_eq!(key["value"], "****ef");
    let mode = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["key"] == "MODE")
        .unwrap();
    assert_eq!(mode["value"], "prod");

    for bad in ["STEAD_APP", "DBOS__VMID", "PORT", "1BAD", "A-B"] {
        let (st, v) = send(
            s.user(Method::PUT, "/v1/apps/envy/env")
                .json(&json!({"vars": {bad: "x"}})),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v["message"].as_str().unwrap().contains(bad), "{v}");
    }
    let (st, v) = send(
        s.user(Method::PUT, "/v1/apps/envy/env")
            .header("content-type", "application/json")
            .body("{nope"),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, _) = send(s.user(Method::PUT, "/v1/apps/envy/env").body("{}")).await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let (st, _) = send(s.user(Method::DELETE, "/v1/apps/envy/env/MODE")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = send(s.user(Method::DELETE, "/v1/apps/envy/env/MODE")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(v["message"].as_str().unwrap().contains("MODE"));
    let (_, list) = send(s.user(Method::GET, "/v1/apps/envy/env")).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, events) = send(s.user(Method::GET, "/v1/apps/envy/events?after=1")).await;
    assert!(events
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["kind"] == "env"));
    assert_eq!(events.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn blobs_are_verified() {
    let s = start(Db::Sqlite).await;
    let data = b"artifact bytes".to_vec();
    let hash = sha256_hex(&data);
    let (st, _) = send(s.host(Method::GET, &format!("/v1/blobs/{hash}"))).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let wrong = sha256_hex(b"other");
    let (st, v) = send(
        s.host(Method::PUT, &format!("/v1/blobs/{wrong}"))
            .body(data.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "hash_mismatch");
    let (st, _) = send(s.host(Method::PUT, "/v1/blobs/nothex").body(data.clone())).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = send(
        s.host(Method::PUT, &format!("/v1/blobs/{hash}"))
            .body(data.clone()),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let got = s
        .host(Method::GET, &format!("/v1/blobs/{hash}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap().to_vec(), data);
    let (st, _) = send(s.user(Method::GET, &format!("/v1/blobs/{hash}"))).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(s.uploads_left(), 0);
}

fn value_str(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

pub async fn register(s: &TestServer, name: &str) -> (String, String) {
    let (st, r) = send(s.host(Method::POST, "/v1/agent/register").json(&json!({
        "name": name, "capacity": {"memory_mb": 4096, "cpus": 2}, "backends": ["process"], "agent_version": "test"
    })))
    .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    (value_str(&r, "host_id"), value_str(&r, "session"))
}

/// Claims the next build, logs, uploads an artifact and completes it.
async fn build_succeeds(
    s: &TestServer,
    host_id: &str,
    session: &str,
    app: &str,
    version: u64,
) -> Value {
    let (st, claim) = send(
        s.host(Method::POST, "/v1/agent/builds/claim")
            .json(&json!({"host_id": host_id, "session": session})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{claim}");
    let task = &claim["task"];
    assert_eq!(task["app"], app);
    assert_eq!(task["version"], version);
    let id = task["id"].as_i64().unwrap();
    let (st, _) = send(
        s.host(Method::POST, &format!("/v1/agent/builds/{id}/renew"))
            .json(&json!({"host_id": host_id, "session": session})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = send(s.host(Method::POST, &format!("/v1/agent/builds/{id}/log")).json(&json!({
        "host_id": host_id, "session": session,
        "lines": [{"ts_ms": 1, "stream": "stdout", "line": "compiling"}, {"ts_ms": 2, "stream": "stderr", "line": "done"}]
    })))
    .await;
    assert_eq!(st, StatusCode::OK);
    let artifact = format!("artifact of {app} v{version}").into_bytes();
    let hash = sha256_hex(&artifact);
    let body = json!({"host_id": host_id, "session": session, "artifact_hash": hash});
    let (st, v) = send(
        s.host(Method::POST, &format!("/v1/agent/builds/{id}/complete"))
            .json(&body),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "artifact not uploaded yet: {v}"
    );
    let (st, _) = send(
        s.host(Method::PUT, &format!("/v1/blobs/{hash}"))
            .body(artifact),
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, v) = send(
        s.host(Method::POST, &format!("/v1/agent/builds/{id}/complete"))
            .json(&body),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "ready");
    // Completing again from the same session changes nothing.
    let (st, again) = send(
        s.host(Method::POST, &format!("/v1/agent/builds/{id}/complete"))
            .json(&body),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(again["state"], "ready");
    task.clone()
}

async fn build_flow(s: TestServer) {
    let (st, d) = s.deploy("flow", app_bundle("flow"), None).await;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    let (st, _) = send(
        s.user(Method::PUT, "/v1/apps/flow/env")
            .json(&json!({"vars": {"TOKEN": "abc"}, "secret": true})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (host_id, session) = register(&s, "node-1").await;

    // A build-log long-poll started now is woken by the build's output.
    let poll = {
        let r = s.user(
            Method::GET,
            "/v1/apps/flow/versions/1/build-log?after=0&wait_ms=10000",
        );
        tokio::spawn(async move { send(r).await })
    };
    let task = build_succeeds(&s, &host_id, &session, "flow", 1).await;
    assert_eq!(task["build"], json!(["make"]));
    assert_eq!(task["migrate"], json!(["./migrate"]));
    assert_eq!(task["env"]["TOKEN"], "abc");
    assert_eq!(task["env"]["STEAD_APP"], "flow");
    let (st, page) = poll.await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(!page["lines"].as_array().unwrap().is_empty(), "{page}");

    let (_, page) = send(s.user(Method::GET, "/v1/apps/flow/versions/1/build-log")).await;
    assert_eq!(page["state"], "ready");
    let lines: Vec<&str> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert_eq!(lines, vec!["compiling", "done"]);
    let (_, page) = send(s.user(
        Method::GET,
        "/v1/apps/flow/versions/1/build-log?after=2&wait_ms=5000",
    ))
    .await;
    assert!(page["lines"].as_array().unwrap().is_empty());

    // Built, the version is the target: it runs, but is not active yet.
    let (_, status) = send(s.user(Method::GET, "/v1/apps/flow")).await;
    assert!(status["active_version"].is_null(), "{status}");
    assert_eq!(status["target_version"], 1);
    let (_, v1) = send(s.user(Method::GET, "/v1/apps/flow/versions/1")).await;
    assert_eq!(
        (v1["state"].clone(), v1["active"].clone()),
        (json!("ready"), json!(false))
    );

    // Heartbeat: intended state says 2 instances (min 2) on the only host.
    let hb = |instances: Value| {
        s.host(Method::POST, "/v1/agent/heartbeat")
            .json(&json!({"host_id": host_id, "session": session, "instances": instances}))
    };
    let (st, r) = send(hb(json!([]))).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let apps = r["intended"]["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0]["count"], 2);
    assert_eq!(apps[0]["version"], 1);
    assert_eq!(apps[0]["run"]["start"], "./server");
    assert_eq!(apps[0]["run"]["port"], 8000);
    assert_eq!(apps[0]["env"]["TOKEN"], "abc");
    assert_eq!(apps[0]["env"]["STEAD_VERSION"], "1");
    assert_eq!(apps[0]["artifact_hash"], sha256_hex(b"artifact of flow v1"));

    let (_, routes) = send(s.host(Method::GET, "/v1/routes")).await;
    assert_eq!(routes["apps"][0]["app"], "flow");
    assert!(routes["apps"][0]["version"].is_null(), "{routes}");
    assert_eq!(routes["apps"][0]["endpoints"], json!([]));

    let inst = |id: &str, state: &str, port: u16| {
        json!({"id": id, "app": "flow", "version": 1, "state": state, "executor_id": format!("x-{id}"),
               "endpoint": format!("127.0.0.1:{port}"), "pid": 10, "started_at_ms": 1, "exit": null})
    };
    let (st, _) = send(hb(json!([
        inst("i-1", "ready", 9001),
        inst("i-2", "starting", 9002)
    ])))
    .await;
    assert_eq!(st, StatusCode::OK);
    // The ready instance made version 1 active, so it is routed to.
    let (_, routes) = send(s.host(Method::GET, "/v1/routes")).await;
    assert_eq!(routes["apps"][0]["version"], 1);
    assert_eq!(
        routes["apps"][0]["endpoints"],
        json!([{"instance": "i-1", "addr": "127.0.0.1:9001"}])
    );
    let (_, status) = send(s.user(Method::GET, "/v1/apps/flow")).await;
    assert_eq!(status["active_version"], 1);
    assert!(status["target_version"].is_null(), "{status}");
    assert_eq!(status["instances"].as_array().unwrap().len(), 2);
    assert_eq!(status["instances"][0]["host"], "node-1");
    let (_, hosts) = send(s.user(Method::GET, "/v1/hosts")).await;
    assert_eq!(hosts[0]["name"], "node-1");
    assert_eq!(hosts[0]["state"], "alive");
    assert_eq!(hosts[0]["instances"], 2);
    let (_, events) = send(s.user(Method::GET, "/v1/apps/flow/events")).await;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec![
            "deploy",
            "env",
            "build_started",
            "build_succeeded",
            "promoting",
            "instance_ready",
            "activated"
        ]
    );

    // Instance logs: shipped by the host, tailed and long-polled by the user.
    let (st, _) = send(s.host(Method::POST, "/v1/agent/logs").json(&json!({"host_id": host_id, "lines": [
        {"app": "flow", "version": 1, "instance": "i-1", "ts_ms": 5, "stream": "stdout", "line": "listening"},
        {"app": "flow", "version": 1, "instance": "i-1", "ts_ms": 6, "stream": "stderr", "line": "warn"}
    ]})))
    .await;
    assert_eq!(st, StatusCode::OK);
    let (_, logs) = send(s.user(Method::GET, "/v1/apps/flow/logs?limit=1")).await;
    assert_eq!(logs.as_array().unwrap().len(), 1);
    assert_eq!(logs[0]["line"], "warn");
    assert_eq!(logs[0]["host"], "node-1");
    let seq = logs[0]["seq"].as_i64().unwrap();
    let follow = {
        let r = s.user(
            Method::GET,
            &format!("/v1/apps/flow/logs?after={seq}&wait_ms=10000"),
        );
        tokio::spawn(async move { send(r).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    send(s.host(Method::POST, "/v1/agent/logs").json(&json!({"host_id": host_id, "lines": [
        {"app": "flow", "version": 1, "instance": "i-1", "ts_ms": 7, "stream": "stdout", "line": "request"}
    ]})))
    .await;
    let (_, more) = follow.await.unwrap();
    assert_eq!(more[0]["line"], "request");

    // A stale session cannot heartbeat or claim.
    let (_, new_session) = register(&s, "node-1").await;
    let (st, _) = send(hb(json!([]))).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = send(
        s.host(Method::POST, "/v1/agent/builds/claim")
            .json(&json!({"host_id": host_id, "session": session})),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, r) = send(
        s.host(Method::POST, "/v1/agent/builds/claim")
            .json(&json!({"host_id": host_id, "session": new_session})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(r["task"].is_null());
}

#[tokio::test]
async fn build_flow_sqlite() {
    build_flow(start(Db::Sqlite).await).await;
}

#[tokio::test]
async fn build_flow_postgres() {
    let s = start(Db::Postgres).await;
    let (_, info) = send(s.user(Method::GET, "/v1/info")).await;
    assert_eq!(info["database"], "postgres");
    build_flow(s).await;
}

/// Heartbeats `instances` of `app` as (id, version, state) for a host; an
/// exited instance exits with "exit status 1 (<id>)". Returns the reply.
async fn report(
    s: &TestServer,
    host_id: &str,
    session: &str,
    app: &str,
    instances: &[(&str, u32, &str)],
) -> Value {
    let list: Vec<Value> = instances
        .iter()
        .map(|(id, version, state)| {
            let port = 9000 + id.bytes().map(u16::from).sum::<u16>() % 1000;
            json!({"id": id, "app": app, "version": version, "state": state,
                   "executor_id": format!("x-{id}"), "endpoint": format!("127.0.0.1:{port}"),
                   "pid": 10, "started_at_ms": 1,
                   "exit": (*state == "exited").then(|| format!("exit status 1 ({id})"))})
        })
        .collect();
    let (st, r) = send(
        s.host(Method::POST, "/v1/agent/heartbeat")
            .json(&json!({"host_id": host_id, "session": session, "instances": list})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    r
}

/// (active, target) of an app, as the API reports them.
async fn versions_of(s: &TestServer, app: &str) -> (Value, Value) {
    let (st, status) = send(s.user(Method::GET, &format!("/v1/apps/{app}"))).await;
    assert_eq!(st, StatusCode::OK, "{status}");
    (
        status["active_version"].clone(),
        status["target_version"].clone(),
    )
}

/// The version routed to and its instances.
async fn route_of(s: &TestServer, app: &str) -> (Value, Vec<String>) {
    let (_, routes) = send(s.host(Method::GET, "/v1/routes")).await;
    let r = routes["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["app"] == app)
        .unwrap_or_else(|| panic!("{app} missing from {routes}"))
        .clone();
    let mut eps: Vec<String> = r["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| value_str(e, "instance"))
        .collect();
    eps.sort();
    (r["version"].clone(), eps)
}

/// The versions of `app` in a heartbeat reply's intended state.
fn intended_versions(reply: &Value, app: &str) -> Vec<u64> {
    reply["intended"]["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["app"] == app)
        .map(|a| a["version"].as_u64().unwrap())
        .collect()
}

async fn failed_build_and_rollback(s: TestServer) {
    let (host_id, session) = register(&s, "node-1").await;
    for _ in 0..3 {
        let (st, _) = s.deploy("roll", app_bundle("roll"), None).await;
        assert_eq!(st, StatusCode::CREATED);
    }
    build_succeeds(&s, &host_id, &session, "roll", 1).await;
    // Version 2 fails.
    let (_, claim) = send(
        s.host(Method::POST, "/v1/agent/builds/claim")
            .json(&json!({"host_id": host_id, "session": session})),
    )
    .await;
    let id = claim["task"]["id"].as_i64().unwrap();
    let (st, v) = send(
        s.host(Method::POST, &format!("/v1/agent/builds/{id}/complete"))
            .json(&json!({
                "host_id": host_id, "session": session, "error": "make: *** [all] Error 2"
            })),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["state"], "failed");
    let (_, v2) = send(s.user(Method::GET, "/v1/apps/roll/versions/2")).await;
    assert_eq!(v2["state"], "failed");
    assert_eq!(v2["error"], "make: *** [all] Error 2");
    let (_, page) = send(s.user(
        Method::GET,
        "/v1/apps/roll/versions/2/build-log?wait_ms=5000",
    ))
    .await;
    assert_eq!(page["state"], "failed");
    assert_eq!(page["error"], "make: *** [all] Error 2");
    build_succeeds(&s, &host_id, &session, "roll", 3).await;
    assert_eq!(versions_of(&s, "roll").await, (Value::Null, json!(3)));
    // Nothing is active yet: there is nothing to roll back from.
    let (st, v) = send(s.user(Method::POST, "/v1/apps/roll/rollback")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    report(&s, &host_id, &session, "roll", &[("r3", 3, "ready")]).await;
    assert_eq!(versions_of(&s, "roll").await, (json!(3), Value::Null));

    let (st, v) = send(
        s.user(Method::POST, "/v1/apps/roll/rollback")
            .json(&json!({"version": 2})),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("failed") && msg.contains("version 2"), "{msg}");
    let (st, v) = send(
        s.user(Method::POST, "/v1/apps/roll/rollback")
            .json(&json!({"version": 7})),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    // Default: the highest ready version below the active one becomes the
    // target; version 3 serves until an instance of version 1 is ready.
    let (st, v) = send(s.user(Method::POST, "/v1/apps/roll/rollback")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["active_version"], 3);
    assert_eq!(v["target_version"], 1);
    let reply = report(&s, &host_id, &session, "roll", &[("r3", 3, "ready")]).await;
    assert_eq!(intended_versions(&reply, "roll"), vec![1, 3]);
    assert_eq!(route_of(&s, "roll").await, (json!(3), vec!["r3".into()]));
    let reply = report(
        &s,
        &host_id,
        &session,
        "roll",
        &[("r3", 3, "ready"), ("r1", 1, "ready")],
    )
    .await;
    assert_eq!(intended_versions(&reply, "roll"), vec![1]);
    assert_eq!(versions_of(&s, "roll").await, (json!(1), Value::Null));
    assert_eq!(route_of(&s, "roll").await, (json!(1), vec!["r1".into()]));

    let (st, v) = send(
        s.user(Method::POST, "/v1/apps/roll/rollback")
            .json(&json!({"version": 3})),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        (v["active_version"].clone(), v["target_version"].clone()),
        (json!(1), json!(3))
    );
    report(
        &s,
        &host_id,
        &session,
        "roll",
        &[("r1", 1, "ready"), ("r3b", 3, "ready")],
    )
    .await;
    assert_eq!(versions_of(&s, "roll").await, (json!(3), Value::Null));
    let (_, versions) = send(s.user(Method::GET, "/v1/apps/roll/versions")).await;
    assert_eq!(versions[0]["number"], 3);
    assert_eq!(versions[0]["active"], true);
    assert_eq!(versions[2]["active"], false);
    let (_, events) = send(s.user(Method::GET, "/v1/apps/roll/events")).await;
    let count = |kind: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .count()
    };
    assert_eq!((count("rollback"), count("activated")), (2, 3));
}

#[tokio::test]
async fn failed_build_and_rollback_sqlite() {
    failed_build_and_rollback(start(Db::Sqlite).await).await;
}

#[tokio::test]
async fn failed_build_and_rollback_postgres() {
    failed_build_and_rollback(start(Db::Postgres).await).await;
}

async fn promotion_and_crash_loop(s: TestServer) {
    let (host_id, session) = register(&s, "node-1").await;
    s.deploy("crash", app_bundle("crash"), None).await;
    build_succeeds(&s, &host_id, &session, "crash", 1).await;
    report(&s, &host_id, &session, "crash", &[("a1", 1, "ready")]).await;
    assert_eq!(versions_of(&s, "crash").await, (json!(1), Value::Null));

    // Version 2 is built: the host is asked to run it beside version 1,
    // which keeps the traffic.
    s.deploy("crash", app_bundle("crash"), None).await;
    let v2 = build_succeeds(&s, &host_id, &session, "crash", 2).await;
    assert_eq!(versions_of(&s, "crash").await, (json!(1), json!(2)));
    let reply = report(&s, &host_id, &session, "crash", &[("a1", 1, "ready")]).await;
    let apps = reply["intended"]["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 2, "{reply}");
    for (a, v) in apps.iter().zip([1, 2]) {
        assert_eq!(a["version"], v);
        assert_eq!(a["count"], 2);
        assert_eq!(a["env"]["STEAD_VERSION"], v.to_string());
        assert_eq!(
            a["artifact_hash"],
            sha256_hex(format!("artifact of crash v{v}").as_bytes())
        );
    }
    assert_eq!(route_of(&s, "crash").await, (json!(1), vec!["a1".into()]));

    // Its instances exit three times without becoming ready: it is failed
    // and version 1 goes on serving.
    for id in ["b1", "b2"] {
        report(
            &s,
            &host_id,
            &session,
            "crash",
            &[("a1", 1, "ready"), (id, 2, "exited")],
        )
        .await;
        assert_eq!(versions_of(&s, "crash").await, (json!(1), json!(2)));
    }
    let reply = report(
        &s,
        &host_id,
        &session,
        "crash",
        &[("a1", 1, "ready"), ("b3", 2, "exited")],
    )
    .await;
    assert_eq!(intended_versions(&reply, "crash"), vec![1]);
    assert_eq!(versions_of(&s, "crash").await, (json!(1), Value::Null));
    assert_eq!(route_of(&s, "crash").await, (json!(1), vec!["a1".into()]));
    let (_, version) = send(s.user(Method::GET, "/v1/apps/crash/versions/2")).await;
    assert_eq!(version["state"], "failed");
    assert_eq!(version["active"], false);
    let error = value_str(&version, "error");
    assert!(
        error.contains("failed to start") && error.contains("exit status 1 (b3)"),
        "{error}"
    );
    let (_, events) = send(s.user(Method::GET, "/v1/apps/crash/events")).await;
    let failed: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "version_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{events}");
    assert_eq!(failed[0]["data"]["version"], v2["version"]);
    let (st, v) = send(
        s.user(Method::POST, "/v1/apps/crash/rollback")
            .json(&json!({"version": 2})),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    // A version that starts is promoted: traffic moves, version 1 is to stop.
    s.deploy("crash", app_bundle("crash"), None).await;
    build_succeeds(&s, &host_id, &session, "crash", 3).await;
    let reply = report(
        &s,
        &host_id,
        &session,
        "crash",
        &[("a1", 1, "ready"), ("c1", 3, "ready")],
    )
    .await;
    assert_eq!(intended_versions(&reply, "crash"), vec![3]);
    assert_eq!(versions_of(&s, "crash").await, (json!(3), Value::Null));
    assert_eq!(route_of(&s, "crash").await, (json!(3), vec!["c1".into()]));
    let (_, apps) = send(s.user(Method::GET, "/v1/apps")).await;
    assert_eq!(apps[0]["active_version"], 3);
    assert_eq!(apps[0]["ready_instances"], 1);
}

#[tokio::test]
async fn promotion_and_crash_loop_sqlite() {
    promotion_and_crash_loop(start(Db::Sqlite).await).await;
}

#[tokio::test]
async fn promotion_and_crash_loop_postgres() {
    promotion_and_crash_loop(start(Db::Postgres).await).await;
}

#[tokio::test]
async fn instances_are_spread_over_alive_hosts() {
    let s = start(Db::Sqlite).await;
    let (h1, s1) = register(&s, "a-host").await;
    let (h2, s2) = register(&s, "b-host").await;
    s.deploy("spread", app_bundle("spread"), None).await;
    build_succeeds(&s, &h1, &s1, "spread", 1).await;
    let mut total = 0;
    for (h, sess) in [(&h1, &s1), (&h2, &s2)] {
        let (_, r) = send(
            s.host(Method::POST, "/v1/agent/heartbeat")
                .json(&json!({"host_id": h, "session": sess, "instances": []})),
        )
        .await;
        let apps = r["intended"]["apps"].as_array().unwrap();
        assert_eq!(apps.len(), 1, "min 2 over 2 hosts: one each");
        total += apps[0]["count"].as_u64().unwrap();
    }
    assert_eq!(total, 2);
}

#[tokio::test]
async fn secret_key_file_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = start_with(Db::Sqlite, |c| c.secret_key = None).await;
    let path = s.dir.path().join("data/secret.key");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim().len(), 64);
}
