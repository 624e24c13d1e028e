//! `preflight` end to end on this machine.

mod common;
use common::*;
use fjord_nodetools::{preflight_report, PreflightOptions, Report, Status};
use std::process::Command;

const IDS: &[&str] = &[
    "kernel", "bpf_syscall", "bpf_programs", "bpf_maps", "bpf_helpers", "btf", "bpffs", "cgroup2", "bpf_jit",
    "virtualization", "kernel_headers", "sysctls", "map_memory", "etcd_fsync",
];

fn st(r: &Report, id: &str) -> Status {
    r.checks.iter().find(|c| c.id == id).unwrap_or_else(|| panic!("missing check {id}")).status
}

#[test]
fn cli_json_report_is_complete_and_exit_code_matches() {
    let _l = kernel_lock();
    let d = scratch();
    let o = run(Command::new(bin()).args(["preflight", "-o", "json", "--fsync-dir"]).arg(d.path()));
    let r: Report = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(&o), stderr(&o)));
    let ids: Vec<&str> = r.checks.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, IDS);
    assert_eq!(o.status.code(), Some(if r.ok { 0 } else { 1 }));
    assert_eq!(r.ok, r.checks.iter().all(|c| c.status != Status::Fail));
    for c in &r.checks {
        assert!(!c.reason.is_empty(), "{c:?}");
        if c.status == Status::Fail || c.status == Status::Warn {
            assert!(c.fix.is_some(), "a {} needs a fix: {c:?}", c.status);
        }
    }
    // the quick fsync check ran in our dir and cleaned up
    assert_ne!(st(&r, "etcd_fsync"), Status::Skip);
    assert!(r.checks.iter().find(|c| c.id == "etcd_fsync").unwrap().reason.contains(d.path().to_str().unwrap()));
    assert!(entries(d.path()).is_empty());
    if is_root() {
        // kernel 6.x with BTF (the machines this project runs on): the probes load for real
        for id in ["kernel", "bpf_syscall", "bpf_programs", "bpf_maps", "bpf_helpers", "btf", "bpf_jit", "map_memory"] {
            assert_eq!(st(&r, id), Status::Pass, "{id}: {:?}", r.checks.iter().find(|c| c.id == id));
        }
    }
}

#[test]
fn text_output_and_bad_flags() {
    let o = run(Command::new(bin()).args(["preflight", "--skip-fsync", "-v"]));
    let s = stdout(&o);
    assert!(s.contains("summary:") && s.contains("kernel") && s.contains("SKIP  etcd_fsync"), "{s}");
    assert!(s.contains("conntrack (lru_hash"), "verbose shows the map sizes: {s}");
    let o = run(Command::new(bin()).args(["preflight", "--skip-fsync", "--services", "0"]));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--services"), "{}", stderr(&o));
    let o = run(Command::new(bin()).args(["preflight", "--ct-entries", "many"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--ct-entries"), "{}", stderr(&o));
}

/// What `fjordctl status --verbose` calls: fast, no disk writes.
#[test]
fn library_report_for_status() {
    let r = preflight_report(&PreflightOptions::default());
    assert_eq!(r.checks.len(), IDS.len());
    assert_eq!(st(&r, "etcd_fsync"), Status::Skip);
    // map sizes from flags change the estimate
    let big = PreflightOptions {
        map_sizes: fjord_nodetools::MapSizes { services: 10_000_000, ..Default::default() },
        ..Default::default()
    };
    let r = preflight_report(&big);
    assert_eq!(st(&r, "map_memory"), Status::Fail);
    assert!(!r.ok);
}
