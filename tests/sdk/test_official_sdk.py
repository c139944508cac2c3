"""The official Python SDK (the pinned release, tests/sdk/README.md) against `stockade control-plane`.

The SDK is the oracle for the wire format: its worker must complete scripted sessions served by
the local control plane, and its client must parse every answer the local control plane gives,
errors included. Run by .ci/run with STOCKADE pointing at the built binary.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anthropic
import pytest
from anthropic.lib.environments import EnvironmentWorker

STOCKADE = os.environ.get("STOCKADE", str(Path(__file__).resolve().parents[2] / "target/debug/stockade"))


def pinned(name: str) -> str:
    """A release named in tests/sdk/pins.env, the suite's one pin."""
    for line in Path(__file__).with_name("pins.env").read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].strip()
    raise KeyError(name)


def test_the_suite_runs_the_pinned_release():
    """A venv left over from an older pin would test an old contract in silence."""
    assert anthropic.__version__ == pinned("ANTHROPIC_PY"), (anthropic.__version__, pinned("ANTHROPIC_PY"))
ENV = "env_local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    def __init__(self, lease: str = "30s", extra: list | None = None):
        self.dir = tempfile.TemporaryDirectory(prefix="stockade-sdk-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Its log goes to a file: it logs as a service does, and a pipe nobody reads would fill.
        self.log = Path(self.dir.name, "control-plane.log")
        self.proc = subprocess.Popen(
            [STOCKADE, "control-plane", "--listen", f"127.0.0.1:{self.port}", "--state", self.dir.name,
             "--lease", lease, *(extra or [])],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"),
        )
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.time() < deadline, "control plane did not start"
                time.sleep(0.05)
        self.env_key = Path(self.dir.name, f"{ENV}.key").read_text().strip()
        self.org_key = Path(self.dir.name, "org.key").read_text().strip()

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.dir.cleanup()

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [STOCKADE, "control-plane", "session", *args, "--api-url", self.url],
            env={**os.environ, "ANTHROPIC_API_KEY": self.org_key}, capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def create(self, steps: list, skills: dict | None = None) -> str:
        script = Path(self.dir.name, f"script-{time.time_ns()}.jsonl")
        script.write_text("\n".join(json.dumps(s) for s in steps) + "\n")
        extra = []
        for name, archive in (skills or {}).items():
            extra += ["--skill", f"{name}={archive}"]
        return json.loads(self.cli("create", "--script", str(script), *extra))["session_id"]

    def requests(self) -> list:
        """Every request the control plane received, credentials named, not shown."""
        import urllib.request
        req = urllib.request.Request(f"{self.url}/v1/local/requests", headers={"x-api-key": self.org_key})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def view(self, session: str) -> dict:
        return json.loads(self.cli("show", session, "--json"))

    def wait(self, session: str, pred, limit: float = 60) -> dict:
        deadline = time.time() + limit
        while True:
            v = self.view(session)
            if pred(v) or time.time() > deadline:
                return v
            time.sleep(0.1)


@pytest.fixture
def cp():
    c = ControlPlane()
    yield c
    c.close()


def sdk_client(cp: ControlPlane, key: str | None = None, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key or cp.org_key, base_url=cp.url, max_retries=0, **kw)


def run_official_worker(cp: ControlPlane, workdir: str, until, limit: float = 60, **options):
    """Runs EnvironmentWorker.run() until `until()` holds, then cancels it."""

    async def main():
        client = anthropic.AsyncAnthropic(api_key="unused", base_url=cp.url)
        worker = EnvironmentWorker(client, environment_id=ENV, environment_key=cp.env_key, workdir=workdir,
                                   max_idle=1.0, **options)
        task = asyncio.create_task(worker.run())
        deadline = time.time() + limit
        try:
            while not await asyncio.to_thread(until):
                assert not task.done(), f"the official worker stopped: {task.exception()!r}"
                assert time.time() < deadline, "timed out"
                await asyncio.sleep(0.2)
        finally:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    asyncio.run(main())


def skill_zip(directory: str) -> str:
    """A skill bundle as the API ships one: a zip wrapped in one directory, with a script."""
    import zipfile
    path = Path(directory, "hello-skill.zip")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello/SKILL.md", "# hello skill\n")
        info = zipfile.ZipInfo("hello/bin/run.sh")
        info.create_system = 3
        info.external_attr = 0o100755 << 16
        z.writestr(info, "#!/bin/sh\necho skill ran\n")
    return str(path)


def route(r: dict) -> str:
    """A request's route with ids folded, for comparing two clients' traffic."""
    import re
    p = re.sub(r"(work|sesn|sevt|skill|skillver)_[0-9]+", r"\1_ID", r["path"])
    return f'{r["method"]} {p}'


def run_stockade_worker(cp: ControlPlane, session: str, *extra: str) -> tuple[dict, str]:
    """Runs `stockade worker` until `session` has ended; returns its view and the worker's log."""
    state = tempfile.mkdtemp(prefix="stockade-sdk-worker-")
    # The jail's user still walks the host path to the workspace, so the state directory must not
    # sit under a private (0700) parent; mkdtemp makes it 0700 itself.
    os.chmod(state, 0o755)
    key = Path(cp.dir.name, f"{ENV}.key")
    w = subprocess.Popen([STOCKADE, "worker", "--environment-id", ENV, "--base-url", cp.url, "--state-dir", state,
                          "--environment-key-file", str(key), "--max-idle", "1s", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")})
    try:
        v = cp.wait(session, lambda v: v["finished"] and v["work_state"] == "stopped")
    finally:
        w.terminate()
        _, err = w.communicate(timeout=30)
    return v, err.decode()[-3000:]


def test_the_official_worker_completes_scripted_sessions(cp):
    with tempfile.TemporaryDirectory() as wd:
        steps = [
            {"name": "write", "input": {"file_path": "notes/a.txt", "content": "alpha\nbeta\n"}},
            {"name": "bash", "input": {"command": "cat notes/a.txt; echo done"}},
            {"name": "read", "input": {"file_path": "notes/a.txt"}},
            {"name": "web_fetch", "input": {"url": "https://example.com"}},
            {"name": "bash", "input": {"command": "echo never-run"}, "permission": "deny"},
            {"name": "bash", "input": {"command": "echo confirmed"}, "permission": "ask", "confirm": "allow"},
            {"name": "bash", "input": {"command": "echo refused"}, "permission": "ask", "confirm": "deny"},
            {"name": "grep", "input": {"pattern": "beta"}},
            {"name": "bash", "input": {"command": "sh skills/hello/bin/run.sh; cat skills/hello/SKILL.md"}},
        ]
        s1 = cp.create(steps, skills={"hello": skill_zip(cp.dir.name)})
        s2 = cp.create([{"name": "bash", "input": {"command": "exit 3"}}])

        def done():
            return all(v["finished"] and v["work_state"] == "stopped" for v in (cp.view(s1), cp.view(s2)))

        run_official_worker(cp, wd, done)
        v = cp.view(s1)
        calls = v["calls"]
        assert [c["answered_by"] for c in calls] == ["worker", "worker", "worker", "other", "none", "worker", "none",
                                                     "worker", "worker"], calls
        assert calls[0]["result"] == "wrote 11 bytes to notes/a.txt"
        assert calls[1]["result"] == "alpha\nbeta\ndone"
        assert calls[2]["result"] == "alpha\nbeta\n"
        assert calls[5]["result"] == "confirmed"
        assert calls[7]["result"].rstrip("\n").endswith(":2:beta"), calls[7]
        assert calls[8]["result"] == "skill ran\n# hello skill", calls[8]
        assert v["duplicate_results"] == 0
        v2 = cp.view(s2)
        assert v2["calls"][0]["is_error"] is True
        assert v2["calls"][0]["content"][0]["text"].startswith("(no output)\n[The shell is gone. "), v2["calls"]


def test_the_official_client_parses_every_answer(cp):
    org = sdk_client(cp)
    work = org.beta.environments.work
    s = cp.create([{"name": "bash", "input": {"command": "true"}}])
    stats = work.stats(ENV)
    assert stats.type == "work_queue_stats" and stats.depth == 1

    env_client = anthropic.Anthropic(auth_token=cp.env_key, api_key=None, base_url=cp.url, max_retries=0)
    ework = env_client.beta.environments.work
    item = ework.poll(ENV, block_ms=999, anthropic_worker_id="sdk-test")
    assert item is not None and item.data.type == "session" and item.data.id == s
    assert item.secret, "a polled item carries its secret"
    assert ework.poll(ENV, block_ms=1) is None, "a polled, un-acked item is not handed out again at once"
    assert work.stats(ENV).workers_polling == 1
    acked = ework.ack(item.id, environment_id=ENV)
    assert acked.state == "starting"
    hb = ework.heartbeat(item.id, environment_id=ENV, expected_last_heartbeat="NO_HEARTBEAT")
    assert hb.type == "work_heartbeat" and hb.lease_extended and hb.state == "active" and hb.ttl_seconds > 0
    hb2 = ework.heartbeat(item.id, environment_id=ENV, expected_last_heartbeat=hb.last_heartbeat)
    assert hb2.last_heartbeat != hb.last_heartbeat
    with pytest.raises(anthropic.APIStatusError) as e:
        ework.heartbeat(item.id, environment_id=ENV, expected_last_heartbeat=hb.last_heartbeat)
    assert e.value.status_code == 412
    state = e.value.body["error"]["details"]["current_state"]
    assert state["state"] == "active" and state["last_heartbeat"] == hb2.last_heartbeat

    got = work.retrieve(item.id, environment_id=ENV)
    assert got.id == item.id and got.secret is None
    upd = work.update(item.id, environment_id=ENV, metadata={"team": "infra"})
    assert upd.metadata == {"team": "infra"}
    page = work.list(ENV, limit=10)
    assert [w.id for w in page.data] == [item.id]

    sess = env_client.beta.sessions.retrieve(s)
    assert sess.id == s
    events = list(env_client.beta.sessions.events.list(s, limit=2))
    types = [e.type for e in events]
    assert "agent.tool_use" in types, types
    tool_use = next(e for e in events if e.type == "agent.tool_use")
    sent = env_client.beta.sessions.events.send(
        s, events=[{"type": "user.tool_result", "tool_use_id": tool_use.id, "is_error": False,
                    "content": [{"type": "text", "text": "ok"}]}])
    assert sent.data[0].type == "user.tool_result"
    with env_client.beta.sessions.events.stream(s) as stream:
        pass  # opened and parsed its headers
    stopped = work.stop(item.id, environment_id=ENV, force=True)
    assert stopped.state == "stopped"
    with pytest.raises(anthropic.ConflictError):
        work.stop(item.id, environment_id=ENV, force=True)
    with pytest.raises(anthropic.NotFoundError):
        work.retrieve("work_missing", environment_id=ENV)
    with pytest.raises(anthropic.AuthenticationError):
        sdk_client(cp, key="sk-wrong").beta.environments.work.stats(ENV)

    # Skills: the session names them; versions resolve `latest`; the archive downloads whole.
    archive = skill_zip(cp.dir.name)
    s_sk = cp.create([{"name": "bash", "input": {"command": "true"}}], skills={"hello": archive})
    skill = env_client.beta.sessions.retrieve(s_sk).agent.skills[0]
    ver = env_client.beta.skills.versions.retrieve("latest", skill_id=skill.skill_id)
    assert ver.type == "skill_version" and ver.name == "hello" and ver.skill_id == skill.skill_id
    assert [v.id for v in env_client.beta.skills.versions.list(skill.skill_id)] == [ver.id]
    content = env_client.beta.skills.versions.download(ver.id, skill_id=skill.skill_id)
    assert content.read() == Path(archive).read_bytes()
    with pytest.raises(anthropic.NotFoundError):
        env_client.beta.skills.versions.retrieve("skillver_none", skill_id=skill.skill_id)


def test_stockade_worker_completes_the_same_sessions(cp):
    steps = [
        {"name": "write", "input": {"file_path": "/workspace/notes/a.txt", "content": "alpha\nbeta\n"}},
        {"name": "web_fetch", "input": {"url": "https://example.com"}},
        {"name": "bash", "input": {"command": "echo never-run"}, "permission": "deny"},
        {"name": "bash", "input": {"command": "echo confirmed"}, "permission": "ask", "confirm": "allow"},
        {"name": "bash", "input": {"command": "cat /workspace/notes/a.txt"}},
    ]
    s = cp.create(steps)
    v, err = run_stockade_worker(cp, s)
    calls = v["calls"]
    assert v["work_state"] == "stopped", err
    assert [c["answered_by"] for c in calls] == ["worker", "other", "none", "worker", "worker"], (calls, err)
    assert calls[3]["result"].strip() == "confirmed"
    assert "alpha" in calls[4]["result"]
    assert v["duplicate_results"] == 0


THREAD_STEPS = [
    {"name": "bash", "thread": "sthr_sub", "with_next": True,
     "input": {"command": "until [ -e flag ]; do sleep 0.05; done; echo saw flag", "timeout_ms": 20000}},
    {"name": "write", "input": {"file_path": "flag", "content": "x"}},
    {"name": "bash", "thread": "sthr_two", "abandon_after_ms": 1500, "input": {"command": "sleep 60; echo never"}},
    {"name": "bash", "input": {"command": "echo after"}},
]
"""A subagent's call and the primary thread's issued at once, then a subagent's call its thread
stops waiting on, then one more."""

THREAD_ANSWERS = [
    ("saw flag", False, "worker"),
    ("wrote 1 bytes to flag", False, "worker"),
    ("tool 'bash' was stopped, and may have already done some or all of its work", True, "worker"),
    ("after", False, "worker"),
]


def ended(v: dict) -> bool:
    return v["finished"] and v["work_state"] == "stopped"


def answers(calls: list) -> list:
    return [(c["result"], c["is_error"], c["answered_by"]) for c in calls]


def test_session_threads_run_and_stop_as_the_official_worker_runs_them(cp):
    """Two calls of different threads issued at once overlap (the subagent's waits for the file the
    primary thread's call writes), and a subagent whose thread goes idle without its running call
    has that call stopped; the official worker with `max_concurrent_calls=2` and Stockade's with
    `--max-concurrent-calls 2` answer every call alike."""
    official = cp.create(THREAD_STEPS)
    with tempfile.TemporaryDirectory() as wd:
        run_official_worker(cp, wd, lambda: ended(cp.view(official)), max_concurrent_calls=2)
    theirs = cp.view(official)["calls"]
    v, err = run_stockade_worker(cp, cp.create(THREAD_STEPS), "--max-concurrent-calls", "2")
    ours = v["calls"]
    assert ended(v), err
    assert answers(theirs) == THREAD_ANSWERS, theirs
    assert answers(ours) == answers(theirs), (ours, err)
    assert v["duplicate_results"] == 0


def test_stockade_sends_what_the_official_worker_sends(cp):
    """The same sessions served once by the official worker and once by Stockade's: every route
    either uses must be used by the other, with the same anthropic-* headers and query names."""
    steps = [{"name": "bash", "input": {"command": "sleep 1; echo hi"}},
             {"name": "bash", "input": {"command": "echo asked"}, "permission": "ask", "confirm": "allow"}]
    skills = {"hello": skill_zip(cp.dir.name)}
    s1 = cp.create(steps, skills=skills)
    with tempfile.TemporaryDirectory() as wd:
        run_official_worker(cp, wd, lambda: cp.view(s1)["work_state"] == "stopped")
    official = [r for r in cp.requests() if "anthropic" in r["headers"].get("user-agent", "").lower()
                or r["headers"].get("x-stainless-lang")]
    n = len(cp.requests())
    s2 = cp.create(steps, skills=skills)
    v, _ = run_stockade_worker(cp, s2)
    # The same call, answered by the official worker's tools and by Stockade's: the same text.
    assert [c["result"] for c in v["calls"]] == [c["result"] for c in cp.view(s1)["calls"]] == ["hi", "asked"], v
    ours = [r for r in cp.requests()[n:] if r["headers"].get("user-agent", "").startswith("stockade/")]

    def shape(reqs):
        out = {}
        for r in reqs:
            h = r["headers"]
            key = route(r)
            out.setdefault(key, set()).add((
                h.get("anthropic-version"), h.get("anthropic-beta"), h.get("anthropic-worker-id") is not None,
                tuple(sorted({k for k, _ in r["query"]})), r["credential"].split(":")[0] + ":" + r["credential"].split(":")[1],
            ))
        return out

    # The claim comes first: the first heartbeat, then the session read, then the events with the
    # SDK's type filter, in that order, on both.
    def order(reqs):
        routes = [route(r) for r in reqs]
        hb = next(i for i, r in enumerate(routes) if r.endswith("/heartbeat"))
        read = routes.index("GET /v1/sessions/sesn_ID")
        listed = routes.index("GET /v1/sessions/sesn_ID/events")
        return hb < read < listed
    assert order(official) and order(ours), ([route(r) for r in official][:8], [route(r) for r in ours][:8])
    listings = [r for r in ours if route(r) == "GET /v1/sessions/sesn_ID/events"]
    assert listings and all({v for k, v in r["query"] if k == "types[]"} >= {"agent.tool_use", "session.status_idle",
                                                                            "user.tool_confirmation"}
                            for r in listings), listings[:1]
    theirs, mine = shape(official), shape(ours)
    assert set(theirs) == set(mine), (sorted(theirs), sorted(mine))
    for k in theirs:
        # Query names the official worker sends on a route, Stockade sends too (and no others).
        assert {q for t in theirs[k] for q in t[3]} == {q for t in mine[k] for q in t[3]}, (k, theirs[k], mine[k])
        assert {t[:3] for t in theirs[k]} == {t[:3] for t in mine[k]}, (k, theirs[k], mine[k])
        assert {t[4] for t in theirs[k]} == {t[4] for t in mine[k]}, (k, theirs[k], mine[k])


def test_the_control_planes_webhooks_verify_with_the_official_sdk():
    """Deliveries of `stockade control-plane --webhook-url` unwrap with client.beta.webhooks."""
    import http.server
    import threading

    got = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            got.append((body, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cp = ControlPlane(extra=["--webhook-url", f"http://127.0.0.1:{server.server_port}/hook"])
    try:
        s = cp.create([{"name": "bash", "input": {"command": "true"}}])
        deadline = time.time() + 10
        while not got and time.time() < deadline:
            time.sleep(0.05)
        assert got, "no delivery"
        body, headers = got[0]
        key = Path(cp.dir.name, "webhook.key").read_text().strip()
        event = sdk_client(cp).beta.webhooks.unwrap(body.decode(), headers=headers, key=key)
        assert event.type == "event" and event.data.type == "session.status_run_started" and event.data.id == s
        with pytest.raises(Exception):
            sdk_client(cp).beta.webhooks.unwrap(body.decode().replace(s, "sesn_other"), headers=headers, key=key)
    finally:
        cp.close()
        server.shutdown()


def memory_store(cp: ControlPlane, name: str, seed: dict) -> str:
    env = {**os.environ, "ANTHROPIC_API_KEY": cp.org_key}
    base = [STOCKADE, "control-plane", "memory-store"]
    out = subprocess.run([*base, "create", "--name", name, "--api-url", cp.url], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    store = json.loads(out.stdout)["id"]
    for path, content in seed.items():
        out = subprocess.run([*base, "put", store, path, "--api-url", cp.url], input=content, env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    return store


def memories(cp: ControlPlane, store: str) -> dict:
    out = subprocess.run([STOCKADE, "control-plane", "memory-store", "show", store, "--json", "--api-url", cp.url],
                         env={**os.environ, "ANTHROPIC_API_KEY": cp.org_key}, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return {m["path"]: m["content"] for m in json.loads(out.stdout)}


def test_memory_stores_end_as_the_official_worker_leaves_them(cp):
    """The same scripted session with a writable and a read-only memory store, served once by the
    official worker and once by Stockade's: the same answers, and the stores end the same."""
    root = f"/mnt/stockade-sdk-{os.getpid()}-{time.time_ns()}"
    notes, shared = f"{root}/notes", f"{root}/shared"
    steps = [
        {"name": "read", "input": {"file_path": f"{notes}/seed.md"}},
        {"name": "write", "input": {"file_path": f"{notes}/new/n.md", "content": "from write\n"}},
        {"name": "edit", "input": {"file_path": f"{notes}/seed.md", "old_string": "seed", "new_string": "edited"}},
        {"name": "bash", "input": {"command": f"head -1 {notes}/.anthropic-memory-store; echo bash > {notes}/b.md; "
                                              f"rm {notes}/old.md; cat {shared}/rules.md"}},
        {"name": "write", "input": {"file_path": f"{shared}/rules.md", "content": "be mean"}},
        {"name": "write", "input": {"file_path": f"{notes}/.anthropic-memory-store", "content": "x"}},
        {"name": "write", "input": {"file_path": f"{notes}/big.md", "content": "y" * 150_000}},
        {"name": "edit", "input": {"file_path": f"{notes}/new/n.md", "old_string": "nowhere", "new_string": "x"}},
        {"name": "glob", "input": {"pattern": "**/*.md", "path": notes}},
    ]
    seed_notes = {"/seed.md": "seed line\n", "/old.md": "to go\n", "/keep/a.md": "a"}
    seed_shared = {"/rules.md": "be kind\n"}

    def session():
        n = memory_store(cp, "notes", seed_notes)
        s = memory_store(cp, "shared", seed_shared)
        script = Path(cp.dir.name, f"script-{time.time_ns()}.jsonl")
        script.write_text("\n".join(json.dumps(x) for x in steps) + "\n")
        out = cp.cli("create", "--script", str(script), "--memory-store", f"{n}:{notes}",
                     "--memory-store", f"{s}:{shared}:read_only")
        return json.loads(out)["session_id"], n, s

    try:
        official, n1, s1 = session()
        with tempfile.TemporaryDirectory() as wd:
            run_official_worker(cp, wd, lambda: ended(cp.view(official)))
        theirs = cp.view(official)["calls"]
        ours_session, n2, s2 = session()
        v, err = run_stockade_worker(cp, ours_session)
        ours = v["calls"]
    finally:
        subprocess.run(["rm", "-rf", root])
    assert ended(v), err
    assert theirs[0]["result"] == "seed line\n", theirs
    assert theirs[4]["is_error"] and "read-only directory" in theirs[4]["result"], theirs
    assert answers(ours) == answers(theirs), (ours, theirs, err)
    want = memories(cp, n1)
    assert want == {"/seed.md": "edited line\n", "/new/n.md": "from write\n", "/b.md": "bash\n", "/keep/a.md": "a"}
    assert memories(cp, n2) == want, err
    assert memories(cp, s1) == memories(cp, s2) == seed_shared


def test_the_official_client_parses_every_memory_answer(cp):
    """`client.beta.memory_stores` against the local control plane: stores, memories in both
    views and pages, the content-hash preconditions, versions, and who may call."""
    import hashlib
    org = sdk_client(cp)
    ms = org.beta.memory_stores
    store = ms.create(name="User Preferences", description="what the user likes")
    assert store.type == "memory_store" and store.id.startswith("memstore_") and store.archived_at is None
    assert ms.retrieve(store.id).name == "User Preferences"
    assert store.id in [s.id for s in ms.list()]
    m = ms.memories.create(store.id, path="/notes/todo.md", content="buy milk")
    sha = hashlib.sha256(b"buy milk").hexdigest()
    assert m.type == "memory" and m.content is None and m.content_sha256 == sha and m.content_size_bytes == 8
    full = ms.memories.retrieve(m.id, memory_store_id=store.id)
    assert full.content == "buy milk" and full.memory_version_id
    for i in range(25):
        ms.memories.create(store.id, path=f"/bulk/{i:02}.md", content=str(i))
    basic = list(ms.memories.list(store.id, limit=10))
    assert len(basic) == 26 and all(x.content is None for x in basic)
    fulls = list(ms.memories.list(store.id, view="full"))
    assert len(fulls) == 26 and all(x.content is not None for x in fulls)
    rolled = ms.memories.list(store.id, depth=1).data
    assert {x.type for x in rolled} == {"memory_prefix"} and {x.path for x in rolled} == {"/bulk/", "/notes/"}
    upd = ms.memories.update(m.id, memory_store_id=store.id, content="buy oat milk",
                             precondition={"type": "content_sha256", "content_sha256": sha})
    assert upd.content_sha256 == hashlib.sha256(b"buy oat milk").hexdigest()
    with pytest.raises(anthropic.ConflictError):
        ms.memories.update(m.id, memory_store_id=store.id, content="x",
                                 precondition={"type": "content_sha256", "content_sha256": sha})
    with pytest.raises(anthropic.ConflictError):
        ms.memories.delete(m.id, memory_store_id=store.id, expected_content_sha256=sha)
    with pytest.raises(anthropic.APIStatusError) as e:
        ms.memories.create(store.id, path="/big.md", content="y" * 102_401)
    assert e.value.status_code == 413
    with pytest.raises(anthropic.BadRequestError):
        ms.memories.create(store.id, path="/a/../b.md", content="")
    gone = ms.memories.delete(m.id, memory_store_id=store.id, expected_content_sha256=upd.content_sha256)
    assert gone.type == "memory_deleted" and gone.id == m.id
    with pytest.raises(anthropic.NotFoundError):
        ms.memories.retrieve(m.id, memory_store_id=store.id)
    versions = list(ms.memory_versions.list(store.id, memory_id=m.id))
    assert [v.operation for v in versions] == ["deleted", "modified", "created"], versions
    assert ms.memory_versions.retrieve(versions[1].id, memory_store_id=store.id).content == "buy oat milk"
    # The environment key may not use a store.
    env_client = anthropic.Anthropic(auth_token=cp.env_key, api_key=None, base_url=cp.url, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        env_client.beta.memory_stores.memories.list(store.id).data
    archived = ms.archive(store.id)
    assert archived.archived_at is not None
    assert ms.delete(store.id).type == "memory_store_deleted"
