//! Upgrading the router through the `stead` binary: `stead router` started
//! again for the same address, while one runs and serves a steady load,
//! takes its listening socket over; the old one drains and exits, and no
//! request fails.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{copy_example, free_port, tail, Dev, Proc};

const REPLACEMENTS: usize = 3;

/// Successes, and failures with what went wrong, of the load.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

fn wait_ok(tally: &Tally, more: usize, within: Duration) {
    let target = tally.ok.load(Ordering::SeqCst) + more;
    let deadline = Instant::now() + within;
    while tally.ok.load(Ordering::SeqCst) < target {
        assert!(
            Instant::now() < deadline,
            "the load made no progress: {} ok, failures {:?}",
            tally.ok.load(Ordering::SeqCst),
            tally.failures.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn router_replaced_under_load_through_the_binary() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(tmp.path());
    let dir = copy_example("hello-python", tmp.path());
    let out = dev.ok(&["deploy", dir.to_str().expect("path")]);
    assert!(out.contains("hello-python v1 is live"), "{out}");

    let port = free_port();
    let socket = tmp.path().join("router.sock");
    let args = vec![
        "router".to_string(),
        "--server".into(),
        dev.api(),
        "--token".into(),
        dev.host_token(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--handover-socket".into(),
        socket.display().to_string(),
    ];
    let url = format!("http://127.0.0.1:{port}/apps/hello-python/");
    // Access logs off: the tail shown on failure stays readable.
    let env = vec![(
        "STEAD_LOG".to_string(),
        "info,stead_router::access=warn".to_string(),
    )];
    let mut current = Proc::start(tmp.path().join("router-0.log"), args.clone(), env.clone());

    // The first router serves (bounded wait for it to bind and load routes).
    let probe = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probe
        .get(&url)
        .send()
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "the router never served: {}",
            current.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Load: keep-alive clients and clients on a new connection per request.
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..6 {
        let (tally, stop, url) = (tally.clone(), stop.clone(), url.clone());
        load.push(std::thread::spawn(move || {
            let keep_alive = i % 2 == 0;
            let mut b = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
            if !keep_alive {
                b = b.pool_max_idle_per_host(0);
            }
            let client = b.build().expect("client");
            while !stop.load(Ordering::SeqCst) {
                match client.get(&url).send().and_then(|r| {
                    let s = r.status();
                    r.text().map(|t| (s, t))
                }) {
                    Ok((s, t)) if s.is_success() && t.contains("Hello from Python") => {
                        tally.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((s, t)) => tally.failures.lock().unwrap().push(format!("{s}: {t}")),
                    Err(e) => tally.failures.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    wait_ok(&tally, 50, Duration::from_secs(30));

    for generation in 1..=REPLACEMENTS {
        let next = Proc::start(
            tmp.path().join(format!("router-{generation}.log")),
            args.clone(),
            env.clone(),
        );
        // The old router exits by itself once the new one serves.
        let status = current.wait_exit(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "router {} did not exit cleanly ({status:?}): {}\nnew one: {}",
            generation - 1,
            current.text(),
            next.text()
        );
        assert!(
            next.text().contains("took over from the running router"),
            "router {generation} did not take over: {}",
            next.text()
        );
        current = next;
        wait_ok(&tally, 50, Duration::from_secs(30));
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().expect("load thread");
    }

    // The last router is the one answering now, and it served the load.
    let metrics = probe
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    let served: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("stead_router_requests_total{app=\"hello-python\",class=\"2xx\"} ")
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let failures = tally.failures.lock().unwrap().clone();
    println!(
        "{REPLACEMENTS} router replacements: {} requests ok, {} failed; the last router served {served}",
        tally.ok.load(Ordering::SeqCst),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}\ndev log:\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        tail(&dev.log_text(), 40)
    );
    assert!(
        served >= 50,
        "the last router served {served} requests: {metrics}"
    );
}
