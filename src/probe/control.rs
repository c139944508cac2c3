//! The battery's positive control (`stockade probe --control`): every probe runs outside any
//! jail, as root, in a throwaway environment arranged so that the forbidden thing each one tries
//! is there to be done, and must then report "escaped". A probe that reports "blocked" here
//! cannot see the escape it names, so its "blocked" inside a jail proves nothing.
//!
//! Nothing here may change the host. The battery process gets its own mount and UTS namespaces
//! and an anonymous session keyring; its root is a tmpfs holding decoys where the host's files
//! would be (`/etc/shadow`, `/root`, a runtime socket, a block device node on a `nodev` mount),
//! and a probe that writes or reads a procfs control file (`core_pattern`, `sysrq-trigger`,
//! `kcore`) finds only a decoy of it on a tmpfs over /proc. Each probe child then takes a mount namespace of its own, so a probe that mounts,
//! unmounts or pivots changes nothing its neighbours see; probes aimed at the init process or at
//! process accounting get a fresh pid namespace, and network probes a network namespace with the
//! address they aim at. The host-side targets (listener, abstract socket, SysV queue, /dev/shm
//! file, the harness's own pid) stay where the jail's probes look for them.

use std::ffi::CString;
use std::io::{Read, Write};
use std::path::Path;

use super::{Ctx, Outcome};

/// Why the control environment could not be arranged.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the positive control needs {0}")]
    Needs(&'static str),
    #[error("{what}: {source}")]
    Sys { what: String, source: std::io::Error },
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlError {
    let what = what.into();
    move |source| ControlError::Sys { what, source }
}

fn check(r: libc::c_int, what: &str) -> Result<(), ControlError> {
    if r < 0 {
        Err(ControlError::Sys { what: what.into(), source: std::io::Error::last_os_error() })
    } else {
        Ok(())
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("control paths have no NUL")
}

/// The limits the control pretends the policy sets, none of them enforced, so that the resource
/// probes have a bound to go past. Small, so that going past it costs little.
pub(crate) fn pretend_limits(ctx: &mut Ctx) {
    ctx.control = true;
    ctx.memory_limit = Some(64 << 20);
    ctx.tmp_size = 1 << 20;
    ctx.fsize = Some(1 << 20);
    ctx.network = "none".into();
    ctx.landlock_tcp = true;
}

/// What the control needs of the process it starts in: root of the initial user namespace
/// (capabilities, uid 0 mapped to the host's) and no no_new_privs.
pub fn prerequisites() -> Result<(), ControlError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(ControlError::Needs("root (uid 0)"));
    }
    let map = std::fs::read_to_string("/proc/self/uid_map").map_err(sys("/proc/self/uid_map"))?;
    if !map.split_whitespace().collect::<Vec<_>>().starts_with(&["0", "0", "4294967295"]) {
        return Err(ControlError::Needs("the initial user namespace (it runs in a user namespace)"));
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(sys("/proc/self/status"))?;
    if status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')) {
        return Err(ControlError::Needs("a process without no_new_privs"));
    }
    Ok(())
}

/// Turns the battery process into the control environment; returns the terminal's master side,
/// kept open and inheritable as the descriptor the leaked-fd probe must find.
pub(crate) fn arrange(ctx: &Ctx) -> Result<std::os::fd::OwnedFd, ControlError> {
    use std::os::fd::FromRawFd;
    prerequisites()?;
    // SAFETY: for the calls below, plain system calls with integer arguments or NUL-terminated
    // strings that outlive them; none touches memory the process does not own.
    unsafe {
        // add_key must land in a keyring that dies with the battery, not root's session keyring.
        check(libc::syscall(libc::SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, 0) as libc::c_int, "keyctl")?;
        check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS), "unshare(mount, uts)")?;
        check(
            libc::mount(
                std::ptr::null(),
                c("/").as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "making / private",
        )?;
    }
    // A terminal to become the controlling one, opened while the host's /dev is in view.
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on the descriptor just opened; ptsname's
    // static buffer is copied before any other call.
    let (master, slave_path) = unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        check(m, "posix_openpt")?;
        check(libc::grantpt(m), "grantpt")?;
        check(libc::unlockpt(m), "unlockpt")?;
        let p = libc::ptsname(m);
        if p.is_null() {
            return Err(ControlError::Sys { what: "ptsname".into(), source: std::io::Error::last_os_error() });
        }
        (std::os::fd::OwnedFd::from_raw_fd(m), std::ffi::CStr::from_ptr(p).to_owned())
    };
    let root = Path::new("/tmp");
    mount_tmpfs(root)?;
    decoys(root, ctx)?;
    // SAFETY: setsid and ioctl(TIOCSCTTY) on a descriptor opened here and closed at once.
    unsafe {
        check(libc::setsid(), "setsid")?;
        let s = libc::open(slave_path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        check(s, "opening the terminal")?;
        let r = libc::ioctl(s, libc::TIOCSCTTY, 0);
        libc::close(s);
        check(r, "TIOCSCTTY")?;
    }
    nix::unistd::chdir(root).map_err(|e| ControlError::Sys { what: "chdir".into(), source: e.into() })?;
    nix::unistd::pivot_root(".", ".").map_err(|e| ControlError::Sys { what: "pivot_root".into(), source: e.into() })?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| ControlError::Sys { what: "detaching the host's root".into(), source: e.into() })?;
    nix::unistd::chdir("/").map_err(|e| ControlError::Sys { what: "chdir /".into(), source: e.into() })?;
    Ok(master)
}

fn mount_tmpfs(at: &Path) -> Result<(), ControlError> {
    nix::mount::mount(
        Some("stockade-control"),
        at,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NODEV,
        Some("size=512m,mode=0755"),
    )
    .map_err(|e| ControlError::Sys { what: format!("tmpfs on {}", at.display()), source: e.into() })
}

fn bind(src: &Path, dst: &Path) -> Result<(), ControlError> {
    nix::mount::mount(Some(src), dst, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>).map_err(|e| {
        ControlError::Sys { what: format!("bind {} on {}", src.display(), dst.display()), source: e.into() }
    })
}

/// Lays out the decoy root: what each filesystem, device and /proc probe looks for.
fn decoys(root: &Path, ctx: &Ctx) -> Result<(), ControlError> {
    let write = |rel: &str, body: &[u8]| -> Result<(), ControlError> {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(sys(d.display().to_string()))?;
        }
        std::fs::write(&p, body).map_err(sys(p.display().to_string()))
    };
    for d in ["usr", "tmp", "workspace", "home", "proc", "dev/shm"] {
        std::fs::create_dir_all(root.join(d)).map_err(sys(d))?;
    }
    write("etc/shadow", b"root:!decoy:20000:0:99999:7:::\n")?;
    write("root/.profile", b"# decoy home\n")?;
    write("run/docker.sock", b"")?;
    write("sys/kernel/uevent_helper", b"")?;
    write("dev/tty", b"")?;
    // A block device node the device probe must find; the root is nodev, so it opens nothing.
    let node = c(&root.join("dev/decoy-disk").display().to_string());
    // SAFETY: mknod on a NUL-terminated path that lives for the call.
    check(unsafe { libc::mknod(node.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) }, "mknod dev/decoy-disk")?;
    bind(Path::new("/dev/tty"), &root.join("dev/tty"))?;
    bind(Path::new("/dev/shm"), &root.join("dev/shm"))?;
    if !root.join("dev/shm").join(&ctx.shm_name).exists() {
        return Err(ControlError::Needs("the harness's /dev/shm file in view"));
    }
    nix::mount::mount(Some("proc"), &root.join("proc"), Some("proc"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| ControlError::Sys { what: "mounting proc".into(), source: e.into() })?;
    // A directory of host credentials bound in, as a policy could: a mount of its own.
    std::fs::create_dir_all(root.join("srv")).map_err(sys("srv"))?;
    mount_tmpfs(&root.join("srv"))?;
    write("srv/.aws/credentials", b"[default]\naws_access_key_id = decoy\n")?;
    Ok(())
}

/// How one probe's child is arranged beyond its own mount namespace.
enum Arrangement {
    /// Nothing more: the environment already offers what the probe tries.
    None,
    /// A fresh pid namespace, with its own /proc, whose init is a waiting child, not the host's.
    PidNamespace,
    /// A fresh network namespace with this address on `lo`, and a listener on port 80 if asked.
    Network { addr: [u8; 4], listen: bool },
    /// At least this many processes in view.
    Crowd(usize),
    /// A tmpfs on /proc holding only this decoy file: the kernel's own may be absent (no sysrq
    /// support) and must not be written.
    ProcDecoy(&'static str),
}

fn arrangement(id: &str) -> Arrangement {
    match id {
        // Aimed at pid 1, which must be one of ours: the host's init may refuse even root.
        "proc-signal-init" | "fs-proc1-root" | "kcmp" | "acct" => Arrangement::PidNamespace,
        "net-route-out" => Arrangement::Network { addr: [192, 0, 2, 1], listen: false },
        "net-metadata" => Arrangement::Network { addr: [169, 254, 169, 254], listen: true },
        "proc-pid-view" => Arrangement::Crowd(65),
        "fs-proc-sys-write" => Arrangement::ProcDecoy("sys/kernel/core_pattern"),
        "fs-sysrq" => Arrangement::ProcDecoy("sysrq-trigger"),
        "fs-kcore" => Arrangement::ProcDecoy("kcore"),
        _ => Arrangement::None,
    }
}

/// Runs probe `id` in its arranged child (called in the battery's forked child).
pub(crate) fn run(id: &str, ctx: &Ctx) -> Outcome {
    // SAFETY: unshare with an integer flag, in the probe's own single-threaded child.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Outcome::Error(format!("unshare(mount): {}", std::io::Error::last_os_error()));
    }
    match arrangement(id) {
        Arrangement::None => super::run_one(id, ctx),
        Arrangement::Crowd(n) => {
            let seen = std::fs::read_dir("/proc")
                .map(|r| {
                    r.flatten()
                        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
                        .count()
                })
                .unwrap_or(0);
            if seen < n {
                if let Err((_, e)) = super::checks::fork_children(n - seen, 1) {
                    return Outcome::Error(format!("fork: {}", super::errno_name(e)));
                }
            }
            super::run_one(id, ctx)
        }
        Arrangement::Network { addr, listen } => match network(addr, listen) {
            Ok(_listener) => super::run_one(id, ctx),
            Err(e) => Outcome::Error(e),
        },
        Arrangement::PidNamespace => in_pid_namespace(id, ctx),
        Arrangement::ProcDecoy(rel) => {
            let proc = Path::new("/proc");
            let made = mount_tmpfs(proc).map_err(|e| e.to_string()).and_then(|()| {
                let p = proc.join(rel);
                std::fs::create_dir_all(p.parent().unwrap_or(proc))
                    .and_then(|()| std::fs::write(&p, b"decoy\n"))
                    .map_err(|e| format!("{}: {e}", p.display()))
            });
            match made {
                Ok(()) => super::run_one(id, ctx),
                Err(e) => Outcome::Error(e),
            }
        }
    }
}

fn network(addr: [u8; 4], listen: bool) -> Result<Option<std::net::TcpListener>, String> {
    // SAFETY: unshare with an integer flag, in the probe's own single-threaded child.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare(net): {}", std::io::Error::last_os_error()));
    }
    let ip = std::net::Ipv4Addr::from(addr);
    let mut rt = crate::net::rtnl::Rtnl::open().map_err(|e| e.to_string())?;
    rt.set_up("lo").map_err(|e| e.to_string())?;
    rt.add_addr4("lo", ip, 32).map_err(|e| e.to_string())?;
    if listen {
        return std::net::TcpListener::bind((ip, 80)).map(Some).map_err(|e| format!("listen on {ip}:80: {e}"));
    }
    Ok(None)
}

/// The probe in the second child of a fresh pid namespace, whose first child (its init) only
/// waits for it. The init is killed afterwards: a probe that attached to it may leave it stopped.
fn in_pid_namespace(id: &str, ctx: &Ctx) -> Outcome {
    let (r, w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return Outcome::Error(format!("pipe: {e}")),
    };
    // SAFETY: unshare with an integer flag; the next fork's child is the namespace's init.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Outcome::Error(format!("unshare(pid): {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the probe child is single-threaded; both forked children leave with _exit.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Outcome::Error(format!("fork: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(r);
            // SAFETY: as above; the grandchild runs the probe and reports through the pipe.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => {
                    // SAFETY: alarm takes an integer; a fork does not pass the caller's alarm on.
                    unsafe { libc::alarm(super::PROBE_SECS) };
                    let proc = nix::mount::mount(
                        Some("proc"),
                        "/proc",
                        Some("proc"),
                        nix::mount::MsFlags::empty(),
                        None::<&str>,
                    );
                    let o = match proc {
                        Ok(()) => super::run_one(id, ctx),
                        Err(e) => Outcome::Error(format!("mounting the namespace's /proc: {e}")),
                    };
                    let mut f = std::fs::File::from(w);
                    let _ = f.write_all(serde_json::to_string(&o).expect("serialises").as_bytes());
                    drop(f);
                    // SAFETY: leave the forked child without running destructors.
                    unsafe { libc::_exit(0) }
                }
                Ok(nix::unistd::ForkResult::Parent { child }) => {
                    drop(w);
                    let _ = nix::sys::wait::waitpid(child, None);
                    // SAFETY: as above.
                    unsafe { libc::_exit(0) }
                }
                // SAFETY: as above.
                Err(_) => unsafe { libc::_exit(1) },
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(w);
            let mut buf = Vec::new();
            let _ = std::fs::File::from(r).read_to_end(&mut buf);
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            serde_json::from_slice(&buf).unwrap_or_else(|_| Outcome::Error("no report from the pid namespace".into()))
        }
    }
}

/// Every probe of the catalogue has an arrangement here (the table above names the special
/// ones; the rest need only the environment), so a new probe is controlled by default and
/// must report "escaped" under `--control` like the others.
#[cfg(test)]
mod tests {
    #[test]
    fn special_arrangements_name_real_probes() {
        let ids: Vec<&str> = super::super::catalogue().iter().map(|(i, _, _)| *i).collect();
        for id in [
            "proc-signal-init",
            "fs-proc1-root",
            "kcmp",
            "acct",
            "net-route-out",
            "net-metadata",
            "proc-pid-view",
            "fs-proc-sys-write",
            "fs-sysrq",
            "fs-kcore",
        ] {
            assert!(ids.contains(&id), "{id} is not in the catalogue");
            assert!(!matches!(super::arrangement(id), super::Arrangement::None), "{id}");
        }
    }
}
