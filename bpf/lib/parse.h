/* SPDX-License-Identifier: GPL-2.0 */
/* Parsing IPv4/IPv6 + TCP/UDP headers of a TC packet with bpf_skb_load_bytes,
 * which works on non-linear skbs and at any offset the headers dictate. */
#ifndef PROXY_REDIRECT_BPF_PARSE_H
#define PROXY_REDIRECT_BPF_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#include "lib/common.h"

#define IPPROTO_UDP 17
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
};

/* The parts of a TCP/UDP packet a translator looks at. Addresses and ports
 * in network order; an IPv4 address sits in [0], the rest zero. */
struct l4_packet {
	__u32 src_ip[4];
	__u32 dst_ip[4];
	__u32 l4_off;
	__u16 src_port;
	__u16 dst_port;
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
	} else {
		if (bpf_skb_load_bytes(skb, pkt->l4_off, hdr, UDP_HEADER_LEN))
			return PARSE_TRUNCATED;
		pkt->tcp_flags = 0;
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
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return PARSE_OTHER;
	if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
		return PARSE_FRAGMENT;
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
		if (nexthdr == IPPROTO_TCP || nexthdr == IPPROTO_UDP)
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
 * parse_packet() - find the TCP/UDP header of an Ethernet frame
 *
 * Returns PARSE_OK with @pkt filled in, or why the packet is not one.
 */
static __always_inline int parse_packet(struct __sk_buff *skb, struct l4_packet *pkt)
{
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, ETH_HLEN, pkt);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, ETH_HLEN, pkt);
	return PARSE_OTHER;
}

#endif
