/* SPDX-License-Identifier: GPL-2.0 */
/* Parsing IPv4/IPv6 + TCP/UDP headers of a TC packet with bpf_skb_load_bytes,
 * which works on non-linear skbs and at any offset the headers dictate. */
#ifndef PROXY_REDIRECT_BPF_PARSE_H
#define PROXY_REDIRECT_BPF_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "lib/common.h"

#define IPPROTO_ICMP 1
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define IP_OFFSET_MASK 0x1fff
#define IP6_OFFSET_MASK 0xfff8
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_ESP 50
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60
/* IPv6 extension headers followed before giving up on a packet. */
#define IPV6_MAX_EXT_HEADERS 6

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define TCP_CSUM_OFFSET 16
#define TCP_HEADER_LEN 20
#define UDP_CSUM_OFFSET 6
#define UDP_HEADER_LEN 8

enum parse_result {
	PARSE_OK = 0,
	PARSE_OTHER,	 /* not IP, or not TCP/UDP: none of our business */
	PARSE_FRAGMENT,	 /* not the first fragment: no L4 header */
	PARSE_TRUNCATED, /* shorter than its headers say, or malformed */
	PARSE_UNPARSED,	 /* an IPv6 header chain we do not follow */
	PARSE_ICMP,	 /* ICMP or ICMPv6: l4_off, family and protocol are set */
};

/* The parts of a TCP/UDP packet a translator looks at. Addresses and ports
 * in network order; an IPv4 address sits in [0], the rest zero. */
struct l4_packet {
	__u32 src_ip[4];
	__u32 dst_ip[4];
	__u32 l4_off;
	__u16 src_port;
	__u16 dst_port;
	__u32 tcp_seq; /* host order */
	__u8 family;
	__u8 protocol;
	__u8 tcp_flags;
};

/**
 * l4_header_fits() - whether the datagram's own length covers the L4 header
 * @ip_len: bytes from the L4 header to the end of the datagram, as the IP
 *	header says; 0 for the length-less GSO packets of BIG TCP and jumbograms
 */
static __always_inline int l4_header_fits(__u32 ip_len, __u8 protocol)
{
	__u32 need = protocol == IPPROTO_TCP ? TCP_HEADER_LEN : UDP_HEADER_LEN;

	return ip_len == 0 || ip_len >= need;
}

static __always_inline int parse_l4(struct __sk_buff *skb, struct l4_packet *pkt)
{
	__u8 hdr[TCP_HEADER_LEN];
	__u32 len = pkt->protocol == IPPROTO_TCP ? TCP_HEADER_LEN : UDP_HEADER_LEN;

	if (len == TCP_HEADER_LEN) {
		if (bpf_skb_load_bytes(skb, pkt->l4_off, hdr, TCP_HEADER_LEN))
			return PARSE_TRUNCATED;
		pkt->tcp_flags = hdr[13];
		__builtin_memcpy(&pkt->tcp_seq, &hdr[4], sizeof(pkt->tcp_seq));
		pkt->tcp_seq = bpf_ntohl(pkt->tcp_seq);
	} else {
		if (bpf_skb_load_bytes(skb, pkt->l4_off, hdr, UDP_HEADER_LEN))
			return PARSE_TRUNCATED;
		pkt->tcp_flags = 0;
		pkt->tcp_seq = 0;
	}
	__builtin_memcpy(&pkt->src_port, &hdr[0], sizeof(pkt->src_port));
	__builtin_memcpy(&pkt->dst_port, &hdr[2], sizeof(pkt->dst_port));
	return PARSE_OK;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct l4_packet *pkt)
{
	struct iphdr ip;
	__u32 ihl_len, total;

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)))
		return PARSE_TRUNCATED;
	ihl_len = ip.ihl * 4;
	total = bpf_ntohs(ip.tot_len);
	if (ip.version != 4 || ihl_len < sizeof(ip))
		return PARSE_TRUNCATED;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP && ip.protocol != IPPROTO_ICMP)
		return PARSE_OTHER;
	if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
		return PARSE_FRAGMENT;
	if (ip.protocol == IPPROTO_ICMP) {
		pkt->family = ADDR_FAMILY_INET;
		pkt->protocol = IPPROTO_ICMP;
		pkt->l4_off = off + ihl_len;
		return PARSE_ICMP;
	}
	if (total != 0 && (total < ihl_len || !l4_header_fits(total - ihl_len, ip.protocol)))
		return PARSE_TRUNCATED;
	pkt->family = ADDR_FAMILY_INET;
	pkt->protocol = ip.protocol;
	pkt->src_ip[0] = ip.saddr;
	pkt->dst_ip[0] = ip.daddr;
	pkt->src_ip[1] = pkt->src_ip[2] = pkt->src_ip[3] = 0;
	pkt->dst_ip[1] = pkt->dst_ip[2] = pkt->dst_ip[3] = 0;
	pkt->l4_off = off + ihl_len;
	return parse_l4(skb, pkt);
}

/* Follows hop-by-hop, routing, destination options, fragment and AH
 * headers to TCP or UDP. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct l4_packet *pkt)
{
	struct ipv6hdr ip6;
	__u32 payload_end, l4_off = off + sizeof(ip6);
	__u8 nexthdr, ext[8];
	int i;

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
		return PARSE_TRUNCATED;
	if (ip6.version != 6)
		return PARSE_TRUNCATED;
	nexthdr = ip6.nexthdr;
	payload_end = l4_off + bpf_ntohs(ip6.payload_len);
	for (i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		if (nexthdr == IPPROTO_TCP || nexthdr == IPPROTO_UDP || nexthdr == IPPROTO_ICMPV6)
			break;
		switch (nexthdr) {
		case NEXTHDR_HOP:
		case NEXTHDR_ROUTING:
		case NEXTHDR_DEST:
		case NEXTHDR_AUTH:
		case NEXTHDR_FRAGMENT:
			break;
		case NEXTHDR_ESP:
			return PARSE_UNPARSED;
		default:
			return PARSE_OTHER;
		}
		if (bpf_skb_load_bytes(skb, l4_off, ext, sizeof(ext)))
			return PARSE_TRUNCATED;
		if (nexthdr == NEXTHDR_FRAGMENT) {
			__u16 frag_off;

			__builtin_memcpy(&frag_off, &ext[2], sizeof(frag_off));
			if (frag_off & bpf_htons(IP6_OFFSET_MASK))
				return PARSE_FRAGMENT;
			l4_off += 8;
		} else if (nexthdr == NEXTHDR_AUTH) {
			l4_off += ((__u32)ext[1] + 2) * 4;
		} else {
			l4_off += ((__u32)ext[1] + 1) * 8;
		}
		nexthdr = ext[0];
	}
	if (nexthdr == IPPROTO_ICMPV6) {
		pkt->family = ADDR_FAMILY_INET6;
		pkt->protocol = IPPROTO_ICMPV6;
		pkt->l4_off = l4_off;
		return PARSE_ICMP;
	}
	if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP)
		return PARSE_UNPARSED;
	if (ip6.payload_len != 0 &&
	    (payload_end < l4_off || !l4_header_fits(payload_end - l4_off, nexthdr)))
		return PARSE_TRUNCATED;
	pkt->family = ADDR_FAMILY_INET6;
	pkt->protocol = nexthdr;
	__builtin_memcpy(pkt->src_ip, &ip6.saddr, sizeof(pkt->src_ip));
	__builtin_memcpy(pkt->dst_ip, &ip6.daddr, sizeof(pkt->dst_ip));
	pkt->l4_off = l4_off;
	return parse_l4(skb, pkt);
}

/**
 * parse_packet() - find the TCP/UDP header of a packet
 * @l2_len: ETH_HLEN on Ethernet-like devices, 0 on L3 devices (tun,
 *	WireGuard), where TC sees the IP header first and the IP version
 *	says which one it is
 *
 * Returns PARSE_OK with @pkt filled in, or why the packet is not one.
 */
static __always_inline int parse_packet(struct __sk_buff *skb, __u32 l2_len, struct l4_packet *pkt)
{
	__u8 version;

	if (l2_len) {
		if (skb->protocol == bpf_htons(ETH_P_IP))
			return parse_ipv4(skb, l2_len, pkt);
		if (skb->protocol == bpf_htons(ETH_P_IPV6))
			return parse_ipv6(skb, l2_len, pkt);
		return PARSE_OTHER;
	}
	if (bpf_skb_load_bytes(skb, 0, &version, sizeof(version)))
		return PARSE_TRUNCATED;
	if (version >> 4 == 4)
		return parse_ipv4(skb, 0, pkt);
	if (version >> 4 == 6)
		return parse_ipv6(skb, 0, pkt);
	return PARSE_OTHER;
}

#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4
#define ICMP_HEADER_LEN 8

/**
 * parse_icmp_error() - the TCP/UDP packet an ICMP or ICMPv6 error is about
 * @pkt: a PARSE_ICMP result; on PARSE_OK it describes the embedded packet
 *	(its addresses, ports and l4_off, from which only the first 8 bytes
 *	are sure to be present)
 * @icmp_off: set to the offset of the ICMP header
 *
 * Only an embedded IPv6 header directly followed by TCP or UDP is read.
 */
static __always_inline int parse_icmp_error(struct __sk_buff *skb, struct l4_packet *pkt,
					    __u32 *icmp_off)
{
	__u32 inner = pkt->l4_off + ICMP_HEADER_LEN;
	__u8 hdr[8];

	*icmp_off = pkt->l4_off;
	if (bpf_skb_load_bytes(skb, pkt->l4_off, hdr, sizeof(hdr)))
		return PARSE_TRUNCATED;
	if (pkt->family == ADDR_FAMILY_INET) {
		struct iphdr ip;

		if (hdr[0] != ICMP_DEST_UNREACH && hdr[0] != ICMP_TIME_EXCEEDED &&
		    hdr[0] != ICMP_PARAMETERPROB)
			return PARSE_OTHER;
		if (bpf_skb_load_bytes(skb, inner, &ip, sizeof(ip)))
			return PARSE_TRUNCATED;
		if (ip.version != 4 || ip.ihl < 5)
			return PARSE_TRUNCATED;
		if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
			return PARSE_OTHER;
		if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
			return PARSE_FRAGMENT;
		pkt->protocol = ip.protocol;
		pkt->src_ip[0] = ip.saddr;
		pkt->dst_ip[0] = ip.daddr;
		pkt->src_ip[1] = pkt->src_ip[2] = pkt->src_ip[3] = 0;
		pkt->dst_ip[1] = pkt->dst_ip[2] = pkt->dst_ip[3] = 0;
		pkt->l4_off = inner + ip.ihl * 4;
	} else {
		struct ipv6hdr ip6;

		if (hdr[0] != ICMPV6_DEST_UNREACH && hdr[0] != ICMPV6_PKT_TOOBIG &&
		    hdr[0] != ICMPV6_TIME_EXCEED && hdr[0] != ICMPV6_PARAMPROB)
			return PARSE_OTHER;
		if (bpf_skb_load_bytes(skb, inner, &ip6, sizeof(ip6)))
			return PARSE_TRUNCATED;
		if (ip6.version != 6)
			return PARSE_TRUNCATED;
		if (ip6.nexthdr != IPPROTO_TCP && ip6.nexthdr != IPPROTO_UDP)
			return PARSE_UNPARSED;
		pkt->protocol = ip6.nexthdr;
		__builtin_memcpy(pkt->src_ip, &ip6.saddr, sizeof(pkt->src_ip));
		__builtin_memcpy(pkt->dst_ip, &ip6.daddr, sizeof(pkt->dst_ip));
		pkt->l4_off = inner + sizeof(ip6);
	}
	if (bpf_skb_load_bytes(skb, pkt->l4_off, hdr, sizeof(hdr)))
		return PARSE_TRUNCATED;
	__builtin_memcpy(&pkt->src_port, &hdr[0], sizeof(pkt->src_port));
	__builtin_memcpy(&pkt->dst_port, &hdr[2], sizeof(pkt->dst_port));
	pkt->tcp_flags = 0;
	pkt->tcp_seq = 0;
	return PARSE_OK;
}

#endif
