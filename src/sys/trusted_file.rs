//! Whether a file that root acts on could have been written by someone
//! else: the file itself, every symlink on the way to it, and every
//! directory above each of them (as sshd's StrictModes checks).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const S_ISVTX: u32 = 0o1000;

/// The first reason why someone other than root (or this process's own
/// user) could change what `path` says, if there is one.
pub fn writable_by_others(path: &Path) -> Result<Option<String>> {
    let trusted = |uid: u32| uid == 0 || uid == nix::unistd::geteuid().as_raw();
    let absolute =
        std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    // Every path the lookup walks: the given one, then each symlink's
    // target in turn, each of them with its parent directories.
    let mut pending = vec![absolute];
    let mut seen = 0;
    while let Some(current) = pending.pop() {
        seen += 1;
        if seen > 40 {
            bail!("{}: too many symlinks", path.display());
        }
        let mut walked = PathBuf::from("/");
        for component in current.components().skip(1) {
            let parent = walked.clone();
            walked.push(component);
            let meta = match fs::symlink_metadata(&walked) {
                Ok(meta) => meta,
                // Nothing there to trust or distrust: reading the file
                // says what is missing.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(err) => {
                    return Err(err).with_context(|| format!("reading {}", walked.display()))
                }
            };
            let dir = fs::metadata(&parent)?;
            // A sticky directory (/tmp) lets nobody replace an entry of
            // someone else's; any other writable one lets them.
            let parent_open = dir.mode() & 0o022 != 0 && dir.mode() & S_ISVTX == 0;
            if parent_open {
                return Ok(Some(format!(
                    "{} is writable by users other than root (mode {:o}), so they can replace {}",
                    parent.display(),
                    dir.mode() & 0o7777,
                    walked.display()
                )));
            }
            if !trusted(dir.uid()) {
                return Ok(Some(format!(
                    "{} belongs to uid {}, who can replace {}",
                    parent.display(),
                    dir.uid(),
                    walked.display()
                )));
            }
            if meta.file_type().is_symlink() {
                if !trusted(meta.uid()) {
                    return Ok(Some(format!(
                        "the symlink {} belongs to uid {}",
                        walked.display(),
                        meta.uid()
                    )));
                }
                let target = fs::read_link(&walked)?;
                let rest: PathBuf = current
                    .components()
                    .skip(walked.components().count())
                    .collect();
                pending.push(parent.join(target).join(rest));
                break;
            }
            if walked == current {
                if !trusted(meta.uid()) {
                    return Ok(Some(format!(
                        "{} belongs to uid {}",
                        walked.display(),
                        meta.uid()
                    )));
                }
                if meta.mode() & 0o022 != 0 {
                    return Ok(Some(format!(
                        "{} is writable by users other than root (mode {:o})",
                        walked.display(),
                        meta.mode() & 0o7777
                    )));
                }
            }
        }
    }
    Ok(None)
}
