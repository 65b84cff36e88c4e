//! Client commands for durable execution: `stead db`, `stead workflows`,
//! `stead rollout`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use stead_api::{AppDatabaseInfo, AppStatus, RolloutInfo, RolloutRequest};
use stead_dbos::{StepInfo, WorkflowInfo};

use crate::api::Api;
use crate::ClientArgs;

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[derive(Subcommand)]
pub enum DbCommand {
    /// Show an app's databases and what its system database holds.
    Status {
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print an app's database URL (with its password).
    Url {
        app: String,
        /// The DBOS system database instead of the application database.
        #[arg(long)]
        system: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn db(cmd: DbCommand) -> anyhow::Result<()> {
    match cmd {
        DbCommand::Status { app, json, client } => {
            let api = Api::from_args(&client)?;
            let info: AppDatabaseInfo = api.get(&format!("/v1/apps/{app}/database")).await?;
            if json {
                return print_json(&info);
            }
            println!("app:        {}", info.app);
            println!("kind:       {}", info.kind);
            println!("system db:  {}", info.system_url);
            println!("app db:     {}", info.app_url);
            match &info.error {
                None => println!(
                    "reachable:  yes ({} pending, {} enqueued workflows)",
                    info.pending_workflows, info.enqueued_workflows
                ),
                Some(e) => println!("reachable:  no: {e}"),
            }
        }
        DbCommand::Url {
            app,
            system,
            client,
        } => {
            let api = Api::from_args(&client)?;
            let info: AppDatabaseInfo = api
                .get(&format!("/v1/apps/{app}/database?reveal=true"))
                .await?;
            println!(
                "{}",
                if system {
                    info.system_url
                } else {
                    info.app_url
                }
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum WorkflowsCommand {
    /// List an app's workflows, newest first.
    List {
        app: String,
        /// Only this status (PENDING, ENQUEUED, SUCCESS, ERROR, CANCELLED, ...).
        #[arg(long)]
        status: Option<String>,
        /// Only this version.
        #[arg(long)]
        version: Option<u32>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one workflow.
    Get {
        app: String,
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List a workflow's completed steps.
    Steps {
        app: String,
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a workflow (it stops at its next step).
    Cancel {
        app: String,
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resume a cancelled or failed workflow from its last completed step.
    Resume {
        app: String,
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start a copy of a workflow that re-runs from a given step.
    Fork {
        app: String,
        id: String,
        /// Re-run from this step (1: from the start).
        #[arg(long, default_value_t = 1)]
        step: u32,
        /// Id for the new workflow.
        #[arg(long)]
        new_id: Option<String>,
        /// Version to run it on (default: the active one).
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}Z")
}

pub async fn workflows(cmd: WorkflowsCommand) -> anyhow::Result<()> {
    match cmd {
        WorkflowsCommand::List {
            app,
            status,
            version,
            limit,
            json,
            client,
        } => {
            let api = Api::from_args(&client)?;
            let mut path = format!("/v1/apps/{app}/workflows?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={s}"));
            }
            if let Some(v) = version {
                path.push_str(&format!("&version={v}"));
            }
            let list: Vec<WorkflowInfo> = api.get(&path).await?;
            if json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("No workflows.");
                return Ok(());
            }
            println!(
                "{:<38} {:<10} {:<24} {:<8} {:<28} {:>8} CREATED",
                "ID", "STATUS", "NAME", "VERSION", "EXECUTOR", "ATTEMPTS"
            );
            for w in list {
                println!(
                    "{:<38} {:<10} {:<24} {:<8} {:<28} {:>8} {}",
                    w.id,
                    w.status,
                    w.name,
                    w.application_version.unwrap_or_default(),
                    w.executor_id.unwrap_or_default(),
                    w.recovery_attempts,
                    when(w.created_at_ms)
                );
            }
        }
        WorkflowsCommand::Get {
            app,
            id,
            json,
            client,
        } => {
            let api = Api::from_args(&client)?;
            let w: WorkflowInfo = api.get(&format!("/v1/apps/{app}/workflows/{id}")).await?;
            if json {
                return print_json(&w);
            }
            print_json(&w)?;
        }
        WorkflowsCommand::Steps {
            app,
            id,
            json,
            client,
        } => {
            let api = Api::from_args(&client)?;
            let steps: Vec<StepInfo> = api
                .get(&format!("/v1/apps/{app}/workflows/{id}/steps"))
                .await?;
            if json {
                return print_json(&steps);
            }
            println!("{:<5} {:<32} RESULT", "STEP", "FUNCTION");
            for s in steps {
                let result = match (&s.error, &s.output) {
                    (Some(e), _) => format!("error: {}", e.chars().take(60).collect::<String>()),
                    (None, Some(o)) => o.chars().take(60).collect(),
                    _ => String::new(),
                };
                println!("{:<5} {:<32} {}", s.function_id, s.function_name, result);
            }
        }
        WorkflowsCommand::Cancel { app, id, client } => {
            let api = Api::from_args(&client)?;
            let w: WorkflowInfo = api
                .post(
                    &format!("/v1/apps/{app}/workflows/{id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("{id}: {}", w.status);
        }
        WorkflowsCommand::Resume { app, id, client } => {
            let api = Api::from_args(&client)?;
            let w: WorkflowInfo = api
                .post(
                    &format!("/v1/apps/{app}/workflows/{id}/resume"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("{id}: {}", w.status);
        }
        WorkflowsCommand::Fork {
            app,
            id,
            step,
            new_id,
            version,
            client,
        } => {
            let api = Api::from_args(&client)?;
            let body =
                serde_json::json!({"start_step": step, "new_id": new_id, "version": version});
            let r: serde_json::Value = api
                .post(&format!("/v1/apps/{app}/workflows/{id}/fork"), &body)
                .await?;
            println!("{}", r["workflow_id"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct RolloutArgs {
    pub app: String,
    /// App folders, one per step, promoted in this order.
    #[arg(required = true)]
    pub steps: Vec<PathBuf>,
    /// How long to wait for the whole rollout.
    #[arg(long, default_value = "1800", value_name = "SECONDS")]
    pub timeout: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Builds every step (held: none is promoted by its build), then asks the
/// control plane to promote them one after the other, and follows it. The
/// rollout itself runs on the control plane: interrupting this command does
/// not stop it (`stead apps status` shows its progress).
pub async fn rollout(args: RolloutArgs) -> anyhow::Result<()> {
    let api = Api::from_args(&args.client)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut versions = Vec::new();
    for (i, dir) in args.steps.iter().enumerate() {
        eprintln!(
            "==> step {} of {}: building {}",
            i + 1,
            args.steps.len(),
            dir.display()
        );
        let v = crate::deploy::build_only(&api, dir, &args.app, deadline).await?;
        versions.push(v);
    }
    let r: RolloutInfo = api
        .post(
            &format!("/v1/apps/{}/rollouts", args.app),
            &RolloutRequest {
                versions: versions.clone(),
            },
        )
        .await?;
    eprintln!("==> rollout {} started: versions {:?}", r.id, versions);
    let mut last = String::new();
    loop {
        let status: AppStatus = api.get(&format!("/v1/apps/{}", args.app)).await?;
        let Some(r) = status.rollout else {
            bail!("the rollout disappeared")
        };
        let line = format!(
            "step {}/{} (v{}): {} {}",
            r.step + 1,
            r.versions.len(),
            r.versions.get(r.step as usize).copied().unwrap_or_default(),
            r.state,
            r.message.clone().unwrap_or_default()
        );
        if line != last {
            eprintln!("    {line}");
            last = line;
        }
        match r.state.as_str() {
            "done" => {
                println!(
                    "{}: rollout {} done; v{} is live",
                    args.app,
                    r.id,
                    versions.last().copied().unwrap_or_default()
                );
                return Ok(());
            }
            "failed" => {
                return Err(anyhow!(
                    "rollout {} failed: {}",
                    r.id,
                    r.message.unwrap_or_default()
                ))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out; the rollout continues on the platform (see `stead apps status {}`)",
                args.app
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
