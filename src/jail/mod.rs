//! The jail: build a fresh, confined environment from a policy and run one command in it.
//!
//! The supervisor (this module, on the host side) validates and prepares what it must before any
//! namespace exists — the policy, landlock ABI, environment, a v2 cgroup — so that most refusals
//! happen before a process is created. It then forks the jail child into new namespaces
//! (straight into its cgroup on v2; on v1 the child enters it itself, see `cgroups::Entry`),
//! writes its id maps and releases it. While the child builds its filesystem, the supervisor
//! makes the v1 cgroups and compiles the seccomp program and hands both over (`sync::Setup`).
//! The child (see `init`) performs the in-namespace steps, each in its own module:
//!
//! | step | module |
//! |------|--------|
//! | 1 namespaces, uid/gid maps | `namespaces` |
//! | 2 mounts, generated /etc, pivot_root | `mounts`, `etc` |
//! | 3 hostname, loopback | `uts`, `netif` |
//! | 4 fds, environment | `init`, `environ` |
//! | 5 rlimits, cgroups | `rlimits`, `cgroups` |
//! | 6 capabilities, no_new_privs | `caps` |
//! | 7 landlock | `landlock` |
//! | 8 seccomp | `seccomp` |
//! | 9 exec, PID 1 | `init` |

pub(crate) mod bpf;
pub(crate) mod caps;
pub(crate) mod cgroups;
pub mod check;
pub(crate) mod disk;
pub(crate) mod environ;
pub(crate) mod error;
pub(crate) mod etc;
pub(crate) mod execwatch;
pub(crate) mod fsio;
pub(crate) mod idmap;
pub(crate) mod idpool;
mod init;
mod kmsg;
pub(crate) mod landlock;
pub(crate) mod mounts;
pub(crate) mod namespaces;
pub(crate) mod netif;
pub mod observe;
pub(crate) mod rlimits;
pub(crate) mod seccomp;
mod spawn;
mod sync;
pub(crate) mod uts;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::ffi::{CString, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use environ::scrub_variables;
pub use error::{JailError, Step};

use crate::policy::Policy;
use cgroups::{CgroupReport, JailCgroup};
use namespaces::IdMapping;

/// Exit status when the command ran past `--timeout` and the jail was killed (as timeout(1)).
pub(crate) const EXIT_TIMEOUT: i32 = 124;
/// Exit status when Stockade could not build the jail.
pub const EXIT_SETUP_FAILED: i32 = 125;
/// Exit status when the command exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// Exit status when the command does not exist in the jail.
pub const EXIT_NOT_FOUND: i32 = 127;

/// How long a jail gets between a forwarded SIGTERM/SIGINT and SIGKILL.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(2);

/// What to run and where.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub policy: Policy,
    /// Host directory mounted at /workspace; `None` gives the jail an empty tmpfs workspace.
    pub workspace: Option<PathBuf>,
    /// Host directory mounted at /mnt/session/outputs; `None` gives an empty tmpfs.
    pub outputs: Option<PathBuf>,
    pub argv: Vec<OsString>,
    /// Extra variables (`--env K=V`), subject to the same secret rules as `env.set`.
    pub env: Vec<(String, String)>,
    /// Overrides `limits.timeout`.
    pub timeout: Option<Duration>,
    /// Sweep the cgroups killed Stockades left behind while the jail starts. A one-off `run`
    /// wants it; a worker's sessions do not: the worker sweeps at its start and on a timer, so a
    /// start costs the same however many jails are live.
    pub sweep_stale: bool,
    /// Told every program the jail runs (with `exec`) and every connection it tries.
    pub watcher: Option<Watcher>,
    /// Have the jail say what it sees of itself once built, before its command runs (its mount
    /// table, credentials, limits: `Report::seen`), for a report that is the jail's, not the
    /// policy's.
    pub observe: bool,
    /// The slave end of a pty the caller made and holds open until `Jail::start` returns: the
    /// command's stdin, stdout, stderr and controlling terminal (`run -t`).
    pub tty: Option<std::os::fd::RawFd>,
    /// Host directories of the policy's binds (`filesystem.read_write`/`read_only` sources)
    /// that the jail user owns through an id-mapped mount, as the workspace: their owner, the
    /// worker's jail user, may not be the host ids this jail's slot gets.
    pub id_mapped: Vec<PathBuf>,
}

/// Who is told what a jail runs and connects to.
#[derive(Clone)]
pub struct Watcher {
    pub observer: std::sync::Arc<dyn execwatch::Observer>,
    /// Report every exec (see `execwatch`); the jail is refused if the kernel cannot.
    pub exec: bool,
    pub limits: execwatch::Limits,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").field("exec", &self.exec).field("limits", &self.limits).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
    TimedOut,
}

impl Status {
    /// The exit code Stockade itself should leave with.
    pub fn code(self) -> i32 {
        match self {
            Status::Exited(c) => c,
            Status::Signaled(s) => 128 + s,
            Status::TimedOut => EXIT_TIMEOUT,
        }
    }
}

/// What confined the command, for `stockade run -v` and the demo.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub landlock_abi: i32,
    pub landlock_dropped: Vec<&'static str>,
    pub cgroup: CgroupReport,
    pub seccomp_allowed: usize,
    pub id_mapping: String,
    /// veth mode: the session's link and, once it ended, its packet and DNS counts.
    pub network: Option<String>,
    /// The command died of SIGSYS: the system call the seccomp filter killed it for, as the
    /// kernel logged it (`name (number)`), or why that cannot be told.
    pub seccomp_kill: Option<String>,
    /// With `JailSpec::observe`: the jail's own view of itself once built.
    pub seen: Option<observe::Seen>,
}

#[derive(Debug)]
pub struct Outcome {
    pub status: Status,
    pub report: Report,
}

static JAIL_SEQ: AtomicU32 = AtomicU32::new(0);

/// What the jail's PID 1 does once the jail is built.
pub enum Payload {
    /// Exec the spec's command and supervise it.
    Command,
    /// Run `serve` as PID 1 with `channel`, one end of a socketpair (see `session`), the jail's
    /// environment and its policy; `host_end` is the caller's end, which the jail closes. Both
    /// must be close-on-exec. The jail knows nothing of what is served.
    Session { channel: std::os::fd::OwnedFd, host_end: std::os::fd::RawFd, serve: ServeFn },
}

/// PID 1's work in a session jail: (channel, environment, policy) to an exit code.
pub(crate) type ServeFn = fn(&std::os::fd::OwnedFd, &[(String, String)], &Policy) -> i32;

/// A jail: built, running, or — while `start` builds it — half built. Dropping it at any stage
/// undoes exactly what was done: kills and reaps the init, stops the exec watch, removes the
/// session's network and cgroup, restores the signal mask, gives back the id range.
pub struct Jail {
    init: Option<Pid>,
    cgroup: Option<JailCgroup>,
    /// Kept open for the jail's life: the jail reads its hang-up as "the supervisor died".
    go_write: Option<std::os::fd::OwnedFd>,
    /// The thread whose signal mask `block_signals` changed (see `forwarded`).
    mask_thread: Option<std::thread::ThreadId>,
    deadline: Option<Instant>,
    pub report: Report,
    t0: Instant,
    finished: bool,
    /// veth mode: the host side of the session's network, removed after the jail.
    net: Option<crate::net::SessionNet>,
    /// As root: the host id range this jail maps onto, held until everything of it is gone.
    _ids: Option<idpool::Slot>,
    /// Answers the jail's exec notifications; stopped after the jail is gone.
    exec_watch: Option<execwatch::Watch>,
    /// The host uid the jail's processes run as, and when the jail started on the kernel's log
    /// clock: what finds a seccomp kill in the kernel's log.
    host_uid: u32,
    started_usec: u64,
}

/// Builds the jail, runs the command to completion and tears everything down.
pub fn run(spec: &JailSpec) -> Result<Outcome, JailError> {
    let jail = Jail::start(spec, Payload::Command)?;
    jail.wait()
}

/// What preflight settles before anything exists: the environment and command line, the
/// identities, the attached workspace trees, the network plan.
struct Prepared {
    env: Vec<(String, String)>,
    env_c: Vec<CString>,
    argv_c: Vec<CString>,
    own_blocks: environ::OwnBlocks,
    ids: IdMapping,
    id_slot: Option<idpool::Slot>,
    /// The jail user's host uid, when the user namespace is created under it (as root).
    owner: Option<u32>,
    workspace_tree: Option<std::os::fd::OwnedFd>,
    outputs_tree: Option<std::os::fd::OwnedFd>,
    /// Id-mapped trees of the binds named by `JailSpec::id_mapped`, by their place in the jail.
    bind_trees: Vec<(PathBuf, std::os::fd::OwnedFd)>,
    net_plan: Option<crate::net::Plan>,
}

/// Stage 1: everything that can be refused before a process or a cgroup exists.
fn preflight(spec: &JailSpec, payload: &Payload, report: &mut Report) -> Result<Prepared, JailError> {
    let p = &spec.policy;
    let abi = landlock::effective_abi();
    let missing = landlock::missing_features(abi, p);
    if p.landlock.compatibility == crate::policy::Compatibility::Hard && !missing.is_empty() {
        return Err(JailError::new(
            Step::Landlock,
            format!("kernel ABI {abi} < required {}: missing {}", landlock::requirements(p), missing.join(", ")),
        ));
    }
    report.landlock_abi = abi;
    if p.landlock.compatibility == crate::policy::Compatibility::BestEffort {
        // Said at every start, not only with --report: a jail weaker than its policy reads must
        // never be a surprise in the log.
        if !missing.is_empty() {
            tracing::warn!(
                kernel_abi = abi,
                dropped = %missing.join(", "),
                "landlock.compatibility = \"best_effort\": this kernel cannot enforce all of the policy's landlock \
                 rules; the jail runs without them"
            );
        }
        report.landlock_dropped = missing;
    }
    let host_env: Vec<(String, String)> = std::env::vars().collect();
    let env = environ::build(p, &host_env, &spec.env)?;
    let env_c: Vec<CString> = env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .map_err(|_| JailError::new(Step::Preflight, "environment contains a NUL byte"))?;
    if matches!(payload, Payload::Command) && spec.argv.is_empty() {
        return Err(JailError::new(Step::Exec, "no command given"));
    }
    // The exec watch reads each exec's path and argv from the caller's memory. The jail's init
    // and its forks keep the memory of the supervisor's user namespace until they exec, and the
    // kernel lets only a supervisor with CAP_SYS_PTRACE there read it: as a user without root
    // every exec would be refused.
    if spec.watcher.as_ref().is_some_and(|w| w.exec) && !nix::unistd::geteuid().is_root() {
        return Err(JailError::new(
            Step::Preflight,
            "trail.exec = true needs Stockade to run as root (it reads each exec from the jailed process's memory, \
             which the kernel lets only a privileged supervisor do); set trail.exec = false, as the rootless built-in \
             does, to keep the trail's calls and egress without its execs"
                .to_owned(),
        ));
    }
    let argv_c: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| JailError::new(Step::Exec, "command line contains a NUL byte"))?;
    for (what, dir) in [("workspace", &spec.workspace), ("outputs", &spec.outputs)] {
        if let Some(d) = dir {
            if !d.is_dir() {
                return Err(JailError::new(Step::Workspace, format!("{what} {} is not a directory", d.display())));
            }
        }
    }
    disk::check(p, spec.workspace.as_deref(), spec.outputs.as_deref())?;
    // As root, a host id range of the jail's own (see `idpool`); rootless, the invoking user.
    let id_slot = if nix::unistd::geteuid().is_root() { Some(idpool::take(p.user.host_id_base)?) } else { None };
    let ids = match &id_slot {
        Some(s) => IdMapping::Range { host_base: s.host_base(p.user.host_id_base) },
        None => IdMapping::for_host(&p.user),
    };
    let (host_uid, host_gid) = ids.host_ids(&p.user);
    // As root, a workspace owned by someone else is shown to the jail user through an id-mapped
    // mount; rootless, the jail user is the invoking user and owns what it reaches.
    let (mut workspace_tree, mut outputs_tree, mut bind_trees) = (None, None, Vec::new());
    if matches!(ids, IdMapping::Range { .. }) {
        let setid = crate::policy::syscalls::setid_openings(&p.seccomp.allowed);
        if let Some(w) = &spec.workspace {
            workspace_tree = idmap::prepare(w, "workspace", host_uid, host_gid, &setid)?;
        }
        if let Some(o) = &spec.outputs {
            outputs_tree = idmap::prepare(o, "outputs", host_uid, host_gid, &setid)?;
        }
        for b in p.filesystem.read_write.iter().chain(&p.filesystem.read_only) {
            if spec.id_mapped.contains(&b.src) {
                let what = b.dst.display().to_string();
                if let Some(t) = idmap::prepare(&b.src, &what, host_uid, host_gid, &setid)? {
                    bind_trees.push((b.dst.clone(), t));
                }
            }
        }
    }
    report.id_mapping =
        format!("jail uid {} -> host uid {host_uid}, gid {} -> host gid {host_gid}", p.user.uid, p.user.gid);
    // veth mode: a /30 for the jail, chosen before the clone so the jail knows its addresses.
    let net_plan = match p.network.mode {
        crate::policy::NetMode::Veth => Some(crate::net::Plan::reserve(crate::net::egress_of(&p.network)?.pool)?),
        _ => None,
    };
    Ok(Prepared {
        env,
        env_c,
        argv_c,
        own_blocks: environ::OwnBlocks::read(),
        owner: id_slot.is_some().then_some(host_uid),
        ids,
        id_slot,
        workspace_tree,
        outputs_tree,
        bind_trees,
        net_plan,
    })
}

impl Jail {
    /// Builds the jail and returns once its payload is running (the command exec'd, or the
    /// session server ready). The stages run in order; the half-built `Jail` is the one guard
    /// that undoes them when one fails.
    pub fn start(spec: &JailSpec, payload: Payload) -> Result<Jail, JailError> {
        let t0 = Instant::now();
        let mut report = Report::default();
        let mut prep = preflight(spec, &payload, &mut report)?;
        let t_pre = t0.elapsed();
        let mut jail = Jail {
            init: None,
            cgroup: None,
            go_write: None,
            mask_thread: None,
            deadline: None,
            report,
            t0,
            finished: false,
            net: None,
            _ids: prep.id_slot.take(),
            exec_watch: None,
            host_uid: prep.ids.host_ids(&spec.policy.user).0,
            started_usec: kmsg::now_usec(),
        };
        let mut cg = CgroupStage::new(&spec.policy);
        let entry = jail.early_cgroup(&mut cg, &prep)?;
        let t_cg = t0.elapsed();
        jail.block_signals()?;
        let pipes = sync::SyncPipes::new().map_err(|e| JailError::new(Step::Preflight, format!("pipe: {e}")))?;
        let (go_write, report_read) = jail.clone_child(spec, &prep, payload, pipes, entry.as_ref())?;
        let go_write = jail.go_write.insert(go_write);
        let child = jail.init.expect("cloned");
        // From here on a failure may be the jail's own: its report says why, better than ours.
        // (Killed here, reaped once by the guard.)
        let jail_gone = |e: JailError| {
            let _ = kill(child, Signal::SIGKILL);
            sync::read_report(&report_read).unwrap_or(e)
        };
        prep.ids.write(child).map_err(&jail_gone)?;
        if let Some(plan) = prep.net_plan.take() {
            jail.net = Some(session_net(spec, plan, child).map_err(&jail_gone)?);
        }
        sync::send(go_write, sync::GO)
            .map_err(|e| jail_gone(JailError::new(Step::Supervise, format!("release the jail: {e}"))))?;
        let late_entry = jail.late_cgroup(&mut cg).map_err(&jail_gone)?;
        // Compiled now rather than in preflight: the jail needs it only after its filesystem is
        // built, and the supervisor is otherwise idle meanwhile.
        let streams = seccomp::StreamProtocols::for_policy(&spec.policy);
        let filters = seccomp::compile(&spec.policy.seccomp, streams).map_err(&jail_gone)?;
        jail.report.seccomp_allowed = filters.allowed.len();
        let go_write = jail.go_write.as_ref().expect("set above");
        sync::send_setup(go_write, late_entry.as_ref().or(entry.as_ref()), &filters.program)
            .map_err(|e| jail_gone(JailError::new(Step::Supervise, format!("hand the jail its setup: {e}"))))?;
        drop((late_entry, entry));
        // The jail sends the exec filter's listener before anything in it can exec.
        if let Some(w) = spec.watcher.as_ref().filter(|w| w.exec) {
            let listener = sync::recv_listener(go_write).ok_or_else(|| {
                jail_gone(JailError::new(Step::Seccomp, "the jail ended before handing over its exec listener"))
            })?;
            jail.exec_watch = Some(
                execwatch::Watch::start(listener, w.observer.clone(), w.limits)
                    .map_err(|e| JailError::new(Step::Supervise, format!("exec watch thread: {e}")))?,
            );
        }
        let t_released = t0.elapsed();
        // The jail no longer waits for anything of ours: sweep the cgroups killed Stockades left
        // behind while it finishes its start.
        if let (Some(l), true) = (&cg.layout, spec.sweep_stale) {
            cgroups::remove_stale_near(l);
        }
        let (seen, failed) = sync::read_report_seen(&report_read);
        if let Some(err) = failed {
            let _ = waitpid(child, None);
            jail.finished = true;
            return Err(err);
        }
        jail.report.seen = seen.map(|raw| observe::Seen::parse(&raw));
        tracing::debug!(
            preflight_us = t_pre.as_micros() as u64,
            cgroup_us = (t_cg - t_pre).as_micros() as u64,
            clone_to_release_us = (t_released - t_cg).as_micros() as u64,
            jail_setup_us = (t0.elapsed() - t_released).as_micros() as u64,
            "jail started"
        );
        // A timeout past what an Instant can hold is no deadline at all, not an overflow.
        jail.deadline =
            spec.timeout.or(spec.policy.limits.timeout.map(|d| d.0)).and_then(|t| Instant::now().checked_add(t));
        Ok(jail)
    }

    /// Stage 2: a v2 cgroup exists before the clone (the jail is cloned into it, or enters it
    /// from inside when its user namespace belongs to the jail user: the kernel checks the
    /// caller's uid for a clone, the opener's for a descriptor).
    fn early_cgroup(&mut self, cg: &mut CgroupStage, prep: &Prepared) -> Result<Option<cgroups::Entry>, JailError> {
        let mut entry = if cg.early { self.make_cgroup(cg)? } else { None };
        if let (Some(e), Some(_)) = (entry.as_mut(), prep.owner) {
            e.enter_v2_from_inside()?;
        }
        Ok(entry)
    }

    /// v1 cgroups are made (and their hierarchies looked up) while the jail builds its
    /// filesystem, off the start-up's critical path.
    fn late_cgroup(&mut self, cg: &mut CgroupStage) -> Result<Option<cgroups::Entry>, JailError> {
        if cg.early {
            return Ok(None);
        }
        self.make_cgroup(cg)
    }

    fn make_cgroup(&mut self, cg: &mut CgroupStage) -> Result<Option<cgroups::Entry>, JailError> {
        let Some(l) = cg.layout.as_mut() else { return Ok(None) };
        l.add_v1();
        let (made, r) = JailCgroup::create(cgroups::Kernel, l, &cg.name, &cg.limits)?;
        // A weaker jail than the policy reads is said, once per limit, whether or not a report
        // was asked for.
        for why in &r.skipped {
            tracing::warn!(reason = %why, "limits.enforcement = \"best_effort\": a limit was not applied");
        }
        self.cgroup = made;
        self.report.cgroup = r;
        self.cgroup.as_ref().map(JailCgroup::entry).transpose()
    }

    /// The termination signals are blocked while any jail started on this thread lives, so that
    /// `wait` reads and forwards them; the thread's mask comes back when the last of them goes,
    /// whatever the order they end in.
    fn block_signals(&mut self) -> Result<(), JailError> {
        BLOCKING.with(|b| {
            let mut b = b.borrow_mut();
            if b.0 == 0 {
                let mut old = SigSet::empty();
                nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded()), Some(&mut old))
                    .map_err(|e| JailError::new(Step::Supervise, format!("sigprocmask: {e}")))?;
                b.1 = Some(old);
            }
            b.0 += 1;
            Ok::<_, JailError>(())
        })?;
        self.mask_thread = Some(std::thread::current().id());
        Ok(())
    }

    /// Stage 3: the clone. The child runs `init::child_main` and never comes back here; the
    /// supervisor keeps its ends of the sync pipes.
    fn clone_child(
        &mut self,
        spec: &JailSpec,
        prep: &Prepared,
        payload: Payload,
        pipes: sync::SyncPipes,
        entry: Option<&cgroups::Entry>,
    ) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), JailError> {
        let veth = prep.net_plan.as_ref().map(|n| (n.jail_ip, n.host_ip));
        let plan = mounts::MountPlan {
            policy: &spec.policy,
            workspace: spec.workspace.as_deref(),
            outputs: spec.outputs.as_deref(),
            workspace_tree: prep.workspace_tree.as_ref(),
            outputs_tree: prep.outputs_tree.as_ref(),
            bind_trees: &prep.bind_trees,
            late: spec
                .policy
                .filesystem
                .read_write
                .iter()
                .chain(&spec.policy.filesystem.read_only)
                .filter(|b| spec.id_mapped.contains(&b.src))
                .map(|b| b.dst.clone())
                .collect(),
            resolver: veth.map(|(_, host)| host),
        };
        match namespaces::fork_into_namespaces(entry.and_then(|e| e.clone_into()), prep.owner)? {
            None => init::child_main(init::ChildCtx {
                policy: &spec.policy,
                ids: &prep.ids,
                plan,
                env: &prep.env_c,
                env_pairs: &prep.env,
                argv: &prep.argv_c,
                pipes: &pipes,
                payload: &payload,
                veth,
                watch_exec: spec.watcher.as_ref().is_some_and(|w| w.exec),
                observe: spec.observe,
                tty: spec.tty,
                own_blocks: &prep.own_blocks,
            }),
            Some(pid) => self.init = Some(pid),
        }
        // The session's end of the channel and the jail's pipe ends now live in the jail only.
        drop(payload);
        let sync::SyncPipes { go_read, go_write, report_read, report_write } = pipes;
        drop((go_read, report_write));
        Ok((go_write, report_read))
    }

    /// The jail's init, as seen from the host.
    pub fn pid(&self) -> i32 {
        self.init.map_or(0, Pid::as_raw)
    }

    /// Waits for the jail to end (enforcing its deadline and forwarding termination signals),
    /// then tears it down.
    pub fn wait(mut self) -> Result<Outcome, JailError> {
        let init = self.init.expect("a started jail has its init");
        let status = supervise(init, self.deadline);
        self.finished = true;
        if let Ok(Status::Signaled(libc::SIGSYS)) = status {
            let table = crate::policy::syscalls::native_table();
            self.report.seccomp_kill = Some(match kmsg::seccomp_kill(self.host_uid, self.started_usec) {
                Some(nr) => match table.iter().find(|(_, n)| *n == i64::from(nr)) {
                    Some((name, _)) => format!("{name} ({nr})"),
                    None => format!("system call {nr}"),
                },
                None => "a system call the kernel's log (dmesg, type=1326) names; it cannot be read here".into(),
            });
        }
        if let Some(n) = &self.net {
            let plan = &n.plan;
            self.report.network =
                Some(format!("veth {} {} <-> jail {}/30; {}", plan.host_if, plan.host_ip, plan.jail_ip, n.stats()));
        }
        tracing::debug!(total_us = self.t0.elapsed().as_micros() as u64, "jail ended");
        let report = std::mem::take(&mut self.report);
        drop(self);
        status.map(|status| Outcome { status, report })
    }

    /// Kills everything in the jail at once.
    pub fn kill(&mut self) {
        if let (false, Some(init)) = (self.finished, self.init) {
            let _ = kill(init, Signal::SIGKILL);
            let _ = waitpid(init, None);
        }
        self.finished = true;
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        self.kill();
        // The init was reaped, which in a pid namespace means every member has exited: nothing
        // holds the network namespace any more.
        if let Some(n) = self.net.as_mut() {
            n.jail_ended();
        }
        drop(self.exec_watch.take());
        let t = Instant::now();
        if let Some(cg) = self.cgroup.as_mut() {
            cg.remove();
        }
        drop(self.go_write.take());
        // A jail dropped on another thread leaves its starter's mask alone: no thread can set
        // another's.
        if self.mask_thread.take() == Some(std::thread::current().id()) {
            BLOCKING.with(|b| {
                let mut b = b.borrow_mut();
                b.0 = b.0.saturating_sub(1);
                if let (0, Some(old)) = (b.0, b.1.take()) {
                    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
                }
            });
        }
        tracing::debug!(cleanup_us = t.elapsed().as_micros() as u64, "jail torn down");
    }
}

/// Stage 4 (veth mode): the host side of the session's network, once the jail's network
/// namespace exists; its connection log goes to the watcher too.
fn session_net(spec: &JailSpec, plan: crate::net::Plan, child: Pid) -> Result<crate::net::SessionNet, JailError> {
    let egress = spec.watcher.as_ref().map(|w| {
        let o = w.observer.clone();
        let f: crate::net::EgressHook =
            std::sync::Arc::new(move |allowed, proto, dst, dport| o.egress(allowed, proto, dst, dport));
        f
    });
    crate::net::SessionNet::create(plan, child.as_raw(), &spec.policy.network, egress).map_err(JailError::from)
}

/// The cgroup stage's plan: the jail's cgroup name, its limits and where they go.
struct CgroupStage {
    name: String,
    limits: crate::policy::Limits,
    layout: Option<cgroups::Layout>,
    /// A v2 cgroup is made before the clone (the jail is cloned into it), v1 ones after.
    early: bool,
}

impl CgroupStage {
    fn new(p: &Policy) -> CgroupStage {
        let name = format!("stockade-{}-{}", std::process::id(), JAIL_SEQ.fetch_add(1, Ordering::Relaxed));
        let limits = p.limits.clone();
        let layout = (!cgroups::wanted(&limits).is_empty()).then(cgroups::Layout::detect_v2);
        let early = layout.as_ref().is_some_and(|l| l.uses_v2(&limits));
        CgroupStage { name, limits, layout, early }
    }
}

thread_local! {
    /// Jails started on this thread and not yet dropped, and the thread's mask before the first.
    static BLOCKING: std::cell::RefCell<(usize, Option<SigSet>)> = const { std::cell::RefCell::new((0, None)) };
}

/// The signals `wait` forwards to the jail (as timeout(1) does), then kills it after `KILL_GRACE`.
fn forwarded() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        set.add(s);
    }
    set
}

/// Waits for the jail's init, enforcing the deadline and forwarding termination signals. The
/// init's exit is read from a pidfd, not from SIGCHLD: a process running several jails (or a
/// thread that does not block SIGCHLD) would lose the signal, and with it the jail's end.
fn supervise(init: Pid, deadline: Option<Instant>) -> Result<Status, JailError> {
    // Until it is reaped below, the init's pid cannot be reused: killing by pid is safe here.
    let give_up = |e: JailError| {
        let _ = kill(init, Signal::SIGKILL);
        let _ = waitpid(init, None);
        e
    };
    let exited = pidfd_open(init).map_err(give_up)?;
    // Reads the forwarded signals when this thread blocks them (`block_signals`); never ready
    // otherwise.
    let signals = SignalFd::with_flags(&forwarded(), SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| give_up(JailError::new(Step::Supervise, format!("signalfd: {e}"))))?;
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => {
                return Ok(if timed_out { Status::TimedOut } else { split_status(code) });
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Ok(if timed_out { Status::TimedOut } else { Status::Signaled(sig as i32) });
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(JailError::new(Step::Supervise, format!("waitpid: {e}"))),
        }
        let now = Instant::now();
        if let Some(d) = deadline {
            if now >= d && !timed_out {
                timed_out = true;
                let _ = kill(init, Signal::SIGKILL);
                continue;
            }
        }
        if let Some(k) = kill_at {
            if now >= k {
                let _ = kill(init, Signal::SIGKILL);
                kill_at = None;
            }
        }
        let next = [deadline.filter(|_| !timed_out), kill_at].into_iter().flatten().min();
        // Rounded up to the next millisecond, so a deadline is never polled for in a busy loop.
        let wait = next.map(|n| n.saturating_duration_since(now) + Duration::from_micros(999));
        let timeout = wait.map_or(PollTimeout::NONE, |w| PollTimeout::try_from(w).unwrap_or(PollTimeout::MAX));
        let mut fds = [PollFd::new(exited.as_fd(), PollFlags::POLLIN), PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(give_up(JailError::new(Step::Supervise, format!("poll: {e}")))),
        }
        while let Ok(Some(info)) = signals.read_signal() {
            // Termination requested: let the command handle it, then make sure.
            if let Ok(s) = Signal::try_from(info.ssi_signo as i32) {
                let _ = kill(init, s);
            }
            kill_at.get_or_insert(Instant::now() + KILL_GRACE);
        }
    }
}

/// A descriptor that turns readable when `pid` exits (Linux 5.3).
fn pidfd_open(pid: Pid) -> Result<std::os::fd::OwnedFd, JailError> {
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(JailError::new(Step::Supervise, format!("pidfd_open: {e}")));
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

/// The init exits with the command's status; 128+N stands for death by signal N.
fn split_status(code: i32) -> Status {
    if code > 128 && code < 128 + 65 {
        Status::Signaled(code - 128)
    } else {
        Status::Exited(code)
    }
}
