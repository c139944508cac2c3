//! Density: sessions started one after another and left live (idle after their turn, held by
//! `--max-idle 1d`), up to `DENSITY_N` (default 2000). At every `DENSITY_STEP` live (default 500):
//! the start latency (session created → its first result) p50/p99 of the sessions started since the
//! last step, the worker's PSS per live session, the kernel's memory per live session (`Slab +
//! PageTables + KernelStack`), the worker's CPU per idle session over 10 s in which nothing
//! happens, and its descriptors. At the end: how long the worker's SIGTERM took and the jail cgroups
//! it left; then a restart on the same state directory — how long until every held item's lease
//! was heartbeated and every jail rebuilt, the leases lost — and its own SIGTERM.
//!
//! `DENSITY_N=2000 cargo bench --bench density` (root; about 4 MiB of memory and a few MiB of disk
//! per live session). Figures go to stdout.

use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stockade::control_plane::local::{CreateSession, LocalConfig, LocalControlPlane, ScriptStep, DEFAULT_ENVIRONMENT};

const STOCKADE: &str = env!("CARGO_BIN_EXE_stockade");

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn meminfo_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

fn kernel_kib() -> u64 {
    meminfo_kib("Slab:") + meminfo_kib("PageTables:") + meminfo_kib("KernelStack:")
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = s.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    rest.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + rest.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn stockade_cgroups() -> usize {
    fn walk(dir: &std::path::Path, depth: usize, n: &mut usize) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name().to_string_lossy().starts_with("stockade-") {
                    *n += 1;
                }
                if depth < 4 {
                    walk(&e.path(), depth + 1, n);
                }
            }
        }
    }
    let mut n = 0;
    walk(std::path::Path::new("/sys/fs/cgroup"), 0, &mut n);
    n
}

/// A worker holding up to `total` sessions at once, idle ones kept, its log in `log`.
fn start_worker(url: &str, dir: &std::path::Path, total: usize, log: &str) -> std::process::Child {
    Command::new(STOCKADE)
        .args(["worker", "--environment-id", DEFAULT_ENVIRONMENT, "--api-url", url])
        .args(["--max-sessions", &(total + 4).to_string(), "--image-overcommit", "100000", "--max-idle", "1d"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--environment-key-file")
        .arg(dir.join(format!("{DEFAULT_ENVIRONMENT}.key")))
        .env_remove("ANTHROPIC_API_KEY")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .spawn()
        .unwrap()
}

/// SIGTERM, timed, and the jail cgroups it left.
fn sigterm(worker: &mut std::process::Child, total: usize, cgroups_before: usize) {
    let t = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = worker.wait().unwrap();
    println!(
        "SIGTERM with {total} live sessions: the worker exited ({status}) after {:.1} s; jail cgroups left: {}",
        t.elapsed().as_secs_f64(),
        stockade_cgroups().saturating_sub(cgroups_before)
    );
}

fn main() {
    let total = env_usize("DENSITY_N", 2000);
    let step = env_usize("DENSITY_STEP", 500).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cp = LocalControlPlane::new(LocalConfig { lease: Duration::from_secs(120), ..LocalConfig::default() }).unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(cp.clone().serve(listener, std::future::pending()));
    let dir = std::env::temp_dir().join(format!("stockade-bench-density-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    cp.write_keys(&dir).unwrap();
    let cgroups_before = stockade_cgroups();
    let mut worker = start_worker(&url, &dir, total, "worker.log");
    let wpid = worker.id();
    std::thread::sleep(Duration::from_secs(1));
    let (k0, w0) = (kernel_kib(), pss_kib(wpid));
    println!(
        "{:>6} {:>12} {:>12} {:>14} {:>16} {:>18} {:>10}",
        "live", "start p50 ms", "start p99 ms", "worker KiB/s.", "kernel KiB/s.", "worker CPU/idle s.", "worker fds"
    );
    let mut starts = Vec::new();
    let mut sessions = Vec::new();
    for n in 1..=total {
        let c = cp
            .create_session(CreateSession {
                environment_id: DEFAULT_ENVIRONMENT.into(),
                script: vec![ScriptStep::call("bash", json!({"command": "echo ready"}))],
                metadata: Default::default(),
                skills: Vec::new(),
                memory_stores: Vec::new(),
                no_secret: false,
            })
            .unwrap();
        sessions.push(c.session_id.clone());
        let t = Instant::now();
        loop {
            let v = cp.session_view(&c.session_id).unwrap();
            if let Some(ms) = v.calls.first().and_then(|c| c.latency_ms) {
                starts.push(ms as f64);
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "session {n} did not start");
            assert!(worker.try_wait().unwrap().is_none(), "the worker exited at {n} live sessions");
            std::thread::sleep(Duration::from_millis(2));
        }
        if n % step == 0 || n == total {
            // Let the last sessions go idle, then nothing happens for 10 s.
            std::thread::sleep(Duration::from_secs(3));
            let c0 = cpu_ticks(wpid);
            std::thread::sleep(Duration::from_secs(10));
            let ticks = cpu_ticks(wpid) - c0;
            let hz = 100.0; // USER_HZ on Linux
            let cpu_share = ticks as f64 / hz / 10.0;
            println!(
                "{:>6} {:>12.0} {:>12.0} {:>14} {:>16} {:>17.4}% {:>10}",
                n,
                percentile(&mut starts.clone(), 0.5),
                percentile(&mut starts, 0.99),
                (pss_kib(wpid).saturating_sub(w0)) / n as u64,
                (kernel_kib().saturating_sub(k0)) / n as u64,
                cpu_share * 100.0 / n as f64,
                fds(wpid)
            );
            starts.clear();
        }
    }
    sigterm(&mut worker, total, cgroups_before);
    // A new worker on the same state directory takes the held items back: their leases first
    // (a heartbeat each), their jails as `--max-jail-builds` allows.
    let restarted_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let t = Instant::now();
    let mut worker = start_worker(&url, &dir, total, "restart.log");
    let (mut beaten_at, mut rebuilt_at) = (None, None);
    while beaten_at.is_none() || rebuilt_at.is_none() {
        assert!(t.elapsed() < Duration::from_secs(900), "the restarted worker did not take every item back");
        assert!(worker.try_wait().unwrap().is_none(), "the restarted worker exited");
        std::thread::sleep(Duration::from_millis(250));
        let beaten = sessions
            .iter()
            .filter(|s| cp.session_view(s).and_then(|v| v.heartbeat_ms).is_some_and(|ms| ms >= restarted_ms))
            .count();
        if beaten_at.is_none() && beaten >= total {
            beaten_at = Some(t.elapsed());
        }
        let log = std::fs::read_to_string(dir.join("restart.log")).unwrap_or_default();
        if rebuilt_at.is_none() && log.matches("session jail ready").count() >= total {
            rebuilt_at = Some(t.elapsed());
        }
    }
    let log = std::fs::read_to_string(dir.join("restart.log")).unwrap_or_default();
    let handed_again = sessions.iter().filter(|s| cp.session_view(s).is_some_and(|v| v.polls > 1)).count();
    println!(
        "restart with {total} held: every lease heartbeated after {:.1} s, every jail rebuilt after {:.1} s; \
         leases lost: {} (items handed out again: {handed_again}); jails that died: {}",
        beaten_at.unwrap().as_secs_f64(),
        rebuilt_at.unwrap().as_secs_f64(),
        log.matches("lease lost").count(),
        log.matches("the session jail died").count(),
    );
    sigterm(&mut worker, total, cgroups_before);
    // The images a stopped worker keeps for its restart are unmounted before the directory goes.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut ours: Vec<&str> =
        mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(dir.to_str().unwrap())).collect();
    ours.sort_by(|a, b| b.cmp(a));
    for m in ours {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
