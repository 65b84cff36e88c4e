//! Durable-execution bookkeeping: each app's databases, the executors that
//! ran its workflows (so the work of a dead one can be recovered, exactly
//! once per death), the outstanding work of each version (so an old version
//! drains before it stops), and multi-step rollouts.

use std::collections::HashMap;

use sqlx::any::AnyRow;

use crate::{
    crypto, get_i64, get_opt_i64, get_opt_str, get_str, insert_event, now_ms, to_u32, Result,
    Store, StoreError,
};

/// An app's databases as provisioned by the control plane.
#[derive(Debug, Clone, PartialEq)]
pub struct AppDatabase {
    /// `sqlite` or `postgres`.
    pub kind: String,
    /// DBOS system database URL (with credentials).
    pub system_url: String,
    /// Application database URL (with credentials).
    pub app_url: String,
    /// The app's own login role (PostgreSQL).
    pub role: Option<String>,
}

/// An executor whose instance is gone and whose workflows are not yet
/// recovered.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadExecutor {
    pub executor_id: String,
    pub app_id: i64,
    pub version: u32,
    pub ended_at_ms: i64,
    pub reason: String,
    /// Its instance ran the DBOS admin server: `auto` recovery goes
    /// through that endpoint (of a live instance of the same version).
    pub admin: bool,
}

/// Outstanding workflows of one version, as last read from the app's
/// system database.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionWork {
    pub version: u32,
    pub pending: u64,
    pub enqueued: u64,
    pub checked_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub id: i64,
    pub app_id: i64,
    pub versions: Vec<u32>,
    pub step: u32,
    pub state: String,
    pub message: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

fn rollout_from_row(r: &AnyRow) -> Result<Rollout> {
    Ok(Rollout {
        id: get_i64(r, "id")?,
        app_id: get_i64(r, "app_id")?,
        versions: serde_json::from_str(&get_str(r, "versions")?).map_err(|e| {
            StoreError::Corrupt {
                table: "rollouts",
                message: e.to_string(),
            }
        })?,
        step: to_u32(get_i64(r, "step")?),
        state: get_str(r, "state")?,
        message: get_opt_str(r, "message")?,
        created_at_ms: get_i64(r, "created_at")?,
        updated_at_ms: get_i64(r, "updated_at")?,
    })
}

impl Store {
    /// Records an app's databases, their URLs encrypted like secrets.
    pub async fn set_app_database(&self, app_id: i64, db: &AppDatabase) -> Result<()> {
        let key = self.secret_key.ok_or(StoreError::NoSecretKey)?;
        let (sys, nonce_sys) = crypto::encrypt(&key, app_id, "dbos_system_url", &db.system_url)?;
        let (app, nonce_app) = crypto::encrypt(&key, app_id, "dbos_app_url", &db.app_url)?;
        sqlx::query(
            "INSERT INTO app_databases (app_id, kind, system_url_enc, app_url_enc, nonce_system, nonce_app, role, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (app_id) DO UPDATE SET kind = excluded.kind, \
             system_url_enc = excluded.system_url_enc, app_url_enc = excluded.app_url_enc, \
             nonce_system = excluded.nonce_system, nonce_app = excluded.nonce_app, role = excluded.role",
        )
        .bind(app_id)
        .bind(&db.kind)
        .bind(sys)
        .bind(app)
        .bind(nonce_sys)
        .bind(nonce_app)
        .bind(db.role.clone())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn app_database(&self, app_id: i64) -> Result<Option<AppDatabase>> {
        let Some(r) = sqlx::query(
            "SELECT app_id, kind, system_url_enc, app_url_enc, nonce_system, nonce_app, role FROM app_databases WHERE app_id = $1",
        )
        .bind(app_id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        self.app_database_from_row(&r).map(Some)
    }

    /// Every app's databases, by app id, in one query.
    pub async fn app_databases_all(&self) -> Result<HashMap<i64, AppDatabase>> {
        let rows = sqlx::query(
            "SELECT app_id, kind, system_url_enc, app_url_enc, nonce_system, nonce_app, role FROM app_databases",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::new();
        for r in &rows {
            out.insert(get_i64(r, "app_id")?, self.app_database_from_row(r)?);
        }
        Ok(out)
    }

    fn app_database_from_row(&self, r: &sqlx::any::AnyRow) -> Result<AppDatabase> {
        let app_id = get_i64(r, "app_id")?;
        let key = self.secret_key.ok_or(StoreError::NoSecretKey)?;
        let bytes = |name: &str| -> Result<Vec<u8>> {
            sqlx::Row::try_get::<Vec<u8>, _>(r, name).map_err(StoreError::from)
        };
        Ok(AppDatabase {
            kind: get_str(r, "kind")?,
            system_url: crypto::decrypt(
                &key,
                app_id,
                "dbos_system_url",
                &bytes("system_url_enc")?,
                &bytes("nonce_system")?,
            )?,
            app_url: crypto::decrypt(
                &key,
                app_id,
                "dbos_app_url",
                &bytes("app_url_enc")?,
                &bytes("nonce_app")?,
            )?,
            role: get_opt_str(r, "role")?,
        })
    }

    /// Executors that died and whose workflows have not been recovered,
    /// oldest death first.
    pub async fn dead_executors(&self, app_id: i64) -> Result<Vec<DeadExecutor>> {
        let rows = sqlx::query(
            "SELECT executor_id, app_id, version, ended_at, end_reason, dbos_admin FROM executors \
             WHERE app_id = $1 AND ended_at IS NOT NULL AND recovered_at IS NULL ORDER BY ended_at",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadExecutor {
                    executor_id: get_str(r, "executor_id")?,
                    app_id: get_i64(r, "app_id")?,
                    version: to_u32(get_i64(r, "version")?),
                    ended_at_ms: get_opt_i64(r, "ended_at")?.unwrap_or(0),
                    reason: get_opt_str(r, "end_reason")?.unwrap_or_default(),
                    admin: get_i64(r, "dbos_admin")? != 0,
                })
            })
            .collect()
    }

    /// Every executor id known for the app, with whether it is alive.
    pub async fn executors(&self, app_id: i64) -> Result<Vec<(String, u32, bool)>> {
        let rows =
            sqlx::query("SELECT executor_id, version, ended_at FROM executors WHERE app_id = $1")
                .bind(app_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    get_str(r, "executor_id")?,
                    to_u32(get_i64(r, "version")?),
                    get_opt_i64(r, "ended_at")?.is_none(),
                ))
            })
            .collect()
    }

    /// Records an executor the control plane never saw (found owning
    /// PENDING work in the system database by the periodic sweep) as dead.
    pub async fn record_orphan_executor(
        &self,
        app_id: i64,
        executor_id: &str,
        version: u32,
    ) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO executors (executor_id, app_id, version, instance_id, host_id, started_at, last_seen, ended_at, end_reason) \
             VALUES ($1, $2, $3, '', '', $4, $4, $4, 'unknown executor owning PENDING workflows (found by the sweep)') \
             ON CONFLICT (executor_id) DO NOTHING",
        )
        .bind(executor_id)
        .bind(app_id)
        .bind(i64::from(version))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks executors whose host stopped heartbeating as dead.
    pub async fn end_executors_on_dead_hosts(
        &self,
        host_timeout: std::time::Duration,
    ) -> Result<u64> {
        let now = now_ms();
        let cutoff = now - host_timeout.as_millis() as i64;
        let r = sqlx::query(
            "UPDATE executors SET ended_at = $1, end_reason = 'its host stopped sending heartbeats' \
             WHERE ended_at IS NULL AND host_id IN (SELECT id FROM hosts WHERE last_heartbeat < $2)",
        )
        .bind(now)
        .bind(cutoff)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Marks dead executors recovered and records the recovery in the
    /// app's event log. Only executors not yet marked count, so a recovery
    /// repeated after a crash is recorded once.
    pub async fn mark_recovered(
        &self,
        app_id: i64,
        version: u32,
        executor_ids: &[String],
        workflows: &[String],
        method: &str,
        by: &str,
    ) -> Result<usize> {
        self.retry("mark_recovered", || async {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            let mut marked = Vec::new();
            for e in executor_ids {
                let r = sqlx::query(
                    "UPDATE executors SET recovered_at = $1, recovered_count = $2 \
                     WHERE executor_id = $3 AND app_id = $4 AND recovered_at IS NULL",
                )
                .bind(now)
                .bind(workflows.len() as i64)
                .bind(e)
                .bind(app_id)
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() == 1 {
                    marked.push(e.clone());
                }
            }
            // An executor that owned nothing is not worth an event. Workflows
            // re-enqueued are always one, even for an executor already marked
            // (the control plane may have found it owning nothing PENDING
            // because this very recovery had already re-enqueued its work):
            // a repeated recovery re-enqueues nothing, so this records each
            // real one once.
            let recorded = if workflows.is_empty() {
                marked.clone()
            } else {
                executor_ids.to_vec()
            };
            if (!workflows.is_empty() || (method == "executor-id" && !marked.is_empty()))
                && !recorded.is_empty()
            {
                insert_event(
                    &mut tx,
                    app_id,
                    "recovery",
                    &format!(
                        "recovered {} workflow(s) of dead executor(s) {} of version {version} via {method} ({by})",
                        workflows.len(),
                        recorded.join(", ")
                    ),
                    serde_json::json!({"version": version, "executors": recorded, "workflows": workflows,
                        "method": method, "by": by, "at": now}),
                )
                .await?;
            }
            tx.commit().await?;
            Ok(marked.len())
        })
        .await
    }

    pub async fn set_version_work(
        &self,
        app_id: i64,
        version: u32,
        pending: u64,
        enqueued: u64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO version_work (app_id, version, pending, enqueued, checked_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (app_id, version) DO UPDATE SET pending = excluded.pending, enqueued = excluded.enqueued, \
             checked_at = excluded.checked_at",
        )
        .bind(app_id)
        .bind(i64::from(version))
        .bind(pending as i64)
        .bind(enqueued as i64)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn version_work(&self, app_id: i64) -> Result<Vec<VersionWork>> {
        let rows = sqlx::query("SELECT version, pending, enqueued, checked_at FROM version_work WHERE app_id = $1 ORDER BY version")
            .bind(app_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(VersionWork {
                    version: to_u32(get_i64(r, "version")?),
                    pending: u64::try_from(get_i64(r, "pending")?).unwrap_or(0),
                    enqueued: u64::try_from(get_i64(r, "enqueued")?).unwrap_or(0),
                    checked_at_ms: get_i64(r, "checked_at")?,
                })
            })
            .collect()
    }

    /// Starts a rollout through `versions` (all ready): the first becomes
    /// the target now. Refused while another rollout of the app runs.
    pub async fn create_rollout(&self, app_id: i64, versions: &[u32]) -> Result<Rollout> {
        self.retry("create_rollout", || async {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            sqlx::query("UPDATE apps SET event_seq = event_seq WHERE id = $1")
                .bind(app_id)
                .execute(&mut *tx)
                .await?;
            let running = sqlx::query("SELECT id FROM rollouts WHERE app_id = $1 AND state = 'running'")
                .bind(app_id)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(r) = running {
                return Err(StoreError::Conflict(format!(
                    "rollout {} of this app is still running; wait for it to finish",
                    get_i64(&r, "id")?
                )));
            }
            for v in versions {
                let row = sqlx::query("SELECT state FROM versions WHERE app_id = $1 AND number = $2")
                    .bind(app_id)
                    .bind(i64::from(*v))
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("version {v} does not exist")))?;
                let state = get_str(&row, "state")?;
                if state != "ready" {
                    return Err(StoreError::Invalid(format!(
                        "version {v} is {state}; a rollout can only promote ready versions"
                    )));
                }
            }
            let Some(first) = versions.first() else {
                return Err(StoreError::Invalid("a rollout needs at least one version".into()));
            };
            let list = serde_json::to_string(versions).unwrap_or_else(|_| "[]".into());
            let row = sqlx::query(
                "INSERT INTO rollouts (app_id, versions, step, state, message, created_at, updated_at) \
                 VALUES ($1, $2, 0, 'running', $3, $4, $4) RETURNING id",
            )
            .bind(app_id)
            .bind(&list)
            .bind(format!("promoting version {first} (step 1 of {})", versions.len()))
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let id = get_i64(&row, "id")?;
            set_target(&mut tx, app_id, *first).await?;
            insert_event(
                &mut tx,
                app_id,
                "rollout",
                &format!("rollout {id} started: versions {list}"),
                serde_json::json!({"rollout": id, "versions": versions}),
            )
            .await?;
            tx.commit().await?;
            Ok(id)
        })
        .await
        .map(|id| Rollout {
            id,
            app_id,
            versions: versions.to_vec(),
            step: 0,
            state: "running".into(),
            message: None,
            created_at_ms: now_ms(),
            updated_at_ms: now_ms(),
        })
    }

    /// The app's running rollout, else its latest one.
    pub async fn latest_rollout(&self, app_id: i64) -> Result<Option<Rollout>> {
        let r = sqlx::query(
            "SELECT id, app_id, versions, step, state, message, created_at, updated_at FROM rollouts \
             WHERE app_id = $1 ORDER BY (CASE WHEN state = 'running' THEN 0 ELSE 1 END), id DESC LIMIT 1",
        )
        .bind(app_id)
        .fetch_optional(&self.pool)
        .await?;
        r.as_ref().map(rollout_from_row).transpose()
    }

    pub async fn running_rollouts(&self) -> Result<Vec<Rollout>> {
        let rows = sqlx::query(
            "SELECT id, app_id, versions, step, state, message, created_at, updated_at FROM rollouts WHERE state = 'running' ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rollout_from_row).collect()
    }

    /// Moves a rollout on: to its next step (making that version the
    /// target), or to done/failed. Conditional on the step it was at, so two
    /// control-plane replicas cannot advance it twice.
    pub async fn advance_rollout(&self, rollout: &Rollout, outcome: RolloutStep) -> Result<bool> {
        self.retry("advance_rollout", || async {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            let (step, state, message) = match &outcome {
                RolloutStep::Next => {
                    let next = rollout.step + 1;
                    match rollout.versions.get(next as usize) {
                        Some(v) => (
                            next,
                            "running",
                            format!(
                                "promoting version {v} (step {} of {})",
                                next + 1,
                                rollout.versions.len()
                            ),
                        ),
                        None => (
                            rollout.step,
                            "done",
                            "every step is live and older versions are drained".to_string(),
                        ),
                    }
                }
                RolloutStep::Fail(why) => (rollout.step, "failed", why.clone()),
            };
            let r = sqlx::query(
                "UPDATE rollouts SET step = $1, state = $2, message = $3, updated_at = $4 \
                 WHERE id = $5 AND step = $6 AND state = 'running'",
            )
            .bind(i64::from(step))
            .bind(state)
            .bind(&message)
            .bind(now)
            .bind(rollout.id)
            .bind(i64::from(rollout.step))
            .execute(&mut *tx)
            .await?;
            if r.rows_affected() != 1 {
                return Ok(false);
            }
            if state == "running" {
                if let Some(v) = rollout.versions.get(step as usize) {
                    set_target(&mut tx, rollout.app_id, *v).await?;
                }
            }
            insert_event(
                &mut tx,
                rollout.app_id,
                "rollout",
                &format!("rollout {}: {message}", rollout.id),
                serde_json::json!({"rollout": rollout.id, "step": step, "state": state}),
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }
}

/// What to do with a rollout step.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutStep {
    /// The current step is live and drained: go on.
    Next,
    /// Stop the rollout.
    Fail(String),
}

/// Makes `version` the app's target (a rollout step or a rollback), or
/// cancels a pending target when `version` is already the active one.
pub(crate) async fn set_target(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    app_id: i64,
    version: u32,
) -> Result<()> {
    sqlx::query(
        "UPDATE apps SET target_version = CASE WHEN active_version = $1 THEN NULL ELSE $1 END WHERE id = $2",
    )
    .bind(i64::from(version))
    .bind(app_id)
    .execute(&mut **tx)
    .await?;
    reset_start_failures(tx, app_id, version).await
}

/// Exits counted while a version was not the target do not count against
/// it once it becomes the target again.
pub(crate) async fn reset_start_failures(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    app_id: i64,
    version: u32,
) -> Result<()> {
    sqlx::query("UPDATE versions SET exits = 0 WHERE app_id = $1 AND number = $2")
        .bind(app_id)
        .bind(i64::from(version))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Executor bookkeeping inside a heartbeat: an instance seen for the first
/// time starts (or, under a dead executor's id, takes over) an executor.
pub(crate) async fn executor_seen(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    app_id: i64,
    executor_id: &str,
    version: u32,
    instance_id: &str,
    host_id: &str,
) -> Result<()> {
    let now = now_ms();
    let prev = sqlx::query(
        "SELECT instance_id, ended_at, recovered_at FROM executors WHERE executor_id = $1",
    )
    .bind(executor_id)
    .fetch_optional(&mut **tx)
    .await?;
    match prev {
        None => {
            sqlx::query(
                "INSERT INTO executors (executor_id, app_id, version, instance_id, host_id, started_at, last_seen) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6)",
            )
            .bind(executor_id)
            .bind(app_id)
            .bind(i64::from(version))
            .bind(instance_id)
            .bind(host_id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        }
        Some(r) if get_str(&r, "instance_id")? != instance_id => {
            let was_dead = get_opt_i64(&r, "ended_at")?.is_some();
            let unrecovered = was_dead && get_opt_i64(&r, "recovered_at")?.is_none();
            sqlx::query(
                "UPDATE executors SET instance_id = $1, host_id = $2, version = $3, last_seen = $4, ended_at = NULL, \
                 end_reason = NULL, recovered_at = CASE WHEN $5 = 1 THEN $4 ELSE recovered_at END WHERE executor_id = $6",
            )
            .bind(instance_id)
            .bind(host_id)
            .bind(i64::from(version))
            .bind(now)
            .bind(i64::from(unrecovered))
            .bind(executor_id)
            .execute(&mut **tx)
            .await?;
            if unrecovered {
                insert_event(
                    tx,
                    app_id,
                    "recovery",
                    &format!(
                        "instance {instance_id} took over dead executor {executor_id} of version {version}; it recovers its workflows as it starts"
                    ),
                    serde_json::json!({"version": version, "executors": [executor_id], "method": "executor-id",
                        "by": instance_id, "at": now}),
                )
                .await?;
            }
        }
        Some(_) => {}
    }
    Ok(())
}

/// Executor bookkeeping inside a heartbeat: the instance running it became
/// ready, and whether it runs the DBOS admin server is now known.
pub(crate) async fn executor_ready(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    executor_id: &str,
    instance_id: &str,
    admin: bool,
) -> Result<()> {
    sqlx::query(
        "UPDATE executors SET dbos_admin = $1 WHERE executor_id = $2 AND instance_id = $3 AND dbos_admin <> $1",
    )
    .bind(i64::from(admin))
    .bind(executor_id)
    .bind(instance_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Executor bookkeeping inside a heartbeat: the instance running it exited
/// or vanished.
pub(crate) async fn executor_ended(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    executor_id: &str,
    instance_id: &str,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        // A new death needs a new recovery, even for an executor id that was
        // taken over (and so recovered) before.
        "UPDATE executors SET ended_at = $1, end_reason = $2, recovered_at = NULL \
         WHERE executor_id = $3 AND instance_id = $4 AND ended_at IS NULL",
    )
    .bind(now_ms())
    .bind(reason)
    .bind(executor_id)
    .bind(instance_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
