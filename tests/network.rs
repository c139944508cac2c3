//! `network.mode = "veth"` against an "internet" the test builds: a network namespace with a
//! veth to the host, documentation-range addresses (198.51.100.0/24), TCP listeners, a UDP echo
//! and a tiny DNS zone. No traffic leaves the host's own namespaces.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stockade::net::dns;

/// The tampering test flushes the shared base chain, and the killed-session test looks at
/// leftovers any session's start would sweep: the others must not run meanwhile.
static TABLE: std::sync::RwLock<()> = std::sync::RwLock::new(());
use stockade::net::rtnl::Rtnl;

/// The remote side: a namespace reached through `host_if`, serving on `base.2` (and .3, .4).
struct Internet {
    ns: Child,
    host_if: String,
    stop: Arc<AtomicBool>,
    net: [u8; 3],
}

fn in_netns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn dns_answer(query: &[u8], zone: &[(&str, Ipv4Addr)], ttl: u32) -> Option<Vec<u8>> {
    let q = dns::parse_question(query)?;
    let hit = zone.iter().find(|(n, _)| *n == q.name).map(|(_, a)| *a);
    let mut r = dns::reply(query, &q, if hit.is_some() { 0 } else { 3 });
    if let (Some(ip), 1) = (hit, q.qtype) {
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

impl Internet {
    fn start(net: [u8; 3], tag: &str) -> Internet {
        // The namespace lives as long as this process: should the test be killed, the sleep dies
        // with it and takes the namespace, its veth pair and its subnet's route along (a later
        // run would otherwise find 198.18.x.0/24 routed to a dead end).
        let mut unshare = Command::new("unshare");
        unshare.args(["--net", "sleep", "600"]);
        // SAFETY: prctl in the forked child before exec touches nothing of the parent's.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut unshare, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let ns = unshare.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let host_if = format!("sti{tag}{}", std::process::id() % 1000);
        let ip = move |last: u8| Ipv4Addr::new(net[0], net[1], net[2], last);
        let mut r = Rtnl::open().unwrap();
        r.add_veth(&host_if, "eth0", ns.id() as i32, None).unwrap();
        r.add_addr4(&host_if, ip(1), 24).unwrap();
        r.set_up(&host_if).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let pid = ns.id();
        in_netns(pid, move || {
            let mut r = Rtnl::open().unwrap();
            for last in [2, 3, 4] {
                r.add_addr4("eth0", ip(last), 24).unwrap();
            }
            r.set_up("eth0").unwrap();
            r.set_up("lo").unwrap();
        });
        // Servers, each a thread living in the namespace.
        for port in [8080u16, 8081] {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
                l.set_nonblocking(true).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.write_all(format!("hello from {port}\n").as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        let zone = [("allowed.test", ip(3)), ("blocked.test", ip(4)), ("private.test", Ipv4Addr::new(192, 168, 77, 7))];
        let s2 = stop.clone();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let sock = UdpSocket::bind((ip(2), 53)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut buf = [0u8; 512];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if let Some(a) = dns_answer(&buf[..n], &zone, 2) {
                        let _ = sock.send_to(&a, from);
                    }
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        Internet { ns, host_if, stop, net }
    }

    fn ip(&self, last: u8) -> String {
        format!("{}.{}.{}.{last}", self.net[0], self.net[1], self.net[2])
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut r) = Rtnl::open() {
            let _ = r.del_link(&self.host_if);
        }
        let _ = self.ns.kill();
        let _ = self.ns.wait();
    }
}

fn veth_policy(inet: &Internet, extra: &str) -> (TempDir, std::path::PathBuf) {
    policy(
        "default",
        &format!(
            "[network]\nmode = \"veth\"\nallow = [\"{}/32:8080\"]\nallow_domains = [\"allowed.test\", \"private.test\"]\nupstream_dns = [\"{}\"]\n{extra}",
            inet.ip(2),
            inet.ip(2)
        ),
    )
}

/// Runs a Python snippet in a veth jail; `STOCKADE_DNS_TTL_FLOOR=1` so TTL expiry is testable.
fn py(policy_path: &std::path::Path, code: &str) -> Run {
    let out = Command::new(STOCKADE)
        .args(["-v", "run", "--report", "--policy", policy_path.to_str().unwrap(), "--", "python3", "-c", code])
        .env("STOCKADE_DNS_TTL_FLOOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    to_run(out)
}

const HELPERS: &str = r#"
import socket, sys, time
def tcp(host, port, t=2.0):
    try:
        s = socket.create_connection((host, port), timeout=t)
        s.settimeout(t)
        return "ok " + s.recv(64).decode().strip()
    except Exception as e:
        return "fail " + type(e).__name__
def resolve(name):
    try:
        return socket.gethostbyname(name)
    except Exception as e:
        return "fail " + type(e).__name__
def tcp_dns(server, name):
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\x00\x00\x01\x00\x01"
    try:
        s = socket.create_connection((server, 53), timeout=2)
        s.sendall(len(q).to_bytes(2, "big") + q)
        n = int.from_bytes(s.recv(2), "big")
        r = b""
        while len(r) < n:
            r += s.recv(n - len(r))
        return "rcode %d answers %d" % (r[3] & 15, r[7])
    except Exception as e:
        return "fail " + type(e).__name__
def udp_dns(server, name):
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\x00\x00\x01\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        s.sendto(q, (server, 53))
        return "answered %d" % len(s.recv(512))
    except Exception as e:
        return "fail " + type(e).__name__
"#;

fn host_ip() -> String {
    // The host's own address on its default route's link.
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("192.0.2.1:9").map(|_| s.local_addr().unwrap().ip().to_string()).unwrap_or_else(|_| "127.0.0.1".into())
}

#[test]
fn veth_egress_follows_the_allowlist_and_nothing_else() {
    if needs_root() {
        return;
    }
    let _shared = TABLE.read().unwrap_or_else(|p| p.into_inner());
    let inet = Internet::start([198, 51, 100], "a");
    let (_d, p) = veth_policy(&inet, "");
    let host_listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let code = format!(
        "{HELPERS}
print('allowed-port', tcp('{a}', 8080))
print('other-port', tcp('{a}', 8081))
print('resolve-allowed', resolve('allowed.test'))
print('allowed-name', tcp('{b}', 8080))
print('allowed-name-other-port', tcp('{b}', 8081))
time.sleep(3.5)
print('after-ttl', tcp('{b}', 8080))
print('resolve-blocked', resolve('blocked.test'))
print('blocked-direct', tcp('{c}', 8080))
print('rebinding', resolve('private.test'), tcp('192.168.77.7', 8080, 1))
print('dns-elsewhere', udp_dns('{a}', 'allowed.test'))
resolver = open('/etc/resolv.conf').read().split()[1]
print('dns-tcp-allowed', tcp_dns(resolver, 'allowed.test'))
print('dns-tcp-blocked', tcp_dns(resolver, 'blocked.test'))
print('metadata', tcp('169.254.169.254', 80, 1))
print('host-addr', tcp('{host}', {host_port}, 1))
print('host-loopback-port', tcp('127.0.0.1', {host_port}, 1))
try:
    socket.create_connection(('2001:db8::2', 8080), timeout=1); print('ipv6 ok')
except Exception as e:
    print('ipv6 fail', type(e).__name__)
",
        a = inet.ip(2),
        b = inet.ip(3),
        c = inet.ip(4),
        host = host_ip(),
    );
    let r = py(&p, &code);
    assert_eq!(r.code, 0, "{r:?}");
    let line = |k: &str| {
        r.stdout.lines().find(|l| l.starts_with(&format!("{k} "))).unwrap_or_else(|| panic!("{k}: {r:?}")).to_owned()
    };
    assert_eq!(line("allowed-port"), "allowed-port ok hello from 8080");
    // network.on_deny = "reject" (the default): a denied connection is refused at once, not left
    // to time out.
    assert_eq!(line("other-port"), "other-port fail ConnectionRefusedError", "{r:?}");
    assert_eq!(line("resolve-allowed"), format!("resolve-allowed {}", inet.ip(3)));
    assert_eq!(line("allowed-name"), "allowed-name ok hello from 8080");
    // A name admits its address on any port: the allowlist names hosts, not services.
    assert_eq!(line("allowed-name-other-port"), "allowed-name-other-port ok hello from 8081");
    assert!(line("after-ttl").contains("fail"), "the address stayed open past its TTL: {r:?}");
    assert!(line("resolve-blocked").contains("fail"), "{r:?}");
    assert_eq!(line("blocked-direct"), "blocked-direct fail ConnectionRefusedError", "{r:?}");
    // The name resolves, but its private address is not admitted: the firewall's own refusal (a
    // reset, on_deny = "reject"), not a timeout or an unreachable route, which would look the same
    // to a test that only asks for "fail" and would pass with no firewall at all.
    assert_eq!(line("rebinding"), "rebinding 192.168.77.7 fail ConnectionRefusedError", "{r:?}");
    assert!(line("dns-elsewhere").contains("fail"), "{r:?}");
    assert_eq!(line("dns-tcp-allowed"), "dns-tcp-allowed rcode 0 answers 1", "{r:?}");
    assert_eq!(line("dns-tcp-blocked"), "dns-tcp-blocked rcode 5 answers 0", "{r:?}");
    assert_eq!(line("metadata"), "metadata fail ConnectionRefusedError", "{r:?}");
    assert_eq!(line("host-addr"), "host-addr fail ConnectionRefusedError", "{r:?}");
    // The jail's 127.0.0.1 is its own: the host's listener there is not reached.
    assert_eq!(line("host-loopback-port"), "host-loopback-port fail ConnectionRefusedError", "{r:?}");
    assert!(line("ipv6").contains("fail"), "{r:?}");
    drop(host_listener);
    // Each attempt is in the log, with its destination.
    let a = inet.ip(2);
    let logged = |verdict: &str, dport: u16| {
        r.stderr.lines().any(|l| {
            l.contains(&format!("egress {verdict}"))
                && l.contains(&format!("dst={a}"))
                && l.contains(&format!("dport=\"{dport}\""))
        })
    };
    assert!(logged("allowed", 8080), "{}", r.stderr);
    assert!(logged("denied", 8081), "{}", r.stderr);
    assert!(
        r.stderr.contains("dns refused: name not allowlisted") && r.stderr.contains("blocked.test"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("connections: "), "{}", r.stderr);
    assert_no_leftovers(slot_of(&r));
}

/// The slot a run used, from its report (`veth stkN ...`).
fn slot_of(r: &Run) -> u32 {
    let i = r.stderr.find("veth stk").unwrap_or_else(|| panic!("no veth in the report: {r:?}"));
    r.stderr[i + 8..].split_whitespace().next().unwrap().parse().unwrap()
}

fn slot_of_ip(ip: Ipv4Addr) -> u32 {
    (u32::from(ip) - u32::from(Ipv4Addr::new(10, 199, 0, 0))) / 4
}

fn leftovers(slot: u32) -> (bool, bool, bool) {
    let link = Rtnl::open().unwrap().links().unwrap().contains(&format!("{}{slot}", stockade::net::HOST_PREFIX));
    let chain = stockade::net::nft::session_chains().contains(&format!("s{slot}"));
    let file = std::path::Path::new(&format!("{}/{slot}", stockade::net::RUN_DIR)).exists();
    (link, chain, file)
}

fn assert_no_leftovers(slot: u32) {
    // The link goes with the jail's network namespace, which the kernel tears down asynchronously.
    let t = Instant::now();
    while leftovers(slot).0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(leftovers(slot), (false, false, false), "(link, nft chain, slot file) of slot {slot} left behind");
}

#[test]
fn two_sessions_cannot_reach_each_other_and_a_killed_stockade_leaves_nothing() {
    if needs_root() {
        return;
    }
    // Alone: any other session's start sweeps what the killed one left, which this test looks at.
    let _alone = TABLE.write().unwrap_or_else(|p| p.into_inner());
    let inet = Internet::start([203, 0, 113], "b");
    let (_d, p) = veth_policy(&inet, "");
    // Session A listens; session B tries to reach it.
    let mut a = Command::new(STOCKADE)
        .args([
            "run",
            "--policy",
            p.to_str().unwrap(),
            "--",
            "python3",
            "-c",
            &format!(
                "import socket; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(('{}', 9)); \
                 print(u.getsockname()[0], flush=True); l = socket.socket(); l.bind(('0.0.0.0', 7000)); l.listen(); \
                 import time; time.sleep(30)",
                inet.ip(2)
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = String::new();
    let mut out = a.stdout.take().unwrap();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        addr.push(b[0] as char);
    }
    let a_ip: Ipv4Addr = addr.trim().parse().unwrap_or_else(|_| panic!("{addr:?}"));
    let r = py(&p, &format!("{HELPERS}\nprint(tcp('{a_ip}', 7000, 2))\nprint(tcp('{}', 8080))", inet.ip(2)));
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[0].starts_with("fail"), "session B reached session A: {r:?}");
    assert_eq!(lines[1], "ok hello from 8080", "B itself works: {r:?}");
    // kill -9 of A's Stockade: the jail dies with it; the next Stockade removes what A left.
    a.kill().unwrap();
    a.wait().unwrap();
    let slot = slot_of_ip(a_ip);
    let t = Instant::now();
    while leftovers(slot).0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the killed jail's veth stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(leftovers(slot), (false, true, true), "expected the killed session's chain and slot file to be left");
    let r = py(&p, "print('next')");
    assert_eq!(r.stdout, "next\n", "{r:?}");
    assert_no_leftovers(slot);
    assert_no_leftovers(slot_of(&r));
}

#[test]
fn a_tampered_table_is_repaired_before_a_session_relies_on_it() {
    if needs_root() {
        return;
    }
    let _alone = TABLE.write().unwrap_or_else(|p| p.into_inner());
    let inet = Internet::start([198, 18, 0], "c");
    let (_d, p) = veth_policy(&inet, "");
    assert_eq!(py(&p, "print('warm')").stdout, "warm\n");
    // Someone flushes the forward base chain: sessions' chains would no longer be consulted.
    let ok = Command::new("nft").args(["flush", "chain", "inet", "stockade", "forward"]).status().unwrap();
    assert!(ok.success());
    let r = py(&p, &format!("{HELPERS}\nprint(tcp('{}', 8081))\nprint(tcp('{}', 8080))", inet.ip(2), inet.ip(2)));
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines.first().is_some_and(|l| l.starts_with("fail")), "unfiltered after tampering: {r:?}");
    assert_eq!(lines.get(1), Some(&"ok hello from 8080"), "{r:?}");
    assert!(r.stderr.contains("rebuilding its base chains"), "{r:?}");
}

/// The rules Stockade writes over netlink, as `nft` reads them back: byte for byte the ruleset
/// the documented policy means. A slot far outside any pool the other tests use.
#[test]
fn netlink_rules_read_back_as_the_intended_ruleset() {
    if needs_root() {
        return;
    }
    let _shared = TABLE.read().unwrap_or_else(|p| p.into_inner());
    use stockade::net::nft::{self, SessionRules};
    use stockade::policy::rules::{AllowRule, Net4};
    nft::ensure_base("stk").unwrap();
    let id = "s4090001";
    let allow: Vec<AllowRule> = ["198.51.100.0/24:443/tcp", "10.77.0.0/16:8000-8010", "203.0.113.5"]
        .iter()
        .map(|a| AllowRule::parse(a).unwrap())
        .collect();
    let rules = SessionRules {
        id,
        host_if: "stktest1",
        host_ip: Ipv4Addr::new(10, 77, 0, 1),
        jail_ip: Ipv4Addr::new(10, 77, 0, 2),
        pool: Net4::parse("10.77.0.0/16").unwrap(),
        host_addrs: &[Ipv4Addr::new(192, 0, 2, 2)],
        allow: &allow,
        log_group: 9,
        on_deny: stockade::policy::OnDeny::Reject,
    };
    nft::add_session(&rules).unwrap();
    let list = |chain: &str| {
        let out = Command::new("nft").args(["list", "chain", "inet", "stockade", chain]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let body = |text: String| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("table ") && !l.starts_with("chain ") && *l != "}")
            .map(str::to_owned)
            .collect()
    };
    let fwd = body(list(id));
    let c = "counter packets 0 bytes 0";
    let expected: Vec<String> = [
        format!("meta nfproto ipv6 {c} goto {id}_deny comment \"ipv6\""),
        "ct state established,related accept".into(),
        format!("tcp dport 53 {c} goto {id}_deny comment \"dns-elsewhere\""),
        format!("udp dport 53 {c} goto {id}_deny comment \"dns-elsewhere\""),
        // Inside the session pool, a closed range: an explicit choice, so before the closing rules.
        format!("ip daddr 10.77.0.0/16 tcp dport 8000-8010 {c} log prefix \"allow\" group 9 accept comment \"allow\""),
        format!("ip daddr 10.77.0.0/16 udp dport 8000-8010 {c} log prefix \"allow\" group 9 accept comment \"allow\""),
        format!("ip daddr 169.254.0.0/16 {c} goto {id}_deny comment \"closed\""),
        format!("ip daddr 127.0.0.0/8 {c} goto {id}_deny comment \"closed\""),
        format!("ip daddr 0.0.0.0/8 {c} goto {id}_deny comment \"closed\""),
        format!("ip daddr 224.0.0.0/4 {c} goto {id}_deny comment \"closed\""),
        format!("ip daddr 240.0.0.0/4 {c} goto {id}_deny comment \"closed\""),
        format!("ip daddr 10.77.0.0/16 {c} goto {id}_deny comment \"closed\""),
        format!("ip daddr 192.0.2.2 {c} goto {id}_deny comment \"closed\""),
        format!("ip protocol icmp icmp type != destination-unreachable {c} goto {id}_deny comment \"icmp\""),
        format!("ip daddr 198.51.100.0/24 tcp dport 443 {c} log prefix \"allow\" group 9 accept comment \"allow\""),
        format!("ip daddr 203.0.113.5 {c} log prefix \"allow\" group 9 accept comment \"allow\""),
        format!("ip daddr @{id}_dns {c} log prefix \"allow\" group 9 accept comment \"allow-dns\""),
        format!("{c} goto {id}_deny comment \"deny\""),
    ]
    .into();
    let input = body(list(&format!("{id}_in")));
    let deny = body(list(&format!("{id}_deny")));
    let dns_admit = nft::admit(id, &[(Ipv4Addr::new(198, 51, 100, 7), Duration::from_secs(60))]);
    let set = Command::new("nft").args(["list", "set", "inet", "stockade", &format!("{id}_dns")]).output().unwrap();
    let counters = nft::counters(id);
    nft::remove_session(id, "stktest1", Some(Ipv4Addr::new(10, 77, 0, 2)));
    let after = Command::new("nft").args(["list", "table", "inet", "stockade"]).output().unwrap();
    assert_eq!(fwd, expected);
    assert_eq!(
        input,
        vec![
            format!("ip daddr 10.77.0.1 tcp dport 53 {c} accept comment \"resolver\""),
            format!("ip daddr 10.77.0.1 udp dport 53 {c} accept comment \"resolver\""),
            format!("{c} goto {id}_deny comment \"host\""),
        ]
    );
    assert_eq!(
        deny,
        vec![
            "limit rate 20/second burst 40 packets log prefix \"deny\" group 9",
            "meta l4proto tcp reject with tcp reset",
            "reject with icmpx admin-prohibited",
        ]
    );
    dns_admit.unwrap();
    let set = String::from_utf8_lossy(&set.stdout);
    assert!(
        set.contains("type ipv4_addr") && set.contains("flags timeout") && set.contains("198.51.100.7 timeout 1m"),
        "{set}"
    );
    assert_eq!(
        counters.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["ipv6", "dns-elsewhere", "allow", "closed", "icmp", "allow-dns", "deny"]
    );
    let after = String::from_utf8_lossy(&after.stdout);
    assert!(!after.contains(id) && !after.contains("stktest1") && !after.contains("10.77.0.2"), "{after}");
}

/// A transaction the kernel refuses is applied not at all, and the error names the refused step.
#[test]
fn a_refused_nftables_transaction_changes_nothing() {
    if needs_root() {
        return;
    }
    let _shared = TABLE.read().unwrap_or_else(|p| p.into_inner());
    use stockade::net::nfnl::{Batch, Verdict, NFPROTO_INET};
    stockade::net::nft::ensure_base("stk").unwrap();
    let mut b = Batch::new(NFPROTO_INET, "stockade");
    b.add_chain("s4090002");
    b.add_rule("s4090002", None, |r| {
        r.verdict(Verdict::Accept);
    });
    b.add_rule("s4090002", Some("x"), |r| {
        r.verdict(Verdict::Goto("no_such_chain"));
    });
    let err = b.commit().unwrap_err();
    // The refused message is named, and its errno kept.
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
    let err = err.to_string();
    assert!(err.contains("add rule to s4090002 (x)") && err.contains("No such file"), "{err}");
    let chains = stockade::net::nfnl::chains(NFPROTO_INET, "stockade").unwrap();
    assert!(!chains.iter().any(|c| c == "s4090002"), "{chains:?}");
    // The socket is usable again afterwards.
    assert!(chains.iter().any(|c| c == "forward"));
}

/// The IPv6 addresses `/proc/net/if_inet6` lists for an interface, as the reader's namespace sees it.
fn ipv6_addresses(table: &str, ifname: &str) -> Vec<String> {
    table.lines().filter(|l| l.split_whitespace().nth(5) == Some(ifname)).map(|l| l[..32].to_owned()).collect()
}

/// The other direction, and IPv6. A connection from the "internet" to a listener in the jail
/// never reaches it: the internet routes the jail's range back through the host, so only the
/// firewall stands between, and it drops new connections into jails. IPv6 does not cross the
/// veth at all: neither end has an address (no link-local, so no neighbour discovery towards
/// the host), the host end drops IPv6, and a jail's IPv6 connection fails at once. Each listener
/// is shown live first.
#[test]
fn inbound_connections_and_ipv6_are_refused() {
    if needs_root() {
        return;
    }
    let _shared = TABLE.read().unwrap_or_else(|p| p.into_inner());
    let inet = Internet::start([198, 18, 11], "i");
    let gateway = Ipv4Addr::new(198, 18, 11, 1);
    in_netns(inet.ns.id(), move || Rtnl::open().unwrap().add_default_route4("eth0", gateway).unwrap());
    let (_d, p) = veth_policy(&inet, "");
    let code = format!(
        r#"
import socket, sys, time
s = socket.socket(); s.bind(("0.0.0.0", 9099)); s.listen(8); s.settimeout(0.5)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(("{inet}", 9)); ip = u.getsockname()[0]
c = socket.create_connection((ip, 9099), 1); a, _ = s.accept(); a.close(); c.close()
print("listener live", flush=True)
print("eth0 ipv6", len([l for l in open("/proc/net/if_inet6") if l.split()[5] == "eth0"]))
t = time.time()
try:
    socket.create_connection(("fe80::1%eth0", 80), timeout=2); print("ipv6 ok")
except OSError as e:
    print("ipv6 fail", type(e).__name__, e.errno, "at once" if time.time() - t < 1 else "late")
print("ready", ip, flush=True)
sys.stdin.readline()
try:
    s.accept(); print("inbound arrived")
except socket.timeout:
    print("inbound none")
"#,
        inet = inet.ip(2),
    );
    let mut child = Command::new(STOCKADE)
        .args(["run", "--report", "--policy", p.to_str().unwrap(), "--", "python3", "-c", &code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut said = String::new();
    let jail_ip: Ipv4Addr = loop {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "the jail ended early: {said}");
        said += &line;
        if let Some(ip) = line.trim().strip_prefix("ready ") {
            break ip.parse().unwrap();
        }
    };
    let host_if = format!("{}{}", stockade::net::HOST_PREFIX, slot_of_ip(jail_ip));
    // The host end, while the jail runs: IPv6 off, no address.
    let sysctl = std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6")).unwrap();
    assert_eq!(sysctl.trim(), "1", "IPv6 is on at the host end {host_if}");
    let host_table = std::fs::read_to_string("/proc/net/if_inet6").unwrap();
    assert_eq!(ipv6_addresses(&host_table, &host_if), Vec::<String>::new(), "{host_table}");
    // From the internet to the jail's listener, routed through the host.
    let inbound = in_netns(inet.ns.id(), move || {
        std::net::TcpStream::connect_timeout(&(jail_ip, 9099).into(), Duration::from_secs(2)).map(|_| ())
    });
    writeln!(stdin, "done").unwrap();
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    said += &rest;
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{said}\n{err}");
    assert!(said.starts_with("listener live\n"), "{said}");
    // The jail end has no IPv6 address; an IPv6 connection is refused by the jail's own kernel
    // at once (ENETUNREACH), before any packet leaves.
    assert!(said.contains("eth0 ipv6 0\n"), "{said}");
    assert!(said.contains("ipv6 fail OSError 101 at once\n"), "{said}");
    // Inbound is dropped without an answer, and nothing reached the jail's listener.
    let e = inbound.expect_err("a connection from outside reached the jail");
    assert!(matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock), "{e:?}");
    assert!(said.contains("inbound none"), "{said}\n{err}");
    assert_no_leftovers(slot_of_ip(jail_ip));
}

/// `network.on_deny = "drop"`: a denied connection gets no answer and runs into the client's
/// own timeout (the default, "reject", refuses it at once: see the test above).
#[test]
fn on_deny_drop_leaves_a_denied_connection_unanswered() {
    if needs_root() {
        return;
    }
    let _shared = TABLE.read().unwrap_or_else(|p| p.into_inner());
    let inet = Internet::start([198, 19, 0], "d");
    let (_d, p) = veth_policy(&inet, "on_deny = \"drop\"");
    let code = format!(
        "{HELPERS}
print('allowed-port', tcp('{a}', 8080))
print('other-port', tcp('{a}', 8081, 1))
",
        a = inet.ip(2),
    );
    let r = py(&p, &code);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("allowed-port ok hello from 8080"), "{r:?}");
    assert!(r.stdout.contains("other-port fail TimeoutError") || r.stdout.contains("other-port fail timeout"), "{r:?}");
}

/// A session's trail records each connection attempt that leaves its jail — allowed and
/// denied — with the tool call behind it.
#[test]
fn the_trail_records_egress_allowed_and_denied_with_the_call_behind_it() {
    if needs_root() {
        return;
    }
    let _shared = TABLE.read().unwrap_or_else(|p| p.into_inner());
    let inet = Internet::start([198, 18, 7], "t");
    let (d, p) = veth_policy(&inet, "");
    let trail = d.path().join("trail.jsonl");
    let code = format!("{HELPERS}\nprint(tcp('{a}', 8080), tcp('{a}', 8081))", a = inet.ip(2));
    let req = serde_json::json!({"id": "toolu_net", "name": "bash", "input": {"command": format!("python3 -c \"$(cat <<'EOF'\n{code}\nEOF\n)\"")}});
    let mut child = Command::new(STOCKADE)
        .args(["session", "--policy", p.to_str().unwrap(), "--trail", trail.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{req}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.contains("ok hello from 8080 fail ConnectionRefusedError"), "{line}");
    // The connection log reaches the trail asynchronously; the session's end flushes it.
    let recs: Vec<serde_json::Value> =
        std::fs::read_to_string(&trail).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let egress: Vec<&serde_json::Value> = recs.iter().filter(|r| r["event"] == "egress").collect();
    let find = |verdict: &str, port: u16| {
        egress
            .iter()
            .find(|r| r["verdict"] == verdict && r["dport"] == port && r["dst"] == inet.ip(2).as_str())
            .copied()
    };
    let allowed = find("allow", 8080).unwrap_or_else(|| panic!("{egress:#?}"));
    let denied = find("deny", 8081).unwrap_or_else(|| panic!("{egress:#?}"));
    assert_eq!(
        (&allowed["proto"], &allowed["tool_use_id"]),
        (&serde_json::json!("tcp"), &serde_json::json!("toolu_net"))
    );
    assert_eq!(denied["tool_use_id"], "toolu_net");
}

/// Provisioning clones a repository in a jail of its own, through the provisioning egress
/// allowlist (and only through it), with the credentials file visible there and removed after.
#[test]
fn provisioning_clones_through_its_own_egress_allowlist() {
    use stockade::worker::provision::{self, Job, Plan};
    if needs_root() {
        return;
    }
    let _shared = TABLE.read().unwrap_or_else(|p| p.into_inner());
    let inet = Internet::start([198, 18, 9], "g");
    let d = TempDir::new("gitsrv");
    let git = |args: &[&str], dir: &std::path::Path| {
        let o = Command::new("git").args(args).current_dir(dir).env("HOME", d.path()).output().unwrap();
        assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    git(&["init", "-q", "-b", "main"], &src);
    std::fs::write(src.join("README"), "from the repository\n").unwrap();
    git(&["add", "README"], &src);
    git(&["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one"], &src);
    std::fs::create_dir_all(d.path().join("srv/acme")).unwrap();
    git(&["clone", "-q", "--bare", src.to_str().unwrap(), "srv/acme/app.git"], d.path());
    let server = inet.ip(2);
    // `git daemon` runs as a child of `git` (and that of nsenter): the whole process group goes
    // when the test ends, however it ends.
    let daemon = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", inet.ns.id()))
        .args(["git", "daemon", "--reuseaddr", "--export-all", &format!("--listen={server}"), "--port=9418"])
        .arg(format!("--base-path={}", d.path().join("srv").display()))
        .arg(d.path().join("srv"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let daemon = GroupGuard(daemon);
    std::thread::sleep(Duration::from_millis(500));
    let creds = d.path().join("creds");
    std::fs::write(&creds, "https://u:p@git.example\n").unwrap();
    let url = format!("git://{server}/acme/app.git");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let attempt = |allow: &str| {
        let (pd, path) = policy_for_host_dirs(
            "default",
            &format!(
                "[provision]\ngit_url_key = \"repo\"\ngit_allow = [\"git://{server}/acme/\"]\nallow = [{allow}]\n\
                 credentials = {:?}\n",
                creds.display().to_string()
            ),
        );
        let policy = stockade::policy::load_file(&path).unwrap().0;
        let ws = TempDir::new("prov-ws");
        let scratch = ws.path().join("scratch");
        let trail = pd.path().join("trail.jsonl");
        let job = Job {
            exe: std::path::Path::new(STOCKADE),
            policy: path.to_str().unwrap(),
            provision: &policy.provision,
            workspace: &ws.path().join("w"),
            scratch: &scratch,
            trail: &trail,
        };
        std::fs::create_dir_all(ws.path().join("w")).unwrap();
        // As the worker makes a session's workspace: owned by the jail user's first host ids.
        std::os::unix::fs::chown(ws.path().join("w"), Some(101_000), Some(101_000)).unwrap();
        let r = rt.block_on(provision::run(&job, &Plan::Git { url: url.clone(), git_ref: Some("main".into()) }));
        assert!(!scratch.exists(), "the credentials' copy is removed");
        let readme = std::fs::read_to_string(ws.path().join("w/README")).ok();
        (r, readme, std::fs::read_to_string(&trail).unwrap_or_default(), pd, ws)
    };
    let (r, readme, trail, _pd, _ws) = attempt(&format!("\"{server}/32:9418\""));
    assert_eq!(r, Ok(()));
    assert_eq!(readme.as_deref(), Some("from the repository\n"));
    assert!(trail.contains("\"argv\":[\"git\",\"fetch\""), "{trail}");
    // Without the allowlist entry the clone cannot connect.
    let (r, readme, _, _pd, _ws) = attempt("");
    let e = r.unwrap_err().0;
    assert!(e.starts_with("workspace provisioning failed"), "{e}");
    assert_eq!(readme, None);
    drop(daemon);
    assert!(
        !std::fs::read_dir("/proc").unwrap().flatten().any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(
            |c| String::from_utf8_lossy(&c).contains(&format!("--base-path={}", d.path().join("srv").display()))
        )),
        "the git daemon outlived its test"
    );
}

/// A child started in a process group of its own, killed with its whole group when dropped.
struct GroupGuard(Child);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
        // Its children are reaped by init; wait until they are gone from /proc.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5)
            && nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0.id() as i32), None).is_ok()
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
