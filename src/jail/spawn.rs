//! Step 9b: the command's process, started the way posix_spawn starts one.
//!
//! The jail's init is a copy of the supervisor, a large static binary: a fork copies its page
//! tables, write-protects its memory for both copies, and the exec then throws the child's copy
//! away. A clone with CLONE_VM | CLONE_VFORK instead runs the child on the init's own memory, on
//! a stack of its own, while the init waits; the exec gives the child a new address space. The
//! child therefore does nothing but system calls on data prepared before the clone: it must not
//! allocate, take locks or touch anything the init still uses. It reports a failed step through
//! `Prepared`'s atomics, which the init reads once the clone has returned.

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::Pid;

use super::error::{JailError, Step};

/// Everything the child needs, as raw pointers into buffers that outlive the clone.
struct Prepared<'a> {
    prog: &'a CString,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    cwd: &'a CString,
    /// The CPU set the command gets; the init keeps its own.
    cpus: Option<&'a nix::sched::CpuSet>,
    /// Which step failed (see `STEPS`), 0 for none; written by the child only.
    failed: AtomicU8,
    errno: AtomicI32,
}

const STEPS: [&str; 6] = ["", "setsid", "chdir", "close_range", "sched_setaffinity", "execve"];

/// Starts `prog` with `argv` and `env` in a new session, in `cwd`, on `cpus` when given, with an
/// empty signal mask, SIGPIPE at its default and every descriptor above stderr closed at exec.
/// Returns the command's pid once it has exec'd.
pub fn spawn(
    prog: &CString,
    argv: &[CString],
    env: &[CString],
    cwd: &CString,
    cpus: Option<&nix::sched::CpuSet>,
) -> Result<Pid, JailError> {
    let nul = |v: &[CString]| v.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let prepared = Prepared {
        prog,
        argv: nul(argv),
        envp: nul(env),
        cwd,
        cpus,
        failed: AtomicU8::new(0),
        errno: AtomicI32::new(0),
    };
    let mut stack = super::rawsys::ChildStack::allocate();
    // No signal handler may run on the child's borrowed memory: everything stays blocked until
    // the child clears its own mask right before exec.
    let mut old = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old))
        .map_err(|e| JailError::new(Step::Exec, format!("block signals for the command's start: {e}")))?;
    // With CLONE_VFORK this thread is suspended until the child has exec'd or exited, so nothing
    // else touches the shared memory meanwhile; the child never returns into this process's code.
    // SAFETY: `stack` and `prepared` outlive the child's use of them; it only makes system calls.
    let pid = unsafe {
        libc::clone(
            child,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &prepared as *const Prepared as *mut c_void,
        )
    };
    let clone_err = std::io::Error::last_os_error();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    drop(stack);
    if pid < 0 {
        return Err(JailError::new(Step::Exec, format!("start the command: {clone_err}")));
    }
    let pid = Pid::from_raw(pid);
    let step = prepared.failed.load(Ordering::Acquire) as usize;
    if step == 0 {
        return Ok(pid);
    }
    let _ = nix::sys::wait::waitpid(pid, None);
    let errno = nix::errno::Errno::from_raw(prepared.errno.load(Ordering::Acquire));
    Err(match STEPS.get(step).copied() {
        Some("execve") => JailError {
            step: Step::Exec,
            msg: format!("{}: {}", prog.to_string_lossy(), errno.desc()),
            errno: Some(errno as i32),
        },
        Some("chdir") => JailError::new(Step::Exec, format!("chdir {}: {}", cwd.to_string_lossy(), errno.desc())),
        Some(name) => JailError::new(Step::Exec, format!("{name}: {}", errno.desc())),
        None => JailError::new(Step::Exec, "the command's start failed"),
    })
}

/// The kernel's `struct sigaction` for rt_sigaction(2) (libc's differs in layout).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// The child: system calls only, on data the init prepared.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Prepared` the init passed to clone; it outlives this child's use of
    // it (the init waits for the exec or the exit).
    let p = unsafe { &*(arg as *const Prepared) };
    let fail = |step: u8| -> c_int {
        p.errno.store(nix::errno::Errno::last_raw(), Ordering::Release);
        p.failed.store(step, Ordering::Release);
        // SAFETY: _exit ends this child without running anything of the init's.
        unsafe { libc::_exit(super::EXIT_SETUP_FAILED) }
    };
    // SAFETY: for the calls below, plain system calls on valid, NUL-terminated strings and
    // NULL-terminated pointer arrays built before the clone.
    unsafe {
        // A new session without a controlling terminal: TIOCSTI-style injection into the
        // caller's terminal needs one (the seccomp filter refuses TIOCSTI as well).
        if libc::syscall(libc::SYS_setsid) < 0 {
            return fail(1);
        }
        if libc::syscall(libc::SYS_chdir, p.cwd.as_ptr()) != 0 {
            return fail(2);
        }
        // Every descriptor above stderr is closed at exec, whatever the supervisor or a library
        // left open.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) != 0 {
            return fail(3);
        }
        // The caller's CPU set (see `affinity`: the init keeps the CPUs it was built on). CpuSet
        // is a transparent cpu_set_t, the layout the kernel reads.
        if let Some(set) = p.cpus {
            let size = std::mem::size_of::<nix::sched::CpuSet>();
            if libc::syscall(libc::SYS_sched_setaffinity, 0, size, set as *const nix::sched::CpuSet) != 0 {
                return fail(4);
            }
        }
        // Stockade's runtime ignores SIGPIPE (Rust does, to see EPIPE as an error) and an
        // ignored signal survives exec: the command gets the default back, as programs started
        // by a shell do. The child has its own copy of the dispositions (no CLONE_SIGHAND).
        let default = KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
        libc::syscall(libc::SYS_rt_sigaction, libc::SIGPIPE, &default as *const KernelSigaction, 0usize, 8usize);
        let empty: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
        libc::execve(p.prog.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
    }
    fail(5)
}
