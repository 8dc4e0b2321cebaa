// SPDX-License-Identifier: GPL-2.0
/*
 * port-nat: translate destination ports on an interface (8080 -> 80).
 *
 * Ingress rewrites a packet to FROM into one to TO and records the flow,
 * keyed by its translated tuple (client, server, client port, TO); egress
 * rewrites a reply from TO back to FROM only when that tuple is tracked, so
 * clients that talk to TO directly are never touched. User space sweeps
 * idle flows out of the table.
 */
#include <linux/pkt_cls.h>

#include "lib/common.h"
#include "lib/l4.h"
#include "lib/parse.h"
#include "port_nat.h"

/* Configuration, set by user space before load. */
const volatile __u8 emit_events;
/* What a packet handed on returns: TC_NEXT, so that the programs behind ours
 * see it too. The benchmark loads a copy with TC_ACT_OK, which ends the
 * chain, to compare with the verdict before it. */
const volatile int handed_on = TC_NEXT;
/* Changed in place by a reload (SIGHUP), through the mmap'ed .data. */
volatile __u8 proto_mask = NAT_PROTO_TCP;
/* ETH_HLEN, or 0 on an L3 device; user space sets it before every attach,
 * since an interface that returns under the same name may be of another
 * kind. */
__u32 l2_len = ETH_HLEN;

/* Port (host order) -> its role in the mappings. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, struct nat_port);
} nat_ports SEC(".maps");

/* Translated flows; max_entries is set by user space (--max-flows). When it
 * is full, the least recently used flow makes room. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct nat_flow_key);
	__type(value, struct nat_flow);
} flows SEC(".maps");

/* One record per rewritten packet, when emit_events is set. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);
} events SEC(".maps");

/* enum nat_stat counters. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NAT_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Keep the shared types in BTF so that the skeleton generates them for Rust. */
struct nat_event unused_nat_event __attribute__((unused));
enum nat_flow_state unused_nat_flow_state __attribute__((unused));
enum nat_stat unused_nat_stat __attribute__((unused));

static __always_inline void emit(const struct l4_packet *pkt, __u16 new_port, __u8 direction,
				 __u8 new_flow)
{
	struct nat_event *event;

	if (!emit_events)
		return;
	event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);
	if (!event) {
		stat_add(&stats, NAT_STAT_EVENTS_LOST, 1);
		return;
	}
	event->timestamp_ns = bpf_ktime_get_ns();
	__builtin_memcpy(event->src_ip, pkt->src_ip, sizeof(event->src_ip));
	__builtin_memcpy(event->dst_ip, pkt->dst_ip, sizeof(event->dst_ip));
	event->src_port = pkt->src_port;
	event->dst_port = pkt->dst_port;
	event->new_port = new_port;
	event->family = pkt->family;
	event->protocol = pkt->protocol;
	event->direction = direction;
	event->new_flow = new_flow;
	__builtin_memset(event->pad, 0, sizeof(event->pad));
	submit_event(&events, event);
}

static __always_inline void flow_key(struct nat_flow_key *key, const struct l4_packet *pkt,
				     int from_client)
{
	const __u32 *client = from_client ? pkt->src_ip : pkt->dst_ip;
	const __u32 *server = from_client ? pkt->dst_ip : pkt->src_ip;

	__builtin_memcpy(key->client_ip, client, sizeof(key->client_ip));
	__builtin_memcpy(key->server_ip, server, sizeof(key->server_ip));
	key->client_port = from_client ? pkt->src_port : pkt->dst_port;
	key->server_port = from_client ? pkt->dst_port : pkt->src_port;
	key->family = pkt->family;
	key->protocol = pkt->protocol;
	key->pad[0] = 0;
	key->pad[1] = 0;
}

static __always_inline int proto_enabled(const struct l4_packet *pkt)
{
	return proto_mask & (pkt->protocol == IPPROTO_TCP ? NAT_PROTO_TCP : NAT_PROTO_UDP);
}

/**
 * translate_icmp() - an ICMP or ICMPv6 error about a translated flow gets
 * the port its receiver knows: on egress, an error about a client's packet
 * to TO names FROM again; on ingress, an error about a reply that left
 * from FROM names TO, so that the server's socket finds it.
 */
static __always_inline int translate_icmp(struct __sk_buff *skb, struct l4_packet *pkt, int ingress)
{
	struct nat_flow_key key;
	struct nat_flow *flow;
	struct nat_port *port;
	__u16 port_host, old_port, new_port;
	__u32 icmp_off, port_offset;

	if (parse_icmp_error(skb, pkt, &icmp_off) != PARSE_OK || !proto_enabled(pkt))
		return handed_on;
	if (ingress) {
		port_host = bpf_ntohs(pkt->src_port);
		port = bpf_map_lookup_elem(&nat_ports, &port_host);
		if (!port || !(port->role & NAT_PORT_FROM))
			return handed_on;
		flow_key(&key, pkt, 0);
		key.server_port = bpf_htons(port->to_port);
		flow = bpf_map_lookup_elem(&flows, &key);
		if (!flow || flow->original_port != pkt->src_port)
			return handed_on;
		old_port = pkt->src_port;
		new_port = key.server_port;
		port_offset = L4_SRC_PORT_OFFSET;
	} else {
		port_host = bpf_ntohs(pkt->dst_port);
		port = bpf_map_lookup_elem(&nat_ports, &port_host);
		if (!port || !(port->role & NAT_PORT_TO))
			return handed_on;
		flow_key(&key, pkt, 1);
		flow = bpf_map_lookup_elem(&flows, &key);
		if (!flow)
			return handed_on;
		old_port = pkt->dst_port;
		new_port = flow->original_port;
		port_offset = L4_DST_PORT_OFFSET;
	}
	if (l4_rewrite_embedded_port(skb, pkt, icmp_off, port_offset, old_port, new_port)) {
		stat_add(&stats, NAT_STAT_DROP_REWRITE_FAILED, 1);
		return TC_ACT_SHOT;
	}
	stat_add(&stats, NAT_STAT_ICMP_TRANSLATED, 1);
	return handed_on;
}

/* Parses the packet and counts it; returns the L4 port map entry of @port
 * (a src or dst port of @pkt) or NULL to let the packet pass, with
 * *verdict set (ICMP errors are translated here). */
static __always_inline struct nat_port *classify(struct __sk_buff *skb, struct l4_packet *pkt,
						 int by_dst_port, int *verdict)
{
	__u16 port;

	*verdict = handed_on;
	stat_add(&stats, NAT_STAT_PACKETS, 1);
	stat_add(&stats, NAT_STAT_BYTES, skb->len);
	switch (parse_packet(skb, l2_len, pkt)) {
	case PARSE_OK:
		break;
	case PARSE_ICMP:
		*verdict = translate_icmp(skb, pkt, by_dst_port);
		return NULL;
	case PARSE_FRAGMENT:
		stat_add(&stats, NAT_STAT_PASS_FRAGMENT, 1);
		return NULL;
	case PARSE_TRUNCATED:
		stat_add(&stats, NAT_STAT_PASS_TRUNCATED, 1);
		return NULL;
	case PARSE_UNPARSED:
		stat_add(&stats, NAT_STAT_PASS_UNPARSED, 1);
		return NULL;
	default:
		return NULL;
	}
	if (!proto_enabled(pkt))
		return NULL;
	port = bpf_ntohs(by_dst_port ? pkt->dst_port : pkt->src_port);
	return bpf_map_lookup_elem(&nat_ports, &port);
}

static __always_inline void track_tcp(struct nat_flow *flow, __u8 flags, __u8 direction)
{
	if (flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flow->state = FLOW_TCP_CLOSING;
	else if (flow->state == FLOW_TCP_SYN_SENT && (flags & TCP_FLAG_ACK) &&
		 ((flags & TCP_FLAG_SYN) || direction == NAT_DIR_ORIGINAL))
		flow->state = FLOW_TCP_ESTABLISHED;
}

static __always_inline void count(struct nat_flow *flow, __u8 direction, __u32 len, __u64 now)
{
	flow->last_seen_ns = now;
	__sync_fetch_and_add(&flow->packets[direction & 1], 1);
	__sync_fetch_and_add(&flow->bytes[direction & 1], len);
}

/* The state a flow starts in, from the packet that opens it. */
static __always_inline __u8 initial_state(const struct l4_packet *pkt)
{
	if (pkt->protocol == IPPROTO_UDP)
		return FLOW_UDP;
	if (pkt->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		return FLOW_TCP_CLOSING;
	if ((pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return FLOW_TCP_SYN_SENT;
	return FLOW_TCP_ESTABLISHED; /* picked up mid-stream */
}

/* Returns 0, or -1 (counted) when the packet could not be rewritten. */
static __always_inline int rewrite(struct __sk_buff *skb, const struct l4_packet *pkt,
				   __u32 port_offset, __u16 old_port, __u16 new_port)
{
	if (l4_rewrite_port(skb, pkt, port_offset, old_port, new_port)) {
		stat_add(&stats, NAT_STAT_DROP_REWRITE_FAILED, 1);
		return -1;
	}
	return 0;
}

/* Whether a TCP sequence number is near the client's latest one. */
static __always_inline int seq_near(__u32 seq, __u32 latest)
{
	return seq - latest + NAT_SEQ_WINDOW <= 2 * NAT_SEQ_WINDOW;
}

/**
 * direct_to_to() - a packet from a client straight to TO
 *
 * It ends the flow tracked under its tuple only on evidence that the client
 * now talks to TO itself: a new SYN, or a RST or FIN near the client's
 * sequence numbers. Anything else (one spoofed ACK, say) must not make the
 * server's next replies leave untranslated.
 */
static __always_inline void direct_to_to(const struct l4_packet *pkt)
{
	struct nat_flow_key key;
	struct nat_flow *flow;
	__u8 flags = pkt->tcp_flags;

	flow_key(&key, pkt, 1);
	flow = bpf_map_lookup_elem(&flows, &key);
	if (!flow)
		return;
	if (pkt->protocol == IPPROTO_TCP &&
	    ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN ||
	     ((flags & (TCP_FLAG_RST | TCP_FLAG_FIN)) &&
	      seq_near(pkt->tcp_seq, flow->client_seq)))) {
		if (bpf_map_delete_elem(&flows, &key) == 0)
			stat_add(&stats, NAT_STAT_DIRECT_STALE, 1);
		return;
	}
	stat_add(&stats, NAT_STAT_DIRECT_IGNORED, 1);
}

/**
 * owned_locally() - whether a packet to FROM belongs to a connected socket
 * of this host (an outgoing connection whose local port happens to be FROM):
 * its replies are not ours to translate. A listener or an unconnected UDP
 * socket on FROM has no peer (dst_port 0) and does not count.
 */
static __always_inline int owned_locally(struct __sk_buff *skb, const struct l4_packet *pkt)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	__u32 size;
	int owned;

	if (pkt->family == ADDR_FAMILY_INET) {
		tuple.ipv4.saddr = pkt->src_ip[0];
		tuple.ipv4.daddr = pkt->dst_ip[0];
		tuple.ipv4.sport = pkt->src_port;
		tuple.ipv4.dport = pkt->dst_port;
		size = sizeof(tuple.ipv4);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, pkt->src_ip, sizeof(tuple.ipv6.saddr));
		__builtin_memcpy(tuple.ipv6.daddr, pkt->dst_ip, sizeof(tuple.ipv6.daddr));
		tuple.ipv6.sport = pkt->src_port;
		tuple.ipv6.dport = pkt->dst_port;
		size = sizeof(tuple.ipv6);
	}
	if (pkt->protocol == IPPROTO_TCP)
		sk = bpf_sk_lookup_tcp(skb, &tuple, size, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(skb, &tuple, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	owned = sk->dst_port != 0;
	bpf_sk_release(sk);
	return owned;
}

SEC("tc")
int port_nat_ingress(struct __sk_buff *skb)
{
	struct nat_flow_key key;
	struct l4_packet pkt;
	struct nat_flow *flow;
	struct nat_port *port;
	__u64 now;
	__u16 to_port;
	__u8 new_flow = 0;
	int verdict;

	port = classify(skb, &pkt, 1, &verdict);
	if (!port)
		return verdict;
	if (!(port->role & NAT_PORT_FROM)) {
		direct_to_to(&pkt);
		return handed_on;
	}
	to_port = bpf_htons(port->to_port);
	flow_key(&key, &pkt, 1);
	key.server_port = to_port;
	now = bpf_ktime_get_ns();
	flow = bpf_map_lookup_elem(&flows, &key);
	/* The lookup costs a socket table walk: only for packets that could
	 * open a flow or answer a local connect() (SYN-ACK). */
	if ((!flow || (pkt.tcp_flags & TCP_FLAG_SYN)) && owned_locally(skb, &pkt)) {
		stat_add(&stats, NAT_STAT_PASS_LOCAL, 1);
		return handed_on;
	}
	if (flow && pkt.protocol == IPPROTO_TCP && flow->state != FLOW_TCP_SYN_SENT &&
	    (pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		/* A new connection on the tuple of an old one. */
		stat_add(&stats, NAT_STAT_REUSED_FLOWS, 1);
		flow = NULL;
	}
	if (!flow) {
		struct nat_flow fresh = {
		    .created_ns = now,
		    .original_port = pkt.dst_port,
		    .state = initial_state(&pkt),
		    .client_seq = pkt.tcp_seq,
		};

		if (bpf_map_update_elem(&flows, &key, &fresh, BPF_ANY) ||
		    !(flow = bpf_map_lookup_elem(&flows, &key))) {
			/* Without a flow the reply could not be translated back. */
			stat_add(&stats, NAT_STAT_DROP_TRACK_FAILED, 1);
			return TC_ACT_SHOT;
		}
		stat_add(&stats, NAT_STAT_NEW_FLOWS, 1);
		new_flow = 1;
	} else {
		if (flow->original_port != pkt.dst_port)
			flow->original_port = pkt.dst_port;
		/* A packet far from the client's sequence numbers is delivered
		 * (the server judges it) but moves neither the state nor the
		 * window: a forged FIN/RST/ACK via FROM must not shorten the
		 * flow's timeout or open the way for a forged RST to TO. */
		if (pkt.protocol == IPPROTO_TCP) {
			if (seq_near(pkt.tcp_seq, flow->client_seq)) {
				track_tcp(flow, pkt.tcp_flags, NAT_DIR_ORIGINAL);
				flow->client_seq = pkt.tcp_seq;
			} else {
				stat_add(&stats, NAT_STAT_OUT_OF_WINDOW, 1);
			}
		}
	}
	count(flow, NAT_DIR_ORIGINAL, skb->len, now);
	if (rewrite(skb, &pkt, L4_DST_PORT_OFFSET, pkt.dst_port, to_port))
		return TC_ACT_SHOT;
	stat_add(&stats, NAT_STAT_INGRESS_TRANSLATED, 1);
	emit(&pkt, to_port, NAT_DIR_ORIGINAL, new_flow);
	return handed_on;
}

SEC("tc")
int port_nat_egress(struct __sk_buff *skb)
{
	struct nat_flow_key key;
	struct l4_packet pkt;
	struct nat_flow *flow;
	struct nat_port *port;
	__u16 original_port;
	int verdict;

	port = classify(skb, &pkt, 0, &verdict);
	if (!port)
		return verdict;
	if (!(port->role & NAT_PORT_TO))
		return handed_on;
	flow_key(&key, &pkt, 0);
	flow = bpf_map_lookup_elem(&flows, &key);
	if (!flow) {
		stat_add(&stats, NAT_STAT_REPLY_UNTRACKED, 1);
		return handed_on;
	}
	if (pkt.protocol == IPPROTO_TCP)
		track_tcp(flow, pkt.tcp_flags, NAT_DIR_REPLY);
	count(flow, NAT_DIR_REPLY, skb->len, bpf_ktime_get_ns());
	original_port = flow->original_port;
	if (rewrite(skb, &pkt, L4_SRC_PORT_OFFSET, pkt.src_port, original_port))
		return TC_ACT_SHOT;
	stat_add(&stats, NAT_STAT_EGRESS_TRANSLATED, 1);
	emit(&pkt, original_port, NAT_DIR_REPLY, 0);
	return handed_on;
}

char LICENSE[] SEC("license") = "GPL";
