//! What every benchmark prints: the machine, and a table of medians with
//! ratios against the first arm and against a second baseline.

/// Whether the benchmark may run (root; under CI=true its absence fails),
/// after printing the machine; `Some(quick)` with `BENCH_QUICK` set.
pub fn start() -> Option<bool> {
    if !crate::common::have_root() {
        return None;
    }
    print_machine();
    Some(std::env::var("BENCH_QUICK").is_ok())
}

fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cores} x {cpu}, kernel {kernel}");
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// Prints each arm's median with its ratio to arm 0 and to arm `other`;
/// returns the medians.
pub fn ratio_table(unit: &str, names: &[&str], results: &mut [Vec<f64>], other: usize) -> Vec<f64> {
    let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
    println!(
        "\n  {:<36} {:>14} {:>12} {:>12}",
        "arm",
        unit,
        format!("vs {}", short(names[0])),
        format!("vs {}", short(names[other]))
    );
    for (name, value) in names.iter().zip(&medians) {
        println!(
            "  {name:<36} {value:>14.2} {:>11.2}x {:>11.2}x",
            value / medians[0],
            value / medians[other]
        );
    }
    medians
}

/// The first word of an arm's name, for column headers.
fn short(name: &str) -> &str {
    name.split_whitespace().next().unwrap_or(name)
}

/// How a target line ends: whether the run met it.
pub fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}
