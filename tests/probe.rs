//! `stockade probe`: the battery stays blocked under the shipped policies, and every weakened
//! fixture that a probe can observe lets exactly that probe through — the same property its
//! audit check fails on.

mod common;

use common::*;
use std::process::Command;

fn probe(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(STOCKADE).arg("probe").args(args).args(["--format", "json"]).output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), v)
}

fn outcome<'a>(v: &'a serde_json::Value, id: &str) -> &'a str {
    v["reports"].as_array().unwrap().iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no {id}"))["outcome"]
        .as_str()
        .unwrap()
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn shipped_policies_block_every_probe() {
    if needs_root() {
        return;
    }
    let n = stockade::probe::catalogue().len();
    assert!(n >= 50, "only {n} probes");
    for p in ["default", "strict", "ci"] {
        let path = format!("{}/policies/{p}.toml", env!("CARGO_MANIFEST_DIR"));
        let (code, v) = probe(&["--policy", &path]);
        let reports = v["reports"].as_array().unwrap();
        assert_eq!(reports.len(), n);
        let not_blocked: Vec<&serde_json::Value> = reports.iter().filter(|r| r["outcome"] != "blocked").collect();
        assert!(not_blocked.is_empty(), "{p}: {not_blocked:#?}");
        assert_eq!(code, 0);
        // Every report carries its evidence.
        assert!(reports.iter().all(|r| !r["evidence"].as_str().unwrap().is_empty()));
    }
}

/// The rootless built-in, run as a user without root (its purpose): every probe is blocked but
/// the one a cgroup would stop, the memory hog — without a cgroup, memory is bounded per process
/// (RLIMIT_AS), not for the jail as a whole, which the audit reports (limits.enforcement).
#[test]
fn the_rootless_built_in_blocks_every_probe_but_the_jail_wide_memory_limit() {
    if needs_root() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let out = Command::new(STOCKADE)
        .args(["probe", "--policy", "rootless", "--format", "json", "--expect-fail", "res-memory-hog"])
        .uid(65534)
        .gid(65534)
        .env_clear()
        .current_dir("/")
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let escaped: Vec<&str> = v["reports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] != "blocked")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(escaped, ["res-memory-hog"], "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Credentials bound into a jail, read-only, each as a policy could bind it: the audit's
/// `filesystem.credentials` flags the bind, and the probe battery's `fs-credentials` then reads
/// it inside the jail — the same finding from both sides, for every kind the audit names.
#[test]
fn every_credential_the_audit_flags_the_probes_find_readable() {
    if needs_root() {
        return;
    }
    let host = TempDir::new("creds");
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\ndecoy\n-----END OPENSSH PRIVATE KEY-----\n";
    // (what is bound, a file in it, its content)
    let cases: &[(&str, Option<&str>, &str)] = &[
        (".ssh", Some("id_ed25519"), key),
        (".aws", Some("credentials"), "[default]\naws_secret_access_key = decoy\n"),
        (".kube", Some("config"), "apiVersion: v1\n"),
        (".docker", Some("config.json"), "{\"auths\": {}}\n"),
        (".gnupg", Some("pubring.kbx"), "decoy"),
        (".netrc", None, "machine example.com login a password decoy\n"),
        ("deploy.pem", None, key),
        ("shadow", None, "root:!decoy:20000:0:99999:7:::\n"),
    ];
    for (name, inner, body) in cases {
        let src = host.path().join(name);
        match inner {
            Some(f) => {
                std::fs::create_dir_all(&src).unwrap();
                std::fs::write(src.join(f), body).unwrap();
            }
            None => std::fs::write(&src, body).unwrap(),
        }
        let d = TempDir::new("cred-policy");
        let policy = d.path().join("p.toml");
        std::fs::write(
            &policy,
            format!("extends = \"default\"\n[filesystem]\nread_only_add = [\"{}:/srv/host/{name}\"]\n", src.display()),
        )
        .unwrap();
        let a = Command::new(STOCKADE).args(["audit", policy.to_str().unwrap(), "--format", "json"]).output().unwrap();
        let a: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
        let f = a[0]["findings"].as_array().unwrap().iter().find(|f| f["id"] == "filesystem.credentials").unwrap();
        assert_eq!(f["verdict"], "fail", "{name}: the audit did not flag it: {f}");
        let (_, v) = probe(&["--policy", policy.to_str().unwrap(), "--only", "fs-credentials"]);
        let r = &v["reports"][0];
        assert_eq!(r["outcome"], "escaped", "{name}: the probe did not read it: {r}");
        assert!(r["evidence"].as_str().unwrap().contains(&format!("/srv/host/{name}")), "{name}: {r}");
    }
}

/// (fixture, the audit check that fails, the probes that must escape under it)
const WEAKENED: &[(&str, &str, &[&str])] = &[
    ("weak-keyring.toml", "syscalls.keyring", &["keyctl", "add_key"]),
    ("weak-namespaces.toml", "syscalls.namespaces", &["unshare-user", "clone-newuser"]),
    ("weak-log.toml", "seccomp.default_action", &["keyctl", "add_key", "perf_event_open"]),
    ("weak-caps.toml", "capabilities", &["priv-capabilities"]),
];
// weak-mount, weak-uid0, weak-landlock, weak-secrets and the filesystem fixtures are caught by the
// audit but not observable here: the mount family also needs capabilities the jail never has, and
// the others change nothing a default probe target can see.

#[test]
fn weakenings_caught_by_the_audit_are_seen_escaping_by_the_probes() {
    if needs_root() {
        return;
    }
    for (file, check, escapes) in WEAKENED {
        let path = fixture(file);
        let audit = Command::new(STOCKADE).args(["audit", &path, "--format", "json"]).output().unwrap();
        let a: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
        let f = a[0]["findings"].as_array().unwrap().iter().find(|f| f["id"] == *check).unwrap();
        assert_ne!(f["verdict"], "pass", "{file}");
        // The escaping probes, next to ones that must stay blocked.
        let only = format!("{},fs-write-usr,proc-env-secret", escapes.join(","));
        let (code, v) = probe(&["--policy", &path, "--only", &only]);
        for id in *escapes {
            assert_eq!(outcome(&v, id), "escaped", "{file}: {id}: {v:#}");
        }
        assert_eq!(outcome(&v, "fs-write-usr"), "blocked");
        assert_eq!(outcome(&v, "proc-env-secret"), "blocked");
        assert_eq!(code, 1, "{file}: an escape must fail the run");
        let (code, _) = probe(&["--policy", &path, "--only", &only, "--expect-fail", &escapes.join(",")]);
        assert_eq!(code, 0, "{file}: expected escapes must not fail the run");
    }
}

#[test]
fn junit_and_bad_arguments() {
    if needs_root() {
        return;
    }
    let out = Command::new(STOCKADE)
        .args(["probe", "--only", "keyctl,fs-write-usr,x32-getpid", "--format", "junit"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let x = String::from_utf8(out.stdout).unwrap();
    assert_eq!(x.matches("<testcase ").count(), 3, "{x}");
    assert!(x.contains("failures=\"0\""), "{x}");
    let out = Command::new(STOCKADE).args(["probe", "--only", "keyctll"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did you mean keyctl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The positive control: outside any jail, in an environment arranged for each probe to succeed,
/// every probe of the battery must report "escaped" — a probe that cannot is blind to the escape
/// it names, and its "blocked" under a policy proves nothing.
#[test]
fn every_probe_reports_its_escape_in_the_positive_control() {
    if needs_root() {
        return;
    }
    let (code, v) = probe(&["--control"]);
    let reports = v["reports"].as_array().unwrap();
    assert_eq!(reports.len(), stockade::probe::catalogue().len());
    let unseen: Vec<&serde_json::Value> = reports.iter().filter(|r| r["outcome"] != "escaped").collect();
    assert!(unseen.is_empty(), "probes that could not see their escape: {unseen:#?}");
    assert_eq!(code, 0);
    // What the escaping probes did stayed in the control's throwaway namespaces.
    // (The sethostname probe sets "escaped"; the host's name is compared with that, not with a
    // reading before, which anything else on the host could change meanwhile.)
    assert_ne!(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim(), "escaped");
    for p in ["/usr/stockade-probe", "/stockade-probe", "/etc/stockade-probe"] {
        assert!(!std::path::Path::new(p).exists(), "{p} left on the host");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("stockade-control"), "{mounts}");
}

#[test]
fn the_control_reports_in_junit_and_refuses_a_policy() {
    if needs_root() {
        return;
    }
    let out =
        Command::new(STOCKADE).args(["probe", "--control", "--only", "keyctl", "--format", "junit"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("failures=\"0\""));
    let out = Command::new(STOCKADE).args(["probe", "--control", "--policy", "strict"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policy"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The counts the README states are the battery's.
#[test]
fn the_readme_states_the_number_of_probes() {
    let readme = std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let number_before = |marker: &str| -> usize {
        let head = readme.split(marker).next().unwrap_or_else(|| panic!("no {marker:?} in the README"));
        head.rsplit(char::is_whitespace).next().unwrap().parse().unwrap()
    };
    let all = stockade::probe::catalogue();
    assert_eq!(number_before(" escape probes inside"), all.len());
    assert_eq!(number_before(" syscall probes (everything"), all.iter().filter(|(_, c, _)| *c == "syscalls").count());
}
