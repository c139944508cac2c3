//! The two pipes between the host-side supervisor and the jail.
//!
//! * `go`, a socket pair: the supervisor sends `G` once the uid/gid maps are written (and, in
//!   veth mode, the session's network is up), then the jail's cgroup and seccomp program (see
//!   [`Setup`]), which it makes while the jail builds its filesystem; with exec recording the
//!   jail sends back its exec listener (`send_listener`). EOF (the supervisor died) is the order
//!   to exit.
//! * `report`: the jail writes at most one failure record; every copy of the write end is
//!   close-on-exec, so EOF with no record means the command was exec'd.

use nix::fcntl::OFlag;
use nix::unistd::{pipe2, read, write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use super::error::{JailError, Step};

pub(super) struct SyncPipes {
    pub go_read: OwnedFd,
    pub go_write: OwnedFd,
    pub report_read: OwnedFd,
    pub report_write: OwnedFd,
}

impl SyncPipes {
    pub(super) fn new() -> nix::Result<Self> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (go_read, go_write) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        let (report_read, report_write) = pipe2(OFlag::O_CLOEXEC)?;
        Ok(SyncPipes { go_read, go_write, report_read, report_write })
    }
}

pub(super) const GO: u8 = b'G';

/// Supervisor side: release the jail (`GO`).
pub(super) fn send(fd: &OwnedFd, what: u8) -> nix::Result<()> {
    write(fd.as_fd(), &[what]).map(|_| ())
}

/// What the jail receives after `GO`, once the supervisor has made it: the cgroup to enter (as
/// the `tasks` files it enters by itself, possibly none) and the seccomp program to install.
pub(super) struct Setup {
    pub cgroup: Option<super::cgroups::Entry>,
    pub program: seccompiler::BpfProgram,
}

/// Supervisor side of [`Setup`], one datagram: `S`, the program's length in instructions (u32,
/// native order), the instructions, then the `tasks` paths, NUL-terminated, matching the
/// descriptors passed with SCM_RIGHTS.
pub(super) fn send_setup(
    fd: &OwnedFd,
    entry: Option<&super::cgroups::Entry>,
    program: &[seccompiler::sock_filter],
) -> nix::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let (paths, fds) = entry.map(|e| e.for_sending()).unwrap_or_default();
    let mut msg = Vec::with_capacity(6 + program.len() * 8 + 256);
    msg.push(b'S');
    msg.extend_from_slice(&(program.len() as u32).to_ne_bytes());
    for i in program {
        msg.extend_from_slice(&i.code.to_ne_bytes());
        msg.push(i.jt);
        msg.push(i.jf);
        msg.extend_from_slice(&i.k.to_ne_bytes());
    }
    for p in &paths {
        msg.extend_from_slice(p.as_os_str().as_encoded_bytes());
        msg.push(0);
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [std::io::IoSlice::new(&msg)];
    sendmsg::<()>(fd.as_raw_fd(), &iov, if raw.is_empty() { &[] } else { &cmsg }, MsgFlags::empty(), None).map(|_| ())
}

/// Jail side of [`Setup`]. `Err(None)` when the supervisor went away first, `Err(Some)` when its
/// message cannot be read (then the jail must not run: it would run unbounded or unfiltered).
pub(super) fn recv_setup(fd: &OwnedFd) -> Result<Setup, Option<String>> {
    use nix::sys::socket::{recv, recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let bad = |m: &str| Some(format!("receive the jail's setup: {m}"));
    // The datagram's size first (MSG_TRUNC reports the whole length), so the buffer is exact.
    let mut probe = [0u8; 1];
    let size = loop {
        match recv(fd.as_raw_fd(), &mut probe, MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(0) => return Err(None),
            other => break other.map_err(|e| bad(&e.to_string()))?,
        }
    };
    let mut buf = vec![0u8; size];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let (n, fds) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let m = loop {
            match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other.map_err(|e| bad(&e.to_string()))?,
            }
        };
        if m.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(bad("descriptors truncated"));
        }
        let mut fds = Vec::new();
        for c in m.cmsgs().map_err(|e| bad(&e.to_string()))? {
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
    let buf = &buf[..n];
    if buf[0] != b'S' || n < 5 {
        return Err(bad("unexpected message"));
    }
    let count = u32::from_ne_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
    let Some(rest) = buf[5..].get(count * 8..) else {
        return Err(bad(&format!("{count} filter instructions announced, {} bytes sent", n - 5)));
    };
    let program: seccompiler::BpfProgram = buf[5..5 + count * 8]
        .chunks_exact(8)
        .map(|c| seccompiler::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    if program.is_empty() {
        return Err(bad("no seccomp program"));
    }
    let paths: Vec<std::path::PathBuf> = rest
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        .collect();
    if paths.len() != fds.len() {
        return Err(bad(&format!("{} cgroup paths but {} descriptors", paths.len(), fds.len())));
    }
    let cgroup = (!paths.is_empty()).then(|| super::cgroups::Entry::received(paths.into_iter().zip(fds).collect()));
    Ok(Setup { cgroup, program })
}

/// Jail side: sends the exec filter's listener (`N` and the descriptor), and closes its copy.
pub(super) fn send_listener(fd: &OwnedFd, listener: OwnedFd) -> nix::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let raw = [listener.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"N")];
    sendmsg::<()>(fd.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&raw)], MsgFlags::empty(), None).map(|_| ())
}

/// Supervisor side of [`send_listener`]: `None` when the jail ended (or failed) first.
pub(super) fn recv_listener(fd: &OwnedFd) -> Option<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut buf = [0u8; 1];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let m = loop {
        match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.ok()?,
        }
    };
    let mut got = None;
    for c in m.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(r) = c {
            for f in r {
                // SAFETY: descriptors just received with SCM_RIGHTS belong to nothing else.
                let owned = unsafe { OwnedFd::from_raw_fd(f) };
                got.get_or_insert(owned);
            }
        }
    }
    if m.bytes != 1 {
        return None;
    }
    got.filter(|_| buf[0] == b'N')
}

/// Jail side: wait for `what`. Returns false when the supervisor went away.
pub(super) fn wait_for(fd: &OwnedFd, what: u8) -> bool {
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
pub(super) fn send_failure(fd: &OwnedFd, err: &JailError) {
    let msg: String = err.msg.chars().filter(|c| *c != '\t').take(3000).collect();
    let rec = format!("{}\t{}\t{}", err.step.name(), err.errno.unwrap_or(0), msg);
    let _ = write(fd.as_fd(), rec.as_bytes());
}

/// Marks the jail's view of itself on the report pipe: `SEEN`, the view, then a NUL; a failure
/// record may follow.
const SEEN: &[u8] = b"seen\0";

/// Jail side: the files that make up the jail's view of itself (see `observe`).
pub(super) fn send_seen(fd: &OwnedFd, raw: &[(&str, String)]) {
    let mut rec = SEEN.to_vec();
    for (name, text) in raw {
        rec.extend_from_slice(name.as_bytes());
        rec.push(b'\n');
        rec.extend_from_slice(text.replace('\0', "").as_bytes());
        rec.push(b'\x1e');
    }
    rec.push(0);
    let _ = write(fd.as_fd(), &rec);
}

/// Supervisor side: read until EOF. The jail's view of itself when it sent one (file name and
/// text, as `send_seen` put them), and the failure when there was one; `(_, None)` means the
/// command was exec'd.
pub(super) fn read_report_seen(fd: &OwnedFd) -> (Option<Vec<(String, String)>>, Option<JailError>) {
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
    let mut seen = None;
    if let Some(rest) = buf.strip_prefix(SEEN) {
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let text = String::from_utf8_lossy(&rest[..end]);
        seen = Some(
            text.split('\x1e')
                .filter_map(|part| part.split_once('\n'))
                .map(|(name, body)| (name.to_owned(), body.to_owned()))
                .collect(),
        );
        buf = rest.get(end + 1..).unwrap_or_default().to_vec();
    }
    (seen, parse_failure(&buf))
}

/// Supervisor side: read until EOF. `None` means the command was exec'd.
pub(super) fn read_report(fd: &OwnedFd) -> Option<JailError> {
    read_report_seen(fd).1
}

/// A failure record (`step`, errno, message, tab-separated); none in an empty report.
fn parse_failure(buf: &[u8]) -> Option<JailError> {
    if buf.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(buf);
    let mut parts = text.splitn(3, '\t');
    let step = Step::from_name(parts.next().unwrap_or(""));
    let errno = parts.next().and_then(|e| e.parse::<i32>().ok()).filter(|e| *e != 0);
    let msg = parts.next().unwrap_or("jail reported a malformed failure").to_owned();
    Some(JailError { step, msg, errno })
}
