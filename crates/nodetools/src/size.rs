//! Byte sizes on the command line: `22MiB`, `22m` (fio style), `2300`, `4KB`.
//!
//! Hand-written (about 60 lines) rather than pulled from a crate because the
//! accepted syntax must match fio's: a bare `k`/`m`/`g` suffix means powers of
//! 1024 there (fio's default `kb_base=1024`), which general-purpose size crates
//! interpret as SI powers of 1000.

use thiserror::Error;

/// Why a size string was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size is empty: give a number with an optional unit, e.g. 22MiB or 2300")]
    Empty,
    #[error("size {input:?} does not start with a whole number: use e.g. 22MiB, 22m or 2300")]
    NotANumber { input: String },
    #[error("size {input:?} has unknown unit {unit:?}: use B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024) or KB/MB/GB/TB (powers of 1000)")]
    UnknownUnit { input: String, unit: String },
    #[error("size {input:?} is too large")]
    Overflow { input: String },
}

/// Parses a byte size. Units (case-insensitive): none or `b` = bytes;
/// `k`, `kib`, `m`, `mib`, `g`, `gib`, `t`, `tib` = powers of 1024 (as fio);
/// `kb`, `mb`, `gb`, `tb` = powers of 1000.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(SizeError::NotANumber { input: input.to_string() });
    }
    let n: u64 = num.parse().map_err(|_| SizeError::Overflow { input: input.to_string() })?;
    let unit_l = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit_l.as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(SizeError::UnknownUnit { input: input.to_string(), unit: unit.trim().to_string() })
        }
    };
    n.checked_mul(mult).ok_or_else(|| SizeError::Overflow { input: input.to_string() })
}

/// clap value parser wrapper around [`parse_size`].
pub fn parse_size_arg(input: &str) -> Result<u64, String> {
    parse_size(input).map_err(|e| e.to_string())
}

/// Formats bytes with a binary unit, e.g. `22.0 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Formats nanoseconds as a latency: `850 µs`, `1.23 ms`.
pub fn format_ns(ns: u64) -> String {
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", ns as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_and_binary_units() {
        assert_eq!(parse_size("2300"), Ok(2300));
        assert_eq!(parse_size("22m"), Ok(22 * 1024 * 1024));
        assert_eq!(parse_size("22MiB"), Ok(22 * 1024 * 1024));
        assert_eq!(parse_size("22M"), Ok(22 * 1024 * 1024));
        assert_eq!(parse_size(" 4k "), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("10b"), Ok(10));
    }

    #[test]
    fn parses_si_units() {
        assert_eq!(parse_size("4KB"), Ok(4000));
        assert_eq!(parse_size("3mb"), Ok(3_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
    }

    #[test]
    fn rejects_bad_sizes_with_the_input_named() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("MiB"), Err(SizeError::NotANumber { .. })));
        assert!(matches!(parse_size("-5"), Err(SizeError::NotANumber { .. })));
        let e = parse_size("22 furlongs").unwrap_err();
        assert!(e.to_string().contains("furlongs"), "{e}");
        assert!(matches!(parse_size("1.5GiB"), Err(SizeError::UnknownUnit { .. })));
        assert!(matches!(parse_size("99999999999999999999"), Err(SizeError::Overflow { .. })));
        assert!(matches!(parse_size("99999999999T"), Err(SizeError::Overflow { .. })));
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(22 * 1024 * 1024), "22.0 MiB");
        assert_eq!(format_ns(850), "850 ns");
        assert_eq!(format_ns(140_288), "140.3 µs");
        assert_eq!(format_ns(2_113_536), "2.11 ms");
    }
}
