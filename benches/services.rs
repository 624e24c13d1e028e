//! Services benchmark (issue #3, "Measured"): ClusterIP latency and programming time
//! with 1, 1,000 and 10,000 services × 3 backends, fjord against kube-proxy's iptables
//! and nftables layouts and direct pod IPs, all in one run.
//!
//! `cargo bench --bench services` (full; release binaries needed:
//! `cargo build --release -p fjord-agent -p fjord-cni -p fjordctl`). Under `cargo test`
//! (no `--bench`) it runs a smoke pass with 1 and 20 services and few connections.
//! Env: FJORD_BENCH_SERVICES (largest size, default 10000), FJORD_BENCH_CRR (connections
//! per variant and size, default 2000), FJORD_BENCH_RR (transactions, default 5000).
//!
//! Topology (everything in namespaces this bench creates, removed on drop, also on panic):
//! * fjord: a one-node dev cluster (TestCluster, real agent, `--max-services`), three
//!   backend pods and a client pod added through the CNI plugin; services and their
//!   EndpointSlices applied through the agent API (selectorless services, as
//!   `fjordctl apply -f` does).
//! * baselines: node namespaces `fjbn-<pid>-ipt|nft|dir`, each with a client "pod"
//!   namespace on a veth pair and a veth pair to each of three shared backend "pod"
//!   namespaces `fjbn-<pid>-b0..2`, plumbed like fjord's pods (/32 routes, 169.254.1.1
//!   gateway). `ipt` holds kube-proxy's iptables layout loaded by one `iptables-restore`,
//!   `nft` kube-proxy's nftables layout loaded by one `nft -f`, `dir` nothing (the floor).
//! * backends: TCP echo servers on ports 10000..10000+P in every backend pod (P = min(N,
//!   1000)); service i has its 3 backends on port 10000 + i % P of the 3 pods.
//! * fjord has two rows: "fjord (eBPF tc)", a client pod whose connections are translated
//!   per packet by the tc programs at its veth, and "fjord (socket LB)", a client pod whose
//!   process is in the node's pods cgroup (`cluster up --socket-lb-pods`), so connect()
//!   goes straight to the backend. Every row's client runs in a child process of its own (the
//!   bench binary again; cgroups are per process), so all rows are measured alike.
//! * client: the same code for every variant, in the client's namespace: TCP_CRR
//!   (connect + 32-byte request/response + close) and TCP_RR (32-byte request/response on
//!   16 kept connections), the target service picked at random per connection. Every size's
//!   rows are measured in 10 interleaved rounds (each variant gets a tenth of the
//!   connections per round, in a rotated order), so drift of this shared machine spreads over
//!   all variants instead of biasing the one that happened to run during a busy minute.

use fjord_e2e::*;
use fjordctl::pod;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BASE_PORT: u16 = 10000;
const VIP_PORT: u16 = 80;
const MSG: usize = 32;
const RR_CONNS: usize = 16;
/// Latency rows are measured in this many interleaved rounds (see `run`).
const ROUNDS: usize = 10;
/// fjord's rows: pods through the tc programs at their veth (per-packet NAT, eBPF conntrack),
/// and pods in the socket-LB cgroup (connect() goes to the backend; `cluster up --socket-lb-pods`)
const FJ_TC: &str = "fjord (eBPF tc)";
const FJ_SOCK: &str = "fjord (socket LB)";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 16 + i as u32)
}

/// Namespaces made by this bench; deleted on drop (also after a panic).
struct Netns(Vec<String>);
impl Netns {
    fn add(&mut self, name: &str) -> PathBuf {
        sh(&["ip", "netns", "add", name]);
        self.0.push(name.to_string());
        fjord_net::netns::path(name)
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
        }
    }
}

fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `argv` in namespace `ns` with `input` on stdin; returns the wall time.
fn in_ns_with_input(ns: &str, argv: &[&str], input: &[u8]) -> Duration {
    let t = Instant::now();
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input).unwrap();
    let out = c.wait_with_output().unwrap();
    let d = t.elapsed();
    assert!(out.status.success(), "{argv:?} in {ns}: {}", String::from_utf8_lossy(&out.stderr));
    d
}

/// A kube-proxy style chain-name hash (16 chars of a 64-bit hash, base32-ish).
fn chain_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16).map(|i| A[((h >> (i * 4)) & 31) as usize ^ (i & 1)] as char).collect()
}

#[derive(Clone)]
struct Svc {
    vip: Ipv4Addr,
    backends: Vec<(Ipv4Addr, u16)>,
}

fn services(n: usize, ports: usize, backend_ips: &[Ipv4Addr]) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc { vip: vip(i), backends: backend_ips.iter().map(|ip| (*ip, BASE_PORT + (i % ports) as u16)).collect() })
        .collect()
}

// ---------------------------------------------------------------- kube-proxy layouts

fn svc_chain(i: usize) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("bench/svc-{i}:tcp")))
}
fn sep_chain(i: usize, b: (Ipv4Addr, u16)) -> String {
    format!("KUBE-SEP-{}", chain_hash(&format!("bench/svc-{i}:tcp:{}:{}", b.0, b.1)))
}

fn ipt_kube_services(svcs: &[Svc], out: &mut String) {
    use std::fmt::Write;
    for (i, s) in svcs.iter().enumerate() {
        let _ = writeln!(out, "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i} cluster IP\" -m tcp --dport {VIP_PORT} -j {}", s.vip, svc_chain(i));
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
}

fn ipt_svc_rules(i: usize, s: &Svc, out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(out, "-A {} ! -s 10.244.0.0/16 -d {}/32 -p tcp -m comment --comment \"bench/svc-{i} cluster IP\" -m tcp --dport {VIP_PORT} -j KUBE-MARK-MASQ", svc_chain(i), s.vip);
    let n = s.backends.len();
    for (k, b) in s.backends.iter().enumerate() {
        let left = n - k;
        let stat = if left > 1 { format!(" -m statistic --mode random --probability {:.11}", 1.0 / left as f64) } else { String::new() };
        let _ = writeln!(out, "-A {} -m comment --comment \"bench/svc-{i} -> {}:{}\"{stat} -j {}", svc_chain(i), b.0, b.1, sep_chain(i, *b));
    }
    for b in &s.backends {
        let c = sep_chain(i, *b);
        let _ = writeln!(out, "-A {c} -s {}/32 -m comment --comment \"bench/svc-{i}\" -j KUBE-MARK-MASQ", b.0);
        let _ = writeln!(out, "-A {c} -p tcp -m comment --comment \"bench/svc-{i}\" -m tcp -j DNAT --to-destination {}:{}", b.0, b.1);
    }
}

/// kube-proxy's iptables layout for `svcs` (as its full sync writes it, one restore).
fn iptables_layout(svcs: &[Svc]) -> String {
    let mut o = String::new();
    o.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for c in ["KUBE-EXTERNAL-SERVICES", "KUBE-FIREWALL", "KUBE-FORWARD", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL", "KUBE-SERVICES"] {
        o.push_str(&format!(":{c} - [0:0]\n"));
    }
    o.push_str(concat!(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m comment --comment \"kubernetes forwarding rules\" -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n",
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
        ":KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-SERVICES - [0:0]\n",
    ));
    for (i, s) in svcs.iter().enumerate() {
        o.push_str(&format!(":{} - [0:0]\n", svc_chain(i)));
        for b in &s.backends {
            o.push_str(&format!(":{} - [0:0]\n", sep_chain(i, *b)));
        }
    }
    o.push_str(concat!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    ));
    ipt_kube_services(svcs, &mut o);
    for (i, s) in svcs.iter().enumerate() {
        ipt_svc_rules(i, s, &mut o);
    }
    o.push_str("COMMIT\n");
    o
}

/// kube-proxy's partial sync after one service's endpoints changed (`--noflush`):
/// KUBE-SERVICES rewritten whole, the changed KUBE-SVC chain, stale KUBE-SEP chains deleted.
fn iptables_change(svcs: &[Svc], i: usize, old: &Svc) -> String {
    let mut o = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    o.push_str(&format!(":{} - [0:0]\n", svc_chain(i)));
    let stale: Vec<String> = old.backends.iter().filter(|b| !svcs[i].backends.contains(b)).map(|b| sep_chain(i, *b)).collect();
    let added: Vec<String> = svcs[i].backends.iter().filter(|b| !old.backends.contains(b)).map(|b| sep_chain(i, *b)).collect();
    for c in stale.iter().chain(&added) {
        o.push_str(&format!(":{c} - [0:0]\n"));
    }
    ipt_kube_services(svcs, &mut o);
    // the SVC chain and new SEP chains (unchanged SEP chains are not rewritten)
    let mut rules = String::new();
    ipt_svc_rules(i, &svcs[i], &mut rules);
    for l in rules.lines().filter(|l| l.starts_with(&format!("-A {} ", svc_chain(i))) || added.iter().any(|c| l.starts_with(&format!("-A {c} ")))) {
        o.push_str(l);
        o.push('\n');
    }
    for c in &stale {
        o.push_str(&format!("-X {c}\n"));
    }
    o.push_str("COMMIT\n");
    o
}

fn nft_svc_chain(i: usize) -> String {
    format!("service-{}-bench/svc-{i}/tcp/", &chain_hash(&format!("bench/svc-{i}:tcp"))[..8])
}
fn nft_ep_chain(i: usize, b: (Ipv4Addr, u16)) -> String {
    format!("endpoint-{}-bench/svc-{i}/tcp/__{}/{}", &chain_hash(&format!("bench/svc-{i}:tcp:{}:{}", b.0, b.1))[..8], b.0, b.1)
}

fn nft_svc_rules(i: usize, s: &Svc, o: &mut String) {
    use std::fmt::Write;
    let c = nft_svc_chain(i);
    let _ = writeln!(o, "add rule ip kube-proxy {c} ip daddr {} tcp dport {VIP_PORT} ip saddr != 10.244.0.0/16 jump mark-for-masquerade", s.vip);
    let vm: Vec<String> = s.backends.iter().enumerate().map(|(k, b)| format!("{k} : goto {}", nft_ep_chain(i, *b))).collect();
    let _ = writeln!(o, "add rule ip kube-proxy {c} numgen random mod {} vmap {{ {} }}", s.backends.len(), vm.join(", "));
}

fn nft_ep(i: usize, b: (Ipv4Addr, u16), o: &mut String) {
    use std::fmt::Write;
    let c = nft_ep_chain(i, b);
    let _ = writeln!(o, "add chain ip kube-proxy {c}");
    let _ = writeln!(o, "add rule ip kube-proxy {c} ip saddr {} jump mark-for-masquerade", b.0);
    let _ = writeln!(o, "add rule ip kube-proxy {c} meta l4proto tcp dnat to {}:{}", b.0, b.1);
}

/// kube-proxy's nftables layout (one `nft -f` transaction).
fn nft_layout(svcs: &[Svc]) -> String {
    use std::fmt::Write;
    let mut o = String::from(concat!(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n",
        "add chain ip kube-proxy mark-for-masquerade\n",
        "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n",
        "add chain ip kube-proxy masquerading\n",
        "add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n",
        "add rule ip kube-proxy masquerading mark set mark xor 0x4000\n",
        "add rule ip kube-proxy masquerading masquerade fully-random\n",
        "add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n",
        "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }\n",
        "add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }\n",
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n",
        "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n",
        "add chain ip kube-proxy services\n",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
        "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n",
        "add chain ip kube-proxy service-endpoints-check\n",
        "add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n",
        "add chain ip kube-proxy cluster-ips-check\n",
        "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n",
        "add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"\n",
        "add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n",
        "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n",
        "add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check\n",
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n",
        "add rule ip kube-proxy nat-prerouting jump services\n",
        "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n",
        "add rule ip kube-proxy nat-output jump services\n",
        "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n",
        "add rule ip kube-proxy nat-postrouting jump masquerading\n",
    ));
    for (i, s) in svcs.iter().enumerate() {
        for b in &s.backends {
            nft_ep(i, *b, &mut o);
        }
        let _ = writeln!(o, "add chain ip kube-proxy {}", nft_svc_chain(i));
        nft_svc_rules(i, s, &mut o);
        let _ = writeln!(o, "add element ip kube-proxy cluster-ips {{ {} }}", s.vip);
        let _ = writeln!(o, "add element ip kube-proxy service-ips {{ {} . tcp . {VIP_PORT} : goto {} }}", s.vip, nft_svc_chain(i));
    }
    o
}

/// kube-proxy's nftables sync after one service's endpoints changed: its chain
/// flushed and refilled, the stale endpoint chain deleted (one transaction).
fn nft_change(svcs: &[Svc], i: usize, old: &Svc) -> String {
    let mut o = format!("flush chain ip kube-proxy {}\n", nft_svc_chain(i));
    for b in svcs[i].backends.iter().filter(|b| !old.backends.contains(b)) {
        nft_ep(i, *b, &mut o);
    }
    nft_svc_rules(i, &svcs[i], &mut o);
    for b in old.backends.iter().filter(|b| !svcs[i].backends.contains(b)) {
        o.push_str(&format!("delete chain ip kube-proxy {}\n", nft_ep_chain(i, *b)));
    }
    o
}

// ---------------------------------------------------------------- baseline plumbing

struct Baseline {
    node: String,
    client: PathBuf,
    client_ip: Ipv4Addr,
}

/// veth pair `a` (in `ns_a`) ↔ `b` (in `ns_b`), both up.
fn veth(ns_a: &str, a: &str, ns_b: &str, b: &str) {
    sh(&["ip", "-n", ns_a, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b]);
    sh(&["ip", "-n", ns_a, "link", "set", a, "up"]);
    sh(&["ip", "-n", ns_b, "link", "set", b, "up"]);
}

fn baseline(nss: &mut Netns, prefix: &str, tag: &str, k: u8, backends: &[(String, Ipv4Addr)]) -> Baseline {
    let node = format!("{prefix}-{tag}");
    let client_ns = format!("{prefix}-{tag}-c");
    nss.add(&node);
    let client = nss.add(&client_ns);
    let client_ip = Ipv4Addr::new(10, 244, 200 + k, 2);
    let cip = client_ip.to_string();
    sh(&["ip", "netns", "exec", &node, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    sh(&["ip", "-n", &node, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", &client_ns, "link", "set", "lo", "up"]);
    veth(&node, "c0", &client_ns, "eth0");
    sh(&["ip", "-n", &node, "addr", "add", "169.254.1.1/32", "dev", "c0"]);
    sh(&["ip", "-n", &node, "route", "add", &format!("{cip}/32"), "dev", "c0"]);
    sh(&["ip", "-n", &client_ns, "addr", "add", &format!("{cip}/32"), "dev", "eth0"]);
    sh(&["ip", "-n", &client_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink"]);
    for (j, (bns, bip)) in backends.iter().enumerate() {
        let host = format!("b{j}");
        let pod_if = format!("n{tag}");
        veth(&node, &host, bns, &pod_if);
        sh(&["ip", "-n", &node, "addr", "add", "169.254.1.1/32", "dev", &host]);
        sh(&["ip", "-n", &node, "route", "add", &format!("{bip}/32"), "dev", &host]);
        sh(&["ip", "-n", bns, "addr", "add", &format!("{bip}/32"), "dev", &pod_if]);
        sh(&["ip", "-n", bns, "route", "add", &format!("{cip}/32"), "via", "169.254.1.1", "dev", &pod_if, "onlink"]);
    }
    Baseline { node, client, client_ip }
}

// ---------------------------------------------------------------- backends and client

#[derive(Default)]
struct Lat {
    crr: Vec<f64>,
    rr: Vec<f64>,
    errors: usize,
}

impl Lat {
    fn p(&self, rr: bool, q: f64) -> f64 {
        let mut v = if rr { self.rr.clone() } else { self.crr.clone() };
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        percentile(&v, q)
    }
}

fn one_rr(s: &mut TcpStream, buf: &mut [u8; MSG]) -> std::io::Result<()> {
    s.write_all(&buf[..])?;
    s.read_exact(&mut buf[..])
}

/// The client (same code for every variant), run inside `ns`: `crr` connections
/// (connect + request/response + close) and `rr` transactions on RR_CONNS kept
/// connections; each connection to a target picked at random. Latencies in µs.
/// Where a connection goes: a random service's VIP, or (direct) one of a random service's backends.
enum Targets {
    Vip(Vec<SocketAddr>),
    Direct(Vec<Vec<SocketAddr>>),
}

impl Targets {
    fn pick(&self, r: &mut Rng) -> SocketAddr {
        match self {
            Targets::Vip(v) => v[r.below(v.len())],
            Targets::Direct(v) => {
                let s = &v[r.below(v.len())];
                s[r.below(s.len())]
            }
        }
    }
}

fn measure(ns: &Path, t: &Targets, crr: usize, rr: usize, seed: u64) -> Lat {
    let targets = |r: &mut Rng| t.pick(r);
    fjord_net::netns::run_in(ns, || {
        let mut rng = Rng(seed | 1);
        let mut lat = Lat::default();
        let mut buf = [7u8; MSG];
        let conn = |a: SocketAddr| -> std::io::Result<TcpStream> {
            let s = TcpStream::connect_timeout(&a, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        };
        // warm-up (ARP, caches)
        for _ in 0..(crr / 10).max(5) {
            if let Ok(mut s) = conn(targets(&mut rng)) {
                let _ = one_rr(&mut s, &mut buf);
            }
        }
        for _ in 0..crr {
            let a = targets(&mut rng);
            let t = Instant::now();
            match conn(a).and_then(|mut s| one_rr(&mut s, &mut buf)) {
                Ok(()) => lat.crr.push(t.elapsed().as_secs_f64() * 1e6),
                Err(_) => lat.errors += 1,
            }
        }
        let mut conns: Vec<TcpStream> = (0..RR_CONNS).filter_map(|_| conn(targets(&mut rng)).ok()).collect();
        lat.errors += RR_CONNS - conns.len();
        if !conns.is_empty() {
            for _ in 0..rr {
                let k = rng.below(conns.len());
                let t = Instant::now();
                match one_rr(&mut conns[k], &mut buf) {
                    Ok(()) => lat.rr.push(t.elapsed().as_secs_f64() * 1e6),
                    Err(_) => lat.errors += 1,
                }
            }
        }
        lat
    })
    .unwrap()
}

/// [`measure`] in a child process (this bench binary again, `FJBN_CHILD=1`), which first joins
/// the cgroup `cg` if given: cgroup membership is per process, and only the socket-LB variant's
/// client may be in the pods cgroup. Every variant's client runs this way, so all rows are
/// measured from the same kind of process.
fn measure_in_child(cg: Option<&Path>, ns: &Path, t: &Targets, crr: usize, rr: usize, seed: u64) -> Lat {
    let cg = cg.map(|c| c.display().to_string()).unwrap_or_else(|| "-".into());
    let mut input = format!("{cg}\n{}\n{crr} {rr} {seed}\n", ns.display());
    match t {
        Targets::Vip(v) => {
            for a in v {
                input.push_str(&format!("{a}\n"));
            }
        }
        Targets::Direct(v) => {
            for set in v {
                let s: Vec<String> = set.iter().map(|a| a.to_string()).collect();
                input.push_str(&format!("d {}\n", s.join(" ")));
            }
        }
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("FJBN_CHILD", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the socket-LB client");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "client process failed");
    let mut lat = Lat::default();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        match l.split_once(' ') {
            Some(("crr", x)) => lat.crr.push(x.parse().unwrap()),
            Some(("rr", x)) => lat.rr.push(x.parse().unwrap()),
            Some(("errors", x)) => lat.errors += x.parse::<usize>().unwrap(),
            _ => {}
        }
    }
    lat
}

/// The child side of [`measure_in_child`].
fn child_main() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).unwrap();
    let mut lines = input.lines();
    let (cg, ns) = (lines.next().unwrap(), lines.next().unwrap());
    let p: Vec<u64> = lines.next().unwrap().split(' ').map(|x| x.parse().unwrap()).collect();
    let lines: Vec<&str> = lines.collect();
    let targets = if lines.first().is_some_and(|l| l.starts_with("d ")) {
        Targets::Direct(lines.iter().map(|l| l[2..].split(' ').map(|a| a.parse().unwrap()).collect()).collect())
    } else {
        Targets::Vip(lines.iter().map(|l| l.parse().unwrap()).collect())
    };
    if cg != "-" {
        std::fs::write(Path::new(cg).join("cgroup.procs"), std::process::id().to_string()).expect("join the pods cgroup");
    }
    let lat = measure(Path::new(ns), &targets, p[0] as usize, p[1] as usize, p[2]);
    let mut o = String::new();
    for x in &lat.crr {
        o.push_str(&format!("crr {x}\n"));
    }
    for x in &lat.rr {
        o.push_str(&format!("rr {x}\n"));
    }
    o.push_str(&format!("errors {}\n", lat.errors));
    std::io::stdout().write_all(o.as_bytes()).unwrap();
}

// ---------------------------------------------------------------- fjord side

fn manifest(svcs: &[Svc], range: std::ops::Range<usize>, ready: &dyn Fn(usize, usize) -> bool) -> String {
    use std::fmt::Write;
    let mut m = String::new();
    for i in range {
        let s = &svcs[i];
        let _ = write!(
            m,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {}\n  ports: [{{port: {VIP_PORT}, protocol: TCP}}]\n",
            s.vip
        );
        let _ = write!(
            m,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc-{i}}}\naddressType: IPv4\nports: [{{port: {}, protocol: TCP}}]\nendpoints:\n",
            s.backends[0].1
        );
        for (j, b) in s.backends.iter().enumerate() {
            let _ = writeln!(m, "- addresses: [\"{}\"]\n  conditions: {{ready: {}}}", b.0, ready(i, j));
        }
    }
    m
}

/// Peak RSS (VmHWM) of process `pid` in bytes, 0 if unknown.
fn peak_rss_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// User + system CPU seconds of process `pid` so far (/proc/PID/stat).
fn cpu_seconds_of(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name (which may hold spaces) end at its ')'
    let f: Vec<&str> = s.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; the first after the ")" is field 3
    (ticks(11) + ticks(12)) / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (percentile(v, 50.0), percentile(v, 99.0))
}

fn main() {
    if std::env::var_os("FJBN_CHILD").is_some() {
        return child_main();
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let nmax = if smoke { 20 } else { env("FJORD_BENCH_SERVICES", 10000).clamp(1, 10000) };
    let sizes: Vec<usize> = if smoke { vec![20, 1] } else { [nmax, 1000.min(nmax), 1].into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().rev().collect() };
    let crr = if smoke { 30 } else { env("FJORD_BENCH_CRR", 2000).min(20000) };
    let rr = if smoke { 60 } else { env("FJORD_BENCH_RR", 5000).min(50000) };
    let changes = if smoke { 2 } else { 20 };
    let servers = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(run(&servers, nmax, sizes, crr, rr, changes, smoke));
}

struct Row {
    variant: &'static str,
    n: usize,
    lat: Lat,
}

async fn run(servers: &tokio::runtime::Runtime, nmax: usize, sizes: Vec<usize>, crr: usize, rr: usize, changes: usize, smoke: bool) {
    let ports = nmax.min(1000);
    let prefix = format!("fjbn-{}", std::process::id());
    // ---- fjord: one-node dev cluster with the real agent ----
    let max_services = (nmax + 64).max(1024).to_string();
    // the service datapath alone: no in-agent Gateway API controller (it would cache all 10,000
    // services and slices too)
    // `cluster up --socket-lb-pods`: processes in the node's pods cgroup get the socket LB; the
    // bench's own threads are not in it, so the other fjord rows use the tc programs
    let mut c = TestCluster::up_opts(1, "embedded", "native", vec!["--max-services".into(), max_services, "--no-gateway".into()], true).await;
    let pods_cg = fjordctl::cluster::pods_cgroup(&c.node().dir, &c.node().name).expect("cgroup v2");
    let mut nss = Netns(vec![]);
    let api = c.client();
    let agent_pid = c.node().agent_pid.unwrap();
    let mut fj_backends = vec![];
    for j in 0..3 {
        let p = pod::add(&c.state, None, &format!("bench/backend{j}"), BTreeMap::new()).await.expect("backend pod");
        echo_servers(servers.handle(), &pod_netns(&p), BASE_PORT..BASE_PORT + ports as u16);
        fj_backends.push(p.ip.unwrap());
    }
    let fj_client = pod::add(&c.state, None, "bench/client", BTreeMap::new()).await.expect("client pod");
    let fj_client_ns = pod_netns(&fj_client);
    // "direct, fjord node" gets a client pod of its own: every variant's client namespace then
    // holds only its own connections (TIME_WAIT sockets, ephemeral ports), as the baselines' do
    let fj_direct_client = pod::add(&c.state, None, "bench/client-direct", BTreeMap::new()).await.expect("second client pod");
    let fj_direct_client_ns = pod_netns(&fj_direct_client);
    let fj_sock_client = pod::add(&c.state, None, "bench/client-sock", BTreeMap::new()).await.expect("socket-LB client pod");
    let fj_sock_client_ns = pod_netns(&fj_sock_client);
    let fj_svcs = services(nmax, ports, &fj_backends);

    // ---- baselines: shared backend pods, one node namespace per layout ----
    let mut bl_backends = vec![];
    for j in 0..3u8 {
        let name = format!("{prefix}-b{j}");
        let ns = nss.add(&name);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        echo_servers(servers.handle(), &ns, BASE_PORT..BASE_PORT + ports as u16);
        bl_backends.push((name, Ipv4Addr::new(10, 244, 250, 10 + j)));
    }
    let ipt = baseline(&mut nss, &prefix, "ipt", 1, &bl_backends);
    let nft = baseline(&mut nss, &prefix, "nft", 2, &bl_backends);
    let dir = baseline(&mut nss, &prefix, "dir", 3, &bl_backends);
    let bl_ips: Vec<Ipv4Addr> = bl_backends.iter().map(|b| b.1).collect();
    let bl_svcs = services(nmax, ports, &bl_ips);
    let _ = (ipt.client_ip, nft.client_ip, dir.client_ip);

    // ---- programming: nmax services × 3 backends ----
    println!("fjord services benchmark: {} | iptables: {} | nft: {}", if smoke { "SMOKE (tiny sizes; numbers meaningless)" } else { "full" }, sh(&["iptables", "-V"]).trim(), sh(&["nft", "-v"]).trim());
    println!("services × 3 backends; backends are echo servers on {ports} ports of 3 pods (3×{ports} distinct backend addresses); Maglev: each frontend's 509-slot compact table in its service entry (≤ 8 backends; M = 16381 tables only for more or sessionAffinity)");
    let m0 = api.metrics().await.unwrap();
    let sum0 = metric(&m0, "fjord_service_event_to_datapath_seconds_sum").unwrap_or(0.0);
    let cnt0 = metric(&m0, "fjord_service_event_to_datapath_seconds_count").unwrap_or(0.0);
    let t_all = Instant::now();
    let mut t_api = Duration::ZERO;
    const APPLY_CHUNK: usize = 1000; // the API takes bodies up to 2 MB
    for start in (0..nmax).step_by(APPLY_CHUNK) {
        let m = manifest(&fj_svcs, start..(start + APPLY_CHUNK).min(nmax), &|_, _| true);
        let t = Instant::now();
        api.apply(&m).await.expect("apply services");
        t_api += t.elapsed();
    }
    let applied = t_all.elapsed();
    let programmed = wait_frontends(&api, nmax, Duration::from_secs(300)).await.expect("agent programmed every service");
    let t_fj_total = t_all.elapsed();
    let _ = programmed;
    let m1 = api.metrics().await.unwrap();
    let fj_sync_sum = metric(&m1, "fjord_service_event_to_datapath_seconds_sum").unwrap_or(0.0) - sum0;
    let fj_sync_cnt = metric(&m1, "fjord_service_event_to_datapath_seconds_count").unwrap_or(0.0) - cnt0;
    let rss_fj_at_once = rss_of(agent_pid).unwrap();
    // settled: after the sync the agent trims its heap (malloc_trim) and tops up its spare
    // tables; then RSS is what a node carries with 10,000 services
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_fj = rss_of(agent_pid).unwrap();
    let hwm_fj = peak_rss_of(agent_pid);

    let t_ipt = in_ns_with_input(&ipt.node, &["iptables-restore", "--noflush"], iptables_layout(&bl_svcs).as_bytes());
    let t_nft = in_ns_with_input(&nft.node, &["nft", "-f", "-"], nft_layout(&bl_svcs).as_bytes());

    // ---- one backend of one service changes ----
    let mut fj_change = vec![];
    let mut fj_change_wall = vec![];
    let key = format!("{}:{VIP_PORT}/TCP", fj_svcs[0].vip);
    for k in 0..changes {
        let ready = k % 2 == 1; // backend 2 of service 0: not ready, ready, …
        let m = manifest(&fj_svcs, 0..1, &|_, j| j != 2 || ready);
        let want = if ready { 3 } else { 2 };
        let t = Instant::now();
        api.apply(&m).await.unwrap();
        let rev = api.status().await.unwrap().store.revision as f64;
        loop {
            let m = api.metrics().await.unwrap();
            if metric(&m, "fjord_service_synced_revision").unwrap_or(0.0) >= rev {
                fj_change_wall.push(t.elapsed().as_secs_f64() * 1000.0);
                fj_change.push(metric(&m, "fjord_service_last_event_to_datapath_seconds").unwrap() * 1000.0);
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "change never reached the datapath");
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        let f = api.datapath_frontends().await.unwrap();
        assert_eq!(f.get(&key).map(|b| b.len()), Some(want), "the datapath holds the change");
    }
    let mut ipt_change = vec![];
    let mut nft_change_t = vec![];
    let mut cur = bl_svcs.clone();
    for k in 0..changes.min(6) {
        let old = cur[0].clone();
        cur[0].backends = if k % 2 == 0 { bl_svcs[0].backends[..2].to_vec() } else { bl_svcs[0].backends.clone() };
        ipt_change.push(in_ns_with_input(&ipt.node, &["iptables-restore", "--noflush"], iptables_change(&cur, 0, &old).as_bytes()).as_secs_f64() * 1000.0);
        nft_change_t.push(in_ns_with_input(&nft.node, &["nft", "-f", "-"], nft_change(&cur, 0, &old).as_bytes()).as_secs_f64() * 1000.0);
    }
    // leave every service with its 3 backends
    if cur[0].backends.len() != 3 {
        let old = cur[0].clone();
        cur[0].backends = bl_svcs[0].backends.clone();
        in_ns_with_input(&ipt.node, &["iptables-restore", "--noflush"], iptables_change(&cur, 0, &old).as_bytes());
        in_ns_with_input(&nft.node, &["nft", "-f", "-"], nft_change(&cur, 0, &old).as_bytes());
    }
    if changes % 2 == 1 {
        api.apply(&manifest(&fj_svcs, 0..1, &|_, _| true)).await.unwrap();
    }

    // ---- agent restarts with every service in the store: warm (pinned maps kept, the
    //      agent reconciles) and cold (fresh maps: every table built and written) ----
    let pin_dir = fjordctl::cluster::bpf_pin_dir(&c.node().dir, &c.node().name);
    let mut restarts: Vec<(&str, f64, f64)> = vec![];
    for (label, fresh) in [("warm (pinned maps kept)", false), ("cold (fresh maps)", true)] {
        c.kill_agent(0).await;
        if fresh {
            // the agent is stopped: it starts again on fresh maps
            fjord_datapath::remove_pins(&pin_dir).expect("remove the node's pins");
        }
        let t = Instant::now();
        c.restart_agent(0).await;
        wait_frontends(&api, nmax, Duration::from_secs(300)).await.expect("restarted agent programmed every service");
        let rev = api.status().await.unwrap().store.revision as f64;
        let m = loop {
            let m = api.metrics().await.unwrap();
            if metric(&m, "fjord_service_synced_revision").unwrap_or(0.0) >= rev {
                break m;
            }
            assert!(t.elapsed() < Duration::from_secs(300), "restarted agent never synced");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        // the first sync of the new process: store list → translate → maps
        let first = metric(&m, "fjord_service_event_to_datapath_seconds_sum").unwrap_or(f64::NAN);
        restarts.push((label, t.elapsed().as_secs_f64() * 1000.0, first * 1000.0));
    }
    let agent_pid = c.node().agent_pid.unwrap();
    let agent_cpu0 = cpu_seconds_of(agent_pid);
    let sock_events = |m: &str| -> f64 {
        m.lines().filter(|l| l.starts_with("fjord_datapath_events{") && l.contains("event=\"sock_lb\"")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    let sock0 = sock_events(&api.metrics().await.unwrap());
    let mut agent_busy: Vec<(usize, f64, f64)> = vec![];
    let t_lat = Instant::now();

    // ---- latency at each size (descending: services are deleted between sizes) ----
    let mut rows: Vec<Row> = vec![];
    let mut installed = nmax;
    let mut seed = 0x9e3779b97f4a7c15u64;
    for &n in &sizes {
        if n < installed {
            for start in (n..installed).step_by(APPLY_CHUNK) {
                let del = manifest(&fj_svcs, start..(start + APPLY_CHUNK).min(installed), &|_, _| true);
                api.delete_objects(&del).await.expect("delete services");
            }
            wait_frontends(&api, n, Duration::from_secs(300)).await.expect("agent removed the services");
            sh(&["ip", "netns", "exec", &ipt.node, "iptables", "-t", "nat", "-F"]);
            sh(&["ip", "netns", "exec", &ipt.node, "iptables", "-t", "nat", "-X"]);
            sh(&["ip", "netns", "exec", &ipt.node, "iptables", "-F"]);
            sh(&["ip", "netns", "exec", &ipt.node, "iptables", "-X"]);
            in_ns_with_input(&ipt.node, &["iptables-restore", "--noflush"], iptables_layout(&bl_svcs[..n]).as_bytes());
            sh(&["ip", "netns", "exec", &nft.node, "nft", "delete", "table", "ip", "kube-proxy"]);
            in_ns_with_input(&nft.node, &["nft", "-f", "-"], nft_layout(&bl_svcs[..n]).as_bytes());
            installed = n;
        }
        let vips = |svcs: &[Svc]| Targets::Vip(svcs[..n].iter().map(|s| SocketAddr::new(s.vip.into(), VIP_PORT)).collect());
        let direct = |svcs: &[Svc]| Targets::Direct(svcs[..n].iter().map(|s| s.backends.iter().map(|b| SocketAddr::new(b.0.into(), b.1)).collect()).collect());
        // (row, client namespace, targets, client in the pods cgroup)
        let variants: [(&'static str, &Path, Targets, bool); 6] = [
            (FJ_TC, &fj_client_ns, vips(&fj_svcs), false),
            (FJ_SOCK, &fj_sock_client_ns, vips(&fj_svcs), true),
            ("iptables (kube-proxy)", &ipt.client, vips(&bl_svcs), false),
            ("nftables (kube-proxy)", &nft.client, vips(&bl_svcs), false),
            ("direct pod IP", &dir.client, direct(&bl_svcs), false),
            ("direct, fjord node", &fj_direct_client_ns, direct(&fj_svcs), false),
        ];
        // Interleaved: ROUNDS rounds, each measuring every variant with 1/ROUNDS of the
        // connections, in a rotated order, so that the shared machine's drift over the
        // minutes a size takes falls on every variant alike instead of on whichever ran last.
        let mut lats: Vec<Lat> = variants.iter().map(|_| Lat::default()).collect();
        let (cpu0, t0) = (cpu_seconds_of(agent_pid), Instant::now());
        for r in 0..ROUNDS {
            for k in 0..variants.len() {
                let v = (k + r) % variants.len();
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                let (_, ns, targets, in_cg) = &variants[v];
                let cg = in_cg.then_some(pods_cg.as_path());
                let l = measure_in_child(cg, ns, targets, crr.div_ceil(ROUNDS), rr.div_ceil(ROUNDS), seed);
                lats[v].crr.extend(l.crr);
                lats[v].rr.extend(l.rr);
                lats[v].errors += l.errors;
            }
        }
        agent_busy.push((n, cpu_seconds_of(agent_pid) - cpu0, t0.elapsed().as_secs_f64()));
        for ((variant, ..), lat) in variants.into_iter().zip(lats) {
            rows.push(Row { variant, n, lat });
        }
    }
    let rss_end = rss_of(agent_pid).unwrap();
    // the socket-LB rows really went through the cgroup hooks (and only they: the tc rows'
    // clients are outside the pods cgroup)
    let sock_conns: usize = rows.iter().filter(|r| r.variant == FJ_SOCK).map(|r| r.lat.crr.len()).sum();
    let sock_lb = sock_events(&api.metrics().await.unwrap()) - sock0;
    assert!(sock_lb >= sock_conns as f64, "socket-LB rows: {sock_lb} translations for {sock_conns} measured connections");
    let (agent_cpu, lat_wall) = (cpu_seconds_of(agent_pid) - agent_cpu0, t_lat.elapsed().as_secs_f64());

    // ---- report ----
    println!();
    println!("latency, µs: TCP_CRR = connect + {MSG} B request/response + close ({crr} per row), TCP_RR = {MSG} B request/response on {RR_CONNS} kept connections ({rr} per row); target service random per connection; rows measured in {ROUNDS} interleaved rounds");
    println!("{:<24} {:>8}  {:>10} {:>10}  {:>10} {:>10}  {:>6}", "variant", "services", "CRR p50", "CRR p99", "RR p50", "RR p99", "errors");
    for r in &rows {
        println!(
            "{:<24} {:>8}  {:>10.1} {:>10.1}  {:>10.1} {:>10.1}  {:>6}",
            r.variant,
            r.n,
            r.lat.p(false, 50.0),
            r.lat.p(false, 99.0),
            r.lat.p(true, 50.0),
            r.lat.p(true, 99.0),
            r.lat.errors
        );
    }
    println!("the agent used {:.2} s of CPU during the {lat_wall:.0} s of latency measurement (deletes between sizes included)", agent_cpu);
    for (n, cpu, wall) in &agent_busy {
        println!("  while the {n}-service rows were measured: {cpu:.2} s of CPU in {wall:.1} s");
    }
    let get = |v: &str, n: usize| rows.iter().find(|r| r.variant == v && r.n == n).map(|r| &r.lat).unwrap();
    let (big, small) = (sizes[0], *sizes.last().unwrap());
    let d_big = get("direct pod IP", big);
    let d_small = get("direct pod IP", small);
    for fjv in [FJ_TC, FJ_SOCK] {
        let fj = get(fjv, big);
        println!();
        println!("ratios of {fjv} at {big} services (> 1 means fjord is slower):");
        let ratio = |name: &str, other: &Lat| {
            println!(
                "  fjord@{big} / {name:<22} CRR p50 {:.3}  p99 {:.3}   RR p50 {:.3}  p99 {:.3}",
                fj.p(false, 50.0) / other.p(false, 50.0),
                fj.p(false, 99.0) / other.p(false, 99.0),
                fj.p(true, 50.0) / other.p(true, 50.0),
                fj.p(true, 99.0) / other.p(true, 99.0)
            );
        };
        let fj_small = get(fjv, small);
        ratio(&format!("fjord@{small}"), fj_small);
        ratio(&format!("direct@{big}"), d_big);
        ratio(&format!("direct (fjord node)@{big}"), get("direct, fjord node", big));
        ratio(&format!("iptables@{big}"), get("iptables (kube-proxy)", big));
        ratio(&format!("nftables@{big}"), get("nftables (kube-proxy)", big));
        // sizes are measured minutes apart on a shared machine: direct pod IP in the same phase
        // shows how much the machine itself (and the backends' side) changed between them
        println!(
            "  drift-corrected fjord@{big} / fjord@{small} = (fjord/direct)@{big} / (fjord/direct)@{small}: CRR p50 {:.3}  RR p50 {:.3}",
            (fj.p(false, 50.0) / d_big.p(false, 50.0)) / (fj_small.p(false, 50.0) / d_small.p(false, 50.0)),
            (fj.p(true, 50.0) / d_big.p(true, 50.0)) / (fj_small.p(true, 50.0) / d_small.p(true, 50.0))
        );
    }

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("programming {nmax} services × 3 backends:");
    println!(
        "  fjord: store → maps (agent, sum of its {fj_sync_cnt:.0} syncs from receiving the watch events to the maps holding them) {:.0} ms; \
         wall from the first apply to all frontends in the maps {:.0} ms (of which API apply in chunks of {APPLY_CHUNK}: {:.0} ms, last apply returned at {:.0} ms)",
        fj_sync_sum * 1000.0,
        ms(t_fj_total),
        ms(t_api),
        ms(applied)
    );
    for (label, wall, first) in &restarts {
        println!("  fjord agent restart, {label}: initial sync (store list → Maglev → maps) {first:.0} ms; kill → restart → all {nmax} frontends in the maps {wall:.0} ms");
    }
    println!("  iptables: one iptables-restore {:.0} ms", ms(t_ipt));
    println!("  nftables: one nft -f {:.0} ms", ms(t_nft));
    let (c50, c99) = stats(&mut fj_change);
    let (w50, w99) = stats(&mut fj_change_wall);
    let (i50, i99) = stats(&mut ipt_change);
    let (n50, n99) = stats(&mut nft_change_t);
    println!("one backend of one service changes (with {nmax} services):");
    println!("  fjord: agent receives the change → maps updated: p50 {c50:.2} ms  p99 {c99:.2} ms ({} changes); apply call → datapath shows it (API + store + agent): p50 {w50:.2} ms  p99 {w99:.2} ms", fj_change.len());
    println!("  iptables: partial restore (KUBE-SERVICES + changed chains, --noflush): p50 {i50:.1} ms  p99 {i99:.1} ms ({} changes)", ipt_change.len());
    println!("  nftables: one transaction (flush + refill the service chain): p50 {n50:.1} ms  p99 {n99:.1} ms");
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "agent RSS: {:.1} MiB with {nmax} services programmed (1 s after the install; {:.1} MiB the moment the last frontend was in the maps; peak so far {:.1} MiB), {:.1} MiB at the end",
        mib(rss_fj),
        mib(rss_fj_at_once),
        mib(hwm_fj),
        mib(rss_end)
    );
    if !smoke {
        let t = |ok: bool| if ok { "MET" } else { "MISSED" };
        let d = get("direct pod IP", big);
        let ip = get("iptables (kube-proxy)", big);
        for fjv in [FJ_TC, FJ_SOCK] {
            let (fj, fj1) = (get(fjv, big), get(fjv, small));
            println!(
                "targets, {fjv} (CRR p50): fjord@{big} within 10% of fjord@{small}: {}; within 15% of direct: {}; ≥ 2× better than iptables@{big}: {}",
                t(fj.p(false, 50.0) <= 1.10 * fj1.p(false, 50.0)),
                t(fj.p(false, 50.0) <= 1.15 * d.p(false, 50.0)),
                t(ip.p(false, 50.0) >= 2.0 * fj.p(false, 50.0))
            );
        }
        println!(
            "targets: {nmax} services programmed < 1 s (store → maps, cold agent start): {} (applied through the API in chunks, sum of the agent's syncs: {}); one change < 10 ms (p99): {}; RSS < 100 MiB: {}",
            t(restarts.iter().find(|r| r.0.starts_with("cold")).is_some_and(|r| r.2 < 1000.0)),
            t(fj_sync_sum < 1.0),
            t(c99 < 10.0),
            t(mib(rss_fj) < 100.0)
        );
    }
    drop(nss);
    drop(c);
}
