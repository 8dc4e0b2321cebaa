//! `port-nat` against the real kernel: crafted packets through
//! BPF_PROG_TEST_RUN (fixtures and randomized), then real traffic over `lo`
//! in a private netns and across a veth pair between two namespaces.

mod common;

use std::mem::MaybeUninit;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::packet::*;
use common::*;
use libbpf_rs::{OpenObject, ProgramInput};
use proxy_redirect::bpf::maps;
use proxy_redirect::bpf::port_nat::types::{nat_flow, nat_flow_key, nat_flow_state, nat_stat};
use proxy_redirect::bpf::port_nat::PortNatSkel;
use proxy_redirect::datapath::port_nat::{self, Mapping, NatConfig, Protocols};
use proxy_redirect::sys::netns::{self, NetNs};

/// TCX_NEXT (TC_ACT_UNSPEC on clsact): every packet the program does not
/// drop goes on to the programs behind it.
const TC_NEXT: u32 = -1i32 as u32;
const C4: &str = "192.0.2.1";
const S4: &str = "198.51.100.2";
const C6: &str = "2001:db8::1";
const S6: &str = "2001:db8:1::2";

fn mappings() -> Vec<Mapping> {
    vec![
        Mapping { from: 8080, to: 80 },
        Mapping {
            from: 5300,
            to: 5353,
        },
    ]
}

fn load(
    object: &mut MaybeUninit<OpenObject>,
    protocols: Protocols,
    max_flows: u32,
) -> PortNatSkel<'_> {
    let config = NatConfig {
        mappings: mappings(),
        protocols,
        max_flows,
        events: false,
        ends_chain: false,
    };
    port_nat::load(&config, object, None).expect("loading port-nat")
}

/// Runs a program on a frame: (verdict, output frame).
fn test_run(program: &libbpf_rs::ProgramMut<'_>, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let input = ProgramInput {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let output = program
        .test_run(input)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {}: {e}", hex(frame)));
    let len = output.data.as_ref().map_or(0, |d| d.len());
    let verdict = output.return_value;
    out.truncate(len);
    (verdict, out)
}

fn ingress(skel: &PortNatSkel<'_>, frame: &[u8]) -> (u32, Vec<u8>) {
    test_run(&skel.progs.port_nat_ingress, frame)
}

fn egress(skel: &PortNatSkel<'_>, frame: &[u8]) -> (u32, Vec<u8>) {
    test_run(&skel.progs.port_nat_egress, frame)
}

fn counter(skel: &PortNatSkel<'_>, stat: nat_stat) -> u64 {
    port_nat::counters(skel).unwrap()[stat.0 as usize]
}

fn flows(skel: &PortNatSkel<'_>) -> Vec<(nat_flow_key, nat_flow)> {
    maps::entries(&skel.maps.flows).unwrap()
}

/// The packet goes through `run` and comes out exactly as `expected`
/// (checksums included), with valid checksums.
fn assert_rewritten(
    what: &str,
    run: impl Fn(&[u8]) -> (u32, Vec<u8>),
    input: &Packet,
    expected: &Packet,
) {
    let frame = input.build();
    verify_checksums(&frame)
        .unwrap_or_else(|e| panic!("{what}: the builder made a bad frame: {e}"));
    let (verdict, out) = run(&frame);
    assert_eq!(verdict, TC_NEXT, "{what}: verdict");
    assert_eq!(
        hex(&out),
        hex(&expected.build()),
        "{what}: output bytes (got / expected)"
    );
    verify_checksums(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn assert_unchanged(what: &str, run: impl Fn(&[u8]) -> (u32, Vec<u8>), frame: &[u8]) {
    let (verdict, out) = run(frame);
    assert_eq!(verdict, TC_NEXT, "{what}: verdict");
    assert_eq!(hex(&out), hex(frame), "{what}: the packet changed");
}

/// BPF_PROG_TEST_RUN refuses (EINVAL) IPv4 and IPv6 frames shorter than
/// their fixed IP header, before any program runs.
fn kernel_accepts(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.len() >= ETH_HLEN + 20,
        Some([0x86, 0xdd]) => frame.len() >= ETH_HLEN + 40,
        _ => frame.len() >= ETH_HLEN,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn fixtures_translate_tcp_and_udp_over_ipv4_and_ipv6() {
    require_root!();
    let mut object = MaybeUninit::uninit();
    let skel = load(&mut object, Protocols::All, 1024);
    let run = |f: &[u8]| ingress(&skel, f);

    let syn = Packet::tcp(C4, 40000, S4, 8080, TCP_SYN);
    assert_rewritten(
        "TCP SYN v4",
        run,
        &syn,
        &Packet {
            dst_port: 80,
            ..syn.clone()
        },
    );

    // IP options: router alert, a timestamp option and padding (ihl 9).
    let mut with_options =
        Packet::tcp(C4, 40001, S4, 8080, TCP_ACK | TCP_PSH).with_payload(b"GET / HTTP/1.1\r\n\r\n");
    with_options.ip_options = vec![148, 4, 0, 0, 68, 12, 5, 0, 1, 2, 3, 4, 1, 1, 1];
    assert_rewritten(
        "TCP v4 with IP options",
        run,
        &with_options,
        &Packet {
            dst_port: 80,
            ..with_options.clone()
        },
    );

    let syn6 = Packet::tcp(C6, 40002, S6, 8080, TCP_SYN);
    assert_rewritten(
        "TCP SYN v6",
        run,
        &syn6,
        &Packet {
            dst_port: 80,
            ..syn6.clone()
        },
    );

    let mut ext6 = Packet::udp(C6, 40003, S6, 5300).with_payload(b"query");
    ext6.ipv6_ext = vec![
        Ext::HopByHop(0),
        Ext::DestOpts(1),
        Ext::Routing(0),
        Ext::Fragment {
            offset: 0,
            more: false,
        },
        Ext::Auth(4),
    ];
    assert_rewritten(
        "UDP v6 behind five extension headers",
        run,
        &ext6,
        &Packet {
            dst_port: 5353,
            ..ext6.clone()
        },
    );

    let udp = Packet::udp(C4, 40004, S4, 5300).with_payload(&payload(300, 1));
    assert_rewritten(
        "UDP v4",
        run,
        &udp,
        &Packet {
            dst_port: 5353,
            ..udp.clone()
        },
    );

    let zero = Packet {
        udp_zero_checksum: true,
        ..Packet::udp(C4, 40005, S4, 5300).with_payload(b"no checksum")
    };
    let (_, out) = run(&zero.build());
    assert_eq!(
        &out[out.len() - 11 - 2..out.len() - 11],
        &[0, 0],
        "a zero UDP checksum stays zero"
    );
    assert_rewritten(
        "UDP v4 with a zero checksum",
        run,
        &zero,
        &Packet {
            dst_port: 5353,
            ..zero.clone()
        },
    );

    // A first fragment carries the L4 header: translated, and its checksum
    // (over the whole datagram) updated incrementally.
    let first = Packet {
        more_fragments: true,
        ..Packet::udp(C4, 40006, S4, 5300).with_payload(&payload(64, 2))
    };
    assert_rewritten(
        "UDP v4 first fragment",
        run,
        &first,
        &Packet {
            dst_port: 5353,
            ..first.clone()
        },
    );
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_INGRESS_TRANSLATED), 8);
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_NEW_FLOWS), 7);
}

#[test]
fn fixtures_leave_other_packets_alone() {
    require_root!();
    let mut object = MaybeUninit::uninit();
    let skel = load(&mut object, Protocols::All, 1024);
    let run = |f: &[u8]| ingress(&skel, f);

    assert_unchanged(
        "TCP to another port",
        run,
        &Packet::tcp(C4, 40000, S4, 8081, TCP_SYN).build(),
    );
    assert_unchanged(
        "UDP to another port v6",
        run,
        &Packet::udp(C6, 40000, S6, 53).build(),
    );
    // A later fragment: its first bytes look like ports 40000 -> 8080 but
    // are data.
    let later = Packet {
        frag_offset: 185,
        ..Packet::udp(C4, 40000, S4, 8080)
    };
    assert_unchanged("IPv4 later fragment", run, &later.build());
    let mut later6 = Packet::tcp(C6, 40000, S6, 8080, TCP_ACK);
    later6.ipv6_ext = vec![Ext::Fragment {
        offset: 100,
        more: true,
    }];
    assert_unchanged("IPv6 later fragment", run, &later6.build());
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_PASS_FRAGMENT), 2);

    // Truncated and malformed headers.
    let syn = Packet::tcp(C4, 40000, S4, 8080, TCP_SYN).build();
    assert_unchanged("cut in the TCP header", run, &syn[..ETH_HLEN + 20 + 10]);
    let mut long_ihl = syn.clone();
    long_ihl[ETH_HLEN] = 0x4f; // 40 bytes of options the frame does not have
    assert_unchanged("cut in the IPv4 options", run, &long_ihl[..ETH_HLEN + 30]);
    let mut short_total = syn.clone();
    short_total[ETH_HLEN + 3] = 30; // total length 30: no room for TCP
    assert_unchanged("IPv4 total length too short", run, &short_total);
    let mut bad_ihl = syn.clone();
    bad_ihl[ETH_HLEN] = 0x44;
    assert_unchanged("IPv4 ihl of 4", run, &bad_ihl);
    let mut ext6 = Packet::tcp(C6, 40000, S6, 8080, TCP_SYN);
    ext6.ipv6_ext = vec![Ext::HopByHop(2)];
    let ext6 = ext6.build();
    assert_unchanged(
        "cut in an IPv6 extension header",
        run,
        &ext6[..ETH_HLEN + 40 + 12],
    );
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_PASS_TRUNCATED), 5);

    let mut esp = Packet::udp(C6, 40000, S6, 5300);
    esp.ipv6_ext = vec![Ext::Esp];
    assert_unchanged("IPv6 ESP", run, &esp.build());
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_PASS_UNPARSED), 1);

    assert_eq!(counter(&skel, nat_stat::NAT_STAT_INGRESS_TRANSLATED), 0);
    assert!(flows(&skel).is_empty());

    // --proto tcp leaves UDP alone.
    let mut object = MaybeUninit::uninit();
    let tcp_only = load(&mut object, Protocols::Tcp, 1024);
    assert_unchanged(
        "UDP with --proto tcp",
        |f| ingress(&tcp_only, f),
        &Packet::udp(C4, 40000, S4, 8080).build(),
    );
}

#[test]
fn fixtures_replies_are_rewritten_only_for_tracked_flows() {
    require_root!();
    let mut object = MaybeUninit::uninit();
    let skel = load(&mut object, Protocols::All, 1024);
    let run_in = |f: &[u8]| ingress(&skel, f);
    let run_out = |f: &[u8]| egress(&skel, f);

    for (client, server) in [(C4, S4), (C6, S6)] {
        let syn = Packet::tcp(client, 41000, server, 8080, TCP_SYN);
        let (verdict, _) = run_in(&syn.build());
        assert_eq!(verdict, TC_NEXT);
        let tracked = flows(&skel);
        let (key, flow) = tracked
            .iter()
            .find(|(k, _)| u16::from_be(k.client_port) == 41000 && k.family == family(client))
            .expect("the SYN created a flow");
        assert_eq!(u16::from_be(key.server_port), 80, "keyed by TO");
        assert_eq!(u16::from_be(flow.original_port), 8080);
        assert_eq!(flow.state, nat_flow_state::FLOW_TCP_SYN_SENT.0 as u8);

        // The server's SYN-ACK from :80 leaves as :8080.
        let synack = Packet {
            src_port: 80,
            ..syn.reply(TCP_SYN | TCP_ACK)
        };
        assert_rewritten(
            "reply of a tracked flow",
            run_out,
            &synack,
            &Packet {
                src_port: 8080,
                ..synack.clone()
            },
        );
        assert_eq!(
            state_of(&skel, 41000, family(client)),
            Some(nat_flow_state::FLOW_TCP_ESTABLISHED.0 as u8)
        );

        // A reply from :80 to a port with no flow: a direct client.
        let untracked = Packet::tcp(server, 80, client, 41001, TCP_SYN | TCP_ACK);
        assert_unchanged("reply of an untracked flow", run_out, &untracked.build());

        // The client's FIN moves the flow to closing.
        let fin = Packet::tcp(client, 41000, server, 8080, TCP_FIN | TCP_ACK);
        run_in(&fin.build());
        assert_eq!(
            state_of(&skel, 41000, family(client)),
            Some(nat_flow_state::FLOW_TCP_CLOSING.0 as u8)
        );

        // The client reuses the tuple to talk to :80 directly: the flow is
        // over, and the direct connection's replies go out untouched.
        let direct = Packet::tcp(client, 41000, server, 80, TCP_SYN);
        assert_unchanged("direct SYN to TO", run_in, &direct.build());
        assert_eq!(state_of(&skel, 41000, family(client)), None);
        assert_unchanged(
            "reply on a direct connection",
            run_out,
            &direct.reply(TCP_SYN | TCP_ACK).build(),
        );
    }
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_EGRESS_TRANSLATED), 2);
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_DIRECT_STALE), 2);
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_REPLY_UNTRACKED), 4);

    // UDP: the reply to a connected socket must come from the port it sent to.
    let query = Packet::udp(C4, 42000, S4, 5300).with_payload(b"ping");
    run_in(&query.build());
    let answer = Packet {
        src_port: 5353,
        ..query.reply(0)
    };
    assert_rewritten(
        "UDP reply of a tracked flow",
        run_out,
        &answer,
        &Packet {
            src_port: 5300,
            ..answer.clone()
        },
    );
}

#[test]
fn fixtures_only_evidence_ends_a_flow_and_a_spoofed_ack_does_not() {
    require_root!();
    let mut object = MaybeUninit::uninit();
    let skel = load(&mut object, Protocols::All, 1024);
    let run_in = |f: &[u8]| ingress(&skel, f);
    let run_out = |f: &[u8]| egress(&skel, f);

    for (client, server) in [(C4, S4), (C6, S6)] {
        let fam = family(client);
        let syn = Packet::tcp(client, 43000, server, 8080, TCP_SYN).with_seq(1_000_000);
        run_in(&syn.build());
        run_in(
            &Packet::tcp(client, 43000, server, 8080, TCP_ACK)
                .with_seq(1_000_001)
                .build(),
        );
        let established = Some(nat_flow_state::FLOW_TCP_ESTABLISHED.0 as u8);
        assert_eq!(state_of(&skel, 43000, fam), established);

        // Straight to :80 from the client's tuple: an ACK with any sequence
        // number, a RST and a FIN far from the client's, a UDP datagram.
        for (what, flags, seq) in [
            ("spoofed ACK", TCP_ACK, 0x8000_0000),
            ("spoofed ACK near the window", TCP_ACK | TCP_PSH, 1_000_001),
            ("RST out of window", TCP_RST, 1_000_001 + (3 << 20)),
            (
                "FIN out of window",
                TCP_FIN | TCP_ACK,
                1_000_001u32.wrapping_sub(3 << 20),
            ),
        ] {
            let spoofed = Packet::tcp(client, 43000, server, 80, flags).with_seq(seq);
            assert_unchanged(what, run_in, &spoofed.build());
            assert_eq!(
                state_of(&skel, 43000, fam),
                established,
                "{what} ended the flow"
            );
        }
        // Forged packets via :8080 far from the client's sequence numbers
        // are delivered, but neither close the flow nor move its window: a
        // RST straight to :80 near the forged number is still no evidence.
        for (what, flags) in [
            ("forged ACK via FROM", TCP_ACK),
            ("forged RST via FROM", TCP_RST),
        ] {
            let forged = Packet::tcp(client, 43000, server, 8080, flags).with_seq(0x9000_0000);
            let (verdict, _) = run_in(&forged.build());
            assert_eq!(verdict, TC_NEXT, "{what}");
            assert_eq!(
                state_of(&skel, 43000, fam),
                established,
                "{what} changed the state"
            );
        }
        let rst = Packet::tcp(client, 43000, server, 80, TCP_RST).with_seq(0x9000_0000);
        assert_unchanged("RST near a forged sequence number", run_in, &rst.build());
        assert_eq!(state_of(&skel, 43000, fam), established);

        // The server's next segment still leaves as :8080.
        let data = Packet::tcp(server, 80, client, 43000, TCP_ACK | TCP_PSH).with_payload(b"data");
        assert_rewritten(
            "reply after spoofed packets",
            run_out,
            &data,
            &Packet {
                src_port: 8080,
                ..data.clone()
            },
        );

        // A RST near the client's sequence numbers is evidence.
        let rst = Packet::tcp(client, 43000, server, 80, TCP_RST).with_seq(1_000_001 + 70_000);
        assert_unchanged("in-window RST", run_in, &rst.build());
        assert_eq!(state_of(&skel, 43000, fam), None);

        // So is an in-window FIN, and a new SYN.
        run_in(&syn.build());
        let fin = Packet::tcp(client, 43000, server, 80, TCP_FIN | TCP_ACK).with_seq(999_000);
        assert_unchanged("in-window FIN", run_in, &fin.build());
        assert_eq!(state_of(&skel, 43000, fam), None);
        run_in(&syn.build());
        let direct_syn = Packet::tcp(client, 43000, server, 80, TCP_SYN).with_seq(7);
        assert_unchanged("direct SYN", run_in, &direct_syn.build());
        assert_eq!(state_of(&skel, 43000, fam), None);
    }
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_DIRECT_IGNORED), 10);
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_OUT_OF_WINDOW), 4);
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_DIRECT_STALE), 6);

    // UDP carries no evidence: a datagram straight to TO leaves the flow.
    run_in(&Packet::udp(C4, 44000, S4, 5300).build());
    assert_unchanged(
        "direct UDP",
        run_in,
        &Packet::udp(C4, 44000, S4, 5353).build(),
    );
    assert_eq!(
        state_of(&skel, 44000, 2),
        Some(nat_flow_state::FLOW_UDP.0 as u8)
    );
}

#[test]
fn fixtures_replies_to_local_sockets_are_left_alone() {
    require_root!();
    let ns = lo_netns();
    ns.spawn(|| {
        let mut object = MaybeUninit::uninit();
        let skel = load(&mut object, Protocols::All, 1024);
        let run_in = |f: &[u8]| ingress(&skel, f);
        // This host's own connections whose local port is a FROM: TCP from
        // 127.0.0.1:8080 and [::1]:8080, connected UDP from 127.0.0.1:5300.
        let listener4 = std::net::TcpListener::bind("127.0.0.1:9000")?;
        let listener6 = std::net::TcpListener::bind("[::1]:9000")?;
        let tcp4 = bound_tcp_connect("127.0.0.1:8080", "127.0.0.1:9000")?;
        let tcp6 = bound_tcp_connect("[::1]:8080", "[::1]:9000")?;
        let udp = UdpSocket::bind("127.0.0.1:5300")?;
        udp.connect("127.0.0.1:9000")?;
        let (_a, _) = listener4.accept()?;
        let (_b, _) = listener6.accept()?;

        for (what, packet) in [
            (
                "SYN-ACK to a local connect()",
                Packet::tcp("127.0.0.1", 9000, "127.0.0.1", 8080, TCP_SYN | TCP_ACK),
            ),
            (
                "data to a local connection",
                Packet::tcp("127.0.0.1", 9000, "127.0.0.1", 8080, TCP_ACK | TCP_PSH)
                    .with_payload(b"x"),
            ),
            (
                "IPv6 data to a local connection",
                Packet::tcp("::1", 9000, "::1", 8080, TCP_ACK),
            ),
            (
                "datagram to a connected UDP socket",
                Packet::udp("127.0.0.1", 9000, "127.0.0.1", 5300),
            ),
        ] {
            assert_unchanged(what, run_in, &packet.build());
        }
        assert_eq!(counter(&skel, nat_stat::NAT_STAT_PASS_LOCAL), 4);
        assert!(flows(&skel).is_empty(), "a local connection got a flow");

        // Another peer of the same FROM is a client: translated, and so is
        // a client where a listener holds FROM (a listener has no peer).
        let client = Packet::tcp("127.0.0.1", 9001, "127.0.0.1", 8080, TCP_SYN);
        assert_rewritten(
            "a client of FROM next to a local connection",
            run_in,
            &client,
            &Packet {
                dst_port: 80,
                ..client.clone()
            },
        );
        let listener = std::net::TcpListener::bind("127.0.0.2:8080")?;
        let to_listener = Packet::tcp("127.0.0.1", 9002, "127.0.0.2", 8080, TCP_SYN);
        assert_rewritten(
            "a client of FROM where something listens on FROM",
            run_in,
            &to_listener,
            &Packet {
                dst_port: 80,
                ..to_listener.clone()
            },
        );
        drop((tcp4, tcp6, udp, listener));
        Ok(())
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap();
}

/// A TCP connection from a chosen local address and port.
fn bound_tcp_connect(local: &str, peer: &str) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    use std::os::fd::{AsRawFd, OwnedFd};
    let local: SocketAddr = local.parse().unwrap();
    let peer: SocketAddr = peer.parse().unwrap();
    let family = if local.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(family, SockType::Stream, SockFlag::empty(), None)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(peer))?;
    Ok(std::net::TcpStream::from(fd))
}

#[test]
fn fixtures_translate_on_l3_devices() {
    require_root!();
    let mut object = MaybeUninit::uninit();
    let mut skel = load(&mut object, Protocols::All, 1024);
    port_nat::set_l2_header(&mut skel, false).unwrap();
    let l3 = |packet: &Packet| packet.build()[ETH_HLEN..].to_vec();
    for (client, server) in [(C4, S4), (C6, S6)] {
        for query in [
            Packet::tcp(client, 45000, server, 8080, TCP_SYN),
            Packet::udp(client, 45001, server, 5300).with_payload(b"query"),
        ] {
            let (verdict, out) = ingress(&skel, &l3(&query));
            assert_eq!(verdict, TC_NEXT);
            let translated = Packet {
                dst_port: if query.protocol == IPPROTO_TCP {
                    80
                } else {
                    5353
                },
                ..query.clone()
            };
            assert_eq!(
                hex(&out),
                hex(&l3(&translated)),
                "{client} ingress, tun framing"
            );
            verify_checksums(&with_ethernet(&out)).unwrap();
            let reply = translated.reply(TCP_SYN | TCP_ACK);
            let (_, out) = egress(&skel, &l3(&reply));
            let expected = Packet {
                src_port: query.dst_port,
                ..reply.clone()
            };
            assert_eq!(
                hex(&out),
                hex(&l3(&expected)),
                "{client} egress, tun framing"
            );
            verify_checksums(&with_ethernet(&out)).unwrap();
        }
    }
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_INGRESS_TRANSLATED), 4);
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_EGRESS_TRANSLATED), 4);
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_PASS_TRUNCATED), 0);
}

/// An ICMP error through `run`: it comes out as `expected`, every checksum
/// right, the quoted packet exactly `quoted_expected`.
fn assert_icmp_rewritten(
    what: &str,
    run: impl Fn(&[u8]) -> (u32, Vec<u8>),
    input: &Packet,
    expected: &Packet,
    quoted_expected: &[u8],
) {
    let frame = input.build();
    verify_icmp_error(&frame)
        .unwrap_or_else(|e| panic!("{what}: the builder made a bad frame: {e}"));
    let (verdict, out) = run(&frame);
    assert_eq!(verdict, TC_NEXT, "{what}: verdict");
    assert_eq!(hex(&out), hex(&expected.build()), "{what}: output bytes");
    let quoted = verify_icmp_error(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(hex(&quoted), hex(quoted_expected), "{what}: quoted packet");
}

#[test]
fn fixtures_icmp_errors_about_translated_flows_are_translated() {
    require_root!();
    let mut object = MaybeUninit::uninit();
    let skel = load(&mut object, Protocols::All, 1024);
    let run_in = |f: &[u8]| ingress(&skel, f);
    let run_out = |f: &[u8]| egress(&skel, f);
    let ip = |frame: &[u8]| frame[ETH_HLEN..].to_vec();
    let router = |client: &str| {
        if client == C4 {
            "203.0.113.9"
        } else {
            "2001:db8:2::9"
        }
    };
    for (client, server) in [(C4, S4), (C6, S6)] {
        let (port_unreachable, frag_needed) = if client == C4 {
            ((3u8, 3u8), (3u8, 4u8))
        } else {
            ((1u8, 4u8), (2u8, 0u8))
        };
        // A UDP query to :5300 reached the server as :5353, where nothing
        // listens: its port-unreachable must name 5300 again.
        let query = Packet::udp(client, 46000, server, 5300).with_payload(b"query?");
        let (_, seen_by_server) = run_in(&query.build());
        let error = Packet::icmp_error(server, client, port_unreachable, &ip(&seen_by_server));
        assert_icmp_rewritten(
            "port unreachable about a UDP query",
            run_out,
            &error,
            &Packet::icmp_error(server, client, port_unreachable, &ip(&query.build())),
            &ip(&query.build()),
        );
        // The same with a zero ("none") UDP checksum, IPv4 only: the ICMP
        // checksum takes the change.
        if client == C4 {
            let bare = Packet {
                udp_zero_checksum: true,
                ..query.clone()
            };
            let (_, seen) = run_in(&bare.build());
            let error = Packet::icmp_error(server, client, port_unreachable, &ip(&seen));
            assert_icmp_rewritten(
                "port unreachable about a checksum-less query",
                run_out,
                &error,
                &Packet::icmp_error(server, client, port_unreachable, &ip(&bare.build())),
                &ip(&bare.build()),
            );
        }

        // TCP: the server's reply left as :8080; a router on the way says
        // it is too big. The server's socket is on :80.
        let syn = Packet::tcp(client, 46001, server, 8080, TCP_SYN);
        run_in(&syn.build());
        let reply =
            Packet::tcp(server, 80, client, 46001, TCP_ACK | TCP_PSH).with_payload(&[7u8; 64]);
        let (_, on_the_wire) = run_out(&reply.build());
        let error = Packet::icmp_error(router(client), server, frag_needed, &ip(&on_the_wire));
        assert_icmp_rewritten(
            "fragmentation needed about a reply",
            run_in,
            &error,
            &Packet::icmp_error(router(client), server, frag_needed, &ip(&reply.build())),
            &ip(&reply.build()),
        );
        // Quoting only 8 bytes of TCP (the RFC 792 minimum): no TCP
        // checksum to fix, the ICMP checksum takes the change.
        let short = |frame: &[u8]| {
            let inner = ip(frame);
            let l4 = if client == C4 { 20 } else { 40 };
            inner[..l4 + 8].to_vec()
        };
        let error = Packet::icmp_error(router(client), server, frag_needed, &short(&on_the_wire));
        assert_icmp_rewritten(
            "fragmentation needed quoting 8 bytes",
            run_in,
            &error,
            &Packet::icmp_error(router(client), server, frag_needed, &short(&reply.build())),
            &short(&reply.build()),
        );

        // Errors about untracked traffic pass unchanged.
        let direct = Packet::udp(client, 46002, server, 5353);
        let error = Packet::icmp_error(server, client, port_unreachable, &ip(&direct.build()));
        assert_unchanged("error about a direct client", run_out, &error.build());
        let error = Packet::icmp_error(
            router(client),
            server,
            frag_needed,
            &ip(&reply.reply(TCP_ACK).build()),
        );
        assert_unchanged("error about a packet to the server", run_in, &error.build());
    }
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_ICMP_TRANSLATED), 7);
}

fn family(addr: &str) -> u8 {
    if addr.contains(':') {
        10
    } else {
        2
    }
}

fn state_of(skel: &PortNatSkel<'_>, client_port: u16, family: u8) -> Option<u8> {
    flows(skel)
        .iter()
        .find(|(k, _)| u16::from_be(k.client_port) == client_port && k.family == family)
        .map(|(_, f)| f.state)
}

/// A valid random TCP/UDP packet, now and then to a mapped port.
fn random_packet(rng: &mut Rng) -> Packet {
    let v6 = rng.chance(50);
    let (src, dst) = if v6 { (C6, S6) } else { (C4, S4) };
    let any = rng.below(65536) as u16;
    let dst_port = *rng.pick(&[8080, 5300, 80, 5353, 8081, any]);
    let src_port = rng.below(65536) as u16;
    let mut packet = if rng.chance(50) {
        Packet::tcp(src, src_port, dst, dst_port, rng.next() as u8)
    } else {
        let mut udp = Packet::udp(src, src_port, dst, dst_port);
        udp.udp_zero_checksum = !v6 && rng.chance(10);
        udp
    };
    let payload_len = rng.below(300) as usize;
    packet.payload = rng.bytes(payload_len);
    if v6 {
        for _ in 0..rng.below(4) {
            let ext = match rng.below(5) {
                0 => Ext::HopByHop(rng.below(3) as u8),
                1 => Ext::DestOpts(rng.below(3) as u8),
                2 => Ext::Routing(rng.below(2) as u8),
                3 => Ext::Auth(rng.below(4) as u8 * 2),
                _ => Ext::Fragment {
                    offset: if rng.chance(20) {
                        1 + rng.below(100) as u16
                    } else {
                        0
                    },
                    more: rng.chance(30),
                },
            };
            packet.ipv6_ext.push(ext);
        }
    } else {
        let words = rng.below(11) as usize;
        packet.ip_options = rng.bytes(words * 4);
        if rng.chance(10) {
            packet.frag_offset = 1 + rng.below(1000) as u16;
        }
        packet.more_fragments = rng.chance(10);
    }
    packet
}

/// Corrupts a frame: truncates it, changes length fields, flips bytes.
fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(3) {
        match rng.below(4) {
            0 => {
                let len = ETH_HLEN + rng.below((frame.len() - ETH_HLEN) as u64 + 1) as usize;
                frame.truncate(len);
            }
            1 if frame.len() > ETH_HLEN + 6 => {
                // IPv4 ihl/total length, IPv6 payload length, UDP length.
                let at = *rng.pick(&[
                    ETH_HLEN,
                    ETH_HLEN + 2,
                    ETH_HLEN + 3,
                    ETH_HLEN + 4,
                    ETH_HLEN + 5,
                ]);
                frame[at] = rng.next() as u8;
            }
            _ => {
                let at = ETH_HLEN + rng.below((frame.len() - ETH_HLEN).max(1) as u64) as usize;
                if at < frame.len() {
                    frame[at] = rng.next() as u8;
                }
            }
        }
    }
    frame
}

/// What ingress must do to a frame, from the software parser: the new
/// destination port, or None to leave it alone.
fn expected_ingress(frame: &[u8]) -> Option<u16> {
    let parsed = parse(frame)?;
    mappings()
        .iter()
        .find(|m| m.from == parsed.dst_port)
        .map(|m| m.to)
}

/// Checks one ingress run against the model: only the destination port and
/// the L4 checksum may change, valid checksums stay valid.
fn check_ingress(what: &str, frame: &[u8], verdict: u32, out: &[u8]) {
    assert_eq!(verdict, TC_NEXT, "{what}: verdict for {}", hex(frame));
    assert_eq!(out.len(), frame.len(), "{what}: length changed");
    let Some(to) = expected_ingress(frame) else {
        assert_eq!(
            hex(out),
            hex(frame),
            "{what}: an untranslatable packet changed"
        );
        return;
    };
    let parsed = parse(frame).unwrap();
    let port_at = parsed.l4_off + 2;
    let csum_at = parsed.csum_off();
    assert_eq!(
        &out[port_at..port_at + 2],
        &to.to_be_bytes(),
        "{what}: new port"
    );
    for (i, (a, b)) in frame.iter().zip(out).enumerate() {
        if a != b && !(port_at..port_at + 2).contains(&i) && !(csum_at..csum_at + 2).contains(&i) {
            panic!(
                "{what}: byte {i} changed\n in:  {}\n out: {}",
                hex(frame),
                hex(out)
            );
        }
    }
    if verify_checksums(frame).is_ok() {
        verify_checksums(out).unwrap_or_else(|e| panic!("{what}: {e}\n in: {}", hex(frame)));
    }
}

#[test]
fn randomized_and_mutated_packets_never_break_the_program_or_a_checksum() {
    require_root!();
    let mut object = MaybeUninit::uninit();
    let skel = load(&mut object, Protocols::All, 4096);
    let mut rng = Rng::new(0x5052_4e41);
    let (mut translated, mut refused) = (0, 0);
    for i in 0..4000 {
        let packet = random_packet(&mut rng);
        let frame = packet.build();
        let (verdict, out) = ingress(&skel, &frame);
        check_ingress(&format!("valid packet {i}"), &frame, verdict, &out);
        if out != frame {
            translated += 1;
            let parsed = parse(&out).unwrap();
            if !parsed.fragment {
                verify_checksums(&out).unwrap_or_else(|e| panic!("valid packet {i}: {e}"));
            }
            // Its reply leaves with the original port again.
            let to = parsed.dst_port;
            let reply = Packet {
                src_port: to,
                ..packet.reply(TCP_ACK)
            };
            let (verdict, back) = egress(&skel, &reply.build());
            assert_eq!(verdict, TC_NEXT);
            let back_parsed = parse(&back).unwrap();
            assert_eq!(
                back_parsed.src_port, packet.dst_port,
                "reply {i}: source port"
            );
            if !back_parsed.fragment {
                verify_checksums(&back).unwrap_or_else(|e| panic!("reply {i}: {e}"));
            }
        }

        let mutated = mutate(&mut rng, frame);
        if !kernel_accepts(&mutated) {
            refused += 1;
            continue;
        }
        let (verdict, out) = ingress(&skel, &mutated);
        check_ingress(&format!("mutated packet {i}"), &mutated, verdict, &out);
        let (verdict, _) = egress(&skel, &mutated);
        assert_eq!(verdict, TC_NEXT, "egress verdict for mutated packet {i}");

        let noise_len = ETH_HLEN + rng.below(120) as usize;
        let noise = rng.bytes(noise_len);
        if !kernel_accepts(&noise) {
            continue;
        }
        let (verdict, out) = ingress(&skel, &noise);
        check_ingress(&format!("random bytes {i}"), &noise, verdict, &out);
    }
    assert!(
        translated > 500,
        "only {translated} packets were translated"
    );
    assert!(refused < 1000, "{refused} mutated frames too short to run");
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_DROP_REWRITE_FAILED), 0);
    assert_eq!(counter(&skel, nat_stat::NAT_STAT_DROP_TRACK_FAILED), 0);
}

// ---------------------------------------------------------------------
// End to end: real clients and servers in private namespaces.

fn port_nat(netns: &NetNs, args: &[&str]) -> Running {
    let mut full = vec!["port-nat".to_owned()];
    full.extend(args.iter().map(|a| a.to_string()));
    Running::start(BIN, &full, Some(netns), None, "Attached")
}

fn in_netns(netns: &NetNs, program: &str, args: &[&str]) -> std::process::Output {
    let mut command = netns::command_in(program, Some(netns), None).unwrap();
    command.args(args);
    run(command)
}

fn curl(netns: &NetNs, url: &str, extra: &[&str]) -> String {
    let mut args = vec!["-sS", "--fail", "--max-time", "30", "-H", "Expect:", "-g"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = in_netns(netns, "curl", &args);
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// POSTs `len` random bytes to `url` and checks that all of them come back.
fn upload_and_download(netns: &NetNs, url: &str, len: usize, seed: u64) {
    let dir = TempDir::new();
    let (upload, download) = (dir.join("upload"), dir.join("download"));
    let data = payload(len, seed);
    std::fs::write(&upload, &data).unwrap();
    curl(
        netns,
        url,
        &[
            "--data-binary",
            &format!("@{}", upload.display()),
            "-o",
            &download.display().to_string(),
        ],
    );
    let echoed = std::fs::read(&download).unwrap();
    assert!(
        echoed == data,
        "{url}: {} bytes came back, not the {len} sent",
        echoed.len()
    );
}

/// Datagrams through a connected UDP socket, which accepts replies only
/// from the address and port it sent to.
fn udp_exchange(netns: &NetNs, to: &str, count: usize) {
    udp_exchange_from(netns, 0, to, count)
}

/// udp_exchange from local port `from` (0: the kernel picks one).
fn udp_exchange_from(netns: &NetNs, from: u16, to: &str, count: usize) {
    let to: SocketAddr = to.parse().unwrap();
    let exchange = netns
        .spawn(move || {
            let bind: SocketAddr = if to.is_ipv4() {
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), from)
            } else {
                SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), from)
            };
            let socket = UdpSocket::bind(bind)?;
            socket.connect(to)?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buffer = vec![0u8; 65536];
            for i in 0..count {
                let message = payload(1 + (i * 397) % 8000, i as u64);
                socket.send(&message)?;
                let n = socket.recv(&mut buffer).map_err(|e| {
                    anyhow::anyhow!("datagram {i} to {to}: no reply from that port ({e})")
                })?;
                anyhow::ensure!(buffer[..n] == message[..], "datagram {i} came back changed");
            }
            Ok(())
        })
        .unwrap();
    exchange.join().unwrap().unwrap();
}

/// InCsumErrors of TCP (v4 and v6), UDP and UDP6 in a namespace.
fn checksum_errors(netns: &NetNs) -> (u64, u64, u64) {
    let snmp = String::from_utf8(in_netns(netns, "cat", &["/proc/net/snmp"]).stdout).unwrap();
    let field = |proto: &str| -> u64 {
        let mut lines = snmp.lines().filter(|l| l.starts_with(&format!("{proto}:")));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|n| n == "InCsumErrors")
            .unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    };
    let snmp6 = String::from_utf8(in_netns(netns, "cat", &["/proc/net/snmp6"]).stdout).unwrap();
    let udp6 = snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
        .map_or(0, |v| v.trim().parse().unwrap());
    (field("Tcp"), field("Udp"), udp6)
}

/// Attached TC programs on an interface of a namespace: tcx links and
/// clsact filters.
fn attached_tc(netns: &NetNs, device: &str) -> (u32, bool) {
    let tcx = tcx_programs(netns, device);
    let qdiscs = in_netns(netns, "tc", &["qdisc", "show", "dev", device]);
    (
        tcx,
        String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"),
    )
}

fn lo_netns() -> NetNs {
    NetNs::create(&unique("pn-lo")).expect("netns")
}

#[test]
fn lo_http_download_and_connected_udp_through_mappings_without_checksum_errors() {
    require_root!();
    let ns = lo_netns();
    let _http4 = servers::http(&ns, "127.0.0.1:80").unwrap();
    let _http6 = servers::http(&ns, "[::1]:80").unwrap();
    let _udp4 = servers::udp_echo(&ns, "127.0.0.1:5353").unwrap();
    let _udp6 = servers::udp_echo(&ns, "[::1]:5353").unwrap();
    let nat = port_nat(
        &ns,
        &[
            "-i", "lo", "-f", "8080", "-t", "80", "-f", "5300", "-t", "5353", "--json",
        ],
    );
    assert!(
        nat.seen
            .iter()
            .any(|l| l.contains(&format!("via {}", kernel::expected_tc_path()))),
        "{:?}",
        nat.seen
    );

    let body = curl(&ns, "http://127.0.0.1:8080/", &[]);
    assert!(body.contains("local=127.0.0.1:80"), "{body}");
    let body = curl(&ns, "http://[::1]:8080/", &[]);
    assert!(body.contains("local=[::1]:80"), "{body}");
    upload_and_download(&ns, "http://127.0.0.1:8080/", 8 << 20, 1);
    upload_and_download(&ns, "http://[::1]:8080/", 8 << 20, 2);
    udp_exchange(&ns, "127.0.0.1:5300", 100);
    udp_exchange(&ns, "[::1]:5300", 100);
    // Direct to TO still works.
    let body = curl(&ns, "http://127.0.0.1:80/", &[]);
    assert!(body.contains("local=127.0.0.1:80"), "{body}");
    udp_exchange(&ns, "127.0.0.1:5353", 10);

    assert_eq!(
        checksum_errors(&ns),
        (0, 0, 0),
        "TCP, UDP, UDP6 InCsumErrors"
    );
    let (output, _) = nat.stop_ok();
    let events = json_events(&output);
    let first = events
        .iter()
        .find(|e| e["event"] == "ingress" && e["dst"] == "127.0.0.1:8080")
        .unwrap_or_else(|| panic!("no ingress event in {output}"));
    assert_eq!(first["new_port"], 80);
    assert_eq!(first["new_flow"], true);
    assert!(events
        .iter()
        .any(|e| e["event"] == "egress" && e["src"] == "[::1]:5353" && e["new_port"] == 5300));
    // Fewer packets than MSS-sized segments: loopback carries 64 KiB GSO
    // packets.
    assert!(
        summary_value(&output, "port_nat", "ingress_translated") > 200,
        "{output}"
    );
    assert!(
        summary_value(&output, "port_nat", "egress_translated") > 200,
        "{output}"
    );
    assert_eq!(
        summary_value(&output, "port_nat", "new_flows"),
        6,
        "{output}"
    );
    assert_eq!(summary_value(&output, "port_nat", "dropped"), 0);
    assert!(output.contains("Cleaned up"));
    assert_eq!(attached_tc(&ns, "lo").0, 0);
}

/// Sends `ip` (an IPv4 packet) as it is from a raw socket of the calling
/// thread's namespace: a forged packet.
fn send_raw_ipv4(ip: &[u8], dst: std::net::Ipv4Addr) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0));
    nix::sys::socket::sendto(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        ip,
        &addr,
        nix::sys::socket::MsgFlags::empty(),
    )?;
    Ok(())
}

#[test]
fn veth_a_download_survives_spoofed_acks_straight_to_to() {
    let testbed = root_testbed!();
    let (client, server) = (&testbed.client, &testbed.server);
    let _echo = servers::echo(server, "[::]:80").unwrap();
    let nat = port_nat(
        server,
        &["-i", "veth-s", "-f", "8080", "-t", "80", "--json"],
    );
    let total = 16usize << 20;
    let transfer = client
        .spawn(move || {
            let stream =
                bound_tcp_connect(&format!("{CLIENT_V4}:45000"), &format!("{SERVER_V4}:8080"))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let data = payload(total, 11);
            let mut writer = stream.try_clone()?;
            let sent = data.clone();
            let writing = std::thread::spawn(move || std::io::Write::write_all(&mut writer, &sent));
            let mut received = Vec::with_capacity(total);
            let mut buffer = vec![0u8; 64 * 1024];
            let mut next_spoof = 1usize << 20;
            let mut spoofed = 0;
            while received.len() < total {
                let n = std::io::Read::read(&mut &stream, &mut buffer)
                    .map_err(|e| anyhow::anyhow!("after {} bytes: {e}", received.len()))?;
                anyhow::ensure!(n > 0, "closed after {} bytes", received.len());
                received.extend_from_slice(&buffer[..n]);
                if received.len() >= next_spoof && spoofed < 3 {
                    // An ACK with an arbitrary sequence number, from the
                    // client's address and port straight to :80.
                    let ack = Packet::tcp(CLIENT_V4, 45000, SERVER_V4, 80, TCP_ACK)
                        .with_seq(0x8000_0000 + spoofed);
                    send_raw_ipv4(&ack.build()[ETH_HLEN..], SERVER_V4.parse()?)?;
                    spoofed += 1;
                    next_spoof += 4 << 20;
                }
            }
            writing.join().unwrap()?;
            anyhow::ensure!(received == data, "the echoed bytes differ");
            Ok(())
        })
        .unwrap();
    transfer.join().unwrap().unwrap();
    let (output, _) = nat.stop_ok();
    assert_eq!(
        summary_value(&output, "port_nat", "direct_ignored"),
        3,
        "{output}"
    );
    assert_eq!(
        summary_value(&output, "port_nat", "direct_ended_flows"),
        0,
        "{output}"
    );
}

#[test]
fn lo_a_local_connection_from_port_from_works_and_from_in_the_local_range_is_warned_about() {
    require_root!();
    let ns = lo_netns();
    let _http = servers::http(&ns, "127.0.0.1:80").unwrap();
    let _peer = servers::http(&ns, "127.0.0.1:9000").unwrap();
    in_netns(
        &ns,
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=32768 60999"],
    );
    let nat = port_nat(
        &ns,
        &[
            "-i",
            "lo",
            "-f",
            "40000",
            "-t",
            "80",
            "--metrics",
            "127.0.0.1:9477",
            "--json",
        ],
    );
    // This host's own connection from local port 40000 (FROM). Once: the
    // port then stays in TIME_WAIT, and curl's bind() would fail.
    let body = curl(&ns, "http://127.0.0.1:9000/", &["--local-port", "40000"]);
    assert!(body.contains("peer=127.0.0.1:40000"), "{body}");
    wait_for_tcp_to_settle(&ns);
    // A client of FROM is still translated.
    let body = curl(&ns, "http://127.0.0.1:40000/", &[]);
    assert!(body.contains("local=127.0.0.1:80"), "{body}");
    let page = scrape_metrics(&ns, "127.0.0.1:9477");
    assert_promtool_accepts(&page);
    assert!(
        metric_value(
            &page,
            "proxy_redirect_port_nat_ingress_translated_total{interface=\"lo\"}"
        ) > 0
    );
    assert!(
        page.contains("proxy_redirect_build_info{version="),
        "{page}"
    );
    let (output, stderr) = nat.stop_ok();
    assert!(
        stderr.contains("FROM port 40000 is inside ip_local_port_range (32768-60999)"),
        "{stderr}"
    );
    assert!(
        summary_value(&output, "port_nat", "passed_local") > 0,
        "{output}"
    );
}

#[test]
fn lo_a_udp_client_of_from_gets_econnrefused_when_nothing_listens_on_to() {
    require_root!();
    let ns = lo_netns();
    let nat = port_nat(&ns, &["-i", "lo", "-f", "5300", "-t", "5353", "--json"]);
    for server in ["127.0.0.1:5300", "[::1]:5300"] {
        let server: SocketAddr = server.parse().unwrap();
        let refused = ns
            .spawn(move || {
                let bind = if server.is_ipv4() {
                    "127.0.0.1:0"
                } else {
                    "[::1]:0"
                };
                let socket = UdpSocket::bind(bind)?;
                socket.connect(server)?;
                socket.set_read_timeout(Some(Duration::from_secs(5)))?;
                let start = std::time::Instant::now();
                socket.send(b"anyone?")?;
                let err = socket.recv(&mut [0u8; 64]).unwrap_err();
                Ok((err.kind(), start.elapsed()))
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(refused.0, std::io::ErrorKind::ConnectionRefused, "{server}");
        assert!(
            refused.1 < Duration::from_secs(1),
            "{server}: {:?}",
            refused.1
        );
    }
    let (output, _) = nat.stop_ok();
    assert_eq!(
        summary_value(&output, "port_nat", "icmp_translated"),
        2,
        "{output}"
    );
}

/// A tun device in `ns`: its descriptor, through which the test is the
/// device's peer, reading and writing bare IP packets.
fn tun_device(ns: &NetNs, name: &str) -> std::os::fd::OwnedFd {
    // A minimal guest (the 6.1 VM) may have neither the module loaded nor
    // the device node; opening the node loads the module (char-major-10-200).
    let node = std::path::Path::new("/dev/net/tun");
    if !node.exists() {
        std::fs::create_dir_all("/dev/net").unwrap();
        nix::sys::stat::mknod(
            node,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(10, 200),
        )
        .unwrap();
    }
    let name = name.to_owned();
    ns.spawn(move || {
        use std::os::fd::{AsRawFd, OwnedFd};
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut ifreq = [0u8; 40];
        ifreq[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, 40 bytes.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(OwnedFd::from(file))
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap()
}

/// The next IPv4 packet from the tun device to `port`, within 5 s.
fn tun_read(fd: &std::os::fd::OwnedFd, port: u16) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut buffer = vec![0u8; 65536];
    while std::time::Instant::now() < deadline {
        let mut pollfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        if unsafe { libc::poll(&mut pollfd, 1, 100) } <= 0 {
            continue;
        }
        let n = nix::unistd::read(fd.as_raw_fd(), &mut buffer).unwrap();
        let frame = with_ethernet(&buffer[..n]);
        if parse(&frame).is_some_and(|p| p.dst_port == port) {
            return buffer[..n].to_vec();
        }
    }
    panic!("nothing came out of the tun device to port {port}");
}

#[test]
fn tun_device_translates_tcp_and_udp() {
    require_root!();
    let ns = NetNs::create(&unique("pn-tun")).expect("netns");
    let tun = tun_device(&ns, "pntun0");
    ns.configure("pntun0", &["10.88.0.1/24"]).unwrap();
    let _udp = servers::udp_echo(&ns, "10.88.0.1:5353").unwrap();
    let _http = servers::http(&ns, "10.88.0.1:80").unwrap();
    let nat = port_nat(
        &ns,
        &[
            "-i", "pntun0", "-f", "8080", "-t", "80", "-f", "5300", "-t", "5353", "--json",
        ],
    );
    let write = |packet: &Packet| {
        nix::unistd::write(&tun, &packet.build()[ETH_HLEN..]).unwrap();
    };

    write(&Packet::udp("10.88.0.2", 47000, "10.88.0.1", 5300).with_payload(b"over tun"));
    let reply = with_ethernet(&tun_read(&tun, 47000));
    verify_checksums(&reply).unwrap();
    let parsed = parse(&reply).unwrap();
    assert_eq!(parsed.src_port, 5300, "the UDP reply's source port");
    assert_eq!(&reply[parsed.l4_off + 8..parsed.end], b"over tun");

    write(&Packet::tcp("10.88.0.2", 47001, "10.88.0.1", 8080, TCP_SYN));
    let synack = with_ethernet(&tun_read(&tun, 47001));
    verify_checksums(&synack).unwrap();
    let parsed = parse(&synack).unwrap();
    assert_eq!(parsed.src_port, 8080, "the SYN-ACK's source port");
    assert_eq!(parsed.tcp_flags & (TCP_SYN | TCP_ACK), TCP_SYN | TCP_ACK);

    let (output, _) = nat.stop_ok();
    assert_eq!(
        summary_value(&output, "port_nat", "passed_truncated"),
        0,
        "{output}"
    );
    assert_eq!(
        summary_value(&output, "port_nat", "ingress_translated"),
        2,
        "{output}"
    );
    drop(tun);
}

#[test]
fn veth_a_recreated_interface_is_followed_by_name() {
    let testbed = root_testbed!();
    let (client, server) = (&testbed.client, &testbed.server);
    let _http = servers::http(server, "[::]:80").unwrap();
    let mut nat = port_nat(server, &["-i", "veth-s", "-f", "8080", "-t", "80"]);
    let url = format!("http://{SERVER_V4}:8080/");
    assert!(curl(client, &url, &[]).contains("local=[::ffff:10.77.0.2]:80"));
    for round in 0..2 {
        // A container restart: the interface goes, one of the same name comes.
        server.ip(&["link", "del", "veth-s"]).unwrap();
        let gone = nat.wait_for_line(
            |l| l.starts_with("Interface veth-s is gone"),
            Duration::from_secs(10),
        );
        assert!(
            gone.is_some(),
            "round {round}: no line about the interface going: {:?}",
            nat.seen
        );
        netns::veth_pair(client, "veth-c", server, "veth-s").unwrap();
        client
            .configure("veth-c", &[&format!("{CLIENT_V4}/24")])
            .unwrap();
        server
            .configure("veth-s", &[&format!("{SERVER_V4}/24")])
            .unwrap();
        let back = nat.wait_for_line(
            |l| l.starts_with("Interface veth-s is back"),
            Duration::from_secs(10),
        );
        assert!(
            back.is_some(),
            "round {round}: no line about the interface returning: {:?}",
            nat.seen
        );
        let body = curl(client, &url, &["--retry", "3", "--retry-connrefused"]);
        assert!(
            body.contains("local=[::ffff:10.77.0.2]:80"),
            "round {round}: {body}"
        );
        assert_eq!(
            attached_tc(server, "veth-s").0,
            if kernel::has_tcx() { 2 } else { 0 }
        );
    }
    let (_, stderr) = nat.stop_ok();
    assert!(stderr.contains("interface veth-s is gone"), "{stderr}");
    assert_eq!(attached_tc(server, "veth-s"), (0, false));
}

fn ethtool(netns: &NetNs, device: &str, args: &[&str]) {
    let mut full = vec!["-K", device];
    full.extend_from_slice(args);
    let out = in_netns(netns, "ethtool", &full);
    assert!(
        out.status.success(),
        "ethtool {full:?}: {} (install ethtool)",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn veth_ipv4_ipv6_with_and_without_checksum_offload_and_direct_clients() {
    let testbed = root_testbed!();
    let (client, server) = (&testbed.client, &testbed.server);
    let _http = servers::http(server, "[::]:80").unwrap();
    let _udp = servers::udp_echo(server, "[::]:5353").unwrap();
    let nat = port_nat(
        server,
        &[
            "-i", "veth-s", "-f", "8080", "-t", "80", "-f", "5300", "-t", "5353", "--proto", "all",
            "--json",
        ],
    );
    for offload in [true, false] {
        if !offload {
            // Checksums computed in software by the sender and verified in
            // software by the receiver: a wrong one is dropped and counted.
            for (ns, dev) in [(client, "veth-c"), (server, "veth-s")] {
                ethtool(ns, dev, &["tx", "off", "rx", "off"]);
            }
        }
        let body = curl(client, &format!("http://{SERVER_V4}:8080/"), &[]);
        assert!(
            body.contains(&format!("local=[::ffff:{SERVER_V4}]:80")),
            "{body}"
        );
        let body = curl(client, &format!("http://[{SERVER_V6}]:8080/"), &[]);
        assert!(body.contains(&format!("local=[{SERVER_V6}]:80")), "{body}");
        upload_and_download(client, &format!("http://{SERVER_V4}:8080/"), 4 << 20, 3);
        upload_and_download(client, &format!("http://[{SERVER_V6}]:8080/"), 4 << 20, 4);
        udp_exchange(client, &format!("{SERVER_V4}:5300"), 50);
        udp_exchange(client, &format!("[{SERVER_V6}]:5300"), 50);
        // Direct clients of TO, untouched.
        let body = curl(client, &format!("http://{SERVER_V4}:80/"), &[]);
        assert!(
            body.contains(&format!("local=[::ffff:{SERVER_V4}]:80")),
            "{body}"
        );
        upload_and_download(client, &format!("http://[{SERVER_V6}]:80/"), 1 << 20, 5);
        udp_exchange(client, &format!("{SERVER_V4}:5353"), 10);
        udp_exchange(client, &format!("[{SERVER_V6}]:5353"), 10);
        for ns in [client, server] {
            assert_eq!(
                checksum_errors(ns),
                (0, 0, 0),
                "TCP, UDP, UDP6 InCsumErrors (offload {offload})"
            );
        }
    }
    let (output, _) = nat.stop_ok();
    assert!(
        summary_value(&output, "port_nat", "untracked_replies") > 0,
        "{output}"
    );
    assert_eq!(summary_value(&output, "port_nat", "dropped"), 0);
    assert_eq!(attached_tc(server, "veth-s").0, 0);
}

#[test]
fn flows_expire_after_their_timeout_and_active_ones_recover() {
    require_root!();
    let ns = lo_netns();
    let _http = servers::http(&ns, "127.0.0.1:80").unwrap();
    let _echo = servers::echo(&ns, "127.0.0.1:7").unwrap();
    let _udp = servers::udp_echo(&ns, "127.0.0.1:5353").unwrap();
    let mut nat = port_nat(
        &ns,
        &[
            "-i",
            "lo",
            "-f",
            "8080",
            "-t",
            "80",
            "-f",
            "7007",
            "-t",
            "7",
            "-f",
            "5300",
            "-t",
            "5353",
            "--proto",
            "all",
            "--tcp-timeout",
            "2",
            "--tcp-closing-timeout",
            "1",
            "--udp-timeout",
            "1",
            "-v",
        ],
    );
    // An idle established connection outlives its flow; its next packet
    // from the client creates the flow again and the reply still comes back.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let held = ns
        .spawn(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect("127.0.0.1:7007")?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut reply = [0u8; 5];
            stream.write_all(b"first")?;
            stream.read_exact(&mut reply)?;
            go_rx.recv()?;
            stream.write_all(b"again")?;
            stream.read_exact(&mut reply)?;
            anyhow::ensure!(&reply == b"again");
            Ok(())
        })
        .unwrap();
    curl(&ns, "http://127.0.0.1:8080/", &[]);
    udp_exchange(&ns, "127.0.0.1:5300", 3);

    let mut expired = Vec::new();
    while expired.len() < 3 {
        let line = nat
            .wait_for_line(|l| l.contains(" EXPIRED "), Duration::from_secs(10))
            .unwrap_or_else(|| panic!("only {} flows expired: {expired:?}", expired.len()));
        expired.push(line);
    }
    let text = expired.join("\n");
    assert!(text.contains(":8080 [to 80] tcp closing"), "{text}");
    assert!(text.contains(":5300 [to 5353] udp udp"), "{text}");
    assert!(text.contains(":7007 [to 7] tcp established"), "{text}");
    go_tx.send(()).unwrap();
    held.join().unwrap().unwrap();

    // -v prints text events, and no JSON summary: this run is read from
    // its human-readable statistics.
    let (output, _) = nat.stop_ok();
    assert!(stat(&output, "flows expired") >= 3, "{output}");
    assert_eq!(stat(&output, "flows evicted (table full)"), 0, "{output}");
    assert_eq!(stat(&output, "dropped"), 0);
}

#[test]
fn a_full_flow_table_evicts_the_least_recently_used_flows() {
    require_root!();
    let ns = lo_netns();
    let _udp = servers::udp_echo(&ns, "127.0.0.1:5353").unwrap();
    let nat = port_nat(
        &ns,
        &[
            "-i",
            "lo",
            "-f",
            "5300",
            "-t",
            "5353",
            "--proto",
            "udp",
            "--max-flows",
            "16",
            "--json",
        ],
    );
    // One long-lived flow, then far more new flows than the table holds:
    // every new flow works, and the old one recovers on its next datagram.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let old = ns
        .spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            socket.connect("127.0.0.1:5300")?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buffer = [0u8; 16];
            for round in 0..2 {
                if round == 1 {
                    go_rx.recv()?;
                }
                socket.send(b"old flow")?;
                let n = socket.recv(&mut buffer)?;
                anyhow::ensure!(&buffer[..n] == b"old flow");
            }
            Ok(())
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Distinct source ports below the ephemeral range: a port the kernel
    // picked twice would make one "new" flow an old one still tracked.
    for i in 0..300 {
        udp_exchange_from(&ns, 20000 + i, "127.0.0.1:5300", 1);
    }
    go_tx.send(()).unwrap();
    old.join().unwrap().unwrap();
    let (output, _) = nat.stop_ok();
    // 301 flows, or 302 when the old one was evicted and came back (the
    // LRU's per-CPU free lists decide which entries go first).
    let (new, tracked) = (
        summary_value(&output, "port_nat", "new_flows"),
        summary_value(&output, "port_nat", "flows"),
    );
    assert!((301..=302).contains(&new), "{output}");
    assert!(tracked <= 16, "{output}");
    assert_eq!(
        summary_value(&output, "port_nat", "evicted_flows"),
        new - tracked,
        "{output}"
    );
    assert_eq!(summary_value(&output, "port_nat", "dropped"), 0, "{output}");
}

#[test]
fn sigkill_leaves_no_tcx_link_and_a_clsact_leftover_is_replaced() {
    require_root!();
    let ns = lo_netns();
    let _http = servers::http(&ns, "127.0.0.1:80").unwrap();
    let args = ["-i", "lo", "-f", "8080", "-t", "80"];

    let nat = port_nat(&ns, &args);
    if kernel::has_tcx() {
        assert!(nat
            .seen
            .iter()
            .any(|l| l.ends_with("via tcx link; press Ctrl-C to stop")));
        assert_eq!(attached_tc(&ns, "lo").0, 2);
        nat.kill();
        assert_eq!(attached_tc(&ns, "lo"), (0, false), "after SIGKILL");
    } else {
        // Before 6.6 auto mode falls back to clsact, and tcx is refused.
        assert!(nat.seen.iter().any(|l| l.contains("via clsact qdisc")));
        nat.kill();
        assert_eq!(attached_tc(&ns, "lo"), (0, true), "after SIGKILL");
        let tcx = [&args[..], &["--tc-attach", "tcx"]].concat();
        let mut command = netns::command_in(BIN, Some(&ns), None).unwrap();
        command.arg("port-nat").args(tcx);
        assert_one_line_error(&run(command), "--tc-attach tcx before 6.6", "tcx");
    }

    let clsact = [&args[..], &["--tc-attach", "clsact"]].concat();
    let nat = port_nat(&ns, &clsact);
    assert!(nat.seen.iter().any(|l| l.contains("via clsact qdisc")));
    assert!(curl(&ns, "http://127.0.0.1:8080/", &[]).contains("local=127.0.0.1:80"));
    nat.kill();
    // The legacy path cannot avoid this: the filters outlive the process...
    assert_eq!(attached_tc(&ns, "lo"), (0, true));
    // ...and the next run finds and replaces them, then removes everything.
    let nat = port_nat(&ns, &[&clsact[..], &["--json"]].concat());
    assert!(curl(&ns, "http://127.0.0.1:8080/", &[]).contains("local=127.0.0.1:80"));
    let (output, stderr) = nat.stop_ok();
    assert_eq!(
        summary_value(&output, "port_nat", "new_flows"),
        1,
        "one filter pair ran, not two"
    );
    assert_eq!(attached_tc(&ns, "lo"), (0, false), "after a clean exit");
    // Neither the expected netlink answers at attach (the qdisc exists, no
    // filter is there) nor the removal prints a warning or libbpf message.
    assert!(stderr.trim().is_empty(), "{stderr}");
    let filters = in_netns(&ns, "tc", &["filter", "show", "dev", "lo", "ingress"]);
    assert!(filters.stdout.is_empty());
}

#[test]
fn bad_input_fails_with_one_line_and_attaches_nothing() {
    require_root!();
    let ns = lo_netns();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-i", "nope0", "-f", "8080", "-t", "80"],
            "unknown interface 'nope0'",
        ),
        (vec!["-i", "lo", "-f", "0", "-t", "80"], "out of range"),
        (
            vec!["-i", "lo", "-f", "8080", "-t", "65536"],
            "out of range",
        ),
        (
            vec!["-i", "lo", "-f", "http", "-t", "80"],
            "not a port number",
        ),
        (vec!["-i", "lo", "-f", "8080"], "-f 8080 has no -t"),
        (
            vec!["-i", "lo", "-f", "8080", "-t", "80", "-t", "81"],
            "-t 81 has no -f",
        ),
        (
            vec![
                "-i", "lo", "-f", "8080", "-t", "80", "-f", "8080", "-t", "81",
            ],
            "port 8080 is mapped twice",
        ),
        (
            vec!["-i", "lo", "-f", "80", "-t", "80"],
            "maps a port to itself",
        ),
        (vec!["-i", "lo", "-t", "80"], "required"),
        (vec!["-f", "8080", "-t", "80"], "required"),
        (
            vec!["-i", "lo", "-f", "8080", "-t", "80", "--proto", "sctp"],
            "invalid value",
        ),
        (
            vec!["-i", "lo", "-f", "8080", "-t", "80", "--max-flows", "1"],
            "invalid value",
        ),
        (
            vec!["-i", "lo", "-f", "8080", "-t", "80", "--udp-timeout", "0"],
            "invalid value",
        ),
        (
            vec!["-i", "lo", "-f", "8080", "-t", "80", "--tc-attach", "xdp"],
            "invalid value",
        ),
    ];
    for (args, expected) in cases {
        let mut command = netns::command_in(BIN, Some(&ns), None).unwrap();
        command.arg("port-nat").args(&args);
        assert_one_line_error(&run(command), &format!("{args:?}"), expected);
    }
    // No privileges.
    assert_refused_without_privileges(&["port-nat", "-i", "lo", "-f", "8080", "-t", "80"]);
    assert_eq!(attached_tc(&ns, "lo"), (0, false));
}

/// A server with Fast Open on TO and clients that put their request in the
/// SYN to FROM (no cookie needed: tcp_fastopen=0x607): prints each echo.
const FAST_OPEN_THROUGH_FROM: &str = r#"
import socket, sys, threading
TCP_FASTOPEN, MSG_FASTOPEN = 23, 0x20000000
host = sys.argv[1]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
listener = socket.socket(family)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.SOL_TCP, TCP_FASTOPEN, 16)
listener.bind((host, 80))
listener.listen(16)
def serve():
    while True:
        conn, _ = listener.accept()
        conn.sendall(b"echo:" + conn.recv(100))
        conn.close()
threading.Thread(target=serve, daemon=True).start()
for i in range(5):
    s = socket.socket(family)
    s.settimeout(5)
    s.sendto(b"in the SYN %d" % i, MSG_FASTOPEN, (host, 8080))
    print(s.recv(100).decode())
    s.close()
"#;

#[test]
fn lo_fast_open_data_in_the_syn_is_translated() {
    require_root!();
    let ns = lo_netns();
    let out = in_netns(&ns, "sysctl", &["-qw", "net.ipv4.tcp_fastopen=0x607"]);
    assert!(out.status.success());
    let nat = port_nat(&ns, &["-i", "lo", "-f", "8080", "-t", "80", "--json"]);
    for host in ["127.0.0.1", "::1"] {
        let before = fast_open_passive(&ns);
        let out = in_netns(&ns, PYTHON, &["-c", FAST_OPEN_THROUGH_FROM, host]);
        let echoes = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{host}: {echoes}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected: Vec<String> = (0..5).map(|i| format!("echo:in the SYN {i}")).collect();
        assert_eq!(echoes.lines().collect::<Vec<_>>(), expected, "{host}");
        assert!(fast_open_passive(&ns) >= before + 5, "{host}: no Fast Open");
    }
    let (output, _) = nat.stop_ok();
    assert_eq!(
        summary_value(&output, "port_nat", "new_flows"),
        10,
        "{output}"
    );
    assert_eq!(summary_value(&output, "port_nat", "dropped"), 0, "{output}");
}
