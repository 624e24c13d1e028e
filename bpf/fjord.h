/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * fjord.h — the ONE definition of every eBPF map's key/value layout.
 *
 * Included by the eBPF programs (bpf/fjord_lb.c, clang -target bpf) and by a tiny
 * host program that crates/datapath/build.rs compiles to print sizeof/offsetof
 * of each struct, so the Rust #[repr(C)] mirrors are checked against this file.
 *
 * Byte order: fields typed __be* are in network byte order, everything else is
 * host order. All structs are padded explicitly (no implicit holes), so a key
 * built by Rust and one built by the eBPF program hash identically.
 *
 * Maps (defined in fjord_maps.h, all pinned by name under the loader's pin dir, e.g. /sys/fs/bpf/fjord/<node>/):
 *
 *   fjord_services  HASH        fj_svc_key    -> fj_svc_value   one entry per frontend (VIP, port, proto)
 *   fjord_backends  HASH        __u32 id      -> fj_backend     backend address by backend id
 *   fjord_maglev    HASH_OF_MAPS __u32 table_id -> inner ARRAY[ceil(maglev_size / FJ_MAGLEV_CHUNK)]
 *                               of fj_maglev_chunk: slot s is chunk s / FJ_MAGLEV_CHUNK,
 *                               backend_id[s % FJ_MAGLEV_CHUNK]. One table per frontend with
 *                               backends (fj_svc_value.table_id; 0 = no table). The loader fills a
 *                               table nobody reads (new, or a spare past its grace period) with
 *                               one BPF_MAP_UPDATE_BATCH and then points the service at it: packets
 *                               see the complete old or the complete new table.
 *   fjord_revnat    HASH        __u32 rev_nat_id -> fj_revnat   service address restored on replies
 *   fjord_ct        LRU_HASH    fj_ct_key     -> fj_ct_value    conntrack, both directions
 *   fjord_config    ARRAY[1]    __u32 0       -> fj_config      maglev_size etc., written by the loader
 *   fjord_stats     PERCPU_ARRAY __u32 FJ_STAT_* -> __u64       datapath counters
 *   fjord_affinity  LRU_HASH    fj_affinity_key -> fj_affinity_value  sessionAffinity ClientIP
 *   fjord_pod_ifs   HASH        __u32 ifindex -> __u32 (1)       host-side veths of this node's pods:
 *                               the devices eBPF host routing may deliver into (bpf_redirect_peer)
 *   fjord_sock_rn   SK_STORAGE  per socket -> fj_sock_revnat           socket-LB: the service a
 *                               socket was connected to (restored by getpeername/recvmsg)
 */
#ifndef FJORD_H
#define FJORD_H

#include <linux/types.h>

#define FJ_PROTO_TCP 6
#define FJ_PROTO_UDP 17

/* Service (frontend) lookup key. */
struct fj_svc_key {
	__be32 vip;   /* service IPv4 address */
	__be16 port;  /* service port */
	__u8 proto;   /* FJ_PROTO_TCP / FJ_PROTO_UDP */
	__u8 pad;     /* must be 0 */
};

struct fj_backend {
	__be32 ip;
	__be16 port;
	__u8 proto;
	__u8 flags; /* reserved, 0 (whether a backend is local is decided by the node's PodCIDR in fj_config) */
};

/* Backends kept in the service entry itself (fj_svc_value.inline_be) */
#define FJ_SVC_INLINE 8
/* Slots of the compact Maglev table in the service entry (prime; fj_svc_value.slot) */
#define FJ_SVC_SLOTS 509

struct fj_svc_value {
	__u32 service_id;    /* stable id of this frontend; also its rev_nat_id */
	__u32 table_id;      /* which maglev table in fjord_maglev */
	__u32 backend_count; /* 0 => no backend: TCP SYN gets a RST, UDP an ICMP port unreachable, rest dropped */
	__u32 flags;         /* FJ_SVC_F_* */
	__u32 affinity_timeout_s; /* sessionAffinity ClientIP: seconds a client sticks to its backend */
	__u32 inline_count;  /* backend_count if it is <= FJ_SVC_INLINE, else 0 */
	/* The frontend's active backends (the ones in its Maglev table), inline_count of them,
	 * the rest zero, with their backend ids, and a compact Maglev table over them (same
	 * keys, weights and seed; FJ_SVC_SLOTS slots -> index into inline_be). A new flow
	 * takes slot hash % FJ_SVC_SLOTS: choosing a backend for a random one of 10,000
	 * services touches this one map element instead of four (Maglev outer and inner map,
	 * backends) more, each a cache and TLB miss then. */
	struct fj_backend inline_be[FJ_SVC_INLINE];
	__u32 inline_id[FJ_SVC_INLINE];
	__u8 slot[FJ_SVC_SLOTS];
	__u8 pad[3];
};

#define FJ_SVC_F_AFFINITY 1 /* sessionAffinity: ClientIP (fjord_affinity) */
#define FJ_SVC_F_EXTERNAL 2 /* NodePort / externalIP / LoadBalancer frontend: also reachable from the
			     * node's underlay (fjord_from_net); remote backends get SNAT to the node */

struct fj_revnat {
	__be32 vip;
	__be16 port;
	__u16 pad;
};

#define FJ_CT_DIR_FWD 0      /* client -> service VIP (original direction, before DNAT) */
#define FJ_CT_DIR_REPLY 1    /* backend -> client or SNAT address (reply direction, before reverse NAT) */
#define FJ_CT_DIR_SNAT_FWD 2 /* masquerade: pod -> outside (before SNAT) */
#define FJ_CT_DIR_SNAT_REV 3 /* masquerade: outside -> node address:allocated port (before reverse SNAT) */

/* TCP state of a conntrack entry (fj_ct_value.state); 0 for UDP */
#define FJ_CT_SYN 1         /* SYN seen, no answer yet */
#define FJ_CT_ESTABLISHED 2 /* the backend answered */
#define FJ_CT_CLOSING 3     /* FIN or RST seen */

/* fj_ct_value.flags */
#define FJ_CT_F_SNAT 1    /* the source was rewritten too: FWD: to nat_ip:nat_port; REPLY: restore the
			   * destination to orig_ip:orig_port (NodePort to a remote backend, hairpin) */
#define FJ_CT_F_HAIRPIN 2 /* client and backend are the same pod (source rewritten to hairpin_ip) */
#define FJ_CT_F_NONAT 4   /* SNAT_FWD: a flow that came in from outside to a local pod: its replies
			   * leave unmasqueraded */

struct fj_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;   /* FJ_CT_DIR_* */
	__u16 pad;  /* must be 0 */
};

struct fj_ct_value {
	__u32 backend_id;   /* FWD: chosen backend; REPLY: same */
	__u32 rev_nat_id;   /* service_id of the frontend */
	__be32 backend_ip;  /* DNAT target (FWD) */
	__be16 backend_port;
	__u8 state;         /* FJ_CT_SYN / _ESTABLISHED / _CLOSING (TCP), 0 (UDP) */
	__u8 flags;         /* FJ_CT_F_* */
	__u64 last_seen_ns; /* bpf_ktime_get_ns() of the last packet */
	__be32 nat_ip;      /* FWD + FJ_CT_F_SNAT, SNAT_FWD: the new source address */
	__be16 nat_port;    /* ... and port */
	__be16 orig_port;   /* REPLY + FJ_CT_F_SNAT, SNAT_REV: the destination port to restore */
	__be32 orig_ip;     /* ... and address */
	__u32 pad;          /* must be 0 */
};

/* sessionAffinity ClientIP: the backend a client stuck to */
struct fj_affinity_key {
	__u32 service_id;
	__be32 client_ip;
};

struct fj_affinity_value {
	__u32 backend_id;
	__u32 pad;
	__u64 last_ns; /* bpf_ktime_get_ns() of the client's last new flow */
};

struct fj_sock_revnat {
	__be32 vip;
	__be32 backend_ip;
	__be16 port;
	__be16 backend_port;
	__u32 pad;
};

struct fj_config {
	__u32 maglev_size; /* M, prime; slot = flow_hash % M */
	__u32 max_tables;  /* number of tables in fjord_maglev */
	__u32 flags;       /* FJ_CFG_F_* */
	__u32 version;     /* layout version, FJ_LAYOUT_VERSION */
	__be32 node_ip;    /* the node's underlay address: NodePort SNAT and masquerade source */
	__be32 pod_net;    /* this node's PodCIDR (network, mask): backends inside are local */
	__be32 pod_mask;
	__be32 cluster_net; /* the cluster CIDR (network, mask): no masquerade inside it */
	__be32 cluster_mask;
	__be32 hairpin_ip; /* source of hairpinned flows (a pod reaching itself through a service) */
	__u16 snat_port_min; /* SNAT port range (host order), outside the kernel's ephemeral range */
	__u16 snat_port_max;
	__u32 tcp_syn_s;   /* conntrack timeouts, seconds */
	__u32 tcp_established_s;
	__u32 tcp_closing_s;
	__u32 udp_s;
	__u32 pad;
	/* netns cookie of the node's own namespace: the socket LB tells host-network
	 * processes (this cookie) from pods (any other) */
	__u64 host_netns_cookie;
};

#define FJ_CFG_F_MASQUERADE 1 /* SNAT pod traffic leaving the cluster CIDR through the underlay */
#define FJ_CFG_F_HOST_ROUTING 2 /* eBPF host routing: deliver pod-to-local-pod packets with bpf_redirect_peer */

#define FJ_LAYOUT_VERSION 7

/* fjord_backend_ports: 32-bit words of port bits (65,536 ports) */
#define FJ_PORT_WORDS 2048

/* A Maglev table is stored as chunks of FJ_MAGLEV_CHUNK slots (4 KiB values): one
 * batch update writes a whole table, and slots are 4 bytes each (an ARRAY of __u32
 * would pad every slot to 8). */
#define FJ_MAGLEV_CHUNK 1024

struct fj_maglev_chunk {
	__u32 backend_id[FJ_MAGLEV_CHUNK];
};

enum fj_stat {
	FJ_STAT_DNAT = 0,        /* packets DNATed to a backend */
	FJ_STAT_REVNAT = 1,      /* reply packets reverse-NATed */
	FJ_STAT_CT_NEW = 2,      /* new conntrack entries */
	FJ_STAT_CT_HIT = 3,      /* forward packets that hit conntrack */
	FJ_STAT_NO_BACKEND = 4,  /* packets to a service without backends (RST/ICMP/drop) */
	FJ_STAT_RST_SENT = 5,    /* TCP RSTs generated for services without backends */
	FJ_STAT_RESELECT = 6,    /* conntrack entry pointed at a deleted backend: reselected */
	FJ_STAT_ERROR = 7,       /* map/helper failures (packet dropped) */
	FJ_STAT_SOCK_LB = 8,     /* connect()/sendmsg() translated by the socket LB */
	FJ_STAT_ICMP_SENT = 9,   /* ICMP port unreachable generated for UDP to services without backends */
	FJ_STAT_CT_STALE = 10,   /* stale reply-direction entries removed (tuple reused by a direct flow) */
	FJ_STAT_NODEPORT = 11,   /* new flows from the underlay to NodePort/external frontends */
	FJ_STAT_SNAT = 12,       /* new SNAT port allocations (NodePort to remote backend, masquerade) */
	FJ_STAT_SNAT_FAIL = 13,  /* no free SNAT port after every retry (packet dropped) */
	FJ_STAT_HAIRPIN = 14,    /* new hairpin flows (a pod reaching itself through a service) */
	FJ_STAT_AFFINITY = 15,   /* new flows that followed sessionAffinity */
	FJ_STAT_CT_EXPIRED = 16, /* conntrack entries found expired by the datapath (flow restarted) */
	FJ_STAT_SOCK_TO_TC = 17, /* pod connect()/sendmsg() left to the veth's tc program (affinity, no backend) */
	FJ_STAT_GONE = 18,       /* packets to a deleted pod's address answered with TCP RST / ICMP unreachable */
	FJ_STAT_ICMP_ERR = 19,   /* ICMP errors about service flows translated back for the client */
	FJ_STAT_HOST_ROUTED = 20, /* packets delivered straight into a local pod's namespace (eBPF host routing) */
	FJ_STAT_MAX = 21,
};

/* fjord_stats has room for this many counters, so adding one changes no map layout */
#define FJ_STAT_SLOTS 32

#endif /* FJORD_H */
