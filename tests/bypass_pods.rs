//! `bypass --across-namespaces` against the real kernel: pods, each in a
//! network namespace of its own with a veth on a bridge (in a node
//! namespace the test makes), in one cgroup that bypass serves from the
//! test's own namespace. Pairs are made only by proof, never by address:
//! two pairs of pods with one 4-tuple never exchange a byte.

#[allow(unused_imports)]
mod common;

use std::process::Child;
use std::time::Duration;

use common::capture::Capture;
use common::*;
use proxy_redirect::sys::cgroup::{self, ChildCgroup};
use proxy_redirect::sys::netns::{self, NetNs};

const PODS: &str = concat!(
    include_str!("common/sockmap_recv.py"),
    include_str!("common/pods.py")
);
const MIB: usize = 1 << 20;
const SERVER_PORT: u16 = 8080;

/// A node: a namespace with bridges, and pods on them, all pods in one
/// cgroup.
struct Node {
    // Field order is drop order: the cgroups once their processes are gone.
    pods_cgroup: ChildCgroup,
    _parent: ChildCgroup,
    pods: Vec<NetNs>,
    node: NetNs,
    servers: Vec<Running>,
}

impl Node {
    /// Pods with `addresses` (a /24 each), the first `per_bridge` on
    /// bridge br0, the next on br1, and so on.
    fn new(addresses: &[&str], per_bridge: usize) -> Node {
        let name = unique("prpods");
        let node = NetNs::create(&format!("{name}-n")).unwrap();
        let mut pods = Vec::new();
        for (index, address) in addresses.iter().enumerate() {
            let bridge = format!("br{}", index / per_bridge);
            if index % per_bridge == 0 {
                node.ip(&["link", "add", &bridge, "type", "bridge"])
                    .unwrap();
                node.ip(&["link", "set", &bridge, "up"]).unwrap();
            }
            let pod = NetNs::create(&format!("{name}-p{index}")).unwrap();
            let port = format!("veth{index}");
            netns::veth_pair(&pod, "eth0", &node, &port).unwrap();
            node.ip(&["link", "set", &port, "master", &bridge, "up"])
                .unwrap();
            pod.configure("eth0", &[&format!("{address}/24")]).unwrap();
            pods.push(pod);
        }
        let root = cgroup::cgroup2_mount().unwrap();
        let parent = ChildCgroup::create(&root, &name).unwrap();
        let pods_cgroup = ChildCgroup::create(parent.path(), "pods").unwrap();
        Node {
            pods_cgroup,
            _parent: parent,
            pods,
            node,
            servers: Vec::new(),
        }
    }

    /// `proxy-redirect bypass` for the pods' cgroup, from the test's own
    /// namespace (as on a node's host namespace).
    fn bypass(&self, extra: &[&str]) -> Running {
        let mut args: Vec<String> = ["bypass", "-c"].map(String::from).to_vec();
        args.push(self.pods_cgroup.path().display().to_string());
        args.push("--json".into());
        args.extend(extra.iter().map(|a| a.to_string()));
        Running::start(BIN, &args, None, None, "Attached")
    }

    /// An echo server in pod `index` on its address:SERVER_PORT, closing
    /// each connection `linger_ms` after its client did.
    fn serve(&mut self, index: usize, address: &str, linger_ms: u64) {
        self.serve_reading(index, address, linger_ms, 64 * 1024, 0);
    }

    /// `serve`, reading `read_bytes` at a time, `pause_ms` apart.
    fn serve_reading(
        &mut self,
        index: usize,
        address: &str,
        linger_ms: u64,
        read_bytes: usize,
        pause_ms: u64,
    ) {
        let args: Vec<String> = [
            "-c",
            PODS,
            "server",
            address,
            &SERVER_PORT.to_string(),
            &linger_ms.to_string(),
            &read_bytes.to_string(),
            &pause_ms.to_string(),
        ]
        .map(String::from)
        .to_vec();
        self.start_server(index, &args);
    }

    /// Python with `args` in pod `index`, as a server ready once it prints
    /// "listening".
    fn start_server(&mut self, index: usize, args: &[String]) {
        let server = Running::start(
            PYTHON,
            args,
            Some(&self.pods[index]),
            Some(&self.pods_cgroup),
            "listening",
        );
        self.servers.push(server);
    }

    /// A client in pod `index` echoing `size` bytes tagged `tag` through the
    /// server at `address`, from `bind` when given.
    fn client(&self, index: usize, address: &str, size: usize, tag: &str, bind: &str) -> Child {
        self.client_after(index, address, size, tag, bind, 0)
    }

    /// `client`, writing only `delay_ms` after connect() returned.
    fn client_after(
        &self,
        index: usize,
        address: &str,
        size: usize,
        tag: &str,
        bind: &str,
        delay_ms: u64,
    ) -> Child {
        let mut command =
            netns::command_in(PYTHON, Some(&self.pods[index]), Some(&self.pods_cgroup)).unwrap();
        command.args(["-c", PODS, "client", address, &SERVER_PORT.to_string()]);
        command.args([&size.to_string(), tag, bind, "0", &delay_ms.to_string()]);
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Node {
    /// An echo server with Fast Open in pod `index` on its
    /// address:SERVER_PORT.
    fn serve_fast_open(&mut self, index: usize, address: &str) {
        let script = format!(
            "import socket, threading\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)\n\
             s.bind(('{address}', {SERVER_PORT})); s.listen(16)\n\
             def echo(c):\n\
             \x20   while True:\n\
             \x20       try: d = c.recv(65536)\n\
             \x20       except BlockingIOError: continue\n\
             \x20       if not d: break\n\
             \x20       c.sendall(d)\n\
             \x20   c.close()\n\
             print('listening', flush=True)\n\
             while True:\n\
             \x20   c, _ = s.accept(); threading.Thread(target=echo, args=(c,)).start()\n"
        );
        let args = ["-c".to_owned(), script];
        self.start_server(index, &args);
    }
}

/// A client's end: it must have got its own bytes back, every one.
fn assert_echoed(client: Child, what: &str) {
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok "),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pods_on_a_bridge_are_paired_across_namespaces_only_when_asked() {
    require_root!();
    let mut node = Node::new(&["10.250.20.1", "10.250.20.2"], 2);
    node.serve(1, "10.250.20.2", 0);

    // Off by default: the pods talk over their veths.
    let bypasser = node.bypass(&[]);
    let client = node.client(0, "10.250.20.2", 8 * MIB, "off", "");
    assert_echoed(client, "without --across-namespaces");
    let (output, _) = bypasser.stop_ok();
    assert_eq!(summary_value(&output, "bypass", "inserted"), 0, "{output}");
    assert_eq!(summary_value(&output, "bypass", "bytes_across"), 0);
    assert!(summary_value(&output, "bypass", "peer_elsewhere") >= 2);

    let bypasser = node.bypass(&["--across-namespaces"]);
    let dir = TempDir::new();
    let captures = ["veth0", "veth1"].map(|port| Capture::start(&node.node, port, &dir));
    let client = node.client(0, "10.250.20.2", 32 * MIB, "on", "");
    assert_echoed(client, "with --across-namespaces");
    let (output, _) = bypasser.stop_ok();
    assert_eq!(
        summary_value(&output, "bypass", "across_paired"),
        1,
        "{output}"
    );
    assert_eq!(summary_value(&output, "bypass", "inserted"), 2, "{output}");
    let events = json_events(&output);
    let across_events = events.iter().filter(|e| e["across"] == true).count();
    assert_eq!(across_events, 2, "{events:?}");
    let across = summary_value(&output, "bypass", "bytes_across");
    let passed = summary_value(&output, "bypass", "bytes_passed");
    assert_eq!(across + passed, 2 * 32 * MIB as u64, "{output}");
    // What crossed the veths is what was not bypassed: both directions on
    // each (a retransmission counts twice).
    for capture in captures {
        let (syns, payload, packets) = capture.stop();
        assert_eq!(syns, 1, "SYN packets:\n{packets}");
        assert!(
            payload <= passed + passed / 4 + 4096,
            "{payload} payload bytes on a veth, {passed} passed:\n{output}"
        );
    }
    println!("bytes across namespaces: {across} of {}", 2 * 32 * MIB);
}

#[test]
fn two_pairs_of_pods_with_one_tuple_never_exchange_a_byte() {
    require_root!();
    // Pods 0 and 1 on br0, pods 2 and 3 on br1: the same two addresses.
    let addresses = ["10.250.30.1", "10.250.30.2", "10.250.30.1", "10.250.30.2"];
    let mut node = Node::new(&addresses, 2);
    // The servers stay in CLOSE_WAIT for a while after each client closed.
    node.serve(1, "10.250.30.2", 300);
    node.serve(3, "10.250.30.2", 300);
    let bypasser = node.bypass(&["--across-namespaces"]);
    let bind = "10.250.30.1:21600";
    for round in 0..3 {
        // At the same time, from the same address and port: one 4-tuple.
        let clients = [0, 2].map(|pod| {
            let tag = format!("pod {pod} round {round}");
            node.client(pod, "10.250.30.2", 4 * MIB, &tag, bind)
        });
        for (pod, client) in [0, 2].iter().zip(clients) {
            assert_echoed(client, &format!("pod {pod} round {round}"));
        }
        // One pair after the other, each while the other's server still
        // lingers on the same tuple.
        for pod in [0, 2] {
            let tag = format!("pod {pod} alone, round {round}");
            assert_echoed(node.client(pod, "10.250.30.2", 4 * MIB, &tag, bind), &tag);
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    let (output, _) = bypasser.stop_ok();
    // The pairs made one at a time were proven; the ones made at once
    // with the same tuple may have been, or have poisoned each other.
    assert!(
        summary_value(&output, "bypass", "across_paired") >= 6,
        "{output}"
    );
    assert!(
        summary_value(&output, "bypass", "bytes_across") > 0,
        "{output}"
    );
}

/// Busy loops, one per core, as other workloads of a host.
struct BusyLoops(#[allow(dead_code)] Vec<KillOnDrop>);

impl BusyLoops {
    fn start() -> BusyLoops {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        BusyLoops(
            (0..cores)
                .map(|_| {
                    let mut command = std::process::Command::new(PYTHON);
                    command.args(["-c", "while True: pass"]);
                    KillOnDrop(command.spawn().unwrap())
                })
                .collect(),
        )
    }
}

#[test]
fn a_streaming_echo_takes_the_bypass_from_the_first_byte_once_its_programs_are_known() {
    require_root!();
    // A pair across namespaces (pods 0 and 1), and a pair inside pod 2.
    let addresses = ["10.250.40.1", "10.250.40.2", "10.250.40.3"];
    let mut node = Node::new(&addresses, 3);
    // Readers slower than their writers: 256 KiB at a time, 2 ms apart.
    node.serve_reading(1, "10.250.40.2", 0, 256 * 1024, 2);
    node.serve_reading(2, "127.0.0.1", 0, 256 * 1024, 2);
    let bypasser = node.bypass(&["--across-namespaces"]);
    // One short echo through each server first: the client's program
    // (python3) and each server's port are seen reading with recv.
    assert_echoed(node.client(0, "10.250.40.2", MIB, "warm", ""), "warm-up");
    assert_echoed(node.client(2, "127.0.0.1", MIB, "warm", ""), "warm-up");
    let _busy = BusyLoops::start();
    let size = 24 * MIB;
    assert_echoed(node.client(0, "10.250.40.2", size, "across", ""), "across");
    assert_echoed(node.client(2, "127.0.0.1", size, "inside", ""), "inside");
    let (output, _) = bypasser.stop_ok();
    let all = (2 * 2 * (MIB + size)) as f64;
    let redirected = summary_value(&output, "bypass", "bytes_redirected") as f64;
    let across = summary_value(&output, "bypass", "bytes_across") as f64;
    println!(
        "bypassed: {:.1} % in all, {:.1} % of the bytes across namespaces",
        100.0 * redirected / all,
        100.0 * across / (2 * (MIB + size)) as f64
    );
    assert!(summary_value(&output, "bypass", "recv_readers_learned") >= 1);
    // Only the warm-ups' first messages pass for sure (their readers are
    // not known yet), and a pair's first message if it is written before
    // the pair is complete: 90 % leaves room for both.
    assert!(redirected >= 0.9 * all, "{output}");
    assert!(across >= 0.9 * (2 * size) as f64, "{output}");
}

/// In pod a: Fast Open connections to the server (data in the SYN once the
/// client holds a cookie), a connection through a DNAT rule, and a socket
/// put into TCP_REPAIR (as a checkpoint restore does), each echoing and
/// checking its bytes.
const FALLBACKS: &str = r#"
import random, select, socket, sys
server, nat = sys.argv[1], sys.argv[2]
data = random.Random(9).randbytes(1 << 20)

def recv_all(c):
    got = bytearray()
    while True:
        try:
            part = c.recv(1 << 20)
        except BlockingIOError:
            select.select([c], [], [], 1)
            continue
        if not part:
            return bytes(got)
        got.extend(part)

def echo(c, first=b""):
    c.sendall(data[len(first):])
    c.shutdown(socket.SHUT_WR)
    got = recv_all(c)
    c.close()
    assert got == data, f"{len(got)} of {len(data)} bytes back"

for i in range(4):
    c = socket.socket()
    c.sendto(data[:1000], socket.MSG_FASTOPEN, (server, 8080))
    echo(c, data[:1000])
c = socket.create_connection((nat, 80))
echo(c)
r = socket.socket()
r.setsockopt(socket.IPPROTO_TCP, 19, 1)  # TCP_REPAIR
r.connect((server, 8080))
r.close()
print("ok")
"#;

#[test]
fn fast_open_dnat_and_repair_sockets_stay_on_tcp_and_are_counted() {
    require_root!();
    let mut node = Node::new(&["10.250.50.1", "10.250.50.2"], 2);
    for pod in &node.pods {
        let mut command = netns::command_in("sysctl", Some(pod), None).unwrap();
        command.args(["-qw", "net.ipv4.tcp_fastopen=3"]);
        assert!(run(command).status.success());
    }
    // A service address that the client's namespace translates.
    let mut nat = netns::command_in("iptables", Some(&node.pods[0]), None).unwrap();
    nat.args([
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "10.250.50.100",
        "-p",
        "tcp",
    ]);
    nat.args(["--dport", "80", "-j", "DNAT", "--to-destination"]);
    nat.arg("10.250.50.2:8080");
    assert!(run(nat).status.success());
    node.serve_fast_open(1, "10.250.50.2");
    let bypasser = node.bypass(&["--across-namespaces"]);
    let mut client =
        netns::command_in(PYTHON, Some(&node.pods[0]), Some(&node.pods_cgroup)).unwrap();
    client.args(["-c", FALLBACKS, "10.250.50.2", "10.250.50.100"]);
    let out = run(client);
    let (output, _) = bypasser.stop_ok();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{out:?}\n{output}"
    );
    // Fast Open with a cookie: both ends saw data cross TCP first.
    assert!(
        summary_value(&output, "bypass", "data_before_insertion") >= 2,
        "{output}"
    );
    // Behind DNAT the two ends name the connection differently: each
    // waited for an end that never came, and left.
    assert!(
        summary_value(&output, "bypass", "across_unproven") >= 2,
        "{output}"
    );
    assert!(
        summary_value(&output, "bypass", "repair_sockets") >= 1,
        "{output}"
    );
    assert_eq!(summary_value(&output, "bypass", "across_mismatch"), 0);
}

#[test]
fn early_writes_to_a_late_reader_across_namespaces_keep_their_order() {
    require_root!();
    let node = Node::new(&["10.250.60.1", "10.250.60.2"], 2);
    let args: Vec<String> = ["-c", PODS, "order-server", "10.250.60.2", "8080"]
        .map(String::from)
        .to_vec();
    let mut server = Running::start(
        PYTHON,
        &args,
        Some(&node.pods[1]),
        Some(&node.pods_cgroup),
        "listening",
    );
    let bypasser = node.bypass(&["--across-namespaces"]);
    let mut client =
        netns::command_in(PYTHON, Some(&node.pods[0]), Some(&node.pods_cgroup)).unwrap();
    client.args(["-c", PODS, "order-client", "10.250.60.2", "8080", "100"]);
    let out = run(client);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{out:?}"
    );
    // The server's last checks finish after the clients' half-close.
    std::thread::sleep(Duration::from_millis(500));
    let (output, _) = bypasser.stop_ok();
    let bad = server.wait_for_line(|l| l.starts_with("bad "), Duration::from_millis(200));
    assert!(bad.is_none(), "a stream out of order: {bad:?}\n{output}");
    assert!(
        summary_value(&output, "bypass", "across_paired") >= 90,
        "{output}"
    );
    assert!(
        summary_value(&output, "bypass", "bytes_across") > 0,
        "{output}"
    );
}

#[test]
fn across_namespaces_is_a_config_key_that_a_reload_turns_off() {
    let _one = one_service_at_a_time();
    require_root!();
    let mut node = Node::new(&["10.250.70.1", "10.250.70.2"], 2);
    node.serve(1, "10.250.70.2", 0);
    let config = |across: bool| {
        format!(
            "[bypass]\ncgroup = \"{}\"\nacross-namespaces = {across}\n",
            node.pods_cgroup.path().display()
        )
    };
    let file = ConfigFile::new(&config(true));
    let mut service = start_service(&file.path, &["--json"], None, None);
    assert_echoed(node.client(0, "10.250.70.2", MIB, "on", ""), "on");
    file.reload(&service, &config(false));
    let reloaded = service.wait_for_line(|l| l == "Reloaded bypass", Duration::from_secs(20));
    assert!(reloaded.is_some(), "{:?}", service.seen);
    assert_echoed(node.client(0, "10.250.70.2", MIB, "off", ""), "off");
    let (out, _) = service.stop_ok();
    assert_eq!(summary_value(&out, "bypass", "across_paired"), 1, "{out}");
    assert_eq!(summary_value(&out, "bypass", "peer_elsewhere"), 2, "{out}");
}

#[test]
fn stopping_or_killing_bypass_mid_transfer_loses_nothing_across_namespaces() {
    require_root!();
    let mut node = Node::new(&["10.250.80.1", "10.250.80.2"], 2);
    node.serve(1, "10.250.80.2", 0);
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let mut bypasser = node.bypass(&["--across-namespaces"]);
        // 32 MiB each way, 64 KiB every 5 ms: a few seconds.
        let mut command =
            netns::command_in(PYTHON, Some(&node.pods[0]), Some(&node.pods_cgroup)).unwrap();
        command.args(["-c", PODS, "client", "10.250.80.2", "8080"]);
        command.args([&(32 * MIB).to_string(), &format!("{signal}"), "", "5"]);
        let client = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Both ends in the map (however slow the machine), and some bytes
        // through it.
        for end in ["first", "second"] {
            let inserted =
                bypasser.wait_for_line(|l| l.contains("\"across\":true"), Duration::from_secs(60));
            assert!(inserted.is_some(), "the {end} end was never inserted");
        }
        std::thread::sleep(Duration::from_millis(300));
        match signal {
            nix::sys::signal::Signal::SIGKILL => bypasser.kill(),
            _ => {
                let (out, _) = bypasser.stop_ok();
                assert!(summary_value(&out, "bypass", "bytes_across") > 0, "{out}");
            }
        }
        assert_echoed(client, &format!("bypass stopped by {signal} mid-transfer"));
    }
}
