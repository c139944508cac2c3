//! Worker benchmark against the local control plane: session creation → first tool result latency, tool
//! calls per second with N concurrent sessions, and per-session overhead of the worker (RSS,
//! fds) and of each session's supervising process.
//!
//! `cargo bench --bench worker` (root: sessions build real jails). Figures go to stdout.

use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stockade::control_plane::local::{CreateSession, LocalConfig, LocalControlPlane, ScriptStep, DEFAULT_ENVIRONMENT};
use stockade::control_plane::wire::WorkState;
use stockade::util::parse_rfc3339;

const STOCKADE: &str = env!("CARGO_BIN_EXE_stockade");

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn children_with(needle: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).replace('\0', " ").contains(needle) {
                v.push(pid);
            }
        }
    }
    v
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cp = LocalControlPlane::new(LocalConfig::default()).unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(cp.clone().serve(listener, std::future::pending()));
    let dir = std::env::temp_dir().join(format!("stockade-bench-worker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    cp.write_keys(&dir).unwrap();
    let state = dir.join("state");
    let cgroups_before = stockade_cgroups();
    let mut worker = Command::new(STOCKADE)
        .args(["worker", "--environment-id", DEFAULT_ENVIRONMENT, "--api-url", &url, "--max-sessions", "32"])
        // The bench measures throughput, not disk: its sessions write little.
        .args(["--image-overcommit", "1000"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--environment-key-file")
        .arg(dir.join(format!("{DEFAULT_ENVIRONMENT}.key")))
        .args(["--max-idle", "100ms"])
        .env_remove("ANTHROPIC_API_KEY")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let wpid = worker.id();
    std::thread::sleep(Duration::from_millis(500));
    let (idle_rss, idle_fds) = (status_kib(wpid, "VmRSS:"), fds(wpid));

    let create = |steps: Vec<ScriptStep>| {
        cp.create_session(CreateSession {
            environment_id: DEFAULT_ENVIRONMENT.into(),
            script: steps,
            metadata: Default::default(),
            skills: Vec::new(),
            memory_stores: Vec::new(),
            no_secret: false,
        })
        .unwrap()
        .session_id
    };
    let call = ScriptStep::call;

    println!("{:<10} {:>14} {:>14} {:>14} {:>12}", "sessions", "first p50 ms", "first p95 ms", "calls/s", "wall s");
    for n in [1usize, 4, 16] {
        let calls_per = 20;
        let t = Instant::now();
        let ids: Vec<String> = (0..n)
            .map(|i| {
                create(
                    (0..calls_per)
                        .map(|k| match k % 4 {
                            0 => call("bash", json!({"command": format!("echo {i} {k}")})),
                            1 => call("write", json!({"file_path": "/workspace/f.txt", "content": "x\n".repeat(100)})),
                            2 => call("read", json!({"file_path": "/workspace/f.txt"})),
                            _ => call("grep", json!({"pattern": "x", "output_mode": "count"})),
                        })
                        .collect(),
                )
            })
            .collect();
        let mut firsts = Vec::new();
        let (mut start, mut end) = (f64::MAX, 0f64);
        for id in &ids {
            let v = loop {
                let v = cp.session_view(id).unwrap();
                if v.calls.len() == calls_per && v.calls.iter().all(|c| c.result.is_some()) {
                    break v;
                }
                assert!(t.elapsed() < Duration::from_secs(300), "bench session did not complete: {v:?}");
                std::thread::sleep(Duration::from_millis(10));
            };
            let ms = |s: &str| {
                parse_rfc3339(s).unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
            };
            let first = &v.calls[0];
            // The first call is issued when the session is created.
            firsts.push(first.latency_ms.unwrap() as f64);
            start = start.min(ms(&first.issued_at));
            end = end.max(ms(v.calls.last().unwrap().answered_at.as_deref().unwrap()));
        }
        let total = (n * calls_per) as f64;
        println!(
            "{n:<10} {:>14.1} {:>14.1} {:>14.0} {:>12.2}",
            percentile(&mut firsts.clone(), 0.5),
            percentile(&mut firsts, 0.95),
            total / ((end - start) / 1000.0),
            t.elapsed().as_secs_f64()
        );
    }

    // Overhead of live sessions: 16 sessions parked in a long call.
    let n = 16;
    let ids: Vec<String> = (0..n).map(|_| create(vec![call("bash", json!({"command": "sleep 5"}))])).collect();
    let t = Instant::now();
    while children_with("--announce").len() < 2 * n && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (busy_rss, busy_fds) = (status_kib(wpid, "VmRSS:"), fds(wpid));
    // The supervisors are the worker's children; the jails' inits share their command line.
    let sup: Vec<u32> =
        children_with("--announce").into_iter().filter(|p| status_kib(*p, "PPid:") == wpid as u64).collect();
    let sup_rss: u64 = sup.iter().map(|p| status_kib(*p, "VmRSS:")).sum();
    println!(
        "worker: idle {idle_rss} KiB / {idle_fds} fds; with {n} live sessions {busy_rss} KiB / {busy_fds} fds \
         => {:.0} KiB and {:.1} fds per session",
        (busy_rss as f64 - idle_rss as f64) / n as f64,
        (busy_fds as f64 - idle_fds as f64) / n as f64
    );
    println!(
        "session supervisor processes: {} x {:.0} KiB RSS (plus the jail: init + bash, see `cargo bench --bench session`)",
        sup.len(),
        sup_rss as f64 / sup.len().max(1) as f64
    );
    for id in &ids {
        while cp.session_view(id).unwrap().work_state != WorkState::Stopped {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Soak: items one after another, the worker's RSS after each hundred. Finished items must not
    // leave state behind, so after warm-up it stays flat: the slope (least squares over the
    // hundreds after the first) is reported, and what is left once the worker is gone.
    // STOCKADE_BENCH_SOAK sets the count.
    let soak: usize = std::env::var("STOCKADE_BENCH_SOAK").ok().and_then(|n| n.parse().ok()).unwrap_or(600);
    let mut line = String::new();
    let mut points: Vec<(f64, f64)> = Vec::new();
    let t = Instant::now();
    for k in 1..=soak {
        let id = create(vec![call("bash", json!({"command": "true"}))]);
        while cp.session_view(&id).unwrap().work_state != WorkState::Stopped {
            std::thread::sleep(Duration::from_millis(2));
        }
        if k % 100 == 0 {
            let rss = status_kib(wpid, "VmRSS:");
            line.push_str(&format!(" {k}:{rss}"));
            if k > 100 {
                points.push((k as f64, rss as f64));
            }
        }
    }
    let took = t.elapsed().as_secs_f64();
    println!(
        "soak: {soak} items in {took:.0} s ({:.1} items/s); worker RSS KiB after each hundred:{line} (idle at start {idle_rss})",
        soak as f64 / took
    );
    println!("soak: RSS slope after the first hundred: {:.1} KiB per 100 items", slope(&points) * 100.0);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(wpid as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = worker.wait();
    // Leftovers: item directories, mounts under the state directory, the worker's processes and
    // cgroups. Each must be none.
    let items = std::fs::read_dir(state.join("items")).map(|r| r.count()).unwrap_or(0);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(state.to_str().unwrap()))
        .count();
    let procs = children_with(state.to_str().unwrap()).len();
    let cgroups = stockade_cgroups().difference(&cgroups_before).count();
    println!("soak: left after the worker's exit: {items} item directories, {mounts} mounts, {procs} processes, {cgroups} cgroups");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    num / den
}

/// Every jail cgroup (`stockade-*`, not the supervisor's leaf) in the host's cgroup hierarchies.
fn stockade_cgroups() -> std::collections::HashSet<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut n = std::collections::HashSet::new();
    for l in mounts.lines() {
        let Some((pre, post)) = l.split_once(" - ") else { continue };
        if !post.starts_with("cgroup") {
            continue;
        }
        let Some(mp) = pre.split(' ').nth(4) else { continue };
        let mut stack = vec![std::path::PathBuf::from(mp)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with("stockade-") && name != "stockade-supervisor" {
                        n.insert(e.path());
                    }
                    if stack.len() < 10_000 {
                        stack.push(e.path());
                    }
                }
            }
        }
    }
    n
}
