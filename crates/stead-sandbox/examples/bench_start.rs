//! Benchmark (not a test): start-to-ready time of the example Rust app
//! (examples/hello-rust) run directly and in each sandbox backend, median
//! of 20 starts each, in one run; and the memory the platform adds per
//! idle process-backend instance.
//!
//! `scripts/bench` runs it: `cargo run --release -p stead-sandbox --example
//! bench_start`. Root, cgroups, cargo (to build the example) and, for the
//! gvisor rows, runsc are needed.
//!
//! "Ready" is what the agent waits for: a connection to the app's port
//! (inside the sandbox's network namespace for sandboxes) answering
//! `GET /healthz` with 200, polled every 200 µs. The sandbox init is what
//! an agent runs (`stead-init` beside the release `stead`, else `stead`)
//! when `STEAD_BENCH_BIN` names `stead` (scripts/bench does), else this
//! binary (it calls `init_main` for `__sandbox-init`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stead_sandbox::{Backend, Output, SandboxProcess, SandboxSpec, Sandboxes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STARTS: usize = 20;
const IDLE_INSTANCES: usize = 20;
const PORT: u16 = 8000;

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == stead_sandbox::INIT_SUBCOMMAND)
    {
        stead_sandbox::init_main();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("bench_start: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Builds the example app (release) in a copy under `dir`; returns the app
/// folder and its binary.
fn build_example(dir: &Path) -> Res<(PathBuf, PathBuf)> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello-rust");
    let app = dir.join("hello-rust");
    copy(&src, &app)?;
    let status = std::process::Command::new("cargo")
        .args(["build", "--release", "--offline", "--quiet"])
        .current_dir(&app)
        .env_remove("CARGO_TARGET_DIR")
        .status()?;
    if !status.success() {
        return Err("building examples/hello-rust failed".into());
    }
    use std::os::unix::fs::PermissionsExt;
    for d in [dir, app.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let bin = app.join("target/release/hello");
    Ok((app, bin))
}

fn copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        if e.file_name() == "target" {
            continue;
        }
        if e.file_type()?.is_dir() {
            copy(&e.path(), &dst.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// One health check like the agent's: `GET /healthz` answered 200.
async fn healthy(conn: std::io::Result<TcpStream>) -> bool {
    let Ok(mut c) = conn else { return false };
    if c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    let mut n = 0;
    while n < 12 {
        match c.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(m) => n += m,
        }
    }
    buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")
}

async fn wait_ready<F, Fut>(mut probe: F) -> Res<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<TcpStream>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if healthy(probe().await).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Err("not ready within 20 s".into())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn direct(bin: &Path, app: &Path) -> Res<Duration> {
    let t = Instant::now();
    let mut child = tokio::process::Command::new(bin)
        .current_dir(app)
        .env("PORT", PORT.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    wait_ready(|| TcpStream::connect(("127.0.0.1", PORT))).await?;
    let d = t.elapsed();
    child.kill().await?;
    Ok(d)
}

fn spec(sb: &Sandboxes, backend: Backend, n: usize, app: &Path) -> SandboxSpec {
    let mut s = SandboxSpec {
        stdout: Output::Null,
        stderr: Output::Null,
        memory_mb: 128,
        pids_max: 512,
        cpu_millis: Some(1000),
        confine: Some(sb.confinement().clone()),
        backend,
        ..SandboxSpec::new(
            format!("bench-{}-{n}-{}", backend, std::process::id()),
            app,
            "./target/release/hello",
        )
    };
    s.env.insert("PORT".into(), PORT.to_string());
    s
}

async fn sandboxed(sb: &Sandboxes, backend: Backend, n: usize, app: &Path) -> Res<Duration> {
    let t = Instant::now();
    let p = sb.spawn(spec(sb, backend, n, app)).await?;
    let r = wait_ready(|| p.connect(PORT)).await;
    let d = t.elapsed();
    p.stop(Duration::from_secs(2)).await;
    r.map(|()| d)
}

/// What a memory cgroup is charged, page cache excluded, KiB (v1 or v2).
fn charge_kib(dir: &Path) -> u64 {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let stat = read("memory.stat");
    let key = |k: &str| {
        stat.lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == k).then(|| it.next()?.parse::<u64>().ok())?
            })
            .unwrap_or(0)
    };
    let (usage, cache): (u64, u64) = if dir.join("memory.current").exists() {
        (
            read("memory.current").trim().parse().unwrap_or(0),
            key("file"),
        )
    } else {
        (
            read("memory.usage_in_bytes").trim().parse().unwrap_or(0),
            key("cache"),
        )
    };
    usage.saturating_sub(cache) / 1024
}

/// Proportional set size of a process, KiB.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

async fn run() -> Res<()> {
    let tmp = std::env::temp_dir().join(format!("stead-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let (app, bin) = build_example(&tmp)?;
    // The sandbox init an agent would run, when scripts/bench names the
    // release `stead`: `stead-init` beside it, else `stead` itself; without
    // it, this program (it calls init_main too).
    let exe = match std::env::var_os("STEAD_BENCH_BIN") {
        Some(p) if Path::new(&p).is_file() => {
            let stead = PathBuf::from(p);
            let small = stead.with_file_name("stead-init");
            if small.is_file() {
                small
            } else {
                stead
            }
        }
        _ => std::env::current_exe()?,
    };
    println!("sandbox init: {}", exe.display());
    let sb = Sandboxes::new(exe, Backend::Process)?;
    let backends = sb.backends();
    println!(
        "start-to-ready of examples/hello-rust (GET /healthz = 200), median of {STARTS} starts"
    );
    // Each backend's starts are interleaved with direct starts (direct,
    // sandboxed, direct, ...), so that a load that comes and goes on the
    // machine weighs on both alike. BENCH_PAUSE_MS (default 0) waits
    // between a stop and the next start.
    let pause = Duration::from_millis(
        std::env::var("BENCH_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let mut rows: Vec<(String, Duration, Duration, Duration)> = Vec::new();
    for backend in [Backend::Process, Backend::Gvisor] {
        if !backends.contains(&backend) {
            println!("{backend}: not available on this host (runsc missing)");
            continue;
        }
        // One warm-up start (page cache, runsc's first run).
        sandboxed(&sb, backend, 999, &app).await?;
        let (mut d, mut r) = (Vec::new(), Vec::new());
        for n in 0..STARTS {
            tokio::time::sleep(pause).await;
            d.push(direct(&bin, &app).await?);
            tokio::time::sleep(pause).await;
            r.push(sandboxed(&sb, backend, n, &app).await?);
        }
        let min = *r.iter().min().unwrap_or(&Duration::ZERO);
        rows.push((format!("{backend} backend"), median(r), min, median(d)));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average during the run: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "| backend | median start-to-ready | direct, interleaved (median) | overhead | fastest sandboxed start |"
    );
    println!("|---|---|---|---|---|");
    for (name, m, min, direct_median) in &rows {
        println!(
            "| {name} | {} | {} | **{}** | {} |",
            ms(*m),
            ms(*direct_median),
            ms(m.saturating_sub(*direct_median)),
            ms(*min)
        );
    }

    // Memory per idle instance: the memory cgroup's charge (everything but
    // page cache: the processes' own pages and the kernel's objects for
    // them) of an idle app run directly in a cgroup of its own, against an
    // idle app in a process sandbox (its cgroup holds the app, the two
    // init processes, and the namespaces, mounts and tmpfs the kernel made
    // for it). The difference is what the platform adds.
    let mut direct_kib = Vec::new();
    let mut kids = Vec::new();
    let mut dirs = Vec::new();
    let probe = sb.spawn(spec(&sb, Backend::Process, 998, &app)).await?;
    let parent = probe
        .cgroup()
        .memory
        .parent()
        .ok_or("no cgroup parent")?
        .to_path_buf();
    probe.stop(Duration::from_secs(2)).await;
    for n in 0..IDLE_INSTANCES {
        let dir = parent.join(format!("bench-direct-{n}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let port = 9000 + n as u16;
        let c = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {}",
                dir.display(),
                bin.display()
            ))
            .current_dir(&app)
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        kids.push(c);
        wait_ready(|| TcpStream::connect(("127.0.0.1", port))).await?;
        dirs.push(dir);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for d in &dirs {
        direct_kib.push(charge_kib(d));
    }
    for mut k in kids {
        let _ = k.kill().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for d in &dirs {
        let _ = std::fs::remove_dir(d);
    }
    let mut procs: Vec<SandboxProcess> = Vec::new();
    for n in 0..IDLE_INSTANCES {
        let p = sb.spawn(spec(&sb, Backend::Process, 100 + n, &app)).await?;
        wait_ready(|| p.connect(PORT)).await?;
        procs.push(p);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sandboxed_kib = Vec::new();
    let mut init_pss = Vec::new();
    for p in &procs {
        sandboxed_kib.push(charge_kib(&p.cgroup().memory));
        let mut pss = pss_kib(p.pid());
        for c in children_of(p.pid()) {
            pss += pss_kib(c); // pid 1 of the sandbox
        }
        init_pss.push(pss);
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    println!();
    println!(
        "memory per idle instance (mean of {IDLE_INSTANCES} idle instances; cgroup charge without page cache):"
    );
    println!("| | KiB per instance |");
    println!("|---|---|");
    println!(
        "| app run directly, in a cgroup of its own | {:.0} |",
        mean(&direct_kib)
    );
    println!(
        "| app in a process sandbox (its cgroup) | {:.0} |",
        mean(&sandboxed_kib)
    );
    println!(
        "| **platform overhead** (difference) | **{:.0}** |",
        mean(&sandboxed_kib) - mean(&direct_kib)
    );
    println!(
        "| of which the sandbox's two init processes (PSS) | {:.0} |",
        mean(&init_pss)
    );
    for p in &procs {
        p.stop(Duration::from_secs(2)).await;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
