/* SPDX-License-Identifier: GPL-2.0 */
/* Types shared by bpf/port_nat.bpf.c and src/port_nat.rs. */
#ifndef PROXY_REDIRECT_PORT_NAT_H
#define PROXY_REDIRECT_PORT_NAT_H

#include <linux/types.h>

/* What a port (host order) is to the translator: the FROM of a mapping,
 * the TO of one, or both. */
struct nat_port {
	__u16 to_port; /* host order; valid with NAT_PORT_FROM */
	__u8 role;     /* NAT_PORT_FROM | NAT_PORT_TO */
	__u8 pad;
};

#define NAT_PORT_FROM 1
#define NAT_PORT_TO 2

/* --proto, a mask of these. */
#define NAT_PROTO_TCP 1
#define NAT_PROTO_UDP 2

/* A translated flow as the server sees it: client -> server:TO. Addresses
 * and ports in network order; an IPv4 address sits in [0], the rest zero. */
struct nat_flow_key {
	__u32 client_ip[4];
	__u32 server_ip[4];
	__u16 client_port;
	__u16 server_port; /* TO */
	__u8 family;	   /* ADDR_FAMILY_INET or ADDR_FAMILY_INET6 */
	__u8 protocol;	   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[2];
};

enum nat_flow_state {
	FLOW_TCP_SYN_SENT = 1, /* SYN seen, no answer yet */
	FLOW_TCP_ESTABLISHED = 2,
	FLOW_TCP_CLOSING = 3, /* FIN or RST seen */
	FLOW_UDP = 4,
};

/* Direction indexes of the per-flow counters. */
#define NAT_DIR_ORIGINAL 0 /* client -> server, ingress */
#define NAT_DIR_REPLY 1	   /* server -> client, egress */

struct nat_flow {
	__u64 created_ns; /* bpf_ktime_get_ns() */
	__u64 last_seen_ns;
	__u64 packets[2]; /* NAT_DIR_* */
	__u64 bytes[2];
	__u16 original_port; /* FROM, network order */
	__u8 state;	     /* enum nat_flow_state */
	__u8 pad;
	__u32 client_seq; /* TCP: sequence number of the client's latest packet */
};

/* How far (bytes, either way) a RST or FIN straight to TO may be from the
 * client's latest sequence number and still end the flow. */
#define NAT_SEQ_WINDOW (1U << 20)

/* Per-CPU counters, indexed by these. */
enum nat_stat {
	NAT_STAT_PACKETS = 0, /* seen by either program */
	NAT_STAT_BYTES,
	NAT_STAT_INGRESS_TRANSLATED,
	NAT_STAT_EGRESS_TRANSLATED,
	NAT_STAT_NEW_FLOWS,
	NAT_STAT_REUSED_FLOWS,	  /* a new SYN took over an old flow's tuple */
	NAT_STAT_DIRECT_STALE,	  /* a direct SYN, or in-window RST/FIN, to TO ended a flow */
	NAT_STAT_DIRECT_IGNORED,  /* any other direct packet to TO on a tracked tuple */
	NAT_STAT_PASS_LOCAL,	  /* to FROM, but owned by a connected local socket */
	NAT_STAT_OUT_OF_WINDOW,	  /* via FROM, far from the client's sequence numbers */
	NAT_STAT_REPLY_UNTRACKED, /* from TO, no flow: left alone */
	NAT_STAT_ICMP_TRANSLATED, /* ICMP/ICMPv6 errors about a translated flow */
	NAT_STAT_PASS_FRAGMENT,
	NAT_STAT_PASS_TRUNCATED,
	NAT_STAT_PASS_UNPARSED, /* unknown or unsupported IPv6 extension header */
	NAT_STAT_DROP_TRACK_FAILED,
	NAT_STAT_DROP_REWRITE_FAILED,
	NAT_STAT_EVENTS_LOST,
	NAT_STAT_COUNT,
};

/* One record per rewritten packet, when emit_events is set. */
struct nat_event {
	__u64 timestamp_ns;
	__u32 src_ip[4]; /* the packet as it came, network order */
	__u32 dst_ip[4];
	__u16 src_port;
	__u16 dst_port;
	__u16 new_port; /* the port written, network order */
	__u8 family;
	__u8 protocol;
	__u8 direction; /* NAT_DIR_ORIGINAL (ingress) or NAT_DIR_REPLY (egress) */
	__u8 new_flow;
	__u8 pad[6];
};

#endif
