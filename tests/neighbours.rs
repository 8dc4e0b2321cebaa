//! Next to other tools' BPF programs on the same hooks: they keep seeing
//! their packets, their attachments stay theirs, and when one of them is
//! in our way we say so in one line.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::foreign::*;
use common::gateway::*;
use common::*;
use proxy_redirect::sys::netns::NetNs;

/// `tc filter show dev DEVICE DIRECTION` in `netns`.
fn tc_filters(netns: &NetNs, device: &str, direction: &str) -> String {
    let mut command = proxy_redirect::sys::netns::command_in("tc", Some(netns), None).unwrap();
    command.args(["filter", "show", "dev", device, direction]);
    String::from_utf8_lossy(&run(command).stdout).into_owned()
}

fn has_clsact(netns: &NetNs, device: &str) -> bool {
    let mut command = proxy_redirect::sys::netns::command_in("tc", Some(netns), None).unwrap();
    command.args(["qdisc", "show", "dev", device]);
    String::from_utf8_lossy(&run(command).stdout).contains("clsact")
}

/// The foreign program's runs for `requests` requests to `url`.
fn runs_during(foreign: &Foreign, testbed: &Testbed, url: &str, requests: usize) -> u64 {
    let before = foreign.runs();
    for _ in 0..requests {
        curl_ok(testbed.in_client_netns("curl"), url);
    }
    foreign.runs() - before
}

#[test]
fn another_tools_tc_program_sees_every_packet_before_and_after_port_nat() {
    require_root!();
    let _stats = Stats::enable();
    let testbed = Testbed::new();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let mut foreign = Foreign::load();
    foreign.attach(&testbed.server, "veth-s", true);
    // Without us: what it sees of 20 requests straight to port 80.
    let alone = runs_during(&foreign, &testbed, &format!("http://{SERVER_V4}/"), 20);
    assert!(alone >= 20 * 8, "{alone} runs for 20 requests");
    for order in ["first", "last"] {
        let nat = start_attached(
            &testbed.server,
            None,
            &[
                "port-nat",
                "-i",
                "veth-s",
                "-f",
                "8080",
                "-t",
                "80",
                "--tc-order",
                order,
            ],
        );
        let url = format!("http://{SERVER_V4}:8080/");
        let with_us = runs_during(&foreign, &testbed, &url, 20);
        let (output, _) = nat.stop_ok();
        assert!(output.contains(&format!(
            "TC order:          ingress {order}, egress {order}"
        )));
        // Each request's packets, translated or not, reach the program
        // behind ours or leave ours to it: within a few retransmits of the
        // run without us.
        assert!(
            with_us * 10 >= alone * 9 && with_us * 10 <= alone * 11,
            "--tc-order {order}: the other program ran {with_us} times, {alone} without us"
        );
    }
}

#[test]
fn another_tools_tc_program_behind_tproxy_sees_every_packet() {
    require_root!();
    let _stats = Stats::enable();
    let gw = Gateway::new();
    let _web = servers::http(&gw.server, "[::]:80").unwrap();
    let mut foreign = Foreign::load();
    foreign.attach(&gw.gateway, CLIENT_FACING, false);
    // tproxy goes first on ingress: the other program sees every packet it
    // hands on, intercepted ones included.
    let tproxy = gw.tproxy(&["-P", "80"]);
    let before = foreign.runs();
    for _ in 0..20 {
        let out = curl(gw.in_client("curl"), &format!("http://{SERVER4}/"), &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Read once tproxy has stopped: a late ACK that tproxy counted before
    // its last statistics must be among the other program's runs too.
    let (output, _) = tproxy.stop_ok();
    let seen = foreign.runs() - before;
    let intercepted = json_events(&output)
        .iter()
        .filter(|e| e["action"] == "intercept")
        .count();
    assert_eq!(intercepted, 20, "{output}");
    // tproxy counts every TCP packet it sees, the other program every
    // packet (an ARP or neighbour discovery packet or two besides).
    let tcp = summary_value(&output, "tproxy", "tcp_packets");
    assert!(
        seen >= tcp && seen <= tcp + 10,
        "the program behind tproxy ran {seen} times for {tcp} TCP packets"
    );
}

#[test]
fn another_tools_clsact_filter_and_the_qdisc_stay_after_port_nat_stops() {
    let testbed = root_testbed!();
    let foreign = Foreign::load();
    let program = foreign.program.as_raw_fd();
    let nat_args = [
        "port-nat",
        "-i",
        "veth-s",
        "-f",
        "8080",
        "-t",
        "80",
        "--tc-attach",
        "clsact",
    ];
    // Port-nat creates the qdisc, the other tool adds its filters after.
    let nat = start_attached(&testbed.server, None, &nat_args);
    in_netns(&testbed.server, move || {
        let ifindex = nix::net::if_::if_nametoindex("veth-s")? as i32;
        clsact_filter(ifindex, libbpf_sys::BPF_TC_INGRESS, program)?;
        clsact_filter(ifindex, libbpf_sys::BPF_TC_EGRESS, program)
    });
    nat.stop_ok();
    assert!(
        has_clsact(&testbed.server, "veth-s"),
        "the qdisc went with port-nat"
    );
    for direction in ["ingress", "egress"] {
        let filters = tc_filters(&testbed.server, "veth-s", direction);
        assert!(filters.contains("foreign_next"), "{direction}: {filters}");
        assert!(!filters.contains("port_nat"), "{direction}: {filters}");
    }
    // And the other way round: their qdisc first, ours on it, theirs kept.
    let nat = start_attached(&testbed.server, None, &nat_args);
    nat.stop_ok();
    assert!(has_clsact(&testbed.server, "veth-s"));
    assert!(tc_filters(&testbed.server, "veth-s", "ingress").contains("foreign_next"));
}

#[test]
fn an_exclusive_cgroup_program_of_another_tool_refuses_start_naming_it() {
    require_root!();
    use libbpf_sys::*;
    let testbed = Testbed::new();
    let exclusive = CgroupProgram::attach(
        testbed.apps.path(),
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        c"their_connect4",
        0,
    );
    let id = {
        let mut info = bpf_prog_info::default();
        let mut len = std::mem::size_of::<bpf_prog_info>() as u32;
        // SAFETY: info is a complete bpf_prog_info of len bytes.
        unsafe { bpf_prog_get_info_by_fd(exclusive.program.as_raw_fd(), &mut info, &mut len) };
        info.id
    };
    let apps = testbed.apps.path().display().to_string();
    let parent = testbed.parent.path().display().to_string();
    let mut redirect = testbed.in_client_netns(BIN);
    redirect.args(["redirect", "-c", &apps, "--sockopt-cgroup", &parent]);
    assert_one_line_error(
        &run(redirect),
        "redirect next to an exclusive program",
        &format!("cgroup {apps} holds program {id} 'their_connect4' on connect4"),
    );
    assert_eq!(testbed.attached_redirect_programs(), 1, "only theirs stays");
    // One above, not overridable, blocks every cgroup below it too.
    let sockops = CgroupProgram::attach(
        testbed.parent.path(),
        BPF_PROG_TYPE_SOCK_OPS,
        BPF_CGROUP_SOCK_OPS,
        c"their_sockops",
        0,
    );
    let mut bypass = testbed.in_client_netns(BIN);
    bypass.args(["bypass", "-c", &apps]);
    assert_one_line_error(
        &run(bypass),
        "bypass below an exclusive program",
        &format!("cgroup {parent} holds program"),
    );
    drop(sockops);
    drop(exclusive);
    // With theirs gone, both start; Cilium's socket load balancer there
    // (a multi program named as Cilium names it) draws one warning.
    let _cilium = CgroupProgram::attach(
        testbed.parent.path(),
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        c"cil_sock4_connect",
        BPF_F_ALLOW_MULTI,
    );
    let redirector = testbed.redirect(&[]);
    assert!(testbed.attached_redirect_programs() > 0);
    let (_, stderr) = redirector.stop_ok();
    assert_eq!(
        stderr.matches("Cilium's socket load balancer").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_routing_mark_or_table_of_another_tool_refuses_tproxy_naming_the_rule() {
    let gw = root_gateway!();
    let rule = |args: &str| {
        let mut command = gw.in_gateway("ip");
        command.args(args.split_whitespace());
        assert!(run(command).status.success(), "ip {args}");
    };
    let refused = |expected: &str| {
        let before = gw.snapshot();
        let mut command = gw.in_gateway(BIN);
        command.args(["tproxy", "-i", CLIENT_FACING]);
        assert_one_line_error(
            &run(command),
            "tproxy next to another tool's rule",
            expected,
        );
        assert_eq!(
            gw.snapshot(),
            before,
            "a refused tproxy changed the gateway"
        );
    };
    // The default mark, 0x5054, as Calico-style masked marks see it.
    rule("rule add pref 200 fwmark 0x4000/0x4000 lookup 200");
    refused("the routing mark 0x5054 is already matched by the rule 'pref 200 fwmark 0x4000/0x4000 lookup 200'");
    rule("rule del pref 200");
    rule("-6 rule add pref 201 fwmark 0x5054 lookup 201");
    refused("the routing mark 0x5054 is already matched by the rule 'pref 201 fwmark 0x5054 lookup 201'");
    rule("-6 rule del pref 201");
    rule("rule add pref 300 from 10.9.0.0/16 lookup 5052");
    refused(
        "routing table 5052 is already used by the rule 'pref 300 src 10.9.0.0/16 lookup 5052'",
    );
    rule("rule del pref 300");
    let tproxy = gw.tproxy(&["-P", "80"]);
    tproxy.stop_ok();
}

/// One BPF instruction: opcode, registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst | src << 4) as u64) << 8
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

/// Another tool's sockmap accelerator: a sockops program that puts every
/// socket established in its cgroup into its own sockhash (keyed by local
/// port), which holds an sk_msg program that passes every message on.
struct ForeignSockmap {
    _map: OwnedFd,
    _msg: OwnedFd,
    _sockops: CgroupProgram,
}

impl ForeignSockmap {
    fn attach(cgroup: &std::path::Path) -> ForeignSockmap {
        use libbpf_sys::*;
        // SAFETY: a plain system call; a descriptor or a negative errno.
        let map = unsafe {
            bpf_map_create(
                BPF_MAP_TYPE_SOCKHASH,
                c"their_sockhash".as_ptr(),
                4,
                4,
                64,
                std::ptr::null(),
            )
        };
        assert!(map >= 0, "creating their sockhash: {map}");
        // SAFETY: the kernel just returned this descriptor.
        let map = unsafe { OwnedFd::from_raw_fd(map) };
        let msg = load_raw(BPF_PROG_TYPE_SK_MSG, None, c"their_msg", &ALLOW);
        // SAFETY: plain descriptors.
        let ret =
            unsafe { bpf_prog_attach(msg.as_raw_fd(), map.as_raw_fd(), BPF_SK_MSG_VERDICT, 0) };
        assert_eq!(ret, 0, "attaching their sk_msg program");
        let fd = map.as_raw_fd();
        let sockops = [
            insn(0xbf, 6, 1, 0, 0),   // r6 = ctx
            insn(0x61, 2, 1, 0, 0),   // r2 = ctx->op
            insn(0x15, 2, 0, 2, 4),   // ACTIVE_ESTABLISHED_CB: insert
            insn(0x15, 2, 0, 1, 5),   // PASSIVE_ESTABLISHED_CB: insert
            insn(0x05, 0, 0, 9, 0),   // else done
            insn(0x61, 2, 6, 68, 0),  // r2 = ctx->local_port
            insn(0x63, 10, 2, -4, 0), // key on the stack
            insn(0x18, 2, 1, 0, fd),  // r2 = the sockhash (ld_imm64)
            0,
            insn(0xbf, 1, 6, 0, 0),  // r1 = ctx
            insn(0xbf, 3, 10, 0, 0), // r3 = &key
            insn(0x07, 3, 0, 0, -4),
            insn(0xb7, 4, 0, 0, 0),  // BPF_ANY
            insn(0x85, 0, 0, 0, 70), // bpf_sock_hash_update
            insn(0xb7, 0, 0, 0, 1),  // done: return 1
            insn(0x95, 0, 0, 0, 0),
        ];
        let program = load_raw(
            BPF_PROG_TYPE_SOCK_OPS,
            Some(BPF_CGROUP_SOCK_OPS),
            c"their_sockops",
            &sockops,
        );
        let cgroup_file = std::fs::File::open(cgroup).unwrap();
        // SAFETY: plain descriptors; multi, as a well-behaved tool attaches.
        let ret = unsafe {
            bpf_prog_attach(
                program.as_raw_fd(),
                cgroup_file.as_raw_fd(),
                BPF_CGROUP_SOCK_OPS,
                BPF_F_ALLOW_MULTI,
            )
        };
        assert_eq!(ret, 0, "attaching their sockops program");
        ForeignSockmap {
            _map: map,
            _msg: msg,
            _sockops: CgroupProgram {
                program,
                cgroup: cgroup_file,
                attach_type: BPF_CGROUP_SOCK_OPS,
            },
        }
    }
}

/// 200 request/response exchanges of 32 KiB over loopback inside one
/// process (both sockets in the caller's cgroup), each checked. A blocking
/// recv() on a socket in a sockmap can return EAGAIN (the kernel's
/// tcp_bpf_recvmsg): it is retried, as an event loop would.
const LOOPBACK_EXCHANGES: &str = r#"
import os, socket, threading
def recv_exactly(sock, size):
    got = b""
    while len(got) < size:
        try:
            data = sock.recv(size - len(got))
        except BlockingIOError:
            continue
        if not data:
            break
        got += data
    return got
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
def serve():
    conn, _ = listener.accept()
    while True:
        data = recv_exactly(conn, 32768)
        if not data:
            break
        conn.sendall(data)
threading.Thread(target=serve, daemon=True).start()
client = socket.create_connection(("127.0.0.1", port))
for i in range(200):
    block = os.urandom(32768)
    client.sendall(block)
    assert recv_exactly(client, len(block)) == block, i
print("intact")
"#;

/// LOOPBACK_EXCHANGES in `apps`, then in `proxy`, each intact.
fn exchanges_intact(testbed: &Testbed, in_apps: &str, in_proxy: &str) {
    for (whose, mut command) in [
        (in_apps, testbed.in_apps(PYTHON)),
        (in_proxy, testbed.in_proxy_cgroup(PYTHON)),
    ] {
        command.args(["-c", LOOPBACK_EXCHANGES]);
        assert_eq!(stdout_of(&run(command), whose).trim(), "intact", "{whose}");
    }
}

#[test]
fn sockets_in_another_tools_sockmap_stay_theirs_and_the_rest_are_bypassed() {
    let testbed = root_testbed!();
    // Theirs on `apps`; bypass on the parent, whose programs run after the
    // child's: their insertion comes first.
    let _theirs = ForeignSockmap::attach(testbed.apps.path());
    let parent = testbed.parent.path().display().to_string();
    let bypass = start_attached(&testbed.client, None, &["bypass", "-c", &parent, "--json"]);
    exchanges_intact(&testbed, "theirs", "ours");
    let (output, stderr) = bypass.stop_ok();
    // The pair in `apps` is theirs: both sockets counted, left on TCP.
    assert_eq!(
        summary_value(&output, "bypass", "held_by_another_sockmap"),
        2,
        "{output}"
    );
    assert_eq!(
        stderr.matches("another tool's sockmap").count(),
        1,
        "one line: {stderr}"
    );
    // The pair in `proxy` is ours.
    assert_eq!(summary_value(&output, "bypass", "inserted"), 2, "{output}");
    assert!(
        summary_value(&output, "bypass", "bytes_redirected") > 0,
        "{output}"
    );
}

/// An SO_ORIGINAL_DST proxy on 127.0.0.1:PORT that answers each connection
/// with "NAME ORIGINAL" (after one byte from the client), and clients that
/// make COUNT connections to PREFIX.<1..250>:80, 50 at a time, and check
/// that each answer names their own proxy and their own destination.
const TWO_OF_OURS: &str = r#"
import socket, struct, sys, threading
from concurrent.futures import ThreadPoolExecutor
if sys.argv[1] == "proxy":
    name, port = sys.argv[2], int(sys.argv[3])
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    print("ready", flush=True)
    def answer(conn):
        with conn:
            conn.recv(1)
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
            port, = struct.unpack("!H", raw[2:4])
            conn.sendall(("%s %s:%d" % (name, socket.inet_ntoa(raw[4:8]), port)).encode())
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()
else:
    name, prefix, count = sys.argv[2], sys.argv[3], int(sys.argv[4])
    def client(i):
        want = "%s %s.%d:80" % (name, prefix, i % 250 + 1)
        s = socket.create_connection(("%s.%d" % (prefix, i % 250 + 1), 80), timeout=30)
        s.sendall(b"x")
        got = b""
        while True:
            part = s.recv(100)
            if not part:
                break
            got += part
        s.close()
        return None if got.decode() == want else "wanted %r, got %r" % (want, got)
    with ThreadPoolExecutor(50) as pool:
        wrong = [w for w in pool.map(client, range(count)) if w]
    print("ok" if not wrong else "\n".join(wrong[:5]))
"#;

#[test]
fn two_redirects_on_sibling_cgroups_each_answer_their_own_connections() {
    let testbed = root_testbed!();
    let apps2 =
        proxy_redirect::sys::cgroup::ChildCgroup::create(testbed.parent.path(), "apps2").unwrap();
    let parent = testbed.parent.path().display().to_string();
    let egress = testbed.redirect(&["--no-proxy", "--proxy-port", "15001"]);
    let apps2_path = apps2.path().display().to_string();
    let sidecars = start_attached(
        &testbed.client,
        Some(&testbed.proxy),
        &[
            "redirect",
            "-c",
            &apps2_path,
            "--sockopt-cgroup",
            &parent,
            "--no-proxy",
            "--proxy-port",
            "15002",
            "--json",
        ],
    );
    let proxy = |name: &str, port: &str| {
        let mut command = testbed.in_proxy_cgroup(PYTHON);
        command.args(["-c", TWO_OF_OURS, "proxy", name, port]);
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = [0u8; 6];
        std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut ready).unwrap();
        KillOnDrop(child)
    };
    let _a = proxy("A", "15001");
    let _b = proxy("B", "15002");
    let clients = |cgroup: &proxy_redirect::sys::cgroup::ChildCgroup, name: &str, prefix: &str| {
        let mut command =
            proxy_redirect::sys::netns::command_in(PYTHON, Some(&testbed.client), Some(cgroup))
                .unwrap();
        command.args(["-c", TWO_OF_OURS, "clients", name, prefix, "400"]);
        command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Both trees at once.
    let first = clients(&testbed.apps, "A", "10.88.1");
    let second = clients(&apps2, "B", "10.88.2");
    for (name, child) in [("A", first), ("B", second)] {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "clients of {name}"
        );
    }
    for redirector in [egress, sidecars] {
        redirector.stop_ok();
    }
}

#[test]
fn two_bypasses_on_overlapping_cgroups_lose_no_data_and_take_no_socket_of_the_other() {
    let testbed = root_testbed!();
    let start = |cgroup: &std::path::Path| {
        let cgroup = cgroup.display().to_string();
        start_attached(&testbed.client, None, &["bypass", "-c", &cgroup, "--json"])
    };
    let outer = start(testbed.parent.path());
    let inner = start(testbed.apps.path());
    for (whose, command) in [
        ("both", testbed.in_apps(PYTHON)),
        ("outer only", testbed.in_proxy_cgroup(PYTHON)),
    ] {
        let mut command = command;
        command.args(["-c", LOOPBACK_EXCHANGES]);
        let out = run(command);
        assert!(
            out.status.success(),
            "{whose}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "intact",
            "{whose}"
        );
    }
    let (inner_out, _) = inner.stop_ok();
    let (outer_out, _) = outer.stop_ok();
    // The child cgroup's programs run first: the inner bypass has the pair
    // in `apps`, the outer one sees it held and leaves it; the pair in
    // `proxy` is the outer one's.
    assert_eq!(
        summary_value(&inner_out, "bypass", "inserted"),
        2,
        "{inner_out}"
    );
    assert_eq!(
        summary_value(&outer_out, "bypass", "held_by_another_sockmap"),
        2,
        "{outer_out}"
    );
    assert_eq!(
        summary_value(&outer_out, "bypass", "inserted"),
        2,
        "{outer_out}"
    );
}

/// An observability agent's sockops program: it asks for the state
/// callbacks of every connection it sees start, and counts each socket's
/// TCP_CLOSE in `closes[0]`.
fn close_counting_sockops(closes: &OwnedFd) -> OwnedFd {
    const TCP_CONNECT_CB: i32 = 3;
    const STATE_CB: i32 = 10;
    const STATE_CB_FLAG: i32 = 4;
    const TCP_CLOSE: i32 = 7;
    const CB_FLAGS_SET: i32 = 59;
    const MAP_LOOKUP: i32 = 1;
    let map = closes.as_raw_fd();
    let program = [
        insn(0xbf, 6, 1, 0, 0),              // r6 = ctx
        insn(0x61, 2, 6, 0, 0),              // r2 = ctx->op
        insn(0x55, 2, 0, 4, TCP_CONNECT_CB), // if r2 != TCP_CONNECT_CB goto 7
        insn(0xbf, 1, 6, 0, 0),              // r1 = ctx
        insn(0xb7, 2, 0, 0, STATE_CB_FLAG),  // r2 = STATE_CB_FLAG
        insn(0x85, 0, 0, 0, CB_FLAGS_SET),   // bpf_sock_ops_cb_flags_set()
        insn(0x05, 0, 0, 12, 0),             // goto out
        insn(0x55, 2, 0, 11, STATE_CB),      // 7: if r2 != STATE_CB goto out
        insn(0x61, 2, 6, 8, 0),              // r2 = ctx->args[1], the new state
        insn(0x55, 2, 0, 9, TCP_CLOSE),      // if r2 != TCP_CLOSE goto out
        insn(0x62, 10, 0, -4, 0),            // *(u32 *)(fp - 4) = 0
        insn(0xbf, 2, 10, 0, 0),             // r2 = fp
        insn(0x07, 2, 0, 0, -4),             // r2 -= 4
        insn(0x18, 1, 1, 0, map),            // r1 = closes
        0,
        insn(0x85, 0, 0, 0, MAP_LOOKUP), // bpf_map_lookup_elem()
        insn(0x15, 0, 0, 2, 0),          // if !r0 goto out
        insn(0xb7, 1, 0, 0, 1),          // r1 = 1
        insn(0xdb, 0, 1, 0, 0),          // lock *(u64 *)r0 += r1
        insn(0xb7, 0, 0, 0, 1),          // out: r0 = 1
        insn(0x95, 0, 0, 0, 0),          // exit
    ];
    load_raw(
        libbpf_sys::BPF_PROG_TYPE_SOCK_OPS,
        None,
        c"their_closes",
        &program,
    )
}

#[test]
fn another_tools_state_callbacks_stay_on_for_the_sockets_redirect_handles() {
    let testbed = root_testbed!();
    let _server = servers::echo(&testbed.server, "[::]:80").unwrap();
    let redirector = testbed.redirect(&[]);
    // SAFETY: plain arguments; a NULL options pointer is allowed.
    let closes = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_ARRAY,
            c"their_counts".as_ptr(),
            4,
            8,
            1,
            std::ptr::null(),
        )
    };
    assert!(closes >= 0, "creating their map");
    // SAFETY: the kernel just returned this descriptor.
    let closes = unsafe { OwnedFd::from_raw_fd(closes) };
    // Attached after redirect's own sockops, in the same cgroup: theirs
    // runs second, and its ask for the callbacks changes nothing.
    let _theirs = CgroupProgram::attach_loaded(
        testbed.apps.path(),
        close_counting_sockops(&closes),
        libbpf_sys::BPF_CGROUP_SOCK_OPS,
        c"their_closes",
        libbpf_sys::BPF_F_ALLOW_MULTI,
    );
    let script = format!(
        "import socket\nfor i in range(20):\n    s = socket.create_connection(('{SERVER_V4}', 80), \
         timeout=10)\n    s.sendall(b'ping')\n    assert s.recv(100) == b'ping'\n    s.close()\n\
         print('done')"
    );
    python(testbed.in_apps(PYTHON), &script);
    wait_for_tcp_to_settle(&testbed.client);
    let mut count = 0u64;
    // SAFETY: a 4-byte key and an 8-byte value, as the map was created.
    let ret = unsafe {
        libbpf_sys::bpf_map_lookup_elem(
            closes.as_raw_fd(),
            (&0u32 as *const u32).cast(),
            (&mut count as *mut u64).cast(),
        )
    };
    assert_eq!(ret, 0);
    let (_, output, _) = redirector.stop();
    assert_eq!(
        summary_value(&output, "redirect", "original_destinations_answered"),
        20,
        "{output}"
    );
    assert_eq!(count, 20, "their program saw {count} of 20 closes");
    assert_maps_empty(&output);
}
