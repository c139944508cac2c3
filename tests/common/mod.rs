//! Helpers for tests that run real jails through the `stockade` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub(crate) mod worker;

pub(crate) const STOCKADE: &str = env!("CARGO_BIN_EXE_stockade");
/// Where tests bind the stockade binary inside jails, to run `__probe` there.
pub(crate) const JAILED_STOCKADE: &str = "/.stockade/stockade";

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the host's temp dir, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "stockade-test-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
    /// Makes the directory owned by the jail user's host uid (root mode maps jail uid 1000 to 101000).
    pub(crate) fn owned_by_jail_user(self) -> TempDir {
        if is_root() {
            std::os::unix::fs::chown(&self.0, Some(101000), Some(101000)).unwrap();
        }
        self
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A worker killed or stopped mid-session keeps its sessions' filesystems mounted for its
        // restart (limits.workspace_size): a test's directory takes them down with it.
        let prefix = format!("{}/", self.0.display());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&prefix)).collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a policy that extends `base` with `extra` TOML and binds the stockade binary in.
/// The returned TempDir holds the file and must outlive the run.
pub(crate) fn policy(base: &str, extra: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new("policy");
    let path = dir.path().join("policy.toml");
    let bind = format!("read_only_add = [\"{STOCKADE}:{JAILED_STOCKADE}\"]");
    let text = if extra.contains("[filesystem]") {
        format!(
            "extends = \"{base}\"\n{}\n",
            extra.trim().replacen("[filesystem]", &format!("[filesystem]\n{bind}"), 1)
        )
    } else {
        format!("extends = \"{base}\"\n{}\n[filesystem]\n{bind}\n", extra.trim())
    };
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A policy for jails given host directories on the test machine's large disk: it lifts the
/// workspace and outputs size limits, which such a directory could not hold.
pub(crate) fn policy_for_host_dirs(base: &str, extra: &str) -> (TempDir, PathBuf) {
    let lift = "workspace_size = \"none\"\noutputs_size = \"none\"";
    let extra = if extra.contains("[limits]") {
        extra.replacen("[limits]", &format!("[limits]\n{lift}"), 1)
    } else {
        format!("{extra}\n[limits]\n{lift}")
    };
    policy(base, &extra)
}

pub(crate) struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

pub(crate) fn to_run(o: Output) -> Run {
    use std::os::unix::process::ExitStatusExt;
    let code = o.status.code().unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0));
    Run { code, stdout: String::from_utf8_lossy(&o.stdout).into(), stderr: String::from_utf8_lossy(&o.stderr).into() }
}

/// `stockade run [args] -- cmd...`
pub(crate) fn stockade_run(args: &[&str], cmd: &[&str]) -> Run {
    let mut c = Command::new(STOCKADE);
    c.arg("run").args(args).arg("--").args(cmd).stdin(Stdio::null());
    to_run(c.output().unwrap())
}

/// Runs a shell snippet in a jail built from `policy_path`.
pub(crate) fn sh(policy_path: &Path, script: &str) -> Run {
    stockade_run(&["--policy", policy_path.to_str().unwrap()], &["/bin/sh", "-c", script])
}

pub(crate) fn probe(policy_path: &Path, names: &[&str]) -> Run {
    let mut cmd = vec![JAILED_STOCKADE, "__probe"];
    cmd.extend_from_slice(names);
    stockade_run(&["--policy", policy_path.to_str().unwrap()], &cmd)
}

/// Skips (returns true) when the test needs host root and we are not root.
pub(crate) fn needs_root() -> bool {
    if !is_root() {
        skip("needs host root (CI runs as root)");
        return true;
    }
    false
}

/// A check this host cannot make: said on stderr, never silently, and a failure where
/// STOCKADE_STRICT_SKIPS=1 (set by .ci/run, which installs what the gated checks need).
#[allow(dead_code)]
pub(crate) fn skip(why: &str) {
    if std::env::var_os("STOCKADE_STRICT_SKIPS").is_some_and(|v| v == "1") {
        panic!("skipped under STOCKADE_STRICT_SKIPS=1: {why}");
    }
    eprintln!("skipped: {why}");
}

/// (mount point, fstype, super options) of every cgroup (v1) and cgroup2 mount, from the mount
/// table: tests find the hierarchies this host has rather than assume a layout.
#[allow(dead_code)]
pub(crate) fn cgroup_mounts() -> Vec<(std::path::PathBuf, String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mut f = post.split(' ');
            let (fstype, _, opts) = (f.next()?, f.next()?, f.next()?);
            let mount_point = pre.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| (std::path::PathBuf::from(mount_point), fstype.to_owned(), opts.to_owned()))
        })
        .collect()
}

/// The host directory of the cgroup that a `/proc/PID/cgroup` text gives `controller`: in the v1
/// hierarchy holding the controller when there is one, else in the v2 hierarchy.
#[allow(dead_code)]
pub(crate) fn cgroup_dir(proc_cgroup: &str, controller: &str) -> Option<std::path::PathBuf> {
    let mounts = cgroup_mounts();
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        if !ctrls.is_empty() && ctrls.split(',').any(|c| c == controller) {
            let (m, _, _) = mounts.iter().find(|(_, t, o)| t == "cgroup" && o.split(',').any(|c| c == controller))?;
            return Some(m.join(path.trim_start_matches('/')));
        }
    }
    let path = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let (m, _, _) = mounts.iter().find(|(_, t, _)| t == "cgroup2")?;
    Some(m.join(path.trim_start_matches('/')))
}

/// Every jail cgroup (`stockade-*`, not the supervisor's leaf) in this host's cgroup hierarchies.
#[allow(dead_code)]
pub(crate) fn find_stockade_cgroups() -> Vec<String> {
    let mut out = Vec::new();
    for (root, _, _) in cgroup_mounts() {
        let Ok(rd) = std::fs::read_dir(&root) else { continue };
        let depth = root.components().count();
        let mut stack: Vec<std::path::PathBuf> = rd.flatten().map(|e| e.path()).collect();
        while let Some(p) = stack.pop() {
            if !p.is_dir() {
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("stockade-") && name != "stockade-supervisor" {
                out.push(p.display().to_string());
            }
            if p.components().count() < depth + 5 {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.flatten().map(|e| e.path()));
                }
            }
        }
    }
    out
}

/// The host's processes whose arguments include `marker` as whole words (`sleep 3.1234` is not
/// `sleep 3.12345`, another run's), leaving out Stockade itself and the shells that started them.
pub(crate) fn host_processes_matching(marker: &str) -> Vec<String> {
    let mut v = Vec::new();
    let words = format!(" {marker} ");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).split('\0').filter(|a| !a.is_empty()).collect::<Vec<_>>().join(" ");
            if format!(" {cmd} ").contains(&words) && !cmd.contains("stockade") && !cmd.contains("/bin/sh -c") {
                v.push(format!("{} {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    v
}

/// A process's peak resident memory (VmHWM), KiB.
pub(crate) fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}
