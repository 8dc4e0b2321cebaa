//! Bulk throughput with iperf3, shared by the benchmarks: the server runs in
//! a namespace, the client is a command the benchmark places itself.

use std::process::Command;

use proxy_redirect::sys::netns::NetNs;

use crate::common::{run, Running};

pub fn start_server(ns: &NetNs, port: u16) -> Running {
    Running::start(
        "iperf3",
        &[
            "-s".into(),
            "-p".into(),
            port.to_string(),
            "--forceflush".into(),
        ],
        Some(ns),
        None,
        "Server listening",
    )
}

/// Received bits per second of `iperf3` (a command already placed in its
/// namespace or cgroup) sending to `server`:`port` for `seconds`.
pub fn bits_per_second(mut iperf3: Command, server: &str, port: u16, seconds: u32) -> f64 {
    iperf3.args([
        "-c",
        server,
        "-p",
        &port.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    let out = run(iperf3);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("iperf3: {}", String::from_utf8_lossy(&out.stderr)));
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 report: {report}"))
}
