//! The worker's credentials: the environment key is read once, from exactly one place, held as
//! a `Secret`, and removed from the worker's own environment before any jail exists.

use std::path::{Path, PathBuf};

use crate::control_plane::Secret;

pub(crate) const ENV_KEY_VAR: &str = "ANTHROPIC_ENVIRONMENT_KEY";
pub const ORG_KEY_VAR: &str = "ANTHROPIC_API_KEY";
/// A claimed work item's secret, as `ant beta:worker poll --on-work` hands it on.
pub const WORK_SECRET_VAR: &str = "ANTHROPIC_WORK_SECRET";
/// The name of the credential under systemd's `$CREDENTIALS_DIRECTORY` (`LoadCredential=`).
pub const CREDENTIAL_NAME: &str = "anthropic-environment-key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{ORG_KEY_VAR} is set in the worker's environment: setting ANTHROPIC_API_KEY on the worker host exposes an \
         organization-scoped credential to agent tool calls. The worker needs only the environment key; keep the \
         organisation key on operator machines (or pass --allow-org-key-in-env to accept the risk)"
    )]
    OrgKeyInEnvironment,
    #[error("no environment key: set {ENV_KEY_VAR}, pass --environment-key-file, or provide the systemd credential {CREDENTIAL_NAME}")]
    Missing,
    #[error("environment key file {0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("environment key from {0} is empty")]
    Empty(String),
    #[error("environment key file {0} is readable by other users (mode {1:o}); chmod 600 it")]
    Permissive(PathBuf, u32),
}

/// Where the key came from, for the log (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    CommandLine,
    File(PathBuf),
    Credential(PathBuf),
    Environment,
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::CommandLine => f.write_str("--environment-key (wiped from the command line)"),
            KeySource::File(p) => write!(f, "file {}", p.display()),
            KeySource::Credential(p) => write!(f, "systemd credential {}", p.display()),
            KeySource::Environment => write!(f, "${ENV_KEY_VAR}"),
        }
    }
}

fn read_key_file(p: &Path, check_mode: bool) -> Result<Secret, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p).map_err(|e| KeyError::File(p.into(), e))?;
    let mode = meta.permissions().mode() & 0o777;
    if check_mode && mode & 0o077 != 0 {
        return Err(KeyError::Permissive(p.into(), mode));
    }
    let text = std::fs::read_to_string(p).map_err(|e| KeyError::File(p.into(), e))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(KeyError::Empty(p.display().to_string()));
    }
    Ok(Secret::new(key))
}

/// The key as its file or credential holds it now, for a rotation; `None` for a key that came
/// from the command line or the environment, which cannot change.
pub(crate) fn reread(source: &KeySource) -> Option<Result<Secret, KeyError>> {
    match source {
        KeySource::File(p) => Some(read_key_file(p, true)),
        KeySource::Credential(p) => Some(read_key_file(p, false)),
        KeySource::CommandLine | KeySource::Environment => None,
    }
}

/// Loads the environment key (the command line's, then a file, then the systemd credential,
/// then the environment variable), refuses an organisation key in the environment unless
/// allowed, and scrubs both variables — and a key given on the command line — from this
/// process. Must run before the process starts threads.
pub fn load(value: Option<&str>, file: Option<&Path>, allow_org_key: bool) -> Result<(Secret, KeySource), KeyError> {
    let org_present = std::env::var_os(ORG_KEY_VAR).is_some_and(|v| !v.is_empty());
    if org_present && !allow_org_key {
        return Err(KeyError::OrgKeyInEnvironment);
    }
    let from_env = std::env::var(ENV_KEY_VAR).ok().filter(|v| !v.trim().is_empty());
    let r = if let Some(v) = value.map(str::trim) {
        crate::jail::environ::wipe_argument(v);
        if v.is_empty() {
            Err(KeyError::Empty("--environment-key".into()))
        } else {
            Ok((Secret::new(v), KeySource::CommandLine))
        }
    } else if let Some(p) = file {
        read_key_file(p, true).map(|k| (k, KeySource::File(p.into())))
    } else if let Some(p) =
        std::env::var_os("CREDENTIALS_DIRECTORY").map(|d| PathBuf::from(d).join(CREDENTIAL_NAME)).filter(|p| p.exists())
    {
        // systemd owns the credential's mode.
        read_key_file(&p, false).map(|k| (k, KeySource::Credential(p)))
    } else if let Some(v) = from_env {
        Ok((Secret::new(v.trim()), KeySource::Environment))
    } else {
        Err(KeyError::Missing)
    };
    crate::jail::environ::scrub_variables(&[ENV_KEY_VAR, ORG_KEY_VAR]);
    r
}
