//! Packing a folder into a tar+zstd stream.
//!
//! The output is deterministic for a given tree (sorted walk, no owner or
//! user names, folder times zeroed), so re-packing unchanged sources gives
//! the same hash and the server can recognise content it already has. File
//! modification times are kept because build tools and Python's bytecode
//! caches rely on them.

use std::cell::Cell;
use std::fs::{self, File};
use std::io::{self, Read, Take, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use ignore::WalkBuilder;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::{BundleError, PackOptions, PackStats, DEFAULT_EXCLUDES, IGNORE_FILE};

/// zstd's default: fast enough to keep up with a network upload on one core
/// while still shrinking source trees several-fold.
const ZSTD_LEVEL: i32 = 3;

/// Packs the folder `dir` into `out` as a zstd-compressed tar archive.
///
/// Entries are stored relative to `dir`, in sorted order. Symlinks are
/// stored as symlinks and never followed (so a link to `/` does not pack the
/// host). Sockets, fifos and device files cannot be part of an app and are
/// skipped. `progress` is called as data is read, with the number of
/// entries and bytes of file content so far, so that a CLI can show
/// progress for large folders.
///
/// Packing does not apply [`Policy::Bundle`](crate::Policy::Bundle): a
/// symlink pointing outside the folder is packed and the server will refuse
/// it, with a message naming it.
pub fn pack_dir<W: Write>(
    dir: &Path,
    opts: &PackOptions,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackStats, BundleError> {
    let meta = fs::metadata(dir).map_err(|source| BundleError::ReadSource {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(BundleError::NotAFolder {
            path: dir.to_path_buf(),
        });
    }

    let write_err = |source| BundleError::WriteOutput { source };
    let mut encoder = zstd::stream::write::Encoder::new(
        HashingWriter {
            inner: out,
            hasher: Sha256::new(),
            written: 0,
        },
        ZSTD_LEVEL,
    )
    .map_err(write_err)?;
    // A checksum per frame lets the reader detect corruption in transit or storage.
    encoder.include_checksum(true).map_err(write_err)?;
    let mut builder = tar::Builder::new(encoder);

    let mut walk = WalkBuilder::new(dir);
    walk.standard_filters(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b));
    if opts.honour_steadignore {
        walk.add_custom_ignore_filename(IGNORE_FILE);
    }
    if opts.default_excludes {
        walk.filter_entry(|entry| {
            let excluded = entry.depth() > 0
                && entry.file_type().is_some_and(|t| t.is_dir())
                && entry
                    .file_name()
                    .to_str()
                    .is_some_and(|name| DEFAULT_EXCLUDES.contains(&name));
            !excluded
        });
    }

    let mut files = 0u64;
    let mut bytes = 0u64;
    for item in walk.build() {
        let item = item.map_err(|source| BundleError::Walk { source })?;
        if item.depth() == 0 {
            continue;
        }
        let path = item.path();
        let rel = path
            .strip_prefix(dir)
            .map_err(|_| BundleError::ReadSource {
                path: path.to_path_buf(),
                source: io::Error::other("the walk left the app folder"),
            })?;
        let read_err = |source| BundleError::ReadSource {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::symlink_metadata(path).map_err(read_err)?;
        let kind = meta.file_type();

        let mut header = Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        if kind.is_dir() {
            header.set_entry_type(EntryType::Directory);
            header.set_mode(0o755);
            header.set_mtime(0);
            header.set_size(0);
            builder
                .append_data(&mut header, rel, io::empty())
                .map_err(write_err)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(path).map_err(read_err)?;
            header.set_entry_type(EntryType::Symlink);
            header.set_mode(0o777);
            header.set_mtime(mtime_secs(&meta));
            header.set_size(0);
            builder
                .append_link(&mut header, rel, &target)
                .map_err(write_err)?;
        } else if kind.is_file() {
            let executable = meta.permissions().mode() & 0o111 != 0;
            let size = meta.len();
            header.set_entry_type(EntryType::Regular);
            header.set_mode(if executable { 0o755 } else { 0o644 });
            header.set_mtime(mtime_secs(&meta));
            header.set_size(size);
            let file = File::open(path).map_err(read_err)?;
            let failed = Cell::new(None);
            let mut reader = SourceReader {
                file: file.take(size),
                remaining: size,
                failed: &failed,
                files: files + 1,
                bytes: &mut bytes,
                progress: &mut *progress,
            };
            let result = builder.append_data(&mut header, rel, &mut reader);
            if let Some(source) = failed.take() {
                return Err(read_err(source));
            }
            result.map_err(write_err)?;
        } else {
            tracing::debug!(path = %path.display(), "skipping a socket, fifo or device file while packing");
            continue;
        }
        files += 1;
        progress(files, bytes);
    }

    let encoder = builder.into_inner().map_err(write_err)?;
    let mut hashing = encoder.finish().map_err(write_err)?;
    hashing.inner.flush().map_err(write_err)?;
    Ok(PackStats {
        files,
        unpacked_bytes: bytes,
        compressed_bytes: hashing.written,
        sha256: hex::encode(hashing.hasher.finalize()),
    })
}

fn mtime_secs(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Feeds a file to the tar builder, which trusts the size in the header: a
/// file that shrank while being read would otherwise silently corrupt the
/// archive, and one that grew would shift every following entry. Read
/// errors are kept aside so they are reported against the source file, not
/// as an output error.
struct SourceReader<'a> {
    file: Take<File>,
    remaining: u64,
    failed: &'a Cell<Option<io::Error>>,
    files: u64,
    bytes: &'a mut u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.file.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failed.set(Some(e));
                return Err(copy);
            }
        };
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            let e = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed; pack again once nothing is writing to it",
            );
            let copy = io::Error::new(e.kind(), e.to_string());
            self.failed.set(Some(e));
            return Err(copy);
        }
        self.remaining -= n as u64;
        *self.bytes += n as u64;
        (self.progress)(self.files, *self.bytes);
        Ok(n)
    }
}

/// Counts and hashes the compressed bytes on their way out, so the caller
/// learns the content address without reading the output again.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
