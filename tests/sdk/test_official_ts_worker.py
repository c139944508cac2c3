"""The official TypeScript worker (@anthropic-ai/sdk, the pinned release) against
`stockade control-plane`: it must complete the scripted sessions the Python worker completes, in the
same order of requests (claim by heartbeat, then the session, then its events with the SDK's type
filter), so the local control plane is proven against both official workers, not only one.

Needs STOCKADE_TS_SDK (the installed package's directory) and STOCKADE_NODE (Node >= 22); .ci/run
installs both. Without them the tests are skipped, saying why; STOCKADE_REQUIRE_TS=1 (set by
.ci/run) turns that skip into a failure.
"""

import os
import subprocess
import tempfile
import time

import pytest

from test_official_sdk import (  # noqa: F401  (the fixture's class)
    ControlPlane, ENV, THREAD_ANSWERS, THREAD_STEPS, answers, ended, route, skill_zip,
)

TS_SDK = os.environ.get("STOCKADE_TS_SDK")
NODE = os.environ.get("STOCKADE_NODE", "node")
HERE = os.path.dirname(os.path.abspath(__file__))


def require_ts():
    if TS_SDK and os.path.isdir(TS_SDK):
        import json
        from test_official_sdk import pinned
        version = json.load(open(os.path.join(TS_SDK, "package.json")))["version"]
        assert version == pinned("ANTHROPIC_TS"), (version, pinned("ANTHROPIC_TS"))
        return
    why = "STOCKADE_TS_SDK does not name an installed @anthropic-ai/sdk"
    if os.environ.get("STOCKADE_REQUIRE_TS") == "1":
        pytest.fail(why + " (STOCKADE_REQUIRE_TS=1)")
    pytest.skip(why)


@pytest.fixture
def cp():
    c = ControlPlane()
    yield c
    c.close()


def run_ts_worker(cp, workdir, until, limit=60, max_concurrent_calls=None):
    extra = {"STOCKADE_TS_MAX_CONCURRENT_CALLS": str(max_concurrent_calls)} if max_concurrent_calls else {}
    proc = subprocess.Popen(
        [NODE, os.path.join(HERE, "ts_worker.mjs"), cp.url, ENV, workdir],
        env={**os.environ, "ANTHROPIC_ENVIRONMENT_KEY": cp.env_key, "STOCKADE_TS_SDK": TS_SDK, **extra},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.time() + limit
    try:
        while not until():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "timed out"
            time.sleep(0.2)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_official_typescript_worker_completes_scripted_sessions(cp):
    require_ts()
    with tempfile.TemporaryDirectory() as wd:
        steps = [
            {"name": "write", "input": {"file_path": "notes/a.txt", "content": "alpha\nbeta\n"}},
            {"name": "bash", "input": {"command": "cat notes/a.txt; echo done"}},
            {"name": "bash", "input": {"command": "echo out; echo err >&2; false"}},
            {"name": "read", "input": {"file_path": "notes/a.txt"}},
            {"name": "web_fetch", "input": {"url": "https://example.com"}},
            {"name": "bash", "input": {"command": "echo never-run"}, "permission": "deny"},
            {"name": "bash", "input": {"command": "echo confirmed"}, "permission": "ask", "confirm": "allow"},
            {"name": "bash", "input": {"command": "sh skills/hello/bin/run.sh; cat skills/hello/SKILL.md"}},
        ]
        s1 = cp.create(steps, skills={"hello": skill_zip(cp.dir.name)})
        run_ts_worker(cp, wd, lambda: cp.view(s1)["finished"] and cp.view(s1)["work_state"] == "stopped")
        v = cp.view(s1)
        calls = v["calls"]
        assert [c["answered_by"] for c in calls] == ["worker", "worker", "worker", "worker", "other", "none",
                                                     "worker", "worker"], calls
        assert calls[0]["result"] == "wrote 11 bytes to notes/a.txt"
        assert calls[1]["result"] == "alpha\nbeta\ndone"
        # The 2.17 layout, which Stockade's tools also answer: stderr first for a failure.
        assert calls[2]["result"] == "err\n\nout" and calls[2]["is_error"] is True, calls[2]
        assert calls[3]["result"] == "alpha\nbeta\n"
        assert calls[6]["result"] == "confirmed"
        assert calls[7]["result"] == "skill ran\n# hello skill", calls[7]
        assert v["duplicate_results"] == 0

    # The claim is the first heartbeat; the session is read after it, its events listed after that,
    # filtered by type, as Stockade's worker does.
    ts = [r for r in cp.requests() if r["headers"].get("x-stainless-lang") == "js"]
    routes = [route(r) for r in ts]
    hb = next(i for i, r in enumerate(routes) if r.endswith("/heartbeat"))
    assert hb < routes.index("GET /v1/sessions/sesn_ID") < routes.index("GET /v1/sessions/sesn_ID/events"), routes
    listing = next(r for r in ts if route(r) == "GET /v1/sessions/sesn_ID/events")
    assert "types[]" in {k for k, _ in listing["query"]}, listing


def test_the_official_typescript_worker_runs_session_threads_as_python_does(cp):
    """The script of the Python worker's thread test (overlapping threads, a call its thread stops
    waiting on): the TypeScript worker with `maxConcurrentCalls: 2` gives the same answers."""
    require_ts()
    s = cp.create(THREAD_STEPS)
    with tempfile.TemporaryDirectory() as wd:
        run_ts_worker(cp, wd, lambda: ended(cp.view(s)), max_concurrent_calls=2)
    v = cp.view(s)
    assert answers(v["calls"]) == THREAD_ANSWERS, v["calls"]
    assert v["duplicate_results"] == 0
