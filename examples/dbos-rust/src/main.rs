//! A durable-workflow app on the DBOS Rust crate, deployable by Stead.
//!
//! - `POST /workflows/start?steps=N&step_seconds=S` starts a workflow of N
//!   steps, each a DBOS step that sleeps S seconds; answers
//!   `{"workflow_id": ...}`.
//! - `GET /workflows/{id}` answers its status (and output once it succeeded).
//! - `GET /executions` answers every recorded step execution, as a JSON array.
//! - `GET /healthz` answers 200.
//! - `POST /gates/NAME` opens the gate NAME: a workflow started with
//!   `gate=NAME&gate_step=K` holds step K open (after its sleep) until then,
//!   so a test can keep a workflow running for as long as it needs (as in the
//!   Python examples).
//!
//! Each time a step body begins and ends it appends
//! `{workflow_id, step, event: "start"|"end", executor, version, ts}` as one
//! JSON line to `$STEAD_DATA_DIR/executions.jsonl` (fsync'd), so a test sees
//! which steps ran, where, and how many times, across instance replacements.
//!
//! Identity comes from the environment Stead sets: `DBOS__VMID` (executor
//! id), `DBOS__APPVERSION`, and the database: the crate keeps its tables in
//! one PostgreSQL database, and this app points it at
//! `DBOS_SYSTEM_DATABASE_URL` (falling back to `DBOS_DATABASE_URL`, the
//! crate's own variable) so that the platform, which recovers workflows in
//! the system database, looks where the workflows are.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dbos::{Config, DBOS, WorkflowRef};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const APP_NAME: &str = "dbos-rust";

#[derive(Serialize, Deserialize, Clone)]
struct Job {
    steps: u32,
    step_seconds: f64,
    #[serde(default)]
    gate: Option<String>,
    #[serde(default)]
    gate_step: u32,
}

fn data_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("STEAD_DATA_DIR").unwrap_or_else(|_| ".".into()))
}

/// Where `POST /gates/NAME` marks a gate open; shared by every instance.
fn gate_path(name: &str) -> std::path::PathBuf {
    // Only the last path component: a gate name cannot escape the folder.
    let name = std::path::Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    data_dir().join("gates").join(name)
}

/// Blocks (at most 900 s) until the gate is open.
async fn wait_for_gate(name: &str) {
    let path = gate_path(name);
    for _ in 0..9000 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Workflow = WorkflowRef<Job, Vec<String>>;

struct App {
    dbos: DBOS,
    workflow: Workflow,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Appends one execution record, durably: a test reads it after a kill -9.
fn record(workflow_id: &str, step: u32, event: &str) {
    let dir = data_dir();
    let line = serde_json::json!({
        "workflow_id": workflow_id,
        "step": step,
        "event": event,
        "executor": env("DBOS__VMID"),
        "version": env("DBOS__APPVERSION"),
        "ts": now_ms() as f64 / 1000.0,
    })
    .to_string();
    let path = dir.join("executions.jsonl");
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(format!("{line}\n").as_bytes())?;
            f.sync_all()
        });
    if let Err(e) = result {
        eprintln!("cannot record an execution in {}: {e}", path.display());
    }
}

async fn run_job(job: Job) -> dbos::Result<Vec<String>> {
    let workflow_id = dbos::workflow_id().unwrap_or_default();
    let mut results = Vec::new();
    for step in 1..=job.steps {
        let id = workflow_id.clone();
        let seconds = job.step_seconds;
        let gate = job.gate.clone().filter(|_| step == job.gate_step);
        let out: String = dbos::step("sleep_step", move || {
            let id = id.clone();
            let gate = gate.clone();
            async move {
                record(&id, step, "start");
                tokio::time::sleep(Duration::from_secs_f64(seconds.max(0.0))).await;
                if let Some(gate) = gate {
                    wait_for_gate(&gate).await;
                }
                record(&id, step, "end");
                dbos::Result::Ok(format!("step {step} done"))
            }
        })
        .await?;
        results.push(out);
    }
    Ok(results)
}

#[tokio::main]
async fn main() {
    let url = match std::env::var("DBOS_SYSTEM_DATABASE_URL")
        .or_else(|_| std::env::var("DBOS_DATABASE_URL"))
    {
        Ok(u) if !u.is_empty() => u,
        _ => {
            eprintln!("set DBOS_SYSTEM_DATABASE_URL (a PostgreSQL URL)");
            std::process::exit(2);
        }
    };
    let dbos = DBOS::new(Config::new(APP_NAME, url));
    let workflow: Workflow = match dbos.register_workflow("steps_workflow", run_job) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("cannot register the workflow: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = dbos.launch().await {
        eprintln!("DBOS launch failed: {e}");
        std::process::exit(1);
    }
    let port: u16 = env("PORT").parse().unwrap_or(8000);
    let listener = match TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "dbos-rust listening on port {port} (executor {}, version {})",
        env("DBOS__VMID"),
        env("DBOS__APPVERSION")
    );
    let app = Arc::new(App { dbos, workflow });
    let accept = {
        let app = app.clone();
        async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        let app = app.clone();
                        tokio::spawn(async move {
                            let _ = serve(conn, &app).await;
                        });
                    }
                    Err(e) => eprintln!("accept failed: {e}"),
                }
            }
        }
    };
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // SIGTERM: stop cleanly; unfinished workflows stay PENDING and are
    // recovered by the next executor.
    app.dbos.shutdown().await;
}

/// One request per connection (`Connection: close`): enough for an example.
async fn serve(conn: TcpStream, app: &App) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body).await?;
    let (status, payload) = route(app, &method, &target).await;
    let text = payload.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len() + 1
    );
    let mut conn = reader.into_inner();
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(text.as_bytes()).await?;
    conn.write_all(b"\n").await?;
    conn.shutdown().await
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

async fn route(app: &App, method: &str, target: &str) -> (&'static str, serde_json::Value) {
    use serde_json::json;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET", "/healthz") => ("200 OK", json!({"status": "ok"})),
        ("POST", "/workflows/start") => {
            let steps = query_param(query, "steps")
                .and_then(|v| v.parse().ok())
                .unwrap_or(3);
            let step_seconds = query_param(query, "step_seconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1.0);
            let gate = query_param(query, "gate").filter(|g| !g.is_empty());
            let gate_step = query_param(query, "gate_step")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let job = Job {
                steps,
                step_seconds,
                gate,
                gate_step,
            };
            match app.workflow.start(job).await {
                Ok(handle) => ("200 OK", json!({"workflow_id": handle.workflow_id()})),
                Err(e) => ("500 Internal Server Error", json!({"error": e.to_string()})),
            }
        }
        ("POST", p) if p.starts_with("/gates/") => {
            let name = &p["/gates/".len()..];
            let path = gate_path(name);
            let opened = path
                .parent()
                .map(std::fs::create_dir_all)
                .unwrap_or(Ok(()))
                .and_then(|_| std::fs::write(&path, "open\n"));
            match opened {
                Ok(()) => ("200 OK", json!({"gate": name, "open": true})),
                Err(e) => ("500 Internal Server Error", json!({"error": e.to_string()})),
            }
        }
        ("GET", "/executions") => {
            let text =
                std::fs::read_to_string(data_dir().join("executions.jsonl")).unwrap_or_default();
            let records: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            ("200 OK", serde_json::Value::Array(records))
        }
        ("GET", p) if p.starts_with("/workflows/") => {
            let id = &p["/workflows/".len()..];
            let handle = match app
                .dbos
                .retrieve_workflow::<Vec<String>, dbos::EngineOnly>(id)
            {
                Ok(h) => h,
                Err(e) => return ("500 Internal Server Error", json!({"error": e.to_string()})),
            };
            match handle.status().await {
                Ok(status) => {
                    let status = status.as_str();
                    let result = if status == "SUCCESS" {
                        handle.result().await.ok()
                    } else {
                        None
                    };
                    (
                        "200 OK",
                        json!({"workflow_id": id, "status": status, "result": result}),
                    )
                }
                Err(dbos::Error::WorkflowNotFound { .. }) => (
                    "404 Not Found",
                    json!({"error": format!("no workflow {id}")}),
                ),
                Err(e) => ("500 Internal Server Error", json!({"error": e.to_string()})),
            }
        }
        _ => ("404 Not Found", json!({"error": "not found"})),
    }
}
