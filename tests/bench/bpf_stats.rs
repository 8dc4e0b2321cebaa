//! BPF program run time from the kernel's own statistics
//! (`kernel.bpf_stats_enabled`), shared by the benchmarks (each uses part).
#![allow(dead_code)]

use std::process::Command;

pub struct ProgramStats {
    pub run_time_ns: u64,
    pub run_count: u64,
}

impl ProgramStats {
    /// Nanoseconds per run between two snapshots, with the number of runs.
    pub fn per_run_since(&self, earlier: &ProgramStats) -> Option<(f64, u64)> {
        let runs = self.run_count.checked_sub(earlier.run_count)?;
        (runs > 0).then(|| {
            (
                (self.run_time_ns - earlier.run_time_ns) as f64 / runs as f64,
                runs,
            )
        })
    }
}

/// Run time and count of the loaded programs whose name (bpftool shows
/// the full name, from BTF) starts with `name`, summed: a benchmark may run
/// two instances (a subcommand and the service).
pub fn program(name: &str) -> Option<ProgramStats> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .ok()?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let matching: Vec<&serde_json::Value> = progs
        .as_array()?
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .collect();
    (!matching.is_empty()).then(|| ProgramStats {
        run_time_ns: matching
            .iter()
            .map(|p| p["run_time_ns"].as_u64().unwrap_or(0))
            .sum(),
        run_count: matching
            .iter()
            .map(|p| p["run_cnt"].as_u64().unwrap_or(0))
            .sum(),
    })
}

/// Turns the statistics on or off; returns the previous setting ("0"/"1").
pub fn set_enabled(enabled: bool) -> String {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, if enabled { "1" } else { "0" }).expect("kernel.bpf_stats_enabled");
    before.trim().to_owned()
}

/// The statistics of each `(what, name)` program, now.
pub fn programs(programs: &[(&str, &str)]) -> Vec<Option<ProgramStats>> {
    programs.iter().map(|(_, name)| program(name)).collect()
}

/// One line per program: its run time per call between two snapshots
/// taken with [`programs`].
pub fn print_per_call(
    programs: &[(&str, &str)],
    start: &[Option<ProgramStats>],
    end: &[Option<ProgramStats>],
) {
    println!("\n  BPF run time per call (kernel.bpf_stats_enabled):");
    for (((what, _), end), start) in programs.iter().zip(end).zip(start) {
        if let Some((ns, calls)) = end
            .as_ref()
            .zip(start.as_ref())
            .and_then(|(b, a)| b.per_run_since(a))
        {
            println!("    {what:<34} {ns:>6.0} ns over {calls} calls");
        }
    }
}
