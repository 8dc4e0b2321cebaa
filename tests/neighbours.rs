//! Next to other tools' BPF programs on the same hooks: they keep seeing
//! their packets, their attachments stay theirs, and when one of them is
//! in our way we say so in one line.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::gateway::*;
use common::*;
use proxy_redirect::sys::netns::NetNs;

/// Another tool's TC program: `r0 = TCX_NEXT (-1); exit`, whose runs the
/// kernel counts while `Stats` is held.
struct Foreign {
    program: OwnedFd,
    /// tcx links; on a kernel without tcx, clsact filters instead, which
    /// go with the test's network namespace.
    links: Vec<OwnedFd>,
}

/// BPF_ENABLE_STATS: run counts are kept while this descriptor is open.
struct Stats(#[allow(dead_code)] OwnedFd);

impl Stats {
    fn enable() -> Stats {
        // SAFETY: a plain system call; a descriptor or a negative errno.
        let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
        assert!(
            fd >= 0,
            "BPF_ENABLE_STATS: {}",
            std::io::Error::from_raw_os_error(-fd)
        );
        // SAFETY: the kernel just returned this descriptor.
        Stats(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// The clsact priority of the foreign filter: between ours first (1) and
/// ours last (0xffff).
const FOREIGN_PRIORITY: u32 = 100;
const FOREIGN_HANDLE: u32 = 0xf0;

impl Foreign {
    fn load() -> Foreign {
        // mov r0, -1; exit
        let insns: [u64; 2] = [0xffff_ffff_0000_00b7, 0x95];
        // SAFETY: two complete instructions; the names are NUL-terminated.
        let fd = unsafe {
            libbpf_sys::bpf_prog_load(
                libbpf_sys::BPF_PROG_TYPE_SCHED_CLS,
                c"foreign_next".as_ptr(),
                c"GPL".as_ptr(),
                insns.as_ptr().cast(),
                insns.len() as _,
                std::ptr::null_mut(),
            )
        };
        assert!(
            fd >= 0,
            "loading the foreign program: {}",
            std::io::Error::from_raw_os_error(-fd)
        );
        Foreign {
            // SAFETY: the kernel just returned this descriptor.
            program: unsafe { OwnedFd::from_raw_fd(fd) },
            links: Vec::new(),
        }
    }

    /// Appends the program to `device` in `netns` (ingress, and egress
    /// too with `both`), as tools do by default: a tcx link, or a clsact
    /// filter on 6.1.
    fn attach(&mut self, netns: &NetNs, device: &str, both: bool) {
        let program = self.program.as_raw_fd();
        let device = device.to_owned();
        let directions = [
            (libbpf_sys::BPF_TCX_INGRESS, libbpf_sys::BPF_TC_INGRESS),
            (libbpf_sys::BPF_TCX_EGRESS, libbpf_sys::BPF_TC_EGRESS),
        ];
        let count = if both { 2 } else { 1 };
        let links = netns
            .spawn(move || {
                let ifindex = nix::net::if_::if_nametoindex(device.as_str())? as i32;
                let mut links = Vec::new();
                for (tcx, clsact) in directions.into_iter().take(count) {
                    if kernel::has_tcx() {
                        // SAFETY: plain descriptors, no options.
                        let fd = unsafe {
                            libbpf_sys::bpf_link_create(program, ifindex, tcx, std::ptr::null())
                        };
                        anyhow::ensure!(fd >= 0, "tcx: {}", std::io::Error::from_raw_os_error(-fd));
                        // SAFETY: the kernel just returned this descriptor.
                        links.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    } else {
                        clsact_filter(ifindex, clsact, program)?;
                    }
                }
                Ok(links)
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        self.links.extend(links);
    }

    fn runs(&self) -> u64 {
        let mut info = libbpf_sys::bpf_prog_info::default();
        let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
        // SAFETY: info is a complete bpf_prog_info of len bytes.
        let ret = unsafe {
            libbpf_sys::bpf_prog_get_info_by_fd(self.program.as_raw_fd(), &mut info, &mut len)
        };
        assert_eq!(ret, 0);
        info.run_cnt
    }
}

fn tc_hook(ifindex: i32, point: libbpf_sys::bpf_tc_attach_point) -> libbpf_sys::bpf_tc_hook {
    libbpf_sys::bpf_tc_hook {
        sz: std::mem::size_of::<libbpf_sys::bpf_tc_hook>() as _,
        ifindex,
        attach_point: point,
        ..Default::default()
    }
}

/// Another tool's clsact filter (creating the qdisc if need be).
fn clsact_filter(
    ifindex: i32,
    point: libbpf_sys::bpf_tc_attach_point,
    program: i32,
) -> anyhow::Result<()> {
    let mut hook = tc_hook(ifindex, point);
    // SAFETY: complete structs that outlive the calls; libbpf's messages
    // off (an existing qdisc is an expected answer).
    unsafe {
        libbpf_sys::libbpf_set_print(None);
        let created = libbpf_sys::bpf_tc_hook_create(&mut hook);
        anyhow::ensure!(created == 0 || created == -libc::EEXIST, "qdisc: {created}");
        let mut opts = libbpf_sys::bpf_tc_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_tc_opts>() as _,
            prog_fd: program,
            handle: FOREIGN_HANDLE,
            priority: FOREIGN_PRIORITY,
            ..Default::default()
        };
        let attached = libbpf_sys::bpf_tc_attach(&hook, &mut opts);
        anyhow::ensure!(attached == 0, "filter: {attached}");
    }
    Ok(())
}

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

fn curl_ok(testbed: &Testbed, url: &str) {
    let out = curl(testbed.in_client_netns("curl"), url, &[]);
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The foreign program's runs for `requests` requests to `url`.
fn runs_during(foreign: &Foreign, testbed: &Testbed, url: &str, requests: usize) -> u64 {
    let before = foreign.runs();
    for _ in 0..requests {
        curl_ok(testbed, url);
    }
    foreign.runs() - before
}

#[test]
fn another_tools_tc_program_sees_every_packet_before_and_after_port_nat() {
    if !have_root() {
        return;
    }
    let _stats = Stats::enable();
    let testbed = Testbed::new();
    let _server = servers::http(&testbed.server, "[::]:80").unwrap();
    let mut foreign = Foreign::load();
    foreign.attach(&testbed.server, "veth-s", true);
    // Without us: what it sees of 20 requests straight to port 80.
    let alone = runs_during(&foreign, &testbed, &format!("http://{SERVER_V4}/"), 20);
    assert!(alone >= 20 * 8, "{alone} runs for 20 requests");
    for order in ["first", "last"] {
        let nat = Running::start(
            BIN,
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
            ]
            .map(String::from),
            Some(&testbed.server),
            None,
            "Attached",
        );
        let url = format!("http://{SERVER_V4}:8080/");
        let with_us = runs_during(&foreign, &testbed, &url, 20);
        let (status, output, stderr) = nat.stop();
        assert!(status.success(), "{stderr}");
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
    if !have_root() {
        return;
    }
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
    let seen = foreign.runs() - before;
    let (status, output, stderr) = tproxy.stop();
    assert!(status.success(), "{stderr}");
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
    if !have_root() {
        return;
    }
    let testbed = Testbed::new();
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
    ]
    .map(String::from);
    // Port-nat creates the qdisc, the other tool adds its filters after.
    let nat = Running::start(BIN, &nat_args, Some(&testbed.server), None, "Attached");
    testbed
        .server
        .spawn(move || {
            let ifindex = nix::net::if_::if_nametoindex("veth-s")? as i32;
            clsact_filter(ifindex, libbpf_sys::BPF_TC_INGRESS, program)?;
            clsact_filter(ifindex, libbpf_sys::BPF_TC_EGRESS, program)
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    let (status, _, stderr) = nat.stop();
    assert!(status.success(), "{stderr}");
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
    let nat = Running::start(BIN, &nat_args, Some(&testbed.server), None, "Attached");
    let (status, _, stderr) = nat.stop();
    assert!(status.success(), "{stderr}");
    assert!(has_clsact(&testbed.server, "veth-s"));
    assert!(tc_filters(&testbed.server, "veth-s", "ingress").contains("foreign_next"));
}
