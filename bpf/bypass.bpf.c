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
 * serves every namespace of the cgroup.
 *
 * With --across-namespaces, sockets whose peer is in another namespace of
 * this host (pods on a bridge) are paired by proof, never by address (two
 * namespaces may use the same addresses): the first end seen established
 * waits in `candidates` under the connection's tuple, and the other end
 * pairs with it only when its sequence numbers are the first end's,
 * mirrored. Both then know each other's socket cookie (socket storage),
 * their key in the `paired` map, so the data path never looks a tuple up.
 * A second claim on one tuple poisons it, and pairs neither.
 */
#include "lib/common.h"
#include <bpf/bpf_core_read.h>
#include "bypass.h"

/* Configuration, set by user space before load. */
const volatile __u8 filter_ports; /* 0: every port */
const volatile __u8 emit_events;

/* enum bypass_control flags, set by user space. A map, not globals,
 * because it outlives the process under a service: every program that
 * ever inserted a socket (a predecessor's too, whose sockets keep it)
 * reads the one stop flag. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CONTROL_COUNT);
	__type(key, __u32);
	__type(value, __u32);
} control SEC(".maps");

/* Sockets of cross-namespace pairs, and first ends waiting for theirs, by
 * socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} paired SEC(".maps");

/* First ends waiting for the other end of their connection. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pair_key);
	__type(value, struct pair_candidate);
} candidates SEC(".maps");

/* A cross-namespace socket's peer. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct pair_peer);
} peers SEC(".maps");

/* The peer of a first end, by the first end's cookie, until the first end
 * takes it into its own storage (a sockops program can reach no other
 * socket's storage: it cannot release the socket a map lookup returns). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct pair_peer);
} proofs SEC(".maps");

/**
 * peer_of() - the proven peer of a cross-namespace socket, or NULL
 * @peer: its storage
 *
 * A first end learns its peer here, from `proofs`, the first time it asks
 * after the proof came.
 */
static __always_inline struct pair_peer *peer_of(struct pair_peer *peer)
{
	struct pair_peer *proof;
	__u64 own = peer->own_cookie;

	if (READ_ONCE(peer->cookie))
		return peer;
	proof = bpf_map_lookup_elem(&proofs, &own);
	if (!proof)
		return 0;
	peer->key = proof->key;
	WRITE_ONCE(peer->cookie, proof->cookie);
	bpf_map_delete_elem(&proofs, &own);
	return peer;
}

/* The sockets that may take the bypass. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} sockets SEC(".maps");

/* Programs (comm) that read sockets with splice(2), which cannot see
 * redirected messages: named by user space, or learned at their first
 * splice. Their sockets never enter the map. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct comm);
	__type(value, __u8);
} splicers SEC(".maps");

/* Programs that splice and read what splice misses themselves (the
 * built-in proxy): never learned as splicers. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, struct comm);
	__type(value, __u8);
} splice_aware SEC(".maps");

/* Readers known to read with recvmsg: programs (comm) seen reading the
 * sockets they connected, and listening ports whose accepted sockets were
 * read so. Their later sockets take the bypass from the first byte,
 * without waiting for a first read over TCP (which a streaming writer may
 * never let a reader catch up with). By port for accepted sockets: the
 * program that listened is unknown when it did so before bypass started. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct comm);
	__type(value, __u8);
} recv_readers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct listener_key);
	__type(value, __u8);
} recv_listeners SEC(".maps");

/* The program that called listen() on each listening port: the sockets
 * the port accepts belong to it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct listener_key);
	__type(value, struct comm);
} listeners SEC(".maps");

/* The program that called connect() on each connecting socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct comm);
} connectors SEC(".maps");

/* How far the reader of each inserted socket has read from TCP, by the
 * socket's key (see bypass_msg). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, struct reader);
} readers SEC(".maps");

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
struct reader unused_reader __attribute__((unused));
enum bypass_side unused_bypass_side __attribute__((unused));
enum bypass_stat unused_bypass_stat __attribute__((unused));
enum bypass_control unused_bypass_control __attribute__((unused));

static __always_inline int control_set(__u32 index)
{
	__u32 *flag = bpf_map_lookup_elem(&control, &index);

	return flag && READ_ONCE(*flag);
}

static __always_inline int stopping(void)
{
	return control_set(CONTROL_STOPPING);
}

/* How long a first end waits for the other: a handshake between two
 * namespaces of one host ends within microseconds; an entry older than
 * this is a connection that never found its other end here. */
#define CANDIDATE_TTL_NS 1000000000ULL

/* The loopback device has this index in every network namespace. */
#define LOOPBACK_IFINDEX 1
#define EBUSY 16

/* The fields of the kernel's sockets that the sockops context lacks, found
 * by CO-RE in the running kernel's BTF. */
struct net_device {
	int ifindex;
} __attribute__((preserve_access_index));

struct dst_entry {
	struct net_device *dev;
} __attribute__((preserve_access_index));

struct net {
	__u64 net_cookie;
} __attribute__((preserve_access_index));

struct in6_addr {
	union {
		__u32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__u32 skc_daddr;
	__u32 skc_rcv_saddr;
	__u16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	struct {
		struct net *net;
	} skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	struct dst_entry *sk_dst_cache;
	void *sk_user_data;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct socket {
	struct sock *sk;
} __attribute__((preserve_access_index));

struct list_head {
	struct list_head *next;
} __attribute__((preserve_access_index));

struct sk_psock {
	struct list_head ingress_msg;
} __attribute__((preserve_access_index));

struct task_struct {
	char comm[16];
} __attribute__((preserve_access_index));

/* The system call a task is in, and the numbers of those that read a
 * socket through splice_read. */
#if defined(__TARGET_ARCH_x86)
struct pt_regs {
	long orig_ax;
} __attribute__((preserve_access_index));
#define SYSCALL_NR(regs) ((regs)->orig_ax)
#define NR_SENDFILE 40
#define NR_SPLICE 275
#elif defined(__TARGET_ARCH_arm64)
struct pt_regs {
	int syscallno;
} __attribute__((preserve_access_index));
#define SYSCALL_NR(regs) ((regs)->syscallno)
#define NR_SENDFILE 71
#define NR_SPLICE 76
#else
#error "bypass needs the system call numbers of this architecture"
#endif

struct tcp_ulp_ops;

struct inet_connection_sock {
	const struct tcp_ulp_ops *icsk_ulp_ops;
} __attribute__((preserve_access_index));

struct tcp_sock {
	struct inet_connection_sock inet_conn;
	__u32 copied_seq;
	__u32 write_seq;
	__u32 snd_nxt;
	__u32 rcv_nxt;
	__u8 repair : 1;
} __attribute__((preserve_access_index));

/* Whether a socket has an upper layer protocol: an MPTCP subflow, kTLS. */
static __always_inline int has_ulp(struct tcp_sock *tp)
{
	return tp->inet_conn.icsk_ulp_ops != 0;
}

/* sk_user_data holds a psock, flagged in its low bits, while the socket is
 * in a sockmap (include/net/sock.h). */
#define SK_USER_DATA_PSOCK 4UL
#define SK_USER_DATA_PTRMASK (~7UL)

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
				 int error, __u8 across)
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
	event->across = across;
	__builtin_memset(event->pad, 0, sizeof(event->pad));
	event->key = *key;
	submit_event(&events, event);
}

/* Linux 6.1 does not give sockops bpf_get_current_comm(); the current task
 * and a read of its comm do the same there and everywhere later. */
static __always_inline void current_comm(struct comm *comm)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	bpf_probe_read_kernel(comm->name, sizeof(comm->name), &task->comm);
}

/*
 * TCP_LISTEN_CB and TCP_CONNECT_CB run in the listen() and connect() calls
 * of the program that owns the socket; ESTABLISHED runs in softirq context,
 * where the current task is anyone's. The name is kept rather than the
 * verdict, so that a program learned as a splicer later (at its first
 * splice) loses the bypass on the sockets its earlier listen() accepts.
 */
static __always_inline void remember_program(struct bpf_sock_ops *skops)
{
	struct listener_key listener = {
	    .netns = bpf_get_netns_cookie(skops),
	    .port = (__u16)skops->local_port,
	};
	struct bpf_sock *sk = skops->sk;
	struct comm comm = {};
	struct comm *stored;

	current_comm(&comm);
	if (skops->op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		bpf_map_update_elem(&listeners, &listener, &comm, BPF_ANY);
		return;
	}
	if (!sk)
		return;
	stored = bpf_sk_storage_get(&connectors, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (stored)
		*stored = comm;
}

/* Whether a socket's reader is known to read with recvmsg (recv_readers). */
static __always_inline int known_recv_reader(struct bpf_sock_ops *skops, struct comm *program,
					     __u8 side)
{
	struct listener_key listener = {
	    .netns = bpf_get_netns_cookie(skops),
	    .port = (__u16)skops->local_port,
	};

	if (side == SIDE_ACTIVE)
		return program && bpf_map_lookup_elem(&recv_readers, program);
	return bpf_map_lookup_elem(&recv_listeners, &listener) != 0;
}

/* The program a socket belongs to (see remember_program), if known. */
static __always_inline struct comm *program_of(struct bpf_sock_ops *skops, struct bpf_sock *sk,
					       __u8 side)
{
	struct listener_key listener = {
	    .netns = bpf_get_netns_cookie(skops),
	    .port = (__u16)skops->local_port,
	};

	if (side == SIDE_ACTIVE)
		return bpf_sk_storage_get(&connectors, sk, 0, 0);
	return bpf_map_lookup_elem(&listeners, &listener);
}

/**
 * insert() - put a socket into a sockmap, with the position of its reader
 * @map: `sockets` (key: the socket's sock_key) or `paired` (its cookie)
 * @map_key: its key there
 *
 * Returns 0 or the insertion's -errno, counted either way.
 */
static __always_inline long insert(struct bpf_sock_ops *skops, struct tcp_sock *tp,
				   const struct sock_key *key, void *map, void *map_key, __u8 side,
				   int known_reader)
{
	struct reader reader = {};
	long err;

	reader.copied_seq = tp->copied_seq;
	/* A program known to read with recvmsg: its peer may redirect at once. */
	reader.received = known_reader;
	reader.side = side;
	bpf_map_update_elem(&readers, key, &reader, BPF_ANY);
	err = bpf_sock_hash_update(skops, map, map_key, BPF_ANY);
	stat_add(&stats, err ? BYPASS_STAT_INSERT_FAILED : BYPASS_STAT_INSERTED, 1);
	/* A socket belongs to one sockmap with msg programs: another tool's
	 * holds it, and it stays on TCP with theirs. */
	if (err == -EBUSY)
		stat_add(&stats, BYPASS_STAT_HELD_ELSEWHERE, 1);
	emit(skops, key, side, err, map == (void *)&paired);
	return err;
}

/**
 * pair_across() - pair a socket with its peer in another namespace, by proof
 *
 * The first end of a connection to get here waits in `candidates` (and in
 * `paired`, so that its peer can name it); the second pairs with it when
 * it mirrors its sequence numbers: both ends of one TCP connection were
 * seen established on this host, which is the proof that the peer is
 * local, and no other socket can claim it without guessing 64 bits. The
 * second end tells the first by writing into its socket storage.
 */
static __always_inline void pair_across(struct bpf_sock_ops *skops, struct bpf_sock *sk,
					struct tcp_sock *tp, const struct sock_key *key, __u8 side,
					int known_reader)
{
	struct pair_candidate mine = {};
	struct pair_candidate *found;
	struct pair_peer proof = {};
	struct pair_key pair = {};
	struct pair_peer *peer;
	__u64 cookie = bpf_get_socket_cookie(skops);
	__u64 now = bpf_ktime_get_ns();

	if (side == SIDE_ACTIVE) {
		pair.active = key->local;
		pair.passive = key->remote;
		mine.active_snd_nxt = tp->snd_nxt;
		mine.active_rcv_nxt = tp->rcv_nxt;
	} else {
		pair.active = key->remote;
		pair.passive = key->local;
		mine.active_snd_nxt = tp->rcv_nxt;
		mine.active_rcv_nxt = tp->snd_nxt;
	}
	found = bpf_map_lookup_elem(&candidates, &pair);
	if (found && now - READ_ONCE(found->since_ns) < CANDIDATE_TTL_NS) {
		if (READ_ONCE(found->poisoned)) {
			stat_add(&stats, BYPASS_STAT_ACROSS_AMBIGUOUS, 1);
			return;
		}
		if (found->side == side) {
			WRITE_ONCE(found->poisoned, 1);
			stat_add(&stats, BYPASS_STAT_ACROSS_AMBIGUOUS, 1);
			return;
		}
		if (found->active_snd_nxt != mine.active_snd_nxt ||
		    found->active_rcv_nxt != mine.active_rcv_nxt) {
			WRITE_ONCE(found->poisoned, 1);
			stat_add(&stats, BYPASS_STAT_ACROSS_MISMATCH, 1);
			return;
		}
		peer = bpf_sk_storage_get(&peers, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!peer)
			return;
		peer->own_cookie = cookie;
		peer->key = found->key;
		peer->cookie = found->cookie;
		if (insert(skops, tp, key, &paired, &cookie, side, known_reader))
			return;
		proof.cookie = cookie;
		proof.own_cookie = found->cookie;
		proof.key = *key;
		bpf_map_update_elem(&proofs, &found->cookie, &proof, BPF_ANY);
		bpf_map_delete_elem(&candidates, &pair);
		stat_add(&stats, BYPASS_STAT_ACROSS_PAIRED, 1);
		return;
	}
	if (found)
		bpf_map_delete_elem(&candidates, &pair);
	mine.cookie = cookie;
	mine.since_ns = now;
	mine.key = *key;
	mine.side = side;
	/* Two sockets claiming one connection at once: the second fails
	 * here and poisons the first's claim. */
	if (bpf_map_update_elem(&candidates, &pair, &mine, BPF_NOEXIST)) {
		found = bpf_map_lookup_elem(&candidates, &pair);
		if (found)
			WRITE_ONCE(found->poisoned, 1);
		stat_add(&stats, BYPASS_STAT_ACROSS_AMBIGUOUS, 1);
		return;
	}
	peer = bpf_sk_storage_get(&peers, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!peer || insert(skops, tp, key, &paired, &cookie, side, known_reader)) {
		bpf_map_delete_elem(&candidates, &pair);
		return;
	}
	peer->own_cookie = cookie;
	/* The first sample of its round-trip time comes once its peer has
	 * answered: by then the proof has come, or the peer is not here. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG);
	stat_add(&stats, BYPASS_STAT_ACROSS_WAITING, 1);
}

/* A first end's first round-trip sample: no proof came, so its peer is not
 * a socket of this host (or NAT rewrote the connection on the way); it
 * leaves the map, which never redirected anything to or from it. */
static __always_inline void first_sample(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct pair_peer *peer;
	__u64 cookie;

	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
	if (!sk)
		return;
	peer = bpf_sk_storage_get(&peers, sk, 0, 0);
	if (!peer || peer_of(peer))
		return;
	cookie = bpf_get_socket_cookie(skops);
	bpf_map_delete_elem(&paired, &cookie);
	stat_add(&stats, BYPASS_STAT_ACROSS_UNPROVEN, 1);
}

static __always_inline void established(struct bpf_sock_ops *skops, __u8 side)
{
	struct sock_key key = {};
	struct bpf_sock *sk = skops->sk;
	struct comm *program;
	struct tcp_sock *tp;
	int known_reader;
	int local;

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
	local = peer_in_same_netns(tp);
	if (!local && !control_set(CONTROL_ACROSS)) {
		stat_add(&stats, BYPASS_STAT_NOT_LOCAL, 1);
		return;
	}
	if (data_crossed_tcp(skops, tp)) {
		stat_add(&stats, BYPASS_STAT_DATA_BEFORE, 1);
		return;
	}
	if (BPF_CORE_READ_BITFIELD(tp, repair)) {
		stat_add(&stats, BYPASS_STAT_REPAIR, 1);
		return;
	}
	if (has_ulp(tp)) {
		stat_add(&stats, BYPASS_STAT_ULP, 1);
		return;
	}
	program = program_of(skops, sk, side);
	if (program && bpf_map_lookup_elem(&splicers, program)) {
		stat_add(&stats, BYPASS_STAT_SPLICE_READER, 1);
		return;
	}
	known_reader = known_recv_reader(skops, program, side);
	if (stopping()) {
		stat_add(&stats, BYPASS_STAT_STOPPING, 1);
		return;
	}
	if (known_reader)
		stat_add(&stats, BYPASS_STAT_KNOWN_READER, 1);
	if (local)
		insert(skops, tp, &key, &sockets, &key, side, known_reader);
	else
		pair_across(skops, sk, tp, &key, side, known_reader);
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
	case BPF_SOCK_OPS_RTT_CB:
		first_sample(skops);
		break;
	}
	return 1;
}

/*
 * A message may be redirected only once the peer's reader has read, with
 * recvmsg, every byte this socket ever sent over TCP. The receiver reads
 * its redirect queue before its TCP queue, so a message redirected while
 * older bytes still wait there (a first write that left before the socket
 * was inserted, a message that found no peer) would overtake them.
 * write_seq counts every byte this socket queued to TCP and none of the
 * redirected ones; the peer's copied_seq counts what its reader took from
 * TCP, published as each recvmsg returns (received()). A socket never
 * read with recvmsg (a splice reader) or seen splicing is never a target.
 */
SEC("sk_msg")
int bypass_msg(struct sk_msg_md *msg)
{
	struct sock_key peer = {};
	struct endpoint local;
	struct bpf_sock *sk = msg->sk;
	struct pair_peer *across;
	struct reader *reader;
	struct tcp_sock *tp;
	__u32 size = msg->size;

	if (stopping() || !sk)
		goto pass;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		goto pass;
	if (has_ulp(tp)) {
		stat_add(&stats, BYPASS_STAT_MSG_ULP, 1);
		goto pass;
	}
	across = bpf_sk_storage_get(&peers, sk, 0, 0);
	if (across) {
		/* A cross-namespace socket: its peer by proof, or none yet. */
		across = peer_of(across);
		if (!across)
			goto pass;
		peer = across->key;
	} else {
		SOCK_KEY_FROM_CTX(msg, &peer);
		/* The peer socket sees the same connection the other way round. */
		local = peer.local;
		peer.local = peer.remote;
		peer.remote = local;
	}
	reader = bpf_map_lookup_elem(&readers, &peer);
	if (!reader || !READ_ONCE(reader->received) || READ_ONCE(reader->spliced) ||
	    READ_ONCE(reader->copied_seq) != tp->write_seq) {
		stat_add(&stats, BYPASS_STAT_MSG_PEER_BEHIND, 1);
		goto pass;
	}
	/* SK_DROP means no peer: the message then takes the normal path. */
	if (across) {
		if (bpf_msg_redirect_hash(msg, &paired, &across->cookie, BPF_F_INGRESS) ==
		    SK_PASS) {
			stat_add(&stats, BYPASS_STAT_MSG_REDIRECTED, 1);
			stat_add(&stats, BYPASS_STAT_BYTES_REDIRECTED, size);
			stat_add(&stats, BYPASS_STAT_MSG_ACROSS, 1);
			stat_add(&stats, BYPASS_STAT_BYTES_ACROSS, size);
			return SK_PASS;
		}
	} else if (bpf_msg_redirect_hash(msg, &sockets, &peer, BPF_F_INGRESS) == SK_PASS) {
		stat_add(&stats, BYPASS_STAT_MSG_REDIRECTED, 1);
		stat_add(&stats, BYPASS_STAT_BYTES_REDIRECTED, size);
		return SK_PASS;
	}
pass:
	stat_add(&stats, BYPASS_STAT_MSG_PASSED, 1);
	stat_add(&stats, BYPASS_STAT_BYTES_PASSED, size);
	return SK_PASS;
}

/* The key of a socket as sockops built it, read from the socket itself. */
static __always_inline void sock_key_from_sk(struct sock *sk, struct sock_key *key)
{
	struct sock_common *common = &sk->__sk_common;
	__u16 lport = bpf_htons(common->skc_num);
	__u16 rport = common->skc_dport;

	key->netns = common->skc_net.net->net_cookie;
	if (common->skc_family == ADDR_FAMILY_INET) {
		endpoint_set_v4(&key->local, common->skc_rcv_saddr, lport);
		endpoint_set_v4(&key->remote, common->skc_daddr, rport);
	} else {
		__u32 l6[4], r6[4];

		bpf_probe_read_kernel(l6, sizeof(l6), &common->skc_v6_rcv_saddr);
		bpf_probe_read_kernel(r6, sizeof(r6), &common->skc_v6_daddr);
		endpoint_set_v6(&key->local, l6, lport);
		endpoint_set_v6(&key->remote, r6, rport);
	}
}

/* Whether a socket is a TCP socket in a sockmap (ours or another tool's). */
static __always_inline int in_a_sockmap(struct sock *sk)
{
	return sk && sk->sk_protocol == IPPROTO_TCP &&
	       ((__u64)sk->sk_user_data & SK_USER_DATA_PSOCK);
}

/* The reader entry of a TCP socket in a sockmap, if bypass inserted it. */
static __always_inline struct reader *reader_of(struct sock *sk)
{
	struct sock_key key = {};

	if (!in_a_sockmap(sk))
		return 0;
	sock_key_from_sk(sk, &key);
	return bpf_map_lookup_elem(&readers, &key);
}

/* The key of the listener that accepted a socket: its namespace and local
 * port. */
static __always_inline void listener_of(struct sock *sk, struct listener_key *listener)
{
	struct sock_common *common = &sk->__sk_common;

	listener->netns = common->skc_net.net->net_cookie;
	listener->port = common->skc_num;
}

/* The current task reads socket @sk of @side with recvmsg: the program
 * that connected it, or the port that accepted it, reads so (unless it was
 * seen splicing). */
static __always_inline void learn_recv_reader(struct sock *sk, __u8 side)
{
	struct listener_key listener = {};
	struct comm comm = {};
	__u8 one = 1;

	bpf_get_current_comm(comm.name, sizeof(comm.name));
	if (bpf_map_lookup_elem(&splicers, &comm))
		return;
	if (side == SIDE_PASSIVE) {
		listener_of(sk, &listener);
		if (!bpf_map_lookup_elem(&recv_listeners, &listener) &&
		    !bpf_map_update_elem(&recv_listeners, &listener, &one, BPF_NOEXIST))
			stat_add(&stats, BYPASS_STAT_RECV_READERS_LEARNED, 1);
		return;
	}
	if (!bpf_map_lookup_elem(&recv_readers, &comm) &&
	    !bpf_map_update_elem(&recv_readers, &comm, &one, BPF_NOEXIST))
		stat_add(&stats, BYPASS_STAT_RECV_READERS_LEARNED, 1);
}

/*
 * A recvmsg that returned data: publish how far the socket's reader has
 * read from TCP. Published when the call has returned, so a reader still
 * inside tcp_recvmsg (waiting for MSG_WAITALL, say), which would not see
 * redirected messages, never has them sent behind its back.
 */
static __always_inline void received(struct sock *sk, int ret)
{
	struct reader *reader;
	struct tcp_sock *tp;
	__u32 copied;

	if (ret <= 0)
		return;
	reader = reader_of(sk);
	tp = bpf_skc_to_tcp_sock(sk);
	if (!reader || !tp)
		return;
	copied = tp->copied_seq;
	if (!READ_ONCE(reader->received))
		learn_recv_reader(sk, reader->side);
	if (copied != READ_ONCE(reader->copied_seq) || !READ_ONCE(reader->received)) {
		WRITE_ONCE(reader->copied_seq, copied);
		WRITE_ONCE(reader->received, 1);
	}
}

/* Every recvmsg, read() and recvmmsg of a socket, as it returns (6.4+). */
SEC("tp_btf/sock_recv_length")
int bypass_recv_length(__u64 *ctx)
{
	received((struct sock *)ctx[0], (int)ctx[1]);
	return 0;
}

/* The same on kernels without that tracepoint: the recvmsg of sockets in a
 * sockmap. */
SEC("fexit/tcp_bpf_recvmsg")
int bypass_recvmsg_exit(__u64 *ctx)
{
	__u64 ret = 0;

	if (!bpf_get_func_ret(ctx, &ret))
		received((struct sock *)ctx[0], (int)ret);
	return 0;
}

/*
 * splice(2) reads the TCP queue only: whatever was redirected to the
 * socket is out of its reach. tcp_rcv_space_adjust runs whenever a reader
 * has taken data from TCP, in the reader's system call; within splice or
 * sendfile, the socket's program becomes a splicer, so that none of its
 * later sockets enters the map. If nothing waits in the socket's redirect
 * queue, senders stop redirecting to it and everything arrives over TCP,
 * in order. If something already waits there, nothing can bring it to
 * splice; senders keep redirecting, so that later bytes never overtake
 * it, and the event is counted.
 */
SEC("tp_btf/tcp_rcv_space_adjust")
int bypass_tcp_read(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	struct listener_key listener = {};
	struct pt_regs *regs;
	struct comm comm = {};
	struct list_head *queue;
	struct list_head *next = 0;
	struct reader *reader;
	__u64 user_data;
	long nr;
	__u8 one = 1;

	/* Every TCP read of the host comes here: the cheap tests first, the
	 * reader's lookup only for a splice or sendfile of a socket in a
	 * sockmap. */
	if (!in_a_sockmap(sk))
		return 0;
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	nr = SYSCALL_NR(regs);
	if (nr != NR_SPLICE && nr != NR_SENDFILE)
		return 0;
	reader = reader_of(sk);
	if (!reader || READ_ONCE(reader->spliced))
		return 0;
	bpf_get_current_comm(comm.name, sizeof(comm.name));
	if (bpf_map_lookup_elem(&splice_aware, &comm))
		return 0;
	if (!bpf_map_update_elem(&splicers, &comm, &one, BPF_NOEXIST))
		stat_add(&stats, BYPASS_STAT_SPLICERS_LEARNED, 1);
	/* No longer a known recv reader, by name or by port. */
	bpf_map_delete_elem(&recv_readers, &comm);
	if (reader->side == SIDE_PASSIVE) {
		listener_of(sk, &listener);
		bpf_map_delete_elem(&recv_listeners, &listener);
	}
	user_data = (__u64)sk->sk_user_data;
	queue = &((struct sk_psock *)(user_data & SK_USER_DATA_PTRMASK))->ingress_msg;
	bpf_probe_read_kernel(&next, sizeof(next), &queue->next);
	if (next != queue) {
		stat_add(&stats, BYPASS_STAT_SPLICE_TOO_LATE, 1);
		return 0;
	}
	WRITE_ONCE(reader->spliced, 1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
