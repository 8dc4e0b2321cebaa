//! One lifecycle for every datapath. A datapath is prepared (everything
//! checked and loaded, nothing attached), attached, then watched by one run
//! loop: one shutdown signal, one event stream, one statistics printer, one
//! metrics page and one status page for any set of datapaths. The
//! subcommands run one datapath through it; `run --config` runs several and
//! reloads them on SIGHUP.

use std::cell::OnceCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use libbpf_rs::{MapHandle, RingBufferBuilder};

use crate::cli::{EventFormat, OutputArgs};
use crate::metrics::Metrics;
use crate::stats::Snapshot;
use crate::{events, shutdown, status};

/// What every datapath shares while it runs.
pub struct RunContext {
    pub format: EventFormat,
    /// events::monotonic_ns() at start, the zero of event times.
    pub start_ns: u64,
    proxy_runtime: OnceCell<Arc<tokio::runtime::Runtime>>,
}

impl RunContext {
    pub fn new(format: EventFormat) -> RunContext {
        RunContext {
            format,
            start_ns: events::monotonic_ns(),
            proxy_runtime: OnceCell::new(),
        }
    }

    /// The one runtime of the built-in proxies (TCP and UDP) of every
    /// datapath, started by the first that needs it.
    pub fn proxy_runtime(&self) -> Result<Arc<tokio::runtime::Runtime>> {
        if let Some(runtime) = self.proxy_runtime.get() {
            return Ok(runtime.clone());
        }
        crate::rlimit::raise_open_file_limit();
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
    /// Whether `reload` can apply these settings (of the same datapath,
    /// already through `Settings::check`); changes nothing.
    fn check_reload(&self, settings: &Settings) -> Result<()>;
    /// Applies settings that passed `check_reload` in place: map updates,
    /// attaching to a new cgroup before leaving the old.
    fn reload(&mut self, settings: &Settings, ctx: &RunContext) -> Result<()>;
    /// Stops new work before the final statistics are read.
    fn stop(&mut self) {}
    fn print_statistics(&self) -> Result<()>;
}

/// The settings of one datapath, from the command line or a config section.
#[derive(Debug, Clone)]
pub enum Settings {
    Redirect(crate::redirect::RedirectArgs),
    Bypass(crate::bypass::BypassArgs),
    PortNat(crate::port_nat::PortNatArgs),
    Tproxy(crate::tproxy::TproxyArgs),
    /// The built-in proxy alone (the `proxy` subcommand; not in config files).
    Proxy(crate::proxy::ProxyArgs),
}

impl Settings {
    /// The name of the datapath these settings make; a reload matches old
    /// and new datapaths by it.
    pub fn name(&self) -> String {
        match self {
            Settings::Redirect(_) => "redirect".into(),
            Settings::Bypass(_) => "bypass".into(),
            Settings::PortNat(args) => format!("port-nat {}", args.interface),
            Settings::Tproxy(_) => "tproxy".into(),
            Settings::Proxy(_) => "proxy".into(),
        }
    }

    /// Checks everything that can be checked without changing the system
    /// (users, cgroups, interfaces, privileges).
    pub fn check(&self) -> Result<()> {
        match self {
            Settings::Redirect(args) => crate::redirect::check(args),
            Settings::Bypass(args) => crate::bypass::check(args),
            Settings::PortNat(args) => crate::port_nat::check(args),
            Settings::Tproxy(args) => crate::tproxy::check(args),
            Settings::Proxy(args) => crate::proxy::check(args),
        }
    }

    /// Loads the programs and binds the sockets; nothing is attached yet.
    pub fn prepare(&self, ctx: &RunContext) -> Result<Box<dyn Datapath>> {
        Ok(match self {
            Settings::Redirect(args) => Box::new(crate::redirect::Redirect::prepare(args, ctx)?),
            Settings::Bypass(args) => Box::new(crate::bypass::Bypass::prepare(args, ctx)?),
            Settings::PortNat(args) => Box::new(crate::port_nat::PortNat::prepare(args, ctx)?),
            Settings::Tproxy(args) => Box::new(crate::tproxy::Tproxy::prepare(args, ctx)?),
            Settings::Proxy(args) => Box::new(crate::proxy::Proxy::prepare(args)?),
        })
    }
}

/// Where a service's settings come from, and how to read them again.
pub trait Source {
    fn load(&self) -> Result<(Vec<Settings>, Option<std::net::SocketAddr>)>;
}

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
`proxy-redirect status` shows what runs.")]
pub struct RunArgs {
    /// The TOML configuration file
    #[arg(short, long, value_name = "FILE")]
    pub config: std::path::PathBuf,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A config file, read again on every reload; `--metrics` on the command
/// line wins over `[metrics]`.
struct ConfigFile<'a>(&'a RunArgs);

impl Source for ConfigFile<'_> {
    fn load(&self) -> Result<(Vec<Settings>, Option<std::net::SocketAddr>)> {
        let config = crate::config::load(&self.0.config)?;
        let mut settings = Vec::new();
        settings.extend(config.redirect.map(Settings::Redirect));
        settings.extend(config.bypass.map(Settings::Bypass));
        settings.extend(config.port_nat.into_iter().map(Settings::PortNat));
        settings.extend(config.tproxy.map(Settings::Tproxy));
        Ok((settings, self.0.output.metrics.or(config.metrics)))
    }
}

/// `proxy-redirect run --config FILE`.
pub fn run(args: &RunArgs) -> Result<()> {
    run_service(&ConfigFile(args), &args.output)
}

/// Runs one subcommand's datapath until SIGINT/SIGTERM/SIGHUP.
pub fn run_one(settings: Settings, output: &OutputArgs) -> Result<()> {
    settings.check()?;
    let ctx = RunContext::new(output.event_format());
    let metrics = Metrics::bind(output.metrics)?;
    shutdown::install()?;
    let mut datapaths = vec![settings.prepare(&ctx)?];
    for datapath in &mut datapaths {
        datapath.attach(&ctx)?;
    }
    run_loop(&ctx, &mut datapaths, metrics, None, None)?;
    finish(&ctx, datapaths)
}

/// `run --config`: every datapath of the file, reloaded on SIGHUP.
fn run_service(source: &dyn Source, output: &OutputArgs) -> Result<()> {
    let (settings, metrics_addr) = source.load()?;
    for each in &settings {
        each.check().with_context(|| format!("[{}]", each.name()))?;
    }
    let ctx = RunContext::new(output.event_format());
    let metrics = Metrics::bind(metrics_addr)?;
    let status = status::Server::bind()?;
    shutdown::install()?;
    shutdown::reload_on_hangup();
    let mut datapaths = Vec::new();
    for each in &settings {
        datapaths.push(each.prepare(&ctx)?);
    }
    for datapath in &mut datapaths {
        datapath.attach(&ctx)?;
    }
    println!(
        "Service running {} datapath(s); SIGHUP reloads the configuration",
        datapaths.len()
    );
    run_loop(&ctx, &mut datapaths, metrics, Some(source), Some(&status))?;
    finish(&ctx, datapaths)
}

fn finish(ctx: &RunContext, mut datapaths: Vec<Box<dyn Datapath>>) -> Result<()> {
    for datapath in &mut datapaths {
        datapath.stop();
    }
    for datapath in &datapaths {
        if datapaths.len() > 1 {
            println!("##### {} #####", datapath.name());
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
        println!("{}", serde_json::json!({ "statistics": statistics }));
    }
    // Detached in reverse order of attachment.
    while let Some(datapath) = datapaths.pop() {
        drop(datapath);
    }
    println!("Cleaned up");
    Ok(())
}

const TICK: Duration = Duration::from_millis(100);
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

fn run_loop(
    ctx: &RunContext,
    datapaths: &mut Vec<Box<dyn Datapath>>,
    mut metrics: Metrics,
    source: Option<&dyn Source>,
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
            if let Some(source) = datapath.events(ctx)? {
                if ctx.format == EventFormat::Text && !headers_printed {
                    println!("{}", source.header);
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
                datapath.tick(ctx);
            }
            if last_publish.is_none_or(|at| at.elapsed() >= PUBLISH_INTERVAL) {
                last_publish = Some(Instant::now());
                publish(datapaths, &metrics, &build_info, status);
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
            reload(ctx, datapaths, source, &mut metrics);
        }
    }
}

/// The labels of the build-info gauge: how each datapath is attached.
fn build_info(datapaths: &[Box<dyn Datapath>]) -> Vec<(&'static str, String)> {
    let mut modes: Vec<String> = datapaths.iter().map(|d| d.attach_mode()).collect();
    modes.sort();
    modes.dedup();
    vec![("attach", modes.join(", "))]
}

fn publish(
    datapaths: &[Box<dyn Datapath>],
    metrics: &Metrics,
    build_info: &[(&'static str, String)],
    status: Option<&status::Server>,
) {
    // Reading the maps is for readers: nobody scrapes a subcommand that
    // was started without --metrics.
    if !metrics.is_serving() && status.is_none() {
        return;
    }
    let mut snapshots = Vec::new();
    for datapath in datapaths {
        match datapath.snapshots() {
            Ok(mut more) => snapshots.append(&mut more),
            Err(err) => tracing::warn!("reading the statistics of {}: {err:#}", datapath.name()),
        }
    }
    metrics.publish(&snapshots, build_info);
    if let Some(status) = status {
        status.publish(status_page(datapaths, &snapshots));
    }
}

fn status_page(datapaths: &[Box<dyn Datapath>], snapshots: &[Snapshot]) -> serde_json::Value {
    serde_json::json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "datapaths": datapaths.iter().map(|d| d.status()).collect::<Vec<_>>(),
        "statistics": snapshots.iter().map(Snapshot::to_json).collect::<Vec<_>>(),
    })
}

/// SIGHUP: the new file is read and checked whole, and every change is
/// checked and every new datapath prepared before anything changes; if
/// anything is wrong, one line says what and the running configuration
/// stays.
fn reload(
    ctx: &RunContext,
    datapaths: &mut Vec<Box<dyn Datapath>>,
    source: &dyn Source,
    metrics: &mut Metrics,
) {
    let (settings, added, new_metrics) = match prepare_reload(ctx, datapaths, source, metrics) {
        Ok(prepared) => prepared,
        Err(err) => {
            eprintln!("reload refused, the running configuration stays: {err:#}");
            return;
        }
    };
    // New datapaths and changes first, so that nothing is left without a
    // datapath in between; then the ones the file no longer names.
    for mut datapath in added {
        let name = datapath.name();
        match datapath.attach(ctx) {
            Ok(()) => {
                println!("Reloaded {name}");
                datapaths.push(datapath);
            }
            Err(err) => eprintln!("reload could not attach {name}: {err:#}"),
        }
    }
    for each in &settings {
        let name = each.name();
        if let Some(running) = datapaths.iter_mut().find(|d| d.name() == name) {
            match running.reload(each, ctx) {
                Ok(()) => println!("Reloaded {name}"),
                Err(err) => eprintln!("reload of {name} failed: {err:#}"),
            }
        }
    }
    let names: Vec<String> = settings.iter().map(Settings::name).collect();
    datapaths.retain_mut(|datapath| {
        let keep = names.contains(&datapath.name());
        if !keep {
            datapath.stop();
            println!("Stopped {}", datapath.name());
        }
        keep
    });
    if let Some(new_metrics) = new_metrics {
        *metrics = new_metrics;
    }
}

type PreparedReload = (Vec<Settings>, Vec<Box<dyn Datapath>>, Option<Metrics>);

/// Everything a reload can check or prepare without changing what runs.
fn prepare_reload(
    ctx: &RunContext,
    datapaths: &[Box<dyn Datapath>],
    source: &dyn Source,
    metrics: &Metrics,
) -> Result<PreparedReload> {
    let (settings, metrics_addr) = source.load()?;
    let mut added = Vec::new();
    for each in &settings {
        let section = || format!("[{}]", each.name());
        each.check().with_context(section)?;
        match datapaths.iter().find(|d| d.name() == each.name()) {
            Some(running) => running.check_reload(each).with_context(section)?,
            None => added.push(each.prepare(ctx).with_context(section)?),
        }
    }
    let new_metrics = match metrics.addr() == metrics_addr {
        true => None,
        false => Some(Metrics::bind(metrics_addr).context("[metrics]")?),
    };
    Ok((settings, added, new_metrics))
}
