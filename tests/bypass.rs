//! `bypass` against the real kernel: real sockets in a child cgroup and a
//! private network namespace, every byte checked, and a packet capture on
//! `lo` to show what did not cross the TCP/IP stack.

#[allow(unused_imports)]
mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::capture::Capture;
use common::*;
use nix::sys::signal::Signal;
use proxy_redirect::sys::cgroup::ChildCgroup;
use proxy_redirect::sys::links::cgroup_program_count;
use proxy_redirect::sys::netns;

/// Both ends of the test connections, in one Python process (see the file).
const PEERS: &str = include_str!("common/peers.py");
const MIB: usize = 1 << 20;

fn bypass(testbed: &Testbed, cgroup: &ChildCgroup, extra: &[&str]) -> Running {
    let mut args = vec![
        "bypass".to_owned(),
        "-c".into(),
        cgroup.path().display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Running::start(BIN, &args, Some(&testbed.client), None, "Attached")
}

/// peers.py with `args`, in the client netns inside `apps`.
fn peers(testbed: &Testbed, args: &[&str]) -> std::process::Output {
    let mut command = testbed.in_apps(PYTHON);
    command.args(["-c", PEERS]).args(args);
    let out = run(command);
    assert!(
        out.status.success(),
        "peers {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sock_ops_programs(cgroup: &ChildCgroup) -> u32 {
    cgroup_program_count(cgroup.path(), libbpf_sys::BPF_CGROUP_SOCK_OPS).unwrap()
}

/// Checks that the TCP payload `payload` seen on `lo`, while the
/// applications sent `sent` bytes in all, left out the bytes bypass
/// redirected: at most `sent` minus half of them. Not exactly `sent` minus
/// all of them: retransmissions count twice on `lo`, and a client's first
/// write can leave before its socket's insertion has finished, unseen by
/// the sk_msg program (on 6.1 under emulation, poll() sees the socket
/// established while sockops still runs).
fn assert_redirected_bytes_skipped_lo(payload: u64, sent: u64, output: &str) {
    let redirected = stat(output, "bytes redirected");
    assert!(redirected > 0, "{output}");
    assert!(
        payload + redirected / 2 <= sent,
        "{payload} payload bytes on lo, {sent} sent:\n{output}"
    );
}

#[test]
fn echo_over_ipv4_ipv6_and_v4_mapped_takes_the_bypass_byte_for_byte() {
    let testbed = root_testbed!();
    let dir = TempDir::new();
    let bypasser = bypass(&testbed, &testbed.apps, &[]);
    let capture = Capture::start(&testbed.client, "lo", &dir);
    let size = (24 * MIB).to_string();
    // (server address, client's destination): IPv4, IPv6, an IPv4 client
    // of a dual-stack server, and a dual-stack client to ::ffff:127.0.0.1.
    let pairs = [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("::", "127.0.0.1"),
        ("::", "::ffff:127.0.0.1"),
    ];
    for (server, client) in pairs {
        let out = peers(&testbed, &["echo", server, client, &size, "1"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    }
    let (syns, payload, packets) = capture.stop();
    let (output, _) = bypasser.stop_ok();
    assert_eq!(stat(&output, "inserted"), 8, "{output}");
    assert_eq!(stat(&output, "insert failures"), 0);
    // The first bytes each way wait for their reader over TCP; the rest
    // takes the bypass once the reader has caught up with its writer, and
    // never crosses lo.
    assert_eq!(syns, 4, "SYN packets on lo:\n{packets}");
    assert_redirected_bytes_skipped_lo(payload, 4 * 2 * 24 * MIB as u64, &output);

    // Every socket was inserted once, and each has its peer: the same two
    // endpoints the other way round, IPv4 for all but the IPv6 pair.
    let events = json_events(&output);
    assert_eq!(events.len(), 8, "{events:?}");
    for event in &events {
        assert_eq!(event["action"], "insert");
        let peer = events.iter().find(|e| {
            e["local"] == event["remote"]
                && e["remote"] == event["local"]
                && e["side"] != event["side"]
        });
        assert!(peer.is_some(), "no peer for {event}");
    }
    let v6 = events
        .iter()
        .filter(|e| e["local"].as_str().unwrap().starts_with("[::1]"))
        .count();
    assert_eq!(v6, 2, "{events:?}");
}

#[test]
fn many_concurrent_connections_all_take_the_bypass() {
    let testbed = root_testbed!();
    let bypasser = bypass(&testbed, &testbed.apps, &["-P", "1,65535"]);
    // -P with ports the test does not use: nothing is inserted.
    peers(&testbed, &["echo", "127.0.0.1", "127.0.0.1", "65536", "4"]);
    let (_, output, _) = bypasser.stop();
    assert_eq!(stat(&output, "inserted"), 0);
    assert_eq!(stat(&output, "other ports"), 8);

    let bypasser = bypass(&testbed, &testbed.apps, &[]);
    let out = peers(
        &testbed,
        &["echo", "::1", "::1", &(256 * 1024).to_string(), "200"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
    let (_, output, _) = bypasser.stop();
    assert_eq!(stat(&output, "inserted"), 400, "{output}");
    assert_eq!(stat(&output, "insert failures"), 0);
    // 400 writers racing their readers: each takes the bypass once its
    // reader has caught up, which many never do before the end.
    assert!(stat(&output, "bytes redirected") > 0, "{output}");
    // Closed sockets leave the map by themselves.
    assert_eq!(stat(&output, "sockets in the map at exit"), 0);
}

#[test]
fn half_close_and_close_with_data_in_flight() {
    let testbed = root_testbed!();
    let bypasser = bypass(&testbed, &testbed.apps, &[]);
    for host in ["127.0.0.1", "::1"] {
        peers(&testbed, &["push-close", host, &(8 * MIB).to_string()]);
        peers(&testbed, &["half-close", host, &(8 * MIB).to_string()]);
        peers(&testbed, &["half-close", host, "1"]);
    }
    let (_, output, _) = bypasser.stop();
    assert_eq!(stat(&output, "inserted"), 12, "{output}");
    // peers.py checked every byte. Each of these transfers starts before
    // its reader has read anything, and a reader that never catches up
    // with its writer keeps it on TCP: how many bytes take the bypass
    // depends on timing.
    assert!(stat(&output, "passed, peer behind") > 0, "{output}");
}

#[test]
fn a_peer_in_another_network_namespace_is_never_inserted() {
    let testbed = root_testbed!();
    let bypasser = bypass(&testbed, &testbed.apps, &[]);
    // A server in the other namespace, in the same cgroup.
    let server_script = "import socket\ns = socket.socket(socket.AF_INET6)\n\
         s.bind(('::', 7000)); s.listen(8); print('ready', flush=True)\n\
         while True:\n    c, _ = s.accept()\n    d = c.recv(65536)\n    \
         while d:\n        c.sendall(d); d = c.recv(65536)\n    c.close()";
    let server = Running::start(
        PYTHON,
        &["-c".into(), server_script.into()],
        Some(&testbed.server),
        Some(&testbed.apps),
        "ready",
    );
    let client = format!(
        "import socket\nfor host in ('{SERVER_V4}', '{SERVER_V6}'):\n    \
         c = socket.create_connection((host, 7000), timeout=10)\n    data = bytes(range(256)) * 4096\n    \
         c.sendall(data); c.shutdown(socket.SHUT_WR)\n    got = b''\n    \
         while True:\n        d = c.recv(65536)\n        if not d: break\n        got += d\n    \
         assert got == data\nprint('ok')"
    );
    python(testbed.in_apps(PYTHON), &client);
    server.kill();
    let (_, output, _) = bypasser.stop();
    assert_eq!(stat(&output, "inserted"), 0, "{output}");
    // Both ends of both connections: their routes lead over the veth.
    assert_eq!(stat(&output, "peer not in the namespace"), 4);
    assert_eq!(stat(&output, "messages redirected"), 0);
    assert!(json_events(&output).is_empty());
}

#[test]
fn any_address_of_the_namespace_counts_as_local() {
    let testbed = root_testbed!();
    let bypasser = bypass(&testbed, &testbed.apps, &[]);
    testbed
        .client
        .ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"])
        .unwrap();
    // Nothing to learn: the route to any address of the namespace is lo.
    peers(&testbed, &["half-close", "10.99.0.1", "100000"]);
    testbed
        .client
        .ip(&["addr", "del", "10.99.0.1/32", "dev", "lo"])
        .unwrap();
    let (_, output, _) = bypasser.stop();
    assert_eq!(stat(&output, "inserted"), 2, "{output}");
    let events = json_events(&output);
    assert!(
        events
            .iter()
            .all(|e| e["local"].as_str().unwrap().starts_with("10.99.0.1:")),
        "{events:?}"
    );
}

#[test]
fn stopping_bypass_in_the_middle_of_transfers_loses_nothing() {
    let testbed = root_testbed!();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGKILL] {
        let bypasser = bypass(&testbed, &testbed.apps, &[]);
        assert_eq!(sock_ops_programs(&testbed.apps), 1);
        // Four connections of 32 MiB each, paced to last a few seconds.
        let args: Vec<String> = ["-c", PEERS, "echo", "127.0.0.1", "127.0.0.1"]
            .iter()
            .map(|s| s.to_string())
            .chain([(32 * MIB).to_string(), "4".into(), "5".into()])
            .collect();
        let mut transfer = Running::start(
            PYTHON,
            &args,
            Some(&testbed.client),
            Some(&testbed.apps),
            "started",
        );
        std::thread::sleep(Duration::from_millis(300));
        bypasser.signal(signal);
        let output = if signal == Signal::SIGKILL {
            bypasser.kill();
            String::new()
        } else {
            let (status, output, _) = bypasser.stop();
            assert!(status.success(), "{signal}: {output}");
            output
        };
        assert_eq!(sock_ops_programs(&testbed.apps), 0, "{signal}");
        let done = transfer.wait_for_line(|l| l.starts_with("ok"), Duration::from_secs(60));
        let (status, out, err) = transfer.stop();
        assert!(
            done.is_some(),
            "{signal}: the transfer did not finish intact:\n{out}\n{err}"
        );
        assert!(status.success() || done.is_some());
        if signal != Signal::SIGKILL {
            // The bypass carried the start, TCP the rest.
            let redirected = stat(&output, "bytes redirected");
            assert!(redirected > 0, "{output}");
            assert!(redirected < 2 * 4 * 32 * MIB as u64, "{output}");
        }
    }
}

#[test]
fn redirect_builtin_proxy_and_bypass_together_deliver_intact() {
    let testbed = root_testbed!();
    // The destination is an address of this namespace that is not loopback
    // (redirect leaves loopback alone), so both legs are same-host: app ->
    // proxy and proxy -> server.
    let redirector = testbed.redirect(&["-P", "80"]);
    let bypasser = bypass(&testbed, &testbed.parent, &[]);
    let size = (16 * MIB).to_string();
    let mut runs = Vec::new();
    for (server, client) in [("0.0.0.0", CLIENT_V4), ("::", CLIENT_V6)] {
        runs.push(peers_on_port_80(
            &testbed,
            &["echo", server, client, &size, "2"],
        ));
    }
    for mode in ["half-close", "push-close"] {
        for host in [CLIENT_V4, CLIENT_V6] {
            runs.push(peers_on_port_80(
                &testbed,
                &[mode, host, &(4 * MIB).to_string()],
            ));
        }
    }
    let (_, bypass_output, _) = bypasser.stop();
    let (_, redirect_output, _) = redirector.stop();
    for (args, out) in &runs {
        assert!(
            out.status.success(),
            "{args:?}: {}\n{bypass_output}\n{redirect_output}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // 8 connections, each two legs of two sockets.
    assert_eq!(stat(&redirect_output, "redirected"), 8, "{redirect_output}");
    assert_eq!(stat(&redirect_output, "relayed to the end"), 8);
    assert_eq!(stat(&bypass_output, "inserted"), 32, "{bypass_output}");
    assert!(
        stat(&bypass_output, "bytes redirected") > 0,
        "{bypass_output}"
    );
}

/// peers.py with its servers on port 80 (which `redirect -P 80` catches)
/// instead of a free port.
fn peers_on_port_80(testbed: &Testbed, args: &[&str]) -> (Vec<String>, std::process::Output) {
    let script = PEERS.replace("s.bind((host, 0))", "s.bind((host, 80))");
    let mut command = testbed.in_apps(PYTHON);
    command.args(["-c", &script]).args(args);
    (args.iter().map(|s| s.to_string()).collect(), run(command))
}

#[test]
fn bad_input_fails_with_one_line_and_attaches_nothing() {
    let testbed = root_testbed!();
    let apps = testbed.apps.path().display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-c", "/sys/fs/cgroup-does-not-exist/x"],
            "does not exist",
        ),
        (vec!["-c", "/proc"], "not a cgroup v2 directory"),
        (vec!["-c", &apps, "-P", "0"], "out of range"),
        (vec!["-c", &apps, "-P", "redis"], "not a port number"),
        (vec!["-c", &apps, "-P", ""], "empty"),
        (vec!["-c", &apps, "--no-such-flag"], "unexpected argument"),
        (
            vec!["-c", &apps, "--splice-readers", "a-name-longer-than-15"],
            "not a process name",
        ),
    ];
    for (args, expected) in cases {
        let mut command = testbed.in_client_netns(BIN);
        command.arg("bypass").args(&args);
        assert_one_line_error(&run(command), &format!("{args:?}"), expected);
    }
    // No privileges.
    assert_refused_without_privileges(&["bypass", "-c", &apps]);
    assert_eq!(sock_ops_programs(&testbed.apps), 0);

    // -v prints a header and one line per insertion.
    let mut bypasser = Running::start(
        BIN,
        &["bypass".into(), "-c".into(), apps.clone(), "-v".into()],
        Some(&testbed.client),
        None,
        "Attached",
    );
    assert!(bypasser
        .wait_for_line(
            |l| l.contains("TIME(s)") && l.contains("CONNECTION"),
            Duration::from_secs(5)
        )
        .is_some());
    peers(&testbed, &["half-close", "127.0.0.1", "10"]);
    let (_, output, _) = bypasser.stop();
    let inserts: Vec<&str> = output.lines().filter(|l| l.contains(" INSERT ")).collect();
    assert_eq!(inserts.len(), 2, "{output}");
    assert!(inserts.iter().any(|l| l.contains("connect")));
    assert!(inserts.iter().any(|l| l.contains("accept")));
}

/// peers.py with the server on port 7001 and the client bound to port
/// 21001 (below the ephemeral range, so never already taken): the same two
/// endpoints in every namespace it runs in.
fn peers_on_fixed_ports(netns: &proxy_redirect::sys::netns::NetNs, cgroup: &ChildCgroup) -> Child {
    let script = PEERS
        .replace("s.bind((host, 0))", "s.bind((host, 7001))")
        .replace(
            "c.connect((host, port))",
            "c.bind((host, 21001))\n    c.connect((host, port))",
        );
    let size = (32 * MIB).to_string();
    netns::command_in(PYTHON, Some(netns), Some(cgroup))
        .unwrap()
        .args(["-c", &script, "echo", "127.0.0.1", "127.0.0.1", &size, "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn one_instance_in_the_host_namespace_pairs_within_each_child_namespace() {
    let testbed = root_testbed!();
    let dirs = [TempDir::new(), TempDir::new()];
    // bypass runs in this (the host's) namespace; the pairs run in the two
    // child namespaces of the cgroup with the very same 4-tuple.
    let args: Vec<String> = ["bypass", "-c"]
        .iter()
        .map(|s| s.to_string())
        .chain([testbed.apps.path().display().to_string(), "--json".into()])
        .collect();
    let bypasser = Running::start(BIN, &args, None, None, "Attached");
    let namespaces = [&testbed.client, &testbed.server];
    let captures: Vec<Capture> = namespaces
        .iter()
        .zip(&dirs)
        .map(|(ns, dir)| Capture::start(ns, "lo", dir))
        .collect();
    let transfers: Vec<Child> = namespaces
        .iter()
        .map(|ns| peers_on_fixed_ports(ns, &testbed.apps))
        .collect();
    for transfer in transfers {
        let out = transfer.wait_with_output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut payload = 0u64;
    for capture in captures {
        let (syns, bytes, packets) = capture.stop();
        assert_eq!(syns, 1, "SYN packets on lo:\n{packets}");
        payload += bytes;
    }
    let (output, _) = bypasser.stop_ok();
    assert_eq!(stat(&output, "inserted"), 4, "{output}");
    assert_eq!(stat(&output, "peer not in the namespace"), 0);
    // How much takes the bypass depends on how soon each reader catches up
    // with its writer; none of it crossed either namespace's lo.
    assert_redirected_bytes_skipped_lo(payload, 2 * 2 * 32 * MIB as u64, &output);
    // Two pairs with one 4-tuple, told apart by their namespace.
    let events = json_events(&output);
    assert_eq!(events.len(), 4, "{events:?}");
    let namespaces: std::collections::HashSet<u64> = events
        .iter()
        .map(|e| e["netns"].as_u64().unwrap())
        .collect();
    assert_eq!(namespaces.len(), 2, "{events:?}");
    for event in &events {
        let peers = events
            .iter()
            .filter(|e| e["local"] == event["remote"] && e["remote"] == event["local"])
            .collect::<Vec<_>>();
        assert_eq!(peers.len(), 2, "{events:?}");
        assert_eq!(
            peers
                .iter()
                .filter(|e| e["netns"] == event["netns"])
                .count(),
            1,
            "{events:?}"
        );
    }
}

/// A client that writes `1`s and then `2`s (and on, ten digits of 64 KiB)
/// right after a Fast Open connect, and a server that must read them in
/// that order; several connections, so that later ones carry a cookie.
const FAST_OPEN: &str = r#"
import socket, sys, threading
server_fast_open = sys.argv[1] == "1"
CHUNK = 64 * 1024
expected = b"".join(str(d).encode() * CHUNK for d in range(10))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if server_fast_open:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
s.bind(("127.0.0.1", 0)); s.listen(16)
port = s.getsockname()[1]
for i in range(6):
    c = socket.socket()
    if i % 2:
        # TCP_FASTOPEN_CONNECT: connect() returns at once, the first write
        # goes with (or right after) the SYN.
        c.setsockopt(socket.IPPROTO_TCP, 30, 1)
        c.connect(("127.0.0.1", port))
        c.send(expected[:CHUNK])
    else:
        c.sendto(expected[:CHUNK], socket.MSG_FASTOPEN, ("127.0.0.1", port))
    c.sendall(expected[CHUNK:])
    c.shutdown(socket.SHUT_WR)
    conn, _ = s.accept()
    got = []
    while True:
        d = conn.recv(1 << 20)
        if not d: break
        got.append(d)
    got = b"".join(got)
    if got != expected:
        order = [got[k] for k in range(0, len(got), CHUNK)]
        print("connection", i, "out of order:", bytes(order), len(got), file=sys.stderr); sys.exit(1)
    conn.close(); c.close()
print("ok")
"#;

#[test]
fn fast_open_data_is_never_overtaken_by_redirected_data() {
    let testbed = root_testbed!();
    // 1: the client's data waits for the handshake (the server has no Fast
    // Open); 3: the data rides in the SYN once the client has a cookie.
    for (sysctl, server_fast_open) in [("1", "0"), ("3", "1")] {
        let mut command = testbed.in_client_netns("sysctl");
        command.args(["-qw", &format!("net.ipv4.tcp_fastopen={sysctl}")]);
        assert!(run(command).status.success());
        let bypasser = bypass(&testbed, &testbed.apps, &[]);
        let out = python(
            testbed.in_apps(PYTHON),
            &FAST_OPEN.replace("sys.argv[1]", &format!("\"{server_fast_open}\"")),
        );
        let (_, output, _) = bypasser.stop();
        assert!(out.contains("ok"), "tcp_fastopen={sysctl}: {out}\n{output}");
        // Sockets over which a byte crossed TCP stayed out of the map.
        assert!(
            stat(&output, "data before insertion") > 0,
            "tcp_fastopen={sysctl}: {output}"
        );
    }
}

/// nginx serving `files` (name, contents) from a private prefix on
/// CLIENT_V4:80 and [CLIENT_V6]:80, with long keep-alive; killed on drop.
struct Nginx {
    child: Child,
    _dir: TempDir,
}

impl Nginx {
    fn start(
        netns: &proxy_redirect::sys::netns::NetNs,
        cgroup: &ChildCgroup,
        files: &[(String, Vec<u8>)],
    ) -> Nginx {
        let dir = TempDir::new();
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        for (name, data) in files {
            std::fs::write(www.join(name), data).unwrap();
        }
        let prefix = dir.join("").display().to_string();
        let config = format!(
            "daemon off; master_process off; user root; worker_processes 1;\n\
             pid {prefix}nginx.pid; error_log {prefix}error.log;\n\
             events {{}}\n\
             http {{ access_log off; keepalive_requests 100000; sendfile off;\n\
               client_body_temp_path {prefix}; proxy_temp_path {prefix};\n\
               fastcgi_temp_path {prefix}; uwsgi_temp_path {prefix}; scgi_temp_path {prefix};\n\
               server {{ listen {CLIENT_V4}:80; listen [{CLIENT_V6}]:80; root {www}; }} }}\n",
            www = www.display()
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = netns::command_in("nginx", Some(netns), Some(cgroup))
            .unwrap()
            .args(["-p", &prefix, "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx)");
        let nginx = Nginx { child, _dir: dir };
        for _ in 0..100 {
            if std::fs::metadata(format!("{prefix}nginx.pid")).is_ok() {
                std::thread::sleep(Duration::from_millis(100));
                return nginx;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nginx did not start");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn builtin_proxy_over_bypass_relays_every_response_size_to_the_end() {
    let testbed = root_testbed!();
    // Sizes around the proxy's 32 KiB copy buffer, and beyond.
    let mut sizes: Vec<usize> = (32 * 1024 - 3..=32 * 1024 + 3).collect();
    sizes.extend([40_001, 64 * 1024, 100_000, 4 * MIB]);
    let files: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| (format!("f{size}"), payload(size, i as u64)))
        .collect();
    // curl in apps (redirected to the proxy), the proxy in `proxy`, nginx
    // beside it: bypass on the parent covers both legs.
    let _nginx = Nginx::start(&testbed.client, &testbed.proxy, &files);
    let redirector = testbed.redirect(&["-P", "80"]);
    let bypasser = bypass(&testbed, &testbed.parent, &[]);
    let dir = TempDir::new();
    let mut failures = Vec::new();
    for host in [CLIENT_V4.to_string(), format!("[{CLIENT_V6}]")] {
        // Every size, three times, one after the other on one keep-alive
        // connection (a stall costs its 3 s); then ten parallel 4 MiB
        // downloads.
        let small: Vec<&(String, Vec<u8>)> = files.iter().filter(|(_, d)| d.len() < MIB).collect();
        let big = files.iter().find(|(_, d)| d.len() == 4 * MIB).unwrap();
        let runs = [
            (
                "3",
                (0..3)
                    .flat_map(|round| small.iter().map(move |f| (round, *f)))
                    .collect::<Vec<_>>(),
            ),
            ("20", (0..10).map(|i| (i, big)).collect()),
        ];
        for (max_time, transfers) in runs {
            let mut command = testbed.in_apps("curl");
            command.args([
                "-sS",
                "--fail",
                "--max-time",
                max_time,
                "--parallel-max",
                "10",
            ]);
            if max_time == "20" {
                command.arg("--parallel");
            }
            let mut expected = Vec::new();
            for (i, (name, data)) in transfers {
                let out = dir.join(&format!("{name}-{i}"));
                command
                    .arg(format!("http://{host}/{name}"))
                    .arg("-o")
                    .arg(&out);
                expected.push((out, data));
            }
            let out = run(command);
            if !out.status.success() {
                failures.push(format!("{host}: {}", String::from_utf8_lossy(&out.stderr)));
            }
            for (path, data) in expected {
                let got = std::fs::read(&path).unwrap_or_default();
                if got != *data {
                    failures.push(format!(
                        "{}: {} of {} bytes",
                        path.display(),
                        got.len(),
                        data.len()
                    ));
                }
            }
        }
    }
    let (_, bypass_output, _) = bypasser.stop();
    let (_, redirect_output, _) = redirector.stop();
    assert!(
        failures.is_empty(),
        "{failures:#?}\n{bypass_output}\n{redirect_output}"
    );
    // Both legs of every connection took the bypass.
    let connections = stat(&redirect_output, "redirected");
    assert!(connections >= 2 * 2, "{redirect_output}");
    assert_eq!(
        stat(&bypass_output, "inserted"),
        4 * connections,
        "{bypass_output}\n{redirect_output}"
    );
    assert_eq!(stat(&bypass_output, "insert failures"), 0);
}

/// An echo server on 127.0.0.1:7002, and a client that sends SIZE bytes to
/// 127.0.0.1:PORT and must get them back intact.
const ECHO_THROUGH: &str = r#"
import socket, sys, threading, random, time
port, size = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7002)); s.listen(8)
def serve():
    c, _ = s.accept()
    while True:
        d = c.recv(1 << 16)
        if not d: break
        c.sendall(d)
    c.close()
threading.Thread(target=serve, daemon=True).start()
data = random.Random(7).randbytes(size)
# The relay may still be starting (slow under emulation).
for attempt in range(200):
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=20)
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)), daemon=True).start()
got = []
while True:
    d = c.recv(1 << 20)
    if not d: break
    got.append(d)
got = b"".join(got)
if got != data:
    print(len(got), "of", size, "bytes came back intact" if data.startswith(got) else "bytes, corrupted", file=sys.stderr); sys.exit(1)
print("ok")
"#;

/// HAProxy relaying 127.0.0.1:7003 to an echo server on 7002 with `option
/// splice-request` and `option splice-response`, under `bypass` with
/// `bypass_args`: one connection after the other, each echoing 4,000,000
/// bytes that must come back intact. Returns bypass's output.
fn haproxy_splicing(bypass_args: &[&str], connections: usize) -> String {
    let testbed = Testbed::new();
    let dir = TempDir::new();
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  \
         option splice-request\n  option splice-response\n\
         listen relay\n  bind 127.0.0.1:7003\n  server echo 127.0.0.1:7002\n",
    )
    .unwrap();
    let bypasser = bypass(&testbed, &testbed.apps, bypass_args);
    let mut haproxy = netns::command_in("haproxy", Some(&testbed.client), Some(&testbed.apps))
        .unwrap()
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy (apt-get install haproxy)");
    let outs: Vec<String> = (0..connections)
        .map(|_| {
            let mut command = testbed.in_apps(PYTHON);
            command.args([
                "-c",
                &ECHO_THROUGH.replace("int(sys.argv[1]), int(sys.argv[2])", "7003, 4000000"),
            ]);
            let out = run(command);
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .collect();
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    let (_, output, _) = bypasser.stop();
    for (i, out) in outs.iter().enumerate() {
        assert!(out.starts_with("ok"), "connection {i}: {out}\n{output}");
    }
    output
}

#[test]
fn haproxy_splicing_both_ways_gets_every_byte() {
    require_root!();
    let output = haproxy_splicing(&[], 1);
    // haproxy is named by default: its two sockets stayed out; the client's
    // and the server's sockets went in, and found no peer.
    assert_eq!(stat(&output, "splice reader's sockets"), 2, "{output}");
    assert_eq!(stat(&output, "messages redirected"), 0, "{output}");
}

#[test]
fn haproxy_unnamed_is_learned_at_its_first_splice_and_gets_every_byte() {
    require_root!();
    let output = haproxy_splicing(&["--splice-readers", ""], 3);
    // The first connection's four sockets went in; HAProxy read the first
    // bytes with recv, which left it behind the client, and spliced the
    // rest: it was learned, and its sockets of the two later connections
    // stayed out.
    assert_eq!(stat(&output, "inserted"), 4 + 2 * 2, "{output}");
    assert_eq!(stat(&output, "splice readers learned"), 1, "{output}");
    assert_eq!(stat(&output, "splice reader's sockets"), 2 * 2, "{output}");
    assert_eq!(stat(&output, "splices after redirects"), 0, "{output}");
}

/// A program that names itself NAME, connects to itself and reads 1 MiB
/// with splice(2) only.
const PLAIN_SPLICE_READER: &str = r#"
import ctypes, os, socket, threading, random
ctypes.CDLL(None).prctl(15, b"NAME", 0, 0, 0)
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
data = random.Random(3).randbytes(1 << 20)
def send():
    c = socket.create_connection(s.getsockname())
    c.sendall(data); c.close()
threading.Thread(target=send).start()
conn, _ = s.accept()
r, w = os.pipe()
got = []
while True:
    n = os.splice(conn.fileno(), w, 1 << 16)
    if n == 0: break
    got.append(os.read(r, n))
got = b"".join(got)
assert got == data, f"{len(got)} of {len(data)} bytes"
print("ok")
"#;

#[test]
fn a_splice_reader_named_with_splice_readers_gets_every_byte() {
    let testbed = root_testbed!();
    let bypasser = bypass(&testbed, &testbed.apps, &["--splice-readers", "splicer"]);
    let out = python(
        testbed.in_apps(PYTHON),
        &PLAIN_SPLICE_READER.replace("NAME", "splicer"),
    );
    let (_, output, _) = bypasser.stop();
    assert!(out.contains("ok"), "{out}\n{output}");
    // Its client thread carries the name too: both ends stayed out.
    assert_eq!(stat(&output, "splice reader's sockets"), 2, "{output}");
    assert_eq!(stat(&output, "bytes redirected"), 0, "{output}");
}

#[test]
fn an_unnamed_splice_reader_gets_every_byte() {
    let testbed = root_testbed!();
    let bypasser = bypass(&testbed, &testbed.apps, &[]);
    for _ in 0..2 {
        let out = python(
            testbed.in_apps(PYTHON),
            &PLAIN_SPLICE_READER.replace("NAME", "plainsplicer"),
        );
        assert!(out.contains("ok"), "{out}");
    }
    let (_, output, _) = bypasser.stop();
    // The first run's sockets went in, but the reader never read with
    // recv: nothing was redirected to it. Its first splice taught bypass
    // the program, whose second run stayed out.
    assert_eq!(stat(&output, "inserted"), 2, "{output}");
    assert_eq!(stat(&output, "bytes redirected"), 0, "{output}");
    assert_eq!(stat(&output, "splice readers learned"), 1, "{output}");
    assert_eq!(stat(&output, "splice reader's sockets"), 2, "{output}");
}

/// See the file: numbered streams whose reader falls behind, then catches up.
const ORDER_STRESS: &str = include_str!("common/order_stress.py");

#[test]
fn a_reader_behind_never_has_bytes_overtaken() {
    let testbed = root_testbed!();
    let bypasser = bypass(&testbed, &testbed.apps, &[]);
    let mut command = testbed.in_apps(PYTHON);
    command.args(["-c", ORDER_STRESS, "400"]);
    let out = run(command);
    let (_, output, _) = bypasser.stop();
    assert!(
        out.status.success(),
        "{}{}\n{output}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stat(&output, "inserted"), 800, "{output}");
    // In the first connections, parts 1 and 2 waited for the reader, over
    // TCP, and part 3 took the bypass; once the server's port was seen
    // reading with recv, later connections took it from the first byte.
    // Either way every stream arrived in order.
    assert!(stat(&output, "passed, peer behind") >= 2, "{output}");
    assert!(
        stat(&output, "sockets of known recv readers") > 0,
        "{output}"
    );
    assert!(
        stat(&output, "bytes redirected") >= 400 * (16384 - 9000),
        "{output}"
    );
}

/// A reader that asks for more than is there (MSG_WAITALL, SO_RCVLOWAT)
/// waits inside tcp_recvmsg, which would not notice redirected messages.
const WAITING_READERS: &str = r#"
import random, socket, sys, threading, time
data = random.Random(5).randbytes(1 << 20)
for mode in ("waitall", "rcvlowat"):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
    def send():
        c = socket.create_connection(s.getsockname())
        for k in range(0, len(data), 1000):
            c.sendall(data[k:k + 1000])
            if k % 50000 == 0:
                time.sleep(0.01)
        c.close()
    threading.Thread(target=send).start()
    conn, _ = s.accept()
    conn.settimeout(20)
    if mode == "rcvlowat":
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 4096)
    flags = socket.MSG_WAITALL if mode == "waitall" else 0
    got = []
    while True:
        d = conn.recv(8192, flags)
        if not d: break
        got.append(d)
    got = b"".join(got)
    assert got == data, f"{mode}: {len(got)} of {len(data)} bytes"
print("ok")
"#;

#[test]
fn readers_waiting_for_more_than_is_there_get_every_byte() {
    let testbed = root_testbed!();
    let bypasser = bypass(&testbed, &testbed.apps, &[]);
    let out = python(testbed.in_apps(PYTHON), WAITING_READERS);
    let (_, output, _) = bypasser.stop();
    assert!(out.contains("ok"), "{out}\n{output}");
    assert_eq!(stat(&output, "inserted"), 4, "{output}");
    assert!(stat(&output, "bytes redirected") > 0, "{output}");
}
