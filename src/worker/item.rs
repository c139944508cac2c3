//! One work item, from ack to stop: its directories, its jail, the lease heartbeat, the
//! session's tool calls and their results. The flow is the official worker's
//! (`anthropic.lib.environments.EnvironmentWorker`): heartbeat first, then the session's event
//! stream plus a full listing of its history, the tool calls (`calls`), and a forced stop at the
//! end unless the lease was lost.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::Instrument;

use super::lease::{changed, heartbeat, signals, stop_item, Lease, LeaseClock};
use super::runner::{RunnerError, SessionProcess};
use super::state::{ItemDirs, ItemRecord};
use super::view::View;
use super::{Ctx, Shutdown};
use crate::control_plane::client::EventStream;
use crate::control_plane::wire::{WorkItem, WorkSecret, HISTORY_EVENT_TYPES};
use crate::control_plane::{ApiError, Backoff, Client, Secret};
use crate::session::trail::TrailWriter;
use crate::util::rfc3339;

/// Events per listing page (the most the API gives).
pub(super) const LIST_LIMIT: u32 = 1000;

/// How an item's session ended.
#[derive(Debug)]
pub(super) enum End {
    /// The agent's turn ended and stayed ended for `max_idle`, or the session was terminated.
    Completed(&'static str),
    /// The control plane asked for it.
    Stopped {
        forced: bool,
    },
    /// The worker is shutting down: the item is left to its lease (a restarted worker resumes
    /// it; otherwise it returns to the queue when the lease runs out).
    Left {
        reason: String,
    },
    Lost,
    Failed(String),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Completed(why) => format!("completed ({why})"),
            End::Stopped { forced: true } => "stopped (forced)".into(),
            End::Stopped { forced: false } => "stopped".into(),
            End::Left { reason } => format!("left to its lease ({reason})"),
            End::Lost => "lease lost".into(),
            End::Failed(m) => format!("failed: {m}"),
        }
    }
}

/// The client for one item's own calls: its sessions token when the poll carried one,
/// otherwise the environment key.
fn item_client(ctx: &Ctx, item: &WorkItem) -> Client {
    let Some(secret) = item.secret.as_deref() else { return ctx.client.clone() };
    match WorkSecret::decode(secret) {
        Some(s) => ctx.client.with_bearer(Secret::new(s.sessions_token.clone()), s.api_base_url.as_deref()),
        None => {
            tracing::warn!("the work item's secret yielded no sessions token; using the environment key");
            ctx.client.clone()
        }
    }
}

/// A worker session's trail: its writer and the task that ships and counts it.
struct SessionTrail {
    path: std::path::PathBuf,
    writer: Arc<TrailWriter>,
    shipped: watch::Sender<bool>,
    shipper: tokio::task::JoinHandle<()>,
}

impl SessionTrail {
    /// Opens the item's trail (appending, so a resumed session goes on in the same file), starts
    /// following it, and records the start. The secrets in hand are redacted wherever they appear.
    fn open(
        ctx: &Arc<Ctx>,
        rec: &ItemRecord,
        dirs: &ItemDirs,
        resumed: bool,
    ) -> Result<SessionTrail, crate::session::trail::TrailError> {
        let item = &rec.item;
        let path = ctx.state.trail_path(rec);
        // The environment key may rotate while the session runs: asked for at each record.
        let mut literals = Vec::new();
        if let Some(s) = item.secret.as_deref() {
            literals.push(s.to_owned());
            if let Some(w) = WorkSecret::decode(s) {
                literals.push(w.sessions_token);
            }
        }
        let client = ctx.client.clone();
        let writer = Arc::new(
            TrailWriter::open(&path, &ctx.policy.trail, literals)?
                .redact_current(Box::new(move || client.current_key())),
        );
        let (shipped, rx) = watch::channel(false);
        let follow = super::ship::Follow {
            path: path.clone(),
            session_id: item.data.id.clone(),
            work_id: item.id.clone(),
            sinks: super::ship::Sink::from_policy(&ctx.policy.trail.ship),
            metrics: ctx.metrics.clone(),
            mark: dirs.dir.join("trail.shipped"),
            trails: ctx.trails.clone(),
        };
        let shipper = tokio::spawn(super::ship::follow(follow, rx).in_current_span());
        writer.record(
            "session_start",
            obj(serde_json::json!({
                "session_id": item.data.id,
                "work_id": item.id,
                "environment_id": ctx.env,
                "worker_id": ctx.worker_id,
                "policy": ctx.policy.source,
                "resumed": resumed,
            })),
        );
        Ok(SessionTrail { path, writer, shipped, shipper })
    }

    /// Records the end (and, for a session that is over, the files it left in `outputs`), then
    /// waits for the shipping to catch up.
    async fn close(self, end: &End, outputs: Option<&std::path::Path>) {
        if let Some(dir) = outputs {
            for f in tokio::task::block_in_place(|| super::state::digest_files(dir)) {
                let mut rec = serde_json::json!({"path": f.path, "size": f.size, "sha256": f.sha256});
                if let Some(why) = f.skipped {
                    rec["digest_skipped"] = serde_json::json!(why);
                }
                self.writer.record("output_file", obj(rec));
            }
        }
        self.writer
            .record("session_end", obj(serde_json::json!({"reason": end.describe(), "over": outputs.is_some()})));
        let _ = self.shipped.send(true);
        let _ = self.shipper.await;
    }
}

fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// Serves one acknowledged item (or one a previous run of this worker held, whose lease
/// continues from `last_heartbeat`). Returns false when the session failed or the lease was lost.
pub(super) async fn run(
    ctx: Arc<Ctx>,
    item: WorkItem,
    last_heartbeat: Option<String>,
    shutdown: watch::Receiver<Shutdown>,
) -> bool {
    let session_id = item.data.id.clone();
    let span = tracing::info_span!("work", work_id = %item.id, session_id = %session_id);
    async move {
        let client = item_client(&ctx, &item);
        let rec = ItemRecord {
            item: item.clone(),
            environment_id: ctx.env.clone(),
            started_at: rfc3339(SystemTime::now()),
            last_heartbeat: last_heartbeat.clone(),
        };
        let (lease_tx, lease_rx) = watch::channel(Lease::Held);
        let lease_tx = Arc::new(lease_tx);
        // The record is written before the heartbeat starts: the heartbeat rewrites it with each
        // lease it echoes, and a record written after one would forget that lease.
        // Blocking work (with disk limits, mkfs and mount): off the runtime's other tasks.
        let dirs = match tokio::task::block_in_place(|| ctx.state.hold(&rec, ctx.owner, ctx.disk)) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the session's directories");
                stop_item(&ctx, &client, &item.id, &lease_rx).await;
                return false;
            }
        };
        // The audit trail: the session's record of what ran. Without it nothing runs.
        let trail = match SessionTrail::open(&ctx, &rec, &dirs, last_heartbeat.is_some()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot open the session's audit trail");
                stop_item(&ctx, &client, &item.id, &lease_rx).await;
                let _ = tokio::task::block_in_place(|| ctx.state.retire(&rec, &ctx.retention));
                return false;
            }
        };
        // The heartbeat starts before anything slow (skills, the jail), as the official
        // worker's does.
        let clock = Arc::new(LeaseClock::new());
        let hb = tokio::spawn(
            heartbeat(ctx.clone(), client.clone(), rec.clone(), lease_tx.clone(), clock.clone()).in_current_span(),
        );
        tracing::info!(resume = last_heartbeat.is_some(), workspace = %dirs.workspace.display(), "session starting");
        ctx.metrics.active_sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ctx.active.lock().unwrap_or_else(|p| p.into_inner()).insert(item.id.clone(), lease_tx.clone());
        let resumed = last_heartbeat.is_some();
        let end = serve(&ctx, &client, &item, &dirs, clock.clone(), &trail, lease_rx.clone(), shutdown).await;
        // Ended by the worker itself (no room for its images): a failure, and said so.
        let end = match (end, ctx.doomed.lock().unwrap_or_else(|p| p.into_inner()).remove(&item.id)) {
            (End::Stopped { .. }, Some(why)) => End::Failed(why),
            (end, _) => end,
        };
        let claimed = clock.is_claimed();
        clock.stop_beating(hb).await;
        match &end {
            End::Lost => {}
            End::Left { .. } => {}
            End::Failed(m) => {
                tracing::error!(error = %m, "session failed");
                stop_item(&ctx, &client, &item.id, &lease_rx).await;
            }
            _ => stop_item(&ctx, &client, &item.id, &lease_rx).await,
        }
        // A worker shutting down keeps its items for its restart; a lost lease keeps them for a
        // re-claim (see `Ctx::lost`); anything else is over.
        let over = !matches!(end, End::Left { .. } | End::Lost);
        let trail_path = trail.path.clone();
        trail.close(&end, over.then_some(dirs.outputs.as_path())).await;
        let kept = match end {
            End::Left { .. } => None,
            // Resumed after a restart and refused at once: the item moved on while this worker
            // was down. Nothing of it is resumed again.
            End::Lost if resumed && !claimed => {
                let state = client.retrieve(&ctx.env, &item.id).await.map(|w| format!("{:?}", w.state).to_lowercase());
                tracing::info!(
                    state = state.as_deref().unwrap_or("unknown"),
                    "the item was no longer this worker's when it restarted; its workspace goes"
                );
                tokio::task::block_in_place(|| ctx.state.retire(&rec, &ctx.retention))
            }
            End::Lost => {
                if let Err(e) = tokio::task::block_in_place(|| ctx.state.mark_lost(&rec)) {
                    tracing::warn!(error = %e, "could not set aside the item whose lease was lost");
                }
                ctx.lost
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(item.id.clone(), (rec.clone(), Instant::now()));
                None
            }
            _ => {
                if ctx.retention.trails == crate::policy::Keep::SessionEnd {
                    let _ = std::fs::remove_file(&trail_path);
                }
                tokio::task::block_in_place(|| ctx.state.retire(&rec, &ctx.retention))
            }
        };
        ctx.metrics.active_sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            end = %end.describe(),
            outputs = kept.as_ref().map(|p| p.display().to_string()),
            trail = %trail_path.display(),
            "session ended"
        );
        ctx.active.lock().unwrap_or_else(|p| p.into_inner()).remove(&item.id);
        !matches!(end, End::Failed(_) | End::Lost)
    }
    .instrument(span)
    .await
}

/// The session's part of an item, once the heartbeat claimed it: the session read (retried while
/// the lease lasts; a terminated one is not served), the skills, then the calls.
#[allow(clippy::too_many_arguments)]
async fn serve(
    ctx: &Arc<Ctx>,
    client: &Client,
    item: &WorkItem,
    dirs: &ItemDirs,
    clock: Arc<LeaseClock>,
    trail: &SessionTrail,
    mut lease: watch::Receiver<Lease>,
    mut shutdown: watch::Receiver<Shutdown>,
) -> End {
    if !clock.claimed(&mut lease, &mut shutdown).await {
        return match signals(&lease, &shutdown) {
            (Lease::Lost, _) => End::Lost,
            (Lease::ForceRequested, _) => End::Stopped { forced: true },
            (Lease::StopRequested, _) => End::Stopped { forced: false },
            _ => End::Left { reason: "worker shutting down before the claim".into() },
        };
    }
    let session_id = item.data.id.as_str();
    let session = match read_session(client, session_id, &mut lease, &mut shutdown).await {
        Ok(s) => s,
        Err(end) => return end,
    };
    if session.is_terminated() {
        tracing::info!("skipping the work item of a terminated session");
        return End::Completed("session terminated");
    }
    // The memory stores come before the skills, as the official worker puts them in place.
    let memory = match memory(ctx, client, item, dirs, &session, &trail.writer).await {
        Ok(m) => m,
        Err(e) => return End::Failed(e),
    };
    if dirs.fresh {
        super::skills::download(client, &session, &dirs.workspace, ctx.owner).await;
    }
    let memory_mounts = memory.as_ref().map(|m| m.placed().mounts).unwrap_or_default();
    let memory = memory.map(tokio::sync::Mutex::new);
    let runner = Runner {
        ctx,
        client,
        item,
        session: session_id,
        dirs,
        clock,
        trail: &trail.writer,
        trail_path: &trail.path,
        memory: memory.as_ref(),
        memory_mounts,
    };
    let end = runner.drive(lease, shutdown).await;
    if let Some(m) = memory {
        memory_end(m.into_inner(), &end).await;
    }
    end
}

/// The largest filesystem the memory folders get when sessions have disk limits: room for two
/// stores at the API's most (2,000 memories of 100 kB).
const MEMORY_FS_MAX: u64 = 512 << 20;

/// The session's memory stores, downloaded into their folders (or taken up again after a
/// restart); none when nothing is attached or the worker runs without memory.
async fn memory(
    ctx: &Arc<Ctx>,
    client: &Client,
    item: &WorkItem,
    dirs: &ItemDirs,
    session: &crate::control_plane::wire::Session,
    trail: &Arc<TrailWriter>,
) -> Result<Option<super::memory::SessionMemory>, String> {
    let stores = session.memory_stores();
    let Some(interval) = ctx.memory_sync else { return Ok(None) };
    if stores.is_empty() {
        return Ok(None);
    }
    let token = item.secret.as_deref().and_then(WorkSecret::decode).is_some_and(|s| !s.sessions_token.is_empty());
    if !token {
        return Err(format!(
            "cannot mount the session's memories: the work item carried no sessions token (work_id={}, session_id={}); \
             the memory endpoints reject the environment key, so the poller must issue a per-item `secret` carrying \
             `sessions_token`, or run the worker with --memory-sync-interval none to run without memory",
            item.id, item.data.id
        ));
    }
    let size = ctx.disk.workspace.map(|w| w.min(MEMORY_FS_MAX));
    let dir = tokio::task::block_in_place(|| ctx.state.memory_dir(dirs, ctx.owner, size)).map_err(|e| e.to_string())?;
    let mut m = super::memory::SessionMemory::plan(
        client.clone(),
        &stores,
        &dir,
        &ctx.workdir,
        ctx.owner,
        interval,
        ctx.memory_deletes,
        Some(trail.clone()),
    )
    .map_err(|e| e.0)?;
    tokio::task::block_in_place(|| m.make_mount_points(&dirs.workspace, &dirs.outputs, ctx.owner)).map_err(|e| e.0)?;
    m.download().await.map_err(|e| e.0)?;
    Ok(Some(m))
}

/// At the item's end: the last sync after a clean end, then a flush, each within 30 s; the
/// folders go unless the item is kept for a restart or a re-claim. A lost lease touches
/// nothing: the session may be another worker's now.
async fn memory_end(mut m: super::memory::SessionMemory, end: &End) {
    use super::memory::FLUSH_TIMEOUT;
    if matches!(end, End::Lost) {
        return;
    }
    if matches!(end, End::Completed(_)) && tokio::time::timeout(FLUSH_TIMEOUT, m.finish()).await.is_err() {
        tracing::warn!("final memory sync cut off after 30s; the flush that follows still uploads changed files");
    }
    if tokio::time::timeout(FLUSH_TIMEOUT, m.flush_writes()).await.is_err() {
        tracing::warn!("memory flush cut off after 30s; changed files it had not uploaded yet are not saved");
    }
    if !matches!(end, End::Left { .. }) {
        tokio::task::block_in_place(|| m.dispose());
    }
}

/// `GET /v1/sessions/{id}`, retried for as long as the lease lasts (a failed read would stop
/// the item); a refusal that retrying cannot fix ends it.
async fn read_session(
    client: &Client,
    session: &str,
    lease: &mut watch::Receiver<Lease>,
    shutdown: &mut watch::Receiver<Shutdown>,
) -> Result<crate::control_plane::wire::Session, End> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    loop {
        let e = match client.session(session).await {
            Ok(s) => return Ok(s),
            Err(ApiError::NotFound(_)) => return Err(End::Completed("session not found")),
            Err(e) if !e.is_transient() => return Err(End::Failed(format!("reading the session: {e}"))),
            Err(e) => e,
        };
        let d = backoff.delay_for(&e);
        tracing::warn!(error = %e, retry_ms = d.as_millis() as u64, "reading the session failed; retrying while the lease lasts");
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = changed(lease, shutdown) => {}
        }
        match signals(lease, shutdown) {
            (Lease::Held, Shutdown::Running) => {}
            (Lease::Lost, _) => return Err(End::Lost),
            (Lease::ForceRequested, _) => return Err(End::Stopped { forced: true }),
            (Lease::StopRequested, _) => return Err(End::Stopped { forced: false }),
            _ => return Err(End::Left { reason: "worker shutting down".into() }),
        }
    }
}

pub(super) struct Runner<'a> {
    pub(super) ctx: &'a Ctx,
    pub(super) client: &'a Client,
    pub(super) item: &'a WorkItem,
    pub(super) session: &'a str,
    pub(super) dirs: &'a ItemDirs,
    clock: Arc<LeaseClock>,
    pub(super) trail: &'a TrailWriter,
    trail_path: &'a std::path::Path,
    /// The session's memory stores, if any (a sync, a flush and a write take turns).
    pub(super) memory: Option<&'a tokio::sync::Mutex<super::memory::SessionMemory>>,
    /// Their folders, bound into every jail the session gets.
    memory_mounts: Vec<(std::path::PathBuf, std::path::PathBuf, bool)>,
}

impl Runner<'_> {
    pub(super) fn ttl(&self) -> Duration {
        self.clock.ttl()
    }

    /// Whether this worker may still act for the item. After a pause (a stopped process, a
    /// suspended host) longer than the lease, the lease may be another worker's: a heartbeat is
    /// asked for and awaited before anything is posted.
    pub(super) async fn confirm_lease(&self, lease: &watch::Receiver<Lease>) -> bool {
        let (ttl, last) = self.clock.get();
        if last.elapsed() <= ttl {
            return *lease.borrow() != Lease::Lost;
        }
        tracing::warn!(
            since_s = last.elapsed().as_secs(),
            "no heartbeat for a whole lease; confirming it before posting"
        );
        self.clock.beat_now.notify_one();
        let deadline = Instant::now() + ttl.max(Duration::from_secs(5));
        loop {
            if *lease.borrow() == Lease::Lost {
                return false;
            }
            if self.clock.get().1 > last {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) async fn start_jail(&self, narrow: Option<&str>) -> Result<SessionProcess, RunnerError> {
        // Builds wait their turn (`--max-jail-builds`); the lease's heartbeat goes on meanwhile.
        let m = &self.ctx.metrics;
        m.jail_builds_waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let permit = self.ctx.builds.acquire().await;
        m.jail_builds_waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let _permit = permit.map_err(|_| RunnerError::Spawn(std::io::Error::other("the worker is stopping")))?;
        let p = SessionProcess::start(
            &self.ctx.runner,
            &self.dirs.workspace,
            &self.dirs.outputs,
            narrow,
            self.trail_path,
            &self.memory_mounts,
        )
        .await
        .inspect_err(|_| {
            self.ctx.metrics.jail_build_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })?;
        self.ctx.metrics.jail_built(p.build_time);
        tracing::info!(jail_pid = p.jail_pid, build_ms = p.build_time.as_millis() as u64, "session jail ready");
        Ok(p)
    }

    /// Provisions the workspace as `[provision]` and the item's metadata say, once per item
    /// (a restarted worker finds it done). Refusals and outcomes go to the trail.
    pub(super) async fn provision(&self) -> Result<(), super::provision::Refusal> {
        use super::provision::{self, Plan};
        let p = &self.ctx.policy.provision;
        let plan = match provision::plan(p, &self.item.metadata) {
            Ok(Some(plan)) => plan,
            Ok(None) => return Ok(()),
            Err(r) => {
                tracing::warn!(reason = %r, "workspace provisioning refused");
                self.trail.record("provision", obj(serde_json::json!({"outcome": "refused", "reason": r.0})));
                return Err(r);
            }
        };
        let done = self.dirs.dir.join("provisioned");
        if done.exists() {
            return Ok(());
        }
        let what = match &plan {
            Plan::Git { url, git_ref } => serde_json::json!({"kind": "git", "url": url, "ref": git_ref}),
            Plan::Copy { name, from } => serde_json::json!({"kind": "copy", "name": name, "from": from}),
        };
        let t0 = Instant::now();
        let job = provision::Job {
            exe: &self.ctx.runner.exe,
            policy: &self.ctx.runner.policy,
            provision: p,
            workspace: &self.dirs.workspace,
            scratch: &self.dirs.dir.join("provision"),
            trail: self.trail_path,
        };
        let r = provision::run(&job, &plan).await;
        let mut rec = obj(what);
        rec.insert("duration_ms".into(), serde_json::json!(t0.elapsed().as_millis() as u64));
        match &r {
            Ok(()) => {
                rec.insert("outcome".into(), serde_json::json!("done"));
                tracing::info!(took_ms = t0.elapsed().as_millis() as u64, "workspace provisioned");
                let _ = std::fs::write(&done, b"");
            }
            Err(e) => {
                rec.insert("outcome".into(), serde_json::json!("failed"));
                rec.insert("reason".into(), serde_json::json!(e.0));
                tracing::error!(error = %e, "workspace provisioning failed");
            }
        }
        self.trail.record("provision", rec);
        r
    }

    /// The whole history of the types the runner acts on, every page, into `view`.
    async fn reconcile(&self, view: &mut View) -> Result<(), ApiError> {
        let mut page: Option<String> = None;
        loop {
            let got = self.client.list_events(self.session, page.as_deref(), LIST_LIMIT, HISTORY_EVENT_TYPES).await?;
            match got.each(|e| view.apply_raw(&e))? {
                Some(p) => page = Some(p),
                None => return Ok(()),
            }
        }
    }

    /// Opens the stream, reads the session, then lists the history into a new view (so nothing
    /// falls between the two); retried with back-off while the lease holds. Returns the stream,
    /// the view and whether the session was idle. A listing that keeps failing for a whole lease
    /// ends the item, and so does a terminated session.
    pub(super) async fn connect(
        &self,
        old: &View,
        lease: &mut watch::Receiver<Lease>,
        shutdown: &mut watch::Receiver<Shutdown>,
    ) -> Result<(EventStream, View, bool), End> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let since = Instant::now();
        loop {
            // The stream opens first, so an event too new for the listing arrives on it. The
            // session is read at every connection: archiving it adds no event, only its status
            // shows it.
            let r = async {
                let stream = self.client.stream_events(self.session).await?;
                let session = self.client.session(self.session).await?;
                let mut view = old.without_events();
                self.reconcile(&mut view).await?;
                Ok::<_, ApiError>((stream, session, view))
            }
            .await;
            match r {
                Ok((_, session, view)) if session.is_terminated() || view.ended.is_some() => {
                    return Err(End::Completed(view.ended.unwrap_or("session terminated")))
                }
                Ok((s, session, view)) => return Ok((s, view, session.status.as_deref() == Some("idle"))),
                Err(ApiError::NotFound(_)) => return Err(End::Completed("session not found")),
                Err(e) if !e.is_transient() => return Err(End::Failed(format!("reading the session's events: {e}"))),
                Err(e) if since.elapsed() > self.ttl() => {
                    return Err(End::Failed(format!("the session's events could not be read for a whole lease: {e}")))
                }
                Err(e) => {
                    let d = backoff.delay_for(&e);
                    tracing::warn!(error = %e, retry_ms = d.as_millis() as u64, "reading the session's events failed");
                    tokio::select! {
                        () = tokio::time::sleep(d) => {}
                        () = changed(lease, shutdown) => {}
                    }
                    if signals(lease, shutdown) != (Lease::Held, Shutdown::Running) {
                        return Err(End::Left { reason: "stopping while reconnecting".into() });
                    }
                }
            }
        }
    }
}
