//! Step 3b: the jail's network namespace starts with a single, down loopback interface.
//! Mode `loopback` brings it up; mode `none` leaves the jail with no usable interface at all.

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
