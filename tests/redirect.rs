//! `redirect` against the real kernel: a child cgroup, client and server
//! network namespaces, real clients (curl, python), the built-in proxy and a
//! proxy written only against the socket API.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn curl_from_apps(testbed: &Testbed, url: &str) -> std::process::Output {
    curl(testbed.in_apps("curl"), url, &[])
}

#[test]
fn http_through_builtin_proxy_over_ipv4_ipv6_and_v4_mapped() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    testbed.reject_direct(&testbed.apps, "tcp", 80);
    // The rule really rejects direct connections from the cgroup.
    let direct = curl_from_apps(&testbed, &format!("http://{SERVER_V4}/"));
    assert!(
        !direct.status.success(),
        "direct connection was not rejected"
    );

    let redirector = testbed.redirect(&[]);
    let data = payload(4 << 20, 7);
    for url in [
        format!("http://{SERVER_V4}/"),
        format!("http://[{SERVER_V6}]/"),
        format!("http://[::ffff:{SERVER_V4}]/"),
    ] {
        assert_http_echo(|| testbed.in_apps("curl"), &url, &data);
    }
    let (output, _) = redirector.stop_ok();
    let events = json_events(&output);
    let redirected: Vec<_> = events
        .iter()
        .filter(|e| e["action"] == "redirect")
        .collect();
    assert_eq!(redirected.len(), 3, "events: {events:?}");
    let originals: Vec<&str> = redirected
        .iter()
        .map(|e| e["original"].as_str().unwrap())
        .collect();
    assert_eq!(
        originals,
        [
            format!("{SERVER_V4}:80"),
            format!("[{SERVER_V6}]:80"),
            format!("{SERVER_V4}:80")
        ]
    );
    assert_eq!(
        redirected[2]["target"], "127.0.0.1:15001",
        "v4-mapped goes to the IPv4 proxy"
    );
    assert_eq!(redirected[1]["target"], "[::1]:15001");
    assert_eq!(
        summary_value(&output, "redirect", "original_destinations_answered"),
        3
    );
    assert_eq!(summary_value(&output, "proxy", "relayed"), 3);
}

/// A proxy that knows nothing of BPF: accept, getsockopt(SO_ORIGINAL_DST) or
/// getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST), print, close.
const SOCKET_API_PROXY: &str = r#"
import socket, struct, sys, time
SO_ORIGINAL_DST = 80
listeners = []
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, 15001)); s.listen(16); listeners.append(s)
print("ready", flush=True)
import select
while True:
    readable, _, _ = select.select(listeners, [], [])
    for l in readable:
        conn, peer = l.accept()
        # The client has closed by now: the answer must outlive its end.
        time.sleep(0.2)
        if l.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, = struct.unpack("!H", raw[2:4])
            print("orig %s:%d" % (socket.inet_ntop(socket.AF_INET, raw[4:8]), port), flush=True)
        else:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port, = struct.unpack("!H", raw[2:4])
            print("orig [%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port), flush=True)
        conn.close()
"#;

fn start_socket_api_proxy(testbed: &Testbed) -> Running {
    Running::start(
        PYTHON,
        &["-c".into(), SOCKET_API_PROXY.into()],
        Some(&testbed.client),
        Some(&testbed.proxy),
        "ready",
    )
}

/// Connects from `apps` with python and closes at once, before the proxy
/// asks: the original destination must outlive the client's end.
fn connect_from_apps(testbed: &Testbed, host: &str, port: u16) {
    let script = format!(
        "import socket\ns = socket.create_connection(('{host}', {port}), timeout=10)\ns.close()"
    );
    python(testbed.in_apps(PYTHON), &script);
}

#[test]
fn socket_api_proxy_reads_original_destination_as_after_iptables_redirect() {
    let testbed = root_testbed!();
    let mut proxy = start_socket_api_proxy(&testbed);
    let redirector = testbed.redirect(&["--no-proxy", "-P", "80,8443"]);
    for (host, port, expected) in [
        (SERVER_V4, 80, format!("orig {SERVER_V4}:80")),
        (SERVER_V6, 8443, format!("orig [{SERVER_V6}]:8443")),
        ("::ffff:10.77.0.2", 80, format!("orig {SERVER_V4}:80")),
    ] {
        connect_from_apps(&testbed, host, port);
        let line = proxy.wait_for_line(|l| l.starts_with("orig"), Duration::from_secs(10));
        assert_eq!(
            line.as_deref(),
            Some(expected.as_str()),
            "connecting to {host}:{port}"
        );
    }
    let (_, _) = redirector.stop_ok();

    // The same proxy, unchanged, behind iptables REDIRECT.
    for (tool, host, expected) in [
        ("iptables", SERVER_V4, format!("orig {SERVER_V4}:80")),
        ("ip6tables", SERVER_V6, format!("orig [{SERVER_V6}]:80")),
    ] {
        let mut command = testbed.in_client_netns(tool);
        command.args(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80"]);
        command.args(["-j", "REDIRECT", "--to-ports", "15001"]);
        let out = run(command);
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        connect_from_apps(&testbed, host, 80);
        let line = proxy.wait_for_line(|l| l.starts_with("orig"), Duration::from_secs(10));
        assert_eq!(line.as_deref(), Some(expected.as_str()), "{tool} REDIRECT");
    }
    proxy.kill();
}

#[test]
fn other_ports_excluded_destinations_and_the_proxys_own_connections_are_untouched() {
    let testbed = root_testbed!();
    let _web = servers::http(&testbed.server, "[::]:80").unwrap();
    let _other = servers::http(&testbed.server, "[::]:8080").unwrap();
    // The redirector runs inside the redirected cgroup itself.
    let redirector = testbed.redirect_in(
        &testbed.apps,
        &["--exclude", "10.77.0.0/30", "--exclude", "fd77::/120"],
    );
    let out = curl_from_apps(&testbed, &format!("http://{SERVER_V4}:8080/"));
    assert!(out.status.success());
    let out = curl_from_apps(&testbed, &format!("http://{SERVER_V4}/"));
    assert!(out.status.success());
    let out = curl_from_apps(&testbed, &format!("http://[{SERVER_V6}]/"));
    assert!(out.status.success());
    // A marked socket from another process is left alone too.
    let script = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, 36, 0x5052)\n\
         s.settimeout(10)\ns.connect(('{SERVER_V4}', 80))\ns.close()"
    );
    python(testbed.in_apps(PYTHON), &script);
    let (output, _) = redirector.stop_ok();
    let events = json_events(&output);
    assert!(events.iter().all(|e| e["action"] == "bypass"), "{events:?}");
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["excluded network", "excluded network", "proxy mark"]
    );
    assert_eq!(summary_value(&output, "redirect", "other_port_connects"), 1);
    assert_eq!(summary_value(&output, "proxy", "accepted"), 0);

    // Without exclusions the proxy, still inside the cgroup, relays without
    // redirecting its own upstream connection back to itself.
    let redirector = testbed.redirect_in(&testbed.apps, &[]);
    let out = curl_from_apps(&testbed, &format!("http://{SERVER_V4}/"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.starts_with(&format!("peer=[::ffff:{CLIENT_V4}]:")),
        "{body}"
    );
    let (_, output, _) = redirector.stop();
    let events = json_events(&output);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["action"], "redirect");
    assert_eq!(events[1]["action"], "bypass");
    assert_eq!(events[1]["reason"], "proxy's own connection");
    assert_eq!(summary_value(&output, "proxy", "relayed"), 1);
}

#[test]
fn without_a_listening_proxy_connections_go_direct() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&["--no-proxy"]);
    for url in [
        format!("http://{SERVER_V4}/"),
        format!("http://[{SERVER_V6}]/"),
    ] {
        let out = curl_from_apps(&testbed, &url);
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (_, output, _) = redirector.stop();
    let events = json_events(&output);
    assert_eq!(events.len(), 2);
    assert!(
        events.iter().all(|e| e["reason"] == "no proxy"),
        "{events:?}"
    );
}

/// getsockopt calls that are not SO_ORIGINAL_DST, and calls with buffers
/// larger than a page, print the same inside and outside the hooked cgroup.
const OTHER_GETSOCKOPTS: &str = r#"
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
def raw(sock, level, name, size):
    # Python's own getsockopt refuses buffers over 1024 bytes.
    buf = ctypes.create_string_buffer(size); length = ctypes.c_uint32(size)
    if libc.getsockopt(sock.fileno(), level, name, buf, ctypes.byref(length)) != 0:
        raise OSError(ctypes.get_errno(), "getsockopt")
    return buf.raw[:length.value]
def show(label, f):
    try: print(label, repr(f()))
    except OSError as e: print(label, "errno", e.errno)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); a, _ = srv.accept()
show("type", lambda: a.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
show("ttl", lambda: a.getsockopt(socket.SOL_IP, socket.IP_TTL))
show("nodelay", lambda: a.getsockopt(socket.SOL_TCP, socket.TCP_NODELAY))
show("cc", lambda: a.getsockopt(socket.SOL_TCP, socket.TCP_CONGESTION, 16))
show("cc-big", lambda: raw(a, socket.SOL_TCP, socket.TCP_CONGESTION, 8192))
show("origdst", lambda: a.getsockopt(socket.SOL_IP, 80, 16))
show("origdst-big", lambda: raw(a, socket.SOL_IP, 80, 65536))
show("origdst6", lambda: a.getsockopt(socket.SOL_IPV6, 80, 28))
"#;

#[test]
fn other_getsockopt_calls_are_untouched() {
    let testbed = root_testbed!();
    // A legacy iptables table makes iptables-legacy-save read it with large
    // getsockopt buffers.
    let mut command = testbed.in_client_netns("iptables-legacy");
    command.args([
        "-t", "filter", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT",
    ]);
    assert!(run(command).status.success());
    let outside = |program: &str, args: &[&str]| {
        let mut command = testbed.in_client_netns(program);
        command.args(args);
        run(command)
    };
    let inside = |program: &str, args: &[&str]| {
        let mut command = testbed.in_proxy_cgroup(program);
        command.args(args);
        run(command)
    };
    let expected_sockopts = outside(PYTHON, &["-c", OTHER_GETSOCKOPTS]);
    let expected_save = outside("iptables-legacy-save", &["-t", "filter"]);
    assert!(expected_save.status.success());
    let redirector = testbed.redirect(&[]);
    let hooked_sockopts = inside(PYTHON, &["-c", OTHER_GETSOCKOPTS]);
    let hooked_save = inside("iptables-legacy-save", &["-t", "filter"]);
    let (_, _) = redirector.stop_ok();
    assert_eq!(
        String::from_utf8_lossy(&hooked_sockopts.stdout),
        String::from_utf8_lossy(&expected_sockopts.stdout)
    );
    assert!(String::from_utf8_lossy(&expected_sockopts.stdout).contains("cc-big b'"));
    assert!(
        hooked_save.status.success(),
        "{}",
        String::from_utf8_lossy(&hooked_save.stderr)
    );
    let rules = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            // Packet counters change with the traffic in between.
            .map(|l| l.split(" [").next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(rules(&hooked_save), rules(&expected_save));
    assert!(rules(&hooked_save).iter().any(|l| l.contains("--dport 9")));
}

#[test]
fn original_destination_maps_are_empty_after_many_connections() {
    let testbed = root_testbed!();
    let _server = servers::echo(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&[]);
    // 300 connections, v4 and v6, each sending and reading a little.
    let script = format!(
        "import socket\nfor i in range(300):\n    host = '{SERVER_V4}' if i % 2 else '{SERVER_V6}'\n    \
         s = socket.create_connection((host, 80), timeout=10)\n    s.sendall(b'ping %d' % i)\n    \
         assert s.recv(100) == b'ping %d' % i\n    s.close()\nprint('done')"
    );
    python(testbed.in_apps(PYTHON), &script);
    // Let the last closes pass through TCP_CLOSE.
    wait_for_tcp_to_settle(&testbed.client);
    let (_, output, _) = redirector.stop();
    assert_eq!(summary_value(&output, "redirect", "redirected"), 300);
    assert_eq!(
        summary_value(&output, "redirect", "original_destinations_answered"),
        300
    );
    assert_maps_empty(&output);
}

/// The first table's records take no share; those of the overflow count
/// against their namespace, and the count, back at 0 once they are gone,
/// is swept: namespaces that come and go leave nothing behind.
#[test]
fn overflow_records_count_against_their_namespace_until_swept() {
    let testbed = root_testbed!();
    let redirector = testbed.redirect(&[]);
    // Root, in a namespace of its own, listens on the proxy address without
    // accepting: 4,200 handshakes and their records keep waiting.
    let holder = half_open_holder("-n", 4200, 30);
    let mut command = testbed.in_apps(&holder[0]);
    command.args(&holder[1..]);
    let mut holder = spawn_until_it_speaks(command, "the holder");
    let first = map_entries(redirector.pid(), "pending_orig_ds").len();
    assert_eq!(first, 4096, "records in the first table");
    // Up to two handshakes end in the listener's queue, and their records
    // are taken.
    let overflow = map_entries(redirector.pid(), "pending_overflo").len();
    assert!(
        (100..=104).contains(&overflow),
        "{overflow} records in the overflow"
    );
    let counts = map_entries(redirector.pid(), "pending_per_net");
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(
        counts[0]["formatted"]["value"].as_u64(),
        Some(overflow as u64),
        "the namespace counts its overflow's records only"
    );
    assert!(map_entries(redirector.pid(), "pending_per_uid").is_empty());
    let _ = holder.kill();
    let _ = holder.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while !map_entries(redirector.pid(), "pending_per_net").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle count was never swept"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for map in ["pending_orig_ds", "pending_overflo"] {
        let left = map_entries(redirector.pid(), map).len();
        assert_eq!(left, 0, "{left} records left in {map}");
    }
    redirector.stop_ok();
}

/// (cgroup, program) of every redirect program of `attach_type` that a
/// connection of `cgroup` runs; the kernel keeps 15 bytes of a name.
fn redirect_programs_over(
    cgroup: &std::path::Path,
    attach_type: libbpf_sys::bpf_attach_type,
) -> Vec<(std::path::PathBuf, String)> {
    proxy_redirect::sys::links::cgroup_neighbours(cgroup, attach_type)
        .unwrap()
        .into_iter()
        .filter(|program| program.name.starts_with("redirect_"))
        .map(|program| (program.cgroup, program.name))
        .collect()
}

#[test]
fn by_default_only_the_builtin_proxys_own_cgroup_runs_the_proxy_side_programs() {
    use libbpf_sys::{BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_SOCK_OPS};
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    testbed.reject_direct(&testbed.apps, "tcp", 80);
    let others =
        proxy_redirect::sys::cgroup::ChildCgroup::create(testbed.parent.path(), "others").unwrap();
    let apps = testbed.apps.path().display().to_string();
    let args = ["redirect", "-c", &apps, "--json"].map(String::from);
    let redirector = Running::start(
        BIN,
        &args,
        Some(&testbed.client),
        Some(&testbed.proxy),
        "Attached",
    );
    // Only SO_ORIGINAL_DST answered in the proxy's cgroup gets it through.
    curl_ok(testbed.in_apps("curl"), &format!("http://{SERVER_V4}/"));
    let proxy = testbed.proxy.path().to_path_buf();
    assert_eq!(
        redirect_programs_over(&proxy, BPF_CGROUP_GETSOCKOPT),
        [(proxy.clone(), "redirect_getsoc".to_owned())]
    );
    assert_eq!(
        redirect_programs_over(&proxy, BPF_CGROUP_SOCK_OPS),
        [(proxy.clone(), "redirect_proxy_".to_owned())]
    );
    for attach_type in [BPF_CGROUP_GETSOCKOPT, BPF_CGROUP_SOCK_OPS] {
        assert_eq!(
            redirect_programs_over(others.path(), attach_type),
            [],
            "a connection outside the proxy's and the redirected cgroups runs none of ours"
        );
    }
    let (output, _) = redirector.stop_ok();
    assert!(
        output.contains(&format!("answered in {}", proxy.display())),
        "{output}"
    );
    assert_eq!(redirect_programs_over(&proxy, BPF_CGROUP_SOCK_OPS), []);
}

#[test]
fn sigkill_leaves_nothing_attached_and_a_restart_works_at_once() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&[]);
    assert_eq!(testbed.attached_redirect_programs(), 7);
    let out = curl_from_apps(&testbed, &format!("http://{SERVER_V4}/"));
    assert!(out.status.success());
    redirector.signal(Signal::SIGKILL);
    redirector.kill();
    assert_eq!(
        testbed.attached_redirect_programs(),
        0,
        "programs stayed attached after SIGKILL"
    );

    let redirector = testbed.redirect(&[]);
    let out = curl_from_apps(&testbed, &format!("http://{SERVER_V4}/"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGTERM ends it cleanly too, with statistics: the human-readable
    // ones and the summary agree.
    redirector.signal(Signal::SIGTERM);
    let (output, _) = redirector.stop_ok();
    assert_eq!(stat(&output, "redirected"), 1, "{output}");
    assert_eq!(summary_value(&output, "redirect", "redirected"), 1);
    assert!(output.contains("Cleaned up"));
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

#[test]
fn bad_input_fails_with_one_line_and_attaches_nothing() {
    let testbed = root_testbed!();
    let apps = testbed.apps.path().display().to_string();
    let parent = testbed.parent.path().display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-P", "0"], "out of range"),
        (vec!["-P", "65536"], "out of range"),
        (vec!["-P", "http"], "not a port number"),
        (vec!["-P", ""], "empty"),
        (vec!["-P", "80,,443"], "empty entry"),
        (vec!["-p", "70000"], "out of range"),
        (vec!["-u", "no-such-user-xyz"], "unknown user"),
        (
            vec!["-c", "/sys/fs/cgroup-does-not-exist/x"],
            "does not exist",
        ),
        (vec!["-c", "/proc"], "not a cgroup v2 directory"),
        (vec!["-i", "127.0.0.300"], "invalid value"),
        (vec!["--exclude", "10.0.0.0/40"], "prefix length"),
    ];
    for (args, expected) in cases {
        let mut command = testbed.in_client_netns(BIN);
        command.args(["redirect", "--sockopt-cgroup", &parent]);
        if !args.contains(&"-c") {
            command.args(["-c", &apps]);
        }
        command.args(&args);
        assert_one_line_error(&run(command), &format!("{args:?}"), expected);
    }

    // An occupied proxy port.
    let _occupier = servers::echo(&testbed.client, "127.0.0.1:15001").unwrap();
    let mut command = testbed.in_client_netns(BIN);
    command.args(["redirect", "-c", &apps, "--sockopt-cgroup", &parent]);
    assert_one_line_error(&run(command), "an occupied proxy port", "already in use");

    // No privileges.
    assert_refused_without_privileges(&[
        "redirect",
        "-c",
        &apps,
        "--sockopt-cgroup",
        &parent,
        "-p",
        "15002",
    ]);

    assert_eq!(testbed.attached_redirect_programs(), 0);
}

#[test]
fn include_networks_excluded_users_and_udp() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let udp_echo = testbed
        .server
        .spawn(|| {
            let socket = std::net::UdpSocket::bind("[::]:80")?;
            socket.set_read_timeout(Some(Duration::from_secs(120)))?;
            let mut buffer = [0u8; 64];
            for _ in 0..2 {
                let (n, peer) = socket.recv_from(&mut buffer)?;
                socket.send_to(&buffer[..n], peer)?;
            }
            Ok(())
        })
        .unwrap();
    let redirector = testbed.redirect(&[
        "--include",
        "10.77.0.0/31",
        "--include",
        &format!("{SERVER_V6}/128"),
        "-u",
        "nobody",
    ]);
    let out = curl_from_apps(&testbed, &format!("http://{SERVER_V4}/"));
    assert!(out.status.success());
    let out = curl_from_apps(&testbed, &format!("http://[{SERVER_V6}]/"));
    assert!(out.status.success());
    // As user nobody (the process joins the cgroup as root, then drops).
    let script = format!(
        "import os, socket\nos.setgid(65534)\nos.setuid(65534)\n\
         socket.create_connection(('{SERVER_V6}', 80), timeout=10).close()"
    );
    python(testbed.in_apps(PYTHON), &script);
    // UDP to a redirected port is not touched: a connected UDP socket only
    // accepts the reply from the address it sent to.
    let script = format!(
        "import socket\nfor family, host in ((socket.AF_INET, '{SERVER_V4}'), (socket.AF_INET6, '{SERVER_V6}')):\n    \
         s = socket.socket(family, socket.SOCK_DGRAM)\n    s.settimeout(10)\n    s.connect((host, 80))\n    \
         s.send(b'udp ping')\n    assert s.recv(64) == b'udp ping'\nprint('udp ok')"
    );
    python(testbed.in_apps(PYTHON), &script);
    udp_echo.join().unwrap().unwrap();

    let (_, output, _) = redirector.stop();
    let events = json_events(&output);
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| (e["action"].to_string(), e["reason"].to_string()))
        .collect();
    let expected = [
        ("\"bypass\"", "\"not in an included network\""),
        ("\"redirect\"", "null"),
        ("\"bypass\"", "\"excluded user\""),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, r)| (a.to_string(), r.to_string()))
        .collect();
    assert_eq!(summary, expected, "{output}");
    assert_eq!(events[2]["uid"], 65534);
    assert_eq!(
        summary_value(&output, "redirect", "tcp_connects"),
        3,
        "UDP must not be counted"
    );
}

#[test]
fn builtin_proxy_holds_a_thousand_concurrent_connections() {
    let testbed = root_testbed!();
    let _server = servers::echo(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&[]);
    let script = format!(
        "import resource, socket\nresource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))\n\
         socks = [socket.create_connection(('{SERVER_V4}', 80), timeout=30) for i in range(1000)]\n\
         for i, s in enumerate(socks): s.sendall(b'message %d' % i)\n\
         for i, s in enumerate(socks): assert s.recv(100) == b'message %d' % i, i\n\
         for s in socks: s.close()\nprint('ok')"
    );
    python(testbed.in_apps(PYTHON), &script);
    wait_for_tcp_to_settle(&testbed.client);
    let (_, output, _) = redirector.stop();
    assert_eq!(summary_value(&output, "proxy", "accepted"), 1000);
    assert_eq!(summary_value(&output, "proxy", "relayed"), 1000);
}

#[test]
fn builtin_proxy_passes_half_close_and_is_never_an_open_relay() {
    let testbed = root_testbed!();
    let _server = servers::echo(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&[]);
    // The client half-closes after sending; the echo server sees EOF only if
    // the proxy passes the FIN on, and the client sees EOF only if the
    // proxy passes the server's close back.
    let script = format!(
        "import socket\ndata = bytes(range(256)) * 800\n\
         s = socket.create_connection(('{SERVER_V4}', 80), timeout=10)\ns.sendall(data)\n\
         s.shutdown(socket.SHUT_WR)\nreply = b''\nwhile True:\n    chunk = s.recv(65536)\n    \
         if not chunk: break\n    reply += chunk\nassert reply == data, len(reply)\nprint('ok')"
    );
    python(testbed.in_apps(PYTHON), &script);
    // A direct connection to the proxy has no original destination.
    // A refused connection with unread data is reset rather than closed.
    let script = "import socket\ns = socket.create_connection(('127.0.0.1', 15001), timeout=10)\n\
                  s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\ntry:\n    assert s.recv(100) == b''\n\
                  except ConnectionResetError:\n    pass\nprint('closed')";
    python(testbed.in_client_netns(PYTHON), script);
    let (_, output, stderr) = redirector.stop();
    assert_eq!(summary_value(&output, "proxy", "relayed"), 1);
    assert_eq!(summary_value(&output, "proxy", "refused"), 1);
    assert!(stderr.contains("no original destination"), "{stderr}");
}

/// The built-in proxy learns that its upstream connect failed (nothing
/// listens at the original destination) as soon as the kernel knows, and
/// closes the client's connection, counted.
#[test]
fn an_upstream_that_refuses_closes_the_clients_connection_at_once_and_is_counted() {
    let testbed = root_testbed!();
    let redirector = testbed.redirect(&[]);
    let script = format!(
        "import socket, time\nstart = time.monotonic()\n\
         s = socket.create_connection(('{SERVER_V4}', 80), timeout=10)\n\
         try:\n    assert s.recv(100) == b''\nexcept ConnectionResetError:\n    pass\n\
         assert time.monotonic() - start < 3, time.monotonic() - start\nprint('closed')"
    );
    python(testbed.in_apps(PYTHON), &script);
    let (_, output, _) = redirector.stop();
    assert_eq!(
        summary_value(&output, "proxy", "upstream_connect_failed"),
        1,
        "{output}"
    );
    assert_eq!(summary_value(&output, "proxy", "relayed"), 0, "{output}");
}

#[test]
fn metrics_pass_promtool_and_the_counters_move() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&["--metrics", "127.0.0.1:9477"]);
    for _ in 0..2 {
        assert!(curl_from_apps(&testbed, &format!("http://{SERVER_V4}/"))
            .status
            .success());
    }
    // Pages are published once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let page = scrape_metrics(&testbed.client, "127.0.0.1:9477");
    assert_eq!(
        metric_value(&page, "proxy_redirect_redirect_redirected_total"),
        2
    );
    assert_eq!(
        metric_value(
            &page,
            "proxy_redirect_redirect_original_destinations_answered_total"
        ),
        2
    );
    assert!(
        page.contains("proxy_redirect_build_info{version="),
        "{page}"
    );
    assert!(page.contains("# TYPE proxy_redirect_redirect_awaiting_accept gauge"));
    assert_promtool_accepts(&page);
    let (output, _) = redirector.stop_ok();
    assert!(output.contains("metrics:           http://127.0.0.1:9477/metrics"));
}
