//! `tune` against a fake /proc/sys, bad input, and inside a real network namespace.

mod common;
use common::*;
use std::process::Command;

fn tune(args: &[&str]) -> std::process::Output {
    run(Command::new(bin()).arg("tune").args(args))
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}\n{}", stdout(o), stderr(o)))
}

fn status_of(report: &serde_json::Value, key: &str) -> String {
    report["keys"].as_array().unwrap().iter().find(|k| k["key"] == key).unwrap_or_else(|| panic!("no {key}"))["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn dry_run_shows_current_and_target_and_changes_nothing() {
    let d = scratch();
    let ps = fake_proc_sys(d.path(), DEFAULTS);
    let sd = d.path().join("sysctl.d");
    std::fs::create_dir(&sd).unwrap();
    let o = tune(&["--proc-sys", ps.to_str().unwrap(), "--sysctl-dir", sd.to_str().unwrap(), "--memory", "2GiB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("net.ipv4.ip_local_port_range") && s.contains("32768 60999") && s.contains("→") && s.contains("1024 60999"), "{s}");
    // 2 GiB: 4 MiB buffers, 64Ki conntrack
    assert!(s.contains("4096 131072 6291456") && s.contains("kept (already higher)"), "{s}");
    assert!(s.contains("would set") && s.contains("--apply"), "{s}");
    assert_eq!(read_fake(&ps, "net.ipv4.ip_local_port_range"), "32768 60999");
    assert!(entries(&sd).is_empty(), "dry run wrote {:?}", entries(&sd));
    // explicit --dry-run and --apply conflict
    let o = tune(&["--dry-run", "--apply"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn apply_on_a_fake_root_is_idempotent() {
    let d = scratch();
    let ps = fake_proc_sys(d.path(), DEFAULTS);
    let sd = d.path().join("sysctl.d");
    std::fs::create_dir(&sd).unwrap();
    let args = ["--apply", "--proc-sys", ps.to_str().unwrap(), "--sysctl-dir", sd.to_str().unwrap(), "--memory", "8GiB", "-o", "json"];
    let o = tune(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = json(&o);
    assert_eq!(r["conf_status"], "written");
    assert_eq!(r["failed"], 0);
    for k in ["net.ipv4.ip_local_port_range", "net.core.default_qdisc", "net.ipv4.tcp_congestion_control", "net.core.netdev_max_backlog", "net.netfilter.nf_conntrack_max", "net.core.rmem_max", "net.ipv4.tcp_rmem"] {
        assert_eq!(status_of(&r, k), "applied", "{k}");
    }
    assert_eq!(status_of(&r, "fs.file-max"), "kept_higher");
    // the values really are in the (fake) tree, 8 GiB scaling
    assert_eq!(read_fake(&ps, "net.ipv4.ip_local_port_range"), "1024 60999");
    assert_eq!(read_fake(&ps, "net.core.default_qdisc"), "fq");
    assert_eq!(read_fake(&ps, "net.ipv4.tcp_congestion_control"), "bbr");
    assert_eq!(read_fake(&ps, "net.core.netdev_max_backlog"), "16384");
    assert_eq!(read_fake(&ps, "net.netfilter.nf_conntrack_max"), "262144");
    assert_eq!(read_fake(&ps, "net.core.rmem_max"), "16777216");
    assert_eq!(read_fake(&ps, "net.ipv4.tcp_rmem"), "4096 131072 16777216");
    assert_eq!(read_fake(&ps, "net.ipv4.tcp_wmem"), "4096 16384 16777216");
    assert_eq!(read_fake(&ps, "fs.file-max"), "9223372036854775807", "raise-only: never lowered");
    let conf = std::fs::read_to_string(sd.join("99-fjord-network.conf")).unwrap();
    assert!(conf.contains("\nnet.ipv4.tcp_congestion_control = bbr\n") && conf.contains("\nnet.core.rmem_max = 16777216\n"), "{conf}");
    assert!(conf.contains("# fs.file-max = 2097152  (not set: current 9223372036854775807 is already higher)"), "{conf}");
    assert_eq!(entries(&sd), vec!["99-fjord-network.conf".to_string()], "no temp files left");
    let mtime = std::fs::metadata(sd.join("99-fjord-network.conf")).unwrap().modified().unwrap();

    // second run: nothing to do, same file
    let o = tune(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r2 = json(&o);
    assert_eq!(r2["conf_status"], "unchanged");
    for k in r2["keys"].as_array().unwrap() {
        assert!(k["status"] == "unchanged" || k["status"] == "kept_higher", "{k}");
    }
    assert_eq!(std::fs::read_to_string(sd.join("99-fjord-network.conf")).unwrap(), conf);
    assert_eq!(std::fs::metadata(sd.join("99-fjord-network.conf")).unwrap().modified().unwrap(), mtime);

    // the conf file is what `sysctl -p` would read: every setting line is "key = value" with a key we manage
    for l in conf.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (k, v) = l.split_once(" = ").unwrap();
        assert_eq!(read_fake(&ps, k), v);
    }
}

#[test]
fn missing_key_is_skipped_with_the_reason_and_the_rest_applies() {
    let d = scratch();
    let vals: Vec<_> = DEFAULTS.iter().copied().filter(|(k, _)| *k != "net.netfilter.nf_conntrack_max").collect();
    let ps = fake_proc_sys(d.path(), &vals);
    let sd = d.path().join("sysctl.d");
    std::fs::create_dir(&sd).unwrap();
    let o = tune(&["--apply", "--proc-sys", ps.to_str().unwrap(), "--sysctl-dir", sd.to_str().unwrap(), "--memory", "8GiB", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = json(&o);
    assert_eq!(status_of(&r, "net.netfilter.nf_conntrack_max"), "skipped");
    let k = r["keys"].as_array().unwrap().iter().find(|k| k["key"] == "net.netfilter.nf_conntrack_max").unwrap();
    assert!(k["reason"].as_str().unwrap().contains("modprobe nf_conntrack"), "{k}");
    assert_eq!(status_of(&r, "net.core.rmem_max"), "applied");
    assert!(!ps.join("net/netfilter/nf_conntrack_max").exists(), "must not create missing keys");
    let conf = std::fs::read_to_string(sd.join("99-fjord-network.conf")).unwrap();
    assert!(conf.contains("# net.netfilter.nf_conntrack_max = 262144  (not applied:"), "{conf}");
}

#[test]
fn non_numeric_value_fails_before_anything_is_applied() {
    let d = scratch();
    let mut vals = DEFAULTS.to_vec();
    vals.retain(|(k, _)| *k != "net.core.netdev_max_backlog");
    vals.push(("net.core.netdev_max_backlog", "lots"));
    let ps = fake_proc_sys(d.path(), &vals);
    let sd = d.path().join("sysctl.d");
    std::fs::create_dir(&sd).unwrap();
    let o = tune(&["--apply", "--proc-sys", ps.to_str().unwrap(), "--sysctl-dir", sd.to_str().unwrap(), "--memory", "8GiB"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("net.core.netdev_max_backlog") && e.contains("\"lots\"") && e.contains("/net/core/netdev_max_backlog"), "{e}");
    assert_eq!(e.matches("cannot parse").count(), 1, "said once: {e}");
    // nothing half-applied
    assert_eq!(read_fake(&ps, "net.ipv4.ip_local_port_range"), "32768 60999");
    assert!(entries(&sd).is_empty());
}

#[test]
fn bad_paths_and_keys_are_clear_errors() {
    let d = scratch();
    let ps = fake_proc_sys(d.path(), DEFAULTS);
    // sysctl dir is a file: refused before touching any key
    let file = d.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let o = tune(&["--apply", "--proc-sys", ps.to_str().unwrap(), "--sysctl-dir", file.to_str().unwrap(), "--memory", "8GiB"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot write to the sysctl dir") && stderr(&o).contains("not-a-dir") && stderr(&o).contains("Nothing was applied"), "{}", stderr(&o));
    assert_eq!(read_fake(&ps, "net.core.default_qdisc"), "pfifo_fast");
    // unknown --only key lists the known ones
    let o = tune(&["--proc-sys", ps.to_str().unwrap(), "--only", "net.ipv4.tcp_fastopen", "--memory", "8GiB"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("net.ipv4.tcp_fastopen") && stderr(&o).contains("net.ipv4.tcp_rmem"), "{}", stderr(&o));
    // missing proc tree
    let o = tune(&["--proc-sys", "/nonexistent/fjtnt", "--memory", "8GiB"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/fjtnt") && stderr(&o).contains("--proc-sys"), "{}", stderr(&o));
    // bad --memory
    let o = tune(&["--memory", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--memory"), "{}", stderr(&o));
}

/// Root can write anywhere, so "unwritable" needs a read-only mount: done in a
/// private mount namespace. (1) read-only sysctl dir → refused, nothing applied.
/// (2) read-only /proc/sys (as in a container) → every key FAILED with the reason, exit 1.
#[test]
fn read_only_dirs() {
    assert!(is_root(), "this test needs root (mount namespace); CI runs as root");
    let _l = kernel_lock();
    let d = scratch();
    let ps = fake_proc_sys(d.path(), DEFAULTS);
    let sd = d.path().join("sysctl.d");
    std::fs::create_dir(&sd).unwrap();
    let script = r#"
mount -t tmpfs -o ro,size=1m fjtnt-ro "$SD" || exit 99
"$BIN" tune --apply --proc-sys "$PS" --sysctl-dir "$SD" --memory 8GiB
echo "rc=$?"
"#;
    let o = in_private_mount_ns(script, &[("SD", sd.to_str().unwrap()), ("PS", ps.to_str().unwrap()), ("BIN", bin())]);
    assert!(stdout(&o).contains("rc=1"), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("Read-only file system") && stderr(&o).contains("Nothing was applied"), "{}", stderr(&o));
    assert_eq!(read_fake(&ps, "net.core.default_qdisc"), "pfifo_fast");

    let script = r#"
mount --bind "$PS" "$PS" && mount -o remount,bind,ro "$PS" || exit 99
"$BIN" tune --apply --proc-sys "$PS" --sysctl-dir "$SD" --memory 8GiB -o json
echo "rc=$?"
"#;
    let o = in_private_mount_ns(script, &[("SD", sd.to_str().unwrap()), ("PS", ps.to_str().unwrap()), ("BIN", bin())]);
    let so = stdout(&o);
    assert!(so.trim_end().ends_with("rc=1"), "{so}\n{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(so.trim_end().trim_end_matches("rc=1")).unwrap();
    assert!(r["failed"].as_u64().unwrap() >= 7, "{r}");
    let k = r["keys"].as_array().unwrap().iter().find(|k| k["key"] == "net.core.default_qdisc").unwrap();
    assert_eq!(k["status"], "failed");
    assert!(k["reason"].as_str().unwrap().contains("read-only"), "{k}");
    assert_eq!(read_fake(&ps, "net.core.default_qdisc"), "pfifo_fast");
    let conf = std::fs::read_to_string(sd.join("99-fjord-network.conf")).unwrap();
    assert!(conf.contains("# net.core.default_qdisc = fq  (not applied: not writable"), "{conf}");
}

/// A network namespace that is deleted on drop (also when the test panics).
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!("fjtnt-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let o = run(Command::new("ip").args(["netns", "add", &name]));
        assert!(o.status.success(), "ip netns add {name}: {}", stderr(&o));
        Netns(name)
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        run(Command::new("ip").args(["netns", "exec", &self.0]).args(args))
    }
    fn read(&self, key: &str) -> String {
        let o = self.exec(&["cat", &format!("/proc/sys/{}", key.replace('.', "/"))]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn read_root(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/"))).unwrap().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The real kernel: tune runs inside a fresh netns (ip netns exec) on the
/// per-namespace keys only; the values change there and not in the root netns.
#[test]
fn apply_inside_a_network_namespace() {
    assert!(is_root(), "this test needs root (network namespace); CI runs as root");
    let _l = kernel_lock();
    let mut keys = vec!["net.ipv4.ip_local_port_range", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"];
    // Only if bbr is already available: writing it otherwise would make the kernel load a module.
    let bbr = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap_or_default().split_whitespace().any(|c| c == "bbr");
    if bbr {
        keys.push("net.ipv4.tcp_congestion_control");
    }
    let root_before: Vec<String> = keys.iter().map(|k| read_root(k)).collect();
    let ns = Netns::new();
    let d = scratch();
    let mut args = vec![bin(), "tune", "--apply", "--proc-sys", "/proc/sys", "--sysctl-dir", d.path().to_str().unwrap(), "--memory", "8GiB", "-o", "json"];
    for k in &keys {
        args.push("--only");
        args.push(k);
    }
    let o = ns.exec(&args);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    let r = json(&o);
    assert_eq!(r["keys"].as_array().unwrap().len(), keys.len());
    assert_eq!(ns.read("net.ipv4.ip_local_port_range"), "1024 60999");
    let rmem: Vec<u64> = ns.read("net.ipv4.tcp_rmem").split(' ').map(|x| x.parse().unwrap()).collect();
    assert!(rmem[2] >= 16 << 20 && rmem[1] >= 131072, "{rmem:?}");
    let wmem: Vec<u64> = ns.read("net.ipv4.tcp_wmem").split(' ').map(|x| x.parse().unwrap()).collect();
    assert!(wmem[2] >= 16 << 20, "{wmem:?}");
    if bbr {
        assert_eq!(ns.read("net.ipv4.tcp_congestion_control"), "bbr");
    }
    // root namespace untouched
    let root_after: Vec<String> = keys.iter().map(|k| read_root(k)).collect();
    assert_eq!(root_before, root_after);
    // idempotent in the namespace too
    let o = ns.exec(&args);
    let r = json(&o);
    assert_eq!(r["conf_status"], "unchanged");
    for k in r["keys"].as_array().unwrap() {
        assert!(k["status"] == "unchanged" || k["status"] == "kept_higher", "{k}");
    }
}
