//! The persistent shell behind the `bash` tool.
//!
//! One `bash --noprofile --norc` per session reads commands from a pipe. Each call sends
//!
//! ```text
//! IFS= LC_ALL=C read -r -N <len> __stockade_cmd
//! <exactly len bytes of command>
//! eval "$__stockade_cmd" </dev/null 3>&-; printf '%s %d\n' <nonce> "$?" >&3
//! ```
//!
//! so the command runs in the shell itself (cd, exports and functions persist), cannot be
//! confused with the framing whatever it contains, reads EOF on stdin, and reports its status
//! on a separate pipe (fd 3) with a per-call nonce. stdout and stderr share one pipe, so output
//! arrives interleaved as produced; it is kept within a bounded head and tail.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::format::*;
use super::{parse_bash, ToolResult};

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
    status: File,
}

pub struct Shell {
    cwd: PathBuf,
    env: Vec<(String, String)>,
    scope: KillScope,
    /// Processes a namespace-wide kill must spare (the jail's init and tool helper).
    pub spare: Vec<i32>,
    running: Option<Running>,
    /// The exit status of a shell reaped by someone else (the jail's init reaps orphans).
    noted_exit: Option<i32>,
    seq: u64,
}

/// Bounded output: the first and last `half` bytes, and a count of what fell between.
struct Capped {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    dropped: usize,
    half: usize,
}

impl Capped {
    fn new() -> Self {
        let half = MAX_OUTPUT_CHARS / 2;
        Capped { head: Vec::new(), tail: VecDeque::new(), dropped: 0, half }
    }
    fn push(&mut self, mut b: &[u8]) {
        if self.head.len() < self.half {
            let n = (self.half - self.head.len()).min(b.len());
            self.head.extend_from_slice(&b[..n]);
            b = &b[n..];
        }
        for &x in b {
            if self.tail.len() == self.half {
                self.tail.pop_front();
                self.dropped += 1;
            }
            self.tail.push_back(x);
        }
    }
    fn finish(self) -> String {
        let head = String::from_utf8_lossy(&self.head).into_owned();
        let tail: Vec<u8> = self.tail.into_iter().collect();
        let tail = String::from_utf8_lossy(&tail);
        if self.dropped == 0 {
            truncate_middle(&format!("{head}{tail}"))
        } else {
            format!("{head}{}{tail}", output_cut(self.dropped))
        }
    }
}

impl Shell {
    pub fn new(cwd: PathBuf, env: Vec<(String, String)>, scope: KillScope) -> Shell {
        Shell { cwd, env, scope, spare: Vec::new(), running: None, noted_exit: None, seq: 0 }
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
        let (st_r, st_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let st_raw = st_w.as_raw_fd();
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc"])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(Stdio::from(in_r))
            .stdout(Stdio::from(out_w.try_clone()?))
            .stderr(Stdio::from(out_w))
            .process_group(0);
        // SAFETY: between fork and exec the closure only calls dup2(2), which is
        // async-signal-safe; the source fd is owned by `st_w`, alive until after spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(st_raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(st_w);
        self.running = Some(Running {
            pid: Pid::from_raw(child.id() as i32),
            stdin: File::from(in_w),
            output: File::from(out_r),
            status: File::from(st_r),
        });
        self.noted_exit = None;
        Ok(())
    }

    /// Kills the shell and, depending on the scope, everything it started; waits for the shell.
    pub fn kill(&mut self) {
        let Some(r) = self.running.take() else { return };
        let _ = kill(Pid::from_raw(-r.pid.as_raw()), Signal::SIGKILL);
        if self.scope == KillScope::Namespace {
            kill_namespace_except(&self.spare);
        }
        if self.noted_exit.is_none() {
            let _ = waitpid(r.pid, None);
        }
        self.noted_exit = None;
    }

    /// Runs one `bash` tool call.
    pub fn call(&mut self, input: &serde_json::Value) -> ToolResult {
        let i = match parse_bash(input) {
            Ok(i) => i,
            Err(e) => return e,
        };
        if i.restart {
            self.kill();
            return match self.spawn() {
                Ok(()) if i.command.is_none() => ToolResult::ok(BASH_RESTARTED),
                Ok(()) => self.run(i.command.as_deref().unwrap_or(""), i.timeout),
                Err(e) => ToolResult::err(format!("could not start bash: {e}")),
            };
        }
        let Some(command) = i.command.as_deref() else {
            return ToolResult::err("Invalid input for bash: missing field `command`");
        };
        self.run(command, i.timeout)
    }

    fn run(&mut self, command: &str, timeout: Option<u64>) -> ToolResult {
        if command.contains('\0') {
            return ToolResult::err("command contains a NUL byte");
        }
        let timeout_ms = match timeout {
            None => BASH_DEFAULT_TIMEOUT_MS,
            Some(0) => return ToolResult::err("timeout must be at least 1 ms"),
            Some(t) if t > BASH_MAX_TIMEOUT_MS => {
                return ToolResult::err(format!("timeout {t} ms exceeds the maximum of {BASH_MAX_TIMEOUT_MS} ms"))
            }
            Some(t) => t,
        };
        if self.running.is_none() {
            if let Err(e) = self.spawn() {
                return ToolResult::err(format!("could not start bash: {e}"));
            }
        }
        self.seq += 1;
        let nonce = format!("__stockade_{}_{}_{:016x}", std::process::id(), self.seq, random_u64());
        let mut script = format!("IFS= LC_ALL=C read -r -N {} __stockade_cmd\n", command.len()).into_bytes();
        script.extend_from_slice(command.as_bytes());
        script.extend_from_slice(
            format!("\neval \"$__stockade_cmd\" </dev/null 3>&-; printf '%s %d\\n' {nonce} \"$?\" >&3\n").as_bytes(),
        );
        let r = self.running.as_mut().expect("spawned above");
        if r.stdin.write_all(&script).is_err() {
            // The shell died between calls: start afresh and run the command there.
            self.kill();
            if let Err(e) = self.spawn() {
                return ToolResult::err(format!("could not restart bash: {e}"));
            }
            let r = self.running.as_mut().expect("spawned");
            if let Err(e) = r.stdin.write_all(&script) {
                return ToolResult::err(format!("could not send the command to bash: {e}"));
            }
        }
        self.collect(&nonce, timeout_ms)
    }

    fn collect(&mut self, nonce: &str, timeout_ms: u64) -> ToolResult {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let mut out = Capped::new();
        let mut status_buf: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut output_open = true;
        let r = self.running.as_mut().expect("running");
        loop {
            let now = Instant::now();
            if now >= deadline {
                drain(&mut r.output, &mut out, &mut buf);
                self.kill();
                let mut text = out.finish();
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&bash_timed_out(timeout_ms));
                return ToolResult::err(text);
            }
            let left = deadline - now;
            let wait = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
            let mut fds = vec![PollFd::new(r.status.as_fd(), PollFlags::POLLIN)];
            if output_open {
                fds.push(PollFd::new(r.output.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, wait) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return ToolResult::err(format!("waiting for bash: {e}")),
            }
            let status_ready = fds[0].revents().is_some_and(|e| !e.is_empty());
            let output_ready = output_open && fds.get(1).and_then(|f| f.revents()).is_some_and(|e| !e.is_empty());
            drop(fds);
            if output_ready {
                match r.output.read(&mut buf) {
                    Ok(0) => output_open = false,
                    Ok(n) => out.push(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => output_open = false,
                }
            }
            if status_ready {
                let n = r.status.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    // The status pipe closed: the shell itself exited (`exit`, `exec`, a crash).
                    drain(&mut r.output, &mut out, &mut buf);
                    let code = self.shell_exit_code();
                    let mut text = out.finish();
                    if !text.is_empty() && !text.ends_with('\n') {
                        text.push('\n');
                    }
                    text.push_str(&bash_shell_exited(code));
                    return ToolResult { content: text, is_error: code != 0 };
                }
                status_buf.extend_from_slice(&buf[..n]);
                let s = String::from_utf8_lossy(&status_buf).into_owned();
                if let Some(line) = s.lines().find(|l| l.starts_with(nonce)) {
                    let code: i32 = line[nonce.len()..].trim().parse().unwrap_or(-1);
                    drain(&mut r.output, &mut out, &mut buf);
                    let mut text = out.finish();
                    if code != 0 {
                        if !text.is_empty() && !text.ends_with('\n') {
                            text.push('\n');
                        }
                        text.push_str(&exit_code(code));
                    }
                    return ToolResult::ok(text);
                }
            }
        }
    }

    fn shell_exit_code(&mut self) -> i32 {
        let Some(r) = self.running.take() else { return -1 };
        let _ = kill(Pid::from_raw(-r.pid.as_raw()), Signal::SIGKILL);
        if let Some(c) = self.noted_exit.take() {
            return c;
        }
        match waitpid(r.pid, None) {
            Ok(WaitStatus::Exited(_, c)) => c,
            Ok(WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
            _ => -1,
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads whatever output is already buffered, without blocking.
fn drain(f: &mut File, out: &mut Capped, buf: &mut [u8]) {
    loop {
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 && fds[0].revents().is_some_and(|e| e.contains(PollFlags::POLLIN)) => {}
            _ => return,
        }
        match f.read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => out.push(&buf[..n]),
        }
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
