//! The jail side: everything that runs inside the new namespaces, in order, and then Stockade's
//! small init, which stays as PID 1 of the jail.
//!
//! PID 1 reaps orphans, forwards signals to the command, and exits with the command's status
//! (128+N for a signal). When it exits the kernel tears the pid namespace down, so nothing the
//! command started — daemons, double forks, new sessions — outlives it. It dies with the
//! supervisor too (PDEATHSIG), and it is confined exactly like the command (same landlock
//! domain, same seccomp allowlist, no capabilities) and non-dumpable, so the command can
//! neither ptrace it nor open its /proc entries.

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::error::{JailError, Step, StepExt};
use super::mounts::{self, MountPlan};
use super::namespaces::IdMapping;
use super::sync::{send_failure, wait_for, SyncPipes, GO};
use super::{caps, landlock, netif, rlimits, uts, EXIT_SETUP_FAILED};
use crate::policy::{NetMode, Policy};

/// Signals PID 1 passes on to the command.
pub(crate) const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

pub(crate) struct ChildCtx<'a> {
    pub policy: &'a Policy,
    pub ids: &'a IdMapping,
    pub plan: MountPlan<'a>,
    pub env: &'a [CString],
    /// The same environment as pairs, for the session's shell.
    pub env_pairs: &'a [(String, String)],
    pub argv: &'a [CString],
    pub payload: &'a super::Payload,
    pub pipes: &'a SyncPipes,
    /// veth mode: (the jail's address, the host end's address) of the session's /30.
    pub veth: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    /// Report every exec to the supervisor (see `execwatch`).
    pub watch_exec: bool,
    /// Send the supervisor what the jail sees of itself before the command runs (see `observe`).
    pub observe: bool,
    /// `run -t`: the slave end of the pty the supervisor made, to be the command's stdin, stdout,
    /// stderr and controlling terminal.
    pub tty: Option<std::os::fd::RawFd>,
    /// Where the supervisor's arguments and environment are, for the child to wipe its copies.
    pub own_blocks: &'a super::environ::OwnBlocks,
}

/// Entry point of the cloned child. Never returns.
pub(crate) fn child_main(ctx: ChildCtx) -> ! {
    // First of all: the supervisor's environment (and any secret in it) must not live on in
    // the jail's processes, and neither may any descriptor of the supervisor's but those the
    // jail's steps need (the sync pipes' jail ends, a session's channel, the attached trees).
    super::environ::scrub_own_environment(ctx.own_blocks);
    super::environ::scrub_own_arguments(ctx.own_blocks);
    let mut keep = vec![ctx.pipes.go_read.as_raw_fd(), ctx.pipes.report_write.as_raw_fd()];
    if let super::Payload::Session { channel, .. } = ctx.payload {
        keep.push(channel.as_raw_fd());
    }
    keep.extend([ctx.plan.workspace_tree, ctx.plan.outputs_tree].into_iter().flatten().map(|t| t.as_raw_fd()));
    keep.extend(ctx.plan.bind_trees.iter().map(|(_, t)| t.as_raw_fd()));
    keep.extend(ctx.tty);
    // SAFETY: only descriptors nothing in this child uses again are closed: everything but the
    // keep-list belongs to the supervisor's copy (its OwnedFds are never dropped here, the child
    // leaves with _exit).
    if let Err(e) = unsafe { crate::util::close_all_but(&keep) } {
        send_failure(&ctx.pipes.report_write, &JailError::new(Step::Preflight, format!("close_range: {e}")));
        // SAFETY: see the end of this function.
        unsafe { libc::_exit(EXIT_SETUP_FAILED) };
    }
    // The pty in place of the supervisor's stdio: nothing in the jail keeps the caller's.
    if let Some(t) = ctx.tty {
        // SAFETY: dup2 onto the standard descriptors, then close the fd the supervisor passed,
        // all of them this process's own.
        unsafe {
            for fd in 0..3 {
                libc::dup2(t, fd);
            }
            libc::close(t);
        }
    }
    let detached = match ctx.payload {
        super::Payload::Session { .. } => detach_from_terminal(),
        super::Payload::Command => Ok(()),
    };
    let code = match detached.and_then(|()| setup(&ctx)) {
        Ok(Some(child)) => supervise_command(child),
        Ok(None) => match ctx.payload {
            super::Payload::Session { channel, serve, .. } => {
                // Ready: the supervisor sees EOF on the report pipe once our copy is closed
                // (nothing has been forked yet, so no other copy exists).
                close_raw(ctx.pipes.report_write.as_raw_fd());
                close_raw(ctx.pipes.go_read.as_raw_fd());
                // Whatever else the supervisor inherited from its own parent must not reach the
                // tools: the helper is forked without exec, so close-on-exec would not do.
                // SAFETY: the sync pipes' ends were closed just above and nothing else but the
                // channel is open any more; close_all_but only makes that certain.
                let _ = unsafe { crate::util::close_all_but(&[channel.as_raw_fd()]) };
                // stdin and stdout are the supervisor's request/response pipes to its caller
                // (the worker): nothing in the jail reads or writes them, so they go.
                match std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
                    Ok(null) if nix::unistd::dup2_stdin(&null).is_ok() && nix::unistd::dup2_stdout(&null).is_ok() => {}
                    // Without /dev/null they are closed instead: gone either way.
                    _ => {
                        close_raw(0);
                        close_raw(1);
                    }
                }
                serve(channel, ctx.env_pairs, ctx.policy)
            }
            super::Payload::Command => EXIT_SETUP_FAILED,
        },
        Err(e) => {
            send_failure(&ctx.pipes.report_write, &e);
            EXIT_SETUP_FAILED
        }
    };
    // SAFETY: _exit ends the process without running the parent's atexit handlers or
    // destructors, which belong to the supervisor's copy of this address space.
    unsafe { libc::_exit(code) }
}

fn close_raw(fd: i32) {
    // SAFETY: the fd is one of the sync pipes, inherited from the supervisor and not used again
    // in this process; its OwnedFd is never dropped here because the child ends with _exit.
    unsafe { libc::close(fd) };
}

/// Builds the jail from the inside. Returns the command's pid, or `None` for a session.
/// A session's processes serve a program, not a person: they get a session of their own, so the
/// caller's controlling terminal is not theirs (no `/dev/tty`, no `tcsetpgrp`, no reading the
/// operator's keystrokes), and a terminal inherited as stderr is swapped for /dev/null, since a
/// tty descriptor can be read and written whether or not it is the controlling one.
fn detach_from_terminal() -> Result<(), JailError> {
    nix::unistd::setsid().map_err(|e| JailError::new(Step::Terminal, format!("setsid: {}", e.desc())))?;
    if nix::unistd::isatty(std::io::stderr()).unwrap_or(false) {
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| JailError::new(Step::Terminal, format!("open /dev/null for stderr: {e}")))?;
        nix::unistd::dup2_stderr(&null)
            .map_err(|e| JailError::new(Step::Terminal, format!("replace the terminal on stderr: {}", e.desc())))?;
    }
    Ok(())
}

fn setup(ctx: &ChildCtx) -> Result<Option<Pid>, JailError> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) };
    let p = ctx.policy;
    if !wait_for(&ctx.pipes.go_read, GO) {
        // The supervisor is gone before the maps were written: leave quietly.
        // SAFETY: see child_main.
        unsafe { libc::_exit(EXIT_SETUP_FAILED) };
    }
    if let Some((uid, gid)) = ctx.ids.setup_ids() {
        caps::set_thread_ids(uid, gid, false)
            .map_err(|e| JailError::new(Step::IdMap, format!("become setup ids: {e}")))?;
    }
    mounts::build_root(&ctx.plan)?;
    // The id-mapped trees are attached now; their descriptors must not linger in the jail.
    for tree in [ctx.plan.workspace_tree, ctx.plan.outputs_tree].into_iter().flatten() {
        close_raw(tree.as_raw_fd());
    }
    for (_, tree) in ctx.plan.bind_trees {
        close_raw(tree.as_raw_fd());
    }
    uts::set_names(&p.hostname)?;
    // The supervisor made the cgroup and compiled the seccomp program meanwhile.
    let setup = match super::sync::recv_setup(&ctx.pipes.go_read) {
        Ok(s) => s,
        // SAFETY: see child_main (the supervisor is gone).
        Err(None) => unsafe { libc::_exit(EXIT_SETUP_FAILED) },
        Err(Some(msg)) => return Err(JailError::new(Step::Supervise, msg)),
    };
    match (p.network.mode, ctx.veth) {
        (NetMode::Veth, Some((jail, gateway))) => {
            netif::loopback_up()?;
            netif::veth_up(jail, gateway)?;
        }
        (NetMode::Loopback, _) => netif::loopback_up()?,
        _ => {}
    }
    rlimits::apply(&p.limits)?;
    // Into the jail's cgroup before anything runs that the jail's limits should bound.
    if let Some(cg) = setup.cgroup {
        cg.join_self()?;
    }
    // Now that we are in the jail's cgroup, make it the root of our cgroup view.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
        .step(Step::Namespaces, || "unshare cgroup namespace".into())?;
    let root_mode = ctx.ids.setup_ids().is_some();
    caps::drop_to(p.user.uid, p.user.gid, &p.capabilities.set, root_mode)?;
    landlock::apply(p)?;
    caps::set_non_dumpable()?;
    arm_parent_death_signal(&ctx.pipes.go_read)?;
    // Before the allowlist (which may not admit seccomp(2) itself), and handed over before
    // anything here could exec.
    if ctx.watch_exec {
        let listener = super::execwatch::install_filter()?;
        super::sync::send_listener(&ctx.pipes.go_read, listener)
            .map_err(|e| JailError::new(Step::Seccomp, format!("hand over the exec listener: {e}")))?;
    }
    // Installed here, before the command starts, so PID 1 and the command share one filter stack.
    super::seccomp::install(&setup.program)?;
    if matches!(ctx.payload, super::Payload::Session { .. }) {
        return Ok(None);
    }

    // Read here, with every step applied: what the command starts with is this, as its own.
    if ctx.observe {
        super::sync::send_seen(&ctx.pipes.report_write, &super::observe::read_own());
    }
    let prog = resolve_program(ctx)?;
    let cwd = CString::new(mounts::WORKSPACE).expect("no NUL in a constant");
    // Blocked before the command exists, so that neither its end nor a signal to pass on can
    // arrive before PID 1 waits for them (an unblocked SIGCHLD is discarded).
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&pid1_signals()), None);
    let child = super::spawn::spawn(&prog, ctx.argv, ctx.env, &cwd, ctx.tty.is_some())?;
    // The command has exec'd: the supervisor sees EOF once our copies are closed.
    close_raw(ctx.pipes.report_write.as_raw_fd());
    close_raw(ctx.pipes.go_read.as_raw_fd());
    Ok(Some(child))
}

/// The kernel clears PDEATHSIG whenever credentials change, so it is armed again after the last
/// change. The supervisor keeps its end of `go` open for the jail's whole life: a hang-up on our
/// end means it died before the signal was armed, and then nothing else would kill us.
fn arm_parent_death_signal(go_read: &std::os::fd::OwnedFd) -> Result<(), JailError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(JailError::new(Step::Supervise, format!("PR_SET_PDEATHSIG: {}", std::io::Error::last_os_error())));
    }
    let mut fds = [PollFd::new(go_read.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) if fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP)) => {
            // SAFETY: see child_main.
            unsafe { libc::_exit(EXIT_SETUP_FAILED) }
        }
        _ => Ok(()),
    }
}

fn resolve_program(ctx: &ChildCtx) -> Result<CString, JailError> {
    let name = ctx.argv.first().ok_or_else(|| JailError::new(Step::Exec, "no command given"))?;
    let name_b = name.as_bytes();
    let not_found = |errno: i32, msg: String| JailError { step: Step::Exec, msg, errno: Some(errno) };
    if name_b.contains(&b'/') {
        return Ok(name.clone());
    }
    let path = ctx
        .env
        .iter()
        .find_map(|kv| kv.as_bytes().strip_prefix(b"PATH="))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_else(|| "/usr/bin:/bin".into());
    let mut denied = None;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        // Looked up before the command's process moves to the workspace: a relative PATH entry
        // means the same directory it would mean there.
        let cand: PathBuf = Path::new(mounts::WORKSPACE).join(dir).join(std::ffi::OsStr::from_bytes(name_b));
        match nix::unistd::access(&cand, nix::unistd::AccessFlags::X_OK) {
            Ok(()) if cand.is_file() => {
                return CString::new(cand.as_os_str().as_bytes())
                    .map_err(|_| not_found(libc::EINVAL, "NUL in path".into()));
            }
            Ok(()) => {}
            Err(nix::errno::Errno::EACCES) => denied = Some(cand),
            Err(_) => {}
        }
    }
    let shown = String::from_utf8_lossy(name_b);
    match denied {
        Some(c) => Err(not_found(libc::EACCES, format!("{}: permission denied", c.display()))),
        None => Err(not_found(libc::ENOENT, format!("{shown}: command not found in PATH {path}"))),
    }
}

/// PID 1's loop. Returns the exit code to leave with.
fn supervise_command(child: Pid) -> i32 {
    let set = pid1_signals();
    loop {
        // Reaps every exited process (orphans of the command end up here too) before waiting.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return code,
                Ok(WaitStatus::Signaled(pid, s, _)) if pid == child => return 128 + s as i32,
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(child, sig);
            }
        }
    }
}

/// What PID 1 waits for: its children's ends and the signals it passes on.
fn pid1_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in FORWARDED {
        set.add(*s);
    }
    set
}
