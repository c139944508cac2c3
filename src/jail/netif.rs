//! Step 3b: the jail's network namespace starts with a single, down loopback interface.
//! Mode `loopback` brings it up; mode `none` leaves the jail with no usable interface at all;
//! mode `veth` also configures `eth0`, which the supervisor moved in (see `net`).

use std::os::fd::{AsFd, OwnedFd};

use super::error::{JailError, Step};

/// Whether the jail's network namespace comes with its clone rather than from [`NetnsHelper`]:
/// in veth mode the supervisor moves the session's link into it right after the clone, and a
/// /sys can only be mounted from inside it. The supervisor (clone flags) and the jail (whether to
/// make one) both ask this, so they cannot disagree and leave the jail in the host's namespace.
pub fn namespace_with_clone(p: &crate::policy::Policy) -> bool {
    p.network.mode == crate::policy::NetMode::Veth || p.filesystem.sys == crate::policy::SysMode::ReadOnly
}

/// The jail's network namespace in the making. Creating a network namespace is the dearest part
/// of a jail's start (~0.5 ms here: every protocol's sysctl tables and per-namespace state), and
/// the jail needs it only once its filesystem is built, so the supervisor has a helper process
/// make it meanwhile, on the supervisor's CPU, where it would otherwise only wait.
///
/// A process of the supervisor rather than a thread of the jail: a thread would either share the
/// jail's CPU with the filesystem work or put the jail's address space on a second CPU, whose
/// sleeping vCPU the jail's exit then has to wake for a TLB flush (see `affinity`). The helper
/// joins the jail's user namespace, so the new namespace is owned by it, exactly as one made by
/// the clone would be, and hands it back over a socket. It is cloned with CLONE_VM, like the
/// command's start (`spawn`): a fork would copy the supervisor's page tables (0.5 ms measured)
/// and make every page the supervisor writes afterwards a copy. Entering a user namespace needs
/// a single-threaded process with its own filesystem context, not its own memory. Sharing the
/// supervisor's memory while both run, it touches nothing but its stack and its arguments, and
/// makes its system calls through `rawsys` (libc's errno is the supervisor's too).
pub struct NetnsHelper {
    pid: nix::unistd::Pid,
    sock: OwnedFd,
    /// The helper's stack and arguments: freed only once it is reaped (see `Drop`).
    stack: super::rawsys::ChildStack,
    args: Box<HelperArgs>,
    reaped: bool,
}

/// Descriptor numbers in the helper's own table (a copy of the supervisor's, made by the clone).
struct HelperArgs {
    userns: i32,
    sock: i32,
    loopback: bool,
}

/// The helper's steps, for its failure record.
const HELPER_STEPS: [&str; 7] = [
    "",
    "join the jail's user namespace",
    "unshare",
    "socket",
    "SIOCGIFFLAGS lo",
    "SIOCSIFFLAGS lo up",
    "hand the namespace over",
];

impl NetnsHelper {
    /// Starts the helper for the jail `child` (its id maps written), with loopback up when
    /// `loopback`, on the calling thread's current CPU.
    pub fn start(child: nix::unistd::Pid, loopback: bool) -> Result<NetnsHelper, JailError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        use nix::unistd::Pid;
        use std::os::fd::AsRawFd;
        let err = |what: &str, e: &dyn std::fmt::Display| JailError::new(Step::Namespaces, format!("{what}: {e}"));
        let userns = super::fsio::open(
            format!("/proc/{child}/ns/user").as_str(),
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| err("open the jail's user namespace", &e))?;
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| err("socketpair", &e))?;
        let args = Box::new(HelperArgs { userns: userns.as_raw_fd(), sock: theirs.as_raw_fd(), loopback });
        let mut stack = super::rawsys::ChildStack::allocate();
        // The child starts on a CPU its parent may use: this thread's CPU only, for the clone.
        let saved = nix::sched::sched_getaffinity(Pid::from_raw(0)).ok();
        if let (Ok(cpu), Some(_)) = (nix::sched::sched_getcpu(), &saved) {
            let mut one = nix::sched::CpuSet::new();
            if one.set(cpu).is_ok() {
                let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &one);
            }
        }
        // SAFETY: the child runs `helper_main` on `stack` with `args`, both kept alive until it
        // is reaped (`finish` or `Drop`); it makes raw system calls only and touches no other
        // memory of this process (see the type's doc).
        let pid = unsafe {
            libc::clone(
                helper_main,
                stack.top(),
                libc::CLONE_VM | libc::SIGCHLD,
                &*args as *const HelperArgs as *mut libc::c_void,
            )
        };
        let clone_err = std::io::Error::last_os_error();
        // The helper has its own copies now. Ours must go: with the helper's end of the socket
        // still open here, a helper that died without a word would leave `finish` waiting for
        // ever instead of seeing end-of-file.
        drop((userns, theirs));
        if let Some(set) = saved {
            let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &set);
        }
        if pid < 0 {
            return Err(err("start the network namespace helper", &clone_err));
        }
        Ok(NetnsHelper { pid: Pid::from_raw(pid), sock: ours, stack, args, reaped: false })
    }

    /// Waits for the namespace and reaps the helper.
    pub fn finish(mut self) -> Result<OwnedFd, JailError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd, FromRawFd};
        let mut rec = [0u8; 5];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let got = {
            let mut iov = [std::io::IoSliceMut::new(&mut rec)];
            loop {
                match recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => break Err(e.to_string()),
                    Ok(m) => {
                        let mut fd = None;
                        for c in m.cmsgs().into_iter().flatten() {
                            if let ControlMessageOwned::ScmRights(r) = c {
                                // SAFETY: descriptors just received belong to nothing else.
                                let mut owned = r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) });
                                fd = owned.next();
                            }
                        }
                        break Ok((m.bytes, fd));
                    }
                }
            }
        };
        self.reap(false);
        let fail = |m: String| JailError::new(Step::Namespaces, format!("network namespace: {m}"));
        match got {
            Ok((_, Some(fd))) => Ok(fd),
            Ok((5, None)) => {
                let step = HELPER_STEPS.get(rec[0] as usize).copied().unwrap_or("?");
                let errno = nix::errno::Errno::from_raw(i32::from_ne_bytes([rec[1], rec[2], rec[3], rec[4]]));
                Err(fail(format!("{step}: {}", errno.desc())))
            }
            Ok(_) => Err(fail("the helper ended without sending it".into())),
            Err(e) => Err(fail(format!("receive it: {e}"))),
        }
    }

    fn reap(&mut self, kill: bool) {
        if self.reaped {
            return;
        }
        if kill {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
        while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(self.pid, None) {}
        self.reaped = true;
    }
}

impl Drop for NetnsHelper {
    /// The helper runs on memory of this struct: it must be gone before that memory is freed.
    fn drop(&mut self) {
        self.reap(true);
        let _ = (&self.stack, &self.args);
    }
}

/// The helper (see `NetnsHelper`): raw system calls on its arguments and its own stack only.
extern "C" fn helper_main(arg: *mut libc::c_void) -> libc::c_int {
    use super::rawsys::syscall;
    // SAFETY: `arg` is the `HelperArgs` the supervisor passed to clone, alive until this
    // process is reaped.
    let a = unsafe { &*(arg as *const HelperArgs) };
    let sock = a.sock as usize;
    // SAFETY: for the calls below, system calls on descriptors owned by `a` and on buffers on
    // this stack; the process ends with exit(2) and never returns into the supervisor's code.
    unsafe {
        let exit = |code: usize| -> ! {
            let _ = syscall(libc::SYS_exit, [code, 0, 0, 0, 0, 0]);
            unreachable!("exit returned")
        };
        let fail = |step: u8, errno: i32| -> ! {
            let mut rec = [step, 0, 0, 0, 0];
            rec[1..].copy_from_slice(&errno.to_ne_bytes());
            let _ =
                syscall(libc::SYS_sendto, [sock, rec.as_ptr() as usize, rec.len(), libc::MSG_NOSIGNAL as usize, 0, 0]);
            exit(1)
        };
        let _ = syscall(libc::SYS_prctl, [libc::PR_SET_PDEATHSIG as usize, libc::SIGKILL as usize, 0, 0, 0, 0]);
        if let Err(e) = syscall(libc::SYS_setns, [a.userns as usize, libc::CLONE_NEWUSER as usize, 0, 0, 0, 0]) {
            fail(1, e);
        }
        if let Err(e) = syscall(libc::SYS_unshare, [libc::CLONE_NEWNET as usize, 0, 0, 0, 0, 0]) {
            fail(2, e);
        }
        if a.loopback {
            if let Err((step, e)) = loopback_up_raw() {
                fail(step, e);
            }
        }
        let path = c"/proc/thread-self/ns/net";
        let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as usize;
        let ns = match syscall(libc::SYS_openat, [libc::AT_FDCWD as usize, path.as_ptr() as usize, flags, 0, 0, 0]) {
            Ok(fd) => fd as i32,
            Err(e) => fail(6, e),
        };
        let mut byte = 0u8;
        let mut iov = libc::iovec { iov_base: (&mut byte as *mut u8).cast(), iov_len: 1 };
        // Room for one descriptor's control message, aligned for cmsghdr.
        let mut control = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), ns);
        if let Err(e) = syscall(
            libc::SYS_sendmsg,
            [sock, &msg as *const libc::msghdr as usize, libc::MSG_NOSIGNAL as usize, 0, 0, 0],
        ) {
            fail(6, e);
        }
        exit(0)
    }
}

/// Brings `lo` up with raw system calls only (the helper's constraint, see `NetnsHelper`); the
/// failed step (see `HELPER_STEPS`) and errno.
fn loopback_up_raw() -> Result<(), (u8, i32)> {
    use super::rawsys::syscall;
    let inet = [libc::AF_INET as usize, (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as usize, 0, 0, 0, 0];
    // SAFETY: plain socket(2) call; the returned fd is closed below.
    let sock = unsafe { syscall(libc::SYS_socket, inet) }.map_err(|e| (3, e))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    let get = [sock, libc::SIOCGIFFLAGS as usize, &mut req as *mut libc::ifreq as usize, 0, 0, 0];
    // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills in ifru_flags.
    let result = match unsafe { syscall(libc::SYS_ioctl, get) } {
        Err(e) => Err((4, e)),
        Ok(_) => {
            // SAFETY: the union field was just written by SIOCGIFFLAGS.
            unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
            let set = [sock, libc::SIOCSIFFLAGS as usize, &req as *const libc::ifreq as usize, 0, 0, 0];
            // SAFETY: `req` is a valid ifreq with the flags to set.
            unsafe { syscall(libc::SYS_ioctl, set) }.map(|_| ()).map_err(|e| (5, e))
        }
    };
    // SAFETY: `sock` is a descriptor we own and close exactly once.
    let _ = unsafe { syscall(libc::SYS_close, [sock, 0, 0, 0, 0, 0]) };
    result
}

/// Moves the calling process into the network namespace `ns`.
pub fn enter(ns: &OwnedFd) -> Result<(), JailError> {
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| JailError::new(Step::Namespaces, format!("enter the new network namespace: {e}")))
}

pub fn loopback_up() -> Result<(), JailError> {
    loopback_up_raw().map_err(|(step, errno)| {
        JailError::new(
            Step::Network,
            format!("{}: {}", HELPER_STEPS[step as usize], nix::errno::Errno::from_raw(errno).desc()),
        )
    })
}

/// `eth0`: the jail's address in the session's /30, up, and the default route through the host end.
pub fn veth_up(jail: std::net::Ipv4Addr, gateway: std::net::Ipv4Addr) -> Result<(), JailError> {
    let e = |what: &str, err: std::io::Error| JailError::new(Step::Network, format!("{what}: {err}"));
    let mut r = crate::net::rtnl::Rtnl::open().map_err(|err| e("netlink", err))?;
    r.add_addr4("eth0", jail, 30).map_err(|err| e(&format!("address {jail} on eth0"), err))?;
    r.set_up("eth0").map_err(|err| e("eth0 up", err))?;
    r.add_default_route4("eth0", gateway).map_err(|err| e(&format!("default route via {gateway}"), err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_helper_reports_its_step_and_is_reaped() {
        // Entering one's own user namespace is refused (EINVAL) whatever the privileges: the
        // helper's first step fails, and the report names it.
        let me = nix::unistd::getpid();
        let e = NetnsHelper::start(me, true).and_then(NetnsHelper::finish).unwrap_err();
        assert!(e.msg.contains("join the jail's user namespace: Invalid argument"), "{e:?}");
        // Dropped without `finish`: killed and reaped, never left running on freed memory.
        let h = NetnsHelper::start(me, true).unwrap();
        let pid = h.pid;
        drop(h);
        assert_eq!(
            nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
            Err(nix::errno::Errno::ECHILD)
        );
    }

    #[test]
    fn a_helper_that_dies_without_a_word_ends_the_wait() {
        // A real target, so the helper spends its ~0.5 ms making a namespace: killed meanwhile,
        // it never reports, and `finish` must see end-of-file rather than wait for ever.
        let mut target = std::process::Command::new("unshare").args(["-U", "sleep", "30"]).spawn().unwrap();
        let pid = nix::unistd::Pid::from_raw(target.id() as i32);
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
        let t = std::time::Instant::now();
        while ns(&pid.to_string()) == ns("self") && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The kill races the helper's work; a helper that finished first proves nothing, so
        // try again until one is caught before it reported.
        let mut outcome = None;
        for _ in 0..50 {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let h = NetnsHelper::start(pid, true).unwrap();
                let _ = nix::sys::signal::kill(h.pid, nix::sys::signal::Signal::SIGKILL);
                let _ = tx.send(h.finish().map(|_| ()).map_err(|e| e.msg));
            });
            match rx.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok(Ok(())) => continue,
                r => {
                    outcome = Some(r);
                    break;
                }
            }
        }
        let _ = target.kill();
        let _ = target.wait();
        let r = outcome.expect("the helper always reported before the kill");
        let msg = r.expect("finish never returned").unwrap_err();
        assert!(msg.contains("the helper ended without sending it"), "{msg}");
    }
}
