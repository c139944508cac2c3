//! A small rtnetlink client: just the link, address and route requests a session network needs,
//! built by hand on a NETLINK_ROUTE socket. Each request is sent with NLM_F_ACK and its answer
//! (an ack or an errno) read back before the next, so every failure names its step.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;

const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

/// A request under construction: the netlink header, a fixed family header, attributes.
pub(super) struct Msg {
    buf: Vec<u8>,
    /// Offsets of nested attributes still open.
    nests: Vec<usize>,
}

pub(super) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Msg {
    pub(super) fn new(kind: u16, flags: u16, family_header: &[u8]) -> Msg {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(family_header);
        buf.resize(align4(buf.len()), 0);
        Msg { buf, nests: Vec::new() }
    }

    pub(super) fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub(super) fn str_attr(&mut self, kind: u16, s: &str) -> &mut Msg {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(kind, &d)
    }

    pub(super) fn begin(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    /// Raw bytes inside the innermost nest (the veth peer's ifinfomsg).
    fn raw(&mut self, data: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub(super) fn end(&mut self) -> &mut Msg {
        let start = self.nests.pop().expect("balanced nests");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    pub(super) fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0] = libc::AF_UNSPEC as u8;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Rtnl { fd: unsafe { OwnedFd::from_raw_fd(fd) }, seq: 1 })
    }

    fn send(&mut self, msg: Msg) -> io::Result<u32> {
        self.seq += 1;
        let bytes = msg.finish(self.seq);
        // SAFETY: sending our own buffer on our own socket; the kernel's address is implied.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Reads answers to `seq`: calls `each` for every data message, returns at the ack/done.
    fn recv(&mut self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: receiving into our own buffer of the given length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
                let flags = u16::from_ne_bytes(buf[off + 6..off + 8].try_into().expect("2 bytes"));
                let mseq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().expect("4 bytes"));
                if len < 16 || off + len > n {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let body = &buf[off + 16..off + len];
                off += align4(len);
                if mseq != seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(body[0..4].try_into().expect("4 bytes"));
                        return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) };
                    }
                    NLMSG_DONE => return Ok(()),
                    _ => {
                        each(kind, body);
                        if flags & NLM_F_MULTI == 0 {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    fn call(&mut self, msg: Msg) -> io::Result<()> {
        let seq = self.send(msg)?;
        self.recv(seq, |_, _| {})
    }

    /// Creates a veth pair: `host` here, `peer` created directly in the network namespace of
    /// process `peer_ns_pid` (so its name need not be free here).
    pub fn add_veth(&mut self, host: &str, peer: &str, peer_ns_pid: i32, mtu: Option<u32>) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &ifinfomsg(0, 0, 0));
        m.str_attr(IFLA_IFNAME, host);
        if let Some(mtu) = mtu {
            m.attr(IFLA_MTU, &mtu.to_ne_bytes());
        }
        m.begin(IFLA_LINKINFO).str_attr(IFLA_INFO_KIND, "veth").begin(IFLA_INFO_DATA).begin(VETH_INFO_PEER);
        m.raw(&ifinfomsg(0, 0, 0))
            .str_attr(IFLA_IFNAME, peer)
            .attr(IFLA_NET_NS_PID, &(peer_ns_pid as u32).to_ne_bytes());
        if let Some(mtu) = mtu {
            m.attr(IFLA_MTU, &mtu.to_ne_bytes());
        }
        m.end().end().end();
        self.call(m)
    }

    pub fn index(name: &str) -> io::Result<i32> {
        let c = std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: if_nametoindex reads a valid C string.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if i == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(i as i32)
        }
    }

    pub fn set_up(&mut self, name: &str) -> io::Result<()> {
        let i = Self::index(name)?;
        let up = libc::IFF_UP as u32;
        self.call(Msg::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(i, up, up)))
    }

    pub fn add_addr4(&mut self, name: &str, addr: std::net::Ipv4Addr, prefix: u8) -> io::Result<()> {
        let i = Self::index(name)?;
        let mut h = [0u8; 8];
        h[0] = libc::AF_INET as u8;
        h[1] = prefix;
        h[4..8].copy_from_slice(&(i as u32).to_ne_bytes());
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &h);
        m.attr(IFA_LOCAL, &addr.octets()).attr(IFA_ADDRESS, &addr.octets());
        self.call(m)
    }

    /// The default IPv4 route through `gateway` on `dev`.
    pub fn add_default_route4(&mut self, dev: &str, gateway: std::net::Ipv4Addr) -> io::Result<()> {
        let i = Self::index(dev)?;
        // rtmsg: family, dst_len, src_len, tos, table (main), protocol (boot), scope (universe),
        // type (unicast), flags.
        let h = [libc::AF_INET as u8, 0, 0, 0, 254, 3, 0, 1, 0, 0, 0, 0];
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &h);
        m.attr(RTA_GATEWAY, &gateway.octets()).attr(RTA_OIF, &(i as u32).to_ne_bytes());
        self.call(m)
    }

    pub fn del_link(&mut self, name: &str) -> io::Result<()> {
        let mut m = Msg::new(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(0, 0, 0));
        m.str_attr(IFLA_IFNAME, name);
        self.call(m)
    }

    /// Names of every link in this namespace.
    pub fn links(&mut self) -> io::Result<Vec<String>> {
        let seq = self.send(Msg::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0)))?;
        let mut names = Vec::new();
        self.recv(seq, |kind, body| {
            if kind != RTM_NEWLINK || body.len() < 16 {
                return;
            }
            let mut off = 16;
            while off + 4 <= body.len() {
                let len = u16::from_ne_bytes([body[off], body[off + 1]]) as usize;
                let ty = u16::from_ne_bytes([body[off + 2], body[off + 3]]);
                if len < 4 || off + len > body.len() {
                    break;
                }
                if ty == IFLA_IFNAME {
                    let v = &body[off + 4..off + len];
                    names.push(String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v)).into_owned());
                }
                off += align4(len);
            }
        })?;
        Ok(names)
    }
}
