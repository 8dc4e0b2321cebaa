//! SIGINT, SIGTERM and SIGHUP ask the running subcommand to stop cleanly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the handler once per process; later calls do nothing.
pub fn install() -> Result<()> {
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    ctrlc::set_handler(|| REQUESTED.store(true, Ordering::SeqCst))
        .context("installing the SIGINT/SIGTERM handler")?;
    let _ = INSTALLED.set(());
    Ok(())
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
