//! Placement, draining and fencing through the agent API of a real server
//! (hosts simulated by heartbeats).

mod common;

use common::{deploy_built_toml, send, start_with, Db, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn toml(name: &str, count: u32, memory_mb: u32) -> String {
    format!(
        "name = \"{name}\"\n[build]\ncommands = [\"make\"]\n[run]\nstart = \"./server\"\nport = 8000\n\
         [scale]\nmin = {count}\nmax = {count}\n[resources]\nmemory_mb = {memory_mb}\n"
    )
}

async fn register(s: &TestServer, name: &str, memory_mb: u64) -> (String, String) {
    let (st, r) = send(s.host(Method::POST, "/v1/agent/register").json(&json!({
        "name": name, "capacity": {"memory_mb": memory_mb, "cpus": 2}, "backends": ["process"], "agent_version": "test"
    })))
    .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    (
        r["host_id"].as_str().unwrap().to_string(),
        r["session"].as_str().unwrap().to_string(),
    )
}

/// Deploys and builds `name` (claimed by `host`).
async fn deploy_built(s: &TestServer, host: &(String, String), name: &str, count: u32, mem: u32) {
    deploy_built_toml(s, host, name, &toml(name, count, mem)).await;
}

/// Heartbeats `instances` (id, app, state) of version 1; returns the
/// intended state.
async fn beat(s: &TestServer, host: &(String, String), instances: &[(&str, &str, &str)]) -> Value {
    let list: Vec<Value> = instances
        .iter()
        .enumerate()
        .map(|(n, (id, app, state))| {
            json!({"id": id, "app": app, "version": 1, "state": state,
                   "executor_id": format!("x-{id}"), "endpoint": format!("127.0.0.1:{}", 9000 + n),
                   "pid": 10, "started_at_ms": 1, "exit": null})
        })
        .collect();
    let (st, r) = send(
        s.host(Method::POST, "/v1/agent/heartbeat")
            .json(&json!({"host_id": host.0, "session": host.1, "instances": list})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    r["intended"].clone()
}

fn count_of(intended: &Value, app: &str) -> u64 {
    intended["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["app"] == app)
        .map(|a| a["count"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn placement_is_stable_drain_replaces_first_and_shortfalls_are_reported() {
    let s = start_with(Db::Sqlite, |_| {}).await;
    let small = register(&s, "small", 1024).await;
    let big = register(&s, "big", 4096).await;
    deploy_built(&s, &small, "web", 1, 256).await;
    // One instance: on the host with the most free memory.
    assert_eq!(count_of(&beat(&s, &small, &[]).await, "web"), 0);
    assert_eq!(count_of(&beat(&s, &big, &[]).await, "web"), 1);
    assert_eq!(
        count_of(&beat(&s, &big, &[("w1", "web", "ready")]).await, "web"),
        1
    );
    // A bigger host joins: nothing moves.
    let huge = register(&s, "huge", 16384).await;
    assert_eq!(count_of(&beat(&s, &huge, &[]).await, "web"), 0);
    assert_eq!(
        count_of(&beat(&s, &big, &[("w1", "web", "ready")]).await, "web"),
        1
    );

    // Draining needs a host token and a known host.
    let (st, v) = send(s.user(Method::POST, "/v1/hosts/big/drain")).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, v) = send(s.host(Method::POST, "/v1/hosts/nope/drain")).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (st, v) = send(s.host(Method::POST, "/v1/hosts/big/drain")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "draining");
    // The replacement goes to the host with the most free memory; the
    // drained one keeps its instance until the replacement is ready.
    assert_eq!(count_of(&beat(&s, &huge, &[]).await, "web"), 1);
    assert_eq!(
        count_of(&beat(&s, &big, &[("w1", "web", "ready")]).await, "web"),
        1
    );
    assert_eq!(
        count_of(&beat(&s, &huge, &[("w2", "web", "starting")]).await, "web"),
        1
    );
    assert_eq!(
        count_of(&beat(&s, &big, &[("w1", "web", "ready")]).await, "web"),
        1
    );
    assert_eq!(
        count_of(&beat(&s, &huge, &[("w2", "web", "ready")]).await, "web"),
        1
    );
    assert_eq!(
        count_of(&beat(&s, &big, &[("w1", "web", "ready")]).await, "web"),
        0,
        "the replacement is ready: the drained host stops its instance"
    );
    let (_, hosts) = send(s.user(Method::GET, "/v1/hosts")).await;
    let big_info = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "big")
        .unwrap()
        .clone();
    assert_eq!(big_info["state"], "draining");

    // An app too large for any host is not placed, and says why.
    deploy_built(&s, &small, "hog", 1, 60000).await;
    for h in [&small, &huge] {
        assert_eq!(count_of(&beat(&s, h, &[]).await, "hog"), 0);
    }
    let (st, events) = send(s.user(Method::GET, "/v1/apps/hog/events")).await;
    assert_eq!(st, StatusCode::OK);
    let unplaced: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "unplaced")
        .collect();
    assert_eq!(
        unplaced.len(),
        1,
        "reported once, not per heartbeat: {events}"
    );
    let msg = unplaced[0]["message"].as_str().unwrap();
    assert!(msg.contains("60000 MiB free"), "{msg}");
}

#[tokio::test]
async fn a_host_back_from_the_dead_is_told_to_stop_its_stale_instances() {
    let s = start_with(Db::Sqlite, |c| {
        c.host_timeout = std::time::Duration::from_millis(400)
    })
    .await;
    let a = register(&s, "a", 4096).await;
    let b = register(&s, "b", 1024).await;
    deploy_built(&s, &a, "api", 1, 256).await;
    assert_eq!(count_of(&beat(&s, &a, &[]).await, "api"), 1);
    let i = beat(&s, &a, &[("old", "api", "ready")]).await;
    assert_eq!(count_of(&i, "api"), 1);
    assert!(i.get("fenced").is_none(), "{i}");
    // `a` goes silent past the host timeout (the clock is the point here,
    // not a stand-in for an event); `b` keeps beating and gets the app.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let i = beat(&s, &b, &[]).await;
        if count_of(&i, "api") == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never re-placed: {i}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    beat(&s, &b, &[("new", "api", "ready")]).await;
    // `a` comes back still running `old`: it is fenced, and `a` gets no
    // share (the app runs on `b`).
    let i = beat(&s, &a, &[("old", "api", "ready")]).await;
    assert_eq!(i["fenced"], json!(["old"]), "{i}");
    assert_eq!(count_of(&i, "api"), 0, "{i}");
    let (_, routes) = send(s.host(Method::GET, "/v1/routes")).await;
    let eps: Vec<&str> = routes["apps"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["instance"].as_str().unwrap())
        .collect();
    assert_eq!(eps, vec!["new"], "{routes}");
    // Once it is gone, nothing is fenced any more.
    let i = beat(&s, &a, &[]).await;
    assert!(i.get("fenced").is_none(), "{i}");
}
