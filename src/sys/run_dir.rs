//! root's run directory, /run/proxy-redirect: the status socket and the
//! tproxy instance locks live in it.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const RUN_DIR: &str = "/run/proxy-redirect";

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
