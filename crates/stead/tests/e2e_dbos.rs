//! Instances die, workflows do not: real DBOS applications (from the
//! registries) deployed through `stead dev`, killed mid-step, redeployed
//! mid-workflow, and run through platform crashes. Each app records every
//! step *execution* in its data folder (`GET /executions`), so the tests can
//! tell a step that ran again from one that did not.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{copy_example, count, tail, Dev};
use serde_json::Value;

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

fn start_workflow(dev: &Dev, app: &str, steps: u32, step_seconds: f64) -> String {
    start_gated(dev, app, steps, step_seconds, None)
}

/// A workflow whose step `gate.1` stays open until `open_gate(gate.0)`.
fn start_gated(
    dev: &Dev,
    app: &str,
    steps: u32,
    step_seconds: f64,
    gate: Option<(&str, u32)>,
) -> String {
    let mut url = format!(
        "{}/apps/{app}/workflows/start?steps={steps}&step_seconds={step_seconds}",
        dev.router()
    );
    if let Some((name, step)) = gate {
        url.push_str(&format!("&gate={name}&gate_step={step}"));
    }
    let resp = http().post(&url).send().expect("start workflow");
    assert!(
        resp.status().is_success(),
        "starting a workflow failed: {}",
        resp.status()
    );
    let v: Value = resp.json().expect("json");
    v["workflow_id"].as_str().expect("workflow_id").to_string()
}

fn open_gate(dev: &Dev, app: &str, name: &str) {
    let resp = http()
        .post(format!("{}/apps/{app}/gates/{name}", dev.router()))
        .send()
        .expect("gate");
    let status = resp.status();
    let body = resp.text().unwrap_or_default();
    assert!(
        status.is_success(),
        "opening gate {name}: {status}: {body}\ndev log:\n{}",
        tail(&dev.log_text(), 40)
    );
}

fn executions(dev: &Dev, app: &str) -> Vec<Value> {
    match http()
        .get(format!("{}/apps/{app}/executions", dev.router()))
        .send()
    {
        Ok(r) if r.status().is_success() => r.json::<Vec<Value>>().unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The dev log's last lines without the router's access lines (the tests
/// poll through the router, which would drown everything else).
fn quiet_tail(dev: &Dev) -> String {
    let text: Vec<String> = dev
        .log_text()
        .lines()
        .filter(|l| !l.contains("stead_router::access"))
        .map(str::to_string)
        .collect();
    tail(&text.join("\n"), 80)
}

fn wait_for<T>(what: &str, within: Duration, dev: &Dev, f: impl FnMut() -> Option<T>) -> T {
    common::wait_until(what, within, || format!("dev log:\n{}", quiet_tail(dev)), f)
}

fn workflow_status(dev: &Dev, app: &str, wf: &str) -> Option<String> {
    let out = dev.run(&["workflows", "get", app, wf, "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["status"].as_str().map(str::to_string)
}

fn deploy_example(
    dev: &Dev,
    example: &str,
    app: &str,
    tmp: &std::path::Path,
) -> std::path::PathBuf {
    let dir = copy_example(example, tmp);
    dev.ok(&[
        "deploy",
        dir.to_str().expect("path"),
        "--app",
        app,
        "--timeout",
        "900",
    ]);
    dir
}

/// The app's event log (`GET /v1/apps/{app}/events`).
fn events(dev: &Dev, app: &str) -> Value {
    http()
        .get(format!("{}/v1/apps/{app}/events", dev.api()))
        .bearer_auth(dev.token())
        .send()
        .expect("events")
        .json()
        .expect("json")
}

/// The instance (from `stead apps status`) that runs executor `executor`.
fn instance_of(dev: &Dev, app: &str, executor: &str) -> Value {
    let status = dev.json(&["apps", "status", app, "--json"]);
    status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["executor_id"] == executor)
        .unwrap_or_else(|| panic!("no instance runs executor {executor}: {status}"))
        .clone()
}

/// Kills -9 the instance running `wf` while its step 2 runs; the workflow
/// completes on the replacement, step 1 is not run again, and the event log
/// shows the recovery of the dead executor.
fn kill_mid_step(dev: &Dev, app: &str) {
    let wf = start_workflow(dev, app, 4, 2.0);
    let executor = wait_for("step 2 to start", Duration::from_secs(60), dev, || {
        let ex = executions(dev, app);
        ex.iter()
            .find(|e| e["workflow_id"] == wf.as_str() && e["step"] == 2 && e["event"] == "start")
            .and_then(|e| e["executor"].as_str().map(str::to_string))
    });
    let victim = instance_of(dev, app, &executor);
    let pid = victim["pid"].as_u64().expect("pid");
    let killed_at = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let done = wait_for(
        "the workflow to complete after the kill",
        Duration::from_secs(120),
        dev,
        || workflow_status(dev, app, &wf).filter(|s| s == "SUCCESS"),
    );
    assert_eq!(done, "SUCCESS");
    eprintln!(
        "{app}: workflow {wf} completed {:?} after kill -9 of its instance",
        killed_at.elapsed()
    );
    let ex = executions(dev, app);
    assert_eq!(
        count(&ex, &wf, 1, "start"),
        1,
        "step 1 had completed and must not run again: {ex:?}"
    );
    assert_eq!(count(&ex, &wf, 1, "end"), 1, "{ex:?}");
    assert!(
        count(&ex, &wf, 2, "start") >= 2,
        "step 2 was interrupted and must run again: {ex:?}"
    );
    assert_eq!(count(&ex, &wf, 2, "end"), 1, "{ex:?}");
    for step in [3, 4] {
        assert_eq!(count(&ex, &wf, step, "start"), 1, "step {step}: {ex:?}");
        assert_eq!(count(&ex, &wf, step, "end"), 1, "step {step}: {ex:?}");
    }
    let ev = events(dev, app);
    let recovery = ev
        .as_array()
        .expect("events")
        .iter()
        .find(|e| {
            e["kind"] == "recovery"
                && e["data"]["executors"]
                    .as_array()
                    .is_some_and(|x| x.iter().any(|x| x == executor.as_str()))
        })
        .unwrap_or_else(|| panic!("no recovery event for executor {executor}: {ev}"));
    eprintln!("{app}: recovery event: {}", recovery["message"]);
}

/// Deploys a new version while a long workflow runs on the old one: new
/// requests go to the new version at once, the old instance lives until the
/// workflow finishes, then stops.
fn deploy_during_workflow(dev: &Dev, app: &str, dir: &std::path::Path) {
    // Step 2 stays open until the test has seen the deploy through.
    let gate = format!("deploy-{}", std::process::id());
    let wf = start_gated(dev, app, 3, 0.5, Some((&gate, 2)));
    wait_for("step 1 to start", Duration::from_secs(60), dev, || {
        (count(&executions(dev, app), &wf, 1, "start") > 0).then_some(())
    });
    let before = dev.json(&["apps", "status", app, "--json"]);
    let old_version = before["active_version"].as_u64().expect("active");
    // A changed bundle: a new file is enough for a new version.
    std::fs::write(dir.join("CHANGED"), "v-next\n").expect("write");
    dev.ok(&[
        "deploy",
        dir.to_str().expect("path"),
        "--app",
        app,
        "--timeout",
        "900",
    ]);
    let (status, version, _) = dev.get(app, "/healthz");
    assert_eq!(status, 200);
    assert_eq!(
        version.as_deref(),
        Some((old_version + 1).to_string().as_str()),
        "new requests go to the new version"
    );
    // The old instance still runs (the workflow is not finished).
    let mid = dev.json(&["apps", "status", app, "--json"]);
    let old_live = mid["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .any(|i| i["version"].as_u64() == Some(old_version) && i["state"] != "exited");
    assert!(
        old_live,
        "the old version must keep running while its workflow runs: {mid}"
    );
    assert_ne!(
        workflow_status(dev, app, &wf).as_deref(),
        Some("SUCCESS"),
        "the test needs the workflow to outlive the deploy"
    );
    // The old instance is not stopped while it works, whatever the time.
    std::thread::sleep(Duration::from_secs(3));
    let still = dev.json(&["apps", "status", app, "--json"]);
    assert!(
        still["instances"]
            .as_array()
            .expect("i")
            .iter()
            .any(|i| i["version"].as_u64() == Some(old_version) && i["state"] == "ready"),
        "the old version must not be stopped while its workflow runs: {still}"
    );
    // The gate file lives in the app's data folder: opening it through the
    // new version reaches the old version's step.
    open_gate(dev, app, &gate);
    wait_for(
        "the workflow to finish on the old version",
        Duration::from_secs(120),
        dev,
        || workflow_status(dev, app, &wf).filter(|s| s == "SUCCESS"),
    );
    let ex = executions(dev, app);
    let versions: Vec<&Value> = ex
        .iter()
        .filter(|e| e["workflow_id"] == wf.as_str())
        .map(|e| &e["version"])
        .collect();
    assert!(
        versions
            .iter()
            .all(|v| v.as_str() == Some(old_version.to_string().as_str())),
        "every step ran on the old version: {ex:?}"
    );
    for step in 1..=3 {
        assert_eq!(
            count(&ex, &wf, step, "start"),
            1,
            "step {step} ran once: {ex:?}"
        );
    }
    wait_for(
        "the old instance to stop once drained",
        Duration::from_secs(60),
        dev,
        || {
            let s = dev.json(&["apps", "status", app, "--json"]);
            let old = s["instances"]
                .as_array()
                .map(|a| {
                    a.iter().any(|i| {
                        i["version"].as_u64() == Some(old_version) && i["state"] != "exited"
                    })
                })
                .unwrap_or(true);
            (!old).then_some(())
        },
    );
}

/// SIGKILL of the whole platform (agent and control plane at once) while a
/// workflow runs: the instance keeps running, the restarted platform adopts
/// it, and the workflow completes with no step run twice.
fn platform_crash_during_workflow(dev: &mut Dev, app: &str) {
    let wf = start_workflow(dev, app, 3, 2.0);
    wait_for("step 1 to start", Duration::from_secs(60), dev, || {
        (count(&executions(dev, app), &wf, 1, "start") > 0).then_some(())
    });
    dev.crash();
    dev.restart(&[]);
    wait_for(
        "the workflow to complete after the platform crash",
        Duration::from_secs(120),
        dev,
        || workflow_status(dev, app, &wf).filter(|s| s == "SUCCESS"),
    );
    let ex = executions(dev, app);
    for step in 1..=3 {
        assert_eq!(
            count(&ex, &wf, step, "start"),
            1,
            "step {step} ran once: {ex:?}"
        );
        assert_eq!(
            count(&ex, &wf, step, "end"),
            1,
            "step {step} ended once: {ex:?}"
        );
    }
}

#[test]
fn dbos_python_current_on_sqlite() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut dev = Dev::start(tmp.path());
    let app = "wf-py3";
    let dir = deploy_example(&dev, "dbos-python", app, tmp.path());
    let db = dev.json(&["db", "status", app, "--json"]);
    assert_eq!(db["kind"], "sqlite", "{db}");
    kill_mid_step(&dev, app);
    deploy_during_workflow(&dev, app, &dir);
    platform_crash_during_workflow(&mut dev, app);
}

#[test]
fn dbos_python_current_on_postgres() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(stead_store::testing::postgres_database());
    let tmp = tempfile::tempdir().expect("tmp");
    let admin = pg.admin_url().to_string();
    let mut dev = Dev::start_with_env(tmp.path(), &[("STEAD_APP_DATABASE_URL", admin.as_str())]);
    let app = "wf-py3-pg";
    let dir = deploy_example(&dev, "dbos-python", app, tmp.path());
    let db = dev.json(&["db", "status", app, "--json"]);
    assert_eq!(db["kind"], "postgres", "{db}");
    assert!(
        db["app_url"].as_str().unwrap_or("").contains("****"),
        "passwords are masked: {db}"
    );
    // Another app gets a database and role of its own; neither role can
    // open the other's database.
    let other = "wf-py3-pg-other";
    let hello = copy_example("hello-python", &tmp.path().join("other"));
    dev.ok(&["deploy", hello.to_str().expect("path"), "--app", other]);
    let mine = dev.ok(&["db", "url", app]).trim().to_string();
    let theirs = dev.ok(&["db", "url", other]).trim().to_string();
    let psql = |url: &str| {
        std::process::Command::new("psql")
            .args([url, "-tAc", "select 1"])
            .output()
            .expect("psql")
    };
    let own = psql(&mine);
    assert!(
        own.status.success(),
        "an app's role opens its own database: {}",
        String::from_utf8_lossy(&own.stderr)
    );
    let their_db = theirs.rsplit('/').next().expect("db name");
    let (base, _) = mine.rsplit_once('/').expect("url");
    let cross = psql(&format!("{base}/{their_db}"));
    assert!(
        !cross.status.success(),
        "app {app}'s role must not open {other}'s database"
    );
    assert!(
        String::from_utf8_lossy(&cross.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&cross.stderr)
    );
    kill_mid_step(&dev, app);
    deploy_during_workflow(&dev, app, &dir);
    platform_crash_during_workflow(&mut dev, app);
}

#[test]
fn dbos_python_2_admin_endpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut dev = Dev::start(tmp.path());
    let app = "wf-py2";
    let dir = deploy_example(&dev, "dbos-python2", app, tmp.path());
    kill_mid_step(&dev, app);
    deploy_during_workflow(&dev, app, &dir);
    platform_crash_during_workflow(&mut dev, app);
}

/// The processes under `pid` (its descendants, `pid` included) whose
/// command line contains `needle`.
fn descendants_running(pid: u32, needle: &str) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The command may hold spaces and parentheses: fields after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|x| x.parse().ok()) {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut found = Vec::new();
    let mut todo = vec![pid];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        seen += 1;
        assert!(seen < 10_000, "process tree too large");
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(needle)
        {
            found.push(p);
        }
        todo.extend(children.get(&p).cloned().unwrap_or_default());
    }
    found
}

/// A hung instance (its process frozen with SIGSTOP in the middle of a
/// workflow step: the port still accepts connections, nothing answers) is
/// declared dead once its health check has failed for `health_timeout`,
/// killed, replaced, and its workflow resumes on the replacement without
/// re-running the step that had completed.
#[test]
fn hung_instance_is_killed_and_its_workflow_recovered() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app = "wf-hung";
    let dir = copy_example("dbos-python", tmp.path());
    std::fs::write(
        dir.join("stead.toml"),
        "name = \"wf-hung\"\n[build]\nlanguage = \"python\"\n\
         [run]\nstart = \"python3 app.py\"\nhealth = \"/healthz\"\nhealth_timeout = 3\n",
    )
    .expect("stead.toml");
    dev.ok(&["deploy", dir.to_str().expect("path"), "--timeout", "900"]);
    let wf = start_workflow(&dev, app, 4, 2.0);
    let executor = wait_for("step 2 to start", Duration::from_secs(60), &dev, || {
        executions(&dev, app)
            .iter()
            .find(|e| e["workflow_id"] == wf.as_str() && e["step"] == 2 && e["event"] == "start")
            .and_then(|e| e["executor"].as_str().map(str::to_string))
    });
    let victim = instance_of(&dev, app, &executor);
    let sandbox_pid = victim["pid"].as_u64().expect("pid") as u32;
    let app_pids = descendants_running(sandbox_pid, "app.py");
    assert!(
        !app_pids.is_empty(),
        "the app's process under sandbox {sandbox_pid}"
    );
    let frozen_at = Instant::now();
    for p in &app_pids {
        assert!(std::process::Command::new("kill")
            .args(["-STOP", &p.to_string()])
            .status()
            .expect("kill")
            .success());
    }
    // Frozen, not dead: until the health timeout the agent must not act.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        std::path::Path::new(&format!("/proc/{}", app_pids[0])).exists(),
        "a frozen instance is not killed before its health timeout"
    );
    let done = wait_for(
        "the workflow to complete after its instance hung",
        Duration::from_secs(120),
        &dev,
        || workflow_status(&dev, app, &wf).filter(|s| s == "SUCCESS"),
    );
    assert_eq!(done, "SUCCESS");
    eprintln!(
        "{app}: workflow {wf} completed {:?} after its instance was frozen",
        frozen_at.elapsed()
    );
    for p in &app_pids {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "the hung process {p} must be killed: {stat}"
        );
    }
    let ex = executions(&dev, app);
    assert_eq!(count(&ex, &wf, 1, "start"), 1, "step 1 ran once: {ex:?}");
    assert_eq!(count(&ex, &wf, 2, "end"), 1, "{ex:?}");
    for step in [3, 4] {
        assert_eq!(count(&ex, &wf, step, "end"), 1, "step {step}: {ex:?}");
    }
    let ev = events(&dev, app);
    let events = ev.as_array().expect("events");
    let exited = events
        .iter()
        .find(|e| e["kind"] == "instance_exited" && e["data"]["instance"] == victim["id"])
        .unwrap_or_else(|| panic!("no exit event for the hung instance: {ev}"));
    assert!(
        exited["message"]
            .as_str()
            .unwrap_or("")
            .contains("stopped answering its health check"),
        "the exit names the health check: {exited}"
    );
    assert!(
        events.iter().any(|e| e["kind"] == "recovery"
            && e["data"]["executors"]
                .as_array()
                .is_some_and(|x| x.iter().any(|x| x == executor.as_str()))),
        "no recovery event for executor {executor}: {ev}"
    );
}

#[test]
fn workflow_management_through_the_cli() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app = "wf-mgmt";
    deploy_example(&dev, "dbos-python", app, tmp.path());
    let wf = start_workflow(&dev, app, 3, 1.0);
    wait_for(
        "the workflow to finish",
        Duration::from_secs(60),
        &dev,
        || workflow_status(&dev, app, &wf).filter(|s| s == "SUCCESS"),
    );
    let list = dev.json(&["workflows", "list", app, "--json"]);
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .any(|w| w["id"] == wf.as_str()),
        "{list}"
    );
    let steps = dev.json(&["workflows", "steps", app, &wf, "--json"]);
    assert!(steps.as_array().map(Vec::len).unwrap_or(0) >= 3, "{steps}");
    // Fork from step 3: steps 1 and 2 are not run again.
    let out = dev.ok(&["workflows", "fork", app, &wf, "--step", "3"]);
    let forked = out.trim().to_string();
    assert!(!forked.is_empty());
    wait_for("the fork to finish", Duration::from_secs(60), &dev, || {
        workflow_status(&dev, app, &forked).filter(|s| s == "SUCCESS")
    });
    let ex = executions(&dev, app);
    assert_eq!(count(&ex, &forked, 1, "start"), 0, "{ex:?}");
    assert_eq!(count(&ex, &forked, 2, "start"), 0, "{ex:?}");
    assert_eq!(count(&ex, &forked, 3, "start"), 1, "{ex:?}");
    // Cancel a long one once step 2 has completed, then resume it: the
    // steps recorded before the cancel are not run again (the step running
    // when it was cancelled may be: steps are at-least-once).
    let long = start_workflow(&dev, app, 5, 1.0);
    wait_for("step 3 to start", Duration::from_secs(60), &dev, || {
        (count(&executions(&dev, app), &long, 3, "start") > 0).then_some(())
    });
    dev.ok(&["workflows", "cancel", app, &long]);
    assert_eq!(
        workflow_status(&dev, app, &long).as_deref(),
        Some("CANCELLED")
    );
    dev.ok(&["workflows", "resume", app, &long]);
    wait_for(
        "the resumed workflow to finish",
        Duration::from_secs(90),
        &dev,
        || workflow_status(&dev, app, &long).filter(|s| s == "SUCCESS"),
    );
    let mut by_step: HashMap<u64, usize> = HashMap::new();
    for e in executions(&dev, app)
        .iter()
        .filter(|e| e["workflow_id"] == long.as_str() && e["event"] == "start")
    {
        *by_step.entry(e["step"].as_u64().unwrap_or(0)).or_default() += 1;
    }
    for step in [1, 2] {
        assert_eq!(
            by_step.get(&step),
            Some(&1),
            "step {step} had completed: it must not run again: {by_step:?}"
        );
    }
    for step in 3..=5 {
        assert!(
            by_step.get(&step).is_some_and(|n| *n >= 1),
            "step {step} ran: {by_step:?}"
        );
    }
    // Unknown workflow: a clear error.
    let out = dev.run(&["workflows", "get", app, "no-such-workflow"]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("no-such-workflow"),
        "{}",
        common::stderr(&out)
    );
}

/// A two-step rollout while a workflow runs on the old version: each step
/// is promoted only once the previous is live and older instances drained;
/// the platform is killed mid-rollout and the rollout finishes after the
/// restart.
#[test]
fn rollout_waits_for_drain_and_survives_a_crash() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut dev = Dev::start(tmp.path());
    let app = "wf-roll";
    deploy_example(&dev, "dbos-python", app, tmp.path());
    let gate = format!("rollout-{}", std::process::id());
    let wf = start_gated(&dev, app, 3, 0.5, Some((&gate, 2)));
    wait_for("step 1", Duration::from_secs(60), &dev, || {
        (count(&executions(&dev, app), &wf, 1, "start") > 0).then_some(())
    });
    let mut steps = Vec::new();
    for (i, marker) in ["step-a", "step-b"].iter().enumerate() {
        let d = tmp.path().join(format!("roll-{i}"));
        common::copy_dir(&common::repo_root().join("examples/dbos-python"), &d);
        std::fs::write(d.join("CHANGED"), marker).expect("write");
        steps.push(d);
    }
    let log = tmp.path().join("rollout.log");
    let logf = std::fs::File::create(&log).expect("log");
    let mut rollout = dev
        .cli()
        .args([
            "rollout",
            app,
            steps[0].to_str().expect("p"),
            steps[1].to_str().expect("p"),
            "--timeout",
            "900",
        ])
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("rollout");
    // Step 1 (v2) becomes active, but v1 still drains its workflow: the
    // rollout must wait there.
    wait_for(
        "the rollout to reach its first step",
        Duration::from_secs(600),
        &dev,
        || {
            let s = dev.json(&["apps", "status", app, "--json"]);
            (s["rollout"]["state"] == "running" && s["active_version"] == 2).then_some(())
        },
    );
    let s = dev.json(&["apps", "status", app, "--json"]);
    assert_eq!(
        s["rollout"]["step"], 0,
        "must wait for v1 to drain before promoting v3: {s}"
    );
    assert!(
        s["instances"]
            .as_array()
            .expect("i")
            .iter()
            .any(|i| i["version"] == 1 && i["state"] != "exited"),
        "v1 still runs its workflow: {s}"
    );
    // Kill everything mid-rollout; the CLI following it fails, the rollout
    // itself must not.
    dev.crash();
    let _ = rollout.wait();
    dev.restart(&[]);
    // Still waiting on v1's workflow after the restart (once the restarted
    // agent has re-attached to the running instances).
    let restarted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    wait_for(
        "the adopted instances to be ready again",
        Duration::from_secs(60),
        &dev,
        || {
            // A heartbeat of the restarted agent, not the rows the crash left.
            let hosts = dev.json(&["hosts", "list", "--json"]);
            if hosts[0]["last_heartbeat_ms"].as_i64().unwrap_or(0) < restarted_ms + 300 {
                return None;
            }
            let s = dev.json(&["apps", "status", app, "--json"]);
            let ready = |v: u64| {
                s["instances"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|i| i["version"].as_u64() == Some(v) && i["state"] == "ready")
                })
            };
            (ready(1) && ready(2)).then_some(())
        },
    );
    let s = dev.json(&["apps", "status", app, "--json"]);
    assert_eq!(s["rollout"]["state"], "running", "{s}");
    assert_eq!(s["rollout"]["step"], 0, "{s}");
    open_gate(&dev, app, &gate);
    wait_for(
        "the rollout to finish after the restart",
        Duration::from_secs(300),
        &dev,
        || {
            let s = dev.json(&["apps", "status", app, "--json"]);
            (s["rollout"]["state"] == "done").then_some(s)
        },
    );
    let s = dev.json(&["apps", "status", app, "--json"]);
    assert_eq!(s["active_version"], 3, "{s}");
    assert_eq!(workflow_status(&dev, app, &wf).as_deref(), Some("SUCCESS"));
    let ex = executions(&dev, app);
    for step in 1..=3 {
        assert_eq!(count(&ex, &wf, step, "end"), 1, "step {step}: {ex:?}");
    }
    // v2 was promoted (activated) before v3.
    let ev = events(&dev, app);
    let activated: Vec<u64> = ev
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "activated")
        .filter_map(|e| e["data"]["version"].as_u64())
        .collect();
    assert_eq!(activated, vec![1, 2, 3], "{ev}");
    eprintln!(
        "rollout log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// `runs` times: a workflow's step 2 is running when its instance is killed
/// with SIGKILL; returns, per run, the seconds from the kill to step 2
/// starting again. Each run checks the workflow completes with step 1 run
/// once.
fn kill_and_time(dev: &Dev, app: &str, trigger: &str, runs: usize) -> Vec<f64> {
    let mut samples = Vec::new();
    for run in 0..runs {
        let gate = format!("bench-{trigger}-{run}");
        let wf = start_gated(dev, app, 3, 0.2, Some((&gate, 2)));
        let executor = wait_for("step 2", Duration::from_secs(60), dev, || {
            executions(dev, app)
                .iter()
                .find(|e| {
                    e["workflow_id"] == wf.as_str() && e["step"] == 2 && e["event"] == "start"
                })
                .and_then(|e| e["executor"].as_str().map(str::to_string))
        });
        let status = dev.json(&["apps", "status", app, "--json"]);
        let pid = status["instances"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|i| i["executor_id"] == executor.as_str() && i["state"] == "ready")
            })
            .and_then(|i| i["pid"].as_u64())
            .expect("pid of the instance running step 2");
        let killed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        assert!(std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill")
            .success());
        let restarted = wait_for(
            "step 2 to start again",
            Duration::from_secs(120),
            dev,
            || {
                executions(dev, app)
                    .iter()
                    .filter(|e| {
                        e["workflow_id"] == wf.as_str() && e["step"] == 2 && e["event"] == "start"
                    })
                    .filter_map(|e| e["ts"].as_f64())
                    .find(|ts| *ts > killed)
            },
        );
        samples.push(restarted - killed);
        open_gate(dev, app, &gate);
        wait_for(
            "the workflow to finish",
            Duration::from_secs(120),
            dev,
            || workflow_status(dev, app, &wf).filter(|s| s == "SUCCESS"),
        );
        let ex = executions(dev, app);
        assert_eq!(count(&ex, &wf, 1, "start"), 1, "step 1 ran once: {ex:?}");
    }
    samples
}

/// The library restarted by hand (no Stead), `runs` times: the same app
/// (the platform's build of it, from the same virtualenv), killed -9 during step 2 and restarted at once
/// under the same executor id, so its own startup recovery resumes it
/// (`crates/stead-dbos/tools/recovery_check.py --mode baseline`). Returns
/// the seconds from each kill to step 2 starting again.
fn baseline_by_hand(
    lib: &str,
    python: &std::path::Path,
    app_dir: &std::path::Path,
    db: &str,
    runs: usize,
) -> Vec<f64> {
    let tool = common::repo_root().join("crates/stead-dbos/tools/recovery_check.py");
    let out = std::process::Command::new("python3")
        .arg(&tool)
        .args(["--app", lib, "--python"])
        .arg(python)
        .arg("--app-dir")
        .arg(app_dir)
        .args([
            "--db",
            db,
            "--mode",
            "baseline",
            "--runs",
            &runs.to_string(),
        ])
        .output()
        .expect("run recovery_check.py");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "baseline failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("run "))
        .filter_map(|l| l.rsplit(": ").next())
        .filter_map(|f| f.trim_end_matches(" s").parse().ok())
        .collect();
    assert_eq!(figures.len(), runs, "{text}");
    figures
}

/// Recovery-time benchmark (not a timed test: run by `scripts/bench
/// recovery`, with `--ignored`): kill -9 of the instance running step 2 of a
/// workflow, to step 2 starting again, per trigger, `STEAD_BENCH_RUNS` runs
/// (default 20). Prints one JSON line per trigger.
#[test]
#[ignore]
fn bench_recovery() {
    let runs: usize = std::env::var("STEAD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().expect("tmp");
    let only = std::env::var("STEAD_BENCH_TRIGGERS").unwrap_or_default();
    let wanted = |t: &str| only.is_empty() || only.split(',').any(|x| x == t);
    // The Rust crate needs PostgreSQL: a throwaway cluster for its platform
    // database (and one more database for the run by hand).
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = (wanted("rust-database") || wanted("rust-executor-id")).then(|| {
        (
            rt.block_on(stead_store::testing::postgres_database()),
            rt.block_on(stead_store::testing::postgres_database()),
        )
    });
    for d in ["sqlite", "pg"] {
        std::fs::create_dir_all(tmp.path().join(d)).expect("mkdir");
    }
    let dev = Dev::start(&tmp.path().join("sqlite"));
    let dev_pg = pg.as_ref().map(|(platform, _)| {
        Dev::start_with_env(
            &tmp.path().join("pg"),
            &[("STEAD_APP_DATABASE_URL", platform.admin_url())],
        )
    });
    let triggers = [
        ("database", "dbos-python", None),
        ("admin", "dbos-python2", None),
        ("executor-id", "dbos-python", Some("executor-id")),
        ("rust-database", "dbos-rust", None),
        ("rust-executor-id", "dbos-rust", Some("executor-id")),
    ];
    for (trigger, example, mode) in triggers {
        if !wanted(trigger) {
            continue;
        }
        let (dev, base_db) = match (trigger, &dev_pg, &pg) {
            ("rust-database" | "rust-executor-id", Some(d), Some((_, by_hand))) => {
                (d, by_hand.url.clone())
            }
            _ => (&dev, "sqlite".to_string()),
        };
        let app = format!("bench-{}", trigger.replace('-', ""));
        let dir = copy_example(example, &tmp.path().join(&app));
        if let (Some(mode), "dbos-rust") = (mode, example) {
            // The example's own stead.toml, with the trigger overridden.
            let toml = std::fs::read_to_string(dir.join("stead.toml")).expect("stead.toml");
            std::fs::write(
                dir.join("stead.toml"),
                toml.replace("recovery = \"auto\"", &format!("recovery = \"{mode}\"")),
            )
            .expect("write");
        } else if let Some(mode) = mode {
            std::fs::write(
                dir.join("stead.toml"),
                format!(
                    "name = \"{app}\"\n[build]\nlanguage = \"python\"\n[run]\nstart = \"python3 app.py\"\nport = 8000\nhealth = \"/healthz\"\n[dbos]\nrecovery = \"{mode}\"\n"
                ),
            )
            .expect("write");
        }
        dev.ok(&[
            "deploy",
            dir.to_str().expect("path"),
            "--app",
            &app,
            "--timeout",
            "900",
        ]);
        let build = dev.data_dir.join("agent/apps").join(&app).join("v1");
        let venv_python = build.join(".venv/bin/python3");
        let lib = match example {
            "dbos-python2" => "python2",
            "dbos-rust" => "rust",
            _ => "python",
        };
        // One platform run, one baseline run, and so on (STEAD_BENCH_BLOCK
        // runs of each at a time): the machine's load moves within minutes.
        let block: usize = std::env::var("STEAD_BENCH_BLOCK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
            .max(1);
        // A warm-up run, not counted: the first instance was only just
        // ready, and an instance that dies within a second of becoming
        // ready counts as a crash at start (restart backoff).
        kill_and_time(dev, &app, trigger, 1);
        let (mut samples, mut base) = (Vec::new(), Vec::new());
        while samples.len() < runs {
            let n = block.min(runs - samples.len());
            samples.extend(kill_and_time(dev, &app, trigger, n));
            base.extend(baseline_by_hand(lib, &venv_python, &build, &base_db, n));
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
            (pct(0.5), pct(0.95), pct(0.99))
        };
        let (median, p95, p99) = stats(&mut samples);
        let (b_median, b_p95, _) = stats(&mut base);
        println!(
            "{}",
            serde_json::json!({"bench": "recovery", "trigger": trigger, "example": example, "runs": samples.len(),
                "median_s": median, "p95_s": p95, "p99_s": p99, "min_s": samples[0], "max_s": samples[samples.len() - 1],
                "samples_s": samples,
                "baseline_median_s": b_median, "baseline_p95_s": b_p95, "baseline_samples_s": base,
                "ratio_median": median / b_median,
                "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()})
        );
    }
}

/// The executor-id trigger, twice in a row on the same identity: the
/// replacement of a replacement must take over (and recover) again.
#[test]
fn executor_id_trigger_recovers_repeated_deaths() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app = "wf-exid";
    let dir = copy_example("dbos-python", tmp.path());
    std::fs::write(
        dir.join("stead.toml"),
        format!(
            "name = \"{app}\"\n[build]\nlanguage = \"python\"\n[run]\nstart = \"python3 app.py\"\nport = 8000\nhealth = \"/healthz\"\n[dbos]\nrecovery = \"executor-id\"\n"
        ),
    )
    .expect("write");
    dev.ok(&["deploy", dir.to_str().expect("path"), "--timeout", "900"]);
    let samples = kill_and_time(&dev, app, "executor-id", 2);
    eprintln!("executor-id recovery: {samples:?} s from kill -9 to the step starting again");
}

/// PENDING work owned by an executor the platform never knew (here: the
/// app run by hand against its system database, then killed) is found by
/// the periodic sweep and recovered onto the app's instance.
#[test]
fn sweep_recovers_work_of_unknown_executors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app = "wf-sweep";
    deploy_example(&dev, "dbos-python", app, tmp.path());
    // A first workflow on the platform, so the app's files in its data
    // folder are created by the instance's own (unprivileged) user, as the
    // hand-run process below runs as root.
    let first = start_workflow(&dev, app, 1, 0.0);
    wait_for("the first workflow", Duration::from_secs(60), &dev, || {
        workflow_status(&dev, app, &first).filter(|s| s == "SUCCESS")
    });
    let v1 = dev.data_dir.join("agent/apps").join(app).join("v1");
    let data = dev.data_dir.join("agent/appdata").join(app);
    let port = common::free_port();
    let mut foreign = std::process::Command::new(v1.join(".venv/bin/python3"))
        .arg("app.py")
        .current_dir(&v1)
        .env("PORT", port.to_string())
        .env("DBOS__VMID", "foreign-executor")
        .env("DBOS__APPVERSION", "1")
        // As an instance of this app would have had (the first app of a
        // fresh platform has id 1): one that vanished without a trace.
        .env("DBOS__APPID", "1")
        .env("DBOS_APP_NAME", app)
        .env("STEAD_DATA_DIR", &data)
        .env(
            "DBOS_SYSTEM_DATABASE_URL",
            format!("sqlite:///{}", data.join("dbos_system.sqlite").display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run the app by hand");
    let base = format!("http://127.0.0.1:{port}");
    let wf = wait_for(
        "the hand-run app to answer",
        Duration::from_secs(60),
        &dev,
        || {
            let r = http()
                .post(format!(
                    "{base}/workflows/start?steps=3&step_seconds=0.2&gate=sweep&gate_step=2"
                ))
                .send()
                .ok()?;
            let v: Value = r.json().ok()?;
            v["workflow_id"].as_str().map(str::to_string)
        },
    );
    wait_for(
        "step 2 on the foreign executor",
        Duration::from_secs(60),
        &dev,
        || (count(&executions(&dev, app), &wf, 2, "start") > 0).then_some(()),
    );
    let _ = foreign.kill();
    let _ = foreign.wait();
    open_gate(&dev, app, "sweep");
    wait_for(
        "the sweep to recover the workflow",
        Duration::from_secs(120),
        &dev,
        || workflow_status(&dev, app, &wf).filter(|s| s == "SUCCESS"),
    );
    let ex = executions(&dev, app);
    assert_eq!(
        count(&ex, &wf, 1, "start"),
        1,
        "step 1 had completed: {ex:?}"
    );
    let rerun = ex
        .iter()
        .filter(|e| e["workflow_id"] == wf.as_str() && e["step"] == 2 && e["event"] == "start")
        .any(|e| e["executor"] != "foreign-executor");
    assert!(rerun, "step 2 ran again on the platform's instance: {ex:?}");
}

/// The Rust `dbos` crate (PostgreSQL only): killed mid-step, its workflow
/// completes on the replacement without re-running completed steps.
#[test]
fn dbos_rust_on_postgres() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(stead_store::testing::postgres_database());
    let tmp = tempfile::tempdir().expect("tmp");
    let admin = pg.admin_url().to_string();
    let mut dev = Dev::start_with_env(tmp.path(), &[("STEAD_APP_DATABASE_URL", admin.as_str())]);
    let app = "wf-rust-pg";
    let dir = deploy_example(&dev, "dbos-rust", app, tmp.path());
    kill_mid_step(&dev, app);
    // The second build of the app reuses the first one's `target` (its
    // `[build] cache`): only the app crate is compiled again.
    deploy_during_workflow(&dev, app, &dir);
    let log = dev.ok(&["logs", app, "--build", "--version", "2"]);
    assert!(log.contains("restored build cache target"), "{log}");
    platform_crash_during_workflow(&mut dev, app);
}
