//! Reading untrusted archives: [`inspect`] and [`unpack`].
//!
//! Both run the same loop over the raw tar records; `unpack` additionally
//! writes each accepted entry. Errors from deep inside the zstd and tar
//! layers arrive as bare `io::Error`s, so the readers in between record what
//! happened at their level, and [`StreamState::classify`] turns that into a
//! message about the upload rather than about an internal layer.

use std::cell::{Cell, RefCell};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::EntryType;

use crate::check::{self, Checker, Kind};
use crate::{
    BundleError, Inspection, Limit, Limits, Policy, DBOS_CONFIG, MAX_CONFIG_BYTES, STEAD_TOML,
};

/// GNU long names, long link targets and PAX records are held in memory; a
/// real one is at most a few KiB, so anything larger is refused before it is
/// read.
const MAX_EXTENSION_BYTES: u64 = 64 * 1024;

const CHUNK: usize = 64 * 1024;

/// Reads the whole (compressed) stream and checks every entry against policy and limits without writing anything to disk.
///
/// The server calls this on an upload before accepting it, so it must see
/// the same archive [`unpack`] will later see: it reads to the end of the
/// stream (including anything after the end-of-archive marker) and applies
/// exactly the same checks.
pub fn inspect<R: Read>(
    reader: R,
    policy: Policy,
    limits: &Limits,
) -> Result<Inspection, BundleError> {
    process(reader, policy, limits, None)
}

/// Extracts into `dest` (created if missing; must be empty if it exists), checking as it goes; on any error removes what it wrote. Preserves the executable bit (mode & 0o755 max; never setuid/setgid/sticky), not ownership.
///
/// Files become `0o755` if any execute bit was set in the archive and
/// `0o644` otherwise, and folders `0o755`, whatever the archive says: the
/// app runs as a different user from the one unpacking, and must be able to
/// read everything. File modification times are restored (Python compares
/// them to decide whether its bytecode caches are stale).
///
/// Extraction never writes through a symlink: entries are only created at
/// new paths whose ancestors are folders this call created, and files are
/// opened with `O_CREAT|O_EXCL`, which refuses to follow a final symlink.
/// This assumes nothing else writes into `dest` meanwhile.
pub fn unpack<R: Read>(
    reader: R,
    dest: &Path,
    policy: Policy,
    limits: &Limits,
) -> Result<Inspection, BundleError> {
    let out = Extractor::prepare(dest)?;
    match process(reader, policy, limits, Some(&out)) {
        Ok(inspection) => Ok(inspection),
        Err(err) => {
            out.clean_up();
            Err(err)
        }
    }
}

/// What the reader layers observed, for classifying errors.
#[derive(Default)]
struct StreamState {
    compressed: Cell<u64>,
    compressed_exceeded: Cell<bool>,
    input_failed: Cell<bool>,
    decoder_finished: Cell<bool>,
    decode_error: RefCell<Option<(io::ErrorKind, String)>>,
    /// The first bytes of the input, to tell "not zstd at all" from "damaged zstd".
    head: RefCell<Vec<u8>>,
}

/// A zstd frame, or a skippable frame (magic 0x184D2A50..=0x184D2A5F), little-endian.
fn looks_like_zstd(head: &[u8]) -> bool {
    match head {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => true,
        [m, 0x2a, 0x4d, 0x18, ..] => m & 0xf0 == 0x50,
        _ => false,
    }
}

impl StreamState {
    fn classify(&self, err: io::Error) -> BundleError {
        if self.compressed_exceeded.get() {
            return BundleError::LimitExceeded {
                limit: Limit::Compressed,
                value: 0, // replaced by the caller, which knows the limits
            };
        }
        if self.input_failed.get() {
            return BundleError::ReadInput { source: err };
        }
        if let Some((kind, detail)) = self.decode_error.borrow().clone() {
            let head = self.head.borrow();
            if head.is_empty() {
                return BundleError::NotZstd {
                    detail: "the upload is empty".into(),
                };
            }
            if head.len() >= 4 && !looks_like_zstd(&head) {
                return BundleError::NotZstd { detail };
            }
            if kind == io::ErrorKind::UnexpectedEof {
                return BundleError::Truncated {
                    detail: "the compressed stream ends in the middle of a zstd frame".into(),
                };
            }
            return BundleError::CorruptZstd { detail };
        }
        if self.decoder_finished.get() {
            return BundleError::Truncated {
                detail: format!("the archive ends early: {err}"),
            };
        }
        BundleError::CorruptTar {
            detail: err.to_string(),
        }
    }
}

/// Counts (and bounds) the compressed bytes, and tells input failures apart
/// from decoding failures.
struct InputCounter<'s, R> {
    inner: R,
    state: &'s StreamState,
    limit: u64,
}

impl<R: Read> Read for InputCounter<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.state.input_failed.set(true);
                }
                return Err(e);
            }
        };
        let mut head = self.state.head.borrow_mut();
        if head.len() < 4 {
            let wanted = (4 - head.len()).min(n);
            head.extend_from_slice(&buf[..wanted]);
        }
        drop(head);
        let total = self.state.compressed.get().saturating_add(n as u64);
        self.state.compressed.set(total);
        if total > self.limit {
            self.state.compressed_exceeded.set(true);
            return Err(io::Error::other("compressed size limit exceeded"));
        }
        Ok(n)
    }
}

/// Sits on the decompressor's output to record its errors and its end.
struct DecodeTap<'s, R: Read> {
    inner: zstd::stream::read::Decoder<'static, io::BufReader<InputCounter<'s, R>>>,
    state: &'s StreamState,
}

impl<R: Read> Read for DecodeTap<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(0) if !buf.is_empty() => {
                self.state.decoder_finished.set(true);
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) => {
                if !self.state.input_failed.get() && !self.state.compressed_exceeded.get() {
                    *self.state.decode_error.borrow_mut() = Some((e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }
}

/// Extension records seen since the last real entry; they describe the next one.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_link: Option<Vec<u8>>,
    pax_seen: bool,
    global_seen: bool,
}

impl Extensions {
    fn pending(&self) -> bool {
        self.long_name.is_some() || self.long_link.is_some() || self.pax_seen
    }

    fn add(&mut self, etype: EntryType, data: Vec<u8>, shown: &str) -> Result<(), BundleError> {
        let twice = || BundleError::CorruptTar {
            detail: format!("two `{}` extension records describe the same entry", shown),
        };
        match etype {
            EntryType::GNULongName => {
                if self.long_name.is_some() {
                    return Err(twice());
                }
                self.long_name = Some(strip_nuls(data));
            }
            EntryType::GNULongLink => {
                if self.long_link.is_some() {
                    return Err(twice());
                }
                self.long_link = Some(strip_nuls(data));
            }
            EntryType::XHeader => {
                if self.pax_seen {
                    return Err(twice());
                }
                self.pax_seen = true;
                for record in tar::PaxExtensions::new(&data) {
                    let record = record.map_err(|e| BundleError::CorruptTar {
                        detail: format!("malformed PAX record in `{shown}`: {e}"),
                    })?;
                    match record.key_bytes() {
                        b"path" => self.pax_path = Some(record.value_bytes().to_vec()),
                        b"linkpath" => self.pax_link = Some(record.value_bytes().to_vec()),
                        key => refuse_pax_key(key, shown)?,
                    }
                }
            }
            EntryType::XGlobalHeader => {
                // Harmless metadata (a comment, times), but at most one per
                // entry, so that headers without entries stay bounded.
                if self.global_seen {
                    return Err(twice());
                }
                self.global_seen = true;
                for record in tar::PaxExtensions::new(&data) {
                    let record = record.map_err(|e| BundleError::CorruptTar {
                        detail: format!("malformed PAX record in `{shown}`: {e}"),
                    })?;
                    match record.key_bytes() {
                        b"path" | b"linkpath" => {
                            return Err(BundleError::UnsupportedExtension {
                                path: shown.to_owned(),
                                detail: "a global PAX header that sets a path".into(),
                            })
                        }
                        key => refuse_pax_key(key, shown)?,
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Long names win over PAX, as in the `tar` crate's own reader.
    fn path(&mut self) -> Option<Vec<u8>> {
        self.long_name.take().or_else(|| self.pax_path.take())
    }

    fn link(&mut self) -> Option<Vec<u8>> {
        self.long_link.take().or_else(|| self.pax_link.take())
    }
}

/// A PAX `size` would override the header's size. In raw mode the `tar`
/// crate would not honour it, so the entry boundaries we see would differ
/// from other readers'; our own packer never writes one, so refusing it
/// costs nothing. The same goes for GNU sparse files.
fn refuse_pax_key(key: &[u8], shown: &str) -> Result<(), BundleError> {
    if key == b"size" {
        return Err(BundleError::UnsupportedExtension {
            path: shown.to_owned(),
            detail: "a PAX size record".into(),
        });
    }
    if key.starts_with(b"GNU.sparse") {
        return Err(BundleError::UnsupportedExtension {
            path: shown.to_owned(),
            detail: "a sparse file".into(),
        });
    }
    Ok(())
}

fn strip_nuls(mut data: Vec<u8>) -> Vec<u8> {
    while data.last() == Some(&0) {
        data.pop();
    }
    data
}

fn process<R: Read>(
    reader: R,
    policy: Policy,
    limits: &Limits,
    out: Option<&Extractor>,
) -> Result<Inspection, BundleError> {
    let state = StreamState::default();
    let result = run(reader, policy, limits, out, &state);
    // Only here are the limits at hand to fill in the value.
    result.map_err(|err| match err {
        BundleError::LimitExceeded {
            limit: Limit::Compressed,
            ..
        } => BundleError::LimitExceeded {
            limit: Limit::Compressed,
            value: limits.max_compressed,
        },
        other => other,
    })
}

fn run<R: Read>(
    reader: R,
    policy: Policy,
    limits: &Limits,
    out: Option<&Extractor>,
    state: &StreamState,
) -> Result<Inspection, BundleError> {
    let input = InputCounter {
        inner: reader,
        state,
        limit: limits.max_compressed,
    };
    let decoder =
        zstd::stream::read::Decoder::new(input).map_err(|e| BundleError::CorruptZstd {
            detail: format!("cannot start the decompressor: {e}"),
        })?;
    let mut archive = tar::Archive::new(DecodeTap {
        inner: decoder,
        state,
    });
    let mut checker = Checker::new(policy, *limits);
    let mut inspection = Inspection::default();
    {
        let entries = archive.entries().map_err(|e| state.classify(e))?.raw(true);
        let mut ext = Extensions::default();
        for entry in entries {
            let mut entry = entry.map_err(|e| state.classify(e))?;
            handle_entry(
                &mut entry,
                &mut ext,
                &mut checker,
                &mut inspection,
                out,
                state,
            )?;
        }
        if ext.pending() {
            return Err(BundleError::CorruptTar {
                detail: "the archive ends with an extension record that describes no entry".into(),
            });
        }
    }

    // Whatever follows the end-of-archive marker is read too (and counted),
    // so that the caller's view of the upload (its hash, its size) covers
    // the same bytes that were checked, and a damaged tail is noticed.
    let mut rest = archive.into_inner();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(state.classify(e)),
        };
        checker.count_read(n as u64)?;
    }

    checker.finish()?;
    inspection.files = checker.entries();
    inspection.unpacked_bytes = checker.content_bytes();
    Ok(inspection)
}

fn handle_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    ext: &mut Extensions,
    checker: &mut Checker,
    inspection: &mut Inspection,
    out: Option<&Extractor>,
    state: &StreamState,
) -> Result<(), BundleError> {
    let etype = entry.header().entry_type();
    let size = entry.size();
    checker.count_declared(size)?;

    if matches!(
        etype,
        EntryType::GNULongName
            | EntryType::GNULongLink
            | EntryType::XHeader
            | EntryType::XGlobalHeader
    ) {
        let shown = check::shown(&entry.header().path_bytes());
        if size > MAX_EXTENSION_BYTES {
            return Err(BundleError::UnsupportedExtension {
                path: shown,
                detail: format!(
                    "an extension record of {size} bytes (at most {MAX_EXTENSION_BYTES} allowed)"
                ),
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        read_data(entry, size, &shown, checker, state, &mut |chunk| {
            data.extend_from_slice(chunk);
            Ok(())
        })?;
        return ext.add(etype, data, &shown);
    }

    checker.count_entry()?;
    let raw_path = ext
        .path()
        .unwrap_or_else(|| entry.header().path_bytes().into_owned());
    let raw_link = ext.link().or_else(|| {
        entry
            .header()
            .link_name_bytes()
            .map(|name| name.into_owned())
    });
    *ext = Extensions::default();
    let shown = check::shown(&raw_path);
    let rel = check::entry_path(&raw_path)?;

    let kind = match etype {
        EntryType::Regular | EntryType::Continuous => Kind::File,
        EntryType::Directory => Kind::Dir,
        EntryType::Symlink => Kind::Symlink(check::symlink_target(&shown, raw_link.as_deref())?),
        EntryType::Link => match checker.policy() {
            Policy::Artifact => {
                Kind::HardLink(check::hardlink_target(&shown, raw_link.as_deref())?)
            }
            Policy::Bundle => return Err(checker.unsupported(&shown, "hard link")),
        },
        EntryType::Char => return Err(checker.unsupported(&shown, "character device")),
        EntryType::Block => return Err(checker.unsupported(&shown, "block device")),
        EntryType::Fifo => return Err(checker.unsupported(&shown, "fifo (named pipe)")),
        EntryType::GNUSparse => return Err(checker.unsupported(&shown, "sparse file")),
        other => {
            return Err(checker.unsupported(
                &shown,
                format!("entry of unknown type `{}`", other.as_byte().escape_ascii()),
            ))
        }
    };

    let config = config_name(&rel);
    if let Some(name) = config {
        if kind != Kind::File {
            return Err(BundleError::ConfigNotAFile {
                name,
                kind: kind.describe(),
            });
        }
        if size > MAX_CONFIG_BYTES {
            return Err(BundleError::ConfigTooLarge {
                name,
                size,
                max: MAX_CONFIG_BYTES,
            });
        }
    }

    let admitted = checker.admit(&rel, &shown, &kind)?;
    if let Some(out) = out {
        for dir in &admitted.new_parents {
            out.mkdir(dir)?;
        }
    }
    if admitted.skip {
        return Ok(());
    }

    match &kind {
        Kind::Dir => {
            if let Some(out) = out {
                out.mkdir(&rel)?;
            }
        }
        Kind::Symlink(target) => {
            if let Some(out) = out {
                out.symlink(&rel, target)?;
            }
        }
        Kind::HardLink(target) => {
            if let Some(out) = out {
                out.hard_link(&rel, target)?;
            }
        }
        Kind::File => {
            let header = entry.header();
            let mode = header.mode().map_err(|e| BundleError::CorruptTar {
                detail: format!("entry `{shown}` has an unreadable mode: {e}"),
            })?;
            let mtime = header.mtime().map_err(|e| BundleError::CorruptTar {
                detail: format!("entry `{shown}` has an unreadable time: {e}"),
            })?;
            let executable = mode & 0o111 != 0;
            let mut file = match out {
                Some(out) => Some(out.create_file(&rel, executable)?),
                None => None,
            };
            let dest = out.map(|o| o.root.join(&rel)).unwrap_or_default();
            let mut captured = config.map(|_| Vec::with_capacity(size as usize));
            let written = read_data(entry, size, &shown, checker, state, &mut |chunk| {
                if let Some(buf) = captured.as_mut() {
                    buf.extend_from_slice(chunk);
                }
                if let Some(f) = file.as_mut() {
                    f.write_all(chunk).map_err(|source| BundleError::Unpack {
                        path: dest.clone(),
                        source,
                    })?;
                }
                Ok(())
            })?;
            checker.add_content(written);
            if let Some(f) = file {
                finish_file(f, mtime, &dest)?;
            }
            if let (Some(name), Some(bytes)) = (config, captured) {
                let text =
                    String::from_utf8(bytes).map_err(|_| BundleError::ConfigNotUtf8 { name })?;
                if name == STEAD_TOML {
                    inspection.stead_toml = Some(text);
                } else {
                    inspection.dbos_config = Some(text);
                }
            }
        }
    }
    Ok(())
}

fn config_name(rel: &Path) -> Option<&'static str> {
    if rel == Path::new(STEAD_TOML) {
        Some(STEAD_TOML)
    } else if rel == Path::new(DBOS_CONFIG) {
        Some(DBOS_CONFIG)
    } else {
        None
    }
}

/// Reads an entry's data, counting every byte against the unpacked limit as
/// it arrives, and insists on getting as many bytes as the header declared.
fn read_data<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    declared: u64,
    shown: &str,
    checker: &mut Checker,
    state: &StreamState,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), BundleError>,
) -> Result<u64, BundleError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(state.classify(e)),
        };
        total += n as u64;
        checker.count_read(n as u64)?;
        sink(&buf[..n])?;
    }
    if total != declared {
        return Err(BundleError::Truncated {
            detail: format!(
                "entry `{shown}` should have {declared} bytes but the stream ended after {total}"
            ),
        });
    }
    Ok(total)
}

fn finish_file(file: File, mtime: u64, path: &Path) -> Result<(), BundleError> {
    if mtime > 0 {
        if let Some(time) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(mtime)) {
            // A time the file system cannot store is not worth failing for.
            if let Err(e) = file.set_modified(time) {
                tracing::debug!(path = %path.display(), error = %e, "cannot set modification time");
            }
        }
    }
    Ok(())
}

/// Writes accepted entries under `root`. Paths it receives have been
/// through the checker: relative, normal components only, new, and with
/// folder ancestors that this extractor created.
struct Extractor {
    root: PathBuf,
    created_root: bool,
}

impl Extractor {
    fn prepare(dest: &Path) -> Result<Self, BundleError> {
        let bad = |reason: String| BundleError::BadDestination {
            path: dest.to_path_buf(),
            reason,
        };
        match fs::metadata(dest) {
            Ok(meta) if meta.is_dir() => {
                let mut listing = fs::read_dir(dest).map_err(|e| bad(e.to_string()))?;
                if listing.next().is_some() {
                    return Err(bad("it is not empty".into()));
                }
                Ok(Extractor {
                    root: dest.to_path_buf(),
                    created_root: false,
                })
            }
            Ok(_) => Err(bad("it exists and is not a folder".into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs::create_dir_all(parent).map_err(|e| bad(e.to_string()))?;
                }
                DirBuilder::new()
                    .mode(0o755)
                    .create(dest)
                    .map_err(|e| bad(e.to_string()))?;
                Ok(Extractor {
                    root: dest.to_path_buf(),
                    created_root: true,
                })
            }
            Err(e) => Err(bad(e.to_string())),
        }
    }

    fn mkdir(&self, rel: &Path) -> Result<(), BundleError> {
        let path = self.root.join(rel);
        let fail = |source| BundleError::Unpack {
            path: path.clone(),
            source,
        };
        DirBuilder::new().mode(0o755).create(&path).map_err(fail)?;
        // Explicitly, because the process umask may have removed bits.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(fail)
    }

    fn create_file(&self, rel: &Path, executable: bool) -> Result<File, BundleError> {
        let path = self.root.join(rel);
        let fail = |source| BundleError::Unpack {
            path: path.clone(),
            source,
        };
        let mode = if executable { 0o755 } else { 0o644 };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(fail)?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        Ok(file)
    }

    fn symlink(&self, rel: &Path, target: &Path) -> Result<(), BundleError> {
        let path = self.root.join(rel);
        std::os::unix::fs::symlink(target, &path)
            .map_err(|source| BundleError::Unpack { path, source })
    }

    fn hard_link(&self, rel: &Path, target: &Path) -> Result<(), BundleError> {
        let path = self.root.join(rel);
        fs::hard_link(self.root.join(target), &path)
            .map_err(|source| BundleError::Unpack { path, source })
    }

    /// Best effort: the error that got us here matters more than one from
    /// cleaning up, so failures are only logged.
    fn clean_up(&self) {
        if self.created_root {
            if let Err(e) = fs::remove_dir_all(&self.root) {
                tracing::warn!(path = %self.root.display(), error = %e, "cannot remove a partly unpacked folder");
            }
            return;
        }
        let listing = match fs::read_dir(&self.root) {
            Ok(listing) => listing,
            Err(e) => {
                tracing::warn!(path = %self.root.display(), error = %e, "cannot clean up a partly unpacked folder");
                return;
            }
        };
        for item in listing {
            let result = item.and_then(|item| {
                let path = item.path();
                if item.file_type()?.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                }
            });
            if let Err(e) = result {
                tracing::warn!(path = %self.root.display(), error = %e, "cannot clean up a partly unpacked folder");
            }
        }
    }
}
