//! Step 7: landlock, the second filesystem layer behind the mount namespace.
//!
//! Rules are expressed in jail paths (they are applied after pivot_root). Stockade handles every
//! filesystem right up to ABI 6 plus the abstract-unix-socket and signal scopes, and TCP rights
//! when the policy lists ports. With `compatibility = "hard"` a kernel lacking any of that is an
//! error; with `"best_effort"` the missing parts are dropped and reported.

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use std::path::PathBuf;

use super::error::{JailError, Step};
use super::mounts::{OUTPUTS, WORKSPACE};
use crate::policy::{Access as WsAccess, Compatibility, Policy, SysMode};

/// The ABI whose rights Stockade asks for: 6 brings the IPC scopes.
pub(crate) const TARGET_ABI: i32 = 6;

/// Environment variable that caps the landlock ABI Stockade uses below what the kernel offers,
/// to check how a policy behaves on an older kernel. It can only lower protection, never raise
/// it, and `hard` policies refuse to run under a cap that drops anything they need.
pub(crate) const ABI_CAP_ENV: &str = "STOCKADE_LANDLOCK_ABI_CAP";

/// The ABI Stockade will use: the kernel's, lowered by `STOCKADE_LANDLOCK_ABI_CAP` if set.
pub(crate) fn effective_abi() -> i32 {
    let k = kernel_abi();
    match std::env::var(ABI_CAP_ENV).ok().and_then(|v| v.parse::<i32>().ok()) {
        Some(cap) => k.min(cap.max(0)),
        None => k,
    }
}

/// The running kernel's landlock ABI version (0 when landlock is unavailable or disabled).
pub(crate) fn kernel_abi() -> i32 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with a NULL attribute and size 0 only queries the
    // ABI version; no memory is read or written.
    let v = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32 /* VERSION */)
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

/// The ABI a policy needs, and what is missing from a kernel with `abi`.
pub(crate) fn requirements(policy: &Policy) -> i32 {
    let net = policy.landlock.tcp_bind.is_some() || policy.landlock.tcp_connect.is_some();
    let _ = net; // TCP rules need ABI 4, which the scopes' ABI 6 already implies.
    TARGET_ABI
}

pub(crate) fn missing_features(abi: i32, policy: &Policy) -> Vec<&'static str> {
    let net = policy.landlock.tcp_bind.is_some() || policy.landlock.tcp_connect.is_some();
    let mut m = Vec::new();
    if abi < 1 {
        m.push("landlock itself");
        return m;
    }
    if abi < 2 {
        m.push("refer (cross-directory rename control, ABI 2)");
    }
    if abi < 3 {
        m.push("truncate (ABI 3)");
    }
    if abi < 4 && net {
        m.push("TCP bind/connect rules (ABI 4)");
    }
    if abi < 5 {
        m.push("ioctl on devices (ABI 5)");
    }
    if abi < 6 {
        m.push("abstract unix socket and signal scopes (ABI 6)");
    }
    m
}

/// A path rule: jail path and whether it is writable / executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathRule {
    pub path: PathBuf,
    pub kind: RuleKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RuleKind {
    /// Read and list.
    Read,
    /// Read, list and execute.
    ReadExec,
    /// Everything but creating device nodes.
    ReadWrite,
    /// Read, write and ioctl on existing device files.
    Device,
    /// List the directory only.
    ListOnly,
}

/// The path rules a policy implies, in jail paths.
pub(crate) fn path_rules(p: &Policy) -> Vec<PathRule> {
    let mut rules = vec![
        PathRule { path: "/".into(), kind: RuleKind::ListOnly },
        PathRule { path: "/etc".into(), kind: RuleKind::Read },
        PathRule { path: "/proc".into(), kind: RuleKind::Read },
        PathRule { path: "/dev".into(), kind: RuleKind::Device },
        PathRule { path: "/tmp".into(), kind: RuleKind::ReadWrite },
        PathRule { path: "/dev/shm".into(), kind: RuleKind::ReadWrite },
        PathRule {
            path: WORKSPACE.into(),
            kind: if p.filesystem.workspace == WsAccess::ReadOnly { RuleKind::ReadExec } else { RuleKind::ReadWrite },
        },
        PathRule { path: OUTPUTS.into(), kind: RuleKind::ReadWrite },
    ];
    if p.filesystem.sys == SysMode::ReadOnly {
        rules.push(PathRule { path: "/sys".into(), kind: RuleKind::Read });
    }
    for b in &p.filesystem.read_only {
        rules.push(PathRule { path: b.dst.clone(), kind: RuleKind::ReadExec });
    }
    for b in &p.filesystem.read_write {
        rules.push(PathRule { path: b.dst.clone(), kind: RuleKind::ReadWrite });
    }
    rules
}

fn access_for(kind: RuleKind, abi: ABI) -> BitFlags<AccessFs> {
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    match kind {
        RuleKind::ListOnly => AccessFs::ReadDir.into(),
        RuleKind::Read => read,
        RuleKind::ReadExec => read | AccessFs::Execute,
        RuleKind::ReadWrite => AccessFs::from_all(abi) & !(AccessFs::MakeChar | AccessFs::MakeBlock),
        RuleKind::Device => read | AccessFs::WriteFile | AccessFs::IoctlDev | AccessFs::Truncate,
    }
}

/// Restricts the calling process as the policy's landlock section says (the supervisor reported
/// what this kernel cannot enforce before the clone: see `missing_features`).
pub(crate) fn apply(p: &Policy) -> Result<(), JailError> {
    let kabi = effective_abi();
    let dropped = missing_features(kabi, p);
    let hard = p.landlock.compatibility == Compatibility::Hard;
    if hard && !dropped.is_empty() {
        return Err(JailError::new(
            Step::Landlock,
            format!(
                "kernel ABI {kabi} < required {}: missing {} (set landlock.compatibility = \"best_effort\" to run without)",
                requirements(p),
                dropped.join(", ")
            ),
        ));
    }
    let level = if hard { CompatLevel::HardRequirement } else { CompatLevel::BestEffort };
    let abi = ABI::V6;
    let err = |what: &str, e: &dyn std::fmt::Display| JailError::new(Step::Landlock, format!("{what}: {e}"));

    let mut ruleset = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err("handle filesystem rights", &e))?;
    if kabi >= 6 {
        ruleset = ruleset.scope(Scope::AbstractUnixSocket | Scope::Signal).map_err(|e| err("scopes", &e))?;
    }
    let net_rules = kabi >= 4 && (p.landlock.tcp_bind.is_some() || p.landlock.tcp_connect.is_some());
    if net_rules {
        let mut handled = BitFlags::<AccessNet>::empty();
        if p.landlock.tcp_bind.is_some() {
            handled |= AccessNet::BindTcp;
        }
        if p.landlock.tcp_connect.is_some() {
            handled |= AccessNet::ConnectTcp;
        }
        ruleset = ruleset.handle_access(handled).map_err(|e| err("handle TCP rights", &e))?;
    }
    let mut created = ruleset.create().map_err(|e| err("create ruleset", &e))?;

    for rule in path_rules(p) {
        use nix::fcntl::OFlag;
        let open = |flags| super::fsio::open(&rule.path, OFlag::O_PATH | flags, nix::sys::stat::Mode::empty());
        // Nearly every rule names a directory: O_DIRECTORY tells with the open itself, where a
        // stat first would be a call more per rule.
        let (fd, is_dir) = match open(OFlag::O_DIRECTORY) {
            Ok(fd) => (fd, true),
            Err(nix::errno::Errno::ENOTDIR) => match open(OFlag::empty()) {
                Ok(fd) => (fd, false),
                Err(_) => continue,
            },
            // An optional bind that the host lacked: nothing is there to grant access to.
            Err(_) => continue,
        };
        let mut access = access_for(rule.kind, abi);
        if !is_dir {
            access &= AccessFs::from_file(abi);
        }
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| err(&format!("rule {}", rule.path.display()), &e))?;
    }
    for port in p.landlock.tcp_bind.iter().flatten() {
        created = created.add_rule(NetPort::new(*port, AccessNet::BindTcp)).map_err(|e| err("tcp_bind rule", &e))?;
    }
    for port in p.landlock.tcp_connect.iter().flatten() {
        created =
            created.add_rule(NetPort::new(*port, AccessNet::ConnectTcp)).map_err(|e| err("tcp_connect rule", &e))?;
    }
    let status = created.restrict_self().map_err(|e| err("restrict_self", &e))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => {}
        RulesetStatus::PartiallyEnforced if !hard => {}
        RulesetStatus::NotEnforced if !hard && kabi == 0 => {}
        other => {
            return Err(JailError::new(Step::Landlock, format!("ruleset {other:?} on kernel ABI {kabi}")));
        }
    }
    Ok(())
}
