//! `proxy-redirect run --config`: redirect, bypass and port-nat in one
//! process, in namespaces and child cgroups the test makes; metrics, status,
//! reload on SIGHUP while a transfer goes on, and a clean stop.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use proxy_redirect::sys::cgroup::ChildCgroup;
use proxy_redirect::sys::links;
use proxy_redirect::sys::netns;

const METRICS: &str = "127.0.0.1:9479";

/// redirect of `apps` (ports given), bypass of the whole test tree, and
/// port-nat 8081 -> 18080 on the client's veth.
fn config(testbed: &Testbed, redirect_ports: &str) -> String {
    config_for(testbed.apps.path(), testbed, redirect_ports, "veth-c")
}

fn config_for(apps: &Path, testbed: &Testbed, redirect_ports: &str, nat_interface: &str) -> String {
    format!(
        r#"# written by tests/service.rs
[redirect]
cgroup = "{apps}"
sockopt-cgroup = "{parent}"
ports = [{redirect_ports}]

[bypass]
cgroup = "{parent}"

[[port-nat]]
interface = "{nat_interface}"
from = [8081]
to = [18080]

[metrics]
listen = "{METRICS}"
"#,
        apps = apps.display(),
        parent = testbed.parent.path().display(),
    )
}

/// The service's config file, in a directory of its own, rewritten by the
/// test as an operator would before a reload.
fn start(testbed: &Testbed, file: &ConfigFile) -> Running {
    start_service(
        &file.path,
        &["--json"],
        Some(&testbed.client),
        Some(&testbed.proxy),
    )
}

fn veth_tc_programs(testbed: &Testbed) -> u32 {
    tc_programs(testbed, "veth-c")
}

fn tc_programs(testbed: &Testbed, device: &str) -> u32 {
    common::tc_programs(&testbed.client, device)
}

/// Streams `chunks` x 64 KiB through an echo server over about `seconds`,
/// checking every byte that comes back.
fn streaming_echo_script(port: u16, chunks: usize, seconds: f64) -> String {
    format!(
        r#"
import socket, time, threading
s = socket.create_connection(("{SERVER_V4}", {port}), timeout=20)
chunks = [bytes([(i * 7 + j) % 251 for j in range(256)]) * 256 for i in range({chunks})]
def send():
    for chunk in chunks:
        s.sendall(chunk)
        time.sleep({seconds} / {chunks})
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=send).start()
expected = b"".join(chunks)
received = bytearray()
while True:
    data = s.recv(65536)
    if not data:
        break
    received += data
assert bytes(received) == expected, "echo differs: %d of %d bytes" % (len(received), len(expected))
print("intact", len(received))
"#
    )
}

#[test]
fn one_service_runs_redirect_bypass_and_port_nat_and_reloads_in_place() {
    require_root!();
    let _turn = one_service_at_a_time();
    let testbed = Testbed::new();
    let _echo = servers::echo(&testbed.server, "[::]:80").unwrap();
    let _web81 = servers::http(&testbed.server, "[::]:81").unwrap();
    let _local_web = servers::http(&testbed.client, "[::]:18080").unwrap();
    testbed.reject_direct(&testbed.apps, "tcp", 80);
    testbed.reject_direct(&testbed.apps, "tcp", 81);
    let file = ConfigFile::new(&config(&testbed, "80"));
    let mut service = start(&testbed, &file);

    // redirect: only the proxy can reach port 80; port 81 is not redirected
    // yet, so the rule rejects it.
    let out = python(testbed.in_apps(PYTHON), &streaming_echo_script(80, 4, 0.1));
    assert!(out.starts_with("intact"), "{out}");
    let direct81 = curl(
        testbed.in_apps("curl"),
        &format!("http://{SERVER_V4}:81/"),
        &[],
    );
    assert!(
        !direct81.status.success(),
        "port 81 went through before the reload"
    );
    // port-nat: a client on the server side reaches 18080 through 8081.
    let translated = curl(
        netns::command_in("curl", Some(&testbed.server), None).unwrap(),
        &format!("http://{CLIENT_V4}:8081/"),
        &[],
    );
    assert!(translated.status.success(), "port-nat did not translate");

    let page = scrape_metrics(&testbed.client, METRICS);
    assert!(metric_value(&page, "proxy_redirect_redirect_redirected_total") >= 1);
    assert!(
        metric_value(
            &page,
            "proxy_redirect_port_nat_ingress_translated_total{interface=\"veth-c\"}"
        ) >= 1,
        "{page}"
    );
    // The proxy's client leg is a same-host connection of the tree.
    assert!(
        metric_value(&page, "proxy_redirect_bypass_inserted_total") >= 2,
        "{page}"
    );
    assert!(page.contains("proxy_redirect_build_info{"), "{page}");
    assert_promtool_accepts(&page);

    // status answers on the root-only socket.
    let status = run({
        let mut command = std::process::Command::new(BIN);
        command.args(["status", "--json"]);
        command
    });
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let names: Vec<&str> = status["datapaths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["redirect", "bypass", "port-nat veth-c"]);
    assert!(status["datapaths"][0]["programs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["id"].as_u64().unwrap() > 0));

    let text = run({
        let mut command = std::process::Command::new(BIN);
        command.arg("status");
        command
    });
    let text = String::from_utf8_lossy(&text.stdout);
    for expected in [
        "redirect\n",
        "bypass\n",
        "port-nat veth-c\n",
        "  interface: veth-c",
        "  program redirect_connect4 (id ",
        "  program port_nat_ingress (id ",
        "statistics of redirect",
    ] {
        assert!(
            text.contains(expected),
            "status lacks '{expected}':\n{text}"
        );
    }

    // Another user is not told.
    let bin = BinForOthers::new();
    let mut nobody = std::process::Command::new(&bin.path);
    nobody.arg("status");
    std::os::unix::process::CommandExt::uid(&mut nobody, 65534);
    assert_one_line_error(&run(nobody), "status as nobody", "only root");

    // A long transfer through the proxy goes on while SIGHUP adds port 81.
    let transfer = {
        let command = testbed.in_apps(PYTHON);
        std::thread::spawn(move || python(command, &streaming_echo_script(80, 60, 4.0)))
    };
    std::thread::sleep(Duration::from_millis(800));
    file.reload(&service, &config(&testbed, "80, 81"));
    service
        .wait_for_line(|l| l == "Reloaded redirect", Duration::from_secs(10))
        .expect("no 'Reloaded redirect' after SIGHUP");
    let through81 = curl(
        testbed.in_apps("curl"),
        &format!("http://{SERVER_V4}:81/"),
        &[],
    );
    assert!(
        through81.status.success(),
        "port 81 was not redirected at once after the reload: {}",
        String::from_utf8_lossy(&through81.stderr)
    );
    let out = transfer.join().unwrap();
    assert_eq!(
        out.trim(),
        format!("intact {}", 60 * 65536),
        "the transfer across the reload"
    );

    // A broken file is refused and the running configuration stays.
    file.reload(&service, "[redirect]\nports = [80, 70000]\n");
    std::thread::sleep(Duration::from_millis(1000));
    let again81 = curl(
        testbed.in_apps("curl"),
        &format!("http://{SERVER_V4}:81/"),
        &[],
    );
    assert!(
        again81.status.success(),
        "the old configuration stopped after a broken reload"
    );
    // A valid file with one change that cannot be made live is refused
    // whole: its port-nat change is not applied either.
    let unappliable = config(&testbed, "80, 81")
        .replace("ports = [80, 81]", "ports = [80, 81]\nproxy-port = 15009")
        .replace("from = [8081]", "from = [8082]");
    file.reload(&service, &unappliable);
    std::thread::sleep(Duration::from_millis(1000));
    let still_8081 = curl(
        netns::command_in("curl", Some(&testbed.server), None).unwrap(),
        &format!("http://{CLIENT_V4}:8081/"),
        &[],
    );
    assert!(
        still_8081.status.success(),
        "a refused reload changed port-nat"
    );
    // Networks and users change in place too: the server's network is
    // excluded now, so the rule rejects what is no longer redirected.
    let excluding = config(&testbed, "80, 81").replace(
        "ports = [80, 81]",
        "ports = [80, 81]\nexclude = [\"10.77.0.0/24\"]\nexclude-user = \"nobody\"",
    );
    file.reload(&service, &excluding);
    let reloaded = service.wait_for_line(|l| l == "Reloaded redirect", Duration::from_secs(10));
    assert!(reloaded.is_some(), "no reload with exclude");
    let excluded81 = curl(
        testbed.in_apps("curl"),
        &format!("http://{SERVER_V4}:81/"),
        &[],
    );
    assert!(
        !excluded81.status.success(),
        "an excluded network was redirected"
    );

    let (exit, output, stderr) = service.stop_with(Signal::SIGTERM);
    assert!(exit.success(), "{stderr}");
    assert!(
        stderr.contains("reload refused, the running configuration stays")
            && stderr.contains("ports"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[redirect]: proxy-port cannot change while running"),
        "{stderr}"
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("reload refused"))
            .count(),
        2,
        "{stderr}"
    );
    assert!(output.contains("Cleaned up"), "{output}");
    // Connections through the proxy: the first transfer, curl to 81 twice,
    // the transfer across the reload.
    assert_eq!(
        summary_value(&output, "redirect", "redirected"),
        4,
        "{output}"
    );
    assert_eq!(summary_value(&output, "proxy", "relayed"), 4, "{output}");
    assert_eq!(summary_value(&output, "proxy", "open_connections"), 0);
    assert_eq!(
        summary_value(&output, "redirect", "bypassed_excluded_network"),
        1
    );
    assert_eq!(testbed.attached_redirect_programs(), 0);
    assert_eq!(veth_tc_programs(&testbed), 0);
    assert!(!Path::new("/run/proxy-redirect/status.sock").exists());
}

/// A second cgroup under the test's parent, apps2, and a second link
/// between the namespaces: veth-c2 10.78.0.1 to veth-s2 10.78.0.2.
fn second_cgroup_and_link(testbed: &Testbed) -> ChildCgroup {
    let apps2 = ChildCgroup::create(testbed.parent.path(), "apps2").unwrap();
    netns::veth_pair(&testbed.client, "veth-c2", &testbed.server, "veth-s2").unwrap();
    testbed
        .client
        .configure("veth-c2", &["10.78.0.1/24"])
        .unwrap();
    testbed
        .server
        .configure("veth-s2", &["10.78.0.2/24"])
        .unwrap();
    apps2
}

#[test]
fn a_reload_moves_to_another_cgroup_and_interface_attaching_the_new_first() {
    require_root!();
    let _turn = one_service_at_a_time();
    let testbed = Testbed::new();
    let apps2 = second_cgroup_and_link(&testbed);
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();
    let _local_web = servers::http(&testbed.client, "[::]:18080").unwrap();
    testbed.reject_direct(&testbed.apps, "tcp", 80);
    testbed.reject_direct(&apps2, "tcp", 80);
    let in_apps2 = || netns::command_in("curl", Some(&testbed.client), Some(&apps2)).unwrap();
    let from_server = || netns::command_in("curl", Some(&testbed.server), None).unwrap();
    let url = format!("http://{SERVER_V4}/");
    let file = ConfigFile::new(&config(&testbed, "80"));
    let mut service = start(&testbed, &file);
    assert!(curl(testbed.in_apps("curl"), &url, &[]).status.success());
    assert!(
        !curl(in_apps2(), &url, &[]).status.success(),
        "apps2 redirected too early"
    );
    assert!(
        curl(from_server(), &format!("http://{CLIENT_V4}:8081/"), &[])
            .status
            .success()
    );

    let moved = config_for(apps2.path(), &testbed, "80", "veth-c2");
    file.reload(&service, &moved);
    service
        .wait_for_line(|l| l == "Stopped port-nat veth-c", Duration::from_secs(10))
        .expect("the old port-nat was not stopped");
    let lines = service.seen.join("\n");
    let added = lines.find("Reloaded port-nat veth-c2").expect(&lines);
    let stopped = lines.find("Stopped port-nat veth-c").unwrap();
    assert!(
        added < stopped,
        "the new interface must be attached first:\n{lines}"
    );

    assert!(
        curl(in_apps2(), &url, &[]).status.success(),
        "apps2 not redirected"
    );
    assert!(
        !curl(testbed.in_apps("curl"), &url, &[]).status.success(),
        "apps still redirected"
    );
    assert!(curl(from_server(), "http://10.78.0.1:8081/", &[])
        .status
        .success());
    assert!(
        !curl(from_server(), &format!("http://{CLIENT_V4}:8081/"), &[])
            .status
            .success()
    );
    assert_eq!(tc_programs(&testbed, "veth-c"), 0);
    assert_eq!(tc_programs(&testbed, "veth-c2"), 2);
    // Only the new cgroup holds the client-side programs.
    let connect4 = |cgroup: &Path| {
        links::cgroup_program_count(cgroup, libbpf_sys::BPF_CGROUP_INET4_CONNECT).unwrap()
    };
    assert_eq!(connect4(testbed.apps.path()), 0);
    assert_eq!(connect4(apps2.path()), 1);

    let (exit, output, stderr) = service.stop();
    assert!(exit.success(), "{stderr}");
    assert!(output.contains("Cleaned up"));
    assert_eq!(connect4(apps2.path()), 0);
    assert_eq!(tc_programs(&testbed, "veth-c2"), 0);
}

/// The descriptors a process holds, by kind: BPF programs, maps and links
/// by their anon inode, everything else as "other".
fn descriptors(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        // The kernel names a link made by BPF_LINK_CREATE "bpf_link" and one
        // opened from a pin "bpf-link": the same kind.
        let kind = match target.strip_prefix("anon_inode:") {
            Some("bpf-link") => "bpf_link".to_owned(),
            Some(kind) if kind.starts_with("bpf") => kind.to_owned(),
            _ => "other".to_owned(),
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// `descriptors(pid)` once three readings 100 ms apart agree (5 s at most).
fn settled_descriptors(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut readings = vec![descriptors(pid)];
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        readings.push(descriptors(pid));
        if let [.., a, b, c] = readings.as_slice() {
            if a == b && b == c {
                break;
            }
        }
    }
    readings.pop().unwrap()
}

/// A service runs for weeks and is reloaded many times: reloads that move
/// redirect and bypass to another cgroup and port-nat to another interface,
/// and reloads that change ports in place, leave it holding exactly the
/// descriptors it held before, with traffic through the proxy in between.
#[test]
fn many_reloads_leave_no_descriptor_behind() {
    require_root!();
    let _turn = one_service_at_a_time();
    let testbed = Testbed::new();
    let apps2 = second_cgroup_and_link(&testbed);
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();
    let url = format!("http://{SERVER_V4}/");
    let with_udp =
        |config: String| config.replace("ports = [80]", "ports = [80]\nudp-ports = [53]");
    let first = with_udp(config(&testbed, "80"));
    let file = ConfigFile::new(&first);
    let mut service = start(&testbed, &file);
    assert!(curl(testbed.in_apps("curl"), &url, &[]).status.success());
    // Once the proxy has closed that connection's sockets.
    let before = settled_descriptors(service.pid());
    for round in 0..10 {
        // Moved to apps2 and veth-c2, then back, each reload attaching
        // the new before it leaves the old.
        let (apps, old, new) = if round % 2 == 0 {
            (&apps2, "veth-c", "veth-c2")
        } else {
            (&testbed.apps, "veth-c2", "veth-c")
        };
        file.reload(
            &service,
            &with_udp(config_for(apps.path(), &testbed, "80", new)),
        );
        let stopped = format!("Stopped port-nat {old}");
        service
            .wait_for_line(|l| l == stopped, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("round {round}: no '{stopped}'"));
        // Ports in place.
        let in_place = with_udp(config_for(apps.path(), &testbed, "80", new))
            .replace("ports = [80]", "ports = [80, 81]");
        file.reload(&service, &in_place);
        let reloaded = format!("Reloaded port-nat {new}");
        service
            .wait_for_line(|l| l == reloaded, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("round {round}: no '{reloaded}'"));
        let in_apps = netns::command_in("curl", Some(&testbed.client), Some(apps)).unwrap();
        assert!(curl(in_apps, &url, &[]).status.success(), "round {round}");
    }
    // Back where it started, and through the proxy again.
    file.reload(&service, &first);
    service
        .wait_for_line(|l| l == "Reloaded port-nat veth-c", Duration::from_secs(20))
        .expect("no final reload");
    assert!(curl(testbed.in_apps("curl"), &url, &[]).status.success());
    let after = settled_descriptors(service.pid());
    assert_eq!(before, after, "descriptors before and after 21 reloads");
    let (exit, _, stderr) = service.stop();
    assert!(exit.success(), "{stderr}");
    assert!(!stderr.contains("reload"), "{stderr}");
}

/// DNS as a service captures it: dig in the cgroup resolves through the
/// service's redirect and its UDP relay from dnsmasq in the server's
/// namespace, and a reload adds a UDP port in place.
#[test]
fn the_service_relays_dns_and_a_reload_adds_a_udp_port() {
    require_root!();
    let _turn = one_service_at_a_time();
    let testbed = Testbed::new();
    let _dnsmasqs = [53, 5353].map(|port| start_dnsmasq(&testbed, port));
    testbed.reject_direct(&testbed.apps, "udp", 53);
    testbed.reject_direct(&testbed.apps, "udp", 5353);
    let dig = |port: u16| {
        let mut command = testbed.in_apps("dig");
        command.args(["+short", "+tries=1", "+time=3", &format!("@{SERVER_V4}")]);
        command.args(["-p", &port.to_string(), "www.example.test", "A"]);
        String::from_utf8(run(command).stdout).unwrap()
    };
    let config = |udp_ports: &str| {
        format!(
            "[redirect]\ncgroup = \"{}\"\nsockopt-cgroup = \"{}\"\nports = [80]\n\
             udp-ports = [{udp_ports}]\n",
            testbed.apps.path().display(),
            testbed.parent.path().display()
        )
    };
    let file = ConfigFile::new(&config("53"));
    let mut service = start(&testbed, &file);

    assert_eq!(dig(53).trim(), "10.77.0.99");
    assert!(
        !dig(5353).contains("10.77.0.99"),
        "port 5353 went through before the reload"
    );
    file.reload(&service, &config("53, 5353"));
    let reloaded = service.wait_for_line(|l| l == "Reloaded redirect", Duration::from_secs(10));
    assert!(reloaded.is_some(), "no reload adding UDP port 5353");
    assert_eq!(dig(5353).trim(), "10.77.0.99");

    let (exit, output, stderr) = service.stop_with(Signal::SIGTERM);
    assert!(exit.success(), "{stderr}");
    // One query each way through the relay: the rule rejected the one to
    // 5353 before the reload at the client.
    assert_eq!(
        summary_value(&output, "proxy", "udp_upstream_datagrams"),
        2,
        "{output}"
    );
    assert_eq!(
        summary_value(&output, "proxy", "udp_downstream_datagrams"),
        2
    );
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

#[test]
fn containers_in_two_namespaces_with_their_own_proxies_one_unprivileged_one_with_fast_open() {
    require_root!();
    let _turn = one_service_at_a_time();
    let testbed = Testbed::new();
    let second = netns::NetNs::create(&unique("prtest-second")).unwrap();
    let config = format!(
        "[redirect]\ncgroup = \"{apps}\"\nsockopt-cgroup = \"{parent}\"\nports = [80]\n\
         no-proxy = true\n\n[bypass]\ncgroup = \"{parent}\"\n",
        apps = testbed.apps.path().display(),
        parent = testbed.parent.path().display(),
    );
    let file = ConfigFile::new(&config);
    let service = start(&testbed, &file);

    // A sidecar proxy on 127.0.0.1:15001 in each namespace, the second run
    // by user nobody; their clients use the same source ports at the same
    // time, so every 4-tuple exists twice (below the ephemeral range, which
    // the sidecars' own connections draw from).
    let go = file.dir.join("go");
    let go = go.to_str().unwrap();
    let sidecar = original_dst_args(&["sidecar", "", "60", "60", "21000", "0.3", go]);
    let mut as_nobody: Vec<String> = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        .map(String::from)
        .to_vec();
    as_nobody.push(PYTHON.into());
    let sidecars: Vec<Running> = [
        (&testbed.client, "10.1.0", PYTHON, Vec::new()),
        (&second, "10.2.0", "setpriv", as_nobody),
    ]
    .into_iter()
    .map(|(ns, prefix, program, mut args)| {
        let mut own = sidecar.clone();
        own[3] = prefix.into();
        args.extend(own);
        Running::start(program, &args, Some(ns), Some(&testbed.apps), "ready")
    })
    .collect();
    release_sidecars(go, sidecars, "60", "same source ports");

    // Data in the SYN in the second namespace: the proxy's socket is
    // established by the SYN itself.
    let mut sysctl = netns::command_in("sysctl", Some(&second), None).unwrap();
    sysctl.args(["-qw", "net.ipv4.tcp_fastopen=0x607"]);
    assert!(run(sysctl).status.success());
    let _fast_open_proxy = Running::start(
        PYTHON,
        &original_dst_args(&["fastopen-proxy"]),
        Some(&second),
        Some(&testbed.proxy),
        "ready",
    );
    let before = fast_open_passive(&second);
    let mut clients = netns::command_in(PYTHON, Some(&second), Some(&testbed.apps)).unwrap();
    clients.args(original_dst_args(&["fastopen-clients", "10.2.0.9", "20"]));
    let out = run(clients);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(answers.lines().count(), 20, "{answers}");
    assert!(
        answers.lines().all(|l| l.ends_with(" 10.2.0.9:80")),
        "{answers}"
    );
    assert!(fast_open_passive(&second) >= before + 20, "no Fast Open");

    wait_for_tcp_to_settle(&testbed.client);
    wait_for_tcp_to_settle(&second);
    let (exit, output, stderr) = service.stop_with(Signal::SIGTERM);
    assert!(exit.success(), "{stderr}");
    assert_eq!(
        summary_value(&output, "redirect", "redirected"),
        2 * 60 + 20
    );
    assert_eq!(
        summary_value(&output, "redirect", "original_destinations_answered"),
        2 * 60 + 20
    );
    assert_maps_empty(&output);
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

#[test]
fn bad_config_files_give_one_line_and_attach_nothing() {
    require_root!();
    let _turn = one_service_at_a_time();
    let testbed = Testbed::new();
    let dir = TempDir::new();
    let apps = testbed.apps.path().display().to_string();
    let cases = [
        (
            "unknown key",
            format!("[redirect]\ncgroup = \"{apps}\"\nport = [80]\n"),
            "unknown key 'port'",
        ),
        (
            "port out of range",
            format!("[redirect]\ncgroup = \"{apps}\"\nports = [70000]\n"),
            "70000",
        ),
        (
            "wrong type",
            "[bypass]\ncgroup = 5\n".to_owned(),
            "[bypass] cgroup",
        ),
        (
            "no such cgroup",
            "[bypass]\ncgroup = \"/no/such/cgroup\"\n".to_owned(),
            "/no/such/cgroup",
        ),
        (
            "unknown interface",
            "[[port-nat]]\ninterface = \"nosuch0\"\nfrom = [8081]\nto = [80]\n".to_owned(),
            "nosuch0",
        ),
        (
            "one interface twice",
            "[[port-nat]]\ninterface = \"veth-c\"\nfrom = [8081]\nto = [80]\n\
             [[port-nat]]\ninterface = \"veth-c\"\nfrom = [8082]\nto = [80]\n"
                .to_owned(),
            "'veth-c' already runs [port-nat #1]",
        ),
        (
            "no datapath",
            "[metrics]\nlisten = \"127.0.0.1:9480\"\n".to_owned(),
            "datapath",
        ),
    ];
    for (what, text, expected) in cases {
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let mut command = netns::command_in(BIN, Some(&testbed.client), None).unwrap();
        command.args(["run", "--config"]).arg(&path);
        assert_one_line_error(&run(command), what, expected);
        assert_eq!(testbed.attached_redirect_programs(), 0, "{what}");
    }
    let mut command = std::process::Command::new(BIN);
    command.args(["run", "--config", "/no/such/file.toml"]);
    assert_one_line_error(&run(command), "missing file", "/no/such/file.toml");

    // Nothing runs: status says so in one line.
    if !Path::new("/run/proxy-redirect/status.sock").exists() {
        let mut command = std::process::Command::new(BIN);
        command.arg("status");
        assert_one_line_error(
            &run(command),
            "status",
            "no proxy-redirect service is running",
        );
    }
}
