//! `stead`: one binary for every component (server, agent, router, the
//! all-in-one `dev`) and the command-line client.

mod api;
mod commands;
mod credentials;
mod deploy;
mod dev;
mod durable;
mod scale;
mod services;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stead",
    version,
    about = "Stead: a self-hosted stateful serverless platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the client finds the control plane.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// Control-plane URL (default: the one stored by `stead login` or `stead dev`).
    #[arg(long, env = "STEAD_API")]
    pub api: Option<String>,
    /// API token (default: the stored one).
    #[arg(long, env = "STEAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every component on this machine with an embedded database.
    Dev(dev::DevArgs),
    /// Run a control-plane server.
    Server(services::ServerArgs),
    /// Run a data-plane agent on this host.
    Agent(services::AgentArgs),
    /// Run the HTTP router in front of the apps.
    Router(services::RouterArgs),
    /// Create API tokens directly in the database (bootstrap and recovery).
    Tokens {
        #[command(subcommand)]
        command: services::TokensCommand,
    },
    /// Store the control-plane URL and token for later commands.
    Login(commands::LoginArgs),
    /// Build and deploy the app in DIR (default: the current folder).
    Deploy(deploy::DeployArgs),
    /// List and manage apps.
    Apps {
        #[command(subcommand)]
        command: commands::AppsCommand,
    },
    /// Manage an app's environment variables and secrets.
    Env {
        #[command(subcommand)]
        command: commands::EnvCommand,
    },
    /// Show an app's logs.
    Logs(commands::LogsArgs),
    /// Set an app's instance bounds, autoscaling targets and traffic limits
    /// (without options: show them with the autoscaler's current decision).
    Scale(scale::ScaleArgs),
    /// An app's databases.
    Db {
        #[command(subcommand)]
        command: durable::DbCommand,
    },
    /// List and manage an app's durable workflows.
    Workflows {
        #[command(subcommand)]
        command: durable::WorkflowsCommand,
    },
    /// Promote several versions one after the other, each once the previous
    /// one is live and every older instance has drained.
    Rollout(durable::RolloutArgs),
    /// Inspect data-plane hosts.
    Hosts {
        #[command(subcommand)]
        command: commands::HostsCommand,
    },
    /// Internal: the init process of a sandbox.
    #[command(name = "__sandbox-init", hide = true)]
    SandboxInit,
}

fn main() {
    // The sandbox init must not start a runtime or threads before it forks.
    if std::env::args().nth(1).as_deref() == Some("__sandbox-init") {
        stead_sandbox::init_main();
    }
    let cli = Cli::parse();
    init_tracing(&cli.command);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(cli.command));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_tracing(command: &Command) {
    let is_service = matches!(
        command,
        Command::Dev(_) | Command::Server(_) | Command::Agent(_) | Command::Router(_)
    );
    let default = if is_service {
        "info,sqlx=warn,hyper=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev(args) => dev::run(args).await,
        Command::Server(args) => services::server(args).await,
        Command::Agent(args) => services::agent(args).await,
        Command::Router(args) => services::router(args).await,
        Command::Tokens { command } => services::tokens(command).await,
        Command::Login(args) => commands::login(args).await,
        Command::Deploy(args) => deploy::run(args).await,
        Command::Apps { command } => commands::apps(command).await,
        Command::Env { command } => commands::env(command).await,
        Command::Logs(args) => commands::logs(args).await,
        Command::Scale(args) => scale::run(args).await,
        Command::Hosts { command } => commands::hosts(command).await,
        Command::Db { command } => durable::db(command).await,
        Command::Workflows { command } => durable::workflows(command).await,
        Command::Rollout(args) => durable::rollout(args).await,
        Command::SandboxInit => stead_sandbox::init_main(),
    }
}

/// The data directory `stead dev` uses when none is given.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("stead")
}
