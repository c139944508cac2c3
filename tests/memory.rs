//! Memory stores end to end: `stockade worker` serving sessions with attached stores from the
//! local control plane — the folders in the jail, write-through, the syncs, and what the agent
//! may try against the host through them.

mod common;

use common::worker::*;
use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

use stockade::control_plane::local::memory::Attached;

fn attach(id: &str, mount: &str, read_only: bool) -> Attached {
    Attached { memory_store_id: id.into(), mount_path: Some(mount.into()), read_only }
}

fn store(cp: &Cp, name: &str, seed: &[(&str, &str)]) -> String {
    let id = cp.cp.create_memory_store(name, "").unwrap();
    for (p, c) in seed {
        cp.cp.put_memory(&id, p, c).unwrap();
    }
    id
}

fn contents(cp: &Cp, id: &str) -> BTreeMap<String, String> {
    cp.cp.memories(id).unwrap()
}

fn is_error(v: &stockade::control_plane::local::SessionView, i: usize) -> bool {
    v.calls[i].is_error == Some(true)
}

#[test]
fn stores_are_mounted_written_through_synced_and_removed_at_the_end() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem");
    let _w = start_worker(&cp, state.path(), &[]);
    let notes =
        store(&cp, "notes", &[("/seed.md", "seed line\n"), ("/old.md", "to be deleted\n"), ("/keep/a.md", "a")]);
    let shared = store(&cp, "shared", &[("/rules.md", "be kind\n")]);
    let (s, _) = cp.session_with(
        vec![
            step("read", json!({"file_path": "/mnt/memory/notes/seed.md"})),
            step("write", json!({"file_path": "/mnt/memory/notes/new/n.md", "content": "from write\n"})),
            step(
                "edit",
                json!({"file_path": "/mnt/memory/notes/seed.md", "old_string": "seed", "new_string": "edited"}),
            ),
            bash(
                "cat /mnt/memory/notes/.anthropic-memory-store; echo; echo bash > /mnt/memory/notes/viabash.md; \
                 rm /mnt/memory/notes/old.md; echo x > /mnt/memory/shared/rules.md; cat /mnt/memory/shared/rules.md",
            ),
            step("write", json!({"file_path": "/mnt/memory/shared/rules.md", "content": "be mean"})),
            step("write", json!({"file_path": "/mnt/memory/notes/big.md", "content": "y".repeat(150_000)})),
            step("write", json!({"file_path": "/mnt/memory/notes/.anthropic-memory-store", "content": "x"})),
        ],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/notes", false), attach(&shared, "/mnt/memory/shared", true)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "seed line\n");
    assert_eq!(result_of(&v, 1), "wrote 11 bytes to /mnt/memory/notes/new/n.md");
    assert_eq!(result_of(&v, 2), "edited /mnt/memory/notes/seed.md (1 replacement(s))");
    let b = result_of(&v, 3);
    assert!(b.starts_with(&format!("version 1\n{notes}\n")), "{b}");
    assert!(b.contains("/mnt/memory/shared/rules.md: Read-only file system"), "{b}");
    assert!(b.contains("be kind"), "{b}");
    assert!(is_error(&v, 4));
    assert_eq!(result_of(&v, 4), "write: /mnt/memory/shared/rules.md is inside read-only directory /mnt/memory/shared");
    assert!(is_error(&v, 5));
    assert!(
        result_of(&v, 5)
            .starts_with("write: /mnt/memory/notes/big.md: not saved to memory, so the change was not made: "),
        "{}",
        result_of(&v, 5)
    );
    assert_eq!(
        result_of(&v, 6),
        "write: /mnt/memory/notes/.anthropic-memory-store: not saved to memory, so the change was not made: this file \
         marks the folder as a memory store."
    );
    // Written through at once, and the rest by the last sync at the end (the delete included:
    // it needs no corroboration then).
    let want: BTreeMap<String, String> =
        [("/seed.md", "edited line\n"), ("/new/n.md", "from write\n"), ("/viabash.md", "bash\n"), ("/keep/a.md", "a")]
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();
    cp.wait_for("the last sync", Duration::from_secs(20), || contents(&cp, &notes) == want);
    assert_eq!(contents(&cp, &shared).get("/rules.md").map(String::as_str), Some("be kind\n"));
    // Nothing of the folders is left once the item is over.
    cp.wait_for("the item's directory to go", Duration::from_secs(20), || {
        !state.path().join("items").read_dir().is_ok_and(|mut d| d.next().is_some())
    });
}

/// What the agent plants in a memory folder cannot make the worker read or write a host file:
/// a symlink to a host file is not followed (its target is not uploaded), a FIFO does not block
/// the sync, a file past the API's size is refused and recorded, and a symlinked directory is
/// not descended.
#[test]
fn planted_links_fifos_and_oversized_files_never_reach_the_host_or_the_store() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-hostile");
    let secret_dir = TempDir::new("w-mem-secret");
    let secret = secret_dir.path().join("host-secret.txt");
    std::fs::write(&secret, "HOST-SECRET-abc123").unwrap();
    let _w = start_worker(&cp, state.path(), &["--memory-sync-interval", "5s"]);
    let notes = store(&cp, "notes", &[("/a.md", "a")]);
    let planted = format!(
        "cd /mnt/memory/notes && ln -s {s} link.md && ln -s {d} dirlink && mkfifo pipe.md && \
         head -c 200000 /dev/zero | tr '\\0' z > huge.md && echo fine > ok.md && sleep 6",
        s = secret.display(),
        d = secret_dir.path().display()
    );
    let (s, _) = cp.session_with(
        vec![bash(&planted), bash("echo second"), step("read", json!({"file_path": "/mnt/memory/notes/ok.md"}))],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/notes", false)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 2), "fine\n");
    let want: BTreeMap<String, String> =
        [("/a.md", "a"), ("/ok.md", "fine\n")].into_iter().map(|(a, b)| (a.to_owned(), b.to_owned())).collect();
    cp.wait_for("the last sync", Duration::from_secs(20), || contents(&cp, &notes) == want);
    for (p, c) in contents(&cp, &notes) {
        assert!(!c.contains("HOST-SECRET"), "{p} holds the host file");
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "HOST-SECRET-abc123");
    // The refusal is in the session's trail.
    let trails: Vec<_> = std::fs::read_dir(state.path().join("trails")).unwrap().flatten().collect();
    let text: String = trails.iter().map(|t| std::fs::read_to_string(t.path()).unwrap()).collect();
    assert!(text.contains("\"action\":\"refused\"") && text.contains("huge.md"), "{text}");
}

/// A `mount_path` the official worker would not use verbatim fails the session before any call.
#[test]
fn a_mount_path_with_dot_dot_fails_the_session_before_anything_runs() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-bad");
    let _w = start_worker(&cp, state.path(), &[]);
    let notes = store(&cp, "notes", &[]);
    let (s, _) = cp.session_with(
        vec![bash("echo never")],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/../etc", false)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert_eq!(v.work_state, stockade::control_plane::wire::WorkState::Stopped, "{v:#?}");
    assert!(v.calls[0].result.is_none(), "{v:#?}");
}

/// A folder the agent empties (its marker too) is taken for destroyed, not for "delete every
/// memory": the next sync downloads it again and the store keeps everything.
#[test]
fn an_emptied_folder_is_downloaded_again_and_nothing_is_deleted() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-wipe");
    let _w = start_worker(&cp, state.path(), &["--memory-sync-interval", "5s"]);
    let seed = [("/a.md", "a"), ("/b.md", "b"), ("/c/d.md", "d")];
    let notes = store(&cp, "notes", &seed);
    let (s, _) = cp.session_with(
        vec![
            bash("rm -rf /mnt/memory/notes/* /mnt/memory/notes/.anthropic-memory-store; ls -A /mnt/memory/notes; sleep 6"),
            bash("echo after"),
            bash("cd /mnt/memory/notes && ls -A && cat c/d.md"),
        ],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/notes", false)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "(no output)");
    assert_eq!(result_of(&v, 2), ".anthropic-memory-store\na.md\nb.md\nc\nd");
    let want: BTreeMap<String, String> = seed.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(contents(&cp, &notes), want);
}

/// More files than a store may hold: the sync saves up to the API's bound, the rest are
/// refused and recorded, and the session ends normally.
#[test]
fn thousands_of_files_sync_up_to_the_stores_bound() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-many");
    let _w = start_worker(&cp, state.path(), &[]);
    let notes = store(&cp, "notes", &[]);
    let (s, _) = cp.session_with(
        vec![bash("cd /mnt/memory/notes && for i in $(seq 1 2100); do echo $i > f$i.md; done; ls | wc -l")],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/notes", false)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(120));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "2100");
    cp.wait_for("the last sync", Duration::from_secs(60), || contents(&cp, &notes).len() == 2000);
    let trails: Vec<_> = std::fs::read_dir(state.path().join("trails")).unwrap().flatten().collect();
    let text: String = trails.iter().map(|t| std::fs::read_to_string(t.path()).unwrap()).collect();
    assert_eq!(text.matches("\"action\":\"refused\"").count(), 100, "one record per file refused");
}

/// A store mounted below the workspace or /tmp is not hidden by them.
#[test]
fn stores_below_the_workspace_and_tmp_are_in_view() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-below");
    let _w = start_worker(&cp, state.path(), &[]);
    let a = store(&cp, "a", &[("/x.md", "in the workspace")]);
    let b = store(&cp, "b", &[("/y.md", "in tmp")]);
    let (s, _) = cp.session_with(
        vec![
            bash("cat /workspace/mem/x.md; echo; cat /tmp/mem/y.md"),
            step("write", json!({"file_path": "/workspace/mem/z.md", "content": "z"})),
        ],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&a, "/workspace/mem", false), attach(&b, "/tmp/mem", true)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "in the workspace\nin tmp");
    assert_eq!(result_of(&v, 1), "wrote 1 bytes to /workspace/mem/z.md");
    assert_eq!(contents(&cp, &a).get("/z.md").map(String::as_str), Some("z"));
}

/// `--memory-sync-deletions log_only` runs the checks and deletes nothing, even at the end.
#[test]
fn log_only_deletes_nothing() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-logonly");
    let _w = start_worker(&cp, state.path(), &["--memory-sync-deletions", "log_only"]);
    let notes = store(&cp, "notes", &[("/a.md", "a"), ("/b.md", "b")]);
    let (s, _) = cp.session_with(
        vec![bash("rm /mnt/memory/notes/a.md && echo gone")],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/notes", false)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    cp.wait_for("the item's directory to go", Duration::from_secs(20), || {
        !state.path().join("items").read_dir().is_ok_and(|mut d| d.next().is_some())
    });
    assert_eq!(contents(&cp, &notes).len(), 2, "{:?}", contents(&cp, &notes));
}

/// A call the session stopped may have moved a file away: it is pulled back, not taken for a
/// deletion, even by the last sync (which sends deletes without waiting).
#[test]
fn a_file_a_stopped_call_moved_away_is_restored_not_deleted() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-stopped");
    let _w = start_worker(&cp, state.path(), &["--max-concurrent-calls", "2"]);
    let notes = store(&cp, "notes", &[("/a.md", "a"), ("/b.md", "b")]);
    let marker = format!("sleep 60.{}", std::process::id());
    let mut stopped = bash(&format!("mv /mnt/memory/notes/a.md /tmp/a.md; {marker}"));
    stopped.thread = Some("sthr_sub".into());
    let (s, _) = cp.session_with(
        vec![stopped, bash("sleep 1; ls /mnt/memory/notes")],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/notes", false)],
    );
    // The thread stops waiting once the file is moved away and the command sleeps.
    cp.stop_waiting_once_running(&s, "sthr_sub", &marker);
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert!(result_of(&v, 0).contains("was stopped"), "{v:#?}");
    cp.wait_for("the item's directory to go", Duration::from_secs(20), || {
        !state.path().join("items").read_dir().is_ok_and(|mut d| d.next().is_some())
    });
    let want: BTreeMap<String, String> =
        [("/a.md", "a"), ("/b.md", "b")].into_iter().map(|(a, b)| (a.to_owned(), b.to_owned())).collect();
    assert_eq!(contents(&cp, &notes), want);
}

/// With disk limits, the memory folders are on a filesystem of their own: filling one stops at
/// its size (the workspace's, at most 512 MiB), never at the host's disk.
#[test]
fn a_memory_folder_fills_up_at_its_filesystems_size() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-full");
    let _w = start_worker(&cp, state.path(), &[]);
    let notes = store(&cp, "notes", &[]);
    let (s, _) = cp.session_with(
        vec![bash("fallocate -l 600M /mnt/memory/notes/big 2>&1 || dd if=/dev/zero of=/mnt/memory/notes/big bs=1M count=600 2>&1 | tail -1; rm -f /mnt/memory/notes/big")],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/notes", false)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert!(result_of(&v, 0).contains("No space left on device"), "{}", result_of(&v, 0));
}

/// One sync sends at most a quarter of the store's deletes (at least 8, at most 50); the rest
/// wait for a later sync — here none comes, so they stay on the server.
#[test]
fn one_sync_deletes_no_more_than_its_cap() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-cap");
    let _w = start_worker(&cp, state.path(), &[]);
    let seed: Vec<(String, String)> = (0..20).map(|i| (format!("/f{i:02}.md"), format!("{i}"))).collect();
    let seed_refs: Vec<(&str, &str)> = seed.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let notes = store(&cp, "notes", &seed_refs);
    let (s, _) = cp.session_with(
        vec![bash("cd /mnt/memory/notes && rm f0*.md f10.md f11.md && ls | wc -l")],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "/mnt/memory/notes", false)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "8");
    cp.wait_for("the item's directory to go", Duration::from_secs(20), || {
        !state.path().join("items").read_dir().is_ok_and(|mut d| d.next().is_some())
    });
    assert_eq!(contents(&cp, &notes).len(), 20 - 8, "{:?}", contents(&cp, &notes).keys());
}

/// A resource without a `mount_path` lands where the official worker puts it: the working
/// directory's `memory/<store name>`.
#[test]
fn a_store_without_a_mount_path_lands_in_the_workspace() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-fallback");
    let _w = start_worker(&cp, state.path(), &[]);
    let notes = store(&cp, "notes", &[("/a.md", "a")]);
    let (s, _) = cp.session_with(
        vec![step("read", json!({"file_path": "/workspace/memory/notes/a.md"}))],
        serde_json::Map::new(),
        Vec::new(),
        vec![attach(&notes, "", false)],
    );
    let v = cp.wait_ended(&s, Duration::from_secs(60));
    assert!(completed(&v), "{v:#?}");
    assert_eq!(result_of(&v, 0), "a");
}

/// The memory endpoints refuse the environment key: an item without a sessions token fails
/// when its session has a store attached, as the official worker's does, and runs without its
/// memory when the worker is told to (`--memory-sync-interval none`).
#[test]
fn an_item_without_a_sessions_token_fails_unless_memory_is_off() {
    if needs_root() {
        return;
    }
    let cp = Cp::start(Duration::from_secs(30));
    let state = TempDir::new("w-mem-token");
    let notes = store(&cp, "notes", &[("/a.md", "a")]);
    let steps = || vec![bash("ls /mnt/memory 2>&1; echo ran")];
    let attached = || vec![attach(&notes, "/mnt/memory/notes", false)];
    {
        let key = cp.key_file();
        let mut c = worker_cmd(&cp, state.path(), &[]);
        c.arg("--environment-key-file").arg(&key).stderr(std::process::Stdio::piped());
        let mut w = Worker { child: c.spawn().unwrap() };
        let (s, _) = cp.session_without_token(steps(), attached());
        let v = cp.wait_ended(&s, Duration::from_secs(30));
        assert_eq!(v.work_state, stockade::control_plane::wire::WorkState::Stopped, "{v:#?}");
        assert!(v.calls[0].result.is_none(), "{v:#?}");
        assert!(w.sigterm().success());
        let mut log = String::new();
        std::io::Read::read_to_string(&mut w.child.stderr.take().unwrap(), &mut log).unwrap();
        assert!(log.contains("cannot mount the session's memories: the work item carried no sessions token"), "{log}");
    }
    let _w = start_worker(&cp, state.path(), &["--memory-sync-interval", "none"]);
    let (s, _) = cp.session_without_token(steps(), attached());
    let v = cp.wait_ended(&s, Duration::from_secs(30));
    assert!(completed(&v), "{v:#?}");
    assert!(result_of(&v, 0).ends_with("ran"), "{}", result_of(&v, 0));
    assert!(result_of(&v, 0).contains("No such file or directory"), "{}", result_of(&v, 0));
}
