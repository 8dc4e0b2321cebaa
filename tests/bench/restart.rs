//! `make bench` for the service's lifecycle: what clients see when the
//! service is upgraded, or stops and is started again at once (as
//! systemd's `Restart=` or the kubelet would). One service runs redirect
//! (built-in proxy, `when-proxy-down = "closed"`) and port-nat; two request
//! loops (tests/common/loops.py: a new connection and one HTTP request
//! every 10 ms, 1 s deadline) run through them, one from the redirected
//! cgroup to the server (whose direct path is rejected, so that a request
//! that goes around the proxy fails), one from the server netns through
//! `port-nat 8081 -> 18080` on the client's veth. Four arms, interleaved:
//! - upgrade: SIGUSR2, the new process takes the sockets and pins over;
//! - SIGKILL, pinned: a crash; the next start adopts the pins;
//! - SIGKILL, unpinned: the same service with its pin directory off bpffs,
//!   so that nothing outlives the process (every restart before pins);
//! - SIGTERM, a cold restart (`systemctl restart`): the clean stop removes
//!   the pins.
//!
//! Per arm and loop: failed requests and the longest stall (the longest
//! time between the starts of two answered requests); per arm, the time
//! from the signal to the new process serving ("Service running").
//! `BENCH_QUICK=1` runs one round.

#[path = "../common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[allow(dead_code)]
mod report;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use proxy_redirect::sys::netns::NetNs;
use proxy_redirect::sys::pins::PrivateBpffs;

const LOOPS: &str = include_str!("../common/loops.py");
const INTERVAL_MS: &str = "10";

#[derive(Clone, Copy)]
enum Action {
    Upgrade,
    Restart(Signal),
}

fn main() {
    let Some(quick) = report::start() else {
        return;
    };
    let rounds = if quick { 1 } else { 5 };
    println!(
        "\n== An upgrade, or a stop and an immediate start, of the service running redirect \
         (built-in proxy) and port-nat, as their clients see it (a request every \
         {INTERVAL_MS} ms through each; {rounds} rounds, interleaved) =="
    );
    let testbed = Testbed::new();
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();
    let _nat_web = servers::http(&testbed.client, "[::]:18080").unwrap();
    testbed.reject_direct(&testbed.apps, "tcp", 80);
    let bpffs = PrivateBpffs::temporary().expect("mounting a bpffs");
    let plain = TempDir::new();
    let file = ConfigFile::new(&format!(
        "[redirect]\ncgroup = \"{}\"\nsockopt-cgroup = \"{}\"\nports = [80]\n\
         when-proxy-down = \"closed\"\n\n[[port-nat]]\ninterface = \"veth-c\"\n\
         from = [8081]\nto = [18080]\n",
        testbed.apps.path().display(),
        testbed.parent.path().display()
    ));
    let arms = [
        (
            "upgrade (SIGUSR2 hand-over)",
            Action::Upgrade,
            bpffs.pin_dir(),
        ),
        (
            "SIGKILL + start, pinned (crash)",
            Action::Restart(Signal::SIGKILL),
            bpffs.pin_dir(),
        ),
        (
            "SIGKILL + start, unpinned (before pins)",
            Action::Restart(Signal::SIGKILL),
            plain.join("proxy-redirect"),
        ),
        (
            "SIGTERM + start (cold restart)",
            Action::Restart(Signal::SIGTERM),
            bpffs.pin_dir(),
        ),
    ];
    let mut results: Vec<Vec<Outcome>> = vec![Vec::new(); arms.len()];
    for _ in 0..rounds {
        for ((_, action, pin_dir), outcomes) in arms.iter().zip(&mut results) {
            outcomes.push(one_round(&testbed, &file, *action, pin_dir));
        }
    }
    println!(
        "\n  {:<40} {:>14} {:>14} {:>14} {:>14} {:>12}",
        "arm", "redirect fail", "stall ms", "port-nat fail", "stall ms", "to serve ms"
    );
    for ((name, _, _), outcomes) in arms.iter().zip(&mut results) {
        let median = |f: &dyn Fn(&Outcome) -> f64| {
            let mut values: Vec<f64> = outcomes.iter().map(f).collect();
            report::median(&mut values)
        };
        println!(
            "  {name:<40} {:>14.0} {:>14.1} {:>14.0} {:>14.1} {:>12.1}",
            median(&|o| o.redirect.failed as f64),
            median(&|o| o.redirect.longest_ms),
            median(&|o| o.port_nat.failed as f64),
            median(&|o| o.port_nat.longest_ms),
            median(&|o| o.signal_to_serve_ms),
        );
    }
    println!("  (medians of the rounds; of about 200 requests a loop and round)");
}

#[derive(Clone)]
struct Outcome {
    redirect: LoopResult,
    port_nat: LoopResult,
    signal_to_serve_ms: f64,
}

#[derive(Clone)]
struct LoopResult {
    failed: u64,
    longest_ms: f64,
}

fn start(testbed: &Testbed, file: &ConfigFile, pin_dir: &Path) -> Running {
    let pin_dir = pin_dir.display().to_string();
    start_service(
        &file.path,
        &["--pin-dir", &pin_dir],
        Some(&testbed.client),
        Some(&testbed.proxy),
    )
}

/// loops.py's HTTP loop to `host:port` in `netns` (and `cgroup`) until
/// `stop` exists.
fn request_loop(
    netns: &NetNs,
    cgroup: Option<&proxy_redirect::sys::cgroup::ChildCgroup>,
    host: &str,
    port: &str,
    stop: &Path,
) -> Running {
    let mut args: Vec<String> = ["-c", LOOPS, "http", host, port, INTERVAL_MS]
        .map(String::from)
        .to_vec();
    args.push(stop.display().to_string());
    Running::start(PYTHON, &args, Some(netns), cgroup, "started")
}

fn loop_result(looping: Running) -> LoopResult {
    let (_, out, err) = looping.stop_with(Signal::SIGCONT);
    let line = out
        .lines()
        .find(|l| l.starts_with("ok "))
        .unwrap_or_else(|| panic!("no result from the loop: {out}\n{err}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    LoopResult {
        failed: words[3].parse().unwrap(),
        longest_ms: words[5].parse().unwrap(),
    }
}

/// Starts the service, runs both request loops for 1 s, applies `action`,
/// and runs the loops for 1 s more.
fn one_round(testbed: &Testbed, file: &ConfigFile, action: Action, pin_dir: &Path) -> Outcome {
    let mut service = start(testbed, file, pin_dir);
    let dir = TempDir::new();
    let stop: PathBuf = dir.join("stop");
    let redirect = request_loop(&testbed.client, Some(&testbed.apps), SERVER_V4, "80", &stop);
    let port_nat = request_loop(&testbed.server, None, CLIENT_V4, "8081", &stop);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    match action {
        Action::Upgrade => {
            service.upgrade();
        }
        Action::Restart(signal) => {
            let _ = service.stop_with(signal);
            service = start(testbed, file, pin_dir);
        }
    }
    let signal_to_serve_ms = started.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&stop, "").unwrap();
    let outcome = Outcome {
        redirect: loop_result(redirect),
        port_nat: loop_result(port_nat),
        signal_to_serve_ms,
    };
    let (status, _, err) = service.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{err}");
    outcome
}
