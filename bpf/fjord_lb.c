// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * fjord_lb.c — fjord's eBPF kube-proxy replacement (ClusterIP, IPv4, TCP+UDP).
 *
 * Two tc programs, attached to every pod's host-side veth in the node netns:
 *   fjord_from_pod  (tc ingress: packets the pod sends)
 *       conntrack lookup -> else service lookup (hash, O(1)) -> Maglev slot
 *       (flow hash % M) -> backend -> conntrack entries (both directions) ->
 *       DNAT (IPv4 + L4 checksum fixups). A TCP SYN to a service without
 *       backends is answered with a TCP RST, a UDP datagram with ICMP port
 *       unreachable; other such packets are dropped.
 *   fjord_to_pod    (tc egress: packets toward the pod)
 *       reply-direction conntrack lookup -> reverse NAT source back to the
 *       service VIP:port (rev-nat map).
 * No loops over services or backends: every decision is a map lookup.
 * Not handled (passed through unchanged): IPv6, IPv4 with options, fragments.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
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

struct fj_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags; /* byte 13 of the TCP header, 0 for UDP */
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
	__u32 seq = bpf_ntohl(tcp->seq);
	tcp->ack_seq = bpf_htonl(seq + 1);
	tcp->seq = 0;
	((__u8 *)tcp)[12] = (sizeof(struct tcphdr) / 4) << 4; /* data offset 5, no options */
	((__u8 *)tcp)[13] = 0x14;                              /* RST | ACK */
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

/* minimal ICMPv4 header (linux/icmp.h drags in libc headers) */
struct fj_icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 unused;
};
#define FJ_ICMP_DEST_UNREACH 3
#define FJ_ICMP_PORT_UNREACH 3

static __always_inline __u16 fj_csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

/* Answer a UDP datagram to a service without backends with ICMP port
 * unreachable from the VIP, carrying the original IP header + 8 bytes. */
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

SEC("classifier")
int fjord_from_pod(struct __sk_buff *skb)
{
	struct fj_tuple t = {};
	if (fj_parse(skb, &t))
		return TC_ACT_OK;

	struct fj_ct_key ck = {};
	ck.saddr = t.saddr;
	ck.daddr = t.daddr;
	ck.sport = t.sport;
	ck.dport = t.dport;
	ck.proto = t.proto;
	ck.dir = FJ_CT_DIR_FWD;

	__u64 now = bpf_ktime_get_ns();
	struct fj_ct_value *ct = bpf_map_lookup_elem(&fjord_ct, &ck);
	if (ct) {
		__u32 bid = ct->backend_id;
		__u32 rid = ct->rev_nat_id;
		struct fj_backend *be = bpf_map_lookup_elem(&fjord_backends, &bid);
		/* the flow's service must still exist with this address (ids are reused) */
		struct fj_revnat *rn = bpf_map_lookup_elem(&fjord_revnat, &rid);
		if (be && be->ip == ct->backend_ip && be->port == ct->backend_port && rn && rn->vip == t.daddr &&
		    rn->port == t.dport) {
			ct->last_seen_ns = now;
			fj_count(FJ_STAT_CT_HIT);
			if (fj_rewrite(skb, t.proto, FJ_IP_DADDR_OFF, t.daddr, be->ip, FJ_DPORT_OFF, t.dport,
				       be->port)) {
				fj_count(FJ_STAT_ERROR);
				return TC_ACT_SHOT;
			}
			fj_count(FJ_STAT_DNAT);
			return TC_ACT_OK;
		}
		/* the backend (or the service) of this flow is gone: look the service up again */
		fj_count(FJ_STAT_RESELECT);
	}

	struct fj_svc_key sk = {};
	sk.vip = t.daddr;
	sk.port = t.dport;
	sk.proto = t.proto;
	struct fj_svc_value *svc = bpf_map_lookup_elem(&fjord_services, &sk);
	if (!svc) {
		/* Not a service address. If this starts a flow (TCP SYN, any UDP) whose
		 * replies would match the reply-direction conntrack entry of an old
		 * service flow with the same tuple (client port reused for a direct
		 * connection to the backend), drop that stale entry so the replies
		 * are not reverse-NATed to the VIP. */
		if (t.proto == IPPROTO_UDP || (t.tcp_flags & 0x12) == 0x02) {
			struct fj_ct_key stale = {};
			stale.saddr = t.daddr;
			stale.daddr = t.saddr;
			stale.sport = t.dport;
			stale.dport = t.sport;
			stale.proto = t.proto;
			stale.dir = FJ_CT_DIR_REPLY;
			if (bpf_map_lookup_elem(&fjord_ct, &stale)) {
				bpf_map_delete_elem(&fjord_ct, &stale);
				fj_count(FJ_STAT_CT_STALE);
			}
		}
		return TC_ACT_OK;
	}

	__u32 service_id = svc->service_id;
	__u32 table_id = svc->table_id;
	if (svc->backend_count == 0) {
		fj_count(FJ_STAT_NO_BACKEND);
		if (t.proto == IPPROTO_TCP && (t.tcp_flags & 0x12) == 0x02) /* SYN without ACK */
			return fj_reply_rst(skb);
		if (t.proto == IPPROTO_UDP)
			return fj_reply_icmp_unreach(skb);
		return TC_ACT_SHOT;
	}

	__u32 zero = 0;
	struct fj_config *cfg = bpf_map_lookup_elem(&fjord_config, &zero);
	if (!cfg || cfg->maglev_size == 0) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	void *table = bpf_map_lookup_elem(&fjord_maglev, &table_id);
	if (!table) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	__u32 slot = fj_flow_hash(t.saddr, t.daddr, ((__u32)t.sport << 16) | t.dport, t.proto) %
		     cfg->maglev_size;
	__u32 *bidp = bpf_map_lookup_elem(table, &slot);
	if (!bidp) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	__u32 bid = *bidp;
	struct fj_backend *be = bpf_map_lookup_elem(&fjord_backends, &bid);
	if (!be) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	__be32 bip = be->ip;
	__be16 bport = be->port;

	struct fj_ct_value cv = {};
	cv.backend_id = bid;
	cv.rev_nat_id = service_id;
	cv.backend_ip = bip;
	cv.backend_port = bport;
	cv.last_seen_ns = now;
	struct fj_ct_key rk = {};
	rk.saddr = bip;
	rk.daddr = t.saddr;
	rk.sport = bport;
	rk.dport = t.sport;
	rk.proto = t.proto;
	rk.dir = FJ_CT_DIR_REPLY;
	/* reply entry first: once the forward entry exists, replies must find theirs */
	if (bpf_map_update_elem(&fjord_ct, &rk, &cv, BPF_ANY) ||
	    bpf_map_update_elem(&fjord_ct, &ck, &cv, BPF_ANY)) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	fj_count(FJ_STAT_CT_NEW);

	if (fj_rewrite(skb, t.proto, FJ_IP_DADDR_OFF, t.daddr, bip, FJ_DPORT_OFF, t.dport, bport)) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	fj_count(FJ_STAT_DNAT);
	return TC_ACT_OK;
}

SEC("classifier")
int fjord_to_pod(struct __sk_buff *skb)
{
	struct fj_tuple t = {};
	if (fj_parse(skb, &t))
		return TC_ACT_OK;

	struct fj_ct_key rk = {};
	rk.saddr = t.saddr;
	rk.daddr = t.daddr;
	rk.sport = t.sport;
	rk.dport = t.dport;
	rk.proto = t.proto;
	rk.dir = FJ_CT_DIR_REPLY;
	struct fj_ct_value *ct = bpf_map_lookup_elem(&fjord_ct, &rk);
	if (!ct)
		return TC_ACT_OK;
	ct->last_seen_ns = bpf_ktime_get_ns();
	__u32 rid = ct->rev_nat_id;
	struct fj_revnat *rn = bpf_map_lookup_elem(&fjord_revnat, &rid);
	if (!rn)
		return TC_ACT_OK; /* service deleted: nothing to restore */
	if (fj_rewrite(skb, t.proto, FJ_IP_SADDR_OFF, t.saddr, rn->vip, FJ_SPORT_OFF, t.sport, rn->port)) {
		fj_count(FJ_STAT_ERROR);
		return TC_ACT_SHOT;
	}
	fj_count(FJ_STAT_REVNAT);
	return TC_ACT_OK;
}
