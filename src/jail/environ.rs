//! Step 4b: the jailed command's environment, rebuilt from scratch.
//!
//! Nothing of Stockade's own environment passes unless the policy names it in `env.pass`, and a
//! name that looks like a credential never passes unless `env.allow_secrets` names it too. The
//! policy validator already refuses such names in the policy; this is the runtime guard for
//! `--env` and for values assembled by callers.

use std::collections::BTreeMap;

use super::error::{JailError, Step};
use crate::policy::{is_secret_name, Policy};

pub(crate) fn build(
    policy: &Policy,
    host_env: &[(String, String)],
    extra: &[(String, String)],
) -> Result<Vec<(String, String)>, JailError> {
    let allowed_secret = |k: &str| policy.env.allow_secrets.iter().any(|a| a == k);
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
    env.insert("HOME".into(), "/workspace".into());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("TERM".into(), "dumb".into());
    env.insert("USER".into(), policy.user.name.clone());
    env.insert("LOGNAME".into(), policy.user.name.clone());
    env.insert("HOSTNAME".into(), policy.hostname.clone());
    for name in &policy.env.pass {
        if is_secret_name(name) && !allowed_secret(name) {
            continue;
        }
        if let Some((_, v)) = host_env.iter().find(|(k, _)| k == name) {
            env.insert(name.clone(), v.clone());
        }
    }
    for (k, v) in policy.env.set.iter().chain(extra.iter().map(|(k, v)| (k, v))) {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(JailError::new(Step::Preflight, format!("env: `{k}` is not a valid variable")));
        }
        if is_secret_name(k) && !allowed_secret(k) {
            return Err(JailError::new(
                Step::Preflight,
                format!("env: `{k}` looks like a credential; list it in env.allow_secrets to pass it into a jail"),
            ));
        }
        env.insert(k.clone(), v.clone());
    }
    Ok(env.into_iter().collect())
}

/// Where this process's argument and environment strings live: the blocks the kernel copied to
/// the top of the stack at exec, which /proc/PID/cmdline and /proc/PID/environ show for the
/// process's whole life. Read by the supervisor before the clone; the jail's child, a copy of it,
/// has the same layout and scrubs both first thing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OwnBlocks {
    args: Option<(usize, usize)>,
    env: Option<(usize, usize)>,
}

impl OwnBlocks {
    pub(crate) fn read() -> OwnBlocks {
        OwnBlocks { args: stat_range(45, 46), env: stat_range(47, 48) }
    }
}

/// Wipes this process's own environment: the libc `environ` list, and the original environment
/// block that /proc/PID/environ keeps showing even after `clearenv`. The jail's processes are
/// forks of the supervisor and would otherwise carry its environment — and any key in it — in
/// memory for their whole life. Callers must not hold references into the environment.
pub(crate) fn scrub_own_environment(blocks: &OwnBlocks) {
    // SAFETY: clearenv only resets libc's `environ`; nothing in this single-threaded child reads
    // the environment concurrently.
    unsafe { libc::clearenv() };
    if let Some((start, end)) = blocks.env {
        // SAFETY: [env_start, env_end) is this process's initial environment strings, mapped
        // read-write at the top of its stack by the kernel at exec; after clearenv nothing
        // refers to it, so overwriting it cannot invalidate a live reference.
        unsafe { std::ptr::write_bytes(start as *mut u8, 0, end - start) };
    }
}

/// The name the jail's init (and the helpers forked from it) shows in /proc/PID/cmdline.
pub(crate) const INIT_NAME: &[u8] = b"stockade-init";

/// Overwrites this process's command line — the strings behind /proc/PID/cmdline — with
/// `INIT_NAME`: the jail's init is a copy of the supervisor, whose arguments name host paths
/// (the binary, the policy file, the workspace) that nothing in the jail should learn. Nothing
/// in the child reads its arguments afterwards.
pub(crate) fn scrub_own_arguments(blocks: &OwnBlocks) {
    let Some((start, end)) = blocks.args else { return };
    // SAFETY: [arg_start, arg_end) is this process's argument strings, mapped read-write at the
    // top of its stack by the kernel at exec; the child never reads its arguments again, so
    // overwriting them cannot invalidate a live reference.
    let block = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    block.fill(0);
    let n = INIT_NAME.len().min(block.len().saturating_sub(1));
    block[..n].copy_from_slice(&INIT_NAME[..n]);
}

/// Overwrites every occurrence of `secret` in this process's command line (as an argument of its
/// own or after `=`) with `*`, so that /proc/PID/cmdline stops showing it.
pub(crate) fn wipe_argument(secret: &str) {
    let Some((start, end)) = stat_range(45, 46) else { return };
    if secret.is_empty() {
        return;
    }
    // SAFETY: [arg_start, arg_end) is this process's argument strings, mapped read-write by the
    // kernel at exec; the bytes are overwritten in place with the same length, and the caller
    // holds its own copy of the value.
    let block = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let needle = secret.as_bytes();
    let mut i = 0;
    while i + needle.len() <= block.len() {
        if &block[i..i + needle.len()] == needle {
            block[i..i + needle.len()].fill(b'*');
            i += needle.len();
        } else {
            i += 1;
        }
    }
}

/// Two address fields of /proc/self/stat, by index after the command name (arg_start and
/// arg_end are 45 and 46, env_start and env_end 47 and 48).
fn stat_range(a: usize, b: usize) -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (start, end) = (f.get(a)?.parse::<usize>().ok()?, f.get(b)?.parse::<usize>().ok()?);
    (start != 0 && end > start && end - start < (1 << 24)).then_some((start, end))
}

/// Removes `names` from this process's environment: from libc's list and, value bytes zeroed,
/// from the original block behind /proc/PID/environ. Unlike `scrub_own_environment` it keeps
/// everything else (PATH, proxies, RUST_LOG) — for the worker, which lives on with its
/// environment. Call it while the process is still single-threaded.
pub fn scrub_variables(names: &[&str]) {
    for n in names {
        // SAFETY: documented precondition: no other thread exists yet that could read the
        // environment concurrently.
        unsafe { std::env::remove_var(n) };
    }
    let Some((start, end)) = stat_range(47, 48) else { return };
    // SAFETY: [env_start, env_end) is this process's initial environment block, mapped
    // read-write by the kernel at exec; libc's environ no longer points at the entries removed
    // above, and only those entries' bytes are overwritten.
    let block = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let mut i = 0;
    while i < block.len() {
        let len = block[i..].iter().position(|&b| b == 0).unwrap_or(block.len() - i);
        let entry = &block[i..i + len];
        if names.iter().any(|n| entry.len() > n.len() && entry.starts_with(n.as_bytes()) && entry[n.len()] == b'=') {
            block[i..i + len].fill(0);
        }
        i += len + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_builtin;

    #[test]
    fn secrets_never_pass_and_extra_secret_is_refused() {
        let (mut p, _) = load_builtin("default").unwrap();
        p.env.pass.push("ANTHROPIC_ENVIRONMENT_KEY".into());
        let host = vec![
            ("ANTHROPIC_ENVIRONMENT_KEY".to_string(), "sk-secret".to_string()),
            ("TERM".to_string(), "xterm".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let env = build(&p, &host, &[]).unwrap();
        assert!(env.iter().all(|(k, v)| k != "ANTHROPIC_ENVIRONMENT_KEY" && v != "sk-secret"));
        assert!(env.contains(&("TERM".into(), "xterm".into())));
        assert!(env.contains(&("HOME".into(), "/workspace".into())));
        let err = build(&p, &host, &[("GH_TOKEN".into(), "x".into())]).unwrap_err();
        assert!(err.msg.contains("GH_TOKEN"), "{err}");
    }
}
