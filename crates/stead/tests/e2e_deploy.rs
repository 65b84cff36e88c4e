//! End to end through the `stead` binary: `stead dev`, then deploy the
//! examples with the CLI and reach them through the router.

mod common;

use std::time::Duration;

use common::{copy_example, stderr, Dev};

#[test]
fn rust_example_deploy_change_rollback_and_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut dev = Dev::start(tmp.path());
    let app_dir = copy_example("hello-rust", tmp.path());

    // First deploy: the CLI returns only once the app answers via the router.
    let out = dev.ok(&["deploy", app_dir.to_str().expect("path")]);
    assert!(out.contains("hello-rust v1 is live"), "{out}");
    let (status, version, body) = dev.get("hello-rust", "/");
    assert_eq!(status, 200, "{body}");
    assert_eq!(version.as_deref(), Some("1"));
    assert!(
        body.starts_with("Hello from Stead (app hello-rust, version 1"),
        "{body}"
    );
    // By host name too.
    let (status, body) = dev.get_host("hello-rust", "/");
    assert_eq!(status, 200);
    assert!(body.contains("version 1"), "{body}");
    // Health path of the app, through the prefix route.
    let (status, _, body) = dev.get("hello-rust", "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // A changed version replaces it.
    let main_rs = app_dir.join("src/main.rs");
    let code = std::fs::read_to_string(&main_rs).expect("read");
    std::fs::write(
        &main_rs,
        code.replace("\"Hello from Stead\"", "\"Hello again from Stead\""),
    )
    .expect("write");
    let out = dev.ok(&["deploy", app_dir.to_str().expect("path")]);
    assert!(out.contains("hello-rust v2 is live"), "{out}");
    let (status, version, body) = dev.get("hello-rust", "/");
    assert_eq!((status, version.as_deref()), (200, Some("2")), "{body}");
    assert!(
        body.starts_with("Hello again from Stead (app hello-rust, version 2"),
        "{body}"
    );

    let versions = dev.json(&["apps", "versions", "hello-rust", "--json"]);
    let versions = versions.as_array().expect("array");
    assert_eq!(versions.len(), 2);
    assert!(
        versions.iter().all(|v| v["state"] == "ready"),
        "{versions:?}"
    );

    // Rollback re-uses version 1's build: no new version, old response back.
    dev.ok(&["apps", "rollback", "hello-rust"]);
    dev.wait_body(
        "hello-rust",
        "Hello from Stead (app hello-rust, version 1",
        Duration::from_secs(30),
    );
    let versions = dev.json(&["apps", "versions", "hello-rust", "--json"]);
    assert_eq!(versions.as_array().map(Vec::len), Some(2));

    let status = dev.json(&["apps", "status", "hello-rust", "--json"]);
    assert_eq!(status["name"], "hello-rust");
    assert_eq!(status["active_version"], 1);
    let instances = status["instances"].as_array().expect("instances");
    assert!(!instances.is_empty(), "{status}");
    for i in instances {
        for field in ["id", "version", "host", "state", "executor_id"] {
            assert!(!i[field].is_null(), "instance lacks {field}: {i}");
        }
    }

    // The app's own output reached the logs, naming instance and version.
    let logs = dev.ok(&["logs", "hello-rust", "--json"]);
    assert!(logs.contains("hello listening on port"), "{logs}");

    // Restart the whole platform: the app serves again without a deploy.
    dev.stop();
    dev.restart(&[]);
    dev.wait_body(
        "hello-rust",
        "Hello from Stead (app hello-rust, version 1",
        Duration::from_secs(60),
    );
    let versions = dev.json(&["apps", "versions", "hello-rust", "--json"]);
    assert_eq!(
        versions.as_array().map(Vec::len),
        Some(2),
        "restart must not create versions"
    );
}

#[test]
fn python_example_deploys_and_answers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app_dir = copy_example("hello-python", tmp.path());
    let out = dev.ok(&["deploy", app_dir.to_str().expect("path"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["app"], "hello-python");
    assert_eq!(v["version"], 1);
    let (status, version, body) = dev.get("hello-python", "/");
    assert_eq!((status, version.as_deref()), (200, Some("1")), "{body}");
    assert!(
        body.starts_with("Hello from Python on Stead (app hello-python, version 1"),
        "{body}"
    );

    // Listings have --json and name the app.
    let apps = dev.json(&["apps", "list", "--json"]);
    assert_eq!(apps[0]["name"], "hello-python");
    let hosts = dev.json(&["hosts", "list", "--json"]);
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
    assert_eq!(hosts[0]["state"], "alive");

    // Environment: set, masked secret, visible to new instances.
    dev.ok(&["env", "set", "hello-python", "GREETING=hi", "OTHER=x"]);
    dev.ok(&[
        "env",
        "set",
        "hello-python",
        "--secret",
        "API_KEY=supersecretvalue123",
    ]);
    let env = dev.json(&["env", "list", "hello-python", "--json"]);
    let text = env.to_string();
    assert!(
        text.contains("GREETING") && text.contains("\"hi\""),
        "{text}"
    );
    assert!(
        !text.contains("supersecretvalue123"),
        "secret printed back in full: {text}"
    );
    dev.ok(&["env", "unset", "hello-python", "OTHER"]);
    let env = dev.json(&["env", "list", "hello-python", "--json"]);
    assert!(!env.to_string().contains("OTHER"), "{env}");
    // The CLI finds the credentials `stead dev` stored, without flags.
    let out = std::process::Command::new(common::BIN)
        .env("STEAD_CONFIG_DIR", &dev.config_dir)
        .env_remove("STEAD_API")
        .env_remove("STEAD_TOKEN")
        .args(["apps", "list", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello-python"));

    // `stead login` stores a URL and token that later commands use.
    let login_dir = tmp.path().join("login-config");
    let out = std::process::Command::new(common::BIN)
        .env("STEAD_CONFIG_DIR", &login_dir)
        .env_remove("STEAD_API")
        .env_remove("STEAD_TOKEN")
        .args(["login", "--api", &dev.api(), "--token", &dev.token()])
        .output()
        .expect("login");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = std::process::Command::new(common::BIN)
        .env("STEAD_CONFIG_DIR", &login_dir)
        .env_remove("STEAD_API")
        .env_remove("STEAD_TOKEN")
        .args(["apps", "list", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello-python"));
    // A wrong token is refused by login, and nothing is stored.
    let bad_dir = tmp.path().join("bad-login");
    let out = std::process::Command::new(common::BIN)
        .env("STEAD_CONFIG_DIR", &bad_dir)
        .args(["login", "--api", &dev.api(), "--token", "stead_wrong"])
        .output()
        .expect("login");
    assert!(!out.status.success());
    assert!(!bad_dir.join("credentials.json").exists());

    // `stead logs -f` follows new lines as they come.
    let mut follow = dev
        .cli()
        .args(["logs", "hello-python", "-f", "-n", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("logs -f");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let marker = "/follow-marker-path";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    while std::time::Instant::now() < deadline && !seen {
        let _ = dev.get("hello-python", marker);
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            seen = line.contains(marker);
            while let Ok(more) = rx.try_recv() {
                seen |= more.contains(marker);
            }
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "`stead logs -f` did not show the app's new log line");

    // The OpenAPI document is served and names the deploy endpoint.
    let doc: serde_json::Value = reqwest::blocking::get(format!("{}/v1/openapi.json", dev.api()))
        .expect("openapi")
        .json()
        .expect("json");
    assert!(doc["paths"]["/v1/apps/{app}/deploy"].is_object(), "{doc}");

    // A crash of the whole platform (SIGKILL) leaves the instance running;
    // the restarted agent adopts it rather than starting a second one.
    let before = dev.json(&["apps", "status", "hello-python", "--json"]);
    let ids: Vec<String> = before["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{before}");
    let mut dev = dev;
    dev.crash();
    dev.restart(&[]);
    dev.wait_body(
        "hello-python",
        &format!("instance {}", ids[0]),
        Duration::from_secs(30),
    );
    let after = dev.json(&["apps", "status", "hello-python", "--json"]);
    let after_ids: Vec<String> = after["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        after_ids, ids,
        "the adopted instance must be the only one: {after}"
    );

    let dotenv = tmp.path().join("x.env");
    std::fs::write(&dotenv, "# comment\nIMPORTED=\"yes please\"\n").expect("write");
    dev.ok(&[
        "env",
        "import",
        "hello-python",
        dotenv.to_str().expect("path"),
    ]);
    let env = dev.json(&["env", "list", "hello-python", "--json"]);
    assert!(env.to_string().contains("yes please"), "{env}");
}

#[test]
fn failing_builds_and_bad_input_fail_clearly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());

    // A build command that fails: the deploy fails with the build's error.
    let bad_build = tmp.path().join("bad-build");
    std::fs::create_dir_all(&bad_build).expect("mkdir");
    std::fs::write(
        bad_build.join("stead.toml"),
        "name = \"bad-build\"\n[build]\ncommands = [\"echo compiling; echo 'error: no such crate' >&2; exit 3\"]\n[run]\nstart = \"true\"\n",
    )
    .expect("write");
    let out = dev.run(&["deploy", bad_build.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("error: no such crate"), "{err}");
    assert!(
        err.contains("exited with status 3") || err.contains("status 3"),
        "{err}"
    );
    let versions = dev.json(&["apps", "versions", "bad-build", "--json"]);
    assert_eq!(versions[0]["state"], "failed", "{versions}");
    // The failed build's output stays readable afterwards.
    let out = dev.run(&["logs", "bad-build", "--build"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("compiling") && log.contains("error: no such crate"),
        "{log}"
    );
    assert!(
        stderr(&out).contains("build of bad-build v1 failed"),
        "{}",
        stderr(&out)
    );
    let out = dev.run(&["logs", "bad-build", "--build", "--version", "9"]);
    assert!(!out.status.success(), "an unknown version is an error");
    assert!(stderr(&out).contains('9'), "{}", stderr(&out));

    // A start command that exits at once: the deploy fails and says so.
    let crash = tmp.path().join("crashy");
    std::fs::create_dir_all(&crash).expect("mkdir");
    std::fs::write(
        crash.join("stead.toml"),
        "name = \"crashy\"\n[run]\nstart = \"echo starting; exit 7\"\n",
    )
    .expect("write");
    let out = dev.run(&["deploy", crash.to_str().expect("path"), "--timeout", "120"]);
    assert!(
        !out.status.success(),
        "a crashing start command must fail the deploy"
    );
    let err = stderr(&out);
    assert!(err.contains("exit") && err.contains("crashy"), "{err}");

    // Unknown keys in stead.toml: refused before anything is uploaded.
    let typo = tmp.path().join("typo");
    std::fs::create_dir_all(&typo).expect("mkdir");
    std::fs::write(
        typo.join("stead.toml"),
        "name = \"typo\"\n[run]\nstart = \"x\"\nprot = 80\n",
    )
    .expect("write");
    let out = dev.run(&["deploy", typo.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("prot"), "{}", stderr(&out));
    let out = dev.run(&["apps", "status", "typo"]);
    assert!(
        !out.status.success(),
        "no app may be created by a refused deploy"
    );

    // Invalid app name.
    let out = dev.run(&["deploy", crash.to_str().expect("path"), "--app", "Bad_Name"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("app name"), "{}", stderr(&out));

    // Missing folder config.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let out = dev.run(&["deploy", empty.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("stead.toml"), "{}", stderr(&out));

    // Bad tokens.
    let out = dev
        .cli()
        .env("STEAD_TOKEN", "stead_not-a-real-token")
        .args(["apps", "list"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        stderr(&out).to_lowercase().contains("token"),
        "{}",
        stderr(&out)
    );
    let out = dev
        .cli()
        .env("STEAD_TOKEN", "garbage")
        .args(["apps", "list"])
        .output()
        .expect("run");
    assert!(!out.status.success());

    // Unknown app.
    let out = dev.run(&["apps", "status", "no-such-app"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no-such-app"), "{}", stderr(&out));

    // A hostile bundle sent straight to the API: 400, nothing created.
    let bundle = hostile_bundle();
    let resp = reqwest::blocking::Client::new()
        .post(format!("{}/v1/apps/evil-app/deploy", dev.api()))
        .bearer_auth(dev.token())
        .body(bundle)
        .send()
        .expect("post");
    assert_eq!(resp.status().as_u16(), 400);
    let body: serde_json::Value = resp.json().expect("json error body");
    assert!(
        body["message"].as_str().unwrap_or("").contains(".."),
        "{body}"
    );
    let out = dev.run(&["apps", "status", "evil-app"]);
    assert!(
        !out.status.success(),
        "a rejected bundle must not create the app"
    );
    // Garbage instead of zstd.
    let resp = reqwest::blocking::Client::new()
        .post(format!("{}/v1/apps/evil-app/deploy", dev.api()))
        .bearer_auth(dev.token())
        .body("this is not an archive")
        .send()
        .expect("post");
    assert_eq!(resp.status().as_u16(), 400);
}

/// A tar+zstd archive with a valid stead.toml and an entry escaping the root.
fn hostile_bundle() -> Vec<u8> {
    let mut raw = Vec::new();
    {
        let mut b = tar::Builder::new(&mut raw);
        let toml = b"name = \"evil-app\"\n[run]\nstart = \"true\"\n";
        let mut h = tar::Header::new_gnu();
        h.set_size(toml.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "stead.toml", &toml[..])
            .expect("append");
        let evil = b"pwned";
        let mut h = tar::Header::new_gnu();
        h.set_size(evil.len() as u64);
        h.set_mode(0o644);
        // Written by hand: the tar crate refuses `..` in set_path.
        let name = b"../../etc/evil";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, &evil[..]).expect("append");
        b.finish().expect("finish");
    }
    zstd::encode_all(&raw[..], 3).expect("zstd")
}
