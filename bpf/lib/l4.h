/* SPDX-License-Identifier: GPL-2.0 */
/* Rewriting TCP/UDP ports with the kernel's checksum helpers. */
#ifndef PROXY_REDIRECT_BPF_L4_H
#define PROXY_REDIRECT_BPF_L4_H

#include "lib/parse.h"

#define L4_SRC_PORT_OFFSET 0
#define L4_DST_PORT_OFFSET 2

/**
 * l4_rewrite_port() - replace a port and fix the TCP/UDP checksum
 * @port_offset: L4_SRC_PORT_OFFSET or L4_DST_PORT_OFFSET
 * @old_port, @new_port: network order
 *
 * bpf_l4_csum_replace() is right for CHECKSUM_PARTIAL packets (it leaves the
 * pseudo-header sum alone, the port is not part of it) and CHECKSUM_COMPLETE
 * ones (the checksum and port deltas cancel in skb->csum). A zero UDP
 * checksum means "none" and stays zero (BPF_F_MARK_MANGLED_0); a result of
 * zero is written as 0xffff. No IP header field changes, so the IPv4 header
 * checksum needs no update.
 *
 * Invalidates every packet pointer. Returns 0, or -1 when the checksum could
 * not be updated (packet unchanged), -2 when the port could not be written
 * (checksum already changed: the caller must drop the packet).
 */
static __always_inline int l4_rewrite_port(struct __sk_buff *skb, const struct l4_packet *pkt,
					   __u32 port_offset, __u16 old_port, __u16 new_port)
{
	__u32 csum_off = pkt->l4_off;
	__u64 flags = sizeof(new_port);

	if (pkt->protocol == IPPROTO_TCP) {
		csum_off += TCP_CSUM_OFFSET;
	} else {
		csum_off += UDP_CSUM_OFFSET;
		flags |= BPF_F_MARK_MANGLED_0;
	}
	if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, flags))
		return -1;
	if (bpf_skb_store_bytes(skb, pkt->l4_off + port_offset, &new_port, sizeof(new_port), 0))
		return -2;
	return 0;
}

/* RFC 1624: a one's complement checksum after one 16-bit word changed;
 * arguments and result in the same (network) order. */
static __always_inline __u16 csum16_replace(__u16 check, __u16 old_word, __u16 new_word)
{
	__u32 sum = (__u16)~check + (__u16)~old_word + (__u32)new_word;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/**
 * l4_rewrite_embedded_port() - replace a port of the packet an ICMP error
 * quotes
 * @pkt: the embedded packet, from parse_icmp_error()
 * @icmp_off: where the ICMP header starts
 * @port_offset: L4_SRC_PORT_OFFSET or L4_DST_PORT_OFFSET
 * @old_port, @new_port: network order
 *
 * The embedded TCP/UDP checksum covers the port. Where the error quotes it
 * (UDP always, unless zero: "none"; TCP when 18 bytes or more are quoted)
 * it is updated in software: it lies in the ICMP payload, not where the
 * checksum helpers work. Port and checksum then change by opposite amounts,
 * so the ICMP checksum, which covers both, stays right as it is (and so does
 * skb->csum of a CHECKSUM_COMPLETE packet). Otherwise the ICMP checksum takes
 * the change, through bpf_l4_csum_replace().
 *
 * Invalidates every packet pointer. Returns 0, or -1 when the packet could
 * not be changed consistently (the caller must drop it).
 */
static __always_inline int l4_rewrite_embedded_port(struct __sk_buff *skb,
						    const struct l4_packet *pkt, __u32 icmp_off,
						    __u32 port_offset, __u16 old_port,
						    __u16 new_port)
{
	__u32 csum_off = pkt->l4_off;
	__u16 csum;

	csum_off += pkt->protocol == IPPROTO_TCP ? TCP_CSUM_OFFSET : UDP_CSUM_OFFSET;
	if (bpf_skb_load_bytes(skb, csum_off, &csum, sizeof(csum)) == 0 &&
	    (csum != 0 || pkt->protocol == IPPROTO_TCP)) {
		csum = csum16_replace(csum, old_port, new_port);
		if (csum == 0 && pkt->protocol == IPPROTO_UDP)
			csum = 0xffff;
		if (bpf_skb_store_bytes(skb, csum_off, &csum, sizeof(csum), 0))
			return -1;
	} else if (bpf_l4_csum_replace(skb, icmp_off + 2, old_port, new_port, sizeof(new_port))) {
		return -1;
	}
	if (bpf_skb_store_bytes(skb, pkt->l4_off + port_offset, &new_port, sizeof(new_port), 0))
		return -1;
	return 0;
}

#endif
