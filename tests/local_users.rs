//! What an unprivileged local user (nobody, in the redirected cgroup, with
//! `unshare -Urn` if it likes) can do to the relays and the service, next to
//! root's traffic: none of it may forge, starve or silence them.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use proxy_redirect::sys::netns::NetNs;

#[test]
fn a_closed_stdout_leaves_redirect_attached_and_serving() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    testbed.reject_direct(&testbed.apps, "tcp", 80);
    // `redirect -v | head -1`: the reader goes away after the header.
    let mut redirector = testbed.redirect_without_events(&testbed.proxy, &["-v"]);
    redirector.close_stdout();
    let attached = testbed.attached_redirect_programs();
    let url = format!("http://{SERVER_V4}/");
    // Each connection is an event line the closed pipe refuses.
    for _ in 0..5 {
        curl_ok(testbed.in_apps("curl"), &url);
    }
    assert_eq!(testbed.attached_redirect_programs(), attached);
    let (status, _, stderr) = redirector.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(testbed.attached_redirect_programs(), 0);
}

#[test]
fn a_closed_stdout_survives_a_reload_and_counts_the_lines_it_dropped() {
    require_root!();
    let _turn = one_service_at_a_time();
    let testbed = Testbed::new();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    testbed.reject_direct(&testbed.apps, "tcp", 80);
    let text = |ports: &str| {
        format!(
            "[redirect]\ncgroup = \"{}\"\nsockopt-cgroup = \"{}\"\nports = [{ports}]\n\
             [metrics]\nlisten = \"127.0.0.1:9479\"\n",
            testbed.apps.path().display(),
            testbed.parent.path().display()
        )
    };
    let file = ConfigFile::new(&text("80"));
    let mut service = start_service(&file.path, &[], Some(&testbed.client), Some(&testbed.proxy));
    service.close_stdout();
    let dropped = "proxy_redirect_service_output_lines_dropped_total";
    for (reloads, ports) in (1..).zip(["80, 8080", "80", "80, 443"]) {
        file.reload(&service, &text(ports));
        let page = scrape_until(&testbed.client, "127.0.0.1:9479", dropped, reloads);
        assert!(metric_value(&page, dropped) >= reloads, "{page}");
    }
    curl_ok(testbed.in_apps("curl"), &format!("http://{SERVER_V4}/"));
    let (status, _, stderr) = service.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A service translating 8080 to 80 on `lo` of a namespace of its own,
/// with `more` sections.
fn port_nat_service_on_lo(more: &str) -> (NetNs, ConfigFile, Running) {
    let netns = NetNs::create(&unique("prtest-lo")).unwrap();
    let file = ConfigFile::new(&format!(
        "[[port-nat]]\ninterface = \"lo\"\nfrom = [8080]\nto = [80]\n{more}"
    ));
    let service = start_service(&file.path, &[], Some(&netns), None);
    (netns, file, service)
}

#[test]
fn status_piped_into_head_exits_quietly() {
    require_root!();
    let _turn = one_service_at_a_time();
    let (_netns, _file, service) = port_nat_service_on_lo("");
    let out = run({
        let mut command = std::process::Command::new("bash");
        command.args(["-c", &format!("set -o pipefail; {BIN} status | head -1")]);
        command
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("proxy-redirect "));
    // Stopped, not killed: a killed service leaves its sockets in
    // /run/proxy-redirect for the next start.
    service.stop_ok();
}

#[test]
fn a_trickling_client_does_not_hold_up_a_scrape() {
    require_root!();
    let _turn = one_service_at_a_time();
    let (netns, _file, service) =
        port_nat_service_on_lo("[metrics]\nlisten = \"127.0.0.1:9478\"\n");
    // Against a scrape with no trickler about (curl alone takes a second
    // under emulation): a page served to one client at a time would wait
    // for each trickler's whole request, 6 s and more each.
    let scrape = || {
        let started = Instant::now();
        let command = proxy_redirect::sys::netns::command_in("curl", Some(&netns), None).unwrap();
        let out = curl(
            command,
            "http://127.0.0.1:9478/metrics",
            &["--max-time", "8"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("proxy_redirect_port_nat"));
        started.elapsed()
    };
    // The first page is published within a second of the start.
    std::thread::sleep(Duration::from_millis(1500));
    let alone = scrape();
    // Nobody's slow clients, one header byte every 200 ms each.
    let tricklers: Vec<_> = (0..4)
        .map(|_| {
            let mut command =
                proxy_redirect::sys::netns::command_in("setpriv", Some(&netns), None).unwrap();
            command.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                PYTHON,
                "-c",
            ]);
            command.arg(
                "import socket, time\n\
                 s = socket.create_connection(('127.0.0.1', 9478))\n\
                 start = time.monotonic()\n\
                 try:\n\
                 \x20   for b in b'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n':\n\
                 \x20       s.send(bytes([b])); time.sleep(0.2)\n\
                 except OSError:\n\
                 \x20   pass\n\
                 s.settimeout(10)\n\
                 try:\n\
                 \x20   while s.recv(4096): pass\n\
                 except OSError:\n\
                 \x20   pass\n\
                 print(round(time.monotonic() - start, 1))\n",
            );
            command
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let took = scrape();
        assert!(
            took < alone + Duration::from_secs(3),
            "a scrape took {took:?} next to trickling clients, {alone:?} alone"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Each trickler is cut at the whole-request deadline (2 s), not after
    // its last byte (6 s).
    for trickler in tricklers {
        let out = trickler.wait_with_output().unwrap();
        let seconds: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(
            (1.5..5.0).contains(&seconds),
            "a trickler was served for {seconds} s"
        );
    }
    service.stop_ok();
}

/// `run --config` on `path`, expected to refuse with a line containing
/// `expected`.
fn assert_config_refused(path: &std::path::Path, expected: &str) {
    let mut command = std::process::Command::new(BIN);
    command.args(["run", "--config"]).arg(path);
    let out = run(command);
    assert_one_line_error(&out, "an untrusted config", expected);
}

#[test]
fn a_config_that_another_user_can_change_is_refused() {
    require_root!();
    let _turn = one_service_at_a_time();
    let netns = NetNs::create(&unique("prtest-config")).unwrap();
    let text = "[[port-nat]]\ninterface = \"lo\"\nfrom = [8080]\nto = [80]\n";
    let chown = |path: &std::path::Path| std::os::unix::fs::chown(path, Some(65534), None).unwrap();

    let mode = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let owned = ConfigFile::new(text);
    chown(&owned.path);
    assert_config_refused(&owned.path, "belongs to uid 65534");

    let group_writable = ConfigFile::new(text);
    mode(&group_writable.path, 0o664);
    assert_config_refused(
        &group_writable.path,
        "writable by users other than root (mode 664)",
    );

    // Root's own file, in a directory anyone may write: the file can be
    // replaced.
    let open_dir = ConfigFile::new(text);
    mode(&open_dir.dir.join(""), 0o777);
    assert_config_refused(
        &open_dir.path,
        "writable by users other than root (mode 777)",
    );

    // A root-owned symlink to a file of nobody's, and nobody's symlink to
    // root's file.
    let links = TempDir::new();
    let target = links.join("target.toml");
    std::fs::write(&target, text).unwrap();
    chown(&target);
    let link = links.join("config.toml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_config_refused(&link, "belongs to uid 65534");
    let roots = links.join("roots.toml");
    std::fs::write(&roots, text).unwrap();
    let nobodys_link = links.join("nobodys-link.toml");
    std::os::unix::fs::symlink(&roots, &nobodys_link).unwrap();
    std::os::unix::fs::lchown(&nobodys_link, Some(65534), None).unwrap();
    assert_config_refused(&nobodys_link, "the symlink");

    // The option turns the refusal into a warning.
    let service = start_service(
        &owned.path,
        &["--allow-writable-config"],
        Some(&netns),
        None,
    );
    let (status, _, stderr) = service.stop_with(Signal::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("belongs to uid 65534"),
        "{stderr}"
    );
}

#[test]
fn a_process_name_with_a_newline_and_escapes_prints_escaped() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect_without_events(&testbed.proxy, &["-v"]);
    let mut client = testbed.in_apps("setpriv");
    client.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        PYTHON,
        "-c",
    ]);
    client.arg(format!(
        "import ctypes, socket\n\
         ctypes.CDLL(None).prctl(15, b'ev\\nFORGED\\x1b[2J', 0, 0, 0)\n\
         s = socket.create_connection(('{SERVER_V4}', 80))\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         while s.recv(4096): pass\n"
    ));
    let out = run(client);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (output, _) = redirector.stop_ok();
    assert!(
        output.contains("ev\\x0aFORGED\\x1b[2J"),
        "no escaped name in:\n{output}"
    );
    assert!(
        !output.lines().any(|line| line.starts_with("FORGED")) && !output.contains('\x1b'),
        "a forged line or an escape sequence in:\n{output}"
    );
}

#[test]
fn an_oversized_dns_name_prints_as_malformed() {
    let testbed = root_testbed!();
    let _dns = servers::udp_echo(&testbed.server, "0.0.0.0:53").unwrap();
    let redirector = testbed.redirect_without_events(&testbed.proxy, &["-v", "--udp-ports", "53"]);
    let mut client = testbed.in_apps(PYTHON);
    client.arg("-c").arg(format!(
        "import socket, struct\n\
         name = b''.join(b'\\x3f' + b'a' * 63 for _ in range(1000))[:65000] + b'\\x00'\n\
         query = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack('>HH', 1, 1)\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(5)\n\
         s.sendto(query[:65000], ('{SERVER_V4}', 53))\n\
         s.recvfrom(65535)\n"
    ));
    let out = run(client);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (output, _) = redirector.stop_ok();
    let dns: Vec<&str> = output.lines().filter(|l| l.contains(" DNS ")).collect();
    assert_eq!(dns.len(), 1, "{output}");
    assert!(
        dns[0].contains("<malformed: over 255 octets or 127 labels>"),
        "{}",
        dns[0]
    );
    assert!(dns[0].len() < 300, "a {}-byte event line", dns[0].len());
}

/// Nobody's client in `apps` (setpriv to uid 65534), running `script`.
fn as_nobody_in_apps(testbed: &Testbed, script: &str) -> std::process::Command {
    as_nobody(testbed, &[PYTHON, "-c", script])
}

/// `program` as nobody in `apps`, allowed 16,384 descriptors or more for
/// floods of sockets: a distribution's usual hard limit of 4,096 is raised
/// (root may) where it is lower.
fn as_nobody<S: AsRef<std::ffi::OsStr>>(testbed: &Testbed, program: &[S]) -> std::process::Command {
    use nix::sys::resource::{getrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let mut command = match hard >= 16384 {
        true => testbed.in_apps("setpriv"),
        false => {
            let mut command = testbed.in_apps("prlimit");
            command.args(["--nofile=32768:32768", "setpriv"]);
            command
        }
    };
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    command.args(program);
    command
}

/// A UDP server of the attacker's: it answers the first datagram from a
/// peer late and many times, as a flow kept after its client left would
/// carry it.
const LATE_REPLIER: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
data, peer = s.recvfrom(2048)
time.sleep(0.5)
for i in range(30):
    s.sendto(b"FORGED %d" % i, peer)
    time.sleep(0.05)
"#;

#[test]
fn a_udp_flow_kept_after_its_socket_closed_delivers_nothing_to_the_next_socket_on_its_port() {
    let testbed = root_testbed!();
    let _real = servers::udp_echo(&testbed.server, "0.0.0.0:53").unwrap();
    let redirector = testbed.redirect(&["--udp-ports", "53,5300"]);
    for connected in [false, true] {
        let mut late =
            proxy_redirect::sys::netns::command_in(PYTHON, Some(&testbed.server), None).unwrap();
        let mut late = KillOnDrop(
            late.args(["-c", LATE_REPLIER, "5300"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut ready = [0u8; 6];
        late.0
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .unwrap();
        // Nobody sends one datagram from port 21601 to its own server, and
        // closes the socket.
        let attacker = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0', 21601))\n\
             s.sendto(b'hello', ('{SERVER_V4}', 5300))\n\
             s.close()\n"
        );
        stdout_of(&run(as_nobody_in_apps(&testbed, &attacker)), "the attacker");
        // root's resolver gets the same port and asks the real server; it
        // listens while the attacker's server answers its old flow.
        let send = match connected {
            true => format!("s.connect(('{SERVER_V4}', 53)); s.send(b'query')"),
            false => format!("s.sendto(b'query', ('{SERVER_V4}', 53))"),
        };
        let root = format!(
            "import socket, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0', 21601))\n\
             {send}\n\
             s.settimeout(0.2)\n\
             end = time.monotonic() + 2.5\n\
             while time.monotonic() < end:\n\
             \x20   try:\n\
             \x20       data, source = s.recvfrom(2048)\n\
             \x20       print(data.decode(), source[0], source[1])\n\
             \x20   except socket.timeout:\n\
             \x20       pass\n"
        );
        let mut command = testbed.in_apps(PYTHON);
        command.args(["-c", &root]);
        let received = stdout_of(&run(command), "root's client");
        let _ = late.0.wait();
        assert_eq!(
            received.lines().collect::<Vec<_>>(),
            [format!("query {SERVER_V4} 53")],
            "connected: {connected}"
        );
    }
    let (output, _) = redirector.stop_ok();
    assert!(
        summary_value(&output, "redirect", "udp_replies_refused") > 0,
        "{output}"
    );
}

#[test]
fn one_user_filling_the_udp_flows_leaves_roots_dns_alone() {
    let testbed = root_testbed!();
    let _server = servers::udp_echo(&testbed.server, "0.0.0.0:53").unwrap();
    let redirector = testbed.redirect(&["--udp-ports", "53", "--metrics", "127.0.0.1:9480"]);
    // Nobody sends from 20,000 sockets that it keeps open (as many as its
    // file limit allows), each a flow of its own, twice over (a flood
    // overflows any UDP socket's queue, ours too: the second round opens
    // what the first lost). Sockets it closed would lose their flows at
    // their first reply. Then it holds them.
    let flood = format!(
        "import resource, socket, time\n\
         hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
         sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20          for i in range(min(20000, hard - 64))]\n\
         for round in range(2):\n\
         \x20   for s in sockets:\n\
         \x20       s.sendto(b'x', ('{SERVER_V4}', 53))\n\
         \x20   time.sleep(1)\n\
         print(len(sockets), flush=True)\n\
         time.sleep(60)\n"
    );
    let mut flood = KillOnDrop(
        as_nobody_in_apps(&testbed, &flood)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut count = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(flood.0.stdout.as_mut().unwrap()),
        &mut count,
    )
    .unwrap();
    let opened: u64 = count.trim().parse().unwrap();
    assert!(opened > 16384, "nobody could open only {opened} sockets");
    // Until the relay has worked through the flood (seconds under
    // emulation), so that root's queries do not merely queue behind it.
    let relayed = || {
        let page = scrape_metrics(&testbed.client, "127.0.0.1:9480");
        metric_value(&page, "proxy_redirect_proxy_udp_upstream_datagrams_total")
    };
    let mut last = relayed();
    for _ in 0..40 {
        let now = relayed();
        if now == last {
            break;
        }
        last = now;
    }
    // While nobody holds more sockets than the relay has flows: a
    // resolver's way, a new socket per query, asked again after 1 s (the
    // relay may still be working through the flood's last datagrams).
    let root = format!(
        "import socket\n\
         for i in range(20):\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.settimeout(1)\n\
         \x20   for attempt in range(10):\n\
         \x20       s.sendto(b'query %d' % i, ('{SERVER_V4}', 53))\n\
         \x20       try:\n\
         \x20           assert s.recvfrom(2048)[0] == b'query %d' % i\n\
         \x20           break\n\
         \x20       except socket.timeout:\n\
         \x20           pass\n\
         \x20   else:\n\
         \x20       raise SystemExit('query %d unanswered' % i)\n\
         print('answered')\n"
    );
    let mut command = testbed.in_apps(PYTHON);
    command.args(["-c", &root]);
    assert_eq!(stdout_of(&run(command), "root's DNS").trim(), "answered");
    drop(flood);
    let (output, _) = redirector.stop_ok();
    // Each of nobody's flows beyond its share replaced one of its own: at
    // most its share of flows stayed, beside root's 20 to 200. (A flood
    // overflows the proxy's queue: not every datagram makes a flow.)
    let share: u64 = output
        .lines()
        .find_map(|l| l.strip_prefix("  UDP flows:         at most "))
        .and_then(|l| {
            l.split(", ")
                .nth(1)?
                .strip_suffix(" per user")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no flow limits in:\n{output}"));
    let evicted = summary_value(&output, "proxy", "udp_flows_evicted");
    let flows = summary_value(&output, "proxy", "udp_flows_opened");
    assert!(evicted > 3000, "{evicted} evicted of {opened}: {output}");
    assert!(
        (share + 20..=share + 200).contains(&(flows - evicted)),
        "{flows} flows, {evicted} evicted, a share of {share}"
    );
}

#[test]
fn fire_and_forget_datagrams_all_arrive() {
    let testbed = root_testbed!();
    let server = servers::udp_echo(&testbed.server, "0.0.0.0:514").unwrap();
    testbed.reject_direct(&testbed.apps, "udp", 514);
    let redirector = testbed.redirect(&["--udp-ports", "514"]);
    // syslog's way: a socket per message, closed right after sendto().
    let sender = format!(
        "import socket\n\
         for i in range(200):\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.sendto(b'<14>message %d' % i, ('{SERVER_V4}', 514))\n\
         \x20   s.close()\n"
    );
    stdout_of(&run(as_nobody_in_apps(&testbed, &sender)), "the sender");
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.peers().len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (output, _) = redirector.stop_ok();
    assert_eq!(server.peers().len(), 200, "{output}");
    assert!(
        summary_value(&output, "redirect", "udp_from_last_send") > 0,
        "{output}"
    );
}

#[test]
fn one_user_holding_pending_records_in_its_own_namespace_leaves_root_answered() {
    let testbed = root_testbed!();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    testbed.reject_direct(&testbed.apps, "tcp", 80);
    let redirector = testbed.redirect(&[]);
    // Nobody, in a network namespace of its own, listens on the proxy
    // address without accepting and leaves 10,000 connections half-open:
    // each SYN keeps its record while the kernel retries it. It fills the
    // first table (4,096, first come first served) and its share of the
    // overflow (4,096); the rest are refused.
    let holder = half_open_holder("-Urn", 10000, 8);
    let mut attacker = spawn_until_it_speaks(as_nobody(&testbed, &holder), "the attacker");
    // Root's connections in the testbed's namespace wait in the overflow,
    // within their own share, and are answered meanwhile.
    let first = map_entries(redirector.pid(), "pending_orig_ds").len();
    assert_eq!(first, 4096, "the attacker's records in the first table");
    let overflow = map_entries(redirector.pid(), "pending_overflo").len();
    assert_eq!(overflow, 4096, "the attacker's share of the overflow");
    for _ in 0..5 {
        curl_ok(testbed.in_apps("curl"), &format!("http://{SERVER_V4}/"));
    }
    let _ = attacker.kill();
    let _ = attacker.wait();
    // Its sockets closed with it: neither their records nor the marks of
    // those refused may stay behind.
    for map in ["pending_orig_ds", "pending_overflo", "refused_orig_ds"] {
        let left = map_entries(redirector.pid(), map).len();
        assert_eq!(left, 0, "{left} entries left in {map}");
    }
    let (output, _) = redirector.stop_ok();
    assert!(
        summary_value(&output, "redirect", "original_destinations_refused") > 1500,
        "{output}"
    );
}
