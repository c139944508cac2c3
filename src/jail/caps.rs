//! Step 6: credentials and capabilities.
//!
//! Order is forced by the kernel: the bounding set can only be reduced while CAP_SETPCAP is still
//! effective, and securebits likewise; then the ids change; then the remaining sets are cleared.
//! Finally no_new_privs, which also makes landlock and seccomp installable without privilege.
//! The result is verified rather than assumed.

use caps::{CapSet, Capability, CapsHashSet};

use super::error::{JailError, Step, StepExt};

pub fn drop_to(uid: u32, gid: u32, keep_names: &[String], clear_groups: bool) -> Result<(), JailError> {
    let keep: CapsHashSet = keep_names
        .iter()
        .map(|n| {
            let n = n.to_ascii_uppercase();
            let n = if n.starts_with("CAP_") { n } else { format!("CAP_{n}") };
            n.parse::<Capability>().map_err(|e| JailError::new(Step::Capabilities, format!("{n}: {e}")))
        })
        .collect::<Result<_, _>>()?;

    // Lock root out of privilege: uid 0 inside gains nothing from exec or setuid transitions.
    let mut bits = libc::SECBIT_NOROOT | libc::SECBIT_NOROOT_LOCKED | libc::SECBIT_NO_SETUID_FIXUP_LOCKED;
    if keep.is_empty() {
        bits |= libc::SECBIT_KEEP_CAPS_LOCKED
            | libc::SECBIT_NO_CAP_AMBIENT_RAISE
            | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    }
    prctl(libc::PR_SET_SECUREBITS, bits as libc::c_ulong, "PR_SET_SECUREBITS")?;

    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .step(Step::Capabilities, || format!("drop {cap} from bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).step(Step::Capabilities, || "clear ambient".into())?;
    if !keep.is_empty() {
        prctl(libc::PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")?;
    }

    set_thread_ids(uid, gid, clear_groups)
        .map_err(|e| JailError::new(Step::Capabilities, format!("become uid {uid} gid {gid}: {e}")))?;

    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        caps::set(None, set, &keep).step(Step::Capabilities, || format!("set {set:?}"))?;
    }
    for cap in &keep {
        // Ambient capabilities are the only ones an unprivileged uid keeps across execve.
        caps::raise(None, CapSet::Ambient, *cap).step(Step::Capabilities, || format!("raise ambient {cap}"))?;
    }
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")?;

    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable, CapSet::Ambient, CapSet::Bounding] {
        let have = caps::read(None, set).step(Step::Capabilities, || format!("read {set:?}"))?;
        if have.iter().any(|c| !keep.contains(c)) {
            return Err(JailError::new(Step::Capabilities, format!("{set:?} set still holds {have:?} after dropping")));
        }
    }
    Ok(())
}

/// Sets the calling thread's real, effective and saved ids (and, with `clear_groups`, empties
/// its supplementary groups) through the system calls themselves, which act on the calling
/// thread only. The jail's init is single-threaded, so that is the whole process, and the command
/// inherits the credentials of the thread that starts it, this one; libc's wrappers would add
/// their all-threads signalling machinery for nothing.
pub fn set_thread_ids(uid: u32, gid: u32, clear_groups: bool) -> Result<(), String> {
    let check = |r: libc::c_long, what: &str| match r {
        0 => Ok(()),
        _ => Err(format!("{what}: {}", std::io::Error::last_os_error())),
    };
    if clear_groups {
        // SAFETY: a zero-length group list; the null pointer is never read.
        check(unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) }, "setgroups([])")?;
    }
    // SAFETY: setresgid/setresuid take integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }, "setresgid")?;
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }, "setresuid")
}

fn prctl(op: libc::c_int, arg: libc::c_ulong, name: &str) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only; no pointers are passed.
    let r = unsafe { libc::prctl(op, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if r < 0 {
        return Err(JailError::new(Step::Capabilities, format!("{name}: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// Makes the calling process non-dumpable: its /proc entries become root-owned and it cannot be
/// ptrace-attached, even by the jail user.
pub fn set_non_dumpable() -> Result<(), JailError> {
    prctl(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")
}
