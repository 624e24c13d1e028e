//! Helpers for fjord's tests and benchmarks (not used by the store itself).

/// A loopback TCP port that is free now and that this process has not handed out before.
///
/// `bind(127.0.0.1:0)` and dropping the listener is not enough for a server started later
/// (etcd, the gateway, nginx): the kernel picks that port from the ephemeral range, where the
/// client sockets of tests running in parallel take their source ports, so one of them can
/// own it before the server binds. These ports come from below the ephemeral range instead,
/// never twice per process, starting at a point derived from the process id.
pub fn free_loopback_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u32, ephemeral_lo.max(12_000));
    let span = hi - lo;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let p = (lo + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port in {lo}..{hi}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_repeat() {
        let ports: Vec<u16> = (0..50).map(|_| super::free_loopback_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        assert!(ports.iter().all(|p| *p >= 10_000), "{ports:?}");
    }
}
