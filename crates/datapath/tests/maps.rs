//! Map programming against the real kernel (no packets): capacity limits,
//! bad input, and "nothing half-applied". Pins live in a unique bpffs dir.
mod common;

use std::net::Ipv4Addr;
use std::time::Instant;

use common::*;
use fjord_datapath::{Datapath, DatapathConfig, DatapathError};
use fjord_lb::{translate, Backend, BackendAddr, Frontend, FrontendEntries, LbConfig, Protocol, Service, ServiceKey};

fn svc(name: &str, vip: [u8; 4], port: u16, protocol: Protocol, backends: &[[u8; 4]], m: u32) -> FrontendEntries {
    let s = Service {
        name: name.into(),
        frontends: vec![Frontend {
            vip: Ipv4Addr::from(vip),
            port,
            protocol,
            backends: backends.iter().map(|b| Backend::ready(Ipv4Addr::from(*b), 8080)).collect(),
            options: Default::default(),
        }],
    };
    translate(&s, &LbConfig { maglev_size: m, full_tables: true, ..LbConfig::default() }).unwrap().remove(0)
}

fn small(pins: &PinDir) -> DatapathConfig {
    DatapathConfig { maglev_size: 251, max_services: 2, max_backends: 4, ct_entries: 1024, table_pool: 0, ..pins.config() }
}

#[test]
fn capacity_and_bad_input_leave_maps_unchanged() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let mut dp = Datapath::load(small(&pins)).expect("load");
    let a = svc("default/a", [10, 96, 0, 1], 80, Protocol::Tcp, &[[10, 244, 1, 5], [10, 244, 1, 6]], 251);
    let b = svc("default/b", [10, 96, 0, 2], 80, Protocol::Tcp, &[[10, 244, 1, 7], [10, 244, 1, 8]], 251);
    dp.upsert(&a).unwrap();
    dp.upsert(&b).unwrap();
    let stats = dp.map_stats().unwrap();
    let table_a = dp.maglev_table(&a.key).unwrap();

    // a third frontend does not fit fjord_services
    let c = svc("default/c", [10, 96, 0, 3], 80, Protocol::Tcp, &[[10, 244, 1, 5]], 251);
    let e = dp.upsert(&c).unwrap_err();
    assert!(matches!(e, DatapathError::ServicesFull { max: 2, .. }), "{e}");
    assert!(e.to_string().contains("default/c") && e.to_string().contains("max_services"), "{e}");
    assert_eq!(dp.map_stats().unwrap(), stats);

    // a new backend for a does not fit fjord_backends (4 in use)
    let a2 = svc("default/a", [10, 96, 0, 1], 80, Protocol::Tcp, &[[10, 244, 1, 5], [10, 244, 1, 6], [10, 244, 1, 9]], 251);
    let e = dp.upsert(&a2).unwrap_err();
    assert!(matches!(e, DatapathError::BackendsFull { needed: 1, free: 0, max: 4, .. }), "{e}");
    assert!(e.to_string().contains("10.96.0.1:80/TCP") && e.to_string().contains("max_backends"), "{e}");
    assert_eq!(dp.map_stats().unwrap(), stats, "nothing half-applied");
    assert_eq!(dp.maglev_table(&a.key).unwrap(), table_a, "a keeps its old table");

    // a table built for another Maglev size
    let wrong = svc("default/a", [10, 96, 0, 1], 80, Protocol::Tcp, &[[10, 244, 1, 5]], 1021);
    let e = dp.upsert(&wrong).unwrap_err();
    assert!(matches!(e, DatapathError::TableSize { got: 1021, want: 251, .. }), "{e}");
    // a table pointing past the backend list
    let mut bad = a.clone();
    bad.maglev[7] = 9;
    assert!(matches!(dp.upsert(&bad), Err(DatapathError::BadTable { slot: 7, index: 9, .. })));
    // a UDP backend behind a TCP frontend
    let mut mixed = a.clone();
    mixed.backends[0] = BackendAddr { protocol: Protocol::Udp, ..mixed.backends[0] };
    assert!(matches!(dp.upsert(&mixed), Err(DatapathError::ProtocolMismatch { .. })));
    // unknown protocol never gets this far
    assert!("SCTP".parse::<Protocol>().unwrap_err().to_string().contains("SCTP"));
    // deleting what is not there
    let k = ServiceKey { vip: Ipv4Addr::new(10, 96, 9, 9), port: 80, protocol: Protocol::Udp };
    assert!(matches!(dp.delete(&k), Err(DatapathError::NotFound { .. })));
    assert_eq!(dp.map_stats().unwrap(), stats);

    // batches are validated as a whole: one bad entry, nothing applied
    let c2 = svc("default/c", [10, 96, 0, 3], 80, Protocol::Tcp, &[[10, 244, 1, 5]], 251);
    let e = dp.upsert_many(&[a.clone(), c2.clone()]).unwrap_err();
    assert!(matches!(e, DatapathError::ServicesFull { .. }), "{e}");
    let e = dp.upsert_many(&[a.clone(), a.clone()]).unwrap_err();
    assert!(matches!(e, DatapathError::DuplicateInBatch { .. }), "{e}");
    assert!(e.to_string().contains("default/a"), "{e}");
    assert_eq!(dp.map_stats().unwrap(), stats);
    assert_eq!(dp.maglev_table(&a.key).unwrap(), table_a);

    // shrinking a to one backend releases the other; deleting b releases b's
    let a1 = svc("default/a", [10, 96, 0, 1], 80, Protocol::Tcp, &[[10, 244, 1, 5]], 251);
    dp.upsert(&a1).unwrap();
    dp.delete(&b.key).unwrap();
    dp.maintain().unwrap(); // b's table leaves after a grace period
    let s = dp.map_stats().unwrap();
    let n = |name: &str| s.iter().find(|m| m.name == name).unwrap().entries;
    assert_eq!((n("fjord_services"), n("fjord_backends"), n("fjord_maglev"), n("fjord_revnat")), (1, 1, 1, 1));
    // the freed slots are usable again
    dp.upsert(&c).unwrap();
    dp.upsert(&b).unwrap_err(); // services full again (a, c)
    drop(dp);

    // restarting with other sizes on the same pins is refused, naming the setting
    let e = Datapath::load(DatapathConfig { maglev_size: 1021, ..small(&pins) }).unwrap_err();
    assert!(matches!(e, DatapathError::PinnedMismatch { field: "maglev_size", pinned: 251, requested: 1021, .. }), "{e}");
    let e = Datapath::load(DatapathConfig { max_services: 3, ..small(&pins) }).unwrap_err();
    assert!(e.to_string().contains("max_services"), "{e}");
    // invalid config
    let e = Datapath::load(DatapathConfig { maglev_size: 1000, ..small(&pins) }).unwrap_err();
    assert!(matches!(e, DatapathError::Config { field: "maglev_size", .. }), "{e}");
    // same config: state recovered
    let dp = Datapath::load(small(&pins)).unwrap();
    assert_eq!(dp.services().len(), 2);
    dp.destroy().unwrap();
    assert!(!pins.0.exists());
}

/// Bench: time to program many services. Run with
/// `cargo test -p fjord-datapath --test maps -- --ignored --nocapture program_many`
/// (FJTDP_SERVICES, FJTDP_MAGLEV, FJTDP_BACKENDS override the defaults 10000, 1021, 3).
#[test]
#[ignore]
fn program_many_services() {
    let _l = kernel_lock();
    let env = |k: &str, d: u32| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (n, m, nb) = (env("FJTDP_SERVICES", 10000), env("FJTDP_MAGLEV", 1021), env("FJTDP_BACKENDS", 3));
    let pins = PinDir::new();
    let cfg = DatapathConfig { maglev_size: m, max_services: n, max_backends: n * nb, ct_entries: 1024, ..pins.config() };
    let mut dp = Datapath::load(cfg.clone()).expect("load");
    let make = |nb: u32| -> Vec<FrontendEntries> {
        (0..n)
            .map(|i| {
                let vip = [10, 96, (i >> 8) as u8, i as u8];
                let bs: Vec<[u8; 4]> = (0..nb).map(|j| [10, 244, (i % 250) as u8, (j + 2) as u8]).collect();
                svc("bench/s", vip, 80, Protocol::Tcp, &bs, m)
            })
            .collect()
    };
    let t = Instant::now();
    let entries = make(nb);
    let changed = make(nb - 1);
    let t_translate = t.elapsed() / 2;
    let per = |d: std::time::Duration, k: u32| d.as_micros() as f64 / k as f64;
    let t = Instant::now();
    dp.upsert_many(&entries).unwrap();
    let t_fresh = t.elapsed();
    let t = Instant::now();
    dp.upsert_many(&entries).unwrap();
    let t_same = t.elapsed();
    let t = Instant::now();
    dp.upsert_many(&changed).unwrap();
    let t_changed = t.elapsed();
    let k = n.min(200);
    let t = Instant::now();
    for e in &entries[..k as usize] {
        dp.upsert(e).unwrap();
    }
    let t_single = t.elapsed();
    // an agent restart: the pinned maps are adopted and the bookkeeping rebuilt from them
    let t = Instant::now();
    drop(dp);
    let dp = Datapath::load(cfg.clone()).expect("reload from pins");
    let t_reload = t.elapsed();
    assert_eq!(dp.services().len(), n as usize, "every frontend recovered");
    assert_eq!(dp.maglev_table(&changed[0].key).unwrap().len(), m as usize);
    println!("services={n} maglev={m} backends/service={nb}");
    println!("  reload from pins (recover)        {t_reload:?} ({:.1} µs/svc)", per(t_reload, n));
    println!("  translate (fjord-lb, Maglev)      {t_translate:?} ({:.1} µs/svc)", per(t_translate, n));
    println!("  upsert_many, fresh                {t_fresh:?} ({:.1} µs/svc)", per(t_fresh, n));
    println!("  upsert_many, unchanged (resync)   {t_same:?} ({:.1} µs/svc)", per(t_same, n));
    println!("  upsert_many, one backend removed  {t_changed:?} ({:.1} µs/svc)", per(t_changed, n));
    println!("  upsert one at a time, changed     {t_single:?} for {k} ({:.1} µs/svc)", per(t_single, k));
    println!("{:?}", dp.map_stats().unwrap());
    dp.destroy().unwrap();
}

#[test]
fn delete_many_removes_frontends_tables_and_unused_backends() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let mut dp = Datapath::load(DatapathConfig { maglev_size: 251, max_services: 8, max_backends: 16, ct_entries: 1024, table_pool: 0, ..pins.config() }).expect("load");
    let a = svc("default/a", [10, 96, 0, 1], 80, Protocol::Tcp, &[[10, 244, 1, 5], [10, 244, 1, 6]], 251);
    let b = svc("default/b", [10, 96, 0, 2], 80, Protocol::Tcp, &[[10, 244, 1, 6], [10, 244, 1, 7]], 251);
    let c = svc("default/c", [10, 96, 0, 3], 80, Protocol::Tcp, &[[10, 244, 1, 8]], 251);
    let empty = svc("default/d", [10, 96, 0, 4], 80, Protocol::Tcp, &[], 251);
    dp.upsert_many(&[a.clone(), b.clone(), c.clone(), empty.clone()]).unwrap();
    let unknown = ServiceKey { vip: Ipv4Addr::new(10, 96, 0, 9), port: 80, protocol: Protocol::Tcp };
    dp.delete_many(&[a.key, c.key, empty.key, unknown]).unwrap();
    assert_eq!(dp.pool_len(), (0, 2), "a's and c's tables wait for a grace period");
    assert_eq!(dp.maintain().unwrap(), (0, 2), "then leave in one batch");
    assert_eq!(dp.services(), vec![b.key]);
    let count = |dp: &Datapath, name: &str| dp.map_stats().unwrap().into_iter().find(|m| m.name == name).unwrap().entries;
    assert_eq!(count(&dp, "fjord_services"), 1);
    assert_eq!(count(&dp, "fjord_revnat"), 1);
    assert_eq!(count(&dp, "fjord_maglev"), 1, "only b's table is left");
    assert_eq!(count(&dp, "fjord_backends"), 2, "only b's backends are left");
    let mut got = dp.service_backends(&b.key).unwrap();
    got.sort();
    assert_eq!(got.len(), 2);
    // the freed ids are reusable
    dp.upsert_many(&[a, c]).unwrap();
    assert_eq!(count(&dp, "fjord_services"), 3);
    assert_eq!(count(&dp, "fjord_maglev"), 3);
}

/// The spare-table pool: a change is written into a clean spare and the service entry flips
/// to it (no map-in-map update on the change path); the old table is reused only after
/// `maintain` waited for a grace period. Prints the change latency with and without a spare.
#[test]
fn backend_changes_flip_to_spare_tables() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let mut dp = Datapath::load(DatapathConfig { maglev_size: 16381, max_services: 8, max_backends: 16, ct_entries: 1024, table_pool: 2, ..pins.config() }).expect("load");
    assert_eq!(dp.maintain().unwrap(), (2, 0), "the pool is filled");
    let gen = |n: u8| svc("default/a", [10, 96, 0, 1], 80, Protocol::Tcp, &(1..=n).map(|i| [10, 244, 1, i]).collect::<Vec<_>>(), 16381);
    dp.upsert(&gen(3)).unwrap(); // a new service takes a spare too
    assert_eq!(dp.pool_len(), (1, 0));
    let mut fast = vec![];
    for n in [4u8, 5, 3, 4] {
        let want = gen(n);
        let t = std::time::Instant::now();
        dp.upsert(&want).unwrap();
        fast.push(t.elapsed());
        let table = dp.maglev_table(&want.key).unwrap();
        let expect: Vec<_> = want.maglev.iter().map(|&i| want.backends[i as usize]).collect();
        assert_eq!(table, expect, "the flipped-to table holds the new slots");
        assert_eq!(dp.pool_len().1, 1, "the old table became a dirty spare");
        dp.maintain().unwrap();
        assert_eq!(dp.pool_len(), (2, 0), "clean again after a grace period");
    }
    // a burst: two changes take the two clean spares, the third finds only dirty ones and
    // replaces the table in place (a map-in-map update: waits for a grace period)
    let mut burst = vec![];
    for n in [5u8, 3, 4] {
        let t = std::time::Instant::now();
        dp.upsert(&gen(n)).unwrap();
        burst.push(t.elapsed());
        let want = gen(n);
        let expect: Vec<_> = want.maglev.iter().map(|&i| want.backends[i as usize]).collect();
        assert_eq!(dp.maglev_table(&want.key).unwrap(), expect);
    }
    assert_eq!(dp.pool_len(), (0, 2));
    dp.maintain().unwrap();
    let slow = burst[2];
    println!("backend change (M=16381) with a clean spare: {fast:?}; burst: {burst:?} (the third, in place: {slow:?})");
    assert_eq!(dp.counter(fjord_datapath::Stat::Error).unwrap(), 0);
}

/// A bulk install takes its new tables from the stash of blank tables made ahead (the
/// agent fills it on another thread during a cold start), the tables hold what was
/// written, and a stopped stash frees what is left and can be filled again.
#[test]
fn a_bulk_install_takes_blank_tables_from_the_stash() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let mut dp = Datapath::load(DatapathConfig { maglev_size: 251, max_services: 64, max_backends: 64, ct_entries: 1024, table_pool: 0, ..pins.config() }).expect("load");
    let stash = dp.table_stash();
    stash.prefill(40);
    assert_eq!(stash.len(), 40);
    let svcs: Vec<FrontendEntries> = (0..32u8)
        .map(|i| svc(&format!("default/s{i}"), [10, 96, 1, i], 80, Protocol::Tcp, &[[10, 244, 1, 5], [10, 244, 1, 6 + i % 3], [10, 244, 2, i]], 251))
        .collect();
    dp.upsert_many(&svcs).unwrap();
    assert_eq!(stash.len(), 8, "the 32 new tables came from the stash");
    for s in &svcs {
        let want: Vec<BackendAddr> = s.maglev.iter().map(|&x| s.backends[x as usize]).collect();
        assert_eq!(dp.maglev_table(&s.key).unwrap(), want, "{} holds its Maglev table", s.key);
    }
    stash.stop();
    assert!(stash.is_empty(), "stop frees the tables left");
    stash.prefill(3);
    assert_eq!(stash.len(), 3, "a stopped stash can be filled again");
    stash.stop();
    // an empty stash: new tables are created as before
    let more = svc("default/t", [10, 96, 2, 1], 80, Protocol::Tcp, &[[10, 244, 1, 5]], 251);
    dp.upsert_many(std::slice::from_ref(&more)).unwrap();
    assert_eq!(dp.maglev_table(&more.key).unwrap(), vec![more.backends[0]; 251]);
}

fn svc_port(name: &str, vip: [u8; 4], backends: &[([u8; 4], u16)], m: u32) -> FrontendEntries {
    let s = Service {
        name: name.into(),
        frontends: vec![Frontend {
            vip: Ipv4Addr::from(vip),
            port: 80,
            protocol: Protocol::Tcp,
            backends: backends.iter().map(|(b, p)| Backend::ready(Ipv4Addr::from(*b), *p)).collect(),
            options: Default::default(),
        }],
    };
    translate(&s, &LbConfig { maglev_size: m, full_tables: true, ..LbConfig::default() }).unwrap().remove(0)
}

/// `fjord_backend_ports` (the gate of the per-packet reply lookup) holds exactly the ports of
/// the backend entries: set with the first backend on a port, kept while another backend
/// uses it, cleared with the last; rebuilt from the maps by a reload.
#[test]
fn backend_ports_follow_the_backend_entries() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let cfg = DatapathConfig { maglev_size: 251, max_services: 8, max_backends: 16, ct_entries: 1024, table_pool: 0, ..pins.config() };
    let mut dp = Datapath::load(cfg.clone()).expect("load");
    assert_eq!(dp.backend_ports().unwrap(), Vec::<u16>::new());
    let a = svc_port("default/a", [10, 96, 0, 1], &[([10, 244, 1, 5], 8080), ([10, 244, 1, 6], 9090)], 251);
    let b = svc_port("default/b", [10, 96, 0, 2], &[([10, 244, 1, 7], 8080), ([10, 244, 1, 8], 53)], 251);
    dp.upsert_many(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(dp.backend_ports().unwrap(), vec![53, 8080, 9090]);
    let ports = dp.map_stats().unwrap().into_iter().find(|m| m.name == "fjord_backend_ports").expect("listed by status");
    assert_eq!((ports.entries, ports.max_entries), (3, 65536));
    dp.delete(&a.key).unwrap();
    assert_eq!(dp.backend_ports().unwrap(), vec![53, 8080], "8080 still used by b; 9090 gone with a");
    // b drops its port-53 backend
    let b2 = svc_port("default/b", [10, 96, 0, 2], &[([10, 244, 1, 7], 8080)], 251);
    dp.upsert_many(&[b2]).unwrap();
    assert_eq!(dp.backend_ports().unwrap(), vec![8080]);
    // a reload (agent restart) recomputes the bits from the backend entries
    drop(dp);
    let dp = Datapath::load(cfg).expect("reload");
    assert_eq!(dp.backend_ports().unwrap(), vec![8080]);
}

/// The service entry holds the frontend's active backends and their compact Maglev table
/// while they fit (FJ_SVC_INLINE = 8; any weights); otherwise it holds none and new flows use
/// the frontend's big table. Every change rewrites them: a terminating backend leaves the list
/// (no new flows) and a reload keeps the entries as they are.
#[test]
fn service_entries_hold_their_active_backends_and_compact_table() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let cfg = DatapathConfig { maglev_size: 251, max_services: 8, max_backends: 32, ct_entries: 1024, table_pool: 0, ..pins.config() };
    let mut dp = Datapath::load(cfg.clone()).expect("load");
    let addrs = |ips: &[u8]| -> Vec<BackendAddr> {
        ips.iter().map(|&i| BackendAddr { ip: Ipv4Addr::new(10, 244, 1, i), port: 8080, protocol: Protocol::Tcp }).collect()
    };
    // what the entry must hold for `fe`: its backends, and its compact table as addresses
    let held = |fe: &FrontendEntries| -> Option<(Vec<BackendAddr>, Vec<BackendAddr>)> {
        assert_eq!(fe.compact.len(), fjord_lb::COMPACT_TABLE_SIZE as usize);
        Some((fe.backends.clone(), fe.compact.iter().map(|&i| fe.backends[i as usize]).collect()))
    };
    let gen = |ips: &[u8]| svc("default/a", [10, 96, 0, 1], 80, Protocol::Tcp, &ips.iter().map(|&i| [10, 244, 1, i]).collect::<Vec<_>>(), 251);
    let a = gen(&[3, 1, 2]);
    dp.upsert(&a).unwrap();
    assert_eq!(a.backends, addrs(&[1, 2, 3]));
    assert_eq!(dp.inline_backends(&a.key).unwrap(), held(&a));
    // 9 backends: one more than fits
    let nine: Vec<u8> = (1..=9).collect();
    dp.upsert(&gen(&nine)).unwrap();
    assert_eq!(dp.inline_backends(&a.key).unwrap(), None);
    let table: std::collections::BTreeSet<_> = dp.maglev_table(&a.key).unwrap().into_iter().collect();
    assert_eq!(table.len(), 9, "the table has every backend");
    let eight = gen(&nine[..8]);
    dp.upsert(&eight).unwrap();
    assert_eq!(dp.inline_backends(&a.key).unwrap(), held(&eight));
    // a terminating (still serving) backend: in no list or table, its entry kept for its flows
    let mut s = Service {
        name: "default/a".into(),
        frontends: vec![Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            protocol: Protocol::Tcp,
            backends: [1u8, 2, 3].iter().map(|&i| Backend::ready(Ipv4Addr::new(10, 244, 1, i), 8080)).collect(),
            options: Default::default(),
        }],
    };
    s.frontends[0].backends[1].ready = false;
    s.frontends[0].backends[1].terminating = true;
    let draining = translate(&s, &LbConfig { maglev_size: 251, ..LbConfig::default() }).unwrap().remove(0);
    assert_eq!(draining.draining, addrs(&[2]));
    dp.upsert(&draining).unwrap();
    let (list, table) = dp.inline_backends(&a.key).unwrap().unwrap();
    assert_eq!(list, addrs(&[1, 3]));
    assert!(!table.contains(&addrs(&[2])[0]), "no new flow for the terminating backend");
    assert!(dp.service_backends(&a.key).unwrap().contains(&addrs(&[2])[0]), "the draining backend's entry stays");
    // unequal weights: the compact table has the shares too
    s.frontends[0].backends[1] = Backend::ready(Ipv4Addr::new(10, 244, 1, 2), 8080);
    s.frontends[0].backends[1].weight = Some(3);
    let weighted = translate(&s, &LbConfig { maglev_size: 251, ..LbConfig::default() }).unwrap().remove(0);
    dp.upsert(&weighted).unwrap();
    let (_, table) = dp.inline_backends(&a.key).unwrap().unwrap();
    let share = table.iter().filter(|b| **b == addrs(&[2])[0]).count() as f64 / table.len() as f64;
    assert!((share - 0.6).abs() < 0.01, "weight 3 of 5: {share}");
    // no backends
    dp.upsert(&gen(&[])).unwrap();
    assert_eq!(dp.inline_backends(&a.key).unwrap(), None);
    let two = gen(&[4, 5]);
    dp.upsert(&two).unwrap();
    // a reload (agent restart) finds the entry as it was, and the same state changes nothing
    drop(dp);
    let mut dp = Datapath::load(cfg).expect("reload");
    assert_eq!(dp.inline_backends(&a.key).unwrap(), held(&two));
    dp.upsert(&two).unwrap();
    assert_eq!(dp.inline_backends(&a.key).unwrap(), held(&two));
    let one = gen(&[5]);
    dp.upsert(&one).unwrap();
    assert_eq!(dp.inline_backends(&a.key).unwrap(), held(&one));
    assert_eq!(dp.counter(fjord_datapath::Stat::Error).unwrap(), 0);
}

#[test]
fn deleted_pod_addresses_mark_clear_and_clear_again() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let dp = Datapath::load(small(&pins)).expect("load");
    let gone = dp.gone_ips();
    let ip = Ipv4Addr::new(10, 244, 1, 9);
    // an address that was never marked (every new pod's address): clearing it is no error
    gone.clear(ip).expect("clear an unmarked address");
    gone.mark(ip).unwrap();
    assert!(gone.contains(ip));
    assert_eq!(gone.len().unwrap(), 1);
    gone.clear(ip).unwrap();
    assert!(!gone.contains(ip));
    gone.clear(ip).expect("clear twice");
    assert!(gone.is_empty());
}

/// A frontend with at most 8 backends and no sessionAffinity gets no big table (fjord-lb
/// builds none: its compact table, in the service entry, serves every new flow). Growing past
/// 8 backends or turning affinity on gives it one, shrinking back releases it; a reload
/// recovers the backends from the entry; deleting it frees everything.
#[test]
fn small_frontends_live_in_their_service_entry_alone() {
    let _l = kernel_lock();
    let pins = PinDir::new();
    let cfg = DatapathConfig { maglev_size: 251, max_services: 8, max_backends: 32, ct_entries: 1024, table_pool: 0, ..pins.config() };
    let mut dp = Datapath::load(cfg.clone()).expect("load");
    let lb = LbConfig { maglev_size: 251, ..LbConfig::default() };
    let web = |n: u8, affinity: bool| {
        let mut f = Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            protocol: Protocol::Tcp,
            backends: (1..=n).map(|i| Backend::ready(Ipv4Addr::new(10, 244, 1, i), 8080)).collect(),
            options: Default::default(),
        };
        if affinity {
            f.options.affinity_timeout = Some(60);
        }
        translate(&Service { name: "default/web".into(), frontends: vec![f] }, &lb).unwrap().remove(0)
    };
    let count = |dp: &Datapath, map: &str| dp.map_stats().unwrap().into_iter().find(|m| m.name == map).unwrap().entries;
    let three = web(3, false);
    assert!(three.maglev.is_empty() && !three.compact.is_empty());
    dp.upsert(&three).unwrap();
    assert_eq!((count(&dp, "fjord_maglev"), count(&dp, "fjord_backends")), (0, 3));
    assert!(dp.maglev_table(&three.key).unwrap().is_empty());
    assert_eq!(dp.inline_backends(&three.key).unwrap().unwrap().0, three.backends);
    // 9 backends: a big table; back to 3: released
    dp.upsert(&web(9, false)).unwrap();
    assert_eq!((count(&dp, "fjord_maglev"), count(&dp, "fjord_backends")), (1, 9));
    assert_eq!(dp.maglev_table(&three.key).unwrap().len(), 251);
    assert_eq!(dp.inline_backends(&three.key).unwrap(), None);
    dp.upsert(&three).unwrap();
    assert!(dp.maglev_table(&three.key).unwrap().is_empty());
    assert_eq!(dp.inline_backends(&three.key).unwrap().unwrap().0, three.backends);
    dp.maintain().unwrap(); // the released table leaves after a grace period (no pool here)
    assert_eq!((count(&dp, "fjord_maglev"), count(&dp, "fjord_backends")), (0, 3));
    // sessionAffinity: its misses read the big table
    let sticky = web(3, true);
    assert_eq!(sticky.maglev.len(), 251);
    dp.upsert(&sticky).unwrap();
    assert_eq!(count(&dp, "fjord_maglev"), 1);
    dp.upsert(&three).unwrap();
    dp.maintain().unwrap();
    assert_eq!(count(&dp, "fjord_maglev"), 0);
    // a reload finds the backends in the entry (none is collected as unused)
    drop(dp);
    let mut dp = Datapath::load(cfg.clone()).expect("reload");
    assert_eq!(count(&dp, "fjord_backends"), 3);
    assert_eq!(dp.service_backends(&three.key).unwrap(), three.backends);
    dp.upsert(&web(2, false)).unwrap();
    assert_eq!(count(&dp, "fjord_backends"), 2, "the third backend's entry went with it");
    // a compact table that does not fit its backends is refused, nothing changes
    let mut bad = web(2, false);
    bad.compact[7] = 2;
    assert!(matches!(dp.upsert(&bad), Err(DatapathError::BadTable { slot: 7, index: 2, .. })));
    let mut bad = web(2, false);
    bad.compact.pop();
    assert!(matches!(dp.upsert(&bad), Err(DatapathError::TableSize { got: 508, want: 509, .. })));
    let mut bad = web(2, true);
    bad.maglev.clear();
    assert!(matches!(dp.upsert(&bad), Err(DatapathError::TableSize { got: 0, want: 251, .. })), "affinity needs the big table");
    assert_eq!(count(&dp, "fjord_backends"), 2);
    // a terminating backend: only its entry in fjord_backends (no table, not in the service
    // entry) keeps its flows going; a reload keeps it until drop_unused_backends, which the
    // agent calls after its first full sync
    let mut f = Frontend::new(Ipv4Addr::new(10, 96, 0, 1), 80, Protocol::Tcp, (1..=2).map(|i| Backend::ready(Ipv4Addr::new(10, 244, 1, i), 8080)).collect());
    f.backends[1] = Backend { ready: false, serving: true, terminating: true, ..f.backends[1].clone() };
    let draining = translate(&Service { name: "default/web".into(), frontends: vec![f] }, &lb).unwrap().remove(0);
    assert_eq!(draining.draining.len(), 1);
    dp.upsert(&draining).unwrap();
    assert_eq!(count(&dp, "fjord_backends"), 2);
    drop(dp);
    let mut dp = Datapath::load(cfg.clone()).expect("reload");
    assert_eq!(count(&dp, "fjord_backends"), 2, "the draining backend's entry survives the reload");
    assert_eq!(dp.drop_unused_backends().unwrap(), 1, "no sync referenced it again: garbage");
    assert_eq!(count(&dp, "fjord_backends"), 1);
    assert_eq!(dp.drop_unused_backends().unwrap(), 0);
    dp.delete(&three.key).unwrap();
    assert_eq!((count(&dp, "fjord_services"), count(&dp, "fjord_backends"), count(&dp, "fjord_maglev")), (0, 0, 0));
    assert_eq!(dp.counter(fjord_datapath::Stat::Error).unwrap(), 0);
}
