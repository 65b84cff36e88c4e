//! The control plane dies at each step of a deploy; the deploy completes
//! after a restart with exactly one new version.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{copy_example, tail, Dev};

fn spawn_deploy(dev: &Dev, dir: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::File::create(log).expect("log");
    dev.cli()
        .args(["deploy", dir.to_str().expect("path"), "--timeout", "300"])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn deploy")
}

fn wait_child(
    child: &mut Child,
    within: Duration,
    what: &str,
    log: &std::path::Path,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{what} did not finish within {within:?}; its output:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_one_ready_version(dev: &Dev, app: &str) {
    let versions = dev.json(&["apps", "versions", app, "--json"]);
    let versions = versions.as_array().expect("array");
    assert_eq!(
        versions.len(),
        1,
        "exactly one version expected: {versions:?}"
    );
    assert_eq!(versions[0]["number"], 1);
    assert_eq!(versions[0]["state"], "ready");
}

fn crash_at_failpoint(failpoint: &str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut dev = Dev::start_with_env(tmp.path(), &[("STEAD_FAILPOINT", failpoint)]);
    let app = copy_example("hello-python", tmp.path());
    let log = tmp.path().join("deploy.log");
    let mut deploy = spawn_deploy(&dev, &app, &log);
    // The control plane exits (status 86) at the failpoint.
    let status = dev.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(86),
        "dev should die at {failpoint}; log:\n{}",
        tail(&dev.log_text(), 40)
    );
    dev.restart(&[]);
    let status = wait_child(&mut deploy, Duration::from_secs(240), "the deploy", &log);
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "deploy after {failpoint} crash failed:\n{out}\ndev log:\n{}",
        tail(&dev.log_text(), 60)
    );
    assert!(out.contains("hello-python v1 is live"), "{out}");
    assert_one_ready_version(&dev, "hello-python");
    dev.wait_body("hello-python", "version 1", Duration::from_secs(30));
}

#[test]
fn server_dies_after_upload() {
    crash_at_failpoint("after_upload");
}

#[test]
fn server_dies_after_version_creation() {
    crash_at_failpoint("after_version");
}

#[test]
fn platform_killed_while_build_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut dev = Dev::start(tmp.path());
    let app = copy_example("hello-python", tmp.path());
    let marker = tmp.path().join("build-started");
    // A build step that shows it started, then takes a while.
    let toml = std::fs::read_to_string(app.join("stead.toml")).expect("read");
    let toml = toml.replace(
        "commands = [\"python3 -m py_compile app.py\"]",
        &format!(
            "commands = [\"touch {} && sleep 3\", \"python3 -m py_compile app.py\"]",
            marker.display()
        ),
    );
    std::fs::write(app.join("stead.toml"), toml).expect("write");
    let log = tmp.path().join("deploy.log");
    let mut deploy = spawn_deploy(&dev, &app, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the build never started; log:\n{}",
            tail(&dev.log_text(), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no chance to clean up.
    dev.crash();
    std::fs::remove_file(&marker).expect("rm marker");
    dev.restart(&[]);
    let status = wait_child(&mut deploy, Duration::from_secs(240), "the deploy", &log);
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "deploy after a crash mid-build failed:\n{out}\ndev log:\n{}",
        tail(&dev.log_text(), 60)
    );
    assert!(
        marker.exists(),
        "the build should have run again after the restart"
    );
    assert_one_ready_version(&dev, "hello-python");
    dev.wait_body("hello-python", "version 1", Duration::from_secs(30));
}

#[test]
fn tokens_of_another_organisation_see_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app = copy_example("hello-python", tmp.path());
    dev.ok(&["deploy", app.to_str().expect("path")]);
    let db = format!("sqlite://{}", dev.data_dir.join("stead.db").display());
    let out = std::process::Command::new(common::BIN)
        .args(["tokens", "create", "--database", &db, "--org", "other"])
        .output()
        .expect("tokens create");
    assert!(out.status.success(), "{}", common::stderr(&out));
    let other = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let run = |args: &[&str]| {
        dev.cli()
            .env("STEAD_TOKEN", &other)
            .args(args)
            .output()
            .expect("run")
    };
    let out = run(&["apps", "list", "--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    for args in [
        &["apps", "status", "hello-python"][..],
        &["env", "list", "hello-python"][..],
        &["apps", "rollback", "hello-python", "--version", "1"][..],
        &["apps", "delete", "hello-python", "--yes"][..],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} must fail for another org");
    }
    // Deploying under a name another org holds is refused.
    let out = run(&["deploy", app.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("taken") || common::stderr(&out).contains("another"),
        "{}",
        common::stderr(&out)
    );
    // The owner still has it.
    let (status, _, _) = dev.get("hello-python", "/");
    assert_eq!(status, 200);
}
