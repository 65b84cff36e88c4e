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

pub(crate) async fn admin_orders(shared: &Arc<Shared>, intended: &IntendedHostState) {
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
                    let report = RecoveryReport {
                        host_id: shared.host_id.clone(),
                        app: app.app.clone(),
                        version: app.version,
                        executor_ids: app.recover_via_admin.clone(),
                        workflows,
                        method: "admin".into(),
                        instance: instance.clone(),
                    };
                    if let Err(e) = shared
                        .client
                        .post::<_, serde_json::Value>("/v1/agent/recovered", &report)
                        .await
                    {
                        tracing::warn!(app = %app.app, error = %e, "reporting a recovery failed; it will be repeated");
                    }
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
