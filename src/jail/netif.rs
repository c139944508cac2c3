//! Step 3b: the jail's network namespace starts with a single, down loopback interface.
//! Mode `loopback` brings it up; mode `none` leaves the jail with no usable interface at all;
//! mode `veth` also configures `eth0`, which the supervisor moved in (see `net`).

use super::error::{JailError, Step};

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
    let r = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) };
    let result = if r < 0 {
        Err(err("SIOCGIFFLAGS lo"))
    } else {
        // SAFETY: the union field was just written by SIOCGIFFLAGS.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        // SAFETY: `req` is a valid ifreq with the flags to set.
        if unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) } < 0 {
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
