//! CNI specification 1.1.0 types: the plugin's network configuration (stdin),
//! the `CNI_*` environment, the success result and the error result.
//!
//! Everything here is pure: parsing and validation take strings and maps and
//! return typed values or a [`CniError`] carrying the spec's error code.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The plugin `type` fjord answers to.
pub const PLUGIN_TYPE: &str = "fjord-cni";
/// Versions this plugin can read configuration for and emit results in.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// The version this plugin implements.
pub const SPEC_VERSION: &str = "1.1.0";
/// Default path of the node agent's API socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/fjord/agent.sock";

/// Error codes from the CNI spec ("Error" section) plus fjord's own (>= 100).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// fjord: the node's PodCIDR has no free address.
    pub const IPAM_EXHAUSTED: u32 = 100;
    /// fjord: CHECK found the attachment different from what was set up.
    pub const CHECK_FAILED: u32 = 101;
    /// fjord: the agent failed to plumb the interface.
    pub const PLUMBING_FAILED: u32 = 102;
    /// fjord: ADD for an attachment that already exists with other parameters.
    pub const ALREADY_EXISTS: u32 = 103;
}

/// A CNI error result, printed on stdout with a non-zero exit status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    #[serde(default = "default_version")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

fn default_version() -> String {
    SPEC_VERSION.to_string()
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { cni_version: SPEC_VERSION.into(), code, msg: msg.into(), details: String::new() }
    }
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

/// One `{containerID, ifname}` pair from `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRef {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's network configuration as a runtime passes it on stdin: the
/// conflist's plugin object with `name` and `cniVersion` injected, plus the
/// spec's runtime-provided keys. Unknown keys are refused (error 7) so a typo
/// such as `agentSockett` does not silently fall back to a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_versions: Option<Vec<String>>,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// fjord: path of the node agent's unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_socket: Option<String>,
    /// fjord: MTU of the pod interface (576..=9000). Default 1500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    // ---- keys defined by the spec for any plugin ----
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_masq: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "disableCheck")]
    pub disable_check: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "disableGC")]
    pub disable_gc: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<AttachmentRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "cni.dev/attachments")]
    pub attachments: Option<Vec<AttachmentRef>>,
}

impl NetConf {
    /// Parse and validate stdin. JSON that does not decode is error 6; JSON that
    /// decodes but is not a valid fjord config is error 7 (unsupported version: 1).
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE_FAILURE, "cannot decode network configuration from stdin")
                .details(format!("{e} (stdin must be one JSON object: the plugin's entry of the conflist)"))
        })?;
        if !value.is_object() {
            return Err(CniError::new(code::DECODE_FAILURE, "network configuration on stdin is not a JSON object"));
        }
        for field in ["cniVersion", "name", "type"] {
            match value.get(field) {
                None => {
                    return Err(CniError::new(code::INVALID_CONFIG, format!("network configuration: field `{field}` is missing")))
                }
                Some(v) if !v.is_string() => {
                    return Err(CniError::new(code::INVALID_CONFIG, format!("network configuration: field `{field}` must be a string")))
                }
                _ => {}
            }
        }
        let conf: NetConf = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { format!(" field `{path}`:") };
            CniError::new(code::INVALID_CONFIG, format!("invalid network configuration:{field} {}", e.into_inner()))
        })?;
        conf.validate()?;
        Ok(conf)
    }

    pub fn validate(&self) -> Result<(), CniError> {
        if !SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {:?} is not supported by fjord-cni", self.cni_version),
            )
            .details(format!("supported versions: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        if self.plugin_type != PLUGIN_TYPE {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network configuration field `type` is {:?}, expected {PLUGIN_TYPE:?}", self.plugin_type),
            ));
        }
        if !valid_network_name(&self.name) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network configuration field `name` {:?} is invalid", self.name),
            )
            .details("a network name must be non-empty and use only letters, digits, '_', '.' and '-'"));
        }
        if let Some(mtu) = self.mtu {
            if !(576..=9000).contains(&mtu) {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("network configuration field `mtu` is {mtu}, expected 576..=9000"),
                ));
            }
        }
        if let Some(sock) = &self.agent_socket {
            if !sock.starts_with('/') {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    format!("network configuration field `agentSocket` {sock:?} must be an absolute path"),
                ));
            }
        }
        Ok(())
    }

    pub fn agent_socket(&self) -> &str {
        self.agent_socket.as_deref().unwrap_or(DEFAULT_AGENT_SOCKET)
    }
}

fn valid_network_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The operation a runtime asked for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }
}

/// The validated `CNI_*` environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: BTreeMap<String, String>,
    pub path: Option<String>,
}

fn env_err(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_ENV, msg)
}

impl Env {
    /// Parse from a variable lookup (so tests need not touch the process env).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command_s = get("CNI_COMMAND").filter(|s| !s.is_empty()).ok_or_else(|| {
            env_err("CNI_COMMAND is not set").details("set CNI_COMMAND to one of ADD, DEL, CHECK, STATUS, GC, VERSION")
        })?;
        let command = Command::parse(&command_s).ok_or_else(|| {
            env_err(format!("CNI_COMMAND {command_s:?} is not a CNI command"))
                .details("expected one of ADD, DEL, CHECK, STATUS, GC, VERSION")
        })?;
        let nonempty = |k: &str| get(k).filter(|s| !s.is_empty());
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = nonempty("CNI_CONTAINERID");
        let ifname = nonempty("CNI_IFNAME");
        let netns = nonempty("CNI_NETNS");
        if needs_attachment {
            let cid = container_id.as_deref().ok_or_else(|| env_err(format!("CNI_CONTAINERID is required for {command_s}")))?;
            validate_container_id(cid)?;
            let ifn = ifname.as_deref().ok_or_else(|| env_err(format!("CNI_IFNAME is required for {command_s}")))?;
            validate_ifname(ifn)?;
        }
        if matches!(command, Command::Add | Command::Check) {
            let ns = netns.as_deref().ok_or_else(|| env_err(format!("CNI_NETNS is required for {command_s}")))?;
            if !ns.starts_with('/') {
                return Err(env_err(format!("CNI_NETNS {ns:?} must be an absolute path to a network namespace")));
            }
        }
        let args = match nonempty("CNI_ARGS") {
            Some(a) => parse_cni_args(&a)?,
            None => BTreeMap::new(),
        };
        Ok(Env { command, container_id, netns, ifname, args, path: nonempty("CNI_PATH") })
    }
}

/// Container IDs per the spec: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn validate_container_id(cid: &str) -> Result<(), CniError> {
    let mut chars = cid.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(env_err(format!("CNI_CONTAINERID {cid:?} is invalid"))
            .details("must start with a letter or digit and contain only letters, digits, '_', '.', '-'"));
    }
    Ok(())
}

/// Interface names per the spec: at most 15 bytes, not `.`/`..`, no `/`, `:` or white space.
pub fn validate_ifname(ifname: &str) -> Result<(), CniError> {
    let bad = ifname.is_empty()
        || ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(env_err(format!("CNI_IFNAME {ifname:?} is not a valid interface name"))
            .details("1 to 15 bytes, not '.' or '..', without '/', ':' or white space"));
    }
    Ok(())
}

/// `CNI_ARGS`: `K1=V1;K2=V2`.
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for part in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            env_err(format!("CNI_ARGS entry {part:?} is not KEY=VALUE")).details("CNI_ARGS is a ';'-separated list of KEY=VALUE")
        })?;
        if k.is_empty() {
            return Err(env_err(format!("CNI_ARGS entry {part:?} has an empty key")));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Result interface entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// Result IP entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only emitted for 0.x results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

/// The success result of ADD (and the shape of `prevResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Convert to the result format of `version` (0.4.0 adds `"version": "4"` to IPs).
    pub fn for_version(mut self, version: &str) -> CniResult {
        self.cni_version = version.to_string();
        let legacy = version.starts_with("0.");
        for ip in &mut self.ips {
            ip.version = if legacy { Some("4".into()) } else { None };
        }
        self
    }
}

/// The VERSION command's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

impl VersionInfo {
    pub fn current() -> VersionInfo {
        VersionInfo {
            cni_version: SPEC_VERSION.into(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    const GOOD: &str = r#"{"cniVersion":"1.1.0","name":"fjord","type":"fjord-cni","agentSocket":"/run/x.sock"}"#;

    #[test]
    fn parses_good_config() {
        let c = NetConf::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(c.agent_socket(), "/run/x.sock");
        assert_eq!(c.name, "fjord");
    }

    #[test]
    fn runtime_keys_are_accepted() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"fjord","type":"fjord-cni","runtimeConfig":{"portMappings":[]},
                "prevResult":{"cniVersion":"1.1.0","interfaces":[],"ips":[]},
                "cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.valid_attachments.as_ref().unwrap()[0].container_id, "abc");
        assert_eq!(c.agent_socket(), DEFAULT_AGENT_SOCKET);
    }

    #[test]
    fn undecodable_is_6() {
        for bad in [&b"{"[..], b"", b"not json", b"[1,2]", b"\"str\""] {
            assert_eq!(NetConf::parse(bad).unwrap_err().code, code::DECODE_FAILURE, "{bad:?}");
        }
    }

    #[test]
    fn invalid_config_is_7_and_names_field() {
        let cases = [
            (r#"{"cniVersion":"1.1.0","name":"fjord","type":"bridge"}"#, "`type`"),
            (r#"{"cniVersion":"1.1.0","name":"fj ord","type":"fjord-cni"}"#, "`name`"),
            (r#"{"cniVersion":"1.1.0","name":"","type":"fjord-cni"}"#, "`name`"),
            (r#"{"cniVersion":"1.1.0","type":"fjord-cni"}"#, "`name`"),
            (r#"{"name":"fjord","type":"fjord-cni"}"#, "`cniVersion`"),
            (r#"{"cniVersion":"1.1.0","name":"fjord"}"#, "`type`"),
            (r#"{"cniVersion":1,"name":"fjord","type":"fjord-cni"}"#, "`cniVersion`"),
            (r#"{"cniVersion":"1.1.0","name":"fjord","type":"fjord-cni","agentSockett":"/x"}"#, "agentSockett"),
            (r#"{"cniVersion":"1.1.0","name":"fjord","type":"fjord-cni","mtu":70000}"#, "`mtu`"),
            (r#"{"cniVersion":"1.1.0","name":"fjord","type":"fjord-cni","mtu":"big"}"#, "mtu"),
            (r#"{"cniVersion":"1.1.0","name":"fjord","type":"fjord-cni","agentSocket":"rel.sock"}"#, "`agentSocket`"),
        ];
        for (input, field) in cases {
            let e = NetConf::parse(input.as_bytes()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{input}: {e}");
            assert!(e.msg.contains(field), "{input}: message {:?} should name {field}", e.msg);
        }
    }

    #[test]
    fn unsupported_version_is_1() {
        let e = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"fjord","type":"fjord-cni"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.details.contains("1.1.0"));
    }

    #[test]
    fn env_good_add() {
        let e = Env::parse(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args["K8S_POD_NAME"], "web");
    }

    #[test]
    fn env_errors_are_4_and_name_the_variable() {
        let base = [("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/run/netns/x"), ("CNI_IFNAME", "eth0")];
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![], "CNI_COMMAND"),
            (vec![("CNI_COMMAND", "FROB")], "CNI_COMMAND"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")], "CNI_CONTAINERID"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "-bad"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")], "CNI_CONTAINERID"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "a/b"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")], "CNI_CONTAINERID"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")], "CNI_NETNS"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "rel"), ("CNI_IFNAME", "eth0")], "CNI_NETNS"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/x")], "CNI_IFNAME"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "averyveryverylongname")], "CNI_IFNAME"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "e:0")], "CNI_IFNAME"),
            (vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "..")], "CNI_IFNAME"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_ARGS", "novalue")].into_iter().chain(base).collect(), "CNI_ARGS"),
            (vec![("CNI_COMMAND", "ADD"), ("CNI_ARGS", "=v")].into_iter().chain(base).collect(), "CNI_ARGS"),
        ];
        for (vars, name) in cases {
            let e = Env::parse(env(&vars)).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{vars:?}");
            assert!(e.msg.contains(name), "{vars:?}: {:?} should name {name}", e.msg);
        }
    }

    #[test]
    fn del_without_netns_is_fine_and_version_needs_nothing() {
        Env::parse(env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")])).unwrap();
        Env::parse(env(&[("CNI_COMMAND", "VERSION")])).unwrap();
        Env::parse(env(&[("CNI_COMMAND", "STATUS")])).unwrap();
        Env::parse(env(&[("CNI_COMMAND", "GC")])).unwrap();
    }

    #[test]
    fn result_versions() {
        let r = CniResult {
            cni_version: SPEC_VERSION.into(),
            interfaces: vec![],
            ips: vec![IpConfig { version: None, address: "10.244.1.5/32".into(), gateway: None, interface: Some(1) }],
            routes: vec![],
            dns: Dns::default(),
        };
        let old = serde_json::to_value(r.clone().for_version("0.4.0")).unwrap();
        assert_eq!(old["ips"][0]["version"], "4");
        let new = serde_json::to_value(r.for_version("1.1.0")).unwrap();
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["cniVersion"], "1.1.0");
    }

    #[test]
    fn error_json_shape() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "agent not reachable").details("connect: ENOENT");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], 11);
        assert_eq!(v["msg"], "agent not reachable");
        assert_eq!(v["details"], "connect: ENOENT");
        assert_eq!(v["cniVersion"], "1.1.0");
    }
}
