//! One work item, from claim to release: its directories, its jail, the lease heartbeat, the
//! session's tool calls and their results.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::Instrument;

use super::runner::{RunnerError, SessionProcess};
use super::state::{ItemDirs, ItemRecord};
use super::{Ctx, Shutdown};
use crate::control_plane::wire::{Event, FinalStatus, WorkItem};
use crate::control_plane::{ApiError, Backoff};
use crate::policy::narrow::{self, Narrowing};
use crate::tools::ToolResult;
use crate::util::{parse_rfc3339, rfc3339};

/// What the lease heartbeat has learned, in increasing severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Lease {
    Held,
    StopRequested,
    ForceRequested,
    Lost,
}

/// How an item's session ended.
#[derive(Debug)]
enum End {
    /// The session went idle: the agent's run is over.
    Completed,
    /// `work.stop` asked for it.
    Stopped {
        forced: bool,
    },
    /// The worker is shutting down: the item goes back to the queue.
    Released {
        reason: String,
    },
    Lost,
    Failed(String),
}

/// The severity of the signals in force: the lease's and the worker's.
fn signals(lease: &watch::Receiver<Lease>, shutdown: &watch::Receiver<Shutdown>) -> (Lease, Shutdown) {
    (*lease.borrow(), *shutdown.borrow())
}

/// Resolves when either signal changes (never, once both senders are gone).
async fn changed(lease: &mut watch::Receiver<Lease>, shutdown: &mut watch::Receiver<Shutdown>) {
    tokio::select! {
        r = lease.changed() => if r.is_err() { std::future::pending::<()>().await },
        r = shutdown.changed() => if r.is_err() { std::future::pending::<()>().await },
    }
}

/// Resolves when the jail must die at once.
async fn must_kill(mut lease: watch::Receiver<Lease>, mut shutdown: watch::Receiver<Shutdown>) {
    loop {
        let (l, s) = signals(&lease, &shutdown);
        if l >= Lease::ForceRequested || s == Shutdown::Force {
            return;
        }
        changed(&mut lease, &mut shutdown).await;
    }
}

pub(super) async fn run(ctx: Arc<Ctx>, item: WorkItem, resume: bool, shutdown: watch::Receiver<Shutdown>) {
    let span = tracing::info_span!("work", work_id = %item.id, session_id = %item.session_id);
    async move {
        let rec =
            ItemRecord { item: item.clone(), environment_id: ctx.env.clone(), started_at: rfc3339(SystemTime::now()) };
        let dirs = match ctx.state.hold(&rec, ctx.owner) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the session's directories; releasing the item");
                let _ = ctx.client.release(&ctx.env, &item.id, &ctx.state.worker_id, "worker state error").await;
                return;
            }
        };
        tracing::info!(resume, workspace = %dirs.workspace.display(), "session starting");
        ctx.metrics.active_sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (lease_tx, lease_rx) = watch::channel(Lease::Held);
        let lease_tx = Arc::new(lease_tx);
        ctx.active.lock().unwrap_or_else(|p| p.into_inner()).insert(item.id.clone(), lease_tx.clone());
        let hb = tokio::spawn(heartbeat(ctx.clone(), item.clone(), lease_tx).in_current_span());
        let end = drive(&ctx, &item, &dirs, lease_rx.clone(), shutdown).await;
        finish(&ctx, &item, &end, &lease_rx).await;
        hb.abort();
        let (kept, files) = ctx.state.retire(&rec);
        ctx.metrics.active_sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            end = ?end,
            outputs = kept.as_ref().map(|p| p.display().to_string()),
            output_files = ?files,
            "session ended"
        );
        ctx.state.prune_outputs(ctx.retention);
        ctx.active.lock().unwrap_or_else(|p| p.into_inner()).remove(&item.id);
    }
    .instrument(span)
    .await
}

/// The control plane handed out `work_id` again while this worker still runs it: the lease that
/// run holds has expired, so the run is told so (its jail dies at once) and waited for.
pub(super) async fn supersede(ctx: &Ctx, work_id: &str) {
    let old = ctx.active.lock().unwrap_or_else(|p| p.into_inner()).get(work_id).cloned();
    let Some(tx) = old else { return };
    tracing::warn!(work_id, "claimed again while still running it: the earlier lease expired; stopping that run");
    ctx.metrics.lease_losses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tx.send_replace(Lease::Lost);
    let t = Instant::now();
    while ctx.active.lock().unwrap_or_else(|p| p.into_inner()).contains_key(work_id)
        && t.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn heartbeat(ctx: Arc<Ctx>, item: WorkItem, tx: Arc<watch::Sender<Lease>>) {
    // The lease's end, taken off the server's timestamp once at receipt and then kept on the
    // monotonic clock, so that a stepped host clock cannot end (or extend) it.
    let parse = |w: &WorkItem| {
        w.lease_expires_at
            .as_deref()
            .and_then(|t| parse_rfc3339(t).ok())
            .map(|end| Instant::now() + end.duration_since(SystemTime::now()).unwrap_or_default())
    };
    let mut until = parse(&item).unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
    let every = ctx.heartbeat_every.unwrap_or_else(|| {
        let left = until.saturating_duration_since(Instant::now());
        (left / 3).clamp(Duration::from_millis(200), Duration::from_secs(30))
    });
    let raise = |to: Lease| {
        tx.send_if_modified(|l| {
            let up = to > *l;
            if up {
                *l = to;
            }
            up
        });
    };
    let mut failing = false;
    loop {
        tokio::time::sleep(if failing { every.min(Duration::from_secs(1)) } else { every }).await;
        match ctx.client.heartbeat(&ctx.env, &item.id, &ctx.state.worker_id).await {
            Ok(w) => {
                failing = false;
                until = parse(&w).unwrap_or(until);
                if w.force {
                    raise(Lease::ForceRequested);
                } else if w.stop_requested {
                    raise(Lease::StopRequested);
                }
            }
            Err(e @ (ApiError::LeaseLost(_) | ApiError::NotFound(_))) => {
                tracing::warn!(error = %e, "lease lost");
                ctx.metrics.lease_losses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                raise(Lease::Lost);
                return;
            }
            Err(e) => {
                failing = true;
                ctx.metrics.heartbeat_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if Instant::now() >= until {
                    tracing::warn!(error = %e, "heartbeats failed until the lease ran out; lease lost");
                    ctx.metrics.lease_losses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    raise(Lease::Lost);
                    return;
                }
                tracing::warn!(error = %e, "heartbeat failed; retrying while the lease lasts");
            }
        }
    }
}

async fn start_jail(ctx: &Ctx, dirs: &ItemDirs, narrow: Option<&str>) -> Result<SessionProcess, RunnerError> {
    let p = SessionProcess::start(&ctx.runner, &dirs.workspace, &dirs.outputs, narrow).await?;
    ctx.metrics.jail_built(p.build_time);
    tracing::info!(jail_pid = p.jail_pid, build_ms = p.build_time.as_millis() as u64, "session jail ready");
    Ok(p)
}

/// Runs the session until it ends, is stopped, or the lease is lost. The jail is gone when it
/// returns.
async fn drive(
    ctx: &Ctx,
    item: &WorkItem,
    dirs: &ItemDirs,
    mut lease: watch::Receiver<Lease>,
    mut shutdown: watch::Receiver<Shutdown>,
) -> End {
    if dirs.fresh && !item.skills.is_empty() {
        if let Err(e) = super::skills::fetch(ctx, item, dirs).await {
            return End::Failed(format!("downloading skills: {e}"));
        }
    }
    // Session metadata may narrow the worker's policy, never widen it (see policy::narrow).
    let narrow = match item.metadata.get(narrow::METADATA_KEY).map(Narrowing::from_json) {
        None => None,
        Some(Ok(n)) => Some(serde_json::to_string(&n).expect("serialises")),
        Some(Err(e)) => return End::Failed(e),
    };
    let narrow = narrow.as_deref();
    let mut jail = match start_jail(ctx, dirs, narrow).await {
        Ok(p) => p,
        Err(e) => return End::Failed(e.to_string()),
    };
    let mut answered: HashSet<String> = HashSet::new();
    // Results a crashed run produced but may not have posted.
    for p in ctx.state.outbox(dirs) {
        let r = ToolResult { content: p.content, is_error: p.is_error };
        match post_result(ctx, item, dirs, &p.tool_use_id, &r, &lease).await {
            Ok(()) => {
                answered.insert(p.tool_use_id);
            }
            Err(end) => {
                jail.kill().await;
                return end;
            }
        }
    }
    let mut cursor: Option<String> = None;
    let mut pending: VecDeque<(String, String, serde_json::Value)> = VecDeque::new();
    let (mut ended, mut caught_up) = (false, false);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut restarts = 0;
    loop {
        match signals(&lease, &shutdown) {
            (Lease::Lost, _) => {
                jail.kill().await;
                return End::Lost;
            }
            (Lease::ForceRequested, _) => {
                jail.kill().await;
                return End::Stopped { forced: true };
            }
            (_, Shutdown::Force) => {
                jail.kill().await;
                return End::Released { reason: "worker forced to stop".into() };
            }
            (Lease::StopRequested, _) => {
                jail.end(Duration::from_secs(5)).await;
                return End::Stopped { forced: false };
            }
            (_, Shutdown::Graceful) => {
                jail.end(Duration::from_secs(5)).await;
                return End::Released { reason: "worker shutting down".into() };
            }
            (Lease::Held, Shutdown::Running) => {}
        }
        // Calls run only once the whole stream has been read, so that a result listed on a
        // later page is known before its call would be run again.
        if caught_up {
            if let Some((id, name, input)) = pending.pop_front() {
                if answered.contains(&id) {
                    continue;
                }
                let span = tracing::info_span!("tool", tool_use_id = %id, tool = %name);
                let t = Instant::now();
                let r = tokio::select! {
                    r = jail.call(&id, &name, &input).instrument(span.clone()) => r,
                    () = must_kill(lease.clone(), shutdown.clone()) => continue,
                };
                let result = match r {
                    Ok(r) => r,
                    Err(e) => {
                        restarts += 1;
                        tracing::warn!(parent: &span, error = %e, restarts, "the session jail died during a call");
                        jail.kill().await;
                        if restarts > 3 {
                            return End::Failed(format!("the session jail died {restarts} times"));
                        }
                        jail = match start_jail(ctx, dirs, narrow).await {
                            Ok(p) => p,
                            Err(e) => return End::Failed(e.to_string()),
                        };
                        ToolResult::err(format!(
                            "The sandbox stopped while running this call ({e}). It was restarted with the same \
                             workspace; shell state (working directory, variables) was lost."
                        ))
                    }
                };
                let took = t.elapsed();
                ctx.metrics.tool_call(&name, result.is_error, took);
                tracing::info!(parent: &span, is_error = result.is_error, took_ms = took.as_millis() as u64, "tool call done");
                if let Err(e) = ctx.state.put_outbox(dirs, &id, &result) {
                    tracing::error!(error = %e, "could not persist a result before posting it");
                }
                match post_result(ctx, item, dirs, &id, &result, &lease).await {
                    Ok(()) => {
                        answered.insert(id);
                    }
                    Err(end) => {
                        jail.kill().await;
                        return end;
                    }
                }
                continue;
            }
            if ended {
                jail.end(Duration::from_secs(5)).await;
                return End::Completed;
            }
        }
        let wait = if caught_up { ctx.events_wait } else { Duration::ZERO };
        let listed = tokio::select! {
            r = ctx.client.list_events(&item.session_id, cursor.as_deref(), wait) => r,
            () = changed(&mut lease, &mut shutdown) => continue,
        };
        match listed {
            Ok(l) => {
                backoff.reset();
                for e in l.data {
                    match e.event {
                        Event::ToolUse { id, name, input } => {
                            if !answered.contains(&id) {
                                pending.push_back((id, name, input));
                            }
                        }
                        Event::ToolResult { tool_use_id, .. } => {
                            pending.retain(|(id, _, _)| *id != tool_use_id);
                            answered.insert(tool_use_id);
                        }
                        Event::StatusIdle | Event::StatusTerminated => ended = true,
                        Event::StatusRunning => ended = false,
                        Event::Other => {}
                    }
                }
                if l.last_id.is_some() {
                    cursor = l.last_id;
                }
                caught_up = !l.has_more;
            }
            Err(ApiError::NotFound(m)) => {
                jail.kill().await;
                return End::Failed(format!("the session is gone: {m}"));
            }
            Err(e) => {
                let d = backoff.delay_for(&e);
                tracing::warn!(error = %e, retry_ms = d.as_millis() as u64, "listing session events failed");
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    () = changed(&mut lease, &mut shutdown) => {}
                }
            }
        }
    }
}

/// Whether the session already holds a result for `id`; None when that cannot be told now.
async fn already_posted(ctx: &Ctx, session: &str, id: &str) -> Option<bool> {
    let mut after: Option<String> = None;
    loop {
        let l = ctx.client.list_events(session, after.as_deref(), Duration::ZERO).await.ok()?;
        if l.data.iter().any(|e| matches!(&e.event, Event::ToolResult { tool_use_id, .. } if tool_use_id == id)) {
            return Some(true);
        }
        if !l.has_more || l.last_id.is_none() {
            return Some(false);
        }
        after = l.last_id;
    }
}

/// Posts a result exactly once: retried until the lease is lost, and after any failure that
/// may have taken effect, the session is checked for it before posting again.
async fn post_result(
    ctx: &Ctx,
    item: &WorkItem,
    dirs: &ItemDirs,
    id: &str,
    r: &ToolResult,
    lease: &watch::Receiver<Lease>,
) -> Result<(), End> {
    let ev = Event::ToolResult { tool_use_id: id.into(), content: r.content.clone(), is_error: r.is_error };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut permanent = 0;
    let mut lease = lease.clone();
    loop {
        if *lease.borrow() == Lease::Lost {
            return Err(End::Lost);
        }
        match ctx.client.post_events(&item.session_id, vec![ev.clone()]).await {
            Ok(()) => break,
            Err(e) => {
                // Only a 429 certainly did nothing; anything else may have landed.
                if !matches!(e, ApiError::RateLimited { .. })
                    && already_posted(ctx, &item.session_id, id).await == Some(true)
                {
                    tracing::info!(tool_use_id = id, error = %e, "the result had been recorded despite the error");
                    break;
                }
                if matches!(e, ApiError::Rejected { .. } | ApiError::NotFound(_) | ApiError::Auth { .. }) {
                    permanent += 1;
                    if permanent >= 3 {
                        return Err(End::Failed(format!("the control plane refuses the result of {id}: {e}")));
                    }
                }
                ctx.metrics.result_post_retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let d = backoff.delay_for(&e);
                tracing::warn!(tool_use_id = id, error = %e, retry_ms = d.as_millis() as u64, "posting a result failed");
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    r = lease.changed() => if r.is_err() { tokio::time::sleep(d).await },
                }
            }
        }
    }
    ctx.state.take_outbox(dirs, id);
    Ok(())
}

/// Tells the control plane how the item ended.
async fn finish(ctx: &Ctx, item: &WorkItem, end: &End, lease: &watch::Receiver<Lease>) {
    let (status, msg) = match end {
        End::Lost => return,
        End::Released { reason } => {
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            for _ in 0..5 {
                match ctx.client.release(&ctx.env, &item.id, &ctx.state.worker_id, reason).await {
                    Ok(()) | Err(ApiError::LeaseLost(_) | ApiError::NotFound(_)) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "releasing the item failed");
                        tokio::time::sleep(backoff.delay_for(&e)).await;
                    }
                }
            }
            return;
        }
        End::Completed => (FinalStatus::Completed, None),
        End::Stopped { forced } => {
            (FinalStatus::Stopped, Some(if *forced { "stopped (forced)" } else { "stopped" }.to_owned()))
        }
        End::Failed(m) => {
            tracing::error!(error = %m, "session failed");
            (FinalStatus::Failed, Some(m.clone()))
        }
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        if *lease.borrow() == Lease::Lost {
            return;
        }
        match ctx.client.complete(&ctx.env, &item.id, &ctx.state.worker_id, status, msg.clone()).await {
            Ok(_) => return,
            Err(e @ (ApiError::LeaseLost(_) | ApiError::NotFound(_))) => {
                tracing::warn!(error = %e, "could not complete the item: lease lost");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "completing the item failed; retrying");
                tokio::time::sleep(backoff.delay_for(&e)).await;
            }
        }
    }
}
