//! The worker's state directory on a small filesystem: sessions' sparse images must never be
//! promised more room than there is, or the kernel drops their writes after the session was told
//! they succeeded.

mod common;

use common::worker::*;
use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use stockade::control_plane::wire::WorkState;

/// A tmpfs of `size` at `at`, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        nix::mount::mount(Some("stockade-test"), at, Some("tmpfs"), nix::mount::MsFlags::empty(), Some(size)).unwrap();
        SmallDisk(at.to_path_buf())
    }

    fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.0).unwrap();
        s.blocks_available() as u64 * s.fragment_size() as u64
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn log_lines(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
}

/// 400 MB for the state directory, 272 MB of images per session: the worker serves one session
/// at a time and says so, so two sessions writing 200 MB each both read back what they wrote.
/// Then something else fills the disk under a running session: it is ended, as a failure, and
/// no new session is taken until the room is back.
#[test]
fn a_small_state_disk_backs_every_image_or_ends_the_session_loudly() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let dir = TempDir::new("w-small-disk");
    let disk = SmallDisk::mount(dir.path(), "size=400m");
    let state = dir.path().join("state");
    let policy = cp.dir.path().join("small.toml");
    std::fs::write(&policy, "extends = \"default\"\n[limits]\nworkspace_size = \"256M\"\noutputs_size = \"16M\"\n")
        .unwrap();
    let log = cp.dir.path().join("worker.log");
    let mut c = worker_cmd(&cp, &state, &["--max-sessions", "2", "--policy", policy.to_str().unwrap()]);
    c.arg("--environment-key-file").arg(cp.key_file()).stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let mut w = Worker { child: c.spawn().unwrap() };
    cp.wait_for("the worker's slot count", Duration::from_secs(20), || {
        !log_lines(&log, "--max-sessions 2 sessions: serving 1 at a time").is_empty()
    });
    // Written through a pipe that hashes it on the way, then read back from the disk.
    let write = "head -c 200M /dev/urandom | tee /workspace/f | sha256sum | cut -c1-16; sync; \
                 sha256sum /workspace/f | cut -c1-16";
    let (s1, w1) = cp.session(vec![bash(write)]);
    let (s2, w2) = cp.session(vec![bash(write)]);
    for s in [&s1, &s2] {
        let v = cp.wait_ended(s, Duration::from_secs(120));
        assert!(completed(&v), "{v:#?}");
        let out: Vec<&str> = result_of(&v, 0).lines().collect();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], out[1], "the file read back is not what was written");
    }
    // One at a time: the second started after the first had ended.
    let text = std::fs::read_to_string(&log).unwrap();
    let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("no {needle:?} in the log:\n{text}"));
    let (first, second) =
        if at(&format!("work_id={w1}")) < at(&format!("work_id={w2}")) { (&w1, &w2) } else { (&w2, &w1) };
    let ended_first = text.lines().position(|l| l.contains(first.as_str()) && l.contains("session ended")).unwrap();
    let started_second =
        text.lines().position(|l| l.contains(second.as_str()) && l.contains("session starting")).unwrap();
    assert!(ended_first < started_second, "two sessions' images were promised at once:\n{text}");

    // Now a session runs, and something else takes the room its images were promised.
    let (s3, w3) = cp.session(vec![bash("head -c 20M /dev/urandom > /workspace/g; echo written"), bash("sleep 60")]);
    cp.wait_for("the first call", Duration::from_secs(60), || result_of(&cp.view(&s3), 0) == "written");
    let filler = dir.path().join("filler");
    let keep = 64 << 20;
    let f = std::fs::File::create(&filler).unwrap();
    f.set_len(disk.free() - keep).unwrap();
    // tmpfs gives blocks as they are written: write them.
    let chunk = vec![0u8; 1 << 20];
    let mut left = disk.free().saturating_sub(keep);
    let mut f = std::io::BufWriter::new(f);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if std::io::Write::write_all(&mut f, &chunk[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    drop(f);
    let v = cp.wait_ended(&s3, Duration::from_secs(30));
    assert_eq!(v.work_state, WorkState::Stopped, "{v:#?}");
    assert_eq!(result_of(&v, 1), "<none>", "the long call ran to its end: {v:#?}");
    cp.wait_for("the failure in the log", Duration::from_secs(10), || {
        log_lines(&log, "session failed").iter().any(|l| l.contains(&w3) && l.contains("state directory has"))
    });
    // No new session while the room is gone (watched over a window the admission below is shown
    // to fit in); taken once it is back.
    const WINDOW: Duration = Duration::from_secs(8);
    let (s4, _) = cp.session(vec![bash("echo fourth")]);
    let t = Instant::now();
    while t.elapsed() < WINDOW {
        assert_eq!(cp.view(&s4).work_state, WorkState::Queued, "a session was taken with no room for its images");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!log_lines(&log, "not taking new sessions until there is room").is_empty());
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    cp.wait_for("the session to be taken", Duration::from_secs(30), || cp.view(&s4).work_state != WorkState::Queued);
    let took = t.elapsed();
    assert!(took * 2 < WINDOW, "taking a session once there was room took {took:?}: the window could miss one");
    let v = cp.wait_ended(&s4, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "fourth");
    assert!(w.sigterm().success());
    drop(disk);
}
