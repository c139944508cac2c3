//! Tool answers on fixture trees, run natively, spelled as the official runner spells them (the
//! differential suite in tests/sdk compares hundreds more with the runner itself; the session
//! tests run the same functions inside jails).

use super::bash::{KillScope, Shell};
use super::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

struct Fixture(PathBuf);

impl Fixture {
    fn new(tag: &str) -> Fixture {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "stockade-tools-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Fixture(p)
    }
    fn file(&self, rel: &str, content: &str) -> String {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }
    fn ctx(&self) -> Ctx {
        Ctx::new(self.0.clone(), false)
    }
    fn age(&self, rel: &str, secs_ago: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs_ago);
        let f = std::fs::File::options().write(true).open(self.0.join(rel)).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(t)).unwrap();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(f: &Fixture, name: &str, input: serde_json::Value) -> ToolResult {
    run_file_tool(&f.ctx(), name, &input)
}

#[test]
fn read_returns_raw_text_sliced_by_view_range() {
    let f = Fixture::new("read");
    f.file("notes/a.txt", "alpha\nbeta\n\ngamma");
    let r = run(&f, "read", json!({"file_path": "notes/a.txt"}));
    assert_eq!(r, ToolResult::ok("alpha\nbeta\n\ngamma"));
    let r = run(&f, "read", json!({"file_path": "notes/a.txt", "view_range": [2, 3]}));
    assert_eq!(r, ToolResult::ok("beta\n"));
    let r = run(&f, "read", json!({"file_path": "notes/a.txt", "view_range": [3, -1]}));
    assert_eq!(r, ToolResult::ok("\ngamma"));
    let r = run(&f, "read", json!({"file_path": "notes/a.txt", "view_range": [1]}));
    assert_eq!(r, ToolResult::err("read: view_range must be [start_line, end_line]"));
    f.file("empty.txt", "");
    assert_eq!(run(&f, "read", json!({"file_path": "empty.txt"})), ToolResult::ok(NO_OUTPUT));
}

#[test]
fn read_refuses_what_the_runner_refuses_in_its_words() {
    let f = Fixture::new("read-refuse");
    std::fs::create_dir_all(f.0.join("dir")).unwrap();
    std::fs::write(f.0.join("bin.dat"), b"\xff\xfe\0").unwrap();
    for (path, want) in [
        ("dir", "read: dir: not a regular file"),
        ("nope", "read: nope: no such file or directory"),
        ("bin.dat", "read: bin.dat: not valid UTF-8 text (binary files are only supported for image/PDF extensions)"),
        ("nul\0byte", "read: embedded null byte"),
    ] {
        assert_eq!(run(&f, "read", json!({"file_path": path})), ToolResult::err(want), "{path}");
    }
    let big = "x".repeat(300 * 1024);
    f.file("big.txt", &big);
    assert_eq!(
        run(&f, "read", json!({"file_path": "big.txt"})),
        ToolResult::err(
            "read: big.txt is 307200 bytes, exceeds 110000-byte limit. Use the view_range parameter to read \
             specific line ranges, e.g. view_range: [1, 500]."
        )
    );
    assert_eq!(
        run(&f, "read", json!({"file_path": "big.txt", "view_range": [1, 1]})),
        ToolResult::err(
            "read: line 1 of big.txt alone exceeds 110000-byte limit. The read tool cannot return part of a line, \
             so view_range cannot narrow this further."
        )
    );
    // A FIFO is refused without blocking on it.
    nix::unistd::mkfifo(&f.0.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_eq!(run(&f, "read", json!({"file_path": "fifo"})), ToolResult::err("read: fifo: not a regular file"));
}

#[test]
fn images_and_pdfs_come_back_as_base64_blocks() {
    let f = Fixture::new("read-media");
    std::fs::write(f.0.join("p.PNG"), b"\x89PNG").unwrap();
    std::fs::write(f.0.join("d.pdf"), b"%PDF").unwrap();
    let r = run(&f, "read", json!({"file_path": "p.PNG"}));
    assert_eq!(
        r.content,
        vec![Block::Image {
            source: Source { kind: "base64".into(), media_type: "image/png".into(), data: "iVBORw==".into() }
        }]
    );
    let r = run(&f, "read", json!({"file_path": "d.pdf"}));
    assert!(matches!(&r.content[..], [Block::Document { source }] if source.data == "JVBERg=="), "{r:?}");
    assert_eq!(
        run(&f, "read", json!({"file_path": "d.pdf", "view_range": [1, 2]})),
        ToolResult::err("read: view_range is not supported for image/PDF files")
    );
}

#[test]
fn malformed_inputs_get_the_runners_exception_text() {
    let f = Fixture::new("inputs");
    for (name, input, want) in [
        ("read", json!({"file_path": "a", "offset": 2}), "ValueError('Invalid arguments for function read')"),
        ("write", json!({"file_path": "a"}), "ValueError('Invalid arguments for function write')"),
        ("grep", json!([]), "TypeError('Input must be a dictionary, got list')"),
        ("glob", json!({"pattern": "../x"}), "glob: '..' is not permitted in the pattern"),
        (
            "glob",
            json!({"pattern": "/etc/*"}),
            "glob: absolute pattern not permitted; pass a relative pattern (and optionally path)",
        ),
        ("glob", json!({"pattern": ""}), "glob: Unacceptable pattern: ''"),
        ("glob", json!({"pattern": "a**"}), "glob: Invalid pattern: '**' can only be an entire path component"),
    ] {
        assert_eq!(run(&f, name, input.clone()), ToolResult::err(want), "{name} {input}");
    }
}

#[test]
fn write_creates_parents_and_counts_characters() {
    let f = Fixture::new("write");
    let r = run(&f, "write", json!({"file_path": "new/dir/f.txt", "content": "é日\n"}));
    assert_eq!(r, ToolResult::ok("wrote 3 bytes to new/dir/f.txt"));
    assert_eq!(std::fs::read_to_string(f.0.join("new/dir/f.txt")).unwrap(), "é日\n");
    assert_eq!(
        run(&f, "write", json!({"file_path": "new/dir/f.txt/x", "content": ""})),
        ToolResult::err("write: new/dir/f.txt/x: file already exists")
    );
    assert_eq!(
        run(&f, "write", json!({"file_path": "new", "content": ""})),
        ToolResult::err("write: new: is a directory")
    );
}

#[test]
fn edit_replaces_once_or_all_and_explains_failures() {
    let f = Fixture::new("edit");
    f.file("e.txt", "one two two");
    assert_eq!(
        run(&f, "edit", json!({"file_path": "e.txt", "old_string": "two", "new_string": "2"})),
        ToolResult::err("edit: old_string appears 2 times in e.txt (must be unique)")
    );
    assert_eq!(
        run(&f, "edit", json!({"file_path": "e.txt", "old_string": "three", "new_string": "3"})),
        ToolResult::err("edit: old_string not found in e.txt")
    );
    assert_eq!(
        run(&f, "edit", json!({"file_path": "e.txt", "old_string": "two", "new_string": "2", "replace_all": "yes"})),
        ToolResult::ok("edited e.txt (2 replacement(s))")
    );
    assert_eq!(std::fs::read_to_string(f.0.join("e.txt")).unwrap(), "one 2 2");
    assert_eq!(
        run(&f, "edit", json!({"file_path": "e.txt", "old_string": "", "new_string": "S"})),
        ToolResult::err("edit: old_string appears 8 times in e.txt (must be unique)")
    );
}

#[test]
fn paths_outside_the_workdir_are_refused_only_when_confined() {
    let f = Fixture::new("confine");
    let outside = Fixture::new("confine-outside");
    outside.file("o.txt", "outside\n");
    let rel = format!("../{}/o.txt", outside.0.file_name().unwrap().to_string_lossy());
    assert_eq!(run(&f, "read", json!({"file_path": rel})), ToolResult::ok("outside\n"));
    let confined = Ctx::new(f.0.clone(), true);
    assert_eq!(
        run_file_tool(&confined, "read", &json!({"file_path": rel})),
        ToolResult::err(format!("read: path \"{rel}\" is outside the session's working directory"))
    );
    // A symlink inside that leads outside is outside too.
    std::os::unix::fs::symlink(outside.0.join("o.txt"), f.0.join("link")).unwrap();
    assert_eq!(
        run_file_tool(&confined, "read", &json!({"file_path": "link"})),
        ToolResult::err("read: path \"link\" is outside the session's working directory")
    );
}

#[test]
fn glob_lists_newest_first_as_pathlib_matches() {
    let f = Fixture::new("glob");
    f.file("a.rs", "");
    f.file("src/b.rs", "");
    f.file("src/deep/c.rs", "");
    f.file(".hidden.rs", "");
    f.age("a.rs", 30);
    f.age("src/b.rs", 20);
    f.age("src/deep/c.rs", 10);
    f.age(".hidden.rs", 40);
    let root = f.0.display().to_string();
    assert_eq!(
        run(&f, "glob", json!({"pattern": "**/*.rs"})),
        ToolResult::ok(format!("{root}/src/deep/c.rs\n{root}/src/b.rs\n{root}/a.rs\n{root}/.hidden.rs"))
    );
    assert_eq!(run(&f, "glob", json!({"pattern": "*.rs", "path": "src"})), ToolResult::ok(format!("{root}/src/b.rs")));
    assert_eq!(run(&f, "glob", json!({"pattern": "*.py"})), ToolResult::ok("no matches"));
    for i in 0..250 {
        f.file(&format!("many/{i:03}.txt"), "");
    }
    let r = run(&f, "glob", json!({"pattern": "many/*.txt"}));
    assert_eq!(r.text_content().lines().count(), 200);
}

fn grep_fixture() -> Fixture {
    let f = Fixture::new("grep");
    f.file("src/main.rs", "fn main() {\n    let x = 1;\n    println!(\"Hello\");\n}\n");
    f.file("src/lib.rs", "pub fn hello() {}\n// hello again");
    f.file(".hidden/h.rs", "fn hello() {}\n");
    f.file(".ignore", "target/\n");
    f.file("target/gen.rs", "fn hello_generated() {}\n");
    std::fs::write(f.0.join("bin.dat"), b"hello\0world\n").unwrap();
    f
}

#[test]
fn grep_prints_what_ripgrep_prints() {
    let f = grep_fixture();
    let root = f.0.display().to_string();
    assert_eq!(
        run(&f, "grep", json!({"pattern": "hello"})),
        ToolResult::ok(format!("{root}/src/lib.rs:1:pub fn hello() {{}}\n{root}/src/lib.rs:2:// hello again\n"))
    );
    assert_eq!(run(&f, "grep", json!({"pattern": "let", "path": "src/main.rs"})), ToolResult::ok("2:    let x = 1;\n"));
    assert_eq!(
        run(&f, "grep", json!({"pattern": "hello", "path": "bin.dat"})),
        ToolResult::ok("binary file matches (found \"\\0\" byte around offset 5)\n")
    );
    assert_eq!(run(&f, "grep", json!({"pattern": "nothing-here"})), ToolResult::ok("no matches"));
    assert_eq!(
        run(&f, "grep", json!({"pattern": "("})),
        ToolResult::err("grep: rg failed: regex parse error:\n    (\n    ^\nerror: unclosed group\n")
    );
    let r = run(&f, "grep", json!({"pattern": "x", "path": "nope"}));
    assert_eq!(r, ToolResult::err(format!("grep: rg failed: {root}/nope: No such file or directory (os error 2)\n")));
}

#[test]
fn grep_output_is_cut_at_100_kib_characters() {
    let f = Fixture::new("grep-cut");
    f.file("big.txt", &"é match\n".repeat(20_000));
    let r = run(&f, "grep", json!({"pattern": "match"}));
    let text = r.text_content();
    let (body, marker) = text.split_at(text.len() - "\n[output truncated at 102400 bytes]".len());
    assert_eq!(marker, "\n[output truncated at 102400 bytes]");
    assert_eq!(body.chars().count(), 102_400);
}

fn shell() -> Shell {
    let env: Vec<(String, String)> = vec![("PATH".into(), "/usr/bin:/bin".into())];
    Shell::new(std::env::temp_dir(), env, KillScope::ProcessGroup)
}

const GONE: &str = "Call bash with restart set to true to start a new one. It starts in the original working \
                    directory, without the old shell's variables, activated environments and background jobs.";

#[test]
fn bash_keeps_state_and_answers_as_the_runner_does() {
    let mut sh = shell();
    assert_eq!(sh.call(&json!({"command": "X=41; cd /"})), ToolResult::ok(NO_OUTPUT));
    assert_eq!(sh.call(&json!({"command": "echo $((X+1)); pwd"})), ToolResult::ok("42\n/"));
    assert_eq!(sh.call(&json!({"command": "printf '\\033[31mred\\033[0m\\n\\n\\n'"})), ToolResult::ok("red"));
    // stdout, a newline, stderr; stderr first when the command failed.
    assert_eq!(sh.call(&json!({"command": "echo a; echo b >&2; echo c"})), ToolResult::ok("a\nc\n\nb"));
    assert_eq!(sh.call(&json!({"command": "echo x >&2"})), ToolResult::ok("\nx"));
    assert_eq!(
        sh.call(&json!({"command": "echo out; echo oops >&2; exit_with() { return 3; }; exit_with"})),
        ToolResult::err("oops\n\nout")
    );
    // Line 1 is the shell's set-up; each call before this one took six lines.
    assert_eq!(
        sh.call(&json!({"command": "nosuchcmd"})),
        ToolResult::err("/bin/bash: line 39: nosuchcmd: command not found")
    );
    assert_eq!(sh.call(&json!({"command": "echo $TERM; echo \"[$HISTFILE]\"; cat"})), ToolResult::ok("dumb\n[]"));
    assert_eq!(sh.call(&json!({})), ToolResult::err("bash: command is required"));
    // A restart with a command restarts, then runs it.
    assert_eq!(sh.call(&json!({"restart": true, "command": "echo ${X:-unset}"})), ToolResult::ok("unset"));
    assert_eq!(sh.call(&json!({"restart": true})), ToolResult::ok("bash session restarted"));
}

#[test]
fn bash_timeout_ends_the_shell_until_a_restart() {
    let mut sh = shell();
    let r = sh.call(&json!({"command": "echo start; echo err >&2; sleep 5", "timeout_ms": 300}));
    assert_eq!(
        r,
        ToolResult::err(format!("err\n\ncommand timed out after 0.3s\n\nstart\n[The shell is gone. {GONE}]"))
    );
    assert_eq!(
        sh.call(&json!({"command": "echo hi"})),
        ToolResult::err(format!("[This command did not run, because the shell is gone. {GONE}]"))
    );
    assert_eq!(sh.call(&json!({"restart": true})), ToolResult::ok("bash session restarted"));
    assert_eq!(sh.call(&json!({"command": "echo hi"})), ToolResult::ok("hi"));
}

#[test]
fn bash_timeouts_are_capped_at_295_seconds() {
    let mut sh = shell();
    // A negative or zero timeout is the default; the text names the capped value.
    let r = sh.call(&json!({"command": "echo $BASHPID", "timeout_ms": -5}));
    assert!(!r.is_error, "{r:?}");
    assert_eq!(super::format::BASH_DEFAULT_TIMEOUT_S, 295.0);
}

#[test]
fn bash_after_exit_starts_a_new_shell_and_says_so() {
    let mut sh = shell();
    let r = sh.call(&json!({"command": "echo bye; exit 3"}));
    let note = "[The shell is gone; the next call starts a new shell. It starts in the original working directory, \
                without the old shell's variables, activated environments and background jobs.]";
    assert_eq!(r, ToolResult::err(format!("bye\n{note}")));
    assert_eq!(sh.call(&json!({"command": "echo again"})), ToolResult::ok("again"));
    assert_eq!(sh.call(&json!({"command": "exit 0"})), ToolResult::ok(format!("{NO_OUTPUT}\n{note}")));
}

#[test]
fn bash_cuts_after_30000_code_units_and_saves_the_whole_output_for_read_and_grep() {
    let f = Fixture::new("bash-cut");
    let mut sh = Shell::new(f.0.clone(), vec![("PATH".into(), "/usr/bin:/bin".into())], KillScope::ProcessGroup);
    let text = sh.call(&json!({"command": "seq 1 40000"})).text_content();
    let (kept, tail) = text.split_once("\n\n... [").expect("cut");
    assert_eq!(kept.encode_utf16().count(), 30_000);
    assert!(kept.starts_with("1\n2\n"));
    let (lines, sentence) = tail.split_once(" lines truncated] Full output saved to: ").expect("sentence");
    // The runner counts the cut line's part as a line of its own.
    assert_eq!(lines.parse::<usize>().unwrap(), 40_001 - kept.matches('\n').count());
    let (path, rest) = sentence.split_once(" — ").expect("dash");
    assert_eq!(rest, "use read with view_range to read specific portions. ...");
    let saved = std::fs::read_to_string(path).unwrap();
    assert_eq!(saved.lines().count(), 40_000);
    assert!(saved.ends_with("39999\n40000\n"));

    // The file tools reach it even when confined to their working directory, and refuse to change it.
    let dir = sh.saved_output_dir().expect("saved").to_path_buf();
    assert!(path.starts_with(&*dir.to_string_lossy()));
    let ctx = Ctx { saved_outputs: vec![dir.clone()], ..Ctx::new(f.0.clone(), true) };
    let r = run_file_tool(&ctx, "read", &json!({"file_path": path, "view_range": [39999, 40000]}));
    assert_eq!(r, ToolResult::ok("39999\n40000"));
    let r = run_file_tool(&ctx, "grep", &json!({"pattern": "^39999$", "path": path}));
    assert_eq!(r, ToolResult::ok("39999:39999\n"));
    let r = run_file_tool(&ctx, "write", &json!({"file_path": path, "content": "x"}));
    assert_eq!(r, ToolResult::err(format!("write: path \"{path}\" is outside the session's working directory")));
    let open = Ctx { confine: false, ..ctx.clone() };
    let r = run_file_tool(&open, "write", &json!({"file_path": path, "content": "x"}));
    assert_eq!(r, ToolResult::err(format!("write: {path} is inside read-only directory {}", dir.display())));
    // Without the shell's word the same path is outside.
    let r = run_file_tool(&Ctx::new(f.0.clone(), true), "read", &json!({"file_path": path}));
    assert_eq!(r, ToolResult::err(format!("read: path \"{path}\" is outside the session's working directory")));

    // A restart removes it.
    sh.call(&json!({"restart": true}));
    assert!(!dir.exists());
}

#[test]
fn a_cut_counts_utf16_units_so_astral_characters_take_two() {
    let mut sh = shell();
    let text = sh.call(&json!({"command": "printf '🎉%.0s' $(seq 1 20000)"})).text_content();
    let (kept, _) = text.split_once("\n\n... [").expect("cut");
    assert_eq!(kept.chars().count(), 15_000);
    let mut sh = shell();
    sh.call(&json!({"command": "true"}));
    drop(sh);
}

#[test]
fn a_replace_all_whose_result_would_pass_the_edit_cap_is_refused_unchanged() {
    let f = Fixture::new("edit-grow");
    f.file("w.txt", &"x".repeat(5000));
    let r = run(
        &f,
        "edit",
        json!({"file_path": "w.txt", "old_string": "x", "new_string": "y".repeat(200), "replace_all": true}),
    );
    assert_eq!(
        r,
        ToolResult::err("edit: 5000 replacements would make w.txt 1000000 bytes, exceeds 262144-byte limit.")
    );
    assert_eq!(std::fs::read_to_string(f.0.join("w.txt")).unwrap(), "x".repeat(5000));
}

#[test]
fn read_refuses_past_110000_bytes_where_edit_still_loads_the_file() {
    let f = Fixture::new("read-cap");
    f.file("big.txt", &"a".repeat(110_001));
    let r = run(&f, "read", json!({"file_path": "big.txt"}));
    assert_eq!(
        r,
        ToolResult::err(
            "read: big.txt is 110001 bytes, exceeds 110000-byte limit. Use the view_range parameter to read specific \
             line ranges, e.g. view_range: [1, 500]."
        )
    );
    let r = run(&f, "edit", json!({"file_path": "big.txt", "old_string": "aaaa", "new_string": "b"}));
    assert!(r.is_error && r.text_content().contains("appears"), "{r:?}");
}
