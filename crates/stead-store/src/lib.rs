//! The control plane's intended state in SQLite or PostgreSQL, through one code path.
//!
//! Everything goes through sqlx's `Any` driver so that the embedded default
//! (SQLite) and the multi-replica setup (PostgreSQL) run the very same queries:
//! a feature that works on one works on the other, and every test runs on both.
//! To keep that true the schema uses only types `Any` decodes the same way on
//! both backends: 64-bit integers (timestamps are epoch milliseconds, flags are
//! 0/1), text and bytes.

mod apps;
mod builds;
mod crypto;
mod dbos;
mod hosts;
mod migrate;
mod replicas;
mod scale;
mod tokens;

#[cfg(feature = "testing")]
pub mod testing;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

pub use apps::{AppRecord, DeployOutcome, NewVersion};
pub use builds::{ClaimedTask, CompleteOutcome};
pub use dbos::{AppDatabase, DeadExecutor, Rollout, RolloutStep, VersionWork};
pub use hosts::{
    observed_digest, ActiveApp, HeartbeatOutcome, HostRecord, PlacementHost, PlacementInputs,
    PlacementInstance,
};
pub use scale::{
    DemandKind, DemandSample, NewDemand, ScaleApp, ScaleInputs, ScaleStateRow, DEMAND_RETENTION,
};
pub use tokens::{hash_token, looks_like_token, Principal};

/// Which database the store talks to; only migrations and connection setup
/// differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("could not connect to the database {database} within {waited_s} s: {message}; check that it is running and that the URL is right")]
    Unavailable {
        database: String,
        waited_s: u64,
        message: String,
    },
    #[error(
        "unsupported database URL {0:?}: use sqlite:///path/to/file.db or postgres://user@host/db"
    )]
    BadUrl(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration {version} failed: {message}")]
    Migration { version: i64, message: String },
    #[error(
        "the app name {0:?} is taken by another organisation; choose another name in stead.toml"
    )]
    NameTaken(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no secret key was given to the store, so secrets cannot be read or written")]
    NoSecretKey,
    #[error("this database's secrets were encrypted with another secret key: start every control-plane replica with the same key (--secret-key-file, the first replica's secret.key)")]
    KeyMismatch,
    #[error("could not decrypt secret {key:?}: the secret key is not the one it was written with")]
    Decrypt { key: String },
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
}

impl StoreError {
    /// Errors that a fresh attempt of the same transaction may not hit:
    /// SQLite lock contention and PostgreSQL serialisation or uniqueness
    /// races between concurrent writers.
    fn is_retryable(&self) -> bool {
        let StoreError::Db(sqlx::Error::Database(db)) = self else {
            return false;
        };
        let code = db.code().map(|c| c.to_string()).unwrap_or_default();
        matches!(
            code.as_str(),
            // SQLite: BUSY, LOCKED, BUSY_SNAPSHOT; constraint violations from races.
            "5" | "6" | "517" | "2067" | "1555"
            // PostgreSQL: unique_violation, serialization_failure, deadlock_detected.
            | "23505" | "40001" | "40P01"
        ) || db.message().contains("database is locked")
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Handle on the intended state; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    database: String,
    secret_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// How long `connect` keeps retrying a database that does not answer.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl Store {
    /// Connects (retrying for [`DEFAULT_CONNECT_TIMEOUT`]) and migrates.
    pub async fn connect(url: &str) -> Result<Store> {
        Self::connect_timeout(url, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// Connects, retrying with backoff for at most `timeout` because a
    /// control plane usually starts alongside its database, then migrates.
    pub async fn connect_timeout(url: &str, timeout: Duration) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url) = normalise_url(url)?;
        let database = redact_url(&url);
        let is_sqlite = backend == Backend::Sqlite;
        let options = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 4 } else { 10 })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if is_sqlite {
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA busy_timeout = 10000",
                            "PRAGMA foreign_keys = ON",
                            "PRAGMA synchronous = NORMAL",
                        ] {
                            sqlx::Executor::execute(&mut *conn, pragma).await?;
                        }
                    }
                    Ok(())
                })
            });
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        // Probe with a single connection first so each attempt is bounded by
        // the time left (a pool would wait out its whole acquire timeout).
        loop {
            let left = timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(100));
            let attempt = tokio::time::timeout(
                left,
                <sqlx::AnyConnection as sqlx::Connection>::connect(&url),
            )
            .await;
            let error = match attempt {
                Ok(Ok(conn)) => {
                    let _ = sqlx::Connection::close(conn).await;
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            // A SQLite file that cannot be opened will not get better by waiting.
            if is_sqlite || started.elapsed() + delay > timeout {
                return Err(StoreError::Unavailable {
                    database,
                    waited_s: started.elapsed().as_secs(),
                    message: error,
                });
            }
            tracing::warn!(database = %database, error = %error, "database not reachable yet; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        let pool = options
            .connect(&url)
            .await
            .map_err(|e| StoreError::Unavailable {
                database: database.clone(),
                waited_s: started.elapsed().as_secs(),
                message: e.to_string(),
            })?;
        let store = Store {
            pool,
            backend,
            database,
            secret_key: None,
        };
        migrate::run(&store).await?;
        Ok(store)
    }

    /// The key secrets are encrypted under; without it secret env vars
    /// cannot be set or read.
    pub fn with_secret_key(mut self, key: [u8; 32]) -> Store {
        self.secret_key = Some(key);
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The database URL without its password, for messages and `/v1/info`.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The underlying pool, for tests that look at rows directly.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Runs `f` again while it fails with a transient contention error: SQLite
    /// allows one writer at a time and PostgreSQL reports races between
    /// concurrent transactions as errors, and both are resolved by retrying
    /// the whole transaction.
    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0u32;
        loop {
            match f().await {
                Err(e) if e.is_retryable() && attempt < 20 => {
                    attempt += 1;
                    tracing::debug!(what, attempt, error = %e, "retrying transaction");
                    let jitter = u64::from(rand::random::<u8>() % 20);
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt) + jitter))
                        .await;
                }
                other => return other,
            }
        }
    }
}

/// Current time in epoch milliseconds, the unit of every timestamp column.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn normalise_url(url: &str) -> Result<(Backend, String)> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let (path_part, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        if path_part.is_empty() {
            return Err(StoreError::BadUrl(url.to_string()));
        }
        if path_part != ":memory:" {
            if let Some(parent) = std::path::Path::new(path_part).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| StoreError::Unavailable {
                        database: url.to_string(),
                        waited_s: 0,
                        message: format!("cannot create directory {}: {e}", parent.display()),
                    })?;
                }
            }
        }
        let mut out = format!("sqlite://{path_part}");
        match query {
            Some(q) if q.contains("mode=") => out.push_str(&format!("?{q}")),
            Some(q) => out.push_str(&format!("?{q}&mode=rwc")),
            None => out.push_str("?mode=rwc"),
        }
        Ok((Backend::Sqlite, out))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok((Backend::Postgres, url.to_string()))
    } else {
        Err(StoreError::BadUrl(url.to_string()))
    }
}

/// Hides the password of a URL so it can be logged and shown.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let tail = tail.split('?').next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}{tail}")
        }
        None => format!("{scheme}://{authority}{tail}"),
    }
}

// ------------------------------------------------------------ row helpers

fn get_i64(row: &AnyRow, col: &str) -> Result<i64> {
    Ok(row.try_get::<i64, _>(col)?)
}

fn get_opt_i64(row: &AnyRow, col: &str) -> Result<Option<i64>> {
    Ok(row.try_get::<Option<i64>, _>(col)?)
}

fn get_str(row: &AnyRow, col: &str) -> Result<String> {
    Ok(row.try_get::<String, _>(col)?)
}

fn get_opt_str(row: &AnyRow, col: &str) -> Result<Option<String>> {
    Ok(row.try_get::<Option<String>, _>(col)?)
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// Appends one event to an app's history inside the caller's transaction;
/// the per-app counter row lock makes sequence order equal commit order, so
/// a reader paging with `after=SEQ` never skips an event.
async fn insert_event(
    conn: &mut sqlx::AnyConnection,
    app_id: i64,
    kind: &str,
    message: &str,
    data: serde_json::Value,
) -> Result<()> {
    let row =
        sqlx::query("UPDATE apps SET event_seq = event_seq + 1 WHERE id = $1 RETURNING event_seq")
            .bind(app_id)
            .fetch_one(&mut *conn)
            .await?;
    let seq = get_i64(&row, "event_seq")?;
    sqlx::query(
        "INSERT INTO events (app_id, seq, ts, kind, message, data) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(app_id)
    .bind(seq)
    .bind(now_ms())
    .bind(kind)
    .bind(message)
    .bind(data.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised() {
        let (b, u) = normalise_url("sqlite:///tmp/x/a.db").unwrap();
        assert_eq!(b, Backend::Sqlite);
        assert_eq!(u, "sqlite:///tmp/x/a.db?mode=rwc");
        let (_, u) = normalise_url("sqlite://rel.db").unwrap();
        assert_eq!(u, "sqlite://rel.db?mode=rwc");
        assert!(normalise_url("mysql://x").is_err());
        assert_eq!(
            normalise_url("postgres://u:p@h/db").unwrap().0,
            Backend::Postgres
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(redact_url("sqlite:///a/b.db?mode=rwc"), "sqlite:///a/b.db");
    }
}
