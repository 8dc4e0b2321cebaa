//! `tproxy` against the real kernel: a client, a gateway that forwards and a
//! server, each in a network namespace of its own; tproxy runs on the
//! gateway's client-facing veth. The server's view of its peer proves
//! whether a connection was intercepted: the client's address when it was
//! forwarded, the gateway's when the proxy relayed it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

use common::gateway::*;
use common::packet::{Ext, Packet, Rng, ETH_HLEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use common::*;
use nix::sys::signal::Signal;
use proxy_redirect::bpf::tproxy::types::tproxy_stat;
use proxy_redirect::datapath::tproxy::{self, DatapathConfig};
use proxy_redirect::sys::netns::NetNs;

fn curl_from_client(gw: &Gateway, url: &str) -> std::process::Output {
    curl(gw.in_client("curl"), url, &[])
}

/// The `peer=` the server saw for one GET.
fn peer_seen_by_server(gw: &Gateway, url: &str) -> String {
    let out = curl_from_client(gw, url);
    assert!(
        out.status.success(),
        "{url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let peer = body
        .strip_prefix("peer=")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected body from {url}: {body}"));
    // The dual-stack server shows IPv4 peers as [::ffff:a.b.c.d]:port.
    let host = peer.rsplit_once(':').unwrap().0;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_start_matches("::ffff:")
        .to_owned()
}

fn url4(port: u16) -> String {
    format!("http://{SERVER4}:{port}/")
}

fn url6(port: u16) -> String {
    format!("http://[{SERVER6}]:{port}/")
}

fn assert_forwarded_directly(gw: &Gateway) {
    assert_eq!(peer_seen_by_server(gw, &url4(80)), CLIENT4);
    assert_eq!(peer_seen_by_server(gw, &url6(80)), CLIENT6);
}

fn assert_intercepted(gw: &Gateway) {
    assert_eq!(peer_seen_by_server(gw, &url4(80)), GATEWAY_SERVER_SIDE4);
    assert_eq!(peer_seen_by_server(gw, &url6(80)), GATEWAY_SERVER_SIDE6);
}

#[test]
fn intercepts_ipv4_and_ipv6_relays_megabytes_and_forwards_other_ports() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let _other = servers::http(&gw.server, "[::]:8080").unwrap();
    assert_forwarded_directly(&gw);
    let before = gw.snapshot();

    let tproxy = gw.tproxy(&["-P", "80"]);
    assert!(
        tproxy.seen.iter().any(|l| l.contains(&format!(
            "TC attachment:     {}",
            kernel::expected_tc_path()
        ))),
        "{:?}",
        tproxy.seen
    );
    assert_intercepted(&gw);
    // Another port is forwarded as before.
    assert_eq!(peer_seen_by_server(&gw, &url4(8080)), CLIENT4);
    assert_eq!(peer_seen_by_server(&gw, &url6(8080)), CLIENT6);

    let data = payload(6 << 20, 11);
    for url in [url4(80), url6(80)] {
        assert_http_echo(|| gw.in_client("curl"), &url, &data);
    }

    let (output, _) = tproxy.stop_ok();
    let events = json_events(&output);
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(
        events.iter().all(|e| e["action"] == "intercept"),
        "{events:?}"
    );
    let originals: Vec<&str> = events
        .iter()
        .map(|e| e["original"].as_str().unwrap())
        .collect();
    assert_eq!(
        originals,
        [
            format!("{SERVER4}:80"),
            format!("[{SERVER6}]:80"),
            format!("{SERVER4}:80"),
            format!("[{SERVER6}]:80"),
        ]
    );
    assert!(events[0]["client"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{CLIENT4}:")));
    assert_eq!(events[1]["proxy"], "[::1]:15002");
    assert_eq!(summary_value(&output, "tproxy", "intercepted"), 4);
    assert!(
        summary_value(&output, "tproxy", "other_port_packets") >= 2,
        "{output}"
    );
    assert!(
        summary_value(&output, "tproxy", "socket_packets") > 100,
        "{output}"
    );
    assert_eq!(summary_value(&output, "tproxy", "assign_failed"), 0);
    assert_eq!(summary_value(&output, "proxy", "relayed"), 4);
    assert!(summary_value(&output, "proxy", "upstream_bytes") >= 2 * data.len() as u64);
    assert!(output.contains("Cleaned up"));

    assert_forwarded_directly(&gw);
    assert_eq!(gw.snapshot(), before, "the gateway was not restored");
}

#[test]
fn sigkill_leftovers_are_removed_by_the_next_start_for_tcx_and_clsact() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let before = gw.snapshot();
    // Before 6.6 there is no tcx to leave anything behind.
    let modes: &[&str] = if kernel::has_tcx() {
        &["tcx", "clsact"]
    } else {
        &["clsact"]
    };
    for &mode in modes {
        let tproxy = gw.tproxy(&["--tc-attach", mode]);
        assert_intercepted(&gw);
        tproxy.signal(Signal::SIGKILL);
        tproxy.kill();
        let after_kill = gw.snapshot();
        assert_ne!(after_kill, before, "{mode}: SIGKILL left nothing to clean?");
        assert!(after_kill.contains("lookup 5052 proto 82"), "{after_kill}");
        // Without a listener, even a leftover clsact filter lets everything
        // be forwarded.
        assert_forwarded_directly(&gw);

        let tproxy = gw.tproxy(&["--tc-attach", mode]);
        let removed = tproxy
            .seen
            .iter()
            .filter(|l| l.starts_with("Removed a leftover"))
            .count();
        assert_eq!(removed, 4, "{mode}: {:?}", tproxy.seen);
        assert_intercepted(&gw);
        // SIGTERM stops it as cleanly as SIGINT.
        tproxy.signal(Signal::SIGTERM);
        let (status, output, stderr) = tproxy.stop();
        assert!(status.success(), "{mode}: {stderr}");
        assert!(output.contains("Cleaned up"));
        // The human-readable statistics are printed and agree with the
        // summary.
        assert_eq!(stat(&output, "connections intercepted"), 2, "{output}");
        assert_eq!(summary_value(&output, "tproxy", "intercepted"), 2);
        assert_forwarded_directly(&gw);
        assert_eq!(
            gw.snapshot(),
            before,
            "{mode}: the gateway was not restored"
        );
    }
}

/// Run as nobody in the gateway's netns: holds the abstract socket name
/// that was tproxy's lock before, tries to create or lock the lock file,
/// then holds on until killed.
const LOCK_SQUATTER: &str = "\
import fcntl, os, socket, time
name = b'\\0proxy-redirect-tproxy-table-5052'
squat = socket.socket(socket.AF_UNIX)
squat.bind(name)
netns = os.stat('/proc/self/ns/net').st_ino
try:
    os.makedirs('/run/proxy-redirect', exist_ok=True)
    lock = open('/run/proxy-redirect/tproxy-netns-%d-table-5052.lock' % netns, 'a')
    fcntl.flock(lock, fcntl.LOCK_EX)
    print('took the lock', flush=True)
except PermissionError:
    pass
print('squatting', flush=True)
time.sleep(600)
";

#[test]
fn a_lock_squatted_by_nobody_does_not_stop_tproxy_nor_its_cleanup() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let before = gw.snapshot();
    let args: Vec<String> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        PYTHON,
        "-c",
        LOCK_SQUATTER,
    ]
    .map(String::from)
    .to_vec();
    let squatter = Running::start("setpriv", &args, Some(&gw.gateway), None, "squatting");
    assert!(
        !squatter.seen.iter().any(|l| l == "took the lock"),
        "{:?}",
        squatter.seen
    );
    let tproxy = gw.tproxy(&[]);
    assert_intercepted(&gw);
    // A killed run's leftovers are still found and removed.
    tproxy.kill();
    assert_ne!(gw.snapshot(), before);
    let tproxy = gw.tproxy(&[]);
    let removed = tproxy
        .seen
        .iter()
        .filter(|l| l.starts_with("Removed a leftover"))
        .count();
    assert_eq!(removed, 4, "{:?}", tproxy.seen);
    assert_intercepted(&gw);
    tproxy.stop_ok();
    assert_eq!(gw.snapshot(), before);
    squatter.kill();
}

/// squid (Debian's package) in its default tproxy mode on the gateway:
/// listening on port 3129 with IP_TRANSPARENT, connecting upstream from
/// the client's own address. Stopped on drop.
struct Squid {
    child: std::process::Child,
    _dir: TempDir,
}

impl Squid {
    fn start(gw: &Gateway) -> Squid {
        let dir = TempDir::new();
        // squid writes its logs after dropping to its own user.
        std::fs::set_permissions(
            dir.join(""),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let config = dir.join("squid.conf");
        let d = dir.join("").display().to_string();
        std::fs::write(
            &config,
            format!(
                "http_port 127.0.0.1:3128\nhttp_port 3129 tproxy\nhttp_access allow all\n\
                 cache deny all\naccess_log stdio:{d}/access.log\ncache_log {d}/cache.log\n\
                 pid_filename {d}/squid.pid\ncoredump_dir {d}\nnetdb_filename none\n\
                 shutdown_lifetime 0 seconds\n"
            ),
        )
        .unwrap();
        let child = gw
            .in_gateway("squid")
            .args(["-N", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting squid (Debian package squid)");
        let squid = Squid { child, _dir: dir };
        for _ in 0..300 {
            let mut ss = gw.in_gateway("ss");
            ss.args(["-Htln", "sport", "=", ":3129"]);
            if !run(ss).stdout.is_empty() {
                return squid;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(squid._dir.join("cache.log")).unwrap_or_default();
        panic!("squid never listened on 3129:\n{log}");
    }
}

impl Drop for Squid {
    /// SIGTERM, so that squid removes its shared memory segments from
    /// /dev/shm; SIGKILL only if it does not stop.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn squid_spoofing_the_client_address_gets_its_replies_with_upstream_interface() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let before = gw.snapshot();
    let _squid = Squid::start(&gw);
    // Without --upstream-interface the server's replies to the client's
    // address are forwarded to the client: squid never hears back.
    let tproxy = gw.tproxy(&["-p", "3129", "--no-proxy"]);
    let out = curl(gw.in_client("curl"), &url4(80), &["--max-time", "3"]);
    assert!(!out.status.success(), "answered without the upstream hook");
    tproxy.stop_ok();

    let tproxy = gw.tproxy(&["-p", "3129", "--no-proxy", "--upstream-interface", "gw-s"]);
    // The server sees the client's own address: squid spoofed it, and the
    // reply reached squid's socket.
    assert_eq!(peer_seen_by_server(&gw, &url4(80)), CLIENT4);
    assert_eq!(peer_seen_by_server(&gw, &url6(80)), CLIENT6);
    // A killed run's rules for both interfaces are found and removed.
    tproxy.kill();
    let tproxy = gw.tproxy(&["-p", "3129", "--no-proxy", "--upstream-interface", "gw-s"]);
    let removed = tproxy
        .seen
        .iter()
        .filter(|l| l.starts_with("Removed a leftover"))
        .count();
    assert_eq!(removed, 6, "{:?}", tproxy.seen);
    assert_eq!(peer_seen_by_server(&gw, &url4(80)), CLIENT4);
    assert_eq!(peer_seen_by_server(&gw, &url6(80)), CLIENT6);
    let (output, _) = tproxy.stop_ok();
    assert_eq!(summary_value(&output, "tproxy", "intercepted"), 2);
    assert!(
        summary_value(&output, "tproxy", "upstream_replies") >= 4,
        "{output}"
    );
    drop(_squid);
    assert_eq!(gw.snapshot(), before);
}

#[test]
fn connections_forwarded_before_the_start_keep_being_forwarded() {
    let gw = root_gateway!();
    let echo = servers::echo(&gw.server, "[::]:80").unwrap();
    let mut old: Vec<TcpStream> = [format!("{SERVER4}:80"), format!("[{SERVER6}]:80")]
        .into_iter()
        .map(|addr| {
            gw.client
                .spawn(move || {
                    let stream = TcpStream::connect(&addr)?;
                    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                    Ok(stream)
                })
                .unwrap()
                .join()
                .unwrap()
                .unwrap()
        })
        .collect();
    let exchange = |stream: &mut TcpStream, message: &[u8]| {
        stream.write_all(message).unwrap();
        let mut reply = vec![0u8; message.len()];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply, message);
    };
    for stream in &mut old {
        exchange(stream, b"before");
    }
    let tproxy = gw.tproxy(&[]);
    for stream in &mut old {
        exchange(stream, b"after tproxy started");
    }
    assert_intercepted_echo(&gw);
    for stream in &mut old {
        exchange(stream, b"still forwarded");
    }
    drop(old);
    let (_, output, _) = tproxy.stop();
    assert!(
        summary_value(&output, "tproxy", "forwarded_not_ours") >= 4,
        "{output}"
    );
    assert_eq!(summary_value(&output, "tproxy", "intercepted"), 1);
    let peers: Vec<String> = echo
        .peers()
        .iter()
        .map(|p| p.ip().to_canonical().to_string())
        .collect();
    assert_eq!(peers, [CLIENT4, CLIENT6, GATEWAY_SERVER_SIDE4]);
}

/// One new connection through the echo server, from the client netns.
fn assert_intercepted_echo(gw: &Gateway) {
    let script = format!(
        "import socket\ns = socket.create_connection(('{SERVER4}', 80), timeout=10)\n\
         s.sendall(b'new')\nassert s.recv(3) == b'new'\ns.close()"
    );
    python(gw.in_client(PYTHON), &script);
}

#[test]
fn handshakes_completed_with_syncookies_reach_the_proxy() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    // 2: answer every SYN with a cookie, so no request socket ever exists.
    gw.sysctl(&gw.gateway, "net.ipv4.tcp_syncookies=2");
    let tproxy = gw.tproxy(&[]);
    assert_intercepted(&gw);
    let (_, output, _) = tproxy.stop();
    assert_eq!(
        summary_value(&output, "tproxy", "syncookie_acks"),
        2,
        "{output}"
    );
    assert_eq!(summary_value(&output, "proxy", "relayed"), 2);
}

#[test]
fn external_transparent_proxy_and_no_listener() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let tproxy = gw.tproxy(&["--no-proxy", "-P", "80", "-p", "15009"]);
    // Nothing listens yet: forwarded untouched, and said so.
    assert_forwarded_directly(&gw);
    // The proxy subcommand as an external TPROXY target.
    let proxy = Running::start(
        BIN,
        &[
            "proxy",
            "--transparent",
            "-l",
            "127.0.0.1:15009",
            "-l",
            "[::1]:15009",
        ]
        .map(String::from),
        Some(&gw.gateway),
        None,
        "Proxy listening",
    );
    assert!(proxy.seen[0].contains("transparent"), "{:?}", proxy.seen);
    assert_intercepted(&gw);
    // The standalone proxy runs without --json: its human-readable
    // statistics.
    let (_, proxy_output, _) = proxy.stop();
    assert_eq!(stat(&proxy_output, "relayed to the end"), 2);
    let (_, output, _) = tproxy.stop();
    let events = json_events(&output);
    let actions: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("pass", "no listener"),
            ("pass", "no listener"),
            ("intercept", ""),
            ("intercept", ""),
        ],
        "{events:?}"
    );
    assert_eq!(summary_value(&output, "tproxy", "forwarded_no_listener"), 2);
}

#[test]
fn bad_input_fails_with_one_line_and_changes_nothing() {
    let gw = root_gateway!();
    let before = gw.snapshot();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-i", "no-such-if0"],
            "no interface named 'no-such-if0'",
        ),
        (vec!["-P", "0"], "out of range"),
        (vec!["-P", "http"], "not a port number"),
        (vec!["-P", ""], "empty"),
        (vec!["-P", "80,,443"], "empty entry"),
        (vec!["-p", "70000"], "out of range"),
        (vec!["--route-table", "254"], "reserved"),
        (vec!["--rule-priority", "0"], "rule priority"),
        (vec!["--route-mark", "0x5052"], "must differ"),
        (vec!["--tc-attach", "xdp"], "invalid value"),
        (
            vec!["--proxy-ip", "::1", "--proxy-ip", "::2"],
            "at most one",
        ),
        (
            vec!["--upstream-interface", "no-such-if0"],
            "no interface named 'no-such-if0'",
        ),
        (vec!["--upstream-interface", CLIENT_FACING], "must differ"),
        (vec!["--idle-timeout", "soon"], "invalid value"),
    ];
    for (args, expected) in cases {
        let mut command = gw.in_gateway(BIN);
        command.arg("tproxy");
        if !args.contains(&"-i") {
            command.args(["-i", CLIENT_FACING]);
        }
        command.args(&args);
        assert_one_line_error(&run(command), &format!("{args:?}"), expected);
        assert_eq!(gw.snapshot(), before, "{args:?} changed the gateway");
    }

    // An occupied proxy port.
    let occupier = servers::echo(&gw.gateway, "[::1]:15002").unwrap();
    let mut command = gw.in_gateway(BIN);
    command.args(["tproxy", "-i", CLIENT_FACING]);
    assert_one_line_error(&run(command), "an occupied proxy port", "already in use");
    assert_eq!(gw.snapshot(), before);
    drop(occupier);

    // A second instance with the same table, while the first runs.
    let first = gw.tproxy(&[]);
    let running = gw.snapshot();
    let mut command = gw.in_gateway(BIN);
    command.args(["tproxy", "-i", CLIENT_FACING, "-p", "15003"]);
    assert_one_line_error(&run(command), "a second instance", "another tproxy runs");
    assert_eq!(
        gw.snapshot(),
        running,
        "the second instance touched the first's set-up"
    );
    let (_, _) = first.stop_ok();
    assert_eq!(gw.snapshot(), before);

    // No privileges.
    assert_refused_without_privileges(&["tproxy", "-i", "lo"]);
}

#[test]
fn a_foreign_route_in_the_table_is_refused_and_kept() {
    let gw = root_gateway!();
    gw.gateway
        .ip(&["route", "add", "blackhole", "192.0.2.0/24", "table", "5052"])
        .unwrap();
    let before = gw.snapshot();
    let mut command = gw.in_gateway(BIN);
    command.args(["tproxy", "-i", CLIENT_FACING]);
    assert_one_line_error(
        &run(command),
        "a foreign route in the table",
        "--route-table",
    );
    assert_eq!(gw.snapshot(), before);
    // Another table works next to it.
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let tproxy = gw.tproxy(&["--route-table", "5053", "--rule-priority", "5053"]);
    assert_intercepted(&gw);
    let (_, _) = tproxy.stop_ok();
    assert_eq!(gw.snapshot(), before);
}

/// The proxy closes first, so its accepted socket stays in TIME_WAIT on the
/// gateway; a client that reuses its port must still get through at once
/// (handed to the listener, that SYN would be dropped for a minute).
/// The client's own last socket holds the port in LAST_ACK until the ACK of
/// its FIN arrives (milliseconds, longer under emulation): connect() then
/// fails with EADDRNOTAVAIL, and the client tries again.
const SAME_PORT_CLIENT: &str = r#"
import errno, socket, sys, time
start = time.time()
def connect():
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((sys.argv[1], 21500))
        s.settimeout(5)
        try:
            s.connect((sys.argv[2], 80))
            return s
        except OSError as e:
            s.close()
            if e.errno != errno.EADDRNOTAVAIL or time.time() - start > 1:
                raise
            time.sleep(0.005)
for i in range(3):
    s = connect()
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    assert b"peer=" in reply, reply
    s.close()
print("%.3f" % (time.time() - start))
"#;

#[test]
fn a_client_port_reused_while_the_proxy_holds_time_wait_gets_through() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let tproxy = gw.tproxy(&[]);
    let mut command = gw.in_client(PYTHON);
    command.args(["-c", SAME_PORT_CLIENT, CLIENT4, SERVER4]);
    let out = run(command);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seconds: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(seconds < 2.0, "three connections took {seconds} s");
    let (_, output, _) = tproxy.stop();
    // The first connection meets no TIME_WAIT socket; the other two do, and
    // sk_lookup lets the listener replace it, as TPROXY would.
    assert_eq!(
        summary_value(&output, "tproxy", "time_wait_syns"),
        2,
        "{output}"
    );
    assert!(
        summary_value(&output, "tproxy", "sk_lookup_assigned") >= 2,
        "{output}"
    );
    assert_eq!(
        summary_value(&output, "tproxy", "intercepted"),
        1,
        "{output}"
    );
    assert_eq!(summary_value(&output, "proxy", "relayed"), 3);
}

/// TCX_NEXT (TC_ACT_UNSPEC on clsact): every packet the program does not
/// drop goes on to the programs behind it.
const TC_NEXT: u32 = -1i32 as u32;
const MARK_IN: u32 = 7;

/// A frame through tproxy_ingress with BPF_PROG_TEST_RUN: (verdict, output
/// frame, skb mark afterwards). The mark goes in as MARK_IN.
fn test_run(program: &libbpf_rs::ProgramMut<'_>, frame: &[u8]) -> (u32, Vec<u8>, u32) {
    try_test_run(program, frame)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {frame:02x?}: {e}"))
}

/// As test_run; Err when the kernel refuses to run the frame at all (it
/// checks the length of the IP header it finds).
fn try_test_run(
    program: &libbpf_rs::ProgramMut<'_>,
    frame: &[u8],
) -> Result<(u32, Vec<u8>, u32), libbpf_rs::Error> {
    // struct __sk_buff starts with len, pkt_type and mark, and has grown to
    // under 256 bytes; the kernel takes a larger buffer if the rest is zero.
    let (size, mark_at) = (256, 8);
    let mut ctx_in = vec![0u8; size];
    ctx_in[mark_at..mark_at + 4].copy_from_slice(&MARK_IN.to_ne_bytes());
    let mut ctx_out = vec![0u8; size];
    let mut out = vec![0u8; frame.len() + 256];
    let input = libbpf_rs::ProgramInput {
        data_in: Some(frame),
        data_out: Some(&mut out),
        context_in: Some(&mut ctx_in),
        context_out: Some(&mut ctx_out),
        ..Default::default()
    };
    let output = program.test_run(input)?;
    let verdict = output.return_value;
    let len = output.data.as_ref().map_or(0, |d| d.len());
    out.truncate(len);
    let mark = u32::from_ne_bytes(ctx_out[mark_at..mark_at + 4].try_into().unwrap());
    Ok((verdict, out, mark))
}

/// What one fixture must change: exactly these counters, by one each.
struct Fixture {
    description: &'static str,
    frame: Vec<u8>,
    counts: &'static [tproxy_stat],
}

fn fixtures() -> Vec<Fixture> {
    const C4: &str = "192.0.2.1";
    const S4: &str = "198.51.100.2";
    const C6: &str = "2001:db8::1";
    const S6: &str = "2001:db8:1::2";
    let syn4 = Packet::tcp(C4, 40000, S4, 80, TCP_SYN);
    let mut fragment = Packet::tcp(C4, 40000, S4, 80, TCP_ACK);
    fragment.frag_offset = 185;
    let mut syn6_ext = Packet::tcp(C6, 40000, S6, 443, TCP_SYN);
    syn6_ext.ipv6_ext = vec![Ext::HopByHop(0), Ext::DestOpts(1)];
    let mut truncated = syn4.build();
    truncated.truncate(truncated.len() - 8);
    use tproxy_stat as t;
    vec![
        Fixture {
            description: "UDP to an intercepted port is none of our business",
            frame: Packet::udp(C4, 40000, S4, 80).build(),
            counts: &[],
        },
        Fixture {
            description: "TCP to another port passes",
            frame: Packet::tcp(C4, 40000, S4, 8080, TCP_SYN).build(),
            counts: &[t::TSTAT_TCP_PACKETS, t::TSTAT_OTHER_PORT],
        },
        Fixture {
            description: "a SYN while nothing listens is forwarded",
            frame: syn4.build(),
            counts: &[t::TSTAT_TCP_PACKETS, t::TSTAT_NO_LISTENER],
        },
        Fixture {
            description: "an IPv6 SYN behind extension headers is seen",
            frame: syn6_ext.build(),
            counts: &[t::TSTAT_TCP_PACKETS, t::TSTAT_NO_LISTENER],
        },
        Fixture {
            description: "mid-flow data of a flow without a local socket is forwarded",
            frame: Packet::tcp(C4, 40000, S4, 80, TCP_ACK)
                .with_payload(b"GET / HTTP/1.1\r\n")
                .build(),
            counts: &[t::TSTAT_TCP_PACKETS, t::TSTAT_NOT_OURS],
        },
        Fixture {
            description: "a RST of such a flow is forwarded",
            frame: Packet::tcp(C6, 40000, S6, 80, TCP_RST).build(),
            counts: &[t::TSTAT_TCP_PACKETS, t::TSTAT_NOT_OURS],
        },
        Fixture {
            description: "a FIN without ACK of such a flow is forwarded",
            frame: Packet::tcp(C4, 40000, S4, 443, TCP_FIN).build(),
            counts: &[t::TSTAT_TCP_PACKETS, t::TSTAT_NOT_OURS],
        },
        Fixture {
            description: "a later IPv4 fragment has no TCP header",
            frame: fragment.build(),
            counts: &[t::TSTAT_UNPARSED],
        },
        Fixture {
            description: "a truncated TCP header is not parsed",
            frame: truncated,
            counts: &[t::TSTAT_UNPARSED],
        },
    ]
}

/// Loads tproxy in a private netns and runs `work` there.
fn in_private_netns<T: Send + 'static>(
    work: impl FnOnce(&libbpf_rs::ProgramMut<'_>, &dyn Fn() -> Vec<u64>) -> T + Send + 'static,
) -> T {
    let netns = NetNs::create(&unique("prtpfix")).unwrap();
    netns
        .spawn(move || {
            let config = DatapathConfig {
                ports: vec![80, 443],
                proxy_v4: "127.0.0.1:15002".parse().unwrap(),
                proxy_v6: "[::1]:15002".parse().unwrap(),
                route_mark: 0x5054,
                ifindex: 1,
                has_l2_header: true,
                upstream_has_l2_header: true,
                events: false,
            };
            let mut object = std::mem::MaybeUninit::uninit();
            let skel = tproxy::load(&config, None, &mut object)?;
            let counters = || tproxy::counters(&skel).unwrap();
            Ok(work(&skel.progs.tproxy_ingress, &counters))
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap()
}

#[test]
fn fixture_packets_pass_unchanged_and_are_counted_by_kind() {
    require_root!();
    in_private_netns(|program, counters| {
        for fixture in fixtures() {
            let before = counters();
            let (verdict, out, mark) = test_run(program, &fixture.frame);
            let after = counters();
            let what = fixture.description;
            assert_eq!(verdict, TC_NEXT, "{what}");
            assert_eq!(out, fixture.frame, "{what}: the packet was changed");
            assert_eq!(mark, MARK_IN, "{what}: the mark was changed");
            let changed: Vec<u32> = (0..before.len() as u32)
                .filter(|&i| after[i as usize] != before[i as usize])
                .collect();
            let expected: Vec<u32> = fixture.counts.iter().map(|s| s.0).collect();
            assert_eq!(changed, expected, "{what}: counters");
            for i in changed {
                assert_eq!(after[i as usize] - before[i as usize], 1, "{what}");
            }
        }
    });
}

/// Outside TC ingress (here: BPF_PROG_TEST_RUN) bpf_sk_assign refuses; the
/// packet must then be neither marked nor changed, so that it is forwarded.
#[test]
fn a_refused_assign_leaves_the_packet_unmarked_and_random_packets_pass() {
    require_root!();
    in_private_netns(|program, counters| {
        let _v4 = std::net::TcpListener::bind("127.0.0.1:15002").unwrap();
        let _v6 = std::net::TcpListener::bind("[::1]:15002").unwrap();
        for syn in [
            Packet::tcp("192.0.2.1", 40000, "198.51.100.2", 80, TCP_SYN),
            Packet::tcp("2001:db8::1", 40000, "2001:db8:1::2", 443, TCP_SYN),
        ] {
            let frame = syn.build();
            let before = counters();
            let (verdict, out, mark) = test_run(program, &frame);
            let after = counters();
            assert_eq!((verdict, mark), (TC_NEXT, MARK_IN));
            assert_eq!(out, frame);
            let stat = |s: tproxy_stat| after[s.0 as usize] - before[s.0 as usize];
            assert_eq!(stat(tproxy_stat::TSTAT_ASSIGN_FAILED), 1, "{syn:?}");
            assert_eq!(stat(tproxy_stat::TSTAT_NEW_CONNECTIONS), 0);
        }

        // Mutated and random frames: never changed, never marked.
        let mut rng = Rng::new(5);
        let templates: Vec<Vec<u8>> = fixtures().into_iter().map(|f| f.frame).collect();
        let mut ran = 0;
        for _ in 0..2000 {
            let mut frame = rng.pick(&templates).clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(frame.len() as u64) as usize;
                frame[at] = rng.next() as u8;
            }
            if rng.chance(20) {
                // BPF_PROG_TEST_RUN wants at least an Ethernet header.
                let keep = ETH_HLEN + rng.below((frame.len() - ETH_HLEN) as u64) as usize;
                frame.truncate(keep);
            }
            if rng.chance(5) {
                let len = rng.below(200) as usize + 14;
                frame = rng.bytes(len);
            }
            let Ok((verdict, out, mark)) = try_test_run(program, &frame) else {
                continue;
            };
            ran += 1;
            assert_eq!((verdict, mark), (TC_NEXT, MARK_IN), "{frame:02x?}");
            assert_eq!(out, frame);
        }
        assert!(ran > 1500, "only {ran} of 2000 frames could be run");
    });
}

#[test]
fn a_recreated_interface_is_followed_by_name() {
    let gw = root_gateway!();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let mut tproxy = gw.tproxy(&["-P", "80"]);
    assert_intercepted(&gw);
    // A container restart: the client-facing veth goes, one of the same
    // name comes back with another ifindex.
    gw.gateway.ip(&["link", "del", CLIENT_FACING]).unwrap();
    let event = |name: &'static str| move |l: &str| l.contains(&format!("\"event\":\"{name}\""));
    let gone = tproxy.wait_for_line(event("interface-gone"), Duration::from_secs(10));
    assert!(gone.is_some(), "no interface-gone event: {:?}", tproxy.seen);
    proxy_redirect::sys::netns::veth_pair(&gw.client, "veth0", &gw.gateway, CLIENT_FACING).unwrap();
    gw.client
        .configure(
            "veth0",
            &[&format!("{CLIENT4}/24"), &format!("{CLIENT6}/64")],
        )
        .unwrap();
    gw.gateway
        .configure(
            CLIENT_FACING,
            &[
                &format!("{GATEWAY_CLIENT_SIDE4}/24"),
                &format!("{GATEWAY_CLIENT_SIDE6}/64"),
            ],
        )
        .unwrap();
    gw.client
        .ip(&["route", "add", "default", "via", GATEWAY_CLIENT_SIDE4])
        .unwrap();
    gw.client
        .ip(&["-6", "route", "add", "default", "via", GATEWAY_CLIENT_SIDE6])
        .unwrap();
    let back = tproxy.wait_for_line(event("interface-back"), Duration::from_secs(10));
    assert!(back.is_some(), "no interface-back event: {:?}", tproxy.seen);
    assert_eq!(
        gw.tcx_program_count(
            CLIENT_FACING,
            proxy_redirect::sys::links::TcDirection::Ingress
        ),
        u32::from(kernel::has_tcx())
    );
    // The rule (iif by name) and the route (on lo) held: intercepted again.
    assert_intercepted(&gw);
    let (output, stderr) = tproxy.stop_ok();
    assert!(stderr.contains("interface gw-c is gone"), "{stderr}");
    assert_eq!(
        summary_value(&output, "tproxy", "intercepted"),
        4,
        "{output}"
    );
    let after = gw.snapshot();
    assert!(
        !after.contains("5052"),
        "rules or routes left behind:\n{after}"
    );
    assert_eq!(
        gw.tcx_program_count(
            CLIENT_FACING,
            proxy_redirect::sys::links::TcDirection::Ingress
        ),
        0
    );
}

#[test]
fn fast_open_requests_in_the_syn_are_intercepted_intact() {
    let gw = root_gateway!();
    let _echo = servers::echo(&gw.server, "[::]:80").unwrap();
    // Clients put their request in the SYN without asking for a cookie.
    gw.sysctl(&gw.client, "net.ipv4.tcp_fastopen=0x607");
    gw.sysctl(&gw.gateway, "net.ipv4.tcp_fastopen=0x607");
    let tproxy = gw.tproxy(&[]);
    for host in [SERVER4, SERVER6] {
        let script = format!(
            "import socket\nfamily = socket.AF_INET6 if ':' in '{host}' else socket.AF_INET\n\
             s = socket.socket(family)\ns.settimeout(10)\n\
             s.sendto(b'in the SYN', 0x20000000, ('{host}', 80))\n\
             assert s.recv(100) == b'in the SYN'\ns.close()\nprint('ok')"
        );
        python(gw.in_client(PYTHON), &script);
    }
    let (output, _) = tproxy.stop_ok();
    assert_eq!(
        summary_value(&output, "tproxy", "intercepted"),
        2,
        "{output}"
    );
    assert_eq!(summary_value(&output, "proxy", "relayed"), 2, "{output}");
}
