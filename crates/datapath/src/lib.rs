//! fjord-datapath: loads fjord's eBPF kube-proxy replacement (bpf/*.c,
//! compiled by build.rs with clang) with aya 0.14, pins its maps per node
//! under bpffs, attaches the programs and programs services atomically.
//!
//! ```text
//!   let mut dp = Datapath::load(DatapathConfig::for_node("node-a"))?;  // re-uses pinned maps
//!   dp.attach("fj1a2b3c")?;          // pod host veth: tc ingress fjord_from_pod (DNAT),
//!                                    //                tc egress  fjord_to_pod   (reverse NAT)
//!   dp.attach_cgroup(cgroup_path)?;  // optional socket LB for host-network processes
//!   let entries = fjord_lb::translate(&service, &LbConfig { maglev_size: dp.config().maglev_size, .. })?;
//!   dp.upsert_many(&entries)?;       // or upsert(&entry); delete(&key)
//!   dp.map_stats()?; dp.counters()?; // fill levels + datapath counters for metrics/status
//!   dp.detach("fj1a2b3c")?; dp.prune_stale_links()?;
//! ```
//! Attach/detach act on the network namespace of the calling thread (the
//! node netns); map operations work from any thread. Programs stay attached
//! when the process exits (links are pinned); a new `load` + `attach`
//! atomically replaces the programs and keeps every flow (conntrack is pinned).
pub mod layout;

use std::collections::{BTreeMap, HashMap as StdHashMap, HashSet, VecDeque};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::maps::{Array, HashMap, HashOfMaps, Map, MapData, MapError, PerCpuArray};
use aya::programs::links::{FdLink, Link as _, LinkError, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use fjord_lb::{BackendAddr, FrontendEntries, FrontendOptions, ServiceKey};
use thiserror::Error;
use tracing::{debug, info, warn};

use layout::{AffinityKey, AffinityValue, BackendValue, Config, CtKey, CtValue, RevNat, SvcKey, SvcValue, LAYOUT_VERSION, MAGLEV_CHUNK};

/// The compiled eBPF object with the tc programs (bpf/fjord_lb.c).
pub const BPF_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fjord_lb.o"));
/// The compiled socket-LB object (bpf/fjord_sock.c).
pub const BPF_SOCK_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fjord_sock.o"));

pub const MAP_SERVICES: &str = "fjord_services";
pub const MAP_BACKENDS: &str = "fjord_backends";
pub const MAP_MAGLEV: &str = "fjord_maglev";
pub const MAP_REVNAT: &str = "fjord_revnat";
pub const MAP_CT: &str = "fjord_ct";
pub const MAP_CONFIG: &str = "fjord_config";
pub const MAP_STATS: &str = "fjord_stats";
pub const MAP_SOCK_RN: &str = "fjord_sock_rn";
pub const MAP_AFFINITY: &str = "fjord_affinity";
pub const MAP_GONE: &str = "fjord_gone";
pub const MAP_BACKEND_PORTS: &str = "fjord_backend_ports";
pub const MAP_POD_IFS: &str = "fjord_pod_ifs";
/// Words of `fjord_backend_ports` (`FJ_PORT_WORDS`: 65,536 port bits)
const FJ_PORT_WORDS: u32 = 2048;
/// `max_entries` of `fjord_gone` (bpf/fjord_maps.h)
pub const GONE_ENTRIES: u32 = 4096;
/// `max_entries` of `fjord_pod_ifs` (bpf/fjord_maps.h)
pub const POD_IFS_ENTRIES: u32 = 65536;
pub const ALL_MAPS: [&str; 9] =
    [MAP_SERVICES, MAP_BACKENDS, MAP_MAGLEV, MAP_REVNAT, MAP_CT, MAP_CONFIG, MAP_STATS, MAP_SOCK_RN, MAP_AFFINITY];
/// Socket-LB programs (cgroup hooks) in BPF_SOCK_OBJECT.
pub const SOCK_PROGS: [&str; 4] =
    ["fjord_sock_connect4", "fjord_sock_sendmsg4", "fjord_sock_recvmsg4", "fjord_sock_getpeername4"];
pub const PROG_FROM_POD: &str = "fjord_from_pod";
pub const PROG_TO_POD: &str = "fjord_to_pod";
pub const PROG_FROM_NET: &str = "fjord_from_net";
pub const PROG_TO_NET: &str = "fjord_to_net";
/// Every tc program in BPF_OBJECT.
pub const TC_PROGS: [&str; 4] = [PROG_FROM_POD, PROG_TO_POD, PROG_FROM_NET, PROG_TO_NET];
/// Priority and handle of fjord's cls_bpf filters (AttachMode::Tc).
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: u32 = 0xf10d;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_INNER_MAP: u32 = 1 << 12;
/// table_id stored in a service entry without backends (no table).
const NO_TABLE: u32 = 0;
/// Spare outer-map entries beyond max_services (tables are keyed by service id;
/// headroom for leftovers of an interrupted update, cleaned on load).
const SPARE_TABLES: u32 = 16;
/// Frontends prepared at once by upsert_many (each holds up to 2 map fds;
/// each chunk pays one RCU grace period for its table switches).
const BATCH_CHUNK: usize = 1024;

/// Datapath counters (`enum fj_stat` in bpf/fjord.h), summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stat {
    Dnat = 0,
    Revnat = 1,
    CtNew = 2,
    CtHit = 3,
    NoBackend = 4,
    RstSent = 5,
    Reselect = 6,
    Error = 7,
    SockLb = 8,
    IcmpSent = 9,
    CtStale = 10,
    NodePort = 11,
    Snat = 12,
    SnatFail = 13,
    Hairpin = 14,
    Affinity = 15,
    CtExpired = 16,
    SockToTc = 17,
    Gone = 18,
    IcmpErr = 19,
    HostRouted = 20,
}

impl Stat {
    pub const ALL: [Stat; 21] = [
        Stat::Dnat,
        Stat::Revnat,
        Stat::CtNew,
        Stat::CtHit,
        Stat::NoBackend,
        Stat::RstSent,
        Stat::Reselect,
        Stat::Error,
        Stat::SockLb,
        Stat::IcmpSent,
        Stat::CtStale,
        Stat::NodePort,
        Stat::Snat,
        Stat::SnatFail,
        Stat::Hairpin,
        Stat::Affinity,
        Stat::CtExpired,
        Stat::SockToTc,
        Stat::Gone,
        Stat::IcmpErr,
        Stat::HostRouted,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Stat::Dnat => "dnat",
            Stat::Revnat => "revnat",
            Stat::CtNew => "ct_new",
            Stat::CtHit => "ct_hit",
            Stat::NoBackend => "no_backend",
            Stat::RstSent => "rst_sent",
            Stat::Reselect => "reselect",
            Stat::Error => "error",
            Stat::SockLb => "sock_lb",
            Stat::IcmpSent => "icmp_sent",
            Stat::CtStale => "ct_stale",
            Stat::NodePort => "nodeport_new",
            Stat::Snat => "snat_new",
            Stat::SnatFail => "snat_fail",
            Stat::Hairpin => "hairpin_new",
            Stat::Affinity => "affinity_hit",
            Stat::CtExpired => "ct_expired",
            Stat::SockToTc => "sock_to_tc",
            Stat::Gone => "to_deleted_pod",
            Stat::IcmpErr => "icmp_error_nat",
            Stat::HostRouted => "host_routed",
        }
    }
}

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("bpffs at {path}: {source}; fjord needs a BPF filesystem there: run `mount -t bpf bpf /sys/fs/bpf` as root")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("invalid datapath config: {field} = {value}: {hint}")]
    Config { field: &'static str, value: String, hint: String },
    #[error("loading the eBPF object with maps pinned in {pin_dir}: {source} (are you root, is the kernel >= 6.6 with BTF?)")]
    Load { pin_dir: PathBuf, source: Box<aya::EbpfError> },
    #[error(
        "maps pinned in {pin_dir} were created with {field} = {pinned}, but {requested} was requested: \
         start with the same setting, or delete {pin_dir} to recreate the maps (this drops all flows)"
    )]
    PinnedMismatch { pin_dir: PathBuf, field: &'static str, pinned: u64, requested: u64 },
    #[error("eBPF map {map}: {op}: {source}")]
    Map { map: &'static str, op: String, source: Box<MapError> },
    #[error("eBPF program {program} on interface {iface}: {op}: {source}")]
    Program { program: &'static str, iface: String, op: &'static str, source: Box<ProgramError> },
    #[error("eBPF program {program} on interface {iface}: {op}: {source}")]
    Link { program: &'static str, iface: String, op: &'static str, source: Box<LinkError> },
    #[error("link pin {path}: {op}: {source}")]
    LinkPin { path: PathBuf, op: &'static str, source: io::Error },
    #[error("reading the node namespace's cookie (SO_NETNS_COOKIE): {source}; fjord needs Linux >= 5.14")]
    NetnsCookie { source: io::Error },
    #[error("cgroup {path}: {source}; give the path of a cgroup v2 directory (e.g. under /sys/fs/cgroup/unified)")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("interface {iface:?} does not exist in this network namespace: create the pod's veth first")]
    NoSuchInterface { iface: String },
    #[error("interface {iface:?} is not attached by fjord (no pinned links in {dir})")]
    NotAttached { iface: String, dir: PathBuf },
    #[error(
        "service {service} ({key}): its Maglev table has {got} slots but this datapath uses {want}: \
         translate with LbConfig.maglev_size = {want}"
    )]
    TableSize { service: String, key: ServiceKey, got: usize, want: u32 },
    #[error("service {service} ({key}): Maglev slot {slot} points at backend #{index}, but only {count} backends are listed")]
    BadTable { service: String, key: ServiceKey, slot: usize, index: u32, count: usize },
    #[error("service {service} ({key}): backend {backend} has protocol {got}, the frontend {want}")]
    ProtocolMismatch { service: String, key: ServiceKey, backend: BackendAddr, got: fjord_lb::Protocol, want: fjord_lb::Protocol },
    #[error(
        "service {service} ({key}): fjord_services is full ({max} frontends): nothing was changed; \
         raise DatapathConfig.max_services (needs a restart with a new pin dir)"
    )]
    ServicesFull { service: String, key: ServiceKey, max: u32 },
    #[error(
        "service {service} ({key}): needs {needed} new backend entries but fjord_backends has {free} free \
         of {max}: nothing was changed; raise DatapathConfig.max_backends"
    )]
    BackendsFull { service: String, key: ServiceKey, needed: usize, free: usize, max: u32 },
    #[error("service {service}: frontend {key} is listed twice in one batch: list every frontend once")]
    DuplicateInBatch { service: String, key: ServiceKey },
    #[error("service {key} is not programmed in this datapath")]
    NotFound { key: ServiceKey },
    #[error("{op} the Maglev table of {key}: {source}")]
    Table { key: ServiceKey, op: &'static str, source: io::Error },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn map_err(map: &'static str, op: impl Into<String>) -> impl FnOnce(MapError) -> DatapathError {
    let op = op.into();
    move |source| DatapathError::Map { map, op, source: Box::new(source) }
}

/// Sizes and places. All nodes of a cluster must use the same `maglev_size`
/// and `seed` (so a flow picks the same backend on every node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Directory for pinned maps and links, e.g. `/sys/fs/bpf/fjord/<node>`.
    pub pin_dir: PathBuf,
    /// Maglev table size M (prime). Kernel memory: M × 8 bytes (BPF arrays
    /// store 4-byte values in 8-byte slots) rounded up to pages, per frontend
    /// with backends: 128 KiB at M = 16381.
    pub maglev_size: u32,
    /// Capacity of fjord_services / fjord_revnat (frontends = VIP×port×proto).
    pub max_services: u32,
    /// Capacity of fjord_backends (distinct backend ip:port/proto).
    pub max_backends: u32,
    /// Conntrack entries (LRU: when full the oldest flows are evicted). Each
    /// connection uses 2 entries (~100 bytes each incl. overhead).
    pub ct_entries: u32,
    /// How programs are attached to interfaces.
    pub attach: AttachMode,
    /// Conntrack timeouts (seconds without packets), per protocol and TCP state.
    pub timeouts: CtTimeouts,
    /// SNAT source ports (NodePort to remote backends, masquerade), inclusive.
    /// The default lies above the kernel's ephemeral range (32768–60999), so
    /// it never collides with the node's own sockets.
    pub snat_ports: (u16, u16),
    /// Spare Maglev tables kept ready, so a backend change is written into one and
    /// switched in without waiting for an RCU grace period (see `Datapath::maintain`).
    /// Kernel memory: M × 8 bytes each.
    pub table_pool: u32,
    /// Source address of hairpinned flows (a pod reaching itself through a
    /// service sees this as the client). Link-local, like Cilium's 169.254.42.1.
    pub hairpin_ip: std::net::Ipv4Addr,
    /// eBPF host routing (Cilium's "Host Routing: BPF"): packets from a pod to a pod of this
    /// node go from the sender's veth straight into the receiver's namespace
    /// (bpf_redirect_peer) instead of through the node's IP stack. Off: the kernel routes
    /// them ("Legacy").
    pub host_routing: bool,
}

/// Interface attach mechanism for the tc programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// Legacy tc: clsact qdisc + cls_bpf filters in direct-action mode. The
    /// default: attaching costs ~1 ms per program, and filters stay in place
    /// (holding the program) when the agent exits.
    #[default]
    Tc,
    /// TCX links (Linux >= 6.6), pinned under `<pin_dir>/links`. Each link
    /// creation waits for an RCU grace period under rtnl (7–43 ms measured).
    Tcx,
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tc" => Ok(AttachMode::Tc),
            "tcx" => Ok(AttachMode::Tcx),
            _ => Err(format!("unknown attach mode {s:?}: use tc (clsact + cls_bpf) or tcx (TCX links, Linux >= 6.6)")),
        }
    }
}

/// Conntrack timeouts in seconds (Cilium's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP after the SYN, before the backend answered.
    pub tcp_syn: u32,
    /// TCP established.
    pub tcp_established: u32,
    /// TCP after a FIN or RST.
    pub tcp_closing: u32,
    /// UDP (any state).
    pub udp: u32,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        CtTimeouts { tcp_syn: 60, tcp_established: 21600, tcp_closing: 10, udp: 60 }
    }
}

/// The node's addresses as the datapath needs them (NodePort SNAT, local
/// backends, masquerade). Set with [`Datapath::set_node_net`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeNet {
    /// The node's underlay address: source of SNATed NodePort and masqueraded traffic.
    pub node_ip: std::net::Ipv4Addr,
    /// This node's PodCIDR: backends inside it are local.
    pub pod_cidr: (std::net::Ipv4Addr, u8),
    /// The cluster CIDR: pod traffic to destinations outside it is masqueraded.
    pub cluster_cidr: (std::net::Ipv4Addr, u8),
    /// SNAT pod traffic leaving the cluster CIDR through the underlay.
    pub masquerade: bool,
}

impl DatapathConfig {
    /// Defaults for `node`: pins in `/sys/fs/bpf/fjord/<node>`, M = 16381,
    /// 1024 frontends (~128 MiB of Maglev tables when all have backends),
    /// 65536 backends, 262144 conntrack entries (~26 MiB).
    pub fn for_node(node: &str) -> Self {
        DatapathConfig {
            pin_dir: Path::new("/sys/fs/bpf/fjord").join(node),
            maglev_size: fjord_lb::DEFAULT_TABLE_SIZE,
            max_services: 1024,
            max_backends: 65536,
            ct_entries: 262144,
            attach: AttachMode::default(),
            timeouts: CtTimeouts::default(),
            snat_ports: (61000, 65535),
            table_pool: 32,
            hairpin_ip: std::net::Ipv4Addr::new(169, 254, 42, 1),
            host_routing: true,
        }
    }

    /// The same config with pins in `dir`.
    pub fn with_pin_dir(self, dir: PathBuf) -> Self {
        DatapathConfig { pin_dir: dir, ..self }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field, value: u64, hint: &str| DatapathError::Config { field, value: value.to_string(), hint: hint.into() };
        fjord_lb::maglev::validate_size(self.maglev_size)
            .map_err(|e| bad("maglev_size", self.maglev_size as u64, &e.to_string()))?;
        if self.max_services == 0 || self.max_services > 1 << 20 {
            return Err(bad("max_services", self.max_services as u64, "must be between 1 and 1048576"));
        }
        if self.max_backends == 0 || self.max_backends > 1 << 24 {
            return Err(bad("max_backends", self.max_backends as u64, "must be between 1 and 16777216"));
        }
        if self.ct_entries < 64 || self.ct_entries > 1 << 26 {
            return Err(bad("ct_entries", self.ct_entries as u64, "must be between 64 and 67108864"));
        }
        let (lo, hi) = self.snat_ports;
        if lo < 1024 || hi < lo {
            return Err(DatapathError::Config {
                field: "snat_ports",
                value: format!("{lo}-{hi}"),
                hint: "must be a range MIN-MAX with 1024 <= MIN <= MAX".into(),
            });
        }
        let t = self.timeouts;
        for (field, v) in [("timeouts.tcp_syn", t.tcp_syn), ("timeouts.tcp_established", t.tcp_established),
            ("timeouts.tcp_closing", t.tcp_closing), ("timeouts.udp", t.udp)] {
            if v == 0 {
                return Err(bad(field, 0, "must be at least 1 second"));
            }
        }
        Ok(())
    }
}

/// Result of one conntrack GC pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    pub scanned: u64,
    pub removed: u64,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Fill level of one map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapStats {
    pub name: &'static str,
    pub kind: &'static str,
    pub max_entries: u32,
    pub entries: u32,
}

/// One frontend between prepare() and commit().
struct Prepared {
    service: String,
    key: ServiceKey,
    service_id: u32,
    existing: Option<SvcState>,
    /// backend entries created for this frontend (not used by anything else yet)
    added: Vec<(BackendAddr, u32)>,
    uniq: Vec<BackendAddr>,
    /// backend id of each entry of FrontendEntries::backends
    index_ids: Vec<u32>,
    table_id: u32,
    backend_count: u32,
    /// the active backends (FrontendEntries::backends), for the service entry
    active: Vec<BackendAddr>,
    /// FrontendEntries::compact (the compact Maglev table the service entry holds)
    compact: Vec<u8>,
    /// the new table (None: no backends, or unchanged)
    inner: Option<MapData>,
    /// the table it replaces, to restore on failure
    previous: Option<MapData>,
    switched: bool,
    options: FrontendOptions,
    /// a clean pool table written with the new slots (the service entry flips to it)
    pooled: Option<(u32, MapData)>,
    /// table id allocated for a new service by prepare() (freed again by abort())
    fresh_table: bool,
    /// a new kernel table is still to be created and written (build_fresh_tables)
    needs_table: bool,
}

#[derive(Debug, Clone)]
struct SvcState {
    service: String,
    service_id: u32,
    table_id: u32,
    backend_ids: Vec<u32>,
    options: FrontendOptions,
    /// fingerprint of the service entry as last written (`SvcValue::digest`)
    digest: u64,
}

fn svc_flags(o: &FrontendOptions) -> (u32, u32) {
    let mut flags = 0;
    if o.external {
        flags |= layout::SVC_F_EXTERNAL;
    }
    if o.affinity_timeout.is_some() {
        flags |= layout::SVC_F_AFFINITY;
    }
    (flags, o.affinity_timeout.unwrap_or(0))
}

fn options_of(v: &SvcValue) -> FrontendOptions {
    FrontendOptions {
        external: v.flags & layout::SVC_F_EXTERNAL != 0,
        affinity_timeout: (v.flags & layout::SVC_F_AFFINITY != 0).then_some(v.affinity_timeout_s),
    }
}

/// Makes sure `/sys/fs/bpf` (the parent of pin dirs) is a bpffs mount,
/// mounting it if it is not.
pub fn ensure_bpffs(mountpoint: &Path) -> Result<()> {
    let is_bpffs = |p: &Path| -> io::Result<bool> {
        let st = nix::sys::statfs::statfs(p).map_err(io::Error::from)?;
        Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
    };
    let err = |source| DatapathError::Bpffs { path: mountpoint.to_path_buf(), source };
    if is_bpffs(mountpoint).map_err(err)? {
        return Ok(());
    }
    info!(path = %mountpoint.display(), "mounting bpffs");
    nix::mount::mount(Some("bpf"), mountpoint, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| err(io::Error::from(e)))?;
    Ok(())
}

/// The loaded datapath of one node.
pub struct Datapath {
    cfg: DatapathConfig,
    ebpf: Ebpf,
    services_map: HashMap<MapData, SvcKey, SvcValue>,
    backends_map: HashMap<MapData, u32, BackendValue>,
    maglev_map: HashOfMaps<MapData, u32, MapData>,
    revnat_map: HashMap<MapData, u32, RevNat>,
    ct_map: HashMap<MapData, CtKey, CtValue>,
    stats_map: PerCpuArray<MapData, u64>,
    config_map: Array<MapData, Config>,
    affinity_map: HashMap<MapData, AffinityKey, AffinityValue>,
    gone: Arc<GoneIps>,
    /// host-side veths of this node's pods (`fjord_pod_ifs`): eBPF host routing's targets
    pod_ifs_map: HashMap<MapData, u32, u32>,
    /// `fjord_backend_ports` and how many backend entries use each port
    backend_ports_map: Array<MapData, u32>,
    port_refs: StdHashMap<u16, u32>,
    /// backend id → address (the reverse of `backends`)
    backend_addrs: StdHashMap<u32, BackendAddr>,
    max_tables: u32,
    services: BTreeMap<ServiceKey, SvcState>,
    /// backend address -> (id, number of frontends using it)
    backends: StdHashMap<BackendAddr, (u32, u32)>,
    free_backend_ids: VecDeque<u32>,
    next_backend_id: u32,
    free_service_ids: VecDeque<u32>,
    next_service_id: u32,
    /// service ids handed out by prepare() but not yet committed
    reserved_services: usize,
    /// ids of every table in fjord_maglev (services' and the pool's)
    used_tables: HashSet<u32>,
    table_cursor: u32,
    /// Spare tables in fjord_maglev that no packet can be reading: a change writes the new
    /// slots into one and flips the service entry to it (no map-in-map update, so no RCU
    /// grace period on the change path).
    pool_clean: Vec<(u32, MapData)>,
    /// Tables a service entry pointed to until a flip; clean after the next grace period
    /// (`maintain`).
    pool_dirty: Vec<(u32, MapData)>,
    /// socket-LB programs, loaded on the first attach_cgroup()
    sock: Option<Ebpf>,
    /// cgroups this process attached the socket LB to
    sock_cgroups: Vec<PathBuf>,
    /// blank tables made ahead of a bulk install (see [`TableStash`])
    stash: Arc<TableStash>,
}

/// A map delete whose key was not there counts as done: aya reports that as the syscall's
/// ENOENT, not as `KeyNotFound`.
fn absent_ok(r: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// Addresses of this node's deleted pods (`fjord_gone`): the tc programs answer packets to
/// them with a TCP RST / ICMP port unreachable, so a connection made straight to a pod that
/// is gone (socket LB, or a direct pod IP) fails at once instead of hanging. The agent marks
/// an address when it releases it and clears it when the address is given to a new pod.
pub struct GoneIps(Mutex<HashMap<MapData, u32, u64>>);

impl GoneIps {
    pub fn mark(&self, ip: Ipv4Addr) -> Result<()> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64).unwrap_or(0);
        self.0.lock().unwrap().insert(layout::be_addr(ip), now, 0).map_err(map_err(MAP_GONE, "insert"))
    }

    /// Clears `ip` (no error if it was not marked).
    pub fn clear(&self, ip: Ipv4Addr) -> Result<()> {
        absent_ok(self.0.lock().unwrap().remove(&layout::be_addr(ip))).map_err(map_err(MAP_GONE, "delete"))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.0.lock().unwrap().get(&layout::be_addr(ip), 0).is_ok()
    }

    pub fn len(&self) -> Result<u32> {
        let m = self.0.lock().unwrap();
        let mut n = 0;
        for k in m.keys() {
            k.map_err(map_err(MAP_GONE, "iterate keys"))?;
            n += 1;
        }
        Ok(n)
    }

    pub fn is_empty(&self) -> bool {
        self.len().map(|n| n == 0).unwrap_or(true)
    }
}

/// Blank Maglev tables (not yet in `fjord_maglev`) created ahead of a bulk install by
/// another thread, e.g. while the agent still reads and decodes the store after a cold
/// start: creating a table (a BPF_MAP_CREATE of 64 KiB at M = 16381, ~30 µs) is about
/// half of the kernel work per new table. New tables come from here while it has some.
pub struct TableStash {
    maglev_size: u32,
    tables: Mutex<Vec<MapData>>,
    stop: std::sync::atomic::AtomicBool,
}

impl TableStash {
    /// Creates blank tables until the stash holds `n` (or [`stop`](Self::stop) is
    /// called, or creation fails: the install then creates its own). Blocking.
    pub fn prefill(&self, n: usize) {
        use std::sync::atomic::Ordering;
        self.stop.store(false, Ordering::Relaxed);
        while !self.stop.load(Ordering::Relaxed) && self.len() < n {
            match create_table(self.maglev_size) {
                Ok(md) => {
                    let mut t = self.tables.lock().unwrap();
                    // stopped meanwhile: the table goes, instead of staying in a stash nobody empties
                    if !self.stop.load(Ordering::Relaxed) {
                        t.push(md);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "could not create a blank Maglev table ahead of the install");
                    return;
                }
            }
        }
    }

    /// Stops a running [`prefill`](Self::prefill) and frees the tables left.
    pub fn stop(&self) {
        let mut t = self.tables.lock().unwrap();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.clear();
    }

    pub fn len(&self) -> usize {
        self.tables.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self) -> Option<MapData> {
        self.tables.lock().unwrap().pop()
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").field("cfg", &self.cfg).field("services", &self.services.len()).finish()
    }
}

/// A loader that creates or re-uses the maps pinned in cfg.pin_dir.
fn loader(cfg: &DatapathConfig) -> EbpfLoader<'static> {
    let mut l = EbpfLoader::new();
    l.default_map_pin_directory(&cfg.pin_dir)
        .map_max_entries(MAP_SERVICES, cfg.max_services)
        .map_max_entries(MAP_REVNAT, cfg.max_services)
        .map_max_entries(MAP_MAGLEV, cfg.max_services + SPARE_TABLES + cfg.table_pool)
        .map_max_entries(MAP_BACKENDS, cfg.max_backends)
        .map_max_entries(MAP_CT, cfg.ct_entries)
        .map_max_entries(MAP_AFFINITY, (cfg.ct_entries / 4).max(1024));
    l
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let m = ebpf.take_map(name).ok_or_else(|| DatapathError::Map {
        map: name,
        op: "find in the eBPF object".into(),
        source: Box::new(MapError::InvalidName { name: name.into() }),
    })?;
    T::try_from(m).map_err(map_err(name, "open with the layout of bpf/fjord.h"))
}

impl Datapath {
    /// Loads the programs, creating the maps or re-using those pinned in
    /// `cfg.pin_dir` (then the in-memory state is rebuilt from them).
    pub fn load(cfg: DatapathConfig) -> Result<Self> {
        cfg.validate()?;
        if let Some(root) = cfg.pin_dir.ancestors().find(|p| p.parent() == Some(Path::new("/sys/fs"))) {
            if root == Path::new("/sys/fs/bpf") {
                ensure_bpffs(root)?;
            }
        }
        std::fs::create_dir_all(cfg.pin_dir.join("links"))
            .map_err(|source| DatapathError::PinDir { path: cfg.pin_dir.clone(), source })?;
        let max_tables = cfg.max_services + SPARE_TABLES + cfg.table_pool;
        let ebpf = loader(&cfg)
            .load(BPF_OBJECT)
            .map_err(|e| DatapathError::Load { pin_dir: cfg.pin_dir.clone(), source: Box::new(e) })?;
        let mut ebpf = ebpf;
        // load (verify) the programs while every map fd they reference is still open
        for prog in TC_PROGS {
            let p: &mut SchedClassifier = ebpf
                .program_mut(prog)
                .expect("program compiled into the object")
                .try_into()
                .expect("classifier section");
            p.load().map_err(|e| DatapathError::Program {
                program: prog,
                iface: "-".into(),
                op: "load (verifier)",
                source: Box::new(e),
            })?;
        }

        // pinned maps keep their original sizes: refuse a mismatch instead of misbehaving
        for (field, map, want) in [
            ("max_services", MAP_SERVICES, cfg.max_services),
            ("max_backends", MAP_BACKENDS, cfg.max_backends),
            ("ct_entries", MAP_CT, cfg.ct_entries),
        ] {
            let got = pinned_max_entries(&ebpf, map)?;
            if got != want {
                return Err(DatapathError::PinnedMismatch {
                    pin_dir: cfg.pin_dir.clone(),
                    field,
                    pinned: got as u64,
                    requested: want as u64,
                });
            }
        }
        let mut config: Array<MapData, Config> = take(&mut ebpf, MAP_CONFIG)?;
        let services_map: HashMap<MapData, SvcKey, SvcValue> = take(&mut ebpf, MAP_SERVICES)?;
        let backends_map: HashMap<MapData, u32, BackendValue> = take(&mut ebpf, MAP_BACKENDS)?;
        let maglev_map: HashOfMaps<MapData, u32, MapData> = take(&mut ebpf, MAP_MAGLEV)?;
        let revnat_map: HashMap<MapData, u32, RevNat> = take(&mut ebpf, MAP_REVNAT)?;
        let ct_map: HashMap<MapData, CtKey, CtValue> = take(&mut ebpf, MAP_CT)?;
        let stats_map: PerCpuArray<MapData, u64> = take(&mut ebpf, MAP_STATS)?;
        let affinity_map: HashMap<MapData, AffinityKey, AffinityValue> = take(&mut ebpf, MAP_AFFINITY)?;
        let gone = Arc::new(GoneIps(Mutex::new(take(&mut ebpf, MAP_GONE)?)));
        let backend_ports_map: Array<MapData, u32> = take(&mut ebpf, MAP_BACKEND_PORTS)?;
        let pod_ifs_map: HashMap<MapData, u32, u32> = take(&mut ebpf, MAP_POD_IFS)?;
        let mut cur = config.get(&0, 0).map_err(map_err(MAP_CONFIG, "read"))?;
        if cur.maglev_size == 0 {
            cur = Config { maglev_size: cfg.maglev_size, max_tables, version: LAYOUT_VERSION, ..Config::default() };
        } else if cur.maglev_size != cfg.maglev_size {
            return Err(DatapathError::PinnedMismatch {
                pin_dir: cfg.pin_dir.clone(),
                field: "maglev_size",
                pinned: cur.maglev_size as u64,
                requested: cfg.maglev_size as u64,
            });
        } else if cur.version != LAYOUT_VERSION {
            return Err(DatapathError::PinnedMismatch {
                pin_dir: cfg.pin_dir.clone(),
                field: "layout version",
                pinned: cur.version as u64,
                requested: LAYOUT_VERSION as u64,
            });
        }
        // settings that may change between runs (the node's addresses are kept)
        cur.hairpin_ip = layout::be_addr(cfg.hairpin_ip);
        cur.snat_port_min = cfg.snat_ports.0;
        cur.snat_port_max = cfg.snat_ports.1;
        cur.tcp_syn_s = cfg.timeouts.tcp_syn;
        cur.tcp_established_s = cfg.timeouts.tcp_established;
        cur.tcp_closing_s = cfg.timeouts.tcp_closing;
        cur.udp_s = cfg.timeouts.udp;
        if cfg.host_routing {
            cur.flags |= layout::CFG_F_HOST_ROUTING;
        } else {
            cur.flags &= !layout::CFG_F_HOST_ROUTING;
        }
        // the namespace this datapath serves (the node's): the socket LB tells its
        // host-network processes from pods by it
        cur.host_netns_cookie = own_netns_cookie().map_err(|source| DatapathError::NetnsCookie { source })?;
        config.set(0, cur, 0).map_err(map_err(MAP_CONFIG, "write"))?;

        let stash = Arc::new(TableStash { maglev_size: cfg.maglev_size, tables: Mutex::new(Vec::new()), stop: false.into() });
        let mut dp = Datapath {
            cfg,
            ebpf,
            services_map,
            backends_map,
            maglev_map,
            revnat_map,
            ct_map,
            stats_map,
            config_map: config,
            affinity_map,
            gone,
            backend_ports_map,
            pod_ifs_map,
            port_refs: StdHashMap::new(),
            backend_addrs: StdHashMap::new(),
            max_tables,
            services: BTreeMap::new(),
            backends: StdHashMap::new(),
            free_backend_ids: VecDeque::new(),
            next_backend_id: 1,
            free_service_ids: VecDeque::new(),
            next_service_id: 1,
            reserved_services: 0,
            used_tables: HashSet::new(),
            table_cursor: 1,
            pool_clean: Vec::new(),
            pool_dirty: Vec::new(),
            sock: None,
            sock_cgroups: Vec::new(),
            stash,
        };
        dp.recover()?;
        info!(pin_dir = %dp.cfg.pin_dir.display(), services = dp.services.len(), backends = dp.backends.len(),
            "fjord datapath loaded");
        Ok(dp)
    }

    pub fn config(&self) -> &DatapathConfig {
        &self.cfg
    }

    /// The stash new tables are taken from before they are created (fill it from
    /// another thread with [`TableStash::prefill`]).
    pub fn table_stash(&self) -> Arc<TableStash> {
        self.stash.clone()
    }

    /// Rebuilds the allocator state from pinned maps and removes leftovers of
    /// an interrupted update (tables/backends/revnat entries nobody uses).
    fn recover(&mut self) -> Result<()> {
        let mut by_id: StdHashMap<u32, BackendAddr> = StdHashMap::new();
        for item in self.backends_map.iter() {
            let (id, v) = item.map_err(map_err(MAP_BACKENDS, "iterate"))?;
            match v.to_addr() {
                Some(a) => {
                    by_id.insert(id, a);
                }
                None => warn!(id, "ignoring backend entry with unknown protocol"),
            }
        }
        let mut svcs = Vec::new();
        for item in self.services_map.iter() {
            svcs.push(item.map_err(map_err(MAP_SERVICES, "iterate"))?);
        }
        let m = self.cfg.maglev_size;
        let mut used_backends: StdHashMap<u32, u32> = StdHashMap::new();
        let mut used_tables = HashSet::new();
        for (k, v) in svcs {
            let Some(key) = k.to_service_key() else { continue };
            let mut ids = Vec::new();
            if v.table_id != NO_TABLE {
                used_tables.insert(v.table_id);
                let inner = self.maglev_map.get(&v.table_id, 0).map_err(map_err(MAP_MAGLEV, format!("get table {}", v.table_id)))?;
                ids = distinct_in_order(&read_table(&inner, m, key)?);
            } else if v.inline_count > 0 {
                // a frontend served by its compact table alone
                ids = v.inline_id.iter().take(v.inline_count as usize).copied().collect();
            }
            for id in &ids {
                *used_backends.entry(*id).or_default() += 1;
            }
            self.next_service_id = self.next_service_id.max(v.service_id + 1);
            self.services.insert(
                key,
                SvcState { service: "<recovered>".into(), service_id: v.service_id, table_id: v.table_id, backend_ids: ids, options: options_of(&v), digest: v.digest() },
            );
        }
        // orphan tables (an update interrupted between table insert and switch)
        let mut orphans = Vec::new();
        for t in self.maglev_map.keys() {
            let t = t.map_err(map_err(MAP_MAGLEV, "iterate"))?;
            if !used_tables.contains(&t) {
                orphans.push(t);
            }
        }
        self.used_tables = used_tables.clone();
        for t in orphans {
            // pool tables of the previous run (or leftovers of an interrupted update): spares
            // again after the next grace period
            debug!(table = t, "adopting unused Maglev table into the pool");
            let md = self.maglev_map.get(&t, 0).map_err(map_err(MAP_MAGLEV, format!("get table {t}")))?;
            self.used_tables.insert(t);
            self.pool_dirty.push((t, md));
        }
        for (id, addr) in by_id {
            match used_backends.get(&id) {
                Some(&refs) => {
                    self.backends.insert(addr, (id, refs));
                    self.note_backend(addr, id); // the bits are rewritten below
                }
                None => {
                    // in no table or entry: a terminating backend still serving established
                    // flows (only the agent's desired state knows it) or a leftover of an
                    // interrupted update. Kept, with its id, until the agent's first full sync
                    // has re-referenced what it wants (drop_unused_backends): removing it now
                    // would break the draining flows for the time until then.
                    debug!(id, backend = %addr, "backend entry referenced by no service: kept until the first full sync");
                    self.backends.insert(addr, (id, 0));
                    self.note_backend(addr, id);
                }
            }
            self.next_backend_id = self.next_backend_id.max(id + 1);
        }
        // the port bits from the recovered backends (also clears ports whose backends went away
        // while no agent ran)
        for w in 0..FJ_PORT_WORDS {
            let cur = self.backend_ports_map.get(&w, 0).map_err(map_err(MAP_BACKEND_PORTS, "read"))?;
            let want = (0..32u32).filter(|b| self.port_refs.contains_key(&((w * 32 + b) as u16))).fold(0u32, |m, b| m | 1 << b);
            if cur != want {
                self.backend_ports_map.set(w, want, 0).map_err(map_err(MAP_BACKEND_PORTS, "write"))?;
            }
        }
        let ids: HashSet<u32> = self.services.values().map(|s| s.service_id).collect();
        let mut stale = Vec::new();
        for k in self.revnat_map.keys() {
            let k = k.map_err(map_err(MAP_REVNAT, "iterate"))?;
            if !ids.contains(&k) {
                stale.push(k);
            }
        }
        for k in stale {
            self.revnat_map.remove(&k).map_err(map_err(MAP_REVNAT, "remove orphan"))?;
        }
        // free ids below the high-water marks become reusable
        let used_sids: HashSet<u32> = ids;
        self.free_service_ids = (1..self.next_service_id).filter(|i| !used_sids.contains(i)).collect();
        let used_bids: HashSet<u32> = self.backends.values().map(|(id, _)| *id).collect();
        self.free_backend_ids = (1..self.next_backend_id).filter(|i| !used_bids.contains(i)).collect();
        Ok(())
    }

    /// The frontends currently programmed.
    /// How many frontends the datapath holds.
    pub fn frontend_count(&self) -> usize {
        self.services.len()
    }

    pub fn services(&self) -> Vec<ServiceKey> {
        self.services.keys().copied().collect()
    }

    /// Backend addresses programmed for `key` (in Maglev-table order of first use).
    pub fn service_backends(&self, key: &ServiceKey) -> Option<Vec<BackendAddr>> {
        let st = self.services.get(key)?;
        let rev: StdHashMap<u32, BackendAddr> = self.backends.iter().map(|(a, (id, _))| (*id, *a)).collect();
        Some(st.backend_ids.iter().filter_map(|id| rev.get(id).copied()).collect())
    }

    /// Reads back the backends the service entry of `key` holds itself and its compact
    /// Maglev table, slot → backend (`None`: it holds none and new flows use the frontend's
    /// table: more than `FJ_SVC_INLINE` backends, or no backend).
    pub fn inline_backends(&self, key: &ServiceKey) -> Result<Option<(Vec<BackendAddr>, Vec<BackendAddr>)>> {
        let v = self.services_map.get(&SvcKey::new(key), 0).map_err(map_err(MAP_SERVICES, format!("get {key}")))?;
        if v.inline_count == 0 {
            return Ok(None);
        }
        let list: Vec<BackendAddr> = v.inline_be.iter().take(v.inline_count as usize).filter_map(|b| b.to_addr()).collect();
        let table = v.slot.iter().filter_map(|&i| list.get(i as usize).copied()).collect();
        Ok(Some((list, table)))
    }

    /// Reads back the Maglev table the datapath uses for `key`: slot → backend.
    pub fn maglev_table(&self, key: &ServiceKey) -> Result<Vec<BackendAddr>> {
        let st = self.services.get(key).ok_or(DatapathError::NotFound { key: *key })?;
        if st.table_id == NO_TABLE {
            return Ok(Vec::new());
        }
        let inner = self.maglev_map.get(&st.table_id, 0).map_err(map_err(MAP_MAGLEV, format!("get table of {key}")))?;
        let ids = read_table(&inner, self.cfg.maglev_size, *key)?;
        let rev: StdHashMap<u32, BackendAddr> = self.backends.iter().map(|(a, (id, _))| (*id, *a)).collect();
        ids.iter()
            .map(|id| {
                rev.get(id).copied().ok_or_else(|| DatapathError::BadTable {
                    service: st.service.clone(),
                    key: *key,
                    slot: 0,
                    index: *id,
                    count: rev.len(),
                })
            })
            .collect()
    }

    /// Programs one frontend: new backend entries, then a freshly built Maglev
    /// table switched in atomically (one map-in-map update), then the service
    /// entry; finally backends no longer used are released. Established flows
    /// keep their backend through conntrack. On error nothing is changed.
    /// Re-programming an unchanged frontend does not touch the table.
    pub fn upsert(&mut self, fe: &FrontendEntries) -> Result<()> {
        self.upsert_many(std::slice::from_ref(fe))
    }

    /// Programs many frontends. All entries are validated (including the
    /// capacity needed by the whole batch) before anything is written: a
    /// validation error changes nothing. Each frontend switches atomically on
    /// its own (a kernel error in the middle of a large batch leaves the
    /// chunks before it applied, and is returned); the table switches of the batch run concurrently, because the
    /// kernel waits for an RCU grace period (milliseconds) on every map-in-map
    /// update and concurrent waiters share grace periods.
    pub fn upsert_many(&mut self, entries: &[FrontendEntries]) -> Result<()> {
        // ---- validate the whole batch first: a bad entry or a batch that does not
        //      fit changes nothing. (Capacity is checked conservatively: backends
        //      freed by this batch are not counted as free.) ----
        let mut keys = HashSet::new();
        let mut new_services = 0usize;
        let mut new_backends: HashSet<BackendAddr> = HashSet::new();
        for fe in entries {
            if !keys.insert(fe.key) {
                return Err(DatapathError::DuplicateInBatch { service: fe.service.clone(), key: fe.key });
            }
            self.validate(fe)?;
            if !self.services.contains_key(&fe.key) {
                new_services += 1;
                if self.services.len() + new_services > self.cfg.max_services as usize {
                    return Err(DatapathError::ServicesFull { service: fe.service.clone(), key: fe.key, max: self.cfg.max_services });
                }
            }
            let before = new_backends.len();
            new_backends.extend(fe.backends.iter().chain(fe.draining.iter()).filter(|a| !self.backends.contains_key(a)).copied());
            let free = self.cfg.max_backends as usize - self.backends.len();
            if new_backends.len() > free {
                return Err(DatapathError::BackendsFull {
                    service: fe.service.clone(),
                    key: fe.key,
                    needed: new_backends.len() - before,
                    free: free.saturating_sub(before),
                    max: self.cfg.max_backends,
                });
            }
        }
        // ---- apply in chunks (each prepared table holds file descriptors) ----
        for chunk in entries.chunks(BATCH_CHUNK) {
            self.apply_chunk(chunk)?;
        }
        Ok(())
    }

    fn apply_chunk(&mut self, entries: &[FrontendEntries]) -> Result<()> {
        let mut prepared: Vec<Prepared> = Vec::with_capacity(entries.len());
        for fe in entries {
            match self.prepare(fe) {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    self.abort_all(prepared, true);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.build_fresh_tables(entries, &mut prepared) {
            self.abort_all(prepared, true);
            return Err(e);
        }
        // ---- table switches, concurrently ----
        let results = self.switch_tables(&mut prepared);
        if let Some(pos) = results.iter().position(|r| r.is_err()) {
            let err = results.into_iter().nth(pos).expect("present").expect_err("is err");
            self.abort_all(prepared, true);
            return Err(err);
        }
        // ---- service entries + bookkeeping ----
        let mut iter = prepared.into_iter();
        while let Some(p) = iter.next() {
            if let Err(e) = self.commit(p) {
                // the failing entry was restored by commit(); undo the ones not yet committed
                self.abort_all(iter.collect(), true);
                return Err(e);
            }
        }
        Ok(())
    }

    fn validate(&self, fe: &FrontendEntries) -> Result<()> {
        let key = fe.key;
        let m = self.cfg.maglev_size;
        // a frontend with at most FJ_SVC_INLINE backends and no sessionAffinity may come with
        // its compact table alone (the datapath never reads a big table for it)
        let compact_only = fe.maglev.is_empty() && !fe.compact.is_empty() && fe.options.affinity_timeout.is_none();
        if !fe.backends.is_empty() && !compact_only && fe.maglev.len() != m as usize {
            return Err(DatapathError::TableSize { service: fe.service.clone(), key, got: fe.maglev.len(), want: m });
        }
        if !fe.compact.is_empty() {
            if fe.compact.len() != layout::SVC_SLOTS || fe.backends.len() > layout::SVC_INLINE {
                return Err(DatapathError::TableSize { service: fe.service.clone(), key, got: fe.compact.len(), want: layout::SVC_SLOTS as u32 });
            }
            if let Some((slot, &index)) = fe.compact.iter().enumerate().find(|(_, &i)| i as usize >= fe.backends.len()) {
                return Err(DatapathError::BadTable { service: fe.service.clone(), key, slot, index: index as u32, count: fe.backends.len() });
            }
        }
        if fe.backends.is_empty() && !fe.maglev.is_empty() {
            return Err(DatapathError::BadTable { service: fe.service.clone(), key, slot: 0, index: fe.maglev[0], count: 0 });
        }
        // the common case (every index in range) in one vectorized pass
        if fe.maglev.iter().copied().max().is_some_and(|i| i as usize >= fe.backends.len()) {
            let (slot, &index) = fe.maglev.iter().enumerate().find(|(_, &i)| i as usize >= fe.backends.len()).expect("an index is out of range");
            return Err(DatapathError::BadTable { service: fe.service.clone(), key, slot, index, count: fe.backends.len() });
        }
        if let Some(b) = fe.backends.iter().find(|b| b.protocol != key.protocol) {
            return Err(DatapathError::ProtocolMismatch { service: fe.service.clone(), key, backend: *b, got: b.protocol, want: key.protocol });
        }
        Ok(())
    }

    /// Checks capacity, reserves ids, writes new backend entries and builds the
    /// new table (not yet visible to the datapath). `fe` was validated by upsert_many.
    fn prepare(&mut self, fe: &FrontendEntries) -> Result<Prepared> {
        let key = fe.key;
        let m = self.cfg.maglev_size;
        let existing = self.services.get(&key).cloned();
        let reserved = self.reserved_services;
        if existing.is_none() && self.services.len() + reserved >= self.cfg.max_services as usize {
            return Err(DatapathError::ServicesFull { service: fe.service.clone(), key, max: self.cfg.max_services });
        }
        // draining backends (terminating, still serving) keep their entries, so their
        // established flows continue; only `backends` are in the table (new flows)
        let mut uniq: Vec<BackendAddr> = fe.backends.iter().chain(fe.draining.iter()).copied().collect();
        uniq.sort();
        uniq.dedup();
        let new_addrs: Vec<BackendAddr> = uniq.iter().filter(|a| !self.backends.contains_key(a)).copied().collect();
        let free = self.cfg.max_backends as usize - self.backends.len();
        if new_addrs.len() > free {
            return Err(DatapathError::BackendsFull {
                service: fe.service.clone(),
                key,
                needed: new_addrs.len(),
                free,
                max: self.cfg.max_backends,
            });
        }
        let service_id = match &existing {
            Some(s) => s.service_id,
            None => {
                self.reserved_services += 1;
                self.free_service_ids.pop_front().unwrap_or_else(|| {
                    self.next_service_id += 1;
                    self.next_service_id - 1
                })
            }
        };
        let mut p = Prepared {
            service: fe.service.clone(),
            key,
            service_id,
            existing,
            added: Vec::new(),
            uniq,
            index_ids: Vec::new(),
            table_id: NO_TABLE,
            backend_count: fe.backends.len() as u32,
            active: fe.backends.clone(),
            compact: fe.compact.clone(),
            inner: None,
            previous: None,
            switched: false,
            options: fe.options,
            pooled: None,
            fresh_table: false,
            needs_table: false,
        };
        // a big table where something reads it (validate() made sure it is there otherwise)
        if !fe.maglev.is_empty() {
            match p.existing.as_ref().map(|s| s.table_id).filter(|t| *t != NO_TABLE) {
                Some(t) => p.table_id = t,
                None => match self.alloc_table_id() {
                    Some(t) => {
                        p.table_id = t;
                        p.fresh_table = true;
                    }
                    None => {
                        let max = self.max_tables;
                        self.abort(p);
                        return Err(DatapathError::Map {
                            map: MAP_MAGLEV,
                            op: format!("allocate a table for {key}: all {max} table ids in use"),
                            source: Box::new(MapError::KeyNotFound),
                        });
                    }
                },
            }
        }
        // backend entries: registered right away (refcount 0) so later entries of
        // the same batch share them; abort() removes them again
        for a in &new_addrs {
            let id = self.free_backend_ids.front().copied().unwrap_or(self.next_backend_id);
            if let Err(e) = self.backends_map.insert(id, BackendValue::new(a), 0) {
                self.abort(p);
                return Err(map_err(MAP_BACKENDS, format!("insert backend {a} for {key}"))(e));
            }
            if self.free_backend_ids.front() == Some(&id) {
                self.free_backend_ids.pop_front();
            } else {
                self.next_backend_id += 1;
            }
            self.backends.insert(*a, (id, 0));
            if let Err(e) = self.backend_added(*a, id) {
                p.added.push((*a, id));
                self.abort(p);
                return Err(e);
            }
            p.added.push((*a, id));
        }
        p.index_ids = fe.backends.iter().map(|a| self.backends[a].0).collect();
        let had_table = p.existing.as_ref().is_some_and(|s| s.table_id != NO_TABLE);
        if p.table_id != NO_TABLE {
            let res = (|| -> Result<(Option<MapData>, Option<MapData>)> {
                let mut previous = None;
                if had_table {
                    let old = self.maglev_map.get(&p.table_id, 0).map_err(map_err(MAP_MAGLEV, format!("get table of {key}")))?;
                    let current = read_table(&old, m, key)?;
                    let wanted: Vec<u32> = fe.maglev.iter().map(|&i| p.index_ids[i as usize]).collect();
                    if current == wanted {
                        return Ok((None, None)); // unchanged: nothing to switch
                    }
                    previous = Some(old);
                }
                // fast path: a clean spare table, written now and flipped to by commit()
                if let Some((pid, md)) = self.pool_clean.pop() {
                    let r = write_table(&md, m, fe.maglev.iter().map(|&i| p.index_ids[i as usize]), key);
                    match r {
                        Ok(()) => {
                            p.pooled = Some((pid, md));
                            return Ok((None, None));
                        }
                        Err(e) => {
                            self.pool_clean.push((pid, md));
                            return Err(e);
                        }
                    }
                }
                // a new kernel table: created and written by build_fresh_tables, for the
                // whole chunk on several threads
                p.needs_table = true;
                Ok((None, previous))
            })();
            match res {
                Ok((inner, previous)) => {
                    p.inner = inner;
                    p.previous = previous;
                    if let Some((pid, _)) = &p.pooled {
                        // the service's own table (if any) stays where it is until commit
                        if p.fresh_table {
                            self.used_tables.remove(&p.table_id);
                            p.fresh_table = false;
                        }
                        p.table_id = *pid;
                    }
                }
                Err(e) => {
                    self.abort(p);
                    return Err(e);
                }
            }
        }
        Ok(p)
    }

    /// Creates and writes the new kernel tables of a chunk (`needs_table`) on up to
    /// two threads: it is most of the kernel work of a bulk install, and independent
    /// per table.
    fn build_fresh_tables(&self, entries: &[FrontendEntries], prepared: &mut [Prepared]) -> Result<()> {
        let m = self.cfg.maglev_size;
        let todo: Vec<usize> = (0..prepared.len()).filter(|&i| prepared[i].needs_table).collect();
        if todo.is_empty() {
            return Ok(());
        }
        let build = |i: usize, p: &Prepared| -> Result<MapData> {
            let key = p.key;
            let inner = match self.stash.take() {
                Some(md) => md,
                None => create_table(m).map_err(map_err(MAP_MAGLEV, format!("create table for {key}")))?,
            };
            write_table(&inner, m, entries[i].maglev.iter().map(|&x| p.index_ids[x as usize]), key)?;
            Ok(inner)
        };
        let threads = if todo.len() >= 16 { std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 2) } else { 1 };
        let shared: &[Prepared] = prepared;
        let built: Vec<(usize, Result<MapData>)> = if threads == 1 {
            todo.iter().map(|&i| (i, build(i, &shared[i]))).collect()
        } else {
            let per = todo.len().div_ceil(threads);
            std::thread::scope(|sc| {
                let hs: Vec<_> = todo.chunks(per).map(|part| sc.spawn(move || part.iter().map(|&i| (i, build(i, &shared[i]))).collect::<Vec<_>>())).collect();
                hs.into_iter().flat_map(|h| h.join().expect("table build thread")).collect()
            })
        };
        let mut first_err = None;
        for (i, r) in built {
            match r {
                Ok(md) => {
                    prepared[i].inner = Some(md);
                    prepared[i].needs_table = false;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Switches the prepared tables in (replace in place under the service id).
    /// One `BPF_MAP_UPDATE_BATCH` for the whole chunk: the kernel waits for one
    /// RCU grace period per map-in-map update *syscall* (maybe_wait_bpf_programs),
    /// so a batch pays it once instead of once per frontend. Kernels without
    /// batch ops on HASH_OF_MAPS fall back to concurrent single updates.
    fn switch_tables(&self, prepared: &mut [Prepared]) -> Vec<Result<()>> {
        let todo: Vec<usize> = (0..prepared.len()).filter(|&i| prepared[i].inner.is_some()).collect();
        let mut results: Vec<Result<()>> = (0..prepared.len()).map(|_| Ok(())).collect();
        if todo.is_empty() {
            return results;
        }
        let keys: Vec<u32> = todo.iter().map(|&i| prepared[i].table_id).collect();
        let fds: Vec<u32> = todo.iter().map(|&i| prepared[i].inner.as_ref().expect("has table").fd().as_fd().as_raw_fd() as u32).collect();
        let pin = self.cfg.pin_dir.join(MAP_MAGLEV);
        let outer = match MapData::from_pin(&pin) {
            Ok(md) => md,
            Err(e) => {
                let e = map_err(MAP_MAGLEV, format!("open {}", pin.display()))(e);
                results[todo[0]] = Err(e);
                return results;
            }
        };
        match update_batch(outer.fd().as_fd().as_raw_fd(), &keys, &fds) {
            Ok(()) => {
                for &i in &todo {
                    prepared[i].switched = true;
                }
                return results;
            }
            Err((0, e)) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524 /* ENOTSUPP */)) => {
                debug!(error = %e, "BPF_MAP_UPDATE_BATCH on the Maglev map unsupported; switching tables one by one");
            }
            Err((done, e)) => {
                for (n, &i) in todo.iter().enumerate() {
                    if n < done {
                        prepared[i].switched = true;
                    } else if n == done {
                        let p = &prepared[i];
                        results[i] = Err(DatapathError::Map {
                            map: MAP_MAGLEV,
                            op: format!("switch table {} of {} (batch): {e}", p.table_id, p.key),
                            source: Box::new(MapError::KeyNotFound),
                        });
                    }
                }
                return results;
            }
        }
        self.switch_tables_concurrently(prepared, &todo, &mut results);
        results
    }

    fn switch_tables_concurrently(&self, prepared: &mut [Prepared], todo: &[usize], results: &mut [Result<()>]) {
        let threads = todo.len().clamp(1, 64);
        let chunk = todo.len().div_ceil(threads);
        let pin = self.cfg.pin_dir.join(MAP_MAGLEV);
        let shared: &[Prepared] = prepared;
        let outcome: Vec<(usize, Result<()>)> = std::thread::scope(|s| {
            let handles: Vec<_> = todo
                .chunks(chunk)
                .map(|idxs| {
                    let pin = pin.clone();
                    s.spawn(move || {
                        let mut out = Vec::new();
                        let handle = MapData::from_pin(&pin)
                            .map_err(map_err(MAP_MAGLEV, format!("open {}", pin.display())))
                            .and_then(|md| {
                                HashOfMaps::<MapData, u32, MapData>::try_from(Map::HashOfMaps(md))
                                    .map_err(map_err(MAP_MAGLEV, "open as hash of maps"))
                            });
                        let mut handle = match handle {
                            Ok(h) => h,
                            Err(e) => {
                                let msg = e.to_string();
                                for &i in idxs {
                                    out.push((i, Err(DatapathError::Map {
                                        map: MAP_MAGLEV,
                                        op: msg.clone(),
                                        source: Box::new(MapError::KeyNotFound),
                                    })));
                                }
                                return out;
                            }
                        };
                        for &i in idxs {
                            let p = &shared[i];
                            let r = handle
                                .insert(p.table_id, p.inner.as_ref().expect("has table"), 0)
                                .map_err(map_err(MAP_MAGLEV, format!("switch table {} of {}", p.table_id, p.key)));
                            out.push((i, r));
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("table switch thread")).collect()
        });
        for (i, r) in outcome {
            if r.is_ok() {
                prepared[i].switched = true;
            }
            results[i] = r;
        }
    }

    /// Writes rev-NAT + service entry and updates the bookkeeping. On error the
    /// entry is restored to its previous state.
    fn commit(&mut self, p: Prepared) -> Result<()> {
        let key = p.key;
        let is_new = p.existing.is_none();
        let (flags, affinity_timeout_s) = svc_flags(&p.options);
        let v = SvcValue::new(p.service_id, p.table_id, flags, affinity_timeout_s, &p.active, &p.index_ids, &p.compact);
        let digest = v.digest();
        let res = (|| -> Result<()> {
            if is_new {
                self.revnat_map
                    .insert(p.service_id, RevNat::new(&key), 0)
                    .map_err(map_err(MAP_REVNAT, format!("insert rev-nat for {key}")))?;
            }
            let unchanged = p.existing.as_ref().is_some_and(|s| s.digest == digest) && p.inner.is_none() && p.pooled.is_none();
            if !unchanged || is_new {
                if let Err(e) = self.services_map.insert(SvcKey::new(&key), v, 0) {
                    if is_new {
                        let _ = self.revnat_map.remove(&p.service_id);
                    }
                    return Err(map_err(MAP_SERVICES, format!("switch service entry {key}"))(e));
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            self.abort(p);
            return Err(e);
        }
        if is_new {
            self.reserved_services -= 1;
        }
        // every backend this frontend references (table + draining), for refcounts
        let new_ids: Vec<u32> = p.uniq.iter().map(|a| self.backends[a].0).collect();
        for a in &p.uniq {
            self.backends.get_mut(a).expect("present").1 += 1;
        }
        if p.existing.as_ref().is_some_and(|o| o.options.affinity_timeout.is_some()) {
            // clients stuck to a backend that gets no new flows here start over
            let keep: HashSet<u32> = p.index_ids.iter().copied().collect();
            self.sweep_affinity(p.service_id, &keep);
        }
        self.services.insert(
            key,
            SvcState { service: p.service.clone(), service_id: p.service_id, table_id: p.table_id, backend_ids: new_ids, options: p.options, digest },
        );
        if let Some(old) = p.existing {
            // the table was replaced in place (or the entry flipped to a pool table, or the
            // service lost all backends): a table the entry no longer points to becomes dirty
            self.release(&old, old.table_id != p.table_id)?;
        }
        debug!(service = %p.service, frontend = %key, backends = p.backend_count, pooled = p.pooled.is_some(), "service programmed");
        Ok(())
    }

    fn abort_all(&mut self, prepared: Vec<Prepared>, reverse: bool) {
        let mut prepared = prepared;
        if reverse {
            prepared.reverse();
        }
        for p in prepared {
            self.abort(p);
        }
    }

    /// Undoes prepare() (and a table switch, if it happened).
    fn abort(&mut self, p: Prepared) {
        if let Some(t) = p.pooled {
            self.pool_clean.push(t);
        }
        if p.fresh_table && !p.switched {
            self.used_tables.remove(&p.table_id);
        }
        if p.switched {
            match &p.previous {
                Some(old) => {
                    let _ = self.maglev_map.insert(p.table_id, old, 0);
                }
                None => {
                    let _ = self.maglev_map.remove(&p.table_id);
                    self.used_tables.remove(&p.table_id);
                }
            }
        }
        for (a, id) in p.added.iter().rev() {
            let _ = self.backends_map.remove(id);
            self.backends.remove(a);
            let _ = self.backend_removed(*a, *id);
            self.free_backend_ids.push_front(*id);
        }
        if p.existing.is_none() {
            self.reserved_services -= 1;
            self.free_service_ids.push_front(p.service_id);
        }
    }

    /// A table id not used by any table (services' or pool).
    fn alloc_table_id(&mut self) -> Option<u32> {
        let max = self.max_tables;
        for _ in 0..max {
            let t = self.table_cursor;
            self.table_cursor = if self.table_cursor >= max { 1 } else { self.table_cursor + 1 };
            if !self.used_tables.contains(&t) {
                self.used_tables.insert(t);
                return Some(t);
            }
        }
        None
    }

    /// Pool upkeep, off the change path (the agent calls it after each sync): waits for
    /// one RCU grace period — by inserting new spare tables in one batch, or by
    /// re-inserting a dirty one — after which every table that was dirty is clean; then
    /// trims the pool to `table_pool` (one batch delete). Returns (clean, trimmed).
    pub fn maintain(&mut self) -> Result<(usize, usize)> {
        let target = self.cfg.table_pool as usize;
        let m = self.cfg.maglev_size;
        if self.pool_dirty.is_empty() && self.pool_clean.len() == target {
            return Ok((self.pool_clean.len(), 0));
        }
        let mut fresh: Vec<(u32, MapData)> = Vec::new();
        for _ in (self.pool_clean.len() + self.pool_dirty.len())..target {
            let Some(id) = self.alloc_table_id() else { break };
            match create_table(m) {
                Ok(md) => fresh.push((id, md)),
                Err(e) => {
                    self.used_tables.remove(&id);
                    return Err(map_err(MAP_MAGLEV, "create spare table")(e));
                }
            }
        }
        let pin = self.cfg.pin_dir.join(MAP_MAGLEV);
        let outer = MapData::from_pin(&pin).map_err(map_err(MAP_MAGLEV, format!("open {}", pin.display())))?;
        let outer_fd = outer.fd().as_fd().as_raw_fd();
        if !fresh.is_empty() {
            let ids: Vec<u32> = fresh.iter().map(|(i, _)| *i).collect();
            let fds: Vec<u32> = fresh.iter().map(|(_, md)| md.fd().as_fd().as_raw_fd() as u32).collect();
            let done = update_batch(outer_fd, &ids, &fds).map_or_else(|(d, _)| d, |()| ids.len());
            for (id, md) in &fresh[done..] {
                self.maglev_map.insert(*id, md, 0).map_err(map_err(MAP_MAGLEV, format!("insert spare table {id}")))?;
            }
        } else if let Some((id, md)) = self.pool_dirty.first() {
            // any map-in-map update waits for the grace period (maybe_wait_bpf_programs)
            self.maglev_map.insert(*id, md, 0).map_err(map_err(MAP_MAGLEV, format!("re-insert table {id}")))?;
        }
        self.pool_clean.append(&mut self.pool_dirty);
        self.pool_clean.append(&mut fresh);
        let mut trimmed = 0;
        if self.pool_clean.len() > target {
            let extra = self.pool_clean.split_off(target);
            let ids: Vec<u32> = extra.iter().map(|(i, _)| *i).collect();
            let done = delete_batch(outer_fd, &ids).map_or_else(|(d, _)| d, |()| ids.len());
            for id in &ids[done..] {
                absent_ok(self.maglev_map.remove(id)).map_err(map_err(MAP_MAGLEV, format!("remove spare table {id}")))?;
            }
            for id in &ids {
                self.used_tables.remove(id);
            }
            trimmed = ids.len();
        }
        Ok((self.pool_clean.len(), trimmed))
    }

    /// (clean, dirty) spare tables.
    pub fn pool_len(&self) -> (usize, usize) {
        (self.pool_clean.len(), self.pool_dirty.len())
    }

    /// Removes sessionAffinity entries of `service_id` whose backend is not in `keep`.
    fn sweep_affinity(&mut self, service_id: u32, keep: &HashSet<u32>) {
        let stale: Vec<AffinityKey> = self
            .affinity_map
            .iter()
            .flatten()
            .filter(|(k, v)| k.service_id == service_id && !keep.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = self.affinity_map.remove(&k);
        }
    }

    /// Drops the references of an old generation: its table and backends no longer used.
    fn release(&mut self, old: &SvcState, remove_table: bool) -> Result<()> {
        if remove_table && old.table_id != NO_TABLE {
            // packets may still be reading it: a spare after the next grace period (maintain)
            let md = self.maglev_map.get(&old.table_id, 0).map_err(map_err(MAP_MAGLEV, format!("get old table {}", old.table_id)))?;
            self.pool_dirty.push((old.table_id, md));
        }
        for id in &old.backend_ids {
            let Some(addr) = self.backend_addrs.get(id).copied() else { continue };
            let e = self.backends.get_mut(&addr).expect("present");
            e.1 -= 1;
            if e.1 == 0 {
                self.backends.remove(&addr);
                self.backends_map.remove(id).map_err(map_err(MAP_BACKENDS, format!("remove backend {addr}")))?;
                self.backend_removed(addr, *id)?;
                self.free_backend_ids.push_back(*id);
            }
        }
        Ok(())
    }

    /// Removes the backend entries no frontend references (those kept by a reload for
    /// draining flows, see `recover`). Call after a full sync: whatever it did not reference
    /// again is garbage. Returns how many were removed.
    pub fn drop_unused_backends(&mut self) -> Result<usize> {
        let unused: Vec<(BackendAddr, u32)> = self.backends.iter().filter(|(_, (_, refs))| *refs == 0).map(|(a, (id, _))| (*a, *id)).collect();
        for (addr, id) in &unused {
            self.backends.remove(addr);
            self.backends_map.remove(id).map_err(map_err(MAP_BACKENDS, format!("remove unused backend {addr}")))?;
            self.backend_removed(*addr, *id)?;
            self.free_backend_ids.push_back(*id);
            debug!(id, backend = %addr, "removed unused backend entry");
        }
        Ok(unused.len())
    }

    /// Bookkeeping of a backend entry that now exists: its port is a backend port (set in
    /// `fjord_backend_ports` before any service entry can point at the backend).
    fn backend_added(&mut self, a: BackendAddr, id: u32) -> Result<()> {
        if self.note_backend(a, id) {
            self.set_port_bit(a.port, true)?;
        }
        Ok(())
    }

    /// The in-memory part of [`Self::backend_added`]: true if `a.port` became a backend port.
    fn note_backend(&mut self, a: BackendAddr, id: u32) -> bool {
        self.backend_addrs.insert(id, a);
        let n = self.port_refs.entry(a.port).or_default();
        *n += 1;
        *n == 1
    }

    /// ... and one that is gone: the port stops being a backend port with its last backend.
    fn backend_removed(&mut self, a: BackendAddr, id: u32) -> Result<()> {
        self.backend_addrs.remove(&id);
        if let Some(n) = self.port_refs.get_mut(&a.port) {
            *n -= 1;
            if *n == 0 {
                self.port_refs.remove(&a.port);
                self.set_port_bit(a.port, false)?;
            }
        }
        Ok(())
    }

    fn set_port_bit(&mut self, port: u16, on: bool) -> Result<()> {
        let w = port as u32 >> 5;
        let bit = 1u32 << (port & 31);
        let cur = self.backend_ports_map.get(&w, 0).map_err(map_err(MAP_BACKEND_PORTS, "read"))?;
        let new = if on { cur | bit } else { cur & !bit };
        if new != cur {
            self.backend_ports_map.set(w, new, 0).map_err(map_err(MAP_BACKEND_PORTS, "write"))?;
        }
        Ok(())
    }

    /// Ports (host order) some backend entry uses, from `fjord_backend_ports` (tests, status).
    pub fn backend_ports(&self) -> Result<Vec<u16>> {
        let mut v = Vec::new();
        for w in 0..FJ_PORT_WORDS {
            let bits = self.backend_ports_map.get(&w, 0).map_err(map_err(MAP_BACKEND_PORTS, "read"))?;
            for b in 0..32 {
                if bits & (1 << b) != 0 {
                    v.push((w * 32 + b) as u16);
                }
            }
        }
        Ok(v)
    }

    /// Removes a frontend: new connections to it stop being translated; its
    /// rev-NAT entry, table and unused backends are released.
    pub fn delete(&mut self, key: &ServiceKey) -> Result<()> {
        let Some(st) = self.services.get(key).cloned() else {
            return Err(DatapathError::NotFound { key: *key });
        };
        self.services_map.remove(&SvcKey::new(key)).map_err(map_err(MAP_SERVICES, format!("remove {key}")))?;
        self.services.remove(key);
        if st.options.affinity_timeout.is_some() {
            self.sweep_affinity(st.service_id, &HashSet::new());
        }
        self.revnat_map.remove(&st.service_id).map_err(map_err(MAP_REVNAT, format!("remove rev-nat of {key}")))?;
        self.free_service_ids.push_back(st.service_id);
        self.release(&st, true)?;
        debug!(service = %st.service, frontend = %key, "service deleted");
        Ok(())
    }

    /// Removes many frontends (unknown keys are skipped). Like [`delete`](Self::delete)
    /// per frontend, but their Maglev tables leave the outer map in one
    /// `BPF_MAP_DELETE_BATCH`: one RCU grace period for all instead of one each.
    pub fn delete_many(&mut self, keys: &[ServiceKey]) -> Result<()> {
        let mut olds = Vec::new();
        for key in keys {
            let Some(st) = self.services.get(key).cloned() else { continue };
            self.services_map.remove(&SvcKey::new(key)).map_err(map_err(MAP_SERVICES, format!("remove {key}")))?;
            self.services.remove(key);
            self.revnat_map.remove(&st.service_id).map_err(map_err(MAP_REVNAT, format!("remove rev-nat of {key}")))?;
            self.free_service_ids.push_back(st.service_id);
            debug!(service = %st.service, frontend = %key, "service deleted");
            olds.push(st);
        }
        // their tables become dirty spares; maintain() trims the pool in one batch
        for st in &olds {
            self.release(st, true)?;
        }
        Ok(())
    }

    fn link_pin(&self, iface: &str, ifindex: u32, dir: &str) -> PathBuf {
        // bpffs rejects '.' in names: encode it
        self.cfg.pin_dir.join("links").join(format!("{dir}-{ifindex}-{}", iface.replace('.', "%")))
    }

    /// (direction, ifindex, iface) of every pinned link.
    fn pinned_links(&self) -> Vec<(String, u32, String, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.cfg.pin_dir.join("links")) else { return Vec::new() };
        rd.flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                let mut it = n.splitn(3, '-');
                let (dir, idx, iface) = (it.next()?, it.next()?.parse().ok()?, it.next()?);
                if dir != "ingress" && dir != "egress" {
                    return None;
                }
                Some((dir.to_string(), idx, iface.replace('%', "."), e.path()))
            })
            .collect()
    }

    /// Attaches fjord_from_pod (tc ingress) and fjord_to_pod (tc egress) to the
    /// host-side veth `iface` in the calling thread's network namespace. If
    /// fjord was attached before (e.g. by a previous run of the agent), the
    /// program is replaced atomically: no packet sees a detached interface.
    /// AttachMode::Tc (default) adds a clsact qdisc and cls_bpf filters and
    /// records the attachment as a directory under `<pin_dir>/links/`;
    /// AttachMode::Tcx creates TCX links pinned there.
    /// The interface becomes a target of eBPF host routing (`fjord_pod_ifs`).
    pub fn attach(&mut self, iface: &str) -> Result<()> {
        self.attach_progs(iface, &[(PROG_FROM_POD, TcAttachType::Ingress), (PROG_TO_POD, TcAttachType::Egress)])?;
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|_| DatapathError::NoSuchInterface { iface: iface.into() })?;
        self.pod_ifs_map.insert(ifindex, 1, 0).map_err(map_err(MAP_POD_IFS, "insert"))
    }

    /// ifindexes of the pod veths eBPF host routing delivers to (`fjord_pod_ifs`), sorted.
    pub fn host_routing_targets(&self) -> Result<Vec<u32>> {
        let mut v = Vec::new();
        for k in self.pod_ifs_map.keys() {
            v.push(k.map_err(map_err(MAP_POD_IFS, "iterate keys"))?);
        }
        v.sort_unstable();
        Ok(v)
    }

    /// Attaches the node-side programs to the node's underlay device (or its
    /// VXLAN device): fjord_from_net on ingress (NodePort/externalIP frontends,
    /// replies of SNATed flows) and, with `masquerade_egress`, fjord_to_net on
    /// egress (masquerade of pod traffic leaving the cluster CIDR).
    pub fn attach_net(&mut self, iface: &str, masquerade_egress: bool) -> Result<()> {
        if masquerade_egress {
            self.attach_progs(iface, &[(PROG_FROM_NET, TcAttachType::Ingress), (PROG_TO_NET, TcAttachType::Egress)])
        } else {
            self.attach_progs(iface, &[(PROG_FROM_NET, TcAttachType::Ingress)])
        }
    }

    /// Writes the node's addresses into the datapath config (NodePort SNAT
    /// source, local backends, masquerade). Takes effect for new flows at once.
    pub fn set_node_net(&mut self, net: &NodeNet) -> Result<()> {
        fn mask(bits: u8) -> u32 {
            if bits == 0 { 0 } else { u32::MAX << (32 - bits.min(32) as u32) }
        }
        let bad = |field: &'static str, v: String| DatapathError::Config { field, value: v, hint: "prefix length must be 0..=32".into() };
        if net.pod_cidr.1 > 32 {
            return Err(bad("pod_cidr", format!("{}/{}", net.pod_cidr.0, net.pod_cidr.1)));
        }
        if net.cluster_cidr.1 > 32 {
            return Err(bad("cluster_cidr", format!("{}/{}", net.cluster_cidr.0, net.cluster_cidr.1)));
        }
        let mut c = self.config_map.get(&0, 0).map_err(map_err(MAP_CONFIG, "read"))?;
        let pm = mask(net.pod_cidr.1);
        let cm = mask(net.cluster_cidr.1);
        c.node_ip = layout::be_addr(net.node_ip);
        c.pod_mask = pm.to_be();
        c.pod_net = (u32::from(net.pod_cidr.0) & pm).to_be();
        c.cluster_mask = cm.to_be();
        c.cluster_net = (u32::from(net.cluster_cidr.0) & cm).to_be();
        if net.masquerade {
            c.flags |= layout::CFG_F_MASQUERADE;
        } else {
            c.flags &= !layout::CFG_F_MASQUERADE;
        }
        self.config_map.set(0, c, 0).map_err(map_err(MAP_CONFIG, "write"))?;
        info!(node_ip = %net.node_ip, pod_cidr = %format!("{}/{}", net.pod_cidr.0, net.pod_cidr.1),
            cluster_cidr = %format!("{}/{}", net.cluster_cidr.0, net.cluster_cidr.1), masquerade = net.masquerade,
            "datapath node addresses set");
        Ok(())
    }

    fn attach_progs(&mut self, iface: &str, progs: &[(&'static str, TcAttachType)]) -> Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|_| DatapathError::NoSuchInterface { iface: iface.into() })?;
        let mode = self.cfg.attach;
        if mode == AttachMode::Tc {
            // EEXIST when fjord (or anyone) added it before: the attach below reports real failures
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
        }
        for &(prog, ty) in progs {
            let dir = if ty == TcAttachType::Ingress { "ingress" } else { "egress" };
            let pin = self.link_pin(iface, ifindex, dir);
            let p: &mut SchedClassifier = self.ebpf.program_mut(prog).expect("loaded").try_into().expect("classifier");
            let perr = |op: &'static str| {
                let iface = iface.to_string();
                move |e: ProgramError| DatapathError::Program { program: prog, iface, op, source: Box::new(e) }
            };
            let replaced = match mode {
                AttachMode::Tc => {
                    let opts = || NlOptions { priority: TC_PRIORITY, handle: TcHandle::from(TC_HANDLE), ..Default::default() };
                    let (id, replaced) = match p.attach_with_options(iface, ty, TcAttachOptions::Netlink(opts())) {
                        Ok(id) => (id, false),
                        Err(create_err) => {
                            // a filter of ours is there already (earlier run): replace its program
                            let old = SchedClassifierLink::attached(iface, ty, TC_PRIORITY, TcHandle::from(TC_HANDLE), None)
                                .map_err(|e| DatapathError::Program { program: prog, iface: iface.into(), op: "find tc filter", source: Box::new(ProgramError::IOError(e)) })?;
                            match p.attach_to_link(old) {
                                Ok(id) => (id, true),
                                Err(_) => return Err(perr("attach tc filter (clsact + cls_bpf)")(create_err)),
                            }
                        }
                    };
                    // the filter stays in the kernel (holding the program) after we let go
                    let link = p.take_link(id).map_err(perr("take link"))?;
                    std::mem::forget(link);
                    if !pin.exists() {
                        std::fs::create_dir(&pin).map_err(|source| DatapathError::LinkPin { path: pin.clone(), op: "record attachment", source })?;
                    }
                    replaced
                }
                AttachMode::Tcx => {
                    let mut replaced = false;
                    let link_id = match PinnedLink::from_pin(&pin) {
                        Ok(old) => {
                            let fd: FdLink = old.into();
                            let link: SchedClassifierLink = fd.try_into().map_err(|e: LinkError| DatapathError::Link {
                                program: prog,
                                iface: iface.into(),
                                op: "re-open pinned link",
                                source: Box::new(e),
                            })?;
                            replaced = true;
                            p.attach_to_link(link).map_err(perr("replace program in pinned link"))?
                        }
                        Err(_) => p
                            .attach_with_options(iface, ty, TcAttachOptions::TcxOrder(LinkOrder::default()))
                            .map_err(perr("attach tcx link"))?,
                    };
                    let link = p.take_link(link_id).map_err(perr("take link"))?;
                    let fd: FdLink = link.try_into().map_err(|e: LinkError| DatapathError::Link {
                        program: prog,
                        iface: iface.into(),
                        op: "convert to fd link",
                        source: Box::new(e),
                    })?;
                    if replaced {
                        // already pinned at `pin`; dropping our fd keeps the pinned link
                        drop(fd);
                    } else {
                        fd.pin(&pin).map_err(|e| DatapathError::LinkPin { path: pin.clone(), op: "pin", source: io::Error::other(format!("{e:?}")) })?;
                    }
                    replaced
                }
            };
            debug!(iface, ifindex, prog, replaced, mode = ?mode, "attached");
        }
        Ok(())
    }

    /// Removes one recorded attachment: a tc filter record (directory; the
    /// filter is deleted if the interface still exists) or a pinned TCX link.
    fn remove_attachment(&mut self, dir: &str, ifindex: u32, iface: &str, path: &Path, iface_exists: bool) -> Result<()> {
        if dir == "ingress" {
            // no longer a pod of ours: eBPF host routing stops delivering to it first
            absent_ok(self.pod_ifs_map.remove(&ifindex)).map_err(map_err(MAP_POD_IFS, "delete"))?;
        }
        if path.is_dir() {
            if iface_exists {
                let ty = if dir == "ingress" { TcAttachType::Ingress } else { TcAttachType::Egress };
                if let Ok(link) = SchedClassifierLink::attached(iface, ty, TC_PRIORITY, TcHandle::from(TC_HANDLE), None) {
                    if let Err(e) = link.detach() {
                        debug!(iface, dir, error = %e, "tc filter already gone");
                    }
                }
            }
            std::fs::remove_dir(path).map_err(|source| DatapathError::LinkPin { path: path.to_path_buf(), op: "remove record", source })?;
            return Ok(());
        }
        // unpin and close: the tcx link (and the attachment) goes away
        match PinnedLink::from_pin(path) {
            Ok(l) => {
                l.unpin().map_err(|source| DatapathError::LinkPin { path: path.to_path_buf(), op: "unpin", source })?;
            }
            Err(_) => {
                std::fs::remove_file(path).map_err(|source| DatapathError::LinkPin { path: path.to_path_buf(), op: "remove", source })?;
            }
        }
        Ok(())
    }

    /// Detaches fjord from `iface` (current netns).
    /// If the interface is already gone, its stale records are removed.
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        let dir = self.cfg.pin_dir.join("links");
        let mut found = false;
        let exists = nix::net::if_::if_nametoindex(iface).is_ok();
        for (d, ifindex, name, path) in self.pinned_links() {
            if name == iface {
                found = true;
                self.remove_attachment(&d, ifindex, &name, &path, exists)?;
            }
        }
        if !found {
            return Err(DatapathError::NotAttached { iface: iface.into(), dir });
        }
        Ok(())
    }

    /// Socket-level LB for processes in the cgroup v2 at `cgroup` (e.g. the
    /// node's host-network processes): connect()/sendmsg() to a service go
    /// straight to a Maglev-chosen backend, getpeername()/recvmsg() show the
    /// VIP. Links are pinned as `links/sock-<cgroup inode>-<n>`; re-attaching
    /// replaces them (there is a short window without translation).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let cerr = |source| DatapathError::Cgroup { path: cgroup.to_path_buf(), source };
        let ino = std::fs::metadata(cgroup).map_err(cerr)?.ino();
        let dir = std::fs::File::open(cgroup).map_err(cerr)?;
        if self.sock.is_none() {
            let mut ebpf = loader(&self.cfg)
                .load(BPF_SOCK_OBJECT)
                .map_err(|e| DatapathError::Load { pin_dir: self.cfg.pin_dir.clone(), source: Box::new(e) })?;
            for name in SOCK_PROGS {
                let p: &mut aya::programs::CgroupSockAddr =
                    ebpf.program_mut(name).expect("compiled in").try_into().expect("cgroup sock_addr program");
                p.load().map_err(|e| DatapathError::Program {
                    program: sock_prog_name(name),
                    iface: cgroup.display().to_string(),
                    op: "load (verifier)",
                    source: Box::new(e),
                })?;
            }
            self.sock = Some(ebpf);
        }
        let _ = self.detach_cgroup(cgroup);
        let links = self.cfg.pin_dir.join("links");
        let ebpf = self.sock.as_mut().expect("loaded above");
        for (n, name) in SOCK_PROGS.iter().enumerate() {
            let p: &mut aya::programs::CgroupSockAddr = ebpf.program_mut(name).expect("loaded").try_into().expect("type");
            let perr = |op: &'static str| {
                let iface = cgroup.display().to_string();
                move |e: ProgramError| DatapathError::Program { program: sock_prog_name(name), iface, op, source: Box::new(e) }
            };
            let id = p.attach(&dir, aya::programs::CgroupAttachMode::Single).map_err(perr("attach to cgroup"))?;
            let link = p.take_link(id).map_err(perr("take link"))?;
            let fd: FdLink = link.try_into().map_err(|e: LinkError| DatapathError::Link {
                program: sock_prog_name(name),
                iface: cgroup.display().to_string(),
                op: "convert to fd link",
                source: Box::new(e),
            })?;
            let pin = links.join(format!("sock-{ino}-{n}"));
            fd.pin(&pin).map_err(|e| DatapathError::LinkPin { path: pin.clone(), op: "pin", source: io::Error::other(format!("{e:?}")) })?;
        }
        info!(cgroup = %cgroup.display(), "socket LB attached");
        if !self.sock_cgroups.iter().any(|c| c == cgroup) {
            self.sock_cgroups.push(cgroup.to_path_buf());
        }
        Ok(())
    }

    /// The deleted-pod addresses of this node ([`GoneIps`]): a handle of its own, usable
    /// without holding the datapath (CNI DEL must not wait for a bulk install).
    pub fn gone_ips(&self) -> Arc<GoneIps> {
        self.gone.clone()
    }

    /// Cgroups with the socket LB (attached by this process).
    pub fn socket_lb_cgroups(&self) -> &[PathBuf] {
        &self.sock_cgroups
    }

    /// Detaches the socket LB from `cgroup` (removes its pinned links).
    pub fn detach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(cgroup).map_err(|source| DatapathError::Cgroup { path: cgroup.to_path_buf(), source })?.ino();
        let dir = self.cfg.pin_dir.join("links");
        let prefix = format!("sock-{ino}-");
        let mut found = false;
        let rd = std::fs::read_dir(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                found = true;
                let path = e.path();
                match PinnedLink::from_pin(&path) {
                    Ok(l) => {
                        l.unpin().map_err(|source| DatapathError::LinkPin { path: path.clone(), op: "unpin", source })?;
                    }
                    Err(_) => std::fs::remove_file(&path).map_err(|source| DatapathError::LinkPin { path: path.clone(), op: "remove", source })?,
                }
            }
        }
        self.sock_cgroups.retain(|c| c != cgroup);
        if !found {
            return Err(DatapathError::NotAttached { iface: cgroup.display().to_string(), dir });
        }
        Ok(())
    }

    /// Removes pinned links whose interface no longer exists in the calling
    /// thread's netns (a pod's veth deleted without `detach`). Returns the
    /// names of the interfaces pruned. Call at agent start and after pod GC.
    pub fn prune_stale_links(&mut self) -> Result<Vec<String>> {
        let mut pruned = Vec::new();
        for (dir, ifindex, name, path) in self.pinned_links() {
            let current = nix::net::if_::if_nametoindex(name.as_str()).ok();
            if current != Some(ifindex) {
                // a different interface with this name is not ours to touch
                self.remove_attachment(&dir, ifindex, &name, &path, false)?;
                debug!(iface = %name, ifindex, "pruned stale attachment record");
                pruned.push(name);
            }
        }
        pruned.sort();
        pruned.dedup();
        Ok(pruned)
    }

    /// (interface, direction) of every attachment, sorted.
    pub fn attachments(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self.pinned_links().into_iter().map(|(d, _, i, _)| (i, d)).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Interfaces fjord is attached to (from the pinned links).
    pub fn attached(&self) -> Vec<String> {
        let mut v: Vec<String> = self.attachments().into_iter().map(|(i, _)| i).collect();
        v.dedup();
        v
    }

    /// Entry counts and capacities of every map (for metrics and `fjordctl status`).
    /// Counting walks the keys: O(entries), meant for periodic scraping.
    pub fn map_stats(&self) -> Result<Vec<MapStats>> {
        fn count<K: aya::Pod>(it: aya::maps::MapKeys<'_, K>, name: &'static str) -> Result<u32> {
            let mut n = 0;
            for k in it {
                k.map_err(map_err(name, "iterate keys"))?;
                n += 1;
            }
            Ok(n)
        }
        Ok(vec![
            MapStats { name: MAP_SERVICES, kind: "hash", max_entries: self.cfg.max_services, entries: count(self.services_map.keys(), MAP_SERVICES)? },
            MapStats { name: MAP_BACKENDS, kind: "hash", max_entries: self.cfg.max_backends, entries: count(self.backends_map.keys(), MAP_BACKENDS)? },
            MapStats { name: MAP_MAGLEV, kind: "hash_of_maps", max_entries: self.max_tables, entries: count(self.maglev_map.keys(), MAP_MAGLEV)? },
            MapStats { name: MAP_REVNAT, kind: "hash", max_entries: self.cfg.max_services, entries: count(self.revnat_map.keys(), MAP_REVNAT)? },
            MapStats { name: MAP_CT, kind: "lru_hash", max_entries: self.cfg.ct_entries, entries: count(self.ct_map.keys(), MAP_CT)? },
            MapStats { name: MAP_GONE, kind: "lru_hash", max_entries: GONE_ENTRIES, entries: self.gone.len()? },
            MapStats { name: MAP_POD_IFS, kind: "hash", max_entries: POD_IFS_ENTRIES, entries: count(self.pod_ifs_map.keys(), MAP_POD_IFS)? },
            // one bit per port: "entries" are the ports some backend uses
            MapStats { name: MAP_BACKEND_PORTS, kind: "array (port bits)", max_entries: FJ_PORT_WORDS * 32, entries: self.port_refs.len() as u32 },
            MapStats {
                name: MAP_AFFINITY,
                kind: "lru_hash",
                max_entries: (self.cfg.ct_entries / 4).max(1024),
                entries: count(self.affinity_map.keys(), MAP_AFFINITY)?,
            },
        ])
    }

    /// Datapath counters summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for s in Stat::ALL {
            let v = self.stats_map.get(&(s as u32), 0).map_err(map_err(MAP_STATS, "read"))?;
            out.insert(s.name(), v.iter().sum());
        }
        Ok(out)
    }

    pub fn counter(&self, s: Stat) -> Result<u64> {
        Ok(self.stats_map.get(&(s as u32), 0).map_err(map_err(MAP_STATS, "read"))?.iter().sum())
    }

    /// All conntrack entries (debugging/tests; O(entries)).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let mut v = Vec::new();
        for item in self.ct_map.iter() {
            v.push(item.map_err(map_err(MAP_CT, "iterate"))?);
        }
        Ok(v)
    }

    /// Conntrack garbage collection: removes entries idle for longer than the
    /// timeout of their protocol and TCP state (with the partner entry of the
    /// other direction). The LRU map also evicts the oldest entries when full;
    /// GC keeps it from filling with dead flows. O(entries).
    pub fn gc_conntrack(&mut self) -> Result<GcStats> {
        let now = monotonic_ns();
        let t = self.cfg.timeouts;
        let timeout = |k: &CtKey, v: &CtValue| -> u64 {
            let s = if k.proto != layout::PROTO_TCP {
                t.udp
            } else {
                match v.state {
                    layout::CT_ESTABLISHED => t.tcp_established,
                    layout::CT_CLOSING => t.tcp_closing,
                    _ => t.tcp_syn,
                }
            };
            s as u64 * 1_000_000_000
        };
        let mut stats = GcStats::default();
        let mut dead: Vec<CtKey> = Vec::new();
        for item in self.ct_map.iter() {
            let (k, v) = item.map_err(map_err(MAP_CT, "iterate"))?;
            stats.scanned += 1;
            if now > v.last_seen_ns && now - v.last_seen_ns > timeout(&k, &v) {
                dead.push(k);
                // the reply-side partner of a forward entry goes with it
                match k.dir {
                    layout::CT_DIR_FWD => {
                        let snat = v.flags & layout::CT_F_SNAT != 0;
                        dead.push(CtKey {
                            saddr: v.backend_ip,
                            daddr: if snat { v.nat_ip } else { k.saddr },
                            sport: v.backend_port,
                            dport: if snat { v.nat_port } else { k.sport },
                            proto: k.proto,
                            dir: layout::CT_DIR_REPLY,
                            pad: 0,
                        });
                    }
                    layout::CT_DIR_SNAT_FWD => dead.push(CtKey {
                        saddr: k.daddr,
                        daddr: v.nat_ip,
                        sport: k.dport,
                        dport: v.nat_port,
                        proto: k.proto,
                        dir: layout::CT_DIR_SNAT_REV,
                        pad: 0,
                    }),
                    _ => {}
                }
            }
        }
        dead.sort_by_key(|k| (k.saddr, k.daddr, k.sport, k.dport, k.proto, k.dir));
        dead.dedup();
        for k in dead {
            if self.ct_map.remove(&k).is_ok() {
                stats.removed += 1;
            }
        }
        Ok(stats)
    }

    /// Removes every pinned map and link of this datapath (the node is being
    /// torn down). Programs detach when the last reference goes away.
    pub fn destroy(self) -> Result<()> {
        let dir = self.cfg.pin_dir.clone();
        drop(self);
        remove_pins(&dir)
    }
}

fn sock_prog_name(name: &str) -> &'static str {
    SOCK_PROGS.iter().find(|p| **p == name).copied().unwrap_or("fjord_sock")
}

/// Removes a pin directory created by [`Datapath::load`] (maps and links).
pub fn remove_pins(dir: &Path) -> Result<()> {
    let err = |source| DatapathError::PinDir { path: dir.to_path_buf(), source };
    if !dir.exists() {
        return Ok(());
    }
    let links = dir.join("links");
    if links.exists() {
        for e in std::fs::read_dir(&links).map_err(err)?.flatten() {
            // tc attachment records are directories, TCX links pinned files
            if e.path().is_dir() {
                std::fs::remove_dir(e.path()).map_err(err)?;
            } else {
                std::fs::remove_file(e.path()).map_err(err)?;
            }
        }
        std::fs::remove_dir(&links).map_err(err)?;
    }
    for e in std::fs::read_dir(dir).map_err(err)?.flatten() {
        std::fs::remove_file(e.path()).map_err(err)?;
    }
    std::fs::remove_dir(dir).map_err(err)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr` as used by the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// BPF_MAP_UPDATE_BATCH of u32 keys → values (map fds for a map-in-map, chunks for a
/// Maglev table). On error: how many elements were applied (in order) and the error.
fn update_batch<V>(map_fd: std::os::fd::RawFd, keys: &[u32], values: &[V]) -> std::result::Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    let mut attr = BatchAttr { keys: keys.as_ptr() as u64, values: values.as_ptr() as u64, count: keys.len() as u32, map_fd: map_fd as u32, ..Default::default() };
    // SAFETY: attr points at keys/values that outlive the call; the kernel reads
    // `count` elements of each and writes back `count`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(((attr.count as usize).min(keys.len()), e));
    }
    Ok(())
}

const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// BPF_MAP_DELETE_BATCH of u32 keys. On error: how many were deleted (in order) and the error.
fn delete_batch(map_fd: std::os::fd::RawFd, keys: &[u32]) -> std::result::Result<(), (usize, io::Error)> {
    let mut attr = BatchAttr { keys: keys.as_ptr() as u64, count: keys.len() as u32, map_fd: map_fd as u32, ..Default::default() };
    // SAFETY: attr points at `keys`, which outlives the call; the kernel writes back `count`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(((attr.count as usize).min(keys.len()), e));
    }
    Ok(())
}

/// The distinct backend ids of a table in order of first use. A table holds few
/// distinct ids in long runs: a short list beats hashing all M slots.
fn distinct_in_order(slots: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    let mut seen: Option<HashSet<u32>> = None;
    let mut last = None;
    for &id in slots {
        if last == Some(id) {
            continue;
        }
        last = Some(id);
        let new = match &mut seen {
            Some(set) => set.insert(id),
            None => !out.contains(&id),
        };
        if new {
            out.push(id);
            if seen.is_none() && out.len() > 32 {
                seen = Some(out.iter().copied().collect());
            }
        }
    }
    out
}

/// Number of chunks of a Maglev table of `m` slots.
fn table_chunks(m: u32) -> usize {
    (m as usize).div_ceil(MAGLEV_CHUNK)
}

/// A new, empty Maglev table for M = `m` (an inner map of fjord_maglev).
fn create_table(m: u32) -> std::result::Result<MapData, MapError> {
    let obj = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, (MAGLEV_CHUNK * 4) as u32, table_chunks(m) as u32, BPF_F_INNER_MAP);
    MapData::create(obj, "fjord_mgl_tbl", None)
}

/// Writes a whole table (`m` backend ids, slot order) with one BPF_MAP_UPDATE_BATCH.
/// Only for tables no packet reads (new, or spares past their grace period): array
/// elements are copied in place.
fn write_table(map: &MapData, m: u32, ids: impl Iterator<Item = u32>, key: ServiceKey) -> Result<()> {
    thread_local! {
        // one buffer per thread, reused: a fresh 64 KiB allocation per table costs page
        // faults when the allocator hands memory back and forth with the kernel
        static BUF: std::cell::RefCell<(Vec<u32>, Vec<[u32; MAGLEV_CHUNK]>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    let n = table_chunks(m);
    BUF.with_borrow_mut(|(keys, chunks)| {
        keys.clear();
        keys.extend(0..n as u32);
        chunks.clear();
        chunks.resize(n, [0u32; MAGLEV_CHUNK]);
        for (slot, id) in chunks.as_flattened_mut().iter_mut().zip(ids) {
            *slot = id;
        }
        update_batch(map.fd().as_fd().as_raw_fd(), keys, chunks).map_err(|(_, e)| DatapathError::Table { key, op: "write", source: e })
    })
}

/// Reads a whole table back: `m` backend ids in slot order (one BPF_MAP_LOOKUP_BATCH).
fn read_table(map: &MapData, m: u32, key: ServiceKey) -> Result<Vec<u32>> {
    let n = table_chunks(m);
    let mut chunks = vec![[0u32; MAGLEV_CHUNK]; n];
    let mut keys = vec![0u32; n];
    let mut next = 0u32;
    let mut attr = BatchAttr {
        out_batch: &mut next as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: chunks.as_mut_ptr() as u64,
        count: n as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr points at `next`, `keys` (n u32) and `chunks` (n values of the map's
    // value size), all alive for the call; the kernel writes at most `count` of each.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>()) };
    // an array answers ENOENT once it has reached its end, with every element copied
    let err = (r < 0).then(io::Error::last_os_error).filter(|e| e.raw_os_error() != Some(libc::ENOENT));
    if let Some(source) = err {
        return Err(DatapathError::Table { key, op: "read", source });
    }
    if attr.count as usize != n || keys.iter().enumerate().any(|(i, k)| *k as usize != i) {
        let source = io::Error::other(format!("batch read returned {} of {n} chunks", attr.count));
        return Err(DatapathError::Table { key, op: "read", source });
    }
    let mut ids = chunks.into_flattened();
    ids.truncate(m as usize);
    Ok(ids)
}

fn pinned_max_entries(ebpf: &Ebpf, name: &'static str) -> Result<u32> {
    let md = match ebpf.map(name) {
        Some(Map::HashMap(d)) | Some(Map::LruHashMap(d)) | Some(Map::HashOfMaps(d)) | Some(Map::Array(d)) => d,
        _ => return Ok(0),
    };
    md.info().map(|i| i.max_entries()).map_err(map_err(name, "read map info"))
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+): what
/// `bpf_get_netns_cookie()` returns for sockets of that namespace.
pub fn own_netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("127.0.0.1:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len are valid for the size passed
    let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, 71 /* SO_NETNS_COOKIE */, &mut cookie as *mut u64 as *mut libc::c_void, &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;


    #[test]
    fn distinct_ids_keep_first_use_order() {
        assert_eq!(distinct_in_order(&[]), Vec::<u32>::new());
        assert_eq!(distinct_in_order(&[7, 7, 3, 7, 9, 3, 9]), vec![7, 3, 9]);
        // past 32 distinct ids a set takes over; order and uniqueness stay
        let many: Vec<u32> = (0..100u32).chain(0..100).chain((0..100).rev()).collect();
        assert_eq!(distinct_in_order(&many), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn datapath_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Datapath>();
        send::<DatapathError>();
    }

    #[test]
    fn config_validation_names_the_field() {
        let ok = DatapathConfig::for_node("n1");
        assert_eq!(ok.pin_dir, Path::new("/sys/fs/bpf/fjord/n1"));
        ok.validate().unwrap();
        for (cfg, field) in [
            (DatapathConfig { maglev_size: 16383, ..ok.clone() }, "maglev_size"),
            (DatapathConfig { max_services: 0, ..ok.clone() }, "max_services"),
            (DatapathConfig { max_backends: 0, ..ok.clone() }, "max_backends"),
            (DatapathConfig { ct_entries: 1, ..ok.clone() }, "ct_entries"),
        ] {
            let e = cfg.validate().unwrap_err();
            assert!(matches!(&e, DatapathError::Config { field: f, .. } if *f == field), "{e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn the_object_contains_every_map_and_program() {
        let obj = aya_obj::Object::parse(BPF_OBJECT).expect("parse the compiled object");
        for m in ALL_MAPS {
            assert!(obj.maps.contains_key(m), "map {m} missing from bpf/fjord_lb.c");
        }
        for p in [PROG_FROM_POD, PROG_TO_POD] {
            assert!(obj.programs.contains_key(p), "program {p} missing");
        }
        let sock = aya_obj::Object::parse(BPF_SOCK_OBJECT).expect("parse the socket-LB object");
        for p in SOCK_PROGS {
            assert!(sock.programs.contains_key(p), "program {p} missing from bpf/fjord_sock.c");
        }
        for m in ALL_MAPS {
            assert!(sock.maps.contains_key(m), "map {m} missing from the socket-LB object");
        }
    }
}
