//! Build tasks: a queue with leases, so a build whose host died is picked up
//! again by another host (or by the same host's next session) once its lease
//! expires, without two hosts ever building the same version at once.

use std::time::Duration;

use stead_api::{AppConfig, NewLogLine};

use crate::{
    get_i64, get_opt_str, get_str, insert_event, now_ms, to_u32, Result, Store, StoreError,
};

/// A task this host now holds the lease of.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedTask {
    pub id: i64,
    pub app_id: i64,
    pub app: String,
    pub version: u32,
    pub bundle_hash: String,
    pub config: AppConfig,
    pub attempt: u32,
    pub lease_expires_at_ms: i64,
}

/// What completing a build did.
#[derive(Debug, Clone, PartialEq)]
pub enum CompleteOutcome {
    /// The version is ready; `activated` when it became the app's target
    /// (promoted to active once one of its instances is ready).
    Succeeded {
        activated: bool,
    },
    Failed,
    /// The task was already completed by this session: nothing changed.
    AlreadyDone,
}

/// Claimable: queued, or running under a lease that expired or that belongs
/// to an earlier session of the claiming host (which cannot still be building).
const CLAIMABLE: &str = "(state = 'queued' OR (state = 'running' AND (lease_expires_at < $2 \
     OR (lease_host = $3 AND lease_session <> $4))))";

impl Store {
    /// Claims the oldest claimable build task for `host_id`/`session`.
    ///
    /// Selecting a candidate and taking it are two statements; the conditional
    /// UPDATE re-checks claimability, so when another host won the race it
    /// affects no row and we try the next candidate.
    pub async fn claim_build(
        &self,
        host_id: &str,
        session: &str,
        lease: Duration,
    ) -> Result<Option<ClaimedTask>> {
        for _ in 0..5 {
            let now = now_ms();
            let expires = now + lease.as_millis() as i64;
            let candidate = sqlx::query(&format!(
                "SELECT id FROM build_tasks WHERE id > $1 AND {CLAIMABLE} ORDER BY id LIMIT 1"
            ))
            .bind(0i64)
            .bind(now)
            .bind(host_id)
            .bind(session)
            .fetch_optional(&self.pool)
            .await?;
            let Some(candidate) = candidate else {
                return Ok(None);
            };
            let id = get_i64(&candidate, "id")?;
            let taken = self
                .retry("claim_build", || async {
                    let r = sqlx::query(&format!(
                        "UPDATE build_tasks SET state = 'running', attempt = attempt + 1, lease_host = $3, \
                         lease_session = $4, lease_expires_at = $5, updated_at = $2 WHERE id = $1 AND {CLAIMABLE}"
                    ))
                    .bind(id)
                    .bind(now)
                    .bind(host_id)
                    .bind(session)
                    .bind(expires)
                    .execute(&self.pool)
                    .await?;
                    Ok(r.rows_affected() == 1)
                })
                .await?;
            if !taken {
                continue;
            }
            let task = self.get_build(id).await?;
            self.record_event(
                task.app_id,
                "build_started",
                &format!(
                    "build of version {} started on host {host_id} (attempt {})",
                    task.version, task.attempt
                ),
                serde_json::json!({"version": task.version, "build_id": id, "host": host_id, "attempt": task.attempt}),
            )
            .await?;
            return Ok(Some(task));
        }
        Ok(None)
    }

    /// A build task with its version's details.
    pub async fn get_build(&self, id: i64) -> Result<ClaimedTask> {
        let row = sqlx::query(
            "SELECT t.id AS id, t.app_id AS app_id, a.name AS app, t.version AS version, v.bundle_hash AS bundle_hash, \
             v.config AS config, t.attempt AS attempt, t.lease_expires_at AS lease_expires_at \
             FROM build_tasks t JOIN apps a ON a.id = t.app_id \
             JOIN versions v ON v.app_id = t.app_id AND v.number = t.version WHERE t.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("build {id} does not exist (its app may have been deleted)")))?;
        let config: AppConfig =
            serde_json::from_str(&get_str(&row, "config")?).map_err(|e| StoreError::Corrupt {
                table: "versions",
                message: e.to_string(),
            })?;
        Ok(ClaimedTask {
            id,
            app_id: get_i64(&row, "app_id")?,
            app: get_str(&row, "app")?,
            version: to_u32(get_i64(&row, "version")?),
            bundle_hash: get_str(&row, "bundle_hash")?,
            config,
            attempt: to_u32(get_i64(&row, "attempt")?),
            lease_expires_at_ms: get_i64(&row, "lease_expires_at")?,
        })
    }

    /// Extends a lease still held by this session; returns the new expiry.
    /// A lease taken over by someone else is a conflict: the caller must stop.
    pub async fn renew_build(
        &self,
        id: i64,
        host_id: &str,
        session: &str,
        lease: Duration,
    ) -> Result<i64> {
        let expires = now_ms() + lease.as_millis() as i64;
        let r = self
            .retry("renew_build", || async {
                Ok(sqlx::query(
                    "UPDATE build_tasks SET lease_expires_at = $1, updated_at = $2 WHERE id = $3 AND state = 'running' \
                     AND lease_host = $4 AND lease_session = $5",
                )
                .bind(expires)
                .bind(now_ms())
                .bind(id)
                .bind(host_id)
                .bind(session)
                .execute(&self.pool)
                .await?
                .rows_affected())
            })
            .await?;
        if r == 1 {
            Ok(expires)
        } else {
            Err(self.lease_error(id, host_id).await?)
        }
    }

    async fn lease_error(&self, id: i64, host_id: &str) -> Result<StoreError> {
        let row = sqlx::query("SELECT state FROM build_tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => StoreError::NotFound(format!("build {id} does not exist (its app may have been deleted)")),
            Some(r) => StoreError::Conflict(format!(
                "build {id} is no longer leased to this session of host {host_id} (it is {}); stop working on it",
                get_str(&r, "state")?
            )),
        })
    }

    /// Appends build output; only the lease holder may write.
    pub async fn append_build_log(
        &self,
        id: i64,
        host_id: &str,
        session: &str,
        lines: &[NewLogLine],
    ) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let done = self
            .retry("append_build_log", || async {
                let mut tx = self.pool.begin().await?;
                let n = lines.len() as i64;
                let Some(row) = sqlx::query(
                    "UPDATE build_tasks SET log_seq = log_seq + $1 WHERE id = $2 AND lease_host = $3 \
                     AND lease_session = $4 RETURNING log_seq",
                )
                .bind(n)
                .bind(id)
                .bind(host_id)
                .bind(session)
                .fetch_optional(&mut *tx)
                .await?
                else {
                    return Ok(false);
                };
                let first = get_i64(&row, "log_seq")? - n + 1;
                for (i, l) in lines.iter().enumerate() {
                    sqlx::query("INSERT INTO build_logs (task_id, seq, ts, stream, line) VALUES ($1, $2, $3, $4, $5)")
                        .bind(id)
                        .bind(first + i as i64)
                        .bind(l.ts_ms)
                        .bind(l.stream.as_str())
                        .bind(&l.line)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(true)
            })
            .await?;
        if done {
            Ok(())
        } else {
            Err(self.lease_error(id, host_id).await?)
        }
    }

    /// Finishes a build: `Ok(artifact_hash)` makes the version ready (and
    /// active if it is newer than the active one), `Err(message)` marks it
    /// failed. Completing twice from the same session is a no-op.
    pub async fn complete_build(
        &self,
        id: i64,
        host_id: &str,
        session: &str,
        result: std::result::Result<&str, &str>,
    ) -> Result<CompleteOutcome> {
        self.retry("complete_build", || {
            self.complete_once(id, host_id, session, result)
        })
        .await
    }

    async fn complete_once(
        &self,
        id: i64,
        host_id: &str,
        session: &str,
        result: std::result::Result<&str, &str>,
    ) -> Result<CompleteOutcome> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // Lock the task row before reading it (a no-op write).
        let row = sqlx::query(
            "UPDATE build_tasks SET updated_at = updated_at WHERE id = $1 \
             RETURNING state, lease_host, lease_session, app_id, version",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| {
            StoreError::NotFound(format!(
                "build {id} does not exist (its app may have been deleted)"
            ))
        })?;
        let state = get_str(&row, "state")?;
        let same_session = get_opt_str(&row, "lease_host")?.as_deref() == Some(host_id)
            && get_opt_str(&row, "lease_session")?.as_deref() == Some(session);
        let app_id = get_i64(&row, "app_id")?;
        let version = get_i64(&row, "version")?;
        if state == "succeeded" || state == "failed" {
            return if same_session {
                Ok(CompleteOutcome::AlreadyDone)
            } else {
                Err(StoreError::Conflict(format!(
                    "build {id} was already completed ({state}) by another host or session"
                )))
            };
        }
        if state != "running" || !same_session {
            return Err(StoreError::Conflict(format!(
                "build {id} is no longer leased to this session of host {host_id}; its result is discarded"
            )));
        }
        let outcome = match result {
            Ok(artifact) => {
                let exists = sqlx::query("SELECT hash FROM blobs WHERE hash = $1")
                    .bind(artifact)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                if !exists {
                    return Err(StoreError::Invalid(format!(
                        "artifact {artifact} of build {id} was not uploaded; PUT it to /v1/blobs/{artifact} first"
                    )));
                }
                sqlx::query("UPDATE versions SET state = 'ready', artifact_hash = $1, error = NULL WHERE app_id = $2 AND number = $3")
                    .bind(artifact)
                    .bind(app_id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE build_tasks SET state = 'succeeded', error = NULL, updated_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                insert_event(
                    &mut tx,
                    app_id,
                    "build_succeeded",
                    &format!("build of version {version} succeeded on host {host_id}"),
                    serde_json::json!({"version": version, "build_id": id, "artifact_hash": artifact}),
                )
                .await?;
                // The new version becomes the target: agents start it beside
                // the active one, and it is promoted once an instance is
                // ready (see `promote_on_ready` in hosts.rs).
                let activated = sqlx::query(
                    "UPDATE apps SET target_version = $1 WHERE id = $2 \
                     AND (active_version IS NULL OR active_version < $1) \
                     AND (target_version IS NULL OR target_version < $1) \
                     AND NOT EXISTS (SELECT 1 FROM versions h WHERE h.app_id = $2 AND h.number = $1 AND h.hold = 1)",
                )
                .bind(version)
                .bind(app_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if activated {
                    crate::dbos::reset_start_failures(&mut tx, app_id, to_u32(version)).await?;
                    insert_event(
                        &mut tx,
                        app_id,
                        "promoting",
                        &format!("version {version} is starting; it becomes active once an instance is ready"),
                        serde_json::json!({"version": version}),
                    )
                    .await?;
                }
                CompleteOutcome::Succeeded { activated }
            }
            Err(error) => {
                sqlx::query("UPDATE versions SET state = 'failed', error = $1 WHERE app_id = $2 AND number = $3")
                    .bind(error)
                    .bind(app_id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE build_tasks SET state = 'failed', error = $1, updated_at = $2 WHERE id = $3")
                    .bind(error)
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                insert_event(
                    &mut tx,
                    app_id,
                    "build_failed",
                    &format!("build of version {version} failed: {error}"),
                    serde_json::json!({"version": version, "build_id": id, "error": error}),
                )
                .await?;
                CompleteOutcome::Failed
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// The state of a build task (`queued`, `running`, `succeeded`, `failed`).
    pub async fn build_state(&self, id: i64) -> Result<Option<String>> {
        let row = sqlx::query("SELECT state FROM build_tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| get_str(&r, "state")).transpose()
    }
}
