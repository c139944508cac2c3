//! The local control plane: the Environments Work API and the session events API as the real
//! service serves them (`wire`), on loopback, with sessions played by a scripted agent. It is the
//! peer of every test and of `stockade demo`, and the official SDK's worker runs against it.
//!
//! State lives in memory, optionally mirrored to a JSON file so a restart keeps environments,
//! queues and transcripts. Leases expire when not heartbeated. Admin endpoints that the real API
//! has no equivalent for live under `/v1/local/` and need the organisation key.

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, Notify};

mod faults;
pub mod memory;
mod script;

use super::wire::{self, ContentBlock, WorkItem, WorkSecret, WorkState};
use super::{random_token, Secret};
use crate::util::rfc3339;
use faults::{add_faults, clear_faults, inject_faults, pending_faults, Chunks};
pub use faults::{Fault, FaultKind, Faults};
use script::Later;
pub use script::{parse_script, ScriptStep};

pub const DEFAULT_ENVIRONMENT: &str = "env_local";

/// The tools a Stockade worker answers; a scripted call to any other name is left to "another
/// client", which the local control plane plays itself.
const WORKER_TOOLS: &[&str] = &["bash", "read", "write", "edit", "glob", "grep"];

/// What the local control plane refuses: a script or session it cannot run, an unknown id, a
/// state file it cannot read.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{}: {source}", path.display())]
    StateRead { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    StateFormat { path: PathBuf, source: serde_json::Error },
    /// A script step (by its tool's name) whose permission settings do not fit together.
    #[error("{tool}: {reason}")]
    Step { tool: String, reason: String },
    /// A line of a JSON-lines script, `source:line: ...`.
    #[error("{script}:{line}: {error}")]
    ScriptLine { script: String, line: usize, error: Box<LocalError> },
    #[error("{script}:{line}: {error}")]
    ScriptJson { script: String, line: usize, error: serde_json::Error },
    #[error("{}the script has no tool calls", .0.as_deref().map(|s| format!("{s}: ")).unwrap_or_default())]
    EmptyScript(Option<String>),
    #[error("no environment {0:?}")]
    NoEnvironment(String),
    #[error("no session {0:?}")]
    NoSession(String),
    #[error("no memory store {0:?}")]
    NoMemoryStore(String),
    #[error("skill {name:?}: archive_base64: {source}")]
    SkillArchive { name: String, source: base64::DecodeError },
}

/// `POST /v1/local/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSession {
    pub environment_id: String,
    pub script: Vec<ScriptStep>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
    /// Skills of the session's agent, each served as one version with this archive.
    #[serde(default)]
    pub skills: Vec<LocalSkill>,
    /// Memory stores to attach (`resources[]` of type `memory_store`).
    #[serde(default)]
    pub memory_stores: Vec<memory::Attached>,
    /// Hand the item out without a `secret` (no sessions token), as a server that issues none.
    #[serde(default)]
    pub no_secret: bool,
}

/// A skill the local control plane serves: its name and the archive bytes (zip or tar, any
/// compression), base64 in JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalSkill {
    pub name: String,
    pub archive_base64: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SkillRec {
    id: String,
    name: String,
    version_id: String,
    created_ms: u64,
    archive_base64: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedSession {
    pub session_id: String,
    pub work_id: String,
}

/// `GET /v1/local/sessions/{id}`: the transcript.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    pub id: String,
    /// idle, running or terminated.
    pub status: String,
    /// Whether the agent's turn has ended (`end_turn` or terminated).
    pub finished: bool,
    pub work_id: String,
    pub work_state: WorkState,
    /// How often the item was handed out by a poll.
    pub polls: u32,
    pub calls: Vec<CallView>,
    /// Results posted for a call that already had one. Should stay 0.
    pub duplicate_results: u64,
    /// Requests made with the credential of an earlier holder of the item after it was handed to
    /// another (`METHOD PATH`): a worker touching a session it no longer holds. Should stay empty.
    pub late_requests: Vec<String>,
    /// When the control plane last accepted a heartbeat of the item (milliseconds since the
    /// epoch), whoever held it.
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallView {
    pub tool_use_id: String,
    pub name: String,
    pub input: Value,
    pub permission: String,
    /// The result's text blocks, joined; None while unanswered.
    pub result: Option<String>,
    pub content: Option<Vec<ContentBlock>>,
    pub is_error: Option<bool>,
    /// "worker" (a `user.tool_result` the worker posted), "other" (the client owning a tool
    /// the worker must leave alone) or "none" (denied, so nobody answered).
    pub answered_by: Option<String>,
    pub issued_at: String,
    pub answered_at: Option<String>,
    pub latency_ms: Option<u64>,
}

/// A request as the local control plane received it (`GET /v1/local/requests`), so tests can hold
/// a client to the wire format. Credentials are named, never shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The query pairs in order.
    pub query: Vec<(String, String)>,
    /// Every header but the credentials, names lower-case.
    pub headers: BTreeMap<String, String>,
    /// Whose credential came with it: `bearer:environment`, `bearer:item:<work id>`,
    /// `x-api-key:organisation`, `x-api-key:environment`, … or `none`.
    pub credential: String,
    /// The body: JSON when it parses, else None with `body_len` telling its size.
    pub body: Option<Value>,
    pub body_len: usize,
}

/// The most requests kept for `GET /v1/local/requests`.
const REQUESTS_KEPT: usize = 20_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EnvRec {
    key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkRec {
    id: String,
    env: String,
    /// `session`, or `healthcheck` for an item that only probes the worker.
    #[serde(default = "session_kind")]
    kind: String,
    session_id: String,
    state: WorkState,
    created_ms: u64,
    acked_ms: Option<u64>,
    started_ms: Option<u64>,
    last_heartbeat: Option<String>,
    heartbeat_ms: Option<u64>,
    lease_until_ms: Option<u64>,
    stop_requested_ms: Option<u64>,
    stopped_ms: Option<u64>,
    metadata: serde_json::Map<String, Value>,
    /// Handed out by a poll but not acked yet: by whom and when.
    polled: Option<(String, u64)>,
    polls: u32,
    queue_seq: u64,
    /// This item's sessions token (the bearer of its `secret`). Each holder gets its own: when
    /// an item that was held is handed out again, the old token is kept (still accepted, as a
    /// real server may) among `superseded`, and its later use is recorded in `late`.
    token: String,
    #[serde(default)]
    superseded: Vec<String>,
    #[serde(default)]
    late: Vec<String>,
    /// Handed out without a `secret`, as a server that issues no per-item token does.
    #[serde(default)]
    no_secret: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRec {
    id: String,
    env: String,
    work_id: String,
    script: Vec<ScriptStep>,
    /// Index of the next script step to issue.
    next: usize,
    events: Vec<Value>,
    status: String,
    finished: bool,
    issued_ms: BTreeMap<String, u64>,
    answered_ms: BTreeMap<String, u64>,
    answered_by: BTreeMap<String, String>,
    /// The agent's skills (ids into `Db::skills`).
    #[serde(default)]
    skills: Vec<String>,
    /// The memory stores attached to the session.
    #[serde(default)]
    memory_stores: Vec<memory::Attached>,
    /// The last call of the batch the agent waits on, and what happens to it at which time.
    waiting: Option<String>,
    later: Option<(u64, Later)>,
    /// The calls of the batch the agent waits on that are not over yet.
    #[serde(default)]
    batch: std::collections::BTreeSet<String>,
    /// Subagent calls whose thread goes idle without them, and when: (time, thread, call).
    #[serde(default)]
    abandon: Vec<(u64, String, String)>,
    /// The subagent threads that have made a call.
    #[serde(default)]
    threads: std::collections::BTreeSet<String>,
    duplicate_results: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Db {
    org_key: String,
    envs: BTreeMap<String, EnvRec>,
    work: BTreeMap<String, WorkRec>,
    sessions: BTreeMap<String, SessionRec>,
    skills: BTreeMap<String, SkillRec>,
    #[serde(default)]
    memory_stores: BTreeMap<String, memory::StoreRec>,
    seq: u64,
    #[serde(skip)]
    polls: HashMap<(String, String), Instant>,
    #[serde(skip)]
    faults: VecDeque<Fault>,
    #[serde(skip)]
    requests: VecDeque<RecordedRequest>,
    /// Events pushed since the last broadcast, for the streams.
    #[serde(skip)]
    outbox: Vec<(String, Value)>,
    /// Webhook payloads not yet handed to a delivery task.
    #[serde(skip)]
    webhooks: Vec<Value>,
}

fn session_kind() -> String {
    "session".into()
}

impl WorkRec {
    /// A new item at the back of the queue.
    fn queued(
        id: &str,
        env: &str,
        kind: &str,
        subject: String,
        seq: u64,
        metadata: serde_json::Map<String, Value>,
    ) -> WorkRec {
        WorkRec {
            id: id.to_owned(),
            env: env.to_owned(),
            kind: kind.to_owned(),
            session_id: subject,
            state: WorkState::Queued,
            created_ms: now_ms(),
            acked_ms: None,
            started_ms: None,
            last_heartbeat: None,
            heartbeat_ms: None,
            lease_until_ms: None,
            stop_requested_ms: None,
            stopped_ms: None,
            metadata,
            polled: None,
            polls: 0,
            queue_seq: seq,
            token: random_token("sk-ant-req-local-"),
            superseded: Vec::new(),
            late: Vec::new(),
            no_secret: false,
        }
    }
}

impl WorkRec {
    /// Every token this item's holders were given, the current one first.
    fn tokens(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.token.as_str()).chain(self.superseded.iter().map(String::as_str))
    }
}

/// Milliseconds on a clock that reads as wall time at start-up and then only moves forward:
/// leases must not expire (or live on) because the host's clock was stepped.
fn now_ms() -> u64 {
    static BASE: std::sync::OnceLock<(u64, Instant)> = std::sync::OnceLock::new();
    let (wall, mono) = BASE.get_or_init(|| {
        (SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64, Instant::now())
    });
    wall + mono.elapsed().as_millis() as u64
}

fn ts(ms: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

fn text_of(content: &[ContentBlock]) -> String {
    content
        .iter()
        .map(|b| match b {
            ContentBlock::Text { text } => text.clone(),
            ContentBlock::Image { .. } => "[image]".into(),
            ContentBlock::Document { .. } => "[document]".into(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Db {
    fn next_id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}_{:08}", self.seq)
    }

    /// Items whose lease ran out go back to the queue (at their old place), or end if a stop
    /// was asked for.
    fn expire_leases(&mut self) -> bool {
        let now = now_ms();
        let mut changed = false;
        for w in self.work.values_mut() {
            if matches!(w.state, WorkState::Starting | WorkState::Active | WorkState::Stopping)
                && w.lease_until_ms.is_some_and(|l| l <= now)
            {
                tracing::info!(work_id = %w.id, "lease expired; item re-queued");
                if w.stop_requested_ms.is_some() {
                    w.state = WorkState::Stopped;
                    w.stopped_ms = Some(now);
                } else {
                    w.state = WorkState::Queued;
                }
                w.last_heartbeat = None;
                w.lease_until_ms = None;
                w.polled = None;
                changed = true;
            }
        }
        changed
    }

    fn view(&self, w: &WorkRec, with_secret: bool) -> WorkItem {
        WorkItem {
            id: w.id.clone(),
            kind: "work".into(),
            environment_id: w.env.clone(),
            data: wire::WorkData { kind: w.kind.clone(), id: w.session_id.clone() },
            state: w.state,
            created_at: Some(ts(w.created_ms)),
            acknowledged_at: w.acked_ms.map(ts),
            started_at: w.started_ms.map(ts),
            latest_heartbeat_at: w.heartbeat_ms.map(ts),
            stop_requested_at: w.stop_requested_ms.map(ts),
            stopped_at: w.stopped_ms.map(ts),
            metadata: w.metadata.clone(),
            secret: (with_secret && !w.no_secret)
                .then(|| WorkSecret { sessions_token: w.token.clone(), api_base_url: None }.encode()),
        }
    }

    /// Appends an event (given without id and time) to a session; returns its id.
    fn push_event(&mut self, session: &str, mut event: Value) -> String {
        let id = match event.get("id").and_then(|i| i.as_str()) {
            Some(i) => i.to_owned(),
            None => self.next_id("sevt"),
        };
        if let Some(o) = event.as_object_mut() {
            o.insert("id".into(), Value::String(id.clone()));
            o.insert("processed_at".into(), Value::String(ts(now_ms())));
        }
        self.outbox.push((session.to_owned(), event.clone()));
        self.sessions.get_mut(session).expect("session exists").events.push(event);
        id
    }

    fn find_tool_use<'a>(&'a self, session: &str, id: &str) -> Option<&'a Value> {
        self.sessions[session].events.iter().find(|e| e["type"] == "agent.tool_use" && e["id"].as_str() == Some(id))
    }
}

pub struct LocalConfig {
    /// How long an ack or a heartbeat holds an item (`ttl_seconds`).
    pub lease: Duration,
    /// Mirror the state to this file.
    pub state_file: Option<PathBuf>,
    /// Deliver `session.status_run_started` to this URL, signed with this key (Standard Webhooks).
    pub webhook: Option<(String, Vec<u8>)>,
    /// The largest request body accepted (413 above it).
    pub max_request_bytes: usize,
}

impl Default for LocalConfig {
    fn default() -> LocalConfig {
        LocalConfig { lease: Duration::from_secs(30), state_file: None, webhook: None, max_request_bytes: 32 << 20 }
    }
}

struct Shared {
    db: Mutex<Db>,
    changed: Notify,
    events: broadcast::Sender<(String, Value)>,
    /// Serialises writes of the state file.
    saving: Mutex<u64>,
    cfg: LocalConfig,
}

#[derive(Clone)]
pub struct LocalControlPlane {
    shared: Arc<Shared>,
}

type ApiResult<T> = Result<T, ApiErr>;

#[derive(Debug)]
pub(crate) struct ApiErr(StatusCode, &'static str, String, Option<Value>);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let body = wire::ErrorBody {
            kind: "error".into(),
            error: wire::ErrorDetail { kind: self.1.into(), message: self.2, details: self.3 },
        };
        (self.0, Json(body)).into_response()
    }
}

fn not_found(what: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::NOT_FOUND, "not_found_error", what.into(), None)
}

fn conflict(what: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::CONFLICT, "conflict_error", what.into(), None)
}

fn invalid(what: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::BAD_REQUEST, "invalid_request_error", what.into(), None)
}

/// Who may make a call.
enum Need<'a> {
    Org,
    /// Any key this server issued: the organisation's, an environment's, an item's token.
    Any,
    /// Worker calls on the queue: the environment's key as a bearer token (or the org key).
    Env(&'a str),
    /// Per-item calls: the environment's key, that item's sessions token, or the org key.
    Item(&'a str, &'a str),
    /// That item's sessions token (or the org key), not the environment's key.
    ItemToken(&'a str, &'a str),
}

fn authorize(db: &Db, h: &HeaderMap, need: Need) -> ApiResult<()> {
    let api_key = h.get("x-api-key").map(|k| k.as_bytes());
    let bearer = h.get("authorization").and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if api_key.is_none() && bearer.is_none() {
        return Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "no x-api-key or bearer token".into(),
            None,
        ));
    }
    let org = api_key.or(bearer).is_some_and(|k| Secret::new(db.org_key.clone()).matches(k));
    let env_ok =
        |env: &str| bearer.is_some_and(|k| db.envs.get(env).is_some_and(|e| Secret::new(e.key.clone()).matches(k)));
    let ok = org
        || match need {
            Need::Org => false,
            Need::Any => bearer.is_some_and(|k| {
                db.envs.values().any(|e| Secret::new(e.key.clone()).matches(k))
                    || db.work.values().any(|w| w.tokens().any(|t| Secret::new(t.to_owned()).matches(k)))
            }),
            Need::Env(env) => env_ok(env),
            Need::Item(env, work) => {
                env_ok(env)
                    || bearer.is_some_and(|k| {
                        db.work.get(work).is_some_and(|w| w.tokens().any(|t| Secret::new(t.to_owned()).matches(k)))
                    })
            }
            Need::ItemToken(env, work) => bearer.is_some_and(|k| {
                db.work
                    .get(work)
                    .is_some_and(|w| w.env == env && w.tokens().any(|t| Secret::new(t.to_owned()).matches(k)))
            }),
        };
    if ok {
        Ok(())
    } else {
        Err(ApiErr(StatusCode::UNAUTHORIZED, "authentication_error", "invalid key for this resource".into(), None))
    }
}

/// Names the credential a request carries, for the request log.
fn credential_of(db: &Db, h: &HeaderMap) -> String {
    let name = |k: &[u8]| {
        if Secret::new(db.org_key.clone()).matches(k) {
            return "organisation".to_owned();
        }
        if let Some((id, _)) = db.envs.iter().find(|(_, e)| Secret::new(e.key.clone()).matches(k)) {
            return format!("environment:{id}");
        }
        if let Some(w) = db.work.values().find(|w| Secret::new(w.token.clone()).matches(k)) {
            return format!("item:{}", w.id);
        }
        match db.work.values().find(|w| w.superseded.iter().any(|t| Secret::new(t.clone()).matches(k))) {
            Some(w) => format!("item:{}:superseded", w.id),
            None => "unknown".to_owned(),
        }
    };
    let mut parts = Vec::new();
    if let Some(k) = h.get("authorization") {
        match k.as_bytes().strip_prefix(b"Bearer ") {
            Some(t) => parts.push(format!("bearer:{}", name(t))),
            None => parts.push("authorization:not-bearer".to_owned()),
        }
    }
    if let Some(k) = h.get("x-api-key") {
        parts.push(format!("x-api-key:{}", name(k.as_bytes())));
    }
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(" ")
    }
}

impl LocalControlPlane {
    /// Loads the state file when there is one; makes sure the default environment exists.
    pub fn new(cfg: LocalConfig) -> Result<LocalControlPlane, LocalError> {
        let mut db = match &cfg.state_file {
            Some(f) if f.exists() => {
                let text =
                    std::fs::read_to_string(f).map_err(|source| LocalError::StateRead { path: f.clone(), source })?;
                serde_json::from_str::<Db>(&text)
                    .map_err(|source| LocalError::StateFormat { path: f.clone(), source })?
            }
            _ => Db::default(),
        };
        if db.org_key.is_empty() {
            db.org_key = random_token("sk-org-local-");
        }
        if db.envs.is_empty() {
            db.envs.insert(DEFAULT_ENVIRONMENT.into(), EnvRec { key: random_token("sk-env-local-") });
        }
        let (events, _) = broadcast::channel(4096);
        let cp = LocalControlPlane {
            shared: Arc::new(Shared { db: Mutex::new(db), changed: Notify::new(), events, saving: Mutex::new(0), cfg }),
        };
        cp.save();
        Ok(cp)
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.shared.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn org_key(&self) -> Secret {
        Secret::new(self.db().org_key.clone())
    }

    pub fn environment_key(&self, env: &str) -> Option<Secret> {
        self.db().envs.get(env).map(|e| Secret::new(e.key.clone()))
    }

    /// Gives an environment a new key; the old one is refused from then on, as after a rotation.
    pub fn rotate_environment_key(&self, env: &str) -> Option<Secret> {
        let key = {
            let mut db = self.db();
            let e = db.envs.get_mut(env)?;
            e.key = random_token("sk-env-local-");
            Secret::new(e.key.clone())
        };
        self.save();
        Some(key)
    }

    /// Writes the keys to `dir` (mode 0600 files `org.key` and `<env>.key`).
    pub fn write_keys(&self, dir: &std::path::Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let db = self.db();
        let mut files = vec![("org.key".to_owned(), db.org_key.clone())];
        files.extend(db.envs.iter().map(|(id, e)| (format!("{id}.key"), e.key.clone())));
        for (name, key) in files {
            let p = dir.join(name);
            let _ = std::fs::remove_file(&p);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&p)?;
            std::io::Write::write_all(&mut f, key.as_bytes())?;
        }
        Ok(())
    }

    /// Writes the state file: one writer at a time, each through a temporary file of its own,
    /// renamed over the old state.
    fn save(&self) {
        let Some(f) = &self.shared.cfg.state_file else { return };
        let mut n = self.shared.saving.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        let text = serde_json::to_vec_pretty(&*self.db()).expect("state serialises");
        let tmp = f.with_extension(format!("tmp.{}.{n}", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, f)) {
            let _ = std::fs::remove_file(&tmp);
            tracing::error!(file = %f.display(), error = %e, "could not save the control plane's state");
        }
    }

    /// State changed: hand new events to the streams, persist, and wake long polls.
    fn changed(&self) {
        let out = std::mem::take(&mut self.db().outbox);
        for e in out {
            let _ = self.shared.events.send(e);
        }
        self.save();
        self.shared.changed.notify_waiters();
    }

    /// Lease expiry and the scripted world's timers.
    fn housekeeping(&self) {
        let changed = {
            let mut db = self.db();
            db.expire_leases() | db.tick()
        };
        if changed {
            self.changed();
        }
    }

    /// Waits until `f` returns Some or `wait` passes.
    async fn long_poll<T>(&self, wait: Duration, mut f: impl FnMut(&mut Db) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.housekeeping();
            let r = f(&mut self.db());
            if r.is_some() {
                self.changed();
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(100)), notified).await;
        }
    }

    pub fn router(&self) -> Router {
        memory::routes()
            .route("/v1/environments/{env}/work", get(list_work))
            .route("/v1/environments/{env}/work/poll", get(poll))
            .route("/v1/environments/{env}/work/stats", get(stats))
            .route("/v1/environments/{env}/work/{work}", get(get_work).post(update_work))
            .route("/v1/environments/{env}/work/{work}/ack", post(ack))
            .route("/v1/environments/{env}/work/{work}/heartbeat", post(heartbeat))
            .route("/v1/environments/{env}/work/{work}/stop", post(stop))
            .route("/v1/sessions/{session}", get(get_session))
            .route("/v1/sessions/{session}/events", get(list_events).post(send_events))
            .route("/v1/sessions/{session}/events/stream", get(stream_events))
            .route("/v1/skills/{skill}/versions", get(list_skill_versions))
            .route("/v1/skills/{skill}/versions/{version}", get(get_skill_version))
            .route("/v1/skills/{skill}/versions/{version}/content", get(skill_content))
            .route("/v1/local/sessions", post(create_session))
            .route("/v1/local/sessions/{session}", get(show_session))
            .route("/v1/local/faults", get(pending_faults).post(add_faults).delete(clear_faults))
            .route("/v1/local/requests", get(list_requests).delete(clear_requests))
            .layer(axum::middleware::from_fn_with_state(self.clone(), inject_faults))
            .layer(axum::middleware::from_fn_with_state(self.clone(), record_request))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(self.clone())
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let ticker = {
            let cp = self.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    cp.housekeeping();
                    let due = std::mem::take(&mut cp.db().webhooks);
                    if let Some((url, key)) = &cp.shared.cfg.webhook {
                        for payload in due {
                            tokio::spawn(deliver(http.clone(), url.clone(), key.clone(), payload));
                        }
                    }
                }
            })
        };
        let r = axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await;
        ticker.abort();
        r
    }

    /// Creates a scripted session and queues its work item (also used in-process by the demo).
    pub fn create_session(&self, req: CreateSession) -> Result<CreatedSession, LocalError> {
        if req.script.is_empty() {
            return Err(LocalError::EmptyScript(None));
        }
        for s in &req.script {
            s.check()?;
        }
        let mut db = self.db();
        if !db.envs.contains_key(&req.environment_id) {
            return Err(LocalError::NoEnvironment(req.environment_id));
        }
        if let Some(a) = req.memory_stores.iter().find(|a| !db.memory_stores.contains_key(&a.memory_store_id)) {
            return Err(LocalError::NoMemoryStore(a.memory_store_id.clone()));
        }
        let session_id = db.next_id("sesn");
        let work_id = db.next_id("work");
        let mut skills = Vec::new();
        for sk in req.skills {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(&sk.archive_base64)
                .map_err(|source| LocalError::SkillArchive { name: sk.name.clone(), source })?;
            let id = db.next_id("skill");
            let version_id = db.next_id("skillver");
            db.skills.insert(
                id.clone(),
                SkillRec {
                    id: id.clone(),
                    name: sk.name,
                    version_id,
                    created_ms: now_ms(),
                    archive_base64: sk.archive_base64,
                },
            );
            skills.push(id);
        }
        let seq = db.seq;
        db.sessions.insert(
            session_id.clone(),
            SessionRec {
                id: session_id.clone(),
                env: req.environment_id.clone(),
                work_id: work_id.clone(),
                script: req.script,
                next: 0,
                events: Vec::new(),
                status: "running".into(),
                finished: false,
                issued_ms: BTreeMap::new(),
                answered_ms: BTreeMap::new(),
                answered_by: BTreeMap::new(),
                skills,
                memory_stores: req.memory_stores,
                waiting: None,
                batch: Default::default(),
                abandon: Vec::new(),
                threads: Default::default(),
                later: None,
                duplicate_results: 0,
            },
        );
        let mut rec = WorkRec::queued(&work_id, &req.environment_id, "session", session_id.clone(), seq, req.metadata);
        rec.no_secret = req.no_secret;
        db.work.insert(work_id.clone(), rec);
        if self.shared.cfg.webhook.is_some() {
            let id = db.next_id("wevt");
            db.webhooks.push(json!({
                "type": "event", "id": id, "created_at": ts(now_ms()),
                "data": {"type": "session.status_run_started", "id": session_id,
                         "organization_id": "org_local", "workspace_id": "wrkspc_local"},
            }));
        }
        db.push_event(&session_id, json!({"type": "user.message", "content": [{"type": "text", "text": "Go."}]}));
        db.push_event(&session_id, json!({"type": "session.status_running"}));
        db.advance(&session_id);
        drop(db);
        self.changed();
        Ok(CreatedSession { session_id, work_id })
    }

    /// Queues a health-check item (`data.type: healthcheck`), which a worker must stop without
    /// running anything; returns its id.
    pub fn create_healthcheck(&self, env: &str) -> Result<String, LocalError> {
        let mut db = self.db();
        if !db.envs.contains_key(env) {
            return Err(LocalError::NoEnvironment(env.to_owned()));
        }
        let id = db.next_id("work");
        let probe = db.next_id("hc");
        let seq = db.seq;
        db.work.insert(id.clone(), WorkRec::queued(&id, env, "healthcheck", probe, seq, Default::default()));
        drop(db);
        self.changed();
        Ok(id)
    }

    /// Appends a raw event to a session, as the real service may send types and shapes this
    /// worker does not know (tests).
    pub fn push_raw_event(&self, session: &str, event: Value) -> Result<(), LocalError> {
        let mut db = self.db();
        if !db.sessions.contains_key(session) {
            return Err(LocalError::NoSession(session.to_owned()));
        }
        db.push_event(session, event);
        drop(db);
        self.changed();
        Ok(())
    }

    /// A work item's state, for tests and the demo.
    pub fn work_state(&self, work: &str) -> Option<WorkState> {
        self.db().work.get(work).map(|w| w.state)
    }

    /// Every request received so far (oldest first), outside `/v1/local/`.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.db().requests.iter().cloned().collect()
    }

    pub fn session_view(&self, id: &str) -> Option<SessionView> {
        let db = self.db();
        let s = db.sessions.get(id)?;
        let w = &db.work[&s.work_id];
        let mut calls: Vec<CallView> = Vec::new();
        for e in &s.events {
            let str_of = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            match e["type"].as_str() {
                Some("agent.tool_use") => {
                    let id = str_of("id");
                    let issued = s.issued_ms.get(&id).copied().unwrap_or(0);
                    let answered = s.answered_ms.get(&id).copied();
                    calls.push(CallView {
                        name: str_of("name"),
                        input: e["input"].clone(),
                        permission: str_of("evaluated_permission"),
                        result: None,
                        content: None,
                        is_error: None,
                        answered_by: s.answered_by.get(&id).cloned(),
                        issued_at: ts(issued),
                        answered_at: answered.map(ts),
                        latency_ms: answered.map(|a| a.saturating_sub(issued)),
                        tool_use_id: id,
                    })
                }
                Some("user.tool_result") => {
                    let id = str_of("tool_use_id");
                    let content: Option<Vec<ContentBlock>> = serde_json::from_value(e["content"].clone()).ok();
                    if let Some(c) = calls.iter_mut().find(|c| c.tool_use_id == id && c.result.is_none()) {
                        c.result = content.as_deref().map(text_of);
                        c.content = content;
                        c.is_error = e["is_error"].as_bool();
                    }
                }
                _ => {}
            }
        }
        Some(SessionView {
            id: s.id.clone(),
            status: s.status.clone(),
            finished: s.finished,
            work_id: w.id.clone(),
            work_state: w.state,
            polls: w.polls,
            calls,
            duplicate_results: s.duplicate_results,
            late_requests: w.late.clone(),
            heartbeat_ms: w.heartbeat_ms,
        })
    }
}

/// POSTs one signed webhook payload, retried a few times on failure.
async fn deliver(http: reqwest::Client, url: String, key: Vec<u8>, payload: Value) {
    let id = payload["id"].as_str().unwrap_or_default().to_owned();
    let body = payload.to_string();
    for attempt in 0..5u32 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs().to_string();
        let sig = super::webhook::sign(&key, &id, &now, body.as_bytes());
        let r = http
            .post(&url)
            .timeout(Duration::from_secs(10))
            .header("content-type", "application/json")
            .header(wire::webhook_header::ID, &id)
            .header(wire::webhook_header::TIMESTAMP, &now)
            .header(wire::webhook_header::SIGNATURE, sig)
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => return,
            Ok(resp) => tracing::warn!(%url, status = resp.status().as_u16(), attempt, "webhook delivery refused"),
            Err(e) => tracing::warn!(%url, error = %e, attempt, "webhook delivery failed"),
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
    }
}

/// Records every request outside `/v1/local/` before anything else sees it.
async fn record_request(State(cp): State<LocalControlPlane>, req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/v1/local/") {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, cp.shared.cfg.max_request_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let msg = format!("request body over {} bytes: {e}", cp.shared.cfg.max_request_bytes);
            return ApiErr(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", msg, None).into_response();
        }
    };
    let query: Vec<(String, String)> = parts.uri.query().map(url_pairs).unwrap_or_default();
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "authorization" | "x-api-key"))
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    {
        let mut db = cp.db();
        let credential = credential_of(&db, &parts.headers);
        let rec = RecordedRequest {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query,
            headers,
            credential,
            body: serde_json::from_slice(&bytes).ok(),
            body_len: bytes.len(),
        };
        // An earlier holder's credential: recorded against the item it no longer holds. A claim
        // (the first heartbeat, `NO_HEARTBEAT`) is not a touch: its sender never held the item,
        // which was handed out again before the claim came.
        let claim = rec.path.ends_with("/heartbeat")
            && rec.query.iter().any(|(k, v)| k == "expected_last_heartbeat" && v == wire::NO_HEARTBEAT);
        let late = rec
            .credential
            .split(' ')
            .find_map(|c| c.strip_suffix(":superseded").and_then(|c| c.rsplit_once("item:")).map(|(_, w)| w.to_owned()))
            .filter(|_| !claim);
        if let Some(work) = late {
            let what = format!("{} {}", rec.method, rec.path);
            if let Some(w) = db.work.get_mut(&work) {
                w.late.push(what);
            }
        }
        if db.requests.len() >= REQUESTS_KEPT {
            db.requests.pop_front();
        }
        db.requests.push_back(rec);
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// Splits and percent-decodes a query string.
fn url_pairs(q: &str) -> Vec<(String, String)> {
    let decode = |s: &str| -> String {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match (b[i], b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
                (b'%', Some(v)) => {
                    out.push(v);
                    i += 3;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct PollQuery {
    block_ms: Option<i64>,
    reclaim_older_than_ms: Option<u64>,
}

async fn poll(
    State(cp): State<LocalControlPlane>,
    Path(env): Path<String>,
    Query(q): Query<PollQuery>,
    h: HeaderMap,
) -> ApiResult<Response> {
    let worker = h.get(wire::WORKER_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    {
        let mut db = cp.db();
        if !db.envs.contains_key(&env) {
            return Err(not_found(format!("environment {env} not found")));
        }
        authorize(&db, &h, Need::Env(&env))?;
        if !worker.is_empty() {
            db.polls.insert((env.clone(), worker.clone()), Instant::now());
        }
    }
    let block = match q.block_ms {
        None => 0,
        Some(b) if (1..=wire::MAX_BLOCK_MS as i64).contains(&b) => b as u64,
        Some(b) => return Err(invalid(format!("block_ms: must be between 1 and 999, got {b}"))),
    };
    let reclaim = q.reclaim_older_than_ms.unwrap_or(5000);
    let got = cp
        .long_poll(Duration::from_millis(block), |db| {
            let now = now_ms();
            let id = db
                .work
                .values()
                .filter(|w| w.env == env && w.state == WorkState::Queued)
                .filter(|w| w.polled.as_ref().is_none_or(|(_, at)| now.saturating_sub(*at) >= reclaim))
                .min_by_key(|w| w.queue_seq)?
                .id
                .clone();
            let w = db.work.get_mut(&id).expect("just found");
            w.polled = Some((worker.clone(), now));
            w.polls += 1;
            // Held before: the new holder gets a token of its own (see `WorkRec::token`).
            if w.acked_ms.is_some() {
                let old = std::mem::replace(&mut w.token, random_token("sk-ant-req-local-"));
                w.superseded.push(old);
            }
            Some(db.view(&db.work[&id], true))
        })
        .await;
    Ok(match got {
        Some(item) => {
            tracing::info!(work_id = %item.id, worker = %worker, "handed out");
            Json(item).into_response()
        }
        None => Json(Value::Null).into_response(),
    })
}

fn item<'a>(db: &'a mut Db, env: &str, work: &str) -> ApiResult<&'a mut WorkRec> {
    match db.work.get_mut(work) {
        Some(w) if w.env == env => Ok(w),
        _ => Err(not_found(format!("work {work} not found"))),
    }
}

async fn ack(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
) -> ApiResult<Json<WorkItem>> {
    let view = {
        let mut db = cp.db();
        db.expire_leases();
        authorize(&db, &h, Need::Env(&env))?;
        let lease = cp.shared.cfg.lease.as_millis() as u64;
        let w = item(&mut db, &env, &work)?;
        if w.state != WorkState::Queued {
            return Err(conflict(format!("work {work} is {}, not queued", w.state)));
        }
        let now = now_ms();
        w.state = WorkState::Starting;
        w.acked_ms = Some(now);
        w.polled = None;
        w.last_heartbeat = None;
        w.lease_until_ms = Some(now + lease);
        let w = db.work[&work].clone();
        db.view(&w, false)
    };
    cp.changed();
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
struct HeartbeatQuery {
    expected_last_heartbeat: Option<String>,
    desired_ttl_seconds: Option<u64>,
}

async fn heartbeat(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    Query(q): Query<HeartbeatQuery>,
    h: HeaderMap,
) -> ApiResult<Json<wire::HeartbeatResponse>> {
    let resp = {
        let mut db = cp.db();
        db.expire_leases();
        authorize(&db, &h, Need::Item(&env, &work))?;
        let Some(expected) = q.expected_last_heartbeat else {
            return Err(invalid("expected_last_heartbeat: required"));
        };
        let default_ttl = cp.shared.cfg.lease.as_secs().max(1);
        let ttl = q.desired_ttl_seconds.unwrap_or(default_ttl).clamp(1, 3600);
        let db_seq = db.seq + 1;
        db.seq = db_seq;
        let w = item(&mut db, &env, &work)?;
        let current = w.last_heartbeat.clone().unwrap_or_else(|| wire::NO_HEARTBEAT.to_owned());
        let held = matches!(w.state, WorkState::Starting | WorkState::Active | WorkState::Stopping);
        // An earlier holder's credential extends nothing, a claim included: the item was handed
        // to another since.
        let superseded = h
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|k| w.superseded.iter().any(|t| Secret::new(t.clone()).matches(k)));
        if !held || current != expected || superseded {
            let details = json!({
                "error_code": "heartbeat_precondition_failed",
                "error_visibility": "user_facing",
                "current_state": {"state": w.state, "last_heartbeat": w.last_heartbeat,
                                  "lease_updated_at": w.heartbeat_ms.map(ts),
                                  "lease_extended": false, "ttl_seconds": default_ttl},
            });
            let actual = w.last_heartbeat.as_deref().unwrap_or("NULL");
            return Err(ApiErr(
                StatusCode::PRECONDITION_FAILED,
                "invalid_request_error",
                format!("Heartbeat precondition failed: expected {expected}, actual was {actual}"),
                Some(details),
            ));
        }
        let now = now_ms();
        // Unique per beat: the next beat must echo exactly this one.
        let stamp = format!("{}.{db_seq:09}Z", ts(now).trim_end_matches('Z'));
        if w.state == WorkState::Starting {
            w.state = WorkState::Active;
            w.started_ms = Some(now);
        }
        w.last_heartbeat = Some(stamp.clone());
        w.heartbeat_ms = Some(now);
        w.lease_until_ms = Some(now + ttl * 1000);
        wire::HeartbeatResponse {
            kind: "work_heartbeat".into(),
            last_heartbeat: stamp,
            lease_extended: true,
            state: w.state,
            ttl_seconds: ttl,
        }
    };
    cp.changed();
    Ok(Json(resp))
}

async fn stop(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<WorkItem>> {
    let req: wire::StopRequest = if body.iter().all(u8::is_ascii_whitespace) {
        wire::StopRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| invalid(format!("body: {e}")))?
    };
    let view = {
        let mut db = cp.db();
        db.expire_leases();
        authorize(&db, &h, Need::Item(&env, &work))?;
        let w = item(&mut db, &env, &work)?;
        if w.state == WorkState::Stopped {
            return Err(conflict(format!("work {work} is already stopped")));
        }
        let now = now_ms();
        w.stop_requested_ms.get_or_insert(now);
        if req.force || w.state == WorkState::Queued {
            w.state = WorkState::Stopped;
            w.stopped_ms = Some(now);
            w.lease_until_ms = None;
        } else {
            w.state = WorkState::Stopping;
        }
        tracing::info!(work_id = %work, force = req.force, state = %w.state, "stop");
        let w = db.work[&work].clone();
        db.view(&w, false)
    };
    cp.changed();
    Ok(Json(view))
}

async fn get_work(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
) -> ApiResult<Json<WorkItem>> {
    let mut db = cp.db();
    db.expire_leases();
    authorize(&db, &h, Need::Item(&env, &work))?;
    let w = item(&mut db, &env, &work)?.clone();
    Ok(Json(db.view(&w, false)))
}

async fn update_work(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<WorkItem>> {
    let req: wire::UpdateWork = serde_json::from_slice(&body).map_err(|e| invalid(format!("body: {e}")))?;
    let view = {
        let mut db = cp.db();
        authorize(&db, &h, Need::Item(&env, &work))?;
        let w = item(&mut db, &env, &work)?;
        for (k, v) in req.metadata {
            match v {
                Value::Null => {
                    w.metadata.remove(&k);
                }
                Value::String(_) => {
                    w.metadata.insert(k, v);
                }
                other => return Err(invalid(format!("metadata.{k}: must be a string or null, got {other}"))),
            }
        }
        let w = db.work[&work].clone();
        db.view(&w, false)
    };
    cp.changed();
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    limit: Option<usize>,
    page: Option<String>,
    order: Option<String>,
}

/// Cursors are offsets, opaque to clients.
fn page_of<T: Clone>(all: &[T], q: &PageQuery, default_limit: usize, max: usize) -> ApiResult<wire::Page<T>> {
    let limit = q.limit.unwrap_or(default_limit);
    if limit == 0 || limit > max {
        return Err(invalid(format!("limit: must be between 1 and {max}, got {limit}")));
    }
    let start = match &q.page {
        None => 0,
        Some(p) => p
            .strip_prefix("page_")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| invalid(format!("page: not a cursor this server issued: {p:?}")))?,
    };
    let end = start.saturating_add(limit).min(all.len());
    let data = all.get(start..end).map(<[T]>::to_vec).unwrap_or_default();
    Ok(wire::Page { data, next_page: (end < all.len()).then(|| format!("page_{end}")) })
}

async fn list_work(
    State(cp): State<LocalControlPlane>,
    Path(env): Path<String>,
    Query(q): Query<PageQuery>,
    h: HeaderMap,
) -> ApiResult<Json<wire::Page<WorkItem>>> {
    let mut db = cp.db();
    db.expire_leases();
    authorize(&db, &h, Need::Env(&env))?;
    let all: Vec<WorkItem> = db.work.values().filter(|w| w.env == env).map(|w| db.view(w, false)).collect();
    Ok(Json(page_of(&all, &q, 20, 1000)?))
}

async fn stats(
    State(cp): State<LocalControlPlane>,
    Path(env): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<wire::WorkQueueStats>> {
    let mut db = cp.db();
    db.expire_leases();
    authorize(&db, &h, Need::Env(&env))?;
    let queued: Vec<&WorkRec> = db.work.values().filter(|w| w.env == env && w.state == WorkState::Queued).collect();
    let now = now_ms();
    Ok(Json(wire::WorkQueueStats {
        kind: "work_queue_stats".into(),
        depth: queued.len() as u64,
        pending: queued.iter().filter(|w| w.polled.as_ref().is_some_and(|(_, at)| now - at < 5000)).count() as u64,
        oldest_queued_at: queued.iter().map(|w| w.created_ms).min().map(ts),
        workers_polling: Some(
            db.polls.iter().filter(|((e, _), at)| *e == env && at.elapsed() < Duration::from_secs(30)).count() as u64,
        ),
    }))
}

fn session_work(db: &Db, session: &str) -> ApiResult<(String, String)> {
    let s = db.sessions.get(session).ok_or_else(|| not_found(format!("session {session} not found")))?;
    Ok((s.env.clone(), s.work_id.clone()))
}

async fn get_session(
    State(cp): State<LocalControlPlane>,
    Path(session): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let db = cp.db();
    let (env, work) = session_work(&db, &session)?;
    authorize(&db, &h, Need::Item(&env, &work))?;
    let s = &db.sessions[&session];
    let created = db.work[&work].created_ms;
    let skills: Vec<Value> =
        s.skills.iter().map(|id| json!({"type": "custom", "skill_id": id, "version": "latest"})).collect();
    let resources: Vec<Value> = s.memory_stores.iter().map(|a| memory::resource(&db, a)).collect();
    Ok(Json(json!({
        "type": "session", "id": s.id, "status": s.status, "environment_id": s.env, "title": null,
        "created_at": ts(created), "updated_at": ts(now_ms()), "archived_at": null,
        "agent": {"type": "agent", "id": "agent_local", "name": "scripted agent", "version": 1,
                  "description": null, "system": null, "model": {"id": "scripted"},
                  "execution_identity": {"type": "agent"}, "mcp_servers": [], "skills": skills,
                  "tools": [{"type": "agent_toolset_20260401"}]},
        "metadata": db.work[&work].metadata, "resources": resources, "outcome_evaluations": [], "vault_ids": [],
        "stats": {"active_seconds": 0.0, "duration_seconds": 0.0}, "usage": {"input_tokens": 0, "output_tokens": 0},
    })))
}

async fn list_events(
    State(cp): State<LocalControlPlane>,
    Path(session): Path<String>,
    Query(q): Query<PageQuery>,
    RawQuery(raw): RawQuery,
    h: HeaderMap,
) -> ApiResult<Json<wire::Page<Value>>> {
    cp.housekeeping();
    let db = cp.db();
    let (env, work) = session_work(&db, &session)?;
    authorize(&db, &h, Need::Item(&env, &work))?;
    // `types[]=A&types[]=B`: only those types, as the API filters.
    let types: Vec<String> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == "types[]")
        .map(|(_, v)| v.into_owned())
        .collect();
    let mut all: Vec<Value> = db.sessions[&session]
        .events
        .iter()
        .filter(|e| types.is_empty() || e["type"].as_str().is_some_and(|t| types.iter().any(|w| w == t)))
        .cloned()
        .collect();
    match q.order.as_deref() {
        None | Some("asc") => {}
        Some("desc") => all.reverse(),
        Some(o) => return Err(invalid(format!("order: must be asc or desc, got {o:?}"))),
    }
    Ok(Json(page_of(&all, &q, 20, 1000)?))
}

async fn send_events(
    State(cp): State<LocalControlPlane>,
    Path(session): Path<String>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let req: wire::SendEvents<Value> = serde_json::from_slice(&body).map_err(|e| invalid(format!("body: {e}")))?;
    let sent = {
        let mut db = cp.db();
        let (env, work) = session_work(&db, &session)?;
        authorize(&db, &h, Need::Item(&env, &work))?;
        if req.events.is_empty() {
            return Err(invalid("events: must not be empty"));
        }
        let mut sent = Vec::new();
        for (i, ev) in req.events.into_iter().enumerate() {
            let kind = ev.get("type").and_then(|t| t.as_str()).unwrap_or_default().to_owned();
            match kind.as_str() {
                "user.tool_result" => {
                    let r: wire::ToolResultEvent =
                        serde_json::from_value(ev.clone()).map_err(|e| invalid(format!("events.{i}: {e}")))?;
                    if db.find_tool_use(&session, &r.tool_use_id).is_none() {
                        return Err(invalid(format!("events.{i}.tool_use_id: no agent.tool_use {}", r.tool_use_id)));
                    }
                    let s = db.sessions.get_mut(&session).expect("exists");
                    if s.answered_ms.contains_key(&r.tool_use_id) || s.answered_by.contains_key(&r.tool_use_id) {
                        s.duplicate_results += 1;
                        tracing::warn!(tool_use_id = %r.tool_use_id, "a second result for one call");
                        return Err(invalid(format!("events.{i}: tool use {} already has a result", r.tool_use_id)));
                    }
                    s.answered_ms.insert(r.tool_use_id.clone(), now_ms());
                    s.answered_by.insert(r.tool_use_id.clone(), "worker".into());
                    let stored = serde_json::to_value(&r).expect("serialises");
                    let id = db.push_event(&session, stored);
                    sent.push(db.sessions[&session].events.iter().find(|e| e["id"] == id.as_str()).cloned());
                    db.call_over(&session, &r.tool_use_id);
                }
                "user.tool_confirmation" | "user.message" | "user.interrupt" | "user.custom_tool_result" => {
                    let id = db.push_event(&session, ev);
                    sent.push(db.sessions[&session].events.iter().find(|e| e["id"] == id.as_str()).cloned());
                }
                other => return Err(invalid(format!("events.{i}.type: {other:?} cannot be sent"))),
            }
        }
        sent
    };
    cp.changed();
    Ok(Json(json!({ "data": sent })))
}

/// Server-sent events: every event pushed to the session from now on, `ping` every few seconds.
/// A client that falls too far behind loses the stream and reconnects (then lists the history).
async fn stream_events(
    State(cp): State<LocalControlPlane>,
    Path(session): Path<String>,
    h: HeaderMap,
) -> ApiResult<Response> {
    let mut rx = {
        let db = cp.db();
        let (env, work) = session_work(&db, &session)?;
        authorize(&db, &h, Need::Item(&env, &work))?;
        cp.shared.events.subscribe()
    };
    let (tx, out) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    tokio::spawn(async move {
        let mut ping = tokio::time::interval(Duration::from_secs(5));
        loop {
            let frame = tokio::select! {
                _ = ping.tick() => "event: ping\ndata: {}\n\n".to_owned(),
                got = rx.recv() => match got {
                    Ok((s, ev)) if s == session => {
                        let name = ev["type"].as_str().unwrap_or("message").to_owned();
                        format!("event: {name}\ndata: {ev}\n\n")
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(frame.into_bytes()).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(Chunks::Channel(out)))
        .expect("static response"))
}

impl SkillRec {
    fn version(&self) -> Value {
        json!({"type": "skill_version", "id": self.version_id, "skill_id": self.id, "name": self.name,
               "description": format!("the {} skill", self.name), "created_at": ts(self.created_ms),
               "directory": self.name})
    }
}

fn skill_at<'a>(db: &'a Db, skill: &str, version: &str) -> ApiResult<&'a SkillRec> {
    match db.skills.get(skill) {
        Some(s) if version == "latest" || version == s.version_id => Ok(s),
        Some(_) => Err(not_found(format!("skill {skill} has no version {version}"))),
        None => Err(not_found(format!("skill {skill} not found"))),
    }
}

async fn list_skill_versions(
    State(cp): State<LocalControlPlane>,
    Path(skill): Path<String>,
    Query(q): Query<PageQuery>,
    h: HeaderMap,
) -> ApiResult<Json<wire::Page<Value>>> {
    let db = cp.db();
    authorize(&db, &h, Need::Any)?;
    let s = skill_at(&db, &skill, "latest")?;
    Ok(Json(page_of(&[s.version()], &q, 20, 1000)?))
}

async fn get_skill_version(
    State(cp): State<LocalControlPlane>,
    Path((skill, version)): Path<(String, String)>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let db = cp.db();
    authorize(&db, &h, Need::Any)?;
    Ok(Json(skill_at(&db, &skill, &version)?.version()))
}

async fn skill_content(
    State(cp): State<LocalControlPlane>,
    Path((skill, version)): Path<(String, String)>,
    h: HeaderMap,
) -> ApiResult<Response> {
    use base64::Engine;
    let db = cp.db();
    authorize(&db, &h, Need::Any)?;
    let s = skill_at(&db, &skill, &version)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(&s.archive_base64).unwrap_or_default();
    Ok(([("content-type", "application/octet-stream")], bytes).into_response())
}

async fn create_session(
    State(cp): State<LocalControlPlane>,
    h: HeaderMap,
    Json(req): Json<CreateSession>,
) -> ApiResult<Json<CreatedSession>> {
    authorize(&cp.db(), &h, Need::Org)?;
    cp.create_session(req).map(Json).map_err(|e| invalid(e.to_string()))
}

async fn show_session(
    State(cp): State<LocalControlPlane>,
    Path(session): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<SessionView>> {
    authorize(&cp.db(), &h, Need::Org)?;
    cp.session_view(&session).map(Json).ok_or_else(|| not_found(format!("session {session} not found")))
}

async fn list_requests(State(cp): State<LocalControlPlane>, h: HeaderMap) -> ApiResult<Json<Vec<RecordedRequest>>> {
    let db = cp.db();
    authorize(&db, &h, Need::Org)?;
    Ok(Json(db.requests.iter().cloned().collect()))
}

async fn clear_requests(State(cp): State<LocalControlPlane>, h: HeaderMap) -> ApiResult<StatusCode> {
    let mut db = cp.db();
    authorize(&db, &h, Need::Org)?;
    db.requests.clear();
    Ok(StatusCode::NO_CONTENT)
}

/// A call to the local control plane's own admin API (`/v1/local/...`: scripted sessions,
/// faults, the request log), with the organisation key of `client`. The production client has
/// no such call: only tools for the local control plane use it.
pub async fn admin<T: serde::de::DeserializeOwned, B: Serialize + ?Sized>(
    client: &super::Client,
    method: reqwest::Method,
    p: &str,
    body: Option<&B>,
) -> Result<Option<T>, super::ApiError> {
    let body = body.map(|b| serde_json::to_value(b).expect("serialises"));
    match client.call_raw_json(method.clone(), p, body).await? {
        None => Ok(None),
        Some(b) if b.is_empty() => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| super::ApiError::Malformed { what: format!("{method} {p}"), detail: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_saves_leave_one_whole_state_file() {
        let dir = std::env::temp_dir().join(format!("stockade-cp-save-{}-{:x}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("control-plane.json");
        let cp =
            LocalControlPlane::new(LocalConfig { state_file: Some(file.clone()), ..LocalConfig::default() }).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let cp = cp.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        cp.create_session(CreateSession {
                            environment_id: DEFAULT_ENVIRONMENT.into(),
                            script: vec![ScriptStep::call("bash", json!({"command": "true"}))],
                            metadata: Default::default(),
                            skills: Vec::new(),
                            memory_stores: Vec::new(),
                            no_secret: false,
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let saved: Db = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(saved.sessions.len(), 160);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("control-plane.json")], "temporary files left behind");
        // A restart reads it back.
        let again = LocalControlPlane::new(LocalConfig { state_file: Some(file), ..LocalConfig::default() }).unwrap();
        assert_eq!(again.db().sessions.len(), 160);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cursor_past_the_end_is_an_empty_page() {
        let q = |page: &str| PageQuery { limit: Some(2), page: Some(page.into()), order: None };
        let p = page_of(&[1, 2, 3], &q("page_2"), 20, 1000).unwrap();
        assert_eq!((p.data, p.next_page), (vec![3], None));
        let p = page_of(&[1, 2, 3], &q(&format!("page_{}", usize::MAX)), 20, 1000).unwrap();
        assert_eq!((p.data, p.next_page), (Vec::<i32>::new(), None));
    }

    #[test]
    fn scripts_name_the_line_of_a_bad_step() {
        let e = parse_script("{\"name\": \"bash\"}\n{\"name\": \"bash\", \"permission\": \"ask\"}\n", "s.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("s.jsonl:2: bash: \"ask\" needs \"confirm\""), "{e}");
        let e = parse_script("{\"name\": \"bash\", \"permision\": \"deny\"}\n", "s.jsonl").unwrap_err().to_string();
        assert_eq!(
            parse_script("# nothing\n\n", "s.jsonl").unwrap_err().to_string(),
            "s.jsonl: the script has no tool calls"
        );
        assert!(e.contains("s.jsonl:1:") && e.contains("permision"), "{e}");
    }
}
