//! The session's side inside the jail: PID 1 routes tool calls from the supervisor to lanes.
//!
//! Each session thread (the primary thread and each subagent, as the official runner keeps
//! them) gets a lane, a process PID 1 forks that holds the thread's shell and runs its calls one
//! at a time (see `lane`). PID 1 only passes frames: a call to its thread's lane (queued while
//! that lane is busy), a stop to the lane running that call, and every answer back to the
//! supervisor as it comes, so calls of different threads overlap. It also reaps whatever is
//! orphaned to it and answers for a lane that dies mid-call.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use super::frame;
use super::lane::Lane;
use super::{Inbound, Request, Response};
use crate::tools::bash::KillScope;
use crate::tools::{Ctx, ToolResult};

type Thread = Option<String>;

/// A lane as PID 1 tracks it.
struct Tracked {
    lane: Lane,
    /// The call it runs: id and tool.
    busy: Option<(String, String)>,
    /// Calls of its thread that arrived while it was busy, in order.
    queue: VecDeque<Request>,
    /// How it ended, once reaped.
    status: Option<WaitStatus>,
}

struct Router {
    lanes: HashMap<Thread, Tracked>,
    /// Where each thread's shell saved its last long output: `read` and `grep` of any thread
    /// may open it.
    saved: HashMap<Thread, PathBuf>,
    env: Vec<(String, String)>,
    scope: KillScope,
    tools: Ctx,
}

impl Router {
    /// Collects exited children: lanes (whose status is kept for the answer about them) and
    /// the orphans of a lane that died.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(st) => {
                    let Some(pid) = st.pid() else { continue };
                    if let Some(t) = self.lanes.values_mut().find(|t| t.lane.pid == pid) {
                        t.status = Some(st);
                    }
                }
            }
        }
    }

    /// Takes a call: to its lane now, or into the lane's queue while it runs another.
    fn dispatch(&mut self, req: Request, out: &mut UnixStream) -> std::io::Result<()> {
        if let Some(t) = self.lanes.get_mut(&req.thread) {
            if t.busy.is_some() {
                t.queue.push_back(req);
                return Ok(());
            }
        }
        self.start(req, out)
    }

    /// Hands a call to its thread's lane, forking one when there is none (or a new one when
    /// the old one turns out to be gone before it read the call).
    fn start(&mut self, req: Request, out: &mut UnixStream) -> std::io::Result<()> {
        let thread = req.thread.clone();
        let req = Request { saved_outputs: self.saved.values().cloned().collect(), ..req };
        for attempt in 0..2 {
            if !self.lanes.contains_key(&thread) {
                match Lane::spawn(&self.tools, &self.env, self.scope) {
                    Ok(lane) => {
                        let t = Tracked { lane, busy: None, queue: VecDeque::new(), status: None };
                        self.lanes.insert(thread.clone(), t);
                    }
                    Err(e) => {
                        let r = ToolResult::err(format!("could not start a process for the session thread: {e}"));
                        return frame::write(out, &Response::new(req.id, r));
                    }
                }
            }
            let t = self.lanes.get_mut(&thread).expect("inserted above");
            if frame::write(&mut t.lane.chan, &Inbound::Call(req.clone())).is_ok() {
                t.busy = Some((req.id.clone(), req.name.clone()));
                return Ok(());
            }
            // The lane died between calls (it had nothing queued): nothing of this call
            // reached it, so a new lane may take it.
            self.bury(&thread);
            if attempt == 1 {
                let r = ToolResult::err("could not hand the call to a process for the session thread");
                frame::write(out, &Response::new(req.id.clone(), r))?;
            }
        }
        Ok(())
    }

    /// Passes a stop to the lane running that call. A call still queued is answered at once.
    fn stop(&mut self, id: &str, out: &mut UnixStream) -> std::io::Result<()> {
        for t in self.lanes.values_mut() {
            if t.busy.as_ref().is_some_and(|(b, _)| b == id) {
                // A lane that already answered reads it as a late stop and drops it.
                let _ = frame::write(&mut t.lane.chan, &Inbound::Stop { stop: id.to_owned() });
                return Ok(());
            }
            if let Some(at) = t.queue.iter().position(|r| r.id == id) {
                let req = t.queue.remove(at).expect("found");
                return frame::write(out, &Response::new(req.id, ToolResult::err(crate::tools::stopped(&req.name))));
            }
        }
        Ok(())
    }

    /// A lane's answer, or its end: passed on, and the lane's next queued call started.
    fn lane_spoke(&mut self, thread: &Thread, out: &mut UnixStream) -> std::io::Result<()> {
        let t = self.lanes.get_mut(thread).expect("a lane being read");
        let queue = match frame::read::<_, Response>(&mut t.lane.chan) {
            Ok(Some(mut resp)) => {
                if t.busy.as_ref().map(|(id, _)| id) != resp.id.as_ref() {
                    // Not an answer to the call it was given: a lane gone wrong is replaced.
                    let _ = kill(t.lane.pid, Signal::SIGKILL);
                    return self.lane_died(thread, out);
                }
                t.busy = None;
                match resp.saved_output.take() {
                    Some(dir) => self.saved.insert(thread.clone(), dir),
                    None => self.saved.remove(thread),
                };
                frame::write(out, &resp)?;
                let t = self.lanes.get_mut(thread).expect("still there");
                std::mem::take(&mut t.queue)
            }
            _ => return self.lane_died(thread, out),
        };
        self.restart_queue(thread, queue, out)
    }

    /// A lane died: its call gets an answer saying how, and its thread's queue a new lane.
    fn lane_died(&mut self, thread: &Thread, out: &mut UnixStream) -> std::io::Result<()> {
        let t = self.lanes.get_mut(thread).expect("a lane being read");
        let busy = t.busy.take();
        let queue = std::mem::take(&mut t.queue);
        let how = self.bury(thread);
        if let Some((id, name)) = busy {
            let r = ToolResult::err(format!(
                "the session thread's tool process {how} while running `{name}`; the session continues, and the \
                 thread's next call starts a new shell"
            ));
            frame::write(out, &Response::new(id, r))?;
        }
        self.restart_queue(thread, queue, out)
    }

    fn restart_queue(
        &mut self,
        thread: &Thread,
        mut queue: VecDeque<Request>,
        out: &mut UnixStream,
    ) -> std::io::Result<()> {
        let Some(next) = queue.pop_front() else { return Ok(()) };
        self.start(next, out)?;
        if let Some(t) = self.lanes.get_mut(thread) {
            t.queue = queue;
        } else {
            // Not even a new lane could be had: every waiting call is told so.
            for req in queue {
                let r = ToolResult::err("could not start a process for the session thread");
                frame::write(out, &Response::new(req.id, r))?;
            }
        }
        Ok(())
    }

    /// Kills and collects a lane; says how it had ended.
    fn bury(&mut self, thread: &Thread) -> String {
        let Some(t) = self.lanes.remove(thread) else { return "died".into() };
        self.saved.remove(thread);
        let _ = kill(t.lane.pid, Signal::SIGKILL);
        let status = t.status.or_else(|| waitpid(t.lane.pid, None).ok());
        match status {
            Some(WaitStatus::Signaled(_, s, _)) => format!("was killed by {s}"),
            Some(WaitStatus::Exited(_, c)) => format!("exited with status {c}"),
            _ => "died".into(),
        }
    }
}

/// PID 1 of a session jail (`jail::Payload::Session`): the tools work in /workspace, under the
/// policy's path rule, and a timed-out or stopped command's leftovers are found among the
/// descendants of its thread's lane.
pub(crate) fn serve_in_jail(channel: &OwnedFd, env: &[(String, String)], policy: &crate::policy::Policy) -> i32 {
    let tools = Ctx {
        memory: policy.tools.memory.clone(),
        ..Ctx::new(crate::jail::mounts::WORKSPACE, policy.tools.confine_paths)
    };
    serve(channel, env, &tools, KillScope::Descendants)
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
    let mut router =
        Router { lanes: HashMap::new(), saved: HashMap::new(), env: env.to_vec(), scope, tools: tools.clone() };
    'serve: loop {
        router.reap();
        let threads: Vec<Thread> = router.lanes.keys().cloned().collect();
        let (supervisor, ready) = {
            let mut fds = vec![PollFd::new(chan.as_fd(), PollFlags::POLLIN)];
            fds.extend(threads.iter().map(|t| PollFd::new(router.lanes[t].lane.chan.as_fd(), PollFlags::POLLIN)));
            // No timer: an idle session costs nothing. What is orphaned to PID 1 (the children of
            // a lane that died) is reaped at the next call.
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|e| !e.is_empty());
            (ready(&fds[0]), fds[1..].iter().map(ready).collect::<Vec<_>>())
        };
        for (thread, _) in threads.iter().zip(ready).filter(|(_, r)| *r) {
            if router.lane_spoke(thread, &mut chan).is_err() {
                break 'serve;
            }
        }
        if supervisor {
            let r = match frame::read::<_, Inbound>(&mut chan) {
                Ok(Some(Inbound::Call(req))) => router.dispatch(req, &mut chan),
                Ok(Some(Inbound::Stop { stop })) => router.stop(&stop, &mut chan),
                _ => break,
            };
            if r.is_err() {
                break;
            }
        }
    }
    // Each lane sees its channel close, kills what its thread started and exits.
    let lanes: Vec<Pid> = router.lanes.values().map(|t| t.lane.pid).collect();
    router.lanes.clear();
    for pid in lanes {
        let _ = waitpid(pid, None);
    }
    0
}
