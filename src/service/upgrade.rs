//! `proxy-redirect upgrade`: asks the running service to hand over to the
//! binary now on disk (SIGUSR2), and waits until the new process serves.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::out;
use crate::telemetry::status;

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Install the new binary over the old one first (install(1) or a package
does it: the running process keeps its own copy), then run this. The
service starts the binary at its path with the same arguments and
--take-over; the new process reads the configuration file again, takes
the listening sockets, the UDP flows and the pinned datapaths, and serves,
while the old one drains the connections it relays and exits. Under
systemd, `systemctl kill -s SIGUSR2 proxy-redirect` does the same.
Settings that a reload refuses (proxy port, mark, ...) apply this way.")]
pub struct UpgradeArgs {
    /// How long to wait for the new process to serve
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub timeout: u64,
}

pub fn run(args: &UpgradeArgs) -> Result<()> {
    let Some(before) = status::query()? else {
        bail!("no proxy-redirect service is running (see `proxy-redirect status`)");
    };
    let pid = before["pid"].as_u64().context("the status has no pid")? as i32;
    let failures = |page: &serde_json::Value| page["upgrade"]["failures"].as_u64().unwrap_or(0);
    let failed_before = failures(&before);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .with_context(|| format!("signalling the service (pid {pid})"))?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(Some(now)) = status::query() else {
            continue;
        };
        if failures(&now) > failed_before {
            bail!(
                "the upgrade failed: {}; the service (pid {pid}) goes on as it was",
                now["upgrade"]["last_failure"]
                    .as_str()
                    .unwrap_or("see its log")
            );
        }
        if now["pid"].as_u64().is_some_and(|p| p != pid as u64) {
            out!(
                "Upgraded: pid {pid} (version {}) handed over to pid {} (version {}), \
                 which serves; pid {pid} drains its connections",
                before["version"].as_str().unwrap_or("?"),
                now["pid"],
                now["version"].as_str().unwrap_or("?")
            );
            return Ok(());
        }
    }
    bail!(
        "the service (pid {pid}) is still the one serving after {} s: see its log for why \
         the new binary did not take over; the service goes on as it was",
        args.timeout
    )
}
