//! The API client: typed calls over the wire format in `wire`, typed errors, timeouts on every
//! call, and jittered exponential backoff for calls that are safe to repeat.

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;

use super::wire::{self, path, AuthScheme};
use super::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("authentication failed ({status}): {message}")]
    Auth { status: u16, message: String },
    #[error("not found: {0}")]
    NotFound(String),
    /// 409/410 on a work item: another worker holds it, or the lease ran out.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    #[error("rate limited (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    #[error("server error {status}: {message}")]
    Server { status: u16, message: String },
    #[error("request rejected ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("malformed response to {what}: {detail}")]
    Malformed { what: String, detail: String },
}

impl ApiError {
    /// Worth trying again: the server may not have seen the request, or may do better later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::RateLimited { .. }
                | ApiError::Server { .. }
                | ApiError::Timeout(_)
                | ApiError::Connect(_)
                | ApiError::Malformed { .. }
        )
    }

    /// The request may have taken effect even though no good answer came back.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, ApiError::Server { .. } | ApiError::Timeout(_) | ApiError::Malformed { .. })
    }
}

/// Jittered exponential backoff ("full jitter"): attempt n waits a random time in
/// [base·2ⁿ/2, base·2ⁿ], capped.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, attempt: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        half + Duration::from_nanos(fastrand::u64(0..=(exp - half).as_nanos() as u64))
    }

    /// The delay for an error: the server's Retry-After when it gave one.
    pub fn delay_for(&mut self, e: &ApiError) -> Duration {
        let d = self.next_delay();
        match e {
            ApiError::RateLimited { retry_after: Some(r) } => (*r).max(d / 4),
            _ => d,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Secret,
    auth: AuthScheme,
    /// Per-call timeout; long polls add their wait on top.
    pub timeout: Duration,
    /// Attempts for idempotent calls.
    pub attempts: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("key", &self.key).finish()
    }
}

impl Client {
    pub fn new(base: &str, key: Secret, auth: AuthScheme) -> Result<Client, ApiError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("stockade/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Connect(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            key,
            auth,
            timeout: Duration::from_secs(15),
            attempts: 4,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One HTTP exchange. `Ok(None)` is a 204.
    async fn once<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: &Method,
        p: &str,
        query: Option<&[(&str, String)]>,
        body: Option<&B>,
        extra_wait: Duration,
    ) -> Result<Option<T>, ApiError> {
        let timeout = self.timeout + extra_wait;
        let mut req = self
            .http
            .request(method.clone(), format!("{}{p}", self.base))
            .timeout(timeout)
            .header("anthropic-version", wire::API_VERSION)
            .header("anthropic-beta", wire::BETA);
        req = match self.auth {
            AuthScheme::XApiKey => req.header("x-api-key", self.key.expose()),
            AuthScheme::Bearer => req.bearer_auth(self.key.expose()),
        };
        if let Some(q) = query {
            req = req.query(q);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let what = format!("{method} {p}");
        let resp = req.send().await.map_err(|e| transport(e, timeout))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        let bytes = resp.bytes().await.map_err(|e| match transport(e, timeout) {
            ApiError::Connect(d) => ApiError::Malformed { what: what.clone(), detail: format!("body cut short: {d}") },
            other => other,
        })?;
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ApiError::Malformed { what, detail: e.to_string() });
        }
        let message = serde_json::from_slice::<wire::ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned());
        Err(match status.as_u16() {
            401 | 403 => ApiError::Auth { status: status.as_u16(), message },
            404 => ApiError::NotFound(message),
            409 | 410 => ApiError::LeaseLost(message),
            429 => ApiError::RateLimited { retry_after },
            s if s >= 500 => ApiError::Server { status: s, message },
            s => ApiError::Rejected { status: s, message },
        })
    }

    /// A call with retries when `idempotent`; otherwise exactly one attempt.
    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        p: &str,
        query: Option<&[(&str, String)]>,
        body: Option<&B>,
        idempotent: bool,
        extra_wait: Duration,
    ) -> Result<Option<T>, ApiError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let attempts = if idempotent { self.attempts.max(1) } else { 1 };
        let mut n = 0;
        loop {
            n += 1;
            match self.once(&method, p, query, body, extra_wait).await {
                Err(e) if e.is_transient() && n < attempts => {
                    let d = backoff.delay_for(&e);
                    tracing::debug!(error = %e, attempt = n, delay_ms = d.as_millis() as u64, "retrying {method} {p}");
                    tokio::time::sleep(d).await;
                }
                r => return r,
            }
        }
    }

    fn required<T>(what: &str, r: Option<T>) -> Result<T, ApiError> {
        r.ok_or_else(|| ApiError::Malformed { what: what.into(), detail: "empty response (204)".into() })
    }

    /// Claims the next queued item, waiting up to `wait` for one. Not retried: a repeated claim
    /// could take a second item.
    pub async fn claim(&self, env: &str, worker_id: &str, wait: Duration) -> Result<Option<wire::WorkItem>, ApiError> {
        let body = wire::ClaimRequest { worker_id: worker_id.into(), wait_ms: wait.as_millis() as u64 };
        self.call(Method::POST, &path::claim(env), None, Some(&body), false, wait).await
    }

    pub async fn heartbeat(&self, env: &str, work: &str, worker_id: &str) -> Result<wire::WorkItem, ApiError> {
        let body = wire::HeartbeatRequest { worker_id: worker_id.into() };
        let r = self.call(Method::POST, &path::heartbeat(env, work), None, Some(&body), true, Duration::ZERO).await?;
        Self::required("heartbeat", r)
    }

    pub async fn complete(
        &self,
        env: &str,
        work: &str,
        worker_id: &str,
        status: wire::FinalStatus,
        message: Option<String>,
    ) -> Result<wire::WorkItem, ApiError> {
        let body = wire::CompleteRequest { worker_id: worker_id.into(), status, message };
        let r = self.call(Method::POST, &path::complete(env, work), None, Some(&body), true, Duration::ZERO).await?;
        Self::required("complete", r)
    }

    pub async fn release(&self, env: &str, work: &str, worker_id: &str, reason: &str) -> Result<(), ApiError> {
        let body = wire::ReleaseRequest { worker_id: worker_id.into(), reason: Some(reason.into()) };
        self.call::<serde_json::Value, _>(
            Method::POST,
            &path::release(env, work),
            None,
            Some(&body),
            true,
            Duration::ZERO,
        )
        .await
        .map(|_| ())
    }

    pub async fn stop(&self, env: &str, work: &str, force: bool) -> Result<wire::WorkItem, ApiError> {
        let body = wire::StopRequest { force };
        let r = self.call(Method::POST, &path::stop(env, work), None, Some(&body), true, Duration::ZERO).await?;
        Self::required("stop", r)
    }

    pub async fn stats(&self, env: &str) -> Result<wire::WorkQueueStats, ApiError> {
        let r = self.call::<_, ()>(Method::GET, &path::stats(env), None, None, true, Duration::ZERO).await?;
        Self::required("stats", r)
    }

    pub async fn list_events(
        &self,
        session: &str,
        after_id: Option<&str>,
        wait: Duration,
    ) -> Result<wire::EventList, ApiError> {
        let mut q = vec![("wait_ms", wait.as_millis().to_string())];
        if let Some(a) = after_id {
            q.push(("after_id", a.to_owned()));
        }
        let r = self.call::<_, ()>(Method::GET, &path::events(session), Some(&q), None, true, wait).await?;
        Self::required("list events", r)
    }

    /// Posts events once. Not retried here: the worker checks whether an ambiguous failure took
    /// effect before posting again, so a tool result is never posted twice.
    pub async fn post_events(&self, session: &str, events: Vec<wire::Event>) -> Result<(), ApiError> {
        let body = wire::PostEvents { events };
        self.call::<serde_json::Value, _>(
            Method::POST,
            &path::events(session),
            None,
            Some(&body),
            false,
            Duration::ZERO,
        )
        .await
        .map(|_| ())
    }

    pub async fn skill_files(&self, skill: &str) -> Result<wire::SkillFiles, ApiError> {
        let r = self.call::<_, ()>(Method::GET, &path::skill_files(skill), None, None, true, Duration::ZERO).await?;
        Self::required("skill files", r)
    }

    /// A raw call for local-only endpoints (the local control plane's admin API).
    pub async fn local<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        p: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, ApiError> {
        self.call(method, p, None, body, false, Duration::ZERO).await
    }
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
    }
}
