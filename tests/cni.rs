//! The CNI plugin binary driven like a runtime drives it: env + stdin, spec result/error JSON.
use fjord_e2e::*;
use fjord_net::netns;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Cni {
    bin: PathBuf,
    socket: PathBuf,
}

impl Cni {
    fn conf(&self) -> Value {
        json!({"cniVersion": "1.1.0", "name": "fjord", "type": "fjord-cni", "agentSocket": self.socket})
    }
    /// Run the plugin: (exit code, parsed stdout or Null).
    fn run(&self, env: &[(&str, &str)], stdin: &[u8]) -> (i32, Value) {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear().stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin); // VERSION does not read stdin
        let out = child.wait_with_output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let v = if s.trim().is_empty() { Value::Null } else { serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("stdout not JSON ({e}): {s:?}")) };
        (out.status.code().unwrap(), v)
    }
    fn cmd(&self, command: &str, cid: &str, ns: &Path, conf: &Value) -> (i32, Value) {
        let ns = ns.display().to_string();
        self.run(
            &[("CNI_COMMAND", command), ("CNI_CONTAINERID", cid), ("CNI_NETNS", &ns), ("CNI_IFNAME", "eth0"), ("CNI_PATH", "/opt/cni/bin"), ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=cni-test")],
            &serde_json::to_vec(conf).unwrap(),
        )
    }
}

fn assert_error(r: &(i32, Value), code: u64, word: &str) {
    assert_eq!(r.0, 1, "expected failure exit: {:?}", r.1);
    assert_eq!(r.1["code"], code, "{:?}", r.1);
    let text = format!("{} {}", r.1["msg"].as_str().unwrap_or(""), r.1["details"].as_str().unwrap_or(""));
    assert!(text.contains(word), "error {:?} should mention {word:?}", r.1);
    assert_eq!(r.1["cniVersion"], "1.1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_check_del_del_version_status_gc_through_the_real_binary() {
    let c = TestCluster::up().await;
    let node = c.node().clone();
    let cni = Cni { bin: node.cni_bin_dir.join("fjord-cni"), socket: node.api_socket.clone() };
    let conf = cni.conf();
    // A sandbox namespace under the cluster's prefix (cluster down removes it too).
    let ns_name = format!("{}pod.cni.t1", fjordctl::context::ClusterState::netns_prefix(&c.state.name));
    let ns = netns::create(&ns_name).unwrap();

    // VERSION
    let v = cni.run(&[("CNI_COMMAND", "VERSION")], b"{}");
    assert_eq!(v.0, 0);
    assert_eq!(v.1["cniVersion"], "1.1.0");
    assert!(v.1["supportedVersions"].as_array().unwrap().contains(&json!("1.0.0")));

    // STATUS with the agent up
    let s = cni.run(&[("CNI_COMMAND", "STATUS")], &serde_json::to_vec(&conf).unwrap());
    assert_eq!(s.0, 0, "{:?}", s.1);

    // ADD: spec result
    let add = cni.cmd("ADD", "cid-1", &ns, &conf);
    assert_eq!(add.0, 0, "{:?}", add.1);
    let r = &add.1;
    assert_eq!(r["cniVersion"], "1.1.0");
    let ifs = r["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 2);
    assert!(ifs[0]["name"].as_str().unwrap().starts_with("fj") && ifs[0].get("sandbox").is_none());
    assert_eq!(ifs[1]["name"], "eth0");
    assert_eq!(ifs[1]["sandbox"], ns.display().to_string());
    assert_eq!(ifs[1]["mac"].as_str().unwrap().len(), 17);
    let ip = r["ips"][0]["address"].as_str().unwrap();
    assert!(ip.starts_with("10.244.1.") && ip.ends_with("/32"), "{ip}");
    assert_eq!(r["ips"][0]["interface"], 1);
    assert_eq!(r["ips"][0]["gateway"], "10.244.1.1");
    assert!(r["ips"][0].get("version").is_none());
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    // The address really is on eth0 in the sandbox.
    let (code, out) = run_in_ns(&ns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert_eq!(code, 0);
    assert!(out.contains(ip), "{out}");

    // 0.4.0 result format for an older runtime (a retried ADD answers the same attachment).
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.4.0");
    let again = cni.cmd("ADD", "cid-1", &ns, &old);
    assert_eq!(again.0, 0, "{:?}", again.1);
    assert_eq!(again.1["cniVersion"], "0.4.0");
    assert_eq!(again.1["ips"][0]["version"], "4");
    assert_eq!(again.1["ips"][0]["address"], ip);

    // CHECK passes, then fails once we break the pod's routes behind fjord's back.
    let mut chk = conf.clone();
    chk["prevResult"] = add.1.clone();
    assert_eq!(cni.cmd("CHECK", "cid-1", &ns, &chk).0, 0);
    let (code, out) = run_in_ns(&ns, &["ip", "route", "del", "default"]);
    assert_eq!(code, 0, "{out}");
    let broken = cni.cmd("CHECK", "cid-1", &ns, &chk);
    assert_error(&broken, 101, "default route");
    // CHECK of an unknown container: code 3.
    assert_error(&cni.cmd("CHECK", "cid-unknown", &ns, &chk), 3, "cid-unknown");

    // GC: cid-1 is not in the valid list → removed.
    let ns2 = netns::create(&format!("{ns_name}2")).unwrap();
    assert_eq!(cni.cmd("ADD", "cid-keep", &ns2, &conf).0, 0);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "cid-keep", "ifname": "eth0"}]);
    let g = cni.run(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")], &serde_json::to_vec(&gc).unwrap());
    assert_eq!(g.0, 0, "{:?}", g.1);
    let atts = c.client().attachments().await.unwrap();
    assert_eq!(atts.iter().map(|a| a.container_id.as_str()).collect::<Vec<_>>(), vec!["cid-keep"]);

    // DEL is idempotent: twice, and with the namespace gone.
    assert_eq!(cni.cmd("DEL", "cid-keep", &ns2, &conf).0, 0);
    assert_eq!(cni.cmd("DEL", "cid-keep", &ns2, &conf).0, 0);
    netns::delete(&format!("{ns_name}2")).unwrap();
    assert_eq!(cni.cmd("DEL", "cid-keep", &ns2, &conf).0, 0);
    assert_eq!(cni.run(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "never-seen"), ("CNI_IFNAME", "eth0")], &serde_json::to_vec(&conf).unwrap()).0, 0);
    assert!(c.client().attachments().await.unwrap().is_empty());
    assert_eq!(c.client().status().await.unwrap().ipam.allocated, 0);

    // Bad environment: code 4, naming the variable.
    assert_error(&cni.run(&[], &serde_json::to_vec(&conf).unwrap()), 4, "CNI_COMMAND");
    assert_error(&cni.run(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x"), ("CNI_IFNAME", "eth0")], &serde_json::to_vec(&conf).unwrap()), 4, "CNI_NETNS");
    assert_error(&cni.cmd("ADD", "x", Path::new("/run/netns/fjord-no-such-ns"), &conf), 4, "does not exist");
    // Undecodable config: 6. Invalid config: 7. Unsupported version: 1.
    let envs = [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x"), ("CNI_NETNS", "/run/netns/x"), ("CNI_IFNAME", "eth0")];
    assert_error(&cni.run(&envs, b"{not json"), 6, "decode");
    assert_error(&cni.run(&envs, br#"{"cniVersion":"1.1.0","name":"fjord","type":"fjord-cni","agentSockett":"/x"}"#), 7, "agentSockett");
    assert_error(&cni.run(&envs, br#"{"cniVersion":"9.9.9","name":"fjord","type":"fjord-cni"}"#), 1, "9.9.9");

    // Agent not reachable: ADD → 11 (try again later), STATUS → 50.
    let down = Cni { bin: cni.bin.clone(), socket: PathBuf::from("/run/fjord-e2e-no-agent.sock") };
    assert_error(&down.cmd("ADD", "cid-2", &ns, &down.conf()), 11, "not reachable");
    assert_error(&down.run(&[("CNI_COMMAND", "STATUS")], &serde_json::to_vec(&down.conf()).unwrap()), 50, "not reachable");
    // Nothing was half-applied by any failure.
    assert!(c.client().attachments().await.unwrap().is_empty());
    assert_eq!(links_in(&ns).await, vec!["lo".to_string()]);
}

/// An agent of our own with a tiny PodCIDR, in a namespace this test creates.
struct OwnAgent {
    ns: String,
    child: std::process::Child,
    _tmp: tempfile::TempDir,
    socket: PathBuf,
}

impl Drop for OwnAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for n in netns::list(&self.ns) {
            let _ = netns::delete(&n);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pod_cidr_is_a_clear_cni_error_not_a_hang() {
    let _lock = kernel_lock();
    let tmp = tempfile::Builder::new().prefix("fj").tempdir_in("/tmp").unwrap();
    let ns = format!("fjord-e2e-ipam{}", std::process::id());
    let node_ns = netns::create(&ns).unwrap();
    let socket = tmp.path().join("a.sock");
    let mut cmd = Command::new(bin_dir().join("fjord-agent"));
    cmd.args(["--node", "tiny", "--pod-cidr", "10.244.7.0/29", "--metrics-addr", "none", "--datapath", "off"])
        .arg("--store")
        .arg(format!("embedded:{}", tmp.path().join("s.redb").display()))
        .arg("--api-socket")
        .arg(&socket)
        .stderr(Stdio::null())
        .stdout(Stdio::null());
    netns::command_in(&mut cmd, &node_ns).unwrap();
    let agent = OwnAgent { ns: ns.clone(), child: cmd.spawn().unwrap(), _tmp: tmp, socket: socket.clone() };
    let client = fjord_api::AgentClient::new(&agent.socket);
    assert!(eventually(std::time::Duration::from_secs(20), || async { client.healthz().await.ok() }).await.is_some(), "agent did not start");
    let cni = Cni { bin: bin_dir().join("fjord-cni"), socket };
    // /29: 8 addresses - network - broadcast - gateway = 5 pods.
    let mut ips = std::collections::BTreeSet::new();
    for i in 0..5 {
        let p = netns::create(&format!("{ns}.p{i}")).unwrap();
        let r = cni.cmd("ADD", &format!("c{i}"), &p, &cni.conf());
        assert_eq!(r.0, 0, "{:?}", r.1);
        assert!(ips.insert(r.1["ips"][0]["address"].as_str().unwrap().to_string()));
    }
    assert!(!ips.contains("10.244.7.1/32") && !ips.contains("10.244.7.0/32") && !ips.contains("10.244.7.7/32"));
    let p = netns::create(&format!("{ns}.p5")).unwrap();
    let r = cni.cmd("ADD", "c5", &p, &cni.conf());
    assert_error(&r, 100, "10.244.7.0/29");
    // STATUS says the plugin cannot serve ADD now.
    assert_error(&cni.run(&[("CNI_COMMAND", "STATUS")], &serde_json::to_vec(&cni.conf()).unwrap()), 50, "no free pod address");
    // Nothing half-applied for the refused pod.
    assert_eq!(links_in(&p).await, vec!["lo".to_string()]);
    // Releasing one makes room again.
    assert_eq!(cni.cmd("DEL", "c2", &netns::path(&format!("{ns}.p2")), &cni.conf()).0, 0);
    let r = cni.cmd("ADD", "c5", &p, &cni.conf());
    assert_eq!(r.0, 0, "{:?}", r.1);
    drop(agent);
}
