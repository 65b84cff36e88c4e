//! The platform as separate processes (`stead server`, `stead agent`,
//! `stead router`), so that each can be killed on its own while a durable
//! workflow runs: killing the agent does not touch the instances (they are
//! adopted), killing the control plane does not touch the data plane, and an
//! instance that dies while its agent is down is recovered when the agent
//! comes back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{count, create_token, free_port, wait_clean_exit, Load, Proc, BIN};
use serde_json::Value;

struct Cluster {
    root: PathBuf,
    api: String,
    router: String,
    user_token: String,
    server: Proc,
    agent: Proc,
    _router: Proc,
}

impl Cluster {
    /// The apps' databases: SQLite files in the agent's data folder, or,
    /// with `app_databases`, a database and role per app on that
    /// PostgreSQL server.
    fn start(root: &Path, app_databases: Option<&str>) -> Cluster {
        let db = format!("sqlite://{}", root.join("stead.db").display());
        let user_token = create_token(&db, &["--org", "acme"]);
        let host_token = create_token(&db, &["--host"]);
        let (api_port, router_port) = (free_port(), free_port());
        let api = format!("http://127.0.0.1:{api_port}");
        let router = format!("http://127.0.0.1:{router_port}");
        let agent_data = root.join("agent");
        let server = Proc::start(
            root.join("server.log"),
            vec![
                "server".into(),
                "--database".into(),
                db.clone(),
                "--listen".into(),
                format!("127.0.0.1:{api_port}"),
                "--data-dir".into(),
                root.join("server").display().to_string(),
                "--router-url".into(),
                router.clone(),
            ]
            .into_iter()
            .chain(match app_databases {
                Some(url) => vec!["--app-database-url".to_string(), url.to_string()],
                // Single machine: the apps' SQLite databases live in the
                // agent's per-app data folders.
                None => vec![
                    "--app-database-dir".to_string(),
                    agent_data.join("appdata").display().to_string(),
                ],
            })
            .collect(),
            Vec::new(),
        );
        let agent = Proc::start(
            root.join("agent.log"),
            vec![
                "agent".into(),
                "--server".into(),
                api.clone(),
                "--token".into(),
                host_token.clone(),
                "--data-dir".into(),
                agent_data.display().to_string(),
                "--name".into(),
                "host-a".into(),
            ],
            Vec::new(),
        );
        let router_proc = Proc::start(
            root.join("router.log"),
            vec![
                "router".into(),
                "--server".into(),
                api.clone(),
                "--token".into(),
                host_token,
                "--listen".into(),
                format!("127.0.0.1:{router_port}"),
            ],
            Vec::new(),
        );
        let c = Cluster {
            root: root.to_path_buf(),
            api,
            router,
            user_token,
            server,
            agent,
            _router: router_proc,
        };
        c.wait_ready();
        c
    }

    fn wait_ready(&self) {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let api = client
                .get(format!("{}/v1/health", self.api))
                .send()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            let router = client
                .get(format!("{}/_stead/health", self.router))
                .send()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if api && router {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "components not ready:\n{}\n{}",
                self.server.text(),
                self.agent.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .env("STEAD_API", &self.api)
            .env("STEAD_TOKEN", &self.user_token)
            .env("STEAD_CONFIG_DIR", self.root.join("config"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cli")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`stead {}` failed:\n{}\nserver:\n{}\nagent:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.server.text(),
            self.agent.text()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("json")
    }

    fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
    }

    fn executions(&self, app: &str) -> Vec<Value> {
        match self
            .http()
            .get(format!("{}/apps/{app}/executions", self.router))
            .send()
        {
            Ok(r) if r.status().is_success() => r.json().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    fn status(&self, app: &str, wf: &str) -> Option<String> {
        let out = self.cli(&["workflows", "get", app, wf, "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout).ok()?["status"]
            .as_str()
            .map(str::to_string)
    }

    /// Deletes `app` and waits until its instances have stopped (a
    /// production agent leaves instances running when it stops).
    fn delete_and_wait(&self, app: &str) {
        self.ok(&["apps", "delete", app, "--yes"]);
        let instances = self.root.join("agent/instances");
        self.wait(
            "the app's instances to stop",
            Duration::from_secs(60),
            || {
                let left = std::fs::read_dir(&instances)
                    .map(|d| d.count())
                    .unwrap_or(0);
                (left == 0).then_some(())
            },
        );
    }

    fn wait<T>(&self, what: &str, within: Duration, f: impl FnMut() -> Option<T>) -> T {
        common::wait_until(
            what,
            within,
            || {
                format!(
                    "server:\n{}\nagent:\n{}",
                    self.server.text(),
                    self.agent.text()
                )
            },
            f,
        )
    }
}

fn start_gated(c: &Cluster, app: &str, gate: &str, gate_step: u32) -> String {
    let url = format!(
        "{}/apps/{app}/workflows/start?steps=3&step_seconds=0.3&gate={gate}&gate_step={gate_step}",
        c.router
    );
    let v: Value = c
        .http()
        .post(url)
        .send()
        .expect("start")
        .json()
        .expect("json");
    v["workflow_id"].as_str().expect("id").to_string()
}

fn open_gate(c: &Cluster, app: &str, gate: &str) {
    // Right after a component restart the first attempt may meet a stale
    // route; the test is about the workflow, not that race.
    c.wait("the gate to open", Duration::from_secs(30), || {
        let r = c
            .http()
            .post(format!("{}/apps/{app}/gates/{gate}", c.router))
            .send()
            .ok()?;
        r.status().is_success().then_some(())
    });
}

/// The ready instance (id, host pid), if there is one now.
fn ready_instance(c: &Cluster, app: &str) -> Option<(String, u64)> {
    let s = c.json(&["apps", "status", app, "--json"]);
    let i = s["instances"]
        .as_array()?
        .iter()
        .find(|i| i["state"] == "ready")?
        .clone();
    Some((i["id"].as_str()?.to_string(), i["pid"].as_u64()?))
}

fn instance_pid(c: &Cluster, app: &str) -> (String, u64) {
    c.wait("a ready instance", Duration::from_secs(60), || {
        ready_instance(c, app)
    })
}

#[test]
fn agent_and_control_plane_die_separately_during_workflows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(tmp.path(), None);
    die_separately(&mut c, tmp.path(), "dbos-python", "wf-parts");
}

/// The same with the current Python app's system database on PostgreSQL
/// (a database and role the platform provisions for it).
#[test]
fn python_app_on_postgres_agent_and_control_plane_die_separately_during_workflows() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(stead_store::testing::postgres_database());
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(tmp.path(), Some(pg.admin_url()));
    die_separately(&mut c, tmp.path(), "dbos-python", "wf-parts-pg");
}

/// The same with the Python app on `dbos` 2.31, whose workflows are
/// recovered through its DBOS admin endpoint.
#[test]
fn python_2_app_agent_and_control_plane_die_separately_during_workflows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(tmp.path(), None);
    die_separately(&mut c, tmp.path(), "dbos-python2", "wf-parts-py2");
}

/// The same with the Rust app on the `dbos` crate, whose system database
/// is PostgreSQL (a database and role the platform provisions for it).
#[test]
fn rust_app_agent_and_control_plane_die_separately_during_workflows() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(stead_store::testing::postgres_database());
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(tmp.path(), Some(pg.admin_url()));
    die_separately(&mut c, tmp.path(), "dbos-rust", "wf-parts-rs");
}

/// Kills the agent, then the control plane, then an instance while its
/// agent is down, each during a workflow of `example` deployed as `app`.
fn die_separately(c: &mut Cluster, root: &Path, example: &str, app: &str) {
    let dir = common::copy_example(example, root);
    c.ok(&[
        "deploy",
        dir.to_str().expect("p"),
        "--app",
        app,
        "--timeout",
        "900",
    ]);

    // 1. Kill the agent mid-workflow: the instance keeps running; the new
    //    agent adopts it (same instance), and the workflow completes with
    //    every step once.
    let wf = start_gated(c, app, "g1", 2);
    c.wait("step 2 to start", Duration::from_secs(60), || {
        (count(&c.executions(app), &wf, 2, "start") > 0).then_some(())
    });
    let (before, _) = instance_pid(c, app);
    c.agent.kill9();
    c.agent.spawn();
    c.wait(
        "the restarted agent to report the adopted instance",
        Duration::from_secs(60),
        || {
            let (id, _) = ready_instance(c, app)?;
            (id == before).then_some(())
        },
    );
    open_gate(c, app, "g1");
    c.wait("workflow 1 to finish", Duration::from_secs(60), || {
        c.status(app, &wf).filter(|s| s == "SUCCESS")
    });
    let ex = c.executions(app);
    for step in 1..=3 {
        assert_eq!(count(&ex, &wf, step, "start"), 1, "step {step}: {ex:?}");
    }
    let s = c.json(&["apps", "status", app, "--json"]);
    assert_eq!(
        s["instances"].as_array().map(Vec::len),
        Some(1),
        "no duplicate instance: {s}"
    );

    // 2. Kill the control plane mid-workflow: the data plane goes on, and
    //    the workflow completes; the restarted control plane sees it.
    let wf2 = start_gated(c, app, "g2", 2);
    c.wait("step 2 to start", Duration::from_secs(60), || {
        (count(&c.executions(app), &wf2, 2, "start") > 0).then_some(())
    });
    c.server.kill9();
    // The router keeps routing with its last table while the control plane
    // is away.
    open_gate(c, app, "g2");
    c.server.spawn();
    c.wait_ready();
    c.wait("workflow 2 to finish", Duration::from_secs(60), || {
        c.status(app, &wf2).filter(|s| s == "SUCCESS")
    });
    let ex = c.executions(app);
    for step in 1..=3 {
        assert_eq!(count(&ex, &wf2, step, "start"), 1, "step {step}: {ex:?}");
    }

    // 3. The instance dies while its agent is down: the restarted agent
    //    reports it, a replacement starts, and the dead executor's workflow
    //    is recovered and completes; step 1 is not run again.
    let wf3 = start_gated(c, app, "g3", 2);
    c.wait("step 2 to start", Duration::from_secs(60), || {
        (count(&c.executions(app), &wf3, 2, "start") > 0).then_some(())
    });
    let (victim, pid) = instance_pid(c, app);
    c.agent.kill9();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill")
        .success());
    c.agent.spawn();
    c.wait("a replacement instance", Duration::from_secs(60), || {
        let (id, _) = ready_instance(c, app)?;
        (id != victim).then_some(())
    });
    open_gate(c, app, "g3");
    c.wait(
        "workflow 3 to finish on the replacement",
        Duration::from_secs(120),
        || c.status(app, &wf3).filter(|s| s == "SUCCESS"),
    );
    let ex = c.executions(app);
    assert_eq!(
        count(&ex, &wf3, 1, "start"),
        1,
        "step 1 had completed: {ex:?}"
    );
    assert!(
        count(&ex, &wf3, 2, "start") >= 2,
        "step 2 was interrupted and ran again: {ex:?}"
    );
    assert_eq!(count(&ex, &wf3, 3, "end"), 1, "{ex:?}");
    let events: Value = c
        .http()
        .get(format!("{}/v1/apps/{app}/events", c.api))
        .bearer_auth(&c.user_token)
        .send()
        .expect("events")
        .json()
        .expect("json");
    let recovered = events.as_array().expect("events").iter().any(|e| {
        e["kind"] == "recovery"
            && e["data"]["executors"]
                .as_array()
                .is_some_and(|x| x.iter().any(|x| x == victim.as_str()))
    });
    assert!(
        recovered,
        "the event log must show the recovery of {victim}: {events}"
    );

    // A production agent leaves its instances running when it stops (so a
    // restart costs nothing): delete the app so the test leaves none behind.
    c.delete_and_wait(app);
}

/// Replacing the agent's binary under load: a new `stead agent` started on
/// the running agent's data directory takes over its sockets, three times
/// in a row, while requests (each reading the app's PostgreSQL system
/// database through the agent's relay) keep coming on keep-alive and on new
/// connections, and a workflow runs. No request fails, the instance is
/// neither restarted nor duplicated, the app's database connections are the
/// same backends afterwards (the relays were handed over, not cut), and the
/// workflow completes with every step once.
#[test]
fn agent_replaced_under_load_fails_no_request() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(stead_store::testing::postgres_database());
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(tmp.path(), Some(pg.admin_url()));
    let app = "handover";
    let dir = common::copy_example("dbos-python", tmp.path());
    c.ok(&[
        "deploy",
        dir.to_str().expect("p"),
        "--app",
        app,
        "--timeout",
        "900",
    ]);
    let wf = start_gated(&c, app, "g1", 2);
    c.wait("step 2 to start", Duration::from_secs(60), || {
        (count(&c.executions(app), &wf, 2, "start") > 0).then_some(())
    });
    let (instance, pid) = instance_pid(&c, app);

    // The app's connections to its databases (through the agent's relay).
    let backends = || -> Vec<String> {
        let out = Command::new("psql")
            .args([
                pg.admin_url(),
                "-Atc",
                "SELECT pid || '@' || backend_start FROM pg_stat_activity \
                 WHERE datname LIKE 'stead_handover%' ORDER BY 1",
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let before = backends();
    assert!(!before.is_empty(), "the app holds database connections");

    // Steady load: one keep-alive client and one that connects anew for
    // every request, each request a read of the system database.
    let url = format!("{}/apps/{app}/workflows/{wf}", c.router);
    let (kept, fresh) = (Load::start(&url, 1, false), Load::start(&url, 1, true));
    let answered = || kept.answered() + fresh.answered();
    c.wait("the load to run", Duration::from_secs(30), || {
        (answered() >= 20).then_some(())
    });

    for round in 1..=3 {
        let served_before = answered();
        let mut successor = Proc::start(
            c.root.join(format!("agent-{round}.log")),
            c.agent.args.clone(),
            Vec::new(),
        );
        if let Some(mut old) = c.agent.child.take() {
            let what = format!("round {round}: the old agent, after handing over");
            wait_clean_exit(&mut old, Duration::from_secs(60), &what, || {
                format!("old:\n{}\nnew:\n{}", c.agent.text(), successor.text())
            });
        }
        assert!(
            successor
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("wait")
                .is_none(),
            "round {round}: the new agent exited:\n{}",
            successor.text()
        );
        // `successor` is now the old agent's (exited) process.
        std::mem::swap(&mut c.agent, &mut successor);
        drop(successor);
        // It logs so once it holds the lock, which the old one released
        // as it exited.
        c.wait(
            "the new agent to take over",
            Duration::from_secs(30),
            || {
                c.agent
                    .text()
                    .contains("took over from the previous agent")
                    .then_some(())
            },
        );
        // Requests go on through the new agent's forwarders.
        c.wait(
            "requests after the hand-over",
            Duration::from_secs(30),
            || (answered() >= served_before + 20).then_some(()),
        );
        // The heartbeat of the new agent reports the same instance.
        c.wait("the new agent's heartbeat", Duration::from_secs(30), || {
            let (id, p) = ready_instance(&c, app)?;
            (id == instance && p == pid).then_some(())
        });
    }
    let (kept_ok, kept_failed, mut failures) = kept.finish();
    let (fresh_ok, fresh_failed, more) = fresh.finish();
    failures.extend(more);
    let (ok, failed) = (kept_ok + fresh_ok, kept_failed + fresh_failed);
    println!("agent replaced 3 times under load: {ok} requests answered, {failed} failed");
    assert_eq!(failed, 0, "failed requests: {failures:?}");
    let after = backends();
    let cut: Vec<_> = before.iter().filter(|b| !after.contains(b)).collect();
    assert!(
        cut.is_empty(),
        "database connections cut by the hand-over: {cut:?} (before {before:?}, after {after:?})"
    );
    let s = c.json(&["apps", "status", app, "--json"]);
    assert_eq!(s["instances"].as_array().map(Vec::len), Some(1), "{s}");

    open_gate(&c, app, "g1");
    c.wait("the workflow to finish", Duration::from_secs(60), || {
        c.status(app, &wf).filter(|s| s == "SUCCESS")
    });
    let ex = c.executions(app);
    for step in 1..=3 {
        assert_eq!(count(&ex, &wf, step, "start"), 1, "step {step}: {ex:?}");
    }
    c.delete_and_wait(app);
}
