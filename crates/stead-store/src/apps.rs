//! Apps, their versions, deploys, blobs, environment, events and logs.

use std::collections::{BTreeMap, HashMap};

use sqlx::any::AnyRow;
use sqlx::Row;
use stead_api::{
    mask_secret, AppConfig, AppSummary, BuildLogLine, DeployResponse, EnvVar, Event,
    InstanceLogLine, LogLine, LogStream, VersionInfo, VersionState,
};

use crate::{
    crypto, get_i64, get_opt_i64, get_opt_str, get_str, insert_event, now_ms, to_u32, Result,
    Store, StoreError,
};

/// Instance log lines kept per app; older ones are dropped as new ones arrive
/// so one chatty app cannot fill the control plane's database.
pub const INSTANCE_LOG_CAP: i64 = 20_000;

/// An app as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AppRecord {
    pub id: i64,
    pub name: String,
    pub org_id: i64,
    pub org: String,
    pub active_version: Option<u32>,
    /// A version starting to replace the active one (deploy or rollback).
    pub target_version: Option<u32>,
    pub latest_version: Option<u32>,
    pub min: u32,
    pub max: u32,
    pub created_at_ms: i64,
}

/// A deploy to record: the bundle is already stored as a blob.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub org_id: i64,
    pub bundle_hash: String,
    pub bundle_size: u64,
    pub config: AppConfig,
    pub idempotency_key: Option<String>,
    /// Build it but do not promote it when ready: a rollout promotes it.
    pub hold: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeployOutcome {
    pub response: DeployResponse,
}

const APP_COLUMNS: &str = "a.id AS id, a.name AS name, a.org_id AS org_id, o.name AS org, a.active_version AS active_version, a.target_version AS target_version, \
     a.last_version AS last_version, a.min_instances AS min_instances, a.max_instances AS max_instances, a.created_at AS created_at";

fn app_from_row(row: &AnyRow) -> Result<AppRecord> {
    let last = get_i64(row, "last_version")?;
    Ok(AppRecord {
        id: get_i64(row, "id")?,
        name: get_str(row, "name")?,
        org_id: get_i64(row, "org_id")?,
        org: get_str(row, "org")?,
        active_version: get_opt_i64(row, "active_version")?.map(to_u32),
        target_version: get_opt_i64(row, "target_version")?.map(to_u32),
        latest_version: (last > 0).then(|| to_u32(last)),
        min: to_u32(get_i64(row, "min_instances")?),
        max: to_u32(get_i64(row, "max_instances")?),
        created_at_ms: get_i64(row, "created_at")?,
    })
}

const VERSION_COLUMNS: &str = "a.name AS app, v.number AS number, v.state AS state, v.bundle_hash AS bundle_hash, \
     v.bundle_size AS bundle_size, v.artifact_hash AS artifact_hash, v.error AS error, v.created_at AS created_at, \
     v.config AS config, a.active_version AS active_version";

pub(crate) fn version_from_row(row: &AnyRow) -> Result<VersionInfo> {
    let number = to_u32(get_i64(row, "number")?);
    let state_s = get_str(row, "state")?;
    let state = VersionState::parse(&state_s).ok_or_else(|| StoreError::Corrupt {
        table: "versions",
        message: format!("unknown state {state_s:?}"),
    })?;
    let config: AppConfig =
        serde_json::from_str(&get_str(row, "config")?).map_err(|e| StoreError::Corrupt {
            table: "versions",
            message: format!("config of version {number}: {e}"),
        })?;
    Ok(VersionInfo {
        app: get_str(row, "app")?,
        number,
        state,
        bundle_hash: get_str(row, "bundle_hash")?,
        bundle_size: u64::try_from(get_i64(row, "bundle_size")?).unwrap_or(0),
        artifact_hash: get_opt_str(row, "artifact_hash")?,
        error: get_opt_str(row, "error")?,
        active: get_opt_i64(row, "active_version")? == Some(i64::from(number)),
        created_at_ms: get_i64(row, "created_at")?,
        config,
    })
}

pub(crate) fn parse_stream(s: &str) -> LogStream {
    LogStream::parse(s).unwrap_or(LogStream::System)
}

fn event_from_row(row: &AnyRow) -> Result<Event> {
    Ok(Event {
        seq: get_i64(row, "seq")?,
        ts_ms: get_i64(row, "ts")?,
        app: get_str(row, "app")?,
        kind: get_str(row, "kind")?,
        message: get_str(row, "message")?,
        data: serde_json::from_str(&get_str(row, "data")?).unwrap_or(serde_json::Value::Null),
    })
}

fn log_from_row(row: &AnyRow) -> Result<LogLine> {
    Ok(LogLine {
        seq: get_i64(row, "seq")?,
        ts_ms: get_i64(row, "ts")?,
        app: get_str(row, "app")?,
        version: to_u32(get_i64(row, "version")?),
        instance: get_str(row, "instance")?,
        host: get_str(row, "host")?,
        stream: parse_stream(&get_str(row, "stream")?),
        line: get_str(row, "line")?,
    })
}

impl Store {
    // -------------------------------------------------------------- apps

    /// The apps of one organisation, by name.
    pub async fn list_apps(&self, org_id: i64) -> Result<Vec<AppSummary>> {
        let rows = sqlx::query(
            "SELECT a.name AS name, a.active_version AS active_version, a.last_version AS last_version, \
             a.created_at AS created_at, \
             (SELECT COUNT(*) FROM instances i WHERE i.app_id = a.id AND i.state = 'ready' \
               AND i.version = a.active_version) AS ready \
             FROM apps a WHERE a.org_id = $1 ORDER BY a.name",
        )
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let last = get_i64(row, "last_version")?;
                Ok(AppSummary {
                    name: get_str(row, "name")?,
                    active_version: get_opt_i64(row, "active_version")?.map(to_u32),
                    latest_version: (last > 0).then(|| to_u32(last)),
                    ready_instances: to_u32(get_i64(row, "ready")?),
                    created_at_ms: get_i64(row, "created_at")?,
                })
            })
            .collect()
    }

    /// An app of one organisation; `None` also when it belongs to another,
    /// so callers cannot reveal that it exists.
    pub async fn get_app(&self, org_id: i64, name: &str) -> Result<Option<AppRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id WHERE a.name = $1 AND a.org_id = $2"
        ))
        .bind(name)
        .bind(org_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(app_from_row).transpose()
    }

    /// An app by name whatever its organisation (name uniqueness is global).
    pub async fn find_app(&self, name: &str) -> Result<Option<AppRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id WHERE a.name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(app_from_row).transpose()
    }

    /// An app by id.
    pub async fn app_by_id(&self, id: i64) -> Result<Option<AppRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id WHERE a.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(app_from_row).transpose()
    }

    /// Every app (of every organisation) whose databases are provisioned.
    pub async fn apps_with_databases(&self) -> Result<Vec<AppRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {APP_COLUMNS} FROM apps a JOIN orgs o ON o.id = a.org_id \
             WHERE EXISTS (SELECT 1 FROM app_databases d WHERE d.app_id = a.id) ORDER BY a.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(app_from_row).collect()
    }

    /// Deletes an app with its versions, env, tasks, logs and events; true
    /// when it existed. Its instances stop because it leaves the intended state.
    pub async fn delete_app(&self, org_id: i64, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM apps WHERE name = $1 AND org_id = $2")
            .bind(name)
            .bind(org_id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Sets the instance bounds (`stead scale`).
    pub async fn set_scale(&self, app_id: i64, min: u32, max: u32) -> Result<()> {
        if max == 0 || min > max {
            return Err(StoreError::Invalid(format!(
                "min ({min}) must not exceed max ({max}) and max must be at least 1"
            )));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE apps SET min_instances = $1, max_instances = $2 WHERE id = $3")
            .bind(i64::from(min))
            .bind(i64::from(max))
            .bind(app_id)
            .execute(&mut *tx)
            .await?;
        insert_event(
            &mut tx,
            app_id,
            "scale",
            &format!("scale set to min {min}, max {max}"),
            serde_json::json!({"min": min, "max": max}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // -------------------------------------------------------------- blobs

    /// Stores a blob under its SHA-256 unless it is there already (content
    /// addressing makes the second copy identical).
    pub async fn put_blob(&self, hash: &str, data: &[u8]) -> Result<()> {
        self.retry("put_blob", || async {
            sqlx::query(
                "INSERT INTO blobs (hash, size, data, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (hash) DO NOTHING",
            )
            .bind(hash)
            .bind(data.len() as i64)
            .bind(data)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    pub async fn blob_exists(&self, hash: &str) -> Result<bool> {
        Ok(sqlx::query("SELECT hash FROM blobs WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    pub async fn get_blob(&self, hash: &str) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query("SELECT data FROM blobs WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get::<Vec<u8>, _>("data")?),
            None => None,
        })
    }

    // -------------------------------------------------------------- deploys

    /// The answer recorded for an idempotency key, if the key was used.
    pub async fn find_deploy_key(&self, org_id: i64, key: &str) -> Result<Option<DeployResponse>> {
        let row = sqlx::query(
            "SELECT a.name AS app, k.version AS version, k.bundle_hash AS bundle_hash, k.build_id AS build_id \
             FROM deploy_keys k JOIN apps a ON a.id = k.app_id WHERE k.org_id = $1 AND k.key = $2",
        )
        .bind(org_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(DeployResponse {
                app: get_str(&r, "app")?,
                version: to_u32(get_i64(&r, "version")?),
                bundle_hash: get_str(&r, "bundle_hash")?,
                build_id: get_i64(&r, "build_id")?,
                replayed: true,
            })
        })
        .transpose()
    }

    /// Records a deploy in one transaction: the app (if new), version N+1 in
    /// state `building`, its queued build task, the idempotency key and a
    /// `deploy` event. A key already used returns the earlier answer.
    pub async fn create_version(&self, new: &NewVersion) -> Result<DeployOutcome> {
        self.retry("create_version", || self.create_version_once(new))
            .await
    }

    async fn create_version_once(&self, new: &NewVersion) -> Result<DeployOutcome> {
        let name = new.config.name.as_str();
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // Write first: it takes the write lock on SQLite at once, so the
        // transaction never has to upgrade a stale read snapshot.
        sqlx::query(
            "INSERT INTO apps (name, org_id, last_version, min_instances, max_instances, created_at) \
             VALUES ($1, $2, 0, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(new.org_id)
        .bind(i64::from(new.config.min))
        .bind(i64::from(new.config.max))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT id, org_id FROM apps WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        let app_id = get_i64(&row, "id")?;
        if get_i64(&row, "org_id")? != new.org_id {
            return Err(StoreError::NameTaken(name.to_string()));
        }
        if let Some(key) = &new.idempotency_key {
            let prior = sqlx::query(
                "SELECT version, bundle_hash, build_id FROM deploy_keys WHERE org_id = $1 AND key = $2",
            )
            .bind(new.org_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(r) = prior {
                // Nothing written except a no-op insert; roll back to be sure.
                tx.rollback().await?;
                return Ok(DeployOutcome {
                    response: DeployResponse {
                        app: name.to_string(),
                        version: to_u32(get_i64(&r, "version")?),
                        bundle_hash: get_str(&r, "bundle_hash")?,
                        build_id: get_i64(&r, "build_id")?,
                        replayed: true,
                    },
                });
            }
        }
        let number = get_i64(
            &sqlx::query(
                "UPDATE apps SET last_version = last_version + 1, min_instances = $2, max_instances = $3 \
                 WHERE id = $1 RETURNING last_version",
            )
            .bind(app_id)
            .bind(i64::from(new.config.min))
            .bind(i64::from(new.config.max))
            .fetch_one(&mut *tx)
            .await?,
            "last_version",
        )?;
        let config =
            serde_json::to_string(&new.config).map_err(|e| StoreError::Invalid(e.to_string()))?;
        sqlx::query(
            "INSERT INTO versions (app_id, number, state, bundle_hash, bundle_size, config, created_at, hold) \
             VALUES ($1, $2, 'building', $3, $4, $5, $6, $7)",
        )
        .bind(app_id)
        .bind(number)
        .bind(&new.bundle_hash)
        .bind(i64::try_from(new.bundle_size).unwrap_or(i64::MAX))
        .bind(&config)
        .bind(now)
        .bind(i64::from(new.hold))
        .execute(&mut *tx)
        .await?;
        let build_id = get_i64(
            &sqlx::query(
                "INSERT INTO build_tasks (app_id, version, state, attempt, created_at, updated_at) \
                 VALUES ($1, $2, 'queued', 0, $3, $3) RETURNING id",
            )
            .bind(app_id)
            .bind(number)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?,
            "id",
        )?;
        if let Some(key) = &new.idempotency_key {
            sqlx::query(
                "INSERT INTO deploy_keys (org_id, key, app_id, version, build_id, bundle_hash, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(new.org_id)
            .bind(key)
            .bind(app_id)
            .bind(number)
            .bind(build_id)
            .bind(&new.bundle_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        insert_event(
            &mut tx,
            app_id,
            "deploy",
            &format!("version {number} deployed; build {build_id} queued"),
            serde_json::json!({"version": number, "bundle_hash": new.bundle_hash, "build_id": build_id}),
        )
        .await?;
        tx.commit().await?;
        Ok(DeployOutcome {
            response: DeployResponse {
                app: name.to_string(),
                version: to_u32(number),
                bundle_hash: new.bundle_hash.clone(),
                build_id,
                replayed: false,
            },
        })
    }

    // -------------------------------------------------------------- versions

    /// Versions of an app, newest first.
    pub async fn list_versions(&self, app_id: i64) -> Result<Vec<VersionInfo>> {
        let rows = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions v JOIN apps a ON a.id = v.app_id WHERE v.app_id = $1 \
             ORDER BY v.number DESC"
        ))
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_from_row).collect()
    }

    pub async fn get_version(&self, app_id: i64, number: u32) -> Result<Option<VersionInfo>> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions v JOIN apps a ON a.id = v.app_id \
             WHERE v.app_id = $1 AND v.number = $2"
        ))
        .bind(app_id)
        .bind(i64::from(number))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(version_from_row).transpose()
    }

    /// Build log lines of a version after `after`, oldest first.
    pub async fn build_log(
        &self,
        app_id: i64,
        version: u32,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BuildLogLine>> {
        let rows = sqlx::query(
            "SELECT l.seq AS seq, l.ts AS ts, l.stream AS stream, l.line AS line FROM build_logs l \
             JOIN build_tasks t ON t.id = l.task_id WHERE t.app_id = $1 AND t.version = $2 AND l.seq > $3 \
             ORDER BY l.seq LIMIT $4",
        )
        .bind(app_id)
        .bind(i64::from(version))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BuildLogLine {
                    seq: get_i64(r, "seq")?,
                    ts_ms: get_i64(r, "ts")?,
                    stream: parse_stream(&get_str(r, "stream")?),
                    line: get_str(r, "line")?,
                })
            })
            .collect()
    }

    /// Makes an earlier (or any ready) version the target without rebuilding;
    /// it becomes active once one of its instances is ready.
    /// Default target: the highest ready version below the active one.
    /// Returns the version chosen (the active one when this cancels a
    /// pending target).
    pub async fn rollback(&self, app_id: i64, target: Option<u32>) -> Result<u32> {
        self.retry("rollback", || self.rollback_once(app_id, target))
            .await
    }

    async fn rollback_once(&self, app_id: i64, target: Option<u32>) -> Result<u32> {
        let mut tx = self.pool.begin().await?;
        // Touch the row first so concurrent rollbacks serialise on it.
        let row = sqlx::query(
            "UPDATE apps SET event_seq = event_seq WHERE id = $1 RETURNING name, active_version",
        )
        .bind(app_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::NotFound("the app no longer exists".into()))?;
        let name = get_str(&row, "name")?;
        let active = get_opt_i64(&row, "active_version")?;
        let number = match target {
            Some(n) => {
                let v = sqlx::query(
                    "SELECT state, error FROM versions WHERE app_id = $1 AND number = $2",
                )
                .bind(app_id)
                .bind(i64::from(n))
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| {
                    StoreError::NotFound(format!(
                        "app {name} has no version {n}; run `stead versions {name}` to list them"
                    ))
                })?;
                let state = get_str(&v, "state")?;
                if state != "ready" {
                    let why = get_opt_str(&v, "error")?
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    return Err(StoreError::Invalid(format!(
                        "version {n} of app {name} is {state}{why}; only a ready version can be made active"
                    )));
                }
                i64::from(n)
            }
            None => {
                let Some(active) = active else {
                    return Err(StoreError::Invalid(format!(
                        "app {name} has no active version to roll back from; deploy one first"
                    )));
                };
                let r = sqlx::query(
                    "SELECT MAX(number) AS n FROM versions WHERE app_id = $1 AND number < $2 AND state = 'ready'",
                )
                .bind(app_id)
                .bind(active)
                .fetch_one(&mut *tx)
                .await?;
                get_opt_i64(&r, "n")?.ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "app {name} has no ready version before version {active}; name one with --version"
                    ))
                })?
            }
        };
        // Like a deploy, a rollback goes through the target: the earlier
        // version's instances start (from its existing build) and it becomes
        // active once one is ready, so traffic never meets an empty app.
        // Rolling back to the active version cancels a pending target.
        crate::dbos::set_target(&mut tx, app_id, to_u32(number)).await?;
        insert_event(
            &mut tx,
            app_id,
            "rollback",
            &format!(
                "rolling back to version {number} (active: {})",
                active
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "none".into())
            ),
            serde_json::json!({"version": number, "previous": active}),
        )
        .await?;
        tx.commit().await?;
        Ok(to_u32(number))
    }

    // -------------------------------------------------------------- env

    /// Env vars of an app with secrets masked, by key.
    pub async fn list_env(&self, app_id: i64) -> Result<Vec<EnvVar>> {
        let rows = sqlx::query("SELECT key, value, secret, updated_at, ciphertext, nonce FROM env_vars WHERE app_id = $1 ORDER BY key")
            .bind(app_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let key = get_str(r, "key")?;
                let secret = get_i64(r, "secret")? != 0;
                let value = if secret {
                    // Mask the real value (so the user can recognise it by its
                    // tail) when the key is at hand, a plain mask otherwise.
                    match self.decrypt_row(app_id, &key, r) {
                        Ok(v) => mask_secret(&v),
                        Err(_) => "****".to_string(),
                    }
                } else {
                    get_opt_str(r, "value")?.unwrap_or_default()
                };
                Ok(EnvVar {
                    key,
                    value,
                    secret,
                    updated_at_ms: get_i64(r, "updated_at")?,
                })
            })
            .collect()
    }

    fn decrypt_row(&self, app_id: i64, key: &str, r: &AnyRow) -> Result<String> {
        let secret_key = self.secret_key.as_ref().ok_or(StoreError::NoSecretKey)?;
        let ct: Option<Vec<u8>> = r.try_get("ciphertext")?;
        let nonce: Option<Vec<u8>> = r.try_get("nonce")?;
        match (ct, nonce) {
            (Some(ct), Some(nonce)) => crypto::decrypt(secret_key, app_id, key, &ct, &nonce),
            _ => Err(StoreError::Decrypt {
                key: key.to_string(),
            }),
        }
    }

    /// The environment instances and builds get: plain values and decrypted secrets.
    pub async fn env_plain(&self, app_id: i64) -> Result<BTreeMap<String, String>> {
        let rows = sqlx::query(
            "SELECT key, value, secret, ciphertext, nonce FROM env_vars WHERE app_id = $1",
        )
        .bind(app_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = BTreeMap::new();
        for r in &rows {
            let key = get_str(r, "key")?;
            let value = if get_i64(r, "secret")? != 0 {
                self.decrypt_row(app_id, &key, r)?
            } else {
                get_opt_str(r, "value")?.unwrap_or_default()
            };
            out.insert(key, value);
        }
        Ok(out)
    }

    /// [`Store::env_plain`] of every app, in one query (the intended state
    /// of every host is computed at once).
    pub async fn env_plain_all(&self) -> Result<HashMap<i64, BTreeMap<String, String>>> {
        let rows =
            sqlx::query("SELECT app_id, key, value, secret, ciphertext, nonce FROM env_vars")
                .fetch_all(&self.pool)
                .await?;
        let mut out: HashMap<i64, BTreeMap<String, String>> = HashMap::new();
        for r in &rows {
            let app_id = get_i64(r, "app_id")?;
            let key = get_str(r, "key")?;
            let value = if get_i64(r, "secret")? != 0 {
                self.decrypt_row(app_id, &key, r)?
            } else {
                get_opt_str(r, "value")?.unwrap_or_default()
            };
            out.entry(app_id).or_default().insert(key, value);
        }
        Ok(out)
    }

    /// Sets env vars (secrets encrypted) and records an `env` event, in one
    /// transaction. Keys must already be validated by the caller.
    pub async fn set_env(
        &self,
        app_id: i64,
        vars: &BTreeMap<String, String>,
        secret: bool,
    ) -> Result<()> {
        if secret && self.secret_key.is_none() {
            return Err(StoreError::NoSecretKey);
        }
        self.retry("set_env", || async {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            for (key, value) in vars {
                let (plain, ct, nonce) = match (secret, &self.secret_key) {
                    (true, Some(k)) => {
                        let (ct, nonce) = crypto::encrypt(k, app_id, key, value)?;
                        (None, Some(ct), Some(nonce))
                    }
                    _ => (Some(value.clone()), None, None),
                };
                sqlx::query(
                    "INSERT INTO env_vars (app_id, key, value, ciphertext, nonce, secret, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (app_id, key) DO UPDATE SET \
                     value = excluded.value, ciphertext = excluded.ciphertext, nonce = excluded.nonce, \
                     secret = excluded.secret, updated_at = excluded.updated_at",
                )
                .bind(app_id)
                .bind(key)
                .bind(plain)
                .bind(ct)
                .bind(nonce)
                .bind(i64::from(secret))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            let keys: Vec<&String> = vars.keys().collect();
            insert_event(
                &mut tx,
                app_id,
                "env",
                &format!(
                    "{} {} set; instances started from now on get the new values",
                    if secret { "secrets" } else { "env vars" },
                    keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                ),
                serde_json::json!({"set": keys, "secret": secret}),
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Removes one env var; false when it was not set.
    pub async fn unset_env(&self, app_id: i64, key: &str) -> Result<bool> {
        self.retry("unset_env", || async {
            let mut tx = self.pool.begin().await?;
            let r = sqlx::query("DELETE FROM env_vars WHERE app_id = $1 AND key = $2")
                .bind(app_id)
                .bind(key)
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            insert_event(
                &mut tx,
                app_id,
                "env",
                &format!("env var {key} removed; instances started from now on no longer get it"),
                serde_json::json!({"unset": [key]}),
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    // -------------------------------------------------------------- events

    /// Records an event outside any other change.
    pub async fn record_event(
        &self,
        app_id: i64,
        kind: &str,
        message: &str,
        data: serde_json::Value,
    ) -> Result<()> {
        self.retry("record_event", || async {
            let mut tx = self.pool.begin().await?;
            insert_event(&mut tx, app_id, kind, message, data.clone()).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Events of an app after `after`, oldest first.
    pub async fn events(&self, app_id: i64, after: i64, limit: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT e.seq AS seq, e.ts AS ts, a.name AS app, e.kind AS kind, e.message AS message, e.data AS data \
             FROM events e JOIN apps a ON a.id = e.app_id WHERE e.app_id = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3",
        )
        .bind(app_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    // -------------------------------------------------------------- instance logs

    /// Appends instance log lines shipped by a host; lines of apps that do not
    /// exist (any more) are dropped. Keeps at most [`INSTANCE_LOG_CAP`] lines per app.
    pub async fn append_instance_logs(
        &self,
        host_name: &str,
        lines: &[InstanceLogLine],
    ) -> Result<u64> {
        self.append_instance_logs_capped(host_name, lines, INSTANCE_LOG_CAP)
            .await
    }

    /// As [`Store::append_instance_logs`] with an explicit cap (tests use a small one).
    pub async fn append_instance_logs_capped(
        &self,
        host_name: &str,
        lines: &[InstanceLogLine],
        cap: i64,
    ) -> Result<u64> {
        let mut by_app: BTreeMap<&str, Vec<&InstanceLogLine>> = BTreeMap::new();
        for l in lines {
            by_app.entry(l.app.as_str()).or_default().push(l);
        }
        let mut stored = 0u64;
        for (app, lines) in by_app {
            stored += self
                .retry("append_instance_logs", || {
                    self.append_app_logs(host_name, app, &lines, cap)
                })
                .await?;
        }
        Ok(stored)
    }

    async fn append_app_logs(
        &self,
        host: &str,
        app: &str,
        lines: &[&InstanceLogLine],
        cap: i64,
    ) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let n = lines.len() as i64;
        let Some(row) = sqlx::query(
            "UPDATE apps SET log_seq = log_seq + $1 WHERE name = $2 RETURNING id, log_seq",
        )
        .bind(n)
        .bind(app)
        .fetch_optional(&mut *tx)
        .await?
        else {
            tx.rollback().await?;
            return Ok(0);
        };
        let app_id = get_i64(&row, "id")?;
        let last = get_i64(&row, "log_seq")?;
        let first = last - n + 1;
        for (i, l) in lines.iter().enumerate() {
            sqlx::query(
                "INSERT INTO instance_logs (app_id, seq, ts, version, instance, host, stream, line) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(app_id)
            .bind(first + i as i64)
            .bind(l.ts_ms)
            .bind(i64::from(l.version))
            .bind(&l.instance)
            .bind(host)
            .bind(l.stream.as_str())
            .bind(&l.line)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM instance_logs WHERE app_id = $1 AND seq <= $2")
            .bind(app_id)
            .bind(last - cap)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n as u64)
    }

    /// Instance log lines after `after`, oldest first.
    pub async fn instance_logs_after(
        &self,
        app_id: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LogLine>> {
        let rows = sqlx::query(
            "SELECT l.seq AS seq, l.ts AS ts, a.name AS app, l.version AS version, l.instance AS instance, \
             l.host AS host, l.stream AS stream, l.line AS line FROM instance_logs l JOIN apps a ON a.id = l.app_id \
             WHERE l.app_id = $1 AND l.seq > $2 ORDER BY l.seq LIMIT $3",
        )
        .bind(app_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(log_from_row).collect()
    }

    /// The newest `limit` instance log lines, oldest first.
    pub async fn instance_logs_tail(&self, app_id: i64, limit: i64) -> Result<Vec<LogLine>> {
        let rows = sqlx::query(
            "SELECT l.seq AS seq, l.ts AS ts, a.name AS app, l.version AS version, l.instance AS instance, \
             l.host AS host, l.stream AS stream, l.line AS line FROM instance_logs l JOIN apps a ON a.id = l.app_id \
             WHERE l.app_id = $1 ORDER BY l.seq DESC LIMIT $2",
        )
        .bind(app_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<LogLine> = rows.iter().map(log_from_row).collect::<Result<_>>()?;
        out.reverse();
        Ok(out)
    }
}
