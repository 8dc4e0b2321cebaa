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
	__u8 received;	  /* its reader reads with recvmsg (it did, or its kind does) */
	__u8 spliced;	  /* its reader uses splice(2): never redirect to it */
	__u8 side;	  /* the socket's, enum bypass_side */
	__u8 pad;
};

/* A connection as its active (connecting) side sees it, in no namespace:
 * where the two sockets of one connection meet to prove they are its two
 * ends (--across-namespaces). */
struct pair_key {
	struct endpoint active;
	struct endpoint passive;
};

/* The first socket of a connection to be seen established, waiting for the
 * other end. The proof is the pair of sequence numbers as the active side
 * counts them (snd_nxt, rcv_nxt): the passive side's (rcv_nxt, snd_nxt). */
struct pair_candidate {
	__u64 cookie;
	__u64 since_ns;
	struct sock_key key; /* its own key, for the peer's sk_msg to find its reader */
	__u32 active_snd_nxt;
	__u32 active_rcv_nxt;
	__u8 side;     /* enum bypass_side */
	__u8 poisoned; /* another socket claimed the same connection: pair neither */
	__u8 pad[6];
};

/* What a socket of a cross-namespace pair knows of its peer (socket
 * storage; a proof waiting for the first end, in `proofs`). cookie 0:
 * proven by nobody yet. */
struct pair_peer {
	__u64 cookie;	  /* the peer's key in the `paired` map */
	__u64 own_cookie; /* this socket's, under which a proof waits for it */
	struct sock_key key;
};

/* The control map: flags user space sets, which every generation's programs
 * read. */
enum bypass_control {
	CONTROL_STOPPING = 0, /* stopped for good: no new insertions, no new redirects */
	CONTROL_ACROSS = 1,   /* --across-namespaces */
	CONTROL_COUNT = 2,
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
	BYPASS_STAT_ACROSS_WAITING,   /* across namespaces: first end seen, waiting for the other */
	BYPASS_STAT_ACROSS_PAIRED,    /* across namespaces: pairs proven */
	BYPASS_STAT_ACROSS_UNPROVEN, /* across namespaces: no other end here (a remote peer, NAT) */
	BYPASS_STAT_ACROSS_MISMATCH, /* across namespaces: the sequence numbers disagreed */
	BYPASS_STAT_ACROSS_AMBIGUOUS, /* across namespaces: two sockets claimed one connection */
	BYPASS_STAT_REPAIR,	      /* a TCP_REPAIR socket (checkpoint/restore): left alone */
	BYPASS_STAT_ULP,	      /* a socket with a ULP (an MPTCP subflow, kTLS): left alone */
	BYPASS_STAT_MSG_ULP,	      /* messages of a socket that got a ULP (kTLS) later: passed */
	BYPASS_STAT_MSG_ACROSS,	      /* messages redirected across namespaces */
	BYPASS_STAT_BYTES_ACROSS,     /* bytes redirected across namespaces */
	BYPASS_STAT_RECV_READERS_LEARNED, /* programs seen reading a socket in the map with recvmsg
					   */
	BYPASS_STAT_KNOWN_READER, /* sockets of such programs: bypassed from the first byte */
	BYPASS_STAT_COUNT,
};

/* One record per insertion attempt, when events are on. */
struct bypass_event {
	__u64 timestamp_ns;
	__u64 cookie;
	__s32 error; /* 0: inserted; else -errno of the insertion */
	__u8 side;   /* enum bypass_side */
	__u8 across; /* into `paired`: its peer is in another namespace */
	__u8 pad[2];
	struct sock_key key;
};

#endif
