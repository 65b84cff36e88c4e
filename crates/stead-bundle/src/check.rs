//! The rules every archive entry is checked against, shared by `inspect` and
//! `unpack` so that what the server accepts is exactly what the agent will
//! write.
//!
//! The checker keeps an in-memory model of the tree the archive describes.
//! That is what makes it safe to extract without consulting the disk: an
//! entry is only accepted if every ancestor is (in the model) a real
//! directory and the path itself is new, so extraction never follows a
//! symlink that an earlier entry planted, and never replaces anything.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::{BundleError, Limit, Limits, Policy};

/// Linux refuses paths longer than this, so such an entry could not be
/// extracted anyway; refusing it up front gives a clear message.
const MAX_PATH_BYTES: usize = 4096;
/// Longest file name Linux file systems accept.
const MAX_NAME_BYTES: usize = 255;
/// The kernel follows at most 40 symlinks while resolving one path; a
/// chain longer than that cannot be followed at run time either.
const MAX_LINK_HOPS: u32 = 40;
/// Resolving symlinks through other symlinks is the one check whose cost is
/// not linear in the archive size; this bounds the total work so that a
/// crafted bundle is rejected rather than keeping the server busy.
const MAX_RESOLVE_STEPS: u64 = 16 * 1024 * 1024;

/// What an entry is, once its type and link target have been decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink(PathBuf),
    /// Target is a normalised path relative to the root.
    HardLink(PathBuf),
}

impl Kind {
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Kind::Dir => "folder",
            Kind::File => "file",
            Kind::Symlink(_) => "symlink",
            Kind::HardLink(_) => "hard link",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File,
    Symlink(PathBuf),
}

/// What the extractor has to do for an accepted entry.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    /// Ancestors the archive did not list but implied; created first.
    pub new_parents: Vec<PathBuf>,
    /// The entry needs no action (a folder that already exists, or the root).
    pub skip: bool,
}

pub(crate) struct Checker {
    policy: Policy,
    limits: Limits,
    entries: u64,
    declared: u64,
    read: u64,
    content: u64,
    tree: HashMap<PathBuf, Node>,
    symlinks: Vec<PathBuf>,
}

impl Checker {
    pub(crate) fn new(policy: Policy, limits: Limits) -> Self {
        Checker {
            policy,
            limits,
            entries: 0,
            declared: 0,
            read: 0,
            content: 0,
            tree: HashMap::new(),
            symlinks: Vec::new(),
        }
    }

    pub(crate) fn policy(&self) -> Policy {
        self.policy
    }

    pub(crate) fn entries(&self) -> u64 {
        self.entries
    }

    pub(crate) fn content_bytes(&self) -> u64 {
        self.content
    }

    pub(crate) fn count_entry(&mut self) -> Result<(), BundleError> {
        self.entries += 1;
        if self.entries > self.limits.max_files {
            return Err(BundleError::LimitExceeded {
                limit: Limit::Files,
                value: self.limits.max_files,
            });
        }
        Ok(())
    }

    /// Counted before any data is read, so that a header announcing a huge
    /// entry is refused without decompressing it.
    pub(crate) fn count_declared(&mut self, bytes: u64) -> Result<(), BundleError> {
        self.declared = self.declared.saturating_add(bytes);
        self.check_unpacked(self.declared)
    }

    /// Counted as data is actually decompressed, so that the limit holds
    /// even if the declared sizes understate what the stream produces.
    pub(crate) fn count_read(&mut self, bytes: u64) -> Result<(), BundleError> {
        self.read = self.read.saturating_add(bytes);
        self.check_unpacked(self.read)
    }

    pub(crate) fn add_content(&mut self, bytes: u64) {
        self.content = self.content.saturating_add(bytes);
    }

    fn check_unpacked(&self, total: u64) -> Result<(), BundleError> {
        if total > self.limits.max_unpacked {
            return Err(BundleError::LimitExceeded {
                limit: Limit::Unpacked,
                value: self.limits.max_unpacked,
            });
        }
        Ok(())
    }

    /// The error for an entry type this policy does not accept.
    pub(crate) fn unsupported(&self, path: &str, kind: impl Into<String>) -> BundleError {
        BundleError::Unsupported {
            path: path.to_owned(),
            kind: kind.into(),
            allowed: match self.policy {
                Policy::Bundle => {
                    "bundles may only contain regular files, folders and symlinks; remove it from the app folder or list it in .steadignore"
                }
                Policy::Artifact => {
                    "built app folders may only contain regular files, folders, symlinks and hard links; remove it in the build"
                }
            },
        }
    }

    /// Checks one entry against the model and the policy, and records it.
    /// `path` must come from [`entry_path`]; `shown` is the name for errors.
    pub(crate) fn admit(
        &mut self,
        path: &Path,
        shown: &str,
        kind: &Kind,
    ) -> Result<Admitted, BundleError> {
        let mut admitted = Admitted::default();
        let names: Vec<&OsStr> = path.iter().collect();
        let Some((_, ancestors)) = names.split_last() else {
            // `./`, as written by `tar -C dir .`: the root folder itself.
            if *kind == Kind::Dir {
                admitted.skip = true;
                return Ok(admitted);
            }
            return Err(BundleError::BadName {
                path: shown.to_owned(),
                reason: "it names the app folder itself",
            });
        };

        let mut prefix = PathBuf::new();
        for name in ancestors {
            prefix.push(name);
            match self.tree.get(&prefix) {
                None => {
                    self.tree.insert(prefix.clone(), Node::Dir);
                    admitted.new_parents.push(prefix.clone());
                }
                Some(Node::Dir) => {}
                Some(other) => {
                    return Err(BundleError::ThroughNonDir {
                        path: shown.to_owned(),
                        parent: prefix.display().to_string(),
                        parent_kind: match other {
                            Node::Symlink(_) => "symlink",
                            _ => "file",
                        },
                    })
                }
            }
        }

        match (self.tree.get(path), kind) {
            (Some(Node::Dir), Kind::Dir) => {
                admitted.skip = true;
                return Ok(admitted);
            }
            (Some(_), _) => {
                return Err(BundleError::Duplicate {
                    path: shown.to_owned(),
                })
            }
            (None, _) => {}
        }

        let node = match kind {
            Kind::Dir => Node::Dir,
            Kind::File => Node::File,
            Kind::Symlink(target) => {
                if self.policy == Policy::Bundle && !stays_inside_lexically(path, target) {
                    return Err(BundleError::LinkEscapes {
                        path: shown.to_owned(),
                        target: target.display().to_string(),
                    });
                }
                self.symlinks.push(path.to_path_buf());
                Node::Symlink(target.clone())
            }
            Kind::HardLink(target) => {
                if self.policy == Policy::Bundle {
                    return Err(self.unsupported(shown, "hard link"));
                }
                // Only to a file already written: then the link cannot be
                // made to point through a symlink or at a folder.
                if self.tree.get(target) != Some(&Node::File) {
                    return Err(BundleError::BadHardLink {
                        path: shown.to_owned(),
                        target: target.display().to_string(),
                    });
                }
                Node::File
            }
        };
        self.tree.insert(path.to_path_buf(), node);
        Ok(admitted)
    }

    /// Checks what can only be checked once the whole tree is known: for
    /// user bundles, that no symlink reaches outside the root by going
    /// through other symlinks (`up -> .` makes `up/../x` lexically harmless
    /// but physically the root's parent).
    pub(crate) fn finish(&self) -> Result<(), BundleError> {
        if self.policy != Policy::Bundle {
            return Ok(());
        }
        let mut budget = MAX_RESOLVE_STEPS;
        for link in &self.symlinks {
            let Some(Node::Symlink(target)) = self.tree.get(link) else {
                continue;
            };
            self.resolve(link, target, &mut budget)?;
        }
        Ok(())
    }

    /// Follows `link` the way the kernel would, using the model, and fails
    /// if the walk ever leaves the root.
    fn resolve(&self, link: &Path, target: &Path, budget: &mut u64) -> Result<(), BundleError> {
        let escapes = || BundleError::LinkEscapes {
            path: link.display().to_string(),
            target: target.display().to_string(),
        };
        let too_deep = || BundleError::LinkLoop {
            path: link.display().to_string(),
            target: target.display().to_string(),
        };
        let mut here = link.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut queue: VecDeque<Component<'_>> = target.components().collect();
        let mut hops = 0u32;
        while let Some(component) = queue.pop_front() {
            *budget = budget.checked_sub(1).ok_or_else(too_deep)?;
            match component {
                Component::CurDir => {}
                Component::ParentDir => {
                    if here.as_os_str().is_empty() {
                        return Err(escapes());
                    }
                    here.pop();
                }
                Component::RootDir | Component::Prefix(_) => return Err(escapes()),
                Component::Normal(name) => {
                    here.push(name);
                    if let Some(Node::Symlink(next)) = self.tree.get(&here) {
                        hops += 1;
                        if hops > MAX_LINK_HOPS {
                            return Err(too_deep());
                        }
                        here.pop();
                        for c in next.components().rev() {
                            queue.push_front(c);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a relative symlink target, taken from the link's folder, stays
/// inside the root without considering other links (those are checked in
/// [`Checker::finish`]). Gives the early, precise error for the common case.
fn stays_inside_lexically(link: &Path, target: &Path) -> bool {
    let mut depth = link.components().count().saturating_sub(1);
    for component in target.components() {
        match component {
            Component::CurDir => {}
            Component::Normal(_) => depth += 1,
            Component::ParentDir => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Lossy rendering of a raw entry name, for error messages.
pub(crate) fn shown(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

/// Turns a raw entry name into a normalised relative path (only normal
/// components; `.` dropped), refusing anything that could land outside the
/// destination. An empty result means the root itself.
pub(crate) fn entry_path(raw: &[u8]) -> Result<PathBuf, BundleError> {
    let bad = |reason| BundleError::BadName {
        path: shown(raw),
        reason,
    };
    if raw.contains(&0) {
        return Err(bad("it contains a NUL byte"));
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(bad("it is longer than 4096 bytes"));
    }
    let path = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => {
                if name.len() > MAX_NAME_BYTES {
                    return Err(bad("one of its names is longer than 255 bytes"));
                }
                out.push(name);
            }
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(BundleError::PathEscapes { path: shown(raw) });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(BundleError::AbsolutePath { path: shown(raw) });
            }
        }
    }
    Ok(out)
}

/// A symlink target is stored as given; whether it may point there is the
/// checker's decision.
pub(crate) fn symlink_target(shown_path: &str, raw: Option<&[u8]>) -> Result<PathBuf, BundleError> {
    let bad = |reason| BundleError::BadName {
        path: shown_path.to_owned(),
        reason,
    };
    let raw = raw.unwrap_or_default();
    if raw.is_empty() {
        return Err(bad("it is a symlink with an empty target"));
    }
    if raw.contains(&0) {
        return Err(bad("its symlink target contains a NUL byte"));
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(bad("its symlink target is longer than 4096 bytes"));
    }
    Ok(PathBuf::from(OsStr::from_bytes(raw)))
}

/// Hard-link targets name another entry, so they obey the entry-name rules.
pub(crate) fn hardlink_target(
    shown_path: &str,
    raw: Option<&[u8]>,
) -> Result<PathBuf, BundleError> {
    let raw = raw.unwrap_or_default();
    let target = entry_path(raw).map_err(|_| BundleError::BadHardLink {
        path: shown_path.to_owned(),
        target: shown(raw),
    })?;
    if target.as_os_str().is_empty() {
        return Err(BundleError::BadHardLink {
            path: shown_path.to_owned(),
            target: shown(raw),
        });
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker() -> Checker {
        Checker::new(Policy::Bundle, Limits::default())
    }

    fn admit(c: &mut Checker, path: &str, kind: Kind) -> Result<Admitted, BundleError> {
        let p = entry_path(path.as_bytes())?;
        c.admit(&p, path, &kind)
    }

    #[test]
    fn entry_names_are_normalised_or_refused() {
        assert_eq!(entry_path(b"./a//b/./c").unwrap(), PathBuf::from("a/b/c"));
        assert_eq!(entry_path(b"./").unwrap(), PathBuf::new());
        assert!(matches!(
            entry_path(b"a/../../b"),
            Err(BundleError::PathEscapes { .. })
        ));
        assert!(matches!(
            entry_path(b"/etc/passwd"),
            Err(BundleError::AbsolutePath { .. })
        ));
        assert!(matches!(
            entry_path(&[b'a'; 300]),
            Err(BundleError::BadName { .. })
        ));
    }

    #[test]
    fn lexical_symlink_rule() {
        let l = Path::new("a/b/link");
        assert!(stays_inside_lexically(l, Path::new("../../x")));
        assert!(!stays_inside_lexically(l, Path::new("../../../x")));
        assert!(!stays_inside_lexically(l, Path::new("/etc")));
        assert!(stays_inside_lexically(l, Path::new("./c/../d")));
        assert!(!stays_inside_lexically(Path::new("top"), Path::new("..")));
    }

    #[test]
    fn symlink_chains_through_other_links_are_resolved_physically() {
        let mut c = checker();
        admit(&mut c, "dot", Kind::Symlink(".".into())).unwrap();
        // Lexically `dot/../etc` is `etc`, inside; physically `dot` is the
        // root, so `dot/..` is its parent.
        admit(&mut c, "esc", Kind::Symlink("dot/../etc".into())).unwrap();
        assert!(matches!(c.finish(), Err(BundleError::LinkEscapes { .. })));

        let mut c = checker();
        admit(&mut c, "d/sub/x", Kind::File).unwrap();
        admit(&mut c, "deep", Kind::Symlink("d/sub".into())).unwrap();
        admit(&mut c, "ok", Kind::Symlink("deep/../sub/x".into())).unwrap();
        c.finish().unwrap();

        let mut c = checker();
        admit(&mut c, "a", Kind::Symlink("b".into())).unwrap();
        admit(&mut c, "b", Kind::Symlink("a".into())).unwrap();
        assert!(matches!(c.finish(), Err(BundleError::LinkLoop { .. })));
    }

    #[test]
    fn entries_inside_links_and_files_and_duplicates_are_refused() {
        let mut c = Checker::new(Policy::Artifact, Limits::default());
        admit(&mut c, "link", Kind::Symlink("/tmp".into())).unwrap();
        assert!(matches!(
            admit(&mut c, "link/evil", Kind::File),
            Err(BundleError::ThroughNonDir { .. })
        ));
        assert!(matches!(
            admit(&mut c, "link", Kind::File),
            Err(BundleError::Duplicate { .. })
        ));
        admit(&mut c, "f", Kind::File).unwrap();
        assert!(matches!(
            admit(&mut c, "f/g", Kind::File),
            Err(BundleError::ThroughNonDir { .. })
        ));
        admit(&mut c, "d/e", Kind::File).unwrap();
        assert!(admit(&mut c, "d", Kind::Dir).unwrap().skip);
        assert!(matches!(
            admit(&mut c, "h", Kind::HardLink("link".into())),
            Err(BundleError::BadHardLink { .. })
        ));
        admit(&mut c, "h", Kind::HardLink("f".into())).unwrap();
    }
}
