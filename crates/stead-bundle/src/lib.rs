//! App bundles: packing an app folder into tar+zstd, and checking and unpacking untrusted ones safely.
//!
//! Two kinds of archive share this format:
//!
//! * **bundles**, packed by the CLI from a user's app folder and uploaded;
//!   the control plane must treat them as hostile, so [`inspect`] checks
//!   every entry against [`Policy::Bundle`] and the [`Limits`] before the
//!   upload is accepted;
//! * **artifacts**, the built app folder packed by our own agent after a
//!   build (which ran untrusted code, so they are still checked, but less
//!   strictly: [`Policy::Artifact`]).
//!
//! The agent unpacks both with [`unpack`], which applies the same checks as
//! [`inspect`] while writing, and never writes through a symlink.
//!
//! The tar layer is read in "raw" mode and GNU long-name and PAX records are
//! handled here, because the `tar` crate would otherwise read those records
//! into memory without any size limit (a small compressed upload could make
//! the server allocate gigabytes).

mod check;
mod error;
mod pack;
mod read;

use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

pub use error::{BundleError, Limit};
pub use pack::pack_dir;
pub use read::{inspect, unpack};

/// Folder names that are almost never part of what should be deployed (VCS
/// data, build output, dependency caches that the build recreates) and can
/// be huge; skipping them by default keeps uploads small without the user
/// having to write a `.steadignore`.
pub const DEFAULT_EXCLUDES: &[&str] = &[".git", "target", "node_modules", ".venv"];

/// The name of the ignore file honoured when packing a bundle (gitignore syntax).
pub const IGNORE_FILE: &str = ".steadignore";

/// The top-level config files whose contents [`inspect`] returns, so the
/// server can read an app's config without unpacking the bundle.
pub const STEAD_TOML: &str = "stead.toml";
/// See [`STEAD_TOML`].
pub const DBOS_CONFIG: &str = "dbos-config.yaml";

/// Config files are small text; anything bigger is a mistake or an attack on
/// the server's memory, since their contents are held in memory.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Bounds on what an archive may expand to, so that a small hostile upload
/// cannot exhaust the server's disk, memory or time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the compressed stream.
    pub max_compressed: u64,
    /// Bytes after decompression: the sum of entry sizes (both as declared
    /// in headers and as actually read).
    pub max_unpacked: u64,
    /// Number of archive entries (files, folders and links).
    pub max_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_compressed: 256 * 1024 * 1024,
            max_unpacked: 2 * 1024 * 1024 * 1024,
            max_files: 100_000,
        }
    }
}

/// How much to trust an archive: decides which entry kinds are acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// An app folder uploaded by a user: regular files, directories, and symlinks whose target stays inside the root (relative, resolving inside). Anything else rejected.
    Bundle,
    /// A built app folder packed by our own agent after a build: also allows symlinks pointing anywhere (Python virtualenvs contain `bin/python -> /usr/bin/python3`), and hard links inside the root. Still rejects absolute/`..` entry paths and device files, and extraction must never write through a symlink.
    Artifact,
}

/// What to leave out when packing.
///
/// User bundles leave out [`DEFAULT_EXCLUDES`] and whatever `.steadignore`
/// says ([`PackOptions::BUNDLE`]); artifacts must be the built folder exactly
/// as the build left it, including `node_modules` and `.venv`
/// ([`PackOptions::ARTIFACT`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackOptions {
    /// Skip folders named in [`DEFAULT_EXCLUDES`], at any depth.
    pub default_excludes: bool,
    /// Honour `.steadignore` files (gitignore syntax), at the root and in subfolders.
    pub honour_steadignore: bool,
}

impl PackOptions {
    /// For a user's app folder.
    pub const BUNDLE: PackOptions = PackOptions {
        default_excludes: true,
        honour_steadignore: true,
    };
    /// For a built app folder.
    pub const ARTIFACT: PackOptions = PackOptions {
        default_excludes: false,
        honour_steadignore: false,
    };
}

/// What [`pack_dir`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackStats {
    /// Archive entries written (files, folders and symlinks), the same count
    /// that [`inspect`] reports and [`Limits::max_files`] bounds.
    pub files: u64,
    /// Bytes of regular-file contents.
    pub unpacked_bytes: u64,
    /// Bytes written to the output.
    pub compressed_bytes: u64,
    /// Hex SHA-256 of the compressed output: the content address under which
    /// the server stores it.
    pub sha256: String,
}

/// What an archive contains, learned while checking it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    /// Archive entries (files, folders and links).
    pub files: u64,
    /// Bytes of regular-file contents.
    pub unpacked_bytes: u64,
    /// Contents of the top-level `stead.toml`, if present.
    pub stead_toml: Option<String>,
    /// Contents of the top-level `dbos-config.yaml`, if present.
    pub dbos_config: Option<String>,
}

/// Hex SHA-256 of a file's contents, streamed so that large bundles are not
/// read into memory; matches [`PackStats::sha256`] for a packed file.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
