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

enum redirect_action {
	ACTION_REDIRECT = 1,
	ACTION_BYPASS = 2,
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
	REASON_COUNT = 9,
};

/* Per-CPU counters, indexed by these. STAT_BYPASSED + reason counts each
 * bypass reason separately. */
enum redirect_stat {
	STAT_TCP_CONNECTS = 0,
	STAT_OTHER_PORT = 1,
	STAT_REDIRECTED = 2,
	STAT_BYPASSED = 3, /* + enum bypass_reason, REASON_COUNT slots */
	STAT_ORIG_DST_REKEYED = STAT_BYPASSED + REASON_COUNT,
	STAT_ORIG_DST_ANSWERED,
	STAT_ORIG_DST_REMOVED,
	STAT_EVENTS_LOST,
	STAT_COUNT,
};

struct redirect_event {
	__u64 timestamp_ns;
	__u64 cookie;
	__u32 pid;
	__u32 uid;
	__u8 action; /* enum redirect_action */
	__u8 reason; /* enum bypass_reason */
	__u8 pad[6];
	char comm[16];
	struct endpoint original;
	struct endpoint target; /* where the connection went */
};

#endif
