//! Autoscaling through the API: demand reports, scale to zero and wake,
//! long-polls of intended state and routes, `scale`, status and metrics,
//! on SQLite and PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::{deploy_built_toml, send, start, Db, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    super::$name(super::start(super::Db::Sqlite).await).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    super::$name(super::start(super::Db::Postgres).await).await;
                }
            }
        )*
    };
}

both!(
    idle_app_scales_to_zero_and_a_held_request_wakes_it,
    bursts_scale_up_and_settings_show_in_status,
    long_polls_answer_on_change,
);

fn toml(name: &str, scale: &str) -> String {
    format!("name = \"{name}\"\n[run]\nstart = \"./server\"\nport = 8000\n[scale]\n{scale}")
}

async fn register(s: &TestServer, name: &str) -> (String, String) {
    let (st, r) = send(s.host(Method::POST, "/v1/agent/register").json(&json!({
        "name": name, "capacity": {"memory_mb": 4096, "cpus": 2}, "backends": ["process"], "agent_version": "test"
    })))
    .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    (
        r["host_id"].as_str().unwrap().to_string(),
        r["session"].as_str().unwrap().to_string(),
    )
}

/// Deploys `app` with `scale` settings and builds it on the host.
async fn deploy_built(s: &TestServer, host: &(String, String), app: &str, scale: &str) {
    deploy_built_toml(s, host, app, &toml(app, scale)).await;
}

/// Heartbeats with `ready` ready instances of `app` v1; returns the reply.
async fn heartbeat(
    s: &TestServer,
    host: &(String, String),
    app: &str,
    ready: usize,
    extra: Value,
) -> Value {
    let instances: Vec<Value> = (0..ready)
        .map(|i| {
            json!({"id": format!("{app}-{i}"), "app": app, "version": 1, "state": "ready",
                   "executor_id": format!("{app}-{i}"), "endpoint": format!("127.0.0.1:{}", 9100 + i),
                   "pid": 10, "started_at_ms": 1, "exit": null})
        })
        .collect();
    let mut body = json!({"host_id": host.0, "session": host.1, "instances": instances});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    let (st, r) = send(s.host(Method::POST, "/v1/agent/heartbeat").json(&body)).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    r
}

/// Instances of `app` the intended state asks this host for.
fn count(reply: &Value, app: &str) -> u64 {
    reply["intended"]["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["app"] == app)
        .map(|a| a["count"].as_u64().unwrap())
        .sum()
}

async fn report(s: &TestServer, app: &str, concurrency: f64, waiting: u64) -> Value {
    let (st, ack) = send(s.host(Method::POST, "/v1/router/demand").json(&json!({
        "router": "r1",
        "apps": [{"app": app, "period_ms": 1000, "concurrency": concurrency,
                  "peak": concurrency.ceil() as u64, "requests": (concurrency * 10.0) as u64,
                  "waiting": waiting, "instances": []}]
    })))
    .await;
    assert_eq!(st, StatusCode::OK, "{ack}");
    ack
}

async fn status(s: &TestServer, app: &str) -> Value {
    let (st, v) = send(s.user(Method::GET, &format!("/v1/apps/{app}"))).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

async fn idle_app_scales_to_zero_and_a_held_request_wakes_it(s: TestServer) {
    let host = register(&s, "node-1").await;
    deploy_built(
        &s,
        &host,
        "sleepy",
        "min = 0\nmax = 3\nidle_timeout = \"1s\"\n",
    )
    .await;
    // The target version starts with one instance, min 0 or not.
    let r = heartbeat(&s, &host, "sleepy", 0, json!({})).await;
    assert_eq!(count(&r, "sleepy"), 1, "{r}");
    // Ready: active; still one until idle for the idle timeout.
    let r = heartbeat(&s, &host, "sleepy", 1, json!({})).await;
    assert_eq!(count(&r, "sleepy"), 1, "{r}");
    assert_eq!(status(&s, "sleepy").await["active_version"], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = heartbeat(&s, &host, "sleepy", 1, json!({})).await;
        if count(&r, "sleepy") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never scaled to zero: {r}");
    }
    let st = status(&s, "sleepy").await;
    assert_eq!(st["autoscale"]["desired"], 0, "{st}");
    assert!(
        st["autoscale"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("0 instances: idle for"),
        "{st}"
    );
    // Queued workflows reported by an agent bring it back and keep it up.
    let r = heartbeat(
        &s,
        &host,
        "sleepy",
        0,
        json!({"queued_workflows": {"sleepy": 2}}),
    )
    .await;
    assert_eq!(count(&r, "sleepy"), 1, "{r}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = heartbeat(
        &s,
        &host,
        "sleepy",
        1,
        json!({"queued_workflows": {"sleepy": 2}}),
    )
    .await;
    assert_eq!(count(&r, "sleepy"), 1, "queued work keeps it up: {r}");
    let st = status(&s, "sleepy").await;
    assert_eq!(st["autoscale"]["queued_workflows"], 2, "{st}");
    // Drained and idle: zero again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = heartbeat(&s, &host, "sleepy", 0, json!({})).await;
        if count(&r, "sleepy") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never scaled to zero: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A router holding a request wakes it at once.
    let ack = report(&s, "sleepy", 1.0, 1).await;
    assert_eq!(ack["changed"], true, "{ack}");
    let r = heartbeat(&s, &host, "sleepy", 0, json!({})).await;
    assert_eq!(count(&r, "sleepy"), 1, "{r}");
    let st = status(&s, "sleepy").await;
    assert!(
        st["autoscale"]["reason"]
            .as_str()
            .unwrap()
            .contains("held request"),
        "{st}"
    );
    // Demand from an unknown app is ignored.
    report(&s, "no-such-app", 5.0, 5).await;
}

async fn bursts_scale_up_and_settings_show_in_status(s: TestServer) {
    let host = register(&s, "node-1").await;
    deploy_built(&s, &host, "busy", "min = 1\nmax = 4\n").await;
    heartbeat(&s, &host, "busy", 1, json!({})).await;
    let ack = report(&s, "busy", 250.0, 0).await;
    assert_eq!(ack["changed"], true);
    let r = heartbeat(&s, &host, "busy", 1, json!({})).await;
    assert_eq!(count(&r, "busy"), 3, "{r}");
    let st = status(&s, "busy").await;
    let a = &st["autoscale"];
    assert_eq!(
        (a["desired"].clone(), a["ready"].clone()),
        (json!(3), json!(1)),
        "{st}"
    );
    assert!(
        a["reason"].as_str().unwrap().contains("250 in-flight"),
        "{st}"
    );
    assert_eq!(a["settings"]["target_concurrency"], 100);
    // The routers' per-instance load shows too (sum of their latest reports).
    for router in ["r1", "r2"] {
        let (st, _) = send(s.host(Method::POST, "/v1/router/demand").json(&json!({
            "router": router,
            "apps": [{"app": "busy", "period_ms": 1000, "concurrency": 7.0, "peak": 7,
                      "requests": 70, "waiting": 0,
                      "instances": [{"instance": "busy-0", "in_flight": 7}]}]
        })))
        .await;
        assert_eq!(st, StatusCode::OK);
    }
    let st = status(&s, "busy").await;
    assert_eq!(
        st["autoscale"]["in_flight_by_instance"],
        json!({"busy-0": 14}),
        "{st}"
    );
    assert!(a["requests_per_s"].as_f64().unwrap() > 0.0, "{st}");

    // `scale` changes the target and caps; invalid values are refused.
    let (st, v) = send(
        s.user(Method::POST, "/v1/apps/busy/scale")
            .json(&json!({"max": 2, "target_concurrency": 50, "max_concurrency": 500, "max_body_bytes": 2048})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["scale"], json!({"min": 1, "max": 2}));
    assert_eq!(v["autoscale"]["desired"], 2, "{v}");
    assert!(
        v["autoscale"]["reason"]
            .as_str()
            .unwrap()
            .contains("at max 2"),
        "{v}"
    );
    let (st, v) = send(
        s.user(Method::POST, "/v1/apps/busy/scale")
            .json(&json!({"min": 3})),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"], "invalid_scale");
    let (st, _) = send(
        s.user(Method::POST, "/v1/apps/nope/scale")
            .json(&json!({"min": 1})),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // The router learns the limits.
    let (_, routes) = send(s.host(Method::GET, "/v1/routes")).await;
    assert_eq!(
        routes["limits"]["busy"],
        json!({"max_concurrency": 500, "max_body_bytes": 2048, "target_concurrency": 50})
    );

    // Metrics: no token needed, no app names.
    let (st, text) = {
        let r = s.req(Method::GET, "/metrics", None).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert_eq!(st, StatusCode::OK);
    assert!(text.contains("stead_server_http_requests_total{method=\"POST\",route=\"/v1/agent/heartbeat\",class=\"2xx\"}"), "{text}");
    assert!(text.contains("stead_server_demand_reports_total"), "{text}");
    assert!(
        text.contains("stead_builds{state=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(text.contains("stead_hosts{state=\"alive\"} 1"), "{text}");
    assert!(!text.contains("busy"), "metrics must not name apps: {text}");
}

async fn long_polls_answer_on_change(s: TestServer) {
    let host = register(&s, "node-1").await;
    deploy_built(&s, &host, "polled", "min = 0\nmax = 2\nidle_timeout = 0\n").await;
    let r = heartbeat(&s, &host, "polled", 1, json!({})).await;
    let etag = r["etag"].as_str().unwrap().to_string();
    // Nothing changes: held for the wait, then the same state again.
    let t = Instant::now();
    let r = heartbeat(
        &s,
        &host,
        "polled",
        1,
        json!({"known": etag, "wait_ms": 400}),
    )
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r["etag"], json!(etag));
    // A burst during the hold answers at once with the new state.
    let held = {
        let s2 = (s.base.clone(), s.host.clone(), host.clone(), etag.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let t = Instant::now();
            let r: Value = client
                .post(format!("{}/v1/agent/heartbeat", s2.0))
                .bearer_auth(&s2.1)
                .json(
                    &json!({"host_id": s2.2 .0, "session": s2.2 .1, "instances": [
                    {"id": "polled-0", "app": "polled", "version": 1, "state": "ready",
                     "executor_id": "polled-0", "endpoint": "127.0.0.1:9100", "pid": 10,
                     "started_at_ms": 1, "exit": null}],
                    "known": s2.3, "wait_ms": 20000}),
                )
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (t.elapsed(), r)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    report(&s, "polled", 150.0, 0).await;
    let (took, r) = held.await.unwrap();
    assert!(took < Duration::from_secs(5), "held {took:?}");
    assert_ne!(r["etag"], json!(etag));
    assert_eq!(count(&r, "polled"), 2, "{r}");

    // Routes: held until the table changes (a second instance is ready).
    let (_, table) = send(s.host(Method::GET, "/v1/routes")).await;
    let tag = table["etag"].as_str().unwrap().to_string();
    let waiter = {
        let url = format!("{}/v1/routes?since={tag}&wait_ms=20000", s.base);
        let token = s.host.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let v: Value = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (t.elapsed(), v)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    heartbeat(&s, &host, "polled", 2, json!({})).await;
    let (took, table) = waiter.await.unwrap();
    assert!(took < Duration::from_secs(5), "held {took:?}");
    let eps = table["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["app"] == "polled")
        .unwrap()["endpoints"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(eps, 2, "{table}");
    assert_ne!(table["etag"], json!(tag));
    // Unchanged: held for the wait.
    let t = Instant::now();
    let tag = table["etag"].as_str().unwrap();
    let (_, same) = send(s.host(Method::GET, &format!("/v1/routes?since={tag}&wait_ms=300"))).await;
    assert!(t.elapsed() >= Duration::from_millis(250));
    assert_eq!(same["etag"], json!(tag));
}
