//! Attachments owned by the running process. Every attachment is a bpf_link:
//! when the process exits, even by SIGKILL, the kernel detaches it, unless
//! it was pinned (the service's TC links), which keeps it for the next run.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use libbpf_rs::{AsRawLibbpf, Link, ProgramMut, TcHook, TcHookBuilder, TC_EGRESS, TC_INGRESS};

use crate::sys::cgroup::CgroupFd;
use crate::sys::pins;

/// Which TC hook point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcDirection {
    Ingress,
    Egress,
}

/// How to attach TC programs: `auto` uses tcx links where the kernel has
/// them (6.6+) and falls back to a clsact qdisc.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcAttachMode {
    #[default]
    Auto,
    Tcx,
    Clsact,
}

/// Where our TC programs go among the other programs of an interface's
/// hook (tcx chain, or clsact filter priority).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcOrder {
    /// Where iptables puts a translation: first on ingress (nat
    /// PREROUTING before filter INPUT/FORWARD), last on egress (after filter
    /// OUTPUT)
    #[default]
    Auto,
    /// Before every other program, in both directions
    First,
    /// After every other program, in both directions
    Last,
}

/// The place of one attachment: head or tail of its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcPosition {
    First,
    Last,
}

impl TcOrder {
    pub fn position(self, direction: TcDirection) -> TcPosition {
        match (self, direction) {
            (TcOrder::First, _) | (TcOrder::Auto, TcDirection::Ingress) => TcPosition::First,
            (TcOrder::Last, _) | (TcOrder::Auto, TcDirection::Egress) => TcPosition::Last,
        }
    }

    /// `ingress first, egress last`, for start-up lines and status.
    pub fn describe(self) -> String {
        let name = |direction| match self.position(direction) {
            TcPosition::First => "first",
            TcPosition::Last => "last",
        };
        format!(
            "ingress {}, egress {} among the interface's TC programs",
            name(TcDirection::Ingress),
            name(TcDirection::Egress)
        )
    }
}

/// The path a TC attachment took, printed so that users and tests know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcPath {
    Tcx,
    Clsact,
}

impl std::fmt::Display for TcPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcPath::Tcx => "tcx link",
            TcPath::Clsact => "clsact qdisc (legacy; removed on exit)",
        })
    }
}

/// Whether TC sees an Ethernet header in front of the IP header on
/// `interface`; `program` names the subcommand in the error.
pub fn link_has_l2_header(interface: &str, program: &str) -> Result<bool> {
    let output = std::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", interface])
        .output()
        .context("running ip (install iproute2)")?;
    let links: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("reading the link type of {interface}"))?;
    let link_type = links[0]["link_type"].as_str().unwrap_or_default();
    match link_type {
        "ether" | "loopback" => Ok(true),
        // tun, WireGuard: packets start with the IP header.
        "none" => Ok(false),
        other => bail!(
            "interface {interface} has link type '{other}'; {program} supports Ethernet-like \
             interfaces and L3 devices such as tun and WireGuard"
        ),
    }
}

/// The pin record (see `PinDir::record`) of a datapath attached by clsact
/// filters, which outlive a crash: [the network namespace's inode,
/// ifindex...].
pub const CLSACT_RECORD: &str = "clsact";

/// Removes, in this network namespace, our clsact filters (and a qdisc
/// left with no filter) on the interfaces that the datapath pinned in
/// `dir` recorded (a killed service's, for `cleanup`); says what it did.
pub fn remove_recorded_clsact(dir: &Path) -> Vec<String> {
    let Some((netns, interfaces)) = pins::read_record(dir, CLSACT_RECORD)
        .and_then(|values| values.split_first().map(|(n, rest)| (*n, rest.to_vec())))
    else {
        return Vec::new();
    };
    if crate::sys::netns::current_inode().ok() != Some(netns) {
        return vec![format!(
            "the clsact filters stay: they are in another network namespace (inode {netns}); \
             run cleanup there"
        )];
    }
    let mut said = Vec::new();
    for ifindex in interfaces {
        let ifindex = ifindex as u32;
        let mut removed = 0;
        for point in [libbpf_sys::BPF_TC_INGRESS, libbpf_sys::BPF_TC_EGRESS] {
            let hook = libbpf_sys::bpf_tc_hook {
                sz: std::mem::size_of::<libbpf_sys::bpf_tc_hook>() as _,
                ifindex: ifindex as i32,
                attach_point: point,
                ..Default::default()
            };
            for priority in [CLSACT_FIRST_PRIORITY, CLSACT_LAST_PRIORITY] {
                let mut opts = libbpf_sys::bpf_tc_opts {
                    sz: std::mem::size_of::<libbpf_sys::bpf_tc_opts>() as _,
                    handle: CLSACT_FILTER_HANDLE,
                    priority,
                    ..Default::default()
                };
                // SAFETY: complete structs that outlive the calls.
                let found = quietly(|| unsafe { libbpf_sys::bpf_tc_query(&hook, &mut opts) }) == 0;
                let detach = libbpf_sys::bpf_tc_opts {
                    sz: std::mem::size_of::<libbpf_sys::bpf_tc_opts>() as _,
                    handle: CLSACT_FILTER_HANDLE,
                    priority,
                    ..Default::default()
                };
                // SAFETY: as above; detach wants no program named.
                if found && unsafe { libbpf_sys::bpf_tc_detach(&hook, &detach) } == 0 {
                    removed += 1;
                }
            }
        }
        if removed == 0 {
            continue;
        }
        said.push(format!(
            "removed {removed} clsact filter(s) of ifindex {ifindex}"
        ));
        if !has_filters(ifindex) {
            let mut qdisc = libbpf_sys::bpf_tc_hook {
                sz: std::mem::size_of::<libbpf_sys::bpf_tc_hook>() as _,
                ifindex: ifindex as i32,
                attach_point: libbpf_sys::BPF_TC_INGRESS | libbpf_sys::BPF_TC_EGRESS,
                ..Default::default()
            };
            // SAFETY: a complete struct that outlives the call.
            if unsafe { libbpf_sys::bpf_tc_hook_destroy(&mut qdisc) } == 0 {
                said.push(format!("removed the clsact qdisc of ifindex {ifindex}"));
            }
        }
    }
    said
}

/// Handle of our legacy clsact filters, so that a restart after SIGKILL
/// finds and replaces its own leftovers; the priority says the position
/// (lower runs first; the kernel numbers filters added without one from
/// 0xc000 down).
const CLSACT_FILTER_HANDLE: u32 = 0x5052;
const CLSACT_FIRST_PRIORITY: u32 = 1;
const CLSACT_LAST_PRIORITY: u32 = 0xffff;

/// A legacy clsact filter; unlike a link it outlives the process, so it is
/// removed explicitly on drop, with the qdisc when we created it and no
/// other tool's filter is left on it.
struct ClsactFilter {
    hook: TcHook,
    ifindex: u32,
    remove_qdisc: bool,
}

impl Drop for ClsactFilter {
    fn drop(&mut self) {
        if pins::kept_for_next_start() {
            return;
        }
        if let Err(err) = self.hook.detach() {
            tracing::warn!("detaching a clsact filter: {err}");
        }
        if self.remove_qdisc && !has_filters(self.ifindex) {
            // Destroying the ingress|egress hook removes the clsact qdisc.
            let mut qdisc = self.hook;
            qdisc.attach_point(TC_INGRESS | TC_EGRESS);
            if let Err(err) = qdisc.destroy() {
                tracing::debug!("removing the clsact qdisc: {err}");
            }
        }
    }
}

/// Whether any filter is left on the clsact qdisc of `ifindex`, in either
/// direction: another tool's, which the qdisc must keep. When in doubt,
/// yes.
fn has_filters(ifindex: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: name has IF_NAMESIZE bytes, as if_indextoname requires.
    if unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) }.is_null() {
        return true;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
    ["ingress", "egress"].iter().any(|direction| {
        std::process::Command::new("tc")
            .args(["filter", "show", "dev", &name, direction])
            .output()
            .map_or(true, |out| !out.status.success() || !out.stdout.is_empty())
    })
}

/// The attachments of one subcommand, all removed on drop; links are also
/// removed by the kernel when the process dies.
#[derive(Default)]
pub struct Attachments {
    links: Vec<Link>,
    link_fds: Vec<OwnedFd>,
    clsact_filters: Vec<ClsactFilter>,
    /// What is attached where, for `proxy-redirect status`.
    attached: Vec<Attached>,
    /// Each link (a descriptor that `links` or `link_fds` owns) with the
    /// program this process put in it, to put back (`reclaim`).
    programs: Vec<(std::os::fd::RawFd, OwnedFd)>,
}

#[derive(Debug, Clone)]
struct Attached {
    program: String,
    id: u32,
    target: String,
}

/// The id the kernel gave a loaded program (what `bpftool prog` lists).
pub fn program_id(program: &ProgramMut) -> u32 {
    program_info(program.as_fd().as_raw_fd()).map_or(0, |info| info.id)
}

/// What the kernel tells of the program behind descriptor `fd`.
fn program_info(fd: std::os::fd::RawFd) -> Option<libbpf_sys::bpf_prog_info> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: info is a complete bpf_prog_info of len bytes.
    let ret = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len) };
    (ret == 0).then_some(info)
}

impl Drop for Attachments {
    fn drop(&mut self) {
        // Last attached first: the filter that created the clsact qdisc
        // removes it, and must not go before the filters that still use it.
        while let Some(filter) = self.clsact_filters.pop() {
            drop(filter);
        }
    }
}

impl Attachments {
    fn record(&mut self, program: &ProgramMut, target: String) {
        self.attached.push(Attached {
            program: program.name().to_string_lossy().into_owned(),
            id: program_id(program),
            target,
        });
    }

    /// One `{program, id, target}` object per attachment.
    pub fn describe(&self) -> Vec<serde_json::Value> {
        self.attached
            .iter()
            .map(|a| serde_json::json!({"program": a.program, "id": a.id, "target": a.target}))
            .collect()
    }

    /// Attaches a cgroup program. With `pin`, a link pinned there by an
    /// earlier run on the same cgroup and hook is kept, its program swapped
    /// for `program` in place; a new link is pinned there.
    pub fn attach_cgroup(
        &mut self,
        program: &ProgramMut,
        cgroup: &CgroupFd,
        pin: Option<&Path>,
    ) -> Result<()> {
        let name = program.name().to_string_lossy().into_owned();
        let target = format!("cgroup {}", cgroup.path.display());
        if self.adopt(program, pin, format!("{target} (adopted)"), |info| {
            on_cgroup_hook(info, program, cgroup)
        }) {
            return Ok(());
        }
        let link = program
            .attach_cgroup(cgroup.raw_fd())
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.path.display()))?;
        repin(link.as_fd(), pin)?;
        self.remember(link.as_fd().as_raw_fd(), program)?;
        self.links.push(link);
        self.record(program, target);
        Ok(())
    }

    /// Notes which program this process put into the link `link`.
    fn remember(&mut self, link: std::os::fd::RawFd, program: &ProgramMut) -> Result<()> {
        let program = program
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating a program descriptor")?;
        self.programs.push((link, program));
        Ok(())
    }

    /// Puts this process's programs back into its links, after a successor
    /// that swapped its own in failed (BPF_LINK_UPDATE again), and its
    /// clsact filters back in place of the successor's.
    pub fn reclaim(&mut self) -> Result<()> {
        for (link, program) in &self.programs {
            // SAFETY: descriptors this value owns, no options.
            let ret = unsafe {
                libbpf_sys::bpf_link_update(*link, program.as_raw_fd(), std::ptr::null())
            };
            if ret != 0 {
                return Err(std::io::Error::from_raw_os_error(-ret)).context("taking a link back");
            }
        }
        for filter in &mut self.clsact_filters {
            filter
                .hook
                .attach()
                .context("taking a clsact filter back")?;
        }
        Ok(())
    }

    /// Keeps the link an earlier run pinned at `pin` when `on_our_hook`
    /// says it is where `program` goes, with `program` swapped in; false
    /// when there is none to keep (the caller attaches anew).
    fn adopt(
        &mut self,
        program: &ProgramMut,
        pin: Option<&Path>,
        target: String,
        on_our_hook: impl Fn(&libbpf_sys::bpf_link_info) -> bool,
    ) -> bool {
        let Some(pin) = pin else {
            return false;
        };
        match adopt_link(program, pin, on_our_hook) {
            Ok(Some(fd)) => {
                if let Err(err) = self.remember(fd.as_raw_fd(), program) {
                    tracing::warn!("{err:#}");
                }
                self.link_fds.push(fd);
                self.record(program, target);
                true
            }
            Ok(None) => false,
            Err(err) => {
                tracing::warn!("replacing the pinned link {}: {err:#}", pin.display());
                false
            }
        }
    }

    /// Attaches a network-namespace program (`SEC("sk_lookup")`, flow
    /// dissector) to the namespace of the calling thread. With `pin`, as
    /// attach_cgroup does.
    pub fn attach_netns(&mut self, program: &ProgramMut, pin: Option<&Path>) -> Result<()> {
        let path = "/proc/thread-self/ns/net";
        let netns = std::fs::File::open(path).context("opening this thread's network namespace")?;
        let netns_ino = std::os::unix::fs::MetadataExt::ino(&netns.metadata()?);
        let target = "this network namespace".to_owned();
        if self.adopt(program, pin, format!("{target} (adopted)"), |info| {
            on_netns_hook(info, netns_ino)
        }) {
            return Ok(());
        }
        let link = program
            .attach_netns(netns.as_raw_fd())
            .with_context(|| format!("attaching {}", program.name().to_string_lossy()))?;
        repin(link.as_fd(), pin)?;
        self.remember(link.as_fd().as_raw_fd(), program)?;
        self.links.push(link);
        self.record(program, target);
        Ok(())
    }

    /// Attaches a TC program (`SEC("tc")`) to an interface, at the head or
    /// the tail of the programs already there. With `pin`, a tcx link
    /// pinned there by an earlier run on the same hook is kept, its program
    /// swapped for `program` in place; a new link is pinned there.
    pub fn attach_tc(
        &mut self,
        program: &ProgramMut,
        ifindex: u32,
        direction: TcDirection,
        mode: TcAttachMode,
        position: TcPosition,
        pin: Option<&Path>,
    ) -> Result<TcPath> {
        let name = program.name().to_string_lossy().into_owned();
        let place = match position {
            TcPosition::First => "first",
            TcPosition::Last => "last",
        };
        let target = format!("ifindex {ifindex} {direction:?} ");
        if mode != TcAttachMode::Clsact {
            let adopted = format!("{target}(tcx, {place}, adopted)");
            if self.adopt(program, pin, adopted, |info| {
                on_tcx_hook(info, ifindex, direction)
            }) {
                return Ok(TcPath::Tcx);
            }
            match attach_tcx(program, ifindex, direction, position) {
                Ok(fd) => {
                    repin(fd.as_fd(), pin)?;
                    self.remember(fd.as_raw_fd(), program)?;
                    self.link_fds.push(fd);
                    self.record(program, target + &format!("(tcx, {place})"));
                    return Ok(TcPath::Tcx);
                }
                // EINVAL: a kernel before 6.6, which has no tcx.
                Err(err)
                    if mode == TcAttachMode::Auto && err.raw_os_error() == Some(libc::EINVAL) => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("attaching {name} with tcx"));
                }
            }
        }
        let mut filter = attach_clsact(program, ifindex, direction, position)
            .with_context(|| format!("attaching {name} to a clsact qdisc"))?;
        // One filter per interface removes the qdisc: the first, dropped last.
        if self
            .clsact_filters
            .iter()
            .any(|f| f.ifindex == ifindex && f.remove_qdisc)
        {
            filter.remove_qdisc = false;
        }
        self.clsact_filters.push(filter);
        self.record(program, target + &format!("(clsact, {place})"));
        Ok(TcPath::Clsact)
    }

    /// Lets go of attachments whose interface is gone: its links died with
    /// it, and so did its qdisc and filters, which are not removed again.
    pub fn forget_gone_interface(mut self) {
        for filter in self.clsact_filters.drain(..) {
            std::mem::forget(filter);
        }
    }

    pub fn len(&self) -> usize {
        self.links.len() + self.link_fds.len() + self.clsact_filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens the link pinned at `pin` and, when `on_our_hook` says it is
/// attached where `program` goes, swaps `program` into it
/// (BPF_LINK_UPDATE): no moment with nothing attached. None when nothing is
/// pinned there or the link is elsewhere (another cgroup, an interface that
/// is gone): the caller attaches anew and replaces the pin.
fn adopt_link(
    program: &ProgramMut,
    pin: &Path,
    on_our_hook: impl Fn(&libbpf_sys::bpf_link_info) -> bool,
) -> Result<Option<OwnedFd>> {
    let fd = match pins::open_pinned(pin) {
        Ok(fd) => fd,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).context("opening it"),
    };
    let info = link_info(&fd).context("reading it")?;
    if !on_our_hook(&info) {
        return Ok(None);
    }
    // SAFETY: two descriptors and no options.
    let ret = unsafe {
        libbpf_sys::bpf_link_update(
            fd.as_raw_fd(),
            program.as_fd().as_raw_fd(),
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret)).context("swapping its program");
    }
    Ok(Some(fd))
}

fn link_info(link: &OwnedFd) -> std::io::Result<libbpf_sys::bpf_link_info> {
    // SAFETY: bpf_link_info is plain data, valid when zeroed.
    let mut info: libbpf_sys::bpf_link_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libbpf_sys::bpf_link_info>() as u32;
    // SAFETY: info is a complete bpf_link_info of len bytes.
    let ret = unsafe { libbpf_sys::bpf_link_get_info_by_fd(link.as_raw_fd(), &mut info, &mut len) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret));
    }
    Ok(info)
}

/// The id of the cgroup that the cgroup link pinned at `pin` is attached
/// to, if there is such a link.
pub fn pinned_cgroup_id(pin: &Path) -> Option<u64> {
    let info = link_info(&pins::open_pinned(pin).ok()?).ok()?;
    if info.type_ != libbpf_sys::BPF_LINK_TYPE_CGROUP {
        return None;
    }
    // SAFETY: the cgroup member is the one a cgroup link fills.
    Some(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
}

/// Pins a new link at `pin` in place of an earlier run's, which detaches
/// only now that the new one is attached.
fn repin(link: std::os::fd::BorrowedFd<'_>, pin: Option<&Path>) -> Result<()> {
    let Some(pin) = pin else {
        return Ok(());
    };
    let _ = std::fs::remove_file(pin);
    pins::pin_fd(link, pin)
}

/// Whether `info` is a tcx link on `ifindex` in `direction`.
fn on_tcx_hook(info: &libbpf_sys::bpf_link_info, ifindex: u32, direction: TcDirection) -> bool {
    // SAFETY: the tcx member is the one a tcx link fills.
    let tcx = unsafe { info.__bindgen_anon_1.tcx };
    info.type_ == libbpf_sys::BPF_LINK_TYPE_TCX
        && tcx.ifindex == ifindex
        && tcx.attach_type == tcx_attach_type(direction)
}

/// Whether `info` is a network-namespace link on the namespace of inode
/// `netns_ino`.
fn on_netns_hook(info: &libbpf_sys::bpf_link_info, netns_ino: u64) -> bool {
    // SAFETY: the netns member is the one a netns link fills.
    let netns = unsafe { info.__bindgen_anon_1.netns };
    info.type_ == libbpf_sys::BPF_LINK_TYPE_NETNS && u64::from(netns.netns_ino) == netns_ino
}

/// Whether `info` is a cgroup link of `program`'s attach type on `cgroup`.
fn on_cgroup_hook(
    info: &libbpf_sys::bpf_link_info,
    program: &ProgramMut,
    cgroup: &CgroupFd,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    // A cgroup's id is its directory's inode number.
    let Ok(cgroup_id) = std::fs::metadata(&cgroup.path).map(|m| m.ino()) else {
        return false;
    };
    // SAFETY: a loaded program's libbpf object, read only.
    let attach_type = unsafe {
        libbpf_sys::bpf_program__expected_attach_type(program.as_libbpf_object().as_ptr())
    };
    // SAFETY: the cgroup member is the one a cgroup link fills.
    let link = unsafe { info.__bindgen_anon_1.cgroup };
    info.type_ == libbpf_sys::BPF_LINK_TYPE_CGROUP
        && link.cgroup_id == cgroup_id
        && link.attach_type == attach_type
}

fn tcx_attach_type(direction: TcDirection) -> libbpf_sys::bpf_attach_type {
    match direction {
        TcDirection::Ingress => libbpf_sys::BPF_TCX_INGRESS,
        TcDirection::Egress => libbpf_sys::BPF_TCX_EGRESS,
    }
}

/// libbpf-rs 0.27 does not wrap tcx, and libbpf's own helper wants the
/// program loaded with a tcx attach type (which 6.1 refuses); a raw
/// BPF_LINK_CREATE works with a plain `SEC("tc")` program everywhere.
fn attach_tcx(
    program: &ProgramMut,
    ifindex: u32,
    direction: TcDirection,
    position: TcPosition,
) -> std::io::Result<OwnedFd> {
    let attach_type = tcx_attach_type(direction);
    // Without a relative program, BPF_F_BEFORE attaches at the head of the
    // chain and BPF_F_AFTER at its tail.
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        flags: match position {
            TcPosition::First => libbpf_sys::BPF_F_BEFORE,
            TcPosition::Last => libbpf_sys::BPF_F_AFTER,
        },
        ..Default::default()
    };
    // SAFETY: plain descriptors and options that outlive the call.
    let fd = unsafe {
        libbpf_sys::bpf_link_create(
            program.as_fd().as_raw_fd(),
            ifindex as i32,
            attach_type,
            &opts,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn attach_clsact(
    program: &ProgramMut,
    ifindex: u32,
    direction: TcDirection,
    position: TcPosition,
) -> Result<ClsactFilter> {
    let point = match direction {
        TcDirection::Ingress => TC_INGRESS,
        TcDirection::Egress => TC_EGRESS,
    };
    let (priority, other) = match position {
        TcPosition::First => (CLSACT_FIRST_PRIORITY, CLSACT_LAST_PRIORITY),
        TcPosition::Last => (CLSACT_LAST_PRIORITY, CLSACT_FIRST_PRIORITY),
    };
    let hook_at = |priority| {
        TcHookBuilder::new(program.as_fd())
            .ifindex(ifindex as i32)
            .replace(true)
            .handle(CLSACT_FILTER_HANDLE)
            .priority(priority)
            .hook(point)
    };
    let mut hook = hook_at(priority);
    // libbpf-rs's create() hides whether the qdisc existed; ask libbpf.
    let mut qdisc = libbpf_sys::bpf_tc_hook {
        sz: std::mem::size_of::<libbpf_sys::bpf_tc_hook>() as _,
        ifindex: ifindex as i32,
        attach_point: point,
        ..Default::default()
    };
    // SAFETY: qdisc is a complete bpf_tc_hook that outlives the call.
    let created = quietly(|| unsafe { libbpf_sys::bpf_tc_hook_create(&mut qdisc) });
    if created != 0 && created != -libc::EEXIST {
        bail!(
            "creating a clsact qdisc: {}",
            std::io::Error::from_raw_os_error(-created)
        );
    }
    // A filter of ours already there was left by a run that was killed: the
    // qdisc is ours to remove as well (when nobody else's filter is on it).
    // One at the other position was left by a run with another order.
    let mut at_other = hook_at(other);
    let leftover_elsewhere = quietly(|| at_other.query().is_ok());
    if leftover_elsewhere {
        at_other.detach()?;
    }
    let leftover = quietly(|| hook.query().is_ok()) || leftover_elsewhere;
    hook.attach()?;
    Ok(ClsactFilter {
        hook,
        ifindex,
        remove_qdisc: created == 0 || leftover,
    })
}

/// Runs `call` with libbpf's messages off: for netlink requests whose
/// failure is an expected answer (the qdisc exists already, no filter of
/// ours is there), which libbpf would otherwise print as kernel errors.
fn quietly<T>(call: impl FnOnce() -> T) -> T {
    // SAFETY: swaps libbpf's print function and puts the previous one back;
    // this process loads and attaches from one thread.
    let previous = unsafe { libbpf_sys::libbpf_set_print(None) };
    let result = call();
    // SAFETY: as above.
    unsafe { libbpf_sys::libbpf_set_print(previous) };
    result
}

/// How many programs are attached to a cgroup for one attach type (a
/// `libbpf_sys::BPF_CGROUP_*` value), as `bpftool cgroup show` would list.
pub fn cgroup_program_count(
    cgroup: &Path,
    attach_type: libbpf_sys::bpf_attach_type,
) -> Result<u32> {
    let fd = CgroupFd::open(cgroup)?;
    attached_count(fd.raw_fd(), attach_type)
        .with_context(|| format!("querying programs on {}", cgroup.display()))
}

/// How many tcx programs are attached to an interface of the calling
/// thread's network namespace in one direction (`bpftool net` before 7.3
/// does not list tcx).
pub fn tcx_program_count(ifindex: u32, direction: TcDirection) -> Result<u32> {
    let attach_type = tcx_attach_type(direction);
    match attached_count(ifindex as i32, attach_type) {
        // EINVAL: a kernel before 6.6, where nothing can be attached by tcx.
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(0),
        result => result.with_context(|| format!("querying tcx programs on ifindex {ifindex}")),
    }
}

/// BPF_PROG_QUERY for the number of programs only; `target` is a cgroup fd
/// or an ifindex, depending on the attach type.
fn attached_count(target: i32, attach_type: libbpf_sys::bpf_attach_type) -> std::io::Result<u32> {
    let mut count: u32 = 0;
    let mut attach_flags: u32 = 0;
    // SAFETY: a null id buffer with count 0 asks the kernel for the count only.
    let ret = unsafe {
        libbpf_sys::bpf_prog_query(
            target,
            attach_type,
            0,
            &mut attach_flags,
            std::ptr::null_mut(),
            &mut count,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret));
    }
    Ok(count)
}

/// A program another tool attached to a cgroup hook.
pub struct CgroupNeighbour {
    pub id: u32,
    pub name: String,
    pub cgroup: std::path::PathBuf,
    /// The flags it was attached with (`BPF_F_ALLOW_MULTI`, ...).
    pub flags: u32,
}

/// The programs of `attach_type` on `cgroup` and every cgroup above it,
/// nearest first.
pub fn cgroup_neighbours(
    cgroup: &Path,
    attach_type: libbpf_sys::bpf_attach_type,
) -> Result<Vec<CgroupNeighbour>> {
    let mut neighbours = Vec::new();
    let mut current = Some(cgroup);
    while let Some(dir) = current {
        let fd = CgroupFd::open(dir)?;
        let mut ids = [0u32; 64];
        let mut count = ids.len() as u32;
        let mut flags = 0u32;
        // SAFETY: ids holds count entries; the kernel writes at most that.
        let ret = unsafe {
            libbpf_sys::bpf_prog_query(
                fd.raw_fd(),
                attach_type,
                0,
                &mut flags,
                ids.as_mut_ptr(),
                &mut count,
            )
        };
        if ret != 0 {
            return Err(std::io::Error::from_raw_os_error(-ret))
                .with_context(|| format!("querying programs on {}", dir.display()));
        }
        for &id in &ids[..count.min(ids.len() as u32) as usize] {
            neighbours.push(CgroupNeighbour {
                id,
                name: program_name(id).unwrap_or_else(|| "?".into()),
                cgroup: dir.to_path_buf(),
                flags,
            });
        }
        // Up to the root of whichever cgroup2 mount holds `cgroup` (a
        // container may see the host's tree at a second one).
        current = dir
            .parent()
            .filter(|parent| crate::sys::cgroup::is_cgroup2(parent));
    }
    Ok(neighbours)
}

/// The kernel's name of program `id`, if it can be read.
fn program_name(id: u32) -> Option<String> {
    // SAFETY: a plain system call; a new descriptor or a negative errno.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let info = program_info(fd.as_raw_fd())?;
    let name: Vec<u8> = info
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&name).into_owned())
}

/// Fails, naming the program, when another tool's program on `cgroup` or
/// above it makes a multi-program link there impossible (the kernel
/// would answer EPERM): one attached without `BPF_F_ALLOW_MULTI` on the
/// cgroup itself, or above it without `BPF_F_ALLOW_OVERRIDE` either, with
/// no multi attachment in between.
pub fn check_cgroup_hook(
    cgroup: &Path,
    attach_type: libbpf_sys::bpf_attach_type,
    hook: &str,
) -> Result<()> {
    let multi = libbpf_sys::BPF_F_ALLOW_MULTI;
    let overridable = libbpf_sys::BPF_F_ALLOW_OVERRIDE;
    // The nearest cgroup that holds a program decides.
    let Some(nearest) = cgroup_neighbours(cgroup, attach_type)?.into_iter().next() else {
        return Ok(());
    };
    let here = nearest.cgroup == cgroup;
    // Multi there: that cgroup and everything below it can attach; an
    // overridable program above lets this cgroup attach its own.
    if nearest.flags & multi != 0 || (!here && nearest.flags & overridable != 0) {
        return Ok(());
    }
    bail!(
        "cgroup {} holds program {} '{}' on {hook}, attached by another tool without \
         BPF_F_ALLOW_MULTI{}: no other program can attach to {} there",
        nearest.cgroup.display(),
        nearest.id,
        nearest.name,
        if here { "" } else { " or BPF_F_ALLOW_OVERRIDE" },
        cgroup.display()
    )
}
