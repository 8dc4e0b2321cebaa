/* SPDX-License-Identifier: GPL-2.0 */
/* Types shared by bpf/tproxy.bpf.c and src/tproxy.rs. */
#ifndef PROXY_REDIRECT_TPROXY_H
#define PROXY_REDIRECT_TPROXY_H

#include "addr.h"

/* What happened to the first packet (SYN) of a matched connection. */
enum tproxy_action {
	TPROXY_INTERCEPT = 1,	  /* assigned to the transparent listener */
	TPROXY_NO_LISTENER = 2,	  /* nobody listens on the proxy address: forwarded */
	TPROXY_ASSIGN_FAILED = 3, /* bpf_sk_assign refused: forwarded */
};

/* Per-CPU counters, indexed by these. */
enum tproxy_stat {
	TSTAT_TCP_PACKETS = 0,	  /* TCP packets seen on the interface */
	TSTAT_OTHER_PORT,	  /* to a port that is not intercepted */
	TSTAT_NEW_CONNECTIONS,	  /* SYNs handed to the listener */
	TSTAT_SYNCOOKIE_ACKS,	  /* ACKs with a valid syncookie handed to the listener */
	TSTAT_SOCKET_PACKETS,	  /* packets handed to an existing local socket */
	TSTAT_NOT_OURS,		  /* mid-flow packets of flows without a local socket */
	TSTAT_NO_LISTENER,	  /* SYNs forwarded because nobody listened */
	TSTAT_ASSIGN_FAILED,	  /* bpf_sk_assign failed */
	TSTAT_UNPARSED,		  /* IP fragments, truncated packets, ESP */
	TSTAT_TIME_WAIT_SYNS,	  /* SYNs that reuse the 4-tuple of a TIME_WAIT socket */
	TSTAT_SK_LOOKUP_ASSIGNED, /* listener lookups (TIME_WAIT reuse) given the proxy */
	TSTAT_EVENTS_LOST,	  /* ring buffer full */
	TSTAT_UPSTREAM_REPLIES,	  /* packets from upstream handed to a local socket */
	TSTAT_COUNT,
};

struct tproxy_event {
	__u64 timestamp_ns;
	__u8 action; /* enum tproxy_action */
	__u8 pad[3];
	__s32 error; /* bpf_sk_assign's error for TPROXY_ASSIGN_FAILED */
	struct endpoint client;
	struct endpoint original; /* the destination the client asked for */
};

#endif
