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
    find(name, None)
}

/// The same, among the programs process `pid` holds: other instances of
/// the same programs (another test run on the machine) are not ours.
fn find(name: &str, ids: Option<&[u64]>) -> Option<ProgramStats> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .ok()?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let matching: Vec<&serde_json::Value> = progs
        .as_array()?
        .iter()
        .filter(|p| ids.is_none_or(|ids| p["id"].as_u64().is_some_and(|id| ids.contains(&id))))
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

/// The ids of the BPF programs behind process `pid`'s descriptors
/// (program and link descriptors both name theirs in fdinfo).
fn program_ids(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// Turns the statistics on or off; returns the previous setting ("0"/"1").
pub fn set_enabled(enabled: bool) -> String {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, if enabled { "1" } else { "0" }).expect("kernel.bpf_stats_enabled");
    before.trim().to_owned()
}

/// The statistics of each `(what, name)` program that process `pid`
/// loaded, now.
pub fn programs(programs: &[(&str, &str)], pid: u32) -> Vec<Option<ProgramStats>> {
    let ids = program_ids(pid);
    programs
        .iter()
        .map(|(_, name)| find(name, Some(&ids)))
        .collect()
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

/// Per program: time per call, calls and time per connection, over
/// `connections` connections between two snapshots; then the sum, in
/// nanoseconds per connection.
pub fn print_per_connection(
    what: &str,
    programs: &[(&str, &str)],
    start: &[Option<ProgramStats>],
    end: &[Option<ProgramStats>],
    connections: u64,
) -> f64 {
    println!("\n  BPF run time per {what} ({connections} connections):");
    let mut total = 0.0;
    for (((name, _), end), start) in programs.iter().zip(end).zip(start) {
        let Some((ns, calls)) = end
            .as_ref()
            .zip(start.as_ref())
            .and_then(|(b, a)| b.per_run_since(a))
        else {
            println!("    {name:<34}      no calls");
            continue;
        };
        let per_connection = calls as f64 / connections.max(1) as f64;
        total += ns * per_connection;
        println!(
            "    {name:<34} {ns:>6.0} ns x {per_connection:>5.2} calls = {:>7.0} ns",
            ns * per_connection
        );
    }
    println!("    {:<34} {total:>35.0} ns", "all programs");
    total
}

/// Nanoseconds per call of one program between two snapshots (0 without
/// calls).
pub fn per_call(start: &Option<ProgramStats>, end: &Option<ProgramStats>) -> f64 {
    start
        .as_ref()
        .zip(end.as_ref())
        .and_then(|(a, b)| b.per_run_since(a))
        .map_or(0.0, |(ns, _)| ns)
}

/// Calls of the first program between two snapshots.
pub fn calls_since(start: &[Option<ProgramStats>], end: &[Option<ProgramStats>]) -> u64 {
    match (start.first(), end.first()) {
        (Some(Some(a)), Some(Some(b))) => b.run_count - a.run_count,
        _ => 0,
    }
}
