//! `stead deploy`: pack, upload (with progress), follow the build, and
//! return only once the new version answers through the router.
//!
//! Every request is retried while the control plane is away (it may be
//! restarting), and the upload carries an idempotency key, so a deploy
//! interrupted by a control-plane crash completes after the restart with
//! exactly one new version.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use stead_api::{
    AppConfig, AppStatus, BuildLogPage, DeployResponse, Event, InstanceState, LogLine, LogStream,
    ServerInfo, VersionState,
};
use stead_bundle::PackOptions;

use crate::api::{Api, ApiError};
use crate::ClientArgs;

#[derive(Args)]
pub struct DeployArgs {
    /// The app folder (default: the current folder).
    pub dir: Option<PathBuf>,
    /// App name (default: the name in stead.toml / dbos-config.yaml).
    #[arg(long)]
    pub app: Option<String>,
    /// How long to wait for the build and for the new version to answer.
    #[arg(long, default_value = "600", value_name = "SECONDS")]
    pub timeout: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: DeployArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    if !dir.is_dir() {
        bail!(
            "{} is not a folder: give the app folder to deploy",
            dir.display()
        );
    }
    let config = read_config(&dir)?;
    let app = args.app.clone().unwrap_or_else(|| config.name.clone());
    stead_api::names::validate_app_name(&app).map_err(|e| anyhow!(e))?;
    let api = Api::from_args(&args.client)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let quiet = args.json;

    // 1. Pack.
    let (tmp, stats) = pack(&dir, quiet).await?;

    // 2. Upload, retried with the same idempotency key.
    let key = format!(
        "deploy-{}-{:016x}",
        stats.sha256.get(..16).unwrap_or(""),
        rand_u64()
    );
    let deployed = upload(
        &api,
        &app,
        tmp.path(),
        stats.compressed_bytes,
        &key,
        deadline,
        quiet,
        false,
    )
    .await?;
    if !quiet {
        eprintln!(
            "Uploaded {app} as version v{} (bundle {})",
            deployed.version,
            &deployed.bundle_hash[..12.min(deployed.bundle_hash.len())]
        );
    }

    // 3. Follow the build.
    follow_build(&api, &app, deployed.version, deadline, quiet).await?;

    // 4. Wait until it serves.
    let url = wait_serving(&api, &app, deployed.version, deadline, quiet).await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"app": app, "version": deployed.version, "bundle_hash": deployed.bundle_hash, "url": url})
        );
    } else {
        println!(
            "{app} v{} is live{}",
            deployed.version,
            url.map(|u| format!(" at {u}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Packs the app folder into a temporary bundle (checked as the server
/// will check it), with a spinner.
async fn pack(
    dir: &Path,
    quiet: bool,
) -> anyhow::Result<(tempfile::NamedTempFile, stead_bundle::PackStats)> {
    let dir = dir.to_path_buf();
    let tmp = tempfile::Builder::new()
        .prefix("stead-bundle-")
        .suffix(".tar.zst")
        .tempfile()?;
    let spinner = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_style(
        ProgressStyle::with_template("{spinner} packing {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(100));
    let (pack_dir, pack_file, sp) = (dir.clone(), tmp.path().to_path_buf(), spinner.clone());
    let stats = tokio::task::spawn_blocking(move || -> anyhow::Result<stead_bundle::PackStats> {
        let f = std::fs::File::create(&pack_file)?;
        let opts = PackOptions {
            default_excludes: true,
            honour_steadignore: true,
        };
        let mut progress =
            |files: u64, bytes: u64| sp.set_message(format!("{files} files, {}", human(bytes)));
        let stats =
            stead_bundle::pack_dir(&pack_dir, &opts, std::io::BufWriter::new(f), &mut progress)?;
        // Check the bundle as the server will, so a folder it would refuse
        // (a link pointing outside, too large) fails before the upload.
        let f = std::fs::File::open(&pack_file)?;
        stead_bundle::inspect(
            std::io::BufReader::new(f),
            stead_bundle::Policy::Bundle,
            &stead_bundle::Limits::default(),
        )
        .map_err(|e| anyhow!("{} cannot be deployed: {e}", pack_dir.display()))?;
        Ok(stats)
    })
    .await??;
    spinner.finish_and_clear();
    if !quiet {
        eprintln!(
            "Packed {} ({} files, {} -> {} compressed)",
            dir.display(),
            stats.files,
            human(stats.unpacked_bytes),
            human(stats.compressed_bytes)
        );
    }

    Ok((tmp, stats))
}

/// Packs, uploads and builds `dir` as a new version of `app` that is not
/// promoted (a rollout promotes it); returns its number once it is built.
pub async fn build_only(
    api: &Api,
    dir: &Path,
    app: &str,
    deadline: Instant,
) -> anyhow::Result<u32> {
    read_config(dir)?;
    let (tmp, stats) = pack(dir, false).await?;
    let key = format!(
        "hold-{}-{:016x}",
        stats.sha256.get(..16).unwrap_or(""),
        rand_u64()
    );
    let deployed = upload(
        api,
        app,
        tmp.path(),
        stats.compressed_bytes,
        &key,
        deadline,
        false,
        true,
    )
    .await?;
    eprintln!(
        "Uploaded {app} as version v{} (held for the rollout)",
        deployed.version
    );
    follow_build(api, app, deployed.version, deadline, false).await?;
    Ok(deployed.version)
}

fn read_config(dir: &Path) -> anyhow::Result<AppConfig> {
    let read = |name: &str| -> anyhow::Result<Option<String>> {
        let p = dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    };
    let toml = read(stead_api::config::STEAD_TOML)?;
    let yaml = read(stead_api::config::DBOS_CONFIG)?;
    AppConfig::from_files(toml.as_deref(), yaml.as_deref())
        .map_err(|e| anyhow!("in {}: {e}", dir.display()))
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return t as u64 ^ std::process::id() as u64;
    }
    u64::from_le_bytes(b)
}

pub fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Runs `f` until it succeeds, a non-transient error, or the deadline;
/// transient errors (control plane away or failing) are retried with backoff.
async fn retrying<T, F, Fut>(
    what: &str,
    deadline: Instant,
    quiet: bool,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let mut delay = Duration::from_millis(200);
    let mut warned = false;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.transient() && Instant::now() < deadline => {
                if !warned && !quiet {
                    eprintln!("warning: {what}: {e}; retrying until the control plane is back");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(anyhow!(e).context(what.to_string())),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn upload(
    api: &Api,
    app: &str,
    file: &Path,
    size: u64,
    key: &str,
    deadline: Instant,
    quiet: bool,
    hold: bool,
) -> anyhow::Result<DeployResponse> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    bar.set_style(
        ProgressStyle::with_template("uploading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let result = retrying("uploading the bundle", deadline, quiet, || {
        let bar = bar.clone();
        async move {
            bar.set_position(0);
            let f = tokio::fs::File::open(file)
                .await
                .map_err(|e| ApiError::Decode(format!("reopening the bundle: {e}")))?;
            let stream = tokio_util::io::ReaderStream::new(f).map(move |chunk| {
                if let Ok(c) = &chunk {
                    bar.inc(c.len() as u64);
                }
                chunk
            });
            let req = api
                .request(
                    reqwest::Method::POST,
                    &format!(
                        "/v1/apps/{app}/deploy{}",
                        if hold { "?hold=true" } else { "" }
                    ),
                )
                .header("content-type", "application/zstd")
                .header("content-length", size)
                .header(stead_api::IDEMPOTENCY_HEADER, key)
                .body(reqwest::Body::wrap_stream(stream));
            api.json::<DeployResponse>(req).await
        }
    })
    .await;
    bar.finish_and_clear();
    result
}

async fn follow_build(
    api: &Api,
    app: &str,
    version: u32,
    deadline: Instant,
    quiet: bool,
) -> anyhow::Result<()> {
    let mut after = 0i64;
    loop {
        let path =
            format!("/v1/apps/{app}/versions/{version}/build-log?after={after}&wait_ms=10000");
        let page: BuildLogPage =
            retrying("following the build", deadline, quiet, || api.get(&path)).await?;
        for l in &page.lines {
            after = after.max(l.seq);
            if !quiet {
                match l.stream {
                    LogStream::System => eprintln!("--> {}", l.line),
                    _ => eprintln!("    {}", l.line),
                }
            }
        }
        match page.state {
            VersionState::Ready if page.lines.is_empty() => return Ok(()),
            VersionState::Failed if page.lines.is_empty() => {
                bail!(
                    "the build of {app} v{version} failed: {}\nThe active version (if any) keeps serving. See the whole build output above, fix the app and deploy again.",
                    page.error.unwrap_or_else(|| "no error recorded".into())
                );
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for the build of {app} v{version}; it continues on the platform: check `stead apps versions {app}`");
        }
    }
}

/// Waits until `version` is the active version with a ready instance and a
/// request through the router is answered by it. Fails early when the
/// version's instances keep exiting before becoming ready.
async fn wait_serving(
    api: &Api,
    app: &str,
    version: u32,
    deadline: Instant,
    quiet: bool,
) -> anyhow::Result<Option<String>> {
    let info: ServerInfo = retrying("reading server info", deadline, quiet, || {
        api.get("/v1/info")
    })
    .await?;
    let router_url = info.router_url.clone();
    let spinner = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_message(format!("waiting for {app} v{version} to serve"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let mut events_after = 0i64;
    // Only exits after the deploy began count.
    let events_path = format!("/v1/apps/{app}/events");
    let initial: Vec<Event> =
        retrying("reading events", deadline, quiet, || api.get(&events_path)).await?;
    if let Some(e) = initial.last() {
        events_after = e.seq;
    }
    let mut exits = Vec::new();
    let mut failed: Option<String> = None;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    let result = loop {
        let status_path = format!("/v1/apps/{app}");
        let status: AppStatus = retrying("reading app status", deadline, quiet, || {
            api.get(&status_path)
        })
        .await?;
        let ready = status.active_version == Some(version)
            && status
                .instances
                .iter()
                .any(|i| i.version == version && i.state == InstanceState::Ready);
        if ready {
            match &router_url {
                None => break Ok(status.url.clone()),
                Some(router) => {
                    let url = format!("{}/apps/{app}/", router.trim_end_matches('/'));
                    if let Ok(resp) = http.get(&url).send().await {
                        let v = resp
                            .headers()
                            .get(stead_api::VERSION_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        if v.as_deref() == Some(version.to_string().as_str()) {
                            break Ok(status.url.clone().or(Some(url)));
                        }
                    }
                }
            }
        }
        let events_path = format!("/v1/apps/{app}/events?after={events_after}");
        let events: Vec<Event> =
            retrying("reading events", deadline, quiet, || api.get(&events_path)).await?;
        for e in events {
            events_after = events_after.max(e.seq);
            let ev_version = e.data.get("version").and_then(|v| v.as_u64());
            if e.kind == "instance_exited" && ev_version == Some(version as u64) {
                exits.push(e.message.clone());
            }
            if e.kind == "version_failed" && ev_version == Some(version as u64) {
                failed = Some(e.message.clone());
            }
        }
        if failed.is_some() || exits.len() >= 3 {
            let logs: Vec<LogLine> = api
                .get(&format!("/v1/apps/{app}/logs?limit=20"))
                .await
                .unwrap_or_default();
            let tail: Vec<String> = logs
                .iter()
                .filter(|l| l.version == version)
                .map(|l| format!("    {} | {}", l.instance, l.line))
                .collect();
            break Err(anyhow!(
                "{app} v{version} was built but its instances keep exiting before they become ready:\n  {}\nLast log lines:\n{}\nCheck the start command in the app's config and `stead logs {app}`.",
                failed.iter().chain(exits.iter()).cloned().collect::<Vec<_>>().join("\n  "),
                if tail.is_empty() { "    (none)".to_string() } else { tail.join("\n") }
            ));
        }
        if Instant::now() >= deadline {
            break Err(anyhow!(
                "timed out waiting for {app} v{version} to answer{}; see `stead apps status {app}` and `stead logs {app}`",
                router_url.as_deref().map(|r| format!(" through the router at {r}")).unwrap_or_default()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    spinner.finish_and_clear();
    result
}
