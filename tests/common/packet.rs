//! Ethernet frames for BPF_PROG_TEST_RUN: a builder for IPv4 (with options
//! and fragments) and IPv6 (with extension headers) TCP/UDP packets with
//! correct checksums, a parser that finds the L4 header as a TC program
//! would, and a software checksum verifier.

use std::net::IpAddr;

pub const ETH_HLEN: usize = 14;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// An IPv6 extension header placed before the L4 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options, `units` x 8 bytes after the first 8.
    HopByHop(u8),
    Routing(u8),
    DestOpts(u8),
    /// Offset in 8-byte units and the M flag.
    Fragment {
        offset: u16,
        more: bool,
    },
    /// Authentication header, `words` x 4 bytes after the first 8.
    Auth(u8),
    /// Encapsulating security payload: nothing after it can be read.
    Esp,
}

impl Ext {
    fn number(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing(_) => 43,
            Ext::Fragment { .. } => 44,
            Ext::Esp => 50,
            Ext::Auth(_) => 51,
            Ext::DestOpts(_) => 60,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match *self {
            Ext::HopByHop(units) | Ext::Routing(units) | Ext::DestOpts(units) => {
                let mut b = vec![0u8; 8 + units as usize * 8];
                b[0] = next;
                b[1] = units;
                // PadN option over the rest, a valid TLV.
                b[2] = 1;
                b[3] = (b.len() - 4) as u8;
                if matches!(self, Ext::Routing(_)) {
                    b[2] = 4; // routing type: a deprecated type, segments left 0
                    b[3] = 0;
                }
                b
            }
            Ext::Fragment { offset, more } => {
                let mut b = vec![0u8; 8];
                b[0] = next;
                let field = (offset << 3) | u16::from(more);
                b[2..4].copy_from_slice(&field.to_be_bytes());
                b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
                b
            }
            Ext::Auth(words) => {
                let mut b = vec![0u8; 8 + words as usize * 4];
                b[0] = next;
                b[1] = words;
                b
            }
            Ext::Esp => vec![0u8; 8],
        }
    }
}

/// A TCP, UDP or ICMP packet in an Ethernet frame.
#[derive(Debug, Clone)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    /// The data after the L4 header; for ICMP, the whole ICMP message with
    /// a zero checksum field.
    pub payload: Vec<u8>,
    /// IPv4 options (padded to 4 bytes with end-of-list).
    pub ip_options: Vec<u8>,
    /// IPv4 fragment offset in 8-byte units and the MF flag.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub ipv6_ext: Vec<Ext>,
    /// UDP only: send a zero checksum ("none"; IPv4 only in real life).
    pub udp_zero_checksum: bool,
}

impl Packet {
    pub fn tcp(src: &str, src_port: u16, dst: &str, dst_port: u16, flags: u8) -> Packet {
        Packet {
            src: src.parse().expect("source address"),
            dst: dst.parse().expect("destination address"),
            protocol: IPPROTO_TCP,
            src_port,
            dst_port,
            tcp_flags: flags,
            seq: 0x0102_0304,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
            ipv6_ext: Vec::new(),
            udp_zero_checksum: false,
        }
    }

    pub fn udp(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Packet {
        Packet {
            protocol: IPPROTO_UDP,
            tcp_flags: 0,
            ..Packet::tcp(src, src_port, dst, dst_port, 0)
        }
    }

    /// An ICMP (IPv4) or ICMPv6 error of `kind` (type, code) quoting
    /// `quoted`, an IP packet without its Ethernet header.
    pub fn icmp_error(src: &str, dst: &str, kind: (u8, u8), quoted: &[u8]) -> Packet {
        let mut packet = Packet::tcp(src, 0, dst, 0, 0);
        packet.protocol = if packet.src.is_ipv4() {
            IPPROTO_ICMP
        } else {
            IPPROTO_ICMPV6
        };
        packet.payload = vec![kind.0, kind.1, 0, 0, 0, 0, 0, 0];
        packet.payload.extend_from_slice(quoted);
        packet
    }

    pub fn with_seq(mut self, seq: u32) -> Packet {
        self.seq = seq;
        self
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Packet {
        self.payload = payload.to_vec();
        self
    }

    /// The same packet from the other end: addresses and ports swapped.
    pub fn reply(&self, flags: u8) -> Packet {
        let mut reply = self.clone();
        std::mem::swap(&mut reply.src, &mut reply.dst);
        std::mem::swap(&mut reply.src_port, &mut reply.dst_port);
        reply.tcp_flags = flags;
        reply
    }

    fn is_icmp(&self) -> bool {
        self.protocol == IPPROTO_ICMP || self.protocol == IPPROTO_ICMPV6
    }

    fn l4_bytes(&self) -> Vec<u8> {
        if self.is_icmp() {
            return self.payload.clone();
        }
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src_port.to_be_bytes());
        l4.extend_from_slice(&self.dst_port.to_be_bytes());
        if self.protocol == IPPROTO_TCP {
            l4.extend_from_slice(&self.seq.to_be_bytes());
            let ack = if self.tcp_flags & TCP_ACK != 0 {
                0x0a0b_0c0du32
            } else {
                0
            };
            l4.extend_from_slice(&ack.to_be_bytes());
            l4.push(5 << 4); // data offset: 20 bytes
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&64240u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        } else {
            let len = (8 + self.payload.len()) as u16;
            l4.extend_from_slice(&len.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        l4
    }

    /// The frame, with every checksum right.
    pub fn build(&self) -> Vec<u8> {
        let mut l4 = self.l4_bytes();
        let csum_at = match self.protocol {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => 2,
        };
        let skip_csum = self.protocol == IPPROTO_UDP && self.udp_zero_checksum;
        if self.protocol == IPPROTO_ICMP {
            let csum = checksum(&l4, 0);
            l4[2..4].copy_from_slice(&csum.to_be_bytes());
        } else if !skip_csum {
            let mut csum = l4_checksum(self.src, self.dst, self.protocol, &l4);
            if self.protocol == IPPROTO_UDP && csum == 0 {
                csum = 0xffff;
            }
            l4[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
        }
        let mut frame = vec![0u8; 12]; // destination and source MAC
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut options = self.ip_options.clone();
                while options.len() % 4 != 0 {
                    options.push(0);
                }
                let ihl = 5 + options.len() / 4;
                let mut ip = vec![0u8; 20];
                ip[0] = 0x40 | ihl as u8;
                let total = (ihl * 4 + l4.len()) as u16;
                ip[2..4].copy_from_slice(&total.to_be_bytes());
                ip[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
                let frag = (u16::from(self.more_fragments) << 13) | self.frag_offset;
                ip[6..8].copy_from_slice(&frag.to_be_bytes());
                ip[8] = 64;
                ip[9] = self.protocol;
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&dst.octets());
                ip.extend_from_slice(&options);
                let csum = checksum(&ip, 0);
                ip[10..12].copy_from_slice(&csum.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut chain = Vec::new();
                for (i, ext) in self.ipv6_ext.iter().enumerate() {
                    let next = self.ipv6_ext.get(i + 1).map_or(self.protocol, Ext::number);
                    chain.extend_from_slice(&ext.bytes(next));
                }
                let mut ip = vec![0u8; 8];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
                ip[6] = self.ipv6_ext.first().map_or(self.protocol, Ext::number);
                ip[7] = 64;
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                frame.extend_from_slice(&ip);
                frame.extend_from_slice(&chain);
            }
            _ => panic!("mixed address families"),
        }
        frame.extend_from_slice(&l4);
        frame
    }
}

/// `ip` (a packet from an L3 device) in an Ethernet frame, as `parse`
/// and `verify_checksums` take it.
pub fn with_ethernet(ip: &[u8]) -> Vec<u8> {
    let ethertype: u16 = if ip.first().is_some_and(|b| b >> 4 == 6) {
        0x86dd
    } else {
        0x0800
    };
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(ip);
    frame
}

/// The one's complement sum of `data` (big-endian 16-bit words) folded,
/// inverted, starting from `initial`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u64::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u32 {
    let mut bytes = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&[0, protocol]);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, protocol]);
        }
        _ => unreachable!(),
    }
    u32::from(!checksum(&bytes, 0))
}

/// The TCP/UDP checksum of `l4` (header with a zero checksum field + data).
pub fn l4_checksum(src: IpAddr, dst: IpAddr, protocol: u8, l4: &[u8]) -> u16 {
    checksum(l4, pseudo_header_sum(src, dst, protocol, l4.len()))
}

/// Where a TC program finds a packet's L4 header, or None when it must
/// leave the packet alone (not TCP/UDP, a later fragment, truncated,
/// an IPv6 header chain it does not follow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub l4_off: usize,
    /// End of the datagram as the IP header says (or the frame's end).
    pub end: usize,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    /// A first fragment: the L4 checksum covers data not in this frame.
    pub fragment: bool,
}

impl Parsed {
    pub fn csum_off(&self) -> usize {
        self.l4_off + if self.protocol == IPPROTO_TCP { 16 } else { 6 }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Mirrors bpf/lib/parse.h on a frame.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    let ethertype = be16(frame, 12)?;
    let l3 = ETH_HLEN;
    let (src, dst, protocol, l4_off, end, fragment) = match ethertype {
        0x0800 => {
            let ip = frame.get(l3..l3 + 20)?;
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let total = usize::from(be16(ip, 2)?);
            if ip[0] >> 4 != 4 || ihl < 20 {
                return None;
            }
            let protocol = ip[9];
            if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
                return None;
            }
            let frag = be16(ip, 6)?;
            if frag & 0x1fff != 0 {
                return None;
            }
            let need = if protocol == IPPROTO_TCP { 20 } else { 8 };
            if total != 0 && (total < ihl || total - ihl < need) {
                return None;
            }
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            let end = if total == 0 { frame.len() } else { l3 + total };
            (src, dst, protocol, l3 + ihl, end, frag & 0x2000 != 0)
        }
        0x86dd => {
            let ip = frame.get(l3..l3 + 40)?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            let payload_len = usize::from(be16(ip, 4)?);
            let mut next = ip[6];
            let mut off = l3 + 40;
            let mut fragment = false;
            for _ in 0..6 {
                if next == IPPROTO_TCP || next == IPPROTO_UDP {
                    break;
                }
                match next {
                    0 | 43 | 60 | 51 | 44 => {}
                    _ => return None,
                }
                let ext = frame.get(off..off + 8)?;
                match next {
                    44 => {
                        if be16(ext, 2)? & 0xfff8 != 0 {
                            return None;
                        }
                        fragment |= ext[3] & 1 != 0;
                        off += 8;
                    }
                    51 => off += (usize::from(ext[1]) + 2) * 4,
                    _ => off += (usize::from(ext[1]) + 1) * 8,
                }
                next = ext[0];
            }
            if next != IPPROTO_TCP && next != IPPROTO_UDP {
                return None;
            }
            let end = l3 + 40 + payload_len;
            let need = if next == IPPROTO_TCP { 20 } else { 8 };
            if payload_len != 0 && (end < off || end - off < need) {
                return None;
            }
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            let end = if payload_len == 0 { frame.len() } else { end };
            (src, dst, next, off, end, fragment)
        }
        _ => return None,
    };
    let header = if protocol == IPPROTO_TCP { 20 } else { 8 };
    let l4 = frame.get(l4_off..l4_off + header)?;
    Some(Parsed {
        src,
        dst,
        protocol,
        l4_off,
        end,
        src_port: be16(l4, 0)?,
        dst_port: be16(l4, 2)?,
        tcp_flags: if protocol == IPPROTO_TCP { l4[13] } else { 0 },
        fragment,
    })
}

/// Checks a frame's IPv4 header checksum and its TCP/UDP checksum (a zero
/// UDP checksum over IPv4 means "none" and passes). The L4 checksum of a
/// first fragment covers data the frame lacks, so it is not checked.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let parsed = parse(frame).ok_or("not a TCP/UDP packet a translator would touch")?;
    if parsed.src.is_ipv4() {
        let ihl = usize::from(frame[ETH_HLEN] & 0xf) * 4;
        let header = &frame[ETH_HLEN..ETH_HLEN + ihl];
        if checksum(header, 0) != 0 {
            return Err(format!(
                "bad IPv4 header checksum {:#06x}",
                be16(header, 10).unwrap()
            ));
        }
    }
    if parsed.fragment {
        return Ok(());
    }
    let l4 = frame
        .get(parsed.l4_off..parsed.end)
        .ok_or("datagram longer than the frame")?;
    let field = be16(frame, parsed.csum_off()).unwrap();
    if parsed.protocol == IPPROTO_UDP && field == 0 && parsed.src.is_ipv4() {
        return Ok(());
    }
    let sum = checksum(
        l4,
        pseudo_header_sum(parsed.src, parsed.dst, parsed.protocol, l4.len()),
    );
    if sum != 0 {
        return Err(format!(
            "bad {} checksum {field:#06x} (sums to {sum:#06x})",
            if parsed.protocol == IPPROTO_TCP {
                "TCP"
            } else {
                "UDP"
            }
        ));
    }
    Ok(())
}

/// Checks every checksum of an ICMP or ICMPv6 error frame (no IPv6
/// extension headers): the outer IPv4 header, the ICMP checksum, the quoted
/// IPv4 header, and the quoted packet's TCP/UDP checksum when it is quoted
/// whole. Returns the quoted packet.
pub fn verify_icmp_error(frame: &[u8]) -> Result<Vec<u8>, String> {
    let ip = &frame[ETH_HLEN..];
    let (src, dst, icmp): (IpAddr, IpAddr, &[u8]) = match ip[0] >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            if checksum(&ip[..ihl], 0) != 0 {
                return Err("bad outer IPv4 header checksum".into());
            }
            let src = IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            let dst = IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            (src, dst, &ip[ihl..])
        }
        6 => {
            let src = IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let dst = IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            (src, dst, &ip[40..])
        }
        _ => return Err("not IP".into()),
    };
    let sum = if src.is_ipv4() {
        checksum(icmp, 0)
    } else {
        checksum(
            icmp,
            pseudo_header_sum(src, dst, IPPROTO_ICMPV6, icmp.len()),
        )
    };
    if sum != 0 {
        return Err(format!("bad ICMP checksum (sums to {sum:#06x})"));
    }
    let quoted = &icmp[8..];
    let whole = if quoted[0] >> 4 == 4 {
        let ihl = usize::from(quoted[0] & 0xf) * 4;
        if checksum(&quoted[..ihl], 0) != 0 {
            return Err("bad quoted IPv4 header checksum".into());
        }
        usize::from(u16::from_be_bytes([quoted[2], quoted[3]])) <= quoted.len()
    } else {
        40 + usize::from(u16::from_be_bytes([quoted[4], quoted[5]])) <= quoted.len()
    };
    if whole {
        verify_checksums(&with_ethernet(quoted)).map_err(|e| format!("quoted packet: {e}"))?;
    }
    Ok(quoted.to_vec())
}

/// A small deterministic generator for randomized tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
