//! The scripted agent of the local control plane: the steps a session's agent takes (tool
//! calls, alone or several at once, from the primary thread or a subagent's), issued one batch
//! at a time as the calls are answered, and what the scripted world does meanwhile (a user who
//! confirms, a client that answers its own tool, a subagent that stops waiting).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;

use super::{now_ms, Db, LocalError, WORKER_TOOLS};

/// How long the scripted agent waits for a call nobody should answer (a denied call, a tool
/// another client owns) before it moves on.
const GRACE: Duration = Duration::from_millis(600);
/// How long the scripted user takes to answer an `ask`.
const CONFIRM_AFTER: Duration = Duration::from_millis(150);

/// One step of a scripted agent: a tool call, optionally ending the session after its result.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptStep {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub input: Value,
    /// After this call's result the session is terminated instead of going on.
    #[serde(default)]
    pub end_session: bool,
    /// `evaluated_permission` of the call: "allow" (default), "ask" or "deny".
    #[serde(default)]
    pub permission: Option<String>,
    /// For "ask": what the scripted user answers, "allow" or "deny".
    #[serde(default)]
    pub confirm: Option<String>,
    /// The session thread (a subagent's) the call comes from: its `session_thread_id`.
    #[serde(default)]
    pub thread: Option<String>,
    /// The next step is issued together with this one, without waiting for this call's result
    /// (a subagent at work while the primary thread is).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub with_next: bool,
    /// For a subagent's call: its thread goes idle (`end_turn`) this long after the call,
    /// without listing it, so the session no longer waits on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandon_after_ms: Option<u64>,
}

impl ScriptStep {
    pub fn call(name: &str, input: Value) -> ScriptStep {
        ScriptStep {
            id: None,
            name: name.into(),
            input,
            end_session: false,
            permission: None,
            confirm: None,
            thread: None,
            with_next: false,
            abandon_after_ms: None,
        }
    }

    pub(super) fn check(&self) -> Result<(), LocalError> {
        let fail = |reason: &str| Err(LocalError::Step { tool: self.name.clone(), reason: reason.to_owned() });
        if self.abandon_after_ms.is_some() && self.thread.is_none() {
            return fail("\"abandon_after_ms\" needs \"thread\": only a subagent's thread goes idle on its own");
        }
        let plain =
            matches!(self.permission.as_deref(), None | Some("allow")) && WORKER_TOOLS.contains(&self.name.as_str());
        if self.with_next && !plain {
            return fail("\"with_next\" is for a call the worker runs with no confirmation (the last call of a batch may have one)");
        }
        let reason = match self.permission.as_deref() {
            None | Some("allow" | "deny") => return Ok(()),
            Some("ask") if matches!(self.confirm.as_deref(), Some("allow" | "deny")) => return Ok(()),
            Some("ask") => "\"ask\" needs \"confirm\": \"allow\" or \"deny\"".to_owned(),
            Some(p) => format!("permission {p:?} is not one of allow, ask, deny"),
        };
        Err(LocalError::Step { tool: self.name.clone(), reason })
    }
}

/// Parses a JSON-lines script; blank lines and lines starting with `#` are skipped.
pub fn parse_script(text: &str, source: &str) -> Result<Vec<ScriptStep>, LocalError> {
    let mut steps = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let step: ScriptStep = serde_json::from_str(l).map_err(|error| LocalError::ScriptJson {
            script: source.to_owned(),
            line: n + 1,
            error,
        })?;
        step.check().map_err(|e| LocalError::ScriptLine {
            script: source.to_owned(),
            line: n + 1,
            error: Box::new(e),
        })?;
        steps.push(step);
    }
    if steps.is_empty() {
        return Err(LocalError::EmptyScript(Some(source.to_owned())));
    }
    Ok(steps)
}

/// Something the scripted world does later, unless the call was answered first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Later {
    /// The user answers an `ask`.
    Confirm { allow: bool },
    /// Nobody will answer (denied): the agent moves on.
    GiveUp,
    /// The client that owns this tool answers it.
    OtherClient,
}

impl Db {
    /// Issues the session's next scripted call, or ends the turn when the script is done.
    pub(super) fn advance(&mut self, session: &str) {
        let s = &self.sessions[session];
        if s.next > 0 && s.script[s.next - 1].end_session {
            let s = self.sessions.get_mut(session).expect("session exists");
            s.status = "terminated".into();
            s.finished = true;
            self.push_event(session, json!({"type": "session.status_terminated"}));
            return;
        }
        if s.next >= s.script.len() {
            self.push_event(session, json!({"type": "agent.message", "content": [{"type": "text", "text": "Done."}]}));
            let s = self.sessions.get_mut(session).expect("session exists");
            s.status = "idle".into();
            s.finished = true;
            self.push_event(session, json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}));
            return;
        }
        // One batch: this step and every following one the step before says to issue with it.
        let mut ids = Vec::new();
        let (step, id, permission) = loop {
            let s = &self.sessions[session];
            let step = s.script[s.next].clone();
            let id = match step.id.clone() {
                Some(id) => id,
                None => self.next_id("sevt"),
            };
            let permission = step.permission.clone().unwrap_or_else(|| "allow".into());
            if let Some(t) = &step.thread {
                if !self.sessions[session].threads.contains(t) {
                    self.sessions.get_mut(session).expect("session exists").threads.insert(t.clone());
                    self.push_event(session, json!({"type": "session.thread_status_running", "session_thread_id": t}));
                }
            }
            let s = self.sessions.get_mut(session).expect("session exists");
            s.next += 1;
            s.issued_ms.insert(id.clone(), now_ms());
            s.batch.insert(id.clone());
            if let (Some(after), Some(t)) = (step.abandon_after_ms, &step.thread) {
                s.abandon.push((now_ms() + after, t.clone(), id.clone()));
            }
            let more = step.with_next && s.next < s.script.len();
            self.push_event(
                session,
                json!({"type": "agent.tool_use", "id": id, "name": step.name, "input": step.input,
                       "evaluated_permission": permission, "session_thread_id": step.thread}),
            );
            ids.push(id.clone());
            if !more {
                break (step, id, permission);
            }
        };
        let later = match (permission.as_str(), step.confirm.as_deref()) {
            ("deny", _) => Some((now_ms() + GRACE.as_millis() as u64, Later::GiveUp)),
            ("ask", c) => {
                Some((now_ms() + CONFIRM_AFTER.as_millis() as u64, Later::Confirm { allow: c == Some("allow") }))
            }
            _ if !WORKER_TOOLS.contains(&step.name.as_str()) => {
                Some((now_ms() + GRACE.as_millis() as u64, Later::OtherClient))
            }
            _ => None,
        };
        let s = self.sessions.get_mut(session).expect("session exists");
        s.waiting = Some(id);
        s.later = later;
        self.push_event(
            session,
            json!({"type": "session.status_idle", "stop_reason": {"type": "requires_action", "event_ids": ids}}),
        );
        let s = self.sessions.get_mut(session).expect("session exists");
        s.status = "idle".into();
    }

    /// A call of the batch is over for the agent (answered, given up, abandoned): once the
    /// whole batch is, the agent goes on. An older state without batches waited on one call.
    pub(super) fn call_over(&mut self, session: &str, id: &str) {
        let s = self.sessions.get_mut(session).expect("session exists");
        let waited = s.batch.remove(id) || (s.batch.is_empty() && s.waiting.as_deref() == Some(id));
        if s.waiting.as_deref() == Some(id) {
            s.later = None;
        }
        if !waited || !s.batch.is_empty() {
            return;
        }
        s.waiting = None;
        s.later = None;
        s.status = "running".into();
        self.push_event(session, json!({"type": "session.status_running"}));
        self.advance(session);
    }

    /// Runs what the scripted world does when its time comes.
    pub(super) fn tick(&mut self) -> bool {
        let now = now_ms();
        let due: Vec<(String, String, Later)> = self
            .sessions
            .values()
            .filter_map(|s| match (&s.waiting, &s.later) {
                (Some(id), Some((at, l))) if *at <= now => Some((s.id.clone(), id.clone(), l.clone())),
                _ => None,
            })
            .collect();
        for (session, id, later) in &due {
            let s = self.sessions.get_mut(session).expect("session exists");
            s.later = None;
            match later {
                Later::Confirm { allow } => {
                    let result = if *allow { "allow" } else { "deny" };
                    if !allow {
                        s.later = Some((now + GRACE.as_millis() as u64, Later::GiveUp));
                    }
                    self.push_event(
                        session,
                        json!({"type": "user.tool_confirmation", "tool_use_id": id, "result": result}),
                    );
                }
                Later::GiveUp => {
                    s.answered_by.insert(id.clone(), "none".into());
                    self.call_over(session, id);
                }
                Later::OtherClient => {
                    s.answered_by.entry(id.clone()).or_insert_with(|| "other".into());
                    s.answered_ms.insert(id.clone(), now);
                    self.push_event(
                        session,
                        json!({"type": "user.tool_result", "tool_use_id": id, "is_error": false,
                               "content": [{"type": "text", "text": "answered by the client that owns this tool"}]}),
                    );
                    self.call_over(session, id);
                }
            }
        }
        // Subagents that stop waiting: their thread goes idle without listing the call, which
        // stays open for a late result.
        let abandoned: Vec<(String, String, String)> = self
            .sessions
            .values_mut()
            .flat_map(|s| {
                let (due, kept) = std::mem::take(&mut s.abandon).into_iter().partition(|(at, _, _)| *at <= now);
                s.abandon = kept;
                due.into_iter().map(|(_, t, id): (u64, String, String)| (s.id.clone(), t, id)).collect::<Vec<_>>()
            })
            .collect();
        for (session, thread, id) in &abandoned {
            if self.sessions[session].answered_ms.contains_key(id) {
                continue;
            }
            self.push_event(
                session,
                json!({"type": "session.thread_status_idle", "session_thread_id": thread,
                       "stop_reason": {"type": "end_turn"}}),
            );
            self.call_over(session, id);
        }
        !due.is_empty() || !abandoned.is_empty()
    }
}
