//! The service across its own lifecycle, in namespaces the test makes and
//! on a bpffs of its own: SIGKILL in the middle of a transfer through
//! port-nat, then a restart that adopts the pinned links and flows; a pinned
//! state of another layout replaced with one line; `status` and `cleanup`
//! for what a killed service left; a clean stop that leaves nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use proxy_redirect::sys::netns;
use proxy_redirect::sys::pins::{self, PrivateBpffs};

/// A bpffs of the test's own: the service's pins are this test's alone,
/// and go with the mount even when the test fails.
fn private_bpffs() -> PrivateBpffs {
    PrivateBpffs::temporary().unwrap()
}

fn datapath_dir(bpffs: &PrivateBpffs) -> PathBuf {
    bpffs.pin_dir().join("port-nat-veth-c")
}

const CONFIG: &str = r#"# written by tests/lifecycle.rs
[[port-nat]]
interface = "veth-c"
from = [8081]
to = [18080]
"#;

fn start(testbed: &Testbed, file: &ConfigFile, bpffs: &PrivateBpffs) -> Running {
    start_build(BIN, testbed, file, bpffs)
}

/// The service of `program`, a build of the binary, in the client netns.
fn start_build(
    program: &str,
    testbed: &Testbed,
    file: &ConfigFile,
    bpffs: &PrivateBpffs,
) -> Running {
    let pin_dir = bpffs.pin_dir().display().to_string();
    start_service_of(
        program,
        &file.path,
        &["--pin-dir", &pin_dir],
        Some(&testbed.client),
        Some(&testbed.proxy),
    )
}

/// The service said it found pins of an earlier run and took them.
fn assert_adopting(service: &Running) {
    assert!(
        service.seen.iter().any(|l| l.contains("Adopting:")),
        "the start did not adopt the pins: {:?}",
        service.seen
    );
}

/// (link id, program id) of the tcx link pinned at `path`, as bpftool
/// reads it.
fn pinned_link(path: &Path) -> (u64, u64) {
    let mut command = Command::new("bpftool");
    command.args(["-j", "link", "show", "pinned"]).arg(path);
    let link: serde_json::Value = serde_json::from_slice(&run(command).stdout).unwrap();
    (
        link["id"].as_u64().unwrap(),
        link["prog_id"].as_u64().unwrap(),
    )
}

/// Each link kept its id and got a new program: swapped by link update,
/// not detached and attached again.
fn assert_updated_in_place(before: &[(u64, u64)], after: &[(u64, u64)]) {
    assert_eq!(before.len(), after.len());
    for ((link_before, prog_before), (link_after, prog_after)) in before.iter().zip(after) {
        assert_eq!(
            link_before, link_after,
            "the link was replaced, not updated"
        );
        assert_ne!(
            prog_before, prog_after,
            "the new program was not swapped in"
        );
    }
}

fn pinned_links(bpffs: &PrivateBpffs) -> Vec<(u64, u64)> {
    ["link-ingress", "link-egress"]
        .iter()
        .map(|name| pinned_link(&datapath_dir(bpffs).join(name)))
        .collect()
}

/// A file of `len` bytes served over HTTP on the client's :18080, and a
/// download of it from the server's side through :8081 (port-nat) at
/// `rate`, on a thread that checks every byte. The server streams and the
/// client only acknowledges: every reply must find its flow.
struct SlowDownload {
    _server: KillOnDrop,
    thread: std::thread::JoinHandle<()>,
}

fn slow_download(testbed: &Testbed, len: usize, rate: &str) -> SlowDownload {
    let dir = TempDir::new();
    let data = payload(len, 19);
    std::fs::write(dir.join("file"), &data).unwrap();
    let mut server = netns::command_in(PYTHON, Some(&testbed.client), None).unwrap();
    server.args(["-m", "http.server", "--bind", CLIENT_V4, "--directory"]);
    server.arg(dir.join("")).arg("18080");
    let server = KillOnDrop(
        server
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let fetch = || {
        let command = netns::command_in("curl", Some(&testbed.server), None).unwrap();
        curl(
            command,
            &format!("http://{CLIENT_V4}:8081/"),
            &["-o", "/dev/null"],
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !fetch().status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the file server never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut command = netns::command_in("curl", Some(&testbed.server), None).unwrap();
    command.args(["-sS", "--fail", "--max-time", "60", "--limit-rate", rate]);
    command.arg(format!("http://{CLIENT_V4}:8081/file"));
    let thread = std::thread::spawn(move || {
        let _dir = dir;
        let got = run(command).stdout;
        assert!(
            got == data,
            "{} bytes came through port-nat, not the {len} served",
            got.len()
        );
    });
    SlowDownload {
        _server: server,
        thread,
    }
}

fn proxy_redirect(args: &[&str]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args);
    command.output().unwrap()
}

#[test]
fn a_killed_service_leaves_port_nat_translating_and_a_restart_adopts_its_links_and_flows() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let file = ConfigFile::new(CONFIG);
    let service = start(&testbed, &file, &bpffs);
    let before = kernel::has_tcx().then(|| pinned_links(&bpffs));

    // 50 MB at 6 MiB/s: about 8 s, cut by a SIGKILL after 2 s.
    let download = slow_download(&testbed, 50_000_000, "6M");
    let transfer = &download.thread;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !transfer.is_finished(),
        "the transfer ended before the kill"
    );
    service.kill();
    std::thread::sleep(Duration::from_secs(1));

    let pin_dir = bpffs.pin_dir().display().to_string();
    let status = proxy_redirect(&["status", "--pin-dir", &pin_dir]);
    assert_one_line_error(
        &status,
        "status after a crash",
        "holds the pinned datapaths of one that did not stop cleanly: port-nat-veth-c",
    );

    let service = start(&testbed, &file, &bpffs);
    assert_adopting(&service);
    if let Some(before) = before {
        assert_updated_in_place(&before, &pinned_links(&bpffs));
        assert_eq!(tc_programs(&testbed.client, "veth-c"), 2);
    }
    assert!(
        !transfer.is_finished(),
        "the transfer ended before the restart"
    );
    download
        .thread
        .join()
        .expect("the transfer through port-nat broke");

    // A clean stop removes every pin and every link.
    let (out, _) = service.stop_ok();
    assert!(out.contains("Cleaned up"), "{out}");
    assert!(
        !bpffs.pin_dir().exists(),
        "a clean stop left {:?}",
        pins::pinned_datapaths(&bpffs.pin_dir())
    );
    assert_eq!(tc_programs(&testbed.client, "veth-c"), 0);
    let status = proxy_redirect(&["status", "--pin-dir", &pin_dir]);
    assert_one_line_error(
        &status,
        "status after a stop",
        "no proxy-redirect service is running",
    );
}

#[test]
fn a_pinned_state_of_another_layout_is_replaced_and_cleanup_removes_what_a_killed_service_left() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let _web = servers::http(&testbed.client, "[::]:18080").unwrap();
    let file = ConfigFile::new(CONFIG);
    start(&testbed, &file, &bpffs).kill();
    let before = kernel::has_tcx().then(|| pinned_links(&bpffs));

    // What another version would have written: the same names, another
    // layout record.
    let layout = datapath_dir(&bpffs).join("layout");
    std::fs::remove_file(&layout).unwrap();
    let mut command = Command::new("bpftool");
    command.args(["map", "create"]).arg(&layout);
    command.args([
        "type",
        "array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "1",
        "name",
        "pr_layout",
    ]);
    run(command);
    let mut command = Command::new("bpftool");
    command.args(["map", "update", "pinned"]).arg(&layout);
    command.args([
        "key", "0", "0", "0", "0", "value", "1", "2", "3", "4", "5", "6", "7", "8",
    ]);
    run(command);

    let service = start(&testbed, &file, &bpffs);
    let replaced: Vec<&String> = service
        .seen
        .iter()
        .filter(|l| l.contains("Replacing the pinned state"))
        .collect();
    assert_eq!(replaced.len(), 1, "{:?}", service.seen);
    assert!(
        replaced[0].contains("layout 0807060504030201"),
        "{}",
        replaced[0]
    );
    if let Some(before) = before {
        let after = pinned_links(&bpffs);
        let ids = |links: &[(u64, u64)]| links.iter().map(|l| l.0).collect::<Vec<_>>();
        assert_eq!(
            ids(&before),
            ids(&after),
            "links replaced instead of updated"
        );
    }
    let reply = curl(
        netns::command_in("curl", Some(&testbed.server), None).unwrap(),
        &format!("http://{CLIENT_V4}:8081/"),
        &[],
    );
    assert!(
        reply.status.success(),
        "port-nat after the replacement: {reply:?}"
    );

    // Killed again and not restarted: the datapath keeps translating,
    // unowned, until cleanup removes it.
    service.kill();
    let reply = curl(
        netns::command_in("curl", Some(&testbed.server), None).unwrap(),
        &format!("http://{CLIENT_V4}:8081/"),
        &[],
    );
    assert!(
        reply.status.success(),
        "port-nat with no service: {reply:?}"
    );
    let pin_dir = bpffs.pin_dir().display().to_string();
    let cleanup = proxy_redirect(&["cleanup", "--pin-dir", &pin_dir]);
    assert!(cleanup.status.success(), "{cleanup:?}");
    assert_eq!(
        String::from_utf8_lossy(&cleanup.stdout).trim(),
        format!("Removed from {pin_dir}: port-nat-veth-c")
    );
    // Before 6.6 the clsact filters were never pinned: the next start
    // replaces them, as after any crash.
    if kernel::has_tcx() {
        assert_eq!(tc_programs(&testbed.client, "veth-c"), 0);
    }
    let again = proxy_redirect(&["cleanup", "--pin-dir", &pin_dir]);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        format!("Nothing is pinned in {pin_dir}")
    );
}

#[test]
fn cleanup_refuses_the_pins_of_a_running_service_and_foreground_port_nat_pins_nothing() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let file = ConfigFile::new(CONFIG);
    let service = start(&testbed, &file, &bpffs);
    let pin_dir = bpffs.pin_dir().display().to_string();
    let cleanup = proxy_redirect(&["cleanup", "--pin-dir", &pin_dir]);
    assert_one_line_error(&cleanup, "cleanup of a running service", "owns");
    assert_eq!(
        pins::pinned_datapaths(&bpffs.pin_dir()),
        ["port-nat-veth-c"]
    );
    let (status, _, err) = service.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{err}");
    assert!(!bpffs.pin_dir().exists());

    let port_nat = start_attached(
        &testbed.client,
        None,
        &["port-nat", "-i", "veth-c", "-f", "8081", "-t", "18080"],
    );
    port_nat.kill();
    // Before 6.6 the clsact fallback's filters outlive a kill, as documented.
    if kernel::has_tcx() {
        assert_eq!(tc_programs(&testbed.client, "veth-c"), 0);
    }
}

#[test]
fn a_killed_service_leaves_redirect_refusing_rather_than_bypassing_the_proxy_and_a_restart_adopts_its_links(
) {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let web = servers::http(&testbed.server, "[::]:80").unwrap();
    let file = ConfigFile::new(&format!(
        "[redirect]\ncgroup = \"{}\"\nsockopt-cgroup = \"{}\"\nports = [80]\n\
         when-proxy-down = \"closed\"\n",
        testbed.apps.path().display(),
        testbed.parent.path().display()
    ));
    let url = format!("http://{SERVER_V4}/");
    let service = start(&testbed, &file, &bpffs);
    curl_ok(testbed.in_apps("curl"), &url);
    let links = bpffs.pin_dir().join("redirect");
    let connect4 = links.join("link-redirect_connect4");
    let before = [pinned_link(&connect4)];

    // Nothing runs: the programs stay, find no proxy listening, and refuse.
    service.kill();
    let served = web.peers().len();
    let gap = curl(testbed.in_apps("curl"), &url, &[]);
    assert_eq!(
        gap.status.code(),
        Some(7),
        "not refused while no proxy runs: {gap:?}"
    );
    assert_eq!(
        web.peers().len(),
        served,
        "a connection went around the proxy"
    );

    let service = start(&testbed, &file, &bpffs);
    assert_adopting(&service);
    assert_updated_in_place(&before, &[pinned_link(&connect4)]);
    assert_eq!(
        testbed.attached_redirect_programs(),
        std::fs::read_dir(&links).unwrap().count() as u32 - 1,
        "every attached program is pinned once (and the layout record)"
    );
    curl_ok(testbed.in_apps("curl"), &url);
    service.stop_ok();
    assert!(!bpffs.pin_dir().exists());
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

/// A copy of the binary that differs from it (bytes appended after the
/// ELF, which the loader ignores), as an upgrade would bring.
fn another_build(dir: &TempDir) -> String {
    let copy = dir.join("proxy-redirect-next");
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(b"another build");
    std::fs::write(&copy, bytes).unwrap();
    std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    copy.display().to_string()
}

#[test]
fn sigusr2_hands_port_nat_mid_download_to_another_build_which_adopts_it() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let dir = TempDir::new();
    let next = another_build(&dir);
    let file = ConfigFile::new(CONFIG);
    let service = start(&testbed, &file, &bpffs);
    let before = kernel::has_tcx().then(|| pinned_links(&bpffs));

    let download = slow_download(&testbed, 50_000_000, "6M");
    std::thread::sleep(Duration::from_secs(2));
    let (status, out, err) = service.stop_with(Signal::SIGUSR2);
    assert_eq!(status.code(), Some(75), "{out}\n{err}");
    assert!(
        out.contains("Handed over: the datapaths pinned in"),
        "{out}"
    );
    assert_eq!(
        pins::pinned_datapaths(&bpffs.pin_dir()),
        ["port-nat-veth-c"]
    );

    let service = start_build(&next, &testbed, &file, &bpffs);
    assert_adopting(&service);
    if let Some(before) = before {
        assert_updated_in_place(&before, &pinned_links(&bpffs));
    }
    assert!(
        !download.thread.is_finished(),
        "the transfer ended before the hand-over"
    );
    download
        .thread
        .join()
        .expect("the transfer through port-nat broke");
    service.stop_ok();
    assert!(!bpffs.pin_dir().exists());
}

fn redirect_config(testbed: &Testbed, proxy_port: u16, mark: u32) -> String {
    format!(
        "[redirect]\ncgroup = \"{}\"\nsockopt-cgroup = \"{}\"\nports = [80]\n\
         when-proxy-down = \"closed\"\nproxy-port = {proxy_port}\nmark = {mark}\n",
        testbed.apps.path().display(),
        testbed.parent.path().display()
    )
}

#[test]
fn a_new_proxy_port_and_mark_that_a_reload_refuses_apply_through_a_hand_over_in_the_same_links() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();
    let file = ConfigFile::new(&redirect_config(&testbed, 15001, 0x5052));
    let url = format!("http://{SERVER_V4}/");
    let service = start(&testbed, &file, &bpffs);
    curl_ok(testbed.in_apps("curl"), &url);
    let connect4 = bpffs.pin_dir().join("redirect/link-redirect_connect4");
    let before = [pinned_link(&connect4)];

    // A reload refuses the new port and mark...
    file.reload(&service, &redirect_config(&testbed, 15002, 0x6000));
    std::thread::sleep(Duration::from_secs(1));
    // ...and a hand-over applies them.
    let (status, out, err) = service.stop_with(Signal::SIGUSR2);
    assert!(err.contains("cannot change while running"), "{err}");
    assert_eq!(status.code(), Some(75), "{out}\n{err}");
    let service = start(&testbed, &file, &bpffs);
    let proxy_line = service.seen.iter().find(|l| l.contains("proxy:"));
    assert!(
        proxy_line.is_some_and(|l| l.contains(":15002")),
        "{:?}",
        service.seen
    );
    assert!(
        service
            .seen
            .iter()
            .any(|l| l.contains("upstream mark 0x6000")),
        "{:?}",
        service.seen
    );
    assert_updated_in_place(&before, &[pinned_link(&connect4)]);
    curl_ok(testbed.in_apps("curl"), &url);
    let mut listening = netns::command_in("ss", Some(&testbed.client), None).unwrap();
    listening.args(["-Hltn", "sport", "= :15001"]);
    assert_eq!(
        String::from_utf8_lossy(&run(listening).stdout).trim(),
        "",
        "the old proxy port still listens"
    );
    service.stop_ok();
    assert!(!bpffs.pin_dir().exists());
}

#[test]
fn a_neighbours_tc_program_keeps_seeing_its_packets_across_a_crash_and_the_adoption() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let _stats = common::foreign::Stats::enable();
    let bpffs = private_bpffs();
    let _web = servers::http(&testbed.client, "[::]:18080").unwrap();
    let file = ConfigFile::new(CONFIG);
    let service = start(&testbed, &file, &bpffs);
    let mut foreign = common::foreign::Foreign::load();
    foreign.attach(&testbed.client, "veth-c", true);
    let url = format!("http://{CLIENT_V4}:8081/");
    let through_port_nat = |what: &str| {
        let before = foreign.runs();
        let reply = curl(
            netns::command_in("curl", Some(&testbed.server), None).unwrap(),
            &url,
            &[],
        );
        assert!(reply.status.success(), "port-nat {what}: {reply:?}");
        assert!(foreign.runs() > before, "the neighbour saw nothing {what}");
    };
    through_port_nat("with the service");
    service.kill();
    through_port_nat("with no service");
    let service = start(&testbed, &file, &bpffs);
    assert_adopting(&service);
    through_port_nat("after the adoption");
    if kernel::has_tcx() {
        assert_eq!(
            tc_programs(&testbed.client, "veth-c"),
            4,
            "ours and the neighbour's"
        );
    }
    service.stop_ok();

    // After a clean stop 8081 is no longer translated, and the
    // neighbour's programs are still there, seeing the refused attempt.
    let before = foreign.runs();
    let reply = curl(
        netns::command_in("curl", Some(&testbed.server), None).unwrap(),
        &url,
        &[],
    );
    assert!(
        !reply.status.success(),
        "8081 still translated after the stop"
    );
    assert!(foreign.runs() > before, "the neighbour lost its programs");
    if kernel::has_tcx() {
        assert_eq!(
            tc_programs(&testbed.client, "veth-c"),
            2,
            "the neighbour's alone"
        );
    }
}
