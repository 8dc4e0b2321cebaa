//! `redirect --udp-ports` and getpeername against the real kernel: a child
//! cgroup whose direct UDP to the server is rejected, a server in another
//! namespace, real clients (python, dig) and a real DNS server (dnsmasq).

mod common;

use std::time::Duration;

use common::*;

const UDP_PORT: &str = "5353";
const OTHER_PORT: &str = "5354";

/// UDP echo servers on UDP_PORT and OTHER_PORT in the server's namespace,
/// which the `apps` cgroup reaches only through the redirect.
fn echoes_on_both_ports(testbed: &Testbed) -> [servers::Server; 2] {
    [UDP_PORT, OTHER_PORT].map(|port| {
        testbed.reject_direct(&testbed.apps, "udp", port);
        servers::udp_echo(&testbed.server, &format!("[::]:{port}")).unwrap()
    })
}

/// For each destination: a connected socket (whose peer must read as the
/// destination) and an unconnected one using sendto/recvfrom (whose reply
/// must come from the destination), each exchanging three datagrams.
const UDP_CLIENTS: &str = r#"
import os, socket, sys
port = int(sys.argv[1])
for family, host, expected in (
    (socket.AF_INET, sys.argv[2], sys.argv[2]),
    (socket.AF_INET6, sys.argv[3], sys.argv[3]),
    (socket.AF_INET6, "::ffff:" + sys.argv[2], "::ffff:" + sys.argv[2]),
):
    dst = (host, port)
    connected = socket.socket(family, socket.SOCK_DGRAM)
    connected.settimeout(5)
    connected.connect(dst)
    peer = connected.getpeername()[:2]
    assert peer == (expected, port), "getpeername %r, dialled %r" % (peer, dst)
    unconnected = socket.socket(family, socket.SOCK_DGRAM)
    unconnected.settimeout(5)
    for i in range(3):
        data = os.urandom(64 + i)
        connected.send(data)
        back, source = connected.recvfrom(2048)
        assert back == data, "connected %r: other bytes came back" % (dst,)
        assert source[:2] == (expected, port), "connected reply from %r" % (source,)
        data = os.urandom(512 + i)
        unconnected.sendto(data, dst)
        back, source = unconnected.recvfrom(2048)
        assert back == data, "unconnected %r: other bytes came back" % (dst,)
        assert source[:2] == (expected, port), "recvfrom %r: reply from %r" % (dst, source)
    print("ok", host, flush=True)
"#;

fn udp_clients(testbed: &Testbed) -> std::process::Output {
    let mut command = testbed.in_apps(PYTHON);
    command
        .args(["-c", UDP_CLIENTS, UDP_PORT])
        .args([SERVER_V4, SERVER_V6]);
    run(command)
}

#[test]
fn udp_connected_and_recvfrom_clients_over_ipv4_ipv6_and_v4_mapped() {
    let testbed = root_testbed!();
    let server = servers::udp_echo(&testbed.server, &format!("[::]:{UDP_PORT}")).unwrap();
    testbed.reject_direct(&testbed.apps, "udp", UDP_PORT);
    let direct = udp_clients(&testbed);
    assert!(!direct.status.success(), "direct UDP was not rejected");

    let redirector = testbed.redirect(&["--udp-ports", UDP_PORT]);
    // connect4/6, getpeername4/6, sendmsg4/6, recvmsg4/6 at apps;
    // two sockops, getsockopt and the relay's recvmsg4/6 and sendmsg4/6
    // at the parent.
    assert_eq!(testbed.attached_redirect_programs(), 15);
    let out = udp_clients(&testbed);
    let (status, output, _) = redirector.stop();
    assert!(
        out.status.success(),
        "UDP through the redirect: {}\n{output}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    assert!(status.success());

    // The server saw the relay's upstream sockets, from the client netns.
    assert!(server.peers().iter().all(|p| {
        let ip = p.ip().to_string();
        ip.ends_with(CLIENT_V4) || ip == CLIENT_V6
    }));
    let events = json_events(&output);
    let redirected: Vec<_> = events
        .iter()
        .filter(|e| e["action"] == "redirect" && e["protocol"] == "udp")
        .collect();
    // One per socket and destination, not per datagram.
    assert_eq!(redirected.len(), 6, "events: {events:?}");
    assert_eq!(stat(&output, "datagrams client->upstream"), 18);
    assert_eq!(stat(&output, "datagrams upstream->client"), 18);
    assert_eq!(stat(&output, "UDP replies from the original"), 18);
    // Python itself asks getpeername() again as it closes a socket.
    assert!(stat(&output, "getpeername answered") >= 3);
    assert_eq!(stat(&output, "UDP flows opened"), 6);
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

#[test]
fn dig_resolves_through_dnsmasq_and_the_event_names_the_query() {
    let testbed = root_testbed!();
    let _dnsmasq = start_dnsmasq(&testbed, 53);
    testbed.reject_direct(&testbed.apps, "udp", 53);
    let dig = || {
        let mut command = testbed.in_apps("dig");
        command.args(["+short", "+tries=1", "+time=3", &format!("@{SERVER_V4}")]);
        command.args(["www.example.test", "A"]);
        run(command)
    };
    let direct = dig();
    assert!(
        !String::from_utf8_lossy(&direct.stdout).contains("10.77.0.99"),
        "direct DNS was not rejected"
    );

    let redirector = testbed.redirect(&["--udp-ports", "53"]);
    let out = dig();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10.77.0.99",
        "dig: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (output, _) = redirector.stop_ok();
    let events = json_events(&output);
    let dns: Vec<_> = events.iter().filter(|e| e["action"] == "dns").collect();
    assert_eq!(dns.len(), 1, "events: {events:?}");
    assert_eq!(dns[0]["name"], "www.example.test");
    assert_eq!(dns[0]["type"], "A");
    assert_eq!(dns[0]["original"], format!("{SERVER_V4}:53"));
}

/// A TCP client's getpeername() returns the address it dialled, not the
/// proxy's, over IPv4, IPv6 and v4-mapped.
#[test]
fn tcp_getpeername_returns_the_dialled_address() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&[]);
    let script = format!(
        r#"
import socket
for family, host in ((socket.AF_INET, "{SERVER_V4}"), (socket.AF_INET6, "{SERVER_V6}"),
                     (socket.AF_INET6, "::ffff:{SERVER_V4}")):
    s = socket.create_connection((host, 80), timeout=10) if family == socket.AF_INET else socket.socket(family)
    if family == socket.AF_INET6:
        s.settimeout(10); s.connect((host, 80))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    reply = b""
    while True:
        chunk = s.recv(4096)
        if not chunk: break
        reply += chunk
    # The server saw the proxy's upstream connection: the redirect happened.
    assert b"peer=" in reply, reply
    print(s.getpeername()[0], s.getpeername()[1])
"#
    );
    let out = python(testbed.in_apps(PYTHON), &script);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("{SERVER_V4} 80"),
            format!("{SERVER_V6} 80"),
            format!("::ffff:{SERVER_V4} 80"),
        ]
    );
    let (output, _) = redirector.stop_ok();
    assert_eq!(stat(&output, "relayed to the end"), 3);
    // Python itself asks getpeername() again as it closes a socket.
    assert!(stat(&output, "getpeername answered") >= 3);
}

/// One unconnected socket alternating between two destinations: every
/// datagram reaches its own destination and every reply reads as from it,
/// because the relay takes each datagram's destination as it receives it.
/// A sender that was never redirected (outside the cgroup, straight to the
/// proxy address) gets nothing relayed.
#[test]
fn unconnected_client_switching_destinations_and_an_unredirected_sender() {
    let testbed = root_testbed!();
    let [first, second] = echoes_on_both_ports(&testbed);
    let ports = format!("{UDP_PORT},{OTHER_PORT}");
    let redirector = testbed.redirect(&["--udp-ports", &ports]);
    let script = format!(
        r#"
import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for i in range(10):
    dst = ("{SERVER_V4}", ({UDP_PORT}, {OTHER_PORT})[i % 2])
    data = os.urandom(64)
    s.sendto(data, dst)
    back, source = s.recvfrom(2048)
    assert back == data, "datagram %d to %r: other bytes came back" % (i, dst)
    assert source == dst, "datagram %d to %r: reply from %r" % (i, dst, source)
print("ok", flush=True)
"#
    );
    assert_eq!(python(testbed.in_apps(PYTHON), &script).trim(), "ok");
    let stray = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(b"stray", ("127.0.0.1", 15001))
try:
    s.recvfrom(2048)
    print("answered", flush=True)
except socket.timeout:
    print("silence", flush=True)
"#;
    assert_eq!(
        python(testbed.in_client_netns(PYTHON), stray).trim(),
        "silence"
    );
    let (output, _) = redirector.stop_ok();
    assert_eq!(first.peers().len(), 5);
    assert_eq!(second.peers().len(), 5);
    assert_eq!(stat(&output, "UDP flows opened"), 2);
    assert_eq!(stat(&output, "datagrams client->upstream"), 10);
    assert_eq!(stat(&output, "datagrams upstream->client"), 10);
    assert_eq!(stat(&output, "without original destination"), 1);
}

/// Many flows at once through the relay, then nothing left once they are
/// idle.
#[test]
fn many_concurrent_udp_flows_then_the_flow_table_empties() {
    let testbed = root_testbed!();
    let _server = servers::udp_echo(&testbed.server, &format!("[::]:{UDP_PORT}")).unwrap();
    testbed.reject_direct(&testbed.apps, "udp", UDP_PORT);
    let redirector = testbed.redirect(&["--udp-ports", UDP_PORT, "--udp-idle-timeout", "1"]);
    let script = format!(
        r#"
import os, select, socket
sockets = []
for i in range(300):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("{SERVER_V4}", {UDP_PORT}))
    sockets.append(s)
# All 300 flows stay open; they send in waves of 50, which the echo
# server's own receive buffer holds.
for wave in range(0, len(sockets), 50):
    sent = {{}}
    for s in sockets[wave:wave + 50]:
        sent[s] = os.urandom(64)
        s.send(sent[s])
    waiting = set(sent)
    while waiting:
        readable, _, _ = select.select(list(waiting), [], [], 10)
        assert readable, "%d flows got no reply" % len(waiting)
        for s in readable:
            assert s.recv(2048) == sent[s]
            waiting.discard(s)
print("ok", flush=True)
"#
    );
    assert_eq!(python(testbed.in_apps(PYTHON), &script).trim(), "ok");
    // Flows close after one idle second.
    std::thread::sleep(Duration::from_secs(3));
    let (output, _) = redirector.stop_ok();
    assert_eq!(stat(&output, "UDP flows opened"), 300);
    assert_eq!(stat(&output, "UDP flows expired"), 300);
    assert_eq!(stat(&output, "UDP flows open now"), 0);
    assert_eq!(stat(&output, "datagrams upstream->client"), 300);
}

/// With nothing on the proxy address, UDP goes to its destination
/// (`open`), or every send and connect fails at once (`closed`).
#[test]
fn without_a_proxy_udp_fails_open_or_closed() {
    let testbed = root_testbed!();
    let _server = servers::udp_echo(&testbed.server, &format!("[::]:{UDP_PORT}")).unwrap();
    let script = format!(
        r#"
import socket, sys
for family, host in ((socket.AF_INET, "{SERVER_V4}"), (socket.AF_INET6, "{SERVER_V6}")):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(5)
    try:
        s.sendto(b"ping", (host, {UDP_PORT}))
        data, source = s.recvfrom(64)
        assert data == b"ping" and source[0] == host, source
        print("direct", flush=True)
    except ConnectionRefusedError:
        c = socket.socket(family, socket.SOCK_DGRAM)
        try:
            c.connect((host, {UDP_PORT}))
            print("connect succeeded", flush=True)
        except ConnectionRefusedError:
            print("refused", flush=True)
"#
    );
    for (policy, expected) in [("open", "direct"), ("closed", "refused")] {
        let redirector = testbed.redirect(&[
            "--udp-ports",
            UDP_PORT,
            "--no-proxy",
            "--when-proxy-down",
            policy,
        ]);
        // Without the built-in relay, nothing on the proxy's side publishes.
        assert_eq!(testbed.attached_redirect_programs(), 11);
        let out = python(testbed.in_apps(PYTHON), &script);
        assert_eq!(out.lines().collect::<Vec<_>>(), [expected, expected]);
        let (output, _) = redirector.stop_ok();
        let events = json_events(&output);
        assert!(
            events
                .iter()
                .all(|e| e["protocol"] == "udp" && e["reason"] == "no proxy"),
            "{policy}: {events:?}"
        );
        assert!(events.len() >= 2, "{policy}: {events:?}");
    }
}

/// One `redirect` below a cgroup that spans namespaces: in the server's
/// namespace, a UDP proxy of its own on 127.0.0.1:15001 (not the built-in
/// relay) receives a redirected datagram. Its client sees the reply from
/// the address it sent to, and nothing is published for the relay, which
/// lives in another namespace and would never take it.
#[test]
fn another_namespaces_udp_proxy_gets_no_records() {
    let testbed = root_testbed!();
    let redirector = testbed.redirect(&["--udp-ports", UDP_PORT]);
    let own_proxy = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 15001))
print("ready", flush=True)
data, client = s.recvfrom(2048)
s.sendto(b"pong:" + data, client)
print("served", client[0], flush=True)
"#;
    let mut proxy = Running::start(
        PYTHON,
        &["-c".to_owned(), own_proxy.to_owned()],
        Some(&testbed.server),
        Some(&testbed.proxy),
        "ready",
    );
    let client = format!(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"ping", ("10.77.0.99", {UDP_PORT}))
data, source = s.recvfrom(2048)
print(data.decode(), source[0], source[1])
"#
    );
    let mut command =
        proxy_redirect::sys::netns::command_in(PYTHON, Some(&testbed.server), Some(&testbed.apps))
            .unwrap();
    command.args(["-c", &client]);
    let out = run(command);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("pong:ping 10.77.0.99 {UDP_PORT}"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(proxy
        .wait_for_line(|l| l.starts_with("served"), Duration::from_secs(5))
        .is_some());
    let (output, _) = redirector.stop_ok();
    assert_eq!(stat(&output, "UDP replies from the original"), 1);
    assert_eq!(stat(&output, "UDP datagrams told to the proxy"), 0);
    assert_eq!(stat(&output, "datagrams client->upstream"), 0);
}

#[test]
fn bad_udp_input_fails_with_one_line_and_attaches_nothing() {
    let testbed = root_testbed!();
    let apps = testbed.apps.path().display().to_string();
    let parent = testbed.parent.path().display().to_string();
    let redirect = |args: &[&str]| {
        let mut command = testbed.in_client_netns(BIN);
        command.args(["redirect", "-c", &apps, "--sockopt-cgroup", &parent]);
        command.args(args);
        run(command)
    };
    for (args, expected) in [
        (&["--udp-ports", "0"][..], "out of range"),
        (&["--udp-ports", "53,"][..], "empty entry"),
        (&["--udp-ports", ""][..], "empty"),
        (
            &["--udp-ports", "53", "--udp-idle-timeout", "0"][..],
            "not in 1..=86400",
        ),
    ] {
        assert_one_line_error(&redirect(args), &format!("{args:?}"), expected);
    }
    // The UDP proxy port taken by someone else's socket.
    let _occupier = servers::udp_echo(&testbed.client, "127.0.0.1:15001").unwrap();
    assert_one_line_error(
        &redirect(&["--udp-ports", "53"]),
        "an occupied UDP proxy port",
        "UDP proxy address 127.0.0.1:15001 is already in use",
    );
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

/// Root and user nobody in the same cgroup and namespace at once, each with
/// 20 sockets to two destinations through the one relay: every reply
/// carries the bytes its socket sent and comes from the address that
/// socket dialled. Then dig, run by nobody, resolves from dnsmasq.
#[test]
fn root_and_an_unprivileged_user_at_once_each_get_their_own_replies() {
    let testbed = root_testbed!();
    let _echoes = echoes_on_both_ports(&testbed);
    let _dnsmasq = start_dnsmasq(&testbed, 53);
    testbed.reject_direct(&testbed.apps, "udp", 53);
    let ports = format!("{UDP_PORT},{OTHER_PORT},53");
    let redirector = testbed.redirect(&["--udp-ports", &ports]);
    let script = format!(
        r#"
import os, socket, threading
failures = []
def client(i):
    dst = ("{SERVER_V4}", ({UDP_PORT}, {OTHER_PORT})[i % 2])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    try:
        for _ in range(20):
            data = os.urandom(48) + str(os.getuid()).encode()
            s.sendto(data, dst)
            back, source = s.recvfrom(2048)
            assert back == data, "socket %d: other bytes came back" % i
            assert source == dst, "socket %d to %r: reply from %r" % (i, dst, source)
    except Exception as e:
        failures.append(repr(e))
threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
for t in threads: t.start()
for t in threads: t.join()
print("ok" if not failures else failures[0], flush=True)
"#
    );
    let as_nobody = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"];
    let spawn = |command: &mut std::process::Command| {
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut root = testbed.in_apps(PYTHON);
    root.args(["-c", &script]);
    let mut nobody = testbed.in_apps("setpriv");
    nobody.args(as_nobody).args([PYTHON, "-c", &script]);
    let clients = [spawn(&mut root), spawn(&mut nobody)];
    for (who, client) in ["root", "nobody"].iter().zip(clients) {
        let out = client.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "{who}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut dig = testbed.in_apps("setpriv");
    dig.args(as_nobody).arg("dig");
    dig.args(["+short", "+tries=1", "+time=3", &format!("@{SERVER_V4}")]);
    dig.args(["www.example.test", "A"]);
    let out = run(dig);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10.77.0.99",
        "dig as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (output, _) = redirector.stop_ok();
    // 2 x 20 sockets x 20 datagrams, and dig's query.
    assert_eq!(stat(&output, "datagrams client->upstream"), 801);
    assert_eq!(stat(&output, "datagrams upstream->client"), 801);
    assert_eq!(stat(&output, "UDP flows opened"), 41);
}
