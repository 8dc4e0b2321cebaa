//! Argument parsers and output flags shared by every subcommand.

pub mod toml;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, Context, Result};
use clap::Args;

/// `-v` / `--json` / `--metrics`: how events and statistics are shown while
/// running.
#[derive(Args, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputArgs {
    /// Print one line per event
    #[arg(short, long)]
    pub verbose: bool,
    /// Print events as JSON lines (one object per line) instead of text
    #[arg(long)]
    pub json: bool,
    /// Serve the statistics as Prometheus metrics on http://ADDR/metrics
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// How events are printed, decided from [`OutputArgs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFormat {
    Off,
    Text,
    Json,
}

impl OutputArgs {
    pub fn event_format(&self) -> EventFormat {
        if self.json {
            EventFormat::Json
        } else if self.verbose {
            EventFormat::Text
        } else {
            EventFormat::Off
        }
    }
}

/// A TCP/UDP port, 1 to 65535.
pub fn parse_port(text: &str) -> Result<u16, String> {
    let value: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a port number (1-65535)"))?;
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("port {value} is out of range (1-65535)")),
    }
}

/// A comma-separated list of ports, such as `80,443`.
pub fn parse_port_list(text: &str) -> Result<PortList, String> {
    if text.trim().is_empty() {
        return Err("the port list is empty".into());
    }
    let mut ports = Vec::new();
    for item in text.split(',') {
        if item.trim().is_empty() {
            return Err(format!(
                "'{text}' has an empty entry; write ports like 80,443"
            ));
        }
        let port = parse_port(item)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(PortList(ports))
}

/// A parsed `-P` list, in the order given, without duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

impl std::fmt::Display for PortList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&text.join(","))
    }
}

/// An IPv4 or IPv6 network such as `10.0.0.0/8` or `fd00::/8`; a bare
/// address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let (addr_text, prefix_text) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|_| format!("'{text}' is not an IP network (like 10.0.0.0/8 or fd00::/8)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = match prefix_text {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|len| *len <= max)
            .ok_or_else(|| format!("'{text}' has a bad prefix length (0-{max})"))?,
    };
    Ok(Cidr { addr, prefix_len })
}

/// The proxy's IPv4 and IPv6 socket addresses on `port`, from the values
/// of `option` (at most one of each family; 127.0.0.1 and ::1 by default).
pub fn proxy_addresses(
    ips: &[IpAddr],
    port: u16,
    option: &str,
) -> Result<(SocketAddr, SocketAddr)> {
    let mut v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let (mut seen_v4, mut seen_v6) = (false, false);
    for ip in ips {
        let (slot, seen) = match ip {
            IpAddr::V4(_) => (&mut v4, &mut seen_v4),
            IpAddr::V6(_) => (&mut v6, &mut seen_v6),
        };
        if std::mem::replace(seen, true) {
            bail!("give at most one IPv4 and one IPv6 proxy address ({option})");
        }
        *slot = *ip;
    }
    Ok((SocketAddr::new(v4, port), SocketAddr::new(v6, port)))
}

/// An IPv6 address as the BPF programs hold it: four words in network order.
pub fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    let octets = ip.octets();
    std::array::from_fn(|i| u32::from_ne_bytes(octets[i * 4..i * 4 + 4].try_into().unwrap()))
}

/// A socket mark, decimal or 0x-prefixed hexadecimal.
pub fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is not a mark (a number such as 0x5052)"))
}

/// A user name or numeric uid -> uid.
pub fn resolve_user(user: &str) -> Result<u32> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(user).context("reading the user database")? {
        Some(entry) => Ok(entry.uid.as_raw()),
        None => bail!("unknown user '{user}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_checked() {
        assert_eq!(parse_port("80"), Ok(80));
        assert!(parse_port("0").is_err());
        assert!(parse_port("65536").is_err());
        assert!(parse_port("http").is_err());
        assert_eq!(parse_port_list("80,443,80"), Ok(PortList(vec![80, 443])));
        assert!(parse_port_list("").is_err());
        assert!(parse_port_list("80,,443").is_err());
        assert!(parse_port_list("80,").is_err());
    }

    #[test]
    fn cidrs_and_marks_parse() {
        let net = parse_cidr("10.1.0.0/16").unwrap();
        assert_eq!(
            (net.addr.to_string(), net.prefix_len),
            ("10.1.0.0".into(), 16)
        );
        assert_eq!(parse_cidr("fd00::1").unwrap().prefix_len, 128);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("example.com").is_err());
        assert_eq!(parse_mark("0x5052"), Ok(0x5052));
        assert_eq!(parse_mark("7"), Ok(7));
        assert!(parse_mark("x").is_err());
    }

    #[test]
    fn users_resolve() {
        assert_eq!(resolve_user("root").unwrap(), 0);
        assert_eq!(resolve_user("1234").unwrap(), 1234);
        assert!(resolve_user("no-such-user-proxy-redirect").is_err());
    }
}
