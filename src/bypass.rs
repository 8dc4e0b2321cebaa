//! `proxy-redirect bypass`: TCP between two sockets of this host skips the
//! TCP/IP stack. sockops puts sockets whose two ends are local into a
//! SOCKHASH; an sk_msg program moves each message into the peer socket's
//! receive queue.

use std::collections::HashSet;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags};
use nix::sys::socket::{self as nixsock, AddressFamily, SockFlag, SockProtocol, SockType};

use crate::bpf::bypass::types::{bypass_event, bypass_side, bypass_stat, endpoint, sock_key};
use crate::bpf::bypass::{BypassSkel, BypassSkelBuilder};
use crate::cgroup::{self, CgroupFd};
use crate::cli::{self, EventFormat, OutputArgs, PortList};
use crate::links::Attachments;
use crate::{events, maps, privileges, redirect, shutdown};

// SAFETY: generated from include/*.h: fixed-width integers with explicit padding.
unsafe impl plain::Plain for bypass_event {}
unsafe impl plain::Plain for endpoint {}
unsafe impl plain::Plain for sock_key {}

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  # Every same-host TCP connection of a service skips the TCP/IP stack
  proxy-redirect bypass -c system.slice/app.service -v
  # Only connections to or from ports 6379 and 5432, events as JSON
  proxy-redirect bypass -c app -P 6379,5432 --json

A socket enters the bypass only when both ends are addresses of this host
(loopback or an address of an interface, followed while running) in the
network namespace bypass runs in. Applications see ordinary TCP sockets; on
exit every connection goes back to the normal path without losing a byte.")]
pub struct BypassArgs {
    /// cgroup whose sockets may take the bypass: absolute, or relative to the
    /// cgroup2 mount [default: the cgroup2 root, i.e. the whole host]
    #[arg(short, long, value_name = "CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Only connections with one of these ports (either end), comma-separated
    /// [default: every port]
    #[arg(short = 'P', long, value_name = "PORTS", value_parser = cli::parse_port_list)]
    pub ports: Option<PortList>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(args: &BypassArgs) -> Result<()> {
    let cgroup_path = cgroup::resolve(args.cgroup.as_deref())?;
    privileges::require_bpf("bypass")?;
    shutdown::install()?;

    let mut open_object = MaybeUninit::uninit();
    let mut skel = load(args, &mut open_object)?;
    let mut local = LocalAddresses::new()?;
    local.refresh(&skel.maps.local_addrs)?;

    let cgroup = CgroupFd::open(&cgroup_path)?;
    // The map holds the sk_msg program (released with the map when this
    // process exits); sockops comes second, so that no socket enters the
    // map before its messages can be redirected.
    skel.progs
        .bypass_msg
        .attach_sockmap(skel.maps.sockets.as_fd().as_raw_fd())
        .context("attaching bypass_msg to the sockets map")?;
    let mut attachments = Attachments::default();
    attachments.attach_cgroup(&skel.progs.bypass_sockops, &cgroup)?;

    println!("Bypassing same-host TCP");
    println!("  cgroup:            {}", cgroup_path.display());
    match &args.ports {
        Some(ports) => println!("  ports:             {ports}"),
        None => println!("  ports:             all"),
    }
    println!("  local addresses:   {}", local.describe());
    println!("Attached 2 programs; press Ctrl-C to stop");

    let format = args.output.event_format();
    let start_ns = events::monotonic_ns();
    let header = format!(
        "{:>12} {:<8} {:<8} {:<8} CONNECTION",
        "TIME(s)", "ACTION", "SIDE", "COOKIE"
    );
    let ring = events::stream(
        &skel.maps.events,
        format,
        &header,
        move |e: &bypass_event| print_event(e, format, start_ns),
    )?;
    let mut refresh_error = None;
    events::run_until_shutdown(ring.as_ref(), || {
        if local.changed() {
            if let Err(err) = local.refresh(&skel.maps.local_addrs) {
                refresh_error.get_or_insert(err);
            }
        }
    })?;
    drop(ring);
    if let Some(err) = refresh_error {
        tracing::warn!("keeping the local addresses current failed: {err:#}");
    }

    stop(&mut skel);
    print_statistics(&skel)?;
    drop(attachments);
    println!("Cleaned up");
    Ok(())
}

fn load<'obj>(
    args: &BypassArgs,
    open_object: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
) -> Result<BypassSkel<'obj>> {
    let mut open = BypassSkelBuilder::default()
        .open(open_object)
        .context("opening the bypass BPF object")?;
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .context("the bypass object has no .rodata")?;
    rodata.netns_cookie = current_netns_cookie()?;
    rodata.filter_ports = args.ports.is_some().into();
    rodata.emit_events = (args.output.event_format() != EventFormat::Off).into();
    let skel = open.load().context("loading the bypass BPF programs")?;
    for port in args.ports.iter().flat_map(|p| &p.0) {
        maps::update(&skel.maps.ports, port, &1u8)?;
    }
    Ok(skel)
}

/// The cookie of the network namespace this process runs in, which the
/// sockops program compares with each socket's.
fn current_netns_cookie() -> Result<u64> {
    let socket = nixsock::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a socket to read the network namespace cookie")?;
    crate::sockopt::netns_cookie(socket.as_raw_fd())
        .context("reading SO_NETNS_COOKIE (bypass needs Linux 5.15 or later)")
}

/// Sends every bypassed connection back to the normal path. Entries are
/// never deleted: removing a socket from the map frees the messages already
/// redirected to it and not yet read. Each socket's psock keeps the sk_msg
/// program, and with it the map and this flag, until the socket closes;
/// the receiver reads its queued messages first, then what arrives over
/// TCP, so nothing is lost or reordered. After SIGKILL the flag stays unset
/// and connections already bypassed keep the bypass until they close.
fn stop(skel: &mut BypassSkel<'_>) {
    if let Some(bss) = skel.maps.bss_data.as_deref_mut() {
        // SAFETY: a u32 in the mmap'ed .bss, read by the programs with READ_ONCE.
        unsafe { std::ptr::write_volatile(&mut bss.stopping, 1) };
    }
}

/// This host's addresses in the `local_addrs` map, refreshed when rtnetlink
/// reports an address change.
struct LocalAddresses {
    netlink: OwnedFd,
    current: HashSet<IpAddr>,
    dirty: bool,
    last_refresh: Instant,
}

impl LocalAddresses {
    fn new() -> Result<Self> {
        let netlink = nixsock::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )
        .context("opening an rtnetlink socket")?;
        let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        nixsock::bind(netlink.as_raw_fd(), &nixsock::NetlinkAddr::new(0, groups))
            .context("subscribing to address changes")?;
        Ok(Self {
            netlink,
            current: HashSet::new(),
            dirty: true,
            last_refresh: Instant::now(),
        })
    }

    /// True when an address may have been added or removed since the last
    /// refresh (and every 10 s, in case a notification was lost).
    fn changed(&mut self) -> bool {
        let mut buffer = [0u8; 8192];
        loop {
            match nixsock::recv(
                self.netlink.as_raw_fd(),
                &mut buffer,
                nixsock::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(_) => self.dirty = true,
                // ENOBUFS: notifications were lost; re-read everything.
                Err(nix::errno::Errno::ENOBUFS) => self.dirty = true,
                Err(_) => break,
            }
        }
        self.dirty || self.last_refresh.elapsed() > Duration::from_secs(10)
    }

    fn refresh(&mut self, map: &dyn MapCore) -> Result<()> {
        self.dirty = false;
        self.last_refresh = Instant::now();
        let mut now = HashSet::new();
        for interface in nix::ifaddrs::getifaddrs().context("listing the host's addresses")? {
            let Some(address) = interface.address else {
                continue;
            };
            if let Some(v4) = address.as_sockaddr_in() {
                now.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = address.as_sockaddr_in6() {
                now.insert(IpAddr::V6(v6.ip()));
            }
        }
        for gone in self.current.difference(&now) {
            let key = address_key(*gone);
            // SAFETY: endpoint is Plain.
            let _ = map.delete(unsafe { plain::as_bytes(&key) });
        }
        for added in now.difference(&self.current) {
            let key = address_key(*added);
            // SAFETY: endpoint and u8 are Plain.
            map.update(unsafe { plain::as_bytes(&key) }, &[1], MapFlags::ANY)
                .with_context(|| format!("adding local address {added}"))?;
        }
        self.current = now;
        Ok(())
    }

    fn describe(&self) -> String {
        let mut addrs: Vec<String> = self.current.iter().map(IpAddr::to_string).collect();
        addrs.sort();
        format!("loopback, {}", addrs.join(", "))
    }
}

/// The `local_addrs` key of an address: an endpoint with port 0.
fn address_key(ip: IpAddr) -> endpoint {
    match ip.to_canonical() {
        IpAddr::V4(v4) => endpoint {
            ip: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            port: 0,
            family: libc::AF_INET as u16,
        },
        IpAddr::V6(v6) => {
            let o = v6.octets();
            endpoint {
                ip: std::array::from_fn(|i| {
                    u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap())
                }),
                port: 0,
                family: libc::AF_INET6 as u16,
            }
        }
    }
}

fn endpoint_addr(ep: &endpoint) -> SocketAddr {
    // The same include/addr.h struct, generated into the redirect skeleton.
    redirect::endpoint_addr(&crate::bpf::redirect::types::endpoint {
        ip: ep.ip,
        port: ep.port,
        family: ep.family,
    })
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
    let local = endpoint_addr(&event.key.local);
    let remote = endpoint_addr(&event.key.remote);
    let side = side_name(event.side);
    let error = (event.error != 0).then(|| std::io::Error::from_raw_os_error(-event.error));
    let action = if error.is_some() { "FAILED" } else { "INSERT" };
    match format {
        EventFormat::Off => {}
        EventFormat::Text => {
            let why = error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            println!(
                "{seconds:12.3} {action:<8} {side:<8} [{}] {local} -> {remote}{why}",
                event.cookie
            );
        }
        EventFormat::Json => {
            let record = serde_json::json!({
                "time": seconds,
                "action": action.to_lowercase(),
                "side": side,
                "cookie": event.cookie,
                "local": local.to_string(),
                "remote": remote.to_string(),
                "error": error.map(|e| e.to_string()),
            });
            println!("{record}");
        }
    }
}

fn print_statistics(skel: &BypassSkel<'_>) -> Result<()> {
    let counts = maps::percpu_sums(&skel.maps.stats, bypass_stat::BYPASS_STAT_COUNT.0)?;
    let count = |stat: bypass_stat| counts[stat.0 as usize];
    let rows = [
        (
            "established sockets seen",
            bypass_stat::BYPASS_STAT_ESTABLISHED,
        ),
        ("inserted", bypass_stat::BYPASS_STAT_INSERTED),
        ("insert failures", bypass_stat::BYPASS_STAT_INSERT_FAILED),
        ("not local", bypass_stat::BYPASS_STAT_NOT_LOCAL),
        (
            "other network namespace",
            bypass_stat::BYPASS_STAT_OTHER_NETNS,
        ),
        ("other ports", bypass_stat::BYPASS_STAT_OTHER_PORT),
        (
            "established while stopping",
            bypass_stat::BYPASS_STAT_STOPPING,
        ),
        (
            "messages redirected",
            bypass_stat::BYPASS_STAT_MSG_REDIRECTED,
        ),
        (
            "bytes redirected",
            bypass_stat::BYPASS_STAT_BYTES_REDIRECTED,
        ),
        ("messages passed", bypass_stat::BYPASS_STAT_MSG_PASSED),
        ("bytes passed", bypass_stat::BYPASS_STAT_BYTES_PASSED),
        ("events lost", bypass_stat::BYPASS_STAT_EVENTS_LOST),
    ];
    println!("=== Statistics ===");
    for (label, stat) in rows {
        println!("  {:<28}{}", format!("{label}:"), count(stat));
    }
    println!(
        "  {:<28}{}",
        "sockets in the map at exit:",
        skel.maps.sockets.keys().count()
    );
    Ok(())
}
