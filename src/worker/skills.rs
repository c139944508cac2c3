//! A session agent's skills, downloaded into `/workspace/skills/<name>/` before its first tool
//! call, as the official worker does: the session names the skills (its agent's and its
//! subagents'), each version is looked up
//! (`latest` included), and its archive — zip, or tar plain or compressed with gzip, bzip2 or xz —
//! is unpacked with the official extraction rules. Archives come from the network and may be a
//! third party's, so: any member with an absolute path or a `..` component refuses the whole
//! archive; links, devices and FIFOs are skipped; a single wrapping directory is stripped; files
//! get 0755 when any execute bit was set, else 0644; and sizes are bounded. A skill that fails is
//! logged and skipped; the session goes on without it.

use std::io::{Cursor, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::control_plane::wire::SkillRef;
use crate::control_plane::Client;

/// The most one archive may unpack to.
pub(crate) const MAX_UNPACKED: u64 = 256 << 20;
/// The most members one archive may hold.
pub(crate) const MAX_MEMBERS: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SkillError {
    #[error("{0}")]
    Api(#[from] crate::control_plane::ApiError),
    #[error("refusing archive member {0:?}: {1}")]
    Unsafe(String, &'static str),
    #[error("archive: {0}")]
    Archive(String),
    #[error("archive unpacks to more than {MAX_UNPACKED} bytes or {MAX_MEMBERS} members")]
    TooLarge,
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Downloads every skill of the session's agent into `workspace/skills/`, owned by `owner`.
/// Returns the directories made; failures are logged, never fatal.
pub(super) async fn download(
    client: &Client,
    session: &crate::control_plane::wire::Session,
    workspace: &Path,
    owner: (u32, u32),
) -> Vec<PathBuf> {
    let skills = session.skills_with_subagents();
    let mut made = Vec::new();
    for skill in &skills {
        match one(client, skill, workspace, owner).await {
            Ok(dest) => {
                tracing::info!(skill_id = %skill.skill_id, dest = %dest.display(), "skill downloaded");
                made.push(dest);
            }
            Err(e) => tracing::warn!(skill_id = %skill.skill_id, error = %e, "failed to download a skill; skipped"),
        }
    }
    made
}

/// The directory a skill lands in: the last component of its version's name, or its id.
pub(crate) fn dir_name(name: &str, skill_id: &str) -> String {
    let base = name.trim().rsplit('/').next().unwrap_or("").to_owned();
    if matches!(base.as_str(), "" | "." | "..") || base.contains('\0') {
        skill_id.to_owned()
    } else {
        base
    }
}

async fn one(client: &Client, skill: &SkillRef, workspace: &Path, owner: (u32, u32)) -> Result<PathBuf, SkillError> {
    let version = if skill.version.is_empty() { "latest" } else { skill.version.as_str() };
    let v = client.skill_version(&skill.skill_id, version).await?;
    let name = dir_name(&v.name, &skill.skill_id);
    if name.contains('/') || matches!(name.as_str(), "" | "." | "..") {
        return Err(SkillError::Unsafe(name, "not a single directory name"));
    }
    // `latest` is resolved by the lookup; the archive is fetched by the concrete version.
    let concrete = if v.id.is_empty() { version.to_owned() } else { v.id.clone() };
    let archive = client.skill_content(&skill.skill_id, &concrete).await?;
    let root = workspace.join("skills");
    let dest = root.join(&name);
    tokio::task::spawn_blocking(move || install(&archive, &root, &dest, owner).map(|()| dest))
        .await
        .map_err(|e| SkillError::Archive(format!("extraction task: {e}")))?
}

/// Unpacks into a fresh staging directory beside `dest`, then replaces `dest` with it.
fn install(archive: &[u8], root: &Path, dest: &Path, owner: (u32, u32)) -> Result<(), SkillError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| SkillError::Io(p, e)
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(root).map_err(io(root))?;
    chown(root, owner)?;
    let stage = root.join(format!(".skill-{:016x}", fastrand::u64(..)));
    std::fs::DirBuilder::new().mode(0o700).create(&stage).map_err(io(&stage))?;
    let r = extract(archive, &stage).and_then(|()| {
        chown_tree(&stage, owner)?;
        std::fs::set_permissions(&stage, std::fs::Permissions::from_mode(0o755)).map_err(io(&stage))?;
        if dest.exists() {
            std::fs::remove_dir_all(dest).map_err(io(dest))?;
        }
        std::fs::rename(&stage, dest).map_err(io(dest))
    });
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&stage);
    }
    r
}

fn chown(p: &Path, owner: (u32, u32)) -> Result<(), SkillError> {
    std::os::unix::fs::lchown(p, Some(owner.0), Some(owner.1)).map_err(|e| SkillError::Io(p.into(), e))
}

fn chown_tree(p: &Path, owner: (u32, u32)) -> Result<(), SkillError> {
    chown(p, owner)?;
    if p.is_dir() {
        for e in std::fs::read_dir(p).map_err(|e| SkillError::Io(p.into(), e))?.flatten() {
            chown_tree(&e.path(), owner)?;
        }
    }
    Ok(())
}

/// What an archive member is, as far as extraction cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    /// A link, device, FIFO or socket: never extracted.
    Special,
}

struct Member {
    name: String,
    kind: Kind,
    mode: u32,
    data: Vec<u8>,
}

/// A member's name as a confined relative path: `.` components dropped, absolute paths and
/// `..` refused. An empty result means the member names nothing (e.g. `./`).
pub(crate) fn safe_member_name(name: &str) -> Result<String, SkillError> {
    let norm = name.replace('\\', "/");
    if norm.starts_with('/') {
        return Err(SkillError::Unsafe(name.into(), "absolute path"));
    }
    let parts: Vec<&str> = norm.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.contains(&"..") {
        return Err(SkillError::Unsafe(name.into(), "'..' component"));
    }
    Ok(parts.join("/"))
}

/// The one top-level directory every plain member lives under, when there is one and something
/// is nested below it.
fn wrapper_dir(names: &[String]) -> String {
    let mut tops = std::collections::BTreeSet::new();
    let mut nested = false;
    for n in names.iter().filter(|n| !n.is_empty()) {
        let mut it = n.splitn(2, '/');
        tops.insert(it.next().unwrap_or_default().to_owned());
        nested |= it.next().is_some();
    }
    match (tops.len(), nested) {
        (1, true) => tops.into_iter().next().unwrap_or_default(),
        _ => String::new(),
    }
}

fn strip_top(safe: &str, top: &str) -> String {
    if top.is_empty() {
        return safe.to_owned();
    }
    match safe.split_once('/') {
        Some((first, rest)) if first == top => rest.to_owned(),
        None if safe == top => String::new(),
        _ => safe.to_owned(),
    }
}

/// Reads at most `MAX_UNPACKED` bytes.
fn read_bounded(r: impl Read, budget: &mut u64) -> Result<Vec<u8>, SkillError> {
    let mut out = Vec::new();
    r.take(*budget + 1).read_to_end(&mut out).map_err(|e| SkillError::Archive(e.to_string()))?;
    if out.len() as u64 > *budget {
        return Err(SkillError::TooLarge);
    }
    *budget -= out.len() as u64;
    Ok(out)
}

fn zip_members(archive: &[u8]) -> Result<Vec<Member>, SkillError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(archive)).map_err(|e| SkillError::Archive(e.to_string()))?;
    if zip.len() > MAX_MEMBERS {
        return Err(SkillError::TooLarge);
    }
    let mut budget = MAX_UNPACKED;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let f = zip.by_index(i).map_err(|e| SkillError::Archive(e.to_string()))?;
        let name = f.name().to_owned();
        // Only a Unix-made entry's attributes are a mode.
        let mode = f.unix_mode();
        let fmt = mode.map(|m| m & libc::S_IFMT);
        let kind = if f.is_symlink() || fmt.is_some_and(|t| t != 0 && t != libc::S_IFREG && t != libc::S_IFDIR) {
            Kind::Special
        } else if f.is_dir() || fmt == Some(libc::S_IFDIR) {
            Kind::Dir
        } else {
            Kind::File
        };
        let data = if kind == Kind::File { read_bounded(f, &mut budget)? } else { Vec::new() };
        out.push(Member { name, kind, mode: mode.unwrap_or(0), data });
    }
    Ok(out)
}

fn tar_members(archive: &[u8]) -> Result<Vec<Member>, SkillError> {
    let mut budget = MAX_UNPACKED;
    let plain: Vec<u8> = match archive {
        [0x1f, 0x8b, ..] => read_bounded(flate2::read::GzDecoder::new(archive), &mut budget)?,
        [b'B', b'Z', b'h', ..] => read_bounded(bzip2::read::BzDecoder::new(archive), &mut budget)?,
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            let mut out = Bounded { buf: Vec::new(), left: budget };
            lzma_rs::xz_decompress(&mut Cursor::new(archive), &mut out).map_err(|e| match e {
                lzma_rs::error::Error::IoError(e) if e.kind() == std::io::ErrorKind::WriteZero => SkillError::TooLarge,
                e => SkillError::Archive(format!("xz: {e}")),
            })?;
            out.buf
        }
        _ => archive.to_vec(),
    };
    let mut budget = MAX_UNPACKED;
    let mut tar = tar::Archive::new(Cursor::new(plain));
    let mut out = Vec::new();
    for e in tar.entries().map_err(|e| SkillError::Archive(e.to_string()))? {
        let e = e.map_err(|e| SkillError::Archive(e.to_string()))?;
        if out.len() >= MAX_MEMBERS {
            return Err(SkillError::TooLarge);
        }
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mode = e.header().mode().unwrap_or(0);
        let kind = match e.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
            tar::EntryType::Directory => Kind::Dir,
            _ => Kind::Special,
        };
        let data = if kind == Kind::File { read_bounded(e, &mut budget)? } else { Vec::new() };
        out.push(Member { name, kind, mode, data });
    }
    Ok(out)
}

/// A writer that refuses to grow past its budget (xz decompression writes into it).
struct Bounded {
    buf: Vec<u8>,
    left: u64,
}

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() as u64 > self.left {
            return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "over the unpacked-size limit"));
        }
        self.left -= b.len() as u64;
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Unpacks `archive` (zip or tar, plain, gzip, bzip2 or xz) into the empty directory `dest`.
pub(crate) fn extract(archive: &[u8], dest: &Path) -> Result<(), SkillError> {
    let members = if archive.starts_with(b"PK\x03\x04") || archive.starts_with(b"PK\x05\x06") {
        zip_members(archive)?
    } else {
        tar_members(archive)?
    };
    // Every name is screened, extracted or not: a hostile name refuses the whole archive.
    let mut safe = Vec::with_capacity(members.len());
    for m in &members {
        safe.push(safe_member_name(&m.name)?);
    }
    let plain: Vec<String> =
        members.iter().zip(&safe).filter(|(m, _)| m.kind != Kind::Special).map(|(_, s)| s.clone()).collect();
    let top = wrapper_dir(&plain);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| SkillError::Io(p, e)
    };
    for (m, s) in members.iter().zip(&safe) {
        if m.kind == Kind::Special {
            continue;
        }
        let rel = strip_top(s, &top);
        if rel.is_empty() {
            continue;
        }
        // Nothing in `dest` is a link (none is ever made), so a joined path stays inside it.
        let target = dest.join(&rel);
        if m.kind == Kind::Dir {
            std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&target).map_err(io(&target))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(io(parent))?;
        }
        if target.is_dir() {
            return Err(SkillError::Unsafe(m.name.clone(), "a file where a directory is"));
        }
        std::fs::write(&target, &m.data).map_err(io(&target))?;
        let mode = if m.mode & 0o111 != 0 { 0o755 } else { 0o644 };
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(io(&target))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_of(entries: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, mode, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_size(data.len() as u64);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/shadow").unwrap();
            }
            // set_path refuses `..`; hostile names go into the header bytes directly.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn tree(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in walk(dir) {
            let meta = std::fs::symlink_metadata(&e).unwrap();
            let rel = e.strip_prefix(dir).unwrap().display().to_string();
            if meta.is_dir() {
                out.push(format!("{rel}/"));
            } else {
                out.push(format!(
                    "{rel} {:o} {}",
                    meta.permissions().mode() & 0o7777,
                    std::fs::read_to_string(&e).unwrap()
                ));
            }
        }
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            v.push(e.path());
            if e.file_type().unwrap().is_dir() {
                v.extend(walk(&e.path()));
            }
        }
        v
    }

    fn scratch() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("stockade-skill-test-{}-{:x}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn every_archive_format_unpacks_the_same_with_the_wrapper_stripped() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let plain = tar_of(&[
            ("pdf/", Directory, 0o755, b""),
            ("pdf/SKILL.md", Regular, 0o666, b"# pdf"),
            ("pdf/scripts/run.sh", Regular, 0o4775, b"#!/bin/sh"),
            ("pdf/link", Symlink, 0o777, b""),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz.write_all(&plain).unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut Cursor::new(&plain), &mut xz).unwrap();
        let mut zipped = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        zipped.add_directory("pdf/", opts.unix_permissions(0o755)).unwrap();
        zipped.start_file("pdf/SKILL.md", opts.unix_permissions(0o666)).unwrap();
        zipped.write_all(b"# pdf").unwrap();
        zipped.start_file("pdf/scripts/run.sh", opts.unix_permissions(0o4775)).unwrap();
        zipped.write_all(b"#!/bin/sh").unwrap();
        zipped.add_symlink("pdf/link", "/etc/shadow", opts).unwrap();
        let zipped = zipped.finish().unwrap().into_inner();
        let want =
            vec!["SKILL.md 644 # pdf".to_owned(), "scripts/".to_owned(), "scripts/run.sh 755 #!/bin/sh".to_owned()];
        for (what, a) in [
            ("tar", plain.clone()),
            ("tar.gz", gz.finish().unwrap()),
            ("tar.bz2", bz.finish().unwrap()),
            ("tar.xz", xz),
            ("zip", zipped),
        ] {
            let d = scratch();
            extract(&a, &d).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(tree(&d), want, "{what}");
            std::fs::remove_dir_all(&d).unwrap();
        }
    }

    #[test]
    fn hostile_members_refuse_the_archive_and_write_nothing() {
        use tar::EntryType::Regular;
        for bad in ["../escape", "a/../../escape", "/etc/cron.d/x"] {
            let d = scratch();
            let a = tar_of(&[("ok.txt", Regular, 0o644, b"fine"), (bad, Regular, 0o644, b"bad")]);
            let e = extract(&a, &d).unwrap_err();
            assert!(matches!(e, SkillError::Unsafe(..)), "{bad}: {e}");
            assert!(tree(&d).is_empty(), "{bad}: something was written");
            std::fs::remove_dir_all(&d).unwrap();
        }
        // Not a single wrapping directory: nothing is stripped.
        let d = scratch();
        extract(&tar_of(&[("a.txt", Regular, 0o644, b"a"), ("b/c.txt", Regular, 0o755, b"c")]), &d).unwrap();
        assert_eq!(tree(&d), ["a.txt 644 a", "b/", "b/c.txt 755 c"]);
        std::fs::remove_dir_all(&d).unwrap();
        assert!(extract(b"neither zip nor tar", &scratch()).is_err());
    }

    #[test]
    fn names_reduce_to_one_component() {
        assert_eq!(dir_name(" pdf-tools ", "skill_1"), "pdf-tools");
        assert_eq!(dir_name("../../etc", "skill_1"), "etc");
        assert_eq!(dir_name("..", "skill_1"), "skill_1");
        assert_eq!(dir_name("a/", "skill_1"), "skill_1");
        assert_eq!(safe_member_name("./a/./b").unwrap(), "a/b");
        assert_eq!(safe_member_name("./").unwrap(), "");
    }
}
