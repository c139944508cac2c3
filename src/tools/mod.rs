//! The agent toolset: read, write, edit, glob, grep (here) and bash (`bash`).
//!
//! The file tools are plain functions of their input and a working directory. In a session they
//! run *inside* the jail, in a helper process under the jail's landlock and seccomp rules, so the
//! kernel resolves every path under the jail's mounts; tests and benchmarks call the same
//! functions directly. Every outcome, including a malformed or hostile input, is a `ToolResult`.

pub mod bash;
mod files;
pub mod format;
mod search;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What every tool call returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolResult {
    pub content: String,
    pub is_error: bool,
}

impl ToolResult {
    pub fn ok(content: impl Into<String>) -> Self {
        ToolResult { content: content.into(), is_error: false }
    }
    pub fn err(content: impl Into<String>) -> Self {
        ToolResult { content: content.into(), is_error: true }
    }
}

/// The six tool names.
pub const TOOLS: &[&str] = &["bash", "read", "write", "edit", "glob", "grep"];

/// Where relative defaults (glob/grep `path`) are resolved.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub cwd: PathBuf,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReadInput {
    pub file_path: String,
    pub offset: Option<u64>,
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WriteInput {
    pub file_path: String,
    pub content: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct EditInput {
    pub file_path: String,
    pub old_string: String,
    pub new_string: String,
    #[serde(default)]
    pub replace_all: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct GlobInput {
    pub pattern: String,
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutputMode {
    #[default]
    FilesWithMatches,
    Content,
    Count,
}

#[derive(Debug, Deserialize)]
pub(crate) struct GrepInput {
    pub pattern: String,
    pub path: Option<String>,
    pub glob: Option<String>,
    #[serde(rename = "type")]
    pub file_type: Option<String>,
    #[serde(default)]
    pub output_mode: OutputMode,
    #[serde(rename = "-i", default)]
    pub case_insensitive: bool,
    #[serde(rename = "-n", default)]
    pub line_numbers: bool,
    #[serde(rename = "-A")]
    pub after: Option<u64>,
    #[serde(rename = "-B")]
    pub before: Option<u64>,
    #[serde(rename = "-C")]
    pub context: Option<u64>,
    #[serde(default)]
    pub multiline: bool,
    pub head_limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct BashInput {
    #[serde(default)]
    pub command: Option<String>,
    pub timeout: Option<u64>,
    #[serde(default)]
    pub restart: bool,
}

fn parse<T: serde::de::DeserializeOwned>(tool: &str, input: &serde_json::Value) -> Result<T, ToolResult> {
    if !input.is_object() {
        return Err(ToolResult::err(format!("Invalid input for {tool}: expected a JSON object")));
    }
    serde_json::from_value(input.clone()).map_err(|e| ToolResult::err(format!("Invalid input for {tool}: {e}")))
}

pub(crate) fn parse_bash(input: &serde_json::Value) -> Result<BashInput, ToolResult> {
    parse("bash", input)
}

/// Runs one of the file tools (everything but bash).
pub fn run_file_tool(ctx: &Ctx, name: &str, input: &serde_json::Value) -> ToolResult {
    let r = match name {
        "read" => parse(name, input).and_then(|i| files::read(&i)),
        "write" => parse(name, input).and_then(|i| files::write(&i)),
        "edit" => parse(name, input).and_then(|i| files::edit(&i)),
        "glob" => parse(name, input).and_then(|i| search::glob(ctx, &i)),
        "grep" => parse(name, input).and_then(|i| search::grep(ctx, &i)),
        "bash" => Err(ToolResult::err("bash runs in the session's shell, not as a file tool")),
        other => Err(ToolResult::err(unknown_tool(other))),
    };
    r.unwrap_or_else(|e| e)
}

pub fn unknown_tool(name: &str) -> String {
    match crate::util::nearest(name, TOOLS.iter().copied()) {
        Some(s) => format!("Unknown tool `{name}` (did you mean `{s}`?); tools: bash, read, write, edit, glob, grep"),
        None => format!("Unknown tool `{name}`; tools: bash, read, write, edit, glob, grep"),
    }
}

/// An absolute path from a tool input; relative paths and NUL bytes are refused.
pub(crate) fn absolute(field: &str, p: &str) -> Result<PathBuf, ToolResult> {
    if p.contains('\0') {
        return Err(ToolResult::err(format!("{field} contains a NUL byte")));
    }
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(ToolResult::err(format!("{field} must be an absolute path, got `{p}`")));
    }
    Ok(path.to_path_buf())
}

/// A search root: absolute, or relative to the context's working directory.
pub(crate) fn search_root(ctx: &Ctx, p: Option<&str>) -> Result<PathBuf, ToolResult> {
    match p {
        None => Ok(ctx.cwd.clone()),
        Some(s) if s.contains('\0') => Err(ToolResult::err("path contains a NUL byte")),
        Some(s) if Path::new(s).is_absolute() => Ok(PathBuf::from(s)),
        Some(s) => Ok(ctx.cwd.join(s)),
    }
}

pub(crate) fn io_error(path: &Path, e: &std::io::Error) -> ToolResult {
    let what = match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    };
    ToolResult::err(format!("{}: {what}", path.display()))
}

#[cfg(test)]
mod tests;
