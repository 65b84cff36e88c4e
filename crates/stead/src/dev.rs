//! `stead dev`: the whole platform in one process on loopback: a control
//! plane on an embedded SQLite database, one agent, and the router. Every
//! component is the real one and talks to the others over HTTP exactly as
//! it would across machines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use clap::Args;

use crate::credentials::{self, Credentials};
use crate::services::{self, shutdown_signal};

#[derive(Args)]
pub struct DevArgs {
    /// Where the platform keeps its state (default: the user's data folder, e.g. ~/.local/share/stead).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub api_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub router_listen: SocketAddr,
    /// Apps are served as `<app>.<domain>`.
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// Deploy this app folder once the platform is up.
    #[arg(long, value_name = "DIR")]
    pub deploy: Option<PathBuf>,
    /// Do not write the CLI's credentials file.
    #[arg(long)]
    pub no_login: bool,
    /// How long the router holds a request to an app without a ready
    /// instance (scaled to zero, restarting) before it gets 503.
    #[arg(long, default_value = "30s", value_parser = crate::scale::parse_duration)]
    pub wake_timeout: std::time::Duration,
    /// Where the agent serves Prometheus metrics (default: a free port on
    /// 127.0.0.1, printed at start).
    #[arg(long)]
    pub agent_metrics_listen: Option<SocketAddr>,
    /// Sandbox backend of instances whose app names none: process or gvisor.
    #[arg(long, env = "STEAD_SANDBOX", default_value = "process", value_parser = crate::services::parse_backend)]
    pub sandbox: stead_sandbox::Backend,
    /// Private IPv4 pool egress instances' addresses come from.
    #[arg(long, env = "STEAD_EGRESS_POOL", default_value = "10.213.0.0/16", value_parser = crate::services::parse_pool)]
    pub egress_pool: stead_sandbox::Ipv4Net,
    /// Provision apps' databases on this PostgreSQL server (a URL of a role
    /// that may create roles and databases) instead of SQLite files.
    #[arg(long, env = "STEAD_APP_DATABASE_URL")]
    pub app_database_url: Option<String>,
}

/// Reads a token kept in the data dir, or makes a new one with `create`
/// when there is none or the database no longer knows it.
async fn persistent_token<F, Fut>(
    store: &stead_store::Store,
    path: &Path,
    create: F,
) -> anyhow::Result<String>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<String, stead_store::StoreError>>,
{
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        if store.authenticate(&t).await?.is_some() {
            return Ok(t);
        }
    }
    let t = create().await?;
    write_private(path, &t)?;
    Ok(t)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(crate::default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data folder {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let db_path = data_dir.join("stead.db");
    let database_url = format!("sqlite://{}", db_path.display());
    let api_url = format!("http://{}", args.api_listen);
    let router_url = format!("http://{}", args.router_listen);

    let store = stead_store::Store::connect(&database_url).await?;
    let user_token = persistent_token(&store, &data_dir.join("dev-token"), || {
        store.create_user_token("default", "dev")
    })
    .await?;
    let host_token = persistent_token(&store, &data_dir.join("host-token"), || {
        store.create_host_token()
    })
    .await?;
    store.close().await;

    let mut config =
        stead_server::ServerConfig::new(database_url, args.api_listen, data_dir.join("server"));
    config.router_url = Some(router_url.clone());
    config.domain = args.domain.clone();
    // SQLite app databases live in each app's data folder on the (only)
    // agent, which the app's sandbox can write.
    config.app_databases = match &args.app_database_url {
        Some(url) => stead_server::AppDatabases::Postgres {
            admin_url: url.clone(),
        },
        None => stead_server::AppDatabases::Sqlite {
            dir: data_dir.join("agent").join("appdata"),
        },
    };
    std::fs::create_dir_all(&config.data_dir)?;
    let server = stead_server::Server::bind(config).await.map_err(|e| {
        anyhow!(
            "could not start the control plane on {}: {e}",
            args.api_listen
        )
    })?;

    let source = Arc::new(stead_router::ApiRouteSource::new(
        vec![api_url.clone()],
        host_token.clone(),
    ));
    let mut router_config = services::router_config(args.router_listen, args.domain.clone());
    router_config.wake_wait = args.wake_timeout;
    let router = stead_router::Router::bind(router_config, source)
        .await
        .map_err(|e| anyhow!("could not start the router on {}: {e}", args.router_listen))?;

    let init = crate::services::sandbox_init_exe()?;
    let mut agent_config = stead_agent::AgentConfig::new(
        vec![api_url.clone()],
        host_token,
        data_dir.join("agent"),
        services::host_name(),
        init,
    );
    agent_config.stop_instances_on_exit = true;
    // A free port unless one was given; printed below.
    let agent_metrics = match args.agent_metrics_listen {
        Some(a) => a,
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for the agent's metrics")?,
    };
    agent_config.metrics_listen = Some(agent_metrics);
    agent_config.sandbox = args.sandbox;
    agent_config.egress.pool = args.egress_pool;

    if !args.no_login {
        let path = credentials::save(&Credentials {
            api: api_url.clone(),
            token: user_token.clone(),
        })?;
        tracing::info!(path = %path.display(), "wrote CLI credentials");
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let server_task = tokio::spawn(server.serve(wait_stop(stop_rx.clone())));
    let router_task = tokio::spawn(router.serve(wait_stop(stop_rx.clone())));
    // The agent is stopped first, so that it stops its instances and ships
    // their last log lines while the control plane still listens.
    let (agent_stop_tx, agent_stop_rx) = tokio::sync::watch::channel(false);
    let agent_task = tokio::spawn(stead_agent::run(agent_config, wait_stop(agent_stop_rx)));

    eprintln!();
    eprintln!("Stead is running (data in {})", data_dir.display());
    eprintln!("  control plane: {api_url}");
    eprintln!(
        "  router:        {router_url}  (apps at http://<app>.{}:{} or {router_url}/apps/<app>/)",
        args.domain,
        args.router_listen.port()
    );
    eprintln!("  metrics:       {router_url}/metrics (router), {api_url}/metrics (control plane), http://{agent_metrics}/metrics (agent)");
    eprintln!(
        "  token:         stored for the CLI in {}",
        credentials::path().display()
    );
    eprintln!();
    eprintln!("Deploy an app from another terminal:  stead deploy examples/hello-rust");
    eprintln!("Stop with Ctrl-C.");
    eprintln!();

    if let Some(dir) = args.deploy.clone() {
        let deploy = crate::deploy::DeployArgs {
            dir: Some(dir),
            app: None,
            timeout: 600,
            json: false,
            client: crate::ClientArgs {
                api: Some(api_url.clone()),
                token: Some(user_token.clone()),
            },
        };
        tokio::select! {
            r = crate::deploy::run(deploy) => {
                if let Err(e) = r {
                    eprintln!("error: the deploy failed: {e:#}");
                }
            }
            _ = shutdown_signal() => {
                let _ = stop_tx.send(true);
            }
        }
    }
    if !*stop_tx.borrow() {
        shutdown_signal().await;
    }
    eprintln!("Stopping Stead...");
    let _ = agent_stop_tx.send(true);
    match agent_task.await {
        Ok(Err(e)) => eprintln!("error: agent: {e}"),
        Err(e) => eprintln!("error: agent task: {e}"),
        _ => {}
    }
    let _ = stop_tx.send(true);
    let _ = router_task.await;
    let _ = server_task.await;
    Ok(())
}
