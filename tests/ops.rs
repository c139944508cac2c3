//! The operator-facing commands end to end: `demo`, `control-plane` (serve, session create/show,
//! state kept across a restart), `worker`, `stats` and `stop`, as separate processes.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn demo_runs_the_main_job_and_exits_zero() {
    let out = ok(Command::new(STOCKADE).arg("demo").env_remove("ANTHROPIC_API_KEY").output().unwrap());
    for want in [
        "work item work_",
        "(stopped, handed out 1 time)",
        "I am agent (1000) on stockade, in /workspace",
        "still in /workspace, GREETING=hi",
        "    hello from the agent\n    edited line",
        "/workspace/src/main.rs",
        "/workspace/src/main.rs:1:fn main() {}",
        "error: read: /workspace/../etc/shadow: no such file or directory",
        "NoNewPrivs:\t1",
        "Read-only file system",
        "wrote the report to outputs",
        "    The user prefers short answers.",
        "edited /mnt/memory/notes/preferences.md (1 replacement(s))",
        "now holds /preferences.md: The user prefers short answers with an example.",
        "what confined the session (policy builtin:default)",
        "demo finished: 13 tool calls, all answered",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_cp(state: &Path, port: u16) -> Killed {
    let c = Command::new(STOCKADE)
        .args(["control-plane", "--listen", &format!("127.0.0.1:{port}"), "--state"])
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "control plane did not start");
        std::thread::sleep(Duration::from_millis(25));
    }
    Killed(c)
}

fn cli(org: &str, args: &[&str]) -> Output {
    Command::new(STOCKADE).args(args).env("ANTHROPIC_API_KEY", org).output().unwrap()
}

#[test]
fn control_plane_worker_stats_and_stop_from_the_command_line() {
    let state = TempDir::new("cp-state");
    let wstate = TempDir::new("w-state");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut cp = start_cp(state.path(), port);
    let org = std::fs::read_to_string(state.path().join("org.key")).unwrap();
    let script = state.path().join("calls.jsonl");
    std::fs::write(
        &script,
        "# two calls\n{\"name\": \"bash\", \"input\": {\"command\": \"echo from-the-cli\"}}\n\
         {\"name\": \"read\", \"input\": {\"file_path\": \"/workspace/none\"}, \"end_session\": true}\n\
         {\"name\": \"bash\", \"input\": {\"command\": \"echo never\"}}\n",
    )
    .unwrap();
    let created: serde_json::Value = serde_json::from_str(&ok(cli(
        &org,
        &["control-plane", "session", "create", "--api-url", &url, "--script", script.to_str().unwrap()],
    )))
    .unwrap();
    let (session, work) =
        (created["session_id"].as_str().unwrap().to_owned(), created["work_id"].as_str().unwrap().to_owned());
    let stats: serde_json::Value =
        serde_json::from_str(&ok(cli(&org, &["stats", "--environment-id", "env_local", "--api-url", &url, "--json"])))
            .unwrap();
    assert_eq!(
        (stats["type"].as_str(), stats["depth"].as_u64(), stats["pending"].as_u64()),
        (Some("work_queue_stats"), Some(1), Some(0))
    );
    assert!(stats["oldest_queued_at"].is_string());
    // Served for an autoscaler: the same JSON on /stats, the gauges on /metrics, no key asked of
    // the scraper (KEDA's metrics-api trigger cannot send the API's headers).
    let sport = free_port();
    let _serving = Killed(
        Command::new(STOCKADE)
            .args(["stats", "--environment-id", "env_local", "--api-url", &url])
            .args(["--serve", &format!("127.0.0.1:{sport}")])
            .env("ANTHROPIC_API_KEY", &org)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let get = |path: &str| -> Option<String> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", sport)).ok()?;
        write!(c, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").ok()?;
        let mut r = String::new();
        c.read_to_string(&mut r).ok()?;
        Some(r)
    };
    let t = Instant::now();
    let served = loop {
        if let Some(r) = get("/stats") {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "stats --serve did not start");
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let body: serde_json::Value = serde_json::from_str(served.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["depth"], 1, "{body}");
    let metrics = get("/metrics").unwrap();
    assert!(metrics.contains("stockade_queue_depth{environment_id=\"env_local\"} 1\n"), "{metrics}");
    // Stopping a queued item needs the organisation key, and an environment key is refused.
    let env_key = std::fs::read_to_string(state.path().join("env_local.key")).unwrap();
    let refused = cli(&env_key, &["stop", &work, "--environment-id", "env_local", "--api-url", &url]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("authentication failed"), "{refused:?}");

    // The queue as the operator sees it.
    let listed = ok(cli(&org, &["work", "list", "--environment-id", "env_local", "--api-url", &url]));
    assert!(
        listed.starts_with(&format!("{work}  queued")) && listed.contains(&format!("session {session}")),
        "{listed}"
    );
    let shown: serde_json::Value = serde_json::from_str(&ok(cli(
        &org,
        &["work", "show", &work, "--environment-id", "env_local", "--api-url", &url, "--json"],
    )))
    .unwrap();
    assert_eq!((shown["state"].as_str(), shown["data"]["id"].as_str()), (Some("queued"), Some(session.as_str())));
    assert!(shown["secret"].is_null(), "retrieve never carries the secret: {shown}");
    let missing = cli(&org, &["work", "show", "work_none", "--environment-id", "env_local", "--api-url", &url]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("not found"), "{missing:?}");

    // The control plane's state survives a restart.
    drop(cp);
    cp = start_cp(state.path(), port);
    let mut w = Killed(
        Command::new(STOCKADE)
            .args(["worker", "--environment-id", "env_local", "--api-url", &url, "--max-idle", "1s", "--state-dir"])
            .arg(wstate.path())
            .arg("--environment-key-file")
            .arg(state.path().join("env_local.key"))
            .env_remove("ANTHROPIC_API_KEY")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    let shown = loop {
        let s = ok(cli(&org, &["control-plane", "session", "show", &session, "--api-url", &url, "--json"]));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        if v["work_state"] == "stopped" {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{v:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let calls = shown["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "end_session stops the script: {shown:#}");
    assert_eq!(shown["status"], "terminated", "{shown:#}");
    assert_eq!(calls[0]["result"], "from-the-cli");
    assert_eq!(calls[1]["is_error"], true);
    let text = ok(cli(&org, &["control-plane", "session", "show", &session, "--api-url", &url]));
    assert!(text.contains("[1] bash {\"command\":\"echo from-the-cli\"}"), "{text}");
    assert!(text.contains("    from-the-cli"), "{text}");
    let stats: serde_json::Value =
        serde_json::from_str(&ok(cli(&org, &["stats", "--environment-id", "env_local", "--api-url", &url, "--json"])))
            .unwrap();
    assert_eq!(
        (stats["depth"].as_u64(), stats["pending"].as_u64(), stats["workers_polling"].as_u64()),
        (Some(0), Some(0), Some(1))
    );

    // stop from the command line reaches a running session.
    std::fs::write(&script, "{\"name\": \"bash\", \"input\": {\"command\": \"sleep 60\"}}\n").unwrap();
    let created: serde_json::Value = serde_json::from_str(&ok(cli(
        &org,
        &["control-plane", "session", "create", "--api-url", &url, "--script", script.to_str().unwrap()],
    )))
    .unwrap();
    let work = created["work_id"].as_str().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let out = ok(cli(&org, &["stop", work, "--environment-id", "env_local", "--api-url", &url, "--force"]));
    assert!(out.contains("stopping") || out.contains("stopped"), "{out}");
    let t = Instant::now();
    loop {
        let s = ok(cli(
            &org,
            &["control-plane", "session", "show", created["session_id"].as_str().unwrap(), "--api-url", &url, "--json"],
        ));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        if v["work_state"] == "stopped" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = w.0.kill();
    drop(cp);
}

/// The exit status table (README, `stockade --help`): usage and input errors are 2 in every
/// subcommand, 125 is only "the jail could not be built", and `run` passes its command's own.
#[test]
fn exit_statuses_follow_the_documented_table() {
    let status = |args: &[&str]| {
        let out = Command::new(STOCKADE)
            .args(args)
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("ANTHROPIC_ENVIRONMENT_KEY")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (args, want) in [
        (&["run", "--policy", "/nonexistent/p.toml", "--", "true"][..], 2),
        (&["session", "--policy", "/nonexistent/p.toml"][..], 2),
        (&["policy", "show", "/nonexistent/p.toml"][..], 2),
        (&["policy", "groups", "no-such-group"][..], 2),
        (&["audit", "--diff", "default"][..], 2),
        (&["probe", "--only", "no-such-probe"][..], 2),
        (&["run", "--timeout", "0", "--", "true"][..], 2),
        (&["run", "--env", "NOEQUALS", "--", "true"][..], 2),
        (&["worker", "--environment-id", "env_x", "--api-url", "http://127.0.0.1:9"][..], 2),
        (&["run", "--frobnicate"][..], 2),
        (&["check", "--policy", "/nonexistent/p.toml"][..], 1),
    ] {
        let (code, err) = status(args);
        assert_eq!(code, Some(want), "stockade {}: {err}", args.join(" "));
        assert!(err.contains("stockade: ") || err.contains("error: ") || want == 1, "{err}");
    }
    if is_root() {
        assert_eq!(status(&["run", "--", "/nonexistent"]).0, Some(127));
        assert_eq!(status(&["run", "--", "/etc/passwd"]).0, Some(126));
        assert_eq!(status(&["run", "--", "sh", "-c", "exit 3"]).0, Some(3));
        let out =
            Command::new(STOCKADE).args(["run", "--", "true"]).env("STOCKADE_LANDLOCK_ABI_CAP", "3").output().unwrap();
        assert_eq!(out.status.code(), Some(125), "a jail the host cannot build");
    }
}

/// Every subcommand that talks to an API takes its address the same way: `--base-url` (alias
/// `--api-url`), else $ANTHROPIC_BASE_URL.
#[test]
fn every_api_subcommand_takes_base_url_and_anthropic_base_url() {
    let commands: &[&[&str]] = &[
        &["worker"],
        &["worker", "run"],
        &["webhook"],
        &["stats"],
        &["stop"],
        &["work", "show"],
        &["control-plane", "session", "create"],
        &["control-plane", "session", "show"],
    ];
    for c in commands {
        let o = Command::new(STOCKADE).args(*c).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(
            help.contains("--base-url <URL>") && help.contains("ANTHROPIC_BASE_URL") && help.contains("--api-url"),
            "stockade {}: {help}",
            c.join(" ")
        );
    }
    // The variable is read: an unreachable address from it is the error's.
    let o = Command::new(STOCKADE)
        .args(["stats", "--environment-id", "env_x"])
        .env("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
        .env("ANTHROPIC_API_KEY", "k")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("127.0.0.1:9"), "{o:?}");
}
