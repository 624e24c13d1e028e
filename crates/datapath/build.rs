//! Compiles bpf/fjord_lb.c and bpf/fjord_sock.c with clang (-target bpf) and generates `layout.rs`:
//! sizeof/offsetof of every struct in bpf/fjord.h, measured by compiling and
//! running a tiny host C program against the same header. The crate's tests
//! compare those numbers with the Rust `#[repr(C)]` mirrors.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (struct, [fields]) — every struct in bpf/fjord.h with every field.
const STRUCTS: &[(&str, &[&str])] = &[
    ("fj_svc_key", &["vip", "port", "proto", "pad"]),
    ("fj_svc_value", &["service_id", "table_id", "backend_count", "flags", "affinity_timeout_s", "inline_count", "inline_be", "inline_id", "slot", "pad"]),
    ("fj_backend", &["ip", "port", "proto", "flags"]),
    ("fj_revnat", &["vip", "port", "pad"]),
    ("fj_ct_key", &["saddr", "daddr", "sport", "dport", "proto", "dir", "pad"]),
    ("fj_ct_value", &["backend_id", "rev_nat_id", "backend_ip", "backend_port", "state", "flags", "last_seen_ns",
        "nat_ip", "nat_port", "orig_port", "orig_ip", "pad"]),
    ("fj_affinity_key", &["service_id", "client_ip"]),
    ("fj_affinity_value", &["backend_id", "pad", "last_ns"]),
    ("fj_config", &["maglev_size", "max_tables", "flags", "version", "node_ip", "pod_net", "pod_mask", "cluster_net",
        "cluster_mask", "hairpin_ip", "snat_port_min", "snat_port_max", "tcp_syn_s", "tcp_established_s",
        "tcp_closing_s", "udp_s", "pad", "host_netns_cookie"]),
    ("fj_sock_revnat", &["vip", "backend_ip", "port", "backend_port", "pad"]),
    ("fj_maglev_chunk", &["backend_id"]),
];
/// Integer constants from bpf/fjord.h exported to Rust.
const CONSTS: &[&str] = &[
    "FJ_PROTO_TCP", "FJ_PROTO_UDP", "FJ_CT_DIR_FWD", "FJ_CT_DIR_REPLY", "FJ_LAYOUT_VERSION",
    "FJ_STAT_DNAT", "FJ_STAT_REVNAT", "FJ_STAT_CT_NEW", "FJ_STAT_CT_HIT", "FJ_STAT_NO_BACKEND",
    "FJ_STAT_RST_SENT", "FJ_STAT_RESELECT", "FJ_STAT_ERROR", "FJ_STAT_SOCK_LB", "FJ_STAT_ICMP_SENT", "FJ_STAT_CT_STALE",
    "FJ_STAT_NODEPORT", "FJ_STAT_SNAT", "FJ_STAT_SNAT_FAIL", "FJ_STAT_HAIRPIN", "FJ_STAT_AFFINITY", "FJ_STAT_CT_EXPIRED", "FJ_STAT_SOCK_TO_TC", "FJ_STAT_GONE", "FJ_STAT_ICMP_ERR", "FJ_STAT_HOST_ROUTED", "FJ_STAT_MAX", "FJ_STAT_SLOTS",
    "FJ_CT_DIR_SNAT_FWD", "FJ_CT_DIR_SNAT_REV", "FJ_CT_SYN", "FJ_CT_ESTABLISHED", "FJ_CT_CLOSING", "FJ_CT_F_SNAT", "FJ_CT_F_HAIRPIN", "FJ_CT_F_NONAT",
    "FJ_SVC_F_AFFINITY", "FJ_SVC_F_EXTERNAL", "FJ_CFG_F_MASQUERADE", "FJ_CFG_F_HOST_ROUTING", "FJ_MAGLEV_CHUNK", "FJ_PORT_WORDS", "FJ_SVC_INLINE", "FJ_SVC_SLOTS",
];

fn clang() -> String {
    env::var("FJORD_CLANG").unwrap_or_else(|_| "clang".to_string())
}

fn run(cmd: &mut Command, what: &str) {
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!(
            "fjord-datapath build: could not run `{:?}` to {what}: {e}.\n\
             The eBPF programs need clang (>= 14) with the BPF target and the libbpf headers: \
             `apt-get install clang llvm libbpf-dev` (or set FJORD_CLANG to the clang binary).",
            cmd.get_program()
        ),
    };
    if !out.status.success() {
        panic!(
            "fjord-datapath build: `{:?}` failed to {what} ({}):\n{}\n{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let bpf_dir = manifest.join("../../bpf").canonicalize().expect("bpf/ directory next to crates/");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=FJORD_CLANG");
    for f in ["fjord.h", "fjord_maps.h", "fjord_lb.c", "fjord_sock.c"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(f).display());
    }
    let arch_inc = Path::new("/usr/include/x86_64-linux-gnu");
    let clang = clang();

    // 1. the eBPF objects: tc programs and socket-LB programs
    for name in ["fjord_lb", "fjord_sock"] {
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]);
        if arch_inc.exists() {
            cmd.arg(format!("-I{}", arch_inc.display()));
        }
        cmd.arg(format!("-I{}", bpf_dir.display()))
            .arg("-c")
            .arg(bpf_dir.join(format!("{name}.c")))
            .arg("-o")
            .arg(out.join(format!("{name}.o")));
        run(&mut cmd, &format!("compile bpf/{name}.c to eBPF"));
    }

    // 2. layout probe: a host program printing sizeof/offsetof as Rust constants
    let mut c = String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"fjord.h\"\nint main(void) {\n");
    for (s, fields) in STRUCTS {
        let up = s.to_uppercase();
        c.push_str(&format!(
            "printf(\"pub const SIZEOF_{up}: usize = %zu;\\n\", sizeof(struct {s}));\n"
        ));
        for f in *fields {
            let fu = f.to_uppercase();
            c.push_str(&format!(
                "printf(\"pub const OFFSETOF_{up}_{fu}: usize = %zu;\\n\", offsetof(struct {s}, {f}));\n"
            ));
        }
    }
    for k in CONSTS {
        c.push_str(&format!("printf(\"pub const {k}: u64 = %llu;\\n\", (unsigned long long)({k}));\n"));
    }
    c.push_str("return 0;\n}\n");
    let probe_src = out.join("layout_probe.c");
    std::fs::write(&probe_src, c).expect("write layout_probe.c");
    let probe_bin = out.join("layout_probe");
    run(
        Command::new(&clang)
            .arg(format!("-I{}", bpf_dir.display()))
            .arg(&probe_src)
            .arg("-o")
            .arg(&probe_bin),
        "compile the host layout probe for bpf/fjord.h",
    );
    let o = Command::new(&probe_bin).output().expect("run layout probe");
    assert!(o.status.success(), "layout probe failed");
    std::fs::write(out.join("layout.rs"), o.stdout).expect("write layout.rs");
}
