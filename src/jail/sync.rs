//! The two pipes between the host-side supervisor and the jail.
//!
//! * `go`: the supervisor writes `G` once the uid/gid maps are written (and, in veth mode, the
//!   session's network is up). EOF (the supervisor died) is the order to exit.
//! * `report`: the jail writes at most one failure record; every copy of the write end is
//!   close-on-exec, so EOF with no record means the command was exec'd.

use nix::fcntl::OFlag;
use nix::unistd::{pipe2, read, write};
use std::os::fd::{AsFd, OwnedFd};

use super::error::{JailError, Step};

pub struct SyncPipes {
    pub go_read: OwnedFd,
    pub go_write: OwnedFd,
    pub report_read: OwnedFd,
    pub report_write: OwnedFd,
}

impl SyncPipes {
    pub fn new() -> nix::Result<Self> {
        let (go_read, go_write) = pipe2(OFlag::O_CLOEXEC)?;
        let (report_read, report_write) = pipe2(OFlag::O_CLOEXEC)?;
        Ok(SyncPipes { go_read, go_write, report_read, report_write })
    }
}

pub const GO: u8 = b'G';

/// Supervisor side: release the jail (`GO`).
pub fn send(fd: &OwnedFd, what: u8) -> nix::Result<()> {
    write(fd.as_fd(), &[what]).map(|_| ())
}

/// Jail side: wait for `what`. Returns false when the supervisor went away.
pub fn wait_for(fd: &OwnedFd, what: u8) -> bool {
    let mut b = [0u8; 1];
    loop {
        match read(fd.as_fd(), &mut b) {
            Ok(1) => return b[0] == what,
            Ok(_) => return false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Jail side: a failure record, `step \t errno \t message`, written in one call so it is atomic
/// (records are far below PIPE_BUF).
pub fn send_failure(fd: &OwnedFd, err: &JailError) {
    let msg: String = err.msg.chars().filter(|c| *c != '\t').take(3000).collect();
    let rec = format!("{}\t{}\t{}", err.step.name(), err.errno.unwrap_or(0), msg);
    let _ = write(fd.as_fd(), rec.as_bytes());
}

/// Supervisor side: read until EOF. `None` means the command was exec'd.
pub fn read_report(fd: &OwnedFd) -> Option<JailError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match read(fd.as_fd(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    if buf.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&buf);
    let mut parts = text.splitn(3, '\t');
    let step = Step::from_name(parts.next().unwrap_or(""));
    let errno = parts.next().and_then(|e| e.parse::<i32>().ok()).filter(|e| *e != 0);
    let msg = parts.next().unwrap_or("jail reported a malformed failure").to_owned();
    Some(JailError { step, msg, errno })
}
