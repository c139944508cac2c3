//! Step 1: a child in new user, mount, pid, ipc, uts and net namespaces, and its uid/gid maps.
//!
//! The cgroup namespace is entered later, by the child itself, once the supervisor has moved it
//! into the jail's cgroup, so that the jail's cgroup becomes the root of its view.

use nix::sched::CloneFlags;
use nix::unistd::{Pid, Uid};
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::error::{JailError, Step, StepExt};
use super::fsio::write_kernel_file;
use crate::policy::User;

pub(crate) const JAIL_NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWUSER
    .union(CloneFlags::CLONE_NEWNS)
    .union(CloneFlags::CLONE_NEWPID)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWNET);

/// Forks into new namespaces (`JAIL_NAMESPACES`).
/// Returns `None` in the child, `Some(pid)` in the parent.
///
/// Must be called from a single-threaded process: the child continues with a copy of the
/// parent's memory and may allocate, which is only sound when no other thread could have held
/// an allocator or stdio lock at the moment of the fork.
///
/// With `cgroup` (a cgroup v2 directory) the child is created inside that cgroup
/// (`clone3` with `CLONE_INTO_CGROUP`), so it never has to be migrated there.
pub(crate) fn fork_into_namespaces(cgroup: Option<BorrowedFd>, owner: Option<u32>) -> Result<Option<Pid>, JailError> {
    ensure_single_threaded()?;
    let namespaces = JAIL_NAMESPACES;
    let names = "NEWUSER|NEWNS|NEWPID|NEWIPC|NEWUTS|NEWNET";
    // The new user namespace's owner is the creator's effective uid: the kernel charges the
    // jail's per-user counts up to that uid (see `idpool`), so not to root. Only the effective
    // uid changes, and only around the clone; the real and saved uids stay 0 to come back.
    // A credential change clears this process's own parent-death signal (a worker's session
    // process has one): it is read here and armed again after the clone.
    let mut pdeath: libc::c_int = 0;
    let ppid = nix::unistd::getppid();
    if let Some(uid) = owner {
        // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which is valid.
        unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut pdeath as *mut libc::c_int) };
        nix::unistd::setresuid(Uid::from_raw(u32::MAX), Uid::from_raw(uid), Uid::from_raw(u32::MAX))
            .map_err(|e| JailError::new(Step::Namespaces, format!("seteuid({uid}) for the user namespace: {e}")))?;
    }
    let ret = match cgroup {
        None => {
            let flags = namespaces.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
            // SAFETY: raw clone(2) without CLONE_VM behaves like fork(2): the child gets a
            // private copy of the address space and returns 0 on a valid stack. The process is
            // single-threaded (checked above), so no lock can be held across the fork.
            unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) }
        }
        Some(fd) => {
            let args = CloneArgs {
                flags: namespaces.bits() as u64 | CLONE_INTO_CGROUP,
                exit_signal: libc::SIGCHLD as u64,
                cgroup: fd.as_raw_fd() as u64,
                ..CloneArgs::default()
            };
            // SAFETY: as above, clone3 without CLONE_VM and without a stack is a fork; `args`
            // is a valid clone_args of the size passed, and the cgroup fd is open.
            unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) }
        }
    };
    let clone_err = std::io::Error::last_os_error();
    if ret != 0 && owner.is_some() {
        // The supervisor (and a failed clone's caller) is root again; the child keeps the uid.
        if let Err(e) = nix::unistd::setresuid(Uid::from_raw(u32::MAX), Uid::from_raw(0), Uid::from_raw(u32::MAX)) {
            return Err(JailError::new(Step::Namespaces, format!("seteuid(0) after the clone: {e}")));
        }
        if pdeath != 0 {
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, pdeath as libc::c_ulong, 0, 0, 0) };
            // The parent may have died while the signal was unset: deliver it now.
            if nix::unistd::getppid() != ppid {
                // SAFETY: raise(3) with a signal number this process was asked to receive.
                unsafe { libc::raise(pdeath) };
            }
        }
    }
    match ret {
        -1 => {
            let err = clone_err;
            Err(match cgroup {
                Some(_) => JailError::new(Step::Namespaces, format!("clone3({names}, INTO_CGROUP): {err}")),
                None => JailError::new(
                    Step::Namespaces,
                    format!("clone({names}): {err} (are user namespaces enabled? see `stockade check`)"),
                ),
            })
        }
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
    }
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

fn ensure_single_threaded() -> Result<(), JailError> {
    use nix::{fcntl::OFlag, sys::stat::Mode};
    let count = || {
        super::fsio::open("/proc/self/task", OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
            .ok()
            .and_then(|dir| super::fsio::list_dir(&dir, 4096))
            .map_or(1, |tasks| tasks.len())
    };
    let mut n = count();
    // A thread that was just joined (a previous jail's cgroup writers or network threads) can
    // stay listed for a moment while the kernel finishes its exit.
    for _ in 0..50 {
        if n == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        n = count();
    }
    if n != 1 {
        return Err(JailError::new(
            Step::Namespaces,
            format!("a jail must be built from a single-threaded process ({n} threads running)"),
        ));
    }
    Ok(())
}

/// How jail ids map to host ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdMapping {
    /// Stockade runs as host root: jail ids 0..65536 map to host_base.. (never host 0).
    Range { host_base: u32 },
    /// Stockade runs unprivileged: the jail user is the invoking user; nothing else is mapped.
    Single { jail_uid: u32, jail_gid: u32, host_uid: u32, host_gid: u32 },
}

impl IdMapping {
    pub(crate) fn for_host(user: &User) -> Self {
        let euid = nix::unistd::geteuid().as_raw();
        if euid == 0 {
            IdMapping::Range { host_base: user.host_id_base }
        } else {
            IdMapping::Single {
                jail_uid: user.uid,
                jail_gid: user.gid,
                host_uid: euid,
                host_gid: nix::unistd::getegid().as_raw(),
            }
        }
    }

    /// The host uid/gid the jailed command runs as.
    pub(crate) fn host_ids(&self, user: &User) -> (u32, u32) {
        match *self {
            IdMapping::Range { host_base } => (host_base + user.uid, host_base + user.gid),
            IdMapping::Single { host_uid, host_gid, .. } => (host_uid, host_gid),
        }
    }

    /// The id the jail's setup runs as inside (before dropping to the jail user): 0 where it is
    /// mapped, so setup creates root-owned files; otherwise the jail user itself.
    pub(crate) fn setup_ids(&self) -> Option<(u32, u32)> {
        match *self {
            IdMapping::Range { .. } => Some((0, 0)),
            IdMapping::Single { .. } => None,
        }
    }

    /// Writes the child's maps. Runs in the supervisor.
    pub(crate) fn write(&self, child: Pid) -> Result<(), JailError> {
        let (uid_map, gid_map, deny_setgroups) = match *self {
            IdMapping::Range { host_base } => {
                if host_base == 0 {
                    return Err(JailError::new(Step::IdMap, "refusing to map jail ids onto host root"));
                }
                let line = format!("0 {host_base} 65536\n");
                (line.clone(), line, false)
            }
            IdMapping::Single { jail_uid, jail_gid, host_uid, host_gid } => {
                let mut u = String::new();
                let mut g = String::new();
                let _ = writeln!(u, "{jail_uid} {host_uid} 1");
                let _ = writeln!(g, "{jail_gid} {host_gid} 1");
                // An unprivileged writer may map its gid only after giving up setgroups(2).
                (u, g, true)
            }
        };
        let base = format!("/proc/{child}");
        if deny_setgroups {
            write_kernel_file(format!("{base}/setgroups"), "deny").step(Step::IdMap, || "setgroups".into())?;
        }
        write_kernel_file(format!("{base}/uid_map"), &uid_map)
            .step(Step::IdMap, || format!("uid_map {:?}", uid_map.trim()))?;
        write_kernel_file(format!("{base}/gid_map"), &gid_map)
            .step(Step::IdMap, || format!("gid_map {:?}", gid_map.trim()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_with_threads_is_refused() {
        // The test harness runs this on a thread of its own: two threads at least.
        let e = ensure_single_threaded().unwrap_err();
        assert!(e.msg.contains("must be built from a single-threaded process"), "{e:?}");
        assert!(!e.msg.contains("(1 threads"), "{e:?}");
    }
    use std::os::fd::AsFd;

    /// `CLONE_INTO_CGROUP`, the path jails take on cgroup v2 hosts: the child starts in the
    /// given cgroup. Run in a forked copy of the test process, which is single-threaded as
    /// `fork_into_namespaces` requires. Needs root and a cgroup2 mount (a controller-less one,
    /// as on hybrid hosts, is enough).
    #[test]
    fn a_jail_can_be_cloned_straight_into_a_v2_cgroup() {
        let Some(mount) = crate::jail::cgroups::Layout::detect().v2_mount else { return };
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let name = format!("stockade-clone-into-test-{}", std::process::id());
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim_start_matches('/').to_owned();
        let dir = mount.join(&own).join(&name);
        std::fs::create_dir(&dir).unwrap();
        let cg = std::fs::File::open(&dir).unwrap();
        // SAFETY: the child only runs the code below and leaves with _exit; glibc's fork keeps
        // malloc usable in the child of a multi-threaded process.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = match fork_into_namespaces(Some(cg.as_fd()), None) {
                Ok(None) => {
                    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                    let inside = mine.lines().any(|l| l.starts_with("0::") && l.ends_with(&format!("/{name}")));
                    // SAFETY: leaving the cloned child without running the test harness's code.
                    unsafe { libc::_exit(if inside { 0 } else { 3 }) }
                }
                Ok(Some(p)) => match nix::sys::wait::waitpid(p, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => c,
                    _ => 4,
                },
                Err(_) => 5,
            };
            // SAFETY: as above.
            unsafe { libc::_exit(code) }
        }
        let status = nix::sys::wait::waitpid(Pid::from_raw(pid), None).unwrap();
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(Pid::from_raw(pid), 0));
    }
}
