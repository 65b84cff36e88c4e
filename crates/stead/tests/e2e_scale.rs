//! Scaling end to end through the `stead` binary: an app scaled to zero
//! answers its first request (and 100 concurrent first requests share one
//! wake-up), and a burst scales an app up and, once over, back down,
//! without a request failing while instances start or drain.
//!
//! Windows and timeouts are shortened through stead.toml so the tests are
//! quick; every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{copy_example, tail, Dev};

/// Copies hello-rust as `name`, with `scale` as its `[scale]` section and a
/// `/slow` path that answers after 200 ms (to build up requests in flight).
fn scaled_app(root: &Path, name: &str, scale: &str) -> PathBuf {
    let dir = copy_example("hello-rust", root);
    let dest = root.join(name);
    std::fs::rename(&dir, &dest).expect("rename");
    let toml = std::fs::read_to_string(dest.join("stead.toml")).expect("toml");
    let start = toml.find("[scale]").expect("[scale] in the example");
    let end = toml[start..]
        .find("\n[resources]")
        .map_or(toml.len(), |i| start + i + 1);
    let toml = format!("{}[scale]\n{scale}\n{}", &toml[..start], &toml[end..])
        .replace("name = \"hello-rust\"", &format!("name = \"{name}\""));
    std::fs::write(dest.join("stead.toml"), toml).expect("write toml");
    let main = dest.join("src/main.rs");
    let code = std::fs::read_to_string(&main).expect("main.rs");
    let arm = "\"/healthz\" => (\"200 OK\", \"ok\\n\".to_string()),";
    assert!(code.contains(arm), "the example's /healthz arm changed");
    let code = code.replace(
        arm,
        &format!(
            "{arm}\n            \"/slow\" => {{ std::thread::sleep(std::time::Duration::from_millis(200)); (\"200 OK\", \"slow\\n\".to_string()) }}"
        ),
    );
    std::fs::write(&main, code).expect("write main.rs");
    dest
}

/// One GET through the router: (status, x-stead-instance).
fn get(client: &reqwest::blocking::Client, url: &str) -> (u16, String) {
    match client.get(url).send() {
        Ok(r) => {
            let status = r.status().as_u16();
            let inst = r
                .headers()
                .get("x-stead-instance")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let _ = r.bytes();
            (status, inst)
        }
        Err(e) => {
            eprintln!("request failed: {e}");
            (0, String::new())
        }
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// Live (not exited) instances of `app`, from `stead apps status`.
fn live_instances(dev: &Dev, app: &str) -> Vec<serde_json::Value> {
    let status = dev.json(&["apps", "status", app, "--json"]);
    status["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i["state"] != "exited")
        .collect()
}

/// Waits (bounded) until `app` runs no instance at all.
fn wait_for_zero(dev: &Dev, app: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let status = dev.json(&["apps", "status", app, "--json"]);
        let instances = status["instances"].as_array().map_or(0, Vec::len);
        if status["autoscale"]["desired"] == 0 && instances == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{app} did not scale to zero within {within:?}: {status}\ndev log:\n{}",
            tail(&dev.log_text(), 60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn zero_scaled_app_wakes_on_its_first_requests() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app = "sleepy-rust";
    let dir = scaled_app(
        tmp.path(),
        app,
        "min = 0\nmax = 4\nidle_timeout = \"1s\"\nscale_down_delay = \"1s\"",
    );
    let out = dev.ok(&["deploy", dir.to_str().expect("path")]);
    assert!(out.contains(&format!("{app} v1 is live")), "{out}");

    // Idle for the idle timeout: zero instances.
    wait_for_zero(&dev, app, Duration::from_secs(30));
    let text = dev.ok(&["apps", "status", app]);
    assert!(text.contains("autoscale: 0 instances: idle for"), "{text}");

    // The first request is held while an instance starts, then answered.
    let c = client();
    let url = format!("{}/apps/{app}/", dev.router());
    let t = Instant::now();
    let (status, first) = get(&c, &url);
    let cold = t.elapsed();
    assert_eq!(status, 200, "dev log:\n{}", tail(&dev.log_text(), 60));
    println!("cold start through the router (request to first response): {cold:?}");
    if cold > Duration::from_secs(1) {
        println!("slow cold start; dev log:\n{}", tail(&dev.log_text(), 40));
    }
    assert!(cold < Duration::from_secs(10), "cold start took {cold:?}");
    assert_eq!(live_instances(&dev, app).len(), 1);

    // Zero again, then 100 concurrent first requests: all answered, by the
    // one instance their shared wake-up started.
    wait_for_zero(&dev, app, Duration::from_secs(30));
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Every thread has its client before any sends, and all send at once,
    // so that the requests really arrive together (while the app is at 0).
    let start = Arc::new(std::sync::Barrier::new(100));
    let t = Instant::now();
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let seen = seen.clone();
            let url = url.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let c = client();
                start.wait();
                let r = get(&c, &url);
                seen.lock().expect("lock").push(r);
            })
        })
        .collect();
    for th in threads {
        th.join().expect("request thread");
    }
    println!(
        "100 concurrent first requests answered in {:?}",
        t.elapsed()
    );
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), 100);
    let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let instances: BTreeSet<&str> = seen.iter().map(|(_, i)| i.as_str()).collect();
    assert_eq!(instances.len(), 1, "answered by {instances:?}");
    assert_ne!(instances.iter().next().copied(), Some(first.as_str()));
    let live = live_instances(&dev, app);
    assert_eq!(live.len(), 1, "{live:?}");
    let events = dev.json(&["apps", "status", app, "--json"]);
    assert_eq!(events["autoscale"]["desired"], 1, "{events}");

    // Prometheus metrics: router, control plane, and the agent (on the port
    // `stead dev` printed at start).
    let c = client();
    let text = |url: &str| {
        let r = c.get(url).send().expect("metrics");
        assert_eq!(r.status().as_u16(), 200, "{url}");
        r.text().expect("text")
    };
    let router = text(&format!("{}/metrics", dev.router()));
    let held = router
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "stead_router_held_requests_total{{app=\"{app}\"}} "
            ))
        })
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no held-request counter for {app}:\n{router}"));
    assert!(held >= 101, "{held} held requests counted");
    let server = text(&format!("{}/metrics", dev.api()));
    assert!(
        server.contains("stead_server_demand_reports_total"),
        "{server}"
    );
    assert!(
        server.contains("stead_hosts{state=\"alive\"} 1"),
        "{server}"
    );
    let log = dev.log_text();
    let agent_url = log
        .lines()
        .find(|l| l.contains("(agent)"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "(agent)")?;
            words.get(at.checked_sub(1)?).map(|w| w.to_string())
        })
        .unwrap_or_else(|| {
            panic!(
                "stead dev did not print the agent's metrics address:\n{}",
                tail(&log, 40)
            )
        });
    let agent = text(&agent_url);
    assert!(
        agent.contains("stead_agent_heartbeats_total{result=\"ok\"}"),
        "{agent}"
    );
    assert!(
        agent.contains("stead_agent_drains_total{result=\"clean\"}"),
        "{agent}"
    );
    assert!(
        agent.contains(&format!("stead_agent_instance_connections{{app=\"{app}\"")),
        "{agent}"
    );
}

#[test]
fn burst_scales_up_then_back_down_without_failures() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let app = "bursty-rust";
    let dir = scaled_app(
        tmp.path(),
        app,
        "min = 1\nmax = 4\ntarget_concurrency = 5\nstable_window = \"2s\"\npanic_window = \"1s\"\nscale_down_delay = \"1s\"",
    );
    let out = dev.ok(&["deploy", dir.to_str().expect("path")]);
    assert!(out.contains(&format!("{app} v1 is live")), "{out}");
    assert_eq!(live_instances(&dev, app).len(), 1);

    let url = format!("{}/apps/{app}/slow", dev.router());
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let instances = Arc::new(Mutex::new(BTreeSet::new()));
    let second_at: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
    let stop_burst = Arc::new(AtomicBool::new(false));
    let stop_trickle = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let worker = |stop: Arc<AtomicBool>| {
        let (url, failures, served, instances, second_at) = (
            url.clone(),
            failures.clone(),
            served.clone(),
            instances.clone(),
            second_at.clone(),
        );
        std::thread::spawn(move || {
            let c = client();
            // Bounded: at most 5 minutes of requests whatever happens.
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(300) {
                let (status, inst) = get(&c, &url);
                if status != 200 {
                    eprintln!("request failed with {status}");
                    failures.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                served.fetch_add(1, Ordering::Relaxed);
                let mut seen = instances.lock().expect("lock");
                seen.insert(inst);
                if seen.len() >= 2 {
                    second_at
                        .lock()
                        .expect("lock")
                        .get_or_insert_with(|| start.elapsed());
                }
            }
        })
    };
    // A trickle that runs throughout (it must survive the scale-down's
    // drains), and a burst of 40 clients in flight at once.
    let trickle: Vec<_> = (0..2).map(|_| worker(stop_trickle.clone())).collect();
    let burst: Vec<_> = (0..40).map(|_| worker(stop_burst.clone())).collect();

    // Scaled up: several instances serve within seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = live_instances(&dev, app)
            .iter()
            .filter(|i| i["state"] == "ready")
            .count();
        if ready >= 3 && instances.lock().expect("lock").len() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not scale up: {ready} ready\n{}\ndev log:\n{}",
            dev.ok(&["apps", "status", app]),
            tail(&dev.log_text(), 80)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let reaction = second_at.lock().expect("lock").unwrap_or_else(|| {
        panic!(
            "no second instance served ({} served, {} failed)\n{}\ndev log:\n{}",
            served.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed),
            dev.ok(&["apps", "status", app]),
            tail(&dev.log_text(), 80)
        )
    });
    println!("scale-up reaction (burst start to a second instance serving): {reaction:?}");
    let status = dev.ok(&["apps", "status", app]);
    println!("{status}");
    assert!(status.contains("in-flight"), "{status}");
    std::thread::sleep(Duration::from_secs(1));
    stop_burst.store(true, Ordering::Relaxed);
    for b in burst {
        b.join().expect("burst thread");
    }

    // Back down to the minimum while the trickle goes on.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = live_instances(&dev, app);
        if live.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not scale down: {} live\n{}\ndev log:\n{}",
            live.len(),
            dev.ok(&["apps", "status", app]),
            tail(&dev.log_text(), 80)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A little more trickle on the remaining instance, then stop.
    std::thread::sleep(Duration::from_millis(500));
    stop_trickle.store(true, Ordering::Relaxed);
    for t in trickle {
        t.join().expect("trickle thread");
    }
    let failures = failures.load(Ordering::Relaxed);
    println!(
        "{} requests served by {} instances, {failures} failed",
        served.load(Ordering::Relaxed),
        instances.lock().expect("lock").len()
    );
    assert_eq!(
        failures,
        0,
        "requests failed while scaling\ndev log:\n{}",
        tail(&dev.log_text(), 80)
    );
    let status = dev.json(&["apps", "status", app, "--json"]);
    assert_eq!(status["autoscale"]["desired"], 1, "{status}");
    let text = dev.ok(&["scale", app]);
    assert!(text.contains("min 1 max 4"), "{text}");
    // `stead scale` changes it; bad values are refused with a message.
    let text = dev.ok(&[
        "scale",
        app,
        "--max",
        "2",
        "--idle-timeout",
        "5m",
        "--max-body",
        "1MB",
    ]);
    assert!(text.contains("min 1 max 2"), "{text}");
    assert!(text.contains("bodies up to 1048576 bytes"), "{text}");
    let out = dev.run(&["scale", app, "--min", "3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min (3) must not exceed max (2)"), "{err}");
}
