//! A host's cgroup file systems, faked in a plain directory for tests: laid out as a pure
//! cgroup v2 host (systemd's, Stockade in a service cgroup that holds it) or as a hybrid one (v1
//! memory, pids and cpu,cpuacct hierarchies beside an empty v2 one), with the kernel's rules the
//! cgroup code relies on. This host is hybrid; most are pure v2; both run here.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fs::CgroupFs;

/// Which hierarchy a directory is in.
#[derive(Debug, Clone, PartialEq)]
enum Hierarchy {
    V2 { mount: PathBuf },
    V1 { mount: PathBuf, controllers: Vec<String> },
}

#[derive(Debug)]
pub(super) struct FakeHost {
    root: PathBuf,
    hierarchies: Vec<Hierarchy>,
    pub mountinfo: String,
    /// What `/proc/self/cgroup` says on this host.
    pub own: String,
}

/// EBUSY, the kernel's answer to a removal or delegation the cgroup rules forbid.
fn busy() -> io::Error {
    io::Error::from_raw_os_error(libc::EBUSY)
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

impl FakeHost {
    fn new(tag: &str) -> FakeHost {
        let root = std::env::temp_dir().join(format!(
            "stockade-fake-cgroups-{tag}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&root).unwrap();
        FakeHost { root, hierarchies: Vec::new(), mountinfo: String::new(), own: String::new() }
    }

    pub(super) fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    fn mount_v2(&mut self, at: &str, controllers: &str) -> PathBuf {
        let m = self.path(at);
        std::fs::create_dir_all(&m).unwrap();
        for (f, v) in [("cgroup.procs", ""), ("cgroup.controllers", controllers), ("cgroup.subtree_control", "")] {
            std::fs::write(m.join(f), v).unwrap();
        }
        self.mountinfo += &format!(
            "35 25 0:30 / {} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n",
            m.display()
        );
        self.hierarchies.push(Hierarchy::V2 { mount: m.clone() });
        m
    }

    fn mount_v1(&mut self, at: &str, controllers: &[&str]) -> PathBuf {
        let m = self.path(at);
        std::fs::create_dir_all(&m).unwrap();
        let controllers: Vec<String> = controllers.iter().map(|c| c.to_string()).collect();
        for f in ["cgroup.procs", "tasks"] {
            std::fs::write(m.join(f), "").unwrap();
        }
        self.mountinfo += &format!(
            "40 25 0:35 / {} rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,{}\n",
            m.display(),
            controllers.join(",")
        );
        self.hierarchies.push(Hierarchy::V1 { mount: m.clone(), controllers });
        m
    }

    /// systemd on a pure v2 host: Stockade runs in `system.slice/stockade.service`, which holds
    /// it, and has `delegated` (space-separated) delegated to it.
    pub(super) fn pure_v2(delegated: &str) -> FakeHost {
        let mut h = FakeHost::new("v2");
        let m = h.mount_v2("sys/fs/cgroup", "cpuset cpu io memory hugetlb pids rdma misc");
        h.write(&m.join("cgroup.subtree_control"), "+cpu +memory +pids +io").unwrap();
        h.create_dir(&m.join("system.slice")).unwrap();
        let plus: Vec<String> = delegated.split_whitespace().map(|c| format!("+{c}")).collect();
        h.write(&m.join("system.slice/cgroup.subtree_control"), &plus.join(" ")).unwrap();
        h.create_dir(&m.join("system.slice/stockade.service")).unwrap();
        h.write(&m.join("system.slice/stockade.service/cgroup.procs"), &std::process::id().to_string()).unwrap();
        h.own = "0::/system.slice/stockade.service\n".into();
        h
    }

    /// A hybrid host (this VM's shape): the controllers in v1 hierarchies, an empty v2 one.
    pub(super) fn hybrid() -> FakeHost {
        let mut h = FakeHost::new("hybrid");
        h.mount_v2("sys/fs/cgroup/unified", "");
        let own = "/user.slice/session-1.scope";
        for (at, ctrls) in [
            ("sys/fs/cgroup/memory", &["memory"][..]),
            ("sys/fs/cgroup/pids", &["pids"]),
            ("sys/fs/cgroup/cpu,cpuacct", &["cpu", "cpuacct"]),
        ] {
            let m = h.mount_v1(at, ctrls);
            h.create_dir(&m.join("user.slice")).unwrap();
            h.create_dir(&m.join("user.slice/session-1.scope")).unwrap();
            h.write(&m.join("user.slice/session-1.scope/cgroup.procs"), &std::process::id().to_string()).unwrap();
        }
        h.create_dir(&h.path("sys/fs/cgroup/unified/user.slice")).unwrap();
        h.create_dir(&h.path("sys/fs/cgroup/unified/user.slice/session-1.scope")).unwrap();
        h.own = format!("12:pids:{own}\n5:memory:{own}\n3:cpu,cpuacct:{own}\n1:name=systemd:{own}\n0::{own}\n");
        h
    }

    fn hierarchy(&self, p: &Path) -> Hierarchy {
        self.hierarchies
            .iter()
            .filter(|h| match h {
                Hierarchy::V2 { mount } | Hierarchy::V1 { mount, .. } => p.starts_with(mount),
            })
            .max_by_key(|h| match h {
                Hierarchy::V2 { mount } | Hierarchy::V1 { mount, .. } => mount.components().count(),
            })
            .unwrap_or_else(|| panic!("{} is in no fake hierarchy", p.display()))
            .clone()
    }

    fn is_mount(&self, d: &Path) -> bool {
        matches!(self.hierarchy(d), Hierarchy::V2 { mount } | Hierarchy::V1 { mount, .. } if mount == d)
    }

    fn interface_files(controller: &str, v2: bool) -> &'static [(&'static str, &'static str)] {
        match (controller, v2) {
            ("memory", true) => &[("memory.max", "max"), ("memory.swap.max", "max")],
            ("pids", true) => &[("pids.max", "max")],
            ("cpu", true) => &[("cpu.max", "max 100000")],
            // No memory.memsw.*: swap accounting off, as on many hosts.
            ("memory", false) => &[("memory.limit_in_bytes", "9223372036854771712")],
            ("pids", false) => &[("pids.max", "max")],
            ("cpu", false) => &[("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "-1")],
            _ => &[],
        }
    }

    fn subdirs(d: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(d).map(|r| r.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()).unwrap_or_default()
    }

    /// Every directory of a hierarchy, the mount included.
    fn all_cgroups(d: &Path) -> Vec<PathBuf> {
        let mut out = vec![d.to_path_buf()];
        let mut i = 0;
        while i < out.len() {
            out.extend(Self::subdirs(&out[i].clone()));
            i += 1;
        }
        out
    }

    fn procs(d: &Path) -> Vec<String> {
        words(&std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default())
    }

    /// Moves `pid` into `d`, out of every other cgroup of its hierarchy.
    fn migrate(&self, d: &Path, pid: &str) -> io::Result<()> {
        let mount = match self.hierarchy(d) {
            Hierarchy::V2 { mount } => {
                let delegating = !words(&std::fs::read_to_string(d.join("cgroup.subtree_control"))?).is_empty();
                if delegating && !self.is_mount(d) {
                    return Err(busy());
                }
                mount
            }
            Hierarchy::V1 { mount, .. } => mount,
        };
        for c in Self::all_cgroups(&mount) {
            let left: Vec<String> = Self::procs(&c).into_iter().filter(|p| p != pid).collect();
            std::fs::write(c.join("cgroup.procs"), left.join("\n"))?;
        }
        let mut now = Self::procs(d);
        now.push(pid.to_owned());
        std::fs::write(d.join("cgroup.procs"), now.join("\n"))
    }

    fn subtree_control(&self, d: &Path, v: &str) -> io::Result<()> {
        let available = words(&std::fs::read_to_string(d.join("cgroup.controllers"))?);
        let mut enabled = words(&std::fs::read_to_string(d.join("cgroup.subtree_control"))?);
        if !Self::procs(d).is_empty() && !self.is_mount(d) {
            return Err(busy());
        }
        for tok in v.split_whitespace() {
            let (on, c) = tok.split_at(1);
            if !available.iter().any(|a| a == c) {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            match on {
                "+" if !enabled.iter().any(|e| e == c) => enabled.push(c.to_owned()),
                "-" => enabled.retain(|e| e != c),
                _ => {}
            }
        }
        std::fs::write(d.join("cgroup.subtree_control"), enabled.join(" "))?;
        // The children gain the controller and its interface files.
        for child in Self::subdirs(d) {
            std::fs::write(child.join("cgroup.controllers"), enabled.join(" "))?;
            for c in &enabled {
                for (f, init) in Self::interface_files(c, true) {
                    if !child.join(f).exists() {
                        std::fs::write(child.join(f), init)?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl CgroupFs for FakeHost {
    fn create_dir(&self, d: &Path) -> io::Result<()> {
        std::fs::create_dir(d)?;
        let mut files: Vec<(&str, String)> = vec![("cgroup.procs", String::new())];
        match self.hierarchy(d) {
            Hierarchy::V2 { .. } => {
                let parent = d.parent().expect("below a mount");
                let controllers = std::fs::read_to_string(parent.join("cgroup.subtree_control"))?;
                for c in words(&controllers) {
                    files.extend(Self::interface_files(&c, true).iter().map(|(f, v)| (*f, v.to_string())));
                }
                files.extend([
                    ("cgroup.controllers", controllers),
                    ("cgroup.subtree_control", String::new()),
                    ("cgroup.kill", String::new()),
                ]);
            }
            Hierarchy::V1 { controllers, .. } => {
                files.push(("tasks", String::new()));
                for c in &controllers {
                    files.extend(Self::interface_files(c, false).iter().map(|(f, v)| (*f, v.to_string())));
                }
            }
        }
        for (f, v) in files {
            std::fs::write(d.join(f), v)?;
        }
        Ok(())
    }

    fn remove_dir(&self, d: &Path) -> io::Result<()> {
        if !d.exists() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        if !Self::subdirs(d).is_empty() || !Self::procs(d).is_empty() {
            return Err(busy());
        }
        std::fs::remove_dir_all(d)
    }

    fn read(&self, f: &Path) -> io::Result<String> {
        std::fs::read_to_string(f)
    }

    fn write(&self, f: &Path, v: &str) -> io::Result<()> {
        if !f.is_file() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let d = f.parent().expect("a file in a cgroup");
        match f.file_name().and_then(|n| n.to_str()) {
            Some("cgroup.subtree_control") => self.subtree_control(d, v),
            Some("cgroup.procs" | "tasks") => self.migrate(d, v.trim()),
            Some("cgroup.kill") => {
                for c in Self::all_cgroups(d) {
                    std::fs::write(c.join("cgroup.procs"), "")?;
                }
                Ok(())
            }
            _ => std::fs::write(f, v),
        }
    }

    fn kill_all(&self, d: &Path) {
        for c in Self::all_cgroups(d) {
            let _ = std::fs::write(c.join("cgroup.procs"), "");
        }
    }

    fn list(&self, d: &Path, limit: usize) -> Option<Vec<String>> {
        let v: Vec<String> =
            std::fs::read_dir(d).ok()?.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        (v.len() <= limit).then_some(v)
    }

    fn age(&self, d: &Path) -> Option<Duration> {
        std::fs::metadata(d).and_then(|m| m.modified()).ok()?.elapsed().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{remove_stale, JailCgroup, Layout};
    use super::*;
    use crate::policy::{Enforcement, Limits};

    fn limits(memory: Option<u64>, pids: Option<u64>, cpu: Option<f64>) -> Limits {
        let (policy, _) = crate::policy::load_builtin("default").unwrap();
        let mut l = policy.limits.clone();
        l.memory = memory.map(crate::policy::Size);
        (l.pids, l.cpu) = (pids, cpu);
        l
    }

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn a_pure_v2_host_gets_its_limits_through_delegation_and_loses_the_cgroup_after() {
        let host = FakeHost::pure_v2("cpu memory pids");
        let layout = Layout::from_view(&host.mountinfo, &host.own, &host);
        assert_eq!(layout.v2_mount, Some(host.path("sys/fs/cgroup")));
        assert_eq!(layout.v2_self.as_deref(), Some("/system.slice/stockade.service"));
        assert!(layout.v1.is_empty());
        let (cg, report) =
            JailCgroup::create(&host, &layout, "stockade-1-0", &limits(Some(512 << 20), Some(100), Some(0.5))).unwrap();
        let cg = cg.expect("a cgroup");
        assert_eq!(report.applied, ["memory 512M (v2)", "pids 100 (v2)", "cpu 0.5 (v2)"], "{report:?}");
        let service = host.path("sys/fs/cgroup/system.slice/stockade.service");
        let jail = service.join("stockade-1-0");
        assert_eq!(read(jail.join("memory.max")), (512u64 << 20).to_string());
        assert_eq!(read(jail.join("memory.swap.max")), "0");
        assert_eq!(read(jail.join("pids.max")), "100");
        assert_eq!(read(jail.join("cpu.max")), "50000 100000");
        // The service cgroup held Stockade, so it could not delegate until Stockade moved into a
        // leaf beside the jails.
        assert_eq!(words(&read(service.join("cgroup.subtree_control"))), ["memory", "pids", "cpu"]);
        assert_eq!(read(service.join("stockade-supervisor/cgroup.procs")), std::process::id().to_string());
        assert_eq!(read(service.join("cgroup.procs")), "");
        // The jail's processes, then its end: killed, and the cgroup gone.
        host.write(&jail.join("cgroup.procs"), "4242").unwrap();
        drop(cg);
        assert!(!jail.exists(), "the jail's cgroup outlived it");
    }

    #[test]
    fn a_v2_controller_not_delegated_refuses_the_jail_and_best_effort_says_what_it_dropped() {
        let host = FakeHost::pure_v2("pids");
        let layout = Layout::from_view(&host.mountinfo, &host.own, &host);
        assert_eq!(layout.source(super::super::Controller::Memory), None);
        let service = host.path("sys/fs/cgroup/system.slice/stockade.service");
        let wanted = limits(Some(256 << 20), Some(64), None);
        let e = JailCgroup::create(&host, &layout, "stockade-1-0", &wanted).unwrap_err();
        assert!(e.msg.contains("no memory controller"), "{}", e.msg);
        assert!(e.msg.contains("best_effort"), "{}", e.msg);
        assert!(!service.join("stockade-1-0").exists(), "a refused jail left its cgroup");
        let mut best = wanted.clone();
        best.enforcement = Enforcement::BestEffort;
        let (cg, report) = JailCgroup::create(&host, &layout, "stockade-1-1", &best).unwrap();
        assert_eq!(report.applied, ["pids 64 (v2)"], "{report:?}");
        assert_eq!(report.skipped.len(), 1, "{report:?}");
        assert!(report.skipped[0].contains("memory"), "{report:?}");
        assert_eq!(read(service.join("stockade-1-1/pids.max")), "64");
        drop(cg);
        assert!(!service.join("stockade-1-1").exists());
    }

    #[test]
    fn a_hybrid_host_gets_its_limits_from_the_v1_hierarchies() {
        let host = FakeHost::hybrid();
        let layout = Layout::from_view(&host.mountinfo, &host.own, &host);
        assert_eq!(layout.v2_mount, Some(host.path("sys/fs/cgroup/unified")));
        assert!(layout.v2_controllers.is_empty());
        assert_eq!(layout.v1.len(), 3, "{layout:?}");
        let (cg, report) =
            JailCgroup::create(&host, &layout, "stockade-1-0", &limits(Some(1 << 30), Some(50), Some(2.0))).unwrap();
        assert_eq!(report.applied, ["memory 1G (v1)", "pids 50 (v1)", "cpu 2 (v1)"], "{report:?}");
        let at = |h: &str| host.path(&format!("sys/fs/cgroup/{h}/user.slice/session-1.scope/stockade-1-0"));
        assert_eq!(read(at("memory").join("memory.limit_in_bytes")), (1u64 << 30).to_string());
        assert_eq!(read(at("pids").join("pids.max")), "50");
        assert_eq!(read(at("cpu,cpuacct").join("cpu.cfs_quota_us")), "200000");
        assert_eq!(read(at("cpu,cpuacct").join("cpu.cfs_period_us")), "100000");
        // Nothing in the empty v2 hierarchy.
        assert!(!host.path("sys/fs/cgroup/unified/user.slice/session-1.scope/stockade-1-0").exists());
        drop(cg);
        for h in ["memory", "pids", "cpu,cpuacct"] {
            assert!(!at(h).exists(), "{h}");
        }
    }

    #[test]
    fn the_sweep_takes_only_old_empty_cgroups_of_other_stockades() {
        for host in [FakeHost::pure_v2("cpu memory pids"), FakeHost::hybrid()] {
            let layout = Layout::from_view(&host.mountinfo, &host.own, &host);
            let parent = match &layout.v1.iter().find(|(c, _, _)| c == "pids") {
                Some((_, m, own)) => m.join(own.trim_start_matches('/')),
                None => {
                    layout.v2_mount.clone().unwrap().join(layout.v2_self.as_deref().unwrap().trim_start_matches('/'))
                }
            };
            let other = std::process::id() + 1;
            let own = std::process::id();
            let names = [
                format!("stockade-{other}-0"),
                format!("stockade-{other}-1"),
                format!("stockade-{own}-0"),
                format!("stockade-{other}-2"),
                "unrelated".to_owned(),
            ];
            for n in &names {
                host.create_dir(&parent.join(n)).unwrap();
            }
            host.write(&parent.join(&names[1]).join("cgroup.procs"), "777").unwrap();
            let old = std::time::SystemTime::now() - Duration::from_secs(10);
            for n in [&names[0], &names[1], &names[2], &names[4]] {
                std::fs::File::open(parent.join(n)).unwrap().set_modified(old).unwrap();
            }
            remove_stale(&host, &parent);
            let left: Vec<bool> = names.iter().map(|n| parent.join(n).exists()).collect();
            // Only the old, empty one of another Stockade goes: not one holding a process, not
            // this process's own, not a fresh one, not a stranger's.
            assert_eq!(left, [false, true, true, true, true], "{}", parent.display());
        }
    }
}
