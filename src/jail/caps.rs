//! Step 6: credentials and capabilities.
//!
//! Order is forced by the kernel: the bounding set can only be reduced while CAP_SETPCAP is still
//! effective, and securebits likewise; then the ids change; then the remaining sets are cleared.
//! Finally no_new_privs, which also makes landlock and seccomp installable without privilege.
//! The result is verified rather than assumed, from the kernel's own account in /proc.
//!
//! Every jail start runs this, so it works in whole sets where the kernel allows: one capset for
//! the effective, permitted and inheritable sets, one ambient clear, one status read to verify
//! (a capability at a time through the `caps` crate cost ~170 prctl calls).

use caps::CapSet;

use super::error::{JailError, Step, StepExt};

/// Drops every capability but those of `keep` (the policy's set, resolved when it was read).
pub(crate) fn drop_to(uid: u32, gid: u32, keep: &crate::policy::CapSet, clear_groups: bool) -> Result<(), JailError> {
    let keep_mask = keep.mask();

    // Lock root out of privilege: uid 0 inside gains nothing from exec or setuid transitions.
    let mut bits = libc::SECBIT_NOROOT | libc::SECBIT_NOROOT_LOCKED | libc::SECBIT_NO_SETUID_FIXUP_LOCKED;
    if keep.is_empty() {
        bits |= libc::SECBIT_KEEP_CAPS_LOCKED
            | libc::SECBIT_NO_CAP_AMBIENT_RAISE
            | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    }
    prctl(libc::PR_SET_SECUREBITS, bits as libc::c_ulong, 0, "PR_SET_SECUREBITS")?;
    drop_bounding(keep_mask)?;
    prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, "clear ambient")?;
    if !keep.is_empty() {
        prctl(libc::PR_SET_KEEPCAPS, 1, 0, "PR_SET_KEEPCAPS")?;
    }

    set_thread_ids(uid, gid, clear_groups)
        .map_err(|e| JailError::new(Step::Capabilities, format!("become uid {uid} gid {gid}: {e}")))?;

    set_process_caps(keep_mask)?;
    for cap in keep.iter() {
        // Ambient capabilities are the only ones an unprivileged uid keeps across execve.
        caps::raise(None, CapSet::Ambient, cap).step(Step::Capabilities, || format!("raise ambient {cap}"))?;
    }
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, "PR_SET_NO_NEW_PRIVS")?;
    verify(keep_mask)
}

/// Drops from the bounding set every capability outside `keep_mask`, by number up to the
/// kernel's last one (EINVAL past it): capabilities newer than this build's list go as well.
fn drop_bounding(keep_mask: u64) -> Result<(), JailError> {
    for nr in 0..64u8 {
        if keep_mask & (1 << nr) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, nr as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) && nr > 0 {
                return Ok(());
            }
            return Err(JailError::new(Step::Capabilities, format!("drop capability {nr} from bounding set: {e}")));
        }
    }
    Ok(())
}

/// capset(2)'s header and per-32-bit-word data (linux/capability.h, version 3: two words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Sets the effective, permitted and inheritable sets to exactly `mask` in one call.
fn set_process_caps(mask: u64) -> Result<(), JailError> {
    let header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let word = |w: u32| CapData { effective: w, permitted: w, inheritable: w };
    let data = [word(mask as u32), word((mask >> 32) as u32)];
    // SAFETY: capset reads a version-3 header and two data words, both live for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(JailError::new(
            Step::Capabilities,
            format!("set effective, permitted and inheritable sets: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(())
}

/// Checks all five sets at once, as the kernel reports them in /proc/self/status.
fn verify(keep_mask: u64) -> Result<(), JailError> {
    let e = |m: String| JailError::new(Step::Capabilities, m);
    let status = super::fsio::read_kernel_file("/proc/self/status")
        .map_err(|err| e(format!("read /proc/self/status to verify: {err}")))?;
    let sets = [
        ("CapInh:", "Inheritable"),
        ("CapPrm:", "Permitted"),
        ("CapEff:", "Effective"),
        ("CapBnd:", "Bounding"),
        ("CapAmb:", "Ambient"),
    ];
    for (field, set) in sets {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| e(format!("/proc/self/status has no readable {field} line")))?;
        let extra = value & !keep_mask;
        if extra != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|n| extra & (1 << n) != 0)
                .map(|n| {
                    caps::all()
                        .into_iter()
                        .find(|c| c.index() == n)
                        .map_or(format!("capability {n}"), |c| c.to_string())
                })
                .collect();
            return Err(e(format!("{set} set still holds {} after dropping", names.join(", "))));
        }
    }
    Ok(())
}

/// Sets the calling thread's real, effective and saved ids (and, with `clear_groups`, empties
/// its supplementary groups) through the system calls themselves, which act on the calling
/// thread only. The jail's init is single-threaded, so that is the whole process, and the command
/// inherits the credentials of the thread that starts it, this one; libc's wrappers would add
/// their all-threads signalling machinery for nothing.
pub(crate) fn set_thread_ids(uid: u32, gid: u32, clear_groups: bool) -> Result<(), String> {
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

fn prctl(op: libc::c_int, arg: libc::c_ulong, arg2: libc::c_ulong, name: &str) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only; no pointers are passed.
    let r = unsafe { libc::prctl(op, arg, arg2, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if r < 0 {
        return Err(JailError::new(Step::Capabilities, format!("{name}: {}", std::io::Error::last_os_error())));
    }
    Ok(())
}

/// Makes the calling process non-dumpable: its /proc entries become root-owned and it cannot be
/// ptrace-attached, even by the jail user.
pub(crate) fn set_non_dumpable() -> Result<(), JailError> {
    prctl(libc::PR_SET_DUMPABLE, 0, 0, "PR_SET_DUMPABLE")
}
