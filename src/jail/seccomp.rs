//! Step 8: the seccomp allowlist.
//!
//! One filter, in this order:
//! * an architecture check that kills any call made through a foreign ABI (`int 0x80` arrives
//!   as AUDIT_ARCH_I386);
//! * a refusal of x32 calls (same arch value, syscall numbers with bit 30 set), even under
//!   `default_action = "log"`;
//! * the allowlist from the policy's groups, dispatched by a binary search (`bpf`), with the
//!   argument conditions compiled by seccompiler;
//! * clone3 answers ENOSYS: its flags live in memory that seccomp cannot inspect, and ENOSYS
//!   makes libc fall back to clone, whose flags the filter does check.

use super::bpf::{self, Verdict};
use super::error::{JailError, Step};
use crate::policy::syscalls::{self, Allowlist, ArgCond};
use crate::policy::{Seccomp, SeccompAction, SOCKET_FAMILIES};
use seccompiler::{BpfProgram, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule};

const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;
const PER_LINUX: u64 = 0;
const PER_LINUX32: u64 = 0x0008;
const UNAME26: u64 = 0x0002_0000;
const PERSONALITY_QUERY: u64 = 0xffff_ffff;
/// The bits no file made or changed in a jail may carry.
const SETID: u64 = (libc::S_ISUID | libc::S_ISGID) as u64;
/// What makes open(2) create a file: O_CREAT, or O_TMPFILE's own bit (O_TMPFILE includes
/// O_DIRECTORY, which plain opens use too).
const CREATES: u64 = (libc::O_CREAT | (libc::O_TMPFILE & !libc::O_DIRECTORY)) as u64;
const NETLINK_ROUTE: u64 = 0;

pub(crate) struct Filters {
    pub program: BpfProgram,
    /// What the allowlist admits.
    pub allowed: Allowlist,
}

#[cfg(target_arch = "x86_64")]
const ARCH: (seccompiler::TargetArch, u32) =
    (seccompiler::TargetArch::x86_64, 0xC000_003E /* AUDIT_ARCH_X86_64 */);
#[cfg(target_arch = "aarch64")]
const ARCH: (seccompiler::TargetArch, u32) =
    (seccompiler::TargetArch::aarch64, 0xC000_00B7 /* AUDIT_ARCH_AARCH64 */);

/// Which stream sockets the filter admits besides TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamProtocols {
    /// Any protocol of an allowed family.
    Any,
    /// No MPTCP or SCTP socket: landlock's port rules govern TCP only, and these would bind,
    /// listen and connect past them.
    TcpOnly,
}

/// `IPPROTO_MPTCP` and `IPPROTO_SCTP`.
const IPPROTO_MPTCP: u64 = 262;
const IPPROTO_SCTP: u64 = 132;

impl StreamProtocols {
    /// `TcpOnly` whenever the policy sets landlock TCP port rules.
    pub(crate) fn for_policy(p: &crate::policy::Policy) -> StreamProtocols {
        if p.landlock.tcp_bind.is_some() || p.landlock.tcp_connect.is_some() {
            StreamProtocols::TcpOnly
        } else {
            StreamProtocols::Any
        }
    }
}

pub(crate) fn compile(p: &Seccomp, streams: StreamProtocols) -> Result<Filters, JailError> {
    let err = |what: &str, e: &dyn std::fmt::Display| JailError::new(Step::Seccomp, format!("{what}: {e}"));
    if syscalls::native_table().is_empty() {
        return Err(JailError::new(
            Step::Seccomp,
            "no syscall table for this architecture; refusing to run unfiltered",
        ));
    }
    let allowed = p.allowed.clone();
    let families: Vec<u64> = p
        .socket_families
        .iter()
        .filter_map(|f| SOCKET_FAMILIES.iter().find(|(n, _)| n == f).map(|(_, v)| *v))
        .collect();

    let mut dispatch: Vec<(u32, Verdict)> = Vec::with_capacity(allowed.len());
    for (nr, a) in allowed.iter() {
        let verdict = match &a.conds {
            None if a.name == "clone3" => Verdict::Return(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
            None => Verdict::Allow,
            Some(conds) => {
                let mut v = Vec::new();
                for c in conds {
                    for rule in rules_for(*c, a.name, &families, streams).map_err(|e| err(a.name, &e))? {
                        v.push(BpfProgram::from(rule));
                    }
                }
                Verdict::Rules(v)
            }
        };
        dispatch.push((nr, verdict));
    }
    let default = match p.default_action {
        SeccompAction::Errno => libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        SeccompAction::Kill => libc::SECCOMP_RET_KILL_PROCESS,
        SeccompAction::Log => libc::SECCOMP_RET_LOG,
    };
    // x32 calls reach a different syscall table: refused even when the default only logs.
    let x32 = if p.default_action == SeccompAction::Kill {
        libc::SECCOMP_RET_KILL_PROCESS
    } else {
        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32
    };
    let program = bpf::build(ARCH.1, x32, default, &dispatch);
    if program.len() >= 4096 {
        return Err(JailError::new(Step::Seccomp, format!("filter has {} instructions (limit 4096)", program.len())));
    }
    Ok(Filters { program, allowed })
}

fn cond(arg: u8, len: Len, op: Op, v: u64) -> Result<Cond, seccompiler::BackendError> {
    Cond::new(arg, len, op, v)
}

/// The seccompiler rules (OR-ed) that admit a call under one argument condition.
fn rules_for(
    c: ArgCond,
    name: &str,
    families: &[u64],
    streams: StreamProtocols,
) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let one = |conds: Vec<Cond>| SeccompRule::new(conds);
    Ok(match c {
        ArgCond::NoNamespaceFlags => vec![one(vec![cond(0, Len::Qword, Op::MaskedEq(CLONE_NAMESPACE_FLAGS), 0)?])?],
        // The ioctl numbers are u64 in glibc's libc bindings and i32 in musl's.
        #[allow(clippy::unnecessary_cast)]
        ArgCond::NoTtyInjection => vec![one(vec![
            cond(1, Len::Dword, Op::Ne, libc::TIOCSTI as u64)?,
            cond(1, Len::Dword, Op::Ne, libc::TIOCLINUX as u64)?,
        ])?],
        ArgCond::SafePersonality => [PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32 | UNAME26, PERSONALITY_QUERY]
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
                    let inet = f == libc::AF_INET as u64 || f == libc::AF_INET6 as u64;
                    for t in [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET] {
                        let mut conds =
                            vec![cond(0, Len::Dword, Op::Eq, f)?, cond(1, Len::Dword, Op::MaskedEq(0xf), t as u64)?];
                        if inet && streams == StreamProtocols::TcpOnly && name == "socket" {
                            conds.push(cond(2, Len::Dword, Op::Ne, IPPROTO_MPTCP)?);
                            conds.push(cond(2, Len::Dword, Op::Ne, IPPROTO_SCTP)?);
                        }
                        v.push(one(conds)?);
                    }
                }
            }
            v
        }
        ArgCond::NoDeviceNodes { mode_arg } => [0, libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK]
            .into_iter()
            .map(|t| one(vec![cond(mode_arg, Len::Dword, Op::MaskedEq(libc::S_IFMT as u64 | SETID), t as u64)?]))
            .collect::<Result<_, _>>()?,
        ArgCond::NoSetIdMode { mode_arg } => vec![one(vec![cond(mode_arg, Len::Dword, Op::MaskedEq(SETID), 0)?])?],
        ArgCond::NoSetIdCreate { flags_arg, mode_arg } => vec![
            one(vec![cond(flags_arg, Len::Dword, Op::MaskedEq(CREATES), 0)?])?,
            one(vec![cond(mode_arg, Len::Dword, Op::MaskedEq(SETID), 0)?])?,
        ],
    })
}

/// Installs the filter on the calling thread. no_new_privs must already be set.
pub(crate) fn install(program: &[seccompiler::sock_filter]) -> Result<(), JailError> {
    seccompiler::apply_filter(program).map_err(|e| JailError::new(Step::Seccomp, format!("install filter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn allowed_set(p: &Seccomp) -> Result<BTreeMap<&'static str, Option<std::collections::BTreeSet<ArgCond>>>, String> {
        Ok(syscalls::by_name(&p.allowed))
    }

    fn policy_text(text: &str) -> crate::policy::Policy {
        crate::policy::load_str("test.toml", text, None).unwrap().0
    }
    use crate::policy::load_builtin;

    /// The kernel refuses a filter with any jump that leaves the program, reachable or not.
    #[test]
    fn every_jump_of_every_shipped_policy_lands_inside_the_program() {
        for name in ["default", "strict", "ci"] {
            let (p, _) = load_builtin(name).unwrap();
            let prog = compile(&p.seccomp, StreamProtocols::Any).unwrap().program;
            let n = prog.len();
            for (i, ins) in prog.iter().enumerate() {
                if ins.code & 0x07 != 0x05 {
                    continue; // not a jump
                }
                let targets: Vec<usize> = if ins.code & 0xf0 == 0x00 {
                    vec![i + 1 + ins.k as usize]
                } else {
                    vec![i + 1 + ins.jt as usize, i + 1 + ins.jf as usize]
                };
                assert!(targets.iter().all(|t| *t < n), "{name}: jump at {i} of {n} to {targets:?}");
            }
            assert_eq!(prog[n - 1].code, 0x06, "{name}: the program must end with a return");
        }
    }

    #[test]
    fn default_policy_compiles_within_bpf_limits() {
        let (p, _) = load_builtin("default").unwrap();
        let f = compile(&p.seccomp, StreamProtocols::Any).unwrap();
        // A fraction of seccompiler's linear layout (~1,600 instructions for this policy): one
        // test per run of syscall numbers with the same verdict (272 here).
        assert!(f.program.len() < 400, "{} instructions", f.program.len());
        assert!(f.allowed.unconditional("read"));
        assert_eq!(f.allowed.get("clone").unwrap().conds, Some(vec![ArgCond::NoNamespaceFlags]));
        assert_eq!(f.allowed.len(), allowed_set(&p.seccomp).unwrap().len());
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
            assert!(f.allowed.get(banned).is_none(), "{banned} allowed by default");
        }
    }

    #[test]
    fn namespaces_group_lifts_clone_condition_and_deny_wins() {
        let p =
            policy_text("extends = \"default\"\n[seccomp]\nallow_add = [\"@namespaces\"]\ndeny_add = [\"setns\"]\n");
        let set = allowed_set(&p.seccomp).unwrap();
        assert_eq!(set["clone"], None);
        assert_eq!(set["unshare"], None);
        assert!(!set.contains_key("setns"));
    }

    /// seccompiler's own linear layout of the same allowlist plus the old two-filter prelude,
    /// combined with the kernel's precedence rule: the filter installed last is evaluated first
    /// and keeps its answer unless the other's action is more restrictive.
    fn reference_linear(p: &Seccomp) -> BpfProgram {
        use seccompiler::{SeccompAction as A, SeccompFilter};
        let allowed = allowed_set(p).unwrap();
        let families: Vec<u64> = p
            .socket_families
            .iter()
            .filter_map(|f| SOCKET_FAMILIES.iter().find(|(n, _)| n == f).map(|(_, v)| *v))
            .collect();
        let mut rules = BTreeMap::new();
        for (name, conds) in &allowed {
            let list = match conds {
                None => Vec::new(),
                Some(set) => {
                    set.iter().flat_map(|c| rules_for(*c, name, &families, StreamProtocols::Any).unwrap()).collect()
                }
            };
            rules.insert(syscalls::number(name).unwrap(), list);
        }
        let mismatch = match p.default_action {
            SeccompAction::Errno => A::Errno(libc::EPERM as u32),
            SeccompAction::Kill => A::KillProcess,
            SeccompAction::Log => A::Log,
        };
        SeccompFilter::new(rules, mismatch, A::Allow, ARCH.0).unwrap().try_into().unwrap()
    }

    fn reference(p: &Seccomp, linear: &[seccompiler::sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let x32 = if p.default_action == SeccompAction::Kill {
            libc::SECCOMP_RET_KILL_PROCESS
        } else {
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32
        };
        let first = if arch != ARCH.1 {
            libc::SECCOMP_RET_KILL_PROCESS
        } else if nr >= 0x4000_0000 {
            x32
        } else if nr == syscalls::number("clone3").unwrap() as u32 {
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        } else {
            libc::SECCOMP_RET_ALLOW
        };
        let second = bpf::run(linear, nr, arch, args);
        let action = |r: u32| (r & libc::SECCOMP_RET_ACTION_FULL) as i32;
        if action(second) < action(first) {
            second
        } else {
            first
        }
    }

    #[test]
    // The ioctl numbers are u64 in glibc's libc bindings and i32 in musl's.
    #[allow(clippy::unnecessary_cast)]
    fn tree_layout_matches_seccompilers_linear_filter_for_every_syscall() {
        let mut policies = Vec::new();
        for name in ["default", "strict", "ci"] {
            policies.push(load_builtin(name).unwrap().0.seccomp);
        }
        let p = policy_text(
            "extends = \"default\"\n[seccomp]\nallow = [\"@basic-io\", \"@namespaces\", \"ptrace\"]\n\
             default_action = \"log\"\nsocket_families_add = [\"netlink\"]\n",
        );
        policies.push(p.seccomp);

        let args_samples: Vec<[u64; 6]> = {
            let interesting = [
                0u64,
                libc::SIGCHLD as u64,
                (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64,
                (libc::CLONE_VM | libc::CLONE_THREAD) as u64,
                libc::CLONE_NEWNET as u64 | (1 << 40),
                libc::TIOCSTI as u64,
                libc::TIOCLINUX as u64,
                libc::TCGETS as u64,
                libc::TIOCSTI as u64 | (1 << 32),
                libc::AF_INET as u64,
                libc::AF_PACKET as u64,
                libc::AF_NETLINK as u64,
                libc::SOCK_RAW as u64,
                (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64,
                (libc::S_IFCHR | 0o600) as u64,
                (libc::S_IFIFO | 0o600) as u64,
                0x0040_0000,
                0xffff_ffff,
                u64::MAX,
            ];
            let mut v = Vec::new();
            for a in interesting {
                for b in interesting {
                    v.push([a, b, a, 0, 0, 0]);
                    v.push([a, a, b, 0, 0, 0]);
                }
            }
            v
        };
        for sc in &policies {
            let program = compile(sc, StreamProtocols::Any).unwrap().program;
            let linear = reference_linear(sc);
            for nr in (0..520u32).chain([0x4000_0000 + 39, 0x4000_0000 + 16, u32::MAX]) {
                let conditional = matches!(
                    syscalls::native_table().iter().find(|(_, n)| *n == nr as i64).map(|(n, _)| *n),
                    Some("clone" | "ioctl" | "socket" | "socketpair" | "personality" | "mknod" | "mknodat")
                );
                let samples: &[[u64; 6]] = if conditional { &args_samples } else { &args_samples[..3] };
                for args in samples {
                    for arch in [ARCH.1, 0x4000_0003 /* AUDIT_ARCH_I386 */] {
                        assert_eq!(
                            bpf::run(&program, nr, arch, *args),
                            reference(sc, &linear, nr, arch, *args),
                            "nr {nr} arch {arch:#x} args {args:x?} policy {:?}",
                            sc.allow
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn with_tcp_only_mptcp_and_sctp_sockets_get_the_default_action() {
        let p = crate::policy::load_builtin("default").unwrap().0;
        let nr = syscalls::number("socket").unwrap() as u32;
        let call = |program: &[seccompiler::sock_filter], family: i32, kind: i32, proto: u64| {
            bpf::run(program, nr, ARCH.1, [family as u64, kind as u64, proto, 0, 0, 0])
        };
        let any = compile(&p.seccomp, StreamProtocols::Any).unwrap().program;
        let tcp = compile(&p.seccomp, StreamProtocols::TcpOnly).unwrap().program;
        let denied = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        for family in [libc::AF_INET, libc::AF_INET6] {
            assert_eq!(call(&any, family, libc::SOCK_STREAM, IPPROTO_MPTCP), libc::SECCOMP_RET_ALLOW);
            assert_eq!(call(&tcp, family, libc::SOCK_STREAM, IPPROTO_MPTCP), denied);
            assert_eq!(call(&tcp, family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, IPPROTO_MPTCP), denied);
            assert_eq!(call(&tcp, family, libc::SOCK_SEQPACKET, IPPROTO_SCTP), denied);
            assert_eq!(call(&tcp, family, libc::SOCK_STREAM, IPPROTO_SCTP), denied);
            // TCP itself, by default protocol or by name, and UDP stay.
            assert_eq!(call(&tcp, family, libc::SOCK_STREAM, 0), libc::SECCOMP_RET_ALLOW);
            assert_eq!(call(&tcp, family, libc::SOCK_STREAM, libc::IPPROTO_TCP as u64), libc::SECCOMP_RET_ALLOW);
            assert_eq!(call(&tcp, family, libc::SOCK_DGRAM, 0), libc::SECCOMP_RET_ALLOW);
        }
        // A unix socket's protocol is not looked at.
        assert_eq!(call(&tcp, libc::AF_UNIX, libc::SOCK_STREAM, 0), libc::SECCOMP_RET_ALLOW);
    }
}
