//! The generated /etc: only what programs need to know about the jail, never the host's /etc.

use crate::policy::{NetMode, Policy};

/// (file name under /etc, contents)
pub(crate) fn generated_files(policy: &Policy, resolver: Option<std::net::Ipv4Addr>) -> Vec<(&'static str, String)> {
    let u = &policy.user;
    let h = &policy.hostname;
    let resolv = match policy.network.mode {
        // No resolver is reachable in these modes; an empty file makes lookups fail fast
        // instead of timing out against a nameserver that cannot answer.
        NetMode::None | NetMode::Loopback => "# no DNS in network mode none/loopback\n".to_owned(),
        // Stockade's resolver on the host end of the session's link.
        NetMode::Veth => match resolver {
            Some(r) => format!("nameserver {r}\noptions timeout:2 attempts:2\n"),
            None => "# no resolver\n".to_owned(),
        },
    };
    vec![
        ("passwd", format!("{}:x:{}:{}:{}:/workspace:/bin/sh\n", u.name, u.uid, u.gid, u.name)),
        ("group", format!("{}:x:{}:\n", u.name, u.gid)),
        ("hostname", format!("{h}\n")),
        ("hosts", format!("127.0.0.1\tlocalhost {h}\n::1\tlocalhost ip6-localhost ip6-loopback\n")),
        ("resolv.conf", resolv),
        ("nsswitch.conf", "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n".to_owned()),
    ]
}
