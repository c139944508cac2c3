//! What the worker knows of a session's events, and so which calls it runs: the official
//! session runner's rules (`SessionView` in `anthropic/lib/tools/_beta_session_runner.py`).
//!
//! A call runs when the session waits on it: a `session.status_idle` whose `requires_action`
//! stop lists it in `event_ids`, or a call event that carries `evaluated_permission` or
//! `session_thread_id`. An `ask` call waits for its `user.tool_confirmation`; a denied one is
//! never run. A call of a session thread is not run while an earlier call of the same thread the
//! session may still hold back is unanswered, and nothing of a thread that terminated is run or
//! answered. Any idle that is not `requires_action` ends the turn: from then on the session may
//! be left after `--max-idle`.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::control_plane::wire::{Event, SessionEvent, ThreadStatus};

/// A tool call as its event gave it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CallEvent {
    pub id: String,
    pub name: String,
    pub input: serde_json::Value,
    /// `session_thread_id`; none for the primary thread.
    pub thread: Option<String>,
    permission: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmation {
    Allow,
    Deny,
}

/// One call the view follows. Events that refer to a call can arrive before the call.
#[derive(Debug, Default, Clone)]
struct Tracked {
    event: Option<CallEvent>,
    /// Whether an idle listed the call, or its event said the session waits on it, since the
    /// session last ended a turn. `None` until that shows.
    session_waits: Option<bool>,
    /// How many events had been read when an idle last listed the call.
    listed_at: usize,
    /// For a subagent's call: the stop of its thread's latest idle or termination that did not
    /// list it.
    thread_stop_reason: Option<String>,
    /// The first confirmation (an unknown result counts as a denial).
    confirmation: Option<Confirmation>,
}

impl Tracked {
    fn permission(&self) -> Option<&str> {
        self.event.as_ref().and_then(|e| e.permission.as_deref())
    }

    fn is_waited_on(&self) -> bool {
        self.session_waits == Some(true) && self.thread_stop_reason.is_none()
    }

    fn is_denied(&self) -> bool {
        self.event.is_some() && (self.permission() == Some("deny") || self.confirmation == Some(Confirmation::Deny))
    }

    fn is_unconfirmed(&self) -> bool {
        self.confirmation.is_none() && !matches!(self.permission(), None | Some("allow") | Some("deny"))
    }

    /// Whether the session can hold back the result of a later call of `thread` for this one.
    fn is_unanswered(&self, thread: Option<&str>, tools: &[&str]) -> bool {
        let Some(e) = &self.event else { return false };
        if e.thread.as_deref() != thread || !tools.contains(&e.name.as_str()) {
            return false;
        }
        !self.is_denied() && (self.session_waits.is_none() || (self.is_waited_on() && self.is_unconfirmed()))
    }
}

/// What to do with a call the session waits on.
#[derive(Debug, PartialEq)]
pub(super) enum Decision {
    Run(CallEvent),
    /// Denied, or a tool this worker does not have: never run, and left to the session.
    Skip(CallEvent, &'static str),
}

/// A session's events, applied one by one. A view is rebuilt from the listing at every
/// connection; when each event was first read carries over.
#[derive(Debug, Default)]
pub(super) struct View {
    primary_thread: Option<String>,
    /// When the idle that ended the turn (or a later idle or end of a thread) was first read;
    /// none unless the newest session status is such an idle.
    pub idle_since: Option<Instant>,
    /// Why the session is over, once it is.
    pub ended: Option<&'static str>,
    /// For each thread with a status, whether its newest one is a termination.
    terminated: HashMap<String, bool>,
    seen_before: HashMap<String, Instant>,
    seen_at: HashMap<String, Instant>,
    /// In the order of their events.
    calls: Vec<(String, Tracked)>,
    /// Event types that could not be read, logged once each.
    unreadable: HashSet<String>,
    /// `session.status_idle` events applied: a change is when memory stores flush.
    pub idles: u64,
}

impl View {
    /// An empty view that remembers when `self`'s events were first read.
    pub(super) fn without_events(&self) -> View {
        View { seen_before: self.seen_at.clone(), unreadable: self.unreadable.clone(), ..View::default() }
    }

    /// Whether the session no longer takes a result for a call that was read: its result came
    /// from elsewhere, or its thread's latest idle or end did not list it (a thread that ran out
    /// of retries still takes the results it waited on). A running call that is resolved is
    /// stopped.
    pub(super) fn is_resolved(&self, id: &str) -> bool {
        match self.calls.iter().find(|(i, _)| i == id) {
            None => true,
            Some((_, c)) => !matches!(c.thread_stop_reason.as_deref(), None | Some("retries_exhausted")),
        }
    }

    /// Whether the call's thread terminated: its result is not posted.
    pub(super) fn has_terminated(&self, thread: Option<&str>) -> bool {
        thread.is_some_and(|t| self.terminated.get(t).copied().unwrap_or(false))
    }

    /// Applies one raw event; one that cannot be read costs only itself.
    pub(super) fn apply_raw(&mut self, raw: &serde_json::Value) {
        match SessionEvent::parse(raw) {
            Ok(ev) => self.apply(ev),
            Err(e) => {
                let kind = raw.get("type").and_then(|t| t.as_str()).unwrap_or("?").to_owned();
                if self.unreadable.insert(kind.clone()) {
                    tracing::warn!(event_type = %kind, error = %e, "skipping an event this worker cannot read");
                }
            }
        }
    }

    pub(super) fn apply(&mut self, ev: SessionEvent) {
        // An event the runner does not act on needs no place in the view: applying it again
        // would change nothing, and a history of millions of them costs nothing to keep.
        if matches!(ev.event, Event::Other(_)) {
            return;
        }
        if self.seen_at.contains_key(&ev.id) {
            return;
        }
        let seen_at = self.seen_before.get(&ev.id).copied().unwrap_or_else(Instant::now);
        self.seen_at.insert(ev.id.clone(), seen_at);
        tracing::debug!(event_id = %ev.id, event = ?ev.event, "event");
        match ev.event {
            Event::ToolUse { name, input, custom: _, thread, permission } => {
                // Moved to the end, so the calls stay in the order of their events.
                let mut call = match self.calls.iter().position(|(i, _)| *i == ev.id) {
                    Some(at) => self.calls.remove(at).1,
                    None => Tracked::default(),
                };
                if thread.is_some() || permission.as_deref().is_some_and(|p| !p.is_empty()) {
                    call.session_waits = Some(true);
                }
                call.event = Some(CallEvent { id: ev.id.clone(), name, input, thread, permission });
                self.calls.push((ev.id, call));
            }
            Event::ToolResult { tool_use_id } => {
                // A denied call is kept: it is reported even when its result comes with the denial.
                if let Some(at) = self.calls.iter().position(|(i, c)| *i == tool_use_id && !c.is_denied()) {
                    self.calls.remove(at);
                }
            }
            Event::ToolConfirmation { tool_use_id, allow } => {
                for at in self.calls_among(std::slice::from_ref(&tool_use_id)) {
                    let c = &mut self.calls[at].1;
                    if c.confirmation.is_none() {
                        c.confirmation = Some(if allow { Confirmation::Allow } else { Confirmation::Deny });
                    }
                }
            }
            Event::Terminated => self.ended = Some("session terminated"),
            Event::Deleted => self.ended = Some("session deleted"),
            Event::Idle { stop_reason, event_ids } => {
                self.idles += 1;
                if stop_reason.as_deref() == Some("requires_action") {
                    self.idle_since = None;
                    self.listed(&event_ids);
                    return;
                }
                self.idle_since = Some(seen_at);
                // After `retries_exhausted` the session still takes the results it waited on.
                let exhausted = stop_reason.as_deref() == Some("retries_exhausted");
                for (_, c) in &mut self.calls {
                    c.session_waits = Some(exhausted && c.session_waits == Some(true));
                }
            }
            Event::Thread { thread, status, stop_reason, event_ids } => {
                let ended = matches!(status, ThreadStatus::Idle | ThreadStatus::Terminated);
                self.primary_thread.get_or_insert_with(|| thread.clone());
                self.terminated.insert(thread.clone(), status == ThreadStatus::Terminated);
                if !ended {
                    return;
                }
                // This can make the primary thread run again, so the countdown starts over.
                if let Some(since) = self.idle_since {
                    self.idle_since = Some(since.max(seen_at));
                }
                // A subagent's results stay on its thread, so its idle is the sign.
                let reason = match status {
                    ThreadStatus::Idle => stop_reason.clone().unwrap_or_default(),
                    _ => "session.thread_status_terminated".to_owned(),
                };
                for (_, c) in &mut self.calls {
                    if c.event.as_ref().is_some_and(|e| e.thread.as_deref() == Some(thread.as_str())) {
                        c.thread_stop_reason = Some(reason.clone());
                    }
                }
                if status == ThreadStatus::Idle && stop_reason.as_deref() == Some("requires_action") {
                    for at in self.listed(&event_ids) {
                        self.calls[at].1.thread_stop_reason = None;
                    }
                }
            }
            Event::Status => self.idle_since = None,
            Event::Other(_) => {}
        }
    }

    /// Marks the listed calls waited on; returns their places.
    fn listed(&mut self, ids: &[String]) -> Vec<usize> {
        let at = self.calls_among(ids);
        let read = self.seen_at.len();
        for &i in &at {
            self.calls[i].1.session_waits = Some(true);
            self.calls[i].1.listed_at = read;
        }
        at
    }

    /// The places of the calls with these ids; an id not read yet may be a later call's.
    fn calls_among(&mut self, ids: &[String]) -> Vec<usize> {
        let mut out = Vec::new();
        for id in ids {
            match self.calls.iter().position(|(i, _)| i == id) {
                Some(at) => out.push(at),
                None if !self.seen_at.contains_key(id) => {
                    self.calls.push((id.clone(), Tracked::default()));
                    out.push(self.calls.len() - 1);
                }
                None => {}
            }
        }
        out
    }

    /// Calls that wait on a confirmation, oldest first.
    pub(super) fn unconfirmed(&self) -> Vec<&CallEvent> {
        self.calls
            .iter()
            .filter(|(_, c)| c.is_waited_on() && c.is_unconfirmed())
            .filter_map(|(_, c)| c.event.as_ref())
            .collect()
    }

    /// Whether an earlier call of the same thread may still be answered before this one: the
    /// session can hold back this one's result until then.
    fn is_behind_unanswered_call(&self, event: &CallEvent, tools: &[&str]) -> bool {
        // A thread that sends no status events never shows that the earlier call stopped waiting.
        if let Some(t) = &event.thread {
            if !self.terminated.contains_key(t) {
                return false;
            }
        }
        let Some(at) = self.calls.iter().position(|(i, _)| *i == event.id) else { return false };
        let listed_at = self.calls[at].1.listed_at;
        self.calls[..at]
            .iter()
            .any(|(_, earlier)| earlier.is_unanswered(event.thread.as_deref(), tools) && earlier.listed_at >= listed_at)
    }

    /// What to do next, oldest first, skipping `handled` calls: calls to
    /// leave alone (denied, or a tool not in `tools`) and calls to run.
    pub(super) fn decisions(&self, tools: &[&str], handled: &HashSet<String>) -> Vec<Decision> {
        let mut out = Vec::new();
        for (_, c) in &self.calls {
            let Some(e) = &c.event else { continue };
            if handled.contains(&e.id) || self.has_terminated(e.thread.as_deref()) {
                continue;
            }
            if c.is_denied() {
                out.push(Decision::Skip(e.clone(), "denied"));
            } else if c.is_waited_on() && !c.is_unconfirmed() {
                if !tools.contains(&e.name.as_str()) {
                    out.push(Decision::Skip(e.clone(), "a tool this worker does not run"));
                } else if !self.is_behind_unanswered_call(e, tools) {
                    out.push(Decision::Run(e.clone()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOOLS: &[&str] = &["bash", "read"];

    fn view(events: &[serde_json::Value]) -> View {
        let mut v = View::default();
        for e in events {
            v.apply_raw(e);
        }
        v
    }

    fn runs(v: &View) -> Vec<String> {
        v.decisions(TOOLS, &HashSet::new())
            .into_iter()
            .filter_map(|d| match d {
                Decision::Run(c) => Some(c.id),
                Decision::Skip(..) => None,
            })
            .collect()
    }

    fn call(id: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut e = json!({"id": id, "type": "agent.tool_use", "name": "bash", "input": {"command": "true"}});
        e.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        e
    }

    fn idle(id: &str, reason: &str, ids: &[&str]) -> serde_json::Value {
        json!({"id": id, "type": "session.status_idle", "stop_reason": {"type": reason, "event_ids": ids}})
    }

    #[test]
    fn a_call_runs_once_an_idle_lists_it_or_its_event_says_the_session_waits() {
        // No permission, no thread: only the requires_action idle makes it runnable.
        let mut v = view(&[call("c1", json!({}))]);
        assert!(runs(&v).is_empty());
        v.apply_raw(&idle("i1", "requires_action", &["c1"]));
        assert_eq!(runs(&v), ["c1"]);
        // An evaluated permission is enough.
        assert_eq!(runs(&view(&[call("c2", json!({"evaluated_permission": "allow"}))])), ["c2"]);
        // So is a thread id (the thread sends no status: it is not held back).
        assert_eq!(runs(&view(&[call("c3", json!({"session_thread_id": "sthr_1"}))])), ["c3"]);
        // A listing that came before its call (the stream's order) still counts.
        assert_eq!(runs(&view(&[idle("i2", "requires_action", &["c4"]), call("c4", json!({}))])), ["c4"]);
    }

    #[test]
    fn asks_wait_for_their_confirmation_and_denials_never_run() {
        let mut v = view(&[call("c1", json!({"evaluated_permission": "ask"})), idle("i1", "requires_action", &["c1"])]);
        assert!(runs(&v).is_empty());
        assert_eq!(v.unconfirmed().len(), 1);
        v.apply_raw(&json!({"id": "k1", "type": "user.tool_confirmation", "tool_use_id": "c1", "result": "allow"}));
        assert_eq!(runs(&v), ["c1"]);
        let v = view(&[
            call("c2", json!({"evaluated_permission": "ask"})),
            json!({"id": "k2", "type": "user.tool_confirmation", "tool_use_id": "c2", "result": "deny"}),
        ]);
        assert_eq!(
            v.decisions(TOOLS, &HashSet::new()),
            vec![Decision::Skip(
                CallEvent {
                    id: "c2".into(),
                    name: "bash".into(),
                    input: json!({"command": "true"}),
                    thread: None,
                    permission: Some("ask".into())
                },
                "denied"
            )]
        );
        let v = view(&[call("c3", json!({"evaluated_permission": "deny"}))]);
        assert!(runs(&v).is_empty());
    }

    #[test]
    fn a_result_answers_and_an_end_of_turn_idle_stops_the_waiting() {
        let mut v = view(&[call("c1", json!({"evaluated_permission": "allow"}))]);
        v.apply_raw(&json!({"id": "r1", "type": "user.tool_result", "tool_use_id": "c1"}));
        assert!(runs(&v).is_empty());
        let mut v = view(&[call("c2", json!({"evaluated_permission": "allow"}))]);
        assert!(v.idle_since.is_none());
        v.apply_raw(&idle("i1", "end_turn", &[]));
        assert!(runs(&v).is_empty(), "the session no longer waits on it");
        assert!(v.idle_since.is_some());
        // Any idle but requires_action ends the turn; a later status resumes it.
        v.apply_raw(&json!({"id": "s1", "type": "session.status_running"}));
        assert!(v.idle_since.is_none());
        v.apply_raw(&idle("i2", "retries_exhausted", &[]));
        assert!(v.idle_since.is_some());
    }

    #[test]
    fn threads_run_apart_and_a_terminated_thread_is_left_alone() {
        let t = |id: &str, thread: &str| call(id, json!({"session_thread_id": thread}));
        let mut v = view(&[t("a1", "sthr_a"), t("b1", "sthr_b")]);
        assert_eq!(runs(&v), ["a1", "b1"]);
        v.apply_raw(&json!({"id": "ts", "type": "session.thread_status_terminated", "session_thread_id": "sthr_b"}));
        assert!(v.has_terminated(Some("sthr_b")));
        assert_eq!(runs(&v), ["a1"]);
        // A thread's idle that does not list its call stops the wait on it.
        v.apply_raw(&json!({"id": "ti", "type": "session.thread_status_idle", "session_thread_id": "sthr_a",
                             "stop_reason": {"type": "end_turn"}}));
        assert!(runs(&v).is_empty());
        v.apply_raw(&json!({"id": "ti2", "type": "session.thread_status_idle", "session_thread_id": "sthr_a",
                             "stop_reason": {"type": "requires_action", "event_ids": ["a1"]}}));
        assert_eq!(runs(&v), ["a1"]);
    }

    #[test]
    fn unknown_tools_are_left_to_the_session_and_the_end_is_seen() {
        let mut v = view(&[json!({"id": "w", "type": "agent.tool_use", "name": "web_fetch", "input": {},
                                  "evaluated_permission": "allow"})]);
        assert!(matches!(&v.decisions(TOOLS, &HashSet::new())[..], [Decision::Skip(_, _)]));
        v.apply_raw(&json!({"id": "t", "type": "session.status_terminated"}));
        assert_eq!(v.ended, Some("session terminated"));
        // A rebuilt view keeps when events were first read.
        let first = v.seen_at["w"];
        let mut again = v.without_events();
        again.apply_raw(&json!({"id": "w", "type": "agent.tool_use", "name": "web_fetch", "input": {}}));
        assert_eq!(again.seen_at["w"], first);
    }
}
