//! The commands around the worker: `worker`, `webhook`, `control-plane`, `stats`, `stop`, `demo`.

use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};

use stockade::control_plane::client::AuthScheme;
use stockade::control_plane::local::{self, CreateSession, LocalConfig, LocalControlPlane, SessionView};
use stockade::control_plane::webhook::{self, Verifier};
use stockade::control_plane::wire;
use stockade::control_plane::{Client, Secret};
use stockade::util::parse_duration;
use stockade::worker::{self, key, Shutdown, WorkerConfig};

use super::{fail, usage, LogFormat};

fn duration(s: &str) -> Result<Duration, stockade::util::ValueError> {
    parse_duration(s)
}

fn size(s: &str) -> Result<u64, stockade::util::ValueError> {
    stockade::util::parse_size(s)
}

#[derive(Args)]
pub(super) struct WorkerArgs {
    #[command(subcommand)]
    command: Option<WorkerCommand>,
    #[command(flatten)]
    common: WorkerCommon,
}

#[derive(Subcommand)]
enum WorkerCommand {
    /// Poll the work queue and serve every session claimed (the same as `stockade worker`).
    Poll(WorkerCommon),
    /// Serve one session that was already claimed and acknowledged, then exit: the entry point of
    /// `ant beta:worker poll --on-work 'stockade worker run'`, which passes the work item in the
    /// environment.
    Run(WorkerRunArgs),
}

#[derive(Args)]
pub(super) struct WorkerRunArgs {
    /// The claimed work item.
    #[arg(long, env = "ANTHROPIC_WORK_ID")]
    work_id: String,
    /// The session the work item serves.
    #[arg(long, env = "ANTHROPIC_SESSION_ID")]
    session_id: String,
    #[command(flatten)]
    common: WorkerCommon,
}

#[derive(Args)]
pub(super) struct WorkerCommon {
    /// The environment whose work queue to serve.
    #[arg(long, env = "ANTHROPIC_ENVIRONMENT_ID")]
    environment_id: String,
    /// API base URL.
    #[arg(long, visible_alias = "api-url", value_name = "URL", env = "ANTHROPIC_BASE_URL", default_value = wire::DEFAULT_API_URL)]
    base_url: String,
    /// File holding the environment key (mode 0600). Otherwise the systemd credential
    /// `anthropic-environment-key`, then $ANTHROPIC_ENVIRONMENT_KEY.
    #[arg(long, conflicts_with = "environment_key")]
    environment_key_file: Option<PathBuf>,
    /// The environment key itself, as `ant` takes it. Prefer --environment-key-file: a command
    /// line is readable by every user of the host until Stockade wipes it, right after start.
    #[arg(long, value_name = "KEY", hide_default_value = true)]
    environment_key: Option<String>,
    /// This worker's id, sent as `Anthropic-Worker-ID` on every poll [default: the host name
    /// and a random suffix, kept in the state directory].
    #[arg(long, env = "ANTHROPIC_WORKER_ID")]
    worker_id: Option<String>,
    /// How long a session may stay idle after the agent's turn ended (`end_turn`) before its
    /// work item is stopped.
    #[arg(long, default_value = "60s", value_parser = duration)]
    max_idle: Duration,
    /// Tool calls of one session that run at once: calls of one session thread always run one
    /// at a time, calls of different threads (subagents) overlap up to this many; `none` sets no
    /// limit. The official worker's `max_concurrent_calls`.
    #[arg(long, default_value = "1", value_parser = concurrent_calls, value_name = "N|none")]
    max_concurrent_calls: usize,
    /// Session jails built at once [default: two per CPU]; the other sessions wait their turn
    /// with their leases kept alive (a restart resuming many held items, many claimed at once).
    #[arg(long, value_name = "N")]
    max_jail_builds: Option<usize>,
    /// How often a session's attached memory stores sync back while it runs (checked after
    /// each tool call; at least 5s); `none` runs sessions without their memory stores. The
    /// official worker's `memory_sync_interval`.
    #[arg(long, default_value = "15s", value_parser = sync_interval, value_name = "DURATION|none")]
    memory_sync_interval: SyncEvery,
    /// Whether a file deleted in a memory store's folder deletes its memory: `log_only` runs
    /// every check and only logs. The official worker's `memory_sync_deletions`.
    #[arg(long, value_enum, default_value = "enabled")]
    memory_sync_deletions: stockade::worker::memory::DeleteMode,
    /// Policy file or built-in name for every session jail [default: $STOCKADE_POLICY, then
    /// /etc/stockade/policy.toml if it exists, then the built-in default].
    #[arg(long, short = 'p')]
    policy: Option<String>,
    /// Sessions run at once (fewer, said at start, when the state directory cannot back their
    /// size-limited images; see --image-overcommit).
    #[arg(long, default_value_t = 8)]
    max_sessions: usize,
    /// How many times over the state directory's free space the sessions' sparse images
    /// (limits.workspace_size + limits.outputs_size each) may promise. 1, the default, backs every
    /// image in full, so no write is ever lost behind a session's back; more packs sessions
    /// densely and relies on the worker ending the sessions owing most when the disk runs short.
    #[arg(long, default_value_t = 1.0, value_parser = overcommit, value_name = "RATIO")]
    image_overcommit: f64,
    /// Held items, workspaces and retained outputs [default: /var/lib/stockade as root,
    /// ~/.local/state/stockade otherwise].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Working directory of sessions (the jail mounts the workspace at /workspace).
    #[arg(long, default_value = "/workspace")]
    workdir: String,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Graceful stop bound on SIGTERM; then sessions are killed.
    #[arg(long, default_value = "60s", value_parser = duration)]
    shutdown_timeout: Duration,
    /// How long ended sessions' outputs are kept under the state directory; overrides the
    /// policy's `retention.outputs` [default: the policy's, 7d in the built-ins].
    #[arg(long, value_parser = duration)]
    outputs_retention: Option<Duration>,
    /// Heartbeat period [default: half the lease the server grants, at most 30s].
    #[arg(long, value_parser = duration)]
    heartbeat_interval: Option<Duration>,
    /// Timeout of one API call.
    #[arg(long, default_value = "15s", value_parser = duration)]
    api_timeout: Duration,
    /// How long a session's event stream may deliver nothing, not even the server's 5-second
    /// ping, before it is taken for dead (a half-open connection, a buffering proxy) and reopened.
    #[arg(long, default_value = "15s", value_parser = duration)]
    stream_silence: Duration,
    /// The largest response body read from the control plane; a larger one is an error and the
    /// request is tried again. Far above any real page of events.
    #[arg(long, default_value = "64MiB", value_parser = size)]
    max_response_bytes: u64,
    /// The largest tool result posted (as its JSON event); a larger one is posted as an error
    /// result naming its size, and the session goes on.
    #[arg(long, default_value = "32MiB", value_parser = size)]
    max_result_bytes: u64,
    /// Start even though ANTHROPIC_API_KEY is set (it is scrubbed, but it was on this host).
    #[arg(long)]
    allow_org_key_in_env: bool,
}

#[derive(Args)]
pub(super) struct WebhookArgs {
    #[command(flatten)]
    worker: WorkerCommon,
    /// Where deliveries arrive (POST, any path).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// File holding the webhook signing key (`whsec_…`); otherwise $ANTHROPIC_WEBHOOK_SIGNING_KEY.
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct ControlPlaneArgs {
    #[command(subcommand)]
    command: Option<super::cp::CpCommand>,
    /// Address to serve on (loopback).
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Directory for the state file and keys; without it, state is in memory and keys go to a
    /// fresh directory under /tmp.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Lease length of a claim.
    #[arg(long, default_value = "30s", value_parser = duration)]
    lease: Duration,
    /// Deliver `session.status_run_started` for every new session to this URL, signed as
    /// Standard Webhooks (the key is `webhook.key` beside the other keys).
    #[arg(long, value_name = "URL")]
    webhook_url: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum TrailFormat {
    Table,
    Json,
}

#[derive(Args)]
pub(super) struct TrailArgs {
    /// A session id (sesn_…), a work item id, or a trail file; without one, every trail in the
    /// state directory is listed: session, work item, start, end, size.
    session: Option<String>,
    /// The worker's state directory [default: /var/lib/stockade as root, else
    /// $XDG_STATE_HOME/stockade].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A table for people, or the records as stored (JSON lines).
    #[arg(long, value_enum, default_value_t = TrailFormat::Table)]
    format: TrailFormat,
    /// Only records of these events (comma-separated: session_start, tool_call, tool_result,
    /// exec, exec_differs, egress, provision, memory, output_file, session_end, truncated,
    /// suppressed).
    #[arg(long, value_delimiter = ',', value_name = "EVENTS")]
    event: Vec<String>,
}

/// The trail files a `stockade trail` argument names: the file itself, or every trail under the
/// state directory whose name has the session or work id (a session claimed twice has two).
fn trail_files(a: &TrailArgs, session: &str) -> Result<Vec<PathBuf>, String> {
    let as_path = PathBuf::from(session);
    if session.contains('/') || session.ends_with(".jsonl") {
        return match as_path.is_file() {
            true => Ok(vec![as_path]),
            false => Err(format!("{}: no such trail file", as_path.display())),
        };
    }
    let dir = a.state_dir.clone().unwrap_or_else(default_state_dir).join("trails");
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            n.ends_with(".jsonl") && n.trim_end_matches(".jsonl").split('-').any(|part| part == session)
        })
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(format!("no trail of `{session}` in {}", dir.display()));
    }
    Ok(v)
}

/// `stockade trail` alone: a line per trail in the state directory, oldest first, from its first
/// and last records only (a trail may be large).
fn list_trails(a: &TrailArgs) -> i32 {
    use std::io::Write;
    let dir = a.state_dir.clone().unwrap_or_else(default_state_dir).join("trails");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) => return fail(format!("{}: {e}", dir.display())),
    };
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for p in rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "jsonl")) {
        let (first, last) = stockade::session::trail::ends(&p);
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        let field = |r: &Option<serde_json::Value>, k: &str| r.as_ref().and_then(|r| r[k].as_str()).map(str::to_owned);
        let ended = last.as_ref().filter(|r| r["event"] == "session_end");
        rows.push(serde_json::json!({
            "session_id": field(&first, "session_id"),
            "work_id": field(&first, "work_id"),
            "started": field(&first, "ts"),
            "ended": ended.and_then(|r| r["ts"].as_str()),
            "end": ended.and_then(|r| r["reason"].as_str()),
            "bytes": size,
            "file": p.display().to_string(),
        }));
    }
    rows.sort_by(|x, y| x["started"].as_str().cmp(&y["started"].as_str()));
    let mut out = std::io::stdout().lock();
    let s = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or("-").to_owned();
    let r = match a.format {
        TrailFormat::Json => rows.iter().try_for_each(|r| writeln!(out, "{r}")),
        TrailFormat::Table => writeln!(out, "{:<24} {:<24} {:<24} {:>10}  END", "SESSION", "WORK", "STARTED", "BYTES")
            .and_then(|()| {
                rows.iter().try_for_each(|r| {
                    let end = if r["end"].is_null() { "(no end recorded)".to_owned() } else { s(r, "end") };
                    writeln!(
                        out,
                        "{:<24} {:<24} {:<24} {:>10}  {end}",
                        s(r, "session_id"),
                        s(r, "work_id"),
                        s(r, "started"),
                        r["bytes"]
                    )
                })
            }),
    };
    let _ = r; // a reader that went away is not an error
    0
}

pub(super) fn trail(a: TrailArgs) -> i32 {
    use std::io::Write;
    let known = stockade::session::trail::EVENTS;
    if let Some(bad) = a.event.iter().find(|e| !known.contains(&e.as_str())) {
        return usage(format!("--event: unknown event `{bad}`; known: {}", known.join(", ")));
    }
    let Some(session) = a.session.as_deref() else { return list_trails(&a) };
    let files = match trail_files(&a, session) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let mut out = std::io::stdout().lock();
    for f in files {
        let records = match stockade::session::trail::read(&f) {
            Ok(r) => r,
            Err(e) => return fail(format!("{}: {e}", f.display())),
        };
        let mut records =
            records.into_iter().filter(|r| a.event.is_empty() || a.event.iter().any(|e| r["event"] == e.as_str()));
        let r = match a.format {
            TrailFormat::Json => records.try_for_each(|r| writeln!(out, "{r}")),
            TrailFormat::Table => writeln!(out, "# {}", f.display())
                .and_then(|()| records.try_for_each(|r| writeln!(out, "{}", trail_row(&r)))),
        };
        if r.is_err() {
            return 0; // the reader went away
        }
    }
    0
}

/// One trail record as a table row: time, event, tool call, and what happened.
fn trail_row(r: &serde_json::Value) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
    let what = match r["event"].as_str().unwrap_or("") {
        "session_start" => format!("session {} work {} policy {}", s("session_id"), s("work_id"), s("policy")),
        "tool_call" => format!("{} {}", s("name"), r["input"]),
        "tool_result" => format!(
            "{} {} {} bytes in {} ms",
            s("name"),
            if r["is_error"] == true { "error" } else { "ok" },
            r["output_bytes"],
            r["duration_ms"]
        ),
        "exec" => {
            let argv: Vec<String> = r["argv"]
                .as_array()
                .map(|a| a.iter().map(|x| shell_word(x.as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            format!(
                "pid {} {}{} (in {})",
                r["pid"],
                argv.join(" "),
                if r["argv_truncated"] == true { " …" } else { "" },
                s("cwd")
            )
        }
        "egress" => format!("{} {} {}:{}", s("verdict"), s("proto"), s("dst"), r["dport"]),
        "output_file" => format!("{} {} bytes sha256:{}", s("path"), r["size"], s("sha256")),
        "session_end" => s("reason"),
        "truncated" => format!("trail full at {} bytes; trail.on_full = {}", r["limit"], s("on_full")),
        _ => r.to_string(),
    };
    // A table row stays one screen line or two; `--format json` has every byte.
    let what: String = match what.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &what[..i]),
        None => what,
    };
    let call = s("tool_use_id");
    format!("{:<24} {:<13} {:<14} {}", s("ts"), r["event"].as_str().unwrap_or("?"), call, what)
}

/// A word as a shell would need it quoted to mean the same.
fn shell_word(w: &str) -> String {
    if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

#[derive(Args)]
pub(super) struct StatsArgs {
    /// The environment (env_…).
    #[arg(long, env = "ANTHROPIC_ENVIRONMENT_ID")]
    environment_id: String,
    /// API base URL.
    #[arg(long = "base-url", visible_alias = "api-url", value_name = "URL", env = "ANTHROPIC_BASE_URL", default_value = wire::DEFAULT_API_URL)]
    api_url: String,
    /// File holding the organisation key; otherwise $ANTHROPIC_API_KEY.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Print the statistics as the API returns them (JSON).
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// Print them as Prometheus gauges, for node_exporter's textfile collector
    /// (deploy/prometheus/alerts.yml alerts on them).
    #[arg(long)]
    prometheus: bool,
    /// Serve them instead, read from the API at most every 5 s: GET /stats (the API's JSON, for
    /// an autoscaler such as KEDA's metrics-api trigger, which cannot send the API's headers)
    /// and GET /metrics (the Prometheus gauges). The organisation key stays in this process.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["json", "prometheus"])]
    serve: Option<std::net::SocketAddr>,
}

#[derive(Args)]
pub(super) struct WorkArgs {
    #[command(subcommand)]
    command: WorkListOrShow,
}

#[derive(Subcommand)]
enum WorkListOrShow {
    /// List an environment's work items, newest page first as the API returns them.
    List {
        /// The environment (env_…).
        #[arg(long, env = "ANTHROPIC_ENVIRONMENT_ID")]
        environment_id: String,
        /// Items per page; every page is fetched.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print the items as JSON lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: ApiAccess,
    },
    /// Show one work item.
    Show {
        /// The work item.
        #[arg(env = "ANTHROPIC_WORK_ID")]
        work_id: String,
        /// The environment (env_…).
        #[arg(long, env = "ANTHROPIC_ENVIRONMENT_ID")]
        environment_id: String,
        /// Print the item as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: ApiAccess,
    },
}

/// The API and the organisation key, for the operator's commands.
#[derive(Args)]
struct ApiAccess {
    /// API base URL.
    #[arg(long = "base-url", visible_alias = "api-url", value_name = "URL", env = "ANTHROPIC_BASE_URL", default_value = wire::DEFAULT_API_URL)]
    api_url: String,
    /// File holding the organisation key; otherwise $ANTHROPIC_API_KEY.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct StopArgs {
    /// The work item.
    #[arg(env = "ANTHROPIC_WORK_ID")]
    work_id: String,
    /// The environment (env_…).
    #[arg(long, env = "ANTHROPIC_ENVIRONMENT_ID")]
    environment_id: String,
    /// Kill the session's jail at once instead of finishing the in-flight tool call.
    #[arg(long)]
    force: bool,
    /// API base URL.
    #[arg(long = "base-url", visible_alias = "api-url", value_name = "URL", env = "ANTHROPIC_BASE_URL", default_value = wire::DEFAULT_API_URL)]
    api_url: String,
    /// File holding the organisation key; otherwise $ANTHROPIC_API_KEY.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the async runtime")
}

fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/stockade");
    }
    let base = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".local/state")
    });
    base.join("stockade")
}

/// The organisation key for ops commands: a file, or $ANTHROPIC_API_KEY.
fn org_key(file: Option<&Path>) -> Result<Secret, String> {
    match file {
        Some(p) => std::fs::read_to_string(p)
            .map(|s| Secret::new(s.trim()))
            .map_err(|e| format!("--api-key-file {}: {e}", p.display())),
        None => std::env::var(key::ORG_KEY_VAR)
            .map(|s| Secret::new(s.trim()))
            .map_err(|_| format!("no organisation key: set {} or pass --api-key-file", key::ORG_KEY_VAR)),
    }
}

/// A client for the ops commands, with the organisation key.
pub(super) fn org_client(api_url: &str, key_file: Option<&Path>) -> Result<Client, String> {
    Client::new(api_url, org_key(key_file)?, AuthScheme::XApiKey).map_err(|e| e.to_string())
}

/// SIGTERM/SIGINT: the first asks for a graceful stop, the second forces.
fn watch_signals(tx: watch::Sender<Shutdown>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot handle signals");
            return;
        };
        for level in [Shutdown::Graceful, Shutdown::Force] {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::warn!(?level, "signal received");
            let _ = tx.send(level);
        }
    });
}

fn worker_config(a: &WorkerCommon, log: LogFormat) -> Result<WorkerConfig, String> {
    // Read once, before any thread exists, and scrubbed from our environment.
    let (k, source) =
        key::load(a.environment_key.as_deref(), a.environment_key_file.as_deref(), a.allow_org_key_in_env)
            .map_err(|e| e.to_string())?;
    tracing::info!(%source, "environment key loaded");
    let mut c = worker_config_with(a, log, k)?;
    c.key_source = Some(source);
    Ok(c)
}

fn overcommit(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 1.0 => Ok(v),
        _ => Err(format!("{s:?}: a ratio of 1 or more (1 backs every image in full)")),
    }
}

/// A memory sync interval, or none (no memory).
#[derive(Clone, Copy)]
struct SyncEvery(Option<Duration>);

/// `--memory-sync-interval`: at least 5 seconds, or `none`.
fn sync_interval(s: &str) -> Result<SyncEvery, String> {
    if s == "none" {
        return Ok(SyncEvery(None));
    }
    let d = duration(s).map_err(|e| e.to_string())?;
    if d < stockade::worker::memory::MIN_SYNC_INTERVAL {
        return Err(format!("{s:?}: the sync interval must be at least 5s, or none to run without memory"));
    }
    Ok(SyncEvery(Some(d)))
}

/// `--max-concurrent-calls`: at least 1, or `none` (no limit), as the official worker checks it.
fn concurrent_calls(s: &str) -> Result<usize, String> {
    match s {
        "none" => Ok(usize::MAX),
        _ => match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!("{s:?}: max_concurrent_calls must be at least 1, or none for no limit")),
        },
    }
}

fn worker_config_with(a: &WorkerCommon, log: LogFormat, k: Secret) -> Result<WorkerConfig, String> {
    let mut c = WorkerConfig::new(&a.environment_id, &a.base_url, k);
    c.worker_id = a.worker_id.clone();
    c.max_idle = a.max_idle;
    c.max_concurrent_calls = a.max_concurrent_calls;
    c.max_jail_builds = a.max_jail_builds.unwrap_or_else(stockade::worker::default_jail_builds).max(1);
    c.memory_sync_interval = a.memory_sync_interval.0;
    c.memory_sync_deletions = a.memory_sync_deletions;
    c.policy = super::policy_spec(a.policy.as_deref()).unwrap_or_else(|| "default".into());
    c.max_sessions = a.max_sessions;
    c.image_overcommit = a.image_overcommit;
    c.state_dir = a.state_dir.clone().unwrap_or_else(default_state_dir);
    c.workdir = a.workdir.clone();
    c.metrics = a.metrics;
    c.shutdown_timeout = a.shutdown_timeout;
    c.log_json = log == LogFormat::Json;
    c.heartbeat_every = a.heartbeat_interval;
    c.api_timeout = a.api_timeout;
    c.stream_silence = a.stream_silence;
    c.max_response_bytes = a.max_response_bytes as usize;
    c.max_result_bytes = a.max_result_bytes as usize;
    c.outputs_retention = a.outputs_retention;
    Ok(c)
}

pub(super) fn worker(a: WorkerArgs, wake: Option<Arc<Notify>>, log: LogFormat) -> i32 {
    let a = match a.command {
        None => a.common,
        Some(WorkerCommand::Poll(c)) => c,
        Some(WorkerCommand::Run(r)) => return worker_run(r, log),
    };
    let mut cfg = match worker_config(&a, log) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    cfg.wake = wake;
    let rt = runtime();
    rt.block_on(async {
        let (tx, rx) = watch::channel(Shutdown::Running);
        watch_signals(tx);
        match worker::run(cfg, rx).await {
            Ok(()) => 0,
            // What the operator must change before a restart can help: the usage status, which
            // the systemd unit does not restart on.
            Err(
                e @ (worker::WorkerError::Policy(_) | worker::WorkerError::Workdir(_) | worker::WorkerError::Disk(..)),
            ) => usage(e),
            Err(e) => fail(e),
        }
    })
}

/// `stockade worker run`: one claimed session, from the variables `ant beta:worker poll
/// --on-work` sets. The work item's secret (`ANTHROPIC_WORK_SECRET`) carries the sessions token;
/// without it the environment key is used.
fn worker_run(r: WorkerRunArgs, log: LogFormat) -> i32 {
    let secret = std::env::var(key::WORK_SECRET_VAR).ok().filter(|s| !s.trim().is_empty());
    let token = secret.as_deref().and_then(wire::WorkSecret::decode);
    if secret.is_some() && token.is_none() {
        tracing::warn!("{} yielded no sessions token; using the environment key", key::WORK_SECRET_VAR);
    }
    let loaded = key::load(
        r.common.environment_key.as_deref(),
        r.common.environment_key_file.as_deref(),
        r.common.allow_org_key_in_env,
    );
    stockade::jail::scrub_variables(&[key::WORK_SECRET_VAR]);
    let k = match (loaded, &token) {
        (Ok((k, source)), _) => {
            tracing::info!(%source, "environment key loaded");
            k
        }
        // The sessions token carries every call of one item on its own.
        (Err(key::KeyError::Missing), Some(t)) => Secret::new(t.sessions_token.clone()),
        (Err(e), _) => return usage(e),
    };
    let cfg = match worker_config_with(&r.common, log, k) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let item = wire::WorkItem::claimed(&r.work_id, &r.common.environment_id, &r.session_id, token.map(|t| t.encode()));
    runtime().block_on(async move {
        let (tx, rx) = watch::channel(Shutdown::Running);
        watch_signals(tx);
        match worker::run_one(cfg, item, rx).await {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => fail(e),
        }
    })
}

pub(super) fn webhook(a: WebhookArgs, log: LogFormat) -> i32 {
    let (text, origin) = match &a.secret_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => (t, format!("--secret-file {}", f.display())),
            Err(e) => return usage(format!("--secret-file {}: {e}", f.display())),
        },
        None => match std::env::var(webhook::SIGNING_KEY_VAR) {
            Ok(t) => (t, format!("${}", webhook::SIGNING_KEY_VAR)),
            Err(_) => {
                return usage(format!("no webhook signing key: pass --secret-file or set {}", webhook::SIGNING_KEY_VAR))
            }
        },
    };
    stockade::jail::scrub_variables(&[webhook::SIGNING_KEY_VAR]);
    let secret = match webhook::parse_secret(&text) {
        Ok(k) => k,
        Err(e) => return usage(format!("{origin}: {e}")),
    };
    let mut cfg = match worker_config(&a.worker, log) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let wake = Arc::new(Notify::new());
    cfg.wake = Some(wake.clone());
    let verifier = Arc::new(Verifier::new(secret, webhook::DEFAULT_TOLERANCE));
    let rt = runtime();
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(a.listen).await {
            Ok(l) => l,
            Err(e) => return usage(format!("--listen {}: {e}", a.listen)),
        };
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (verifier, wake) = (verifier.clone(), wake.clone());
                async move {
                    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
                    let r = verifier.verify(
                        h(wire::webhook_header::ID),
                        h(wire::webhook_header::TIMESTAMP),
                        h(wire::webhook_header::SIGNATURE),
                        &body,
                        SystemTime::now(),
                    );
                    match r {
                        Ok(()) => {
                            let kind = serde_json::from_slice::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|v| {
                                    let d = v.get("data").unwrap_or(&v);
                                    d.get("type").and_then(|t| t.as_str()).map(str::to_owned)
                                })
                                .unwrap_or_default();
                            tracing::info!(event = %kind, "webhook delivery verified");
                            // Any verified delivery drains the queue: one recovers missed ones.
                            wake.notify_one();
                            axum::http::StatusCode::NO_CONTENT
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "webhook delivery rejected");
                            axum::http::StatusCode::UNAUTHORIZED
                        }
                    }
                }
            },
        ));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "webhook listener stopped");
            }
        });
        let (tx, rx) = watch::channel(Shutdown::Running);
        watch_signals(tx);
        match worker::run(cfg, rx).await {
            Ok(()) => 0,
            Err(e) => fail(e),
        }
    })
}

pub(super) fn control_plane(a: ControlPlaneArgs) -> i32 {
    match a.command {
        Some(super::cp::CpCommand::Session { command }) => return super::cp::session_command(command),
        Some(super::cp::CpCommand::MemoryStore { command }) => return super::cp::memory_store_command(command),
        None => {}
    }
    if let Some(d) = &a.state {
        if let Err(e) = std::fs::create_dir_all(d) {
            return usage(format!("--state {}: {e}", d.display()));
        }
    }
    let keys =
        a.state.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("stockade-cp-{}", std::process::id())));
    let webhook = match &a.webhook_url {
        None => None,
        Some(url) => match webhook_key(&keys) {
            Ok(k) => Some((url.clone(), k)),
            Err(e) => return fail(format!("webhook key in {}: {e}", keys.display())),
        },
    };
    let cfg = LocalConfig {
        lease: a.lease,
        state_file: a.state.as_ref().map(|d| d.join("control-plane.json")),
        webhook,
        ..LocalConfig::default()
    };
    let cp = match LocalControlPlane::new(cfg) {
        Ok(cp) => cp,
        Err(e) => return fail(e),
    };
    if let Err(e) = std::fs::create_dir_all(&keys).and_then(|()| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700))?;
        cp.write_keys(&keys)
    }) {
        return fail(format!("writing keys to {}: {e}", keys.display()));
    }
    runtime().block_on(async move {
        let listener = match tokio::net::TcpListener::bind(a.listen).await {
            Ok(l) => l,
            Err(e) => return usage(format!("--listen {}: {e}", a.listen)),
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        eprintln!(
            "stockade control plane on http://{addr}\n  environment {env}: key in {k}\n  organisation key in {o}\n\
             run a worker:  stockade worker --environment-id {env} --api-url http://{addr} --environment-key-file {k}",
            env = local::DEFAULT_ENVIRONMENT,
            k = keys.join(format!("{}.key", local::DEFAULT_ENVIRONMENT)).display(),
            o = keys.join("org.key").display(),
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match cp.serve(listener, shutdown).await {
            Ok(()) => 0,
            Err(e) => fail(e),
        }
    })
}

/// The local control plane's webhook signing key: `webhook.key` in the key directory, made
/// (mode 0600, `whsec_` + 32 random bytes) when absent.
fn webhook_key(dir: &Path) -> Result<Vec<u8>, String> {
    use base64::Engine;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let p = dir.join("webhook.key");
    if let Ok(text) = std::fs::read_to_string(&p) {
        return webhook::parse_secret(&text).map_err(|e| format!("{}: {e}", p.display()));
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| e.to_string())?;
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").map_err(|e| e.to_string())?, &mut key)
        .map_err(|e| e.to_string())?;
    let text = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| e.to_string())?;
    Ok(key.to_vec())
}

/// A human-readable transcript of a session.
pub(super) fn transcript(v: &SessionView) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "session {} ({}), work item {} ({}, handed out {} time{})",
        v.id,
        v.status,
        v.work_id,
        v.work_state,
        v.polls,
        if v.polls == 1 { "" } else { "s" }
    );
    for (i, c) in v.calls.iter().enumerate() {
        let input = serde_json::to_string(&c.input).unwrap_or_default();
        let took = c.latency_ms.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "pending".into());
        let _ = writeln!(s, "\n[{}] {} {}  ({took})", i + 1, c.name, input);
        let mark = if c.is_error == Some(true) { "error: " } else { "" };
        let none = match c.answered_by.as_deref() {
            Some("none") => "(denied: not run)",
            _ => "(no result yet)",
        };
        for line in c.result.as_deref().unwrap_or(none).lines() {
            let _ = writeln!(s, "    {mark}{line}");
        }
    }
    if v.duplicate_results > 0 {
        let _ = writeln!(s, "\nWARNING: {} duplicate results were refused", v.duplicate_results);
    }
    s
}

pub(super) fn stats(a: StatsArgs) -> i32 {
    let client = match org_client(&a.api_url, a.api_key_file.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    if let Some(addr) = a.serve {
        return runtime().block_on(serve_stats(client, a.environment_id.clone(), addr));
    }
    runtime().block_on(async move {
        match client.stats(&a.environment_id).await {
            Ok(s) if a.json => {
                println!("{}", serde_json::to_string(&s).expect("serialises"));
                0
            }
            Ok(s) if a.prometheus => {
                print!(
                    "{}",
                    stockade::worker::metrics::queue_gauges(&a.environment_id, &s, std::time::SystemTime::now())
                );
                0
            }
            Ok(s) => {
                println!(
                    "depth {}  pending {}  workers_polling {}  oldest_queued_at {}",
                    s.depth,
                    s.pending,
                    s.workers_polling.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into()),
                    s.oldest_queued_at.as_deref().unwrap_or("-")
                );
                0
            }
            Err(e) => fail(e),
        }
    })
}

/// How long one reading of the queue is served before the API is asked again.
const STATS_FRESH: Duration = Duration::from_secs(5);

/// `stockade stats --serve`: the queue's statistics over HTTP, each reading kept `STATS_FRESH`
/// so that any number of scrapers costs the API one request per interval.
async fn serve_stats(client: Client, env: String, addr: std::net::SocketAddr) -> i32 {
    use axum::http::StatusCode;
    type Cache = Arc<tokio::sync::Mutex<Option<(std::time::Instant, wire::WorkQueueStats)>>>;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => return usage(format!("--serve {addr}: {e}")),
    };
    let cache: Cache = Arc::default();
    let read = {
        let (client, env, cache) = (client.clone(), env.clone(), cache.clone());
        move || {
            let (client, env, cache) = (client.clone(), env.clone(), cache.clone());
            async move {
                let mut c = cache.lock().await;
                if let Some((_, s)) = c.as_ref().filter(|(at, _)| at.elapsed() < STATS_FRESH) {
                    return Ok(s.clone());
                }
                let s = client.stats(&env).await.map_err(|e| {
                    tracing::warn!(error = %e, "reading the queue's statistics failed");
                    (StatusCode::BAD_GATEWAY, format!("{e}\n"))
                })?;
                *c = Some((std::time::Instant::now(), s.clone()));
                Ok::<_, (StatusCode, String)>(s)
            }
        }
    };
    let (r1, r2) = (read.clone(), read);
    let env2 = env.clone();
    let app = axum::Router::new()
        .route(
            "/stats",
            axum::routing::get(move || {
                let r = r1.clone();
                async move { r().await.map(axum::Json) }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (r, env) = (r2.clone(), env2.clone());
                async move {
                    r().await.map(|s| {
                        (
                            [("content-type", "text/plain; version=0.0.4")],
                            stockade::worker::metrics::queue_gauges(&env, &s, std::time::SystemTime::now()),
                        )
                    })
                }
            }),
        );
    tracing::info!(%addr, environment_id = %env, "serving the queue's statistics on /stats and /metrics");
    let (tx, mut rx) = watch::channel(Shutdown::Running);
    watch_signals(tx);
    let stop = async move {
        let _ = rx.changed().await;
    };
    match axum::serve(listener, app).with_graceful_shutdown(stop).await {
        Ok(()) => 0,
        Err(e) => fail(format!("--serve {addr}: {e}")),
    }
}

/// One line per work item: id, state, session, times.
fn work_line(w: &wire::WorkItem) -> String {
    format!(
        "{}  {:<8}  {} {}  created {}  last heartbeat {}",
        w.id,
        w.state,
        w.data.kind,
        w.data.id,
        w.created_at.as_deref().unwrap_or("-"),
        w.latest_heartbeat_at.as_deref().unwrap_or("-")
    )
}

pub(super) fn work(a: WorkArgs) -> i32 {
    let access = match &a.command {
        WorkListOrShow::List { access, .. } | WorkListOrShow::Show { access, .. } => access,
    };
    let client = match org_client(&access.api_url, access.api_key_file.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    runtime().block_on(async move {
        match a.command {
            WorkListOrShow::List { environment_id, limit, json, .. } => {
                let mut page: Option<String> = None;
                loop {
                    let got = match client.list_work(&environment_id, Some(limit), page.as_deref()).await {
                        Ok(p) => p,
                        Err(e) => return fail(e),
                    };
                    for w in &got.data {
                        if json {
                            println!("{}", serde_json::to_string(w).expect("serialises"));
                        } else {
                            println!("{}", work_line(w));
                        }
                    }
                    match got.next_page {
                        Some(p) if !p.is_empty() => page = Some(p),
                        _ => return 0,
                    }
                }
            }
            WorkListOrShow::Show { work_id, environment_id, json, .. } => {
                match client.retrieve(&environment_id, &work_id).await {
                    Ok(w) if json => {
                        println!("{}", serde_json::to_string_pretty(&w).expect("serialises"));
                        0
                    }
                    Ok(w) => {
                        println!("{}", work_line(&w));
                        for (k, v) in &w.metadata {
                            println!(
                                "  metadata {k} = {}",
                                v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())
                            );
                        }
                        0
                    }
                    Err(e) => fail(e),
                }
            }
        }
    })
}

pub(super) fn stop(a: StopArgs) -> i32 {
    let client = match org_client(&a.api_url, a.api_key_file.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    runtime().block_on(async move {
        match client.stop(&a.environment_id, &a.work_id, a.force).await {
            Ok(w) => {
                println!("{} {}", w.id, w.state);
                0
            }
            Err(e) => fail(e),
        }
    })
}

const DEMO_SCRIPT: &str = include_str!("demo.jsonl");

/// `stockade demo`: the whole main job in one process.
pub(super) fn demo() -> i32 {
    let steps = match local::parse_script(DEMO_SCRIPT, "demo.jsonl") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let cp = match LocalControlPlane::new(LocalConfig::default()) {
        Ok(cp) => cp,
        Err(e) => return fail(e),
    };
    let state = std::env::temp_dir().join(format!("stockade-demo-{}", std::process::id()));
    let env_key = cp.environment_key(local::DEFAULT_ENVIRONMENT).expect("default environment");
    // The policy `run` would pick; without one, the built-in this user can run: a user without
    // root cannot make the default's cgroups and per-session filesystems.
    let policy = super::policy_spec(None)
        .unwrap_or_else(|| if nix::unistd::geteuid().is_root() { "default" } else { "rootless" }.to_owned());
    let code = runtime().block_on(async {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => return fail(format!("binding a loopback port: {e}")),
        };
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let (stop_cp, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(cp.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        println!("local control plane on {url}; environment {}", local::DEFAULT_ENVIRONMENT);
        // A memory store the agent reads and changes: the worker mounts it in the jail and saves
        // the change back to the store.
        let store = match cp
            .create_memory_store("notes", "what the agent learnt about the user")
            .and_then(|id| cp.put_memory(&id, "/preferences.md", "The user prefers short answers.\n").map(|()| id))
        {
            Ok(id) => id,
            Err(e) => return fail(e),
        };
        let created = match cp.create_session(CreateSession {
            environment_id: local::DEFAULT_ENVIRONMENT.into(),
            script: steps,
            metadata: Default::default(),
            skills: Vec::new(),
            memory_stores: vec![local::memory::Attached {
                memory_store_id: store.clone(),
                mount_path: Some("/mnt/memory/notes".into()),
                read_only: false,
            }],
            no_secret: false,
        }) {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        println!(
            "session {} queued as work item {}; starting a worker (policy: {policy})\n",
            created.session_id, created.work_id
        );
        let mut cfg = WorkerConfig::new(local::DEFAULT_ENVIRONMENT, &url, env_key);
        cfg.policy = policy.clone();
        cfg.state_dir = state.clone();
        cfg.max_sessions = 1;
        cfg.max_idle = Duration::from_secs(1);
        let (tx, rx) = watch::channel(Shutdown::Running);
        let w = tokio::spawn(worker::run(cfg, rx));
        let t = Instant::now();
        let view = loop {
            let v = cp.session_view(&created.session_id).expect("session exists");
            let done = v.work_state == wire::WorkState::Stopped;
            if done || t.elapsed() > Duration::from_secs(120) || w.is_finished() {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = tx.send(Shutdown::Graceful);
        let worker_result = w.await;
        let _ = stop_cp.send(());
        print!("{}", transcript(&view));
        for (path, content) in cp.memories(&store).unwrap_or_default() {
            println!("\nthe memory store notes ({store}) now holds {path}: {}", content.trim_end());
        }
        let answered = view.calls.iter().all(|c| c.result.is_some());
        match worker_result {
            Ok(Err(e)) => fail(e),
            _ if view.work_state == wire::WorkState::Stopped && view.finished && answered => {
                // Said only of a session that ran.
                println!("\n{}", confinement_summary(&policy));
                println!(
                    "demo finished: {} tool calls, all answered, in {:.1} s",
                    view.calls.len(),
                    t.elapsed().as_secs_f64()
                );
                0
            }
            _ => fail(format!("the demo session did not complete (work item {})", view.work_state)),
        }
    });
    let _ = std::fs::remove_dir_all(&state);
    code
}

fn confinement_summary(policy: &str) -> String {
    let Ok((p, _)) = stockade::policy::load(Some(policy)) else { return String::new() };
    let l = &p.limits;
    format!(
        "what confined the session (policy {}):\n  \
         namespaces   user, mount, pid, ipc, uts, net, cgroup; network {}; hostname \"{}\"\n  \
         filesystem   tmpfs root, read-only system dirs, rw /workspace, /mnt/session/outputs, /tmp,\n               \
         memory store folders (read-only when attached so)\n  \
         privileges   no capabilities, no_new_privs, jail uid {}\n  \
         landlock     {}; seccomp allowlist of groups {}, default {}\n  \
         limits       memory {}, pids {}{}, the worker's environment key never entered the jail",
        p.source,
        stockade::policy::spelling(&p.network.mode),
        p.hostname,
        p.user.uid,
        stockade::policy::spelling(&p.landlock.compatibility),
        p.seccomp.allow.join(" "),
        stockade::policy::spelling(&p.seccomp.default_action),
        l.memory.map(|m| stockade::util::format_size(m.0)).unwrap_or_else(|| "unlimited".into()),
        l.pids.map(|n| n.to_string()).unwrap_or_else(|| "unlimited".into()),
        match l.enforcement {
            stockade::policy::Enforcement::BestEffort =>
                " where the host let them apply (best_effort; the log says which not)",
            stockade::policy::Enforcement::Hard => "",
        },
    )
}
