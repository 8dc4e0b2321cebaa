//! BPF program run time from the kernel's own statistics
//! (`kernel.bpf_stats_enabled`), shared by the benchmarks.

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

/// Run time and count of the first loaded program whose (15-character)
/// name starts with `name`, from `bpftool prog show`.
pub fn program(name: &str) -> Option<ProgramStats> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .ok()?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    progs.as_array()?.iter().find_map(|p| {
        p["name"].as_str()?.starts_with(name).then(|| ProgramStats {
            run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
            run_count: p["run_cnt"].as_u64().unwrap_or(0),
        })
    })
}

/// Turns the statistics on or off; returns the previous setting ("0"/"1").
pub fn set_enabled(enabled: bool) -> String {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, if enabled { "1" } else { "0" }).expect("kernel.bpf_stats_enabled");
    before.trim().to_owned()
}
