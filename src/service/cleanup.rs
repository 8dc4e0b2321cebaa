//! `proxy-redirect cleanup`: removes the datapaths a service that was
//! killed left pinned, which keep working until then.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::out;
use crate::sys::{links, local_route, pins, run_dir};
use crate::telemetry::status;

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
A service (`proxy-redirect run`) pins every datapath's links and kernel
state under DIR (port-nat's flows, bypass's sockets, redirect's records,
tproxy's links) so that a crash does not cut a translated or bypassed
connection, and removes them when it stops. After a crash without a restart
they keep working, unowned; `proxy-redirect status` lists them and this
command detaches and removes them, tproxy's rules and routes, and (before
Linux 6.6) the clsact filters, when it runs in their network namespace,
and the instance locks and sockets in /run/proxy-redirect that no process
holds. It
refuses while a running service owns DIR.")]
pub struct CleanupArgs {
    /// The service's bpffs directory
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_ROOT)]
    pub pin_dir: PathBuf,
}

pub fn run(args: &CleanupArgs) -> Result<()> {
    let dir = args.pin_dir.display().to_string();
    // A service that has not published its first page yet says no pin_dir.
    if let Some(page) = status::query()? {
        if page["pin_dir"].as_str().is_none_or(|owned| owned == dir) {
            bail!(
                "a running service owns {dir} (see `proxy-redirect status`): stop it \
                 instead, and it removes its pins"
            );
        }
    }
    for datapath in pins::pinned_datapaths(&args.pin_dir) {
        let dir = args.pin_dir.join(&datapath);
        let said = local_route::remove_recorded(&dir)
            .into_iter()
            .chain(links::remove_recorded_clsact(&dir));
        for line in said {
            out!("{datapath}: {line}");
        }
    }
    let left = run_dir::remove_left_behind();
    if !left.is_empty() {
        out!(
            "Removed the locks and sockets nobody held from {}: {}",
            run_dir::RUN_DIR,
            left.join(", ")
        );
    }
    let removed = pins::remove_all(&args.pin_dir)?;
    if removed.is_empty() {
        out!("Nothing is pinned in {dir}");
    } else {
        out!("Removed from {dir}: {}", removed.join(", "));
    }
    Ok(())
}
