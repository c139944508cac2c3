//! Egress filtering in one Stockade-owned nftables table, `inet stockade`, through the `nft`
//! binary. nftables' netlink ABI is a batch of expression bytecode that libnftables exists to
//! build; `nft` is its documented front end, so Stockade writes rulesets in nft's own language
//! (generated only from validated, typed values and names Stockade makes) and reads state back
//! as JSON. `.ci/run` installs the `nftables` package.
//!
//! Shared objects: verdict maps from a session's host-side interface to its chains, the set of
//! NAT sources, and three base chains. Per session: chains `sN` (forward, from the jail) and
//! `sN_in` (to the host itself), and the set `sN_dns` of addresses its resolver admitted.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::rules::{AllowRule, Net4, Proto, ALWAYS_DENIED};

pub const TABLE: &str = "stockade";

fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft (install the nftables package): {e}"))?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn nft_json(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("nft").arg("-j").args(args).output().map_err(|e| format!("running nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("nft -j output: {e}"))
}

/// Makes sure the table and its shared objects are there and intact, and returns the session
/// chains (`sN`) already in it. A base chain that lost its rules (a hand-edited or flushed
/// table) would let sessions' traffic through unfiltered, so an incomplete base is rebuilt —
/// atomically, in place, sessions' own chains untouched. Callers serialise this with the pool
/// lock.
pub fn ensure_base(host_prefix: &str) -> Result<Vec<String>, String> {
    let listed = nft_json(&["list", "table", "inet", TABLE]).ok();
    if let Some(v) = &listed {
        let rules_in = |chain: &str| {
            v["nftables"].as_array().into_iter().flatten().filter(|i| i["rule"]["chain"] == chain).count()
        };
        let maps = v["nftables"].as_array().into_iter().flatten().filter(|i| i.get("map").is_some()).count();
        if rules_in("forward") == 3 && rules_in("input") == 1 && rules_in("postrouting") == 1 && maps == 2 {
            return Ok(chains_of(v));
        }
        tracing::warn!("table inet {TABLE} is incomplete; rebuilding its base chains");
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
    Ok(listed.as_ref().map(chains_of).unwrap_or_default())
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
}

fn ports(r: &AllowRule) -> String {
    let Some((lo, hi)) = r.ports else { return String::new() };
    let range = if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") };
    match r.proto {
        Some(Proto::Tcp) => format!(" tcp dport {range}"),
        Some(Proto::Udp) => format!(" udp dport {range}"),
        None => format!(" meta l4proto {{ tcp, udp }} th dport {range}"),
    }
}

pub fn add_session(s: &SessionRules) -> Result<(), String> {
    let id = s.id;
    let mut denied: Vec<Net4> = ALWAYS_DENIED.iter().map(|d| Net4::parse(d).expect("constant")).collect();
    denied.push(s.pool);
    denied.extend(s.host_addrs.iter().map(|a| Net4 { addr: *a, prefix: 32 }));
    // Allow entries inside a closed range are explicit choices: they go before the closing rule.
    let (explicit, general): (Vec<&AllowRule>, Vec<&AllowRule>) =
        s.allow.iter().partition(|r| denied.iter().any(|d| d.overlaps(&r.net)));
    let denied_set = denied.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    let g = s.log_group;
    // Denials go through one chain that copies them (rate-limited) to the session's NFLOG group;
    // allowed connections are copied once, on their first packet (later ones are established).
    let mut script = format!(
        "add set inet {TABLE} {id}_dns {{ type ipv4_addr; flags timeout; }}
add chain inet {TABLE} {id}_deny
add chain inet {TABLE} {id}
add chain inet {TABLE} {id}_in
add rule inet {TABLE} {id}_deny limit rate 20/second burst 40 packets log group {g} prefix \"deny\"
add rule inet {TABLE} {id}_deny drop
add rule inet {TABLE} {id} meta nfproto ipv6 counter goto {id}_deny comment \"ipv6\"
add rule inet {TABLE} {id} ct state established,related accept
add rule inet {TABLE} {id} meta l4proto {{ tcp, udp }} th dport 53 counter goto {id}_deny comment \"dns-elsewhere\"
"
    );
    let accept = format!("counter log group {g} prefix \"allow\" accept");
    let allow_rule = |r: &AllowRule| {
        format!("add rule inet {TABLE} {id} ip daddr {}{} {accept} comment \"allow\"\n", r.net, ports(r))
    };
    script.extend(explicit.iter().map(|r| allow_rule(r)));
    script.push_str(&format!(
        "add rule inet {TABLE} {id} ip daddr {{ {denied_set} }} counter goto {id}_deny comment \"closed\"
add rule inet {TABLE} {id} ip protocol icmp icmp type != destination-unreachable counter goto {id}_deny comment \"icmp\"
"
    ));
    script.extend(general.iter().map(|r| allow_rule(r)));
    script.push_str(&format!(
        "add rule inet {TABLE} {id} ip daddr @{id}_dns {accept} comment \"allow-dns\"
add rule inet {TABLE} {id} counter goto {id}_deny comment \"deny\"
add rule inet {TABLE} {id}_in ip daddr {host} meta l4proto {{ tcp, udp }} th dport 53 counter accept comment \"resolver\"
add rule inet {TABLE} {id}_in counter drop comment \"host\"
add element inet {TABLE} sessions_fwd {{ \"{ifc}\" : jump {id} }}
add element inet {TABLE} sessions_in {{ \"{ifc}\" : jump {id}_in }}
add element inet {TABLE} nat_src {{ {jail} }}
",
        host = s.host_ip,
        ifc = s.host_if,
        jail = s.jail_ip,
    ));
    nft(&script)
}

/// Admits addresses into a session's DNS set, each until its timeout.
pub fn admit(id: &str, addrs: &[(Ipv4Addr, Duration)]) -> Result<(), String> {
    let elems: Vec<String> = addrs.iter().map(|(a, t)| format!("{a} timeout {}s", t.as_secs().max(1))).collect();
    nft(&format!("add element inet {TABLE} {id}_dns {{ {} }}\n", elems.join(", ")))
}

/// Removes a session's objects: one atomic batch when they are all there (the normal end), else
/// step by step (the leftovers of a crash may be partial).
pub fn remove_session(id: &str, host_if: &str, jail_ip: Option<Ipv4Addr>) {
    let mut batch = format!(
        "delete element inet {TABLE} sessions_fwd {{ \"{host_if}\" }}\ndelete element inet {TABLE} sessions_in {{ \"{host_if}\" }}\n"
    );
    if let Some(j) = jail_ip {
        batch.push_str(&format!("delete element inet {TABLE} nat_src {{ {j} }}\n"));
    }
    batch.push_str(&format!(
        "delete chain inet {TABLE} {id}\ndelete chain inet {TABLE} {id}_in\ndelete chain inet {TABLE} {id}_deny\ndelete set inet {TABLE} {id}_dns\n"
    ));
    if nft(&batch).is_ok() {
        return;
    }
    remove_piecewise(id, host_if, jail_ip);
}

fn remove_piecewise(id: &str, host_if: &str, jail_ip: Option<Ipv4Addr>) {
    let mut steps = vec![
        format!("delete element inet {TABLE} sessions_fwd {{ \"{host_if}\" }}"),
        format!("delete element inet {TABLE} sessions_in {{ \"{host_if}\" }}"),
        format!("delete chain inet {TABLE} {id}"),
        format!("delete chain inet {TABLE} {id}_in"),
        format!("delete chain inet {TABLE} {id}_deny"),
        format!("delete set inet {TABLE} {id}_dns"),
    ];
    if let Some(j) = jail_ip {
        steps.insert(2, format!("delete element inet {TABLE} nat_src {{ {j} }}"));
    }
    for s in steps {
        let _ = nft(&format!("{s}\n"));
    }
}

/// Per-rule packet counts of a session's forward chain, by the rules' comments.
pub fn counters(id: &str) -> Vec<(String, u64)> {
    let Ok(v) = nft_json(&["list", "chain", "inet", TABLE, id]) else { return Vec::new() };
    let mut out: Vec<(String, u64)> = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else { continue };
        let Some(comment) = rule["comment"].as_str() else { continue };
        let packets: u64 =
            rule["expr"].as_array().into_iter().flatten().filter_map(|e| e["counter"]["packets"].as_u64()).sum();
        match out.iter_mut().find(|(c, _)| c == comment) {
            Some((_, n)) => *n += packets,
            None => out.push((comment.to_owned(), packets)),
        }
    }
    out
}

/// Session chains present in the table (`sN`), for leftover cleanup.
pub fn session_chains() -> Vec<String> {
    nft_json(&["list", "table", "inet", TABLE]).map(|v| chains_of(&v)).unwrap_or_default()
}

fn chains_of(v: &serde_json::Value) -> Vec<String> {
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["chain"]["name"].as_str())
        .filter(|n| n.len() > 1 && n.starts_with('s') && n[1..].chars().all(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .collect()
}
