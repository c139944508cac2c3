//! What the worker's trail followers share: one inotify instance that wakes a follower when its
//! trail is written to, so the follower of an idle session costs nothing (no timer, no read), and
//! one HTTP client for the OTLP sinks. Polling every half second instead, 2,000 idle sessions took
//! 4,000 wakeups and file reads a second.
//!
//! Where inotify cannot serve (its per-user limits reached), a follower polls as before and the
//! worker says so once: shipping and the metrics are late by at most the poll, never lost.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// How often a follower without a watch reads its trail.
const POLL: Duration = Duration::from_millis(500);

#[derive(Default)]
pub(crate) struct Trails {
    watch: OnceLock<Option<Arc<Watch>>>,
    http: OnceLock<Option<reqwest::Client>>,
    /// The fallback to polling was reported.
    said: AtomicBool,
}

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

struct Watch {
    fd: AsyncFd<Fd>,
    /// The followers of each watched file (a file followed twice has one watch).
    followers: Mutex<HashMap<WatchDescriptor, Vec<Arc<Notify>>>>,
    /// The instance failed: every follower polls from now on.
    broken: AtomicBool,
}

impl Watch {
    fn wake_all(&self) {
        for n in self.followers.lock().unwrap_or_else(|p| p.into_inner()).values().flatten() {
            n.notify_one();
        }
    }

    /// Reads the instance's events for as long as the worker runs, waking the followers of each
    /// file written to (all of them when the kernel's queue overflowed).
    async fn run(self: Arc<Watch>) {
        loop {
            let mut ready = match self.fd.readable().await {
                Ok(r) => r,
                Err(e) => return self.fail(&e.to_string()),
            };
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => {
                    if events.iter().any(|e| e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)) {
                        self.wake_all();
                        continue;
                    }
                    let followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
                    for e in &events {
                        for n in followers.get(&e.wd).into_iter().flatten() {
                            n.notify_one();
                        }
                    }
                }
                Ok(Err(e)) => return self.fail(&e.to_string()),
                Err(_would_block) => {}
            }
        }
    }

    fn fail(&self, error: &str) {
        tracing::warn!(error, "reading the trails' inotify events failed; trail followers poll from now on");
        self.broken.store(true, Ordering::Relaxed);
        self.wake_all();
    }
}

/// A follower's registration: dropped, its file is no longer watched for it.
pub(crate) struct Wake {
    watched: Option<(Arc<Watch>, WatchDescriptor, Arc<Notify>)>,
}

impl Wake {
    /// Returns once the trail may have grown: at its next write, or after the poll interval
    /// without a watch.
    pub(crate) async fn next(&self) {
        match &self.watched {
            Some((w, _, n)) if !w.broken.load(Ordering::Relaxed) => n.notified().await,
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        let Some((w, wd, n)) = self.watched.take() else { return };
        let mut followers = w.followers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = followers.get_mut(&wd) else { return };
        list.retain(|x| !Arc::ptr_eq(x, &n));
        if list.is_empty() {
            followers.remove(&wd);
            // The file may be gone already (the kernel then removed the watch itself).
            let _ = w.fd.get_ref().0.rm_watch(wd);
        }
    }
}

impl Trails {
    /// Wakes the caller when `path` is written to. Needs the runtime (its first call starts the
    /// reader of the inotify instance).
    pub(crate) fn wake_on_write(&self, path: &Path) -> Wake {
        let watch = self.watch.get_or_init(|| match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            // SAFETY: `Fd` owns the instance's descriptor and hands out that same one for as long
            // as it lives; nothing else closes it.
            Ok(i) => match unsafe { AsyncFd::register(Fd(i)) } {
                Ok(fd) => {
                    let w = Arc::new(Watch { fd, followers: Mutex::default(), broken: AtomicBool::new(false) });
                    tokio::spawn(w.clone().run());
                    Some(w)
                }
                Err(e) => {
                    self.say_polling(&e.to_string());
                    None
                }
            },
            Err(e) => {
                self.say_polling(&format!("inotify_init1: {e}"));
                None
            }
        });
        let Some(w) = watch else { return Wake { watched: None } };
        // The map's lock is held across the watch's creation: an event for a new descriptor
        // finds its follower listed.
        let mut followers = w.followers.lock().unwrap_or_else(|p| p.into_inner());
        match w.fd.get_ref().0.add_watch(path, AddWatchFlags::IN_MODIFY) {
            Ok(wd) => {
                let n = Arc::new(Notify::new());
                followers.entry(wd).or_default().push(n.clone());
                Wake { watched: Some((w.clone(), wd, n)) }
            }
            Err(e) => {
                // ENOSPC: fs.inotify.max_user_watches reached.
                drop(followers);
                self.say_polling(&format!("inotify_add_watch {}: {e}", path.display()));
                Wake { watched: None }
            }
        }
    }

    fn say_polling(&self, error: &str) {
        if !self.said.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error,
                "cannot watch the sessions' trails (raise fs.inotify.max_user_watches or max_user_instances): \
                 their followers poll every 500 ms instead, a cost to every idle session"
            );
        }
    }

    /// The client for the OTLP sinks, built at the first follower that has one.
    pub(crate) fn http(&self) -> Option<&reqwest::Client> {
        self.http.get_or_init(|| reqwest::Client::builder().timeout(Duration::from_secs(10)).build().ok()).as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_follower_wakes_at_a_write_to_its_file_only() {
        let dir = std::env::temp_dir().join(format!("stockade-trail-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let trails = Trails::default();
            let (wa, wb) = (trails.wake_on_write(&a), trails.wake_on_write(&b));
            assert!(wa.watched.is_some(), "inotify serves here");
            let mut f = std::fs::OpenOptions::new().append(true).open(&a).unwrap();
            f.write_all(b"x\n").unwrap();
            tokio::time::timeout(Duration::from_secs(5), wa.next()).await.expect("a write to a wakes a's follower");
            // Nothing was written to b: its follower sleeps on (longer than a poll would).
            assert!(tokio::time::timeout(POLL * 3, wb.next()).await.is_err(), "b's follower woke");
            // A write made while no one waits is not lost.
            f.write_all(b"y\n").unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            tokio::time::timeout(Duration::from_secs(5), wa.next()).await.expect("an earlier write wakes the follower");
            let w = trails.watch.get().unwrap().clone().unwrap();
            drop(wa);
            drop(wb);
            assert!(w.followers.lock().unwrap().is_empty(), "a dropped follower's watch is removed");
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
