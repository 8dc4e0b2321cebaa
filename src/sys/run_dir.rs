//! root's run directory, /run/proxy-redirect: the status and hand-over
//! sockets and the tproxy instance locks live in it.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const RUN_DIR: &str = "/run/proxy-redirect";

/// Removes what a killed service or tproxy left in RUN_DIR: instance locks
/// no process holds, and sockets nobody listens on; then RUN_DIR once it is
/// empty. Their names.
pub fn remove_left_behind() -> Vec<String> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(RUN_DIR).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // A successor's sockets, until they take the running one's place,
        // are `status.sock.<pid>` and `handover.sock.<pid>`.
        let left = if name.ends_with(".lock") {
            lock_is_unheld(&path)
        } else if name.ends_with(".sock") || name.contains(".sock.") {
            socket_is_dead(&path)
        } else {
            false
        };
        if left && fs::remove_file(&path).is_ok() {
            removed.push(name);
        }
    }
    let _ = fs::remove_dir(RUN_DIR);
    removed
}

fn lock_is_unheld(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on a descriptor owned by file. Held while the file
    // is unlinked, as the tproxy that held it did when it stopped.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A socket whose process is gone refuses every connection; one that
/// listens with another socket type (the hand-over's SOCK_SEQPACKET) says
/// so with another error, and stays.
fn socket_is_dead(path: &Path) -> bool {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => false,
        Err(err) => err.raw_os_error() == Some(libc::ECONNREFUSED),
    }
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
