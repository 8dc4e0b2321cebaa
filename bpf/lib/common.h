/* SPDX-License-Identifier: GPL-2.0 */
/* Includes and helpers every BPF program of this project uses. */
#ifndef PROXY_REDIRECT_BPF_COMMON_H
#define PROXY_REDIRECT_BPF_COMMON_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "addr.h"

#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

/* What a TC program returns for a packet it hands on: in tcx TCX_NEXT
 * runs the next program of the chain (TCX_PASS, the same value as
 * TC_ACT_OK, would end it and hide the packet from every program behind
 * ours); on the legacy clsact path TC_ACT_UNSPEC, the same -1, runs the
 * next filter. Past the last program the packet goes on as with
 * TC_ACT_OK. (Named apart from the kernel's TCX_NEXT, which newer headers
 * define as an enum.) */
#define TC_NEXT (-1)

/* Return values of cgroup socket programs. */
#define SYS_REJECT 0
#define SYS_PROCEED 1

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))
#define barrier() asm volatile("" ::: "memory")

/**
 * stat_add() - add to a per-CPU counter
 * @map: a BPF_MAP_TYPE_PERCPU_ARRAY of __u64
 * @index: the counter
 * @value: how much to add
 */
static __always_inline void stat_add(void *map, __u32 index, __u64 value)
{
	__u64 *counter = bpf_map_lookup_elem(map, &index);

	if (counter)
		*counter += value;
}

/* User space reads the events in a loop that polls every 100 ms whatever
 * happens, so an event wakes it only once the ring holds this much: a
 * wakeup per event cost a connect() more than all the rest of redirect's
 * program. */
#define EVENTS_WAKEUP_BYTES (64 * 1024)

/**
 * submit_event() - hand a reserved event to user space
 * @ring: the BPF_MAP_TYPE_RINGBUF it was reserved in
 * @event: the event
 */
static __always_inline void submit_event(void *ring, void *event)
{
	__u64 flags = BPF_RB_NO_WAKEUP;

	if (bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA) > EVENTS_WAKEUP_BYTES)
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(event, flags);
}

static __always_inline int ipv4_is_loopback(__u32 addr)
{
	return (addr & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

static __always_inline int ipv6_is_loopback(const __u32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* ::ffff:a.b.c.d, the form an IPv4 peer of a dual-stack socket takes. */
static __always_inline int ipv6_is_v4_mapped(const __u32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

static __always_inline void endpoint_set_v4(struct endpoint *ep, __u32 ip, __u16 port)
{
	ep->family = ADDR_FAMILY_INET;
	ep->ip[0] = ip;
	ep->ip[1] = 0;
	ep->ip[2] = 0;
	ep->ip[3] = 0;
	ep->port = port;
}

/* A v4-mapped address becomes a plain IPv4 endpoint, so that both ends of a
 * dual-stack connection produce the same key. */
static __always_inline void endpoint_set_v6(struct endpoint *ep, const __u32 ip[4], __u16 port)
{
	if (ipv6_is_v4_mapped(ip)) {
		endpoint_set_v4(ep, ip[3], port);
		return;
	}
	ep->family = ADDR_FAMILY_INET6;
	ep->ip[0] = ip[0];
	ep->ip[1] = ip[1];
	ep->ip[2] = ip[2];
	ep->ip[3] = ip[3];
	ep->port = port;
}

#endif
