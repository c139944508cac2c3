//! Session networks (`network.mode = "veth"`): a veth pair per jail, addresses from a pool,
//! egress filtered by nftables, DNS answered by Stockade's own resolver.

pub mod rtnl;

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
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
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
