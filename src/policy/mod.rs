//! Policy files: the declarative description of a jail.
//!
//! A policy is TOML. It may `extends` a built-in policy (`default`, `strict`, `ci`) or another
//! file (a path relative to the extending file). Merging is uniform: scalars override, maps merge
//! key by key, and every list field `X` replaces the inherited list when written as `X`, or edits it
//! when written as `X_add = [...]` / `X_remove = [...]`. Unknown fields are errors.
//!
//! `Policy` is the fully resolved, validated result; `Origins` remembers which file and line each
//! field came from, for error messages and the audit.

pub mod audit;
pub mod narrow;
mod parse;
pub mod rules;
pub mod syscalls;
mod types;

pub use parse::{load_builtin, load_file, load_str, Origin, Origins};
pub use types::*;

use std::path::PathBuf;

/// The built-in policies, embedded so a fresh install works without `policies/`.
/// The built-in policies' names, the one `run` uses by default first.
pub const BUILTIN_NAMES: &[&str] = &["default", "strict", "ci", "rootless"];

pub(crate) const BUILTINS: &[(&str, &str)] = &[
    ("default", include_str!("../../policies/default.toml")),
    ("strict", include_str!("../../policies/strict.toml")),
    ("ci", include_str!("../../policies/ci.toml")),
    ("rootless", include_str!("../../policies/rootless.toml")),
];

pub(crate) fn builtin_text(name: &str) -> Option<&'static str> {
    BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read policy: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{at}: {msg}")]
    Invalid { at: Origin, msg: String },
    #[error("{0}: `extends` cycle")]
    Cycle(String),
    #[error("unknown built-in policy `{name}`{hint} (built-ins: default, strict, ci)")]
    UnknownBuiltin { name: String, hint: String },
}

impl PolicyError {
    pub(crate) fn invalid(at: &Origin, msg: impl Into<String>) -> Self {
        PolicyError::Invalid { at: at.clone(), msg: msg.into() }
    }
}

/// Loads a policy given on the command line: a path, or a built-in name when no such file
/// exists and the name is one of the built-ins.
/// `s` as a TOML string, for policy text written by Stockade itself (overlays that extend a
/// policy): quotes, backslashes and newlines stay inside the string.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Whether `name` is a built-in policy's (default, strict, ci).
pub fn is_builtin(name: &str) -> bool {
    builtin_text(name).is_some()
}

pub fn load(spec: Option<&str>) -> Result<(Policy, Origins), PolicyError> {
    match spec {
        None => load_builtin("default"),
        Some(s) if builtin_text(s).is_some() && !std::path::Path::new(s).exists() => load_builtin(s),
        Some(s) => load_file(std::path::Path::new(s)),
    }
}

#[cfg(test)]
mod tests;

/// A policy value as the policy file spells it (`"best_effort"`, `"loopback"`, `"errno"`), for
/// text shown to people: never Rust's `Debug` form.
pub fn spelling<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Null) => "none".to_owned(),
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}
