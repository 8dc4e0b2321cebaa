//! `proxy-redirect demo` as `sudo make demo` runs it: it must succeed,
//! show the transfer surviving the crash, and leave nothing behind.

#[allow(unused_imports)]
mod common;

use common::*;

#[test]
fn the_demo_succeeds_and_leaves_nothing_behind() {
    require_root!();
    let netns_before = netns_names();
    let mut demo = std::process::Command::new(BIN);
    demo.arg("demo");
    let out = run(demo);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("came back intact"), "{stdout}");
    assert!(
        stdout.contains("250 of 250 short requests answered"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Drained: 1 connection(s) ended, 0 cut"),
        "{stdout}"
    );
    assert!(stdout.contains("Adopting:"), "{stdout}");
    assert!(
        stdout.contains("holds the pinned datapaths of one that did not stop cleanly"),
        "{stdout}"
    );
    assert_eq!(
        netns_names(),
        netns_before,
        "the demo left a network namespace"
    );
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("proxy-redirect-demo-"))
        .collect();
    assert!(leftovers.is_empty(), "the demo left {leftovers:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("proxy-redirect-demo-"),
        "the demo left a mount"
    );
    let root = proxy_redirect::sys::cgroup::cgroup2_mount().unwrap();
    let cgroups: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("proxy-redirect-demo-")
        })
        .collect();
    assert!(cgroups.is_empty(), "the demo left a cgroup");
}

fn netns_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("pr-demo-"))
        .collect();
    names.sort();
    names
}
