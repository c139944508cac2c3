//! Step 3b: the jail's network namespace starts with a single, down loopback interface.
//! Mode `loopback` brings it up; mode `none` leaves the jail with no usable interface at all;
//! mode `veth` also configures `eth0`, which the supervisor moved in (see `net`). The namespace
//! comes with the jail's clone.

use super::error::{JailError, Step};

/// Brings `lo` up (SIOCSIFFLAGS on a datagram socket of the jail's new namespace).
pub(crate) fn loopback_up() -> Result<(), JailError> {
    let fail = |what: &str, e: std::io::Error| JailError::new(Step::Network, format!("{what}: {e}"));
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills in ifru_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } != 0 {
        return Err(fail("SIOCGIFFLAGS lo", std::io::Error::last_os_error()));
    }
    // SAFETY: the union field was just written by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: `req` is a valid ifreq with the flags to set.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } != 0 {
        return Err(fail("SIOCSIFFLAGS lo up", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `eth0`: no IPv6 address (see `net::disable_ipv6` for the host end), the jail's address in the session's /30, up, and the default route through
/// the host end.
pub(crate) fn veth_up(jail: std::net::Ipv4Addr, gateway: std::net::Ipv4Addr) -> Result<(), JailError> {
    let mut r = crate::net::rtnl::Rtnl::open()?;
    r.no_ipv6_addresses("eth0")?;
    r.add_addr4("eth0", jail, 30)?;
    r.set_up("eth0")?;
    Ok(r.add_default_route4("eth0", gateway)?)
}
