//! `make bench` for redirect, in one interleaved run:
//! - connections per second from the redirected cgroup to a server in
//!   another netns (connect, 64-byte request, 64-byte reply, close): direct,
//!   through `redirect` + the built-in proxy, and through iptables
//!   `nat OUTPUT REDIRECT` + the same built-in proxy (`proxy-redirect proxy`);
//! - the connect4 program's run time per call (kernel.bpf_stats_enabled);
//! - DNS-sized (64 B) UDP request/response rate from the cgroup: direct and
//!   through `redirect --udp-ports` + the built-in relay, with the run time
//!   of sendmsg4, the relay-side recvmsg4 and getpeername4;
//! - bulk throughput (iperf3): direct, through the built-in proxy, and
//!   through HAProxy (`option splice-auto`) behind the same redirect.
//!
//! Each arm has namespaces of its own: a nat table, once created in a
//! netns, keeps conntrack on there. `BENCH_QUICK=1` runs a short smoke test;
//! `BENCH_ONLY=cps`, `udp` or `bulk` runs one part.

mod bpf_stats;
#[path = "../common/mod.rs"]
#[allow(unused_imports)]
mod common;
mod iperf3;
mod report;
mod rr;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proxy_redirect::sys::cgroup::ChildCgroup;
use proxy_redirect::sys::netns::{self, NetNs};
use rr::*;

const MESSAGE: usize = 64;
const CPS_PORT: u16 = 80;
const BULK_PORT: u16 = 443;
const UDP_PORT: u16 = 53;
/// The built-in proxy's port: redirect's default, where iptables REDIRECT
/// sends too (HAPROXY_CONFIG binds the same).
const PROXY_PORT: u16 = 15001;
/// The steady UDP request rate at which the relay's CPU is measured too.
const PACED_RATE: u32 = 5000;

fn main() {
    let Some(settings) = rr::start() else {
        return;
    };
    let only = std::env::var("BENCH_ONLY").ok();
    type Part = fn(&Settings);
    let parts: [(&str, Part); 3] = [
        ("cps", connections_per_second),
        ("udp", udp_request_rate),
        ("bulk", bulk_throughput),
    ];
    for (name, part) in parts {
        if only.as_deref().is_none_or(|only| only == name) {
            part(&settings);
        }
    }
}

fn measure_cps(testbed: &Testbed, seconds: f64) -> f64 {
    let exe = std::env::current_exe().unwrap();
    let mut command = testbed.in_apps(&exe.display().to_string());
    command.arg(RR_CLIENT);
    let addr = format!("{SERVER_V4}:{CPS_PORT}").parse().unwrap();
    measure_rr(command, addr, seconds)
}

fn start_cps_server(ns: &NetNs) -> Vec<Arc<AtomicBool>> {
    [
        format!("{SERVER_V4}:{CPS_PORT}"),
        format!("[{SERVER_V6}]:{CPS_PORT}"),
    ]
    .iter()
    .map(|addr| start_rr_server(ns, addr.parse().unwrap()))
    .collect()
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

fn builtin_proxy(testbed: &Testbed) -> Running {
    Running::start(
        BIN,
        &[
            "proxy".into(),
            "-l".into(),
            format!("127.0.0.1:{PROXY_PORT}"),
        ],
        Some(&testbed.client),
        Some(&testbed.proxy),
        "Proxy listening",
    )
}

fn iptables_redirect(testbed: &Testbed, port: u16) {
    let path = testbed.apps.relative_path().unwrap().display().to_string();
    in_netns(
        &testbed.client,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-m",
            "cgroup",
            "--path",
            &path,
            "-j",
            "REDIRECT",
            "--to-ports",
            &PROXY_PORT.to_string(),
        ],
    );
}

/// The programs one redirected connection runs, by what they do and their
/// name as bpftool shows it (the full name, from BTF).
const REDIRECT_PROGRAMS: [(&str, &str); 4] = [
    ("connect4 (decide, record)", "redirect_connect4"),
    ("sockops, client (publish)", "redirect_sockops"),
    ("sockops, proxy side (hand over)", "redirect_proxy_sockops"),
    ("getsockopt (answer)", "redirect_getsockopt"),
];

fn connections_per_second(settings: &Settings) {
    // What iptables adds per connection is a difference of two CPU figures
    // near 170 us that each move by several us from round to round: more
    // rounds than the other parts, for the median of that difference.
    let rounds = settings.rounds * 2 + 1;
    println!(
        "\n== Connections per second: connect, {MESSAGE} B request, {MESSAGE} B reply, close \
         (2 client threads, {rounds} rounds x {} s, interleaved) ==",
        settings.cps_seconds
    );
    let direct = tuned_testbed();
    let _direct_server = start_cps_server(&direct.server);

    let bpf = tuned_testbed();
    let _bpf_server = start_cps_server(&bpf.server);
    let bpf_stats_before = bpf_stats::set_enabled(true);
    // As a user runs it: SO_ORIGINAL_DST answered by default in the proxy's
    // own cgroup, `proxy`.
    let apps = bpf.apps.path().display().to_string();
    let redirector = Running::start(
        BIN,
        &["redirect", "-c", &apps, "-P", &CPS_PORT.to_string()].map(String::from),
        Some(&bpf.client),
        Some(&bpf.proxy),
        "Attached",
    );
    let others = ChildCgroup::create(bpf.parent.path(), "others").unwrap();

    let iptables = tuned_testbed();
    let _ipt_server = start_cps_server(&iptables.server);
    let _ipt_proxy = builtin_proxy(&iptables);
    iptables_redirect(&iptables, CPS_PORT);

    // The same redirect, run by the service from a config file.
    let service = tuned_testbed();
    let _service_server = start_cps_server(&service.server);
    let config = TempDir::new();
    let config_path = config.join("config.toml");
    let toml = format!(
        "[redirect]\ncgroup = \"{}\"\nports = [{CPS_PORT}]\n",
        service.apps.path().display(),
    );
    std::fs::write(&config_path, toml).unwrap();
    let service_run = start_service(
        &config_path,
        &[],
        Some(&service.client),
        Some(&service.proxy),
    );

    let arms: [(&str, &Testbed); 4] = [
        ("direct", &direct),
        ("redirect + built-in proxy", &bpf),
        ("iptables REDIRECT + built-in proxy", &iptables),
        ("run --config [redirect]", &service),
    ];
    let mut results = vec![Vec::new(); arms.len()];
    let mut cpu = vec![Vec::new(); arms.len()];
    let stats_start = bpf_stats::programs(&REDIRECT_PROGRAMS, redirector.pid());
    for round in 0..rounds {
        for (i, (name, testbed)) in arms.iter().enumerate() {
            let busy = busy_cpu_seconds();
            let cps = measure_cps(testbed, settings.cps_seconds);
            let connections = cps * settings.cps_seconds;
            let cpu_per_connection = (busy_cpu_seconds() - busy) / connections * 1e6;
            cpu[i].push(cpu_per_connection);
            println!(
                "  round {round} {name:<36} {cps:>10.0} conn/s {cpu_per_connection:>8.1} us CPU/conn"
            );
            results[i].push(cps);
        }
    }
    let stats_end = bpf_stats::programs(&REDIRECT_PROGRAMS, redirector.pid());
    // The floor: the same hooks with programs that return at once, beside
    // redirect's, over redirected connections and then bystanders.
    let floor = Floor::empty(&bpf);
    let floor_start = floor.snapshot();
    let floor_connections = (measure_cps(&bpf, settings.cps_seconds) * settings.cps_seconds) as u64;
    let floor_redirected = floor.snapshot();
    let bystanders = bystander_connections(&bpf, &others, redirector.pid(), settings.cps_seconds);
    let floor_bystanders = floor.snapshot();
    let proxys_own =
        bystander_connections(&bpf, &bpf.proxy, redirector.pid(), settings.cps_seconds);
    let floor_proxys_own = floor.snapshot();
    drop(floor);
    let work_floor = Floor::work(&bpf);
    let work_floor_start = work_floor.snapshot();
    let work_floor_connections =
        (measure_cps(&bpf, settings.cps_seconds) * settings.cps_seconds) as u64;
    let work_floor_end = work_floor.snapshot();
    drop(work_floor);
    let (_, output, _) = redirector.stop();
    let (_, service_output, _) = service_run.stop();
    bpf_stats::set_enabled(bpf_stats_before == "1");
    for output in [output, service_output] {
        assert!(
            stat(&output, "redirected") > 0,
            "redirect did not redirect:\n{output}"
        );
    }

    // Both arms run the same proxy, round by round: what iptables adds is
    // its arm's CPU minus that of the redirect arm beside it, the median of
    // the rounds' differences (a difference of the two medians moved with
    // whatever else the machine did in other rounds).
    let mut iptables_over_redirect: Vec<f64> = cpu[2]
        .iter()
        .zip(&cpu[1])
        .map(|(iptables, bpf)| iptables - bpf)
        .collect();
    // The same datapath in two arms (the service's and the subcommand's):
    // what this way of measuring cannot tell apart.
    let mut service_over_redirect: Vec<f64> = cpu[3]
        .iter()
        .zip(&cpu[1])
        .map(|(service, bpf)| service - bpf)
        .collect();
    let names: Vec<&str> = arms.iter().map(|(name, _)| *name).collect();
    let medians = report::ratio_table("median conn/s", &names, &mut results, 2);
    report::ratio_table("machine CPU us/conn", &names, &mut cpu, 2);
    let redirected = bpf_stats::calls_since(&stats_start, &stats_end);
    let per_connection = bpf_stats::print_per_connection(
        "redirected connection",
        &REDIRECT_PROGRAMS,
        &stats_start,
        &stats_end,
        redirected,
    );
    let (bystander_start, bystander_end, bystander_count) = bystanders;
    let per_bystander = bpf_stats::print_per_connection(
        "bystander connection (outside the redirected and the proxy's cgroups)",
        &REDIRECT_PROGRAMS,
        &bystander_start,
        &bystander_end,
        bystander_count,
    );
    let (own_start, own_end, own_count) = proxys_own;
    let per_own = bpf_stats::print_per_connection(
        "other connection of the proxy's cgroup (inside --sockopt-cgroup)",
        &REDIRECT_PROGRAMS,
        &own_start,
        &own_end,
        own_count,
    );
    let floor_per_connection = bpf_stats::print_per_connection(
        "redirected connection, the floor (programs that return at once, same hooks)",
        &FLOOR_HOOKS,
        &floor_start,
        &floor_redirected,
        floor_connections,
    );
    let floor_per_own = bpf_stats::print_per_connection(
        "other connection of the proxy's cgroup, the floor",
        &FLOOR_HOOKS,
        &floor_bystanders,
        &floor_proxys_own,
        own_count,
    );
    let work_floor_per_connection = bpf_stats::print_per_connection(
        "redirected connection, the work floor (only the design's socket storages and \
         hash write, same hooks)",
        &WORK_FLOOR_HOOKS,
        &work_floor_start,
        &work_floor_end,
        work_floor_connections,
    );
    let connect4 = bpf_stats::per_call(&stats_start[0], &stats_end[0]);
    let connect4_floor = bpf_stats::per_call(&floor_start[0], &floor_redirected[0]);
    let connect4_work_floor = bpf_stats::per_call(&work_floor_start[0], &work_floor_end[0]);
    println!(
        "\n  redirect over the floor: connect4 {:.1}x ({connect4:.0} ns / {connect4_floor:.0} ns), \
         per redirected connection {:.1}x, per other connection of the proxy's cgroup {:.1}x",
        connect4 / connect4_floor,
        per_connection / floor_per_connection,
        per_own / floor_per_own,
    );
    println!(
        "  redirect over the work floor: connect4 {:.1}x ({connect4:.0} ns / \
         {connect4_work_floor:.0} ns), per redirected connection {:.1}x ({:.2} us / {:.2} us)",
        connect4 / connect4_work_floor,
        per_connection / work_floor_per_connection,
        per_connection / 1e3,
        work_floor_per_connection / 1e3,
    );
    // ... plus the redirect arm's BPF.
    let iptables_own = report::median(&mut iptables_over_redirect) + per_connection / 1e3;
    println!(
        "\n  per connection: redirect's BPF {:.2} us, iptables REDIRECT's own {iptables_own:.2} us \
         ({:.2}x); BPF per bystander connection {:.2} us",
        per_connection / 1e3,
        per_connection / 1e3 / iptables_own,
        per_bystander / 1e3,
    );
    println!(
        "  target: BPF per redirected connection at most 2 us: {} ({:.2} us; the work floor \
         alone {:.2} us)",
        report::verdict(per_connection <= 2000.0),
        per_connection / 1e3,
        work_floor_per_connection / 1e3,
    );
    println!(
        "  target: BPF per bystander connection at most 0.1 us: {} ({:.2} us)",
        report::verdict(per_bystander <= 100.0),
        per_bystander / 1e3,
    );
    println!(
        "  target: connect4 at most 500 ns: {} ({connect4:.0} ns; the work floor's socket \
         storage alone {connect4_work_floor:.0} ns)",
        report::verdict(connect4 <= 500.0),
    );
    println!(
        "  target: BPF at most 0.25x what iptables REDIRECT adds: {} ({:.2}x; the same \
         datapath in two arms, run --config against redirect, differed by {:+.2} us)",
        report::verdict(per_connection / 1e3 <= 0.25 * iptables_own),
        per_connection / 1e3 / iptables_own,
        report::median(&mut service_over_redirect),
    );
    println!(
        "  target: redirect no slower than iptables REDIRECT with the same proxy: {}",
        report::verdict(medians[1] >= medians[2] * 0.97),
    );
    println!(
        "  target: the service adds nothing per connection (run --config within 3% of \
         redirect): {}",
        report::verdict(medians[3] >= medians[1] * 0.97),
    );
}

/// Programs beside redirect's on its hooks, in the same cgroups, measured
/// the same way: the empty floor (`r0 = 1; exit`) is what the kernel
/// charges for running any program there at all; the work floor adds only
/// the state operations the design cannot do without
/// (tests/bench/bpf/work_floor.bpf.c).
struct Floor {
    hooks: Vec<common::foreign::CgroupProgram>,
}

/// The empty floor's hooks, as `(what, name)` like REDIRECT_PROGRAMS.
const FLOOR_HOOKS: [(&str, &str); 3] = [
    ("connect4", "floor_connect4"),
    ("sockops (redirected cgroup)", "floor_sockops"),
    ("sockops (--sockopt-cgroup)", "floor_sockopt"),
];

/// The work floor's.
const WORK_FLOOR_HOOKS: [(&str, &str); 3] = [
    ("connect4 (socket storage)", "work_floor_connect4"),
    ("sockops, client (one hash write)", "work_floor_sockops"),
    (
        "sockops, proxy side (lookup, storage, delete)",
        "work_floor_proxy_sockops",
    ),
];

#[allow(clippy::all, dead_code)]
mod work_floor {
    include!(concat!(env!("OUT_DIR"), "/work_floor.skel.rs"));
}

impl Floor {
    /// Programs that return at once.
    fn empty(testbed: &Testbed) -> Floor {
        use common::foreign::{load_raw, ALLOW};
        use libbpf_sys::*;
        let [connect4, sockops, sockopt] = [
            (
                BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                Some(BPF_CGROUP_INET4_CONNECT),
                c"floor_connect4",
            ),
            (
                BPF_PROG_TYPE_SOCK_OPS,
                Some(BPF_CGROUP_SOCK_OPS),
                c"floor_sockops",
            ),
            (
                BPF_PROG_TYPE_SOCK_OPS,
                Some(BPF_CGROUP_SOCK_OPS),
                c"floor_sockopt",
            ),
        ]
        .map(|(prog_type, attach_type, name)| load_raw(prog_type, attach_type, name, &ALLOW));
        Floor::attach(testbed, connect4, sockops, sockopt, 0)
    }

    /// Programs that make only the design's state operations.
    fn work(testbed: &Testbed) -> Floor {
        use libbpf_rs::skel::{OpenSkel, SkelBuilder};
        use std::os::fd::AsFd;
        let mut object = std::mem::MaybeUninit::uninit();
        let mut open = work_floor::WorkFloorSkelBuilder::default()
            .open(&mut object)
            .unwrap();
        open.maps.rodata_data.as_deref_mut().unwrap().proxy_port = PROXY_PORT.to_be();
        let skel = open.load().unwrap();
        let progs = &skel.progs;
        // The programs live on in their descriptors once the skeleton is gone.
        let [connect4, sockops, sockopt] = [
            &progs.work_floor_connect4,
            &progs.work_floor_sockops,
            &progs.work_floor_proxy_sockops,
        ]
        .map(|prog| prog.as_fd().try_clone_to_owned().unwrap());
        // Before redirect's: the first storage a socket gets costs more
        // than a second one beside it.
        Floor::attach(
            testbed,
            connect4,
            sockops,
            sockopt,
            libbpf_sys::BPF_F_PREORDER,
        )
    }

    fn attach(
        testbed: &Testbed,
        connect4: std::os::fd::OwnedFd,
        sockops: std::os::fd::OwnedFd,
        sockopt: std::os::fd::OwnedFd,
        order: u32,
    ) -> Floor {
        use common::foreign::CgroupProgram;
        use libbpf_sys::*;
        let hooks = [
            (
                testbed.apps.path(),
                connect4,
                BPF_CGROUP_INET4_CONNECT,
                c"connect4",
            ),
            (
                testbed.apps.path(),
                sockops,
                BPF_CGROUP_SOCK_OPS,
                c"sockops",
            ),
            (
                testbed.proxy.path(),
                sockopt,
                BPF_CGROUP_SOCK_OPS,
                c"proxy-side sockops",
            ),
        ]
        .map(|(cgroup, program, attach_type, what)| {
            CgroupProgram::attach_loaded(
                cgroup,
                program,
                attach_type,
                what,
                BPF_F_ALLOW_MULTI | order,
            )
        });
        Floor {
            hooks: hooks.into(),
        }
    }

    fn snapshot(&self) -> Vec<Option<bpf_stats::ProgramStats>> {
        self.hooks
            .iter()
            .map(|hook| {
                let (run_time_ns, run_count) = hook.run_time_and_count();
                Some(bpf_stats::ProgramStats {
                    run_time_ns,
                    run_count,
                })
            })
            .collect()
    }
}

/// Busy time of all CPUs since boot (user, system, interrupts; no idle,
/// iowait or steal), in seconds.
fn busy_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap())
        .collect();
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    // SAFETY: sysconf reads a constant.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Connections from `cgroup` (outside the redirected one) to the same
/// server: what the host's other connections pay for redirect. The
/// statistics before and after, and how many.
fn bystander_connections(
    testbed: &Testbed,
    cgroup: &ChildCgroup,
    redirector: u32,
    seconds: f64,
) -> (
    Vec<Option<bpf_stats::ProgramStats>>,
    Vec<Option<bpf_stats::ProgramStats>>,
    u64,
) {
    let exe = std::env::current_exe().unwrap().display().to_string();
    let mut command = netns::command_in(&exe, Some(&testbed.client), Some(cgroup)).unwrap();
    command.arg(RR_CLIENT);
    let start = bpf_stats::programs(&REDIRECT_PROGRAMS, redirector);
    let addr = format!("{SERVER_V4}:{CPS_PORT}").parse().unwrap();
    let cps = measure_rr(command, addr, seconds);
    let end = bpf_stats::programs(&REDIRECT_PROGRAMS, redirector);
    (start, end, (cps * seconds) as u64)
}

/// The programs a redirected datagram runs (full names: bpftool shows
/// them from BTF).
const UDP_PROGRAMS: [(&str, &str); 4] = [
    ("sendmsg4 (decide, record)", "redirect_sendmsg4"),
    ("recvmsg4, relay side (publish)", "redirect_proxy_recvmsg4"),
    ("recvmsg4, client (reply source)", "redirect_recvmsg4"),
    ("getpeername4 (answer)", "redirect_getpeername4"),
];

fn udp_request_rate(settings: &Settings) {
    println!(
        "\n== UDP request/response: sendto {MESSAGE} B, recvfrom the reply (2 client threads, \
         {} rounds x {} s, interleaved) ==",
        settings.rounds, settings.cps_seconds
    );
    let server_addr = format!("[::]:{UDP_PORT}");
    let direct = Testbed::new();
    let _direct_server = servers::udp_echo(&direct.server, &server_addr).unwrap();
    let bpf = Testbed::new();
    let _bpf_server = servers::udp_echo(&bpf.server, &server_addr).unwrap();
    let bpf_stats_before = bpf_stats::set_enabled(true);
    let redirector = bpf.redirect_without_events(
        &bpf.proxy,
        &[
            "-P",
            &CPS_PORT.to_string(),
            "--udp-ports",
            &UDP_PORT.to_string(),
        ],
    );
    let arms: [(&str, &Testbed); 2] = [
        ("direct", &direct),
        ("redirect --udp-ports + built-in relay", &bpf),
    ];
    let mut results = vec![Vec::new(); arms.len()];
    let stats_start = bpf_stats::programs(&UDP_PROGRAMS, redirector.pid());
    let relay_cpu_start = cpu_seconds(redirector.pid());
    for round in 0..settings.rounds {
        for (i, (name, testbed)) in arms.iter().enumerate() {
            let exe = std::env::current_exe().unwrap();
            let mut command = testbed.in_apps(&exe.display().to_string());
            command.arg(UDP_RR_CLIENT);
            let addr = format!("{SERVER_V4}:{UDP_PORT}").parse().unwrap();
            let rate = measure_rr(command, addr, settings.cps_seconds);
            println!("  round {round} {name:<40} {rate:>10.0} exchanges/s");
            results[i].push(rate);
        }
    }
    let stats_end = bpf_stats::programs(&UDP_PROGRAMS, redirector.pid());
    let relay_cpu = cpu_seconds(redirector.pid()) - relay_cpu_start;
    // At a moderate, steady rate the relay must not poll: its CPU per
    // exchange then shows what a sleep and a wakeup cost.
    let paced_cpu_start = cpu_seconds(redirector.pid());
    let exe = std::env::current_exe().unwrap();
    let mut command = bpf.in_apps(&exe.display().to_string());
    command.arg(UDP_RR_CLIENT);
    let addr = format!("{SERVER_V4}:{UDP_PORT}").parse().unwrap();
    let paced_rate = measure_rr_paced(command, addr, settings.cps_seconds, Some(PACED_RATE));
    let paced_cpu = cpu_seconds(redirector.pid()) - paced_cpu_start;
    let (_, output, _) = redirector.stop();
    bpf_stats::set_enabled(bpf_stats_before == "1");
    assert!(
        stat(&output, "datagrams client->upstream") > 0,
        "the relay relayed nothing:\n{output}"
    );
    assert!(
        results[0].iter().all(|&rate| rate > 0.0),
        "the direct arm exchanged nothing: {:?}",
        results[0]
    );
    let names: Vec<&str> = arms.iter().map(|(name, _)| *name).collect();
    let medians = report::ratio_table("median exchanges/s", &names, &mut results, 1);
    bpf_stats::print_per_call(&UDP_PROGRAMS, &stats_start, &stats_end);
    // Unlike the rates, this does not depend on what else the machine runs.
    let exchanges = stat(&output, "datagrams client->upstream");
    println!(
        "  relay process CPU (user + system): {:.2} us per exchange over {exchanges}",
        relay_cpu * 1e6 / exchanges as f64
    );
    println!(
        "  relay process CPU at {PACED_RATE} requests/s from one client: {:.2} us per exchange \
         ({paced_rate:.0} exchanges/s)",
        paced_cpu * 1e6 / (paced_rate * settings.cps_seconds)
    );
    println!(
        "  target: redirect + relay at least 0.5x direct: {}",
        report::verdict(medians[1] >= medians[0] * 0.5)
    );
}

/// User and system CPU seconds process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The fields after the command name, which may hold spaces, start at
    // field 3: utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

const HAPROXY_CONFIG: &str = "\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option splice-auto
frontend redirected
    bind 127.0.0.1:15001
    default_backend original_destination
backend original_destination
    # 0.0.0.0:0 = the connection's original destination (SO_ORIGINAL_DST)
    server original 0.0.0.0:0
";

fn bulk_throughput(settings: &Settings) {
    println!(
        "\n== Bulk throughput (iperf3, client -> server, {} rounds x {} s, interleaved) ==",
        settings.rounds.min(3),
        settings.bulk_seconds
    );
    let direct = Testbed::new();
    let _direct_server = iperf3::start_server(&direct.server, BULK_PORT);

    let builtin = Testbed::new();
    let _builtin_server = iperf3::start_server(&builtin.server, BULK_PORT);
    let builtin_redirect =
        builtin.redirect_without_events(&builtin.proxy, &["-P", &BULK_PORT.to_string()]);

    let haproxy = Testbed::new();
    let _haproxy_server = iperf3::start_server(&haproxy.server, BULK_PORT);
    let dir = TempDir::new();
    let config = dir.join("haproxy.cfg");
    std::fs::write(&config, HAPROXY_CONFIG).unwrap();
    let mut haproxy_process =
        netns::command_in("haproxy", Some(&haproxy.client), Some(&haproxy.proxy))
            .unwrap()
            .args(["-db", "-f"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("haproxy");
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = haproxy_process.try_wait().unwrap() {
        panic!("haproxy exited at once ({status}); its error is above");
    }
    let haproxy_redirect = haproxy.redirect_without_events(
        &haproxy.proxy,
        &["-P", &BULK_PORT.to_string(), "--no-proxy"],
    );

    let arms: [(&str, &Testbed); 3] = [
        ("direct", &direct),
        ("redirect + built-in proxy", &builtin),
        ("HAProxy splice-auto behind redirect", &haproxy),
    ];
    let mut results = vec![Vec::new(); arms.len()];
    for round in 0..settings.rounds.min(3) {
        for (i, (name, testbed)) in arms.iter().enumerate() {
            let client = testbed.in_apps("iperf3");
            let gbps =
                iperf3::bits_per_second(client, SERVER_V4, BULK_PORT, settings.bulk_seconds) / 1e9;
            println!("  round {round} {name:<36} {gbps:>8.2} Gbit/s");
            results[i].push(gbps);
        }
    }
    let _ = haproxy_process.kill();
    let _ = haproxy_process.wait();
    for redirector in [builtin_redirect, haproxy_redirect] {
        let (_, output, _) = redirector.stop();
        assert!(
            stat(&output, "redirected") > 0,
            "redirect did not redirect:\n{output}"
        );
    }
    let names: Vec<&str> = arms.iter().map(|(name, _)| *name).collect();
    let medians = report::ratio_table("median Gbit/s", &names, &mut results, 2);
    println!(
        "  target: built-in proxy at least as fast as HAProxy: {}",
        report::verdict(medians[1] >= medians[2] * 0.97)
    );
}
