//! `#[repr(C)]` mirrors of the structs in `bpf/fjord.h`.
//!
//! Fields named like the C ones; `__be*` fields hold the value in network byte
//! order (use the constructors/accessors). The `tests` module checks every
//! size and offset against numbers measured from the C header at build time.
use std::net::Ipv4Addr;

use fjord_lb::{BackendAddr, Protocol, ServiceKey};

/// Constants and sizes measured from bpf/fjord.h by build.rs.
pub mod c {
    include!(concat!(env!("OUT_DIR"), "/layout.rs"));
}

fn be_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}
fn ip_of(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

/// `struct fj_svc_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SvcKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

impl SvcKey {
    pub fn new(k: &ServiceKey) -> Self {
        SvcKey { vip: be_ip(k.vip), port: k.port.to_be(), proto: k.protocol.number(), pad: 0 }
    }
    /// None if the protocol byte is not TCP/UDP (corrupt or foreign entry).
    pub fn to_service_key(&self) -> Option<ServiceKey> {
        Some(ServiceKey { vip: ip_of(self.vip), port: u16::from_be(self.port), protocol: Protocol::from_number(self.proto)? })
    }
}

/// `struct fj_svc_value`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SvcValue {
    pub service_id: u32,
    pub table_id: u32,
    pub backend_count: u32,
    pub flags: u32,
    pub affinity_timeout_s: u32,
    /// `backend_count` if it is at most [`SVC_INLINE`] (and the compact table was given), else 0
    pub inline_count: u32,
    /// the frontend's active backends (those of its Maglev table) when they fit; the rest zero
    pub inline_be: [BackendValue; SVC_INLINE],
    /// their backend ids (`fjord_backends` keys, for conntrack)
    pub inline_id: [u32; SVC_INLINE],
    /// compact Maglev table: slot → index into `inline_be` (all zero without backends inline)
    pub slot: [u8; SVC_SLOTS],
    pub pad: [u8; 3],
}

impl Default for SvcValue {
    fn default() -> Self {
        SvcValue {
            service_id: 0,
            table_id: 0,
            backend_count: 0,
            flags: 0,
            affinity_timeout_s: 0,
            inline_count: 0,
            inline_be: [BackendValue::default(); SVC_INLINE],
            inline_id: [0; SVC_INLINE],
            slot: [0; SVC_SLOTS],
            pad: [0; 3],
        }
    }
}

impl SvcValue {
    /// A 64-bit fingerprint of the whole entry: the datapath remembers this instead of the
    /// 632-byte entry to tell whether a rewrite would change anything.
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    /// The entry of a frontend whose active backends (those of its table) are `active`, with
    /// backend ids `ids` (same order) and `compact`, the frontend's compact Maglev table
    /// (`FrontendEntries::compact`: slot → index into `active`). The backends and the table
    /// are held inline when there are at most [`SVC_INLINE`] and the table has
    /// [`SVC_SLOTS`] slots; otherwise the datapath uses the frontend's big table.
    pub fn new(service_id: u32, table_id: u32, flags: u32, affinity_timeout_s: u32, active: &[BackendAddr], ids: &[u32], compact: &[u8]) -> Self {
        let mut v = SvcValue { service_id, table_id, backend_count: active.len() as u32, flags, affinity_timeout_s, ..Default::default() };
        let fits = !active.is_empty()
            && active.len() <= SVC_INLINE
            && ids.len() == active.len()
            && compact.len() == SVC_SLOTS
            && compact.iter().all(|&i| (i as usize) < active.len());
        if fits {
            v.inline_count = active.len() as u32;
            for ((slot, id), (a, i)) in v.inline_be.iter_mut().zip(v.inline_id.iter_mut()).zip(active.iter().zip(ids)) {
                *slot = BackendValue::new(a);
                *id = *i;
            }
            v.slot.copy_from_slice(compact);
        }
        v
    }
}

/// `struct fj_backend`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BackendValue {
    pub ip: u32,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

impl BackendValue {
    pub fn new(b: &BackendAddr) -> Self {
        BackendValue { ip: be_ip(b.ip), port: b.port.to_be(), proto: b.protocol.number(), flags: 0 }
    }
    pub fn to_addr(&self) -> Option<BackendAddr> {
        Some(BackendAddr { ip: ip_of(self.ip), port: u16::from_be(self.port), protocol: Protocol::from_number(self.proto)? })
    }
}

/// `struct fj_revnat`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RevNat {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

impl RevNat {
    pub fn new(k: &ServiceKey) -> Self {
        RevNat { vip: be_ip(k.vip), port: k.port.to_be(), pad: 0 }
    }
}

/// `struct fj_ct_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: u16,
}

impl CtKey {
    pub fn src(&self) -> (Ipv4Addr, u16) {
        (ip_of(self.saddr), u16::from_be(self.sport))
    }
    pub fn dst(&self) -> (Ipv4Addr, u16) {
        (ip_of(self.daddr), u16::from_be(self.dport))
    }
}

/// `struct fj_ct_value`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtValue {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub backend_ip: u32,
    pub backend_port: u16,
    pub state: u8,
    pub flags: u8,
    pub last_seen_ns: u64,
    pub nat_ip: u32,
    pub nat_port: u16,
    pub orig_port: u16,
    pub orig_ip: u32,
    pub pad: u32,
}

impl CtValue {
    pub fn backend(&self) -> (Ipv4Addr, u16) {
        (ip_of(self.backend_ip), u16::from_be(self.backend_port))
    }
}

/// `struct fj_affinity_key`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client_ip: u32,
}

/// `struct fj_affinity_value`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub pad: u32,
    pub last_ns: u64,
}

/// `struct fj_config`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Config {
    pub maglev_size: u32,
    pub max_tables: u32,
    pub flags: u32,
    pub version: u32,
    pub node_ip: u32,
    pub pod_net: u32,
    pub pod_mask: u32,
    pub cluster_net: u32,
    pub cluster_mask: u32,
    pub hairpin_ip: u32,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub tcp_syn_s: u32,
    pub tcp_established_s: u32,
    pub tcp_closing_s: u32,
    pub udp_s: u32,
    pub pad: u32,
    pub host_netns_cookie: u64,
}

/// An IPv4 address in the byte order of the maps (network order in memory).
pub fn be_addr(ip: Ipv4Addr) -> u32 {
    be_ip(ip)
}

/// `struct fj_sock_revnat`
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SockRevNat {
    pub vip: u32,
    pub backend_ip: u32,
    pub port: u16,
    pub backend_port: u16,
    pub pad: u32,
}

// SAFETY: all of these are #[repr(C)] plain integers with explicit padding
// fields (no implicit holes), so every bit pattern is valid.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcValue {}
unsafe impl aya::Pod for BackendValue {}
unsafe impl aya::Pod for RevNat {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityValue {}
unsafe impl aya::Pod for SockRevNat {}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const CT_DIR_FWD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;
pub const CT_DIR_SNAT_FWD: u8 = 2;
pub const CT_DIR_SNAT_REV: u8 = 3;
pub const CT_SYN: u8 = 1;
pub const CT_ESTABLISHED: u8 = 2;
pub const CT_CLOSING: u8 = 3;
pub const CT_F_SNAT: u8 = 1;
pub const CT_F_HAIRPIN: u8 = 2;
pub const CT_F_NONAT: u8 = 4;
pub const SVC_F_AFFINITY: u32 = 1;
pub const SVC_F_EXTERNAL: u32 = 2;
pub const CFG_F_MASQUERADE: u32 = 1;
pub const CFG_F_HOST_ROUTING: u32 = 2;
pub const LAYOUT_VERSION: u32 = 7;
/// Backends a service entry holds itself (`FJ_SVC_INLINE`).
pub const SVC_INLINE: usize = fjord_lb::COMPACT_MAX_BACKENDS;
/// Slots of the compact Maglev table in a service entry (`FJ_SVC_SLOTS`).
pub const SVC_SLOTS: usize = fjord_lb::COMPACT_TABLE_SIZE as usize;
/// Slots per Maglev table chunk (`FJ_MAGLEV_CHUNK`): a table of M slots is an array of
/// ceil(M / MAGLEV_CHUNK) chunks of MAGLEV_CHUNK backend ids.
pub const MAGLEV_CHUNK: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    macro_rules! check {
        ($ty:ty, $size:ident, $( $field:ident => $off:ident ),* $(,)?) => {{
            assert_eq!(size_of::<$ty>(), c::$size, concat!("sizeof ", stringify!($ty)));
            $( assert_eq!(offset_of!($ty, $field), c::$off, concat!(stringify!($ty), ".", stringify!($field))); )*
        }};
    }

    #[test]
    fn struct_layouts_match_the_c_header() {
        check!(SvcKey, SIZEOF_FJ_SVC_KEY, vip => OFFSETOF_FJ_SVC_KEY_VIP, port => OFFSETOF_FJ_SVC_KEY_PORT,
            proto => OFFSETOF_FJ_SVC_KEY_PROTO, pad => OFFSETOF_FJ_SVC_KEY_PAD);
        check!(SvcValue, SIZEOF_FJ_SVC_VALUE, service_id => OFFSETOF_FJ_SVC_VALUE_SERVICE_ID,
            table_id => OFFSETOF_FJ_SVC_VALUE_TABLE_ID, backend_count => OFFSETOF_FJ_SVC_VALUE_BACKEND_COUNT,
            flags => OFFSETOF_FJ_SVC_VALUE_FLAGS, affinity_timeout_s => OFFSETOF_FJ_SVC_VALUE_AFFINITY_TIMEOUT_S,
            inline_count => OFFSETOF_FJ_SVC_VALUE_INLINE_COUNT, inline_be => OFFSETOF_FJ_SVC_VALUE_INLINE_BE,
            inline_id => OFFSETOF_FJ_SVC_VALUE_INLINE_ID, slot => OFFSETOF_FJ_SVC_VALUE_SLOT, pad => OFFSETOF_FJ_SVC_VALUE_PAD);
        check!(BackendValue, SIZEOF_FJ_BACKEND, ip => OFFSETOF_FJ_BACKEND_IP, port => OFFSETOF_FJ_BACKEND_PORT,
            proto => OFFSETOF_FJ_BACKEND_PROTO, flags => OFFSETOF_FJ_BACKEND_FLAGS);
        check!(RevNat, SIZEOF_FJ_REVNAT, vip => OFFSETOF_FJ_REVNAT_VIP, port => OFFSETOF_FJ_REVNAT_PORT,
            pad => OFFSETOF_FJ_REVNAT_PAD);
        check!(CtKey, SIZEOF_FJ_CT_KEY, saddr => OFFSETOF_FJ_CT_KEY_SADDR, daddr => OFFSETOF_FJ_CT_KEY_DADDR,
            sport => OFFSETOF_FJ_CT_KEY_SPORT, dport => OFFSETOF_FJ_CT_KEY_DPORT, proto => OFFSETOF_FJ_CT_KEY_PROTO,
            dir => OFFSETOF_FJ_CT_KEY_DIR, pad => OFFSETOF_FJ_CT_KEY_PAD);
        check!(CtValue, SIZEOF_FJ_CT_VALUE, backend_id => OFFSETOF_FJ_CT_VALUE_BACKEND_ID,
            rev_nat_id => OFFSETOF_FJ_CT_VALUE_REV_NAT_ID, backend_ip => OFFSETOF_FJ_CT_VALUE_BACKEND_IP,
            backend_port => OFFSETOF_FJ_CT_VALUE_BACKEND_PORT, state => OFFSETOF_FJ_CT_VALUE_STATE,
            flags => OFFSETOF_FJ_CT_VALUE_FLAGS, last_seen_ns => OFFSETOF_FJ_CT_VALUE_LAST_SEEN_NS,
            nat_ip => OFFSETOF_FJ_CT_VALUE_NAT_IP, nat_port => OFFSETOF_FJ_CT_VALUE_NAT_PORT,
            orig_port => OFFSETOF_FJ_CT_VALUE_ORIG_PORT, orig_ip => OFFSETOF_FJ_CT_VALUE_ORIG_IP,
            pad => OFFSETOF_FJ_CT_VALUE_PAD);
        check!(AffinityKey, SIZEOF_FJ_AFFINITY_KEY, service_id => OFFSETOF_FJ_AFFINITY_KEY_SERVICE_ID,
            client_ip => OFFSETOF_FJ_AFFINITY_KEY_CLIENT_IP);
        check!(AffinityValue, SIZEOF_FJ_AFFINITY_VALUE, backend_id => OFFSETOF_FJ_AFFINITY_VALUE_BACKEND_ID,
            pad => OFFSETOF_FJ_AFFINITY_VALUE_PAD, last_ns => OFFSETOF_FJ_AFFINITY_VALUE_LAST_NS);
        check!(Config, SIZEOF_FJ_CONFIG, maglev_size => OFFSETOF_FJ_CONFIG_MAGLEV_SIZE,
            max_tables => OFFSETOF_FJ_CONFIG_MAX_TABLES, flags => OFFSETOF_FJ_CONFIG_FLAGS,
            version => OFFSETOF_FJ_CONFIG_VERSION, node_ip => OFFSETOF_FJ_CONFIG_NODE_IP,
            pod_net => OFFSETOF_FJ_CONFIG_POD_NET, pod_mask => OFFSETOF_FJ_CONFIG_POD_MASK,
            cluster_net => OFFSETOF_FJ_CONFIG_CLUSTER_NET, cluster_mask => OFFSETOF_FJ_CONFIG_CLUSTER_MASK,
            hairpin_ip => OFFSETOF_FJ_CONFIG_HAIRPIN_IP, snat_port_min => OFFSETOF_FJ_CONFIG_SNAT_PORT_MIN,
            snat_port_max => OFFSETOF_FJ_CONFIG_SNAT_PORT_MAX, tcp_syn_s => OFFSETOF_FJ_CONFIG_TCP_SYN_S,
            tcp_established_s => OFFSETOF_FJ_CONFIG_TCP_ESTABLISHED_S,
            tcp_closing_s => OFFSETOF_FJ_CONFIG_TCP_CLOSING_S, udp_s => OFFSETOF_FJ_CONFIG_UDP_S,
            pad => OFFSETOF_FJ_CONFIG_PAD, host_netns_cookie => OFFSETOF_FJ_CONFIG_HOST_NETNS_COOKIE);
        check!(SockRevNat, SIZEOF_FJ_SOCK_REVNAT, vip => OFFSETOF_FJ_SOCK_REVNAT_VIP,
            backend_ip => OFFSETOF_FJ_SOCK_REVNAT_BACKEND_IP, port => OFFSETOF_FJ_SOCK_REVNAT_PORT,
            backend_port => OFFSETOF_FJ_SOCK_REVNAT_BACKEND_PORT, pad => OFFSETOF_FJ_SOCK_REVNAT_PAD);
    }

    #[test]
    fn constants_match_the_c_header() {
        assert_eq!(PROTO_TCP as u64, c::FJ_PROTO_TCP);
        assert_eq!(PROTO_UDP as u64, c::FJ_PROTO_UDP);
        assert_eq!(CT_DIR_FWD as u64, c::FJ_CT_DIR_FWD);
        assert_eq!(CT_DIR_REPLY as u64, c::FJ_CT_DIR_REPLY);
        assert_eq!(LAYOUT_VERSION as u64, c::FJ_LAYOUT_VERSION);
        assert_eq!(MAGLEV_CHUNK as u64, c::FJ_MAGLEV_CHUNK);
        assert_eq!(SVC_INLINE as u64, c::FJ_SVC_INLINE);
        assert_eq!(SVC_SLOTS as u64, c::FJ_SVC_SLOTS);
        assert_eq!(MAGLEV_CHUNK * 4, c::SIZEOF_FJ_MAGLEV_CHUNK);
        assert_eq!(0, c::OFFSETOF_FJ_MAGLEV_CHUNK_BACKEND_ID);
        for (rust, cval) in [
            (CT_DIR_SNAT_FWD as u64, c::FJ_CT_DIR_SNAT_FWD),
            (CT_DIR_SNAT_REV as u64, c::FJ_CT_DIR_SNAT_REV),
            (CT_SYN as u64, c::FJ_CT_SYN),
            (CT_ESTABLISHED as u64, c::FJ_CT_ESTABLISHED),
            (CT_CLOSING as u64, c::FJ_CT_CLOSING),
            (CT_F_SNAT as u64, c::FJ_CT_F_SNAT),
            (CT_F_HAIRPIN as u64, c::FJ_CT_F_HAIRPIN),
            (CT_F_NONAT as u64, c::FJ_CT_F_NONAT),
            (SVC_F_AFFINITY as u64, c::FJ_SVC_F_AFFINITY),
            (SVC_F_EXTERNAL as u64, c::FJ_SVC_F_EXTERNAL),
            (CFG_F_MASQUERADE as u64, c::FJ_CFG_F_MASQUERADE),
            (CFG_F_HOST_ROUTING as u64, c::FJ_CFG_F_HOST_ROUTING),
        ] {
            assert_eq!(rust, cval);
        }
        assert_eq!(Protocol::Tcp.number(), PROTO_TCP);
        assert_eq!(Protocol::Udp.number(), PROTO_UDP);
        for (i, s) in crate::Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
        assert_eq!(crate::Stat::ALL.len() as u64, c::FJ_STAT_MAX);
        assert_eq!(crate::Stat::Dnat as u64, c::FJ_STAT_DNAT);
        assert_eq!(crate::Stat::Revnat as u64, c::FJ_STAT_REVNAT);
        assert_eq!(crate::Stat::CtNew as u64, c::FJ_STAT_CT_NEW);
        assert_eq!(crate::Stat::CtHit as u64, c::FJ_STAT_CT_HIT);
        assert_eq!(crate::Stat::NoBackend as u64, c::FJ_STAT_NO_BACKEND);
        assert_eq!(crate::Stat::RstSent as u64, c::FJ_STAT_RST_SENT);
        assert_eq!(crate::Stat::Reselect as u64, c::FJ_STAT_RESELECT);
        assert_eq!(crate::Stat::Error as u64, c::FJ_STAT_ERROR);
        assert_eq!(crate::Stat::SockLb as u64, c::FJ_STAT_SOCK_LB);
        assert_eq!(crate::Stat::IcmpSent as u64, c::FJ_STAT_ICMP_SENT);
        assert_eq!(crate::Stat::CtStale as u64, c::FJ_STAT_CT_STALE);
        assert_eq!(crate::Stat::SockToTc as u64, c::FJ_STAT_SOCK_TO_TC);
        assert_eq!(crate::Stat::Gone as u64, c::FJ_STAT_GONE);
        assert_eq!(crate::Stat::IcmpErr as u64, c::FJ_STAT_ICMP_ERR);
        assert_eq!(crate::Stat::HostRouted as u64, c::FJ_STAT_HOST_ROUTED);
        assert!(c::FJ_STAT_MAX <= c::FJ_STAT_SLOTS, "fjord_stats has a slot for every counter");
        assert_eq!(crate::FJ_PORT_WORDS as u64, c::FJ_PORT_WORDS);
    }

    #[test]
    fn byte_order_of_keys() {
        let k = ServiceKey { vip: "10.96.0.10".parse().unwrap(), port: 80, protocol: Protocol::Tcp };
        let s = SvcKey::new(&k);
        // in memory exactly as in the packet: 10 96 0 10 | 0 80 | 6 | 0
        let bytes: [u8; 8] = unsafe { std::mem::transmute(s) };
        assert_eq!(bytes, [10, 96, 0, 10, 0, 80, 6, 0]);
        assert_eq!(s.to_service_key(), Some(k));
        let b = BackendAddr { ip: "10.244.1.5".parse().unwrap(), port: 8080, protocol: Protocol::Udp };
        assert_eq!(BackendValue::new(&b).to_addr(), Some(b));
        assert_eq!(SvcKey { proto: 132, ..s }.to_service_key(), None);
    }

    #[test]
    fn service_entries_hold_their_backends_when_they_fit() {
        let addrs: Vec<BackendAddr> = (1..=9u8)
            .map(|i| BackendAddr { ip: Ipv4Addr::new(10, 244, 1, i), port: 8080, protocol: Protocol::Tcp })
            .collect();
        let ids: Vec<u32> = (11..=19).collect();
        let table = |n: usize| -> Vec<u8> { (0..SVC_SLOTS).map(|s| (s % n) as u8).collect() };
        let v = SvcValue::new(7, 3, SVC_F_EXTERNAL, 0, &addrs[..3], &ids[..3], &table(3));
        assert_eq!((v.service_id, v.table_id, v.backend_count, v.inline_count, v.flags), (7, 3, 3, 3, SVC_F_EXTERNAL));
        assert_eq!(v.inline_be[..3].iter().map(|b| b.to_addr().unwrap()).collect::<Vec<_>>(), addrs[..3]);
        assert_eq!(v.inline_id[..3], ids[..3]);
        assert_eq!(v.slot.to_vec(), table(3));
        assert!(v.inline_be[3..].iter().all(|b| *b == BackendValue::default()), "unused backends stay zero");
        assert!(v.inline_id[3..].iter().all(|&i| i == 0));
        let full = SvcValue::new(7, 3, 0, 0, &addrs[..SVC_INLINE], &ids[..SVC_INLINE], &table(SVC_INLINE));
        assert_eq!(full.inline_count as usize, SVC_INLINE);
        // one more than fits (no compact table either): the frontend's table is used
        let over = SvcValue::new(7, 3, 0, 0, &addrs, &ids, &[]);
        assert_eq!((over.backend_count, over.inline_count), (9, 0));
        assert!(over.inline_be.iter().all(|b| *b == BackendValue::default()));
        // a table that does not match the backends is not held
        for bad in [table(4), table(3)[..100].to_vec(), vec![]] {
            let v = SvcValue::new(7, 3, 0, 0, &addrs[..3], &ids[..3], &bad);
            assert_eq!((v.inline_count, v.slot), (0, [0; SVC_SLOTS]));
        }
        let none = SvcValue::new(7, 0, 0, 0, &[], &[], &[]);
        assert_eq!((none.backend_count, none.inline_count), (0, 0));
    }
}
