//! Named network namespaces, compatible with `ip netns` (bind mounts under
//! `/run/netns`), and running code or commands inside one.
//!
//! Namespaces are per thread: code that must run inside another namespace runs
//! on a fresh OS thread that called `setns(2)` and then exits, so no pooled
//! thread is ever left in a foreign namespace.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {name:?} already exists ({path})")]
    Exists { name: String, path: String },
    #[error("network namespace name {0:?} is invalid: use letters, digits, '-', '_', '.' (max 200 bytes)")]
    BadName(String),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: String, source: io::Error },
    #[error("{op} {path}: {source}")]
    Sys { op: &'static str, path: String, source: nix::Error },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> NetnsError {
    let path = path.display().to_string();
    move |source| NetnsError::Io { op, path, source }
}
fn sys_err(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> NetnsError {
    let path = path.display().to_string();
    move |source| NetnsError::Sys { op, path, source }
}

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Make `/run/netns` a shared mount point, as `ip netns add` does, so that
/// namespace mounts propagate to every mount namespace.
fn prepare_dir() -> Result<(), NetnsError> {
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let flags = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match mount(None::<&str>, dir, Some("none"), flags, None::<&str>) {
        Ok(()) => Ok(()),
        Err(nix::Error::EINVAL) => {
            mount(Some(dir), dir, Some("none"), MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(sys_err("bind-mount", dir))?;
            mount(None::<&str>, dir, Some("none"), flags, None::<&str>).map_err(sys_err("make shared", dir))
        }
        Err(e) => Err(NetnsError::Sys { op: "make shared", path: NETNS_DIR.into(), source: e }),
    }
}

/// Create a named network namespace (like `ip netns add NAME`).
pub fn create(name: &str) -> Result<PathBuf, NetnsError> {
    if !valid_name(name) {
        return Err(NetnsError::BadName(name.into()));
    }
    prepare_dir()?;
    let p = path(name);
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&p) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(NetnsError::Exists { name: name.into(), path: p.display().to_string() })
        }
        Err(e) => return Err(io_err("create", &p)(e)),
    }
    let p2 = p.clone();
    let r = std::thread::spawn(move || -> Result<(), NetnsError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(sys_err("unshare(CLONE_NEWNET) for", &p2))?;
        mount(Some("/proc/thread-self/ns/net"), &p2, Some("none"), MsFlags::MS_BIND, None::<&str>)
            .map_err(sys_err("bind-mount namespace to", &p2))
    })
    .join()
    .expect("netns thread panicked");
    if let Err(e) = r {
        let _ = std::fs::remove_file(&p);
        return Err(e);
    }
    Ok(p)
}

/// Delete a named network namespace (like `ip netns del NAME`). Missing: Ok.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    delete_path(&path(name))
}

pub fn delete_path(p: &Path) -> Result<(), NetnsError> {
    if !p.exists() {
        return Ok(());
    }
    match umount2(p, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(sys_err("unmount", p)(e)),
    }
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", p)(e)),
    }
}

/// Names of the namespaces under /run/netns that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    out.sort();
    out
}

/// Open a namespace file (a path under /run/netns, or /proc/PID/ns/net).
pub fn open(p: &Path) -> Result<File, NetnsError> {
    File::open(p).map_err(io_err("open network namespace", p))
}

/// Run `f` on a fresh thread inside the namespace at `p`.
pub fn run_in<F, R>(p: &Path, f: F) -> Result<R, NetnsError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let ns = open(p)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(sys_err("setns into", p))?;
            Ok(f())
        })
        .join()
        .expect("thread in network namespace panicked")
    })
}

/// Run an async job on a fresh thread (with its own current-thread runtime)
/// inside the namespace at `p`, awaiting it without blocking the caller's runtime.
pub async fn run_async_in<F, Fut, R>(p: &Path, f: F) -> Result<R, NetnsError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R>,
    R: Send + 'static,
{
    let ns = open(p)?;
    let path = p.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = (|| {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(sys_err("setns into", &path))?;
            drop(ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io_err("start runtime in", &path))?;
            Ok(rt.block_on(f()))
        })();
        let _ = tx.send(r);
    });
    rx.await.expect("network namespace thread died")
}

/// Make `cmd` start inside the namespace at `p`.
pub fn command_in(cmd: &mut std::process::Command, p: &Path) -> Result<(), NetnsError> {
    let ns = open(p)?;
    // SAFETY: only the async-signal-safe setns(2) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
    }
    Ok(())
}

/// The inode of a namespace file: two paths name the same namespace if equal.
pub fn inode(p: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(p)?.ino())
}

/// True if this thread is (or may be) in the machine's initial network
/// namespace (PID 1's). Where PID 1's namespace cannot be read (sandboxes
/// deny it even to root), only a namespace named under /run/netns counts as
/// "not the initial one".
pub fn in_init_netns() -> bool {
    let Ok(me) = inode(Path::new("/proc/thread-self/ns/net")) else { return true };
    if let Ok(init) = inode(Path::new("/proc/1/ns/net")) {
        return me == init;
    }
    let named = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| inode(&e.path()).is_ok_and(|i| i == me));
    !named
}
