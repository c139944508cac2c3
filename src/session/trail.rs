//! A session's audit trail: one JSON object per line, appended as things happen — the session's
//! start and end, each tool call, each program executed in the jail, each connection attempt,
//! each file left in the outputs directory.
//!
//! Two processes write one session's trail (the worker its calls, start, end and outputs; the
//! session process the jail's execs and connections). Each record is one `write` to a file opened
//! with `O_APPEND`, so records never interleave. Before anything is written, every string of a
//! record — keys too — goes through the redactor: the literal secrets the writer was given and
//! the policy's `trail.redact` patterns become `[REDACTED]`. A trail never grows past
//! `trail.max_size` (plus one closing record): then it is marked truncated and records nothing
//! more, or, with `trail.on_full = "fail"`, refuses — no program starts, no tool call runs.

use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::jail::execwatch::{Exec, Observer, Target};
use crate::policy::{OnFull, Trail as TrailPolicy};

/// What replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

/// Why a trail cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    #[error("trail {}: {source}", path.display())]
    Open { path: std::path::PathBuf, source: std::io::Error },
    /// A `trail.redact` pattern that reads as a regular expression but does not compile (its
    /// compiled size exceeds the regex crate's limit).
    #[error("trail.redact `{pattern}`: {source}")]
    Pattern { pattern: String, source: regex::Error },
}

/// Replaces secrets in text: literal values first, then the policy's patterns.
#[derive(Debug, Clone)]
pub(crate) struct Redactor {
    literals: Vec<String>,
    patterns: Arc<[regex::Regex]>,
}

/// The policy's patterns compiled, shared by every trail the process opens with the same list: a
/// worker's sessions all have its policy, and a compiled set with its match caches is ~100 KiB —
/// per session, the largest part of an idle session's cost to the worker. Shared, not cloned: a
/// cloned `Regex` gets caches of its own.
fn compiled(patterns: &[String]) -> Result<Arc<[regex::Regex]>, TrailError> {
    type Compiled = (Vec<String>, Arc<[regex::Regex]>);
    static LAST: Mutex<Option<Compiled>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((p, c)) = &*last {
        if p.as_slice() == patterns {
            return Ok(c.clone());
        }
    }
    let c: Arc<[regex::Regex]> = patterns
        .iter()
        .map(|p| regex::Regex::new(p).map_err(|source| TrailError::Pattern { pattern: p.clone(), source }))
        .collect::<Result<Vec<_>, _>>()?
        .into();
    *last = Some((patterns.to_vec(), c.clone()));
    Ok(c)
}

impl Redactor {
    /// `patterns` were checked when the policy was read; one that still fails to compile (a
    /// size limit) is an error rather than a pattern silently skipped.
    pub(crate) fn new(literals: Vec<String>, patterns: &[String]) -> Result<Redactor, TrailError> {
        let patterns = compiled(patterns)?;
        // Short literals would redact ordinary words; a credential is never this short.
        let literals = literals.into_iter().filter(|l| l.len() >= 8).collect();
        Ok(Redactor { literals, patterns })
    }

    /// `s` with the redactor's secrets and `more` literal ones replaced.
    fn text_with(&self, s: &str, more: &[String]) -> String {
        let mut out = s.to_owned();
        for l in self.literals.iter().chain(more.iter().filter(|l| l.len() >= 8)) {
            if out.contains(l.as_str()) {
                out = out.replace(l.as_str(), REDACTED);
            }
        }
        for p in self.patterns.iter() {
            if !p.is_match(&out) {
                continue;
            }
            // A pattern with a group named `secret` names the secret within its match (a
            // `token=VALUE`'s value): only that is replaced, and what names it stays as evidence.
            if p.capture_names().any(|n| n == Some("secret")) {
                let mut kept = String::with_capacity(out.len());
                let mut at = 0;
                for c in p.captures_iter(&out) {
                    if let Some(m) = c.name("secret") {
                        kept.push_str(&out[at..m.start()]);
                        kept.push_str(REDACTED);
                        at = m.end();
                    }
                }
                kept.push_str(&out[at..]);
                out = kept;
            } else {
                out = p.replace_all(&out, REDACTED).into_owned();
            }
        }
        out
    }

    #[cfg(test)]
    fn value(&self, v: &mut Value) {
        self.value_with(v, &[])
    }

    fn value_with(&self, v: &mut Value, more: &[String]) {
        match v {
            Value::String(s) => *s = self.text_with(s, more),
            Value::Array(a) => a.iter_mut().for_each(|x| self.value_with(x, more)),
            Value::Object(o) => {
                let taken = std::mem::take(o);
                for (k, mut x) in taken {
                    self.value_with(&mut x, more);
                    o.insert(self.text_with(&k, more), x);
                }
            }
            _ => {}
        }
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One writer of a session's trail.
pub struct TrailWriter {
    file: Mutex<File>,
    max: u64,
    on_full: OnFull,
    input_max: usize,
    redactor: Redactor,
    /// The tool calls in flight, which the jail's execs and connections belong to.
    call: Mutex<Vec<String>>,
    /// This writer has seen the trail full.
    full: AtomicBool,
    /// A secret that may change while the session runs (the environment key, which rotates),
    /// asked for at each record.
    current_secret: Option<SecretSource>,
    /// `trail.max_rate`: what the jail's own records may add per second.
    pace: Option<Pace>,
    /// Egress records left out over `max_rate` since the last one written.
    suppressed: std::sync::atomic::AtomicU64,
}

/// A byte budget that fills at `rate` a second, up to one second's worth.
struct Pace {
    rate: f64,
    state: Mutex<(f64, std::time::Instant)>,
}

impl Pace {
    fn new(rate: u64) -> Pace {
        Pace { rate: rate as f64, state: Mutex::new((rate as f64, std::time::Instant::now())) }
    }

    /// Takes `n` bytes of budget. With `wait`, always, and returns how long to wait before
    /// writing (the budget goes into debt, so waiters queue up in order); without, only when
    /// there is enough, and `None` otherwise.
    fn take(&self, n: usize, wait: bool) -> Option<std::time::Duration> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let (tokens, at) = &mut *st;
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        let n = n as f64;
        if *tokens >= n {
            *tokens -= n;
            return Some(std::time::Duration::ZERO);
        }
        if !wait {
            return None;
        }
        *tokens -= n;
        Some(std::time::Duration::from_secs_f64(-*tokens / self.rate))
    }
}

/// Where a writer asks for a secret that may change.
pub(crate) type SecretSource = Box<dyn Fn() -> String + Send + Sync>;

impl TrailWriter {
    /// Opens (creating, mode 0600) the trail at `path` for appending. `literals` are secrets to
    /// redact wherever they appear (the environment key, the work item's secret).
    pub fn open(path: &Path, policy: &TrailPolicy, literals: Vec<String>) -> Result<TrailWriter, TrailError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| TrailError::Open { path: path.to_owned(), source })?;
        Ok(TrailWriter {
            file: Mutex::new(file),
            max: policy.max_size.0,
            on_full: policy.on_full,
            input_max: policy.input_max as usize,
            redactor: Redactor::new(literals, &policy.redact)?,
            pace: policy.max_rate.map(|r| Pace::new(r.0)),
            suppressed: std::sync::atomic::AtomicU64::new(0),
            call: Mutex::new(Vec::new()),
            full: AtomicBool::new(false),
            current_secret: None,
        })
    }

    /// Also redacts whatever `source` returns at the time of each record.
    pub fn redact_current(mut self, source: SecretSource) -> TrailWriter {
        self.current_secret = Some(source);
        self
    }

    fn more_secrets(&self) -> Vec<String> {
        self.current_secret.as_ref().map(|f| vec![f()]).unwrap_or_default()
    }

    /// A tool call began running in the jail: what happens there until it ends may be its doing.
    pub fn call_began(&self, id: &str) {
        self.call.lock().unwrap_or_else(|e| e.into_inner()).push(id.to_owned());
    }

    pub fn call_ended(&self, id: &str) {
        self.call.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c != id);
    }

    /// Adds whose doing a record may be: `tool_use_id`, the call running when it happened
    /// (`null` when none or several ran), and with several running, `tool_use_ids`, all of them.
    fn attribute(&self, mut m: Map<String, Value>) -> Map<String, Value> {
        let calls = self.call.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match calls.as_slice() {
            [one] => m.insert("tool_use_id".into(), json!(one)),
            [] => m.insert("tool_use_id".into(), Value::Null),
            several => {
                m.insert("tool_use_id".into(), Value::Null);
                m.insert("tool_use_ids".into(), json!(several))
            }
        };
        m
    }

    /// True when the trail is full and the policy says to refuse what it cannot record.
    pub fn refusing(&self) -> bool {
        self.on_full == OnFull::Fail && self.full.load(Ordering::Relaxed)
    }

    /// Appends one record (`ts`, `event` and `fields`, redacted). `false` when the
    /// trail is full and `on_full = "fail"`: the caller must not do what was to be recorded.
    pub fn record(&self, event: &str, fields: Map<String, Value>) -> bool {
        self.write(&self.line(event, fields))
    }

    fn line(&self, event: &str, fields: Map<String, Value>) -> Vec<u8> {
        let mut rec = Map::new();
        rec.insert("ts".into(), Value::String(crate::util::rfc3339(std::time::SystemTime::now())));
        rec.insert("event".into(), Value::String(event.into()));
        rec.extend(fields);
        let mut rec = Value::Object(rec);
        self.redactor.value_with(&mut rec, &self.more_secrets());
        let mut line = serde_json::to_vec(&rec).expect("JSON values serialise");
        line.push(b'\n');
        line
    }

    /// A record of what the jail did, within `trail.max_rate`: one that must not be lost (an
    /// exec, which waits for it) is written once its bytes fit the budget, holding up its
    /// caller until then; one that may be (`may_drop`: an egress record, which nothing can hold
    /// up) is counted instead, and the count is written with the next record that fits.
    fn record_paced(&self, event: &str, fields: Map<String, Value>, may_drop: bool) -> bool {
        let line = self.line(event, fields);
        let Some(pace) = &self.pace else { return self.write(&line) };
        match pace.take(line.len(), !may_drop) {
            None => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Some(wait) if !wait.is_zero() => std::thread::sleep(wait),
            Some(_) => {}
        }
        let left_out = self.suppressed.swap(0, Ordering::Relaxed);
        if left_out > 0 {
            let rate = self.pace.as_ref().map_or(0, |p| p.rate as u64);
            let m = obj(json!({"egress": left_out, "max_rate": rate}));
            if !self.write(&self.line("suppressed", m)) {
                return false;
            }
        }
        self.write(&line)
    }

    fn write(&self, line: &[u8]) -> bool {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if self.full.load(Ordering::Relaxed) {
            return self.on_full == OnFull::Truncate;
        }
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        if size + line.len() as u64 <= self.max {
            let Err(e) = f.write_all(line) else { return true };
            // A write that fails (a full disk) is a trail that cannot hold more: with
            // `on_full = "fail"` nothing runs unrecorded from here on.
            tracing::error!(error = %e, "could not append to the audit trail");
            if self.on_full == OnFull::Fail {
                self.full.store(true, Ordering::Relaxed);
                return false;
            }
            return true;
        }
        self.full.store(true, Ordering::Relaxed);
        if !ends_with_marker(&mut f) {
            let marker = json!({
                "ts": crate::util::rfc3339(std::time::SystemTime::now()),
                "event": "truncated",
                "limit": self.max,
                "on_full": match self.on_full { OnFull::Truncate => "truncate", OnFull::Fail => "fail" },
            });
            let _ = f.write_all(format!("{marker}\n").as_bytes());
        }
        tracing::warn!(limit = self.max, "the session's audit trail is full (trail.max_size)");
        self.on_full == OnFull::Truncate
    }

    /// Records a tool call before it runs: `false` (a full trail that refuses) means it must not
    /// run. The input is cut to `trail.input_max` bytes after redaction, so a cut never leaves
    /// half a secret that the patterns no longer match.
    pub fn call_start(&self, id: &str, name: &str, input: &Value) -> bool {
        let mut input = input.clone();
        self.redactor.value_with(&mut input, &self.more_secrets());
        let text = input.to_string();
        let mut m = Map::new();
        m.insert("tool_use_id".into(), json!(id));
        m.insert("name".into(), json!(name));
        if text.len() > self.input_max {
            m.insert("input".into(), Value::String(cut(&text, self.input_max).to_owned()));
            m.insert("input_truncated".into(), json!(true));
            m.insert("input_bytes".into(), json!(text.len()));
        } else {
            m.insert("input".into(), input);
        }
        self.record("tool_call", m)
    }

    /// Records how a tool call ended.
    pub fn call_end(&self, id: &str, name: &str, is_error: bool, duration: std::time::Duration, output_bytes: usize) {
        self.record(
            "tool_result",
            obj(json!({
                "tool_use_id": id,
                "name": name,
                "is_error": is_error,
                "duration_ms": (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0,
                "output_bytes": output_bytes,
            })),
        );
    }
}

/// Whether the trail's last line is already the full-trail marker (the other writer's).
fn ends_with_marker(f: &mut File) -> bool {
    let Ok(len) = f.metadata().map(|m| m.len()) else { return false };
    let from = len.saturating_sub(256);
    let mut tail = Vec::new();
    let ok = f.seek(SeekFrom::Start(from)).is_ok() && f.read_to_end(&mut tail).is_ok();
    ok && String::from_utf8_lossy(&tail).lines().last().is_some_and(|l| l.contains("\"event\":\"truncated\""))
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl Observer for TrailWriter {
    fn exec(&self, e: &Exec) -> bool {
        let m = obj(json!({
            "pid": e.pid,
            "host_pid": e.host_pid,
            "path": e.path,
            "argv": e.argv,
            "argv_truncated": e.argv_truncated,
            "cwd": e.cwd,
        }));
        let mut m = self.attribute(m);
        if let Some(d) = e.dirfd {
            m.insert("dirfd".into(), json!(d));
        }
        if let Some(t) = &e.target {
            m.insert("dev".into(), json!(t.dev));
            m.insert("ino".into(), json!(t.ino));
            if let Some(fd) = &t.fd {
                m.insert("fd".into(), json!(fd));
            }
        }
        self.record_paced("exec", m, false)
    }

    fn exec_differs(&self, host_pid: u32, recorded: &Target, exe: &str, dev: u64, ino: u64) {
        let m = obj(json!({
            "host_pid": host_pid,
            "recorded": {"dev": recorded.dev, "ino": recorded.ino},
            "runs": {"exe": exe, "dev": dev, "ino": ino},
        }));
        self.record_paced("exec_differs", self.attribute(m), false);
    }

    fn egress(&self, allowed: bool, proto: &str, dst: std::net::Ipv4Addr, dport: Option<u16>) {
        let m = obj(json!({
            "verdict": if allowed { "allow" } else { "deny" },
            "proto": proto,
            "dst": dst.to_string(),
            "dport": dport,
        }));
        self.record_paced("egress", self.attribute(m), true);
    }
}

/// Every event a trail records (the README's table lists them in this order).
pub const EVENTS: &[&str] = &[
    "session_start",
    "tool_call",
    "tool_result",
    "exec",
    "exec_differs",
    "egress",
    "provision",
    "memory",
    "output_file",
    "session_end",
    "truncated",
    "suppressed",
];

/// The jail watcher that records into `trail`, as the policy's `[trail]` asks. Its work on the
/// session's execs is held to half the session's `limits.cpu` (half a core without one).
pub fn watcher(trail: std::sync::Arc<TrailWriter>, policy: &crate::policy::Policy) -> crate::jail::Watcher {
    crate::jail::Watcher {
        observer: trail,
        exec: policy.trail.exec,
        limits: crate::jail::execwatch::Limits {
            argv_bytes: policy.trail.argv_max as usize,
            max_args: 4096,
            cpu_share: policy.limits.cpu.map_or(0.5, |c| c / 2.0),
        },
    }
}

/// Reads a trail back: its records, in order. A line that is not JSON (a trail cut by a crash
/// mid-write, or edited) is returned as an `unreadable` record rather than dropped.
pub fn read(path: &Path) -> std::io::Result<Vec<Value>> {
    let text = std::fs::read(path)?;
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| json!({"event": "unreadable", "line": l})))
        .collect())
}

/// The first and the last record of a trail file, read from its two ends only.
pub fn ends(path: &Path) -> (Option<Value>, Option<Value>) {
    use std::io::{BufRead, Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return (None, None) };
    let mut first = String::new();
    let _ = std::io::BufReader::new(&mut f).take(1 << 20).read_line(&mut first);
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10))).and_then(|_| f.read_to_end(&mut tail));
    let last = tail.split(|b| *b == b'\n').rfind(|l| !l.is_empty()).and_then(|l| serde_json::from_slice(l).ok());
    (serde_json::from_str(first.trim_end()).ok(), last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TrailPolicy {
        crate::policy::load_builtin("default").unwrap().0.trail
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Past `max_rate`, egress records are counted, never lost without a trace: each is either
    /// written or in the count of a `suppressed` record, written with the next record that fits.
    #[test]
    fn egress_past_the_rate_is_counted_not_lost() {
        let dir = std::env::temp_dir().join(format!("stockade-pace-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let t =
            TrailWriter::open(&dir, &TrailPolicy { max_rate: Some(crate::policy::Size(16 << 10)), ..policy() }, vec![])
                .unwrap();
        let sent = 2000;
        for i in 0..sent {
            t.egress(false, "tcp", std::net::Ipv4Addr::new(10, 0, 0, 1), Some(i as u16));
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
        t.egress(true, "tcp", std::net::Ipv4Addr::new(10, 0, 0, 2), Some(443));
        let recs = lines(&dir);
        let _ = std::fs::remove_file(&dir);
        let written = recs.iter().filter(|r| r["event"] == "egress").count() as u64;
        let counted: u64 =
            recs.iter().filter(|r| r["event"] == "suppressed").map(|r| r["egress"].as_u64().unwrap()).sum();
        assert!(written < sent, "{written} of {sent} written: the rate held nothing back");
        assert_eq!(written + counted, sent + 1, "{recs:?}");
        let bytes: usize = recs.iter().map(|r| r.to_string().len() + 1).sum();
        assert!(bytes <= 2 * (16 << 10) + 1024, "{bytes} bytes in about a second at 16K/s");
    }

    /// An exec's record is never dropped: past `max_rate` the exec waits until it fits, so the
    /// records of a flood are spread out at the rate.
    #[test]
    fn execs_past_the_rate_wait_for_their_records() {
        let dir = std::env::temp_dir().join(format!("stockade-pace-exec-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let t =
            TrailWriter::open(&dir, &TrailPolicy { max_rate: Some(crate::policy::Size(16 << 10)), ..policy() }, vec![])
                .unwrap();
        let e = Exec {
            pid: 2,
            host_pid: 99,
            path: "/bin/true".into(),
            dirfd: None,
            argv: vec!["true".into(), "x".repeat(2000)],
            argv_truncated: false,
            cwd: "/workspace".into(),
            target: None,
        };
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            assert!(t.exec(&e));
        }
        let took = t0.elapsed();
        let recs = lines(&dir);
        let _ = std::fs::remove_file(&dir);
        assert_eq!(recs.iter().filter(|r| r["event"] == "exec").count(), 20);
        let bytes: usize = recs.iter().map(|r| r.to_string().len() + 1).sum();
        // One second's worth may go at once; the rest only as the budget fills.
        let least = (bytes - (16 << 10)) as f64 / (16 << 10) as f64;
        assert!(took.as_secs_f64() >= least * 0.95, "{bytes} bytes written in {took:?} at 16K/s");
    }

    #[test]
    fn secrets_are_redacted_in_values_and_keys() {
        let r = Redactor::new(vec!["env-key-0123456789".into(), "short".into()], &policy().redact).unwrap();
        let mut v = json!({
            "command": "curl -H 'x-api-key: env-key-0123456789' https://x; export AWS=AKIAABCDEFGHIJKLMNOP",
            "nested": ["password=hunter2 rest", {"sk-ant-api03-aaaaaaaaaaaaaaaaaaaa": "short"}],
        });
        r.value(&mut v);
        let s = v.to_string();
        assert!(!s.contains("env-key-0123456789"), "{s}");
        assert!(!s.contains("AKIAABCDEFGHIJKLMNOP"), "{s}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(!s.contains("sk-ant-api03"), "{s}");
        assert!(s.contains("rest") && s.contains("short"), "{s}");
        assert_eq!(s.matches(REDACTED).count(), 4, "{s}");
    }

    #[test]
    fn redaction_removes_the_secret_and_keeps_the_evidence_around_it() {
        let r = Redactor::new(vec![], &policy().redact).unwrap();
        let mut v = json!({
            "path": "/dev/shm/token=x/evil",
            "cwd": "/tmp/password=hunter22/deeper/dir",
            "argv": ["curl", "-d", "password=a/b/c", "--header", "api-key: sk-live-123", "DB_PASSWORD=hunter22"],
        });
        r.value(&mut v);
        assert_eq!(v["path"], "/dev/shm/token=[REDACTED]/evil");
        assert_eq!(v["cwd"], "/tmp/password=[REDACTED]/deeper/dir");
        // Outside a path a value runs to the next separator, slashes included.
        assert_eq!(v["argv"][2], "password=[REDACTED]");
        assert_eq!(v["argv"][4], "api-key: [REDACTED]");
        assert_eq!(v["argv"][5], "DB_PASSWORD=[REDACTED]");
    }

    #[test]
    fn a_trail_that_cannot_be_opened_names_its_path_and_pattern() {
        let dir = std::env::temp_dir().join(format!("stockade-trail-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A symlink planted where the trail goes is refused, not followed.
        let link = dir.join("t.jsonl");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let e = TrailWriter::open(&link, &policy(), vec![]).err().expect("opened through a symlink");
        assert!(matches!(&e, TrailError::Open { source, .. } if source.raw_os_error() == Some(libc::ELOOP)), "{e}");
        assert!(e.to_string().starts_with(&format!("trail {}: ", link.display())), "{e}");
        // Valid syntax whose compiled program is over the regex crate's size limit.
        let mut p = policy();
        p.redact = vec!["\\w{1000}\\w{1000}".into()];
        let e = TrailWriter::open(&dir.join("u.jsonl"), &p, vec![]).err().expect("compiled an oversized pattern");
        assert!(matches!(&e, TrailError::Pattern { pattern, .. } if *pattern == p.redact[0]), "{e}");
        assert!(e.to_string().starts_with("trail.redact `\\w{1000}\\w{1000}`: "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_secret_that_changes_is_redacted_as_it_is_now() {
        let dir = std::env::temp_dir().join(format!("stockade-trail-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let key = std::sync::Arc::new(Mutex::new("first-key-0123456789".to_owned()));
        let k = key.clone();
        let t = TrailWriter::open(&path, &policy(), vec![])
            .unwrap()
            .redact_current(Box::new(move || k.lock().unwrap().clone()));
        t.call_start("c1", "bash", &json!({"command": "echo first-key-0123456789"}));
        *key.lock().unwrap() = "second-key-0123456789".into();
        t.call_start("c2", "bash", &json!({"command": "echo second-key-0123456789"}));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("first-key") && !text.contains("second-key"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_trail_is_marked_once_or_refuses() {
        let dir = std::env::temp_dir().join(format!("stockade-trail-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (on_full, expect) in [(OnFull::Truncate, true), (OnFull::Fail, false)] {
            let path = dir.join(format!("{on_full:?}.jsonl"));
            let _ = std::fs::remove_file(&path);
            let mut p = policy();
            p.max_size = crate::policy::Size(64 << 10);
            p.on_full = on_full;
            let a = TrailWriter::open(&path, &p, vec![]).unwrap();
            let b = TrailWriter::open(&path, &p, vec![]).unwrap();
            let big = "x".repeat(1000);
            let mut n = 0;
            while a.record("note", obj(json!({"text": big}))) && !a.full.load(Ordering::Relaxed) {
                n += 1;
            }
            assert!(n > 50 && n < 66, "{n} records before full");
            assert_eq!(b.record("note", obj(json!({"text": big}))), expect);
            assert_eq!(b.refusing(), !expect);
            let recs = read(&path).unwrap();
            let markers = recs.iter().filter(|r| r["event"] == "truncated").count();
            assert_eq!(markers, 1, "one marker whoever saw it first");
            assert_eq!(recs.last().unwrap()["event"], "truncated");
            assert!(std::fs::metadata(&path).unwrap().len() <= (64 << 10) + 256);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
