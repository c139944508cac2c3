//! Room on the state directory's filesystem for the sessions' images.
//!
//! With `limits.workspace_size` or `limits.outputs_size`, a session's directories are sparse
//! image files holding ext4 (`jail::disk`): they take blocks as the session writes. When the
//! filesystem under them fills, the loop device's writes fail *after* the session's own writes
//! returned success, and the kernel drops them ("lost async page write"): data is lost while
//! every tool call reports success. So the worker keeps room for every image to be written in
//! full. It admits a session only when the free space covers what every image already there may
//! still take, the new session's images, and a margin for its own files; it lowers its slots at
//! start to what the disk can back; and it watches: when something else takes the room, it stops
//! admitting, and ends the sessions whose images could lose writes, loudly, largest first, until
//! what is left fits.
//!
//! `--image-overcommit N` lets the images promise N times the free space: denser, at the price
//! that the guarantee becomes the watcher's (it acts when what is owed, divided by N, no longer
//! fits), not the arithmetic's.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::util::format_size;

/// Room kept beyond the images for the worker's own files (records, outboxes, trails written
/// before their size is reached) and the filesystem's metadata.
pub(crate) const MARGIN: u64 = 64 << 20;

/// The state directory's room for images.
#[derive(Debug, Clone)]
pub(crate) struct Room {
    root: PathBuf,
    /// What one session's images may take in all: `limits.workspace_size + limits.outputs_size`
    /// (0 when neither is set: nothing is written behind the writer's back).
    pub(crate) per_session: u64,
    /// How many times over the free space the images may promise (at least 1).
    overcommit: f64,
}

/// One session's images and what they may still take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owed {
    pub(crate) work_id: String,
    pub(crate) bytes: u64,
}

/// What the filesystem holds and owes, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reading {
    pub(crate) free: u64,
    /// By session, largest first.
    pub(crate) owed: Vec<Owed>,
}

impl Reading {
    pub(crate) fn owed_total(&self) -> u64 {
        self.owed.iter().map(|o| o.bytes).sum()
    }

    /// The sessions to end so that what the rest owe (over `overcommit`) fits in the free space:
    /// largest first. None when everything fits.
    pub(crate) fn to_end(&self, overcommit: f64) -> Vec<&Owed> {
        let fits = |owed: u64| owed as f64 / overcommit <= self.free as f64;
        let mut owed = self.owed_total();
        let mut v = Vec::new();
        for o in &self.owed {
            if fits(owed) {
                break;
            }
            owed -= o.bytes;
            v.push(o);
        }
        v
    }
}

impl Room {
    pub(crate) fn new(root: &Path, per_session: u64, overcommit: f64) -> Room {
        Room { root: root.to_path_buf(), per_session, overcommit: overcommit.max(1.0) }
    }

    pub(crate) fn overcommit(&self) -> f64 {
        self.overcommit
    }

    /// What `bytes` of promises take of the free space.
    fn backed(&self, bytes: u64) -> u64 {
        (bytes as f64 / self.overcommit).ceil() as u64
    }

    /// Whether any session writes behind the writer's back (an image) at all.
    pub(crate) fn matters(&self) -> bool {
        self.per_session > 0
    }

    /// Bytes an unprivileged writer may still take on the state directory's filesystem.
    pub(crate) fn free(&self) -> std::io::Result<u64> {
        let s = nix::sys::statvfs::statvfs(&self.root).map_err(std::io::Error::from)?;
        Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
    }

    /// Every held item's images (`items/WORK/*.img`) and what they may still take: their size
    /// less the blocks they have.
    pub(crate) fn read(&self) -> std::io::Result<Reading> {
        let free = self.free()?;
        let mut owed = Vec::new();
        if let Ok(items) = std::fs::read_dir(self.root.join("items")) {
            for item in items.flatten() {
                let mut bytes = 0u64;
                for f in std::fs::read_dir(item.path()).into_iter().flatten().flatten() {
                    let p = f.path();
                    if p.extension().is_some_and(|x| x == "img") {
                        if let Ok(m) = std::fs::symlink_metadata(&p) {
                            bytes += m.len().saturating_sub(m.blocks() * 512);
                        }
                    }
                }
                if bytes > 0 {
                    owed.push(Owed { work_id: item.file_name().to_string_lossy().into_owned(), bytes });
                }
            }
        }
        owed.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.work_id.cmp(&b.work_id)));
        Ok(Reading { free, owed })
    }

    /// Why a new session cannot be admitted now, if it cannot: its images, what the others owe
    /// and the margin must all fit in the free space.
    pub(crate) fn refuses(&self, r: &Reading) -> Option<String> {
        if !self.matters() {
            return None;
        }
        let need = self.backed(r.owed_total() + self.per_session) + MARGIN;
        (need > r.free).then(|| {
            format!(
                "{} has {} free; a new session needs {} for its images (limits.workspace_size + \
                 limits.outputs_size), the sessions there may still write {}, and {} is kept for the \
                 worker's own files",
                self.root.display(),
                format_size(r.free),
                format_size(self.per_session),
                format_size(r.owed_total()),
                format_size(MARGIN)
            )
        })
    }

    /// How many sessions the disk can back, counting those already held (`held`), at most
    /// `max`; an error when it cannot back one.
    pub(crate) fn slots(&self, max: usize, held: usize, r: &Reading) -> Result<usize, String> {
        if !self.matters() {
            return Ok(max);
        }
        let spare = r.free.saturating_sub(self.backed(r.owed_total()) + MARGIN);
        let more = (spare / self.backed(self.per_session).max(1)) as usize;
        let n = (held + more).min(max);
        if n == 0 {
            return Err(format!(
                "{} has {} free, and one session's images (limits.workspace_size + limits.outputs_size = {}) \
                 need that much room to be written in full, with {} more for the worker's own files: free \
                 space there, give --state-dir a larger filesystem, lower the limits, or let the images promise \
                 more than there is (--image-overcommit)",
                self.root.display(),
                format_size(r.free),
                format_size(self.per_session),
                format_size(MARGIN)
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(free: u64, owed: &[(&str, u64)]) -> Reading {
        Reading { free, owed: owed.iter().map(|(w, b)| Owed { work_id: (*w).into(), bytes: *b }).collect() }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn slots_are_what_the_free_space_backs() {
        let room = Room::new(Path::new("/state"), 350 * MIB, 1.0);
        // 450 MiB free, nothing held: one session of 350 MiB and the margin fit, two do not.
        assert_eq!(room.slots(2, 0, &reading(450 * MIB, &[])), Ok(1));
        assert_eq!(room.slots(8, 0, &reading(2000 * MIB, &[])), Ok(5));
        // Held sessions count, with what their images may still take.
        assert_eq!(room.slots(8, 1, &reading(800 * MIB, &[("a", 300 * MIB)])), Ok(2));
        let e = room.slots(2, 0, &reading(300 * MIB, &[])).unwrap_err();
        assert!(e.contains("/state has 300M free") && e.contains("limits.workspace_size"), "{e}");
        // Overcommitted four times: a session takes a quarter of its promise of the free space.
        assert_eq!(Room::new(Path::new("/state"), 400 * MIB, 4.0).slots(8, 0, &reading(464 * MIB, &[])), Ok(4));
        // No image, nothing to keep room for.
        assert_eq!(Room::new(Path::new("/state"), 0, 1.0).slots(7, 0, &reading(0, &[])), Ok(7));
    }

    #[test]
    fn a_session_is_admitted_only_when_everyone_still_fits() {
        let room = Room::new(Path::new("/state"), 350 * MIB, 1.0);
        assert_eq!(room.refuses(&reading(500 * MIB, &[])), None);
        let why = room.refuses(&reading(500 * MIB, &[("a", 100 * MIB)])).unwrap();
        assert!(why.contains("may still write 100M"), "{why}");
    }

    #[test]
    fn at_risk_the_largest_debts_go_first_until_the_rest_fit() {
        let r = reading(150 * MIB, &[("big", 300 * MIB), ("mid", 200 * MIB), ("small", 10 * MIB)]);
        let ends: Vec<&str> = r.to_end(1.0).iter().map(|o| o.work_id.as_str()).collect();
        assert_eq!(ends, ["big", "mid"]);
        let ok = reading(600 * MIB, &[("big", 300 * MIB), ("mid", 200 * MIB)]);
        assert!(ok.to_end(1.0).is_empty());
        // Promising twice the free space, only past that does a session go.
        assert_eq!(r.to_end(2.0).len(), 1);
        assert!(r.to_end(4.0).is_empty());
    }

    #[test]
    fn what_an_image_owes_is_its_size_less_its_blocks() {
        let dir = std::env::temp_dir().join(format!("stockade-room-{}-{}", std::process::id(), fastrand::u32(..)));
        let item = dir.join("items/work_1");
        std::fs::create_dir_all(&item).unwrap();
        let f = std::fs::File::create(item.join("workspace.img")).unwrap();
        f.set_len(64 * MIB).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![1u8; MIB as usize], 0).unwrap();
        f.sync_all().unwrap();
        std::fs::write(item.join("item.json"), "{}").unwrap();
        let r = Room::new(&dir, 64 * MIB, 1.0).read().unwrap();
        assert_eq!(r.owed.len(), 1);
        assert_eq!(r.owed[0].work_id, "work_1");
        // 63 MiB still to come, give or take the filesystem's block rounding.
        assert!(r.owed[0].bytes <= 63 * MIB && r.owed[0].bytes > 62 * MIB, "{:?}", r.owed);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
