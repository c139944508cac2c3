//! The session's resolver: answers only names the policy allows, forwards those to the upstream
//! resolvers, and admits the addresses in the answers into the session's nftables set for as
//! long as their TTL (with a floor). Everything else gets REFUSED and is logged.
//!
//! Only what is needed is parsed: the header, the first question, and A records of answers.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::policy::rules::{DomainPattern, Net4};

/// Shortest time an admitted address stays admitted, whatever the record's TTL (a short TTL
/// must not cut a connection being set up). `STOCKADE_DNS_TTL_FLOOR` (seconds) overrides it,
/// for tests and for operators who want tighter windows.
pub(crate) const TTL_FLOOR: Duration = Duration::from_secs(30);

pub(crate) fn ttl_floor() -> Duration {
    std::env::var("STOCKADE_DNS_TTL_FLOOR")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(TTL_FLOOR)
}
/// Longest: a huge TTL does not keep an address open for days.
pub(crate) const TTL_CAP: Duration = Duration::from_secs(3600);

#[derive(Debug, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    /// Offset just past the question, in the query.
    pub end: usize,
}

/// Reads a (possibly compressed) name at `off`; returns it and the offset after it in place.
fn read_name(msg: &[u8], mut off: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *msg.get(off)? as usize;
        if len == 0 {
            return Some((labels.join("."), end.unwrap_or(off + 1)));
        }
        if len & 0xc0 == 0xc0 {
            let ptr = ((len & 0x3f) << 8) | *msg.get(off + 1)? as usize;
            end.get_or_insert(off + 2);
            if ptr >= off {
                return None; // pointers only go backwards: no loops
            }
            off = ptr;
            continue;
        }
        if len > 63 {
            return None;
        }
        let l = msg.get(off + 1..off + 1 + len)?;
        labels.push(String::from_utf8_lossy(l).into_owned());
        off += 1 + len;
    }
    None
}

pub fn parse_question(q: &[u8]) -> Option<Question> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 || q[2] & 0x80 != 0 {
        return None; // not a query with exactly one question
    }
    let (name, off) = read_name(q, 12)?;
    let qtype = u16::from_be_bytes([*q.get(off)?, *q.get(off + 1)?]);
    q.get(off + 3)?;
    Some(Question { name, qtype, end: off + 4 })
}

/// An answer with `rcode` and no records, echoing the query's id and question.
pub fn reply(query: &[u8], q: &Question, rcode: u8) -> Vec<u8> {
    let mut r = query[..q.end].to_vec();
    r[2] = 0x80 | (query[2] & 0x79); // QR, opcode and RD from the query
    r[3] = 0x80 | (rcode & 0x0f); // RA
    r[6..12].fill(0);
    r
}

/// The A records in a response's answer section, with their TTLs.
pub(crate) fn answers_a(resp: &[u8]) -> Vec<(Ipv4Addr, u32)> {
    let mut out = Vec::new();
    let Some(h) = resp.get(..12) else { return out };
    let (qd, an) = (u16::from_be_bytes([h[4], h[5]]), u16::from_be_bytes([h[6], h[7]]));
    let mut off = 12;
    for _ in 0..qd {
        let Some((_, o)) = read_name(resp, off) else { return out };
        off = o + 4;
    }
    for _ in 0..an {
        let Some((_, o)) = read_name(resp, off) else { return out };
        let Some(f) = resp.get(o..o + 10) else { return out };
        let (ty, class) = (u16::from_be_bytes([f[0], f[1]]), u16::from_be_bytes([f[2], f[3]]));
        let ttl = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
        let len = u16::from_be_bytes([f[8], f[9]]) as usize;
        let data = o + 10;
        if ty == 1 && class == 1 && len == 4 {
            if let Some(d) = resp.get(data..data + 4) {
                out.push((Ipv4Addr::new(d[0], d[1], d[2], d[3]), ttl));
            }
        }
        off = data + len;
    }
    out
}

#[derive(Default, Debug)]
pub struct DnsStats {
    pub allowed: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
}

/// Admits answered addresses into the session's set, each for its TTL.
pub(crate) type Admit = Box<dyn Fn(&[(Ipv4Addr, Duration)]) -> Result<(), super::NetError> + Send + Sync>;

pub(crate) struct Resolver {
    pub session: String,
    pub patterns: Vec<DomainPattern>,
    pub upstream: Vec<SocketAddrV4>,
    /// Allow entries: an answer inside a private range is admitted only if one covers it.
    pub allowed_nets: Vec<Net4>,
    pub admit: Admit,
    pub stats: Arc<DnsStats>,
    pub ttl_floor: Duration,
}

impl Resolver {
    fn allowed(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }

    fn forward(&self, query: &[u8]) -> Option<Vec<u8>> {
        let id = [query[0], query[1]];
        for up in &self.upstream {
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            if s.send_to(query, up).is_err() {
                continue;
            }
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                if from == std::net::SocketAddr::V4(*up) && n >= 12 && buf[..2] == id {
                    // Truncated: ask the same server again over TCP for the whole answer.
                    if buf[2] & 0x02 != 0 {
                        if let Some(full) = forward_tcp(*up, query) {
                            return Some(full);
                        }
                    }
                    return Some(buf[..n].to_vec());
                }
            }
        }
        None
    }

    /// One query in, one answer out.
    pub(crate) fn handle(&self, query: &[u8]) -> Option<Vec<u8>> {
        let q = parse_question(query)?;
        if !self.allowed(&q.name) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(session = %self.session, name = %q.name, qtype = q.qtype, "dns refused: name not allowlisted");
            return Some(reply(query, &q, 5));
        }
        let Some(resp) = self.forward(query) else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(session = %self.session, name = %q.name, "dns: no upstream answered");
            return Some(reply(query, &q, 2));
        };
        let private: Vec<Net4> =
            crate::policy::rules::PRIVATE.iter().map(|p| Net4::parse(p).expect("constant")).collect();
        let mut admit = Vec::new();
        for (ip, ttl) in answers_a(&resp) {
            if private.iter().any(|n| n.contains(ip)) && !self.allowed_nets.iter().any(|n| n.contains(ip)) {
                tracing::warn!(session = %self.session, name = %q.name, %ip, "dns: private address in an answer not admitted (rebinding)");
                continue;
            }
            admit.push((ip, Duration::from_secs(ttl.into()).clamp(self.ttl_floor, TTL_CAP)));
        }
        if !admit.is_empty() {
            if let Err(e) = (self.admit)(&admit) {
                tracing::error!(session = %self.session, error = %e, "dns: could not admit the answer's addresses");
                return Some(reply(query, &q, 2));
            }
        }
        self.stats.allowed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = %self.session, name = %q.name, qtype = q.qtype, admitted = ?admit, "dns allowed");
        Some(resp)
    }

    /// DNS over TCP (RFC 7766 framing: a 2-byte length before each message) until `stop`.
    pub(crate) fn serve_tcp(self: Arc<Self>, listener: std::net::TcpListener, stop: Arc<super::Stop>) {
        use std::os::fd::AsFd;
        while stop.wait(listener.as_fd()) {
            let Ok((mut c, _)) = listener.accept() else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
            // Queries on one connection, in order, until the client closes or stalls.
            while let Some(q) = read_framed(&mut c) {
                let Some(r) = self.handle(&q) else { break };
                if write_framed(&mut c, &r).is_err() {
                    break;
                }
            }
        }
    }

    /// Serves `sock` until `stop` is signalled.
    pub(crate) fn serve(self: Arc<Self>, sock: UdpSocket, stop: Arc<super::Stop>) {
        use std::os::fd::AsFd;
        let mut buf = [0u8; 1500];
        while stop.wait(sock.as_fd()) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
            if let Some(r) = self.handle(&buf[..n]) {
                let _ = sock.send_to(&r, from);
            }
        }
    }
}

fn read_framed(c: &mut impl std::io::Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    c.read_exact(&mut len).ok()?;
    let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
    c.read_exact(&mut m).ok()?;
    Some(m)
}

fn write_framed(c: &mut impl std::io::Write, m: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(m.len()).map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    c.write_all(&len.to_be_bytes())?;
    c.write_all(m)
}

fn forward_tcp(up: SocketAddrV4, query: &[u8]) -> Option<Vec<u8>> {
    let mut c = std::net::TcpStream::connect_timeout(&up.into(), Duration::from_secs(2)).ok()?;
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    write_framed(&mut c, query).ok()?;
    read_framed(&mut c).filter(|r| r.len() >= 12 && r[..2] == query[..2])
}

/// The host's resolvers, from /etc/resolv.conf (IPv4 ones; a loopback stub such as
/// systemd-resolved's 127.0.0.53 is reachable from the host, where the resolver runs).
pub(crate) fn host_resolvers() -> Vec<SocketAddrV4> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .map(|a| SocketAddrV4::new(a, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn questions_replies_and_compressed_answers() {
        let q = query("files.pypi.org", 1);
        let p = parse_question(&q).unwrap();
        assert_eq!((p.name.as_str(), p.qtype, p.end), ("files.pypi.org", 1, q.len()));
        let r = reply(&q, &p, 5);
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 5);
        assert_eq!(r[2] & 0x80, 0x80);
        // An answer: the question, then an A record whose name points back at it (0xc00c).
        let mut resp = r.clone();
        resp[3] = 0x80;
        resp[7] = 2;
        for (ip, ttl) in [([151, 101, 0, 223], 60u32), ([151, 101, 64, 223], 5)] {
            resp.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
            resp.extend_from_slice(&ttl.to_be_bytes());
            resp.extend_from_slice(&[0, 4]);
            resp.extend_from_slice(&ip);
        }
        assert_eq!(
            answers_a(&resp),
            vec![(Ipv4Addr::new(151, 101, 0, 223), 60), (Ipv4Addr::new(151, 101, 64, 223), 5)]
        );
        // Hostile input: a pointer loop, a truncated message.
        let mut bad = q.clone();
        bad[12] = 0xc0;
        bad[13] = 12;
        assert_eq!(parse_question(&bad), None);
        assert_eq!(parse_question(&q[..14]), None);
        assert!(answers_a(&resp[..resp.len() - 3]).len() < 2);
    }
}
