//! Packaging artefacts: the rootfs recipe, the Containerfile, the systemd unit, the Kubernetes
//! manifests, completions and the man page — each checked against the binary it ships.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(p: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn worker_flags() -> String {
    String::from_utf8(Command::new(STOCKADE).args(["worker", "--help"]).output().unwrap().stdout).unwrap()
}

#[test]
fn the_tiny_rootfs_is_stripped_reproducible_and_runs_a_jail() {
    let d = TempDir::new("rootfs");
    let build = |name: &str| {
        let out = d.path().join(name);
        let o = Command::new(format!("{ROOT}/rootfs/build.sh"))
            .args(["--tiny"])
            .arg(&out)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("stripped setuid/setgid bits from:\n  /bin/setuid-demo"),
            "{o:?}"
        );
        let m = std::fs::read_to_string(format!("{}.manifest", out.display())).unwrap();
        let sha = m.lines().find_map(|l| l.strip_prefix("tree-sha256: ")).unwrap().to_owned();
        assert_eq!(sha.len(), 64);
        (out, sha)
    };
    let (a, sha_a) = build("a");
    let (_b, sha_b) = build("b");
    assert_eq!(sha_a, sha_b, "two builds of the same inputs differ");
    let suid = Command::new("find").arg(&a).args(["-perm", "/6000"]).output().unwrap();
    assert!(suid.stdout.is_empty(), "setuid files left: {}", String::from_utf8_lossy(&suid.stdout));
    if !is_root() {
        return;
    }
    // Make the image readable by the jail's unprivileged host uid, as an installed image is.
    Command::new("chmod").args(["-R", "a+rX"]).arg(&a).status().unwrap();
    let p = d.path().join("p.toml");
    std::fs::write(
        &p,
        format!("extends = \"default\"\n[filesystem]\nrootfs = \"{}\"\netc = [\"/etc/image-release\"]\n", a.display()),
    )
    .unwrap();
    let r = stockade_run(
        &["--policy", p.to_str().unwrap()],
        &["/bin/bash", "-c", "cat /etc/image-release; ls /bin /usr/bin"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("stockade-tiny 1\n"), "{r:?}");
    assert!(r.stdout.lines().any(|l| l == "setuid-demo"), "{r:?}");
    assert!(!r.stdout.contains("python3"), "host binaries visible: {r:?}");
}

#[test]
fn the_containerfile_is_well_formed_and_copies_what_exists() {
    let text = read("Containerfile");
    let mut stages = Vec::new();
    let mut logical = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        logical.push_str(line.trim_end_matches('\\'));
        if line.ends_with('\\') {
            continue;
        }
        let l = std::mem::take(&mut logical);
        let mut words = l.split_whitespace();
        let kw = words.next().unwrap();
        assert!(
            ["FROM", "RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "ENV", "ARG", "LABEL", "EXPOSE"]
                .contains(&kw),
            "unknown instruction {kw:?} in {l:?}"
        );
        let args: Vec<&str> = words.collect();
        match kw {
            "FROM" => {
                if let Some(i) = args.iter().position(|a| a.eq_ignore_ascii_case("as")) {
                    stages.push(args[i + 1].to_owned());
                }
            }
            "COPY" => {
                let from = args.iter().find_map(|a| a.strip_prefix("--from="));
                let srcs = &args[..args.len() - 1];
                match from {
                    Some(stage) => assert!(stages.iter().any(|s| s == stage), "COPY --from={stage}: no such stage"),
                    None => {
                        for s in srcs {
                            assert!(Path::new(ROOT).join(s).exists(), "COPY {s}: not in the repository");
                        }
                    }
                }
            }
            "ENTRYPOINT" | "CMD" => {
                serde_json::from_str::<Vec<String>>(&args.join(" "))
                    .unwrap_or_else(|e| panic!("{kw} is not exec form: {e}"));
            }
            _ => {}
        }
    }
    assert!(logical.is_empty(), "dangling line continuation");
    assert_eq!(stages, ["build", "rootfs"]);
    assert!(
        !text.contains("--privileged\n") && !text.lines().any(|l| !l.starts_with('#') && l.contains("--privileged"))
    );
}

#[test]
fn the_systemd_unit_uses_a_credential_and_real_flags() {
    let unit = read("deploy/systemd/stockade.service");
    assert!(unit.contains(&format!("LoadCredential={}:", stockade::worker::key::CREDENTIAL_NAME)));
    assert!(!unit.lines().any(|l| l.starts_with("Environment=") && l.to_uppercase().contains("KEY")));
    let flags = worker_flags();
    let exec: String = unit
        .split("ExecStart=")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.contains('='))
        .collect();
    for f in exec.split_whitespace().filter(|w| w.starts_with("--") && *w != "--log") {
        assert!(flags.contains(f), "ExecStart uses {f}, which `stockade worker` does not have");
    }
    for want in
        ["NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "CapabilityBoundingSet="]
    {
        assert!(unit.contains(want), "{want}");
    }
    // A configuration error is not restarted forever: the worker exits 2 for one, and the unit
    // does not restart on 2 (nor more than five times in ten minutes on anything else).
    assert!(unit.contains("RestartPreventExitStatus=2"), "{unit}");
    assert!(unit.contains("StartLimitBurst=5") && unit.contains("StartLimitIntervalSec=600"), "{unit}");
    let state = std::env::temp_dir().join(format!("stockade-unit-test-{}", std::process::id()));
    let o = Command::new(STOCKADE)
        .args(["worker", "--environment-id", "env_x", "--api-url", "http://127.0.0.1:9", "--environment-key", "k"])
        .args(["--policy", "/nonexistent/policy.toml", "--state-dir"])
        .arg(&state)
        .env_remove("ANTHROPIC_API_KEY")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&state);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    // The score the README states, where systemd-analyze can compute it offline.
    if !tool_present("systemd-analyze") {
        return skip("systemd-analyze is not installed (Debian: systemd); the unit's exposure score was not checked");
    }
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true", &format!("{ROOT}/deploy/systemd/stockade.service")])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let score: f64 = out
        .lines()
        .find_map(|l| l.split("stockade.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no score in {out}"));
    assert!(score <= 4.7, "exposure {score}");
    assert!(read("README.md").contains(&format!("{score:.1} OK")), "README does not state the score {score}");
}

#[test]
fn the_kubernetes_manifests_parse_and_match_the_worker() {
    let dir = Path::new(ROOT).join("deploy/k8s");
    let script = "import sys, json, yaml\nout = {}\nfor f in sys.argv[1:]:\n    out[f] = [d for d in yaml.safe_load_all(open(f)) if d]\nprint(json.dumps(out))";
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    let o = Command::new("python3")
        .args(["-c", script])
        .args(&files)
        .output()
        .expect("python3 with PyYAML (.ci/run installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let docs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let all: Vec<&serde_json::Value> = docs.as_object().unwrap().values().flat_map(|v| v.as_array().unwrap()).collect();
    let kinds: Vec<&str> = all.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for k in ["Deployment", "Secret", "ConfigMap", "Service", "ScaledObject"] {
        assert!(kinds.contains(&k), "no {k}");
    }
    let dep = all.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "stockade-worker").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let flags = worker_flags();
    for a in
        c["args"].as_array().unwrap().iter().filter_map(|a| a.as_str()).filter(|a| a.starts_with("--") && *a != "--log")
    {
        assert!(flags.contains(a), "the Deployment passes {a}, which `stockade worker` does not have");
    }
    // A pod being scaled in gets the worker's whole shutdown (in-flight calls finish, then the
    // worker's own escalation) before the kubelet's SIGKILL: the grace period outlasts
    // --shutdown-timeout, with slack for the escalation.
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
    let timeout =
        args.iter().position(|a| *a == "--shutdown-timeout").map(|i| args[i + 1]).expect("--shutdown-timeout");
    let timeout = stockade::util::parse_duration(timeout).unwrap().as_secs();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(grace >= timeout + 10, "terminationGracePeriodSeconds {grace} vs --shutdown-timeout {timeout}s");
    // The key arrives as a file from the Secret, never as an environment variable.
    assert!(c["env"].as_array().unwrap().iter().all(|e| !e["name"].as_str().unwrap().contains("KEY")));
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert!(c["volumeMounts"].as_array().unwrap().iter().any(|m| m["name"] == "key"));
    // Autoscaling as shipped: the trigger reads the exporter's /stats (no header it cannot send),
    // and the exporter runs a real `stockade stats --serve` with the organisation key as a file.
    let so = all.iter().find(|d| d["kind"] == "ScaledObject").unwrap();
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["metadata"]["valueLocation"], "depth");
    assert!(trigger["authenticationRef"].is_null(), "{trigger}");
    let url = trigger["metadata"]["url"].as_str().unwrap();
    let exporter =
        all.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "stockade-queue-exporter").unwrap();
    let svc =
        all.iter().find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "stockade-queue-exporter").unwrap();
    let port = svc["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(url, format!("http://stockade-queue-exporter.stockade.svc:{port}/stats"));
    let ec = &exporter["spec"]["template"]["spec"]["containers"][0];
    let eargs: Vec<&str> = ec["args"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert!(eargs.contains(&"stats") && eargs.contains(&"--serve"), "{eargs:?}");
    let stats_help =
        String::from_utf8(Command::new(STOCKADE).args(["stats", "--help"]).output().unwrap().stdout).unwrap();
    for f in eargs.iter().filter(|a| a.starts_with("--") && **a != "--log") {
        assert!(stats_help.contains(f), "the exporter passes {f}, which `stockade stats` does not have");
    }
    let serve = eargs[eargs.iter().position(|a| *a == "--serve").unwrap() + 1];
    assert!(serve.ends_with(&format!(":{port}")), "{serve} vs the Service's {port}");
    assert!(ec["env"].as_array().unwrap().iter().all(|e| !e["name"].as_str().unwrap().contains("KEY")));
    // The shipped policy parses and says what it relaxes.
    let cm = all.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let d = TempDir::new("k8s-policy");
    let p = d.path().join("worker.toml");
    std::fs::write(&p, cm["data"]["worker.toml"].as_str().unwrap()).unwrap();
    let o = Command::new(STOCKADE).args(["audit", p.to_str().unwrap(), "--format", "json"]).output().unwrap();
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = a[0]["findings"].as_array().unwrap().iter().find(|f| f["id"] == "limits.enforcement").unwrap();
    assert_eq!(f["verdict"], "partial");
    // As shipped: the pod is not root, and the policy is one a user without root can run.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let (pp, _) = stockade::policy::load(Some(p.to_str().unwrap())).unwrap();
    assert!(!pp.trail.exec && pp.limits.workspace_size.is_none(), "the pod's policy needs root");
    // The pod's resources hold --max-sessions sessions of that policy: their memory, CPU and disk
    // limits added up, and the measured idle cost of each on top of the memory.
    let (policy, _) = stockade::policy::load(Some(p.to_str().unwrap())).unwrap();
    let n = args.iter().position(|a| *a == "--max-sessions").map(|i| args[i + 1].parse::<u64>().unwrap()).unwrap();
    let limits = &c["resources"]["limits"];
    let quantity = |q: &serde_json::Value| -> u64 {
        let q = q.as_str().map(str::to_owned).unwrap_or_else(|| q.to_string());
        let (num, mult) = match q.trim_end_matches(char::is_alphabetic) {
            x if q.ends_with("Gi") => (x, 1u64 << 30),
            x if q.ends_with("Mi") => (x, 1 << 20),
            x => (x, 1),
        };
        num.parse::<u64>().unwrap_or_else(|_| panic!("quantity {q}")) * mult
    };
    let l = &policy.limits;
    let per_session_memory = l.memory.expect("the pod policy sets limits.memory").0 + (4 << 20);
    assert!(quantity(&limits["memory"]) >= n * per_session_memory + (64 << 20), "memory for {n} sessions");
    // Without a filesystem per session (the pod is not root) the pod's ephemeral-storage is the
    // bound, sized for the default policy's per-session room.
    let (default, _) = stockade::policy::load(Some("default")).unwrap();
    let room = |p: &stockade::policy::Policy| {
        p.limits.workspace_size.map(|s| s.0).zip(p.limits.outputs_size.map(|s| s.0)).map(|(w, o)| w + o)
    };
    let disk = room(&policy).or_else(|| room(&default)).unwrap() + policy.trail.max_size.0;
    assert!(quantity(&limits["ephemeral-storage"]) >= n * disk, "ephemeral-storage for {n} sessions");
    let cpu: f64 = limits["cpu"].as_str().unwrap().parse().unwrap();
    assert!(cpu >= n as f64 * l.cpu.expect("limits.cpu"), "cpu for {n} sessions");
}

/// The worker as the shipped Deployment runs it: as uid 10001 (no root), with the ConfigMap's
/// policy as it is. The demo (a local control plane and a worker in one process) serves its
/// scripted session, bash calls included, under that policy.
#[test]
fn the_kubernetes_pods_user_and_policy_serve_a_session() {
    if needs_root() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let cm = std::fs::read_to_string(Path::new(ROOT).join("deploy/k8s/configmap.yaml")).unwrap();
    let text: String = cm
        .split("worker.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let dir = TempDir::new("k8s-pod");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let policy = dir.path().join("worker.toml");
    std::fs::write(&policy, text).unwrap();
    let o = Command::new(STOCKADE)
        .arg("demo")
        .uid(10001)
        .gid(10001)
        .env_clear()
        .env("HOME", dir.path())
        .env("TMPDIR", dir.path())
        .env("STOCKADE_POLICY", &policy)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("demo finished") && !out.contains("error: bash"), "{out}");
}

#[test]
fn completions_and_man_page_cover_every_command() {
    let bash = Command::new(STOCKADE).args(["completions", "bash"]).output().unwrap();
    let b = String::from_utf8(bash.stdout).unwrap();
    let man = String::from_utf8(Command::new(STOCKADE).arg("man").output().unwrap().stdout).unwrap();
    assert!(man.starts_with(".ie") && man.contains(".TH stockade 1"));
    for sub in [
        "run",
        "check",
        "policy",
        "session",
        "audit",
        "probe",
        "worker",
        "webhook",
        "control-plane",
        "stats",
        "stop",
        "demo",
    ] {
        assert!(b.contains(sub), "completion lacks {sub}");
        // stockade(1) names each subcommand's own page.
        assert!(man.contains(&format!("stockade\\-{}(1)", sub.replace('-', "\\-"))), "man page lacks {sub}");
    }
    assert!(!man.contains("__probe"));
}

/// `stockade man --out DIR`: a page per subcommand, nested ones included, each with the
/// sections a man page needs, and stockade.toml(5); `man` renders them.
#[test]
fn man_pages_cover_every_subcommand_and_the_policy_format() {
    let dir = TempDir::new("man");
    let out = Command::new(STOCKADE).args(["man", "--out"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // An installable tree: man1/ and man5/, nothing else.
    let sections: std::collections::BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(sections, ["man1", "man5"].map(String::from).into(), "{sections:?}");
    let names: std::collections::BTreeSet<String> = sections
        .iter()
        .flat_map(|s| std::fs::read_dir(dir.path().join(s)).unwrap().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".1") || n == "stockade.toml.5"), "{names:?}");
    let page_path = |n: &str| dir.path().join(if n.ends_with(".5") { "man5" } else { "man1" }).join(n);
    for want in [
        "stockade.1",
        "stockade-run.1",
        "stockade-policy-show.1",
        "stockade-policy-groups.1",
        "stockade-worker-run.1",
        "stockade-control-plane-session-create.1",
        "stockade-man.1",
        "stockade.toml.5",
    ] {
        assert!(names.contains(want), "{want} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("__probe") || n.contains("help")), "{names:?}");
    for n in names.iter().filter(|n| n.ends_with(".1")) {
        let text = std::fs::read_to_string(page_path(n)).unwrap();
        for section in
            [".SH NAME", ".SH SYNOPSIS", ".SH \"EXIT STATUS\"", ".SH ENVIRONMENT", ".SH FILES", ".SH EXAMPLES"]
        {
            assert!(text.contains(section), "{n}: no {section}");
        }
    }
    let worker = std::fs::read_to_string(page_path("stockade-worker.1")).unwrap();
    assert!(worker.contains("ANTHROPIC_ENVIRONMENT_KEY") && worker.contains("stockade\\-worker\\-run(1)"), "{worker}");
    if !tool_present("man") {
        skip("man is not installed (Debian: man-db); the pages were not rendered");
    } else {
        // Found by name in the tree, as an installed page is.
        for (section, n) in [("1", "stockade-policy-show"), ("5", "stockade.toml")] {
            let r = Command::new("man")
                .arg("-M")
                .arg(dir.path())
                .args([section, n])
                .env("MANWIDTH", "80")
                .env("MANPAGER", "cat")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&r.stdout);
            assert!(r.status.success() && (text.contains("EXIT STATUS") || section == "5"), "{n}: {r:?}");
            assert!(!String::from_utf8_lossy(&r.stderr).contains("warning"), "{n}: {r:?}");
        }
    }
    // Without --out: stockade(1) on stdout, whose subcommand list names real pages.
    let page = Command::new(STOCKADE).arg("man").output().unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains("stockade\\-run(1)") && names.contains("stockade-run.1"));
}

/// deploy/prometheus/alerts.yml and deploy/grafana/stockade.json: well formed, every rule
/// complete, and every metric they read one that Stockade exports (a worker's /metrics, or
/// `stockade stats --prometheus`). No PromQL checker installs from the package registries here,
/// so the check is structural.
#[test]
fn alert_rules_and_dashboard_read_only_metrics_stockade_exports() {
    use stockade::worker::metrics::{queue_gauges, Metrics};
    let m = Metrics::default();
    m.poll("item");
    m.tool_call("bash", false, std::time::Duration::from_millis(3));
    m.jail_built(std::time::Duration::from_millis(9));
    let stats: stockade::control_plane::wire::WorkQueueStats = serde_json::from_value(serde_json::json!({
        "depth": 1, "pending": 0, "oldest_queued_at": null, "workers_polling": 1
    }))
    .unwrap();
    let exported = format!("{}{}", m.render(), queue_gauges("env_x", &stats, std::time::SystemTime::now()));
    let known: std::collections::BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    let metrics_in = |expr: &str| -> Vec<String> {
        let mut v = Vec::new();
        let b = expr.as_bytes();
        let mut i = 0;
        while let Some(at) = expr[i..].find("stockade_") {
            let start = i + at;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            v.push(expr[start..end].to_owned());
            i = end;
        }
        v
    };
    let script = "import sys, json, yaml\nprint(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let o = Command::new("python3")
        .args(["-c", script, &format!("{ROOT}/deploy/prometheus/alerts.yml")])
        .output()
        .expect("python3 with PyYAML (.ci/run installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rules: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut names = Vec::new();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().unwrap_or_else(|| panic!("a rule without a name: {r}"));
            let expr = r["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr"));
            assert!(["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap_or("")), "{name}");
            assert!(r["annotations"]["summary"].is_string(), "{name}: no summary");
            assert_eq!(expr.matches('(').count(), expr.matches(')').count(), "{name}: {expr}");
            for metric in metrics_in(expr) {
                assert!(known.contains(&metric), "{name} reads {metric}, which Stockade does not export: {known:?}");
            }
            names.push(name.to_owned());
        }
    }
    for want in [
        "StockadeQueueGrowing",
        "StockadeOldestQueuedItemTooOld",
        "StockadeNoWorkerPolling",
        "StockadeLeaseLosses",
        "StockadeJailBuildFailures",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} rule");
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/deploy/grafana/stockade.json")).unwrap())
            .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 6);
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            for metric in metrics_in(t["expr"].as_str().unwrap()) {
                assert!(known.contains(&metric), "panel {} reads {metric}: {known:?}", p["title"]);
            }
        }
    }
}

/// Whether `tool` runs here.
fn tool_present(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The README's table of trail events is the binary's own list: `stockade trail --event` takes
/// every event the README names, and the README names every event a trail records.
#[test]
fn the_readme_names_every_trail_event_the_binary_records() {
    let readme = read("README.md");
    let table = readme.split("| event | fields |").nth(1).expect("the trail events table");
    let named: Vec<&str> =
        table.lines().skip(2).take_while(|l| l.starts_with("| `")).filter_map(|l| l.split('`').nth(1)).collect();
    assert_eq!(named, stockade::session::trail::EVENTS, "README table against the binary's list");
    let o = Command::new(STOCKADE)
        .args(["trail", "x", "--state-dir", "/nonexistent", "--event", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains(&stockade::session::trail::EVENTS.join(", ")), "{o:?}");
}

/// What `.ci/run` installs on a fresh machine is what the README's Development section lists as
/// the suite's prerequisites: a newcomer running `cargo test` by hand learns it from there.
#[test]
fn the_readme_lists_every_prerequisite_ci_installs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let ci = std::fs::read_to_string(format!("{root}/.ci/run")).unwrap();
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let dev = readme.split("## Development").nth(1).expect("a Development section");
    let mut named = Vec::new();
    for (marker, end) in [("apt-get install -y -qq ", [';', ' ', '&']), ("pip install --quiet ", [';', ' ', '\n'])] {
        for part in ci.split(marker).skip(1) {
            let pkg: String = part.chars().take_while(|c| !end.contains(c)).collect();
            if !pkg.starts_with('"') {
                named.push(pkg);
            }
        }
    }
    for target in ["x86_64-unknown-linux-musl", "clippy"] {
        assert!(ci.contains(target), "{target} is no longer in .ci/run: update this test");
        named.push(target.to_owned());
    }
    assert!(named.len() >= 10, "{named:?}");
    let missing: Vec<&String> = named.iter().filter(|p| !dev.contains(&format!("`{p}`"))).collect();
    assert!(missing.is_empty(), "installed by .ci/run but not listed in the README's Development section: {missing:?}");
    assert!(ci.contains("cargo test --locked --no-fail-fast"), "a failing suite must not hide the others");
}
