//! Memory that fjord's eBPF maps need for the configured sizes. Pure.
//!
//! Key/value sizes are the datapath's planned layouts (see the table in
//! [`MapSizes::maps`]); per-entry kernel overhead follows the 6.x kernel's
//! structures: a preallocated hash element carries `struct htab_elem`
//! (48 bytes incl. the LRU node) plus 8-byte-rounded key and value, and every
//! hash map has a power-of-two bucket array of 16-byte buckets. Arrays cost
//! the 8-byte-rounded value per entry, per CPU for per-CPU maps.

use serde::{Deserialize, Serialize};

/// Maglev lookup table size per service (prime; see DESIGN.md).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16381;
pub const DEFAULT_SERVICES: u32 = 1024;
pub const DEFAULT_BACKENDS: u32 = 16384;
pub const MIN_CT_ENTRIES: u32 = 65536;
pub const MAX_CT_ENTRIES: u32 = 4 << 20;

const HTAB_ELEM_OVERHEAD: u64 = 48;
const BUCKET_BYTES: u64 = 16;

/// The map sizes fjord is configured with; flags of `preflight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct MapSizes {
    /// Maximum number of services (service map, reverse-NAT map and one Maglev table each)
    #[arg(long = "services", value_name = "N", default_value_t = DEFAULT_SERVICES)]
    pub services: u32,
    /// Maximum number of backends across all services
    #[arg(long = "backends", value_name = "N", default_value_t = DEFAULT_BACKENDS)]
    pub backends: u32,
    /// Maglev table size per service (a prime, e.g. 16381 or 65521)
    #[arg(long = "maglev-table-size", value_name = "M", default_value_t = DEFAULT_MAGLEV_TABLE_SIZE)]
    pub maglev_table_size: u32,
    /// Conntrack (LRU) entries [default: scaled from memory, see `ct_entries_for_memory`]
    #[arg(long = "ct-entries", value_name = "N")]
    pub ct_entries: Option<u32>,
    /// SNAT (LRU) entries [default: same as conntrack]
    #[arg(long = "snat-entries", value_name = "N")]
    pub snat_entries: Option<u32>,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: DEFAULT_SERVICES,
            backends: DEFAULT_BACKENDS,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
            ct_entries: None,
            snat_entries: None,
        }
    }
}

/// Largest power of two <= n (n >= 1).
pub fn pow2_floor(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1u64 << (63 - n.leading_zeros())
    }
}

/// Conntrack entries for a node with `mem_bytes` of RAM: one entry per
/// 32 KiB of RAM, rounded down to a power of two, within [64 Ki, 4 Mi].
/// 2 GiB → 65536, 8 GiB → 262144, 24 GiB → 524288, 128 GiB → 4194304.
/// The same scale is used for the kernel's nf_conntrack_max by `tune`, so
/// both tables hold the same number of flows. Costs ~1% of RAM (kernel
/// conntrack ≈ 320 B/entry; the BPF CT map ≈ 144 B/entry).
pub fn ct_entries_for_memory(mem_bytes: u64) -> u32 {
    pow2_floor(mem_bytes / (32 * 1024)).clamp(MIN_CT_ENTRIES as u64, MAX_CT_ENTRIES as u64) as u32
}

/// One map's estimated size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapEstimate {
    pub name: String,
    pub map_type: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u64,
    pub bytes: u64,
}

fn r8(n: u32) -> u64 {
    (n as u64).div_ceil(8) * 8
}

/// Preallocated hash / LRU hash.
pub fn hash_bytes(key: u32, value: u32, entries: u64, ncpus: u64) -> u64 {
    // non-LRU hashes preallocate ncpus extra elements for the per-CPU free lists
    (entries + ncpus) * (HTAB_ELEM_OVERHEAD + r8(key) + r8(value)) + pow2_floor(entries.max(1) * 2 - 1) * BUCKET_BYTES
}

pub fn array_bytes(value: u32, entries: u64) -> u64 {
    entries * r8(value)
}

pub fn percpu_array_bytes(value: u32, entries: u64, ncpus: u64) -> u64 {
    entries * (r8(value) * ncpus + 8)
}

/// Estimated total memory of all maps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapMemory {
    pub maps: Vec<MapEstimate>,
    pub total_bytes: u64,
}

impl MapSizes {
    pub fn effective_ct(&self, mem_bytes: u64) -> u32 {
        self.ct_entries.unwrap_or_else(|| ct_entries_for_memory(mem_bytes))
    }

    /// Validates the sizes; errors name the flag.
    pub fn validate(&self) -> Result<(), String> {
        for (flag, v) in [("--services", self.services), ("--backends", self.backends), ("--maglev-table-size", self.maglev_table_size)] {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if let Some(0) = self.ct_entries {
            return Err("--ct-entries must be at least 1".into());
        }
        if let Some(0) = self.snat_entries {
            return Err("--snat-entries must be at least 1".into());
        }
        Ok(())
    }

    /// The datapath's maps with their estimated memory.
    ///
    /// | map | type | key | value | entries |
    /// |---|---|---|---|---|
    /// | services | hash | 8 (vip, port, proto) | 16 (backend count, revnat id, maglev slot, flags) | services |
    /// | backends | hash | 4 (backend id) | 8 (ip, port, flags) | backends |
    /// | maglev | array_of_maps → array | 4 | 4 (backend id) | services × table size |
    /// | revnat | hash | 4 (revnat id) | 8 (vip, port) | services |
    /// | conntrack | lru_hash | 16 (5-tuple) | 64 (state, timers, counters, revnat) | ct |
    /// | snat | lru_hash | 16 | 16 | snat |
    /// | metrics | percpu_array | 4 | 16 | 256 |
    pub fn maps(&self, mem_bytes: u64, ncpus: u64) -> MapMemory {
        let ncpus = ncpus.max(1);
        let ct = self.effective_ct(mem_bytes) as u64;
        let snat = self.snat_entries.map(u64::from).unwrap_or(ct);
        let s = self.services as u64;
        let maglev_inner = array_bytes(4, self.maglev_table_size as u64);
        let maps = vec![
            MapEstimate { name: "services".into(), map_type: "hash".into(), key_size: 8, value_size: 16, max_entries: s, bytes: hash_bytes(8, 16, s, ncpus) },
            MapEstimate { name: "backends".into(), map_type: "hash".into(), key_size: 4, value_size: 8, max_entries: self.backends as u64, bytes: hash_bytes(4, 8, self.backends as u64, ncpus) },
            MapEstimate {
                name: "maglev".into(),
                map_type: "array_of_maps".into(),
                key_size: 4,
                value_size: 4,
                max_entries: s * self.maglev_table_size as u64,
                bytes: array_bytes(8, s) + s * maglev_inner,
            },
            MapEstimate { name: "revnat".into(), map_type: "hash".into(), key_size: 4, value_size: 8, max_entries: s, bytes: hash_bytes(4, 8, s, ncpus) },
            MapEstimate { name: "conntrack".into(), map_type: "lru_hash".into(), key_size: 16, value_size: 64, max_entries: ct, bytes: hash_bytes(16, 64, ct, ncpus) },
            MapEstimate { name: "snat".into(), map_type: "lru_hash".into(), key_size: 16, value_size: 16, max_entries: snat, bytes: hash_bytes(16, 16, snat, ncpus) },
            MapEstimate { name: "metrics".into(), map_type: "percpu_array".into(), key_size: 4, value_size: 16, max_entries: 256, bytes: percpu_array_bytes(16, 256, ncpus) },
        ];
        let total_bytes = maps.iter().map(|m| m.bytes).sum();
        MapMemory { maps, total_bytes }
    }
}

/// Parses /sys/devices/system/cpu/possible ("0-1", "0-3,8-11", "0") into a CPU count.
pub fn parse_cpu_list(s: &str) -> Option<u64> {
    let mut n = 0u64;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a {
                    return None;
                }
                n += b - a + 1;
            }
            None => {
                part.trim().parse::<u64>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    const GIB: u64 = 1 << 30;

    #[test]
    fn ct_scaling_table() {
        assert_eq!(ct_entries_for_memory(512 << 20), 65536);
        assert_eq!(ct_entries_for_memory(2 * GIB), 65536);
        assert_eq!(ct_entries_for_memory(4 * GIB), 131072);
        assert_eq!(ct_entries_for_memory(8 * GIB), 262144);
        assert_eq!(ct_entries_for_memory(24 * GIB), 524288);
        assert_eq!(ct_entries_for_memory(64 * GIB), 2 << 20);
        assert_eq!(ct_entries_for_memory(1024 * GIB), 4 << 20);
    }

    #[test]
    fn pow2() {
        assert_eq!(pow2_floor(0), 0);
        assert_eq!(pow2_floor(1), 1);
        assert_eq!(pow2_floor(3), 2);
        assert_eq!(pow2_floor(1024), 1024);
        assert_eq!(pow2_floor(1025), 1024);
    }

    #[test]
    fn per_map_formulas() {
        // hash 4/8, 1000 entries, 2 cpus: (1000+2)*(48+8+8) + 1024 buckets * 16
        assert_eq!(hash_bytes(4, 8, 1000, 2), 1002 * 64 + 1024 * 16);
        // exact power of two keeps its bucket count
        assert_eq!(hash_bytes(4, 8, 1024, 1), 1025 * 64 + 1024 * 16);
        assert_eq!(array_bytes(4, 16381), 16381 * 8);
        assert_eq!(percpu_array_bytes(16, 256, 4), 256 * (16 * 4 + 8));
    }

    #[test]
    fn defaults_on_24_gib_two_cpus() {
        let m = MapSizes::default().maps(24 * GIB, 2);
        let by = |n: &str| m.maps.iter().find(|x| x.name == n).unwrap().clone();
        assert_eq!(by("conntrack").max_entries, 524288);
        assert_eq!(by("snat").max_entries, 524288);
        assert_eq!(by("maglev").max_entries, 1024 * 16381);
        assert_eq!(by("maglev").bytes, 1024 * 8 + 1024 * 16381 * 8);
        assert_eq!(m.total_bytes, m.maps.iter().map(|x| x.bytes).sum::<u64>());
        // about 130 MiB for maglev + ~75 MiB CT + ~45 MiB SNAT: well under 1 GiB
        assert!(m.total_bytes > 200 << 20 && m.total_bytes < 400 << 20, "{}", m.total_bytes);
    }

    #[test]
    fn explicit_sizes_override_memory() {
        let s = MapSizes { ct_entries: Some(1000), snat_entries: Some(10), ..Default::default() };
        let m = s.maps(24 * GIB, 2);
        assert_eq!(m.maps.iter().find(|x| x.name == "conntrack").unwrap().max_entries, 1000);
        assert_eq!(m.maps.iter().find(|x| x.name == "snat").unwrap().max_entries, 10);
    }

    #[test]
    fn validation_names_flags() {
        assert!(MapSizes::default().validate().is_ok());
        let e = MapSizes { services: 0, ..Default::default() }.validate().unwrap_err();
        assert!(e.contains("--services"));
        let e = MapSizes { ct_entries: Some(0), ..Default::default() }.validate().unwrap_err();
        assert!(e.contains("--ct-entries"));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(parse_cpu_list("0,2,4"), Some(3));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x-1"), None);
        assert_eq!(parse_cpu_list("3-1"), None);
    }
}
