//! The local control plane's faults: what a test asks it to do wrong (5xx, 429, timeouts,
//! garbage, cut and oversized bodies, silent streams, redirects, late deliveries, huge pages),
//! the middleware that does it to the next matching requests, and the admin routes that set,
//! list and clear them.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

use super::{authorize, ApiErr, ApiResult, LocalControlPlane, Need};

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
    /// Only requests with this method.
    #[serde(default)]
    pub method: Option<String>,
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
    /// 200 with a valid JSON body of `OVERSIZE_FAULT` bytes (mostly blanks).
    Oversize,
    /// An event stream that opens (200, `text/event-stream`) and then sends nothing, not even a
    /// ping, for `SILENT_FAULT`: a half-open connection or a buffering proxy.
    Silent,
    /// 307 to another origin (a closed loopback port), which a client must not follow.
    Redirect,
    /// The request reaches the server `DELAY_FAULT` late (a proxy holding it), then is served.
    Delayed,
    /// For an events listing (never its stream): a page of `TINY_FAULT_EVENTS` tiny events of a
    /// type no worker acts on, about 60 MB, within the worker's default body limit.
    TinyEvents,
}

const TINY_FAULT_EVENTS: usize = 2_000_000;

const DELAY_FAULT: Duration = Duration::from_millis(1500);

const SILENT_FAULT: Duration = Duration::from_secs(600);

const OVERSIZE_FAULT: usize = 96 << 20;

const TIMEOUT_FAULT: Duration = Duration::from_secs(6);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Faults {
    pub faults: Vec<Fault>,
}

pub(super) async fn inject_faults(State(cp): State<LocalControlPlane>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().as_str().to_owned();
    let fault = if path.starts_with("/v1/local/") {
        None
    } else {
        let mut db = cp.db();
        let i = db.faults.iter().position(|f| {
            f.path_contains.as_deref().is_none_or(|p| path.contains(p))
                && f.method.as_deref().is_none_or(|m| m.eq_ignore_ascii_case(&method))
                && !(f.kind == FaultKind::TinyEvents && path.ends_with("/stream"))
        });
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
    if f.kind == FaultKind::Delayed {
        // Served whether or not the client still waits: the request is on its way already.
        let late = tokio::spawn(async move {
            tokio::time::sleep(DELAY_FAULT).await;
            next.run(req).await
        });
        return late.await.unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    if f.after {
        let _ = next.run(req).await;
    }
    match f.kind {
        FaultKind::ServerError => {
            ApiErr(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "injected fault".into(), None).into_response()
        }
        FaultKind::RateLimited => {
            let mut r = ApiErr(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "injected fault".into(), None)
                .into_response();
            r.headers_mut().insert("retry-after", "1".parse().expect("static header"));
            r
        }
        FaultKind::Timeout => {
            tokio::time::sleep(TIMEOUT_FAULT).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        FaultKind::Garbage => (StatusCode::OK, "<html>upstream hiccup</html>").into_response(),
        FaultKind::Oversize => {
            let mut body = vec![b' '; OVERSIZE_FAULT];
            body[..12].copy_from_slice(br#"{"data": [],"#);
            let tail = br#""next_page": null}"#;
            let n = body.len();
            body[n - tail.len()..].copy_from_slice(tail);
            (StatusCode::OK, [("content-type", "application/json")], body).into_response()
        }
        FaultKind::Silent => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
            tokio::spawn(async move {
                tokio::time::sleep(SILENT_FAULT).await;
                drop(tx);
            });
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(Chunks::Channel(rx)))
                .expect("static response")
        }
        FaultKind::Delayed => unreachable!("served above"),
        FaultKind::TinyEvents => {
            let mut body = String::with_capacity(TINY_FAULT_EVENTS * 30 + 64);
            body.push_str("{\"data\": [");
            for i in 0..TINY_FAULT_EVENTS {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!("{{\"id\":\"t{i}\",\"type\":\"span.x\"}}"));
            }
            // The real history follows, from its start.
            body.push_str("], \"next_page\": \"page_0\"}");
            (StatusCode::OK, [("content-type", "application/json")], body).into_response()
        }
        FaultKind::Redirect => Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header("location", format!("http://127.0.0.1:1{path}"))
            .body(Body::empty())
            .expect("static response"),
        FaultKind::Truncated => {
            let body = Body::from_stream(Chunks::truncated());
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .header("content-length", "4096")
                .body(body)
                .expect("static response")
        }
    }
}

/// A response body made of chunks: a fixed list (a JSON fragment and then a failure, to cut a
/// connection before its declared length) or a channel (an event stream).
pub(super) enum Chunks {
    Fixed(VecDeque<Result<Vec<u8>, std::io::Error>>),
    Channel(tokio::sync::mpsc::Receiver<Vec<u8>>),
}

impl Chunks {
    fn truncated() -> Chunks {
        Chunks::Fixed(VecDeque::from([
            Ok(br#"{"id":"work_0"#.to_vec()),
            Err(std::io::Error::other("injected truncation")),
        ]))
    }
}

impl futures_core::Stream for Chunks {
    type Item = Result<Vec<u8>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match &mut *self {
            Chunks::Fixed(q) => std::task::Poll::Ready(q.pop_front()),
            Chunks::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(Ok)),
        }
    }
}

pub(super) async fn add_faults(
    State(cp): State<LocalControlPlane>,
    h: HeaderMap,
    Json(f): Json<Faults>,
) -> ApiResult<StatusCode> {
    let mut db = cp.db();
    authorize(&db, &h, Need::Org)?;
    db.faults.extend(f.faults);
    Ok(StatusCode::NO_CONTENT)
}

/// The faults not injected yet: a test shows its faults fired by finding none left.
pub(super) async fn pending_faults(State(cp): State<LocalControlPlane>, h: HeaderMap) -> ApiResult<Json<Faults>> {
    let db = cp.db();
    authorize(&db, &h, Need::Org)?;
    Ok(Json(Faults { faults: db.faults.iter().cloned().collect() }))
}

pub(super) async fn clear_faults(State(cp): State<LocalControlPlane>, h: HeaderMap) -> ApiResult<StatusCode> {
    let mut db = cp.db();
    authorize(&db, &h, Need::Org)?;
    db.faults.clear();
    Ok(StatusCode::NO_CONTENT)
}
