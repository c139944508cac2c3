//! One session thread's tools, in a process of their own inside the jail.
//!
//! The jail's PID 1 forks a lane for each session thread that makes a call (the primary thread's
//! and each subagent's), so calls of different threads can run at the same time while the calls
//! of one thread run in order, in that thread's shell. A lane is a fork of the confined PID 1:
//! same landlock domain, seccomp filter and uid. It runs `bash` in its shell and hands the file
//! tools to a helper it forks, so a crash there costs at most the call it was running.
//!
//! A lane is the subreaper of what its shell starts: a command's orphans stay its descendants,
//! so a timeout or a stop kills exactly this thread's processes and leaves the other threads'.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use super::frame;
use super::{Inbound, Request, Response};
use crate::tools::bash::{KillScope, Shell};
use crate::tools::{answer_file_tool, stopped, Ctx, ToolResult};

/// PID 1's handle on a lane.
pub(super) struct Lane {
    pub pid: Pid,
    pub chan: UnixStream,
}

impl Lane {
    /// Forks a lane. Only its own end of the new channel stays open in it.
    pub(super) fn spawn(tools: &Ctx, env: &[(String, String)], scope: KillScope) -> std::io::Result<Lane> {
        let (ours, theirs) = UnixStream::pair()?;
        // SAFETY: the jail's PID 1 is single-threaded, so the forked lane starts with no lock
        // held by another thread.
        match unsafe { fork() }.map_err(std::io::Error::from)? {
            ForkResult::Child => {
                // Closed below with every other inherited descriptor (the supervisor's channel,
                // the other lanes'); never dropped, since the lane leaves with _exit.
                std::mem::forget(ours);
                // SAFETY: nothing in this process uses a descriptor other than `theirs` again:
                // the objects that own the others live in PID 1's frames, which _exit abandons.
                let code = match unsafe { crate::util::close_all_but(&[theirs.as_raw_fd()]) } {
                    Ok(()) => lane_main(theirs, tools, env, scope),
                    Err(_) => 1,
                };
                // SAFETY: leave without running destructors that belong to PID 1.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => Ok(Lane { pid: child, chan: ours }),
        }
    }
}

struct Helper {
    pid: Pid,
    chan: UnixStream,
}

impl Helper {
    fn spawn(ctx: &Ctx) -> std::io::Result<Helper> {
        let (ours, theirs) = UnixStream::pair()?;
        // SAFETY: a lane is single-threaded, so the forked helper starts with no lock held by
        // another thread.
        match unsafe { fork() }.map_err(std::io::Error::from)? {
            ForkResult::Child => {
                // Closed below with every other descriptor the lane holds (its channel to PID 1,
                // its shell's pipes): the helper, which handles whatever paths the agent names,
                // keeps only its own channel.
                std::mem::forget(ours);
                // SAFETY: nothing in this process uses another descriptor again: the objects that
                // own them live in the lane's frames, which _exit abandons.
                let code = match unsafe { crate::util::close_all_but(&[theirs.as_raw_fd()]) } {
                    Ok(()) => helper_main(theirs, ctx),
                    Err(_) => 1,
                };
                // SAFETY: leave without running destructors that belong to the lane.
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
        let answer = answer_file_tool(&ctx, &req.name, &req.input);
        if frame::write(&mut chan, &Response::of(req.id, answer)).is_err() {
            return 0;
        }
    }
}

struct LaneState {
    shell: Shell,
    helper: Option<Helper>,
    tools: Ctx,
}

/// What became of a call handed to the helper.
enum HelperAnswer {
    Done(ToolResult, Option<Box<crate::tools::MemoryWrite>>),
    /// The lane's channel turned readable: a stop, or PID 1 is gone.
    Stopped,
}

impl LaneState {
    /// Collects exited children: the shell, the helper, and the orphans of the shell's commands.
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
                    if Some(pid.as_raw()) == self.shell.pid() {
                        self.shell.note_exit(code);
                    }
                    if self.helper.as_ref().is_some_and(|h| h.pid == pid) {
                        self.helper = None;
                    }
                }
            }
        }
    }

    fn discard_helper(&mut self) {
        if let Some(h) = self.helper.take() {
            let _ = kill(h.pid, Signal::SIGKILL);
            let _ = waitpid(h.pid, None);
        }
    }

    fn helper(&mut self) -> std::io::Result<&mut Helper> {
        if self.helper.is_none() {
            self.helper = Some(Helper::spawn(&self.tools)?);
        }
        Ok(self.helper.as_mut().expect("spawned"))
    }

    fn bash(&mut self, req: &Request, chan: &UnixStream) -> ToolResult {
        self.shell.spare = self.helper.as_ref().map(|h| h.pid.as_raw()).into_iter().collect();
        self.shell.call_until(&req.input, Some(chan.as_fd()))
    }

    /// A file tool's result, or the memory write it leaves to the worker.
    fn file_tool(&mut self, req: &Request, chan: &UnixStream) -> (ToolResult, Option<Box<crate::tools::MemoryWrite>>) {
        match self.file_tool_answer(req, chan) {
            Ok((r, m)) => (r, m),
            Err(r) => (r, None),
        }
    }

    fn file_tool_answer(
        &mut self,
        req: &Request,
        chan: &UnixStream,
    ) -> Result<(ToolResult, Option<Box<crate::tools::MemoryWrite>>), ToolResult> {
        let h = match self.helper() {
            Ok(h) => h,
            Err(e) => return Err(ToolResult::err(format!("could not start the file tool helper: {e}"))),
        };
        if frame::write(&mut h.chan, req).is_err() {
            // The helper was already gone: the request never reached it, so it is safe to
            // hand it to a new one.
            self.discard_helper();
            let resent = self.helper().and_then(|h| frame::write(&mut h.chan, req));
            if let Err(e) = resent {
                return Err(ToolResult::err(format!("could not start the file tool helper: {e}")));
            }
        }
        match self.helper_answer(chan) {
            Ok(HelperAnswer::Done(r, m)) => Ok((r, m)),
            Ok(HelperAnswer::Stopped) => {
                // What the helper was doing is cut short where it stands.
                self.discard_helper();
                Err(ToolResult::err(stopped(&req.name)))
            }
            Err(()) => {
                // The helper died mid-call. Report how, and start afresh on the next call.
                let pid = self.helper.take().expect("helper present").pid;
                let _ = kill(pid, Signal::SIGKILL);
                let how = match waitpid(pid, None) {
                    Ok(WaitStatus::Signaled(_, s, _)) => format!("was killed by {s}"),
                    Ok(WaitStatus::Exited(_, c)) => format!("exited with status {c}"),
                    _ => "died".into(),
                };
                Err(ToolResult::err(format!(
                    "the file tool helper {how} while running `{}`; the session continues and the next call gets a new helper",
                    req.name
                )))
            }
        }
    }

    /// Waits for the helper's answer or for the lane's channel, whichever comes first.
    fn helper_answer(&mut self, chan: &UnixStream) -> Result<HelperAnswer, ()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let h = self.helper.as_mut().ok_or(())?;
        loop {
            let mut fds =
                [PollFd::new(h.chan.as_fd(), PollFlags::POLLIN), PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Err(()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|e| !e.is_empty());
            if ready(&fds[0]) {
                return match frame::read::<_, Response>(&mut h.chan) {
                    Ok(Some(r)) => {
                        Ok(HelperAnswer::Done(ToolResult { content: r.content, is_error: r.is_error }, r.memory_write))
                    }
                    _ => Err(()),
                };
            }
            if ready(&fds[1]) {
                return Ok(HelperAnswer::Stopped);
            }
        }
    }
}

/// A lane's loop: one call at a time from PID 1, each answered with the directory of the
/// shell's last saved output. A stop that arrives between calls came too late and is dropped.
fn lane_main(mut chan: UnixStream, tools: &Ctx, env: &[(String, String)], scope: KillScope) -> i32 {
    if scope == KillScope::Descendants {
        // Without it a command's orphans go to PID 1, and a timeout or a stop leaves them running.
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
    let mut lane =
        LaneState { shell: Shell::new(tools.cwd.clone(), env.to_vec(), scope), helper: None, tools: tools.clone() };
    loop {
        let req = match frame::read::<_, Inbound>(&mut chan) {
            Ok(Some(Inbound::Call(r))) => r,
            Ok(Some(Inbound::Stop { .. })) => continue,
            _ => break,
        };
        lane.reap();
        let (result, memory_write) =
            if req.name == "bash" { (lane.bash(&req, &chan), None) } else { lane.file_tool(&req, &chan) };
        lane.reap();
        let mut resp = Response::new(req.id, result);
        resp.memory_write = memory_write;
        resp.saved_output = lane.shell.saved_output_dir().map(Into::into);
        if frame::write(&mut chan, &resp).is_err() {
            break;
        }
    }
    lane.shell.kill();
    lane.discard_helper();
    0
}
