//! Provisioning a session's workspace from its metadata, before the agent's first tool call
//! (`[provision]` in the policy). Metadata only *chooses*: a repository whose URL starts with one
//! of `provision.git_allow`, at a ref of plain characters, or one of the host directories
//! declared in `provision.copy_from`, by name. Anything else is refused.
//!
//! The work runs in a jail of its own (`stockade run`, so a single-threaded process builds it):
//! the worker's policy with the provisioning egress allowlist, the session's workspace
//! read-write, and — for git only — the credentials file read-only at
//! `/run/provision/git-credentials`. The session's own jail never has the credentials: they are
//! copied for the provisioning jail into the item's private directory and removed after it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::policy::Provision;

/// What a session's metadata asked for, checked against the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Git { url: String, git_ref: Option<String> },
    Copy { name: String, from: PathBuf },
}

/// Why a request was refused or failed; said to the session and written to its trail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn meta<'a>(metadata: &'a serde_json::Map<String, serde_json::Value>, key: &Option<String>) -> Option<&'a str> {
    key.as_ref().and_then(|k| metadata.get(k)).and_then(|v| v.as_str())
}

/// The provisioning a session's metadata asks for; `Ok(None)` when it asks for none.
pub fn plan(p: &Provision, metadata: &serde_json::Map<String, serde_json::Value>) -> Result<Option<Plan>, Refusal> {
    let url = meta(metadata, &p.git_url_key);
    let name = meta(metadata, &p.copy_key);
    let key = |k: &Option<String>| k.clone().unwrap_or_default();
    match (url, name) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(Refusal(format!(
            "session metadata names both a repository (`{}`) and a directory (`{}`); provisioning does one",
            key(&p.git_url_key),
            key(&p.copy_key)
        ))),
        (Some(url), None) => {
            check_url(url, &p.git_allow)?;
            let git_ref = meta(metadata, &p.git_ref_key).map(|r| check_ref(r).map(|()| r.to_owned())).transpose()?;
            Ok(Some(Plan::Git { url: url.to_owned(), git_ref }))
        }
        (None, Some(name)) => match p.copy_from.get(name) {
            Some(from) => Ok(Some(Plan::Copy { name: name.to_owned(), from: from.clone() })),
            None => Err(Refusal(format!(
                "session metadata `{}` = {name:?} names no directory in provision.copy_from (declared: {})",
                key(&p.copy_key),
                p.copy_from.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        },
    }
}

/// A repository URL must start with an allowed prefix and be a plain URL: no credentials in
/// it, no whitespace or control characters, no `..` segment that would climb out of the prefix,
/// nothing git would read as an option.
fn check_url(url: &str, allow: &[String]) -> Result<(), Refusal> {
    let refuse = |why: &str| Err(Refusal(format!("repository {url:?} refused: {why}")));
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return refuse("not a plain URL");
    }
    let Some((_, rest)) = url.split_once("://") else { return refuse("not a URL") };
    if rest.split('/').next().is_some_and(|authority| authority.contains('@')) && !url.starts_with("ssh://") {
        return refuse("credentials in the URL; the policy's provision.credentials are used instead");
    }
    let dots = |seg: &str| seg.to_ascii_lowercase().replace("%2e", ".") == "..";
    if rest.split(['/', '?', '#']).any(dots) || url.contains('\\') || url.to_ascii_lowercase().contains("%2f") {
        return refuse("a `..` segment");
    }
    if !allow.iter().any(|p| url.starts_with(p.as_str())) {
        return refuse(&format!("not under provision.git_allow ({})", allow.join(", ")));
    }
    Ok(())
}

/// A branch or tag name as `git check-ref-format` would take it, minus anything exotic.
fn check_ref(r: &str) -> Result<(), Refusal> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && !r.starts_with(['-', '/', '.'])
        && !r.ends_with(['/', '.'])
        && !r.ends_with(".lock")
        && !r.contains("..")
        && !r.contains("//")
        && !r.contains("@{")
        && r.chars().all(|c| c.is_ascii_alphanumeric() || "._/-+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Refusal(format!("ref {r:?} refused: not a plain branch or tag name")))
    }
}

/// Where the provisioning jail sees what it is given.
const CREDENTIALS_IN_JAIL: &str = "/run/provision/git-credentials";
const SOURCE_IN_JAIL: &str = "/run/provision/source";

/// The credentials file a policy names: a path, or `credential:NAME` in systemd's
/// `$CREDENTIALS_DIRECTORY`.
fn credentials_path(spec: &str) -> Result<PathBuf, Refusal> {
    match spec.strip_prefix("credential:") {
        Some(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|d| Path::new(&d).join(name))
            .ok_or_else(|| Refusal(format!("provision.credentials {spec:?}: $CREDENTIALS_DIRECTORY is not set"))),
        None => Ok(PathBuf::from(spec)),
    }
}

pub struct Job<'a> {
    pub exe: &'a Path,
    /// The worker's policy (a built-in name or a file), which the provisioning jail extends.
    pub policy: &'a str,
    pub provision: &'a Provision,
    pub workspace: &'a Path,
    /// A private directory (0700, the worker's) for the derived policy and the credentials.
    pub scratch: &'a Path,
    pub trail: &'a Path,
}

/// Runs a plan in its own jail. The scratch directory is removed afterwards either way.
pub async fn run(job: &Job<'_>, plan: &Plan) -> Result<(), Refusal> {
    let r = run_in(job, plan).await;
    let _ = std::fs::remove_dir_all(job.scratch);
    r
}

async fn run_in(job: &Job<'_>, plan: &Plan) -> Result<(), Refusal> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let failed = |what: &str, e: &dyn std::fmt::Display| Refusal(format!("workspace provisioning failed: {what}: {e}"));
    // 0711: the jail opens its binds from inside its user namespace, where this directory's
    // owner is nobody it knows; it may pass through, and no one may list it.
    std::fs::DirBuilder::new().recursive(true).mode(0o711).create(job.scratch).map_err(|e| failed("scratch", &e))?;
    let p = job.provision;
    let base = if job.policy.contains('/') || job.policy.ends_with(".toml") {
        std::fs::canonicalize(job.policy).map_err(|e| failed(job.policy, &e))?.display().to_string()
    } else {
        job.policy.to_owned()
    };
    let mut binds = Vec::new();
    let (script, args): (&str, Vec<String>) = match plan {
        Plan::Git { url, git_ref } => {
            if let Some(c) = &p.credentials {
                let src = credentials_path(c)?;
                // The jail user's host uid is not known before its jail takes an id range: the copy
                // is readable by all, under a name no one can list or guess, for the jail's start.
                let copy =
                    job.scratch.join(format!("git-credentials-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)));
                std::fs::copy(&src, &copy)
                    .map_err(|e| failed(&format!("provision.credentials {}", src.display()), &e))?;
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o444))
                    .map_err(|e| failed("credentials", &e))?;
                binds.push(format!("{}:{CREDENTIALS_IN_JAIL}", copy.display()));
            }
            let script = r#"set -eu
cd /workspace
git init -q
if [ -e /run/provision/git-credentials ]; then
  git config credential.helper 'store --file=/run/provision/git-credentials'
fi
git remote add origin "$1"
git fetch -q --depth 1 origin "${2:-HEAD}"
git checkout -q FETCH_HEAD
git config --unset credential.helper || true
"#;
            (script, vec![url.clone(), git_ref.clone().unwrap_or_default()])
        }
        Plan::Copy { from, .. } => {
            binds.push(format!("{}:{SOURCE_IN_JAIL}", from.display()));
            ("cp -R --preserve=mode,timestamps -- /run/provision/source/. /workspace/", Vec::new())
        }
    };
    let net = if matches!(plan, Plan::Git { .. }) && !(p.allow.is_empty() && p.allow_domains.is_empty()) {
        format!(
            "[network]\nmode = \"veth\"\nallow = [{}]\nallow_domains = [{}]\n",
            p.allow.iter().map(|a| crate::policy::toml_string(a)).collect::<Vec<_>>().join(", "),
            p.allow_domains.iter().map(|a| crate::policy::toml_string(a)).collect::<Vec<_>>().join(", "),
        )
    } else {
        "[network]\nmode = \"none\"\n".to_owned()
    };
    let policy_text = format!(
        "# The provisioning jail of one session, made by the worker.\nextends = {}\n{net}[filesystem]\nread_only_add = [{}]\n",
        crate::policy::toml_string(&base),
        binds.iter().map(|b| crate::policy::toml_string(b)).collect::<Vec<_>>().join(", "),
    );
    let policy_file = job.scratch.join("provision.toml");
    std::fs::write(&policy_file, policy_text).map_err(|e| failed("policy", &e))?;
    let mut cmd = tokio::process::Command::new(job.exe);
    cmd.args(["run", "--policy"])
        .arg(&policy_file)
        .arg("--workspace")
        .arg(job.workspace)
        .arg("--trail")
        .arg(job.trail)
        .args(["--timeout", &crate::util::format_duration(p.timeout.0), "--", "/bin/sh", "-c", script, "provision"])
        .args(&args)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(p.timeout.0.saturating_add(Duration::from_secs(30)), cmd.output())
        .await
        .map_err(|_| {
            Refusal(format!("workspace provisioning timed out after {}", crate::util::format_duration(p.timeout.0)))
        })?
        .map_err(|e| failed("starting its jail", &e))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let tail: String = text.trim().chars().rev().take(1000).collect::<Vec<_>>().into_iter().rev().collect();
    Err(Refusal(format!("workspace provisioning failed ({}): {tail}", out.status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(extra: &str) -> Provision {
        let text = format!("extends = \"default\"\n[provision]\n{extra}");
        crate::policy::load_str("t.toml", &text, None).unwrap().0.provision
    }

    fn md(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn metadata_chooses_only_among_what_the_policy_declares() {
        let p = policy(
            "git_url_key = \"repo\"\ngit_ref_key = \"ref\"\ngit_allow = [\"https://git.example/acme/\"]\n\
             copy_key = \"seed\"\ncopy_from = { app = \"/srv/seed/app\" }\n",
        );
        assert_eq!(plan(&p, &md(serde_json::json!({"other": "x"}))), Ok(None));
        assert_eq!(
            plan(&p, &md(serde_json::json!({"repo": "https://git.example/acme/app.git", "ref": "release/1.2"}))),
            Ok(Some(Plan::Git { url: "https://git.example/acme/app.git".into(), git_ref: Some("release/1.2".into()) }))
        );
        assert_eq!(
            plan(&p, &md(serde_json::json!({"seed": "app"}))),
            Ok(Some(Plan::Copy { name: "app".into(), from: "/srv/seed/app".into() }))
        );
        for (m, why) in [
            (serde_json::json!({"repo": "https://git.example/other/app.git"}), "not under provision.git_allow"),
            (serde_json::json!({"repo": "https://git.example/acme.evil/x"}), "not under provision.git_allow"),
            (serde_json::json!({"repo": "https://git.example/acme/../other/x"}), "`..`"),
            (serde_json::json!({"repo": "https://git.example/acme/%2E%2e/other/x"}), "`..`"),
            (serde_json::json!({"repo": "https://user:pw@git.example/acme/x"}), "credentials in the URL"),
            (serde_json::json!({"repo": "https://git.example/acme/x --upload-pack=sh"}), "not a plain URL"),
            (serde_json::json!({"repo": "https://git.example/acme/x", "ref": "--upload-pack=x"}), "ref"),
            (serde_json::json!({"repo": "https://git.example/acme/x", "ref": "a..b"}), "ref"),
            (serde_json::json!({"seed": "../etc"}), "names no directory"),
            (serde_json::json!({"seed": "app", "repo": "https://git.example/acme/x"}), "both"),
        ] {
            let r = plan(&p, &md(m.clone()));
            assert!(matches!(&r, Err(Refusal(t)) if t.contains(why)), "{m}: {r:?}");
        }
    }

    #[test]
    fn the_policy_refuses_prefixes_that_would_admit_other_hosts() {
        let text = "extends = \"default\"\n[provision]\ngit_url_key = \"repo\"\ngit_allow = [\"https://github.com\"]\n";
        let e = crate::policy::load_str("t.toml", text, None).unwrap_err().to_string();
        assert!(e.contains("provision.git_allow"), "{e}");
        let text = "extends = \"default\"\n[provision]\ngit_url_key = \"repo\"\n";
        let e = crate::policy::load_str("t.toml", text, None).unwrap_err().to_string();
        assert!(e.contains("no URL prefix is allowed"), "{e}");
    }
}
