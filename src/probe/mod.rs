//! The escape-probe battery. Probes run *inside* a real jail (`stockade __probe --battery`, the
//! jailed command of `stockade probe`), each in its own forked child so that a seccomp kill, an
//! OOM kill or a fork bomb ends only that probe. `harness` is the host side: it sets up the
//! targets probes aim at, builds the jail from the policy under test and reports.

pub(crate) mod checks;
pub mod control;
pub mod harness;
mod syscalls;

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

pub use syscalls::{errno_name, main, run, ProbeResult, ALLOWED_PROBES, SYSCALL_PROBES};

/// What probes need to know about the world outside the jail. None of it is secret: the planted
/// variable is named here, its value never is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ctx {
    /// The harness's pid on the host.
    pub host_pid: u32,
    /// An abstract unix socket the harness listens on, in the host's network namespace.
    pub abstract_name: String,
    /// A SysV message queue the harness created in the host's IPC namespace.
    pub sysv_key: i32,
    /// A file the harness created in the host's /dev/shm.
    pub shm_name: String,
    /// A TCP listener on the host's 127.0.0.1.
    pub listener_port: u16,
    /// The name of a variable planted in Stockade's own environment.
    pub planted_env: String,
    pub memory_limit: Option<u64>,
    pub tmp_size: u64,
    pub fsize: Option<u64>,
    /// The policy's network mode: "none", "loopback" or "veth".
    #[serde(default)]
    pub network: String,
    /// Whether the policy sets landlock TCP port rules (`tcp_bind` or `tcp_connect`).
    #[serde(default)]
    pub landlock_tcp: bool,
    /// Descriptors open when the battery started (filled in inside the jail).
    #[serde(default)]
    pub startup_fds: Vec<i32>,
    /// The positive control: no jail, an environment arranged for every probe to escape.
    #[serde(default)]
    pub control: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "evidence", rename_all = "snake_case")]
pub enum Outcome {
    Blocked(String),
    Escaped(String),
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeReport {
    pub id: String,
    pub category: String,
    pub what: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Every probe: (id, category, what it tries). Syscall probes first, resources last (the fork
/// bomb leaves sleeping children behind for a few seconds).
pub fn catalogue() -> Vec<(&'static str, &'static str, String)> {
    let mut v: Vec<(&str, &str, String)> = Vec::new();
    for (id, cat, what) in
        checks::PROBES.iter().filter(|p| p.category != "resources").map(|p| (p.id, p.category, p.what))
    {
        v.push((id, cat, (*what).to_owned()));
    }
    for id in SYSCALL_PROBES {
        let what = match *id {
            "x32-getpid" => "getpid through the x32 ABI".to_owned(),
            "int80-getpid" => "getpid through int 0x80 (ia32)".to_owned(),
            "tiocsti" => "inject a keystroke with TIOCSTI".to_owned(),
            s if s.starts_with("socket-") => format!("open a {} socket", &s[7..]),
            s => format!("call {s}"),
        };
        v.push((id, "syscalls", what));
    }
    for (id, cat, what) in
        checks::PROBES.iter().filter(|p| p.category == "resources").map(|p| (p.id, p.category, p.what))
    {
        v.push((id, cat, (*what).to_owned()));
    }
    v
}

fn run_one(id: &str, ctx: &Ctx) -> Outcome {
    if let Some(o) = checks::run(id, ctx) {
        return o;
    }
    // The filter answers EPERM (ENOSYS for clone3) or kills; any other answer means the call
    // reached the kernel past the filter, which is the regression these probes guard against,
    // even when the kernel then refused it for its own reasons.
    match syscalls::run(id) {
        Some(Ok(d)) => Outcome::Escaped(d),
        Some(Err(e)) if e == libc::EPERM || (id == "clone3" && e == libc::ENOSYS) => Outcome::Blocked(errno_name(e)),
        Some(Err(e)) => Outcome::Escaped(format!("reached the kernel past the filter ({})", errno_name(e))),
        None => Outcome::Error(format!("unknown probe {id}")),
    }
}

fn open_fds() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|r| r.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort_unstable();
    // The directory handle read_dir itself held is closed by now.
    v.retain(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok());
    v
}

/// Inside the jail: runs each probe in a forked child and prints one JSON `ProbeReport` per line.
pub fn battery(ctx_json: &str, ids: &[String]) -> i32 {
    let mut ctx: Ctx = match serde_json::from_str(ctx_json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("__probe --battery: bad context: {e}");
            return 2;
        }
    };
    // Held open (and inheritable) for the whole battery: the control's leaked descriptor.
    let _terminal = if ctx.control {
        match control::arrange(&ctx) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("stockade probe --control: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    ctx.startup_fds = open_fds();
    let cat = catalogue();
    let mut out = std::io::stdout().lock();
    for id in ids {
        let Some((_, category, what)) = cat.iter().find(|(i, _, _)| i == id) else {
            let _ = writeln!(out, "{}", serde_json::json!({"id": id, "outcome": "error", "evidence": "unknown probe"}));
            continue;
        };
        let outcome = in_child(id, &ctx);
        let r = ProbeReport { id: id.clone(), category: (*category).into(), what: what.clone(), outcome };
        let _ = writeln!(out, "{}", serde_json::to_string(&r).expect("serialises"));
        let _ = out.flush();
    }
    0
}

fn in_child(id: &str, ctx: &Ctx) -> Outcome {
    let (r, w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return Outcome::Error(format!("pipe: {e}")),
    };
    // SAFETY: the battery runs single-threaded inside the jail; the child runs the probe and
    // leaves with _exit, never returning into this function's caller.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Outcome::Error(format!("fork: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(r);
            // SAFETY: alarm takes an integer; a probe that hangs dies of SIGALRM.
            unsafe { libc::alarm(30) };
            let o = if ctx.control { control::run(id, ctx) } else { run_one(id, ctx) };
            let mut f = std::fs::File::from(w);
            let _ = f.write_all(serde_json::to_string(&o).expect("serialises").as_bytes());
            let _ = f.write_all(b"\n");
            drop(f);
            // SAFETY: leave the forked child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(w);
            // Read one line: children the probe left behind (the fork bomb's) may hold the pipe.
            let mut f = std::fs::File::from(r);
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            while !buf.contains(&b'\n') {
                match f.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
            let status = nix::sys::wait::waitpid(child, None);
            use nix::sys::signal::Signal;
            use nix::sys::wait::WaitStatus;
            match (serde_json::from_slice::<Outcome>(buf.split(|c| *c == b'\n').next().unwrap_or(&[])), status) {
                (Ok(o), _) => o,
                (Err(_), Ok(WaitStatus::Signaled(_, Signal::SIGSYS, _))) => {
                    Outcome::Blocked("killed by SIGSYS (seccomp)".into())
                }
                (Err(_), Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _))) if id == "res-memory-hog" => {
                    Outcome::Blocked("killed by the OOM killer at the memory limit".into())
                }
                (Err(_), Ok(WaitStatus::Signaled(_, Signal::SIGALRM, _))) => {
                    Outcome::Error("timed out after 30 s".into())
                }
                (Err(_), s) => Outcome::Error(format!("the probe died: {s:?}")),
            }
        }
    }
}
