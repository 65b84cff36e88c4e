//! Build tasks: claim, build in a sandbox, upload the result.
//!
//! A version is built in `apps/<app>/v<N>/`, the same path its instances
//! run from on every host, because build outputs are not always relocatable
//! (a Python virtualenv records its absolute path). The built folder is
//! packed as an artifact and stored by the control plane, so any host can
//! fetch and unpack it to the same place.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stead_api::{
    BuildComplete, BuildLogAppend, BuildTask, ClaimRequest, ClaimResponse, LeaseRequest, LogStream,
    NewLogLine,
};
use stead_bundle::{Limits, PackOptions, Policy};
use stead_sandbox::{NetworkMode, Output, SandboxSpec};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use crate::{now_ms, Shared};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Failed(String),
    #[error("control plane: {0}")]
    Client(#[from] crate::ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Bundle(#[from] stead_bundle::BundleError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// Where this host keeps an app's `[build] cache` folders between builds.
fn build_cache_dir(shared: &Shared, app: &str) -> PathBuf {
    shared.config.data_dir.join("cache").join("build").join(app)
}

/// Copies a cached folder into the build folder before the build (only
/// when the bundle does not bring that folder itself). A cache is only an
/// optimisation: any failure is logged and the build goes on without it.
async fn restore_cache(
    cache_root: &Path,
    dir: &Path,
    path: &str,
    log: &mpsc::UnboundedSender<NewLogLine>,
) {
    if !stead_api::config::is_cache_path(path) {
        return;
    }
    let (src, dst) = (cache_root.join(path), dir.join(path));
    if !src.is_dir() || dst.exists() {
        return;
    }
    if let Some(parent) = dst.parent() {
        let _ = tokio::fs::create_dir_all(parent).await;
    }
    let started = std::time::Instant::now();
    match copy_tree(&src, &dst).await {
        Ok(()) => {
            let _ = log.send(system_line(format!(
                "restored build cache {path} ({} ms)",
                started.elapsed().as_millis()
            )));
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&dst).await;
            let _ = log.send(system_line(format!(
                "could not restore build cache {path}: {e}; building without it"
            )));
        }
    }
}

/// Keeps a folder of a successful build for the app's next build: copied
/// aside, then swapped in, so a crash mid-way leaves the old cache or the
/// new one, never half of one.
async fn save_cache(
    cache_root: &Path,
    dir: &Path,
    path: &str,
    log: &mpsc::UnboundedSender<NewLogLine>,
) {
    if !stead_api::config::is_cache_path(path) {
        return;
    }
    let src = dir.join(path);
    if !src.is_dir() {
        return;
    }
    let dst = cache_root.join(path);
    let Some(parent) = dst.parent() else { return };
    if let Err(e) = tokio::fs::create_dir_all(parent).await {
        let _ = log.send(system_line(format!(
            "could not save build cache {path}: {e}"
        )));
        return;
    }
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let fresh = parent.join(format!(".{name}.new-{:08x}", rand::random::<u32>()));
    let old = parent.join(format!(".{name}.old-{:08x}", rand::random::<u32>()));
    let started = std::time::Instant::now();
    let result = async {
        copy_tree(&src, &fresh).await?;
        if dst.exists() {
            tokio::fs::rename(&dst, &old)
                .await
                .map_err(|e| e.to_string())?;
        }
        tokio::fs::rename(&fresh, &dst)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&old).await;
    match result {
        Ok(()) => {
            let _ = log.send(system_line(format!(
                "saved build cache {path} ({} ms)",
                started.elapsed().as_millis()
            )));
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&fresh).await;
            let _ = log.send(system_line(format!(
                "could not save build cache {path}: {e}"
            )));
        }
    }
}

/// `cp -a` (with reflinks where the filesystem has them): keeps modes,
/// times and symlinks as they are, which a build cache needs (cargo
/// compares modification times).
async fn copy_tree(src: &Path, dst: &Path) -> Result<(), String> {
    let out = tokio::process::Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg(src)
        .arg(dst)
        .output()
        .await
        .map_err(|e| format!("running cp: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cp {} {}: {}",
            src.display(),
            dst.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub(crate) fn version_dir(shared: &Shared, app: &str, version: u32) -> PathBuf {
    shared.apps_dir().join(app).join(format!("v{version}"))
}

fn marker(shared: &Shared, app: &str, version: u32) -> PathBuf {
    shared
        .apps_dir()
        .join(app)
        .join(format!("v{version}.artifact"))
}

pub(crate) async fn build_loop(shared: Arc<Shared>) {
    let req = ClaimRequest {
        host_id: shared.host_id.clone(),
        session: shared.session.clone(),
    };
    loop {
        match shared
            .client
            .post::<_, ClaimResponse>("/v1/agent/builds/claim", &req)
            .await
        {
            Ok(ClaimResponse { task: Some(task) }) => {
                run_task(&shared, task).await;
                continue;
            }
            Ok(ClaimResponse { task: None }) => {}
            Err(e) => {
                tracing::debug!(host = %shared.config.name, error = %e, "claiming a build failed")
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run_task(shared: &Arc<Shared>, task: BuildTask) {
    tracing::info!(app = %task.app, version = task.version, build = task.id, host = %shared.config.name, attempt = task.attempt, "build started");
    let (log_tx, log_rx) = mpsc::unbounded_channel::<NewLogLine>();
    let sender = tokio::spawn(send_logs(shared.clone(), task.id, log_rx));
    // Keep the lease while we work; losing it means another agent owns the
    // task now and our result would be refused.
    let renewer = {
        let shared = shared.clone();
        let id = task.id;
        tokio::spawn(async move {
            let req = LeaseRequest {
                host_id: shared.host_id.clone(),
                session: shared.session.clone(),
            };
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Err(e) = shared
                    .client
                    .post::<_, serde_json::Value>(&format!("/v1/agent/builds/{id}/renew"), &req)
                    .await
                {
                    tracing::warn!(build = id, error = %e, "renewing the build lease failed");
                }
            }
        })
    };
    let result = build(shared, &task, &log_tx).await;
    renewer.abort();
    let complete = match &result {
        Ok(hash) => {
            let _ = log_tx.send(system_line(format!(
                "build of {} v{} succeeded",
                task.app, task.version
            )));
            BuildComplete {
                host_id: shared.host_id.clone(),
                session: shared.session.clone(),
                artifact_hash: Some(hash.clone()),
                error: None,
            }
        }
        Err(e) => {
            let _ = log_tx.send(system_line(format!("build failed: {e}")));
            BuildComplete {
                host_id: shared.host_id.clone(),
                session: shared.session.clone(),
                artifact_hash: None,
                error: Some(e.to_string()),
            }
        }
    };
    drop(log_tx);
    let _ = sender.await;
    // The result must reach the control plane; retry while it is away.
    for attempt in 0..120 {
        match shared
            .client
            .post::<_, serde_json::Value>(
                &format!("/v1/agent/builds/{}/complete", task.id),
                &complete,
            )
            .await
        {
            Ok(_) => break,
            Err(e) if e.status().is_some_and(|s| (400..500).contains(&s)) => {
                tracing::warn!(build = task.id, error = %e, "control plane refused the build result");
                break;
            }
            Err(e) => {
                tracing::warn!(build = task.id, attempt, error = %e, "reporting the build result failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    match result {
        Ok(_) => {
            tracing::info!(app = %task.app, version = task.version, build = task.id, "build succeeded")
        }
        Err(e) => {
            tracing::warn!(app = %task.app, version = task.version, build = task.id, error = %e, "build failed")
        }
    }
}

fn system_line(line: String) -> NewLogLine {
    NewLogLine {
        ts_ms: now_ms(),
        stream: LogStream::System,
        line,
    }
}

async fn send_logs(shared: Arc<Shared>, id: i64, mut rx: mpsc::UnboundedReceiver<NewLogLine>) {
    let path = format!("/v1/agent/builds/{id}/log");
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut lines = vec![first];
        // Batch what arrives within a short window.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        while lines.len() < 500 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(l)) => lines.push(l),
                _ => break,
            }
        }
        let body = BuildLogAppend {
            host_id: shared.host_id.clone(),
            session: shared.session.clone(),
            lines,
        };
        for _ in 0..10 {
            match shared
                .client
                .post::<_, serde_json::Value>(&path, &body)
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(build = id, error = %e, "sending build log failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

async fn build(
    shared: &Arc<Shared>,
    task: &BuildTask,
    log: &mpsc::UnboundedSender<NewLogLine>,
) -> Result<String, BuildError> {
    let dir = version_dir(shared, &task.app, task.version);
    let _ = log.send(system_line(format!(
        "building {} v{} on host {} (attempt {})",
        task.app, task.version, shared.config.name, task.attempt
    )));
    // A previous attempt may have left a partial folder.
    if dir.exists() {
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(io(format!("clearing {}", dir.display())))?;
    }
    let _ = tokio::fs::remove_file(marker(shared, &task.app, task.version)).await;
    let bundle = shared
        .tmp_dir()
        .join(format!("bundle-{}-{}", task.id, &task.bundle_hash));
    shared
        .client
        .download_blob(&task.bundle_hash, &bundle)
        .await?;
    let unpack_to = dir.clone();
    let bundle2 = bundle.clone();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&bundle2)?;
        stead_bundle::unpack(f, &unpack_to, Policy::Bundle, &Limits::default())
            .map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| BuildError::Failed(format!("unpacking the bundle panicked: {e}")))?
    .map_err(io("unpacking the bundle"))?;
    let _ = tokio::fs::remove_file(&bundle).await;

    let mut env = crate::instance::base_env();
    for key in ["HOME"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_string(), v);
        }
    }
    env.extend(task.env.clone());
    env.insert("DBOS__APPVERSION".into(), task.version.to_string());
    env.insert("DBOS__APPID".into(), task.app_id.clone());
    env.insert("DBOS_APP_NAME".into(), task.app.clone());
    // Package caches shared by all builds on this host: a rebuild of the
    // same requirements downloads nothing.
    let cache = shared.config.data_dir.join("cache");
    env.insert(
        "PIP_CACHE_DIR".into(),
        cache.join("pip").display().to_string(),
    );
    env.insert(
        "npm_config_cache".into(),
        cache.join("npm").display().to_string(),
    );
    env.insert("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into());

    let cache_root = build_cache_dir(shared, &task.app);
    for path in &task.cache {
        restore_cache(&cache_root, &dir, path, log).await;
    }

    let setup = language_steps(task.language.as_deref(), &dir);
    if task.language.as_deref() == Some("python") {
        // Build and migration commands run with the virtualenv active, as
        // DBOS Cloud does.
        let venv = dir.join(".venv");
        let path = env.get("PATH").cloned().unwrap_or_default();
        env.insert(
            "PATH".into(),
            format!("{}:{path}", venv.join("bin").display()),
        );
        env.insert("VIRTUAL_ENV".into(), venv.display().to_string());
    }
    let steps = setup
        .iter()
        .map(|c| ("setup", c))
        .chain(task.build.iter().map(|c| ("build", c)))
        .chain(task.migrate.iter().map(|c| ("migration", c)));
    for (n, (kind, command)) in steps.enumerate() {
        let _ = log.send(system_line(format!("$ {command}")));
        let spec = SandboxSpec {
            // Unique per attempt: several platforms may share one host.
            id: format!("build-{}-{}-{:08x}", task.id, n, rand::random::<u32>()),
            cwd: dir.clone(),
            command: command.clone(),
            env: env.clone(),
            memory_mb: shared.config.build_memory_mb.max(task.memory_mb),
            pids_max: 16384,
            stdout: Output::Pipe,
            stderr: Output::Pipe,
            network: NetworkMode::Host,
            // Builds keep the host's root and network (package registries,
            // toolchains); instances are the confined ones.
            cpu_millis: None,
            confine: None,
            backend: stead_sandbox::Backend::Process,
        };
        let mut process =
            shared.sandbox.spawn(spec).await.map_err(|e| {
                BuildError::Failed(format!("could not start the {kind} sandbox: {e}"))
            })?;
        let tail = Arc::new(std::sync::Mutex::new(
            std::collections::VecDeque::<String>::new(),
        ));
        let mut readers = Vec::new();
        if let Some(out) = process.take_stdout() {
            readers.push(tokio::spawn(pump(
                out,
                LogStream::Stdout,
                log.clone(),
                tail.clone(),
            )));
        }
        if let Some(err) = process.take_stderr() {
            readers.push(tokio::spawn(pump(
                err,
                LogStream::Stderr,
                log.clone(),
                tail.clone(),
            )));
        }
        let info = process.wait().await;
        for r in readers {
            let _ = r.await;
        }
        let _ = process.stop(Duration::from_millis(100)).await;
        if info.code != Some(0) {
            let last: Vec<String> = tail
                .lock()
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default();
            let mut msg = format!("{kind} command `{command}` {}", info.description);
            if !last.is_empty() {
                msg.push_str(":\n");
                msg.push_str(&last.join("\n"));
            }
            return Err(BuildError::Failed(msg));
        }
    }

    for path in &task.cache {
        save_cache(&cache_root, &dir, path, log).await;
    }

    let _ = log.send(system_line("packing the build".into()));
    let artifact = shared
        .tmp_dir()
        .join(format!("artifact-{}.tar.zst", task.id));
    let (src, dst) = (dir.clone(), artifact.clone());
    let stats =
        tokio::task::spawn_blocking(move || -> Result<stead_bundle::PackStats, BuildError> {
            let f =
                std::fs::File::create(&dst).map_err(io(format!("creating {}", dst.display())))?;
            let opts = PackOptions {
                default_excludes: false,
                honour_steadignore: false,
            };
            Ok(stead_bundle::pack_dir(
                &src,
                &opts,
                std::io::BufWriter::new(f),
                &mut |_, _| {},
            )?)
        })
        .await
        .map_err(|e| BuildError::Failed(format!("packing panicked: {e}")))??;
    let _ = log.send(system_line(format!(
        "uploading the build: {} files, {} bytes compressed",
        stats.files, stats.compressed_bytes
    )));
    shared.client.upload_blob(&stats.sha256, &artifact).await?;
    let _ = tokio::fs::remove_file(&artifact).await;
    tokio::fs::write(marker(shared, &task.app, task.version), &stats.sha256)
        .await
        .map_err(io("recording the artifact"))?;
    Ok(stats.sha256)
}

async fn pump(
    reader: impl AsyncRead + Unpin,
    stream: LogStream,
    log: mpsc::UnboundedSender<NewLogLine>,
    tail: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(mut t) = tail.lock() {
            if t.len() >= 20 {
                t.pop_front();
            }
            t.push_back(line.clone());
        }
        let _ = log.send(NewLogLine {
            ts_ms: now_ms(),
            stream,
            line,
        });
    }
}

/// Makes sure version `version` of `app` is unpacked at its folder, fetching
/// the artifact from the control plane when this host did not build it.
pub(crate) async fn ensure_artifact(
    shared: &Arc<Shared>,
    app: &str,
    version: u32,
    hash: &str,
) -> Result<PathBuf, BuildError> {
    let dir = version_dir(shared, app, version);
    let mark = marker(shared, app, version);
    if let Ok(existing) = tokio::fs::read_to_string(&mark).await {
        if existing.trim() == hash && dir.is_dir() {
            return Ok(dir);
        }
    }
    // Serialise concurrent starts of the same version on one lock.
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = LOCK.lock().await;
    if let Ok(existing) = tokio::fs::read_to_string(&mark).await {
        if existing.trim() == hash && dir.is_dir() {
            return Ok(dir);
        }
    }
    let file = shared.tmp_dir().join(format!("artifact-{hash}"));
    shared.client.download_blob(hash, &file).await?;
    let got = stead_bundle::sha256_file(&file).map_err(io("hashing the artifact"))?;
    if got != hash {
        let _ = tokio::fs::remove_file(&file).await;
        return Err(BuildError::Failed(format!(
            "artifact of {app} v{version} is corrupt: expected sha256 {hash}, got {got}"
        )));
    }
    if dir.exists() {
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(io(format!("clearing {}", dir.display())))?;
    }
    let (f2, d2) = (file.clone(), dir.clone());
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&f2)?;
        stead_bundle::unpack(f, &d2, Policy::Artifact, &Limits::default())
            .map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| BuildError::Failed(format!("unpacking panicked: {e}")))?
    .map_err(io("unpacking the artifact"))?;
    let _ = tokio::fs::remove_file(&file).await;
    tokio::fs::write(&mark, hash)
        .await
        .map_err(io("recording the artifact"))?;
    Ok(dir)
}

/// The language's own install steps, run before the app's build commands:
/// a virtualenv with `requirements.txt` for Python, `npm ci` (and the
/// `build` script when there is one) for Node.
fn language_steps(language: Option<&str>, dir: &std::path::Path) -> Vec<String> {
    match language {
        Some("python") => {
            let mut steps = vec!["python3 -m venv .venv".to_string()];
            if dir.join("requirements.txt").is_file() {
                steps.push(".venv/bin/pip install -r requirements.txt".to_string());
            }
            steps
        }
        Some("node") | Some("typescript") => {
            let mut steps = Vec::new();
            if dir.join("package-lock.json").is_file() {
                steps.push("npm ci".to_string());
            } else if dir.join("package.json").is_file() {
                steps.push("npm install".to_string());
            }
            let has_build = std::fs::read(dir.join("package.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["scripts"]["build"].is_string());
            if has_build {
                steps.push("npm run build".to_string());
            }
            steps
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(rx: &mut mpsc::UnboundedReceiver<NewLogLine>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(l) = rx.try_recv() {
            out.push(l.line);
        }
        out
    }

    /// A cached folder goes into the next build (times and modes kept, so
    /// cargo trusts it), a build that brings the folder keeps its own, and
    /// saving replaces the cache whole.
    #[tokio::test]
    async fn build_cache_is_restored_and_saved() {
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("cache");
        let (tx, mut rx) = mpsc::unbounded_channel();
        // First build: nothing cached yet; its target is saved.
        let v1 = root.path().join("v1");
        std::fs::create_dir_all(v1.join("target/release")).unwrap();
        std::fs::write(v1.join("target/release/app"), b"binary 1").unwrap();
        restore_cache(&cache, &v1, "target", &tx).await;
        assert!(lines(&mut rx).is_empty(), "nothing to restore");
        save_cache(&cache, &v1, "target", &tx).await;
        assert!(lines(&mut rx)[0].starts_with("saved build cache target"));
        let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(
            mtime(&cache.join("target/release/app")),
            mtime(&v1.join("target/release/app")),
            "modification times are kept"
        );
        // Second build: restored before it runs.
        let v2 = root.path().join("v2");
        std::fs::create_dir_all(&v2).unwrap();
        restore_cache(&cache, &v2, "target", &tx).await;
        assert!(lines(&mut rx)[0].starts_with("restored build cache target"));
        assert_eq!(
            std::fs::read(v2.join("target/release/app")).unwrap(),
            b"binary 1"
        );
        // Its result replaces the cache, with nothing of the old one left.
        std::fs::remove_file(v2.join("target/release/app")).unwrap();
        std::fs::write(v2.join("target/release/app2"), b"binary 2").unwrap();
        save_cache(&cache, &v2, "target", &tx).await;
        assert!(!cache.join("target/release/app").exists());
        assert_eq!(
            std::fs::read(cache.join("target/release/app2")).unwrap(),
            b"binary 2"
        );
        let strays: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "target")
            .collect();
        assert!(strays.is_empty(), "no temporary folders left: {strays:?}");
        assert!(lines(&mut rx)[0].starts_with("saved build cache target"));
        // A bundle that brings the folder keeps its own.
        let v3 = root.path().join("v3");
        std::fs::create_dir_all(v3.join("target")).unwrap();
        std::fs::write(v3.join("target/mine"), b"x").unwrap();
        restore_cache(&cache, &v3, "target", &tx).await;
        assert!(!v3.join("target/release").exists());
        // Paths that leave the folders are ignored, whatever the config said.
        restore_cache(&cache, &v3, "../v1", &tx).await;
        save_cache(&cache, &v3, "../escape", &tx).await;
        assert!(!root.path().join("escape").exists());
        assert!(lines(&mut rx).is_empty());
    }

    #[test]
    fn python_gets_a_virtualenv_with_its_requirements() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            language_steps(Some("python"), d.path()),
            vec!["python3 -m venv .venv"]
        );
        std::fs::write(d.path().join("requirements.txt"), "dbos\n").unwrap();
        assert_eq!(
            language_steps(Some("python"), d.path()),
            vec![
                "python3 -m venv .venv",
                ".venv/bin/pip install -r requirements.txt"
            ]
        );
    }

    #[test]
    fn node_gets_npm_ci_and_build_when_there_is_a_build_script() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("package.json"),
            r#"{"scripts":{"build":"tsc"}}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("package-lock.json"), "{}").unwrap();
        assert_eq!(
            language_steps(Some("node"), d.path()),
            vec!["npm ci", "npm run build"]
        );
        std::fs::write(d.path().join("package.json"), r#"{"scripts":{}}"#).unwrap();
        assert_eq!(language_steps(Some("node"), d.path()), vec!["npm ci"]);
        assert!(language_steps(None, d.path()).is_empty());
    }
}
