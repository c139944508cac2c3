//! A small rtnetlink client: just the link, address and route requests a session network needs,
//! built by hand on a NETLINK_ROUTE socket. Each request is sent with NLM_F_ACK and its answer
//! (an ack or an errno) read back before the next, so every failure names its step.

use super::netlink::{attrs, Msg, NetError, Socket, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_PID: u16 = 19;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_INET6_ADDR_GEN_MODE: u16 = 8;
const IN6_ADDR_GEN_MODE_NONE: u8 = 1;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;

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
    sock: Socket,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl, NetError> {
        Ok(Rtnl { sock: Socket::open(libc::NETLINK_ROUTE, None)? })
    }

    fn call(&mut self, what: &str, msg: Msg) -> Result<(), NetError> {
        self.sock.request(what, msg, |_, _| {})
    }

    /// Creates a veth pair: `host` here, `peer` created directly in the network namespace of
    /// process `peer_ns_pid` (so its name need not be free here).
    pub fn add_veth(&mut self, host: &str, peer: &str, peer_ns_pid: i32, mtu: Option<u32>) -> Result<(), NetError> {
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
        self.call(&format!("veth {host}"), m)
    }

    pub fn index(name: &str) -> Result<i32, NetError> {
        let c = std::ffi::CString::new(name).map_err(|_| NetError::Invalid(format!("link name {name:?}")))?;
        // SAFETY: if_nametoindex reads a valid C string.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if i == 0 {
            Err(NetError::sys(format!("link {name}"), std::io::Error::last_os_error()))
        } else {
            Ok(i as i32)
        }
    }

    pub fn set_up(&mut self, name: &str) -> Result<(), NetError> {
        let i = Self::index(name)?;
        let up = libc::IFF_UP as u32;
        self.call(&format!("{name} up"), Msg::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(i, up, up)))
    }

    /// No IPv6 address is made for the link, link-local included, so nothing on it speaks IPv6
    /// (set before it goes up). A kernel without IPv6 has nothing to stop.
    pub fn no_ipv6_addresses(&mut self, name: &str) -> Result<(), NetError> {
        let i = Self::index(name)?;
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(i, 0, 0));
        m.begin(IFLA_AF_SPEC).begin(libc::AF_INET6 as u16).attr(IFLA_INET6_ADDR_GEN_MODE, &[IN6_ADDR_GEN_MODE_NONE]);
        m.end().end();
        match self.call(&format!("{name} without IPv6 addresses"), m) {
            Err(e) if e.errno() == Some(libc::EAFNOSUPPORT) => Ok(()),
            r => r,
        }
    }

    pub fn add_addr4(&mut self, name: &str, addr: std::net::Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let i = Self::index(name)?;
        let mut h = [0u8; 8];
        h[0] = libc::AF_INET as u8;
        h[1] = prefix;
        h[4..8].copy_from_slice(&(i as u32).to_ne_bytes());
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &h);
        m.attr(IFA_LOCAL, &addr.octets()).attr(IFA_ADDRESS, &addr.octets());
        self.call(&format!("address {addr}/{prefix} on {name}"), m)
    }

    /// The default IPv4 route through `gateway` on `dev`.
    pub fn add_default_route4(&mut self, dev: &str, gateway: std::net::Ipv4Addr) -> Result<(), NetError> {
        let i = Self::index(dev)?;
        // rtmsg: family, dst_len, src_len, tos, table (main), protocol (boot), scope (universe),
        // type (unicast), flags.
        let h = [libc::AF_INET as u8, 0, 0, 0, 254, 3, 0, 1, 0, 0, 0, 0];
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, &h);
        m.attr(RTA_GATEWAY, &gateway.octets()).attr(RTA_OIF, &(i as u32).to_ne_bytes());
        self.call(&format!("default route via {gateway} on {dev}"), m)
    }

    pub fn del_link(&mut self, name: &str) -> Result<(), NetError> {
        let mut m = Msg::new(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(0, 0, 0));
        m.str_attr(IFLA_IFNAME, name);
        self.call(&format!("delete link {name}"), m)
    }

    /// Names of every link in this namespace.
    pub fn links(&mut self) -> Result<Vec<String>, NetError> {
        let mut names = Vec::new();
        self.sock.request("list links", Msg::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0)), |kind, body| {
            if kind != RTM_NEWLINK || body.len() < 16 {
                return;
            }
            for (ty, v) in attrs(&body[16..]) {
                if ty == IFLA_IFNAME {
                    names.push(String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v)).into_owned());
                }
            }
        })?;
        Ok(names)
    }
}
