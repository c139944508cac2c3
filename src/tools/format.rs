//! Every limit and result text of the six tools, in one place. Several are INFERRED in
//! `shared/spec/tools.md` (marked below); correcting one is a one-line change here.

/// read: lines returned when `limit` is not given, and the most a call may ask for.
pub const READ_DEFAULT_LIMIT: usize = 2000;
/// read: longer lines are cut to this many characters.
pub const READ_MAX_LINE_CHARS: usize = 2000;
/// read: bytes examined for a NUL byte to decide that a file is binary.
pub const BINARY_SNIFF_BYTES: usize = 8192;
/// read/edit: the largest file these tools load (edit must hold the whole file).
pub const MAX_EDIT_BYTES: u64 = 64 << 20;

/// glob: most paths returned (INFERRED).
pub const GLOB_MAX_RESULTS: usize = 100;
/// grep/bash: the most characters of output returned (INFERRED for bash: 30 000).
pub const MAX_OUTPUT_CHARS: usize = 30_000;

/// bash: timeouts in milliseconds.
pub const BASH_DEFAULT_TIMEOUT_MS: u64 = 120_000;
pub const BASH_MAX_TIMEOUT_MS: u64 = 600_000;

/// `cat -n` style: the line number right-aligned in six columns, a tab, the line.
pub fn numbered_line(n: usize, line: &str) -> String {
    format!("{n:>6}\t{line}")
}

/// read: marker after a line cut to READ_MAX_LINE_CHARS (INFERRED).
pub const LINE_TRUNCATED: &str = " [... line truncated]";

/// read: notice when lines remain after `limit` (INFERRED).
pub fn read_more(next_offset: usize) -> String {
    format!("\n(more lines follow; read from offset {next_offset} to continue)")
}

/// read: an empty file (INFERRED wording).
pub const READ_EMPTY: &str = "Warning: the file exists but is empty.";

/// read: offset past the end.
pub fn read_past_end(offset: usize, lines: usize) -> String {
    format!("Warning: offset {offset} is past the end of the file ({lines} lines).")
}

/// write: one-line confirmations (INFERRED wording).
pub fn write_created(path: &str, bytes: usize) -> String {
    format!("File created successfully at: {path} ({bytes} bytes)")
}
pub fn write_updated(path: &str, bytes: usize) -> String {
    format!("The file {path} has been updated ({bytes} bytes).")
}

/// edit: confirmation, with the count when replace_all (INFERRED wording).
pub fn edit_done(path: &str, replacements: usize, replace_all: bool) -> String {
    if replace_all {
        format!(
            "The file {path} has been updated: {replacements} replacement{}.",
            if replacements == 1 { "" } else { "s" }
        )
    } else {
        format!("The file {path} has been updated.")
    }
}

pub const GLOB_NONE: &str = "No files found";
/// glob: notice after a capped result (INFERRED).
pub fn glob_truncated(shown: usize, total: usize) -> String {
    format!("(Results are truncated: showing the {shown} most recently modified of {total} matches. Use a more specific path or pattern.)")
}

pub const GREP_NONE: &str = "No matches found";

/// Cuts `text` to MAX_OUTPUT_CHARS, keeping its beginning and end (INFERRED marker).
pub fn truncate_middle(text: &str) -> String {
    let total = text.chars().count();
    if total <= MAX_OUTPUT_CHARS {
        return text.to_owned();
    }
    let keep = MAX_OUTPUT_CHARS / 2;
    let head: String = text.chars().take(keep).collect();
    let tail: String = text.chars().skip(total - keep).collect();
    format!("{head}{}{tail}", output_cut(total - 2 * keep))
}

/// The marker standing where output was cut.
pub fn output_cut(chars: usize) -> String {
    format!("\n\n... [{chars} characters of output truncated] ...\n\n")
}

/// bash: appended when the command exited non-zero (INFERRED).
pub fn exit_code(code: i32) -> String {
    format!("Exit code: {code}")
}

/// bash: the command ran out of time.
pub fn bash_timed_out(ms: u64) -> String {
    format!(
        "Command timed out after {}; its processes were killed and the shell was restarted \
         (working directory, variables and functions are reset).",
        human_ms(ms)
    )
}

/// bash: the shell itself exited (e.g. the command ran `exit`).
pub fn bash_shell_exited(code: i32) -> String {
    format!(
        "The shell exited with code {code} and was restarted (working directory, variables and functions are reset)."
    )
}

pub const BASH_RESTARTED: &str = "The shell was restarted.";

fn human_ms(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}
