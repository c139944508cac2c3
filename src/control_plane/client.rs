//! The API client: typed calls over the wire format in `wire`, typed errors, timeouts on every
//! call, and jittered exponential backoff for calls that are safe to repeat.

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::wire::{self, path};
use super::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication failed ({status}): {message}")]
    Auth { status: u16, message: String },
    #[error("not found: {0}")]
    NotFound(String),
    /// 412 on a heartbeat: the lease is someone else's, or went back to the queue.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// 409: the item is already stopped, or not in a state the call applies to.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("rate limited{}", retry_hint(*.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    #[error("server error {status}: {message}")]
    Server { status: u16, message: String },
    #[error("request rejected ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("timed out after {}", crate::util::format_duration(*.0))]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("malformed response to {what}: {detail}")]
    Malformed { what: String, detail: String },
}

fn retry_hint(after: Option<Duration>) -> String {
    after.map(|d| format!(" (retry after {})", crate::util::format_duration(d))).unwrap_or_default()
}

impl ApiError {
    /// Worth trying again, as the SDKs judge it: transport failures, 5xx and 408/409/429.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::RateLimited { .. }
                | ApiError::Server { .. }
                | ApiError::Timeout(_)
                | ApiError::Connect(_)
                | ApiError::Malformed { .. }
                | ApiError::Conflict(_)
        )
    }

    /// The request may have taken effect even though no good answer came back.
    pub fn is_ambiguous(&self) -> bool {
        matches!(
            self,
            ApiError::Server { .. } | ApiError::Timeout(_) | ApiError::Malformed { .. } | ApiError::Connect(_)
        )
    }
}

/// How the key is presented: the environment key (and a work item's sessions token) as a bearer
/// token, the organisation key as `x-api-key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthScheme {
    #[default]
    Bearer,
    XApiKey,
}

/// Jittered exponential backoff ("full jitter"): attempt n waits a random time in
/// [base·2ⁿ/2, base·2ⁿ], capped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, attempt: 0 }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        half + Duration::from_nanos(fastrand::u64(0..=(exp - half).as_nanos() as u64))
    }

    /// The delay for an error: the server's Retry-After when it gave one.
    pub(crate) fn delay_for(&mut self, e: &ApiError) -> Duration {
        let d = self.next_delay();
        match e {
            ApiError::RateLimited { retry_after: Some(r) } => (*r).max(d / 4),
            _ => d,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// For the sessions' event streams only, HTTP/1.1 only: a stream lasts as long as its session,
    /// and over HTTP/2 the streams would share one connection, whose concurrent-stream limit (100
    /// to 256 at common servers) they would fill — hyper's pool then queues every further request
    /// on it, heartbeats included, for as long as the streams live. A connection per stream is
    /// what the official SDKs hold too (httpx, node's fetch: HTTP/1.1).
    streams: reqwest::Client,
    base: String,
    /// Shared by the clones of one client, so a rotated key (`set_key`) reaches them all.
    key: std::sync::Arc<std::sync::RwLock<Secret>>,
    auth: AuthScheme,
    /// Per-call timeout; polls add their block on top.
    pub timeout: Duration,
    /// Attempts for idempotent calls.
    pub attempts: u32,
    /// The largest response body read; a larger one is a transient error.
    pub max_body: usize,
    /// How long an event stream may go without a frame (the server pings every 5 s) before it
    /// is taken for dead and reopened.
    pub stream_silence: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("key", &*self.key()).finish()
    }
}

/// The default cap on one response body: far above any page of events the API returns.
pub(crate) const DEFAULT_MAX_BODY: usize = 64 << 20;

/// One request's particulars beyond method and path.
#[derive(Default)]
struct Req<'a> {
    query: Vec<(&'a str, String)>,
    headers: Vec<(&'static str, String)>,
    body: Option<serde_json::Value>,
    /// Overrides the client's timeout.
    timeout: Option<Duration>,
    /// Without the managed-agents beta header (the skills endpoints, as the official SDK calls them).
    no_beta: bool,
}

/// The memory endpoints' requests: their own beta, and the official worker's 30 s per try.
fn memory_req() -> Req<'static> {
    Req {
        no_beta: true,
        headers: vec![("anthropic-beta", wire::MEMORY_BETA.to_owned())],
        timeout: Some(Duration::from_secs(30)),
        ..Req::default()
    }
}

impl Client {
    pub fn new(base: &str, key: Secret, auth: AuthScheme) -> Result<Client, ApiError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("stockade/", env!("CARGO_PKG_VERSION")))
                .redirect(same_origin_redirects())
        };
        let built = |b: reqwest::ClientBuilder| {
            b.build().map_err(|e| ApiError::Connect(format!("building the HTTP client: {e}")))
        };
        Ok(Client {
            http: built(builder())?,
            streams: built(builder().http1_only())?,
            base: base.trim_end_matches('/').to_owned(),
            key: std::sync::Arc::new(std::sync::RwLock::new(key)),
            auth,
            timeout: Duration::from_secs(15),
            attempts: 4,
            max_body: DEFAULT_MAX_BODY,
            stream_silence: Duration::from_secs(15),
        })
    }

    /// The same client with another bearer credential (a work item's sessions token) and,
    /// when given, another base URL.
    pub fn with_bearer(&self, key: Secret, base: Option<&str>) -> Client {
        let mut c = self.clone();
        c.key = std::sync::Arc::new(std::sync::RwLock::new(key));
        c.auth = AuthScheme::Bearer;
        if let Some(b) = base {
            c.base = b.trim_end_matches('/').to_owned();
        }
        c
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether the two present the same credential (one is a clone of the other).
    pub(crate) fn same_credential(&self, other: &Client) -> bool {
        std::sync::Arc::ptr_eq(&self.key, &other.key)
    }

    fn key(&self) -> std::sync::RwLockReadGuard<'_, Secret> {
        self.key.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The credential in use, for redacting it where it must never appear (an audit trail).
    pub fn current_key(&self) -> String {
        self.key().expose().to_owned()
    }

    /// Replaces the credential of this client and of every clone made from it (not of those
    /// given another one with `with_bearer`). Returns whether it changed.
    pub fn set_key(&self, key: Secret) -> bool {
        let mut k = self.key.write().unwrap_or_else(|p| p.into_inner());
        if k.expose() == key.expose() {
            return false;
        }
        *k = key;
        true
    }

    fn request(&self, method: &Method, p: &str, r: &Req<'_>) -> reqwest::RequestBuilder {
        self.request_on(&self.http, method, p, r)
    }

    fn request_on(&self, http: &reqwest::Client, method: &Method, p: &str, r: &Req<'_>) -> reqwest::RequestBuilder {
        let mut req = http
            .request(method.clone(), format!("{}{p}", self.base))
            .timeout(r.timeout.unwrap_or(self.timeout))
            .header("anthropic-version", wire::API_VERSION);
        if !r.no_beta {
            req = req.header("anthropic-beta", wire::BETA);
        }
        req = match self.auth {
            AuthScheme::XApiKey => req.header("x-api-key", self.key().expose()),
            AuthScheme::Bearer => req.bearer_auth(self.key().expose()),
        };
        if !r.query.is_empty() {
            req = req.query(&r.query);
        }
        for (k, v) in &r.headers {
            req = req.header(*k, v);
        }
        if let Some(b) = &r.body {
            req = req.json(b);
        }
        req
    }

    /// One HTTP exchange; the raw body of a success, `None` for 204.
    async fn exchange(&self, method: &Method, p: &str, r: &Req<'_>) -> Result<Option<Vec<u8>>, ApiError> {
        let timeout = r.timeout.unwrap_or(self.timeout);
        let what = format!("{method} {p}");
        let mut resp = self.request(method, p, r).send().await.map_err(|e| transport(e, timeout))?;
        let status = resp.status();
        let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if bytes.len() + c.len() > self.max_body {
                        return Err(ApiError::Malformed {
                            what,
                            detail: format!("response body over the {}-byte limit", self.max_body),
                        });
                    }
                    bytes.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(match transport(e, timeout) {
                        ApiError::Connect(d) => ApiError::Malformed { what, detail: format!("body cut short: {d}") },
                        other => other,
                    })
                }
            }
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if status.is_success() {
            return Ok(Some(bytes));
        }
        let message = serde_json::from_slice::<wire::ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned());
        Err(match status.as_u16() {
            401 | 403 => ApiError::Auth { status: status.as_u16(), message },
            404 => ApiError::NotFound(message),
            408 => ApiError::Timeout(timeout),
            409 => ApiError::Conflict(message),
            // Not followed (to another origin, see `same_origin_redirects`); like a 5xx, worth
            // trying again.
            s @ 300..=399 => ApiError::Server {
                status: s,
                message: format!("redirect to {:?} not followed", location.as_deref().unwrap_or("(no location)")),
            },
            412 => ApiError::LeaseLost(message),
            429 => ApiError::RateLimited { retry_after },
            s if s >= 500 => ApiError::Server { status: s, message },
            s => ApiError::Rejected { status: s, message },
        })
    }

    /// A call with retries when `idempotent`; otherwise exactly one attempt.
    pub(super) async fn call_raw_json(
        &self,
        method: Method,
        p: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        self.call_raw(method, p, Req { body, ..Req::default() }, false).await
    }

    async fn call_raw(
        &self,
        method: Method,
        p: &str,
        r: Req<'_>,
        idempotent: bool,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let attempts = if idempotent { self.attempts.max(1) } else { 1 };
        let mut n = 0;
        loop {
            n += 1;
            match self.exchange(&method, p, &r).await {
                Err(e) if e.is_transient() && !matches!(e, ApiError::Conflict(_)) && n < attempts => {
                    let d = backoff.delay_for(&e);
                    tracing::debug!(error = %e, attempt = n, delay_ms = d.as_millis() as u64, "retrying {method} {p}");
                    tokio::time::sleep(d).await;
                }
                r => return r,
            }
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        p: &str,
        r: Req<'_>,
        idempotent: bool,
    ) -> Result<T, ApiError> {
        let what = format!("{method} {p}");
        let bytes = self.call_raw(method, p, r, idempotent).await?;
        let bytes =
            bytes.ok_or_else(|| ApiError::Malformed { what: what.clone(), detail: "empty response (204)".into() })?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Malformed { what, detail: e.to_string() })
    }

    /// Asks for the next queued item; `None` when there is none. The server holds an empty poll
    /// up to `block_ms` (at most 999). Not retried here: the caller's loop backs off.
    pub async fn poll(
        &self,
        env: &str,
        worker_id: &str,
        block_ms: Option<u32>,
        reclaim_older_than_ms: Option<u64>,
    ) -> Result<Option<wire::WorkItem>, ApiError> {
        let mut r = Req { headers: vec![(wire::WORKER_ID_HEADER, worker_id.to_owned())], ..Req::default() };
        if let Some(b) = block_ms {
            r.query.push(("block_ms", b.clamp(1, wire::MAX_BLOCK_MS).to_string()));
            r.timeout = Some(self.timeout.saturating_add(Duration::from_millis(b as u64)));
        }
        if let Some(ms) = reclaim_older_than_ms {
            r.query.push(("reclaim_older_than_ms", ms.to_string()));
        }
        let p = path::poll(env);
        let Some(bytes) = self.call_raw(Method::GET, &p, r, false).await? else { return Ok(None) };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice::<Option<wire::WorkItem>>(&bytes)
            .map_err(|e| ApiError::Malformed { what: format!("GET {p}"), detail: e.to_string() })
    }

    pub async fn ack(&self, env: &str, work: &str) -> Result<wire::WorkItem, ApiError> {
        self.call(Method::POST, &path::ack(env, work), Req::default(), false).await
    }

    /// One heartbeat, bounded by `timeout`; 412 is `LeaseLost`.
    pub async fn heartbeat(
        &self,
        env: &str,
        work: &str,
        expected_last_heartbeat: &str,
        timeout: Duration,
    ) -> Result<wire::HeartbeatResponse, ApiError> {
        let r = Req {
            query: vec![("expected_last_heartbeat", expected_last_heartbeat.to_owned())],
            timeout: Some(timeout),
            ..Req::default()
        };
        self.call(Method::POST, &path::heartbeat(env, work), r, false).await
    }

    pub async fn stop(&self, env: &str, work: &str, force: bool) -> Result<wire::WorkItem, ApiError> {
        let r = Req { body: Some(serde_json::json!({ "force": force })), ..Req::default() };
        self.call(Method::POST, &path::stop(env, work), r, false).await
    }

    /// One stop, bounded by `timeout`.
    pub(crate) async fn stop_within(
        &self,
        env: &str,
        work: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<wire::WorkItem, ApiError> {
        let r = Req { body: Some(serde_json::json!({ "force": force })), timeout: Some(timeout), ..Req::default() };
        self.call(Method::POST, &path::stop(env, work), r, false).await
    }

    pub async fn retrieve(&self, env: &str, work: &str) -> Result<wire::WorkItem, ApiError> {
        self.call(Method::GET, &path::work(env, work), Req::default(), true).await
    }

    pub async fn update(
        &self,
        env: &str,
        work: &str,
        metadata: serde_json::Map<String, serde_json::Value>,
    ) -> Result<wire::WorkItem, ApiError> {
        let r = Req { body: Some(serde_json::json!({ "metadata": metadata })), ..Req::default() };
        self.call(Method::POST, &path::work(env, work), r, false).await
    }

    pub async fn list_work(
        &self,
        env: &str,
        limit: Option<u32>,
        page: Option<&str>,
    ) -> Result<wire::Page<wire::WorkItem>, ApiError> {
        let mut r = Req::default();
        if let Some(l) = limit {
            r.query.push(("limit", l.to_string()));
        }
        if let Some(p) = page {
            r.query.push(("page", p.to_owned()));
        }
        self.call(Method::GET, &path::work_list(env), r, true).await
    }

    pub async fn stats(&self, env: &str) -> Result<wire::WorkQueueStats, ApiError> {
        self.call(Method::GET, &path::stats(env), Req::default(), true).await
    }

    pub async fn session(&self, session: &str) -> Result<wire::Session, ApiError> {
        self.call(Method::GET, &path::session(session), Req::default(), true).await
    }

    /// One page of a session's events, oldest first, as the body came: each event is parsed on
    /// its own (`EventsPage::each`), so one the worker cannot read costs only itself and the
    /// page is never held as a tree of values. `types` filters by event type (`types[]`, as the
    /// SDK sends it); empty for every type.
    pub async fn list_events(
        &self,
        session: &str,
        page: Option<&str>,
        limit: u32,
        types: &[&str],
    ) -> Result<EventsPage, ApiError> {
        let mut r = Req { query: vec![("limit", limit.to_string())], ..Req::default() };
        if let Some(p) = page {
            r.query.push(("page", p.to_owned()));
        }
        r.query.extend(types.iter().map(|t| ("types[]", (*t).to_owned())));
        let what = format!("GET {}", path::events(session));
        let body = self
            .call_raw(Method::GET, &path::events(session), r, true)
            .await?
            .ok_or_else(|| ApiError::Malformed { what: what.clone(), detail: "empty response (204)".into() })?;
        Ok(EventsPage { body, what })
    }

    /// Posts one event once. Not retried here: the worker checks whether an ambiguous failure
    /// took effect before posting again, so a tool result is never posted twice.
    pub async fn send_event<E: Serialize>(&self, session: &str, event: &E) -> Result<(), ApiError> {
        let body = serde_json::to_value(wire::SendEvents { events: vec![event] }).expect("events serialise");
        let r = Req { body: Some(body), ..Req::default() };
        self.call_raw(Method::POST, &path::events(session), r, false).await.map(|_| ())
    }

    /// Opens the session's live event stream (server-sent events).
    pub async fn stream_events(&self, session: &str) -> Result<EventStream, ApiError> {
        let p = path::events_stream(session);
        // No overall timeout: the stream lives as long as the session; liveness comes from the
        // server's pings, which the reader bounds.
        let send = self
            .request_on(&self.streams, &Method::GET, &p, &Req::default())
            .timeout(Duration::from_secs(365 * 86_400))
            .header("accept", "text/event-stream")
            .send();
        let resp = tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| ApiError::Timeout(self.timeout))?
            .map_err(|e| transport(e, self.timeout))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            let message = serde_json::from_slice::<wire::ErrorBody>(&body)
                .map(|b| b.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
            return Err(match status.as_u16() {
                401 | 403 => ApiError::Auth { status: status.as_u16(), message },
                404 => ApiError::NotFound(message),
                429 => ApiError::RateLimited { retry_after: None },
                s if s >= 500 => ApiError::Server { status: s, message },
                s => ApiError::Rejected { status: s, message },
            });
        }
        Ok(EventStream { resp, frames: Frames::default(), max: self.max_body, silence: self.stream_silence })
    }

    pub async fn skill_version(&self, skill: &str, version: &str) -> Result<wire::SkillVersion, ApiError> {
        let r = Req { no_beta: true, ..Req::default() };
        self.call(Method::GET, &path::skill_version(skill, version), r, true).await
    }

    /// One page of a memory store's memories (`basic`: no content, 100 a page; `full`: 20).
    pub async fn list_memories(
        &self,
        store: &str,
        full: bool,
        page: Option<&str>,
    ) -> Result<wire::Page<wire::Memory>, ApiError> {
        let mut query = vec![("view", if full { "full" } else { "basic" }.to_owned())];
        query.push(("limit", if full { "20" } else { "100" }.to_owned()));
        if let Some(p) = page {
            query.push(("page", p.to_owned()));
        }
        let r = Req { query, ..memory_req() };
        self.call(Method::GET, &path::memories(store), r, true).await
    }

    /// A memory with its content.
    pub async fn get_memory(&self, store: &str, id: &str) -> Result<wire::Memory, ApiError> {
        let r = Req { query: vec![("view", "full".to_owned())], ..memory_req() };
        self.call(Method::GET, &path::memory(store, id), r, true).await
    }

    /// Creates a memory at `path` (starting with `/`).
    pub async fn create_memory(&self, store: &str, path: &str, content: &str) -> Result<wire::Memory, ApiError> {
        let r = Req { body: Some(serde_json::json!({"path": path, "content": content})), ..memory_req() };
        self.call(Method::POST, &path::memories(store), r, true).await
    }

    /// Replaces a memory's content if it still has `expect_sha` (409 otherwise).
    pub async fn update_memory(
        &self,
        store: &str,
        id: &str,
        content: &str,
        expect_sha: &str,
    ) -> Result<wire::Memory, ApiError> {
        let body = serde_json::json!({
            "content": content,
            "precondition": {"type": "content_sha256", "content_sha256": expect_sha},
        });
        let r = Req { body: Some(body), ..memory_req() };
        self.call(Method::POST, &path::memory(store, id), r, true).await
    }

    /// Deletes a memory if it still has `expect_sha` (409 otherwise).
    pub async fn delete_memory(&self, store: &str, id: &str, expect_sha: &str) -> Result<(), ApiError> {
        let r = Req { query: vec![("expected_content_sha256", expect_sha.to_owned())], ..memory_req() };
        self.call_raw(Method::DELETE, &path::memory(store, id), r, true).await.map(|_| ())
    }

    /// A skill version's archive (zip or tar, possibly compressed).
    pub async fn skill_content(&self, skill: &str, version: &str) -> Result<Vec<u8>, ApiError> {
        let r = Req { no_beta: true, headers: vec![("accept", "application/binary".to_owned())], ..Req::default() };
        let p = path::skill_content(skill, version);
        self.call_raw(Method::GET, &p, r, true)
            .await?
            .ok_or_else(|| ApiError::Malformed { what: format!("GET {p}"), detail: "empty response (204)".into() })
    }
}

/// A page of events as it came, parsed once, by `each`.
pub struct EventsPage {
    body: Vec<u8>,
    /// The request, for errors.
    what: String,
}

#[derive(Deserialize)]
struct RawPage<'a> {
    #[serde(borrow)]
    data: Vec<&'a serde_json::value::RawValue>,
    #[serde(default)]
    next_page: Option<String>,
}

impl EventsPage {
    /// Calls `f` with each event in turn, parsed alone (an event that does not parse, nested
    /// past the parser's depth say, is logged and skipped), and returns the next page's cursor.
    /// A body that is not a page at all is an error, tried again like a cut-off one.
    pub fn each(&self, mut f: impl FnMut(serde_json::Value)) -> Result<Option<String>, ApiError> {
        let page = serde_json::from_slice::<RawPage>(&self.body)
            .map_err(|e| ApiError::Malformed { what: self.what.clone(), detail: e.to_string() })?;
        for raw in page.data {
            match serde_json::from_str::<serde_json::Value>(raw.get()) {
                Ok(v) => f(v),
                Err(e) => {
                    let head: String = raw.get().chars().take(120).collect();
                    tracing::warn!(error = %e, event = %head, "skipping an event this worker cannot read");
                }
            }
        }
        Ok(page.next_page.filter(|p| !p.is_empty()))
    }
}

/// Redirects within the API's origin are followed (as the official clients follow them); one to
/// another origin is not: a 307 would carry a session's tool output there. The redirect is then
/// the answer, an error tried again like a 5xx.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first().map(|u| u.origin());
        if attempt.previous().len() >= 10 || first.as_ref() != Some(&attempt.url().origin()) {
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
}

/// A session's live events (server-sent events), read frame by frame.
pub struct EventStream {
    resp: reqwest::Response,
    frames: Frames,
    max: usize,
    /// The longest wait for the next frame (pings included) before the stream is taken for dead.
    silence: Duration,
}

/// How fast a frame that takes longer than the silence bound must still arrive, in bytes per
/// second, not to be taken for a stream that trickles forever.
const TRICKLE_FLOOR: u64 = 64 * 1024;

impl EventStream {
    /// The next event (its JSON, with `type` filled in from the SSE event name when the data
    /// lacks it); `Ok(None)` when the server closed the stream. Pings are skipped; an `error`
    /// event is a server error. A stream that delivers no frame, not even a ping, within the
    /// silence bound (extended while a large frame arrives at a useful rate) is dead: a
    /// half-open connection or a buffering proxy, an error the caller reconnects after.
    pub async fn next(&mut self) -> Result<Option<serde_json::Value>, ApiError> {
        let mut last_frame = tokio::time::Instant::now();
        loop {
            if let Some(frame) = self.frames.take() {
                last_frame = tokio::time::Instant::now();
                let (name, data) = parse_frame(&frame);
                match name.as_deref() {
                    Some("ping") => continue,
                    Some("error") => return Err(ApiError::Server { status: 200, message: data }),
                    _ => {}
                }
                if data.is_empty() {
                    continue;
                }
                let mut v: serde_json::Value = match serde_json::from_str(&data) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an unreadable event on the stream");
                        continue;
                    }
                };
                if let (Some(obj), Some(n)) = (v.as_object_mut(), name) {
                    obj.entry("type").or_insert(serde_json::Value::String(n));
                }
                return Ok(Some(v));
            }
            let pending = self.frames.pending() as u64;
            let deadline = last_frame + self.silence + Duration::from_secs(pending / TRICKLE_FLOOR);
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => {
                    return Err(ApiError::Malformed {
                        what: "event stream".into(),
                        detail: format!(
                            "no complete frame (not even a ping) for {}",
                            crate::util::format_duration(deadline - last_frame)
                        ),
                    })
                }
                Ok(Ok(Some(c))) => {
                    if self.frames.pending() + c.len() > self.max {
                        return Err(ApiError::Malformed {
                            what: "event stream".into(),
                            detail: format!("one event over the {}-byte limit", self.max),
                        });
                    }
                    self.frames.push(&c);
                }
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(transport(e, Duration::ZERO)),
            }
        }
    }
}

/// SSE framing: bytes in, whole frames (up to a blank line) out, in time linear in the bytes.
/// Each byte is scanned once for the blank line that ends its frame, and taken frames are cut
/// off the front only once they make up half the buffer.
#[derive(Default)]
pub(crate) struct Frames {
    buf: Vec<u8>,
    /// Where the frame being read starts.
    start: usize,
    /// How far the search for its end got.
    scanned: usize,
    /// Bytes looked at, for the test that the work is linear.
    #[cfg(test)]
    work: usize,
}

impl Frames {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes of the frame being read.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole frame, without its blank line. Lines may end in `\n` or `\r\n`.
    pub(crate) fn take(&mut self) -> Option<String> {
        let mut i = self.scanned.max(self.start);
        while i < self.buf.len() {
            #[cfg(test)]
            {
                self.work += 1;
            }
            if self.buf[i] == b'\n' {
                // The line this newline ends is empty when a newline (and maybe a `\r`) is
                // right before it.
                let mut j = i;
                if j > self.start && self.buf[j - 1] == b'\r' {
                    j -= 1;
                }
                if j == self.start || (j > self.start && self.buf[j - 1] == b'\n') {
                    // Without the end of its last line.
                    let mut end = j;
                    if end > self.start && self.buf[end - 1] == b'\n' {
                        end -= 1;
                        if end > self.start && self.buf[end - 1] == b'\r' {
                            end -= 1;
                        }
                    }
                    let frame = String::from_utf8_lossy(&self.buf[self.start..end]).into_owned();
                    self.start = i + 1;
                    self.scanned = self.start;
                    return Some(frame);
                }
            }
            i += 1;
        }
        self.scanned = i;
        None
    }
}

/// The event name and the joined data lines of one frame.
fn parse_frame(frame: &str) -> (Option<String>, String) {
    let mut name = None;
    let mut data: Vec<&str> = Vec::new();
    for line in frame.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    (name, data.join("\n"))
}

fn transport(e: reqwest::Error, timeout: Duration) -> ApiError {
    if e.is_timeout() {
        ApiError::Timeout(timeout)
    } else {
        // The chain carries the useful part ("connection refused").
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        ApiError::Connect(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds_and_honours_retry_after() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for n in 0..10u32 {
            let d = b.next_delay();
            let exp = (Duration::from_millis(100) * 2u32.pow(n.min(5))).min(Duration::from_secs(2));
            assert!(d >= exp / 2 && d <= exp, "attempt {n}: {d:?} not in [{:?}, {exp:?}]", exp / 2);
        }
        let e = ApiError::RateLimited { retry_after: Some(Duration::from_secs(30)) };
        assert!(b.delay_for(&e) >= Duration::from_secs(30));
        assert_eq!(e.to_string(), "rate limited (retry after 30s)");
        assert_eq!(ApiError::RateLimited { retry_after: None }.to_string(), "rate limited");
        assert_eq!(ApiError::Timeout(Duration::from_millis(2500)).to_string(), "timed out after 2500ms");
    }

    #[test]
    fn sse_frames_split_on_blank_lines_and_join_data_lines() {
        let mut f = Frames::default();
        f.push(b"event: ping\ndata: {}\n\nevent: agent.tool_use\ndata: {\"id\":\ndata: 1}\r\n\r\npartial");
        assert_eq!(parse_frame(&f.take().unwrap()), (Some("ping".into()), "{}".into()));
        let (name, data) = parse_frame(&f.take().unwrap());
        assert_eq!((name.as_deref(), data.as_str()), (Some("agent.tool_use"), "{\"id\":\n1}"));
        assert_eq!(f.take(), None);
        assert_eq!(f.pending(), b"partial".len());
        // A blank line split across pushes, a frame at a time.
        f.push(b"\n");
        assert_eq!(f.take(), None);
        f.push(b"\n");
        assert_eq!(f.take().as_deref(), Some("partial"));
        f.push(b"\r");
        assert_eq!(f.take(), None);
        f.push(b"\n");
        assert_eq!(f.take().as_deref(), Some(""));
    }

    #[test]
    fn sse_framing_is_linear_in_the_bytes_received() {
        // A 10 MB and a 70 MB event in 16 KiB chunks, then many small ones: each byte is looked
        // at about once (a rescan per chunk made the 70 MB one never finish).
        for mib in [10, 70] {
            sse_framing_of_one_big_event(mib);
        }
    }

    fn sse_framing_of_one_big_event(mib: usize) {
        let event = format!("event: agent.tool_use\ndata: \"{}\"\n\n", "x".repeat(mib << 20));
        let mut small = String::new();
        for i in 0..20_000 {
            small.push_str(&format!("event: ping\ndata: {{\"n\":{i}}}\n\n"));
        }
        let all = format!("{event}{small}");
        let mut f = Frames::default();
        let mut frames = 0;
        for chunk in all.as_bytes().chunks(16 * 1024) {
            f.push(chunk);
            while let Some(frame) = f.take() {
                frames += 1;
                if frames == 1 {
                    assert_eq!(frame.len(), event.len() - 2);
                }
            }
        }
        assert_eq!(frames, 20_001);
        assert!(f.work <= all.len() + 2 * 16 * 1024, "looked at {} bytes for {}", f.work, all.len());
        // What is kept is the frame being read, not what was taken.
        assert!(f.buf.len() <= 2 * 16 * 1024 + 64, "{}", f.buf.len());
    }

    /// A server that answers the stream's request with SSE headers and then `body`, sent by
    /// `send`; returns its address.
    async fn sse_server<F, Fut>(send: F) -> String
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = c.read(&mut req).await;
            c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n").await.unwrap();
            send(c).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_silent_stream_is_dead_after_the_silence_bound() {
        use tokio::io::AsyncWriteExt;
        let addr = sse_server(|mut c| async move {
            c.write_all(b"event: ping\ndata: {}\n\nevent: x\ndata: {\"id\": \"e1\"}\n\n").await.unwrap();
            // Then nothing, with the connection open: a half-open link or a buffering proxy.
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let mut client = Client::new(&addr, Secret::new(String::from("k")), AuthScheme::Bearer).unwrap();
        client.stream_silence = Duration::from_millis(300);
        let mut s = client.stream_events("sesn_1").await.unwrap();
        assert_eq!(s.next().await.unwrap().unwrap()["id"], "e1");
        let t = std::time::Instant::now();
        let e = s.next().await.unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.is_transient() && e.to_string().contains("no complete frame"), "{e}");
    }

    #[tokio::test]
    async fn a_frame_that_trickles_and_never_ends_is_dead_too() {
        use tokio::io::AsyncWriteExt;
        let addr = sse_server(|mut c| async move {
            let _ = c.write_all(b"event: x\ndata: ").await;
            for _ in 0..300 {
                if c.write_all(b"y").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let mut client = Client::new(&addr, Secret::new(String::from("k")), AuthScheme::Bearer).unwrap();
        client.stream_silence = Duration::from_millis(300);
        let mut s = client.stream_events("sesn_1").await.unwrap();
        let t = std::time::Instant::now();
        assert!(s.next().await.is_err());
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn redirects_to_another_origin_are_answered_not_followed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other_addr = other.local_addr().unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = c.read(&mut req).await;
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{other_addr}/v1/sessions/sesn_1/events\r\ncontent-length: 0\r\n\r\n"
            );
            c.write_all(answer.as_bytes()).await.unwrap();
        });
        let mut client = Client::new(&addr, Secret::new(String::from("k")), AuthScheme::Bearer).unwrap();
        client.attempts = 1;
        let e = client.send_event("sesn_1", &serde_json::json!({"type": "user.tool_result"})).await.unwrap_err();
        assert!(matches!(e, ApiError::Server { status: 307, .. }), "{e}");
        assert!(e.to_string().contains("not followed"), "{e}");
        // Nothing reached the other origin.
        assert!(tokio::time::timeout(Duration::from_millis(200), other.accept()).await.is_err());
    }

    #[test]
    fn a_page_is_read_event_by_event_and_a_bad_one_costs_only_itself() {
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
        let body =
            format!(r#"{{"data": [{{"id": "a"}}, {{"id": "b", "x": {deep}}}, {{"id": "c"}}], "next_page": "p2"}}"#);
        let page = EventsPage { body: body.into_bytes(), what: "GET events".into() };
        let mut ids = Vec::new();
        assert_eq!(page.each(|e| ids.push(e["id"].as_str().unwrap().to_owned())).unwrap().as_deref(), Some("p2"));
        assert_eq!(ids, ["a", "c"]);
        let garbage = EventsPage { body: b"<html>".to_vec(), what: "GET events".into() };
        assert!(garbage.each(|_| panic!("no events in garbage")).unwrap_err().is_transient());
    }
}
