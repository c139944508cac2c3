//! Reading policy layers, following `extends`, merging, and turning the result into a `Policy`.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Spanned;

use super::types::*;
use super::{builtin_text, syscalls, PolicyError};
use crate::util::{format_size, nearest, parse_duration, parse_size};

/// Where a field was written: file, line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    pub file: String,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// Field path (`limits.memory`) → where its effective value was last written.
pub type Origins = BTreeMap<String, Origin>;

struct Source<'a> {
    name: String,
    text: &'a str,
    /// Byte offset of each line's first character: every field of a policy asks for its origin,
    /// and rescanning the text from the start for each made loading quadratic.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(name: String, text: &'a str) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Source { name, text, line_starts }
    }

    fn origin(&self, offset: usize) -> Origin {
        let offset = offset.min(self.text.len());
        // The last line starting at or before the offset (line_starts[0] == 0, so never 0 here).
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let col = self.text[self.line_starts[line - 1]..offset].chars().count() + 1;
        Origin { file: self.name.clone(), line, col }
    }
    fn whole(&self) -> Origin {
        Origin { file: self.name.clone(), line: 1, col: 1 }
    }
}

/// A number or a string, for sizes (`"1G"` or `1073741824`) and durations (`"30m"` or `1800`).
#[derive(Debug, Clone)]
pub(crate) enum NumOrStr {
    Num(u64),
    Str(String),
}

impl<'de> Deserialize<'de> for NumOrStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NumOrStr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or a string with a unit such as \"512M\" or \"30m\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NumOrStr, E> {
                u64::try_from(v).map(NumOrStr::Num).map_err(|_| E::custom("must not be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NumOrStr, E> {
                Ok(NumOrStr::Num(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NumOrStr, E> {
                Ok(NumOrStr::Str(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A number, or `"none"` for no limit: how a policy lifts a limit the one it extends sets.
#[derive(Debug, Clone)]
pub(crate) struct OrNone<T>(Option<T>);

impl<'de, T: de::DeserializeOwned> Deserialize<'de> for OrNone<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = toml::Value::deserialize(d)?;
        if v.as_str() == Some("none") {
            return Ok(OrNone(None));
        }
        T::deserialize(v)
            .map(|t| OrNone(Some(t)))
            .map_err(|e| de::Error::custom(format!("{}, or \"none\"", e.to_string().trim_end())))
    }
}

/// Declares a policy section twice: as written in one file (`$layer`, every field optional and
/// spanned, `X_add`/`X_remove` beside every list `X`) and as merged across files (`$raw`).
macro_rules! section {
    ($sect:literal, $layer:ident => $raw:ident {
        scalars { $($s:ident : $st:ty),* $(,)? }
        lists { $($l:ident / $la:ident / $lr:ident : $lt:ty),* $(,)? }
        maps { $($mp:ident : $mt:ty),* $(,)? }
    }) => {
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $layer {
            $( $s: Option<Spanned<$st>>, )*
            $( $l: Option<Spanned<Vec<$lt>>>, $la: Option<Spanned<Vec<$lt>>>, $lr: Option<Spanned<Vec<$lt>>>, )*
            $( $mp: Option<Spanned<BTreeMap<String, $mt>>>, )*
        }

        #[derive(Debug, Default, Clone)]
        pub(crate) struct $raw {
            $( pub $s: Option<$st>, )*
            $( pub $l: Option<Vec<$lt>>, )*
            $( pub $mp: BTreeMap<String, $mt>, )*
        }

        impl $layer {
            #[allow(unused_variables)]
            fn merge(self, into: &mut $raw, o: &mut Origins, src: &Source) -> Result<(), PolicyError> {
                $(
                    if let Some(v) = self.$s {
                        o.insert(concat!($sect, stringify!($s)).into(), src.origin(v.span().start));
                        into.$s = Some(v.into_inner());
                    }
                )*
                $(
                    let key: String = concat!($sect, stringify!($l)).into();
                    if let Some(v) = self.$l {
                        o.insert(key.clone(), src.origin(v.span().start));
                        into.$l = Some(v.into_inner());
                    }
                    if let Some(v) = self.$la {
                        o.insert(key.clone(), src.origin(v.span().start));
                        let list = into.$l.get_or_insert_with(Vec::new);
                        for x in v.into_inner() {
                            if !list.contains(&x) {
                                list.push(x);
                            }
                        }
                    }
                    if let Some(v) = self.$lr {
                        let at = src.origin(v.span().start);
                        o.insert(key.clone(), at.clone());
                        let rm = v.into_inner();
                        let list = into.$l.get_or_insert_with(Vec::new);
                        // Removing what is not there is a typo, not a no-op: it would leave in
                        // place what the author meant to take out.
                        if let Some(x) = rm.iter().find(|x| !list.contains(x)) {
                            return Err(not_in_list(&at, concat!($sect, stringify!($lr)), &key, x, list));
                        }
                        list.retain(|x| !rm.contains(x));
                    }
                )*
                $(
                    if let Some(v) = self.$mp {
                        o.insert(concat!($sect, stringify!($mp)).into(), src.origin(v.span().start));
                        into.$mp.extend(v.into_inner());
                    }
                )*
                Ok(())
            }
        }
    };
}

/// `X_remove` naming an entry `X` does not hold, with the nearest entry it does.
fn not_in_list<T: std::fmt::Display>(at: &Origin, field: &str, list_key: &str, x: &T, list: &[T]) -> PolicyError {
    let names: Vec<String> = list.iter().map(|v| v.to_string()).collect();
    let x = x.to_string();
    let hint = match nearest(&x, names.iter().map(String::as_str)) {
        Some(n) => format!(" (did you mean `{n}`?)"),
        None if names.is_empty() => format!(" ({list_key} is empty here)"),
        None => String::new(),
    };
    PolicyError::invalid(at, format!("{field}: `{x}` is not in {list_key}{hint}"))
}

section!("user.", UserLayer => UserRaw {
    scalars { uid: u32, gid: u32, name: String, host_id_base: u32 }
    lists {}
    maps {}
});
section!("filesystem.", FsLayer => FsRaw {
    scalars { rootfs: String, sys: SysModeW, workspace: AccessW }
    lists {
        read_only / read_only_add / read_only_remove: String,
        read_write / read_write_add / read_write_remove: String,
        etc / etc_add / etc_remove: String,
    }
    maps {}
});
section!("env.", EnvLayer => EnvRaw {
    scalars {}
    lists {
        pass / pass_add / pass_remove: String,
        allow_secrets / allow_secrets_add / allow_secrets_remove: String,
    }
    maps { set: String }
});
section!("limits.", LimitsLayer => LimitsRaw {
    scalars {
        memory: NumOrStr, pids: OrNone<u64>, cpu: OrNone<f64>, nofile: OrNone<u64>, nproc: OrNone<u64>, fsize: NumOrStr,
        address_space: NumOrStr, tmp_size: NumOrStr, timeout: NumOrStr, enforcement: EnforcementW,
        workspace_size: NumOrStr, outputs_size: NumOrStr,
    }
    lists {}
    maps {}
});
section!("network.", NetLayer => NetRaw {
    scalars { mode: NetModeW, pool: String, on_deny: OnDenyW }
    lists {
        allow / allow_add / allow_remove: String,
        allow_domains / allow_domains_add / allow_domains_remove: String,
        upstream_dns / upstream_dns_add / upstream_dns_remove: String,
    }
    maps {}
});
section!("landlock.", LandlockLayer => LandlockRaw {
    scalars { compatibility: CompatibilityW }
    lists {
        tcp_bind / tcp_bind_add / tcp_bind_remove: u16,
        tcp_connect / tcp_connect_add / tcp_connect_remove: u16,
    }
    maps {}
});
section!("tools.", ToolsLayer => ToolsRaw {
    scalars { confine_paths: bool }
    lists {}
    maps {}
});
section!("trail.", TrailLayer => TrailRaw {
    scalars { exec: bool, argv_max: u64, input_max: u64, max_size: NumOrStr, max_rate: NumOrStr, on_full: OnFullW }
    lists {
        redact / redact_add / redact_remove: String,
        ship / ship_add / ship_remove: String,
    }
    maps {}
});
section!("retention.", RetentionLayer => RetentionRaw {
    scalars { outputs: NumOrStr, workspaces: NumOrStr, trails: NumOrStr }
    lists {}
    maps {}
});
section!("provision.", ProvisionLayer => ProvisionRaw {
    scalars { git_url_key: String, git_ref_key: String, copy_key: String, credentials: String, timeout: NumOrStr }
    lists {
        git_allow / git_allow_add / git_allow_remove: String,
        allow / allow_add / allow_remove: String,
        allow_domains / allow_domains_add / allow_domains_remove: String,
    }
    maps { copy_from: String }
});
section!("seccomp.", SeccompLayer => SeccompRaw {
    scalars { default_action: SeccompActionW }
    lists {
        allow / allow_add / allow_remove: String,
        deny / deny_add / deny_remove: String,
        socket_families / socket_families_add / socket_families_remove: String,
    }
    maps {}
});
section!("capabilities.", CapsLayer => CapsRaw {
    scalars {}
    lists { keep / keep_add / keep_remove: String }
    maps {}
});

// Enum fields as written in TOML; serde's "unknown variant" error lists the valid ones.
macro_rules! wire_enum {
    ($w:ident => $t:ident { $($v:ident = $s:literal),* }) => {
        #[derive(Debug, Clone, Copy, Deserialize)]
        pub(crate) enum $w { $( #[serde(rename = $s)] $v ),* }
        impl From<$w> for $t {
            fn from(w: $w) -> $t { match w { $( $w::$v => $t::$v ),* } }
        }
    };
}
wire_enum!(SysModeW => SysMode { None = "none", ReadOnly = "read_only" });
wire_enum!(AccessW => Access { ReadWrite = "read_write", ReadOnly = "read_only" });
wire_enum!(EnforcementW => Enforcement { Hard = "hard", BestEffort = "best_effort" });
wire_enum!(NetModeW => NetMode { None = "none", Loopback = "loopback", Veth = "veth" });
wire_enum!(OnDenyW => OnDeny { Reject = "reject", Drop = "drop" });
wire_enum!(CompatibilityW => Compatibility { Hard = "hard", BestEffort = "best_effort" });
wire_enum!(OnFullW => OnFull { Truncate = "truncate", Fail = "fail" });
wire_enum!(SeccompActionW => SeccompAction { Errno = "errno", Kill = "kill", Log = "log" });

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Layer {
    extends: Option<Spanned<String>>,
    hostname: Option<Spanned<String>>,
    #[serde(default)]
    user: UserLayer,
    #[serde(default)]
    filesystem: FsLayer,
    #[serde(default)]
    env: EnvLayer,
    #[serde(default)]
    limits: LimitsLayer,
    #[serde(default)]
    network: NetLayer,
    #[serde(default)]
    landlock: LandlockLayer,
    #[serde(default)]
    seccomp: SeccompLayer,
    #[serde(default)]
    capabilities: CapsLayer,
    #[serde(default)]
    tools: ToolsLayer,
    #[serde(default)]
    trail: TrailLayer,
    #[serde(default)]
    retention: RetentionLayer,
    #[serde(default)]
    provision: ProvisionLayer,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Raw {
    hostname: Option<String>,
    user: UserRaw,
    filesystem: FsRaw,
    env: EnvRaw,
    limits: LimitsRaw,
    network: NetRaw,
    landlock: LandlockRaw,
    seccomp: SeccompRaw,
    capabilities: CapsRaw,
    tools: ToolsRaw,
    trail: TrailRaw,
    retention: RetentionRaw,
    provision: ProvisionRaw,
}

fn parse_layer(src: &Source) -> Result<Layer, PolicyError> {
    toml::from_str::<Layer>(src.text).map_err(|e| {
        let at = e.span().map_or_else(|| src.whole(), |s| src.origin(s.start));
        PolicyError::Invalid { at, msg: explain_toml_error(e.message()) }
    })
}

/// serde reports unknown fields and variants with the list of valid names; add the nearest one.
fn explain_toml_error(msg: &str) -> String {
    let msg = msg.trim_end();
    for kind in ["unknown field `", "unknown variant `"] {
        if let Some(rest) = msg.strip_prefix(kind) {
            let Some((word, tail)) = rest.split_once('`') else {
                break;
            };
            let known: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            if let Some(s) = nearest(word, known.iter().copied()) {
                return format!("{msg} (did you mean `{s}`?)");
            }
        }
    }
    msg.to_owned()
}

/// Resolves a layer and everything it extends, oldest first, into `raw`.
fn resolve_into(
    src: &Source,
    dir: Option<&Path>,
    chain: &mut Vec<String>,
    raw: &mut Raw,
    origins: &mut Origins,
    bare: &mut Vec<String>,
) -> Result<(), PolicyError> {
    if chain.contains(&src.name) {
        chain.push(src.name.clone());
        return Err(PolicyError::Cycle(chain.join(" -> ")));
    }
    chain.push(src.name.clone());
    let layer = parse_layer(src)?;
    if layer.extends.is_none() && dir.is_some() {
        bare.push(src.name.clone());
    }
    if let Some(ext) = layer.extends.as_ref().filter(|e| e.get_ref() != "none") {
        let at = src.origin(ext.span().start);
        let name = ext.get_ref();
        let is_path = name.contains('/') || name.ends_with(".toml");
        if !is_path {
            let text =
                builtin_text(name).ok_or_else(|| PolicyError::invalid(&at, unknown_builtin(name).to_string()))?;
            let base = Source::new(format!("builtin:{name}"), text);
            resolve_into(&base, None, chain, raw, origins, bare)?;
        } else {
            let Some(dir) = dir else {
                return Err(PolicyError::invalid(&at, "a built-in policy can only extend built-ins"));
            };
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| PolicyError::invalid(&at, format!("extends `{}`: {e}", path.display())))?;
            let base = Source::new(path.display().to_string(), &text);
            resolve_into(&base, path.parent(), chain, raw, origins, bare)?;
        }
    }
    if let Some(h) = layer.hostname {
        origins.insert("hostname".into(), src.origin(h.span().start));
        raw.hostname = Some(h.into_inner());
    }
    layer.user.merge(&mut raw.user, origins, src)?;
    layer.filesystem.merge(&mut raw.filesystem, origins, src)?;
    layer.env.merge(&mut raw.env, origins, src)?;
    layer.limits.merge(&mut raw.limits, origins, src)?;
    layer.network.merge(&mut raw.network, origins, src)?;
    layer.landlock.merge(&mut raw.landlock, origins, src)?;
    layer.seccomp.merge(&mut raw.seccomp, origins, src)?;
    layer.capabilities.merge(&mut raw.capabilities, origins, src)?;
    layer.tools.merge(&mut raw.tools, origins, src)?;
    layer.trail.merge(&mut raw.trail, origins, src)?;
    layer.retention.merge(&mut raw.retention, origins, src)?;
    layer.provision.merge(&mut raw.provision, origins, src)?;
    chain.pop();
    Ok(())
}

fn unknown_builtin(name: &str) -> PolicyError {
    let hint = nearest(name, super::BUILTINS.iter().map(|(n, _)| *n))
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default();
    PolicyError::UnknownBuiltin { name: name.to_owned(), hint }
}

/// Parses policy text; `name` is used in error messages, `dir` resolves relative `extends`.
pub fn load_str(name: &str, text: &str, dir: Option<&Path>) -> Result<(Policy, Origins), PolicyError> {
    let src = Source::new(name.to_owned(), text);
    let mut raw = Raw::default();
    let mut origins = Origins::new();
    let mut bare = Vec::new();
    resolve_into(&src, dir, &mut Vec::new(), &mut raw, &mut origins, &mut bare)?;
    let policy = finish(name, raw, &origins)?;
    // Said once the policy is known to be good: a broken one gets its error alone.
    for file in bare {
        tracing::warn!(
            policy = %file,
            "the policy has no `extends`: it starts from an empty, unlimited policy; write `extends = \"default\"` \
             (or another base), or `extends = \"none\"` if that is the intent"
        );
    }
    Ok((policy, origins))
}

pub fn load_file(path: &Path) -> Result<(Policy, Origins), PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.to_owned(), source })?;
    let dir = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p });
    load_str(&path.display().to_string(), &text, dir)
}

pub fn load_builtin(name: &str) -> Result<(Policy, Origins), PolicyError> {
    let text = builtin_text(name).ok_or_else(|| unknown_builtin(name))?;
    load_str(&format!("builtin:{name}"), text, None)
}

/// Validation and defaults: turns the merged layers into a `Policy`, one step per section.
fn finish(source: &str, raw: Raw, o: &Origins) -> Result<Policy, PolicyError> {
    let at = |key: &str| o.get(key).cloned().unwrap_or(Origin { file: source.to_owned(), line: 1, col: 1 });
    let bad = |key: &str, msg: String| PolicyError::invalid(&at(key), format!("{key}: {msg}"));
    // In the order of the file's sections, so the first error reported is the first written.
    let hostname = hostname(raw.hostname, &bad)?;
    let user = user(raw.user, &bad)?;
    let filesystem = filesystem(raw.filesystem, &bad)?;
    let env = env(raw.env, &bad)?;
    let limits = limits(raw.limits, &bad)?;
    let network = network(raw.network, &bad)?;
    Ok(Policy {
        source: source.to_owned(),
        hostname,
        user,
        filesystem,
        env,
        limits,
        landlock: landlock(raw.landlock, &network),
        network,
        seccomp: seccomp(raw.seccomp, &bad)?,
        capabilities: capabilities(raw.capabilities, &bad)?,
        tools: Tools { confine_paths: raw.tools.confine_paths.unwrap_or(false), memory: Vec::new() },
        trail: trail(raw.trail, &bad)?,
        retention: retention(raw.retention, &bad)?,
        provision: provision(raw.provision, &bad)?,
    })
}

/// `hostname`.
fn hostname(raw: Option<String>, bad: &Bad) -> Result<String, PolicyError> {
    let hostname = raw.unwrap_or_else(|| "stockade".into());
    if hostname.is_empty()
        || hostname.len() > 64
        || !hostname.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(bad("hostname", format!("`{hostname}` is not a valid host name")));
    }
    Ok(hostname)
}

/// `[user]`.
fn user(raw: UserRaw, bad: &Bad) -> Result<User, PolicyError> {
    let user = User {
        uid: raw.uid.unwrap_or(1000),
        gid: raw.gid.unwrap_or(1000),
        name: raw.name.unwrap_or_else(|| "agent".into()),
        host_id_base: raw.host_id_base.unwrap_or(100_000),
    };
    for (k, v) in [("user.uid", user.uid), ("user.gid", user.gid)] {
        if v >= 65536 {
            return Err(bad(k, format!("{v} is outside the jail's id range 0..65536")));
        }
    }
    if user.host_id_base == 0 || user.host_id_base.checked_add(65536).is_none() {
        return Err(bad(
            "user.host_id_base",
            format!("{} would map jail ids onto host root or overflow", user.host_id_base),
        ));
    }
    if user.host_id_base < 65536 {
        return Err(bad(
            "user.host_id_base",
            format!(
                "{} would map jail ids onto the host's own users and groups (0..65535); use 65536 or more",
                user.host_id_base
            ),
        ));
    }
    if user.name.is_empty() || !user.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(bad("user.name", format!("`{}` is not a valid user name", user.name)));
    }
    Ok(user)
}

/// `[filesystem]`.
fn filesystem(raw: FsRaw, bad: &Bad) -> Result<Filesystem, PolicyError> {
    let binds = |key: &str, list: Option<Vec<String>>| -> Result<Vec<Bind>, PolicyError> {
        let under_etc = key == "filesystem.etc";
        list.unwrap_or_default().iter().map(|s| parse_bind(s, under_etc).map_err(|m| bad(key, m))).collect()
    };
    let filesystem = Filesystem {
        read_only: binds("filesystem.read_only", raw.read_only)?,
        read_write: binds("filesystem.read_write", raw.read_write)?,
        etc: binds("filesystem.etc", raw.etc)?,
        rootfs: raw.rootfs.map(PathBuf::from),
        sys: raw.sys.map_or(SysMode::None, Into::into),
        workspace: raw.workspace.map_or(Access::ReadWrite, Into::into),
    };
    for b in &filesystem.etc {
        if !b.dst.starts_with("/etc") || b.dst == Path::new("/etc") {
            return Err(bad("filesystem.etc", format!("`{b}`: entries must name files or directories below /etc")));
        }
    }
    if let Some(r) = &filesystem.rootfs {
        if !r.is_absolute() {
            return Err(bad("filesystem.rootfs", format!("`{}` must be an absolute path", r.display())));
        }
    }
    Ok(filesystem)
}

/// `[env]`.
fn env(raw: EnvRaw, bad: &Bad) -> Result<Env, PolicyError> {
    let env =
        Env { set: raw.set, pass: raw.pass.unwrap_or_default(), allow_secrets: raw.allow_secrets.unwrap_or_default() };
    for name in env.set.keys().chain(env.pass.iter()) {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(bad("env", format!("`{name}` is not a valid variable name")));
        }
        if is_secret_name(name) && !env.allow_secrets.contains(name) {
            let key = if env.set.contains_key(name) { "env.set" } else { "env.pass" };
            return Err(bad(
                key,
                format!(
                    "`{name}` looks like a credential; secrets never enter a jail unless listed in env.allow_secrets"
                ),
            ));
        }
    }
    Ok(env)
}

/// `[limits]`.
fn limits(raw: LimitsRaw, bad: &Bad) -> Result<Limits, PolicyError> {
    let size = |key: &str, v: Option<NumOrStr>| -> Result<Option<Size>, PolicyError> {
        match v {
            None => Ok(None),
            Some(NumOrStr::Num(n)) => Ok(Some(Size(n))),
            Some(NumOrStr::Str(s)) => parse_size(&s).map(|n| Some(Size(n))).map_err(|e| bad(key, e.to_string())),
        }
    };
    let timeout = match none_is_unset(raw.timeout) {
        None => None,
        Some(NumOrStr::Num(n)) => Some(Dur(std::time::Duration::from_secs(n))),
        Some(NumOrStr::Str(s)) => Some(Dur(parse_duration(&s).map_err(|e| bad("limits.timeout", e.to_string()))?)),
    };
    let limits = Limits {
        memory: size("limits.memory", none_is_unset(raw.memory))?,
        pids: raw.pids.and_then(|v| v.0),
        cpu: raw.cpu.and_then(|v| v.0),
        nofile: raw.nofile.and_then(|v| v.0),
        nproc: raw.nproc.and_then(|v| v.0),
        fsize: size("limits.fsize", none_is_unset(raw.fsize))?,
        address_space: size("limits.address_space", none_is_unset(raw.address_space))?,
        tmp_size: size("limits.tmp_size", raw.tmp_size)?.unwrap_or(Size(256 << 20)),
        workspace_size: size("limits.workspace_size", none_is_unset(raw.workspace_size))?,
        outputs_size: size("limits.outputs_size", none_is_unset(raw.outputs_size))?,
        timeout,
        enforcement: raw.enforcement.map_or(Enforcement::Hard, Into::into),
    };
    if let Some(c) = limits.cpu {
        if !(c > 0.0 && c <= 1024.0) {
            return Err(bad("limits.cpu", format!("{c} must be a positive number of CPUs")));
        }
    }
    for (k, v) in [("limits.pids", limits.pids), ("limits.nofile", limits.nofile), ("limits.nproc", limits.nproc)] {
        if v == Some(0) {
            return Err(bad(k, "0 would stop every program; omit the field for no limit".into()));
        }
    }
    if let Some(m) = limits.memory {
        if m.0 < (8 << 20) {
            return Err(bad("limits.memory", format!("{} bytes is too small to start a program (minimum 8M)", m.0)));
        }
    }
    if limits.tmp_size.0 == 0 {
        return Err(bad("limits.tmp_size", "must be greater than zero".into()));
    }
    for (k, v) in [("limits.workspace_size", limits.workspace_size), ("limits.outputs_size", limits.outputs_size)] {
        if let Some(v) = v.filter(|v| v.0 < MIN_DISK_SIZE) {
            return Err(bad(
                k,
                format!(
                    "{} is too small for a filesystem of its own (minimum {}); omit the field for no limit",
                    format_size(v.0),
                    format_size(MIN_DISK_SIZE)
                ),
            ));
        }
    }
    if limits.timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(bad("limits.timeout", "must be greater than zero; omit the field for no timeout".into()));
    }
    Ok(limits)
}

/// `[network]`.
fn network(raw: NetRaw, bad: &Bad) -> Result<Network, PolicyError> {
    let mut network = Network {
        egress: None,
        mode: raw.mode.map_or(NetMode::None, Into::into),
        allow: raw.allow.unwrap_or_default(),
        allow_domains: raw.allow_domains.unwrap_or_default(),
        upstream_dns: raw.upstream_dns.unwrap_or_default(),
        pool: raw.pool.unwrap_or_else(|| super::rules::DEFAULT_POOL.to_owned()),
        on_deny: raw.on_deny.map_or(OnDeny::Reject, Into::into),
    };
    match network.mode {
        NetMode::Veth => {
            use super::rules::{parse_upstream, AllowRule, DomainPattern, Egress, Net4};
            let allow = network
                .allow
                .iter()
                .map(|a| AllowRule::parse(a))
                .collect::<Result<_, _>>()
                .map_err(|e| bad("network.allow", e.to_string()))?;
            let domains = network
                .allow_domains
                .iter()
                .map(|d| DomainPattern::parse(d))
                .collect::<Result<_, _>>()
                .map_err(|e| bad("network.allow_domains", e.to_string()))?;
            let upstream = network
                .upstream_dns
                .iter()
                .map(|u| parse_upstream(u))
                .collect::<Result<_, _>>()
                .map_err(|e| bad("network.upstream_dns", e.to_string()))?;
            let pool = Net4::parse(&network.pool).map_err(|e| bad("network.pool", e.to_string()))?;
            if pool.prefix > 28 {
                return Err(bad("network.pool", format!("{pool} is too small: sessions take a /30 each")));
            }
            network.egress = Some(Egress { allow, domains, upstream, pool });
        }
        NetMode::None | NetMode::Loopback => {
            for (k, l) in [
                ("network.allow", &network.allow),
                ("network.allow_domains", &network.allow_domains),
                ("network.upstream_dns", &network.upstream_dns),
            ] {
                if !l.is_empty() {
                    return Err(bad(
                        k,
                        "has no effect unless network.mode = \"veth\"; remove it or change the mode".into(),
                    ));
                }
            }
        }
    }
    Ok(network)
}

/// `[landlock]`, which reads the network's allowlist.
fn landlock(raw: LandlockRaw, network: &Network) -> Landlock {
    // In veth mode, landlock's TCP connect rules mirror the allowlist as a second layer when
    // the allowlist pins every destination to ports (names admit any port, so then it cannot).
    let mirrored = (network.mode == NetMode::Veth && raw.tcp_connect.is_none() && network.allow_domains.is_empty())
        .then(|| network.egress.as_ref().and_then(|e| super::rules::tcp_ports(&e.allow)))
        .flatten();
    Landlock {
        compatibility: raw.compatibility.map_or(Compatibility::Hard, Into::into),
        tcp_bind: raw.tcp_bind,
        tcp_connect: raw.tcp_connect.or(mirrored),
    }
}

/// `[seccomp]`.
fn seccomp(raw: SeccompRaw, bad: &Bad) -> Result<Seccomp, PolicyError> {
    let mut seccomp = Seccomp {
        allowed: Default::default(),
        default_action: raw.default_action.map_or(SeccompAction::Errno, Into::into),
        allow: raw.allow.unwrap_or_else(|| vec!["@system-service".into()]),
        deny: raw.deny.unwrap_or_default(),
        socket_families: raw.socket_families.unwrap_or_else(|| vec!["unix".into(), "inet".into(), "inet6".into()]),
    };
    seccomp.allowed = syscalls::allowlist(&seccomp.allow, &seccomp.deny).map_err(|e| {
        // `allow` is resolved first, so an entry of it is the first one wrong.
        let name = match &e {
            syscalls::UnknownEntry::Group { name, .. } | syscalls::UnknownEntry::Syscall { name, .. } => name,
        };
        let key = if seccomp.allow.contains(name) { "seccomp.allow" } else { "seccomp.deny" };
        bad(key, e.to_string())
    })?;
    // Every jailed command starts with an execve and ends with an exit_group; without them no
    // program could start (and one that somehow did could not end), which would show as every
    // command dying with no message.
    let missing: Vec<&str> =
        ["execve", "exit_group"].into_iter().filter(|n| seccomp.allowed.get(n).is_none()).collect();
    if !missing.is_empty() && seccomp.default_action != SeccompAction::Log {
        let key =
            if seccomp.deny.iter().any(|d| missing.contains(&d.as_str())) { "seccomp.deny" } else { "seccomp.allow" };
        return Err(bad(
            key,
            format!(
                "the allowlist does not admit {}: no program could start in the jail (`@system-service` admits them)",
                missing.join(" or ")
            ),
        ));
    }
    for f in &seccomp.socket_families {
        if !SOCKET_FAMILIES.iter().any(|(n, _)| n == f) {
            let hint = nearest(f, SOCKET_FAMILIES.iter().map(|(n, _)| *n))
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(bad(
                "seccomp.socket_families",
                format!("unknown family `{f}`{hint}; known: unix, inet, inet6, netlink"),
            ));
        }
    }
    Ok(seccomp)
}

/// `[capabilities]`.
fn capabilities(raw: CapsRaw, bad: &Bad) -> Result<Capabilities, PolicyError> {
    let keep = raw.keep.unwrap_or_default();
    let mut set = CapSet::default();
    for c in &keep {
        set.insert(CapSet::parse_name(c).map_err(|e| bad("capabilities.keep", e.to_string()))?);
    }
    Ok(Capabilities { keep, set })
}

type Bad<'a> = dyn Fn(&str, String) -> PolicyError + 'a;

/// `[trail]`.
fn trail(raw: TrailRaw, bad: &Bad) -> Result<Trail, PolicyError> {
    let max_size = match raw.max_size {
        None => Size(64 << 20),
        Some(NumOrStr::Num(n)) => Size(n),
        Some(NumOrStr::Str(s)) => Size(parse_size(&s).map_err(|e| bad("trail.max_size", e.to_string()))?),
    };
    if max_size.0 < 64 << 10 {
        return Err(bad("trail.max_size", format!("{} is below the minimum, 64K", format_size(max_size.0))));
    }
    let max_rate = match raw.max_rate {
        None => Some(Size(1 << 20)),
        Some(NumOrStr::Str(s)) if s == "none" => None,
        Some(NumOrStr::Num(n)) => Some(Size(n)),
        Some(NumOrStr::Str(s)) => Some(Size(parse_size(&s).map_err(|e| bad("trail.max_rate", e.to_string()))?)),
    };
    if let Some(r) = max_rate.filter(|r| r.0 < 16 << 10) {
        return Err(bad(
            "trail.max_rate",
            format!("{} a second is below the minimum, 16K (\"none\" sets no bound)", format_size(r.0)),
        ));
    }
    let argv_max = raw.argv_max.unwrap_or(4096);
    let input_max = raw.input_max.unwrap_or(16384);
    for (k, v) in [("trail.argv_max", argv_max), ("trail.input_max", input_max)] {
        if !(64..=1 << 20).contains(&v) {
            return Err(bad(k, format!("{v} is outside 64..=1048576")));
        }
    }
    let redact = raw.redact.unwrap_or_default();
    for r in &redact {
        match regex_syntax::Parser::new().parse(r) {
            Err(e) => return Err(bad("trail.redact", format!("`{r}` is not a regular expression: {e}"))),
            Ok(h) if h.properties().minimum_len() == Some(0) => {
                return Err(bad("trail.redact", format!("`{r}` matches the empty string")));
            }
            Ok(_) => {}
        }
    }
    let ship = raw.ship.unwrap_or_default();
    for s in &ship {
        let ok = s == "stdout" || s == "syslog" || s.starts_with("http://") || s.starts_with("https://");
        if !ok {
            return Err(bad(
                "trail.ship",
                format!("`{s}`: expected \"stdout\", \"syslog\" or an OTLP/HTTP logs URL (http://HOST:4318/v1/logs)"),
            ));
        }
    }
    Ok(Trail {
        exec: raw.exec.unwrap_or(true),
        argv_max,
        input_max,
        max_size,
        max_rate,
        on_full: raw.on_full.map_or(OnFull::Fail, Into::into),
        redact,
        ship,
    })
}

/// `[retention]`: "session_end", "keep", or a duration.
fn retention(raw: RetentionRaw, bad: &Bad) -> Result<Retention, PolicyError> {
    let keep = |key: &str, v: Option<NumOrStr>, default: Keep| -> Result<Keep, PolicyError> {
        Ok(match v {
            None => default,
            Some(NumOrStr::Num(n)) => Keep::For(std::time::Duration::from_secs(n)),
            Some(NumOrStr::Str(s)) if s == "session_end" => Keep::SessionEnd,
            Some(NumOrStr::Str(s)) if s == "keep" => Keep::Forever,
            Some(NumOrStr::Str(s)) => Keep::For(parse_duration(&s).map_err(|e| {
                bad(key, format!("{e}; or \"session_end\" (delete when the session ends), or \"keep\""))
            })?),
        })
    };
    const DAY: u64 = 86_400;
    Ok(Retention {
        outputs: keep("retention.outputs", raw.outputs, Keep::For(std::time::Duration::from_secs(7 * DAY)))?,
        workspaces: keep("retention.workspaces", raw.workspaces, Keep::SessionEnd)?,
        trails: keep("retention.trails", raw.trails, Keep::For(std::time::Duration::from_secs(30 * DAY)))?,
    })
}

/// `[provision]`.
fn provision(raw: ProvisionRaw, bad: &Bad) -> Result<Provision, PolicyError> {
    let timeout = match none_is_unset(raw.timeout) {
        None => Dur(std::time::Duration::from_secs(600)),
        Some(NumOrStr::Num(n)) => Dur(std::time::Duration::from_secs(n)),
        Some(NumOrStr::Str(s)) => Dur(parse_duration(&s).map_err(|e| bad("provision.timeout", e.to_string()))?),
    };
    let git_allow = raw.git_allow.unwrap_or_default();
    for u in &git_allow {
        let scheme_ok = ["https://", "http://", "ssh://", "git://"].iter().any(|s| u.starts_with(s));
        // A bare host would admit `https://github.com.evil.example/`: a prefix must end in `/`.
        let rest = u.split_once("://").map(|(_, r)| r).unwrap_or("");
        if !scheme_ok || !rest.contains('/') {
            return Err(bad(
                "provision.git_allow",
                format!("`{u}`: a prefix is a URL with a scheme and a path, e.g. \"https://github.com/acme/\""),
            ));
        }
    }
    let mut copy_from = BTreeMap::new();
    for (name, dir) in raw.copy_from {
        let p = PathBuf::from(&dir);
        if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(bad(
                "provision.copy_from",
                format!("`{name}` = `{dir}`: must be an absolute path without `..`"),
            ));
        }
        copy_from.insert(name, p);
    }
    let allow = raw.allow.unwrap_or_default();
    let allow_domains = raw.allow_domains.unwrap_or_default();
    for a in &allow {
        super::rules::AllowRule::parse(a).map_err(|e| bad("provision.allow", e.to_string()))?;
    }
    for d in &allow_domains {
        super::rules::DomainPattern::parse(d).map_err(|e| bad("provision.allow_domains", e.to_string()))?;
    }
    if raw.git_url_key.is_some() && git_allow.is_empty() {
        return Err(bad("provision.git_allow", "provision.git_url_key is set but no URL prefix is allowed".into()));
    }
    if raw.copy_key.is_some() && copy_from.is_empty() {
        return Err(bad("provision.copy_from", "provision.copy_key is set but no directory is declared".into()));
    }
    Ok(Provision {
        git_url_key: raw.git_url_key,
        git_ref_key: raw.git_ref_key,
        git_allow,
        copy_key: raw.copy_key,
        copy_from,
        allow,
        allow_domains,
        credentials: raw.credentials,
        timeout,
    })
}

/// `"none"` lifts a size limit an extended policy set.
fn none_is_unset(v: Option<NumOrStr>) -> Option<NumOrStr> {
    match v {
        Some(NumOrStr::Str(s)) if s == "none" => None,
        v => v,
    }
}

/// `[-]SRC[:DST]`: absolute, normalised paths without `..`. Plain string work: the default
/// policy alone has twenty binds, and `Path`'s component iterators made this a quarter of
/// loading it.
fn parse_bind(s: &str, under_etc: bool) -> Result<Bind, String> {
    let (optional, rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (src, dst) = match rest.split_once(':') {
        Some((a, b)) => (a, b),
        None => (rest, rest),
    };
    // What `Path::components` makes of an absolute path: empty and `.` components dropped.
    let check = |p: &str| -> Result<String, String> {
        if !p.starts_with('/') {
            return Err(format!("`{s}`: `{p}` must be an absolute path"));
        }
        let mut out = String::with_capacity(p.len());
        for c in p.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(format!("`{s}`: `{p}` must not contain `..`")),
                c => {
                    out.push('/');
                    out.push_str(c);
                }
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        Ok(out)
    };
    let src = check(src)?;
    let dst = check(dst)?;
    for reserved in ["/proc", "/dev", "/sys", "/workspace", "/mnt/session", "/tmp"] {
        if is_under(&dst, reserved) || dst == "/" {
            return Err(format!("`{s}`: {dst} is managed by Stockade and cannot be a bind target"));
        }
    }
    if !under_etc && is_under(&dst, "/etc") {
        return Err(format!("`{s}`: the jail's /etc is generated; list single host files in filesystem.etc"));
    }
    Ok(Bind { src: src.into(), dst: dst.into(), optional })
}

/// Whether the normalised path `p` is `dir` or below it (`/tmpx` is not below `/tmp`).
fn is_under(p: &str, dir: &str) -> bool {
    p.strip_prefix(dir).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::Source;

    #[test]
    fn origins_count_lines_and_characters() {
        let text = "a = 1\n\nné = \"x\"\nlast";
        let src = Source::new("t.toml".into(), text);
        let at = |needle: &str| {
            let o = src.origin(text.find(needle).unwrap());
            (o.line, o.col)
        };
        assert_eq!(at("a ="), (1, 1));
        assert_eq!(at("1"), (1, 5));
        assert_eq!(src.origin(5).line, 1, "the newline itself belongs to its line");
        assert_eq!(src.origin(6).line, 2, "an empty line");
        // Columns count characters, not bytes: "é" is two bytes.
        assert_eq!(at("\"x\""), (3, 6));
        assert_eq!(at("last"), (4, 1));
        let end = src.origin(text.len() + 10);
        assert_eq!((end.line, end.col, end.file.as_str()), (4, 5, "t.toml"));
    }

    #[test]
    fn binds_are_normalised_like_path_components() {
        use super::{is_under, parse_bind};
        use std::path::Path;
        for (written, src, dst, optional) in [
            ("/usr", "/usr", "/usr", false),
            ("-//opt/./tools/", "/opt/tools", "/opt/tools", true),
            ("/host/data:/srv//data/.", "/host/data", "/srv/data", false),
        ] {
            let b = parse_bind(written, false).unwrap();
            assert_eq!((b.src.as_path(), b.dst.as_path(), b.optional), (Path::new(src), Path::new(dst), optional));
            // The same as what the written destination's own components give.
            let rest = written.trim_start_matches('-');
            let written_dst = rest.split_once(':').map_or(rest, |(_, d)| d);
            let via_components: std::path::PathBuf = Path::new(written_dst).components().collect();
            assert_eq!(b.dst, via_components, "{written}");
        }
        assert!(parse_bind("/x:/tmpfoo", false).is_ok(), "/tmpfoo is not below /tmp");
        assert!(parse_bind("/x:/tmp/foo", false).unwrap_err().contains("managed by Stockade"));
        assert!(parse_bind("/x:/", false).unwrap_err().contains("managed by Stockade"));
        assert!(parse_bind("/x:/./", false).unwrap_err().contains("managed by Stockade"));
        assert!(parse_bind("/x:/etc/foo", false).unwrap_err().contains("/etc is generated"));
        assert!(parse_bind("/etc/foo", true).is_ok());
        assert!(parse_bind("/a/../b", false).unwrap_err().contains("must not contain `..`"));
        assert!(parse_bind("a/b", false).unwrap_err().contains("must be an absolute path"));
        assert!(is_under("/tmp", "/tmp") && is_under("/tmp/a", "/tmp") && !is_under("/tmpa", "/tmp"));
    }
}
