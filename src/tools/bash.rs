//! The persistent shell behind the `bash` tool, answering as the official runner's does.
//!
//! One `/bin/bash --noprofile --norc` per session reads commands from a pipe, framed exactly as
//! the runner frames them, so that what a command sees (its line numbers in bash's messages,
//! `$0`) is the same:
//!
//! ```text
//! { COMMAND
//! } </dev/null 2>&1; printf '\n<sentinel>%d\n' $?
//! ```
//!
//! The sentinel is new for every call and is written split in two, so only the shell's printf
//! can put it together. stdout and stderr share one pipe; only its last 100 KiB are kept. The
//! sentinel has the runner's length, 49 characters, because the bytes it takes from those
//! 100 KiB decide where a long output is cut.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::format::*;
use super::{input, pyfmt, ToolResult};

/// How the shell's leftovers are cleaned up after a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillScope {
    /// Only the shell's process group (outside a jail, e.g. in tests).
    ProcessGroup,
    /// Every process of the pid namespace except the callers listed in `spare` (inside a jail).
    Namespace,
}

struct Running {
    pid: Pid,
    stdin: File,
    output: File,
}

pub struct Shell {
    cwd: PathBuf,
    env: Vec<(String, String)>,
    scope: KillScope,
    /// Processes a namespace-wide kill must spare (the jail's init and tool helper).
    pub spare: Vec<i32>,
    running: Option<Running>,
    /// A call timed out: as with the runner, every call fails until a restart.
    terminated: bool,
    /// The exit status of a shell reaped by someone else (the jail's init reaps orphans).
    noted_exit: Option<i32>,
}

const TERMINATED: &str = "bash: bash session terminated; restart required";

/// What one command left on the pipe.
enum Outcome {
    /// The sentinel arrived: the bytes kept, whether older ones were dropped.
    Done(Vec<u8>, bool),
    /// The pipe closed first: the shell is gone.
    Exited(Vec<u8>),
    TimedOut,
}

/// The sentinel's text, written split so that the shell's input never holds it whole.
fn sentinel() -> (String, String) {
    let s = format!("__STK_CMD_{:016x}{:016x}_DONE__", random_u64(), random_u64());
    let split = format!("{}''{}", &s[..8], &s[8..]);
    (s, split)
}

/// Removes the ANSI sequences the runner removes: ESC `[`, parameters, intermediates, a final.
fn strip_ansi(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        if b[i] == 0x1b && b.get(i + 1) == Some(&b'[') {
            let mut j = i + 2;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b';' || b[j] == b'?') {
                j += 1;
            }
            while j < b.len() && (0x20..=0x2f).contains(&b[j]) {
                j += 1;
            }
            if j < b.len() && (0x40..=0x7e).contains(&b[j]) {
                out.push_str(&text[copied..i]);
                i = j + 1;
                copied = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// Python's `str.strip()`: Unicode whitespace and the four ASCII separators it counts as such.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
}

impl Shell {
    pub fn new(cwd: PathBuf, env: Vec<(String, String)>, scope: KillScope) -> Shell {
        Shell { cwd, env, scope, spare: Vec::new(), running: None, terminated: false, noted_exit: None }
    }

    /// The shell's pid, if one is running.
    pub fn pid(&self) -> Option<i32> {
        self.running.as_ref().map(|r| r.pid.as_raw())
    }

    /// Called by a reaper that collected the shell's exit status.
    pub fn note_exit(&mut self, code: i32) {
        self.noted_exit = Some(code);
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let (in_r, in_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut cmd = Command::new("/bin/bash");
        cmd.args(["--noprofile", "--norc"])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs([("PS1", ""), ("PS2", ""), ("TERM", "dumb")])
            .current_dir(&self.cwd)
            .stdin(Stdio::from(in_r))
            .stdout(Stdio::from(out_w.try_clone()?))
            .stderr(Stdio::from(out_w))
            .process_group(0);
        let child = cmd.spawn()?;
        self.running =
            Some(Running { pid: Pid::from_raw(child.id() as i32), stdin: File::from(in_w), output: File::from(out_r) });
        self.noted_exit = None;
        Ok(())
    }

    /// Kills the shell and, depending on the scope, everything it started; waits for the shell.
    /// Returns its exit code when it had exited on its own.
    pub fn kill(&mut self) -> Option<i32> {
        let r = self.running.take()?;
        let _ = kill(Pid::from_raw(-r.pid.as_raw()), Signal::SIGKILL);
        if self.scope == KillScope::Namespace {
            kill_namespace_except(&self.spare);
        }
        match self.noted_exit.take() {
            Some(c) => Some(c),
            None => match waitpid(r.pid, None) {
                Ok(WaitStatus::Exited(_, c)) => Some(c),
                Ok(WaitStatus::Signaled(_, s, _)) => Some(128 + s as i32),
                _ => None,
            },
        }
    }

    /// Runs one `bash` tool call.
    pub fn call(&mut self, input: &serde_json::Value) -> ToolResult {
        let i = match input::bash(input) {
            Ok(i) => i,
            Err(e) => return e,
        };
        if i.restart {
            self.kill();
            self.terminated = false;
            return match self.spawn() {
                Ok(()) => ToolResult::ok("bash session restarted"),
                Err(e) => ToolResult::err(format!("bash: could not start /bin/bash: {e}")),
            };
        }
        let command = match i.command.as_deref() {
            Some(c) if !c.is_empty() => c,
            _ => return ToolResult::err("bash: command is required"),
        };
        let timeout = match i.timeout_ms {
            Some(ms) if ms != 0 => ms as f64 / 1000.0,
            _ => BASH_DEFAULT_TIMEOUT_S,
        };
        if self.terminated {
            return ToolResult::err(TERMINATED);
        }
        self.run(command, timeout)
    }

    fn run(&mut self, command: &str, timeout: f64) -> ToolResult {
        let (marker, split) = sentinel();
        let script = format!("{{ {command}\n}} </dev/null 2>&1; printf '\\n{split}%d\\n' $?\n");
        if self.running.is_none() {
            if let Err(e) = self.spawn() {
                return ToolResult::err(format!("bash: could not start /bin/bash: {e}"));
            }
        }
        let r = self.running.as_mut().expect("spawned above");
        if r.stdin.write_all(script.as_bytes()).is_err() {
            // The shell died between calls: a new one runs this command.
            self.kill();
            if let Err(e) = self.spawn() {
                return ToolResult::err(format!("bash: could not start /bin/bash: {e}"));
            }
            let r = self.running.as_mut().expect("spawned");
            if let Err(e) = r.stdin.write_all(script.as_bytes()) {
                return ToolResult::err(format!("bash: could not send the command to /bin/bash: {e}"));
            }
        }
        match self.collect(marker.as_bytes(), timeout) {
            Outcome::TimedOut => {
                self.kill();
                self.terminated = true;
                ToolResult::err(format!("bash: bash command timed out after {}s", pyfmt::float(timeout)))
            }
            Outcome::Exited(buf) => {
                let code = self.kill();
                let text = strip_ansi(&String::from_utf8_lossy(&buf));
                let out = py_strip(&text);
                let note = match code {
                    Some(c) => format!("bash: the shell exited with status {c}; the next call starts a new shell"),
                    None => "bash: the shell exited; the next call starts a new shell".to_owned(),
                };
                ToolResult::err(if out.is_empty() { note } else { format!("{out}\n{note}") })
            }
            Outcome::Done(buf, truncated) => {
                let text = strip_ansi(&String::from_utf8_lossy(&buf));
                let Some(idx) = text.rfind(marker.as_str()) else {
                    return ToolResult::err(py_strip(&text).to_owned());
                };
                let mut out = text[..idx].trim_end_matches('\n').to_owned();
                let tail = py_strip(&text[idx + marker.len()..]);
                let code: i64 = tail.lines().next().and_then(|l| py_strip(l).parse().ok()).unwrap_or(-1);
                if truncated {
                    out.insert_str(0, "[output truncated]\n");
                }
                ToolResult::text(out, code != 0)
            }
        }
    }

    /// Reads the pipe until the sentinel, EOF or the deadline, keeping the last 100 KiB.
    fn collect(&mut self, marker: &[u8], timeout: f64) -> Outcome {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.clamp(0.0, 1e9));
        let r = self.running.as_mut().expect("running");
        let mut buf: Vec<u8> = Vec::new();
        let mut truncated = false;
        let mut chunk = vec![0u8; 4096];
        if timeout <= 0.0 {
            return Outcome::TimedOut;
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Outcome::TimedOut;
            }
            let left = (deadline - now).as_millis().min(60_000) as i32;
            let mut fds = [PollFd::new(r.output.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::try_from(left.max(1)).unwrap_or(PollTimeout::MAX)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Outcome::Exited(buf),
            }
            let n = match r.output.read(&mut chunk) {
                Ok(0) => return Outcome::Exited(buf),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return Outcome::Exited(buf),
            };
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > BASH_OUTPUT_LIMIT {
                buf.drain(..buf.len() - BASH_OUTPUT_LIMIT);
                truncated = true;
            }
            if contains(&buf[buf.len().saturating_sub(n + marker.len())..], marker) {
                return Outcome::Done(buf, truncated);
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl Drop for Shell {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILLs every process visible in /proc except ourselves and `spare`. Inside a jail, /proc
/// shows only the jail's pid namespace.
fn kill_namespace_except(spare: &[i32]) {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else { return };
    for e in rd.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            if pid != me && pid != 1 && !spare.contains(&pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ (std::process::id() as u64) << 32;
    }
    u64::from_ne_bytes(b)
}
