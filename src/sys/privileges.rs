//! Checking for the capabilities BPF programs and the proxy need, before
//! anything is done.

use std::fs;

use anyhow::{bail, Context, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process, from `/proc/self/status`.
fn effective_capabilities() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .context("no CapEff line in /proc/self/status")?;
    u64::from_str_radix(hex.trim(), 16).context("parsing CapEff")
}

/// Fails with one clear line unless this process may load and attach
/// networking BPF programs (CAP_BPF or CAP_SYS_ADMIN, plus CAP_NET_ADMIN).
pub fn require_bpf(subcommand: &str) -> Result<()> {
    let caps = effective_capabilities()?;
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN) {
        return Ok(());
    }
    bail!(
        "{subcommand} needs root (CAP_BPF and CAP_NET_ADMIN); run it with sudo (running as uid {})",
        nix::unistd::geteuid()
    )
}

/// `require_bpf`, and CAP_PERFMON (or CAP_SYS_ADMIN) as well: port-nat's
/// programs need it from the verifier (pointer arithmetic on the stack),
/// bypass's to read the current task.
pub fn require_bpf_and_perfmon(subcommand: &str) -> Result<()> {
    require_bpf(subcommand)?;
    let caps = effective_capabilities()?;
    if caps & (1u64 << CAP_PERFMON) != 0 || caps & (1u64 << CAP_SYS_ADMIN) != 0 {
        return Ok(());
    }
    bail!(
        "{subcommand} needs CAP_PERFMON as well as CAP_BPF and CAP_NET_ADMIN; run it with sudo \
         or add CAP_PERFMON (running as uid {})",
        nix::unistd::geteuid()
    )
}

/// Fails with one clear line unless the built-in proxy can do what every
/// connection needs: SO_MARK (`mark` other than 0) needs CAP_NET_ADMIN,
/// IP_TRANSPARENT needs CAP_NET_ADMIN or CAP_NET_RAW.
pub fn require_proxy(mark: u32, transparent: bool) -> Result<()> {
    let caps = effective_capabilities()?;
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let uid = nix::unistd::geteuid();
    if mark != 0 && !has(CAP_NET_ADMIN) {
        bail!(
            "proxy needs root (CAP_NET_ADMIN) to mark its upstream connections with {mark:#x}; \
             run it with sudo, or give --mark 0 where nothing redirects them back (running as uid {uid})"
        );
    }
    if transparent && !has(CAP_NET_ADMIN) && !has(CAP_NET_RAW) {
        bail!(
            "proxy --transparent needs root (CAP_NET_ADMIN or CAP_NET_RAW) for IP_TRANSPARENT; \
             run it with sudo (running as uid {uid})"
        );
    }
    Ok(())
}
