//! Parsers for host facts: /proc/meminfo, kernel release, /proc/mounts. Pure.

use serde::{Deserialize, Serialize};

/// The parts of /proc/meminfo we use, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// Parses /proc/meminfo (`MemTotal:  24592768 kB`). Errors name the field.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, String> {
    let field = |name: &str| -> Result<u64, String> {
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(name))
            .ok_or_else(|| format!("field {name} missing"))?;
        let rest = line.split_once(':').map(|(_, r)| r.trim()).unwrap_or("");
        let mut parts = rest.split_whitespace();
        let n: u64 = parts
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("field {name} has non-numeric value {rest:?}"))?;
        match parts.next() {
            Some("kB") => Ok(n * 1024),
            None => Ok(n),
            Some(u) => Err(format!("field {name} has unknown unit {u:?}")),
        }
    };
    let total_bytes = field("MemTotal")?;
    // MemAvailable exists since 3.14; fall back to MemFree.
    let available_bytes = field("MemAvailable").or_else(|_| field("MemFree"))?;
    Ok(MemInfo { total_bytes, available_bytes })
}

/// Kernel version from a release string like `6.18.44-fc-v669` or `5.10.0-28-amd64`.
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// One line of /proc/mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub source: String,
    pub target: String,
    pub fstype: String,
    pub options: String,
}

fn unescape_mount(s: &str) -> String {
    // /proc/mounts escapes space, tab, newline and backslash as \040 \011 \012 \134
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(Mount {
                source: unescape_mount(f.next()?),
                target: unescape_mount(f.next()?),
                fstype: f.next()?.to_string(),
                options: f.next().unwrap_or("").to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo() {
        let t = "MemTotal:       24592768 kB\nMemFree:        20000000 kB\nMemAvailable:   22000000 kB\nHugePages_Total:       0\n";
        let m = parse_meminfo(t).unwrap();
        assert_eq!(m.total_bytes, 24592768 * 1024);
        assert_eq!(m.available_bytes, 22000000 * 1024);
        // old kernels: no MemAvailable
        let m = parse_meminfo("MemTotal: 2048 kB\nMemFree: 1024 kB\n").unwrap();
        assert_eq!(m.available_bytes, 1024 * 1024);
        assert!(parse_meminfo("MemFree: 1 kB\n").unwrap_err().contains("MemTotal"));
        assert!(parse_meminfo("MemTotal: lots kB\n").unwrap_err().contains("non-numeric"));
        assert!(parse_meminfo("MemTotal: 5 MB\nMemFree: 1 kB").unwrap_err().contains("unit"));
    }

    #[test]
    fn kernel_release() {
        assert_eq!(parse_kernel_release("6.18.44-fc-v669"), Some((6, 18, 44)));
        assert_eq!(parse_kernel_release("5.10.0-28-amd64"), Some((5, 10, 0)));
        assert_eq!(parse_kernel_release("4.19"), Some((4, 19, 0)));
        assert_eq!(parse_kernel_release("6.1.0+"), Some((6, 1, 0)));
        assert_eq!(parse_kernel_release("garbage"), None);
        assert_eq!(parse_kernel_release(""), None);
    }

    #[test]
    fn mounts() {
        let t = "bpf /sys/fs/bpf bpf rw,nosuid 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n/dev/sda1 /mnt/my\\040disk ext4 rw 0 0\n\n";
        let m = parse_mounts(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].fstype, "bpf");
        assert_eq!(m[1].target, "/sys/fs/cgroup/unified");
        assert_eq!(m[2].target, "/mnt/my disk");
    }
}
