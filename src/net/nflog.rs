//! Per-connection records: the session's nft rules copy the first packet of every allowed
//! connection and every denied packet (rate-limited) to an NFLOG group, and a thread reads that
//! group over NETLINK_NETFILTER and logs each attempt through `tracing`.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::netlink::{attrs, messages, Msg, NetError, Socket};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;

/// The NFLOG group of a slot (groups are host-wide; 10000+ keeps clear of common ones).
pub(crate) fn group(slot: u32) -> u16 {
    (10_000 + slot % 50_000) as u16
}

#[derive(Default, Debug)]
pub struct ConnStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
}

/// One logged packet: the rule's prefix ("allow"/"deny") and the IPv4 header's essentials.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub verdict: String,
    pub proto: &'static str,
    pub dst: Ipv4Addr,
    pub dport: Option<u16>,
}

/// Parses an NFULNL_MSG_PACKET body (after the netlink header).
pub(crate) fn parse_packet(body: &[u8]) -> Option<Record> {
    let a = attrs(body.get(4..)?);
    let prefix = a.iter().find(|(t, _)| *t == NFULA_PREFIX).map(|(_, v)| v)?;
    let verdict = String::from_utf8_lossy(prefix.split(|c| *c == 0).next().unwrap_or(prefix)).into_owned();
    let p = a.iter().find(|(t, _)| *t == NFULA_PAYLOAD).map(|(_, v)| *v)?;
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((p[0] & 0x0f) as usize) * 4;
    let (proto, ports) = match p[9] {
        6 => ("tcp", true),
        17 => ("udp", true),
        1 => ("icmp", false),
        _ => ("other", false),
    };
    let dport = if ports { p.get(ihl + 2..ihl + 4).map(|d| u16::from_be_bytes([d[0], d[1]])) } else { None };
    Some(Record { verdict, proto, dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]), dport })
}

fn config(sock: &mut Socket, group: u16, attr: u16, payload: &[u8]) -> Result<(), NetError> {
    let mut header = vec![libc::AF_UNSPEC as u8, 0];
    header.extend_from_slice(&group.to_be_bytes());
    let mut m = Msg::new((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, 0, &header);
    m.attr(attr, payload);
    let seq = sock.next_seq();
    sock.send(&m.finish(seq))
}

/// Binds to `group` and returns the socket (copying the first 64 bytes of each packet).
pub(crate) fn open(group: u16) -> Result<Socket, NetError> {
    let mut sock = Socket::open(libc::NETLINK_NETFILTER, None)?;
    config(&mut sock, group, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND, 0, 0, 0])?;
    let mut mode = 64u32.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    config(&mut sock, group, NFULA_CFG_MODE, &mode)?;
    // One packet a message, sent at once: the kernel would otherwise hold up to a second's worth,
    // and a record must arrive while the tool call behind it is still the one in flight.
    config(&mut sock, group, NFULA_CFG_QTHRESH, &1u32.to_be_bytes())?;
    Ok(sock)
}

/// Logs records from `fd` until `stop` is signalled.
pub(crate) fn serve(
    sock: Socket,
    session: String,
    stats: Arc<ConnStats>,
    stop: Arc<super::Stop>,
    hook: Option<super::EgressHook>,
) {
    use std::os::fd::AsFd;
    let fd = sock.fd();
    let mut buf = vec![0u8; 65536];
    let mut stopping = false;
    loop {
        if !stopping && !stop.wait(fd.as_fd()) {
            // What was logged before the stop is still read (without waiting for more).
            stopping = true;
        }
        let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: receiving into our own buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n <= 0 {
            if stopping {
                return;
            }
            continue;
        }
        for (h, body) in messages(&buf[..n as usize]).map_while(Result::ok) {
            if h.kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
                continue;
            }
            let Some(r) = parse_packet(body) else { continue };
            if let Some(hook) = &hook {
                hook(r.verdict == "allow", r.proto, r.dst, r.dport);
            }
            let dport = r.dport.map(|p| p.to_string()).unwrap_or_default();
            if r.verdict == "allow" {
                stats.allowed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(session = %session, proto = r.proto, dst = %r.dst, dport, "egress allowed");
            } else {
                stats.denied.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(session = %session, proto = r.proto, dst = %r.dst, dport, "egress denied");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_logged_tcp_syn() {
        let mut body = vec![2u8, 0, 0x27, 0x10]; // nfgenmsg: AF_INET, v0, group 10000
        let prefix = b"deny\0";
        body.extend_from_slice(&((4 + prefix.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&NFULA_PREFIX.to_ne_bytes());
        body.extend_from_slice(prefix);
        body.resize((body.len() + 3) & !3, 0);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 199, 0, 2, 198, 51, 100, 2];
        ip.extend_from_slice(&[0xc3, 0x50, 0x1f, 0x91]); // sport 50000, dport 8081
        body.extend_from_slice(&((4 + ip.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&NFULA_PAYLOAD.to_ne_bytes());
        body.extend_from_slice(&ip);
        let r = parse_packet(&body).unwrap();
        assert_eq!(
            r,
            Record { verdict: "deny".into(), proto: "tcp", dst: Ipv4Addr::new(198, 51, 100, 2), dport: Some(8081) }
        );
        assert_eq!(parse_packet(&body[..10]), None);
    }
}
