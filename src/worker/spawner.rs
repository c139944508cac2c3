//! Session processes are started from one thread that lives as long as the worker. A session
//! process dies with its parent through PDEATHSIG, and the kernel sends that signal when the
//! parent *thread* exits, not the process. The async runtime's threads come and go — a thread
//! that ran a blocking section is retired after 10 s idle — and every session process it had
//! started was killed with it: at a restart resuming 2,000 items, 38 jails died that way.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

type Request = (tokio::runtime::Handle, Command, oneshot::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from the spawning thread, registered with the caller's runtime (which reaps it).
pub(crate) async fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    static THREAD: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let tx = THREAD.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("stockade-spawner".into())
            .spawn(move || {
                for (handle, mut cmd, reply) in rx {
                    let _entered = handle.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("a thread can be started");
        Mutex::new(tx)
    });
    let (reply, answer) = oneshot::channel();
    let handle = tokio::runtime::Handle::current();
    let sent = tx.lock().unwrap_or_else(|p| p.into_inner()).send((handle, cmd, reply));
    match sent {
        Ok(()) => answer.await.unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread is gone"))),
        // Not reachable while the process lives (the thread never ends); spawning here is the
        // fallback rather than no session at all.
        Err(mpsc::SendError((_, c, _))) => {
            cmd = c;
            cmd.spawn()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child_with_pdeathsig() -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--", "sleep", "30"]).kill_on_drop(true);
        c
    }

    /// The pitfall itself, and the way around it: a child armed with PDEATHSIG that a short-lived
    /// thread started dies with that thread; one the spawning thread started lives on.
    #[test]
    fn a_child_outlives_the_runtime_thread_that_asked_for_it() {
        if std::process::Command::new("setpriv").arg("--help").output().is_err() {
            crate::util::skip_test("no setpriv (util-linux) here");
            return;
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let handle = rt.handle().clone();
        let from_a_passing_thread = |direct: bool| {
            let h = handle.clone();
            let mut child = std::thread::spawn(move || {
                let _e = h.enter();
                let child = if direct {
                    child_with_pdeathsig().spawn().unwrap()
                } else {
                    h.block_on(spawn(child_with_pdeathsig())).unwrap()
                };
                // The child arms its PDEATHSIG first (as a session process does at its start).
                std::thread::sleep(std::time::Duration::from_millis(300));
                child
            })
            .join()
            .unwrap();
            // The thread is gone; give the signal time to arrive.
            std::thread::sleep(std::time::Duration::from_millis(300));
            let alive = rt.block_on(async { child.try_wait().unwrap().is_none() });
            rt.block_on(async {
                let _ = child.kill().await;
            });
            alive
        };
        assert!(!from_a_passing_thread(true), "the control: a child of an exited thread gets its PDEATHSIG");
        assert!(from_a_passing_thread(false), "a child of the spawning thread was killed when the asking thread ended");
    }
}
