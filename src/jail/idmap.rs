//! Id-mapped workspace and outputs, for Stockade running as host root.
//!
//! The jail user is an unprivileged host uid (101000 by default), which usually does not own the
//! directory an operator hands over. Rather than chown the operator's tree, the supervisor
//! prepares a detached mount of it whose id mapping shows the directory's owner as the jail user:
//! the jail can work on the files, and what it creates is stored as owned by the directory's real
//! owner. Other owners' files appear as the overflow id and keep their permission bits.
//!
//! Mapping onto a system account (uid or gid below 1000, root above all) needs a seccomp
//! allowlist that refuses setuid and setgid modes (the default's does): otherwise a file the jail
//! creates and marks setuid would become a setuid-root (or setuid-daemon) program for the host's
//! users, and the mapping is refused. Either way what the jail creates there is owned by the
//! directory's owner, as if that owner had run the command.
//!
//! The mapping is a user namespace whose only line maps the owner to the jail user's host id; it
//! is created by a short-lived child and referenced by fd. The tree is attached inside the jail's
//! mount namespace with move_mount(2) (see `mounts`).

use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::error::{JailError, Step};

/// Ids below this are system accounts (login.defs UID_MIN/GID_MIN on Debian and Fedora).
pub(crate) const FIRST_ORDINARY_ID: u32 = 1000;

/// Returns a detached mount of `dir`, made by the supervisor so that the jail never walks the
/// host path to it (a private parent directory, 0700, would stop the jail user there): a plain
/// one when the jail user's host ids own the directory, an id-mapped one when an ordinary user
/// does.
/// `setid_openings` are the calls the policy lets make a setuid/setgid file (see
/// `policy::syscalls::setid_openings`).
pub(crate) fn prepare(
    dir: &Path,
    what: &str,
    jail_host_uid: u32,
    jail_host_gid: u32,
    setid_openings: &[&str],
) -> Result<Option<OwnedFd>, JailError> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| JailError::new(Step::Workspace, format!("{what} {}: {e}", dir.display())))?;
    if meta.uid() == jail_host_uid && meta.gid() == jail_host_gid {
        let tree = open_tree(dir)
            .map_err(|e| JailError::new(Step::Workspace, format!("{what} {}: open_tree: {e}", dir.display())))?;
        set_plain(&tree)
            .map_err(|e| JailError::new(Step::Workspace, format!("{what} {}: mount_setattr: {e}", dir.display())))?;
        return Ok(Some(tree));
    }
    let fail = |detail: String| {
        JailError::new(
            Step::Workspace,
            format!(
                "{what} {} is owned by host uid {} and the jail user is host uid {jail_host_uid}; {detail} \
                 (chown the directory to {jail_host_uid}:{jail_host_gid}, or run Stockade unprivileged)",
                dir.display(),
                meta.uid()
            ),
        )
    };
    let system = meta.uid() < FIRST_ORDINARY_ID || meta.gid() < FIRST_ORDINARY_ID;
    if system && !setid_openings.is_empty() {
        return Err(fail(format!(
            "refusing to id-map it onto a system account (uid {}, gid {}) while the policy's seccomp.allow lets the \
             jail make setuid/setgid files ({}): one would hand that account's privileges to any host user",
            meta.uid(),
            meta.gid(),
            setid_openings.join(" ")
        )));
    }
    let userns = mapping_namespace(meta.uid(), jail_host_uid, meta.gid(), jail_host_gid)
        .map_err(|e| fail(format!("creating the id mapping failed: {e}")))?;
    let tree = open_tree(dir).map_err(|e| fail(format!("open_tree: {e}")))?;
    set_idmap(&tree, &userns).map_err(|e| fail(format!("this filesystem cannot id-map mounts: {e}")))?;
    Ok(Some(tree))
}

/// A user namespace mapping `uid`→`to_uid` and `gid`→`to_gid`, held by fd.
fn mapping_namespace(uid: u32, to_uid: u32, gid: u32, to_gid: u32) -> std::io::Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe()?;
    // SAFETY: fork-like clone (no CLONE_VM) from the single-threaded supervisor; the child only
    // blocks in read(2) and exits with _exit(2).
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(w);
        let mut b = [0u8; 1];
        let _ = nix::unistd::read(&r, &mut b);
        // SAFETY: _exit in the child of a fork-like clone, without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    drop(r);
    let child = Pid::from_raw(pid as i32);
    let result = (|| {
        std::fs::write(format!("/proc/{child}/uid_map"), format!("{uid} {to_uid} 1\n"))?;
        std::fs::write(format!("/proc/{child}/gid_map"), format!("{gid} {to_gid} 1\n"))?;
        let f = std::fs::File::open(format!("/proc/{child}/ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    drop(w); // releases the child
    let _ = waitpid(child, None);
    result
}

fn open_tree(dir: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated path; on success the kernel returns a new fd that we own.
    let fd = unsafe {
        libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open_tree and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// nosuid and nodev on a tree that needs no id mapping.
fn set_plain(tree: &OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    super::mounts::mount_setattr(tree.as_raw_fd(), c"", libc::AT_EMPTY_PATH as libc::c_uint, &attr)
}

fn set_idmap(tree: &OwnedFd, userns: &OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    super::mounts::mount_setattr(tree.as_raw_fd(), c"", libc::AT_EMPTY_PATH as libc::c_uint, &attr)
}
