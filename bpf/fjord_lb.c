// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * fjord_lb.c — fjord's eBPF kube-proxy replacement (IPv4, TCP+UDP).
 *
 * tc programs in the node netns:
 *   fjord_from_pod  (ingress of every pod's host-side veth: packets the pod sends)
 *       1. reply of a flow the pod serves as a backend -> reverse NAT (source back
 *          to the service address; hairpin and NodePort replies are sent on directly)
 *       2. conntrack hit -> same backend (unless it is gone or the entry expired)
 *       3. service lookup (hash, O(1)) -> sessionAffinity or Maglev slot (flow hash %
 *          509 in the entry's compact table for <= 8 backends, else % M in the frontend's
 *          table) -> backend -> conntrack entries (both directions) ->
 *          DNAT (IPv4 + L4 checksum fixups). A pod reaching itself (hairpin) gets
 *          its source rewritten to the hairpin address and the packet is sent back.
 *       A TCP SYN to a service without backends is answered with a TCP RST, a UDP
 *       datagram with ICMP port unreachable; other such packets are dropped.
 *       Whatever leaves fjord_from_pod for a pod of this node (translated or not) is
 *       handed straight to that pod's namespace (eBPF host routing, fj_local_deliver).
 *   fjord_to_pod    (egress of every pod's host-side veth: packets toward the pod)
 *       reply-direction conntrack lookup -> reverse NAT source back to the service.
 *   fjord_from_net  (ingress of the node's underlay device and its VXLAN device)
 *       replies of SNATed flows (NodePort to a remote backend, masquerade) ->
 *       reverse translation; new flows to NodePort/externalIP/LoadBalancer
 *       frontends -> backend; a remote backend gets the node's address as source
 *       (port from the SNAT range, collision retries) so replies come back here.
 *   fjord_to_net    (egress of the node's underlay device)
 *       masquerade: pod traffic to destinations outside the cluster CIDR leaves
 *       with the node's address (eBPF SNAT, port allocation with retries); ICMP
 *       echo requests too (the identifier is allocated like a port).
 * No loops over services or backends: every decision is a map lookup.
 * TCP state is tracked per entry (SYN, established, closing) with per-protocol
 * timeouts from fj_config; the agent's GC removes expired entries, the LRU map
 * evicts the oldest when full (new flows are never refused for lack of space).
 * ICMP errors (unreachable, time exceeded) about translated flows (service flows of
 * local pods incl. hairpin, NodePort flows, masqueraded flows and pings) are translated back for the
 * client, as conntrack does for "RELATED" packets.
 * Not handled (passed through unchanged): IPv6, IPv4 with options, fragments, ICMP
 * other than masqueraded echo and those errors.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "fjord.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "fjord_maps.h"

#define FJ_IP_OFF ETH_HLEN
#define FJ_IP_CSUM_OFF (FJ_IP_OFF + offsetof(struct iphdr, check))
#define FJ_IP_SADDR_OFF (FJ_IP_OFF + offsetof(struct iphdr, saddr))
#define FJ_IP_DADDR_OFF (FJ_IP_OFF + offsetof(struct iphdr, daddr))
#define FJ_L4_OFF (FJ_IP_OFF + sizeof(struct iphdr))
#define FJ_TCP_CSUM_OFF (FJ_L4_OFF + offsetof(struct tcphdr, check))
#define FJ_UDP_CSUM_OFF (FJ_L4_OFF + offsetof(struct udphdr, check))
#define FJ_SPORT_OFF FJ_L4_OFF
#define FJ_DPORT_OFF (FJ_L4_OFF + 2)
/* ICMP echo: the identifier plays the port (source side of a request, destination
 * side of a reply), so masquerade treats a ping like a UDP flow */
#define FJ_ICMP_CSUM_OFF (FJ_L4_OFF + 2)
#define FJ_ICMP_ID_OFF (FJ_L4_OFF + 4)
#define FJ_ICMP_ECHOREPLY 0
#define FJ_ICMP_ECHO 8

/* minimal ICMPv4 header (linux/icmp.h drags in libc headers) */
struct fj_icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 unused; /* echo: identifier, sequence */
};

struct fj_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* ICMP echo request: the identifier (dport 0) */
	__be16 dport; /* ICMP echo reply: the identifier (sport 0) */
	__u8 proto;
	__u8 tcp_flags; /* byte 13 of the TCP header, 0 for UDP; the type for ICMP */
};

/* Parse Ethernet/IPv4/TCP|UDP. Returns 0 and fills t if the packet is one we
 * handle, -1 otherwise (pass it on untouched). */
static __always_inline int fj_parse(struct __sk_buff *skb, struct fj_tuple *t)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 need = FJ_L4_OFF + sizeof(struct tcphdr);

	if (data + need > data_end) {
		/* make sure the headers are in the linear area (no-op when short UDP) */
		bpf_skb_pull_data(skb, skb->len < need ? skb->len : need);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return -1;
	if (ip->protocol == IPPROTO_ICMP) {
		struct fj_icmphdr *ic = (void *)(ip + 1);
		if ((void *)(ic + 1) > data_end || ic->code != 0)
			return -1;
		__be16 id = *(__be16 *)&ic->unused;
		if (ic->type == FJ_ICMP_ECHO) {
			t->sport = id;
			t->dport = 0;
		} else if (ic->type == FJ_ICMP_ECHOREPLY) {
			t->sport = 0;
			t->dport = id;
		} else {
			return -1;
		}
		t->saddr = ip->saddr;
		t->daddr = ip->daddr;
		t->proto = IPPROTO_ICMP;
		t->tcp_flags = ic->type;
		return 0;
	}
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return -1;
	__be16 *ports = (void *)(ip + 1);
	if ((void *)(ports + 2) > data_end)
		return -1;
	t->saddr = ip->saddr;
	t->daddr = ip->daddr;
	t->sport = ports[0];
	t->dport = ports[1];
	t->proto = ip->protocol;
	t->tcp_flags = 0;
	if (t->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return -1;
		t->tcp_flags = ((__u8 *)tcp)[13];
	} else {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return -1;
	}
	return 0;
}

/* Rewrite one address (at ip_off) and one port (at port_off) with checksum
 * fixups: IPv4 header checksum, L4 checksum incl. pseudo header. Works for
 * CHECKSUM_PARTIAL skbs (the helpers only touch the pseudo-header part then)
 * and for UDP without checksum (0 stays 0). */
static __always_inline int fj_rewrite(struct __sk_buff *skb, __u8 proto, __u32 ip_off, __be32 old_ip,
				      __be32 new_ip, __u32 port_off, __be16 old_port, __be16 new_port)
{
	if (proto == IPPROTO_ICMP) {
		/* no pseudo header in the ICMP checksum; the identifier is the "port" */
		if (old_ip != new_ip) {
			if (bpf_l3_csum_replace(skb, FJ_IP_CSUM_OFF, old_ip, new_ip, 4))
				return -1;
			if (bpf_skb_store_bytes(skb, ip_off, &new_ip, 4, 0))
				return -1;
		}
		if (old_port != new_port) {
			if (bpf_l4_csum_replace(skb, FJ_ICMP_CSUM_OFF, old_port, new_port, 2))
				return -1;
			if (bpf_skb_store_bytes(skb, FJ_ICMP_ID_OFF, &new_port, 2, 0))
				return -1;
		}
		return 0;
	}
	__u32 csum_off = proto == IPPROTO_TCP ? FJ_TCP_CSUM_OFF : FJ_UDP_CSUM_OFF;
	__u64 l4flags = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (old_ip != new_ip) {
		if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip, l4flags | BPF_F_PSEUDO_HDR | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, FJ_IP_CSUM_OFF, old_ip, new_ip, 4))
			return -1;
		if (bpf_skb_store_bytes(skb, ip_off, &new_ip, 4, 0))
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4flags | 2))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0))
			return -1;
	}
	return 0;
}

/* Answer a TCP SYN to a service without backends with RST|ACK, sent back out
 * of the interface it came in on (toward the pod). */
static __always_inline int fj_reply_rst(struct __sk_buff *skb)
{
	if (bpf_skb_change_tail(skb, FJ_L4_OFF + sizeof(struct tcphdr), 0))
		return TC_ACT_SHOT;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return TC_ACT_SHOT;

	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	__be32 a = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = a;
	ip->tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
	ip->ttl = 64;
	ip->id = 0;
	ip->check = 0;
	__u32 csum = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(struct iphdr), 0);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	ip->check = (__u16)~csum;

	__be16 p = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = p;
	/* RFC 793: a segment with ACK is reset with its ack number as our sequence number
	 * (what the peer expects next, so an established socket takes it); one without
	 * ACK (a SYN) with sequence 0 and an ACK of its sequence number + 1 */
	if (((__u8 *)tcp)[13] & 0x10) {
		tcp->seq = tcp->ack_seq;
		tcp->ack_seq = 0;
		((__u8 *)tcp)[13] = 0x04; /* RST */
	} else {
		__u32 seq = bpf_ntohl(tcp->seq);
		tcp->ack_seq = bpf_htonl(seq + 1);
		tcp->seq = 0;
		((__u8 *)tcp)[13] = 0x14; /* RST | ACK */
	}
	((__u8 *)tcp)[12] = (sizeof(struct tcphdr) / 4) << 4; /* data offset 5, no options */
	tcp->window = 0;
	tcp->urg_ptr = 0;
	tcp->check = 0;

	/* TCP checksum over pseudo header + header (no payload) */
	struct {
		__be32 saddr;
		__be32 daddr;
		__u8 zero;
		__u8 proto;
		__be16 len;
	} ph = { ip->saddr, ip->daddr, 0, IPPROTO_TCP, bpf_htons(sizeof(struct tcphdr)) };
	csum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	csum = bpf_csum_diff(0, 0, (__be32 *)tcp, sizeof(struct tcphdr), csum);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	tcp->check = (__u16)~csum;
	fj_count(FJ_STAT_RST_SENT);
	return bpf_redirect(skb->ifindex, 0);
}

#define FJ_ICMP_DEST_UNREACH 3
#define FJ_ICMP_PORT_UNREACH 3

static __always_inline __u16 fj_csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

/* Answer a UDP datagram to a service without backends (or to a deleted pod) with ICMP
 * port unreachable from the address it was sent to, carrying the original IP header +
 * 8 bytes. */
static __always_inline int fj_reply_icmp_unreach(struct __sk_buff *skb)
{
	const __u32 orig = sizeof(struct iphdr) + sizeof(struct udphdr); /* quoted bytes */
	const __u32 room = sizeof(struct iphdr) + sizeof(struct fj_icmphdr);
	if (bpf_skb_change_tail(skb, ETH_HLEN + orig, 0))
		return TC_ACT_SHOT;
	/* ROOM_MAC inserts right after the Ethernet header (ROOM_NET would insert
	 * after the IPv4 header): eth | new ip + icmp | original ip + udp header */
	if (bpf_skb_adjust_room(skb, room, BPF_ADJ_ROOM_MAC, 0))
		return TC_ACT_SHOT;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct fj_icmphdr *icmp = (void *)(ip + 1);
	struct iphdr *inner = (void *)(icmp + 1);
	if ((void *)inner + orig > data_end)
		return TC_ACT_SHOT;

	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(room + orig);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = 64;
	ip->protocol = IPPROTO_ICMP;
	ip->saddr = inner->daddr; /* the VIP */
	ip->daddr = inner->saddr; /* the pod */
	ip->check = 0;
	ip->check = fj_csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(struct iphdr), 0));

	icmp->type = FJ_ICMP_DEST_UNREACH;
	icmp->code = FJ_ICMP_PORT_UNREACH;
	icmp->checksum = 0;
	icmp->unused = 0;
	icmp->checksum = fj_csum_fold(bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(struct fj_icmphdr) + orig, 0));
	fj_count(FJ_STAT_ICMP_SENT);
	return bpf_redirect(skb->ifindex, 0);
}

#define FJ_TCP_FIN 0x01
#define FJ_TCP_SYN 0x02
#define FJ_TCP_RST 0x04
#define FJ_TCP_ACK 0x10
#define FJ_SNAT_TRIES 16

static __always_inline int fj_is_syn(struct fj_tuple *t)
{
	return t->proto == IPPROTO_TCP && (t->tcp_flags & (FJ_TCP_SYN | FJ_TCP_ACK)) == FJ_TCP_SYN;
}

static __always_inline struct fj_config *fj_cfg(void)
{
	__u32 zero = 0;
	struct fj_config *cfg = bpf_map_lookup_elem(&fjord_config, &zero);
	if (!cfg || cfg->maglev_size == 0)
		return 0;
	return cfg;
}

/* How long an entry in this state lives without packets. */
static __always_inline __u64 fj_timeout_ns(struct fj_config *cfg, __u8 proto, __u8 state)
{
	__u32 s;
	if (proto != IPPROTO_TCP)
		s = cfg->udp_s;
	else if (state == FJ_CT_ESTABLISHED)
		s = cfg->tcp_established_s;
	else if (state == FJ_CT_CLOSING)
		s = cfg->tcp_closing_s;
	else
		s = cfg->tcp_syn_s;
	return (__u64)s * FJ_NS;
}

static __always_inline int fj_expired(struct fj_config *cfg, struct fj_ct_value *ct, __u8 proto, __u64 now)
{
	return now > ct->last_seen_ns && now - ct->last_seen_ns > fj_timeout_ns(cfg, proto, ct->state);
}

/* Advance an entry's TCP state on a packet (reply: the packet goes backend -> client). */
static __always_inline void fj_ct_track(struct fj_ct_value *ct, struct fj_tuple *t, int reply, __u64 now)
{
	ct->last_seen_ns = now;
	if (t->proto != IPPROTO_TCP)
		return;
	if (t->tcp_flags & (FJ_TCP_FIN | FJ_TCP_RST))
		ct->state = FJ_CT_CLOSING;
	else if (!reply && fj_is_syn(t))
		ct->state = FJ_CT_SYN; /* the client starts over on the same tuple */
	else if (reply && ct->state == FJ_CT_SYN && (t->tcp_flags & FJ_TCP_ACK))
		ct->state = FJ_CT_ESTABLISHED;
}

static __always_inline void fj_ct_key_of(struct fj_ct_key *k, __be32 s, __be32 d, __be16 sp, __be16 dp, __u8 proto,
					 __u8 dir)
{
	k->saddr = s;
	k->daddr = d;
	k->sport = sp;
	k->dport = dp;
	k->proto = proto;
	k->dir = dir;
	k->pad = 0;
}

/* Send the packet back out of the interface it came in on (to the pod). */
static __always_inline int fj_bounce(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	return bpf_redirect(skb->ifindex, 0);
}

/* Route a translated packet ourselves (FIB lookup + redirect). Needed when its
 * source became one of the node's own addresses: the kernel's input path would
 * drop it as a martian. Destinations local to the node go up the stack. */
static __always_inline int fj_fib_redirect(struct __sk_buff *skb, __be32 saddr, __be32 daddr)
{
	struct bpf_fib_lookup p = {};
	p.family = 2; /* AF_INET */
	p.ipv4_src = saddr;
	p.ipv4_dst = daddr;
	p.ifindex = skb->ingress_ifindex;
	p.tot_len = skb->len - ETH_HLEN;
	long rc = bpf_fib_lookup(skb, &p, sizeof(p), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, p.dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, p.smac, ETH_ALEN, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(p.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(p.ifindex, 0, 0, 0);
	return TC_ACT_OK;
}

/* The reply of a service flow: restore the service address as source (and, for
 * SNATed flows, the client as destination). */
static __always_inline int fj_do_reply(struct __sk_buff *skb, struct fj_tuple *t, struct fj_ct_value *ct,
				       struct fj_config *cfg, __u64 now, int from_net)
{
	__u32 rid = ct->rev_nat_id;
	struct fj_revnat *rn = bpf_map_lookup_elem(&fjord_revnat, &rid);
	if (!rn)
		return TC_ACT_OK; /* service deleted: nothing to restore */
	__be32 vip = rn->vip;
	__be16 vport = rn->port;
	__u8 flags = ct->flags;
	__be32 ndst = t->daddr;
	__be16 ndport = t->dport;
	if (flags & FJ_CT_F_SNAT) {
		ndst = ct->orig_ip;
		ndport = ct->orig_port;
	}
	fj_ct_track(ct, t, 1, now);
	/* the forward entry carries the flow's state for GC and expiry */
	struct fj_ct_key fk;
	fj_ct_key_of(&fk, ndst, vip, ndport, vport, t->proto, FJ_CT_DIR_FWD);
	struct fj_ct_value *f = bpf_map_lookup_elem(&fjord_ct, &fk);
	if (f)
		fj_ct_track(f, t, 1, now);

	if (fj_rewrite(skb, t->proto, FJ_IP_SADDR_OFF, t->saddr, vip, FJ_SPORT_OFF, t->sport, vport))
		goto err;
	if ((flags & FJ_CT_F_SNAT) &&
	    fj_rewrite(skb, t->proto, FJ_IP_DADDR_OFF, t->daddr, ndst, FJ_DPORT_OFF, t->dport, ndport))
		goto err;
	fj_count(FJ_STAT_REVNAT);
	if (flags & FJ_CT_F_HAIRPIN)
		return fj_bounce(skb);
	if (from_net || vip == cfg->node_ip)
		return fj_fib_redirect(skb, vip, ndst);
	return TC_ACT_OK;
err:
	fj_count(FJ_STAT_ERROR);
	return TC_ACT_SHOT;
}

/* A conntrack hit in the forward direction: the flow keeps its backend if that
 * backend and the service still exist and the entry has not expired. Returns
 * -1 if the flow must be treated as new, else a tc action. */
static __always_inline int fj_do_fwd_hit(struct __sk_buff *skb, struct fj_tuple *t, struct fj_ct_value *ct,
					 struct fj_config *cfg, __u64 now, int from_net)
{
	__u32 bid = ct->backend_id;
	__u32 rid = ct->rev_nat_id;
	struct fj_backend *be = bpf_map_lookup_elem(&fjord_backends, &bid);
	/* the flow's service must still exist with this address (ids are reused) */
	struct fj_revnat *rn = bpf_map_lookup_elem(&fjord_revnat, &rid);
	if (!be || be->ip != ct->backend_ip || be->port != ct->backend_port || !rn || rn->vip != t->daddr ||
	    rn->port != t->dport) {
		/* the backend (or the service) of this flow is gone: look the service up again */
		fj_count(FJ_STAT_RESELECT);
		return -1;
	}
	if (fj_expired(cfg, ct, t->proto, now)) {
		fj_count(FJ_STAT_CT_EXPIRED);
		return -1;
	}
	__be32 bip = be->ip;
	__be16 bport = be->port;
	__u8 flags = ct->flags;
	__be32 nat_ip = ct->nat_ip;
	__be16 nat_port = ct->nat_port;
	fj_ct_track(ct, t, 0, now);
	fj_count(FJ_STAT_CT_HIT);
	if (fj_rewrite(skb, t->proto, FJ_IP_DADDR_OFF, t->daddr, bip, FJ_DPORT_OFF, t->dport, bport))
		goto err;
	if ((flags & FJ_CT_F_SNAT) &&
	    fj_rewrite(skb, t->proto, FJ_IP_SADDR_OFF, t->saddr, nat_ip, FJ_SPORT_OFF, t->sport, nat_port))
		goto err;
	fj_count(FJ_STAT_DNAT);
	if (flags & FJ_CT_F_HAIRPIN)
		return fj_bounce(skb);
	if (from_net && (flags & FJ_CT_F_SNAT))
		return fj_fib_redirect(skb, nat_ip, bip);
	return TC_ACT_OK;
err:
	fj_count(FJ_STAT_ERROR);
	return TC_ACT_SHOT;
}

/* The forward conntrack entry of the flow `ck` names (its dir is set here), if any:
 * a tc action, or -1 if the flow must be treated as new. */
static __always_inline int fj_established(struct __sk_buff *skb, struct fj_tuple *t, struct fj_ct_key *ck,
					  struct fj_config *cfg, __u64 now, int from_net)
{
	ck->dir = FJ_CT_DIR_FWD;
	struct fj_ct_value *ct = bpf_map_lookup_elem(&fjord_ct, ck);
	return ct ? fj_do_fwd_hit(skb, t, ct, cfg, now, from_net) : -1;
}

/* Reserve a free SNAT port: insert the reply-side entry `rk` (its dport is the
 * candidate port) with BPF_NOEXIST, trying FJ_SNAT_TRIES ports of the range
 * spread by the flow hash. Returns the port (network order) or 0. */
static __always_inline __be16 fj_snat_alloc(struct fj_config *cfg, struct fj_ct_key *rk, struct fj_ct_value *rv,
					    __u32 hash)
{
	__u32 lo = cfg->snat_port_min, hi = cfg->snat_port_max;
	if (lo == 0 || hi < lo)
		return 0;
	__u32 range = hi - lo + 1;
	for (int i = 0; i < FJ_SNAT_TRIES; i++) {
		__be16 port = bpf_htons((__u16)(lo + (hash + (__u32)i * 40503u) % range));
		rk->dport = port;
		if (bpf_map_update_elem(&fjord_ct, rk, rv, BPF_NOEXIST) == 0)
			return port;
	}
	fj_count(FJ_STAT_SNAT_FAIL);
	return 0;
}

/* A new flow to service `svc` (copied fields): choose a backend, write both
 * conntrack entries and translate. from_net: arrived on the underlay. */
static __always_inline int fj_new_flow(struct __sk_buff *skb, struct fj_tuple *t, struct fj_ct_key *ck,
				       struct fj_config *cfg, __u64 now, const struct fj_svc_value *svc, int from_net)
{
	__u32 service_id = svc->service_id, table_id = svc->table_id, backend_count = svc->backend_count;
	__u32 svc_flags = svc->flags, aff_timeout = svc->affinity_timeout_s;
	if (backend_count == 0) {
		fj_count(FJ_STAT_NO_BACKEND);
		if (fj_is_syn(t))
			return fj_reply_rst(skb);
		if (t->proto == IPPROTO_UDP)
			return fj_reply_icmp_unreach(skb);
		return TC_ACT_SHOT;
	}
	/* the client's sticky backend (sessionAffinity ClientIP) while it is fresh, else the
	 * Maglev slot of the flow hash: in the entry's compact table (<= FJ_SVC_INLINE
	 * backends) or the frontend's table */
	__u32 hash = fj_flow_hash(t->saddr, t->daddr, ((__u32)t->sport << 16) | t->dport, t->proto);
	__u32 bid = 0;
	struct fj_backend bv = {};
	if ((svc_flags & FJ_SVC_F_AFFINITY) || !fj_pick_inline(svc, hash, &bv, &bid)) {
		struct fj_backend *be = fj_pick(cfg, service_id, table_id, svc_flags, aff_timeout, t->saddr, hash, now, &bid);
		if (!be) {
			fj_count(FJ_STAT_ERROR);
			return TC_ACT_SHOT;
		}
		bv = *be;
	}
	__be32 bip = bv.ip;
	__be16 bport = bv.port;

	struct fj_ct_value cv = {};
	cv.backend_id = bid;
	cv.rev_nat_id = service_id;
	cv.backend_ip = bip;
	cv.backend_port = bport;
	cv.state = t->proto == IPPROTO_TCP ? FJ_CT_SYN : 0;
	cv.last_seen_ns = now;
	struct fj_ct_key rk;
	fj_ct_key_of(&rk, bip, t->saddr, bport, t->sport, t->proto, FJ_CT_DIR_REPLY);

	int local = (bip & cfg->pod_mask) == cfg->pod_net;
	int hairpin = !from_net && bip == t->saddr;
	int snat = from_net && !local;
	__be32 nat_ip = 0;
	__be16 nat_port = 0;
	if (hairpin || snat) {
		cv.flags = FJ_CT_F_SNAT | (hairpin ? FJ_CT_F_HAIRPIN : 0);
		cv.orig_ip = t->saddr;
		cv.orig_port = t->sport;
	}
	/* reply entry first: once the forward entry exists, replies must find theirs */
	if (hairpin) {
		nat_ip = cfg->hairpin_ip;
		nat_port = t->sport;
		rk.daddr = nat_ip;
		if (bpf_map_update_elem(&fjord_ct, &rk, &cv, BPF_ANY))
			goto err;
		fj_count(FJ_STAT_HAIRPIN);
	} else if (snat) {
		nat_ip = cfg->node_ip;
		rk.daddr = nat_ip;
		nat_port = fj_snat_alloc(cfg, &rk, &cv,
					 fj_flow_hash(t->saddr, t->daddr, ((__u32)t->sport << 16) | t->dport, 0x5a));
		if (!nat_port)
			return TC_ACT_SHOT;
		fj_count(FJ_STAT_SNAT);
	} else if (bpf_map_update_elem(&fjord_ct, &rk, &cv, BPF_ANY)) {
		goto err;
	}
	cv.nat_ip = nat_ip;
	cv.nat_port = nat_port;
	cv.orig_ip = 0;
	cv.orig_port = 0;
	if (bpf_map_update_elem(&fjord_ct, ck, &cv, BPF_ANY))
		goto err;
	fj_count(FJ_STAT_CT_NEW);
	if (from_net)
		fj_count(FJ_STAT_NODEPORT);

	if (fj_rewrite(skb, t->proto, FJ_IP_DADDR_OFF, t->daddr, bip, FJ_DPORT_OFF, t->dport, bport))
		goto err;
	if ((hairpin || snat) &&
	    fj_rewrite(skb, t->proto, FJ_IP_SADDR_OFF, t->saddr, nat_ip, FJ_SPORT_OFF, t->sport, nat_port))
		goto err;
	fj_count(FJ_STAT_DNAT);
	if (hairpin)
		return fj_bounce(skb);
	if (snat)
		return fj_fib_redirect(skb, nat_ip, bip);
	return TC_ACT_OK;
err:
	fj_count(FJ_STAT_ERROR);
	return TC_ACT_SHOT;
}

/* ICMP errors (destination unreachable, time exceeded) quote the head of the packet they
 * are about: IP header + 8 bytes (the ports). When that packet was translated by fjord, the
 * quote shows the translated addresses, which the sender's socket does not know; the error
 * must be translated back the way a reply would be, or the socket never learns of a refused
 * port or a smaller path MTU (conntrack does this for iptables NAT: "RELATED" packets). The
 * quoted L4 checksum is left as it was (receivers do not check it). */
#define FJ_ICMP_TIME_EXCEEDED 11
#define FJ_IN_IP_OFF (FJ_L4_OFF + sizeof(struct fj_icmphdr))
#define FJ_IN_CSUM_OFF (FJ_IN_IP_OFF + offsetof(struct iphdr, check))
#define FJ_IN_SADDR_OFF (FJ_IN_IP_OFF + offsetof(struct iphdr, saddr))
#define FJ_IN_DADDR_OFF (FJ_IN_IP_OFF + offsetof(struct iphdr, daddr))
#define FJ_IN_SPORT_OFF (FJ_IN_IP_OFF + sizeof(struct iphdr))
#define FJ_IN_DPORT_OFF (FJ_IN_SPORT_OFF + 2)

struct fj_icmp_err {
	__be32 saddr, daddr; /* outer */
	__be32 in_saddr, in_daddr; /* quoted */
	__be16 in_sport, in_dport;
	__u8 in_proto;
	__u16 in_check;
	__u32 in_sport_off; /* where in_sport is: the quoted source port, or a quoted echo's identifier */
};

/* 0 and e filled if the packet is an ICMP error quoting a TCP/UDP packet or an ICMP echo
 * request (its identifier plays the source port, as in masquerade), else -1. */
static __always_inline int fj_parse_icmp_err(struct __sk_buff *skb, struct fj_icmp_err *e)
{
	__u32 need = FJ_IN_SPORT_OFF + 8; /* errors quote at least 8 bytes past the IP header */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + need > data_end) {
		if (skb->len < need)
			return -1;
		bpf_skb_pull_data(skb, need);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	if (data + need > data_end)
		return -1;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct fj_icmphdr *ic = (void *)(ip + 1);
	struct iphdr *in = (void *)(ic + 1);
	__be16 *ports = (void *)(in + 1);
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_ICMP ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return -1;
	if (ic->type != FJ_ICMP_DEST_UNREACH && ic->type != FJ_ICMP_TIME_EXCEEDED)
		return -1;
	if (in->ihl != 5)
		return -1;
	if (in->protocol == IPPROTO_ICMP) {
		struct fj_icmphdr *echo = (void *)(in + 1);
		if (echo->type != FJ_ICMP_ECHO)
			return -1;
		e->in_sport = *(__be16 *)&echo->unused;
		e->in_dport = 0;
		e->in_sport_off = FJ_IN_SPORT_OFF + 4;
	} else if (in->protocol == IPPROTO_TCP || in->protocol == IPPROTO_UDP) {
		e->in_sport = ports[0];
		e->in_dport = ports[1];
		e->in_sport_off = FJ_IN_SPORT_OFF;
	} else {
		return -1;
	}
	e->saddr = ip->saddr;
	e->daddr = ip->daddr;
	e->in_saddr = in->saddr;
	e->in_daddr = in->daddr;
	e->in_proto = in->protocol;
	e->in_check = in->check;
	return 0;
}

/* Rewrite an ICMP error: outer source/destination (IP checksum; ICMP has no pseudo header)
 * and the quoted addresses and ports (the quoted IP checksum, and the ICMP checksum over
 * all of them). Only what changes is written. */
static __always_inline int fj_icmp_err_rewrite(struct __sk_buff *skb, struct fj_icmp_err *e, __be32 osrc,
					       __be32 odst, __be32 isrc, __be16 isport, __be32 idst, __be16 idport)
{
	if (osrc != e->saddr && (bpf_l3_csum_replace(skb, FJ_IP_CSUM_OFF, e->saddr, osrc, 4) ||
				 bpf_skb_store_bytes(skb, FJ_IP_SADDR_OFF, &osrc, 4, 0)))
		return -1;
	if (odst != e->daddr && (bpf_l3_csum_replace(skb, FJ_IP_CSUM_OFF, e->daddr, odst, 4) ||
				 bpf_skb_store_bytes(skb, FJ_IP_DADDR_OFF, &odst, 4, 0)))
		return -1;
	if (isrc != e->in_saddr && (bpf_l3_csum_replace(skb, FJ_IN_CSUM_OFF, e->in_saddr, isrc, 4) ||
				    bpf_l4_csum_replace(skb, FJ_ICMP_CSUM_OFF, e->in_saddr, isrc, 4) ||
				    bpf_skb_store_bytes(skb, FJ_IN_SADDR_OFF, &isrc, 4, 0)))
		return -1;
	if (idst != e->in_daddr && (bpf_l3_csum_replace(skb, FJ_IN_CSUM_OFF, e->in_daddr, idst, 4) ||
				    bpf_l4_csum_replace(skb, FJ_ICMP_CSUM_OFF, e->in_daddr, idst, 4) ||
				    bpf_skb_store_bytes(skb, FJ_IN_DADDR_OFF, &idst, 4, 0)))
		return -1;
	if (isrc != e->in_saddr || idst != e->in_daddr) {
		/* the quoted header checksum changed too, and the ICMP checksum covers it */
		__u16 new_check;
		if (bpf_skb_load_bytes(skb, FJ_IN_CSUM_OFF, &new_check, 2) ||
		    bpf_l4_csum_replace(skb, FJ_ICMP_CSUM_OFF, e->in_check, new_check, 2))
			return -1;
	}
	if (isport != e->in_sport && (bpf_l4_csum_replace(skb, FJ_ICMP_CSUM_OFF, e->in_sport, isport, 2) ||
				      bpf_skb_store_bytes(skb, e->in_sport_off, &isport, 2, 0)))
		return -1;
	if (idport != e->in_dport && (bpf_l4_csum_replace(skb, FJ_ICMP_CSUM_OFF, e->in_dport, idport, 2) ||
				      bpf_skb_store_bytes(skb, FJ_IN_DPORT_OFF, &idport, 2, 0)))
		return -1;
	return 0;
}

/* An error about a service flow: the quote shows client (or SNAT or hairpin address) ->
 * backend, the reply-direction conntrack entry of that tuple names the service. Restore what
 * the client sent (client -> service address) and address the error to the client; when the
 * backend itself sent it, it comes from the service address. A hairpin flow's error goes back
 * into the pod that sent it (it is the client too). from_net: arrived on the underlay,
 * where only SNATed (NodePort) flows are translated (errors for a local pod client are
 * translated by fjord_to_pod, like its replies). -1: not a service flow's error. */
static __always_inline int fj_icmp_error_svc(struct __sk_buff *skb, struct fj_config *cfg, struct fj_icmp_err *e,
					     int from_net)
{
	if (!fj_is_backend_port(e->in_dport))
		return -1;
	struct fj_ct_key k;
	fj_ct_key_of(&k, e->in_daddr, e->in_saddr, e->in_dport, e->in_sport, e->in_proto, FJ_CT_DIR_REPLY);
	struct fj_ct_value *ct = bpf_map_lookup_elem(&fjord_ct, &k);
	if (!ct)
		return -1;
	__u8 flags = ct->flags;
	if (from_net && !(flags & FJ_CT_F_SNAT))
		return TC_ACT_OK;
	__u32 rid = ct->rev_nat_id;
	__be32 client = e->in_saddr, odst = e->daddr;
	__be16 cport = e->in_sport;
	if (flags & FJ_CT_F_SNAT) {
		client = ct->orig_ip;
		cport = ct->orig_port;
		odst = client;
	}
	struct fj_revnat *rn = bpf_map_lookup_elem(&fjord_revnat, &rid);
	if (!rn)
		return TC_ACT_OK; /* service deleted: nothing to restore */
	__be32 vip = rn->vip;
	__be16 vport = rn->port;
	__be32 osrc = e->saddr == e->in_daddr ? vip : e->saddr;
	if (fj_icmp_err_rewrite(skb, e, osrc, odst, client, cport, vip, vport)) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	fj_count(FJ_STAT_ICMP_ERR);
	if (flags & FJ_CT_F_HAIRPIN)
		return fj_bounce(skb); /* the client is the pod that sent the error */
	if (from_net || osrc == cfg->node_ip)
		return fj_fib_redirect(skb, osrc, odst);
	return TC_ACT_OK;
}

/* An error from outside about a masqueraded pod flow (TCP, UDP, ping): it quotes the packet
 * as it left (node address, SNAT port or echo identifier). Translate the outer destination and
 * the quoted source back to the pod's. */
static __always_inline int fj_icmp_error_masq(struct __sk_buff *skb, struct fj_config *cfg, struct fj_icmp_err *e)
{
	if (!(cfg->flags & FJ_CFG_F_MASQUERADE) || cfg->node_ip == 0 || e->daddr != cfg->node_ip ||
	    e->in_saddr != cfg->node_ip)
		return TC_ACT_OK;
	struct fj_ct_key k;
	fj_ct_key_of(&k, e->in_daddr, e->in_saddr, e->in_dport, e->in_sport, e->in_proto, FJ_CT_DIR_SNAT_REV);
	struct fj_ct_value *ct = bpf_map_lookup_elem(&fjord_ct, &k);
	if (!ct)
		return TC_ACT_OK;
	__be32 pod = ct->orig_ip;
	__be16 pod_port = ct->orig_port;
	if (fj_icmp_err_rewrite(skb, e, e->saddr, pod, pod, pod_port, e->in_daddr, e->in_dport)) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	fj_count(FJ_STAT_REVNAT);
	return TC_ACT_OK;
}

/* A packet fj_parse passed over: an ICMP error about a service flow or (from_net) a
 * masqueraded flow is translated, anything else goes on untouched. */
static __always_inline int fj_icmp_error(struct __sk_buff *skb, int from_net)
{
	struct fj_icmp_err e;
	if (fj_parse_icmp_err(skb, &e))
		return TC_ACT_OK;
	struct fj_config *cfg = fj_cfg();
	if (!cfg)
		return TC_ACT_OK;
	int rc = fj_icmp_error_svc(skb, cfg, &e, from_net);
	if (rc >= 0)
		return rc;
	return from_net ? fj_icmp_error_masq(skb, cfg, &e) : TC_ACT_OK;
}

/* A packet to an address of this node's PodCIDR whose pod was deleted: answer it (TCP RST,
 * ICMP port unreachable for UDP) so the sender's socket fails now, instead of the packet
 * leaving by the node's default route or vanishing. -1: not such a packet. */
static __always_inline int fj_to_gone_pod(struct __sk_buff *skb, struct fj_tuple *t, struct fj_config *cfg)
{
	if (!cfg->pod_mask || (t->daddr & cfg->pod_mask) != cfg->pod_net)
		return -1;
	if (!bpf_map_lookup_elem(&fjord_gone, &t->daddr))
		return -1;
	fj_count(FJ_STAT_GONE);
	if (t->proto == IPPROTO_UDP)
		return fj_reply_icmp_unreach(skb);
	if (t->tcp_flags & FJ_TCP_RST)
		return TC_ACT_SHOT; /* never answer a reset */
	return fj_reply_rst(skb);
}

/* eBPF host routing (FJ_CFG_F_HOST_ROUTING; Cilium's "Host Routing: BPF"): a packet from a
 * pod to a pod of this node goes from the sender's veth straight into the receiver's
 * namespace with bpf_redirect_peer, instead of up the node's IP stack (routing, forwarding)
 * and through a second backlog queue at the receiver's veth. The FIB lookup the kernel
 * would do finds the device and the MACs; only this node's pod veths (fjord_pod_ifs) are
 * targets. Falls back to the kernel's path (TC_ACT_OK) when the neighbour is not resolved
 * yet, the packet is too big for the device, the TTL would expire, or the device is not a
 * pod's. The TTL is decremented as the kernel's forwarding would. The receiver's fjord_to_pod
 * does not run then: it has nothing to do for packets from local pods. */
static __always_inline int fj_local_deliver(struct __sk_buff *skb, struct fj_config *cfg)
{
	if (!(cfg->flags & FJ_CFG_F_HOST_ROUTING))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	__be32 daddr = ip->daddr;
	if (!cfg->pod_mask || (daddr & cfg->pod_mask) != cfg->pod_net || ip->ttl <= 1)
		return TC_ACT_OK;
	struct bpf_fib_lookup p = {};
	p.family = 2; /* AF_INET */
	p.ipv4_src = ip->saddr;
	p.ipv4_dst = daddr;
	p.ifindex = skb->ingress_ifindex;
	/* tot_len 0: the helper checks the skb against the device's MTU (GSO-aware) */
	if (bpf_fib_lookup(skb, &p, sizeof(p), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK;
	__u32 oif = p.ifindex;
	if (!bpf_map_lookup_elem(&fjord_pod_ifs, &oif))
		return TC_ACT_OK;
	/* (bpf_fib_lookup leaves the packet as it is: eth and ip stay valid) */
	__builtin_memcpy(eth->h_dest, p.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, p.smac, ETH_ALEN);
	/* the kernel's ip_decrease_ttl: TTL is the high byte of its 16-bit word */
	__u32 c = ip->check;
	c += bpf_htons(0x0100);
	ip->check = (__sum16)(c + (c >= 0xFFFF));
	ip->ttl--;
	fj_count(FJ_STAT_HOST_ROUTED);
	return bpf_redirect_peer(oif, 0);
}

SEC("classifier")
int fjord_from_pod(struct __sk_buff *skb)
{
	struct fj_tuple t = {};
	if (fj_parse(skb, &t))
		return fj_icmp_error(skb, 0);
	if (t.proto == IPPROTO_ICMP) /* echo: only masquerade (fjord_to_net) */
		return TC_ACT_OK;
	struct fj_config *cfg = fj_cfg();
	if (!cfg)
		return TC_ACT_OK;
	__u64 now = bpf_ktime_get_ns();

	/* 1. the pod answers as the backend of a service flow (only a backend port can) */
	struct fj_ct_key ck;
	fj_ct_key_of(&ck, t.saddr, t.daddr, t.sport, t.dport, t.proto, FJ_CT_DIR_REPLY);
	if (fj_is_backend_port(t.sport)) {
		struct fj_ct_value *ct = bpf_map_lookup_elem(&fjord_ct, &ck);
		if (ct) {
			int r = fj_do_reply(skb, &t, ct, cfg, now, 0);
			return r == TC_ACT_OK ? fj_local_deliver(skb, cfg) : r;
		}
	}

	/* 2. to a service address? (the small services map before the big conntrack map:
	 * most pod traffic goes to pods and needs no second conntrack lookup; a pod address
	 * is never a frontend, so traffic to the cluster CIDR needs no lookup at all) */
	struct fj_svc_key sk = {};
	sk.vip = t.daddr;
	sk.port = t.dport;
	sk.proto = t.proto;
	struct fj_svc_value *svc = 0;
	if (!cfg->cluster_mask || (t.daddr & cfg->cluster_mask) != cfg->cluster_net)
		svc = bpf_map_lookup_elem(&fjord_services, &sk);
	if (!svc) {
		/* Not a service address. If this starts a flow (TCP SYN, any UDP) whose
		 * replies would match the reply-direction conntrack entry of an old
		 * service flow with the same tuple (client port reused for a direct
		 * connection to the backend), drop that stale entry so the replies
		 * are not reverse-NATed to the VIP. */
		if ((t.proto == IPPROTO_UDP || fj_is_syn(&t)) && fj_is_backend_port(t.dport)) {
			/* (only a flow to a backend port can have such an entry) */
			struct fj_ct_key stale;
			fj_ct_key_of(&stale, t.daddr, t.saddr, t.dport, t.sport, t.proto, FJ_CT_DIR_REPLY);
			if (bpf_map_lookup_elem(&fjord_ct, &stale)) {
				bpf_map_delete_elem(&fjord_ct, &stale);
				fj_count(FJ_STAT_CT_STALE);
			}
		}
		/* a deleted pod of this node (e.g. a backend the socket LB connected to) */
		int g = fj_to_gone_pod(skb, &t, cfg);
		return g >= 0 ? g : fj_local_deliver(skb, cfg);
	}

	/* 3. an established service flow (a flow whose service is gone passed above, as
	 * it would after a reselection found no service) */
	int rc = fj_established(skb, &t, &ck, cfg, now, 0);
	if (rc < 0)
		/* 4. a new flow */
		rc = fj_new_flow(skb, &t, &ck, cfg, now, svc, 0);
	return rc == TC_ACT_OK ? fj_local_deliver(skb, cfg) : rc;
}

SEC("classifier")
int fjord_to_pod(struct __sk_buff *skb)
{
	struct fj_tuple t = {};
	if (fj_parse(skb, &t))
		return fj_icmp_error(skb, 0);
	if (t.proto == IPPROTO_ICMP)
		return TC_ACT_OK;
	struct fj_config *cfg = fj_cfg();
	if (!cfg)
		return TC_ACT_OK;
	/* From a pod of this node: fjord_from_pod saw it on the way in and looked up this
	 * very key (it is unchanged unless from_pod translated it, and then it is no reply
	 * to restore). Only packets from elsewhere (the underlay, a tunnel) need the lookup. */
	if (cfg->pod_mask && (t.saddr & cfg->pod_mask) == cfg->pod_net)
		return TC_ACT_OK;
	if (!fj_is_backend_port(t.sport))
		return TC_ACT_OK; /* not from a backend: no service reply to restore */
	struct fj_ct_key rk;
	fj_ct_key_of(&rk, t.saddr, t.daddr, t.sport, t.dport, t.proto, FJ_CT_DIR_REPLY);
	struct fj_ct_value *ct = bpf_map_lookup_elem(&fjord_ct, &rk);
	if (!ct || (ct->flags & FJ_CT_F_SNAT))
		return TC_ACT_OK;
	return fj_do_reply(skb, &t, ct, cfg, bpf_ktime_get_ns(), 0);
}

SEC("classifier")
int fjord_from_net(struct __sk_buff *skb)
{
	struct fj_tuple t = {};
	if (fj_parse(skb, &t))
		return fj_icmp_error(skb, 1);
	struct fj_config *cfg = fj_cfg();
	if (!cfg)
		return TC_ACT_OK;
	__u64 now = bpf_ktime_get_ns();

	/* 1. a remote backend answers a NodePort flow we SNATed */
	struct fj_ct_key ck;
	fj_ct_key_of(&ck, t.saddr, t.daddr, t.sport, t.dport, t.proto, FJ_CT_DIR_REPLY);
	struct fj_ct_value *ct = t.proto == IPPROTO_ICMP ? 0 : bpf_map_lookup_elem(&fjord_ct, &ck);
	if (ct) {
		if (ct->flags & FJ_CT_F_SNAT)
			return fj_do_reply(skb, &t, ct, cfg, now, 1);
		return TC_ACT_OK; /* reply to a local pod client: fjord_to_pod translates it */
	}
	/* 2. the outside answers a masqueraded pod flow */
	ck.dir = FJ_CT_DIR_SNAT_REV;
	ct = bpf_map_lookup_elem(&fjord_ct, &ck);
	if (ct) {
		__be32 oip = ct->orig_ip;
		__be16 oport = ct->orig_port;
		fj_ct_track(ct, &t, 1, now);
		if (fj_rewrite(skb, t.proto, FJ_IP_DADDR_OFF, t.daddr, oip, FJ_DPORT_OFF, t.dport, oport)) {
			fj_count(FJ_STAT_ERROR);
			return TC_ACT_SHOT;
		}
		fj_count(FJ_STAT_REVNAT);
		return TC_ACT_OK;
	}
	if (t.proto == IPPROTO_ICMP) /* echo replies to masqueraded pings only */
		return TC_ACT_OK;
	/* 3. an established NodePort flow */
	int rc = fj_established(skb, &t, &ck, cfg, now, 1);
	if (rc >= 0)
		return rc;
	/* 4. a new flow to a NodePort / externalIP / LoadBalancer frontend */
	struct fj_svc_key sk = {};
	sk.vip = t.daddr;
	sk.port = t.dport;
	sk.proto = t.proto;
	struct fj_svc_value *svc = bpf_map_lookup_elem(&fjord_services, &sk);
	if (!svc || !(svc->flags & FJ_SVC_F_EXTERNAL)) {
		/* 5. a client on another node still sending to a pod of ours that was deleted */
		int g = fj_to_gone_pod(skb, &t, cfg);
		if (g >= 0)
			return g;
		/* 6. a flow from outside the cluster straight to a local pod (e.g. NodePort
		 * traffic another node SNATed to us): remember it, so the pod's replies are
		 * not masqueraded on their way out */
		if ((cfg->flags & FJ_CFG_F_MASQUERADE) && (t.daddr & cfg->pod_mask) == cfg->pod_net &&
		    (t.saddr & cfg->cluster_mask) != cfg->cluster_net && (t.proto == IPPROTO_UDP || fj_is_syn(&t))) {
			struct fj_ct_key nk;
			fj_ct_key_of(&nk, t.daddr, t.saddr, t.dport, t.sport, t.proto, FJ_CT_DIR_SNAT_FWD);
			struct fj_ct_value *nv = bpf_map_lookup_elem(&fjord_ct, &nk);
			if (nv) {
				if (nv->flags & FJ_CT_F_NONAT)
					fj_ct_track(nv, &t, 0, now);
			} else {
				struct fj_ct_value v = {};
				v.flags = FJ_CT_F_NONAT;
				v.state = t.proto == IPPROTO_TCP ? FJ_CT_SYN : 0;
				v.last_seen_ns = now;
				bpf_map_update_elem(&fjord_ct, &nk, &v, BPF_ANY);
			}
		}
		return TC_ACT_OK;
	}
	return fj_new_flow(skb, &t, &ck, cfg, now, svc, 1);
}

SEC("classifier")
int fjord_to_net(struct __sk_buff *skb)
{
	struct fj_tuple t = {};
	if (fj_parse(skb, &t))
		return TC_ACT_OK;
	struct fj_config *cfg = fj_cfg();
	if (!cfg || !(cfg->flags & FJ_CFG_F_MASQUERADE) || cfg->node_ip == 0)
		return TC_ACT_OK;
	if ((t.saddr & cfg->cluster_mask) != cfg->cluster_net || (t.daddr & cfg->cluster_mask) == cfg->cluster_net)
		return TC_ACT_OK;
	if (t.proto == IPPROTO_ICMP && t.tcp_flags != FJ_ICMP_ECHO)
		return TC_ACT_OK; /* ICMP: pings (echo requests) are masqueraded, like a UDP flow */
	__u64 now = bpf_ktime_get_ns();
	struct fj_ct_key fk;
	fj_ct_key_of(&fk, t.saddr, t.daddr, t.sport, t.dport, t.proto, FJ_CT_DIR_SNAT_FWD);
	struct fj_ct_value *ct = bpf_map_lookup_elem(&fjord_ct, &fk);
	__be32 nat_ip;
	__be16 nat_port;
	if (ct && (ct->flags & FJ_CT_F_NONAT)) {
		/* the reply of a flow that came in from outside */
		fj_ct_track(ct, &t, 1, now);
		return TC_ACT_OK;
	}
	if (ct && !fj_expired(cfg, ct, t.proto, now)) {
		fj_ct_track(ct, &t, 0, now);
		nat_ip = ct->nat_ip;
		nat_port = ct->nat_port;
	} else if (t.proto == IPPROTO_TCP && !fj_is_syn(&t)) {
		/* mid-stream without an entry: a reply, or a flow older than the datapath */
		return TC_ACT_OK;
	} else {
		struct fj_ct_value cv = {};
		cv.state = t.proto == IPPROTO_TCP ? FJ_CT_SYN : 0;
		cv.last_seen_ns = now;
		cv.orig_ip = t.saddr;
		cv.orig_port = t.sport;
		struct fj_ct_key rk;
		fj_ct_key_of(&rk, t.daddr, cfg->node_ip, t.dport, 0, t.proto, FJ_CT_DIR_SNAT_REV);
		nat_ip = cfg->node_ip;
		nat_port = fj_snat_alloc(cfg, &rk, &cv,
					 fj_flow_hash(t.saddr, t.daddr, ((__u32)t.sport << 16) | t.dport, 0xa5));
		if (!nat_port)
			return TC_ACT_SHOT;
		cv.orig_ip = 0;
		cv.orig_port = 0;
		cv.nat_ip = nat_ip;
		cv.nat_port = nat_port;
		if (bpf_map_update_elem(&fjord_ct, &fk, &cv, BPF_ANY)) {
			fj_count(FJ_STAT_ERROR);
			return TC_ACT_SHOT;
		}
		fj_count(FJ_STAT_SNAT);
	}
	if (fj_rewrite(skb, t.proto, FJ_IP_SADDR_OFF, t.saddr, nat_ip, FJ_SPORT_OFF, t.sport, nat_port)) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}
