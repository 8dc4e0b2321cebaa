//! The built-in relay: aborts passed on as aborts, idle connections closed,
//! and a proxy that lacks a privilege refusing to start.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Answers on port 80 (IPv4 and IPv6) according to the first byte: `D`
/// sends 100000 bytes, waits until they are acknowledged and resets;
/// `U` reads to the end and prints `reset N` or `eof N`.
const ABORTING_SERVER: &str = "\
import socket, struct, fcntl, termios, time
def outq(s):
    return struct.unpack('i', fcntl.ioctl(s, termios.TIOCOUTQ, b'\\0' * 4))[0]
l = socket.socket(socket.AF_INET6)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l.bind(('::', 80))
l.listen(16)
print('listening', flush=True)
while True:
    c, _ = l.accept()
    if c.recv(1) == b'D':
        c.sendall(bytes(100000))
        while outq(c):
            time.sleep(0.01)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    else:
        n = 0
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    print('eof', n, flush=True)
                    break
                n += len(d)
        except ConnectionResetError:
            print('reset', n, flush=True)
    c.close()
";

/// A download the server resets and an upload the client resets, to
/// `host`; prints what the client saw of the download.
fn aborting_client(host: &str) -> String {
    format!(
        "\
import socket, struct, fcntl, termios, time
def outq(s):
    return struct.unpack('i', fcntl.ioctl(s, termios.TIOCOUTQ, b'\\0' * 4))[0]
s = socket.create_connection(('{host}', 80), timeout=10)
s.sendall(b'D')
got = 0
try:
    while True:
        d = s.recv(65536)
        if not d:
            print('eof', got)
            break
        got += len(d)
except ConnectionResetError:
    print('reset', got)
s = socket.create_connection(('{host}', 80), timeout=10)
s.sendall(b'U' + bytes(99999))
while outq(s):
    time.sleep(0.01)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
s.close()
"
    )
}

/// Runs the aborting client (made by `new_python`) against the running
/// server and checks that both resets were seen after every byte.
fn assert_aborts_seen(
    new_python: impl Fn() -> Command,
    server: &mut Running,
    host: &str,
    what: &str,
) {
    let client = python(new_python(), &aborting_client(host));
    assert_eq!(client.trim(), "reset 100000", "{what}: download via {host}");
    let upload = server
        .wait_for_line(
            |l| l.starts_with("reset") || l.starts_with("eof"),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|| panic!("{what}: the server never finished the upload"));
    assert_eq!(upload, "reset 99999", "{what}: upload via {host}");
}

#[test]
fn aborts_are_passed_on_as_resets_in_both_directions() {
    let testbed = root_testbed!();
    let args = ["-c".to_owned(), ABORTING_SERVER.to_owned()];
    let mut server = Running::start(PYTHON, &args, Some(&testbed.server), None, "listening");
    // Directly, as the baseline the proxy must match.
    for host in [SERVER_V4, SERVER_V6] {
        assert_aborts_seen(
            || testbed.in_client_netns(PYTHON),
            &mut server,
            host,
            "direct",
        );
    }
    let redirector = testbed.redirect(&[]);
    for host in [SERVER_V4, SERVER_V6] {
        assert_aborts_seen(
            || testbed.in_apps(PYTHON),
            &mut server,
            host,
            "through the proxy",
        );
    }
    wait_for_tcp_to_settle(&testbed.client);
    let (_, output, _) = redirector.stop();
    assert_eq!(summary_value(&output, "proxy", "accepted"), 4);
    assert_eq!(summary_value(&output, "proxy", "aborted"), 4);
    assert_eq!(summary_value(&output, "proxy", "downstream_bytes"), 200000);
    assert_eq!(summary_value(&output, "proxy", "upstream_bytes"), 200002);
}

#[test]
fn idle_connections_are_closed_on_both_sides_and_busy_ones_kept() {
    let testbed = root_testbed!();
    let _server = servers::echo(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&["--idle-timeout", "2"]);
    // Three idle connections and one that sends a byte every half second
    // for seven seconds: the idle ones see EOF between 2 and 2.5 s (the
    // check allows 4), the busy one keeps its echo.
    let script = format!(
        "\
import socket, time
start = time.monotonic()
idle = [socket.create_connection((h, 80), timeout=10) for h in ('{SERVER_V4}', '{SERVER_V6}', '{SERVER_V4}')]
busy = socket.create_connection(('{SERVER_V6}', 80), timeout=10)
for s in idle:
    s.setblocking(False)
def idle_open():
    open = 0
    for s in idle:
        try:
            s.recv(1)
        except BlockingIOError:
            open += 1
    return open
while time.monotonic() - start < 7:
    busy.sendall(b'x')
    assert busy.recv(1) == b'x'
    elapsed = time.monotonic() - start
    if elapsed < 1.8:
        assert idle_open() == 3, elapsed
    if elapsed > 4:
        assert idle_open() == 0, elapsed
    time.sleep(0.5)
busy.close()
print('ok')
"
    );
    python(testbed.in_apps(PYTHON), &script);
    // The server's side of the idle connections was closed as well.
    wait_for_tcp_to_settle(&testbed.server);
    wait_for_tcp_to_settle(&testbed.client);
    let (_, output, _) = redirector.stop();
    assert_eq!(summary_value(&output, "proxy", "idle_closed"), 3);
    assert_eq!(summary_value(&output, "proxy", "relayed"), 1);
}

#[test]
fn idle_timeout_0_keeps_idle_connections() {
    let testbed = root_testbed!();
    let _server = servers::echo(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&["--idle-timeout", "0"]);
    let script = format!(
        "\
import socket, time
s = socket.create_connection(('{SERVER_V4}', 80), timeout=10)
time.sleep(3)
s.sendall(b'still here')
assert s.recv(100) == b'still here'
print('ok')
"
    );
    python(testbed.in_apps(PYTHON), &script);
    wait_for_tcp_to_settle(&testbed.client);
    let (_, output, _) = redirector.stop();
    assert_eq!(summary_value(&output, "proxy", "idle_closed"), 0);
    assert_eq!(summary_value(&output, "proxy", "relayed"), 1);
}

/// setpriv's arguments that run `bin proxy ARGS` as nobody.
fn proxy_as_nobody(bin: &BinForOthers, args: &[&str]) -> Vec<String> {
    [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &bin.path,
        "proxy",
    ]
    .iter()
    .chain(args)
    .map(|a| a.to_string())
    .collect()
}

fn run_as_nobody(bin: &BinForOthers, args: &[&str]) -> std::process::Output {
    let mut command = Command::new("setpriv");
    command.args(proxy_as_nobody(bin, args));
    run(command)
}

#[test]
fn an_unprivileged_proxy_refuses_to_start_with_the_reason() {
    require_root!();
    let bin = BinForOthers::new();
    assert_one_line_error(
        &run_as_nobody(&bin, &["-l", "127.0.0.1:0"]),
        "proxy as nobody",
        "proxy needs root (CAP_NET_ADMIN) to mark its upstream connections with 0x5052",
    );
    assert_one_line_error(
        &run_as_nobody(&bin, &["-l", "127.0.0.1:0", "--transparent", "--mark", "0"]),
        "proxy --transparent as nobody",
        "needs root (CAP_NET_ADMIN or CAP_NET_RAW) for IP_TRANSPARENT",
    );
    // Without a mark and IP_TRANSPARENT it needs nothing and starts.
    let args = proxy_as_nobody(&bin, &["-l", "127.0.0.1:0", "--mark", "0"]);
    let proxy = Running::start("setpriv", &args, None, None, "Proxy listening");
    let (output, _) = proxy.stop_ok();
    assert!(output.contains("Cleaned up"), "{output}");
}

#[test]
fn the_standalone_proxy_serves_its_counters_as_metrics() {
    let testbed = root_testbed!();
    let args: Vec<String> = [
        "proxy",
        "-l",
        "127.0.0.1:15001",
        "--metrics",
        "127.0.0.1:9477",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proxy = Running::start(BIN, &args, Some(&testbed.client), None, "Proxy listening");
    // A direct connection has no original destination: refused, counted.
    python(
        testbed.in_client_netns(PYTHON),
        "import socket\ns = socket.create_connection(('127.0.0.1', 15001), timeout=10)\n\
         assert s.recv(1) == b''\nprint('ok')",
    );
    let page = scrape_metrics(&testbed.client, "127.0.0.1:9477");
    assert_promtool_accepts(&page);
    assert_eq!(
        metric_value(&page, "proxy_redirect_proxy_accepted_total"),
        1
    );
    assert_eq!(metric_value(&page, "proxy_redirect_proxy_refused_total"), 1);
    let (_, _) = proxy.stop_ok();
}
