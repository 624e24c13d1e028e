//! `preflight`: can this node run fjord? Facts are gathered by
//! [`gather_facts`] (I/O); [`evaluate`] turns them into PASS/WARN/FAIL/SKIP
//! checks and is pure, so every decision is unit-tested with made-up facts.

use crate::bpfprobe::{self, ProbeOutcome, ProbeResult};
use crate::fsync::{self, FsyncBenchOptions, FsyncBenchResult};
use crate::host::{self, MemInfo, Mount};
use crate::mapsize::MapSizes;
use crate::size::{format_bytes, format_ns};
use crate::stats::FsyncVerdict;
use crate::sysctl::{self, Action, PlanItem};
use crate::virt::{self, VirtKind, Virtualization};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Oldest kernel fjord supports fully: bpf_redirect_peer and bpf_redirect_neigh arrived in 5.10.
pub const MIN_KERNEL_FULL: (u32, u32) = (5, 10);
/// Below this the datapath cannot load at all (cgroup sock_addr getpeername, LRU maps, BTF).
pub const MIN_KERNEL: (u32, u32) = (5, 4);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Skip,
    Warn,
    Fail,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Skip => "SKIP",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub id: String,
    pub status: Status,
    /// One line: why this status.
    pub reason: String,
    /// What to do about it (absent for PASS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

fn check(id: &str, status: Status, reason: impl Into<String>, fix: Option<&str>) -> Check {
    Check { id: id.into(), status, reason: reason.into(), fix: fix.map(str::to_string), details: vec![] }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
    pub skip: usize,
}

/// The preflight report; `fjordctl status --verbose` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub kernel: String,
    pub running_as_root: bool,
    pub checks: Vec<Check>,
    pub summary: Summary,
    /// true when no check FAILed.
    pub ok: bool,
}

impl Report {
    pub fn exit_code(&self) -> i32 {
        if self.ok {
            0
        } else {
            1
        }
    }
}

/// BTF state of /sys/kernel/btf/vmlinux.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Btf {
    Present,
    Missing,
    BadMagic,
    Unreadable(String),
}

/// Everything preflight looks at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    pub kernel_release: String,
    pub root: bool,
    pub bpf_syscall: ProbeOutcome,
    pub probes: Vec<ProbeResult>,
    pub btf: Btf,
    /// None when /proc/self/mounts could not be read.
    pub mounts: Option<Vec<Mount>>,
    /// Raw /proc/sys/net/core/bpf_jit_enable, None when absent.
    pub jit_enable: Option<String>,
    pub virt: Virtualization,
    /// /lib/modules/<release>/build or /usr/src/linux-headers-<release> exists.
    pub kernel_headers: bool,
    pub sysctl_plan: Result<Vec<PlanItem>, String>,
    pub meminfo: Result<MemInfo, String>,
    pub ncpus: u64,
    /// None when skipped.
    pub fsync: Option<Result<FsyncBenchResult, String>>,
}

/// What preflight checks against.
#[derive(Debug, Clone)]
pub struct PreflightOptions {
    pub map_sizes: MapSizes,
    /// Run the quick etcd fsync check in this directory; None skips it.
    pub fsync_dir: Option<PathBuf>,
    pub proc_sys: PathBuf,
}

impl Default for PreflightOptions {
    /// Everything except the fsync check (which writes to disk for ~a second);
    /// this is what `fjordctl status --verbose` should use.
    fn default() -> Self {
        Self { map_sizes: MapSizes::default(), fsync_dir: None, proc_sys: PathBuf::from("/proc/sys") }
    }
}

fn read_btf(path: &Path) -> Btf {
    use std::io::Read;
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Btf::Missing,
        Err(e) => Btf::Unreadable(e.to_string()),
        Ok(mut f) => {
            let mut magic = [0u8; 2];
            match f.read_exact(&mut magic) {
                // BTF magic 0xeB9F, stored in host (little-endian) order
                Ok(()) if u16::from_le_bytes(magic) == 0xEB9F || u16::from_be_bytes(magic) == 0xEB9F => Btf::Present,
                Ok(()) => Btf::BadMagic,
                Err(e) => Btf::Unreadable(e.to_string()),
            }
        }
    }
}

/// Gathers the facts from this machine. Loads (never attaches) tiny BPF
/// programs and maps; runs the quick fsync benchmark when `fsync_dir` is set.
pub fn gather_facts(opts: &PreflightOptions) -> Facts {
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let root = nix::unistd::geteuid().is_root();
    let bpf_syscall = bpfprobe::probe_syscall();
    let probes = if bpf_syscall == ProbeOutcome::Supported { bpfprobe::probe_all() } else { vec![] };
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok().map(|t| host::parse_mounts(&t));
    let jit_enable = std::fs::read_to_string(opts.proc_sys.join("net/core/bpf_jit_enable")).ok().map(|s| s.trim().to_string());
    let kernel_headers = Path::new(&format!("/lib/modules/{kernel_release}/build")).exists()
        || Path::new(&format!("/usr/src/linux-headers-{kernel_release}")).exists();
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo: {e}"))
        .and_then(|t| host::parse_meminfo(&t).map_err(|e| format!("/proc/meminfo: {e}")));
    let mem_total = meminfo.as_ref().map(|m| m.total_bytes).unwrap_or(0);
    let sysctl_plan = if mem_total == 0 {
        Err("memory unknown, cannot scale the profile".to_string())
    } else {
        crate::tune::make_plan(&opts.proc_sys, &sysctl::profile(mem_total)).map_err(|e| e.to_string())
    };
    let ncpus = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| crate::mapsize::parse_cpu_list(&s))
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1));
    let fsync = opts.fsync_dir.as_ref().map(|dir| {
        let o = FsyncBenchOptions {
            dir: dir.clone(),
            size: fsync::QUICK_SIZE,
            block_size: fsync::DEFAULT_BLOCK_SIZE,
            preallocate: true,
        };
        // Ctrl-C during the benchmark stops it and removes its file (see run_preflight).
        let guard = crate::signals::InterruptGuard::install().ok();
        let local = AtomicBool::new(false);
        let cancel = guard.as_ref().map(|g| g.flag()).unwrap_or(&local);
        fsync::bench_fsync(&o, cancel, &mut |_, _| {}).map_err(|e| e.to_string())
    });
    Facts {
        kernel_release,
        root,
        bpf_syscall,
        probes,
        btf: read_btf(Path::new("/sys/kernel/btf/vmlinux")),
        mounts,
        jit_enable,
        virt: virt::classify(&virt::gather(Path::new("/"))),
        kernel_headers,
        sysctl_plan,
        meminfo,
        ncpus,
        fsync,
    }
}

const NEED_ROOT: &str = "re-run as root (sudo fjordctl preflight): loading BPF needs CAP_BPF and CAP_NET_ADMIN";

fn probe_check(id: &str, what: &str, f: &Facts, kind: &str, fix: &str) -> Check {
    match &f.bpf_syscall {
        ProbeOutcome::Supported => {}
        ProbeOutcome::NoPermission if !f.root => {
            return check(id, Status::Skip, format!("could not probe {what}: not running as root"), Some(NEED_ROOT))
        }
        other => {
            return check(id, Status::Fail, format!("could not probe {what}: bpf() is unusable ({other:?})"), Some(fix))
        }
    }
    let mine: Vec<&ProbeResult> = f.probes.iter().filter(|p| p.kind == kind).collect();
    let bad: Vec<String> = mine
        .iter()
        .filter(|p| p.outcome != ProbeOutcome::Supported)
        .map(|p| match &p.outcome {
            ProbeOutcome::Unsupported { reason } => format!("{}: {reason}", p.name),
            o => format!("{}: {o:?}", p.name),
        })
        .collect();
    let perm = mine.iter().any(|p| p.outcome == ProbeOutcome::NoPermission);
    if bad.is_empty() {
        let names: Vec<&str> = mine.iter().map(|p| p.name.as_str()).collect();
        let mut c = check(id, Status::Pass, format!("all {} {what} load", mine.len()), None);
        c.details = names.iter().map(|s| s.to_string()).collect();
        c
    } else if perm && !f.root {
        let mut c = check(id, Status::Skip, format!("{} of {} {what} could not be probed without root", bad.len(), mine.len()), Some(NEED_ROOT));
        c.details = bad;
        c
    } else {
        let mut c = check(id, Status::Fail, format!("{} of {} {what} unavailable: {}", bad.len(), mine.len(), bad[0]), Some(fix));
        c.details = bad;
        c
    }
}

/// Pure: facts + map sizes → report.
pub fn evaluate(f: &Facts, maps: &MapSizes) -> Report {
    let mut checks = Vec::new();

    // kernel version
    checks.push(match host::parse_kernel_release(&f.kernel_release) {
        None => check("kernel", Status::Warn, format!("cannot parse kernel release {:?}", f.kernel_release), Some("check `uname -r`; fjord needs Linux 5.10 or newer")),
        Some((a, b, c)) if (a, b) >= MIN_KERNEL_FULL => check("kernel", Status::Pass, format!("Linux {a}.{b}.{c} (>= 5.10)"), None),
        Some((a, b, c)) if (a, b) >= MIN_KERNEL => check(
            "kernel",
            Status::Warn,
            format!("Linux {a}.{b}.{c}: older than 5.10, so bpf_redirect_peer/redirect_neigh fast paths may be missing (the helper probes decide)"),
            Some("upgrade to a 5.10+ kernel (e.g. Debian 12's 6.1)"),
        ),
        Some((a, b, c)) => check("kernel", Status::Fail, format!("Linux {a}.{b}.{c} is older than 5.4: fjord's eBPF datapath cannot load"), Some("upgrade to a 5.10+ kernel (e.g. Debian 12's 6.1)")),
    });

    // bpf() syscall
    checks.push(match &f.bpf_syscall {
        ProbeOutcome::Supported => check("bpf_syscall", Status::Pass, "bpf() works: created a test map", None),
        ProbeOutcome::NoPermission if !f.root => check("bpf_syscall", Status::Skip, "bpf() denied: not running as root", Some(NEED_ROOT)),
        ProbeOutcome::NoPermission => check(
            "bpf_syscall",
            Status::Fail,
            "bpf() denied even as root: a container runtime (seccomp/AppArmor) or a lockdown LSM blocks it",
            Some("run fjord on the host or as a privileged container with CAP_BPF/CAP_SYS_ADMIN; LXC/OpenVZ VPSes cannot, use a KVM VM"),
        ),
        ProbeOutcome::NoSyscall => check("bpf_syscall", Status::Fail, "bpf() does not exist (ENOSYS): kernel built without CONFIG_BPF_SYSCALL, or blocked by seccomp", Some("use a distribution kernel with CONFIG_BPF_SYSCALL=y, on KVM or bare metal")),
        ProbeOutcome::Unsupported { reason } | ProbeOutcome::Failed { error: reason } => check("bpf_syscall", Status::Fail, format!("bpf() failed: {reason}"), Some("check dmesg and the kernel's BPF config")),
    });

    checks.push(probe_check("bpf_programs", "program types", f, "program", "use a kernel with CONFIG_NET_CLS_BPF, CONFIG_CGROUP_BPF and XDP (5.10+)"));
    checks.push(probe_check("bpf_maps", "map types", f, "map", "use a kernel with BPF map-in-map, LRU and LPM support (5.10+)"));
    checks.push(probe_check("bpf_helpers", "helpers", f, "helper", "use a 5.10+ kernel: redirect_peer and redirect_neigh need it"));

    // BTF
    checks.push(match &f.btf {
        Btf::Present => check("btf", Status::Pass, "/sys/kernel/btf/vmlinux present", None),
        Btf::Missing => check("btf", Status::Fail, "/sys/kernel/btf/vmlinux missing: the kernel has no BTF", Some("use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian/Ubuntu/Fedora kernels are)")),
        Btf::BadMagic => check("btf", Status::Fail, "/sys/kernel/btf/vmlinux is not BTF (bad magic)", Some("use a kernel built with CONFIG_DEBUG_INFO_BTF=y")),
        Btf::Unreadable(e) if !f.root => check("btf", Status::Skip, format!("/sys/kernel/btf/vmlinux unreadable: {e}"), Some(NEED_ROOT)),
        Btf::Unreadable(e) => check("btf", Status::Fail, format!("/sys/kernel/btf/vmlinux unreadable: {e}"), Some("check permissions on /sys/kernel/btf")),
    });

    // bpffs and cgroup v2
    match &f.mounts {
        None => {
            checks.push(check("bpffs", Status::Warn, "cannot read /proc/self/mounts", Some("check that /proc is mounted")));
            checks.push(check("cgroup2", Status::Warn, "cannot read /proc/self/mounts", Some("check that /proc is mounted")));
        }
        Some(m) => {
            let bpf: Vec<&Mount> = m.iter().filter(|x| x.fstype == "bpf").collect();
            checks.push(if bpf.iter().any(|x| x.target == "/sys/fs/bpf") {
                check("bpffs", Status::Pass, "bpffs mounted at /sys/fs/bpf", None)
            } else if let Some(x) = bpf.first() {
                check("bpffs", Status::Warn, format!("bpffs mounted at {} but not at /sys/fs/bpf, where fjord pins its maps", x.target), Some("mount -t bpf bpf /sys/fs/bpf"))
            } else {
                check(
                    "bpffs",
                    Status::Fail,
                    "bpffs not mounted: fjord pins its maps there so an agent restart keeps flows",
                    Some("mount -t bpf bpf /sys/fs/bpf, and add `bpf /sys/fs/bpf bpf defaults 0 0` to /etc/fstab"),
                )
            });
            let cg: Vec<&Mount> = m.iter().filter(|x| x.fstype == "cgroup2").collect();
            checks.push(match cg.iter().find(|x| x.target == "/sys/fs/cgroup") {
                Some(_) => check("cgroup2", Status::Pass, "cgroup v2 (unified) at /sys/fs/cgroup", None),
                None => match cg.first() {
                    Some(x) => check("cgroup2", Status::Pass, format!("cgroup v2 at {} (hybrid layout); fjord attaches its socket programs there", x.target), None),
                    None => check(
                        "cgroup2",
                        Status::Fail,
                        "no cgroup v2 mount: socket-level load balancing (cgroup/connect4) needs it",
                        Some("boot with systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup/unified"),
                    ),
                },
            });
        }
    }

    // JIT
    checks.push(match f.jit_enable.as_deref() {
        Some("1") | Some("2") => check("bpf_jit", Status::Pass, "BPF JIT enabled", None),
        Some("0") => check("bpf_jit", Status::Fail, "BPF JIT disabled: programs run interpreted, several times slower", Some("sysctl -w net.core.bpf_jit_enable=1 (and set it in /etc/sysctl.d)")),
        Some(v) => check("bpf_jit", Status::Warn, format!("unexpected net.core.bpf_jit_enable value {v:?}"), Some("sysctl -w net.core.bpf_jit_enable=1")),
        None => check("bpf_jit", Status::Warn, "net.core.bpf_jit_enable missing: kernel built without the BPF JIT (or always-on)", Some("use a kernel with CONFIG_BPF_JIT=y")),
    });

    // virtualization
    let v = &f.virt;
    let tech = v.technology.clone().unwrap_or_default();
    let mut vc = match v.kind {
        VirtKind::BareMetal => check("virtualization", Status::Pass, "bare metal", None),
        VirtKind::Vm => check("virtualization", Status::Pass, format!("virtual machine ({tech}): own kernel, full eBPF"), None),
        VirtKind::Unknown => check("virtualization", Status::Pass, "no hypervisor or container detected", None),
        VirtKind::Container if tech == "openvz" => check(
            "virtualization",
            Status::Fail,
            "inside an OpenVZ container: the shared host kernel does not let containers load eBPF",
            Some("run fjord on a KVM virtual machine or bare metal"),
        ),
        VirtKind::Container => {
            let loads = f.bpf_syscall == ProbeOutcome::Supported;
            check(
                "virtualization",
                Status::Warn,
                format!(
                    "inside a container ({tech}{}): the kernel is the host's; eBPF {} here",
                    v.host_vm.as_deref().map(|h| if h == "vm" { " on a VM".to_string() } else { format!(" on a {h} VM") }).unwrap_or_default(),
                    if loads {
                        "loads (privileged container)"
                    } else if !f.root {
                        "was not tested (not root)"
                    } else {
                        "is restricted"
                    }
                ),
                Some("fine for a privileged fjord DaemonSet pod with the host's /sys/fs/bpf; on an LXC/OpenVZ VPS use a KVM VM instead"),
            )
        }
    };
    vc.details = v.evidence.clone();
    checks.push(vc);

    // kernel headers
    checks.push(match (f.kernel_headers, &f.btf) {
        (true, _) => check("kernel_headers", Status::Pass, format!("kernel headers for {} installed", f.kernel_release), None),
        (false, Btf::Present) => check("kernel_headers", Status::Pass, "kernel headers not installed, and not needed: fjord ships precompiled programs and reads types from BTF", None),
        (false, _) => check(
            "kernel_headers",
            Status::Warn,
            "no kernel headers and no BTF: programs that read kernel structures cannot be relocated",
            Some("install linux-headers-$(uname -r), or better a kernel with BTF"),
        ),
    });

    // sysctls
    checks.push(match &f.sysctl_plan {
        Err(e) => check("sysctls", Status::Warn, format!("cannot read the sysctls: {e}"), Some("fjordctl tune")),
        Ok(plan) => {
            let set: Vec<&PlanItem> = plan.iter().filter(|p| p.action == Action::Set).collect();
            let missing: Vec<&PlanItem> = plan.iter().filter(|p| p.action == Action::Missing).collect();
            let mut details: Vec<String> = set.iter().map(|p| format!("{}: {} → {}", p.key, p.current.as_deref().unwrap_or("-"), p.target)).collect();
            details.extend(missing.iter().map(|p| format!("{}: not present (module not loaded?)", p.key)));
            let mut c = if set.is_empty() {
                check("sysctls", Status::Pass, format!("all {} network sysctls at or above fjord's memory-scaled profile", plan.len() - missing.len()), None)
            } else {
                check(
                    "sysctls",
                    Status::Warn,
                    format!("{} of {} sysctls differ from the memory-scaled profile (first: {})", set.len(), plan.len(), details[0]),
                    Some("fjordctl tune (review), then fjordctl tune --apply"),
                )
            };
            c.details = details;
            c
        }
    });

    // memory for the maps
    checks.push(match (&f.meminfo, maps.validate()) {
        (_, Err(e)) => check("map_memory", Status::Fail, format!("invalid map size: {e}"), Some("fix the flag")),
        (Err(e), _) => check("map_memory", Status::Warn, e.clone(), Some("check /proc/meminfo")),
        (Ok(m), Ok(())) => {
            let est = maps.maps(m.total_bytes, f.ncpus);
            let need = est.total_bytes;
            let details = est.maps.iter().map(|x| format!("{} ({}, {} entries): {}", x.name, x.map_type, x.max_entries, format_bytes(x.bytes))).collect();
            let summary = format!("maps need ~{} of {} available", format_bytes(need), format_bytes(m.available_bytes));
            let mut c = if need > m.available_bytes {
                check("map_memory", Status::Fail, format!("{summary}: not enough memory"), Some("lower --ct-entries/--services/--maglev-table-size, or add RAM"))
            } else if need > m.available_bytes / 4 {
                check("map_memory", Status::Warn, format!("{summary}: more than a quarter of available memory"), Some("lower --ct-entries/--services, or add RAM"))
            } else {
                check("map_memory", Status::Pass, summary, None)
            };
            c.details = details;
            c
        }
    });

    // etcd fsync
    checks.push(match &f.fsync {
        None => check("etcd_fsync", Status::Skip, "skipped (--skip-fsync, or not requested)", Some("fjordctl bench fsync --dir <etcd data dir>")),
        Some(Err(e)) if !f.root && (e.contains("Permission denied") || e.contains("os error 13")) => {
            check(
                "etcd_fsync",
                Status::Skip,
                format!("could not write the test file: {e}"),
                Some("re-run as root, or pass --fsync-dir with a directory you can write on etcd's disk"),
            )
        }
        Some(Err(e)) => check("etcd_fsync", Status::Fail, format!("fsync check failed: {e}"), Some("pass --fsync-dir with a writable directory on etcd's disk")),
        Some(Ok(r)) => {
            let l = &r.fdatasync;
            let line = format!(
                "fdatasync p50 {} p99 {} over {} writes in {} ({})",
                format_ns(l.p50_ns),
                format_ns(l.p99_ns),
                r.writes,
                r.dir.display(),
                r.filesystem
            );
            let mut c = match r.verdict {
                _ if r.filesystem == "tmpfs" || r.filesystem == "ramfs" => check(
                    "etcd_fsync",
                    Status::Warn,
                    format!("{line}: {} is in memory, says nothing about the disk", r.dir.display()),
                    Some("pass --fsync-dir on the disk etcd uses"),
                ),
                FsyncVerdict::Good => check("etcd_fsync", Status::Pass, format!("{line}: under 2 ms"), None),
                FsyncVerdict::Acceptable => check("etcd_fsync", Status::Warn, format!("{line}: under etcd's 10 ms minimum but above 2 ms"), Some("put etcd's data dir on local NVMe/SSD; confirm with fjordctl bench fsync")),
                FsyncVerdict::TooSlow => check("etcd_fsync", Status::Fail, format!("{line}: at or above etcd's 10 ms minimum"), Some("move etcd's data dir to a local SSD/NVMe disk; confirm with fjordctl bench fsync")),
            };
            c.details = r.notes.clone();
            c
        }
    });

    let mut summary = Summary::default();
    for c in &checks {
        match c.status {
            Status::Pass => summary.pass += 1,
            Status::Warn => summary.warn += 1,
            Status::Fail => summary.fail += 1,
            Status::Skip => summary.skip += 1,
        }
    }
    Report { kernel: f.kernel_release.clone(), running_as_root: f.root, ok: summary.fail == 0, summary, checks }
}

/// Gathers and evaluates: the preflight report as data.
pub fn preflight_report(opts: &PreflightOptions) -> Report {
    evaluate(&gather_facts(opts), &opts.map_sizes)
}

pub fn render_text(r: &Report, verbose: bool) -> String {
    let mut s = format!(
        "fjord preflight: kernel {}, {}\n",
        r.kernel,
        if r.running_as_root { "running as root" } else { "NOT root: checks that need root are SKIPped" }
    );
    let w = r.checks.iter().map(|c| c.id.len()).max().unwrap_or(10);
    for c in &r.checks {
        s.push_str(&format!("{}  {:w$}  {}\n", c.status, c.id, c.reason));
        if let Some(fix) = &c.fix {
            if c.status != Status::Pass {
                s.push_str(&format!("      {:w$}  fix: {fix}\n", ""));
            }
        }
        if verbose || c.status == Status::Fail {
            for d in &c.details {
                s.push_str(&format!("      {:w$}  - {d}\n", ""));
            }
        }
    }
    let m = &r.summary;
    s.push_str(&format!(
        "summary: {} pass, {} warn, {} fail, {} skipped → {}\n",
        m.pass,
        m.warn,
        m.fail,
        m.skip,
        if r.ok { "node is ready for fjord" } else { "NOT READY: fix the FAILs above" }
    ));
    if m.skip > 0 && !r.running_as_root {
        s.push_str("note: re-run as root to do the skipped checks\n");
    }
    s
}

/// `fjordctl preflight`: can this node run fjord?
#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Check that this node can run fjord (kernel, eBPF features, BTF, bpffs, cgroup v2, JIT, virtualization, sysctls, memory, etcd disk)",
    long_about = "Runs every check and prints PASS/WARN/FAIL/SKIP with a one-line reason and the fix. eBPF features are probed by \
loading tiny programs and maps (nothing is attached). The etcd check runs a quick fdatasync benchmark (2 MiB in 2300-byte writes) \
in --fsync-dir. Run as root; without root the checks that need it are reported as SKIP.\n\nExit code: 0 when no check FAILs, 1 otherwise."
)]
pub struct PreflightArgs {
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value_t = crate::OutputFormat::Text)]
    pub output: crate::OutputFormat,
    /// Show every check's details (probed features, map sizes, differing sysctls)
    #[arg(short, long)]
    pub verbose: bool,
    /// Directory on etcd's disk for the quick fsync check [default: /var/lib/etcd if it exists, else /var/tmp]
    #[arg(long, value_name = "DIR", env = "FJORD_FSYNC_DIR")]
    pub fsync_dir: Option<PathBuf>,
    /// Skip the fsync check (it writes 2 MiB with an fdatasync per 2300 bytes)
    #[arg(long)]
    pub skip_fsync: bool,
    /// The sysctl tree to read
    #[arg(long, value_name = "DIR", default_value = "/proc/sys")]
    pub proc_sys: PathBuf,
    #[command(flatten)]
    pub maps: MapSizes,
}

impl PreflightArgs {
    pub fn options(&self) -> PreflightOptions {
        PreflightOptions {
            map_sizes: self.maps.clone(),
            fsync_dir: if self.skip_fsync { None } else { Some(self.fsync_dir.clone().unwrap_or_else(fsync::default_dir)) },
            proc_sys: self.proc_sys.clone(),
        }
    }
}

pub fn run_preflight(args: &PreflightArgs) -> anyhow::Result<i32> {
    if let Err(e) = args.maps.validate() {
        anyhow::bail!("invalid map size: {e}");
    }
    let report = preflight_report(&args.options());
    if crate::signals::interrupted() {
        eprintln!("fjord preflight: interrupted; the fsync test file was removed");
        return Ok(130);
    }
    match args.output {
        crate::OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        crate::OutputFormat::Text => print!("{}", render_text(&report, args.verbose)),
    }
    Ok(report.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LatencySummary;
    use crate::virt::VirtFacts;

    const GIB: u64 = 1 << 30;

    fn mounts(text: &str) -> Option<Vec<Mount>> {
        Some(host::parse_mounts(text))
    }

    fn fsync_result(p99_ns: u64, fs: &str) -> FsyncBenchResult {
        FsyncBenchResult {
            dir: "/var/lib/etcd".into(),
            filesystem: fs.into(),
            size_bytes: fsync::QUICK_SIZE,
            block_size: 2300,
            preallocated: true,
            writes: 911,
            bytes_written: 911 * 2300,
            elapsed_ns: 1_000_000_000,
            iops: 911.0,
            fdatasync: LatencySummary { count: 911, min_ns: 1, mean_ns: 2, p50_ns: 3, p90_ns: 4, p99_ns, p99_9_ns: p99_ns, max_ns: p99_ns },
            verdict: FsyncVerdict::from_p99(p99_ns),
            verdict_text: String::new(),
            notes: vec![],
        }
    }

    /// A healthy KVM node.
    fn good() -> Facts {
        let probes = bpfprobe::PROGRAMS
            .iter()
            .map(|p| ProbeResult { kind: "program".into(), name: p.name.into(), outcome: ProbeOutcome::Supported })
            .chain(bpfprobe::MAPS.iter().map(|m| ProbeResult { kind: "map".into(), name: m.name.into(), outcome: ProbeOutcome::Supported }))
            .chain(bpfprobe::HELPERS.iter().map(|h| ProbeResult { kind: "helper".into(), name: h.name.into(), outcome: ProbeOutcome::Supported }))
            .collect();
        let targets = sysctl::profile(8 * GIB);
        let cur = targets.iter().map(|t| (t.key.clone(), Some(t.value.clone()))).collect();
        Facts {
            kernel_release: "6.1.0-28-amd64".into(),
            root: true,
            bpf_syscall: ProbeOutcome::Supported,
            probes,
            btf: Btf::Present,
            mounts: mounts("bpf /sys/fs/bpf bpf rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"),
            jit_enable: Some("1".into()),
            virt: virt::classify(&VirtFacts { systemd_detect_virt: Some("kvm".into()), cpuinfo_hypervisor: true, ..Default::default() }),
            kernel_headers: false,
            sysctl_plan: Ok(sysctl::plan(&targets, &cur, &|k| k.to_string()).unwrap()),
            meminfo: Ok(MemInfo { total_bytes: 8 * GIB, available_bytes: 6 * GIB }),
            ncpus: 4,
            fsync: Some(Ok(fsync_result(900_000, "ext4"))),
        }
    }

    fn status(r: &Report, id: &str) -> Status {
        r.checks.iter().find(|c| c.id == id).unwrap_or_else(|| panic!("no check {id}")).status
    }

    #[test]
    fn healthy_node_passes_everything() {
        let r = evaluate(&good(), &MapSizes::default());
        assert!(r.ok, "{r:#?}");
        assert_eq!(r.exit_code(), 0);
        assert_eq!(r.summary, Summary { pass: 14, warn: 0, fail: 0, skip: 0 });
        for c in &r.checks {
            assert_eq!(c.status, Status::Pass, "{c:?}");
            assert!(!c.reason.is_empty());
        }
        // JSON round-trip: what `fjordctl status --verbose` consumes
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"status\":\"PASS\""));
        let back: Report = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn kernel_version_thresholds() {
        for (rel, st) in [("6.18.44-fc", Status::Pass), ("5.10.0", Status::Pass), ("5.4.0-150-generic", Status::Warn), ("4.19.0", Status::Fail), ("3.10.0-1160.el7", Status::Fail), ("weird", Status::Warn)] {
            let f = Facts { kernel_release: rel.into(), ..good() };
            assert_eq!(status(&evaluate(&f, &MapSizes::default()), "kernel"), st, "{rel}");
        }
    }

    #[test]
    fn missing_features_fail_with_a_fix() {
        let mut f = good();
        f.probes.iter_mut().find(|p| p.name == "redirect_peer").unwrap().outcome =
            ProbeOutcome::Unsupported { reason: "verifier: invalid func unknown#155".into() };
        f.btf = Btf::Missing;
        f.jit_enable = Some("0".into());
        f.mounts = mounts("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n");
        let r = evaluate(&f, &MapSizes::default());
        assert!(!r.ok);
        assert_eq!(r.exit_code(), 1);
        for id in ["bpf_helpers", "btf", "bpf_jit", "bpffs", "cgroup2"] {
            let c = r.checks.iter().find(|c| c.id == id).unwrap();
            assert_eq!(c.status, Status::Fail, "{c:?}");
            assert!(c.fix.as_deref().is_some_and(|x| !x.is_empty()), "{c:?}");
        }
        let h = r.checks.iter().find(|c| c.id == "bpf_helpers").unwrap();
        assert!(h.reason.contains("redirect_peer"), "{}", h.reason);
        // without BTF, missing headers become a warning
        assert_eq!(status(&r, "kernel_headers"), Status::Warn);
        assert_eq!(r.summary.fail, 5);
    }

    #[test]
    fn bpffs_elsewhere_and_hybrid_cgroup() {
        let f = Facts { mounts: mounts("bpf /run/bpf bpf rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"), ..good() };
        let r = evaluate(&f, &MapSizes::default());
        assert_eq!(status(&r, "bpffs"), Status::Warn);
        assert_eq!(status(&r, "cgroup2"), Status::Pass);
    }

    #[test]
    fn non_root_skips_what_needs_root() {
        let f = Facts {
            root: false,
            bpf_syscall: ProbeOutcome::NoPermission,
            probes: vec![],
            fsync: Some(Err("cannot create the test file /var/lib/etcd/x: Permission denied (os error 13)".into())),
            ..good()
        };
        let r = evaluate(&f, &MapSizes::default());
        for id in ["bpf_syscall", "bpf_programs", "bpf_maps", "bpf_helpers", "etcd_fsync"] {
            assert_eq!(status(&r, id), Status::Skip, "{id}");
        }
        assert!(r.ok, "skips are not failures");
        assert!(render_text(&r, false).contains("re-run as root"));
        // the same denial as root is a FAIL (seccomp / LSM)
        let f = Facts { root: true, bpf_syscall: ProbeOutcome::NoPermission, probes: vec![], ..good() };
        assert_eq!(status(&evaluate(&f, &MapSizes::default()), "bpf_syscall"), Status::Fail);
    }

    #[test]
    fn virtualization_decisions() {
        let with = |vf: VirtFacts| Facts { virt: virt::classify(&vf), ..good() };
        let r = evaluate(&with(VirtFacts { proc_vz: true, ..Default::default() }), &MapSizes::default());
        assert_eq!(status(&r, "virtualization"), Status::Fail);
        let r = evaluate(&with(VirtFacts { pid1_container_env: Some("lxc".into()), ..Default::default() }), &MapSizes::default());
        assert_eq!(status(&r, "virtualization"), Status::Warn);
        let r = evaluate(&with(VirtFacts { systemd_detect_virt: Some("none".into()), ..Default::default() }), &MapSizes::default());
        assert_eq!(status(&r, "virtualization"), Status::Pass);
    }

    #[test]
    fn map_memory_thresholds() {
        let mem = |avail: u64| Facts { meminfo: Ok(MemInfo { total_bytes: 8 * GIB, available_bytes: avail }), ..good() };
        let need = MapSizes::default().maps(8 * GIB, 4).total_bytes;
        assert_eq!(status(&evaluate(&mem(need * 5), &MapSizes::default()), "map_memory"), Status::Pass);
        assert_eq!(status(&evaluate(&mem(need * 2), &MapSizes::default()), "map_memory"), Status::Warn);
        assert_eq!(status(&evaluate(&mem(need - 1), &MapSizes::default()), "map_memory"), Status::Fail);
        let huge = MapSizes { services: 100_000, ..Default::default() };
        let r = evaluate(&good(), &huge);
        assert_eq!(status(&r, "map_memory"), Status::Fail);
        let bad = MapSizes { backends: 0, ..Default::default() };
        let c = evaluate(&good(), &bad).checks.into_iter().find(|c| c.id == "map_memory").unwrap();
        assert!(c.reason.contains("--backends"), "{c:?}");
    }

    #[test]
    fn fsync_verdicts() {
        let with = |r: Option<Result<FsyncBenchResult, String>>| status(&evaluate(&Facts { fsync: r, ..good() }, &MapSizes::default()), "etcd_fsync");
        assert_eq!(with(Some(Ok(fsync_result(1_999_999, "ext4")))), Status::Pass);
        assert_eq!(with(Some(Ok(fsync_result(5_000_000, "xfs")))), Status::Warn);
        assert_eq!(with(Some(Ok(fsync_result(10_000_000, "ext4")))), Status::Fail);
        assert_eq!(with(Some(Ok(fsync_result(1_000, "tmpfs")))), Status::Warn);
        assert_eq!(with(Some(Err("disk full".into()))), Status::Fail);
        assert_eq!(with(None), Status::Skip);
    }

    #[test]
    fn sysctl_drift_warns_with_details() {
        let targets = sysctl::profile(8 * GIB);
        let mut cur: std::collections::BTreeMap<String, Option<String>> =
            targets.iter().map(|t| (t.key.clone(), Some(t.value.clone()))).collect();
        cur.insert("net.core.default_qdisc".into(), Some("pfifo_fast".into()));
        let f = Facts { sysctl_plan: Ok(sysctl::plan(&targets, &cur, &|k| k.to_string()).unwrap()), ..good() };
        let r = evaluate(&f, &MapSizes::default());
        let c = r.checks.iter().find(|c| c.id == "sysctls").unwrap();
        assert_eq!(c.status, Status::Warn);
        assert!(c.details.iter().any(|d| d.contains("pfifo_fast → fq")), "{c:?}");
        assert!(r.ok);
    }
}
