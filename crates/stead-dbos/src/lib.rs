//! A client for a DBOS application's *system database*, where the DBOS
//! Transact library checkpoints workflows: PostgreSQL (schema `dbos`) or
//! SQLite (the Python library's file).
//!
//! Stead provisions that database for each app, so it can act on it directly
//! without any help from the app: recover a dead executor's workflows by
//! re-enqueueing them (exactly the statement the libraries run for their own
//! recovery, so a live executor of the same version claims them through the
//! queue), count a version's unfinished work to decide when its instances may
//! be stopped, and list, cancel, resume and fork workflows.
//!
//! Every statement mirrors the one the libraries run (Python `dbos` 3.x and
//! 2.31, the Rust crate 0.5; see each method). The schema differs between
//! library versions (3.x moved inputs and outputs to `workflow_input` and
//! `workflow_output`, added `creator_xid`, `retention_timestamp`...), so the
//! statements are built from the tables and columns the database actually
//! has. This crate never creates or migrates tables: a database where the
//! app has not created them yet reads as empty.

mod types;
mod url;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use tokio::sync::Mutex;

pub use types::{StepInfo, WorkflowFilter, WorkflowInfo};

/// The queue the libraries put recovered, resumed and forked workflows on;
/// every executor listens to it.
pub const INTERNAL_QUEUE: &str = "_dbos_internal_queue";

/// How long a read of the schema is trusted. The app may create its tables
/// at any moment (and a library upgrade adds some), so it is read again now
/// and then; never cached while the tables are missing.
const SCHEMA_TTL: Duration = Duration::from_secs(30);

/// Bounds every wait for a connection, so a database that is down turns into
/// an error the caller can retry rather than a hang.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Matches the Python library's own SQLite busy timeout (30 s): its writers
/// hold the file's lock only briefly, and we would rather wait than fail.
const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 30000";

#[derive(Debug, thiserror::Error)]
pub enum DbosError {
    #[error("invalid DBOS system database URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to the DBOS system database {database}: {source}")]
    Connect {
        database: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("DBOS system database {database}: {operation} failed: {source}")]
    Query {
        database: String,
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("DBOS system database {database}: {operation}: no workflow {workflow_id}")]
    NotFound {
        database: String,
        operation: &'static str,
        workflow_id: String,
    },
    #[error("DBOS system database {database}: {operation}: workflow {workflow_id} has already finished ({status}); {hint}")]
    Finished {
        database: String,
        operation: &'static str,
        workflow_id: String,
        status: String,
        hint: &'static str,
    },
    #[error("DBOS system database {database}: fork: a workflow {workflow_id} already exists; choose another id")]
    AlreadyExists {
        database: String,
        workflow_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Postgres,
    Sqlite,
}

/// The tables (and their columns, in order) of the system database, as read
/// from the database itself.
#[derive(Debug)]
struct Schema {
    backend: Backend,
    tables: HashMap<String, Vec<String>>,
}

impl Schema {
    fn has_table(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }

    fn has(&self, table: &str, column: &str) -> bool {
        self.tables
            .get(table)
            .is_some_and(|cols| cols.iter().any(|c| c == column))
    }

    fn columns(&self, table: &str) -> &[String] {
        self.tables.get(table).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The table's name as SQL: `"dbos"."t"` on PostgreSQL, `"t"` on SQLite.
    fn t(&self, table: &str) -> String {
        match self.backend {
            Backend::Postgres => format!("\"dbos\".{}", q(table)),
            Backend::Sqlite => q(table),
        }
    }

    /// `alias.column` when the table has it, else a typed NULL, so a query
    /// reads the same on every library version.
    fn col_or_null(&self, alias: &str, table: &str, column: &str, ty: SqlType) -> String {
        if self.has(table, column) {
            match ty {
                SqlType::Int => format!("CAST({alias}.{} AS BIGINT)", q(column)),
                SqlType::Text => format!("{alias}.{}", q(column)),
            }
        } else {
            match ty {
                SqlType::Int => "CAST(NULL AS BIGINT)".into(),
                SqlType::Text => "CAST(NULL AS TEXT)".into(),
            }
        }
    }
}

#[derive(Clone, Copy)]
enum SqlType {
    Int,
    Text,
}

/// Quotes an identifier (`offset`, `key` and `value` are keywords).
fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `$from, $from+1, ...` for an IN list of `n` values.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A random (version 4) UUID, as the libraries generate workflow ids.
fn new_uuid() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A schema read and when it was read.
type CachedSchema = (Instant, Arc<Schema>);

/// A connection pool to one app's system database. Cheap to clone (clones
/// share the pool and the schema cache).
#[derive(Clone)]
pub struct SystemDb {
    pool: AnyPool,
    backend: Backend,
    /// The URL without password (or the SQLite path), for errors and logs.
    database: String,
    /// For SQLite: the file, which may not exist before the app first runs.
    sqlite_path: Option<PathBuf>,
    schema: Arc<Mutex<Option<CachedSchema>>>,
}

impl std::fmt::Debug for SystemDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemDb")
            .field("database", &self.database)
            .finish()
    }
}

/// The workflow columns every read selects, in [`workflow_from_row`]'s order.
fn workflow_select(s: &Schema) -> String {
    let ws = "workflow_status";
    let (inputs, output, error, joins) = {
        let mut joins = String::new();
        let inputs = if s.has_table("workflow_input") {
            joins.push_str(&format!(
                " LEFT JOIN {} wi ON wi.workflow_uuid = ws.workflow_uuid",
                s.t("workflow_input")
            ));
            format!(
                "COALESCE(wi.inputs, {})",
                s.col_or_null("ws", ws, "inputs", SqlType::Text)
            )
        } else {
            s.col_or_null("ws", ws, "inputs", SqlType::Text)
        };
        let (output, error) = if s.has_table("workflow_output") {
            joins.push_str(&format!(
                " LEFT JOIN {} wo ON wo.workflow_uuid = ws.workflow_uuid",
                s.t("workflow_output")
            ));
            (
                format!(
                    "COALESCE(wo.output, {})",
                    s.col_or_null("ws", ws, "output", SqlType::Text)
                ),
                format!(
                    "COALESCE(wo.error, {})",
                    s.col_or_null("ws", ws, "error", SqlType::Text)
                ),
            )
        } else {
            (
                s.col_or_null("ws", ws, "output", SqlType::Text),
                s.col_or_null("ws", ws, "error", SqlType::Text),
            )
        };
        (inputs, output, error, joins)
    };
    let c = |col: &str, ty| s.col_or_null("ws", ws, col, ty);
    format!(
        "SELECT ws.workflow_uuid, ws.status, ws.name, {class}, {config}, ws.executor_id, \
         ws.application_version, {app_id}, ws.queue_name, {attempts}, \
         CAST(ws.created_at AS BIGINT), CAST(ws.updated_at AS BIGINT), {started}, {completed}, \
         {forked}, {parent}, {inputs}, {output}, {error}, {ser} \
         FROM {table} ws{joins}",
        class = c("class_name", SqlType::Text),
        config = c("config_name", SqlType::Text),
        app_id = c("application_id", SqlType::Text),
        attempts = c("recovery_attempts", SqlType::Int),
        started = c("started_at_epoch_ms", SqlType::Int),
        completed = c("completed_at", SqlType::Int),
        forked = c("forked_from", SqlType::Text),
        parent = c("parent_workflow_id", SqlType::Text),
        ser = c("serialization", SqlType::Text),
        table = s.t(ws),
    )
}

fn workflow_from_row(row: &AnyRow) -> Result<WorkflowInfo, sqlx::Error> {
    Ok(WorkflowInfo {
        id: row.try_get(0)?,
        status: row.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
        name: row.try_get::<Option<String>, _>(2)?.unwrap_or_default(),
        class_name: row.try_get(3)?,
        config_name: row.try_get(4)?,
        executor_id: row.try_get(5)?,
        application_version: row.try_get(6)?,
        application_id: row.try_get(7)?,
        queue_name: row.try_get(8)?,
        recovery_attempts: row.try_get::<Option<i64>, _>(9)?.unwrap_or(0).max(0) as u64,
        created_at_ms: row.try_get(10)?,
        updated_at_ms: row.try_get(11)?,
        started_at_ms: row.try_get(12)?,
        completed_at_ms: row.try_get(13)?,
        forked_from: row.try_get(14)?,
        parent_workflow_id: row.try_get(15)?,
        input: row.try_get(16)?,
        output: row.try_get(17)?,
        error: row.try_get(18)?,
        serialization: row.try_get(19)?,
    })
}

impl SystemDb {
    /// Opens the system database at `url`, the URL the app gets in
    /// `DBOS_SYSTEM_DATABASE_URL`: `postgresql://...` / `postgres://...`, or
    /// `sqlite:////abs/path` (SQLAlchemy's form: four slashes for an absolute
    /// path). Creates nothing: a SQLite file that does not exist yet, like a
    /// database without DBOS tables, reads as empty. A PostgreSQL server that
    /// cannot be reached is an error now rather than at the first query.
    pub async fn connect(url: &str) -> Result<SystemDb, DbosError> {
        sqlx::any::install_default_drivers();
        let target = url::parse(url)?;
        let (backend, sqlx_url, database, sqlite_path) = match target {
            url::Target::Postgres { url: u } => {
                (Backend::Postgres, u.clone(), url::redact(&u), None)
            }
            url::Target::Sqlite { path } => (
                Backend::Sqlite,
                // sqlx opens without creating (`mode=rw`): the app owns the file.
                format!("sqlite://{}", path.display()),
                path.display().to_string(),
                Some(path),
            ),
        };
        let options = AnyPoolOptions::new()
            // One SystemDb per app, held by long-lived components: keep few
            // connections, and none while idle.
            .max_connections(4)
            .min_connections(0)
            .idle_timeout(Some(Duration::from_secs(60)))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        sqlx::Executor::execute(&mut *conn, SQLITE_BUSY_TIMEOUT).await?;
                    }
                    Ok(())
                })
            });
        let pool = options
            .connect_lazy(&sqlx_url)
            .map_err(|source| DbosError::Connect {
                database: database.clone(),
                source,
            })?;
        let db = SystemDb {
            pool,
            backend,
            database,
            sqlite_path,
            schema: Arc::new(Mutex::new(None)),
        };
        if backend == Backend::Postgres {
            sqlx::query("SELECT 1")
                .execute(&db.pool)
                .await
                .map_err(|source| DbosError::Connect {
                    database: db.database.clone(),
                    source,
                })?;
        }
        tracing::debug!(database = %db.database, "opened DBOS system database");
        Ok(db)
    }

    /// The database this talks to, without password (for messages).
    pub fn database(&self) -> &str {
        &self.database
    }

    fn query_err(&self, operation: &'static str) -> impl Fn(sqlx::Error) -> DbosError + '_ {
        move |source| DbosError::Query {
            database: self.database.clone(),
            operation,
            source,
        }
    }

    /// The DBOS tables, or `None` while the app has not created them.
    async fn schema(&self, operation: &'static str) -> Result<Option<Arc<Schema>>, DbosError> {
        let mut cached = self.schema.lock().await;
        if let Some((at, s)) = cached.as_ref() {
            if at.elapsed() < SCHEMA_TTL {
                return Ok(Some(s.clone()));
            }
        }
        if let Some(path) = &self.sqlite_path {
            if !path.exists() {
                return Ok(None);
            }
        }
        let sql = match self.backend {
            Backend::Postgres => {
                "SELECT CAST(table_name AS TEXT), CAST(column_name AS TEXT) \
                 FROM information_schema.columns WHERE table_schema = 'dbos' \
                 ORDER BY table_name, ordinal_position"
            }
            Backend::Sqlite => {
                "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p \
                 WHERE m.type = 'table' ORDER BY m.name, p.cid"
            }
        };
        let rows = sqlx::query(sql)
            .fetch_all(&self.pool)
            .await
            .map_err(|source| DbosError::Query {
                database: self.database.clone(),
                operation,
                source,
            })?;
        let mut tables: HashMap<String, Vec<String>> = HashMap::new();
        for row in rows {
            let table: String = row.try_get(0).map_err(self.query_err(operation))?;
            let column: String = row.try_get(1).map_err(self.query_err(operation))?;
            tables.entry(table).or_default().push(column);
        }
        let schema = Schema {
            backend: self.backend,
            tables,
        };
        if !schema.has_table("workflow_status") || !schema.has_table("operation_outputs") {
            *cached = None;
            return Ok(None);
        }
        let schema = Arc::new(schema);
        *cached = Some((Instant::now(), schema.clone()));
        Ok(Some(schema))
    }

    /// PENDING workflows grouped by (executor id, application version), with
    /// their count: who owns in-flight work. An empty executor id or version
    /// stands for NULL.
    pub async fn pending_executors(&self) -> Result<Vec<(String, String, u64)>, DbosError> {
        const OP: &str = "pending_executors";
        let Some(s) = self.schema(OP).await? else {
            return Ok(Vec::new());
        };
        let sql = format!(
            "SELECT COALESCE(executor_id, ''), COALESCE(application_version, ''), COUNT(*) \
             FROM {} WHERE status = 'PENDING' \
             GROUP BY COALESCE(executor_id, ''), COALESCE(application_version, '') \
             ORDER BY 1, 2",
            s.t("workflow_status")
        );
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(self.query_err(OP))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0)?,
                    r.try_get::<String, _>(1)?,
                    r.try_get::<i64, _>(2)?.max(0) as u64,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(self.query_err(OP))
    }

    /// Recovers the workflows of dead executors the way the libraries do:
    /// their PENDING rows of `version` go back to ENQUEUED on the internal
    /// queue (a queued workflow keeps its own queue), with `started_at`
    /// cleared and the ownership token (`owner_xid`) released, so that a live
    /// executor of the same version claims each one through the queue's
    /// atomic ENQUEUED -> PENDING handoff (stamping its own executor id and
    /// counting a recovery attempt) and resumes it from its last recorded
    /// step.
    ///
    /// This is Python 3.x's `reenqueue_for_recovery` (which also clears
    /// `owner_xid`), with the Rust crate's `NULLIF(queue_name, '')` for rows
    /// that stored "no queue" as an empty string, over a whole executor list
    /// at once. Idempotent: once claimed, a row no longer matches the dead
    /// executor ids. Returns the ids it re-enqueued.
    pub async fn reenqueue(
        &self,
        executor_ids: &[String],
        version: &str,
    ) -> Result<Vec<String>, DbosError> {
        const OP: &str = "reenqueue";
        if executor_ids.is_empty() {
            return Ok(Vec::new());
        }
        let Some(s) = self.schema(OP).await? else {
            return Ok(Vec::new());
        };
        let ws = "workflow_status";
        let owner = if s.has(ws, "owner_xid") {
            ", owner_xid = NULL"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE {table} SET status = 'ENQUEUED', started_at_epoch_ms = NULL, updated_at = $1, \
             queue_name = COALESCE(NULLIF(queue_name, ''), $2){owner} \
             WHERE status = 'PENDING' AND application_version = $3 AND executor_id IN ({ids}) \
             RETURNING workflow_uuid",
            table = s.t(ws),
            ids = placeholders(4, executor_ids.len()),
        );
        let mut query = sqlx::query(&sql)
            .bind(now_ms())
            .bind(INTERNAL_QUEUE)
            .bind(version);
        for id in executor_ids {
            query = query.bind(id.as_str());
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(self.query_err(OP))?;
        let ids = rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.query_err(OP))?;
        if !ids.is_empty() {
            tracing::info!(
                database = %self.database,
                executors = ?executor_ids,
                version,
                count = ids.len(),
                "re-enqueued workflows of dead executors"
            );
        }
        Ok(ids)
    }

    /// Unfinished work of a version: (PENDING, ENQUEUED) counts. DELAYED
    /// workflows count as enqueued: they become ENQUEUED for the same version
    /// when their delay ends. Work enqueued without a version (by a client)
    /// belongs to no version and is not counted.
    pub async fn count_active(&self, version: &str) -> Result<(u64, u64), DbosError> {
        const OP: &str = "count_active";
        let Some(s) = self.schema(OP).await? else {
            return Ok((0, 0));
        };
        let sql = format!(
            "SELECT status, COUNT(*) FROM {} \
             WHERE application_version = $1 AND status IN ('PENDING', 'ENQUEUED', 'DELAYED') \
             GROUP BY status",
            s.t("workflow_status")
        );
        let rows = sqlx::query(&sql)
            .bind(version)
            .fetch_all(&self.pool)
            .await
            .map_err(self.query_err(OP))?;
        let (mut pending, mut enqueued) = (0u64, 0u64);
        for r in rows {
            let status: String = r.try_get(0).map_err(self.query_err(OP))?;
            let n = r.try_get::<i64, _>(1).map_err(self.query_err(OP))?.max(0) as u64;
            if status == "PENDING" {
                pending += n;
            } else {
                enqueued += n;
            }
        }
        Ok((pending, enqueued))
    }

    /// Workflows matching `filter`, newest first.
    pub async fn list_workflows(
        &self,
        filter: &WorkflowFilter,
    ) -> Result<Vec<WorkflowInfo>, DbosError> {
        const OP: &str = "list_workflows";
        let Some(s) = self.schema(OP).await? else {
            return Ok(Vec::new());
        };
        let mut sql = workflow_select(&s);
        let mut binds: Vec<String> = Vec::new();
        let mut conds: Vec<String> = Vec::new();
        for (col, val) in [
            ("status", &filter.status),
            ("name", &filter.name),
            ("application_version", &filter.application_version),
            ("executor_id", &filter.executor_id),
            ("queue_name", &filter.queue_name),
        ] {
            if let Some(v) = val {
                binds.push(v.clone());
                conds.push(format!("ws.{} = ${}", q(col), binds.len()));
            }
        }
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(" ORDER BY ws.created_at DESC, ws.workflow_uuid DESC");
        match (filter.limit, filter.offset) {
            (Some(l), Some(o)) => sql.push_str(&format!(" LIMIT {l} OFFSET {o}")),
            (Some(l), None) => sql.push_str(&format!(" LIMIT {l}")),
            // Both backends need a LIMIT before OFFSET; -1 is "all" only on
            // SQLite, so use the largest BIGINT.
            (None, Some(o)) => sql.push_str(&format!(" LIMIT {} OFFSET {o}", i64::MAX)),
            (None, None) => {}
        }
        let mut query = sqlx::query(&sql);
        for b in &binds {
            query = query.bind(b.as_str());
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(self.query_err(OP))?;
        rows.iter()
            .map(workflow_from_row)
            .collect::<Result<_, _>>()
            .map_err(self.query_err(OP))
    }

    /// One workflow, or `None` when there is no such workflow.
    pub async fn get_workflow(&self, id: &str) -> Result<Option<WorkflowInfo>, DbosError> {
        const OP: &str = "get_workflow";
        let Some(s) = self.schema(OP).await? else {
            return Ok(None);
        };
        let sql = format!("{} WHERE ws.workflow_uuid = $1", workflow_select(&s));
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.query_err(OP))?;
        row.as_ref()
            .map(workflow_from_row)
            .transpose()
            .map_err(self.query_err(OP))
    }

    /// The recorded operations of a workflow, in order (empty for an unknown
    /// workflow, as in the libraries).
    pub async fn steps(&self, id: &str) -> Result<Vec<StepInfo>, DbosError> {
        const OP: &str = "steps";
        let Some(s) = self.schema(OP).await? else {
            return Ok(Vec::new());
        };
        let oo = "operation_outputs";
        let sql = format!(
            "SELECT CAST(oo.function_id AS BIGINT), oo.function_name, oo.output, oo.error, \
             {child}, {started}, {completed}, {ser} FROM {table} oo \
             WHERE oo.workflow_uuid = $1 ORDER BY oo.function_id",
            child = s.col_or_null("oo", oo, "child_workflow_id", SqlType::Text),
            started = s.col_or_null("oo", oo, "started_at_epoch_ms", SqlType::Int),
            completed = s.col_or_null("oo", oo, "completed_at_epoch_ms", SqlType::Int),
            ser = s.col_or_null("oo", oo, "serialization", SqlType::Text),
            table = s.t(oo),
        );
        let rows = sqlx::query(&sql)
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(self.query_err(OP))?;
        rows.iter()
            .map(|r| {
                Ok(StepInfo {
                    function_id: r.try_get::<i64, _>(0)?.clamp(0, u32::MAX as i64) as u32,
                    function_name: r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                    output: r.try_get(2)?,
                    error: r.try_get(3)?,
                    child_workflow_id: r.try_get(4)?,
                    started_at_ms: r.try_get(5)?,
                    completed_at_ms: r.try_get(6)?,
                    serialization: r.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(self.query_err(OP))
    }

    /// The status of a workflow, for the error of an update that matched
    /// nothing.
    async fn status_of(
        &self,
        s: &Schema,
        id: &str,
        op: &'static str,
    ) -> Result<Option<String>, DbosError> {
        let sql = format!(
            "SELECT status FROM {} WHERE workflow_uuid = $1",
            s.t("workflow_status")
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.query_err(op))?;
        match row {
            Some(r) => Ok(Some(
                r.try_get::<Option<String>, _>(0)
                    .map_err(self.query_err(op))?
                    .unwrap_or_default(),
            )),
            None => Ok(None),
        }
    }

    fn not_found(&self, operation: &'static str, id: &str) -> DbosError {
        DbosError::NotFound {
            database: self.database.clone(),
            operation,
            workflow_id: id.to_string(),
        }
    }

    /// Cancels a workflow as the libraries' `cancel_workflow` does: CANCELLED,
    /// off its queue, deduplication id, start time and ownership cleared, and
    /// `completed_at` set. The executor running it stops at its next step.
    /// Cancelling a cancelled workflow does nothing; a finished one (SUCCESS
    /// or ERROR) is left as it is (the library's no-op) and reported as
    /// [`DbosError::Finished`]; an unknown one is [`DbosError::NotFound`].
    pub async fn cancel(&self, id: &str) -> Result<(), DbosError> {
        const OP: &str = "cancel";
        let Some(s) = self.schema(OP).await? else {
            return Err(self.not_found(OP, id));
        };
        let ws = "workflow_status";
        let mut set = String::from(
            "status = 'CANCELLED', queue_name = NULL, deduplication_id = NULL, \
             started_at_epoch_ms = NULL, updated_at = $2",
        );
        if s.has(ws, "completed_at") {
            set.push_str(", completed_at = $2");
        }
        if s.has(ws, "owner_xid") {
            set.push_str(", owner_xid = NULL");
        }
        let sql = format!(
            "UPDATE {} SET {set} WHERE workflow_uuid = $1 \
             AND status NOT IN ('SUCCESS', 'ERROR', 'CANCELLED')",
            s.t(ws)
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(self.query_err(OP))?
            .rows_affected();
        if done > 0 {
            tracing::info!(database = %self.database, workflow_id = id, "cancelled workflow");
            return Ok(());
        }
        match self.status_of(&s, id, OP).await?.as_deref() {
            None => Err(self.not_found(OP, id)),
            Some("CANCELLED") => Ok(()),
            Some(status) => Err(DbosError::Finished {
                database: self.database.clone(),
                operation: OP,
                workflow_id: id.to_string(),
                status: status.to_string(),
                hint: "there is nothing to cancel",
            }),
        }
    }

    /// Resumes a workflow as the libraries' `resume_workflow` does: back to
    /// ENQUEUED on the internal queue with its recovery attempts reset and
    /// deadline, deduplication id, start and completion times and ownership
    /// cleared, so any executor of its version picks it up and continues from
    /// its last recorded step. Works on CANCELLED and
    /// MAX_RECOVERY_ATTEMPTS_EXCEEDED (and on PENDING/ENQUEUED, which it
    /// re-enqueues). The libraries leave SUCCESS and ERROR alone; so does
    /// this, reporting [`DbosError::Finished`] (fork such a workflow instead).
    pub async fn resume(&self, id: &str) -> Result<(), DbosError> {
        const OP: &str = "resume";
        let Some(s) = self.schema(OP).await? else {
            return Err(self.not_found(OP, id));
        };
        let ws = "workflow_status";
        let mut set = String::from(
            "status = 'ENQUEUED', queue_name = $3, recovery_attempts = 0, \
             workflow_deadline_epoch_ms = NULL, deduplication_id = NULL, \
             started_at_epoch_ms = NULL, updated_at = $2",
        );
        if s.has(ws, "completed_at") {
            set.push_str(", completed_at = NULL");
        }
        if s.has(ws, "owner_xid") {
            set.push_str(", owner_xid = NULL");
        }
        let sql = format!(
            "UPDATE {} SET {set} WHERE workflow_uuid = $1 AND status NOT IN ('SUCCESS', 'ERROR')",
            s.t(ws)
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(now_ms())
            .bind(INTERNAL_QUEUE)
            .execute(&self.pool)
            .await
            .map_err(self.query_err(OP))?
            .rows_affected();
        if done > 0 {
            tracing::info!(database = %self.database, workflow_id = id, "resumed workflow");
            return Ok(());
        }
        match self.status_of(&s, id, OP).await? {
            None => Err(self.not_found(OP, id)),
            Some(status) => Err(DbosError::Finished {
                database: self.database.clone(),
                operation: OP,
                workflow_id: id.to_string(),
                status,
                hint: "fork it to run it again",
            }),
        }
    }

    /// Forks a workflow as the libraries' `fork_workflow` does: a new
    /// workflow (id `new_id`, or a fresh UUID) with the same function and
    /// input, ENQUEUED on the internal queue for `version` (none: any
    /// executor of the latest version takes it, as with the library's
    /// client), whose recorded operations, events and streams before
    /// `start_step` are copied, so it re-runs from `start_step` (1 or 0: from
    /// the start). The original is marked `was_forked_from`. Returns the new
    /// id.
    pub async fn fork(
        &self,
        id: &str,
        start_step: u32,
        new_id: Option<String>,
        version: Option<String>,
    ) -> Result<String, DbosError> {
        const OP: &str = "fork";
        let Some(s) = self.schema(OP).await? else {
            return Err(self.not_found(OP, id));
        };
        let new_id = new_id.unwrap_or_else(new_uuid);
        let now = now_ms();
        let step = i64::from(start_step);
        let ws = "workflow_status";
        let err = self.query_err(OP);
        let mut tx = self.pool.begin().await.map_err(&err)?;

        // Write first: on SQLite this takes the write lock before any read,
        // so the transaction never has to upgrade a read lock (which fails at
        // once, without waiting, when the app is writing too).
        let mark = if s.has(ws, "was_forked_from") {
            "was_forked_from = TRUE"
        } else {
            "status = status"
        };
        let found = sqlx::query(&format!(
            "UPDATE {} SET {mark} WHERE workflow_uuid = $1",
            s.t(ws)
        ))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(&err)?
        .rows_affected();
        if found == 0 {
            return Err(self.not_found(OP, id));
        }

        // The new status row: copied identity columns, overridden state.
        let mut cols: Vec<&str> = vec![
            "workflow_uuid",
            "status",
            "name",
            "application_version",
            "queue_name",
            "created_at",
            "updated_at",
        ];
        let mut exprs: Vec<String> = vec![
            "$2".into(),
            "'ENQUEUED'".into(),
            "name".into(),
            "$3".into(),
            "$4".into(),
            "$5".into(),
            "$5".into(),
        ];
        for copied in [
            "class_name",
            "config_name",
            "application_id",
            "authenticated_user",
            "authenticated_roles",
            "assumed_role",
            "serialization",
            "attributes",
            "application_name",
        ] {
            if s.has(ws, copied) {
                cols.push(copied);
                exprs.push(q(copied));
            }
        }
        // Older libraries keep the input on the status row.
        if s.has(ws, "inputs") {
            cols.push("inputs");
            exprs.push("inputs".into());
        }
        if s.has(ws, "forked_from") {
            cols.push("forked_from");
            exprs.push("$1".into());
        }
        let insert = format!(
            "INSERT INTO {t} ({cols}) SELECT {exprs} FROM {t} WHERE workflow_uuid = $1",
            t = s.t(ws),
            cols = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", "),
            exprs = exprs.join(", "),
        );
        let inserted = sqlx::query(&insert)
            .bind(id)
            .bind(new_id.as_str())
            .bind(version.as_deref())
            .bind(INTERNAL_QUEUE)
            .bind(now)
            .execute(&mut *tx)
            .await;
        if let Err(e) = inserted {
            if let sqlx::Error::Database(d) = &e {
                if d.is_unique_violation() {
                    return Err(DbosError::AlreadyExists {
                        database: self.database.clone(),
                        workflow_id: new_id,
                    });
                }
            }
            return Err(err(e));
        }

        // Newer libraries keep the input in workflow_input.
        if s.has_table("workflow_input") {
            let ws_inputs = if s.has(ws, "inputs") {
                "ws.inputs"
            } else {
                "CAST(NULL AS TEXT)"
            };
            let (rcol, rval) = if s.has("workflow_input", "retention_timestamp") {
                (", retention_timestamp", ", $3")
            } else {
                ("", "")
            };
            let sql = format!(
                "INSERT INTO {wi} (workflow_uuid, inputs{rcol}) \
                 SELECT $2, COALESCE(wi.inputs, {ws_inputs}){rval} FROM {wst} ws \
                 LEFT JOIN {wi} wi ON wi.workflow_uuid = ws.workflow_uuid \
                 WHERE ws.workflow_uuid = $1",
                wi = s.t("workflow_input"),
                wst = s.t(ws),
            );
            let mut query = sqlx::query(&sql).bind(id).bind(new_id.as_str());
            if !rcol.is_empty() {
                query = query.bind(now);
            }
            query.execute(&mut *tx).await.map_err(&err)?;
        }

        if step > 1 {
            // Recorded operations, event history and streams before the start
            // step, every column copied as it is except the workflow id (and
            // the retention clock, which restarts).
            for table in ["operation_outputs", "workflow_events_history", "streams"] {
                if !s.has(table, "function_id") {
                    continue;
                }
                let cols = s.columns(table);
                let exprs: Vec<String> = cols
                    .iter()
                    .map(|c| match c.as_str() {
                        "workflow_uuid" => "$2".to_string(),
                        "retention_timestamp" => "$4".to_string(),
                        other => q(other),
                    })
                    .collect();
                let sql = format!(
                    "INSERT INTO {t} ({cols}) SELECT {exprs} FROM {t} \
                     WHERE workflow_uuid = $1 AND function_id < $3",
                    t = s.t(table),
                    cols = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", "),
                    exprs = exprs.join(", "),
                );
                let mut query = sqlx::query(&sql).bind(id).bind(new_id.as_str()).bind(step);
                if cols.iter().any(|c| c == "retention_timestamp") {
                    query = query.bind(now);
                }
                query.execute(&mut *tx).await.map_err(&err)?;
            }
            // The current value of each event: its latest write before the
            // start step.
            if s.has_table("workflow_events") && s.has("workflow_events_history", "function_id") {
                let ser = s.has("workflow_events", "serialization")
                    && s.has("workflow_events_history", "serialization");
                let (scol, sval) = if ser {
                    (", \"serialization\"", ", h.\"serialization\"")
                } else {
                    ("", "")
                };
                let sql = format!(
                    "INSERT INTO {we} (workflow_uuid, \"key\", \"value\"{scol}) \
                     SELECT $2, h.\"key\", h.\"value\"{sval} FROM {weh} h \
                     WHERE h.workflow_uuid = $1 AND h.function_id < $3 AND h.function_id = \
                     (SELECT MAX(h2.function_id) FROM {weh} h2 WHERE h2.workflow_uuid = $1 \
                      AND h2.\"key\" = h.\"key\" AND h2.function_id < $3)",
                    we = s.t("workflow_events"),
                    weh = s.t("workflow_events_history"),
                );
                sqlx::query(&sql)
                    .bind(id)
                    .bind(new_id.as_str())
                    .bind(step)
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
            }
        }
        tx.commit().await.map_err(&err)?;
        tracing::info!(
            database = %self.database,
            workflow_id = id,
            forked_id = %new_id,
            start_step,
            "forked workflow"
        );
        Ok(new_id)
    }
}
