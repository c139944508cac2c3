//! read, write and edit.

use base64::Engine;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::format::*;
use super::input::{EditInput, ReadInput, WriteInput};
use super::paths::{fs_error, memory_root_of, reject_read_only, resolve, resolve_readable};
use super::{Block, Ctx, FileAnswer, MemoryWrite, Source, ToolResult};

type Res = Result<ToolResult, ToolResult>;

/// Opens a path for reading without blocking on a FIFO; the caller checks the file type.
fn open_nonblocking(path: &Path) -> io::Result<(File, fs::Metadata)> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let m = f.metadata()?;
    Ok((f, m))
}

/// `Path.suffix` of the file's own name: from its last dot, unless that dot starts or ends it.
fn suffix(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match name.rfind('.') {
        Some(i) if i > 0 && i < name.len() - 1 => name[i..].to_lowercase(),
        _ => String::new(),
    }
}

fn media_type(path: &Path) -> Option<&'static str> {
    Some(match suffix(path).as_str() {
        ".png" => "image/png",
        ".jpg" | ".jpeg" => "image/jpeg",
        ".gif" => "image/gif",
        ".webp" => "image/webp",
        ".pdf" => "application/pdf",
        _ => return None,
    })
}

fn not_utf8_read(fp: &str) -> ToolResult {
    ToolResult::err(format!(
        "read: {fp}: not valid UTF-8 text (binary files are only supported for image/PDF extensions)"
    ))
}

pub(super) fn read(ctx: &Ctx, i: &ReadInput) -> Res {
    let fp = i.file_path.as_str();
    let target = resolve_readable(ctx, fp).map_err(|e| ToolResult::err(format!("read: {e}")))?;
    let view_range = i.view_range.as_deref().filter(|v| !v.is_empty());
    if view_range.is_some_and(|v| v.len() != 2) {
        return Err(ToolResult::err("read: view_range must be [start_line, end_line]"));
    }
    let fs_err = |e: io::Error| ToolResult::err(fs_error("read", fp, &e));
    let (mut f, meta) = open_nonblocking(&target).map_err(fs_err)?;
    if !meta.file_type().is_file() {
        return Err(ToolResult::err(format!("read: {fp}: not a regular file")));
    }
    let size = meta.len();
    if let Some(media) = media_type(&target) {
        if view_range.is_some() {
            return Err(ToolResult::err("read: view_range is not supported for image/PDF files"));
        }
        let limit = if media == "application/pdf" { MAX_PDF_BYTES } else { (MAX_IMAGE_BASE64_BYTES / 4) * 3 };
        if size > limit {
            return Err(ToolResult::err(format!(
                "read: {fp} is {size} bytes, exceeds {limit}-byte limit for image/PDF files."
            )));
        }
        let mut data = Vec::with_capacity(size as usize);
        f.read_to_end(&mut data).map_err(fs_err)?;
        let source = Source {
            kind: "base64".into(),
            media_type: media.into(),
            data: base64::engine::general_purpose::STANDARD.encode(&data),
        };
        let block = if media == "application/pdf" { Block::Document { source } } else { Block::Image { source } };
        return Ok(ToolResult { content: vec![block], is_error: false });
    }
    if size > MAX_READ_BYTES {
        let Some(&[start, end]) = view_range else {
            return Err(ToolResult::err(format!(
                "read: {fp} is {size} bytes, exceeds {MAX_READ_BYTES}-byte limit. Use the view_range parameter to \
                 read specific line ranges, e.g. view_range: [1, 500]."
            )));
        };
        return read_line_range(&mut f, fp, start, end).map(ToolResult::ok);
    }
    let mut bytes = Vec::with_capacity(size as usize);
    f.read_to_end(&mut bytes).map_err(fs_err)?;
    let text = String::from_utf8(bytes).map_err(|_| not_utf8_read(fp))?;
    let Some(&[start, end]) = view_range else { return Ok(ToolResult::ok(text)) };
    let lines: Vec<&str> = text.split('\n').collect();
    let from = (start.saturating_sub(1)).max(0) as usize;
    let to = if end > 0 { (end as usize).min(lines.len()) } else { lines.len() };
    Ok(ToolResult::ok(if from < to { lines[from..to].join("\n") } else { String::new() }))
}

/// Lines `[start, end]` of a file too large to read whole, streamed, the selection held to the
/// same byte limit.
fn read_line_range(f: &mut File, fp: &str, start_line: i64, end_line: i64) -> Result<String, ToolResult> {
    let start = start_line.saturating_sub(1).max(0) as u64;
    let end = if end_line > 0 { end_line as u64 } else { u64::MAX };
    if end <= start {
        return Ok(String::new());
    }
    let over = || {
        if end - start == 1 {
            ToolResult::err(format!(
                "read: line {} of {fp} alone exceeds {MAX_READ_BYTES}-byte limit. The read tool cannot return part \
                 of a line, so view_range cannot narrow this further.",
                start + 1
            ))
        } else {
            ToolResult::err(format!(
                "read: view_range [{start_line}, {end_line}] of {fp} exceeds {MAX_READ_BYTES}-byte limit. Narrow the \
                 view_range to read a smaller portion."
            ))
        }
    };
    let mut line: u64 = 0;
    let mut got: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    'chunks: loop {
        let n = match f.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ToolResult::err(fs_error("read", fp, &e))),
        };
        let mut at = 0;
        while at < n && line < end {
            let nl = chunk[at..n].iter().position(|b| *b == b'\n').map(|p| at + p);
            let stop = nl.unwrap_or(n);
            if line >= start {
                got.extend_from_slice(&chunk[at..stop]);
                if nl.is_some() && line + 1 < end {
                    got.push(b'\n');
                }
                if got.len() as u64 > MAX_READ_BYTES {
                    return Err(over());
                }
            }
            let Some(nl) = nl else { break };
            line += 1;
            at = nl + 1;
        }
        if line >= end {
            break 'chunks;
        }
    }
    String::from_utf8(got).map_err(|_| not_utf8_read(fp))
}

/// `Path.mkdir(parents=True, exist_ok=True)`.
fn mkdir_parents(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match dir.parent() {
                Some(p) if p != dir => mkdir_parents(p)?,
                _ => return Err(e),
            }
            match fs::create_dir(dir) {
                Err(e) if !dir.is_dir() => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) if dir.is_dir() => {
            let _ = e;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn write_bytes(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_NOCTTY).open(path)?;
    f.write_all(data)
}

/// A change to a memory store's file, left to the caller; else `None`.
fn for_memory(
    ctx: &Ctx,
    target: &Path,
    content: &str,
    replacing: Option<&str>,
    op: &str,
    fp: &str,
    done: &str,
) -> Option<FileAnswer> {
    memory_root_of(ctx, target)?;
    Some(FileAnswer::Memory(MemoryWrite {
        path: target.to_path_buf(),
        content: content.to_owned(),
        replacing: replacing.map(str::to_owned),
        op: op.to_owned(),
        file_path: fp.to_owned(),
        done: done.to_owned(),
    }))
}

pub(super) fn write(ctx: &Ctx, i: &WriteInput) -> Result<FileAnswer, ToolResult> {
    let fp = i.file_path.as_str();
    let target = resolve(ctx, fp).map_err(|e| ToolResult::err(format!("write: {e}")))?;
    reject_read_only(ctx, "write", fp, &target).map_err(ToolResult::err)?;
    // Python counts characters, and so does the message.
    let done = format!("wrote {} bytes to {fp}", i.content.chars().count());
    if let Some(m) = for_memory(ctx, &target, &i.content, None, "write", fp, &done) {
        return Ok(m);
    }
    let parent = target.parent().unwrap_or(Path::new("/"));
    mkdir_parents(parent)
        .and_then(|()| write_bytes(&target, i.content.as_bytes()))
        .map_err(|e| ToolResult::err(fs_error("write", fp, &e)))?;
    Ok(FileAnswer::Done(ToolResult::ok(done)))
}

pub(super) fn edit(ctx: &Ctx, i: &EditInput) -> Result<FileAnswer, ToolResult> {
    let fp = i.file_path.as_str();
    let target = resolve(ctx, fp).map_err(|e| ToolResult::err(format!("edit: {e}")))?;
    reject_read_only(ctx, "edit", fp, &target).map_err(ToolResult::err)?;
    let fs_err = |e: io::Error| ToolResult::err(fs_error("edit", fp, &e));
    let (mut f, meta) = open_nonblocking(&target).map_err(fs_err)?;
    if !meta.file_type().is_file() {
        return Err(ToolResult::err(format!("edit: {fp}: not a regular file")));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ToolResult::err(format!(
            "edit: {fp} is {} bytes, exceeds {MAX_FILE_BYTES}-byte limit. The edit tool loads the whole file and \
             cannot modify a file this large.",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.read_to_end(&mut bytes).map_err(fs_err)?;
    drop(f);
    let text = String::from_utf8(bytes)
        .map_err(|_| ToolResult::err(format!("edit: {fp}: not valid UTF-8 text (cannot edit binary files)")))?;
    let count = text.matches(i.old_string.as_str()).count();
    if count == 0 {
        return Err(ToolResult::err(format!("edit: old_string not found in {fp}")));
    }
    if !i.replace_all && count > 1 {
        return Err(ToolResult::err(format!("edit: old_string appears {count} times in {fp} (must be unique)")));
    }
    if count > 1 {
        // Refused before the replacement is built: it could be far larger than the file.
        let grows = i.new_string.len() as i128 - i.old_string.len() as i128;
        let size = meta.len() as i128 + count as i128 * grows;
        if size > MAX_FILE_BYTES as i128 {
            return Err(ToolResult::err(format!(
                "edit: {count} replacements would make {fp} {size} bytes, exceeds {MAX_FILE_BYTES}-byte limit."
            )));
        }
    }
    let updated = if i.replace_all {
        text.replace(i.old_string.as_str(), &i.new_string)
    } else {
        text.replacen(i.old_string.as_str(), &i.new_string, 1)
    };
    let done = format!("edited {fp} ({} replacement(s))", if i.replace_all { count } else { 1 });
    if let Some(m) = for_memory(ctx, &target, &updated, Some(&text), "edit", fp, &done) {
        return Ok(m);
    }
    write_bytes(&target, updated.as_bytes()).map_err(fs_err)?;
    Ok(FileAnswer::Done(ToolResult::ok(done)))
}
