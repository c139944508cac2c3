//! An item's lease, as the official worker holds it (`anthropic.lib.environments._lease`):
//! the first heartbeat (`expected_last_heartbeat=NO_HEARTBEAT`) claims the item and nothing of the
//! session is read or run before it returns `lease_extended: true`; each later beat is due
//! `min(ttl/2, 30 s)` after the previous one was sent and echoes its `last_heartbeat`. The lease
//! is lost on a 412, on any other 4xx that retrying cannot fix, or when no beat succeeded before
//! it expired; a lost item is never stopped, since another worker may hold it.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::{Ctx, Shutdown};
use crate::control_plane::wire::{WorkState, NO_HEARTBEAT};
use crate::control_plane::{ApiError, Backoff, Client};

/// The longest gap between beats, and the most one beat may take.
const HEARTBEAT_MAX: Duration = Duration::from_secs(30);
/// The lease assumed before the first answer (the API's default lease).
pub(super) const TTL_DEFAULT: Duration = Duration::from_secs(300);
/// A stop: this many tries of at most `STOP_ATTEMPT` each, all within `STOP_TOTAL`.
const STOP_TRIES: u32 = 5;
const STOP_ATTEMPT: Duration = Duration::from_secs(10);
const STOP_TOTAL: Duration = Duration::from_secs(60);

/// What the lease heartbeat has learned, in increasing severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Lease {
    Held,
    /// `stopping`, or a lease no longer extended: finish the running call, then end.
    StopRequested,
    /// `stopped`: kill the jail now.
    ForceRequested,
    /// 412, a 4xx that retrying cannot fix, or no heartbeat succeeded before the lease expired:
    /// the item may be someone else's.
    Lost,
}

/// What the heartbeat knows of the lease's timing, shared with the session loop: the lease's
/// length as last granted, when a heartbeat last succeeded, whether the item is claimed, and a
/// way to ask for a beat now.
pub(super) struct LeaseClock {
    inner: std::sync::Mutex<(Duration, Instant)>,
    claimed: watch::Sender<bool>,
    pub(super) beat_now: tokio::sync::Notify,
    /// The item is over for this run: no more beats (one in flight still has its answer
    /// recorded).
    done: watch::Sender<bool>,
}

impl LeaseClock {
    pub(super) fn new() -> LeaseClock {
        LeaseClock {
            inner: std::sync::Mutex::new((TTL_DEFAULT, Instant::now())),
            claimed: watch::channel(false).0,
            beat_now: tokio::sync::Notify::new(),
            done: watch::channel(false).0,
        }
    }

    /// Ends the heartbeat between beats, never inside one: a beat the server applied but whose
    /// answer was dropped would leave the item's record a beat behind, and a restart resuming it
    /// would be refused (412) and lose the session.
    pub(super) async fn stop_beating(&self, hb: tokio::task::JoinHandle<()>) {
        self.done.send_replace(true);
        let abort = hb.abort_handle();
        // A beat is bounded by its own timeout (at most 30 s); this bound is only a backstop.
        if tokio::time::timeout(HEARTBEAT_MAX + Duration::from_secs(5), hb).await.is_err() {
            abort.abort();
        }
    }

    pub(super) fn get(&self) -> (Duration, Instant) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn ttl(&self) -> Duration {
        self.get().0
    }

    fn beat(&self, ttl: Duration) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = (ttl, Instant::now());
        self.claimed.send_replace(true);
    }

    /// Whether a heartbeat of this run extended the lease.
    pub(super) fn is_claimed(&self) -> bool {
        *self.claimed.borrow()
    }

    /// Waits for the claim: true once a heartbeat extended the lease, false when the lease or the
    /// worker ended first.
    pub(super) async fn claimed(
        &self,
        lease: &mut watch::Receiver<Lease>,
        shutdown: &mut watch::Receiver<Shutdown>,
    ) -> bool {
        let mut claimed = self.claimed.subscribe();
        loop {
            if *claimed.borrow_and_update() {
                return true;
            }
            if signals(lease, shutdown) != (Lease::Held, Shutdown::Running) {
                return false;
            }
            tokio::select! {
                _ = claimed.changed() => {}
                () = changed(lease, shutdown) => {}
            }
        }
    }
}

/// The severity of the signals in force: the lease's and the worker's.
pub(super) fn signals(lease: &watch::Receiver<Lease>, shutdown: &watch::Receiver<Shutdown>) -> (Lease, Shutdown) {
    (*lease.borrow(), *shutdown.borrow())
}

/// Resolves when either signal changes (never, once both senders are gone).
pub(super) async fn changed(lease: &mut watch::Receiver<Lease>, shutdown: &mut watch::Receiver<Shutdown>) {
    tokio::select! {
        r = lease.changed() => if r.is_err() { std::future::pending::<()>().await },
        r = shutdown.changed() => if r.is_err() { std::future::pending::<()>().await },
    }
}

/// Resolves when the jail must die at once.
pub(super) async fn must_kill(mut lease: watch::Receiver<Lease>, mut shutdown: watch::Receiver<Shutdown>) {
    loop {
        let (l, s) = signals(&lease, &shutdown);
        if l >= Lease::ForceRequested || s == Shutdown::Force {
            return;
        }
        changed(&mut lease, &mut shutdown).await;
    }
}

/// Whether retrying a failed call can help, as the SDK judges it: transport failures, 5xx, a
/// body that is not JSON, and 408/409/429 can; any other 4xx cannot.
fn fatal(e: &ApiError) -> bool {
    !e.is_transient()
}

/// Ends the item on the control plane as the official worker does: `stop {"force": true}` under
/// the item's credential, up to five tries of at most 10 s within 60 s, a 409 (already stopped)
/// counting as done. A stop the item's token may not make (401) is asked for again, unforced,
/// with the environment key. Never after a lost lease: the item may be someone else's then.
pub(super) async fn stop_item(ctx: &Ctx, client: &Client, work_id: &str, lease: &watch::Receiver<Lease>) {
    match stop_with(client, ctx, work_id, true, lease).await {
        Some(ApiError::Auth { status: 401, .. }) if !client.same_credential(&ctx.client) => {
            tracing::warn!("the item's token may not stop it; asking with the environment key, unforced");
            stop_with(&ctx.client, ctx, work_id, false, lease).await;
        }
        _ => {}
    }
}

/// One stop, retried; the error it ended with, if any.
async fn stop_with(
    client: &Client,
    ctx: &Ctx,
    work_id: &str,
    force: bool,
    lease: &watch::Receiver<Lease>,
) -> Option<ApiError> {
    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    let mut tries = 0;
    loop {
        if *lease.borrow() == Lease::Lost {
            tracing::info!("lease lost; not stopping the work item");
            return None;
        }
        tries += 1;
        let left = STOP_TOTAL.saturating_sub(start.elapsed());
        let e = match client.stop_within(&ctx.env, work_id, force, STOP_ATTEMPT.min(left)).await {
            Ok(_) | Err(ApiError::Conflict(_)) => return None,
            Err(e) => e,
        };
        let d = backoff.delay_for(&e);
        if fatal(&e) || tries >= STOP_TRIES || start.elapsed() + d >= STOP_TOTAL {
            tracing::error!(error = %e, tries, "stopping the item failed");
            return Some(e);
        }
        tracing::warn!(error = %e, retry_ms = d.as_millis() as u64, "stopping the item failed; retrying");
        tokio::time::sleep(d).await;
    }
}

/// The control plane handed out `work_id` again while this worker still runs it: the lease that
/// run holds has expired, so the run is told so (its jail dies at once) and waited for.
pub(super) async fn supersede(ctx: &Ctx, work_id: &str) {
    let old = ctx.active.lock().unwrap_or_else(|p| p.into_inner()).get(work_id).cloned();
    let Some(tx) = old else { return };
    tracing::warn!(work_id, "handed out again while still running it: the earlier lease expired; stopping that run");
    if tx.send_replace(Lease::Lost) != Lease::Lost {
        ctx.metrics.lease_losses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let t = Instant::now();
    while ctx.active.lock().unwrap_or_else(|p| p.into_inner()).contains_key(work_id)
        && t.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The SDK's retry pause for failed beats: 2^n seconds (n from 1) capped at 30, drawn from its
/// upper half, which is the shared backoff from a 2 s base.
fn beat_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(2), HEARTBEAT_MAX)
}

/// Keeps the lease: `NO_HEARTBEAT` first (or the last beat a previous run saw), then each
/// answer's `last_heartbeat` echoed, each beat due `min(ttl/2, 30 s)` after the last one was sent
/// (`--heartbeat-every` overrides the period), a failed one retried with back-off until the lease
/// expires.
pub(super) async fn heartbeat(
    ctx: Arc<Ctx>,
    client: Client,
    mut rec: super::state::ItemRecord,
    tx: Arc<watch::Sender<Lease>>,
    clock: Arc<LeaseClock>,
) {
    let raise = |to: Lease| {
        tx.send_if_modified(|l| {
            let up = to > *l;
            if up {
                *l = to;
            }
            up
        })
    };
    let lost = |why: &str, e: Option<&ApiError>| {
        match e {
            Some(e) => tracing::error!(error = %e, "lease lost: {why}"),
            None => tracing::error!("lease lost: {why}"),
        }
        if raise(Lease::Lost) {
            ctx.metrics.lease_losses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let mut last = rec.last_heartbeat.clone().unwrap_or_else(|| NO_HEARTBEAT.to_owned());
    let mut expires = Instant::now() + TTL_DEFAULT;
    let mut due = Instant::now();
    let mut retry = beat_backoff();
    let mut done = clock.done.subscribe();
    loop {
        if *done.borrow_and_update() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(due.into()) => {}
            () = clock.beat_now.notified() => {}
            _ = done.changed() => continue,
        }
        let sent_at = Instant::now();
        if sent_at >= expires {
            lost("no heartbeat succeeded before the lease expired", None);
            return;
        }
        let timeout = HEARTBEAT_MAX.min(expires - sent_at);
        match client.heartbeat(&ctx.env, &rec.item.id, &last, timeout).await {
            Ok(r) => {
                retry = beat_backoff();
                if !r.lease_extended {
                    tracing::info!(state = ?r.state, "the heartbeat was not extended: the item is to stop");
                    raise(if r.state == WorkState::Stopped { Lease::ForceRequested } else { Lease::StopRequested });
                    return;
                }
                last = r.last_heartbeat.clone();
                let ttl = if r.ttl_seconds > 0 { Duration::from_secs(r.ttl_seconds) } else { clock.ttl() };
                let every =
                    ctx.heartbeat_every.unwrap_or_else(|| (ttl / 2).clamp(Duration::from_millis(500), HEARTBEAT_MAX));
                due = sent_at + every;
                expires = sent_at + ttl;
                clock.beat(ttl);
                rec.last_heartbeat = Some(r.last_heartbeat);
                if let Err(e) = ctx.state.record(&rec) {
                    tracing::warn!(error = %e, "could not record the heartbeat; a restart will not resume this item");
                }
                match r.state {
                    WorkState::Stopped => {
                        tracing::info!("the control plane stopped the item");
                        raise(Lease::ForceRequested);
                        return;
                    }
                    WorkState::Stopping => {
                        tracing::info!("the control plane asks the item to stop");
                        raise(Lease::StopRequested);
                    }
                    _ => {}
                }
            }
            Err(e @ ApiError::LeaseLost(_)) => return lost("heartbeat precondition failed", Some(&e)),
            Err(e) if fatal(&e) => return lost("permanent heartbeat failure", Some(&e)),
            Err(e) => {
                ctx.metrics.heartbeat_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let d = retry.delay_for(&e);
                tracing::warn!(error = %e, retry_ms = d.as_millis() as u64, "transient heartbeat failure");
                due = Instant::now() + d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_beat_is_retried_as_the_sdk_retries_it() {
        // Attempts 1, 2, 3, 4, 5, then capped: [2^n / 2, 2^n] seconds, at most 30.
        let want = [(1.0, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, 16.0), (15.0, 30.0), (15.0, 30.0), (15.0, 30.0)];
        for _ in 0..50 {
            let mut b = beat_backoff();
            for (n, (low, high)) in want.iter().enumerate() {
                let d = b.next_delay().as_secs_f64();
                assert!((*low..=*high).contains(&d), "attempt {}: {d}", n + 1);
            }
        }
    }
}
