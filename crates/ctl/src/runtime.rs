//! A minimal container runtime's CNI side, as containerd (libcni) does it:
//! read the conflist, run each plugin with the `CNI_*` environment and its
//! config on stdin (with `name`, `cniVersion` and `prevResult` injected).

use anyhow::{bail, Context, Result};
use fjord_model::cni::CniError;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Runtime {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The namespace the plugin runs in (the node's, like containerd on a host).
    pub host_netns: PathBuf,
}

pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub args: Vec<(String, String)>,
}

#[derive(Debug)]
pub enum CniFailure {
    /// The plugin answered with a spec error.
    Plugin { plugin: String, error: CniError },
    Other(anyhow::Error),
}

impl std::fmt::Display for CniFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CniFailure::Plugin { plugin, error } => write!(f, "CNI plugin {plugin} failed: {error}"),
            CniFailure::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for CniFailure {
    fn from(e: anyhow::Error) -> Self {
        CniFailure::Other(e)
    }
}

impl Runtime {
    /// The first `*.conflist` in the conf dir (sorted), as libcni picks it.
    pub fn conflist(&self) -> Result<(PathBuf, Value)> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .with_context(|| format!("reading CNI conf dir {}", self.conf_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        files.sort();
        let p = files.into_iter().next().with_context(|| format!("no *.conflist in {}", self.conf_dir.display()))?;
        let v: Value = serde_json::from_slice(&std::fs::read(&p)?).with_context(|| format!("{} is not valid JSON", p.display()))?;
        if !v.get("plugins").is_some_and(Value::is_array) {
            bail!("{}: field `plugins` must be an array", p.display());
        }
        Ok((p, v))
    }

    fn plugin_config(list: &Value, plugin: &Value, prev: Option<&Value>, extra: Option<(&str, Value)>) -> Value {
        let mut c = plugin.clone();
        c["name"] = list["name"].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        if let Some((k, v)) = extra {
            c[k] = v;
        }
        c
    }

    fn exec(&self, plugin_type: &str, command: &str, att: Option<&Attachment>, stdin: &Value) -> Result<(Value, Duration), CniFailure> {
        let bin = self.bin_dir.join(plugin_type);
        if !bin.exists() {
            return Err(anyhow::anyhow!("CNI plugin {plugin_type} not found in {}", self.bin_dir.display()).into());
        }
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(a) = att {
            cmd.env("CNI_CONTAINERID", a.container_id).env("CNI_NETNS", a.netns).env("CNI_IFNAME", a.ifname);
            let args: Vec<String> = std::iter::once("IgnoreUnknown=1".to_string()).chain(a.args.iter().map(|(k, v)| format!("{k}={v}"))).collect();
            cmd.env("CNI_ARGS", args.join(";"));
        }
        fjord_net::netns::command_in(&mut cmd, &self.host_netns).map_err(anyhow::Error::from)?;
        let t0 = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("running {}", bin.display()))?;
        match child.stdin.take().unwrap().write_all(&serde_json::to_vec(stdin).unwrap()) {
            // A plugin may exit without reading its config (VERSION); its answer decides.
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(anyhow::Error::from(e).context("writing plugin stdin").into()),
            _ => {}
        }
        let out = child.wait_with_output().context("waiting for the CNI plugin")?;
        let took = t0.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return match serde_json::from_str::<CniError>(stdout.trim()) {
                Ok(error) => Err(CniFailure::Plugin { plugin: plugin_type.into(), error }),
                Err(_) => Err(anyhow::anyhow!(
                    "CNI plugin {plugin_type} failed ({}) without a spec error; stdout: {stdout:?}; stderr: {:?}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
                .into()),
            };
        }
        let v = if stdout.trim().is_empty() { Value::Null } else { serde_json::from_str(stdout.trim()).context("plugin printed invalid JSON")? };
        Ok((v, took))
    }

    /// ADD through every plugin of the conflist; the last result, and the total time.
    pub fn add(&self, att: &Attachment) -> Result<(Value, Duration), CniFailure> {
        let (_, list) = self.conflist()?;
        let mut prev: Option<Value> = None;
        let mut total = Duration::ZERO;
        for plugin in list["plugins"].as_array().unwrap() {
            let ty = plugin["type"].as_str().context("conflist plugin without `type`")?;
            let (r, t) = self.exec(ty, "ADD", Some(att), &Self::plugin_config(&list, plugin, prev.as_ref(), None))?;
            total += t;
            prev = Some(r);
        }
        Ok((prev.unwrap_or(Value::Null), total))
    }

    /// DEL through every plugin, in reverse order.
    pub fn del(&self, att: &Attachment, prev: Option<&Value>) -> Result<Duration, CniFailure> {
        let (_, list) = self.conflist()?;
        let mut total = Duration::ZERO;
        for plugin in list["plugins"].as_array().unwrap().iter().rev() {
            let ty = plugin["type"].as_str().context("conflist plugin without `type`")?;
            total += self.exec(ty, "DEL", Some(att), &Self::plugin_config(&list, plugin, prev, None))?.1;
        }
        Ok(total)
    }

    pub fn check(&self, att: &Attachment, prev: &Value) -> Result<(), CniFailure> {
        let (_, list) = self.conflist()?;
        for plugin in list["plugins"].as_array().unwrap() {
            let ty = plugin["type"].as_str().context("conflist plugin without `type`")?;
            self.exec(ty, "CHECK", Some(att), &Self::plugin_config(&list, plugin, Some(prev), None))?;
        }
        Ok(())
    }

    pub fn gc(&self, valid: Vec<(String, String)>) -> Result<(), CniFailure> {
        let (_, list) = self.conflist()?;
        let v: Value = valid.into_iter().map(|(c, i)| serde_json::json!({"containerID": c, "ifname": i})).collect();
        for plugin in list["plugins"].as_array().unwrap() {
            let ty = plugin["type"].as_str().context("conflist plugin without `type`")?;
            self.exec(ty, "GC", None, &Self::plugin_config(&list, plugin, None, Some(("cni.dev/valid-attachments", v.clone()))))?;
        }
        Ok(())
    }
}
