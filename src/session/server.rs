//! The session's side inside the jail: PID 1 serves tool calls from the supervisor.
//!
//! PID 1 runs `bash` calls itself, through a persistent shell for each session thread (the
//! primary thread's and each subagent's, as the official runner keeps them), and hands the file tools to a
//! helper process it forks (same landlock domain, seccomp filter and uid — the helper is a fork
//! of this confined process). A helper that crashes costs at most the call it was running; the
//! next call gets a new one. PID 1 also reaps every orphan the shell leaves behind.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::frame;
use super::{Request, Response};
use crate::tools::bash::{KillScope, Shell};
use crate::tools::{run_file_tool, Ctx, ToolResult};

struct Helper {
    pid: Pid,
    chan: UnixStream,
}

impl Helper {
    fn spawn(ctx: &Ctx) -> std::io::Result<Helper> {
        let (ours, theirs) = UnixStream::pair()?;
        // SAFETY: PID 1 of the jail is single-threaded, so the forked helper starts with no
        // lock held by another thread.
        match unsafe { fork() }.map_err(std::io::Error::from)? {
            ForkResult::Child => {
                drop(ours);
                let code = helper_main(theirs, ctx);
                // SAFETY: leave without running destructors that belong to PID 1.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => Ok(Helper { pid: child, chan: ours }),
        }
    }
}

fn helper_main(mut chan: UnixStream, ctx: &Ctx) -> i32 {
    loop {
        let req: Request = match frame::read(&mut chan) {
            Ok(Some(r)) => r,
            _ => return 0,
        };
        let ctx = Ctx { saved_outputs: req.saved_outputs, ..ctx.clone() };
        let result = run_file_tool(&ctx, &req.name, &req.input);
        if frame::write(&mut chan, &Response::new(req.id, result)).is_err() {
            return 0;
        }
    }
}

struct Server {
    /// One shell per session thread; `None` is the primary thread.
    shells: HashMap<Option<String>, Shell>,
    env: Vec<(String, String)>,
    scope: KillScope,
    helper: Option<Helper>,
    tools: Ctx,
}

impl Server {
    /// Collects exited children: orphans of the shells, the shells, the helper.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(st) => {
                    let (pid, code) = match st {
                        WaitStatus::Exited(p, c) => (p, c),
                        WaitStatus::Signaled(p, s, _) => (p, 128 + s as i32),
                        _ => continue,
                    };
                    for shell in self.shells.values_mut() {
                        if Some(pid.as_raw()) == shell.pid() {
                            shell.note_exit(code);
                        }
                    }
                    if self.helper.as_ref().is_some_and(|h| h.pid == pid) {
                        self.helper = None;
                    }
                }
            }
        }
    }

    /// A `bash` call, in its thread's shell. A kill after a timeout spares the helper and the
    /// other threads' shells with everything they started.
    fn bash(&mut self, req: &Request) -> ToolResult {
        let mut spare: Vec<i32> = self.helper.as_ref().map(|h| h.pid.as_raw()).into_iter().collect();
        spare.extend(self.shells.iter().filter(|(t, _)| **t != req.thread).filter_map(|(_, sh)| sh.pid()));
        let (cwd, env, scope) = (self.tools.cwd.clone(), &self.env, self.scope);
        let shell = self.shells.entry(req.thread.clone()).or_insert_with(|| Shell::new(cwd, env.clone(), scope));
        shell.spare = spare;
        shell.call(&req.input)
    }

    fn discard_helper(&mut self) {
        if let Some(h) = self.helper.take() {
            let _ = nix::sys::signal::kill(h.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(h.pid, None);
        }
    }

    fn helper(&mut self) -> std::io::Result<&mut Helper> {
        if self.helper.is_none() {
            let h = Helper::spawn(&self.tools)?;
            self.helper = Some(h);
        }
        Ok(self.helper.as_mut().expect("spawned"))
    }

    fn file_tool(&mut self, req: &Request) -> ToolResult {
        let saved = self.shells.values().filter_map(|sh| sh.saved_output_dir()).map(Into::into).collect();
        let req = &Request { saved_outputs: saved, ..req.clone() };
        let h = match self.helper() {
            Ok(h) => h,
            Err(e) => return ToolResult::err(format!("could not start the file tool helper: {e}")),
        };
        if frame::write(&mut h.chan, req).is_err() {
            // The helper was already gone: the request never reached it, so it is safe to
            // hand it to a new one.
            self.discard_helper();
            let resent = self.helper().and_then(|h| frame::write(&mut h.chan, req));
            if let Err(e) = resent {
                return ToolResult::err(format!("could not start the file tool helper: {e}"));
            }
        }
        let h = self.helper.as_mut().expect("helper present");
        let got: std::io::Result<Option<Response>> = frame::read(&mut h.chan);
        match got {
            Ok(Some(r)) => ToolResult { content: r.content, is_error: r.is_error },
            _ => {
                // The helper died mid-call. Report how, and start afresh on the next call.
                let pid = h.pid;
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let how = match waitpid(pid, None) {
                    Ok(WaitStatus::Signaled(_, s, _)) => format!("was killed by {s}"),
                    Ok(WaitStatus::Exited(_, c)) => format!("exited with status {c}"),
                    _ => "died".into(),
                };
                self.helper = None;
                ToolResult::err(format!(
                    "the file tool helper {how} while running `{}`; the session continues and the next call gets a new helper",
                    req.name
                ))
            }
        }
    }
}

/// PID 1 of a session jail (`jail::Payload::Session`): the tools work in /workspace, under the
/// policy's path rule, and a timed-out command's leftovers are found in the whole pid namespace.
pub(crate) fn serve_in_jail(channel: &OwnedFd, env: &[(String, String)], policy: &crate::policy::Policy) -> i32 {
    let tools = Ctx::new(crate::jail::mounts::WORKSPACE, policy.tools.confine_paths);
    serve(channel, env, &tools, KillScope::Namespace)
}

/// PID 1's loop. Returns the exit code when the supervisor closes the channel. `tools` holds
/// the tools' working directory (/workspace in a jail) and their path rule.
pub fn serve(channel: &OwnedFd, env: &[(String, String)], tools: &Ctx, scope: KillScope) -> i32 {
    // Nothing in the jail needs the supervisor's stdio.
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which this process owns.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let mut chan = match channel.try_clone() {
        Ok(fd) => UnixStream::from(fd),
        Err(_) => return 1,
    };
    let mut server = Server { shells: HashMap::new(), env: env.to_vec(), scope, helper: None, tools: tools.clone() };
    while let Ok(Some(req)) = frame::read::<_, Request>(&mut chan) {
        server.reap();
        let result = if req.name == "bash" { server.bash(&req) } else { server.file_tool(&req) };
        server.reap();
        if frame::write(&mut chan, &Response::new(req.id, result)).is_err() {
            break;
        }
    }
    for shell in server.shells.values_mut() {
        shell.kill();
    }
    0
}
