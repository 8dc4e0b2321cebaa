//! `proxy-redirect tproxy`: a TC ingress program on an interface hands TCP
//! connections to chosen ports to a local transparent listener with
//! `bpf_sk_assign`, for traffic that does not start on this host (a gateway,
//! a router for containers or VMs). The built-in proxy learns each
//! connection's destination from its accepted socket's local address, as
//! behind iptables TPROXY.

use std::fs::{self, File, OpenOptions};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::MapCore;

use crate::bpf::maps;
use crate::bpf::tproxy::types::{tproxy_action, tproxy_event, tproxy_stat};
use crate::bpf::tproxy::{TproxySkel, TproxySkelBuilder};
use crate::bpf::Endpoint as _;
use crate::bpf::OwnedSkel;
use crate::cli::{self, EventFormat, OutputArgs, PortList};
use crate::out;
use crate::relay::tcp::{BoundProxy, ProxyConfig, RelayArgs, RunningProxy};
use crate::runtime::{Datapath, EventSource, Relay, RunContext};
use crate::sys::handover::{Bequest, Inheritance};
use crate::sys::interface_watch::{self, InterfaceWatch};
use crate::sys::links::{
    self, Attachments, TcAttachMode, TcDirection, TcOrder, TcPath, TcPosition,
};
use crate::sys::local_route::{self, LocalRouteSpec, LocalRoutes};
use crate::sys::pins::{self, Found, PinDir};
use crate::sys::privileges;
use crate::sys::run_dir::{self, RUN_DIR};
use crate::telemetry::stats::Snapshot;

// SAFETY: generated from include/tproxy.h: fixed-width integers with explicit padding.
unsafe impl plain::Plain for tproxy_event {}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
#[command(after_help = "\
Examples:
  # A gateway: intercept web traffic that clients send through eth1
  proxy-redirect tproxy -i eth1 -v
  # Containers behind a bridge, an external transparent proxy (Envoy, HAProxy)
  # listening with IP_TRANSPARENT on port 15001
  proxy-redirect tproxy -i br0 -P 80,443,8080 -p 15001 --no-proxy
  # squid in tproxy mode (it connects upstream from the client's address),
  # servers behind eth2
  proxy-redirect tproxy -i eth1 -P 80 -p 3129 --no-proxy --upstream-interface eth2

The proxy receives each connection with the client's address as the peer and
the original destination as its own local address (TPROXY semantics), and must
listen with IP_TRANSPARENT. Packets handed to it are marked with --route-mark
and delivered locally by a rule and a route the tool adds
(ip rule pref PRIO fwmark MARK iif IFACE lookup TABLE proto 82;
 ip route add local default dev lo table TABLE proto 82, IPv4 and IPv6);
they, and the TC program, are removed on exit, and what a killed run left is
removed by the next start. Connections forwarded before the start keep being
forwarded.")]
pub struct TproxyArgs {
    /// Interface whose incoming TCP traffic is intercepted
    #[arg(short, long, value_name = "IFACE")]
    pub interface: String,
    /// Server-facing interface on which replies to a proxy that connects
    /// upstream from the client's own address (squid's tproxy mode, HAProxy
    /// `usesrc clientip`) arrive; they are handed to the proxy's socket
    #[arg(long, value_name = "IFACE")]
    pub upstream_interface: Option<String>,
    /// Destination ports to intercept, comma-separated
    #[arg(short = 'P', long, value_name = "PORTS", default_value = "80,443",
          value_parser = cli::parse_port_list)]
    pub ports: PortList,
    /// Port of the transparent proxy
    #[arg(short = 'p', long, value_name = "PORT", default_value = "15002",
          value_parser = cli::parse_port)]
    pub proxy_port: u16,
    /// Address of the proxy's listener; give it twice for one IPv4 and one
    /// IPv6 address. A listener on the wildcard address is found as well
    /// [default: 127.0.0.1 and ::1]
    #[arg(long = "proxy-ip", value_name = "IP")]
    pub proxy_ips: Vec<IpAddr>,
    /// Mark (SO_MARK) of the built-in proxy's upstream connections
    #[arg(long, default_value = "0x5052", value_parser = cli::parse_mark)]
    pub mark: u32,
    /// Mark given to intercepted packets so that they are routed locally
    #[arg(long, default_value = "0x5054", value_parser = cli::parse_mark)]
    pub route_mark: u32,
    /// Routing table (dedicated to tproxy) holding the local default route
    #[arg(long, default_value = "5052")]
    pub route_table: u32,
    /// Priority of the ip rule that sends marked packets to the table
    #[arg(long, default_value = "5052")]
    pub rule_priority: u32,
    /// How to attach the TC program: tcx link (6.6+), legacy clsact qdisc,
    /// or auto (tcx when the kernel has it)
    #[arg(long, value_enum, default_value_t = TcAttachMode::Auto)]
    pub tc_attach: TcAttachMode,
    /// Where our programs go among the interface's other TC programs:
    /// auto puts them first, where iptables puts TPROXY (mangle
    /// PREROUTING, before filter)
    #[arg(long, value_enum, default_value_t = TcOrder::Auto)]
    pub tc_order: TcOrder,
    /// Do not run the built-in proxy; an external transparent proxy listens
    /// on the proxy address
    #[arg(long)]
    pub no_proxy: bool,
    #[command(flatten)]
    pub relay: RelayArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Everything resolved and checked before anything is changed.
struct Plan {
    ifindex: u32,
    has_l2_header: bool,
    /// ifindex and has_l2_header of --upstream-interface.
    upstream: Option<(u32, bool)>,
    proxy_v4: SocketAddr,
    proxy_v6: SocketAddr,
    routes: LocalRouteSpec,
}

fn plan(args: &TproxyArgs) -> Result<Plan> {
    let ifindex = nix::net::if_::if_nametoindex(args.interface.as_str())
        .map_err(|_| anyhow::anyhow!("no interface named '{}' (see ip link)", args.interface))?;
    let has_l2_header = crate::sys::links::link_has_l2_header(&args.interface, "tproxy")?;
    let upstream = match &args.upstream_interface {
        None => None,
        Some(name) if *name == args.interface => {
            bail!("--upstream-interface must differ from the intercepted interface {name}")
        }
        Some(name) => {
            let index = nix::net::if_::if_nametoindex(name.as_str())
                .map_err(|_| anyhow::anyhow!("no interface named '{name}' (see ip link)"))?;
            Some((
                index,
                crate::sys::links::link_has_l2_header(name, "tproxy")?,
            ))
        }
    };
    let (proxy_v4, proxy_v6) =
        cli::proxy_addresses(&args.proxy_ips, args.proxy_port, "--proxy-ip")?;
    if args.route_mark == args.mark {
        bail!(
            "--route-mark must differ from the upstream --mark ({:#x}): upstream connections \
             would be routed back to this host",
            args.mark
        );
    }
    let routes = LocalRouteSpec {
        mark: args.route_mark,
        table: args.route_table,
        priority: args.rule_priority,
        interfaces: std::iter::once(&args.interface)
            .chain(&args.upstream_interface)
            .cloned()
            .collect(),
    };
    routes.validate()?;
    Ok(Plan {
        ifindex,
        has_l2_header,
        upstream,
        proxy_v4,
        proxy_v6,
        routes,
    })
}

/// Held while running: one tproxy per routing table and network namespace.
/// An flock is released when its process dies, even by SIGKILL, so whatever
/// carries our table's tag while nobody holds the lock is a leftover.
struct InstanceLock {
    file: File,
    path: PathBuf,
    /// Whether it was handed over by a running service (the rules and
    /// routes are then that service's, to be kept as they are).
    inherited: bool,
}

impl InstanceLock {
    /// Takes the lock, or the one a predecessor handed over.
    fn take(table: u32, inheritance: &Inheritance) -> Result<Self> {
        let dir = Path::new(RUN_DIR);
        // Network namespaces are told apart by their nsfs inode.
        let netns = fs::metadata("/proc/self/ns/net")
            .context("reading this process's network namespace")?
            .ino();
        let path = dir.join(format!("tproxy-netns-{netns}-table-{table}.lock"));
        if let Some(fd) = inheritance.take(&InstanceLock::role(&path)) {
            return Ok(Self {
                file: File::from(fd),
                path,
                inherited: true,
            });
        }
        loop {
            run_dir::create()?;
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(file) => file,
                // The last run to stop removed the empty directory meanwhile.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("opening the tproxy instance lock {}", path.display())
                    })
                }
            };
            // SAFETY: flock on a descriptor owned by file.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::WouldBlock {
                    bail!(
                        "another tproxy runs in this network namespace with routing table {table}; \
                         stop it or give this one its own --route-table and --rule-priority"
                    );
                }
                bail!("taking the tproxy instance lock {}: {err}", path.display());
            }
            // A run that stopped between our open and our flock unlinked
            // the file we locked: lock the one now at the path instead.
            let locked = file.metadata()?.ino();
            if fs::symlink_metadata(&path).is_ok_and(|now| now.ino() == locked) {
                return Ok(Self {
                    file,
                    path,
                    inherited: false,
                });
            }
        }
    }

    fn role(path: &Path) -> String {
        format!("lock {}", path.display())
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // The successor holds the same lock (the same open file).
        if pins::kept_for_next_start() {
            return;
        }
        // Removed while still held, so nobody can lock the unlinked file;
        // the directory too when no other instance has a lock in it.
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_dir(RUN_DIR);
    }
}

/// Everything `prepare` would check, without changing the system.
pub fn check(args: &TproxyArgs) -> Result<()> {
    let plan = plan(args)?;
    privileges::require_bpf("tproxy")?;
    local_route::check_neighbours(&plan.routes)
}

/// The tproxy datapath: the TC program on the intercepted interface, the
/// local routes, and the built-in transparent proxy.
pub struct Tproxy {
    args: TproxyArgs,
    plan: Plan,
    skel: OwnedSkel<TproxySkel<'static>>,
    bound: Option<BoundProxy>,
    proxy: Option<RunningProxy>,
    watch: InterfaceWatch,
    /// The intercepted interface's attachment; None while it is gone.
    tc: Option<Attachments>,
    /// The upstream interface and sk_lookup.
    attachments: Attachments,
    path: Option<TcPath>,
    /// Under `run --config`: the links and counters, which a crash leaves
    /// working (with the rules and routes) and the next start adopts.
    pins: Option<PinDir>,
    // Dropped after the programs are detached (field order).
    routes: Option<LocalRoutes>,
    lock: InstanceLock,
}

impl Tproxy {
    pub fn prepare(args: &TproxyArgs, ctx: &RunContext) -> Result<Tproxy> {
        let plan = plan(args)?;
        privileges::require_bpf("tproxy")?;
        let lock = InstanceLock::take(args.route_table, &ctx.inheritance)?;
        let bound = if args.no_proxy {
            None
        } else {
            let config = ProxyConfig::new(args.mark, true, &args.relay);
            let addrs = [plan.proxy_v4, plan.proxy_v6];
            Some(BoundProxy::bind(&addrs, config, &ctx.inheritance)?)
        };
        let config = DatapathConfig {
            ports: args.ports.0.clone(),
            proxy_v4: plan.proxy_v4,
            proxy_v6: plan.proxy_v6,
            route_mark: args.route_mark,
            ifindex: plan.ifindex,
            has_l2_header: plan.has_l2_header,
            upstream_has_l2_header: plan.upstream.is_some_and(|(_, l2)| l2),
            events: ctx.format != EventFormat::Off,
        };
        let mut pins = ctx.pin_dir("tproxy", layout())?;
        let skel = OwnedSkel::load(|object| load(&config, pins.as_mut(), object))?;
        if let Some(pins) = &pins {
            pins.report("links, rules and routes", "counters");
        }
        if let Some(proxy) = &bound {
            maps::put_proxy_listeners(&skel.maps.proxy_listeners, &proxy.listener_fds())?;
        }
        // Watching before attaching: a deletion in between is not missed.
        // The rule follows the name by itself (iif), the route is on lo.
        let watch = InterfaceWatch::new(&args.interface, plan.ifindex)?;
        Ok(Tproxy {
            args: args.clone(),
            plan,
            skel,
            bound,
            proxy: None,
            watch,
            tc: None,
            attachments: Attachments::default(),
            path: None,
            pins,
            routes: None,
            lock,
        })
    }
}

/// What a reload may change while tproxy runs, applied in place.
impl Tproxy {
    pub fn check_reload(&self, new: &TproxyArgs) -> Result<()> {
        let mut unchanged_but_ports = new.clone();
        unchanged_but_ports.ports = self.args.ports.clone();
        if unchanged_but_ports != self.args {
            bail!(
                "only ports can change while tproxy runs; `proxy-redirect upgrade` applies \
                 anything else without a drop"
            );
        }
        Ok(())
    }

    pub fn reload(&mut self, new: &TproxyArgs, _ctx: &RunContext) -> Result<()> {
        self.check_reload(new)?;
        maps::sync_set(&self.skel.maps.tproxy_ports, &new.ports.0)?;
        self.args = new.clone();
        Ok(())
    }
}

impl Datapath for Tproxy {
    fn name(&self) -> String {
        "tproxy".into()
    }

    fn attach(&mut self, ctx: &RunContext) -> Result<()> {
        // Rules and routes before the program: a packet that carries a
        // socket but is not routed locally would be dropped by ip_forward().
        // A predecessor's, or a killed service's that this one adopts, stay
        // as they are; a killed subcommand's are removed and added again.
        let adopting = self.lock.inherited
            || self
                .pins
                .as_ref()
                .is_some_and(|pins| *pins.found() == Found::SameLayout);
        let (routes, removed) = match adopting {
            true => LocalRoutes::adopt(&self.plan.routes)?,
            false => {
                let removed = local_route::remove_leftovers(&self.plan.routes)?;
                (LocalRoutes::install(&self.plan.routes)?, removed)
            }
        };
        for removed in removed {
            out!("Removed a leftover of a killed run: {removed}");
        }
        self.routes = Some(routes);
        let pin = |name: &str| self.pins.as_ref().map(|pins| pins.link(name));
        let mut tc = Attachments::default();
        let path = tc.attach_tc(
            &self.skel.progs.tproxy_ingress,
            self.plan.ifindex,
            TcDirection::Ingress,
            self.args.tc_attach,
            self.args.tc_order.position(TcDirection::Ingress),
            pin(INGRESS_LINK).as_deref(),
        )?;
        self.tc = Some(tc);
        self.path = Some(path);
        let mut links = vec![INGRESS_LINK];
        if let Some((upstream_ifindex, _)) = self.plan.upstream {
            self.attachments.attach_tc(
                &self.skel.progs.tproxy_upstream_ingress,
                upstream_ifindex,
                TcDirection::Ingress,
                self.args.tc_attach,
                self.args.tc_order.position(TcDirection::Ingress),
                pin(UPSTREAM_LINK).as_deref(),
            )?;
            links.push(UPSTREAM_LINK);
        }
        if self.bound.is_some() {
            self.attachments.attach_netns(
                &self.skel.progs.tproxy_sk_lookup,
                pin(SK_LOOKUP_LINK).as_deref(),
            )?;
            links.push(SK_LOOKUP_LINK);
        }
        if let Some(pins) = &mut self.pins {
            pins.commit(&[("stats", &self.skel.maps.stats as &dyn MapCore)], &links)?;
            // For `cleanup`, which has no configuration to find them by.
            let routes = &self.plan.routes;
            let netns = crate::sys::netns::current_inode()?;
            let record = [routes.table.into(), routes.priority.into(), netns];
            pins.record(local_route::RECORD, &record)?;
            if path == TcPath::Clsact {
                let mut interfaces = vec![netns, self.plan.ifindex.into()];
                interfaces.extend(self.plan.upstream.map(|(index, _)| u64::from(index)));
                pins.record(links::CLSACT_RECORD, &interfaces)?;
            }
        }
        print_configuration(&self.args, &self.plan, &path.to_string());
        if let Some(proxy) = self.bound.take() {
            self.proxy = Some(proxy.start_on(ctx.proxy_runtime()?)?);
        }
        out!(
            "Attached tproxy_ingress to {} ingress ({path}); press Ctrl-C to stop",
            self.args.interface
        );
        Ok(())
    }

    fn attach_mode(&self) -> String {
        self.path.map_or("none".into(), |path| path.to_string())
    }

    fn events(&self, ctx: &RunContext) -> Result<Option<EventSource>> {
        let header = format!("{:>12} {:<10} CONNECTION", "TIME(s)", "ACTION");
        let (format, start_ns) = (ctx.format, ctx.start_ns);
        let proxy_addrs = [self.plan.proxy_v4, self.plan.proxy_v6];
        EventSource::new(&self.skel.maps.events, header, move |e: &tproxy_event| {
            print_event(e, format, start_ns, &proxy_addrs)
        })
        .map(Some)
    }

    fn tick(&mut self, ctx: &RunContext) {
        let (skel, args) = (&mut self.skel, &self.args);
        let pin = self.pins.as_ref().map(|pins| pins.link(INGRESS_LINK));
        interface_watch::follow(
            &mut self.watch,
            &mut self.tc,
            ctx.format,
            ctx.start_ns,
            |index| {
                let has_l2_header =
                    crate::sys::links::link_has_l2_header(&args.interface, "tproxy")?;
                let bss = skel
                    .maps
                    .bss_data
                    .as_deref_mut()
                    .context("the tproxy object has no .bss")?;
                bss.ifindex = index;
                bss.has_l2_header = has_l2_header.into();
                let mut attached = Attachments::default();
                let path = attached.attach_tc(
                    &skel.progs.tproxy_ingress,
                    index,
                    TcDirection::Ingress,
                    args.tc_attach,
                    args.tc_order.position(TcDirection::Ingress),
                    pin.as_deref(),
                )?;
                Ok((attached, path))
            },
        );
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut all = vec![snapshot(&self.skel.maps.stats, &self.args.interface)?];
        all.extend(self.proxy.as_ref().map(|proxy| proxy.stats.snapshot()));
        Ok(all)
    }

    fn status(&self) -> serde_json::Value {
        let mut programs = self
            .tc
            .as_ref()
            .map(Attachments::describe)
            .unwrap_or_default();
        programs.extend(self.attachments.describe());
        serde_json::json!({
            "name": self.name(),
            "interface": self.args.interface,
            "upstream_interface": self.args.upstream_interface,
            "ports": self.args.ports.to_string(),
            "proxy": if self.args.no_proxy { "external" } else { "built-in" },
            "tc_order": format!("{:?}", self.args.tc_order.position(TcDirection::Ingress)).to_lowercase(),
            "proxy_addresses": [self.plan.proxy_v4.to_string(), self.plan.proxy_v6.to_string()],
            "programs": programs,
        })
    }

    fn stop(&mut self) {
        if let Some(proxy) = &mut self.proxy {
            proxy.stop(crate::relay::tcp::STOP_GRACE);
        }
    }

    fn relays(&mut self) -> Vec<&mut dyn Relay> {
        self.proxy
            .iter_mut()
            .map(|proxy| proxy as &mut dyn Relay)
            .collect()
    }

    fn detach(&mut self) {
        self.tc = None;
        self.attachments = Attachments::default();
        self.routes = None;
    }

    fn reclaim(&mut self) -> Result<()> {
        if let Some(tc) = &mut self.tc {
            tc.reclaim()?;
        }
        self.attachments.reclaim()
    }

    fn bequeath(&self, bequest: &mut Bequest) -> Result<()> {
        let lock = &self.lock;
        bequest.give(
            InstanceLock::role(&lock.path),
            serde_json::Value::Null,
            lock.file.as_fd(),
        )
    }

    fn print_statistics(&self) -> Result<()> {
        print_statistics(&self.skel, &self.args.interface)?;
        if let Some(proxy) = &self.proxy {
            proxy.stats.print();
        }
        Ok(())
    }
}

/// What the BPF programs are loaded with.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub ports: Vec<u16>,
    pub proxy_v4: SocketAddr,
    pub proxy_v6: SocketAddr,
    pub route_mark: u32,
    /// The interface tproxy_ingress runs on (sk_lookup acts only for it).
    pub ifindex: u32,
    /// false on L3 devices (tun, WireGuard), whose packets start with IP.
    pub has_l2_header: bool,
    /// has_l2_header of the upstream interface (tproxy_upstream_ingress).
    pub upstream_has_l2_header: bool,
    pub events: bool,
}

/// Opens and loads the tproxy programs and fills the port map.
/// The pin names of tproxy's links.
const INGRESS_LINK: &str = "ingress";
const UPSTREAM_LINK: &str = "upstream-ingress";
const SK_LOOKUP_LINK: &str = "sk_lookup";

/// The hash of the headers that define tproxy's maps.
fn layout() -> u64 {
    pins::layout_hash(&[
        include_str!("../../include/tproxy.h"),
        include_str!("../../include/addr.h"),
    ])
}

/// Opens, configures and loads the tproxy programs; with `pins`, the
/// counters an earlier run pinned go on.
pub fn load<'obj>(
    config: &DatapathConfig,
    pins: Option<&mut PinDir>,
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
) -> Result<TproxySkel<'obj>> {
    let mut open = TproxySkelBuilder::default()
        .open(open_object)
        .context("opening the tproxy BPF object")?;
    if let Some(pins) = pins {
        pins.reuse_all(&mut [("stats", &mut open.maps.stats)])?;
    }
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .context("the tproxy object has no .rodata")?;
    let (IpAddr::V4(ip4), IpAddr::V6(ip6)) = (config.proxy_v4.ip(), config.proxy_v6.ip()) else {
        bail!("the proxy needs one IPv4 and one IPv6 address");
    };
    rodata.proxy_ip4 = u32::from(ip4).to_be();
    rodata.proxy_ip6 = cli::ipv6_words(ip6);
    rodata.proxy_port = config.proxy_v4.port().to_be();
    rodata.route_mark = config.route_mark;
    rodata.emit_events = config.events.into();
    let mut skel = open.load().context("loading the tproxy BPF programs")?;
    let bss = skel
        .maps
        .bss_data
        .as_deref_mut()
        .context("the tproxy object has no .bss")?;
    bss.ifindex = config.ifindex;
    bss.has_l2_header = config.has_l2_header.into();
    bss.upstream_has_l2_header = config.upstream_has_l2_header.into();
    for port in &config.ports {
        maps::update(&skel.maps.tproxy_ports, port, &1u8)?;
    }
    Ok(skel)
}

/// The per-CPU counters summed, indexed by `tproxy_stat`.
pub fn counters(skel: &TproxySkel<'_>) -> Result<Vec<u64>> {
    maps::percpu_sums(&skel.maps.stats, tproxy_stat::TSTAT_COUNT.0)
}

fn print_configuration(args: &TproxyArgs, plan: &Plan, path: &str) {
    out!(
        "Intercepting TCP connections arriving on {}",
        args.interface
    );
    out!(
        "  interface:         {} (ifindex {})",
        args.interface,
        plan.ifindex
    );
    out!("  ports:             {}", args.ports);
    out!(
        "  proxy:             {} and {}",
        plan.proxy_v4,
        plan.proxy_v6
    );
    let proxy = if args.no_proxy {
        "external (--no-proxy); it must listen with IP_TRANSPARENT".to_owned()
    } else {
        format!("built-in, transparent, upstream mark {:#x}", args.mark)
    };
    out!("  proxy program:     {proxy}");
    out!(
        "  local delivery:    fwmark {:#x} iif {} -> table {} (rule priority {}, proto {})",
        args.route_mark,
        args.interface,
        args.route_table,
        args.rule_priority,
        local_route::RT_PROTO
    );
    if let Some(upstream) = &args.upstream_interface {
        out!(
            "  upstream replies:  on {upstream} ingress, to local sockets (fwmark {:#x} iif {upstream} -> table {})",
            args.route_mark, args.route_table
        );
    }
    out!("  TC attachment:     {path}");
    out!(
        "  TC order:          {} among the interface's TC programs",
        match args.tc_order.position(TcDirection::Ingress) {
            TcPosition::First => "first",
            TcPosition::Last => "last",
        }
    );
}

fn action_name(event: &tproxy_event) -> (&'static str, Option<&'static str>) {
    match tproxy_action(event.action.into()) {
        tproxy_action::TPROXY_INTERCEPT => ("INTERCEPT", None),
        tproxy_action::TPROXY_NO_LISTENER => ("PASS", Some("no listener")),
        tproxy_action::TPROXY_ASSIGN_FAILED => ("PASS", Some("assign failed")),
        _ => ("UNKNOWN", None),
    }
}

fn print_event(event: &tproxy_event, format: EventFormat, start_ns: u64, proxy: &[SocketAddr; 2]) {
    let seconds = event.timestamp_ns.saturating_sub(start_ns) as f64 / 1e9;
    let (action, reason) = action_name(event);
    let client = event.client.addr();
    let original = event.original.addr();
    let listener = if client.is_ipv4() { proxy[0] } else { proxy[1] };
    match format {
        EventFormat::Off => {}
        EventFormat::Text => {
            let why = match reason {
                None => format!(" (to the proxy on {listener})"),
                Some("no listener") => format!(" (forwarded: nothing listens on {listener})"),
                Some(other) => format!(" (forwarded: {other}, error {})", event.error),
            };
            out!("{seconds:12.3} {action:<10} {client} -> {original}{why}");
        }
        EventFormat::Json => {
            let record = serde_json::json!({
                "time": seconds,
                "action": action.to_lowercase(),
                "reason": reason,
                "error": (event.error != 0).then_some(event.error),
                "client": client.to_string(),
                "original": original.to_string(),
                "proxy": listener.to_string(),
            });
            out!("{record}");
        }
    }
}

/// The counters of a running tproxy.
fn snapshot(stats: &dyn MapCore, interface: &str) -> Result<Snapshot> {
    let counts = maps::percpu_sums(stats, tproxy_stat::TSTAT_COUNT.0)?;
    let count = |stat: tproxy_stat| counts[stat.0 as usize];
    let rows = [
        (
            "tcp_packets",
            "TCP packets seen",
            "TCP packets seen on the intercepted interface.",
            tproxy_stat::TSTAT_TCP_PACKETS,
        ),
        (
            "other_port_packets",
            "to other ports",
            "TCP packets to ports that are not intercepted.",
            tproxy_stat::TSTAT_OTHER_PORT,
        ),
        (
            "intercepted",
            "connections intercepted",
            "Connections handed to the proxy's listener.",
            tproxy_stat::TSTAT_NEW_CONNECTIONS,
        ),
        (
            "syncookie_acks",
            "syncookie ACKs to the proxy",
            "Syncookie ACKs handed to the proxy's listener.",
            tproxy_stat::TSTAT_SYNCOOKIE_ACKS,
        ),
        (
            "socket_packets",
            "packets to proxy sockets",
            "Packets handed to established proxy sockets.",
            tproxy_stat::TSTAT_SOCKET_PACKETS,
        ),
        (
            "forwarded_not_ours",
            "forwarded, no local socket",
            "Packets of flows without a proxy socket, forwarded.",
            tproxy_stat::TSTAT_NOT_OURS,
        ),
        (
            "forwarded_no_listener",
            "forwarded, no listener",
            "New connections forwarded because no proxy listened.",
            tproxy_stat::TSTAT_NO_LISTENER,
        ),
        (
            "assign_failed",
            "assign failed",
            "Packets bpf_sk_assign refused.",
            tproxy_stat::TSTAT_ASSIGN_FAILED,
        ),
        (
            "unparsed",
            "not parsed",
            "Packets not parsed (later fragments, ESP).",
            tproxy_stat::TSTAT_UNPARSED,
        ),
        (
            "time_wait_syns",
            "SYNs meeting TIME_WAIT",
            "SYNs that reused a TIME_WAIT 4-tuple.",
            tproxy_stat::TSTAT_TIME_WAIT_SYNS,
        ),
        (
            "sk_lookup_assigned",
            "listeners given by sk_lookup",
            "Connections sk_lookup gave to the proxy's listener.",
            tproxy_stat::TSTAT_SK_LOOKUP_ASSIGNED,
        ),
        (
            "upstream_replies",
            "upstream replies to sockets",
            "Replies on the upstream interface handed to a spoofing proxy's socket.",
            tproxy_stat::TSTAT_UPSTREAM_REPLIES,
        ),
        (
            "events_lost",
            "events lost",
            "Events dropped because the ring buffer was full.",
            tproxy_stat::TSTAT_EVENTS_LOST,
        ),
    ];
    let mut snapshot = Snapshot::new("tproxy");
    snapshot.instance.push(("interface", interface.to_owned()));
    snapshot.push_counters(rows.map(|(name, label, help, stat)| (name, label, help, count(stat))));
    Ok(snapshot)
}

fn print_statistics(skel: &TproxySkel<'_>, interface: &str) -> Result<()> {
    out!("=== Statistics ===");
    snapshot(&skel.maps.stats, interface)?.print();
    Ok(())
}
