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
use proxy_redirect::sys::cgroup::ChildCgroup;
use proxy_redirect::sys::netns::{self, NetNs};
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
    // In port-nat's network namespace, where (before 6.6) its clsact
    // filters, which no pin holds, are removed too.
    let mut cleanup = netns::command_in(BIN, Some(&testbed.client), None).unwrap();
    cleanup.args(["cleanup", "--pin-dir", &pin_dir]);
    let cleanup = run(cleanup);
    assert!(cleanup.status.success(), "{cleanup:?}");
    let said = String::from_utf8_lossy(&cleanup.stdout);
    assert!(
        said.trim()
            .ends_with(&format!("Removed from {pin_dir}: port-nat-veth-c")),
        "{said}"
    );
    assert_eq!(said.contains("clsact filter"), !kernel::has_tcx(), "{said}");
    assert_eq!(tc_programs(&testbed.client, "veth-c"), 0);
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
    let pinned_links = std::fs::read_dir(&links)
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("link-"))
        .count();
    assert_eq!(
        testbed.attached_redirect_programs(),
        pinned_links as u32,
        "every attached program is pinned once"
    );
    curl_ok(testbed.in_apps("curl"), &url);
    service.stop_ok();
    assert!(!bpffs.pin_dir().exists());
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

#[test]
fn a_killed_service_with_when_proxy_down_open_lets_connections_go_direct_until_it_is_back() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let web = servers::http(&testbed.server, "[::]:80").unwrap();
    let file = ConfigFile::new(&format!(
        "[redirect]\ncgroup = \"{}\"\nsockopt-cgroup = \"{}\"\nports = [80]\n",
        testbed.apps.path().display(),
        testbed.parent.path().display()
    ));
    let url = format!("http://{SERVER_V4}/");
    let service = start(&testbed, &file, &bpffs);
    curl_ok(testbed.in_apps("curl"), &url);

    // The built-in proxy's listening socket died with it: the programs
    // that stay must not take it for a proxy still listening.
    service.kill();
    let served = web.peers().len();
    curl_ok(testbed.in_apps("curl"), &url);
    assert_eq!(web.peers().len(), served + 1);

    let service = start(&testbed, &file, &bpffs);
    assert_adopting(&service);
    curl_ok(testbed.in_apps("curl"), &url);
    let (output, _) = service.stop_ok();
    assert!(stat(&output, "redirected") >= 1, "{output}");
}

/// A copy of BIN at a path of the test's own, from which the service
/// starts: an upgrade replaces the file there, as install(1) does.
fn installed_build(dir: &TempDir) -> String {
    let path = dir.join("proxy-redirect");
    // cp, not std::fs::copy: a descriptor another test thread's fork
    // inherits mid-copy would make the exec fail with "Text file busy".
    let mut command = Command::new("cp");
    command.arg(BIN).arg(&path);
    assert!(run(command).status.success());
    path.display().to_string()
}

/// Installs a build that differs from BIN (bytes appended after the ELF,
/// which the loader ignores) at `path`, by a rename over the file there,
/// as an upgrade would bring it.
fn install_another_build(path: &str) {
    let next = format!("{path}.next");
    let mut bytes = std::fs::read(BIN).unwrap();
    bytes.extend_from_slice(ANOTHER_BUILD);
    std::fs::write(&next, bytes).unwrap();
    std::fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&next, path).unwrap();
}

const ANOTHER_BUILD: &[u8] = b"another build";

/// Whether process `pid` runs the build install_another_build wrote.
fn runs_another_build(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.ends_with(ANOTHER_BUILD))
}

#[test]
fn sigusr2_hands_port_nat_mid_download_to_another_build_which_adopts_it() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let dir = TempDir::new();
    let program = installed_build(&dir);
    let file = ConfigFile::new(CONFIG);
    let mut service = start_build(&program, &testbed, &file, &bpffs);
    let before = kernel::has_tcx().then(|| pinned_links(&bpffs));

    let download = slow_download(&testbed, 50_000_000, "6M");
    std::thread::sleep(Duration::from_secs(2));
    install_another_build(&program);
    let old = service.pid();
    let new = service.upgrade();
    assert!(
        runs_another_build(new),
        "pid {new} does not run the new build"
    );
    assert!(
        service
            .seen
            .iter()
            .any(|l| l.starts_with(&format!("Taking over from pid {old}"))),
        "{:?}",
        service.seen
    );
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
    let (status, out, err) = service.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{err}");
    assert!(
        out.contains(&format!(
            "Handed over: the datapaths pinned in {} stay with pid {new}",
            bpffs.pin_dir().display()
        )),
        "{out}"
    );
    assert!(!bpffs.pin_dir().exists());
    assert_eq!(tc_programs(&testbed.client, "veth-c"), 0);
}

fn redirect_config(testbed: &Testbed, proxy_port: u16, mark: u32) -> String {
    format!(
        "[redirect]\ncgroup = \"{}\"\nsockopt-cgroup = \"{}\"\nports = [80]\n\
         when-proxy-down = \"closed\"\nproxy-port = {proxy_port}\nmark = {mark}\n",
        testbed.apps.path().display(),
        testbed.parent.path().display()
    )
}

fn listening(testbed: &Testbed, port: u16) -> String {
    let mut listening = netns::command_in("ss", Some(&testbed.client), None).unwrap();
    listening.args(["-Hltn", &format!("sport = :{port}")]);
    String::from_utf8_lossy(&run(listening).stdout)
        .trim()
        .to_owned()
}

#[test]
fn a_new_proxy_port_and_mark_that_a_reload_refuses_apply_through_an_upgrade_in_the_same_links() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();
    let _nat_web = servers::http(&testbed.client, "[::]:18080").unwrap();
    // port-nat too, which the new file drops.
    let file = ConfigFile::new(&format!(
        "{}{CONFIG}",
        redirect_config(&testbed, 15001, 0x5052)
    ));
    let url = format!("http://{SERVER_V4}/");
    let nat_url = format!("http://{CLIENT_V4}:8081/");
    let through_port_nat = || {
        curl(
            netns::command_in("curl", Some(&testbed.server), None).unwrap(),
            &nat_url,
            &[],
        )
        .status
        .success()
    };
    let mut service = start(&testbed, &file, &bpffs);
    curl_ok(testbed.in_apps("curl"), &url);
    let connect4 = bpffs.pin_dir().join("redirect/link-redirect_connect4");
    let before = [pinned_link(&connect4)];

    // A reload refuses the new port and mark...
    file.reload(&service, &redirect_config(&testbed, 15002, 0x6000));
    assert!(service
        .wait_for_line(
            |l| l.contains("Service running"),
            Duration::from_millis(500)
        )
        .is_none());
    // ...and an upgrade applies them.
    assert!(through_port_nat());
    service.upgrade();
    let detached = service.wait_for_line(
        |l| l == "Detached port-nat veth-c, which the new configuration does not have",
        Duration::from_secs(20),
    );
    assert!(detached.is_some(), "{:?}", service.seen);
    assert!(!through_port_nat(), "port-nat still translates");
    assert_eq!(tc_programs(&testbed.client, "veth-c"), 0);
    assert_eq!(pins::pinned_datapaths(&bpffs.pin_dir()), ["redirect"]);
    let proxy_line = service.seen.iter().rev().find(|l| l.contains("proxy:"));
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
    assert!(!listening(&testbed, 15002).is_empty());
    // The process before closed the old port once it handed over.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !listening(&testbed, 15001).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the old proxy port still listens"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, err) = service.stop_ok();
    assert!(err.contains("cannot change while running"), "{err}");
    assert!(!bpffs.pin_dir().exists());
}

#[test]
fn a_successor_that_fails_leaves_the_service_serving_as_it_was() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();
    let good = redirect_config(&testbed, 15001, 0x5052);
    let file = ConfigFile::new(&good);
    let url = format!("http://{SERVER_V4}/");
    let mut service = start(&testbed, &file, &bpffs);
    let pid = service.pid();

    // A file the new process refuses: it exits before taking anything.
    std::fs::write(&file.path, "[redirect]\nports = [70000]\n").unwrap();
    // The status page is published once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let upgrade = proxy_redirect(&["upgrade"]);
    assert_one_line_error(
        &upgrade,
        "a refused upgrade",
        &format!("exited (exit status: 1) without taking over; the service (pid {pid}) goes on"),
    );
    assert_eq!(service.pid(), pid);
    curl_ok(testbed.in_apps("curl"), &url);

    // Fixed, the same command upgrades.
    std::fs::write(&file.path, &good).unwrap();
    let mut upgrade = None;
    let new = service
        .upgrade_with(|_| upgrade = Some(std::thread::spawn(|| proxy_redirect(&["upgrade"]))));
    let upgrade = upgrade.unwrap().join().unwrap();
    assert!(upgrade.status.success(), "{upgrade:?}");
    assert!(
        String::from_utf8_lossy(&upgrade.stdout).starts_with(&format!("Upgraded: pid {pid} ")),
        "{upgrade:?}"
    );
    assert_ne!(new, pid);
    curl_ok(testbed.in_apps("curl"), &url);
    let (out, err) = service.stop_ok();
    assert!(err.contains("port 70000 is out of range"), "{err}");
    assert!(out.contains("Cleaned up"), "{out}");
    assert!(!bpffs.pin_dir().exists());
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

/// Two pods of a DaemonSet, each in a cgroup of its own beside the
/// redirected one, with a web server to reach through them and their
/// redirect config (no sockopt-cgroup).
struct TwoPods {
    _web: servers::Server,
    file: ConfigFile,
    old_pod: ChildCgroup,
    new_pod: ChildCgroup,
    url: String,
}

fn two_pods(testbed: &Testbed) -> TwoPods {
    TwoPods {
        _web: servers::http(&testbed.server, "[::]:80").unwrap(),
        file: ConfigFile::new(&format!(
            "[redirect]\ncgroup = \"{}\"\nports = [80]\n",
            testbed.apps.path().display()
        )),
        old_pod: ChildCgroup::create(testbed.parent.path(), "old-pod").unwrap(),
        new_pod: ChildCgroup::create(testbed.parent.path(), "new-pod").unwrap(),
        url: format!("http://{SERVER_V4}/"),
    }
}

#[test]
fn a_new_process_started_with_take_over_takes_the_place_of_the_running_one_as_a_rollout_would() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    // No sockopt-cgroup: each pod answers SO_ORIGINAL_DST in its own
    // cgroup, and the new one must keep answering for the listening
    // sockets it takes over, which stay in the old pod's.
    let pods = two_pods(&testbed);
    let pin_dir = bpffs.pin_dir().display().to_string();
    // What a DaemonSet's pods run: the old pod, then the new one beside it
    // (maxSurge: 1), each under the kubelet, which restarts what exits.
    let args = [
        "--pin-dir",
        &pin_dir,
        "--take-over",
        "--stay-after-hand-over",
    ];
    let notify = Notifications::new();
    let mut old = Running::start_env(
        BIN,
        &service_args(&pods.file.path, &args),
        Some(&testbed.client),
        Some(&pods.old_pod),
        "Service running",
        &[("NOTIFY_SOCKET", &notify.path())],
    );
    assert_eq!(notify.next(), "READY=1");
    curl_ok(testbed.in_apps("curl"), &pods.url);
    assert_eq!(answered_in(pods.old_pod.path()), [pods.old_pod.path()]);
    let mut new = Running::start_env(
        BIN,
        &service_args(&pods.file.path, &args),
        Some(&testbed.client),
        Some(&pods.new_pod),
        "Service running",
        &[("NOTIFY_SOCKET", &notify.path())],
    );
    assert!(
        new.seen
            .iter()
            .any(|l| l.starts_with(&format!("Taking over from pid {}", old.pid()))),
        "{:?}",
        new.seen
    );
    assert_eq!(notify.next(), format!("MAINPID={}", new.pid()));
    assert_eq!(notify.next(), "READY=1");
    curl_ok(testbed.in_apps("curl"), &pods.url);
    let told = new.wait_for_line(
        |l| l.starts_with("The predecessor") && l.contains("let go"),
        Duration::from_secs(20),
    );
    assert!(told.is_some(), "{:?}", new.seen);

    // The old one drained and waits; its SIGTERM leaves the new one's pins.
    let waiting = old.wait_for_line(
        |l| l.starts_with("Waiting for SIGTERM"),
        Duration::from_secs(20),
    );
    assert!(waiting.is_some(), "{:?}", old.seen);
    let (status, out, err) = old.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{err}");
    assert!(
        out.contains("Drained: 0 connection(s) ended, 0 cut"),
        "{out}"
    );
    assert_eq!(pins::pinned_datapaths(&bpffs.pin_dir()), ["redirect"]);
    curl_ok(testbed.in_apps("curl"), &pods.url);
    assert_eq!(answered_in(pods.old_pod.path()), [testbed.parent.path()]);
    let status = proxy_redirect(&["status", "--json"]);
    let page: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(page["pid"].as_u64(), Some(u64::from(new.pid())));
    new.stop_ok();
    assert!(!bpffs.pin_dir().exists());
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

#[test]
fn a_successor_that_cannot_see_the_cgroup_of_the_sockets_it_would_take_refuses_the_take_over() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let pods = two_pods(&testbed);
    let pin_dir = bpffs.pin_dir().display().to_string();
    let old = Running::start(
        BIN,
        &service_args(&pods.file.path, &["--pin-dir", &pin_dir]),
        Some(&testbed.client),
        Some(&pods.old_pod),
        "Service running",
    );
    curl_ok(testbed.in_apps("curl"), &pods.url);

    // As in a container with a cgroup namespace of its own: the first
    // cgroup2 mount shows only the new pod's cgroup, and the host's tree
    // is mounted later elsewhere (/host/sys/fs/cgroup in a DaemonSet).
    // The old pod's cgroup is not under the first.
    let dirs = TempDir::new();
    let (stash, host) = (dirs.join("stash"), dirs.join("host"));
    std::fs::create_dir(&stash).unwrap();
    std::fs::create_dir(&host).unwrap();
    let apps = host.join(testbed.apps.relative_path().unwrap());
    let config = ConfigFile::new(&format!(
        "[redirect]\ncgroup = \"{}\"\nports = [80]\n",
        apps.display()
    ));
    let mount = proxy_redirect::sys::cgroup::cgroup2_mount().unwrap();
    let mut successor =
        netns::command_in("unshare", Some(&testbed.client), Some(&pods.new_pod)).unwrap();
    successor.args(["--mount", "sh", "-c", CONTAINER_CGROUP_MOUNTS, "sh"]);
    successor.args([&mount, &stash, &host]).arg(BIN);
    successor.args(service_args(
        &config.path,
        &["--pin-dir", &pin_dir, "--take-over"],
    ));
    let out = run(successor);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("set sockopt-cgroup to a cgroup that holds both services"),
        "{err}"
    );
    curl_ok(testbed.in_apps("curl"), &pods.url);
    assert_eq!(answered_in(pods.old_pod.path()), [pods.old_pod.path()]);
    old.stop_ok();
    assert!(!bpffs.pin_dir().exists());
    assert_eq!(answered_in(pods.old_pod.path()), Vec::<PathBuf>::new());
}

/// `sh -c` with MOUNT STASH HOST COMMAND...: runs COMMAND in a new cgroup
/// namespace (in a private mount namespace already), with a cgroup2 mount
/// of that namespace at MOUNT first and the whole tree at HOST after it.
const CONTAINER_CGROUP_MOUNTS: &str = r#"set -e
mount --bind "$1" "$2"
umount -l "$1"
exec unshare --cgroup sh -c '
set -e
mount -t cgroup2 cgroup2 "$1"
mount --bind "$2" "$3"
umount -l "$2"
shift 3
exec "$@"' sh "$@""#;

/// The cgroups whose redirect getsockopt programs a socket of `cgroup` runs.
fn answered_in(cgroup: &Path) -> Vec<PathBuf> {
    proxy_redirect::sys::links::cgroup_neighbours(cgroup, libbpf_sys::BPF_CGROUP_GETSOCKOPT)
        .unwrap()
        .into_iter()
        .filter(|program| program.name.starts_with("redirect_"))
        .map(|program| program.cgroup)
        .collect()
}

/// `run --config FILE EXTRA...`.
fn service_args(config: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["run".to_owned(), "--config".into()];
    args.push(config.display().to_string());
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// A socket in the role of systemd's $NOTIFY_SOCKET: what the service
/// tells its manager.
struct Notifications {
    socket: std::os::unix::net::UnixDatagram,
    _dir: TempDir,
    path: PathBuf,
}

impl Notifications {
    fn new() -> Notifications {
        let dir = TempDir::new();
        let path = dir.join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Notifications {
            socket,
            _dir: dir,
            path,
        }
    }

    fn path(&self) -> String {
        self.path.display().to_string()
    }

    fn next(&self) -> String {
        let mut buffer = [0u8; 4096];
        let n = self.socket.recv(&mut buffer).expect("no notification");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    }
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

/// The host the service is for, in namespaces and cgroups the test makes:
/// a gateway, where the service runs, between a client and a server
/// namespace, and a cgroup tree of `apps` (redirected; their direct TCP to
/// port 80 and UDP to 53 rejected), `proxy` (the service) and `bulk`
/// (bypassed). The server serves FILE (HTTP on 80 and 8000, UDP echo on
/// 53); the gateway serves it on 18080 for port-nat.
struct Host {
    // Field order is drop order: cgroups first (their processes are gone).
    apps: ChildCgroup,
    proxy: ChildCgroup,
    bulk: ChildCgroup,
    parent: ChildCgroup,
    _servers: Vec<Running>,
    _udp_echo: servers::Server,
    gw: gateway::Gateway,
    /// FILE (`big`) and the gate of the gated transfers.
    files: TempDir,
    data: Vec<u8>,
}

const FILE_LEN: usize = 50_000_000;

impl Host {
    fn new() -> Host {
        let gw = gateway::Gateway::new();
        let files = TempDir::new();
        let data = payload(FILE_LEN, 23);
        std::fs::write(files.join("big"), &data).unwrap();
        let serve = |ns: &NetNs, bind: &str, port: &str| {
            let mut args: Vec<String> =
                ["-c", GATED, "http", bind, port].map(String::from).to_vec();
            args.push(files.join("big").display().to_string());
            args.push(files.join("gate").display().to_string());
            Running::start(PYTHON, &args, Some(ns), None, "listening")
        };
        let servers = vec![
            serve(&gw.server, gateway::SERVER4, "80"),
            serve(&gw.server, gateway::SERVER4, "8000"),
            serve(&gw.gateway, gateway::GATEWAY_SERVER_SIDE4, "18080"),
        ];
        let udp_echo = servers::udp_echo(&gw.server, &format!("{}:53", gateway::SERVER4)).unwrap();
        for ns in [&gw.client, &gw.gateway, &gw.server] {
            gw.sysctl(ns, "net.ipv4.tcp_fastopen=3");
        }
        let root = proxy_redirect::sys::cgroup::cgroup2_mount().unwrap();
        let parent = ChildCgroup::create(&root, &unique("prhost")).unwrap();
        let apps = ChildCgroup::create(parent.path(), "apps").unwrap();
        let proxy = ChildCgroup::create(parent.path(), "proxy").unwrap();
        let bulk = ChildCgroup::create(parent.path(), "bulk").unwrap();
        let host = Host {
            apps,
            proxy,
            bulk,
            parent,
            _servers: servers,
            _udp_echo: udp_echo,
            gw,
            files,
            data,
        };
        for (protocol, port) in [("tcp", "80"), ("udp", "53")] {
            let path = host.apps.relative_path().unwrap();
            let mut command = host.gw.in_gateway("iptables");
            command.args(["-A", "OUTPUT", "-p", protocol, "--dport", port]);
            command.args(["-m", "cgroup", "--path"]).arg(&path);
            command.args(["-j", "REJECT"]);
            assert!(run(command).status.success());
        }
        for (ns, url) in [
            (&host.gw.client, format!("http://{}:80/", gateway::SERVER4)),
            (
                &host.gw.client,
                format!("http://{}:8000/", gateway::SERVER4),
            ),
            (
                &host.gw.gateway,
                format!("http://{}:18080/", gateway::GATEWAY_SERVER_SIDE4),
            ),
        ] {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let fetch = || {
                curl(
                    netns::command_in("curl", Some(ns), None).unwrap(),
                    &url,
                    &["-o", "/dev/null"],
                )
            };
            while !fetch().status.success() {
                assert!(std::time::Instant::now() < deadline, "{url} never answered");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        host
    }

    /// redirect, bypass, port-nat and tproxy; `external_tproxy`: tproxy's
    /// proxy is a process of its own (`external_tproxy_proxy`).
    fn config(&self, external_tproxy: bool) -> String {
        let no_proxy = if external_tproxy {
            "no-proxy = true\n"
        } else {
            ""
        };
        format!(
            r#"# written by tests/lifecycle.rs
[redirect]
cgroup = "{apps}"
sockopt-cgroup = "{parent}"
ports = [80]
udp-ports = [53]
when-proxy-down = "closed"

[bypass]
cgroup = "{bulk}"

[[port-nat]]
interface = "gw-s"
from = [8081]
to = [18080]

[tproxy]
interface = "{client_facing}"
ports = [8000]
{no_proxy}"#,
            apps = self.apps.path().display(),
            parent = self.parent.path().display(),
            bulk = self.bulk.path().display(),
            client_facing = gateway::CLIENT_FACING,
        )
    }

    /// The transparent proxy of `tproxy --no-proxy`: the built-in one, as a
    /// process of its own.
    fn external_tproxy_proxy(&self) -> Running {
        let args = [
            "proxy",
            "--transparent",
            "-l",
            "127.0.0.1:15002",
            "-l",
            "[::1]:15002",
        ];
        let args: Vec<String> = args.map(String::from).to_vec();
        Running::start(BIN, &args, Some(&self.gw.gateway), None, "Proxy listening")
    }

    /// A bypassed echo between two sockets of `bulk`: 16 MiB each way,
    /// every byte checked, the last part once the gate opens.
    fn bypassed_transfer(&self) -> Running {
        let mut args: Vec<String> = ["-c", GATED, "echo", "16777216"].map(String::from).to_vec();
        args.push(self.files.join("gate").display().to_string());
        Running::start(
            PYTHON,
            &args,
            Some(&self.gw.gateway),
            Some(&self.bulk),
            "started",
        )
    }

    /// The service of `program` (a build of the binary) in the gateway.
    fn start(&self, program: &str, file: &ConfigFile, bpffs: &PrivateBpffs) -> Running {
        let pin_dir = bpffs.pin_dir().display().to_string();
        start_service_of(
            program,
            &file.path,
            &["--pin-dir", &pin_dir, "--json"],
            Some(&self.gw.gateway),
            Some(&self.proxy),
        )
    }

    /// Lets the gated transfers (tests/common/gated.py) finish.
    fn open_gate(&self) {
        std::fs::write(self.files.join("gate"), "").unwrap();
    }

    /// A curl of FILE through datapath `what` (`redirect`, `port-nat` or
    /// `tproxy`), on a thread that checks every byte. The servers send its
    /// last part only once the gate opens.
    fn download(&self, what: &'static str) -> Download {
        let gw = &self.gw;
        let (ns, cgroup, url) = match what {
            "redirect" => (
                &gw.gateway,
                Some(&self.apps),
                format!("http://{}/big", gateway::SERVER4),
            ),
            "port-nat" => (
                &gw.server,
                None,
                format!("http://{}:8081/big", gateway::GATEWAY_SERVER_SIDE4),
            ),
            "tproxy" => (
                &gw.client,
                None,
                format!("http://{}:8000/big", gateway::SERVER4),
            ),
            other => panic!("no download through {other}"),
        };
        let mut command = netns::command_in("curl", Some(ns), cgroup).unwrap();
        command.args(["-sS", "--fail", "--max-time", "600"]);
        // The first bytes in the SYN where the server offers Fast Open.
        command.arg("--tcp-fastopen");
        command.arg(url);
        let data = self.data.clone();
        let thread = std::thread::spawn(move || {
            let out = run(command);
            assert!(
                out.stdout == data,
                "{what}: {} bytes arrived, not the {} served: {}",
                out.stdout.len(),
                data.len(),
                String::from_utf8_lossy(&out.stderr)
            );
        });
        Download { what, thread }
    }

    /// loops.py `kind` against the server, in `apps`, until `stop` exists.
    fn request_loop(&self, kind: &str, port: u16, stop: &Path) -> Running {
        let mut args: Vec<String> = ["-c", LOOPS, kind, gateway::SERVER4, &port.to_string(), "20"]
            .map(String::from)
            .to_vec();
        args.push(stop.display().to_string());
        Running::start(
            PYTHON,
            &args,
            Some(&self.gw.gateway),
            Some(&self.apps),
            "started",
        )
    }
}

/// A download on its thread (Host::download).
struct Download {
    what: &'static str,
    thread: std::thread::JoinHandle<()>,
}

/// Fails unless every download still runs at `moment`.
fn assert_running(downloads: &[Download], moment: &str) {
    let ended: Vec<&str> = downloads
        .iter()
        .filter(|d| d.thread.is_finished())
        .map(|d| d.what)
        .collect();
    assert!(
        ended.is_empty(),
        "downloads that ended before {moment}: {ended:?}"
    );
}

/// Waits for the gated echo, which must have come back whole.
fn assert_bypassed_echo_whole(echo: Running) {
    let (status, out, err) = echo.wait(Duration::from_secs(120));
    assert!(
        status.success() && out.contains("ok 16777216"),
        "the bypassed echo: {out}\n{err}"
    );
}

/// Waits for every download, which must arrive whole.
fn join(downloads: Vec<Download>) {
    for download in downloads {
        let name = download.what;
        download
            .thread
            .join()
            .unwrap_or_else(|_| panic!("the {name} download broke"));
    }
}

const LOOPS: &str = include_str!("common/loops.py");
const GATED: &str = concat!(
    include_str!("common/sockmap_recv.py"),
    include_str!("common/gated.py")
);

/// What a request loop printed at its end: (ok, failed, longest stall ms).
fn loop_result(output: &str) -> (u64, u64, f64) {
    let line = output
        .lines()
        .find(|l| l.starts_with("ok "))
        .unwrap_or_else(|| panic!("no result in {output}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    (
        words[1].parse().unwrap(),
        words[3].parse().unwrap(),
        words[5].parse().unwrap(),
    )
}

/// (link id, program id) of every link pinned under `dir`.
fn pinned_links_under(dir: &Path) -> Vec<(String, (u64, u64))> {
    let mut links: Vec<(String, (u64, u64))> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_type().unwrap().is_dir())
        .flat_map(|datapath| std::fs::read_dir(datapath.path()).unwrap().flatten())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("link-"))
        .map(|entry| {
            (
                entry.path().display().to_string(),
                pinned_link(&entry.path()),
            )
        })
        .collect();
    links.sort();
    links
}

/// Every link kept its id and got a new program, but bypass's tracing
/// links, which the kernel cannot update: new ones are pinned in their
/// place.
fn assert_links_updated_in_place(before: &[(String, (u64, u64))], after: &[(String, (u64, u64))]) {
    let names =
        |links: &[(String, (u64, u64))]| links.iter().map(|l| l.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(before), names(after));
    let updatable = |links: &[(String, (u64, u64))]| -> Vec<(u64, u64)> {
        links
            .iter()
            .filter(|(name, _)| !name.ends_with("/link-recv") && !name.ends_with("/link-splice"))
            .map(|l| l.1)
            .collect()
    };
    assert_eq!(updatable(before).len(), before.len() - 2);
    assert_updated_in_place(&updatable(before), &updatable(after));
}

#[test]
fn an_upgrade_mid_traffic_drops_nothing_and_lets_nothing_around_the_proxy() {
    let _one = one_service_at_a_time();
    require_root!();
    let host = Host::new();
    let bpffs = private_bpffs();
    let dir = TempDir::new();
    let program = installed_build(&dir);
    let file = ConfigFile::new(&host.config(false));
    let mut service = host.start(&program, &file, &bpffs);
    let links_before = pinned_links_under(&bpffs.pin_dir());
    assert_eq!(pins::pinned_datapaths(&bpffs.pin_dir()).len(), 4);
    // Another tool's connect4 program on the redirected cgroup, which every
    // connect runs through before and after the upgrade.
    let _stats = common::foreign::Stats::enable();
    let neighbour = common::foreign::CgroupProgram::attach(
        host.apps.path(),
        libbpf_sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        libbpf_sys::BPF_CGROUP_INET4_CONNECT,
        c"their_connect4",
        libbpf_sys::BPF_F_ALLOW_MULTI,
    );

    let stop = dir.join("stop");
    let http_loop = host.request_loop("http", 80, &stop);
    let udp_loop = host.request_loop("udp", 53, &stop);
    let downloads = ["redirect", "port-nat", "tproxy"].map(|what| host.download(what));
    let mut bypassed = host.bypassed_transfer();
    std::thread::sleep(Duration::from_secs(1));
    assert!(neighbour.runs() > 0);

    install_another_build(&program);
    let old = service.pid();
    let new = service.upgrade();
    assert!(
        runs_another_build(new),
        "pid {new} does not run the new build"
    );
    let adopting = service
        .seen
        .iter()
        .filter(|l| l.contains("Adopting:"))
        .count();
    assert_eq!(adopting, 4, "{:?}", service.seen);
    assert_links_updated_in_place(&links_before, &pinned_links_under(&bpffs.pin_dir()));
    assert_running(&downloads, "the new process served");
    assert!(
        !bypassed.has_exited(),
        "the bypassed echo ended before the upgrade"
    );
    host.open_gate();
    join(downloads.into());
    assert_bypassed_echo_whole(bypassed);
    std::fs::write(&stop, "").unwrap();
    // Every connect still runs the neighbour's program too.
    let runs = neighbour.runs();
    let url = format!("http://{}/", gateway::SERVER4);
    for _ in 0..3 {
        curl_ok(
            netns::command_in("curl", Some(&host.gw.gateway), Some(&host.apps)).unwrap(),
            &url,
        );
    }
    assert!(
        neighbour.runs() >= runs + 3,
        "the neighbour's program stopped seeing connects"
    );
    let mut requests = 0;
    for (what, looping) in [("HTTP", http_loop), ("UDP", udp_loop)] {
        let (status, out, err) = looping.stop_with(Signal::SIGCONT);
        assert!(status.success(), "{what} loop: {err}");
        let (ok, failed, longest) = loop_result(&out);
        assert_eq!(failed, 0, "{what} loop: {ok} ok, {failed} failed");
        assert!(ok > 20, "{what} loop: {ok} ok");
        println!("{what} loop: {ok} ok, the longest gap {longest} ms");
        requests += ok;
    }

    // The old process drained the downloads it relayed, and let go.
    let drained = service.wait_for_line(|l| l.starts_with("Drained:"), Duration::from_secs(60));
    assert!(
        drained.as_deref().is_some_and(|l| l.ends_with(", 0 cut")),
        "{drained:?}"
    );
    let (status, out, err) = service.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{err}");
    assert!(
        out.contains(&format!("Taking over from pid {old}")),
        "{out}"
    );
    assert!(summary_value(&out, "bypass", "inserted") >= 2, "{out}");
    assert!(summary_value(&out, "tproxy", "intercepted") >= 1, "{out}");
    // Every request was redirected (one around the proxy would have been
    // rejected): each HTTP request a connection, each UDP one a datagram.
    let redirected = summary_value(&out, "redirect", "redirected")
        + summary_value(&out, "redirect", "udp_to_proxy");
    assert!(redirected >= requests, "{out}");
    assert!(!bpffs.pin_dir().exists());
    for device in [gateway::CLIENT_FACING, "gw-s"] {
        assert_eq!(tc_programs(&host.gw.gateway, device), 0);
    }
}

#[test]
fn a_crash_mid_traffic_leaves_the_kernel_datapaths_working_and_a_restart_adopts_them() {
    let _one = one_service_at_a_time();
    require_root!();
    let host = Host::new();
    let before = host.gw.snapshot();
    let bpffs = private_bpffs();
    let file = ConfigFile::new(&host.config(true));
    let _proxy = host.external_tproxy_proxy();
    let service = host.start(BIN, &file, &bpffs);
    let links_before = pinned_links_under(&bpffs.pin_dir());
    let downloads = ["port-nat", "tproxy"].map(|what| host.download(what));
    let mut bypassed = host.bypassed_transfer();
    std::thread::sleep(Duration::from_secs(1));

    service.kill();
    // Nothing runs: port-nat translates, tproxy intercepts, the bypassed
    // sockets keep their bypass, all from the pins.
    std::thread::sleep(Duration::from_secs(1));
    assert_running(&downloads, "the crash");
    assert!(!bypassed.has_exited());

    let service = host.start(BIN, &file, &bpffs);
    let adopting = service
        .seen
        .iter()
        .filter(|l| l.contains("Adopting:"))
        .count();
    assert_eq!(adopting, 4, "{:?}", service.seen);
    assert!(
        !service
            .seen
            .iter()
            .any(|l| l.contains("Removed a leftover")),
        "the adopted rules and routes were removed: {:?}",
        service.seen
    );
    assert_links_updated_in_place(&links_before, &pinned_links_under(&bpffs.pin_dir()));
    assert_running(&downloads, "the restart");
    host.open_gate();
    join(downloads.into());
    assert_bypassed_echo_whole(bypassed);
    let url = format!("http://{}/", gateway::SERVER4);
    curl_ok(
        netns::command_in("curl", Some(&host.gw.gateway), Some(&host.apps)).unwrap(),
        &url,
    );

    // The counters went on across the crash.
    std::thread::sleep(Duration::from_millis(1500));
    let page: serde_json::Value =
        serde_json::from_slice(&proxy_redirect(&["status", "--json"]).stdout).unwrap();
    let counter = |datapath: &str, name: &str| {
        page["statistics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["datapath"] == datapath)
            .and_then(|s| s[name].as_u64())
            .unwrap_or_else(|| panic!("no {datapath} {name} in {page}"))
    };
    assert!(counter("bypass", "inserted") >= 2, "{page}");
    assert!(counter("tproxy", "intercepted") >= 1, "{page}");

    // Killed again and not restarted: cleanup, run in tproxy's network
    // namespace, removes the pins and tproxy's rules and routes.
    service.kill();
    let pin_dir = bpffs.pin_dir().display().to_string();
    let mut cleanup = host.gw.in_gateway(BIN);
    cleanup.args(["cleanup", "--pin-dir", &pin_dir]);
    let cleanup = run(cleanup);
    let said = String::from_utf8_lossy(&cleanup.stdout);
    assert!(cleanup.status.success(), "{cleanup:?}");
    assert!(said.contains("tproxy: rule"), "{said}");
    assert!(!bpffs.pin_dir().exists());
    assert_eq!(host.gw.snapshot(), before, "the gateway was not restored");
    // And tproxy's instance lock, which the killed process kept for the
    // next start.
    use std::os::unix::fs::MetadataExt;
    let gateway = std::fs::metadata(format!("/run/netns/{}", host.gw.gateway.name()))
        .unwrap()
        .ino();
    let lock = format!("tproxy-netns-{gateway}-table-");
    assert!(said.contains(&lock), "{said}");
    // And its status and hand-over sockets, which nobody answers on.
    assert!(said.contains("status.sock"), "{said}");
    for socket in ["status.sock", "handover.sock"] {
        assert!(!Path::new("/run/proxy-redirect").join(socket).exists());
    }
    let left: Vec<_> = std::fs::read_dir("/run/proxy-redirect")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&lock))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_successor_that_fails_after_taking_the_sockets_gives_back_links_and_sockets() {
    let _one = one_service_at_a_time();
    let testbed = root_testbed!();
    let bpffs = private_bpffs();
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();
    let _dns = servers::udp_echo(&testbed.server, &format!("{SERVER_V4}:53")).unwrap();
    let _nat_web = servers::http(&testbed.client, "[::]:18080").unwrap();
    let file = ConfigFile::new(&format!(
        "{}udp-ports = [53]\n{CONFIG}",
        redirect_config(&testbed, 15001, 0x5052)
    ));
    let pin_dir = bpffs.pin_dir().display().to_string();
    // Its successor (which inherits the variable) fails at port-nat's
    // attach: after it took the sockets and swapped its programs into
    // redirect's links.
    let mut args = vec!["run".to_owned(), "--config".into()];
    args.push(file.path.display().to_string());
    args.extend(["--pin-dir".to_owned(), pin_dir]);
    let mut service = Running::start_env(
        BIN,
        &args,
        Some(&testbed.client),
        Some(&testbed.proxy),
        "Service running",
        &[("PROXY_REDIRECT_TEST_FAIL_TAKE_OVER", "port-nat veth-c")],
    );
    let links = bpffs.pin_dir().join("redirect");
    let before = pinned_links_under(bpffs.pin_dir().as_path());
    let url = format!("http://{SERVER_V4}/");
    let udp_exchange = || {
        let mut command = testbed.in_apps(PYTHON);
        command.args([
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); \
             s.settimeout(3); s.sendto(b'ping',(sys.argv[1],53)); \
             print(s.recvfrom(100)[0].decode())",
            SERVER_V4,
        ]);
        String::from_utf8_lossy(&run(command).stdout).trim() == "ping"
    };
    curl_ok(testbed.in_apps("curl"), &url);
    assert!(udp_exchange());

    service.signal(Signal::SIGUSR2);
    let failed = service.wait_for_line(|l| l.starts_with("Took over"), Duration::from_secs(120));
    assert!(failed.is_some(), "{:?}", service.seen);
    // The old process is back: its programs in the same links (the UDP
    // relay's slots answer only the process the programs name), its
    // listeners and relays serving, its pins in place.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pinned_links_under(bpffs.pin_dir().as_path()) != before {
        assert!(
            std::time::Instant::now() < deadline,
            "the links did not get the old programs back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    curl_ok(testbed.in_apps("curl"), &url);
    assert!(udp_exchange(), "UDP after the failed hand-over");
    assert!(links.exists());
    let (out, err) = service.stop_ok();
    assert!(
        err.contains("failed: ") && err.contains("this service goes on"),
        "{err}"
    );
    assert!(
        err.contains("failing the take-over at port-nat veth-c on purpose"),
        "{err}"
    );
    assert!(out.contains("Cleaned up"), "{out}");
    assert!(
        !bpffs.pin_dir().exists(),
        "{:?}\n{err}",
        pins::pinned_datapaths(&bpffs.pin_dir())
    );
}
