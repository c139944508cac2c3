//! grep: what the official runner returns when it runs `rg -n --no-heading -e PATTERN -- PATH`,
//! built from ripgrep's own crates so that no `rg` binary is needed in the jail. Files are
//! searched in path order (ripgrep prints them in the order its threads finish).
//!
//! As ripgrep does: Rust regex syntax, no match across lines; hidden files and anything an
//! ignore file (`.gitignore` inside a git repository, `.ignore`, `.rgignore`) names are skipped;
//! symlinks met on the way are not followed; a file with a NUL byte is skipped, unless it was
//! named itself, and then a match is reported as `binary file matches`.

use grep_regex::RegexMatcherBuilder;
use grep_searcher::{BinaryDetection, Searcher, SearcherBuilder, Sink, SinkMatch};
use ignore::WalkBuilder;

use super::format::*;
use super::input::GrepInput;
use super::paths::{resolve_readable, root};
use super::{Ctx, ToolResult};

type Res = Result<ToolResult, ToolResult>;

/// Output stops growing once it is sure to be cut: every character takes at least one byte,
/// and at most four.
const COLLECT_MAX: usize = GREP_OUTPUT_LIMIT * 4 + 4;

struct Lines<'a> {
    prefix: Option<&'a [u8]>,
    out: &'a mut Vec<u8>,
    binary_at: Option<u64>,
    binary_match: bool,
    explicit: bool,
}

impl Sink for Lines<'_> {
    type Error = std::io::Error;

    fn matched(&mut self, _s: &Searcher, m: &SinkMatch<'_>) -> Result<bool, std::io::Error> {
        if self.explicit && self.binary_at.is_some() {
            self.binary_match = true;
            return Ok(false);
        }
        if let Some(p) = self.prefix {
            self.out.extend_from_slice(p);
            self.out.push(b':');
        }
        self.out.extend_from_slice(m.line_number().unwrap_or(0).to_string().as_bytes());
        self.out.push(b':');
        self.out.extend_from_slice(m.bytes());
        if !m.bytes().ends_with(b"\n") {
            self.out.push(b'\n');
        }
        Ok(self.out.len() <= COLLECT_MAX)
    }

    fn binary_data(&mut self, _s: &Searcher, offset: u64) -> Result<bool, std::io::Error> {
        self.binary_at.get_or_insert(offset);
        Ok(true)
    }
}

/// ripgrep's message for a pattern it refuses: the regex parser's own text for a syntax error
/// (ripgrep shows the pattern as given), its own sentence for a line terminator.
fn pattern_error(pattern: &str, e: &grep_regex::Error) -> String {
    if let Err(syntax) = regex_syntax::ParserBuilder::new().octal(false).build().parse(pattern) {
        return format!("{syntax}\n");
    }
    let text = e.to_string();
    if let Some(lit) = text.strip_prefix("the literal ").and_then(|t| t.strip_suffix(" is not allowed in a regex")) {
        return format!(
            "the literal '{lit}' is not allowed in a regex\n\nConsider enabling multiline mode with the --multiline \
             flag (or -U for short).\nWhen multiline mode is enabled, new line characters can be matched.\n"
        );
    }
    format!("{text}\n")
}

pub(super) fn grep(ctx: &Ctx, i: &GrepInput) -> Res {
    let search = match i.path.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => resolve_readable(ctx, p).map_err(|e| ToolResult::err(format!("grep: {e}")))?,
        None => root(ctx),
    };
    if i.pattern.contains('\0') {
        return Err(ToolResult::err("ValueError('embedded null byte')"));
    }
    let matcher = RegexMatcherBuilder::new()
        .line_terminator(Some(b'\n'))
        .build(&i.pattern)
        .map_err(|e| ToolResult::err(format!("grep: rg failed: {}", pattern_error(&i.pattern, &e))))?;
    let meta = std::fs::metadata(&search)
        .map_err(|e| ToolResult::err(format!("grep: rg failed: {}: {e}\n", search.display())))?;
    let mut out: Vec<u8> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    if !meta.is_dir() {
        let mut searcher =
            SearcherBuilder::new().line_number(true).binary_detection(BinaryDetection::convert(b'\0')).build();
        let mut sink = Lines { prefix: None, out: &mut out, binary_at: None, binary_match: false, explicit: true };
        if let Err(e) = searcher.search_path(&matcher, &search, &mut sink) {
            errors.push(format!("{}: {e}", search.display()));
        }
        if sink.binary_match {
            let at = sink.binary_at.unwrap_or(0);
            out.extend_from_slice(format!("binary file matches (found \"\\0\" byte around offset {at})\n").as_bytes());
        }
    } else {
        let mut searcher =
            SearcherBuilder::new().line_number(true).binary_detection(BinaryDetection::quit(b'\0')).build();
        let walk = WalkBuilder::new(&search)
            .add_custom_ignore_filename(".rgignore")
            .follow_links(false)
            .sort_by_file_name(|a, b| a.cmp(b))
            .build();
        for entry in walk {
            if out.len() > COLLECT_MAX {
                break;
            }
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.path();
            let shown = path.as_os_str().as_encoded_bytes().to_vec();
            let mut sink =
                Lines { prefix: Some(&shown), out: &mut out, binary_at: None, binary_match: false, explicit: false };
            if let Err(e) = searcher.search_path(&matcher, path, &mut sink) {
                errors.push(format!("{}: {e}", path.display()));
            }
        }
    }
    if !errors.is_empty() {
        let mut text = errors.join("\n");
        text.push('\n');
        return Err(ToolResult::err(format!("grep: rg failed: {text}")));
    }
    if out.is_empty() {
        return Ok(ToolResult::ok("no matches"));
    }
    let text = String::from_utf8_lossy(&out);
    Ok(ToolResult::ok(cut(&text)))
}

/// The first 100 KiB characters and a marker, as the runner cuts the output.
fn cut(text: &str) -> String {
    match text.char_indices().nth(GREP_OUTPUT_LIMIT) {
        None => text.to_owned(),
        Some((at, _)) => format!("{}\n[output truncated at {GREP_OUTPUT_LIMIT} bytes]", &text[..at]),
    }
}
