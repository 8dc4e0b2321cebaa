// SPDX-License-Identifier: GPL-2.0
/*
 * tproxy: at TC ingress on an interface, hand TCP connections to chosen
 * destination ports to a local transparent listener with bpf_sk_assign, as
 * iptables TPROXY does, for traffic that does not start on this host
 * (forwarded, or from another network namespace).
 *
 * Each packet of a matched flow goes to the local socket that already owns
 * its 4-tuple (the proxy's accepted socket, a request or TIME_WAIT socket);
 * a SYN, or an ACK that carries a valid syncookie, goes to the listener.
 * Mid-flow packets of flows that have no local socket (connections forwarded
 * before tproxy started) pass untouched and keep being forwarded.
 *
 * bpf_sk_assign only picks the socket; the routing decision after TC still
 * has to deliver the packet locally, since ip_forward()/ip6_forward() drop
 * packets that carry a socket. Assigned packets get route_mark, which user
 * space routes to a table holding "local default dev lo".
 */
#include "lib/common.h"

#include <linux/pkt_cls.h>
/* Before lib/parse.h, whose TCP_FLAG_* macros would rename this header's
 * enum constants. */
#include <linux/tcp.h>

#include "lib/parse.h"
#include "lib/proxy_listeners.h"

#include "tproxy.h"

/* Configuration, set by user space before load. */
const volatile __u32 proxy_ip4;	   /* network order */
const volatile __u32 proxy_ip6[4]; /* network order */
const volatile __u16 proxy_port;   /* network order */
const volatile __u32 route_mark;
const volatile __u8 emit_events;
/* The interface tproxy_ingress is attached to, and whether its packets
 * (and the upstream interface's) start with an Ethernet header (0 on L3
 * devices). Not .rodata: user space sets them again when an interface of
 * the same name returns. */
__u32 ifindex;
__u8 has_l2_header;
__u8 upstream_has_l2_header;

/* Destination ports (host order) whose connections are intercepted. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} tproxy_ports SEC(".maps");

/* One record per new connection (SYN) to an intercepted port, when
 * emit_events is set. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* enum tproxy_stat counters. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TSTAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Keep the shared types in BTF so that the skeleton generates them for Rust. */
struct tproxy_event unused_tproxy_event __attribute__((unused));
enum tproxy_action unused_tproxy_action __attribute__((unused));
enum tproxy_stat unused_tproxy_stat __attribute__((unused));

/* A parsed TCP packet: where its headers are and who it is between. */
struct flow {
	struct bpf_sock_tuple tuple; /* as the packet has it: saddr = client */
	__u32 tuple_len;
	struct endpoint client;
	struct endpoint original;
};

static __always_inline void emit(__u8 action, __s32 error, const struct flow *flow)
{
	struct tproxy_event *event;

	if (!emit_events)
		return;
	event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);
	if (!event) {
		stat_add(&stats, TSTAT_EVENTS_LOST, 1);
		return;
	}
	event->timestamp_ns = bpf_ktime_get_ns();
	event->action = action;
	__builtin_memset(event->pad, 0, sizeof(event->pad));
	event->error = error;
	event->client = flow->client;
	event->original = flow->original;
	submit_event(&events, event);
}

/**
 * assign() - hand the packet to @sk and route it locally
 *
 * Releases @sk. Returns bpf_sk_assign()'s result.
 */
static __always_inline long assign(struct __sk_buff *skb, struct bpf_sock *sk)
{
	long err = bpf_sk_assign(skb, sk, 0);

	bpf_sk_release(sk);
	if (err == 0)
		skb->mark = route_mark;
	return err;
}

/* The transparent listener, found by the proxy's address and port: a
 * listener bound to that address or to the wildcard address. */
static __always_inline struct bpf_sock *lookup_listener(struct __sk_buff *skb,
							const struct flow *flow)
{
	struct bpf_sock_tuple listener = {};
	struct bpf_sock *sk;

	if (flow->tuple_len == sizeof(flow->tuple.ipv4)) {
		listener.ipv4.saddr = flow->tuple.ipv4.saddr;
		listener.ipv4.sport = flow->tuple.ipv4.sport;
		listener.ipv4.daddr = proxy_ip4;
		listener.ipv4.dport = proxy_port;
		sk = bpf_skc_lookup_tcp(skb, &listener, sizeof(listener.ipv4), BPF_F_CURRENT_NETNS,
					0);
	} else {
		__builtin_memcpy(listener.ipv6.saddr, flow->tuple.ipv6.saddr,
				 sizeof(listener.ipv6.saddr));
		listener.ipv6.sport = flow->tuple.ipv6.sport;
		listener.ipv6.daddr[0] = proxy_ip6[0];
		listener.ipv6.daddr[1] = proxy_ip6[1];
		listener.ipv6.daddr[2] = proxy_ip6[2];
		listener.ipv6.daddr[3] = proxy_ip6[3];
		listener.ipv6.dport = proxy_port;
		sk = bpf_skc_lookup_tcp(skb, &listener, sizeof(listener.ipv6), BPF_F_CURRENT_NETNS,
					0);
	}
	if (sk && sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return NULL;
	}
	return sk;
}

/**
 * syncookie_ok() - whether a handshake's last ACK carries a valid syncookie
 * of @listener
 *
 * bpf_tcp_check_syncookie() reads the IP and TCP headers; copies will do.
 */
static __always_inline int syncookie_ok(struct __sk_buff *skb, struct bpf_sock *listener,
					__u32 ip_off, const struct l4_packet *pkt)
{
	struct ipv6hdr ip6;
	struct tcphdr th;
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, pkt->l4_off, &th, sizeof(th)))
		return 0;
	if (pkt->family == ADDR_FAMILY_INET) {
		if (bpf_skb_load_bytes(skb, ip_off, &ip, sizeof(ip)))
			return 0;
		return bpf_tcp_check_syncookie(listener, &ip, sizeof(ip), &th, sizeof(th)) == 0;
	}
	if (bpf_skb_load_bytes(skb, ip_off, &ip6, sizeof(ip6)))
		return 0;
	return bpf_tcp_check_syncookie(listener, &ip6, sizeof(ip6), &th, sizeof(th)) == 0;
}

/**
 * steer() - decide where one packet of a matched flow goes
 * @ip_off: where the IP header starts
 */
static __always_inline int steer(struct __sk_buff *skb, struct flow *flow, __u32 ip_off,
				 const struct l4_packet *pkt)
{
	__u8 flags = pkt->tcp_flags;
	int syn = (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	int ack = flags & TCP_FLAG_ACK;
	struct bpf_sock *sk;
	long err;

	sk = bpf_skc_lookup_tcp(skb, &flow->tuple, flow->tuple_len, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		/* A SYN on the 4-tuple of a TIME_WAIT socket goes to that socket
		 * too: handed to the listener, it would be dropped, because the
		 * kernel refuses a request socket whose 4-tuple is in use. The
		 * TIME_WAIT socket asks for a listener on the original
		 * destination, which tproxy_sk_lookup answers with the proxy's,
		 * and is replaced by it. Without that answer (--no-proxy) it
		 * sends an ACK, the client resets it and resends its SYN at once
		 * (TCP_TIMEOUT_MIN), and that SYN reaches the listener. */
		if (sk->state != BPF_TCP_LISTEN) {
			if (syn && sk->state == BPF_TCP_TIME_WAIT)
				stat_add(&stats, TSTAT_TIME_WAIT_SYNS, 1);
			if (assign(skb, sk) == 0)
				stat_add(&stats, TSTAT_SOCKET_PACKETS, 1);
			else
				stat_add(&stats, TSTAT_ASSIGN_FAILED, 1);
			return TC_NEXT;
		}
		bpf_sk_release(sk);
	}

	if (!syn && !ack) {
		stat_add(&stats, TSTAT_NOT_OURS, 1);
		return TC_NEXT;
	}
	sk = lookup_listener(skb, flow);
	if (!sk) {
		if (syn) {
			stat_add(&stats, TSTAT_NO_LISTENER, 1);
			emit(TPROXY_NO_LISTENER, 0, flow);
		} else {
			stat_add(&stats, TSTAT_NOT_OURS, 1);
		}
		return TC_NEXT;
	}
	if (!syn) {
		/* Without a request socket, the handshake's last ACK is only
		 * ours when the listener answered the SYN with a syncookie. */
		if ((flags & (TCP_FLAG_SYN | TCP_FLAG_RST)) ||
		    !syncookie_ok(skb, sk, ip_off, pkt)) {
			bpf_sk_release(sk);
			stat_add(&stats, TSTAT_NOT_OURS, 1);
			return TC_NEXT;
		}
		if (assign(skb, sk) == 0)
			stat_add(&stats, TSTAT_SYNCOOKIE_ACKS, 1);
		else
			stat_add(&stats, TSTAT_ASSIGN_FAILED, 1);
		return TC_NEXT;
	}
	err = assign(skb, sk);
	if (err == 0) {
		stat_add(&stats, TSTAT_NEW_CONNECTIONS, 1);
		emit(TPROXY_INTERCEPT, 0, flow);
	} else {
		stat_add(&stats, TSTAT_ASSIGN_FAILED, 1);
		emit(TPROXY_ASSIGN_FAILED, (__s32)err, flow);
	}
	return TC_NEXT;
}

SEC("tc")
int tproxy_ingress(struct __sk_buff *skb)
{
	__u32 ip_off = has_l2_header ? ETH_HLEN : 0;
	struct l4_packet pkt;
	struct flow flow = {};
	__u16 port;
	int ret;

	ret = parse_packet(skb, ip_off, &pkt);
	if (ret == PARSE_OTHER || ret == PARSE_ICMP ||
	    (ret == PARSE_OK && pkt.protocol != IPPROTO_TCP))
		return TC_NEXT;
	if (ret != PARSE_OK) {
		stat_add(&stats, TSTAT_UNPARSED, 1);
		return TC_NEXT;
	}
	stat_add(&stats, TSTAT_TCP_PACKETS, 1);
	port = bpf_ntohs(pkt.dst_port);
	if (!bpf_map_lookup_elem(&tproxy_ports, &port)) {
		stat_add(&stats, TSTAT_OTHER_PORT, 1);
		return TC_NEXT;
	}
	if (pkt.family == ADDR_FAMILY_INET) {
		flow.tuple.ipv4.saddr = pkt.src_ip[0];
		flow.tuple.ipv4.daddr = pkt.dst_ip[0];
		flow.tuple.ipv4.sport = pkt.src_port;
		flow.tuple.ipv4.dport = pkt.dst_port;
		flow.tuple_len = sizeof(flow.tuple.ipv4);
		endpoint_set_v4(&flow.client, pkt.src_ip[0], pkt.src_port);
		endpoint_set_v4(&flow.original, pkt.dst_ip[0], pkt.dst_port);
	} else {
		__builtin_memcpy(flow.tuple.ipv6.saddr, pkt.src_ip, sizeof(flow.tuple.ipv6.saddr));
		__builtin_memcpy(flow.tuple.ipv6.daddr, pkt.dst_ip, sizeof(flow.tuple.ipv6.daddr));
		flow.tuple.ipv6.sport = pkt.src_port;
		flow.tuple.ipv6.dport = pkt.dst_port;
		flow.tuple_len = sizeof(flow.tuple.ipv6);
		endpoint_set_v6(&flow.client, pkt.src_ip, pkt.src_port);
		endpoint_set_v6(&flow.original, pkt.dst_ip, pkt.dst_port);
	}
	return steer(skb, &flow, ip_off, &pkt);
}

/*
 * On the upstream (server-facing) interface: a transparent proxy that
 * connects upstream from the client's own address (squid's tproxy mode,
 * HAProxy's usesrc clientip) gets its replies addressed to the client,
 * which this host would forward. A reply from an intercepted port whose
 * 4-tuple belongs to a local socket is handed to that socket and routed
 * locally, as iptables' "-m socket" mark rule does; everything else passes
 * uncounted (the counters describe the intercepted interface).
 */
SEC("tc")
int tproxy_upstream_ingress(struct __sk_buff *skb)
{
	__u32 ip_off = upstream_has_l2_header ? ETH_HLEN : 0;
	struct bpf_sock_tuple tuple = {};
	struct l4_packet pkt = {};
	struct bpf_sock *sk;
	__u16 port;
	int ret;

	ret = parse_packet(skb, ip_off, &pkt);
	if (ret != PARSE_OK || pkt.protocol != IPPROTO_TCP)
		return TC_NEXT;
	port = bpf_ntohs(pkt.src_port);
	if (!bpf_map_lookup_elem(&tproxy_ports, &port))
		return TC_NEXT;
	if (pkt.family == ADDR_FAMILY_INET) {
		tuple.ipv4.saddr = pkt.src_ip[0];
		tuple.ipv4.daddr = pkt.dst_ip[0];
		tuple.ipv4.sport = pkt.src_port;
		tuple.ipv4.dport = pkt.dst_port;
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, pkt.src_ip, sizeof(tuple.ipv6.saddr));
		__builtin_memcpy(tuple.ipv6.daddr, pkt.dst_ip, sizeof(tuple.ipv6.daddr));
		tuple.ipv6.sport = pkt.src_port;
		tuple.ipv6.dport = pkt.dst_port;
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return TC_NEXT;
	if (sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return TC_NEXT;
	}
	if (assign(skb, sk) == 0)
		stat_add(&stats, TSTAT_UPSTREAM_REPLIES, 1);
	else
		stat_add(&stats, TSTAT_ASSIGN_FAILED, 1);
	return TC_NEXT;
}

/*
 * The kernel looks for a listener on a connection's own destination when a
 * SYN reaches a TIME_WAIT socket of the same 4-tuple (to let it replace the
 * TIME_WAIT socket). For connections tproxy_ingress steers, that listener is
 * the proxy's: the equivalent of iptables TPROXY's TIME_WAIT handling.
 */
SEC("sk_lookup")
int tproxy_sk_lookup(struct bpf_sk_lookup *ctx)
{
	__u16 port = ctx->local_port;
	struct bpf_sock *sk;
	__u32 key;

	if (ctx->protocol != IPPROTO_TCP || ctx->ingress_ifindex != ifindex)
		return SK_PASS;
	if (!bpf_map_lookup_elem(&tproxy_ports, &port))
		return SK_PASS;
	key = ctx->family == ADDR_FAMILY_INET6 ? PROXY_LISTENER_V6 : PROXY_LISTENER_V4;
	sk = bpf_map_lookup_elem(&proxy_listeners, &key);
	if (!sk)
		return SK_PASS;
	if (bpf_sk_assign(ctx, sk, 0) == 0)
		stat_add(&stats, TSTAT_SK_LOOKUP_ASSIGNED, 1);
	bpf_sk_release(sk);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
