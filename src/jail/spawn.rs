//! Step 9b: the command's process: a fork of the jail's init that execs the command.
//!
//! The child does nothing between the fork and the exec but system calls on data prepared
//! before the fork (no allocation, no locks). A step that fails is reported through a
//! close-on-exec pipe: end-of-file on it means the exec happened.

use std::ffi::CString;
use std::os::fd::AsFd;
use std::os::raw::c_char;

use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::Pid;

use super::error::{JailError, Step};

const STEPS: [&str; 6] = ["", "setsid", "chdir", "close_range", "execve", "TIOCSCTTY"];

/// Starts `prog` with `argv` and `env` in a new session, in `cwd`, with an empty signal mask,
/// SIGPIPE at its default and every descriptor above stderr closed at exec. With `ctty`, the
/// terminal on its stdin (a pty of the jail's own) becomes the session's controlling terminal.
/// Returns the command's pid once it has exec'd.
pub(super) fn spawn(
    prog: &CString,
    argv: &[CString],
    env: &[CString],
    cwd: &CString,
    ctty: bool,
) -> Result<Pid, JailError> {
    let nul = |v: &[CString]| -> Vec<*const c_char> {
        v.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
    };
    let (argv_p, envp) = (nul(argv), nul(env));
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| JailError::new(Step::Exec, format!("pipe for the command's start: {e}")))?;
    // No signal handler may run in the child before its exec: everything stays blocked until it
    // clears its own mask right before it.
    let mut old = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old))
        .map_err(|e| JailError::new(Step::Exec, format!("block signals for the command's start: {e}")))?;
    // SAFETY: the jail's init is single-threaded, so the child's copy holds no lock another thread
    // took; the child only makes system calls on the buffers above and leaves by exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        use std::os::fd::AsRawFd;
        let fail = |step: u8| -> ! {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            let mut rec = [step, 0, 0, 0, 0];
            rec[1..].copy_from_slice(&errno.to_ne_bytes());
            // SAFETY: writing our own buffer to the report pipe, then leaving without running
            // anything of the init's.
            unsafe {
                libc::write(report_w.as_raw_fd(), rec.as_ptr().cast(), rec.len());
                libc::_exit(super::EXIT_SETUP_FAILED)
            }
        };
        // SAFETY: plain system calls on valid, NUL-terminated strings and NULL-terminated pointer
        // arrays built before the fork.
        unsafe {
            // A new session without a controlling terminal: TIOCSTI-style injection into the
            // caller's terminal needs one (the seccomp filter refuses TIOCSTI as well).
            if libc::setsid() < 0 {
                fail(1);
            }
            // `run -t`: the pty the supervisor made for the jail, never the caller's terminal.
            if ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                fail(5);
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                fail(2);
            }
            // Every descriptor above stderr is closed at exec, whatever the supervisor or a
            // library left open (the report pipe is close-on-exec already).
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) != 0 {
                fail(3);
            }
            // Stockade's runtime ignores SIGPIPE (Rust does, to see EPIPE as an error) and an
            // ignored signal survives exec: the command gets the default back, as programs
            // started by a shell do.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::execve(prog.as_ptr(), argv_p.as_ptr(), envp.as_ptr());
        }
        fail(4);
    }
    let fork_err = std::io::Error::last_os_error();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    drop(report_w);
    if pid < 0 {
        return Err(JailError::new(Step::Exec, format!("start the command: {fork_err}")));
    }
    let pid = Pid::from_raw(pid);
    let mut rec = [0u8; 5];
    let got = loop {
        match nix::unistd::read(report_r.as_fd(), &mut rec) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r.unwrap_or(0),
        }
    };
    if got == 0 {
        return Ok(pid);
    }
    let _ = nix::sys::wait::waitpid(pid, None);
    let errno = nix::errno::Errno::from_raw(i32::from_ne_bytes([rec[1], rec[2], rec[3], rec[4]]));
    Err(match STEPS.get(rec[0] as usize).copied() {
        Some("execve") => JailError {
            step: Step::Exec,
            msg: format!("{}: {}", prog.to_string_lossy(), errno.desc()),
            errno: Some(errno as i32),
        },
        Some("chdir") => JailError::new(Step::Exec, format!("chdir {}: {}", cwd.to_string_lossy(), errno.desc())),
        Some(name) if got == rec.len() => JailError::new(Step::Exec, format!("{name}: {}", errno.desc())),
        _ => JailError::new(Step::Exec, "the command's start failed"),
    })
}
