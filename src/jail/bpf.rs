//! Classic-BPF layout for the seccomp filter: a binary search over syscall numbers.
//!
//! seccompiler compiles the argument conditions of each syscall, but lays the syscalls out as
//! one linear chain (five instructions each, ~1,600 for `@system-service`). The kernel converts,
//! JITs and, to build its per-syscall action cache, emulates that chain once per syscall number
//! at install time (~1 ms), and walks it on every filtered call. Here the syscalls are dispatched
//! through a balanced tree of `JGE` tests over runs of numbers with the same verdict (an
//! allowlist is mostly such runs, and so are the gaps between them), so any call reaches its
//! verdict in about twenty instructions and the whole filter stays near 430; seccompiler's rule
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
pub enum Verdict {
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

/// An instruction list with forward `JA` jumps to labels, resolved at the end.
struct Builder {
    prog: Vec<sock_filter>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, usize)>,
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
    fn finish(mut self) -> BpfProgram {
        for (at, l) in self.fixups {
            let target = self.labels[l].expect("every label is placed");
            // All jumps are forward: blocks and right subtrees come after their references.
            self.prog[at].k = (target - at - 1) as u32;
        }
        self.prog
    }
}

/// Builds the whole filter: arch check, x32 refusal, dispatch, verdict blocks. `syscalls` is
/// sorted by number, each number once.
pub fn build(arch: u32, x32_action: u32, default_action: u32, syscalls: &[(u32, Verdict)]) -> BpfProgram {
    debug_assert!(syscalls.windows(2).all(|w| w[0].0 < w[1].0), "syscalls not sorted by number");
    let mut b = Builder { prog: Vec::new(), labels: Vec::new(), fixups: Vec::new() };
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
    tree(&mut b, &runs);

    b.place(allow);
    b.prog.push(stmt(RET, libc::SECCOMP_RET_ALLOW));
    b.place(default);
    b.prog.push(stmt(RET, default_action));
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
    b.finish()
}

/// Dispatch over `runs`, (first number, destination) sorted by number, each reaching to the
/// next one's start (the last to the end of the number space).
fn tree(b: &mut Builder, runs: &[(u32, usize)]) {
    if runs.len() == 1 {
        b.ja(runs[0].1);
        return;
    }
    let mid = runs.len() / 2;
    let right = b.label();
    // nr >= pivot: fall through to the long jump into the right half; else skip it.
    b.prog.push(jump(JGE, runs[mid].0, 0, 1));
    b.ja(right);
    tree(b, &runs[..mid]);
    b.place(right);
    tree(b, &runs[mid..]);
}

/// A classic-BPF interpreter for the instructions seccomp filters here use; for tests.
#[cfg(test)]
pub fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
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
