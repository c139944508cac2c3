//! The syncs of a session's memory stores: each reconciles a folder with its store by the
//! official worker's rules (`sync_store`, path by path in `sync_path`), a flush only pushes, and
//! a store whose folder was destroyed is downloaded again rather than taken for deletions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use super::{
    marker_text, sha, Counts, DeleteMode, Scan, SessionMemory, DELETE_CAP_CEILING, DELETE_CAP_FLOOR,
    DELETE_CORROBORATION, MARKER,
};
use crate::control_plane::wire::Memory;
use crate::control_plane::ApiError;

impl SessionMemory {
    pub(super) fn scan(&mut self, i: usize) -> Scan {
        let s = &mut self.stores[i];
        let recorded = std::mem::take(&mut s.to_restore);
        // A walk reads up to 10,000 names (and hashes what changed): off the runtime's threads.
        let tree = match tokio::task::block_in_place(|| s.files.hashtree()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(memory_store_id = %s.id, error = %e, "cannot read the memory store folder");
                s.to_restore = recorded;
                return Scan {
                    files: BTreeMap::new(),
                    marker_ok: false,
                    why: "the folder cannot be read",
                    skipped: 0,
                    truncated: false,
                };
            }
        };
        let mut files = tree.files;
        let marker = files.remove(MARKER);
        let ok = marker.as_deref() == Some(&sha(marker_text(&s.id).as_bytes()));
        s.to_restore = if ok { recorded.into_iter().filter(|r| !files.contains_key(r)).collect() } else { recorded };
        Scan {
            files,
            marker_ok: ok,
            why: if marker.is_some() { "the marker file does not match this store" } else { "the marker file is gone" },
            skipped: tree.skipped,
            truncated: tree.truncated,
        }
    }

    /// One sync when the interval has passed since the last.
    pub(crate) async fn sync_if_due(&mut self) {
        if self.last_sync.elapsed() < self.interval {
            return;
        }
        self.sync_all(false).await;
    }

    /// The session's last sync, at a clean end: deletes skip their waiting window.
    pub(crate) async fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.sync_all(true).await;
    }

    async fn sync_all(&mut self, last: bool) {
        for i in 0..self.stores.len() {
            self.sync_store(i, last).await;
        }
        self.last_sync = Instant::now();
    }

    /// Files missing now (after a stopped call) are pulled again instead of deleted.
    pub(crate) fn restore_missing(&mut self) {
        for s in &mut self.stores {
            let local: BTreeSet<String> = tokio::task::block_in_place(|| s.files.hashtree())
                .map(|t| t.files.into_keys().collect())
                .unwrap_or_default();
            let known: Vec<String> = s.baseline.keys().chain(s.sent.keys()).cloned().collect();
            s.to_restore.extend(known.into_iter().filter(|r| !local.contains(r)));
        }
    }

    async fn recover(&mut self, i: usize, why: &str) {
        let s = &self.stores[i];
        tracing::warn!(memory_store_id = %s.id, reason = why, "re-downloading the memory store folder instead of syncing");
        self.record("memory", serde_json::json!({"action": "recover", "memory_store_id": s.id, "reason": why}));
        if let Err(e) = s.files.create_root() {
            tracing::warn!(memory_store_id = %s.id, error = %e, "cannot re-create the memory store folder");
            return;
        }
        if let Err(e) = self.stamp_and_pull(i).await {
            tracing::warn!(memory_store_id = %self.stores[i].id, error = %e, "memory store re-download failed");
        }
    }

    /// Lists a store (content-free) and settles sends whose answer never came.
    pub(super) async fn list_and_settle(&mut self, i: usize) -> Result<HashMap<String, Memory>, ApiError> {
        let client = self.client.clone();
        let s = &mut self.stores[i];
        let mut remote = HashMap::new();
        let mut page: Option<String> = None;
        loop {
            let p = client.list_memories(&s.id, false, page.as_deref()).await?;
            for m in p.data.into_iter().filter(|m| m.kind == "memory" || m.kind.is_empty()) {
                let rel = m.path.trim_start_matches('/').to_owned();
                if rel != MARKER {
                    remote.insert(rel, m);
                }
            }
            match p.next_page {
                Some(n) if !n.is_empty() => page = Some(n),
                _ => break,
            }
        }
        s.ids = remote.iter().map(|(r, m)| (r.clone(), m.id.clone())).collect();
        let local = if s.sent.is_empty() {
            BTreeMap::new()
        } else {
            tokio::task::block_in_place(|| s.files.hashtree()).map(|t| t.files).unwrap_or_default()
        };
        let mut kept = HashMap::new();
        for (rel, shas) in std::mem::take(&mut s.sent) {
            let Some(listed) = remote.get(&rel) else { continue };
            if !shas.contains(&listed.content_sha256) {
                continue;
            }
            let before = s.before_write.get(&rel);
            if before.is_some_and(|b| !local.contains_key(&rel) || local.get(&rel) == b.as_ref()) {
                kept.insert(rel, shas);
            } else {
                s.baseline.insert(rel, listed.content_sha256.clone());
            }
        }
        s.before_write.retain(|r, _| kept.contains_key(r));
        s.sent = kept;
        Ok(remote)
    }

    pub(super) async fn sync_store(&mut self, i: usize, last: bool) {
        let scan = self.scan(i);
        let mut counts = Counts { skipped: scan.skipped, truncated: scan.truncated, ..Counts::default() };
        if !scan.marker_ok {
            if !scan.files.is_empty() {
                let s = &self.stores[i];
                tracing::warn!(memory_store_id = %s.id, reason = scan.why, "leaving the memory store folder as found and not syncing");
                self.record(
                    "memory",
                    serde_json::json!({"action": "sync_refused", "memory_store_id": s.id, "reason": scan.why}),
                );
                return;
            }
            self.recover(i, "the folder or its marker is gone").await;
            return;
        }
        let remote = match self.list_and_settle(i).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(memory_store_id = %self.stores[i].id, error = %e, "memory sync failed");
                return;
            }
        };
        let local = scan.files;
        if local.is_empty() && self.stores[i].baseline.len() > 1 {
            self.recover(i, "every memory file is gone at once").await;
            return;
        }
        let cap = (self.stores[i].baseline.len() / 4).clamp(DELETE_CAP_FLOOR, DELETE_CAP_CEILING);
        let mut attempted = 0usize;
        let mut pulls: Vec<(String, Memory)> = Vec::new();
        let paths: BTreeSet<String> =
            remote.keys().chain(local.keys()).chain(self.stores[i].baseline.keys()).cloned().collect();
        for rel in paths {
            let r = remote.get(&rel).cloned();
            let local_sha = local.get(&rel).cloned();
            let s = &self.stores[i];
            let base = s.baseline.get(&rel).cloned();
            let delete_candidate = local_sha.is_none()
                && base.is_some()
                && r.as_ref().is_some_and(|m| Some(&m.content_sha256) == base.as_ref())
                && !s.read_only
                && !s.to_restore.contains(&rel);
            let new = if delete_candidate {
                let (r, base) = (r.expect("checked"), base.expect("checked"));
                self.corroborated_delete(i, &rel, &r, &base, last, cap, &mut attempted, &mut counts).await
            } else {
                self.sync_path(i, &rel, r, local_sha, &mut pulls, &mut counts).await
            };
            let s = &mut self.stores[i];
            match new {
                Some(sha) => s.baseline.insert(rel, sha),
                None => s.baseline.remove(&rel),
            };
        }
        self.pull_all(i, pulls, &mut counts).await;
        let s = &self.stores[i];
        s.keep();
        if counts.held_deletes > 0 {
            tracing::warn!(memory_store_id = %s.id, sent = attempted, held = counts.held_deletes, "delete cap reached; the rest wait for later syncs");
        }
        self.record(
            "memory",
            serde_json::json!({"action": if last { "final_sync" } else { "sync" }, "memory_store_id": s.id, "counts": counts}),
        );
    }

    #[allow(clippy::too_many_arguments)]
    async fn corroborated_delete(
        &mut self,
        i: usize,
        rel: &str,
        remote: &Memory,
        base: &str,
        waive_window: bool,
        cap: usize,
        attempted: &mut usize,
        counts: &mut Counts,
    ) -> Option<String> {
        if self.deletes == DeleteMode::Disabled {
            return Some(base.to_owned());
        }
        let s = &mut self.stores[i];
        let first = *s.pending_deletes.entry(rel.to_owned()).or_insert_with(Instant::now);
        if !waive_window && first.elapsed() < DELETE_CORROBORATION {
            return Some(base.to_owned());
        }
        // Checked again now: the folder may have gone meanwhile.
        let marker_ok = s.files.hash_file(MARKER).ok().flatten() == Some(sha(marker_text(&s.id).as_bytes()));
        let still_absent = matches!(s.files.hash_file(rel), Ok(None));
        if !marker_ok {
            return Some(base.to_owned());
        }
        if !still_absent {
            s.pending_deletes.remove(rel);
            return Some(base.to_owned());
        }
        if *attempted >= cap {
            counts.held_deletes += 1;
            return Some(base.to_owned());
        }
        *attempted += 1;
        if self.deletes == DeleteMode::LogOnly {
            tracing::info!(memory_store_id = %s.id, path = rel, "log-only: sync would delete this memory on the server");
            return Some(base.to_owned());
        }
        match self.client.delete_memory(&s.id, &remote.id, base).await {
            Ok(()) | Err(ApiError::NotFound(_)) => {
                tracing::info!(memory_store_id = %s.id, path = rel, "propagated local deletion");
                s.pending_deletes.remove(rel);
                counts.deleted_remote += 1;
                None
            }
            Err(ApiError::Conflict(_)) | Err(ApiError::LeaseLost(_)) => {
                tracing::warn!(memory_store_id = %s.id, path = rel, "memory deleted locally but changed remotely; keeping the remote version");
                Some(base.to_owned())
            }
            Err(e) => {
                tracing::warn!(memory_store_id = %s.id, path = rel, error = %e, "failed to delete memory");
                Some(base.to_owned())
            }
        }
    }

    /// The SDK's per-path merge; returns the path's new baseline.
    async fn sync_path(
        &mut self,
        i: usize,
        rel: &str,
        remote: Option<Memory>,
        local_sha: Option<String>,
        pulls: &mut Vec<(String, Memory)>,
        counts: &mut Counts,
    ) -> Option<String> {
        let s = &mut self.stores[i];
        let base = s.baseline.get(rel).cloned();
        if local_sha.is_some() {
            s.pending_deletes.remove(rel);
        }
        let Some(remote) = remote else {
            let mut local_sha = match local_sha {
                None => {
                    s.pending_deletes.remove(rel);
                    return None;
                }
                Some(l) => l,
            };
            if let Some(base) = &base {
                if local_sha == *base {
                    // Deleted on the server, unchanged here: removed here too, if still so.
                    match s.files.hash_file(rel) {
                        Ok(None) => return None,
                        Ok(Some(fresh)) if fresh == *base => {
                            return match s.files.remove(rel) {
                                Ok(()) => {
                                    counts.deleted_local += 1;
                                    None
                                }
                                Err(_) => Some(base.clone()),
                            }
                        }
                        Ok(Some(fresh)) => local_sha = fresh,
                        Err(_) => return Some(base.clone()),
                    }
                }
                if s.read_only {
                    tracing::warn!(memory_store_id = %s.id, path = rel, "memory deleted remotely but edited locally; a read-only store keeps the file unsynced");
                }
            }
            if s.read_only || s.refused.get(rel) == Some(&local_sha) {
                return None;
            }
            return self.upload(i, rel, &local_sha, None, counts).await;
        };
        let remote_sha = remote.content_sha256.clone();
        let remote_changed = Some(&remote_sha) != base.as_ref();
        let edited = local_sha.as_ref().is_some_and(|l| Some(l) != base.as_ref() && *l != remote_sha);
        let local_changed = !s.read_only && edited;
        if local_sha.is_none() && base.is_some() {
            if remote_changed {
                tracing::warn!(memory_store_id = %s.id, path = rel, "memory deleted locally but changed remotely; restoring the remote version");
            }
            if remote_changed || s.to_restore.contains(rel) {
                s.pending_deletes.remove(rel);
                pulls.push((rel.to_owned(), remote));
            }
            return base;
        }
        if remote_changed {
            if local_sha.as_ref() == Some(&remote_sha) {
                return Some(remote_sha);
            }
            if edited {
                tracing::warn!(memory_store_id = %s.id, path = rel, "memory changed both locally and remotely; keeping the remote version");
            }
            pulls.push((rel.to_owned(), remote));
            return base;
        }
        if local_changed {
            let l = local_sha.expect("local_changed implies a file");
            if s.refused.get(rel) == Some(&l) {
                return Some(remote_sha);
            }
            return Some(self.upload(i, rel, &l, Some(&remote), counts).await.unwrap_or(remote_sha));
        }
        Some(remote_sha)
    }

    /// Fetches and writes the memories a sync decided to pull.
    async fn pull_all(&mut self, i: usize, pulls: Vec<(String, Memory)>, counts: &mut Counts) {
        let client = self.client.clone();
        for (rel, listed) in pulls {
            let s = &mut self.stores[i];
            let m = match client.get_memory(&s.id, &listed.id).await {
                Ok(m) => m,
                Err(ApiError::NotFound(_)) => continue,
                Err(e) => {
                    tracing::warn!(memory_store_id = %s.id, path = %rel, error = %e, "failed to fetch memory content");
                    continue;
                }
            };
            match s.files.put(&rel, m.content.unwrap_or_default().as_bytes(), false) {
                Ok(()) => {
                    s.baseline.insert(rel.clone(), m.content_sha256);
                    s.to_restore.remove(&rel);
                    counts.pulled += 1;
                }
                Err(e) => tracing::warn!(memory_store_id = %s.id, path = %rel, error = %e, "failed to write memory"),
            }
        }
    }

    /// Pushes one file; `None` keeps the old baseline so that the next pass tries again.
    async fn upload(
        &mut self,
        i: usize,
        rel: &str,
        local_sha: &str,
        existing: Option<&Memory>,
        counts: &mut Counts,
    ) -> Option<String> {
        let s = &mut self.stores[i];
        let data = match s.files.get_text(rel) {
            Ok(Some(d)) => d,
            Ok(None) => return None,
            Err(e) => {
                if e.refused().is_some() {
                    self.refuse(i, rel, local_sha, &e.to_string(), counts);
                } else {
                    tracing::warn!(memory_store_id = %s.id, path = rel, error = %e, "failed to upload memory");
                }
                return None;
            }
        };
        let existing = existing.map(|m| (m.id.clone(), m.content_sha256.clone()));
        match self.send(i, rel, &data, existing.clone()).await {
            Ok(sha) => {
                counts.uploaded += 1;
                Some(sha)
            }
            Err(ApiError::NotFound(_)) if existing.is_some() => match self.send(i, rel, &data, None).await {
                Ok(sha) => {
                    counts.uploaded += 1;
                    Some(sha)
                }
                Err(e) => {
                    self.upload_failed(i, rel, local_sha, false, e, counts);
                    None
                }
            },
            Err(e) => {
                self.upload_failed(i, rel, local_sha, existing.is_some(), e, counts);
                None
            }
        }
    }

    fn upload_failed(
        &mut self,
        i: usize,
        rel: &str,
        local_sha: &str,
        existing: bool,
        e: ApiError,
        counts: &mut Counts,
    ) {
        let id = self.stores[i].id.clone();
        match e {
            ApiError::Conflict(_) if existing => {
                tracing::warn!(memory_store_id = %id, path = rel, "memory changed both locally and remotely; the upload was refused and the local edit loses");
            }
            ApiError::Rejected { status: 400 | 413, message } => self.refuse(i, rel, local_sha, &message, counts),
            e => tracing::warn!(memory_store_id = %id, path = rel, error = %e, "failed to upload memory"),
        }
    }

    /// A file the API (or the bounds) will not take: kept unsynced until it changes.
    fn refuse(&mut self, i: usize, rel: &str, local_sha: &str, why: &str, counts: &mut Counts) {
        let s = &mut self.stores[i];
        s.refused.insert(rel.to_owned(), local_sha.to_owned());
        counts.refused += 1;
        tracing::warn!(memory_store_id = %s.id, path = rel, rejection = why, "the memory file stays un-synced until its content changes");
        let id = s.id.clone();
        self.record(
            "memory",
            serde_json::json!({"action": "refused", "memory_store_id": id, "path": rel, "reason": why}),
        );
    }

    pub(super) async fn send(
        &mut self,
        i: usize,
        rel: &str,
        data: &str,
        existing: Option<(String, String)>,
    ) -> Result<String, ApiError> {
        let client = self.client.clone();
        let s = &mut self.stores[i];
        let digest = sha(data.as_bytes());
        let unsettled = s.sent.get(rel).cloned().unwrap_or_default();
        s.sent.entry(rel.to_owned()).or_default().insert(digest);
        let r = match &existing {
            None => client.create_memory(&s.id, &format!("/{rel}"), data).await,
            Some((id, base)) => client.update_memory(&s.id, id, data, base).await,
        };
        match r {
            Ok(m) => {
                s.refused.remove(rel);
                s.sent.remove(rel);
                s.ids.insert(rel.to_owned(), m.id.clone());
                Ok(m.content_sha256)
            }
            Err(e @ ApiError::Rejected { status: 400 | 413, .. }) => {
                s.sent.remove(rel);
                if !unsettled.is_empty() {
                    s.sent.insert(rel.to_owned(), unsettled);
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Push-only: uploads new and changed files, sends no deletes and pulls nothing.
    pub(crate) async fn flush_writes(&mut self) {
        for i in 0..self.stores.len() {
            if self.stores[i].read_only {
                continue;
            }
            let scan = self.scan(i);
            if !scan.marker_ok {
                tracing::warn!(memory_store_id = %self.stores[i].id, reason = scan.why, "not uploading anything from the memory store folder");
                continue;
            }
            let s = &self.stores[i];
            let dirty: BTreeMap<String, String> = scan
                .files
                .into_iter()
                .filter(|(rel, sha)| {
                    (Some(sha) != s.baseline.get(rel) || s.sent.contains_key(rel)) && s.refused.get(rel) != Some(sha)
                })
                .collect();
            if dirty.is_empty() {
                continue;
            }
            let remote = match self.list_and_settle(i).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(memory_store_id = %self.stores[i].id, error = %e, "memory flush failed");
                    continue;
                }
            };
            let mut counts = Counts::default();
            for (rel, local_sha) in dirty {
                let s = &mut self.stores[i];
                let base = s.baseline.get(&rel).cloned();
                let existing = remote.get(&rel);
                if Some(&local_sha) == base.as_ref() {
                    continue;
                }
                if existing.is_some_and(|m| m.content_sha256 == local_sha) {
                    s.baseline.insert(rel, local_sha);
                    continue;
                }
                if existing.is_some_and(|m| Some(&m.content_sha256) != base.as_ref()) {
                    tracing::warn!(memory_store_id = %s.id, path = %rel, "memory changed both locally and remotely; the flush leaves the remote version");
                    continue;
                }
                if let Some(sha) = self.upload(i, &rel, &local_sha, existing, &mut counts).await {
                    self.stores[i].baseline.insert(rel, sha);
                }
            }
            let s = &self.stores[i];
            s.keep();
            self.record("memory", serde_json::json!({"action": "flush", "memory_store_id": s.id, "counts": counts}));
        }
    }
}
