//! Step 8: the seccomp allowlist.
//!
//! Two filters are installed; the kernel runs both and the most restrictive answer wins.
//! * The allowlist, compiled by seccompiler from the policy's groups. Its architecture check
//!   kills any call made through a foreign ABI (`int 0x80` arrives as AUDIT_ARCH_I386).
//! * A four-instruction prelude that refuses x32 calls (same arch value, syscall numbers with
//!   bit 30 set) even under `default_action = "log"`, and answers clone3 with ENOSYS: clone3's
//!   flags live in memory that seccomp cannot inspect, and ENOSYS makes libc fall back to clone,
//!   whose flags the allowlist does check.

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction as Action, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::{BTreeMap, BTreeSet};

use super::error::{JailError, Step};
use crate::policy::syscalls::{self, ArgCond};
use crate::policy::{Seccomp, SeccompAction, SOCKET_FAMILIES};

const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const PER_LINUX: u64 = 0;
const READ_IMPLIES_EXEC: u64 = 0x0040_0000;
const PERSONALITY_QUERY: u64 = 0xffff_ffff;
const NETLINK_ROUTE: u64 = 0;

pub struct Filters {
    pub allowlist: BpfProgram,
    pub prelude: BpfProgram,
    /// Syscall names the allowlist admits (some under argument conditions).
    pub allowed: BTreeMap<&'static str, Option<BTreeSet<ArgCond>>>,
}

#[cfg(target_arch = "x86_64")]
const ARCH: (TargetArch, u32) = (TargetArch::x86_64, 0xC000_003E /* AUDIT_ARCH_X86_64 */);
#[cfg(target_arch = "aarch64")]
const ARCH: (TargetArch, u32) = (TargetArch::aarch64, 0xC000_00B7 /* AUDIT_ARCH_AARCH64 */);

/// Which syscalls a policy admits, and under which conditions (`None` = unconditionally).
pub fn allowed_set(p: &Seccomp) -> Result<BTreeMap<&'static str, Option<BTreeSet<ArgCond>>>, JailError> {
    let bad = |m: String| JailError::new(Step::Seccomp, m);
    let mut allowed: BTreeMap<&'static str, Option<BTreeSet<ArgCond>>> = BTreeMap::new();
    for entry in &p.allow {
        for m in syscalls::resolve_entry(entry).map_err(bad)? {
            match (allowed.get_mut(m.name), m.cond) {
                (Some(slot), Some(c)) => {
                    if let Some(set) = slot {
                        set.insert(c);
                    }
                }
                (Some(slot), None) => *slot = None,
                (None, Some(c)) => {
                    allowed.insert(m.name, Some(BTreeSet::from([c])));
                }
                (None, None) => {
                    allowed.insert(m.name, None);
                }
            }
        }
    }
    for entry in &p.deny {
        for m in syscalls::resolve_entry(entry).map_err(bad)? {
            allowed.remove(m.name);
        }
    }
    // clone3 always reaches the prelude's ENOSYS when clone is allowed, whatever the default
    // action: a kill here would take down every program whose libc tries clone3 first.
    if allowed.contains_key("clone") {
        allowed.insert("clone3", None);
    }
    Ok(allowed)
}

pub fn compile(p: &Seccomp) -> Result<Filters, JailError> {
    let err = |what: &str, e: &dyn std::fmt::Display| JailError::new(Step::Seccomp, format!("{what}: {e}"));
    if syscalls::native_table().is_empty() {
        return Err(JailError::new(
            Step::Seccomp,
            "no syscall table for this architecture; refusing to run unfiltered",
        ));
    }
    let allowed = allowed_set(p)?;
    let families: Vec<u64> = p
        .socket_families
        .iter()
        .filter_map(|f| SOCKET_FAMILIES.iter().find(|(n, _)| n == f).map(|(_, v)| *v))
        .collect();

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (name, conds) in &allowed {
        let nr =
            syscalls::number(name).ok_or_else(|| JailError::new(Step::Seccomp, format!("unknown syscall {name}")))?;
        let list = match conds {
            None => Vec::new(),
            Some(set) => {
                let mut v = Vec::new();
                for c in set {
                    v.extend(rules_for(*c, name, &families).map_err(|e| err(name, &e))?);
                }
                v
            }
        };
        rules.insert(nr, list);
    }
    let mismatch = match p.default_action {
        SeccompAction::Errno => Action::Errno(libc::EPERM as u32),
        SeccompAction::Kill => Action::KillProcess,
        SeccompAction::Log => Action::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, Action::Allow, ARCH.0).map_err(|e| err("build filter", &e))?;
    let allowlist: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| err("compile filter", &e))?;
    let x32 = if p.default_action == SeccompAction::Kill {
        libc::SECCOMP_RET_KILL_PROCESS
    } else {
        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32
    };
    Ok(Filters { allowlist, prelude: prelude(x32), allowed })
}

fn cond(arg: u8, len: Len, op: Op, v: u64) -> Result<Cond, seccompiler::BackendError> {
    Cond::new(arg, len, op, v)
}

/// The seccompiler rules (OR-ed) that admit a call under one argument condition.
fn rules_for(c: ArgCond, name: &str, families: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let one = |conds: Vec<Cond>| SeccompRule::new(conds);
    Ok(match c {
        ArgCond::NoNamespaceFlags => vec![one(vec![cond(0, Len::Qword, Op::MaskedEq(CLONE_NAMESPACE_FLAGS), 0)?])?],
        ArgCond::NoTtyInjection => vec![one(vec![
            cond(1, Len::Dword, Op::Ne, libc::TIOCSTI as u64)?,
            cond(1, Len::Dword, Op::Ne, libc::TIOCLINUX as u64)?,
        ])?],
        ArgCond::SafePersonality => [PER_LINUX, READ_IMPLIES_EXEC, PERSONALITY_QUERY]
            .into_iter()
            .map(|v| one(vec![cond(0, Len::Dword, Op::Eq, v)?]))
            .collect::<Result<_, _>>()?,
        ArgCond::AllowedSocketFamily => {
            let mut v = Vec::new();
            for &f in families {
                if name == "socketpair" {
                    v.push(one(vec![cond(0, Len::Dword, Op::Eq, f)?])?);
                } else if f == libc::AF_NETLINK as u64 {
                    // Only the routing protocol (what getifaddrs/getaddrinfo need).
                    v.push(one(vec![cond(0, Len::Dword, Op::Eq, f)?, cond(2, Len::Dword, Op::Eq, NETLINK_ROUTE)?])?);
                } else {
                    // Stream, datagram and seqpacket only: never SOCK_RAW or SOCK_PACKET.
                    for t in [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET] {
                        v.push(one(vec![
                            cond(0, Len::Dword, Op::Eq, f)?,
                            cond(1, Len::Dword, Op::MaskedEq(0xf), t as u64)?,
                        ])?);
                    }
                }
            }
            v
        }
        ArgCond::NoDeviceNodes { mode_arg } => [0, libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK]
            .into_iter()
            .map(|t| one(vec![cond(mode_arg, Len::Dword, Op::MaskedEq(libc::S_IFMT as u64), t as u64)?]))
            .collect::<Result<_, _>>()?,
    })
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}
fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// arch check, x32 rejection, clone3 → ENOSYS, otherwise allow (the allowlist decides).
fn prelude(x32_action: u32) -> BpfProgram {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let clone3 = syscalls::number("clone3").unwrap_or(435) as u32;
    vec![
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        jump(JEQ, ARCH.1, 1, 0),
        stmt(RET, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
        jump(JGE, X32_SYSCALL_BIT, 0, 1),
        stmt(RET, x32_action),
        jump(JEQ, clone3, 0, 1),
        stmt(RET, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        stmt(RET, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs both filters on the calling thread. no_new_privs must already be set.
pub fn install(f: &Filters) -> Result<(), JailError> {
    seccompiler::apply_filter(&f.allowlist)
        .map_err(|e| JailError::new(Step::Seccomp, format!("install allowlist: {e}")))?;
    seccompiler::apply_filter(&f.prelude).map_err(|e| JailError::new(Step::Seccomp, format!("install prelude: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_builtin;

    #[test]
    fn default_policy_compiles_within_bpf_limits() {
        let (p, _) = load_builtin("default").unwrap();
        let f = compile(&p.seccomp).unwrap();
        assert!(f.allowlist.len() < 4096, "{} instructions", f.allowlist.len());
        assert!(f.allowed.contains_key("read"));
        assert_eq!(f.allowed["clone"], Some(BTreeSet::from([ArgCond::NoNamespaceFlags])));
        for banned in [
            "mount",
            "unshare",
            "setns",
            "ptrace",
            "bpf",
            "io_uring_setup",
            "keyctl",
            "init_module",
            "open_by_handle_at",
            "pidfd_getfd",
            "userfaultfd",
            "perf_event_open",
        ] {
            assert!(!f.allowed.contains_key(banned), "{banned} allowed by default");
        }
    }

    #[test]
    fn namespaces_group_lifts_clone_condition_and_deny_wins() {
        let (mut p, _) = load_builtin("default").unwrap();
        p.seccomp.allow.push("@namespaces".into());
        p.seccomp.deny.push("setns".into());
        let set = allowed_set(&p.seccomp).unwrap();
        assert_eq!(set["clone"], None);
        assert_eq!(set["unshare"], None);
        assert!(!set.contains_key("setns"));
    }
}
