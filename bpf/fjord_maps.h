/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * fjord_maps.h — BTF map definitions shared by every fjord eBPF object
 * (fjord_lb.c: tc programs, fjord_sock.c: socket LB). Every map is pinned by
 * name, so all objects loaded with the same pin dir share the same maps.
 * Key/value layouts are in fjord.h.
 */
#ifndef FJORD_MAPS_H
#define FJORD_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "fjord.h"

/* Sizes here are defaults; the loader overrides max_entries at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct fj_svc_key);
	__type(value, struct fj_svc_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct fj_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_backends SEC(".maps");

/* Inner Maglev table template: BPF_F_INNER_MAP lets every inner table have its
 * own max_entries (= ceil(Maglev size / FJ_MAGLEV_CHUNK) chunks). */
struct fj_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_INNER_MAP);
	/* sizes, not BTF types: clang emits only a forward declaration of a struct that is
	 * reached through this template alone, and the kernel wants both BTF ids or none */
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct fj_maglev_chunk));
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 4160);
	__type(key, __u32); /* table_id */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct fj_maglev_inner);
} fjord_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct fj_revnat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct fj_ct_key);
	__type(value, struct fj_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct fj_affinity_key);
	__type(value, struct fj_affinity_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fj_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FJ_STAT_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_stats SEC(".maps");

/* The service a socket-LB socket was connected to, in the socket's own storage: created
 * by connect4/sendmsg4, freed with the socket (no table to fill up, nothing to evict). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct fj_sock_revnat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_sock_rn SEC(".maps");

/* Addresses of this node's pods that were deleted (CNI DEL, zombie cleanup) and not yet
 * given to a new pod -> when (ns). A packet to one is answered with a TCP RST / ICMP port
 * unreachable instead of vanishing: a connection the socket LB made straight to a
 * backend that is now gone breaks at once. The oldest are evicted first. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __be32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_gone SEC(".maps");

/* ifindex of the host-side veth of each of this node's pods (written when fjord attaches to
 * it, removed when it detaches). eBPF host routing only hands a packet to a device in here:
 * bpf_redirect_peer into anything else (the underlay, a tunnel) would be wrong or a drop. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_pod_ifs SEC(".maps");

/* Ports (host order) some backend listens on: bit (port & 31) of word (port >> 5). A packet
 * from a pod can only be the reply of a service flow if its source port is a backend port,
 * so the per-packet reply-direction conntrack lookup is skipped for every other packet
 * (clients' ephemeral ports, servers that back no service). Set by the agent before a
 * service entry points at a new backend; cleared when no backend uses the port. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FJ_PORT_WORDS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fjord_backend_ports SEC(".maps");

static __always_inline int fj_is_backend_port(__be16 port)
{
	__u32 p = bpf_ntohs(port);
	__u32 w = p >> 5;
	__u32 *bits = bpf_map_lookup_elem(&fjord_backend_ports, &w);
	return bits && (*bits & (1u << (p & 31)));
}

static __always_inline void fj_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&fjord_stats, &idx);
	if (v)
		*v += 1;
}

/* Linux jhash (Bob Jenkins lookup3 final mix) over the 5-tuple: the same flow
 * hashes to the same Maglev slot on every node. */
#define fj_rol32(x, k) (((x) << (k)) | ((x) >> (32 - (k))))
static __always_inline __u32 fj_flow_hash(__u32 saddr, __u32 daddr, __u32 ports, __u32 proto)
{
	__u32 a = saddr + 0xdeadbeef + proto, b = daddr + 0xdeadbeef + proto,
	      c = ports + 0xdeadbeef + proto;
	c ^= b; c -= fj_rol32(b, 14);
	a ^= c; a -= fj_rol32(c, 11);
	b ^= a; b -= fj_rol32(a, 25);
	c ^= b; c -= fj_rol32(b, 16);
	a ^= c; a -= fj_rol32(c, 4);
	b ^= a; b -= fj_rol32(a, 14);
	c ^= b; c -= fj_rol32(b, 24);
	return c;
}

#define FJ_NS 1000000000ULL

/* The backend of slot `hash % FJ_SVC_SLOTS` of the compact Maglev table a service entry
 * holds when its frontend has at most FJ_SVC_INLINE backends: copied to *be with its id,
 * without touching another map. Returns 0 if the entry holds no table. (A preallocated
 * hash element can be reused by a concurrent update: the caller copies at once.) */
static __always_inline int fj_pick_inline(const struct fj_svc_value *svc, __u32 hash, struct fj_backend *be,
					  __u32 *bid_out)
{
	__u32 n = svc->inline_count;
	if (n == 0 || n > FJ_SVC_INLINE)
		return 0;
	__u32 s = hash % FJ_SVC_SLOTS;
	/* clang turns % into a multiply the verifier cannot bound: hide s, then check it */
	asm volatile("" : "+r"(s));
	if (s >= FJ_SVC_SLOTS)
		return 0;
	__u32 idx = svc->slot[s];
	if (idx >= n)
		return 0;
	/* clang drops the mask (it knows idx < 8); the verifier needs it */
	asm volatile("%0 &= %1" : "+r"(idx) : "i"(FJ_SVC_INLINE - 1));
	*be = svc->inline_be[idx];
	*bid_out = svc->inline_id[idx];
	return be->ip != 0;
}

/* Backend choice for a new flow of a service with more than FJ_SVC_INLINE backends or
 * sessionAffinity (else fj_pick_inline), shared by the tc programs and the socket-level
 * LB: sessionAffinity ClientIP first (an entry younger than the timeout whose backend
 * still exists), else Maglev slot `hash % M`; an affinity service remembers the choice
 * for `client_ip`. */
static __always_inline struct fj_backend *fj_pick(struct fj_config *cfg, __u32 service_id, __u32 table_id,
						  __u32 svc_flags, __u32 aff_timeout, __be32 client_ip, __u32 hash,
						  __u64 now, __u32 *bid_out)
{
	struct fj_affinity_key ak = {};
	ak.service_id = service_id;
	ak.client_ip = client_ip;
	if (svc_flags & FJ_SVC_F_AFFINITY) {
		struct fj_affinity_value *av = bpf_map_lookup_elem(&fjord_affinity, &ak);
		if (av && now >= av->last_ns && now - av->last_ns <= (__u64)aff_timeout * FJ_NS) {
			__u32 abid = av->backend_id;
			struct fj_backend *be = bpf_map_lookup_elem(&fjord_backends, &abid);
			if (be) {
				av->last_ns = now;
				*bid_out = abid;
				fj_count(FJ_STAT_AFFINITY);
				return be;
			}
		}
	}
	void *table = bpf_map_lookup_elem(&fjord_maglev, &table_id);
	if (!table)
		return 0;
	__u32 slot = hash % cfg->maglev_size;
	__u32 chunk = slot / FJ_MAGLEV_CHUNK;
	struct fj_maglev_chunk *chk = bpf_map_lookup_elem(table, &chunk);
	if (!chk)
		return 0;
	__u32 bid = chk->backend_id[slot & (FJ_MAGLEV_CHUNK - 1)];
	struct fj_backend *be = bpf_map_lookup_elem(&fjord_backends, &bid);
	if (!be)
		return 0;
	if (svc_flags & FJ_SVC_F_AFFINITY) {
		struct fj_affinity_value nv = {};
		nv.backend_id = bid;
		nv.last_ns = now;
		bpf_map_update_elem(&fjord_affinity, &ak, &nv, BPF_ANY);
	}
	*bid_out = bid;
	return be;
}

#endif /* FJORD_MAPS_H */
