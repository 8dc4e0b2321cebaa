//! `proxy-redirect port-nat`: TC ingress and egress programs translate a
//! destination port on an interface (8080 -> 80) and the replies back,
//! with a conntrack table that user space sweeps.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags};

use crate::bpf::maps;
use crate::bpf::port_nat::types::{
    nat_event, nat_flow, nat_flow_key, nat_flow_state, nat_port, nat_stat,
};
use crate::bpf::port_nat::{PortNatSkel, PortNatSkelBuilder};
use crate::bpf::OwnedSkel;
use crate::cli::{self, EventFormat, OutputArgs};
use crate::out;
use crate::runtime::{Datapath, EventSource, RunContext};
use crate::sys::clock;
use crate::sys::interface_watch::{self, InterfaceWatch};
use crate::sys::links::{self, Attachments, TcAttachMode, TcDirection, TcOrder};
use crate::sys::pins::{self, PinDir};
use crate::sys::privileges;
use crate::telemetry::stats::{Metric, Snapshot};

// SAFETY: generated from include/port_nat.h: fixed-width integers with
// explicit padding.
unsafe impl plain::Plain for nat_port {}
unsafe impl plain::Plain for nat_flow_key {}
unsafe impl plain::Plain for nat_flow {}
unsafe impl plain::Plain for nat_event {}

// Values of include/port_nat.h's #defines, which BTF does not carry.
const NAT_PORT_FROM: u8 = 1;
const NAT_PORT_TO: u8 = 2;
const NAT_DIR_ORIGINAL: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Which transport protocols are translated.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocols {
    Tcp,
    Udp,
    #[default]
    All,
}

impl Protocols {
    /// The NAT_PROTO_* mask of include/port_nat.h.
    fn mask(self) -> u8 {
        match self {
            Protocols::Tcp => 1,
            Protocols::Udp => 2,
            Protocols::All => 3,
        }
    }
}

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  # A web server on :80 answers on :8080 as well
  proxy-redirect port-nat -i eth0 -f 8080 -t 80 -v
  # Two mappings (TCP and UDP, the default); list every translated packet as JSON
  proxy-redirect port-nat -i eth0 -f 8080 -t 80 -f 5300 -t 53 --json

Packets arriving on IFACE for port FROM are delivered to port TO; the
replies leave with FROM again, so clients never notice. Clients that talk to
TO directly are left alone: only tracked flows have their replies rewritten.
The flow table is an LRU: when it is full, the least recently used flow makes
room (a flow that is still active is re-created by its next packet from the
client). Attached as tcx links where the kernel has them (6.6+), so nothing
outlives the process; older kernels use a clsact qdisc that is removed on
exit and replaced by the next run after a crash.")]
pub struct PortNatArgs {
    /// Interface to translate on (use `lo` for local clients)
    #[arg(short, long, value_name = "IFACE")]
    pub interface: String,
    /// Port the clients use; pair each -f with a -t, in order
    #[arg(short = 'f', long = "from", value_name = "FROM", required = true,
          value_parser = cli::parse_port)]
    pub from: Vec<u16>,
    /// Port the server listens on
    #[arg(short = 't', long = "to", value_name = "TO", value_parser = cli::parse_port)]
    pub to: Vec<u16>,
    /// Transport protocols to translate
    #[arg(long, value_enum, default_value_t = Protocols::All)]
    pub proto: Protocols,
    /// Size of the flow table
    #[arg(long, value_name = "N", default_value = "65536",
          value_parser = clap::value_parser!(u32).range(16..=16_777_216))]
    pub max_flows: u32,
    /// Idle seconds before an established TCP flow is forgotten
    #[arg(long, value_name = "SECONDS", default_value = "3600",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tcp_timeout: u64,
    /// Idle seconds before a TCP flow that saw FIN or RST (or only a SYN) is forgotten
    #[arg(long, value_name = "SECONDS", default_value = "60",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tcp_closing_timeout: u64,
    /// Idle seconds before a UDP flow is forgotten
    #[arg(long, value_name = "SECONDS", default_value = "30",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub udp_timeout: u64,
    /// How to attach: tcx links (6.6+), a clsact qdisc, or auto
    #[arg(long, value_enum, default_value_t = TcAttachMode::Auto)]
    pub tc_attach: TcAttachMode,
    /// Where our programs go among the interface's other TC programs:
    /// auto puts them where iptables puts a translation (first on ingress,
    /// last on egress)
    #[arg(long, value_enum, default_value_t = TcOrder::Auto)]
    pub tc_order: TcOrder,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// One `-f FROM -t TO` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub from: u16,
    pub to: u16,
}

/// What the BPF side needs before load.
#[derive(Debug, Clone)]
pub struct NatConfig {
    pub mappings: Vec<Mapping>,
    pub protocols: Protocols,
    pub max_flows: u32,
    pub events: bool,
    /// Hand packets on with TC_ACT_OK, which ends the tcx chain, as before
    /// TC_NEXT: only the benchmark's baseline sets it.
    pub ends_chain: bool,
}

/// Idle timeouts by flow state.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub udp: Duration,
}

impl Timeouts {
    fn for_state(&self, state: u8) -> Duration {
        match nat_flow_state(state.into()) {
            nat_flow_state::FLOW_TCP_ESTABLISHED => self.tcp_established,
            nat_flow_state::FLOW_UDP => self.udp,
            _ => self.tcp_closing,
        }
    }
}

/// Pairs -f with -t and checks them.
pub fn mappings(from: &[u16], to: &[u16]) -> Result<Vec<Mapping>> {
    if from.len() != to.len() {
        match from.get(to.len()) {
            Some(port) => bail!("-f {port} has no -t: give each -f FROM a -t TO"),
            None => bail!("-t {} has no -f: give each -t TO a -f FROM", to[from.len()]),
        }
    }
    let mut out: Vec<Mapping> = Vec::new();
    for (&from, &to) in from.iter().zip(to) {
        if from == to {
            bail!("-f {from} -t {to} maps a port to itself");
        }
        if let Some(earlier) = out.iter().find(|m| m.from == from) {
            bail!(
                "port {from} is mapped twice (to {} and to {to})",
                earlier.to
            );
        }
        out.push(Mapping { from, to });
    }
    Ok(out)
}

fn interface_index(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|_| anyhow::anyhow!("unknown interface '{name}'"))
}

/// The hash of the header that defines every port-nat map's layout.
fn layout() -> u64 {
    pins::layout_hash(&[include_str!("../../include/port_nat.h")])
}

/// Opens, configures and loads the port-nat programs, and fills the port
/// map; with `pins`, the flow table and counters an earlier run pinned are
/// used again, or copied when only the table's size changed.
pub fn load<'obj>(
    config: &NatConfig,
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    pins: Option<&PinDir>,
) -> Result<PortNatSkel<'obj>> {
    let mut open = PortNatSkelBuilder::default()
        .open(open_object)
        .context("opening the port-nat BPF object")?;
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .context("the port-nat object has no .rodata")?;
    rodata.emit_events = config.events.into();
    if config.ends_chain {
        rodata.handed_on = 0;
    }
    open.maps
        .flows
        .set_max_entries(config.max_flows)
        .context("sizing the flow table")?;
    if let Some(pins) = pins {
        pins.reuse(&mut open.maps.flows, "flows")?;
        pins.reuse(&mut open.maps.stats, "stats")?;
    }
    let mut skel = open.load().context("loading the port-nat BPF programs")?;
    set_protocols(&mut skel, config.protocols)?;
    set_mappings(&skel, &config.mappings)?;
    if let Some(previous) = pins.and_then(|p| p.previous("flows", &skel.maps.flows)) {
        let copied = maps::copy_new_entries(&previous, &skel.maps.flows)?;
        out!("  Flow table:        {copied} translated flows copied into a table of the new size");
    }
    Ok(skel)
}

/// Makes the port map hold exactly `mappings`: flows already tracked keep
/// their translation until they end.
fn set_mappings(skel: &PortNatSkel<'_>, mappings: &[Mapping]) -> Result<()> {
    let mut roles: Vec<(u16, nat_port)> = Vec::new();
    let mut role = |port: u16, update: &dyn Fn(&mut nat_port)| {
        let index = match roles.iter().position(|(p, _)| *p == port) {
            Some(index) => index,
            None => {
                roles.push((port, nat_port::default()));
                roles.len() - 1
            }
        };
        update(&mut roles[index].1);
    };
    for mapping in mappings {
        role(mapping.from, &|p| {
            p.role |= NAT_PORT_FROM;
            p.to_port = mapping.to;
        });
        role(mapping.to, &|p| p.role |= NAT_PORT_TO);
    }
    let ports = &skel.maps.nat_ports;
    for (port, value) in &roles {
        maps::update(ports, port, value)?;
    }
    let stale: Vec<Vec<u8>> = ports
        .keys()
        .filter(|key| !roles.iter().any(|(port, _)| key[..] == port.to_ne_bytes()))
        .collect();
    for key in stale {
        ports.delete(&key).context("updating map nat_ports")?;
    }
    Ok(())
}

fn set_protocols(skel: &mut PortNatSkel<'_>, protocols: Protocols) -> Result<()> {
    let data = skel
        .maps
        .data_data
        .as_deref_mut()
        .context("the port-nat object has no .data")?;
    // SAFETY: a byte of the mmap'ed .data, which the programs read as volatile.
    unsafe { std::ptr::write_volatile(&mut data.proto_mask, protocols.mask()) };
    Ok(())
}

/// Tells the programs whether packets start with an Ethernet header; set
/// before every attach.
pub fn set_l2_header(skel: &mut PortNatSkel<'_>, has_l2_header: bool) -> Result<()> {
    let data = skel
        .maps
        .data_data
        .as_deref_mut()
        .context("the port-nat object has no .data")?;
    data.l2_len = l2_len(has_l2_header);
    Ok(())
}

fn l2_len(has_l2_header: bool) -> u32 {
    if has_l2_header {
        14
    } else {
        0
    }
}

/// Checks the interface's link type, then attaches both programs to it;
/// with `pins`, into the links an earlier run pinned, and pins the maps.
fn attach(
    skel: &mut PortNatSkel<'_>,
    interface: &str,
    ifindex: u32,
    args: &PortNatArgs,
    pins: Option<&mut PinDir>,
) -> Result<(Attachments, links::TcPath)> {
    set_l2_header(skel, links::link_has_l2_header(interface, "port-nat")?)?;
    let progs = &skel.progs;
    let mut attachments = Attachments::default();
    let pin = |name: &str| pins.as_deref().map(|p| p.link(name));
    let (egress_pin, ingress_pin) = (pin("egress"), pin("ingress"));
    // Egress first: it only touches tracked flows, and every flow ingress
    // creates must find its reply path ready.
    let path = attachments.attach_tc(
        &progs.port_nat_egress,
        ifindex,
        TcDirection::Egress,
        args.tc_attach,
        args.tc_order.position(TcDirection::Egress),
        egress_pin.as_deref(),
    )?;
    attachments.attach_tc(
        &progs.port_nat_ingress,
        ifindex,
        TcDirection::Ingress,
        args.tc_attach,
        args.tc_order.position(TcDirection::Ingress),
        ingress_pin.as_deref(),
    )?;
    if let Some(pins) = pins {
        let maps = &skel.maps;
        // Flows the old programs made since load() copied the table.
        if let Some(previous) = pins.previous("flows", &maps.flows) {
            maps::copy_new_entries(&previous, &maps.flows)?;
        }
        let pinned_maps = [
            ("flows", &maps.flows as &dyn MapCore),
            ("stats", &maps.stats),
        ];
        pins.commit(&pinned_maps, &["egress", "ingress"])?;
        if path == links::TcPath::Clsact {
            let record = [crate::sys::netns::current_inode()?, ifindex.into()];
            pins.record(links::CLSACT_RECORD, &record)?;
        }
    }
    Ok((attachments, path))
}

/// Everything `prepare` would check, without changing the system.
pub fn check(args: &PortNatArgs) -> Result<()> {
    mappings(&args.from, &args.to)?;
    interface_index(&args.interface)?;
    privileges::require_bpf_and_perfmon("port-nat")
}

fn timeouts(args: &PortNatArgs) -> Timeouts {
    Timeouts {
        tcp_established: Duration::from_secs(args.tcp_timeout),
        tcp_closing: Duration::from_secs(args.tcp_closing_timeout),
        udp: Duration::from_secs(args.udp_timeout),
    }
}

/// The port-nat datapath of one interface.
pub struct PortNat {
    args: PortNatArgs,
    config: NatConfig,
    timeouts: Timeouts,
    ifindex: u32,
    skel: OwnedSkel<PortNatSkel<'static>>,
    watch: InterfaceWatch,
    /// None while the interface is gone.
    tc: Option<Attachments>,
    /// Under `run --config`: the links and maps a crash leaves working.
    pins: Option<PinDir>,
    path: Option<links::TcPath>,
    expired: u64,
    last_sweep: Instant,
}

impl PortNat {
    pub fn prepare(args: &PortNatArgs, ctx: &RunContext) -> Result<PortNat> {
        let mappings = mappings(&args.from, &args.to)?;
        let ifindex = interface_index(&args.interface)?;
        privileges::require_bpf_and_perfmon("port-nat")?;
        let config = NatConfig {
            mappings,
            protocols: args.proto,
            max_flows: args.max_flows,
            events: ctx.format != EventFormat::Off,
            ends_chain: false,
        };
        let pins = ctx.pin_dir(&format!("port-nat {}", args.interface), layout())?;
        if let Some(pins) = &pins {
            pins.report("flows and links", "flows");
        }
        let skel = OwnedSkel::load(|object| load(&config, object, pins.as_ref()))?;
        // Watching before attaching: a deletion in between is not missed.
        let watch = InterfaceWatch::new(&args.interface, ifindex)?;
        Ok(PortNat {
            args: args.clone(),
            config,
            timeouts: timeouts(args),
            ifindex,
            skel,
            watch,
            tc: None,
            pins,
            path: None,
            expired: 0,
            last_sweep: Instant::now(),
        })
    }
}

/// What a reload may change while port-nat runs, applied in place.
impl PortNat {
    pub fn check_reload(&self, new: &PortNatArgs) -> Result<()> {
        mappings(&new.from, &new.to)?;
        let fixed = [
            ("max-flows", new.max_flows != self.args.max_flows),
            ("tc-attach", new.tc_attach != self.args.tc_attach),
            ("tc-order", new.tc_order != self.args.tc_order),
        ];
        if let Some((key, _)) = fixed.iter().find(|(_, changed)| *changed) {
            bail!("{key} cannot change while running; `proxy-redirect upgrade` applies it without a drop");
        }
        Ok(())
    }

    pub fn reload(&mut self, new: &PortNatArgs, _ctx: &RunContext) -> Result<()> {
        self.check_reload(new)?;
        let mappings = mappings(&new.from, &new.to)?;
        set_mappings(&self.skel, &mappings)?;
        set_protocols(&mut self.skel, new.proto)?;
        self.config.mappings = mappings;
        self.config.protocols = new.proto;
        self.timeouts = timeouts(new);
        self.args = new.clone();
        Ok(())
    }
}

impl Datapath for PortNat {
    fn name(&self) -> String {
        format!("port-nat {}", self.args.interface)
    }

    fn attach(&mut self, _ctx: &RunContext) -> Result<()> {
        let (attached, path) = attach(
            &mut self.skel,
            &self.args.interface,
            self.ifindex,
            &self.args,
            self.pins.as_mut(),
        )?;
        self.tc = Some(attached);
        self.path = Some(path);
        print_configuration(&self.args, &self.config, self.ifindex, &self.timeouts);
        warn_about_local_ports(&self.config.mappings);
        out!("  TC order:          {}", self.args.tc_order.describe());
        out!(
            "Attached ingress and egress programs to {} via {path}; press Ctrl-C to stop",
            self.args.interface
        );
        Ok(())
    }

    fn attach_mode(&self) -> String {
        self.path.map_or("none".into(), |path| path.to_string())
    }

    fn events(&self, ctx: &RunContext) -> Result<Option<EventSource>> {
        let header = format!("{:>12} {:<7} PACKET", "TIME(s)", "ACTION");
        let (format, start_ns) = (ctx.format, ctx.start_ns);
        EventSource::new(&self.skel.maps.events, header, move |e: &nat_event| {
            print_event(e, format, start_ns)
        })
        .map(Some)
    }

    fn detach(&mut self) {
        self.tc = None;
    }

    fn reclaim(&mut self) -> Result<()> {
        match &mut self.tc {
            Some(tc) => tc.reclaim(),
            None => Ok(()),
        }
    }

    fn tick(&mut self, ctx: &RunContext) {
        let (skel, args, pins) = (&mut self.skel, &self.args, &mut self.pins);
        interface_watch::follow(
            &mut self.watch,
            &mut self.tc,
            ctx.format,
            ctx.start_ns,
            |index| attach(skel, &args.interface, index, args, pins.as_mut()),
        );
        if self.last_sweep.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = Instant::now();
        match sweep(&self.skel.maps.flows, &self.timeouts, clock::monotonic_ns()) {
            Ok(flows) => {
                self.expired += flows.len() as u64;
                for (key, flow) in &flows {
                    print_expired(key, flow, ctx.format, ctx.start_ns);
                }
            }
            Err(err) => tracing::warn!("sweeping the flow table: {err:#}"),
        }
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let (stats, flows) = (&self.skel.maps.stats, &self.skel.maps.flows);
        Ok(vec![snapshot(
            stats,
            flows,
            &self.args.interface,
            self.expired,
        )?])
    }

    fn status(&self) -> serde_json::Value {
        let mappings: Vec<String> = self
            .config
            .mappings
            .iter()
            .map(|m| format!("{} -> {}", m.from, m.to))
            .collect();
        serde_json::json!({
            "name": self.name(),
            "interface": self.args.interface,
            "mappings": mappings,
            "protocols": format!("{:?}", self.config.protocols).to_lowercase(),
            "tc_order": self.args.tc_order.describe(),
            "programs": self.tc.as_ref().map(Attachments::describe).unwrap_or_default(),
        })
    }

    fn print_statistics(&self) -> Result<()> {
        print_statistics(&self.skel, &self.args.interface, self.expired)
    }
}

/// This host's own connections may get a FROM as their local port; their
/// replies are left alone (a socket lookup finds them), but a client of FROM
/// whose tuple equals such a connection's cannot get through meanwhile.
fn warn_about_local_ports(mappings: &[Mapping]) {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let Some((low, high)) = std::fs::read_to_string(path).ok().and_then(|range| {
        let mut ports = range.split_whitespace().map(|p| p.parse::<u16>().ok());
        Some((ports.next()??, ports.next()??))
    }) else {
        return;
    };
    for mapping in mappings.iter().filter(|m| (low..=high).contains(&m.from)) {
        tracing::warn!(
            "FROM port {} is inside ip_local_port_range ({low}-{high}): this host's own \
             outgoing connections may use it as their local port (their replies are left \
             untranslated); pick a FROM outside {path}",
            mapping.from
        );
    }
}

/// Removes the flows idle for longer than their state's timeout and
/// returns them.
pub fn sweep(
    flows: &dyn MapCore,
    timeouts: &Timeouts,
    now_ns: u64,
) -> Result<Vec<(nat_flow_key, nat_flow)>> {
    let mut expired = Vec::new();
    for (key, flow) in maps::entries::<nat_flow_key, nat_flow>(flows)? {
        let idle = Duration::from_nanos(now_ns.saturating_sub(flow.last_seen_ns));
        if idle < timeouts.for_state(flow.state) {
            continue;
        }
        // SAFETY: a Plain key read from this very map.
        let key_bytes = unsafe { plain::as_bytes(&key) };
        // A packet may have refreshed the flow since it was listed.
        let Some(current) = flows.lookup(key_bytes, MapFlags::ANY)? else {
            continue;
        };
        let current = *plain::from_bytes::<nat_flow>(&current)
            .ok()
            .context("flow size")?;
        if current.last_seen_ns != flow.last_seen_ns {
            continue;
        }
        if flows.delete(key_bytes).is_ok() {
            expired.push((key, current));
        }
    }
    Ok(expired)
}

pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        _ => "?",
    }
}

pub fn state_name(state: u8) -> &'static str {
    match nat_flow_state(state.into()) {
        nat_flow_state::FLOW_TCP_SYN_SENT => "syn-sent",
        nat_flow_state::FLOW_TCP_ESTABLISHED => "established",
        nat_flow_state::FLOW_TCP_CLOSING => "closing",
        nat_flow_state::FLOW_UDP => "udp",
        _ => "unknown",
    }
}

fn print_event(event: &nat_event, format: EventFormat, start_ns: u64) {
    let seconds = event.timestamp_ns.saturating_sub(start_ns) as f64 / 1e9;
    let src = crate::bpf::socket_addr(event.family, &event.src_ip, event.src_port);
    let dst = crate::bpf::socket_addr(event.family, &event.dst_ip, event.dst_port);
    let ingress = event.direction == NAT_DIR_ORIGINAL;
    let action = if ingress { "INGRESS" } else { "EGRESS" };
    let new_port = u16::from_be(event.new_port);
    let protocol = protocol_name(event.protocol);
    match format {
        EventFormat::Off => {}
        EventFormat::Text => {
            let new_flow = if event.new_flow != 0 { " new flow" } else { "" };
            out!(
                "{seconds:12.3} {action:<7} {src} -> {dst} [REDIRECTED to {new_port}] {protocol}{new_flow}"
            );
        }
        EventFormat::Json => {
            let record = serde_json::json!({
                "time": seconds,
                "event": action.to_lowercase(),
                "protocol": protocol,
                "src": src.to_string(),
                "dst": dst.to_string(),
                "new_port": new_port,
                "new_flow": event.new_flow != 0,
            });
            out!("{record}");
        }
    }
}

fn print_expired(key: &nat_flow_key, flow: &nat_flow, format: EventFormat, start_ns: u64) {
    let now = clock::monotonic_ns();
    let seconds = now.saturating_sub(start_ns) as f64 / 1e9;
    let idle = now.saturating_sub(flow.last_seen_ns) as f64 / 1e9;
    let client = crate::bpf::socket_addr(key.family, &key.client_ip, key.client_port);
    let server = crate::bpf::socket_addr(key.family, &key.server_ip, flow.original_port);
    let to_port = u16::from_be(key.server_port);
    let protocol = protocol_name(key.protocol);
    let state = state_name(flow.state);
    match format {
        EventFormat::Off => {}
        EventFormat::Text => out!(
            "{seconds:12.3} EXPIRED {client} -> {server} [to {to_port}] {protocol} {state}, \
             idle {idle:.1}s, packets {}/{}, bytes {}/{}",
            flow.packets[0],
            flow.packets[1],
            flow.bytes[0],
            flow.bytes[1]
        ),
        EventFormat::Json => {
            let record = serde_json::json!({
                "time": seconds,
                "event": "expired",
                "protocol": protocol,
                "client": client.to_string(),
                "server": server.to_string(),
                "to_port": to_port,
                "state": state,
                "idle": idle,
                "packets": flow.packets,
                "bytes": flow.bytes,
            });
            out!("{record}");
        }
    }
}

fn print_configuration(args: &PortNatArgs, config: &NatConfig, ifindex: u32, t: &Timeouts) {
    out!(
        "Translating ports on {} (ifindex {ifindex})",
        args.interface
    );
    let mappings: Vec<String> = config
        .mappings
        .iter()
        .map(|m| format!("{} -> {}", m.from, m.to))
        .collect();
    out!("  mappings:          {}", mappings.join(", "));
    let protocols = match config.protocols {
        Protocols::Tcp => "tcp",
        Protocols::Udp => "udp",
        Protocols::All => "tcp, udp",
    };
    out!("  protocols:         {protocols}");
    out!(
        "  flow table:        {} flows (LRU); idle timeouts: tcp {}s, tcp closing {}s, udp {}s",
        config.max_flows,
        t.tcp_established.as_secs(),
        t.tcp_closing.as_secs(),
        t.udp.as_secs()
    );
}

/// Sums of the per-CPU counters, indexed by `nat_stat`.
pub fn counters(skel: &PortNatSkel<'_>) -> Result<Vec<u64>> {
    maps::percpu_sums(&skel.maps.stats, nat_stat::NAT_STAT_COUNT.0)
}

/// The counters and gauges of a running port-nat; `expired` is counted by
/// the user-space sweep.
fn snapshot(
    stats: &dyn MapCore,
    flows: &dyn MapCore,
    interface: &str,
    expired: u64,
) -> Result<Snapshot> {
    let counts = maps::percpu_sums(stats, nat_stat::NAT_STAT_COUNT.0)?;
    let count = |stat: nat_stat| counts[stat.0 as usize];
    let live = maps::count(flows)? as u64;
    // Every new flow is in the table, was replaced in place by a reopened
    // one, expired, was ended by direct traffic, or was evicted.
    let evicted = count(nat_stat::NAT_STAT_NEW_FLOWS).saturating_sub(
        count(nat_stat::NAT_STAT_REUSED_FLOWS)
            + expired
            + count(nat_stat::NAT_STAT_DIRECT_STALE)
            + live,
    );
    let dropped =
        count(nat_stat::NAT_STAT_DROP_TRACK_FAILED) + count(nat_stat::NAT_STAT_DROP_REWRITE_FAILED);
    let rows = [
        (
            "packets",
            "packets seen",
            "Packets seen by both programs.",
            count(nat_stat::NAT_STAT_PACKETS),
        ),
        (
            "bytes",
            "bytes seen",
            "Bytes seen by both programs.",
            count(nat_stat::NAT_STAT_BYTES),
        ),
        (
            "ingress_translated",
            "translated on ingress",
            "Packets to FROM rewritten to TO.",
            count(nat_stat::NAT_STAT_INGRESS_TRANSLATED),
        ),
        (
            "egress_translated",
            "translated on egress",
            "Replies from TO rewritten to FROM.",
            count(nat_stat::NAT_STAT_EGRESS_TRANSLATED),
        ),
        (
            "new_flows",
            "new flows",
            "Flows recorded.",
            count(nat_stat::NAT_STAT_NEW_FLOWS),
        ),
        (
            "reopened_flows",
            "flows reopened by a new SYN",
            "Flows replaced by a new SYN on their tuple.",
            count(nat_stat::NAT_STAT_REUSED_FLOWS),
        ),
        (
            "expired_flows",
            "flows expired",
            "Flows removed after their idle timeout.",
            expired,
        ),
        (
            "direct_ended_flows",
            "flows ended by direct traffic",
            "Flows ended by a SYN, RST or FIN straight to TO.",
            count(nat_stat::NAT_STAT_DIRECT_STALE),
        ),
        (
            "direct_ignored",
            "direct packets ignored",
            "Packets straight to TO on a flow's tuple that prove nothing.",
            count(nat_stat::NAT_STAT_DIRECT_IGNORED),
        ),
        (
            "out_of_window",
            "out of window (state kept)",
            "Translated packets far from the flow's sequence numbers.",
            count(nat_stat::NAT_STAT_OUT_OF_WINDOW),
        ),
        (
            "passed_local",
            "passed: replies to local sockets",
            "Packets owned by a socket of this host, left alone.",
            count(nat_stat::NAT_STAT_PASS_LOCAL),
        ),
        (
            "evicted_flows",
            "flows evicted (table full)",
            "Flows the LRU table dropped to make room.",
            evicted,
        ),
        (
            "icmp_translated",
            "ICMP errors translated",
            "ICMP and ICMPv6 errors about translated flows.",
            count(nat_stat::NAT_STAT_ICMP_TRANSLATED),
        ),
        (
            "untracked_replies",
            "untracked replies left alone",
            "Packets from TO without a flow.",
            count(nat_stat::NAT_STAT_REPLY_UNTRACKED),
        ),
        (
            "passed_fragments",
            "passed: later fragments",
            "Later IP fragments, passed unchanged.",
            count(nat_stat::NAT_STAT_PASS_FRAGMENT),
        ),
        (
            "passed_truncated",
            "passed: truncated",
            "Truncated or malformed packets, passed unchanged.",
            count(nat_stat::NAT_STAT_PASS_TRUNCATED),
        ),
        (
            "passed_unparsed",
            "passed: unparsed IPv6 headers",
            "IPv6 header chains not followed, passed unchanged.",
            count(nat_stat::NAT_STAT_PASS_UNPARSED),
        ),
        (
            "dropped",
            "dropped",
            "Packets dropped, all reasons.",
            dropped,
        ),
        (
            "dropped_track_failed",
            "dropped: flow table insert failed",
            "Packets dropped: the flow could not be recorded.",
            count(nat_stat::NAT_STAT_DROP_TRACK_FAILED),
        ),
        (
            "dropped_rewrite_failed",
            "dropped: rewrite failed",
            "Packets dropped: the kernel could not rewrite them.",
            count(nat_stat::NAT_STAT_DROP_REWRITE_FAILED),
        ),
        (
            "events_lost",
            "events lost",
            "Events dropped because the ring buffer was full.",
            count(nat_stat::NAT_STAT_EVENTS_LOST),
        ),
    ];
    let mut snapshot = Snapshot::new("port_nat");
    snapshot.instance.push(("interface", interface.to_owned()));
    snapshot.push_counters(rows);
    snapshot.push(Metric::gauge(
        "flows",
        "flows tracked at exit",
        "Flows in the table now.",
        live,
    ));
    Ok(snapshot)
}

fn print_statistics(skel: &PortNatSkel<'_>, interface: &str, expired: u64) -> Result<()> {
    out!("=== Statistics ===");
    snapshot(&skel.maps.stats, &skel.maps.flows, interface, expired)?.print();
    let live: Vec<(nat_flow_key, nat_flow)> = maps::entries(&skel.maps.flows)?;
    out!("=== Tracked flows: {} ===", live.len());
    for (key, flow) in live.iter().take(20) {
        out!(
            "  {} {} -> {} [to {}] {}, packets {}/{}, bytes {}/{}",
            protocol_name(key.protocol),
            crate::bpf::socket_addr(key.family, &key.client_ip, key.client_port),
            crate::bpf::socket_addr(key.family, &key.server_ip, flow.original_port),
            u16::from_be(key.server_port),
            state_name(flow.state),
            flow.packets[0],
            flow.packets[1],
            flow.bytes[0],
            flow.bytes[1]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_pair_in_order_and_are_checked() {
        assert_eq!(
            mappings(&[8080, 5300], &[80, 53]).unwrap(),
            [
                Mapping { from: 8080, to: 80 },
                Mapping { from: 5300, to: 53 }
            ]
        );
        let err = |f: &[u16], t: &[u16]| mappings(f, t).unwrap_err().to_string();
        assert!(err(&[8080, 8081], &[80]).contains("-f 8081 has no -t"));
        assert!(err(&[8080], &[80, 81]).contains("-t 81 has no -f"));
        assert!(err(&[8080, 8080], &[80, 81]).contains("mapped twice"));
        assert!(err(&[80], &[80]).contains("to itself"));
    }
}
