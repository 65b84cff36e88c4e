//! Test support for this crate and its dependents: a fresh store on SQLite
//! (in a temp dir) or on PostgreSQL (a fresh database in `DATABASE_URL` /
//! `STEAD_TEST_DATABASE_URL`, or else in a throwaway cluster this process
//! starts once and shares between its tests).
//!
//! PostgreSQL missing is a test failure, never a skip: a suite that quietly
//! runs only half its backends would hide exactly the bugs it exists for.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use rand::RngCore;
use tempfile::TempDir;

use crate::Store;

/// A key for tests that touch secrets.
pub const TEST_SECRET_KEY: [u8; 32] = [42u8; 32];

/// A store on a fresh SQLite file; keep the `TempDir` alive while using it.
pub async fn sqlite_store() -> (Store, TempDir) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("cannot create a temp dir for the SQLite test store: {e}"),
    };
    let url = format!("sqlite://{}", dir.path().join("stead.db").display());
    match Store::connect(&url).await {
        Ok(s) => (s.with_secret_key(TEST_SECRET_KEY), dir),
        Err(e) => panic!("cannot open the SQLite test store {url}: {e}"),
    }
}

/// Keeps a test's PostgreSQL database alive; drops it (when it lives in an
/// external server) at the end of the test.
pub struct PgGuard {
    /// URL of the test's own database.
    pub url: String,
    admin_url: String,
    database: String,
    external: bool,
}

impl Drop for PgGuard {
    fn drop(&mut self) {
        if !self.external {
            // The throwaway cluster is deleted wholesale when the process ends.
            return;
        }
        let admin = self.admin_url.clone();
        let db = self.database.clone();
        // Drop runs outside any async context we could use; a short-lived
        // thread with its own runtime does the cleanup.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let _ =
                        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                            .execute(&mut c)
                            .await;
                }
            });
        })
        .join();
    }
}

impl PgGuard {
    /// URL of a superuser of the server (to provision app databases).
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }
}

/// A store on a fresh PostgreSQL database.
pub async fn postgres_store() -> (Store, PgGuard) {
    let guard = postgres_database().await;
    match Store::connect_timeout(&guard.url, Duration::from_secs(20)).await {
        Ok(s) => (s.with_secret_key(TEST_SECRET_KEY), guard),
        Err(e) => panic!("cannot open the PostgreSQL test store: {e}"),
    }
}

/// Creates a fresh, empty PostgreSQL database and returns its guard (for
/// tests that start a server on a URL rather than a `Store`).
pub async fn postgres_database() -> PgGuard {
    let (admin_url, external) =
        match std::env::var("STEAD_TEST_DATABASE_URL").or_else(|_| std::env::var("DATABASE_URL")) {
            Ok(url) if url.starts_with("postgres") => (url, true),
            _ => (cluster().admin_url.clone(), false),
        };
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    let database = format!("stead_test_{}", hex::encode(b));
    {
        use sqlx::Connection;
        let mut conn = match sqlx::PgConnection::connect(&admin_url).await {
            Ok(c) => c,
            Err(e) => panic!("cannot connect to the test PostgreSQL server at {admin_url}: {e}"),
        };
        if let Err(e) = sqlx::raw_sql(&format!("CREATE DATABASE \"{database}\""))
            .execute(&mut conn)
            .await
        {
            panic!("cannot create test database {database}: {e}");
        }
        let _ = conn.close().await;
    }
    PgGuard {
        url: with_database(&admin_url, &database),
        admin_url,
        database,
        external,
    }
}

/// Replaces the database name in a PostgreSQL URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A PostgreSQL cluster in a temp dir, started once per test process.
struct Cluster {
    admin_url: String,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| match start_cluster() {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is needed for the store tests and could not be started: {e}\n\
             Install it (`apt-get install -y postgresql`) or set STEAD_TEST_DATABASE_URL to a server you run."
        ),
    })
}

fn find_pg_bin(name: &str) -> Option<PathBuf> {
    if let Ok(dirs) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = dirs
            .flatten()
            .map(|d| d.path().join("bin").join(name))
            .collect();
        versions.sort();
        if let Some(p) = versions.into_iter().rev().find(|p| p.exists()) {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    })
}

fn is_root() -> bool {
    // Avoids a libc dependency: the effective uid is in /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Runs a PostgreSQL program, as the `postgres` OS user when we are root
/// (PostgreSQL refuses to run as root).
fn pg_command(bin: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn start_cluster() -> Result<Cluster, String> {
    let initdb =
        find_pg_bin("initdb").ok_or("initdb not found in /usr/lib/postgresql/*/bin or PATH")?;
    let pg_ctl =
        find_pg_bin("pg_ctl").ok_or("pg_ctl not found in /usr/lib/postgresql/*/bin or PATH")?;
    let root = is_root();
    // Kept, not deleted on drop: the watchdog below removes it once this
    // process has ended and the server is stopped.
    let dir = tempfile::Builder::new()
        .prefix("stead-pg-")
        .tempdir()
        .map_err(|e| format!("cannot create a temp dir: {e}"))?
        .keep();
    let data = dir.join("data");
    if root {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(&dir);
                c
            },
            "chown of the cluster dir to postgres (does the postgres user exist?)",
        )?;
    }
    let mut c = pg_command(&initdb, root);
    c.args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
    run(c, "initdb")?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))?
        .port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=300",
        dir.display()
    );
    let mut c = pg_command(&pg_ctl, root);
    c.arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("postgres.log"))
        .args(["-o", &opts, "-w", "-t", "60", "start"]);
    if let Err(e) = run(c, "pg_ctl start") {
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        return Err(format!("{e}\nserver log:\n{log}"));
    }
    // Statics are never dropped, so a watchdog stops the server and deletes
    // its files once this test process is gone.
    let stop = format!(
        "{} {} -D '{}' -m immediate stop",
        if root { "runuser -u postgres --" } else { "" },
        pg_ctl.display(),
        data.display()
    );
    let script = format!(
        "while [ -d /proc/{pid} ]; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the cluster watchdog: {e}"))?;
    Ok(Cluster {
        admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5/postgres", "x"),
            "postgres://u@h:5/x"
        );
        assert_eq!(with_database("postgres://u@h:5", "x"), "postgres://u@h:5/x");
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
