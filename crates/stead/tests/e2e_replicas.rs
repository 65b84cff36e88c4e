//! Two control-plane replicas on one PostgreSQL: they serve the same API
//! interchangeably, wake each other's long-polls, refuse a replica with
//! another secret key, and when one dies mid-deploy or while it runs the
//! durable-execution loop, the other finishes its work (the deploy
//! completes, a dead instance's workflow is recovered and completes with no
//! completed step run again).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{count, create_token, free_port, Proc, BIN};
use serde_json::Value;

struct Replicas {
    root: std::path::PathBuf,
    urls: [String; 2],
    servers: [Proc; 2],
    agent: Proc,
    _router: Proc,
    router_url: String,
    user_token: String,
    host_token: String,
}

fn server_args(root: &Path, db: &str, app_db: &str, port: u16, n: usize) -> Vec<String> {
    vec![
        "server".into(),
        "--database".into(),
        db.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        root.join(format!("server-{n}")).display().to_string(),
        "--secret-key-file".into(),
        root.join("secret.key").display().to_string(),
        "--app-database-url".into(),
        app_db.into(),
    ]
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .expect("client")
}

fn healthy(url: &str) -> bool {
    http()
        .get(format!("{url}/v1/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

impl Replicas {
    /// Waits for `f` to give a value (at most `within`), naming `what`.
    fn wait<T>(&self, what: &str, within: Duration, f: impl FnMut() -> Option<T>) -> T {
        common::wait_until(
            what,
            within,
            || {
                format!(
                    "server 0:\n{}\nserver 1:\n{}\nagent:\n{}",
                    self.servers[0].text(),
                    self.servers[1].text(),
                    self.agent.text()
                )
            },
            f,
        )
    }

    /// The CLI against replica `n`.
    fn cli(&self, n: usize, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .env("STEAD_API", &self.urls[n])
            .env("STEAD_TOKEN", &self.user_token)
            .env("STEAD_CONFIG_DIR", self.root.join("config"))
            .args(args)
            .output()
            .expect("cli")
    }

    fn ok(&self, n: usize, args: &[&str]) -> String {
        let out = self.cli(n, args);
        assert!(
            out.status.success(),
            "`stead {}` on replica {n} failed: {}\nserver 0:\n{}\nserver 1:\n{}\nagent:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.servers[0].text(),
            self.servers[1].text(),
            self.agent.text()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn json(&self, n: usize, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(n, args)).expect("json")
    }

    fn info(&self, n: usize) -> Option<Value> {
        http()
            .get(format!("{}/v1/info", self.urls[n]))
            .bearer_auth(&self.user_token)
            .send()
            .ok()?
            .json()
            .ok()
    }

    fn executions(&self, app: &str) -> Vec<Value> {
        match http()
            .get(format!("{}/apps/{app}/executions", self.router_url))
            .send()
        {
            Ok(r) if r.status().is_success() => r.json().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    fn workflow_status(&self, n: usize, app: &str, wf: &str) -> Option<String> {
        let out = self.cli(n, &["workflows", "get", app, wf, "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout).ok()?["status"]
            .as_str()
            .map(str::to_string)
    }
}

#[test]
fn two_replicas_on_postgresql_share_the_work_and_take_over() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(stead_store::testing::postgres_database());
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let db = pg.url.clone();
    let user_token = create_token(&db, &["--org", "acme"]);
    let host_token = create_token(&db, &["--host"]);
    let ports = [free_port(), free_port()];
    let urls = [0, 1].map(|n| format!("http://127.0.0.1:{}", ports[n]));
    // The first replica creates the key file; the second gets the same.
    let s0 = Proc::start(
        root.join("server-0.log"),
        server_args(root, &db, pg.admin_url(), ports[0], 0),
        Vec::new(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !healthy(&urls[0]) {
        assert!(Instant::now() < deadline, "replica 0: {}", s0.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let s1 = Proc::start(
        root.join("server-1.log"),
        server_args(root, &db, pg.admin_url(), ports[1], 1),
        Vec::new(),
    );
    // A replica with another key is refused before it serves anything.
    let mut wrong_args = server_args(root, &db, pg.admin_url(), free_port(), 2);
    let k = wrong_args
        .iter()
        .position(|a| a == "--secret-key-file")
        .expect("flag");
    wrong_args[k + 1] = root.join("other.key").display().to_string();
    let mut wrong = Proc::start(root.join("server-wrong.log"), wrong_args, Vec::new());
    let status = wrong
        .wait_exit(Duration::from_secs(60))
        .expect("a replica with another key must exit");
    assert!(!status.success());
    assert!(
        wrong.text().contains("another secret key"),
        "{}",
        wrong.text()
    );

    let router_port = free_port();
    let router_url = format!("http://127.0.0.1:{router_port}");
    // The agent talks to replica 1 first, the router to replica 0: a
    // change the agent reports reaches the router only through the
    // replicas' notifications (or, late, through its poll's timeout).
    let agent = Proc::start(
        root.join("agent.log"),
        vec![
            "agent".into(),
            "--server".into(),
            format!("{},{}", urls[1], urls[0]),
            "--token".into(),
            host_token.clone(),
            "--data-dir".into(),
            root.join("agent").display().to_string(),
            "--name".into(),
            "host-a".into(),
        ],
        Vec::new(),
    );
    let router = Proc::start(
        root.join("router.log"),
        vec![
            "router".into(),
            "--server".into(),
            format!("{},{}", urls[0], urls[1]),
            "--token".into(),
            host_token.clone(),
            "--listen".into(),
            format!("127.0.0.1:{router_port}"),
        ],
        Vec::new(),
    );
    let mut r = Replicas {
        root: root.to_path_buf(),
        urls,
        servers: [s0, s1],
        agent,
        _router: router,
        router_url,
        user_token,
        host_token,
    };
    r.wait("replica 1", Duration::from_secs(60), || {
        healthy(&r.urls[1]).then_some(())
    });
    r.wait("the router", Duration::from_secs(60), || {
        http()
            .get(format!("{}/_stead/health", r.router_url))
            .send()
            .ok()
            .filter(|x| x.status().is_success())
    });

    // 1. Deployed through replica 1, listed by replica 0, served.
    let app = "wf-repl";
    let dir = common::copy_example("dbos-python", root);
    r.ok(
        1,
        &[
            "deploy",
            dir.to_str().expect("p"),
            "--app",
            app,
            "--timeout",
            "900",
        ],
    );
    let apps = r.json(0, &["apps", "list", "--json"]);
    assert!(
        apps.as_array()
            .expect("apps")
            .iter()
            .any(|a| a["name"] == app && a["active_version"] == 1),
        "{apps}"
    );
    let db_status = r.json(0, &["db", "status", app, "--json"]);
    assert_eq!(
        db_status["kind"], "postgres",
        "replica 0 reads what replica 1 stored, secrets included: {db_status}"
    );

    // 2. A long-poll held by replica 0 wakes as soon as the state changes
    //    through replica 1 (its per-app limits, which are part of the
    //    route table): within milliseconds through the replicas'
    //    notifications, where a held long-poll's own re-check (every second)
    //    would take up to a second.
    let mut lags = Vec::new();
    for i in 0..5u32 {
        let table: Value = http()
            .get(format!("{}/v1/routes", r.urls[0]))
            .bearer_auth(&r.host_token)
            .send()
            .expect("routes")
            .json()
            .expect("json");
        let etag = table["etag"].as_str().expect("etag").to_string();
        let poll = {
            let url = format!("{}/v1/routes?since={etag}&wait_ms=25000", r.urls[0]);
            let token = r.host_token.clone();
            std::thread::spawn(move || {
                let v: Value = http()
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .expect("long-poll")
                    .json()
                    .expect("json");
                (Instant::now(), v)
            })
        };
        // Held by now (it is answered at once only if the table differs).
        std::thread::sleep(Duration::from_millis(300));
        let limit = (50 + i).to_string();
        r.ok(1, &["scale", app, "--max-concurrency", &limit]);
        let changed_at = Instant::now();
        let (answered_at, changed) = poll.join().expect("poll");
        assert_ne!(changed["etag"].as_str(), Some(etag.as_str()), "{changed}");
        assert_eq!(
            changed["limits"][app]["max_concurrency"].as_u64(),
            Some(u64::from(50 + i)),
            "{changed}"
        );
        lags.push(answered_at.saturating_duration_since(changed_at));
    }
    eprintln!(
        "replica 0's held routes long-poll answered {lags:?} after changes made through replica 1"
    );
    assert!(
        lags.iter().all(|l| *l < Duration::from_millis(500)),
        "a long-poll held by replica 0 must wake at once on a change through replica 1: {lags:?}"
    );
    r.ok(1, &["scale", app, "--max-concurrency", "0"]);

    // 3. The replica running the durable-execution loop dies, and so does
    //    the instance running a workflow: the other replica takes the loop
    //    over and recovers the workflow, which completes on a replacement
    //    with its completed step not run again.
    let holder = r.wait(
        "a durable-execution lease holder",
        Duration::from_secs(30),
        || {
            r.info(0)?["durable_execution_replica"]
                .as_str()
                .map(str::to_string)
        },
    );
    let holder_n = (0..2)
        .find(|&n| r.info(n).is_some_and(|i| i["replica"] == holder.as_str()))
        .expect("the holder is one of the replicas");
    let other = 1 - holder_n;
    r.wait("one instance", Duration::from_secs(60), || {
        let s = r.json(other, &["apps", "status", app, "--json"]);
        let live = s["instances"]
            .as_array()?
            .iter()
            .filter(|i| i["state"] == "ready")
            .count();
        (live == 1).then_some(())
    });
    let v: Value = http()
        .post(format!(
            "{}/apps/{app}/workflows/start?steps=3&step_seconds=0.5&gate=g1&gate_step=2",
            r.router_url
        ))
        .send()
        .expect("start")
        .json()
        .expect("json");
    let wf = v["workflow_id"].as_str().expect("id").to_string();
    let executor = r.wait("step 2 to start", Duration::from_secs(60), || {
        r.executions(app)
            .iter()
            .find(|e| e["workflow_id"] == wf.as_str() && e["step"] == 2 && e["event"] == "start")
            .and_then(|e| e["executor"].as_str().map(str::to_string))
    });
    let s = r.json(other, &["apps", "status", app, "--json"]);
    let pid = s["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["executor_id"] == executor.as_str()))
        .and_then(|i| i["pid"].as_u64())
        .expect("pid of the instance running the workflow");
    r.servers[holder_n].kill9();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill")
        .success());
    // Opened through the app (a replacement instance, once it runs).
    r.wait("the gate to open", Duration::from_secs(60), || {
        http()
            .post(format!("{}/apps/{app}/gates/g1", r.router_url))
            .send()
            .ok()
            .filter(|x| x.status().is_success())
    });
    let t0 = Instant::now();
    r.wait(
        "the workflow to complete after the lease holder and the instance died",
        Duration::from_secs(120),
        || {
            r.workflow_status(other, app, &wf)
                .filter(|s| s == "SUCCESS")
        },
    );
    eprintln!(
        "workflow recovered and completed {:?} after the kills",
        t0.elapsed()
    );
    let info = r.info(other).expect("info");
    assert_eq!(
        info["durable_execution_replica"], info["replica"],
        "the surviving replica holds the loop now: {info}"
    );
    let ex = r.executions(app);
    assert_eq!(count(&ex, &wf, 1, "start"), 1, "step 1 ran once: {ex:?}");
    assert!(count(&ex, &wf, 2, "start") >= 2, "{ex:?}");
    assert_eq!(count(&ex, &wf, 3, "end"), 1, "{ex:?}");
    let events: Value = http()
        .get(format!("{}/v1/apps/{app}/events", r.urls[other]))
        .bearer_auth(&r.user_token)
        .send()
        .expect("events")
        .json()
        .expect("json");
    assert!(
        events
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["kind"] == "recovery"
                && e["data"]["executors"]
                    .as_array()
                    .is_some_and(|x| x.iter().any(|x| x == executor.as_str()))),
        "{events}"
    );

    // 4. A replica dies in the middle of a deploy it accepted: the deploy
    //    completes through the other one.
    r.servers[holder_n].spawn();
    r.wait("the restarted replica", Duration::from_secs(60), || {
        healthy(&r.urls[holder_n]).then_some(())
    });
    std::fs::write(dir.join("CHANGED"), "v2\n").expect("write");
    let mut deploy = Command::new(BIN)
        .env("STEAD_API", &r.urls[holder_n])
        .env("STEAD_TOKEN", &r.user_token)
        .env("STEAD_CONFIG_DIR", root.join("config"))
        .args([
            "deploy",
            dir.to_str().expect("p"),
            "--app",
            app,
            "--timeout",
            "900",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("deploy");
    r.wait("version 2 to be recorded", Duration::from_secs(120), || {
        let v = r.json(other, &["apps", "versions", app, "--json"]);
        v.as_array()?.iter().any(|x| x["number"] == 2).then_some(())
    });
    r.servers[holder_n].kill9();
    let _ = deploy.kill();
    let _ = deploy.wait();
    r.wait(
        "version 2 to become active through the surviving replica",
        Duration::from_secs(600),
        || {
            let s = r.json(other, &["apps", "status", app, "--json"]);
            (s["active_version"] == 2).then_some(())
        },
    );
    let resp = http()
        .get(format!("{}/apps/{app}/healthz", r.router_url))
        .send()
        .expect("get");
    assert!(resp.status().is_success());

    // Leave no instance behind (a production agent keeps them running).
    r.ok(other, &["apps", "delete", app, "--yes"]);
    let instances = root.join("agent/instances");
    r.wait(
        "the app's instances to stop",
        Duration::from_secs(60),
        || {
            let left = std::fs::read_dir(&instances)
                .map(|d| d.count())
                .unwrap_or(0);
            (left == 0).then_some(())
        },
    );
    drop(r);
    drop(pg);
}
