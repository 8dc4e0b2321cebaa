//! `make bench` for bypass, in one interleaved run: two local processes'
//! worth of sockets (one worker process, client and server threads pinned
//! to different cores) over loopback in a private netns,
//! - ping-pong round-trip time p50 and p99 at 64 B, 1 KiB and 16 KiB;
//! - bulk throughput (256 MiB one way, measured at the receiver);
//!
//! each with the worker in a plain cgroup and in a cgroup where `bypass`
//! runs. `bypass` runs in the host namespace, as on a host of containers:
//! one instance for every namespace of the cgroup. Targets: 1 KiB RTT with
//! bypass <= 0.6x plain loopback; bulk >= 1.5x.
//!
//! Then the same between two pods (issue 24): client and server processes
//! in two network namespaces joined by veths on a bridge, pinned to CPU 0
//! and CPU 1, in a plain cgroup (the veth path) and in a cgroup where
//! `bypass --across-namespaces` runs. Targets: 1 KiB RTT <= 0.7x the veth
//! path; bulk >= 1.3x. `BENCH_QUICK=1` runs a short smoke test.

#[path = "../common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[allow(dead_code)]
mod report;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use proxy_redirect::sys::cgroup::{self, ChildCgroup};
use proxy_redirect::sys::netns::{self, NetNs};

const SIZES: [usize; 3] = [64, 1024, 16 * 1024];
const ARMS: [&str; 2] = ["plain loopback", "bypass"];

struct Settings {
    rounds: usize,
    round_trips: usize,
    bulk_bytes: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "bypass-worker") {
        return worker(&args[i + 1..]);
    }
    if let Some(i) = args.iter().position(|a| a == "pod-worker") {
        return pod_worker(&args[i + 1..]);
    }
    let Some(quick) = report::start() else {
        return;
    };
    let settings = Settings {
        rounds: if quick { 2 } else { 7 },
        round_trips: if quick { 2_000 } else { 20_000 },
        bulk_bytes: if quick { 64 << 20 } else { 256 << 20 },
    };
    println!(
        "bypass: {} rounds, arms interleaved; {} round trips per size and round; \
         client on CPU 0, server on CPU 1; bypass in the host namespace, the pairs in a child one",
        settings.rounds, settings.round_trips
    );

    let name = unique("prbench-bypass");
    let netns = NetNs::create(&name).expect("netns");
    let arms = Arms::new(&name, &[]);
    let cgroups = [&arms.plain, &arms.bypassed];

    // [size][arm] -> one p50 / p99 per round; [arm] -> one rate per round.
    let mut p50 = vec![vec![Vec::new(); ARMS.len()]; SIZES.len()];
    let mut p99 = p50.clone();
    let mut bulk = vec![Vec::new(); ARMS.len()];
    for _ in 0..settings.rounds {
        for (s, size) in SIZES.iter().enumerate() {
            for (arm, cgroup) in cgroups.iter().enumerate() {
                let mut rtts = ping_pong(&netns, cgroup, *size, settings.round_trips);
                rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
                p50[s][arm].push(percentile(&rtts, 0.50));
                p99[s][arm].push(percentile(&rtts, 0.99));
            }
        }
        for (arm, cgroup) in cgroups.iter().enumerate() {
            bulk[arm].push(bulk_gbits(&netns, cgroup, settings.bulk_bytes));
        }
    }
    let (_, output, _) = arms.bypasser.stop();

    for (s, size) in SIZES.iter().enumerate() {
        println!("\nround trip, {size} B messages (median over rounds):");
        report::ratio_table("p50 us", &ARMS, &mut p50[s], 1);
        report::ratio_table("p99 us", &ARMS, &mut p99[s], 1);
    }
    println!("\nbulk, {} MiB one way:", settings.bulk_bytes >> 20);
    report::ratio_table("Gbit/s", &ARMS, &mut bulk, 1);
    // The bypass arm really took the bypass, and only it.
    println!(
        "\nbypass counters: {} sockets inserted, {} bytes redirected, {} messages passed",
        stat(&output, "inserted"),
        stat(&output, "bytes redirected"),
        stat(&output, "messages passed")
    );
    assert!(stat(&output, "bytes redirected") > 0, "{output}");
    pods(&settings);
}

const POD_ARMS: [&str; 2] = ["pods over veth", "pods across namespaces"];
const POD_SERVER: &str = "10.251.0.2:9500";

/// The pod-to-pod part: two pods on a bridge, the pairs in a plain cgroup
/// and in one of `bypass --across-namespaces`.
fn pods(settings: &Settings) {
    println!(
        "\npods: {} rounds, arms interleaved; client in pod a on CPU 0, server in pod b \
         on CPU 1, veths on a bridge in a node namespace; bypass --across-namespaces in the \
         host namespace",
        settings.rounds
    );
    let name = unique("prbench-pods");
    let node = NetNs::create(&format!("{name}-n")).expect("netns");
    node.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    node.ip(&["link", "set", "br0", "up"]).unwrap();
    let pods: Vec<NetNs> = ["10.251.0.1", "10.251.0.2"]
        .iter()
        .enumerate()
        .map(|(index, address)| {
            let pod = NetNs::create(&format!("{name}-p{index}")).unwrap();
            let port = format!("veth{index}");
            netns::veth_pair(&pod, "eth0", &node, &port).unwrap();
            node.ip(&["link", "set", &port, "master", "br0", "up"])
                .unwrap();
            pod.configure("eth0", &[&format!("{address}/24")]).unwrap();
            pod
        })
        .collect();
    let arms = Arms::new(&name, &["--across-namespaces"]);
    let cgroups = [&arms.plain, &arms.bypassed];
    let size = 1024;
    let mut p50 = vec![Vec::new(); POD_ARMS.len()];
    let mut p99 = p50.clone();
    let mut bulk = p50.clone();
    for _ in 0..settings.rounds {
        for (arm, cgroup) in cgroups.iter().enumerate() {
            let args = [
                "ping-pong".into(),
                size.to_string(),
                settings.round_trips.to_string(),
            ];
            let mut rtts: Vec<f64> = pod_pair(&pods, cgroup, &args)
                .into_iter()
                .map(|ns| ns / 1000.0)
                .collect();
            rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
            p50[arm].push(percentile(&rtts, 0.50));
            p99[arm].push(percentile(&rtts, 0.99));
        }
        for (arm, cgroup) in cgroups.iter().enumerate() {
            let args = ["bulk".into(), settings.bulk_bytes.to_string()];
            bulk[arm].push(pod_pair(&pods, cgroup, &args)[0]);
        }
    }
    let (_, output, _) = arms.bypasser.stop();
    println!("\npods, round trip, {size} B messages (median over rounds):");
    report::ratio_table("p50 us", &POD_ARMS, &mut p50, 1);
    report::ratio_table("p99 us", &POD_ARMS, &mut p99, 1);
    println!("\npods, bulk, {} MiB one way:", settings.bulk_bytes >> 20);
    report::ratio_table("Gbit/s", &POD_ARMS, &mut bulk, 1);
    println!(
        "\nbypass counters: {} pairs proven across namespaces, {} bytes redirected across, \
         {} messages passed",
        stat(&output, "across namespaces: pairs proven"),
        stat(&output, "bytes redirected across namespaces"),
        stat(&output, "messages passed")
    );
    assert!(
        stat(&output, "bytes redirected across namespaces") > 0,
        "{output}"
    );
}

/// One connection between the pods, the server in pod b, both in
/// `cgroup`; the client's numbers (ping-pong) or the server's (bulk).
fn pod_pair(pods: &[NetNs], cgroup: &ChildCgroup, args: &[String]) -> Vec<f64> {
    let exe = std::env::current_exe().unwrap();
    let mut server_args = vec!["pod-worker".to_owned(), "server".into(), POD_SERVER.into()];
    server_args.extend(args.iter().cloned());
    let server = Running::start(
        exe.to_str().unwrap(),
        &server_args,
        Some(&pods[1]),
        Some(cgroup),
        "listening",
    );
    let mut command =
        netns::command_in(exe.to_str().unwrap(), Some(&pods[0]), Some(cgroup)).unwrap();
    command
        .args(["pod-worker", "client", POD_SERVER])
        .args(args);
    let out = run(command);
    assert!(
        out.status.success(),
        "pod client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, server_out, _) = server.wait(Duration::from_secs(120));
    let numbers = match args[0].as_str() {
        "bulk" => server_out,
        _ => String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    numbers
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// A pod's end: `server ADDR MODE SIZE [COUNT]` on CPU 1, `client ADDR MODE
/// SIZE [COUNT]` on CPU 0; ping-pong round trips in ns (client) or the bulk
/// rate in Gbit/s (server).
fn pod_worker(args: &[String]) {
    let (side, addr, mode) = (args[0].as_str(), args[1].as_str(), args[2].as_str());
    let numbers: Vec<usize> = args[3..].iter().map(|a| a.parse().unwrap()).collect();
    if side == "server" {
        pin(1);
        let listener = TcpListener::bind(addr).unwrap();
        println!("listening");
        let (conn, _) = listener.accept().unwrap();
        let rate = serve_connection(conn, mode == "bulk", numbers[0]);
        if mode == "bulk" {
            println!("{rate}");
        }
        return;
    }
    pin(0);
    let client = TcpStream::connect(addr).unwrap();
    drive_connection(client, mode, &numbers);
}

/// The two arms' cgroups, a plain one and one where `bypass EXTRA` runs
/// (in the host namespace).
struct Arms {
    // Field order is drop order: bypass before its cgroups.
    bypasser: Running,
    plain: ChildCgroup,
    bypassed: ChildCgroup,
    _parent: ChildCgroup,
}

impl Arms {
    fn new(name: &str, extra: &[&str]) -> Arms {
        let root = cgroup::cgroup2_mount().expect("cgroup2");
        let parent = ChildCgroup::create(&root, name).expect("cgroup");
        let plain = ChildCgroup::create(parent.path(), "plain").unwrap();
        let bypassed = ChildCgroup::create(parent.path(), "bypass").unwrap();
        let mut args: Vec<String> = ["bypass", "-c"].map(String::from).to_vec();
        args.push(bypassed.path().display().to_string());
        args.extend(extra.iter().map(|a| a.to_string()));
        let bypasser = Running::start(BIN, &args, None, None, "Attached");
        Arms {
            bypasser,
            plain,
            bypassed,
            _parent: parent,
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs this binary as a worker inside the netns and cgroup; returns its
/// stdout's numbers.
fn run_worker(netns: &NetNs, cgroup: &ChildCgroup, args: &[String]) -> Vec<f64> {
    let exe = std::env::current_exe().unwrap();
    let mut command = netns::command_in(exe.to_str().unwrap(), Some(netns), Some(cgroup)).unwrap();
    command.arg("bypass-worker").args(args);
    let out = run(command);
    assert!(
        out.status.success(),
        "worker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect()
}

/// Round-trip times in microseconds.
fn ping_pong(netns: &NetNs, cgroup: &ChildCgroup, size: usize, count: usize) -> Vec<f64> {
    let args = vec!["ping-pong".into(), size.to_string(), count.to_string()];
    run_worker(netns, cgroup, &args)
        .into_iter()
        .map(|ns| ns / 1000.0)
        .collect()
}

fn bulk_gbits(netns: &NetNs, cgroup: &ChildCgroup, bytes: usize) -> f64 {
    let args = vec!["bulk".into(), bytes.to_string()];
    run_worker(netns, cgroup, &args)[0]
}

/// Pins the calling thread to one CPU, when the machine has it.
fn pin(cpu: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu % cores).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// The worker: a loopback server thread on CPU 1 and a client on CPU 0.
/// `ping-pong SIZE COUNT` prints each round trip in ns; `bulk BYTES` prints
/// the receiver's rate in Gbit/s.
fn worker(args: &[String]) {
    let mode = args[0].as_str();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let numbers: Vec<usize> = args[1..].iter().map(|a| a.parse().unwrap()).collect();
    let size = numbers[0];
    let bulk = mode == "bulk";
    let server = std::thread::spawn(move || {
        pin(1);
        let (conn, _) = listener.accept().unwrap();
        serve_connection(conn, bulk, size)
    });
    pin(0);
    let client = TcpStream::connect(addr).unwrap();
    drive_connection(client, mode, &numbers);
    let rate = server.join().unwrap();
    if bulk {
        println!("{rate}");
    }
}

/// The server's end of one connection: echoes `size`-byte messages, or
/// (`bulk`) reads to the end and returns the rate in Gbit/s.
fn serve_connection(mut conn: TcpStream, bulk: bool, size: usize) -> f64 {
    conn.set_nodelay(true).unwrap();
    if bulk {
        let mut buffer = vec![0u8; 256 * 1024];
        let mut received = 0usize;
        let mut start = None;
        loop {
            let n = conn.read(&mut buffer).unwrap();
            start.get_or_insert_with(Instant::now);
            if n == 0 {
                break;
            }
            received += n;
        }
        let seconds = start.unwrap().elapsed().as_secs_f64();
        return received as f64 * 8.0 / seconds / 1e9;
    }
    let mut buffer = vec![0u8; size];
    while conn.read_exact(&mut buffer).is_ok() {
        conn.write_all(&buffer).unwrap();
    }
    0.0
}

/// The client's end: `ping-pong SIZE COUNT` prints each round trip in ns;
/// `bulk BYTES` sends them and half-closes.
fn drive_connection(mut client: TcpStream, mode: &str, numbers: &[usize]) {
    let size = numbers[0];
    client.set_nodelay(true).unwrap();
    // Let both ends reach the map before measuring (or not, without bypass).
    std::thread::sleep(Duration::from_millis(10));
    match mode {
        "ping-pong" => {
            let count = numbers[1];
            let mut message = vec![0x5au8; size];
            let mut out = String::with_capacity(count * 7);
            for i in 0..count + count / 10 {
                let start = Instant::now();
                client.write_all(&message).unwrap();
                client.read_exact(&mut message).unwrap();
                // The first tenth warms up.
                if i >= count / 10 {
                    out.push_str(&format!("{} ", start.elapsed().as_nanos()));
                }
            }
            println!("{out}");
        }
        "bulk" => {
            let total = size;
            let chunk = vec![0xa5u8; 256 * 1024];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                client.write_all(&chunk[..n]).unwrap();
                sent += n;
            }
            client.shutdown(std::net::Shutdown::Write).unwrap();
            // Until the server has read everything.
            let _ = client.read(&mut [0u8; 1]);
        }
        other => panic!("unknown worker mode {other}"),
    }
}
