//! System calls made with the instruction itself rather than through libc, for code that runs
//! in a process sharing the supervisor's memory while the supervisor goes on (the network
//! namespace helper, `netif::NetnsHelper`). libc's wrappers store a failure in `errno`, a
//! thread-local such a process shares with the supervisor thread that started it; these return
//! the error instead and touch no memory of their own. Also the stack such a process runs on.

/// `Ok(return value)` or `Err(errno)`.
///
/// # Safety
/// As for the system call `nr` with these arguments.
#[cfg(target_arch = "x86_64")]
pub unsafe fn syscall(nr: libc::c_long, a: [usize; 6]) -> Result<usize, i32> {
    let ret: isize;
    // SAFETY: the x86_64 system call convention: number in rax, arguments in rdi, rsi, rdx,
    // r10, r8, r9; the kernel clobbers rcx and r11 and returns in rax.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    split(ret)
}

/// See the x86_64 version.
///
/// # Safety
/// As for the system call `nr` with these arguments.
#[cfg(target_arch = "aarch64")]
pub unsafe fn syscall(nr: libc::c_long, a: [usize; 6]) -> Result<usize, i32> {
    let ret: isize;
    // SAFETY: the aarch64 convention: number in x8, arguments in x0-x5, result in x0.
    unsafe {
        core::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
            options(nostack),
        );
    }
    split(ret)
}

/// Elsewhere libc's generic wrapper, errno and all: there the helper's failure report may race
/// with the supervisor's own errno (a wrong error text at worst, never wrong memory).
///
/// # Safety
/// As for the system call `nr` with these arguments.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub unsafe fn syscall(nr: libc::c_long, a: [usize; 6]) -> Result<usize, i32> {
    // SAFETY: as the caller guarantees for the call itself.
    let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if r < 0 {
        Err(nix::errno::Errno::last_raw())
    } else {
        Ok(r as usize)
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn split(ret: isize) -> Result<usize, i32> {
    // The kernel returns -4095..-1 for errors.
    if (-4095..0).contains(&ret) {
        Err((-ret) as i32)
    } else {
        Ok(ret as usize)
    }
}

/// The stack of a process cloned with CLONE_VM (the command's start in `spawn`, the network
/// namespace helper): memory of the cloning process, kept until the child is done with it.
/// Left uninitialised: the child writes its few frames before reading them, and zeroing 64 KiB
/// would fault in sixteen pages where the child touches one or two.
pub struct ChildStack(Vec<std::mem::MaybeUninit<u8>>);

impl ChildStack {
    pub fn allocate() -> ChildStack {
        ChildStack(Vec::with_capacity(64 << 10))
    }

    /// The address clone(2) takes: the 16-byte aligned top (stacks grow down).
    pub fn top(&mut self) -> *mut libc::c_void {
        let area = self.0.spare_capacity_mut();
        ((area.as_mut_ptr() as usize + area.len()) & !15) as *mut libc::c_void
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_values_and_errors_without_touching_errno() {
        // SAFETY: getpid takes no argument.
        let pid = unsafe { syscall(libc::SYS_getpid, [0; 6]) };
        assert_eq!(pid, Ok(std::process::id() as usize));
        nix::errno::Errno::set_raw(0);
        // SAFETY: closing descriptor -1 (u32::MAX to the kernel) can only fail.
        let r = unsafe { syscall(libc::SYS_close, [usize::MAX, 0, 0, 0, 0, 0]) };
        assert_eq!(r, Err(libc::EBADF));
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert_eq!(nix::errno::Errno::last_raw(), 0);
    }
}
