/* SPDX-License-Identifier: GPL-2.0 */
/* Types shared by bpf/redirect.bpf.c and src/redirect.rs. */
#ifndef PROXY_REDIRECT_REDIRECT_H
#define PROXY_REDIRECT_REDIRECT_H

#include "addr.h"

/* A redirected connection as the proxy's accepted socket sees it:
 * local = the proxy's listening address, peer = the client. */
struct conn_tuple {
	struct endpoint local;
	struct endpoint peer;
};

/* A connection waiting for the proxy to accept it. The same 4-tuple exists
 * in every network namespace (127.0.0.1:port -> 127.0.0.1:15001), so the
 * namespace is part of the key. */
struct handover_key {
	__u64 netns_cookie;
	struct conn_tuple tuple;
};

/* What a redirected socket's storage holds from connect4/6 or sendmsg4/6
 * on: where it wanted to go, who asked and, for the UDP relay, which
 * socket it is. */
struct client_record {
	struct endpoint original;
	__u32 uid;
	__u64 cookie; /* UDP only: the relay's replies ask for it */
	__u32 table;  /* enum pending_table: where its TCP record went */
	__u32 pad;
};

/* Where a TCP client's record went at its SYN, so that its close looks in
 * that one table. */
enum pending_table {
	PENDING_NONE = 0,     /* not published */
	PENDING_FIRST = 1,    /* pending_orig_dst */
	PENDING_OVERFLOW = 2, /* pending_overflow: pending_orig_dst was full */
	PENDING_REFUSED = 3,  /* refused: refused_orig_dst has its key */
};

/* A connection between the client's SYN and the proxy's accept. */
struct pending_record {
	struct endpoint original;
	__u32 uid; /* whose share of pending_overflow it takes there */
};

/* The waiting records' tables (here, so that pins::layout_hash sees them):
 * the first table, first come first served, and the overflow. */
#define PENDING_FIRST_RECORDS 4096
#define PENDING_OVERFLOW_RECORDS 65536

/* Of the 65,536 records of the overflow (pending_overflow, used once the
 * first table's 4,096 are taken), one network namespace may hold this many,
 * and one user other than root as many again, in all its namespaces:
 * nobody can take the others' records away. */
#define PENDING_NETNS_SHARE 4096
#define PENDING_UID_SHARE 4096

/* The last redirected datagram a UDP socket of a namespace sent, by its
 * port: the relay still learns where a datagram goes when its sender
 * closed right after sendto(). */
struct udp_sender_key {
	__u64 netns_cookie;
	__u16 port; /* network order */
	__u16 family;
	__u32 pad;
};

/* The datagram the relay's UDP socket of one family just received: who
 * sent it (address, socket, user), in which network namespace, and its
 * original destination (family 0: none). The relay-side recvmsg program
 * writes it on every datagram; the relay's thread reads it right after
 * recvfrom. Before it sends a reply, the relay writes the socket the reply
 * is for into reply_cookie, and the relay-side sendmsg program refuses the
 * send when another socket holds the client's port by then. */
struct udp_relay_slot {
	__u64 netns_cookie;
	__u64 client_cookie;
	__u64 reply_cookie;
	__u32 uid;
	__u32 pad;
	struct endpoint client;
	struct endpoint original;
};

/* udp_relay_slots: one slot per relay socket. */
enum udp_relay_slot_index {
	UDP_SLOT_INET = 0,
	UDP_SLOT_INET6 = 1,
	UDP_SLOT_COUNT = 2,
};

/* Why a record was refused (pending_refusals, per network namespace). */
enum refusal_reason {
	REFUSED_NETNS_SHARE = 1, /* the namespace holds PENDING_NETNS_SHARE */
	REFUSED_UID_SHARE = 2,	 /* the user holds PENDING_UID_SHARE */
	REFUSED_TABLE_FULL = 3,	 /* both tables are full */
};

struct refusal_key {
	__u64 netns_cookie;
	__u32 reason; /* enum refusal_reason */
	__u32 pad;
};

enum redirect_action {
	ACTION_REDIRECT = 1,
	ACTION_BYPASS = 2,
	ACTION_REFUSE = 3, /* no proxy, --when-proxy-down closed */
};

/* What a connect() does when nothing listens on the proxy address. */
enum proxy_down_policy {
	PROXY_DOWN_OPEN = 0,   /* go to the original destination */
	PROXY_DOWN_CLOSED = 1, /* fail with ECONNREFUSED */
};

/* Why a connection to a matched port was left alone. */
enum bypass_reason {
	REASON_NONE = 0,
	REASON_LOOPBACK = 1,
	REASON_PROXY_ADDRESS = 2,
	REASON_EXCLUDED_CIDR = 3,
	REASON_NOT_INCLUDED = 4,
	REASON_EXCLUDED_USER = 5,
	REASON_PROXY_MARK = 6,
	REASON_PROXY_PROCESS = 7,
	REASON_NO_PROXY = 8,
	REASON_BOUND_TO_DEVICE = 9,
	REASON_NO_MEMORY = 10, /* no socket storage for the record */
	REASON_COUNT = 11,
};

/* Per-CPU counters, indexed by these. STAT_BYPASSED + reason counts each
 * bypass reason separately. */
enum redirect_stat {
	STAT_TCP_CONNECTS = 0,
	STAT_OTHER_PORT = 1,
	STAT_REDIRECTED = 2,
	STAT_BYPASSED = 3,			     /* + enum bypass_reason, REASON_COUNT slots */
	STAT_REFUSED = STAT_BYPASSED + REASON_COUNT, /* no proxy, fail closed */
	STAT_ORIG_DST_PENDING,			     /* the client's SYN is about to leave */
	STAT_ORIG_DST_HANDED_OVER,		     /* moved to the proxy's accepted socket */
	STAT_ORIG_DST_UNCLAIMED, /* the client closed before the proxy accepted */
	STAT_ORIG_DST_ANSWERED,
	STAT_ORIG_DST_RELEASED, /* no longer counted: kept for the pinned layout */
	STAT_ORIG_DST_LOST,	/* a record could not be stored: map full, no memory */
	STAT_ORIG_DST_REFUSED,	/* over a namespace's or a user's share */
	STAT_EVENTS_LOST,
	STAT_UDP_SENDS,		/* connects and unconnected sends of UDP sockets */
	STAT_UDP_TO_PROXY,	/* datagrams whose destination the proxy was told */
	STAT_UDP_NO_RECORD,	/* datagrams at the proxy from no redirected socket */
	STAT_UDP_REPLIES,	/* replies shown as coming from the original */
	STAT_UDP_FROM_RECORD,	/* datagrams whose sender had closed: its last send told */
	STAT_UDP_REPLY_REFUSED, /* replies for a socket that is gone */
	STAT_PEERNAME_ANSWERED, /* getpeername() told the original destination */
	STAT_COUNT,
};

struct redirect_event {
	__u64 timestamp_ns;
	__u64 cookie;
	__u32 pid;
	__u32 uid;
	__u8 action;   /* enum redirect_action */
	__u8 reason;   /* enum bypass_reason */
	__u8 protocol; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[5];
	char comm[16];
	struct endpoint original;
	struct endpoint target; /* where the connection went */
};

#endif
