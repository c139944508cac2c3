//! The resolved, validated policy.

use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::util::{format_duration, format_size};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Where the policy came from (a path or `builtin:NAME`); not a policy field.
    #[serde(skip)]
    pub source: String,
    pub hostname: String,
    pub user: User,
    pub filesystem: Filesystem,
    pub env: Env,
    pub limits: Limits,
    pub network: Network,
    pub landlock: Landlock,
    pub seccomp: Seccomp,
    pub capabilities: Capabilities,
    pub tools: Tools,
    pub trail: Trail,
    pub retention: Retention,
    pub provision: Provision,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    /// The uid the jailed command runs as, inside the jail.
    pub uid: u32,
    pub gid: u32,
    /// Name written to the jail's /etc/passwd.
    pub name: String,
    /// When Stockade runs as host root, jail ids 0..65536 map to host ids
    /// host_id_base..host_id_base+65536; never to host root.
    pub host_id_base: u32,
}

/// A host path bound into the jail, at the same path or at `dst`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bind {
    pub src: PathBuf,
    pub dst: PathBuf,
    /// Written with a leading `-`: skipped when the host path does not exist.
    pub optional: bool,
}

impl Serialize for Bind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl std::fmt::Display for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.optional {
            f.write_str("-")?;
        }
        write!(f, "{}", self.src.display())?;
        if self.dst != self.src {
            write!(f, ":{}", self.dst.display())?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SysMode {
    /// No /sys at all.
    None,
    /// A read-only sysfs with /sys/firmware, /sys/kernel and /sys/fs masked.
    ReadOnly,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Filesystem {
    pub read_only: Vec<Bind>,
    pub read_write: Vec<Bind>,
    /// Host files and directories added to the generated /etc (e.g. certificates), read-only:
    /// regular files up to 16 KiB, and directories of at most 8 such files, symlinks and
    /// subdirectories, are copied; anything else is bound at the same path.
    pub etc: Vec<Bind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
    pub sys: SysMode,
    /// How /workspace is mounted; outputs are always read-write.
    pub workspace: Access,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Env {
    pub set: BTreeMap<String, String>,
    pub pass: Vec<String>,
    pub allow_secrets: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Refuse to run when a requested protection cannot be applied.
    Hard,
    /// Run anyway and report what was dropped.
    BestEffort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);
impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(self.0))
    }
}

/// An optional size as a policy spells it: the size, or "none".
fn size_or_none<S: Serializer>(v: &Option<Size>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(size) => size.serialize(s),
        None => s.serialize_str("none"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);
impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// CPUs' worth of time per period (1.0 = one full core).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nofile: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nproc: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsize: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_space: Option<Size>,
    pub tmp_size: Size,
    /// The most a session's host-backed /workspace may hold: the filesystem behind it must be no
    /// larger (the worker gives each session one of this size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace_size: Option<Size>,
    /// The same for /mnt/session/outputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs_size: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// What happens when a cgroup limit cannot be applied on this host.
    pub enforcement: Enforcement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetMode {
    None,
    Loopback,
    Veth,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Network {
    pub mode: NetMode,
    pub allow: Vec<String>,
    pub allow_domains: Vec<String>,
    pub upstream_dns: Vec<String>,
    /// veth only: the IPv4 range session links take their /30s from.
    pub pool: String,
    /// veth only: what a denied connection gets.
    pub on_deny: OnDeny,
    /// veth only: `allow`, `allow_domains`, `upstream_dns` and `pool`, resolved.
    #[serde(skip)]
    pub egress: Option<super::rules::Egress>,
}

/// What the egress filter does with a packet it denies (`network.on_deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeny {
    /// Answer it: a TCP reset, or ICMP "administratively prohibited". The client fails at once.
    Reject,
    /// Drop it silently: the client waits for its own timeout.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compatibility {
    Hard,
    BestEffort,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Landlock {
    pub compatibility: Compatibility,
    /// TCP ports the jail may bind/connect. `None` leaves TCP ports unrestricted by landlock
    /// (the network namespace still applies); an empty list forbids all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_bind: Option<Vec<u16>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_connect: Option<Vec<u16>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompAction {
    Errno,
    Kill,
    Log,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Seccomp {
    pub default_action: SeccompAction,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// Address families socket(2)/socketpair(2) may use: unix, inet, inet6, netlink.
    pub socket_families: Vec<String>,
    /// `allow` minus `deny`, resolved when the policy was read: what the filter admits.
    #[serde(skip)]
    pub allowed: super::syscalls::Allowlist,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capabilities {
    /// As written (`SYS_ADMIN` or `CAP_SYS_ADMIN`).
    pub keep: Vec<String>,
    /// The same, resolved when the policy was read.
    #[serde(skip)]
    pub set: CapSet,
}

/// A `capabilities.keep` name that is no capability.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability `{0}`")]
pub struct UnknownCapability(pub String);

/// A set of capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSet(u64);

impl CapSet {
    /// A capability by name, with or without the `CAP_` prefix, any case.
    pub fn parse_name(name: &str) -> Result<caps::Capability, UnknownCapability> {
        let n = name.to_ascii_uppercase();
        let n = if n.starts_with("CAP_") { n } else { format!("CAP_{n}") };
        n.parse::<caps::Capability>().map_err(|_| UnknownCapability(name.to_owned()))
    }

    pub fn insert(&mut self, c: caps::Capability) {
        self.0 |= c.bitmask();
    }

    pub fn mask(self) -> u64 {
        self.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = caps::Capability> {
        caps::all().into_iter().filter(move |c| self.0 & c.bitmask() != 0)
    }
}

/// Socket families a policy may name, with their numbers.
pub const SOCKET_FAMILIES: &[(&str, u64)] = &[
    ("unix", libc::AF_UNIX as u64),
    ("inet", libc::AF_INET as u64),
    ("inet6", libc::AF_INET6 as u64),
    ("netlink", libc::AF_NETLINK as u64),
];

/// Environment names that look like credentials: never passed into a jail unless the policy
/// names them in `env.allow_secrets`.
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    n.starts_with("ANTHROPIC_")
        || n.starts_with("AWS_")
        || n.ends_with("_KEY")
        || n.ends_with("_TOKEN")
        || n.ends_with("_SECRET")
        || n.ends_with("_PASSWORD")
        || n.ends_with("_CREDENTIALS")
}

/// How the agent's file tools treat paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Tools {
    /// Refuse paths that resolve outside /workspace, exactly as the official runner does. Off by
    /// default: the jail's mounts and landlock rules are the boundary, so /tmp and
    /// /mnt/session/outputs work.
    pub confine_paths: bool,
    /// The session's memory store folders, bound in by `stockade session --memory` (never read
    /// from a policy file): the file tools may reach them, refuse writes into read-only ones, and
    /// leave writes into the others to the worker, which saves them to the store first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<MemoryMount>,
}

/// A memory store's folder in the jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryMount {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The smallest `limits.workspace_size` / `limits.outputs_size`: room for a filesystem's own
/// bookkeeping and some data.
pub const MIN_DISK_SIZE: u64 = 16 << 20;

/// The audit trail of a session (`[trail]`): what the worker records of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trail {
    /// Record every program executed in the jail (a seccomp user notification on execve and
    /// execveat, answered by the supervisor).
    pub exec: bool,
    /// Bytes of an exec's argv recorded; the rest is cut and the record marked.
    pub argv_max: u64,
    /// Bytes of a tool call's input recorded (each string is cut to fit).
    pub input_max: u64,
    /// The most one session's trail may hold.
    pub max_size: Size,
    /// The most the jail's own records (execs, egress) may add to the trail per second; none is
    /// no bound. Past it an exec waits for its record, and egress records are counted instead.
    #[serde(serialize_with = "size_or_none")]
    pub max_rate: Option<Size>,
    pub on_full: OnFull,
    /// Regular expressions whose matches never reach the trail.
    pub redact: Vec<String>,
    /// Where trail records are sent besides the trail file: "stdout", "syslog", or an OTLP/HTTP
    /// logs endpoint (`http://HOST:4318/v1/logs`).
    pub ship: Vec<String>,
}

/// What a full trail does (`trail.on_full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Mark the trail truncated and record nothing more; the session goes on.
    Truncate,
    /// Fail closed: no more programs start and tool calls are refused.
    Fail,
}

/// How long something a session leaves behind is kept (`[retention]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Deleted when the session ends.
    SessionEnd,
    /// Deleted this long after the session ended.
    For(Duration),
    /// Never deleted by Stockade.
    Forever,
}

impl Serialize for Keep {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Keep::SessionEnd => s.serialize_str("session_end"),
            Keep::For(d) => s.serialize_str(&format_duration(*d)),
            Keep::Forever => s.serialize_str("keep"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Retention {
    pub outputs: Keep,
    pub workspaces: Keep,
    pub trails: Keep,
}

/// Preparing a session's workspace from its metadata, before the agent's first tool call
/// (`[provision]`). Metadata only chooses among what is declared here.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Provision {
    /// Metadata key whose value is a git repository URL to clone into /workspace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_url_key: Option<String>,
    /// Metadata key whose value is the branch or tag to check out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_ref_key: Option<String>,
    /// URL prefixes a repository URL must start with.
    pub git_allow: Vec<String>,
    /// Metadata key whose value names one of `copy_from`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_key: Option<String>,
    /// Host directories a session may have copied into its workspace, by name.
    pub copy_from: BTreeMap<String, PathBuf>,
    /// Egress of the provisioning jail (same forms as `network.allow` / `network.allow_domains`).
    pub allow: Vec<String>,
    pub allow_domains: Vec<String>,
    /// Git credentials for the provisioning jail only: a file in git-credential-store format,
    /// or `credential:NAME` for a systemd credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    pub timeout: Dur,
}
