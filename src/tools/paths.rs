//! Paths as the official runner resolves them: relative to the working directory, `.` and `..`
//! collapsed by spelling, then every symlink followed (a missing tail kept as spelled), and the
//! result is what the tool works on. Its error texts are the runner's own.

use std::io;
use std::path::{Component, Path, PathBuf};

use super::Ctx;

/// The runner's wording for a filesystem error: the same on every host, never a host path.
pub(super) fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no such file or directory".into(),
        Some(libc::ENOTDIR) => "not a directory".into(),
        Some(libc::EISDIR) => "is a directory".into(),
        Some(libc::EACCES | libc::EPERM) => "permission denied".into(),
        Some(libc::EEXIST) => "file already exists".into(),
        Some(libc::ELOOP) => "too many levels of symbolic links".into(),
        Some(n) => {
            let s = io::Error::from_raw_os_error(n).to_string();
            let s = s.split(" (os error").next().unwrap_or(&s).to_owned();
            s.to_lowercase()
        }
        None => "i/o error".into(),
    }
}

/// `OP: FILE_PATH: REASON`, as the runner reports a failed filesystem call.
pub(super) fn fs_error(op: &str, file_path: &str, e: &io::Error) -> String {
    format!("{op}: {file_path}: {}", reason(e))
}

/// `os.path.normpath`: `.` dropped, `..` taken back by spelling, repeated slashes folded (two
/// leading slashes are kept, as POSIX allows).
pub(super) fn normpath(p: &str) -> PathBuf {
    if p.is_empty() {
        return PathBuf::from(".");
    }
    let lead = if p.starts_with("//") && !p.starts_with("///") {
        "//"
    } else if p.starts_with('/') {
        "/"
    } else {
        ""
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." if parts.last().is_some_and(|l| *l != "..") => {
                parts.pop();
            }
            ".." if !lead.is_empty() => {}
            c => parts.push(c),
        }
    }
    let s = format!("{lead}{}", parts.join("/"));
    PathBuf::from(if s.is_empty() { ".".into() } else { s })
}

fn is_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

const MAX_SYMLINK_HOPS: u32 = 40;

fn eloop() -> io::Error {
    io::Error::from_raw_os_error(libc::ELOOP)
}

/// Every symlink of `path` followed; components that do not exist yet are kept as spelled, and
/// a dangling symlink on the way is followed by hand.
pub(super) fn canonicalize(path: &Path) -> io::Result<PathBuf> {
    let mut prefix = normpath(&path.to_string_lossy());
    let mut missing: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    loop {
        let unresolved = match std::fs::canonicalize(&prefix) {
            Ok(p) => {
                let mut p = p;
                for m in missing.iter().rev() {
                    p.push(m);
                }
                return Ok(p);
            }
            Err(e) if is_missing(&e) => e,
            Err(e) => return Err(e),
        };
        let is_symlink = match std::fs::symlink_metadata(&prefix) {
            Ok(m) => m.file_type().is_symlink(),
            Err(e) if is_missing(&e) && prefix.parent().is_some_and(|p| p != prefix) => {
                missing.push(prefix.file_name().map(|n| n.to_owned()).unwrap_or_default());
                prefix = match prefix.parent() {
                    Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
                    Some(p) => p.to_path_buf(),
                    None => return Err(e),
                };
                continue;
            }
            Err(e) => return Err(e),
        };
        if !is_symlink {
            return Err(unresolved);
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(eloop());
        }
        let parent = std::fs::canonicalize(prefix.parent().unwrap_or(Path::new("/")))?;
        let mut next = parent.join(std::fs::read_link(&prefix)?);
        for m in missing.iter().rev() {
            next.push(m);
        }
        prefix = normpath(&next.to_string_lossy());
        missing.clear();
    }
}

/// `child` is `root` or inside it, comparing whole components.
pub(super) fn within(child: &Path, root: &Path) -> bool {
    let c: Vec<Component> = child.components().collect();
    let r: Vec<Component> = root.components().collect();
    c.len() >= r.len() && c[..r.len()] == r[..]
}

/// The canonical working directory.
pub(super) fn root(ctx: &Ctx) -> PathBuf {
    std::fs::canonicalize(&ctx.cwd).unwrap_or_else(|_| ctx.cwd.clone())
}

/// A tool's path, resolved as the runner resolves it. The error is the runner's `ValueError`
/// text, which the tool prefixes with its name.
pub(super) fn resolve(ctx: &Ctx, p: &str) -> Result<PathBuf, String> {
    if p.contains('\0') {
        return Err("embedded null byte".into());
    }
    let root = root(ctx);
    let candidate = if p.starts_with('/') { PathBuf::from(p) } else { root.join(p) };
    // The runner quotes the path as given, without escaping (`f'path "{p}"'`).
    let full = canonicalize(&candidate).map_err(|e| format!("path \"{p}\": {}", reason(&e)))?;
    if ctx.confine && !within(&full, &root) && !ctx.memory.iter().any(|m| within(&full, &real(&m.path))) {
        let others = if ctx.memory.is_empty() { "" } else { " and its other permitted directories" };
        return Err(format!("path \"{p}\" is outside the session's working directory{others}"));
    }
    Ok(full)
}

/// A path `read` or `grep` may open: inside a directory where bash saved a long output (a
/// relative path resolved against the working directory), else as `resolve` has it.
pub(super) fn resolve_readable(ctx: &Ctx, p: &str) -> Result<PathBuf, String> {
    if !p.contains('\0') && !ctx.saved_outputs.is_empty() {
        if let Ok(full) = canonicalize(&root(ctx).join(p)) {
            if ctx.saved_outputs.iter().any(|d| within(&full, d)) {
                return Ok(full);
            }
        }
    }
    resolve(ctx, p)
}

/// A directory as it resolves now, or as given when it does not.
fn real(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The runner's refusal to change a file inside a read-only memory store's folder (resolved
/// now, as the runner resolves it) or a directory of saved bash output (a command can replace
/// that directory, so it is compared as recorded, not resolved).
pub(super) fn reject_read_only(ctx: &Ctx, op: &str, fp: &str, target: &Path) -> Result<(), String> {
    let memory = ctx.memory.iter().filter(|m| m.read_only).map(|m| (m.path.clone(), real(&m.path)));
    let saved = ctx.saved_outputs.iter().map(|d| (d.clone(), d.clone()));
    match memory.chain(saved).find(|(_, r)| target.starts_with(r)) {
        Some((d, _)) => Err(format!("{op}: {fp} is inside read-only directory {}", d.display())),
        None => Ok(()),
    }
}

/// The writable memory store folder holding `target`, if any.
pub(super) fn memory_root_of(ctx: &Ctx, target: &Path) -> Option<PathBuf> {
    ctx.memory.iter().filter(|m| !m.read_only).map(|m| real(&m.path)).find(|r| target.starts_with(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normpath_follows_python() {
        for (p, want) in [
            ("a/./b/", "a/b"),
            ("/a/../../b", "/b"),
            ("../a/..", ".."),
            ("a/..", "."),
            ("//a//b", "//a/b"),
            ("///a", "/a"),
            ("", "."),
        ] {
            assert_eq!(normpath(p), PathBuf::from(want), "{p}");
        }
    }
}
