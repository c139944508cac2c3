//! Session network set-up + tear-down (slot, veth, addresses, forwarding, nft chain/sets,
//! resolver) as Stockade does it, against the same steps done with `ip` and `nft` processes, in
//! one run; then TCP throughput jail -> a test host through the veth, against loopback.
//!
//! `cargo bench --bench network` (root, nftables and iproute2 installed).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stockade::net::{rtnl::Rtnl, Plan, SessionNet};
use stockade::policy::load_builtin;

const STOCKADE: &str = env!("CARGO_BIN_EXE_stockade");

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn sh(cmd: &str) {
    let ok = Command::new("sh").args(["-c", cmd]).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
    assert!(ok.success(), "{cmd}");
}

fn main() {
    let n = 200;
    let (mut policy, _) = load_builtin("default").unwrap();
    policy.network.mode = stockade::policy::NetMode::Veth;
    policy.network.allow = vec!["198.51.100.0/24:443".into()];
    policy.network.allow_domains = vec!["example.org".into()];
    policy.network.upstream_dns = vec!["198.51.100.53".into()];
    // Per session, a fresh namespace stands in for the jail's. As when a jail ends, the
    // namespace is gone before the tear-down, and the kernel removes the veth pair with it; the
    // namespace's own start and end are not timed.
    let jail = || {
        let c = Command::new("unshare").args(["--net", "sleep", "30"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(15));
        c
    };
    let end = |mut c: std::process::Child| {
        let _ = c.kill();
        let _ = c.wait();
    };
    let (mut ours, mut setup) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let j = jail();
        let t = Instant::now();
        let plan = Plan::reserve(stockade::net::egress_of(&policy.network).unwrap().pool).unwrap();
        let mut net = SessionNet::create(plan, j.id() as i32, &policy.network, None).unwrap();
        let up = t.elapsed();
        end(j);
        let t2 = Instant::now();
        net.jail_ended();
        drop(net);
        ours.push((up + t2.elapsed()).as_secs_f64() * 1000.0);
        setup.push(up.as_secs_f64() * 1000.0);
    }

    // The same objects through iproute2 and nft processes.
    let mut procs = Vec::new();
    for i in 0..n {
        let j = jail();
        let pid = j.id();
        let t = Instant::now();
        let (h, id) = (format!("stkb{i}"), format!("s9{i:04}"));
        sh(&format!(
            "ip link add {h} type veth peer name eth0 netns {pid} && ip addr add 10.198.0.1/30 dev {h} && ip link set {h} up \
             && echo 1 > /proc/sys/net/ipv4/conf/{h}/forwarding"
        ));
        let script = format!(
            "add set inet stockade {id}_dns {{ type ipv4_addr; flags timeout; }}\nadd chain inet stockade {id}\nadd chain inet stockade {id}_in\n\
             add rule inet stockade {id} ct state established,related accept\nadd rule inet stockade {id} ip daddr {{ 169.254.0.0/16, 127.0.0.0/8 }} drop\n\
             add rule inet stockade {id} ip daddr 198.51.100.0/24 tcp dport 443 accept\nadd rule inet stockade {id} ip daddr @{id}_dns accept\n\
             add rule inet stockade {id} drop\nadd element inet stockade sessions_fwd {{ \"{h}\" : jump {id} }}\n"
        );
        let mut c = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        c.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success());
        let up = t.elapsed();
        end(j);
        let t2 = Instant::now();
        sh(&format!(
            "nft delete element inet stockade sessions_fwd {{ \\\"{h}\\\" }} && nft delete chain inet stockade {id} && \
             nft delete chain inet stockade {id}_in && nft delete set inet stockade {id}_dns"
        ));
        procs.push((up + t2.elapsed()).as_secs_f64() * 1000.0);
    }
    println!("session network set-up + tear-down over {n} sessions:");
    println!(
        "  stockade (netlink, one transaction each way): p50 {:.2} ms  p99 {:.2} ms  (set-up alone p50 {:.2} ms)",
        pct(&mut ours.clone(), 0.5),
        pct(&mut ours, 0.99),
        pct(&mut setup, 0.5)
    );
    println!(
        "  ip + nft processes:                 p50 {:.2} ms  p99 {:.2} ms",
        pct(&mut procs.clone(), 0.5),
        pct(&mut procs, 0.99)
    );

    // Throughput: a listener in a test host namespace, reached from a veth jail and, for
    // comparison, over the host's loopback.
    let host = Command::new("unshare").args(["--net", "sleep", "600"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let hp = host.id();
    let mut r = Rtnl::open().unwrap();
    r.add_veth("stibench", "eth0", hp as i32, None).unwrap();
    r.add_addr4("stibench", "198.51.100.1".parse().unwrap(), 24).unwrap();
    r.set_up("stibench").unwrap();
    let sink = |listener: std::net::TcpListener| {
        std::thread::spawn(move || {
            for c in listener.incoming() {
                let mut c = c.unwrap();
                let mut buf = vec![0u8; 1 << 20];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
    };
    let remote = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/proc/{hp}/ns/net")).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut r = Rtnl::open().unwrap();
        r.add_addr4("eth0", "198.51.100.2".parse().unwrap(), 24).unwrap();
        r.set_up("eth0").unwrap();
        std::net::TcpListener::bind("198.51.100.2:5001").unwrap()
    })
    .join()
    .unwrap();
    sink(remote);
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lport = local.local_addr().unwrap().port();
    sink(local);
    let dir = std::env::temp_dir().join(format!("stockade-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("veth.toml");
    std::fs::write(&p, "extends = \"default\"\n[network]\nmode = \"veth\"\nallow = [\"198.51.100.2/32:5001\"]\n")
        .unwrap();
    let send = "import socket, sys, time\ns = socket.create_connection((sys.argv[1], int(sys.argv[2])))\nb = b'x' * (1 << 20)\nt = time.time()\nfor _ in range(512): s.sendall(b)\ns.close()\nprint(512 / (time.time() - t))";
    let out = Command::new(STOCKADE)
        .args(["run", "--policy", p.to_str().unwrap(), "--", "python3", "-c", send, "198.51.100.2", "5001"])
        .output()
        .unwrap();
    let veth: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0.0);
    let out = Command::new("python3").args(["-c", send, "127.0.0.1", &lport.to_string()]).output().unwrap();
    let lo: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0.0);
    println!("TCP throughput (512 MiB, python sendall): jail -> test host via veth + nft {veth:.0} MiB/s; host loopback {lo:.0} MiB/s");
    let _ = r.del_link("stibench");
    let _ = std::fs::remove_dir_all(&dir);
    let mut host = host;
    let _ = host.kill();
    let _ = host.wait();
}
