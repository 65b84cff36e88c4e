//! The one error type of this crate.
//!
//! Bundles come from users and their errors end up on a user's terminal, so
//! every message says what was wrong with which entry and what to do about
//! it, rather than echoing a low-level I/O error.

use std::io;
use std::path::PathBuf;

/// Which of the [`Limits`](crate::Limits) was exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// [`Limits::max_compressed`](crate::Limits::max_compressed).
    Compressed,
    /// [`Limits::max_unpacked`](crate::Limits::max_unpacked).
    Unpacked,
    /// [`Limits::max_files`](crate::Limits::max_files).
    Files,
}

impl Limit {
    /// The field name, so that an operator reading the error knows which
    /// setting to raise.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Compressed => "max_compressed",
            Limit::Unpacked => "max_unpacked",
            Limit::Files => "max_files",
        }
    }
}

/// Everything that can go wrong packing, checking or unpacking a bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The app folder (or a file in it) could not be read while packing.
    #[error("cannot read `{}` while packing: {source}; check that it exists and is readable, or list it in .steadignore", path.display())]
    ReadSource {
        /// The file or folder that could not be read.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The folder given to `pack_dir` is not a directory.
    #[error("`{}` is not a folder; pass the app's folder", path.display())]
    NotAFolder {
        /// What was given.
        path: PathBuf,
    },

    /// Walking the app folder failed (unreadable subfolder, broken `.steadignore`).
    #[error("cannot walk the app folder: {source}; fix the permissions or the .steadignore file it names")]
    Walk {
        /// Why.
        #[source]
        source: ignore::Error,
    },

    /// Writing the packed bundle to the output failed.
    #[error("cannot write the bundle: {source}")]
    WriteOutput {
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The input stream itself failed (e.g. the upload connection broke).
    #[error("cannot read the upload: {source}; upload the bundle again")]
    ReadInput {
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The input does not start with a zstd frame.
    #[error("the upload is not a zstd-compressed tar archive: {detail}; create bundles with `stead deploy`")]
    NotZstd {
        /// What the decompressor said.
        detail: String,
    },

    /// The zstd data is damaged past its start.
    #[error("the upload's zstd compression is corrupt: {detail}; upload the bundle again")]
    CorruptZstd {
        /// What the decompressor said.
        detail: String,
    },

    /// The stream ended before the archive did.
    #[error("the upload is truncated ({detail}); upload the bundle again")]
    Truncated {
        /// Where it ended.
        detail: String,
    },

    /// The decompressed data is not a well-formed tar archive.
    #[error("the upload is not a valid tar archive: {detail}; create bundles with `stead deploy`")]
    CorruptTar {
        /// What was wrong.
        detail: String,
    },

    /// One of the [`Limits`](crate::Limits) was exceeded.
    #[error("{}", describe_limit(*limit, *value))]
    LimitExceeded {
        /// Which limit.
        limit: Limit,
        /// Its value.
        value: u64,
    },

    /// An entry name is absolute.
    #[error("bundle entry `{path}` is an absolute path; bundles may only contain paths relative to the app folder")]
    AbsolutePath {
        /// The entry name as stored.
        path: String,
    },

    /// An entry name contains `..`.
    #[error("bundle entry `{path}` escapes the app folder; bundles may only contain paths inside the folder")]
    PathEscapes {
        /// The entry name as stored.
        path: String,
    },

    /// An entry name is unusable (empty, NUL byte, too long).
    #[error("bundle entry `{path}` has an unusable name: {reason}; rename it in the app folder")]
    BadName {
        /// The entry name as stored (lossy).
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A symlink in a user bundle points outside the app folder.
    #[error("bundle entry `{path}` is a symlink to `{target}`, which points outside the app folder; bundles may only contain symlinks to relative paths inside the folder (replace it with a copy of what it points to)")]
    LinkEscapes {
        /// The symlink.
        path: String,
        /// Where it points.
        target: String,
    },

    /// A link cannot be resolved because it goes through too many other links.
    #[error("bundle entry `{path}` is a symlink to `{target}`, which goes through too many other symlinks (a loop?); remove the loop from the app folder")]
    LinkLoop {
        /// The symlink.
        path: String,
        /// Where it points.
        target: String,
    },

    /// A hard link does not point at a regular file earlier in the archive.
    #[error("bundle entry `{path}` is a hard link to `{target}`, which is not a regular file earlier in the archive; hard links may only point at files inside the folder")]
    BadHardLink {
        /// The link.
        path: String,
        /// Where it points.
        target: String,
    },

    /// An entry type the policy does not allow.
    #[error("bundle entry `{path}` is a {kind}; {allowed}")]
    Unsupported {
        /// The entry.
        path: String,
        /// What it is ("fifo", "character device", ...).
        kind: String,
        /// What the policy allows instead.
        allowed: &'static str,
    },

    /// An entry would be created inside a symlink or a file: the classic
    /// "tar-slip" trick to write outside the destination.
    #[error("bundle entry `{path}` would be written through `{parent}`, which is a {parent_kind}, not a folder; bundles may not place entries inside links or files")]
    ThroughNonDir {
        /// The entry.
        path: String,
        /// The ancestor that is not a directory.
        parent: String,
        /// "symlink", "file".
        parent_kind: &'static str,
    },

    /// The same path appears twice (only directories may repeat).
    #[error("bundle entry `{path}` appears more than once; bundles must list each path once")]
    Duplicate {
        /// The entry.
        path: String,
    },

    /// An archive extension record (long name, PAX) is unusable.
    #[error("bundle entry `{path}` uses an unsupported archive extension: {detail}; create bundles with `stead deploy`")]
    UnsupportedExtension {
        /// The entry (or the extension record's own name).
        path: String,
        /// What is unsupported.
        detail: String,
    },

    /// `stead.toml` or `dbos-config.yaml` is too big to be a config file.
    #[error("`{name}` in the bundle is {size} bytes; config files may be at most {max} bytes")]
    ConfigTooLarge {
        /// Which config file.
        name: &'static str,
        /// Its declared size.
        size: u64,
        /// The maximum.
        max: u64,
    },

    /// A config file is not UTF-8 text.
    #[error("`{name}` in the bundle is not UTF-8 text; save it as UTF-8")]
    ConfigNotUtf8 {
        /// Which config file.
        name: &'static str,
    },

    /// A config file is a link or a folder.
    #[error("`{name}` in the bundle is a {kind}; it must be a regular file at the top of the app folder")]
    ConfigNotAFile {
        /// Which config file.
        name: &'static str,
        /// What it is instead.
        kind: &'static str,
    },

    /// The unpack destination is unusable.
    #[error("cannot unpack into `{}`: {reason}; unpack into a new or empty folder", path.display())]
    BadDestination {
        /// The destination.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },

    /// Writing an entry to disk failed.
    #[error("cannot write `{}` while unpacking: {source}", path.display())]
    Unpack {
        /// The file being written.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl BundleError {
    /// Whether the archive itself is at fault (hostile, malformed, too big),
    /// as opposed to local I/O or the connection: a server answers the
    /// former with a 4xx naming the problem, and the latter with a 5xx or a
    /// retry.
    pub fn is_bad_archive(&self) -> bool {
        !matches!(
            self,
            BundleError::ReadSource { .. }
                | BundleError::NotAFolder { .. }
                | BundleError::Walk { .. }
                | BundleError::WriteOutput { .. }
                | BundleError::ReadInput { .. }
                | BundleError::BadDestination { .. }
                | BundleError::Unpack { .. }
        )
    }

    /// Whether one of the [`Limits`](crate::Limits) was exceeded (HTTP 413
    /// rather than 400).
    pub fn is_limit(&self) -> bool {
        matches!(self, BundleError::LimitExceeded { .. })
    }
}

fn describe_limit(limit: Limit, value: u64) -> String {
    match limit {
        Limit::Compressed => format!(
            "the upload is larger than {} compressed (limit {} = {value} bytes); \
             leave large files out with .steadignore or ask the operator to raise the limit",
            human(value),
            limit.name()
        ),
        Limit::Unpacked => format!(
            "the bundle unpacks to more than {} (limit {} = {value} bytes); \
             leave large files out with .steadignore or ask the operator to raise the limit",
            human(value),
            limit.name()
        ),
        Limit::Files => format!(
            "the bundle has more than {value} entries (limit {} = {value}); \
             leave generated folders out with .steadignore or ask the operator to raise the limit",
            limit.name()
        ),
    }
}

/// Sizes in errors are read by people; exact bytes are given alongside.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_messages_name_the_limit_and_value() {
        let msg = BundleError::LimitExceeded {
            limit: Limit::Unpacked,
            value: 2 * 1024 * 1024 * 1024,
        }
        .to_string();
        assert!(msg.contains("2 GiB"), "{msg}");
        assert!(msg.contains("max_unpacked = 2147483648"), "{msg}");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10), "10 bytes");
    }
}
