//! Packing real folders and reading them back.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{assert_accepted, listing, Raw};
use stead_bundle::{
    inspect, pack_dir, sha256_file, unpack, BundleError, Limits, PackOptions, PackStats, Policy,
};

fn write(root: &Path, rel: &str, data: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

fn pack(dir: &Path, opts: PackOptions) -> (Vec<u8>, PackStats) {
    let mut out = Vec::new();
    let stats = pack_dir(dir, &opts, &mut out, &mut |_, _| {}).unwrap();
    (out, stats)
}

/// A small app folder with the things that matter: configs, an executable,
/// an internal symlink, an empty folder and a name too long for a plain tar header.
fn sample_app() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    write(&app, "stead.toml", "name = \"hello\"\n");
    write(&app, "dbos-config.yaml", "name: hello\n");
    write(&app, "src/main.py", "print('hello')\n");
    write(&app, "run.sh", "#!/bin/sh\nexec python3 src/main.py\n");
    fs::set_permissions(app.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(
        app.join("src/main.py"),
        fs::Permissions::from_mode(0o4600), // setuid must not survive
    )
    .unwrap();
    std::os::unix::fs::symlink("src/main.py", app.join("main-link")).unwrap();
    std::os::unix::fs::symlink("../stead.toml", app.join("src/config-link")).unwrap();
    fs::create_dir_all(app.join("empty/dir")).unwrap();
    let long = format!("{}/{}.txt", "d".repeat(120), "f".repeat(150));
    write(&app, &long, "long name\n");
    (tmp, app)
}

#[test]
fn pack_inspect_unpack_round_trip() {
    let (tmp, app) = sample_app();
    let mut calls = Vec::new();
    let mut out = Vec::new();
    let stats = pack_dir(&app, &PackOptions::BUNDLE, &mut out, &mut |f, b| {
        calls.push((f, b))
    })
    .unwrap();

    // The stats describe the output.
    assert_eq!(stats.compressed_bytes, out.len() as u64);
    let bundle_path = tmp.path().join("bundle.tar.zst");
    fs::write(&bundle_path, &out).unwrap();
    assert_eq!(sha256_file(&bundle_path).unwrap(), stats.sha256);
    assert_eq!(
        calls.last().copied(),
        Some((stats.files, stats.unpacked_bytes))
    );
    assert!(calls
        .windows(2)
        .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));

    let dest = tmp.path().join("out");
    let seen = assert_accepted(&out, Policy::Bundle, &Limits::default(), &dest);
    assert_eq!(seen.files, stats.files);
    assert_eq!(seen.unpacked_bytes, stats.unpacked_bytes);
    assert_eq!(seen.stead_toml.as_deref(), Some("name = \"hello\"\n"));
    assert_eq!(seen.dbos_config.as_deref(), Some("name: hello\n"));

    assert_eq!(listing(&app), listing(&dest));
    for rel in listing(&app) {
        let (a, b) = (app.join(&rel), dest.join(&rel));
        let (ma, mb) = (
            fs::symlink_metadata(&a).unwrap(),
            fs::symlink_metadata(&b).unwrap(),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "{rel}");
        if ma.is_file() {
            assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap(), "{rel}");
            assert_eq!(ma.mtime(), mb.mtime(), "{rel}: modification time kept");
        }
    }

    let mode = |rel: &str| fs::metadata(dest.join(rel)).unwrap().mode() & 0o7777;
    assert_eq!(
        mode("run.sh"),
        0o755,
        "executable bit kept, readable by all"
    );
    assert_eq!(mode("src/main.py"), 0o644, "setuid dropped");
    assert_eq!(mode("empty/dir"), 0o755);

    let link = dest.join("main-link");
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("src/main.py"));
    assert_eq!(fs::read_to_string(&link).unwrap(), "print('hello')\n");
}

#[test]
fn packing_is_deterministic() {
    let (_tmp, app) = sample_app();
    let (a, sa) = pack(&app, PackOptions::BUNDLE);
    let (b, sb) = pack(&app, PackOptions::BUNDLE);
    assert_eq!(a, b);
    assert_eq!(sa, sb);
}

#[test]
fn default_excludes_skip_folders_at_any_depth() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    for dir in [".git", "target", "node_modules", ".venv"] {
        write(&app, &format!("{dir}/x"), "x");
        write(&app, &format!("sub/{dir}/y"), "y");
    }
    write(&app, "sub/keep.txt", "k");
    write(&app, "target.txt", "not a folder, kept");
    write(&app, ".gitignore", "kept: only .steadignore matters");

    let (out, _) = pack(&app, PackOptions::BUNDLE);
    let dest = tmp.path().join("bundle");
    unpack(&out[..], &dest, Policy::Bundle, &Limits::default()).unwrap();
    assert_eq!(
        listing(&dest),
        vec![".gitignore", "sub", "sub/keep.txt", "target.txt"]
    );

    // An artifact is the folder exactly as built.
    let (out, _) = pack(&app, PackOptions::ARTIFACT);
    let dest = tmp.path().join("artifact");
    unpack(&out[..], &dest, Policy::Artifact, &Limits::default()).unwrap();
    assert_eq!(listing(&dest), listing(&app));
}

#[test]
fn steadignore_is_honoured_like_gitignore() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    write(
        &app,
        ".steadignore",
        "*.log\n!keep.log\nsecrets/\n/data.db\n",
    );
    write(&app, "a.log", "");
    write(&app, "keep.log", "");
    write(&app, "secrets/key", "");
    write(&app, "data.db", "");
    write(
        &app,
        "sub/data.db",
        "anchored pattern only matches at the root",
    );
    write(&app, "sub/b.log", "");
    write(&app, "sub/.steadignore", "local.txt\n");
    write(&app, "sub/local.txt", "");
    write(&app, "local.txt", "nested file only applies below sub/");
    write(&app, "main.py", "");

    let (out, stats) = pack(&app, PackOptions::BUNDLE);
    let dest = tmp.path().join("out");
    let seen = unpack(&out[..], &dest, Policy::Bundle, &Limits::default()).unwrap();
    assert_eq!(seen.files, stats.files);
    assert_eq!(
        listing(&dest),
        vec![
            ".steadignore",
            "keep.log",
            "local.txt",
            "main.py",
            "sub",
            "sub/.steadignore",
            "sub/data.db",
        ]
    );

    let (out, _) = pack(
        &app,
        PackOptions {
            default_excludes: true,
            honour_steadignore: false,
        },
    );
    let dest = tmp.path().join("all");
    unpack(&out[..], &dest, Policy::Bundle, &Limits::default()).unwrap();
    assert_eq!(listing(&dest), listing(&app));
}

#[test]
fn packing_skips_sockets_and_stores_symlinks_unfollowed() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    write(&app, "main.py", "");
    let _socket = std::os::unix::net::UnixListener::bind(app.join("app.sock")).unwrap();
    std::os::unix::fs::symlink("/etc", app.join("etc-link")).unwrap();

    let (out, stats) = pack(&app, PackOptions::ARTIFACT);
    assert_eq!(stats.files, 2, "socket skipped, symlink stored");

    // A user bundle may not carry that link...
    let err = inspect(&out[..], Policy::Bundle, &Limits::default()).unwrap_err();
    assert!(
        matches!(&err, BundleError::LinkEscapes { path, target } if path == "etc-link" && target == "/etc"),
        "{err:?}"
    );
    assert!(err.to_string().contains("outside the app folder"));

    // ...but an artifact may, and it is unpacked as a link, not a copy of /etc.
    let dest = tmp.path().join("out");
    unpack(&out[..], &dest, Policy::Artifact, &Limits::default()).unwrap();
    let meta = fs::symlink_metadata(dest.join("etc-link")).unwrap();
    assert!(meta.file_type().is_symlink());
    assert_eq!(
        fs::read_link(dest.join("etc-link")).unwrap(),
        Path::new("/etc")
    );
    assert_eq!(listing(&dest), vec!["etc-link", "main.py"]);
}

#[test]
fn artifact_accepts_absolute_symlinks_and_internal_hard_links() {
    let tmp = tempfile::tempdir().unwrap();
    // The target exists outside the destination; unpacking must not touch it.
    let outside = tmp.path().join("python3");
    fs::write(&outside, "real interpreter").unwrap();
    let target = outside.to_str().unwrap();

    let bundle = Raw::new()
        .dir(".venv/bin")
        .symlink(".venv/bin/python", target)
        .file_mode("bin/tool", b"#!/bin/sh\n", 0o755)
        .hardlink("bin/tool-again", "bin/tool")
        .zst();
    let dest = tmp.path().join("out");
    let seen = assert_accepted(&bundle, Policy::Artifact, &Limits::default(), &dest);
    assert_eq!(seen.files, 4);

    let link = dest.join(".venv/bin/python");
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), outside);
    assert_eq!(fs::read_to_string(&outside).unwrap(), "real interpreter");
    let tool = fs::metadata(dest.join("bin/tool")).unwrap();
    assert_eq!(tool.nlink(), 2);
    assert_eq!(tool.mode() & 0o7777, 0o755);
}

#[test]
fn modes_are_normalised() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = Raw::new()
        .file_mode("suid", b"x", 0o6777)
        .file_mode("private", b"x", 0o600)
        .file_mode("none", b"x", 0o000)
        .zst();
    let dest = tmp.path().join("out");
    assert_accepted(&bundle, Policy::Bundle, &Limits::default(), &dest);
    let mode = |rel: &str| fs::metadata(dest.join(rel)).unwrap().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("private"), 0o644);
    assert_eq!(mode("none"), 0o644);
}

#[test]
fn empty_archives_and_root_entries_are_fine() {
    let tmp = tempfile::tempdir().unwrap();
    let seen = inspect(&Raw::new().zst()[..], Policy::Bundle, &Limits::default()).unwrap();
    assert_eq!(seen.files, 0);
    assert_eq!(seen.stead_toml, None);

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let (out, stats) = pack(&empty, PackOptions::BUNDLE);
    assert_eq!(stats.files, 0);
    assert_eq!(
        inspect(&out[..], Policy::Bundle, &Limits::default())
            .unwrap()
            .files,
        0
    );

    // As written by `tar -C app .`.
    let bundle = Raw::new().dir("./").file("./a.txt", b"a").zst();
    let dest = tmp.path().join("out");
    assert_accepted(&bundle, Policy::Bundle, &Limits::default(), &dest);
    assert_eq!(listing(&dest), vec!["a.txt"]);
}

#[test]
fn unpack_refuses_a_non_empty_destination_and_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("out");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("precious"), "keep me").unwrap();
    let bundle = Raw::new().file("a", b"a").zst();
    let err = unpack(&bundle[..], &dest, Policy::Bundle, &Limits::default()).unwrap_err();
    assert!(matches!(err, BundleError::BadDestination { .. }), "{err:?}");
    assert_eq!(listing(&dest), vec!["precious"]);

    let file = tmp.path().join("file");
    fs::write(&file, "").unwrap();
    let err = unpack(&bundle[..], &file, Policy::Bundle, &Limits::default()).unwrap_err();
    assert!(matches!(err, BundleError::BadDestination { .. }), "{err:?}");

    // An existing empty folder is fine, and a missing one is created with its parents.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    unpack(&bundle[..], &empty, Policy::Bundle, &Limits::default()).unwrap();
    let nested = tmp.path().join("a/b/c");
    unpack(&bundle[..], &nested, Policy::Bundle, &Limits::default()).unwrap();
    assert_eq!(listing(&nested), vec!["a"]);
}

#[test]
fn pack_dir_reports_a_missing_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let err = pack_dir(
        &tmp.path().join("nope"),
        &PackOptions::BUNDLE,
        Vec::new(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, BundleError::ReadSource { .. }), "{err:?}");
    fs::write(tmp.path().join("file"), "").unwrap();
    let err = pack_dir(
        &tmp.path().join("file"),
        &PackOptions::BUNDLE,
        Vec::new(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, BundleError::NotAFolder { .. }), "{err:?}");
}
