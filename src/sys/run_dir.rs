//! root's run directory, /run/proxy-redirect: the status socket and the
//! tproxy instance locks live in it.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const RUN_DIR: &str = "/run/proxy-redirect";

/// Removes the instance locks in RUN_DIR that no process holds (those of a
/// tproxy that was killed), and RUN_DIR once it is empty; their names.
pub fn remove_unheld_locks() -> Vec<String> {
    use std::os::fd::AsRawFd;
    let mut removed = Vec::new();
    for entry in fs::read_dir(RUN_DIR).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|ext| ext != "lock") {
            continue;
        }
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        // SAFETY: flock on a descriptor owned by file. Held while the file
        // is unlinked, as the tproxy that held it did when it stopped.
        let unheld = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if unheld && fs::remove_file(&path).is_ok() {
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    let _ = fs::remove_dir(RUN_DIR);
    removed
}

/// Creates RUN_DIR if needed and checks that only root can write to it.
pub fn create() -> Result<&'static Path> {
    let dir = Path::new(RUN_DIR);
    match DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => bail!("creating {RUN_DIR}: {err}"),
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("reading {RUN_DIR}"))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        bail!("{RUN_DIR} must be a directory owned by root and writable by root only");
    }
    Ok(dir)
}
