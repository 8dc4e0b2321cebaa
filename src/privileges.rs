//! Checking for the capabilities BPF programs need, before anything is done.

use std::fs;

use anyhow::{bail, Context, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
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
