//! Apps' data directories on the host: a directory that outlives instances,
//! with a disk quota.
//!
//! The quota is a filesystem of its own: an ext4 image of the quota's size
//! beside the directory (`<dir>.img`, sparse, so it costs only what is
//! written), loop-mounted on the directory the first time an instance of
//! the app starts (and again after a reboot). Its root belongs to the
//! app's host id. Where loop devices or mkfs.ext4 are missing, the
//! directory is used as it is, without a quota, and a warning says so.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Serialises preparations: two instances of one app starting together
/// must not both format or mount its image.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether `dir` is a mount point (another device than its parent's).
fn is_mountpoint(dir: &Path) -> io::Result<bool> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    Ok(std::fs::metadata(dir)?.dev() != std::fs::metadata(parent)?.dev())
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The image file of `dir`.
pub(crate) fn image_of(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".img");
    dir.with_file_name(name)
}

/// Makes `dir` exist, mounted on its quota'd image when possible, owned by
/// `host_id` with mode 0700. Returns whether the quota is in force.
/// Blocking (it may run mkfs and mount): call it from a blocking context.
pub(crate) fn prepare(dir: &Path, size_mb: u64, host_id: u32) -> io::Result<bool> {
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    std::fs::create_dir_all(dir)?;
    let quota = if is_mountpoint(dir)? {
        true
    } else {
        match mount_image(dir, size_mb, host_id) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no disk quota for this data directory (loop-mounting its image failed)");
                false
            }
        }
    };
    std::os::unix::fs::chown(dir, Some(host_id), Some(host_id))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(quota)
}

fn mount_image(dir: &Path, size_mb: u64, host_id: u32) -> io::Result<()> {
    let image = image_of(dir);
    if !image.exists() {
        let tmp = image.with_extension("img.tmp");
        let f = std::fs::File::create(&tmp)?;
        f.set_len(size_mb.max(8) << 20)?;
        drop(f);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-E"])
            .arg(format!("root_owner={host_id}:{host_id}"))
            .arg(&tmp))?;
        std::fs::rename(&tmp, &image)?;
    }
    run(Command::new("mount")
        .args(["-o", "loop,nosuid,nodev"])
        .arg(&image)
        .arg(dir))
}

/// Unmounts the data directories mounted below `under` (their images stay,
/// with the data): for an agent that stops its instances on exit (`stead
/// dev`), so that it leaves no mounts behind. Returns how many.
pub fn release_data_dirs(under: &Path) -> usize {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let point = PathBuf::from(f.get(4)?);
            (f.get(sep + 1) == Some(&"ext4")
                && point.starts_with(under)
                && image_of(&point).exists())
            .then_some(point)
        })
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut n = 0;
    for p in points {
        match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!(dir = %p.display(), error = %e, "unmounting a data directory"),
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_beside_the_dir() {
        assert_eq!(
            image_of(Path::new("/d/appdata/shop")),
            PathBuf::from("/d/appdata/shop.img")
        );
    }
}
