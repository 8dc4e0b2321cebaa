//! One lifecycle for every datapath. A datapath is prepared (everything
//! checked and loaded, nothing attached), attached, then watched by one run
//! loop: one shutdown signal, one event stream, one statistics printer, one
//! metrics page and one status page for any set of datapaths. The
//! subcommands run one datapath through it; `run --config` runs several and
//! reloads them on SIGHUP.

pub mod cleanup;
pub mod config;
pub mod handover;
pub mod reload;
pub mod upgrade;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use libbpf_rs::RingBufferBuilder;

use crate::cli::{EventFormat, OutputArgs};
use crate::datapath::Settings;
use crate::runtime::{Datapath, DatapathSettings, RunContext, RunningDatapath};
use crate::sys::pins::{self, PinRoot};
use crate::sys::{notify, shutdown, trusted_file};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::output;
use crate::telemetry::stats::{Metric, Snapshot};
use crate::telemetry::status;
use crate::{err_out, out};
use reload::Source;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Example:
  proxy-redirect run --config /etc/proxy-redirect/config.toml

The file has a section per datapath: [redirect], [bypass], [[port-nat]]
(one per interface), [tproxy], and [metrics] with listen = \"ADDR\". Keys are
the long options of the subcommand of that name, with typed values:
  [redirect]
  cgroup = \"pods.slice\"
  ports = [80, 443]
  [[port-nat]]
  interface = \"eth0\"
  from = [8080]
  to = [80]
Everything is checked before anything is attached. SIGHUP reloads the file:
ports, networks, excluded users and port mappings change in place without
dropping a connection, a new cgroup is attached before the old one is left,
and a file with an error is refused while the running configuration stays.
`proxy-redirect status` shows what runs.

The datapaths' links and kernel state are pinned in --pin-dir: a killed
service leaves them working and the next start adopts them (its programs
swapped into the same links). SIGTERM stops for good and removes them.

Upgrades: SIGUSR2 (or `proxy-redirect upgrade`) starts the binary now on
disk with the same arguments and --take-over. The new process reads the
file again, takes the listening sockets (accept queues included), the UDP
flows and every pinned datapath, and serves; this one stops accepting,
drains the connections it relays (at most --drain-timeout) and exits. No
connection is refused or sent around the proxy meanwhile, and settings a
reload refuses (proxy port, mark, ...) apply this way.")]
pub struct RunArgs {
    /// The TOML configuration file; it, every symlink to it and every
    /// directory above them must be writable by root only
    #[arg(short, long, value_name = "FILE")]
    pub config: std::path::PathBuf,
    /// Warn instead of refusing when a user other than root could change
    /// the configuration file
    #[arg(long)]
    pub allow_writable_config: bool,
    /// The bpffs directory where the service pins what must outlive a
    /// crash or move to an upgrade (every datapath's links and kernel
    /// state); a clean stop removes it
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_ROOT)]
    pub pin_dir: std::path::PathBuf,
    /// Take the place of the service that runs, if one does: its sockets,
    /// flows and pinned datapaths, while it drains (an upgrade; SIGUSR2
    /// starts the new binary with this)
    #[arg(long)]
    pub take_over: bool,
    /// After handing over, how long to go on relaying the connections
    /// already open before resetting them (SIGTERM waits for it; SIGINT
    /// resets them at once)
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub drain_timeout: u64,
    /// After handing over and draining, wait for SIGTERM instead of
    /// exiting (for a supervisor that restarts a process that exits, such
    /// as the kubelet)
    #[arg(long)]
    pub stay_after_hand_over: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A config file, read again on every reload; `--metrics` on the command
/// line wins over `[metrics]`.
struct ConfigFile<'a>(&'a RunArgs);

impl Source<Settings> for ConfigFile<'_> {
    fn load(&self) -> Result<(Vec<Settings>, Option<std::net::SocketAddr>)> {
        let path = &self.0.config;
        if let Some(why) = trusted_file::writable_by_others(path)? {
            match self.0.allow_writable_config {
                true => err_out!("warning: {}: {why}", path.display()),
                false => bail!(
                    "refusing {}: {why} (fix the owner and mode, or pass \
                     --allow-writable-config)",
                    path.display()
                ),
            }
        }
        let config = config::load(path)?;
        Ok((config.datapaths, self.0.output.metrics.or(config.metrics)))
    }
}

/// `proxy-redirect run --config FILE`.
pub fn run(args: &RunArgs) -> Result<()> {
    run_service(&ConfigFile(args), args)
}

/// Runs one subcommand's datapath until SIGINT/SIGTERM/SIGHUP.
pub fn run_one<S: DatapathSettings>(settings: S, output: &OutputArgs) -> Result<()> {
    settings.check()?;
    let ctx = RunContext::new(output.event_format());
    let mut metrics = Metrics::bind(output.metrics, &ctx.inheritance)?;
    shutdown::install()?;
    let mut datapaths = vec![settings.prepare(&ctx)?];
    for datapath in &mut datapaths {
        datapath.datapath_mut().attach(&ctx)?;
    }
    run_loop::<S>(&ctx, &mut datapaths, &mut metrics, None)?;
    finish(&ctx, datapaths, None)
}

/// What only a service has: its file, status page and successors.
struct ServiceLoop<'a, S> {
    source: &'a dyn Source<S>,
    status: &'a status::Server,
    handover: &'a mut handover::Service,
    predecessor: Option<handover::Predecessor>,
}

/// `run --config`: every datapath of the file, reloaded on SIGHUP, handed
/// over to a successor on SIGUSR2.
fn run_service(source: &dyn Source<Settings>, args: &RunArgs) -> Result<()> {
    let (settings, metrics_addr) = source.load()?;
    for each in &settings {
        each.check().with_context(|| format!("[{}]", each.name()))?;
    }
    let mut ctx = RunContext::new(args.output.event_format());
    let predecessor = match args.take_over {
        true => handover::Predecessor::find(&mut ctx)?,
        false => None,
    };
    let taking_over = predecessor.is_some();
    let mut status = match taking_over {
        true => status::Server::bind_beside()?,
        false => status::Server::bind()?,
    };
    let mut handover = handover::Service::listen(taking_over)?;
    let mut metrics = Metrics::bind(metrics_addr, &ctx.inheritance)?;
    ctx.pins = match PinRoot::create(&args.pin_dir) {
        Ok(root) => Some(root),
        Err(err) => {
            err_out!("warning: {err:#}");
            None
        }
    };
    shutdown::install()?;
    shutdown::reload_on_hangup();
    shutdown::upgrade_on_usr2()?;
    let mut datapaths = Vec::new();
    // Until it serves, a process that takes over owns no pin: if it fails,
    // they stay with the service it was taking over from.
    // Made only when taking over: a value made and dropped at once would
    // keep the pins of a plain start too.
    let not_yet_ours = match taking_over {
        true => Some(NotYetOurs),
        false => None,
    };
    for each in &settings {
        datapaths.push(each.prepare(&ctx)?);
    }
    if let Some(predecessor) = &predecessor {
        predecessor.commit(&ctx)?;
    }
    for datapath in &mut datapaths {
        let datapath = datapath.datapath_mut();
        if taking_over && std::env::var(FAIL_TAKE_OVER).is_ok_and(|name| name == datapath.name()) {
            bail!(
                "failing the take-over at {} on purpose ({FAIL_TAKE_OVER})",
                datapath.name()
            );
        }
        datapath.attach(&ctx)?;
    }
    // What this configuration does not use (a port that changed) closes.
    ctx.inheritance = Default::default();
    let names: Vec<String> = settings.iter().map(|s| s.name()).collect();
    if let Some(predecessor) = &predecessor {
        predecessor.serving(&names)?;
        status.take_place()?;
        handover.take_place()?;
    }
    std::mem::forget(not_yet_ours);
    if let Some(root) = &ctx.pins {
        for removed in root.remove_others(&names) {
            out!("Removed the pinned {removed}, which the configuration no longer has");
        }
    }
    out!(
        "Service running {} datapath(s); SIGHUP reloads the configuration, SIGUSR2 upgrades",
        datapaths.len()
    );
    notify::notify("READY=1");
    let service = ServiceLoop {
        source,
        status: &status,
        handover: &mut handover,
        predecessor,
    };
    let Some(handed_over) = run_loop(&ctx, &mut datapaths, &mut metrics, Some(service))? else {
        return finish(&ctx, datapaths, None);
    };
    // The successor serves the metrics and status pages from now on.
    metrics.close();
    drop(status);
    handed_over.retire(&mut datapaths);
    let timeout = Duration::from_secs(args.drain_timeout);
    // SIGTERM (systemd's stop, the kubelet's) lets the drain finish; SIGINT
    // cuts it short.
    handed_over.drain(&mut datapaths, timeout, shutdown::interrupted);
    if args.stay_after_hand_over && !shutdown::requested() {
        out!("Waiting for SIGTERM (--stay-after-hand-over)");
        while !shutdown::requested() {
            std::thread::sleep(TICK);
        }
    }
    finish(&ctx, datapaths, Some(handed_over.pid))
}

/// Fault injection for the tests: a process taking over fails at the
/// attach of the datapath this variable names, after the predecessor let
/// go of its sockets (the path a real failure there takes).
const FAIL_TAKE_OVER: &str = "PROXY_REDIRECT_TEST_FAIL_TAKE_OVER";

/// Dropped before the process serves (an error): the pins are left to the
/// service it was taking over from.
struct NotYetOurs;

impl Drop for NotYetOurs {
    fn drop(&mut self) {
        pins::keep_for_next_start();
    }
}

/// Prints the statistics and detaches; `successor`: the pid of the
/// process this one handed over to, which keeps everything pinned.
fn finish<R: RunningDatapath>(
    ctx: &RunContext,
    mut running: Vec<R>,
    successor: Option<u32>,
) -> Result<()> {
    if successor.is_none() {
        for each in &mut running {
            each.datapath_mut().stop();
        }
    }
    let datapaths: Vec<&dyn Datapath> = running.iter().map(R::datapath).collect();
    for datapath in &datapaths {
        if datapaths.len() > 1 {
            out!("##### {} #####", datapath.name());
        }
        datapath.print_statistics()?;
    }
    if ctx.format == EventFormat::Json {
        // The same counters as one JSON line, for programs.
        let mut snapshots = Vec::new();
        for datapath in &datapaths {
            snapshots.extend(datapath.snapshots()?);
        }
        let statistics: Vec<_> = snapshots.iter().map(Snapshot::to_json).collect();
        out!("{}", serde_json::json!({ "statistics": statistics }));
    }
    drop(datapaths);
    if successor.is_some() {
        pins::keep_for_next_start();
    }
    // Detached in reverse order of attachment.
    while let Some(each) = running.pop() {
        drop(each);
    }
    match (&ctx.pins, successor) {
        (Some(root), Some(pid)) => out!(
            "Handed over: the datapaths pinned in {} stay with pid {pid}",
            root.path().display()
        ),
        (None, Some(pid)) => out!("Handed over to pid {pid}"),
        (Some(root), None) => root.remove_if_empty(),
        (None, None) => {}
    }
    out!("Cleaned up");
    Ok(())
}

const TICK: Duration = Duration::from_millis(100);
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Serves until a stop (None) or, for a service, until a successor serves
/// in its place.
fn run_loop<S: DatapathSettings>(
    ctx: &RunContext,
    datapaths: &mut Vec<S::Running>,
    metrics: &mut Metrics,
    mut service: Option<ServiceLoop<'_, S>>,
) -> Result<Option<handover::HandedOver>> {
    let mut headers_printed = false;
    loop {
        let mut maps = Vec::new();
        let mut handles = Vec::new();
        for datapath in datapaths.iter() {
            if ctx.format == EventFormat::Off {
                break;
            }
            if let Some(source) = datapath.datapath().events(ctx)? {
                if ctx.format == EventFormat::Text && !headers_printed {
                    out!("{}", source.header);
                }
                maps.push(source.map);
                handles.push(source.handle);
            }
        }
        headers_printed = true;
        let ring = match maps.is_empty() {
            true => None,
            false => {
                let mut builder = RingBufferBuilder::new();
                for (map, mut handle) in maps.iter().zip(handles) {
                    builder.add(map, move |bytes: &[u8]| {
                        handle(bytes);
                        0
                    })?;
                }
                Some(builder.build()?)
            }
        };
        let mut last_publish: Option<Instant> = None;
        let build_info = build_info(datapaths);
        loop {
            match &ring {
                Some(ring) => {
                    if let Err(err) = ring.poll(TICK) {
                        // The signal that asks us to stop interrupts the poll.
                        if err.kind() != libbpf_rs::ErrorKind::Interrupted {
                            return Err(err.into());
                        }
                    }
                    // The programs wake the poll only when the rings fill
                    // (submit_event): whatever else came is read here.
                    ring.consume()?;
                }
                None => std::thread::sleep(TICK),
            }
            for datapath in datapaths.iter_mut() {
                datapath.datapath_mut().tick(ctx);
            }
            if let Some(service) = &mut service {
                if shutdown::take_upgrade_request() {
                    service.handover.spawn_successor();
                }
                if let Some(handed_over) = service.handover.poll(datapaths, metrics) {
                    if let Some(ring) = &ring {
                        ring.consume()?;
                    }
                    return Ok(Some(handed_over));
                }
                if let Some(predecessor) = &mut service.predecessor {
                    if let Some(drained) = predecessor.poll_drained() {
                        record_predecessor(drained);
                        service.predecessor = None;
                    }
                }
            }
            if last_publish.is_none_or(|at| at.elapsed() >= PUBLISH_INTERVAL) {
                last_publish = Some(Instant::now());
                let pins = ctx.pins.as_ref().map(PinRoot::path);
                let status = service.as_ref().map(|s| (s.status, s.handover.status()));
                publish(datapaths, metrics, &build_info, status, pins);
            }
            if shutdown::requested() {
                if let Some(ring) = &ring {
                    ring.consume()?;
                }
                return Ok(None);
            }
            if service.is_some() && shutdown::take_reload_request() {
                break;
            }
        }
        if let Some(ring) = &ring {
            ring.consume()?;
        }
        drop(ring);
        if let Some(service) = &service {
            reload::reload(ctx, datapaths, service.source, metrics);
        }
    }
}

/// What the predecessor of this process said of its drain, for the
/// service's counters.
static PREDECESSOR_DRAINED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PREDECESSOR_CUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn record_predecessor((drained, cut): (u64, u64)) {
    use std::sync::atomic::Ordering;
    PREDECESSOR_DRAINED.fetch_add(drained, Ordering::Relaxed);
    PREDECESSOR_CUT.fetch_add(cut, Ordering::Relaxed);
}

/// The labels of the build-info gauge: how each datapath is attached.
fn build_info<R: RunningDatapath>(datapaths: &[R]) -> Vec<(&'static str, String)> {
    let mut modes: Vec<String> = datapaths
        .iter()
        .map(|d| d.datapath().attach_mode())
        .collect();
    modes.sort();
    modes.dedup();
    vec![("attach", modes.join(", "))]
}

fn publish<R: RunningDatapath>(
    datapaths: &[R],
    metrics: &Metrics,
    build_info: &[(&'static str, String)],
    status: Option<(&status::Server, serde_json::Value)>,
    pins: Option<&Path>,
) {
    // Reading the maps is for readers: nobody scrapes a subcommand that
    // was started without --metrics.
    if !metrics.is_serving() && status.is_none() {
        return;
    }
    let mut snapshots = Vec::new();
    let datapaths: Vec<&dyn Datapath> = datapaths.iter().map(R::datapath).collect();
    for datapath in &datapaths {
        match datapath.snapshots() {
            Ok(mut more) => snapshots.append(&mut more),
            Err(err) => tracing::warn!("reading the statistics of {}: {err:#}", datapath.name()),
        }
    }
    snapshots.push(service_snapshot());
    metrics.publish(&snapshots, build_info);
    if let Some((status, upgrade)) = status {
        status.publish(status_page(&datapaths, &snapshots, pins, upgrade));
    }
}

/// The service's own counters.
fn service_snapshot() -> Snapshot {
    use std::sync::atomic::Ordering;
    let mut snapshot = Snapshot::new("service");
    snapshot.push(Metric::counter(
        "output_lines_dropped",
        "output lines dropped",
        "Event and message lines dropped because stdout or stderr could not take them",
        output::dropped_lines(),
    ));
    snapshot.push(Metric::counter(
        "predecessor_connections_drained",
        "connections the predecessor drained",
        "Connections the process this one took over from relayed to their end after the hand-over",
        PREDECESSOR_DRAINED.load(Ordering::Relaxed),
    ));
    snapshot.push(Metric::counter(
        "predecessor_connections_cut",
        "connections the predecessor cut",
        "Connections the process this one took over from still relayed at its drain deadline, reset",
        PREDECESSOR_CUT.load(Ordering::Relaxed),
    ));
    snapshot
}

fn status_page(
    datapaths: &[&dyn Datapath],
    snapshots: &[Snapshot],
    pins: Option<&Path>,
    upgrade: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "pid": std::process::id(),
        "pin_dir": pins.map(|p| p.display().to_string()),
        "upgrade": upgrade,
        "version": env!("CARGO_PKG_VERSION"),
        "datapaths": datapaths.iter().map(|d| d.status()).collect::<Vec<_>>(),
        "statistics": snapshots.iter().map(Snapshot::to_json).collect::<Vec<_>>(),
    })
}
