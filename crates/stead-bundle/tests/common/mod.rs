//! Helpers for building archives by hand, byte for byte, so that tests can
//! produce what our own packer never would.

#![allow(dead_code)]

use std::fs;
use std::path::Path;

use stead_bundle::{inspect, unpack, BundleError, Inspection, Limits, Policy};
use tar::{EntryType, Header};

/// A header whose name and link name are copied verbatim, bypassing the
/// `tar` crate's own refusal of `..` and absolute names.
pub fn raw_header(name: &[u8], etype: EntryType, size: u64) -> Header {
    let mut h = Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
    }
    h.set_entry_type(etype);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h
}

pub fn set_link(h: &mut Header, target: &[u8]) {
    h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
    h.set_cksum();
}

/// Builds a tar archive entry by entry.
pub struct Raw {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Raw {
    fn default() -> Self {
        Self::new()
    }
}

impl Raw {
    pub fn new() -> Self {
        Raw {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub fn header(mut self, h: &Header, data: &[u8]) -> Self {
        self.builder.append(h, data).unwrap();
        self
    }

    pub fn file(self, name: &str, data: &[u8]) -> Self {
        let h = raw_header(name.as_bytes(), EntryType::Regular, data.len() as u64);
        self.header(&h, data)
    }

    pub fn file_mode(self, name: &str, data: &[u8], mode: u32) -> Self {
        let mut h = raw_header(name.as_bytes(), EntryType::Regular, data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        self.header(&h, data)
    }

    pub fn dir(self, name: &str) -> Self {
        let mut h = raw_header(name.as_bytes(), EntryType::Directory, 0);
        h.set_mode(0o755);
        h.set_cksum();
        self.header(&h, &[])
    }

    pub fn symlink(self, name: &str, target: &str) -> Self {
        let mut h = raw_header(name.as_bytes(), EntryType::Symlink, 0);
        set_link(&mut h, target.as_bytes());
        self.header(&h, &[])
    }

    pub fn hardlink(self, name: &str, target: &str) -> Self {
        let mut h = raw_header(name.as_bytes(), EntryType::Link, 0);
        set_link(&mut h, target.as_bytes());
        self.header(&h, &[])
    }

    pub fn special(self, name: &str, etype: EntryType) -> Self {
        let h = raw_header(name.as_bytes(), etype, 0);
        self.header(&h, &[])
    }

    /// The uncompressed archive, with its end-of-archive marker.
    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }

    /// The archive compressed, as it would be uploaded.
    pub fn zst(self) -> Vec<u8> {
        zst(&self.tar())
    }
}

pub fn zst(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 1).unwrap()
}

/// Asserts that both `inspect` and `unpack` refuse `bundle` with an error
/// matching `expected`, and that a failed unpack leaves nothing behind,
/// neither in the destination nor next to it.
pub fn assert_refused(
    bundle: &[u8],
    policy: Policy,
    limits: &Limits,
    expected: impl Fn(&BundleError) -> bool,
) -> BundleError {
    let err = inspect(bundle, policy, limits).expect_err("inspect accepted a hostile archive");
    assert!(expected(&err), "inspect gave an unexpected error: {err:?}");
    assert!(err.is_bad_archive(), "{err:?}");

    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("fresh");
    let err = unpack(bundle, &fresh, policy, limits).expect_err("unpack accepted it");
    assert!(expected(&err), "unpack gave an unexpected error: {err:?}");
    assert!(!fresh.exists(), "a failed unpack left {fresh:?} behind");

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err2 = unpack(bundle, &empty, policy, limits).expect_err("unpack accepted it");
    assert!(expected(&err2), "unpack gave an unexpected error: {err2:?}");
    assert_eq!(
        listing(&empty),
        Vec::<String>::new(),
        "a failed unpack left files behind"
    );
    assert_eq!(listing(tmp.path()), vec!["empty".to_string()]);
    err
}

/// Both `inspect` and `unpack` accept it and agree.
pub fn assert_accepted(bundle: &[u8], policy: Policy, limits: &Limits, dest: &Path) -> Inspection {
    let a = inspect(bundle, policy, limits).unwrap();
    let b = unpack(bundle, dest, policy, limits).unwrap();
    assert_eq!(a, b);
    a
}

/// Every path under `dir`, relative and sorted, without following links.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for item in fs::read_dir(dir).unwrap() {
        let item = item.unwrap();
        let path = item.path();
        out.push(path.strip_prefix(root).unwrap().display().to_string());
        if item.file_type().unwrap().is_dir() {
            walk(root, &path, out);
        }
    }
}
