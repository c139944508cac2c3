//! Tool inputs, checked as the official runner checks them.
//!
//! The reference tools are Python functions behind pydantic's `validate_call` (lax mode): a
//! string of digits is an int, `"yes"` is a bool, an unknown key is an error. Any input it would
//! refuse gets its one answer, `ValueError('Invalid arguments for function NAME')`; an input
//! that is not an object gets `TypeError('Input must be a dictionary, got TYPE')`.

use serde_json::{Map, Value};

use super::ToolResult;

pub(super) struct ReadInput {
    pub file_path: String,
    pub view_range: Option<Vec<i64>>,
}

pub(super) struct WriteInput {
    pub file_path: String,
    pub content: String,
}

pub(super) struct EditInput {
    pub file_path: String,
    pub old_string: String,
    pub new_string: String,
    pub replace_all: bool,
}

pub(super) struct GlobInput {
    pub pattern: String,
    pub path: Option<String>,
}

pub(super) struct GrepInput {
    pub pattern: String,
    pub path: Option<String>,
}

#[derive(Debug, Default)]
pub struct BashInput {
    pub command: Option<String>,
    pub restart: bool,
    pub timeout_ms: Option<i64>,
}

type Res<T> = Result<T, ToolResult>;

fn invalid(tool: &str) -> ToolResult {
    ToolResult::err(format!("ValueError('Invalid arguments for function {tool}')"))
}

/// The name Python gives the type of a JSON value.
fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// The object, with only `allowed` keys.
fn object<'a>(tool: &str, v: &'a Value, allowed: &[&str]) -> Res<&'a Map<String, Value>> {
    let Value::Object(m) = v else {
        return Err(ToolResult::err(format!("TypeError('Input must be a dictionary, got {}')", py_type(v))));
    };
    if m.keys().any(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(tool));
    }
    Ok(m)
}

fn req_str(tool: &str, m: &Map<String, Value>, k: &str) -> Res<String> {
    match m.get(k) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(invalid(tool)),
    }
}

fn opt_str(tool: &str, m: &Map<String, Value>, k: &str) -> Res<Option<String>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        _ => Err(invalid(tool)),
    }
}

/// An int as pydantic's lax mode takes one: an integer, a bool, a float without a fraction, or
/// a string of one (sign, digits with single underscores between them, `.0…` allowed).
fn lax_int(v: &Value) -> Option<i64> {
    match v {
        Value::Bool(b) => Some(*b as i64),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i)
            } else if n.as_u64().is_some() {
                Some(i64::MAX)
            } else {
                let f = n.as_f64()?;
                (f.is_finite() && f.fract() == 0.0).then(|| f.clamp(i64::MIN as f64, i64::MAX as f64) as i64)
            }
        }
        Value::String(s) => int_str(s.trim()),
        _ => None,
    }
}

fn int_str(s: &str) -> Option<i64> {
    let (neg, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = match rest.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (rest, None),
    };
    if let Some(f) = frac {
        if !f.bytes().all(|b| b == b'0') {
            return None;
        }
    }
    if int.is_empty() || int.starts_with('_') || int.ends_with('_') || int.contains("__") {
        return None;
    }
    let mut n: i64 = 0;
    for b in int.bytes().filter(|b| *b != b'_') {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.saturating_mul(10).saturating_add((b - b'0') as i64);
    }
    Some(if neg { -n } else { n })
}

fn lax_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => {
            let x = n.as_f64()?;
            if x == 0.0 {
                Some(false)
            } else if x == 1.0 {
                Some(true)
            } else {
                None
            }
        }
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
            _ => None,
        },
        _ => None,
    }
}

fn opt<T>(tool: &str, m: &Map<String, Value>, k: &str, f: impl Fn(&Value) -> Option<T>) -> Res<Option<T>> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => f(v).map(Some).ok_or_else(|| invalid(tool)),
    }
}

pub(super) fn read(v: &Value) -> Res<ReadInput> {
    let m = object("read", v, &["file_path", "view_range"])?;
    let view_range = opt("read", m, "view_range", |v| match v {
        Value::Array(a) => a.iter().map(lax_int).collect::<Option<Vec<i64>>>(),
        _ => None,
    })?;
    Ok(ReadInput { file_path: req_str("read", m, "file_path")?, view_range })
}

pub(super) fn write(v: &Value) -> Res<WriteInput> {
    let m = object("write", v, &["file_path", "content"])?;
    Ok(WriteInput { file_path: req_str("write", m, "file_path")?, content: req_str("write", m, "content")? })
}

pub(super) fn edit(v: &Value) -> Res<EditInput> {
    let m = object("edit", v, &["file_path", "old_string", "new_string", "replace_all"])?;
    Ok(EditInput {
        file_path: req_str("edit", m, "file_path")?,
        old_string: req_str("edit", m, "old_string")?,
        new_string: req_str("edit", m, "new_string")?,
        replace_all: opt("edit", m, "replace_all", lax_bool)?.unwrap_or(false),
    })
}

pub(super) fn glob(v: &Value) -> Res<GlobInput> {
    let m = object("glob", v, &["pattern", "path"])?;
    Ok(GlobInput { pattern: req_str("glob", m, "pattern")?, path: opt_str("glob", m, "path")? })
}

pub(super) fn grep(v: &Value) -> Res<GrepInput> {
    let m = object("grep", v, &["pattern", "path"])?;
    Ok(GrepInput { pattern: req_str("grep", m, "pattern")?, path: opt_str("grep", m, "path")? })
}

pub(super) fn bash(v: &Value) -> Res<BashInput> {
    let m = object("bash", v, &["command", "restart", "timeout_ms"])?;
    Ok(BashInput {
        command: opt_str("bash", m, "command")?,
        restart: opt("bash", m, "restart", lax_bool)?.unwrap_or(false),
        timeout_ms: opt("bash", m, "timeout_ms", lax_int)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lax_values_are_taken_as_pydantic_takes_them() {
        for (v, want) in [
            (json!(true), Some(1)),
            (json!("5"), Some(5)),
            (json!(" 5 "), Some(5)),
            (json!("5.0"), Some(5)),
            (json!(5.5), None),
            (json!(1000.0), Some(1000)),
            (json!("1_000"), Some(1000)),
            (json!("+5"), Some(5)),
            (json!("-5"), Some(-5)),
            (json!("0x10"), None),
            (json!("1__0"), None),
            (json!([1]), None),
        ] {
            assert_eq!(lax_int(&v), want, "{v}");
        }
        for (v, want) in [
            (json!(1), Some(true)),
            (json!(2), None),
            (json!("YES"), Some(true)),
            (json!(" true"), None),
            (json!(0.0), Some(false)),
            (json!("off"), Some(false)),
        ] {
            assert_eq!(lax_bool(&v), want, "{v}");
        }
    }

    #[test]
    fn unknown_keys_wrong_types_and_non_objects_are_refused_as_the_reference_does() {
        let text = |r: Res<ReadInput>| r.err().map(|e| e.text_content());
        assert_eq!(
            text(read(&json!({"file_path": "a", "offset": 3}))).as_deref(),
            Some("ValueError('Invalid arguments for function read')")
        );
        assert_eq!(
            text(read(&json!({"file_path": 5}))).as_deref(),
            Some("ValueError('Invalid arguments for function read')")
        );
        assert_eq!(text(read(&json!([1]))).as_deref(), Some("TypeError('Input must be a dictionary, got list')"));
        let r = read(&json!({"file_path": "a", "view_range": ["1", true]})).ok().unwrap();
        assert_eq!(r.view_range, Some(vec![1, 1]));
    }
}
