//! Downloads an item's skills into /workspace/skills/<name>/ before the jail starts. Names and
//! paths come from the network, so each is checked to stay inside its skill's directory.

use base64::Engine;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::state::ItemDirs;
use super::Ctx;
use crate::control_plane::wire::WorkItem;

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A relative path of plain components, or None.
fn relative(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

pub(super) async fn fetch(ctx: &Ctx, item: &WorkItem, dirs: &ItemDirs) -> Result<(), String> {
    let root = dirs.workspace.join("skills");
    for s in &item.skills {
        if !valid_name(&s.name) {
            return Err(format!("skill name {:?} is not a plain directory name", s.name));
        }
        let files = ctx.client.skill_files(&s.skill_id).await.map_err(|e| format!("skill {}: {e}", s.name))?;
        let dir = root.join(&s.name);
        for f in files.files {
            let rel = relative(&f.path)
                .ok_or_else(|| format!("skill {}: file path {:?} escapes its directory", s.name, f.path))?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(&f.content_base64)
                .map_err(|e| format!("skill {}: {}: {e}", s.name, f.path))?;
            let dest = dir.join(&rel);
            let mut d = dest.parent().map(Path::to_path_buf);
            std::fs::create_dir_all(d.as_ref().expect("has a parent"))
                .map_err(|e| format!("{}: {e}", dest.display()))?;
            std::fs::write(&dest, &data).map_err(|e| format!("{}: {e}", dest.display()))?;
            let mode = if f.executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())?;
            // Hand the new files and directories to the jail user, up to the workspace.
            let chown = |p: &Path| nix::unistd::chown(p, Some(ctx.owner.0.into()), Some(ctx.owner.1.into()));
            chown(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
            while let Some(p) = d.filter(|p| p.starts_with(&root)) {
                let _ = chown(&p);
                d = p.parent().map(Path::to_path_buf);
            }
        }
        tracing::info!(skill = %s.name, "skill downloaded");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_and_paths_are_refused() {
        assert!(valid_name("pdf-tools"));
        for n in ["", "..", ".hidden", "a/b", "a b"] {
            assert!(!valid_name(n), "{n:?}");
        }
        assert_eq!(relative("bin/run.sh"), Some(PathBuf::from("bin/run.sh")));
        for p in ["../x", "/etc/passwd", "a/../../b", "", "./"] {
            assert_eq!(relative(p), None, "{p:?}");
        }
    }
}
