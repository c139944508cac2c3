//! Jail start time against the number of live session jails, with and without the per-start
//! sweep of stale cgroups: a worker's sessions start without it (the worker sweeps on a timer),
//! so their start should not grow with the jails already running.
//!
//!     cargo bench --bench live_jails            (as root: the jails use cgroups)
//!     STOCKADE_BENCH_LIVE=10,100,500 cargo bench --bench live_jails

use std::time::{Duration, Instant};

use stockade::jail::JailSpec;
use stockade::session::Session;

fn spec(sweep_stale: bool) -> JailSpec {
    let (policy, _) = stockade::policy::load_builtin("default").unwrap();
    JailSpec {
        policy,
        workspace: None,
        outputs: None,
        argv: vec![],
        env: vec![],
        timeout: None,
        sweep_stale,
        watcher: None,
        observe: false,
        tty: None,
        id_mapped: Vec::new(),
    }
}

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("live_jails: needs root (cgroups); skipped");
        return;
    }
    let levels: Vec<usize> = std::env::var("STOCKADE_BENCH_LIVE")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 100, 500]);
    let rounds = 40;
    let (quiet, sweeping) = (spec(false), spec(true));
    let mut live: Vec<Session> = Vec::new();
    println!("{:>10} {:>22} {:>22}", "live jails", "start p50, no sweep ms", "start p50, sweep ms");
    for n in levels {
        while live.len() < n {
            live.push(Session::start(&quiet).expect("a live session"));
        }
        let time = |s: &JailSpec| {
            (0..rounds)
                .map(|_| {
                    let t = Instant::now();
                    let session = Session::start(s).expect("a session");
                    let took = t.elapsed();
                    session.end().expect("ends");
                    took
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (time(&quiet), time(&sweeping));
        println!("{n:>10} {:>22.2} {:>22.2}", p50(a), p50(b));
    }
    let t = Instant::now();
    let n = live.len();
    for (i, s) in live.into_iter().enumerate() {
        let _ = s.end();
        if (i + 1) % 50 == 0 {
            eprintln!("ended {} of {n} live sessions in {:.1} s", i + 1, t.elapsed().as_secs_f64());
        }
    }
}
