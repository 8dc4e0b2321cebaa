//! `proxy-redirect bypass`: TCP between two sockets of one network namespace
//! skips the TCP/IP stack. sockops puts sockets whose peer is in their own
//! namespace into a SOCKHASH keyed by namespace and connection; an sk_msg
//! program moves each message into the peer socket's receive queue.

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::MapCore;

use crate::bpf::bypass::types::{
    bypass_control, bypass_event, bypass_side, bypass_stat, comm, endpoint, sock_key,
};
use crate::bpf::bypass::{BypassSkel, BypassSkelBuilder};
use crate::bpf::maps;
use crate::bpf::Endpoint as _;
use crate::bpf::OwnedSkel;
use crate::cli::{self, EventFormat, OutputArgs, PortList};
use crate::runtime::{Datapath, EventSource, RunContext};
use crate::sys::cgroup::{self, CgroupFd};
use crate::sys::links::{self, Attachments};
use crate::sys::pins::{self, PinDir};
use crate::sys::privileges;
use crate::telemetry::stats::{Metric, Snapshot};
use crate::{err_out, out};

// SAFETY: generated from include/*.h: fixed-width integers with explicit padding.
unsafe impl plain::Plain for bypass_event {}
unsafe impl plain::Plain for endpoint {}
unsafe impl plain::Plain for sock_key {}
unsafe impl plain::Plain for comm {}

/// Programs that splice(2) and read themselves what splice cannot see in a
/// sockmap socket: the built-in proxy (`redirect`, `proxy`), whose relay
/// threads carry this name. They are never learned as splice readers.
const SPLICE_AWARE: [&str; 1] = ["proxy"];

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  # Every same-host TCP connection of a service skips the TCP/IP stack
  proxy-redirect bypass -c system.slice/app.service -v
  # Only connections to or from ports 6379 and 5432, events as JSON
  proxy-redirect bypass -c app -P 6379,5432 --json

A socket enters the bypass only when its peer is another socket of the same
network namespace (its route leads to that namespace's loopback device), in
any namespace of the cgroup, no byte crossed TCP before (Fast Open), and its
program does not read with splice(2), which cannot see bypassed data: named
with --splice-readers (haproxy by default), or learned at its first splice.
A message is redirected only once the peer has read with recv every byte
sent before it over TCP. Applications see ordinary TCP sockets; on exit
every connection goes back to the normal path without losing a byte.")]
pub struct BypassArgs {
    /// cgroup whose sockets may take the bypass: absolute, or relative to the
    /// cgroup2 mount [default: the cgroup2 root, i.e. the whole host]
    #[arg(short, long, value_name = "CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Only connections with one of these ports (either end), comma-separated
    /// [default: every port]
    #[arg(short = 'P', long, value_name = "PORTS", value_parser = cli::parse_port_list)]
    pub ports: Option<PortList>,
    /// Programs (process names, as in /proc/PID/comm) known to read sockets
    /// with splice(2), which cannot see bypassed data: their sockets never
    /// take the bypass. Comma-separated; '' names none. Unnamed ones get no
    /// redirected data before they have read with recv, and are learned at
    /// their first splice
    #[arg(
        long,
        value_name = "NAMES",
        value_delimiter = ',',
        default_value = "haproxy",
        value_parser = parse_program_name
    )]
    pub splice_readers: Vec<String>,
    /// Also pair sockets whose peer is in another network namespace of this
    /// host (pods on a bridge): only when both ends prove to be one
    /// connection, never by address. Such pairs skip netfilter and tc on
    /// the veths after the handshake
    #[arg(long)]
    pub across_namespaces: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A process name, or nothing ('' names no program).
fn parse_program_name(text: &str) -> Result<String, String> {
    if text.len() > 15 {
        return Err(format!(
            "'{text}' is not a process name (at most 15 bytes, as in /proc/PID/comm)"
        ));
    }
    Ok(text.to_owned())
}

/// The programs of --splice-readers.
fn named_splice_readers(args: &BypassArgs) -> impl Iterator<Item = &str> {
    args.splice_readers
        .iter()
        .map(String::as_str)
        .filter(|name| !name.is_empty())
}

/// Every kind of splice reader, for the banner.
fn splice_readers(args: &BypassArgs) -> Vec<String> {
    named_splice_readers(args)
        .map(String::from)
        .chain(["programs seen splicing".to_owned()])
        .collect()
}

fn comm_key(name: &str) -> comm {
    let mut key = comm { name: [0; 16] };
    for (slot, byte) in key.name.iter_mut().zip(name.bytes()) {
        *slot = byte as _;
    }
    key
}

/// The tracing programs that tell readers apart: how far each socket's
/// reader has read with recvmsg, and which programs splice. Attached before
/// sockops, so that every inserted socket is watched from the start. With
/// `pins`, pinned there in place of an earlier run's: tracing links cannot
/// swap programs, so the old ones run beside the new until their pin goes
/// (both write the same values).
fn attach_readers(skel: &BypassSkel<'_>, pins: Option<&PinDir>) -> Result<Vec<libbpf_rs::Link>> {
    let progs = &skel.progs;
    let receive = if progs.bypass_recv_length.autoload() {
        progs.bypass_recv_length.attach()
    } else {
        progs.bypass_recvmsg_exit.attach()
    };
    let mut readers = vec![
        receive.context("attaching the program that follows recvmsg")?,
        progs
            .bypass_tcp_read
            .attach()
            .context("attaching tp_btf/tcp_rcv_space_adjust")?,
    ];
    if let Some(pins) = pins {
        for (link, name) in readers.iter_mut().zip(READER_LINKS) {
            let path = pins.link(name);
            let _ = std::fs::remove_file(&path);
            link.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
    }
    Ok(readers)
}

/// The pin names of the readers' links, in attach_readers' order.
const READER_LINKS: [&str; 2] = ["recv", "splice"];

/// The maps whose contents outlive a process under a service: the sockets
/// and what is known of their programs and readers, the stop flag that
/// every inserted socket's program reads, and the counters.
macro_rules! kept_maps {
    ($maps:expr, $($borrow:tt)+) => {
        [
            ("sockets", $($borrow)+ $maps.sockets),
            ("splicers", $($borrow)+ $maps.splicers),
            ("recv_readers", $($borrow)+ $maps.recv_readers),
            ("recv_listeners", $($borrow)+ $maps.recv_listeners),
            ("listeners", $($borrow)+ $maps.listeners),
            ("connectors", $($borrow)+ $maps.connectors),
            ("readers", $($borrow)+ $maps.readers),
            ("control", $($borrow)+ $maps.control),
            ("paired", $($borrow)+ $maps.paired),
            ("candidates", $($borrow)+ $maps.candidates),
            ("peers", $($borrow)+ $maps.peers),
            ("proofs", $($borrow)+ $maps.proofs),
            ("stats", $($borrow)+ $maps.stats),
        ]
    };
}

/// The hash of the headers that define bypass's maps.
fn layout() -> u64 {
    pins::layout_hash(&[
        include_str!("../../include/bypass.h"),
        include_str!("../../include/addr.h"),
    ])
}

/// Whether the kernel has the sock_recv_length tracepoint (6.4+); older
/// ones follow recvmsg with fexit on tcp_bpf_recvmsg instead.
fn kernel_has_recv_length_tracepoint() -> bool {
    libbpf_rs::btf::Btf::from_vmlinux().is_ok_and(|btf| {
        btf.type_by_name::<libbpf_rs::btf::BtfType<'_>>("btf_trace_sock_recv_length")
            .is_some()
    })
}

/// Everything `prepare` would check, without changing the system.
pub fn check(args: &BypassArgs) -> Result<()> {
    let cgroup = cgroup::resolve(args.cgroup.as_deref())?;
    privileges::require_bpf_and_perfmon("bypass")?;
    links::check_cgroup_hook(&cgroup, libbpf_sys::BPF_CGROUP_SOCK_OPS, "sockops")
}

/// The bypass datapath: sockops on a cgroup, sk_msg on the socket map.
pub struct Bypass {
    args: BypassArgs,
    cgroup: PathBuf,
    skel: OwnedSkel<BypassSkel<'static>>,
    /// The tracing programs that follow readers (attach_readers).
    readers: Vec<libbpf_rs::Link>,
    attachments: Attachments,
    /// Whether the one line about another tool's sockmap was said.
    told_of_neighbour: bool,
    /// Under `run --config`: the sockets map with its sockets, the links
    /// and what the programs know, which a crash leaves working and the
    /// next start adopts.
    pins: Option<PinDir>,
}

impl Bypass {
    /// The sk_msg program on both sockets maps (which hold it; a later one
    /// replaces it there).
    fn attach_msg(&self) -> Result<()> {
        for map in [&self.skel.maps.sockets, &self.skel.maps.paired] {
            self.skel
                .progs
                .bypass_msg
                .attach_sockmap(map.as_fd().as_raw_fd())
                .context("attaching bypass_msg to the sockets maps")?;
        }
        Ok(())
    }

    pub fn prepare(args: &BypassArgs, ctx: &RunContext) -> Result<Bypass> {
        let cgroup = cgroup::resolve(args.cgroup.as_deref())?;
        privileges::require_bpf_and_perfmon("bypass")?;
        let events = ctx.format != EventFormat::Off;
        let mut pins = ctx.pin_dir("bypass", layout())?;
        let skel = OwnedSkel::load(|object| load(args, events, pins.as_mut(), object))?;
        if let Some(pins) = &pins {
            pins.report("bypassed sockets and links", "sockets");
        }
        Ok(Bypass {
            args: args.clone(),
            cgroup,
            skel,
            readers: Vec::new(),
            attachments: Attachments::default(),
            told_of_neighbour: false,
            pins,
        })
    }
}

/// What a reload may change while bypass runs, applied in place.
impl Bypass {
    pub fn check_reload(&self, new: &BypassArgs) -> Result<()> {
        if new.ports.is_some() != self.args.ports.is_some() {
            bail!(
                "ports (all or a list) cannot change while running; `proxy-redirect upgrade` \
                 applies it without a drop"
            );
        }
        Ok(())
    }

    pub fn reload(&mut self, new: &BypassArgs, _ctx: &RunContext) -> Result<()> {
        self.check_reload(new)?;
        let cgroup = cgroup::resolve(new.cgroup.as_deref())?;
        if cgroup != self.cgroup {
            // The new cgroup first: connections there are bypassed at once.
            let mut attachments = Attachments::default();
            let pin = self.pins.as_ref().map(|pins| pins.link(SOCKOPS_LINK));
            attachments.attach_cgroup(
                &self.skel.progs.bypass_sockops,
                &CgroupFd::open(&cgroup)?,
                pin.as_deref(),
            )?;
            self.attachments = attachments;
            self.cgroup = cgroup;
        }
        let ports = new.ports.as_ref().map_or(&[][..], |p| &p.0);
        maps::sync_set(&self.skel.maps.ports, ports)?;
        set_control(
            &self.skel,
            bypass_control::CONTROL_ACROSS,
            new.across_namespaces,
        )?;
        // Names are only added: the map also holds the programs learned
        // splicing, and a socket of a splicer must never enter the bypass.
        for name in named_splice_readers(new) {
            maps::update(&self.skel.maps.splicers, &comm_key(name), &1u8)?;
        }
        self.args = new.clone();
        Ok(())
    }
}

impl Datapath for Bypass {
    fn name(&self) -> String {
        "bypass".into()
    }

    fn attach(&mut self, _ctx: &RunContext) -> Result<()> {
        // The map holds the sk_msg program (released with the map when this
        // process exits); sockops comes second, so that no socket enters the
        // map before its messages can be redirected.
        self.attach_msg()?;
        self.readers = attach_readers(&self.skel, self.pins.as_ref())?;
        let cgroup = CgroupFd::open(&self.cgroup)?;
        let pin = self.pins.as_ref().map(|pins| pins.link(SOCKOPS_LINK));
        self.attachments
            .attach_cgroup(&self.skel.progs.bypass_sockops, &cgroup, pin.as_deref())?;
        if let Some(pins) = &mut self.pins {
            let maps = &self.skel.maps;
            let kept: Vec<(&str, &dyn MapCore)> = kept_maps!(maps, &)
                .into_iter()
                .map(|(name, map)| (name, map as &dyn MapCore))
                .collect();
            let mut links = READER_LINKS.to_vec();
            links.push(SOCKOPS_LINK);
            pins.commit(&kept, &links)?;
        }

        out!("Bypassing same-host TCP");
        out!("  cgroup:            {}", self.cgroup.display());
        match &self.args.ports {
            Some(ports) => out!("  ports:             {ports}"),
            None => out!("  ports:             all"),
        }
        match self.args.across_namespaces {
            true => out!(
                "  peers:             sockets of the same network namespace, and of other \
                 namespaces of this host once both ends prove one connection"
            ),
            false => out!("  peers:             sockets of the same network namespace"),
        }
        out!(
            "  splice readers:    {} (never bypassed)",
            splice_readers(&self.args).join(", ")
        );
        out!("Attached 4 programs; press Ctrl-C to stop");
        Ok(())
    }

    fn attach_mode(&self) -> String {
        "cgroup bpf_link".into()
    }

    fn events(&self, ctx: &RunContext) -> Result<Option<EventSource>> {
        let header = format!(
            "{:>12} {:<8} {:<8} {:<8} {:<8} CONNECTION",
            "TIME(s)", "ACTION", "SIDE", "NETNS", "COOKIE"
        );
        let (format, start_ns) = (ctx.format, ctx.start_ns);
        EventSource::new(&self.skel.maps.events, header, move |e: &bypass_event| {
            print_event(e, format, start_ns)
        })
        .map(Some)
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(vec![snapshot(&self.skel)?])
    }

    fn status(&self) -> serde_json::Value {
        let mut programs = self.attachments.describe();
        let progs = &self.skel.progs;
        let mut others = vec![(&progs.bypass_msg, "the sockets map")];
        for tracing in [
            &progs.bypass_recv_length,
            &progs.bypass_recvmsg_exit,
            &progs.bypass_tcp_read,
        ] {
            if tracing.autoload() {
                others.push((tracing, "the kernel (tracing)"));
            }
        }
        for (program, target) in others {
            programs.push(serde_json::json!({
                "program": program.name().to_string_lossy(),
                "id": links::program_id(program),
                "target": target,
            }));
        }
        serde_json::json!({
            "name": self.name(),
            "cgroup": self.cgroup.display().to_string(),
            "ports": self.args.ports.as_ref().map_or("all".into(), PortList::to_string),
            "across_namespaces": self.args.across_namespaces,
            "splice_readers": splice_readers(&self.args),
            "programs": programs,
        })
    }

    /// Says once, in one line, when another tool's sockmap holds sockets
    /// that bypass would take.
    fn tick(&mut self, _ctx: &RunContext) {
        if self.told_of_neighbour {
            return;
        }
        let held = maps::percpu_sums(&self.skel.maps.stats, bypass_stat::BYPASS_STAT_COUNT.0)
            .map_or(0, |counts| {
                counts[bypass_stat::BYPASS_STAT_HELD_ELSEWHERE.0 as usize]
            });
        if held > 0 {
            err_out!(
                "warning: bypass: sockets are already in another tool's sockmap with its own \
                 sk_msg program (EBUSY); they stay on TCP, counted as held_by_another_sockmap"
            );
            self.told_of_neighbour = true;
        }
    }

    fn stop(&mut self) {
        stop(&mut self.skel);
    }

    fn detach(&mut self) {
        stop(&mut self.skel);
        self.attachments = Attachments::default();
        self.readers.clear();
    }

    /// The successor also put its sk_msg program on the maps and pinned
    /// its tracing links in place of ours (which run on beside them).
    fn reclaim(&mut self) -> Result<()> {
        self.attach_msg()?;
        self.attachments.reclaim()
    }

    fn print_statistics(&self) -> Result<()> {
        print_statistics(&self.skel)
    }
}

/// The pin name of the sockops link.
const SOCKOPS_LINK: &str = "sockops";

fn load<'obj>(
    args: &BypassArgs,
    events: bool,
    pins: Option<&mut PinDir>,
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
) -> Result<BypassSkel<'obj>> {
    let mut open = BypassSkelBuilder::default()
        .open(open_object)
        .context("opening the bypass BPF object")?;
    if let Some(pins) = pins {
        let maps = &mut open.maps;
        pins.reuse_all(&mut kept_maps!(maps, &mut))?;
    }
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .context("the bypass object has no .rodata")?;
    rodata.filter_ports = args.ports.is_some().into();
    rodata.emit_events = events.into();
    let recv_length = kernel_has_recv_length_tracepoint();
    open.progs.bypass_recv_length.set_autoload(recv_length);
    open.progs.bypass_recvmsg_exit.set_autoload(!recv_length);
    let skel = open.load().context("loading the bypass BPF programs")?;
    for port in args.ports.iter().flat_map(|p| &p.0) {
        maps::update(&skel.maps.ports, port, &1u8)?;
    }
    for name in named_splice_readers(args) {
        maps::update(&skel.maps.splicers, &comm_key(name), &1u8)?;
    }
    for name in SPLICE_AWARE {
        maps::update(&skel.maps.splice_aware, &comm_key(name), &1u8)?;
    }
    set_control(
        &skel,
        bypass_control::CONTROL_ACROSS,
        args.across_namespaces,
    )?;
    Ok(skel)
}

/// Sends every bypassed connection back to the normal path. Entries are
/// never deleted: removing a socket from the map frees the messages already
/// redirected to it and not yet read. Each socket's psock keeps the sk_msg
/// program, and with it the map and this flag, until the socket closes;
/// the receiver reads its queued messages first, then what arrives over
/// TCP, so nothing is lost or reordered. After SIGKILL the flag stays unset
/// and connections already bypassed keep the bypass until they close.
fn stop(skel: &mut BypassSkel<'_>) {
    if let Err(err) = set_control(skel, bypass_control::CONTROL_STOPPING, true) {
        tracing::warn!("setting bypass's stop flag: {err:#}");
    }
}

fn set_control(skel: &BypassSkel<'_>, flag: bypass_control, on: bool) -> Result<()> {
    maps::update(&skel.maps.control, &flag.0, &u32::from(on))
}

fn side_name(side: u8) -> &'static str {
    match bypass_side(side.into()) {
        bypass_side::SIDE_ACTIVE => "connect",
        bypass_side::SIDE_PASSIVE => "accept",
        _ => "unknown",
    }
}

fn print_event(event: &bypass_event, format: EventFormat, start_ns: u64) {
    let seconds = event.timestamp_ns.saturating_sub(start_ns) as f64 / 1e9;
    let local = event.key.local.addr();
    let remote = event.key.remote.addr();
    let side = side_name(event.side);
    let error = (event.error != 0).then(|| std::io::Error::from_raw_os_error(-event.error));
    let across = event.across != 0;
    let action = match (error.is_some(), across) {
        (true, _) => "FAILED",
        (false, false) => "INSERT",
        // Into the map of pairs across namespaces, as a first end or paired.
        (false, true) => "ACROSS",
    };
    match format {
        EventFormat::Off => {}
        EventFormat::Text => {
            let why = error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            out!(
                "{seconds:12.3} {action:<8} {side:<8} {:<8} [{}] {local} -> {remote}{why}",
                event.key.netns,
                event.cookie
            );
        }
        EventFormat::Json => {
            let record = serde_json::json!({
                "time": seconds,
                "action": if error.is_some() { "failed" } else { "insert" },
                "side": side,
                "across": across,
                "cookie": event.cookie,
                "netns": event.key.netns,
                "local": local.to_string(),
                "remote": remote.to_string(),
                "error": error.map(|e| e.to_string()),
            });
            out!("{record}");
        }
    }
}

/// The counters and gauges of a running bypass.
fn snapshot(skel: &BypassSkel<'_>) -> Result<Snapshot> {
    let counts = maps::percpu_sums(&skel.maps.stats, bypass_stat::BYPASS_STAT_COUNT.0)?;
    let count = |stat: bypass_stat| counts[stat.0 as usize];
    let rows = [
        (
            "established",
            "established sockets seen",
            "TCP sockets seen established.",
            bypass_stat::BYPASS_STAT_ESTABLISHED,
        ),
        (
            "inserted",
            "inserted",
            "Sockets put in the sockmap.",
            bypass_stat::BYPASS_STAT_INSERTED,
        ),
        (
            "insert_failed",
            "insert failures",
            "Sockets the sockmap refused.",
            bypass_stat::BYPASS_STAT_INSERT_FAILED,
        ),
        (
            "held_by_another_sockmap",
            "held by another tool's sockmap",
            "Sockets already in another tool's sockmap with its own sk_msg program (EBUSY), left on TCP.",
            bypass_stat::BYPASS_STAT_HELD_ELSEWHERE,
        ),
        (
            "peer_elsewhere",
            "peer not in the namespace",
            "Sockets whose peer is not in their network namespace.",
            bypass_stat::BYPASS_STAT_NOT_LOCAL,
        ),
        (
            "data_before_insertion",
            "data before insertion",
            "Sockets left out because bytes crossed TCP first (Fast Open).",
            bypass_stat::BYPASS_STAT_DATA_BEFORE,
        ),
        (
            "splice_reader_sockets",
            "splice reader's sockets",
            "Sockets of programs that read with splice, left out.",
            bypass_stat::BYPASS_STAT_SPLICE_READER,
        ),
        (
            "splice_readers_learned",
            "splice readers learned",
            "Programs seen splicing a socket in the map, kept out from then on.",
            bypass_stat::BYPASS_STAT_SPLICERS_LEARNED,
        ),
        (
            "splice_after_redirect",
            "splices after redirects",
            "First splices of sockets to which messages were already redirected: those messages are lost to the reader.",
            bypass_stat::BYPASS_STAT_SPLICE_TOO_LATE,
        ),
        (
            "other_port",
            "other ports",
            "Sockets outside the -P ports.",
            bypass_stat::BYPASS_STAT_OTHER_PORT,
        ),
        (
            "established_while_stopping",
            "established while stopping",
            "Sockets established while bypass was stopping.",
            bypass_stat::BYPASS_STAT_STOPPING,
        ),
        (
            "messages_redirected",
            "messages redirected",
            "Messages moved straight to the peer socket.",
            bypass_stat::BYPASS_STAT_MSG_REDIRECTED,
        ),
        (
            "bytes_redirected",
            "bytes redirected",
            "Bytes moved straight to the peer socket.",
            bypass_stat::BYPASS_STAT_BYTES_REDIRECTED,
        ),
        (
            "messages_passed",
            "messages passed",
            "Messages of inserted sockets sent the normal way.",
            bypass_stat::BYPASS_STAT_MSG_PASSED,
        ),
        (
            "messages_peer_behind",
            "passed, peer behind",
            "Messages passed because the peer had not yet read with recv every byte sent before over TCP.",
            bypass_stat::BYPASS_STAT_MSG_PEER_BEHIND,
        ),
        (
            "bytes_passed",
            "bytes passed",
            "Bytes of inserted sockets sent the normal way.",
            bypass_stat::BYPASS_STAT_BYTES_PASSED,
        ),
        (
            "recv_readers_learned",
            "recv readers learned",
            "Programs seen reading a socket in the map with recv: their later sockets take the bypass from the first byte.",
            bypass_stat::BYPASS_STAT_RECV_READERS_LEARNED,
        ),
        (
            "known_reader_sockets",
            "sockets of known recv readers",
            "Sockets of programs known to read with recv, redirected to from the first byte.",
            bypass_stat::BYPASS_STAT_KNOWN_READER,
        ),
        (
            "across_waiting",
            "across namespaces: first ends",
            "Sockets whose peer is in another namespace, seen established first, waiting for the other end.",
            bypass_stat::BYPASS_STAT_ACROSS_WAITING,
        ),
        (
            "across_paired",
            "across namespaces: pairs proven",
            "Pairs of sockets in two namespaces of this host proven to be one connection.",
            bypass_stat::BYPASS_STAT_ACROSS_PAIRED,
        ),
        (
            "across_unproven",
            "across namespaces: no other end here",
            "First ends whose other end never proved itself (a remote peer, NAT on the way): left alone.",
            bypass_stat::BYPASS_STAT_ACROSS_UNPROVEN,
        ),
        (
            "across_mismatch",
            "across namespaces: proofs that failed",
            "Second ends whose sequence numbers did not mirror the first's: neither paired.",
            bypass_stat::BYPASS_STAT_ACROSS_MISMATCH,
        ),
        (
            "across_ambiguous",
            "across namespaces: ambiguous connections",
            "Sockets claiming a connection another socket claimed at the same time: none paired.",
            bypass_stat::BYPASS_STAT_ACROSS_AMBIGUOUS,
        ),
        (
            "repair_sockets",
            "TCP_REPAIR sockets",
            "Sockets in repair mode (checkpoint/restore), left out.",
            bypass_stat::BYPASS_STAT_REPAIR,
        ),
        (
            "ulp_sockets",
            "sockets with a ULP",
            "Sockets with an upper layer protocol (MPTCP subflows, kTLS), left out.",
            bypass_stat::BYPASS_STAT_ULP,
        ),
        (
            "messages_ulp",
            "passed, socket got a ULP",
            "Messages of sockets that got an upper layer protocol (kTLS) after insertion, passed.",
            bypass_stat::BYPASS_STAT_MSG_ULP,
        ),
        (
            "messages_across",
            "messages redirected across namespaces",
            "Messages moved straight to a peer socket in another namespace.",
            bypass_stat::BYPASS_STAT_MSG_ACROSS,
        ),
        (
            "bytes_across",
            "bytes redirected across namespaces",
            "Bytes moved straight to a peer socket in another namespace.",
            bypass_stat::BYPASS_STAT_BYTES_ACROSS,
        ),
        (
            "events_lost",
            "events lost",
            "Events dropped because the ring buffer was full.",
            bypass_stat::BYPASS_STAT_EVENTS_LOST,
        ),
    ];
    let mut snapshot = Snapshot::new("bypass");
    snapshot.push_counters(rows.map(|(name, label, help, stat)| (name, label, help, count(stat))));
    snapshot.push(Metric::gauge(
        "sockets",
        "sockets in the map at exit",
        "Sockets in the sockmaps now.",
        (maps::count(&skel.maps.sockets)? + maps::count(&skel.maps.paired)?) as u64,
    ));
    Ok(snapshot)
}

fn print_statistics(skel: &BypassSkel<'_>) -> Result<()> {
    out!("=== Statistics ===");
    snapshot(skel)?.print();
    Ok(())
}
