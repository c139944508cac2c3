//! The policy's egress vocabulary: `network.allow` entries (`CIDR[:PORT[-PORT]][/tcp|/udp]`),
//! `network.allow_domains` patterns (`name` or `*.suffix`), upstream resolvers, and the ranges
//! that stay closed unless an allow entry names them explicitly.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Why an egress entry was refused; the message quotes the entry as the policy wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("bad prefix length in {0:?}")]
    BadPrefix(String),
    #[error("prefix length {len} > 32 in {entry:?}")]
    PrefixTooLong { entry: String, len: u8 },
    #[error("{0:?}: IPv6 destinations are not supported in this build (IPv6 stays unreachable)")]
    Ipv6(String),
    #[error("{0:?} is not an IPv4 address or CIDR")]
    NotIpv4(String),
    #[error("{entry:?} has host bits set (did you mean {network}/{len}?)")]
    HostBits { entry: String, network: Ipv4Addr, len: u8 },
    #[error("{entry:?}: bad port {port:?}")]
    BadPort { entry: String, port: String },
    #[error("{entry:?}: port range {lo}-{hi} is backwards")]
    BackwardsRange { entry: String, lo: u16, hi: u16 },
    #[error("{0:?}: a protocol needs a port (e.g. 10.0.0.0/8:53/udp)")]
    ProtocolWithoutPort(String),
    #[error("{0:?}: only a leading `*.` wildcard is allowed")]
    InnerWildcard(String),
    #[error("{0:?}: not a fully qualified domain name")]
    NotQualified(String),
    #[error("{0:?} is not a valid domain name")]
    BadDomain(String),
    #[error("{0:?}: a wildcard over a top-level domain admits too much")]
    TopLevelWildcard(String),
    #[error("{0:?} is not an IPv4 resolver address")]
    BadResolver(String),
}

/// The range session links take their /30s from unless `network.pool` says otherwise.
pub(crate) const DEFAULT_POOL: &str = "10.199.0.0/16";

/// A veth policy's egress, resolved when the policy was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub allow: Vec<AllowRule>,
    pub domains: Vec<DomainPattern>,
    /// Empty: the host's own resolvers.
    pub upstream: Vec<SocketAddrV4>,
    pub pool: Net4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net4 {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Net4 {
    pub fn parse(s: &str) -> Result<Net4, RuleError> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| RuleError::BadPrefix(s.to_owned()))?),
            None => (s, 32),
        };
        if p > 32 {
            return Err(RuleError::PrefixTooLong { entry: s.to_owned(), len: p });
        }
        let addr: Ipv4Addr = a.parse().map_err(|_| {
            if a.contains(':') || a.starts_with('[') {
                RuleError::Ipv6(s.to_owned())
            } else {
                RuleError::NotIpv4(s.to_owned())
            }
        })?;
        let n = Net4 { addr, prefix: p };
        if n.network() != addr {
            return Err(RuleError::HostBits { entry: s.to_owned(), network: n.network(), len: p });
        }
        Ok(n)
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    pub fn overlaps(&self, o: &Net4) -> bool {
        self.contains(o.network()) || o.contains(self.network())
    }

    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }
}

impl std::fmt::Display for Net4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub net: Net4,
    pub ports: Option<(u16, u16)>,
    pub proto: Option<Proto>,
}

impl AllowRule {
    /// `CIDR[:PORT[-PORT]][/tcp|/udp]`; the CIDR's own `/len` comes first.
    pub fn parse(entry: &str) -> Result<AllowRule, RuleError> {
        let mut s = entry.trim();
        let mut proto = None;
        for (suffix, p) in [("/tcp", Proto::Tcp), ("/udp", Proto::Udp)] {
            if let Some(rest) = s.strip_suffix(suffix) {
                proto = Some(p);
                s = rest;
            }
        }
        let (net, ports) = match s.rsplit_once(':') {
            Some((n, p)) if !n.contains(':') => {
                let (lo, hi) = match p.split_once('-') {
                    Some((a, b)) => (a, b),
                    None => (p, p),
                };
                let port = |x: &str| {
                    x.parse::<u16>()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(|| RuleError::BadPort { entry: entry.to_owned(), port: x.to_owned() })
                };
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(RuleError::BackwardsRange { entry: entry.to_owned(), lo, hi });
                }
                (n, Some((lo, hi)))
            }
            _ => (s, None),
        };
        if proto.is_some() && ports.is_none() {
            return Err(RuleError::ProtocolWithoutPort(entry.to_owned()));
        }
        Ok(AllowRule { net: Net4::parse(net)?, ports, proto })
    }
}

/// The TCP ports of an allowlist, for landlock: None when an entry admits every port (or a UDP
/// one only) or a range is too wide to list.
pub(crate) fn tcp_ports(allow: &[AllowRule]) -> Option<Vec<u16>> {
    // 53: DNS over TCP to the session's own resolver.
    let mut ports = std::collections::BTreeSet::from([53]);
    for r in allow {
        let (lo, hi) = r.ports?;
        if r.proto == Some(Proto::Udp) {
            continue;
        }
        if hi - lo > 256 {
            return None;
        }
        ports.extend(lo..=hi);
    }
    Some(ports.into_iter().collect())
}

/// A domain pattern: `example.com` (that name only) or `*.example.com` (names below it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPattern {
    pub suffix: String,
    pub wildcard: bool,
}

impl DomainPattern {
    pub fn parse(p: &str) -> Result<DomainPattern, RuleError> {
        let t = p.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match t.strip_prefix("*.") {
            Some(n) => (true, n.to_owned()),
            None => (false, t.clone()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) || !name.contains('.') && !wildcard {
            if name.contains('*') {
                return Err(RuleError::InnerWildcard(p.to_owned()));
            }
            if !name.contains('.') {
                return Err(RuleError::NotQualified(p.to_owned()));
            }
            return Err(RuleError::BadDomain(p.to_owned()));
        }
        if wildcard && !name.contains('.') {
            return Err(RuleError::TopLevelWildcard(p.to_owned()));
        }
        Ok(DomainPattern { suffix: name, wildcard })
    }

    pub fn matches(&self, name: &str) -> bool {
        let n = name.trim_end_matches('.').to_ascii_lowercase();
        if self.wildcard {
            n.len() > self.suffix.len()
                && n.ends_with(&self.suffix)
                && n.as_bytes()[n.len() - self.suffix.len() - 1] == b'.'
        } else {
            n == self.suffix
        }
    }
}

/// `ADDR` or `ADDR:PORT` of an upstream resolver.
pub(crate) fn parse_upstream(s: &str) -> Result<SocketAddrV4, RuleError> {
    if let Ok(a) = s.parse::<SocketAddrV4>() {
        return Ok(a);
    }
    s.parse::<Ipv4Addr>().map(|a| SocketAddrV4::new(a, 53)).map_err(|_| RuleError::BadResolver(s.to_owned()))
}

/// Destinations closed to every session unless an allow entry names them: link-local (cloud
/// metadata), loopback, "this network", multicast, broadcast and reserved space.
pub(crate) const ALWAYS_DENIED: &[&str] = &["169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"];

/// Ranges an allowed name may not resolve into (DNS rebinding) unless an allow entry covers them.
pub(crate) const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries() {
        let r = AllowRule::parse("10.1.2.0/24:443").unwrap();
        assert_eq!((r.net.to_string(), r.ports, r.proto), ("10.1.2.0/24".into(), Some((443, 443)), None));
        let r = AllowRule::parse("203.0.113.7:1000-2000/udp").unwrap();
        assert_eq!((r.net.prefix, r.ports, r.proto), (32, Some((1000, 2000)), Some(Proto::Udp)));
        assert_eq!(AllowRule::parse("198.51.100.0/24").unwrap().ports, None);
        for bad in [
            "10.1.2.3/24",
            "10.0.0.0/33",
            "10.0.0.1:0",
            "10.0.0.1:9-3",
            "example.com",
            "10.0.0.1/tcp",
            "[2001:db8::]:443",
        ] {
            assert!(AllowRule::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(AllowRule::parse("[2001:db8::]:443").unwrap_err(), RuleError::Ipv6("[2001:db8::]:443".into()));
        assert_eq!(
            AllowRule::parse("10.1.2.3/24:443").unwrap_err().to_string(),
            "\"10.1.2.3/24\" has host bits set (did you mean 10.1.2.0/24?)"
        );
    }

    #[test]
    fn domain_patterns() {
        let p = DomainPattern::parse("*.githubusercontent.com").unwrap();
        assert!(p.matches("raw.githubusercontent.com."));
        assert!(p.matches("a.b.githubusercontent.com"));
        assert!(!p.matches("githubusercontent.com"));
        assert!(!p.matches("evilgithubusercontent.com"));
        let e = DomainPattern::parse("PyPI.org").unwrap();
        assert!(e.matches("pypi.org") && !e.matches("files.pypi.org"));
        for bad in ["*", "*.com", "a.*.com", "localhost", "-x.com", ""] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
