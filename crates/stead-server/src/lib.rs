//! The control plane: the /v1 HTTP API over the store.
//!
//! The server holds no state of its own beyond a temp folder for uploads in
//! flight: everything is in the store, so replicas behind a load balancer
//! (on PostgreSQL) are interchangeable and a restart loses nothing.

mod agent;
mod api;
mod auth;
pub mod autoscale;
mod dbos;
mod error;
mod metrics;
mod openapi;
mod peers;
pub mod placement;
mod scaling;
mod workflows;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;
use stead_store::Store;
use tokio::sync::Notify;

pub use dbos::{mask_password, AppDatabases};
pub use error::ApiError;
pub use openapi::openapi_json;

/// How the control plane runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub database_url: String,
    pub listen: SocketAddr,
    /// Temp uploads live here, and the secret key file `secret.key` (mode
    /// 0600, created if missing) unless `secret_key` is given.
    pub data_dir: PathBuf,
    pub secret_key: Option<[u8; 32]>,
    /// Where the secret key is kept when `secret_key` is not given; default
    /// `data_dir/secret.key`. Every replica on one database needs the same.
    pub secret_key_file: Option<PathBuf>,
    /// Base URL of a router in front of the apps, when known.
    pub router_url: Option<String>,
    /// Apps are served as `<app>.<domain>`.
    pub domain: String,
    /// A host whose last heartbeat is older than this is dead: no instances
    /// are placed on it and its endpoints leave the route table.
    pub host_timeout: Duration,
    /// How long a build claim lasts without renewal.
    pub build_lease: Duration,
    pub limits: stead_bundle::Limits,
    /// Largest blob (build artifact) an agent may upload.
    pub max_blob: u64,
    /// Where apps' databases are provisioned.
    pub app_databases: AppDatabases,
}

impl ServerConfig {
    pub fn new(database_url: String, listen: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            database_url,
            listen,
            data_dir: data_dir.clone(),
            secret_key: None,
            secret_key_file: None,
            router_url: None,
            domain: "localhost".to_string(),
            host_timeout: Duration::from_secs(30),
            build_lease: Duration::from_secs(30),
            limits: stead_bundle::Limits::default(),
            max_blob: 1024 * 1024 * 1024,
            app_databases: AppDatabases::Sqlite {
                dir: data_dir.join("appdb"),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] stead_store::StoreError),
    #[error("cannot listen on {addr}: {source}; is another server using that port?")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the data directory {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret key file {}: {message}", path.display())]
    SecretKey { path: PathBuf, message: String },
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub store: Store,
    pub config: Arc<ServerConfig>,
    /// Woken on every write a long-poll may be waiting for (build logs,
    /// build completion, instance logs); waiters then re-query.
    pub changes: Arc<Notify>,
    pub shutting_down: Arc<AtomicBool>,
    /// Open app system databases (a cache; nothing in it matters).
    pub pools: Arc<dbos::Pools>,
    /// This replica's name in leases and change notifications.
    pub replica: Arc<str>,
    /// Tells the other replicas (PostgreSQL NOTIFY) that something
    /// changed, so their long-polls wake too; `None` on SQLite (one
    /// replica).
    pub peers: Option<tokio::sync::mpsc::Sender<()>>,
    /// Unplaced instances last reported per app version, so that the
    /// event and warning are written when the shortfall changes, not on
    /// every heartbeat (a cache: a new replica reports once more).
    pub unplaced: Arc<std::sync::Mutex<std::collections::HashMap<placement::Key, u32>>>,
    /// Every host's intended state as last computed, under the store's
    /// revision (a cache: see `agent::Snapshot`).
    pub intended: Arc<tokio::sync::Mutex<Option<Arc<agent::Snapshot>>>>,
}

impl AppState {
    pub fn changed(&self) {
        self.changes.notify_waiters();
        if let Some(peers) = &self.peers {
            // Full means a notification is already pending: coalesced.
            let _ = peers.try_send(());
        }
    }
    pub fn uploads_dir(&self) -> PathBuf {
        self.config.data_dir.join("uploads")
    }
}

/// A bound, not yet serving, control plane.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
    addr: SocketAddr,
}

impl Server {
    /// Opens the store (migrating it), prepares the data directory and binds
    /// the listener, so that errors surface before `serve`.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let uploads = data_dir.join("uploads");
        // Uploads left by a crash are garbage: nothing refers to them.
        let _ = std::fs::remove_dir_all(&uploads);
        std::fs::create_dir_all(&uploads).map_err(|source| ServerError::DataDir {
            path: uploads.clone(),
            source,
        })?;
        let key = match config.secret_key {
            Some(k) => k,
            None => load_or_create_key(
                config
                    .secret_key_file
                    .as_deref()
                    .unwrap_or(&data_dir.join("secret.key")),
            )?,
        };
        let store = Store::connect(&config.database_url)
            .await?
            .with_secret_key(key);
        store.check_secret_key().await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        tracing::info!(%addr, database = store.database(), "control plane listening");
        Ok(Server {
            listener,
            state: AppState {
                store,
                config: Arc::new(config),
                changes: Arc::new(Notify::new()),
                shutting_down: Arc::new(AtomicBool::new(false)),
                pools: Arc::new(dbos::Pools::default()),
                replica: format!("r-{:016x}", rand::random::<u64>()).into(),
                peers: None,
                unplaced: Arc::default(),
                intended: Arc::default(),
            },
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// Serves until `shutdown` completes, then finishes requests in flight
    /// (long-polls return at once).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let mut state = self.state;
        let mut peer_tasks = Vec::new();
        if state.store.backend() == stead_store::Backend::Postgres {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            state.peers = Some(tx);
            peer_tasks.push(tokio::spawn(peers::notify_loop(state.clone(), rx)));
            peer_tasks.push(tokio::spawn(peers::listen_loop(state.clone())));
        }
        let router = router(state.clone());
        let flag = state.shutting_down.clone();
        let changes = state.changes.clone();
        let background = tokio::spawn(dbos::run_loop(state.clone(), state.pools.clone()));
        let autoscaler = tokio::spawn(scaling::run_loop(state.clone()));
        axum::serve(self.listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                flag.store(true, Ordering::SeqCst);
                changes.notify_waiters();
            })
            .await
            .map_err(ServerError::Serve)?;
        background.abort();
        autoscaler.abort();
        for t in peer_tasks {
            t.abort();
        }
        // Let another replica take the singleton work over at once.
        let _ = state.store.release_lease(dbos::LEASE, &state.replica).await;
        let _ = state
            .store
            .release_lease(scaling::LEASE, &state.replica)
            .await;
        Ok(())
    }
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], ServerError> {
    let err = |message: String| ServerError::SecretKey {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim()).map_err(|e| {
                err(format!(
                    "is not 64 hex characters ({e}); restore it from backup"
                ))
            })?;
            bytes.try_into().map_err(|_| {
                err("must hold 32 bytes as 64 hex characters; restore it from backup".into())
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key: [u8; 32] = rand::random();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(format!("cannot create it: {e}")))?;
            f.write_all(hex::encode(key).as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| err(format!("cannot write it: {e}")))?;
            tracing::info!(path = %path.display(), "created a new secret key; back it up, secrets cannot be read without it");
            Ok(key)
        }
        Err(e) => Err(err(format!("cannot read it: {e}"))),
    }
}

fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(api::health))
        .route("/openapi.json", get(openapi::serve_openapi))
        .route("/info", get(api::info))
        .route("/whoami", get(api::whoami))
        .route("/apps", get(api::list_apps))
        .route("/apps/{app}", get(api::get_app).delete(api::delete_app))
        .route("/apps/{app}/deploy", post(api::deploy))
        .route("/apps/{app}/versions", get(api::list_versions))
        .route("/apps/{app}/versions/{n}", get(api::get_version))
        .route("/apps/{app}/versions/{n}/build-log", get(api::build_log))
        .route("/apps/{app}/rollback", post(api::rollback))
        .route("/apps/{app}/env", get(api::list_env).put(api::set_env))
        .route("/apps/{app}/env/{key}", delete(api::unset_env))
        .route("/apps/{app}/logs", get(api::logs))
        .route("/apps/{app}/events", get(api::events))
        .route("/apps/{app}/database", get(workflows::database))
        .route("/apps/{app}/workflows", get(workflows::list))
        .route("/apps/{app}/workflows/{id}", get(workflows::get))
        .route("/apps/{app}/workflows/{id}/steps", get(workflows::steps))
        .route("/apps/{app}/workflows/{id}/cancel", post(workflows::cancel))
        .route("/apps/{app}/workflows/{id}/resume", post(workflows::resume))
        .route("/apps/{app}/workflows/{id}/fork", post(workflows::fork))
        .route(
            "/apps/{app}/rollouts",
            get(workflows::get_rollout).post(workflows::start_rollout),
        )
        .route("/agent/recovered", post(workflows::recovered))
        .route("/hosts", get(api::list_hosts))
        .route("/hosts/{host}/drain", post(api::drain_host))
        .route("/hosts/{host}/undrain", post(api::undrain_host))
        .route("/agent/register", post(agent::register))
        .route("/agent/heartbeat", post(agent::heartbeat))
        .route("/agent/builds/claim", post(agent::claim))
        .route("/agent/builds/{id}/renew", post(agent::renew))
        .route("/agent/builds/{id}/log", post(agent::append_log))
        .route("/agent/builds/{id}/complete", post(agent::complete))
        .route("/agent/logs", post(agent::instance_logs))
        .route("/blobs/{hash}", get(agent::get_blob).put(agent::put_blob))
        .route("/routes", get(scaling::routes))
        .route("/router/demand", post(scaling::demand))
        .route("/apps/{app}/scale", post(scaling::set_scale));
    Router::new()
        .nest("/v1", api)
        .route("/metrics", get(metrics::serve))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see GET /v1/openapi.json for the API",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method; see GET /v1/openapi.json",
            )
        })
        // JSON bodies (log batches, heartbeats) may be large but not unbounded;
        // bundles and blobs are streamed and limited by their own settings.
        .layer(DefaultBodyLimit::max(32 * 1024 * 1024))
        .layer(axum::middleware::from_fn(metrics::track))
        .with_state(state)
}
