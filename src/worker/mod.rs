//! The worker: claims work items of one environment, runs each session in its own jail, keeps
//! the leases alive and posts results. See `item` for one item's life, `state` for what
//! survives a crash.

mod item;
pub mod key;
pub mod metrics;
pub mod runner;
mod skills;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, Semaphore};

use crate::control_plane::wire::AuthScheme;
use crate::control_plane::{ApiError, Backoff, Client, Secret};
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
}

pub struct WorkerConfig {
    pub environment_id: String,
    pub api_url: String,
    pub key: Secret,
    pub auth: AuthScheme,
    /// Built-in policy name or policy file for every session jail.
    pub policy: String,
    pub max_sessions: usize,
    pub state_dir: PathBuf,
    pub workdir: String,
    pub metrics: Option<SocketAddr>,
    pub shutdown_timeout: Duration,
    pub log_json: bool,
    /// The `stockade` binary that builds session jails.
    pub exe: PathBuf,
    /// How long a claim waits for work (long poll).
    pub poll_wait: Duration,
    /// How long an event listing waits for new events.
    pub events_wait: Duration,
    /// Heartbeat period; by default a third of the lease.
    pub heartbeat_every: Option<Duration>,
    /// Timeout of one API call.
    pub api_timeout: Duration,
    /// How long ended sessions' outputs are kept under the state directory.
    pub outputs_retention: Duration,
    /// Webhook mode: drain the queue when notified (and every `poll_wait` anyway) instead of
    /// long-polling.
    pub wake: Option<Arc<Notify>>,
}

impl WorkerConfig {
    pub fn new(environment_id: &str, api_url: &str, key: Secret) -> WorkerConfig {
        WorkerConfig {
            environment_id: environment_id.into(),
            api_url: api_url.into(),
            key,
            auth: AuthScheme::default(),
            policy: "default".into(),
            max_sessions: 8,
            state_dir: PathBuf::from("/var/lib/stockade"),
            workdir: "/workspace".into(),
            metrics: None,
            shutdown_timeout: Duration::from_secs(60),
            log_json: false,
            exe: PathBuf::from("/proc/self/exe"),
            poll_wait: Duration::from_secs(20),
            events_wait: Duration::from_secs(10),
            heartbeat_every: None,
            api_timeout: Duration::from_secs(15),
            outputs_retention: Duration::from_secs(7 * 86_400),
            wake: None,
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
    heartbeat_every: Option<Duration>,
    events_wait: Duration,
    retention: Duration,
    /// Items being run, with their lease signal: an item the control plane hands out again
    /// (its lease expired meanwhile) must first be taken from the run that lost it.
    active: std::sync::Mutex<std::collections::HashMap<String, Arc<watch::Sender<item::Lease>>>>,
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

/// Runs until `shutdown` leaves `Running` and every session has been wound down.
pub async fn run(cfg: WorkerConfig, mut shutdown: watch::Receiver<Shutdown>) -> Result<(), WorkerError> {
    if cfg.workdir.trim_end_matches('/') != "/workspace" {
        return Err(WorkerError::Workdir(cfg.workdir.clone()));
    }
    let (policy, _) = crate::policy::load(Some(&cfg.policy)).map_err(|e| WorkerError::Policy(e.to_string()))?;
    let ids = crate::jail::namespaces::IdMapping::for_host(&policy.user);
    let owner = ids.host_ids(&policy.user);
    let state = StateDir::open(&cfg.state_dir)?;
    let mut client = Client::new(&cfg.api_url, cfg.key.clone(), cfg.auth).map_err(WorkerError::Client)?;
    client.timeout = cfg.api_timeout;
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = cfg.metrics {
        serve_metrics(addr, metrics.clone()).await?;
    }
    // Jails of a crashed run died with it (PDEATHSIG); their cgroups did not.
    tokio::task::spawn_blocking(crate::jail::cgroups::remove_stale_all).await.ok();
    state.prune_outputs(cfg.outputs_retention);
    tracing::info!(
        worker_id = %state.worker_id,
        environment_id = %cfg.environment_id,
        api = %cfg.api_url,
        policy = %cfg.policy,
        max_sessions = cfg.max_sessions,
        "worker starting"
    );
    let ctx = Arc::new(Ctx {
        client,
        env: cfg.environment_id.clone(),
        runner: RunnerConfig { exe: cfg.exe.clone(), policy: cfg.policy.clone(), log_json: cfg.log_json },
        metrics,
        owner,
        heartbeat_every: cfg.heartbeat_every,
        events_wait: cfg.events_wait,
        retention: cfg.outputs_retention,
        active: Default::default(),
        state,
    });
    // Items follow `inner`, which mirrors the caller's signal and can escalate on its own when
    // the shutdown timeout passes.
    let (inner_tx, inner) = watch::channel(*shutdown.borrow());
    let inner_tx = Arc::new(inner_tx);
    {
        let (mut outer, tx) = (shutdown.clone(), inner_tx.clone());
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
    }
    let slots = Arc::new(Semaphore::new(cfg.max_sessions.max(1)));
    let mut tasks = tokio::task::JoinSet::new();

    // Items a previous run held: resume those whose lease is still ours.
    for rec in ctx.state.held() {
        match ctx.client.heartbeat(&ctx.env, &rec.item.id, &ctx.state.worker_id).await {
            Ok(item) => {
                tracing::info!(work_id = %item.id, "resuming an item held before a restart");
                let permit = slots.clone().acquire_owned().await.expect("semaphore open");
                let (c, s) = (ctx.clone(), inner.clone());
                tasks.spawn(async move {
                    item::run(c, item, true, s).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::info!(work_id = %rec.item.id, error = %e, "an item held before a restart is no longer ours");
                let (kept, _) = ctx.state.retire(&rec);
                tracing::info!(outputs = ?kept, "its outputs were kept");
            }
        }
    }

    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut drained = false;
    while *shutdown.borrow() == Shutdown::Running {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
            _ = shutdown.changed() => break,
        };
        if let (Some(wake), true) = (&cfg.wake, drained) {
            tokio::select! {
                () = wake.notified() => tracing::debug!("woken by a webhook"),
                () = tokio::time::sleep(cfg.poll_wait) => {}
                _ = shutdown.changed() => break,
            }
        }
        let wait = if cfg.wake.is_some() { Duration::ZERO } else { cfg.poll_wait };
        let t = Instant::now();
        let claimed = tokio::select! {
            r = ctx.client.claim(&ctx.env, &ctx.state.worker_id, wait) => r,
            _ = shutdown.changed() => break,
        };
        match claimed {
            Ok(Some(item)) => {
                backoff.reset();
                drained = false;
                ctx.metrics.poll("item");
                ctx.metrics.claims.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(work_id = %item.id, session_id = %item.session_id, "claimed");
                item::supersede(&ctx, &item.id).await;
                let (c, s) = (ctx.clone(), inner.clone());
                tasks.spawn(async move {
                    item::run(c, item, false, s).await;
                    drop(permit);
                });
            }
            Ok(None) => {
                backoff.reset();
                drained = true;
                ctx.metrics.poll("empty");
                // A server that does not hold the request must not make this a busy loop.
                if cfg.wake.is_none() && t.elapsed() < Duration::from_millis(500) {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
            Err(e) => {
                ctx.metrics.poll("error");
                let d = backoff.delay_for(&e);
                tracing::warn!(error = %e, retry_ms = d.as_millis() as u64, "claiming work failed");
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
    }
    // Shutting down: sessions see the same signal. Past the timeout, escalate to force.
    tracing::info!(sessions = tasks.len(), "worker stopping");
    if tokio::time::timeout(cfg.shutdown_timeout, join_all(&mut tasks)).await.is_err() {
        tracing::warn!(timeout = ?cfg.shutdown_timeout, "sessions did not stop in time; forcing");
        inner_tx.send_replace(Shutdown::Force);
        if tokio::time::timeout(Duration::from_secs(15), join_all(&mut tasks)).await.is_err() {
            tasks.abort_all(); // dropping a session process kills it, and its jail with it
            while tasks.join_next().await.is_some() {}
            tokio::task::spawn_blocking(crate::jail::cgroups::remove_stale_all).await.ok();
        }
    }
    tracing::info!("worker stopped");
    Ok(())
}

async fn join_all(tasks: &mut tokio::task::JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}
