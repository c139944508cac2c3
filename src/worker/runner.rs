//! A session's jail, driven from the worker. Jails must be built by a single-threaded process
//! and the worker is a tokio runtime, so each session runs `stockade session --announce` as a
//! child with an empty environment; the child builds the jail and relays tool calls as JSON
//! lines. The child dies with the worker (PDEATHSIG), and the jail with the child.
//!
//! Several calls can be in flight (one per session thread): each is sent as it starts, and the
//! answers come back on one channel as they finish, tagged with their calls' ids.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::session::{Request, Response};
use crate::tools::ToolResult;

/// How a session subprocess is started.
#[derive(Debug, Clone)]
pub(crate) struct RunnerConfig {
    /// The `stockade` binary (normally /proc/self/exe).
    pub exe: PathBuf,
    /// `--policy` for the jail: a built-in name or a file.
    pub policy: String,
    pub log_json: bool,
    /// The open-file limit the worker was started with, before it raised its own (see
    /// `worker::raise_open_files`): what a session's process gets back, so a jail whose policy
    /// sets no `limits.nofile` inherits the operator's limit, not the worker's.
    pub nofile: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RunnerError {
    #[error("starting the session process: {0}")]
    Spawn(std::io::Error),
    #[error("the session jail could not be built (exit status {0}); its error is in the log")]
    Build(String),
    #[error("the session jail is gone: {0}")]
    Gone(String),
}

/// What the jail says: a call's answer, or that it is gone.
pub(crate) enum Answer {
    /// A call's result; for a `write` or `edit` into a memory store's folder, the change the
    /// worker must save and make (`result` is empty then).
    Result {
        id: String,
        result: ToolResult,
        memory_write: Option<Box<crate::tools::MemoryWrite>>,
    },
    Gone(String),
}

pub(crate) struct SessionProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The answers, as they come; the jail's end is the last.
    pub answers: mpsc::UnboundedReceiver<Answer>,
    /// The jail's init, as seen from the host.
    pub jail_pid: i32,
    pub build_time: Duration,
}

/// The first thing a session process the worker started does (`stockade session --worker-pid`):
/// it leaves the worker's session (a worker started from a terminal must not lend it to its
/// jails), takes back the open-file limit the worker was started with, closes every descriptor
/// but stdio (the worker's, inherited from whoever started it, stay out), and dies with the
/// worker — or exits at once if the worker is already gone.
pub fn become_session_process(worker: i32, nofile: Option<(u64, u64)>) -> Result<(), String> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    if nix::unistd::getppid().as_raw() != worker {
        return Err(format!("the worker (pid {worker}) is gone"));
    }
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    if let Some((soft, hard)) = nofile {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
            .map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    }
    // SAFETY: nothing in this process holds a descriptor above stderr yet: it is the first
    // thing the session process does after parsing its arguments.
    unsafe { crate::util::close_range(3, u32::MAX, 0) }.map_err(|e| format!("close_range: {e}"))
}

impl SessionProcess {
    pub(crate) async fn start(
        cfg: &RunnerConfig,
        workspace: &Path,
        outputs: &Path,
        narrow: Option<&str>,
        trail: &Path,
        memory: &[(std::path::PathBuf, std::path::PathBuf, bool)],
    ) -> Result<SessionProcess, RunnerError> {
        let t = Instant::now();
        let mut cmd = Command::new(&cfg.exe);
        if cfg.log_json {
            cmd.args(["--log", "json"]);
        }
        cmd.args(["session", "--announce", "--policy", &cfg.policy, "--workspace"])
            .arg(workspace)
            .arg("--outputs")
            .arg(outputs)
            .args(narrow.map(|n| ["--narrow", n]).into_iter().flatten())
            .args(memory.iter().flat_map(|(host, jail, ro)| {
                let spec = format!("{}:{}{}", host.display(), jail.display(), if *ro { ":ro" } else { "" });
                ["--memory-store".to_owned(), spec]
            }))
            // The jail's execs and connections; the worker records the calls itself.
            .arg("--trail")
            .arg(trail)
            .arg("--trail-no-calls")
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // What the session process must be (a session of its own, the operator's open-file
        // limit, no descriptor of the worker's, dead with the worker) it makes itself at its
        // start (`become_session_process`): with no code to run between fork and exec, the
        // spawn is a vfork-style posix_spawn, whose cost does not grow with the worker's memory
        // as a fork's page-table copy does with every live session.
        cmd.arg("--worker-pid").arg(std::process::id().to_string());
        if let Some((soft, hard)) = cfg.nofile {
            cmd.arg("--nofile").arg(format!("{soft}:{hard}"));
        }
        let mut child = super::spawner::spawn(cmd).await.map_err(RunnerError::Spawn)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped").into_owned_fd().map_err(RunnerError::Spawn)?;
        let mut stdout = Lines::new(stdout).map_err(RunnerError::Spawn)?;
        let ready = match stdout.next_line().await {
            Ok(Some(l)) => serde_json::from_str::<serde_json::Value>(&l).ok(),
            _ => None,
        };
        let Some(pid) = ready.as_ref().and_then(|r| r.get("pid")).and_then(|p| p.as_i64()) else {
            let status = child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            return Err(RunnerError::Build(status));
        };
        let (tx, answers) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let why = loop {
                match stdout.next_line().await {
                    Ok(Some(l)) => match serde_json::from_str::<Response>(&l) {
                        Ok(Response { id: Some(id), content, is_error, memory_write, .. }) => {
                            let result = ToolResult { content, is_error };
                            let _ = tx.send(Answer::Result { id, result, memory_write });
                        }
                        Ok(_) => break "a result without an id".to_owned(),
                        Err(e) => break format!("unreadable result: {e}"),
                    },
                    Ok(None) => break "exited".to_owned(),
                    Err(e) => break e.to_string(),
                }
            };
            let _ = tx.send(Answer::Gone(why));
        });
        Ok(SessionProcess { child, stdin, answers, jail_pid: pid as i32, build_time: t.elapsed() })
    }

    async fn send(&mut self, line: &[u8]) -> Result<(), RunnerError> {
        let gone = |e: String| RunnerError::Gone(e);
        let stdin = self.stdin.as_mut().ok_or_else(|| gone("already closed".into()))?;
        stdin.write_all(line).await.map_err(|e| gone(e.to_string()))?;
        stdin.flush().await.map_err(|e| gone(e.to_string()))
    }

    /// Starts one tool call, in its session thread's shell; its answer comes on `answers`.
    /// `Err` means the jail is gone: the session needs a new one.
    pub(crate) async fn start_call(
        &mut self,
        thread: Option<&str>,
        id: &str,
        name: &str,
        input: &serde_json::Value,
    ) -> Result<(), RunnerError> {
        let mut line = serde_json::to_vec(&Request::new(thread, id, name, input)).expect("requests serialise");
        line.push(b'\n');
        self.send(&line).await
    }

    /// Stops a running call: it is answered at once with the runner's text for a stopped call.
    pub(crate) async fn stop_call(&mut self, id: &str) -> Result<(), RunnerError> {
        let mut line = serde_json::to_vec(&serde_json::json!({ "stop": id })).expect("serialises");
        line.push(b'\n');
        self.send(&line).await
    }

    /// Kills the jail at once (the supervisor's death takes the jail with it).
    pub(crate) async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        // The killed supervisor could not remove the jail's cgroup.
        tokio::time::sleep(Duration::from_millis(50)).await;
        tokio::task::spawn_blocking(crate::jail::cgroups::remove_stale_all).await.ok();
    }

    /// Ends the session cleanly: EOF makes the jail's init kill everything and exit; the
    /// supervisor removes the cgroup. Killed if that takes longer than `grace`.
    pub(crate) async fn end(mut self, grace: Duration) {
        drop(self.stdin.take());
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => self.kill().await,
        }
    }
}

/// The session process's answers, a JSON line each, read only when there is something to read:
/// an idle session's reader holds no buffer (a `BufReader` held 8 KiB per session for its whole
/// life), and what a read brings is kept only until its lines are taken.
struct Lines {
    pipe: tokio::net::unix::pipe::Receiver,
    pending: Vec<u8>,
    /// How far `pending` is known to hold no newline: a long answer read in many pieces is
    /// searched once, not once per piece.
    scanned: usize,
}

impl Lines {
    /// The largest read at once.
    const CHUNK: usize = 64 << 10;

    fn new(fd: std::os::fd::OwnedFd) -> std::io::Result<Lines> {
        Ok(Lines { pipe: tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?, pending: Vec::new(), scanned: 0 })
    }

    /// The next line without its newline; at the end, what is left (a last line without one),
    /// then `None`.
    async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(i) = self.pending[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + i;
                let rest = self.pending.split_off(end + 1);
                let mut line = std::mem::replace(&mut self.pending, rest);
                line.pop();
                if self.pending.is_empty() {
                    // The split left the read's capacity here: an idle reader holds none.
                    self.pending = Vec::new();
                }
                self.scanned = 0;
                return Self::text(line).map(Some);
            }
            self.scanned = self.pending.len();
            self.pipe.readable().await?;
            self.pending.reserve(Self::CHUNK);
            match self.pipe.try_read_buf(&mut self.pending) {
                Ok(0) if self.pending.is_empty() => return Ok(None),
                Ok(0) => {
                    self.scanned = 0;
                    return Self::text(std::mem::take(&mut self.pending)).map(Some);
                }
                Ok(_) => {}
                // A readiness with nothing to read: the reserved room is not kept while idle.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.pending.is_empty() {
                        self.pending = Vec::new();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn text(line: Vec<u8>) -> std::io::Result<String> {
        String::from_utf8(line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_come_whole_from_any_pieces_and_an_idle_reader_keeps_no_buffer() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (r, w) = nix::unistd::pipe().unwrap();
            let mut lines = Lines::new(r).unwrap();
            let mut w = std::fs::File::from(w);
            let long = "x".repeat(300 << 10);
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let writer = std::thread::spawn(move || {
                w.write_all(b"{\"a\":1}\n{\"b\"").unwrap();
                std::thread::sleep(Duration::from_millis(50));
                w.write_all(b":2}\n").unwrap();
                wait.recv().unwrap();
                // Longer than a read: in many pieces.
                w.write_all(long.as_bytes()).unwrap();
                w.write_all(b"\nlast").unwrap();
            });
            assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("{\"a\":1}"));
            assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("{\"b\":2}"));
            assert_eq!(lines.pending.capacity(), 0, "a reader with nothing pending holds no buffer");
            go.send(()).unwrap();
            assert_eq!(lines.next_line().await.unwrap().map(|l| l.len()), Some(300 << 10));
            writer.join().unwrap();
            assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("last"), "a last line without a newline");
            assert_eq!(lines.next_line().await.unwrap(), None);
        });
    }
}
