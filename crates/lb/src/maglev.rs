//! Maglev consistent hashing (Eisenbud et al., NSDI '16, section 3.4).
//!
//! Each backend, identified by a stable key (fjord uses `ip:port`), gets a
//! permutation of the `M` table slots derived from SHA-256(seed, key). Backends
//! take turns claiming their next free preferred slot until the table is full.
//! Properties relied on by fjord:
//! * deterministic: the same (seed, M, backend keys and weights) give the same
//!   table on every node, whatever order the backends are listed in;
//! * balanced: with equal weights every backend owns ⌊M/N⌋ or ⌈M/N⌉ slots;
//! * minimal disruption: adding/removing one backend moves about 1/N of slots.
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Default table size: a prime, ~160 slots per backend at 100 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;
/// Size of the compact Maglev table a frontend with at most [`COMPACT_MAX_BACKENDS`]
/// backends also gets, held in its service entry (`FJ_SVC_SLOTS`): prime, ≥ 63 slots per
/// backend, so balance and disruption stay Maglev's, and one byte per slot.
pub const COMPACT_TABLE_SIZE: u32 = 509;
/// Backends a service entry holds itself, with the compact table (`FJ_SVC_INLINE`).
pub const COMPACT_MAX_BACKENDS: usize = 8;
/// Default seed ("fjord_lb"). Every node of a cluster must use the same seed.
pub const DEFAULT_SEED: u64 = 0x666a_6f72_645f_6c62;
/// Largest supported table size (tables are M × 4 bytes per service in the kernel).
pub const MAX_TABLE_SIZE: u32 = 1 << 24;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MaglevError {
    #[error("maglev table size {size} is not a prime number: use a prime such as 16381 or 65521")]
    NotPrime { size: u32 },
    #[error("maglev table size {size} is out of range: it must be between 3 and {MAX_TABLE_SIZE}")]
    SizeOutOfRange { size: u32 },
    #[error(
        "{backends} backends do not fit a maglev table of {size} slots: use a table size of at least \
         100 × the number of backends (e.g. 65521)"
    )]
    TooManyBackends { backends: usize, size: u32 },
    #[error("backend key {key:?} is listed twice: every backend needs a unique key (ip:port)")]
    DuplicateKey { key: String },
}

/// Trial-division primality test (table sizes are at most 2^24).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = n as u64;
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Checks that `size` can be used as a Maglev table size.
pub fn validate_size(size: u32) -> Result<(), MaglevError> {
    if !(3..=MAX_TABLE_SIZE).contains(&size) {
        return Err(MaglevError::SizeOutOfRange { size });
    }
    if !is_prime(size) {
        return Err(MaglevError::NotPrime { size });
    }
    Ok(())
}

fn offset_skip(seed: u64, key: &str, size: u32) -> (u64, u64) {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(key.as_bytes());
    let d = h.finalize();
    let h1 = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
    let h2 = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes"));
    let m = size as u64;
    (h1 % m, h2 % (m - 1) + 1)
}

/// Builds a Maglev lookup table of `size` slots.
///
/// `backends` are `(key, weight)` pairs; the returned table holds, for every
/// slot, the index of the owning backend in `backends`. Weights are relative
/// (a weight-2 backend owns about twice the slots of a weight-1 backend);
/// weight-0 backends own no slots. If no backend has a non-zero weight (or the
/// list is empty) the result is an empty table: the service has no backend.
pub fn build_table<K: AsRef<str>>(backends: &[(K, u32)], size: u32, seed: u64) -> Result<Vec<u32>, MaglevError> {
    validate_size(size)?;
    // Work in key order so the table does not depend on the input order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|&a, &b| backends[a].0.as_ref().cmp(backends[b].0.as_ref()));
    for w in order.windows(2) {
        if backends[w[0]].0.as_ref() == backends[w[1]].0.as_ref() {
            return Err(MaglevError::DuplicateKey { key: backends[w[0]].0.as_ref().to_string() });
        }
    }
    order.retain(|&i| backends[i].1 > 0);
    if order.is_empty() {
        return Ok(Vec::new());
    }
    if order.len() > size as usize {
        return Err(MaglevError::TooManyBackends { backends: order.len(), size });
    }
    let m = size as u64;
    let params: Vec<(u64, u64)> = order.iter().map(|&i| offset_skip(seed, backends[i].0.as_ref(), size)).collect();
    let weights: Vec<u64> = order.iter().map(|&i| backends[i].1 as u64).collect();
    let wmax = *weights.iter().max().expect("non-empty");

    if weights.iter().all(|&w| w == wmax) {
        // equal weights (the usual case): plain turns, and for a few backends the
        // per-backend state lives in registers (most services have 1-8 endpoints)
        let ids: Vec<u32> = order.iter().map(|&i| i as u32).collect();
        return Ok(match ids.len() {
            1 => vec![ids[0]; size as usize],
            2 => fill_equal::<2>(&ids, &params, m),
            3 => fill_equal::<3>(&ids, &params, m),
            4 => fill_equal::<4>(&ids, &params, m),
            5 => fill_equal::<5>(&ids, &params, m),
            6 => fill_equal::<6>(&ids, &params, m),
            7 => fill_equal::<7>(&ids, &params, m),
            8 => fill_equal::<8>(&ids, &params, m),
            _ => fill_weighted(&ids, &params, &weights, wmax, m),
        });
    }
    let ids: Vec<u32> = order.iter().map(|&i| i as u32).collect();
    Ok(fill_weighted(&ids, &params, &weights, wmax, m))
}

const EMPTY: u32 = u32::MAX;

/// The population loop for K backends of equal weight (same table as `fill_weighted`).
fn fill_equal<const K: usize>(ids: &[u32], params: &[(u64, u64)], m: u64) -> Vec<u32> {
    let mut table = vec![EMPTY; m as usize];
    let mut pos = [0u64; K];
    let mut skip = [0u64; K];
    let mut id = [0u32; K];
    for n in 0..K {
        (pos[n], skip[n]) = params[n];
        id[n] = ids[n];
    }
    let mut filled = 0u64;
    loop {
        for n in 0..K {
            let mut c = pos[n];
            while table[c as usize] != EMPTY {
                c += skip[n];
                if c >= m {
                    c -= m;
                }
            }
            table[c as usize] = id[n];
            c += skip[n];
            if c >= m {
                c -= m;
            }
            pos[n] = c;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

/// The population loop with weights: `ids[n]` claims a slot each time its credit reaches `wmax`.
fn fill_weighted(ids: &[u32], params: &[(u64, u64)], weights: &[u64], wmax: u64, m: u64) -> Vec<u32> {
    let mut table = vec![EMPTY; m as usize];
    // pos[n] = (offset + next * skip) % m, advanced by one add and a conditional
    // subtract instead of a 64-bit division per probe (same sequence, same table).
    let mut pos: Vec<u64> = params.iter().map(|&(offset, _)| offset).collect();
    let mut credit = vec![0u64; ids.len()];
    let mut filled = 0usize;
    loop {
        for (n, &orig) in ids.iter().enumerate() {
            // weighted turns: a backend claims a slot each time its credit reaches wmax
            credit[n] += weights[n];
            if credit[n] < wmax {
                continue;
            }
            credit[n] -= wmax;
            let skip = params[n].1;
            let mut c = pos[n];
            while table[c as usize] != EMPTY {
                c += skip;
                if c >= m {
                    c -= m;
                }
            }
            table[c as usize] = orig;
            c += skip;
            if c >= m {
                c -= m;
            }
            pos[n] = c;
            filled += 1;
            if filled == table.len() {
                return table;
            }
        }
    }
}

/// The textbook formulation (a division per probe), kept to check `build_table` against.
#[cfg(test)]
fn build_table_reference(backends: &[(String, u32)], size: u32, seed: u64) -> Vec<u32> {
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|&a, &b| backends[a].0.cmp(&backends[b].0));
    order.retain(|&i| backends[i].1 > 0);
    let m = size as u64;
    let params: Vec<(u64, u64)> = order.iter().map(|&i| offset_skip(seed, &backends[i].0, size)).collect();
    let weights: Vec<u64> = order.iter().map(|&i| backends[i].1 as u64).collect();
    let wmax = *weights.iter().max().unwrap();
    let mut table = vec![u32::MAX; size as usize];
    let (mut next, mut credit, mut filled) = (vec![0u64; order.len()], vec![0u64; order.len()], 0usize);
    loop {
        for (n, &orig) in order.iter().enumerate() {
            credit[n] += weights[n];
            if credit[n] < wmax {
                continue;
            }
            credit[n] -= wmax;
            let (offset, skip) = params[n];
            let mut c = ((offset + next[n] * skip) % m) as usize;
            while table[c] != u32::MAX {
                next[n] += 1;
                c = ((offset + next[n] * skip) % m) as usize;
            }
            table[c] = orig as u32;
            next[n] += 1;
            filled += 1;
            if filled == table.len() {
                return table;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<(String, u32)> {
        (0..n).map(|i| (format!("10.244.{}.{}:8080", i / 200, i % 200 + 2), 1)).collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &b in table {
            c[b as usize] += 1;
        }
        c
    }

    #[test]
    fn same_tables_as_the_reference_formulation() {
        // 1..=8 equal weights take the register-resident loop; n = 10 (weighted) and 100 the general one
        for (n, size) in [(1usize, 251u32), (2, 16381), (3, 1021), (3, 16381), (4, 4099), (5, 16381), (6, 1021), (7, 16381), (8, 65521), (9, 16381), (10, 4099), (100, 16381)] {
            let mut k = keys(n);
            if n == 10 {
                for (i, b) in k.iter_mut().enumerate() {
                    b.1 = (i % 3) as u32 + 1;
                }
            }
            assert_eq!(build_table(&k, size, DEFAULT_SEED).unwrap(), build_table_reference(&k, size, DEFAULT_SEED), "n={n} size={size}");
        }
    }

    #[test]
    fn primes() {
        for p in [2u32, 3, 5, 251, 1021, 16381, 65521] {
            assert!(is_prime(p), "{p}");
        }
        for n in [0u32, 1, 4, 9, 16383, 65535, 65537 * 3] {
            assert!(!is_prime(n), "{n}");
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        let b = keys(3);
        assert_eq!(build_table(&b, 16383, DEFAULT_SEED), Err(MaglevError::NotPrime { size: 16383 }));
        assert_eq!(build_table(&b, 2, DEFAULT_SEED), Err(MaglevError::SizeOutOfRange { size: 2 }));
        assert_eq!(build_table(&b, 0, DEFAULT_SEED), Err(MaglevError::SizeOutOfRange { size: 0 }));
        let e = build_table(&b, 16383, DEFAULT_SEED).unwrap_err().to_string();
        assert!(e.contains("16383") && e.contains("prime"), "{e}");
        assert_eq!(
            build_table(&keys(10), 7, DEFAULT_SEED),
            Err(MaglevError::TooManyBackends { backends: 10, size: 7 })
        );
    }

    #[test]
    fn duplicate_keys_rejected() {
        let b = vec![("a:1".to_string(), 1), ("b:1".to_string(), 1), ("a:1".to_string(), 1)];
        assert_eq!(build_table(&b, 251, 1), Err(MaglevError::DuplicateKey { key: "a:1".into() }));
    }

    #[test]
    fn empty_and_zero_weight_sets_give_empty_table() {
        let none: Vec<(String, u32)> = vec![];
        assert_eq!(build_table(&none, 16381, DEFAULT_SEED).unwrap(), Vec::<u32>::new());
        let zero = vec![("a:1".to_string(), 0), ("b:1".to_string(), 0)];
        assert!(build_table(&zero, 251, 1).unwrap().is_empty());
        // a size error is reported even for an empty set
        assert!(build_table(&none, 100, 1).is_err());
    }

    #[test]
    fn single_backend_owns_everything() {
        let t = build_table(&keys(1), 251, DEFAULT_SEED).unwrap();
        assert_eq!(t.len(), 251);
        assert!(t.iter().all(|&b| b == 0));
    }

    #[test]
    fn balanced_within_one_percent() {
        for n in [2usize, 3, 5, 10, 37, 100] {
            let t = build_table(&keys(n), DEFAULT_TABLE_SIZE, DEFAULT_SEED).unwrap();
            assert_eq!(t.len(), DEFAULT_TABLE_SIZE as usize);
            let ideal = DEFAULT_TABLE_SIZE as f64 / n as f64;
            for (i, c) in counts(&t, n).into_iter().enumerate() {
                // share within 1% of 1/N (relative)
                assert!((c as f64 - ideal).abs() / ideal < 0.01, "n={n} backend {i}: {c} slots vs {ideal:.1}");
                // equal weights: every backend owns floor or ceil of M/N
                assert!((c as f64 - ideal).abs() < 1.0, "n={n} backend {i}: {c} vs {ideal:.2}");
            }
        }
    }

    #[test]
    fn deterministic_and_order_independent() {
        let b = keys(17);
        let t1 = build_table(&b, 1021, 42).unwrap();
        let t2 = build_table(&b, 1021, 42).unwrap();
        assert_eq!(t1, t2);
        let mut rev = b.clone();
        rev.reverse();
        let t3 = build_table(&rev, 1021, 42).unwrap();
        // same owner key per slot even though the indices differ
        for (s, (&x, &y)) in t1.iter().zip(t3.iter()).enumerate() {
            assert_eq!(b[x as usize].0, rev[y as usize].0, "slot {s}");
        }
        // a different seed gives a different table
        assert_ne!(t1, build_table(&b, 1021, 43).unwrap());
    }

    /// Map each slot to the key of its owner.
    fn owners(b: &[(String, u32)], t: &[u32]) -> Vec<String> {
        t.iter().map(|&i| b[i as usize].0.clone()).collect()
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth() {
        for n in [3usize, 10, 50] {
            let b = keys(n);
            let before = owners(&b, &build_table(&b, DEFAULT_TABLE_SIZE, DEFAULT_SEED).unwrap());
            let removed = b[n / 2].0.clone();
            let b2: Vec<_> = b.iter().filter(|(k, _)| *k != removed).cloned().collect();
            let after = owners(&b2, &build_table(&b2, DEFAULT_TABLE_SIZE, DEFAULT_SEED).unwrap());
            let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
            let of_removed = before.iter().filter(|x| **x == removed).count();
            // every slot of the removed backend must move; survivors' slots mostly stay
            let survivors_moved = moved - of_removed;
            let m = DEFAULT_TABLE_SIZE as f64;
            assert!((moved as f64 / m) < 1.0 / n as f64 + 0.03, "n={n}: moved {moved}");
            assert!((survivors_moved as f64 / m) < 0.03, "n={n}: {survivors_moved} survivor slots moved");
        }
    }

    #[test]
    fn adding_one_backend_moves_about_one_over_n_plus_one() {
        for n in [2usize, 10, 50] {
            let b = keys(n);
            let before = owners(&b, &build_table(&b, DEFAULT_TABLE_SIZE, DEFAULT_SEED).unwrap());
            let b2 = keys(n + 1);
            let added = b2[n].0.clone();
            let after = owners(&b2, &build_table(&b2, DEFAULT_TABLE_SIZE, DEFAULT_SEED).unwrap());
            let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
            let to_new = after.iter().filter(|k| **k == added).count();
            let between_survivors = moved - to_new;
            let m = DEFAULT_TABLE_SIZE as f64;
            let ideal = 1.0 / (n + 1) as f64;
            assert!((moved as f64 / m) < ideal + 0.03, "n={n}: moved {moved} ideal {:.0}", ideal * m);
            assert!((between_survivors as f64 / m) < 0.03, "n={n}: {between_survivors} slots moved between survivors");
        }
    }

    #[test]
    fn weights_are_proportional() {
        let b = vec![("a:1".to_string(), 1), ("b:1".to_string(), 2), ("c:1".to_string(), 3)];
        let t = build_table(&b, DEFAULT_TABLE_SIZE, DEFAULT_SEED).unwrap();
        let c = counts(&t, 3);
        let m = DEFAULT_TABLE_SIZE as f64;
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let share = c[i] as f64 / m;
            assert!((share - w / 6.0).abs() < 0.01, "backend {i}: share {share:.4}");
        }
        // weight 0 = no slots
        let b = vec![("a:1".to_string(), 1), ("b:1".to_string(), 0)];
        let t = build_table(&b, 251, 1).unwrap();
        assert!(t.iter().all(|&x| x == 0));
    }
}
