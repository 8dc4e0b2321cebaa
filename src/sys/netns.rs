//! Network namespaces and veth pairs that remove themselves, and commands
//! started inside a namespace and a cgroup. The demo and the tests build
//! their private networks from these.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::sys::cgroup::ChildCgroup;

/// Runs `ip ARGS...`, failing with its stderr; returns its stdout.
/// The inode of the calling thread's network namespace, which tells
/// namespaces apart.
pub fn current_inode() -> Result<u64> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net")
        .context("reading this thread's network namespace")?;
    Ok(std::os::unix::fs::MetadataExt::ino(&meta))
}

pub fn ip<S: AsRef<str>>(args: &[S]) -> Result<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let output = Command::new("ip")
        .args(&args)
        .output()
        .context("running ip (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop with
/// everything in it.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    fn open(&self) -> Result<File> {
        let path = format!("/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("opening {path}"))
    }

    /// Moves the calling thread (only) into this namespace.
    pub fn enter_current_thread(&self) -> Result<()> {
        let file = self.open()?;
        setns(&file, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering network namespace {}", self.name))
    }

    /// Runs `work` on a new thread inside this namespace; sockets it creates
    /// belong to the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<JoinHandle<Result<T>>> {
        let file = self.open()?;
        let name = self.name.clone();
        Ok(std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {name}"))?;
            work()
        }))
    }

    /// Adds an address to an interface in this namespace and brings it up.
    pub fn configure(&self, device: &str, addrs: &[&str]) -> Result<()> {
        for addr in addrs {
            // nodad: an IPv6 address is usable at once, not after DAD.
            let mut args = vec!["addr", "add", addr, "dev", device];
            if addr.contains(':') {
                args.push("nodad");
            }
            self.ip(&args)?;
        }
        self.ip(&["link", "set", device, "up"])?;
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            tracing::warn!("{err:#}");
        }
    }
}

/// Creates a veth pair with one end in each namespace; it disappears with
/// either namespace.
pub fn veth_pair(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) -> Result<()> {
    ip(&[
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])?;
    Ok(())
}

/// A command that starts inside `netns` and `cgroup` (each optional): the
/// child joins both between fork and exec, so the program's first socket is
/// already in the right place.
pub fn command_in(
    program: &str,
    netns: Option<&NetNs>,
    cgroup: Option<&ChildCgroup>,
) -> Result<Command> {
    let netns_file = netns.map(NetNs::open).transpose()?;
    let procs_file = cgroup.map(ChildCgroup::procs_file).transpose()?;
    let mut command = Command::new(program);
    // SAFETY: the closure only makes async-signal-safe system calls (write,
    // setns) on descriptors opened before the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &procs_file {
                // "0" means the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(ns) = &netns_file {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(command)
}
