//! Probes beyond single syscalls: filesystem, privileges, processes, IPC, network and resources.
//! Each tries the forbidden thing for real inside the jail and returns `Escaped(evidence)` when
//! it worked. Targets outside the jail (a host process, socket, queue, listener, planted
//! variable) are set up by the harness and named in `Ctx`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use super::{Ctx, Outcome};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn en(e: i32) -> String {
    super::errno_name(e)
}

fn blocked(why: impl Into<String>) -> Outcome {
    Outcome::Blocked(why.into())
}

fn escaped(why: impl Into<String>) -> Outcome {
    Outcome::Escaped(why.into())
}

/// (id, category, what it tries)
pub const PROBES: &[(&str, &str, &str)] = &[
    ("fs-write-usr", "filesystem", "create a file under /usr"),
    ("fs-write-root", "filesystem", "create a file in /"),
    ("fs-write-etc", "filesystem", "create a file in /etc"),
    ("fs-read-shadow", "filesystem", "read /etc/shadow"),
    ("fs-host-homes", "filesystem", "list /root and /home"),
    ("fs-runtime-sockets", "filesystem", "find docker/containerd/systemd sockets"),
    ("fs-proc-sys-write", "filesystem", "write /proc/sys/kernel/core_pattern"),
    ("fs-sysrq", "filesystem", "write /proc/sysrq-trigger"),
    ("fs-kcore", "filesystem", "read /proc/kcore"),
    ("fs-sys-write", "filesystem", "write under /sys"),
    ("fs-proc-self-exe", "filesystem", "open /proc/self/exe for writing (CVE-2019-5736)"),
    ("fs-proc1-root", "filesystem", "reach host files through /proc/1/root"),
    ("fs-dev-nodes", "filesystem", "find block, memory or kmsg devices in /dev"),
    ("fs-symlink-shadow", "filesystem", "read /etc/shadow through a workspace symlink"),
    ("fs-setid-bits", "filesystem", "leave a setuid or setgid file or directory behind"),
    ("priv-capabilities", "privileges", "hold any capability in any set"),
    ("priv-no-new-privs", "privileges", "run without no_new_privs"),
    ("priv-setuid-root", "privileges", "setuid(0)"),
    ("priv-host-root-mapping", "privileges", "be mapped to host uid 0"),
    ("proc-pid-view", "processes", "see processes outside the jail"),
    ("proc-signal-host", "processes", "signal a host process"),
    ("proc-signal-init", "processes", "signal the jail's init"),
    ("proc-leaked-fds", "processes", "inherit descriptors beyond stdio"),
    ("proc-env-secret", "processes", "find a secret planted in Stockade's environment"),
    ("proc-host-cmdline", "processes", "read the host's command line (paths, flags) in /proc/*/cmdline"),
    ("proc-controlling-tty", "processes", "open the caller's terminal through /dev/tty and take its foreground"),
    ("ipc-abstract-socket", "ipc", "connect to a host abstract unix socket"),
    ("ipc-sysv-queue", "ipc", "open a host SysV message queue"),
    ("ipc-shm-host", "ipc", "see the host's /dev/shm"),
    ("net-route-out", "network", "reach an address no rule allows (TEST-NET-1)"),
    ("net-metadata", "network", "reach the cloud metadata service (169.254.169.254)"),
    ("net-host-listener", "network", "connect to a listener on the host's loopback"),
    ("res-fsize", "resources", "write past RLIMIT_FSIZE"),
    ("res-tmp-fill", "resources", "fill /tmp beyond its size"),
    ("res-workspace-fill", "resources", "fill the (scratch) workspace beyond its size"),
    ("res-memory-hog", "resources", "allocate beyond the memory limit"),
    ("res-fork-bomb", "resources", "fork without bound"),
];

fn create(path: &str) -> Outcome {
    let c = CString::new(path).expect("no NUL");
    // SAFETY: open with a valid C string; the returned fd is closed at once.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_EXCL, 0o644) };
    if fd >= 0 {
        // SAFETY: closing the fd just opened; unlink of the same valid path.
        unsafe {
            libc::close(fd);
            libc::unlink(c.as_ptr());
        }
        escaped(format!("created {path}"))
    } else {
        blocked(format!("{path}: {}", en(errno())))
    }
}

fn read_file(path: &str) -> Outcome {
    match std::fs::File::open(path).and_then(|mut f| {
        let mut b = [0u8; 64];
        f.read(&mut b)
    }) {
        Ok(n) => escaped(format!("read {n} bytes of {path}")),
        Err(e) => blocked(format!("{path}: {}", en(e.raw_os_error().unwrap_or(0)))),
    }
}

fn write_file(path: &str, data: &[u8]) -> Outcome {
    match std::fs::OpenOptions::new().write(true).open(path).and_then(|mut f| f.write_all(data)) {
        Ok(()) => escaped(format!("wrote {path}")),
        Err(e) => blocked(format!("{path}: {}", en(e.raw_os_error().unwrap_or(0)))),
    }
}

fn status_field(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

pub fn run(id: &str, ctx: &Ctx) -> Option<Outcome> {
    Some(match id {
        "fs-write-usr" => create("/usr/stockade-probe"),
        "fs-write-root" => create("/stockade-probe"),
        "fs-write-etc" => create("/etc/stockade-probe"),
        "fs-read-shadow" => read_file("/etc/shadow"),
        "fs-host-homes" => {
            let seen: Vec<String> = ["/root", "/home"]
                .iter()
                .filter_map(|d| std::fs::read_dir(d).ok().map(|r| (d, r.count())))
                .filter(|(_, n)| *n > 0)
                .map(|(d, n)| format!("{d} has {n} entries"))
                .collect();
            if seen.is_empty() {
                blocked("/root and /home absent or empty")
            } else {
                escaped(seen.join("; "))
            }
        }
        "fs-runtime-sockets" => {
            let found: Vec<&str> = [
                "/var/run/docker.sock",
                "/run/docker.sock",
                "/run/containerd/containerd.sock",
                "/run/systemd/private",
                "/run/dbus/system_bus_socket",
            ]
            .into_iter()
            .filter(|p| std::path::Path::new(p).exists())
            .collect();
            if found.is_empty() {
                blocked("no runtime socket in the jail")
            } else {
                escaped(format!("present: {}", found.join(", ")))
            }
        }
        "fs-proc-sys-write" => write_file("/proc/sys/kernel/core_pattern", b"|/tmp/x"),
        "fs-sysrq" => write_file("/proc/sysrq-trigger", b"h"),
        "fs-kcore" => read_file("/proc/kcore"),
        "fs-sys-write" => write_file("/sys/kernel/uevent_helper", b"/tmp/x"),
        "fs-proc-self-exe" => match std::fs::OpenOptions::new().write(true).open("/proc/self/exe") {
            Ok(_) => escaped("/proc/self/exe opened for writing"),
            Err(e) => blocked(format!("/proc/self/exe: {}", en(e.raw_os_error().unwrap_or(0)))),
        },
        "fs-proc1-root" => {
            // The jail's init sees the jail's root; a host file must not be reachable through it.
            let host_only = ["/proc/1/root/etc/shadow", "/proc/1/root/root", "/proc/1/root/proc/1/root/etc/shadow"];
            match host_only.iter().find(|p| std::fs::metadata(p).is_ok()) {
                Some(p) => escaped(format!("{p} exists")),
                None => blocked("/proc/1/root holds only the jail's tree"),
            }
        }
        "fs-dev-nodes" => {
            use std::os::unix::fs::FileTypeExt;
            let allowed = ["null", "zero", "full", "random", "urandom", "tty", "ptmx"];
            let mut bad = Vec::new();
            if let Ok(rd) = std::fs::read_dir("/dev") {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Ok(t) = e.file_type() {
                        if t.is_block_device() || (t.is_char_device() && !allowed.contains(&name.as_str())) {
                            bad.push(name);
                        }
                    }
                }
            }
            if bad.is_empty() {
                blocked("only null, zero, full, random, urandom, tty, ptmx")
            } else {
                escaped(format!("device nodes: {}", bad.join(", ")))
            }
        }
        "proc-controlling-tty" => controlling_tty(),
        "proc-host-cmdline" => host_cmdline(),
        "fs-setid-bits" => setid_bits(),
        "fs-symlink-shadow" => {
            let link = "/tmp/stockade-probe-link";
            let _ = std::fs::remove_file(link);
            if let Err(e) = std::os::unix::fs::symlink("/etc/shadow", link) {
                return Some(blocked(format!("symlink: {e}")));
            }
            let r = read_file(link);
            let _ = std::fs::remove_file(link);
            r
        }
        "priv-capabilities" => {
            let sets: Vec<String> = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
                .iter()
                .map(|f| (f, status_field(f)))
                .filter(|(_, v)| !v.trim_start_matches('0').is_empty())
                .map(|(f, v)| format!("{f} {v}"))
                .collect();
            if sets.is_empty() {
                blocked("all five capability sets are empty")
            } else {
                escaped(sets.join(", "))
            }
        }
        "priv-no-new-privs" => match status_field("NoNewPrivs:").as_str() {
            "1" => blocked("NoNewPrivs: 1"),
            v => escaped(format!("NoNewPrivs: {v}")),
        },
        "priv-setuid-root" => {
            // SAFETY: setuid takes an integer; on success the probe child simply has uid 0 in
            // the jail's user namespace, which is what it reports.
            if unsafe { libc::setuid(0) } == 0
                && nix::unistd::getuid().is_root()
                && status_field("CapEff:") != "0000000000000000"
            {
                escaped("setuid(0) gave capabilities")
            } else {
                blocked(format!("uid {}, no capabilities", nix::unistd::getuid()))
            }
        }
        "priv-host-root-mapping" => {
            let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
            let to_root = map.lines().any(|l| l.split_whitespace().nth(1) == Some("0"));
            if to_root {
                escaped(format!("uid_map maps onto host uid 0: {}", map.trim()))
            } else {
                blocked(format!("uid_map: {}", map.split_whitespace().collect::<Vec<_>>().join(" ")))
            }
        }
        "proc-pid-view" => {
            let pids: Vec<u32> = std::fs::read_dir("/proc")
                .map(|r| r.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
                .unwrap_or_default();
            let visible_host = pids.contains(&ctx.host_pid) && ctx.host_pid > 64;
            if visible_host || pids.len() > 64 {
                escaped(format!("{} processes visible", pids.len()))
            } else {
                blocked(format!("{} processes visible, all the jail's", pids.len()))
            }
        }
        "proc-signal-host" => {
            // SAFETY: kill with signal 0 only checks existence and permission.
            if unsafe { libc::kill(ctx.host_pid as i32, 0) } == 0 && ctx.host_pid > 64 {
                // Pid numbers are per namespace: confirm it is the harness, not a jail process.
                let cmd = std::fs::read_to_string(format!("/proc/{}/cmdline", ctx.host_pid)).unwrap_or_default();
                if cmd.contains("probe") && !cmd.contains("__probe") {
                    return Some(escaped(format!("host pid {} signalable", ctx.host_pid)));
                }
            }
            blocked(format!("host pid {}: {}", ctx.host_pid, en(errno())))
        }
        "proc-signal-init" => {
            // SAFETY: ptrace attach of pid 1 fails or succeeds; on success we detach at once.
            let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
            if r == 0 {
                // SAFETY: undo the attach that just succeeded.
                unsafe { libc::ptrace(libc::PTRACE_DETACH, 1, 0, 0) };
                escaped("ptrace-attached the jail's init")
            } else {
                blocked(format!("ptrace(ATTACH, 1): {}", en(errno())))
            }
        }
        "proc-leaked-fds" => {
            let extra: Vec<i32> = ctx.startup_fds.iter().copied().filter(|fd| *fd > 2).collect();
            if extra.is_empty() {
                blocked("only 0, 1, 2 at start")
            } else {
                let targets: Vec<String> = extra
                    .iter()
                    .map(|fd| {
                        format!(
                            "{fd} -> {}",
                            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                                .map(|p| p.display().to_string())
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                escaped(format!("inherited: {}", targets.join(", ")))
            }
        }
        "proc-env-secret" => {
            let needle = format!("{}=", ctx.planted_env);
            let mut hits = Vec::new();
            if std::env::vars().any(|(k, _)| k == ctx.planted_env) {
                hits.push("own environment".to_owned());
            }
            if let Ok(rd) = std::fs::read_dir("/proc") {
                for e in rd.flatten() {
                    if let Ok(b) = std::fs::read(e.path().join("environ")) {
                        if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                            hits.push(format!("/proc/{}/environ", e.file_name().to_string_lossy()));
                        }
                    }
                }
            }
            if hits.is_empty() {
                blocked("absent from every visible environment")
            } else {
                escaped(format!("found in {}", hits.join(", ")))
            }
        }
        "ipc-abstract-socket" => {
            use std::os::linux::net::SocketAddrExt;
            let addr = match std::os::unix::net::SocketAddr::from_abstract_name(ctx.abstract_name.as_bytes()) {
                Ok(a) => a,
                Err(e) => return Some(Outcome::Error(e.to_string())),
            };
            match std::os::unix::net::UnixStream::connect_addr(&addr) {
                Ok(_) => escaped(format!("connected to @{}", ctx.abstract_name)),
                Err(e) => blocked(format!("@{}: {}", ctx.abstract_name, en(e.raw_os_error().unwrap_or(0)))),
            }
        }
        "ipc-sysv-queue" => {
            // SAFETY: msgget with an integer key and no creation flag only looks the queue up.
            let id = unsafe { libc::msgget(ctx.sysv_key, 0) };
            if id >= 0 {
                escaped(format!("host queue key {:#x} is id {id}", ctx.sysv_key))
            } else {
                blocked(format!("key {:#x}: {}", ctx.sysv_key, en(errno())))
            }
        }
        "ipc-shm-host" => {
            let p = format!("/dev/shm/{}", ctx.shm_name);
            if std::path::Path::new(&p).exists() {
                escaped(format!("{p} visible"))
            } else {
                blocked(format!("{p} absent: /dev/shm is private"))
            }
        }
        "net-route-out" => {
            if ctx.network == "veth" {
                // A route exists; the filter must drop what no rule allows.
                tcp_probe(std::net::SocketAddr::from(([192, 0, 2, 1], 80)))
            } else {
                // A connected UDP socket needs a route but sends nothing.
                let s = match std::net::UdpSocket::bind("0.0.0.0:0") {
                    Ok(s) => s,
                    Err(e) => return Some(blocked(format!("socket: {e}"))),
                };
                match s.connect("192.0.2.1:9") {
                    Ok(()) => escaped("a route to 192.0.2.1 (TEST-NET-1) exists"),
                    Err(e) => blocked(format!("192.0.2.1: {}", en(e.raw_os_error().unwrap_or(0)))),
                }
            }
        }
        "net-metadata" => tcp_probe(std::net::SocketAddr::from(([169, 254, 169, 254], 80))),
        "net-host-listener" => {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], ctx.listener_port));
            match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
                Ok(_) => escaped(format!("connected to the host's {addr}")),
                Err(e) => blocked(format!("{addr}: {}", e.raw_os_error().map(en).unwrap_or_else(|| e.to_string()))),
            }
        }
        "res-fsize" => {
            let Some(limit) = ctx.fsize else { return Some(escaped("no RLIMIT_FSIZE in the policy")) };
            // SAFETY: ignoring SIGXFSZ so the write reports EFBIG instead of killing the probe.
            unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
            let p = "/tmp/stockade-probe-fsize";
            let r = std::fs::File::create(p).and_then(|f| std::os::unix::fs::FileExt::write_at(&f, b"x", limit));
            let _ = std::fs::remove_file(p);
            match r {
                Ok(_) => escaped(format!("wrote at offset {limit}")),
                Err(e) => blocked(format!("write at offset {limit}: {}", en(e.raw_os_error().unwrap_or(0)))),
            }
        }
        "res-tmp-fill" => fill("/tmp/stockade-probe-fill", ctx.tmp_size),
        "res-workspace-fill" => fill("/workspace/.stockade-probe-fill", ctx.tmp_size),
        "res-memory-hog" => memory_hog(ctx.memory_limit),
        "res-fork-bomb" => fork_bomb(),
        _ => return None,
    })
}

/// Writes until the filesystem refuses; escaped when more than `limit` (+ slack) fit.
fn fill(path: &str, limit: u64) -> Outcome {
    let cap = limit + (64 << 20);
    let mut f = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return blocked(format!("{path}: {e}")),
    };
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    let r = loop {
        if written >= cap {
            break escaped(format!("wrote {} MiB, beyond the {} MiB limit", written >> 20, limit >> 20));
        }
        if let Err(e) = f.write_all(&chunk) {
            break blocked(format!("stopped after {} MiB: {}", written >> 20, en(e.raw_os_error().unwrap_or(0))));
        }
        written += chunk.len() as u64;
    };
    drop(f);
    let _ = std::fs::remove_file(path);
    r
}

/// Touches memory until the jail's memory limit stops it (ENOMEM, or the OOM killer, which the
/// runner sees as SIGKILL). Without a limit it stops at 512 MiB and reports the escape rather
/// than exhaust the host.
fn memory_hog(limit: Option<u64>) -> Outcome {
    let cap = limit.map(|l| l + (256 << 20)).unwrap_or(512 << 20);
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut total = 0u64;
    while total < cap {
        let mut v: Vec<u8> = Vec::new();
        if v.try_reserve_exact(16 << 20).is_err() {
            return blocked(format!("allocation failed after {} MiB", total >> 20));
        }
        v.resize(16 << 20, 1);
        total += 16 << 20;
        blocks.push(v);
    }
    match limit {
        Some(l) => escaped(format!("touched {} MiB with a {} MiB limit", total >> 20, l >> 20)),
        None => escaped(format!("touched {} MiB: no memory limit", total >> 20)),
    }
}

/// Forks children that sleep `secs` and exit, until fork fails (`Err((forked, errno))`) or
/// `max` succeed (`Ok(max)`).
pub fn fork_children(max: usize, secs: u32) -> Result<usize, (usize, i32)> {
    for n in 0..max {
        // SAFETY: probes run single-threaded; the children only sleep and exit.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: async-signal-safe calls only, in the forked child.
                unsafe {
                    libc::sleep(secs);
                    libc::_exit(0)
                }
            }
            r if r < 0 => return Err((n, errno())),
            _ => {}
        }
    }
    Ok(max)
}

/// Escaped when 2000 forks succeed.
fn fork_bomb() -> Outcome {
    match fork_children(2000, 2) {
        Ok(n) => escaped(format!("{n} children forked")),
        Err((n, e)) => blocked(format!("fork failed after {n} children: {}", en(e))),
    }
}

fn tcp_probe(addr: std::net::SocketAddr) -> Outcome {
    match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
        Ok(_) => escaped(format!("connected to {addr}")),
        Err(e) => blocked(format!("{addr}: {}", e.raw_os_error().map(en).unwrap_or_else(|| e.kind().to_string()))),
    }
}

/// A jailed process must have no controlling terminal: with one it could make itself the
/// terminal's foreground group and read what the operator types.
fn controlling_tty() -> Outcome {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty") {
        Ok(tty) => {
            // SAFETY: tcgetpgrp/tcsetpgrp take a descriptor we own and a pid value.
            let taken = unsafe { libc::tcsetpgrp(tty.as_raw_fd(), libc::getpgrp()) } == 0;
            escaped(format!("/dev/tty opened{}", if taken { " and its foreground taken" } else { "" }))
        }
        Err(e) => blocked(format!("/dev/tty: {}", en(e.raw_os_error().unwrap_or(0)))),
    }
}

/// Files a jail leaves on a host-backed mount outlive it: none may carry a setuid or setgid bit,
/// however it is asked for.
fn setid_bits() -> Outcome {
    let dir = "/tmp/stockade-probe-setid";
    let _ = std::fs::remove_dir_all(dir);
    if std::fs::create_dir(dir).is_err() {
        return Outcome::Error("cannot make a scratch directory in /tmp".into());
    }
    let path = |n: &str| CString::new(format!("{dir}/{n}")).expect("no NUL");
    let plain = path("plain");
    let mut got = Vec::new();
    // SAFETY: for the calls below, plain system calls on NUL-terminated paths that live to the end.
    unsafe {
        let fd = libc::open(plain.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
        if fd < 0 {
            return Outcome::Error(format!("create a plain file: {}", en(errno())));
        }
        let mut attempt = |what: &str, r: libc::c_long| got.push((what.to_owned(), if r < 0 { errno() } else { 0 }));
        attempt("chmod 4755", libc::chmod(plain.as_ptr(), 0o4755) as libc::c_long);
        attempt("fchmod 2755", libc::fchmod(fd, 0o2755) as libc::c_long);
        attempt("fchmodat 6755", libc::fchmodat(libc::AT_FDCWD, plain.as_ptr(), 0o6755, 0) as libc::c_long);
        let created = path("created");
        let f2 = libc::open(created.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o4755);
        attempt("open O_CREAT 4755", f2 as libc::c_long);
        let d = path("dir");
        attempt("mkdir 2755", libc::mkdir(d.as_ptr(), 0o2755) as libc::c_long);
        let n = path("node");
        attempt("mknod fifo 4644", libc::mknod(n.as_ptr(), libc::S_IFIFO | 0o4644, 0) as libc::c_long);
        libc::close(fd);
        if f2 >= 0 {
            libc::close(f2);
        }
    }
    use std::os::unix::fs::PermissionsExt;
    let marked: Vec<String> = ["plain", "created", "dir", "node"]
        .iter()
        .filter_map(|n| {
            let m = std::fs::metadata(format!("{dir}/{n}")).ok()?.permissions().mode();
            (m & 0o6000 != 0).then(|| format!("{n} mode {m:o}"))
        })
        .collect();
    let _ = std::fs::remove_dir_all(dir);
    let refused = got.iter().all(|(_, e)| *e == libc::EPERM);
    match (marked.is_empty(), refused) {
        (true, true) => {
            blocked(format!("{}: EPERM", got.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join(", ")))
        }
        (true, false) => escaped(format!(
            "reached the kernel past the filter: {}",
            got.iter()
                .filter(|(_, e)| *e != libc::EPERM)
                .map(|(w, e)| format!("{w} ({})", en(*e)))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (false, _) => escaped(format!("setid bits set: {}", marked.join(", "))),
    }
}

/// The jail's init is a copy of the host-side supervisor: its command line must not be the
/// supervisor's (binary path, policy file, workspace), nor may any other process show one.
fn host_cmdline() -> Outcome {
    let mut seen = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            let line = line.trim();
            // The probe's own command (`stockade __probe ...`) is the jail's, not the host's.
            let host = ["--policy", "--workspace", "--outputs", "--announce", "/target/", "policies/"];
            if !line.contains("__probe") && host.iter().any(|h| line.contains(h)) {
                seen.push(format!("{pid}: {line}"));
            }
        }
    }
    let init = std::fs::read("/proc/1/cmdline").unwrap_or_default();
    let init = String::from_utf8_lossy(&init).trim_end_matches('\0').to_owned();
    match (seen.is_empty(), init.as_str()) {
        (true, "stockade-init") => blocked("PID 1 shows `stockade-init`; no host command line visible"),
        (true, other) => escaped(format!("PID 1's command line: {other:?}")),
        (false, _) => escaped(seen.join("; ")),
    }
}
