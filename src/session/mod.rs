//! Sessions: one long-lived jail per agent session, executing its tool calls in order.
//!
//! The jail is built exactly as `stockade run` builds one (`jail::Jail::start`), with a
//! `Session` payload: its PID 1 serves tool calls (see `server`) over one end of a socketpair
//! created before the jail. Only PID 1 holds that end — it is close-on-exec, the helper drops it,
//! and no listener exists that anything else could reach.
//!
//! `stockade session` speaks JSON lines on stdin/stdout (`run_json_lines`); the worker drives
//! the same code through a subprocess, since jails must be built from single-threaded processes.

mod frame;
pub mod server;
pub mod trail;

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use crate::jail::{Jail, JailError, JailSpec, Payload, Step};
use crate::tools::{unknown_tool, ToolResult, TOOLS};

/// A tool call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Request {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub input: serde_json::Value,
    /// The session thread the call belongs to (its `session_thread_id`); none for the primary
    /// thread. Each thread has a bash shell of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    /// Set by the jail's PID 1 for its file tool helper: where bash saved long outputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub saved_outputs: Vec<std::path::PathBuf>,
}

impl Request {
    pub(crate) fn new(thread: Option<&str>, id: &str, name: &str, input: &serde_json::Value) -> Request {
        Request {
            id: id.to_owned(),
            name: name.to_owned(),
            input: input.clone(),
            thread: thread.map(str::to_owned),
            saved_outputs: Vec::new(),
        }
    }
}

/// A tool result, tagged with its call's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Response {
    pub id: Option<String>,
    pub content: Vec<crate::tools::Block>,
    pub is_error: bool,
}

impl Response {
    pub(crate) fn new(id: impl Into<Option<String>>, r: ToolResult) -> Response {
        Response { id: id.into(), content: r.content, is_error: r.is_error }
    }
}

/// The supervisor's end of a session server's channel.
pub struct Channel(UnixStream);

impl Channel {
    pub fn new(s: UnixStream) -> Channel {
        Channel(s)
    }

    /// Sends one call of the primary thread and waits for its result; `Err` when the server is gone.
    pub fn call(&mut self, id: &str, name: &str, input: &serde_json::Value) -> std::io::Result<ToolResult> {
        self.call_in(None, id, name, input)
    }

    /// Sends one call of a session thread (none: the primary one) and waits for its result.
    pub fn call_in(
        &mut self,
        thread: Option<&str>,
        id: &str,
        name: &str,
        input: &serde_json::Value,
    ) -> std::io::Result<ToolResult> {
        let req = Request::new(thread, id, name, input);
        frame::write(&mut self.0, &req)?;
        match frame::read::<_, Response>(&mut self.0)? {
            Some(r) => Ok(ToolResult { content: r.content, is_error: r.is_error }),
            None => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the session server exited")),
        }
    }
}

/// A running session jail.
pub struct Session {
    jail: Jail,
    chan: Channel,
}

impl Session {
    pub fn start(spec: &JailSpec) -> Result<Session, JailError> {
        let (host, jail_end) =
            UnixStream::pair().map_err(|e| JailError::new(Step::Preflight, format!("socketpair: {e}")))?;
        let host_end = host.as_raw_fd();
        let jail =
            Jail::start(spec, Payload::Session { channel: jail_end.into(), host_end, serve: server::serve_in_jail })?;
        Ok(Session { jail, chan: Channel(host) })
    }

    /// The jail's init, as seen from the host.
    pub fn pid(&self) -> i32 {
        self.jail.pid()
    }

    /// Runs one tool call of the primary thread. `Err` means the jail itself is gone and the
    /// session cannot continue.
    pub fn call(&mut self, id: &str, name: &str, input: &serde_json::Value) -> Result<ToolResult, JailError> {
        self.call_in(None, id, name, input)
    }

    /// Runs one tool call of a session thread (none: the primary one), in that thread's shell.
    pub fn call_in(
        &mut self,
        thread: Option<&str>,
        id: &str,
        name: &str,
        input: &serde_json::Value,
    ) -> Result<ToolResult, JailError> {
        if !TOOLS.contains(&name) {
            return Ok(ToolResult::err(unknown_tool(name)));
        }
        self.chan
            .call_in(thread, id, name, input)
            .map_err(|e| JailError::new(Step::Supervise, format!("session jail is gone: {e}")))
    }

    /// Ends the session: everything in the jail is killed and its cgroup removed; the workspace
    /// and outputs directories are left to the caller.
    pub fn end(self) -> Result<crate::jail::Outcome, JailError> {
        let Session { jail, chan } = self;
        drop(chan); // PID 1 sees EOF, kills the shell and exits
        jail.wait()
    }
}

/// The answer to a tool call once a full trail refuses (`trail.on_full = "fail"`).
pub(crate) fn trail_full() -> String {
    "the session's audit trail is full (trail.max_size) and trail.on_full = \"fail\": no more tool calls run".into()
}

/// A line too long to keep: its first bytes (where the id is) and its length.
type Oversize = (Vec<u8>, usize);

/// One input line, read without holding more than `max` bytes of it: `Ok(None)` at EOF,
/// `Err(Oversize)` for a longer line.
fn read_line_bounded<R: BufRead>(input: &mut R, max: usize) -> std::io::Result<Option<Result<Vec<u8>, Oversize>>> {
    const HEAD: usize = 4096;
    let mut line = Vec::new();
    let mut len = 0usize;
    let mut over = false;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            if len == 0 {
                return Ok(None);
            }
            break;
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        len += chunk.len();
        if !over && len > max {
            over = true;
            line.truncate(HEAD);
        }
        if !over {
            line.extend_from_slice(chunk);
        } else if line.len() < HEAD {
            let take = (HEAD - line.len()).min(chunk.len());
            line.extend_from_slice(&chunk[..take]);
        }
        let consumed = done.unwrap_or(buf.len());
        input.consume(consumed);
        if done.is_some() {
            break;
        }
    }
    Ok(Some(if over { Err((line, len)) } else { Ok(line) }))
}

/// The `"id"` of a request whose line is too long to parse, read off its start.
fn id_from_head(head: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    let at = text.find("\"id\"")?;
    let rest = text[at + 4..].trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    let id = &rest[..end];
    (!id.contains('\\')).then(|| id.to_owned())
}

/// `stockade session`: one JSON object per input line (`{"id", "name", "input"}`), one result
/// per output line (`{"id", "content", "is_error"}`), in order. EOF ends the session. A line
/// that is not a valid request gets an error result and the session goes on, and so does one
/// longer than `max_request` bytes, which is never held in memory whole. With `announce`, a
/// first line `{"ready": true, "pid": N}` tells the caller that the jail is built.
///
/// With a trail, what the jail runs is attributed to the call in flight, and calls are
/// recorded too when `record_calls` (a worker records its calls itself).
pub fn run_json_lines<R: BufRead, W: Write>(
    spec: &JailSpec,
    mut input: R,
    mut out: W,
    announce: bool,
    max_request: usize,
    trail: Option<(&trail::TrailWriter, bool)>,
) -> Result<(), JailError> {
    let mut session = Session::start(spec)?;
    let io_err = |e: std::io::Error| JailError::new(Step::Supervise, format!("writing results: {e}"));
    if announce {
        let line = serde_json::json!({"ready": true, "pid": session.pid()});
        writeln!(out, "{line}").and_then(|()| out.flush()).map_err(io_err)?;
    }
    loop {
        let got = read_line_bounded(&mut input, max_request)
            .map_err(|e| JailError::new(Step::Supervise, format!("reading requests: {e}")))?;
        let line = match got {
            None => break,
            Some(Ok(l)) => String::from_utf8_lossy(&l).into_owned(),
            Some(Err((head, len))) => {
                let resp = Response::new(
                    id_from_head(&head),
                    ToolResult::err(format!("request too large: {len} bytes; limit {max_request}")),
                );
                serde_json::to_writer(&mut out, &resp).map_err(|e| io_err(e.into()))?;
                out.write_all(b"\n").map_err(io_err)?;
                out.flush().map_err(io_err)?;
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Err(e) => {
                let id = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
                Response::new(id, ToolResult::err(format!("invalid request line: {e}")))
            }
            Ok(req) => {
                let r = match trail {
                    None => session.call_in(req.thread.as_deref(), &req.id, &req.name, &req.input)?,
                    Some((t, record_calls)) => {
                        if t.refusing() || (record_calls && !t.call_start(&req.id, &req.name, &req.input)) {
                            ToolResult::err(trail_full())
                        } else {
                            t.set_call(Some(&req.id));
                            let t0 = std::time::Instant::now();
                            let r = session.call_in(req.thread.as_deref(), &req.id, &req.name, &req.input);
                            t.set_call(None);
                            let r = r?;
                            if record_calls {
                                let size = r.content.iter().map(crate::tools::Block::size).sum();
                                t.call_end(&req.id, &req.name, r.is_error, t0.elapsed(), size);
                            }
                            r
                        }
                    }
                };
                Response::new(req.id, r)
            }
        };
        serde_json::to_writer(&mut out, &resp).map_err(|e| io_err(e.into()))?;
        out.write_all(b"\n").map_err(io_err)?;
        out.flush().map_err(io_err)?;
    }
    session.end().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_measured_not_kept() {
        let long = format!(
            "{{\"id\": \"c7\", \"name\": \"write\", \"input\": {{\"content\": \"{}\"}}}}\nnext\n",
            "x".repeat(100_000)
        );
        let mut r = std::io::BufReader::with_capacity(1000, long.as_bytes());
        match read_line_bounded(&mut r, 10_000).unwrap() {
            Some(Err((head, len))) => {
                assert_eq!(len, long.find('\n').unwrap());
                assert!(head.len() <= 4096);
                assert_eq!(id_from_head(&head).as_deref(), Some("c7"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(read_line_bounded(&mut r, 10_000).unwrap(), Some(Ok(b"next".to_vec())));
        assert_eq!(read_line_bounded(&mut r, 10_000).unwrap(), None);
        assert_eq!(id_from_head(br#"{"name": "x"}"#), None);
    }
}
