//! The cgroup file system, as the cgroup code touches it. [`Kernel`] is the real one. Tests run
//! the same code against `fake::FakeHost`, a plain directory tree laid out as a pure cgroup v2
//! host or a hybrid one, which keeps the kernel's rules that code relies on (interface files
//! appear with a cgroup and with a controller's delegation, no internal processes, no removal of
//! a cgroup that holds processes).

use std::io;
use std::path::Path;
use std::time::Duration;

use super::super::fsio::{list_dir, open, read_kernel_file, write_kernel_file};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

pub(crate) trait CgroupFs {
    /// mkdir: the cgroup comes with its interface files.
    fn create_dir(&self, d: &Path) -> io::Result<()>;
    /// rmdir: refused while the cgroup holds processes or child cgroups.
    fn remove_dir(&self, d: &Path) -> io::Result<()>;
    fn read(&self, f: &Path) -> io::Result<String>;
    /// Writes an existing interface file in one write; never creates one.
    fn write(&self, f: &Path, v: &str) -> io::Result<()>;
    /// Kills whatever the cgroup holds: `cgroup.kill` where there is one, then every pid listed.
    fn kill_all(&self, d: &Path);
    /// The names in a directory; None when it cannot be listed or holds more than `limit`.
    fn list(&self, d: &Path, limit: usize) -> Option<Vec<String>>;
    /// How long ago the directory last changed.
    fn age(&self, d: &Path) -> Option<Duration>;
}

impl<T: CgroupFs> CgroupFs for &T {
    fn create_dir(&self, d: &Path) -> io::Result<()> {
        (*self).create_dir(d)
    }
    fn remove_dir(&self, d: &Path) -> io::Result<()> {
        (*self).remove_dir(d)
    }
    fn read(&self, f: &Path) -> io::Result<String> {
        (*self).read(f)
    }
    fn write(&self, f: &Path, v: &str) -> io::Result<()> {
        (*self).write(f, v)
    }
    fn kill_all(&self, d: &Path) {
        (*self).kill_all(d)
    }
    fn list(&self, d: &Path, limit: usize) -> Option<Vec<String>> {
        (*self).list(d, limit)
    }
    fn age(&self, d: &Path) -> Option<Duration> {
        (*self).age(d)
    }
}

/// The host's cgroup file systems.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Kernel;

impl CgroupFs for Kernel {
    fn create_dir(&self, d: &Path) -> io::Result<()> {
        std::fs::create_dir(d)
    }

    fn remove_dir(&self, d: &Path) -> io::Result<()> {
        std::fs::remove_dir(d)
    }

    fn read(&self, f: &Path) -> io::Result<String> {
        read_kernel_file(f)
    }

    fn write(&self, f: &Path, v: &str) -> io::Result<()> {
        write_kernel_file(f, v)
    }

    fn kill_all(&self, d: &Path) {
        // v2's cgroup.kill takes the whole subtree at once, new forks included.
        let _ = write_kernel_file(d.join("cgroup.kill"), "1");
        for pid in read_kernel_file(d.join("cgroup.procs")).unwrap_or_default().lines() {
            if let Ok(p) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    fn list(&self, d: &Path, limit: usize) -> Option<Vec<String>> {
        let dir = open(d, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).ok()?;
        let names = list_dir(&dir, limit)?;
        // A name that is not UTF-8 is no jail's.
        Some(names.into_iter().filter_map(|(n, _)| n.into_string().ok()).collect())
    }

    fn age(&self, d: &Path) -> Option<Duration> {
        std::fs::metadata(d).and_then(|m| m.modified()).ok()?.elapsed().ok()
    }
}
