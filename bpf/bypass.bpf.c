// SPDX-License-Identifier: GPL-2.0
/*
 * bypass: short-circuit TCP between two sockets of this host.
 *
 * sockops puts each established socket whose peer is another socket of its
 * own network namespace into a SOCKHASH, keyed by (namespace, local, remote).
 * The sk_msg program, attached to that map, runs on every sendmsg of those
 * sockets and moves the message straight into the receive queue of the peer
 * socket, found under (namespace, remote, local), skipping TCP/IP and
 * loopback. Without a peer the message takes the normal path. One instance
 * serves every namespace of the cgroup and never pairs across them.
 */
#include "lib/common.h"
#include "bypass.h"

/* Configuration, set by user space before load. */
const volatile __u8 filter_ports; /* 0: every port */
const volatile __u8 emit_events;

/* Set by user space when it stops: no new insertions, no new redirects. */
__u32 stopping;

/* The sockets that may take the bypass. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} sockets SEC(".maps");

/* Sockets that sent a message while their peer was not in the map: that
 * data went over TCP, so later messages must follow it there, never
 * overtake it through the peer's redirect queue. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} normal_path SEC(".maps");

/* Programs (comm) that read sockets with splice(2), which cannot see
 * redirected messages: their sockets never enter the map. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct comm);
	__type(value, __u8);
} splicers SEC(".maps");

/* Listening ports whose listen() came from one of the splicers: the
 * sockets they accept belong to that program. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct listener_key);
	__type(value, __u8);
} splice_listeners SEC(".maps");

/* Connecting sockets whose connect() came from one of the splicers. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} splice_connectors SEC(".maps");

/* With filter_ports: ports (host order) whose connections may be bypassed. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} ports SEC(".maps");

/* One record per insertion attempt, when emit_events is set. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* enum bypass_stat counters. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BYPASS_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Keep the shared types in BTF so that the skeleton generates them for Rust. */
struct bypass_event unused_bypass_event __attribute__((unused));
enum bypass_side unused_bypass_side __attribute__((unused));
enum bypass_stat unused_bypass_stat __attribute__((unused));

/* The loopback device has this index in every network namespace. */
#define LOOPBACK_IFINDEX 1

/* The fields of the kernel's sockets that the sockops context lacks, found
 * by CO-RE in the running kernel's BTF. */
struct net_device {
	int ifindex;
} __attribute__((preserve_access_index));

struct dst_entry {
	struct net_device *dev;
} __attribute__((preserve_access_index));

struct sock {
	struct dst_entry *sk_dst_cache;
} __attribute__((preserve_access_index));

struct task_struct {
	char comm[16];
} __attribute__((preserve_access_index));

struct tcp_sock {
	__u32 write_seq;
	__u32 snd_nxt;
} __attribute__((preserve_access_index));

/*
 * The key of a socket from a sockops or sk_msg context, which name their
 * fields alike. remote_port holds the network-order port in its upper 16
 * bits; bpf_ntohl() yields it in host order. The ip6 fields allow 4-byte
 * loads only, one word at a time.
 */
#define SOCK_KEY_FROM_CTX(ctx, key)                                                                \
	do {                                                                                       \
		__u16 lport = bpf_htons((__u16)(ctx)->local_port);                                 \
		__u16 rport = bpf_htons((__u16)bpf_ntohl((ctx)->remote_port));                     \
		(key)->netns = bpf_get_netns_cookie(ctx);                                          \
		if ((ctx)->family == ADDR_FAMILY_INET) {                                           \
			endpoint_set_v4(&(key)->local, (ctx)->local_ip4, lport);                   \
			endpoint_set_v4(&(key)->remote, (ctx)->remote_ip4, rport);                 \
		} else {                                                                           \
			__u32 l6[4] = {(ctx)->local_ip6[0], (ctx)->local_ip6[1],                   \
				       (ctx)->local_ip6[2], (ctx)->local_ip6[3]};                  \
			__u32 r6[4] = {(ctx)->remote_ip6[0], (ctx)->remote_ip6[1],                 \
				       (ctx)->remote_ip6[2], (ctx)->remote_ip6[3]};                \
			endpoint_set_v6(&(key)->local, l6, lport);                                 \
			endpoint_set_v6(&(key)->remote, r6, rport);                                \
		}                                                                                  \
	} while (0)

/**
 * peer_in_same_netns() - whether the other end is a socket of this namespace
 * @tp: the socket, established
 *
 * The route to any address of a namespace, loopback or not, goes through
 * that namespace's loopback device, and loopback never crosses namespaces.
 * So the peer is a socket of the same namespace exactly when the socket's
 * route leads to lo: no list of addresses, and a connection that leaves the
 * host (or comes from another namespace over a veth) never qualifies. The
 * route, not the interface the handshake arrived on: sk_rx_dst_ifindex is
 * still 0 at ACTIVE_ESTABLISHED on loopback.
 */
static __always_inline int peer_in_same_netns(struct tcp_sock *tp)
{
	struct dst_entry *dst = ((struct sock *)tp)->sk_dst_cache;

	return dst && dst->dev && dst->dev->ifindex == LOOPBACK_IFINDEX;
}

/**
 * data_crossed_tcp() - whether any byte went over TCP before insertion
 * @skops: the socket's sockops context, at ESTABLISHED
 * @tp: the same socket
 *
 * With Fast Open the SYN may carry data, and a client may queue data before
 * the handshake ends (TCP_FASTOPEN_CONNECT); that data travels over TCP.
 * Redirected messages would be read before it, so such a socket stays out.
 */
static __always_inline int data_crossed_tcp(struct bpf_sock_ops *skops, struct tcp_sock *tp)
{
	return skops->data_segs_in || skops->data_segs_out || skops->bytes_received ||
	       tp->write_seq != tp->snd_nxt;
}

static __always_inline int port_allowed(const struct sock_key *key)
{
	__u16 local = bpf_ntohs(key->local.port);
	__u16 remote = bpf_ntohs(key->remote.port);

	if (!filter_ports)
		return 1;
	return bpf_map_lookup_elem(&ports, &local) || bpf_map_lookup_elem(&ports, &remote);
}

static __always_inline void emit(struct bpf_sock_ops *skops, const struct sock_key *key, __u8 side,
				 int error)
{
	struct bypass_event *event;

	if (!emit_events)
		return;
	event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);
	if (!event) {
		stat_add(&stats, BYPASS_STAT_EVENTS_LOST, 1);
		return;
	}
	event->timestamp_ns = bpf_ktime_get_ns();
	event->cookie = bpf_get_socket_cookie(skops);
	event->error = error;
	event->side = side;
	__builtin_memset(event->pad, 0, sizeof(event->pad));
	event->key = *key;
	bpf_ringbuf_submit(event, 0);
}

/* Linux 6.1 does not give sockops bpf_get_current_comm(); the current task
 * and a read of its comm do the same there and everywhere later. */
static __always_inline int current_program_splices(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct comm comm = {};

	if (bpf_probe_read_kernel(comm.name, sizeof(comm.name), &task->comm))
		return 0;
	return bpf_map_lookup_elem(&splicers, &comm) != NULL;
}

/*
 * TCP_LISTEN_CB and TCP_CONNECT_CB run in the listen() and connect() calls
 * of the program that owns the socket; ESTABLISHED runs in softirq context,
 * where the current task is anyone's.
 */
static __always_inline void remember_program(struct bpf_sock_ops *skops)
{
	struct listener_key listener = {
	    .netns = bpf_get_netns_cookie(skops),
	    .port = (__u16)skops->local_port,
	};
	struct bpf_sock *sk = skops->sk;
	__u8 one = 1;

	if (skops->op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		if (current_program_splices())
			bpf_map_update_elem(&splice_listeners, &listener, &one, BPF_ANY);
		else
			bpf_map_delete_elem(&splice_listeners, &listener);
	} else if (sk && current_program_splices()) {
		bpf_sk_storage_get(&splice_connectors, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	}
}

static __always_inline int program_splices(struct bpf_sock_ops *skops, struct bpf_sock *sk,
					   __u8 side)
{
	struct listener_key listener = {
	    .netns = bpf_get_netns_cookie(skops),
	    .port = (__u16)skops->local_port,
	};

	if (side == SIDE_ACTIVE)
		return bpf_sk_storage_get(&splice_connectors, sk, 0, 0) != NULL;
	return bpf_map_lookup_elem(&splice_listeners, &listener) != NULL;
}

static __always_inline void established(struct bpf_sock_ops *skops, __u8 side)
{
	struct sock_key key = {};
	struct bpf_sock *sk = skops->sk;
	struct tcp_sock *tp;
	long err;

	if (skops->family != ADDR_FAMILY_INET && skops->family != ADDR_FAMILY_INET6)
		return;
	if (!sk)
		return;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return;
	stat_add(&stats, BYPASS_STAT_ESTABLISHED, 1);
	SOCK_KEY_FROM_CTX(skops, &key);
	if (!port_allowed(&key)) {
		stat_add(&stats, BYPASS_STAT_OTHER_PORT, 1);
		return;
	}
	if (!peer_in_same_netns(tp)) {
		stat_add(&stats, BYPASS_STAT_NOT_LOCAL, 1);
		return;
	}
	if (data_crossed_tcp(skops, tp)) {
		stat_add(&stats, BYPASS_STAT_DATA_BEFORE, 1);
		return;
	}
	if (program_splices(skops, sk, side)) {
		stat_add(&stats, BYPASS_STAT_SPLICE_READER, 1);
		return;
	}
	if (READ_ONCE(stopping)) {
		stat_add(&stats, BYPASS_STAT_STOPPING, 1);
		return;
	}
	err = bpf_sock_hash_update(skops, &sockets, &key, BPF_ANY);
	stat_add(&stats, err ? BYPASS_STAT_INSERT_FAILED : BYPASS_STAT_INSERTED, 1);
	emit(skops, &key, side, err);
}

SEC("sockops")
int bypass_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		remember_program(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		established(skops, SIDE_ACTIVE);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		established(skops, SIDE_PASSIVE);
		break;
	}
	return 1;
}

SEC("sk_msg")
int bypass_msg(struct sk_msg_md *msg)
{
	struct sock_key peer = {};
	struct endpoint local;
	struct bpf_sock *sk = msg->sk;
	__u32 size = msg->size;

	if (READ_ONCE(stopping) || !sk || bpf_sk_storage_get(&normal_path, sk, 0, 0))
		goto pass;
	SOCK_KEY_FROM_CTX(msg, &peer);
	/* The peer socket sees the same connection the other way round. */
	local = peer.local;
	peer.local = peer.remote;
	peer.remote = local;
	/* SK_DROP means no peer: the message then takes the normal path. */
	if (bpf_msg_redirect_hash(msg, &sockets, &peer, BPF_F_INGRESS) == SK_PASS) {
		stat_add(&stats, BYPASS_STAT_MSG_REDIRECTED, 1);
		stat_add(&stats, BYPASS_STAT_BYTES_REDIRECTED, size);
		return SK_PASS;
	}
	bpf_sk_storage_get(&normal_path, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
pass:
	stat_add(&stats, BYPASS_STAT_MSG_PASSED, 1);
	stat_add(&stats, BYPASS_STAT_BYTES_PASSED, size);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
