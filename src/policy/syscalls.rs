//! Syscall names, numbers and the named groups policies refer to (`@system-service`, `@mount`, …).
//!
//! Groups are data, not code: the seccomp compiler (`jail::seccomp`), the policy validator and the
//! audit all read the same definitions, so a group means the same thing everywhere. Argument
//! conditions (clone flags, ioctl requests, …) belong to the group definitions: a policy that
//! allows `@system-service` gets `clone` only without namespace flags, and only a policy that names
//! `@namespaces` gets it unconditionally.

#[path = "syscall_table.rs"]
mod table;

/// An argument restriction attached to a syscall inside a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ArgCond {
    /// clone(2): no CLONE_NEW* flag in `flags` (argument 0).
    NoNamespaceFlags,
    /// ioctl(2): the request (argument 1) is neither TIOCSTI nor TIOCLINUX.
    NoTtyInjection,
    /// personality(2): only the personas Docker's default profile admits — PER_LINUX (0),
    /// PER_LINUX32 (0x8), UNAME26 (0x20000), PER_LINUX32|UNAME26 (0x20008) — and the 0xffffffff
    /// query. Never READ_IMPLIES_EXEC, which would make every readable mapping executable.
    SafePersonality,
    /// socket(2)/socketpair(2): the address family (argument 0) is one the policy allows,
    /// and for socket(2) the type is not SOCK_RAW/SOCK_PACKET.
    AllowedSocketFamily,
    /// mknod(2) (argument 1) / mknodat(2) (argument 2): no character or block devices, and no
    /// setuid/setgid bit.
    NoDeviceNodes { mode_arg: u8 },
    /// chmod family, mkdir, creat: the mode (argument `mode_arg`) has neither S_ISUID nor S_ISGID.
    NoSetIdMode { mode_arg: u8 },
    /// open/openat: either no file is created (neither O_CREAT nor O_TMPFILE in `flags_arg`) or
    /// the mode (argument `mode_arg`) has neither S_ISUID nor S_ISGID.
    NoSetIdCreate { flags_arg: u8, mode_arg: u8 },
}

/// The syscalls that could leave a setuid or setgid file (or directory) behind, with the
/// condition that keeps them from doing so; `openat2` is absent because its mode lives in memory
/// seccomp cannot read.
pub(crate) const SETID_GUARDED: &[&str] =
    &["open", "openat", "creat", "mkdir", "mkdirat", "chmod", "fchmod", "fchmodat", "fchmodat2", "mknod", "mknodat"];

impl ArgCond {
    /// The condition in a few words, for listings.
    pub fn describe(self) -> &'static str {
        match self {
            ArgCond::NoNamespaceFlags => "no namespace flags",
            ArgCond::NoTtyInjection => "not TIOCSTI or TIOCLINUX",
            ArgCond::SafePersonality => "Linux personas only, never READ_IMPLIES_EXEC",
            ArgCond::AllowedSocketFamily => "the policy's socket families, no raw or packet sockets",
            ArgCond::NoDeviceNodes { .. } => "no devices, no setuid/setgid bits",
            ArgCond::NoSetIdMode { .. } => "no setuid/setgid bits",
            ArgCond::NoSetIdCreate { .. } => "no setuid/setgid bits when creating",
        }
    }
}

/// One member of a group: a syscall name, optionally restricted by an argument condition.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub name: &'static str,
    pub cond: Option<ArgCond>,
}

/// A named group.
#[derive(Debug)]
pub struct Group {
    pub name: &'static str,
    pub description: &'static str,
    /// True for groups the default policy never allows; the audit weighs them.
    pub dangerous: bool,
    /// Other groups included by name.
    pub includes: &'static [&'static str],
    pub members: &'static [Member],
}

const fn m(name: &'static str) -> Member {
    Member { name, cond: None }
}
const fn c(name: &'static str, cond: ArgCond) -> Member {
    Member { name, cond: Some(cond) }
}

/// Every group, in documentation order.
pub static GROUPS: &[Group] = &[
    Group {
        name: "@system-service",
        description: "What ordinary programs need: all of the safe groups below",
        dangerous: false,
        includes: &[
            "@basic-io",
            "@file-system",
            "@io-event",
            "@process",
            "@signal",
            "@timer",
            "@memory",
            "@ipc",
            "@network-io",
            "@credentials",
            "@sync",
            "@aio",
            "@sandbox",
            "@system-info",
        ],
        members: &[],
    },
    Group {
        name: "@basic-io",
        description: "Reading, writing and closing file descriptors; ioctl without TIOCSTI/TIOCLINUX",
        dangerous: false,
        includes: &[],
        members: &[
            m("read"),
            m("write"),
            m("readv"),
            m("writev"),
            m("pread64"),
            m("pwrite64"),
            m("preadv"),
            m("preadv2"),
            m("pwritev"),
            m("pwritev2"),
            m("close"),
            m("close_range"),
            m("lseek"),
            m("dup"),
            m("dup2"),
            m("dup3"),
            m("fcntl"),
            c("ioctl", ArgCond::NoTtyInjection),
        ],
    },
    Group {
        name: "@file-system",
        description:
            "File and directory operations, xattrs, inotify; mknod only for fifos and sockets; no setuid/setgid modes",
        dangerous: false,
        includes: &[],
        members: &[
            c("open", ArgCond::NoSetIdCreate { flags_arg: 1, mode_arg: 2 }),
            c("openat", ArgCond::NoSetIdCreate { flags_arg: 2, mode_arg: 3 }),
            c("creat", ArgCond::NoSetIdMode { mode_arg: 1 }),
            m("access"),
            m("faccessat"),
            m("faccessat2"),
            m("stat"),
            m("lstat"),
            m("fstat"),
            m("newfstatat"),
            m("statx"),
            m("statfs"),
            m("fstatfs"),
            m("chdir"),
            m("fchdir"),
            m("getcwd"),
            c("mkdir", ArgCond::NoSetIdMode { mode_arg: 1 }),
            c("mkdirat", ArgCond::NoSetIdMode { mode_arg: 2 }),
            m("rmdir"),
            m("rename"),
            m("renameat"),
            m("renameat2"),
            m("link"),
            m("linkat"),
            m("unlink"),
            m("unlinkat"),
            m("symlink"),
            m("symlinkat"),
            m("readlink"),
            m("readlinkat"),
            c("chmod", ArgCond::NoSetIdMode { mode_arg: 1 }),
            c("fchmod", ArgCond::NoSetIdMode { mode_arg: 1 }),
            c("fchmodat", ArgCond::NoSetIdMode { mode_arg: 2 }),
            c("fchmodat2", ArgCond::NoSetIdMode { mode_arg: 2 }),
            m("chown"),
            m("fchown"),
            m("lchown"),
            m("fchownat"),
            m("truncate"),
            m("ftruncate"),
            m("fallocate"),
            m("getdents"),
            m("getdents64"),
            m("utime"),
            m("utimes"),
            m("utimensat"),
            m("futimesat"),
            m("inotify_init"),
            m("inotify_init1"),
            m("inotify_add_watch"),
            m("inotify_rm_watch"),
            m("fsync"),
            m("fdatasync"),
            m("syncfs"),
            m("sync"),
            m("sync_file_range"),
            m("flock"),
            m("fadvise64"),
            m("readahead"),
            m("umask"),
            m("getxattr"),
            m("lgetxattr"),
            m("fgetxattr"),
            m("listxattr"),
            m("llistxattr"),
            m("flistxattr"),
            m("setxattr"),
            m("lsetxattr"),
            m("fsetxattr"),
            m("removexattr"),
            m("lremovexattr"),
            m("fremovexattr"),
            m("getxattrat"),
            m("setxattrat"),
            m("listxattrat"),
            m("removexattrat"),
            m("memfd_create"),
            m("copy_file_range"),
            m("sendfile"),
            m("splice"),
            m("tee"),
            m("vmsplice"),
            m("cachestat"),
            m("file_getattr"),
            m("file_setattr"),
            c("mknod", ArgCond::NoDeviceNodes { mode_arg: 1 }),
            c("mknodat", ArgCond::NoDeviceNodes { mode_arg: 2 }),
        ],
    },
    Group {
        name: "@io-event",
        description: "poll, select, epoll, eventfd",
        dangerous: false,
        includes: &[],
        members: &[
            m("poll"),
            m("ppoll"),
            m("select"),
            m("pselect6"),
            m("epoll_create"),
            m("epoll_create1"),
            m("epoll_ctl"),
            m("epoll_wait"),
            m("epoll_pwait"),
            m("epoll_pwait2"),
            m("eventfd"),
            m("eventfd2"),
        ],
    },
    Group {
        name: "@process",
        description: "Process life cycle; clone without namespace flags (clone3 answers ENOSYS)",
        dangerous: false,
        includes: &[],
        members: &[
            c("clone", ArgCond::NoNamespaceFlags),
            m("clone3"),
            m("fork"),
            m("vfork"),
            m("execve"),
            m("execveat"),
            m("exit"),
            m("exit_group"),
            m("wait4"),
            m("waitid"),
            m("getpid"),
            m("getppid"),
            m("gettid"),
            m("getpgid"),
            m("getpgrp"),
            m("getsid"),
            m("setsid"),
            m("setpgid"),
            m("set_tid_address"),
            m("prctl"),
            m("arch_prctl"),
            m("getrusage"),
            m("pidfd_open"),
            m("pidfd_send_signal"),
            m("rseq"),
            m("set_robust_list"),
            m("get_robust_list"),
            m("sched_yield"),
            m("sched_getaffinity"),
            m("sched_setaffinity"),
            m("sched_getparam"),
            m("sched_setparam"),
            m("sched_getscheduler"),
            m("sched_setscheduler"),
            m("sched_get_priority_min"),
            m("sched_get_priority_max"),
            m("sched_rr_get_interval"),
            m("sched_getattr"),
            m("sched_setattr"),
            m("getpriority"),
            m("setpriority"),
            m("ioprio_get"),
            m("ioprio_set"),
            m("prlimit64"),
            m("getrlimit"),
            m("setrlimit"),
            m("times"),
            m("getcpu"),
            m("restart_syscall"),
            c("personality", ArgCond::SafePersonality),
        ],
    },
    Group {
        name: "@signal",
        description: "Sending and handling signals",
        dangerous: false,
        includes: &[],
        members: &[
            m("rt_sigaction"),
            m("rt_sigprocmask"),
            m("rt_sigreturn"),
            m("rt_sigpending"),
            m("rt_sigtimedwait"),
            m("rt_sigqueueinfo"),
            m("rt_tgsigqueueinfo"),
            m("rt_sigsuspend"),
            m("sigaltstack"),
            m("signalfd"),
            m("signalfd4"),
            m("kill"),
            m("tkill"),
            m("tgkill"),
            m("pause"),
        ],
    },
    Group {
        name: "@timer",
        description: "Clocks (read only), sleeps and timers",
        dangerous: false,
        includes: &[],
        members: &[
            m("alarm"),
            m("getitimer"),
            m("setitimer"),
            m("timer_create"),
            m("timer_settime"),
            m("timer_gettime"),
            m("timer_getoverrun"),
            m("timer_delete"),
            m("timerfd_create"),
            m("timerfd_settime"),
            m("timerfd_gettime"),
            m("nanosleep"),
            m("clock_nanosleep"),
            m("clock_gettime"),
            m("clock_getres"),
            m("gettimeofday"),
            m("time"),
        ],
    },
    Group {
        name: "@memory",
        description: "Memory mapping and management of the calling process",
        dangerous: false,
        includes: &[],
        members: &[
            m("brk"),
            m("mmap"),
            m("munmap"),
            m("mprotect"),
            m("mremap"),
            m("madvise"),
            m("msync"),
            m("mincore"),
            m("mlock"),
            m("munlock"),
            m("mlock2"),
            m("mlockall"),
            m("munlockall"),
            m("membarrier"),
            m("pkey_mprotect"),
            m("pkey_alloc"),
            m("pkey_free"),
            m("mbind"),
            m("get_mempolicy"),
            m("set_mempolicy"),
            m("set_mempolicy_home_node"),
            m("mseal"),
            m("map_shadow_stack"),
            m("remap_file_pages"),
        ],
    },
    Group {
        name: "@ipc",
        description: "Pipes, SysV IPC and POSIX message queues (private to the jail's IPC namespace)",
        dangerous: false,
        includes: &[],
        members: &[
            m("pipe"),
            m("pipe2"),
            m("shmget"),
            m("shmat"),
            m("shmdt"),
            m("shmctl"),
            m("semget"),
            m("semop"),
            m("semtimedop"),
            m("semctl"),
            m("msgget"),
            m("msgsnd"),
            m("msgrcv"),
            m("msgctl"),
            m("mq_open"),
            m("mq_unlink"),
            m("mq_timedsend"),
            m("mq_timedreceive"),
            m("mq_notify"),
            m("mq_getsetattr"),
        ],
    },
    Group {
        name: "@network-io",
        description: "Sockets of the allowed families (default unix, inet, inet6; never raw or packet)",
        dangerous: false,
        includes: &[],
        members: &[
            c("socket", ArgCond::AllowedSocketFamily),
            c("socketpair", ArgCond::AllowedSocketFamily),
            m("bind"),
            m("listen"),
            m("accept"),
            m("accept4"),
            m("connect"),
            m("getsockname"),
            m("getpeername"),
            m("setsockopt"),
            m("getsockopt"),
            m("sendto"),
            m("recvfrom"),
            m("sendmsg"),
            m("recvmsg"),
            m("sendmmsg"),
            m("recvmmsg"),
            m("shutdown"),
        ],
    },
    Group {
        name: "@credentials",
        description: "Reading and switching among the process's own user and group ids",
        dangerous: false,
        includes: &[],
        members: &[
            m("getuid"),
            m("geteuid"),
            m("getgid"),
            m("getegid"),
            m("getresuid"),
            m("getresgid"),
            m("getgroups"),
            m("setuid"),
            m("setgid"),
            m("setreuid"),
            m("setregid"),
            m("setresuid"),
            m("setresgid"),
            m("setgroups"),
            m("setfsuid"),
            m("setfsgid"),
            m("capget"),
            m("capset"),
        ],
    },
    Group {
        name: "@sync",
        description: "Futexes",
        dangerous: false,
        includes: &[],
        members: &[m("futex"), m("futex_waitv"), m("futex_wake"), m("futex_wait"), m("futex_requeue")],
    },
    Group {
        name: "@aio",
        description: "Linux native asynchronous I/O (not io_uring)",
        dangerous: false,
        includes: &[],
        members: &[
            m("io_setup"),
            m("io_destroy"),
            m("io_getevents"),
            m("io_pgetevents"),
            m("io_submit"),
            m("io_cancel"),
        ],
    },
    Group {
        name: "@sandbox",
        description: "Self-restriction: seccomp and landlock can only narrow what a process may do",
        dangerous: false,
        includes: &[],
        members: &[m("seccomp"), m("landlock_create_ruleset"), m("landlock_add_rule"), m("landlock_restrict_self")],
    },
    Group {
        name: "@system-info",
        description: "uname, sysinfo, getrandom",
        dangerous: false,
        includes: &[],
        members: &[m("uname"), m("sysinfo"), m("getrandom")],
    },
    // ---- dangerous groups: never in the default policy ----
    Group {
        name: "@mount",
        description: "Mounting, pivot_root and chroot",
        dangerous: true,
        includes: &[],
        members: &[
            m("mount"),
            m("umount2"),
            m("fsopen"),
            m("fsconfig"),
            m("fsmount"),
            m("fspick"),
            m("move_mount"),
            m("open_tree"),
            m("open_tree_attr"),
            m("mount_setattr"),
            m("pivot_root"),
            m("chroot"),
            m("statmount"),
            m("listmount"),
        ],
    },
    Group {
        name: "@module",
        description: "Loading and unloading kernel modules",
        dangerous: true,
        includes: &[],
        members: &[
            m("init_module"),
            m("finit_module"),
            m("delete_module"),
            m("create_module"),
            m("query_module"),
            m("get_kernel_syms"),
        ],
    },
    Group {
        name: "@raw-io",
        description: "Raw port I/O",
        dangerous: true,
        includes: &[],
        members: &[m("iopl"), m("ioperm")],
    },
    Group {
        name: "@reboot",
        description: "Rebooting and loading a new kernel",
        dangerous: true,
        includes: &[],
        members: &[m("reboot"), m("kexec_load"), m("kexec_file_load")],
    },
    Group {
        name: "@swap",
        description: "Enabling and disabling swap",
        dangerous: true,
        includes: &[],
        members: &[m("swapon"), m("swapoff")],
    },
    Group {
        name: "@clock",
        description: "Setting the system clock",
        dangerous: true,
        includes: &[],
        members: &[m("settimeofday"), m("clock_settime"), m("clock_adjtime"), m("adjtimex")],
    },
    Group {
        name: "@debug",
        description: "ptrace, cross-process memory access, perf, kcmp, pidfd_getfd",
        dangerous: true,
        includes: &[],
        members: &[
            m("ptrace"),
            m("process_vm_readv"),
            m("process_vm_writev"),
            m("perf_event_open"),
            m("kcmp"),
            m("pidfd_getfd"),
            m("process_madvise"),
            m("lookup_dcookie"),
        ],
    },
    Group {
        name: "@keyring",
        description: "The kernel keyring",
        dangerous: true,
        includes: &[],
        members: &[m("keyctl"), m("add_key"), m("request_key")],
    },
    Group { name: "@bpf", description: "eBPF programs and maps", dangerous: true, includes: &[], members: &[m("bpf")] },
    Group {
        name: "@io-uring",
        description: "io_uring, whose I/O bypasses seccomp's view",
        dangerous: true,
        includes: &[],
        members: &[m("io_uring_setup"), m("io_uring_enter"), m("io_uring_register")],
    },
    Group {
        name: "@namespaces",
        description: "Creating and joining namespaces: unshare, setns, clone with CLONE_NEW* flags",
        dangerous: true,
        includes: &[],
        members: &[m("unshare"), m("setns"), m("clone"), m("clone3")],
    },
    Group {
        name: "@obsolete",
        description: "Syscalls that are unused, unimplemented or superseded",
        dangerous: true,
        includes: &[],
        members: &[
            m("_sysctl"),
            m("uselib"),
            m("ustat"),
            m("sysfs"),
            m("afs_syscall"),
            m("getpmsg"),
            m("putpmsg"),
            m("security"),
            m("tuxcall"),
            m("vserver"),
            m("epoll_ctl_old"),
            m("epoll_wait_old"),
            m("set_thread_area"),
            m("get_thread_area"),
            m("modify_ldt"),
        ],
    },
    Group {
        name: "@privileged",
        description: "Operations that need host privileges or expose host state: handles, quotas, \
                      accounting, syslog, userfaultfd, fanotify, host and domain names",
        dangerous: true,
        includes: &[],
        members: &[
            m("acct"),
            m("quotactl"),
            m("quotactl_fd"),
            m("open_by_handle_at"),
            m("name_to_handle_at"),
            m("syslog"),
            m("vhangup"),
            m("sethostname"),
            m("setdomainname"),
            m("fanotify_init"),
            m("fanotify_mark"),
            m("userfaultfd"),
            m("nfsservctl"),
            m("memfd_secret"),
            m("process_mrelease"),
            m("migrate_pages"),
            m("move_pages"),
            m("lsm_get_self_attr"),
            m("lsm_set_self_attr"),
            m("lsm_list_modules"),
        ],
    },
];

/// The syscall table of the architecture Stockade was built for, sorted by name.
pub(crate) fn native_table() -> &'static [(&'static str, i64)] {
    #[cfg(target_arch = "x86_64")]
    {
        table::X86_64
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        &[]
    }
}

/// The table's entry for `name`: a binary search, so a jail start builds no index.
fn entry(name: &str) -> Option<(&'static str, i64)> {
    let t = native_table();
    t.binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes())).ok().map(|i| t[i])
}

/// The syscall number for `name` on the native architecture.
pub fn number(name: &str) -> Option<i64> {
    entry(name).map(|(_, nr)| nr)
}

pub fn group(name: &str) -> Option<&'static Group> {
    GROUPS.iter().find(|g| g.name == name)
}

/// Every member of a group, following includes. A syscall may appear more than once with
/// different conditions; the compiler combines them.
pub(crate) fn expand_group(name: &str) -> Vec<Member> {
    let mut out = Vec::new();
    if let Some(g) = group(name) {
        for inc in g.includes {
            out.extend(expand_group(inc));
        }
        out.extend_from_slice(g.members);
    }
    out
}

/// An allow/deny entry that names nothing known; with the nearest known name, if one is close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownEntry {
    #[error("unknown syscall group `{name}`{}", did_you_mean(*.nearest))]
    Group { name: String, nearest: Option<&'static str> },
    #[error("unknown syscall `{name}`{}", did_you_mean(*.nearest))]
    Syscall { name: String, nearest: Option<&'static str> },
}

fn did_you_mean(nearest: Option<&str>) -> String {
    nearest.map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default()
}

/// Resolves an allow/deny entry (a group or a single syscall) to its members.
/// Errors carry a suggestion for the nearest known name.
pub(crate) fn resolve_entry(entry: &str) -> Result<Vec<Member>, UnknownEntry> {
    if entry.starts_with('@') {
        if group(entry).is_some() {
            return Ok(expand_group(entry));
        }
        let nearest = crate::util::nearest(entry, GROUPS.iter().map(|g| g.name));
        return Err(UnknownEntry::Group { name: entry.to_owned(), nearest });
    }
    // A bare syscall name in `allow` is unconditional: the policy author asked for it. The
    // table's own copy of the name is the `'static` one a member holds.
    if let Some((name, _)) = self::entry(entry) {
        return Ok(vec![Member { name, cond: None }]);
    }
    let nearest = crate::util::nearest(entry, native_table().iter().map(|(n, _)| *n));
    Err(UnknownEntry::Syscall { name: entry.to_owned(), nearest })
}

/// A syscall the allowlist admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub name: &'static str,
    /// `None`: unconditionally; otherwise when any of these conditions holds (sorted, no repeats).
    pub conds: Option<Vec<ArgCond>>,
}

/// What a policy's allowlist admits, indexed by syscall number: resolved once, when the policy
/// is read; a vector slot per number costs no hashing or ordering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    slots: Vec<Option<Admitted>>,
}

impl Allowlist {
    fn admit(&mut self, name: &'static str, nr: usize, cond: Option<ArgCond>) {
        if self.slots.len() <= nr {
            self.slots.resize(nr + 1, None);
        }
        let slot = &mut self.slots[nr];
        match (slot.as_mut().map(|a| &mut a.conds), cond) {
            // Unconditional already: a condition from another group cannot narrow it.
            (Some(None), _) => {}
            (Some(conds), None) => *conds = None,
            (Some(Some(list)), Some(c)) => {
                if let Err(at) = list.binary_search(&c) {
                    list.insert(at, c);
                }
            }
            (None, c) => *slot = Some(Admitted { name, conds: c.map(|c| vec![c]) }),
        }
    }

    fn remove(&mut self, nr: usize) {
        if let Some(slot) = self.slots.get_mut(nr) {
            *slot = None;
        }
    }

    /// What the allowlist says about `name`; `None` when it does not admit it.
    pub fn get(&self, name: &str) -> Option<&Admitted> {
        let nr = usize::try_from(number(name)?).ok()?;
        self.slots.get(nr)?.as_ref()
    }

    /// Whether `name` is admitted without an argument condition.
    pub fn unconditional(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Admitted { conds: None, .. }))
    }

    /// Admitted syscalls by number, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Admitted)> {
        self.slots.iter().enumerate().filter_map(|(nr, a)| Some((nr as u32, a.as_ref()?)))
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which syscalls `allow` minus `deny` admits, and under which conditions.
pub fn allowlist(allow: &[String], deny: &[String]) -> Result<Allowlist, UnknownEntry> {
    let nr_of = |name: &str| {
        number(name)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| UnknownEntry::Syscall { name: name.to_owned(), nearest: None })
    };
    let mut allowed = Allowlist::default();
    for entry in allow {
        for m in resolve_entry(entry)? {
            allowed.admit(m.name, nr_of(m.name)?, m.cond);
        }
    }
    for entry in deny {
        for m in resolve_entry(entry)? {
            allowed.remove(nr_of(m.name)?);
        }
    }
    // clone3 always reaches the prelude's ENOSYS when clone is allowed, whatever the default
    // action: a kill here would take down every program whose libc tries clone3 first.
    if allowed.get("clone").is_some() {
        allowed.admit("clone3", nr_of("clone3")?, None);
    }
    Ok(allowed)
}

/// [`Allowlist`] by name, for the audit: `None` = unconditionally.
pub(crate) fn by_name(
    a: &Allowlist,
) -> std::collections::BTreeMap<&'static str, Option<std::collections::BTreeSet<ArgCond>>> {
    a.iter().map(|(_, a)| (a.name, a.conds.as_ref().map(|c| c.iter().copied().collect()))).collect()
}

/// The calls of `a` that could make a setuid or setgid file: a guarded one admitted without its
/// mode condition, or openat2 at all. None means the jail cannot leave such a file behind.
pub(crate) fn setid_openings(a: &Allowlist) -> Vec<&'static str> {
    let allowed = by_name(a);
    SETID_GUARDED.iter().copied().chain(["openat2"]).filter(|n| matches!(allowed.get(n), Some(None))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_by_name_with_unique_names_and_numbers() {
        let t = native_table();
        assert!(t.windows(2).all(|w| w[0].0.as_bytes() < w[1].0.as_bytes()), "not sorted by name");
        let numbers: std::collections::BTreeSet<i64> = t.iter().map(|(_, n)| *n).collect();
        assert_eq!(numbers.len(), t.len(), "a number appears twice");
        assert_eq!(number("no_such_call"), None);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(number("read"), Some(0));
            assert_eq!(number("file_setattr"), Some(469));
            assert_eq!(number("_sysctl"), Some(156));
        }
    }

    #[test]
    fn every_group_member_is_a_known_syscall() {
        for g in GROUPS {
            for inc in g.includes {
                assert!(group(inc).is_some(), "{} includes unknown {inc}", g.name);
            }
            for mem in g.members {
                assert!(number(mem.name).is_some(), "{}: unknown syscall {}", g.name, mem.name);
            }
        }
    }

    #[test]
    fn system_service_excludes_every_dangerous_group() {
        let safe: Vec<&str> = expand_group("@system-service").iter().map(|m| m.name).collect();
        for g in GROUPS.iter().filter(|g| g.dangerous) {
            for mem in g.members {
                // clone/clone3 appear in @process with a condition (clone) or an ENOSYS answer
                // (clone3); @namespaces lists them to lift the condition.
                if g.name == "@namespaces" && (mem.name == "clone" || mem.name == "clone3") {
                    continue;
                }
                assert!(!safe.contains(&mem.name), "{} from {} is in @system-service", mem.name, g.name);
            }
        }
    }

    #[test]
    fn typo_suggests_nearest() {
        let e = resolve_entry("@sytem-service").unwrap_err();
        assert_eq!(e.to_string(), "unknown syscall group `@sytem-service` (did you mean `@system-service`?)");
        let e = resolve_entry("opennat").unwrap_err();
        assert_eq!(e, UnknownEntry::Syscall { name: "opennat".into(), nearest: Some("openat") });
    }
}
