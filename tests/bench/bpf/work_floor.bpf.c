// SPDX-License-Identifier: GPL-2.0
/*
 * The work floor of redirect's bench: on redirect's hooks, only the kernel
 * operations any design that carries the original destination from the
 * client's socket to the proxy's accepted socket must make, and nothing
 * else (no decision, no check, no share, no counter):
 *  1. connect4 creates the client socket's storage;
 *  2. sockops TCP_CONNECT_CB writes one record under (netns, 4-tuple);
 *  3. sockops PASSIVE_ESTABLISHED_CB on the proxy's socket finds it,
 *     creates that socket's storage from it and deletes it.
 * Attached beside redirect's programs, they keep maps of their own.
 */
#include "lib/common.h"
#include "redirect.h"

const volatile __u16 proxy_port = 0; /* network order */

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct client_record);
} floor_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct handover_key);
	__type(value, struct pending_record);
} floor_pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct endpoint);
} floor_answer SEC(".maps");

SEC("cgroup/connect4")
int work_floor_connect4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	if (sk)
		bpf_sk_storage_get(&floor_client, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	return SYS_PROCEED;
}

/* IPv4 only: the bench's connections are. */
static __always_inline void floor_key(struct bpf_sock_ops *skops, struct handover_key *key,
				      int is_client)
{
	__u16 remote_port = bpf_htons((__u16)bpf_ntohl(skops->remote_port));
	__u16 local_port = bpf_htons((__u16)skops->local_port);
	struct endpoint *proxy = is_client ? &key->tuple.local : &key->tuple.peer;
	struct endpoint *client = is_client ? &key->tuple.peer : &key->tuple.local;

	key->netns_cookie = bpf_get_netns_cookie(skops);
	endpoint_set_v4(proxy, skops->remote_ip4, remote_port);
	endpoint_set_v4(client, skops->local_ip4, local_port);
}

SEC("sockops")
int work_floor_sockops(struct bpf_sock_ops *skops)
{
	struct handover_key key = {};
	struct client_record *client;
	struct bpf_sock *sk = skops->sk;

	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB || !sk)
		return 1;
	client = bpf_sk_storage_get(&floor_client, sk, 0, 0);
	if (!client)
		return 1;
	struct pending_record record = {.original = client->original, .uid = client->uid};

	floor_key(skops, &key, 1);
	bpf_map_update_elem(&floor_pending, &key, &record, BPF_ANY);
	return 1;
}

SEC("sockops")
int work_floor_proxy_sockops(struct bpf_sock_ops *skops)
{
	struct handover_key key = {};
	struct pending_record *record;
	struct bpf_sock *sk = skops->sk;

	if (skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB ||
	    bpf_htons((__u16)skops->local_port) != proxy_port || !sk)
		return 1;
	floor_key(skops, &key, 0);
	record = bpf_map_lookup_elem(&floor_pending, &key);
	if (!record)
		return 1;
	bpf_sk_storage_get(&floor_answer, sk, &record->original, BPF_SK_STORAGE_GET_F_CREATE);
	bpf_map_delete_elem(&floor_pending, &key);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
