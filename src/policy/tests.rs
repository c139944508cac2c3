use super::*;

fn load_text(text: &str) -> Result<Policy, PolicyError> {
    load_str("test.toml", text, None).map(|(p, _)| p)
}

#[test]
fn builtins_load_and_differ() {
    let (d, _) = load_builtin("default").unwrap();
    assert_eq!(d.hostname, "stockade");
    assert_eq!(d.network.mode, NetMode::Loopback);
    assert_eq!(d.seccomp.allow, vec!["@system-service"]);
    let (s, _) = load_builtin("strict").unwrap();
    assert_eq!(s.seccomp.default_action, SeccompAction::Kill);
    assert_eq!(s.filesystem.workspace, Access::ReadOnly);
    assert_eq!(s.network.mode, NetMode::None);
    assert_eq!(s.landlock.tcp_connect, Some(vec![]));
    let (c, _) = load_builtin("ci").unwrap();
    assert_eq!(c.limits.pids, Some(256));
}

#[test]
fn shipped_files_match_embedded_text() {
    for (name, text) in BUILTINS {
        let on_disk = std::fs::read_to_string(format!("{}/policies/{name}.toml", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_eq!(&on_disk, text);
    }
}

#[test]
fn unknown_field_names_line_column_and_nearest() {
    let err = load_text("extends = \"default\"\n\n[limits]\nmemroy = \"1G\"\n").unwrap_err().to_string();
    assert!(err.starts_with("test.toml:4:1: unknown field `memroy`"), "{err}");
    assert!(err.ends_with("(did you mean `memory`?)"), "{err}");
}

#[test]
fn unknown_syscall_in_allow_suggests() {
    let err = load_text("[seccomp]\nallow = [\"@system-service\", \"ptrase\"]\n").unwrap_err().to_string();
    assert_eq!(err, "test.toml:2:9: seccomp.allow: unknown syscall `ptrase` (did you mean `ptrace`?)");
}

#[test]
fn bad_enum_value_lists_choices() {
    let err = load_text("[network]\nmode = \"lopback\"\n").unwrap_err().to_string();
    assert!(err.starts_with("test.toml:2:8: unknown variant `lopback`"), "{err}");
    assert!(err.contains("did you mean `loopback`"), "{err}");
}

#[test]
fn malformed_toml_is_located() {
    let err = load_text("hostname = \"a\"\n[limits\n").unwrap_err().to_string();
    assert!(err.starts_with("test.toml:2:"), "{err}");
}

#[test]
fn lists_replace_or_edit_uniformly() {
    let p = load_text("extends = \"default\"\n[seccomp]\nallow_add = [\"ptrace\"]\ndeny_add = [\"@timer\"]\n[filesystem]\nread_only_remove = [\"-/opt\"]\n").unwrap();
    assert_eq!(p.seccomp.allow, vec!["@system-service", "ptrace"]);
    assert_eq!(p.seccomp.deny, vec!["@timer"]);
    assert!(!p.filesystem.read_only.iter().any(|b| b.src == std::path::Path::new("/opt")));
    let p =
        load_text("extends = \"default\"\n[seccomp]\nallow = [\"@basic-io\", \"execve\", \"exit_group\"]\n").unwrap();
    assert_eq!(p.seccomp.allow, vec!["@basic-io", "execve", "exit_group"]);
}

#[test]
fn maps_merge_key_by_key() {
    let p = load_text("extends = \"default\"\n[env]\nset = { EDITOR = \"vi\" }\n").unwrap();
    assert_eq!(p.env.set.get("EDITOR").map(String::as_str), Some("vi"));
    assert_eq!(p.env.set.get("LANG").map(String::as_str), Some("C.UTF-8"));
}

#[test]
fn secrets_refused_unless_allowed() {
    let err = load_text("[env]\npass = [\"GITHUB_TOKEN\"]\n").unwrap_err().to_string();
    assert!(err.contains("env.pass: `GITHUB_TOKEN` looks like a credential"), "{err}");
    let err = load_text("[env]\nset = { ANTHROPIC_API_KEY = \"x\" }\n").unwrap_err().to_string();
    assert!(err.contains("env.set"), "{err}");
    let p = load_text("[env]\npass = [\"GITHUB_TOKEN\"]\nallow_secrets = [\"GITHUB_TOKEN\"]\n").unwrap();
    assert_eq!(p.env.pass, vec!["GITHUB_TOKEN"]);
}

#[test]
fn extends_files_relative_and_cycles() {
    let dir = std::env::temp_dir().join(format!("stockade-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("base.toml"), "extends = \"strict\"\nhostname = \"base\"\n").unwrap();
    std::fs::write(dir.join("sub/child.toml"), "extends = \"../base.toml\"\n[limits]\npids = 7\n").unwrap();
    let (p, o) = load_file(&dir.join("sub/child.toml")).unwrap();
    assert_eq!(p.hostname, "base");
    assert_eq!(p.limits.pids, Some(7));
    assert_eq!(p.seccomp.default_action, SeccompAction::Kill);
    assert_eq!(o["limits.pids"].line, 3);
    assert!(o["hostname"].file.ends_with("base.toml"));
    std::fs::write(dir.join("a.toml"), "extends = \"b.toml\"\n").unwrap();
    std::fs::write(dir.join("b.toml"), "extends = \"a.toml\"\n").unwrap();
    let err = load_file(&dir.join("a.toml")).unwrap_err();
    assert!(matches!(err, PolicyError::Cycle(_)), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_values_rejected() {
    for (text, needle) in [
        ("[filesystem]\nread_write = [\"relative/path\"]\n", "must be an absolute path"),
        ("[filesystem]\nread_only = [\"/usr/../etc\"]\n", "must not contain `..`"),
        ("[filesystem]\nread_only = [\"/host:/proc/x\"]\n", "managed by Stockade"),
        ("[filesystem]\nread_only = [\"/etc\"]\n", "generated"),
        ("[limits]\nmemory = \"12Q\"\n", "limits.memory: invalid size unit"),
        ("[limits]\npids = 0\n", "limits.pids: 0 would stop"),
        ("[limits]\nmemory = -5\n", "must not be negative"),
        ("[user]\nuid = 70000\n", "user.uid"),
        ("[user]\nhost_id_base = 0\n", "host root"),
        ("[user]\nhost_id_base = 1\n", "the host's own users and groups"),
        (
            "extends = \"default\"\n[seccomp]\nallow_remove = [\"@system-servic\"]\n",
            "seccomp.allow_remove: `@system-servic` is not in seccomp.allow (did you mean `@system-service`?)",
        ),
        (
            "extends = \"default\"\n[filesystem]\nread_only_remove = [\"/usr/\"]\n",
            "is not in filesystem.read_only (did you mean `/usr`?)",
        ),
        ("[env]\npass_remove = [\"HOME\"]\n", "`HOME` is not in env.pass (env.pass is empty here)"),
        ("[seccomp]\nallow = []\n", "seccomp.allow: the allowlist does not admit execve or exit_group"),
        (
            "[seccomp]\ndeny = [\"execve\"]\n",
            "seccomp.deny: the allowlist does not admit execve: no program could start",
        ),
        ("[user]\nhost_id_base = 65535\n", "use 65536 or more"),
        ("hostname = \"a b\"\n", "not a valid host name"),
        ("[network]\nmode = \"none\"\nallow = [\"1.2.3.4:80\"]\n", "has no effect"),
        ("[seccomp]\nsocket_families = [\"packet\"]\n", "unknown family `packet`"),
        ("[capabilities]\nkeep = [\"CAP_SYS_ADMN\"]\n", "unknown capability"),
        ("extends = \"defualt\"\n", "did you mean `default`"),
    ] {
        let err = load_text(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn show_output_round_trips() {
    for (name, _) in BUILTINS {
        let (p, _) = load_builtin(name).unwrap();
        let text = toml::to_string(&p).unwrap();
        let (q, _) = load_str("shown.toml", &text, None).unwrap();
        assert_eq!(Policy { source: p.source.clone(), ..q }, p, "{name}");
    }
}

#[test]
fn disk_sizes_and_the_tools_switch_parse_and_a_tiny_size_is_refused() {
    let p = load_text(
        "extends = \"default\"\n[limits]\nworkspace_size = \"2G\"\noutputs_size = 67108864\n[tools]\nconfine_paths = true\n",
    )
    .unwrap();
    assert_eq!(p.limits.workspace_size, Some(Size(2 << 30)));
    assert_eq!(p.limits.outputs_size, Some(Size(64 << 20)));
    assert!(p.tools.confine_paths);
    assert!(!load_builtin("default").unwrap().0.tools.confine_paths);
    let lifted = load_text("extends = \"default\"\n[limits]\nworkspace_size = \"none\"\n").unwrap();
    assert_eq!(lifted.limits.workspace_size, None);
    assert!(load_builtin("default").unwrap().0.limits.workspace_size.is_some());
    let err = load_text("extends = \"default\"\n[limits]\nworkspace_size = \"1M\"\n").unwrap_err().to_string();
    assert!(err.contains("limits.workspace_size") && err.contains("minimum 16M"), "{err}");
}

#[test]
fn none_lifts_any_limit_an_extended_policy_sets() {
    let p = load_text(
        "extends = \"default\"\n[limits]\nmemory = \"none\"\npids = \"none\"\ncpu = \"none\"\nnproc = \"none\"\nfsize = \"none\"\ntimeout = \"none\"\n",
    )
    .unwrap();
    let l = &p.limits;
    assert_eq!((l.memory, l.pids, l.cpu, l.nproc, l.fsize, l.timeout), (None, None, None, None, None, None));
    // The defaults' others stay.
    assert_eq!(l.nofile, Some(4096));
    let e = load_text("extends = \"default\"\n[limits]\npids = \"lots\"\n").unwrap_err().to_string();
    assert!(e.starts_with("test.toml:3:8: ") && e.ends_with("expected u64, or \"none\""), "{e}");
}
