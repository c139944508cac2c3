//! `stockade check`: what this host can enforce, probed rather than guessed.

use serde::Serialize;

use super::cgroups::{Controller, Layout};
use super::landlock;

#[derive(Debug, Serialize)]
pub struct Item {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// The host id slots jails take (as root, from the default `user.host_id_base`), and the ones
/// skipped because the host gave those ids out already.
fn id_ranges(base: u32) -> Item {
    match super::idpool::reserved() {
        Err(e) => Item { name: "host id ranges", ok: false, detail: e.to_string() },
        Ok(reserved) => {
            let skipped = super::idpool::skipped(base, &reserved);
            let mut detail = format!("jail ranges from {base} in steps of 65536");
            if skipped.is_empty() {
                detail.push_str(", none over ids the host gave out");
            } else {
                let mut sources: Vec<&str> = skipped.iter().map(|(_, r)| r.source.as_str()).collect();
                sources.dedup();
                let shown = sources.iter().take(4).copied().collect::<Vec<_>>().join(", ");
                let more = if sources.len() > 4 { format!(" and {} more", sources.len() - 4) } else { String::new() };
                detail.push_str(&format!("; {} skipped over {shown}{more}", skipped.len()));
            }
            Item { name: "host id ranges", ok: true, detail }
        }
    }
}

pub fn run() -> Vec<Item> {
    let mut items = Vec::new();
    let uname = nix::sys::utsname::uname().ok();
    items.push(Item {
        name: "kernel",
        ok: true,
        detail: uname
            .map(|u| {
                format!(
                    "{} {} {}",
                    u.sysname().to_string_lossy(),
                    u.release().to_string_lossy(),
                    u.machine().to_string_lossy()
                )
            })
            .unwrap_or_default(),
    });
    let root = nix::unistd::geteuid().is_root();
    items.push(Item {
        name: "privileges",
        ok: true,
        detail: if root {
            "host root: jail ids map to an unprivileged host range; all network modes".into()
        } else {
            "unprivileged (rootless): the jail user maps to the invoking user; network none/loopback".into()
        },
    });
    if root {
        items.push(id_ranges(100_000));
    }
    let userns = probe_userns();
    items.push(Item { name: "user namespaces", ok: userns.is_ok(), detail: userns.unwrap_or_else(|e| e) });
    let abi = landlock::kernel_abi();
    items.push(Item {
        name: "landlock",
        ok: abi >= landlock::TARGET_ABI,
        detail: if abi == 0 {
            "unavailable (not built or not enabled at boot: add `landlock` to the lsm= boot parameter)".into()
        } else {
            format!(
                "ABI {abi} (Stockade asks for {}{})",
                landlock::TARGET_ABI,
                if abi >= landlock::TARGET_ABI { "" } else { "; hard policies will refuse to run" }
            )
        },
    });
    let seccomp_actions = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    items.push(Item {
        name: "seccomp",
        ok: seccomp_actions.contains("errno") && seccomp_actions.contains("kill_process"),
        detail: if seccomp_actions.is_empty() {
            "unavailable".into()
        } else {
            format!("filter actions: {}", seccomp_actions.trim())
        },
    });
    let layout = Layout::detect();
    items.push(Item {
        name: "cgroup v2",
        ok: layout.v2_mount.is_some(),
        detail: match &layout.v2_mount {
            Some(m) => format!(
                "{} (controllers for Stockade's cgroup: {})",
                m.display(),
                if layout.v2_controllers.is_empty() { "none".into() } else { layout.v2_controllers.join(" ") }
            ),
            None => "not mounted".into(),
        },
    });
    for (c, name) in
        [(Controller::Memory, "cgroup memory"), (Controller::Pids, "cgroup pids"), (Controller::Cpu, "cgroup cpu")]
    {
        let detail = match (layout.source(c), try_controller(&layout, c)) {
            (Some(v), Ok(())) => Ok(format!("from cgroup {v}: a jail's cgroup was made and removed")),
            (None, _) => Err("no such controller on this host".to_owned()),
            (Some(_), Err(e)) => Err(e),
        };
        let ok = detail.is_ok();
        let detail = detail.unwrap_or_else(|e| {
            format!("{e}: policies with this limit need limits.enforcement = \"best_effort\" (the rootless built-in)")
        });
        items.push(Item { name, ok, detail });
    }
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"].iter().find(|p| std::path::Path::new(p).exists());
    items.push(Item {
        name: "nftables",
        ok: nft.is_some(),
        detail: nft
            .map(|p| format!("{p} (needed for network mode veth)"))
            .unwrap_or_else(|| "nft not found (needed for network mode veth only)".into()),
    });
    let disk = super::disk::can_provision("limits.workspace_size", crate::policy::MIN_DISK_SIZE);
    items.push(Item {
        name: "disk limits",
        ok: disk.is_ok(),
        detail: match disk {
            Ok(()) => "loop devices and mkfs.ext4: a worker can give each session filesystems of the policy's \
                       workspace_size and outputs_size"
                .into(),
            Err(super::disk::DiskError::Refused { msg, .. }) => {
                format!("{msg}; a worker needs limits.workspace_size and outputs_size = \"none\"")
            }
            Err(e) => e.to_string(),
        },
    });
    items
}

/// Makes and removes the cgroup a jail would get for one controller's limit, as this process: the
/// controller being on the host says nothing of whether this user may use it.
fn try_controller(layout: &Layout, c: Controller) -> Result<(), String> {
    let mut limits = crate::policy::load_builtin("default").map_err(|e| e.to_string())?.0.limits;
    limits.memory = (c == Controller::Memory).then_some(crate::policy::Size(256 << 20));
    limits.pids = (c == Controller::Pids).then_some(64);
    limits.cpu = (c == Controller::Cpu).then_some(1.0);
    limits.enforcement = crate::policy::Enforcement::Hard;
    let name = format!("stockade-check-{}", std::process::id());
    match super::cgroups::JailCgroup::create(super::cgroups::Kernel, layout, &name, &limits) {
        Ok((Some(mut cg), _)) => {
            cg.remove();
            Ok(())
        }
        Ok((None, _)) => Ok(()),
        Err(e) => Err(e.msg.trim_end_matches(" (set limits.enforcement = \"best_effort\" to run without)").to_owned()),
    }
}

/// Forks a child that creates a user namespace, the way a jail would.
fn probe_userns() -> Result<String, String> {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    // SAFETY: fork in a process that may be multi-threaded; the child only calls the
    // async-signal-safe unshare(2) and _exit(2).
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // SAFETY: unshare and _exit are async-signal-safe.
            let r = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
            // SAFETY: see above.
            unsafe { libc::_exit(if r == 0 { 0 } else { 1 }) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => match nix::sys::wait::waitpid(child, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(format!("available (max_user_namespaces {})", max.trim())),
            _ => Err("unshare(CLONE_NEWUSER) failed: enable user namespaces (user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor userns restrictions)".into()),
        },
        Err(e) => Err(format!("fork: {e}")),
    }
}
