//! A session's memory stores, as the official worker keeps them (`lib/tools/_memories.py` of
//! anthropic 2.17.0, `tools/agent-toolset/memories.js` of @anthropic-ai/sdk 1.17.0): each
//! attached store is downloaded into a folder before the skills, stamped with a marker naming
//! it, and reconciled with the API while the session runs — after calls when a sync is due, a
//! push-only flush when the session goes idle, a last sync and flush at the end. The merge rules
//! are the SDK's (see `sync_store`); deletes wait for corroboration and go out with the content
//! hash they expect; a file the API refuses is retried only once it changes.
//!
//! What differs is where the folder is. The official worker runs the agent's tools on its own
//! host; here the folder lives in the item's directory on the host and is bound into the jail
//! at the store's `mount_path` (read-only by the kernel for a `read_only` store). The agent owns
//! its content, so the worker only ever touches it through `files::FileStore`, which never
//! follows a link. A `write` or `edit` into a writable folder comes back from the jail unmade
//! (`tools::MemoryWrite`); `write_file` saves it to the store first, then writes the file.

pub(crate) mod files;
mod sync;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::control_plane::wire::MemoryStoreResource;
use crate::control_plane::{ApiError, Client};
use crate::session::trail::TrailWriter;
use files::{FileError, FileStore};

/// How often the stores sync back while the session runs, checked after each call.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(15);
/// The shortest interval allowed: each sync lists every attached store.
pub const MIN_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on each teardown pass (the final sync, then the flush), and on one memory write.
pub(crate) const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a file must stay missing before its server delete goes out.
const DELETE_CORROBORATION: Duration = Duration::from_secs(30);
const DELETE_CAP_FLOOR: usize = 8;
const DELETE_CAP_CEILING: usize = 50;
/// The reserved file at every store root: `version 1` and the store's id.
pub(crate) const MARKER: &str = ".anthropic-memory-store";

const NOT_SAVED: &str = "not saved to memory, so the change was not made";
const NOT_CONFIRMED: &str = "the memory store did not confirm the change, so read the file again before you retry";

/// Whether a file deleted in a folder may delete its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum DeleteMode {
    /// A file deleted in the folder (and still missing 30 s later) deletes its memory.
    Enabled,
    /// Run every check and only log what would be deleted.
    LogOnly,
    /// Never delete a memory because its file is gone.
    Disabled,
}

/// A store that cannot be put in place: the session fails with it, as the official worker's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct MemoryError(pub String);

fn marker_text(id: &str) -> String {
    format!("version 1\n{id}")
}

fn sha(b: &[u8]) -> String {
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// A `mount_path` usable as is: absolute, without `..`.
fn legal(path: &str) -> bool {
    path.starts_with('/') && !path.split('/').any(|c| c == "..")
}

/// What is kept of a store between runs of the worker (beside its folder, outside the jail),
/// so a restarted worker goes on syncing instead of taking the folder for new.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Kept {
    baseline: BTreeMap<String, String>,
    ids: BTreeMap<String, String>,
    refused: BTreeMap<String, String>,
}

struct Store {
    id: String,
    /// Where the jail sees it.
    mount: PathBuf,
    files: FileStore,
    read_only: bool,
    /// rel → content sha as of the last download or successful sync.
    baseline: BTreeMap<String, String>,
    /// rel → sha the server refused; retried once the file changes.
    refused: HashMap<String, String>,
    /// rel → when first seen missing.
    pending_deletes: HashMap<String, Instant>,
    /// rel → shas sent whose outcome is unknown.
    sent: HashMap<String, HashSet<String>>,
    /// rel → sha on disk before a write whose send is in `sent`.
    before_write: HashMap<String, Option<String>>,
    /// Missing after a stopped call: pulled again, never deleted.
    to_restore: HashSet<String>,
    /// rel → memory id.
    ids: HashMap<String, String>,
    state_file: PathBuf,
}

impl Store {
    fn keep(&self) {
        let k = Kept {
            baseline: self.baseline.clone(),
            ids: self.ids.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            refused: self.refused.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
        };
        let tmp = self.state_file.with_extension("json-new");
        let data = serde_json::to_vec(&k).expect("serialises");
        if std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, &self.state_file)).is_err() {
            tracing::warn!(memory_store_id = %self.id, "could not keep the store's sync state; a restart re-downloads it");
        }
    }
}

/// What one scan found: the files, and whether the marker names this store.
struct Scan {
    files: BTreeMap<String, String>,
    marker_ok: bool,
    why: &'static str,
    skipped: usize,
    truncated: bool,
}

/// Counts of one sync, for the trail.
#[derive(Debug, Default, Serialize)]
struct Counts {
    uploaded: usize,
    pulled: usize,
    deleted_remote: usize,
    deleted_local: usize,
    refused: usize,
    held_deletes: usize,
    skipped: usize,
    truncated: bool,
}

/// Where the folders go and what the jail is given of them.
pub(crate) struct Placed {
    /// (host folder, jail path, read-only) per store: `stockade session --memory-store`.
    pub mounts: Vec<(PathBuf, PathBuf, bool)>,
}

pub(crate) struct SessionMemory {
    client: Client,
    stores: Vec<Store>,
    interval: Duration,
    deletes: DeleteMode,
    last_sync: Instant,
    finished: bool,
    trail: Option<std::sync::Arc<TrailWriter>>,
}

impl SessionMemory {
    /// The stores of `session`, each given a folder under `dir` (the item's `memory/`). Fails
    /// as the official worker does on a `mount_path` it cannot use verbatim.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan(
        client: Client,
        resources: &[MemoryStoreResource],
        dir: &Path,
        workdir: &str,
        owner: (u32, u32),
        interval: Duration,
        deletes: DeleteMode,
        trail: Option<std::sync::Arc<TrailWriter>>,
    ) -> Result<SessionMemory, MemoryError> {
        let mut stores = Vec::new();
        for (i, r) in resources.iter().enumerate() {
            let mount = match r.mount_path.as_deref().filter(|p| !p.is_empty()) {
                Some(p) if !legal(p) => {
                    return Err(MemoryError(format!(
                        "memory store mount_path is not a clean absolute path: {} (memory_store_id={})",
                        crate::tools::pyfmt::repr(p),
                        r.memory_store_id
                    )))
                }
                Some(p) => Path::new(p).components().collect(),
                None => Path::new(workdir).join("memory").join(r.name.as_deref().unwrap_or(&r.memory_store_id)),
            };
            if stores.iter().any(|s: &Store| s.mount.starts_with(&mount) || mount.starts_with(&s.mount)) {
                return Err(MemoryError(format!(
                    "two memory stores would share the folder {} (memory_store_id={})",
                    mount.display(),
                    r.memory_store_id
                )));
            }
            stores.push(Store {
                id: r.memory_store_id.clone(),
                mount,
                files: FileStore::new(dir.join(i.to_string()), owner),
                read_only: r.read_only(),
                baseline: BTreeMap::new(),
                refused: HashMap::new(),
                pending_deletes: HashMap::new(),
                sent: HashMap::new(),
                before_write: HashMap::new(),
                to_restore: HashSet::new(),
                ids: HashMap::new(),
                state_file: dir.join(format!("{i}.json")),
            });
        }
        Ok(SessionMemory { client, stores, interval, deletes, last_sync: Instant::now(), finished: false, trail })
    }

    /// Makes the mount points of folders placed below the workspace or the outputs, in those
    /// host directories (the jail cannot make them in an id-mapped tree); never through a link
    /// the agent left there.
    pub(crate) fn make_mount_points(
        &self,
        workspace: &Path,
        outputs: &Path,
        owner: (u32, u32),
    ) -> Result<(), MemoryError> {
        for s in &self.stores {
            for (inside, host) in [("/workspace", workspace), ("/mnt/session/outputs", outputs)] {
                let Ok(rel) = s.mount.strip_prefix(inside) else { continue };
                let rel = rel.to_string_lossy();
                if rel.is_empty() {
                    return Err(MemoryError(format!(
                        "memory store mount_path {} would hide {inside} (memory_store_id={})",
                        s.mount.display(),
                        s.id
                    )));
                }
                FileStore::new(host.to_path_buf(), owner).make_dirs(&rel).map_err(|e| {
                    MemoryError(format!("cannot make the memory store's folder {}: {e}", s.mount.display()))
                })?;
            }
        }
        Ok(())
    }

    pub(crate) fn placed(&self) -> Placed {
        Placed {
            mounts: self.stores.iter().map(|s| (s.files.root().to_path_buf(), s.mount.clone(), s.read_only)).collect(),
        }
    }

    pub(super) fn record(&self, event: &str, v: serde_json::Value) {
        if let (Some(t), serde_json::Value::Object(m)) = (&self.trail, v) {
            t.record(event, m);
        }
    }

    /// Puts every store in place: a store a previous run of this worker left (its sync state
    /// kept beside it) goes on from where it was; any other is downloaded into a new folder.
    pub(crate) async fn download(&mut self) -> Result<(), MemoryError> {
        for i in 0..self.stores.len() {
            let resumed = {
                let s = &mut self.stores[i];
                match std::fs::read(&s.state_file).ok().and_then(|b| serde_json::from_slice::<Kept>(&b).ok()) {
                    Some(k) if s.files.root().is_dir() => {
                        s.baseline = k.baseline;
                        s.ids = k.ids.into_iter().collect();
                        s.refused = k.refused.into_iter().collect();
                        true
                    }
                    _ => false,
                }
            };
            if resumed {
                tracing::info!(memory_store_id = %self.stores[i].id, "memory store folder kept from before a restart");
                continue;
            }
            let s = &self.stores[i];
            let _ = s.files.dispose();
            if let Err(e) = s.files.create_root() {
                return Err(MemoryError(format!(
                    "cannot create the memory store's folder: {} (memory_store_id={}): {e}; the worker host must make \
                     this mount path writable",
                    s.mount.display(),
                    s.id
                )));
            }
            if let Err(e) = self.stamp_and_pull(i).await {
                let s = &self.stores[i];
                let _ = s.files.dispose();
                return Err(MemoryError(format!("failed to download memory store memory_store_id={}: {e}", s.id)));
            }
            let s = &self.stores[i];
            tracing::info!(memory_store_id = %s.id, memories = s.baseline.len(), mount = %s.mount.display(), "memory store downloaded");
            self.record(
                "memory",
                serde_json::json!({"action": "download", "memory_store_id": s.id, "mount_path": s.mount,
                                   "memories": s.baseline.len(), "read_only": s.read_only}),
            );
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Writes the marker, then pulls every memory; pushes nothing.
    pub(super) async fn stamp_and_pull(&mut self, i: usize) -> Result<(), String> {
        let client = self.client.clone();
        let s = &mut self.stores[i];
        s.baseline.clear();
        s.sent.clear();
        s.pending_deletes.clear();
        s.to_restore.clear();
        s.files.put(MARKER, marker_text(&s.id).as_bytes(), false).map_err(|e| e.to_string())?;
        let mut page: Option<String> = None;
        let mut n = 0usize;
        loop {
            let p = client.list_memories(&s.id, true, page.as_deref()).await.map_err(|e| e.to_string())?;
            for m in p.data.into_iter().filter(|m| m.kind == "memory" || m.kind.is_empty()) {
                let rel = m.path.trim_start_matches('/').to_owned();
                if rel == MARKER {
                    continue;
                }
                n += 1;
                if n > crate::control_plane::local::memory::MAX_MEMORIES * 2 {
                    return Err("the store lists more memories than a store may hold".into());
                }
                s.ids.insert(rel.clone(), m.id.clone());
                match s.files.put(&rel, m.content.unwrap_or_default().as_bytes(), false) {
                    Ok(()) => {
                        s.baseline.insert(rel, m.content_sha256);
                    }
                    Err(e) => {
                        tracing::warn!(memory_store_id = %s.id, path = %rel, error = %e, "failed to write memory")
                    }
                }
            }
            match p.next_page {
                Some(n) if !n.is_empty() => page = Some(n),
                _ => break,
            }
        }
        s.keep();
        Ok(())
    }

    /// Saves a `write` or `edit` of a file in a writable store's folder, then writes the file.
    /// `Ok(false)`: the path is in no store's folder. The error is the text the tool reports.
    pub(crate) async fn write_file(
        &mut self,
        path: &Path,
        content: &str,
        replacing: Option<&str>,
    ) -> Result<bool, String> {
        let Some(i) = self.stores.iter().position(|s| !s.read_only && path.starts_with(&s.mount)) else {
            return Ok(false);
        };
        let rel =
            path.strip_prefix(&self.stores[i].mount).map(|r| r.to_string_lossy().into_owned()).unwrap_or_default();
        match tokio::time::timeout(FLUSH_TIMEOUT, self.save(i, &rel, content, replacing)).await {
            Ok(r) => r.map(|()| true),
            Err(_) => Err(format!("{NOT_CONFIRMED}: no answer within {} seconds", FLUSH_TIMEOUT.as_secs())),
        }
    }

    async fn save(&mut self, i: usize, rel: &str, content: &str, replacing: Option<&str>) -> Result<(), String> {
        if rel == MARKER {
            return Err(format!("{NOT_SAVED}: this file marks the folder as a memory store."));
        }
        if rel.contains('\\') {
            return Err(format!("{NOT_SAVED}: a path with a backslash cannot sync."));
        }
        let fs_refusal = |e: FileError| match e {
            FileError::Refused { why, .. } => format!("{NOT_SAVED}: the path {why}"),
            FileError::Io { source, .. } => source.to_string(),
        };
        let s = &self.stores[i];
        if s.files.hash_file(MARKER).ok().flatten() != Some(sha(marker_text(&s.id).as_bytes())) {
            return Err(format!("{NOT_SAVED}: the folder cannot sync without its original {MARKER} file."));
        }
        let on_disk = s.files.hash_file(rel).map_err(fs_refusal)?;
        if let Some(r) = replacing {
            if on_disk.as_deref() != Some(sha(r.as_bytes()).as_str()) {
                return Err(format!("{NOT_SAVED}: the file changed in the meantime. Read it again before you retry."));
            }
        }
        if self.stores[i].sent.contains_key(rel) {
            let _ = self.list_and_settle(i).await;
        }
        let s = &mut self.stores[i];
        let existing = match (s.ids.get(rel), s.baseline.get(rel)) {
            (Some(id), Some(base)) => Some((id.clone(), base.clone())),
            _ => None,
        };
        s.before_write.insert(rel.to_owned(), on_disk);
        let sent = match self.send(i, rel, content, existing.clone()).await {
            Err(ApiError::NotFound(_)) if existing.is_some() => self.send(i, rel, content, None).await,
            r => r,
        };
        let digest = match sent {
            Ok(d) => d,
            Err(ApiError::Conflict(m)) => {
                // A retry of an upload that was saved is refused too: the listing tells.
                let want = sha(content.as_bytes());
                let listed =
                    self.list_and_settle(i).await.ok().and_then(|r| r.get(rel).map(|m| m.content_sha256.clone()));
                if listed.as_deref() != Some(want.as_str()) {
                    self.sync_store(i, false).await;
                    return Err(format!("{NOT_SAVED}: {m}. Read the file again before you retry."));
                }
                want
            }
            Err(ApiError::Rejected { message, .. }) | Err(ApiError::Auth { message, .. }) => {
                return Err(format!("{NOT_SAVED}: {message}"))
            }
            Err(ApiError::NotFound(m)) | Err(ApiError::LeaseLost(m)) => return Err(format!("{NOT_SAVED}: {m}")),
            // A status below 500 is a refusal, as the official worker reads it.
            Err(e @ ApiError::RateLimited { .. }) => return Err(format!("{NOT_SAVED}: {e}")),
            Err(ApiError::Server { message, .. }) => return Err(format!("{NOT_CONFIRMED}: {message}")),
            Err(e) => return Err(format!("{NOT_CONFIRMED}: {e}")),
        };
        let s = &mut self.stores[i];
        let executable = s.files.executable(rel);
        if let Err(e) = s.files.put(rel, content.as_bytes(), executable) {
            tracing::warn!(memory_store_id = %s.id, path = rel, error = %e, "saved to the store but not written");
            s.sent.insert(rel.to_owned(), [digest].into());
            return Err("the memory store saved this, but the file could not be written.".into());
        }
        s.baseline.insert(rel.to_owned(), digest);
        s.sent.remove(rel);
        s.keep();
        Ok(())
    }

    /// Removes the folders, and their kept state, at the item's end; a folder whose files fail
    /// the marker check is kept, as found.
    pub(crate) fn dispose(&mut self) {
        for i in 0..self.stores.len() {
            let scan = self.scan(i);
            let s = &self.stores[i];
            if !scan.marker_ok && !scan.files.is_empty() {
                tracing::warn!(memory_store_id = %s.id, reason = scan.why, root = %s.files.root().display(), "leaving the memory store folder on disk");
                continue;
            }
            if let Err(e) = s.files.dispose() {
                tracing::warn!(memory_store_id = %s.id, error = %e, "failed to remove the memory store folder");
            }
            let _ = std::fs::remove_file(&s.state_file);
        }
    }
}
