//! The sysctl profile and the plan of what `tune` changes. Pure.
//!
//! Profile = the seed's five keys plus conntrack and TCP buffer sizes scaled
//! to RAM. Numeric limits are raise-only (`AtLeast`): fjord never lowers a
//! value the kernel or the operator already set higher (e.g. fs.file-max,
//! which recent kernels default to far above 2097152).
//!
//! Memory scaling (mem = MemTotal):
//!
//! | RAM | nf_conntrack_max | socket buffer max (rmem_max, wmem_max, tcp_rmem/tcp_wmem max) | netdev_max_backlog |
//! |---|---|---|---|
//! | 1 GiB | 65536 | 4 MiB | 16384 |
//! | 2 GiB | 65536 | 4 MiB | 16384 |
//! | 4 GiB | 131072 | 8 MiB | 16384 |
//! | 8 GiB | 262144 | 16 MiB | 16384 |
//! | 24 GiB | 524288 | 32 MiB | 16384 |
//! | ≥ 32 GiB | mem/32 KiB (≤ 4 Mi) | 64 MiB | 16384 |
//! | 512 MiB | 65536 | 4 MiB | 8192 |
//!
//! * conntrack: one entry per 32 KiB of RAM (power of two, 64 Ki..4 Mi);
//!   ~320 B per kernel entry ⇒ about 1% of RAM when full.
//! * buffers: RAM/512 (power of two, 4..64 MiB). 16 MiB at 8 GiB covers the
//!   bandwidth-delay product of 10 Gbit/s at ~13 ms RTT, the seed's "8GB+
//!   saturates 10 Gbps". On a 2 GiB machine it stays at 4 MiB, so a few
//!   hundred busy sockets cannot pin the RAM ("don't copy-paste these on a
//!   machine with 2GB RAM"). Defaults (middle values) stay the kernel's.
//! * backlog: the seed's 16384, lowered below 1 GiB (RAM/64 KiB, min 1024)
//!   since every queued packet holds an skb.

use crate::mapsize::{ct_entries_for_memory, pow2_floor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

pub const MIB: u64 = 1 << 20;

/// How the target compares with the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Must equal the target (strings such as `bbr`, or the port range).
    Exact,
    /// Whitespace-separated integers; each raised to at least the target, never lowered.
    AtLeast,
}

/// One key of the profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub key: String,
    pub value: String,
    pub policy: Policy,
    /// Per network namespace (safe to test inside a netns) or host-global.
    pub namespaced: bool,
    pub why: String,
}

fn t(key: &str, value: String, policy: Policy, namespaced: bool, why: &str) -> Target {
    Target { key: key.into(), value, policy, namespaced, why: why.into() }
}

/// Socket buffer max for RAM (see the module table).
pub fn buffer_max_for_memory(mem_bytes: u64) -> u64 {
    pow2_floor(mem_bytes / 512).clamp(4 * MIB, 64 * MIB)
}

/// netdev_max_backlog for RAM.
pub fn backlog_for_memory(mem_bytes: u64) -> u64 {
    pow2_floor(mem_bytes / (64 * 1024)).clamp(1024, 16384)
}

/// The profile for a node with `mem_bytes` of RAM.
pub fn profile(mem_bytes: u64) -> Vec<Target> {
    let buf = buffer_max_for_memory(mem_bytes);
    let ct = ct_entries_for_memory(mem_bytes);
    vec![
        // The seed says 1024 65535; fjord stops at 60999 because 61000-65535 is the eBPF
        // datapath's SNAT range (fjord-agent --snat-port-range): the node's own sockets and
        // NodePort/masquerade SNAT must never pick the same port toward the same peer.
        t("net.ipv4.ip_local_port_range", "1024 60999".into(), Policy::Exact, true,
          "more ephemeral ports for the many outbound connections of proxies; ends below fjord's SNAT range 61000-65535"),
        t("net.core.default_qdisc", "fq".into(), Policy::Exact, false, "fair queueing, the pacing BBR relies on"),
        t("net.ipv4.tcp_congestion_control", "bbr".into(), Policy::Exact, true,
          "BBR congestion control (kernel 4.9+): higher throughput, lower queueing delay"),
        t("fs.file-max", "2097152".into(), Policy::AtLeast, false, "every socket is a file descriptor"),
        t("net.core.netdev_max_backlog", backlog_for_memory(mem_bytes).to_string(), Policy::AtLeast, false,
          "packets queued per CPU before drops: absorbs bursts"),
        t("net.netfilter.nf_conntrack_max", ct.to_string(), Policy::AtLeast, false,
          "kernel conntrack table, one entry per 32 KiB of RAM (~1% of RAM when full)"),
        t("net.core.rmem_max", buf.to_string(), Policy::AtLeast, false, "largest socket receive buffer, RAM/512"),
        t("net.core.wmem_max", buf.to_string(), Policy::AtLeast, false, "largest socket send buffer, RAM/512"),
        t("net.ipv4.tcp_rmem", format!("4096 131072 {buf}"), Policy::AtLeast, true, "TCP receive autotuning min/default/max"),
        t("net.ipv4.tcp_wmem", format!("4096 16384 {buf}"), Policy::AtLeast, true, "TCP send autotuning min/default/max"),
    ]
}

/// `net.ipv4.tcp_rmem` → `net/ipv4/tcp_rmem`.
pub fn key_to_relpath(key: &str) -> String {
    key.replace('.', "/")
}

/// Normalizes a sysctl value: `1024\t65535\n` → `1024 65535`.
pub fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Will be (or was) written.
    Set,
    /// Already at the target.
    Ok,
    /// Current is higher than fjord's minimum: left alone.
    KeepHigher,
    /// The key does not exist in this kernel (or module not loaded).
    Missing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanItem {
    pub key: String,
    pub current: Option<String>,
    /// The profile's value.
    pub profile_value: String,
    /// The value after tuning (for AtLeast: elementwise max of current and profile).
    pub target: String,
    pub action: Action,
    pub namespaced: bool,
    pub why: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("cannot parse the current value of {key} ({value:?} in {location}): expected {expected}; fix or remove that file (a real /proc/sys never holds this)")]
    BadCurrent { key: String, value: String, location: String, expected: String },
}

fn parse_ints(s: &str) -> Option<Vec<u64>> {
    s.split_whitespace().map(|p| p.parse::<u64>().ok()).collect()
}

/// Decides each key. `current[key]` is `None` when the key is missing.
/// `location(key)` names where a value came from, for error messages.
pub fn plan(
    targets: &[Target],
    current: &BTreeMap<String, Option<String>>,
    location: &dyn Fn(&str) -> String,
) -> Result<Vec<PlanItem>, PlanError> {
    let mut out = Vec::with_capacity(targets.len());
    for tg in targets {
        let cur = current.get(&tg.key).cloned().flatten().map(|c| normalize(&c));
        let (target, action) = match (&cur, tg.policy) {
            (None, _) => (tg.value.clone(), Action::Missing),
            (Some(c), Policy::Exact) => {
                (tg.value.clone(), if *c == normalize(&tg.value) { Action::Ok } else { Action::Set })
            }
            (Some(c), Policy::AtLeast) => {
                let want = parse_ints(&tg.value).expect("profile values are integers");
                let have = parse_ints(c).filter(|h| h.len() == want.len()).ok_or_else(|| PlanError::BadCurrent {
                    key: tg.key.clone(),
                    value: c.clone(),
                    location: location(&tg.key),
                    expected: if want.len() == 1 { "an integer".into() } else { format!("{} integers", want.len()) },
                })?;
                let merged: Vec<u64> = have.iter().zip(&want).map(|(h, w)| *h.max(w)).collect();
                let merged_s = merged.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
                let action = if merged == have {
                    if have == want { Action::Ok } else { Action::KeepHigher }
                } else {
                    Action::Set
                };
                (merged_s, action)
            }
        };
        out.push(PlanItem {
            key: tg.key.clone(),
            current: cur,
            profile_value: tg.value.clone(),
            target,
            action,
            namespaced: tg.namespaced,
            why: tg.why.clone(),
        });
    }
    Ok(out)
}

/// What happened to a key during `--apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum KeyStatus {
    Applied,
    Unchanged,
    KeptHigher,
    Skipped { reason: String },
    Failed { reason: String },
}

/// The content of 99-fjord-network.conf. Deterministic (no timestamps) so a
/// re-run writes the same bytes. Keys that are at their target go in as
/// settings; keys left higher, missing or failed go in as comments so
/// `sysctl --system` at boot neither lowers nor fails on them.
pub fn render_conf(mem_bytes: u64, items: &[(PlanItem, KeyStatus)]) -> String {
    let mut s = String::new();
    s.push_str("# Written by `fjordctl tune --apply` (fjord). Re-run it to regenerate; manual edits are overwritten.\n");
    s.push_str(&format!(
        "# Network profile scaled for {} MiB of RAM (conntrack: 1 entry per 32 KiB; socket buffers: RAM/512).\n",
        mem_bytes / MIB
    ));
    for (it, st) in items {
        s.push_str(&format!("\n# {}\n", it.why));
        match st {
            KeyStatus::Applied | KeyStatus::Unchanged => s.push_str(&format!("{} = {}\n", it.key, it.target)),
            KeyStatus::KeptHigher => s.push_str(&format!(
                "# {} = {}  (not set: current {} is already higher)\n",
                it.key,
                it.profile_value,
                it.current.as_deref().unwrap_or("")
            )),
            KeyStatus::Skipped { reason } | KeyStatus::Failed { reason } => {
                s.push_str(&format!("# {} = {}  (not applied: {})\n", it.key, it.target, reason.replace('\n', " ")))
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    const GIB: u64 = 1 << 30;

    fn cur(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.map(str::to_string))).collect()
    }
    fn loc(k: &str) -> String {
        format!("/fake/{}", key_to_relpath(k))
    }
    fn get<'a>(p: &'a [PlanItem], k: &str) -> &'a PlanItem {
        p.iter().find(|i| i.key == k).unwrap()
    }

    #[test]
    fn memory_scaling_table() {
        let row = |mem: u64| (ct_entries_for_memory(mem), buffer_max_for_memory(mem), backlog_for_memory(mem));
        assert_eq!(row(512 * MIB), (65536, 4 * MIB, 8192));
        assert_eq!(row(GIB), (65536, 4 * MIB, 16384));
        assert_eq!(row(2 * GIB), (65536, 4 * MIB, 16384));
        assert_eq!(row(4 * GIB), (131072, 8 * MIB, 16384));
        assert_eq!(row(8 * GIB), (262144, 16 * MIB, 16384));
        assert_eq!(row(24 * GIB), (524288, 32 * MIB, 16384));
        assert_eq!(row(32 * GIB), (1 << 20, 64 * MIB, 16384));
        assert_eq!(row(512 * GIB), (4 << 20, 64 * MIB, 16384));
        assert_eq!(row(64 * MIB), (65536, 4 * MIB, 1024));
        // a 2 GiB box must not get the 8 GiB box's buffers
        assert!(buffer_max_for_memory(2 * GIB) < buffer_max_for_memory(8 * GIB));
    }

    #[test]
    fn profile_has_the_seed_keys() {
        let p = profile(8 * GIB);
        let v = |k: &str| p.iter().find(|t| t.key == k).unwrap().value.clone();
        assert_eq!(v("net.ipv4.ip_local_port_range"), "1024 60999");
        assert_eq!(v("net.core.default_qdisc"), "fq");
        assert_eq!(v("net.ipv4.tcp_congestion_control"), "bbr");
        assert_eq!(v("fs.file-max"), "2097152");
        assert_eq!(v("net.core.netdev_max_backlog"), "16384");
        assert_eq!(v("net.netfilter.nf_conntrack_max"), "262144");
        assert_eq!(v("net.ipv4.tcp_rmem"), format!("4096 131072 {}", 16 * MIB));
        assert_eq!(v("net.core.wmem_max"), (16 * MIB).to_string());
    }

    #[test]
    fn plan_decisions() {
        let targets = profile(8 * GIB);
        let c = cur(&[
            ("net.ipv4.ip_local_port_range", Some("32768\t60999\n")),
            ("net.core.default_qdisc", Some("fq\n")),
            ("net.ipv4.tcp_congestion_control", Some("cubic")),
            ("fs.file-max", Some("9223372036854775807")),
            ("net.core.netdev_max_backlog", Some("1000")),
            ("net.netfilter.nf_conntrack_max", None),
            ("net.core.rmem_max", Some("16777216")),
            ("net.core.wmem_max", Some("212992")),
            ("net.ipv4.tcp_rmem", Some("4096 262144 6291456")),
            ("net.ipv4.tcp_wmem", Some("4096\t16384\t4194304")),
        ]);
        let p = plan(&targets, &c, &loc).unwrap();
        let a = |k| get(&p, k).action;
        assert_eq!(a("net.ipv4.ip_local_port_range"), Action::Set);
        assert_eq!(get(&p, "net.ipv4.ip_local_port_range").current.as_deref(), Some("32768 60999"));
        assert_eq!(a("net.core.default_qdisc"), Action::Ok);
        assert_eq!(a("net.ipv4.tcp_congestion_control"), Action::Set);
        assert_eq!(a("fs.file-max"), Action::KeepHigher);
        assert_eq!(get(&p, "fs.file-max").target, "9223372036854775807");
        assert_eq!(a("net.core.netdev_max_backlog"), Action::Set);
        assert_eq!(a("net.netfilter.nf_conntrack_max"), Action::Missing);
        assert_eq!(a("net.core.rmem_max"), Action::Ok);
        assert_eq!(a("net.core.wmem_max"), Action::Set);
        // elementwise max: keeps the higher default 262144, raises the max
        assert_eq!(get(&p, "net.ipv4.tcp_rmem").target, "4096 262144 16777216");
        assert_eq!(a("net.ipv4.tcp_rmem"), Action::Set);
        assert_eq!(get(&p, "net.ipv4.tcp_wmem").target, "4096 16384 16777216");
    }

    #[test]
    fn plan_is_idempotent_once_applied() {
        let targets = profile(2 * GIB);
        let c: BTreeMap<_, _> = targets.iter().map(|t| (t.key.clone(), Some(t.value.clone()))).collect();
        let p = plan(&targets, &c, &loc).unwrap();
        assert!(p.iter().all(|i| i.action == Action::Ok), "{p:?}");
    }

    #[test]
    fn non_numeric_current_names_key_and_file() {
        let targets = profile(8 * GIB);
        let c = cur(&[("net.core.netdev_max_backlog", Some("lots"))]);
        let e = plan(&targets, &c, &loc).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("net.core.netdev_max_backlog") && s.contains("/fake/net/core/netdev_max_backlog") && s.contains("lots"), "{s}");
        // wrong arity
        let c = cur(&[("net.ipv4.tcp_rmem", Some("4096 131072"))]);
        assert!(plan(&targets, &c, &loc).unwrap_err().to_string().contains("3 integers"));
        // negative numbers are not valid limits either
        let c = cur(&[("fs.file-max", Some("-1"))]);
        assert!(plan(&targets, &c, &loc).is_err());
    }

    #[test]
    fn conf_rendering_is_deterministic_and_comments_the_rest() {
        let targets = profile(8 * GIB);
        let c = cur(&[
            ("net.ipv4.ip_local_port_range", Some("32768 60999")),
            ("fs.file-max", Some("9223372036854775807")),
            ("net.ipv4.tcp_congestion_control", Some("cubic")),
        ]);
        let p: Vec<PlanItem> = plan(&targets[..4], &c, &loc).unwrap();
        let st = vec![
            KeyStatus::Applied,
            KeyStatus::Skipped { reason: "key not present".into() },
            KeyStatus::Failed { reason: "bbr not available".into() },
            KeyStatus::KeptHigher,
        ];
        let items: Vec<_> = p.into_iter().zip(st).collect();
        let a = render_conf(8 * GIB, &items);
        assert_eq!(a, render_conf(8 * GIB, &items));
        assert!(a.contains("\nnet.ipv4.ip_local_port_range = 1024 60999\n"), "{a}");
        assert!(a.contains("# net.core.default_qdisc = fq  (not applied: key not present)"), "{a}");
        assert!(a.contains("# net.ipv4.tcp_congestion_control = bbr  (not applied: bbr not available)"), "{a}");
        assert!(a.contains("# fs.file-max = 2097152  (not set: current 9223372036854775807 is already higher)"), "{a}");
        assert!(a.contains("8192 MiB"));
        // every non-comment line is `key = value`
        for l in a.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(l.contains(" = "), "{l}");
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(key_to_relpath("net.ipv4.tcp_rmem"), "net/ipv4/tcp_rmem");
        assert_eq!(normalize(" 1024\t65535\n"), "1024 65535");
    }
}
