//! glob and grep.
//!
//! glob is gitignore-unaware: it lists every file matching the pattern, hidden ones included,
//! except inside `.git` directories, newest first. grep follows ripgrep: Rust regex syntax,
//! `.gitignore`/`.ignore` rules, hidden and binary files skipped, built from ripgrep's own crates.
//! Its results are ordered by path so the same tree always gives the same answer.

use globset::GlobBuilder;
use grep_regex::RegexMatcherBuilder;
use grep_searcher::{BinaryDetection, Searcher, SearcherBuilder, Sink, SinkContext, SinkContextKind, SinkMatch};
use ignore::overrides::OverrideBuilder;
use ignore::types::TypesBuilder;
use ignore::WalkBuilder;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use super::format::*;
use super::{io_error, search_root, Ctx, GlobInput, GrepInput, OutputMode, ToolResult};

type Res = Result<ToolResult, ToolResult>;

fn is_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Splits an absolute pattern into the literal directory it starts from and the rest.
fn split_pattern(root: PathBuf, pattern: &str) -> (PathBuf, String) {
    if !pattern.starts_with('/') {
        return (root, pattern.to_owned());
    }
    let mut base = PathBuf::from("/");
    let mut rest = Vec::new();
    let mut literal = true;
    for c in Path::new(pattern).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) if literal && !is_glob_meta(&s.to_string_lossy()) => base.push(s),
            other => {
                literal = false;
                rest.push(other.as_os_str().to_string_lossy().into_owned());
            }
        }
    }
    if rest.is_empty() {
        // A literal path: match the file itself.
        let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = base.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        return (parent, name);
    }
    (base, rest.join("/"))
}

pub fn glob(ctx: &Ctx, i: &GlobInput) -> Res {
    if i.pattern.is_empty() || i.pattern.contains('\0') {
        return Err(ToolResult::err("pattern must be a non-empty glob without NUL bytes"));
    }
    let (root, pattern) = split_pattern(search_root(ctx, i.path.as_deref())?, &i.pattern);
    let matcher = GlobBuilder::new(&pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| ToolResult::err(format!("invalid glob pattern `{}`: {e}", i.pattern)))?
        .compile_matcher();
    let meta = std::fs::metadata(&root).map_err(|e| io_error(&root, &e))?;
    if !meta.is_dir() {
        return Err(ToolResult::err(format!("{} is not a directory", root.display())));
    }
    let mut found: Vec<(SystemTime, PathBuf)> = Vec::new();
    let walker = WalkBuilder::new(&root)
        .standard_filters(false)
        .follow_links(false)
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    for entry in walker.flatten() {
        let Some(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(&root) else { continue };
        if matcher.is_match(rel) {
            let mtime = entry.metadata().ok().and_then(|m| m.modified().ok()).unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((mtime, entry.path().to_path_buf()));
        }
    }
    if found.is_empty() {
        return Ok(ToolResult::ok(GLOB_NONE));
    }
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let total = found.len();
    let mut out: Vec<String> = found.iter().take(GLOB_MAX_RESULTS).map(|(_, p)| p.display().to_string()).collect();
    if total > GLOB_MAX_RESULTS {
        out.push(glob_truncated(GLOB_MAX_RESULTS, total));
    }
    Ok(ToolResult::ok(out.join("\n")))
}

/// Collects one file's results in the requested shape.
struct Collect<'a> {
    path: &'a str,
    mode: OutputMode,
    numbers: bool,
    lines: Vec<String>,
    count: u64,
    binary: bool,
    /// Output lines still allowed by head_limit (content mode).
    budget: Option<usize>,
}

impl Collect<'_> {
    fn push_lines(&mut self, bytes: &[u8], first: Option<u64>, sep: char) -> bool {
        let text = String::from_utf8_lossy(bytes);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        for (k, line) in text.split('\n').enumerate() {
            if self.budget == Some(0) {
                return false;
            }
            let line = line.strip_suffix('\r').unwrap_or(line);
            let s = match (self.numbers, first) {
                (true, Some(n)) => format!("{}{sep}{}{sep}{line}", self.path, n + k as u64),
                _ => format!("{}{sep}{line}", self.path),
            };
            self.lines.push(s);
            if let Some(b) = self.budget.as_mut() {
                *b -= 1;
            }
        }
        true
    }
}

impl Sink for Collect<'_> {
    type Error = std::io::Error;

    fn matched(&mut self, _s: &Searcher, m: &SinkMatch<'_>) -> Result<bool, std::io::Error> {
        self.count += 1;
        Ok(match self.mode {
            OutputMode::FilesWithMatches => false,
            OutputMode::Count => true,
            OutputMode::Content => self.push_lines(m.bytes(), m.line_number(), ':'),
        })
    }

    fn context(&mut self, _s: &Searcher, c: &SinkContext<'_>) -> Result<bool, std::io::Error> {
        if self.mode == OutputMode::Content && !matches!(c.kind(), SinkContextKind::Other) {
            return Ok(self.push_lines(c.bytes(), c.line_number(), '-'));
        }
        Ok(true)
    }

    fn context_break(&mut self, _s: &Searcher) -> Result<bool, std::io::Error> {
        if self.mode == OutputMode::Content {
            self.lines.push("--".into());
        }
        Ok(true)
    }

    fn binary_data(&mut self, _s: &Searcher, _offset: u64) -> Result<bool, std::io::Error> {
        self.binary = true;
        Ok(false)
    }
}

pub fn grep(ctx: &Ctx, i: &GrepInput) -> Res {
    if i.pattern.contains('\0') {
        return Err(ToolResult::err("pattern contains a NUL byte"));
    }
    let root = search_root(ctx, i.path.as_deref())?;
    std::fs::metadata(&root).map_err(|e| io_error(&root, &e))?;
    let mut mb = RegexMatcherBuilder::new();
    mb.case_insensitive(i.case_insensitive)
        .multi_line(true)
        .dot_matches_new_line(i.multiline)
        .size_limit(16 << 20)
        .dfa_size_limit(16 << 20);
    if !i.multiline {
        mb.line_terminator(Some(b'\n'));
    }
    let matcher = mb.build(&i.pattern).map_err(|e| ToolResult::err(format!("invalid regex `{}`: {e}", i.pattern)))?;
    let before = i.before.or(i.context).unwrap_or(0) as usize;
    let after = i.after.or(i.context).unwrap_or(0) as usize;
    let with_context = i.mode_is_content() && (before > 0 || after > 0);
    let mut searcher = SearcherBuilder::new()
        .line_number(true)
        .multi_line(i.multiline)
        .before_context(if i.mode_is_content() { before } else { 0 })
        .after_context(if i.mode_is_content() { after } else { 0 })
        .binary_detection(BinaryDetection::quit(0))
        .build();

    let mut wb = WalkBuilder::new(&root);
    wb.sort_by_file_path(|a, b| a.cmp(b));
    if let Some(t) = &i.file_type {
        let mut tb = TypesBuilder::new();
        tb.add_defaults();
        tb.select(t);
        let types = tb.build().map_err(|e| ToolResult::err(format!("type `{t}`: {e}")))?;
        wb.types(types);
    }
    if let Some(g) = &i.glob {
        let mut ob = OverrideBuilder::new(&root);
        for part in g.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            ob.add(part).map_err(|e| ToolResult::err(format!("invalid glob `{part}`: {e}")))?;
        }
        wb.overrides(ob.build().map_err(|e| ToolResult::err(format!("invalid glob `{g}`: {e}")))?);
    }
    let limit = i.head_limit.map(|n| n as usize);
    let mut out: Vec<String> = Vec::new();
    for entry in wb.build().flatten() {
        if entry.file_type().is_none_or(|t| !t.is_file()) {
            continue; // directories, and FIFOs or devices that would block or never end
        }
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let shown = entry.path().display().to_string();
        let mut sink = Collect {
            path: &shown,
            mode: i.output_mode,
            numbers: i.line_numbers,
            lines: Vec::new(),
            count: 0,
            binary: false,
            budget: limit.map(|l| l - out.len()),
        };
        if searcher.search_path(&matcher, entry.path(), &mut sink).is_err() || sink.binary || sink.count == 0 {
            continue;
        }
        match i.output_mode {
            OutputMode::FilesWithMatches => out.push(shown.clone()),
            OutputMode::Count => out.push(format!("{shown}:{}", sink.count)),
            OutputMode::Content => {
                if with_context && !out.is_empty() {
                    out.push("--".into());
                }
                out.extend(sink.lines);
            }
        }
    }
    if let Some(l) = limit {
        out.truncate(l);
    }
    if out.is_empty() {
        return Ok(ToolResult::ok(GREP_NONE));
    }
    Ok(ToolResult::ok(truncate_middle(&out.join("\n"))))
}

impl GrepInput {
    fn mode_is_content(&self) -> bool {
        self.output_mode == OutputMode::Content
    }
}
