//! The long-running components: `stead server`, `stead agent`,
//! `stead router`, and `stead tokens create` for bootstrapping.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct ServerArgs {
    /// Database URL: `sqlite:///path/stead.db` or `postgres://user:pass@host/db`.
    #[arg(long, env = "STEAD_DATABASE_URL")]
    pub database: String,
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Folder for temporary uploads and the secrets key (`secret.key`).
    #[arg(long, default_value = "./stead-server-data")]
    pub data_dir: PathBuf,
    /// Public URL of a router in front of the apps, shown to users.
    #[arg(long)]
    pub router_url: Option<String>,
    /// Domain apps are served under (`<app>.<domain>`).
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// Provision apps' databases on this PostgreSQL server (a URL of a role
    /// that may create roles and databases).
    #[arg(long, env = "STEAD_APP_DATABASE_URL")]
    pub app_database_url: Option<String>,
    /// Without --app-database-url: folder of the apps' SQLite databases
    /// (it must be the agents' `<data dir>/appdata`, so single-machine only).
    #[arg(long)]
    pub app_database_dir: Option<PathBuf>,
    /// The key secrets are encrypted with (64 hex characters; created if
    /// missing). Every replica on one database needs the same key: give
    /// them all a copy of the first one's. Default: `<data dir>/secret.key`.
    #[arg(long, env = "STEAD_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// A host whose heartbeats stop this long is dead: its instances are
    /// placed elsewhere, their workflows recovered, and what it still runs
    /// when it comes back is fenced (stopped).
    #[arg(long, default_value = "30s", value_parser = crate::scale::parse_duration)]
    pub host_timeout: Duration,
}

#[derive(Args)]
pub struct AgentArgs {
    /// Control-plane URL(s), comma separated; the agent fails over between them.
    #[arg(long, value_delimiter = ',', required = true, env = "STEAD_SERVER")]
    pub server: Vec<String>,
    /// Host token (`stead tokens create --host`).
    #[arg(long, env = "STEAD_HOST_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long, default_value = "./stead-agent-data")]
    pub data_dir: PathBuf,
    /// Host name (default: the machine's host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Address the routers use to reach this host's instances.
    #[arg(long, default_value = "127.0.0.1")]
    pub advertise_ip: std::net::IpAddr,
    /// Do not run build tasks on this host.
    #[arg(long)]
    pub no_builds: bool,
    /// Sandbox backend of instances whose app names none: process or gvisor
    /// (gvisor needs `runsc`).
    #[arg(long, env = "STEAD_SANDBOX", default_value = "process", value_parser = parse_backend)]
    pub sandbox: stead_sandbox::Backend,
    /// Private IPv4 pool egress instances' addresses come from (a /30 each);
    /// it must not be used by the host's networks.
    #[arg(long, env = "STEAD_EGRESS_POOL", default_value = "10.213.0.0/16", value_parser = parse_pool)]
    pub egress_pool: stead_sandbox::Ipv4Net,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

/// The sandbox init an agent runs: `stead-init` beside this binary
/// when it is installed (a small binary: sandboxes start faster and cost
/// less memory), else this binary itself (`stead __sandbox-init`).
pub fn sandbox_init_exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding the stead binary for the sandbox init")?;
    let small = me.with_file_name("stead-init");
    Ok(if small.is_file() { small } else { me })
}

/// `--egress-pool a.b.c.d/n` (n at most 30).
pub fn parse_pool(s: &str) -> Result<stead_sandbox::Ipv4Net, String> {
    stead_sandbox::Ipv4Net::parse(s)
        .filter(|n| n.prefix <= 30)
        .ok_or_else(|| format!("{s:?} is not an IPv4 network like 10.213.0.0/16 (at most /30)"))
}

/// `--sandbox process|gvisor`.
pub fn parse_backend(s: &str) -> Result<stead_sandbox::Backend, String> {
    stead_sandbox::Backend::parse(s)
        .ok_or_else(|| format!("unknown sandbox backend {s:?}: use process or gvisor"))
}

#[derive(Args)]
pub struct RouterArgs {
    #[arg(long, value_delimiter = ',', required = true, env = "STEAD_SERVER")]
    pub server: Vec<String>,
    /// Host token (`stead tokens create --host`).
    #[arg(long, env = "STEAD_HOST_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// How long a request to an app without a ready instance (scaled to
    /// zero, restarting) is held before it gets 503.
    #[arg(long, default_value = "30s", value_parser = crate::scale::parse_duration)]
    pub wake_timeout: Duration,
    /// Unix socket through which a router started for the same address
    /// takes the listening socket over from this one (which then drains), so
    /// an upgrade refuses no connection. Default: derived from --listen,
    /// under $XDG_RUNTIME_DIR/stead, /run/stead (root) or /tmp/stead-UID.
    #[arg(long)]
    pub handover_socket: Option<PathBuf>,
    /// Neither take over from a running router nor offer to hand over: just
    /// bind.
    #[arg(long, conflicts_with = "handover_socket")]
    pub no_handover: bool,
    /// Bound on draining (after a hand-over or SIGTERM): connections still
    /// open this long are cut.
    #[arg(long, default_value = "10s", value_parser = crate::scale::parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Print a new API token.
    Create {
        #[arg(long, env = "STEAD_DATABASE_URL")]
        database: String,
        /// A user token for this organisation (created if new).
        #[arg(long, conflicts_with = "host", required_unless_present = "host")]
        org: Option<String>,
        /// User name within the organisation.
        #[arg(long, default_value = "admin")]
        user: String,
        /// A host token, for agents and routers.
        #[arg(long)]
        host: bool,
    },
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let mut config = stead_server::ServerConfig::new(args.database, args.listen, args.data_dir);
    config.host_timeout = args.host_timeout;
    config.router_url = args.router_url;
    config.domain = args.domain;
    config.secret_key_file = args.secret_key_file;

    if let Some(url) = args.app_database_url {
        config.app_databases = stead_server::AppDatabases::Postgres { admin_url: url };
    } else if let Some(dir) = args.app_database_dir {
        config.app_databases = stead_server::AppDatabases::Sqlite { dir };
    }
    let server = stead_server::Server::bind(config).await?;
    eprintln!("stead server listening on http://{}", server.local_addr());
    server.serve(shutdown_signal()).await?;
    Ok(())
}

pub fn host_name() -> String {
    nix_hostname().unwrap_or_else(|| "localhost".to_string())
}

fn nix_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let init = sandbox_init_exe()?;
    let mut config = stead_agent::AgentConfig::new(
        args.server,
        args.token,
        args.data_dir,
        args.name.unwrap_or_else(host_name),
        init,
    );
    config.advertise_ip = args.advertise_ip;
    config.builds = !args.no_builds;
    config.sandbox = args.sandbox;
    config.egress.pool = args.egress_pool;
    config.metrics_listen = args.metrics_listen;
    stead_agent::run(config, shutdown_signal()).await?;
    Ok(())
}

pub async fn router(args: RouterArgs) -> anyhow::Result<()> {
    let source = Arc::new(stead_router::ApiRouteSource::new(args.server, args.token));
    let mut config = router_config(args.listen, args.domain);
    config.wake_wait = args.wake_timeout;
    config.drain_timeout = args.drain_timeout;
    if !args.no_handover {
        config.handover = Some(
            args.handover_socket
                .unwrap_or_else(|| stead_router::handover::default_socket_path(args.listen)),
        );
    }
    let router = stead_router::Router::bind(config, source).await?;
    let how = if router.took_over() {
        " (took over from the running router)"
    } else {
        ""
    };
    eprintln!(
        "stead router listening on http://{}{how}",
        router.local_addr()
    );
    router.serve(shutdown_signal()).await?;
    Ok(())
}

pub fn router_config(listen: SocketAddr, domain: String) -> stead_router::RouterConfig {
    stead_router::RouterConfig {
        listen,
        domain,
        refresh_interval: Duration::from_millis(500),
        ..stead_router::RouterConfig::default()
    }
}

pub async fn tokens(cmd: TokensCommand) -> anyhow::Result<()> {
    match cmd {
        TokensCommand::Create {
            database,
            org,
            user,
            host,
        } => {
            let store = stead_store::Store::connect(&database).await?;
            let token = if host {
                store.create_host_token().await?
            } else {
                let Some(org) = org else {
                    bail!("give --org NAME for a user token, or --host for a host token")
                };
                store.create_user_token(&org, &user).await?
            };
            println!("{token}");
            Ok(())
        }
    }
}
