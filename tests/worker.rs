//! End to end on loopback: `stockade worker` (a real process building real jails) against the
//! local control plane, served in-process by each test.

mod common;

use common::worker::*;
use common::*;
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stockade::control_plane::local::{Fault, FaultKind, LocalConfig, LocalSkill, ScriptStep, DEFAULT_ENVIRONMENT};
use stockade::control_plane::wire::{WorkState, NO_HEARTBEAT};
use stockade::control_plane::{ApiError, Secret};

#[test]
fn twenty_concurrent_sessions_complete_with_every_result_in_order() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let metrics_port = free_port();
    let _w =
        start_worker(&cp, state.path(), &["--max-sessions", "20", "--metrics", &format!("127.0.0.1:{metrics_port}")]);
    let sessions: Vec<(String, String)> = (0..20)
        .map(|n| {
            cp.session(vec![
                step("write", json!({"file_path": "/workspace/n.txt", "content": format!("session {n}\n")})),
                bash(&format!("cd /workspace && export N={n} && mkdir -p d{n} && touch d{n}/f.txt")),
                bash("echo \"$N $(pwd) $(cat n.txt)\""),
                step("read", json!({"file_path": "/workspace/n.txt"})),
                step("glob", json!({"pattern": "d*/*.txt"})),
                bash("exit 3"),
            ])
        })
        .collect();
    for (n, (s, _)) in sessions.iter().enumerate() {
        let v = cp.wait_ended(s, Duration::from_secs(120));
        assert!(completed(&v), "{v:#?}");
        assert_eq!(v.status, "idle");
        assert_eq!(v.polls, 1);
        assert_eq!(v.duplicate_results, 0);
        assert_eq!(v.calls.len(), 6);
        let size = format!("session {n}\n").len();
        assert_eq!(result_of(&v, 0), format!("wrote {size} bytes to /workspace/n.txt"));
        assert_eq!(result_of(&v, 1), "(no output)");
        assert_eq!(result_of(&v, 2), format!("{n} /workspace session {n}"));
        assert_eq!(result_of(&v, 3), format!("session {n}\n"));
        assert_eq!(result_of(&v, 4), format!("/workspace/d{n}/f.txt"));
        assert!(result_of(&v, 5).starts_with("(no output)\n[The shell is gone;"), "{:?}", result_of(&v, 5));
        assert_eq!(v.calls[5].is_error, Some(true));
        // In order: each call was issued after the previous one's result.
        for w in v.calls.windows(2) {
            assert!(w[0].answered_at.as_deref().unwrap() <= w[1].issued_at.as_str());
        }
        // Ended sessions keep their outputs under the state directory; workspaces go.
        cp.wait_for("the item's directory to go", Duration::from_secs(10), || {
            !state.path().join("items").join(&v.work_id).exists()
        });
        assert!(state.path().join("outputs").join(format!("{}-{}", s, v.work_id)).is_dir());
    }
    let m = http_get(&format!("http://127.0.0.1:{metrics_port}/metrics"));
    assert!(m.contains("stockade_claims_total 20\n"), "{m}");
    assert!(m.contains("stockade_tool_calls_total{tool=\"bash\",outcome=\"ok\"} 40\n"), "{m}");
    assert!(m.contains("stockade_tool_calls_total{tool=\"bash\",outcome=\"error\"} 20\n"), "{m}");
    assert!(m.contains("stockade_active_sessions 0\n"), "{m}");
    assert!(m.contains("stockade_lease_losses_total 0\n"), "items that end are not lost leases: {m}");
    let stats = cp.rt.block_on(cp.org().stats(DEFAULT_ENVIRONMENT)).unwrap();
    assert_eq!((stats.depth, stats.pending, stats.oldest_queued_at), (0, 0, None));
    assert_eq!(stats.workers_polling, Some(1));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

#[test]
fn heartbeats_keep_a_lease_and_a_silent_holder_loses_it() {
    let cp = Cp::start(Duration::from_secs(2));
    let state = TempDir::new("w-state");
    let w = start_worker(&cp, state.path(), &[]);
    // A call three times longer than the lease.
    let (s, _) = cp.session(vec![bash("sleep 6; echo slept")]);
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(v.polls, 1, "the lease expired while heartbeating");
    assert_eq!(result_of(&v, 0), "slept");

    // A holder that acks and never heartbeats: the item returns to the queue and is handed out
    // again; the first heartbeat of the new holder takes the lease, and the silent one's is refused.
    let env = cp.env();
    drop(w); // the real worker must not take the next item,
             // nor may the poll it had open when it died (the server holds one at most 999 ms).
    std::thread::sleep(Duration::from_millis(1200));
    let (s2, w2) = cp.session(vec![bash("true")]);
    let got = cp.rt.block_on(env.poll(DEFAULT_ENVIRONMENT, "silent", Some(999), None)).unwrap().unwrap();
    assert_eq!(got.id, w2);
    cp.rt.block_on(env.ack(DEFAULT_ENVIRONMENT, &w2)).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let stats = cp.rt.block_on(cp.org().stats(DEFAULT_ENVIRONMENT)).unwrap();
    assert_eq!(stats.depth, 1);
    let again = cp.rt.block_on(env.poll(DEFAULT_ENVIRONMENT, "other", Some(999), None)).unwrap().unwrap();
    assert_eq!(again.id, w2);
    cp.rt.block_on(env.ack(DEFAULT_ENVIRONMENT, &w2)).unwrap();
    let hb = cp.rt.block_on(env.heartbeat(DEFAULT_ENVIRONMENT, &w2, NO_HEARTBEAT, Duration::from_secs(2))).unwrap();
    assert!(hb.lease_extended && hb.state == WorkState::Active, "{hb:?}");
    let lost =
        cp.rt.block_on(env.heartbeat(DEFAULT_ENVIRONMENT, &w2, NO_HEARTBEAT, Duration::from_secs(2))).unwrap_err();
    assert!(matches!(lost, ApiError::LeaseLost(_)), "{lost:?}");
    assert_eq!(cp.view(&s2).polls, 2);
}

#[test]
fn graceful_stop_finishes_the_call_and_forced_stop_kills_at_once() {
    let cp = Cp::start(Duration::from_secs(10));
    let state = TempDir::new("w-state");
    let _w = start_worker(&cp, state.path(), &["--heartbeat-interval", "200ms"]);
    let org = cp.org();
    let marker = format!("7{}", std::process::id());

    let (s, w) = cp.session(vec![bash("sleep 2; echo finished"), bash("echo never")]);
    cp.wait_for("the call to start", Duration::from_secs(20), || cp.view(&s).work_state == WorkState::Active);
    std::thread::sleep(Duration::from_millis(300));
    let item = cp.rt.block_on(org.stop(DEFAULT_ENVIRONMENT, &w, false)).unwrap();
    assert_eq!(item.state, WorkState::Stopping);
    let v = cp.wait_ended(&s, Duration::from_secs(20));
    assert_eq!(v.work_state, WorkState::Stopped, "{v:#?}");
    assert_eq!(result_of(&v, 0), "finished", "the in-flight call was not finished");
    assert!(v.calls.len() == 1 || v.calls[1].result.is_none(), "a call ran after the stop: {v:#?}");

    let (s, w) = cp.session(vec![bash(&format!("sleep 30.{marker}; echo never"))]);
    cp.wait_for("the sleep to start", Duration::from_secs(20), || {
        !host_processes_matching(&format!("sleep 30.{marker}")).is_empty()
    });
    let t = Instant::now();
    cp.rt.block_on(org.stop(DEFAULT_ENVIRONMENT, &w, true)).unwrap();
    let v = cp.wait_ended(&s, Duration::from_secs(20));
    assert_eq!(v.work_state, WorkState::Stopped, "{v:#?}");
    assert!(t.elapsed() < Duration::from_secs(5), "forced stop took {:?}", t.elapsed());
    assert_eq!(v.calls[0].result, None);
    cp.wait_for("the jail to die", Duration::from_secs(5), || {
        host_processes_matching(&format!("sleep 30.{marker}")).is_empty()
    });
}

#[test]
fn control_plane_failures_lose_nothing_and_duplicate_nothing() {
    let cp = Cp::start(Duration::from_secs(10));
    let state = TempDir::new("w-state");
    let sessions: Vec<String> =
        (0..3).map(|n| cp.session((0..5).map(|i| bash(&format!("echo s{n} c{i}"))).collect()).0).collect();
    let f =
        |kind, count, path: &str, after| Fault { kind, count, path_contains: Some(path.into()), method: None, after };
    cp.faults(vec![
        f(FaultKind::ServerError, 2, "/work/poll", false),
        f(FaultKind::Garbage, 1, "/work/poll", true),
        f(FaultKind::ServerError, 3, "/events", true),
        f(FaultKind::RateLimited, 2, "/events", false),
        f(FaultKind::Truncated, 2, "/events", true),
        f(FaultKind::Garbage, 2, "/events", true),
        f(FaultKind::Timeout, 1, "/events", true),
        f(FaultKind::ServerError, 2, "/heartbeat", false),
        f(FaultKind::Timeout, 1, "/stop", true),
    ]);
    let _w = start_worker(&cp, state.path(), &["--heartbeat-interval", "500ms"]);
    for (n, s) in sessions.iter().enumerate() {
        let v = cp.wait_ended(s, Duration::from_secs(90));
        assert!(completed(&v), "{v:#?}");
        assert_eq!(v.duplicate_results, 0, "a result was posted twice: {v:#?}");
        assert_eq!(v.calls.len(), 5);
        for i in 0..5 {
            assert_eq!(result_of(&v, i), format!("s{n} c{i}"), "{v:#?}");
        }
    }
    // Every injected fault fired: a renamed route would have made this a happy-path run.
    assert!(cp.pending_faults().is_empty(), "faults never injected: {:?}", cp.pending_faults());
}

#[test]
fn a_killed_worker_is_restarted_and_the_session_completes_without_leftovers() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let marker = format!("3.{}", std::process::id());
    let (s, _) = cp.session(vec![
        bash("echo one > /workspace/one; echo one"),
        bash(&format!("sleep {marker}; echo two >> /workspace/two; echo two")),
        bash("cat /workspace/one /workspace/two; echo three"),
    ]);
    let mut w = start_worker(&cp, state.path(), &[]);
    cp.wait_for("the second call to start", Duration::from_secs(20), || {
        !host_processes_matching(&format!("sleep {marker}")).is_empty()
    });
    // The worker's session processes: their pids name the jails' cgroups.
    let session_pids = processes_whose_cmdline_has(&format!("{}/items/", state.path().display()));
    assert!(!session_pids.is_empty());
    // Their jails' cgroups, seen while they run: these, and only these, must go.
    let jail_cgroups: Vec<String> = find_stockade_cgroups()
        .into_iter()
        .filter(|c| session_pids.iter().any(|p| c.contains(&format!("/stockade-{p}-"))))
        .collect();
    if is_root() {
        assert!(!jail_cgroups.is_empty(), "the session's jail has no cgroup");
    }
    w.kill9();
    cp.wait_for("the jail to die with its worker", Duration::from_secs(5), || {
        host_processes_matching(&format!("sleep {marker}")).is_empty()
    });
    assert_eq!(processes_whose_cmdline_has(&format!("{}/items/", state.path().display())), Vec::<u32>::new());
    assert_eq!(cp.view(&s).calls[1].result, None);
    // The sweep leaves cgroups younger than a second alone (one may be a jail being built); the
    // killed jails' may be that young when the test gets here this fast.
    std::thread::sleep(Duration::from_millis(1200));

    let _w2 = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(v.polls, 1, "resumed under the same lease, not re-queued");
    assert_eq!(v.duplicate_results, 0);
    assert_eq!(result_of(&v, 0), "one");
    assert_eq!(result_of(&v, 1), "two");
    // The workspace survived the crash; the interrupted call ran once more, to completion.
    assert_eq!(result_of(&v, 2), "one\ntwo\nthree");
    if is_root() {
        // The restarted worker removed the cgroups the killed one's jails left.
        let left: Vec<&String> = jail_cgroups.iter().filter(|c| Path::new(c.as_str()).exists()).collect();
        assert_eq!(left, Vec::<&String>::new());
    }
}

#[test]
fn the_environment_key_never_reaches_a_jailed_process() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let key = cp.env_key();
    // Passed the riskiest way, through the worker's environment.
    let mut c = worker_cmd(&cp, state.path(), &[]);
    c.env("ANTHROPIC_ENVIRONMENT_KEY", &key);
    // And an inherited descriptor open on a file holding it, as a careless parent might leave.
    let key_fd = std::fs::File::open(cp.key_file()).unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&key_fd);
    // SAFETY: dup2 in the forked child before exec; async-signal-safe, no shared memory touched.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            if libc::dup2(raw, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut w = Worker { child: c.spawn().unwrap() };
    let tail = &key[key.len() - 16..];
    // Split, so that the command line holding the pattern does not itself match.
    let (a, b) = tail.split_at(8);
    let key_path = cp.key_file();
    let (s, _) = cp.session(vec![
        bash(&format!(
            "printf '%s' '{a}' > /tmp/.pat; printf '%s' '{b}' >> /tmp/.pat; \
             for p in /proc/[0-9]*; do tr '\\0' '\\n' < $p/environ; tr '\\0' ' ' < $p/cmdline; done 2>/dev/null | grep -cFf /tmp/.pat; \
             grep -rlsFf /tmp/.pat --exclude=.pat /etc /tmp /workspace /mnt /dev/shm /run /var /root /home 2>/dev/null | head -3; \
             ls /proc/self/fd | tr '\\n' ' '; echo; env | grep -c ANTHROPIC"
        )),
        step("grep", json!({"pattern": tail, "path": "/etc", "output_mode": "files_with_matches"})),
    ]);
    // While the session lives, its session process (outside the jail) holds no descriptor of the
    // worker's either.
    cp.wait_for("the first result", Duration::from_secs(60), || {
        cp.view(&s).calls.first().is_some_and(|c| c.result.is_some())
    });
    let session_pids = processes_whose_cmdline_has(&format!("{}/items/", state.path().display()));
    assert!(!session_pids.is_empty(), "no session process to look at");
    for pid in session_pids {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert_ne!(target, key_path, "the session process {pid} holds the worker's descriptor");
        }
    }
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    let out = result_of(&v, 0);
    assert!(!out.contains(&key));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"0"), "the key is in a jailed process's environ or argv: {out}");
    // Only stdio and the directory ls itself opened: fd 9 stayed out; no file matched the key.
    assert_eq!(lines.get(1).map(|l| l.trim()), Some("0 1 2 3"), "{out}");
    assert_eq!(lines.get(2), Some(&"0"), "{out}");
    assert!(!result_of(&v, 1).contains('/'), "{}", result_of(&v, 1));
    // Host side: scrubbed from the worker's own /proc environ, absent from the session processes.
    let worker_env = std::fs::read(format!("/proc/{}/environ", w.child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&worker_env).contains(tail), "the worker's /proc environ still holds the key");
    w.kill9();

    // An organisation key in the worker's environment is refused.
    let out = worker_cmd(&cp, state.path(), &[])
        .env("ANTHROPIC_ENVIRONMENT_KEY", &key)
        .env("ANTHROPIC_API_KEY", "sk-ant-org-test")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("organization-scoped credential to agent tool calls"), "{err}");
}

#[test]
fn webhook_deliveries_wake_the_worker_and_bad_ones_are_refused() {
    use base64::Engine;
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let key = b"0123456789abcdef0123456789abcdef";
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let secret_file = cp.dir.path().join("whsec");
    std::fs::write(&secret_file, &secret).unwrap();
    let port = free_port();
    let mut c = Command::new(STOCKADE);
    c.args(["-v", "webhook", "--listen", &format!("127.0.0.1:{port}"), "--secret-file"])
        .arg(&secret_file)
        .args(["--environment-id", DEFAULT_ENVIRONMENT, "--api-url", &cp.url, "--state-dir"])
        .arg(state.path())
        .args(["--max-idle", "1s", "--environment-key-file"])
        .arg(cp.key_file())
        .env_remove("ANTHROPIC_API_KEY")
        .stdin(Stdio::null());
    let _w = Worker { child: c.spawn().unwrap() };
    let url = format!("http://127.0.0.1:{port}/hooks/stockade");
    cp.wait_for("the webhook listener", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // The first drain at start finds nothing; then only a delivery wakes the worker (its own
    // timer is 30 s). Polls are counted from the control plane's log.
    let polls = || cp.cp.requests().iter().filter(|r| r.method == "GET" && r.path.ends_with("/work/poll")).count();
    cp.wait_for("the first drain", Duration::from_secs(10), || polls() >= 1);
    let drained = polls();
    let (s, _) = cp.session(vec![bash("echo woken")]);
    let body = br#"{"type":"event","data":{"type":"session.status_run_started","id":"sesn_x"}}"#;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let post = |id: &str, ts: u64, sig: &str, body: &[u8]| -> u16 {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            reqwest::Client::new()
                .post(&url)
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .body(body.to_vec())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let sign = |id: &str, ts: u64, body: &[u8]| stockade::control_plane::webhook::sign(key, id, &ts.to_string(), body);
    assert_eq!(
        post(
            "m1",
            now,
            &stockade::control_plane::webhook::sign(b"wrong-secret-wrong-secret", "m1", &now.to_string(), body),
            body
        ),
        401
    );
    assert_eq!(post("m2", now - 3600, &sign("m2", now - 3600, body), body), 401);
    assert_eq!(post("m3", now, &sign("m3", now, body), &body[..body.len() - 5]), 401);
    assert_eq!(post("m4", now, "v1,", body), 401);
    // A timestamp past the clock's range, signed or not, is refused and the worker lives on.
    assert_eq!(post("m6", u64::MAX, &sign("m6", u64::MAX, body), body), 401);
    // A wrong wake would show as a poll: watch for one over a window, then show (below) that a
    // real wake is seen well within such a window.
    const WINDOW: Duration = Duration::from_secs(2);
    let t = std::time::Instant::now();
    while t.elapsed() < WINDOW {
        assert_eq!(polls(), drained, "a rejected delivery woke the worker");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cp.view(&s).work_state, WorkState::Queued, "a rejected delivery woke the worker");
    let t = std::time::Instant::now();
    assert_eq!(post("m5", now, &sign("m5", now, body), body), 204);
    cp.wait_for("the delivery's drain", Duration::from_secs(10), || polls() > drained);
    let woke_in = t.elapsed();
    assert!(woke_in * 4 < WINDOW, "a real wake took {woke_in:?}: the window could miss a wrong one");
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "woken");
    assert_eq!(post("m5", now, &sign("m5", now, body), body), 401, "a replayed delivery was accepted");
}

/// A `--max-idle` past the clock's range is no idle limit: the worker runs the session, keeps
/// it while the agent's turn has ended, and stops cleanly (adding it to the time the session went
/// idle overflowed).
#[test]
fn a_max_idle_past_the_clocks_range_is_no_idle_limit() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let key = cp.key_file();
    let mut c = worker_cmd(&cp, state.path(), &["--max-idle", "213503982334601d"]);
    c.arg("--environment-key-file").arg(&key).stderr(Stdio::piped());
    let mut w = Worker { child: c.spawn().unwrap() };
    let (s, _) = cp.session(vec![bash("echo idle")]);
    cp.wait_for("the result", Duration::from_secs(30), || result_of(&cp.view(&s), 0) == "idle");
    // Idle now, past the point where the idle deadline is computed.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(w.child.try_wait().unwrap().is_none(), "the worker ended while the session was idle");
    assert_eq!(cp.view(&s).work_state, WorkState::Active, "the idle session was let go");
    assert!(w.sigterm().success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut w.child.stderr.take().unwrap(), &mut log).unwrap();
    // A release build aborts on a panic; a test build only loses the session's task, and says so.
    assert!(!log.contains("panicked"), "{log}");
}

fn processes_whose_cmdline_has(needle: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).replace('\0', " ").contains(needle) {
                v.push(pid);
            }
        }
    }
    v
}

#[test]
fn sigterm_finishes_the_call_and_leaves_the_item_to_another_worker() {
    let cp = Cp::start(Duration::from_secs(3));
    let state = TempDir::new("w-state");
    let mut w = start_worker(&cp, state.path(), &[]);
    let (s, _) = cp.session(vec![bash("sleep 1.5; echo first"), bash("echo second")]);
    cp.wait_for("the call to start", Duration::from_secs(20), || {
        cp.view(&s).calls.first().is_some_and(|c| c.result.is_none()) && cp.view(&s).work_state == WorkState::Active
    });
    std::thread::sleep(Duration::from_millis(300));
    let status = w.sigterm();
    assert!(status.success(), "{status:?}");
    let v = cp.view(&s);
    assert_eq!(result_of(&v, 0), "first", "the in-flight call was not finished: {v:#?}");
    assert_ne!(v.work_state, WorkState::Stopped, "a worker shutting down must not end the item: {v:#?}");
    // Once the lease runs out the item is queued again, and another worker finishes it.
    let other = TempDir::new("w-state");
    let _w2 = start_worker(&cp, other.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 1), "second");
    assert_eq!((v.polls, v.duplicate_results), (2, 0));
}

#[test]
fn session_metadata_narrows_the_policy_but_never_widens_it() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let _w = start_worker(&cp, state.path(), &[]);
    let meta = |v: serde_json::Value| {
        let mut m = serde_json::Map::new();
        m.insert("stockade_narrow".into(), v);
        m
    };
    // What the jail lets the session do: write its workspace, and which interfaces it has.
    let probe = bash(
        "touch /workspace/x 2>&1 || true; echo \"ifaces: $(awk 'NR>2{print $1}' /proc/net/dev | tr '\\n' ' ')\"; \
         (exec 3<>/dev/tcp/127.0.0.1/9) 2>&1 | grep -o 'Connection refused\\|Network is unreachable' | head -1",
    );
    let (s, _) = cp.session_full(vec![probe.clone()], meta(json!({"workspace": "read_only", "network": "none"})));
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    let out = result_of(&v, 0);
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.ends_with("ifaces: lo: \nNetwork is unreachable"), "network none leaves loopback down: {out:?}");
    let (s, _) = cp.session_full(vec![probe.clone()], serde_json::Map::new());
    let plain = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(!result_of(&plain, 0).contains("Read-only"), "{}", result_of(&plain, 0));
    // The policy's loopback network: lo, up, and nothing else.
    assert!(result_of(&plain, 0).ends_with("ifaces: lo: \nConnection refused"), "{}", result_of(&plain, 0));
    // Asking for more than the policy allows changes nothing.
    let (s, _) = cp.session_full(vec![probe], meta(json!({"network": "veth", "memory": "512G"})));
    let wide = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&wide), "{wide:#?}");
    assert_eq!(result_of(&wide, 0), result_of(&plain, 0));
    // A request Stockade does not understand fails the item before any call runs.
    let (s, _) = cp.session_full(vec![bash("echo ran")], meta(json!({"netwrok": "none"})));
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(v.work_state == WorkState::Stopped && !v.finished, "{v:#?}");
    assert_eq!(v.calls[0].result, None);
}

#[test]
fn a_lost_lease_kills_the_jail_at_once_and_the_item_is_handed_out_again() {
    let cp = Cp::start(Duration::from_secs(2));
    let state = TempDir::new("w-state");
    let port = free_port();
    let marker = format!("5.{}", std::process::id());
    let _w = start_worker(&cp, state.path(), &["--metrics", &format!("127.0.0.1:{port}")]);
    let (s, _) = cp.session(vec![
        bash("echo kept > /workspace/first; echo one"),
        bash(&format!("sleep {marker}; cat /workspace/first; echo done")),
    ]);
    cp.wait_for("the first attempt", Duration::from_secs(20), || {
        !host_processes_matching(&format!("sleep {marker}")).is_empty()
    });
    // Heartbeats fail from now on, until the jail is seen killed (a fixed count would race the
    // lease against the worker's retries).
    cp.faults(vec![Fault {
        kind: FaultKind::ServerError,
        count: 1_000,
        path_contains: Some("/heartbeat".into()),
        method: None,
        after: false,
    }]);
    let first: Vec<String> = host_processes_matching(&format!("sleep {marker}"));
    // Within the lease (2 s) plus a heartbeat period the worker gives up and kills the jail.
    cp.wait_for("the jail to be killed", Duration::from_secs(10), || {
        host_processes_matching(&format!("sleep {marker}")).iter().all(|p| !first.contains(p))
    });
    cp.clear_faults();
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert!(v.polls >= 2, "{v:#?}");
    // Handed back to the same worker, the session goes on in the workspace it had.
    assert_eq!((result_of(&v, 0), result_of(&v, 1)), ("one", "kept\ndone"));
    assert_eq!(v.duplicate_results, 0);
    let m = http_get(&format!("http://127.0.0.1:{port}/metrics"));
    let losses: u64 = m.lines().find_map(|l| l.strip_prefix("stockade_lease_losses_total ")).unwrap().parse().unwrap();
    // One hold is lost for sure; the item can be handed back to this worker while heartbeats
    // still fail, and that hold can be lost as well. Never more: finished items do not count.
    assert!((1..=2).contains(&losses), "{losses} losses: {m}");
    assert!(m.contains("stockade_heartbeat_failures_total "), "{m}");
}

#[test]
fn a_second_sigterm_forces_the_stop() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let marker = format!("40.{}", std::process::id());
    let mut w = start_worker(&cp, state.path(), &[]);
    let (s, _) = cp.session(vec![bash(&format!("sleep {marker}; echo never"))]);
    cp.wait_for("the call to start", Duration::from_secs(20), || {
        !host_processes_matching(&format!("sleep {marker}")).is_empty()
    });
    let pid = nix::unistd::Pid::from_raw(w.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(w.child.try_wait().unwrap().is_none(), "a graceful stop must wait for the in-flight call");
    let t = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = w.child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "forced stop took {:?}", t.elapsed());
    assert!(status.success(), "{status:?}");
    assert!(host_processes_matching(&format!("sleep {marker}")).is_empty(), "the jail outlived a forced stop");
    let v = cp.view(&s);
    assert_ne!(v.work_state, WorkState::Stopped, "a worker shutting down must not end the item: {v:#?}");
    assert_eq!(v.calls[0].result, None);
}

/// Every request Stockade's worker sends, checked against the wire format the official SDKs
/// speak (`shared/spec/control-plane.md`): method, path, query, headers and body.
#[test]
fn every_request_the_worker_sends_matches_the_spec() {
    use stockade::control_plane::local::RecordedRequest;
    let cp = Cp::start(Duration::from_secs(4));
    let state = TempDir::new("w-state");
    let (s, work) = cp.session(vec![
        step("write", json!({"file_path": "/workspace/a.txt", "content": "a"})),
        step("web_fetch", json!({"url": "https://example.com"})),
        ScriptStep { permission: Some("deny".into()), ..bash("echo denied") },
        ScriptStep { permission: Some("ask".into()), confirm: Some("allow".into()), ..bash("echo asked") },
        bash("sleep 3; echo slow"),
        bash(""),
    ]);
    let _w = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    let answered: Vec<Option<&str>> = v.calls.iter().map(|c| c.answered_by.as_deref()).collect();
    assert_eq!(answered, [Some("worker"), Some("other"), Some("none"), Some("worker"), Some("worker"), Some("worker")]);
    assert_eq!(result_of(&v, 5), "bash: command is required");

    let reqs: Vec<RecordedRequest> = cp
        .cp
        .requests()
        .into_iter()
        .filter(|r| r.headers.get("user-agent").is_some_and(|u| u.starts_with("stockade/")))
        .collect();
    assert!(!reqs.is_empty());
    let env = format!("/v1/environments/{DEFAULT_ENVIRONMENT}/work");
    let item = format!("{env}/{work}");
    let events = format!("/v1/sessions/{s}/events");
    let mut expected_beats: Vec<String> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in &reqs {
        let q = |k: &str| r.query.iter().filter(|(n, _)| n == k).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
        let what = format!("{} {}?{:?} {:?}", r.method, r.path, r.query, r.body);
        assert_eq!(r.headers.get("anthropic-version").map(String::as_str), Some("2026-10-21"), "{what}");
        assert_eq!(r.headers.get("anthropic-beta").map(String::as_str), Some("managed-agents-2026-04-01"), "{what}");
        assert!(q("beta").is_empty(), "{what}");
        assert!(!r.credential.contains("x-api-key"), "{what}: {}", r.credential);
        let route = match (r.method.as_str(), r.path.as_str()) {
            ("GET", p) if p == format!("{env}/poll") => {
                let block: u32 = q("block_ms")[0].parse().unwrap();
                assert!((1..=999).contains(&block), "{what}");
                assert!(r.headers.get("anthropic-worker-id").is_some_and(|w| !w.is_empty()), "{what}");
                assert_eq!(r.credential, format!("bearer:environment:{DEFAULT_ENVIRONMENT}"), "{what}");
                "poll"
            }
            ("POST", p) if p == format!("{item}/ack") => {
                assert_eq!(r.body_len, 0, "{what}");
                assert_eq!(r.credential, format!("bearer:environment:{DEFAULT_ENVIRONMENT}"), "{what}");
                "ack"
            }
            ("POST", p) if p == format!("{item}/heartbeat") => {
                assert_eq!(r.body_len, 0, "{what}");
                let e = q("expected_last_heartbeat");
                assert_eq!(e.len(), 1, "{what}");
                expected_beats.push(e[0].to_owned());
                assert_eq!(r.credential, format!("bearer:item:{work}"), "{what}");
                "heartbeat"
            }
            ("POST", p) if p == format!("{item}/stop") => {
                assert_eq!(r.body, Some(json!({"force": true})), "{what}");
                assert_eq!(r.credential, format!("bearer:item:{work}"), "{what}");
                "stop"
            }
            ("GET", p) if p == format!("{events}/stream") => {
                assert_eq!(r.credential, format!("bearer:item:{work}"), "{what}");
                "stream"
            }
            ("GET", p) if p == events => {
                assert_eq!(q("limit"), ["1000"], "{what}");
                assert_eq!(r.credential, format!("bearer:item:{work}"), "{what}");
                "list"
            }
            ("POST", p) if p == events => {
                let b = r.body.as_ref().unwrap();
                let evs = b["events"].as_array().unwrap();
                assert_eq!(evs.len(), 1, "one result per request: {what}");
                let e = evs[0].as_object().unwrap();
                let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
                keys.sort_unstable();
                assert_eq!(keys, ["content", "is_error", "tool_use_id", "type"], "{what}");
                assert_eq!(e["type"], "user.tool_result");
                let blocks = e["content"].as_array().unwrap();
                assert!(!blocks.is_empty() && blocks.iter().all(|b| b["type"] == "text" && b["text"] != ""), "{what}");
                assert_eq!(r.credential, format!("bearer:item:{work}"), "{what}");
                "send"
            }
            ("GET", p) if p == format!("/v1/sessions/{s}") => {
                assert_eq!(r.credential, format!("bearer:item:{work}"), "{what}");
                "session"
            }
            _ => panic!("a request the spec does not know: {what}"),
        };
        seen.insert(route);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["ack", "heartbeat", "list", "poll", "send", "session", "stop", "stream"]
    );
    // The lease chain: NO_HEARTBEAT first, then each answer echoed, never repeated.
    assert_eq!(expected_beats.first().map(String::as_str), Some(NO_HEARTBEAT));
    assert!(expected_beats.len() >= 3, "a 3 s call under a 4 s lease needs more beats: {expected_beats:?}");
    let mut dedup = expected_beats.clone();
    dedup.dedup();
    assert_eq!(dedup, expected_beats, "a heartbeat echoed an old answer");
}

/// A worker killed after its result reached the control plane but before the answer came back:
/// the restarted worker finds the result in the session and does not post it again.
#[test]
fn a_result_whose_answer_was_lost_in_a_crash_is_not_posted_again() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let (s, _) = cp.session(vec![bash("echo once"), bash("echo after")]);
    // The first result lands, and its answer is held back for six seconds.
    cp.faults(vec![Fault {
        kind: FaultKind::Timeout,
        count: 1,
        path_contains: Some("/events".into()),
        method: Some("POST".into()),
        after: true,
    }]);
    let mut w = start_worker(&cp, state.path(), &[]);
    cp.wait_for("the first result to land", Duration::from_secs(20), || cp.view(&s).calls[0].result.is_some());
    w.kill9();
    let outbox: Vec<_> = std::fs::read_dir(state.path().join("items"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path().join("outbox")).unwrap().flatten())
        .collect();
    assert_eq!(outbox.len(), 1, "the result waits in the outbox of the killed worker");
    let _w2 = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(v.duplicate_results, 0, "the outbox entry was posted again without looking: {v:#?}");
    assert_eq!((result_of(&v, 0), result_of(&v, 1)), ("once", "after"));
}

/// A result whose answer is lost, and then the listings that would tell whether it landed: the
/// worker keeps looking and never posts it a second time.
#[test]
fn cannot_tell_is_not_taken_for_not_posted() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let (s, _) = cp.session(vec![bash("sleep 1; echo one"), bash("echo two")]);
    let _w = start_worker(&cp, state.path(), &[]);
    cp.wait_for("the stream to open", Duration::from_secs(20), || {
        cp.cp.requests().iter().any(|r| r.path.ends_with("/events/stream"))
    });
    let f = |kind, count, method: &str, after| Fault {
        kind,
        count,
        path_contains: Some(format!("/v1/sessions/{s}/events")),
        method: Some(method.into()),
        after,
    };
    cp.faults(vec![f(FaultKind::ServerError, 1, "POST", true), f(FaultKind::ServerError, 4, "GET", false)]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(v.duplicate_results, 0, "{v:#?}");
    assert_eq!((result_of(&v, 0), result_of(&v, 1)), ("one", "two"));
}

/// `stockade worker run` serves one session claimed by someone else, from the variables
/// `ant beta:worker poll --on-work` sets, and exits; the work secret alone is enough.
#[test]
fn worker_run_serves_one_claimed_session_from_the_environment() {
    let cp = Cp::start(Duration::from_secs(30));
    let env = cp.env();
    for with_env_key in [true, false] {
        let (s, work) = cp.session(vec![bash("echo from-worker-run")]);
        let item = cp.rt.block_on(env.poll(DEFAULT_ENVIRONMENT, "ant-poller", Some(999), None)).unwrap().unwrap();
        assert_eq!(item.id, work);
        cp.rt.block_on(env.ack(DEFAULT_ENVIRONMENT, &work)).unwrap();
        let before = cp.cp.requests().len();
        let state = TempDir::new("w-state");
        let mut c = Command::new(STOCKADE);
        c.args(["worker", "run", "--max-idle", "1s", "--state-dir"])
            .arg(state.path())
            .env_remove("ANTHROPIC_API_KEY")
            .env("ANTHROPIC_WORK_ID", &work)
            .env("ANTHROPIC_SESSION_ID", &s)
            .env("ANTHROPIC_ENVIRONMENT_ID", DEFAULT_ENVIRONMENT)
            .env("ANTHROPIC_WORK_SECRET", item.secret.as_deref().unwrap())
            .env("ANTHROPIC_BASE_URL", &cp.url)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if with_env_key {
            c.env("ANTHROPIC_ENVIRONMENT_KEY", cp.env_key());
        } else {
            c.env_remove("ANTHROPIC_ENVIRONMENT_KEY");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v = cp.view(&s);
        assert!(completed(&v), "{v:#?}");
        assert_eq!(result_of(&v, 0), "from-worker-run");
        let creds: std::collections::BTreeSet<String> = cp
            .cp
            .requests()
            .into_iter()
            .skip(before)
            .filter(|r| r.path.contains(&work) || r.path.contains(&s))
            .filter(|r| r.headers.get("user-agent").is_some_and(|u| u.starts_with("stockade/")))
            .map(|r| r.credential)
            .collect();
        assert_eq!(creds.into_iter().collect::<Vec<_>>(), [format!("bearer:item:{work}")]);
    }
}

/// A worker started from an operator's terminal lends it to no session: its session processes
/// have no controlling terminal and the jail cannot open /dev/tty.
#[test]
fn a_worker_started_from_a_terminal_keeps_it_from_its_sessions() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave_fd = pty.slave.as_raw_fd();
    let mut c = worker_cmd(&cp, state.path(), &[]);
    c.arg("--environment-key-file").arg(cp.key_file()).stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    // SAFETY: setsid and ioctl are async-signal-safe; the slave descriptor stays open in the parent.
    unsafe {
        c.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _w = Worker { child: c.spawn().unwrap() };
    // Keep the terminal's output drained so the worker's log never blocks on it.
    let master = pty.master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while nix::unistd::read(&master, &mut buf).is_ok_and(|n| n > 0) {}
    });
    nix::unistd::write(&pty.master, b"operator-typed-password-hunter2\n").unwrap();
    let marker = format!("1.5{}", std::process::id());
    let (s, _) = cp.session(vec![
        bash(&format!("sleep {marker}")),
        bash(
            "( : <>/dev/tty ) 2>/dev/null && echo OPENED || echo REFUSED; timeout 1 cat /dev/stderr 2>/dev/null; true",
        ),
    ]);
    // While the first call runs: the session process the worker started has a session of its
    // own, without a terminal (field 7 of /proc/PID/stat, tty_nr, is 0). It leaves the worker's
    // as the first thing it does, before it builds the jail: a call running is past that.
    let needle = format!("{}/items/", state.path().display());
    cp.wait_for("the first call to run", Duration::from_secs(20), || {
        !host_processes_matching(&format!("sleep {marker}")).is_empty()
    });
    let sessions = processes_whose_cmdline_has(&needle);
    assert!(!sessions.is_empty(), "no session process to look at");
    for pid in sessions {
        // A short-lived helper of the worker's (mkfs for the workspace) may be gone already.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        assert_eq!(fields.get(4), Some(&"0"), "session process {pid} has a controlling terminal: {stat}");
    }
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    let out = result_of(&v, 1);
    assert!(out.starts_with("REFUSED"), "a session opened the operator's terminal: {out}");
    assert!(!out.contains("hunter2"), "{out}");
}

/// A tar.gz with a wrapping directory and an executable script.
fn skill_archive(entries: &[(&str, &[u8], u32)]) -> String {
    use base64::Engine;
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    for (name, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    let gz = b.into_inner().unwrap().finish().unwrap();
    base64::engine::general_purpose::STANDARD.encode(gz)
}

#[test]
fn skills_are_unpacked_into_the_workspace_and_a_hostile_one_is_skipped() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let _w = start_worker(&cp, state.path(), &[]);
    let good = LocalSkill {
        name: "hello".into(),
        archive_base64: skill_archive(&[
            ("hello/SKILL.md", b"# hello", 0o644),
            ("hello/bin/run.sh", b"#!/bin/sh\necho skill ran in $(pwd)\n", 0o755),
        ]),
    };
    // Enough `..` to climb out of any staging directory under the state dir: where the member
    // would land if it were joined as written is /tmp itself, so that is where to look for it.
    let planted = format!("skill-{}", std::process::id());
    let evil_name = format!("{}tmp/{planted}", "../".repeat(25));
    let landing = lexical(&state.path().join("items/ITEM/workspace/skills/.skill-0123456789abcdef").join(&evil_name));
    assert_eq!(landing, Path::new("/tmp").join(&planted), "the traversal would land elsewhere");
    let evil = LocalSkill {
        name: "evil".into(),
        archive_base64: skill_archive(&[("evil/ok", b"x", 0o644), (&evil_name, b"x", 0o644)]),
    };
    let (s, _) = cp.session_with_skills(
        vec![bash(
            "/workspace/skills/hello/bin/run.sh; ls /workspace/skills; stat -c %a /workspace/skills/hello/SKILL.md",
        )],
        serde_json::Map::new(),
        vec![good, evil],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    let escaped = landing.exists();
    let _ = std::fs::remove_file(&landing);
    assert!(!escaped, "{} was written by a skill archive", landing.display());
    assert_eq!(result_of(&v, 0), "skill ran in /workspace\nhello\n644", "{v:#?}");
}

/// `p` with `.` and `..` resolved by name alone (`..` at the root stays there), as a naive
/// extractor joining a member name would.
fn lexical(p: &Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// The local control plane delivers `session.status_run_started` itself, signed; a webhook
/// worker with the key in $ANTHROPIC_WEBHOOK_SIGNING_KEY wakes on it and serves the session.
#[test]
fn the_control_planes_own_deliveries_wake_a_webhook_worker() {
    use base64::Engine;
    let key = b"fedcba9876543210fedcba9876543210".to_vec();
    let port = free_port();
    let cp = Cp::start_with(LocalConfig {
        lease: Duration::from_secs(30),
        webhook: Some((format!("http://127.0.0.1:{port}/hook"), key.clone())),
        ..LocalConfig::default()
    });
    let state = TempDir::new("w-state");
    let mut c = Command::new(STOCKADE);
    c.args(["-v", "webhook", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--environment-id", DEFAULT_ENVIRONMENT, "--api-url", &cp.url, "--state-dir"])
        .arg(state.path())
        .args(["--max-idle", "1s", "--environment-key-file"])
        .arg(cp.key_file())
        .env_remove("ANTHROPIC_API_KEY")
        .env(
            "ANTHROPIC_WEBHOOK_SIGNING_KEY",
            format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&key)),
        )
        .stdin(Stdio::null());
    let w = Worker { child: c.spawn().unwrap() };
    cp.wait_for("the webhook listener", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // Only a delivery can serve the session: the start-up drain is over, the timer is 30 s away.
    cp.wait_for("the first drain", Duration::from_secs(10), || {
        cp.cp.requests().iter().any(|r| r.method == "GET" && r.path.ends_with("/work/poll"))
    });
    let (s, _) = cp.session(vec![bash("echo delivered")]);
    let v = cp.wait_ended(&s, Duration::from_secs(20));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "delivered");
    let environ = std::fs::read(format!("/proc/{}/environ", w.child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("whsec_"), "the signing key stayed in the environment");
}

/// A health-check item is acknowledged and stopped without a jail or a single session call.
#[test]
fn a_health_check_item_is_stopped_without_running_anything() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let hc = cp.cp.create_healthcheck(DEFAULT_ENVIRONMENT).unwrap();
    let _w = start_worker(&cp, state.path(), &[]);
    cp.wait_for("the health check to be stopped", Duration::from_secs(20), || {
        cp.cp.work_state(&hc) == Some(WorkState::Stopped)
    });
    let touched: Vec<String> = cp
        .cp
        .requests()
        .into_iter()
        .filter(|r| r.path.contains(&hc) || r.path.starts_with("/v1/sessions/"))
        .map(|r| format!("{} {}", r.method, r.path.replace(&hc, "ID")))
        .collect();
    let env = format!("/v1/environments/{DEFAULT_ENVIRONMENT}/work/ID");
    assert_eq!(touched, [format!("POST {env}/ack"), format!("POST {env}/stop")]);
    assert!(!state.path().join("items").join(&hc).exists());
}

/// A worker paused past its lease (SIGSTOP) while another holder took the item over: when it
/// wakes, it confirms the lease before posting, finds it gone, drops its result and kills the jail.
#[test]
fn a_paused_worker_does_not_post_for_an_item_it_no_longer_holds() {
    let cp = Cp::start(Duration::from_secs(2));
    let state = TempDir::new("w-state");
    let marker = format!("2.{}", std::process::id());
    let (s, work) = cp.session(vec![bash(&format!("sleep {marker}; echo late"))]);
    // Heartbeats far apart, so that nothing but the check before posting can notice the loss.
    let w = start_worker(&cp, state.path(), &["--heartbeat-interval", "30s"]);
    cp.wait_for("the call to start", Duration::from_secs(20), || {
        !host_processes_matching(&format!("sleep {marker}")).is_empty()
    });
    let pid = nix::unistd::Pid::from_raw(w.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // The lease runs out; another holder takes the item and its lease.
    let env = cp.env();
    cp.wait_for("the item to be queued again", Duration::from_secs(10), || {
        cp.cp.work_state(&work) == Some(WorkState::Queued)
    });
    let got = cp.rt.block_on(env.poll(DEFAULT_ENVIRONMENT, "second", Some(999), None)).unwrap().unwrap();
    assert_eq!(got.id, work);
    cp.rt.block_on(env.ack(DEFAULT_ENVIRONMENT, &work)).unwrap();
    cp.rt.block_on(env.heartbeat(DEFAULT_ENVIRONMENT, &work, NO_HEARTBEAT, Duration::from_secs(2))).unwrap();
    // By now the paused worker's call has finished; it wakes with a result to post.
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Not a fixed wait: the woken worker asks for a beat before posting, learns the lease is gone
    // and sets the item aside. Once it has, it can no longer post; had it posted, that came first.
    let lost = state.path().join("items").join(&work).join("lost_at");
    cp.wait_for("the woken worker to set the item aside", Duration::from_secs(20), || lost.exists());
    let v = cp.view(&s);
    assert_eq!(v.calls[0].result, None, "the paused worker posted for an item it no longer held: {v:#?}");
    assert_eq!(v.duplicate_results, 0);
}

/// Events the worker cannot read — a type it does not know, a known type missing what it needs —
/// are skipped, never retried; a listing that keeps failing for a whole lease ends the item.
#[test]
fn unreadable_events_are_skipped_and_a_dead_listing_ends_the_item() {
    let cp = Cp::start(Duration::from_secs(2));
    let state = TempDir::new("w-state");
    let (s, _) = cp.session(vec![bash("echo past-the-odd-events")]);
    cp.cp
        .push_raw_event(&s, json!({"type": "span.model_request_start", "span": {"nested": [1, {"x": null}]}}))
        .unwrap();
    cp.cp.push_raw_event(&s, json!({"type": "agent.tool_use", "input": {"no": "name"}})).unwrap();
    cp.cp.push_raw_event(&s, json!({"type": "session.thread_created", "session_thread_id": 7})).unwrap();
    let _w = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(20));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "past-the-odd-events");

    let (s2, _) = cp.session(vec![bash("echo never")]);
    cp.faults(vec![Fault {
        kind: FaultKind::ServerError,
        count: 100_000,
        path_contains: Some(format!("/v1/sessions/{s2}/events")),
        method: Some("GET".into()),
        after: false,
    }]);
    let t = Instant::now();
    let v = cp.wait_ended(&s2, Duration::from_secs(30));
    assert!(v.work_state == WorkState::Stopped && !v.finished, "{v:#?}");
    assert!(t.elapsed() < Duration::from_secs(15), "the item held its slot for {:?}", t.elapsed());
    assert_eq!(v.calls[0].result, None);
}

/// A response body over the worker's limit is an error that is tried again, not memory.
#[test]
fn an_oversized_response_is_refused_and_retried() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let (s, _) = cp.session(vec![bash("echo small")]);
    cp.faults(vec![Fault {
        kind: FaultKind::Oversize,
        count: 3,
        path_contains: Some(format!("/v1/sessions/{s}/events")),
        method: Some("GET".into()),
        after: false,
    }]);
    let w = start_worker(&cp, state.path(), &["--max-response-bytes", "1MiB"]);
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "small");
    assert!(cp.pending_faults().is_empty(), "the oversized answers were never sent: {:?}", cp.pending_faults());
    let rss_kib: u64 = peak_rss_kib(w.child.id());
    // Three 96 MiB answers were refused at 1 MiB each: the worker's peak stays far below one.
    assert!(rss_kib < 48 * 1024, "peak RSS {rss_kib} KiB");
}

/// A result over the worker's limit becomes an error result the agent can act on; one the
/// control plane refuses as too large (413) becomes the official runner's error result naming
/// the refusal. Either way the session goes on.
#[test]
fn an_oversized_result_becomes_an_error_and_the_session_goes_on() {
    let cp = Cp::start_with(LocalConfig {
        lease: Duration::from_secs(30),
        max_request_bytes: 1 << 20,
        ..LocalConfig::default()
    });
    let state = TempDir::new("w-state");
    let wide = "x".repeat(1500);
    let big = (0..2000).map(|i| format!("{i} {wide}\n")).collect::<String>();
    let (s, _) = cp.session(vec![
        step("write", json!({"file_path": "/workspace/big.pdf", "content": big})),
        // A PDF comes back whole, base64: ~4 MB, over the control plane's 1 MiB limit (413).
        step("read", json!({"file_path": "/workspace/big.pdf"})),
        bash("echo still-here"),
    ]);
    let w = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(v.calls[1].is_error, Some(true));
    assert!(result_of(&v, 1).starts_with("The API refused the result of tool 'read': "), "{}", result_of(&v, 1));
    assert_eq!(result_of(&v, 2), "still-here");
    drop(w); // the next session is for a worker with a lower limit only,
             // and not for the poll the first one had open when it died (at most 999 ms).
    std::thread::sleep(Duration::from_millis(1200));

    // The worker's own limit, below the control plane's.
    let (s, _) = cp.session(vec![
        step("read", json!({"file_path": "/workspace/none-yet.txt"})),
        bash("printf 'y%.0s' $(seq 300000) | fold -w 1000"),
        bash("echo after"),
    ]);
    let state2 = TempDir::new("w-state");
    let _w2 = start_worker(&cp, state2.path(), &["--max-result-bytes", "10KiB"]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    let out = result_of(&v, 1);
    assert!(out.starts_with("output too large: ") && out.contains("limit 10240"), "{out}");
    assert_eq!(result_of(&v, 2), "after");
}

/// `--environment-key KEY`, as `ant` takes it: it works, and it is wiped from the worker's
/// command line at start.
#[test]
fn a_key_on_the_command_line_works_and_is_wiped_from_it() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let key = cp.env_key();
    let mut c = worker_cmd(&cp, state.path(), &[]);
    c.args(["--environment-key", key.trim()]);
    let w = Worker { child: c.spawn().unwrap() };
    let (s, _) = cp.session(vec![bash("echo keyed")]);
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "keyed");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", w.child.id())).unwrap();
    let shown = String::from_utf8_lossy(&cmdline);
    assert!(!shown.contains(key.trim()) && shown.contains("--environment-key"), "{shown}");
}

/// A result whose answer was lost while the session's events stay unreadable: the worker never
/// posts it again, and after a whole lease of not being able to tell, the item ends rather than
/// holding its slot.
#[test]
fn a_result_that_cannot_be_checked_for_a_lease_ends_the_item_without_a_second_post() {
    let cp = Cp::start(Duration::from_secs(2));
    let state = TempDir::new("w-state");
    let (s, _) = cp.session(vec![bash("sleep 1; echo once"), bash("echo never")]);
    let _w = start_worker(&cp, state.path(), &[]);
    cp.wait_for("the stream to open", Duration::from_secs(20), || {
        cp.cp.requests().iter().any(|r| r.path.ends_with("/events/stream"))
    });
    let f = |count, method: &str, after| Fault {
        kind: FaultKind::ServerError,
        count,
        path_contains: Some(format!("/v1/sessions/{s}/events")),
        method: Some(method.into()),
        after,
    };
    cp.faults(vec![f(1, "POST", true), f(100_000, "GET", false)]);
    let t = Instant::now();
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(v.work_state == WorkState::Stopped && !v.finished, "{v:#?}");
    assert!(t.elapsed() < Duration::from_secs(20), "the item held its slot for {:?}", t.elapsed());
    assert_eq!(result_of(&v, 0), "once");
    assert_eq!(v.duplicate_results, 0, "{v:#?}");
    cp.clear_faults();
}

/// `limits.workspace_size` and `limits.outputs_size`: each session's workspace and outputs are
/// filesystems of that size; writing past it fails inside the session (ENOSPC), the host's disk
/// holds no more than the limit, the session goes on, and the outputs are kept at the end.
#[test]
fn workspace_and_outputs_are_filesystems_of_the_policys_size() {
    if !is_root() {
        return skip("per-session filesystems need root");
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let policy = state.path().join("quota.toml");
    std::fs::write(&policy, "extends = \"default\"\n[limits]\nworkspace_size = \"32M\"\noutputs_size = \"16M\"\n")
        .unwrap();
    let _w = start_worker(&cp, state.path(), &["--policy", policy.to_str().unwrap()]);
    let (s, work) = cp.session(vec![
        bash("dd if=/dev/zero of=/workspace/fill bs=1M count=64 2>&1 | grep -o 'No space left on device'; df -k /workspace | tail -1 | awk '{print $2 <= 32768}'"),
        bash("ls -a /workspace; rm /workspace/fill; echo kept > /mnt/session/outputs/report.txt; dd if=/dev/zero of=/mnt/session/outputs/fill bs=1M count=32 2>&1 | grep -o 'No space left on device'; rm /mnt/session/outputs/fill"),
        bash("echo after"),
    ]);
    // While the session runs, the workspace is a mount whose backing file holds at most the limit.
    let item_dir = state.path().join("items").join(&work);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(item_dir.to_str().unwrap()) {
        assert!(Instant::now() < deadline, "the workspace was never mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    let first = result_of(&v, 0);
    assert!(first.contains("No space left on device") && first.ends_with("\n1"), "{first}");
    assert_eq!(result_of(&v, 1).lines().find(|l| *l != "." && *l != ".."), Some("fill"), "no lost+found");
    assert!(result_of(&v, 1).contains("No space left on device"), "{}", result_of(&v, 1));
    assert_eq!(result_of(&v, 2), "after");
    // At the end: nothing mounted, no image left, the report kept.
    std::thread::sleep(Duration::from_millis(500));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(state.path().to_str().unwrap()), "{mounts}");
    assert!(!item_dir.exists());
    let kept = std::fs::read_dir(state.path().join("outputs")).unwrap().flatten().next().unwrap().path();
    assert_eq!(std::fs::read_to_string(kept.join("report.txt")).unwrap(), "kept\n");
}

/// A policy with a size limit: a workspace directory on a larger filesystem is refused.
#[test]
fn a_workspace_on_a_larger_filesystem_is_refused_when_the_policy_limits_its_size() {
    let dir = TempDir::new("big-fs");
    let policy = dir.path().join("quota.toml");
    std::fs::write(&policy, "extends = \"default\"\n[limits]\nworkspace_size = \"32M\"\n").unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let out = Command::new(STOCKADE)
        .args(["run", "--policy", policy.to_str().unwrap(), "--workspace", ws.to_str().unwrap(), "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("limits.workspace_size = 32M") && err.contains("would not hold the limit"), "{err}");
    // Without a workspace of its own the jail's tmpfs is sized for it, and the run goes ahead.
    let out =
        Command::new(STOCKADE).args(["run", "--policy", policy.to_str().unwrap(), "--", "true"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A state directory under a private (0700) parent: the sessions' workspaces are attached from
/// descriptors, so the jail user never needs to walk the host path.
#[test]
fn a_state_directory_under_a_private_parent_serves_sessions() {
    if !is_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let cp = Cp::start(Duration::from_secs(30));
    let parent = TempDir::new("private-state");
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = parent.path().join("state");
    let _w = start_worker(&cp, &state, &[]);
    let (s, _) = cp.session(vec![
        step("write", json!({"file_path": "/workspace/a.txt", "content": "x"})),
        bash("cat /workspace/a.txt; echo > /mnt/session/outputs/o.txt && echo ok"),
    ]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 1), "xok");
}

/// Key rotation without downtime: the environment gets a new key and the operator writes it to
/// the key file; the worker picks it up (the file changed, or the API refused the old key) and
/// goes on serving, and so does SIGHUP after a second rotation. A key the file cannot give
/// (refused, and the file unchanged) still stops the worker, as before.
#[test]
fn a_rotated_key_is_used_without_a_restart() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let mut w = start_worker(&cp, state.path(), &[]);
    let run = |cmd: &str| {
        let (s, _) = cp.session(vec![bash(cmd)]);
        let v = cp.wait_ended(&s, Duration::from_secs(60));
        assert!(completed(&v), "{v:#?}");
        result_of(&v, 0).to_owned()
    };
    assert_eq!(run("echo before"), "before");
    let write_key = |k: &Secret| {
        let tmp = cp.key_file().with_extension("new");
        std::fs::write(&tmp, k.expose()).unwrap();
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, cp.key_file()).unwrap();
    };
    let new = cp.cp.rotate_environment_key(DEFAULT_ENVIRONMENT).unwrap();
    write_key(&new);
    assert_eq!(run("echo after-rotation"), "after-rotation");
    let newer = cp.cp.rotate_environment_key(DEFAULT_ENVIRONMENT).unwrap();
    write_key(&newer);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.child.id() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    assert_eq!(run("echo after-sighup"), "after-sighup");
    assert!(w.child.try_wait().unwrap().is_none(), "the worker kept running");
    // Rotated away with nothing new in the file: the worker stops, as on any refused key.
    cp.cp.rotate_environment_key(DEFAULT_ENVIRONMENT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the worker went on polling with a refused key");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A session whose jail the host cannot build fails its item and counts in
/// `stockade_jail_build_failures_total` (what the StockadeJailBuildFailures alert reads).
#[test]
fn a_jail_that_cannot_be_built_is_counted() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let port = free_port();
    // A bind source this host lacks: the policy loads, every jail built from it is refused.
    let policy = state.path().join("missing-bind.toml");
    std::fs::write(&policy, "extends = \"default\"\n[filesystem]\nread_only_add = [\"/nonexistent-stockade-path\"]\n")
        .unwrap();
    let _w = start_worker(
        &cp,
        state.path(),
        &["--metrics", &format!("127.0.0.1:{port}"), "--policy", policy.to_str().unwrap()],
    );
    let (s, _) = cp.session(vec![bash("echo never")]);
    cp.wait_for("the item to end", Duration::from_secs(30), || cp.view(&s).work_state == WorkState::Stopped);
    assert_eq!(cp.view(&s).calls[0].result, None);
    let m = http_get(&format!("http://127.0.0.1:{port}/metrics"));
    assert!(m.contains("\nstockade_jail_build_failures_total 1\n"), "{m}");
}

/// A stand-in OTLP/HTTP collector: keeps the body of every POST it gets.
fn otlp_collector() -> (String, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/logs", l.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).unwrap();
                    g.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                    w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
                }
            });
        }
    });
    (url, got)
}

/// `trail.ship = ["stdout"]`: each record of a session's trail reaches the worker's stdout as it
/// is written, one JSON object a line, the record whole with the session's ids added.
#[test]
fn trail_records_ship_to_stdout_as_json_lines() {
    use std::io::Read;
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let policy = state.path().join("stdout.toml");
    std::fs::write(&policy, "extends = \"default\"\n[trail]\nship_add = [\"stdout\"]\n").unwrap();
    let key = cp.key_file();
    let mut c = worker_cmd(&cp, state.path(), &["--policy", policy.to_str().unwrap()]);
    c.arg("--environment-key-file").arg(&key).stdout(Stdio::piped());
    let mut w = Worker { child: c.spawn().unwrap() };
    let (s, work) = cp.session(vec![bash("sh -c 'echo hi'")]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    // A stopping worker ships what its sessions' trails still hold before it exits.
    assert!(w.sigterm().success());
    let mut out = String::new();
    w.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();

    let trail = state.path().join("trails").join(format!("{s}-{work}.jsonl"));
    let text = std::fs::read_to_string(&trail).unwrap();
    let recs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let shipped: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line on stdout: {l:?}: {e}")))
        .collect();
    assert_eq!(shipped.len(), recs.len(), "stdout:\n{out}");
    // Each record's id is the work item and where the record starts in its trail.
    let mut at = 0;
    for ((got, rec), line) in shipped.iter().zip(&recs).zip(text.lines()) {
        let mut expected = rec.clone();
        expected["session_id"] = json!(s);
        expected["work_id"] = json!(work);
        expected["record_id"] = json!(format!("{work}:{at}"));
        assert_eq!(got, &expected);
        at += line.len() + 1;
    }
    assert!(recs.iter().any(|r| r["event"] == "exec" && r["argv"] == json!(["sh", "-c", "echo hi"])));
}

/// The worker keeps an audit trail of each session — the calls (secrets redacted, the
/// environment key too), every program the jail ran with its argv, the files left in outputs
/// with their digests, start and end — ships it to an OTLP collector, counts it in its metrics,
/// and `stockade trail` reads it back.
#[test]
fn the_worker_keeps_and_ships_an_audit_trail_of_each_session() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let (url, shipped) = otlp_collector();
    let policy = state.path().join("trail.toml");
    std::fs::write(&policy, format!("extends = \"default\"\n[trail]\nship_add = [\"{url}\"]\n")).unwrap();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let _w = start_worker(&cp, state.path(), &["--policy", policy.to_str().unwrap(), "--metrics", &metrics]);
    let env_key = cp.env_key();
    let (s, work) = cp.session(vec![
        bash("sh -c '/bin/true'"),
        bash(&format!("echo {env_key} | wc -c; printf report > /mnt/session/outputs/r.txt")),
    ]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");

    let trail = state.path().join("trails").join(format!("{s}-{work}.jsonl"));
    // The worker reports the item stopped first, then digests the outputs and closes the trail.
    cp.wait_for("the trail's session_end", Duration::from_secs(20), || {
        std::fs::read_to_string(&trail).is_ok_and(|t| t.lines().last().is_some_and(|l| l.contains("\"session_end\"")))
    });
    let text = std::fs::read_to_string(&trail).unwrap();
    assert!(!text.contains(&env_key), "the environment key reached the trail");
    let recs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let events: Vec<&str> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events.first(), Some(&"session_start"));
    assert_eq!(events.last(), Some(&"session_end"));
    let call_ids: Vec<&str> =
        recs.iter().filter(|r| r["event"] == "tool_call").map(|r| r["tool_use_id"].as_str().unwrap()).collect();
    assert_eq!(call_ids.len(), 2);
    let sh = recs
        .iter()
        .find(|r| r["event"] == "exec" && r["argv"] == json!(["sh", "-c", "/bin/true"]))
        .unwrap_or_else(|| panic!("no exec of sh -c /bin/true:\n{text}"));
    assert_eq!(sh["tool_use_id"], call_ids[0]);
    assert!(recs.iter().any(|r| r["event"] == "exec" && r["argv"] == json!(["/bin/true"])), "{text}");
    assert!(recs[..]
        .iter()
        .any(|r| r["event"] == "tool_call" && r["input"]["command"].as_str().unwrap().contains("[REDACTED]")));
    let out = recs.iter().find(|r| r["event"] == "output_file").expect("the output file");
    assert_eq!((&out["path"], &out["size"]), (&json!("r.txt"), &json!(6)));
    // sha256("report")
    assert_eq!(out["sha256"], sha256_hex(b"report"));

    // Shipped: every record, with the session's ids.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shipped_records = || -> Vec<serde_json::Value> {
        shipped
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["resourceLogs"][0]["scopeLogs"][0]["logRecords"].as_array().cloned().unwrap_or_default())
            .map(|l| serde_json::from_str(l["body"]["stringValue"].as_str().unwrap()).unwrap())
            .collect()
    };
    while shipped_records().len() < recs.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = shipped_records();
    assert_eq!(got.len(), recs.len(), "{got:#?}");
    assert!(got.iter().all(|r| r["session_id"] == s.as_str() && r["work_id"] == work.as_str()));
    assert!(got.iter().any(|r| r["argv"] == json!(["sh", "-c", "/bin/true"])));
    let m = http_get(&format!("http://{metrics}/metrics"));
    let execs: u64 = m.lines().find_map(|l| l.strip_prefix("stockade_execs_total ")).unwrap().parse().unwrap();
    assert!(execs >= 4, "{m}");

    // Read back by session id.
    let o = Command::new(STOCKADE).args(["trail", &s, "--state-dir"]).arg(state.path()).output().unwrap();
    assert!(o.status.success());
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(table.lines().any(|l| l.contains("exec") && l.contains("sh -c /bin/true")), "{table}");
    let o = Command::new(STOCKADE)
        .args(["trail", &work, "--format", "json", "--event", "output_file", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(o.stdout).unwrap().lines().count(), 1);
    let o = Command::new(STOCKADE).args(["trail", "sesn_nope", "--state-dir"]).arg(state.path()).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no trail of `sesn_nope`"));
    // Without an id: the list of trails, this one with its end.
    let o = Command::new(STOCKADE).args(["trail", "--state-dir"]).arg(state.path()).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    let list = String::from_utf8(o.stdout).unwrap();
    assert!(list.starts_with("SESSION "), "{list}");
    let row = list.lines().find(|l| l.starts_with(s.as_str())).unwrap_or_else(|| panic!("{s} not listed: {list}"));
    assert!(row.contains(&work) && row.contains("completed"), "{row}");
    let o =
        Command::new(STOCKADE).args(["trail", "--format", "json", "--state-dir"]).arg(state.path()).output().unwrap();
    let rows: Vec<serde_json::Value> =
        String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        rows.iter()
            .any(|r| r["session_id"] == s.as_str() && r["work_id"] == work.as_str() && r["bytes"].as_u64() > Some(0)),
        "{rows:?}"
    );
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// `[provision]`: session metadata chooses among what the policy declares. A declared host
/// directory is copied into the workspace by a jail of its own before the first call (the
/// session's jail never sees where it came from); a repository outside `git_allow` is refused,
/// every call of that session is answered with why, and the trail records it.
#[test]
fn provisioning_copies_a_declared_directory_and_refuses_an_undeclared_repository() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let seed = TempDir::new("seed");
    std::fs::create_dir_all(seed.path().join("src")).unwrap();
    std::fs::write(seed.path().join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(seed.path().join("README"), "seeded\n").unwrap();
    let policy = state.path().join("provision.toml");
    std::fs::write(
        &policy,
        format!(
            "extends = \"default\"\n[provision]\ngit_url_key = \"repo\"\ngit_allow = [\"https://git.example/acme/\"]\n\
             copy_key = \"seed\"\ncopy_from = {{ app = {:?} }}\n",
            seed.path().display().to_string()
        ),
    )
    .unwrap();
    let _w = start_worker(&cp, state.path(), &["--policy", policy.to_str().unwrap()]);
    let md = |v: serde_json::Value| v.as_object().unwrap().clone();

    let (s1, w1) = cp.session_full(
        vec![bash("cat /workspace/README /workspace/src/main.rs; ls /run/provision 2>&1 | head -1; id -un; stat -c %U /workspace/README")],
        md(json!({"seed": "app"})),
    );
    let v = cp.wait_ended(&s1, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(
        result_of(&v, 0),
        "seeded\nfn main() {}\nls: cannot access '/run/provision': No such file or directory\nagent\nagent"
    );
    let trail1 = std::fs::read_to_string(state.path().join("trails").join(format!("{s1}-{w1}.jsonl"))).unwrap();
    let prov: serde_json::Value = trail1
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"] == "provision")
        .unwrap_or_else(|| panic!("{trail1}"));
    assert_eq!((&prov["kind"], &prov["name"], &prov["outcome"]), (&json!("copy"), &json!("app"), &json!("done")));
    assert!(trail1.contains("\"argv\":[\"cp\",\"-R\""), "the provisioning jail's programs are in the trail: {trail1}");

    let (s2, w2) = cp.session_full(
        vec![bash("echo should-not-run > /workspace/ran"), bash("true")],
        md(json!({"repo": "https://evil.example/acme/x.git"})),
    );
    let v = cp.wait_ended(&s2, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    for i in 0..2 {
        let r = result_of(&v, i);
        assert!(r.contains("\"https://evil.example/acme/x.git\" refused: not under provision.git_allow"), "{r}");
        assert_eq!(v.calls[i].is_error, Some(true));
    }
    let trail2 = std::fs::read_to_string(state.path().join("trails").join(format!("{s2}-{w2}.jsonl"))).unwrap();
    assert!(trail2.contains("\"event\":\"provision\"") && trail2.contains("\"outcome\":\"refused\""), "{trail2}");
    assert!(!trail2.contains("should-not-run\"]"), "nothing ran");
    assert!(!trail2.contains("\"event\":\"exec\""), "{trail2}");
}

/// The worker reads its policy once: sessions run under the policy it started with (kept as
/// STATE/policy.toml), whatever happens to the file afterwards.
#[test]
fn sessions_run_under_the_policy_the_worker_started_with() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let policy = state.path().join("p.toml");
    std::fs::write(&policy, "extends = \"default\"\nhostname = \"before\"\n").unwrap();
    let _w = start_worker(&cp, state.path(), &["--policy", policy.to_str().unwrap()]);
    let snapshot = state.path().join("policy.toml");
    cp.wait_for("the policy snapshot", Duration::from_secs(20), || snapshot.exists());
    std::fs::write(&policy, "extends = \"default\"\nhostname = \"after\"\n").unwrap();
    let (s, _) = cp.session(vec![bash("hostname")]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "before");
    let text = std::fs::read_to_string(&snapshot).unwrap();
    assert!(text.contains("extends = \"none\"") && text.contains("hostname = \"before\""), "{text}");
}

/// Each session thread has a shell of its own (the official runner keeps one per thread): a
/// subagent's `cd` and variables do not reach the primary thread's shell, or another subagent's,
/// and all of them work in the session's one jail.
#[test]
fn session_threads_have_shells_of_their_own_in_one_jail() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let on = |thread: &str, cmd: &str| ScriptStep { thread: Some(thread.into()), ..bash(cmd) };
    let (s, _) = cp.session(vec![
        bash("cd /tmp && export WHO=primary && echo $$ > /tmp/primary.pid"),
        on("sthr_a", "cd /mnt && export WHO=a; pwd"),
        on("sthr_b", "echo \"$(pwd) ${WHO:-none}\""),
        bash("echo \"$(pwd) $WHO $([ $$ = $(cat /tmp/primary.pid) ] && echo same-shell)\""),
        on("sthr_a", "echo \"$(pwd) $WHO\"; ls /tmp/primary.pid"),
    ]);
    let _w = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 1), "/mnt");
    assert_eq!(result_of(&v, 2), "/workspace none");
    assert_eq!(result_of(&v, 3), "/tmp primary same-shell");
    // The same jail: a's shell sees the file the primary thread wrote to the jail's /tmp.
    assert_eq!(result_of(&v, 4), "/mnt a\n/tmp/primary.pid");
}

/// A stream that opens and then says nothing (a half-open connection, a proxy that buffers) is
/// reopened after `--stream-silence`, and the history listed again: the session goes on. A
/// redirect from the API is not followed: nothing goes to the other origin, and the call is tried
/// again as after a 5xx.
#[test]
fn a_silent_stream_is_reopened_and_a_redirect_is_not_followed() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let fault = |kind, path: &str, method: &str| Fault {
        kind,
        count: 1,
        path_contains: Some(path.into()),
        method: Some(method.into()),
        after: false,
    };
    cp.faults(vec![fault(FaultKind::Silent, "/events/stream", "GET"), fault(FaultKind::Redirect, "/events", "POST")]);
    let (s, _) = cp.session(vec![bash("echo one"), bash("echo two")]);
    let t = Instant::now();
    let _w = start_worker(&cp, state.path(), &["--stream-silence", "1s"]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!((result_of(&v, 0), result_of(&v, 1)), ("one", "two"));
    assert_eq!(v.duplicate_results, 0);
    // Both faults fired: the first stream stayed silent and was given up, the first post was
    // redirected and posted again.
    assert!(cp.pending_faults().is_empty(), "{:?}", cp.pending_faults());
    assert!(t.elapsed() >= Duration::from_secs(1));
    let streams = cp
        .cp
        .requests()
        .into_iter()
        .filter(|r| {
            r.path.ends_with("/events/stream")
                && r.headers.get("user-agent").is_some_and(|u| u.starts_with("stockade/"))
        })
        .count();
    assert!(streams >= 2, "the silent stream was not reopened: {streams} stream requests");
}

/// A result POST held on its way past the worker's request timeout (a proxy that delays it) lands
/// after the worker gave up on it: the worker waits for it to land before it looks, finds it, and
/// never posts it twice.
#[test]
fn a_result_delayed_in_flight_is_not_posted_twice() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let (s, _) = cp.session(vec![bash("echo once"), bash("echo after")]);
    cp.faults(vec![Fault {
        kind: FaultKind::Delayed,
        count: 1,
        path_contains: Some("/events".into()),
        method: Some("POST".into()),
        after: false,
    }]);
    let _w = start_worker(&cp, state.path(), &["--api-timeout", "1s"]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert!(cp.pending_faults().is_empty(), "the delay was never injected");
    assert_eq!(v.duplicate_results, 0, "{v:#?}");
    assert_eq!((result_of(&v, 0), result_of(&v, 1)), ("once", "after"));
}

/// An item whose lease was lost just before the worker was killed is not resurrected by the
/// restart: its filesystems were unmounted when the lease went (nothing the worker cannot resume
/// stays mounted), the time it was lost is kept beside it, and the restarted worker does not
/// resume it under its old lease (a 412 at every restart) but claims it afresh when it is handed
/// back, in the same workspace.
#[test]
fn an_item_lost_before_a_restart_is_not_resumed_and_not_left_mounted() {
    let cp = Cp::start(Duration::from_secs(2));
    let state = TempDir::new("w-state");
    let marker = format!("7.{}", std::process::id());
    let (s, work) = cp.session(vec![
        bash("echo kept > /workspace/first; echo one"),
        bash(&format!("sleep {marker}; cat /workspace/first; echo done")),
    ]);
    let mut w = start_worker(&cp, state.path(), &[]);
    cp.wait_for("the second call to start", Duration::from_secs(20), || {
        !host_processes_matching(&format!("sleep {marker}")).is_empty()
    });
    let item_dir = state.path().join("items").join(&work);
    let mounted = || std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(item_dir.to_str().unwrap());
    assert!(mounted(), "the item's filesystems are mounted while it runs");
    // The lease goes (heartbeats fail past it) and the item cannot be polled back.
    let fault = |path: &str| Fault {
        kind: FaultKind::ServerError,
        count: 100_000,
        path_contains: Some(path.into()),
        method: None,
        after: false,
    };
    cp.faults(vec![fault("/heartbeat"), fault("/work/poll")]);
    cp.wait_for("the lost item to be set aside", Duration::from_secs(20), || item_dir.join("lost_at").exists());
    cp.wait_for("its filesystems to be unmounted", Duration::from_secs(5), || !mounted());
    w.kill9();
    cp.clear_faults();
    let n = cp.cp.requests().len();

    let _w2 = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!((result_of(&v, 0), result_of(&v, 1)), ("one", "kept\ndone"));
    assert_eq!(v.duplicate_results, 0);
    // The restarted worker claimed it afresh: its first heartbeat for the item is NO_HEARTBEAT,
    // never the old lease's last beat.
    let beats: Vec<String> = cp.cp.requests()[n..]
        .iter()
        .filter(|r| r.path.ends_with(&format!("{work}/heartbeat")))
        .filter_map(|r| r.query.iter().find(|(k, _)| k == "expected_last_heartbeat").map(|(_, v)| v.clone()))
        .collect();
    assert_eq!(beats.first().map(String::as_str), Some("NO_HEARTBEAT"), "{beats:?}");
}

/// One event nested past the JSON parser's depth, among good ones in the same listing page, costs
/// only itself: the page is read event by event, and the session's calls still run.
#[test]
fn an_event_nested_too_deep_costs_only_itself() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let (s, _) = cp.session(vec![bash("echo past-the-deep-one")]);
    let mut deep = json!(1);
    for _ in 0..300 {
        deep = json!([deep]);
    }
    cp.cp.push_raw_event(&s, json!({"type": "agent.tool_use", "name": "bash", "input": {"command": deep}})).unwrap();
    let _w = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "past-the-deep-one");
}

/// A session that fills its audit trail (long-argv execs) cannot go on unrecorded: by default a
/// full trail fails closed and the worker ends the session; no later call runs.
#[test]
fn a_session_that_fills_its_trail_is_ended() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let policy = state.path().join("p.toml");
    std::fs::write(&policy, "extends = \"default\"\n[trail]\nmax_size = \"64K\"\n").unwrap();
    let _w = start_worker(&cp, state.path(), &["--policy", policy.to_str().unwrap()]);
    let (s, _) = cp.session(vec![
        bash("for i in $(seq 1 400); do /bin/true $(printf 'x%.0s' $(seq 1 200)); done 2>/dev/null; echo flooded"),
        bash("echo refused"),
        bash("echo ran-unrecorded"),
    ]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert_eq!(v.work_state, WorkState::Stopped, "{v:#?}");
    assert!(!v.finished, "the session was ended by the worker, not by its agent: {v:#?}");
    assert!(result_of(&v, 0).contains("flooded"), "{v:#?}");
    // Nothing ran after the trail filled: a later call is either told why or never answered.
    for c in &v.calls[1..] {
        assert!(c.result.as_deref().is_none_or(|r| r.contains("audit trail is full")), "{v:#?}");
    }
}

/// A listing page of millions of tiny events (about 60 MB, inside the body limit) is read event by
/// event: the worker's memory stays near the body's size (it grew to ~18 times it when the page
/// was parsed into one tree), and the session goes on.
#[test]
fn a_page_of_millions_of_tiny_events_does_not_blow_up_the_worker() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let (s, _) = cp.session(vec![bash("echo fine")]);
    cp.faults(vec![Fault {
        kind: FaultKind::TinyEvents,
        count: 1,
        path_contains: Some(format!("/v1/sessions/{s}/events")),
        method: Some("GET".into()),
        after: false,
    }]);
    let w = start_worker(&cp, state.path(), &[]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert!(cp.pending_faults().is_empty(), "the page was never served");
    assert_eq!(result_of(&v, 0), "fine");
    let rss_kib = peak_rss_kib(w.child.id());
    // About twice the body here (125 MiB); the page as one tree of values took ~18 times it.
    assert!(rss_kib < 256 * 1024, "peak RSS {rss_kib} KiB for a ~60 MB page");
}

/// At the default log level (no -v) a worker says what it started with, each item it claims and
/// how it ended: an operator sees it work without turning on debugging.
#[test]
fn at_the_default_level_the_worker_says_it_started_what_it_claimed_and_how_it_ended() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let log = cp.dir.path().join("worker.log");
    let mut c = Command::new(STOCKADE);
    c.args(["worker", "--environment-id", DEFAULT_ENVIRONMENT, "--api-url", &cp.url, "--state-dir"])
        .arg(state.path())
        .args(["--max-idle", "1s", "--environment-key-file"])
        .arg(cp.key_file())
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let mut w = Worker { child: c.spawn().unwrap() };
    let (s, work) = cp.session(vec![bash("echo seen")]);
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    // The end is logged after the item is stopped: wait for the line, then stop the worker.
    let ended =
        || std::fs::read_to_string(&log).unwrap().lines().any(|l| l.contains("session ended") && l.contains(&work));
    cp.wait_for("the end in the log", Duration::from_secs(10), ended);
    assert!(w.sigterm().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let line = |needle: &str| {
        text.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in:\n{text}")).to_owned()
    };
    let start = line("worker starting");
    assert!(
        start.contains("policy=default") && start.contains(&format!("state_dir={}", state.path().display())),
        "{start}"
    );
    assert!(line("taking work").contains("slots="), "{text}");
    assert!(line("claimed").contains(&work), "{text}");
    assert!(line("session ended").contains("completed"), "{text}");
    // Nothing of debug level.
    assert!(!text.contains("DEBUG"), "{text}");
}

/// `--max-jail-builds 1`: sessions claimed at once have their jails built one after another,
/// never two at a time (what bounds a restart that resumes many held items).
#[test]
fn jails_are_built_no_more_than_max_jail_builds_at_a_time() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-builds");
    let key = cp.key_file();
    let mut c = worker_cmd(&cp, state.path(), &["--max-jail-builds", "1", "--max-sessions", "6"]);
    c.arg("--environment-key-file").arg(&key).stderr(Stdio::piped());
    let mut w = Worker { child: c.spawn().unwrap() };
    let sessions: Vec<String> = (0..6).map(|n| cp.session(vec![bash(&format!("echo {n}"))]).0).collect();
    for s in &sessions {
        assert!(completed(&cp.wait_ended(s, Duration::from_secs(60))), "{s}");
    }
    assert!(w.sigterm().success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut w.child.stderr.take().unwrap(), &mut log).unwrap();
    // Each build is [ready - build_ms, ready]: no two may overlap.
    let mut builds: Vec<(f64, f64)> = log
        .lines()
        .filter(|l| l.contains("session jail ready"))
        .map(|l| {
            let ts = stockade::util::parse_rfc3339(l.split_whitespace().next().unwrap()).unwrap();
            let end = ts.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
            let ms: f64 = l.split("build_ms=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
            (end - ms / 1000.0, end)
        })
        .collect();
    assert_eq!(builds.len(), 6, "{log}");
    builds.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in builds.windows(2) {
        // Log times are to the microsecond, build times to the millisecond.
        assert!(pair[1].0 >= pair[0].1 - 0.002, "two builds overlapped: {pair:?}\n{log}");
    }
}

/// The worker raises its own open-file limit to the hard one (a few descriptors per live
/// session), and its sessions get back the limit it was started with: a jail whose policy sets
/// no `limits.nofile` inherits the operator's, not the worker's.
#[test]
fn the_worker_raises_its_open_file_limit_and_its_jails_do_not_inherit_it() {
    use std::os::unix::process::CommandExt;
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-nofile");
    let (_d, pol) = policy("default", "[limits]\nnofile = \"none\"\n");
    let mut c = worker_cmd(&cp, state.path(), &["--policy", pol.to_str().unwrap()]);
    c.arg("--environment-key-file").arg(cp.key_file());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        c.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 300, 4096)
                .map_err(std::io::Error::from)
        });
    }
    let w = Worker { child: c.spawn().unwrap() };
    let (s, _) = cp.session(vec![bash("ulimit -Sn; ulimit -Hn")]);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "300\n4096");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", w.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(line.split_whitespace().collect::<Vec<_>>()[3..5], ["4096", "4096"], "{line}");
}
