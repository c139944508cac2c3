//! Byte-exact tool outputs on fixture trees, run natively (the session tests run the same
//! functions inside jails).

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
    fn path(&self, rel: &str) -> String {
        self.0.join(rel).display().to_string()
    }
    fn ctx(&self) -> Ctx {
        Ctx { cwd: self.0.clone() }
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
fn read_numbers_lines_like_cat_n() {
    let f = Fixture::new("read");
    let p = f.file("a.txt", "alpha\nbeta\n\ngamma");
    let r = run(&f, "read", json!({"file_path": p}));
    assert_eq!(r, ToolResult::ok("     1\talpha\n     2\tbeta\n     3\t\n     4\tgamma"));
    let r = run(&f, "read", json!({"file_path": p, "offset": 2, "limit": 2}));
    assert_eq!(r, ToolResult::ok("     2\tbeta\n     3\t\n(more lines follow; read from offset 4 to continue)"));
    let r = run(&f, "read", json!({"file_path": p, "offset": 9}));
    assert_eq!(r, ToolResult::ok("Warning: offset 9 is past the end of the file (4 lines)."));
}

#[test]
fn read_truncates_long_lines_and_notes_empty_files() {
    let f = Fixture::new("read2");
    let long = "x".repeat(2500);
    let p = f.file("long.txt", &format!("{long}\nshort\n"));
    let r = run(&f, "read", json!({"file_path": p}));
    assert_eq!(r.content, format!("     1\t{} [... line truncated]\n     2\tshort", "x".repeat(2000)));
    let e = f.file("empty.txt", "");
    assert_eq!(run(&f, "read", json!({"file_path": e})), ToolResult::ok("Warning: the file exists but is empty."));
}

#[test]
fn read_refuses_directories_binaries_fifos_devices_and_relative_paths() {
    let f = Fixture::new("read3");
    let dir = f.path("");
    let r = run(&f, "read", json!({"file_path": dir.trim_end_matches('/')}));
    assert!(
        r.is_error && r.content.ends_with("is a directory, not a file (use glob or bash `ls` to list it)"),
        "{r:?}"
    );
    let bin = f.path("b.bin");
    std::fs::write(&bin, b"PK\x03\x04\x00\x00data").unwrap();
    let r = run(&f, "read", json!({"file_path": bin}));
    assert_eq!(
        r,
        ToolResult::err(format!("{bin} looks like a binary file (NUL byte at offset 4); read only shows text"))
    );
    let fifo = f.path("fifo");
    nix::unistd::mkfifo(fifo.as_str(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let r = run(&f, "read", json!({"file_path": fifo}));
    assert_eq!(r, ToolResult::err(format!("{fifo} is a FIFO; only regular files can be read")));
    let r = run(&f, "read", json!({"file_path": "/dev/zero"}));
    assert_eq!(r, ToolResult::err("/dev/zero is a character device; only regular files can be read"));
    let r = run(&f, "read", json!({"file_path": "a.txt"}));
    assert_eq!(r, ToolResult::err("file_path must be an absolute path, got `a.txt`"));
    let r = run(&f, "read", json!({"file_path": f.path("missing")}));
    assert_eq!(r, ToolResult::err(format!("{}: does not exist", f.path("missing"))));
}

#[test]
fn read_of_a_huge_single_line_file_stays_bounded() {
    let f = Fixture::new("read4");
    let p = f.path("huge");
    let file = std::fs::File::create(&p).unwrap();
    file.set_len(64 << 20).unwrap(); // sparse zeros: binary
    let r = run(&f, "read", json!({"file_path": p}));
    assert!(r.is_error && r.content.contains("binary"), "{r:?}");
    std::fs::write(&p, "y".repeat(8 << 20)).unwrap();
    let r = run(&f, "read", json!({"file_path": p}));
    assert_eq!(r.content.len(), 7 + 2000 + " [... line truncated]".len());
}

#[test]
fn malformed_inputs_are_error_results() {
    let f = Fixture::new("bad");
    assert_eq!(run(&f, "read", json!({})), ToolResult::err("Invalid input for read: missing field `file_path`"));
    assert_eq!(
        run(&f, "read", json!({"file_path": 7})),
        ToolResult::err("Invalid input for read: invalid type: integer `7`, expected a string")
    );
    assert_eq!(run(&f, "write", json!("text")), ToolResult::err("Invalid input for write: expected a JSON object"));
    assert_eq!(
        run(&f, "reed", json!({})),
        ToolResult::err("Unknown tool `reed` (did you mean `read`?); tools: bash, read, write, edit, glob, grep")
    );
    let r = run(&f, "read", json!({"file_path": "/tmp/a\u{0}b"}));
    assert_eq!(r, ToolResult::err("file_path contains a NUL byte"));
}

#[test]
fn write_creates_parents_replaces_atomically_and_keeps_mode() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new("write");
    let p = f.path("deep/er/new.sh");
    let r = run(&f, "write", json!({"file_path": p, "content": "echo hi\n"}));
    assert_eq!(r, ToolResult::ok(format!("File created successfully at: {p} (8 bytes)")));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).unwrap();
    let r = run(&f, "write", json!({"file_path": p, "content": "echo bye\n"}));
    assert_eq!(r, ToolResult::ok(format!("The file {p} has been updated (9 bytes).")));
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "echo bye\n");
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o750);
    let leftovers: Vec<_> = std::fs::read_dir(f.path("deep/er")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
    let r = run(&f, "write", json!({"file_path": f.path("deep"), "content": "x"}));
    assert_eq!(r, ToolResult::err(format!("{} is a directory", f.path("deep"))));
}

#[test]
fn edit_replaces_exactly_and_explains_failures() {
    let f = Fixture::new("edit");
    let p = f.file("e.txt", "one two two three\n");
    let r = run(&f, "edit", json!({"file_path": p, "old_string": "one", "new_string": "1"}));
    assert_eq!(r, ToolResult::ok(format!("The file {p} has been updated.")));
    let r = run(&f, "edit", json!({"file_path": p, "old_string": "two", "new_string": "2"}));
    assert_eq!(
        r,
        ToolResult::err(format!(
            "old_string occurs 2 times in {p}; add surrounding context to make it unique, or set replace_all to replace every occurrence"
        ))
    );
    let r = run(&f, "edit", json!({"file_path": p, "old_string": "two", "new_string": "2", "replace_all": true}));
    assert_eq!(r, ToolResult::ok(format!("The file {p} has been updated: 2 replacements.")));
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "1 2 2 three\n");
    let r = run(&f, "edit", json!({"file_path": p, "old_string": "four", "new_string": "4"}));
    assert_eq!(r, ToolResult::err(format!("old_string was not found in {p}")));
    let r = run(&f, "edit", json!({"file_path": p, "old_string": "2", "new_string": "2"}));
    assert_eq!(r, ToolResult::err("old_string and new_string are identical; there is nothing to change"));
    std::fs::write(&p, b"caf\xe9\n").unwrap();
    let r = run(&f, "edit", json!({"file_path": p, "old_string": "caf", "new_string": "x"}));
    assert_eq!(r, ToolResult::err(format!("{p} is not valid UTF-8 (at byte 3); edit only changes text")));
}

#[test]
fn glob_lists_newest_first_and_caps() {
    let f = Fixture::new("glob");
    f.file("src/a.rs", "");
    f.file("src/nested/b.rs", "");
    f.file("src/c.txt", "");
    f.file(".hidden/d.rs", "");
    f.file(".git/objects/e.rs", "");
    f.age("src/a.rs", 300);
    f.age("src/nested/b.rs", 200);
    f.age(".hidden/d.rs", 100);
    let r = run(&f, "glob", json!({"pattern": "**/*.rs"}));
    assert_eq!(r, ToolResult::ok([f.path(".hidden/d.rs"), f.path("src/nested/b.rs"), f.path("src/a.rs")].join("\n")));
    let r = run(&f, "glob", json!({"pattern": "*.rs", "path": f.path("src")}));
    assert_eq!(r, ToolResult::ok(f.path("src/a.rs")));
    let r = run(&f, "glob", json!({"pattern": format!("{}/src/**/*.rs", f.0.display())}));
    assert_eq!(r, ToolResult::ok([f.path("src/nested/b.rs"), f.path("src/a.rs")].join("\n")));
    assert_eq!(run(&f, "glob", json!({"pattern": "*.none"})), ToolResult::ok("No files found"));
    for i in 0..105 {
        f.file(&format!("many/f{i:03}.md"), "");
    }
    let r = run(&f, "glob", json!({"pattern": "many/*.md"}));
    let lines: Vec<&str> = r.content.lines().collect();
    assert_eq!(lines.len(), 101);
    assert_eq!(lines[100], "(Results are truncated: showing the 100 most recently modified of 105 matches. Use a more specific path or pattern.)");
    let r = run(&f, "glob", json!({"pattern": "[unclosed"}));
    assert!(r.is_error && r.content.starts_with("invalid glob pattern `[unclosed`"), "{r:?}");
}

fn grep_fixture() -> Fixture {
    let f = Fixture::new("grep");
    f.file("src/main.rs", "fn main() {\n    let x = 1;\n    println!(\"Hello\");\n}\n");
    f.file("src/lib.rs", "pub fn hello() {}\n// hello again\n");
    f.file("README.md", "Hello world\nnothing\n");
    f.file("target/gen.rs", "fn hello_generated() {}\n");
    f.file(".gitignore", "target/\n");
    f.file(".hidden.rs", "hello hidden\n");
    std::fs::create_dir_all(f.0.join(".git")).unwrap();
    std::fs::write(f.0.join("bin.dat"), b"hello\x00binary").unwrap();
    f
}

#[test]
fn grep_modes_follow_ripgrep() {
    let f = grep_fixture();
    let r = run(&f, "grep", json!({"pattern": "hello"}));
    assert_eq!(r, ToolResult::ok(f.path("src/lib.rs")), "gitignored, hidden and binary files are skipped");
    let r = run(&f, "grep", json!({"pattern": "hello", "-i": true}));
    assert_eq!(r, ToolResult::ok([f.path("README.md"), f.path("src/lib.rs"), f.path("src/main.rs")].join("\n")));
    let r = run(&f, "grep", json!({"pattern": "hello", "-i": true, "output_mode": "count"}));
    assert_eq!(
        r,
        ToolResult::ok(
            [f.path("README.md") + ":1", f.path("src/lib.rs") + ":2", f.path("src/main.rs") + ":1"].join("\n")
        )
    );
    let r = run(&f, "grep", json!({"pattern": "hello", "output_mode": "content", "-n": true}));
    let lib = f.path("src/lib.rs");
    assert_eq!(r, ToolResult::ok(format!("{lib}:1:pub fn hello() {{}}\n{lib}:2:// hello again")));
    let r = run(&f, "grep", json!({"pattern": "let", "output_mode": "content", "-n": true, "-C": 1}));
    let main = f.path("src/main.rs");
    assert_eq!(
        r,
        ToolResult::ok(format!("{main}-1-fn main() {{\n{main}:2:    let x = 1;\n{main}-3-    println!(\"Hello\");"))
    );
    let r = run(&f, "grep", json!({"pattern": "hello", "-i": true, "glob": "*.md", "output_mode": "content"}));
    assert_eq!(r, ToolResult::ok(format!("{}:Hello world", f.path("README.md"))));
    let r = run(&f, "grep", json!({"pattern": "fn", "type": "rust"}));
    assert_eq!(r, ToolResult::ok([f.path("src/lib.rs"), f.path("src/main.rs")].join("\n")));
    let r = run(
        &f,
        "grep",
        json!({"pattern": "x = 1;\\n\\s+println", "multiline": true, "output_mode": "content", "-n": true}),
    );
    assert_eq!(r, ToolResult::ok(format!("{main}:2:    let x = 1;\n{main}:3:    println!(\"Hello\");")));
    let r = run(&f, "grep", json!({"pattern": "e", "output_mode": "content", "head_limit": 2}));
    assert_eq!(r.content.lines().count(), 2, "{r:?}");
    assert_eq!(run(&f, "grep", json!({"pattern": "zzz"})), ToolResult::ok("No matches found"));
}

#[test]
fn grep_rejects_bad_regexes_and_unknown_types_and_survives_hostile_patterns() {
    let f = grep_fixture();
    let r = run(&f, "grep", json!({"pattern": "(unclosed"}));
    assert!(r.is_error && r.content.starts_with("invalid regex `(unclosed`"), "{r:?}");
    let r = run(&f, "grep", json!({"pattern": "x", "type": "nosuchtype"}));
    assert!(r.is_error && r.content.starts_with("type `nosuchtype`"), "{r:?}");
    // Catastrophic for a backtracking engine; linear for Rust's.
    f.file("aaa.txt", &("a".repeat(50_000) + "!"));
    let t = std::time::Instant::now();
    let r = run(&f, "grep", json!({"pattern": "(a+)+$", "path": f.path("aaa.txt")}));
    assert!(!r.is_error && t.elapsed() < Duration::from_secs(10), "{r:?}");
    let r = run(&f, "grep", json!({"pattern": "a{1000}{1000}"}));
    assert!(r.is_error, "oversized regex refused: {r:?}");
}

fn shell() -> Shell {
    let env = vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()), ("HOME".into(), "/tmp".into())];
    Shell::new(std::env::temp_dir(), env, KillScope::ProcessGroup)
}

#[test]
fn bash_keeps_state_between_calls() {
    let mut sh = shell();
    assert_eq!(
        sh.call(&json!({"command": "cd /usr && export FOO=bar && greet() { echo \"hi $1\"; }"})),
        ToolResult::ok("")
    );
    assert_eq!(sh.call(&json!({"command": "pwd; echo $FOO; greet you"})), ToolResult::ok("/usr\nbar\nhi you\n"));
    assert_eq!(sh.call(&json!({"command": "echo out; echo err >&2; false"})), ToolResult::ok("out\nerr\nExit code: 1"));
    // Framing cannot be broken by quotes, braces or newlines in the command.
    assert_eq!(sh.call(&json!({"command": "echo '}' \"{\" 'a\nb'"})), ToolResult::ok("} { a\nb\n"));
    assert_eq!(sh.call(&json!({"command": "cat"})), ToolResult::ok(""), "stdin is /dev/null");
}

#[test]
fn bash_timeout_kills_and_restarts_cleanly() {
    let mut sh = shell();
    sh.call(&json!({"command": "cd /usr; export KEEP=1"}));
    let t = std::time::Instant::now();
    let r = sh.call(&json!({"command": "echo started; sleep 30", "timeout": 300}));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(r, ToolResult::err("started\nCommand timed out after 300ms; its processes were killed and the shell was restarted (working directory, variables and functions are reset)."));
    let r = sh.call(&json!({"command": "echo ${KEEP:-unset}; pwd"}));
    assert_eq!(r, ToolResult::ok(format!("unset\n{}\n", std::env::temp_dir().display())));
    let r = sh.call(&json!({"command": "exit 3"}));
    assert_eq!(
        r,
        ToolResult::err(
            "The shell exited with code 3 and was restarted (working directory, variables and functions are reset)."
        )
    );
    assert_eq!(sh.call(&json!({"command": "echo alive"})), ToolResult::ok("alive\n"));
    assert_eq!(sh.call(&json!({"restart": true})), ToolResult::ok("The shell was restarted."));
    assert!(sh.call(&json!({"command": "x", "timeout": 700000})).is_error);
    assert!(sh.call(&json!({"timeout": 5})).is_error);
}

#[test]
fn bash_output_is_truncated_with_a_marker() {
    let mut sh = shell();
    let r = sh.call(&json!({"command": "head -c 100000 /dev/zero | tr '\\0' a; echo; echo END"}));
    assert!(!r.is_error);
    assert!(r.content.starts_with(&"a".repeat(15_000)), "keeps the beginning");
    assert!(r.content.ends_with("aaaa\nEND\n"), "keeps the end");
    assert!(
        r.content.contains("\n\n... [70005 characters of output truncated] ...\n\n"),
        "{}",
        &r.content[14_990..15_100]
    );
}
