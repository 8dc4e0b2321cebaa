/* SPDX-License-Identifier: GPL-2.0 */
/* The built-in proxy's listening sockets, for the datapaths that run it. */
#ifndef PROXY_REDIRECT_BPF_PROXY_LISTENERS_H
#define PROXY_REDIRECT_BPF_PROXY_LISTENERS_H

#include "lib/common.h"

#define PROXY_LISTENER_V4 0
#define PROXY_LISTENER_V6 1

/* Filled from user space, IPv4 then IPv6. The kernel takes a socket out
 * when it closes, so one found here is listening. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} proxy_listeners SEC(".maps");

#endif
