//! `stockade run -t`: the command gets a terminal of its own, a pty the supervisor makes and
//! relays, never the caller's. The jail holds only the pty's slave end (its stdin, stdout, stderr
//! and controlling terminal, so an interactive shell has job control); the caller's terminal,
//! put in raw mode while the command runs, only ever sees bytes copied from the master.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

/// A pty pair, the size of the caller's terminal when it has one.
pub(super) fn open() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut size: libc::winsize = libc::winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes the winsize we pass; on failure (no terminal) it stays 24x80.
    unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) };
    let ws = nix::pty::Winsize { ws_row: size.ws_row, ws_col: size.ws_col, ws_xpixel: 0, ws_ypixel: 0 };
    let p = nix::pty::openpty(Some(&ws), None).map_err(std::io::Error::from)?;
    // Only the jail may hold the slave: not across an exec of ours.
    for fd in [&p.master, &p.slave] {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(std::io::Error::from)?;
    }
    Ok((p.master, p.slave))
}

/// The copying between the caller's stdio and the pty's master while the command runs.
pub(super) struct Relay {
    saved: Option<nix::sys::termios::Termios>,
    out: std::thread::JoinHandle<()>,
}

impl Relay {
    /// Starts copying: stdin to the master (on a thread that ends with stdin), the master to
    /// stdout (until every holder of the slave is gone). A terminal on stdin goes raw, so that
    /// keys reach the command's terminal as typed (Ctrl-C there, not here).
    pub(super) fn start(master: OwnedFd) -> std::io::Result<Relay> {
        let stdin = std::io::stdin();
        let saved = nix::sys::termios::tcgetattr(stdin.as_fd()).ok();
        if let Some(t) = &saved {
            let mut raw = t.clone();
            nix::sys::termios::cfmakeraw(&mut raw);
            nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &raw)
                .map_err(std::io::Error::from)?;
        }
        let to_master = master.try_clone()?;
        std::thread::spawn(move || {
            let mut to = std::fs::File::from(to_master);
            let mut buf = [0u8; 4096];
            let mut input = std::io::stdin().lock();
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let out = std::thread::spawn(move || {
            let mut from = std::fs::File::from(master);
            let mut buf = [0u8; 4096];
            let mut stdout = std::io::stdout();
            // EIO once no process holds the slave any more: the command and the jail are gone.
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()).is_err() {
                    break;
                }
            }
        });
        Ok(Relay { saved, out })
    }

    /// Once the jail is gone: the rest of its output, and the caller's terminal as it was.
    pub(super) fn finish(self) {
        let _ = self.out.join();
        if let Some(t) = &self.saved {
            let stdin = std::io::stdin();
            let _ = nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, t);
        }
        let _ = std::io::stdout().flush();
    }
}
