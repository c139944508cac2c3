//! Static hardening audit of a resolved policy, modelled on `systemd-analyze security`: named
//! checks with weights and verdicts, each pointing at the policy field (file:line) it reads, and
//! an exposure score from 0.0 (locked down) to 10.0 (no protection).
//!
//! Checks read only the policy, never the host, except `hostname` (compared with the auditing
//! host's own name). Protections Stockade applies whatever the policy says (no_new_privs, the
//! x32/ia32 refusal, /proc masking, the minimal /dev) are listed as passing checks with their
//! reason, so a report shows the whole picture.

use serde::Serialize;
use std::collections::BTreeSet;

use super::syscalls;
use super::{Access, Compatibility, Enforcement, NetMode, Origins, Policy, SeccompAction, SysMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Partial,
    Fail,
}

impl Verdict {
    fn exposure(self) -> f64 {
        match self {
            Verdict::Pass => 0.0,
            Verdict::Partial => 0.5,
            Verdict::Fail => 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub id: String,
    pub weight: f64,
    pub verdict: Verdict,
    pub reason: String,
    /// The policy field the check reads.
    pub field: String,
    /// Where that field was set (`file`, line); the top file's line 1 when it was never set.
    pub file: String,
    pub line: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub policy: String,
    pub exposure: f64,
    pub label: &'static str,
    pub findings: Vec<Finding>,
}

pub(crate) fn label(exposure: f64) -> &'static str {
    match exposure {
        e if e < 2.0 => "OK",
        e if e < 5.0 => "MEDIUM",
        e if e < 8.0 => "EXPOSED",
        _ => "UNSAFE",
    }
}

/// Exposure, 0.0–10.0: each check removes a share of the remaining protection,
/// `10 · (1 − Π (1 − 0.6 · weight · v))` with v = 1 for fail, ½ for partial. One failed check of
/// weight 1.0 (a kept CAP_SYS_ADMIN, an allowlist that only logs) alone makes a policy EXPOSED
/// (6.0); two make it UNSAFE; a weight-0.2 failure stays OK (1.2). Unlike an average, many
/// passing checks cannot dilute one catastrophic failure.
pub fn score(findings: &[Finding]) -> f64 {
    let kept: f64 = findings.iter().map(|f| 1.0 - 0.6 * f.weight.clamp(0.0, 1.0) * f.verdict.exposure()).product();
    ((1.0 - kept) * 100.0).round() / 10.0
}

/// Weights of the dangerous syscall groups.
const GROUP_WEIGHTS: &[(&str, f64)] = &[
    ("@mount", 1.0),
    ("@module", 1.0),
    ("@raw-io", 0.8),
    ("@debug", 0.8),
    ("@bpf", 0.8),
    ("@namespaces", 0.8),
    ("@privileged", 0.6),
    ("@io-uring", 0.6),
    ("@keyring", 0.4),
    ("@reboot", 0.3),
    ("@swap", 0.3),
    ("@clock", 0.2),
    ("@obsolete", 0.2),
];

/// Host paths whose exposure inside a jail defeats it, and why.
const SENSITIVE_PATHS: &[(&str, &str)] = &[
    ("/", "the host's whole filesystem"),
    ("/etc", "host configuration and credentials"),
    ("/home", "users' home directories"),
    ("/root", "root's home directory"),
    ("/var/run", "runtime sockets"),
    ("/run", "runtime sockets"),
    ("/var/lib/docker", "container state"),
    ("/var/run/docker.sock", "the Docker socket (host root)"),
    ("/run/docker.sock", "the Docker socket (host root)"),
    ("/run/containerd/containerd.sock", "the containerd socket (host root)"),
    ("/var/run/containerd/containerd.sock", "the containerd socket (host root)"),
    ("/proc", "the host's process table"),
    ("/sys", "the host's sysfs"),
    ("/dev", "host devices"),
    ("/boot", "kernels and boot loaders"),
];

/// Host paths holding executables: writable, they let a jail plant code the host runs.
const HOST_BINARIES: &[&str] = &["/", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/opt", "/etc", "/boot"];

const DANGEROUS_CAPS: &[&str] = &[
    "SYS_ADMIN",
    "SYS_MODULE",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "NET_ADMIN",
    "NET_RAW",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "SETUID",
    "SETGID",
    "SYS_BOOT",
    "SYS_TIME",
    "BPF",
    "PERFMON",
    "MKNOD",
    "CHOWN",
    "FOWNER",
];

/// Names of credential files and directories, wherever they sit in a path. The probe battery's
/// `fs-credentials` looks for the same names inside a jail.
pub(crate) const CREDENTIAL_NAMES: &[(&str, &str)] = &[
    (".ssh", "SSH keys"),
    (".aws", "AWS credentials"),
    (".kube", "Kubernetes credentials"),
    (".docker", "registry credentials"),
    (".gnupg", "GPG keys"),
    (".netrc", "login credentials"),
    (".git-credentials", "git credentials"),
    (".npmrc", "registry tokens"),
    (".pypirc", "registry tokens"),
    (".azure", "Azure credentials"),
    ("gcloud", "Google Cloud credentials"),
    ("shadow", "password hashes"),
    ("gshadow", "password hashes"),
    ("sudoers", "privilege rules"),
];

/// Extensions of private keys and keystores.
pub(crate) const KEY_EXTENSIONS: &[&str] = &["pem", "key", "p12", "pfx", "jks"];

/// Credential paths by where they are.
const CREDENTIAL_PATHS: &[(&str, &str)] = &[
    ("/etc/ssh", "host SSH keys"),
    ("/var/run/secrets", "service account tokens"),
    ("/run/secrets", "mounted secrets"),
    ("/var/lib/kubelet", "kubelet credentials"),
];

/// Why a bound host path exposes credentials, read-only or not: it is one (at any depth), holds
/// one, or is a home directory, which brings its `.ssh`, `.aws` and the like along.
fn credential_exposure(path: &str) -> Option<String> {
    let p = norm(path);
    let comps: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
    if let Some((name, why)) = comps.iter().find_map(|c| CREDENTIAL_NAMES.iter().find(|(n, _)| n == c)) {
        return Some(format!("`{name}`: {why}"));
    }
    if let Some(ext) = comps.last().and_then(|l| l.rsplit_once('.')).map(|(_, e)| e) {
        if KEY_EXTENSIONS.contains(&ext) {
            return Some(format!("a `.{ext}` file: a private key or keystore"));
        }
    }
    for (c, why) in CREDENTIAL_PATHS {
        if covers(&p, c) || covers(c, &p) {
            return Some(format!("{c}: {why}"));
        }
    }
    match comps.as_slice() {
        ["home", _] | ["root"] => Some("a home directory, with its .ssh, .aws and the like".into()),
        _ => None,
    }
}

fn norm(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.into()
    }
}

/// True when `a` is `b` or an ancestor of it.
fn covers(a: &str, b: &str) -> bool {
    let (a, b) = (norm(a), norm(b));
    a == "/" || a == b || b.starts_with(&format!("{a}/"))
}

struct Ctx<'a> {
    origins: &'a Origins,
    top: String,
    out: Vec<Finding>,
}

impl Ctx<'_> {
    fn add(&mut self, id: &str, weight: f64, verdict: Verdict, field: &str, reason: String) {
        let (file, line) = match self.origins.get(field) {
            Some(o) => (o.file.clone(), o.line),
            None => (self.top.clone(), 1),
        };
        self.out.push(Finding { id: id.into(), weight, verdict, reason, field: field.into(), file, line });
    }
}

pub fn audit(p: &Policy, origins: &Origins) -> Report {
    let mut c = Ctx { origins, top: p.source.clone(), out: Vec::new() };
    syscall_checks(p, &mut c);
    privilege_checks(p, &mut c);
    filesystem_checks(p, &mut c);
    network_checks(p, &mut c);
    env_checks(p, &mut c);
    limit_checks(p, &mut c);
    trail_checks(p, &mut c);
    let exposure = score(&c.out);
    Report { policy: p.source.clone(), exposure, label: label(exposure), findings: c.out }
}

fn syscall_checks(p: &Policy, c: &mut Ctx) {
    // Resolved when the policy was read.
    let allowed = syscalls::by_name(&p.seccomp.allowed);
    for (g, w) in GROUP_WEIGHTS {
        let Some(group) = syscalls::group(g) else { continue };
        let members: BTreeSet<&str> = syscalls::expand_group(group.name).iter().map(|m| m.name).collect();
        // Exposed: admitted without an argument condition. Conditions come from Stockade's group
        // definitions (clone without namespace flags, ...), and clone3 only ever answers ENOSYS.
        let on: Vec<&str> =
            members.iter().copied().filter(|m| *m != "clone3" && matches!(allowed.get(m), Some(None))).collect();
        let guarded: Vec<&str> = members.iter().copied().filter(|m| matches!(allowed.get(m), Some(Some(_)))).collect();
        let (v, reason) = if !on.is_empty() {
            (Verdict::Fail, format!("{g} allowed ({})", on.join(" ")))
        } else if !guarded.is_empty() {
            (Verdict::Pass, format!("{g} refused; {} only under argument conditions", guarded.join(" ")))
        } else {
            (Verdict::Pass, format!("{} refused: {}", g, group.description))
        };
        c.add(&format!("syscalls.{}", g.trim_start_matches('@')), *w, v, "seccomp.allow", reason);
    }
    let open = syscalls::setid_openings(&p.seccomp.allowed);
    let (v, r) = if open.is_empty() {
        (
            Verdict::Pass,
            "setuid/setgid bits refused in chmod, open, creat, mkdir and mknod modes; openat2 refused".to_owned(),
        )
    } else {
        (Verdict::Fail, format!("setuid/setgid files can be made: {} allowed without a mode condition", open.join(" ")))
    };
    c.add("syscalls.setid_modes", 0.5, v, "seccomp.allow", r);
    let (v, r) = match p.seccomp.default_action {
        SeccompAction::Errno => (Verdict::Pass, "syscalls outside the allowlist fail with EPERM".to_owned()),
        SeccompAction::Kill => (Verdict::Pass, "syscalls outside the allowlist kill the process".to_owned()),
        SeccompAction::Log => (Verdict::Fail, "syscalls outside the allowlist are only logged, and run".to_owned()),
    };
    c.add("seccomp.default_action", 1.0, v, "seccomp.default_action", r);
    c.add(
        "seccomp.arch",
        0.5,
        Verdict::Pass,
        "seccomp.allow",
        "the filter pins the native ABI; x32 and ia32 (int 0x80) syscalls are refused".into(),
    );
    let fams = &p.seccomp.socket_families;
    let (v, r) = if fams.iter().any(|f| f == "netlink") {
        (Verdict::Partial, "netlink sockets allowed (kernel interfaces: routing, audit, uevents)".to_owned())
    } else {
        (Verdict::Pass, format!("socket families: {}; raw and packet sockets refused", fams.join(", ")))
    };
    c.add("seccomp.socket_families", 0.4, v, "seccomp.socket_families", r);
}

fn privilege_checks(p: &Policy, c: &mut Ctx) {
    let keep = &p.capabilities.keep;
    let norm_cap = |k: &str| k.trim_start_matches("CAP_").to_ascii_uppercase();
    let bad: Vec<String> = keep.iter().map(|k| norm_cap(k)).filter(|k| DANGEROUS_CAPS.contains(&k.as_str())).collect();
    let (v, r) = if keep.is_empty() {
        (Verdict::Pass, "every capability set is empty".to_owned())
    } else if !bad.is_empty() {
        (Verdict::Fail, format!("keeps {}", bad.join(", ")))
    } else {
        (Verdict::Partial, format!("keeps {}", keep.join(", ")))
    };
    c.add("capabilities", 1.0, v, "capabilities.keep", r);
    c.add(
        "no_new_privs",
        0.5,
        Verdict::Pass,
        "capabilities.keep",
        "always set: setuid/setgid bits and file caps confer nothing".into(),
    );
    let (v, r) = if p.user.uid == 0 {
        (Verdict::Fail, "commands run as uid 0 inside the jail (owner of the jail's files, no capabilities)".to_owned())
    } else {
        (Verdict::Pass, format!("commands run as uid {}", p.user.uid))
    };
    c.add("user.uid", 0.5, v, "user.uid", r);
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let (v, r) = if p.hostname.is_empty() || (!host.is_empty() && p.hostname == host) {
        (Verdict::Fail, format!("hostname {:?} is the host's own name", p.hostname))
    } else {
        (Verdict::Pass, format!("hostname {:?} reveals nothing of the host", p.hostname))
    };
    c.add("hostname", 0.2, v, "hostname", r);
}

fn bind_paths(b: &[super::Bind]) -> Vec<String> {
    b.iter().map(|b| b.src.display().to_string()).collect()
}

fn filesystem_checks(p: &Policy, c: &mut Ctx) {
    let rw = bind_paths(&p.filesystem.read_write);
    let ro = bind_paths(&p.filesystem.read_only);
    // A writable path inside a binaries tree, or one that contains such a tree ("/" only exactly).
    let bin_rw: Vec<&String> =
        rw.iter().filter(|s| HOST_BINARIES.iter().any(|h| covers(s, h) || (*h != "/" && covers(h, s)))).collect();
    let (v, r) = if rw.is_empty() {
        (Verdict::Pass, "writable: only /workspace, /mnt/session/outputs, /tmp, /dev/shm".to_owned())
    } else if !bin_rw.is_empty() {
        (
            Verdict::Fail,
            format!("host binaries writable: {}", bin_rw.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
        )
    } else {
        (Verdict::Partial, format!("host paths writable: {}", rw.join(", ")))
    };
    c.add("filesystem.writable", 1.0, v, "filesystem.read_write", r);
    let mut exposed = Vec::new();
    for (path, field) in
        rw.iter().map(|s| (s, "filesystem.read_write")).chain(ro.iter().map(|s| (s, "filesystem.read_only")))
    {
        for (sens, why) in SENSITIVE_PATHS {
            // The path itself, or a parent that brings it along.
            if covers(path, sens) && !(norm(sens) == "/" && norm(path) != "/") {
                exposed.push((path.clone(), *why, field));
            }
        }
    }
    exposed.dedup_by(|a, b| a.0 == b.0);
    let field = exposed.first().map(|e| e.2).unwrap_or("filesystem.read_only");
    let (v, r) = if exposed.is_empty() {
        (Verdict::Pass, "no sensitive host path is bound (/, /etc, /home, /root, /run, container sockets)".to_owned())
    } else {
        (Verdict::Fail, exposed.iter().map(|(p, why, _)| format!("{p} ({why})")).collect::<Vec<_>>().join("; "))
    };
    c.add("filesystem.host_paths", 1.0, v, field, r);
    // Read-only is no protection for a secret: reading it is the exposure.
    let etc = bind_paths(&p.filesystem.etc);
    let secrets: Vec<(String, String, &str)> = rw
        .iter()
        .map(|s| (s, "filesystem.read_write"))
        .chain(ro.iter().map(|s| (s, "filesystem.read_only")))
        .chain(etc.iter().map(|s| (s, "filesystem.etc")))
        .filter_map(|(s, field)| credential_exposure(s).map(|why| (s.clone(), why, field)))
        .collect();
    let field = secrets.first().map(|e| e.2).unwrap_or("filesystem.read_only");
    let (v, r) = if secrets.is_empty() {
        (Verdict::Pass, "no credential file or directory is bound, read-only or not".to_owned())
    } else {
        (
            Verdict::Fail,
            format!(
                "credentials readable in the jail: {}",
                secrets.iter().map(|(p, why, _)| format!("{p} ({why})")).collect::<Vec<_>>().join("; ")
            ),
        )
    };
    c.add("filesystem.credentials", 1.0, v, field, r);
    c.add(
        "filesystem.etc",
        0.5,
        Verdict::Pass,
        "filesystem.etc",
        format!("/etc is generated; {} host entries copied read-only", p.filesystem.etc.len()),
    );
    c.add("proc", 0.6, Verdict::Pass, "filesystem.sys", "fresh /proc of the jail's pid namespace; /proc/sys, sysrq-trigger, kcore, keys and friends masked or read-only".into());
    let (v, r) = match p.filesystem.sys {
        SysMode::None => (Verdict::Pass, "no /sys".to_owned()),
        SysMode::ReadOnly => {
            (Verdict::Partial, "/sys read-only and masked: host hardware details are visible".to_owned())
        }
    };
    c.add("sys", 0.3, v, "filesystem.sys", r);
    c.add("devices", 0.6, Verdict::Pass, "filesystem.read_only", "minimal /dev (null, zero, full, random, urandom, tty, ptmx/pts); no block or memory devices; mknod of devices refused".into());
    let (v, r) = match p.filesystem.workspace {
        Access::ReadOnly => (Verdict::Pass, "workspace read-only; results go to outputs".to_owned()),
        Access::ReadWrite => (Verdict::Pass, "workspace read-write (the session's own files)".to_owned()),
    };
    c.add("filesystem.workspace", 0.1, v, "filesystem.workspace", r);
}

/// Private and special IPv4 ranges an allowlist should name only deliberately.
fn classify_cidr(entry: &str) -> Option<(Verdict, String)> {
    let addr = entry.split(['/', ':']).next().unwrap_or("");
    let prefix: u32 =
        entry.split('/').nth(1).and_then(|p| p.split(':').next()).and_then(|p| p.parse().ok()).unwrap_or(32);
    if entry.starts_with("::/0") || addr == "::" || (addr == "0.0.0.0" && prefix == 0) {
        return Some((Verdict::Fail, format!("{entry} admits every destination")));
    }
    let ip: std::net::Ipv4Addr = addr.parse().ok()?;
    let o = ip.octets();
    if o[0] == 169 && o[1] == 254 {
        return Some((Verdict::Fail, format!("{entry} reaches link-local addresses (cloud metadata)")));
    }
    if prefix < 8 {
        return Some((Verdict::Fail, format!("{entry} is a /{prefix}: most of the internet")));
    }
    if o[0] == 10 || (o[0] == 172 && (16..32).contains(&o[1])) || (o[0] == 192 && o[1] == 168) || o[0] == 127 {
        return Some((Verdict::Partial, format!("{entry} is a private or loopback range")));
    }
    None
}

fn network_checks(p: &Policy, c: &mut Ctx) {
    let n = &p.network;
    let (v, r) = match n.mode {
        NetMode::None => (Verdict::Pass, "no network interfaces".to_owned()),
        NetMode::Loopback => (Verdict::Pass, "loopback only: no route out".to_owned()),
        NetMode::Veth => (Verdict::Partial, "egress through a veth, allowlisted".to_owned()),
    };
    c.add("network.mode", 1.0, v, "network.mode", r);
    if n.mode != NetMode::Veth {
        c.add("network.dns", 0.4, Verdict::Pass, "network.mode", "no DNS: nothing leaves the jail".into());
        return;
    }
    // DNS only ever goes to Stockade's resolver, which answers allowlisted names only.
    let (v, r) = if n.allow_domains.is_empty() {
        (Verdict::Pass, "no names resolvable: DNS refused".to_owned())
    } else if n.upstream_dns.iter().any(|u| classify_cidr(u).is_some_and(|(v, _)| v == Verdict::Fail)) {
        (Verdict::Fail, format!("upstream resolvers include {}", n.upstream_dns.join(", ")))
    } else {
        (Verdict::Pass, "DNS answered by Stockade's resolver for allowlisted names only".to_owned())
    };
    c.add("network.dns", 0.4, v, "network.upstream_dns", r);
    let mut worst = (Verdict::Pass, "every allowlisted destination is specific".to_owned());
    for a in &n.allow {
        if let Some(f) = classify_cidr(a) {
            if f.0 > worst.0 {
                worst = f;
            }
        }
    }
    c.add("network.allow", 1.0, worst.0, "network.allow", worst.1);
    let wild: Vec<&String> = n.allow_domains.iter().filter(|d| d.contains('*')).collect();
    let (v, r) = if n.allow_domains.iter().any(|d| d == "*" || d == "*.*") {
        (Verdict::Fail, "a bare wildcard admits every name".to_owned())
    } else if !wild.is_empty() {
        (
            Verdict::Partial,
            format!("wildcard domains: {}", wild.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
        )
    } else {
        (Verdict::Pass, format!("{} exact domains", n.allow_domains.len()))
    };
    c.add("network.allow_domains", 0.6, v, "network.allow_domains", r);
    let (v, r) = match &p.landlock.tcp_connect {
        Some(ports) => (
            Verdict::Pass,
            format!(
                "landlock limits TCP connect to ports {ports:?}; its rules cover TCP only, so MPTCP and SCTP \
                 sockets are refused (seccomp)"
            ),
        ),
        None => (Verdict::Partial, "no landlock TCP port rules behind the veth allowlist".to_owned()),
    };
    c.add("network.landlock_ports", 0.3, v, "landlock.tcp_connect", r);
}

fn env_checks(p: &Policy, c: &mut Ctx) {
    let e = &p.env;
    let secretish: Vec<&String> = e.set.keys().chain(e.pass.iter()).filter(|k| super::is_secret_name(k)).collect();
    let (v, r) = if !e.allow_secrets.is_empty() {
        (Verdict::Fail, format!("secret-looking variables allowed into the jail: {}", e.allow_secrets.join(", ")))
    } else if !secretish.is_empty() {
        (
            Verdict::Fail,
            format!(
                "secret-looking variables passed: {}",
                secretish.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
    } else {
        (Verdict::Pass, "no secret-looking variable is set or passed".to_owned())
    };
    let field = if e.allow_secrets.is_empty() { "env.pass" } else { "env.allow_secrets" };
    c.add("env.secrets", 1.0, v, field, r);
}

fn limit_checks(p: &Policy, c: &mut Ctx) {
    let l = &p.limits;
    let mut lim = |id: &str, w: f64, set: bool, field: &str, what: &str| {
        let (v, r) =
            if set { (Verdict::Pass, format!("{what} limited")) } else { (Verdict::Fail, format!("no {what} limit")) };
        c.add(id, w, v, field, r);
    };
    lim("limits.memory", 0.6, l.memory.is_some(), "limits.memory", "memory");
    lim("limits.pids", 0.6, l.pids.is_some(), "limits.pids", "process count");
    lim("limits.cpu", 0.3, l.cpu.is_some(), "limits.cpu", "CPU");
    lim("limits.nofile", 0.2, l.nofile.is_some(), "limits.nofile", "open file");
    lim("limits.fsize", 0.2, l.fsize.is_some(), "limits.fsize", "file size");
    lim("limits.timeout", 0.3, l.timeout.is_some(), "limits.timeout", "wall-clock");
    let (v, r) = if l.tmp_size.0 > 8 << 30 {
        (Verdict::Partial, format!("/tmp may grow to {}", crate::util::format_size(l.tmp_size.0)))
    } else {
        (Verdict::Pass, format!("/tmp and /dev/shm limited to {}", crate::util::format_size(l.tmp_size.0)))
    };
    c.add("limits.tmp_size", 0.2, v, "limits.tmp_size", r);
    for (id, size, what) in [
        ("limits.workspace_size", l.workspace_size, "/workspace"),
        ("limits.outputs_size", l.outputs_size, "/mnt/session/outputs"),
    ] {
        let (v, r) = match size {
            Some(s) => {
                (Verdict::Pass, format!("{what} limited to {} by its filesystem", crate::util::format_size(s.0)))
            }
            // A full disk is an outage, not a way out: partial, not failed.
            None => (
                Verdict::Partial,
                format!("{what} has no size limit of its own: a session can fill the filesystem it is on"),
            ),
        };
        // Weighed as the other limits on how much a session uses (files, file size): what it
        // costs is the host's room, not its confinement.
        c.add(id, 0.2, v, id, r);
    }
    let (v, r) = match l.enforcement {
        Enforcement::Hard => (Verdict::Pass, "refuses to run without its cgroup limits".to_owned()),
        Enforcement::BestEffort => (Verdict::Partial, "runs without cgroup limits the host cannot apply".to_owned()),
    };
    c.add("limits.enforcement", 0.5, v, "limits.enforcement", r);
    let (v, r) = match p.landlock.compatibility {
        Compatibility::Hard => (Verdict::Pass, "refuses to run unless every landlock right is enforced".to_owned()),
        Compatibility::BestEffort => {
            (Verdict::Fail, "runs with whatever landlock rights the kernel has (best_effort)".to_owned())
        }
    };
    c.add("landlock.compatibility", 0.6, v, "landlock.compatibility", r);
}

fn trail_checks(p: &Policy, c: &mut Ctx) {
    let t = &p.trail;
    let (v, r) = match t.exec {
        true => (Verdict::Pass, "every program executed in the jail is recorded in the session's trail".to_owned()),
        false => (Verdict::Fail, "programs the agent runs are not recorded (only tool calls are)".to_owned()),
    };
    c.add("trail.exec", 0.5, v, "trail.exec", r);
    let (v, r) = match t.redact.is_empty() {
        false => (Verdict::Pass, format!("{} secret patterns are redacted from the trail", t.redact.len())),
        true => (
            Verdict::Partial,
            "only the environment key and the work secret are redacted; other credentials in inputs and argv reach the trail"
                .to_owned(),
        ),
    };
    c.add("trail.redact", 0.2, v, "trail.redact", r);
    let (v, r) = match t.on_full {
        crate::policy::OnFull::Fail => {
            (Verdict::Pass, "a full trail fails closed: nothing runs that the trail cannot record".to_owned())
        }
        crate::policy::OnFull::Truncate => (
            Verdict::Fail,
            "a full trail stops recording and the session goes on: a session can fill it, then run unrecorded"
                .to_owned(),
        ),
    };
    c.add("trail.on_full", 0.3, v, "trail.on_full", r);
    let (v, r) = match t.max_rate {
        Some(rate) => (
            Verdict::Pass,
            format!(
                "the jail adds at most {}/s to its trail: an exec waits for its record, egress past it is counted",
                crate::util::format_size(rate.0)
            ),
        ),
        None => (
            Verdict::Partial,
            "the jail's records have no rate bound: a flood of execs fills the trail (trail.max_size) within seconds"
                .to_owned(),
        ),
    };
    c.add("trail.max_rate", 0.1, v, "trail.max_rate", r);
    let pv = &p.provision;
    let plain: Vec<&String> =
        pv.git_allow.iter().filter(|u| u.starts_with("http://") || u.starts_with("git://")).collect();
    let (v, r) = match (&pv.git_url_key, plain.is_empty()) {
        (None, _) => (Verdict::Pass, "no repository is provisioned from session metadata".to_owned()),
        (Some(_), true) => (Verdict::Pass, "repositories come over authenticated transports (https, ssh)".to_owned()),
        (Some(_), false) => (
            Verdict::Partial,
            format!(
                "{} fetched unencrypted: someone on the path can replace the code a session starts from",
                plain.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    c.add("provision.git_allow", 0.3, v, "provision.git_allow", r);
}

/// A check that got weaker or stronger between two reports.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub id: String,
    pub before: Option<Verdict>,
    pub after: Option<Verdict>,
    pub weaker: bool,
    pub reason: String,
}

pub fn diff(old: &Report, new: &Report) -> Vec<Change> {
    let mut out = Vec::new();
    let ids: BTreeSet<&str> = old.findings.iter().chain(&new.findings).map(|f| f.id.as_str()).collect();
    for id in ids {
        let a = old.findings.iter().find(|f| f.id == id);
        let b = new.findings.iter().find(|f| f.id == id);
        let (va, vb) = (a.map(|f| f.verdict), b.map(|f| f.verdict));
        if va == vb && a.map(|f| &f.reason) == b.map(|f| &f.reason) {
            continue;
        }
        let weaker = match (va, vb) {
            (Some(x), Some(y)) => y > x,
            (None, Some(y)) => y != Verdict::Pass,
            _ => false,
        };
        let reason = b.or(a).map(|f| f.reason.clone()).unwrap_or_default();
        out.push(Change { id: id.into(), before: va, after: vb, weaker, reason });
    }
    out
}

/// Where a policy's text lives in the repository, for SARIF: built-ins are `policies/NAME.toml`.
fn artifact_uri(file: &str) -> String {
    match file.strip_prefix("builtin:") {
        Some(name) => format!("policies/{name}.toml"),
        None => file.trim_start_matches("./").to_owned(),
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

pub fn table(reports: &[Report]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for r in reports {
        let _ = writeln!(s, "{}", r.policy);
        let _ = writeln!(s, "  {:<7} {:<27} {:>6}  REASON (FIELD, WHERE)", "VERDICT", "CHECK", "WEIGHT");
        for f in &r.findings {
            let mark = match f.verdict {
                Verdict::Pass => "pass",
                Verdict::Partial => "partial",
                Verdict::Fail => "FAIL",
            };
            let _ = writeln!(
                s,
                "  {mark:<7} {:<27} {:>6.1}  {} ({}, {}:{})",
                f.id, f.weight, f.reason, f.field, f.file, f.line
            );
        }
        let _ = writeln!(s, "  exposure {:.1} {}\n", r.exposure, r.label);
    }
    s
}

/// SARIF 2.1.0, as GitHub code scanning reads it: one rule per check, one result per failed or
/// partial check, located at the policy line that set the field.
pub fn sarif(reports: &[Report]) -> serde_json::Value {
    use serde_json::json;
    let mut rules: Vec<serde_json::Value> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut results = Vec::new();
    for r in reports {
        for f in &r.findings {
            if seen.insert(f.id.clone()) {
                rules.push(json!({
                    "id": f.id,
                    "name": f.id.replace(['.', '-'], "_"),
                    "shortDescription": { "text": format!("Stockade policy check {}", f.id) },
                    "properties": { "weight": f.weight },
                }));
            }
            if f.verdict == Verdict::Pass {
                continue;
            }
            results.push(json!({
                "ruleId": f.id,
                "level": if f.verdict == Verdict::Fail { "error" } else { "warning" },
                "message": { "text": format!("{} (field {}; policy exposure {:.1} {})", f.reason, f.field, r.exposure, r.label) },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": { "uri": artifact_uri(&f.file) },
                        "region": { "startLine": f.line.max(1) },
                    }
                }],
            }));
        }
    }
    json!({
        "version": "2.1.0",
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "runs": [{
            "tool": { "driver": {
                "name": "stockade-audit",
                "version": env!("CARGO_PKG_VERSION"),
                "informationUri": "https://github.com/stockade/stockade",
                "rules": rules,
            }},
            "results": results,
        }],
    })
}

/// JUnit XML: one testsuite per policy, one testcase per check, a `failure` for fail/partial.
pub fn junit(reports: &[Report]) -> String {
    use std::fmt::Write;
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"stockade audit\">\n");
    for r in reports {
        let failures = r.findings.iter().filter(|f| f.verdict != Verdict::Pass).count();
        let _ = writeln!(
            s,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\">",
            xml_escape(&r.policy),
            r.findings.len()
        );
        for f in &r.findings {
            let _ = write!(s, "    <testcase classname=\"{}\" name=\"{}\"", xml_escape(&r.policy), xml_escape(&f.id));
            if f.verdict == Verdict::Pass {
                s.push_str("/>\n");
            } else {
                let _ = writeln!(
                    s,
                    ">\n      <failure type=\"{}\" message=\"{}\">{} {}:{}</failure>\n    </testcase>",
                    crate::policy::spelling(&f.verdict),
                    xml_escape(&f.reason),
                    xml_escape(&f.field),
                    xml_escape(&f.file),
                    f.line
                );
            }
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}
