//! Test harness: network namespaces built exactly like fjord plumbs pods,
//! servers/clients running on threads that setns(2) into them, and guards
//! that remove everything on drop (also on panic). Everything is named with
//! the prefix `fjtdp-<pid>-<n>` so parallel runs never collide.
#![allow(dead_code)]
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use fjord_datapath::{Datapath, DatapathConfig};

static LOCK: Mutex<()> = Mutex::new(());
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Serializes kernel-touching tests: a process-wide mutex plus a file lock
/// (other test binaries of this crate).
pub struct KernelLock {
    _g: MutexGuard<'static, ()>,
    _f: File,
}

pub fn kernel_lock() -> KernelLock {
    let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let f = File::create("/tmp/fjtdp-tests.lock").expect("create lock file");
    // SAFETY: flock on a valid fd.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0, "flock");
    KernelLock { _g: g, _f: f }
}

pub fn unique(tag: &str) -> String {
    format!("fjtdp-{}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst), tag)
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Moves the calling thread into netns `name` (only use on threads you own).
pub fn enter(name: &str) {
    let f = File::open(format!("/var/run/netns/{name}")).expect("open netns");
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Runs `f` on a fresh thread inside netns `name` and returns its result.
pub fn in_netns<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name);
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub veth: String,
}

/// A node netns with pods plumbed the fjord way: pod eth0 has ip/32, routes
/// `10.244.1.1 dev eth0 scope link` + `default via 10.244.1.1`; the host-side
/// veth carries 10.244.1.1/32 and the node has `ip/32 dev <veth> scope link`.
pub struct Topo {
    pub pods: Vec<Pod>,
    pub node: Netns,
}

impl Topo {
    pub fn new(npods: usize) -> Self {
        let node = Netns::new(unique("node"));
        sh(&["ip", "netns", "exec", &node.name, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let tag = COUNTER.fetch_add(1, Ordering::SeqCst) as u32;
        let mut pods = Vec::new();
        for i in 0..npods {
            let ns = Netns::new(unique(&format!("p{i}")));
            let ip = Ipv4Addr::new(10, 244, 1, 5 + i as u8);
            let veth = format!("fj{:06x}{:02x}", (std::process::id() ^ (tag << 12)) & 0xffffff, i);
            let ips = ip.to_string();
            sh(&["ip", "-n", &node.name, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
            sh(&["ip", "-n", &node.name, "addr", "add", "10.244.1.1/32", "dev", &veth]);
            sh(&["ip", "-n", &node.name, "link", "set", &veth, "up"]);
            sh(&["ip", "-n", &ns.name, "addr", "add", &format!("{ips}/32"), "dev", "eth0"]);
            sh(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns.name, "route", "add", "10.244.1.1", "dev", "eth0", "scope", "link"]);
            sh(&["ip", "-n", &ns.name, "route", "add", "default", "via", "10.244.1.1", "dev", "eth0"]);
            sh(&["ip", "-n", &node.name, "route", "add", &format!("{ips}/32"), "dev", &veth, "scope", "link"]);
            pods.push(Pod { ns, ip, veth });
        }
        Topo { pods, node }
    }
}

/// A bpffs pin dir for one test's datapath, removed on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> Self {
        fjord_datapath::ensure_bpffs(std::path::Path::new("/sys/fs/bpf")).expect("bpffs");
        PinDir(PathBuf::from("/sys/fs/bpf").join(unique("pins")))
    }
    pub fn config(&self) -> DatapathConfig {
        DatapathConfig { maglev_size: 1021, max_services: 64, max_backends: 256, ct_entries: 65536, ..DatapathConfig::for_node("test").with_pin_dir(self.0.clone()) }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fjord_datapath::remove_pins(&self.0);
    }
}

pub fn attach_all(dp: &mut Datapath, topo: &Topo) {
    let node = topo.node.name.clone();
    let veths: Vec<String> = topo.pods.iter().map(|p| p.veth.clone()).collect();
    in_netns(&node, || {
        for v in &veths {
            dp.attach(v).unwrap_or_else(|e| panic!("attach {v}: {e}"));
        }
    });
}

/// Servers running inside a pod netns; stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// In netns `ns`: a TCP server on `tcp_port` answering each line with
/// "<name> <line>", and a UDP server on `udp_port` answering each datagram
/// with "<name> <payload>".
pub fn spawn_servers(ns: &str, name: &str, tcp_port: u16, udp_port: u16) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    {
        let (ns, name, stop, tx) = (ns.to_string(), name.to_string(), stop.clone(), tx.clone());
        handles.push(std::thread::spawn(move || {
            enter(&ns);
            let l = TcpListener::bind(("0.0.0.0", tcp_port)).expect("bind tcp");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let mut conns = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (name, stop) = (name.clone(), stop.clone());
                        conns.push(std::thread::spawn(move || {
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                            let mut w = s.try_clone().unwrap();
                            let mut r = BufReader::new(s);
                            let mut line = String::new();
                            loop {
                                match r.read_line(&mut line) {
                                    Ok(0) => return,
                                    Ok(_) => {
                                        if w.write_all(format!("{name} {}", line).as_bytes()).is_err() {
                                            return;
                                        }
                                        line.clear();
                                    }
                                    Err(_) if !stop.load(Ordering::SeqCst) => continue,
                                    Err(_) => return,
                                }
                            }
                        }));
                        conns.retain(|h: &JoinHandle<()>| !h.is_finished());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => panic!("accept: {e}"),
                }
            }
            for h in conns {
                let _ = h.join();
            }
        }));
    }
    {
        let (ns, name, stop, tx) = (ns.to_string(), name.to_string(), stop.clone(), tx.clone());
        handles.push(std::thread::spawn(move || {
            enter(&ns);
            let u = UdpSocket::bind(("0.0.0.0", udp_port)).expect("bind udp");
            u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    let reply = format!("{name} {}", String::from_utf8_lossy(&buf[..n]));
                    let _ = u.send_to(reply.as_bytes(), from);
                }
            }
        }));
    }
    rx.recv().unwrap();
    rx.recv().unwrap();
    Servers { stop, handles }
}

/// One TCP request: connect, send a line, return the name of the answering backend.
pub fn tcp_request(addr: SocketAddr) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = s.try_clone()?;
    w.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.split_whitespace().next().unwrap_or_default().to_string())
}

/// A persistent connection: each `ask` sends a line and returns the answering backend's name.
pub struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Conn { w: s.try_clone()?, r: BufReader::new(s) })
    }
    pub fn local_port(&self) -> u16 {
        self.w.local_addr().map(|a| a.port()).unwrap_or(0)
    }
    pub fn ask(&mut self, msg: &str) -> std::io::Result<String> {
        self.w.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let mut it = line.split_whitespace();
        let name = it.next().unwrap_or_default().to_string();
        assert_eq!(it.next(), Some(msg), "echoed payload");
        Ok(name)
    }
}

/// Checks nothing with this process's prefix is left in `ip netns list`.
pub fn leftover_netns() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("fjtdp-{}-", std::process::id());
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with(&prefix)).map(|s| s.to_string()).collect()
}

/// A cgroup v2 directory created for one test, removed on drop.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn new() -> Self {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .find(|p| std::path::Path::new(&format!("{p}/cgroup.procs")).exists() && is_cgroup2(p))
            .expect("a cgroup v2 mount");
        let p = PathBuf::from(root).join(unique("cg"));
        std::fs::create_dir(&p).expect("create test cgroup");
        Cgroup(p)
    }
}

fn is_cgroup2(p: &str) -> bool {
    nix::sys::statfs::statfs(p).map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC).unwrap_or(false)
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // the processes we put there have exited (we waited for them)
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
