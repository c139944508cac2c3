//! The agent toolset `agent_toolset_20260401`: bash, read, write, edit, glob, grep.
//!
//! Every answer is the one the official runner gives (the reference implementation in the
//! Python SDK, `anthropic/lib/tools/agent_toolset.py`): the same content blocks, the same
//! `is_error`, the same limits and messages, byte for byte. The places where Stockade answers
//! differently on purpose are listed in the README ("Sessions and the six tools") and, as known
//! divergences, in the differential suite (`tests/sdk/test_toolset_differential.py`).
//!
//! The file tools are plain functions of their input and a working directory. In a session they
//! run *inside* the jail, in a helper process under the jail's landlock and seccomp rules, so the
//! kernel resolves every path under the jail's mounts; tests and benchmarks call the same
//! functions directly. Every outcome, including a malformed or hostile input, is a `ToolResult`.

pub mod bash;
mod files;
pub(crate) mod format;
mod glob;
mod grep;
mod input;
mod paths;
pub(crate) mod pyfmt;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One block of a tool result, as the Sessions API carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text { text: String },
    Image { source: Source },
    Document { source: Source },
}

impl Block {
    /// Bytes of the block's payload: its text, or its base64 data.
    pub fn size(&self) -> usize {
        match self {
            Block::Text { text } => text.len(),
            Block::Image { source } | Block::Document { source } => source.data.len(),
        }
    }
}

/// The base64 source of an image or document block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    #[serde(rename = "type")]
    pub kind: String,
    pub media_type: String,
    pub data: String,
}

/// What every tool call returns: content blocks and whether the call failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolResult {
    pub content: Vec<Block>,
    pub is_error: bool,
}

/// The text the official runner puts where a tool returned nothing.
pub(crate) const NO_OUTPUT: &str = "(no output)";

impl ToolResult {
    /// A text result. An empty text reads `(no output)`, as the official runner sends it.
    pub fn text(text: impl Into<String>, is_error: bool) -> Self {
        let mut text = text.into();
        if text.is_empty() {
            text = NO_OUTPUT.to_owned();
        }
        ToolResult { content: vec![Block::Text { text }], is_error }
    }
    pub fn ok(text: impl Into<String>) -> Self {
        Self::text(text, false)
    }
    pub fn err(text: impl Into<String>) -> Self {
        Self::text(text, true)
    }

    /// The text blocks joined, for logs and tests; other blocks show as `[image]`/`[document]`.
    pub fn text_content(&self) -> String {
        self.content
            .iter()
            .map(|b| match b {
                Block::Text { text } => text.as_str(),
                Block::Image { .. } => "[image]",
                Block::Document { .. } => "[document]",
            })
            .collect::<Vec<_>>()
            .join("")
    }

    /// The bytes the content takes on the wire, as JSON.
    pub fn wire_len(&self) -> usize {
        serde_json::to_vec(&self.content).map(|v| v.len()).unwrap_or(0)
    }
}

/// The six tool names.
pub(crate) const TOOLS: &[&str] = &["bash", "read", "write", "edit", "glob", "grep"];

/// How the file tools treat paths.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Where relative paths resolve (`/workspace` in a jail).
    pub cwd: PathBuf,
    /// Refuse paths that resolve outside `cwd`, exactly as the official runner does. Off in a
    /// jail by default: there the jail's mounts and landlock rules are the boundary.
    pub confine: bool,
    /// The directories in which `bash` saved the whole of a long output, one per live shell:
    /// `read` and `grep` may open them even under `confine`, and `write` and `edit` refuse them,
    /// as the official tools do.
    pub saved_outputs: Vec<PathBuf>,
    /// Memory store folders: reachable under `confine` too; `write` and `edit` refuse the
    /// read-only ones and leave the others to the caller (`FileAnswer::Memory`), as the official
    /// tools leave them to the worker, which saves a change to its store before the file.
    pub memory: Vec<crate::policy::MemoryMount>,
}

impl Ctx {
    /// The tools' context for a working directory, with no saved bash output yet.
    pub fn new(cwd: impl Into<PathBuf>, confine: bool) -> Ctx {
        Ctx { cwd: cwd.into(), confine, saved_outputs: Vec::new(), memory: Vec::new() }
    }
}

/// A change to a file in a memory store's folder, computed by `write` or `edit` and not made:
/// whoever runs the tools saves it to the store, writes the file and answers the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryWrite {
    /// The file, resolved (in the jail's view).
    pub path: PathBuf,
    pub content: String,
    /// For `edit`: the text the file must still hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacing: Option<String>,
    /// `write` or `edit`, and the path as the call gave it, for the error text.
    pub op: String,
    pub file_path: String,
    /// The call's answer once the change is made.
    pub done: String,
}

/// What a file tool comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileAnswer {
    Done(ToolResult),
    Memory(MemoryWrite),
}

/// Runs one of the file tools (everything but bash).
pub fn run_file_tool(ctx: &Ctx, name: &str, input: &serde_json::Value) -> ToolResult {
    match answer_file_tool(ctx, name, input) {
        FileAnswer::Done(r) => r,
        FileAnswer::Memory(m) => ToolResult::err(format!("{}: {}: no memory store to save it to", m.op, m.file_path)),
    }
}

/// Runs one of the file tools; a change to a memory store's file comes back unmade.
pub fn answer_file_tool(ctx: &Ctx, name: &str, input: &serde_json::Value) -> FileAnswer {
    let done = |r: Result<ToolResult, ToolResult>| FileAnswer::Done(r.unwrap_or_else(|e| e));
    let changed = |r: Result<FileAnswer, ToolResult>| r.unwrap_or_else(FileAnswer::Done);
    match name {
        "read" => done(input::read(input).and_then(|i| files::read(ctx, &i))),
        "write" => changed(input::write(input).and_then(|i| files::write(ctx, &i))),
        "edit" => changed(input::edit(input).and_then(|i| files::edit(ctx, &i))),
        "glob" => done(input::glob(input).and_then(|i| glob::glob(ctx, &i))),
        "grep" => done(input::grep(input).and_then(|i| grep::grep(ctx, &i))),
        "bash" => done(Err(ToolResult::err("bash runs in the session's shell, not as a file tool"))),
        other => done(Err(ToolResult::err(unknown_tool(other)))),
    }
}

/// The official runner's answer for a call it stopped: the session no longer waits on it, or
/// the runner is stopping.
pub(crate) fn stopped(name: &str) -> String {
    format!("tool {} was stopped, and may have already done some or all of its work", pyfmt::repr(name))
}

pub(crate) fn unknown_tool(name: &str) -> String {
    match crate::util::nearest(name, TOOLS.iter().copied()) {
        Some(s) => format!("Unknown tool `{name}` (did you mean `{s}`?); tools: bash, read, write, edit, glob, grep"),
        None => format!("Unknown tool `{name}`; tools: bash, read, write, edit, glob, grep"),
    }
}

pub use input::BashInput;

#[cfg(test)]
mod tests;
