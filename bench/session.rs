//! Per-call tool latency in a session jail against the same session server running unconfined,
//! and against a bare in-process call, in one run; plus a session's idle memory.
//!
//!     cargo bench --bench session            (as root: the jail maps ids and uses cgroups)
//!
//! "jailed" is `Session` (the `stockade session` path); "unjailed" is the identical server
//! (`session::server::serve`) forked from this process without namespaces, landlock or
//! seccomp, over the same channel and framing, so the ratio isolates what the jail costs.

use serde_json::{json, Value};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stockade::jail::JailSpec;
use stockade::session::{server, Channel, Session};
use stockade::tools::bash::{KillScope, Shell};
use stockade::tools::{run_file_tool, Ctx};

fn fixture() -> PathBuf {
    let root = std::env::temp_dir().join(format!("stockade-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("tree")).unwrap();
    let line = "the quick brown fox jumps over the lazy dog 0123456789\n";
    std::fs::write(root.join("file4k.txt"), &line.repeat(4096 / line.len() + 1).as_bytes()[..4096]).unwrap();
    // ~10 MB of text in 500 files, a few lines of which match.
    for i in 0..500 {
        let mut s = line.repeat(20_000 / line.len());
        if i % 50 == 0 {
            s.push_str(&format!("needle{i}\n"));
        }
        let dir = root.join("tree").join(format!("d{}", i % 20));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}.txt")), s).unwrap();
    }
    if nix::unistd::geteuid().is_root() {
        // The jail user (host uid 101000) owns the workspace, as a worker-created one would be.
        let _ = std::process::Command::new("chown").args(["-R", "101000:101000"]).arg(&root).status();
    }
    root
}

struct Stats {
    median: Duration,
    p90: Duration,
}

fn measure(n: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..n.min(20) {
        f();
    }
    stats(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let n = v.len();
    Stats { median: v[n / 2], p90: v[n * 9 / 10] }
}

fn ops(ws: &Path) -> Vec<(&'static str, usize, Value)> {
    let w = ws.display();
    vec![
        ("read 4 KiB", 500, json!({"file_path": format!("{w}/file4k.txt")})),
        // Each side its own file: one written by the unjailed (root) server is not the jail user's.
        (
            "write 4 KiB",
            500,
            json!({"file_path": format!("{w}/out-{}.txt", ws == Path::new("/workspace")), "content": "x".repeat(4096)}),
        ),
        ("grep 10 MB tree", 20, json!({"pattern": "needle\\d+", "path": format!("{w}/tree")})),
        ("bash true", 300, json!({"command": "true"})),
    ]
}

fn name_of(op: &str) -> &'static str {
    match op.split(' ').next().unwrap() {
        "read" => "read",
        "write" => "write",
        "grep" => "grep",
        _ => "bash",
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).replace('\0', " ")
}

fn main() {
    let ws = fixture();
    let env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), ws.display().to_string()),
        ("LANG".into(), "C.UTF-8".into()),
    ];

    // In-process: the tool functions called directly.
    let ctx = Ctx::new(ws.clone(), false);
    let mut shell = Shell::new(ws.clone(), env.clone(), KillScope::ProcessGroup);
    let mut inproc = Vec::new();
    for (op, n, input) in ops(&ws) {
        inproc.push(if name_of(op) == "bash" {
            measure(n, || assert!(!shell.call(&input).is_error))
        } else {
            measure(n, || assert!(!run_file_tool(&ctx, name_of(op), &input).is_error))
        });
    }
    drop(shell);

    // Unjailed: the session server, forked without any confinement.
    let (ours, theirs) = UnixStream::pair().unwrap();
    // SAFETY: the benchmark is single-threaded; the child runs the server loop and exits.
    let server_pid = match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(ours);
            let code = server::serve(&theirs.into(), &env, &ctx, KillScope::ProcessGroup);
            std::process::exit(code)
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(theirs);
    let mut chan = Channel::new(ours);

    // Jailed: a real session jail, default policy, the fixture as /workspace (a directory on the
    // machine's disk, so without the workspace size limit no such directory could hold).
    let (mut policy, _) = stockade::policy::load_builtin("default").unwrap();
    policy.limits.workspace_size = None;
    let spec = JailSpec {
        policy,
        workspace: Some(ws.clone()),
        outputs: None,
        argv: vec![],
        env: vec![],
        timeout: None,
        sweep_stale: true,
        watcher: None,
        observe: false,
        tty: None,
        id_mapped: Vec::new(),
    };
    let t = Instant::now();
    let mut session = Session::start(&spec).unwrap();
    let start_time = t.elapsed();

    // Calls alternate between the two servers, so that disk and scheduler noise falls on both.
    let jail_ops = ops(Path::new("/workspace"));
    let mut unjailed = Vec::new();
    let mut jailed = Vec::new();
    for ((op, n, input), (_, _, jinput)) in ops(&ws).into_iter().zip(jail_ops.iter()) {
        let name = name_of(op);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..n + 20 {
            let t = Instant::now();
            assert!(!chan.call("b", name, &input).unwrap().is_error);
            let ua = t.elapsed();
            let t = Instant::now();
            let r = session.call("b", name, jinput).unwrap();
            let ub = t.elapsed();
            assert!(!r.is_error, "{}", r.text_content());
            if i >= 20 {
                a.push(ua);
                b.push(ub);
            }
        }
        unjailed.push(stats(a));
        jailed.push(stats(b));
    }
    drop(chan);
    let _ = nix::sys::wait::waitpid(server_pid, None);

    // Idle memory: PID 1 of the jail, the primary thread's lane, its shell and its file-tool
    // helper (the lane's children).
    std::thread::sleep(Duration::from_millis(200));
    let init = session.pid() as u32;
    let mut bash = 0;
    let mut helper = 0;
    let mut lane = 0;
    for l in children(init) {
        lane += rss_kib(l);
        for c in children(l) {
            if cmdline(c).contains("bash") {
                bash = rss_kib(c);
            } else {
                helper = rss_kib(c);
            }
        }
    }
    let init_rss = rss_kib(init);
    session.end().unwrap();

    println!("session start (jail build + server ready): {:.2} ms\n", start_time.as_secs_f64() * 1e3);
    println!(
        "{:<18} {:>12} {:>12} {:>12} {:>10} {:>12}",
        "per call (median)", "in-process", "unjailed", "jailed", "jail/unj.", "jailed p90"
    );
    for (i, (op, _, _)) in ops(&ws).iter().enumerate() {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{:<18} {:>10.1}µs {:>10.1}µs {:>10.1}µs {:>9.2}x {:>10.1}µs",
            op,
            us(inproc[i].median),
            us(unjailed[i].median),
            us(jailed[i].median),
            us(jailed[i].median) / us(unjailed[i].median),
            us(jailed[i].p90)
        );
    }
    let bash_over = jailed[3].median.as_secs_f64() * 1e3 - unjailed[3].median.as_secs_f64() * 1e3;
    println!("\nbash true: jailed minus unjailed = {bash_over:.3} ms (goal <= 1 ms)");
    println!(
        "idle memory (VmRSS): init {} KiB + lane {} KiB + bash {} KiB = {:.1} MiB (goal <= 20 MiB); file-tool helper {} KiB",
        init_rss,
        lane,
        bash,
        (init_rss + lane + bash) as f64 / 1024.0,
        helper
    );
    let _ = std::fs::remove_dir_all(&ws);
}
