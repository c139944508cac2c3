//! Command-line overrides of the common policy knobs (`--net`, `--bind`, `--ro-bind`, `--memory`,
//! `--pids`, `--workspace-size`, `--allow`, `--allow-domain`), as users of bwrap, nsjail and
//! firejail expect them. They are not a second way to build a jail: they become a small policy
//! that extends the chosen one, loaded through the same parser, so they are validated, merged and
//! audited exactly as a file saying the same would be, and `--report` shows the result.

use std::path::{Path, PathBuf};

use clap::Args;

#[derive(Args, Debug, Default, Clone)]
pub(super) struct Overrides {
    /// Network mode for this run: none, loopback or veth (overrides network.mode).
    #[arg(long, value_name = "MODE", help_heading = "Policy overrides")]
    net: Option<String>,
    /// Bind a host path read-write, at the same path or at DST (adds to filesystem.read_write).
    #[arg(long, value_name = "SRC[:DST]", help_heading = "Policy overrides")]
    bind: Vec<String>,
    /// Bind a host path read-only, at the same path or at DST (adds to filesystem.read_only).
    #[arg(long = "ro-bind", value_name = "SRC[:DST]", help_heading = "Policy overrides")]
    ro_bind: Vec<String>,
    /// Memory limit, e.g. 512M (overrides limits.memory).
    #[arg(long, value_name = "SIZE", help_heading = "Policy overrides")]
    memory: Option<String>,
    /// Process limit (overrides limits.pids).
    #[arg(long, value_name = "N", help_heading = "Policy overrides")]
    pids: Option<u64>,
    /// Size limit of a host-backed workspace, or "none" (overrides limits.workspace_size).
    #[arg(long = "workspace-size", value_name = "SIZE", help_heading = "Policy overrides")]
    workspace_size: Option<String>,
    /// Allow egress to CIDR[:PORTS] in veth mode (adds to network.allow).
    #[arg(long, value_name = "DEST", help_heading = "Policy overrides")]
    allow: Vec<String>,
    /// Allow a domain name in veth mode (adds to network.allow_domains).
    #[arg(long = "allow-domain", value_name = "NAME", help_heading = "Policy overrides")]
    allow_domain: Vec<String>,
}

use stockade::policy::toml_string as quote;

fn list(v: &[String]) -> String {
    format!("[{}]", v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "))
}

/// A bind's source made absolute against the working directory, as the user meant it.
fn absolute_bind(spec: &str, cwd: &Path) -> String {
    let (src, dst) = match spec.split_once(':') {
        Some((s, d)) => (s, Some(d)),
        None => (spec, None),
    };
    let src = if Path::new(src).is_absolute() { PathBuf::from(src) } else { cwd.join(src) };
    let src = src.display().to_string();
    match dst {
        Some(d) => format!("{src}:{d}"),
        None => format!("{src}:{src}"),
    }
}

impl Overrides {
    pub(super) fn is_empty(&self) -> bool {
        self.net.is_none()
            && self.bind.is_empty()
            && self.ro_bind.is_empty()
            && self.memory.is_none()
            && self.pids.is_none()
            && self.workspace_size.is_none()
            && self.allow.is_empty()
            && self.allow_domain.is_empty()
    }

    /// The flags as given, for the policy's name in reports and errors.
    fn describe(&self) -> String {
        let mut v = Vec::new();
        v.extend(self.net.iter().map(|x| format!("--net {x}")));
        v.extend(self.bind.iter().map(|x| format!("--bind {x}")));
        v.extend(self.ro_bind.iter().map(|x| format!("--ro-bind {x}")));
        v.extend(self.memory.iter().map(|x| format!("--memory {x}")));
        v.extend(self.pids.iter().map(|x| format!("--pids {x}")));
        v.extend(self.workspace_size.iter().map(|x| format!("--workspace-size {x}")));
        v.extend(self.allow.iter().map(|x| format!("--allow {x}")));
        v.extend(self.allow_domain.iter().map(|x| format!("--allow-domain {x}")));
        v.join(" ")
    }

    /// The overrides as policy text extending `base` (a built-in name or a path).
    pub(super) fn policy_text(&self, base: &str, cwd: &Path) -> String {
        let mut t = format!("extends = {}\n", quote(base));
        let binds = |v: &[String]| v.iter().map(|b| absolute_bind(b, cwd)).collect::<Vec<_>>();
        if !self.bind.is_empty() || !self.ro_bind.is_empty() {
            t.push_str("[filesystem]\n");
            if !self.bind.is_empty() {
                t.push_str(&format!("read_write_add = {}\n", list(&binds(&self.bind))));
            }
            if !self.ro_bind.is_empty() {
                t.push_str(&format!("read_only_add = {}\n", list(&binds(&self.ro_bind))));
            }
        }
        if self.memory.is_some() || self.pids.is_some() || self.workspace_size.is_some() {
            t.push_str("[limits]\n");
            if let Some(m) = &self.memory {
                t.push_str(&format!("memory = {}\n", quote(m)));
            }
            if let Some(n) = self.pids {
                t.push_str(&format!("pids = {n}\n"));
            }
            if let Some(w) = &self.workspace_size {
                t.push_str(&format!("workspace_size = {}\n", quote(w)));
            }
        }
        if self.net.is_some() || !self.allow.is_empty() || !self.allow_domain.is_empty() {
            t.push_str("[network]\n");
            if let Some(n) = &self.net {
                t.push_str(&format!("mode = {}\n", quote(n)));
            }
            if !self.allow.is_empty() {
                t.push_str(&format!("allow_add = {}\n", list(&self.allow)));
            }
            if !self.allow_domain.is_empty() {
                t.push_str(&format!("allow_domains_add = {}\n", list(&self.allow_domain)));
            }
        }
        t
    }

    /// Loads `spec` (None: the built-in default) with these overrides on top.
    pub(super) fn load(
        &self,
        spec: Option<&str>,
    ) -> Result<(stockade::policy::Policy, stockade::policy::Origins), stockade::policy::PolicyError> {
        if self.is_empty() {
            return stockade::policy::load(spec);
        }
        let spec = spec.unwrap_or("default");
        // A file is named by its absolute path: the overlay is read from the working directory.
        let base = if stockade::policy::is_builtin(spec) && !Path::new(spec).exists() {
            spec.to_owned()
        } else {
            std::fs::canonicalize(spec).map(|p| p.display().to_string()).unwrap_or_else(|_| spec.to_owned())
        };
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let text = self.policy_text(&base, &cwd);
        stockade::policy::load_str(&format!("{base} + command line ({})", self.describe()), &text, Some(&cwd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_a_policy_extending_the_chosen_one() {
        let o = Overrides {
            net: Some("loopback".into()),
            bind: vec!["data".into()],
            ro_bind: vec!["/etc/ssl:/ssl".into()],
            memory: Some("256M".into()),
            pids: Some(64),
            workspace_size: Some("none".into()),
            allow: vec!["198.51.100.2/32:443".into()],
            allow_domain: vec!["example.test".into()],
        };
        let t = o.policy_text("strict", Path::new("/home/u"));
        assert!(t.starts_with("extends = \"strict\"\n"), "{t}");
        assert!(t.contains("read_write_add = [\"/home/u/data:/home/u/data\"]"), "{t}");
        assert!(t.contains("read_only_add = [\"/etc/ssl:/ssl\"]"), "{t}");
        assert!(t.contains("memory = \"256M\"\npids = 64\nworkspace_size = \"none\""), "{t}");
        assert!(t.contains("mode = \"loopback\""), "{t}");
        assert!(t.contains("allow_domains_add = [\"example.test\"]"), "{t}");
        // A quote or a newline in a value stays inside its string.
        let odd = Overrides { memory: Some("1G\"\n[x]".into()), ..Overrides::default() };
        let doc: toml::Value = toml::from_str(&odd.policy_text("default", Path::new("/"))).unwrap();
        assert_eq!(doc["limits"]["memory"].as_str(), Some("1G\"\n[x]"));
        assert!(doc.get("x").is_none());
    }
}
