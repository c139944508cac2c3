//! The one netlink layer under rtnetlink (`rtnl`), nf_tables (`nfnl`) and the connection log
//! (`nflog`): the socket with its sequence numbers, the message builder, the walk over received
//! messages and over attributes, acknowledgements, and `NetError`, which keeps the errno.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_MULTI: u16 = 0x2;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;

/// What went wrong in `net/`, with the errno when there is one.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys { what: String, source: io::Error },
    /// The kernel answered a netlink request with an error.
    #[error("{what}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { what: String, errno: i32 },
    /// An answer that is malformed, missing or not the one asked for.
    #[error("{what}: {msg}")]
    Protocol { what: String, msg: String },
    /// A value Stockade was given that it cannot use (a pool, a rule).
    #[error("{0}")]
    Invalid(String),
}

impl NetError {
    pub fn sys(what: impl Into<String>, source: io::Error) -> NetError {
        NetError::Sys { what: what.into(), source }
    }

    pub fn protocol(what: impl Into<String>, msg: impl Into<String>) -> NetError {
        NetError::Protocol { what: what.into(), msg: msg.into() }
    }

    /// The errno behind the failure, if a system call or the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Sys { source, .. } => source.raw_os_error(),
            NetError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The same error, said to be about `what`.
    pub fn about(self, what: impl std::fmt::Display) -> NetError {
        match self {
            NetError::Sys { what: w, source } => NetError::Sys { what: format!("{what}: {w}"), source },
            NetError::Kernel { what: w, errno } => NetError::Kernel { what: format!("{what}: {w}"), errno },
            NetError::Protocol { what: w, msg } => NetError::Protocol { what: format!("{what}: {w}"), msg },
            NetError::Invalid(m) => NetError::Invalid(format!("{what}: {m}")),
        }
    }
}

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A request under construction: the netlink header, a fixed family header, attributes.
pub(crate) struct Msg {
    buf: Vec<u8>,
    /// Offsets of nested attributes still open.
    nests: Vec<usize>,
}

impl Msg {
    pub(crate) fn new(kind: u16, flags: u16, family_header: &[u8]) -> Msg {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(family_header);
        buf.resize(align4(buf.len()), 0);
        Msg { buf, nests: Vec::new() }
    }

    pub(crate) fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub(crate) fn str_attr(&mut self, kind: u16, s: &str) -> &mut Msg {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(kind, &d)
    }

    /// Opens a nested attribute, closed by `end`.
    pub(crate) fn begin(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    /// Raw bytes inside the innermost nest (a family header there, as a veth peer's).
    pub(crate) fn raw(&mut self, data: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub(crate) fn end(&mut self) -> &mut Msg {
        let start = self.nests.pop().expect("balanced nests");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The message's bytes, with its length and sequence number.
    pub(crate) fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// The attributes in `b`: (type without the nested/byte-order flags, value). Stops at the first
/// malformed one.
pub(crate) fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        v.push((ty, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    v
}

/// A received message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
}

/// The messages in a datagram; `Err` for one whose length does not fit (the rest is dropped).
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = Result<(Header, &[u8]), &'static str>> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        if off >= buf.len() {
            return None;
        }
        if off + 16 > buf.len() {
            off = buf.len();
            return Some(Err("truncated netlink message"));
        }
        let word = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        let len = word(off) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let flags = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]);
        let seq = word(off + 8);
        if len < 16 || off + len > buf.len() {
            off = buf.len();
            return Some(Err("truncated netlink message"));
        }
        let body = &buf[off + 16..off + len];
        off += align4(len);
        Some(Ok((Header { kind, flags, seq }, body)))
    })
}

/// An NLMSG_ERROR body's errno (positive; 0 is an acknowledgement).
pub(crate) fn ack_errno(body: &[u8]) -> i32 {
    body.get(0..4).map_or(0, |b| -i32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

/// A netlink socket and its sequence numbers.
pub(crate) struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// A socket of `protocol` (NETLINK_ROUTE, NETLINK_NETFILTER), with a receive buffer of at least
    /// `rcvbuf` bytes when given.
    pub(crate) fn open(protocol: i32, rcvbuf: Option<i32>) -> Result<Socket, NetError> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(NetError::sys("netlink socket", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Some(size) = rcvbuf {
            // SAFETY: setsockopt with a valid int option value of the size given.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        // Sequence numbers start apart per process, so answers meant for another socket of the
        // same kind are never taken for ours.
        Ok(Socket { fd, seq: std::process::id().wrapping_mul(1 << 16) })
    }

    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub(crate) fn send(&self, bytes: &[u8]) -> Result<(), NetError> {
        // SAFETY: sending our own buffer on our own socket; the kernel's address is implied.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(NetError::sys("netlink send", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Receives one datagram into `buf`, waiting at most `timeout_ms` (negative: for ever).
    /// Returns its length.
    pub(crate) fn recv(&self, buf: &mut [u8], timeout_ms: i32) -> Result<usize, NetError> {
        loop {
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if r == 0 {
                return Err(NetError::protocol("netlink", "no answer from the kernel"));
            }
            // SAFETY: receiving into our own buffer of the given length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetError::sys("netlink recv", e));
            }
            return Ok(n as usize);
        }
    }

    /// Reads messages, calling `each(header, body)`, until it returns true. `timeout_ms` bounds
    /// each wait for the kernel.
    pub(crate) fn read(&self, timeout_ms: i32, mut each: impl FnMut(Header, &[u8]) -> bool) -> Result<(), NetError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf, timeout_ms)?;
            for m in messages(&buf[..n]) {
                let (h, body) = m.map_err(|e| NetError::protocol("netlink", e))?;
                if each(h, body) {
                    return Ok(());
                }
            }
        }
    }

    /// Sends one request with an ack asked for and waits for the answer to it: data messages go
    /// to `each`; the ack ends the wait, an error answer is `NetError::Kernel`.
    pub(crate) fn request(&mut self, what: &str, msg: Msg, mut each: impl FnMut(u16, &[u8])) -> Result<(), NetError> {
        let seq = self.next_seq();
        self.send(&msg.finish(seq)).map_err(|e| e.about(what))?;
        let mut failed = None;
        self.read(-1, |h, body| {
            if h.seq != seq {
                return false;
            }
            match h.kind {
                NLMSG_ERROR => {
                    let errno = ack_errno(body);
                    if errno != 0 {
                        failed = Some(errno);
                    }
                    true
                }
                NLMSG_DONE => true,
                kind => {
                    each(kind, body);
                    h.flags & NLM_F_MULTI == 0
                }
            }
        })
        .map_err(|e| e.about(what))?;
        match failed {
            Some(errno) => Err(NetError::Kernel { what: what.to_owned(), errno }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_are_walked_and_a_truncated_one_is_an_error() {
        let mut m = Msg::new(16, NLM_F_ACK, &[1, 2, 3, 4]);
        m.str_attr(3, "eth0").begin(18).attr(1, &[9, 9]).end();
        let mut buf = m.finish(7);
        buf.extend(Msg::new(NLMSG_DONE, 0, &[]).finish(8));
        let got: Vec<_> = messages(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, Header { kind: 16, flags: NLM_F_ACK | NLM_F_REQUEST, seq: 7 });
        let a = attrs(&got[0].1[4..]);
        assert_eq!(a[0], (3, &b"eth0\0"[..]));
        assert_eq!(attrs(a[1].1), vec![(1, &[9u8, 9][..])]);
        assert_eq!(got[1].0.seq, 8);
        let cut = &buf[..buf.len() - 4];
        assert!(messages(cut).any(|m| m.is_err()));
        assert_eq!(ack_errno(&(-libc::EEXIST).to_ne_bytes()), libc::EEXIST);
        let e = NetError::Kernel { what: "veth".into(), errno: libc::EEXIST }.about("session s1");
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert_eq!(e.to_string(), "session s1: veth: File exists (os error 17)");
    }
}
