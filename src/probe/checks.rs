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

/// One probe of the battery: what it tries, and the attempt itself.
pub(crate) struct Probe {
    pub id: &'static str,
    pub category: &'static str,
    pub what: &'static str,
    pub run: fn(&Ctx) -> Outcome,
}

/// The probes that are not single system calls (those are `syscalls::SYSCALL_PROBES`).
pub(crate) const PROBES: &[Probe] = &[
    Probe { id: "fs-write-usr", category: "filesystem", what: "create a file under /usr", run: fs_write_usr },
    Probe { id: "fs-write-root", category: "filesystem", what: "create a file in /", run: fs_write_root },
    Probe { id: "fs-write-etc", category: "filesystem", what: "create a file in /etc", run: fs_write_etc },
    Probe { id: "fs-read-shadow", category: "filesystem", what: "read /etc/shadow", run: fs_read_shadow },
    Probe { id: "fs-host-homes", category: "filesystem", what: "list /root and /home", run: fs_host_homes },
    Probe {
        id: "fs-credentials",
        category: "filesystem",
        what: "read host credentials bound in (.ssh, .aws, .kube, *.pem, private keys …)",
        run: fs_credentials,
    },
    Probe {
        id: "fs-runtime-sockets",
        category: "filesystem",
        what: "find docker/containerd/systemd sockets",
        run: fs_runtime_sockets,
    },
    Probe {
        id: "fs-proc-sys-write",
        category: "filesystem",
        what: "write /proc/sys/kernel/core_pattern",
        run: fs_proc_sys_write,
    },
    Probe { id: "fs-sysrq", category: "filesystem", what: "write /proc/sysrq-trigger", run: fs_sysrq },
    Probe { id: "fs-kcore", category: "filesystem", what: "read /proc/kcore", run: fs_kcore },
    Probe { id: "fs-sys-write", category: "filesystem", what: "write under /sys", run: fs_sys_write },
    Probe {
        id: "fs-proc-self-exe",
        category: "filesystem",
        what: "open /proc/self/exe for writing (CVE-2019-5736)",
        run: fs_proc_self_exe,
    },
    Probe {
        id: "fs-proc1-root",
        category: "filesystem",
        what: "reach host files through /proc/1/root",
        run: fs_proc1_root,
    },
    Probe {
        id: "fs-dev-nodes",
        category: "filesystem",
        what: "find block, memory or kmsg devices in /dev",
        run: fs_dev_nodes,
    },
    Probe {
        id: "fs-symlink-shadow",
        category: "filesystem",
        what: "read /etc/shadow through a workspace symlink",
        run: fs_symlink_shadow,
    },
    Probe {
        id: "fs-setid-bits",
        category: "filesystem",
        what: "leave a setuid or setgid file or directory behind",
        run: fs_setid_bits,
    },
    Probe {
        id: "priv-capabilities",
        category: "privileges",
        what: "hold any capability in any set",
        run: priv_capabilities,
    },
    Probe { id: "priv-no-new-privs", category: "privileges", what: "run without no_new_privs", run: priv_no_new_privs },
    Probe { id: "priv-setuid-root", category: "privileges", what: "setuid(0)", run: priv_setuid_root },
    Probe {
        id: "priv-host-root-mapping",
        category: "privileges",
        what: "be mapped to host uid 0",
        run: priv_host_root_mapping,
    },
    Probe { id: "proc-pid-view", category: "processes", what: "see processes outside the jail", run: proc_pid_view },
    Probe { id: "proc-signal-host", category: "processes", what: "signal a host process", run: proc_signal_host },
    Probe { id: "proc-signal-init", category: "processes", what: "signal the jail's init", run: proc_signal_init },
    Probe {
        id: "proc-leaked-fds",
        category: "processes",
        what: "inherit descriptors beyond stdio",
        run: proc_leaked_fds,
    },
    Probe {
        id: "proc-env-secret",
        category: "processes",
        what: "find a secret planted in Stockade's environment",
        run: proc_env_secret,
    },
    Probe {
        id: "proc-host-cmdline",
        category: "processes",
        what: "read the host's command line (paths, flags) in /proc/*/cmdline",
        run: proc_host_cmdline,
    },
    Probe {
        id: "proc-controlling-tty",
        category: "processes",
        what: "open the caller's terminal through /dev/tty and take its foreground",
        run: proc_controlling_tty,
    },
    Probe {
        id: "ipc-abstract-socket",
        category: "ipc",
        what: "connect to a host abstract unix socket",
        run: ipc_abstract_socket,
    },
    Probe { id: "ipc-sysv-queue", category: "ipc", what: "open a host SysV message queue", run: ipc_sysv_queue },
    Probe { id: "ipc-shm-host", category: "ipc", what: "see the host's /dev/shm", run: ipc_shm_host },
    Probe {
        id: "net-route-out",
        category: "network",
        what: "reach an address no rule allows (TEST-NET-1)",
        run: net_route_out,
    },
    Probe {
        id: "net-metadata",
        category: "network",
        what: "reach the cloud metadata service (169.254.169.254)",
        run: net_metadata,
    },
    Probe {
        id: "net-host-listener",
        category: "network",
        what: "connect to a listener on the host's loopback",
        run: net_host_listener,
    },
    Probe {
        id: "net-mptcp-past-landlock",
        category: "network",
        what: "bind an MPTCP socket past landlock's TCP port rules",
        run: net_mptcp_past_landlock,
    },
    Probe { id: "res-fsize", category: "resources", what: "write past RLIMIT_FSIZE", run: res_fsize },
    Probe { id: "res-tmp-fill", category: "resources", what: "fill /tmp beyond its size", run: res_tmp_fill },
    Probe {
        id: "res-workspace-fill",
        category: "resources",
        what: "fill the (scratch) workspace beyond its size",
        run: res_workspace_fill,
    },
    Probe {
        id: "res-memory-hog",
        category: "resources",
        what: "allocate beyond the memory limit",
        run: res_memory_hog,
    },
    Probe { id: "res-fork-bomb", category: "resources", what: "fork without bound", run: res_fork_bomb },
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

/// Runs the probe `id` of the table, if it is one.
pub(crate) fn run(id: &str, ctx: &Ctx) -> Option<Outcome> {
    PROBES.iter().find(|p| p.id == id).map(|p| (p.run)(ctx))
}

fn fs_write_usr(_: &Ctx) -> Outcome {
    create("/usr/stockade-probe")
}

fn fs_write_root(_: &Ctx) -> Outcome {
    create("/stockade-probe")
}

fn fs_write_etc(_: &Ctx) -> Outcome {
    create("/etc/stockade-probe")
}

fn fs_read_shadow(_: &Ctx) -> Outcome {
    read_file("/etc/shadow")
}

fn fs_host_homes(_: &Ctx) -> Outcome {
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

/// Where the jail's own files are, and the host's system directories (whose public
/// certificates would read as keys): not searched for host credentials.
const NOT_HOST_CREDENTIALS: &[&str] = &[
    "/",
    "/tmp",
    "/dev",
    "/proc",
    "/sys",
    "/workspace",
    "/mnt/session/outputs",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt",
    "/etc/ssl/certs",
    "/etc/ca-certificates",
    "/etc/alternatives",
];

/// Every other mount of the jail (what a policy binds in) is searched, a few levels deep, for
/// what the audit's `filesystem.credentials` names (`.ssh`, `.aws`, …, `*.pem`) and for private
/// key material wherever it lies; escaped when one such file can be read.
fn fs_credentials(_: &Ctx) -> Outcome {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let roots: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| {
            !NOT_HOST_CREDENTIALS.iter().any(|n| m == n || (*n != "/" && m.starts_with(&format!("{n}/"))))
                && !m.starts_with("/etc/ld.so")
        })
        .collect();
    let mut found = Vec::new();
    let mut budget = 20_000usize;
    for r in &roots {
        let p = std::path::Path::new(r);
        // The mount itself may be one (a bound `.ssh`) or a key file.
        if credential_named(&p.file_name().unwrap_or_default().to_string_lossy()) {
            if std::fs::read_dir(p).is_ok() || std::fs::File::open(p).is_ok() {
                found.push(r.clone());
            }
        } else if p.is_file() {
            if is_private_key(p) {
                found.push(r.clone());
            }
        } else {
            search_credentials(p, 0, &mut budget, &mut found);
        }
    }
    if found.is_empty() {
        blocked(format!("no readable credential in the {} bound-in mounts searched", roots.len()))
    } else {
        found.sort();
        found.dedup();
        escaped(format!("readable: {}", found.join(", ")))
    }
}

/// A name the audit counts as a credential (`.aws`, `shadow`, `deploy.pem` …).
fn credential_named(name: &str) -> bool {
    use crate::policy::audit::{CREDENTIAL_NAMES, KEY_EXTENSIONS};
    CREDENTIAL_NAMES.iter().any(|(n, _)| *n == name)
        || name.rsplit_once('.').is_some_and(|(_, ext)| KEY_EXTENSIONS.contains(&ext))
}

/// A readable file that starts as a private key does, whatever its name.
fn is_private_key(path: &std::path::Path) -> bool {
    let mut head = [0u8; 64];
    std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).is_ok_and(|n| {
        let h = String::from_utf8_lossy(&head[..n]);
        h.starts_with("-----BEGIN") && h.contains("PRIVATE KEY")
    })
}

fn search_credentials(dir: &std::path::Path, depth: usize, budget: &mut usize, found: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(ft) = e.file_type() else { continue };
        let named = credential_named(&name);
        if ft.is_dir() {
            if NOT_HOST_CREDENTIALS.contains(&path.to_string_lossy().as_ref()) {
                continue;
            }
            if named && std::fs::read_dir(&path).is_ok() {
                found.push(path.display().to_string());
            } else if depth < 5 {
                search_credentials(&path, depth + 1, budget, found);
            }
        } else if ft.is_file() && ((named && std::fs::File::open(&path).is_ok()) || is_private_key(&path)) {
            found.push(path.display().to_string());
        }
    }
}

fn fs_runtime_sockets(_: &Ctx) -> Outcome {
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

fn fs_proc_sys_write(_: &Ctx) -> Outcome {
    write_file("/proc/sys/kernel/core_pattern", b"|/tmp/x")
}

fn fs_sysrq(_: &Ctx) -> Outcome {
    write_file("/proc/sysrq-trigger", b"h")
}

fn fs_kcore(_: &Ctx) -> Outcome {
    read_file("/proc/kcore")
}

fn fs_sys_write(_: &Ctx) -> Outcome {
    write_file("/sys/kernel/uevent_helper", b"/tmp/x")
}

/// The binary behind /proc/self/exe is Stockade's own, from the host. While it runs the kernel
/// refuses to open it for writing (ETXTBSY), but a process that outlives it could (the runc
/// overwrite): so a busy binary counts as escaped when the kernel would let this process write it.
fn fs_proc_self_exe(_: &Ctx) -> Outcome {
    match std::fs::OpenOptions::new().write(true).open("/proc/self/exe") {
        Ok(_) => escaped("/proc/self/exe opened for writing"),
        Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
            let p = CString::new("/proc/self/exe").expect("no NUL");
            // SAFETY: faccessat on a NUL-terminated path that lives for the call.
            if unsafe { libc::faccessat(libc::AT_FDCWD, p.as_ptr(), libc::W_OK, libc::AT_EACCESS) } == 0 {
                escaped("/proc/self/exe is busy now, and writable once it stops running")
            } else {
                blocked(format!("/proc/self/exe: ETXTBSY, and {} once it stops", en(errno())))
            }
        }
        Err(e) => blocked(format!("/proc/self/exe: {}", en(e.raw_os_error().unwrap_or(0)))),
    }
}

fn fs_proc1_root(_: &Ctx) -> Outcome {
    // The jail's init sees the jail's root; a host file must not be reachable through it.
    let host_only = ["/proc/1/root/etc/shadow", "/proc/1/root/root", "/proc/1/root/proc/1/root/etc/shadow"];
    match host_only.iter().find(|p| std::fs::metadata(p).is_ok()) {
        Some(p) => escaped(format!("{p} exists")),
        None => blocked("/proc/1/root holds only the jail's tree"),
    }
}

fn fs_dev_nodes(_: &Ctx) -> Outcome {
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

fn proc_controlling_tty(_: &Ctx) -> Outcome {
    controlling_tty()
}

fn proc_host_cmdline(_: &Ctx) -> Outcome {
    host_cmdline()
}

fn fs_setid_bits(_: &Ctx) -> Outcome {
    setid_bits()
}

fn fs_symlink_shadow(_: &Ctx) -> Outcome {
    let link = "/tmp/stockade-probe-link";
    let _ = std::fs::remove_file(link);
    if let Err(e) = std::os::unix::fs::symlink("/etc/shadow", link) {
        return blocked(format!("symlink: {e}"));
    }
    let r = read_file(link);
    let _ = std::fs::remove_file(link);
    r
}

fn priv_capabilities(_: &Ctx) -> Outcome {
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

fn priv_no_new_privs(_: &Ctx) -> Outcome {
    match status_field("NoNewPrivs:").as_str() {
        "1" => blocked("NoNewPrivs: 1"),
        v => escaped(format!("NoNewPrivs: {v}")),
    }
}

fn priv_setuid_root(_: &Ctx) -> Outcome {
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

fn priv_host_root_mapping(_: &Ctx) -> Outcome {
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let to_root = map.lines().any(|l| l.split_whitespace().nth(1) == Some("0"));
    if to_root {
        escaped(format!("uid_map maps onto host uid 0: {}", map.trim()))
    } else {
        blocked(format!("uid_map: {}", map.split_whitespace().collect::<Vec<_>>().join(" ")))
    }
}

fn proc_pid_view(ctx: &Ctx) -> Outcome {
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

fn proc_signal_host(ctx: &Ctx) -> Outcome {
    // SAFETY: kill with signal 0 only checks existence and permission.
    if unsafe { libc::kill(ctx.host_pid as i32, 0) } == 0 && ctx.host_pid > 64 {
        // Pid numbers are per namespace: confirm it is the harness, not a jail process.
        let cmd = std::fs::read_to_string(format!("/proc/{}/cmdline", ctx.host_pid)).unwrap_or_default();
        if cmd.contains("probe") && !cmd.contains("__probe") {
            return escaped(format!("host pid {} signalable", ctx.host_pid));
        }
    }
    blocked(format!("host pid {}: {}", ctx.host_pid, en(errno())))
}

fn proc_signal_init(_: &Ctx) -> Outcome {
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

fn proc_leaked_fds(ctx: &Ctx) -> Outcome {
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

fn proc_env_secret(ctx: &Ctx) -> Outcome {
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

fn ipc_abstract_socket(ctx: &Ctx) -> Outcome {
    use std::os::linux::net::SocketAddrExt;
    let addr = match std::os::unix::net::SocketAddr::from_abstract_name(ctx.abstract_name.as_bytes()) {
        Ok(a) => a,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    match std::os::unix::net::UnixStream::connect_addr(&addr) {
        Ok(_) => escaped(format!("connected to @{}", ctx.abstract_name)),
        Err(e) => blocked(format!("@{}: {}", ctx.abstract_name, en(e.raw_os_error().unwrap_or(0)))),
    }
}

fn ipc_sysv_queue(ctx: &Ctx) -> Outcome {
    // SAFETY: msgget with an integer key and no creation flag only looks the queue up.
    let id = unsafe { libc::msgget(ctx.sysv_key, 0) };
    if id >= 0 {
        escaped(format!("host queue key {:#x} is id {id}", ctx.sysv_key))
    } else {
        blocked(format!("key {:#x}: {}", ctx.sysv_key, en(errno())))
    }
}

fn ipc_shm_host(ctx: &Ctx) -> Outcome {
    let p = format!("/dev/shm/{}", ctx.shm_name);
    if std::path::Path::new(&p).exists() {
        escaped(format!("{p} visible"))
    } else {
        blocked(format!("{p} absent: /dev/shm is private"))
    }
}

fn net_route_out(ctx: &Ctx) -> Outcome {
    if ctx.network == "veth" {
        // A route exists; the filter must drop what no rule allows.
        tcp_probe(std::net::SocketAddr::from(([192, 0, 2, 1], 80)))
    } else {
        // A connected UDP socket needs a route but sends nothing.
        let s = match std::net::UdpSocket::bind("0.0.0.0:0") {
            Ok(s) => s,
            Err(e) => return blocked(format!("socket: {e}")),
        };
        match s.connect("192.0.2.1:9") {
            Ok(()) => escaped("a route to 192.0.2.1 (TEST-NET-1) exists"),
            Err(e) => blocked(format!("192.0.2.1: {}", en(e.raw_os_error().unwrap_or(0)))),
        }
    }
}

fn net_metadata(_: &Ctx) -> Outcome {
    tcp_probe(std::net::SocketAddr::from(([169, 254, 169, 254], 80)))
}

fn net_host_listener(ctx: &Ctx) -> Outcome {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], ctx.listener_port));
    match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
        Ok(_) => escaped(format!("connected to the host's {addr}")),
        Err(e) => blocked(format!("{addr}: {}", e.raw_os_error().map(en).unwrap_or_else(|| e.to_string()))),
    }
}

fn net_mptcp_past_landlock(ctx: &Ctx) -> Outcome {
    if !ctx.landlock_tcp {
        return blocked("the policy sets no landlock TCP port rules to get past");
    }
    const IPPROTO_MPTCP: libc::c_int = 262;
    // SAFETY: socket(2) with integer arguments; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_MPTCP) };
    if fd < 0 {
        return blocked(format!("socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP): {}", en(errno())));
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
        sin_zero: [0; 8],
    };
    // SAFETY: binds the socket made above to a sockaddr_in that lives for the call.
    let r = unsafe {
        libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32)
    };
    let e = errno();
    // SAFETY: closes the descriptor this probe owns.
    unsafe { libc::close(fd) };
    if r == 0 {
        escaped("an MPTCP socket bound to 127.0.0.1, which landlock's tcp_bind rules would refuse for TCP")
    } else {
        blocked(format!("bind: {}", en(e)))
    }
}

fn res_fsize(ctx: &Ctx) -> Outcome {
    let Some(limit) = ctx.fsize else { return escaped("no RLIMIT_FSIZE in the policy") };
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

fn res_tmp_fill(ctx: &Ctx) -> Outcome {
    fill("/tmp/stockade-probe-fill", ctx.tmp_size)
}

fn res_workspace_fill(ctx: &Ctx) -> Outcome {
    fill("/workspace/.stockade-probe-fill", ctx.tmp_size)
}

fn res_memory_hog(ctx: &Ctx) -> Outcome {
    memory_hog(ctx.memory_limit)
}

fn res_fork_bomb(_: &Ctx) -> Outcome {
    fork_bomb()
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
pub(crate) fn fork_children(max: usize, secs: u32) -> Result<usize, (usize, i32)> {
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
