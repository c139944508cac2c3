//! Step 2: the jail's filesystem.
//!
//! Runs inside the new mount namespace, as the namespace's privileged setup user. Order matters:
//! 1. make every inherited mount private, so nothing propagates back to the host;
//! 2. resolve every source (lstat + O_PATH open) while the host tree is still fully visible —
//!    later steps mount over the staging directory, which may hide sources below it;
//! 3. mount a tmpfs as the new root and populate it: read-only binds, generated /etc, the
//!    workspace and outputs, /tmp, /dev, /proc (masked), optionally /sys;
//! 4. pivot_root into it, detach the old root, remount the root read-only.
//!
//! Binds are made from the O_PATH descriptors (`/proc/self/fd/N`), so a path that changes after
//! it was resolved (a symlink swapped in by a previous session) cannot redirect a mount.

use super::fsio::{list_dir, open, read_kernel_file};
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, pivot_root};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

use super::error::{JailError, Step, StepExt};
use crate::policy::{Access, Bind, Policy, SysMode};

/// Where the new root is assembled, inside the jail's private mount namespace only.
const STAGING: &str = "/tmp";

pub(crate) const WORKSPACE: &str = "/workspace";
pub(crate) const OUTPUTS: &str = "/mnt/session/outputs";

/// Device nodes bound from the host's /dev. Nothing else: no block devices, no mem/kmem/port/kmsg.
pub(crate) const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// /proc entries hidden behind /dev/null (files) or a removed, empty directory (directories, see
/// `build_proc`), but see `unreachable_from_jail`.
const PROC_MASKED: &[&str] = &[
    "kcore",
    "keys",
    "key-users",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "kallsyms",
    "kmsg",
    "vmallocinfo",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "acpi",
    "scsi",
    "asound",
    "firmware",
    "driver",
];
/// A fresh /proc lists the kernel's ~60 entries and the jail's one process.
const PROC_LISTING_MAX: usize = 4096;
/// /proc entries left visible but read-only: writing /proc/sys/kernel/core_pattern or
/// /proc/sysrq-trigger must not reach the host.
const PROC_READ_ONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];
const SYS_MASKED: &[&str] = &["firmware", "kernel/security", "kernel/debug", "fs/cgroup", "fs/bpf"];

/// What the supervisor hands to the mount step.
pub(crate) struct MountPlan<'a> {
    pub policy: &'a Policy,
    pub workspace: Option<&'a Path>,
    pub outputs: Option<&'a Path>,
    /// Detached, id-mapped mount trees prepared by the supervisor for a workspace/outputs owned
    /// by another host user (see `idmap`). When present they replace the plain bind.
    pub workspace_tree: Option<&'a OwnedFd>,
    pub outputs_tree: Option<&'a OwnedFd>,
    /// Id-mapped trees that replace the plain bind of the policy entry with that destination.
    pub bind_trees: &'a [(PathBuf, OwnedFd)],
    /// Policy binds (by destination) attached after the workspace, the outputs and /tmp: a
    /// session's memory folders, which may lie below them.
    pub late: Vec<PathBuf>,
    /// veth mode: the session's resolver, for /etc/resolv.conf.
    pub resolver: Option<std::net::Ipv4Addr>,
}

enum Source {
    /// A directory of the root's own tmpfs, bound writable on itself (workspace or outputs with
    /// no host directory; see `scratch_dir`).
    Scratch,
    /// An O_PATH descriptor of the host object.
    Fd { fd: OwnedFd, is_dir: bool },
    /// A detached mount tree to attach with move_mount(2).
    Tree(i32),
    /// A symlink recreated as-is (e.g. /bin -> usr/bin on merged-/usr systems).
    Symlink(PathBuf),
}

struct Entry {
    dst: PathBuf,
    src: Source,
    read_only: bool,
    /// Jail uid/gid owning a scratch source.
    owner: (u32, u32),
}

pub(crate) fn build_root(plan: &MountPlan) -> Result<(), JailError> {
    let p = plan.policy;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .step(Step::Mounts, || "make / private".into())?;

    // --- resolve everything first ---
    let system_root = p.filesystem.rootfs.as_deref();
    let mut entries = Vec::new();
    let owner = (p.user.uid, p.user.gid);
    let tree = |b: &crate::policy::Bind, read_only: bool| {
        plan.bind_trees.iter().find(|(d, _)| *d == b.dst).map(|(_, t)| Entry {
            dst: b.dst.clone(),
            src: Source::Tree(t.as_raw_fd()),
            read_only,
            owner,
        })
    };
    // A session's memory folders go on last, so that one placed below the workspace, the
    // outputs or /tmp is not hidden by them.
    let mut late = Vec::new();
    for (b, read_only) in
        p.filesystem.read_only.iter().map(|b| (b, true)).chain(p.filesystem.read_write.iter().map(|b| (b, false)))
    {
        let e = match tree(b, read_only) {
            Some(e) => Some(e),
            None => resolve(b, if read_only { system_root } else { None }, read_only)?,
        };
        match e {
            Some(e) if plan.late.contains(&b.dst) => late.push(e),
            Some(e) => entries.push(e),
            None => {}
        }
    }
    let mut etc_entries = Vec::new();
    for b in &p.filesystem.etc {
        if let Some(e) = resolve(b, system_root, true)? {
            etc_entries.push(e);
        }
    }
    let ws_ro = p.filesystem.workspace == Access::ReadOnly;
    let workspace = match (plan.workspace_tree, plan.workspace) {
        (Some(t), _) => Entry { dst: WORKSPACE.into(), src: Source::Tree(t.as_raw_fd()), read_only: ws_ro, owner },
        (None, Some(w)) => Entry { dst: WORKSPACE.into(), src: open_dir(w, "workspace")?, read_only: ws_ro, owner },
        (None, None) => Entry { dst: WORKSPACE.into(), src: Source::Scratch, read_only: ws_ro, owner },
    };
    let outputs = match (plan.outputs_tree, plan.outputs) {
        (Some(t), _) => Entry { dst: OUTPUTS.into(), src: Source::Tree(t.as_raw_fd()), read_only: false, owner },
        (None, Some(o)) => Entry { dst: OUTPUTS.into(), src: open_dir(o, "outputs")?, read_only: false, owner },
        (None, None) => Entry { dst: OUTPUTS.into(), src: Source::Scratch, read_only: false, owner },
    };
    let mut devices = Vec::new();
    for d in DEVICES {
        let host = Path::new("/dev").join(d);
        let fd = open(&host, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            .step(Step::Mounts, || format!("open host {}", host.display()))?;
        devices.push((*d, fd));
    }

    // --- the new root ---
    let root = Path::new(STAGING);
    mount(Some("tmpfs"), root, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755,size=16m"))
        .step(Step::Mounts, || format!("tmpfs root at {STAGING}"))?;

    entries.sort_by_key(|e| e.dst.components().count());
    for e in &entries {
        attach(root, e)?;
    }

    let etc = root.join("etc");
    mkdir_p(&etc)?;
    for (name, content) in super::etc::generated_files(p, plan.resolver) {
        write_file(&etc.join(name), content.as_bytes())?;
    }
    etc_entries.sort_by_key(|e| e.dst.components().count());
    for e in &etc_entries {
        if !copy_in(root, e)? && !copy_dir_in(root, e)? {
            attach(root, e)?;
        }
    }
    // The root's tmpfs also holds the writable scratch areas: room for them on top of what the
    // root holds by now.
    let used = nix::sys::statvfs::statvfs(root).map(|s| (s.blocks() - s.blocks_free()) * s.fragment_size());
    let size = used.step(Step::Mounts, || "statvfs the new root".into())?.saturating_add(p.limits.tmp_size.0);
    // A remount sets the mount's flags to exactly those given: keep nosuid and nodev.
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(None::<&str>, root, None::<&str>, flags, Some(format!("size={size}").as_str()))
        .step(Step::Mounts, || "size the new root's tmpfs".into())?;

    attach(root, &workspace)?;
    attach(root, &outputs)?;
    shared_scratch(&root.join("tmp"))?;
    late.sort_by_key(|e| e.dst.components().count());
    for e in &late {
        attach(root, e)?;
    }

    build_dev(root, &devices)?;
    build_proc(root)?;
    if p.filesystem.sys == SysMode::ReadOnly {
        build_sys(root)?;
    }
    drop(devices);
    drop(entries);
    drop(etc_entries);

    // --- switch ---
    chdir(root).step(Step::Mounts, || "chdir new root".into())?;
    pivot_root(".", ".").step(Step::Mounts, || "pivot_root".into())?;
    // The old root now sits on top of the new one at "/"; detaching it leaves only our tree.
    umount2(".", MntFlags::MNT_DETACH).step(Step::Mounts, || "detach old root".into())?;
    chdir("/").step(Step::Mounts, || "chdir /".into())?;
    set_attr(Path::new("/"), false, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        .step(Step::Mounts, || "remount / read-only".into())?;
    Ok(())
}

fn resolve(b: &Bind, system_root: Option<&Path>, read_only: bool) -> Result<Option<Entry>, JailError> {
    let host = match system_root {
        Some(r) => r.join(b.src.strip_prefix("/").unwrap_or(&b.src)),
        None => b.src.clone(),
    };
    let meta = match std::fs::symlink_metadata(&host) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && b.optional => return Ok(None),
        Err(e) => {
            return Err(JailError::new(
                Step::Mounts,
                format!(
                    "{} (from `{b}`): {e}{}",
                    host.display(),
                    if b.optional { "" } else { "; prefix the entry with `-` to skip it when missing" }
                ),
            ))
        }
    };
    let src = if meta.file_type().is_symlink() {
        Source::Symlink(std::fs::read_link(&host).step(Step::Mounts, || format!("readlink {}", host.display()))?)
    } else {
        let fd = open(&host, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            .step(Step::Mounts, || format!("open {}", host.display()))?;
        Source::Fd { fd, is_dir: meta.is_dir() }
    };
    Ok(Some(Entry { dst: b.dst.clone(), src, read_only, owner: (0, 0) }))
}

fn open_dir(path: &Path, what: &str) -> Result<Source, JailError> {
    let fd = open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| JailError::new(Step::Mounts, format!("{what} {}: {e}", path.display())))?;
    Ok(Source::Fd { fd, is_dir: true })
}

fn attach(root: &Path, e: &Entry) -> Result<(), JailError> {
    let target = root.join(e.dst.strip_prefix("/").unwrap_or(&e.dst));
    let ctx = || format!("{}", e.dst.display());
    match &e.src {
        Source::Symlink(to) => {
            with_parents(&target, || symlink(to, &target))
                .step(Step::Mounts, || format!("symlink {} -> {}", e.dst.display(), to.display()))?;
            return Ok(());
        }
        Source::Fd { fd, is_dir } => {
            if *is_dir {
                mkdir_p(&target)?;
            } else {
                with_parents(&target, || bind_target_file(&target))
                    .step(Step::Mounts, || format!("create {}", target.display()))?;
            }
            let from = format!("/proc/self/fd/{}", fd.as_raw_fd());
            mount(Some(from.as_str()), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .step(Step::Mounts, || format!("bind {}", ctx()))?;
        }
        // Owned by the jail user, who must be able to write it (setup runs as jail root).
        Source::Scratch => scratch_dir(&target, 0o755, e.owner)?,
        Source::Tree(fd) => {
            mkdir_p(&target)?;
            move_tree(*fd, &target).step(Step::Mounts, || format!("attach id-mapped {}", ctx()))?;
        }
    }
    let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if e.read_only {
        attrs |= MOUNT_ATTR_RDONLY;
    }
    set_attr(&target, true, attrs).step(Step::Mounts, || format!("restrict {}", ctx()))
}

/// Largest /etc file copied rather than bound: beyond a few pages a copy costs more than a bind.
const ETC_COPY_MAX: u64 = 16 << 10;

/// Copies a small regular file into the new root instead of binding it: the jail sees the same
/// bytes (read-only, like everything in the root), and there is no mount to set up and tear
/// down with each jail. Read through the descriptor resolved earlier, so a path swapped since
/// cannot redirect it. Returns false (bind it instead) for directories, large files and files
/// the setup user cannot read, whose host permissions a bind keeps.
fn copy_in(root: &Path, e: &Entry) -> Result<bool, JailError> {
    let Source::Fd { fd, is_dir: false } = &e.src else { return Ok(false) };
    // Looked at before opening: opening a FIFO or a device planted under /etc could block or act.
    let st = nix::sys::stat::fstat(fd).step(Step::Mounts, || format!("stat {}", e.dst.display()))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size as u64 > ETC_COPY_MAX {
        return Ok(false);
    }
    let Ok(f) = open(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(), OFlag::O_RDONLY, Mode::empty()) else {
        return Ok(false);
    };
    let Some((content, _)) = read_small(f, Some((st.st_size as u64, st.st_mode))) else { return Ok(false) };
    let target = root.join(e.dst.strip_prefix("/").unwrap_or(&e.dst));
    with_parents(&target, || create_file(&target, &content, st.st_mode & 0o755))
        .step(Step::Mounts, || format!("write {}", target.display()))?;
    Ok(true)
}

/// Most entries (subdirectories and their contents included) an /etc directory may hold to be
/// copied rather than bound: ld.so.conf.d, python3 or ca-certificates have a handful.
const ETC_COPY_DIR_ENTRIES: usize = 8;

/// What a small directory copy writes, in order (a directory before its contents).
enum Copied {
    Dir(PathBuf, u32),
    File(PathBuf, Vec<u8>, u32),
    Link(PathBuf, PathBuf),
}

/// Copies a small directory of small files and symlinks (see `copy_in`) instead of binding it:
/// a mount less per directory. Everything is read first, each step through a descriptor and
/// without following symlinks; nothing is written unless the whole tree qualifies. Returns
/// false (bind it instead) otherwise.
fn copy_dir_in(root: &Path, e: &Entry) -> Result<bool, JailError> {
    let Source::Fd { fd, is_dir: true } = &e.src else { return Ok(false) };
    // Through the O_PATH descriptor's magic link, which names exactly the directory resolved
    // earlier (O_NOFOLLOW would refuse the link itself).
    let opened =
        open(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_str(), OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty());
    let Ok(dir) = opened else { return Ok(false) };
    let Ok(st) = nix::sys::stat::fstat(&dir) else { return Ok(false) };
    let mut plan = Vec::new();
    // Each listing stops at what is left of the budget; siblings listed before a subdirectory
    // was read may still take the whole over it.
    if !scan_small_dir(dir, Path::new(""), &mut plan, 0) || plan.len() > ETC_COPY_DIR_ENTRIES {
        return Ok(false);
    }
    let target = root.join(e.dst.strip_prefix("/").unwrap_or(&e.dst));
    mkdir_mode(&target, st.st_mode & 0o755)?;
    for item in plan {
        match item {
            Copied::Dir(rel, mode) => mkdir_mode(&target.join(rel), mode)?,
            Copied::File(rel, content, mode) => write_file_mode(&target.join(rel), &content, mode)?,
            Copied::Link(rel, to) => symlink(&to, target.join(&rel))
                .step(Step::Mounts, || format!("symlink {}", e.dst.join(&rel).display()))?,
        }
    }
    Ok(true)
}

/// Reads `dir` into `plan`; false as soon as something disqualifies the copy. Entries are
/// counted before any is looked at, so a large directory (alternatives, ssl) costs one read of
/// its names; each entry is then reached relative to `dir`, never through a path.
fn scan_small_dir(dir: OwnedFd, rel: &Path, plan: &mut Vec<Copied>, depth: usize) -> bool {
    use nix::dir::Type;
    use nix::fcntl::{openat, readlinkat};
    let Some(names) = list_dir(&dir, ETC_COPY_DIR_ENTRIES - plan.len().min(ETC_COPY_DIR_ENTRIES)) else {
        return false;
    };
    for (name, d_type) in names {
        let kind = match d_type {
            libc::DT_LNK => Type::Symlink,
            libc::DT_REG => Type::File,
            libc::DT_DIR => Type::Directory,
            // A filesystem without d_type: ask without following the entry.
            libc::DT_UNKNOWN => {
                match nix::sys::stat::fstatat(&dir, name.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => match st.st_mode & libc::S_IFMT {
                        libc::S_IFLNK => Type::Symlink,
                        libc::S_IFREG => Type::File,
                        libc::S_IFDIR => Type::Directory,
                        _ => return false,
                    },
                    Err(_) => return false,
                }
            }
            _ => return false,
        };
        let here = rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        match kind {
            Type::Symlink => {
                let Ok(to) = readlinkat(&dir, name.as_c_str()) else { return false };
                plan.push(Copied::Link(here, to.into()));
            }
            Type::File => {
                // Non-blocking: a FIFO swapped in since the listing cannot stall the jail.
                let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
                let Ok(fd) = openat(&dir, name.as_c_str(), flags, Mode::empty()) else { return false };
                let Some((content, mode)) = read_small(fd, None) else { return false };
                plan.push(Copied::File(here, content, mode & 0o755));
            }
            Type::Directory if depth == 0 => {
                let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let Ok(sub) = openat(&dir, name.as_c_str(), flags, Mode::empty()) else { return false };
                let Ok(st) = nix::sys::stat::fstat(&sub) else { return false };
                plan.push(Copied::Dir(here.clone(), st.st_mode & 0o755));
                if !scan_small_dir(sub, &here, plan, depth + 1) {
                    return false;
                }
            }
            // Deeper trees, FIFOs, sockets and devices (never opened) are bound.
            _ => return false,
        }
    }
    true
}

/// The whole content and mode of an opened file that is (still) a regular file of at most
/// `ETC_COPY_MAX` bytes; `None` (bind it instead) for anything else, a file that grew past that
/// since it was looked at included. `known`: its size and mode when the caller has just looked
/// at this very file (through the descriptor it was reopened from).
fn read_small(fd: OwnedFd, known: Option<(u64, u32)>) -> Option<(Vec<u8>, u32)> {
    let (size, mode) = match known {
        Some(k) => k,
        None => {
            let st = nix::sys::stat::fstat(&fd).ok()?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return None;
            }
            (st.st_size as u64, st.st_mode)
        }
    };
    if size > ETC_COPY_MAX {
        return None;
    }
    // Room for the whole file and one byte more, so that one read does in the usual case: it
    // brings the size just seen and stops short of the spare byte. A read that stops short
    // sooner (a filesystem may) is followed by more until end-of-file; a full buffer means the
    // file grew, and reading goes on to its end or past the limit.
    let mut content = vec![0u8; size as usize + 1];
    let mut len = 0;
    loop {
        let n = match nix::unistd::read(&fd, &mut content[len..]) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None,
        };
        len += n;
        if n == 0 || (len < content.len() && len as u64 >= size) {
            break;
        }
        if len < content.len() {
            continue;
        }
        if len as u64 > ETC_COPY_MAX {
            return None;
        }
        content.resize((len * 2).min(ETC_COPY_MAX as usize + 1), 0);
    }
    content.truncate(len);
    Some((content, mode))
}

/// Creates `path` and any missing parents; the setup user always keeps write access to fill it.
fn mkdir_mode(path: &Path, mode: u32) -> Result<(), JailError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode | 0o700)
        .create(path)
        .step(Step::Mounts, || format!("mkdir {}", path.display()))
}

/// /dev is a directory of the read-only root: its device nodes are binds of the host's, each
/// read-only (no new nodes, no metadata changes; a mount's read-only flag does not stop writes
/// to a device itself), nosuid and noexec.
fn build_dev(root: &Path, devices: &[(&str, OwnedFd)]) -> Result<(), JailError> {
    let dev = root.join("dev");
    mkdir_p(&dev)?;
    for (name, fd) in devices {
        let target = dev.join(name);
        bind_target_file(&target).step(Step::Mounts, || format!("create {}", target.display()))?;
        let from = format!("/proc/self/fd/{}", fd.as_raw_fd());
        mount(Some(from.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .step(Step::Mounts, || format!("bind /dev/{name}"))?;
        set_attr(&target, false, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
            .step(Step::Mounts, || format!("read-only /dev/{name}"))?;
    }
    symlink("pts/ptmx", dev.join("ptmx")).step(Step::Mounts, || "/dev/ptmx".into())?;
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, dev.join(name)).step(Step::Mounts, || format!("/dev/{name}"))?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .step(Step::Mounts, || "devpts /dev/pts".into())?;
    shared_scratch(&dev.join("shm"))
}

fn build_proc(root: &Path) -> Result<(), JailError> {
    let proc = root.join("proc");
    mkdir_p(&proc)?;
    mount(Some("proc"), &proc, Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None::<&str>)
        .step(Step::Mounts, || "mount /proc".into())?;
    // One listing instead of a lookup per name: this /proc belongs to the new pid namespace, so
    // it lists the kernel's entries and the jail's single process.
    let listing =
        open(&proc, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).step(Step::Mounts, || "open /proc".into())?;
    let present = list_dir(&listing, PROC_LISTING_MAX)
        .ok_or_else(|| JailError::new(Step::Mounts, "list /proc: unreadable or unexpectedly large"))?;
    drop(listing);
    let is_present = |name: &str| {
        let (n, d_type) = present.iter().find(|(n, _)| n.as_bytes() == name.as_bytes())?;
        Some(match *d_type {
            libc::DT_UNKNOWN => proc.join(std::ffi::OsStr::from_bytes(n.as_bytes())).is_dir(),
            t => t == libc::DT_DIR,
        })
    };
    let null = format!("{}/dev/null", root.display());
    let unmapped = read_kernel_file(proc.join("sys/kernel/overflowuid")).ok().and_then(|s| s.trim().parse().ok());
    // Masked directories show an empty directory that no longer exists: binds of one made on
    // the root and removed again, read-only (nothing can be created in a removed directory
    // anyway). No filesystem of their own to make and tear down.
    let empty = root.join(".mask");
    let mut empty_made = false;
    for name in PROC_MASKED {
        let Some(is_dir) = is_present(name) else { continue };
        let path = proc.join(name);
        if !is_dir && unreachable_from_jail(&path, unmapped) {
            continue;
        }
        let src = match is_dir {
            true if !empty_made => {
                mkdir_mode(&empty, 0o555)?;
                empty_made = true;
                empty.as_path()
            }
            true => empty.as_path(),
            false => Path::new(null.as_str()),
        };
        mount(Some(src), &path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .step(Step::Mounts, || format!("mask /proc/{name}"))?;
        if is_dir {
            set_attr(&path, false, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC)
                .step(Step::Mounts, || format!("read-only mask of /proc/{name}"))?;
        }
    }
    if empty_made {
        std::fs::remove_dir(&empty).step(Step::Mounts, || "remove the mask directory".into())?;
    }
    for name in PROC_READ_ONLY {
        if is_present(name).is_none() {
            continue;
        }
        let path = proc.join(name);
        mount(Some(&path), &path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .step(Step::Mounts, || format!("bind /proc/{name}"))?;
        set_attr(&path, true, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC)
            .step(Step::Mounts, || format!("read-only /proc/{name}"))?;
    }
    Ok(())
}

/// Whether nothing in any jail can open this /proc file: its mode grants nothing beyond its
/// owner, and the owner of /proc's own entries is the host's root, which no jail maps (the id
/// maps refuse host uid 0, and a rootless jail maps only its unprivileged caller). Capabilities
/// held in the jail's user namespace do not apply to files of unmapped owners, so even a jail
/// root keeping CAP_DAC_OVERRIDE is refused. Such entries (kmsg, kpage*, vmallocinfo, timer_list
/// on current kernels) need no mask: each mask is a mount to make and tear down per jail. The
/// mode is read in the jail's own /proc, so a kernel that opens an entry up gets it masked.
/// `unmapped` is the uid an unmapped owner shows as from inside the jail's user namespace (the
/// kernel's overflow uid); an entry showing any other owner is masked.
fn unreachable_from_jail(path: &Path, unmapped: Option<u32>) -> bool {
    match (nix::sys::stat::lstat(path), unmapped) {
        (Ok(st), Some(unmapped)) => {
            st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o077 == 0 && st.st_uid == unmapped
        }
        _ => false,
    }
}

fn build_sys(root: &Path) -> Result<(), JailError> {
    let sys = root.join("sys");
    mkdir_p(&sys)?;
    mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .step(Step::Mounts, || "mount /sys read-only".into())?;
    for name in SYS_MASKED {
        let path = sys.join(name);
        if path.is_dir() {
            mask_dir(&path).step(Step::Mounts, || format!("mask /sys/{name}"))?;
        }
    }
    Ok(())
}

/// A writable directory on the root's tmpfs (/tmp, /dev/shm, and a workspace or outputs with no
/// host directory): bound on itself, so it stays writable when the root turns read-only (the
/// caller restricts the bind). They
/// all share the root's room for scratch data, `limits.tmp_size` (see `build_root`): one
/// filesystem for the jail instead of one each, each a superblock to set up and tear down.
fn scratch_dir(path: &Path, mode: u32, owner: (u32, u32)) -> Result<(), JailError> {
    mkdir_mode(path, mode)?;
    // mkdir applies the umask and the setup user's ids; the mode and owner are set exactly.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .step(Step::Mounts, || format!("chmod {}", path.display()))?;
    if owner != (0, 0) {
        nix::unistd::chown(path, Some(owner.0.into()), Some(owner.1.into()))
            .step(Step::Mounts, || format!("chown {}", path.display()))?;
    }
    mount(Some(path), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .step(Step::Mounts, || format!("bind {}", path.display()))
}

/// A world-writable, sticky scratch directory (/tmp, /dev/shm).
fn shared_scratch(path: &Path) -> Result<(), JailError> {
    scratch_dir(path, 0o1777, (0, 0))?;
    set_attr(path, false, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        .step(Step::Mounts, || format!("restrict {}", path.display()))
}

/// Hides a directory behind an empty, read-only tmpfs.
fn mask_dir(path: &Path) -> nix::Result<()> {
    mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=0,mode=0555"),
    )
}

fn mkdir_p(path: &Path) -> Result<(), JailError> {
    mkdir_mode(path, 0o755)
}

fn write_file(path: &Path, content: &[u8]) -> Result<(), JailError> {
    write_file_mode(path, content, 0o644)
}

fn write_file_mode(path: &Path, content: &[u8], mode: u32) -> Result<(), JailError> {
    create_file(path, content, mode).step(Step::Mounts, || format!("write {}", path.display()))
}

fn create_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC;
    let fd = open(path, flags, Mode::from_bits_truncate(mode))?;
    if content.is_empty() {
        return Ok(());
    }
    std::fs::File::from(fd).write_all(content)
}

/// An empty file for a file bind to cover: mknod makes it in one call where open and close take
/// two. One that is there already (a generated /etc file the policy binds over) serves as well.
fn bind_target_file(path: &Path) -> std::io::Result<()> {
    use nix::sys::stat::{mknod, SFlag};
    match mknod(path, SFlag::S_IFREG, Mode::from_bits_truncate(0o644), 0) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Runs `make` for `target` and, when it fails for want of a parent directory, makes the
/// parents and runs it again: most targets sit in directories that exist, where making the
/// parents first would cost a mkdir and a stat each time.
fn with_parents<T>(target: &Path, make: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    match make() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = target.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
            }
            make()
        }
        r => r,
    }
}

pub(crate) const MOUNT_ATTR_RDONLY: u64 = libc::MOUNT_ATTR_RDONLY;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = libc::MOUNT_ATTR_NOSUID;
pub(crate) const MOUNT_ATTR_NODEV: u64 = libc::MOUNT_ATTR_NODEV;
pub(crate) const MOUNT_ATTR_NOEXEC: u64 = libc::MOUNT_ATTR_NOEXEC;

/// mount_setattr(2): sets flags on a mount (and, with `recursive`, every mount below it).
/// Unlike a MS_REMOUNT it only adds restrictions, so it works on mounts whose flags the user
/// namespace inherited locked.
fn set_attr(path: &Path, recursive: bool, set: u64) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let attr = libc::mount_attr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: 0 };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 } as libc::c_uint;
    mount_setattr(libc::AT_FDCWD, &c, flags, &attr)
}

/// mount_setattr(2) on `dirfd`/`path`.
pub(crate) fn mount_setattr(
    dirfd: i32,
    path: &std::ffi::CStr,
    flags: libc::c_uint,
    attr: &libc::mount_attr,
) -> std::io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string and `attr` a properly initialised
    // mount_attr whose size we pass; the kernel reads both and writes nothing back.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// move_mount(2) of a detached tree onto `target`.
fn move_tree(tree: i32, target: &Path) -> std::io::Result<()> {
    let c = CString::new(target.as_os_str().as_bytes())?;
    let empty = c"";
    // SAFETY: `tree` is an open mount-tree fd owned by the caller for the duration of the call;
    // both strings are valid and NUL-terminated.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(path: &Path) -> OwnedFd {
        open(path, OFlag::O_RDONLY, Mode::empty()).unwrap()
    }

    #[test]
    fn read_small_reads_to_the_end_and_refuses_what_is_too_big() {
        let dir = std::env::temp_dir().join(format!("stockade-readsmall-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, b"abc").unwrap();
        let (content, mode) = read_small(opened(&file), None).unwrap();
        assert_eq!((content.as_slice(), mode & libc::S_IFMT), (&b"abc"[..], libc::S_IFREG));
        // A file that grew since it was looked at: read to its real end, not its old size.
        let grown = vec![b'x'; 9000];
        std::fs::write(&file, &grown).unwrap();
        assert_eq!(read_small(opened(&file), Some((3, 0o644))).unwrap().0, grown);
        // ... unless it grew past the limit.
        std::fs::write(&file, vec![b'y'; ETC_COPY_MAX as usize + 1]).unwrap();
        assert!(read_small(opened(&file), Some((3, 0o644))).is_none());
        assert!(read_small(opened(&file), None).is_none());
        std::fs::write(&file, b"").unwrap();
        assert_eq!(read_small(opened(&file), None).unwrap().0, b"");
        // One that shrank: read to its end, which comes before the size given.
        std::fs::write(&file, b"short").unwrap();
        assert_eq!(read_small(opened(&file), Some((100, 0o644))).unwrap().0, b"short");
        // Not a regular file.
        assert!(read_small(open(&dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap(), None).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
