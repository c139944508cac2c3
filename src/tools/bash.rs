//! The persistent shell behind the `bash` tool, answering as the official runner's does.
//!
//! One `/bin/bash --noprofile --norc` per shell reads commands from a pipe, framed with the same
//! bytes as the runner's, so that what a command sees (its line numbers in bash's messages, `$0`,
//! the variable the frame sets) is the same. The shell's first line moves the pipes for stdout and
//! stderr to fds 30 and 31 and sends the shell's own output to /dev/null; each call is then
//!
//! ```text
//! \builtin unset __ant_status; { \builtin eval '{ :
//! COMMAND
//!
//! }
//! __ant_status=$?'; } </dev/null >&30 2>&31; ! \builtin : "${__ant_status=$?}"
//! __ant_status=${__ant_status-$?} && REPORT "$__ant_status" >&31 && REPORT 0 >&30 || \builtin exit
//! ```
//!
//! where REPORT prints a sentinel, new for every call and split in two so that only the shell's
//! printf puts it together, and a status, on each stream. stdout and stderr are read apart and
//! answered stdout first, then stderr (stderr first when the command failed); past 30,000 UTF-16
//! code units the answer is cut and the whole output saved to a file the file tools can read.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::format::*;
use super::{input, ToolResult, NO_OUTPUT};

/// How the shell's leftovers are cleaned up after a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillScope {
    /// Only the shell's process group (outside a jail, e.g. in tests).
    ProcessGroup,
    /// The process group and every other descendant of this process except those under `spare`
    /// (a session thread's process in a jail, which is its children's subreaper, so a command's
    /// orphans are its descendants too).
    Descendants,
}

struct Running {
    pid: Pid,
    stdin: File,
    stdout: File,
    stderr: File,
    /// The shell's first line has printed its NUL on stderr: what came before it (a locale
    /// warning, say) is the shell's, not a command's.
    set_up: bool,
}

pub struct Shell {
    cwd: PathBuf,
    env: Vec<(String, String)>,
    scope: KillScope,
    /// Processes a kill of the descendants must spare, with what they started (the file tool
    /// helper).
    pub spare: Vec<i32>,
    running: Option<Running>,
    /// A call timed out: as with the runner, every call is refused until a restart.
    terminated: bool,
    /// The exit status of a shell reaped by someone else (the jail's init reaps orphans).
    noted_exit: Option<i32>,
    /// The directory holding the file of the last cut output.
    saved_output: Option<PathBuf>,
}

/// The first line every shell reads. Inside the braces bash saves fds 1 and 2 as 10 and 11;
/// their copies at 30 and 31 are the pipes commands write to, so programs the shell runs do not
/// inherit the shell's own output, which goes to /dev/null. The NUL ends what the shell printed
/// before it.
const SETUP: &str =
    "exec 10>&- 11>&-; { exec 30>&10 31>&11; } >/dev/null 2>&1; exec >/dev/null 2>&1; command printf '\\0' >&31\n";

const HOW_TO_RESTART: &str = "Call bash with restart set to true to start a new one. It starts in the original working \
                              directory, without the old shell's variables, activated environments and background jobs.";

/// After a command ended the shell. The runner refuses every later call until a restart;
/// Stockade starts a new shell with the next call (a documented divergence).
const SHELL_EXITED: &str = "[The shell is gone; the next call starts a new shell. It starts in the original working \
                            directory, without the old shell's variables, activated environments and background jobs.]";

fn shell_gone() -> String {
    format!("[The shell is gone. {HOW_TO_RESTART}]")
}

fn command_not_run() -> String {
    format!("[This command did not run, because the shell is gone. {HOW_TO_RESTART}]")
}

/// How long output still arriving from a shell that ended is read (a background job can hold
/// the pipes open).
const EXIT_DRAIN: Duration = Duration::from_millis(200);

/// What one command ended with.
enum Outcome {
    /// Both sentinels arrived: the command's status.
    Done(i32),
    /// The shell ended first, with this status.
    Exited(i32),
    TimedOut,
    /// The caller asked for the call to stop.
    Stopped,
}

/// One of the command's two streams, as read so far.
struct Stream {
    /// The text's first bytes (all of it unless `BASH_SAVED_OUTPUT_BYTES` and more arrived),
    /// then the newest bytes, where the sentinel is looked for.
    head: Vec<u8>,
    /// `\n` in bytes that were not kept.
    dropped_newlines: usize,
    /// The status after the sentinel, once it and its line end arrived.
    status: Option<i32>,
    /// Where the sentinel was found while its status line was still on its way.
    sentinel_at: Option<usize>,
}

/// Bytes of a stream kept whole; the rest counts its lines only.
const KEEP: usize = BASH_SAVED_OUTPUT_BYTES + 64 * 1024;
/// The newest bytes always kept, where a sentinel may still begin.
const WINDOW: usize = 4096;

impl Stream {
    fn new() -> Stream {
        Stream { head: Vec::new(), dropped_newlines: 0, status: None, sentinel_at: None }
    }

    fn add(&mut self, chunk: &[u8], sentinel: &[u8]) {
        if self.status.is_some() {
            return;
        }
        let from = self.head.len().saturating_sub(sentinel.len() + 1);
        self.head.extend_from_slice(chunk);
        let found = self.sentinel_at.or_else(|| find(&self.head[from..], sentinel).map(|p| from + p));
        if let Some(at) = found {
            self.sentinel_at = Some(at);
            let after = &self.head[at + sentinel.len()..];
            if let Some(nl) = after.iter().position(|&b| b == b'\n') {
                self.status = Some(std::str::from_utf8(&after[..nl]).ok().and_then(|s| s.parse().ok()).unwrap_or(-1));
                // The shell's printf starts with a newline of its own.
                let end = if at > 0 && self.head[at - 1] == b'\n' { at - 1 } else { at };
                self.head.truncate(end);
            }
            return;
        }
        if self.head.len() > KEEP + 2 * WINDOW {
            let cut = self.head.len() - WINDOW;
            self.dropped_newlines += self.head[KEEP..cut].iter().filter(|&&b| b == b'\n').count();
            self.head.drain(KEEP..cut);
        }
    }

    fn newlines(&self) -> usize {
        self.dropped_newlines + self.head.iter().filter(|&&b| b == b'\n').count()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The sentinel, and the shell's command that prints it whole before a status.
fn sentinel() -> (String, String) {
    let s = format!("__STK_CMD_{:016x}{:016x}_DONE__", random_u64(), random_u64());
    let report = format!("\\builtin printf '\\n%s%s%d\\n' {} {}", &s[..8], &s[8..]);
    (s, report)
}

/// The bytes the shell reads for one command.
fn frame(command: &str, report: &str) -> String {
    let quoted = command.replace('\'', "'\\''");
    format!(
        "\\builtin unset __ant_status; {{ \\builtin eval '{{ :\n{quoted}\n\n}}\n__ant_status=$?'; }} </dev/null >&30 \
         2>&31; ! \\builtin : \"${{__ant_status=$?}}\"\n__ant_status=${{__ant_status-$?}} && {report} \
         \"$__ant_status\" >&31 && {report} 0 >&30 || \\builtin exit\n"
    )
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

/// The start of `text` that fits in `units` UTF-16 code units (a character cut in half is left
/// out, as Python's `decode(errors="ignore")` leaves it).
fn utf16_prefix(text: &str, units: usize) -> Option<&str> {
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += c.len_utf16();
        if used > units {
            return Some(&text[..i]);
        }
    }
    None
}

/// Python's `f"{x:g}"` for a timeout of whole milliseconds up to the cap: at most three
/// decimals, no trailing zeros.
fn seconds_g(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_owned()
}

/// A name of `n` characters from the alphabet Python's `tempfile` draws from.
fn temp_name(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_";
    let mut out = String::with_capacity(n);
    let mut r = random_u64();
    for i in 0..n {
        if i % 10 == 9 {
            r = random_u64();
        }
        out.push(ALPHABET[(r % ALPHABET.len() as u64) as usize] as char);
        r /= ALPHABET.len() as u64;
    }
    out
}

impl Shell {
    pub fn new(cwd: PathBuf, env: Vec<(String, String)>, scope: KillScope) -> Shell {
        Shell {
            cwd,
            env,
            scope,
            spare: Vec::new(),
            running: None,
            terminated: false,
            noted_exit: None,
            saved_output: None,
        }
    }

    /// The shell's pid, if one is running.
    pub fn pid(&self) -> Option<i32> {
        self.running.as_ref().map(|r| r.pid.as_raw())
    }

    /// Called by a reaper that collected the shell's exit status.
    pub fn note_exit(&mut self, code: i32) {
        self.noted_exit = Some(code);
    }

    /// The directory where the last cut output was saved, which `read` and `grep` may open.
    pub fn saved_output_dir(&self) -> Option<&Path> {
        self.saved_output.as_deref()
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let flags = nix::fcntl::OFlag::O_CLOEXEC;
        let (in_r, in_w) = nix::unistd::pipe2(flags)?;
        let (out_r, out_w) = nix::unistd::pipe2(flags)?;
        let (err_r, err_w) = nix::unistd::pipe2(flags)?;
        let mut cmd = Command::new("/bin/bash");
        cmd.args(["--noprofile", "--norc"])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs([("PS1", ""), ("PS2", ""), ("TERM", "dumb"), ("HISTFILE", "")])
            .current_dir(&self.cwd)
            .stdin(Stdio::from(in_r))
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            .process_group(0);
        let child = cmd.spawn()?;
        let mut running = Running {
            pid: Pid::from_raw(child.id() as i32),
            stdin: File::from(in_w),
            stdout: File::from(out_r),
            stderr: File::from(err_r),
            set_up: false,
        };
        self.noted_exit = None;
        // A shell that already ended is reported by the call that writes to it next.
        let _ = running.stdin.write_all(SETUP.as_bytes());
        self.running = Some(running);
        Ok(())
    }

    /// Kills the shell and, depending on the scope, everything it started; waits for the shell.
    /// Returns its exit code when it had exited on its own.
    pub fn kill(&mut self) -> Option<i32> {
        let r = self.running.take()?;
        let _ = kill(Pid::from_raw(-r.pid.as_raw()), Signal::SIGKILL);
        if self.scope == KillScope::Descendants {
            kill_descendants_except(&self.spare);
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

    /// Kills the shell and removes the file of its last cut output.
    fn close(&mut self) {
        self.kill();
        self.remove_saved_output();
    }

    fn remove_saved_output(&mut self) {
        if let Some(dir) = self.saved_output.take() {
            // A command can have replaced the directory with a symlink, which is removed, not
            // followed.
            if std::fs::remove_dir_all(&dir).is_err() {
                let _ = std::fs::remove_file(&dir);
            }
        }
    }

    /// Runs one `bash` tool call.
    pub fn call(&mut self, input: &serde_json::Value) -> ToolResult {
        self.call_until(input, None)
    }

    /// Runs one `bash` tool call that stops as soon as `stop` turns readable: the shell and
    /// everything it started are killed, as after a timeout, and the runner's text for a stopped
    /// call is the answer.
    pub fn call_until(&mut self, input: &serde_json::Value, stop: Option<BorrowedFd<'_>>) -> ToolResult {
        let i = match input::bash(input) {
            Ok(i) => i,
            Err(e) => return e,
        };
        let timeout = match i.timeout_ms {
            Some(ms) if ms > 0 => (ms as f64 / 1000.0).min(BASH_DEFAULT_TIMEOUT_S),
            _ => BASH_DEFAULT_TIMEOUT_S,
        };
        let command = i.command.as_deref().filter(|c| !c.is_empty());
        if i.restart {
            self.close();
            self.terminated = false;
            if command.is_none() {
                return ToolResult::ok("bash session restarted");
            }
        }
        let Some(command) = command else { return ToolResult::err("bash: command is required") };
        if self.terminated {
            return ToolResult::err(command_not_run());
        }
        self.run(command, timeout, stop)
    }

    fn run(&mut self, command: &str, timeout: f64, stop: Option<BorrowedFd<'_>>) -> ToolResult {
        let (marker, report) = sentinel();
        let script = frame(command, &report);
        if self.running.is_some() && self.noted_exit.is_some() {
            // The shell ended between calls; a new one runs this command.
            self.kill();
        }
        if self.running.is_none() {
            if let Err(e) = self.spawn() {
                return ToolResult::err(format!("bash: could not start /bin/bash: {e}"));
            }
        }
        self.drain_between_calls();
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
        let mut out = Stream::new();
        let mut err = Stream::new();
        match self.collect(marker.as_bytes(), timeout, stop, &mut out, &mut err) {
            Outcome::Done(code) => ToolResult::text(self.answer(&out, &err, code, ""), code != 0),
            Outcome::Stopped => {
                // As the runner's shell after a cancellation: gone until a restart.
                self.kill();
                self.terminated = true;
                ToolResult::err(super::stopped("bash"))
            }
            Outcome::TimedOut => {
                self.kill();
                self.terminated = true;
                let end = format!("\ncommand timed out after {}s\n", seconds_g(timeout));
                let text = self.answer(&out, &err, -1, &end);
                ToolResult::err(format!("{}\n{}", if text.is_empty() { NO_OUTPUT } else { &text }, shell_gone()))
            }
            Outcome::Exited(code) => {
                self.kill();
                let text = self.answer(&out, &err, code, "");
                let text = format!("{}\n{SHELL_EXITED}", if text.is_empty() { NO_OUTPUT } else { &text });
                ToolResult::text(text, code != 0)
            }
        }
    }

    /// Drops what background jobs printed since the last call, as the runner's reader does.
    fn drain_between_calls(&mut self) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(r) = self.running.as_mut() else { return };
        let mut chunk = vec![0u8; 65536];
        loop {
            let mut fds =
                [PollFd::new(r.stdout.as_fd(), PollFlags::POLLIN), PollFd::new(r.stderr.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|e| e.contains(PollFlags::POLLIN));
            let (o, e) = (ready(&fds[0]), ready(&fds[1]));
            if !o && !e {
                return;
            }
            if o && !matches!(r.stdout.read(&mut chunk), Ok(n) if n > 0) {
                return;
            }
            if e {
                match r.stderr.read(&mut chunk) {
                    Ok(n) if n > 0 => {
                        if !r.set_up && chunk[..n].contains(&0) {
                            r.set_up = true;
                        }
                    }
                    _ => return,
                }
            }
        }
    }

    /// Reads both streams until both sentinels, the shell's end or the deadline.
    fn collect(
        &mut self,
        marker: &[u8],
        timeout: f64,
        stop: Option<BorrowedFd<'_>>,
        out: &mut Stream,
        err: &mut Stream,
    ) -> Outcome {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.clamp(0.0, 1e9));
        let r = self.running.as_mut().expect("running");
        let mut chunk = vec![0u8; 65536];
        let (mut out_open, mut err_open) = (true, true);
        let mut exited: Option<(i32, Instant)> = self.noted_exit.map(|c| (c, Instant::now() + EXIT_DRAIN));
        loop {
            if let (Some(_), Some(code)) = (out.status, err.status) {
                return Outcome::Done(code);
            }
            let now = Instant::now();
            if now >= deadline {
                return Outcome::TimedOut;
            }
            if let Some((code, until)) = exited {
                if (!out_open && !err_open) || now >= until {
                    self.noted_exit = Some(code);
                    return Outcome::Exited(code);
                }
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            let mut fds = Vec::with_capacity(3);
            if out_open {
                fds.push(PollFd::new(r.stdout.as_fd(), PollFlags::POLLIN));
            }
            if err_open {
                fds.push(PollFd::new(r.stderr.as_fd(), PollFlags::POLLIN));
            }
            if let Some(fd) = stop {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            let ready: Vec<bool> = if fds.is_empty() {
                std::thread::sleep(wait);
                Vec::new()
            } else {
                match poll(&mut fds, PollTimeout::try_from(wait.as_millis().max(1) as i32).unwrap_or(PollTimeout::MAX))
                {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {
                        fds.iter().map(|f| f.revents().is_some_and(|e| !e.is_empty())).collect()
                    }
                    Err(_) => vec![true; fds.len()],
                }
            };
            if stop.is_some() && ready.last() == Some(&true) {
                return Outcome::Stopped;
            }
            let mut k = 0;
            if out_open {
                if ready[k] {
                    match r.stdout.read(&mut chunk) {
                        Ok(0) | Err(_) => out_open = false,
                        Ok(n) => out.add(&chunk[..n], marker),
                    }
                }
                k += 1;
            }
            if err_open && ready[k] {
                match r.stderr.read(&mut chunk) {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => {
                        let mut data = &chunk[..n];
                        if !r.set_up {
                            match data.iter().position(|&b| b == 0) {
                                Some(p) => {
                                    r.set_up = true;
                                    data = &data[p + 1..];
                                }
                                None => data = &[],
                            }
                        }
                        err.add(data, marker);
                    }
                }
            }
            if exited.is_none() {
                exited = match waitpid(r.pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, c)) => Some((c, Instant::now() + EXIT_DRAIN)),
                    Ok(WaitStatus::Signaled(_, s, _)) => Some((128 + s as i32, Instant::now() + EXIT_DRAIN)),
                    _ => None,
                };
            }
        }
    }

    /// The runner's answer for what the two streams held: stdout, a newline, stderr (stderr
    /// first for a failure), cut after `BASH_OUTPUT_LIMIT` code units with the rest saved.
    fn answer(&mut self, out: &Stream, err: &Stream, code: i32, stderr_end: &str) -> String {
        let out_text = String::from_utf8_lossy(&out.head);
        let mut err_text = String::from_utf8_lossy(&err.head).into_owned();
        err_text.push_str(stderr_end);
        let err_newlines = err.newlines() + stderr_end.matches('\n').count();
        let ((first, first_nl), (second, second_nl)) = if code == 0 {
            ((&*out_text, out.newlines()), (err_text.as_str(), err_newlines))
        } else {
            ((err_text.as_str(), err_newlines), (&*out_text, out.newlines()))
        };
        let separator = if err_text.is_empty() { "" } else { "\n" };
        let whole = format!("{first}{separator}{second}");
        let Some(kept) = utf16_prefix(&whole, BASH_OUTPUT_LIMIT) else {
            return strip_ansi(&whole).trim_end_matches('\n').to_owned();
        };
        let cut_lines = 1 + first_nl + separator.len() + second_nl - kept.matches('\n').count();
        let saved = self.save_output(&whole);
        format!("{}\n\n... [{cut_lines} lines truncated] {saved}...", strip_ansi(kept))
    }

    /// Saves a long output whole (its first 32 MiB) to a new file, replacing the last one, and
    /// returns the sentence that names it (empty when it could not be written).
    fn save_output(&mut self, whole: &str) -> String {
        self.remove_saved_output();
        let parent = std::fs::canonicalize(std::env::temp_dir()).unwrap_or_else(|_| PathBuf::from("/tmp"));
        let Some(dir) = (0..100).find_map(|_| {
            let dir = parent.join(format!("bash-output-{}", temp_name(8)));
            std::fs::DirBuilder::new().mode(0o700).create(&dir).ok().map(|()| dir)
        }) else {
            return String::new();
        };
        self.saved_output = Some(dir.clone());
        let file = dir.join(format!("tmp{}.txt", temp_name(8)));
        let (data, what) = match whole.len() > BASH_SAVED_OUTPUT_BYTES {
            true => {
                let mut end = BASH_SAVED_OUTPUT_BYTES;
                while !whole.is_char_boundary(end) {
                    end -= 1;
                }
                (&whole[..end], format!("First {} MiB of output", BASH_SAVED_OUTPUT_BYTES >> 20))
            }
            false => (whole, "Full output".to_owned()),
        };
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&file)
            .and_then(|mut f| f.write_all(data.as_bytes()));
        if written.is_err() {
            let _ = std::fs::remove_file(&file);
            return String::new();
        }
        format!("{what} saved to: {} — use read with view_range to read specific portions. ", file.display())
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        self.close();
    }
}

/// SIGKILLs every descendant of this process except the processes in `spare` and what they
/// started, in rounds until none is left (a process can fork while the others die).
fn kill_descendants_except(spare: &[i32]) {
    let me = std::process::id() as i32;
    for _ in 0..5 {
        let parent = process_parents();
        let mut killed = false;
        for &pid in parent.keys() {
            if pid != me && descends(&parent, pid, me, spare) {
                killed |= kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok();
            }
        }
        if !killed {
            return;
        }
    }
}

/// Every visible process with its parent: the fourth field of /proc/PID/stat, after the
/// command in parentheses.
fn process_parents() -> std::collections::HashMap<i32, i32> {
    let mut parent = std::collections::HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return parent };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let ppid = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|st| st.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok()))
            .unwrap_or(0);
        parent.insert(pid, ppid);
    }
    parent
}

/// Whether `pid` descends from `root` through no process in `spare`.
fn descends(parent: &std::collections::HashMap<i32, i32>, mut pid: i32, root: i32, spare: &[i32]) -> bool {
    for _ in 0..parent.len() {
        if spare.contains(&pid) {
            return false;
        }
        match parent.get(&pid) {
            Some(&p) if p == root => return true,
            Some(&p) if p > 0 => pid = p,
            _ => return false,
        }
    }
    false
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ (std::process::id() as u64) << 32;
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_print_as_python_g() {
        for (x, want) in [(0.3, "0.3"), (295.0, "295"), (1.5, "1.5"), (0.001, "0.001"), (294.999, "294.999")] {
            assert_eq!(seconds_g(x), want);
        }
    }

    #[test]
    fn the_cut_counts_utf16_units_and_drops_a_split_pair() {
        assert_eq!(utf16_prefix("abc", 3), None);
        assert_eq!(utf16_prefix("abcd", 3), Some("abc"));
        assert_eq!(utf16_prefix("a🎉b", 2), Some("a"));
        assert_eq!(utf16_prefix("a🎉b", 3), Some("a🎉"));
    }

    #[test]
    fn a_stream_finds_its_sentinel_across_chunks_and_drops_the_newline_before_it() {
        let s = b"__STK_CMD_0123_DONE__";
        let mut st = Stream::new();
        st.add(b"hello\n\n__STK_CMD_01", s);
        assert_eq!(st.status, None);
        st.add(b"23_DONE__7\nlater", s);
        assert_eq!(st.status, Some(7));
        assert_eq!(st.head, b"hello\n");
        assert_eq!(st.newlines(), 1);
        // The status line arriving after the sentinel, a digit at a time.
        let mut st = Stream::new();
        st.add(b"out\n__STK_CMD_0123_DONE__1", s);
        st.add(b"2", s);
        assert_eq!(st.status, None);
        st.add(b"7\n", s);
        assert_eq!(st.status, Some(127));
        assert_eq!(st.head, b"out");
    }
}
