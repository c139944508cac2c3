//! One memory store's folder, as the worker (outside the jail, privileged) touches it. The
//! agent controls everything below the root, so nothing here follows a link: every open
//! resolves beneath the root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, names are taken one directory descriptor at a time,
//! and a file is looked at through the descriptor it was opened as. A symlink, or a directory
//! renamed under the walk, can make an operation fail; it cannot make it reach a host file. Only
//! regular files count: FIFOs, devices and sockets are skipped without being opened for I/O
//! (`O_NONBLOCK`, then `fstat`). What is read is bounded: a file past the API's size is not
//! read, and a walk stops after `MAX_ENTRIES` names.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use sha2::Digest;

/// The largest memory the API takes (100 kB); a larger file is never read.
pub(crate) const MAX_FILE_BYTES: u64 = 102_400;
/// The most names one walk looks at (files, directories and the rest).
pub(crate) const MAX_ENTRIES: usize = 10_000;
/// The API's deepest path: 20 segments.
const MAX_DEPTH: usize = 20;

/// Why a path was refused; the text follows the official store's (`path 'x' is a symlink`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("escapes the store root")]
    Escapes,
    #[error("is a symlink")]
    Symlink,
    #[error("is not a regular file")]
    NotAFile,
    #[error("is not valid utf-8")]
    NotUtf8,
    #[error("is larger than 100 kB (102,400 bytes)")]
    TooLarge,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    #[error("path {path:?} {why}")]
    Refused { path: String, why: Refused },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl FileError {
    pub(crate) fn refused(&self) -> Option<&Refused> {
        match self {
            FileError::Refused { why, .. } => Some(why),
            FileError::Io { .. } => None,
        }
    }
}

fn refused(path: &str, why: Refused) -> FileError {
    FileError::Refused { path: path.to_owned(), why }
}

fn io(path: &str) -> impl FnOnce(Errno) -> FileError + '_ {
    move |e| FileError::Io { path: path.to_owned(), source: e.into() }
}

/// What a walk found: each regular file's digest (a file too large to read gets a stand-in
/// that changes with its size and time, so it reads as changed, never as gone), and what it
/// passed over.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tree {
    pub files: std::collections::BTreeMap<String, String>,
    /// Symlinks, FIFOs, devices and sockets seen (never opened).
    pub skipped: usize,
    /// The walk stopped at `MAX_ENTRIES` or `MAX_DEPTH`.
    pub truncated: bool,
}

/// A stand-in digest for a file too large to read.
pub(crate) fn oversize_digest(size: u64, mtime_ns: i128) -> String {
    format!("oversize:{size}:{mtime_ns}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime_ns: i128,
    ctime_ns: i128,
    size: u64,
    ino: u64,
}

pub(crate) struct FileStore {
    root: PathBuf,
    /// Who the jail's processes are on the host: every file and directory made here is theirs.
    owner: (u32, u32),
    hashes: std::sync::Mutex<HashMap<String, (Stamp, String)>>,
}

fn how(flags: OFlag) -> OpenHow {
    OpenHow::new().flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS
            | ResolveFlag::RESOLVE_NO_XDEV,
    )
}

/// `rel` as components below the root: a leading `/` means the root, and `..`, `.`, empty
/// components and NUL refuse it.
pub(crate) fn components(rel: &str) -> Result<Vec<&str>, FileError> {
    let parts: Vec<&str> = rel.trim_start_matches('/').split('/').collect();
    if parts.iter().any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0')) || parts.len() > MAX_DEPTH {
        return Err(refused(rel, Refused::Escapes));
    }
    Ok(parts)
}

fn stamp(m: &nix::sys::stat::FileStat) -> Stamp {
    Stamp {
        mtime_ns: m.st_mtime as i128 * 1_000_000_000 + m.st_mtime_nsec as i128,
        ctime_ns: m.st_ctime as i128 * 1_000_000_000 + m.st_ctime_nsec as i128,
        size: m.st_size as u64,
        ino: m.st_ino,
    }
}

fn is_reg(m: &nix::sys::stat::FileStat) -> bool {
    m.st_mode & libc::S_IFMT == libc::S_IFREG
}

fn is_dir(m: &nix::sys::stat::FileStat) -> bool {
    m.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Files changed within this long may change again within the same timestamp: hashed anew.
const TRUST_MARGIN_NS: i128 = 2_000_000_000;

fn now_ns() -> i128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

impl FileStore {
    pub(crate) fn new(root: PathBuf, owner: (u32, u32)) -> FileStore {
        FileStore { root, owner, hashes: Default::default() }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Makes the root (its parent is the worker's own directory), owned by the jail's user.
    pub(crate) fn create_root(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o700).create(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && self.root.is_dir() => {}
            Err(e) => return Err(e),
        }
        std::os::unix::fs::chown(&self.root, Some(self.owner.0), Some(self.owner.1))
    }

    /// Removes the whole folder (`remove_dir_all` opens each level through its parent's
    /// descriptor and never follows a link).
    pub(crate) fn dispose(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn open_root(&self) -> Result<OwnedFd, FileError> {
        let p = self.root.display().to_string();
        nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(io(&p))
    }

    /// Opens `rel` beneath the root; `Ok(None)` when absent.
    fn open_beneath(&self, root: &OwnedFd, rel: &str, flags: OFlag) -> Result<Option<OwnedFd>, FileError> {
        match nix::fcntl::openat2(root, rel, how(flags)) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP) => Err(refused(rel, Refused::Symlink)),
            Err(Errno::EXDEV) => Err(refused(rel, Refused::Escapes)),
            Err(Errno::ENOTDIR) => Err(refused(rel, Refused::NotAFile)),
            Err(e) => Err(io(rel)(e)),
        }
    }

    /// `rel` opened for reading beneath the root (never blocking on a FIFO), with its status:
    /// its path as normalised, the descriptor and what `fstat` says; `None` when absent, refused
    /// when it is not a regular file.
    fn open_regular(&self, rel: &str) -> Result<Option<(String, OwnedFd, nix::sys::stat::FileStat)>, FileError> {
        let rel = components(rel)?.join("/");
        let root = self.open_root()?;
        let Some(fd) = self.open_beneath(&root, &rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)? else {
            return Ok(None);
        };
        let m = nix::sys::stat::fstat(&fd).map_err(io(&rel))?;
        if !is_reg(&m) {
            return Err(refused(&rel, Refused::NotAFile));
        }
        Ok(Some((rel, fd, m)))
    }

    /// A regular file's bytes, at most `MAX_FILE_BYTES`; `None` when absent.
    pub(crate) fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, FileError> {
        let Some((rel, fd, m)) = self.open_regular(rel)? else { return Ok(None) };
        if m.st_size as u64 > MAX_FILE_BYTES {
            return Err(refused(&rel, Refused::TooLarge));
        }
        let mut data = Vec::with_capacity(m.st_size as usize);
        std::fs::File::from(fd)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(|e| FileError::Io { path: rel.clone(), source: e })?;
        if data.len() as u64 > MAX_FILE_BYTES {
            return Err(refused(&rel, Refused::TooLarge));
        }
        Ok(Some(data))
    }

    /// A UTF-8 file's text; `None` when absent.
    pub(crate) fn get_text(&self, rel: &str) -> Result<Option<String>, FileError> {
        match self.get(rel)? {
            None => Ok(None),
            Some(b) => String::from_utf8(b).map(Some).map_err(|_| refused(rel, Refused::NotUtf8)),
        }
    }

    /// One file's digest, as `hashtree` gives it; `None` when absent.
    pub(crate) fn hash_file(&self, rel: &str) -> Result<Option<String>, FileError> {
        let Some((rel, fd, m)) = self.open_regular(rel)? else { return Ok(None) };
        self.digest(&rel, fd, &m, now_ns()).map(Some)
    }

    fn digest(
        &self,
        rel: &str,
        fd: OwnedFd,
        m: &nix::sys::stat::FileStat,
        walk_start: i128,
    ) -> Result<String, FileError> {
        let st = stamp(m);
        if st.size > MAX_FILE_BYTES {
            return Ok(oversize_digest(st.size, st.mtime_ns));
        }
        let mut cache = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, sha)) = cache.get(rel) {
            if *s == st {
                return Ok(sha.clone());
            }
        }
        let mut h = sha2::Sha256::new();
        let mut buf = [0u8; 16384];
        let mut f = std::fs::File::from(fd).take(MAX_FILE_BYTES + 1);
        let mut n_total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| FileError::Io { path: rel.to_owned(), source: e })?;
            if n == 0 {
                break;
            }
            n_total += n as u64;
            h.update(&buf[..n]);
        }
        if n_total > MAX_FILE_BYTES {
            return Ok(oversize_digest(n_total, st.mtime_ns));
        }
        let sha: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if st.mtime_ns.max(st.ctime_ns) < walk_start - TRUST_MARGIN_NS {
            cache.insert(rel.to_owned(), (st, sha.clone()));
        }
        Ok(sha)
    }

    /// Every regular file below the root with its digest. A root that is gone is an empty tree.
    pub(crate) fn hashtree(&self) -> Result<Tree, FileError> {
        let root = match self.open_root() {
            Ok(r) => r,
            Err(FileError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(Tree::default())
            }
            Err(e) => return Err(e),
        };
        let start = now_ns();
        let mut tree = Tree::default();
        let mut seen = 0usize;
        // Directories to read, by their path below the root ("" is the root).
        let mut dirs: Vec<(String, usize)> = vec![(String::new(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            let fd = if dir.is_empty() {
                match nix::fcntl::openat2(&root, ".", how(OFlag::O_RDONLY | OFlag::O_DIRECTORY)) {
                    Ok(fd) => fd,
                    Err(e) => return Err(io(".")(e)),
                }
            } else {
                match self.open_beneath(&root, &dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                    Ok(Some(fd)) => fd,
                    // Gone, or swapped for a link or a file since it was listed.
                    Ok(None) | Err(FileError::Refused { .. }) => continue,
                    Err(e) => return Err(e),
                }
            };
            let dirfd = fd.try_clone().map_err(|e| FileError::Io { path: dir.clone(), source: e })?;
            let mut d = nix::dir::Dir::from_fd(fd).map_err(io(&dir))?;
            let mut names = Vec::new();
            for e in d.iter() {
                let Ok(e) = e else { break };
                let name = e.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                seen += 1;
                if seen > MAX_ENTRIES {
                    tree.truncated = true;
                    break;
                }
                let Ok(name) = std::str::from_utf8(name) else {
                    tree.skipped += 1;
                    continue;
                };
                names.push(name.to_owned());
            }
            for name in names {
                let rel = if dir.is_empty() { name.clone() } else { format!("{dir}/{name}") };
                let Ok(m) = nix::sys::stat::fstatat(&dirfd, name.as_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                else {
                    continue;
                };
                if is_dir(&m) {
                    if depth + 1 < MAX_DEPTH {
                        dirs.push((rel, depth + 1));
                    } else {
                        tree.truncated = true;
                    }
                } else if is_reg(&m) {
                    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
                    let fd = match nix::fcntl::openat2(&dirfd, name.as_str(), how(flags)) {
                        Ok(fd) => fd,
                        Err(_) => continue,
                    };
                    let Ok(m) = nix::sys::stat::fstat(&fd) else { continue };
                    if !is_reg(&m) {
                        tree.skipped += 1;
                        continue;
                    }
                    if let Ok(sha) = self.digest(&rel, fd, &m, start) {
                        tree.files.insert(rel, sha);
                    }
                } else {
                    tree.skipped += 1;
                }
            }
            if tree.truncated && seen > MAX_ENTRIES {
                break;
            }
        }
        Ok(tree)
    }

    /// Makes the directories of `rel` below the root that are missing, owned by the jail's user.
    pub(crate) fn make_dirs(&self, rel: &str) -> Result<(), FileError> {
        let parts = components(rel)?;
        let root = self.open_root()?;
        self.open_dirs(&root, &parts, rel).map(|_| ())
    }

    /// Opens (making what is missing, owned by the jail's user) the directory holding `parts`'
    /// last component; never the root itself, which only `create_root` makes.
    fn parent_dir(&self, root: &OwnedFd, parts: &[&str], rel: &str) -> Result<OwnedFd, FileError> {
        self.open_dirs(root, &parts[..parts.len() - 1], rel)
    }

    fn open_dirs(&self, root: &OwnedFd, dirs: &[&str], rel: &str) -> Result<OwnedFd, FileError> {
        let mut dir = nix::fcntl::openat2(root, ".", how(OFlag::O_PATH | OFlag::O_DIRECTORY)).map_err(io(rel))?;
        for p in dirs {
            match nix::sys::stat::mkdirat(&dir, *p, Mode::from_bits_truncate(0o700)) {
                Ok(()) => {
                    let _ = nix::unistd::fchownat(
                        &dir,
                        *p,
                        Some(self.owner.0.into()),
                        Some(self.owner.1.into()),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    );
                }
                Err(Errno::EEXIST) => {}
                Err(e) => return Err(io(rel)(e)),
            }
            dir = match nix::fcntl::openat2(&dir, *p, how(OFlag::O_PATH | OFlag::O_DIRECTORY)) {
                Ok(d) => d,
                Err(Errno::ELOOP) => return Err(refused(rel, Refused::Symlink)),
                Err(Errno::ENOTDIR) => return Err(refused(rel, Refused::NotAFile)),
                Err(e) => return Err(io(rel)(e)),
            };
        }
        Ok(dir)
    }

    /// Writes `data` to `rel` whole (a new file renamed over the old), owned by the jail's user,
    /// 0600 or 0700 when `executable`. The root must exist.
    pub(crate) fn put(&self, rel: &str, data: &[u8], executable: bool) -> Result<(), FileError> {
        let parts = components(rel)?;
        let rel = parts.join("/");
        let root = self.open_root()?;
        let dir = self.parent_dir(&root, &parts, &rel)?;
        let name = parts[parts.len() - 1];
        let tmp = format!(".fs-{:016x}.tmp", fastrand::u64(..));
        let mode = Mode::from_bits_truncate(if executable { 0o700 } else { 0o600 });
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(&dir, tmp.as_str(), flags, mode).map_err(io(&rel))?;
        let written = nix::unistd::fchown(&fd, Some(self.owner.0.into()), Some(self.owner.1.into()))
            .map_err(io(&rel))
            .and_then(|()| {
                let mut f = std::fs::File::from(fd);
                f.write_all(data).map_err(|e| FileError::Io { path: rel.clone(), source: e })
            })
            .and_then(|()| {
                nix::fcntl::renameat(&dir, tmp.as_str(), &dir, name).map_err(|e| match e {
                    Errno::EISDIR | Errno::ENOTDIR => refused(&rel, Refused::NotAFile),
                    e => io(&rel)(e),
                })
            });
        if written.is_err() {
            let _ = nix::unistd::unlinkat(&dir, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// Removes the file at `rel` (a directory is left alone); absent is fine.
    pub(crate) fn remove(&self, rel: &str) -> Result<(), FileError> {
        let parts = components(rel)?;
        let rel = parts.join("/");
        let root = self.open_root()?;
        let dir = match parts.len() {
            1 => nix::fcntl::openat2(&root, ".", how(OFlag::O_PATH | OFlag::O_DIRECTORY)).map_err(io(&rel))?,
            _ => match self.open_beneath(
                &root,
                &parts[..parts.len() - 1].join("/"),
                OFlag::O_PATH | OFlag::O_DIRECTORY,
            )? {
                Some(d) => d,
                None => return Ok(()),
            },
        };
        let name = parts[parts.len() - 1];
        match nix::sys::stat::fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(io(&rel)(e)),
            Ok(m) if is_dir(&m) => return Err(refused(&rel, Refused::NotAFile)),
            Ok(_) => {}
        }
        match nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io(&rel)(e)),
        }
    }

    /// Whether anyone may execute the file (kept when a write replaces it).
    pub(crate) fn executable(&self, rel: &str) -> bool {
        let Ok(parts) = components(rel) else { return false };
        let Ok(root) = self.open_root() else { return false };
        let Ok(Some(fd)) = self.open_beneath(&root, &parts.join("/"), OFlag::O_PATH) else { return false };
        nix::sys::stat::fstat(&fd).is_ok_and(|m| is_reg(&m) && m.st_mode & 0o111 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (PathBuf, FileStore) {
        let base = std::env::temp_dir().join(format!("stockade-mfs-{}-{:x}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&base).unwrap();
        let me = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
        let s = FileStore::new(base.join("root"), me);
        s.create_root().unwrap();
        (base, s)
    }

    #[test]
    fn paths_that_leave_the_root_are_refused() {
        for bad in ["../x", "a/../../x", "", "a//b", "./a", "a/\0"] {
            assert!(components(bad).is_err(), "{bad:?}");
        }
        assert_eq!(components("/a/b.md").unwrap(), ["a", "b.md"]);
    }

    #[test]
    fn links_are_never_followed_and_special_files_never_block() {
        let (base, s) = store();
        let outside = base.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "HOST").unwrap();
        let root = s.root().to_path_buf();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("link.md")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("dir")).unwrap();
        nix::unistd::mkfifo(&root.join("pipe.md"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::write(root.join("ok.md"), "fine").unwrap();
        std::fs::write(root.join("big.md"), vec![b'z'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let t = s.hashtree().unwrap();
        assert_eq!(t.files.keys().collect::<Vec<_>>(), ["big.md", "ok.md"]);
        assert!(t.files["big.md"].starts_with("oversize:"));
        assert_eq!(t.skipped, 3, "the two links and the FIFO: {t:?}");
        assert!(matches!(s.get("link.md").unwrap_err().refused(), Some(Refused::Symlink)));
        assert!(matches!(s.get("pipe.md").unwrap_err().refused(), Some(Refused::NotAFile)));
        assert!(matches!(s.get("big.md").unwrap_err().refused(), Some(Refused::TooLarge)));
        assert!(matches!(s.get("dir/secret").unwrap_err().refused(), Some(Refused::Symlink)));
        // A write through the linked directory is refused and writes nothing there.
        assert!(s.put("dir/secret", b"overwritten", false).is_err());
        assert!(s.put("dir/new.md", b"x", false).is_err());
        assert!(s.remove("dir/secret").is_err() || outside.join("secret").exists());
        assert_eq!(std::fs::read_to_string(outside.join("secret")).unwrap(), "HOST");
        assert!(!outside.join("new.md").exists());
        // A write over the link replaces the link, not its target.
        s.put("link.md", b"mine", false).unwrap();
        assert_eq!(std::fs::read_to_string(outside.join("secret")).unwrap(), "HOST");
        assert!(!std::fs::symlink_metadata(root.join("link.md")).unwrap().file_type().is_symlink());
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A directory swapped for a link to the host while the worker walks and writes: whatever
    /// the interleaving, no host file is read into a digest or written.
    #[test]
    fn a_directory_swapped_for_a_link_mid_walk_leads_nowhere() {
        let (base, s) = store();
        let outside = base.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("x.md"), "HOST").unwrap();
        let root = s.root().to_path_buf();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/x.md"), "mine").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (root, outside, stop) = (root.clone(), outside.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::rename(root.join("d"), root.join("d-real"));
                    let _ = std::os::unix::fs::symlink(&outside, root.join("d"));
                    let _ = std::fs::remove_file(root.join("d"));
                    let _ = std::fs::rename(root.join("d-real"), root.join("d"));
                }
            })
        };
        let host_sha: String = sha2::Sha256::digest(b"HOST").iter().map(|b| format!("{b:02x}")).collect();
        for _ in 0..300 {
            if let Ok(t) = s.hashtree() {
                assert!(t.files.values().all(|v| *v != host_sha), "{t:?}");
            }
            let _ = s.put("d/x.md", b"mine", false);
            if let Ok(Some(b)) = s.get("d/x.md") {
                assert_eq!(b, b"mine");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        assert_eq!(std::fs::read_to_string(outside.join("x.md")).unwrap(), "HOST");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_walk_stops_at_its_bound_and_writes_are_whole_and_owned() {
        let (base, s) = store();
        let root = s.root().to_path_buf();
        for i in 0..MAX_ENTRIES + 5 {
            std::fs::write(root.join(format!("f{i}")), "").unwrap();
        }
        let t = s.hashtree().unwrap();
        assert!(t.truncated);
        assert!(t.files.len() <= MAX_ENTRIES);
        s.put("a/b/c.md", b"text", true).unwrap();
        let m = std::fs::metadata(root.join("a/b/c.md")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        assert_eq!(s.get_text("a/b/c.md").unwrap().as_deref(), Some("text"));
        assert!(s.executable("a/b/c.md"));
        assert!(matches!(s.remove("a").unwrap_err().refused(), Some(Refused::NotAFile)));
        s.remove("a/b/c.md").unwrap();
        assert_eq!(s.get("a/b/c.md").unwrap(), None);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
