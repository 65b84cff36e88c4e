//! Client commands other than deploy.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use stead_api::{
    AppStatus, AppSummary, EnvSetRequest, EnvVar, HostInfo, LogLine, RollbackRequest, VersionInfo,
    WhoAmI,
};

use crate::api::Api;
use crate::{credentials, ClientArgs};

#[derive(Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let stored = credentials::load();
    let api = args
        .client
        .api
        .or_else(|| stored.as_ref().map(|c| c.api.clone()))
        .ok_or_else(|| anyhow!("give the control-plane URL with --api URL"))?;
    let token = match args.client.token {
        Some(t) => t,
        None => {
            eprint!("API token for {api}: ");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the token from standard input")?;
            line.trim().to_string()
        }
    };
    let client = Api::new(api.clone(), token.clone());
    let who: WhoAmI = client.get("/v1/whoami").await.map_err(|e| match e.status() {
        Some(401) => anyhow!("the control plane at {api} does not accept this token; check it or create one with `stead tokens create`"),
        _ => anyhow!(e),
    })?;
    let path = credentials::save(&credentials::Credentials {
        api: api.clone(),
        token,
    })?;
    println!(
        "Logged in to {api} as {} (organisation {}); credentials in {}",
        who.user.as_deref().unwrap_or("-"),
        who.org,
        path.display()
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum AppsCommand {
    /// List your organisation's apps.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show an app: active version, scale, instances.
    Status {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List an app's versions.
    Versions {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make an earlier version active again, without rebuilding it.
    Rollback {
        app: String,
        /// Version to roll back to (default: the one before the active one).
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete an app, its versions and its environment; its instances stop.
    Delete {
        app: String,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn ago(ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = ((now - ms) / 1000).max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub fn print_status(s: &AppStatus) {
    println!("app:       {} (organisation {})", s.name, s.org);
    println!(
        "active:    {}",
        s.active_version
            .map(|v| format!("v{v}"))
            .unwrap_or_else(|| "none".into())
    );
    println!(
        "latest:    {}",
        s.latest_version
            .map(|v| format!("v{v}"))
            .unwrap_or_else(|| "none".into())
    );
    println!("scale:     min {} max {}", s.scale.min, s.scale.max);
    if let Some(a) = &s.autoscale {
        crate::scale::print_scale(a);
    }
    if let Some(url) = &s.url {
        println!("url:       {url}");
    }
    if s.instances.is_empty() {
        println!("instances: none");
    } else {
        println!();
        table(
            &[
                "INSTANCE", "VERSION", "HOST", "STATE", "EXECUTOR", "STARTED", "EXIT",
            ],
            s.instances
                .iter()
                .map(|i| {
                    vec![
                        i.id.clone(),
                        format!("v{}", i.version),
                        i.host.clone(),
                        i.state.as_str().into(),
                        i.executor_id.clone(),
                        ago(i.started_at_ms),
                        opt(i.exit.clone()),
                    ]
                })
                .collect(),
        );
    }
}

pub async fn apps(cmd: AppsCommand) -> anyhow::Result<()> {
    match cmd {
        AppsCommand::List { json, client } => {
            let api = Api::from_args(&client)?;
            let apps: Vec<AppSummary> = api.get("/v1/apps").await?;
            if json {
                return print_json(&apps);
            }
            if apps.is_empty() {
                println!("No apps yet. Deploy one with `stead deploy DIR`.");
                return Ok(());
            }
            table(
                &["NAME", "ACTIVE", "LATEST", "READY", "CREATED"],
                apps.iter()
                    .map(|a| {
                        vec![
                            a.name.clone(),
                            opt(a.active_version.map(|v| format!("v{v}"))),
                            opt(a.latest_version.map(|v| format!("v{v}"))),
                            a.ready_instances.to_string(),
                            ago(a.created_at_ms),
                        ]
                    })
                    .collect(),
            );
        }
        AppsCommand::Status { app, json, client } => {
            let api = Api::from_args(&client)?;
            let s: AppStatus = api.get(&format!("/v1/apps/{app}")).await?;
            if json {
                return print_json(&s);
            }
            print_status(&s);
        }
        AppsCommand::Versions { app, json, client } => {
            let api = Api::from_args(&client)?;
            let vs: Vec<VersionInfo> = api.get(&format!("/v1/apps/{app}/versions")).await?;
            if json {
                return print_json(&vs);
            }
            table(
                &[
                    "VERSION", "STATE", "ACTIVE", "BUNDLE", "SIZE", "CREATED", "ERROR",
                ],
                vs.iter()
                    .map(|v| {
                        vec![
                            format!("v{}", v.number),
                            v.state.as_str().into(),
                            if v.active { "*".into() } else { String::new() },
                            v.bundle_hash.chars().take(12).collect(),
                            format!("{} KiB", v.bundle_size.div_ceil(1024)),
                            ago(v.created_at_ms),
                            v.error
                                .as_deref()
                                .map(|e| e.lines().next().unwrap_or("").to_string())
                                .unwrap_or_default(),
                        ]
                    })
                    .collect(),
            );
        }
        AppsCommand::Rollback {
            app,
            version,
            json,
            client,
        } => {
            let api = Api::from_args(&client)?;
            let s: AppStatus = api
                .post(
                    &format!("/v1/apps/{app}/rollback"),
                    &RollbackRequest { version },
                )
                .await?;
            if json {
                return print_json(&s);
            }
            println!("{app}: active version is now v{}", opt(s.active_version));
        }
        AppsCommand::Delete { app, yes, client } => {
            let api = Api::from_args(&client)?;
            if !yes {
                use std::io::IsTerminal;
                if !std::io::stdin().is_terminal() {
                    bail!("refusing to delete {app} without confirmation: pass --yes");
                }
                eprint!("Delete app {app}, all its versions and its environment? Type the app name to confirm: ");
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                if line.trim() != app {
                    bail!("not deleted: the name typed did not match {app}");
                }
            }
            api.delete(&format!("/v1/apps/{app}")).await?;
            println!("Deleted {app}.");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum EnvCommand {
    /// Set variables: `stead env set APP KEY=VALUE...` (`--secret` encrypts them at rest and masks them in listings).
    Set {
        app: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        #[arg(long)]
        secret: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove variables.
    Unset {
        app: String,
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List variables (secrets masked).
    List {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Import variables from a .env file (KEY=VALUE lines, # comments, optional quotes).
    Import {
        app: String,
        file: PathBuf,
        #[arg(long)]
        secret: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn parse_pair(p: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = p
        .split_once('=')
        .ok_or_else(|| anyhow!("`{p}` is not KEY=VALUE: write it as KEY=VALUE (quote the whole argument if VALUE has spaces)"))?;
    stead_api::names::validate_env_key(k).map_err(|e| anyhow!(e))?;
    Ok((k.to_string(), v.to_string()))
}

/// Parses a .env file, naming the line of any error.
pub fn parse_dotenv(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| anyhow!("line {}: `{}` is not KEY=VALUE", n + 1, raw.trim()))?;
        let k = k.trim();
        stead_api::names::validate_env_key(k).map_err(|e| anyhow!("line {}: {e}", n + 1))?;
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            v[1..v.len() - 1].to_string()
        } else {
            v.to_string()
        };
        vars.insert(k.to_string(), v);
    }
    Ok(vars)
}

pub async fn env(cmd: EnvCommand) -> anyhow::Result<()> {
    match cmd {
        EnvCommand::Set {
            app,
            pairs,
            secret,
            client,
        } => {
            let api = Api::from_args(&client)?;
            let vars = pairs
                .iter()
                .map(|p| parse_pair(p))
                .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
            let n = vars.len();
            api.put(
                &format!("/v1/apps/{app}/env"),
                &EnvSetRequest { vars, secret },
            )
            .await?;
            println!(
                "{app}: set {n} {}; new instances get them",
                if secret { "secret(s)" } else { "variable(s)" }
            );
        }
        EnvCommand::Unset { app, keys, client } => {
            let api = Api::from_args(&client)?;
            for k in &keys {
                api.delete(&format!("/v1/apps/{app}/env/{k}")).await?;
            }
            println!("{app}: removed {}", keys.join(", "));
        }
        EnvCommand::List { app, json, client } => {
            let api = Api::from_args(&client)?;
            let vars: Vec<EnvVar> = api.get(&format!("/v1/apps/{app}/env")).await?;
            if json {
                return print_json(&vars);
            }
            table(
                &["KEY", "VALUE", "SECRET"],
                vars.iter()
                    .map(|v| {
                        vec![
                            v.key.clone(),
                            v.value.clone(),
                            if v.secret {
                                "yes".into()
                            } else {
                                String::new()
                            },
                        ]
                    })
                    .collect(),
            );
        }
        EnvCommand::Import {
            app,
            file,
            secret,
            client,
        } => {
            let api = Api::from_args(&client)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let vars = parse_dotenv(&text).with_context(|| format!("in {}", file.display()))?;
            if vars.is_empty() {
                bail!(
                    "{} has no KEY=VALUE lines; nothing imported",
                    file.display()
                );
            }
            let n = vars.len();
            api.put(
                &format!("/v1/apps/{app}/env"),
                &EnvSetRequest { vars, secret },
            )
            .await?;
            println!("{app}: imported {n} variable(s) from {}", file.display());
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct LogsArgs {
    pub app: String,
    /// Keep printing new lines as they arrive.
    #[arg(long, short)]
    pub follow: bool,
    /// How many recent lines to show first.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub lines: u32,
    /// Print each line as a JSON object.
    #[arg(long)]
    pub json: bool,
    /// The build output of a version (the latest unless --version says)
    /// instead of the instances' logs.
    #[arg(long)]
    pub build: bool,
    /// With --build: which version's build.
    #[arg(long, requires = "build")]
    pub version: Option<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `stead logs APP --build`: a version's build output, page by page (and,
/// with --follow, until the build ends).
async fn build_logs(api: &Api, args: &LogsArgs) -> anyhow::Result<()> {
    let app = &args.app;
    let version = match args.version {
        Some(v) => v,
        None => {
            let status: stead_api::AppStatus = api.get(&format!("/v1/apps/{app}")).await?;
            status
                .latest_version
                .ok_or_else(|| anyhow::anyhow!("app {app} has no version yet; deploy it first"))?
        }
    };
    let mut after = 0i64;
    // Bounded: a build log holds at most this many pages of 1000 lines.
    for _ in 0..10_000 {
        let wait = if args.follow { "&wait_ms=10000" } else { "" };
        let page: stead_api::BuildLogPage = api
            .get(&format!(
                "/v1/apps/{app}/versions/{version}/build-log?after={after}&limit=1000{wait}"
            ))
            .await?;
        for l in &page.lines {
            if args.json {
                println!("{}", serde_json::to_string(l)?);
            } else {
                println!("{}", l.line);
            }
            after = l.seq;
        }
        let building = page.state == stead_api::VersionState::Building;
        if page.lines.is_empty() && !(args.follow && building) {
            if let Some(e) = page.error.filter(|_| !args.json) {
                eprintln!("build of {app} v{version} failed: {e}");
            }
            return Ok(());
        }
    }
    Ok(())
}

pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let api = Api::from_args(&args.client)?;
    if args.build {
        return build_logs(&api, &args).await;
    }
    let app = &args.app;
    let mut lines: Vec<LogLine> = api
        .get(&format!("/v1/apps/{app}/logs?limit={}", args.lines))
        .await?;
    let mut after = None;
    loop {
        for l in &lines {
            if args.json {
                println!("{}", serde_json::to_string(l)?);
            } else {
                println!(
                    "{} v{} {} {}| {}",
                    l.instance,
                    l.version,
                    l.host,
                    if l.stream == stead_api::LogStream::Stderr {
                        "err "
                    } else {
                        ""
                    },
                    l.line
                );
            }
            after = Some(l.seq);
        }
        if !args.follow {
            return Ok(());
        }
        let path = match after {
            Some(seq) => format!("/v1/apps/{app}/logs?after={seq}&limit=1000&wait_ms=20000"),
            None => format!("/v1/apps/{app}/logs?after=0&limit=1000&wait_ms=20000"),
        };
        lines = match api.get(&path).await {
            Ok(l) => l,
            Err(e) if e.transient() => {
                eprintln!("warning: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
    }
}

#[derive(Subcommand)]
pub enum HostsCommand {
    /// List data-plane hosts (alive / draining / dead, instance counts).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop placing instances on HOST and replace those it runs elsewhere
    /// (each old one stops once its replacement is ready). Needs the
    /// platform's host token (`stead tokens create --host`).
    Drain {
        /// Host name or id.
        host: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Let HOST take new instances again.
    Undrain {
        /// Host name or id.
        host: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn hosts(cmd: HostsCommand) -> anyhow::Result<()> {
    match cmd {
        HostsCommand::List { json, client } => {
            let api = Api::from_args(&client)?;
            let hosts: Vec<HostInfo> = api.get("/v1/hosts").await?;
            if json {
                return print_json(&hosts);
            }
            table(
                &[
                    "NAME",
                    "ID",
                    "STATE",
                    "INSTANCES",
                    "FENCED",
                    "MEMORY",
                    "CPUS",
                    "BACKENDS",
                    "HEARTBEAT",
                ],
                hosts
                    .iter()
                    .map(|h| {
                        vec![
                            h.name.clone(),
                            h.id.clone(),
                            h.state.clone(),
                            h.instances.to_string(),
                            h.fenced.to_string(),
                            format!("{} MiB", h.capacity.memory_mb),
                            h.capacity.cpus.to_string(),
                            h.backends.join(","),
                            ago(h.last_heartbeat_ms),
                        ]
                    })
                    .collect(),
            );
        }
        HostsCommand::Drain { host, json, client } => {
            let api = Api::from_args(&client)?;
            let h: HostInfo = api
                .post(&format!("/v1/hosts/{}/drain", urlencode(&host)), &())
                .await?;
            if json {
                return print_json(&h);
            }
            println!(
                "host {} is draining: it gets no new instances; its {} instance(s) are replaced elsewhere",
                h.name, h.instances
            );
        }
        HostsCommand::Undrain { host, json, client } => {
            let api = Api::from_args(&client)?;
            let h: HostInfo = api
                .post(&format!("/v1/hosts/{}/undrain", urlencode(&host)), &())
                .await?;
            if json {
                return print_json(&h);
            }
            println!("host {} takes new instances again", h.name);
        }
    }
    Ok(())
}

/// Host names are plain (no spaces, no control characters) but may hold
/// characters a path segment cannot.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_parsing() {
        let v = parse_dotenv("# c\nA=1\nexport B = \"two words\"\n\nC='x=y'\n").unwrap();
        assert_eq!(v.get("A").map(String::as_str), Some("1"));
        assert_eq!(v.get("B").map(String::as_str), Some("two words"));
        assert_eq!(v.get("C").map(String::as_str), Some("x=y"));
        let err = parse_dotenv("A=1\nnot a pair\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_dotenv("1A=x").is_err());
    }

    #[test]
    fn pairs() {
        assert_eq!(parse_pair("K=v=w").unwrap(), ("K".into(), "v=w".into()));
        assert!(parse_pair("novalue").is_err());
    }
}
