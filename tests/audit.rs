//! `stockade audit`: the shipped policies pass, each deliberately weakened fixture is caught by
//! the check named for it, at the line that weakened it, in every output format.

mod common;

use common::*;
use std::process::Command;

/// (fixture, the check that must fail or be partial, the line that weakened the policy)
const FIXTURES: &[(&str, &str, usize)] = &[
    ("weak-mount.toml", "syscalls.mount", 5),
    ("weak-log.toml", "seccomp.default_action", 5),
    ("weak-caps.toml", "capabilities", 5),
    ("weak-home.toml", "filesystem.host_paths", 5),
    ("weak-secrets.toml", "env.secrets", 6),
    ("weak-landlock.toml", "landlock.compatibility", 5),
    ("weak-uid0.toml", "user.uid", 5),
    ("weak-keyring.toml", "syscalls.keyring", 5),
    ("weak-namespaces.toml", "syscalls.namespaces", 5),
    ("weak-rw.toml", "filesystem.writable", 5),
    ("weak-usr.toml", "filesystem.writable", 5),
    ("weak-aws.toml", "filesystem.credentials", 5),
    ("weak-shadow.toml", "filesystem.credentials", 5),
];

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn audit(args: &[&str]) -> (i32, String) {
    let out = Command::new(STOCKADE).arg("audit").args(args).output().unwrap();
    assert!(out.stderr.is_empty() || out.status.code() != Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap())
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    serde_json::from_str(&audit(&a).1).unwrap()
}

#[test]
fn shipped_policies_pass_every_check() {
    let dir = format!("{}/policies", env!("CARGO_MANIFEST_DIR"));
    for name in ["default", "strict", "ci"] {
        let path = format!("{dir}/{name}.toml");
        let r = &json(&[&path])[0];
        assert!(r["exposure"].as_f64().unwrap() <= 2.0, "{name}: {r:#}");
        for f in r["findings"].as_array().unwrap() {
            // ci's jobs work on the runner's checkout, a host directory no size limit can hold:
            // the runner's disk bounds it, and the audit says so.
            let host_disk =
                name == "ci" && ["limits.workspace_size", "limits.outputs_size"].contains(&f["id"].as_str().unwrap());
            assert_eq!(f["verdict"], if host_disk { "partial" } else { "pass" }, "{name}: {f:#}");
        }
        assert_eq!(audit(&[&path, "--fail-above", "2.0"]).0, 0);
    }
}

#[test]
fn every_weakened_fixture_is_caught_by_its_check_at_its_line() {
    for (file, check, line) in FIXTURES {
        let path = fixture(file);
        let r = &json(&[&path])[0];
        let f =
            r["findings"].as_array().unwrap().iter().find(|f| f["id"] == *check).unwrap_or_else(|| panic!("{check}"));
        assert_ne!(f["verdict"], "pass", "{file}: {f:#}");
        assert_eq!(f["file"], path.as_str(), "{file}");
        assert_eq!(f["line"], *line, "{file}: {f:#}");
        // Only the weakened property fails (home directories are host paths that hold
        // credentials: both checks see them).
        let also = |id: &serde_json::Value| *check == "filesystem.host_paths" && id == "filesystem.credentials";
        let others: Vec<&serde_json::Value> = r["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["id"] != *check && g["verdict"] != "pass" && !also(&g["id"]))
            .collect();
        assert!(others.is_empty(), "{file}: unexpected findings {others:#?}");
        assert!(r["exposure"].as_f64().unwrap() > 2.0, "{file}: {}", r["exposure"]);
        assert_eq!(audit(&[&path, "--fail-above", "2.0"]).0, 1, "{file}");
    }
}

#[test]
fn sarif_points_code_scanning_at_the_weakening_line() {
    let paths: Vec<String> = FIXTURES.iter().map(|(f, _, _)| fixture(f)).collect();
    let mut args: Vec<&str> = paths.iter().map(String::as_str).collect();
    args.extend(["--format", "sarif"]);
    let (_, out) = audit(&args);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["version"], "2.1.0");
    let run = &s["runs"][0];
    assert_eq!(run["tool"]["driver"]["name"], "stockade-audit");
    let rules: Vec<&str> =
        run["tool"]["driver"]["rules"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    let results = run["results"].as_array().unwrap();
    for (file, check, line) in FIXTURES {
        let r = results
            .iter()
            .find(|r| {
                r["ruleId"] == *check
                    && r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == fixture(file).as_str()
            })
            .unwrap_or_else(|| panic!("no SARIF result for {file} {check}"));
        assert_eq!(r["locations"][0]["physicalLocation"]["region"]["startLine"], *line);
        assert!(matches!(r["level"].as_str(), Some("error" | "warning")));
        assert!(rules.contains(check));
    }
    // Built-ins are reported against their source in the repository.
    let (_, out) = audit(&["default", "--format", "sarif"]);
    assert!(!out.contains("builtin:"), "{out}");
}

#[test]
fn junit_has_one_testcase_per_check_and_failures_for_weakenings() {
    let (_, out) = audit(&[&fixture("weak-caps.toml"), "default", "--format", "junit"]);
    assert!(out.starts_with("<?xml"));
    let suites = out.matches("<testsuite ").count();
    assert_eq!(suites, 2);
    let findings = json(&["default"])[0]["findings"].as_array().unwrap().len();
    assert_eq!(out.matches("<testcase ").count(), 2 * findings);
    assert_eq!(out.matches("<failure ").count(), 1, "{out}");
    assert!(out.contains("name=\"capabilities\">\n      <failure type=\"fail\" message=\"keeps SYS_ADMIN\">"), "{out}");
}

#[test]
fn diff_reports_weakenings_and_fails_on_them() {
    let (code, out) = audit(&["--diff", "default", &fixture("weak-caps.toml"), "--fail-on-weaker"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.lines().any(|l| l.contains("WEAKER") && l.contains("capabilities")), "{out}");
    let (code, out) = audit(&["--diff", &fixture("weak-caps.toml"), "default", "--fail-on-weaker"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.contains("stronger") && l.contains("capabilities")), "{out}");
    let (code, _) = audit(&["--diff", "default", "default", "--fail-on-weaker"]);
    assert_eq!(code, 0);
    let out = Command::new(STOCKADE).args(["audit", "--diff", "default"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("exactly two policies"));
}

/// The audit-trail checks: recording execs, redaction patterns, repositories over plain
/// transports. Weak trails are findings at their lines, never silent passes.
#[test]
fn a_weakened_trail_is_caught_at_its_lines() {
    let path = fixture("weak-trail.toml");
    let r = &json(&[&path])[0];
    let find = |id: &str| r["findings"].as_array().unwrap().iter().find(|f| f["id"] == id).unwrap().clone();
    let exec = find("trail.exec");
    assert_eq!((&exec["verdict"], &exec["line"]), (&serde_json::json!("fail"), &serde_json::json!(5)), "{exec:#}");
    let redact = find("trail.redact");
    assert_eq!((&redact["verdict"], &redact["line"]), (&serde_json::json!("partial"), &serde_json::json!(6)));
    let git = find("provision.git_allow");
    assert_eq!((&git["verdict"], &git["line"]), (&serde_json::json!("partial"), &serde_json::json!(9)));
    assert!(git["reason"].as_str().unwrap().contains("http://git.example/legacy/"), "{git:#}");
    let others: Vec<&serde_json::Value> = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !["trail.exec", "trail.redact", "provision.git_allow"].contains(&f["id"].as_str().unwrap()))
        .filter(|f| f["verdict"] != "pass")
        .collect();
    assert!(others.is_empty(), "{others:#?}");
}

/// The number of checks the README states is the binary's.
#[test]
fn the_readme_states_the_number_of_checks_the_audit_runs() {
    let readme = std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let stated = readme.split(" named checks (").next().unwrap().rsplit(' ').next().unwrap().parse::<usize>().unwrap();
    let veth: usize = readme.split(" named checks (").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    let default = format!("{}/policies/default.toml", env!("CARGO_MANIFEST_DIR"));
    assert_eq!(json(&[&default])[0]["findings"].as_array().unwrap().len(), stated);
    let d = TempDir::new("audit-veth");
    let p = d.path().join("veth.toml");
    std::fs::write(&p, "extends = \"default\"\n[network]\nmode = \"veth\"\nallow = [\"198.51.100.2/32:80\"]\n")
        .unwrap();
    assert_eq!(json(&[p.to_str().unwrap()])[0]["findings"].as_array().unwrap().len(), veth);
}
