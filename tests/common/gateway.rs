//! Three namespaces, client -- gateway -- server, the gateway forwarding
//! IPv4 and IPv6 between two veth pairs: the set-up of a router, a host for
//! containers or VMs, or any box that intercepts traffic it does not
//! originate.

use std::process::Command;

use proxy_redirect::sys::links::{self, TcDirection};
use proxy_redirect::sys::netns::{self, NetNs};

use super::{run, unique, Running, BIN};

pub const CLIENT4: &str = "10.78.1.1";
pub const GATEWAY_CLIENT_SIDE4: &str = "10.78.1.254";
pub const SERVER4: &str = "10.78.2.1";
pub const GATEWAY_SERVER_SIDE4: &str = "10.78.2.254";
pub const CLIENT6: &str = "fd78:1::1";
pub const GATEWAY_CLIENT_SIDE6: &str = "fd78:1::fe";
pub const SERVER6: &str = "fd78:2::1";
pub const GATEWAY_SERVER_SIDE6: &str = "fd78:2::fe";
/// The gateway's client-facing interface, where tproxy attaches.
pub const CLIENT_FACING: &str = "gw-c";

pub struct Gateway {
    pub client: NetNs,
    pub gateway: NetNs,
    pub server: NetNs,
}

impl Gateway {
    pub fn new() -> Gateway {
        let name = unique("prgw");
        let client = NetNs::create(&format!("{name}-c")).expect("client netns");
        let gateway = NetNs::create(&format!("{name}-g")).expect("gateway netns");
        let server = NetNs::create(&format!("{name}-s")).expect("server netns");
        // Link-local addresses skip DAD too, so that the routing tables
        // (which list them once valid) are settled from the start.
        for ns in [&client, &gateway, &server] {
            let mut command = netns::command_in("sysctl", Some(ns), None).unwrap();
            command.args(["-qw", "net.ipv6.conf.default.accept_dad=0"]);
            assert!(run(command).status.success());
        }
        netns::veth_pair(&client, "veth0", &gateway, CLIENT_FACING).unwrap();
        netns::veth_pair(&gateway, "gw-s", &server, "veth0").unwrap();
        client
            .configure(
                "veth0",
                &[&format!("{CLIENT4}/24"), &format!("{CLIENT6}/64")],
            )
            .unwrap();
        gateway
            .configure(
                CLIENT_FACING,
                &[
                    &format!("{GATEWAY_CLIENT_SIDE4}/24"),
                    &format!("{GATEWAY_CLIENT_SIDE6}/64"),
                ],
            )
            .unwrap();
        gateway
            .configure(
                "gw-s",
                &[
                    &format!("{GATEWAY_SERVER_SIDE4}/24"),
                    &format!("{GATEWAY_SERVER_SIDE6}/64"),
                ],
            )
            .unwrap();
        server
            .configure(
                "veth0",
                &[&format!("{SERVER4}/24"), &format!("{SERVER6}/64")],
            )
            .unwrap();
        for (ns, via4, via6) in [
            (&client, GATEWAY_CLIENT_SIDE4, GATEWAY_CLIENT_SIDE6),
            (&server, GATEWAY_SERVER_SIDE4, GATEWAY_SERVER_SIDE6),
        ] {
            ns.ip(&["route", "add", "default", "via", via4]).unwrap();
            ns.ip(&["-6", "route", "add", "default", "via", via6])
                .unwrap();
        }
        let gw = Gateway {
            client,
            gateway,
            server,
        };
        gw.sysctl(&gw.gateway, "net.ipv4.ip_forward=1");
        gw.sysctl(&gw.gateway, "net.ipv6.conf.all.forwarding=1");
        gw.wait_until_forwarding();
        gw
    }

    /// Connects through the gateway until both families answer, so that
    /// neighbour discovery is done before a test counts packets or events.
    fn wait_until_forwarding(&self) {
        let listener = self
            .server
            .spawn(|| Ok(std::net::TcpListener::bind("[::]:9")?))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        for target in [format!("{SERVER4}:9"), format!("[{SERVER6}]:9")] {
            let ready = self
                .client
                .spawn(move || {
                    let addr: std::net::SocketAddr = target.parse()?;
                    for _ in 0..50 {
                        let timeout = std::time::Duration::from_millis(200);
                        if std::net::TcpStream::connect_timeout(&addr, timeout).is_ok() {
                            return Ok(true);
                        }
                    }
                    Ok(false)
                })
                .unwrap()
                .join()
                .unwrap()
                .unwrap();
            assert!(ready, "the gateway never forwarded to the server");
        }
        drop(listener);
    }

    pub fn sysctl(&self, ns: &NetNs, setting: &str) {
        let mut command = netns::command_in("sysctl", Some(ns), None).unwrap();
        command.args(["-qw", setting]);
        let out = run(command);
        assert!(
            out.status.success(),
            "sysctl {setting}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `proxy-redirect tproxy -i gw-c --json EXTRA...` on the gateway.
    pub fn tproxy(&self, extra: &[&str]) -> Running {
        let mut args: Vec<String> = ["tproxy", "-i", CLIENT_FACING, "--json"]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        Running::start(BIN, &args, Some(&self.gateway), None, "Attached")
    }

    pub fn in_client(&self, program: &str) -> Command {
        netns::command_in(program, Some(&self.client), None).unwrap()
    }

    pub fn in_gateway(&self, program: &str) -> Command {
        netns::command_in(program, Some(&self.gateway), None).unwrap()
    }

    /// Everything of the gateway that tproxy may change: policy rules, every
    /// routing table, qdiscs, TC filters and tcx programs on both veths.
    pub fn snapshot(&self) -> String {
        let mut text = String::new();
        let commands: [&[&str]; 8] = [
            &["ip", "-4", "rule", "show"],
            &["ip", "-6", "rule", "show"],
            &["ip", "-4", "route", "show", "table", "all"],
            &["ip", "-6", "route", "show", "table", "all"],
            &["tc", "qdisc", "show"],
            &["tc", "filter", "show", "dev", CLIENT_FACING, "ingress"],
            &["tc", "filter", "show", "dev", CLIENT_FACING, "egress"],
            &["tc", "filter", "show", "dev", "gw-s", "ingress"],
        ];
        for args in commands {
            let mut command = self.in_gateway(args[0]);
            command.args(&args[1..]);
            let out = run(command);
            text.push_str(&format!("$ {}\n", args.join(" ")));
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            text.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        for device in [CLIENT_FACING, "gw-s"] {
            for (name, direction) in [
                ("ingress", TcDirection::Ingress),
                ("egress", TcDirection::Egress),
            ] {
                let count = self.tcx_program_count(device, direction);
                text.push_str(&format!("tcx {name} programs on {device}: {count}\n"));
            }
        }
        text
    }

    /// How many tcx programs an interface of the gateway has.
    pub fn tcx_program_count(&self, device: &str, direction: TcDirection) -> u32 {
        let device = device.to_owned();
        self.gateway
            .spawn(move || {
                let ifindex = nix::net::if_::if_nametoindex(device.as_str())?;
                links::tcx_program_count(ifindex, direction)
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap()
    }
}
