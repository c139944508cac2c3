//! Following a session's audit trail: each new record is counted into the worker's metrics
//! (denied egress, execs) and sent wherever `trail.ship` says — stdout, syslog (`/dev/log`), or
//! an OTLP/HTTP logs endpoint — with the session and work ids added. The trail file is the
//! record; shipping is best effort (a collector that is down loses what it missed, and says so
//! in the worker's log).

use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::trail_watch::Trails;

/// Where records go besides the trail file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sink {
    Stdout,
    /// The local syslog socket (`/dev/log`).
    Syslog(std::path::PathBuf),
    Otlp(String),
}

impl Sink {
    /// The policy's `trail.ship` entries (checked when the policy was read).
    pub(crate) fn from_policy(ship: &[String]) -> Vec<Sink> {
        ship.iter()
            .map(|s| match s.as_str() {
                "stdout" => Sink::Stdout,
                "syslog" => Sink::Syslog("/dev/log".into()),
                url => Sink::Otlp(url.to_owned()),
            })
            .collect()
    }
}

pub(crate) struct Follow {
    pub path: PathBuf,
    pub session_id: String,
    pub work_id: String,
    pub sinks: Vec<Sink>,
    pub metrics: Arc<Metrics>,
    /// Where the offset of what was shipped is kept, so a restarted worker resumes after it
    /// rather than shipping (and counting) the trail again.
    pub mark: PathBuf,
    /// What all followers share: the watch that wakes them, the OTLP client.
    pub trails: Arc<Trails>,
}

/// Follows the trail until `done` turns true, then reads it to its end once more and returns.
pub(crate) async fn follow(f: Follow, mut done: watch::Receiver<bool>) {
    let wake = f.trails.wake_on_write(&f.path);
    let http = f.sinks.iter().any(|s| matches!(s, Sink::Otlp(_))).then(|| f.trails.http()).flatten();
    let len = std::fs::metadata(&f.path).map_or(0, |m| m.len());
    // A mark past the file's end is not this trail's: then everything is shipped.
    let mut offset = std::fs::read_to_string(&f.mark)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .filter(|o| *o <= len)
        .unwrap_or(0);
    let mut partial = Vec::new();
    loop {
        let finished = *done.borrow();
        let path = f.path.clone();
        let from = offset;
        let chunk = tokio::task::spawn_blocking(move || read_from(&path, from)).await.ok().flatten();
        if let Some(bytes) = chunk {
            offset += bytes.len() as u64;
            partial.extend_from_slice(&bytes);
            // Where `partial` starts in the trail: each record's id is its own start, the same
            // whenever it is read, so a receiver can drop a record shipped twice.
            let mut at = offset - partial.len() as u64;
            let end = partial.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let lines: Vec<u8> = partial.drain(..end).collect();
            let mut records = Vec::new();
            for line in lines.split_inclusive(|b| *b == b'\n') {
                let id = format!("{}:{at}", f.work_id);
                at += line.len() as u64;
                let Ok(mut r) = serde_json::from_slice::<Value>(line) else { continue };
                count(&f.metrics, &r);
                if let Value::Object(o) = &mut r {
                    o.insert("session_id".into(), json!(f.session_id));
                    o.insert("work_id".into(), json!(f.work_id));
                    o.insert("record_id".into(), json!(id));
                }
                records.push(r);
            }
            if !records.is_empty() {
                ship(&f.sinks, &records, http).await;
            }
            // Whole lines only: a line cut at the read's end is read again from its start.
            let shipped = offset - partial.len() as u64;
            let tmp = f.mark.with_extension("tmp");
            let _ = std::fs::write(&tmp, shipped.to_string()).and_then(|()| std::fs::rename(&tmp, &f.mark));
        }
        if finished {
            return;
        }
        tokio::select! {
            () = wake.next() => {}
            _ = done.changed() => {}
        }
    }
}

fn read_from(path: &std::path::Path, offset: u64) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut v = Vec::new();
    // At most 4 MiB a round: a burst is shipped in pieces rather than held whole.
    f.take(4 << 20).read_to_end(&mut v).ok()?;
    (!v.is_empty()).then_some(v)
}

fn count(m: &Metrics, r: &Value) {
    match r["event"].as_str() {
        Some("egress") if r["verdict"] == "deny" => m.egress_denied.fetch_add(1, Relaxed),
        Some("egress") => m.egress_allowed.fetch_add(1, Relaxed),
        Some("exec") => m.execs.fetch_add(1, Relaxed),
        Some("truncated") => m.trails_full.fetch_add(1, Relaxed),
        Some("suppressed") => m.trail_records_suppressed.fetch_add(r["egress"].as_u64().unwrap_or(0), Relaxed),
        _ => 0,
    };
}

async fn ship(sinks: &[Sink], records: &[Value], http: Option<&reqwest::Client>) {
    for s in sinks {
        match s {
            Sink::Stdout => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                for r in records {
                    let _ = writeln!(out, "{r}");
                }
                let _ = out.flush();
            }
            Sink::Syslog(path) => {
                if let Err(e) = syslog(path, records) {
                    tracing::warn!(error = %e, socket = %path.display(), "could not send trail records to syslog");
                }
            }
            Sink::Otlp(url) => {
                let Some(http) = http else { continue };
                let body = otlp_body(records);
                match http.post(url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => tracing::warn!(url, status = %r.status(), "the OTLP collector refused trail records"),
                    Err(e) => tracing::warn!(url, error = %e, "could not send trail records to the OTLP collector"),
                }
            }
        }
    }
}

/// One datagram per record to the local syslog socket, RFC 3164 framing, facility local0:
/// warning for denials and a full trail, info for the rest.
fn syslog(path: &std::path::Path, records: &[Value]) -> std::io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    sock.connect(path)?;
    for r in records {
        let sev = if r["verdict"] == "deny" || r["event"] == "truncated" { 4 } else { 6 };
        let msg = format!("<{}>stockade[{}]: {r}", 16 * 8 + sev, std::process::id());
        sock.send(msg.as_bytes())?;
    }
    Ok(())
}

/// An OTLP/HTTP JSON `ExportLogsServiceRequest` of the records: the record as the body, its
/// event, session and tool call as attributes.
pub(crate) fn otlp_body(records: &[Value]) -> Value {
    let attr = |k: &str, v: &Value| v.as_str().map(|s| json!({"key": k, "value": {"stringValue": s}}));
    let logs: Vec<Value> = records
        .iter()
        .map(|r| {
            let nanos = r["ts"]
                .as_str()
                .and_then(|s| crate::util::parse_rfc3339(s).ok())
                .map_or(0, |t| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
            let warn = r["verdict"] == "deny" || r["event"] == "truncated";
            let attrs: Vec<Value> = [
                ("event", &r["event"]),
                ("session.id", &r["session_id"]),
                ("work.id", &r["work_id"]),
                ("tool_use.id", &r["tool_use_id"]),
                // OpenTelemetry's attribute for a record's identity, meant for deduplication.
                ("log.record.uid", &r["record_id"]),
            ]
            .into_iter()
            .filter_map(|(k, v)| attr(k, v))
            .collect();
            json!({
                "timeUnixNano": nanos.to_string(),
                "severityNumber": if warn { 13 } else { 9 },
                "severityText": if warn { "WARN" } else { "INFO" },
                "body": {"stringValue": r.to_string()},
                "attributes": attrs,
            })
        })
        .collect();
    json!({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "stockade"}}]},
        "scopeLogs": [{"scope": {"name": "stockade.trail"}, "logRecords": logs}],
    }]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_count_what_the_trail_records_and_what_it_only_counted() {
        let m = Metrics::default();
        for r in [
            json!({"event": "exec"}),
            json!({"event": "egress", "verdict": "deny"}),
            json!({"event": "suppressed", "egress": 7}),
            json!({"event": "suppressed", "egress": 5}),
        ] {
            count(&m, &r);
        }
        assert_eq!(m.execs.load(Relaxed), 1);
        assert_eq!(m.egress_denied.load(Relaxed), 1);
        assert_eq!(m.trail_records_suppressed.load(Relaxed), 12);
    }

    #[test]
    fn syslog_gets_one_datagram_per_record_with_a_severity_per_kind() {
        let dir = std::env::temp_dir().join(format!("stockade-syslog-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let _ = std::fs::remove_file(&path);
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let records = [
            json!({"event": "exec", "argv": ["true"], "session_id": "sesn_1"}),
            json!({"event": "egress", "verdict": "deny", "dst": "192.0.2.1"}),
        ];
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(ship(&[Sink::Syslog(path.clone())], &records, None));
        let mut buf = [0u8; 4096];
        let n = server.recv(&mut buf).unwrap();
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert_eq!(first, format!("<134>stockade[{}]: {}", std::process::id(), records[0]));
        let n = server.recv(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("<132>stockade["), "a denial is a warning");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_restarted_follower_resumes_after_what_was_shipped() {
        let dir = std::env::temp_dir().join(format!("stockade-follow-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let first = "{\"event\":\"exec\"}\n";
        std::fs::write(&path, format!("{first}{first}{first}")).unwrap();
        let metrics = Arc::new(Metrics::default());
        let spec = |mark: &str| Follow {
            path: path.clone(),
            session_id: "s".into(),
            work_id: "w".into(),
            sinks: Vec::new(),
            metrics: metrics.clone(),
            mark: dir.join(mark),
            trails: Arc::new(Trails::default()),
        };
        let sock_path = dir.join("log.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        sock.set_nonblocking(true).unwrap();
        let received = || {
            let mut ids = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let rec: Value = serde_json::from_str(text.split_once("]: ").unwrap().1).unwrap();
                ids.push(rec["record_id"].as_str().unwrap().to_owned());
            }
            ids
        };
        let spec = |mark: &str| Follow { sinks: vec![Sink::Syslog(sock_path.clone())], ..spec(mark) };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (_tx, rx) = watch::channel(true);
        let n = first.len();
        // Shipped up to the end of the first record before a restart: two are left.
        std::fs::write(dir.join("m1"), n.to_string()).unwrap();
        rt.block_on(follow(spec("m1"), rx.clone()));
        assert_eq!(metrics.execs.load(Relaxed), 2);
        assert_eq!(std::fs::read_to_string(dir.join("m1")).unwrap(), (3 * n).to_string());
        assert_eq!(received(), [format!("w:{n}"), format!("w:{}", 2 * n)]);
        // Nothing shipped yet, or a mark that is not this trail's: all of it, each record under
        // the id it had the first time.
        std::fs::write(dir.join("m2"), "999999").unwrap();
        rt.block_on(follow(spec("m2"), rx));
        assert_eq!(metrics.execs.load(Relaxed), 5);
        assert_eq!(received(), ["w:0".to_owned(), format!("w:{n}"), format!("w:{}", 2 * n)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn otlp_bodies_carry_each_record_whole_with_its_ids() {
        let r = json!({"ts": "2026-12-01T10:00:00.000Z", "event": "egress", "verdict": "deny",
                       "session_id": "sesn_1", "work_id": "work_2", "tool_use_id": "toolu_3",
                       "record_id": "work_2:512"});
        let b = otlp_body(std::slice::from_ref(&r));
        let log = &b["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0];
        assert_eq!(log["body"]["stringValue"], r.to_string());
        assert_eq!(log["severityText"], "WARN");
        assert_eq!(log["timeUnixNano"], "1796119200000000000");
        let keys: Vec<&str> =
            log["attributes"].as_array().unwrap().iter().map(|a| a["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["event", "session.id", "work.id", "tool_use.id", "log.record.uid"]);
        assert_eq!(log["attributes"][4]["value"]["stringValue"], "work_2:512");
    }
}
