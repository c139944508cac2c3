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
    // What a probe leaves running comes back to the battery, which ends it before the next probe.
    // SAFETY: prctl with integer arguments; on failure the orphans go to the jail's init instead.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
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

/// How long one probe may take: its child dies of SIGALRM then.
pub(crate) const PROBE_SECS: u32 = 30;
/// How long the battery waits for a probe's report before it kills what the probe started.
const REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(PROBE_SECS as u64 + 5);

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
            unsafe { libc::alarm(PROBE_SECS) };
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
            // One line, within a bound: what the probe left behind (the fork bomb's children, a
            // pid namespace's init) may hold the pipe open, and a process the alarm cannot stop
            // must not stall the battery.
            let (buf, in_time) = read_line_within(r, REPORT_WAIT);
            if !in_time {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
            let status = nix::sys::wait::waitpid(child, None);
            kill_leftovers();
            use nix::sys::signal::Signal;
            use nix::sys::wait::WaitStatus;
            match (serde_json::from_slice::<Outcome>(buf.split(|c| *c == b'\n').next().unwrap_or(&[])), status) {
                (Ok(o), _) => o,
                (Err(_), _) if !in_time => Outcome::Error(format!(
                    "no report within {} s; the probe and what it started were killed",
                    REPORT_WAIT.as_secs()
                )),
                (Err(_), Ok(WaitStatus::Signaled(_, Signal::SIGSYS, _))) => {
                    Outcome::Blocked("killed by SIGSYS (seccomp)".into())
                }
                (Err(_), Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _))) if id == "res-memory-hog" => {
                    Outcome::Blocked("killed by the OOM killer at the memory limit".into())
                }
                (Err(_), Ok(WaitStatus::Signaled(_, Signal::SIGALRM, _))) => {
                    Outcome::Error(format!("timed out after {PROBE_SECS} s"))
                }
                (Err(_), s) => Outcome::Error(format!("the probe died: {s:?}")),
            }
        }
    }
}

/// Reads from `fd` until a newline, end of file or `limit`; false when the limit came first.
fn read_line_within(fd: std::os::fd::OwnedFd, limit: std::time::Duration) -> (Vec<u8>, bool) {
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + limit;
    let mut f = std::fs::File::from(fd);
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while !buf.contains(&b'\n') {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(f.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => return (buf, false),
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
            Ok(_) => {}
        }
        match f.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    (buf, true)
}

/// Kills and reaps every process the battery still has below it. The battery is a subreaper,
/// so whatever a finished probe left running is its child by now.
fn kill_leftovers() {
    let me = std::process::id().to_string();
    for _ in 0..100 {
        let children: Vec<i32> = std::fs::read_dir("/proc")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                            // The parent's pid is the second field after the command's closing ')'.
                            s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)) == Some(&me)
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        if children.is_empty() {
            return;
        }
        for pid in children {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A writer that never writes nor closes (a probe's leftover holding the pipe) costs the
    /// battery the bound, not forever; a line that comes is read whole.
    #[test]
    fn a_report_is_awaited_within_its_bound() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let t = std::time::Instant::now();
        let (buf, in_time) = super::read_line_within(r, std::time::Duration::from_millis(300));
        assert!(!in_time && buf.is_empty());
        assert!(t.elapsed() >= std::time::Duration::from_millis(300));
        let (r, w2) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w2, b"{\"outcome\":\"blocked\"}\nrest").unwrap();
        let (buf, in_time) = super::read_line_within(r, std::time::Duration::from_secs(30));
        assert!(in_time);
        assert!(buf.starts_with(b"{\"outcome\":\"blocked\"}\n"));
        drop(w);
    }
}
