//! Probes the kernel for the eBPF features fjord's datapath uses, by loading
//! them: a two-instruction program per program type, a tiny map per map type,
//! and a `call <helper>; exit` program per helper whose verifier log tells
//! whether the helper exists for that program type (the method libbpf's
//! `libbpf_probe_bpf_helper` and `bpftool feature probe` use).
//!
//! Raw `bpf()` via libc rather than aya 0.14 or bpftool: aya 0.14 has no
//! public helper probe, bpftool may be missing on a node (it is a separate
//! Debian package), and the whole probe is a few fixed-size attribute
//! structs. Nothing is attached; every fd is closed at once.

use serde::{Deserialize, Serialize};
use std::os::fd::{FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;

/// Program types (uapi `enum bpf_prog_type`).
pub const PROG_SCHED_CLS: u32 = 3;
pub const PROG_XDP: u32 = 6;
pub const PROG_CGROUP_SOCK_ADDR: u32 = 18;

/// Attach types (uapi `enum bpf_attach_type`) for cgroup/sock_addr programs.
pub const ATTACH_CGROUP_INET4_CONNECT: u32 = 10;
pub const ATTACH_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const ATTACH_CGROUP_UDP4_RECVMSG: u32 = 19;
pub const ATTACH_CGROUP_INET4_GETPEERNAME: u32 = 29;

/// Map types (uapi `enum bpf_map_type`).
pub const MAP_HASH: u32 = 1;
pub const MAP_ARRAY: u32 = 2;
pub const MAP_PERCPU_ARRAY: u32 = 6;
pub const MAP_LRU_HASH: u32 = 9;
pub const MAP_LPM_TRIE: u32 = 11;
pub const MAP_ARRAY_OF_MAPS: u32 = 12;
pub const MAP_HASH_OF_MAPS: u32 = 13;
const BPF_F_NO_PREALLOC: u32 = 1;

/// A program type (with expected attach type) the datapath loads.
#[derive(Debug, Clone, Copy)]
pub struct ProgSpec {
    pub name: &'static str,
    pub prog_type: u32,
    pub expected_attach_type: u32,
}

/// The program types fjord loads.
pub const PROGRAMS: &[ProgSpec] = &[
    ProgSpec { name: "sched_cls (tc)", prog_type: PROG_SCHED_CLS, expected_attach_type: 0 },
    ProgSpec { name: "xdp", prog_type: PROG_XDP, expected_attach_type: 0 },
    ProgSpec { name: "cgroup/connect4", prog_type: PROG_CGROUP_SOCK_ADDR, expected_attach_type: ATTACH_CGROUP_INET4_CONNECT },
    ProgSpec { name: "cgroup/sendmsg4", prog_type: PROG_CGROUP_SOCK_ADDR, expected_attach_type: ATTACH_CGROUP_UDP4_SENDMSG },
    ProgSpec { name: "cgroup/recvmsg4", prog_type: PROG_CGROUP_SOCK_ADDR, expected_attach_type: ATTACH_CGROUP_UDP4_RECVMSG },
    ProgSpec { name: "cgroup/getpeername4", prog_type: PROG_CGROUP_SOCK_ADDR, expected_attach_type: ATTACH_CGROUP_INET4_GETPEERNAME },
];

/// A map type fjord creates.
#[derive(Debug, Clone, Copy)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: u32,
}

pub const MAPS: &[MapSpec] = &[
    MapSpec { name: "hash", map_type: MAP_HASH },
    MapSpec { name: "lru_hash", map_type: MAP_LRU_HASH },
    MapSpec { name: "array", map_type: MAP_ARRAY },
    MapSpec { name: "percpu_array", map_type: MAP_PERCPU_ARRAY },
    MapSpec { name: "lpm_trie", map_type: MAP_LPM_TRIE },
    MapSpec { name: "array_of_maps", map_type: MAP_ARRAY_OF_MAPS },
    MapSpec { name: "hash_of_maps", map_type: MAP_HASH_OF_MAPS },
];

/// A helper, probed with the program type that uses it.
#[derive(Debug, Clone, Copy)]
pub struct HelperSpec {
    pub name: &'static str,
    pub id: i32,
    pub prog: &'static ProgSpec,
}

const TC: &ProgSpec = &PROGRAMS[0];
const CONNECT4: &ProgSpec = &PROGRAMS[2];

pub const HELPERS: &[HelperSpec] = &[
    HelperSpec { name: "map_lookup_elem", id: 1, prog: TC },
    HelperSpec { name: "map_update_elem", id: 2, prog: TC },
    HelperSpec { name: "ktime_get_ns", id: 5, prog: TC },
    HelperSpec { name: "get_prandom_u32", id: 7, prog: TC },
    HelperSpec { name: "skb_store_bytes", id: 9, prog: TC },
    HelperSpec { name: "l3_csum_replace", id: 10, prog: TC },
    HelperSpec { name: "l4_csum_replace", id: 11, prog: TC },
    HelperSpec { name: "redirect", id: 23, prog: TC },
    HelperSpec { name: "skb_load_bytes", id: 26, prog: TC },
    HelperSpec { name: "csum_diff", id: 28, prog: TC },
    HelperSpec { name: "fib_lookup", id: 69, prog: TC },
    HelperSpec { name: "redirect_neigh", id: 152, prog: TC },
    HelperSpec { name: "redirect_peer", id: 155, prog: TC },
    HelperSpec { name: "map_lookup_elem", id: 1, prog: CONNECT4 },
    HelperSpec { name: "get_socket_cookie", id: 46, prog: CONNECT4 },
    HelperSpec { name: "get_prandom_u32", id: 7, prog: CONNECT4 },
];

/// Outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ProbeOutcome {
    Supported,
    Unsupported { reason: String },
    /// EPERM/EACCES: needs root (CAP_BPF + CAP_NET_ADMIN/CAP_SYS_ADMIN).
    NoPermission,
    /// bpf() itself is missing (ENOSYS): kernel without CONFIG_BPF_SYSCALL, or blocked by seccomp.
    NoSyscall,
    Failed { error: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// `program`, `map` or `helper`
    pub kind: String,
    pub name: String,
    #[serde(flatten)]
    pub outcome: ProbeOutcome,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<OwnedFd, i32> {
    // SAFETY: attr is a properly laid out, zero-initialised prefix of `union bpf_attr`;
    // the kernel zero-extends the rest. Pointers inside it outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T as *mut libc::c_void, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL))
    } else {
        // SAFETY: the kernel returned a new fd that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
    }
}

/// ENOTSUPP (524): a kernel-internal errno that bpf() sometimes returns.
const ENOTSUPP: i32 = 524;

fn errno_outcome(errno: i32, what: &str) -> ProbeOutcome {
    match errno {
        libc::EPERM | libc::EACCES => ProbeOutcome::NoPermission,
        libc::ENOSYS => ProbeOutcome::NoSyscall,
        libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP => {
            ProbeOutcome::Unsupported { reason: format!("kernel rejected {what}: {}", std::io::Error::from_raw_os_error(errno)) }
        }
        _ => ProbeOutcome::Failed { error: format!("{what}: {}", std::io::Error::from_raw_os_error(errno)) },
    }
}


fn insn(code: u8, regs: u8, off: i16, imm: i32) -> u64 {
    (code as u64) | ((regs as u64) << 8) | (((off as u16) as u64) << 16) | (((imm as u32) as u64) << 32)
}
const MOV64_IMM_R0: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL

/// Loads `insns` as a program of `spec`'s type; returns the fd or (errno, verifier log).
fn load(spec: &ProgSpec, insns: &[u64], want_log: bool) -> Result<OwnedFd, (i32, String)> {
    let license = b"GPL\0";
    let mut log = vec![0u8; if want_log { 64 * 1024 } else { 0 }];
    let mut attr = ProgLoadAttr {
        prog_type: spec.prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: spec.expected_attach_type,
        ..Default::default()
    };
    if want_log {
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
    }
    sys_bpf(BPF_PROG_LOAD, &mut attr).map_err(|errno| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        (errno, String::from_utf8_lossy(&log[..end]).into_owned())
    })
}

/// Is the bpf() syscall there and usable by us? Creates a 1-entry array map.
pub fn probe_syscall() -> ProbeOutcome {
    let mut attr = MapCreateAttr { map_type: MAP_ARRAY, key_size: 4, value_size: 4, max_entries: 1, ..Default::default() };
    match sys_bpf(BPF_MAP_CREATE, &mut attr) {
        Ok(_) => ProbeOutcome::Supported,
        Err(e) => errno_outcome(e, "bpf(BPF_MAP_CREATE, array)"),
    }
}

pub fn probe_program(spec: &ProgSpec) -> ProbeOutcome {
    // r0 = 1; exit — a valid return value for every type probed (sock_addr hooks need 0 or 1).
    let prog = [insn(MOV64_IMM_R0, 0, 0, 1), insn(EXIT, 0, 0, 0)];
    match load(spec, &prog, false) {
        Ok(_) => ProbeOutcome::Supported,
        Err((e, _)) => errno_outcome(e, &format!("program type {}", spec.name)),
    }
}

fn create_map(map_type: u32, key: u32, value: u32, entries: u32, flags: u32, inner: Option<&OwnedFd>) -> Result<OwnedFd, i32> {
    use std::os::fd::AsRawFd;
    let mut attr = MapCreateAttr {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_flags: flags,
        inner_map_fd: inner.map(|f| f.as_raw_fd() as u32).unwrap_or(0),
    };
    sys_bpf(BPF_MAP_CREATE, &mut attr)
}

pub fn probe_map(spec: &MapSpec) -> ProbeOutcome {
    let res = match spec.map_type {
        // key = 4-byte prefix length + IPv4 address
        MAP_LPM_TRIE => create_map(MAP_LPM_TRIE, 8, 8, 1, BPF_F_NO_PREALLOC, None),
        MAP_ARRAY_OF_MAPS | MAP_HASH_OF_MAPS => match create_map(MAP_ARRAY, 4, 4, 1, 0, None) {
            Ok(inner) => create_map(spec.map_type, 4, 4, 1, 0, Some(&inner)),
            Err(e) => Err(e),
        },
        t => create_map(t, 4, 8, 1, 0, None),
    };
    match res {
        Ok(_) => ProbeOutcome::Supported,
        Err(e) => errno_outcome(e, &format!("map type {}", spec.name)),
    }
}

/// Pure: does this verifier log say the helper is missing for the program type?
pub fn helper_missing_in_log(log: &str) -> bool {
    log.contains("invalid func ") || log.contains("unknown func ") || log.contains("program of this type cannot use helper ")
}

pub fn probe_helper(spec: &HelperSpec) -> ProbeOutcome {
    let prog = [insn(CALL, 0, 0, spec.id), insn(EXIT, 0, 0, 0)];
    match load(spec.prog, &prog, true) {
        Ok(_) => ProbeOutcome::Supported,
        Err((errno, log)) => {
            if helper_missing_in_log(&log) {
                let line = log.lines().find(|l| helper_missing_in_log(l)).unwrap_or("").trim().to_string();
                ProbeOutcome::Unsupported { reason: format!("verifier: {line}") }
            } else if !log.is_empty() {
                // The verifier got past the helper lookup and rejected the (missing)
                // arguments, usually with EACCES: the helper exists.
                ProbeOutcome::Supported
            } else {
                // No verifier log: permission denied, or the program type itself failed.
                errno_outcome(errno, &format!("program type {} for the helper probe", spec.prog.name))
            }
        }
    }
}

/// Runs every probe (program types, map types, helpers). Cheap: ~30 syscalls.
pub fn probe_all() -> Vec<ProbeResult> {
    let mut out = Vec::new();
    for p in PROGRAMS {
        out.push(ProbeResult { kind: "program".into(), name: p.name.into(), outcome: probe_program(p) });
    }
    for m in MAPS {
        out.push(ProbeResult { kind: "map".into(), name: m.name.into(), outcome: probe_map(m) });
    }
    for h in HELPERS {
        out.push(ProbeResult {
            kind: "helper".into(),
            name: format!("bpf_{} ({})", h.name, h.prog.name),
            outcome: probe_helper(h),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_encoding() {
        // r0 = 1 : b7 00 0000 01000000
        assert_eq!(insn(MOV64_IMM_R0, 0, 0, 1), 0x0000_0001_0000_00b7);
        assert_eq!(insn(EXIT, 0, 0, 0), 0x95);
        assert_eq!(insn(CALL, 0, 0, 155), 0x0000_009b_0000_0085);
        assert_eq!(insn(0x07, 0x1a, -1, -2), 0xffff_fffe_ffff_1a07);
    }

    #[test]
    fn attr_layout_matches_uapi() {
        // offsets of union bpf_attr (linux/bpf.h): expected_attach_type at 68, inner_map_fd at 20.
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::size_of::<MapCreateAttr>(), 24);
    }

    #[test]
    fn verifier_log_parsing() {
        assert!(helper_missing_in_log("0: (85) call unknown#195\ninvalid func unknown#195\n"));
        assert!(helper_missing_in_log("unknown func bpf_redirect_peer#155\n"));
        assert!(helper_missing_in_log("program of this type cannot use helper bpf_skb_store_bytes#9\n"));
        assert!(!helper_missing_in_log("0: (85) call bpf_skb_store_bytes#9\nR1 type=scalar expected=ctx\n"));
        assert!(!helper_missing_in_log(""));
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Real kernel: these probes only load (never attach) and close at once.
    #[test]
    fn probes_against_this_kernel() {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        assert_eq!(probe_syscall(), ProbeOutcome::Supported);
        // a helper number no kernel has
        let bogus = HelperSpec { name: "bogus", id: 100_000, prog: TC };
        assert!(matches!(probe_helper(&bogus), ProbeOutcome::Unsupported { .. }), "{:?}", probe_helper(&bogus));
        // a real helper that socket-address hooks may not call
        let wrong_type = HelperSpec { name: "skb_store_bytes", id: 9, prog: CONNECT4 };
        assert!(matches!(probe_helper(&wrong_type), ProbeOutcome::Unsupported { .. }));
        // an argument-less helper loads outright; one with arguments fails verification but exists
        assert_eq!(probe_helper(&HELPERS[2]), ProbeOutcome::Supported);
        assert_eq!(probe_helper(&HELPERS[0]), ProbeOutcome::Supported);
        // a program type number that does not exist
        let bad = ProgSpec { name: "bogus", prog_type: 10_000, expected_attach_type: 0 };
        assert!(matches!(probe_program(&bad), ProbeOutcome::Unsupported { .. }));
        let bad_map = MapSpec { name: "bogus", map_type: 10_000 };
        assert!(matches!(probe_map(&bad_map), ProbeOutcome::Unsupported { .. }));
        // the datapath's own list: kernel 6.18 has all of it (DESIGN.md)
        for r in probe_all() {
            assert_eq!(r.outcome, ProbeOutcome::Supported, "{r:?}");
        }
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_outcome(libc::EPERM, "x"), ProbeOutcome::NoPermission);
        assert_eq!(errno_outcome(libc::ENOSYS, "x"), ProbeOutcome::NoSyscall);
        assert!(matches!(errno_outcome(libc::EINVAL, "x"), ProbeOutcome::Unsupported { .. }));
        assert!(matches!(errno_outcome(libc::ENOMEM, "x"), ProbeOutcome::Failed { .. }));
    }
}
