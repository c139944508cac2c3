//! Narrowing a policy for one session: session metadata may ask for less (no network, lower
//! limits, a read-only workspace) but never for more. A request for more than the operator's
//! policy allows keeps the policy's value; a request Stockade does not understand is an error,
//! so that a typo cannot silently leave a session less confined than its owner meant.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::{Access, Dur, NetMode, Policy, Size};
use crate::util::{format_duration, format_size, parse_duration, parse_size};

/// The work item metadata key that carries a `Narrowing` (INFERRED: a Stockade convention, not
/// part of the Managed Agents API).
pub(crate) const METADATA_KEY: &str = "stockade_narrow";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Narrowing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<Access>,
}

impl Narrowing {
    pub fn from_json(v: &serde_json::Value) -> Result<Narrowing, NarrowError> {
        serde_json::from_value(v.clone()).map_err(|e| NarrowError { field: None, reason: e.to_string() })
    }
}

/// A narrowing request that cannot be applied, naming the metadata field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metadata {METADATA_KEY}{}: {reason}", field.map(|f| format!(".{f}")).unwrap_or_default())]
pub struct NarrowError {
    pub field: Option<&'static str>,
    pub reason: String,
}

/// The smaller of a limit and a request, where `None` is unlimited.
fn tighter<T: PartialOrd + Copy>(cur: Option<T>, req: T) -> (Option<T>, bool) {
    match cur {
        Some(c) if c <= req => (Some(c), req > c),
        _ => (Some(req), false),
    }
}

/// Applies `n` to `p`. Returns notes on requests that asked for more than the policy allows
/// (those keep the policy's value).
pub fn apply(p: &mut Policy, n: &Narrowing) -> Result<Vec<String>, NarrowError> {
    let mut kept = Vec::new();
    let field = |f: &'static str, reason: String| NarrowError { field: Some(f), reason };
    if let Some(m) = n.network {
        if m > p.network.mode {
            kept.push(format!(
                "network {} asked, policy allows only {}",
                crate::policy::spelling(&m),
                crate::policy::spelling(&p.network.mode)
            ));
        } else {
            p.network.mode = m;
        }
    }
    if let Some(s) = &n.memory {
        let req = parse_size(s).map_err(|e| field("memory", e.to_string()))?;
        let (v, wider) = tighter(p.limits.memory.map(|m| m.0), req);
        if wider {
            kept.push(format!("memory {s} asked, policy allows {}", format_size(v.unwrap_or(0))));
        }
        p.limits.memory = v.map(Size);
    }
    if let Some(req) = n.pids {
        if req == 0 {
            return Err(field("pids", "must be at least 1".into()));
        }
        let (v, wider) = tighter(p.limits.pids, req);
        if wider {
            kept.push(format!("pids {req} asked, policy allows {}", v.unwrap_or(0)));
        }
        p.limits.pids = v;
    }
    if let Some(req) = n.cpu {
        if !(req.is_finite() && req > 0.0) {
            return Err(field("cpu", format!("{req} is not a positive number of CPUs")));
        }
        let (v, wider) = tighter(p.limits.cpu, req);
        if wider {
            kept.push(format!("cpu {req} asked, policy allows {}", v.unwrap_or(0.0)));
        }
        p.limits.cpu = v;
    }
    if let Some(s) = &n.timeout {
        let req = parse_duration(s).map_err(|e| field("timeout", e.to_string()))?;
        if req.is_zero() {
            return Err(field("timeout", "must be greater than zero".into()));
        }
        let (v, wider) = tighter(p.limits.timeout.map(|d| d.0), req);
        if wider {
            kept.push(format!("timeout {s} asked, policy allows {}", format_duration(v.unwrap_or(Duration::ZERO))));
        }
        p.limits.timeout = v.map(Dur);
    }
    if let Some(s) = &n.tmp_size {
        let req = parse_size(s).map_err(|e| field("tmp_size", e.to_string()))?;
        if req > p.limits.tmp_size.0 {
            kept.push(format!("tmp_size {s} asked, policy allows {}", format_size(p.limits.tmp_size.0)));
        } else {
            p.limits.tmp_size = Size(req);
        }
    }
    if n.workspace == Some(Access::ReadOnly) {
        p.filesystem.workspace = Access::ReadOnly;
    } else if n.workspace == Some(Access::ReadWrite) && p.filesystem.workspace == Access::ReadOnly {
        kept.push("workspace read_write asked, policy makes it read_only".into());
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrows_and_never_widens() {
        let (mut p, _) = crate::policy::load_builtin("default").unwrap();
        let before = p.clone();
        let n = Narrowing::from_json(&serde_json::json!({
            "network": "none", "pids": 64, "memory": "64G", "workspace": "read_only", "timeout": "10m"
        }))
        .unwrap();
        let kept = apply(&mut p, &n).unwrap();
        assert_eq!(p.network.mode, NetMode::None);
        assert_eq!(p.limits.pids, Some(64.min(before.limits.pids.unwrap())));
        assert_eq!(p.limits.memory, before.limits.memory, "memory was widened");
        assert_eq!(p.filesystem.workspace, Access::ReadOnly);
        assert!(kept.iter().any(|k| k.starts_with("memory 64G asked")), "{kept:?}");

        let (mut strict, _) = crate::policy::load_builtin("strict").unwrap();
        let s0 = strict.clone();
        let kept = apply(&mut strict, &Narrowing { network: Some(NetMode::Veth), ..Default::default() }).unwrap();
        assert_eq!(strict.network.mode, s0.network.mode);
        // In the policy file's words, as the session's note shows them.
        assert_eq!(kept, ["network veth asked, policy allows only none"]);

        let e = Narrowing::from_json(&serde_json::json!({"netwrok": "none"})).unwrap_err();
        assert!(e.field.is_none() && e.reason.contains("netwrok"), "{e}");
        let e = apply(&mut p, &Narrowing { memory: Some("lots".into()), ..Default::default() }).unwrap_err();
        assert_eq!(e.field, Some("memory"));
        assert!(e.to_string().starts_with("metadata stockade_narrow.memory: "), "{e}");
    }

    #[test]
    fn a_timeout_too_large_to_represent_is_refused_not_a_crash() {
        let (mut p, _) = crate::policy::load_builtin("default").unwrap();
        let before = p.clone();
        for t in ["18446744073709551615s1s", "999999999999999999d"] {
            let n = Narrowing::from_json(&serde_json::json!({ "timeout": t })).unwrap();
            let e = apply(&mut p, &n).unwrap_err();
            assert_eq!(e.field, Some("timeout"));
            assert_eq!(e.to_string(), format!("metadata stockade_narrow.timeout: duration `{t}` out of range"));
        }
        assert_eq!(p.limits.timeout, before.limits.timeout);
    }
}
