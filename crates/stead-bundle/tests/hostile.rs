//! Hand-built hostile archives. Each test fails if the protection it names
//! is removed: `assert_refused` checks both `inspect` and `unpack`, and that
//! a failed unpack leaves nothing behind.

mod common;

use std::fs;
use std::io::{self, Read};

use common::{assert_refused, listing, raw_header, set_link, zst, Raw};
use stead_bundle::{inspect, pack_dir, unpack, BundleError, Limit, Limits, PackOptions, Policy};
use tar::{EntryType, Header};

const BOTH: [Policy; 2] = [Policy::Bundle, Policy::Artifact];

fn limits() -> Limits {
    Limits::default()
}

#[test]
fn absolute_entry_paths_are_refused() {
    for policy in BOTH {
        let bundle = Raw::new()
            .file("/etc/passwd", b"root::0:0::/:/bin/sh\n")
            .zst();
        let err = assert_refused(
            &bundle,
            policy,
            &limits(),
            |e| matches!(e, BundleError::AbsolutePath { path } if path == "/etc/passwd"),
        );
        assert!(err.to_string().contains("absolute path"), "{err}");
    }
}

#[test]
fn parent_dir_entry_paths_are_refused() {
    for policy in BOTH {
        for name in ["../etc/passwd", "a/../../etc/passwd", "a/.."] {
            let bundle = Raw::new().file(name, b"x").zst();
            let err = assert_refused(
                &bundle,
                policy,
                &limits(),
                |e| matches!(e, BundleError::PathEscapes { path } if path == name),
            );
            if name == "../etc/passwd" {
                assert_eq!(
                    err.to_string(),
                    "bundle entry `../etc/passwd` escapes the app folder; \
                     bundles may only contain paths inside the folder"
                );
            }
        }
    }
}

#[test]
fn backslash_names_are_not_reinterpreted_as_parent_dirs() {
    // A ustar header whose name contains `\` is read by the `tar` crate
    // with `\` turned into `/`; whatever the spelling, `..` must not pass.
    let mut h = Header::new_ustar();
    h.as_ustar_mut().unwrap().name[..11].copy_from_slice(b"..\\evil.txt");
    h.set_entry_type(EntryType::Regular);
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    let bundle = Raw::new().header(&h, b"x").zst();
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("out");
    match unpack(&bundle[..], &dest, Policy::Bundle, &limits()) {
        Ok(_) => assert!(!tmp.path().join("evil.txt").exists()),
        Err(e) => assert!(matches!(e, BundleError::PathEscapes { .. }), "{e:?}"),
    }
    assert!(!tmp.path().join("evil.txt").exists());
}

#[test]
fn bundle_symlinks_must_stay_inside() {
    for (name, target) in [
        ("etc", "/etc"),
        ("up", "../.."),
        ("up1", ".."),
        ("deep/up", "../../x"),
        ("sneaky", "a/../../x"),
    ] {
        let bundle = Raw::new().symlink(name, target).zst();
        let err = assert_refused(
            &bundle,
            Policy::Bundle,
            &limits(),
            |e| matches!(e, BundleError::LinkEscapes { path, target: t } if path == name && t == target),
        );
        assert!(err.to_string().contains("points outside the app folder"));
    }
    // Inside is fine.
    let tmp = tempfile::tempdir().unwrap();
    let bundle = Raw::new()
        .file("a/b/f", b"f")
        .symlink("a/b/up", "../../a/b/f")
        .symlink("dangling", "not/there")
        .zst();
    common::assert_accepted(&bundle, Policy::Bundle, &limits(), &tmp.path().join("out"));
}

#[test]
fn bundle_symlinks_escaping_through_other_symlinks_are_refused() {
    // `here -> .` is the root; `here/..` is then the root's parent, although
    // lexically `esc -> here/../etc` looks like `etc`.
    let bundle = Raw::new()
        .symlink("here", ".")
        .symlink("esc", "here/../etc")
        .zst();
    assert_refused(
        &bundle,
        Policy::Bundle,
        &limits(),
        |e| matches!(e, BundleError::LinkEscapes { path, .. } if path == "esc"),
    );
    // Order does not matter: the chain is checked once the tree is complete.
    let bundle = Raw::new()
        .symlink("esc", "d/here/../../etc")
        .symlink("d/here", "..")
        .zst();
    assert_refused(
        &bundle,
        Policy::Bundle,
        &limits(),
        |e| matches!(e, BundleError::LinkEscapes { path, .. } if path == "esc"),
    );
}

#[test]
fn hard_links_are_refused_in_bundles_and_confined_in_artifacts() {
    let bundle = Raw::new().file("f", b"f").hardlink("h", "f").zst();
    assert_refused(
        &bundle,
        Policy::Bundle,
        &limits(),
        |e| matches!(e, BundleError::Unsupported { kind, .. } if kind == "hard link"),
    );
    for target in ["/etc/passwd", "../../etc/passwd", "missing", "link", "d"] {
        let bundle = Raw::new()
            .file("f", b"f")
            .symlink("link", "/etc/passwd")
            .dir("d")
            .hardlink("h", target)
            .zst();
        assert_refused(
            &bundle,
            Policy::Artifact,
            &limits(),
            |e| matches!(e, BundleError::BadHardLink { path, target: t } if path == "h" && t == target),
        );
    }
}

#[test]
fn nothing_is_written_through_a_symlink() {
    // The classic tar-slip: `link -> <outside>`, then `link/evil`. Artifacts
    // accept the link itself, so only the through-link check stops this.
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let target = outside.to_str().unwrap().to_owned();

    for policy in BOTH {
        let bundle = Raw::new()
            .symlink("link", &target)
            .file("link/evil", b"pwned")
            .zst();
        assert_refused(&bundle, policy, &limits(), |e| match policy {
            // A bundle already refuses the link.
            Policy::Bundle => matches!(e, BundleError::LinkEscapes { .. }),
            Policy::Artifact => matches!(
                e,
                BundleError::ThroughNonDir { path, parent, parent_kind: "symlink" }
                    if path == "link/evil" && parent == "link"
            ),
        });
        let dest = tmp.path().join("dest");
        let _ = unpack(&bundle[..], &dest, policy, &limits());
        assert!(!dest.exists());
        assert_eq!(listing(&outside), Vec::<String>::new(), "{policy:?}");
    }

    // Even a link that stays inside may not be written through: the model
    // would no longer match the disk.
    let bundle = Raw::new()
        .dir("real")
        .symlink("alias", "real")
        .file("alias/f", b"x")
        .zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(
            e,
            BundleError::ThroughNonDir {
                parent_kind: "symlink",
                ..
            }
        )
    });

    // Replacing the link by a file of the same name would open it through the link.
    let bundle = Raw::new()
        .symlink("link", &format!("{target}/replaced"))
        .file("link", b"pwned")
        .zst();
    assert_refused(
        &bundle,
        Policy::Artifact,
        &limits(),
        |e| matches!(e, BundleError::Duplicate { path } if path == "link"),
    );
    assert_eq!(listing(&outside), Vec::<String>::new());

    // And a hard link to a symlink would be one more way to reach outside.
    let bundle = Raw::new()
        .symlink("link", &target)
        .hardlink("h", "link")
        .zst();
    assert_refused(&bundle, Policy::Artifact, &limits(), |e| {
        matches!(e, BundleError::BadHardLink { .. })
    });
}

#[test]
fn entries_inside_files_and_duplicates_are_refused() {
    let bundle = Raw::new().file("f", b"f").file("f/g", b"g").zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(
            e,
            BundleError::ThroughNonDir {
                parent_kind: "file",
                ..
            }
        )
    });
    let bundle = Raw::new().file("f", b"1").file("./f", b"2").zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(e, BundleError::Duplicate { .. })
    });
    let bundle = Raw::new().dir("d").file("d", b"2").zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(e, BundleError::Duplicate { .. })
    });
}

#[test]
fn devices_and_fifos_are_refused() {
    for policy in BOTH {
        for (etype, kind) in [
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
            (EntryType::Fifo, "fifo (named pipe)"),
            (EntryType::new(b'Z'), "entry of unknown type `Z`"),
        ] {
            let bundle = Raw::new().file("ok", b"").special("dev", etype).zst();
            assert_refused(
                &bundle,
                policy,
                &limits(),
                |e| matches!(e, BundleError::Unsupported { path, kind: k, .. } if path == "dev" && k == kind),
            );
        }
    }
}

/// 64 MiB of zeros behind one tar header: a few KiB compressed.
fn zero_bomb(size: u64) -> Vec<u8> {
    let h = raw_header(b"zeros", EntryType::Regular, size);
    let stream = io::Cursor::new(h.as_bytes().to_vec())
        .chain(io::repeat(0).take(size))
        .chain(io::repeat(0).take(1024));
    zstd::stream::encode_all(stream, 1).unwrap()
}

#[test]
fn compression_bombs_stop_at_the_unpacked_limit() {
    const SIZE: u64 = 64 * 1024 * 1024;
    let bomb = zero_bomb(SIZE);
    assert!((bomb.len() as u64) < SIZE / 1000, "{} bytes", bomb.len());
    let small = Limits {
        max_unpacked: 1024 * 1024,
        ..Limits::default()
    };
    let err = assert_refused(&bomb, Policy::Bundle, &small, |e| {
        matches!(
            e,
            BundleError::LimitExceeded {
                limit: Limit::Unpacked,
                value: 1048576
            }
        )
    });
    let msg = err.to_string();
    assert!(msg.contains("max_unpacked = 1048576"), "{msg}");
    assert!(msg.contains("1 MiB"), "{msg}");

    // The same bomb with a header that understates its size: the zeros then
    // follow the end-of-archive marker, and are still decompressed and counted.
    let mut tar = Raw::new().file("small", b"hello").tar();
    tar.extend(std::iter::repeat_n(0u8, 8 * 1024 * 1024));
    let bundle = zst(&tar);
    assert_refused(&bundle, Policy::Bundle, &small, |e| {
        matches!(
            e,
            BundleError::LimitExceeded {
                limit: Limit::Unpacked,
                ..
            }
        )
    });
}

#[test]
fn a_header_claiming_a_huge_size_is_refused_before_reading() {
    // 3 GiB declared, one block of data: the default 2 GiB limit trips on
    // the declared size alone, without decompressing anything.
    let h = raw_header(b"huge", EntryType::Regular, 3 * 1024 * 1024 * 1024);
    let bundle = Raw::new().header(&h, &[0u8; 512]).zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(
            e,
            BundleError::LimitExceeded {
                limit: Limit::Unpacked,
                value: 2147483648
            }
        )
    });
}

#[test]
fn header_size_lies_are_caught() {
    // Declares 100 bytes, the stream has 10.
    let h = raw_header(b"short", EntryType::Regular, 100);
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(b"0123456789");
    assert_refused(&zst(&tar), Policy::Bundle, &limits(), |e| {
        matches!(e, BundleError::Truncated { .. })
    });

    // Declares 10 bytes but 2000 follow: the rest is taken as a header and
    // does not pass the checksum.
    let h = raw_header(b"long", EntryType::Regular, 10);
    let mut tar = h.as_bytes().to_vec();
    tar.extend(std::iter::repeat_n(b'A', 2000));
    tar.extend_from_slice(&[0u8; 1024]);
    assert_refused(&zst(&tar), Policy::Bundle, &limits(), |e| {
        matches!(e, BundleError::CorruptTar { .. })
    });

    // A PAX record overriding the size: other readers would see different
    // entry boundaries than we do, so it is refused.
    let pax = b"16 size=1000000\n";
    let ph = raw_header(b"pax", EntryType::XHeader, pax.len() as u64);
    let bundle = Raw::new().header(&ph, pax).file("f", b"small").zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(e, BundleError::UnsupportedExtension { .. })
    });

    // A GNU sparse entry expands a little data into a large file.
    let mut sh = raw_header(b"sparse", EntryType::GNUSparse, 512);
    sh.as_gnu_mut().unwrap().set_real_size(1 << 40);
    sh.set_cksum();
    let bundle = Raw::new().header(&sh, &[0u8; 512]).zst();
    assert_refused(
        &bundle,
        Policy::Artifact,
        &limits(),
        |e| matches!(e, BundleError::Unsupported { kind, .. } if kind == "sparse file"),
    );
}

#[test]
fn oversized_extension_records_are_refused_unread() {
    // The `tar` crate would read a long-name record of any size into memory.
    let size = 1024 * 1024;
    let h = raw_header(b"././@LongLink", EntryType::GNULongName, size);
    let stream = io::Cursor::new(h.as_bytes().to_vec())
        .chain(io::repeat(b'a').take(size))
        .chain(io::Cursor::new(
            raw_header(b"x", EntryType::Regular, 0).as_bytes().to_vec(),
        ))
        .chain(io::repeat(0).take(1024));
    let bundle = zstd::stream::encode_all(stream, 1).unwrap();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(e, BundleError::UnsupportedExtension { .. })
    });
}

#[test]
fn long_names_cannot_smuggle_escapes() {
    // GNU long name and PAX path carry the real name; it is checked like any other.
    let name = b"../../../../etc/cron.d/evil\0";
    let lh = raw_header(b"././@LongLink", EntryType::GNULongName, name.len() as u64);
    let bundle = Raw::new().header(&lh, name).file("innocent", b"x").zst();
    assert_refused(
        &bundle,
        Policy::Artifact,
        &limits(),
        |e| matches!(e, BundleError::PathEscapes { path } if path == "../../../../etc/cron.d/evil"),
    );

    let pax = b"21 path=/etc/shadow2\n";
    let ph = raw_header(b"pax", EntryType::XHeader, pax.len() as u64);
    let bundle = Raw::new().header(&ph, pax).file("innocent", b"x").zst();
    assert_refused(
        &bundle,
        Policy::Artifact,
        &limits(),
        |e| matches!(e, BundleError::AbsolutePath { path } if path == "/etc/shadow2"),
    );

    let link = b"../../../../etc\0";
    let kh = raw_header(b"././@LongLink", EntryType::GNULongLink, link.len() as u64);
    let mut sh = raw_header(b"innocent", EntryType::Symlink, 0);
    set_link(&mut sh, b"inside");
    let bundle = Raw::new().header(&kh, link).header(&sh, &[]).zst();
    assert_refused(
        &bundle,
        Policy::Bundle,
        &limits(),
        |e| matches!(e, BundleError::LinkEscapes { target, .. } if target == "../../../../etc"),
    );
}

#[test]
fn too_many_files_are_refused() {
    let mut raw = Raw::new();
    for i in 0..20 {
        raw = raw.file(&format!("f{i}"), b"");
    }
    let bundle = raw.zst();
    let small = Limits {
        max_files: 10,
        ..Limits::default()
    };
    let err = assert_refused(&bundle, Policy::Bundle, &small, |e| {
        matches!(
            e,
            BundleError::LimitExceeded {
                limit: Limit::Files,
                value: 10
            }
        )
    });
    assert!(err.to_string().contains("max_files = 10"));
    // Exactly at the limit is fine.
    let exact = Limits {
        max_files: 20,
        ..Limits::default()
    };
    assert_eq!(
        inspect(&bundle[..], Policy::Bundle, &exact).unwrap().files,
        20
    );
}

#[test]
fn the_compressed_limit_is_counted_on_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    fs::create_dir(&app).unwrap();
    // Incompressible content.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    fs::write(app.join("noise"), &noise).unwrap();
    let mut bundle = Vec::new();
    pack_dir(&app, &PackOptions::BUNDLE, &mut bundle, &mut |_, _| {}).unwrap();
    let small = Limits {
        max_compressed: 16 * 1024,
        ..Limits::default()
    };
    let err = assert_refused(&bundle, Policy::Bundle, &small, |e| {
        matches!(
            e,
            BundleError::LimitExceeded {
                limit: Limit::Compressed,
                value: 16384
            }
        )
    });
    assert!(err.to_string().contains("max_compressed = 16384"), "{err}");
}

#[test]
fn garbage_is_not_a_bundle() {
    for garbage in [
        b"hello, this is not zstd at all".to_vec(),
        vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3], // gzip
        Raw::new().file("f", b"plain tar").tar(),
    ] {
        let err = assert_refused(&garbage, Policy::Bundle, &limits(), |e| {
            matches!(e, BundleError::NotZstd { .. })
        });
        assert!(err
            .to_string()
            .starts_with("the upload is not a zstd-compressed tar archive: "));
    }
    let err = inspect(&b""[..], Policy::Bundle, &limits()).unwrap_err();
    assert!(matches!(err, BundleError::NotZstd { .. }), "{err:?}");
    assert!(err.to_string().contains("empty"), "{err}");
    // A valid zstd frame of nothing is an empty archive.
    assert_eq!(
        inspect(&zst(b"")[..], Policy::Bundle, &limits())
            .unwrap()
            .files,
        0
    );

    // Valid zstd around something that is not tar.
    let bundle = zst(&[b'x'; 4096]);
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(e, BundleError::CorruptTar { .. })
    });
}

#[test]
fn truncated_and_corrupted_streams_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    fs::create_dir(&app).unwrap();
    let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    fs::write(app.join("a.txt"), &text).unwrap();
    fs::write(app.join("stead.toml"), "name = \"x\"\n").unwrap();
    let mut bundle = Vec::new();
    pack_dir(&app, &PackOptions::BUNDLE, &mut bundle, &mut |_, _| {}).unwrap();
    inspect(&bundle[..], Policy::Bundle, &limits()).unwrap();

    for cut in [bundle.len() / 2, bundle.len() - 1, 10] {
        assert_refused(&bundle[..cut], Policy::Bundle, &limits(), |e| {
            matches!(e, BundleError::Truncated { .. })
        });
    }

    let mut damaged = bundle.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    assert_refused(&damaged, Policy::Bundle, &limits(), |e| {
        matches!(
            e,
            BundleError::CorruptZstd { .. } | BundleError::CorruptTar { .. }
        )
    });

    // Trailing garbage after a complete bundle is noticed too.
    let mut trailing = bundle.clone();
    trailing.extend_from_slice(b"garbage after the end");
    assert_refused(&trailing, Policy::Bundle, &limits(), |e| {
        matches!(e, BundleError::CorruptZstd { .. })
    });
}

#[test]
fn config_files_must_be_small_regular_utf8_files() {
    let big = vec![b'#'; 1024 * 1024 + 1];
    let bundle = Raw::new().file("stead.toml", &big).zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(
            e,
            BundleError::ConfigTooLarge {
                name: "stead.toml",
                ..
            }
        )
    });
    let bundle = Raw::new()
        .file("real.toml", b"x")
        .symlink("stead.toml", "real.toml")
        .zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(
            e,
            BundleError::ConfigNotAFile {
                name: "stead.toml",
                kind: "symlink"
            }
        )
    });
    let bundle = Raw::new().file("dbos-config.yaml", &[0xff, 0xfe]).zst();
    assert_refused(&bundle, Policy::Bundle, &limits(), |e| {
        matches!(
            e,
            BundleError::ConfigNotUtf8 {
                name: "dbos-config.yaml"
            }
        )
    });
    // Only the top-level ones are configs.
    let seen = inspect(
        &Raw::new().file("sub/stead.toml", &big).zst()[..],
        Policy::Bundle,
        &limits(),
    )
    .unwrap();
    assert_eq!(seen.stead_toml, None);
}

#[test]
fn a_failure_late_in_the_archive_removes_everything_written() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = Raw::new()
        .dir("a/b")
        .file("a/b/one", b"1")
        .file_mode("two", b"2", 0o755)
        .symlink("three", "two")
        .file("../escape", b"x")
        .zst();
    let dest = tmp.path().join("out");
    let err = unpack(&bundle[..], &dest, Policy::Bundle, &limits()).unwrap_err();
    assert!(matches!(err, BundleError::PathEscapes { .. }), "{err:?}");
    assert!(!dest.exists());
    assert!(!tmp.path().join("escape").exists());
    assert_eq!(listing(tmp.path()), Vec::<String>::new());
}
