//! Step 5a: per-process resource limits from the policy. Core dumps are always off: a core file
//! of a process that held a secret is a secret on disk.

use nix::sys::resource::{setrlimit, Resource};

use super::error::{JailError, Step, StepExt};
use crate::policy::Limits;

pub(crate) fn apply(l: &Limits) -> Result<(), JailError> {
    let set = |res: Resource, name: &str, v: u64| setrlimit(res, v, v).step(Step::Rlimits, || format!("{name}={v}"));
    set(Resource::RLIMIT_CORE, "core", 0)?;
    if let Some(n) = l.nofile {
        set(Resource::RLIMIT_NOFILE, "nofile", n)?;
    }
    if let Some(n) = l.nproc {
        set(Resource::RLIMIT_NPROC, "nproc", n)?;
    }
    if let Some(s) = l.fsize {
        set(Resource::RLIMIT_FSIZE, "fsize", s.0)?;
    }
    if let Some(s) = l.address_space {
        set(Resource::RLIMIT_AS, "as", s.0)?;
    }
    Ok(())
}
