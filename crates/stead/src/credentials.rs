//! Where the CLI keeps the control-plane URL and token between commands.
//!
//! `stead dev` and `stead login` write them; every client command reads them
//! unless `--api`/`--token` (or `STEAD_API`/`STEAD_TOKEN`) say otherwise.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub api: String,
    pub token: String,
}

/// `$STEAD_CONFIG_DIR`, else `<config dir>/stead` (e.g. `~/.config/stead`).
pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STEAD_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    dirs::config_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("stead")
}

pub fn path() -> PathBuf {
    config_dir().join("credentials.json")
}

pub fn load() -> Option<Credentials> {
    let bytes = std::fs::read(path()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes the file readable by its owner only: it holds a token.
pub fn save(c: &Credentials) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = path();
    let dir = config_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = p.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(c)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}
