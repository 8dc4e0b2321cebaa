//! `make bench` for the service's lifecycle: what clients of port-nat see
//! when the service stops and is started again at once, as systemd's
//! `Restart=` or the kubelet would do it. A request loop (one HTTP request
//! every 10 ms, 1 s connect and read deadline) runs from the server netns
//! through `port-nat 8081 -> 18080` on the client's veth, in four arms,
//! interleaved:
//! - SIGUSR2, the hand-over an upgrade uses: the pins stay and the next
//!   start adopts them;
//! - SIGKILL, pinned: a crash; the next start adopts the pins;
//! - SIGKILL, unpinned: the same service with its pin directory off bpffs,
//!   so that nothing outlives the process (every restart before pins);
//! - SIGTERM, a cold restart (`systemctl restart`): the clean stop removes
//!   the pins.
//!
//! Per arm: failed requests, the longest stall (the longest time between
//! two answered requests), and the time from the stop signal to the new
//! service serving ("Service running"). `BENCH_QUICK=1` runs one round.

#[path = "../common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[allow(dead_code)]
mod report;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use proxy_redirect::sys::pins::PrivateBpffs;

const INTERVAL: Duration = Duration::from_millis(10);
const DEADLINE: Duration = Duration::from_secs(1);

fn main() {
    let Some(quick) = report::start() else {
        return;
    };
    let rounds = if quick { 1 } else { 5 };
    println!(
        "\n== A stop and an immediate start of the service, port-nat clients \
         (a request every {} ms; {rounds} rounds, interleaved) ==",
        INTERVAL.as_millis()
    );
    let testbed = Testbed::new();
    let _web = servers::http(&testbed.client, "[::]:18080").unwrap();
    let bpffs = PrivateBpffs::temporary().expect("mounting a bpffs");
    let plain = TempDir::new();
    let file =
        ConfigFile::new("[[port-nat]]\ninterface = \"veth-c\"\nfrom = [8081]\nto = [18080]\n");
    let arms = [
        (
            "SIGUSR2 hand-over (upgrade)",
            Signal::SIGUSR2,
            bpffs.pin_dir(),
        ),
        ("SIGKILL, pinned (crash)", Signal::SIGKILL, bpffs.pin_dir()),
        (
            "SIGKILL, unpinned (every restart before)",
            Signal::SIGKILL,
            plain.join("proxy-redirect"),
        ),
        ("SIGTERM (cold restart)", Signal::SIGTERM, bpffs.pin_dir()),
    ];
    let mut results: Vec<Vec<Outcome>> = vec![Vec::new(); arms.len()];
    for _ in 0..rounds {
        for ((_, signal, pin_dir), outcomes) in arms.iter().zip(&mut results) {
            outcomes.push(stop_and_restart(&testbed, &file, *signal, pin_dir));
        }
    }
    println!(
        "\n  {:<42} {:>10} {:>16} {:>18}",
        "arm", "failed", "longest stall ms", "signal to serve ms"
    );
    for ((name, _, _), outcomes) in arms.iter().zip(&mut results) {
        let mut failed: Vec<f64> = outcomes.iter().map(|o| o.failed as f64).collect();
        let mut stall: Vec<f64> = outcomes.iter().map(|o| o.longest_stall_ms).collect();
        let mut serving: Vec<f64> = outcomes.iter().map(|o| o.signal_to_serve_ms).collect();
        println!(
            "  {name:<42} {:>10.0} {:>16.1} {:>18.1}",
            report::median(&mut failed),
            report::median(&mut stall),
            report::median(&mut serving)
        );
    }
    println!("  (medians of the rounds; of about 200 requests a round)");
}

#[derive(Clone)]
struct Outcome {
    failed: usize,
    longest_stall_ms: f64,
    signal_to_serve_ms: f64,
}

fn start(testbed: &Testbed, file: &ConfigFile, pin_dir: &Path) -> Running {
    let pin_dir = pin_dir.display().to_string();
    start_service(
        &file.path,
        &["--pin-dir", &pin_dir],
        Some(&testbed.client),
        None,
    )
}

/// Starts the service, runs the request loop for 1 s, stops the service
/// with `signal`, starts it again at once, and runs the loop for 1 s more.
fn stop_and_restart(
    testbed: &Testbed,
    file: &ConfigFile,
    signal: Signal,
    pin_dir: &Path,
) -> Outcome {
    let service = start(testbed, file, pin_dir);
    let stop = Arc::new(AtomicBool::new(false));
    let target: SocketAddr = format!("{CLIENT_V4}:8081").parse().unwrap();
    let requests = testbed
        .server
        .spawn({
            let stop = stop.clone();
            move || Ok(request_loop(target, &stop))
        })
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let _ = service.stop_with(signal);
    let service = start(testbed, file, pin_dir);
    let signal_to_serve_ms = started.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let answered = requests.join().unwrap().unwrap();
    let (status, _, err) = service.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{err}");
    let failed = answered.iter().filter(|a| a.is_none()).count();
    let times: Vec<Instant> = answered.into_iter().flatten().collect();
    let longest_stall_ms = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    Outcome {
        failed,
        longest_stall_ms,
        signal_to_serve_ms,
    }
}

/// One request every INTERVAL until `stop`: the time each was answered, or
/// None when it failed.
fn request_loop(target: SocketAddr, stop: &AtomicBool) -> Vec<Option<Instant>> {
    let mut answered = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        answered.push(request(target).then(Instant::now));
        std::thread::sleep(INTERVAL.saturating_sub(began.elapsed()));
    }
    answered
}

fn request(target: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&target, DEADLINE) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(DEADLINE));
    if stream.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).is_ok() && reply.starts_with(b"HTTP/1.1 200")
}
