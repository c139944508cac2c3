//! The local control plane: the Work API and session events of `wire`, served on loopback, with
//! sessions driven by a scripted agent. It is the peer of every test and of `stockade demo`.
//!
//! State lives in memory, optionally mirrored to a JSON file so a restart keeps environments,
//! queues and transcripts. Leases expire when not heartbeated. Admin endpoints that the real API
//! has no equivalent for live under `/v1/local/` and need the organisation key.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

use super::wire::{self, Event, EventEnvelope, FinalStatus, WorkItem, WorkState};
use super::{random_token, Secret};
use crate::util::rfc3339;

pub const DEFAULT_ENVIRONMENT: &str = "env_local";

/// One step of a scripted agent: a tool call, optionally ending the session after its result.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptStep {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub input: serde_json::Value,
    #[serde(default)]
    pub end_session: bool,
}

/// Parses a JSON-lines script; blank lines and lines starting with `#` are skipped.
pub fn parse_script(text: &str, source: &str) -> Result<Vec<ScriptStep>, String> {
    let mut steps = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        steps.push(serde_json::from_str(l).map_err(|e| format!("{source}:{}: {e}", n + 1))?);
    }
    if steps.is_empty() {
        return Err(format!("{source}: the script has no tool calls"));
    }
    Ok(steps)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalSkill {
    pub name: String,
    pub files: Vec<wire::SkillFile>,
}

/// `POST /v1/local/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSession {
    pub environment_id: String,
    pub script: Vec<ScriptStep>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub skills: Vec<LocalSkill>,
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
    pub status: String,
    pub work_id: String,
    pub work_state: WorkState,
    pub claims: u32,
    pub final_status: Option<FinalStatus>,
    pub calls: Vec<CallView>,
    /// Results posted for a call that already had one (rejected with 409). Should stay 0.
    pub duplicate_results: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallView {
    pub tool_use_id: String,
    pub name: String,
    pub input: serde_json::Value,
    pub result: Option<String>,
    pub is_error: Option<bool>,
    pub issued_at: String,
    pub answered_at: Option<String>,
    pub latency_ms: Option<u64>,
}

/// A fault the server injects into the next matching Work API / events requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// How many requests it hits.
    #[serde(default = "one")]
    pub count: u32,
    /// Only requests whose path contains this.
    #[serde(default)]
    pub path_contains: Option<String>,
    /// Process the request first, then answer with the fault (the response is lost, the effect
    /// is not).
    #[serde(default)]
    pub after: bool,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 500 with an error body.
    ServerError,
    /// 429 with `retry-after: 1`.
    RateLimited,
    /// No answer for `TIMEOUT_FAULT`, then 504.
    Timeout,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 whose body ends before its declared length.
    Truncated,
}

const TIMEOUT_FAULT: Duration = Duration::from_secs(6);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Faults {
    pub faults: Vec<Fault>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EnvRec {
    key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkRec {
    id: String,
    env: String,
    session_id: String,
    state: WorkState,
    holder: Option<String>,
    /// The worker that completed it, so a repeated complete is answered, not refused.
    last_holder: Option<String>,
    lease_until_ms: Option<u64>,
    queued_at_ms: u64,
    queue_seq: u64,
    stop_requested: bool,
    force: bool,
    metadata: serde_json::Map<String, serde_json::Value>,
    skills: Vec<wire::SkillRef>,
    final_status: Option<FinalStatus>,
    claims: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRec {
    id: String,
    env: String,
    work_id: String,
    script: Vec<ScriptStep>,
    /// Index of the next script step to issue.
    next: usize,
    events: Vec<EventEnvelope>,
    status: String,
    issued_ms: BTreeMap<String, u64>,
    answered_ms: BTreeMap<String, u64>,
    duplicate_results: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Db {
    org_key: String,
    envs: BTreeMap<String, EnvRec>,
    work: BTreeMap<String, WorkRec>,
    sessions: BTreeMap<String, SessionRec>,
    skills: BTreeMap<String, wire::SkillFiles>,
    seq: u64,
    #[serde(skip)]
    polls: HashMap<(String, String), Instant>,
    #[serde(skip)]
    faults: VecDeque<Fault>,
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

impl Db {
    fn next_id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}_{:08}", self.seq)
    }

    /// Items whose lease ran out go back to the queue (at their old place).
    fn expire_leases(&mut self) -> bool {
        let now = now_ms();
        let mut changed = false;
        for w in self.work.values_mut() {
            if matches!(w.state, WorkState::Claimed | WorkState::Running | WorkState::Stopping)
                && w.lease_until_ms.is_some_and(|l| l <= now)
            {
                tracing::info!(work_id = %w.id, holder = ?w.holder, "lease expired; item re-queued");
                w.state = if w.stop_requested { WorkState::Stopped } else { WorkState::Queued };
                w.holder = None;
                w.lease_until_ms = None;
                changed = true;
            }
        }
        changed
    }

    fn view(&self, w: &WorkRec) -> WorkItem {
        WorkItem {
            id: w.id.clone(),
            kind: "work".into(),
            session_id: w.session_id.clone(),
            state: w.state,
            lease_expires_at: w.lease_until_ms.map(ts),
            metadata: w.metadata.clone(),
            skills: w.skills.clone(),
            stop_requested: w.stop_requested,
            force: w.force,
        }
    }

    fn push_event(&mut self, session: &str, event: Event) -> String {
        let id = match &event {
            Event::ToolUse { id, .. } => id.clone(),
            _ => self.next_id("evt"),
        };
        let s = self.sessions.get_mut(session).expect("session exists");
        s.events.push(EventEnvelope { event_id: id.clone(), created_at: Some(rfc3339(SystemTime::now())), event });
        id
    }

    /// Issues the session's next scripted call, or ends the turn when the script is done.
    fn advance(&mut self, session: &str) {
        let s = &self.sessions[session];
        let ended = s.next >= s.script.len() || (s.next > 0 && s.script[s.next - 1].end_session);
        if ended {
            let s = self.sessions.get_mut(session).expect("session exists");
            s.status = "idle".into();
            self.push_event(session, Event::StatusIdle);
            return;
        }
        let step = s.script[s.next].clone();
        let id = match step.id {
            Some(id) => id,
            None => self.next_id("toolu"),
        };
        let s = self.sessions.get_mut(session).expect("session exists");
        s.next += 1;
        s.issued_ms.insert(id.clone(), now_ms());
        self.push_event(session, Event::ToolUse { id, name: step.name, input: step.input });
    }
}

pub struct LocalConfig {
    /// How long a claim or heartbeat holds an item.
    pub lease: Duration,
    /// Mirror the state to this file.
    pub state_file: Option<PathBuf>,
}

impl Default for LocalConfig {
    fn default() -> LocalConfig {
        LocalConfig { lease: Duration::from_secs(30), state_file: None }
    }
}

struct Shared {
    db: Mutex<Db>,
    changed: Notify,
    cfg: LocalConfig,
}

#[derive(Clone)]
pub struct LocalControlPlane {
    shared: Arc<Shared>,
}

type ApiResult<T> = Result<T, ApiErr>;

pub struct ApiErr(StatusCode, &'static str, String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let body =
            wire::ErrorBody { kind: "error".into(), error: wire::ErrorDetail { kind: self.1.into(), message: self.2 } };
        (self.0, Json(body)).into_response()
    }
}

fn not_found(what: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::NOT_FOUND, "not_found_error", what.into())
}

fn conflict(what: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::CONFLICT, "conflict_error", what.into())
}

fn invalid(what: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::BAD_REQUEST, "invalid_request_error", what.into())
}

enum Need<'a> {
    Org,
    /// The environment's key (or the organisation key when `org_ok`).
    Env(&'a str, bool),
}

fn presented(h: &HeaderMap) -> Option<&[u8]> {
    if let Some(k) = h.get("x-api-key") {
        return Some(k.as_bytes());
    }
    h.get("authorization").and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
}

fn authorize(db: &Db, h: &HeaderMap, need: Need) -> ApiResult<()> {
    let Some(key) = presented(h) else {
        return Err(ApiErr(StatusCode::UNAUTHORIZED, "authentication_error", "no x-api-key or bearer token".into()));
    };
    let org = Secret::new(db.org_key.clone()).matches(key);
    let ok = match need {
        Need::Org => org,
        Need::Env(env, org_ok) => {
            let env_ok = db.envs.get(env).is_some_and(|e| Secret::new(e.key.clone()).matches(key));
            env_ok || (org_ok && org)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ApiErr(StatusCode::UNAUTHORIZED, "authentication_error", "invalid key for this resource".into()))
    }
}

impl LocalControlPlane {
    /// Loads the state file when there is one; makes sure the default environment exists.
    pub fn new(cfg: LocalConfig) -> Result<LocalControlPlane, String> {
        let mut db = match &cfg.state_file {
            Some(f) if f.exists() => {
                let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
                serde_json::from_str::<Db>(&text).map_err(|e| format!("{}: {e}", f.display()))?
            }
            _ => Db::default(),
        };
        if db.org_key.is_empty() {
            db.org_key = random_token("sk-org-local-");
        }
        if db.envs.is_empty() {
            db.envs.insert(DEFAULT_ENVIRONMENT.into(), EnvRec { key: random_token("sk-env-local-") });
        }
        let cp = LocalControlPlane { shared: Arc::new(Shared { db: Mutex::new(db), changed: Notify::new(), cfg }) };
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

    fn save(&self) {
        let Some(f) = &self.shared.cfg.state_file else { return };
        let text = serde_json::to_vec_pretty(&*self.db()).expect("state serialises");
        let tmp = f.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, f)) {
            tracing::error!(file = %f.display(), error = %e, "could not save the control plane's state");
        }
    }

    /// State changed: persist it and wake long polls.
    fn changed(&self) {
        self.save();
        self.shared.changed.notify_waiters();
    }

    /// Waits until `f` returns Some or `wait` passes. `f` runs with leases expired first.
    async fn long_poll<T>(&self, wait: Duration, mut f: impl FnMut(&mut Db) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + wait.min(Duration::from_secs(60));
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (r, expired) = {
                let mut db = self.db();
                let expired = db.expire_leases();
                (f(&mut db), expired)
            };
            if expired || r.is_some() {
                self.changed();
            }
            if r.is_some() {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            // Lease expiry is time-driven, so wake now and then even without a change.
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(200)), notified).await;
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/environments/{env}/work/claim", post(claim))
            .route("/v1/environments/{env}/work/stats", get(stats))
            .route("/v1/environments/{env}/work/{work}", get(get_work))
            .route("/v1/environments/{env}/work/{work}/heartbeat", post(heartbeat))
            .route("/v1/environments/{env}/work/{work}/complete", post(complete))
            .route("/v1/environments/{env}/work/{work}/release", post(release))
            .route("/v1/environments/{env}/work/{work}/stop", post(stop))
            .route("/v1/sessions/{session}/events", get(list_events).post(post_events))
            .route("/v1/skills/{skill}/files", get(skill_files))
            .route("/v1/local/sessions", post(create_session))
            .route("/v1/local/sessions/{session}", get(show_session))
            .route("/v1/local/faults", post(add_faults).delete(clear_faults))
            .layer(axum::middleware::from_fn_with_state(self.clone(), inject_faults))
            .with_state(self.clone())
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await
    }

    /// Creates a scripted session and queues its work item (also used in-process by the demo).
    pub fn create_session(&self, req: CreateSession) -> Result<CreatedSession, String> {
        if req.script.is_empty() {
            return Err("the script has no tool calls".into());
        }
        let mut db = self.db();
        if !db.envs.contains_key(&req.environment_id) {
            return Err(format!("no environment {:?}", req.environment_id));
        }
        let session_id = db.next_id("sesn");
        let work_id = db.next_id("work");
        let mut skills = Vec::new();
        for s in req.skills {
            let skill_id = db.next_id("skill");
            db.skills.insert(skill_id.clone(), wire::SkillFiles { files: s.files });
            skills.push(wire::SkillRef { name: s.name, skill_id });
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
                status: "queued".into(),
                issued_ms: BTreeMap::new(),
                answered_ms: BTreeMap::new(),
                duplicate_results: 0,
            },
        );
        db.work.insert(
            work_id.clone(),
            WorkRec {
                id: work_id.clone(),
                env: req.environment_id,
                session_id: session_id.clone(),
                state: WorkState::Queued,
                holder: None,
                last_holder: None,
                lease_until_ms: None,
                queued_at_ms: now_ms(),
                queue_seq: seq,
                stop_requested: false,
                force: false,
                metadata: req.metadata,
                skills,
                final_status: None,
                claims: 0,
            },
        );
        drop(db);
        self.changed();
        Ok(CreatedSession { session_id, work_id })
    }

    pub fn session_view(&self, id: &str) -> Option<SessionView> {
        let db = self.db();
        let s = db.sessions.get(id)?;
        let w = &db.work[&s.work_id];
        let mut calls: Vec<CallView> = Vec::new();
        for e in &s.events {
            match &e.event {
                Event::ToolUse { id, name, input } => {
                    let issued = s.issued_ms.get(id).copied().unwrap_or(0);
                    let answered = s.answered_ms.get(id).copied();
                    calls.push(CallView {
                        tool_use_id: id.clone(),
                        name: name.clone(),
                        input: input.clone(),
                        result: None,
                        is_error: None,
                        issued_at: ts(issued),
                        answered_at: answered.map(ts),
                        latency_ms: answered.map(|a| a.saturating_sub(issued)),
                    })
                }
                Event::ToolResult { tool_use_id, content, is_error } => {
                    if let Some(c) = calls.iter_mut().find(|c| &c.tool_use_id == tool_use_id) {
                        c.result = Some(content.clone());
                        c.is_error = Some(*is_error);
                    }
                }
                _ => {}
            }
        }
        Some(SessionView {
            id: s.id.clone(),
            status: s.status.clone(),
            work_id: w.id.clone(),
            work_state: w.state,
            claims: w.claims,
            final_status: w.final_status,
            calls,
            duplicate_results: s.duplicate_results,
        })
    }
}

async fn inject_faults(State(cp): State<LocalControlPlane>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let fault = if path.starts_with("/v1/local/") {
        None
    } else {
        let mut db = cp.db();
        let i = db.faults.iter().position(|f| f.path_contains.as_deref().is_none_or(|p| path.contains(p)));
        i.map(|i| {
            let f = db.faults[i].clone();
            db.faults[i].count -= 1;
            if db.faults[i].count == 0 {
                db.faults.remove(i);
            }
            f
        })
    };
    let Some(f) = fault else { return next.run(req).await };
    tracing::info!(path, kind = ?f.kind, after = f.after, "injecting a fault");
    if f.after {
        let _ = next.run(req).await;
    }
    match f.kind {
        FaultKind::ServerError => {
            ApiErr(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "injected fault".into()).into_response()
        }
        FaultKind::RateLimited => {
            let mut r =
                ApiErr(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "injected fault".into()).into_response();
            r.headers_mut().insert("retry-after", "1".parse().expect("static header"));
            r
        }
        FaultKind::Timeout => {
            tokio::time::sleep(TIMEOUT_FAULT).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        FaultKind::Garbage => (StatusCode::OK, "<html>upstream hiccup</html>").into_response(),
        FaultKind::Truncated => {
            let body = Body::from_stream(futures_truncated());
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .header("content-length", "4096")
                .body(body)
                .expect("static response")
        }
    }
}

/// A body stream that yields a fragment of JSON and then fails, so the connection is cut
/// before the declared length.
fn futures_truncated() -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
    struct S(u8);
    impl futures_core::Stream for S {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0 += 1;
            std::task::Poll::Ready(match self.0 {
                1 => Some(Ok(br#"{"id":"work_0"#.to_vec())),
                2 => Some(Err(std::io::Error::other("injected truncation"))),
                _ => None,
            })
        }
    }
    S(0)
}

async fn claim(
    State(cp): State<LocalControlPlane>,
    Path(env): Path<String>,
    h: HeaderMap,
    Json(req): Json<wire::ClaimRequest>,
) -> ApiResult<Response> {
    {
        let mut db = cp.db();
        authorize(&db, &h, Need::Env(&env, false))?;
        if req.worker_id.is_empty() {
            return Err(invalid("worker_id: must not be empty"));
        }
        db.polls.insert((env.clone(), req.worker_id.clone()), Instant::now());
    }
    let lease = cp.shared.cfg.lease;
    let got = cp
        .long_poll(Duration::from_millis(req.wait_ms), |db| {
            let id = db
                .work
                .values()
                .filter(|w| w.env == env && w.state == WorkState::Queued)
                .min_by_key(|w| w.queue_seq)?
                .id
                .clone();
            let w = db.work.get_mut(&id).expect("just found");
            w.state = WorkState::Claimed;
            w.holder = Some(req.worker_id.clone());
            w.lease_until_ms = Some(now_ms() + lease.as_millis() as u64);
            w.claims += 1;
            let session = w.session_id.clone();
            if db.sessions[&session].events.is_empty() {
                db.sessions.get_mut(&session).expect("exists").status = "running".into();
                db.push_event(&session, Event::StatusRunning);
                db.advance(&session);
            }
            Some(db.view(&db.work[&id]))
        })
        .await;
    Ok(match got {
        Some(item) => {
            tracing::info!(work_id = %item.id, worker = %req.worker_id, "claimed");
            Json(item).into_response()
        }
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// The item, if `worker` holds a live lease on it.
fn held<'a>(db: &'a mut Db, env: &str, work: &str, worker: &str) -> ApiResult<&'a mut WorkRec> {
    db.expire_leases();
    let w = db.work.get_mut(work).filter(|w| w.env == env).ok_or_else(|| not_found(format!("work item {work}")))?;
    if w.holder.as_deref() != Some(worker) {
        return Err(conflict(format!("work item {work} is not leased to {worker} (state {:?})", w.state)));
    }
    Ok(w)
}

async fn heartbeat(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
    Json(req): Json<wire::HeartbeatRequest>,
) -> ApiResult<Json<WorkItem>> {
    let lease = cp.shared.cfg.lease;
    let item = {
        let mut db = cp.db();
        authorize(&db, &h, Need::Env(&env, false))?;
        let w = held(&mut db, &env, &work, &req.worker_id)?;
        w.lease_until_ms = Some(now_ms() + lease.as_millis() as u64);
        if w.state == WorkState::Claimed {
            w.state = WorkState::Running;
        }
        let w = w.clone();
        db.view(&w)
    };
    cp.changed();
    Ok(Json(item))
}

async fn complete(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
    Json(req): Json<wire::CompleteRequest>,
) -> ApiResult<Json<WorkItem>> {
    let item = {
        let mut db = cp.db();
        authorize(&db, &h, Need::Env(&env, false))?;
        // Answer a repeated complete from the same worker with the same result.
        if let Some(w) = db.work.get(&work) {
            if w.holder.is_none() && w.last_holder.as_deref() == Some(&req.worker_id) && w.final_status.is_some() {
                return Ok(Json(db.view(w)));
            }
        }
        let w = held(&mut db, &env, &work, &req.worker_id)?;
        w.state = match req.status {
            FinalStatus::Completed => WorkState::Completed,
            FinalStatus::Stopped => WorkState::Stopped,
            FinalStatus::Failed => WorkState::Failed,
        };
        w.final_status = Some(req.status);
        w.last_holder = w.holder.take();
        w.lease_until_ms = None;
        let (w, session) = (w.clone(), w.session_id.clone());
        if req.status != FinalStatus::Completed {
            db.sessions.get_mut(&session).expect("exists").status = "terminated".into();
            db.push_event(&session, Event::StatusTerminated);
        }
        db.view(&w)
    };
    cp.changed();
    Ok(Json(item))
}

async fn release(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
    Json(req): Json<wire::ReleaseRequest>,
) -> ApiResult<Json<WorkItem>> {
    let item = {
        let mut db = cp.db();
        authorize(&db, &h, Need::Env(&env, false))?;
        let w = held(&mut db, &env, &work, &req.worker_id)?;
        w.state = if w.stop_requested { WorkState::Stopped } else { WorkState::Queued };
        w.holder = None;
        w.lease_until_ms = None;
        let w = w.clone();
        db.view(&w)
    };
    cp.changed();
    Ok(Json(item))
}

async fn stop(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
    Json(req): Json<wire::StopRequest>,
) -> ApiResult<Json<WorkItem>> {
    let item = {
        let mut db = cp.db();
        authorize(&db, &h, Need::Org)?;
        let w =
            db.work.get_mut(&work).filter(|w| w.env == env).ok_or_else(|| not_found(format!("work item {work}")))?;
        match w.state {
            WorkState::Queued => w.state = WorkState::Stopped,
            WorkState::Claimed | WorkState::Running | WorkState::Stopping => {
                w.state = WorkState::Stopping;
                w.stop_requested = true;
                w.force |= req.force;
            }
            _ => {}
        }
        let w = w.clone();
        db.view(&w)
    };
    cp.changed();
    Ok(Json(item))
}

async fn get_work(
    State(cp): State<LocalControlPlane>,
    Path((env, work)): Path<(String, String)>,
    h: HeaderMap,
) -> ApiResult<Json<WorkItem>> {
    let mut db = cp.db();
    authorize(&db, &h, Need::Env(&env, true))?;
    db.expire_leases();
    let w = db.work.get(&work).filter(|w| w.env == env).ok_or_else(|| not_found(format!("work item {work}")))?;
    Ok(Json(db.view(w)))
}

async fn stats(
    State(cp): State<LocalControlPlane>,
    Path(env): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<wire::WorkQueueStats>> {
    let mut db = cp.db();
    authorize(&db, &h, Need::Env(&env, true))?;
    db.expire_leases();
    let in_env = || db.work.values().filter(|w| w.env == env);
    let queued: Vec<&WorkRec> = in_env().filter(|w| w.state == WorkState::Queued).collect();
    let pending =
        in_env().filter(|w| matches!(w.state, WorkState::Claimed | WorkState::Running | WorkState::Stopping)).count();
    let recent = Duration::from_secs(30);
    Ok(Json(wire::WorkQueueStats {
        kind: "work_queue_stats".into(),
        depth: queued.len() as u64,
        pending: pending as u64,
        oldest_queued_at: queued.iter().map(|w| w.queued_at_ms).min().map(ts),
        workers_polling: db.polls.iter().filter(|((e, _), t)| *e == env && t.elapsed() < recent).count() as u64,
    }))
}

async fn list_events(
    State(cp): State<LocalControlPlane>,
    Path(session): Path<String>,
    h: HeaderMap,
    Query(q): Query<wire::ListEventsQuery>,
) -> ApiResult<Json<wire::EventList>> {
    {
        let db = cp.db();
        let s = db.sessions.get(&session).ok_or_else(|| not_found(format!("session {session}")))?;
        authorize(&db, &h, Need::Env(&s.env, true))?;
        if let Some(a) = &q.after_id {
            if !s.events.iter().any(|e| &e.event_id == a) {
                return Err(invalid(format!("after_id: no event {a} in session {session}")));
            }
        }
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000) as usize;
    let list = cp
        .long_poll(Duration::from_millis(q.wait_ms), |db| {
            let s = &db.sessions[&session];
            let start = match &q.after_id {
                Some(a) => s.events.iter().position(|e| &e.event_id == a).map_or(0, |i| i + 1),
                None => 0,
            };
            if start >= s.events.len() {
                return None;
            }
            let data: Vec<EventEnvelope> = s.events[start..].iter().take(limit).cloned().collect();
            Some(wire::EventList {
                has_more: start + data.len() < s.events.len(),
                last_id: data.last().map(|e| e.event_id.clone()),
                data,
            })
        })
        .await;
    Ok(Json(list.unwrap_or(wire::EventList { data: Vec::new(), has_more: false, last_id: q.after_id })))
}

async fn post_events(
    State(cp): State<LocalControlPlane>,
    Path(session): Path<String>,
    h: HeaderMap,
    Json(req): Json<wire::PostEvents>,
) -> ApiResult<Json<wire::EventList>> {
    let posted = {
        let mut db = cp.db();
        let s = db.sessions.get(&session).ok_or_else(|| not_found(format!("session {session}")))?;
        authorize(&db, &h, Need::Env(&s.env, false))?;
        // Validate everything before changing anything.
        for e in &req.events {
            let Event::ToolResult { tool_use_id, .. } = e else {
                return Err(invalid("events: only user.tool_result events can be posted here"));
            };
            let issued = s.events.iter().any(|x| matches!(&x.event, Event::ToolUse { id, .. } if id == tool_use_id));
            if !issued {
                return Err(invalid(format!("tool_use_id: no tool use {tool_use_id} in session {session}")));
            }
            if s.answered_ms.contains_key(tool_use_id) {
                let tool_use_id = tool_use_id.clone();
                db.sessions.get_mut(&session).expect("exists").duplicate_results += 1;
                return Err(conflict(format!("tool use {tool_use_id} already has a result")));
            }
        }
        let mut posted = Vec::new();
        for e in req.events {
            let Event::ToolResult { tool_use_id, .. } = &e else { unreachable!("validated above") };
            let tool_use_id = tool_use_id.clone();
            db.sessions.get_mut(&session).expect("exists").answered_ms.insert(tool_use_id.clone(), now_ms());
            let id = db.push_event(&session, e);
            posted.push(db.sessions[&session].events.iter().find(|x| x.event_id == id).cloned().expect("pushed"));
            // The scripted agent answers the latest call with the next one.
            let s = &db.sessions[&session];
            let latest = s.events.iter().rev().find_map(|x| match &x.event {
                Event::ToolUse { id, .. } => Some(id.clone()),
                _ => None,
            });
            if latest.as_deref() == Some(tool_use_id.as_str()) && s.status == "running" {
                db.advance(&session);
            }
        }
        posted
    };
    cp.changed();
    Ok(Json(wire::EventList { last_id: posted.last().map(|e| e.event_id.clone()), data: posted, has_more: false }))
}

async fn skill_files(
    State(cp): State<LocalControlPlane>,
    Path(skill): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<wire::SkillFiles>> {
    let db = cp.db();
    let env = db
        .work
        .values()
        .find(|w| w.skills.iter().any(|s| s.skill_id == skill))
        .map(|w| w.env.clone())
        .ok_or_else(|| not_found(format!("skill {skill}")))?;
    authorize(&db, &h, Need::Env(&env, true))?;
    Ok(Json(db.skills[&skill].clone()))
}

async fn create_session(
    State(cp): State<LocalControlPlane>,
    h: HeaderMap,
    Json(req): Json<CreateSession>,
) -> ApiResult<Json<CreatedSession>> {
    authorize(&cp.db(), &h, Need::Org)?;
    cp.create_session(req).map(Json).map_err(invalid)
}

async fn show_session(
    State(cp): State<LocalControlPlane>,
    Path(session): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<SessionView>> {
    authorize(&cp.db(), &h, Need::Org)?;
    cp.session_view(&session).map(Json).ok_or_else(|| not_found(format!("session {session}")))
}

async fn add_faults(
    State(cp): State<LocalControlPlane>,
    h: HeaderMap,
    Json(req): Json<Faults>,
) -> ApiResult<StatusCode> {
    let mut db = cp.db();
    authorize(&db, &h, Need::Org)?;
    db.faults.extend(req.faults.into_iter().filter(|f| f.count > 0));
    Ok(StatusCode::NO_CONTENT)
}

/// Drops the faults not yet injected, so a test can end an outage when it has seen its effect
/// instead of guessing how many requests the outage must last.
async fn clear_faults(State(cp): State<LocalControlPlane>, h: HeaderMap) -> ApiResult<StatusCode> {
    let mut db = cp.db();
    authorize(&db, &h, Need::Org)?;
    db.faults.clear();
    Ok(StatusCode::NO_CONTENT)
}
