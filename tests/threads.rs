//! Session threads served by `stockade worker` against the local control plane: calls of
//! different threads overlap up to `--max-concurrent-calls`, one thread's calls run in order,
//! and a call the session stops waiting on is stopped.

mod common;

use common::worker::*;
use common::*;
use std::time::Duration;

use stockade::control_plane::local::ScriptStep;

fn on(thread: &str, step: ScriptStep) -> ScriptStep {
    ScriptStep { thread: Some(thread.into()), ..step }
}

/// A subagent's call that waits for a file the primary thread's call writes, both issued at
/// once: with room for two calls it sees the file; with the default of one, the primary call
/// waits its turn and the subagent's times out first.
#[test]
fn calls_of_different_threads_overlap_up_to_the_limit() {
    // The subagent's command lingers a second after it sees the flag, so that the primary call's
    // answer coming first shows it was answered at once, not held back until the batch was over.
    let script = |timeout_ms: u64| {
        vec![
            on(
                "sthr_sub",
                ScriptStep {
                    with_next: true,
                    ..step(
                        "bash",
                        serde_json::json!({"command": "until [ -e /workspace/flag ]; do sleep 0.05; done; sleep 1; echo saw flag",
                                           "timeout_ms": timeout_ms}),
                    )
                },
            ),
            step("write", serde_json::json!({"file_path": "/workspace/flag", "content": "x"})),
            bash("echo after"),
        ]
    };
    // With room for both, the subagent's wait is bounded generously: the flag comes as soon as
    // the primary call runs. With room for one, its timeout is what lets the primary call run.
    for (limit, overlap, timeout_ms) in [("2", true, 20_000), ("1", false, 3000)] {
        let cp = Cp::start(Duration::from_secs(30));
        let state = TempDir::new("w-state");
        let (s, _) = cp.session(script(timeout_ms));
        let _w = start_worker(&cp, state.path(), &["--max-concurrent-calls", limit]);
        let v = cp.wait_ended(&s, Duration::from_secs(60));
        assert!(completed(&v), "limit {limit}: {v:#?}");
        assert_eq!(result_of(&v, 1), "wrote 1 bytes to /workspace/flag", "limit {limit}");
        assert_eq!(result_of(&v, 2), "after", "limit {limit}");
        if overlap {
            assert_eq!(result_of(&v, 0), "saw flag", "{v:#?}");
            // The primary thread's call was answered while the subagent's still ran.
            assert!(v.calls[1].answered_at <= v.calls[0].answered_at, "{v:#?}");
        } else {
            assert!(result_of(&v, 0).contains("command timed out after 3s"), "{v:#?}");
            assert!(v.calls[0].answered_at <= v.calls[1].answered_at, "{v:#?}");
        }
        assert_eq!(v.duplicate_results, 0);
    }
}

/// A subagent whose thread goes idle without listing its running call no longer waits on it:
/// the worker stops the call at once, with the official runner's text, kills what it started,
/// and the session goes on.
#[test]
fn a_call_the_session_stops_waiting_on_is_stopped() {
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-state");
    let marker = format!("sleep 120.{}", std::process::id());
    let (s, _) = cp.session(vec![on("sthr_sub", bash(&format!("{marker}; echo never"))), bash("echo next")]);
    let _w = start_worker(&cp, state.path(), &[]);
    cp.stop_waiting_once_running(&s, "sthr_sub", &marker);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "tool 'bash' was stopped, and may have already done some or all of its work");
    assert_eq!(v.calls[0].is_error, Some(true));
    assert_eq!(result_of(&v, 1), "next");
    assert!(host_processes_matching(&marker).is_empty(), "the stopped call's command still runs");
    assert_eq!(v.duplicate_results, 0);
}
