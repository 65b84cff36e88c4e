//! The client against system databases written by the real DBOS library.
//!
//! A tiny Python DBOS app (`tests/fixtures/dbos_fixture.py`) runs in a
//! virtualenv with the pinned `dbos` release from PyPI (created once, cached
//! in `target/dbos-venvs/<version>`). It starts a workflow whose middle step
//! blocks, and is killed with SIGKILL there, so the database holds a PENDING
//! row of a known executor. Then every call of the client is checked against
//! what the library does next: a second process (another executor id, the
//! same version) must pick up what `reenqueue` re-enqueued and finish it
//! without re-running completed steps; cancel, resume and fork must be obeyed
//! by the library.
//!
//! Needs python3 with venv and PyPI (or a populated cache); fails, never
//! skips, when they are missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stead_dbos::{DbosError, SystemDb, WorkflowFilter, INTERNAL_QUEUE};

/// The current 3.x release, and the last 2.x (the one with the admin server).
const DBOS_3: &str = "3.4.0";
const DBOS_2: &str = "2.31.1";

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/dbos_fixture.py"
);

/// Serialises venv creation within this test process (other processes are
/// handled by building in a private folder and renaming it into place).
static VENV_LOCK: Mutex<()> = Mutex::new(());

fn venv_root() -> PathBuf {
    match std::env::var_os("STEAD_DBOS_VENVS") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/dbos-venvs"),
    }
}

/// The python of a virtualenv with `dbos==version`, created if missing.
fn venv_python(version: &str) -> PathBuf {
    let _guard = VENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = venv_root();
    let dir = root.join(version);
    let python = dir.join("bin/python");
    if dir.join("stead-ready").exists() {
        return python;
    }
    fs::create_dir_all(&root).unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    let tmp = root.join(format!("{version}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&tmp)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 (the stead-dbos tests need python3 with venv): {e}")
        });
    assert!(
        out.status.success(),
        "python3 -m venv failed (install python3-venv): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(tmp.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--quiet",
            &format!("dbos=={version}"),
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run pip: {e}"));
    assert!(
        out.status.success(),
        "cannot install dbos=={version} from PyPI into {} (is PyPI reachable?): {}{}",
        tmp.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(tmp.join("stead-ready"), version).expect("write the venv marker");
    // Another test process may have won the race; then use its venv.
    if fs::rename(&tmp, &dir).is_err() {
        let _ = fs::remove_dir_all(&tmp);
        assert!(
            dir.join("stead-ready").exists(),
            "cannot move the venv into {}",
            dir.display()
        );
    }
    python
}

/// A DBOS fixture process, killed when dropped.
struct App {
    child: Child,
    log: PathBuf,
}

impl App {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Env {
    python: PathBuf,
    /// The URL given to the app (SQLAlchemy's spelling).
    app_url: String,
    dir: PathBuf,
}

impl Env {
    fn events(&self) -> PathBuf {
        self.dir.join("events")
    }

    fn spawn(&self, executor: &str, version: &str, args: &[&str]) -> App {
        let log = self.dir.join(format!("{executor}-{}.log", args.join("-")));
        let out = fs::File::create(&log).expect("create the app log");
        let err = out.try_clone().expect("clone the log handle");
        let child = Command::new(&self.python)
            .arg(FIXTURE)
            .args(args)
            .env("DBOS_SYSTEM_DATABASE_URL", &self.app_url)
            .env("DBOS__VMID", executor)
            .env("DBOS__APPVERSION", version)
            .env("FIXTURE_EVENTS", self.events())
            .env("FIXTURE_GATES", &self.dir)
            .env("FIXTURE_LIFETIME", "120")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the DBOS fixture app");
        App { child, log }
    }

    fn open_gate(&self, workflow_id: &str) {
        fs::write(self.dir.join(workflow_id), b"go").expect("open the gate");
    }

    /// How many times `event` ("start"/"end") happened for this step.
    fn count(&self, event: &str, workflow_id: &str, step: u32) -> usize {
        fs::read_to_string(self.events())
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() == 4 && f[0] == event && f[1] == workflow_id && f[2] == step.to_string()
            })
            .count()
    }

    fn ran_on(&self, workflow_id: &str, step: u32) -> Vec<String> {
        fs::read_to_string(self.events())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.len() == 4 && f[0] == "start" && f[1] == workflow_id && f[2] == step.to_string())
                    .then(|| f[3].to_string())
            })
            .collect()
    }
}

/// Waits (bounded) until `check` holds; panics with `what` and the apps' logs.
async fn wait_for<F, Fut>(what: &str, apps: &[&App], timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs: Vec<String> = apps.iter().map(|a| a.log()).collect();
    panic!(
        "timed out after {timeout:?} waiting for {what}\napp logs:\n{}",
        logs.join("\n----\n")
    );
}

async fn status(db: &SystemDb, id: &str) -> String {
    match db.get_workflow(id).await {
        Ok(Some(w)) => w.status,
        Ok(None) => "<missing>".into(),
        Err(e) => format!("<error {e}>"),
    }
}

const WAIT: Duration = Duration::from_secs(60);

/// The whole story on one database written by one library version.
async fn scenario(lib_version: &str, app_url: String, our_url: String, dir: PathBuf) {
    let env = Env {
        python: venv_python(lib_version),
        app_url,
        dir,
    };

    // 1. An executor dies in the middle of step 2 of 3.
    let mut a = env.spawn("exec-a", "v1", &["start", "wf-main", "3", "2"]);
    wait_for("step 2 to start on exec-a", &[&a], WAIT, || async {
        env.count("start", "wf-main", 2) == 1
    })
    .await;
    a.kill();

    let db = SystemDb::connect(&our_url).await.expect("connect");
    assert_eq!(
        db.pending_executors().await.unwrap(),
        vec![("exec-a".to_string(), "v1".to_string(), 1)]
    );
    assert_eq!(db.count_active("v1").await.unwrap(), (1, 0));
    assert_eq!(db.count_active("v2").await.unwrap(), (0, 0));

    let w = db.get_workflow("wf-main").await.unwrap().expect("wf-main");
    assert_eq!(w.status, "PENDING");
    assert_eq!(w.executor_id.as_deref(), Some("exec-a"));
    assert_eq!(w.application_version.as_deref(), Some("v1"));
    assert!(w.name.contains("fixture_workflow"), "{w:?}");
    assert!(w.input.is_some(), "the input is stored: {w:?}");
    assert!(w.output.is_none() && w.error.is_none());
    assert!(w.created_at_ms > 0 && w.updated_at_ms >= w.created_at_ms);
    let listed = db
        .list_workflows(&WorkflowFilter {
            status: Some("PENDING".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed, vec![w.clone()]);
    let steps = db.steps("wf-main").await.unwrap();
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0].function_id, 1);
    assert!(steps[0].function_name.contains("fixture_step"), "{steps:?}");
    assert!(steps[0].output.is_some() && steps[0].error.is_none());
    assert!(db.steps("nope").await.unwrap().is_empty());
    assert!(db.get_workflow("nope").await.unwrap().is_none());

    // 2. Re-enqueue: only for the right version, and only once.
    assert!(db
        .reenqueue(&["exec-a".into()], "v2")
        .await
        .unwrap()
        .is_empty());
    assert!(db.reenqueue(&[], "v1").await.unwrap().is_empty());
    assert_eq!(
        db.reenqueue(&["exec-x".into(), "exec-a".into()], "v1")
            .await
            .unwrap(),
        vec!["wf-main".to_string()]
    );
    assert!(db
        .reenqueue(&["exec-a".into()], "v1")
        .await
        .unwrap()
        .is_empty());
    let w = db.get_workflow("wf-main").await.unwrap().expect("wf-main");
    assert_eq!(w.status, "ENQUEUED");
    assert_eq!(w.queue_name.as_deref(), Some(INTERNAL_QUEUE));
    assert_eq!(w.started_at_ms, None);
    assert_eq!(db.count_active("v1").await.unwrap(), (0, 1));
    assert!(db.pending_executors().await.unwrap().is_empty());

    // 3. Another executor of the same version picks it up, re-runs only the
    // interrupted step, and finishes it.
    let b = env.spawn("exec-b", "v1", &["worker"]);
    wait_for("exec-b to re-run step 2", &[&b], WAIT, || async {
        env.ran_on("wf-main", 2) == ["exec-a", "exec-b"]
    })
    .await;
    let w = db.get_workflow("wf-main").await.unwrap().expect("wf-main");
    assert_eq!(w.status, "PENDING");
    assert_eq!(w.executor_id.as_deref(), Some("exec-b"));
    assert_eq!(w.recovery_attempts, 2, "{w:?}");
    assert_eq!(
        db.pending_executors().await.unwrap(),
        vec![("exec-b".to_string(), "v1".to_string(), 1)]
    );
    // Repeating the recovery of the dead executor now matches nothing.
    assert!(db
        .reenqueue(&["exec-a".into()], "v1")
        .await
        .unwrap()
        .is_empty());
    env.open_gate("wf-main");
    wait_for("wf-main to succeed", &[&b], WAIT, || async {
        status(&db, "wf-main").await == "SUCCESS"
    })
    .await;
    assert_eq!(env.ran_on("wf-main", 1), ["exec-a"], "step 1 ran once");
    assert_eq!(env.ran_on("wf-main", 3), ["exec-b"]);
    let w = db.get_workflow("wf-main").await.unwrap().expect("wf-main");
    assert!(w.output.is_some(), "{w:?}");
    assert_eq!(db.count_active("v1").await.unwrap(), (0, 0));
    let steps = db.steps("wf-main").await.unwrap();
    assert_eq!(
        steps.iter().map(|s| s.function_id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // 4. Fork from the start, cancel it while it runs, resume it.
    let forked = db
        .fork("wf-main", 1, Some("wf-again".into()), Some("v1".into()))
        .await
        .unwrap();
    assert_eq!(forked, "wf-again");
    let w = db.get_workflow("wf-again").await.unwrap().expect("fork");
    assert_eq!(w.forked_from.as_deref(), Some("wf-main"));
    assert_eq!(
        w.input,
        db.get_workflow("wf-main").await.unwrap().unwrap().input
    );
    assert!(db.steps("wf-again").await.unwrap().is_empty());
    wait_for("the fork to reach step 2", &[&b], WAIT, || async {
        env.count("start", "wf-again", 2) == 1
    })
    .await;
    assert_eq!(
        env.ran_on("wf-again", 1),
        ["exec-b"],
        "a fork from 1 re-runs step 1"
    );
    db.cancel("wf-again").await.unwrap();
    db.cancel("wf-again").await.unwrap(); // idempotent
    assert_eq!(status(&db, "wf-again").await, "CANCELLED");
    assert_eq!(db.count_active("v1").await.unwrap(), (0, 0));
    env.open_gate("wf-again");
    wait_for("the cancelled step to end", &[&b], WAIT, || async {
        env.count("end", "wf-again", 2) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&db, "wf-again").await, "CANCELLED");
    assert_eq!(
        env.count("start", "wf-again", 3),
        0,
        "a cancelled workflow stops"
    );
    db.resume("wf-again").await.unwrap();
    let w = db.get_workflow("wf-again").await.unwrap().unwrap();
    assert!(
        w.status == "ENQUEUED" || w.status == "PENDING" || w.status == "SUCCESS",
        "{w:?}"
    );
    wait_for("the resumed fork to succeed", &[&b], WAIT, || async {
        status(&db, "wf-again").await == "SUCCESS"
    })
    .await;
    assert_eq!(env.ran_on("wf-again", 1), ["exec-b"], "resume keeps step 1");
    assert_eq!(env.count("start", "wf-again", 3), 1);

    // 5. Fork from step 3: steps 1 and 2 are copied, not run.
    let fork3 = db
        .fork("wf-main", 3, None, Some("v1".into()))
        .await
        .unwrap();
    assert_eq!(fork3.len(), 36, "a UUID: {fork3}");
    wait_for("the step-3 fork to succeed", &[&b], WAIT, || async {
        status(&db, &fork3).await == "SUCCESS"
    })
    .await;
    assert_eq!(env.count("start", &fork3, 1), 0);
    assert_eq!(env.count("start", &fork3, 2), 0);
    assert_eq!(env.ran_on(&fork3, 3), ["exec-b"]);
    let steps = db.steps(&fork3).await.unwrap();
    let main_steps = db.steps("wf-main").await.unwrap();
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert_eq!(steps[..2], main_steps[..2], "copied steps are the same");

    // 6. Bad requests.
    assert!(matches!(
        db.resume("wf-main").await,
        Err(DbosError::Finished { .. })
    ));
    assert!(matches!(
        db.cancel("wf-main").await,
        Err(DbosError::Finished { .. })
    ));
    assert!(matches!(
        db.cancel("nope").await,
        Err(DbosError::NotFound { .. })
    ));
    assert!(matches!(
        db.resume("nope").await,
        Err(DbosError::NotFound { .. })
    ));
    assert!(matches!(
        db.fork("nope", 1, None, None).await,
        Err(DbosError::NotFound { .. })
    ));
    assert!(matches!(
        db.fork("wf-main", 1, Some("wf-again".into()), None).await,
        Err(DbosError::AlreadyExists { .. })
    ));

    // 7. Listing: newest first, filters, paging.
    let all = db.list_workflows(&WorkflowFilter::default()).await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[2].id, "wf-main");
    assert!(all
        .windows(2)
        .all(|p| p[0].created_at_ms >= p[1].created_at_ms));
    let page = db
        .list_workflows(&WorkflowFilter {
            limit: Some(1),
            offset: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page, vec![all[2].clone()]);
    let skipped = db
        .list_workflows(&WorkflowFilter {
            offset: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(skipped, all[1..].to_vec());
    let by = db
        .list_workflows(&WorkflowFilter {
            status: Some("SUCCESS".into()),
            application_version: Some("v1".into()),
            name: Some(all[0].name.clone()),
            executor_id: Some("exec-b".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by.len(), 3);
    assert!(db
        .list_workflows(&WorkflowFilter {
            application_version: Some("v9".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
    drop(b);
}

fn sqlite_setup() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sys.sqlite");
    // SQLAlchemy's absolute form: four slashes.
    let url = format!("sqlite:///{}", path.display());
    (dir, url.clone(), url)
}

async fn postgres_setup() -> (stead_store::testing::PgGuard, String, String) {
    let guard = stead_store::testing::postgres_database().await;
    // SQLAlchemy only knows the `postgresql` scheme.
    let app_url = guard.url.replacen("postgres://", "postgresql://", 1);
    let ours = guard.url.clone();
    (guard, app_url, ours)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dbos3() {
    let (dir, app, ours) = sqlite_setup();
    scenario(DBOS_3, app, ours, dir.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dbos3() {
    let (_guard, app, ours) = postgres_setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    scenario(DBOS_3, app, ours, dir.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dbos2() {
    let (dir, app, ours) = sqlite_setup();
    scenario(DBOS_2, app, ours, dir.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dbos2() {
    let (_guard, app, ours) = postgres_setup().await;
    let dir = tempfile::tempdir().expect("tempdir");
    scenario(DBOS_2, app, ours, dir.path().to_path_buf()).await;
}

/// Before the app has run, or before it has created its tables, the
/// database is empty, not an error; and the client creates nothing.
#[tokio::test]
async fn empty_databases_read_as_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("never.sqlite");
    let blank = dir.path().join("blank.sqlite");
    fs::write(&blank, b"").expect("create an empty file");
    let pg = stead_store::testing::postgres_database().await;
    for url in [
        format!("sqlite:///{}", missing.display()),
        format!("sqlite:///{}", blank.display()),
        pg.url.clone(),
    ] {
        let db = SystemDb::connect(&url).await.expect("connect");
        assert!(db.pending_executors().await.unwrap().is_empty(), "{url}");
        assert_eq!(db.count_active("v1").await.unwrap(), (0, 0));
        assert!(db
            .list_workflows(&WorkflowFilter::default())
            .await
            .unwrap()
            .is_empty());
        assert!(db.get_workflow("x").await.unwrap().is_none());
        assert!(db.steps("x").await.unwrap().is_empty());
        assert!(db.reenqueue(&["a".into()], "v1").await.unwrap().is_empty());
        assert!(matches!(
            db.cancel("x").await,
            Err(DbosError::NotFound { .. })
        ));
        assert!(matches!(
            db.fork("x", 1, None, None).await,
            Err(DbosError::NotFound { .. })
        ));
    }
    assert!(!missing.exists(), "the client must not create the file");
    assert_eq!(fs::metadata(&blank).unwrap().len(), 0);
}

#[tokio::test]
async fn unreachable_and_malformed_urls_are_clear_errors() {
    let e = SystemDb::connect("sqlite:///relative/path.sqlite")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("sqlite:////relative/path.sqlite"), "{e}");
    let e = SystemDb::connect("postgresql://nobody:pw@127.0.0.1:1/db")
        .await
        .unwrap_err();
    assert!(matches!(e, DbosError::Connect { .. }), "{e}");
    assert!(!e.to_string().contains("pw@"), "password leaked: {e}");
}
