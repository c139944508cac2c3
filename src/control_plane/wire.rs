//! The wire format of the Environments Work API, session events and skills, as the official
//! SDKs speak it (`shared/spec/control-plane.md`). The API client and the local control plane
//! both use these types and paths, so the two cannot drift apart.
//!
//! Parsing is lenient where the API grows: unknown fields are ignored, unknown event types are
//! kept as `Event::Other`, and only the fields the worker acts on are required.

use serde::{Deserialize, Serialize};

/// The API version header value (`anthropic-version`), as the pinned official SDK sends it
/// (`anthropic/_constants.py`).
pub(crate) const API_VERSION: &str = "2026-10-21";
/// The beta that gates environments, work and sessions (`anthropic-beta`).
pub(crate) const BETA: &str = "managed-agents-2026-04-01";
pub const DEFAULT_API_URL: &str = "https://api.anthropic.com";
/// The first heartbeat's `expected_last_heartbeat`: it claims the lease.
pub const NO_HEARTBEAT: &str = "NO_HEARTBEAT";
/// The longest `block_ms` a poll may ask for.
pub(crate) const MAX_BLOCK_MS: u32 = 999;
/// The header that names the polling worker.
pub(crate) const WORKER_ID_HEADER: &str = "anthropic-worker-id";

/// Request paths, relative to the API base URL (the official SDK 2.15.0 sends no `?beta=true`).
pub mod path {
    pub fn poll(env: &str) -> String {
        format!("/v1/environments/{env}/work/poll")
    }
    pub fn work_list(env: &str) -> String {
        format!("/v1/environments/{env}/work")
    }
    pub fn work(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}")
    }
    pub fn ack(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}/ack")
    }
    pub fn heartbeat(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}/heartbeat")
    }
    pub fn stop(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}/stop")
    }
    pub fn stats(env: &str) -> String {
        format!("/v1/environments/{env}/work/stats")
    }
    pub fn session(session: &str) -> String {
        format!("/v1/sessions/{session}")
    }
    pub fn events(session: &str) -> String {
        format!("/v1/sessions/{session}/events")
    }
    pub fn events_stream(session: &str) -> String {
        format!("/v1/sessions/{session}/events/stream")
    }
    pub fn skill_versions(skill: &str) -> String {
        format!("/v1/skills/{skill}/versions")
    }
    pub fn skill_version(skill: &str, version: &str) -> String {
        format!("/v1/skills/{skill}/versions/{version}")
    }
    pub fn skill_content(skill: &str, version: &str) -> String {
        format!("/v1/skills/{skill}/versions/{version}/content")
    }
    pub fn memories(store: &str) -> String {
        format!("/v1/memory_stores/{store}/memories")
    }
    pub fn memory(store: &str, memory: &str) -> String {
        format!("/v1/memory_stores/{store}/memories/{memory}")
    }
}

/// The beta the official clients send on the memory endpoints.
pub(crate) const MEMORY_BETA: &str = "agent-memory-2026-07-22";

/// The event types the official session runner lists (`HISTORY_EVENT_TYPES`): those it acts on,
/// except `session.deleted`, which is only streamed.
pub(crate) const HISTORY_EVENT_TYPES: &[&str] = &[
    "agent.tool_use",
    "agent.custom_tool_use",
    "agent.tool_result",
    "user.tool_result",
    "user.custom_tool_result",
    "user.tool_confirmation",
    "session.status_idle",
    "session.status_running",
    "session.status_rescheduled",
    "session.status_terminated",
    "session.thread_status_running",
    "session.thread_status_rescheduled",
    "session.thread_status_idle",
    "session.thread_status_terminated",
];

/// The states of a work item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkState {
    Queued,
    Starting,
    Active,
    Stopping,
    Stopped,
}

impl WorkState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkState::Queued => "queued",
            WorkState::Starting => "starting",
            WorkState::Active => "active",
            WorkState::Stopping => "stopping",
            WorkState::Stopped => "stopped",
        }
    }
}

/// What a work item is for: `{"type":"session","id":"session_…"}` or a health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkData {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub id: String,
}

/// A work item (`BetaSelfHostedWork`). Its `Debug` output leaves the secret out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    pub id: String,
    #[serde(rename = "type", default = "work_type")]
    pub kind: String,
    #[serde(default)]
    pub environment_id: String,
    pub data: WorkData,
    pub state: WorkState,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub acknowledged_at: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub latest_heartbeat_at: Option<String>,
    #[serde(default)]
    pub stop_requested_at: Option<String>,
    #[serde(default)]
    pub stopped_at: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// base64url JSON `WorkSecret`, on poll answers only. Never logged.
    #[serde(default)]
    pub secret: Option<String>,
}

fn work_type() -> String {
    "work".into()
}

impl std::fmt::Debug for WorkItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkItem")
            .field("id", &self.id)
            .field("environment_id", &self.environment_id)
            .field("data", &self.data)
            .field("state", &self.state)
            .field("metadata", &self.metadata)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

impl WorkItem {
    /// An item known only by its ids, as a process handed one claimed item sees it (`worker run`).
    pub fn claimed(id: &str, environment_id: &str, session_id: &str, secret: Option<String>) -> WorkItem {
        WorkItem {
            id: id.to_owned(),
            kind: work_type(),
            environment_id: environment_id.to_owned(),
            data: WorkData { kind: "session".into(), id: session_id.to_owned() },
            state: WorkState::Starting,
            created_at: None,
            acknowledged_at: None,
            started_at: None,
            latest_heartbeat_at: None,
            stop_requested_at: None,
            stopped_at: None,
            metadata: Default::default(),
            secret,
        }
    }

    /// The session this item serves; None for health checks and other kinds.
    pub fn session_id(&self) -> Option<&str> {
        (self.data.kind == "session").then_some(self.data.id.as_str())
    }
}

impl std::fmt::Display for WorkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decoded `secret` of a work item: the bearer for that item's per-session calls.
#[derive(Clone, Deserialize, Serialize)]
pub struct WorkSecret {
    pub sessions_token: String,
    #[serde(default)]
    pub api_base_url: Option<String>,
}

impl std::fmt::Debug for WorkSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkSecret([redacted])")
    }
}

impl WorkSecret {
    /// Decodes the base64url (padded or not) JSON payload; None when it yields no token.
    pub fn decode(secret: &str) -> Option<WorkSecret> {
        use base64::Engine;
        let trimmed = secret.trim().trim_end_matches('=');
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed).ok()?;
        let s: WorkSecret = serde_json::from_slice(&bytes).ok()?;
        (!s.sessions_token.is_empty()).then_some(s)
    }

    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).expect("serialises"))
    }
}

/// The answer to a heartbeat (`BetaSelfHostedWorkHeartbeatResponse`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub last_heartbeat: String,
    pub lease_extended: bool,
    pub state: WorkState,
    pub ttl_seconds: u64,
}

/// `work.stop` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StopRequest {
    #[serde(default)]
    pub force: bool,
}

/// `work.update` body: a merge patch of the metadata (null removes a key).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct UpdateWork {
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// `work.stats` (`BetaSelfHostedWorkQueueStats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkQueueStats {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub depth: u64,
    pub pending: u64,
    #[serde(default)]
    pub oldest_queued_at: Option<String>,
    /// Workers that polled in the last 30 s; null when the server cannot tell.
    #[serde(default)]
    pub workers_polling: Option<u64>,
}

/// A cursor page: `{"data": [...], "next_page": "…" | null}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub next_page: Option<String>,
}

/// A content block of a tool result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    Text { text: String },
    Image { source: serde_json::Value },
    Document { source: serde_json::Value },
}

impl ContentBlock {
    /// The runner's rendering of a text result: an empty text becomes `(no output)`.
    pub fn text(s: impl Into<String>) -> ContentBlock {
        let s = s.into();
        ContentBlock::Text { text: if s.is_empty() { "(no output)".into() } else { s } }
    }
}

/// A session event, as far as the worker acts on it (the official runner's `SessionView`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// `agent.tool_use`, or `agent.custom_tool_use` (`custom`).
    ToolUse {
        name: String,
        input: serde_json::Value,
        custom: bool,
        /// `session_thread_id`: none for the primary thread.
        thread: Option<String>,
        /// `evaluated_permission` as sent: `allow`, `deny`, `ask`, or absent.
        permission: Option<String>,
    },
    /// A result for a call (`user.tool_result`, `agent.tool_result`, `user.custom_tool_result`).
    ToolResult {
        tool_use_id: String,
    },
    ToolConfirmation {
        tool_use_id: String,
        allow: bool,
    },
    /// `session.status_idle`, with the calls a `requires_action` stop lists.
    Idle {
        stop_reason: Option<String>,
        event_ids: Vec<String>,
    },
    /// `session.thread_status_{running,rescheduled,idle,terminated}`.
    Thread {
        thread: String,
        status: ThreadStatus,
        stop_reason: Option<String>,
        event_ids: Vec<String>,
    },
    /// Another `session.status_*` (running, rescheduled): the turn goes on.
    Status,
    Terminated,
    Deleted,
    /// Any other type, ignored.
    Other(String),
}

/// A session thread's status event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThreadStatus {
    Running,
    Rescheduled,
    Idle,
    Terminated,
}

/// One event of a session's stream: its id and what it means to the worker.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SessionEvent {
    pub id: String,
    pub event: Event,
}

impl SessionEvent {
    /// Reads an event leniently: an event of an unknown type, or a known type missing a field
    /// the worker does not need, still parses. Fails only without an id or a type, or when a
    /// field the worker acts on is missing.
    pub(crate) fn parse(v: &serde_json::Value) -> Result<SessionEvent, String> {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str());
        let id = s("id").ok_or("an event without an id")?.to_owned();
        let kind = s("type").ok_or_else(|| format!("event {id} has no type"))?;
        let need = |k: &str| s(k).map(str::to_owned).ok_or_else(|| format!("{kind} event {id} has no {k}"));
        let stop = v.get("stop_reason");
        let stop_reason = || stop.and_then(|r| r.get("type")).and_then(|t| t.as_str()).map(str::to_owned);
        let event_ids = || -> Vec<String> {
            stop.and_then(|r| r.get("event_ids"))
                .and_then(|e| e.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        let thread_event = |status| -> Result<Event, String> {
            Ok(Event::Thread {
                thread: need("session_thread_id")?,
                status,
                stop_reason: stop_reason(),
                event_ids: event_ids(),
            })
        };
        let event = match kind {
            "agent.tool_use" | "agent.custom_tool_use" => Event::ToolUse {
                name: need("name")?,
                input: v.get("input").cloned().unwrap_or(serde_json::Value::Object(Default::default())),
                custom: kind == "agent.custom_tool_use",
                thread: s("session_thread_id").map(str::to_owned),
                permission: s("evaluated_permission").map(str::to_owned),
            },
            "user.tool_result" | "agent.tool_result" => Event::ToolResult { tool_use_id: need("tool_use_id")? },
            "user.custom_tool_result" => Event::ToolResult { tool_use_id: need("custom_tool_use_id")? },
            "user.tool_confirmation" => {
                Event::ToolConfirmation { tool_use_id: need("tool_use_id")?, allow: s("result") == Some("allow") }
            }
            "session.status_idle" => Event::Idle { stop_reason: stop_reason(), event_ids: event_ids() },
            "session.status_terminated" => Event::Terminated,
            "session.deleted" => Event::Deleted,
            "session.thread_status_running" => thread_event(ThreadStatus::Running)?,
            "session.thread_status_rescheduled" => thread_event(ThreadStatus::Rescheduled)?,
            "session.thread_status_idle" => thread_event(ThreadStatus::Idle)?,
            "session.thread_status_terminated" => thread_event(ThreadStatus::Terminated)?,
            other if other.starts_with("session.status_") => Event::Status,
            other => Event::Other(other.to_owned()),
        };
        Ok(SessionEvent { id, event })
    }
}

/// The event a worker posts for one tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ToolResultEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub tool_use_id: String,
    pub is_error: bool,
    pub content: Vec<ContentBlock>,
}

impl ToolResultEvent {
    pub(crate) fn new(tool_use_id: &str, is_error: bool, content: Vec<ContentBlock>) -> ToolResultEvent {
        let content = if content.is_empty() { vec![ContentBlock::text("")] } else { content };
        ToolResultEvent { kind: "user.tool_result".into(), tool_use_id: tool_use_id.into(), is_error, content }
    }
}

/// `events.send` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SendEvents<E> {
    pub events: Vec<E>,
}

/// A session as far as the worker reads it: the agent's skills.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// `idle`, `running`, `rescheduling` or `terminated`.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub agent: Option<SessionAgent>,
    /// What is attached to the session; the worker reads the memory stores.
    #[serde(default)]
    pub resources: Vec<serde_json::Value>,
}

/// A `memory_store` entry of a session's `resources[]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStoreResource {
    pub memory_store_id: String,
    #[serde(default)]
    pub mount_path: Option<String>,
    /// `read_write` (the default) or `read_only`.
    #[serde(default)]
    pub access: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

impl MemoryStoreResource {
    pub fn read_only(&self) -> bool {
        self.access.as_deref() == Some("read_only")
    }
}

/// A memory, as the memory endpoints return it (`content` only with `view=full`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub id: String,
    pub path: String,
    pub content_sha256: String,
    #[serde(default)]
    pub content_size_bytes: u64,
    #[serde(default)]
    pub content: Option<String>,
    /// `memory`; a listing may also hold `memory_prefix` items, which the worker skips.
    #[serde(rename = "type", default)]
    pub kind: String,
}

impl Session {
    /// The memory stores attached to the session, in order.
    pub(crate) fn memory_stores(&self) -> Vec<MemoryStoreResource> {
        self.resources
            .iter()
            .filter(|r| r.get("type").and_then(|t| t.as_str()) == Some("memory_store"))
            .filter_map(|r| serde_json::from_value(r.clone()).ok())
            .collect()
    }
}

impl Session {
    pub(crate) fn is_terminated(&self) -> bool {
        self.status.as_deref() == Some("terminated")
    }

    /// The skills of the agent and of its subagents, the first version of a skill winning, as
    /// the official worker downloads them.
    pub(crate) fn skills_with_subagents(&self) -> Vec<SkillRef> {
        let Some(agent) = &self.agent else { return Vec::new() };
        let mut all = agent.skills.clone();
        let member_skills = |members: Option<&serde_json::Value>, all: &mut Vec<SkillRef>| {
            for m in members.and_then(|m| m.as_array()).into_iter().flatten() {
                if m.get("type").and_then(|t| t.as_str()) != Some("agent") && m.get("type").is_some() {
                    continue;
                }
                if let Some(skills) = m.get("skills").cloned() {
                    all.extend(serde_json::from_value::<Vec<SkillRef>>(skills).unwrap_or_default());
                }
            }
        };
        if let Some(multi) = &agent.multiagent {
            match multi.get("type").and_then(|t| t.as_str()) {
                Some("coordinator") => member_skills(multi.get("agents"), &mut all),
                Some("multiagent_20261001") => {
                    for group in ["subagents", "workflows"].iter().filter_map(|g| multi.get(g)) {
                        if group.get("type").and_then(|t| t.as_str()) == Some("enabled") {
                            member_skills(group.get("predefined_agents"), &mut all);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut seen = std::collections::HashSet::new();
        all.retain(|s| seen.insert(s.skill_id.clone()));
        all
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionAgent {
    #[serde(default)]
    pub skills: Vec<SkillRef>,
    /// Subagents, whose skills are downloaded too (read as the API spells them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiagent: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkillRef {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub skill_id: String,
    #[serde(default)]
    pub version: String,
}

/// `GET /v1/skills/{id}/versions/{v}` (`BetaSkillVersion`); `v` is a version id or `latest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkillVersion {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub skill_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub created_at: Option<String>,
}

/// The API's error body: `{"type":"error","error":{"type":"not_found_error","message":"…"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: String,
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorDetail {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// Standard Webhooks headers.
pub mod webhook_header {
    pub const ID: &str = "webhook-id";
    pub const TIMESTAMP: &str = "webhook-timestamp";
    pub const SIGNATURE: &str = "webhook-signature";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_real_work_item_parses_and_unknown_fields_are_ignored() {
        let item: WorkItem = serde_json::from_value(json!({
            "type": "work", "id": "work_1", "environment_id": "env_1",
            "data": {"type": "session", "id": "session_1"}, "state": "queued",
            "created_at": "2026-01-01T00:00:00Z", "acknowledged_at": null, "metadata": {"k": "v"},
            "secret": null, "novel": {"x": 1}
        }))
        .unwrap();
        assert_eq!(item.session_id(), Some("session_1"));
        let hc: WorkItem = serde_json::from_value(
            json!({"id": "work_2", "data": {"type": "healthcheck", "id": "hc"}, "state": "queued"}),
        )
        .unwrap();
        assert_eq!(hc.session_id(), None);
        let e = serde_json::from_value::<WorkItem>(json!({"id": "w", "state": "queued"})).unwrap_err();
        assert!(e.to_string().contains("data"), "{e}");
        let stats: WorkQueueStats = serde_json::from_value(
            json!({"type": "work_queue_stats", "depth": 0, "pending": 0, "oldest_queued_at": null, "workers_polling": null}),
        )
        .unwrap();
        assert_eq!(stats.workers_polling, None);
    }

    #[test]
    fn events_parse_leniently() {
        let p = |v| SessionEvent::parse(&v);
        let e = p(json!({"id": "sevt_1", "type": "agent.tool_use", "name": "bash", "input": {"command": "ls"},
                         "evaluated_permission": "ask", "processed_at": "x", "session_thread_id": "sthr_1"}))
        .unwrap();
        assert!(matches!(&e.event, Event::ToolUse { permission: Some(p), thread: Some(t), custom: false, .. }
            if p == "ask" && t == "sthr_1"));
        let e =
            p(json!({"id": "sevt_2", "type": "agent.tool_use", "name": "read", "evaluated_permission": null})).unwrap();
        assert!(matches!(e.event, Event::ToolUse { permission: None, thread: None, .. }));
        let e = p(json!({"id": "sevt_3", "type": "span.model_request_start", "whatever": [1, 2]})).unwrap();
        assert_eq!(e.event, Event::Other("span.model_request_start".into()));
        let e = p(json!({"id": "sevt_4", "type": "session.status_idle",
                         "stop_reason": {"type": "requires_action", "event_ids": ["sevt_1", 7]}}))
        .unwrap();
        assert_eq!(
            e.event,
            Event::Idle { stop_reason: Some("requires_action".into()), event_ids: vec!["sevt_1".into()] }
        );
        let e = p(json!({"id": "sevt_5", "type": "session.status_rescheduled"})).unwrap();
        assert_eq!(e.event, Event::Status);
        let e = p(json!({"id": "sevt_6", "type": "user.custom_tool_result", "custom_tool_use_id": "sevt_9"})).unwrap();
        assert_eq!(e.event, Event::ToolResult { tool_use_id: "sevt_9".into() });
        assert!(p(json!({"id": "sevt_7", "type": "session.thread_status_idle"}))
            .unwrap_err()
            .contains("session_thread_id"));
        assert!(p(json!({"type": "agent.tool_use", "name": "bash"})).is_err());
        assert!(p(json!({"id": "x", "type": "user.tool_result"})).unwrap_err().contains("tool_use_id"));
    }

    #[test]
    fn results_carry_blocks_and_empty_text_reads_no_output() {
        let ev = ToolResultEvent::new("sevt_1", false, vec![ContentBlock::text("")]);
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            json!({"type": "user.tool_result", "tool_use_id": "sevt_1", "is_error": false,
                   "content": [{"type": "text", "text": "(no output)"}]})
        );
        assert_eq!(ToolResultEvent::new("a", true, vec![]).content, vec![ContentBlock::text("(no output)")]);
    }

    #[test]
    fn work_secrets_decode_padded_or_not_and_never_print() {
        let s = WorkSecret { sessions_token: "sk-ant-req-1".into(), api_base_url: Some("http://x".into()) };
        let enc = s.encode();
        let d = WorkSecret::decode(&enc).unwrap();
        assert_eq!(d.sessions_token, "sk-ant-req-1");
        let padded = format!("{enc}{}", "=".repeat((4 - enc.len() % 4) % 4));
        assert!(WorkSecret::decode(&padded).is_some());
        assert!(WorkSecret::decode("not base64 !").is_none());
        assert_eq!(format!("{d:?}"), "WorkSecret([redacted])");
        let item = WorkItem::claimed("w", "e", "s", Some(enc.clone()));
        assert!(!format!("{item:?}").contains(&enc));
    }
}
