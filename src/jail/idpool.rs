//! A host id range of its own for every jail Stockade builds as root.
//!
//! The kernel charges what a process holds in per-user counts (inotify instances and watches,
//! user namespaces, mqueue bytes, …) to its uid, and up the chain of user namespaces to each
//! namespace's owner: the effective uid of whoever created it. Jails that all map onto one host
//! range and whose user namespaces are all created by root would share those counts with each
//! other and with host root itself, so one agent could starve every other session and the host's
//! own daemons. Each jail therefore takes a slot: its ids map onto
//! `host_id_base + slot × 65536 …`, and its user namespace is created under the jail user's host
//! uid in that range (see `namespaces::fork_into_namespaces`).
//!
//! A slot is held by an exclusive `flock` on `/run/stockade/idranges/SLOT.lock` for the jail's
//! life: a crashed holder's lock goes with it, and a Stockade in another pid namespace of the
//! same host sees it too.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use super::error::{JailError, Step};

pub(crate) const DIR: &str = "/run/stockade/idranges";
/// Slots tried before giving up; far more than the live jails a host can hold (pid_max).
const MAX_SLOTS: u32 = 16_384;

/// A held slot; dropping it frees the range.
#[derive(Debug)]
pub(crate) struct Slot {
    pub index: u32,
    _lock: OwnedFd,
}

impl Slot {
    /// The first host id of the slot's range.
    pub(crate) fn host_base(&self, host_id_base: u32) -> u32 {
        host_id_base + self.index * 65_536
    }
}

/// How many slots fit above `host_id_base` in the 32-bit id space.
fn slots_for(host_id_base: u32) -> u32 {
    ((u32::MAX - host_id_base) / 65_536).saturating_sub(1).min(MAX_SLOTS)
}

/// Takes a free slot, starting at a random one so that a start costs a probe or two however many
/// jails are live.
pub(crate) fn take(host_id_base: u32) -> Result<Slot, JailError> {
    take_in(Path::new(DIR), host_id_base)
}

fn take_in(dir: &Path, host_id_base: u32) -> Result<Slot, JailError> {
    let err = |m: String| JailError::new(Step::IdMap, m);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err(format!("{}: {e}", dir.display())))?;
    let n = slots_for(host_id_base);
    if n == 0 {
        return Err(err(format!("user.host_id_base {host_id_base} leaves no room for a 65536-id range")));
    }
    let start = fastrand::u32(..n);
    for i in 0..n {
        let index = (start + i) % n;
        let path = dir.join(format!("{index}.lock"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Slot { index, _lock: f.into() });
        }
    }
    Err(err(format!("all {n} host id ranges are in use ({})", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_slots_are_distinct_and_free_again_when_dropped() {
        let dir = std::env::temp_dir().join(format!("stockade-idpool-{}-{:x}", std::process::id(), fastrand::u64(..)));
        let a = take_in(&dir, 100_000).unwrap();
        let b = take_in(&dir, 100_000).unwrap();
        assert_ne!(a.index, b.index);
        assert_eq!(a.host_base(100_000), 100_000 + a.index * 65_536);
        let held = a.index;
        drop(a);
        // Freed: a lock on it now succeeds.
        let f = std::fs::OpenOptions::new().write(true).open(dir.join(format!("{held}.lock"))).unwrap();
        // SAFETY: flock on a descriptor owned by `f`.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        assert_eq!(slots_for(u32::MAX - 65_536), 0);
        assert_eq!(slots_for(100_000), MAX_SLOTS);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
