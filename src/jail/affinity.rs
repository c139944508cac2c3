//! Keeps the supervisor and a new jail on different CPUs while the jail is being built.
//!
//! After the clone both have work to do at once: the supervisor writes the id maps, makes the
//! jail's cgroup and compiles its seccomp filter; the jail builds its filesystem. The scheduler
//! starts a forked child on its parent's CPU and, on a small VM whose idle vCPU sleeps, leaves it
//! queued there behind the busy parent instead of waking the other CPU: measured here, the jail
//! first ran 0.67 ms after the clone returned, and the two halves ran one after the other. So the
//! supervisor moves the jail off its own CPU right after the clone.
//!
//! The jail's init then stays there for good, and the command takes back the caller's CPU set
//! in its first step, before its exec (`spawn`): the command starts on the init's address space,
//! and an address space that ever ran on a CPU costs a cross-CPU TLB flush when it is torn down,
//! synchronous, to that CPU even while it sleeps. Waking a sleeping vCPU for it cost the init's
//! exit up to 2 ms here. When the policy's filter would refuse the command that call, the init
//! restores the set for both, before its filter is installed: the command always runs with the
//! caller's CPUs.

use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The calling thread's CPU set, taken before the clone so the jail can restore it.
pub fn current() -> Option<CpuSet> {
    sched_getaffinity(Pid::from_raw(0)).ok()
}

/// Moves `child` to the CPUs of `allowed` other than the one the caller runs on. Does nothing
/// when that leaves none (a single allowed CPU). Best effort: a failure costs only speed.
pub fn move_off_this_cpu(child: Pid, allowed: &CpuSet) {
    let Ok(cpu) = sched_getcpu() else { return };
    let mut others = *allowed;
    if others.unset(cpu).is_err() || !any(&others) {
        return;
    }
    let _ = sched_setaffinity(child, &others);
}

/// Gives the calling thread back the CPU set it was cloned with.
pub fn restore(allowed: &CpuSet) -> std::io::Result<()> {
    sched_setaffinity(Pid::from_raw(0), allowed).map_err(std::io::Error::from)
}

fn any(set: &CpuSet) -> bool {
    (0..CpuSet::count()).any(|i| set.is_set(i).unwrap_or(false))
}
