//! Kubernetes-mode IPAM (like Cilium's `ipam.mode=kubernetes`): addresses come
//! from the node's PodCIDR. Pure: the agent persists allocations in the store
//! and passes the set in use; this module only decides.
//!
//! Rules: the network address, the broadcast address and the gateway (the
//! first host address, carried by every pod's host-side veth) are never handed
//! out; allocation is round-robin after the last address given, so a released
//! address is not reused at once (stale conntrack entries and ARP caches of a
//! deleted pod then cannot hit its successor).

use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("PodCIDR {cidr} is too small: it needs at least a /30 (network, gateway, one pod, broadcast)")]
    TooSmall { cidr: Ipv4Net },
    #[error("PodCIDR {given} is not a network address (host bits set); did you mean {network}?")]
    HostBits { given: String, network: Ipv4Net },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    cidr: Ipv4Net,
}

impl Pool {
    pub fn new(cidr: Ipv4Net) -> Result<Pool, IpamError> {
        if cidr.prefix_len() > 30 {
            return Err(IpamError::TooSmall { cidr });
        }
        if cidr.trunc() != cidr {
            return Err(IpamError::HostBits { given: cidr.to_string(), network: cidr.trunc() });
        }
        Ok(Pool { cidr })
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The pods' gateway: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    /// Number of addresses that can be given to pods.
    pub fn capacity(&self) -> u32 {
        // all addresses - network - broadcast - gateway
        (1u64 << (32 - self.cidr.prefix_len())) as u32 - 3
    }

    fn first(&self) -> u32 {
        u32::from(self.cidr.network()) + 2
    }
    fn last(&self) -> u32 {
        u32::from(self.cidr.broadcast()) - 1
    }

    /// Whether `ip` may be given to a pod.
    pub fn assignable(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        (self.first()..=self.last()).contains(&n)
    }

    /// The next free address after `after` (wrapping), or `None` when exhausted.
    pub fn next_free(&self, used: &BTreeSet<Ipv4Addr>, after: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (first, last) = (self.first(), self.last());
        let start = match after.map(u32::from) {
            Some(a) if (first..last).contains(&a) => a + 1,
            _ => first,
        };
        (start..=last).chain(first..start).map(Ipv4Addr::from).find(|ip| !used.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str) -> Pool {
        Pool::new(s.parse().unwrap()).unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn reserved_addresses_are_never_given() {
        let p = pool("10.244.1.0/24");
        assert_eq!(p.gateway(), ip("10.244.1.1"));
        assert_eq!(p.capacity(), 253);
        assert!(!p.assignable(ip("10.244.1.0")));
        assert!(!p.assignable(ip("10.244.1.1")));
        assert!(!p.assignable(ip("10.244.1.255")));
        assert!(!p.assignable(ip("10.244.2.5")));
        assert!(p.assignable(ip("10.244.1.2")));
        assert!(p.assignable(ip("10.244.1.254")));
        // Allocating everything gives exactly the assignable set.
        let mut used = BTreeSet::new();
        let mut last = None;
        while let Some(a) = p.next_free(&used, last) {
            assert!(p.assignable(a), "{a}");
            assert!(used.insert(a), "{a} given twice");
            last = Some(a);
        }
        assert_eq!(used.len() as u32, p.capacity());
    }

    #[test]
    fn exhaustion_returns_none() {
        let p = pool("10.244.9.0/30");
        assert_eq!(p.capacity(), 1);
        let used: BTreeSet<_> = [ip("10.244.9.2")].into();
        assert_eq!(p.next_free(&used, None), None);
        assert_eq!(p.next_free(&BTreeSet::new(), None), Some(ip("10.244.9.2")));
    }

    #[test]
    fn round_robin_does_not_reuse_at_once_and_wraps() {
        let p = pool("10.244.1.0/29"); // .2 ..= .6
        let mut used: BTreeSet<_> = [ip("10.244.1.2"), ip("10.244.1.3")].into();
        // .3 was given last, then .2 released: next is .4, not .2.
        used.remove(&ip("10.244.1.2"));
        assert_eq!(p.next_free(&used, Some(ip("10.244.1.3"))), Some(ip("10.244.1.4")));
        // After the top it wraps to the bottom.
        let used: BTreeSet<_> = [ip("10.244.1.6")].into();
        assert_eq!(p.next_free(&used, Some(ip("10.244.1.6"))), Some(ip("10.244.1.2")));
        // A cursor outside the pool starts at the bottom.
        assert_eq!(p.next_free(&BTreeSet::new(), Some(ip("192.168.0.1"))), Some(ip("10.244.1.2")));
    }

    #[test]
    fn restart_with_persisted_set_never_double_allocates() {
        // The agent restarts with no cursor; the persisted set alone must prevent reuse.
        let p = pool("10.244.1.0/28");
        let used: BTreeSet<_> = (2..=9).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();
        let next = p.next_free(&used, None).unwrap();
        assert_eq!(next, ip("10.244.1.10"));
    }

    #[test]
    fn bad_cidrs() {
        assert!(matches!(Pool::new("10.244.1.0/31".parse().unwrap()), Err(IpamError::TooSmall { .. })));
        let e = Pool::new("10.244.1.7/24".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("10.244.1.0/24"), "{e}");
    }
}
