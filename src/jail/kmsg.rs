//! Which system call a seccomp filter killed a process for, from the kernel's log.
//!
//! A process killed by a filter's `kill` action dies of SIGSYS, and nothing its parent sees names
//! the call. The kernel logs each such kill (audit record type 1326, `sig=31 … syscall=N`, with
//! the process's host uid) to its ring buffer unless an audit daemon takes the records; reading
//! /dev/kmsg needs root where `kernel.dmesg_restrict` is set.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

/// The kernel's clock for log records (microseconds since boot), as nearly as user space reads it.
pub(crate) fn now_usec() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass, and nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000
}

/// The system call number of the last seccomp kill of a process running as `host_uid`, logged at
/// or after `since_usec` (less a second's slack for the two clocks); None when the log has none or
/// cannot be read.
pub(crate) fn seccomp_kill(host_uid: u32, since_usec: u64) -> Option<u32> {
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
    let uid = format!(" uid={host_uid} ");
    let from = since_usec.saturating_sub(1_000_000);
    let mut found = None;
    // One record per read; EAGAIN at the end of the buffer.
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // EPIPE: a record was overwritten while reading; the next read goes on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        };
        let rec = String::from_utf8_lossy(&buf[..n]);
        let Some((head, msg)) = rec.split_once(';') else { continue };
        let ts: u64 = head.split(',').nth(2).and_then(|t| t.parse().ok()).unwrap_or(0);
        if ts < from || !msg.contains("type=1326") || !msg.contains(" sig=31 ") || !msg.contains(&uid) {
            continue;
        }
        found = msg.split_whitespace().find_map(|w| w.strip_prefix("syscall=")).and_then(|n| n.parse().ok()).or(found);
    }
    found
}
