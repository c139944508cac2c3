//! A session's tool calls, from the jail's start to its end: each call the session lets run is
//! started in the jail (one per session thread at a time, up to `--max-concurrent-calls` in
//! all), answers are taken as they come and posted, a call the session no longer waits on is
//! stopped, and a jail that dies is rebuilt for the calls that follow.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

use super::feed::{Busy, Call, Feed, Next};
use super::item::{End, Runner};
use super::lease::{must_kill, Lease};
use super::runner::{Answer, SessionProcess};
use super::Shutdown;
use crate::policy::narrow::{self, Narrowing};
use crate::tools::ToolResult;

/// How long calls stopped at the end of a session may take to answer (the official runner's
/// `DRAIN_TIMEOUT`).
const DRAIN: Duration = Duration::from_secs(30);

/// The jail dies more often than this: the session fails.
const MAX_RESTARTS: u32 = 3;

/// A call running in the jail.
struct Running {
    call: Call,
    span: tracing::Span,
    started: Instant,
}

/// The jail and the calls it runs.
struct Calls {
    jail: SessionProcess,
    running: HashMap<Option<String>, Running>,
    restarts: u32,
    narrow: Option<String>,
    /// Calls told to stop, not answered yet.
    stopped: std::collections::HashSet<String>,
}

impl Calls {
    fn busy(&self) -> Busy {
        self.running.iter().map(|(t, r)| (t.clone(), r.call.id.clone())).collect()
    }

    fn take(&mut self, id: &str) -> Option<Running> {
        let thread = self.running.iter().find(|(_, r)| r.call.id == id).map(|(t, _)| t.clone())?;
        self.running.remove(&thread)
    }
}

/// What to do once a result is in hand.
enum After {
    Go,
    Over(End),
}

impl Runner<'_> {
    /// Runs the session until it ends, is stopped, or the lease is lost. The jail is gone when
    /// it returns.
    pub(super) async fn drive(
        &self,
        mut lease: watch::Receiver<Lease>,
        mut shutdown: watch::Receiver<Shutdown>,
    ) -> End {
        // Session metadata may narrow the worker's policy, never widen it (see policy::narrow).
        let narrow = match self.item.metadata.get(narrow::METADATA_KEY).map(Narrowing::from_json) {
            None => None,
            Some(Ok(n)) => Some(serde_json::to_string(&n).expect("serialises")),
            Some(Err(e)) => return End::Failed(e.to_string()),
        };
        // The workspace as the session's metadata asks for it, before anything of the agent's
        // runs; if that is refused or fails, every call is answered with why.
        let refused = self.provision().await.err().map(|r| r.0);
        let jail = match self.start_jail(narrow.as_deref()).await {
            Ok(p) => p,
            Err(e) => return End::Failed(e.to_string()),
        };
        let mut calls = Calls { jail, running: HashMap::new(), restarts: 0, narrow, stopped: Default::default() };
        let mut feed = Feed::new();
        let mut idles_seen = 0u64;
        // Results a crashed run produced: posted only once the session shows they are absent.
        for p in self.ctx.state.outbox(self.dirs) {
            let r = ToolResult { content: p.content.into_blocks(), is_error: p.is_error };
            match self.post_result(&p.tool_use_id, p.name.as_deref(), &r, &lease, true).await {
                Ok(()) => {
                    feed.handled.insert(p.tool_use_id);
                }
                Err(end) => {
                    calls.jail.kill().await;
                    return end;
                }
            }
        }
        loop {
            let busy = calls.busy();
            let after = match feed.next(self, &mut lease, &mut shutdown, &mut calls.jail.answers, &busy).await {
                Next::Call(call) => self.start_call(&mut calls, &mut feed, call, refused.as_deref(), &lease).await,
                Next::Stop(id) => {
                    tracing::info!(tool_use_id = %id, "the session no longer waits on a running call; stopping it");
                    // A jail that is gone says so on its answers.
                    let _ = calls.jail.stop_call(&id).await;
                    calls.stopped.insert(id);
                    After::Go
                }
                Next::Answer(a) => self.answered(&mut calls, &mut feed, a, &lease, true).await,
                Next::Over { end, kill } => return self.wind_up(calls, &mut feed, end, kill, &lease, &shutdown).await,
            };
            if let After::Over(end) = after {
                calls.jail.kill().await;
                return end;
            }
            // The session went idle with nothing running: the memory stores push what changed.
            if let Some(m) = self.memory {
                if feed.view.idles != idles_seen && calls.running.is_empty() {
                    idles_seen = feed.view.idles;
                    let mut m = m.lock().await;
                    if tokio::time::timeout(super::memory::FLUSH_TIMEOUT, m.flush_writes()).await.is_err() {
                        tracing::warn!("memory flush after idle cut off after 30s");
                    }
                }
            }
        }
    }

    /// A `write` or `edit` into a memory store's folder, which the jail left unmade: saved to
    /// the store, then written, as the official worker does; the answer is the tool's.
    async fn save_memory(&self, m: crate::tools::MemoryWrite) -> ToolResult {
        let Some(memory) = self.memory else {
            return ToolResult::err(format!("{}: {}: no memory store to save it to", m.op, m.file_path));
        };
        let saved = memory.lock().await.write_file(&m.path, &m.content, m.replacing.as_deref()).await;
        match saved {
            Ok(true) => ToolResult::ok(m.done),
            Ok(false) => ToolResult::err(format!("{}: {}: not in a memory store's folder", m.op, m.file_path)),
            Err(e) => ToolResult::err(format!("{}: {}: {e}", m.op, m.file_path)),
        }
    }

    /// Starts a call in the jail, or answers it at once when it may not run.
    async fn start_call(
        &self,
        calls: &mut Calls,
        feed: &mut Feed,
        call: Call,
        refused: Option<&str>,
        lease: &watch::Receiver<Lease>,
    ) -> After {
        let thread = call.thread.as_deref().unwrap_or("");
        let span = tracing::info_span!("tool", tool_use_id = %call.id, tool = %call.name, session_thread_id = thread);
        let started = Instant::now();
        // Recorded before it runs: a trail that cannot hold it refuses it.
        let answer = if self.trail.refusing() || !self.trail.call_start(&call.id, &call.name, &call.input) {
            ToolResult::err(crate::session::trail_full())
        } else if let Some(why) = refused {
            ToolResult::err(why.to_owned())
        } else {
            let sent = calls
                .jail
                .start_call(call.thread.as_deref(), &call.id, &call.name, &call.input)
                .instrument(span.clone())
                .await;
            match sent {
                Ok(()) => {
                    calls.running.insert(call.thread.clone(), Running { call, span, started });
                    return After::Go;
                }
                Err(e) => {
                    // Answered, with the calls that ran in it, once the jail is rebuilt.
                    calls.running.insert(call.thread.clone(), Running { call, span, started });
                    return self.jail_died(calls, feed, e.to_string(), lease).await;
                }
            }
        };
        self.finish(feed, Running { call, span, started }, answer, lease, true).await
    }

    /// An answer from the jail: a call's result, or the jail's end.
    async fn answered(
        &self,
        calls: &mut Calls,
        feed: &mut Feed,
        a: Answer,
        lease: &watch::Receiver<Lease>,
        post: bool,
    ) -> After {
        match a {
            Answer::Result { id, result, memory_write } => match calls.take(&id) {
                Some(r) => {
                    let result = match memory_write {
                        Some(m) => self.save_memory(*m).await,
                        None => result,
                    };
                    if calls.stopped.remove(&id) {
                        // A stopped call may have moved files away: pulled again, not deleted.
                        if let Some(m) = self.memory {
                            m.lock().await.restore_missing();
                        }
                    }
                    let after = self.finish(feed, r, result, lease, post).await;
                    if let (After::Go, Some(m), true) = (&after, self.memory, post) {
                        m.lock().await.sync_if_due().await;
                    }
                    after
                }
                None => {
                    tracing::warn!(tool_use_id = %id, "an answer for a call that is not running; dropped");
                    After::Go
                }
            },
            Answer::Gone(why) => self.jail_died(calls, feed, why, lease).await,
        }
    }

    /// The jail died: it is rebuilt (at most `MAX_RESTARTS` times), and each call that ran in it
    /// is answered with what happened.
    async fn jail_died(
        &self,
        calls: &mut Calls,
        feed: &mut Feed,
        why: String,
        lease: &watch::Receiver<Lease>,
    ) -> After {
        calls.restarts += 1;
        let restarts = calls.restarts;
        tracing::warn!(error = %why, restarts, running = calls.running.len(), "the session jail died");
        if restarts > MAX_RESTARTS {
            return After::Over(End::Failed(format!("the session jail died {restarts} times")));
        }
        let new = match self.start_jail(calls.narrow.as_deref()).await {
            Ok(p) => p,
            Err(e) => return After::Over(End::Failed(e.to_string())),
        };
        std::mem::replace(&mut calls.jail, new).kill().await;
        let ran: Vec<Running> = calls.running.drain().map(|(_, r)| r).collect();
        for r in ran {
            let answer = ToolResult::err(format!(
                "The sandbox stopped while running this call (the session jail is gone: {why}). It was restarted with \
                 the same workspace; shell state (working directory, variables) was lost."
            ));
            if let After::Over(end) = self.finish(feed, r, answer, lease, true).await {
                return After::Over(end);
            }
        }
        After::Go
    }

    /// A call's result in hand: recorded, saved and posted (unless its thread terminated, or
    /// `post` is off because the session is over).
    async fn finish(
        &self,
        feed: &mut Feed,
        r: Running,
        result: ToolResult,
        lease: &watch::Receiver<Lease>,
        post: bool,
    ) -> After {
        let Running { call, span, started } = r;
        let took = started.elapsed();
        let size = result.content.iter().map(crate::tools::Block::size).sum();
        self.trail.call_end(&call.id, &call.name, result.is_error, took, size);
        self.ctx.metrics.tool_call(&call.name, result.is_error, took);
        tracing::info!(parent: &span, is_error = result.is_error, took_ms = took.as_millis() as u64, "tool call done");
        feed.catch_up().await;
        if !post {
            tracing::info!(parent: &span, "the session is over; not posting the result");
            return After::Go;
        }
        if feed.view.has_terminated(call.thread.as_deref()) {
            tracing::info!(parent: &span, "thread terminated; not posting the result");
            feed.active_at = Instant::now();
            return After::Go;
        }
        // A result not saved is not reposted after a crash: the state directory follows
        // the trail's `on_full`, like the trail itself.
        let unsaved = match self.ctx.state.put_outbox(self.dirs, &call.id, &call.name, &result) {
            Ok(()) => None,
            Err(e) => {
                self.ctx.metrics.outbox_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e, "could not save a result before posting it: a crash now would lose it");
                (self.ctx.policy.trail.on_full == crate::policy::OnFull::Fail).then(|| {
                    format!(
                        "the worker could not save a tool result before posting it ({e}): with trail.on_full = \"fail\" \
                         the session goes no further without crash-safe posting"
                    )
                })
            }
        };
        match self.post_result(&call.id, Some(&call.name), &result, lease, false).instrument(span).await {
            // The call was told; the session goes no further than its trail can record.
            Ok(()) if self.trail.refusing() => After::Over(End::Failed(crate::session::trail_full())),
            Ok(()) => match unsaved {
                Some(why) => After::Over(End::Failed(why)),
                None => {
                    feed.active_at = Instant::now();
                    After::Go
                }
            },
            Err(end) => After::Over(end),
        }
    }

    /// The item is over. A kill ends the jail at once and drops what runs. A session that
    /// ended has its running calls stopped, as the official runner stops them, and their results
    /// are not posted; a stop request or a worker shutting down lets them finish and posts them
    /// (a forced stop or shutdown still kills). Then the jail ends.
    async fn wind_up(
        &self,
        mut calls: Calls,
        feed: &mut Feed,
        end: End,
        kill: bool,
        lease: &watch::Receiver<Lease>,
        shutdown: &watch::Receiver<Shutdown>,
    ) -> End {
        if kill {
            calls.jail.kill().await;
            return end;
        }
        let session_over = matches!(end, End::Completed(_));
        if session_over {
            for r in calls.running.values() {
                let _ = calls.jail.stop_call(&r.call.id).await;
            }
        }
        let post = !session_over;
        let drain = if session_over { DRAIN } else { Duration::MAX };
        let drained = tokio::time::timeout(drain, async {
            while !calls.running.is_empty() {
                let a = tokio::select! {
                    a = calls.jail.answers.recv() => a.unwrap_or_else(|| Answer::Gone("exited".into())),
                    () = must_kill(lease.clone(), shutdown.clone()) => return false,
                };
                if let Answer::Gone(why) = a {
                    tracing::warn!(error = %why, running = calls.running.len(), "the session jail died while ending");
                    return true;
                }
                if let After::Over(_) = self.answered(&mut calls, feed, a, lease, post).await {
                    return true;
                }
            }
            true
        })
        .await;
        if drained != Ok(true) {
            calls.jail.kill().await;
        } else {
            calls.jail.end(Duration::from_secs(5)).await;
        }
        end
    }
}
