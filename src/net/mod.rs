//! Session networks (`network.mode = "veth"`): a veth pair per jail, addresses from a pool,
//! egress filtered by nftables, DNS answered by Stockade's own resolver.
//!
//! Order of events: `Plan::reserve` picks a free /30 before the jail is cloned (so the jail
//! knows its addresses); `SessionNet::create` builds the host side once the jail's network
//! namespace exists; the jail configures its end (`jail::netif`); dropping the `SessionNet`
//! removes everything. Leftovers of a crashed Stockade (an unlocked slot) are removed by the next
//! `reserve`.

pub mod dns;
pub(crate) mod netlink;
pub(crate) mod nflog;
pub mod nfnl;
pub mod nft;
pub mod rtnl;

pub use netlink::NetError;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::policy::rules::{Egress, Net4};
use crate::policy::Network;

/// Host-side interface names: `stk<slot>`.
pub const HOST_PREFIX: &str = "stk";
/// Slot locks: one file per /30 in use, flock'ed by its Stockade for the session's life.
pub const RUN_DIR: &str = "/run/stockade/net";

fn slot_ids(slot: u32) -> (String, String) {
    (format!("{HOST_PREFIX}{slot}"), format!("s{slot}"))
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Ends a session's threads at once: they wait on their socket and on this pipe together.
pub struct Stop {
    r: OwnedFd,
    w: OwnedFd,
}

impl Stop {
    pub fn new() -> std::io::Result<Stop> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Stop { r, w })
    }

    pub fn signal(&self) {
        let _ = nix::unistd::write(&self.w, b"x");
    }

    /// Waits until `fd` is readable (true) or the stop is signalled (false).
    pub fn wait(&self, fd: BorrowedFd<'_>) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN), PollFd::new(self.r.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
                Ok(_) => {
                    if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                        return false;
                    }
                    return true;
                }
            }
        }
    }
}

/// A reserved /30: `.1` on the host side, `.2` in the jail.
#[derive(Debug)]
pub struct Plan {
    pub slot: u32,
    pub pool: Net4,
    pub host_ip: Ipv4Addr,
    pub jail_ip: Ipv4Addr,
    pub host_if: String,
    pub id: String,
    _lock: File,
}

fn remove_leftovers(slot: u32, pool: Option<Net4>) {
    let (host_if, id) = slot_ids(slot);
    let jail_ip = pool.map(|p| Ipv4Addr::from(u32::from(p.network()) + slot * 4 + 2));
    nft::remove_session(&id, &host_if, jail_ip);
    if let Ok(mut r) = rtnl::Rtnl::open() {
        let _ = r.del_link(&host_if);
    }
}

impl Plan {
    pub fn reserve(pool: Net4) -> Result<Plan, NetError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(NetError::Invalid(
                "network.mode \"veth\" needs root (links and nftables in the host's namespace)".into(),
            ));
        }
        std::fs::create_dir_all(RUN_DIR).map_err(|e| NetError::sys(RUN_DIR, e))?;
        let base_lock =
            File::create(format!("{RUN_DIR}/.lock")).map_err(|e| NetError::sys(format!("{RUN_DIR}/.lock"), e))?;
        // SAFETY: flock on a descriptor we own; blocks until other Stockades are done choosing.
        unsafe { libc::flock(base_lock.as_raw_fd(), libc::LOCK_EX) };
        // Slots whose owner is gone: remove what it left.
        let mut stale = Vec::new();
        if let Ok(rd) = std::fs::read_dir(RUN_DIR) {
            for e in rd.flatten() {
                let Some(slot) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                if let Ok(f) = File::open(e.path()) {
                    if try_lock(&f) {
                        stale.push(slot);
                    }
                }
            }
        }
        for slot in &stale {
            tracing::info!(slot, "removing the network of a crashed session");
            remove_leftovers(*slot, Some(pool));
            let _ = std::fs::remove_file(format!("{RUN_DIR}/{slot}"));
        }
        let slots = (pool.size() / 4) as u32;
        // A random first choice: the slot a session just gave back still has its veth pair while
        // the kernel tears the old namespace down, and taking it again would mean a synchronous
        // delete (tens of milliseconds of RCU waits) before the new pair can be made.
        let mut r = [0u8; 4];
        // SAFETY: getrandom writes at most `r.len()` bytes into `r`.
        unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
        let start = (u32::from_ne_bytes(r) ^ std::process::id().wrapping_mul(7919)) % slots;
        for k in 0..slots {
            let slot = (start + k) % slots;
            let path = format!("{RUN_DIR}/{slot}");
            let Ok(f) = std::fs::OpenOptions::new().write(true).create_new(true).open(&path) else { continue };
            if !try_lock(&f) {
                continue;
            }
            // Chains whose slot file is gone entirely (not merely unlocked) are leftovers too.
            for chain in nft::ensure_base(HOST_PREFIX)? {
                let Ok(n) = chain[1..].parse::<u32>() else { continue };
                if n != slot && !std::path::Path::new(&format!("{RUN_DIR}/{n}")).exists() {
                    tracing::info!(chain, "removing a leftover session chain");
                    remove_leftovers(n, Some(pool));
                }
            }
            let base = u32::from(pool.network()) + slot * 4;
            let (host_if, id) = slot_ids(slot);
            return Ok(Plan {
                slot,
                pool,
                host_ip: Ipv4Addr::from(base + 1),
                jail_ip: Ipv4Addr::from(base + 2),
                host_if,
                id,
                _lock: f,
            });
        }
        Err(NetError::Invalid(format!("network.pool {pool}: every /30 is in use")))
    }
}

/// Longest-prefix match in the main IPv4 routing table: the interface traffic to `dst` leaves by.
fn route_iface(dst: Ipv4Addr) -> Option<String> {
    let t = std::fs::read_to_string("/proc/net/route").ok()?;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::from_be).map(Ipv4Addr::from);
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, mask) = (hex(f.get(1)?)?, hex(f.get(7)?)?);
            (u32::from(dst) & u32::from(mask) == u32::from(dest))
                .then(|| (u32::from(mask).count_ones(), f[0].to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, i)| i)
}

/// IPv6 off on the host end of a session's veth, before it goes up: the policy has no IPv6
/// rules, so the host end gets no address (not even link-local) and drops every IPv6 packet that
/// arrives on it, neighbour discovery included. The jail end gets no address either
/// (`Rtnl::no_ipv6_addresses`: its /proc/sys is read-only by then), so a jail's IPv6 connection
/// fails at once. A kernel without IPv6 has nothing to turn off.
pub(crate) fn disable_ipv6(iface: &str) -> Result<(), NetError> {
    let p = format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6");
    match std::fs::write(&p, "1") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !std::path::Path::new("/proc/sys/net/ipv6").exists() => {
            Ok(())
        }
        r => r.map_err(|e| NetError::sys(p, e)),
    }
}

fn enable_forwarding(iface: &str) -> Result<(), NetError> {
    let p = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    std::fs::write(&p, "1").map_err(|e| NetError::sys(p, e))
}

/// A veth policy's resolved egress (every veth policy has one: the parser makes it).
pub fn egress_of(net: &Network) -> Result<&Egress, NetError> {
    net.egress.as_ref().ok_or_else(|| NetError::Invalid("network.mode is not \"veth\"".into()))
}

/// Told of each logged connection attempt: (allowed, protocol, destination, port).
pub(crate) type EgressHook = Arc<dyn Fn(bool, &str, Ipv4Addr, Option<u16>) + Send + Sync>;

/// The host side of one session's network; removed on drop.
pub struct SessionNet {
    pub plan: Plan,
    stop: Arc<Stop>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub dns_stats: Arc<dns::DnsStats>,
    pub conn_stats: Arc<nflog::ConnStats>,
    /// The jail (and so its network namespace) is gone: the kernel removes the veth pair with
    /// the namespace, asynchronously, sparing the synchronous delete and its RCU waits.
    jail_gone: bool,
}

impl SessionNet {
    /// Builds the host side once the jail (pid `child`) has its network namespace.
    pub fn create(plan: Plan, child: i32, net: &Network, egress: Option<EgressHook>) -> Result<SessionNet, NetError> {
        let Egress { allow, domains: patterns, upstream, .. } = egress_of(net)?;
        let upstream: Vec<SocketAddrV4> = if upstream.is_empty() { dns::host_resolvers() } else { upstream.clone() };
        let (allow, patterns) = (allow.clone(), patterns.clone());
        let mut session = SessionNet {
            plan,
            stop: Arc::new(Stop::new().map_err(|e| NetError::sys("pipe", e))?),
            threads: Vec::new(),
            dns_stats: Arc::default(),
            conn_stats: Arc::default(),
            jail_gone: false,
        };
        let p = &session.plan;
        let mut r = rtnl::Rtnl::open()?;
        if let Err(e) = r.add_veth(&p.host_if, "eth0", child, None) {
            // The previous user of this slot ended a moment ago and the kernel has not finished
            // tearing its namespace (and so its link) down yet.
            if e.errno() != Some(libc::EEXIST) {
                return Err(e);
            }
            let _ = r.del_link(&p.host_if);
            r.add_veth(&p.host_if, "eth0", child, None)?;
        }
        disable_ipv6(&p.host_if)?;
        r.add_addr4(&p.host_if, p.host_ip, 30)?;
        r.set_up(&p.host_if)?;
        // Forwarding per interface: the session's link, and the links its destinations leave by
        // (replies come in there). Nothing host-wide is switched on.
        enable_forwarding(&p.host_if)?;
        let mut uplinks: Vec<Ipv4Addr> = allow.iter().map(|a| a.net.network()).collect();
        if !patterns.is_empty() {
            uplinks.push(Ipv4Addr::new(192, 0, 2, 1)); // whatever the default route is
        }
        for dst in uplinks {
            if let Some(i) = route_iface(dst).filter(|i| !i.starts_with(HOST_PREFIX) && i != "lo") {
                enable_forwarding(&i)?;
            }
        }
        let host_addrs: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
            .map(|it| it.filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|i| i.ip()))).collect())
            .unwrap_or_default();
        let group = nflog::group(p.slot);
        let log_sock = nflog::open(group).map_err(|e| e.about(format!("NFLOG group {group}")))?;
        {
            let (id, stats, stop) = (p.id.clone(), session.conn_stats.clone(), session.stop.clone());
            session.threads.push(
                std::thread::Builder::new()
                    .name("stockade-nflog".into())
                    .spawn(move || nflog::serve(log_sock, id, stats, stop, egress))
                    .map_err(|e| NetError::sys("connection log thread", e))?,
            );
        }
        let p = &session.plan;
        nft::add_session(&nft::SessionRules {
            id: &p.id,
            host_if: &p.host_if,
            host_ip: p.host_ip,
            jail_ip: p.jail_ip,
            pool: p.pool,
            host_addrs: &host_addrs,
            allow: &allow,
            log_group: group,
            on_deny: net.on_deny,
        })?;
        let sock = UdpSocket::bind(SocketAddrV4::new(p.host_ip, 53))
            .map_err(|e| NetError::sys(format!("resolver on {}:53", p.host_ip), e))?;
        let id = p.id.clone();
        let resolver = dns::Resolver {
            session: p.id.clone(),
            patterns,
            upstream,
            allowed_nets: allow.iter().map(|a| a.net).collect(),
            admit: Box::new(move |addrs| {
                // Replies from an admitted address come in by the link its route uses.
                for (a, _) in addrs {
                    if let Some(i) = route_iface(*a).filter(|i| !i.starts_with(HOST_PREFIX) && i != "lo") {
                        enable_forwarding(&i)?;
                    }
                }
                nft::admit(&id, addrs)
            }),
            stats: session.dns_stats.clone(),
            ttl_floor: dns::ttl_floor(),
        };
        let tcp = std::net::TcpListener::bind(SocketAddrV4::new(p.host_ip, 53))
            .map_err(|e| NetError::sys(format!("resolver on {}:53/tcp", p.host_ip), e))?;
        let resolver = Arc::new(resolver);
        let (r, stop) = (resolver.clone(), session.stop.clone());
        session.threads.push(
            std::thread::Builder::new()
                .name("stockade-dns".into())
                .spawn(move || r.serve(sock, stop))
                .map_err(|e| NetError::sys("resolver thread", e))?,
        );
        let stop = session.stop.clone();
        session.threads.push(
            std::thread::Builder::new()
                .name("stockade-dns-tcp".into())
                .spawn(move || resolver.serve_tcp(tcp, stop))
                .map_err(|e| NetError::sys("resolver thread", e))?,
        );
        Ok(session)
    }

    /// Called once the jail's processes are gone (see `jail_gone`).
    pub fn jail_ended(&mut self) {
        self.jail_gone = true;
    }

    /// Packets allowed and denied so far, by rule, and DNS answers.
    pub fn stats(&self) -> String {
        let c = nft::counters(&self.plan.id);
        let d = &self.dns_stats;
        format!(
            "connections: {} allowed, {} denied; packets by rule: {}; dns: {} allowed, {} refused, {} failed",
            self.conn_stats.allowed.load(Ordering::Relaxed),
            self.conn_stats.denied.load(Ordering::Relaxed),
            c.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
            d.allowed.load(Ordering::Relaxed),
            d.refused.load(Ordering::Relaxed),
            d.failed.load(Ordering::Relaxed)
        )
    }
}

impl Drop for SessionNet {
    fn drop(&mut self) {
        if tracing::enabled!(tracing::Level::INFO) {
            tracing::info!(session = %self.plan.id, stats = %self.stats(), "session network removed");
        }
        self.stop.signal();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let p = &self.plan;
        nft::remove_session(&p.id, &p.host_if, Some(p.jail_ip));
        if !self.jail_gone {
            if let Ok(mut r) = rtnl::Rtnl::open() {
                let _ = r.del_link(&p.host_if);
            }
        }
        let _ = std::fs::remove_file(format!("{RUN_DIR}/{}", p.slot));
    }
}

#[cfg(test)]
mod tests {
    use super::rtnl::Rtnl;
    use std::process::Command;

    #[test]
    fn a_veth_pair_reaches_into_another_namespace() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let mut child = Command::new("unshare").args(["--net", "sleep", "20"]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let host = format!("skt{}", std::process::id() % 100000);
        let mut r = Rtnl::open().unwrap();
        r.add_veth(&host, "eth0", child.id() as i32, None).unwrap();
        r.add_addr4(&host, "10.254.1.1".parse().unwrap(), 30).unwrap();
        r.set_up(&host).unwrap();
        assert!(r.links().unwrap().contains(&host));
        let e = r.add_veth(&host, "eth0", child.id() as i32, None).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EEXIST));
        let l = std::net::TcpListener::bind("10.254.1.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ns = format!("/proc/{}/ns/net", child.id());
        let inside = Command::new("nsenter")
            .args(["--net=".to_owned() + &ns, "sh".into(), "-c".into(),
                format!("ip addr add 10.254.1.2/30 dev eth0 && ip link set eth0 up && bash -c 'exec 3<>/dev/tcp/10.254.1.1/{port}' && echo ok")])
            .output()
            .unwrap();
        r.del_link(&host).unwrap();
        assert!(!r.links().unwrap().contains(&host));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(String::from_utf8_lossy(&inside.stdout), "ok\n", "{inside:?}");
    }
}
