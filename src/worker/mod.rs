//! The worker: claims work items of one environment, runs each session in its own jail, keeps
//! the leases alive and posts results. See `item` for one item's life, `state` for what
//! survives a crash.

mod calls;
mod feed;
mod item;
pub mod key;
mod lease;
pub mod memory;
pub mod metrics;
mod post;
pub mod provision;
pub(crate) mod room;
mod runner;
pub use runner::become_session_process;
pub(crate) mod ship;
pub(crate) mod skills;
mod spawner;
pub(crate) mod state;
mod trail_watch;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};

use crate::control_plane::client::AuthScheme;
use crate::control_plane::{ApiError, Client, Secret};
use metrics::Metrics;
use runner::RunnerConfig;
use state::StateDir;

/// The worker's own lifecycle, as signals set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Running,
    /// Finish in-flight tool calls, release the items, exit.
    Graceful,
    /// Kill every jail now, release the items, exit.
    Force,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("policy: {0}")]
    Policy(String),
    #[error("API client: {0}")]
    Client(ApiError),
    #[error("metrics listener {0}: {1}")]
    Metrics(SocketAddr, std::io::Error),
    #[error("--workdir {0}: sessions' working directory is /workspace, where the jail mounts the workspace")]
    Workdir(String),
    #[error("policy {0}: {1}")]
    Disk(String, crate::jail::disk::DiskError),
    #[error("--state-dir: {0}")]
    Room(String),
}

pub struct WorkerConfig {
    pub environment_id: String,
    pub api_url: String,
    pub key: Secret,
    /// Where the key came from: a file or credential is read again on SIGHUP, when it changes,
    /// and when the API refuses the key in hand (a rotation).
    pub key_source: Option<key::KeySource>,
    /// The id sent as `Anthropic-Worker-ID` [default: host name and a random suffix, kept in the
    /// state directory].
    pub worker_id: Option<String>,
    /// Built-in policy name or policy file for every session jail.
    pub policy: String,
    pub max_sessions: usize,
    /// How many times over the state directory's free space the sessions' images may promise
    /// (see `room`); 1 backs every image in full.
    pub image_overcommit: f64,
    pub state_dir: PathBuf,
    pub workdir: String,
    pub metrics: Option<SocketAddr>,
    pub shutdown_timeout: Duration,
    pub log_json: bool,
    /// The `stockade` binary that builds session jails.
    pub exe: PathBuf,
    /// How long the server holds an empty poll (`block_ms`, at most 999 ms).
    pub block: Duration,
    /// How long a session stays idle after `end_turn` before its item ends.
    pub max_idle: Duration,
    /// Calls of one session that run at once (of different session threads); `usize::MAX` is
    /// no limit.
    pub max_concurrent_calls: usize,
    /// Jails built at once; the other sessions (resumed ones after a restart, many claimed at
    /// once) wait their turn with their leases kept alive meanwhile.
    pub max_jail_builds: usize,
    /// How often attached memory stores sync back while a session runs; `None` runs sessions
    /// without their memory stores.
    pub memory_sync_interval: Option<Duration>,
    /// Whether a file deleted in a memory folder deletes its memory.
    pub memory_sync_deletions: memory::DeleteMode,
    /// Heartbeat period; by default `min(ttl/2, 30 s)` as the server's lease says.
    pub heartbeat_every: Option<Duration>,
    /// Timeout of one API call.
    pub api_timeout: Duration,
    /// How long an event stream may deliver no frame before it is reopened.
    pub stream_silence: Duration,
    /// The largest response body read from the control plane.
    pub max_response_bytes: usize,
    /// The largest result event posted; a larger result becomes an error result.
    pub max_result_bytes: usize,
    /// Overrides the policy's `retention.outputs`.
    pub outputs_retention: Option<Duration>,
    /// Webhook mode: drain the queue when notified (and every `webhook_poll` anyway) instead of
    /// polling continuously.
    pub wake: Option<Arc<Notify>>,
    pub webhook_poll: Duration,
}

/// Raises the worker's soft open-file limit to its hard one: each live session holds a few
/// descriptors in the worker (its event stream, its session process's pipes), and the usual soft
/// limit of 1,024 would end a worker at a few hundred sessions. Returns the limits it started
/// with, which its sessions get back. Says so when even the hard limit is short of what
/// `max_sessions` need.
fn raise_open_files(max_sessions: usize) -> Option<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let need = (max_sessions as u64).saturating_mul(8).saturating_add(256);
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        tracing::info!(from = soft, to = hard, "raised the open-file limit");
    }
    if hard < need {
        tracing::warn!(
            limit = hard,
            need,
            "the open-file limit is short of what --max-sessions needs (about 8 per session); raise it \
             (LimitNOFILE= in the systemd unit, ulimit -Hn, or the container runtime's nofile)"
        );
    }
    Some((soft, hard))
}

/// Jails built at once by default: two per CPU the worker may use, so that building never
/// starves the heartbeats of the sessions that already run.
pub fn default_jail_builds() -> usize {
    2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl WorkerConfig {
    pub fn new(environment_id: &str, api_url: &str, key: Secret) -> WorkerConfig {
        WorkerConfig {
            environment_id: environment_id.into(),
            api_url: api_url.into(),
            key,
            key_source: None,
            worker_id: None,
            policy: "default".into(),
            max_sessions: 8,
            image_overcommit: 1.0,
            state_dir: PathBuf::from("/var/lib/stockade"),
            workdir: "/workspace".into(),
            metrics: None,
            shutdown_timeout: Duration::from_secs(60),
            log_json: false,
            exe: PathBuf::from("/proc/self/exe"),
            block: Duration::from_millis(999),
            max_idle: Duration::from_secs(60),
            max_concurrent_calls: 1,
            max_jail_builds: default_jail_builds(),
            memory_sync_interval: Some(memory::DEFAULT_SYNC_INTERVAL),
            memory_sync_deletions: memory::DeleteMode::Enabled,
            heartbeat_every: None,
            api_timeout: Duration::from_secs(15),
            stream_silence: Duration::from_secs(15),
            max_response_bytes: crate::control_plane::client::DEFAULT_MAX_BODY,
            max_result_bytes: DEFAULT_MAX_RESULT,
            outputs_retention: None,
            wake: None,
            webhook_poll: Duration::from_secs(30),
        }
    }
}

/// What a worker's items share.
pub(crate) struct Ctx {
    client: Client,
    env: String,
    state: StateDir,
    runner: RunnerConfig,
    metrics: Arc<Metrics>,
    /// Host uid/gid of the jail user, which owns the session directories.
    owner: (u32, u32),
    /// `limits.workspace_size` and `limits.outputs_size`: each session gets filesystems this size.
    disk: state::DiskSizes,
    key_source: Option<key::KeySource>,
    heartbeat_every: Option<Duration>,
    max_idle: Duration,
    max_concurrent_calls: usize,
    /// One permit per jail being built (`max_jail_builds`).
    builds: Arc<Semaphore>,
    memory_sync: Option<Duration>,
    memory_deletes: memory::DeleteMode,
    workdir: String,
    max_result_bytes: usize,
    /// The sessions' policy: its `[trail]`, `[retention]` and `[provision]` are the worker's to apply.
    policy: Arc<crate::policy::Policy>,
    retention: crate::policy::Retention,
    worker_id: String,
    /// Items being run, with their lease signal: an item the control plane hands out again
    /// (its lease expired meanwhile) must first be taken from the run that lost it.
    active: std::sync::Mutex<std::collections::HashMap<String, Arc<watch::Sender<lease::Lease>>>>,
    /// Room on the state directory for the sessions' images, and its last reading (with the
    /// sessions admitted since counted in).
    room: room::Room,
    room_now: std::sync::Mutex<Option<room::Reading>>,
    /// Sessions the worker ends itself, and why (their end is a failure, not a stop).
    doomed: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Items whose lease this worker lost, with their directories kept: handed out to this
    /// worker again, the session continues in the same workspace. Retired after `LOST_KEEP`.
    lost: std::sync::Mutex<std::collections::HashMap<String, (state::ItemRecord, std::time::Instant)>>,
    /// What the sessions' trail followers share.
    trails: Arc<trail_watch::Trails>,
}

/// The default cap on one posted result: room for the largest block a tool returns (a 20 MiB PDF
/// is about 27 MiB in base64).
pub(crate) const DEFAULT_MAX_RESULT: usize = 32 << 20;

/// How often the worker removes the cgroups that killed session processes left.
const STALE_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// How long the directories of an item whose lease was lost are kept for a re-claim.
const LOST_KEEP: Duration = Duration::from_secs(3600);

impl Ctx {
    /// Reads the environment key again from its file or credential and uses it from now on, when
    /// it changed. Returns whether it did.
    fn reload_key(&self) -> bool {
        let Some(source) = &self.key_source else { return false };
        match key::reread(source) {
            Some(Ok(k)) => {
                let changed = self.client.set_key(k);
                if changed {
                    tracing::info!(%source, "environment key reloaded");
                }
                changed
            }
            None => false,
            Some(Err(e)) => {
                tracing::error!(error = %e, "reading the environment key again failed; keeping the one in hand");
                false
            }
        }
    }

    /// Retires the kept items nobody handed back in time.
    fn sweep_lost(&self) {
        let expired: Vec<state::ItemRecord> = {
            let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
            let old: Vec<String> =
                lost.iter().filter(|(_, (_, t))| t.elapsed() > LOST_KEEP).map(|(k, _)| k.clone()).collect();
            old.iter().filter_map(|k| lost.remove(k)).map(|(r, _)| r).collect()
        };
        for rec in expired {
            tracing::info!(work_id = %rec.item.id, "a lost item was not handed back; its workspace goes");
            self.state.retire(&rec, &self.retention);
        }
    }
}

async fn serve_metrics(addr: SocketAddr, m: Arc<Metrics>) -> Result<(), WorkerError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| WorkerError::Metrics(addr, e))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = m.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
        }),
    );
    tracing::info!(%addr, "metrics on /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// What `run` and `run_one` share: the state directory, the client, the metrics, the jail user.
async fn context(cfg: &WorkerConfig) -> Result<Arc<Ctx>, WorkerError> {
    if cfg.workdir.trim_end_matches('/') != "/workspace" {
        return Err(WorkerError::Workdir(cfg.workdir.clone()));
    }
    let (policy, _) = crate::policy::load(Some(&cfg.policy)).map_err(|e| WorkerError::Policy(e.to_string()))?;
    let ids = crate::jail::namespaces::IdMapping::for_host(&policy.user);
    let owner = ids.host_ids(&policy.user);
    let disk = state::DiskSizes {
        workspace: policy.limits.workspace_size.map(|s| s.0),
        outputs: policy.limits.outputs_size.map(|s| s.0),
    };
    // A size limit this host cannot give every session refuses the worker, not a session later.
    for (field, size) in [("limits.workspace_size", disk.workspace), ("limits.outputs_size", disk.outputs)] {
        if let Some(size) = size {
            crate::jail::disk::can_provision(field, size).map_err(|e| WorkerError::Disk(cfg.policy.clone(), e))?;
        }
    }
    let state = StateDir::open(&cfg.state_dir)?;
    let mut client = Client::new(&cfg.api_url, cfg.key.clone(), AuthScheme::Bearer).map_err(WorkerError::Client)?;
    client.timeout = cfg.api_timeout;
    client.stream_silence = cfg.stream_silence;
    client.max_body = cfg.max_response_bytes;
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = cfg.metrics {
        serve_metrics(addr, metrics.clone()).await?;
    }
    // Jails of a crashed run died with it (PDEATHSIG); their cgroups did not.
    tokio::task::spawn_blocking(crate::jail::cgroups::remove_stale_all).await.ok();
    let mut retention = policy.retention;
    if let Some(d) = cfg.outputs_retention {
        retention.outputs = crate::policy::Keep::For(d);
    }
    state.sweep(&retention, std::time::SystemTime::now());
    let snapshot = snapshot_policy(&state, &policy)?;
    let worker_id = cfg.worker_id.clone().unwrap_or_else(|| state.worker_id.clone());
    tracing::info!(
        worker_id = %worker_id,
        environment_id = %cfg.environment_id,
        api = %cfg.api_url,
        policy = %cfg.policy,
        max_sessions = cfg.max_sessions,
        state_dir = %cfg.state_dir.display(),
        "worker starting"
    );
    Ok(Arc::new(Ctx {
        client,
        env: cfg.environment_id.clone(),
        runner: RunnerConfig {
            exe: cfg.exe.clone(),
            policy: snapshot.display().to_string(),
            log_json: cfg.log_json,
            nofile: raise_open_files(cfg.max_sessions),
        },
        metrics,
        owner,
        disk,
        key_source: cfg.key_source.clone(),
        heartbeat_every: cfg.heartbeat_every,
        max_idle: cfg.max_idle,
        max_concurrent_calls: cfg.max_concurrent_calls,
        builds: Arc::new(Semaphore::new(cfg.max_jail_builds.max(1))),
        memory_sync: cfg.memory_sync_interval,
        memory_deletes: cfg.memory_sync_deletions,
        workdir: cfg.workdir.clone(),
        max_result_bytes: cfg.max_result_bytes,
        retention,
        policy: Arc::new(policy),
        worker_id,
        active: Default::default(),
        room: room::Room::new(
            state.root(),
            disk.workspace.unwrap_or(0) + disk.outputs.unwrap_or(0),
            cfg.image_overcommit,
        ),
        room_now: Default::default(),
        doomed: Default::default(),
        lost: Default::default(),
        trails: Default::default(),
        state,
    }))
}

/// Writes the resolved policy to `STATE/policy.toml`, which every session (and provisioning)
/// jail of this worker is built from: the policy is read once, when the worker starts, and an
/// edit of its file (or of a file it extends) reaches sessions with the worker's restart, never
/// half of them.
fn snapshot_policy(state: &StateDir, policy: &crate::policy::Policy) -> Result<PathBuf, WorkerError> {
    let text = toml::to_string(policy).map_err(|e| WorkerError::Policy(format!("serialising the policy: {e}")))?;
    let path = state.root().join("policy.toml");
    let body = format!(
        "# The policy this worker's sessions run under: {}, resolved when the worker started.\n\
         extends = \"none\"\n{text}",
        policy.source
    );
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| WorkerError::Policy(format!("{}: {e}", path.display())))?;
    // The snapshot must mean what the worker read; a policy that does not survive the trip is
    // refused here rather than in every session.
    let (again, _) = crate::policy::load_file(&path).map_err(|e| WorkerError::Policy(e.to_string()))?;
    let again = crate::policy::Policy { source: policy.source.clone(), ..again };
    if again != *policy {
        return Err(WorkerError::Policy(format!(
            "{}: the resolved policy does not read back the same",
            path.display()
        )));
    }
    Ok(path)
}

/// Serves one work item that was claimed and acknowledged elsewhere (`stockade worker run`);
/// returns whether it ended as the session or the control plane asked, rather than failing or
/// losing its lease.
pub async fn run_one(
    cfg: WorkerConfig,
    item: crate::control_plane::wire::WorkItem,
    shutdown: watch::Receiver<Shutdown>,
) -> Result<bool, WorkerError> {
    let ctx = context(&cfg).await?;
    Ok(item::run(ctx, item, None, shutdown).await)
}

/// Reloads the environment key on SIGHUP and when its file changes (checked every few seconds).
async fn watch_key(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<Shutdown>) {
    use std::os::unix::fs::MetadataExt;
    let path = match &ctx.key_source {
        Some(key::KeySource::File(p) | key::KeySource::Credential(p)) => p.clone(),
        _ => return,
    };
    let stamp = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()));
    let mut seen = stamp(&path);
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; the key file is still watched");
            None
        }
    };
    loop {
        let hup_recv = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hup_recv => {
                tracing::info!("SIGHUP: reading the environment key again");
                seen = stamp(&path);
                ctx.reload_key();
            }
            () = tokio::time::sleep(KEY_CHECK_EVERY) => {
                let now = stamp(&path);
                if now != seen {
                    seen = now;
                    ctx.reload_key();
                }
            }
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() != Shutdown::Running { return },
        }
    }
}

/// How often the key file is checked for a change.
const KEY_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Runs until `shutdown` leaves `Running` and every session has been wound down.
pub async fn run(cfg: WorkerConfig, mut shutdown: watch::Receiver<Shutdown>) -> Result<(), WorkerError> {
    let ctx = context(&cfg).await?;
    let (inner_tx, inner) = mirror_shutdown(&shutdown);
    if ctx.key_source.as_ref().is_some_and(|s| key::reread(s).is_some()) {
        tokio::spawn(watch_key(ctx.clone(), shutdown.clone()));
    }
    let n = session_slots(&ctx, cfg.max_sessions.max(1))?;
    tracing::info!(slots = n, "taking work: up to {n} sessions at a time");
    let slots = Arc::new(Semaphore::new(n));
    tokio::spawn(watch_room(ctx.clone(), shutdown.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    resume_held(&ctx, &slots, &mut tasks, &inner).await;

    let mut poll_attempt: u32 = 0;
    let mut ack_attempt: u32 = 0;
    let mut drained = false;
    let block_ms = (cfg.block.as_millis() as u32).clamp(1, crate::control_plane::wire::MAX_BLOCK_MS);
    let mut swept = std::time::Instant::now();
    while *shutdown.borrow() == Shutdown::Running {
        // Finished items' tasks go now, not at shutdown: their state must not pile up.
        while tasks.try_join_next().is_some() {}
        ctx.sweep_lost();
        // Session jails do not sweep at their start (that would cost every start a listing of
        // every live jail's cgroup); the worker does, here, now and then.
        if swept.elapsed() >= STALE_SWEEP_EVERY {
            swept = std::time::Instant::now();
            tokio::task::spawn_blocking(crate::jail::cgroups::remove_stale_all);
            let c = ctx.clone();
            tokio::task::spawn_blocking(move || c.state.sweep(&c.retention, std::time::SystemTime::now()));
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
            _ = shutdown.changed() => break,
        };
        if !admit(&ctx) {
            drop(permit);
            self::pause(ROOM_EVERY, &mut shutdown).await;
            continue;
        }
        if let (Some(wake), true) = (&cfg.wake, drained) {
            tokio::select! {
                () = wake.notified() => tracing::debug!("woken by a webhook"),
                () = tokio::time::sleep(cfg.webhook_poll) => {}
                _ = shutdown.changed() => break,
            }
        }
        // Webhook mode drains: a non-blocking poll, and un-acked items of a dead worker
        // surface again on the next delivery.
        let (block, reclaim) = if cfg.wake.is_some() { (None, Some(5000)) } else { (Some(block_ms), None) };
        let polled = tokio::select! {
            r = ctx.client.poll(&ctx.env, &ctx.worker_id, block, reclaim) => r,
            _ = shutdown.changed() => break,
        };
        let pause = match polled {
            Ok(Some(item)) => {
                poll_attempt = 0;
                drained = false;
                ctx.metrics.poll("item");
                if !claim(&ctx, &item, &mut ack_attempt, &mut shutdown).await {
                    continue;
                }
                count_admitted(&ctx);
                lease::supersede(&ctx, &item.id).await;
                if ctx.lost.lock().unwrap_or_else(|p| p.into_inner()).remove(&item.id).is_some() {
                    tracing::info!(work_id = %item.id, "handed back after a lost lease: same workspace");
                }
                let (c, s) = (ctx.clone(), inner.clone());
                tasks.spawn(async move {
                    let _ = item::run(c, item, None, s).await;
                    drop(permit);
                });
                None
            }
            Ok(None) => {
                poll_attempt = 0;
                drained = true;
                ctx.metrics.poll("empty");
                (cfg.wake.is_none()).then(|| Duration::from_millis(fastrand::u64(1000..=3000)))
            }
            Err(ApiError::Auth { .. }) if ctx.reload_key() => {
                ctx.metrics.poll("error");
                tracing::info!("the API refused the old environment key; polling again with the new one");
                None
            }
            Err(e) if !e.is_transient() => {
                ctx.metrics.poll("error");
                tracing::error!(error = %e, "polling refused; the worker stops");
                inner_tx.send_replace(Shutdown::Graceful);
                join_all(&mut tasks).await;
                return Err(WorkerError::Client(e));
            }
            Err(e) => {
                ctx.metrics.poll("error");
                poll_attempt += 1;
                let d = sdk_backoff(poll_attempt);
                tracing::warn!(error = %e, attempt = poll_attempt, retry_ms = d.as_millis() as u64, "poll failed");
                Some(d)
            }
        };
        if let Some(d) = pause {
            self::pause(d, &mut shutdown).await;
        }
    }
    wind_down(&cfg, &mut tasks, &inner_tx).await;
    Ok(())
}

/// Items follow the returned receiver, which mirrors the caller's signal and can escalate on
/// its own (through the returned sender) when the shutdown timeout passes.
fn mirror_shutdown(outer: &watch::Receiver<Shutdown>) -> (Arc<watch::Sender<Shutdown>>, watch::Receiver<Shutdown>) {
    let (inner_tx, inner) = watch::channel(*outer.borrow());
    let inner_tx = Arc::new(inner_tx);
    let (mut outer, tx) = (outer.clone(), inner_tx.clone());
    tokio::spawn(async move {
        while outer.changed().await.is_ok() {
            let s = *outer.borrow();
            tx.send_if_modified(|cur| {
                let up = (*cur == Shutdown::Running) || (s == Shutdown::Force && *cur != Shutdown::Force);
                if up {
                    *cur = s;
                }
                up
            });
        }
    });
    (inner_tx, inner)
}

/// Items a previous run held: resumed when the lease still continues from the last heartbeat
/// that run recorded (a 412 means it is someone else's now).
/// How often the room for the sessions' images is read again.
const ROOM_EVERY: Duration = Duration::from_secs(2);

/// The sessions this worker serves at once: `--max-sessions`, or fewer when the state
/// directory cannot back that many sessions' images (said), or an error when not one.
fn session_slots(ctx: &Ctx, max: usize) -> Result<usize, WorkerError> {
    if !ctx.room.matters() {
        return Ok(max);
    }
    let r = ctx.room.read().map_err(|e| WorkerError::Room(format!("{}: {e}", ctx.state.root().display())))?;
    let held = ctx.state.held().len();
    let n = ctx.room.slots(max, held, &r).map_err(WorkerError::Room)?;
    if n < max {
        tracing::warn!(
            slots = n,
            max_sessions = max,
            free = %crate::util::format_size(r.free),
            per_session = %crate::util::format_size(ctx.room.per_session),
            "the state directory can back the images of {n} of --max-sessions {max} sessions: serving {n} at a time"
        );
    }
    *ctx.room_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    Ok(n)
}

/// Whether a new session fits now (see `room`).
fn admit(ctx: &Ctx) -> bool {
    if !ctx.room.matters() {
        return true;
    }
    let mut now = ctx.room_now.lock().unwrap_or_else(|p| p.into_inner());
    let Some(r) = now.as_mut() else { return true };
    match ctx.room.refuses(r) {
        Some(why) => {
            if ctx.metrics.admission_paused.swap(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                tracing::warn!(reason = %why, "not taking new sessions until there is room for their images");
            }
            false
        }
        None => {
            if ctx.metrics.admission_paused.swap(0, std::sync::atomic::Ordering::Relaxed) == 1 {
                tracing::info!("room for new sessions' images again: taking new sessions");
            }
            true
        }
    }
}

/// Counts a session just taken in the last reading, before the next one sees its images.
fn count_admitted(ctx: &Ctx) {
    if !ctx.room.matters() {
        return;
    }
    if let Some(r) = ctx.room_now.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        r.owed.push(room::Owed { work_id: String::new(), bytes: ctx.room.per_session });
    }
}

/// Reads the room every few seconds. When what the images may still take no longer fits (the
/// filesystem was filled by something else), writes would be lost: the sessions owing most are
/// ended, as failures, until the rest fit.
async fn watch_room(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<Shutdown>) {
    if !ctx.room.matters() {
        return;
    }
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        let c = ctx.clone();
        if let Ok(Ok(r)) = tokio::task::spawn_blocking(move || c.room.read()).await {
            ctx.metrics.state_free_bytes.store(r.free, Relaxed);
            ctx.metrics.images_owed_bytes.store(r.owed_total(), Relaxed);
            // Only mounted images, the live sessions', can lose writes; a lost item's stay
            // unmounted until it is handed back (and admitted like a new one).
            let active: std::collections::HashSet<String> =
                ctx.active.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
            let live = room::Reading {
                free: r.free,
                owed: r.owed.iter().filter(|o| active.contains(&o.work_id)).cloned().collect(),
            };
            for o in live.to_end(ctx.room.overcommit()) {
                let why = format!(
                    "the worker's state directory has {} free, less than the live sessions' images may still \
                     take ({}); this session's images could lose writes, so it was ended",
                    crate::util::format_size(live.free),
                    crate::util::format_size(live.owed_total())
                );
                let lease = ctx.active.lock().unwrap_or_else(|p| p.into_inner()).get(&o.work_id).cloned();
                let Some(lease) = lease else { continue };
                if ctx.doomed.lock().unwrap_or_else(|p| p.into_inner()).insert(o.work_id.clone(), why.clone()).is_none()
                {
                    tracing::error!(work_id = %o.work_id, owed = %crate::util::format_size(o.bytes), reason = %why, "ending a session: no room for its images");
                    ctx.metrics.sessions_ended_for_room.fetch_add(1, Relaxed);
                    lease.send_if_modified(|l| {
                        let raise = *l < lease::Lease::ForceRequested;
                        if raise {
                            *l = lease::Lease::ForceRequested;
                        }
                        raise
                    });
                }
            }
            *ctx.room_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
        tokio::select! {
            () = tokio::time::sleep(ROOM_EVERY) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() != Shutdown::Running { return },
        }
    }
}

async fn resume_held(
    ctx: &Arc<Ctx>,
    slots: &Arc<Semaphore>,
    tasks: &mut tokio::task::JoinSet<()>,
    inner: &watch::Receiver<Shutdown>,
) {
    for rec in ctx.state.held() {
        // An item whose lease a previous run lost is not resumed (it is someone else's), only
        // kept for the rest of its keep time, in case it is handed back.
        if let Some(at) = ctx.state.lost_at(&rec) {
            let age = std::time::SystemTime::now().duration_since(at).unwrap_or_default();
            match std::time::Instant::now().checked_sub(age) {
                Some(since) if age <= LOST_KEEP => {
                    tracing::info!(work_id = %rec.item.id, "an item whose lease was lost before a restart; kept for a re-claim");
                    ctx.lost.lock().unwrap_or_else(|p| p.into_inner()).insert(rec.item.id.clone(), (rec, since));
                }
                _ => {
                    tracing::info!(work_id = %rec.item.id, "an item whose lease was lost was not handed back; its workspace goes");
                    ctx.state.retire(&rec, &ctx.retention);
                }
            }
            continue;
        }
        let Some(last) = rec.last_heartbeat.clone() else {
            tracing::info!(work_id = %rec.item.id, "an item held before a restart never had a heartbeat; left to its lease");
            ctx.state.retire(&rec, &ctx.retention);
            continue;
        };
        let permit = slots.clone().acquire_owned().await.expect("semaphore open");
        tracing::info!(work_id = %rec.item.id, "resuming an item held before a restart");
        let (c, s) = (ctx.clone(), inner.clone());
        tasks.spawn(async move {
            let _ = item::run(c, rec.item, Some(last), s).await;
            drop(permit);
        });
    }
}

/// Acknowledges a polled item and says whether it is a session to run. An ack that fails for a
/// while backs off here (the item comes back on a later poll); an item that is not a session is
/// force-stopped.
async fn claim(
    ctx: &Ctx,
    item: &crate::control_plane::wire::WorkItem,
    ack_attempt: &mut u32,
    shutdown: &mut watch::Receiver<Shutdown>,
) -> bool {
    // As the official poller: a failed ack, whatever the reason, is logged and the item skipped
    // (not stopped); it comes back on a later poll if it is still queued.
    match ctx.client.ack(&ctx.env, &item.id).await {
        Ok(_) => *ack_attempt = 0,
        Err(e) => {
            *ack_attempt += 1;
            let d = sdk_backoff(*ack_attempt);
            tracing::warn!(work_id = %item.id, error = %e, retry_ms = d.as_millis() as u64, "ack failed; skipping the item");
            pause(d, shutdown).await;
            return false;
        }
    }
    ctx.metrics.claims.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let Some(session) = item.session_id() else {
        tracing::info!(work_id = %item.id, work_type = %item.data.kind, "not a session; stopping it");
        match ctx.client.stop(&ctx.env, &item.id, true).await {
            Ok(_) | Err(ApiError::Conflict(_)) => {}
            Err(e) => tracing::warn!(work_id = %item.id, error = %e, "stopping a non-session item failed"),
        }
        return false;
    };
    tracing::info!(work_id = %item.id, session_id = %session, "claimed");
    true
}

/// Shutting down: sessions see the same signal. Past the timeout, escalate to force.
async fn wind_down(cfg: &WorkerConfig, tasks: &mut tokio::task::JoinSet<()>, inner_tx: &watch::Sender<Shutdown>) {
    tracing::info!(sessions = tasks.len(), "worker stopping");
    if tokio::time::timeout(cfg.shutdown_timeout, join_all(tasks)).await.is_err() {
        tracing::warn!(timeout = ?cfg.shutdown_timeout, "sessions did not stop in time; forcing");
        inner_tx.send_replace(Shutdown::Force);
        if tokio::time::timeout(Duration::from_secs(15), join_all(tasks)).await.is_err() {
            tasks.abort_all(); // dropping a session process kills it, and its jail with it
            while tasks.join_next().await.is_some() {}
            tokio::task::spawn_blocking(crate::jail::cgroups::remove_stale_all).await.ok();
        }
    }
    tracing::info!("worker stopped");
}

/// The official poller's back-off: `min(60, 2^attempt)` seconds plus up to one second of jitter.
fn sdk_backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
        + Duration::from_millis(fastrand::u64(0..1000))
}

/// Sleeps, or returns early when the worker is asked to stop.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<Shutdown>) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}

async fn join_all(tasks: &mut tokio::task::JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}
