//! Step 5b: cgroup limits (memory, pids, cpu), created by the supervisor before the jail runs.
//!
//! Each controller is taken from cgroup v2 when the v2 hierarchy offers it to Stockade's own
//! cgroup, and otherwise from a v1 hierarchy (hybrid hosts). The jail's cgroup is created below
//! Stockade's own cgroup in that hierarchy, so a delegated subtree (systemd `Delegate=yes`) works
//! without touching the rest of the host. A limit that cannot be applied is an error unless
//! `limits.enforcement = "best_effort"`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::{JailError, Step};
use super::fsio::{open, read_kernel_file};
use crate::policy::{Enforcement, Limits};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

#[cfg(test)]
mod fake;
mod fs;
pub(crate) use fs::{CgroupFs, Kernel};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

/// What the host offers: the v2 mount (if any) and v1 mounts by controller.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layout {
    pub v2_mount: Option<PathBuf>,
    /// Stockade's own cgroup in the v2 hierarchy.
    pub v2_self: Option<String>,
    pub v2_controllers: Vec<String>,
    /// (controller, mount point, Stockade's own cgroup in that hierarchy)
    pub v1: Vec<(String, PathBuf, String)>,
    /// /proc/self/cgroup as `detect_v2` read it, for `add_v1`.
    own: String,
}

impl Layout {
    pub(crate) fn detect() -> Layout {
        let mut l = Layout::detect_v2();
        l.add_v1();
        l
    }

    /// The v2 half of [`Layout::detect`]: all a jail start needs before its clone (whether the jail
    /// is cloned into a v2 cgroup). Finds the v2 mount at its usual places by its filesystem magic
    /// and reads the mount table only when it is elsewhere.
    pub(crate) fn detect_v2() -> Layout {
        let mut l = Layout::default();
        let usual = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().find(|m| {
            nix::sys::statfs::statfs(*m).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        });
        l.v2_mount = match usual {
            Some(m) => Some(PathBuf::from(m)),
            None => mounts().into_iter().find(|(fstype, _, _)| fstype == "cgroup2").map(|(_, mp, _)| PathBuf::from(mp)),
        };
        l.own = read_kernel_file("/proc/self/cgroup").unwrap_or_default();
        l.read_v2_controllers(&Kernel);
        l
    }

    /// The layout a host with this mount table and this `/proc/self/cgroup` offers, its files
    /// read through `fs`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn from_view(mountinfo: &str, own: &str, fs: &impl CgroupFs) -> Layout {
        let mounts = parse_mounts(mountinfo);
        let mut l = Layout {
            v2_mount: mounts.iter().find(|(t, _, _)| t == "cgroup2").map(|(_, m, _)| PathBuf::from(m)),
            own: own.to_owned(),
            ..Layout::default()
        };
        l.read_v2_controllers(fs);
        l.add_v1_from(&mounts);
        l
    }

    fn read_v2_controllers(&mut self, fs: &impl CgroupFs) {
        if let Some(m) = &self.v2_mount {
            let own_path = self.own.lines().find_map(|c| c.strip_prefix("0::")).unwrap_or("/").to_owned();
            let dir = join(m, &own_path);
            self.v2_controllers = fs
                .read(&dir.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            self.v2_self = Some(own_path);
        }
    }

    /// The v1 half of [`Layout::detect`]: the hierarchies of the controllers Stockade uses.
    pub(crate) fn add_v1(&mut self) {
        if self.own.is_empty() {
            // A layout that did not come from `detect_v2`.
            self.own = read_kernel_file("/proc/self/cgroup").unwrap_or_default();
        }
        self.add_v1_from(&parse_mounts(&read_kernel_file("/proc/self/mountinfo").unwrap_or_default()));
    }

    fn add_v1_from(&mut self, mounts: &[(String, String, String)]) {
        for (fstype, mount_point, superopts) in mounts {
            if fstype != "cgroup" {
                continue;
            }
            for opt in superopts.split(',') {
                if ["memory", "pids", "cpu"].contains(&opt) {
                    let own_path = self
                        .own
                        .lines()
                        .filter_map(|c| c.splitn(3, ':').collect::<Vec<_>>().try_into().ok())
                        .find(|[_, ctrls, _]: &[&str; 3]| ctrls.split(',').any(|c| c == opt))
                        .map(|[_, _, p]| p.to_owned())
                        .unwrap_or_else(|| "/".into());
                    self.v1.push((opt.to_owned(), PathBuf::from(mount_point), own_path));
                }
            }
        }
    }

    /// Whether any limit the policy sets comes from cgroup v2: then the jail is cloned straight
    /// into its cgroup, which must exist before the clone.
    pub(crate) fn uses_v2(&self, l: &Limits) -> bool {
        wanted(l).into_iter().any(|c| self.source(c) == Some("v2"))
    }

    /// Where a controller would come from: "v2", "v1", or None.
    pub(crate) fn source(&self, c: Controller) -> Option<&'static str> {
        if self.v2_controllers.iter().any(|x| x == c.name()) {
            Some("v2")
        } else if self.v1.iter().any(|(n, _, _)| n == c.name()) {
            Some("v1")
        } else {
            None
        }
    }
}

/// (fstype, mount point, super options) of every mount, from /proc/self/mountinfo.
fn mounts() -> Vec<(String, String, String)> {
    parse_mounts(&read_kernel_file("/proc/self/mountinfo").unwrap_or_default())
}

/// (fstype, mount point, super options) of every mount in a mountinfo text.
fn parse_mounts(mountinfo: &str) -> Vec<(String, String, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4).unwrap_or("");
            let mut qf = post.split(' ');
            let fstype = qf.next().unwrap_or("");
            let superopts = qf.nth(1).unwrap_or("");
            Some((fstype.to_owned(), mount_point.to_owned(), superopts.to_owned()))
        })
        .collect()
}

/// The controllers the policy's limits need.
pub(crate) fn wanted(l: &Limits) -> Vec<Controller> {
    [(Controller::Memory, l.memory.is_some()), (Controller::Pids, l.pids.is_some()), (Controller::Cpu, l.cpu.is_some())]
        .into_iter()
        .filter(|(_, w)| *w)
        .map(|(c, _)| c)
        .collect()
}

fn join(mount: &Path, cg: &str) -> PathBuf {
    mount.join(cg.trim_start_matches('/'))
}

/// Makes a jail's cgroup directory. Names carry the pid and a per-process count, so one that
/// exists already was left by a killed Stockade that had this pid before — or belongs to a live
/// one in another pid namespace. An empty one is taken over; one that holds processes is left
/// alone and the jail is refused (the general sweep runs once the jail is up, see
/// `remove_stale_near`).
fn make_dir(fs: &impl CgroupFs, d: &Path) -> std::io::Result<()> {
    match fs.create_dir(d) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let empty = fs.read(&d.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
            if !empty {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a cgroup of this name exists and holds processes (a Stockade in another pid namespace?)",
                ));
            }
            fs.remove_dir(d)?;
            fs.create_dir(d)
        }
        r => r,
    }
}

/// The jail's cgroup: one directory per hierarchy used.
#[derive(Debug)]
pub(crate) struct JailCgroup<F: CgroupFs = Kernel> {
    fs: F,
    dirs: Vec<PathBuf>,
    v2_dir: Option<PathBuf>,
}

/// What was applied, for the CLI's report.
#[derive(Debug, Clone, Default)]
pub struct CgroupReport {
    pub applied: Vec<String>,
    pub skipped: Vec<String>,
}

impl<F: CgroupFs> JailCgroup<F> {
    /// Creates the cgroup and writes the limits. `Ok(None)` when the policy asks for no cgroup limit.
    pub(crate) fn create(
        fs: F,
        layout: &Layout,
        name: &str,
        limits: &Limits,
    ) -> Result<(Option<JailCgroup<F>>, CgroupReport), JailError> {
        let wanted = wanted(limits);
        let mut report = CgroupReport::default();
        if wanted.is_empty() {
            return Ok((None, report));
        }
        let best_effort = limits.enforcement == Enforcement::BestEffort;
        let mut cg = JailCgroup { fs, dirs: Vec::new(), v2_dir: None };

        let result = (|| -> Result<(), JailError> {
            for c in &wanted {
                match cg.apply_one(layout, *c, name, limits) {
                    Ok(desc) => report.applied.push(desc),
                    Err(e) if best_effort => report.skipped.push(e.msg),
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            cg.remove();
            return Err(JailError::new(
                Step::Cgroups,
                format!("{} (set limits.enforcement = \"best_effort\" to run without)", e.msg),
            ));
        }
        Ok(((!cg.dirs.is_empty()).then_some(cg), report))
    }

    fn apply_one(&mut self, layout: &Layout, c: Controller, name: &str, l: &Limits) -> Result<String, JailError> {
        let e = |m: String| JailError::new(Step::Cgroups, m);
        let use_v2 = layout.v2_controllers.iter().any(|x| x == c.name());
        let dir = if use_v2 {
            match &self.v2_dir {
                Some(d) => d.clone(),
                None => {
                    let mount = layout.v2_mount.as_ref().expect("v2 controllers imply a v2 mount");
                    let parent = join(mount, layout.v2_self.as_deref().unwrap_or("/"));
                    let d = parent.join(name);
                    make_dir(&self.fs, &d).map_err(|err| e(format!("create {}: {err}", d.display())))?;
                    self.dirs.push(d.clone());
                    self.v2_dir = Some(d.clone());
                    d
                }
            }
        } else {
            let Some((_, mount, own)) = layout.v1.iter().find(|(n, _, _)| n == c.name()) else {
                return Err(e(format!("no {} controller on this host (neither cgroup v2 nor v1)", c.name())));
            };
            let parent = join(mount, own);
            let d = parent.join(name);
            // Controllers that share a hierarchy (cpu,cpuacct) share the directory too.
            if !self.dirs.contains(&d) {
                make_dir(&self.fs, &d).map_err(|err| e(format!("create {}: {err}", d.display())))?;
                self.dirs.push(d.clone());
            }
            d
        };
        if use_v2 {
            enable_v2_controller(&self.fs, &dir, c.name()).map_err(e)?;
        }
        let write = |file: &str, v: &str, optional: bool| -> Result<(), JailError> {
            match self.fs.write(&dir.join(file), v) {
                // Swap accounting is off on this host: there is no swap limit to set.
                Err(err) if optional && err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r.map_err(|err| e(format!("write {} = {v}: {err}", dir.join(file).display()))),
            }
        };
        let w = |file: &str, v: String| write(file, &v, false);
        let ver = if use_v2 { "v2" } else { "v1" };
        match c {
            Controller::Memory => {
                let m = l.memory.map(|s| s.0).unwrap_or(u64::MAX);
                if use_v2 {
                    w("memory.max", m.to_string())?;
                    write("memory.swap.max", "0", true)?;
                } else {
                    w("memory.limit_in_bytes", m.to_string())?;
                    write("memory.memsw.limit_in_bytes", &m.to_string(), true)?;
                }
                Ok(format!("memory {} ({ver})", crate::util::format_size(m)))
            }
            Controller::Pids => {
                let n = l.pids.unwrap_or(0);
                w("pids.max", n.to_string())?;
                Ok(format!("pids {n} ({ver})"))
            }
            Controller::Cpu => {
                let cpus = l.cpu.unwrap_or(1.0);
                let period: u64 = 100_000;
                let quota = ((cpus * period as f64) as u64).max(1000);
                if use_v2 {
                    w("cpu.max", format!("{quota} {period}"))?;
                } else {
                    w("cpu.cfs_period_us", period.to_string())?;
                    w("cpu.cfs_quota_us", quota.to_string())?;
                }
                Ok(format!("cpu {cpus} ({ver})"))
            }
        }
    }

    /// Opens what the jail needs to enter this cgroup by itself (see [`Entry`]): before the
    /// clone for a v2 cgroup, after it (sent to the jail) for v1 ones.
    pub(crate) fn entry(&self) -> Result<Entry, JailError> {
        let e =
            |what: &Path, err: std::io::Error| JailError::new(Step::Cgroups, format!("open {}: {err}", what.display()));
        let mut v1_tasks = Vec::new();
        for d in self.dirs.iter().filter(|d| Some(*d) != self.v2_dir.as_ref()) {
            let tasks = d.join("tasks");
            let f = open(&tasks, OFlag::O_WRONLY, Mode::empty()).map_err(|err| e(&tasks, err.into()))?;
            v1_tasks.push((tasks, f));
        }
        let v2_dir = match &self.v2_dir {
            Some(d) => Some(open(d, OFlag::O_RDONLY, Mode::empty()).map_err(|err| e(d, err.into()))?),
            None => None,
        };
        Ok(Entry { v1_tasks, v2_dir })
    }

    /// Kills anything left and removes the directories. Called once the jail's init is gone, when
    /// the pid namespace teardown has already signalled every member; waits briefly for the
    /// kernel to finish reaping before rmdir.
    pub(crate) fn remove(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for d in self.dirs.drain(..).rev() {
            // Usually empty by now: the removal is tried first, the killing only when it fails.
            let mut killed = false;
            loop {
                match self.fs.remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > deadline => {
                        tracing::warn!(cgroup = %d.display(), error = %e, "could not remove jail cgroup");
                        break;
                    }
                    Err(_) if !killed => {
                        killed = true;
                        self.fs.kill_all(&d);
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        self.fs.kill_all(&d);
                    }
                }
            }
        }
    }
}

/// How a new jail enters its cgroup without anybody migrating it from outside.
///
/// Moving another process into a cgroup (a pid written to `cgroup.procs`) write-locks the
/// kernel's global threadgroup semaphore, which costs an RCU grace period whenever no other
/// migration happened lately: several milliseconds on an idle host, paid by every jail start.
/// Two paths avoid it. On cgroup v2 the jail is cloned straight into its cgroup
/// (`CLONE_INTO_CGROUP`, `v2_dir`). On v1 hierarchies the single-threaded jail moves itself by
/// writing `0` (itself) to each cgroup's `tasks` file, which the kernel does without that lock.
/// The `tasks` files are opened by the supervisor, and the kernel checks the opener's
/// credentials, so the jail needs no privilege to write them; it closes them right after.
#[derive(Debug)]
pub(crate) struct Entry {
    v1_tasks: Vec<(PathBuf, OwnedFd)>,
    v2_dir: Option<OwnedFd>,
}

impl Entry {
    /// The v2 cgroup directory to clone into, if any.
    pub(crate) fn clone_into(&self) -> Option<BorrowedFd<'_>> {
        self.v2_dir.as_ref().map(|f| f.as_fd())
    }

    /// Makes the jail enter its v2 cgroup itself, like the v1 ones, instead of being cloned into
    /// it: `cgroup.procs` opened here, by the supervisor, written `0` by the jail.
    pub(crate) fn enter_v2_from_inside(&mut self) -> Result<(), JailError> {
        let Some(dir) = self.v2_dir.take() else { return Ok(()) };
        let fd = nix::fcntl::openat(
            dir.as_fd(),
            "cgroup.procs",
            nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| JailError::new(Step::Cgroups, format!("open the v2 cgroup's cgroup.procs: {e}")))?;
        self.v1_tasks.push((PathBuf::from("cgroup v2 cgroup.procs"), fd));
        Ok(())
    }

    /// The `tasks` files, as the supervisor hands them to the jail (see `sync::send_setup`).
    pub(super) fn for_sending(&self) -> (Vec<PathBuf>, Vec<BorrowedFd<'_>>) {
        self.v1_tasks.iter().map(|(p, f)| (p.clone(), f.as_fd())).unzip()
    }

    /// The jail's end of `for_sending`.
    pub(super) fn received(v1_tasks: Vec<(PathBuf, OwnedFd)>) -> Entry {
        Entry { v1_tasks, v2_dir: None }
    }

    /// In the jail: enters every v1 cgroup, then closes the descriptors. Must run in the
    /// single-threaded jail child (`0` moves only the calling thread).
    pub(crate) fn join_self(self) -> Result<(), JailError> {
        for (path, fd) in &self.v1_tasks {
            nix::unistd::write(fd, b"0")
                .map_err(|e| JailError::new(Step::Cgroups, format!("enter {}: {e}", path.display())))?;
        }
        Ok(())
    }
}

impl<F: CgroupFs> Drop for JailCgroup<F> {
    fn drop(&mut self) {
        self.remove();
    }
}

/// More entries than a cgroup directory holding jails plausibly has: the sweep skips a listing
/// past it rather than walk it.
const SWEEP_LISTING_MAX: usize = 1 << 20;

/// How long a jail's cgroup may stand empty before a sweep takes it for a leftover: a jail's
/// cgroup holds its init within milliseconds of being made.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Removes the cgroups killed Stockades left behind: a Stockade killed with SIGKILL takes its jail
/// with it (PDEATHSIG, and the pid namespace's end) but cannot remove the jail's cgroup.
///
/// Only cgroups that are empty and have been for a while are removed, and nothing is ever killed:
/// the pid in a cgroup's name is its owner's pid in the owner's pid namespace, which says nothing
/// about a Stockade in another namespace (a sibling container, a concurrent CI job) whose live
/// jails sit in the same hierarchy. An empty cgroup, whoever made it, holds no jail.
pub(crate) fn remove_stale(fs: &impl CgroupFs, parent: &Path) {
    let Some(names) = fs.list(parent, SWEEP_LISTING_MAX) else { return };
    for name in names {
        let Some(rest) = name.strip_prefix("stockade-") else { continue };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if owner == std::process::id() {
            continue; // this process's own jails
        }
        let path = parent.join(&name);
        let empty = fs.read(&path.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
        let old = fs.age(&path).is_some_and(|age| age >= STALE_AFTER);
        if empty && old && fs.remove_dir(&path).is_ok() {
            tracing::info!(cgroup = %path.display(), "removed an empty cgroup a killed Stockade left behind");
        }
    }
}

/// Enables a controller for the jail's cgroup in its parent's cgroup.subtree_control. A v2
/// cgroup holding processes cannot delegate controllers ("no internal processes"), so when
/// Stockade's own cgroup is such a cgroup, Stockade first moves itself into a leaf beside the jails.
fn enable_v2_controller(fs: &impl CgroupFs, jail_dir: &Path, ctrl: &str) -> Result<(), String> {
    let parent = jail_dir.parent().ok_or("cgroup has no parent")?;
    let enabled = fs.read(&parent.join("cgroup.subtree_control")).unwrap_or_default();
    if enabled.split_whitespace().any(|c| c == ctrl) {
        return Ok(());
    }
    let write = || fs.write(&parent.join("cgroup.subtree_control"), &format!("+{ctrl}"));
    match write() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = parent.join("stockade-supervisor");
            let _ = fs.create_dir(&leaf);
            fs.write(&leaf.join("cgroup.procs"), &std::process::id().to_string())
                .map_err(|e| format!("move Stockade into {}: {e}", leaf.display()))?;
            write().map_err(|e| format!("enable {ctrl} in {}: {e}", parent.display()))
        }
        Err(e) => Err(format!("enable {ctrl} in {}: {e}", parent.display())),
    }
}

/// `remove_stale` for every hierarchy this process's jails would be created in: for a long-lived
/// worker, which clears what a killed session supervisor left without waiting for the next jail.
pub(crate) fn remove_stale_all() {
    // Where the v1 hierarchies are mounted does not change while a worker runs, but the mount
    // table grows with its sessions (megabytes at 2,000 live): it is read once, not at every
    // sweep and every killed jail.
    static V1_MOUNTS: std::sync::OnceLock<Vec<(String, String, String)>> = std::sync::OnceLock::new();
    let v1 = V1_MOUNTS.get_or_init(|| mounts().into_iter().filter(|(fstype, _, _)| fstype == "cgroup").collect());
    let mut layout = Layout::detect_v2();
    layout.add_v1_from(v1);
    remove_stale_near(&layout);
}

/// `remove_stale` in the hierarchies of `layout`. A jail's start runs it once its jail is up
/// rather than before making the jail's cgroup, where it would delay the jail.
pub(crate) fn remove_stale_near(layout: &Layout) {
    remove_stale_in(&Kernel, layout);
}

fn remove_stale_in(fs: &impl CgroupFs, layout: &Layout) {
    if let (Some(m), Some(own)) = (&layout.v2_mount, &layout.v2_self) {
        remove_stale(fs, &join(m, own));
    }
    for (_, mount, own) in &layout.v1 {
        remove_stale(fs, &join(mount, own));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup left under this process's next jail name (a killed Stockade that had this pid
    /// before) is cleared and made again, then removed with the jail.
    #[test]
    fn a_leftover_of_the_same_name_is_replaced_and_then_removed() {
        if !nix::unistd::geteuid().is_root() {
            crate::util::skip_test("needs root to make cgroups");
            return;
        }
        let (policy, _) = crate::policy::load_builtin("default").unwrap();
        let mut limits = policy.limits.clone();
        (limits.memory, limits.cpu, limits.pids) = (None, None, Some(64));
        let layout = Layout::detect();
        if layout.source(Controller::Pids).is_none() {
            crate::util::skip_test("no pids controller");
            return;
        }
        let name = format!("stockade-{}-leftover-test", std::process::id());
        let dir = match layout.source(Controller::Pids) {
            Some("v2") => join(layout.v2_mount.as_ref().unwrap(), layout.v2_self.as_deref().unwrap()).join(&name),
            _ => {
                let (_, mount, own) = layout.v1.iter().find(|(n, _, _)| n == "pids").unwrap();
                join(mount, own).join(&name)
            }
        };
        std::fs::create_dir(&dir).unwrap();
        super::super::fsio::write_kernel_file(dir.join("pids.max"), "7").unwrap();
        let (cg, report) = JailCgroup::create(Kernel, &layout, &name, &limits).unwrap();
        assert_eq!(report.applied.len(), 1, "{report:?}");
        assert_eq!(read_kernel_file(dir.join("pids.max")).unwrap().trim(), "64", "the limit was not written");
        drop(cg);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
