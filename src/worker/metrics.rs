//! Prometheus text-format metrics, kept by hand: a few counters, gauges and histograms do not
//! justify a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
pub struct Metrics {
    pub active_sessions: AtomicI64,
    pub claims: AtomicU64,
    pub heartbeat_failures: AtomicU64,
    pub lease_losses: AtomicU64,
    pub result_post_retries: AtomicU64,
    pub jail_build_failures: AtomicU64,
    /// Sessions waiting for one of the `--max-jail-builds` slots to build their jail.
    pub jail_builds_waiting: AtomicI64,
    /// Connection attempts the sessions' egress filters denied / allowed (from their trails).
    pub egress_denied: AtomicU64,
    pub egress_allowed: AtomicU64,
    /// Programs executed in session jails (from their trails).
    pub execs: AtomicU64,
    /// Trails that filled up (`trail.max_size`).
    pub trails_full: AtomicU64,
    /// Egress records a trail counted instead of writing (`trail.max_rate`).
    pub trail_records_suppressed: AtomicU64,
    /// The state directory's free bytes, and what the sessions' images may still take of them.
    pub state_free_bytes: AtomicU64,
    pub images_owed_bytes: AtomicU64,
    /// 1 while no new session is taken for want of room for its images.
    pub admission_paused: AtomicI64,
    /// Sessions ended because their images could have lost writes.
    pub sessions_ended_for_room: AtomicU64,
    /// Results that could not be saved in the outbox before they were posted.
    pub outbox_failures: AtomicU64,
    polls: Mutex<BTreeMap<&'static str, u64>>,
    tool_calls: Mutex<BTreeMap<(String, &'static str), u64>>,
    tool_latency: Mutex<BTreeMap<String, Histogram>>,
    jail_build: Mutex<Histogram>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// `outcome`: item, empty or error.
    pub fn poll(&self, outcome: &'static str) {
        *lock(&self.polls).entry(outcome).or_default() += 1;
    }

    pub fn tool_call(&self, tool: &str, is_error: bool, took: Duration) {
        let outcome = if is_error { "error" } else { "ok" };
        // Tool names come from the agent: keep the label set bounded.
        let tool = if crate::tools::TOOLS.contains(&tool) { tool } else { "unknown" };
        *lock(&self.tool_calls).entry((tool.to_owned(), outcome)).or_default() += 1;
        lock(&self.tool_latency).entry(tool.to_owned()).or_default().observe(took.as_secs_f64());
    }

    pub fn jail_built(&self, took: Duration) {
        lock(&self.jail_build).observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let mut simple = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        simple(
            "stockade_active_sessions",
            "gauge",
            "Sessions with a live jail.",
            self.active_sessions.load(Relaxed).to_string(),
        );
        simple("stockade_claims_total", "counter", "Work items claimed.", self.claims.load(Relaxed).to_string());
        simple(
            "stockade_heartbeat_failures_total",
            "counter",
            "Lease heartbeats that failed.",
            self.heartbeat_failures.load(Relaxed).to_string(),
        );
        simple(
            "stockade_lease_losses_total",
            "counter",
            "Items whose lease was lost.",
            self.lease_losses.load(Relaxed).to_string(),
        );
        simple(
            "stockade_jail_build_failures_total",
            "counter",
            "Session jails that could not be built (the item failed).",
            self.jail_build_failures.load(Relaxed).to_string(),
        );
        simple(
            "stockade_jail_builds_waiting",
            "gauge",
            "Sessions waiting for a jail build slot (--max-jail-builds): after a restart, how far resuming is behind.",
            self.jail_builds_waiting.load(Relaxed).to_string(),
        );
        simple(
            "stockade_egress_denied_total",
            "counter",
            "Connection attempts from session jails that the egress allowlist denied.",
            self.egress_denied.load(Relaxed).to_string(),
        );
        simple(
            "stockade_trail_records_suppressed_total",
            "counter",
            "Egress records the sessions' trails counted instead of writing, over trail.max_rate.",
            self.trail_records_suppressed.load(Relaxed).to_string(),
        );
        simple(
            "stockade_egress_allowed_total",
            "counter",
            "Connections from session jails that the egress allowlist allowed.",
            self.egress_allowed.load(Relaxed).to_string(),
        );
        simple(
            "stockade_execs_total",
            "counter",
            "Programs executed in session jails, as their audit trails recorded them.",
            self.execs.load(Relaxed).to_string(),
        );
        simple(
            "stockade_trails_full_total",
            "counter",
            "Session audit trails that reached trail.max_size.",
            self.trails_full.load(Relaxed).to_string(),
        );
        simple(
            "stockade_state_free_bytes",
            "gauge",
            "Free bytes on the state directory's filesystem (when sessions have size-limited images).",
            self.state_free_bytes.load(Relaxed).to_string(),
        );
        simple(
            "stockade_images_owed_bytes",
            "gauge",
            "Bytes the sessions' sparse images may still take on the state directory's filesystem.",
            self.images_owed_bytes.load(Relaxed).to_string(),
        );
        simple(
            "stockade_admission_paused",
            "gauge",
            "1 while no new session is taken for want of room for its images.",
            self.admission_paused.load(Relaxed).to_string(),
        );
        simple(
            "stockade_sessions_ended_for_room_total",
            "counter",
            "Sessions ended because the state directory could no longer back their images.",
            self.sessions_ended_for_room.load(Relaxed).to_string(),
        );
        simple(
            "stockade_outbox_failures_total",
            "counter",
            "Tool results that could not be saved before posting (crash-safe posting off for them).",
            self.outbox_failures.load(Relaxed).to_string(),
        );
        simple(
            "stockade_result_post_retries_total",
            "counter",
            "Tool results posted again after a failure.",
            self.result_post_retries.load(Relaxed).to_string(),
        );
        let _ = writeln!(
            o,
            "# HELP stockade_queue_polls_total Claim requests by outcome.\n# TYPE stockade_queue_polls_total counter"
        );
        for (k, v) in lock(&self.polls).iter() {
            let _ = writeln!(o, "stockade_queue_polls_total{{outcome=\"{k}\"}} {v}");
        }
        let _ = writeln!(o, "# HELP stockade_tool_calls_total Tool calls by tool and outcome.\n# TYPE stockade_tool_calls_total counter");
        for ((t, oc), v) in lock(&self.tool_calls).iter() {
            let _ = writeln!(o, "stockade_tool_calls_total{{tool=\"{t}\",outcome=\"{oc}\"}} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP stockade_tool_duration_seconds Tool call latency.\n# TYPE stockade_tool_duration_seconds histogram"
        );
        for (t, h) in lock(&self.tool_latency).iter() {
            h.render(&mut o, "stockade_tool_duration_seconds", &format!("tool=\"{t}\""));
        }
        let _ = writeln!(o, "# HELP stockade_jail_build_seconds Time to build a session jail.\n# TYPE stockade_jail_build_seconds histogram");
        lock(&self.jail_build).render(&mut o, "stockade_jail_build_seconds", "");
        o
    }
}

/// An environment's queue (`stockade stats --prometheus`) as Prometheus gauges, for
/// node_exporter's textfile collector.
pub fn queue_gauges(env: &str, s: &crate::control_plane::wire::WorkQueueStats, now: std::time::SystemTime) -> String {
    let env: String = env.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').collect();
    let oldest = s
        .oldest_queued_at
        .as_deref()
        .and_then(|t| crate::util::parse_rfc3339(t).ok())
        .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64())
        .unwrap_or(0.0);
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, v: String| {
        o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{environment_id=\"{env}\"}} {v}\n"));
    };
    gauge("stockade_queue_depth", "Work items in the environment's queue.", s.depth.to_string());
    gauge("stockade_queue_pending", "Work items handed out and not yet acknowledged.", s.pending.to_string());
    gauge(
        "stockade_queue_oldest_age_seconds",
        "Age of the oldest queued work item (0 when none).",
        format!("{oldest:.0}"),
    );
    if let Some(n) = s.workers_polling {
        gauge("stockade_workers_polling", "Workers that polled in the last 30 s.", n.to_string());
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.claims.fetch_add(2, Relaxed);
        m.tool_call("bash", false, Duration::from_millis(3));
        m.tool_call("evil\"name", true, Duration::from_secs(2));
        m.poll("empty");
        let t = m.render();
        assert!(t.contains("stockade_claims_total 2\n"), "{t}");
        assert!(t.contains("stockade_tool_calls_total{tool=\"bash\",outcome=\"ok\"} 1\n"), "{t}");
        assert!(t.contains("stockade_tool_calls_total{tool=\"unknown\",outcome=\"error\"} 1\n"), "{t}");
        assert!(t.contains("stockade_tool_duration_seconds_bucket{tool=\"bash\",le=\"0.005\"} 1\n"), "{t}");
        assert!(t.contains("stockade_tool_duration_seconds_bucket{tool=\"bash\",le=\"0.001\"} 0\n"), "{t}");
        assert!(t.contains("stockade_queue_polls_total{outcome=\"empty\"} 1\n"), "{t}");
    }

    #[test]
    fn queue_statistics_become_gauges() {
        let s: crate::control_plane::wire::WorkQueueStats = serde_json::from_value(serde_json::json!({
            "type": "work_queue_stats", "depth": 3, "pending": 1,
            "oldest_queued_at": "2026-12-01T10:00:00Z", "workers_polling": null
        }))
        .unwrap();
        let now = crate::util::parse_rfc3339("2026-12-01T10:05:00Z").unwrap();
        let text = queue_gauges("env_01\"x", &s, now);
        assert!(text.contains("stockade_queue_depth{environment_id=\"env_01x\"} 3\n"), "{text}");
        assert!(text.contains("stockade_queue_pending{environment_id=\"env_01x\"} 1\n"), "{text}");
        assert!(text.contains("stockade_queue_oldest_age_seconds{environment_id=\"env_01x\"} 300\n"), "{text}");
        assert!(!text.contains("stockade_workers_polling"), "unknown is left out: {text}");
    }
}
