//! The service's bpffs directory (/sys/fs/bpf/proxy-redirect by default):
//! one subdirectory per datapath holds its links and the maps whose contents
//! must outlive the process (port-nat's flows), and a `layout` map with the
//! hash of the map layouts that wrote them. A restart after a crash adopts
//! what it finds: it reuses maps of the same layout and swaps its programs
//! into the pinned links. A clean stop removes everything.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType, OpenMapMut};
use nix::sys::statfs::{statfs, FsType};

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/proxy-redirect";

const LAYOUT_MAP: &str = "layout";

static KEEP_FOR_NEXT_START: AtomicBool = AtomicBool::new(false);

/// From now on nothing pinned is removed when dropped, and legacy clsact
/// filters stay: the process is handing over to the next start.
pub fn keep_for_next_start() {
    KEEP_FOR_NEXT_START.store(true, Ordering::SeqCst);
}

pub fn kept_for_next_start() -> bool {
    KEEP_FOR_NEXT_START.load(Ordering::SeqCst)
}
const BPF_FS_MAGIC: FsType = FsType(0xcafe4a11);

/// A hash of the texts that define a datapath's map layouts (its shared
/// header), FNV-1a over their C declarations: equal hashes mean the pinned
/// maps can be reused as they are. Comments and spacing do not count, so
/// that rewording a header does not throw away the records of an upgrade.
pub fn layout_hash(texts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf29ce484222325;
    for text in texts {
        for byte in declarations(text).bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x100000001b3);
        }
    }
    hash
}

/// C text without its comments, each run of spacing one space.
fn declarations(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, tail)| tail);
            out.push(' ');
        } else if let Some(after) = rest.strip_prefix("//") {
            rest = after.split_once('\n').map_or("", |(_, tail)| tail);
            out.push(' ');
        } else {
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The directory of every datapath's pins.
#[derive(Debug, Clone)]
pub struct PinRoot {
    path: PathBuf,
}

impl PinRoot {
    /// Creates `path` (root only) inside a bpffs mount.
    pub fn create(path: &Path) -> Result<PinRoot> {
        let parent = path.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) {
            bail!(
                "{} is not a bpffs mount (mount -t bpf bpf {}): the kernel datapaths could \
                 not outlive the service",
                parent.display(),
                parent.display()
            );
        }
        match fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => bail!("creating {}: {err}", path.display()),
        }
        Ok(PinRoot {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pins of datapath `name` (`port-nat eth0`), and what a previous
    /// run left there.
    pub fn datapath(&self, name: &str, layout: u64) -> Result<PinDir> {
        let path = self.path.join(dir_name(name));
        let found = match fs::metadata(&path) {
            Err(_) => Found::Nothing,
            Ok(_) => match read_layout(&path) {
                Some(pinned) if pinned == layout => Found::SameLayout,
                Some(pinned) => Found::OtherLayout(format!(
                    "layout {pinned:016x}, this binary's is {layout:016x}"
                )),
                None => Found::OtherLayout("no readable layout record".into()),
            },
        };
        if found == Found::Nothing {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(PinDir {
            path,
            layout,
            found,
            remove_on_drop: false,
        })
    }

    /// Removes the pins of every datapath not in `names`; returns what it
    /// removed.
    pub fn remove_others(&self, names: &[String]) -> Vec<String> {
        let keep: Vec<String> = names.iter().map(|n| dir_name(n)).collect();
        let mut removed = Vec::new();
        for dir in pinned_datapaths(&self.path) {
            if keep.contains(&dir) {
                continue;
            }
            match fs::remove_dir_all(self.path.join(&dir)) {
                Ok(()) => removed.push(dir),
                Err(err) => tracing::warn!("removing the pins of {dir}: {err}"),
            }
        }
        removed
    }

    /// Removes the root itself once it is empty.
    pub fn remove_if_empty(&self) {
        let _ = fs::remove_dir(&self.path);
    }
}

/// `port-nat eth0` -> `port-nat-eth0`: interface names hold no `/`.
fn dir_name(name: &str) -> String {
    name.replace([' ', '/'], "-")
}

/// The datapath directories under `root`, sorted; none when it is absent.
pub fn pinned_datapaths(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Removes `root` and everything pinned under it: the links detach once
/// no process holds them.
pub fn remove_all(root: &Path) -> Result<Vec<String>> {
    let names = pinned_datapaths(root);
    match fs::remove_dir_all(root) {
        Ok(()) => Ok(names),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err).with_context(|| format!("removing {}", root.display())),
    }
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

fn read_layout(dir: &Path) -> Option<u64> {
    read_record(dir, LAYOUT_MAP)?.first().copied()
}

/// The values of the record `name` pinned in the datapath directory `dir`.
pub fn read_record(dir: &Path, name: &str) -> Option<Vec<u64>> {
    let map = MapHandle::from_pinned_path(dir.join(name)).ok()?;
    (0..map.max_entries())
        .map(|index| {
            let value = map.lookup(&index.to_ne_bytes(), MapFlags::ANY).ok()??;
            Some(u64::from_ne_bytes(value.get(..8)?.try_into().ok()?))
        })
        .collect()
}

/// What a previous run left in a datapath's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Nothing,
    SameLayout,
    /// Maps this binary cannot read: they are replaced, not reused.
    OtherLayout(String),
}

/// One datapath's pins.
pub struct PinDir {
    path: PathBuf,
    layout: u64,
    found: Found,
    remove_on_drop: bool,
}

impl PinDir {
    pub fn found(&self) -> &Found {
        &self.found
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Says what an earlier run left here and what becomes of it: `held`
    /// names what is adopted (`flows and links`), `state` what a layout
    /// change loses (`flows`).
    pub fn report(&self, held: &str, state: &str) {
        match &self.found {
            Found::Nothing => {}
            Found::SameLayout => crate::out!(
                "  Adopting:          the {held} {} holds from an earlier run",
                self.path.display()
            ),
            Found::OtherLayout(why) => crate::out!(
                "Replacing the pinned state in {} ({why}): its {state} are not carried over",
                self.path.display()
            ),
        }
    }

    /// Pins `values` as the record `name` (an array map: bpffs holds BPF
    /// objects only), in place of an earlier one: what a later process
    /// must know of this datapath without its configuration.
    pub fn record(&self, name: &str, values: &[u64]) -> Result<()> {
        let path = self.path.join(name);
        let _ = fs::remove_file(&path);
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        let entries = values.len() as u32;
        let mut map = MapHandle::create(MapType::Array, Some("pr_record"), 4, 8, entries, &opts)
            .with_context(|| format!("creating the record {name}"))?;
        for (index, value) in (0u32..).zip(values) {
            map.update(&index.to_ne_bytes(), &value.to_ne_bytes(), MapFlags::ANY)?;
        }
        map.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))
    }

    /// Where the link of `name` is pinned.
    pub fn link(&self, name: &str) -> PathBuf {
        self.path.join(format!("link-{name}"))
    }

    fn map(&self, name: &str) -> PathBuf {
        self.path.join(format!("map-{name}"))
    }

    /// Makes `map` (before load) the pinned map of the same name when it
    /// has this binary's layout and the same shape; returns whether it did.
    pub fn reuse(&self, map: &mut OpenMapMut<'_>, name: &str) -> Result<bool> {
        if self.found != Found::SameLayout || !self.same_shape(map, name)? {
            return Ok(false);
        }
        let path = self.map(name);
        map.reuse_pinned_map(&path)
            .with_context(|| format!("reusing {}", path.display()))?;
        Ok(true)
    }

    /// Reuses every map of `maps` or none: maps whose records refer to
    /// each other (a count per user of the entries of another) are never
    /// half carried over. When one has another shape, the whole pinned
    /// state counts as of another layout.
    pub fn reuse_all(&mut self, maps: &mut [(&str, &mut OpenMapMut<'_>)]) -> Result<bool> {
        if self.found != Found::SameLayout {
            return Ok(false);
        }
        for (name, map) in maps.iter() {
            if !self.same_shape(map, name)? {
                self.found = Found::OtherLayout(format!("map {name} has another shape"));
                return Ok(false);
            }
        }
        for (name, map) in maps.iter_mut() {
            let path = self.map(name);
            map.reuse_pinned_map(&path)
                .with_context(|| format!("reusing {}", path.display()))?;
        }
        Ok(true)
    }

    /// Whether the map pinned as `name` has `map`'s type and sizes.
    fn same_shape(&self, map: &OpenMapMut<'_>, name: &str) -> Result<bool> {
        let Ok(pinned) = MapHandle::from_pinned_path(self.map(name)) else {
            return Ok(false);
        };
        let info = pinned.info().context("reading a pinned map")?;
        Ok(info.map_type() == map.map_type()
            && info.info.key_size == map.key_size()
            && info.info.value_size == map.value_size()
            && info.info.max_entries == map.max_entries())
    }

    /// The pinned map of `name` when it has this binary's layout but is
    /// not `current` (its size changed): the source of a migration.
    pub fn previous(&self, name: &str, current: &dyn MapCore) -> Option<MapHandle> {
        if self.found != Found::SameLayout {
            return None;
        }
        let path = self.map(name);
        if same_map(&path, current) {
            return None;
        }
        MapHandle::from_pinned_path(path).ok()
    }

    /// Once attached: pins each of `maps` that is not pinned here yet (or
    /// was pinned from another map), unpins the links of an earlier run
    /// that are not among `links` (a hook no longer used), records the
    /// layout, and from now on removes the directory when dropped (a clean
    /// stop).
    pub fn commit(&mut self, maps: &[(&str, &dyn MapCore)], links: &[&str]) -> Result<()> {
        let in_use: Vec<std::ffi::OsString> = links
            .iter()
            .map(|name| self.link(name).file_name().unwrap_or_default().to_owned())
            .collect();
        for entry in fs::read_dir(&self.path).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("link-") && !in_use.contains(&name) {
                let _ = fs::remove_file(entry.path());
            }
        }
        for (name, map) in maps {
            let path = self.map(name);
            if self.found == Found::SameLayout && same_map(&path, *map) {
                continue;
            }
            let _ = fs::remove_file(&path);
            pin_fd(map.as_fd(), &path)?;
        }
        self.record(LAYOUT_MAP, &[self.layout])?;
        self.found = Found::SameLayout;
        self.remove_on_drop = true;
        Ok(())
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.remove_on_drop && !kept_for_next_start() {
            if let Err(err) = fs::remove_dir_all(&self.path) {
                tracing::warn!("removing {}: {err}", self.path.display());
            }
        }
    }
}

/// Whether the map pinned at `path` is `map` itself (reused at load).
fn same_map(path: &Path, map: &dyn MapCore) -> bool {
    let pinned = MapHandle::from_pinned_path(path).and_then(|m| m.info());
    let ours = map.info();
    matches!((pinned, ours), (Ok(p), Ok(o)) if p.info.id == o.info.id)
}

/// Pins the BPF object (map or link) behind `fd` at `path`.
pub fn pin_fd(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a descriptor and a NUL-terminated path that outlive the call.
    let ret = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c_path.as_ptr()) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret))
            .with_context(|| format!("pinning {}", path.display()));
    }
    Ok(())
}

/// Opens the BPF object pinned at `path`.
pub fn open_pinned(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let fd = unsafe { libbpf_sys::bpf_obj_get(c_path.as_ptr()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A bpffs mounted on a directory of the caller's own (the demo's, a
/// test's), so that its pins are its alone; unmounted on drop, pins and
/// all.
pub struct PrivateBpffs {
    mount: PathBuf,
    /// The directory `temporary()` made for the mount, removed after it.
    made: Option<PathBuf>,
}

impl PrivateBpffs {
    /// Mounts one in a new directory under the temporary directory.
    pub fn temporary() -> Result<PrivateBpffs> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("proxy-redirect-bpffs-{}-{n}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        match PrivateBpffs::mount_on(&dir.join("bpffs")) {
            Ok(mut bpffs) => {
                bpffs.made = Some(dir);
                Ok(bpffs)
            }
            Err(err) => {
                let _ = fs::remove_dir(&dir);
                Err(err)
            }
        }
    }

    /// Creates `mount` and mounts a bpffs on it.
    pub fn mount_on(mount: &Path) -> Result<PrivateBpffs> {
        fs::create_dir(mount).with_context(|| format!("creating {}", mount.display()))?;
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(mount)
            .status()
            .context("running mount")?;
        if !status.success() {
            let _ = fs::remove_dir(mount);
            bail!("mounting a bpffs on {}", mount.display());
        }
        Ok(PrivateBpffs {
            mount: mount.to_path_buf(),
            made: None,
        })
    }

    /// The service's `--pin-dir` on it.
    pub fn pin_dir(&self) -> PathBuf {
        self.mount.join("proxy-redirect")
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = remove_all(&self.pin_dir());
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .status();
        let _ = fs::remove_dir(&self.mount);
        if let Some(dir) = &self.made {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::layout_hash;

    #[test]
    fn comments_and_spacing_leave_the_layout_hash_alone_and_declarations_do_not() {
        let header = "/* a record */\nstruct r {\n\t__u32 uid; // whose\n};\n";
        let reworded =
            "/* a record, reworded\n * over two lines */\nstruct r {\n    __u32 uid;\n};";
        let changed = "/* a record */\nstruct r {\n\t__u64 uid;\n};\n";
        assert_eq!(layout_hash(&[header]), layout_hash(&[reworded]));
        assert_ne!(layout_hash(&[header]), layout_hash(&[changed]));
    }
}
