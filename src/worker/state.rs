//! The worker's state directory: who this worker is, which items it holds, results not yet
//! posted, and retained outputs. What survives a crash is exactly what is written here.
//!
//! ```text
//! STATE/worker.lock              flock: one worker per state directory
//! STATE/worker-id                the worker's identity across restarts (leases are held by it)
//! STATE/policy.toml              the policy as the worker resolved it at start; sessions use it
//! STATE/items/WORK/item.json     a held item
//! STATE/items/WORK/workspace/    the session's /workspace
//! STATE/items/WORK/outputs/      the session's /mnt/session/outputs
//! STATE/items/WORK/outbox/ID.json  a tool result produced but not yet known to be posted
//! STATE/outputs/SESSION-WORK/    outputs of ended sessions, kept for `retention.outputs`
//! STATE/workspaces/SESSION-WORK/ workspaces of ended sessions (`retention.workspaces`); a
//!                                workspace with a size limit is kept as its image, NAME.img
//! STATE/trails/SESSION-WORK.jsonl  each session's audit trail (`retention.trails`)
//! ```
//!
//! What is kept is swept by age (`sweep`): a kept entry's modification time is when its session
//! ended, so the sweep needs no record of its own and survives any restart.

use serde::{Deserialize, Serialize};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::control_plane::wire::WorkItem;
use crate::policy::{Keep, Retention};
use crate::tools::ToolResult;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("state directory {0} is in use by another worker (pid in {0}/worker.lock)")]
    Locked(PathBuf),
    #[error("{0}: {1}")]
    Corrupt(PathBuf, String),
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |e| StateError::Io(p.to_path_buf(), e)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ItemRecord {
    /// The item as polled, without its secret: a restarted worker resumes with the environment
    /// key, and no credential but that key's file lives on disk.
    pub item: WorkItem,
    pub environment_id: String,
    pub started_at: String,
    /// The lease's last heartbeat, which the next heartbeat must echo.
    #[serde(default)]
    pub last_heartbeat: Option<String>,
}

/// A result waiting in the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Pending {
    pub tool_use_id: String,
    /// The tool's name (absent in entries an older Stockade wrote).
    #[serde(default)]
    pub name: Option<String>,
    pub content: PendingContent,
    pub is_error: bool,
}

/// A pending result's content: blocks, or the single text an older Stockade wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum PendingContent {
    Blocks(Vec<crate::tools::Block>),
    Text(String),
}

impl PendingContent {
    pub(crate) fn into_blocks(self) -> Vec<crate::tools::Block> {
        match self {
            PendingContent::Blocks(b) => b,
            PendingContent::Text(t) => ToolResult::ok(t).content,
        }
    }
}

pub(crate) struct StateDir {
    root: PathBuf,
    _lock: fs::File,
    pub worker_id: String,
}

/// Sizes of the filesystems each session's workspace and outputs get (`None`: a plain directory).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DiskSizes {
    pub workspace: Option<u64>,
    pub outputs: Option<u64>,
}

/// The directories of one held item.
#[derive(Debug, Clone)]
pub(crate) struct ItemDirs {
    pub dir: PathBuf,
    pub workspace: PathBuf,
    pub outputs: PathBuf,
    pub outbox: PathBuf,
    /// The workspace was created now (not a resumed one).
    pub fresh: bool,
}

/// Beside an item whose lease was lost: when, in seconds since the epoch.
const LOST_MARK: &str = "lost_at";

fn mkdir(p: &Path, mode: u32) -> Result<(), StateError> {
    match fs::DirBuilder::new().recursive(true).mode(mode).create(p) {
        Ok(()) => Ok(()),
        Err(e) => Err(StateError::Io(p.into(), e)),
    }
}

fn safe_component(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl StateDir {
    /// Opens (creating) the state directory and takes its lock.
    pub(crate) fn open(root: &Path) -> Result<StateDir, StateError> {
        // 0711: the jail's supervisor must traverse into the session directories; nobody
        // needs to list them.
        mkdir(root, 0o711)?;
        mkdir(&root.join("items"), 0o711)?;
        mkdir(&root.join("outputs"), 0o700)?;
        mkdir(&root.join("workspaces"), 0o700)?;
        mkdir(&root.join("trails"), 0o700)?;
        let lock_path = root.join("worker.lock");
        let lock =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StateError::Locked(root.into()));
        }
        lock.set_len(0).map_err(io(&lock_path))?;
        std::io::Write::write_all(&mut &lock, std::process::id().to_string().as_bytes()).map_err(io(&lock_path))?;
        let id_path = root.join("worker-id");
        let worker_id = match fs::read_to_string(&id_path) {
            Ok(s) if safe_component(s.trim()) => s.trim().to_owned(),
            Ok(_) => return Err(StateError::Corrupt(id_path, "not a worker id".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
                let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
                let id = format!("wkr_{host}_{:016x}", fastrand::u64(..));
                fs::write(&id_path, &id).map_err(io(&id_path))?;
                id
            }
            Err(e) => return Err(StateError::Io(id_path, e)),
        };
        Ok(StateDir { root: root.into(), _lock: lock, worker_id })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn item_dir(&self, work_id: &str) -> Result<PathBuf, StateError> {
        if !safe_component(work_id) {
            return Err(StateError::Corrupt(self.root.join("items"), format!("unsafe work id {work_id:?}")));
        }
        Ok(self.root.join("items").join(work_id))
    }

    /// Records a held item and makes its directories, owned by the jail user's host ids; with
    /// size limits, each of them is a filesystem of that size (kept in `NAME.img` beside it).
    pub(crate) fn hold(&self, rec: &ItemRecord, owner: (u32, u32), disk: DiskSizes) -> Result<ItemDirs, StateError> {
        let dir = self.item_dir(&rec.item.id)?;
        mkdir(&dir, 0o711)?;
        let dirs = ItemDirs {
            workspace: dir.join("workspace"),
            outputs: dir.join("outputs"),
            outbox: dir.join("outbox"),
            fresh: !dir.join("workspace").exists(),
            dir: dir.clone(),
        };
        for (d, size) in [(&dirs.workspace, disk.workspace), (&dirs.outputs, disk.outputs)] {
            if let Some(size) = size {
                crate::jail::disk::provision(
                    &d.with_extension("img"),
                    d,
                    size,
                    owner,
                    Some(&self.root.join("templates")),
                )
                .map_err(|e| StateError::Io(d.clone(), std::io::Error::other(e.to_string())))?;
            } else if !d.exists() {
                mkdir(d, 0o755)?;
                nix::unistd::chown(d.as_path(), Some(owner.0.into()), Some(owner.1.into()))
                    .map_err(|e| StateError::Io(d.clone(), e.into()))?;
            }
        }
        mkdir(&dirs.outbox, 0o700)?;
        // Held again: no longer lost.
        let _ = fs::remove_file(dir.join(LOST_MARK));
        self.record(rec)?;
        Ok(dirs)
    }

    /// The item's memory store folders' parent, made when missing: with size limits, a
    /// filesystem of its own (`memory.img`) of `size`, so that what the agent puts in a memory
    /// folder counts against a limit as what it puts in its workspace does.
    pub(crate) fn memory_dir(
        &self,
        dirs: &ItemDirs,
        owner: (u32, u32),
        size: Option<u64>,
    ) -> Result<PathBuf, StateError> {
        let d = dirs.dir.join("memory");
        match size {
            Some(size) => crate::jail::disk::provision(
                &d.with_extension("img"),
                &d,
                size,
                owner,
                Some(&self.root.join("templates")),
            )
            .map_err(|e| StateError::Io(d.clone(), std::io::Error::other(e.to_string())))?,
            None => mkdir(&d, 0o711)?,
        }
        Ok(d)
    }

    /// Marks an item whose lease was lost: its directories stay for a re-claim (see
    /// `Ctx::lost`), but its filesystems are unmounted (a re-claim mounts them again) and the
    /// time is written beside it, so a restarted worker neither resumes it nor keeps it longer.
    pub(crate) fn mark_lost(&self, rec: &ItemRecord) -> Result<(), StateError> {
        let dir = self.item_dir(&rec.item.id)?;
        for d in ["workspace", "outputs", "memory"] {
            let d = dir.join(d);
            crate::jail::disk::release(&d)
                .map_err(|e| StateError::Io(d.clone(), std::io::Error::other(e.to_string())))?;
        }
        let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        write_atomic(&dir.join(LOST_MARK), secs.to_string().as_bytes())
    }

    /// When the item's lease was lost, if it was.
    pub(crate) fn lost_at(&self, rec: &ItemRecord) -> Option<SystemTime> {
        let dir = self.item_dir(&rec.item.id).ok()?;
        let secs: u64 = fs::read_to_string(dir.join(LOST_MARK)).ok()?.trim().parse().ok()?;
        SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))
    }

    /// Writes an item's record (again): after each heartbeat, so a restart can echo the last one.
    pub(crate) fn record(&self, rec: &ItemRecord) -> Result<(), StateError> {
        let mut rec = rec.clone();
        rec.item.secret = None;
        let p = self.item_dir(&rec.item.id)?.join("item.json");
        write_atomic(&p, &serde_json::to_vec_pretty(&rec).expect("records serialise"))
    }

    /// Items recorded by an earlier run.
    pub(crate) fn held(&self) -> Vec<ItemRecord> {
        let mut v = Vec::new();
        let Ok(rd) = fs::read_dir(self.root.join("items")) else { return v };
        for e in rd.flatten() {
            let p = e.path().join("item.json");
            match fs::read(&p).map(|b| serde_json::from_slice::<ItemRecord>(&b)) {
                Ok(Ok(r)) => v.push(r),
                Ok(Err(err)) => {
                    tracing::error!(file = %p.display(), error = %err, "unreadable item record; left alone")
                }
                Err(_) => {
                    // A directory without a record: a crash between mkdir and the write.
                    for d in ["workspace", "outputs"] {
                        let _ = crate::jail::disk::release(&e.path().join(d));
                    }
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        v
    }

    pub(crate) fn put_outbox(&self, dirs: &ItemDirs, id: &str, name: &str, r: &ToolResult) -> Result<(), StateError> {
        let p = dirs.outbox.join(format!("{}.json", outbox_name(id)));
        let rec = Pending {
            tool_use_id: id.into(),
            name: Some(name.into()),
            content: PendingContent::Blocks(r.content.clone()),
            is_error: r.is_error,
        };
        write_atomic(&p, &serde_json::to_vec(&rec).expect("serialises"))
    }

    pub(crate) fn take_outbox(&self, dirs: &ItemDirs, id: &str) {
        let _ = fs::remove_file(dirs.outbox.join(format!("{}.json", outbox_name(id))));
    }

    pub(crate) fn outbox(&self, dirs: &ItemDirs) -> Vec<Pending> {
        let mut v: Vec<(SystemTime, Pending)> = Vec::new();
        if let Ok(rd) = fs::read_dir(&dirs.outbox) {
            for e in rd.flatten() {
                // A write cut short by a crash leaves its temporary file; only whole ones count.
                if e.path().extension().is_none_or(|x| x != "json") {
                    continue;
                }
                let t = e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                if let Ok(Ok(p)) = fs::read(e.path()).map(|b| serde_json::from_slice::<Pending>(&b)) {
                    v.push((t, p));
                }
            }
        }
        v.sort_by_key(|(t, _)| *t);
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// An item's name in the retention areas: `SESSION-WORK`.
    pub(crate) fn kept_name(rec: &ItemRecord) -> String {
        format!(
            "{}-{}",
            if safe_component(&rec.item.data.id) { rec.item.data.id.as_str() } else { "session" },
            rec.item.id
        )
    }

    /// Where an item's audit trail is written.
    pub(crate) fn trail_path(&self, rec: &ItemRecord) -> PathBuf {
        self.root.join("trails").join(format!("{}.jsonl", Self::kept_name(rec)))
    }

    /// Lets go of an item: its outputs (and, if the policy keeps them, its workspace) move to
    /// the retention areas, everything else goes. Returns where the outputs are.
    pub(crate) fn retire(&self, rec: &ItemRecord, retention: &Retention) -> Option<PathBuf> {
        let Ok(dir) = self.item_dir(&rec.item.id) else { return None };
        let name = Self::kept_name(rec);
        let outputs = dir.join("outputs");
        let workspace = dir.join("workspace");
        let kept = match retention.outputs {
            Keep::SessionEnd => None,
            _ if !outputs.exists() => None,
            _ => {
                let dest = unique(&self.root.join("outputs"), &name, "");
                // A filesystem of its own cannot be renamed away: its files are copied out.
                let moved = if crate::jail::disk::is_mounted(&outputs) {
                    copy_tree(&outputs, &dest)
                } else {
                    fs::rename(&outputs, &dest)
                };
                match moved {
                    Ok(()) => {
                        // Its age counts from now (see `sweep`).
                        let _ = touch(&dest);
                        Some(dest)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not keep the outputs of {}", rec.item.id);
                        None
                    }
                }
            }
        };
        for d in [&workspace, &outputs, &dir.join("memory")] {
            if let Err(e) = crate::jail::disk::release(d) {
                tracing::error!(dir = %d.display(), error = %e, "could not unmount a session's filesystem");
            }
        }
        if retention.workspaces != Keep::SessionEnd {
            let image = workspace.with_extension("img");
            let (from, dest) = if image.exists() {
                (image, unique(&self.root.join("workspaces"), &name, ".img"))
            } else {
                (workspace.clone(), unique(&self.root.join("workspaces"), &name, ""))
            };
            match fs::rename(&from, &dest).and_then(|()| touch(&dest)) {
                Ok(()) => tracing::info!(workspace = %dest.display(), "workspace kept (retention.workspaces)"),
                Err(e) => tracing::error!(error = %e, "could not keep the workspace of {}", rec.item.id),
            }
        }
        // std's remove_dir_all does not follow symlinks the session may have planted.
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::error!(dir = %dir.display(), error = %e, "could not remove a session's directory");
        }
        kept
    }

    /// Removes what the retention policy no longer keeps, as of `now`: kept outputs, workspaces
    /// and trails whose session ended longer ago than their lifetime. Trails of items this
    /// worker still holds are never touched. Returns what it removed.
    pub(crate) fn sweep(&self, retention: &Retention, now: SystemTime) -> Vec<PathBuf> {
        let held: Vec<String> = self.held_ids();
        let mut removed = Vec::new();
        for (area, keep) in
            [("outputs", retention.outputs), ("workspaces", retention.workspaces), ("trails", retention.trails)]
        {
            let Ok(rd) = fs::read_dir(self.root.join(area)) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if area == "trails" && held.iter().any(|w| name.ends_with(&format!("-{w}.jsonl"))) {
                    continue;
                }
                // An outputs or workspace entry being written by `retire` right now is younger
                // than any lifetime; `session_end` applies to what a crash left behind.
                let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| now.duration_since(t).ok());
                let expired = match keep {
                    Keep::Forever => false,
                    Keep::SessionEnd => area == "trails" || age.is_some_and(|a| a > Duration::from_secs(3600)),
                    Keep::For(d) => age.is_some_and(|a| a > d),
                };
                if !expired {
                    continue;
                }
                let p = e.path();
                let r =
                    if e.file_type().is_ok_and(|t| t.is_dir()) { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                match r {
                    Ok(()) => {
                        tracing::info!(path = %p.display(), "removed past its retention ({area})");
                        removed.push(p);
                    }
                    Err(err) => {
                        tracing::warn!(path = %p.display(), error = %err, "could not remove past its retention")
                    }
                }
            }
        }
        removed
    }

    /// The work ids of the items recorded as held.
    fn held_ids(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.root.join("items")) else { return Vec::new() };
        rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    }
}

/// `dir/NAMEsuffix`, or `dir/NAME.2suffix`, … for the first that does not exist: a session
/// whose item was claimed again keeps what each attempt left.
fn unique(dir: &Path, name: &str, suffix: &str) -> PathBuf {
    let mut dest = dir.join(format!("{name}{suffix}"));
    let mut n = 1;
    while dest.exists() {
        n += 1;
        dest = dir.join(format!("{name}.{n}{suffix}"));
    }
    dest
}

/// Sets a path's modification time to now.
fn touch(p: &Path) -> std::io::Result<()> {
    fs::File::open(p)?.set_modified(SystemTime::now())
}

/// The most bytes of a session's outputs digested, holes included (they are hashed as zeros
/// without being read); files past it are recorded without a digest.
pub(crate) const DIGEST_BUDGET: u64 = 256 << 20;

/// One file a session left in its outputs, as its trail records it.
pub(crate) struct OutputFile {
    pub path: String,
    pub size: u64,
    /// None when it was not digested (`skipped` says why).
    pub sha256: Option<String>,
    pub skipped: Option<String>,
}

/// The regular files under `root` (at most 1,000, sorted), each with its SHA-256 while the
/// digest budget lasts. A file's data is read segment by segment (`SEEK_DATA`), so a sparse file
/// costs its data, not its size, in reads; hard links to one file are digested once.
pub(crate) fn digest_files(root: &Path) -> Vec<OutputFile> {
    use std::os::unix::fs::MetadataExt;
    let mut names = Vec::new();
    list_files(root, root, &mut names);
    names.sort();
    let mut out = Vec::new();
    let mut left = DIGEST_BUDGET;
    let mut seen: std::collections::HashMap<(u64, u64), String> = std::collections::HashMap::new();
    for n in names {
        let p = root.join(&n);
        let Ok(meta) = fs::symlink_metadata(&p) else { continue };
        if !meta.is_file() {
            continue;
        }
        let size = meta.len();
        let (sha256, skipped) = if let Some(d) = seen.get(&(meta.dev(), meta.ino())) {
            (Some(d.clone()), None)
        } else if size > left {
            (None, Some(format!("over what is left of the {} MiB digest budget", DIGEST_BUDGET >> 20)))
        } else {
            match sparse_sha256(&p) {
                Ok(d) => {
                    left -= size;
                    seen.insert((meta.dev(), meta.ino()), d.clone());
                    (Some(d), None)
                }
                Err(e) => (None, Some(format!("unreadable: {e}"))),
            }
        };
        out.push(OutputFile { path: n, size, sha256, skipped });
    }
    out
}

/// The data segments of a file, `[start, end)`, found with `SEEK_DATA`/`SEEK_HOLE`; the holes
/// between them read as zeros. A filesystem without them reports the whole file as data.
fn data_segments(f: &fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let mut segs = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor `f` owns; no memory is passed.
        let start = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(f.as_raw_fd(), start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (start as u64, (end as u64).min(size));
        if end <= start {
            break;
        }
        segs.push((start, end));
        pos = end;
    }
    Ok(segs)
}

fn sparse_sha256(p: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(p)?;
    let size = f.metadata()?.len();
    let mut h = sha2::Sha256::new();
    let zeros = vec![0u8; 64 * 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    let zero_fill = |h: &mut sha2::Sha256, mut n: u64| {
        while n > 0 {
            let k = n.min(zeros.len() as u64) as usize;
            h.update(&zeros[..k]);
            n -= k as u64;
        }
    };
    for (start, end) in data_segments(&f, size)? {
        zero_fill(&mut h, start - at);
        let mut off = start;
        while off < end {
            let k = ((end - off) as usize).min(buf.len());
            let got = f.read_at(&mut buf[..k], off)?;
            if got == 0 {
                break;
            }
            h.update(&buf[..got]);
            off += got as u64;
        }
        at = off;
    }
    zero_fill(&mut h, size.saturating_sub(at));
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A fixed-length name for any tool-use id, however long or odd: its SHA-256.
fn outbox_name(id: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(id.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies a tree without following its symlinks (they are copied as symlinks); anything but
/// directories, files and symlinks is left out.
/// Copies a session's outputs out of their filesystem without growing them: a sparse file keeps
/// its holes (only its data segments are written) and hard links stay links, so the copy takes
/// no more of the host's disk than the outputs filesystem held, which `outputs_size` bounds.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    copy_tree_linked(from, to, &mut std::collections::HashMap::new())
}

fn copy_tree_linked(
    from: &Path,
    to: &Path,
    linked: &mut std::collections::HashMap<(u64, u64), PathBuf>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            copy_tree_linked(&src, &dst, linked)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
        } else if t.is_file() {
            let meta = fs::symlink_metadata(&src)?;
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = linked.get(&key) {
                    fs::hard_link(first, &dst)?;
                    continue;
                }
                linked.insert(key, dst.clone());
            }
            copy_sparse(&src, &dst, meta.len())?;
            // The file's permission bits, without setuid, setgid or sticky: the copy belongs to
            // the worker's user on the host, and a session's setuid file must not become one.
            fs::set_permissions(&dst, fs::Permissions::from_mode(meta.mode() & 0o777))?;
        }
    }
    Ok(())
}

/// Copies a file's data segments and sets its length: its holes stay holes.
fn copy_sparse(src: &Path, dst: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let from = fs::File::open(src)?;
    let to = fs::OpenOptions::new().write(true).create_new(true).open(dst)?;
    let mut buf = vec![0u8; 256 * 1024];
    for (start, end) in data_segments(&from, size)? {
        let mut off = start;
        while off < end {
            let k = ((end - off) as usize).min(buf.len());
            let got = from.read_at(&mut buf[..k], off)?;
            if got == 0 {
                break;
            }
            to.write_all_at(&buf[..got], off)?;
            off += got as u64;
        }
    }
    to.set_len(size)
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => list_files(root, &p, out),
            Ok(_) => out.push(p.strip_prefix(root).unwrap_or(&p).display().to_string()),
            Err(_) => {}
        }
        if out.len() >= 1000 {
            return;
        }
    }
}

/// Writes `p` whole or not at all. Each write has a temporary file of its own, so two writers
/// of one file (a heartbeat and a restart's resume) never rename each other's half.
fn write_atomic(p: &Path, data: &[u8]) -> Result<(), StateError> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = p.with_extension(format!("{}-{n}.tmp", std::process::id()));
    fs::write(&tmp, data).map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
    fs::rename(&tmp, p).map_err(io(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh state directory holding one item.
    fn held_item() -> (PathBuf, StateDir, ItemRecord, ItemDirs) {
        let root =
            std::env::temp_dir().join(format!("stockade-state-test-{}-{:x}", std::process::id(), fastrand::u64(..)));
        let state = StateDir::open(&root).unwrap();
        let item: WorkItem = serde_json::from_value(serde_json::json!({
            "id": "work_1", "data": {"type": "session", "id": "sesn_1"}, "state": "active"
        }))
        .unwrap();
        let rec = ItemRecord { item, environment_id: "env".into(), started_at: "now".into(), last_heartbeat: None };
        let dirs = state
            .hold(&rec, (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw()), DiskSizes::default())
            .unwrap();
        (root, state, rec, dirs)
    }

    #[test]
    fn concurrent_records_of_one_item_all_land() {
        let (root, state, rec, dirs) = held_item();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (state, rec) = (&state, &rec);
                s.spawn(move || {
                    for i in 0..200 {
                        let mut r = rec.clone();
                        r.last_heartbeat = Some(format!("{t}-{i}"));
                        state.record(&r).unwrap();
                    }
                });
            }
        });
        let left: Vec<_> = fs::read_dir(&dirs.dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 4, "{left:?}");
        assert_eq!(state.held().len(), 1);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn outbox_entries_of_any_id_are_kept_under_a_fixed_length_name() {
        let (root, state, _, dirs) = held_item();
        let long = format!("toolu_{}", "x".repeat(5000));
        for id in [long.as_str(), "../../etc/passwd", "sevt_1"] {
            state.put_outbox(&dirs, id, "bash", &ToolResult::ok(format!("r {}", id.len()))).unwrap();
        }
        let names: Vec<String> = std::fs::read_dir(&dirs.outbox)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.len() == 64 + 5 && n.ends_with(".json")), "{names:?}");
        let mut ids: Vec<String> = state.outbox(&dirs).into_iter().map(|p| p.tool_use_id).collect();
        ids.sort();
        assert_eq!(ids, ["../../etc/passwd".to_owned(), "sevt_1".to_owned(), long.clone()]);
        state.take_outbox(&dirs, &long);
        assert_eq!(state.outbox(&dirs).len(), 2);
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn item(state: &StateDir, work: &str, session: &str) -> (ItemRecord, ItemDirs) {
        let item: WorkItem = serde_json::from_value(serde_json::json!({
            "id": work, "data": {"type": "session", "id": session}, "state": "active"
        }))
        .unwrap();
        let rec = ItemRecord { item, environment_id: "env".into(), started_at: "now".into(), last_heartbeat: None };
        let ids = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        let dirs = state.hold(&rec, ids, DiskSizes::default()).unwrap();
        (rec, dirs)
    }

    /// Each area keeps its entries for its own lifetime, counted from the session's end, as
    /// seen by a sweep after a clock jump; `keep` is forever, `session_end` is never kept, and
    /// the trail of a session still held is never touched.
    #[test]
    fn retention_removes_what_outlived_its_lifetime_and_nothing_else() {
        let (root, state, _, _) = held_item(); // work_1 stays held
        fs::write(state.trail_path(&state.held()[0]), "{}\n").unwrap();
        let day = Duration::from_secs(86_400);
        let r = Retention { outputs: Keep::For(7 * day), workspaces: Keep::For(2 * day), trails: Keep::For(30 * day) };
        let (rec, dirs) = item(&state, "work_2", "sesn_2");
        fs::write(dirs.workspace.join("src.rs"), "fn main() {}").unwrap();
        fs::write(dirs.outputs.join("report.txt"), "done").unwrap();
        fs::write(state.trail_path(&rec), "{}\n").unwrap();
        let kept = state.retire(&rec, &r).unwrap();
        assert_eq!(fs::read_to_string(kept.join("report.txt")).unwrap(), "done");
        let ws = root.join("workspaces/sesn_2-work_2");
        assert_eq!(fs::read_to_string(ws.join("src.rs")).unwrap(), "fn main() {}");
        // A session whose outputs and workspace go at its end leaves neither.
        let gone = Retention { outputs: Keep::SessionEnd, workspaces: Keep::SessionEnd, trails: Keep::Forever };
        let (rec3, dirs3) = item(&state, "work_3", "sesn_3");
        fs::write(dirs3.outputs.join("x"), "x").unwrap();
        assert_eq!(state.retire(&rec3, &gone), None);
        assert!(!root.join("outputs/sesn_3-work_3").exists() && !root.join("workspaces/sesn_3-work_3").exists());
        assert!(!dirs3.dir.exists());

        let now = SystemTime::now();
        assert!(state.sweep(&r, now).is_empty(), "nothing is old yet");
        assert_eq!(state.sweep(&r, now + 3 * day), vec![ws.clone()]);
        assert!(kept.exists());
        assert_eq!(state.sweep(&r, now + 8 * day), vec![kept.clone()]);
        let trail2 = state.trail_path(&rec);
        assert!(trail2.exists());
        let forever = Retention { trails: Keep::Forever, ..r };
        assert!(state.sweep(&forever, now + 365 * day).is_empty());
        assert_eq!(state.sweep(&r, now + 31 * day), vec![trail2]);
        // The held item's trail and its directories are still there.
        assert!(state.trail_path(&state.held()[0]).exists());
        assert!(root.join("items/work_1/workspace").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn kept_outputs_keep_their_holes_and_links_and_digests_are_bounded() {
        use sha2::Digest;
        use std::os::unix::fs::{FileExt, MetadataExt};
        let base = std::env::temp_dir().join(format!("stockade-sparse-{}-{:x}", std::process::id(), fastrand::u64(..)));
        let from = base.join("outputs");
        fs::create_dir_all(from.join("sub")).unwrap();
        // A 4 GiB file with one data block in the middle, and ten hard links to it.
        let big = from.join("big.bin");
        let f = fs::File::create(&big).unwrap();
        f.set_len(4 << 30).unwrap();
        f.write_all_at(b"payload", 1 << 30).unwrap();
        drop(f);
        for i in 0..10 {
            fs::hard_link(&big, from.join("sub").join(format!("link{i}"))).unwrap();
        }
        fs::write(from.join("small.txt"), "hello\n").unwrap();
        let tool = from.join("tool");
        fs::write(&tool, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o4755)).unwrap();

        let to = base.join("kept");
        copy_tree(&from, &to).unwrap();
        let kept = fs::metadata(to.join("big.bin")).unwrap();
        assert_eq!(kept.len(), 4 << 30);
        assert!(kept.blocks() * 512 < 1 << 20, "the copy was written dense: {} blocks", kept.blocks());
        assert_eq!(kept.nlink(), 11, "hard links stay links");
        let mut got = [0u8; 7];
        fs::File::open(to.join("sub/link3")).unwrap().read_exact_at(&mut got, 1 << 30).unwrap();
        assert_eq!(&got, b"payload");
        assert_eq!(fs::read_to_string(to.join("small.txt")).unwrap(), "hello\n");
        // Modes are kept, setuid is not.
        assert_eq!(fs::metadata(to.join("tool")).unwrap().mode() & 0o7777, 0o755);

        // A small sparse file digests as its bytes do; the 4 GiB one is over the budget, once.
        let sparse = base.join("digest");
        fs::create_dir_all(&sparse).unwrap();
        let f = fs::File::create(sparse.join("s.bin")).unwrap();
        f.set_len(3 << 20).unwrap();
        f.write_all_at(b"x", (1 << 20) + 5).unwrap();
        drop(f);
        let want: String =
            sha2::Sha256::digest(fs::read(sparse.join("s.bin")).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        let d = digest_files(&sparse);
        assert_eq!(d[0].sha256.as_deref(), Some(want.as_str()));
        let d = digest_files(&from);
        let big_rec: Vec<&OutputFile> = d.iter().filter(|f| f.size == 4 << 30).collect();
        assert_eq!(big_rec.len(), 11);
        assert!(big_rec.iter().all(|f| f.sha256.is_none() && f.skipped.as_deref().unwrap().contains("digest budget")));
        assert!(d.iter().any(|f| f.path == "small.txt" && f.sha256.is_some()));
        fs::remove_dir_all(&base).unwrap();
    }
}
