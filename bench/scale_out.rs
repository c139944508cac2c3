//! Several workers on one queue: items per second against the number of workers, each worker with
//! its own state directory, all against one local control plane on loopback; and, per run, the
//! checks `tests/scale_out.rs` makes (every item done once, no earlier holder touching an item).
//!
//! `cargo bench --bench scale_out` (root: sessions build real jails). STOCKADE_BENCH_ITEMS sets
//! the items per run (default 60), STOCKADE_BENCH_WORKERS the worker counts (default 1,2,3).
//! On one host the workers share its cores: the figure shows what the queue and the workers cost,
//! not what more hosts would add.

use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stockade::control_plane::local::{CreateSession, LocalConfig, LocalControlPlane, ScriptStep, DEFAULT_ENVIRONMENT};
use stockade::control_plane::wire::WorkState;

const STOCKADE: &str = env!("CARGO_BIN_EXE_stockade");

fn main() {
    let items: usize = std::env::var("STOCKADE_BENCH_ITEMS").ok().and_then(|n| n.parse().ok()).unwrap_or(60);
    let counts: Vec<usize> = std::env::var("STOCKADE_BENCH_WORKERS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3]);
    println!("{:<8} {:>6} {:>10} {:>10} {:>12} {:>10}", "workers", "items", "wall s", "items/s", "duplicates", "late");
    for n in counts {
        run(n, items);
    }
}

fn run(workers: usize, items: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cp = LocalControlPlane::new(LocalConfig { lease: Duration::from_secs(10), ..LocalConfig::default() }).unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(cp.clone().serve(listener, std::future::pending()));
    let dir = std::env::temp_dir().join(format!("stockade-bench-scale-{}-{workers}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    cp.write_keys(&dir).unwrap();
    let mut procs: Vec<Child> = (0..workers)
        .map(|i| {
            Command::new(STOCKADE)
                .args(["worker", "--environment-id", DEFAULT_ENVIRONMENT, "--api-url", &url])
                .args(["--max-sessions", "4", "--image-overcommit", "1000", "--max-idle", "100ms"])
                .arg("--state-dir")
                .arg(dir.join(format!("state-{i}")))
                .arg("--environment-key-file")
                .arg(dir.join(format!("{DEFAULT_ENVIRONMENT}.key")))
                .env_remove("ANTHROPIC_API_KEY")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let t = Instant::now();
    let ids: Vec<String> = (0..items)
        .map(|k| {
            cp.create_session(CreateSession {
                environment_id: DEFAULT_ENVIRONMENT.into(),
                script: vec![
                    ScriptStep::call("bash", json!({"command": format!("echo {k}")})),
                    ScriptStep::call("bash", json!({"command": "true"})),
                ],
                metadata: Default::default(),
                skills: Vec::new(),
                memory_stores: Vec::new(),
                no_secret: false,
            })
            .unwrap()
            .session_id
        })
        .collect();
    let mut dup = 0;
    let mut late = 0;
    for id in &ids {
        let v = loop {
            let v = cp.session_view(id).unwrap();
            if v.work_state == WorkState::Stopped {
                break v;
            }
            assert!(t.elapsed() < Duration::from_secs(600), "{id} never ended");
            std::thread::sleep(Duration::from_millis(20));
        };
        dup += v.duplicate_results;
        late += v.late_requests.len();
    }
    let wall = t.elapsed().as_secs_f64();
    println!("{workers:<8} {items:>6} {wall:>10.1} {:>10.2} {dup:>12} {late:>10}", items as f64 / wall);
    for p in &mut procs {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = p.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
