//! What every datapath is to the service that runs it: the `Datapath`
//! trait, the context they share while they run, their event streams, and
//! the two traits by which the registry hands settings to the service.
//! Everything above (the registry, the service) depends on this; this
//! depends on nothing above it.

use std::cell::OnceCell;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use libbpf_rs::MapHandle;

use crate::cli::EventFormat;
use crate::sys::clock;
use crate::sys::handover::{Bequest, Inheritance};
use crate::sys::pins::{PinDir, PinRoot};
use crate::telemetry::stats::Snapshot;

/// What every datapath shares while it runs.
pub struct RunContext {
    pub format: EventFormat,
    /// clock::monotonic_ns() at start, the zero of event times.
    pub start_ns: u64,
    /// Where a service pins what must outlive it; None for the
    /// subcommands, which leave nothing behind.
    pub pins: Option<PinRoot>,
    /// What the service this process takes over from handed it: listening
    /// sockets, UDP flows, locks. Empty unless it took over.
    pub inheritance: Inheritance,
    proxy_runtime: OnceCell<Arc<tokio::runtime::Runtime>>,
}

impl RunContext {
    pub fn new(format: EventFormat) -> RunContext {
        RunContext {
            format,
            start_ns: clock::monotonic_ns(),
            pins: None,
            inheritance: Inheritance::default(),
            proxy_runtime: OnceCell::new(),
        }
    }

    /// The pin directory of datapath `name` when this runs as a service.
    pub fn pin_dir(&self, name: &str, layout: u64) -> Result<Option<PinDir>> {
        self.pins
            .as_ref()
            .map(|root| root.datapath(name, layout))
            .transpose()
    }

    /// The one runtime of the built-in proxies (TCP and UDP) of every
    /// datapath, started by the first that needs it.
    pub fn proxy_runtime(&self) -> Result<Arc<tokio::runtime::Runtime>> {
        if let Some(runtime) = self.proxy_runtime.get() {
            return Ok(runtime.clone());
        }
        crate::sys::rlimit::raise_open_file_limit();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("proxy")
            .enable_all()
            .build()
            .context("starting the proxy runtime")?;
        Ok(self.proxy_runtime.get_or_init(|| Arc::new(runtime)).clone())
    }
}

impl Drop for RunContext {
    fn drop(&mut self) {
        if let Some(runtime) = self.proxy_runtime.take() {
            if let Ok(runtime) = Arc::try_unwrap(runtime) {
                runtime.shutdown_timeout(Duration::from_secs(1));
            }
        }
    }
}

/// What a datapath does with one ring-buffer record.
pub type EventHandler = Box<dyn FnMut(&[u8])>;

/// A datapath's ring buffer and what to do with each record.
pub struct EventSource {
    pub map: MapHandle,
    /// The column header printed before the first text event.
    pub header: String,
    pub handle: EventHandler,
}

impl EventSource {
    /// Records of type `T` from `map`, each passed to `handle`.
    pub fn new<T: plain::Plain + 'static>(
        map: &libbpf_rs::Map<'_>,
        header: String,
        mut handle: impl FnMut(&T) + 'static,
    ) -> Result<EventSource> {
        Ok(EventSource {
            map: MapHandle::try_from(map).context("sharing the events map")?,
            header,
            handle: Box::new(move |bytes| {
                if let Ok(event) = plain::from_bytes::<T>(bytes) {
                    handle(event);
                }
            }),
        })
    }
}

/// A running datapath, as the run loop sees it.
pub trait Datapath {
    /// `redirect`, `bypass`, `tproxy`, or `port-nat IFACE`: unique in a service.
    fn name(&self) -> String;
    /// Attaches everything prepared and prints the configuration.
    fn attach(&mut self, ctx: &RunContext) -> Result<()>;
    /// How the programs are attached, for the build-info metric.
    fn attach_mode(&self) -> String;
    /// The events to stream while events are on.
    fn events(&self, ctx: &RunContext) -> Result<Option<EventSource>>;
    /// Called about every 100 ms: follow interfaces, expire flows.
    fn tick(&mut self, _ctx: &RunContext) {}
    /// Counters and gauges, read for /metrics, the status page and the exit
    /// statistics.
    fn snapshots(&self) -> Result<Vec<Snapshot>>;
    /// What is attached where, for `proxy-redirect status`.
    fn status(&self) -> serde_json::Value;
    /// Stops new work before the final statistics are read.
    fn stop(&mut self) {}
    fn print_statistics(&self) -> Result<()>;
    /// The built-in relays this datapath runs, which a hand-over moves to
    /// the successor.
    fn relays(&mut self) -> Vec<&mut dyn Relay> {
        Vec::new()
    }
    /// What else a successor takes over (a lock), as duplicates.
    fn bequeath(&self, _bequest: &mut Bequest) -> Result<()> {
        Ok(())
    }
    /// The successor of a hand-over runs no datapath of this name (its
    /// file dropped it): detach the programs now, keeping the relays,
    /// which drain.
    fn detach(&mut self) {}
    /// A successor that swapped its programs into this datapath's links
    /// failed before it served: put this process's programs back.
    fn reclaim(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A relay that holds clients' connections (the built-in proxies), as a
/// hand-over moves it: offered, released, then retired while its open
/// connections drain, or resumed when the successor fails.
pub trait Relay {
    /// Adds duplicates of its listening sockets; it goes on serving.
    fn bequeath(&self, bequest: &mut Bequest) -> Result<()>;
    /// The successor is about to serve: stop taking new work. What can
    /// only move now (the UDP relay's flows) goes into `bequest`.
    fn release(&mut self, bequest: &mut Bequest) -> Result<()>;
    /// The successor failed after the release: take new work again.
    fn resume(&mut self) -> Result<()>;
    /// The successor serves, with the sockets whose roles are in `taken`.
    /// Serve what already waits on the others, close every listening
    /// socket, and go on relaying the connections that are open.
    fn retire(&mut self, taken: &[String]);
    /// Connections still relayed.
    fn open_connections(&self) -> u64;
    /// Resets every connection still relayed (the drain's deadline).
    fn cut(&self);
}

/// The settings of one datapath, as the service sees them: named, checked
/// without changing the system, then prepared into a datapath.
pub trait DatapathSettings: Sized {
    type Running: RunningDatapath<Settings = Self>;
    /// `redirect`, `bypass`, `tproxy`, or `port-nat IFACE`: unique in a
    /// service; a reload matches old and new datapaths by it.
    fn name(&self) -> String;
    /// Checks everything that can be checked without changing the system
    /// (users, cgroups, interfaces, privileges).
    fn check(&self) -> Result<()>;
    /// Loads the programs and binds the sockets; nothing is attached yet.
    fn prepare(&self, ctx: &RunContext) -> Result<Self::Running>;
}

/// A running datapath together with the typed settings it can be given.
pub trait RunningDatapath {
    type Settings;
    fn datapath(&self) -> &dyn Datapath;
    fn datapath_mut(&mut self) -> &mut dyn Datapath;
    /// Whether `reload` can apply these settings (of the same name, already
    /// through `check`); changes nothing.
    fn check_reload(&self, settings: &Self::Settings) -> Result<()>;
    /// Applies settings that passed `check_reload` in place: map updates,
    /// attaching to a new cgroup before leaving the old.
    fn reload(&mut self, settings: &Self::Settings, ctx: &RunContext) -> Result<()>;
}
