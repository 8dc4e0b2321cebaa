//! `redirect` on a host full of containers: one redirector for a cgroup
//! that holds several network namespaces, each with its own proxy on
//! 127.0.0.1:15001, untrusted local users, Fast Open, device-bound sockets,
//! and connections that end every way a connection can.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use proxy_redirect::sys::netns::{self, NetNs};

/// original_dst.py `args` as a command placed by `command`.
fn script(mut command: Command, args: &[&str]) -> Command {
    command.args(original_dst_args(args));
    command
}

fn sysctl(netns: &NetNs, setting: &str) {
    let mut command = netns::command_in("sysctl", Some(netns), None).unwrap();
    command.args(["-qw", setting]);
    stdout_of(&run(command), setting);
}

#[test]
fn each_namespace_is_told_its_own_original_destinations() {
    let testbed = root_testbed!();
    let second = NetNs::create(&unique("prtest-second")).unwrap();
    let redirector = testbed.redirect(&["--no-proxy", "-P", "80"]);
    let dir = TempDir::new();
    for (phase, count, concurrency, port_base, hold) in [
        // Both namespaces use the same source ports at the same time, so
        // every 4-tuple exists twice, and each proxy waits before asking.
        // Below the ephemeral range, so that no port the kernel picks for
        // a proxy's own connection holds one of them first.
        ("same source ports", "60", "60", "21000", "0.3"),
        // Many short connections with ports the kernel picks.
        ("kernel-chosen ports", "400", "20", "0", "0"),
    ] {
        let go = dir.join(&unique("go"));
        let go = go.to_str().unwrap();
        let sidecars: Vec<Running> = [(&testbed.client, "10.1.0"), (&second, "10.2.0")]
            .into_iter()
            .map(|(ns, prefix)| {
                let args = original_dst_args(&[
                    "sidecar",
                    prefix,
                    count,
                    concurrency,
                    port_base,
                    hold,
                    go,
                ]);
                Running::start(PYTHON, &args, Some(ns), Some(&testbed.apps), "ready")
            })
            .collect();
        release_sidecars(go, sidecars, count, phase);
    }
    wait_for_tcp_to_settle(&testbed.client);
    wait_for_tcp_to_settle(&second);
    let (output, _) = redirector.stop_ok();
    assert_eq!(
        summary_value(&output, "redirect", "redirected"),
        2 * (60 + 400)
    );
    assert_eq!(
        summary_value(&output, "redirect", "original_destinations_answered"),
        2 * (60 + 400)
    );
    assert_maps_empty(&output);
}

#[test]
fn another_user_reads_nothing_from_any_socket() {
    let testbed = root_testbed!();
    let mut holder = Running::start(
        PYTHON,
        &original_dst_args(&["holder"]),
        Some(&testbed.client),
        Some(&testbed.proxy),
        "ready",
    );
    // What the kernel answers these sockets without any BPF program.
    let probe = |client_port: &str| {
        let mut command = testbed.in_proxy_cgroup("setpriv");
        command.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            PYTHON,
        ]);
        stdout_of(
            &run(script(command, &["probe", client_port])),
            "probe as nobody",
        )
    };
    let kernel_answers = probe("9");
    // The probe's own connection to the proxy, which has no answer.
    let probed = holder.wait_for_line(|l| l.starts_with("held"), Duration::from_secs(10));
    assert!(probed.unwrap().ends_with(" errno 2") || kernel_answers.contains("errno 92"));
    assert!(!kernel_answers.contains("answered"), "{kernel_answers}");
    assert!(
        kernel_answers.contains("udp-on-proxy-tuple errno 92"),
        "{kernel_answers}"
    );

    let redirector = testbed.redirect(&["--no-proxy", "-P", "80"]);
    // A redirected connection, held open by the proxy, which can read its
    // answer.
    let client = Running::start(
        PYTHON,
        &[
            "-c".into(),
            "import socket, time\ns = socket.create_connection(('10.1.0.7', 80), timeout=10)\n\
             print('connected', flush=True)\ntime.sleep(60)"
                .into(),
        ],
        Some(&testbed.client),
        Some(&testbed.apps),
        "connected",
    );
    let held = holder
        .wait_for_line(|l| l.starts_with("held"), Duration::from_secs(10))
        .expect("the proxy accepted");
    let fields: Vec<&str> = held.split_whitespace().collect();
    assert_eq!(fields[2], "10.1.0.7:80", "{held}");
    let client_port = fields[1];
    assert_eq!(probe(client_port), kernel_answers.replace(" 9\n", "\n"));
    client.kill();
    let (output, _) = redirector.stop_ok();
    assert_eq!(
        summary_value(&output, "redirect", "original_destinations_answered"),
        1
    );
}

#[test]
fn fast_open_is_told_the_right_destination_and_leaves_nothing_behind() {
    let testbed = root_testbed!();
    // Client and server Fast Open, data in the SYN without a cookie: the
    // proxy's socket is established by the SYN itself.
    sysctl(&testbed.client, "net.ipv4.tcp_fastopen=0x607");
    let proxy = Running::start(
        PYTHON,
        &original_dst_args(&["fastopen-proxy"]),
        Some(&testbed.client),
        Some(&testbed.proxy),
        "ready",
    );
    let redirector = testbed.redirect(&["--no-proxy", "-P", "80"]);
    let before = fast_open_passive(&testbed.client);
    let out = run(script(
        testbed.in_apps(PYTHON),
        &["fastopen-clients", "10.1.0.9", "20"],
    ));
    let answers = stdout_of(&out, "fast open clients");
    assert_eq!(answers.lines().count(), 20, "{answers}");
    for line in answers.lines() {
        assert!(line.ends_with(" 10.1.0.9:80"), "{answers}");
    }
    assert!(
        fast_open_passive(&testbed.client) >= before + 20,
        "the connections did not use Fast Open"
    );
    // A connection that was never redirected, on the tuple of one that
    // was, is told what the kernel tells any socket.
    let reused_port = answers.lines().next().unwrap().split(' ').next().unwrap();
    let kernel = run(script(
        testbed.in_client_netns(PYTHON),
        &["connect-from", "0"],
    ));
    let kernel = stdout_of(&kernel, "a direct connection");
    let kernel_answer = kernel.trim().split_once(' ').unwrap().1.to_owned();
    assert!(kernel_answer.starts_with("errno"), "{kernel}");
    let reused = run(script(
        testbed.in_client_netns(PYTHON),
        &["connect-from", reused_port],
    ));
    let reused = stdout_of(&reused, "a direct connection on a used tuple");
    assert_eq!(
        reused.trim(),
        format!("{reused_port} {kernel_answer}"),
        "a stale answer"
    );
    proxy.kill();
    wait_for_tcp_to_settle(&testbed.client);
    let (output, _) = redirector.stop_ok();
    assert_eq!(
        summary_value(&output, "redirect", "original_destinations_answered"),
        20
    );
    assert_maps_empty(&output);
}

const BOUND_CLIENT: &str = r#"
import socket, sys, time
host = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"veth-c")
s.settimeout(20)
started = time.monotonic()
s.connect((host, 80))
connect_seconds = time.monotonic() - started
s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
data = b""
while True:
    part = s.recv(4096)
    if not part:
        break
    data += part
print(data.split(b"\r\n")[0].decode())
print(connect_seconds)
"#;

#[test]
fn device_bound_sockets_go_direct_at_once() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&[]);
    for host in [SERVER_V4, SERVER_V6] {
        let mut command = testbed.in_apps(PYTHON);
        command.args(["-c", BOUND_CLIENT, host]);
        let out = stdout_of(&run(command), "a device-bound client");
        let (status_line, seconds) = out.trim().split_once('\n').unwrap();
        assert!(status_line.ends_with(" 200 OK"), "{status_line}");
        // Redirected, it would wait for its timeout (20 s); direct, it may
        // still lose a first SYN to a link that has just come up.
        assert!(
            seconds.parse::<f64>().unwrap() < 3.5,
            "{host}: connect took {seconds} s"
        );
    }
    let (output, _) = redirector.stop_ok();
    let events = json_events(&output);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e["action"] == "bypass" && e["reason"] == "bound to a device"),
        "{events:?}"
    );
    assert_eq!(
        summary_value(&output, "redirect", "bypassed_bound_to_a_device"),
        2
    );
}

#[test]
fn when_proxy_down_closed_refuses_at_once() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&["--no-proxy", "--when-proxy-down", "closed"]);
    for host in [SERVER_V4, SERVER_V6] {
        // Timed inside the client: starting python under emulation is slow.
        let script = format!(
            "import socket, time\nstarted = time.monotonic()\ntry:\n    \
             socket.create_connection(('{host}', 80), timeout=10)\n    print('connected')\n\
             except OSError as e:\n    print(e.errno, time.monotonic() - started)"
        );
        let mut command = testbed.in_apps(PYTHON);
        command.args(["-c", &script]);
        let out = stdout_of(&run(command), "a client");
        let (errno, seconds) = out.trim().split_once(' ').expect("an errno and a time");
        assert_eq!(errno, libc::ECONNREFUSED.to_string(), "{host}");
        assert!(seconds.parse::<f64>().unwrap() < 1.0, "{host}: {seconds} s");
    }
    let (output, _) = redirector.stop_ok();
    assert!(output.contains("when proxy down:   closed"), "{output}");
    let events = json_events(&output);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e["action"] == "refuse" && e["reason"] == "no proxy"),
        "{events:?}"
    );
    assert_eq!(summary_value(&output, "redirect", "refused"), 2);
    assert_maps_empty(&output);
}

const CLIENTS_THAT_END_BADLY: &str = r#"
import socket, struct, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.settimeout(1)
try:
    s.connect((host, port))
except OSError as e:
    print("connect failed:", e, flush=True)
    sys.exit(0)
if mode == "reset":
    s.sendall(b"GET / HTTP/1.0\r\n")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    print("reset", flush=True)
elif mode == "wait":
    s.settimeout(15)
    print("answer", s.recv(100), flush=True)
else:
    print("connected", flush=True)
    import time; time.sleep(60)
"#;

fn client_that_ends_badly(testbed: &Testbed, mode: &str, host: &str, port: u16) -> String {
    let mut command = testbed.in_apps(PYTHON);
    command.args(["-c", CLIENTS_THAT_END_BADLY, mode, host, &port.to_string()]);
    stdout_of(&run(command), mode)
}

#[test]
fn no_record_outlives_its_connection() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&["-P", "80,81"]);
    // Refused and unreachable upstreams: the proxy closes the client.
    let out = client_that_ends_badly(&testbed, "wait", SERVER_V4, 81);
    assert!(out.starts_with("answer b''"), "{out}");
    let out = client_that_ends_badly(&testbed, "wait", "10.99.0.1", 80);
    assert!(out.starts_with("answer b''"), "{out}");
    // Resets from the client.
    for _ in 0..20 {
        let out = client_that_ends_badly(&testbed, "reset", SERVER_V4, 80);
        assert!(out.starts_with("reset"), "{out}");
    }
    // Clients killed with SIGKILL while connected.
    for _ in 0..5 {
        let client = Running::start(
            PYTHON,
            &[
                "-c".into(),
                CLIENTS_THAT_END_BADLY.into(),
                "hold".into(),
                SERVER_V4.into(),
                "80".into(),
            ],
            Some(&testbed.client),
            Some(&testbed.apps),
            "connected",
        );
        client.kill();
    }
    // Connects that time out: the SYNs to the proxy are dropped, so the
    // proxy never accepts what the client's sockets published.
    let path = testbed.apps.relative_path().unwrap();
    let rule = |action: &str| {
        let mut command = testbed.in_client_netns("iptables");
        command.args([action, "OUTPUT", "-p", "tcp", "--syn", "--dport", "15001"]);
        command.args(["-m", "cgroup", "--path"]).arg(&path);
        command.args(["-j", "DROP"]);
        stdout_of(&run(command), "iptables");
    };
    rule("-A");
    for _ in 0..5 {
        let out = client_that_ends_badly(&testbed, "wait", SERVER_V4, 80);
        assert!(out.contains("timed out"), "{out}");
    }
    rule("-D");
    wait_for_tcp_to_settle(&testbed.client);
    let (output, _) = redirector.stop_ok();
    assert_eq!(
        summary_value(&output, "redirect", "redirected"),
        2 + 20 + 5 + 5
    );
    assert_eq!(
        summary_value(&output, "redirect", "closed_before_accept"),
        5,
        "{output}"
    );
    assert_maps_empty(&output);
}

/// An HAProxy sidecar that relays to the original destination, as behind
/// iptables REDIRECT (`server 0.0.0.0:0` asks `SO_ORIGINAL_DST`).
const HAPROXY_SIDECAR: &str = "\
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend sidecar
    bind 127.0.0.1:15001
    default_backend original_destination
backend original_destination
    server original 0.0.0.0:0
";

/// A process killed when dropped.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_listener(netns: &NetNs, port: u16) {
    // HAProxy under the software-emulated VM of `make vm-test`, next to
    // another test, has taken more than 20 s to listen.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut command = netns::command_in("ss", Some(netns), None).unwrap();
        command.args(["-Htln", &format!("sport = :{port}")]);
        if !stdout_of(&run(command), "ss").trim().is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn haproxy_sidecars_in_two_namespaces_reach_each_ones_own_destinations() {
    let testbed = root_testbed!();
    // A second container, with its own link to the server: 10.78.0.2 is
    // reachable from it and 10.77.0.2 only from the first.
    let second = NetNs::create(&unique("prtest-second")).unwrap();
    netns::veth_pair(&second, "veth-c2", &testbed.server, "veth-s2").unwrap();
    second.configure("veth-c2", &["10.78.0.1/24"]).unwrap();
    testbed
        .server
        .configure("veth-s2", &["10.78.0.2/24"])
        .unwrap();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let dir = TempDir::new();
    let config = dir.join("haproxy.cfg");
    std::fs::write(&config, HAPROXY_SIDECAR).unwrap();
    let containers = [(&testbed.client, SERVER_V4), (&second, "10.78.0.2")];
    let _sidecars: Vec<Background> = containers
        .iter()
        .map(|(ns, _)| {
            let mut command = netns::command_in("haproxy", Some(ns), Some(&testbed.proxy)).unwrap();
            command.args(["-db", "-f"]).arg(&config);
            command.stdout(std::process::Stdio::null());
            let sidecar = Background(command.spawn().expect("haproxy"));
            wait_for_listener(ns, 15001);
            sidecar
        })
        .collect();
    let redirector = testbed.redirect(&["--no-proxy", "-P", "80"]);
    // Both containers' curls use the same source ports at the same time,
    // below the ephemeral range: HAProxy's upstream connections, numbered
    // by the kernel, would otherwise hold one of them now and then.
    let curls: Vec<_> = containers
        .iter()
        .map(|(ns, server)| {
            let mut command = netns::command_in("bash", Some(ns), Some(&testbed.apps)).unwrap();
            command.args([
                "-c",
                &format!(
                    "for i in $(seq 0 59); do curl -sS --max-time 10 --local-port $((22000 + i)) \
                     http://{server}/ || exit 1; echo; done"
                ),
            ]);
            command.stdout(std::process::Stdio::piped());
            command.stderr(std::process::Stdio::piped());
            command.spawn().expect("curl loop")
        })
        .collect();
    for ((_, server), curl) in containers.iter().zip(curls) {
        let out = curl.wait_with_output().unwrap();
        let bodies = stdout_of(&out, "curl through HAProxy");
        let bodies: Vec<&str> = bodies.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(bodies.len(), 60, "{bodies:?}");
        for body in bodies {
            assert!(
                body.ends_with(&format!("local=[::ffff:{server}]:80")),
                "{body}"
            );
        }
    }
    let (output, _) = redirector.stop_ok();
    assert_eq!(
        summary_value(&output, "redirect", "original_destinations_answered"),
        120
    );
}
