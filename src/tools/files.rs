//! read, write and edit.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::format::*;
use super::{absolute, io_error, EditInput, ReadInput, ToolResult, WriteInput};

type Res = Result<ToolResult, ToolResult>;

/// Opens a path for reading without blocking on FIFOs and refuses anything but regular files.
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), ToolResult> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| io_error(path, &e))?;
    let meta = f.metadata().map_err(|e| io_error(path, &e))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(ToolResult::err(format!(
            "{} is a directory, not a file (use glob or bash `ls` to list it)",
            path.display()
        )));
    }
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(ToolResult::err(format!("{} is {kind}; only regular files can be read", path.display())));
    }
    Ok((f, meta))
}

fn nul_offset(chunk: &[u8]) -> Option<usize> {
    chunk[..chunk.len().min(BINARY_SNIFF_BYTES)].iter().position(|b| *b == 0)
}

pub fn read(i: &ReadInput) -> Res {
    let path = absolute("file_path", &i.file_path)?;
    let offset = i.offset.unwrap_or(1).max(1) as usize;
    let limit = match i.limit {
        None => READ_DEFAULT_LIMIT,
        Some(0) => return Err(ToolResult::err("limit must be at least 1")),
        Some(n) => (n as usize).min(READ_DEFAULT_LIMIT),
    };
    let (f, meta) = open_regular(&path)?;
    if meta.len() == 0 {
        return Ok(ToolResult::ok(READ_EMPTY));
    }
    let mut r = BufReader::with_capacity(64 * 1024, f);
    let head = r.fill_buf().map_err(|e| io_error(&path, &e))?;
    if let Some(at) = nul_offset(head) {
        return Err(ToolResult::err(format!(
            "{} looks like a binary file (NUL byte at offset {at}); read only shows text",
            path.display()
        )));
    }
    // Each line is kept up to a bounded number of bytes, so a huge single-line file costs
    // no more memory than a short one.
    let cap_bytes = READ_MAX_LINE_CHARS * 4;
    let mut out = String::new();
    let mut line: Vec<u8> = Vec::new();
    let mut n = 0usize;
    let mut shown = 0usize;
    loop {
        line.clear();
        let (complete, truncated) = read_line_capped(&mut r, &mut line, cap_bytes).map_err(|e| io_error(&path, &e))?;
        if !complete && line.is_empty() && !truncated {
            break; // EOF
        }
        n += 1;
        if n < offset {
            if !complete {
                break;
            }
            continue;
        }
        if shown == limit {
            out.push_str(&read_more(n));
            return Ok(ToolResult::ok(out));
        }
        let text = String::from_utf8_lossy(&line);
        let mut text: String = text.strip_suffix('\n').unwrap_or(&text).to_owned();
        let mut cut = truncated;
        if text.chars().count() > READ_MAX_LINE_CHARS {
            text = text.chars().take(READ_MAX_LINE_CHARS).collect();
            cut = true;
        }
        if cut {
            text.push_str(LINE_TRUNCATED);
        }
        if shown > 0 {
            out.push('\n');
        }
        out.push_str(&numbered_line(n, &text));
        shown += 1;
        if !complete {
            break;
        }
    }
    if shown == 0 {
        return Ok(ToolResult::ok(read_past_end(offset, n)));
    }
    Ok(ToolResult::ok(out))
}

/// Reads one line (through '\n') into `buf`, keeping at most `cap` bytes. Returns
/// (ended with a newline, bytes were dropped).
fn read_line_capped<R: BufRead>(r: &mut R, buf: &mut Vec<u8>, cap: usize) -> std::io::Result<(bool, bool)> {
    let mut dropped = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok((false, dropped));
        }
        let (take, done) = match memchr_nl(chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = cap.saturating_sub(buf.len());
        if room >= take {
            buf.extend_from_slice(&chunk[..take]);
        } else {
            buf.extend_from_slice(&chunk[..room]);
            dropped = true;
        }
        r.consume(take);
        if done {
            return Ok((true, dropped));
        }
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|c| *c == b'\n')
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Where a write lands: through a symlink to its target, like an editor would.
fn write_target(path: &Path) -> Result<(PathBuf, Option<fs::Metadata>), ToolResult> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            let real = fs::canonicalize(path).map_err(|e| {
                ToolResult::err(format!("{} is a symlink that cannot be followed: {e}", path.display()))
            })?;
            let meta = fs::metadata(&real).ok();
            Ok((real, meta))
        }
        Ok(m) => Ok((path.to_path_buf(), Some(m))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((path.to_path_buf(), None)),
        Err(e) => Err(io_error(path, &e)),
    }
}

/// Replaces `target` atomically: a temporary file in the same directory, then rename(2).
/// The mode of an existing file is kept.
fn atomic_write(target: &Path, existing: Option<&fs::Metadata>, content: &[u8]) -> Result<(), ToolResult> {
    if let Some(m) = existing {
        if m.is_dir() {
            return Err(ToolResult::err(format!("{} is a directory", target.display())));
        }
        if !m.is_file() {
            return Err(ToolResult::err(format!("{} is not a regular file", target.display())));
        }
    }
    let dir = target.parent().ok_or_else(|| ToolResult::err("cannot write to /"))?;
    fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp =
        dir.join(format!(".{name}.stockade-{}-{}.tmp", std::process::id(), TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
    let mode = existing.map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(content)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, target)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(target, &e));
    }
    Ok(())
}

pub fn write(i: &WriteInput) -> Res {
    let path = absolute("file_path", &i.file_path)?;
    let (target, existing) = write_target(&path)?;
    atomic_write(&target, existing.as_ref(), i.content.as_bytes())?;
    let shown = path.display().to_string();
    Ok(ToolResult::ok(if existing.is_some() {
        write_updated(&shown, i.content.len())
    } else {
        write_created(&shown, i.content.len())
    }))
}

pub fn edit(i: &EditInput) -> Res {
    let path = absolute("file_path", &i.file_path)?;
    if i.old_string.is_empty() {
        return Err(ToolResult::err("old_string must not be empty (use write to create or replace a whole file)"));
    }
    if i.old_string == i.new_string {
        return Err(ToolResult::err("old_string and new_string are identical; there is nothing to change"));
    }
    let (target, existing) = write_target(&path)?;
    let (f, meta) = open_regular(&target)?;
    if meta.len() > MAX_EDIT_BYTES {
        return Err(ToolResult::err(format!(
            "{} is {} bytes; edit handles files up to {} bytes",
            path.display(),
            meta.len(),
            MAX_EDIT_BYTES
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_EDIT_BYTES + 1).read_to_end(&mut bytes).map_err(|e| io_error(&path, &e))?;
    if let Some(at) = nul_offset(&bytes) {
        return Err(ToolResult::err(format!("{} looks like a binary file (NUL byte at offset {at})", path.display())));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        ToolResult::err(format!(
            "{} is not valid UTF-8 (at byte {}); edit only changes text",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    let count = text.matches(i.old_string.as_str()).count();
    if count == 0 {
        return Err(ToolResult::err(format!("old_string was not found in {}", path.display())));
    }
    if count > 1 && !i.replace_all {
        return Err(ToolResult::err(format!(
            "old_string occurs {count} times in {}; add surrounding context to make it unique, or set replace_all to replace every occurrence",
            path.display()
        )));
    }
    let new = if i.replace_all {
        text.replace(&i.old_string, &i.new_string)
    } else {
        text.replacen(&i.old_string, &i.new_string, 1)
    };
    atomic_write(&target, existing.as_ref(), new.as_bytes())?;
    Ok(ToolResult::ok(edit_done(&path.display().to_string(), count, i.replace_all)))
}
