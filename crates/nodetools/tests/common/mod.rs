//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Tests that touch the kernel (mounts, loop devices, netns) or load the disk run one at a time:
/// a mutex within this test binary plus an flock across processes (for nextest, which runs
/// every test in its own process). Both are released on drop, also when the test panics.
static KERNEL_LOCK: Mutex<()> = Mutex::new(());

pub struct KernelLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
    _guard: MutexGuard<'static, ()>,
}

pub fn kernel_lock() -> KernelLock {
    let guard = KERNEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("fjtnt-kernel-tests.lock"))
        .expect("open lock file");
    let flock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).expect("flock");
    KernelLock { _flock: flock, _guard: guard }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fjord-nodetools")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A scratch dir on the disk that holds the target dir (not tmpfs), named with our prefix.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("fjtnt-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir")
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `script` with sh in a private mount namespace (`unshare -m --propagation private`):
/// every mount it makes vanishes with it, nothing leaks to the host.
pub fn in_private_mount_ns(script: &str, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c", script]);
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

/// Names in a dir (for "was the test file removed?").
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// A fake /proc/sys with the given key = value files.
pub fn fake_proc_sys(root: &Path, values: &[(&str, &str)]) -> PathBuf {
    let ps = root.join("proc-sys");
    for (k, v) in values {
        let p = ps.join(k.replace('.', "/"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("{v}\n")).unwrap();
    }
    ps
}

pub fn read_fake(ps: &Path, key: &str) -> String {
    std::fs::read_to_string(ps.join(key.replace('.', "/"))).unwrap().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Kernel defaults of a fresh 6.x machine.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("net.ipv4.ip_local_port_range", "32768\t60999"),
    ("net.core.default_qdisc", "pfifo_fast"),
    ("net.ipv4.tcp_congestion_control", "cubic"),
    ("fs.file-max", "9223372036854775807"),
    ("net.core.netdev_max_backlog", "1000"),
    ("net.netfilter.nf_conntrack_max", "65536"),
    ("net.core.rmem_max", "212992"),
    ("net.core.wmem_max", "212992"),
    ("net.ipv4.tcp_rmem", "4096\t131072\t6291456"),
    ("net.ipv4.tcp_wmem", "4096\t16384\t4194304"),
];
