//! glob, matching as the official runner's `Path.glob` (Python 3.11's pathlib) matches: `*`,
//! `?` and `[...]` within one name (dot files included), `**` for any depth of directories
//! (not followed through symlinks), a trailing `/` for directories only. Matches that resolve
//! outside the search root are dropped; the rest are listed newest first, at most 200.

use std::path::{Path, PathBuf};

use super::format::*;
use super::input::GlobInput;
use super::paths::{canonicalize, resolve, root, within};
use super::pyfmt;
use super::{Ctx, ToolResult};

type Res = Result<ToolResult, ToolResult>;

/// One `[...]` item.
#[derive(Debug, Clone)]
enum Item {
    Char(char),
    Range(char, char),
}

#[derive(Debug, Clone)]
enum Tok {
    Star,
    Any,
    Class { negated: bool, items: Vec<Item> },
    Lit(char),
}

/// `fnmatch`'s reading of one pattern name.
fn tokens(pat: &str) -> Vec<Tok> {
    let p: Vec<char> = pat.chars().collect();
    let n = p.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let c = p[i];
        i += 1;
        match c {
            '*' => {
                if !matches!(out.last(), Some(Tok::Star)) {
                    out.push(Tok::Star)
                }
            }
            '?' => out.push(Tok::Any),
            '[' => {
                let mut j = i;
                if j < n && p[j] == '!' {
                    j += 1;
                }
                if j < n && p[j] == ']' {
                    j += 1;
                }
                while j < n && p[j] != ']' {
                    j += 1;
                }
                if j >= n {
                    out.push(Tok::Lit('['));
                    continue;
                }
                let stuff = &p[i..j];
                i = j + 1;
                let (negated, body) = match stuff.first() {
                    Some('!') => (true, &stuff[1..]),
                    _ => (false, stuff),
                };
                let mut items = Vec::new();
                let mut k = 0;
                while k < body.len() {
                    if k + 2 < body.len() && body[k + 1] == '-' {
                        // A backwards range matches nothing.
                        if body[k] <= body[k + 2] {
                            items.push(Item::Range(body[k], body[k + 2]));
                        }
                        k += 3;
                    } else {
                        items.push(Item::Char(body[k]));
                        k += 1;
                    }
                }
                out.push(Tok::Class { negated, items });
            }
            c => out.push(Tok::Lit(c)),
        }
    }
    out
}

fn class_has(items: &[Item], c: char) -> bool {
    items.iter().any(|it| match *it {
        Item::Char(x) => x == c,
        Item::Range(a, b) => a <= c && c <= b,
    })
}

fn tok_matches(t: &Tok, c: char) -> bool {
    match t {
        Tok::Any => true,
        Tok::Lit(x) => *x == c,
        Tok::Class { negated, items } => class_has(items, c) != *negated,
        Tok::Star => unreachable!("stars are handled by the matcher"),
    }
}

/// Whole-name match, with the usual backtracking over the last star.
fn matches(toks: &[Tok], name: &str) -> bool {
    let s: Vec<char> = name.chars().collect();
    let (mut t, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if t < toks.len() && !matches!(toks[t], Tok::Star) && tok_matches(&toks[t], s[i]) {
            t += 1;
            i += 1;
        } else if t < toks.len() && matches!(toks[t], Tok::Star) {
            star = Some((t, i));
            t += 1;
        } else if let Some((st, si)) = star {
            t = st + 1;
            i = si + 1;
            star = Some((st, si + 1));
        } else {
            return false;
        }
    }
    while t < toks.len() && matches!(toks[t], Tok::Star) {
        t += 1;
    }
    t == toks.len()
}

enum Sel {
    Terminating,
    Precise(String),
    Wildcard(Vec<Tok>),
    Recursive,
}

fn is_dir(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false)
}

struct Walk {
    out: Vec<PathBuf>,
}

impl Walk {
    fn full(&self) -> bool {
        self.out.len() >= WALK_MAX_ENTRIES
    }

    /// Hands `path` to the successor: the rest of the chain, or the end of it.
    fn next(&mut self, rest: &[Sel], path: &Path) {
        if rest.is_empty() {
            self.out.push(path.to_path_buf());
        } else {
            self.select(rest, path);
        }
    }

    /// `_select_from` of the selector for `sels[0]`; the rest of the chain is its successor.
    fn select(&mut self, sels: &[Sel], parent: &Path) {
        if self.full() {
            return;
        }
        let rest = &sels[1..];
        let dironly = !rest.is_empty();
        match &sels[0] {
            Sel::Terminating => self.out.push(parent.to_path_buf()),
            Sel::Precise(name) => {
                let path = parent.join(name);
                let ok = if dironly { is_dir(&path) } else { std::fs::metadata(&path).is_ok() };
                if ok {
                    self.next(rest, &path);
                }
            }
            Sel::Wildcard(toks) => {
                let Ok(rd) = std::fs::read_dir(parent) else { return };
                let entries: Vec<_> = rd.flatten().collect();
                for e in entries {
                    if self.full() {
                        return;
                    }
                    if dironly && !is_dir(&e.path()) {
                        continue;
                    }
                    let name = e.file_name();
                    if matches(toks, &name.to_string_lossy()) {
                        self.next(rest, &parent.join(&name));
                    }
                }
            }
            Sel::Recursive => {
                let mut dirs = Vec::new();
                directories(parent, &mut dirs);
                let mut seen = std::collections::HashSet::new();
                for d in dirs {
                    let mut sub = Walk { out: Vec::new() };
                    sub.next(rest, &d);
                    for p in sub.out {
                        if self.full() {
                            return;
                        }
                        if seen.insert(p.clone()) {
                            self.out.push(p);
                        }
                    }
                }
            }
        }
    }
}

/// `dir` and every directory below it, depth first in directory order, symlinks not followed.
fn directories(dir: &Path, out: &mut Vec<PathBuf>) {
    if out.len() >= WALK_MAX_ENTRIES {
        return;
    }
    out.push(dir.to_path_buf());
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let entries: Vec<_> = rd.flatten().collect();
    for e in entries {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            directories(&dir.join(e.file_name()), out);
        }
    }
}

/// `st_mtime` as Python computes it: seconds plus nanoseconds times 1e-9, in a double.
fn mtime(p: &Path) -> f64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.mtime() as f64 + m.mtime_nsec() as f64 * 1e-9).unwrap_or(0.0)
}

pub(super) fn glob(ctx: &Ctx, i: &GlobInput) -> Res {
    let pattern = i.pattern.as_str();
    if pattern.starts_with('/') {
        return Err(ToolResult::err(
            "glob: absolute pattern not permitted; pass a relative pattern (and optionally path)",
        ));
    }
    let parts: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        return Err(ToolResult::err("glob: '..' is not permitted in the pattern"));
    }
    let base = match i.path.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => resolve(ctx, p).map_err(|e| ToolResult::err(format!("glob: {e}")))?,
        None => root(ctx),
    };
    if pattern.is_empty() {
        return Err(ToolResult::err(format!("glob: Unacceptable pattern: {}", pyfmt::repr(pattern))));
    }
    let mut sels = Vec::new();
    for p in &parts {
        sels.push(if *p == "**" {
            Sel::Recursive
        } else if p.contains("**") {
            return Err(ToolResult::err("glob: Invalid pattern: '**' can only be an entire path component"));
        } else if p.contains(['*', '?', '[']) {
            Sel::Wildcard(tokens(p))
        } else {
            Sel::Precise((*p).to_owned())
        });
    }
    if pattern.ends_with('/') {
        sels.push(Sel::Terminating);
    }
    if sels.is_empty() {
        // `Path.glob(".")` indexes an empty tuple.
        return Err(ToolResult::err("IndexError('tuple index out of range')"));
    }
    if matches!(sels[..], [Sel::Terminating]) {
        // `Path.glob("./")` starts from a selector that cannot start a walk.
        return Err(ToolResult::err(
            "AttributeError(\"'_TerminatingSelector' object has no attribute 'select_from'\")",
        ));
    }
    let mut walk = Walk { out: Vec::new() };
    if is_dir(&base) {
        walk.select(&sels, &base);
    }
    let mut found: Vec<(f64, PathBuf)> = walk
        .out
        .into_iter()
        .filter(|m| canonicalize(m).is_ok_and(|c| within(&c, &base)))
        .map(|m| (mtime(&m), m))
        .collect();
    if found.is_empty() {
        return Ok(ToolResult::ok("no matches"));
    }
    // Stable: equal times keep the walk's order, as Python's sort does.
    found.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    let text: Vec<String> =
        found.iter().take(GLOB_RESULT_LIMIT).map(|(_, p)| p.to_string_lossy().into_owned()).collect();
    Ok(ToolResult::ok(text.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_as_fnmatch_matches_them() {
        for (pat, name, want) in [
            ("*.rs", "main.rs", true),
            ("*.rs", ".hidden.rs", true),
            ("*.rs", "main.rsx", false),
            ("?.txt", "a.txt", true),
            ("?.txt", "ab.txt", false),
            ("[abc]*", "beta", true),
            ("[!abc]*", "beta", false),
            ("[a-c]x", "bx", true),
            ("[z-a]x", "zx", false),
            ("[]]", "]", true),
            ("[", "[", true),
            ("a[", "a[", true),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b", "xxaxxbxxc", false),
            ("日*", "日本", true),
            ("[-a]", "-", true),
        ] {
            assert_eq!(matches(&tokens(pat), name), want, "{pat} ~ {name}");
        }
    }
}
