//! Recovery through the DBOS admin endpoint.
//!
//! When the control plane decides that a dead executor's workflows are to be
//! recovered by the app's own library (the app runs the DBOS admin server),
//! it lists the dead executor ids with the version in this host's intended
//! state; the agent asks one of its ready instances of that version to
//! recover them (`POST /dbos-workflow-recovery` on the admin port, inside the
//! instance's network namespace) and reports the workflows re-enqueued. The
//! library's recovery statement only touches PENDING rows of those
//! executors, so repeating it after a crash is harmless, and the order stays
//! in the intended state until the report is recorded.

use std::sync::Arc;
use std::time::Duration;

use stead_api::{IntendedHostState, RecoveryReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::decide::Phase;
use crate::Shared;

/// A death this agent saw of an instance that ran the DBOS admin server:
/// its workflows are to be recovered through the admin endpoint of a live
/// instance of the same version on this host (normally its replacement).
#[derive(Debug, Clone)]
pub(crate) struct Witnessed {
    pub app: String,
    pub version: u32,
    pub executor_id: String,
    pub at: tokio::time::Instant,
}

/// How long a witnessed death waits for an instance of its version here;
/// after that the control plane's orders (which any host can carry out)
/// are the only path.
const WITNESS_TTL: Duration = Duration::from_secs(60);

/// Records a death seen here (called when an instance that ran the admin
/// server exits). The control plane learns of it from the next heartbeat
/// and orders the same recovery once a replacement is ready; this only lets
/// the agent do it sooner, the moment the replacement's admin server
/// answers, without a round trip. Both are idempotent.
pub(crate) fn witness_death(shared: &Shared, app: &str, version: u32, executor_id: &str) {
    let mut w = shared.witnessed.lock().unwrap_or_else(|e| e.into_inner());
    w.retain(|d| d.at.elapsed() < WITNESS_TTL && d.executor_id != executor_id);
    w.push(Witnessed {
        app: app.to_string(),
        version,
        executor_id: executor_id.to_string(),
        at: tokio::time::Instant::now(),
    });
}

/// Whether a witnessed death of `app` `version` still waits for recovery.
pub(crate) fn witnessed(shared: &Shared, app: &str, version: u32) -> bool {
    let w = shared.witnessed.lock().unwrap_or_else(|e| e.into_inner());
    w.iter()
        .any(|d| d.app == app && d.version == version && d.at.elapsed() < WITNESS_TTL)
}

fn take_witnessed(shared: &Shared, app: &str, version: u32) -> Vec<String> {
    let mut w = shared.witnessed.lock().unwrap_or_else(|e| e.into_inner());
    let mut taken = Vec::new();
    w.retain(|d| {
        if d.at.elapsed() >= WITNESS_TTL {
            return false;
        }
        if d.app == app && d.version == version {
            taken.push(d.executor_id.clone());
            return false;
        }
        true
    });
    taken
}

fn give_back(shared: &Shared, app: &str, version: u32, executors: &[String]) {
    for e in executors {
        witness_death(shared, app, version, e);
    }
}

/// Called while an instance of `app` `version` starts (and on each pass for
/// ready ones): if its admin server answers, it recovers the witnessed dead
/// executors of its version and the result is reported.
pub(crate) async fn try_local(
    shared: &Arc<Shared>,
    instance: &str,
    app: &str,
    version: u32,
    process: &Arc<stead_sandbox::SandboxProcess>,
    admin_port: u16,
) {
    if !crate::instance::probe_admin(process, admin_port).await {
        return;
    }
    let executors = take_witnessed(shared, app, version);
    if executors.is_empty() {
        return;
    }
    match post_recovery(process, admin_port, &executors).await {
        Ok(workflows) => {
            tracing::info!(app = %app, version, instance = %instance, host = %shared.config.name, executors = ?executors,
                workflows = workflows.len(), "recovered the workflows of instances that died here through the new instance's DBOS admin endpoint");
            report(shared, app, version, instance, executors, workflows).await;
        }
        Err(e) => {
            tracing::warn!(app = %app, version, instance = %instance, host = %shared.config.name, error = %e,
                "recovery through the DBOS admin endpoint failed; will retry");
            give_back(shared, app, version, &executors);
        }
    }
}

async fn report(
    shared: &Arc<Shared>,
    app: &str,
    version: u32,
    instance: &str,
    executor_ids: Vec<String>,
    workflows: Vec<String>,
) {
    let report = RecoveryReport {
        host_id: shared.host_id.clone(),
        app: app.to_string(),
        version,
        executor_ids,
        workflows,
        method: "admin".into(),
        instance: instance.to_string(),
    };
    // Retried a few times: the report is what records the recovery event.
    // If it is lost anyway, the control plane's own order repeats the
    // (idempotent) recovery and marks the executors.
    let mut delay = Duration::from_millis(100);
    for _ in 0..5 {
        match shared
            .client
            .post::<_, serde_json::Value>("/v1/agent/recovered", &report)
            .await
        {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(app = %app, error = %e, "reporting a recovery failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

pub(crate) async fn admin_orders(shared: &Arc<Shared>, intended: &IntendedHostState) {
    // Deaths witnessed here, for versions with a ready admin instance here
    // already (another instance of the version, or a replacement that was
    // ready before the death was noticed).
    let ready: Vec<(String, String, u32, Arc<stead_sandbox::SandboxProcess>, u16)> = {
        let instances = shared.instances.lock().await;
        instances
            .values()
            .filter(|i| i.phase == Phase::Ready && i.dbos_admin)
            .filter(|i| witnessed(shared, &i.app, i.version))
            .filter_map(|i| {
                let port = intended
                    .apps
                    .iter()
                    .find(|a| a.app == i.app && a.version == i.version)
                    .and_then(|a| a.run.admin_port)?;
                i.process
                    .clone()
                    .map(|p| (i.id.clone(), i.app.clone(), i.version, p, port))
            })
            .collect()
    };
    for (id, app, version, process, port) in ready {
        let shared = shared.clone();
        tokio::spawn(async move {
            try_local(&shared, &id, &app, version, &process, port).await;
        });
    }
    for app in &intended.apps {
        if app.recover_via_admin.is_empty() {
            continue;
        }
        let key = format!(
            "{}:{}:{}",
            app.app,
            app.version,
            app.recover_via_admin.join(",")
        );
        if !shared.recovering.lock().await.insert(key.clone()) {
            continue;
        }
        // A ready instance of the version that runs the admin server.
        let target = {
            let instances = shared.instances.lock().await;
            instances
                .values()
                .find(|i| {
                    i.app == app.app
                        && i.version == app.version
                        && i.phase == Phase::Ready
                        && i.dbos_admin
                })
                .and_then(|i| i.process.clone().map(|p| (i.id.clone(), p)))
        };
        let Some((instance, process)) = target else {
            shared.recovering.lock().await.remove(&key);
            continue;
        };
        let port = app.run.admin_port.unwrap_or(3001);
        let shared = shared.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let result = post_recovery(&process, port, &app.recover_via_admin).await;
            match result {
                Ok(workflows) => {
                    tracing::info!(app = %app.app, version = app.version, instance = %instance, executors = ?app.recover_via_admin, workflows = workflows.len(), "recovered workflows through the DBOS admin endpoint");
                    report(
                        &shared,
                        &app.app,
                        app.version,
                        &instance,
                        app.recover_via_admin.clone(),
                        workflows,
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(app = %app.app, version = app.version, instance = %instance, error = %e, "recovery through the DBOS admin endpoint failed; will retry")
                }
            }
            shared.recovering.lock().await.remove(&key);
        });
    }
}

/// `POST /dbos-workflow-recovery` with the executor ids; the answer is the
/// list of workflow ids the library re-enqueued.
async fn post_recovery(
    process: &stead_sandbox::SandboxProcess,
    port: u16,
    executors: &[String],
) -> Result<Vec<String>, String> {
    let body = serde_json::to_string(executors).map_err(|e| e.to_string())?;
    let attempt = async {
        let mut conn = process
            .connect(port)
            .await
            .map_err(|e| format!("connecting to the admin port {port}: {e}"))?;
        let req = format!(
            "POST /dbos-workflow-recovery HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed answer")?;
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if !status.starts_with('2') {
            return Err(format!(
                "the admin endpoint answered {status}: {}",
                body.trim()
            ));
        }
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        serde_json::from_str::<Vec<String>>(body.trim())
            .map_err(|e| format!("unexpected answer {body:?}: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .map_err(|_| "the admin endpoint did not answer within 30 s".to_string())?
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            super::dechunk("5\r\n[\"a\",\r\n4\r\n\"b\"]\r\n0\r\n\r\n"),
            "[\"a\",\"b\"]"
        );
    }
}
