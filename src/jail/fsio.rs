//! File-system calls without libc's extra work, for the paths every jail start takes.
//!
//! musl's `open` follows each `O_CLOEXEC` open with an `fcntl(F_SETFD)` meant for kernels older
//! than 2.6.23 (its `openat` does not), a directory stream costs an fstat, two fcntl calls and an
//! allocation, and `fs::read_to_string` reads a /proc file (size 0) 32 bytes at a time. A jail
//! start opened ~80 files, listed directories and read /proc files through those paths.

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::NixPath;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// open(2) by way of openat(AT_FDCWD), close-on-exec always.
pub(crate) fn open<P: ?Sized + NixPath>(path: &P, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    nix::fcntl::openat(nix::fcntl::AT_FDCWD, path, flags | OFlag::O_CLOEXEC, mode)
}

/// The entries of an open directory but `.` and `..`, as (name, d_type), or `None` when there
/// are more than `limit` or the listing fails. getdents64 into a buffer on the stack: libc's DIR
/// adds an fstat, two fcntl calls, an allocation (an mmap and munmap under musl) per directory.
pub(crate) fn list_dir(dir: &OwnedFd, limit: usize) -> Option<Vec<(CString, u8)>> {
    let mut buf = [0u8; 4096];
    let mut out = Vec::new();
    loop {
        // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`, which outlives the call.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        let n = usize::try_from(n).ok()?;
        if n == 0 {
            return Some(out);
        }
        // struct linux_dirent64: u64 d_ino, i64 d_off, u16 d_reclen, u8 d_type, NUL-terminated
        // d_name; records follow each other, d_reclen bytes apart.
        let mut at = 0;
        while at + 19 < n {
            let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
            let record = buf[..n].get(at..at + reclen).filter(|_| reclen > 19)?;
            let name = std::ffi::CStr::from_bytes_until_nul(&record[19..]).ok()?;
            if name != c"." && name != c".." {
                if out.len() == limit {
                    return None;
                }
                out.push((name.to_owned(), record[18]));
            }
            at += reclen;
        }
    }
}

/// A /proc, /sys or cgroup file, whole, in one or two reads. Read by hand: `File::read_to_end`
/// first asks for the size (an fstat and an lseek), which such files do not know.
pub(crate) fn read_kernel_file(path: impl AsRef<Path>) -> std::io::Result<String> {
    let fd = open(path.as_ref(), OFlag::O_RDONLY, Mode::empty())?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match nix::unistd::read(&fd, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes an existing /proc, /sys or cgroup file (no create, no truncate) in one write(2): the
/// kernel takes such a write whole or refuses it.
pub(crate) fn write_kernel_file(path: impl AsRef<Path>, value: &str) -> std::io::Result<()> {
    let fd = open(path.as_ref(), OFlag::O_WRONLY, Mode::empty())?;
    let n = nix::unistd::write(&fd, value.as_bytes())?;
    if n != value.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn list_dir_reads_names_and_types_and_stops_past_its_limit() {
        let dir = std::env::temp_dir().join(format!("stockade-listdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("file"), "x").unwrap();
        symlink("file", dir.join("link")).unwrap();
        // Long names: several getdents64 calls' worth of records for the 4 KiB buffer.
        for i in 0..60 {
            std::fs::write(dir.join(format!("{i:0>200}")), "").unwrap();
        }
        let fd = open(&dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        let mut all = list_dir(&fd, 100).unwrap();
        all.sort();
        assert_eq!(all.len(), 63);
        let kind = |n: &std::ffi::CStr| all.iter().find(|(m, _)| m.as_c_str() == n).map(|(_, t)| *t);
        assert_eq!(kind(c"file"), Some(libc::DT_REG));
        assert_eq!(kind(c"link"), Some(libc::DT_LNK));
        assert_eq!(kind(c"sub"), Some(libc::DT_DIR));
        assert!(all.iter().all(|(n, _)| n.as_c_str() != c"." && n.as_c_str() != c".."));
        let fd = open(&dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        assert!(list_dir(&fd, 62).is_none(), "63 entries are more than 62");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_kernel_file_reads_whole_files_of_any_size() {
        // Past the first buffer and its doubling: the loop must go on to the end.
        let path = std::env::temp_dir().join(format!("stockade-readkf-{}", std::process::id()));
        let text: String = (0..3000).map(|i| format!("{i:>7}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_kernel_file(&path).unwrap(), text);
        std::fs::write(&path, "").unwrap();
        assert_eq!(read_kernel_file(&path).unwrap(), "");
        std::fs::remove_file(&path).unwrap();
        // A /proc file reports size 0 but has content.
        let status = read_kernel_file("/proc/self/status").unwrap();
        assert!(status.starts_with("Name:") && status.contains("\nCapBnd:"), "{status}");
        assert!(read_kernel_file("/nonexistent/stockade").is_err());
    }
}
