//! Virtualization detection: bare metal, a VM (KVM & co, where eBPF works
//! fully) or a container (Docker, LXC, OpenVZ, ...), where the kernel is
//! shared and eBPF loading is often restricted. Gathering reads files;
//! [`classify`] is a pure function over the gathered [`VirtFacts`].

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Everything detection looks at. `None` = could not be read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VirtFacts {
    /// `hypervisor` flag in /proc/cpuinfo (set by every x86 hypervisor).
    pub cpuinfo_hypervisor: bool,
    /// /sys/class/dmi/id/sys_vendor
    pub dmi_sys_vendor: Option<String>,
    /// /sys/class/dmi/id/product_name
    pub dmi_product_name: Option<String>,
    /// `container=` from /proc/1/environ (set by systemd-nspawn, LXC, podman).
    pub pid1_container_env: Option<String>,
    /// /.dockerenv exists
    pub dockerenv: bool,
    /// /run/.containerenv exists (podman)
    pub containerenv: bool,
    /// /proc/vz exists (OpenVZ/Virtuozzo kernel)
    pub proc_vz: bool,
    /// /proc/bc exists (only on the OpenVZ host, not in its containers)
    pub proc_bc: bool,
    /// /proc/1/cgroup text (cgroup v1 paths often name docker/lxc/kubepods)
    pub pid1_cgroup: Option<String>,
    /// output of `systemd-detect-virt` if installed
    pub systemd_detect_virt: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtKind {
    BareMetal,
    Vm,
    Container,
    Unknown,
}

/// The detection result with the evidence used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Virtualization {
    pub kind: VirtKind,
    /// e.g. `kvm`, `docker`, `lxc`, `openvz`
    pub technology: Option<String>,
    /// The VM under a container, when both are visible (e.g. docker inside a KVM guest).
    pub host_vm: Option<String>,
    pub evidence: Vec<String>,
}

const CONTAINER_WORDS: &[&str] =
    &["docker", "lxc", "lxc-libvirt", "openvz", "podman", "systemd-nspawn", "rkt", "wsl", "proot", "container-other", "pouch"];

fn vm_from_dmi(vendor: &str, product: &str) -> Option<&'static str> {
    let v = format!("{vendor} {product}").to_ascii_lowercase();
    let table: &[(&str, &str)] = &[
        ("kvm", "kvm"),
        ("qemu", "qemu"),
        ("vmware", "vmware"),
        ("virtualbox", "oracle"),
        ("innotek", "oracle"),
        ("xen", "xen"),
        ("amazon ec2", "amazon"),
        ("google compute engine", "google"),
        ("microsoft corporation virtual machine", "microsoft"),
        ("bochs", "bochs"),
        ("parallels", "parallels"),
        ("bhyve", "bhyve"),
        ("firecracker", "firecracker"),
        ("cloud hypervisor", "cloud-hypervisor"),
    ];
    table.iter().find(|(needle, _)| v.contains(needle)).map(|(_, name)| *name)
}

/// Pure classification. Container evidence wins over VM evidence: a
/// container inside a VM still shares the VM's kernel with its host, and
/// that is what limits eBPF.
pub fn classify(f: &VirtFacts) -> Virtualization {
    let mut evidence = Vec::new();
    let mut container: Option<String> = None;
    let mut vm: Option<String> = None;

    if let Some(sdv) = f.systemd_detect_virt.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        evidence.push(format!("systemd-detect-virt: {sdv}"));
        if CONTAINER_WORDS.contains(&sdv) {
            container = Some(sdv.to_string());
        } else if sdv != "none" {
            vm = Some(sdv.to_string());
        }
    }
    if f.proc_vz && !f.proc_bc {
        evidence.push("/proc/vz present without /proc/bc (inside an OpenVZ container)".into());
        container.get_or_insert_with(|| "openvz".into());
    }
    if let Some(c) = f.pid1_container_env.as_deref().filter(|s| !s.is_empty()) {
        evidence.push(format!("pid 1 environment container={c}"));
        container.get_or_insert_with(|| c.to_string());
    }
    if f.dockerenv {
        evidence.push("/.dockerenv exists".into());
        container.get_or_insert_with(|| "docker".into());
    }
    if f.containerenv {
        evidence.push("/run/.containerenv exists".into());
        container.get_or_insert_with(|| "podman".into());
    }
    if let Some(cg) = &f.pid1_cgroup {
        for (needle, name) in [("/docker", "docker"), ("/lxc", "lxc"), ("/kubepods", "kubernetes-pod"), ("/libpod", "podman")] {
            if cg.lines().any(|l| l.contains(needle)) {
                evidence.push(format!("/proc/1/cgroup mentions {needle}"));
                container.get_or_insert_with(|| name.into());
                break;
            }
        }
    }
    if let Some(t) = vm_from_dmi(f.dmi_sys_vendor.as_deref().unwrap_or(""), f.dmi_product_name.as_deref().unwrap_or("")) {
        evidence.push(format!(
            "DMI: {} {}",
            f.dmi_sys_vendor.as_deref().unwrap_or(""),
            f.dmi_product_name.as_deref().unwrap_or("")
        ));
        vm.get_or_insert_with(|| t.into());
    }
    if f.cpuinfo_hypervisor {
        evidence.push("/proc/cpuinfo has the hypervisor flag".into());
        vm.get_or_insert_with(|| "vm".into());
    }

    if let Some(c) = container {
        return Virtualization { kind: VirtKind::Container, technology: Some(c), host_vm: vm, evidence };
    }
    if let Some(v) = vm {
        return Virtualization { kind: VirtKind::Vm, technology: Some(v), host_vm: None, evidence };
    }
    let saw_something = f.systemd_detect_virt.is_some() || f.dmi_sys_vendor.is_some() || f.dmi_product_name.is_some();
    if saw_something {
        evidence.push("no hypervisor or container signs".into());
        Virtualization { kind: VirtKind::BareMetal, technology: None, host_vm: None, evidence }
    } else {
        // No DMI (e.g. microVMs, ARM boards) and no detector: do not claim bare metal.
        evidence.push("no DMI data and no systemd-detect-virt; no hypervisor flag or container signs".into());
        Virtualization { kind: VirtKind::Unknown, technology: None, host_vm: None, evidence }
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Reads the facts from the running system (under `root`, normally `/`).
pub fn gather(root: &Path) -> VirtFacts {
    let p = |rel: &str| root.join(rel.trim_start_matches('/'));
    let cpuinfo = std::fs::read_to_string(p("/proc/cpuinfo")).unwrap_or_default();
    let cpuinfo_hypervisor =
        cpuinfo.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|w| w == "hypervisor"));
    let pid1_container_env = std::fs::read(p("/proc/1/environ")).ok().and_then(|env| {
        env.split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("container=").map(str::to_string))
    });
    let systemd_detect_virt = if root == Path::new("/") {
        std::process::Command::new("systemd-detect-virt")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    } else {
        None
    };
    VirtFacts {
        cpuinfo_hypervisor,
        dmi_sys_vendor: read_trim(&p("/sys/class/dmi/id/sys_vendor")),
        dmi_product_name: read_trim(&p("/sys/class/dmi/id/product_name")),
        pid1_container_env,
        dockerenv: p("/.dockerenv").exists(),
        containerenv: p("/run/.containerenv").exists(),
        proc_vz: p("/proc/vz").exists(),
        proc_bc: p("/proc/bc").exists(),
        pid1_cgroup: std::fs::read_to_string(p("/proc/1/cgroup")).ok(),
        systemd_detect_virt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_guest() {
        let f = VirtFacts {
            cpuinfo_hypervisor: true,
            dmi_sys_vendor: Some("QEMU".into()),
            dmi_product_name: Some("Standard PC (Q35 + ICH9, 2009)".into()),
            pid1_cgroup: Some("0::/init.scope\n".into()),
            ..Default::default()
        };
        let v = classify(&f);
        assert_eq!(v.kind, VirtKind::Vm);
        assert_eq!(v.technology.as_deref(), Some("qemu"));
        let f = VirtFacts { systemd_detect_virt: Some("kvm".into()), ..f };
        assert_eq!(classify(&f).technology.as_deref(), Some("kvm"));
    }

    #[test]
    fn bare_metal() {
        let f = VirtFacts {
            dmi_sys_vendor: Some("Dell Inc.".into()),
            dmi_product_name: Some("PowerEdge R640".into()),
            systemd_detect_virt: Some("none".into()),
            ..Default::default()
        };
        assert_eq!(classify(&f).kind, VirtKind::BareMetal);
    }

    #[test]
    fn unknown_without_any_source() {
        assert_eq!(classify(&VirtFacts::default()).kind, VirtKind::Unknown);
    }

    #[test]
    fn hypervisor_flag_alone_is_a_vm() {
        let f = VirtFacts { cpuinfo_hypervisor: true, ..Default::default() };
        let v = classify(&f);
        assert_eq!(v.kind, VirtKind::Vm);
    }

    #[test]
    fn docker_in_a_vm_is_a_container() {
        // This machine: a Firecracker microVM (no DMI) running a docker container.
        let f = VirtFacts {
            cpuinfo_hypervisor: true,
            dockerenv: true,
            systemd_detect_virt: Some("docker".into()),
            ..Default::default()
        };
        let v = classify(&f);
        assert_eq!(v.kind, VirtKind::Container);
        assert_eq!(v.technology.as_deref(), Some("docker"));
        assert_eq!(v.host_vm.as_deref(), Some("vm"));
    }

    #[test]
    fn openvz_container() {
        let f = VirtFacts { proc_vz: true, proc_bc: false, ..Default::default() };
        assert_eq!(classify(&f).technology.as_deref(), Some("openvz"));
        // the OpenVZ host itself has /proc/bc too
        let host = VirtFacts { proc_vz: true, proc_bc: true, dmi_sys_vendor: Some("Supermicro".into()), ..Default::default() };
        assert_eq!(classify(&host).kind, VirtKind::BareMetal);
    }

    #[test]
    fn lxc_via_pid1_env_and_cgroup() {
        let f = VirtFacts { pid1_container_env: Some("lxc".into()), ..Default::default() };
        assert_eq!(classify(&f).technology.as_deref(), Some("lxc"));
        let f = VirtFacts { pid1_cgroup: Some("12:pids:/lxc/web01\n".into()), ..Default::default() };
        assert_eq!(classify(&f).technology.as_deref(), Some("lxc"));
        let f = VirtFacts { pid1_cgroup: Some("0::/kubepods/besteffort/pod1/abc\n".into()), ..Default::default() };
        assert_eq!(classify(&f).technology.as_deref(), Some("kubernetes-pod"));
    }

    #[test]
    fn podman_and_systemd_detect_virt_containers() {
        let f = VirtFacts { containerenv: true, ..Default::default() };
        assert_eq!(classify(&f).technology.as_deref(), Some("podman"));
        let f = VirtFacts { systemd_detect_virt: Some("systemd-nspawn".into()), cpuinfo_hypervisor: true, ..Default::default() };
        assert_eq!(classify(&f).kind, VirtKind::Container);
    }

    #[test]
    fn gather_from_a_fake_root() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("proc/1")).unwrap();
        std::fs::create_dir_all(r.join("sys/class/dmi/id")).unwrap();
        std::fs::write(r.join("proc/cpuinfo"), "processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n").unwrap();
        std::fs::write(r.join("proc/1/environ"), b"PATH=/bin\0container=lxc\0HOME=/\0").unwrap();
        std::fs::write(r.join("sys/class/dmi/id/sys_vendor"), "QEMU\n").unwrap();
        let f = gather(r);
        assert!(f.cpuinfo_hypervisor);
        assert_eq!(f.pid1_container_env.as_deref(), Some("lxc"));
        assert_eq!(f.dmi_sys_vendor.as_deref(), Some("QEMU"));
        assert!(!f.dockerenv && f.systemd_detect_virt.is_none());
        let v = classify(&f);
        assert_eq!((v.kind, v.technology.as_deref(), v.host_vm.as_deref()), (VirtKind::Container, Some("lxc"), Some("qemu")));
    }
}
