// SPDX-License-Identifier: GPL-2.0
/*
 * redirect: send outbound TCP connect()s from a cgroup to a local proxy, and
 * answer the proxy's SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST as iptables
 * REDIRECT would.
 *
 * The original destination travels with the connection's sockets:
 *  1. connect4/6 keep it in the client socket's local storage;
 *  2. sockops TCP_CONNECT_CB (the 4-tuple is known, the SYN has not left)
 *     publishes it under (network namespace, 4-tuple), because the proxy's
 *     accepted socket is another socket and a getsockopt program cannot
 *     read socket cookies;
 *  3. sockops PASSIVE_ESTABLISHED_CB on the proxy's accepted socket (with
 *     TCP Fast Open, at the SYN) moves it into that socket's local storage
 *     (or the proxy's first SO_ORIGINAL_DST does, if it comes first);
 *  4. getsockopt answers from the caller's own socket storage only, so no
 *     other socket, namespace or user can ever read it, and it dies with
 *     the proxy's socket.
 * A client that closes before the proxy's handshake ends takes its record
 * with it.
 *
 * UDP (--udp-ports): connect4/6 (a connected socket) and sendmsg4/6 (each
 * unconnected send) keep the destination in the same socket storage and
 * send the datagrams to the proxy; recvmsg4/6 on the client show the
 * proxy's replies as coming from that destination, and getpeername4/6 tell
 * it as the peer of a redirected TCP or connected UDP socket. On the proxy's
 * UDP socket, recvmsg4/6 find the sending socket in the caller's namespace
 * and leave its destination, for this one datagram, in the relay socket's
 * slot, which the relay reads as soon as its recvfrom returns.
 */
#include "lib/common.h"
#include "lib/proxy_listeners.h"
#include "redirect.h"

#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* IP6T_SO_ORIGINAL_DST has the same number */
#define PAGE_SIZE 4096
#define LOOPBACK_IFINDEX 1 /* lo, in every network namespace */
#define ECONNREFUSED 111
#define ENOBUFS 105
#define E2BIG 7

/* Configuration, set by user space before load. */
const volatile __u32 proxy_ip4;	   /* network order */
const volatile __u32 proxy_ip6[4]; /* network order */
const volatile __u16 proxy_port;   /* network order */
const volatile __u32 proxy_mark;   /* 0: no mark check */
const volatile __u32 proxy_tgid;   /* 0: no process check */
/* The network namespace of the built-in proxy's listening sockets; 0
 * without the built-in proxy. */
const volatile __u64 proxy_netns_cookie;
const volatile __u8 emit_events;

/* Filters that a reload (SIGHUP) changes in place, through the mmap'ed
 * .bss: volatile, so every run reads the current value. */
volatile __u32 excluded_uid;
volatile __u8 has_excluded_uid;
/* Whether each CIDR trie has entries: an empty trie costs a lookup too. */
volatile __u8 include_v4_active;
volatile __u8 include_v6_active;
volatile __u8 exclude_v4_active;
volatile __u8 exclude_v6_active;
volatile __u8 proxy_down_policy; /* enum proxy_down_policy */

/* 1 at each destination port (host order) whose TCP connections are
 * redirected. An array, which the JIT looks up inline: a hash lookup was a
 * tenth of connect4's time. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} redirect_ports SEC(".maps");

/* The same for UDP datagrams. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} redirect_udp_ports SEC(".maps");

/* Destinations to redirect only (when include_v*_active) and never. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_v4_key);
	__type(value, __u8);
} include_v4 SEC(".maps"), exclude_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_v6_key);
	__type(value, __u8);
} include_v6 SEC(".maps"), exclude_v6 SEC(".maps");

/* The client socket's original destination, from connect4/6 on. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct client_record);
} client_orig_dst SEC(".maps");

/* Original destinations between the client's SYN and the proxy's accept.
 * Nearly every record lives for a handshake on loopback, so few wait at
 * once: they go to a small table, whose buckets stay in the cache (a
 * close's lookup in the 65,536 buckets of one big table missed it, and
 * cost a client a fifth of its BPF), first come first served; only when it
 * is full do they go to the overflow, where every namespace and user has
 * its share (PENDING_NETNS_SHARE). Whoever fills the first table takes
 * nobody's share of the overflow, and no connection pays for the shares
 * while the first table has room. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PENDING_FIRST_RECORDS);
	__type(key, struct handover_key);
	__type(value, struct pending_record);
} pending_orig_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PENDING_OVERFLOW_RECORDS);
	__type(key, struct handover_key);
	__type(value, struct pending_record);
} pending_overflow SEC(".maps");

/* How many records of the overflow each network namespace and each user
 * holds. An entry stays at 0 once its records are gone, until user space
 * sweeps it (sweep_idle_shares, every 10 s): only 65,536 namespaces or
 * users that come and go between two sweeps could fill a map. 64-bit
 * counts: the compare-and-swap that gives one back exists only for those
 * on every BPF target. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} pending_per_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} pending_per_uid SEC(".maps");

/* Refused records by namespace and reason, for the metrics. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct refusal_key);
	__type(value, __u64);
} pending_refusals SEC(".maps");

/* Connections whose record was refused, so that SO_ORIGINAL_DST says so
 * (ENOBUFS) instead of ENOENT; gone with the client's socket. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct handover_key);
	__type(value, __u32);
} refused_orig_dst SEC(".maps");

/* The last redirected datagram of each UDP port of a namespace. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_sender_key);
	__type(value, struct client_record);
} udp_last_send SEC(".maps");

/* The answer to SO_ORIGINAL_DST, on the proxy's accepted socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct endpoint);
} proxy_answer SEC(".maps");

/* The original destination of the datagram each relay socket received
 * last. The relay maps it into its memory and reads it after each recvfrom
 * without a system call: only its one receiving thread per socket reads
 * there, right after the program wrote in that same thread's recvfrom. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UDP_SLOT_COUNT);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct udp_relay_slot);
} udp_relay_slots SEC(".maps");

/* One record per redirect or bypass decision, when emit_events is set. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* enum redirect_stat counters. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Keep the shared types in BTF so that the skeleton generates them for Rust. */
struct redirect_event unused_redirect_event __attribute__((unused));
enum redirect_action unused_redirect_action __attribute__((unused));
enum bypass_reason unused_bypass_reason __attribute__((unused));
enum redirect_stat unused_redirect_stat __attribute__((unused));
enum proxy_down_policy unused_proxy_down_policy __attribute__((unused));
struct udp_relay_slot unused_udp_relay_slot __attribute__((unused));
struct pending_record unused_pending_record __attribute__((unused));
struct client_record unused_client_record __attribute__((unused));
struct refusal_key unused_refusal_key __attribute__((unused));
enum refusal_reason unused_refusal_reason __attribute__((unused));
enum udp_relay_slot_index unused_udp_relay_slot_index __attribute__((unused));

struct sockaddr_in_orig {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct sockaddr_in6_orig {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

static __always_inline void emit(struct bpf_sock_addr *ctx, __u8 action, __u8 reason,
				 const struct endpoint *original, const struct endpoint *target)
{
	struct redirect_event *event;
	__u64 pid_tgid;

	if (!emit_events)
		return;
	pid_tgid = bpf_get_current_pid_tgid();
	event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);
	if (!event) {
		stat_add(&stats, STAT_EVENTS_LOST, 1);
		return;
	}
	event->timestamp_ns = bpf_ktime_get_ns();
	event->cookie = bpf_get_socket_cookie(ctx);
	event->pid = pid_tgid >> 32;
	event->uid = (__u32)bpf_get_current_uid_gid();
	event->action = action;
	event->reason = reason;
	event->protocol = ctx->type == SOCK_DGRAM ? IPPROTO_UDP : IPPROTO_TCP;
	__builtin_memset(event->pad, 0, sizeof(event->pad));
	bpf_get_current_comm(event->comm, sizeof(event->comm));
	event->original = *original;
	event->target = *target;
	submit_event(&events, event);
}

static __always_inline int cidr_blocks(const struct endpoint *dst)
{
	if (dst->family == ADDR_FAMILY_INET) {
		struct cidr_v4_key key = {.prefixlen = 32, .addr = dst->ip[0]};

		if (exclude_v4_active && bpf_map_lookup_elem(&exclude_v4, &key))
			return REASON_EXCLUDED_CIDR;
		if (include_v4_active && !bpf_map_lookup_elem(&include_v4, &key))
			return REASON_NOT_INCLUDED;
		return REASON_NONE;
	}
	struct cidr_v6_key key = {.prefixlen = 128};

	__builtin_memcpy(key.addr, dst->ip, sizeof(key.addr));
	if (exclude_v6_active && bpf_map_lookup_elem(&exclude_v6, &key))
		return REASON_EXCLUDED_CIDR;
	if (include_v6_active && !bpf_map_lookup_elem(&include_v6, &key))
		return REASON_NOT_INCLUDED;
	return REASON_NONE;
}

/* The proxy endpoint for a destination of the given family. */
static __always_inline void proxy_endpoint(struct endpoint *proxy, __u16 family)
{
	if (family == ADDR_FAMILY_INET) {
		endpoint_set_v4(proxy, proxy_ip4, proxy_port);
		return;
	}
	proxy->family = ADDR_FAMILY_INET6;
	proxy->ip[0] = proxy_ip6[0];
	proxy->ip[1] = proxy_ip6[1];
	proxy->ip[2] = proxy_ip6[2];
	proxy->ip[3] = proxy_ip6[3];
	proxy->port = proxy_port;
}

static __always_inline int endpoint_equal(const struct endpoint *a, const struct endpoint *b)
{
	return a->family == b->family && a->port == b->port && a->ip[0] == b->ip[0] &&
	       a->ip[1] == b->ip[1] && a->ip[2] == b->ip[2] && a->ip[3] == b->ip[3];
}

/* Fail open: with nothing listening on the proxy address the connection
 * keeps its original destination instead of being refused. */
static __always_inline int proxy_is_listening(struct bpf_sock_addr *ctx,
					      const struct endpoint *proxy)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	__u32 tuple_size;

	/* The built-in proxy's own listener, without a lookup of the
	 * namespace's sockets; anything else is looked up. */
	if (ctx->type == SOCK_STREAM && proxy_netns_cookie &&
	    bpf_get_netns_cookie(ctx) == proxy_netns_cookie) {
		__u32 index =
		    proxy->family == ADDR_FAMILY_INET ? PROXY_LISTENER_V4 : PROXY_LISTENER_V6;

		sk = bpf_map_lookup_elem(&proxy_listeners, &index);
		if (sk) {
			bpf_sk_release(sk);
			return 1;
		}
	}
	if (proxy->family == ADDR_FAMILY_INET) {
		tuple.ipv4.daddr = proxy->ip[0];
		tuple.ipv4.dport = proxy->port;
		tuple_size = sizeof(tuple.ipv4);
	} else {
		__builtin_memcpy(tuple.ipv6.daddr, proxy->ip, sizeof(tuple.ipv6.daddr));
		tuple.ipv6.dport = proxy->port;
		tuple_size = sizeof(tuple.ipv6);
	}
	if (ctx->type == SOCK_DGRAM)
		sk = bpf_sk_lookup_udp(ctx, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_tcp(ctx, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Who is connecting: the excluded user, the proxy itself, or a socket the
 * proxy marked never go back to the proxy. */
static __always_inline int caller_bypasses(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	if (has_excluded_uid && (__u32)bpf_get_current_uid_gid() == excluded_uid)
		return REASON_EXCLUDED_USER;
	if (proxy_tgid && bpf_get_current_pid_tgid() >> 32 == proxy_tgid)
		return REASON_PROXY_PROCESS;
	if (!sk)
		return REASON_NONE;
	if (proxy_mark && sk->mark == proxy_mark)
		return REASON_PROXY_MARK;
	/* A socket bound to a device (SO_BINDTODEVICE, a VRF) cannot reach a
	 * loopback proxy through it: its connect() would hang. */
	if (sk->bound_dev_if && sk->bound_dev_if != LOOPBACK_IFINDEX)
		return REASON_BOUND_TO_DEVICE;
	return REASON_NONE;
}

/**
 * decide() - redirect @original to @proxy, or say why not
 *
 * Returns REASON_NONE to redirect, or a bypass reason (REASON_NO_PROXY also
 * when the policy then refuses the connection).
 */
static __always_inline int decide(struct bpf_sock_addr *ctx, const struct endpoint *original,
				  const struct endpoint *proxy, int is_loopback)
{
	int reason = caller_bypasses(ctx);

	if (reason == REASON_NONE && is_loopback)
		reason = REASON_LOOPBACK;
	if (reason == REASON_NONE && endpoint_equal(original, proxy))
		reason = REASON_PROXY_ADDRESS;
	if (reason == REASON_NONE)
		reason = cidr_blocks(original);
	if (reason == REASON_NONE && !proxy_is_listening(ctx, proxy))
		reason = REASON_NO_PROXY;
	return reason;
}

static __always_inline int port_matches(struct bpf_sock_addr *ctx, __u16 port_net)
{
	__u32 port = bpf_ntohs(port_net);
	__u8 *redirected;

	/* One map per call: the verifier inlines an array lookup only at a
	 * call that always sees the same map, and clang would otherwise merge
	 * the two calls into one. */
	if (ctx->type == SOCK_DGRAM) {
		redirected = bpf_map_lookup_elem(&redirect_udp_ports, &port);
		barrier_var(redirected);
	} else {
		redirected = bpf_map_lookup_elem(&redirect_ports, &port);
	}
	return redirected && *redirected;
}

/* A UDP send leaves the socket's record under its port too, where the
 * relay finds it even when the socket is gone by the time the datagram is
 * read. The socket has its port by now (autobind comes first). A socket
 * that keeps sending to one destination finds its record there already:
 * a lookup, not an LRU update, per datagram. */
static __always_inline void remember_send(struct bpf_sock_addr *ctx,
					  const struct client_record *record)
{
	struct udp_sender_key key = {
	    .netns_cookie = bpf_get_netns_cookie(ctx),
	    .port = bpf_htons((__u16)ctx->sk->src_port),
	    .family = record->original.family,
	};

	struct client_record *last = bpf_map_lookup_elem(&udp_last_send, &key);

	if (last && last->cookie == record->cookie && last->uid == record->uid &&
	    endpoint_equal(&last->original, &record->original))
		return;
	bpf_map_update_elem(&udp_last_send, &key, record, BPF_ANY);
}

enum connect_verdict {
	CONNECT_LEAVE,	  /* keep the original destination */
	CONNECT_REDIRECT, /* rewrite the destination to the proxy */
	CONNECT_REFUSE,	  /* fail the connect() with ECONNREFUSED */
};

/**
 * handle_connect() - common part of connect4/6 and sendmsg4/6
 *
 * Records @original in the socket's storage when it redirects. An
 * unconnected UDP socket passes here once per datagram: only a new
 * destination makes an event.
 */
static __always_inline enum connect_verdict handle_connect(struct bpf_sock_addr *ctx,
							   const struct endpoint *original,
							   const struct endpoint *proxy,
							   int is_loopback)
{
	struct client_record *stored;
	int reason, fresh = 1;

	stat_add(&stats, ctx->type == SOCK_DGRAM ? STAT_UDP_SENDS : STAT_TCP_CONNECTS, 1);
	if (!port_matches(ctx, original->port)) {
		stat_add(&stats, STAT_OTHER_PORT, 1);
		return CONNECT_LEAVE;
	}
	reason = decide(ctx, original, proxy, is_loopback);
	if (reason == REASON_NO_PROXY && proxy_down_policy == PROXY_DOWN_CLOSED) {
		stat_add(&stats, STAT_REFUSED, 1);
		emit(ctx, ACTION_REFUSE, reason, original, original);
		return CONNECT_REFUSE;
	}
	if (reason == REASON_NONE) {
		stored = ctx->sk ? bpf_sk_storage_get(&client_orig_dst, ctx->sk, 0,
						      BPF_SK_STORAGE_GET_F_CREATE)
				 : NULL;
		if (stored) {
			fresh = !endpoint_equal(&stored->original, original);
			stored->original = *original;
			stored->uid = (__u32)bpf_get_current_uid_gid();
			if (ctx->type == SOCK_DGRAM) {
				stored->cookie = bpf_get_socket_cookie(ctx);
				remember_send(ctx, stored);
			}
		} else {
			reason = REASON_NO_MEMORY;
		}
	}
	if (reason != REASON_NONE) {
		stat_add(&stats, STAT_BYPASSED + reason, 1);
		emit(ctx, ACTION_BYPASS, reason, original, original);
		return CONNECT_LEAVE;
	}
	stat_add(&stats, STAT_REDIRECTED, 1);
	if (fresh)
		emit(ctx, ACTION_REDIRECT, REASON_NONE, original, proxy);
	return CONNECT_REDIRECT;
}

/* Returning SYS_REJECT alone fails connect() with EPERM; the retval says
 * what the caller would see from a closed port instead. */
static __always_inline int refuse_connect(void)
{
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

/* connect4 (TCP, and UDP connect) and sendmsg4 (unconnected UDP sends). */
static __always_inline int redirect4(struct bpf_sock_addr *ctx)
{
	struct endpoint original, proxy;

	if (ctx->type != SOCK_STREAM && ctx->type != SOCK_DGRAM)
		return SYS_PROCEED;
	endpoint_set_v4(&original, ctx->user_ip4, (__u16)ctx->user_port);
	proxy_endpoint(&proxy, ADDR_FAMILY_INET);
	switch (handle_connect(ctx, &original, &proxy, ipv4_is_loopback(original.ip[0]))) {
	case CONNECT_REFUSE:
		return refuse_connect();
	case CONNECT_REDIRECT:
		ctx->user_ip4 = proxy.ip[0];
		ctx->user_port = proxy.port;
		break;
	case CONNECT_LEAVE:
		break;
	}
	return SYS_PROCEED;
}

/* A v4-mapped address for a dual-stack socket, else the IPv6 address. */
static __always_inline void set_user_ip6(struct bpf_sock_addr *ctx, const struct endpoint *ep)
{
	if (ep->family == ADDR_FAMILY_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = ep->ip[0];
	} else {
		ctx->user_ip6[0] = ep->ip[0];
		ctx->user_ip6[1] = ep->ip[1];
		ctx->user_ip6[2] = ep->ip[2];
		ctx->user_ip6[3] = ep->ip[3];
	}
	ctx->user_port = ep->port;
}

/* user_ip6 only allows 4-byte loads, one word at a time. A v4-mapped
 * address becomes an IPv4 endpoint. */
static __always_inline void user_endpoint6(struct bpf_sock_addr *ctx, struct endpoint *ep)
{
	__u32 ip[4];

	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	endpoint_set_v6(ep, ip, (__u16)ctx->user_port);
}

/* connect6 and sendmsg6. */
static __always_inline int redirect6(struct bpf_sock_addr *ctx)
{
	struct endpoint original, proxy;
	int is_loopback;

	if (ctx->type != SOCK_STREAM && ctx->type != SOCK_DGRAM)
		return SYS_PROCEED;
	/* A dual-stack socket sending to ::ffff:a.b.c.d speaks IPv4: it is
	 * matched, recorded and redirected as IPv4, to the IPv4 proxy. */
	user_endpoint6(ctx, &original);
	proxy_endpoint(&proxy, original.family);
	if (original.family == ADDR_FAMILY_INET)
		is_loopback = ipv4_is_loopback(original.ip[0]);
	else
		is_loopback = ipv6_is_loopback(original.ip);
	switch (handle_connect(ctx, &original, &proxy, is_loopback)) {
	case CONNECT_REFUSE:
		return refuse_connect();
	case CONNECT_LEAVE:
		return SYS_PROCEED;
	case CONNECT_REDIRECT:
		break;
	}
	set_user_ip6(ctx, &proxy);
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int redirect_connect4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx);
}

SEC("cgroup/connect6")
int redirect_connect6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx);
}

/* Only unconnected UDP sends come here; connected ones went through
 * connect4/6. The socket has its port by now (autobind comes first). */
SEC("cgroup/sendmsg4")
int redirect_sendmsg4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx);
}

SEC("cgroup/sendmsg6")
int redirect_sendmsg6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx);
}

/**
 * original_of_proxy_peer() - the original destination of @ctx's socket
 * when @peer, the address in @ctx (its peer, or a datagram's source), is
 * the proxy
 */
static __always_inline struct endpoint *original_of_proxy_peer(struct bpf_sock_addr *ctx,
							       const struct endpoint *peer)
{
	struct client_record *record;
	struct endpoint proxy;

	if (!ctx->sk)
		return NULL;
	proxy_endpoint(&proxy, peer->family);
	if (!endpoint_equal(peer, &proxy))
		return NULL;
	record = bpf_sk_storage_get(&client_orig_dst, ctx->sk, 0, 0);
	if (!record || record->original.family != peer->family)
		return NULL;
	return &record->original;
}

/* Shows @ctx's socket the original destination where the kernel would show
 * the proxy (its peer, or a datagram's source), counting it in @stat. */
static __always_inline void show_original4(struct bpf_sock_addr *ctx, __u32 stat)
{
	struct endpoint shown, *original;

	endpoint_set_v4(&shown, ctx->user_ip4, (__u16)ctx->user_port);
	original = original_of_proxy_peer(ctx, &shown);
	if (!original)
		return;
	ctx->user_ip4 = original->ip[0];
	ctx->user_port = original->port;
	stat_add(&stats, stat, 1);
}

static __always_inline void show_original6(struct bpf_sock_addr *ctx, __u32 stat)
{
	struct endpoint shown, *original;

	user_endpoint6(ctx, &shown);
	original = original_of_proxy_peer(ctx, &shown);
	if (!original)
		return;
	set_user_ip6(ctx, original);
	stat_add(&stats, stat, 1);
}

/* A redirected socket's peer is the address it dialled, not the proxy. */
SEC("cgroup/getpeername4")
int redirect_getpeername4(struct bpf_sock_addr *ctx)
{
	show_original4(ctx, STAT_PEERNAME_ANSWERED);
	return 1;
}

SEC("cgroup/getpeername6")
int redirect_getpeername6(struct bpf_sock_addr *ctx)
{
	show_original6(ctx, STAT_PEERNAME_ANSWERED);
	return 1;
}

/* The proxy's replies to a redirected UDP socket come from the address it
 * sent to. */
SEC("cgroup/recvmsg4")
int redirect_recvmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_DGRAM)
		show_original4(ctx, STAT_UDP_REPLIES);
	return 1;
}

SEC("cgroup/recvmsg6")
int redirect_recvmsg6(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_DGRAM)
		show_original6(ctx, STAT_UDP_REPLIES);
	return 1;
}

/* The tuple of a packet from the proxy to @client, which finds the client's
 * UDP socket; returns the tuple's size. */
static __always_inline __u32 proxy_to_client_tuple(struct bpf_sock_tuple *tuple,
						   const struct endpoint *proxy,
						   const struct endpoint *client)
{
	if (proxy->family == ADDR_FAMILY_INET) {
		tuple->ipv4.saddr = proxy->ip[0];
		tuple->ipv4.sport = proxy->port;
		tuple->ipv4.daddr = client->ip[0];
		tuple->ipv4.dport = client->port;
		return sizeof(tuple->ipv4);
	}
	__builtin_memcpy(tuple->ipv6.saddr, proxy->ip, sizeof(tuple->ipv6.saddr));
	tuple->ipv6.sport = proxy->port;
	__builtin_memcpy(tuple->ipv6.daddr, client->ip, sizeof(tuple->ipv6.daddr));
	tuple->ipv6.dport = client->port;
	return sizeof(tuple->ipv6);
}

/**
 * publish_datagram_origin() - on the proxy's UDP socket, hand the relay the
 * sender and the original destination of the datagram it is receiving from
 * @client
 * @proxy: the proxy's own endpoint, which the receiving socket must be bound to
 * @index: the slot of the receiving socket's family (enum udp_relay_slot_index)
 *
 * The sender is found as the socket a packet from the proxy to @client
 * would reach, in the proxy's namespace; only a socket that redirect4/6
 * sent to the proxy holds a record. A sender that closed right after its
 * send is known by the record its last send left under its port. The slot
 * is written for every datagram, with no original when there is none, so
 * that it never shows the relay an earlier datagram's destination.
 */
static __always_inline void publish_datagram_origin(struct bpf_sock_addr *ctx,
						    const struct endpoint *proxy,
						    const struct endpoint *client, __u32 index)
{
	struct bpf_sock_tuple tuple = {};
	struct client_record *record = NULL;
	struct udp_relay_slot *slot;
	struct bpf_sock *sk;
	__u32 tuple_size;

	slot = bpf_map_lookup_elem(&udp_relay_slots, &index);
	if (!slot)
		return;
	tuple_size = proxy_to_client_tuple(&tuple, proxy, client);
	slot->netns_cookie = bpf_get_netns_cookie(ctx);
	slot->client = *client;
	sk = bpf_sk_lookup_udp(ctx, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		record = bpf_sk_storage_get(&client_orig_dst, sk, 0, 0);
		if (record) {
			slot->original = record->original;
			slot->client_cookie = record->cookie;
			slot->uid = record->uid;
		}
		bpf_sk_release(sk);
	} else {
		struct udp_sender_key key = {
		    .netns_cookie = slot->netns_cookie,
		    .port = client->port,
		    .family = client->family,
		};

		record = bpf_map_lookup_elem(&udp_last_send, &key);
		if (record) {
			slot->original = record->original;
			slot->client_cookie = record->cookie;
			slot->uid = record->uid;
			stat_add(&stats, STAT_UDP_FROM_RECORD, 1);
		}
	}
	if (record) {
		stat_add(&stats, STAT_UDP_TO_PROXY, 1);
	} else {
		__builtin_memset(&slot->original, 0, sizeof(slot->original));
		slot->client_cookie = 0;
		slot->uid = 0;
		stat_add(&stats, STAT_UDP_NO_RECORD, 1);
	}
}

/**
 * reply_reaches_its_socket() - whether the relay's reply to @client would
 * reach the socket the relay wrote into the slot's reply_cookie, and not
 * another that took the client's port after it closed
 */
static __always_inline int reply_reaches_its_socket(struct bpf_sock_addr *ctx,
						    const struct endpoint *proxy,
						    const struct endpoint *client, __u32 index)
{
	struct bpf_sock_tuple tuple = {};
	struct client_record *record;
	struct udp_relay_slot *slot;
	struct bpf_sock *sk;
	__u32 tuple_size;
	int same = 0;

	slot = bpf_map_lookup_elem(&udp_relay_slots, &index);
	if (!slot)
		return 0;
	tuple_size = proxy_to_client_tuple(&tuple, proxy, client);
	sk = bpf_sk_lookup_udp(ctx, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	record = bpf_sk_storage_get(&client_orig_dst, sk, 0, 0);
	same = record && record->cookie == READ_ONCE(slot->reply_cookie);
	bpf_sk_release(sk);
	return same;
}

/* Whether @ctx's socket is the built-in relay's own UDP socket of this
 * family: any other socket on the proxy address (in another namespace
 * below --sockopt-cgroup, say) would leave records nobody takes. */
static __always_inline int is_proxy_socket(struct bpf_sock_addr *ctx, const struct endpoint *proxy)
{
	struct bpf_sock *sk = ctx->sk;

	if (!proxy_tgid || bpf_get_current_pid_tgid() >> 32 != proxy_tgid)
		return 0;
	if (!sk || ctx->type != SOCK_DGRAM || sk->src_port != bpf_ntohs(proxy->port))
		return 0;
	if (proxy->family == ADDR_FAMILY_INET)
		return sk->src_ip4 == proxy->ip[0];
	return sk->src_ip6[0] == proxy->ip[0] && sk->src_ip6[1] == proxy->ip[1] &&
	       sk->src_ip6[2] == proxy->ip[2] && sk->src_ip6[3] == proxy->ip[3];
}

/* On the proxy's sockets (attached where getsockopt is, with the built-in
 * relay only: nobody else reads the slots). */
SEC("cgroup/recvmsg4")
int redirect_proxy_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct endpoint proxy, client;

	proxy_endpoint(&proxy, ADDR_FAMILY_INET);
	if (!is_proxy_socket(ctx, &proxy))
		return 1;
	endpoint_set_v4(&client, ctx->user_ip4, (__u16)ctx->user_port);
	publish_datagram_origin(ctx, &proxy, &client, UDP_SLOT_INET);
	return 1;
}

SEC("cgroup/recvmsg6")
int redirect_proxy_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct endpoint proxy, client;

	proxy_endpoint(&proxy, ADDR_FAMILY_INET6);
	if (!is_proxy_socket(ctx, &proxy))
		return 1;
	user_endpoint6(ctx, &client);
	if (client.family != ADDR_FAMILY_INET6)
		return 1;
	publish_datagram_origin(ctx, &proxy, &client, UDP_SLOT_INET6);
	return 1;
}

/* The relay's replies: refused (EPERM) when the client's socket is gone,
 * so that a socket that took its port never gets its replies. */
SEC("cgroup/sendmsg4")
int redirect_proxy_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct endpoint proxy, client;

	proxy_endpoint(&proxy, ADDR_FAMILY_INET);
	if (!is_proxy_socket(ctx, &proxy))
		return SYS_PROCEED;
	endpoint_set_v4(&client, ctx->user_ip4, (__u16)ctx->user_port);
	if (reply_reaches_its_socket(ctx, &proxy, &client, UDP_SLOT_INET))
		return SYS_PROCEED;
	stat_add(&stats, STAT_UDP_REPLY_REFUSED, 1);
	return SYS_REJECT;
}

SEC("cgroup/sendmsg6")
int redirect_proxy_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct endpoint proxy, client;

	proxy_endpoint(&proxy, ADDR_FAMILY_INET6);
	if (!is_proxy_socket(ctx, &proxy))
		return SYS_PROCEED;
	user_endpoint6(ctx, &client);
	if (client.family == ADDR_FAMILY_INET6 &&
	    reply_reaches_its_socket(ctx, &proxy, &client, UDP_SLOT_INET6))
		return SYS_PROCEED;
	stat_add(&stats, STAT_UDP_REPLY_REFUSED, 1);
	return SYS_REJECT;
}

/**
 * sockops_tuple() - the connection as the proxy's accepted socket sees it
 * @is_client: @skops is the client's socket, whose remote end is the proxy;
 *             otherwise it is the proxy's own accepted socket.
 */
static __always_inline void sockops_tuple(struct bpf_sock_ops *skops, struct conn_tuple *key,
					  int is_client)
{
	/* remote_port holds the network-order port in its upper 16 bits;
	 * bpf_ntohl() yields it in host order on either endianness. */
	__u16 remote_port = bpf_htons((__u16)bpf_ntohl(skops->remote_port));
	__u16 local_port = bpf_htons((__u16)skops->local_port);
	struct endpoint *proxy = is_client ? &key->local : &key->peer;
	struct endpoint *client = is_client ? &key->peer : &key->local;

	if (skops->family == ADDR_FAMILY_INET) {
		endpoint_set_v4(proxy, skops->remote_ip4, remote_port);
		endpoint_set_v4(client, skops->local_ip4, local_port);
		return;
	}
	__u32 remote[4] = {skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
			   skops->remote_ip6[3]};
	__u32 local[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
			  skops->local_ip6[3]};

	endpoint_set_v6(proxy, remote, remote_port);
	endpoint_set_v6(client, local, local_port);
}

/* The callback flags are the socket's, shared with every sockops program
 * that runs on it, before or after ours in the chain: turned on, never
 * off, since a program after ours that asked for them too could not tell
 * that its ask changed nothing. */
static __always_inline void request_state_changes(struct bpf_sock_ops *skops)
{
	if (!(skops->bpf_sock_ops_cb_flags & BPF_SOCK_OPS_STATE_CB_FLAG))
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						     BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void handover_key(struct bpf_sock_ops *skops, struct handover_key *key,
					 int is_client)
{
	key->netns_cookie = bpf_get_netns_cookie(skops);
	sockops_tuple(skops, &key->tuple, is_client);
}

/**
 * take_share() - count one more record for @key in @map, unless @key holds
 * @limit already
 *
 * Returns 1 when counted. The check and the add are two steps: two records
 * racing for the last place may both get it, which costs fairness one
 * record, never a count that goes wrong. Between a failed insert (another
 * CPU's came first) and the lookup after it, the entry may have been swept
 * away: that is no reason to refuse, only to try again.
 */
static __always_inline int take_share(void *map, const void *key, __u64 limit)
{
	__u64 one = 1, *count;

	for (int attempt = 0; attempt < 4; attempt++) {
		count = bpf_map_lookup_elem(map, key);
		if (count) {
			if (READ_ONCE(*count) >= limit)
				return 0;
			__sync_fetch_and_add(count, 1);
			return 1;
		}
		if (bpf_map_update_elem(map, key, &one, BPF_NOEXIST) == 0)
			return 1;
	}
	return 0;
}

/* Gives back a place take_share() counted, never below 0. The entry stays
 * for the next record: removing it with the last one cost an insert and a
 * delete per connection. A sweep that removes an entry at the instant a
 * record is counted loses that count: its share then holds one more
 * record, never one fewer. */
static __always_inline void give_back_share(void *map, const void *key)
{
	__u64 *count = bpf_map_lookup_elem(map, key);

	if (!count)
		return;
	for (int attempt = 0; attempt < 4; attempt++) {
		__u64 old = READ_ONCE(*count);

		if (!old || __sync_val_compare_and_swap(count, old, old - 1) == old)
			return;
	}
}

/* root's records count against their namespace only: every container of a
 * host may run as root. */
static __always_inline int has_uid_share(__u32 uid)
{
	return uid != 0;
}

static __always_inline void count_refusal(struct handover_key *key, __u32 reason)
{
	struct refusal_key refusal = {.netns_cookie = key->netns_cookie, .reason = reason};
	__u64 one = 1, *count;

	stat_add(&stats, STAT_ORIG_DST_REFUSED, 1);
	bpf_map_update_elem(&refused_orig_dst, key, &reason, BPF_ANY);
	count = bpf_map_lookup_elem(&pending_refusals, &refusal);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		bpf_map_update_elem(&pending_refusals, &refusal, &one, BPF_NOEXIST);
}

/* Gives back the places an overflow record of @key and @uid took. */
static __always_inline void give_back_shares(struct handover_key *key, __u32 uid)
{
	give_back_share(&pending_per_netns, &key->netns_cookie);
	if (has_uid_share(uid))
		give_back_share(&pending_per_uid, &uid);
}

/* The overflow's record of @key, within the namespace's and the user's
 * share; the reason it was refused, or 0. */
static __always_inline __u32 insert_overflow(struct handover_key *key,
					     struct pending_record *record)
{
	if (!take_share(&pending_per_netns, &key->netns_cookie, PENDING_NETNS_SHARE))
		return REFUSED_NETNS_SHARE;
	if (has_uid_share(record->uid) &&
	    !take_share(&pending_per_uid, &record->uid, PENDING_UID_SHARE)) {
		give_back_share(&pending_per_netns, &key->netns_cookie);
		return REFUSED_UID_SHARE;
	}
	if (bpf_map_update_elem(&pending_overflow, key, record, BPF_NOEXIST) == 0)
		return 0;
	give_back_shares(key, record->uid);
	return REFUSED_TABLE_FULL;
}

/**
 * publish_pending() - the client's record under (namespace, 4-tuple), for
 * the proxy's accepted socket: in the first table, or, only when it is
 * full, in the overflow within the namespace's and the user's share (a
 * record of the same key in the first table must keep failing the insert)
 *
 * Returns the table it went to, or PENDING_REFUSED.
 */
static __always_inline enum pending_table publish_pending(struct handover_key *key,
							  const struct client_record *client)
{
	struct pending_record record = {.original = client->original, .uid = client->uid};
	/* int: before Linux 6.4 the map's update returned an int, so the upper
	 * half of this 64-bit result is not its sign (-E2BIG read 0xfffffff9). */
	int err = bpf_map_update_elem(&pending_orig_dst, key, &record, BPF_NOEXIST);
	enum pending_table table = PENDING_FIRST;

	if (err) {
		__u32 reason = err == -E2BIG ? insert_overflow(key, &record) : REFUSED_TABLE_FULL;

		if (reason) {
			count_refusal(key, reason);
			return PENDING_REFUSED;
		}
		table = PENDING_OVERFLOW;
	}
	stat_add(&stats, STAT_ORIG_DST_PENDING, 1);
	return table;
}

/* Removes @record, found under @key in @table, giving back its shares when
 * @table is the overflow; 1 if this call removed it. */
static __always_inline int remove_pending(void *table, struct handover_key *key,
					  const struct pending_record *record)
{
	__u32 uid = record->uid;

	/* Of two callers racing here (the client closing, the proxy taking
	 * the record), only the one whose delete succeeds gives back. */
	if (bpf_map_delete_elem(table, key) != 0)
		return 0;
	if (table == &pending_overflow)
		give_back_shares(key, uid);
	return 1;
}

/* Removes the record of @key from @table, giving back its shares; 1 if
 * there was one. */
static __always_inline int unpublish_pending(void *table, struct handover_key *key)
{
	struct pending_record *record = bpf_map_lookup_elem(table, key);

	return record ? remove_pending(table, key, record) : 0;
}

/**
 * take_record() - move a published record onto the proxy's socket
 *
 * Returns where the answer now is. Without storage (no memory, or another
 * thread's question creating it at this instant) the record stays
 * published, and answers, until the client's socket closes.
 */
static __always_inline struct endpoint *take_record(struct bpf_sock *sk, void *table,
						    struct handover_key *key,
						    struct pending_record *record)
{
	struct endpoint *answer;

	answer =
	    bpf_sk_storage_get(&proxy_answer, sk, &record->original, BPF_SK_STORAGE_GET_F_CREATE);
	if (!answer) {
		answer = bpf_sk_storage_get(&proxy_answer, sk, 0, 0);
		if (answer)
			return answer;
		stat_add(&stats, STAT_ORIG_DST_LOST, 1);
		return &record->original;
	}
	stat_add(&stats, STAT_ORIG_DST_HANDED_OVER, 1);
	remove_pending(table, key, record);
	return answer;
}

/* Moves the published record of @key, from whichever table holds it, onto
 * @sk (see take_record()); NULL when none is published. The two lookups are
 * written out: the verifier calls a map's delete directly only where a
 * single map reaches the call. */
static __always_inline struct endpoint *take_pending(struct bpf_sock *sk, struct handover_key *key)
{
	struct pending_record *record = bpf_map_lookup_elem(&pending_orig_dst, key);

	if (record)
		return take_record(sk, &pending_orig_dst, key, record);
	record = bpf_map_lookup_elem(&pending_overflow, key);
	if (record)
		return take_record(sk, &pending_overflow, key, record);
	return NULL;
}

/* On the redirected client's sockets (attached to the redirected cgroup). */
SEC("sockops")
int redirect_sockops(struct bpf_sock_ops *skops)
{
	struct handover_key key = {};
	struct client_record *client;
	struct bpf_sock *sk;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Before the SYN leaves, even one carrying Fast Open data: the
		 * proxy's socket may be established as soon as the SYN arrives. */
		sk = skops->sk;
		if (!sk)
			break;
		client = bpf_sk_storage_get(&client_orig_dst, sk, 0, 0);
		if (!client)
			break;
		handover_key(skops, &key, 1);
		client->table = publish_pending(&key, client);
		request_state_changes(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		/* Another program's callbacks, on a socket never redirected. */
		sk = skops->sk;
		client = sk ? bpf_sk_storage_get(&client_orig_dst, sk, 0, 0) : NULL;
		if (!client)
			break;
		/* Never accepted, or refused: nothing may stay behind once the
		 * client's socket is gone. Only the table the record went to
		 * is looked at: a lookup that misses the cache costs as much
		 * for a key that is not there. */
		handover_key(skops, &key, 1);
		switch (client->table) {
		case PENDING_FIRST:
			if (unpublish_pending(&pending_orig_dst, &key))
				stat_add(&stats, STAT_ORIG_DST_UNCLAIMED, 1);
			break;
		case PENDING_OVERFLOW:
			if (unpublish_pending(&pending_overflow, &key))
				stat_add(&stats, STAT_ORIG_DST_UNCLAIMED, 1);
			break;
		case PENDING_REFUSED:
			bpf_map_delete_elem(&refused_orig_dst, &key);
			break;
		}
		client->table = PENDING_NONE;
		break;
	}
	return 1;
}

/* On the proxy's accepted sockets (attached where getsockopt is): the
 * record moves onto the socket when its handshake ends (with TCP Fast Open,
 * at the SYN), before a client that closes at once can take it away. No
 * callbacks are asked for: the answer goes with the socket's storage. */
SEC("sockops")
int redirect_proxy_sockops(struct bpf_sock_ops *skops)
{
	struct handover_key key = {};
	struct bpf_sock *sk;

	/* Every connection of this cgroup (the proxy's own by default) runs
	 * this at fixed points of its life: all but one return here. */
	if (skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB ||
	    bpf_htons((__u16)skops->local_port) != proxy_port)
		return 1;
	sk = skops->sk;
	if (!sk)
		return 1;
	handover_key(skops, &key, 0);
	take_pending(sk, &key);
	return 1;
}

/* The proxy's accepted socket: local = proxy, peer = client. */
static __always_inline void tuple_from_accepted(struct bpf_sock *sk, struct conn_tuple *key)
{
	__u16 local_port = bpf_htons((__u16)sk->src_port);
	__u16 peer_port = sk->dst_port;

	if (sk->family == ADDR_FAMILY_INET) {
		endpoint_set_v4(&key->local, sk->src_ip4, local_port);
		endpoint_set_v4(&key->peer, sk->dst_ip4, peer_port);
		return;
	}
	__u32 local[4] = {sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3]};
	__u32 peer[4] = {sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3]};

	endpoint_set_v6(&key->local, local, local_port);
	endpoint_set_v6(&key->peer, peer, peer_port);
}

/* Writes the answer; returns 0 when the caller's buffer cannot hold it. */
static __always_inline int answer_orig_dst(struct bpf_sockopt *ctx, const struct endpoint *orig)
{
	void *optval = ctx->optval;
	void *optval_end = ctx->optval_end;

	if (ctx->level == SOL_IP) {
		struct sockaddr_in_orig *sin = optval;

		if (orig->family != ADDR_FAMILY_INET || (void *)(sin + 1) > optval_end)
			return 0;
		sin->family = ADDR_FAMILY_INET;
		sin->port = orig->port;
		sin->addr = orig->ip[0];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
		return 1;
	}
	struct sockaddr_in6_orig *sin6 = optval;

	if (orig->family != ADDR_FAMILY_INET6 || (void *)(sin6 + 1) > optval_end)
		return 0;
	sin6->family = ADDR_FAMILY_INET6;
	sin6->port = orig->port;
	sin6->flowinfo = 0;
	__builtin_memcpy(sin6->addr, orig->ip, sizeof(sin6->addr));
	sin6->scope_id = 0;
	ctx->optlen = sizeof(*sin6);
	return 1;
}

SEC("cgroup/getsockopt")
int redirect_getsockopt(struct bpf_sockopt *ctx)
{
	struct endpoint *original;
	struct bpf_sock *sk;

	/* The program sees only the first page of a larger buffer; optlen = 0
	 * tells the kernel to keep its own answer (iptables-save needs this). */
	if (ctx->optlen > PAGE_SIZE) {
		ctx->optlen = 0;
		return 1;
	}
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	sk = ctx->sk;
	if (!sk || sk->type != SOCK_STREAM || sk->protocol != IPPROTO_TCP)
		return 1;
	/* Only the proxy's accepted socket of a redirected connection holds
	 * an answer; every other caller keeps the kernel's own error. */
	original = bpf_sk_storage_get(&proxy_answer, sk, 0, 0);
	if (!original) {
		/* accept() can return the socket before the kernel has run
		 * PASSIVE_ESTABLISHED_CB on it: a connection is queued first and
		 * finished after. Until then only this socket, in this
		 * namespace, has the connection's 4-tuple. */
		struct handover_key key = {.netns_cookie = bpf_get_netns_cookie(ctx)};

		tuple_from_accepted(sk, &key.tuple);
		original = take_pending(sk, &key);
		if (!original && bpf_map_lookup_elem(&refused_orig_dst, &key)) {
			/* A redirected connection whose record was over its
			 * share: say so, rather than "not redirected". */
			barrier();
			ctx->retval = -ENOBUFS;
			return 1;
		}
	}
	if (!original || !answer_orig_dst(ctx, original))
		return 1;
	/* Separate 32-bit stores: clang would otherwise merge optlen and
	 * retval into one 64-bit store, which the verifier rejects. */
	barrier();
	ctx->retval = 0;
	stat_add(&stats, STAT_ORIG_DST_ANSWERED, 1);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
