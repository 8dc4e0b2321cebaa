//! `proxy-redirect redirect`: cgroup connect4/connect6 send outbound TCP
//! connections to a local proxy; sockops and cgroup getsockopt let the proxy
//! read the original destination with `SO_ORIGINAL_DST`; getpeername4/6 tell
//! the client the peer it dialled. With `--udp-ports`, sendmsg4/6 and
//! recvmsg4/6 do the same for UDP, relayed by `udp_relay`.

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::MapCore;

use crate::bpf::maps;
use crate::bpf::redirect::types::{
    bypass_reason, cidr_v4_key, cidr_v6_key, conn_tuple, endpoint, handover_key, pending_record,
    proxy_down_policy, redirect_action, redirect_event, redirect_stat, refusal_key, refusal_reason,
};
use crate::bpf::redirect::{RedirectSkel, RedirectSkelBuilder};
use crate::bpf::{Endpoint as _, OwnedSkel};
use crate::cli::{self, Cidr, EventFormat, OutputArgs, PortList};
use crate::relay::tcp::{BoundProxy, ProxyConfig, RelayArgs, RunningProxy};
use crate::relay::udp::{BoundUdpRelay, UdpRelay, UdpRelayConfig};
use crate::runtime::Relay;
use crate::runtime::{Datapath, EventSource, RunContext};
use crate::sys::cgroup::{self, CgroupFd};
use crate::sys::links::{self, Attachments};
use crate::sys::pins::{self, PinDir};
use crate::sys::privileges;
use crate::sys::sockopt;
use crate::telemetry::events::comm_to_string;
use crate::telemetry::stats::{Metric, Snapshot};
use crate::{err_out, out};

// SAFETY: generated from include/*.h: fixed-width integers with explicit padding.
unsafe impl plain::Plain for redirect_event {}
unsafe impl plain::Plain for endpoint {}
unsafe impl plain::Plain for conn_tuple {}
unsafe impl plain::Plain for handover_key {}
unsafe impl plain::Plain for pending_record {}
unsafe impl plain::Plain for refusal_key {}
unsafe impl plain::Plain for cidr_v4_key {}
unsafe impl plain::Plain for cidr_v6_key {}

#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  # Send a container's web traffic to Envoy on 127.0.0.1:15001
  proxy-redirect redirect -c system.slice/app.service --no-proxy -v
  # Built-in proxy, skip the proxy's own user and the internal network
  proxy-redirect redirect -c app -P 80,443,8080 -u proxyuser --exclude 10.0.0.0/8

The proxy reads each connection's original destination with
getsockopt(SOL_IP, SO_ORIGINAL_DST) or getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST),
exactly as after iptables REDIRECT. Nothing stays attached after exit.")]
pub struct RedirectArgs {
    /// cgroup whose connections are redirected: absolute, or relative to the
    /// cgroup2 mount [default: the cgroup2 root, i.e. the whole host]
    #[arg(short, long, value_name = "CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// cgroup where the proxy's SO_ORIGINAL_DST calls are answered; it must
    /// contain the proxy. Every connection there runs a short program
    /// [default: this process's cgroup for the built-in proxy, the cgroup2
    /// root with --no-proxy]
    #[arg(long, value_name = "CGROUP")]
    pub sockopt_cgroup: Option<PathBuf>,
    /// Destination ports to redirect, comma-separated
    #[arg(short = 'P', long, value_name = "PORTS", default_value = "80,443",
          value_parser = cli::parse_port_list)]
    pub ports: PortList,
    /// UDP destination ports to redirect, comma-separated (53 for DNS)
    /// [default: none, UDP is left alone]
    #[arg(long, value_name = "PORTS", value_parser = cli::parse_port_list)]
    pub udp_ports: Option<PortList>,
    /// Seconds after which the built-in proxy closes a UDP flow that
    /// carried nothing either way
    #[arg(long, value_name = "SECONDS", default_value = "30",
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub udp_idle_timeout: u64,
    /// Proxy address; give it twice for one IPv4 and one IPv6 address
    /// [default: 127.0.0.1 and ::1]
    #[arg(short = 'i', long = "proxy-ip", value_name = "IP")]
    pub proxy_ips: Vec<IpAddr>,
    /// Proxy port
    #[arg(short = 'p', long, value_name = "PORT", default_value = "15001",
          value_parser = cli::parse_port)]
    pub proxy_port: u16,
    /// User (name or uid) whose connections are never redirected
    #[arg(short = 'u', long = "exclude-user", value_name = "USER")]
    pub exclude_user: Option<String>,
    /// Redirect only destinations in these networks (repeatable)
    #[arg(long = "include", value_name = "CIDR", value_parser = cli::parse_cidr)]
    pub include: Vec<Cidr>,
    /// Never redirect destinations in these networks (repeatable)
    #[arg(long = "exclude", value_name = "CIDR", value_parser = cli::parse_cidr)]
    pub exclude: Vec<Cidr>,
    /// Sockets with this mark are never redirected (the built-in proxy marks
    /// its upstream connections with it)
    #[arg(long, default_value = "0x5052", value_parser = cli::parse_mark)]
    pub mark: u32,
    /// Do not run the built-in proxy; an external one listens on the proxy address
    #[arg(long)]
    pub no_proxy: bool,
    /// When nothing listens on the proxy address: `open` lets connections go
    /// to their original destination, `closed` fails them with ECONNREFUSED
    /// (no traffic ever goes around the proxy)
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = ProxyDown::Open)]
    pub when_proxy_down: ProxyDown,
    #[command(flatten)]
    pub relay: RelayArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyDown {
    Open,
    Closed,
}

/// Everything resolved and checked before anything is attached.
#[derive(Debug, Clone)]
struct Plan {
    cgroup: PathBuf,
    sockopt_cgroup: PathBuf,
    proxy_v4: SocketAddr,
    proxy_v6: SocketAddr,
    excluded_uid: Option<u32>,
}

/// `answering`: the sockopt cgroup when `--sockopt-cgroup` is not given
/// (not called when it is).
fn plan(args: &RedirectArgs, answering: impl FnOnce() -> Result<PathBuf>) -> Result<Plan> {
    let (proxy_v4, proxy_v6) = cli::proxy_addresses(&args.proxy_ips, args.proxy_port, "-i")?;
    let excluded_uid = args
        .exclude_user
        .as_deref()
        .map(cli::resolve_user)
        .transpose()?;
    Ok(Plan {
        cgroup: cgroup::resolve(args.cgroup.as_deref())?,
        sockopt_cgroup: match &args.sockopt_cgroup {
            Some(path) => cgroup::resolve(Some(path))?,
            None => answering()?,
        },
        proxy_v4,
        proxy_v6,
        excluded_uid,
    })
}

/// Everything `prepare` would check, without changing the system.
pub fn check(args: &RedirectArgs) -> Result<()> {
    let plan = plan(args, || default_sockopt_cgroup(args, false, None))?;
    privileges::require_bpf("redirect")?;
    for (cgroup, attach_type, hook) in hooks(args, &plan) {
        links::check_cgroup_hook(cgroup, attach_type, hook)?;
    }
    Ok(())
}

/// Where SO_ORIGINAL_DST is answered when `--sockopt-cgroup` is not given:
/// an external proxy may run anywhere, the built-in one runs in this
/// process's cgroup, so that the host's other connections never run the
/// proxy-side programs. Listening sockets taken over from a predecessor
/// (`inherited`) stay in the cgroup they were made in, which the cgroup of
/// the predecessor's pinned link holds (after a reload, this process's
/// own link, at the cgroup it chose then).
fn default_sockopt_cgroup(
    args: &RedirectArgs,
    inherited: bool,
    pins: Option<&PinDir>,
) -> Result<PathBuf> {
    if args.no_proxy {
        return cgroup::resolve(None);
    }
    let own = cgroup::own()?;
    if !inherited {
        return Ok(own);
    }
    let pinned = pins.and_then(|pins| links::pinned_cgroup_id(&pins.link("redirect_getsockopt")));
    if let Some(predecessors) = pinned.and_then(cgroup::find_by_id) {
        return Ok(cgroup::common_ancestor(&own, &predecessors));
    }
    // Only the whole hierarchy surely holds them; inside a cgroup
    // namespace the mount's root is not that.
    let root = cgroup::resolve(None)?;
    if cgroup::is_hierarchy_root(&root) {
        return Ok(root);
    }
    let predecessors = match pinned {
        Some(id) => format!("cgroup id {id}, not under {}", root.display()),
        None => "a cgroup no pinned link names".to_owned(),
    };
    bail!(
        "the proxy's sockets taken over were made in {predecessors}, where SO_ORIGINAL_DST \
         must be answered: set sockopt-cgroup to a cgroup that holds both services"
    )
}

/// Whether the built-in proxy's sockets came from a predecessor.
fn inherited_proxy_sockets(ctx: &RunContext, plan: &Plan) -> bool {
    use crate::sys::handover::{tcp_listener_role, udp_socket_role};
    let ours: Vec<String> = [plan.proxy_v4, plan.proxy_v6]
        .into_iter()
        .flat_map(|addr| [tcp_listener_role(addr, false), udp_socket_role(addr)])
        .collect();
    ctx.inheritance
        .taken()
        .iter()
        .any(|role| ours.contains(role))
}

/// Every cgroup hook redirect attaches to, as (cgroup, attach type, name).
fn hooks<'a>(
    args: &RedirectArgs,
    plan: &'a Plan,
) -> Vec<(
    &'a std::path::Path,
    libbpf_sys::bpf_attach_type,
    &'static str,
)> {
    use libbpf_sys::*;
    let (apps, sockopt) = (plan.cgroup.as_path(), plan.sockopt_cgroup.as_path());
    let mut hooks = vec![
        (apps, BPF_CGROUP_INET4_CONNECT, "connect4"),
        (apps, BPF_CGROUP_INET6_CONNECT, "connect6"),
        (apps, BPF_CGROUP_SOCK_OPS, "sockops"),
        (apps, BPF_CGROUP_INET4_GETPEERNAME, "getpeername4"),
        (apps, BPF_CGROUP_INET6_GETPEERNAME, "getpeername6"),
        (sockopt, BPF_CGROUP_SOCK_OPS, "sockops"),
        (sockopt, BPF_CGROUP_GETSOCKOPT, "getsockopt"),
    ];
    if args.udp_ports.is_some() {
        hooks.extend([
            (apps, BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"),
            (apps, BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"),
            (apps, BPF_CGROUP_UDP4_RECVMSG, "recvmsg4"),
            (apps, BPF_CGROUP_UDP6_RECVMSG, "recvmsg6"),
        ]);
        if !args.no_proxy {
            hooks.extend([
                (sockopt, BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"),
                (sockopt, BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"),
                (sockopt, BPF_CGROUP_UDP4_RECVMSG, "recvmsg4"),
                (sockopt, BPF_CGROUP_UDP6_RECVMSG, "recvmsg6"),
            ]);
        }
    }
    hooks
}

/// Cilium's socket load balancer at the same cgroups rewrites service
/// addresses in connect() before our program sees them, so a sidecar
/// never learns the service its client asked for.
fn warn_about_cilium(plan: &Plan) {
    for attach_type in [
        libbpf_sys::BPF_CGROUP_INET4_CONNECT,
        libbpf_sys::BPF_CGROUP_INET6_CONNECT,
    ] {
        let Ok(neighbours) = links::cgroup_neighbours(&plan.cgroup, attach_type) else {
            continue;
        };
        if let Some(cilium) = neighbours.iter().find(|n| n.name.starts_with("cil_sock")) {
            err_out!(
                "warning: Cilium's socket load balancer (program {} '{}' at {}) rewrites \
                 service addresses before redirect sees them; next to sidecars Cilium needs \
                 socketLB.hostNamespaceOnly=true",
                cilium.id,
                cilium.name,
                cilium.cgroup.display()
            );
            return;
        }
    }
}

/// The redirect datapath: its programs, where they are attached, and the
/// built-in proxy.
pub struct Redirect {
    args: RedirectArgs,
    plan: Plan,
    skel: OwnedSkel<RedirectSkel<'static>>,
    attachments: Attachments,
    /// Bound by prepare(), started by attach().
    bound: Option<(BoundProxy, Option<BoundUdpRelay>)>,
    proxy: Option<RunningProxy>,
    udp_relay: Option<UdpRelay>,
    /// Under `run --config`: the links a crash leaves attached, so that
    /// `--when-proxy-down` keeps deciding while no process runs.
    pins: Option<PinDir>,
    /// When sweep_idle_shares last ran.
    last_sweep: std::time::Instant,
    /// Whether the built-in proxy's sockets came from a predecessor, for
    /// where a configuration that names no sockopt cgroup answers.
    inherited: bool,
}

impl Redirect {
    pub fn prepare(args: &RedirectArgs, ctx: &RunContext) -> Result<Redirect> {
        // Where a default answers depends on where the proxy's sockets come
        // from: decided once they are bound.
        let mut plan = plan(args, || cgroup::resolve(None))?;
        privileges::require_bpf("redirect")?;
        warn_about_cilium(&plan);
        let bound = if args.no_proxy {
            None
        } else {
            let config = ProxyConfig::new(args.mark, false, &args.relay);
            let addrs = [plan.proxy_v4, plan.proxy_v6];
            let proxy = BoundProxy::bind(&addrs, config, &ctx.inheritance)?;
            let udp_relay = args
                .udp_ports
                .as_ref()
                .map(|_| BoundUdpRelay::bind(&addrs, &ctx.inheritance))
                .transpose()?;
            Some((proxy, udp_relay))
        };
        let listeners = bound
            .as_ref()
            .map(|(proxy, _)| proxy.listener_fds())
            .unwrap_or_default();
        // The records go on from one process to the next: connections
        // waiting in a handed-over accept queue, and clients between their
        // connect() and the proxy's accept, find theirs.
        let mut pins = ctx.pin_dir("redirect", layout())?;
        let inherited = inherited_proxy_sockets(ctx, &plan);
        if args.sockopt_cgroup.is_none() {
            plan.sockopt_cgroup = default_sockopt_cgroup(args, inherited, pins.as_ref())?;
        }
        let skel =
            OwnedSkel::load(|object| load(args, &plan, &listeners, ctx, pins.as_mut(), object))?;
        if let Some(pins) = &pins {
            pins.report("records and links", "records");
        }
        Ok(Redirect {
            args: args.clone(),
            plan,
            skel,
            attachments: Attachments::default(),
            bound,
            proxy: None,
            udp_relay: None,
            pins,
            last_sweep: std::time::Instant::now(),
            inherited,
        })
    }

    /// Attaches every program for `args` to its cgroup; under a service,
    /// into the links an earlier run pinned.
    fn attach_programs(&mut self, args: &RedirectArgs, plan: &Plan) -> Result<Attachments> {
        let progs = &self.skel.progs;
        let mut attachments = Attachments::default();
        let mut pinned = Vec::new();
        // sockops and getsockopt first: no connection may be redirected
        // before its original destination can be re-keyed and answered.
        let cgroup = CgroupFd::open(&plan.cgroup)?;
        let sockopt_cgroup = CgroupFd::open(&plan.sockopt_cgroup)?;
        let mut order = vec![
            (&progs.redirect_sockops, &cgroup),
            (&progs.redirect_proxy_sockops, &sockopt_cgroup),
            (&progs.redirect_getsockopt, &sockopt_cgroup),
            (&progs.redirect_getpeername4, &cgroup),
            (&progs.redirect_getpeername6, &cgroup),
        ];
        if args.udp_ports.is_some() {
            // Replies are shown from the original before any datagram leaves.
            order.extend([
                (&progs.redirect_recvmsg4, &cgroup),
                (&progs.redirect_recvmsg6, &cgroup),
            ]);
            if !args.no_proxy {
                order.extend([
                    (&progs.redirect_proxy_recvmsg4, &sockopt_cgroup),
                    (&progs.redirect_proxy_recvmsg6, &sockopt_cgroup),
                    (&progs.redirect_proxy_sendmsg4, &sockopt_cgroup),
                    (&progs.redirect_proxy_sendmsg6, &sockopt_cgroup),
                ]);
            }
            order.extend([
                (&progs.redirect_sendmsg4, &cgroup),
                (&progs.redirect_sendmsg6, &cgroup),
            ]);
        }
        order.extend([
            (&progs.redirect_connect4, &cgroup),
            (&progs.redirect_connect6, &cgroup),
        ]);
        for (program, cgroup) in order {
            let name = program.name().to_string_lossy().into_owned();
            let pin = self.pins.as_ref().map(|pins| pins.link(&name));
            attachments.attach_cgroup(program, cgroup, pin.as_deref())?;
            pinned.push(name);
        }
        if let Some(pins) = &mut self.pins {
            let names: Vec<&str> = pinned.iter().map(String::as_str).collect();
            let maps = &self.skel.maps;
            let records: Vec<(&str, &dyn MapCore)> = record_maps!(maps, &)
                .into_iter()
                .map(|(name, map)| (name, map as &dyn MapCore))
                .collect();
            pins.commit(&records, &names)?;
        }
        Ok(attachments)
    }
}

/// The maps whose contents outlive a process under a service, by name:
/// the records and the counters (the rest is configuration, set anew by
/// every start).
macro_rules! record_maps {
    ($maps:expr, $($borrow:tt)+) => {
        [
            ("client_orig_dst", $($borrow)+ $maps.client_orig_dst),
            ("pending_orig_dst", $($borrow)+ $maps.pending_orig_dst),
            ("pending_overflow", $($borrow)+ $maps.pending_overflow),
            ("pending_per_netns", $($borrow)+ $maps.pending_per_netns),
            ("pending_per_uid", $($borrow)+ $maps.pending_per_uid),
            ("pending_refusals", $($borrow)+ $maps.pending_refusals),
            ("refused_orig_dst", $($borrow)+ $maps.refused_orig_dst),
            ("udp_last_send", $($borrow)+ $maps.udp_last_send),
            ("proxy_answer", $($borrow)+ $maps.proxy_answer),
            ("udp_relay_slots", $($borrow)+ $maps.udp_relay_slots),
            ("stats", $($borrow)+ $maps.stats),
        ]
    };
}
use record_maps;

/// How often the share counts left at 0 are removed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Removes the share counts that give_back_share left at 0, so that
/// namespaces and users that come and go leave nothing behind.
fn sweep_idle_shares(skel: &RedirectSkel<'_>) {
    let maps: [&dyn MapCore; 2] = [&skel.maps.pending_per_netns, &skel.maps.pending_per_uid];
    for map in maps {
        for key in map.keys() {
            let idle = map
                .lookup(&key, libbpf_rs::MapFlags::ANY)
                .is_ok_and(|value| value.is_some_and(|v| v.iter().all(|b| *b == 0)));
            if idle {
                let _ = map.delete(&key);
            }
        }
    }
}

/// The hash of the headers that define redirect's maps.
fn layout() -> u64 {
    pins::layout_hash(&[
        include_str!("../../include/redirect.h"),
        include_str!("../../include/addr.h"),
    ])
}

/// What a reload may change while redirect runs, applied in place.
impl Redirect {
    fn plan_for(&self, new: &RedirectArgs) -> Result<Plan> {
        plan(new, || {
            default_sockopt_cgroup(new, self.inherited, self.pins.as_ref())
        })
    }

    pub fn check_reload(&self, new: &RedirectArgs) -> Result<()> {
        fixed_while_running(&self.args, new, &self.plan, &self.plan_for(new)?)
    }

    pub fn reload(&mut self, new: &RedirectArgs, _ctx: &RunContext) -> Result<()> {
        self.check_reload(new)?;
        let plan = self.plan_for(new)?;
        // The new attachments come first, so that no connection passes
        // unredirected in between.
        if plan.cgroup != self.plan.cgroup || plan.sockopt_cgroup != self.plan.sockopt_cgroup {
            let attachments = self.attach_programs(new, &plan)?;
            self.attachments = attachments;
        }
        let maps = &self.skel.maps;
        maps::sync_flags(
            &maps.redirect_ports,
            &port_indexes(Some(&self.args.ports)),
            &port_indexes(Some(&new.ports)),
        )?;
        maps::sync_flags(
            &maps.redirect_udp_ports,
            &port_indexes(self.args.udp_ports.as_ref()),
            &port_indexes(new.udp_ports.as_ref()),
        )?;
        set_filters(&mut self.skel, new, &plan)?;
        self.args = new.clone();
        self.plan = plan;
        Ok(())
    }
}

impl Datapath for Redirect {
    fn name(&self) -> String {
        "redirect".into()
    }

    fn attach(&mut self, ctx: &RunContext) -> Result<()> {
        let (args, plan) = (self.args.clone(), self.plan.clone());
        self.attachments = self.attach_programs(&args, &plan)?;
        print_configuration(&self.args, &self.plan);
        if let Some((proxy, udp_relay)) = self.bound.take() {
            let proxy = proxy.start_on(ctx.proxy_runtime()?)?;
            if let Some(relay) = udp_relay {
                let slots = libbpf_rs::MapHandle::try_from(&self.skel.maps.udp_relay_slots)
                    .context("sharing the udp_relay_slots map with the relay")?;
                let config = UdpRelayConfig {
                    mark: self.args.mark,
                    idle_timeout: Duration::from_secs(self.args.udp_idle_timeout),
                    events: ctx.format,
                    start_ns: ctx.start_ns,
                };
                let relay = relay.start(&slots, config, &ctx.inheritance)?;
                let (max, share) = relay.flow_limits();
                out!("  UDP flows:         at most {max}, {share} per user");
                self.udp_relay = Some(relay);
            }
            self.proxy = Some(proxy);
        }
        out!(
            "Attached {} programs; press Ctrl-C to stop",
            self.attachments.len()
        );
        Ok(())
    }

    fn attach_mode(&self) -> String {
        "cgroup bpf_link".into()
    }

    fn tick(&mut self, _ctx: &RunContext) {
        if self.last_sweep.elapsed() >= SWEEP_INTERVAL {
            self.last_sweep = std::time::Instant::now();
            sweep_idle_shares(&self.skel);
        }
    }

    fn events(&self, ctx: &RunContext) -> Result<Option<EventSource>> {
        let header = format!(
            "{:>12} {:<8} {:<16} {:<8} CONNECTION",
            "TIME(s)", "ACTION", "PROCESS", "COOKIE"
        );
        let (format, start_ns) = (ctx.format, ctx.start_ns);
        EventSource::new(&self.skel.maps.events, header, move |e: &redirect_event| {
            print_event(e, format, start_ns)
        })
        .map(Some)
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut all = vec![snapshot(&self.skel)?];
        if let Some(proxy) = &self.proxy {
            let mut snapshot = proxy.stats.snapshot();
            // The UDP relay is part of the built-in proxy: one `proxy`
            // entry for both in the JSON summary and the status.
            if let Some(udp_relay) = &self.udp_relay {
                snapshot
                    .metrics
                    .extend(udp_relay.stats().snapshot().metrics);
            }
            all.push(snapshot);
        }
        Ok(all)
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name(),
            "cgroup": self.plan.cgroup.display().to_string(),
            "sockopt_cgroup": self.plan.sockopt_cgroup.display().to_string(),
            "ports": self.args.ports.to_string(),
            "udp_ports": self.args.udp_ports.as_ref().map(PortList::to_string),
            "proxy": if self.args.no_proxy { "external" } else { "built-in" },
            "proxy_addresses": [self.plan.proxy_v4.to_string(), self.plan.proxy_v6.to_string()],
            "programs": self.attachments.describe(),
        })
    }

    fn stop(&mut self) {
        if let Some(proxy) = &mut self.proxy {
            proxy.stop(crate::relay::tcp::STOP_GRACE);
        }
    }

    fn detach(&mut self) {
        self.attachments = Attachments::default();
    }

    fn reclaim(&mut self) -> Result<()> {
        self.attachments.reclaim()
    }

    fn relays(&mut self) -> Vec<&mut dyn Relay> {
        let mut relays: Vec<&mut dyn Relay> = Vec::new();
        if let Some(proxy) = &mut self.proxy {
            relays.push(proxy);
        }
        if let Some(udp_relay) = &mut self.udp_relay {
            relays.push(udp_relay);
        }
        relays
    }

    fn print_statistics(&self) -> Result<()> {
        print_statistics(&self.skel)?;
        if let Some(proxy) = &self.proxy {
            proxy.stats.print();
        }
        if let Some(udp_relay) = &self.udp_relay {
            udp_relay.stats().print();
        }
        Ok(())
    }
}

/// Settings a reload cannot change: the proxy's address and sockets, and
/// what the loaded programs were built with.
fn fixed_while_running(
    old: &RedirectArgs,
    new: &RedirectArgs,
    old_plan: &Plan,
    new_plan: &Plan,
) -> Result<()> {
    let fixed = [
        (
            "proxy-ip",
            old_plan.proxy_v4.ip() != new_plan.proxy_v4.ip()
                || old_plan.proxy_v6.ip() != new_plan.proxy_v6.ip(),
        ),
        ("proxy-port", old.proxy_port != new.proxy_port),
        ("mark", old.mark != new.mark),
        ("no-proxy", old.no_proxy != new.no_proxy),
        (
            "udp-ports (on or off)",
            old.udp_ports.is_some() != new.udp_ports.is_some(),
        ),
        (
            "udp-idle-timeout",
            old.udp_idle_timeout != new.udp_idle_timeout,
        ),
        (
            "idle-timeout",
            old.relay.idle_timeout() != new.relay.idle_timeout(),
        ),
    ];
    if let Some((key, _)) = fixed.iter().find(|(_, changed)| *changed) {
        bail!(
            "{key} cannot change while running; `proxy-redirect upgrade` applies it without a drop"
        );
    }
    Ok(())
}

/// `listeners`: the built-in proxy's listening sockets, IPv4 then IPv6;
/// none without it.
fn load(
    args: &RedirectArgs,
    plan: &Plan,
    listeners: &[RawFd],
    ctx: &RunContext,
    pins: Option<&mut PinDir>,
    open_object: &'static mut MaybeUninit<libbpf_rs::OpenObject>,
) -> Result<RedirectSkel<'static>> {
    let mut open = RedirectSkelBuilder::default()
        .open(open_object)
        .context("opening the redirect BPF object")?;
    if let Some(pins) = pins {
        let maps = &mut open.maps;
        pins.reuse_all(&mut record_maps!(maps, &mut))?;
    }
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .context("the redirect object has no .rodata")?;
    let SocketAddr::V4(proxy_v4) = plan.proxy_v4 else {
        unreachable!("plan() puts an IPv4 address here")
    };
    let IpAddr::V6(proxy_ip6) = plan.proxy_v6.ip() else {
        unreachable!("plan() puts an IPv6 address here")
    };
    rodata.proxy_ip4 = u32::from(*proxy_v4.ip()).to_be();
    rodata.proxy_ip6 = cli::ipv6_words(proxy_ip6);
    rodata.proxy_port = args.proxy_port.to_be();
    rodata.proxy_mark = args.mark;
    rodata.proxy_tgid = match listeners.is_empty() {
        true => 0,
        false => std::process::id(),
    };
    rodata.proxy_netns_cookie = match listeners.first() {
        Some(&listener) => sockopt::netns_cookie(listener)
            .context("reading the network namespace of the proxy's socket")?,
        None => 0,
    };
    rodata.emit_events = (ctx.format != EventFormat::Off).into();

    let mut skel = open.load().context("loading the redirect BPF programs")?;
    maps::sync_flags(
        &skel.maps.redirect_ports,
        &[],
        &port_indexes(Some(&args.ports)),
    )?;
    maps::sync_flags(
        &skel.maps.redirect_udp_ports,
        &[],
        &port_indexes(args.udp_ports.as_ref()),
    )?;
    maps::put_proxy_listeners(&skel.maps.proxy_listeners, listeners)?;
    set_filters(&mut skel, args, plan)?;
    Ok(skel)
}

/// The excluded user, the networks and the proxy-down policy: set at load
/// and changed in place by a reload.
fn set_filters(skel: &mut RedirectSkel<'_>, args: &RedirectArgs, plan: &Plan) -> Result<()> {
    let maps = &skel.maps;
    sync_cidrs(&args.include, &maps.include_v4, &maps.include_v6)?;
    sync_cidrs(&args.exclude, &maps.exclude_v4, &maps.exclude_v6)?;
    let bss = skel
        .maps
        .bss_data
        .as_deref_mut()
        .context("the redirect object has no .bss")?;
    let policy = match args.when_proxy_down {
        ProxyDown::Open => proxy_down_policy::PROXY_DOWN_OPEN.0 as u8,
        ProxyDown::Closed => proxy_down_policy::PROXY_DOWN_CLOSED.0 as u8,
    };
    let values = [
        (
            &mut bss.include_v4_active,
            args.include.iter().any(|c| c.addr.is_ipv4()).into(),
        ),
        (
            &mut bss.include_v6_active,
            args.include.iter().any(|c| c.addr.is_ipv6()).into(),
        ),
        (
            &mut bss.exclude_v4_active,
            args.exclude.iter().any(|c| c.addr.is_ipv4()).into(),
        ),
        (
            &mut bss.exclude_v6_active,
            args.exclude.iter().any(|c| c.addr.is_ipv6()).into(),
        ),
        (&mut bss.proxy_down_policy, policy),
    ];
    for (field, value) in values {
        // SAFETY: a byte of the mmap'ed .bss, which the programs read as volatile.
        unsafe { std::ptr::write_volatile(field, value) };
    }
    // SAFETY: as above; the uid before the flag that enables it.
    unsafe {
        std::ptr::write_volatile(&mut bss.excluded_uid, plan.excluded_uid.unwrap_or(0));
        std::ptr::write_volatile(
            &mut bss.has_excluded_uid,
            plan.excluded_uid.is_some().into(),
        );
    }
    Ok(())
}

/// Makes the two tries hold exactly `cidrs`.
fn sync_cidrs(cidrs: &[Cidr], v4: &dyn MapCore, v6: &dyn MapCore) -> Result<()> {
    let mut keys_v4 = Vec::new();
    let mut keys_v6 = Vec::new();
    for cidr in cidrs {
        let prefixlen = u32::from(cidr.prefix_len);
        match cidr.addr {
            IpAddr::V4(ip) => keys_v4.push(cidr_v4_key {
                prefixlen,
                addr: u32::from_ne_bytes(ip.octets()),
            }),
            IpAddr::V6(ip) => keys_v6.push(cidr_v6_key {
                prefixlen,
                addr: cli::ipv6_words(ip),
            }),
        }
    }
    maps::sync_set(v4, &keys_v4)?;
    maps::sync_set(v6, &keys_v6)
}

fn refusal_name(reason: u32) -> &'static str {
    match refusal_reason(reason) {
        refusal_reason::REFUSED_NETNS_SHARE => "namespace share",
        refusal_reason::REFUSED_UID_SHARE => "user share",
        refusal_reason::REFUSED_TABLE_FULL => "table full",
        _ => "unknown",
    }
}

pub fn reason_name(reason: u8) -> &'static str {
    match bypass_reason(reason.into()) {
        bypass_reason::REASON_NONE => "none",
        bypass_reason::REASON_LOOPBACK => "loopback",
        bypass_reason::REASON_PROXY_ADDRESS => "proxy address",
        bypass_reason::REASON_EXCLUDED_CIDR => "excluded network",
        bypass_reason::REASON_NOT_INCLUDED => "not in an included network",
        bypass_reason::REASON_EXCLUDED_USER => "excluded user",
        bypass_reason::REASON_PROXY_MARK => "proxy mark",
        bypass_reason::REASON_PROXY_PROCESS => "proxy's own connection",
        bypass_reason::REASON_NO_PROXY => "no proxy",
        bypass_reason::REASON_BOUND_TO_DEVICE => "bound to a device",
        bypass_reason::REASON_NO_MEMORY => "no memory for the record",
        _ => "unknown",
    }
}

fn print_event(event: &redirect_event, format: EventFormat, start_ns: u64) {
    let seconds = event.timestamp_ns.saturating_sub(start_ns) as f64 / 1e9;
    let action = match redirect_action(event.action.into()) {
        redirect_action::ACTION_REDIRECT => "REDIRECT",
        redirect_action::ACTION_REFUSE => "REFUSE",
        _ => "BYPASS",
    };
    let redirected = action == "REDIRECT";
    let protocol = if event.protocol == libc::IPPROTO_UDP as u8 {
        "udp"
    } else {
        "tcp"
    };
    let comm = comm_to_string(&event.comm);
    let original = event.original.addr();
    let target = event.target.addr();
    match format {
        EventFormat::Off => {}
        EventFormat::Text => {
            let why = if redirected {
                String::new()
            } else {
                format!(" ({})", reason_name(event.reason))
            };
            out!(
                "{seconds:12.3} {action:<8} {comm:<16} [{}] {protocol} {original} -> {target}{why}",
                event.cookie
            );
        }
        EventFormat::Json => {
            let record = serde_json::json!({
                "time": seconds,
                "action": action.to_lowercase(),
                "protocol": protocol,
                "reason": (!redirected).then(|| reason_name(event.reason)),
                "pid": event.pid,
                "uid": event.uid,
                "comm": comm,
                "cookie": event.cookie,
                "original": original.to_string(),
                "target": target.to_string(),
            });
            out!("{record}");
        }
    }
}

fn print_configuration(args: &RedirectArgs, plan: &Plan) {
    out!("Redirecting TCP connections");
    out!("  cgroup:            {}", plan.cgroup.display());
    out!(
        "  SO_ORIGINAL_DST:   answered in {}",
        plan.sockopt_cgroup.display()
    );
    out!("  ports:             {}", args.ports);
    match &args.udp_ports {
        Some(ports) => out!(
            "  UDP ports:         {ports} (flows idle for {} s close)",
            args.udp_idle_timeout
        ),
        None => out!("  UDP ports:         none"),
    }
    out!(
        "  proxy:             {} and {}",
        plan.proxy_v4,
        plan.proxy_v6
    );
    let proxy = if args.no_proxy {
        "external (--no-proxy)"
    } else {
        "built-in"
    };
    out!(
        "  proxy program:     {proxy}, upstream mark {:#x}",
        args.mark
    );
    let when_down = match args.when_proxy_down {
        ProxyDown::Open => "open (connections go to their original destination)",
        ProxyDown::Closed => "closed (connections are refused)",
    };
    out!("  when proxy down:   {when_down}");
    if let Some(addr) = args.output.metrics {
        out!("  metrics:           http://{addr}/metrics");
    }
    if let (Some(user), Some(uid)) = (&args.exclude_user, plan.excluded_uid) {
        out!("  excluded user:     {user} (uid {uid})");
    }
    for cidr in &args.include {
        out!("  include:           {cidr}");
    }
    for cidr in &args.exclude {
        out!("  exclude:           {cidr}");
    }
}

/// The counters and gauges of a running redirect.
fn snapshot(skel: &RedirectSkel<'_>) -> Result<Snapshot> {
    let counts = maps::percpu_sums(&skel.maps.stats, redirect_stat::STAT_COUNT.0)?;
    let count = |stat: redirect_stat| counts[stat.0 as usize];
    let bypassed_by = |reason: u32| counts[(redirect_stat::STAT_BYPASSED.0 + reason) as usize];
    let reasons = 1..bypass_reason::REASON_COUNT.0;
    let mut snapshot = Snapshot::new("redirect");
    let decisions = [
        (
            "tcp_connects",
            "TCP connects seen",
            "TCP connect() calls seen in the redirected cgroup.",
            redirect_stat::STAT_TCP_CONNECTS,
        ),
        (
            "other_port_connects",
            "to other ports",
            "Connects to ports that are not redirected.",
            redirect_stat::STAT_OTHER_PORT,
        ),
        (
            "redirected",
            "redirected",
            "Connections sent to the proxy.",
            redirect_stat::STAT_REDIRECTED,
        ),
    ];
    snapshot
        .push_counters(decisions.map(|(name, label, help, stat)| (name, label, help, count(stat))));
    snapshot.push(Metric::counter(
        "bypassed_all",
        "bypassed",
        "Connections to redirected ports left alone, all reasons.",
        reasons.clone().map(bypassed_by).sum(),
    ));
    for reason in reasons {
        snapshot.push(
            Metric::counter(
                "bypassed",
                format!("  {}", reason_name(reason as u8)),
                "Connections to redirected ports left alone, by reason.",
                bypassed_by(reason),
            )
            .with_label("reason", reason_name(reason as u8)),
        );
    }
    let counters = [
        (
            "refused",
            "refused (no proxy)",
            "Connects refused because no proxy listened (--when-proxy-down closed).",
            redirect_stat::STAT_REFUSED,
        ),
        (
            "original_destinations_recorded",
            "original destinations recorded",
            "Original destinations published when the client's SYN left.",
            redirect_stat::STAT_ORIG_DST_PENDING,
        ),
        (
            "original_destinations_handed_over",
            "original destinations handed to the proxy",
            "Original destinations moved to the proxy's accepted socket.",
            redirect_stat::STAT_ORIG_DST_HANDED_OVER,
        ),
        (
            "original_destinations_answered",
            "original destinations answered",
            "SO_ORIGINAL_DST calls answered.",
            redirect_stat::STAT_ORIG_DST_ANSWERED,
        ),
        (
            "closed_before_accept",
            "closed before the proxy accepted",
            "Clients that closed before the proxy accepted their connection.",
            redirect_stat::STAT_ORIG_DST_UNCLAIMED,
        ),
        (
            "original_destinations_lost",
            "original destinations lost (map full, no memory)",
            "Original destinations that could not be stored.",
            redirect_stat::STAT_ORIG_DST_LOST,
        ),
        (
            "original_destinations_refused",
            "original destinations refused (over a share)",
            "Records refused because their namespace or user held its share of the table.",
            redirect_stat::STAT_ORIG_DST_REFUSED,
        ),
        (
            "getpeername_answered",
            "getpeername answered",
            "getpeername() calls told the dialled address.",
            redirect_stat::STAT_PEERNAME_ANSWERED,
        ),
        (
            "udp_sends",
            "UDP connects and sends",
            "UDP connects and unconnected sends sent to the proxy.",
            redirect_stat::STAT_UDP_SENDS,
        ),
        (
            "udp_to_proxy",
            "UDP datagrams told to the proxy",
            "Datagrams whose original destination the relay was told.",
            redirect_stat::STAT_UDP_TO_PROXY,
        ),
        (
            "udp_no_record",
            "UDP datagrams at the proxy without a record",
            "Datagrams at the relay with no original destination.",
            redirect_stat::STAT_UDP_NO_RECORD,
        ),
        (
            "udp_replies",
            "UDP replies from the original",
            "Replies rewritten to come from the original destination.",
            redirect_stat::STAT_UDP_REPLIES,
        ),
        (
            "udp_from_last_send",
            "UDP datagrams of closed senders",
            "Datagrams whose sender had closed, told by the record of its last send.",
            redirect_stat::STAT_UDP_FROM_RECORD,
        ),
        (
            "udp_replies_refused",
            "UDP replies for closed sockets refused",
            "Relay replies refused because the client's socket had closed.",
            redirect_stat::STAT_UDP_REPLY_REFUSED,
        ),
        (
            "events_lost",
            "events lost",
            "Events dropped because the ring buffer was full.",
            redirect_stat::STAT_EVENTS_LOST,
        ),
    ];
    snapshot
        .push_counters(counters.map(|(name, label, help, stat)| (name, label, help, count(stat))));
    snapshot.push(Metric::gauge(
        "awaiting_accept",
        "awaiting the proxy's accept",
        "Original destinations published and not yet taken by the proxy.",
        (maps::count(&skel.maps.pending_orig_dst)? + maps::count(&skel.maps.pending_overflow)?)
            as u64,
    ));
    let refusals: Vec<(refusal_key, u64)> = maps::entries(&skel.maps.pending_refusals)?;
    for (key, count) in refusals {
        snapshot.push(
            Metric::counter(
                "original_destinations_refused_by_namespace",
                format!(
                    "refused in netns {} ({})",
                    key.netns_cookie,
                    refusal_name(key.reason)
                ),
                "Records refused, by network namespace cookie and reason.",
                count,
            )
            .with_label("netns", key.netns_cookie.to_string())
            .with_label("reason", refusal_name(key.reason)),
        );
    }
    Ok(snapshot)
}

fn print_statistics(skel: &RedirectSkel<'_>) -> Result<()> {
    let snapshot = snapshot(skel)?;
    let (open, counters): (Vec<Metric>, Vec<Metric>) = snapshot
        .metrics
        .iter()
        .cloned()
        .partition(|m| m.name == "awaiting_accept");
    out!("=== Statistics ===");
    Snapshot {
        metrics: counters,
        ..snapshot.clone()
    }
    .print();
    out!("=== Open redirected connections ===");
    Snapshot {
        metrics: open,
        ..snapshot
    }
    .print();
    let mut pending: Vec<(handover_key, pending_record)> =
        maps::entries(&skel.maps.pending_orig_dst)?;
    pending.extend(maps::entries(&skel.maps.pending_overflow)?);
    for (key, original) in pending.iter().take(20) {
        out!(
            "    netns {}: {} -> {} (originally {})",
            key.netns_cookie,
            key.tuple.peer.addr(),
            key.tuple.local.addr(),
            original.original.addr()
        );
    }
    Ok(())
}

/// The indexes of the port arrays: one per port.
fn port_indexes(ports: Option<&PortList>) -> Vec<u32> {
    ports.map_or_else(Vec::new, |ports| {
        ports.0.iter().map(|&p| p.into()).collect()
    })
}
