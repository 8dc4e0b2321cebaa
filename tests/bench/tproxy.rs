//! `make bench` for tproxy, in one interleaved run, from a client netns
//! through a forwarding gateway netns to a server netns:
//! - connections per second (connect, 64-byte request, 64-byte reply,
//!   close) and bulk throughput (iperf3), each for three arms:
//!   forwarded directly; `tproxy` + its built-in proxy; iptables `TPROXY`
//!   (mangle PREROUTING, with the same ip rule and local route) + the same
//!   proxy as `proxy-redirect proxy --transparent`;
//! - the TC program's run time per packet (kernel.bpf_stats_enabled).
//!
//! Each arm has a gateway of its own. `BENCH_QUICK=1` runs a short smoke
//! test.

mod bpf_stats;
#[path = "../common/mod.rs"]
#[allow(unused_imports)]
mod common;
mod iperf3;
mod report;
#[allow(dead_code)]
mod rr;

use std::net::SocketAddr;

use common::gateway::*;
use common::*;
use proxy_redirect::sys::netns;
use rr::Settings;

const CPS_PORT: u16 = 80;
/// The argument that makes this binary the connection-rate client.
const BULK_PORT: u16 = 443;
const PROXY_PORT: &str = "15002";
const ROUTE_MARK: &str = "0x5054";
const TABLE: &str = "5052";

fn main() {
    let Some(settings) = rr::start() else {
        return;
    };
    connections_per_second(&settings);
    bulk_throughput(&settings);
}

/// A gateway tuned for many short connections: the proxy's upstream
/// connections start there.
fn bench_gateway() -> Gateway {
    let gw = Gateway::new();
    for ns in [&gw.client, &gw.gateway, &gw.server] {
        rr::tune(ns);
    }
    gw
}

fn in_netns(ns: &netns::NetNs, program: &str, args: &[&str]) {
    let mut command = netns::command_in(program, Some(ns), None).unwrap();
    command.args(args);
    let out = run(command);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tproxy` with its built-in proxy, without events (as in production).
fn start_tproxy(gw: &Gateway) -> Running {
    let args = ["tproxy", "-i", CLIENT_FACING, "-P", "80,443"].map(String::from);
    Running::start(BIN, &args, Some(&gw.gateway), None, "Attached")
}

/// iptables TPROXY to `proxy --transparent`, with the rule and route that
/// TPROXY set-ups always need (the ones tproxy adds for itself).
fn start_iptables_tproxy(gw: &Gateway) -> Running {
    let proxy = Running::start(
        BIN,
        &[
            "proxy",
            "--transparent",
            "-l",
            &format!("127.0.0.1:{PROXY_PORT}"),
            "-l",
            &format!("[::1]:{PROXY_PORT}"),
        ]
        .map(String::from),
        Some(&gw.gateway),
        None,
        "Proxy listening",
    );
    for (tool, family, on_ip) in [("iptables", "-4", "127.0.0.1"), ("ip6tables", "-6", "::1")] {
        in_netns(
            &gw.gateway,
            tool,
            &[
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-i",
                CLIENT_FACING,
                "-p",
                "tcp",
                "-m",
                "multiport",
                "--dports",
                "80,443",
                "-j",
                "TPROXY",
                "--on-ip",
                on_ip,
                "--on-port",
                PROXY_PORT,
                "--tproxy-mark",
                ROUTE_MARK,
            ],
        );
        gw.gateway
            .ip(&[
                family,
                "rule",
                "add",
                "pref",
                TABLE,
                "fwmark",
                ROUTE_MARK,
                "iif",
                CLIENT_FACING,
                "lookup",
                TABLE,
            ])
            .unwrap();
        gw.gateway
            .ip(&[
                family, "route", "add", "local", "default", "dev", "lo", "table", TABLE,
            ])
            .unwrap();
    }
    proxy
}

/// Both proxies really relayed: the comparison means nothing otherwise.
fn check_intercepted(tproxy: Running, iptables_proxy: Running) {
    let (_, output, _) = tproxy.stop();
    assert!(
        stat(&output, "connections intercepted") > 0 && stat(&output, "relayed to the end") > 0,
        "tproxy did not intercept:\n{output}"
    );
    let (_, output, _) = iptables_proxy.stop();
    assert!(
        stat(&output, "relayed to the end") > 0,
        "iptables TPROXY did not reach the proxy:\n{output}"
    );
}

const ARMS: [&str; 3] = [
    "forwarded directly",
    "tproxy + built-in proxy",
    "iptables TPROXY + built-in proxy",
];

fn connections_per_second(settings: &Settings) {
    println!(
        "\n== Connections per second through the gateway: connect, {} B request, {} B reply, \
         close (2 client threads, {} rounds x {} s, interleaved) ==",
        rr::MESSAGE,
        rr::MESSAGE,
        settings.rounds,
        settings.cps_seconds
    );
    let server: SocketAddr = format!("{SERVER4}:{CPS_PORT}").parse().unwrap();
    let gateways = [bench_gateway(), bench_gateway(), bench_gateway()];
    let _servers: Vec<_> = gateways
        .iter()
        .map(|gw| rr::start_rr_server(&gw.server, server))
        .collect();
    let bpf_stats_before = bpf_stats::set_enabled(true);
    let tproxy = start_tproxy(&gateways[1]);
    let iptables_proxy = start_iptables_tproxy(&gateways[2]);

    let mut results = vec![Vec::new(); ARMS.len()];
    let stats_start = bpf_stats::program("tproxy_ingress");
    for round in 0..settings.rounds {
        for (i, (name, gw)) in ARMS.iter().zip(&gateways).enumerate() {
            let exe = std::env::current_exe().unwrap().display().to_string();
            let mut client = netns::command_in(&exe, Some(&gw.client), None).unwrap();
            client.arg(rr::RR_CLIENT);
            let cps = rr::measure_rr(client, server, settings.cps_seconds);
            println!("  round {round} {name:<36} {cps:>10.0} conn/s");
            results[i].push(cps);
        }
    }
    let stats_end = bpf_stats::program("tproxy_ingress");
    bpf_stats::set_enabled(bpf_stats_before == "1");
    check_intercepted(tproxy, iptables_proxy);

    let medians = report::ratio_table("median conn/s", &ARMS, &mut results, 2);
    if let Some((ns, packets)) = stats_end
        .zip(stats_start)
        .and_then(|(b, a)| b.per_run_since(&a))
    {
        println!(
            "\n  tproxy_ingress: {ns:.0} ns per packet over {packets} packets \
             (kernel.bpf_stats_enabled)"
        );
    }
    print_target(&medians);
}

fn bulk_throughput(settings: &Settings) {
    let rounds = settings.rounds.min(3);
    println!(
        "\n== Bulk throughput through the gateway (iperf3, client -> server, {rounds} rounds x \
         {} s, interleaved) ==",
        settings.bulk_seconds
    );
    let gateways = [Gateway::new(), Gateway::new(), Gateway::new()];
    let _servers: Vec<_> = gateways
        .iter()
        .map(|gw| iperf3::start_server(&gw.server, BULK_PORT))
        .collect();
    let tproxy = start_tproxy(&gateways[1]);
    let iptables_proxy = start_iptables_tproxy(&gateways[2]);

    let mut results = vec![Vec::new(); ARMS.len()];
    for round in 0..rounds {
        for (i, (name, gw)) in ARMS.iter().zip(&gateways).enumerate() {
            let iperf3 = gw.in_client("iperf3");
            let gbps =
                iperf3::bits_per_second(iperf3, SERVER4, BULK_PORT, settings.bulk_seconds) / 1e9;
            println!("  round {round} {name:<36} {gbps:>8.2} Gbit/s");
            results[i].push(gbps);
        }
    }
    check_intercepted(tproxy, iptables_proxy);
    let medians = report::ratio_table("median Gbit/s", &ARMS, &mut results, 2);
    print_target(&medians);
}

fn print_target(medians: &[f64]) {
    println!(
        "  target: tproxy no slower than iptables TPROXY with the same proxy: {}",
        report::verdict(medians[1] >= medians[2] * 0.97)
    );
}
