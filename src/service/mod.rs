//! One lifecycle for every datapath. A datapath is prepared (everything
//! checked and loaded, nothing attached), attached, then watched by one run
//! loop: one shutdown signal, one event stream, one statistics printer, one
//! metrics page and one status page for any set of datapaths. The
//! subcommands run one datapath through it; `run --config` runs several and
//! reloads them on SIGHUP.

pub mod cleanup;
pub mod config;
pub mod reload;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use libbpf_rs::RingBufferBuilder;

use crate::cli::{EventFormat, OutputArgs};
use crate::datapath::Settings;
use crate::runtime::{Datapath, DatapathSettings, RunContext, RunningDatapath};
use crate::sys::pins::{self, PinRoot};
use crate::sys::{shutdown, trusted_file};
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

port-nat's links and flows and redirect's links are pinned in --pin-dir: a
killed service leaves them working and the next start adopts them (its
programs swapped into the same links). SIGTERM stops for good and removes
them; SIGUSR2 stops and leaves them to the next start, exiting with status
75, which the systemd unit restarts at once: the way to upgrade the binary
or change a setting a reload refuses while port-nat goes on translating.")]
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
    /// crash (port-nat's flows and links); a clean stop removes it
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_PIN_ROOT)]
    pub pin_dir: std::path::PathBuf,
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
pub fn run(args: &RunArgs) -> Result<Ending> {
    run_service(&ConfigFile(args), &args.output, &args.pin_dir)?;
    Ok(match shutdown::handover_requested() {
        true => Ending::HandedOver,
        false => Ending::Stopped,
    })
}

/// Runs one subcommand's datapath until SIGINT/SIGTERM/SIGHUP.
pub fn run_one<S: DatapathSettings>(settings: S, output: &OutputArgs) -> Result<()> {
    settings.check()?;
    let ctx = RunContext::new(output.event_format());
    let metrics = Metrics::bind(output.metrics)?;
    shutdown::install()?;
    let mut datapaths = vec![settings.prepare(&ctx)?];
    for datapath in &mut datapaths {
        datapath.datapath_mut().attach(&ctx)?;
    }
    run_loop::<S>(&ctx, &mut datapaths, metrics, None, None)?;
    finish(&ctx, datapaths)
}

/// `run --config`: every datapath of the file, reloaded on SIGHUP.
fn run_service<S: DatapathSettings>(
    source: &dyn Source<S>,
    output: &OutputArgs,
    pin_dir: &Path,
) -> Result<()> {
    let (settings, metrics_addr) = source.load()?;
    for each in &settings {
        each.check().with_context(|| format!("[{}]", each.name()))?;
    }
    let mut ctx = RunContext::new(output.event_format());
    let metrics = Metrics::bind(metrics_addr)?;
    let status = status::Server::bind()?;
    ctx.pins = match PinRoot::create(pin_dir) {
        Ok(root) => Some(root),
        Err(err) => {
            err_out!("warning: {err:#}");
            None
        }
    };
    shutdown::install()?;
    shutdown::reload_on_hangup();
    shutdown::hand_over_on_usr2()?;
    let mut datapaths = Vec::new();
    for each in &settings {
        datapaths.push(each.prepare(&ctx)?);
    }
    for datapath in &mut datapaths {
        datapath.datapath_mut().attach(&ctx)?;
    }
    if let Some(root) = &ctx.pins {
        let names: Vec<String> = settings.iter().map(|s| s.name()).collect();
        for removed in root.remove_others(&names) {
            out!("Removed the pinned {removed}, which the configuration no longer has");
        }
    }
    out!(
        "Service running {} datapath(s); SIGHUP reloads the configuration",
        datapaths.len()
    );
    run_loop(&ctx, &mut datapaths, metrics, Some(source), Some(&status))?;
    finish(&ctx, datapaths)
}

fn finish<R: RunningDatapath>(ctx: &RunContext, mut running: Vec<R>) -> Result<()> {
    for each in &mut running {
        each.datapath_mut().stop();
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
    let handing_over = shutdown::handover_requested();
    if handing_over {
        pins::keep_for_next_start();
    }
    // Detached in reverse order of attachment.
    while let Some(each) = running.pop() {
        drop(each);
    }
    match (&ctx.pins, handing_over) {
        (Some(root), true) => out!(
            "Handed over: the datapaths pinned in {} stay for the next start",
            root.path().display()
        ),
        (None, true) => {
            out!("Handed over, with nothing pinned (no bpffs): the next start begins anew")
        }
        (Some(root), false) => root.remove_if_empty(),
        (None, false) => {}
    }
    out!("Cleaned up");
    Ok(())
}

/// How a service ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Stopped,
    /// SIGUSR2: its pins stay for the next start.
    HandedOver,
}

impl Ending {
    /// EX_TEMPFAIL after a hand-over, so that a supervisor starts the
    /// binary on disk again (the unit's RestartForceExitStatus).
    pub fn exit_code(self) -> std::process::ExitCode {
        match self {
            Ending::Stopped => std::process::ExitCode::SUCCESS,
            Ending::HandedOver => std::process::ExitCode::from(HANDED_OVER_STATUS),
        }
    }
}

pub const HANDED_OVER_STATUS: u8 = 75;

const TICK: Duration = Duration::from_millis(100);
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

fn run_loop<S: DatapathSettings>(
    ctx: &RunContext,
    datapaths: &mut Vec<S::Running>,
    mut metrics: Metrics,
    source: Option<&dyn Source<S>>,
    status: Option<&status::Server>,
) -> Result<()> {
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
                }
                None => std::thread::sleep(TICK),
            }
            for datapath in datapaths.iter_mut() {
                datapath.datapath_mut().tick(ctx);
            }
            if last_publish.is_none_or(|at| at.elapsed() >= PUBLISH_INTERVAL) {
                last_publish = Some(Instant::now());
                let pins = ctx.pins.as_ref().map(PinRoot::path);
                publish(datapaths, &metrics, &build_info, status, pins);
            }
            if shutdown::requested() {
                if let Some(ring) = &ring {
                    ring.consume()?;
                }
                return Ok(());
            }
            if source.is_some() && shutdown::take_reload_request() {
                break;
            }
        }
        if let Some(ring) = &ring {
            ring.consume()?;
        }
        drop(ring);
        if let Some(source) = source {
            reload::reload(ctx, datapaths, source, &mut metrics);
        }
    }
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
    status: Option<&status::Server>,
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
    if let Some(status) = status {
        status.publish(status_page(&datapaths, &snapshots, pins));
    }
}

/// The service's own counters.
fn service_snapshot() -> Snapshot {
    let mut snapshot = Snapshot::new("service");
    snapshot.push(Metric::counter(
        "output_lines_dropped",
        "output lines dropped",
        "Event and message lines dropped because stdout or stderr could not take them",
        output::dropped_lines(),
    ));
    snapshot
}

fn status_page(
    datapaths: &[&dyn Datapath],
    snapshots: &[Snapshot],
    pins: Option<&Path>,
) -> serde_json::Value {
    serde_json::json!({
        "pid": std::process::id(),
        "pin_dir": pins.map(|p| p.display().to_string()),
        "version": env!("CARGO_PKG_VERSION"),
        "datapaths": datapaths.iter().map(|d| d.status()).collect::<Vec<_>>(),
        "statistics": snapshots.iter().map(Snapshot::to_json).collect::<Vec<_>>(),
    })
}
