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
/// A process rather than a thread of the jail: a thread would either share the jail's CPU with
/// the filesystem work or put the jail's address space on a second CPU, whose sleeping vCPU the
/// jail's exit then has to wake for a TLB flush (see `affinity`). The helper is a fork of the
/// supervisor that joins the jail's user namespace, so the new namespace is owned by it, exactly
/// as one made by the clone would be, and hands it back over a socket. Only raw system calls run
/// in it: the supervisor may be multi-threaded (the worker).
pub struct NetnsHelper {
    pid: nix::unistd::Pid,
    sock: OwnedFd,
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
    /// Forks the helper for the jail `child` (its id maps written), with loopback up when
    /// `loopback`.
    pub fn start(child: nix::unistd::Pid, loopback: bool) -> Result<NetnsHelper, JailError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        use std::os::fd::AsRawFd;
        let err = |what: &str, e: &dyn std::fmt::Display| JailError::new(Step::Namespaces, format!("{what}: {e}"));
        let userns: OwnedFd = std::fs::File::open(format!("/proc/{child}/ns/user"))
            .map_err(|e| err("open the jail's user namespace", &e))?
            .into();
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| err("socketpair", &e))?;
        let (userns_fd, theirs_fd) = (userns.as_raw_fd(), theirs.as_raw_fd());
        // SAFETY: the child runs `helper_main` only, which makes raw system calls and ends with
        // _exit: nothing in it allocates or takes a lock another thread may have held at fork.
        match unsafe { libc::fork() } {
            -1 => Err(err("fork the network namespace helper", &std::io::Error::last_os_error())),
            0 => helper_main(userns_fd, theirs_fd, loopback),
            pid => {
                let pid = nix::unistd::Pid::from_raw(pid);
                // Beside the supervisor, away from the jail's CPU (see the type's doc).
                if let Ok(cpu) = nix::sched::sched_getcpu() {
                    let mut one = nix::sched::CpuSet::new();
                    if one.set(cpu).is_ok() {
                        let _ = nix::sched::sched_setaffinity(pid, &one);
                    }
                }
                Ok(NetnsHelper { pid, sock: ours })
            }
        }
    }

    /// Waits for the namespace and reaps the helper.
    pub fn finish(self) -> Result<OwnedFd, JailError> {
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
        let _ = nix::sys::wait::waitpid(self.pid, None);
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
}

/// The helper: system calls only (see `NetnsHelper`).
fn helper_main(userns: i32, sock: i32, loopback: bool) -> ! {
    // SAFETY (for the calls below): raw system calls on descriptors inherited from the
    // supervisor and on buffers on this stack; the process ends with _exit.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
        let fail = |step: u8, errno: i32| -> ! {
            let mut rec = [step, 0, 0, 0, 0];
            rec[1..].copy_from_slice(&errno.to_ne_bytes());
            libc::send(sock, rec.as_ptr().cast(), rec.len(), libc::MSG_NOSIGNAL);
            libc::_exit(1)
        };
        let errno = || nix::errno::Errno::last_raw();
        if libc::setns(userns, libc::CLONE_NEWUSER) != 0 {
            fail(1, errno());
        }
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            fail(2, errno());
        }
        if loopback {
            if let Err((step, e)) = loopback_up_raw() {
                fail(step, e);
            }
        }
        let ns = libc::open(c"/proc/thread-self/ns/net".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if ns < 0 {
            fail(6, errno());
        }
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
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) < 0 {
            fail(6, errno());
        }
        libc::_exit(0)
    }
}

/// Brings `lo` up with system calls only; the failed step (see `HELPER_STEPS`) and errno.
fn loopback_up_raw() -> Result<(), (u8, i32)> {
    let errno = || nix::errno::Errno::last_raw();
    // SAFETY: plain socket(2) call; the returned fd is checked and closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err((3, errno()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills in ifru_flags.
    let result = if unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        Err((4, errno()))
    } else {
        // SAFETY: the union field was just written by SIOCGIFFLAGS.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        // SAFETY: `req` is a valid ifreq with the flags to set.
        if unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &req) } < 0 {
            Err((5, errno()))
        } else {
            Ok(())
        }
    };
    // SAFETY: `sock` is a descriptor we own and close exactly once.
    unsafe { libc::close(sock) };
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
