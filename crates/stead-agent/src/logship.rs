//! Ships instance logs to the control plane.
//!
//! Instances write stdout/stderr straight into files in their instance
//! directory (so output survives an agent restart); this task reads what is
//! new, sends it in batches, and remembers how far it got in
//! `offsets.json` beside them, so a restarted agent neither loses nor
//! repeats lines. A file that grows past [`ROTATE_BYTES`] once everything in
//! it has been shipped is copied to `<name>.1` and truncated (the app keeps
//! writing through its O_APPEND descriptor).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stead_api::{InstanceLogBatch, InstanceLogLine, LogStream};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::instance::instance_dir;
use crate::{now_ms, Shared};

const ROTATE_BYTES: u64 = 10 * 1024 * 1024;
/// At most this much is read from one file per pass, so one chatty
/// instance cannot starve the others or build a huge request.
const MAX_CHUNK: u64 = 1024 * 1024;
const MAX_LINE: usize = 16 * 1024;

pub(crate) async fn ship_loop(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ship_once(&shared).await;
    }
}

pub(crate) async fn ship_once(shared: &Arc<Shared>) {
    let list: Vec<(String, String, u32)> = {
        let instances = shared.instances.lock().await;
        instances
            .values()
            .map(|i| (i.id.clone(), i.app.clone(), i.version))
            .collect()
    };
    for (id, app, version) in list {
        ship_instance(shared, &app, version, &id).await;
    }
}

/// Ships everything new of one instance's logs.
pub(crate) async fn ship_instance(shared: &Shared, app: &str, version: u32, id: &str) {
    let dir = instance_dir(shared, id);
    let offsets_path = dir.join("offsets.json");
    let mut offsets: BTreeMap<String, u64> = tokio::fs::read(&offsets_path)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut lines = Vec::new();
    let mut new_offsets = offsets.clone();
    for (file, stream) in [
        ("stdout.log", LogStream::Stdout),
        ("stderr.log", LogStream::Stderr),
    ] {
        let path = dir.join(file);
        let from = offsets.get(file).copied().unwrap_or(0);
        let Ok((text, consumed)) = read_new(&path, from).await else {
            continue;
        };
        if consumed == 0 {
            continue;
        }
        let ts_ms = now_ms();
        for line in text.split('\n') {
            let mut line = line.trim_end_matches('\r').to_string();
            if line.len() > MAX_LINE {
                let mut cut = MAX_LINE;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line.push_str(" [line truncated]");
            }
            lines.push(InstanceLogLine {
                app: app.to_string(),
                version,
                instance: id.to_string(),
                ts_ms,
                stream,
                line,
            });
        }
        new_offsets.insert(file.to_string(), from + consumed);
    }
    if lines.is_empty() {
        return;
    }
    let batch = InstanceLogBatch {
        host_id: shared.host_id.clone(),
        lines,
    };
    match shared
        .client
        .post::<_, serde_json::Value>("/v1/agent/logs", &batch)
        .await
    {
        Ok(_) => {
            offsets = new_offsets;
            if let Ok(bytes) = serde_json::to_vec(&offsets) {
                let tmp = dir.join("offsets.json.tmp");
                if tokio::fs::write(&tmp, bytes).await.is_ok() {
                    let _ = tokio::fs::rename(&tmp, &offsets_path).await;
                }
            }
            rotate(&dir, &mut offsets, &offsets_path).await;
        }
        Err(e) => {
            tracing::debug!(instance = %id, app = %app, error = %e, "shipping logs failed; will retry");
        }
    }
}

/// Reads complete lines after `from`; returns the text (without the last
/// newline) and how many bytes it consumed. A partial last line waits for
/// its newline unless the chunk is full.
async fn read_new(path: &Path, from: u64) -> std::io::Result<(String, u64)> {
    let mut f = tokio::fs::File::open(path).await?;
    let len = f.metadata().await?.len();
    // The file was truncated behind our back: start over.
    let from = if len < from { 0 } else { from };
    if len == from {
        return Ok((String::new(), 0));
    }
    f.seek(std::io::SeekFrom::Start(from)).await?;
    let want = (len - from).min(MAX_CHUNK);
    let mut buf = vec![0u8; want as usize];
    f.read_exact(&mut buf).await?;
    let end = match buf.iter().rposition(|b| *b == b'\n') {
        Some(p) => p + 1,
        None if want == MAX_CHUNK => buf.len(),
        None => return Ok((String::new(), 0)),
    };
    let text = String::from_utf8_lossy(&buf[..end]);
    let text = text.strip_suffix('\n').unwrap_or(&text).to_string();
    Ok((text, end as u64))
}

async fn rotate(dir: &Path, offsets: &mut BTreeMap<String, u64>, offsets_path: &Path) {
    let mut changed = false;
    for file in ["stdout.log", "stderr.log"] {
        let path = dir.join(file);
        let Ok(meta) = tokio::fs::metadata(&path).await else {
            continue;
        };
        if meta.len() >= ROTATE_BYTES && offsets.get(file).copied() == Some(meta.len()) {
            let old = dir.join(format!("{file}.1"));
            if tokio::fs::copy(&path, &old).await.is_ok() {
                if let Ok(f) = tokio::fs::OpenOptions::new().write(true).open(&path).await {
                    let _ = f.set_len(0).await;
                    offsets.insert(file.to_string(), 0);
                    changed = true;
                }
            }
        }
    }
    if changed {
        if let Ok(bytes) = serde_json::to_vec(offsets) {
            let _ = tokio::fs::write(offsets_path, bytes).await;
        }
    }
}
