//! Step 3b: the jail's network namespace starts with a single, down loopback interface.
//! Mode `loopback` brings it up; mode `none` leaves the jail with no usable interface at all;
//! mode `veth` also configures `eth0`, which the supervisor moved in (see `net`).

use std::os::fd::{AsFd, OwnedFd};

use super::error::{JailError, Step};

/// Whether the jail's network namespace comes with its clone rather than from [`PendingNetns`]:
/// in veth mode the supervisor moves the session's link into it right after the clone, and a
/// /sys can only be mounted from inside it. The supervisor (clone flags) and the jail (whether to
/// make one) both ask this, so they cannot disagree and leave the jail in the host's namespace.
pub fn namespace_with_clone(p: &crate::policy::Policy) -> bool {
    p.network.mode == crate::policy::NetMode::Veth || p.filesystem.sys == crate::policy::SysMode::ReadOnly
}

/// The jail's network namespace in the making. Creating a network namespace is the dearest part
/// of a jail's start (~0.5 ms here: every protocol's sysctl tables and per-namespace state), and
/// nothing before the network step needs it, so a helper thread of the jail child makes it while
/// the child builds its filesystem. The thread is already in the jail's user namespace, so the
/// new namespace is owned by it, exactly as one made by the clone would be. `enter` joins the
/// thread, so the child is single-threaded again before anything that relies on it.
pub struct PendingNetns(std::thread::JoinHandle<Result<OwnedFd, JailError>>);

impl PendingNetns {
    /// Starts the thread: a new network namespace, with loopback up when `loopback`.
    pub fn start(loopback: bool) -> Result<PendingNetns, JailError> {
        std::thread::Builder::new()
            .name("netns".into())
            .stack_size(256 << 10)
            .spawn(move || {
                // unshare acts on the calling thread only: the rest of the jail stays where it is
                // until `enter`.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| JailError::new(Step::Namespaces, format!("unshare network namespace: {e}")))?;
                if loopback {
                    loopback_up()?;
                }
                std::fs::File::open("/proc/thread-self/ns/net")
                    .map(OwnedFd::from)
                    .map_err(|e| JailError::new(Step::Namespaces, format!("open the new network namespace: {e}")))
            })
            .map(PendingNetns)
            .map_err(|e| JailError::new(Step::Namespaces, format!("start the network namespace thread: {e}")))
    }

    /// Moves the jail into the namespace the thread made.
    pub fn enter(self) -> Result<(), JailError> {
        let ns =
            self.0.join().map_err(|_| JailError::new(Step::Namespaces, "the network namespace thread panicked"))??;
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| JailError::new(Step::Namespaces, format!("enter the new network namespace: {e}")))
    }
}

pub fn loopback_up() -> Result<(), JailError> {
    let err = |what: &str| JailError::new(Step::Network, format!("{what}: {}", std::io::Error::last_os_error()));
    // SAFETY: plain socket(2) call; the returned fd is checked and closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(err("socket"));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills in ifru_flags.
    let r = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req) };
    let result = if r < 0 {
        Err(err("SIOCGIFFLAGS lo"))
    } else {
        // SAFETY: the union field was just written by SIOCGIFFLAGS.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        // SAFETY: `req` is a valid ifreq with the flags to set.
        if unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &req) } < 0 {
            Err(err("SIOCSIFFLAGS lo up"))
        } else {
            Ok(())
        }
    };
    // SAFETY: `sock` is a descriptor we own and close exactly once.
    unsafe { libc::close(sock) };
    result
}

/// `eth0`: the jail's address in the session's /30, up, and the default route through the host end.
pub fn veth_up(jail: std::net::Ipv4Addr, gateway: std::net::Ipv4Addr) -> Result<(), JailError> {
    let e = |what: &str, err: std::io::Error| JailError::new(Step::Network, format!("{what}: {err}"));
    let mut r = crate::net::rtnl::Rtnl::open().map_err(|err| e("netlink", err))?;
    r.add_addr4("eth0", jail, 30).map_err(|err| e(&format!("address {jail} on eth0"), err))?;
    r.set_up("eth0").map_err(|err| e("eth0 up", err))?;
    r.add_default_route4("eth0", gateway).map_err(|err| e(&format!("default route via {gateway}"), err))
}
