//! Signals: SIGINT and SIGTERM ask the running process to stop cleanly.
//! SIGHUP asks a service (`run --config`) to reload its file, and stops a
//! single subcommand, as a closed terminal should. SIGUSR2 asks a service
//! to start the binary now on disk and hand everything over to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static RELOAD_REQUESTED: AtomicBool = AtomicBool::new(false);
static HANGUP_RELOADS: AtomicBool = AtomicBool::new(false);
static UPGRADE_REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALLED: OnceLock<()> = OnceLock::new();

extern "C" fn on_signal(signal: libc::c_int) {
    // Only atomic stores: this runs in signal context.
    if signal == libc::SIGHUP && HANGUP_RELOADS.load(Ordering::SeqCst) {
        RELOAD_REQUESTED.store(true, Ordering::SeqCst);
    } else if signal == libc::SIGUSR2 {
        UPGRADE_REQUESTED.store(true, Ordering::SeqCst);
    } else {
        if signal == libc::SIGINT {
            INTERRUPTED.store(true, Ordering::SeqCst);
        }
        REQUESTED.store(true, Ordering::SeqCst);
    }
}

/// Installs the handlers once per process; later calls do nothing.
pub fn install() -> Result<()> {
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    // No SA_RESTART: a signal interrupts the run loop's poll at once.
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to atomics.
        unsafe { signal::sigaction(sig, &action) }
            .with_context(|| format!("installing the {sig} handler"))?;
    }
    let _ = INSTALLED.set(());
    Ok(())
}

/// From now on SIGHUP asks for a reload instead of a stop.
pub fn reload_on_hangup() {
    HANGUP_RELOADS.store(true, Ordering::SeqCst);
}

/// Makes SIGUSR2 ask for an upgrade (a service's; a subcommand keeps the
/// default action, which ends it).
pub fn upgrade_on_usr2() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to atomics.
    unsafe { signal::sigaction(Signal::SIGUSR2, &action) }
        .context("installing the SIGUSR2 handler")?;
    Ok(())
}

/// Whether an upgrade was asked for (SIGUSR2) since the last call.
pub fn take_upgrade_request() -> bool {
    UPGRADE_REQUESTED.swap(false, Ordering::SeqCst)
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Whether the stop asked for came from SIGINT (Ctrl-C): not to be kept
/// waiting, unlike SIGTERM, which a process that drains lets finish.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Whether a reload was asked for since the last call.
pub fn take_reload_request() -> bool {
    RELOAD_REQUESTED.swap(false, Ordering::SeqCst)
}
