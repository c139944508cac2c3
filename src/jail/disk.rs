//! Size limits for the host-backed /workspace and /mnt/session/outputs
//! (`limits.workspace_size`, `limits.outputs_size`).
//!
//! A directory on the host's disk has no size of its own, and most hosts' filesystems have no
//! project quotas switched on. So the limit is a filesystem of exactly that size: a sparse image
//! file holding ext4, loop-mounted where the directory is expected (`provision`). The kernel
//! enforces it (`ENOSPC`), it survives a worker restart with the image file, and it costs about
//! 25 ms to make. The jail itself only checks (`check`): a host-backed directory on a
//! filesystem larger than the limit is refused, whoever provided it. A jail given no directory
//! keeps its workspace and outputs on its own tmpfs, inside the `limits.tmp_size` room.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{JailError, Step};
use crate::policy::Policy;
use crate::util::format_size;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{field} = {size}: {msg}")]
    Refused { field: &'static str, size: String, msg: String },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("mkfs.ext4 for {0}: {1}")]
    Mkfs(PathBuf, String),
    #[error("loop device for {0}: {1}")]
    Loop(PathBuf, String),
}

/// The size a directory's filesystem can hold, in bytes.
fn fs_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(s.blocks() as u64 * s.fragment_size() as u64)
}

/// Refuses a host-backed workspace or outputs directory whose filesystem is larger than the
/// policy's limit for it: the limit would not hold.
pub(crate) fn check(p: &Policy, workspace: Option<&Path>, outputs: Option<&Path>) -> Result<(), JailError> {
    for (field, limit, dir) in [
        ("limits.workspace_size", p.limits.workspace_size, workspace),
        ("limits.outputs_size", p.limits.outputs_size, outputs),
    ] {
        let (Some(limit), Some(dir)) = (limit, dir) else { continue };
        let have = fs_bytes(dir)
            .map_err(|e| JailError::new(Step::Workspace, format!("{field}: statvfs {}: {e}", dir.display())))?;
        if have > limit.0 {
            return Err(JailError::new(
                Step::Workspace,
                format!(
                    "{field} = {}: {} is on a filesystem of {}, which would not hold the limit; give the session a \
                     filesystem of at most that size (the worker makes one per session), leave the directory out \
                     (the jail's own tmpfs then holds it, within limits.tmp_size), or lift the limit with \
                     {field} = \"none\" in a policy that extends this one",
                    format_size(limit.0),
                    dir.display(),
                    format_size(have)
                ),
            ));
        }
    }
    Ok(())
}

/// Whether this host can provision limited filesystems: root, a loop device, mkfs.ext4.
pub(crate) fn can_provision(field: &'static str, size: u64) -> Result<(), DiskError> {
    let refuse = |msg: String| DiskError::Refused { field, size: format_size(size), msg };
    if !nix::unistd::geteuid().is_root() {
        return Err(refuse("a filesystem per session needs root (loop devices and mount)".into()));
    }
    if std::fs::metadata("/dev/loop-control").is_err() {
        return Err(refuse(
            "this host has no /dev/loop-control (the loop module), so no per-session filesystem".into(),
        ));
    }
    if mkfs().is_none() {
        return Err(refuse("mkfs.ext4 was not found (install e2fsprogs)".into()));
    }
    Ok(())
}

fn mkfs() -> Option<PathBuf> {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4", "/usr/bin/mkfs.ext4"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Whether `dir` is the root of a mount (its device differs from its parent's).
pub(crate) fn is_mounted(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let p = p.to_path_buf();
    move |e| DiskError::Io(p, e)
}

/// Makes `dir` a filesystem of `size` bytes owned by `owner`, backed by `image` (made when it
/// does not exist yet, reused when it does: a restarted worker keeps its sessions' data). With
/// `templates`, a new image is a copy of a formatted one kept there for that size and owner (made
/// once): a session's start runs no mkfs, whose fork from a large worker and read of the host's
/// mount table grow with the live sessions.
pub(crate) fn provision(
    image: &Path,
    dir: &Path,
    size: u64,
    owner: (u32, u32),
    templates: Option<&Path>,
) -> Result<(), DiskError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    if is_mounted(dir) {
        return Ok(());
    }
    if !image.exists() {
        let tmp = image.with_extension("img-new");
        match templates {
            Some(t) => {
                let template = template(t, size, owner)?;
                copy_sparse(&template, &tmp, size)?;
            }
            None => format(&tmp, size, owner, image)?,
        }
        std::fs::rename(&tmp, image).map_err(io_err(image))?;
    }
    mount_image(image, dir)
}

/// The formatted, empty image for `size` and `owner` in `dir`, made when missing.
fn template(dir: &Path, size: u64, owner: (u32, u32)) -> Result<PathBuf, DiskError> {
    let path = dir.join(format!("ext4-{size}-{}-{}.img", owner.0, owner.1));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    // Made under a name of this call's own, then renamed: two sessions (or workers) making the
    // same template at once each finish a whole one, and the last rename wins.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}-{n}-{size}.img-new", std::process::id()));
    format(&tmp, size, owner, &path)?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}

/// Copies the data segments of `from` (a sparse image) to a new `to` of `size` bytes, leaving
/// its holes holes: a fresh ext4 of 8G holds about 4 MB of data in 16 segments.
fn copy_sparse(from: &Path, to: &Path, size: u64) -> Result<(), DiskError> {
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(from).map_err(io_err(from))?;
    let dst = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(to).map_err(io_err(to))?;
    dst.set_len(size).map_err(io_err(to))?;
    let mut off: i64 = 0;
    loop {
        // SAFETY: lseek on a descriptor this function owns; no memory is passed.
        let data = unsafe { libc::lseek(src.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data past `off`. Anything else would leave the copy without the
            // template's metadata: refused, not mounted half-made.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            let _ = std::fs::remove_file(to);
            return Err(DiskError::Io(from.into(), e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(to);
            return Err(DiskError::Io(from.into(), e));
        }
        let (mut at_src, mut at_dst) = (data, data);
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: copy_file_range between two descriptors this function owns, with offsets
            // it passes by pointer and the kernel advances.
            let n =
                unsafe { libc::copy_file_range(src.as_raw_fd(), &mut at_src, dst.as_raw_fd(), &mut at_dst, left, 0) };
            if n <= 0 {
                let e = if n < 0 { std::io::Error::last_os_error() } else { std::io::ErrorKind::UnexpectedEof.into() };
                let _ = std::fs::remove_file(to);
                return Err(DiskError::Io(to.into(), e));
            }
            left -= n as usize;
        }
        off = hole;
    }
    dst.sync_data().map_err(io_err(to))?;
    Ok(())
}

/// Formats `tmp`, a new image file of `size`, as the empty filesystem a session gets.
fn format(tmp: &Path, size: u64, owner: (u32, u32), image: &Path) -> Result<(), DiskError> {
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(tmp).map_err(io_err(tmp))?;
    f.set_len(size).map_err(io_err(tmp))?;
    drop(f);
    let mkfs = mkfs().ok_or_else(|| DiskError::Mkfs(image.into(), "mkfs.ext4 not found".into()))?;
    // No journal (a session's scratch space needs no crash consistency of its own), no
    // reserved blocks (all of the limit is the session's), the root directory the jail user's.
    let mut cmd = Command::new(mkfs);
    cmd.args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
        .arg(format!("root_owner={}:{},nodiscard", owner.0, owner.1))
        .arg(tmp)
        .stdin(std::process::Stdio::null());
    // A worker started from a terminal lends it to nothing it starts.
    // SAFETY: between fork and exec the closure only calls setsid(2), async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let out = cmd.output().map_err(|e| DiskError::Mkfs(image.into(), e.to_string()))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(tmp);
        return Err(DiskError::Mkfs(image.into(), String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}

/// Mounts `image` on `dir` through a loop device.
fn mount_image(image: &Path, dir: &Path) -> Result<(), DiskError> {
    // The device's descriptor stays open until the mount holds it: autoclear would detach a
    // device nobody uses.
    let (dev, _held) = attach_loop(image)?;
    let r = nix::mount::mount(
        Some(dev.as_path()),
        dir,
        Some("ext4"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        None::<&str>,
    );
    if let Err(e) = r {
        return Err(DiskError::Loop(image.into(), format!("mount {} on {}: {e}", dev.display(), dir.display())));
    }
    // mkfs leaves lost+found, which the session would see in its workspace; fsck remakes it.
    let _ = std::fs::remove_dir(dir.join("lost+found"));
    Ok(())
}

/// Unmounts a directory `provision` mounted; its loop device goes with it (autoclear).
pub(crate) fn release(dir: &Path) -> Result<(), DiskError> {
    if !is_mounted(dir) {
        return Ok(());
    }
    nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| DiskError::Io(dir.into(), std::io::Error::from(e)))
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of <linux/loop.h>.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn open(path: &str, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c = CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path; the returned descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds `image` to a free loop device that detaches itself when its last user (the mount) goes.
fn attach_loop(image: &Path) -> Result<(PathBuf, OwnedFd), DiskError> {
    let err = |m: String| DiskError::Loop(image.into(), m);
    let backing = std::fs::OpenOptions::new().read(true).write(true).open(image).map_err(|e| err(e.to_string()))?;
    let ctl = open("/dev/loop-control", libc::O_RDWR).map_err(|e| err(format!("/dev/loop-control: {e}")))?;
    // Another session may take the free device between the two calls; when many start at once,
    // each round leaves one of them a device, so the rest try again after a short random pause.
    for _ in 0..LOOP_TRIES {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(err(format!("LOOP_CTL_GET_FREE: {}", std::io::Error::last_os_error())));
        }
        let path = format!("/dev/loop{n}");
        let dev = open(&path, libc::O_RDWR).map_err(|e| err(format!("{path}: {e}")))?;
        // SAFETY: an all-zero loop_config is valid; the fields set below are plain integers.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads a loop_config that lives for the whole call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok((PathBuf::from(path), dev));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(err(format!("LOOP_CONFIGURE {path}: {e}")));
        }
        std::thread::sleep(std::time::Duration::from_micros(fastrand::u64(50..=1000)));
    }
    Err(err(format!("no free loop device after {LOOP_TRIES} tries")))
}

/// Attempts at a free loop device: enough for hundreds of sessions starting at once.
const LOOP_TRIES: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions starting together race for the lowest free loop device; every one of them gets
    /// one (sixteen tries, once the bound here, lost this race to twenty concurrent sessions).
    #[test]
    fn concurrent_attaches_all_get_a_device() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
            crate::util::skip_test("needs root and /dev/loop-control");
            return;
        }
        let dir = std::env::temp_dir().join(format!("stockade-loop-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        const N: usize = 40;
        let images: Vec<PathBuf> = (0..N)
            .map(|i| {
                let p = dir.join(format!("{i}.img"));
                std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
                p
            })
            .collect();
        let start = std::sync::Barrier::new(N);
        let results: Vec<Result<(PathBuf, OwnedFd), DiskError>> = std::thread::scope(|s| {
            let handles: Vec<_> = images
                .iter()
                .map(|img| {
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        attach_loop(img)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let devices: std::collections::BTreeSet<PathBuf> =
            results.iter().map(|r| r.as_ref().map(|(p, _)| p.clone()).map_err(|e| e.to_string()).unwrap()).collect();
        assert_eq!(devices.len(), N, "two images on one device");
        // Closing the last descriptor of an autoclear device detaches it.
        drop(results);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Images copied from one template are filesystems of their own: the right size, empty,
    /// the owner's, holding what is written to each alone; the template is made once and the
    /// copies keep its holes.
    #[test]
    fn images_copied_from_a_template_are_separate_empty_filesystems() {
        if !nix::unistd::geteuid().is_root() || mkfs().is_none() || !Path::new("/dev/loop-control").exists() {
            crate::util::skip_test("needs root, mkfs.ext4 and /dev/loop-control");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("stockade-template-{}", std::process::id()));
        /// Unmounts the test's images and removes its directory, whether it passes or fails (a
        /// failed run otherwise left two mounts behind for good).
        struct Cleanup<'a>(&'a Path);
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                for d in ["a", "b"].map(|n| self.0.join(n)) {
                    if is_mounted(&d) {
                        let _ = release(&d);
                    }
                }
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
        let _cleanup = Cleanup(&dir);
        let templates = dir.join("templates");
        let size = 64 << 20;
        // At once, as sessions a worker starts together: both may find no template yet.
        let mounted: Vec<PathBuf> = std::thread::scope(|s| {
            let made: Vec<_> = ["a", "b"]
                .map(|name| {
                    let (dir, templates) = (&dir, &templates);
                    s.spawn(move || {
                        let d = dir.join(name);
                        provision(&dir.join(format!("{name}.img")), &d, size, (4321, 4322), Some(templates)).unwrap();
                        d
                    })
                })
                .into_iter()
                .collect();
            made.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let made: Vec<_> = std::fs::read_dir(&templates).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(made.len(), 1, "one template for one size and owner, no half-made one: {made:?}");
        for (i, d) in mounted.iter().enumerate() {
            assert!(is_mounted(d));
            let m = std::fs::metadata(d).unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 4322));
            assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "not empty");
            std::fs::write(d.join("mine"), format!("{i}")).unwrap();
            let img = std::fs::metadata(dir.join(format!("{}.img", ["a", "b"][i]))).unwrap();
            assert_eq!(img.len(), size);
            assert!(img.blocks() * 512 < size / 4, "the copy lost its holes: {} blocks", img.blocks());
        }
        assert_eq!(std::fs::read_to_string(mounted[0].join("mine")).unwrap(), "0");
        assert_eq!(std::fs::read_to_string(mounted[1].join("mine")).unwrap(), "1");
        for d in &mounted {
            release(d).unwrap();
        }
    }
}
