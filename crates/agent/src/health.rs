//! Node-to-node health (like cilium-health): every agent answers TCP on its
//! node address (`HEALTH_PORT`) and probes every other node with ICMP echo and
//! a TCP connect every few seconds; `fjordctl status --verbose` shows the matrix.

use fjord_model::api::{NodeRecord, PeerHealth};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const HEALTH_PORT: u16 = 4240;

#[derive(Default)]
pub struct HealthView {
    pub peers: Mutex<BTreeMap<String, PeerHealth>>,
}

/// Accept health connections on `addr:HEALTH_PORT` (connect + close is the probe).
pub async fn serve(addr: Ipv4Addr) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(SocketAddr::new(addr.into(), HEALTH_PORT)).await?;
    loop {
        if let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo over a raw socket (the agent runs as root); the RTT.
pub async fn icmp_echo(dst: Ipv4Addr, id: u16, seq: u16, timeout: Duration) -> std::io::Result<Duration> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    sock.set_nonblocking(true)?;
    let sock = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(sock))?;
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(b"fjord-health");
    let c = checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let t0 = Instant::now();
    sock.send_to(&pkt, SocketAddr::new(dst.into(), 0)).await?;
    let mut buf = [0u8; 1500];
    tokio::time::timeout(timeout, async {
        loop {
            let (n, from) = sock.recv_from(&mut buf).await?;
            // Raw IPv4 sockets deliver the IP header too.
            let ihl = ((buf[0] & 0x0f) as usize) * 4;
            if from.ip() == std::net::IpAddr::V4(dst) && n >= ihl + 8 && buf[ihl] == 0 && buf[ihl + 4..ihl + 6] == id.to_be_bytes() && buf[ihl + 6..ihl + 8] == seq.to_be_bytes() {
                return Ok(t0.elapsed());
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo reply"))?
}

async fn tcp_probe(dst: Ipv4Addr, timeout: Duration) -> std::io::Result<Duration> {
    let t0 = Instant::now();
    tokio::time::timeout(timeout, tokio::net::TcpStream::connect(SocketAddr::new(dst.into(), HEALTH_PORT)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    Ok(t0.elapsed())
}

/// Probe every other node known to `nodes` every `interval`.
pub async fn run_prober(me: String, nodes: Arc<crate::cluster::NodeView>, view: Arc<HealthView>, interval: Duration) {
    let id = (std::process::id() & 0xffff) as u16;
    let mut seq: u16 = 0;
    loop {
        let peers: Vec<NodeRecord> = nodes.nodes.lock().unwrap().values().filter(|n| n.name != me && !n.addresses.is_empty()).cloned().collect();
        let mut results = BTreeMap::new();
        for p in peers {
            seq = seq.wrapping_add(1);
            let addr = p.addresses[0];
            let icmp = icmp_echo(addr, id, seq, Duration::from_secs(1)).await;
            let tcp = tcp_probe(addr, Duration::from_secs(1)).await;
            let error = match (&icmp, &tcp) {
                (Err(e), _) => Some(format!("icmp: {e}")),
                (_, Err(e)) => Some(format!("tcp: {e}")),
                _ => None,
            };
            results.insert(
                p.name.clone(),
                PeerHealth {
                    node: p.name.clone(),
                    address: addr,
                    icmp_rtt_us: icmp.ok().map(|d| d.as_micros() as u64),
                    tcp_rtt_us: tcp.ok().map(|d| d.as_micros() as u64),
                    error,
                },
            );
        }
        *view.peers.lock().unwrap() = results;
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn icmp_checksum_matches_rfc1071_example() {
        // Echo request, id 1, seq 1, no payload: 08 00 f7 fd 00 01 00 01
        let mut p = vec![8u8, 0, 0, 0, 0, 1, 0, 1];
        let c = super::checksum(&p);
        assert_eq!(c, 0xf7fd);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(super::checksum(&p), 0, "a packet with its checksum sums to zero");
    }
}
