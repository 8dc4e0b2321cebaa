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

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>

#include "tproxy.h"

#define IP_OFFSET_MASK 0x1fff

/* Configuration, set by user space before load. */
const volatile __u8 has_l2_header; /* 1 on Ethernet-like devices, 0 on L3 devices */
const volatile __u32 proxy_ip4;	   /* network order */
const volatile __u32 proxy_ip6[4]; /* network order */
const volatile __u16 proxy_port;   /* network order */
const volatile __u32 route_mark;
const volatile __u8 emit_events;
const volatile __u32 ifindex; /* the interface tproxy_ingress is attached to */

/* Destination ports (host order) whose connections are intercepted. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} tproxy_ports SEC(".maps");

/* The built-in proxy's listeners, 0: IPv4, 1: IPv6 (for tproxy_sk_lookup). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} proxy_listeners SEC(".maps");

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
	bpf_ringbuf_submit(event, 0);
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
 * steer() - decide where one packet of a matched flow goes
 * @iph: the IPv4 or IPv6 header, @iph_len bytes of it checked against
 *       data_end (bpf_tcp_check_syncookie reads it)
 * @th: the TCP header, checked against data_end
 */
static __always_inline int steer(struct __sk_buff *skb, struct flow *flow, void *iph, __u32 iph_len,
				 struct tcphdr *th)
{
	int syn = th->syn && !th->ack;
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
			return TC_ACT_OK;
		}
		bpf_sk_release(sk);
	}

	if (!syn && !th->ack) {
		stat_add(&stats, TSTAT_NOT_OURS, 1);
		return TC_ACT_OK;
	}
	sk = lookup_listener(skb, flow);
	if (!sk) {
		if (syn) {
			stat_add(&stats, TSTAT_NO_LISTENER, 1);
			emit(TPROXY_NO_LISTENER, 0, flow);
		} else {
			stat_add(&stats, TSTAT_NOT_OURS, 1);
		}
		return TC_ACT_OK;
	}
	if (!syn) {
		/* Without a request socket, the handshake's last ACK is only
		 * ours when the listener answered the SYN with a syncookie. */
		if (th->syn || th->rst ||
		    bpf_tcp_check_syncookie(sk, iph, iph_len, th, sizeof(*th)) != 0) {
			bpf_sk_release(sk);
			stat_add(&stats, TSTAT_NOT_OURS, 1);
			return TC_ACT_OK;
		}
		if (assign(skb, sk) == 0)
			stat_add(&stats, TSTAT_SYNCOOKIE_ACKS, 1);
		else
			stat_add(&stats, TSTAT_ASSIGN_FAILED, 1);
		return TC_ACT_OK;
	}
	err = assign(skb, sk);
	if (err == 0) {
		stat_add(&stats, TSTAT_NEW_CONNECTIONS, 1);
		emit(TPROXY_INTERCEPT, 0, flow);
	} else {
		stat_add(&stats, TSTAT_ASSIGN_FAILED, 1);
		emit(TPROXY_ASSIGN_FAILED, (__s32)err, flow);
	}
	return TC_ACT_OK;
}

static __always_inline int intercepted_port(struct tcphdr *th)
{
	__u16 port = bpf_ntohs(th->dest);

	if (bpf_map_lookup_elem(&tproxy_ports, &port))
		return 1;
	stat_add(&stats, TSTAT_OTHER_PORT, 1);
	return 0;
}

static __always_inline int handle_ipv4(struct __sk_buff *skb, void *nh, void *data_end)
{
	struct iphdr *iph = nh;
	struct tcphdr *th;
	struct flow flow = {};

	if ((void *)(iph + 1) > data_end)
		return TC_ACT_OK;
	if (iph->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	stat_add(&stats, TSTAT_TCP_PACKETS, 1);
	if (iph->ihl < 5 || (iph->frag_off & bpf_htons(IP_OFFSET_MASK))) {
		stat_add(&stats, TSTAT_UNPARSED, 1);
		return TC_ACT_OK;
	}
	th = nh + iph->ihl * 4;
	if ((void *)(th + 1) > data_end) {
		stat_add(&stats, TSTAT_UNPARSED, 1);
		return TC_ACT_OK;
	}
	if (!intercepted_port(th))
		return TC_ACT_OK;
	flow.tuple.ipv4.saddr = iph->saddr;
	flow.tuple.ipv4.daddr = iph->daddr;
	flow.tuple.ipv4.sport = th->source;
	flow.tuple.ipv4.dport = th->dest;
	flow.tuple_len = sizeof(flow.tuple.ipv4);
	endpoint_set_v4(&flow.client, iph->saddr, th->source);
	endpoint_set_v4(&flow.original, iph->daddr, th->dest);
	return steer(skb, &flow, iph, sizeof(*iph), th);
}

static __always_inline int handle_ipv6(struct __sk_buff *skb, void *nh, void *data_end)
{
	struct ipv6hdr *ip6 = nh;
	struct tcphdr *th;
	struct flow flow = {};

	if ((void *)(ip6 + 1) > data_end)
		return TC_ACT_OK;
	/* Extension headers (rare on TCP) are not followed: such packets pass. */
	if (ip6->nexthdr != IPPROTO_TCP)
		return TC_ACT_OK;
	stat_add(&stats, TSTAT_TCP_PACKETS, 1);
	th = (void *)(ip6 + 1);
	if ((void *)(th + 1) > data_end) {
		stat_add(&stats, TSTAT_UNPARSED, 1);
		return TC_ACT_OK;
	}
	if (!intercepted_port(th))
		return TC_ACT_OK;
	__builtin_memcpy(flow.tuple.ipv6.saddr, &ip6->saddr, sizeof(flow.tuple.ipv6.saddr));
	__builtin_memcpy(flow.tuple.ipv6.daddr, &ip6->daddr, sizeof(flow.tuple.ipv6.daddr));
	flow.tuple.ipv6.sport = th->source;
	flow.tuple.ipv6.dport = th->dest;
	flow.tuple_len = sizeof(flow.tuple.ipv6);
	endpoint_set_v6(&flow.client, flow.tuple.ipv6.saddr, th->source);
	endpoint_set_v6(&flow.original, flow.tuple.ipv6.daddr, th->dest);
	return steer(skb, &flow, ip6, sizeof(*ip6), th);
}

SEC("tc")
int tproxy_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	void *nh = data;

	if (has_l2_header)
		nh = data + sizeof(struct ethhdr);
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return handle_ipv4(skb, nh, data_end);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return handle_ipv6(skb, nh, data_end);
	return TC_ACT_OK;
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
	key = ctx->family == ADDR_FAMILY_INET6;
	sk = bpf_map_lookup_elem(&proxy_listeners, &key);
	if (!sk)
		return SK_PASS;
	if (bpf_sk_assign(ctx, sk, 0) == 0)
		stat_add(&stats, TSTAT_SK_LOOKUP_ASSIGNED, 1);
	bpf_sk_release(sk);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
