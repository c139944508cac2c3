//! The two pipes between the host-side supervisor and the jail.
//!
//! * `go`, a socket pair: the supervisor sends `G` once the uid/gid maps are written (and, in
//!   veth mode, the session's network is up), then the jail's cgroup (see `send_cgroup`), which
//!   it creates while the jail builds its filesystem. EOF (the supervisor died) is the order to
//!   exit.
//! * `report`: the jail writes at most one failure record; every copy of the write end is
//!   close-on-exec, so EOF with no record means the command was exec'd.

use nix::fcntl::OFlag;
use nix::unistd::{pipe2, read, write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use super::error::{JailError, Step};

pub struct SyncPipes {
    pub go_read: OwnedFd,
    pub go_write: OwnedFd,
    pub report_read: OwnedFd,
    pub report_write: OwnedFd,
}

impl SyncPipes {
    pub fn new() -> nix::Result<Self> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (go_read, go_write) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        let (report_read, report_write) = pipe2(OFlag::O_CLOEXEC)?;
        Ok(SyncPipes { go_read, go_write, report_read, report_write })
    }
}

pub const GO: u8 = b'G';

/// Supervisor side: release the jail (`GO`).
pub fn send(fd: &OwnedFd, what: u8) -> nix::Result<()> {
    write(fd.as_fd(), &[what]).map(|_| ())
}

/// Supervisor side: the jail's cgroup, as the `tasks` files it enters by itself (possibly none).
pub fn send_cgroup(fd: &OwnedFd, entry: Option<&super::cgroups::Entry>) -> nix::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let (paths, fds) = entry.map(|e| e.for_sending()).unwrap_or_default();
    let mut msg = b"C".to_vec();
    for p in &paths {
        msg.extend_from_slice(p.as_os_str().as_encoded_bytes());
        msg.push(0);
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [std::io::IoSlice::new(&msg)];
    sendmsg::<()>(fd.as_raw_fd(), &iov, if raw.is_empty() { &[] } else { &cmsg }, MsgFlags::empty(), None).map(|_| ())
}

/// Jail side: the cgroup to enter. `Err(None)` when the supervisor went away first, `Err(Some)`
/// when its message cannot be read (then the jail must not run: it would run unbounded).
pub fn recv_cgroup(fd: &OwnedFd) -> Result<Option<super::cgroups::Entry>, Option<String>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut buf = vec![0u8; 8192];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let (n, fds) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let m = loop {
            match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other.map_err(|e| Some(format!("receive the cgroup: {e}")))?,
            }
        };
        if m.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(Some("receive the cgroup: descriptors truncated".into()));
        }
        let mut fds = Vec::new();
        for c in m.cmsgs().map_err(|e| Some(format!("receive the cgroup: {e}")))? {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: descriptors just received with SCM_RIGHTS belong to nothing else.
                fds.extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        (m.bytes, fds)
    };
    if n == 0 {
        return Err(None);
    }
    if buf[0] != b'C' {
        return Err(Some("receive the cgroup: unexpected message".into()));
    }
    let paths: Vec<std::path::PathBuf> = buf[1..n]
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        .collect();
    if paths.is_empty() && fds.is_empty() {
        return Ok(None);
    }
    if paths.len() != fds.len() {
        return Err(Some(format!("receive the cgroup: {} paths but {} descriptors", paths.len(), fds.len())));
    }
    Ok(Some(super::cgroups::Entry::received(paths.into_iter().zip(fds).collect())))
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
