//! What the running kernel has, so that a test asserts which path the code
//! took (`make vm-test` runs the suite on 6.1 as well as on the host's
//! kernel) instead of skipping.

/// (major, minor) of the running kernel, from /proc/sys/kernel/osrelease
/// ("6.1.0-56-amd64" -> (6, 1)).
pub fn version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// tcx links arrived in 6.6: before that, TC programs attached in `auto`
/// mode must take the clsact fallback.
pub fn has_tcx() -> bool {
    version() >= (6, 6)
}

/// How an `auto` TC attachment is printed on this kernel (`links::TcPath`).
pub fn expected_tc_path() -> &'static str {
    if has_tcx() {
        "tcx link"
    } else {
        "clsact qdisc"
    }
}
