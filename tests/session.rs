//! Session jails driven through `stockade session` (JSON lines), as the worker drives them.

mod common;
use common::*;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

struct Sess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    n: u64,
}

impl Sess {
    fn start(args: &[&str]) -> Sess {
        let mut child = Command::new(STOCKADE)
            .arg("session")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("ANTHROPIC_API_KEY", "sk-planted-org-key")
            .env("ANTHROPIC_ENVIRONMENT_KEY", "sk-planted-env-key")
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Sess { child, stdin, stdout, n: 0 }
    }

    fn raw(&mut self, line: &str) -> Value {
        let w = self.stdin.as_mut().unwrap();
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        w.flush().unwrap();
        let mut out = String::new();
        self.stdout.read_line(&mut out).unwrap();
        assert!(!out.is_empty(), "session ended unexpectedly");
        serde_json::from_str(&out).unwrap()
    }

    /// (content, is_error)
    fn call(&mut self, name: &str, input: Value) -> (String, bool) {
        self.n += 1;
        let id = format!("c{}", self.n);
        let v = self.raw(&json!({"id": id, "name": name, "input": input}).to_string());
        assert_eq!(v["id"], json!(id), "results come back in order");
        (text_of(&v["content"]), v["is_error"].as_bool().unwrap())
    }

    fn bash(&mut self, cmd: &str) -> String {
        let (c, e) = self.call("bash", json!({"command": cmd}));
        assert!(!e, "bash `{cmd}` failed: {c}");
        c
    }

    fn end(mut self) -> i32 {
        drop(self.stdin.take());
        let st = self.child.wait().unwrap();
        st.code().unwrap_or(-1)
    }
}

/// The text blocks of a result, joined.
fn text_of(content: &Value) -> String {
    content
        .as_array()
        .unwrap_or_else(|| panic!("content is not a list of blocks: {content}"))
        .iter()
        .map(|b| b["text"].as_str().unwrap_or_else(|| panic!("not a text block: {b}")))
        .collect()
}

#[test]
fn shell_state_persists_and_tools_share_the_workspace() {
    let mut s = Sess::start(&[]);
    assert_eq!(s.bash("cd /tmp && export GREETING=hello && shout() { echo \"$1!\"; }"), "(no output)");
    assert_eq!(s.bash("pwd; echo $GREETING; shout hey"), "/tmp\nhello\nhey!");
    let (c, e) = s.call("write", json!({"file_path": "/workspace/src/a.py", "content": "print('x')\nprint('y')\n"}));
    assert!(!e, "{c}");
    assert_eq!(s.call("read", json!({"file_path": "/workspace/src/a.py"})), ("print('x')\nprint('y')\n".into(), false));
    let (c, e) = s.call("edit", json!({"file_path": "/workspace/src/a.py", "old_string": "'y'", "new_string": "'z'"}));
    assert!(!e, "{c}");
    assert_eq!(s.bash("cat /workspace/src/a.py"), "print('x')\nprint('z')");
    assert_eq!(s.call("glob", json!({"pattern": "**/*.py"})), ("/workspace/src/a.py".into(), false));
    assert_eq!(s.call("grep", json!({"pattern": "z"})), ("/workspace/src/a.py:2:print('z')\n".into(), false));
    assert_eq!(s.end(), 0);
}

#[test]
fn timeout_kills_the_whole_process_group_and_the_session_continues() {
    let mut s = Sess::start(&[]);
    s.bash("cd /tmp; export KEEP=yes");
    let t = Instant::now();
    let (c, e) = s.call(
        "bash",
        json!({"command": "sleep 300 & (setsid sleep 301 &); echo waiting; sleep 302", "timeout_ms": 500}),
    );
    assert!(e && c.starts_with("\ncommand timed out after 0.5s\n\nwaiting\n[The shell is gone."), "{c}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // As with the official runner, the shell stays down until a restart.
    let (c, e) = s.call("bash", json!({"command": "echo hi"}));
    assert!(e && c.starts_with("[This command did not run, because the shell is gone."), "{c}");
    let (c, e) = s.call("bash", json!({"restart": true}));
    assert_eq!((c.as_str(), e), ("bash session restarted", false));
    // Everything the command started is gone; the shell is fresh.
    assert_eq!(s.bash("ps -eo args | grep -c '^sleep 30[0-2]' || true"), "0");
    assert_eq!(s.bash("echo ${KEEP:-reset}; pwd"), "reset\n/workspace");
    assert_eq!(s.end(), 0);
}

#[test]
fn a_crashed_helper_does_not_end_the_session() {
    let mut s = Sess::start(&[]);
    s.call("write", json!({"file_path": "/workspace/x", "content": "1\n"}));
    // The helper is the child of the primary thread's lane (PID 1's child); kill it from
    // inside, as a crash would.
    let helper = s.bash("ps -eo pid,ppid,args | awk '$2 > 1 && $3 ~ /stockade/ {print $1}'");
    assert!(!helper.trim().is_empty(), "helper not found");
    // Kill it and wait until it is dead (a zombie awaiting PID 1), i.e. it died between calls.
    let pid = helper.trim();
    s.bash(&format!(
        "kill -9 {pid}; until awk '{{exit $3 != \"Z\"}}' /proc/{pid}/stat 2>/dev/null; do sleep 0.01; done"
    ));
    assert_eq!(s.call("read", json!({"file_path": "/workspace/x"})), ("1\n".into(), false));
    assert_eq!(s.bash("echo still here"), "still here");
    assert_eq!(s.end(), 0);
}

#[test]
fn a_killed_thread_process_costs_its_call_and_shell_only() {
    let mut s = Sess::start(&[]);
    s.bash("cd /tmp; X=1");
    // The shell's parent is its thread's lane.
    let (c, e) = s.call("bash", json!({"command": "kill -9 $PPID; sleep 5"}));
    assert!(e, "{c}");
    assert!(c.contains("the session thread's tool process was killed by SIGKILL while running `bash`"), "{c}");
    // A new lane, with a new shell, takes the next call.
    assert_eq!(s.bash("pwd; echo ${X:-unset}"), "/workspace\nunset");
    assert_eq!(s.end(), 0);
}

#[test]
fn paths_are_resolved_by_the_kernel_inside_the_jail() {
    let mut s = Sess::start(&[]);
    s.bash("ln -s /etc/shadow /workspace/shadow; ln -s ../../../../etc/passwd /workspace/pw; ln -s /proc/1/environ /workspace/env");
    let (c, e) = s.call("read", json!({"file_path": "/workspace/shadow"}));
    assert_eq!((c.as_str(), e), ("read: /workspace/shadow: no such file or directory", true));
    let (c, e) = s.call("read", json!({"file_path": "/workspace/pw"}));
    assert_eq!(
        (c.as_str(), e),
        ("agent:x:1000:1000:agent:/workspace:/bin/sh\n", false),
        "the jail's passwd, not the host's"
    );
    let (c, e) = s.call("read", json!({"file_path": "/workspace/../../etc/hostname"}));
    assert_eq!((c.as_str(), e), ("stockade\n", false));
    let (c, e) = s.call("read", json!({"file_path": "/workspace/env"}));
    assert!(e && c.contains("permission denied"), "PID 1's environment is unreadable: {c}");
    for target in ["/usr/bin/evil", "/etc/passwd", "/proc/self/comm", "/workspace/../usr/x"] {
        let (c, e) = s.call("write", json!({"file_path": target, "content": "x"}));
        assert!(e, "write to {target} must fail: {c}");
    }
    let (c, e) = s.call("edit", json!({"file_path": "/etc/hostname", "old_string": "stockade", "new_string": "owned"}));
    assert!(e, "{c}");
    assert_eq!(s.end(), 0);
}

#[test]
fn hostile_inputs_are_errors_not_failures() {
    let mut s = Sess::start(&[]);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("read", json!({}), "ValueError('Invalid arguments for function read')"),
        ("read", json!({"file_path": ["x"]}), "ValueError('Invalid arguments for function read')"),
        ("read", json!({"file_path": "relative.txt"}), "read: relative.txt: no such file or directory"),
        ("read", json!({"file_path": "/dev/zero"}), "read: /dev/zero: not a regular file"),
        ("read", json!({"file_path": "/workspace"}), "read: /workspace: not a regular file"),
        ("read", json!({"file_path": "/work\u{0}space"}), "read: embedded null byte"),
        (
            "grep",
            json!({"pattern": "(((("}),
            "grep: rg failed: regex parse error:\n    ((((\n       ^\nerror: unclosed group\n",
        ),
        ("glob", json!({"pattern": ""}), "glob: Unacceptable pattern: ''"),
        ("bash", json!({"command": 5}), "ValueError('Invalid arguments for function bash')"),
        ("frobnicate", json!({}), "Unknown tool `frobnicate`; tools: bash, read, write, edit, glob, grep"),
    ];
    for (name, input, want) in cases {
        let (c, e) = s.call(name, input.clone());
        assert_eq!((c.as_str(), e), (want, true), "{name} {input}");
    }
    s.bash("mkfifo /tmp/fifo");
    let (c, e) = s.call("read", json!({"file_path": "/tmp/fifo"}));
    assert_eq!((c.as_str(), e), ("read: /tmp/fifo: not a regular file", true));
    // A 2 GiB sparse file: bounded time and memory.
    s.bash("truncate -s 2G /tmp/huge");
    let t = Instant::now();
    let (c, e) = s.call("read", json!({"file_path": "/tmp/huge"}));
    assert!(e && c.contains("is 2147483648 bytes, exceeds 110000-byte limit"), "{c}");
    let (c, e) = s.call("read", json!({"file_path": "/tmp/huge", "view_range": [1, 2]}));
    assert!(e && c.contains("exceeds 110000-byte limit"), "{c}");
    assert!(t.elapsed() < Duration::from_secs(20));
    // grep reads a named binary file to its end, as ripgrep does: a smaller one here.
    s.bash("truncate -s 64M /tmp/sparse");
    let (c, _) = s.call("grep", json!({"pattern": "x", "path": "/tmp/sparse"}));
    assert_eq!(c, "no matches");
    // Invalid UTF-8 on disk, and a malformed request line.
    s.bash("printf 'ok\\n\\xff\\xfe\\n' > /tmp/bad");
    let (c, e) = s.call("read", json!({"file_path": "/tmp/bad"}));
    assert_eq!(
        (c.as_str(), e),
        ("read: /tmp/bad: not valid UTF-8 text (binary files are only supported for image/PDF extensions)", true)
    );
    let v = s.raw("{not json");
    assert_eq!(v["is_error"], json!(true));
    let v = s.raw(r#"{"id":"x7","name":"read"}"#);
    assert_eq!((v["id"].as_str(), v["is_error"].as_bool()), (Some("x7"), Some(true)));
    assert_eq!(s.bash("echo alive"), "alive");
    assert_eq!(s.end(), 0);
}

#[test]
fn the_channel_never_reaches_tool_processes() {
    let mut s = Sess::start(&[]);
    // Only the shell's own pipes and /dev/null: no socket of the channel, no stray descriptor.
    let fds = s.bash("for f in /proc/self/fd/*; do readlink $f; done | sed 's/:\\[[0-9]*\\]//' | sort | uniq -c | awk '{print $2}' | tr '\\n' ' '");
    assert!(!fds.contains("socket"), "{fds}");
    let env = s.bash("env | grep -c planted || true");
    assert_eq!(env, "0", "secrets in Stockade's environment never reach the shell");
    let (c, _) = s.call("read", json!({"file_path": "/proc/self/environ"}));
    assert!(!c.contains("planted"), "nor the file-tool helper: {c}");
    assert_eq!(s.end(), 0);
}

#[test]
fn fifty_sessions_in_parallel_share_nothing() {
    let n = 50;
    let mut sessions: Vec<Sess> = (0..n).map(|_| Sess::start(&[])).collect();
    for (i, s) in sessions.iter_mut().enumerate() {
        s.call("write", json!({"file_path": "/workspace/id.txt", "content": format!("session {i}\n")}));
        s.bash(&format!("sleep 60 & echo $! > /tmp/bg; echo marker-{i} > /dev/shm/m"));
    }
    // Host pids of every session's background job: what one session would need to signal another's.
    // A background job is forked before `echo $!` returns but may not have exec'd `sleep` yet.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut host_pids = host_pids_of("sleep 60");
    while host_pids.len() < n && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        host_pids = host_pids_of("sleep 60");
    }
    assert!(host_pids.len() >= n, "{host_pids:?}");
    let targets = host_pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ");
    for (i, s) in sessions.iter_mut().enumerate() {
        assert_eq!(s.call("read", json!({"file_path": "/workspace/id.txt"})), (format!("session {i}\n"), false));
        assert_eq!(s.bash("ls /dev/shm; cat /dev/shm/m"), format!("m\nmarker-{i}"));
        // Its own processes only: init, the thread's lane, helper, shell, its one background
        // sleep, ps and wc.
        let procs = s.bash("ps -e --no-headers | wc -l");
        assert!(procs.trim().parse::<u32>().unwrap() <= 7, "session {i} sees {procs} processes");
        let r = s.bash(&format!("n=0; for p in {targets}; do kill -0 $p 2>/dev/null && n=$((n+1)); done; echo $n"));
        assert_eq!(r, "0", "session {i} reached another session's process");
    }
    for s in sessions {
        assert_eq!(s.end(), 0);
    }
}

fn host_pids_of(cmdline: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            (String::from_utf8_lossy(&c).replace('\0', " ").trim() == cmdline).then_some(pid)
        })
        .collect()
}

#[test]
fn ending_the_session_leaves_workspace_and_outputs_and_nothing_else() {
    if needs_root() {
        return;
    }
    let ws = TempDir::new("sess-ws").owned_by_jail_user();
    let out = TempDir::new("sess-out").owned_by_jail_user();
    let marker = format!("sleep 7.{}", std::process::id());
    let (_p, p) = policy_for_host_dirs("default", "");
    let mut s = Sess::start(&[
        "--policy",
        p.to_str().unwrap(),
        "--workspace",
        ws.path().to_str().unwrap(),
        "--outputs",
        out.path().to_str().unwrap(),
    ]);
    s.bash(&format!("echo kept > /workspace/w; echo result > /mnt/session/outputs/r; ({marker} &)"));
    let init = s.child.id();
    assert_eq!(s.end(), 0);
    assert_eq!(std::fs::read_to_string(ws.path().join("w")).unwrap(), "kept\n");
    assert_eq!(std::fs::read_to_string(out.path().join("r")).unwrap(), "result\n");
    std::thread::sleep(Duration::from_millis(100));
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.trim() == marker)
        .collect();
    assert!(procs.is_empty(), "{procs:?}");
    let _ = init;
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let kids = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for k in kids.split_whitespace().filter_map(|k| k.parse().ok()) {
            out.push(k);
            stack.push(k);
        }
    }
    out
}

#[test]
fn no_jailed_process_carries_the_supervisors_secrets_in_proc_environ() {
    // Reading other processes' environ from the host needs root.
    if needs_root() {
        return;
    }
    let mut s = Sess::start(&[]);
    s.call("read", json!({"file_path": "/etc/hostname"})); // starts the helper
    s.bash("true"); // starts the shell
    let jailed = descendants(s.child.id());
    assert!(jailed.len() >= 3, "init, helper and shell: {jailed:?}");
    for pid in jailed {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        assert!(!env.contains("planted"), "pid {pid} holds a secret in its environ");
    }
    assert_eq!(s.end(), 0);
}

/// A session started from an operator's terminal (stdin and stdout are the caller's pipes, stderr
/// and the controlling terminal a real pty): nothing in the jail can open that terminal, take its
/// foreground, or read the line the operator has typed but nobody has read yet.
#[test]
fn a_session_cannot_reach_the_operators_terminal() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave_fd = pty.slave.as_raw_fd();
    let mut cmd = Command::new(STOCKADE);
    cmd.arg("session").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    // SAFETY: setsid and ioctl are async-signal-safe; the slave descriptor stays open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let stdin = child.stdin.take();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut s = Sess { child, stdin, stdout, n: 0 };
    // The operator types a line; it waits in the terminal's input queue.
    nix::unistd::write(&pty.master, b"operator-typed-password-hunter2\n").unwrap();

    let probe = "( : <>/dev/tty ) 2>/dev/null && echo OPENED || echo REFUSED; \
                 tty=$(readlink /proc/$$/fd/2); echo \"stderr=$tty\"; \
                 timeout 2 cat /proc/1/fd/2 2>/dev/null; echo \"init-stderr=$?\"";
    let (out, _) = s.call("bash", json!({"command": probe}));
    assert!(out.contains("REFUSED"), "the jail opened the operator's terminal: {out}");
    assert!(!out.contains("/dev/pts"), "bash holds a terminal: {out}");
    assert!(!out.contains("hunter2"), "the operator's input reached the jail: {out}");
    // The file-tool helper is a fork of the jail's init: its stderr must not be the terminal.
    let (out, _) = s.call("read", json!({"file_path": "/dev/stderr"}));
    assert!(!out.contains("hunter2"), "the file tools read the operator's terminal: {out}");
    // The line is still there for the operator.
    nix::fcntl::fcntl(&pty.slave, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
    let mut buf = [0u8; 64];
    let n = nix::unistd::read(&pty.slave, &mut buf).unwrap_or(0);
    assert_eq!(&buf[..n], b"operator-typed-password-hunter2\n");
    assert_eq!(s.bash("echo still-here"), "still-here");
    assert_eq!(s.end(), 0);
}

/// A request line over the limit is answered with an error result carrying its id, without the
/// line ever being held whole, and the session goes on.
#[test]
fn an_oversized_request_gets_an_error_and_the_session_goes_on() {
    let mut s = Sess::start(&["--max-request-bytes", "1MiB"]);
    let pad = "y".repeat(40 << 20);
    let line = format!(
        "{{\"id\": \"huge\", \"name\": \"write\", \"input\": {{\"file_path\": \"/tmp/x\", \"content\": \"{pad}\"}}}}"
    );
    let v = s.raw(&line);
    assert_eq!(v["id"], "huge");
    assert_eq!(v["is_error"], true);
    let content = &text_of(&v["content"]);
    assert!(content.starts_with(&format!("request too large: {} bytes; limit 1048576", line.len())), "{content}");
    assert_eq!(s.bash("echo alive"), "alive");
    let peak: u64 = peak_rss_kib(s.child.id());
    assert!(peak < 32 * 1024, "the session process peaked at {peak} KiB for a 40 MiB line");
    assert_eq!(s.end(), 0);
}

/// The jail's init is a copy of the host-side `stockade session`: its command line (binary path,
/// policy, workspace) must not be readable inside.
#[test]
fn no_host_command_line_is_visible_in_the_jail() {
    let ws = TempDir::new("cmdline").owned_by_jail_user();
    let (_p, p) = policy_for_host_dirs("default", "");
    let mut s = Sess::start(&["--policy", p.to_str().unwrap(), "--workspace", ws.path().to_str().unwrap()]);
    let out = s.bash("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done");
    assert!(!out.contains(ws.path().to_str().unwrap()) && !out.contains("--policy"), "{out}");
    assert!(out.lines().any(|l| l.trim() == "stockade-init"), "{out}");
    assert_eq!(s.end(), 0);
}

/// Every session is charged to a host uid of its own, never to root's (the user namespace is
/// created under that uid): one session exhausting its inotify instances leaves another
/// session's and host root's untouched.
#[test]
fn per_user_kernel_counts_are_a_sessions_own() {
    if needs_root() {
        return;
    }
    let max: usize =
        std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances").unwrap().trim().parse().unwrap();
    let mut a = Sess::start(&[]);
    let mut b = Sess::start(&[]);
    let host_uid = |s: &Sess| {
        let init = s.child.id();
        // The session's init is a child of `stockade session`; its status shows the host uids.
        let kids = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap_or_default();
        let pid = kids.split_whitespace().next().unwrap_or_else(|| panic!("no jail under {init}")).to_owned();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find(|l| l.starts_with("Uid:")).unwrap().split_whitespace().nth(2).unwrap().to_owned()
    };
    a.bash("true");
    b.bash("true");
    let (ua, ub) = (host_uid(&a), host_uid(&b));
    assert_ne!(ua, ub, "two sessions, two host uids");
    assert_ne!(ua, "0");
    // Session A takes every inotify instance it can and keeps them (a background holder).
    let grab = "python3 -c 'import ctypes, os, time\nlibc = ctypes.CDLL(None)\nn = 0\nwhile libc.inotify_init() >= 0: n += 1\nprint(n, flush=True)\nos.close(1)\ntime.sleep(60)' > /tmp/n & sleep 1; cat /tmp/n";
    let got_a: usize = a.bash(grab).trim().parse().unwrap();
    assert!(got_a + 8 >= max, "session A got {got_a} of {max}");
    let got_b: usize = b.bash(grab).trim().parse().unwrap();
    assert!(got_b + 8 >= max, "session B got only {got_b} of {max} while A holds {got_a}");
    // Host root can still make instances.
    // SAFETY: inotify_init1 and close on descriptors this test owns.
    let fds: Vec<i32> = (0..4).map(|_| unsafe { libc::inotify_init1(libc::IN_CLOEXEC) }).collect();
    assert!(fds.iter().all(|f| *f >= 0), "host root starved: {fds:?}");
    for f in fds {
        // SAFETY: see above.
        unsafe { libc::close(f) };
    }
    assert_eq!(a.end(), 0);
    assert_eq!(b.end(), 0);
}

fn trail_records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The trail records every program the jail runs — bash's short-lived children too — with its
/// argv and the tool call it belongs to, and secrets in tool inputs never reach it.
#[test]
fn the_trail_records_each_exec_with_its_argv_and_redacts_secrets() {
    let dir = TempDir::new("trail");
    let path = dir.path().join("trail.jsonl");
    let mut s = Sess::start(&["--trail", path.to_str().unwrap()]);
    s.bash("sh -c '/bin/true'");
    let (out, _) = s.call(
        "bash",
        json!({"command": "echo 'ghp_abcdefghijklmnopqrstuvwxyz0123456789' | wc -c; curl_token=x TOKEN=hunter22 true"}),
    );
    assert_eq!(out, "41");
    // A program started in the background of one call and exec'ing later is still recorded.
    s.bash("(sleep 0.2; exec /bin/echo late) >/dev/null 2>&1 &");
    std::thread::sleep(Duration::from_millis(600));
    s.call("read", json!({"file_path": "/etc/hostname"}));
    // A path the supervisor cannot read is refused (EFAULT, as the kernel would) and recorded.
    let out = s.bash(
        "python3 -c 'import ctypes; l = ctypes.CDLL(None, use_errno=True); \
         print(l.execve(ctypes.c_void_p(16), None, None), ctypes.get_errno())'",
    );
    assert_eq!(out, "-1 14");
    assert_eq!(s.end(), 0);

    let recs = trail_records(&path);
    assert!(
        recs.iter().any(|r| r["event"] == "exec" && r["path"] == "" && r["tool_use_id"] == "c5"),
        "the unreadable exec is recorded: {recs:#?}"
    );
    let execs: Vec<&Value> = recs.iter().filter(|r| r["event"] == "exec").collect();
    let sh = execs
        .iter()
        .find(|r| r["argv"] == json!(["sh", "-c", "/bin/true"]))
        .unwrap_or_else(|| panic!("no exec of sh -c /bin/true in {execs:#?}"));
    assert_eq!(sh["tool_use_id"], "c1");
    assert_eq!(sh["cwd"], "/workspace");
    assert!(sh["pid"].as_i64().unwrap() > 1 && sh["host_pid"].as_u64().unwrap() > 1);
    let child = execs.iter().find(|r| r["argv"] == json!(["/bin/true"])).expect("sh's own child");
    assert_eq!(child["tool_use_id"], "c1");
    assert!(execs.iter().any(|r| r["argv"] == json!(["wc", "-c"]) && r["tool_use_id"] == "c2"));
    assert!(execs.iter().any(|r| r["argv"] == json!(["/bin/echo", "late"])), "{execs:#?}");

    let calls: Vec<&Value> = recs.iter().filter(|r| r["event"] == "tool_call").collect();
    assert_eq!(calls.len(), 5, "{calls:#?}");
    assert_eq!(calls[0]["name"], "bash");
    assert_eq!(calls[0]["input"]["command"], "sh -c '/bin/true'");
    // Each call is recorded before it runs: its programs come after it.
    let at = |r: &Value| recs.iter().position(|x| x == r).unwrap();
    assert!(at(calls[0]) < at(sh));
    let results: Vec<&Value> = recs.iter().filter(|r| r["event"] == "tool_result").collect();
    assert_eq!(results.len(), 5);
    assert_eq!(
        (&results[3]["tool_use_id"], &results[3]["output_bytes"], &results[3]["is_error"]),
        (&json!("c4"), &json!(9), &json!(false))
    );
    assert!(results[0]["duration_ms"].as_f64().unwrap() > 0.0);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("ghp_abcdefghijklmnopqrstuvwxyz0123456789"), "{text}");
    assert!(!text.contains("hunter22"), "{text}");
    assert!(calls[1]["input"]["command"].as_str().unwrap().contains("[REDACTED]"));
}

/// With `on_full = "fail"`, a full trail stops programs from starting and tool calls from running:
/// nothing happens that the trail cannot hold.
#[test]
fn a_full_trail_fails_closed_when_the_policy_says_so() {
    let dir = TempDir::new("trail-full");
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "extends = \"default\"\n[trail]\nmax_size = \"64K\"\non_full = \"fail\"\n").unwrap();
    let path = dir.path().join("trail.jsonl");
    let mut s = Sess::start(&["--policy", policy.to_str().unwrap(), "--trail", path.to_str().unwrap()]);
    // Each exec is a record: a loop of them fills 64K, and then exec fails.
    let out = s
        .call(
            "bash",
            json!({"command": "for i in $(seq 1 2000); do /bin/true || { echo refused at $i; break; }; done"}),
        )
        .0;
    // stdout first, then stderr (the command succeeded).
    assert!(out.starts_with("refused at ") && out.ends_with("/bin/true: Operation not permitted"), "{out}");
    let (out, is_error) = s.call("bash", json!({"command": "echo hi"}));
    assert!(is_error && out.contains("audit trail is full"), "{out}");
    assert_eq!(s.end(), 0);
    let recs = trail_records(&path);
    assert_eq!(recs.last().unwrap()["event"], "truncated");
    assert!(std::fs::metadata(&path).unwrap().len() <= 64 * 1024 + 256);
}

/// `trail.max_rate` holds a flood of execs to its rate: every exec is recorded, none is lost, and
/// the jail waits for its records instead (in no second does the trail take much more than the
/// rate and one second's burst).
#[test]
fn an_exec_flood_is_held_to_the_trail_rate_and_fully_recorded() {
    let dir = TempDir::new("trail-rate");
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "extends = \"default\"\n[trail]\nmax_rate = \"16K\"\n").unwrap();
    let path = dir.path().join("trail.jsonl");
    let mut s = Sess::start(&["--policy", policy.to_str().unwrap(), "--trail", path.to_str().unwrap()]);
    let long = "x".repeat(1000);
    s.bash(&format!("for i in $(seq 1 40); do /bin/true flood-$i {long}; done"));
    assert_eq!(s.end(), 0);
    let text = std::fs::read_to_string(&path).unwrap();
    let recs: Vec<(f64, usize, Value)> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let ts = v["ts"].as_str().unwrap();
            // Seconds within the day are enough: the test runs for seconds.
            let hms: Vec<f64> = ts[11..23].split(':').map(|x| x.parse().unwrap()).collect();
            (hms[0] * 3600.0 + hms[1] * 60.0 + hms[2], l.len() + 1, v)
        })
        .collect();
    let floods = recs
        .iter()
        .filter(|(_, _, v)| v["event"] == "exec" && v["argv"][1].as_str().is_some_and(|a| a.starts_with("flood-")))
        .count();
    assert_eq!(floods, 40, "every exec is recorded");
    let total: usize = recs.iter().map(|r| r.1).sum();
    assert!(total > 3 * (16 << 10), "the flood ({total} bytes) is too small to show the rate");
    for (t, _, _) in &recs {
        let window: usize = recs.iter().filter(|(u, _, _)| *u >= *t && *u < t + 1.0).map(|r| r.1).sum();
        assert!(window <= 2 * (16 << 10) + 4096, "{window} bytes within a second from {t}");
    }
}

/// A directory named like a secret (`token=x`) does not hide where a program ran from: the trail
/// keeps the path's structure and the cwd's, and redacts the value alone.
#[test]
fn a_secret_looking_directory_keeps_its_structure_in_the_trail() {
    let dir = TempDir::new("trail-redact");
    let path = dir.path().join("trail.jsonl");
    let mut s = Sess::start(&["--trail", path.to_str().unwrap()]);
    s.bash(
        "mkdir -p '/tmp/token=x' && cp /bin/true '/tmp/token=x/evil' && cd '/tmp/token=x' && ./evil && /bin/echo ran",
    );
    assert_eq!(s.end(), 0);
    let recs = trail_records(&path);
    let evil = recs
        .iter()
        .find(|r| r["event"] == "exec" && r["argv"] == json!(["./evil"]))
        .unwrap_or_else(|| panic!("no exec of ./evil in {recs:#?}"));
    assert_eq!(evil["path"], "./evil");
    assert!(
        recs.iter()
            .any(|r| r["event"] == "exec" && r["argv"] == json!(["cp", "/bin/true", "/tmp/token=[REDACTED]/evil"])),
        "{recs:#?}"
    );
    let echo = recs.iter().find(|r| r["event"] == "exec" && r["argv"] == json!(["/bin/echo", "ran"])).unwrap();
    assert_eq!(echo["cwd"], "/tmp/token=[REDACTED]");
}

/// An exec record names the file the kernel runs, not only the caller's words: its device and
/// inode, and for an exec of a descriptor (a memfd) what the descriptor was. A script runs its
/// interpreter, which is no difference to record.
#[test]
fn exec_records_name_the_file_and_an_fd_exec_says_what_the_fd_was() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("trail-identity");
    let path = dir.path().join("trail.jsonl");
    let mut s = Sess::start(&["--trail", path.to_str().unwrap()]);
    s.bash("/usr/bin/true");
    let out = s.bash(
        "python3 -c \"import os; fd = os.memfd_create('payload'); os.write(fd, open('/usr/bin/echo','rb').read()); \
         os.execve(fd, ['echo', 'from-memfd'], {})\"",
    );
    assert_eq!(out, "from-memfd");
    s.bash("printf '#!/bin/sh\\necho scripted\\n' > /tmp/s.sh; chmod +x /tmp/s.sh; /tmp/s.sh");
    assert_eq!(s.end(), 0);
    let recs = trail_records(&path);
    let host = std::fs::metadata("/usr/bin/true").unwrap();
    let t = recs.iter().find(|r| r["event"] == "exec" && r["argv"] == json!(["/usr/bin/true"])).unwrap();
    assert_eq!((t["dev"].as_u64(), t["ino"].as_u64()), (Some(host.dev()), Some(host.ino())), "{t}");
    let m = recs
        .iter()
        .find(|r| r["event"] == "exec" && r["argv"] == json!(["echo", "from-memfd"]))
        .unwrap_or_else(|| panic!("no memfd exec in {recs:#?}"));
    assert_eq!(m["path"], "");
    assert!(m["fd"].as_str().unwrap().starts_with("/memfd:payload"), "{m}");
    assert!(m["ino"].as_u64().is_some(), "{m}");
    assert!(!recs.iter().any(|r| r["event"] == "exec_differs"), "{recs:#?}");
}

/// The attack on exec records: a path swapped between the supervisor's look and the kernel's.
/// The record names the file that was there when it looked; the program the process then runs is
/// compared with it, and each difference is a record of its own.
#[test]
fn an_exec_swapped_under_the_record_is_recorded_as_differing() {
    let dir = TempDir::new("trail-race");
    let path = dir.path().join("trail.jsonl");
    let mut s = Sess::start(&["--trail", path.to_str().unwrap()]);
    let out = s.bash(
        "cd /tmp; cp /bin/sleep a; cp /bin/sleep b; \
         python3 -c 'import os\nwhile True:\n  os.rename(\"a\",\"t\"); os.rename(\"b\",\"a\"); os.rename(\"t\",\"b\")' & \
         sleep 0.3; for i in $(seq 1 200); do ./a 0.02 2>/dev/null; done; kill %1; echo done",
    );
    assert_eq!(out, "done");
    assert_eq!(s.end(), 0);
    let recs = trail_records(&path);
    let differs: Vec<&Value> = recs.iter().filter(|r| r["event"] == "exec_differs").collect();
    assert!(!differs.is_empty(), "200 racing execs and not one seen to differ");
    for d in &differs {
        assert_ne!(d["recorded"]["ino"], d["runs"]["ino"], "{d}");
        assert!(d["runs"]["exe"].as_str().unwrap().starts_with("/tmp/"), "{d}");
    }
}

/// The supervisor looks up an exec's file as the jail's kernel would: an absolute symlink the
/// jail planted resolves inside the jail, never to the host file of that name (which the
/// privileged supervisor would otherwise stat and open).
#[test]
fn an_exec_record_never_follows_a_planted_link_out_of_the_jail() {
    let dir = TempDir::new("trail-link");
    let host_only = dir.path().join("host-only.sh");
    std::fs::write(&host_only, "#!/bin/sh\necho host\n").unwrap();
    let path = dir.path().join("trail.jsonl");
    let mut s = Sess::start(&["--trail", path.to_str().unwrap()]);
    s.bash(&format!("ln -s {} /tmp/l; /tmp/l; true", host_only.display()));
    assert_eq!(s.end(), 0);
    let recs = trail_records(&path);
    let l = recs
        .iter()
        .find(|r| r["event"] == "exec" && r["path"] == "/tmp/l")
        .unwrap_or_else(|| panic!("no exec of /tmp/l in {recs:#?}"));
    // Not in the jail: no identity, where the host file's would have been recorded.
    assert!(l.get("ino").is_none(), "the host file behind the link was looked up: {l}");
}

impl Sess {
    fn send(&mut self, v: Value) {
        let w = self.stdin.as_mut().unwrap();
        writeln!(w, "{v}").unwrap();
        w.flush().unwrap();
    }

    fn answer(&mut self) -> Value {
        let mut out = String::new();
        self.stdout.read_line(&mut out).unwrap();
        assert!(!out.is_empty(), "session ended unexpectedly");
        serde_json::from_str(&out).unwrap()
    }
}

/// Calls of different session threads run at the same time, each thread in its own shell: a
/// call that waits for another thread's call finishes only because that one ran meanwhile, and
/// its result comes after it. A call of the same thread waits its turn.
#[test]
fn calls_of_different_threads_overlap_and_one_thread_runs_in_order() {
    let mut s = Sess::start(&[]);
    let wait_for = |f: &str| format!("until [ -e /workspace/{f} ]; do sleep 0.02; done; echo saw {f}");
    s.send(json!({"id": "a1", "name": "bash", "thread": "sub", "input": {"command": format!("cd /tmp; {}", wait_for("flag"))}}));
    // The same thread's next call runs after a1, in a1's shell (its directory).
    s.send(json!({"id": "a2", "name": "bash", "thread": "sub", "input": {"command": "pwd"}}));
    s.send(json!({"id": "p1", "name": "write", "input": {"file_path": "/workspace/flag", "content": "x"}}));
    let order: Vec<Value> = (0..3).map(|_| s.answer()).collect();
    let ids: Vec<&str> = order.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["p1", "a1", "a2"], "{order:?}");
    assert_eq!(text_of(&order[1]["content"]), "saw flag");
    assert_eq!(text_of(&order[2]["content"]), "/tmp");
    // The primary thread's shell is another one.
    assert_eq!(s.bash("pwd"), "/workspace");
    assert_eq!(s.end(), 0);
}

/// A stop ends a running call at once with the official runner's text, kills what it started
/// (its background jobs included) and leaves its thread's shell gone until a restart, as the
/// runner's; the other threads' calls and processes are untouched.
#[test]
fn a_stopped_call_ends_at_once_and_takes_only_its_own_processes() {
    let mut s = Sess::start(&[]);
    // Another thread's background job, which must live through the stop.
    s.send(json!({"id": "k", "name": "bash", "thread": "keep", "input": {"command": "sleep 300 & echo started"}}));
    assert_eq!(text_of(&s.answer()["content"]), "started");
    s.send(json!({"id": "x", "name": "bash", "thread": "sub", "input": {"command": "(setsid sleep 301 &); echo go > /workspace/go; sleep 302"}}));
    let t0 = Instant::now();
    assert_eq!(s.bash("until [ -e /workspace/go ]; do sleep 0.02; done; echo ok"), "ok");
    // A stop for a call that is not running changes nothing.
    s.send(json!({"stop": "no-such-call"}));
    s.send(json!({"stop": "x"}));
    let v = s.answer();
    assert_eq!(v["id"], "x");
    assert_eq!(v["is_error"], true);
    assert_eq!(text_of(&v["content"]), "tool 'bash' was stopped, and may have already done some or all of its work");
    assert!(t0.elapsed() < Duration::from_secs(60), "the stop did not end the call");
    // The stopped call's processes are gone, orphans included; the other thread's job lives.
    let ps = s.bash("ps -eo args");
    assert!(!ps.lines().any(|l| l == "sleep 301" || l == "sleep 302"), "{ps}");
    assert!(ps.lines().any(|l| l == "sleep 300"), "{ps}");
    s.send(json!({"id": "y", "name": "bash", "thread": "sub", "input": {"command": "echo again"}}));
    let v = s.answer();
    assert!(text_of(&v["content"]).contains("This command did not run, because the shell is gone"), "{v}");
    s.send(json!({"id": "z", "name": "bash", "thread": "sub", "input": {"restart": true, "command": "echo again"}}));
    assert_eq!(text_of(&s.answer()["content"]), "again");
    assert_eq!(s.end(), 0);
}

/// While calls of two threads run, what the jail runs is put down to both: `tool_use_id` names
/// no single call, `tool_use_ids` lists the two.
#[test]
fn the_trail_names_every_call_that_could_have_run_a_program() {
    let dir = TempDir::new("trail-overlap");
    let path = dir.path().join("trail.jsonl");
    let mut s = Sess::start(&["--trail", path.to_str().unwrap()]);
    s.send(json!({"id": "a", "name": "bash", "thread": "sub", "input": {"command": "until [ -e /workspace/f ]; do sleep 0.02; done; /bin/true overlap-a"}}));
    s.send(json!({"id": "b", "name": "bash", "input": {"command": "/bin/true alone-b; touch /workspace/f"}}));
    let ids: Vec<Value> = (0..2).map(|_| s.answer()["id"].clone()).collect();
    assert_eq!(ids, [json!("b"), json!("a")]);
    s.bash("/bin/true alone-c");
    assert_eq!(s.end(), 0);
    let recs = trail_records(&path);
    let exec = |arg: &str| {
        recs.iter()
            .find(|r| r["event"] == "exec" && r["argv"].as_array().is_some_and(|a| a.iter().any(|x| x == arg)))
            .unwrap_or_else(|| panic!("no exec of {arg}: {recs:?}"))
            .clone()
    };
    let b = exec("alone-b");
    assert_eq!(b["tool_use_id"], Value::Null, "{b}");
    let mut both: Vec<String> =
        b["tool_use_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    both.sort();
    assert_eq!(both, ["a", "b"]);
    let c = exec("alone-c");
    assert_eq!(c["tool_use_ids"], Value::Null, "{c}");
    assert_ne!(c["tool_use_id"], Value::Null, "{c}");
}

/// The open-file limit a worker hands its session process is taken whole or refused: one that
/// does not parse must not leave the jails with the worker's raised limit.
#[test]
fn a_session_process_refuses_an_open_file_limit_it_cannot_read() {
    let o = Command::new(STOCKADE)
        .args(["session", "--worker-pid", &std::process::id().to_string(), "--nofile", "1024"])
        .args(["--policy", "default", "--workspace", "/tmp"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--nofile 1024: expected SOFT:HARD"), "{o:?}");
}
