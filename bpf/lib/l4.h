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

#endif
