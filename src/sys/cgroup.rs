//! cgroup v2: finding the mount, checking paths, and child cgroups that
//! remove themselves.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup2 mount point, read from `/proc/self/mountinfo` (it is
/// `/sys/fs/cgroup` on most systems, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(parse_cgroup2_mount)
        .context("no cgroup2 file system is mounted (see /proc/self/mountinfo)")
}

/// One mountinfo line -> its mount point when the file system is cgroup2.
fn parse_cgroup2_mount(line: &str) -> Option<PathBuf> {
    parse_cgroup2_mount_and_root(line).map(|(mount_point, _)| mount_point)
}

/// One mountinfo line -> (mount point, the cgroup the mount shows as its
/// root) when the file system is cgroup2.
fn parse_cgroup2_mount_and_root(line: &str) -> Option<(PathBuf, PathBuf)> {
    // "36 25 0:31 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw"
    let (before, after) = line.split_once(" - ")?;
    if after.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mut fields = before.split_whitespace();
    let root = fields.nth(3)?;
    let mount_point = fields.next()?;
    Some((
        PathBuf::from(unescape_mountinfo(mount_point)),
        PathBuf::from(unescape_mountinfo(root)),
    ))
}

/// The cgroup this process runs in, as a path under the cgroup2 mount.
pub fn own() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .context("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")?;
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let (mount, root) = mountinfo
        .lines()
        .find_map(parse_cgroup2_mount_and_root)
        .context("no cgroup2 file system is mounted (see /proc/self/mountinfo)")?;
    if Path::new(line)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        bail!(
            "this process's cgroup {line} is outside its cgroup namespace: name the cgroup with \
             --sockopt-cgroup"
        );
    }
    let beneath = Path::new(line).strip_prefix(&root).with_context(|| {
        format!(
            "this process's cgroup {line} is outside the cgroup2 mount at {} (which shows \
                 {}): name the cgroup with --sockopt-cgroup",
            mount.display(),
            root.display()
        )
    })?;
    resolve(Some(&mount.join(beneath)))
}

/// Whether `path` is a directory on a cgroup2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    // The field's width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(path)
        .is_ok_and(|stat| stat.filesystem_type().0 as i64 == CGROUP2_SUPER_MAGIC)
}

/// Whether `path` is the root of the whole cgroup2 hierarchy (id 1), not
/// that of a cgroup namespace or a mounted subtree.
pub fn is_hierarchy_root(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).is_ok_and(|meta| meta.ino() == 1)
}

/// The cgroup whose id (its directory's inode number) is `id`, if it is
/// still there.
pub fn find_by_id(id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let mount = cgroup2_mount().ok()?;
    if fs::metadata(&mount).ok()?.ino() == id {
        return Some(mount);
    }
    let mut directories = vec![mount];
    while let Some(directory) = directories.pop() {
        for entry in fs::read_dir(&directory).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if entry.ino() == id {
                return Some(entry.path());
            }
            directories.push(entry.path());
        }
    }
    None
}

/// The nearest cgroup that holds both `a` and `b`.
pub fn common_ancestor(a: &Path, b: &Path) -> PathBuf {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

/// mountinfo writes spaces and a few other bytes as `\ooo` octal escapes.
fn unescape_mountinfo(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\')
            .then(|| text.get(i + 1..i + 4))
            .flatten()
            .and_then(|octal| u8::from_str_radix(octal, 8).ok());
        match escaped {
            Some(value) => {
                out.push(value);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves a user-given cgroup (absolute, or relative to the cgroup2 mount;
/// `None` is the root) and checks that it is a directory on cgroup2.
pub fn resolve(path: Option<&Path>) -> Result<PathBuf> {
    let mount = cgroup2_mount()?;
    let full = match path {
        None => mount,
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => mount.join(p),
    };
    let meta =
        fs::metadata(&full).with_context(|| format!("cgroup {} does not exist", full.display()))?;
    if !meta.is_dir() {
        bail!("cgroup {} is not a directory", full.display());
    }
    if !is_cgroup2(&full) {
        bail!(
            "{} is not a cgroup v2 directory (cgroup2 is mounted at {})",
            full.display(),
            cgroup2_mount()?.display()
        );
    }
    Ok(full)
}

/// An open cgroup directory, the handle BPF attach calls take.
pub struct CgroupFd {
    pub path: PathBuf,
    file: File,
}

impl CgroupFd {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("opening cgroup {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// A cgroup created under a parent and removed on drop, after moving any
/// process still in it to the parent.
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path relative to the cgroup2 mount, as iptables `-m cgroup --path`
    /// and `bpftool cgroup` want it.
    pub fn relative_path(&self) -> Result<PathBuf> {
        let mount = cgroup2_mount()?;
        Ok(self.path.strip_prefix(&mount)?.to_path_buf())
    }

    /// Opens `cgroup.procs` for writing, so that a child process can move
    /// itself in between fork and exec with a single `write(2)` of "0".
    pub fn procs_file(&self) -> Result<File> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", self.path.display()))
    }

    pub fn add_process(&self, pid: u32) -> Result<()> {
        let mut procs = self.procs_file()?;
        write!(procs, "{pid}").with_context(|| format!("moving pid {pid} into cgroup"))
    }

    fn processes(path: &Path) -> Vec<u32> {
        fs::read_to_string(path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Removes a cgroup and its descendants, moving their processes up first.
fn remove_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&entry.path());
            }
        }
    }
    if let Some(parent) = path.parent() {
        for pid in ChildCgroup::processes(path) {
            let _ = fs::write(parent.join("cgroup.procs"), pid.to_string());
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        // A process that just exited leaves the cgroup a moment later.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::warn!("could not remove cgroup {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let line = "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            parse_cgroup2_mount(line),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let v1 = "36 24 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(parse_cgroup2_mount(v1), None);
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        let namespaced = "40 30 0:33 /kubepods/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw";
        assert_eq!(
            parse_cgroup2_mount_and_root(namespaced),
            Some((
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/kubepods/pod1")
            ))
        );
    }

    #[test]
    fn the_common_ancestor_of_two_cgroups_holds_both() {
        let a = Path::new("/sys/fs/cgroup/kubepods/pod-a");
        let b = Path::new("/sys/fs/cgroup/kubepods/pod-b/ctr");
        assert_eq!(common_ancestor(a, b), Path::new("/sys/fs/cgroup/kubepods"));
        assert_eq!(common_ancestor(a, a), a);
        assert_eq!(
            common_ancestor(a, Path::new("/sys/fs/cgroup")),
            Path::new("/sys/fs/cgroup")
        );
    }
}
