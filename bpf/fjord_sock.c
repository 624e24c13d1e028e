// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * fjord_sock.c — socket-level load balancing, attached to cgroups v2: the node's
 * host-network processes (no veth, so no tc program sees their traffic) and, when
 * the agent is given the pods' parent cgroup, pods (Cilium's socket LB with
 * bpf-lb-sock-hostns-only=false): a pod's connect() then goes straight to a backend
 * and no packet of the flow needs translating.
 *   cgroup/connect4     TCP/UDP connect() to a service VIP:port -> backend
 *   cgroup/sendmsg4     unconnected UDP sendto() to a service -> backend
 *   cgroup/recvmsg4     UDP source address shown as VIP:port again
 *   cgroup/getpeername4 getpeername() shows VIP:port again
 * connect() and sendto() take the Maglev slot of a hash of the socket cookie: in the
 * compact table the service entry holds with its backends when there are at most
 * FJ_SVC_INLINE (one map element touched), else in the frontend's table, as the tc path
 * does. sessionAffinity ClientIP keeps the node's processes (one
 * client: the node address) on one backend. A service without backends makes a
 * host process's connect() fail (EPERM).
 * A socket in a pod (netns cookie other than the node's) is left untranslated when
 * the tc program at its veth knows better: sessionAffinity (keyed by the pod's
 * address, which connect() does not know yet) and no backends (tc answers with a
 * TCP RST / ICMP port unreachable, so the pod sees "connection refused").
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "fjord.h"
#include "fjord_maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* returns 1 (allow) or 0 (reject: no backend) */
static __always_inline int fj_sock_xlate(struct bpf_sock_addr *ctx)
{
	__u32 proto = ctx->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	struct fj_svc_key sk = {};
	sk.vip = ctx->user_ip4;
	sk.port = (__be16)ctx->user_port;
	sk.proto = proto;
	struct fj_svc_value *svc = bpf_map_lookup_elem(&fjord_services, &sk);
	if (!svc)
		return 1; /* not a service: no cookie, no hash */
	/* the Maglev slot of the socket's hash in the entry's compact table (<= FJ_SVC_INLINE
	 * backends), copied right away (an update may reuse the element) */
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u32 hash = fj_flow_hash((__u32)cookie, (__u32)(cookie >> 32), 0, proto);
	struct fj_backend b = {};
	__u32 inline_bid = 0;
	if (!(svc->flags & FJ_SVC_F_AFFINITY))
		fj_pick_inline(svc, hash, &b, &inline_bid);
	__u32 service_id = svc->service_id, table_id = svc->table_id, flags = svc->flags;
	__u32 aff_timeout = svc->affinity_timeout_s, backend_count = svc->backend_count;
	__u32 zero = 0;
	struct fj_config *cfg = bpf_map_lookup_elem(&fjord_config, &zero);
	if (!cfg || cfg->maglev_size == 0)
		return 1;
	if (cfg->host_netns_cookie && bpf_get_netns_cookie(ctx) != cfg->host_netns_cookie &&
	    ((flags & FJ_SVC_F_AFFINITY) || backend_count == 0)) {
		fj_count(FJ_STAT_SOCK_TO_TC);
		return 1; /* a pod: its veth's tc program handles this flow */
	}
	if (backend_count == 0) {
		fj_count(FJ_STAT_NO_BACKEND);
		return 0;
	}
	/* the node's processes are one client for sessionAffinity: the node address is
	 * their source address toward the service */
	if ((flags & FJ_SVC_F_AFFINITY) || !b.ip) {
		/* more than FJ_SVC_INLINE backends, or affinity */
		__u32 bid = 0;
		struct fj_backend *be = fj_pick(cfg, service_id, table_id, flags, aff_timeout, cfg->node_ip, hash,
						bpf_ktime_get_ns(), &bid);
		b = be ? *be : (struct fj_backend){};
	}
	if (!b.ip) {
		fj_count(FJ_STAT_ERROR);
		return 1;
	}
	struct bpf_sock *s = ctx->sk;
	if (s) {
		struct fj_sock_revnat *rn = bpf_sk_storage_get(&fjord_sock_rn, s, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (rn) {
			rn->vip = sk.vip;
			rn->port = sk.port;
			rn->backend_ip = b.ip;
			rn->backend_port = b.port;
		}
	}
	ctx->user_ip4 = b.ip;
	ctx->user_port = (__u32)b.port;
	fj_count(FJ_STAT_SOCK_LB);
	return 1;
}

static __always_inline void fj_sock_restore(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *s = ctx->sk;
	if (!s)
		return;
	struct fj_sock_revnat *rn = bpf_sk_storage_get(&fjord_sock_rn, s, 0, 0);
	if (rn && ctx->user_ip4 == rn->backend_ip && (__be16)ctx->user_port == rn->backend_port) {
		ctx->user_ip4 = rn->vip;
		ctx->user_port = (__u32)rn->port;
	}
}

SEC("cgroup/connect4")
int fjord_sock_connect4(struct bpf_sock_addr *ctx)
{
	return fj_sock_xlate(ctx);
}

SEC("cgroup/sendmsg4")
int fjord_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return fj_sock_xlate(ctx);
}

SEC("cgroup/recvmsg4")
int fjord_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	fj_sock_restore(ctx);
	return 1;
}

SEC("cgroup/getpeername4")
int fjord_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	fj_sock_restore(ctx);
	return 1;
}
