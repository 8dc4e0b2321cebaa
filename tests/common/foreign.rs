//! Another tool's programs on our hooks (tests/neighbours.rs,
//! tests/lifecycle.rs): a TC program and cgroup programs, with the
//! kernel's count of their runs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use proxy_redirect::sys::netns::NetNs;

use super::{in_netns, kernel};

/// Another tool's TC program: `r0 = TCX_NEXT (-1); exit`, whose runs the
/// kernel counts while `Stats` is held.
pub struct Foreign {
    pub program: OwnedFd,
    /// tcx links; on a kernel without tcx, clsact filters instead, which
    /// go with the test's network namespace.
    links: Vec<OwnedFd>,
}

/// BPF_ENABLE_STATS: run counts are kept while this descriptor is open.
pub struct Stats(#[allow(dead_code)] OwnedFd);

impl Stats {
    pub fn enable() -> Stats {
        // SAFETY: a plain system call; a descriptor or a negative errno.
        let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
        assert!(
            fd >= 0,
            "BPF_ENABLE_STATS: {}",
            std::io::Error::from_raw_os_error(-fd)
        );
        // SAFETY: the kernel just returned this descriptor.
        Stats(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// The clsact priority of the foreign filter: between ours first (1) and
/// ours last (0xffff).
pub const FOREIGN_PRIORITY: u32 = 100;
pub const FOREIGN_HANDLE: u32 = 0xf0;

impl Foreign {
    pub fn load() -> Foreign {
        // mov r0, -1; exit
        let insns: [u64; 2] = [0xffff_ffff_0000_00b7, 0x95];
        // SAFETY: two complete instructions; the names are NUL-terminated.
        let fd = unsafe {
            libbpf_sys::bpf_prog_load(
                libbpf_sys::BPF_PROG_TYPE_SCHED_CLS,
                c"foreign_next".as_ptr(),
                c"GPL".as_ptr(),
                insns.as_ptr().cast(),
                insns.len() as _,
                std::ptr::null_mut(),
            )
        };
        assert!(
            fd >= 0,
            "loading the foreign program: {}",
            std::io::Error::from_raw_os_error(-fd)
        );
        Foreign {
            // SAFETY: the kernel just returned this descriptor.
            program: unsafe { OwnedFd::from_raw_fd(fd) },
            links: Vec::new(),
        }
    }

    /// Appends the program to `device` in `netns` (ingress, and egress
    /// too with `both`), as tools do by default: a tcx link, or a clsact
    /// filter on 6.1.
    pub fn attach(&mut self, netns: &NetNs, device: &str, both: bool) {
        let program = self.program.as_raw_fd();
        let device = device.to_owned();
        let directions = [
            (libbpf_sys::BPF_TCX_INGRESS, libbpf_sys::BPF_TC_INGRESS),
            (libbpf_sys::BPF_TCX_EGRESS, libbpf_sys::BPF_TC_EGRESS),
        ];
        let count = if both { 2 } else { 1 };
        let links = in_netns(netns, move || {
            let ifindex = nix::net::if_::if_nametoindex(device.as_str())? as i32;
            let mut links = Vec::new();
            for (tcx, clsact) in directions.into_iter().take(count) {
                if kernel::has_tcx() {
                    // SAFETY: plain descriptors, no options.
                    let fd = unsafe {
                        libbpf_sys::bpf_link_create(program, ifindex, tcx, std::ptr::null())
                    };
                    anyhow::ensure!(fd >= 0, "tcx: {}", std::io::Error::from_raw_os_error(-fd));
                    // SAFETY: the kernel just returned this descriptor.
                    links.push(unsafe { OwnedFd::from_raw_fd(fd) });
                } else {
                    clsact_filter(ifindex, clsact, program)?;
                }
            }
            Ok(links)
        });
        self.links.extend(links);
    }

    pub fn runs(&self) -> u64 {
        run_count(&self.program)
    }
}

/// How many times `program` ran since `Stats::enable`.
fn run_count(program: &OwnedFd) -> u64 {
    program_info(program).run_cnt
}

fn program_info(program: &OwnedFd) -> libbpf_sys::bpf_prog_info {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: info is a complete bpf_prog_info of len bytes.
    let ret =
        unsafe { libbpf_sys::bpf_prog_get_info_by_fd(program.as_raw_fd(), &mut info, &mut len) };
    assert_eq!(ret, 0);
    info
}

/// Loads raw instructions as a program of `prog_type` (for the cgroup
/// hook `attach_type`, where it needs one).
pub fn load_raw(
    prog_type: libbpf_sys::bpf_prog_type,
    attach_type: Option<libbpf_sys::bpf_attach_type>,
    name: &std::ffi::CStr,
    insns: &[u64],
) -> OwnedFd {
    let mut opts = libbpf_sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_load_opts>() as _,
        expected_attach_type: attach_type.unwrap_or(0),
        ..Default::default()
    };
    // SAFETY: complete instructions and options; NUL-terminated names.
    let fd = unsafe {
        libbpf_sys::bpf_prog_load(
            prog_type,
            name.as_ptr(),
            c"GPL".as_ptr(),
            insns.as_ptr().cast(),
            insns.len() as _,
            &mut opts,
        )
    };
    assert!(
        fd >= 0,
        "loading {name:?}: {}",
        std::io::Error::from_raw_os_error(-fd)
    );
    // SAFETY: the kernel just returned this descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `r0 = 1; exit`: a cgroup program that lets everything through.
pub const ALLOW: [u64; 2] = [0x0000_0001_0000_00b7, 0x95];

/// Another tool's program on a cgroup hook, attached the old way with
/// `flags` (0: exclusive); detached on drop.
pub struct CgroupProgram {
    pub program: OwnedFd,
    pub cgroup: std::fs::File,
    pub attach_type: libbpf_sys::bpf_attach_type,
}

impl CgroupProgram {
    pub fn attach(
        cgroup: &std::path::Path,
        prog_type: libbpf_sys::bpf_prog_type,
        attach_type: libbpf_sys::bpf_attach_type,
        name: &std::ffi::CStr,
        flags: u32,
    ) -> CgroupProgram {
        let program = load_raw(prog_type, Some(attach_type), name, &ALLOW);
        CgroupProgram::attach_loaded(cgroup, program, attach_type, name, flags)
    }

    /// The same for a program loaded already.
    pub fn attach_loaded(
        cgroup: &std::path::Path,
        program: OwnedFd,
        attach_type: libbpf_sys::bpf_attach_type,
        name: &std::ffi::CStr,
        flags: u32,
    ) -> CgroupProgram {
        let cgroup = std::fs::File::open(cgroup).unwrap();
        // SAFETY: plain descriptors.
        let ret = unsafe {
            libbpf_sys::bpf_prog_attach(program.as_raw_fd(), cgroup.as_raw_fd(), attach_type, flags)
        };
        assert_eq!(ret, 0, "attaching {name:?}");
        CgroupProgram {
            program,
            cgroup,
            attach_type,
        }
    }

    /// How many times it ran since `Stats::enable`.
    pub fn runs(&self) -> u64 {
        run_count(&self.program)
    }

    /// Its run time and run count, as `kernel.bpf_stats_enabled` keeps them.
    pub fn run_time_and_count(&self) -> (u64, u64) {
        let info = program_info(&self.program);
        (info.run_time_ns, info.run_cnt)
    }
}

impl Drop for CgroupProgram {
    fn drop(&mut self) {
        // SAFETY: plain descriptors.
        unsafe {
            libbpf_sys::bpf_prog_detach2(
                self.program.as_raw_fd(),
                self.cgroup.as_raw_fd(),
                self.attach_type,
            )
        };
    }
}

pub fn tc_hook(ifindex: i32, point: libbpf_sys::bpf_tc_attach_point) -> libbpf_sys::bpf_tc_hook {
    libbpf_sys::bpf_tc_hook {
        sz: std::mem::size_of::<libbpf_sys::bpf_tc_hook>() as _,
        ifindex,
        attach_point: point,
        ..Default::default()
    }
}

/// Another tool's clsact filter (creating the qdisc if need be).
pub fn clsact_filter(
    ifindex: i32,
    point: libbpf_sys::bpf_tc_attach_point,
    program: i32,
) -> anyhow::Result<()> {
    let mut hook = tc_hook(ifindex, point);
    // SAFETY: complete structs that outlive the calls; libbpf's messages
    // off (an existing qdisc is an expected answer).
    unsafe {
        libbpf_sys::libbpf_set_print(None);
        let created = libbpf_sys::bpf_tc_hook_create(&mut hook);
        anyhow::ensure!(created == 0 || created == -libc::EEXIST, "qdisc: {created}");
        let mut opts = libbpf_sys::bpf_tc_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_tc_opts>() as _,
            prog_fd: program,
            handle: FOREIGN_HANDLE,
            priority: FOREIGN_PRIORITY,
            ..Default::default()
        };
        let attached = libbpf_sys::bpf_tc_attach(&hook, &mut opts);
        anyhow::ensure!(attached == 0, "filter: {attached}");
    }
    Ok(())
}
