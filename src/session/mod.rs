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
mod lane;
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

/// What goes to a session: a tool call, or a stop for a call that runs (`{"stop": ID}`), which
/// ends it at once with the runner's text for a stopped call. A stop for a call that is not
/// running does nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Inbound {
    Call(Request),
    Stop { stop: String },
}

/// A tool result, tagged with its call's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Response {
    pub id: Option<String>,
    pub content: Vec<crate::tools::Block>,
    pub is_error: bool,
    /// From a lane to PID 1 only: where its shell saved its last long output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_output: Option<std::path::PathBuf>,
    /// A `write` or `edit` into a memory store's folder, not made: the caller saves it to the
    /// store, writes the file and answers the call (`content` is empty then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_write: Option<Box<crate::tools::MemoryWrite>>,
}

impl Response {
    pub(crate) fn new(id: impl Into<Option<String>>, r: ToolResult) -> Response {
        Response { id: id.into(), content: r.content, is_error: r.is_error, saved_output: None, memory_write: None }
    }

    /// A file tool's answer: its result, or the memory write it leaves to the caller.
    pub(crate) fn of(id: impl Into<Option<String>>, a: crate::tools::FileAnswer) -> Response {
        match a {
            crate::tools::FileAnswer::Done(r) => Response::new(id, r),
            crate::tools::FileAnswer::Memory(m) => Response {
                id: id.into(),
                content: Vec::new(),
                is_error: false,
                saved_output: None,
                memory_write: Some(Box::new(m)),
            },
        }
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

    /// Stops a call that runs (in another thread of the caller's): it ends at once with the
    /// runner's text for a stopped call.
    pub fn stop(&mut self, id: &str) -> std::io::Result<()> {
        frame::write(&mut self.0, &Inbound::Stop { stop: id.to_owned() })
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

/// The calls a JSON-lines session has in flight: id → tool and start.
#[derive(Default)]
struct Flight {
    calls: std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>,
    /// Set when the jail's answers end: nothing in flight will be answered any more.
    gone: std::sync::atomic::AtomicBool,
    changed: std::sync::Condvar,
}

impl Flight {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (String, std::time::Instant)>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until nothing is in flight or the jail is gone.
    fn drain(&self) {
        let mut calls = self.lock();
        while !calls.is_empty() && !self.gone.load(std::sync::atomic::Ordering::SeqCst) {
            calls = self.changed.wait(calls).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn emit<W: Write>(out: &std::sync::Mutex<W>, resp: &Response) -> std::io::Result<()> {
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    serde_json::to_writer(&mut *out, resp)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// One input line, taken apart: a call, a stop, or a line to answer with an error.
fn parse_line(line: &str) -> Result<Inbound, Response> {
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(line) {
        if let (Some(serde_json::Value::String(id)), None) = (o.get("stop"), o.get("name")) {
            return Ok(Inbound::Stop { stop: id.clone() });
        }
    }
    serde_json::from_str::<Request>(line).map(Inbound::Call).map_err(|e| {
        let id = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
        Response::new(id, ToolResult::err(format!("invalid request line: {e}")))
    })
}

/// `stockade session`: one JSON object per input line (`{"id", "name", "input"}`, and
/// `"thread"` for a session thread other than the primary one), one result per output line
/// (`{"id", "content", "is_error"}`). Calls of one thread run in order, one at a time; calls of
/// different threads run at the same time, and their results come as they finish. A line
/// `{"stop": ID}` stops that call if it runs. EOF ends the session once every call is answered.
/// A line that is not a valid request gets an error result and the session goes on, and so does
/// one longer than `max_request` bytes, which is never held in memory whole. With `announce`, a
/// first line `{"ready": true, "pid": N}` tells the caller that the jail is built.
///
/// With a trail, what the jail runs is attributed to the calls in flight, and calls are
/// recorded too when `record_calls` (a worker records its calls itself).
pub fn run_json_lines<R: std::io::Read + std::os::fd::AsFd, W: Write + Send>(
    spec: &JailSpec,
    input: R,
    out: W,
    announce: bool,
    max_request: usize,
    trail: Option<(&trail::TrailWriter, bool)>,
) -> Result<(), JailError> {
    let io_err = |e: std::io::Error| JailError::new(Step::Supervise, format!("writing results: {e}"));
    let gone_err = || JailError::new(Step::Supervise, "session jail is gone".to_owned());
    let Session { jail, chan } = Session::start(spec)?;
    let out = std::sync::Mutex::new(out);
    if announce {
        let line = serde_json::json!({"ready": true, "pid": jail.pid()});
        let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(o, "{line}").and_then(|()| o.flush()).map_err(io_err)?;
    }
    let mut to_jail = chan.0;
    let mut from_jail =
        to_jail.try_clone().map_err(|e| JailError::new(Step::Supervise, format!("the session's channel: {e}")))?;
    // Readable once the jail's answers end, so that waiting for input does not outlive the jail.
    let (gone_r, gone_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| JailError::new(Step::Supervise, format!("pipe: {e}")))?;
    let flight = Flight::default();
    let relayed = std::thread::scope(|s| {
        s.spawn(|| {
            let gone_w = gone_w;
            while let Ok(Some(resp)) = frame::read::<_, Response>(&mut from_jail) {
                let Some(id) = resp.id.clone() else { continue };
                let Some((name, t0)) = flight.lock().remove(&id) else { continue };
                if let Some((t, record_calls)) = trail {
                    t.call_ended(&id);
                    if record_calls {
                        let size = resp.content.iter().map(crate::tools::Block::size).sum();
                        t.call_end(&id, &name, resp.is_error, t0.elapsed(), size);
                    }
                }
                let written = emit(&out, &resp);
                flight.changed.notify_all();
                if written.is_err() {
                    break;
                }
            }
            flight.gone.store(true, std::sync::atomic::Ordering::SeqCst);
            flight.changed.notify_all();
            drop(gone_w);
        });
        let r = relay_requests(input, &mut to_jail, &out, &flight, gone_r, max_request, trail);
        if r.is_ok() {
            flight.drain();
        }
        // PID 1 sees EOF, ends every lane and exits; the answers' reader then ends too.
        let _ = to_jail.shutdown(std::net::Shutdown::Both);
        r
    });
    let gone = flight.gone.load(std::sync::atomic::Ordering::SeqCst) && !flight.lock().is_empty();
    let ended = jail.wait();
    match relayed {
        Err(Relay::Out(e)) => Err(io_err(e)),
        Err(Relay::In(e)) => Err(JailError::new(Step::Supervise, format!("reading requests: {e}"))),
        Err(Relay::Gone) => Err(gone_err()),
        Ok(()) if gone => Err(gone_err()),
        Ok(()) => ended.map(|_| ()),
    }
}

/// Why relaying requests stopped early.
enum Relay {
    In(std::io::Error),
    Out(std::io::Error),
    Gone,
}

/// Reads requests until EOF and hands each to the jail, answering at once those that cannot
/// go (invalid, too long, an unknown tool, an id already in flight, a full trail).
fn relay_requests<R: std::io::Read + std::os::fd::AsFd, W: Write>(
    input: R,
    to_jail: &mut UnixStream,
    out: &std::sync::Mutex<W>,
    flight: &Flight,
    gone: std::os::fd::OwnedFd,
    max_request: usize,
    trail: Option<(&trail::TrailWriter, bool)>,
) -> Result<(), Relay> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut input = std::io::BufReader::new(input);
    let answer = |resp: Response| emit(out, &resp).map_err(Relay::Out);
    loop {
        if input.buffer().is_empty() {
            let ready = loop {
                let mut fds = [
                    PollFd::new(input.get_ref().as_fd(), PollFlags::POLLIN),
                    PollFd::new(gone.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => break fds.map(|f| f.revents().is_some_and(|e| !e.is_empty())),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(Relay::In(e.into())),
                }
            };
            if ready[1] && !ready[0] {
                return Err(Relay::Gone);
            }
        }
        let line = match read_line_bounded(&mut input, max_request).map_err(Relay::In)? {
            None => return Ok(()),
            Some(Ok(l)) => String::from_utf8_lossy(&l).into_owned(),
            Some(Err((head, len))) => {
                let r = ToolResult::err(format!("request too large: {len} bytes; limit {max_request}"));
                answer(Response::new(id_from_head(&head), r))?;
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let req = match parse_line(&line) {
            Err(resp) => {
                answer(resp)?;
                continue;
            }
            Ok(stop @ Inbound::Stop { .. }) => {
                frame::write(to_jail, &stop).map_err(|_| Relay::Gone)?;
                continue;
            }
            Ok(Inbound::Call(req)) => req,
        };
        if !TOOLS.contains(&req.name.as_str()) {
            answer(Response::new(req.id, ToolResult::err(unknown_tool(&req.name))))?;
            continue;
        }
        if flight.lock().contains_key(&req.id) {
            answer(Response::new(
                req.id.clone(),
                ToolResult::err(format!("a call with id {:?} is already running", req.id)),
            ))?;
            continue;
        }
        if let Some((t, record_calls)) = trail {
            if t.refusing() || (record_calls && !t.call_start(&req.id, &req.name, &req.input)) {
                answer(Response::new(req.id, ToolResult::err(trail_full())))?;
                continue;
            }
            t.call_began(&req.id);
        }
        flight.lock().insert(req.id.clone(), (req.name.clone(), std::time::Instant::now()));
        if frame::write(to_jail, &Inbound::Call(req)).is_err() {
            return Err(Relay::Gone);
        }
    }
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
