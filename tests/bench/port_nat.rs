//! `make bench` for port-nat, in one interleaved run:
//! - ns per packet of the TC programs from BPF_PROG_TEST_RUN with repeat:
//!   the ingress and egress rewrite paths (a tracked flow) and the miss
//!   path (a port that is not mapped);
//! - connections per second from a client netns to a server netns over a
//!   veth (connect, 64-byte request, 64-byte reply, close): direct to port
//!   80, through `port-nat -f 8080 -t 80` on the server's veth, and through
//!   iptables `nat PREROUTING REDIRECT --to-ports 80` in the server netns.
//!
//! Each connection-rate arm has namespaces of its own: a nat table, once
//! created in a netns, keeps conntrack on there. `BENCH_QUICK=1` runs a
//! short smoke test.

#[path = "../common/mod.rs"]
#[allow(unused_imports)]
mod common;
mod report;
mod rr;

use std::mem::MaybeUninit;
use std::net::SocketAddr;

use common::packet::*;
use common::*;
use libbpf_rs::ProgramInput;
use proxy_redirect::bpf::port_nat::types::nat_stat;
use proxy_redirect::datapath::port_nat::{self, Mapping, NatConfig, Protocols};
use proxy_redirect::sys::netns::{self, NetNs};
use report::ratio_table;
use rr::*;

fn main() {
    let Some(settings) = rr::start() else {
        return;
    };
    per_packet(&settings);
    connections_per_second(&settings);
}

/// TCX_NEXT, what port-nat returns for every packet it hands on.
const TC_NEXT: i32 = -1;

/// Average run time of `program` on `frame`, `repeat` times in the kernel;
/// it must return `verdict`.
fn ns_per_run(program: &libbpf_rs::ProgramMut<'_>, frame: &[u8], repeat: u32, verdict: i32) -> f64 {
    let mut out = vec![0u8; frame.len() + 256];
    let input = ProgramInput {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let output = program.test_run(input).expect("BPF_PROG_TEST_RUN");
    assert_eq!(output.return_value as i32, verdict, "the verdict");
    output.duration.as_nanos() as f64
}

fn per_packet(settings: &Settings) {
    println!(
        "\n== ns per packet, BPF_PROG_TEST_RUN (repeat {}, {} rounds, interleaved) ==",
        settings.repeat, settings.rounds
    );
    // BPF_PROG_TEST_RUN runs the program again and again on the same
    // buffer, so a rewrite would turn the next run into another case. Two
    // mappings that swap 8080 and 80 make every run a rewrite of a tracked
    // flow (the two flows alternate), which is the path to measure.
    let config = NatConfig {
        mappings: vec![
            Mapping { from: 8080, to: 80 },
            Mapping { from: 80, to: 8080 },
        ],
        protocols: Protocols::All,
        max_flows: 65536,
        events: false,
        ends_chain: false,
    };
    let mut object = MaybeUninit::uninit();
    let skel = port_nat::load(&config, &mut object, None).expect("loading port-nat");
    // The same program as before TC_NEXT: TC_ACT_OK (TCX_PASS) for every
    // packet it hands on, which ends the tcx chain.
    let mut old_object = MaybeUninit::uninit();
    let old = NatConfig {
        ends_chain: true,
        ..config.clone()
    };
    let old = port_nat::load(&old, &mut old_object, None).expect("loading port-nat");
    let payload = payload(100, 9);
    let request = Packet::tcp("192.0.2.1", 40000, "198.51.100.2", 8080, TCP_ACK | TCP_PSH)
        .with_payload(&payload);
    let reply = Packet {
        src_port: 80,
        ..request.reply(TCP_ACK | TCP_PSH)
    };
    let miss = Packet {
        dst_port: 9999,
        ..request.clone()
    };
    let udp = Packet::udp("192.0.2.1", 40001, "198.51.100.2", 8080).with_payload(&payload);
    let (request, reply, miss, udp) = (request.build(), reply.build(), miss.build(), udp.build());
    // Create the flows the rewrite arms use.
    let (next, ok) = (TC_NEXT, 0);
    for (skel, verdict) in [(&skel, next), (&old, ok)] {
        ns_per_run(&skel.progs.port_nat_ingress, &request, 2, verdict);
        ns_per_run(&skel.progs.port_nat_ingress, &udp, 2, verdict);
    }

    type Arm<'a> = (&'a str, &'a libbpf_rs::ProgramMut<'a>, &'a [u8], i32);
    let arms: [Arm; 6] = [
        (
            "miss (ingress, port not mapped)",
            &skel.progs.port_nat_ingress,
            &miss,
            next,
        ),
        (
            "rewrite (ingress, TCP)",
            &skel.progs.port_nat_ingress,
            &request,
            next,
        ),
        (
            "rewrite (ingress, UDP)",
            &skel.progs.port_nat_ingress,
            &udp,
            next,
        ),
        (
            "rewrite (egress, TCP)",
            &skel.progs.port_nat_egress,
            &reply,
            next,
        ),
        (
            "rewrite (ingress, TCP), TC_ACT_OK",
            &old.progs.port_nat_ingress,
            &request,
            ok,
        ),
        (
            "miss (ingress), TC_ACT_OK",
            &old.progs.port_nat_ingress,
            &miss,
            ok,
        ),
    ];
    let mut results = vec![Vec::new(); arms.len()];
    for round in 0..settings.rounds {
        for (i, (name, program, frame, verdict)) in arms.iter().enumerate() {
            let ns = ns_per_run(program, frame, settings.repeat, *verdict);
            println!("  round {round} {name:<34} {ns:>8.1} ns");
            results[i].push(ns);
        }
    }
    let count = |skel: &proxy_redirect::bpf::port_nat::PortNatSkel<'_>, stat: nat_stat| {
        port_nat::counters(skel).unwrap()[stat.0 as usize]
    };
    let rewritten = count(&skel, nat_stat::NAT_STAT_INGRESS_TRANSLATED)
        + count(&skel, nat_stat::NAT_STAT_EGRESS_TRANSLATED)
        + count(&old, nat_stat::NAT_STAT_INGRESS_TRANSLATED);
    let runs = u64::from(settings.repeat) * settings.rounds as u64 * 4;
    assert!(
        rewritten >= runs,
        "only {rewritten} of {runs} rewrite-arm runs rewrote a packet"
    );
    let names: Vec<&str> = arms.iter().map(|(name, _, _, _)| *name).collect();
    let medians = ratio_table("median ns/packet", &names, &mut results, 1);
    println!(
        "  TC_NEXT against TC_ACT_OK: rewrite {:.2}x, miss {:.2}x (target: no slower)",
        medians[1] / medians[4],
        medians[0] / medians[5]
    );
}

fn in_netns(ns: &NetNs, program: &str, args: &[&str]) {
    let mut command = netns::command_in(program, Some(ns), None).unwrap();
    command.args(args);
    let out = run(command);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn client_command(testbed: &Testbed) -> std::process::Command {
    let exe = std::env::current_exe().unwrap();
    let mut command = testbed.in_client_netns(&exe.display().to_string());
    command.arg(RR_CLIENT);
    command
}

fn connections_per_second(settings: &Settings) {
    println!(
        "\n== Connections per second: connect, {MESSAGE} B request, {MESSAGE} B reply, close \
         (2 client threads, {} rounds x {} s, interleaved) ==",
        settings.rounds, settings.cps_seconds
    );
    let server_80: SocketAddr = format!("{SERVER_V4}:80").parse().unwrap();
    let server_8080: SocketAddr = format!("{SERVER_V4}:8080").parse().unwrap();

    let direct = tuned_testbed();
    let _direct_server = StopOnDrop(start_rr_server(&direct.server, server_80));

    let bpf = tuned_testbed();
    let _bpf_server = StopOnDrop(start_rr_server(&bpf.server, server_80));
    let translator = Running::start(
        BIN,
        &["port-nat", "-i", "veth-s", "-f", "8080", "-t", "80"].map(String::from),
        Some(&bpf.server),
        None,
        "Attached",
    );

    let iptables = tuned_testbed();
    let _ipt_server = StopOnDrop(start_rr_server(&iptables.server, server_80));
    in_netns(
        &iptables.server,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            "80",
        ],
    );

    // The same translation, run by the service from a config file.
    let service = tuned_testbed();
    let _service_server = StopOnDrop(start_rr_server(&service.server, server_80));
    let config = TempDir::new();
    let config_path = config.join("config.toml");
    let toml = "[[port-nat]]\ninterface = \"veth-s\"\nfrom = [8080]\nto = [80]\n";
    std::fs::write(&config_path, toml).unwrap();
    let service_run = start_service(&config_path, &[], Some(&service.server), None);

    let arms: [(&str, &Testbed, SocketAddr); 4] = [
        ("direct to :80", &direct, server_80),
        ("port-nat 8080 -> 80", &bpf, server_8080),
        ("iptables REDIRECT 8080 -> 80", &iptables, server_8080),
        ("run --config [[port-nat]]", &service, server_8080),
    ];
    let mut results = vec![Vec::new(); arms.len()];
    for round in 0..settings.rounds {
        for (i, (name, testbed, addr)) in arms.iter().enumerate() {
            let cps = measure_rr(client_command(testbed), *addr, settings.cps_seconds);
            println!("  round {round} {name:<34} {cps:>10.0} conn/s");
            results[i].push(cps);
        }
    }
    let (_, output, _) = translator.stop();
    let (_, service_output, _) = service_run.stop();
    for output in [output, service_output] {
        assert!(
            stat(&output, "translated on ingress") > 0 && stat(&output, "dropped") == 0,
            "port-nat did not translate cleanly:\n{output}"
        );
    }

    let names: Vec<&str> = arms.iter().map(|(name, _, _)| *name).collect();
    let medians = ratio_table("median conn/s", &names, &mut results, 2);
    println!(
        "  target: port-nat no slower than iptables REDIRECT: {}",
        report::verdict(medians[1] >= medians[2] * 0.97)
    );
    println!(
        "  target: the service adds nothing per connection (run --config within 3% of \
         port-nat): {}",
        report::verdict(medians[3] >= medians[1] * 0.97)
    );
}

/// Stops a request/reply server when the arm is done.
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
