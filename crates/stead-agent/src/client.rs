//! The agent's view of the control plane: its HTTP API with a host token,
//! failing over across the listed server URLs. The agent never touches the
//! platform's database directly, so a host needs no database credentials.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use stead_api::ErrorBody;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control plane at {url} is unreachable: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("control plane answered {status} to {what}: {message}")]
    Api {
        what: String,
        status: u16,
        message: String,
    },
    #[error("unexpected answer from the control plane to {what}: {source}")]
    Decode {
        what: String,
        source: reqwest::Error,
    },
    #[error("i/o error while {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl ClientError {
    /// Conflicts (a lease lost to another session) are not retried.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct ApiClient {
    servers: Vec<String>,
    token: String,
    http: reqwest::Client,
    /// Index of the server that answered last; tried first next time.
    current: AtomicUsize,
}

impl ApiClient {
    pub fn new(servers: Vec<String>, token: String) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        let servers = servers
            .into_iter()
            .map(|s| s.trim_end_matches('/').to_string())
            .collect();
        ApiClient {
            servers,
            token,
            http,
            current: AtomicUsize::new(0),
        }
    }

    async fn send(
        &self,
        what: &str,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let n = self.servers.len().max(1);
        let start = self.current.load(Ordering::Relaxed);
        let mut last_err = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let Some(base) = self.servers.get(idx) else {
                break;
            };
            let req = build(&self.http, base).bearer_auth(&self.token);
            match req.send().await {
                Ok(resp) => {
                    self.current.store(idx, Ordering::Relaxed);
                    if resp.status().is_success() {
                        return Ok(resp);
                    }
                    let status = resp.status().as_u16();
                    let message = match resp.json::<ErrorBody>().await {
                        Ok(b) => b.message,
                        Err(_) => "(no error message)".to_string(),
                    };
                    // A 5xx from one replica may be that replica's trouble:
                    // try the next; a 4xx is the answer.
                    let err = ClientError::Api {
                        what: what.to_string(),
                        status,
                        message,
                    };
                    if status >= 500 {
                        last_err = Some(err);
                        continue;
                    }
                    return Err(err);
                }
                Err(source) => {
                    last_err = Some(ClientError::Unreachable {
                        url: base.clone(),
                        source,
                    });
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ClientError::Api {
            what: what.to_string(),
            status: 0,
            message: "no control-plane URL configured".into(),
        }))
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        let resp = self
            .send(path, |c, base| {
                c.post(format!("{base}{path}"))
                    .json(body)
                    .timeout(Duration::from_secs(30))
            })
            .await?;
        resp.json::<R>()
            .await
            .map_err(|source| ClientError::Decode {
                what: path.to_string(),
                source,
            })
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        let resp = self
            .send(path, |c, base| {
                c.get(format!("{base}{path}"))
                    .timeout(Duration::from_secs(30))
            })
            .await?;
        resp.json::<R>()
            .await
            .map_err(|source| ClientError::Decode {
                what: path.to_string(),
                source,
            })
    }

    /// Downloads a blob into `dest` (written to a temporary name, renamed when
    /// complete), returning its size.
    pub async fn download_blob(&self, hash: &str, dest: &Path) -> Result<u64, ClientError> {
        let path = format!("/v1/blobs/{hash}");
        let resp = self
            .send(&path, |c, base| c.get(format!("{base}{path}")))
            .await?;
        let tmp = dest.with_extension("part");
        let io = |what: &str, source| ClientError::Io {
            what: format!("{what} {}", tmp.display()),
            source,
        };
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io("creating", e))?;
        let mut stream = resp.bytes_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| ClientError::Unreachable {
                url: path.clone(),
                source,
            })?;
            n += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(|e| io("writing", e))?;
        }
        file.sync_all().await.map_err(|e| io("syncing", e))?;
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| io("renaming", e))?;
        Ok(n)
    }

    /// Uploads a file as the blob `hash`.
    pub async fn upload_blob(&self, hash: &str, file: &Path) -> Result<(), ClientError> {
        let path = format!("/v1/blobs/{hash}");
        let bytes = tokio::fs::read(file)
            .await
            .map_err(|source| ClientError::Io {
                what: format!("reading {}", file.display()),
                source,
            })?;
        let bytes = bytes::Bytes::from(bytes);
        self.send(&path, |c, base| {
            c.put(format!("{base}{path}"))
                .header("content-type", "application/octet-stream")
                .body(bytes.clone())
                .timeout(Duration::from_secs(600))
        })
        .await?;
        Ok(())
    }
}
