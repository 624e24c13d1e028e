//! `bench fsync`: etcd's WAL write pattern, exactly as the seed's
//! `fio --rw=write --ioengine=sync --fdatasync=1 --size=22m --bs=2300`:
//! sequential writes of `block_size` bytes to a new file, `fdatasync` after
//! each, the latency of every `fdatasync` recorded.
//!
//! Like fio (default `fallocate=native`) and like etcd (which preallocates its
//! 64 MB WAL segments), the file is preallocated with `fallocate` first, so a
//! disk without room fails before the first write. `--no-preallocate` skips it.

use crate::size::{format_bytes, format_ns};
use crate::stats::{summarize, FsyncVerdict, LatencySummary};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;
use thiserror::Error;

/// The seed's size (`--size=22m`).
pub const DEFAULT_SIZE: u64 = 22 * 1024 * 1024;
/// The seed's block size (`--bs=2300`), about one etcd WAL entry.
pub const DEFAULT_BLOCK_SIZE: u64 = 2300;
/// `--quick` (and preflight): 2 MiB = 911 fdatasyncs, enough for a p99.
pub const QUICK_SIZE: u64 = 2 * 1024 * 1024;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct FsyncBenchOptions {
    pub dir: PathBuf,
    pub size: u64,
    pub block_size: u64,
    pub preallocate: bool,
}

/// Errors of the fsync benchmark. Every variant names the path and what to do.
#[derive(Debug, Error)]
pub enum FsyncError {
    #[error("invalid {field}: {msg}")]
    InvalidInput { field: &'static str, msg: String },
    #[error("cannot use {dir} for the fsync test: {source}; pass --dir with an existing, writable directory on the disk etcd uses")]
    Dir { dir: PathBuf, source: io::Error },
    #[error("cannot create the test file {path}: {source}; pass --dir with a writable directory on the disk etcd uses")]
    Create { path: PathBuf, source: io::Error },
    #[error("disk full: {path} could not hold {needed} (no space left after writing {written}); free space on that filesystem, or pass a smaller --size or another --dir. The test file was removed")]
    DiskFull { path: PathBuf, needed: String, written: String },
    #[error("write to {path} failed at offset {offset}: {source}; the test file was removed")]
    Write { path: PathBuf, offset: u64, source: io::Error },
    #[error("fdatasync of {path} failed after {offset} bytes: {source}; the test file was removed")]
    Sync { path: PathBuf, offset: u64, source: io::Error },
    #[error("interrupted after {writes} writes; the test file {path} was removed")]
    Interrupted { path: PathBuf, writes: u64 },
}

/// Result of one run; serializable for `-o json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FsyncBenchResult {
    pub dir: PathBuf,
    /// Filesystem type of `dir` (from statfs), e.g. `ext4`, `tmpfs`.
    pub filesystem: String,
    pub size_bytes: u64,
    pub block_size: u64,
    pub preallocated: bool,
    /// Number of write+fdatasync pairs (= size / block_size, rounded down, as fio).
    pub writes: u64,
    pub bytes_written: u64,
    pub elapsed_ns: u64,
    /// Writes (each followed by fdatasync) per second.
    pub iops: f64,
    pub fdatasync: LatencySummary,
    pub verdict: FsyncVerdict,
    pub verdict_text: String,
    /// Caveats, e.g. a tmpfs dir where fdatasync does nothing.
    pub notes: Vec<String>,
}

/// Removes the test file when dropped: on success, on error, on panic and
/// after Ctrl-C (the handler only sets a flag; the loop returns and this runs).
struct TestFile {
    path: PathBuf,
}

impl Drop for TestFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "removed fsync test file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "could not remove fsync test file; remove it by hand"),
        }
    }
}

/// Name of a filesystem from its statfs magic.
pub fn fs_name(magic: i64) -> &'static str {
    match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0x2fc1_2fc1 => "zfs",
        0xF2F5_2010 => "f2fs",
        0x0100_7a69 | 0x01021997 => "9p/v9fs",
        0x6573_5546 => "fuse",
        _ => "unknown",
    }
}

fn filesystem_of(dir: &Path) -> String {
    match nix::sys::statfs::statfs(dir) {
        Ok(s) => {
            // __fsword_t is i64 on x86_64 but narrower on some architectures
            #[allow(clippy::unnecessary_cast)]
            let magic = s.filesystem_type().0 as i64;
            let name = fs_name(magic);
            if name == "unknown" {
                format!("unknown (magic {magic:#x})")
            } else {
                name.to_string()
            }
        }
        Err(e) => format!("unknown ({e})"),
    }
}

fn is_enospc(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

/// Validates sizes; the field names are the CLI flags.
pub fn validate(opts: &FsyncBenchOptions) -> Result<u64, FsyncError> {
    if opts.block_size == 0 {
        return Err(FsyncError::InvalidInput { field: "--block-size", msg: "must be at least 1 byte (etcd's pattern is 2300)".into() });
    }
    if opts.block_size > 64 * 1024 * 1024 {
        return Err(FsyncError::InvalidInput { field: "--block-size", msg: format!("{} is above the 64 MiB limit", opts.block_size) });
    }
    if opts.size < opts.block_size {
        return Err(FsyncError::InvalidInput {
            field: "--size",
            msg: format!("{} is smaller than --block-size {}; nothing would be written", opts.size, opts.block_size),
        });
    }
    Ok(opts.size / opts.block_size)
}

static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs the benchmark. `cancel` is polled between writes (Ctrl-C sets it);
/// `progress(done_bytes, total_bytes)` is called as it goes.
/// The test file is removed whatever happens.
pub fn bench_fsync(
    opts: &FsyncBenchOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<FsyncBenchResult, FsyncError> {
    let writes = validate(opts)?;
    let total = writes * opts.block_size;
    let meta = std::fs::metadata(&opts.dir).map_err(|source| FsyncError::Dir { dir: opts.dir.clone(), source })?;
    if !meta.is_dir() {
        return Err(FsyncError::Dir { dir: opts.dir.clone(), source: io::Error::from_raw_os_error(libc::ENOTDIR) });
    }
    let filesystem = filesystem_of(&opts.dir);
    let path = opts.dir.join(format!(
        ".fjord-fsync-bench.{}.{}",
        std::process::id(),
        FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| FsyncError::Create { path: path.clone(), source })?;
    let _guard = TestFile { path: path.clone() };
    tracing::info!(path = %path.display(), size = total, block_size = opts.block_size, %filesystem, "fsync benchmark starting");

    let disk_full = |written: u64| FsyncError::DiskFull {
        path: path.clone(),
        needed: format_bytes(total),
        written: format_bytes(written),
    };

    let mut preallocated = false;
    if opts.preallocate {
        // SAFETY: plain syscall on an fd we own.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, total as libc::off_t) };
        if rc == 0 {
            preallocated = true;
        } else {
            let e = io::Error::last_os_error();
            if is_enospc(&e) {
                return Err(disk_full(0));
            }
            // EOPNOTSUPP etc.: fio carries on without preallocation too.
            tracing::debug!(error = %e, "fallocate not supported here; writing without preallocation");
        }
    }

    let buf: Vec<u8> = (0..opts.block_size).map(|i| (i * 31 % 251) as u8).collect();
    let mut lat: Vec<u64> = Vec::with_capacity(writes as usize);
    let started = Instant::now();
    let mut offset = 0u64;
    let step = (writes / 200).max(1);
    for i in 0..writes {
        if cancel.load(Ordering::SeqCst) {
            return Err(FsyncError::Interrupted { path: path.clone(), writes: i });
        }
        if let Err(source) = file.write_all(&buf) {
            if is_enospc(&source) {
                return Err(disk_full(offset));
            }
            return Err(FsyncError::Write { path: path.clone(), offset, source });
        }
        let t = Instant::now();
        if let Err(source) = file.sync_data() {
            if is_enospc(&source) {
                return Err(disk_full(offset));
            }
            return Err(FsyncError::Sync { path: path.clone(), offset, source });
        }
        lat.push(t.elapsed().as_nanos() as u64);
        offset += opts.block_size;
        if i % step == 0 || i + 1 == writes {
            progress(offset, total);
        }
    }
    let elapsed_ns = started.elapsed().as_nanos().max(1) as u64;
    let fdatasync = summarize(&mut lat).expect("at least one write (validated)");
    let verdict = FsyncVerdict::from_p99(fdatasync.p99_ns);
    let mut notes = Vec::new();
    if filesystem == "tmpfs" || filesystem == "ramfs" {
        notes.push(format!(
            "{} is on {filesystem}: fdatasync does nothing in memory, so these numbers say nothing about a disk; pass --dir on the disk etcd uses",
            opts.dir.display()
        ));
    }
    if writes < 1000 {
        notes.push(format!("only {writes} fdatasyncs: p99.9 is the maximum of a small sample; use the default --size for a full run"));
    }
    Ok(FsyncBenchResult {
        dir: opts.dir.clone(),
        filesystem,
        size_bytes: opts.size,
        block_size: opts.block_size,
        preallocated,
        writes,
        bytes_written: offset,
        elapsed_ns,
        iops: writes as f64 / (elapsed_ns as f64 / 1e9),
        fdatasync,
        verdict,
        verdict_text: verdict.explain().to_string(),
        notes,
    })
}

/// Human-readable report.
pub fn render_text(r: &FsyncBenchResult) -> String {
    let l = &r.fdatasync;
    let mut s = String::new();
    s.push_str(&format!(
        "fdatasync benchmark (etcd WAL pattern: sequential {}-byte writes, fdatasync after each)\n",
        r.block_size
    ));
    s.push_str(&format!("  dir:        {} ({})\n", r.dir.display(), r.filesystem));
    s.push_str(&format!(
        "  written:    {} in {} writes, {:.2} s{}\n",
        format_bytes(r.bytes_written),
        r.writes,
        r.elapsed_ns as f64 / 1e9,
        if r.preallocated { " (file preallocated, as fio and etcd do)" } else { "" }
    ));
    s.push_str(&format!("  IOPS:       {:.0}\n", r.iops));
    s.push_str(&format!(
        "  fdatasync:  min {}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
        format_ns(l.min_ns),
        format_ns(l.p50_ns),
        format_ns(l.p90_ns),
        format_ns(l.p99_ns),
        format_ns(l.p99_9_ns),
        format_ns(l.max_ns)
    ));
    s.push_str(&format!("  verdict:    {}\n", r.verdict_text));
    for n in &r.notes {
        s.push_str(&format!("  note:       {n}\n"));
    }
    s
}

/// Default directory: etcd's data dir when it exists, else /var/tmp (disk-backed
/// on most systems, unlike /tmp which is often tmpfs).
pub fn default_dir() -> PathBuf {
    for d in ["/var/lib/etcd", "/var/tmp"] {
        if Path::new(d).is_dir() {
            return PathBuf::from(d);
        }
    }
    std::env::temp_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path, size: u64, bs: u64) -> FsyncBenchOptions {
        FsyncBenchOptions { dir: dir.to_path_buf(), size, block_size: bs, preallocate: true }
    }

    #[test]
    fn validation_names_the_flag() {
        let d = Path::new("/nonexistent");
        let e = validate(&opts(d, 100, 0)).unwrap_err();
        assert!(e.to_string().contains("--block-size"), "{e}");
        let e = validate(&opts(d, 100, 2300)).unwrap_err();
        assert!(e.to_string().contains("--size"), "{e}");
        assert_eq!(validate(&opts(d, DEFAULT_SIZE, DEFAULT_BLOCK_SIZE)).unwrap(), 10029); // fio's count
        assert_eq!(validate(&opts(d, QUICK_SIZE, DEFAULT_BLOCK_SIZE)).unwrap(), 911);
    }

    #[test]
    fn small_run_writes_and_removes_its_file() {
        let dir = tempfile::Builder::new().prefix("fjtnt-").tempdir_in("/var/tmp").unwrap();
        let never = AtomicBool::new(false);
        let mut calls = 0;
        let r = bench_fsync(&opts(dir.path(), 23_000, 2300), &never, &mut |done, total| {
            calls += 1;
            assert!(done <= total);
        })
        .unwrap();
        assert_eq!(r.writes, 10);
        assert_eq!(r.bytes_written, 23_000);
        assert_eq!(r.fdatasync.count, 10);
        assert!(r.fdatasync.min_ns <= r.fdatasync.p50_ns && r.fdatasync.p50_ns <= r.fdatasync.max_ns);
        assert!(calls >= 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "test file left behind");
        let text = render_text(&r);
        assert!(text.contains("p99") && text.contains("verdict"), "{text}");
    }

    #[test]
    fn cancel_stops_and_removes_file() {
        let dir = tempfile::Builder::new().prefix("fjtnt-").tempdir_in("/var/tmp").unwrap();
        let cancel = AtomicBool::new(false);
        let mut n = 0;
        let e = bench_fsync(&opts(dir.path(), 1 << 30, 2300), &cancel, &mut |_, _| {
            n += 1;
            cancel.store(true, Ordering::SeqCst);
        })
        .unwrap_err();
        assert!(matches!(e, FsyncError::Interrupted { writes: 1, .. }), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "test file left behind");
    }

    #[test]
    fn missing_dir_is_a_clear_error() {
        let e = bench_fsync(&opts(Path::new("/nonexistent/fjtnt-x"), 23_000, 2300), &AtomicBool::new(false), &mut |_, _| {})
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("/nonexistent/fjtnt-x") && s.contains("--dir"), "{s}");
    }

    #[test]
    fn a_file_is_not_a_dir() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = bench_fsync(&opts(f.path(), 23_000, 2300), &AtomicBool::new(false), &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, FsyncError::Dir { .. }), "{e}");
    }

    #[test]
    fn fs_names() {
        assert_eq!(fs_name(0xEF53), "ext4");
        assert_eq!(fs_name(0x01021994), "tmpfs");
        assert_eq!(fs_name(1), "unknown");
    }
}

/// `fjordctl bench fsync`: measures fdatasync latency with etcd's write pattern.
#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Measure fdatasync latency with etcd's WAL write pattern (like fio --rw=write --ioengine=sync --fdatasync=1 --size=22m --bs=2300)",
    long_about = "Writes --size bytes sequentially in --block-size chunks to a new file in --dir, calling fdatasync after each write, \
and reports count, IOPS and fdatasync latency percentiles with a verdict against etcd's guidance: \
p99 under 10 ms is etcd's minimum, under 2 ms is good. The file is preallocated (as fio and etcd do) and removed afterwards, also on Ctrl-C.\n\n\
Exit code: 0 when p99 < 10 ms, 1 when the disk is too slow for etcd or the benchmark failed, 130 when interrupted."
)]
pub struct BenchFsyncArgs {
    /// Directory on the disk to test: etcd's data dir [default: /var/lib/etcd if it exists, else /var/tmp]
    #[arg(long, value_name = "DIR", env = "FJORD_FSYNC_DIR")]
    pub dir: Option<PathBuf>,
    /// Total bytes to write (units: K/M/G = KiB/MiB/GiB as in fio, KB/MB = SI)
    #[arg(long, value_name = "SIZE", default_value = "22MiB", value_parser = crate::size::parse_size_arg, conflicts_with = "quick")]
    pub size: u64,
    /// Bytes per write; 2300 is about one etcd WAL entry
    #[arg(long, value_name = "BYTES", default_value = "2300", value_parser = crate::size::parse_size_arg)]
    pub block_size: u64,
    /// Quick run: 2 MiB (~900 fdatasyncs) instead of 22 MiB
    #[arg(long)]
    pub quick: bool,
    /// Do not preallocate the file with fallocate before writing (fio and etcd preallocate)
    #[arg(long)]
    pub no_preallocate: bool,
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value_t = crate::OutputFormat::Text)]
    pub output: crate::OutputFormat,
}

impl BenchFsyncArgs {
    pub fn options(&self) -> FsyncBenchOptions {
        FsyncBenchOptions {
            dir: self.dir.clone().unwrap_or_else(default_dir),
            size: if self.quick { QUICK_SIZE } else { self.size },
            block_size: self.block_size,
            preallocate: !self.no_preallocate,
        }
    }
}

/// Runs the benchmark with a progress bar (only when stderr is a terminal) and
/// Ctrl-C handling; prints the report to stdout. Returns the exit code.
pub fn run_bench_fsync(args: &BenchFsyncArgs) -> anyhow::Result<i32> {
    use anyhow::Context;
    let opts = args.options();
    let guard = crate::signals::InterruptGuard::install().context("installing the Ctrl-C handler for the fsync benchmark")?;
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(opts.size / opts.block_size.max(1) * opts.block_size),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("fdatasync {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("static template"),
    );
    let res = bench_fsync(&opts, guard.flag(), &mut |done, _| bar.set_position(done));
    bar.finish_and_clear();
    drop(guard);
    match res {
        Ok(r) => {
            match args.output {
                crate::OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                crate::OutputFormat::Text => print!("{}", render_text(&r)),
            }
            Ok(if r.verdict == FsyncVerdict::TooSlow { 1 } else { 0 })
        }
        Err(e @ FsyncError::Interrupted { .. }) => {
            eprintln!("fjord bench fsync: {e}");
            Ok(130)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("fsync benchmark in {}", opts.dir.display()))),
    }
}
