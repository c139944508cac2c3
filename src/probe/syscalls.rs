//! Syscall probes that run *inside* a jail (`stockade __probe NAME...`): each tries one forbidden
//! thing for real and reports what the kernel answered. A probe that is refused by seccomp's kill
//! action never reports: the process dies of SIGSYS, which the harness sees as the exit status.
//!
//! Arguments are chosen so that a call which got through does no harm (invalid pointers,
//! invalid fds, paths inside the jail's own /tmp).

use std::ffi::CString;

/// Outcome of one probe: `Ok(detail)` when the call went through, `Err(errno)` when refused.
pub type ProbeResult = Result<String, i32>;

fn ret(r: libc::c_long) -> ProbeResult {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(format!("returned {r}"))
    }
}

macro_rules! sys {
    ($($arg:expr),+ $(,)?) => {
        // SAFETY: probes pass only integers, NULL or pointers to live local buffers; the kernel
        // validates every argument and at worst returns an error.
        ret(unsafe { libc::syscall($($arg as libc::c_long),+) })
    };
}

fn cpath(s: &str) -> CString {
    CString::new(s).expect("probe paths have no NUL")
}

/// Every syscall probe, by name.
pub const SYSCALL_PROBES: &[&str] = &[
    "mount",
    "umount2",
    "unshare-user",
    "unshare-net",
    "setns",
    "clone-newuser",
    "clone3",
    "pivot_root",
    "chroot",
    "ptrace",
    "process_vm_readv",
    "keyctl",
    "add_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "kexec_load",
    "init_module",
    "finit_module",
    "reboot",
    "swapon",
    "clock_settime",
    "settimeofday",
    "acct",
    "quotactl",
    "open_by_handle_at",
    "name_to_handle_at",
    "pidfd_getfd",
    "iopl",
    "ioperm",
    "syslog",
    "personality-noaslr",
    "personality-read-implies-exec",
    "openat2",
    "mknod-char",
    "mknod-block",
    "tiocsti",
    "tioclinux",
    "socket-raw",
    "socket-packet",
    "socket-netlink",
    "sethostname",
    "kcmp",
    "fanotify_init",
    "x32-getpid",
    "int80-getpid",
    "fsopen",
    "open_tree",
];

/// Probes for calls the default policy *allows*, to show the filter is not simply deny-all.
pub const ALLOWED_PROBES: &[&str] =
    &["mknod-fifo", "socket-inet", "socketpair-unix", "personality-query", "personality-linux32", "clone-plain"];

pub fn run(name: &str) -> Option<ProbeResult> {
    let null = std::ptr::null::<u8>();
    let tmp = cpath("/tmp");
    let dot = cpath(".");
    Some(match name {
        "mount" => {
            let (src, fs) = (cpath("none"), cpath("tmpfs"));
            sys!(libc::SYS_mount, src.as_ptr(), tmp.as_ptr(), fs.as_ptr(), 0, null)
        }
        "umount2" => sys!(libc::SYS_umount2, tmp.as_ptr(), 0),
        "unshare-user" => sys!(libc::SYS_unshare, libc::CLONE_NEWUSER),
        "unshare-net" => sys!(libc::SYS_unshare, libc::CLONE_NEWNET),
        "setns" => sys!(libc::SYS_setns, 0, 0),
        "clone-newuser" => clone_with(libc::CLONE_NEWUSER as u64),
        "clone-plain" => clone_with(0),
        "clone3" => sys!(libc::SYS_clone3, null, 0),
        "pivot_root" => sys!(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()),
        "chroot" => sys!(libc::SYS_chroot, tmp.as_ptr()),
        "ptrace" => sys!(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0),
        "process_vm_readv" => sys!(libc::SYS_process_vm_readv, 1, null, 0, null, 0, 0),
        "keyctl" => sys!(libc::SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* session */, 0),
        "add_key" => {
            let (t, d) = (cpath("user"), cpath("probe"));
            sys!(libc::SYS_add_key, t.as_ptr(), d.as_ptr(), null, 0, -3)
        }
        "bpf" => sys!(libc::SYS_bpf, 0, null, 0),
        "perf_event_open" => sys!(libc::SYS_perf_event_open, null, 0, -1, -1, 0),
        "userfaultfd" => sys!(libc::SYS_userfaultfd, 0),
        "io_uring_setup" => sys!(libc::SYS_io_uring_setup, 1, null),
        // More segments than the kernel takes (16): refused before anything is loaded or unloaded.
        "kexec_load" => sys!(libc::SYS_kexec_load, 0, 1000, null, 0),
        "init_module" => {
            let e = cpath("");
            sys!(libc::SYS_init_module, null, 0, e.as_ptr())
        }
        "finit_module" => {
            let e = cpath("");
            sys!(libc::SYS_finit_module, -1, e.as_ptr(), 0)
        }
        "reboot" => sys!(libc::SYS_reboot, 0, 0, 0, null),
        "swapon" => {
            let p = cpath("/tmp/nonexistent-swap");
            sys!(libc::SYS_swapon, p.as_ptr(), 0)
        }
        "clock_settime" => sys!(libc::SYS_clock_settime, libc::CLOCK_REALTIME, null),
        "settimeofday" => sys!(libc::SYS_settimeofday, null, null),
        "acct" => sys!(libc::SYS_acct, null),
        "quotactl" => sys!(libc::SYS_quotactl, 0, null, 0, null),
        "open_by_handle_at" => sys!(libc::SYS_open_by_handle_at, -1, null, 0),
        "name_to_handle_at" => sys!(libc::SYS_name_to_handle_at, -1, tmp.as_ptr(), null, null, 0),
        "pidfd_getfd" => sys!(libc::SYS_pidfd_getfd, -1, -1, 0),
        "iopl" => sys!(libc::SYS_iopl, 3),
        "ioperm" => sys!(libc::SYS_ioperm, 0x80, 1, 1),
        "syslog" => sys!(libc::SYS_syslog, 10 /* SIZE_BUFFER */, null, 0),
        "personality-noaslr" => sys!(libc::SYS_personality, 0x0040000 /* ADDR_NO_RANDOMIZE */),
        "personality-query" => sys!(libc::SYS_personality, 0xffff_ffffu32),
        "personality-linux32" => {
            let r = sys!(libc::SYS_personality, 0x0008u32);
            // Put the persona back for the probes that follow in this process.
            // SAFETY: personality takes an integer.
            unsafe { libc::syscall(libc::SYS_personality, 0u32) };
            r
        }
        "personality-read-implies-exec" => sys!(libc::SYS_personality, 0x0040_0000u32),
        "openat2" => {
            // struct open_how { flags, mode, resolve }: a setuid file it would create.
            let how: [u64; 3] = [(libc::O_CREAT | libc::O_WRONLY) as u64, 0o4755, 0];
            let p = cpath("/tmp/stockade-probe-openat2");
            sys!(libc::SYS_openat2, libc::AT_FDCWD, p.as_ptr(), how.as_ptr(), std::mem::size_of_val(&how))
        }
        "mknod-char" => {
            let p = cpath("/tmp/probe-char");
            sys!(libc::SYS_mknodat, libc::AT_FDCWD, p.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3))
        }
        "mknod-block" => {
            let p = cpath("/tmp/probe-block");
            sys!(libc::SYS_mknodat, libc::AT_FDCWD, p.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(8, 0))
        }
        "mknod-fifo" => {
            let p = cpath(&format!("/tmp/probe-fifo-{}", std::process::id()));
            sys!(libc::SYS_mknodat, libc::AT_FDCWD, p.as_ptr(), libc::S_IFIFO | 0o600, 0)
        }
        "tiocsti" => {
            let c = b'x';
            sys!(libc::SYS_ioctl, 0, libc::TIOCSTI, &c as *const u8)
        }
        "tioclinux" => {
            let sub = [6u8, 0]; // TIOCL_GETSHIFTSTATE
            sys!(libc::SYS_ioctl, 0, libc::TIOCLINUX, sub.as_ptr())
        }
        "socket-raw" => sys!(libc::SYS_socket, libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        "socket-packet" => sys!(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0),
        "socket-netlink" => sys!(libc::SYS_socket, libc::AF_NETLINK, libc::SOCK_RAW, 0),
        "socket-inet" => sys!(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
        "socketpair-unix" => {
            let mut fds = [0i32; 2];
            sys!(libc::SYS_socketpair, libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr())
        }
        "sethostname" => {
            let h = b"escaped";
            sys!(libc::SYS_sethostname, h.as_ptr(), h.len())
        }
        "kcmp" => sys!(libc::SYS_kcmp, 1, 1, 0, 0, 0),
        "fanotify_init" => sys!(libc::SYS_fanotify_init, 0, 0),
        "fsopen" => {
            let fs = cpath("tmpfs");
            sys!(libc::SYS_fsopen, fs.as_ptr(), 0)
        }
        "open_tree" => sys!(libc::SYS_open_tree, libc::AT_FDCWD, tmp.as_ptr(), 1 /* OPEN_TREE_CLONE */),
        "x32-getpid" => x32_getpid(),
        "fork-bomb" => fork_bomb(),
        "int80-getpid" => int80_getpid(),
        _ => return None,
    })
}

/// The fork bomb, in `__probe` form: `ok N` means nothing stopped it.
fn fork_bomb() -> ProbeResult {
    match super::checks::fork_children(1000, 3) {
        Ok(n) => Ok(format!("{n} forks")),
        Err((n, e)) => {
            println!("stopped after {n} forks");
            Err(e)
        }
    }
}

fn clone_with(flags: u64) -> ProbeResult {
    // SAFETY: fork-like clone (no CLONE_VM); the child only calls _exit.
    let r = unsafe { libc::syscall(libc::SYS_clone, flags | libc::SIGCHLD as u64, 0usize, 0usize, 0usize, 0usize) };
    match r {
        0 => {
            // SAFETY: _exit in the child of a fork-like clone.
            unsafe { libc::_exit(0) }
        }
        r if r < 0 => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
        pid => {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            Ok(format!("child {pid}"))
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn x32_getpid() -> ProbeResult {
    let mut rax: i64 = 0x4000_0000 + 39; // __X32_SYSCALL_BIT | getpid
                                         // SAFETY: a bare syscall instruction invoking getpid through the x32 table; it takes no
                                         // arguments and clobbers only rax, rcx and r11, which are declared.
    unsafe {
        std::arch::asm!("syscall", inout("rax") rax, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    if rax < 0 {
        Err(-rax as i32)
    } else {
        Ok(format!("pid {rax}"))
    }
}

#[cfg(target_arch = "x86_64")]
fn int80_getpid() -> ProbeResult {
    let mut eax: i32 = 20; // getpid in the ia32 table
                           // SAFETY: `int 0x80` enters the ia32 syscall table with getpid, which takes no arguments;
                           // only eax is written.
    unsafe {
        std::arch::asm!("int 0x80", inout("eax") eax, options(nostack));
    }
    if eax < 0 {
        Err(-eax)
    } else {
        Ok(format!("pid {eax}"))
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn x32_getpid() -> ProbeResult {
    Err(libc::ENOSYS)
}
#[cfg(not(target_arch = "x86_64"))]
fn int80_getpid() -> ProbeResult {
    Err(libc::ENOSYS)
}

/// `NAME ok ...` or `NAME ERRNO` for each probe, one line each, flushed as it goes so that a
/// SIGSYS death still shows which probe caused it.
pub fn main(names: &[String]) -> i32 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for n in names {
        let _ = write!(out, "{n} ");
        let _ = out.flush();
        match run(n) {
            None => {
                let _ = writeln!(out, "UNKNOWN");
                return 2;
            }
            Some(Ok(d)) => {
                let _ = writeln!(out, "ok {d}");
            }
            Some(Err(e)) => {
                let _ = writeln!(out, "{}", errno_name(e));
            }
        }
        let _ = out.flush();
    }
    0
}

pub fn errno_name(e: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(e))
}
