/* SPDX-License-Identifier: GPL-2.0 */
/* Where a waiting record's key starts its search in pending_slots (and the
 * bench's work floor, which writes the same slots). */
#ifndef PROXY_REDIRECT_BPF_SLOTS_H
#define PROXY_REDIRECT_BPF_SLOTS_H

#include "lib/common.h"
#include "redirect.h"

static __always_inline __u32 slot_hash(const struct handover_key *key)
{
	const __u64 *word = (const __u64 *)key;
	__u64 hash = 0;

	for (int i = 0; i < sizeof(*key) / sizeof(__u64); i++)
		hash = (hash ^ word[i]) * 0x9e3779b97f4a7c15ULL;
	return hash >> (64 - PENDING_SLOT_BITS);
}

static __always_inline int handover_key_equal(const struct handover_key *a,
					      const struct handover_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	__u64 differ = 0;

	for (int i = 0; i < sizeof(*a) / sizeof(__u64); i++)
		differ |= x[i] ^ y[i];
	return !differ;
}

#endif
