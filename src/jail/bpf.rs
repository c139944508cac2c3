//! Classic-BPF layout for the seccomp filter: a binary search over syscall numbers.
//!
//! seccompiler compiles the argument conditions of each syscall, but lays the syscalls out as
//! one linear chain (five instructions each, ~1,600 for `@system-service`). The kernel converts,
//! JITs and, to build its per-syscall action cache, emulates that chain once per syscall number
//! at install time (~1 ms), and walks it on every filtered call. Here the syscalls are dispatched
//! through a balanced tree of `JGE` tests over runs of numbers with the same verdict (an
//! allowlist is mostly such runs, and so are the gaps between them), so any call reaches its
//! verdict in about ten tests, and each test jumps straight to its halves or to the shared allow
//! and default returns, so the whole filter stays near 270 instructions; seccompiler's rule
//! programs are reused unchanged for the conditional syscalls.

use seccompiler::{sock_filter, BpfProgram};

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
/// Offsets of `nr` and `arch` in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

/// What a syscall number leads to.
#[derive(Debug, Clone)]
pub(crate) enum Verdict {
    Allow,
    /// A fixed return value (e.g. ERRNO|ENOSYS).
    Return(u32),
    /// seccompiler rule programs, OR-ed: any match allows, otherwise the default action.
    Rules(Vec<BpfProgram>),
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}
fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// An instruction list with forward jumps to labels, resolved at the end.
struct Builder {
    prog: Vec<sock_filter>,
    labels: Vec<Option<usize>>,
    /// `JA`s: (instruction, label).
    fixups: Vec<(usize, usize)>,
    /// Conditional jumps: (instruction, label if true, label if false).
    cond_fixups: Vec<(usize, usize, usize)>,
}

impl Builder {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn place(&mut self, l: usize) {
        self.labels[l] = Some(self.prog.len());
    }
    fn ja(&mut self, l: usize) {
        self.fixups.push((self.prog.len(), l));
        self.prog.push(stmt(JA, 0));
    }
    /// A `JGE` whose targets are set later (`cond_fixups[returned]`), once they are laid out.
    fn jge_pending(&mut self, k: u32) -> usize {
        self.cond_fixups.push((self.prog.len(), usize::MAX, usize::MAX));
        self.prog.push(jump(JGE, k, 0, 0));
        self.cond_fixups.len() - 1
    }
    /// `None` when a conditional jump's target is out of its 8-bit reach.
    fn finish(mut self) -> Option<BpfProgram> {
        // All jumps are forward: blocks and subtrees come after their references.
        let offset = |labels: &[Option<usize>], at: usize, l: usize| labels[l].expect("every label is placed") - at - 1;
        for (at, l) in self.fixups {
            self.prog[at].k = offset(&self.labels, at, l) as u32;
        }
        for (at, t, f) in self.cond_fixups {
            self.prog[at].jt = u8::try_from(offset(&self.labels, at, t)).ok()?;
            self.prog[at].jf = u8::try_from(offset(&self.labels, at, f)).ok()?;
        }
        Some(self.prog)
    }
}

/// Builds the whole filter: arch check, x32 refusal, dispatch, verdict blocks. `syscalls` is
/// sorted by number, each number once.
pub(crate) fn build(arch: u32, x32_action: u32, default_action: u32, syscalls: &[(u32, Verdict)]) -> BpfProgram {
    debug_assert!(syscalls.windows(2).all(|w| w[0].0 < w[1].0), "syscalls not sorted by number");
    // The kernel's work at install (convert, JIT, emulate for its action cache) grows with the
    // program: the compact tree first, the wide one when a jump of the compact one would not
    // reach (a filter several times the default policy's).
    layout(arch, x32_action, default_action, syscalls, true)
        .or_else(|| layout(arch, x32_action, default_action, syscalls, false))
        .expect("the wide layout's jumps all reach")
}

fn layout(
    arch: u32,
    x32_action: u32,
    default_action: u32,
    syscalls: &[(u32, Verdict)],
    compact: bool,
) -> Option<BpfProgram> {
    let mut b = Builder { prog: Vec::new(), labels: Vec::new(), fixups: Vec::new(), cond_fixups: Vec::new() };
    b.prog.push(stmt(LD_W_ABS, DATA_ARCH));
    b.prog.push(jump(JEQ, arch, 1, 0));
    b.prog.push(stmt(RET, libc::SECCOMP_RET_KILL_PROCESS));
    b.prog.push(stmt(LD_W_ABS, DATA_NR));
    b.prog.push(jump(JGE, 0x4000_0000, 0, 1)); // __X32_SYSCALL_BIT
    b.prog.push(stmt(RET, x32_action));

    let allow = b.label();
    let default = b.label();
    let mut targets: Vec<(u32, usize)> = Vec::new();
    let mut blocks: Vec<(usize, &Verdict)> = Vec::new();
    for (nr, v) in syscalls {
        let l = match v {
            Verdict::Allow => allow,
            other => {
                let l = b.label();
                blocks.push((l, other));
                l
            }
        };
        targets.push((*nr, l));
    }
    // Runs of consecutive numbers with one destination (the allowlist is mostly such runs, and
    // so are the gaps that fall to the default) become one interval each: the tree then has a
    // leaf per run, not per syscall, which is what the kernel converts, JITs and emulates.
    let mut runs: Vec<(u32, usize)> = Vec::new();
    let mut push = |start: u32, l: usize| {
        if runs.last().map(|r| r.1) != Some(l) {
            runs.push((start, l));
        }
    };
    let mut next = 0u32;
    for (nr, l) in targets {
        if nr > next {
            push(next, default);
        }
        push(nr, l);
        next = nr + 1;
    }
    push(next, default);
    match (compact, runs.as_slice()) {
        (true, [(_, only)]) => b.ja(*only),
        (true, _) => {
            compact_tree(&mut b, &runs, &|l| l == allow || l == default);
        }
        (false, _) => wide_tree(&mut b, &runs),
    }

    b.place(allow);
    b.prog.push(stmt(RET, libc::SECCOMP_RET_ALLOW));
    b.place(default);
    b.prog.push(stmt(RET, default_action));
    let rules_last = matches!(blocks.last(), Some((_, Verdict::Rules(_))));
    for (l, v) in blocks {
        b.place(l);
        match v {
            Verdict::Allow => unreachable!("allowed syscalls share one block"),
            Verdict::Return(r) => b.prog.push(stmt(RET, *r)),
            Verdict::Rules(rules) => {
                // The same shape seccompiler gives a syscall's chain: each rule program jumps
                // past its own trailing RET when it does not match.
                for r in rules {
                    b.prog.extend_from_slice(r);
                    b.prog.push(stmt(RET, libc::SECCOMP_RET_ALLOW));
                }
                b.prog.push(stmt(RET, default_action));
            }
        }
    }
    // A rule program from seccompiler starts with a trampoline (`JA 1; JA n`) whose far jump
    // aims one past the rule's own RET: dead code, but the kernel refuses any jump that leaves
    // the program, so when a rule block comes last there must be something there to land on.
    if rules_last {
        b.prog.push(stmt(RET, default_action));
    }
    b.finish()
}

/// Dispatch over `runs`, (first number, destination) sorted by number, each reaching to the
/// next one's start (the last to the end of the number space). Each test jumps straight to its
/// two halves: a half that is one run whose destination is `near` (the shared allow and
/// default returns right after the tree) costs no instruction at all, another single run a
/// `JA` to its block. Returns the label control enters this part of the tree at.
fn compact_tree(b: &mut Builder, runs: &[(u32, usize)], near: &dyn Fn(usize) -> bool) -> usize {
    if let [(_, dest)] = runs {
        if near(*dest) {
            return *dest;
        }
        let here = b.label();
        b.place(here);
        b.ja(*dest);
        return here;
    }
    let mid = runs.len() / 2;
    let here = b.label();
    b.place(here);
    let test = b.jge_pending(runs[mid].0);
    let left = compact_tree(b, &runs[..mid], near);
    let right = compact_tree(b, &runs[mid..], near);
    (b.cond_fixups[test].1, b.cond_fixups[test].2) = (right, left);
    here
}

/// The same dispatch with every branch a `JA` (no reach limit): `nr >= pivot` falls through to
/// the long jump into the right half, else skips it.
fn wide_tree(b: &mut Builder, runs: &[(u32, usize)]) {
    if runs.len() == 1 {
        b.ja(runs[0].1);
        return;
    }
    let mid = runs.len() / 2;
    let right = b.label();
    b.prog.push(jump(JGE, runs[mid].0, 0, 1));
    b.ja(right);
    wide_tree(b, &runs[..mid]);
    b.place(right);
    wide_tree(b, &runs[mid..]);
}

/// A classic-BPF interpreter for the instructions seccomp filters here use; for tests.
#[cfg(test)]
pub(crate) fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let (mut a, mut pc) = (0u32, 0usize);
    loop {
        let ins = &prog[pc];
        pc += 1;
        let (code, k) = (ins.code as u32, ins.k);
        match code {
            c if c == (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) => {
                a = u32::from_le_bytes(data[k as usize..k as usize + 4].try_into().unwrap())
            }
            c if c == (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) => a &= k,
            c if c == (libc::BPF_JMP | libc::BPF_JA) => pc += k as usize,
            c if c & 0x07 == libc::BPF_JMP => {
                let cond = match c & 0xf0 {
                    x if x == libc::BPF_JEQ => a == k,
                    x if x == libc::BPF_JGE => a >= k,
                    x if x == libc::BPF_JGT => a > k,
                    x if x == libc::BPF_JSET => a & k != 0,
                    other => panic!("unsupported jump {other:#x}"),
                };
                pc += if cond { ins.jt } else { ins.jf } as usize;
            }
            c if c == (libc::BPF_RET | libc::BPF_K) => return k,
            other => panic!("unsupported instruction {other:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARCH: u32 = 0xc000_003e;
    const DENY: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;

    /// Every number's verdict through the filter, against the list it was built from.
    fn check(syscalls: &[(u32, Verdict)], prog: &[sock_filter]) {
        for nr in (0..2100u32).chain([0x3fff_ffff, 0x4000_0001, u32::MAX]) {
            let want = match syscalls.iter().find(|(n, _)| *n == nr).map(|(_, v)| v) {
                _ if nr >= 0x4000_0000 => libc::SECCOMP_RET_KILL_PROCESS,
                Some(Verdict::Allow) => libc::SECCOMP_RET_ALLOW,
                Some(Verdict::Return(r)) => *r,
                Some(Verdict::Rules(_)) => unreachable!("no rules here"),
                None => DENY,
            };
            assert_eq!(run(prog, nr, ARCH, [0; 6]), want, "nr {nr}");
        }
        assert_eq!(run(prog, 0, 0x4000_0003, [0; 6]), libc::SECCOMP_RET_KILL_PROCESS, "another arch");
    }

    #[test]
    fn the_compact_tree_is_used_when_it_reaches_and_the_wide_one_otherwise() {
        let build = |s: &[(u32, Verdict)]| build(ARCH, libc::SECCOMP_RET_KILL_PROCESS, DENY, s);
        // A few runs: the compact layout, one test per run boundary and no leaf instructions.
        let few: Vec<(u32, Verdict)> = (0..40).chain(100..140).map(|n| (n, Verdict::Allow)).collect();
        let prog = build(&few);
        check(&few, &prog);
        assert!(prog.len() < 6 + 4 + 2, "{} instructions", prog.len());
        // Every other number allowed, one a fixed return: a thousand runs, far past the 8-bit
        // reach of a conditional jump to the shared returns; the wide layout takes over.
        let mut many: Vec<(u32, Verdict)> = (0..1000).map(|n| (2 * n, Verdict::Allow)).collect();
        many[7].1 = Verdict::Return(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
        let prog = build(&many);
        check(&many, &prog);
        assert!(layout(ARCH, 0, DENY, &many, true).is_none(), "the compact layout cannot reach");
        // Just one run (nothing allowed): the default for every number.
        check(&[], &build(&[]));
    }
}
