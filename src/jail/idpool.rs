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
//!
//! A slot never overlaps ids the host has given out: the subordinate ranges in `/etc/subuid` and
//! `/etc/subgid` (`useradd` lays them out from 100000 in steps of 65536, exactly where the slots
//! would fall), nor the uid of a user in `/etc/passwd` or the gid of a group in `/etc/group`. A
//! host user owning a range a jail maps onto could signal its processes and read their files.

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

/// A range of host ids, `[start, end)`, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reserved {
    pub start: u64,
    pub end: u64,
    pub source: String,
}

/// The host ids a slot must not cover: subordinate ranges and existing users' and groups' ids.
/// A file that does not exist reserves nothing; one that cannot be read is an error (a slot
/// could then land on ids it should not).
pub(crate) fn reserved() -> Result<Vec<Reserved>, JailError> {
    reserved_in(Path::new("/etc"))
}

fn reserved_in(etc: &Path) -> Result<Vec<Reserved>, JailError> {
    let mut out = Vec::new();
    for (file, kind) in [("subuid", 's'), ("subgid", 's'), ("passwd", 'u'), ("group", 'g')] {
        let path = etc.join(file);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(JailError::new(Step::IdMap, format!("{}: {e}", path.display()))),
        };
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let f: Vec<&str> = line.split(':').collect();
            let range = match kind {
                // name:start:count
                's' => f.get(1).zip(f.get(2)).and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))),
                // name:password:uid:... and name:password:gid:...
                _ => f.get(2).and_then(|id| id.parse::<u64>().ok()).map(|id| (id, 1)),
            };
            if let Some((start, count)) = range.filter(|(_, c)| *c > 0) {
                let name = f.first().copied().unwrap_or("?");
                out.push(Reserved { start, end: start + count, source: format!("{} ({name})", path.display()) });
            }
        }
    }
    Ok(out)
}

/// Takes a free slot, starting at a random one so that a start costs a probe or two however many
/// jails are live. Slots over reserved host ids are skipped.
pub(crate) fn take(host_id_base: u32) -> Result<Slot, JailError> {
    take_in(Path::new(DIR), host_id_base, &reserved()?)
}

/// The slots `reserved` rules out, for `stockade check` to show.
pub(crate) fn skipped(host_id_base: u32, reserved: &[Reserved]) -> Vec<(u32, &Reserved)> {
    (0..slots_for(host_id_base)).filter_map(|i| overlap(host_id_base, i, reserved).map(|r| (i, r))).collect()
}

fn overlap(host_id_base: u32, index: u32, reserved: &[Reserved]) -> Option<&Reserved> {
    let start = host_id_base as u64 + index as u64 * 65_536;
    let end = start + 65_536;
    reserved.iter().find(|r| r.start < end && start < r.end)
}

fn take_in(dir: &Path, host_id_base: u32, reserved: &[Reserved]) -> Result<Slot, JailError> {
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
        if overlap(host_id_base, index, reserved).is_some() {
            continue;
        }
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
        let a = take_in(&dir, 100_000, &[]).unwrap();
        let b = take_in(&dir, 100_000, &[]).unwrap();
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

    #[test]
    fn slots_over_subordinate_ranges_and_existing_ids_are_never_taken() {
        let base =
            std::env::temp_dir().join(format!("stockade-idpool-etc-{}-{:x}", std::process::id(), fastrand::u64(..)));
        let etc = base.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        // useradd's layout for two users, a user with a high uid, a group with a high gid.
        std::fs::write(etc.join("subuid"), "alice:100000:65536\nbob:165536:65536\n# comment\n").unwrap();
        std::fs::write(etc.join("subgid"), "alice:100000:65536\n").unwrap();
        std::fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\nldap:x:400000:400000::/:/bin/sh\n").unwrap();
        std::fs::write(etc.join("group"), "root:x:0:\nbig:x:500001:\n").unwrap();
        let reserved = reserved_in(&etc).unwrap();
        let skipped: Vec<u32> = skipped(100_000, &reserved).into_iter().map(|(i, _)| i).collect();
        // Slot 0 is alice's range, 1 bob's; 400000 falls in slot 4, 500001 in slot 6.
        assert_eq!(skipped, [0, 1, 4, 6]);
        let dir = base.join("locks");
        let mut held = Vec::new();
        for _ in 0..40 {
            let s = take_in(&dir, 100_000, &reserved).unwrap();
            assert!(![0, 1, 4, 6].contains(&s.index), "took slot {}", s.index);
            held.push(s);
        }
        // A missing file reserves nothing.
        assert!(reserved_in(&base.join("nowhere")).unwrap().is_empty());
        drop(held);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
