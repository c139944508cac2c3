//! The wire format of the Environments Work API and of session events.
//!
//! Most of it is INFERRED (see `shared/spec/control-plane.md`): paths, the claim/heartbeat/complete
//! shapes, the event types and the auth header. Every such choice lives in this file, and both
//! the API client and the local control plane use these types and paths, so a correction made
//! here moves the worker and the local server together. Unknown fields are ignored everywhere;
//! a missing required field fails deserialisation with serde's "missing field `x`".

use serde::{Deserialize, Serialize};

/// KNOWN: the API version header value.
pub const API_VERSION: &str = "2023-06-01";
/// INFERRED: the beta that gates self-hosted environments.
pub const BETA: &str = "managed-agents-2026-04-01";
pub const DEFAULT_API_URL: &str = "https://api.anthropic.com";

/// How the key is presented. INFERRED: the real API takes API keys as `x-api-key`; whether the
/// environment key goes the same way or as a bearer token is not known, so both are supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuthScheme {
    #[default]
    XApiKey,
    Bearer,
}

/// Request paths, relative to the API base URL.
pub mod path {
    pub fn claim(env: &str) -> String {
        format!("/v1/environments/{env}/work/claim")
    }
    pub fn work(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}")
    }
    pub fn heartbeat(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}/heartbeat")
    }
    pub fn complete(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}/complete")
    }
    pub fn release(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}/release")
    }
    pub fn stop(env: &str, work: &str) -> String {
        format!("/v1/environments/{env}/work/{work}/stop")
    }
    pub fn stats(env: &str) -> String {
        format!("/v1/environments/{env}/work/stats")
    }
    pub fn events(session: &str) -> String {
        format!("/v1/sessions/{session}/events")
    }
    pub fn skill_files(skill: &str) -> String {
        format!("/v1/skills/{skill}/files")
    }
}

/// INFERRED: the states of a work item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkState {
    Queued,
    Claimed,
    Running,
    Stopping,
    Stopped,
    Completed,
    Failed,
}

/// A work item: one session assigned to the environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    pub id: String,
    #[serde(rename = "type", default = "work_type")]
    pub kind: String,
    pub session_id: String,
    pub state: WorkState,
    /// RFC 3339; present while claimed.
    #[serde(default)]
    pub lease_expires_at: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// INFERRED: the agent's skills, downloaded into /workspace/skills/<name>/.
    #[serde(default)]
    pub skills: Vec<SkillRef>,
    /// INFERRED: a `work.stop` request, surfaced on heartbeats.
    #[serde(default)]
    pub stop_requested: bool,
    #[serde(default)]
    pub force: bool,
}

fn work_type() -> String {
    "work".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkillRef {
    pub name: String,
    pub skill_id: String,
}

/// INFERRED: `GET /v1/skills/{id}/files`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkillFiles {
    pub files: Vec<SkillFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkillFile {
    /// Relative path inside the skill's directory.
    pub path: String,
    pub content_base64: String,
    #[serde(default)]
    pub executable: bool,
}

/// INFERRED: body of a claim. `wait_ms` asks the server to hold the request (long poll) until an
/// item is queued or the time passes; the answer is 204 when nothing was claimed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub worker_id: String,
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub worker_id: String,
}

/// INFERRED: how a worker ends its hold on an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalStatus {
    Completed,
    Stopped,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub worker_id: String,
    pub status: FinalStatus,
    #[serde(default)]
    pub message: Option<String>,
}

/// Hands an item back to the queue, for another worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub worker_id: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// KNOWN: `work.stop(work_id, environment_id, force?)`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopRequest {
    #[serde(default)]
    pub force: bool,
}

/// KNOWN: `work.stats(environment_id)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkQueueStats {
    #[serde(rename = "type")]
    pub kind: String,
    pub depth: u64,
    pub pending: u64,
    pub oldest_queued_at: Option<String>,
    pub workers_polling: u64,
}

/// INFERRED: session events. Only the types the worker acts on are modelled; anything else
/// deserialises as `Other` and is skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Event {
    #[serde(rename = "agent.tool_use")]
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: serde_json::Value,
    },
    #[serde(rename = "user.tool_result")]
    ToolResult { tool_use_id: String, content: String, is_error: bool },
    #[serde(rename = "session.status_running")]
    StatusRunning,
    /// The agent finished its turn: the work item is done.
    #[serde(rename = "session.status_idle")]
    StatusIdle,
    #[serde(rename = "session.status_terminated")]
    StatusTerminated,
    #[serde(other)]
    Other,
}

/// An event as listed: the server's id and time around the event itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// The event's position in the session's stream (`evt_...`); for tool uses it is also the
    /// tool_use id, which the event body repeats.
    pub event_id: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(flatten)]
    pub event: Event,
}

/// INFERRED: `GET /v1/sessions/{id}/events?after_id=…&wait_ms=…&limit=…`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListEventsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_id: Option<String>,
    #[serde(default)]
    pub wait_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventList {
    pub data: Vec<EventEnvelope>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub last_id: Option<String>,
}

/// INFERRED: `POST /v1/sessions/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostEvents {
    pub events: Vec<Event>,
}

/// The API's error body: `{"type":"error","error":{"type":"not_found_error","message":"…"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: String,
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// INFERRED: which webhook event types wake a worker.
pub const WEBHOOK_WAKE_EVENTS: &[&str] = &["session.status_run_started"];

/// Webhook headers (Standard Webhooks style, INFERRED).
pub mod webhook_header {
    pub const ID: &str = "webhook-id";
    pub const TIMESTAMP: &str = "webhook-timestamp";
    pub const SIGNATURE: &str = "webhook-signature";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_named() {
        let item: WorkItem = serde_json::from_str(
            r#"{"id":"w1","type":"work","session_id":"s1","state":"claimed","novel":{"x":1},"lease_expires_at":null}"#,
        )
        .unwrap();
        assert_eq!(item.state, WorkState::Claimed);
        let e = serde_json::from_str::<WorkItem>(r#"{"id":"w1","state":"queued"}"#).unwrap_err();
        assert!(e.to_string().contains("session_id"), "{e}");
        let ev: EventEnvelope =
            serde_json::from_str(r#"{"event_id":"e1","type":"agent.thinking","text":"hm"}"#).unwrap();
        assert_eq!(ev.event, Event::Other);
        let ev: EventEnvelope = serde_json::from_str(
            r#"{"event_id":"e2","type":"agent.tool_use","id":"tu1","name":"bash","input":{"command":"ls"},"extra":1}"#,
        )
        .unwrap();
        assert!(matches!(ev.event, Event::ToolUse { ref name, .. } if name == "bash"));
    }
}
