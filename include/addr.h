/* SPDX-License-Identifier: GPL-2.0 */
/* Socket addresses as both BPF and Rust see them. */
#ifndef PROXY_REDIRECT_ADDR_H
#define PROXY_REDIRECT_ADDR_H

#include <linux/types.h>

#define ADDR_FAMILY_INET 2
#define ADDR_FAMILY_INET6 10

/* An IPv4 or IPv6 endpoint. ip[] and port are in network byte order; an IPv4
 * address sits in ip[0] with ip[1..3] zero. */
struct endpoint {
	__u32 ip[4];
	__u16 port;
	__u16 family;
};

/* Longest-prefix-match keys for the include/exclude CIDR tries. */
struct cidr_v4_key {
	__u32 prefixlen;
	__u32 addr;
};

struct cidr_v6_key {
	__u32 prefixlen;
	__u32 addr[4];
};

#endif
