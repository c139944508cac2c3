//! Egress filtering in one Stockade-owned nftables table, `inet stockade`.
//!
//! Per session everything goes over netlink (`nfnl`): a session's chains, rules, set and map
//! entries are one transaction in, one out, and the state checks and counters are dumps. The
//! base of the table (verdict maps, NAT set, three hooked chains) is made once per boot, or
//! rebuilt when found damaged, with the `nft` binary in nft's own language, which `.ci/run`
//! installs with the `nftables` package.
//!
//! Shared objects: verdict maps from a session's host-side interface to its chains, the set of
//! NAT sources, and three base chains. Per session: chains `sN` (forward, from the jail) and
//! `sN_in` (to the host itself), and the set `sN_dns` of addresses its resolver admitted.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::netlink::NetError;
use super::nfnl::{self, base, meta, op, Batch, Elem, Rule, Verdict, NFPROTO_INET};
use crate::policy::rules::{AllowRule, Net4, Proto, ALWAYS_DENIED};

pub const TABLE: &str = "stockade";

fn nft(script: &str) -> Result<(), NetError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::sys("running nft (install the nftables package)", e))?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| NetError::sys("nft", e))?;
    let out = child.wait_with_output().map_err(|e| NetError::sys("nft", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::protocol("nft", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Makes sure the table and its shared objects are there and intact, and returns the session
/// chains (`sN`) already in it. A base chain that lost its rules (a hand-edited or flushed
/// table) would let sessions' traffic through unfiltered, so an incomplete base is rebuilt —
/// atomically, in place, sessions' own chains untouched. Callers serialise this with the pool
/// lock.
pub fn ensure_base(host_prefix: &str) -> Result<Vec<String>, NetError> {
    let chains = nfnl::chains(NFPROTO_INET, TABLE).unwrap_or_default();
    // Only the base chains' rules are read: the sessions' own would make this dump grow with
    // every live session.
    let rules_in = |chain: &str| nfnl::rules(NFPROTO_INET, TABLE, Some(chain)).map(|r| r.len());
    if let (Ok(fwd), Ok(input), Ok(post), Ok(sets)) =
        (rules_in("forward"), rules_in("input"), rules_in("postrouting"), nfnl::sets(NFPROTO_INET, TABLE))
    {
        let maps = sets.iter().filter(|(_, f)| f & nfnl::SET_F_MAP != 0).count();
        if (fwd, input, post, maps) == (3, 1, 1, 2) {
            return Ok(session_chain_names(&chains));
        }
        if !chains.is_empty() {
            tracing::warn!("table inet {TABLE} is incomplete; rebuilding its base chains");
        }
    }
    nft(&format!(
        "add table inet {TABLE}
add map inet {TABLE} sessions_fwd {{ type ifname : verdict; }}
add map inet {TABLE} sessions_in {{ type ifname : verdict; }}
add set inet {TABLE} nat_src {{ type ipv4_addr; }}
add chain inet {TABLE} forward {{ type filter hook forward priority filter - 5; policy accept; }}
flush chain inet {TABLE} forward
add rule inet {TABLE} forward iifname vmap @sessions_fwd
add rule inet {TABLE} forward oifname \"{host_prefix}*\" ct state established,related accept
add rule inet {TABLE} forward oifname \"{host_prefix}*\" counter drop
add chain inet {TABLE} input {{ type filter hook input priority filter - 5; policy accept; }}
flush chain inet {TABLE} input
add rule inet {TABLE} input iifname vmap @sessions_in
add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
flush chain inet {TABLE} postrouting
add rule inet {TABLE} postrouting ip saddr @nat_src oifname != \"{host_prefix}*\" masquerade
"
    ))?;
    Ok(session_chain_names(&chains))
}

/// What one session's rules are made of.
pub struct SessionRules<'a> {
    pub id: &'a str,
    pub host_if: &'a str,
    pub host_ip: Ipv4Addr,
    pub jail_ip: Ipv4Addr,
    pub pool: Net4,
    pub host_addrs: &'a [Ipv4Addr],
    pub allow: &'a [AllowRule],
    /// NFLOG group the session's attempts are copied to (see `nflog`).
    pub log_group: u16,
    /// What a denied packet gets: an answer (TCP reset, ICMP administratively prohibited), so a
    /// client fails at once, or nothing.
    pub on_deny: crate::policy::OnDeny,
}

const TCP: u8 = libc::IPPROTO_TCP as u8;
const UDP: u8 = libc::IPPROTO_UDP as u8;

/// `ip daddr NET`, with the `meta nfproto ipv4` test nft puts before any IPv4 header match in
/// an `inet` table.
fn daddr(r: &mut Rule, net: &Net4) {
    ipv4(r);
    if net.prefix == 0 {
        return;
    }
    r.payload(base::NETWORK, 16, 4);
    if net.prefix < 32 {
        let mask = u32::MAX << (32 - net.prefix);
        r.mask(&mask.to_be_bytes());
    }
    r.cmp(op::EQ, &net.network().octets());
}

fn ipv4(r: &mut Rule) {
    r.meta(meta::NFPROTO).cmp(op::EQ, &[libc::NFPROTO_IPV4 as u8]);
}

/// `PROTO dport LO[-HI]`.
fn dport(r: &mut Rule, proto: u8, (lo, hi): (u16, u16)) {
    r.meta(meta::L4PROTO).cmp(op::EQ, &[proto]).payload(base::TRANSPORT, 2, 2);
    if lo == hi {
        r.cmp(op::EQ, &lo.to_be_bytes());
    } else {
        r.cmp(op::GTE, &lo.to_be_bytes()).cmp(op::LTE, &hi.to_be_bytes());
    }
}

/// The protocols an entry's ports apply to: none (any traffic to the network), or TCP and/or UDP.
fn protos(a: &AllowRule) -> Vec<Option<(u8, (u16, u16))>> {
    match (a.ports, a.proto) {
        (None, _) => vec![None],
        (Some(p), Some(Proto::Tcp)) => vec![Some((TCP, p))],
        (Some(p), Some(Proto::Udp)) => vec![Some((UDP, p))],
        (Some(p), None) => vec![Some((TCP, p)), Some((UDP, p))],
    }
}

pub fn add_session(s: &SessionRules) -> Result<(), NetError> {
    let id = s.id;
    let (deny, dns_set, input) = (format!("{id}_deny"), format!("{id}_dns"), format!("{id}_in"));
    let mut denied: Vec<Net4> = ALWAYS_DENIED.iter().map(|d| Net4::parse(d).expect("constant")).collect();
    denied.push(s.pool);
    denied.extend(s.host_addrs.iter().map(|a| Net4 { addr: *a, prefix: 32 }));
    // Allow entries inside a closed range are explicit choices: they go before the closing rules.
    let (explicit, general): (Vec<&AllowRule>, Vec<&AllowRule>) =
        s.allow.iter().partition(|r| denied.iter().any(|d| d.overlaps(&r.net)));
    let g = s.log_group;
    let mut b = Batch::new(NFPROTO_INET, TABLE);
    b.add_set(&dns_set, nfnl::SET_F_TIMEOUT, nfnl::TYPE_IPADDR, 4, 1);
    for c in [&deny, &id.to_owned(), &input] {
        b.add_chain(c);
    }
    // Denials go through one chain that copies them (rate-limited) to the session's NFLOG group;
    // allowed connections are copied once, on their first packet (later ones are established).
    b.add_rule(&deny, None, |r| {
        r.limit(20, 40).log(g, "deny");
    });
    if s.on_deny == crate::policy::OnDeny::Reject {
        b.add_rule(&deny, None, |r| {
            r.meta(meta::L4PROTO).cmp(op::EQ, &[TCP]).reject_tcp_reset();
        });
        b.add_rule(&deny, None, |r| {
            r.reject_admin_prohibited();
        });
    } else {
        b.add_rule(&deny, None, |r| {
            r.verdict(Verdict::Drop);
        });
    }
    b.add_rule(id, Some("ipv6"), |r| {
        r.meta(meta::NFPROTO).cmp(op::EQ, &[libc::NFPROTO_IPV6 as u8]).counter().verdict(Verdict::Goto(&deny));
    });
    b.add_rule(id, None, |r| {
        let established_related: u32 = 0b110;
        r.ct_state()
            .mask(&established_related.to_ne_bytes())
            .cmp(op::NEQ, &0u32.to_ne_bytes())
            .verdict(Verdict::Accept);
    });
    for proto in [TCP, UDP] {
        b.add_rule(id, Some("dns-elsewhere"), |r| {
            dport(r, proto, (53, 53));
            r.counter().verdict(Verdict::Goto(&deny));
        });
    }
    let allow = |b: &mut Batch, a: &AllowRule| {
        for p in protos(a) {
            b.add_rule(id, Some("allow"), |r| {
                daddr(r, &a.net);
                if let Some((proto, ports)) = p {
                    dport(r, proto, ports);
                }
                r.counter().log(g, "allow").verdict(Verdict::Accept);
            });
        }
    };
    for a in &explicit {
        allow(&mut b, a);
    }
    for d in &denied {
        b.add_rule(id, Some("closed"), |r| {
            daddr(r, d);
            r.counter().verdict(Verdict::Goto(&deny));
        });
    }
    b.add_rule(id, Some("icmp"), |r| {
        ipv4(r);
        r.payload(base::NETWORK, 9, 1).cmp(op::EQ, &[libc::IPPROTO_ICMP as u8]);
        // ICMP type 3: destination unreachable, the answer a refused connection may get.
        r.payload(base::TRANSPORT, 0, 1).cmp(op::NEQ, &[3]).counter().verdict(Verdict::Goto(&deny));
    });
    for a in &general {
        allow(&mut b, a);
    }
    b.add_rule(id, Some("allow-dns"), |r| {
        ipv4(r);
        r.payload(base::NETWORK, 16, 4).lookup(&dns_set).counter().log(g, "allow").verdict(Verdict::Accept);
    });
    b.add_rule(id, Some("deny"), |r| {
        r.counter().verdict(Verdict::Goto(&deny));
    });
    for proto in [TCP, UDP] {
        b.add_rule(&input, Some("resolver"), |r| {
            daddr(r, &Net4 { addr: s.host_ip, prefix: 32 });
            dport(r, proto, (53, 53));
            r.counter().verdict(Verdict::Accept);
        });
    }
    b.add_rule(&input, Some("host"), |r| {
        r.counter().verdict(Verdict::Goto(&deny));
    });
    let key = nfnl::ifname_key(s.host_if);
    b.add_elems("sessions_fwd", &[Elem { key: &key, verdict: Some(Verdict::Jump(id)), timeout_ms: None }]);
    b.add_elems("sessions_in", &[Elem { key: &key, verdict: Some(Verdict::Jump(&input)), timeout_ms: None }]);
    b.add_elems("nat_src", &[Elem { key: &s.jail_ip.octets(), verdict: None, timeout_ms: None }]);
    b.commit()
}

/// Admits addresses into a session's DNS set, each until its timeout.
pub fn admit(id: &str, addrs: &[(Ipv4Addr, Duration)]) -> Result<(), NetError> {
    let keys: Vec<[u8; 4]> = addrs.iter().map(|(a, _)| a.octets()).collect();
    let elems: Vec<Elem> = keys
        .iter()
        .zip(addrs)
        .map(|(k, (_, t))| Elem { key: k, verdict: None, timeout_ms: Some(t.as_millis().max(1000) as u64) })
        .collect();
    let mut b = Batch::new(NFPROTO_INET, TABLE);
    b.add_elems(&format!("{id}_dns"), &elems);
    b.commit()
}

/// Removes a session's objects: one atomic batch when they are all there (the normal end), else
/// step by step (the leftovers of a crash may be partial).
pub fn remove_session(id: &str, host_if: &str, jail_ip: Option<Ipv4Addr>) {
    let mut batch = Batch::new(NFPROTO_INET, TABLE);
    for step in removal(id, host_if, jail_ip) {
        step(&mut batch);
    }
    if batch.commit().is_ok() {
        return;
    }
    for step in removal(id, host_if, jail_ip) {
        let mut b = Batch::new(NFPROTO_INET, TABLE);
        step(&mut b);
        let _ = b.commit();
    }
}

type Step = Box<dyn Fn(&mut Batch)>;

/// The deletions, in an order the kernel accepts: what refers to a chain goes before it.
fn removal(id: &str, host_if: &str, jail_ip: Option<Ipv4Addr>) -> Vec<Step> {
    let key = nfnl::ifname_key(host_if);
    let mut steps: Vec<Step> = vec![
        Box::new(move |b| b.del_elems("sessions_fwd", &[Elem { key: &key, verdict: None, timeout_ms: None }])),
        Box::new(move |b| b.del_elems("sessions_in", &[Elem { key: &key, verdict: None, timeout_ms: None }])),
    ];
    if let Some(j) = jail_ip {
        steps.push(Box::new(move |b| {
            b.del_elems("nat_src", &[Elem { key: &j.octets(), verdict: None, timeout_ms: None }])
        }));
    }
    for c in [id.to_owned(), format!("{id}_in"), format!("{id}_deny")] {
        steps.push(Box::new(move |b| b.del_chain(&c)));
    }
    let set = format!("{id}_dns");
    steps.push(Box::new(move |b| b.del_set(&set)));
    steps
}

/// Per-rule packet counts of a session's forward chain, by the rules' comments.
pub fn counters(id: &str) -> Vec<(String, u64)> {
    let Ok(rules) = nfnl::rules(NFPROTO_INET, TABLE, Some(id)) else { return Vec::new() };
    let mut out: Vec<(String, u64)> = Vec::new();
    for r in rules {
        let Some(comment) = r.comment else { continue };
        match out.iter_mut().find(|(c, _)| *c == comment) {
            Some((_, n)) => *n += r.packets,
            None => out.push((comment, r.packets)),
        }
    }
    out
}

/// Session chains present in the table (`sN`), for leftover cleanup.
pub fn session_chains() -> Vec<String> {
    nfnl::chains(NFPROTO_INET, TABLE).map(|c| session_chain_names(&c)).unwrap_or_default()
}

fn session_chain_names(chains: &[String]) -> Vec<String> {
    chains
        .iter()
        .filter(|n| n.len() > 1 && n.starts_with('s') && n[1..].chars().all(|c| c.is_ascii_digit()))
        .cloned()
        .collect()
}
