//! Typed jail-construction errors. Every failure names the step that failed, so an operator sees
//! `landlock: kernel ABI 3 < required 6` rather than a bare errno.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Preflight,
    Terminal,
    Workspace,
    Namespaces,
    IdMap,
    Cgroups,
    Mounts,
    Hostname,
    Network,
    Rlimits,
    Capabilities,
    Landlock,
    Seccomp,
    Exec,
    Supervise,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::Terminal => "terminal",
            Step::Workspace => "workspace",
            Step::Namespaces => "namespaces",
            Step::IdMap => "uid/gid map",
            Step::Cgroups => "cgroups",
            Step::Mounts => "mounts",
            Step::Hostname => "hostname",
            Step::Network => "network",
            Step::Rlimits => "rlimits",
            Step::Capabilities => "capabilities",
            Step::Landlock => "landlock",
            Step::Seccomp => "seccomp",
            Step::Exec => "exec",
            Step::Supervise => "supervise",
        }
    }

    pub(crate) fn from_name(s: &str) -> Step {
        const ALL: [Step; 15] = [
            Step::Preflight,
            Step::Terminal,
            Step::Workspace,
            Step::Namespaces,
            Step::IdMap,
            Step::Cgroups,
            Step::Mounts,
            Step::Hostname,
            Step::Network,
            Step::Rlimits,
            Step::Capabilities,
            Step::Landlock,
            Step::Seccomp,
            Step::Exec,
            Step::Supervise,
        ];
        ALL.into_iter().find(|st| st.name() == s).unwrap_or(Step::Supervise)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{step}: {msg}")]
pub struct JailError {
    pub step: Step,
    pub msg: String,
    /// For exec failures: the errno, which decides between exit codes 126 and 127.
    pub errno: Option<i32>,
}

impl JailError {
    pub fn new(step: Step, msg: impl Into<String>) -> Self {
        JailError { step, msg: msg.into(), errno: None }
    }
}

impl From<crate::net::NetError> for JailError {
    /// A failure of the session's network: the network step, the errno kept.
    fn from(e: crate::net::NetError) -> JailError {
        JailError { step: Step::Network, errno: e.errno(), msg: e.to_string() }
    }
}

/// Attaches a step and a description to any displayable error.
pub(crate) trait StepExt<T> {
    fn step(self, step: Step, what: impl FnOnce() -> String) -> Result<T, JailError>;
}

impl<T, E: fmt::Display> StepExt<T> for Result<T, E> {
    fn step(self, step: Step, what: impl FnOnce() -> String) -> Result<T, JailError> {
        self.map_err(|e| JailError::new(step, format!("{}: {e}", what())))
    }
}
