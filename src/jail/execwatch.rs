//! Recording every program a jail runs. A second seccomp filter, installed just before the
//! allowlist, turns each execve and execveat into a user notification; the jail hands the
//! listener to the supervisor and closes its own copy at once. The supervisor reads the call's
//! path, argv and working directory from /proc, gives them to the caller's [`Observer`], and lets
//! the call go on — or fails it with EPERM when the observer cannot record it.
//!
//! What nothing in the jail can do: remove the filter (seccomp filters are never removed), reach
//! the listener (it lives in the supervisor only), or run a program past it (while the supervisor
//! lives, every exec waits for its answer; once it is gone, the kernel fails them with ENOSYS).
//! What a record can get wrong: the path and argv are read from the caller's memory while the
//! call waits, and another thread of a multi-threaded caller could rewrite them before the kernel
//! reads them itself. So each record also names the file itself — its device and inode, resolved
//! in the jail's view while the call waits (and what the descriptor was, for an exec of a
//! descriptor: a memfd, an O_PATH file) — and once the call went on, the program the process
//! then runs (`/proc/PID/exe`) is compared with it: a difference is recorded (`exec_differs`).
//! What stays unknowable: a program that exits before it is looked at, argv[0] (the caller's
//! word), and a program that maps code on its own, without exec (no new program to the kernel).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::error::{JailError, Step};

/// One program started in the jail, as its caller asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    /// The caller's pid inside the jail (what `ps` there shows).
    pub pid: i32,
    /// The same process as the host sees it.
    pub host_pid: u32,
    /// The path given to execve (relative to `cwd`, or to `dirfd` for execveat).
    pub path: String,
    /// execveat's directory descriptor, when not AT_FDCWD.
    pub dirfd: Option<i32>,
    pub argv: Vec<String>,
    /// Part of argv was left out: it held more than the byte budget or arguments.
    pub argv_truncated: bool,
    pub cwd: String,
    /// The file the call names, as found while it waited.
    pub target: Option<Target>,
}

/// The file an exec names: its identity, and for an exec of a descriptor what the descriptor was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub dev: u64,
    pub ino: u64,
    /// For `fexecve`/`execveat(fd, "", AT_EMPTY_PATH)` and `execveat(dirfd, name)`: what the
    /// descriptor is (`/memfd:NAME (deleted)`, a path), as `/proc/PID/fd` names it.
    pub fd: Option<String>,
    /// For a script (`#!`): its interpreter's identity, which is what the process then runs.
    pub interpreter: Option<(u64, u64)>,
}

/// Receives what a jail does that its caller records.
pub trait Observer: Send + Sync {
    /// A program is about to start; `false` refuses it (the caller's exec fails with EPERM).
    fn exec(&self, e: &Exec) -> bool;
    /// A connection attempt left the jail's network and was allowed or denied (veth mode).
    fn egress(&self, allowed: bool, proto: &str, dst: std::net::Ipv4Addr, dport: Option<u16>);
    /// After an exec went on, the process runs another file than the one recorded (`exe` is what
    /// `/proc/PID/exe` names, `dev`/`ino` its identity).
    fn exec_differs(&self, _host_pid: u32, _recorded: &Target, _exe: &str, _dev: u64, _ino: u64) {}
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Jail side: installs the exec filter and returns its listener. no_new_privs must be set.
pub(crate) fn install_filter() -> Result<OwnedFd, JailError> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // Another architecture's calls are the allowlist's to refuse; this filter only watches.
    let mut prog = [
        f(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        f(JEQ_K, 0, 3, AUDIT_ARCH),
        f(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        f(JEQ_K, 2, 0, libc::SYS_execve as u32),
        f(JEQ_K, 1, 0, libc::SYS_execveat as u32),
        f(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        f(RET_K, 0, 0, libc::SECCOMP_RET_USER_NOTIF),
    ];
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: seccomp(2) reads `fprog` and the instructions it points to, both alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &fprog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(JailError {
            step: Step::Seccomp,
            msg: format!(
                "install the exec-recording filter (trail.exec): {e}; this kernel cannot report execs to the \
                 supervisor (seccomp user notification, Linux 5.5+)"
            ),
            errno: e.raw_os_error(),
        });
    }
    // SAFETY: the descriptor was just returned by seccomp(2) and belongs to nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Supervisor side: the thread answering a jail's exec notifications.
pub(crate) struct Watch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The byte budget of one record's argv, and the most arguments read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub argv_bytes: usize,
    pub max_args: usize,
    /// The most of a core the watch may spend on the jail's execs (reading them, recording them):
    /// past it, execs wait. A session flooding execs slows itself, not the host.
    pub cpu_share: f64,
}

/// CPU time the watch may spend in one burst before its share applies.
const CPU_BURST: Duration = Duration::from_millis(50);

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// A bucket of CPU time the watch may spend: it fills at `share` of the wall clock, up to a
/// burst, and each answered exec takes what it cost.
struct CpuBudget {
    share: f64,
    credit: f64,
    at: std::time::Instant,
    used: Duration,
}

impl CpuBudget {
    fn new(share: f64) -> CpuBudget {
        CpuBudget {
            share: share.max(0.01),
            credit: CPU_BURST.as_secs_f64(),
            at: std::time::Instant::now(),
            used: thread_cpu(),
        }
    }

    /// Charges what the thread spent since the last call and waits while the bucket is empty.
    fn settle(&mut self) {
        let now = std::time::Instant::now();
        let cpu = thread_cpu();
        self.credit = (self.credit + self.share * (now - self.at).as_secs_f64()).min(CPU_BURST.as_secs_f64());
        self.credit -= (cpu.saturating_sub(self.used)).as_secs_f64();
        self.at = now;
        self.used = cpu;
        if self.credit < 0.0 {
            std::thread::sleep(Duration::from_secs_f64((-self.credit / self.share).min(1.0)));
        }
    }
}

impl Watch {
    pub(crate) fn start(listener: OwnedFd, observer: Arc<dyn Observer>, limits: Limits) -> std::io::Result<Watch> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("stockade-execwatch".into())
            .spawn(move || serve(listener, observer.as_ref(), limits, &s))?;
        Ok(Watch { stop, thread: Some(thread) })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: OwnedFd, observer: &dyn Observer, limits: Limits, stop: &AtomicBool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut pending: Vec<Pending> = Vec::new();
    let mut budget = CpuBudget::new(limits.cpu_share);
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let wait = if pending.is_empty() { 200u16 } else { 5 };
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let ready = match poll(&mut fds, PollTimeout::from(wait)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => false,
            Err(_) => return,
            Ok(_) => true,
        };
        if ready {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if revents.contains(PollFlags::POLLIN) {
                budget.settle();
                answer_one(&listener, observer, limits, &mut pending);
            } else if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                // Every process under the filter is gone.
                return;
            }
        }
        pending.retain(|p| p.check(observer));
    }
}

/// An exec that went on, to be compared with what the process then runs.
struct Pending {
    host_pid: u32,
    target: Target,
    /// What the process ran before the exec: while `/proc/PID/exe` still names it, the exec has
    /// not happened yet (or failed).
    before: Option<(u64, u64)>,
    since: std::time::Instant,
}

/// How long an exec is watched for before it is taken to have failed or ended unseen.
const POST_EXEC_WATCH: std::time::Duration = std::time::Duration::from_millis(100);

impl Pending {
    /// Looks at the process once; returns whether to look again.
    fn check(&self, observer: &dyn Observer) -> bool {
        use std::os::unix::fs::MetadataExt;
        let exe = format!("/proc/{}/exe", self.host_pid);
        let Ok(m) = std::fs::metadata(&exe) else { return false };
        let now = (m.dev(), m.ino());
        if self.target.runs(now) {
            return false;
        }
        if Some(now) == self.before {
            return self.since.elapsed() < POST_EXEC_WATCH;
        }
        let name = std::fs::read_link(&exe).map(|p| p.display().to_string()).unwrap_or_default();
        observer.exec_differs(self.host_pid, &self.target, &name, now.0, now.1);
        false
    }

    /// The process makes another exec: it runs what this one started, so the look is final.
    /// Returns false (drop it).
    fn settle(&self, observer: &dyn Observer) -> bool {
        use std::os::unix::fs::MetadataExt;
        let exe = format!("/proc/{}/exe", self.host_pid);
        if let Ok(m) = std::fs::metadata(&exe) {
            let now = (m.dev(), m.ino());
            if !self.target.runs(now) && Some(now) != self.before {
                let name = std::fs::read_link(&exe).map(|p| p.display().to_string()).unwrap_or_default();
                observer.exec_differs(self.host_pid, &self.target, &name, now.0, now.1);
            }
        }
        false
    }
}

impl Target {
    /// Whether a process whose executable is `(dev, ino)` runs this file (or, for a script, its
    /// interpreter).
    fn runs(&self, now: (u64, u64)) -> bool {
        now == (self.dev, self.ino) || self.interpreter == Some(now)
    }
}

/// The identity of the file an exec names, found as the caller's kernel would find it: a path is
/// resolved under the caller's root with `openat2(RESOLVE_IN_ROOT)`, so an absolute symlink or a
/// `..` the jail planted stays in the jail and never leads this (host, privileged) thread to a
/// host file; a descriptor is looked at through `/proc/PID/fd`, the open file itself.
fn target_of(host_pid: u32, path: &str, dirfd: Option<i32>, empty_path: bool) -> Option<Target> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let proc = format!("/proc/{host_pid}");
    let in_root = |root: &OwnedFd, p: &str| {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        nix::fcntl::openat2(root, p, how).ok()
    };
    let root = nix::fcntl::open(
        format!("{proc}/root").as_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()?;
    let link = |p: String| std::fs::read_link(p).ok().map(|l| l.display().to_string());
    let (file, fd) = match dirfd {
        Some(d) if empty_path && path.is_empty() => {
            let f = format!("{proc}/fd/{d}");
            let opened =
                nix::fcntl::open(f.as_str(), OFlag::O_PATH | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty()).ok()?;
            (opened, link(f))
        }
        _ => {
            // A relative path starts from the caller's directory, as the caller sees it.
            let (base, fd) = match dirfd {
                _ if path.starts_with('/') => (String::new(), None),
                Some(d) => {
                    let name = link(format!("{proc}/fd/{d}"));
                    (name.clone()?, name)
                }
                None => (link(format!("{proc}/cwd"))?, None),
            };
            (in_root(&root, &format!("{base}/{path}"))?, fd)
        }
    };
    let m = nix::sys::stat::fstat(&file).ok()?;
    let is_file = m.st_mode & libc::S_IFMT == libc::S_IFREG;
    let interpreter = if is_file { interpreter_of(&file) } else { None }.and_then(|i| {
        let m = nix::sys::stat::fstat(&in_root(&root, &i)?).ok()?;
        Some((m.st_dev, m.st_ino))
    });
    Some(Target { dev: m.st_dev, ino: m.st_ino, fd, interpreter })
}

/// A script's `#!` interpreter, when it names an absolute path. The file is read through the
/// descriptor that named it (only a regular file gets here: a FIFO would block this thread).
fn interpreter_of(file: &OwnedFd) -> Option<String> {
    let mut head = [0u8; 256];
    use std::os::unix::fs::OpenOptionsExt;
    let n = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .and_then(|mut f| f.read(&mut head))
        .ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|b| *b == b'\n').unwrap_or(line.len())];
    let interp = std::str::from_utf8(line).ok()?.split_whitespace().next()?;
    interp.starts_with('/').then(|| interp.to_owned())
}

/// Answers one exec; one that went on joins `pending`, for the post-exec look.
fn answer_one(listener: &OwnedFd, observer: &dyn Observer, limits: Limits, pending: &mut Vec<Pending>) {
    // SAFETY: seccomp_notif is plain old data; the kernel wants it zeroed before RECV.
    let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: RECV fills the seccomp_notif we pass, which is valid and of the ioctl's size.
    if unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } != 0 {
        // ENOENT: the caller died (or a signal restarted its call) before we got to it.
        return;
    }
    // While this call waits, the caller runs what its previous exec started: the moment to
    // compare that with what was recorded.
    pending.retain(|p| p.host_pid != req.pid || p.settle(observer));
    let exec = read_exec(&req, limits);
    let before = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{}/exe", req.pid)).ok().map(|m| (m.dev(), m.ino()))
    };
    let watch = exec.as_ref().and_then(|e| e.target.clone());
    // The pid must still be the caller we read: were it not, the memory read was someone else's.
    let mut id = req.id;
    // SAFETY: ID_VALID reads the u64 we pass.
    let valid = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) } == 0;
    let error = match (valid, exec) {
        (true, Some(e)) => {
            if observer.exec(&e) {
                0
            } else {
                -libc::EPERM
            }
        }
        (false, _) => return,
        // A path or argv that cannot be read here would fail the kernel's own read too, unless
        // another thread mapped it back in between: such a call is refused (EFAULT), and
        // recorded, rather than let through unread.
        (true, None) => {
            let e = Exec {
                pid: jail_pid(req.pid).unwrap_or(0),
                host_pid: req.pid,
                path: String::new(),
                dirfd: None,
                argv: Vec::new(),
                argv_truncated: true,
                cwd: String::new(),
                target: None,
            };
            observer.exec(&e);
            -libc::EFAULT
        }
    };
    let mut resp = libc::seccomp_notif_resp {
        id: req.id,
        val: 0,
        error,
        flags: if error == 0 { libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32 } else { 0 },
    };
    // SAFETY: SEND reads the seccomp_notif_resp we pass. A failure means the caller is gone.
    let sent = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) } == 0;
    if let (true, Some(target)) = (sent && error == 0, watch) {
        pending.push(Pending { host_pid: req.pid, target, before, since: std::time::Instant::now() });
    }
}

fn read_exec(req: &libc::seccomp_notif, limits: Limits) -> Option<Exec> {
    let host_pid = req.pid;
    let a = req.data.args;
    let (dirfd, path_at, argv_at, empty_path) = if req.data.nr == libc::SYS_execveat as i32 {
        let d = a[0] as i32;
        (if d == libc::AT_FDCWD { None } else { Some(d) }, a[1], a[2], a[4] as i32 & libc::AT_EMPTY_PATH != 0)
    } else {
        (None, a[0], a[1], false)
    };
    let mem = std::fs::File::open(format!("/proc/{host_pid}/mem")).ok()?;
    let path = read_cstr(&mem, path_at, libc::PATH_MAX as usize)?.0;
    let mut argv = Vec::new();
    let mut budget = limits.argv_bytes;
    let mut truncated = false;
    if argv_at != 0 {
        for i in 0.. {
            if i >= limits.max_args {
                truncated = true;
                break;
            }
            let mut p = [0u8; 8];
            mem.read_exact_at(&mut p, argv_at + 8 * i as u64).ok()?;
            let at = u64::from_ne_bytes(p);
            if at == 0 {
                break;
            }
            if budget == 0 {
                truncated = true;
                break;
            }
            let (s, cut) = read_cstr(&mem, at, budget)?;
            budget = budget.saturating_sub(s.len().max(1));
            truncated |= cut;
            argv.push(s);
        }
    }
    let cwd = std::fs::read_link(format!("/proc/{host_pid}/cwd")).map(|p| p.display().to_string()).unwrap_or_default();
    let target = target_of(host_pid, &path, dirfd, empty_path);
    Some(Exec {
        pid: jail_pid(host_pid).unwrap_or(0),
        host_pid,
        path,
        dirfd,
        argv,
        argv_truncated: truncated,
        cwd,
        target,
    })
}

/// A NUL-terminated string of at most `max` bytes at `at`: (the text, whether it was cut).
fn read_cstr(mem: &std::fs::File, at: u64, max: usize) -> Option<(String, bool)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        // Never read across a page: the next page may be unmapped though the string ends here.
        let page_left = 4096 - (at + out.len() as u64) % 4096;
        let want = buf.len().min(page_left as usize);
        let n = mem.read_at(&mut buf[..want], at + out.len() as u64).ok()?;
        if n == 0 {
            return None;
        }
        if let Some(z) = buf[..n].iter().position(|b| *b == 0) {
            out.extend_from_slice(&buf[..z]);
            let cut = out.len() > max;
            out.truncate(max);
            return Some((String::from_utf8_lossy(&out).into_owned(), cut));
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > max {
            out.truncate(max);
            return Some((String::from_utf8_lossy(&out).into_owned(), true));
        }
    }
}

/// The pid a host process has in its own (the jail's) pid namespace: the last `NSpid` field.
fn jail_pid(host_pid: u32) -> Option<i32> {
    let mut s = String::new();
    std::fs::File::open(format!("/proc/{host_pid}/status")).ok()?.read_to_string(&mut s).ok()?;
    s.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().last()?.parse().ok()
}
