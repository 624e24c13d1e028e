//! `tune`: shows current → target for each key of the memory-scaled profile
//! ([`crate::sysctl`]) and, with `--apply`, writes them to /proc/sys, reads
//! each back and writes `99-fjord-network.conf` for boot.

use crate::sysctl::{self, key_to_relpath, normalize, Action, KeyStatus, PlanItem, Target};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const CONF_NAME: &str = "99-fjord-network.conf";

#[derive(Debug, Error)]
pub enum TuneError {
    #[error(transparent)]
    Plan(#[from] sysctl::PlanError),
    #[error("cannot read {path} (sysctl {key}): {source}; check --proc-sys")]
    Read { key: String, path: PathBuf, source: io::Error },
    #[error("--proc-sys {0} is not a directory; pass the sysctl tree, normally /proc/sys")]
    ProcSys(PathBuf),
    #[error("unknown key {key:?} in --only; known keys: {known}")]
    UnknownKey { key: String, known: String },
    #[error("cannot write to the sysctl dir {dir}: {source}; run as root or pass a writable --sysctl-dir. Nothing was applied")]
    SysctlDir { dir: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}; the keys above were applied to the running kernel but will not survive a reboot")]
    WriteConf { path: PathBuf, source: io::Error },
}

/// Reads the current value of `key` under `proc_sys`; `Ok(None)` when the key does not exist.
pub fn read_key(proc_sys: &Path, key: &str) -> Result<Option<String>, TuneError> {
    let path = proc_sys.join(key_to_relpath(key));
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(normalize(&s))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TuneError::Read { key: key.into(), path, source }),
    }
}

/// Restricts the profile to `only` (all when empty); unknown keys are an error.
pub fn select(targets: Vec<Target>, only: &[String]) -> Result<Vec<Target>, TuneError> {
    if only.is_empty() {
        return Ok(targets);
    }
    for k in only {
        if !targets.iter().any(|t| &t.key == k) {
            return Err(TuneError::UnknownKey {
                key: k.clone(),
                known: targets.iter().map(|t| t.key.as_str()).collect::<Vec<_>>().join(", "),
            });
        }
    }
    Ok(targets.into_iter().filter(|t| only.contains(&t.key)).collect())
}

/// Reads every key and plans. No writes.
pub fn make_plan(proc_sys: &Path, targets: &[Target]) -> Result<Vec<PlanItem>, TuneError> {
    if !proc_sys.is_dir() {
        return Err(TuneError::ProcSys(proc_sys.to_path_buf()));
    }
    let mut cur = BTreeMap::new();
    for t in targets {
        cur.insert(t.key.clone(), read_key(proc_sys, &t.key)?);
    }
    Ok(sysctl::plan(targets, &cur, &|k| proc_sys.join(key_to_relpath(k)).display().to_string())?)
}

fn missing_reason(key: &str, proc_sys: &Path) -> String {
    let path = proc_sys.join(key_to_relpath(key));
    if key.starts_with("net.netfilter.nf_conntrack") {
        format!("{} does not exist: the nf_conntrack module is not loaded (`modprobe nf_conntrack`, then re-run)", path.display())
    } else {
        format!("{} does not exist in this kernel", path.display())
    }
}

fn write_error_reason(key: &str, value: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "not writable ({e}): /proc/sys is read-only inside containers and for non-root users; run on the host as root"
        ),
        Some(libc::ENOENT) if key == "net.ipv4.tcp_congestion_control" => {
            format!("kernel has no '{value}' congestion control ({e}); load it with `modprobe tcp_{value}`")
        }
        Some(libc::ENOENT) if key == "net.core.default_qdisc" => {
            format!("kernel has no '{value}' qdisc ({e}); load it with `modprobe sch_{value}`")
        }
        Some(libc::EINVAL) => format!("kernel rejected '{value}' ({e})"),
        _ => format!("write failed: {e}"),
    }
}

/// The result of `tune` (dry run or apply); serializable for `-o json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneReport {
    pub mode: String,
    pub memory_bytes: u64,
    pub proc_sys: PathBuf,
    pub conf_path: Option<PathBuf>,
    /// `written`, `unchanged` or absent for a dry run.
    pub conf_status: Option<String>,
    pub keys: Vec<TuneKey>,
    pub failed: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TuneKey {
    #[serde(flatten)]
    pub plan: PlanItem,
    /// Value read back after writing (apply only).
    pub after: Option<String>,
    #[serde(flatten)]
    pub status: Option<KeyStatus>,
}

/// Dry run: the plan as a report.
pub fn dry_run(proc_sys: &Path, mem_bytes: u64, targets: &[Target]) -> Result<TuneReport, TuneError> {
    let plan = make_plan(proc_sys, targets)?;
    Ok(TuneReport {
        mode: "dry-run".into(),
        memory_bytes: mem_bytes,
        proc_sys: proc_sys.to_path_buf(),
        conf_path: None,
        conf_status: None,
        keys: plan.into_iter().map(|p| TuneKey { plan: p, after: None, status: None }).collect(),
        failed: 0,
    })
}

/// Applies the plan: checks the sysctl dir is writable first (nothing is
/// applied otherwise), writes each key that differs, reads it back, then
/// writes the conf file (only when its content changed). Idempotent.
pub fn apply(proc_sys: &Path, sysctl_dir: &Path, mem_bytes: u64, targets: &[Target]) -> Result<TuneReport, TuneError> {
    let plan = make_plan(proc_sys, targets)?;
    // Fail before touching the kernel if the conf file cannot be written.
    let probe = tempfile::Builder::new()
        .prefix(".fjord-tune-")
        .tempfile_in(sysctl_dir)
        .map_err(|source| TuneError::SysctlDir { dir: sysctl_dir.to_path_buf(), source })?;
    let mut keys = Vec::new();
    for p in plan {
        let path = proc_sys.join(key_to_relpath(&p.key));
        let (status, after) = match p.action {
            Action::Ok => (KeyStatus::Unchanged, p.current.clone()),
            Action::KeepHigher => (KeyStatus::KeptHigher, p.current.clone()),
            Action::Missing => (KeyStatus::Skipped { reason: missing_reason(&p.key, proc_sys) }, None),
            Action::Set => match std::fs::write(&path, format!("{}\n", p.target)) {
                Err(e) => (KeyStatus::Failed { reason: write_error_reason(&p.key, &p.target, &e) }, p.current.clone()),
                Ok(()) => match read_key(proc_sys, &p.key) {
                    Ok(Some(v)) if v == normalize(&p.target) => (KeyStatus::Applied, Some(v)),
                    Ok(Some(v)) => (
                        KeyStatus::Failed { reason: format!("wrote '{}' but the kernel reports '{v}'", p.target) },
                        Some(v),
                    ),
                    Ok(None) => (KeyStatus::Failed { reason: format!("{} vanished after writing", path.display()) }, None),
                    Err(e) => (KeyStatus::Failed { reason: format!("read-back failed: {e}") }, None),
                },
            },
        };
        match &status {
            KeyStatus::Applied => tracing::info!(key = %p.key, from = ?p.current, to = %p.target, "sysctl applied"),
            KeyStatus::Failed { reason } => tracing::warn!(key = %p.key, %reason, "sysctl not applied"),
            _ => tracing::debug!(key = %p.key, ?status, "sysctl unchanged"),
        }
        keys.push((p, status, after));
    }
    let items: Vec<(PlanItem, KeyStatus)> = keys.iter().map(|(p, s, _)| (p.clone(), s.clone())).collect();
    let content = sysctl::render_conf(mem_bytes, &items);
    let conf_path = sysctl_dir.join(CONF_NAME);
    let conf_status = if std::fs::read_to_string(&conf_path).ok().as_deref() == Some(content.as_str()) {
        "unchanged"
    } else {
        use std::io::Write;
        let mut probe = probe;
        probe
            .write_all(content.as_bytes())
            .and_then(|_| probe.as_file().sync_all())
            .map_err(|source| TuneError::WriteConf { path: conf_path.clone(), source })?;
        probe.persist(&conf_path).map_err(|e| TuneError::WriteConf { path: conf_path.clone(), source: e.error })?;
        std::fs::set_permissions(&conf_path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .map_err(|source| TuneError::WriteConf { path: conf_path.clone(), source })?;
        "written"
    };
    let failed = keys.iter().filter(|(_, s, _)| matches!(s, KeyStatus::Failed { .. })).count();
    Ok(TuneReport {
        mode: "apply".into(),
        memory_bytes: mem_bytes,
        proc_sys: proc_sys.to_path_buf(),
        conf_path: Some(conf_path),
        conf_status: Some(conf_status.into()),
        keys: keys.into_iter().map(|(p, s, a)| TuneKey { plan: p, after: a, status: Some(s) }).collect(),
        failed,
    })
}

pub fn render_text(r: &TuneReport) -> String {
    let mut s = format!(
        "sysctl profile for {} MiB of RAM ({}; {}):\n",
        r.memory_bytes / sysctl::MIB,
        r.mode,
        r.proc_sys.display()
    );
    let w = r.keys.iter().map(|k| k.plan.key.len()).max().unwrap_or(10);
    let cw = r.keys.iter().map(|k| k.plan.current.as_deref().unwrap_or("-").len()).max().unwrap_or(7).max(7);
    s.push_str(&format!("  {:w$}  {:cw$}    {}\n", "KEY", "CURRENT", "TARGET → RESULT"));
    for k in &r.keys {
        let p = &k.plan;
        let cur = p.current.as_deref().unwrap_or("-");
        let what = match (&k.status, p.action) {
            (Some(KeyStatus::Applied), _) => "applied".to_string(),
            (Some(KeyStatus::Unchanged), _) | (None, Action::Ok) => "ok".to_string(),
            (Some(KeyStatus::KeptHigher), _) | (None, Action::KeepHigher) => "kept (already higher)".to_string(),
            (Some(KeyStatus::Skipped { reason }), _) => format!("skipped: {reason}"),
            (Some(KeyStatus::Failed { reason }), _) => format!("FAILED: {reason}"),
            (None, Action::Set) => "would set".to_string(),
            (None, Action::Missing) => "missing: key not in this kernel (or module not loaded)".to_string(),
        };
        s.push_str(&format!("  {:w$}  {:cw$} →  {}  [{}]\n", p.key, cur, p.target, what));
    }
    match (&r.conf_path, &r.conf_status) {
        (Some(p), Some(st)) => s.push_str(&format!("{} {}\n", p.display(), st)),
        _ => {
            let n = r.keys.iter().filter(|k| k.plan.action == Action::Set).count();
            s.push_str(&format!("{n} key(s) would change; run with --apply to write them and {CONF_NAME}\n"));
        }
    }
    if r.failed > 0 {
        s.push_str(&format!("{} key(s) FAILED (see above)\n", r.failed));
    }
    s
}

/// Reads MemTotal from /proc/meminfo.
pub fn host_memory() -> anyhow::Result<crate::host::MemInfo> {
    use anyhow::Context;
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo for the machine's memory; pass --memory")?;
    crate::host::parse_meminfo(&text).map_err(|e| anyhow::anyhow!("/proc/meminfo: {e}; pass --memory"))
}

/// `fjordctl tune`: memory-aware network sysctls.
#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Show (default) or apply the memory-scaled network sysctl profile",
    long_about = "The seed's profile (ip_local_port_range 1024 60999 — the seed's 1024 65535 stopped below \
fjord's eBPF SNAT range 61000-65535 —, default_qdisc fq, tcp_congestion_control bbr, \
fs.file-max 2097152, netdev_max_backlog 16384) plus conntrack and TCP buffer sizes scaled to RAM: \
nf_conntrack_max = 1 entry per 32 KiB of RAM (64Ki..4Mi), socket buffer max = RAM/512 (4..64 MiB). \
Numeric limits are never lowered. Shows current → target for each key; --apply writes them to the kernel, \
reads each back, and writes 99-fjord-network.conf into --sysctl-dir so they survive reboots. Idempotent.\n\n\
Exit code: 0 when nothing failed, 1 when a key could not be applied."
)]
pub struct TuneArgs {
    /// Only show what would change (the default)
    #[arg(long, conflicts_with = "apply")]
    pub dry_run: bool,
    /// Write the values to the kernel and the conf file
    #[arg(long)]
    pub apply: bool,
    /// Where the conf file goes
    #[arg(long, value_name = "DIR", default_value = "/etc/sysctl.d")]
    pub sysctl_dir: PathBuf,
    /// The sysctl tree to read and write (tests point it at a fake tree)
    #[arg(long, value_name = "DIR", default_value = "/proc/sys")]
    pub proc_sys: PathBuf,
    /// Scale for this much RAM instead of the machine's MemTotal (e.g. 8GiB)
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size_arg)]
    pub memory: Option<u64>,
    /// Restrict to these keys (repeatable), e.g. --only net.ipv4.tcp_rmem
    #[arg(long = "only", value_name = "KEY")]
    pub only: Vec<String>,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value_t = crate::OutputFormat::Text)]
    pub output: crate::OutputFormat,
}

pub fn run_tune(args: &TuneArgs) -> anyhow::Result<i32> {
    let mem = match args.memory {
        Some(m) => m,
        None => host_memory()?.total_bytes,
    };
    let targets = select(sysctl::profile(mem), &args.only)?;
    let report = if args.apply {
        apply(&args.proc_sys, &args.sysctl_dir, mem, &targets)?
    } else {
        dry_run(&args.proc_sys, mem, &targets)?
    };
    match args.output {
        crate::OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        crate::OutputFormat::Text => print!("{}", render_text(&report)),
    }
    Ok(if report.failed > 0 { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_filters_and_rejects_unknown_keys() {
        let all = sysctl::profile(8 << 30);
        assert_eq!(select(all.clone(), &[]).unwrap().len(), all.len());
        let one = select(all.clone(), &["net.ipv4.tcp_rmem".into()]).unwrap();
        assert_eq!(one.len(), 1);
        let e = select(all, &["net.ipv4.nope".into()]).unwrap_err().to_string();
        assert!(e.contains("net.ipv4.nope") && e.contains("net.core.default_qdisc"), "{e}");
    }

    #[test]
    fn write_errors_say_what_to_do() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert!(write_error_reason("net.core.rmem_max", "1", &e(libc::EROFS)).contains("read-only"));
        assert!(write_error_reason("net.ipv4.tcp_congestion_control", "bbr", &e(libc::ENOENT)).contains("modprobe tcp_bbr"));
        assert!(write_error_reason("net.core.default_qdisc", "fq", &e(libc::ENOENT)).contains("modprobe sch_fq"));
        assert!(write_error_reason("net.core.rmem_max", "x", &e(libc::EINVAL)).contains("rejected 'x'"));
    }

    #[test]
    fn read_key_distinguishes_missing_from_unreadable() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_key(d.path(), "net.core.rmem_max").unwrap(), None);
        std::fs::create_dir_all(d.path().join("net/core/rmem_max")).unwrap(); // a directory: EISDIR
        let e = read_key(d.path(), "net.core.rmem_max").unwrap_err().to_string();
        assert!(e.contains("net.core.rmem_max") && e.contains("--proc-sys"), "{e}");
        std::fs::write(d.path().join("net/core/wmem_max"), "4096\t\n").unwrap();
        assert_eq!(read_key(d.path(), "net.core.wmem_max").unwrap().as_deref(), Some("4096"));
    }
}
