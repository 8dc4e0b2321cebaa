//! Attachments owned by the running process. Every attachment is a bpf_link:
//! when the process exits, even by SIGKILL, the kernel detaches it.

use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{Link, ProgramMut};

use crate::cgroup::CgroupFd;

/// The links of one subcommand, detached together on drop.
#[derive(Default)]
pub struct Attachments {
    links: Vec<Link>,
}

impl Attachments {
    pub fn attach_cgroup(&mut self, program: &ProgramMut, cgroup: &CgroupFd) -> Result<()> {
        let link = program.attach_cgroup(cgroup.raw_fd()).with_context(|| {
            format!(
                "attaching {} to cgroup {}",
                program.name().to_string_lossy(),
                cgroup.path.display()
            )
        })?;
        self.links.push(link);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

/// How many programs are attached to a cgroup for one attach type (a
/// `libbpf_sys::BPF_CGROUP_*` value), as `bpftool cgroup show` would list.
pub fn cgroup_program_count(
    cgroup: &Path,
    attach_type: libbpf_sys::bpf_attach_type,
) -> Result<u32> {
    let fd = CgroupFd::open(cgroup)?;
    let mut count: u32 = 0;
    let mut attach_flags: u32 = 0;
    // SAFETY: a null id buffer with count 0 asks the kernel for the count only.
    let ret = unsafe {
        libbpf_sys::bpf_prog_query(
            fd.raw_fd(),
            attach_type,
            0,
            &mut attach_flags,
            std::ptr::null_mut(),
            &mut count,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret))
            .with_context(|| format!("querying programs on {}", cgroup.display()));
    }
    Ok(count)
}
