//! The session's events as an item consumes them: the stream, reconnected with the history
//! listed again into a new view whenever it drops (and every minute while waiting), and the next
//! thing to do: a call the official runner's rules let run, a running call to stop, an answer
//! from the jail, or the signal that ends the item.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

use super::item::{End, Runner};
use super::lease::{changed, signals, Lease};
use super::runner::Answer;
use super::view::{Decision, View};
use super::Shutdown;
use crate::control_plane::client::EventStream;
use crate::tools::TOOLS;

/// How often the history is listed again while the worker waits on the agent.
const RELIST_EVERY: Duration = Duration::from_secs(60);

/// A tool call to run.
pub(super) struct Call {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) input: serde_json::Value,
    pub(super) thread: Option<String>,
}

/// The calls running, by session thread (none: the primary one): thread → call id.
pub(super) type Busy = HashMap<Option<String>, String>;

/// What the session asks of the worker next.
pub(super) enum Next {
    /// A tool call to run.
    Call(Call),
    /// A running call the session no longer takes a result for: stop it.
    Stop(String),
    /// The jail answered a call, or is gone.
    Answer(Answer),
    /// The item is over: the session ended, went idle, was stopped, or the lease or the worker is
    /// going; `kill` when the jail must die at once rather than end.
    Over { end: End, kill: bool },
}

/// The session's events, as the worker consumes them: the stream (reconnected, with the history
/// listed again into a new view, whenever it drops), the view of them, the calls already taken
/// on, and the signals that end an item.
pub(super) struct Feed {
    pub(super) stream: Option<EventStream>,
    pub(super) view: View,
    /// Calls run or left alone: never taken on again, whatever a later listing shows.
    pub(super) handled: HashSet<String>,
    /// Calls logged as waiting for a confirmation.
    pub(super) held: HashSet<String>,
    /// Running calls already told to stop.
    stopped: HashSet<String>,
    /// When the history was last listed: it is listed again every `RELIST_EVERY` while the
    /// worker waits, so an event a stream lost without a sign is still seen.
    pub(super) listed_at: Instant,
    /// The last sign of activity: a call done, or a session found not idle at a connection.
    /// The idle countdown runs from the later of this and the view's `idle_since`.
    pub(super) active_at: Instant,
}

impl Feed {
    pub(super) fn new() -> Feed {
        Feed {
            stream: None,
            view: View::default(),
            handled: HashSet::new(),
            held: HashSet::new(),
            stopped: HashSet::new(),
            listed_at: Instant::now(),
            active_at: Instant::now(),
        }
    }

    /// The next call the session waits on that may run now, as the official runner picks it:
    /// the oldest whose thread runs nothing, while fewer than `limit` calls run. Calls to leave
    /// alone are marked handled on the way.
    fn next_call(&mut self, busy: &Busy, limit: usize) -> Option<Call> {
        for c in self.view.unconfirmed() {
            if self.held.insert(c.id.clone()) {
                tracing::info!(tool_use_id = %c.id, tool = %c.name, "tool call awaiting confirmation; holding");
            }
        }
        for d in self.view.decisions(TOOLS, &self.handled) {
            match d {
                Decision::Skip(c, why) => {
                    tracing::info!(tool_use_id = %c.id, tool = %c.name, reason = why, "not executing tool");
                    self.handled.insert(c.id);
                }
                Decision::Run(c) if busy.len() < limit && !busy.contains_key(&c.thread) => {
                    self.handled.insert(c.id.clone());
                    return Some(Call { id: c.id, name: c.name, input: c.input, thread: c.thread });
                }
                Decision::Run(_) => {}
            }
        }
        None
    }

    /// Applies the events the stream already holds, without waiting: what arrived while a
    /// call ran (its thread may have ended meanwhile).
    pub(super) async fn catch_up(&mut self) {
        let Some(s) = self.stream.as_mut() else { return };
        while let Ok(got) = tokio::time::timeout(Duration::from_millis(1), s.next()).await {
            match got {
                Ok(Some(ev)) => self.view.apply_raw(&ev),
                _ => {
                    self.stream = None;
                    return;
                }
            }
        }
    }

    /// A running call the session no longer takes a result for, not yet told to stop.
    fn call_to_stop(&mut self, busy: &Busy) -> Option<String> {
        let id = busy.values().find(|id| self.view.is_resolved(id) && !self.stopped.contains(*id))?;
        self.stopped.insert(id.clone());
        Some(id.clone())
    }

    /// Waits for the next thing to do while the calls in `busy` run.
    pub(super) async fn next(
        &mut self,
        r: &Runner<'_>,
        lease: &mut watch::Receiver<Lease>,
        shutdown: &mut watch::Receiver<Shutdown>,
        answers: &mut mpsc::UnboundedReceiver<Answer>,
        busy: &Busy,
    ) -> Next {
        loop {
            let stop = match signals(lease, shutdown) {
                (Lease::Lost, _) => Some((true, End::Lost)),
                (Lease::ForceRequested, _) => Some((true, End::Stopped { forced: true })),
                (_, Shutdown::Force) => Some((true, End::Left { reason: "worker forced to stop".into() })),
                (Lease::StopRequested, _) => Some((false, End::Stopped { forced: false })),
                (_, Shutdown::Graceful) => Some((false, End::Left { reason: "worker shutting down".into() })),
                (Lease::Held, Shutdown::Running) => None,
            };
            if let Some((kill, end)) = stop {
                return Next::Over { end, kill };
            }
            if let Some(why) = self.view.ended {
                return Next::Over { end: End::Completed(why), kill: false };
            }
            // An answer that already came is taken before anything new starts.
            if let Ok(a) = answers.try_recv() {
                return Next::Answer(a);
            }
            // Calls start, and are stopped, only while connected, so the view is the whole history.
            if self.stream.is_some() {
                if let Some(id) = self.call_to_stop(busy) {
                    return Next::Stop(id);
                }
                if let Some(call) = self.next_call(busy, r.ctx.max_concurrent_calls) {
                    return Next::Call(call);
                }
            }
            // The idle countdown runs only while no call does.
            let idle_ends = self
                .view
                .idle_since
                .filter(|_| busy.is_empty())
                .map(|since| since.max(self.active_at))
                .and_then(|t| t.checked_add(r.ctx.max_idle));
            if idle_ends.is_some_and(|t| Instant::now() >= t) {
                return Next::Over { end: End::Completed("idle after its turn ended"), kill: false };
            }
            let Some(s) = self.stream.as_mut() else {
                match r.connect(&self.view, lease, shutdown).await {
                    Ok((stream, view, idle)) => {
                        self.stream = Some(stream);
                        self.view = view;
                        self.listed_at = Instant::now();
                        if !idle {
                            self.active_at = Instant::now();
                        }
                    }
                    Err(end) => return Next::Over { end, kill: true },
                }
                continue;
            };
            let relist = (self.listed_at + RELIST_EVERY).saturating_duration_since(Instant::now());
            let wake = idle_ends
                .map_or(Duration::from_secs(3600), |end| end.saturating_duration_since(Instant::now()))
                .min(relist);
            tokio::select! {
                got = s.next() => match got {
                    Ok(Some(ev)) => self.view.apply_raw(&ev),
                    Ok(None) => {
                        tracing::debug!("the event stream closed; reconnecting");
                        self.stream = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the event stream failed; reconnecting");
                        self.stream = None;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                () = tokio::time::sleep(wake) => {
                    if self.listed_at.elapsed() >= RELIST_EVERY {
                        tracing::debug!("listing the session's history again");
                        self.stream = None;
                    }
                }
                () = changed(lease, shutdown) => {}
                a = answers.recv() => return Next::Answer(a.unwrap_or_else(|| Answer::Gone("exited".into()))),
            }
        }
    }
}
