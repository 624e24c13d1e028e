//! The fsync benchmark against fio, a filling disk and Ctrl-C.

mod common;
use common::*;
use std::process::{Command, Stdio};

fn fio_installed() -> bool {
    Command::new("fio").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// fio and `bench fsync` on the same directory, 5 interleaved pairs, with the
/// seed's exact pattern (22 MiB, 2300-byte writes, fdatasync after each).
///
/// The directory is an ext4 filesystem on a loop device backed by tmpfs, in a
/// private mount namespace: a real journaling filesystem and the real
/// fdatasync path, but isolated from the other builds that share this disk.
/// On the shared disk itself p99 is bimodal (≈0.2 ms or ≈4 ms depending on
/// whether a neighbour's writeback lands in the run): 12 fio runs there gave
/// p99 from 157 µs to 4.0 ms, so no fixed ratio could tell tool from noise.
///
/// Tolerance, from repeated runs on the loop device (2-core box, other
/// engineers' builds running): fio alone varied p50 61–171 µs (bimodal, ~65 /
/// ~75 / ~110+ µs) and p99 96 µs–6 ms between runs; single runs of either tool
/// hit a ~4 ms p99 (one scheduler tick) whenever neighbours kept the CPUs busy,
/// even with both tools under SCHED_FIFO (the loop and jbd2 kernel threads are
/// not). So the criterion is "indistinguishable from another fio run under the
/// same conditions": the median of our 5 runs must lie within fio's own
/// min..max over its 5 interleaved runs, widened by 25% for p50 and 50% for
/// p99, and vice versa. With 25% for p99, 1 of 11 rounds failed (fio's runs
/// clustered at 96–121 µs, our median 152 µs); with 50%, 1 of 9 rounds still
/// failed under heavy neighbour load, hence one retry round (8 of 8 test runs
/// passed). A gross error (fsync instead of fdatasync, no preallocation,
/// batching, another write count) moves the median out of the envelope in
/// both rounds; neighbour noise rarely does twice. The count of fdatasyncs
/// must match fio's exactly; the percentile arithmetic itself is unit-tested
/// on known data in src/stats.rs.
#[test]
fn percentiles_agree_with_fio() {
    assert!(is_root(), "this test needs root (loop device, mount namespace); CI runs as root");
    assert!(fio_installed(), "fio is missing: apt-get install fio");
    let _l = kernel_lock();
    // One retry: a round can be spoiled by a neighbour (the failure below shows the numbers).
    let first = fio_round();
    if let Err(e) = first {
        eprintln!("round 1 disagreed, retrying once: {e}");
        fio_round().unwrap_or_else(|e2| panic!("fio and bench fsync disagree in two rounds:\n1: {e}\n2: {e2}"));
    }
}

/// One round of 5 interleaved pairs; Err describes the disagreement.
fn fio_round() -> Result<(), String> {
    let base = scratch();
    let mnt = base.path().join("mnt");
    let results = base.path().join("results");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&results).unwrap();
    // Both tools run under SCHED_FIFO (chrt -f 1) so that a CPU-bound neighbour on this
    // 2-core box delays neither tool's wake-up after fdatasync; same treatment for both.
    let script = r#"
set -e
mount -t tmpfs -o size=200m fjtnt-fio "$MNT"
truncate -s 150m "$MNT/img"
mkfs.ext4 -q -F "$MNT/img"
mkdir "$MNT/fs"
mount -o loop "$MNT/img" "$MNT/fs"
trap 'cd /; umount "$MNT/fs"; umount "$MNT"' EXIT
cd "$MNT/fs"
for i in 1 2 3 4 5; do
  chrt -f 1 fio --rw=write --ioengine=sync --fdatasync=1 --directory=. --size=22m --bs=2300 --name=fjtnt --output-format=json > "$RES/fio$i.json"
  rm -f fjtnt.*
  chrt -f 1 "$BIN" bench-fsync --dir . -o json > "$RES/ours$i.json"
  test -z "$(ls -A | grep -v lost+found)" || { echo "left behind: $(ls -A)"; exit 9; }
done
"#;
    let out = in_private_mount_ns(
        script,
        &[("MNT", mnt.to_str().unwrap()), ("RES", results.to_str().unwrap()), ("BIN", bin())],
    );
    assert!(out.status.success(), "script failed: {}\n{}", stdout(&out), stderr(&out));
    let (mut fio50, mut fio99, mut our50, mut our99) = (vec![], vec![], vec![], vec![]);
    for i in 1..=5 {
        let fio: serde_json::Value = serde_json::from_slice(&std::fs::read(results.join(format!("fio{i}.json"))).unwrap()).unwrap();
        let ours: fjord_nodetools::FsyncBenchResult =
            serde_json::from_slice(&std::fs::read(results.join(format!("ours{i}.json"))).unwrap()).unwrap();
        let sync = &fio["jobs"][0]["sync"]["lat_ns"];
        let pct = |p: &str| sync["percentile"][p].as_f64().unwrap();
        assert_eq!(sync["N"].as_u64().unwrap(), ours.writes, "fio and bench fsync must do the same number of fdatasyncs");
        assert_eq!(ours.writes, 10029);
        eprintln!(
            "pair {i}: p50 fio {} ours {} | p99 fio {} ours {}",
            pct("50.000000"),
            ours.fdatasync.p50_ns,
            pct("99.000000"),
            ours.fdatasync.p99_ns
        );
        fio50.push(pct("50.000000"));
        fio99.push(pct("99.000000"));
        our50.push(ours.fdatasync.p50_ns as f64);
        our99.push(ours.fdatasync.p99_ns as f64);
    }
    let within = |x: f64, runs: &[f64], margin: f64| {
        let lo = runs.iter().cloned().fold(f64::MAX, f64::min) / margin;
        let hi = runs.iter().cloned().fold(0.0, f64::max) * margin;
        (lo..=hi).contains(&x)
    };
    for (name, ours, fio, margin) in [("p50", &our50, &fio50, 1.25), ("p99", &our99, &fio99, 1.5)] {
        let (mo, mf) = (median(ours.clone()), median(fio.clone()));
        if !within(mo, fio, margin) {
            return Err(format!("{name}: our median {mo} outside fio's runs {fio:?} widened by {margin}x (ours: {ours:?})"));
        }
        if !within(mf, ours, margin) {
            return Err(format!("{name}: fio's median {mf} outside our runs {ours:?} widened by {margin}x"));
        }
    }
    Ok(())
}

/// A disk that fills up: a 1 MiB tmpfs in a private mount namespace, asked for 4 MiB.
/// With preallocation the error comes at fallocate; without, in the middle of the writes.
/// Either way: a clear error naming the file and what to do, exit 1, and no file left.
#[test]
fn disk_full_is_a_clear_error_and_the_file_is_removed() {
    assert!(is_root(), "this test needs root (mount namespace); CI runs as root");
    let _l = kernel_lock();
    for extra in ["", "--no-preallocate"] {
        let d = scratch();
        let script = r#"
mount -t tmpfs -o size=1m fjtnt-full "$D" || exit 99
"$BIN" bench-fsync --dir "$D" --size 4MiB $EXTRA
echo "rc=$?"
echo "left:$(ls -A "$D")"
umount "$D"
"#;
        let out = in_private_mount_ns(script, &[("D", d.path().to_str().unwrap()), ("BIN", bin()), ("EXTRA", extra)]);
        let (so, se) = (stdout(&out), stderr(&out));
        assert!(so.contains("rc=1\n"), "mode {extra:?}: expected exit 1\nstdout: {so}\nstderr: {se}");
        assert!(so.contains("left:\n"), "mode {extra:?}: test file left behind: {so}");
        assert!(se.contains("disk full") && se.contains(".fjord-fsync-bench.") && se.contains("--dir") && se.contains("removed"), "{se}");
        if extra.is_empty() {
            assert!(se.contains("after writing 0 B)"), "preallocation should fail before writing: {se}");
        } else {
            assert!(!se.contains("after writing 0 B)"), "should fail mid-run after some writes: {se}");
        }
        assert!(entries(d.path()).is_empty());
    }
}

/// Ctrl-C: SIGINT while running → exit 130, message, file removed.
#[test]
fn ctrl_c_removes_the_file() {
    let _l = kernel_lock();
    let d = scratch();
    let mut child = Command::new(bin())
        .args(["bench-fsync", "--size", "256MiB", "--dir"])
        .arg(d.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (bounded) until the benchmark has created its file, then interrupt it.
    let mut seen = false;
    for _ in 0..3000 {
        if entries(d.path()).iter().any(|e| e.starts_with(".fjord-fsync-bench.")) {
            seen = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(seen, "the benchmark never created its file");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    assert!(entries(d.path()).is_empty(), "file left: {:?}", entries(d.path()));
}

#[test]
fn cli_output_and_bad_input() {
    let _l = kernel_lock();
    let d = scratch();
    // small run, JSON
    let out = run(Command::new(bin()).args(["bench-fsync", "--size", "46000", "-o", "json", "--dir"]).arg(d.path()));
    // Exit 1 is the verdict "p99 over etcd's 10 ms minimum": a busy shared disk may earn it.
    assert!(matches!(out.status.code(), Some(0) | Some(1)), "{}", stderr(&out));
    let r: fjord_nodetools::FsyncBenchResult = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r.writes, r.block_size, r.fdatasync.count), (20, 2300, 20));
    assert!(r.fdatasync.p50_ns <= r.fdatasync.p99_ns && r.fdatasync.p99_ns <= r.fdatasync.max_ns);
    assert!(entries(d.path()).is_empty());
    // text
    let out = run(Command::new(bin()).args(["bench-fsync", "--size", "23000", "--dir"]).arg(d.path()));
    let so = stdout(&out);
    assert!(so.contains("p50") && so.contains("p99.9") && so.contains("IOPS") && so.contains("verdict"), "{so}");
    // bad sizes name the flag
    let out = run(Command::new(bin()).args(["bench-fsync", "--size", "22 parsecs"]));
    assert!(!out.status.success() && stderr(&out).contains("--size") && stderr(&out).contains("parsecs"), "{}", stderr(&out));
    let out = run(Command::new(bin()).args(["bench-fsync", "--block-size", "0", "--dir"]).arg(d.path()));
    assert!(!out.status.success() && stderr(&out).contains("--block-size"), "{}", stderr(&out));
    let out = run(Command::new(bin()).args(["bench-fsync", "--dir", "/nonexistent/fjtnt"]));
    assert!(!out.status.success() && stderr(&out).contains("/nonexistent/fjtnt"), "{}", stderr(&out));
    // --quick and --size conflict
    let out = run(Command::new(bin()).args(["bench-fsync", "--quick", "--size", "1m"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // help documents the defaults
    let out = run(Command::new(bin()).args(["bench-fsync", "--help"]));
    let h = stdout(&out);
    assert!(h.contains("22MiB") && h.contains("2300") && h.contains("10 ms"), "{h}");
}
