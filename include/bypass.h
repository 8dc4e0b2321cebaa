/* SPDX-License-Identifier: GPL-2.0 */
/* Types shared by bpf/bypass.bpf.c and src/bypass.rs. */
#ifndef PROXY_REDIRECT_BYPASS_H
#define PROXY_REDIRECT_BYPASS_H

#include "addr.h"

/* A connection as one of its sockets sees it, in its network namespace. The
 * peer socket's key is the same with local and remote swapped, so each end
 * finds the other, and only in its own namespace. */
struct sock_key {
	__u64 netns; /* the network namespace cookie */
	struct endpoint local;
	struct endpoint remote;
};

/* A program name, as bpf_get_current_comm() gives it. */
struct comm {
	char name[16];
};

/* A listening socket: its namespace and port (host order). */
struct listener_key {
	__u64 netns;
	__u16 port;
	__u16 pad[3];
};

/* How far a socket's reader has read, as its peer's sk_msg program sees it. */
struct reader {
	__u32 copied_seq; /* the socket's copied_seq at its last recvmsg */
	__u8 received;	  /* its reader has taken bytes from TCP with recvmsg */
	__u8 spliced;	  /* its reader uses splice(2): never redirect to it */
	__u8 pad[2];
};

/* Which end of the connection a socket is. */
enum bypass_side {
	SIDE_ACTIVE = 1,  /* connect() */
	SIDE_PASSIVE = 2, /* accept() */
};

/* Per-CPU counters, indexed by these. */
enum bypass_stat {
	BYPASS_STAT_ESTABLISHED = 0, /* TCP sockets seen established */
	BYPASS_STAT_OTHER_PORT,	     /* outside the -P ports */
	BYPASS_STAT_NOT_LOCAL,	     /* the peer is not in the socket's namespace */
	BYPASS_STAT_DATA_BEFORE,     /* bytes crossed TCP before it was established */
	BYPASS_STAT_SPLICE_READER,   /* owned by a program that reads with splice */
	BYPASS_STAT_STOPPING,	     /* established while bypass was stopping */
	BYPASS_STAT_INSERTED,
	BYPASS_STAT_INSERT_FAILED,
	BYPASS_STAT_MSG_REDIRECTED,
	BYPASS_STAT_BYTES_REDIRECTED,
	BYPASS_STAT_MSG_PASSED, /* no peer in the map: the normal path */
	BYPASS_STAT_BYTES_PASSED,
	BYPASS_STAT_EVENTS_LOST,
	BYPASS_STAT_MSG_PEER_BEHIND,  /* passed: the peer had not read earlier bytes */
	BYPASS_STAT_SPLICERS_LEARNED, /* programs seen splicing a sockmap socket */
	BYPASS_STAT_SPLICE_TOO_LATE,  /* first splice after messages were redirected */
	BYPASS_STAT_HELD_ELSEWHERE,   /* in another tool's sockmap with msg programs (EBUSY) */
	BYPASS_STAT_COUNT,
};

/* One record per insertion attempt, when events are on. */
struct bypass_event {
	__u64 timestamp_ns;
	__u64 cookie;
	__s32 error; /* 0: inserted; else -errno of the insertion */
	__u8 side;   /* enum bypass_side */
	__u8 pad[3];
	struct sock_key key;
};

#endif
