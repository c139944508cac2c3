"""The six tools, differentially: every call goes through the official SDKs' reference tools
(the pinned `anthropic` release and, where STOCKADE_TS_SDK names an installed `@anthropic-ai/sdk`,
the pinned TypeScript release; unjailed, in scratch directories) and through `stockade session`
(jailed, the same tree at /workspace). Stockade's answer must be the same bytes as Python's once
the scratch path reads /workspace; wherever Python and TypeScript agree, that is the contract and
it must equal both. Where the two SDKs differ, Stockade follows Python and the difference is
printed (and written to $STOCKADE_DIFF_REPORT when set), so it is seen, not hidden.

Most calls are generated from a seed, which is printed; `STOCKADE_DIFF_SEED=N` replays a run.
A failing call prints both answers. The cases where Stockade differs on purpose are listed in
KNOWN_DIVERGENCES (and in the README); each is checked for Stockade's own documented answer.
"""

import os
import re
import sys
import json
import random
import shutil
import tempfile
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STOCKADE = os.environ.get("STOCKADE", str(HERE.parents[1] / "target/debug/stockade"))
ORACLE = HERE / "toolset_oracle.py"
TS_ORACLE = HERE / "ts_toolset_oracle.mjs"
TS_SDK = os.environ.get("STOCKADE_TS_SDK")
NODE = os.environ.get("STOCKADE_NODE", "node")
ROOT = "{ROOT}"  # stands for the working directory in a call's input

KNOWN_DIVERGENCES = {
    "grep-order": "ripgrep prints files in the order its threads finish; Stockade sorts them by path",
    "bash-exit": "after the shell exits the runner fails every call until a restart; Stockade starts a new shell",
}

WORDS = ["alpha", "beta", "gamma", "delta", "hello", "world", "foo", "bar", "baz", "TODO", "fn", "let", "x",
         "données", "日本語", "émoji🎉", "tab\there", "end."]
DIRS = ["src", "docs", "données", "日本", "a b", "deep", ".hidden", "node_modules"]
FILES = ["main.rs", "lib.rs", "notes.txt", "README.md", "a.txt", "b.TXT", "ünï.txt", "x.py", ".env", "data.json",
         "emoji🎉.md", "sp ace.txt", "q?.txt", "[x].txt"]


def seed():
    s = os.environ.get("STOCKADE_DIFF_SEED")
    return int(s) if s else random.SystemRandom().randrange(1 << 31)


def text_file(rng):
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 8))) for _ in range(rng.randrange(0, 30))]
    nl = rng.choice(["\n", "\n", "\r\n"])
    body = nl.join(lines)
    if rng.random() < 0.7 and lines:
        body += nl
    return body.encode()


def build_tree(rng, root):
    """Creates the same tree for the same rng state; returns (files, dirs) relative paths."""
    files, dirs = [], [""]
    for _ in range(rng.randrange(6, 12)):
        parent = rng.choice(dirs)
        d = os.path.join(parent, rng.choice(DIRS)) if parent.count("/") < 3 else parent
        if d not in dirs:
            (root / d).mkdir(parents=True, exist_ok=True)
            dirs.append(d)
    for _ in range(rng.randrange(15, 30)):
        rel = os.path.join(rng.choice(dirs), rng.choice(FILES))
        if rel in files or rel in dirs:
            continue
        kind = rng.random()
        if kind < 0.65:
            data = text_file(rng)
        elif kind < 0.72:
            data = b""
        elif kind < 0.80:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\0alpha\n"
        elif kind < 0.88:
            data = "caf\u00e9 alpha\n".encode("latin-1")
        else:
            data = ("alpha beta\n" * rng.randrange(1, 5)).encode()
        (root / rel).write_bytes(data)
        files.append(rel)
    # Files over each cap, images and a PDF.
    big = root / "big.log"
    with big.open("wb") as f:
        for i in range(30000):
            f.write(f"line {i} alpha {'x' * (i % 13)}\n".encode())
    files.append("big.log")
    (root / "oneline.txt").write_bytes(b"y" * (300 * 1024))
    files.append("oneline.txt")
    (root / "pic.png").write_bytes(bytes(rng.randrange(256) for _ in range(300)))
    (root / "PHOTO.JPG").write_bytes(bytes(rng.randrange(256) for _ in range(100)))
    (root / "doc.pdf").write_bytes(b"%PDF-1.4\n" + bytes(rng.randrange(256) for _ in range(500)))
    (root / "huge.png").write_bytes(b"\x89PNG" + b"\0" * (4 * 1024 * 1024))
    with (root / "huge.pdf").open("wb") as f:  # over the 20 MiB PDF cap, sparse
        f.write(b"%PDF-1.4\n")
        f.truncate(21 * 1024 * 1024)
    files += ["pic.png", "PHOTO.JPG", "doc.pdf", "huge.png", "huge.pdf"]
    (root / ".ignore").write_bytes(b"*.log\n")
    files.append(".ignore")
    # Symlinks that stay inside the tree, one dangling.
    target = rng.choice([f for f in files if "/" not in f] or ["a.txt"])
    os.symlink(target, root / "link.txt")
    os.symlink("src" if "src" in dirs else ".", root / "linkdir")
    os.symlink("missing-target", root / "dangling")
    files += ["link.txt", "linkdir", "dangling"]
    # Distinct modification times, older for deeper paths, set bottom-up.
    t = 1_700_000_000
    for i, rel in enumerate(sorted(files + dirs, key=lambda p: -p.count("/"))):
        p = root / rel if rel else root
        os.utime(p, (t + i * 7, t + i * 7), follow_symlinks=False)
    return files, dirs


def calls_for(rng, files, dirs, n):
    texts = [f for f in files if f.endswith((".txt", ".md", ".rs", ".py", ".json", ".TXT", ".env"))]
    pick = lambda seq: rng.choice(seq) if seq else "a.txt"
    absolute = lambda rel: f"{ROOT}/{rel}" if rng.random() < 0.3 else rel
    out = []

    def add(name, **inp):
        out.append({"name": name, "input": inp})

    for _ in range(n):
        r = rng.random()
        if r < 0.22:
            f = pick(files + ["nope.txt", "src", "missing/dir/x"])
            vr = rng.choice([None, None, [1, 3], [2, -1], [0, 0], [5, 2], [-3, 2], [1], [], [1, 2, 3], [3, 3],
                             [10, 20], [29990, -1], [1, 1]])
            if vr is None:
                add("read", file_path=absolute(f))
            else:
                add("read", file_path=absolute(f), view_range=vr)
        elif r < 0.32:
            f = rng.choice([pick(texts), f"new/{rng.choice(DIRS)}/{rng.choice(FILES)}", pick(dirs[1:] or ["src"]),
                            f"{pick(texts)}/under-a-file.txt"])
            add("write", file_path=absolute(f), content=rng.choice(["", "one line", "é\n日本\n", "a\r\nb\r\n",
                                                                 " ".join(rng.choice(WORDS) for _ in range(50))]))
        elif r < 0.44:
            f = pick(texts + ["big.log", "pic.png", "nope.txt"])
            old = rng.choice(["alpha", "beta", "\n", "", "zzz-not-there", "hello world", "é", "TODO"])
            inp = {"file_path": absolute(f), "old_string": old, "new_string": rng.choice(["", "ALPHA", "β", "x\ny"])}
            if rng.random() < 0.4:
                inp["replace_all"] = rng.choice([True, False, "yes", 1])
            add("edit", **inp)
        elif r < 0.60:
            pat = rng.choice(["*", "**", "**/*", "**/*.txt", "*/", "**/", "*.md", "src/*.rs", "[a-c]*", "?.txt",
                              "**/日本*", ".*", "nomatch*", "*/**/*.rs", "**/**", "*[!a-z]*", "d*/", "../x", "/abs",
                              "", "**x", ".", "./", "a/./b", "**/*.TXT", "[z-a]*", "q?.txt", "[[]x].txt"])
            inp = {"pattern": pat}
            if rng.random() < 0.35:
                inp["path"] = rng.choice(dirs[1:] + ["nope", "a.txt", "linkdir", ROOT] if dirs[1:] else ["nope"])
            add("glob", **inp)
        elif r < 0.76:
            pat = rng.choice(["alpha", "beta", "^fn", "end\\.$", "\\bfoo\\b", "日本", "caf", "(", "[a-", "a\\nb",
                              "TODO|FIXME", "x{2,}", "", "line 29999", "\\p{Greek}", "(?i)HELLO", "tab\\there"])
            inp = {"pattern": pat}
            if rng.random() < 0.6:
                inp["path"] = rng.choice(files + dirs[1:] + ["nope"])
            add("grep", **inp)
        else:
            cmd = rng.choice([
                "echo hello", "printf 'no newline'", "printf '\\033[31mred\\033[0m\\n'", "echo to-stderr >&2",
                "false", "exit_code() { return 7; }; exit_code", "ls -1 | sort", "cd src 2>/dev/null; pwd",
                "export V=$((RANDOM % 1 + 41)); echo $V", "echo $V", "nosuchcommand", "seq 1 40000",
                "printf '%s' \"$(seq 1 30000)\"; printf '\\n\\n\\n'", "cat", "echo a; echo b >&2; echo c",
                "printf 'é%.0s' $(seq 1 60000)", "echo '日本語'; false",                "printf '\\n\\n'", "echo $((1+2))", "wc -l < big.log", "head -c 100 /dev/zero | tr '\\0' x",
            ])
            add("bash", command=cmd)
    return out


# Scripted sequences that the generator would rarely produce: state, timeouts, restarts.
SCRIPTED = [
    {"name": "bash", "input": {"command": "cd src 2>/dev/null || mkdir -p src && cd src; pwd"}},
    {"name": "bash", "input": {"command": "pwd; X=1"}},
    {"name": "bash", "input": {"command": "echo $X"}},
    {"name": "bash", "input": {"command": "sleep 5", "timeout_ms": 300}},
    {"name": "bash", "input": {"command": "echo after-timeout"}},
    {"name": "bash", "input": {"restart": True}},
    {"name": "bash", "input": {"command": "pwd; echo $X"}},
    {"name": "bash", "input": {"command": "echo ignored", "restart": "yes"}},
    {"name": "bash", "input": {}},
    {"name": "bash", "input": {"command": ""}},
    {"name": "bash", "input": {"command": "echo hi", "timeout_ms": "1500"}},
    {"name": "bash", "input": {"command": "echo hi", "timeout_ms": 1.5}},
    {"name": "bash", "input": {"command": 5}},
    {"name": "bash", "input": {"command": "sleep 3", "timeout_ms": 250}},
    {"name": "bash", "input": {"restart": 1}},
    {"name": "bash", "input": {"command": "exit 3"}, "divergence": "bash-exit"},
    {"name": "bash", "input": {"restart": True}},
    {"name": "bash", "input": {"command": "nosuch; echo $?"}},
    {"name": "bash", "input": {"command": "echo start; echo err >&2; sleep 5", "timeout_ms": 300}},
    {"name": "bash", "input": {"command": "echo refused"}},
    {"name": "bash", "input": {"restart": True, "command": "echo restarted-and-ran; echo \"[$HISTFILE]\""}},
    {"name": "bash", "input": {"command": "printf '\U0001F389%.0s' $(seq 1 20000)"}},
    {"name": "bash", "input": {"command": "seq 1 40000 >&2; echo out; false"}},
    {"name": "bash", "input": {"command": "printf 'x%.0s' $(seq 1 30000)"}},
    {"name": "bash", "input": {"command": "printf 'x%.0s' $(seq 1 30001)"}},
    {"name": "bash", "input": {"command": "echo capped", "timeout_ms": 10000000}},
    {"name": "bash", "input": {"command": "echo negative", "timeout_ms": -1}},
    {"name": "bash", "input": {"command": "exit 0"}, "divergence": "bash-exit"},
    {"name": "bash", "input": {"restart": True}},
    {"name": "edit", "input": {"file_path": "w/deep/new.txt", "old_string": "y", "new_string": "y" * 200, "replace_all": True}},
    {"name": "read", "input": {"file_path": "w/deep/new.txt", "view_range": [1, 1]}},
    {"name": "read", "input": {"file_path": "a.txt", "offset": 2}},
    {"name": "read", "input": [1, 2]},
    {"name": "read", "input": {"file_path": 7}},
    {"name": "read", "input": {"file_path": "a.txt", "view_range": ["1", True]}},
    {"name": "read", "input": {"file_path": "a.txt", "view_range": [1.5, 2]}},
    {"name": "read", "input": {"file_path": "big.log", "view_range": [1, 40000]}},
    {"name": "read", "input": {"file_path": "oneline.txt", "view_range": [1, 1]}},
    {"name": "read", "input": {"file_path": "oneline.txt", "view_range": [2, 5]}},
    {"name": "read", "input": {"file_path": "huge.png"}},
    {"name": "read", "input": {"file_path": "huge.pdf"}},
    {"name": "read", "input": {"file_path": "doc.pdf"}},
    {"name": "read", "input": {"file_path": "pic.png", "view_range": [1, 2]}},
    {"name": "read", "input": {"file_path": "dangling"}},
    {"name": "read", "input": {"file_path": "nul\u0000byte"}},
    {"name": "write", "input": {"file_path": "w/deep/new.txt", "content": "x" * 5000}},
    {"name": "write", "input": {"file_path": "w", "content": "onto a directory"}},
    {"name": "edit", "input": {"file_path": "w/deep/new.txt", "old_string": "x", "new_string": "y"}},
    {"name": "edit", "input": {"file_path": "w/deep/new.txt", "old_string": "xx", "new_string": "y", "replace_all": True}},
    {"name": "edit", "input": {"file_path": "w/deep/new.txt", "old_string": "", "new_string": "S"}},
    {"name": "edit", "input": {"file_path": "oneline.txt", "old_string": "y", "new_string": "z"}},
    {"name": "edit", "input": {"file_path": "w", "old_string": "a", "new_string": "b"}},
    {"name": "glob", "input": {"pattern": "**/*", "path": "w"}},
    {"name": "glob", "input": {"pattern": "*.txt", "extra": 1}},
    {"name": "grep", "input": {"pattern": "x", "path": "w/deep/new.txt"}},
    {"name": "grep", "input": {"pattern": "nul\u0000"}},
    {"name": "grep", "input": {"pattern": "alpha", "path": "big.log"}},
]


def json_lines(out: bytes):
    """One JSON document per line. Only "\\n" ends a line: str.splitlines would also cut at the
    U+2028, U+0085 and the like that a binary file's text can hold, inside a document."""
    return [l for l in out.decode().split("\n") if l]


def run_oracle(workdir, calls, typescript=False):
    lines = "".join(json.dumps({"id": str(i), "name": c["name"], "input": c["input"]}) + "\n"
                    for i, c in enumerate(calls))
    lines = lines.replace(ROOT, str(workdir))
    cmd = [NODE, str(TS_ORACLE), str(workdir)] if typescript else [sys.executable, str(ORACLE), str(workdir)]
    p = subprocess.run(cmd, input=lines.encode(), capture_output=True, timeout=900)
    assert p.returncode == 0, p.stderr.decode()
    out = [json.loads(l) for l in json_lines(p.stdout)]
    return [saved_name(json.loads(json.dumps(o).replace(json.dumps(str(workdir))[1:-1], "/workspace"))) for o in out]


# Python names it bash-output-XXXXXXXX/tmpXXXXXXXX.txt, TypeScript bash-output-XXXXXX/UUID.txt.
SAVED = re.compile(r"/tmp/bash-output-[A-Za-z0-9_]{6,8}/[A-Za-z0-9_-]+\.txt")


def saved_name(result):
    """The file that holds a long bash output has a random name on each side: one name for all."""
    for block in result.get("content", []):
        if "text" in block:
            block["text"] = SAVED.sub("/tmp/bash-output-SAVED/tmpSAVED.txt", block["text"])
    return result


HOST_DIRS = 'extends = "default"\n[limits]\nworkspace_size = "none"\noutputs_size = "none"\n'


def run_stockade(workspace, calls, policy=None):
    lines = "".join(json.dumps({"id": str(i), "name": c["name"], "input": c["input"]}) + "\n"
                    for i, c in enumerate(calls))
    lines = lines.replace(ROOT, "/workspace")
    if policy is None:
        # The scratch tree is on the machine's large disk: no size limit could hold there.
        policy = str(Path(workspace).parent / "host-dirs.toml")
        Path(policy).write_text(HOST_DIRS)
    cmd = [STOCKADE, "session", "--workspace", str(workspace), "--policy", policy]
    p = subprocess.run(cmd, input=lines.encode(), capture_output=True, timeout=900)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    return [saved_name(json.loads(l)) for l in json_lines(p.stdout)]


def grep_lines(r):
    return sorted(b.get("text", "") for b in r["content"])[0].splitlines()


def same(call, a, b, touched=frozenset()):
    """Whether Stockade's answer `b` is the reference's `a`, or the documented divergence.

    `touched` holds the paths the calls before this one wrote (and their directories): their
    modification times are the clock's at the moment of the write, on each side its own moment,
    and two writes inside one clock tick tie on one side only. glob lists them newest first, so
    only their presence is compared; every other path keeps its exact place.
    """
    if (a["content"], a["is_error"]) == (b["content"], b["is_error"]):
        return True
    if call["name"] == "glob" and touched and not a["is_error"] and not b["is_error"]:
        la, lb = a["content"][0]["text"].split("\n"), b["content"][0]["text"].split("\n")
        keep = lambda l: [p for p in l if p not in touched]
        return sorted(la) == sorted(lb) and keep(la) == keep(lb)
    if call.get("divergence") == "bash-exit":
        text = b["content"][0]["text"]
        return b["is_error"] == a["is_error"] and "the next call starts a new shell" in text
    if call["name"] == "grep" and not a["is_error"] and not b["is_error"]:
        ta, tb = a["content"][0]["text"], b["content"][0]["text"]
        marker = "\n[output truncated at 102400 bytes]"
        if ta.endswith(marker) or tb.endswith(marker):
            return ta.endswith(marker) and tb.endswith(marker) and len(ta) == len(tb)
        return sorted(ta.splitlines()) == sorted(tb.splitlines())
    return False


def show(r):
    t = json.dumps(r["content"], ensure_ascii=False)
    return (t if len(t) < 600 else t[:300] + " … " + t[-300:]) + ("  [is_error]" if r["is_error"] else "")


def tree_pair(s):
    base = Path(tempfile.mkdtemp(prefix=f"stockade-diff-{s}-")).resolve()
    base.chmod(0o755)  # the jail's user must reach its workspace through this directory
    b = base / "stockade"
    b.mkdir()
    # The official tools' directory is as long as "/workspace": where output is cut at a
    # length, the paths in it must take the same room on both sides.
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    while True:
        a = Path("/tmp/" + "".join(random.SystemRandom().choice(alphabet) for _ in range(5)))
        try:
            a.mkdir()
            break
        except FileExistsError:
            continue
    (base / "oracle").symlink_to(a)
    fa, da = build_tree(random.Random(s), a)
    fb, db = build_tree(random.Random(s), b)
    assert (fa, da) == (fb, db)
    if os.geteuid() == 0:
        # The jail's user is uid 1000, mapped to host uid 101000 when Stockade runs as root.
        for dirpath, dirnames, filenames in os.walk(b):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), 101000, 101000)
        os.lchown(b, 101000, 101000)
    return base, a, b, fa, da


def tree_copy(s):
    """A third copy of the seed's tree, for the TypeScript tools, in a directory as long as /workspace."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    while True:
        c = Path("/tmp/" + "".join(random.SystemRandom().choice(alphabet) for _ in range(5)))
        try:
            c.mkdir()
            break
        except FileExistsError:
            continue
    build_tree(random.Random(s), c)
    return c


def compare(calls, oracle, stockade, s, typescript=None):
    """Stockade against Python, call by call; with `typescript`, also where the two SDKs agree."""
    assert len(oracle) == len(calls) and len(stockade) == len(calls), (len(oracle), len(stockade))
    bad = []
    sdk_differences = []
    touched = set()
    for i, (c, a, b) in enumerate(zip(calls, oracle, stockade)):
        t = typescript[i] if typescript is not None else None
        agree = t is not None and same(c, a, t, frozenset(touched))
        if t is not None and not agree:
            sdk_differences.append(f"call {i}: {c['name']} {json.dumps(c['input'], ensure_ascii=False)[:300]}\n"
                                   f"  python:     {show(a)}\n  typescript: {show(t)}")
        if not same(c, a, b, frozenset(touched)) or (agree and not same(c, t, b, frozenset(touched))):
            bad.append(f"call {i}: {c['name']} {json.dumps(c['input'], ensure_ascii=False)[:300]}\n"
                       f"  official: {show(a)}\n  stockade: {show(b)}")
        if c["name"] in ("write", "edit", "bash") and isinstance(c["input"], dict):
            p = str(c["input"].get("file_path", ""))
            if c["name"] == "bash":
                touched.add("*")
            while p and p not in (".", "/", ROOT):
                touched.add(os.path.normpath(os.path.join("/workspace", p.replace(ROOT + "/", ""))))
                p = os.path.dirname(p)
            touched.add("/workspace")
    if typescript is not None:
        print(f"seed {s}: the SDKs agree on {len(calls) - len(sdk_differences)} of {len(calls)} calls; "
              f"{len(sdk_differences)} differ (Stockade follows Python there)")
        for d in sdk_differences:
            print(d)
        report = os.environ.get("STOCKADE_DIFF_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(f"seed {s}: {len(sdk_differences)} of {len(calls)} calls differ between the SDKs\n")
                f.writelines(d + "\n" for d in sdk_differences)
    assert not bad, f"seed {s}: {len(bad)} of {len(calls)} answers differ\n" + "\n".join(bad[:15])


def test_three_hundred_calls_answer_as_the_official_tools_do():
    s = seed()
    print(f"STOCKADE_DIFF_SEED={s}")
    base, a, b, files, dirs = tree_pair(s)
    try:
        rng = random.Random(s + 1)
        calls = calls_for(rng, files, dirs, 300) + SCRIPTED
        assert len(calls) >= 300
        ts = None
        if TS_SDK:
            c = tree_copy(s)
            try:
                ts = run_oracle(c, calls, typescript=True)
            finally:
                shutil.rmtree(c, ignore_errors=True)
        compare(calls, run_oracle(a, calls), run_stockade(b, calls), s, ts)
    finally:
        shutil.rmtree(base / "oracle", ignore_errors=True)
        shutil.rmtree(Path(os.readlink(base / "oracle")), ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


OUTSIDE = [
    {"name": "read", "input": {"file_path": "../outside.txt"}},
    {"name": "read", "input": {"file_path": "/etc/hostname"}},
    {"name": "write", "input": {"file_path": "/tmp/x.txt", "content": "x"}},
    {"name": "edit", "input": {"file_path": "../../x", "old_string": "a", "new_string": "b"}},
    {"name": "glob", "input": {"pattern": "*", "path": "/"}},
    {"name": "grep", "input": {"pattern": "x", "path": "/etc"}},
    {"name": "read", "input": {"file_path": "it's/../../x"}},
]


def test_with_confine_paths_the_file_tools_refuse_what_the_official_tools_refuse():
    s = seed()
    print(f"STOCKADE_DIFF_SEED={s}")
    base, a, b, files, dirs = tree_pair(s)
    try:
        policy = base / "confined.toml"
        policy.write_text(HOST_DIRS + '\n[tools]\nconfine_paths = true\n')
        calls = OUTSIDE + calls_for(random.Random(s + 2), files, dirs, 40)
        compare(calls, run_oracle(a, calls), run_stockade(b, calls, str(policy)), s)
    finally:
        shutil.rmtree(base / "oracle", ignore_errors=True)
        shutil.rmtree(Path(os.readlink(base / "oracle")), ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
