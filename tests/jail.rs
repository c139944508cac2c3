//! Real jails, no mocks: every step of the jail observably in effect, plus exit codes, signals,
//! timeouts, teardown and hostile policies.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------- step 1: namespaces and id maps ----------

#[test]
fn namespaces_are_all_new_and_ids_map_to_an_unprivileged_range() {
    if needs_root() {
        return;
    }
    let (_d, p) = policy("default", "");
    let r = sh(
        &p,
        "for n in user mnt pid ipc uts net cgroup; do echo $n $(readlink /proc/self/ns/$n); done; \
                    cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; echo parent $PPID",
    );
    assert_eq!(r.code, 0, "{r:?}");
    for line in r.stdout.lines().take(7) {
        let (name, inside) = line.split_once(' ').unwrap();
        let host = std::fs::read_link(format!("/proc/self/ns/{name}")).unwrap();
        assert_ne!(inside, host.to_str().unwrap(), "{name} namespace shared with host");
    }
    let rest: Vec<&str> = r.stdout.lines().skip(7).map(str::trim).collect();
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    // A range of the jail's own: host_id_base (100000) plus a multiple of 65536 (`idpool`).
    let uid_map: Vec<u64> = squash(rest[0]).split(' ').map(|n| n.parse().unwrap()).collect();
    assert!(
        uid_map[0] == 0 && uid_map[2] == 65536 && uid_map[1] >= 100000 && (uid_map[1] - 100000) % 65536 == 0,
        "uid_map {uid_map:?}"
    );
    assert_eq!(squash(rest[1]), squash(rest[0]), "gid_map");
    assert_eq!(rest[2], "1000");
    assert_eq!(rest[3], "1000");
    assert_eq!(rest[4], "parent 1", "the command is a child of the jail's init");
}

#[test]
fn pid_namespace_shows_only_the_jail() {
    let (_d, p) = policy("default", "");
    let r = sh(&p, "ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '");
    assert_eq!(r.code, 0, "{r:?}");
    let n: usize = r.stdout.lines().next().unwrap().parse().unwrap();
    // init, sh, and the pipeline's ls and grep
    assert!(n <= 4, "saw {n} processes: {r:?}");
    assert!(r.stdout.contains("stockade"), "pid 1 is Stockade's init: {r:?}");
}

#[test]
fn the_command_runs_on_every_cpu_the_caller_may_use() {
    // Nothing pins a jail: the command and the init have the caller's CPU set.
    let own = |status: &str| {
        status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|v| v.trim().to_owned()).unwrap()
    };
    let mine = own(&std::fs::read_to_string("/proc/self/status").unwrap());
    let (_d, p) = policy("default", "");
    let r = sh(&p, "cat /proc/self/status; cat /proc/1/status");
    assert_eq!(r.code, 0, "{r:?}");
    let mut parts = r.stdout.split("Name:").filter(|s| !s.is_empty());
    let (command, init) = (parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(own(command), mine, "the command's CPUs");
    assert_eq!(own(init), mine, "the init's CPUs");
}

// ---------- step 2: mounts ----------

#[test]
fn root_holds_only_what_the_policy_names() {
    let (_d, p) = policy("default", "");
    let r = sh(
        &p,
        "ls -A / | tr '\\n' ' '; echo; ls -A /dev | tr '\\n' ' '; echo; cat /etc/passwd /etc/group /etc/hostname",
    );
    assert_eq!(r.code, 0, "{r:?}");
    let mut lines = r.stdout.lines();
    let root: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    for must in ["usr", "etc", "proc", "dev", "tmp", "workspace", "mnt"] {
        assert!(root.contains(&must), "missing /{must}: {root:?}");
    }
    for never in ["root", "home", "var", "sys", "boot", "run", "srv", "work"] {
        assert!(!root.contains(&never), "/{never} visible: {root:?}");
    }
    let dev: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let mut dev_sorted = dev.clone();
    dev_sorted.sort();
    assert_eq!(
        dev_sorted,
        ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"],
        "only the minimal device set"
    );
    let rest: Vec<&str> = lines.collect();
    assert_eq!(rest, ["agent:x:1000:1000:agent:/workspace:/bin/sh", "agent:x:1000:", "stockade"]);
}

#[test]
fn host_secrets_are_absent_and_system_paths_read_only() {
    let (_d, p) = policy("default", "");
    let r = sh(
        &p,
        "for f in /etc/shadow /root /home /var/run/docker.sock /run; do [ -e $f ] && echo \"VISIBLE $f\"; done; \
         for f in /usr/x /etc/x /x /bin/x /lib/x /dev/x; do if touch $f 2>/dev/null; then echo \"WROTE $f\"; fi; done; \
         if echo c > /proc/sys/kernel/core_pattern 2>/dev/null; then echo WROTE core_pattern; fi; \
         if [ -e /sys/kernel ]; then echo VISIBLE /sys; fi; \
         touch /tmp/ok /workspace/ok /mnt/session/outputs/ok /dev/shm/ok && echo writable-ok; \
         awk '$2==\"/\"{print $4}' /proc/self/mounts | cut -d, -f1",
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("VISIBLE") && !r.stdout.contains("WROTE"), "{r:?}");
    assert!(r.stdout.contains("writable-ok"), "{r:?}");
    assert!(r.stdout.trim_end().ends_with("ro"), "root mount not read-only: {r:?}");
}

#[test]
fn setuid_bits_are_ignored_by_nosuid_mounts() {
    let (_d, p) = policy("default", "");
    let r = sh(&p, "grep -E ' /(usr|workspace|tmp) ' /proc/self/mounts");
    let mounts: Vec<&str> = r.stdout.lines().collect();
    // The positive control: the three mounts are there to be looked at.
    for m in ["/usr", "/workspace", "/tmp"] {
        assert!(mounts.iter().any(|l| l.split_whitespace().nth(1) == Some(m)), "no {m} mount: {r:?}");
    }
    for l in &mounts {
        let opts = l.split_whitespace().nth(3).unwrap_or("");
        assert!(opts.split(',').any(|o| o == "nosuid"), "a mount without nosuid: {l}");
    }
}

#[test]
fn workspace_symlinks_to_host_paths_confer_nothing() {
    if needs_root() {
        return;
    }
    let ws = TempDir::new("ws").owned_by_jail_user();
    std::os::unix::fs::symlink("/etc/shadow", ws.path().join("shadow")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc/passwd", ws.path().join("passwd")).unwrap();
    std::os::unix::fs::symlink("/root", ws.path().join("rootdir")).unwrap();
    let (_d, p) = policy_for_host_dirs("default", "");
    let r = stockade_run(
        &["--policy", p.to_str().unwrap(), "--workspace", ws.path().to_str().unwrap()],
        &["/bin/sh", "-c", "cat shadow; cat passwd; ls rootdir; echo done"],
    );
    assert!(r.stdout.contains("done"), "{r:?}");
    assert!(!r.stdout.contains("root:"), "host /etc/passwd or /etc/shadow leaked: {r:?}");
    assert!(r.stdout.starts_with("agent:x:1000"), "`..` resolved inside the jail's root: {r:?}");
}

#[test]
fn workspace_writes_land_on_the_host_and_strict_makes_it_read_only() {
    if needs_root() {
        return;
    }
    let ws = TempDir::new("ws").owned_by_jail_user();
    let out = TempDir::new("out").owned_by_jail_user();
    let (_d, p) = policy_for_host_dirs("default", "");
    let args = ["--workspace", ws.path().to_str().unwrap(), "--outputs", out.path().to_str().unwrap()];
    let r = stockade_run(
        &[&["--policy", p.to_str().unwrap()][..], &args].concat(),
        &["/bin/sh", "-c", "printf 'a\\nb' > f.txt && echo result > /mnt/session/outputs/r.txt"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(ws.path().join("f.txt")).unwrap(), b"a\nb");
    assert_eq!(std::fs::read(out.path().join("r.txt")).unwrap(), b"result\n");

    let (_d2, strict) = policy_for_host_dirs("strict", "");
    let r = stockade_run(
        &[&["--policy", strict.to_str().unwrap()][..], &args].concat(),
        &[
            "/bin/sh",
            "-c",
            "cat f.txt; echo; if echo x > g.txt; then echo WROTE; fi; echo copy > /mnt/session/outputs/c.txt",
        ],
    );
    assert!(r.stdout.starts_with("a\nb"), "{r:?}");
    assert!(!r.stdout.contains("WROTE") && !ws.path().join("g.txt").exists(), "{r:?}");
    assert_eq!(std::fs::read(out.path().join("c.txt")).unwrap(), b"copy\n");
}

#[test]
fn proc_is_masked_and_read_only_where_it_matters() {
    let (_d, p) = policy("default", "");
    let r = sh(
        &p,
        "for f in /proc/keys /proc/timer_list /proc/kallsyms /proc/kmsg /proc/kcore; do [ -e $f ] && echo \"$f $(head -c 64 $f | wc -c)\"; done; \
         for d in /proc/acpi /proc/driver /proc/scsi; do [ -d $d ] && echo \"$d $(ls -A $d | wc -l)\"; done; \
         for d in /proc/acpi /proc/driver /proc/scsi; do if mkdir $d/x 2>/dev/null || touch $d/y 2>/dev/null; then echo \"WROTE $d\"; fi; done; \
         if echo 1 > /proc/sys/vm/drop_caches 2>/dev/null; then echo WROTE; fi",
    );
    assert_eq!(r.code, 0, "{r:?}");
    for line in r.stdout.lines() {
        assert!(line.ends_with(" 0"), "unmasked: {line} ({r:?})");
        assert!(!line.contains("WROTE"), "{r:?}");
    }
}

#[test]
fn kernel_files_left_unmasked_stay_unreadable_even_to_a_privileged_jail_root() {
    // Owner-only /proc files (owned by the host's root) get no mask: no jail maps the host's
    // root, so not even a jail root keeping DAC_OVERRIDE, DAC_READ_SEARCH and SYSLOG opens them.
    if needs_root() {
        return;
    }
    let (_d, p) = policy("default", "[capabilities]\nkeep = [\"DAC_OVERRIDE\", \"DAC_READ_SEARCH\", \"SYSLOG\"]");
    let r = stockade_run(
        &["--policy", p.to_str().unwrap(), "--uid", "0"],
        &[
            "sh",
            "-c",
            "grep CapEff /proc/self/status; \
             for f in /proc/kmsg /proc/timer_list /proc/vmallocinfo /proc/kpageflags /proc/kcore; do \
               [ -e $f ] || continue; grep -q \" $f \" /proc/self/mountinfo && echo \"masked $f\"; \
               head -c 1 $f >/dev/null 2>&1 && echo \"READ $f\"; done; true",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("CapEff:\t0000000400000006"), "the jail root holds the capabilities: {r:?}");
    assert!(!r.stdout.contains("READ"), "{r:?}");
}

// ---------- step 3: hostname and network ----------

#[test]
fn hostname_is_the_policys_and_loopback_follows_the_mode() {
    let (_d, p) = policy("default", "hostname = \"jail-7\"");
    let r = sh(&p, "hostname; cat /proc/sys/kernel/hostname; bash -c 'exec 3<>/dev/tcp/127.0.0.1/9' 2>&1; cat /proc/net/dev | awk 'NR>2{print $1}'");
    assert_eq!(r.code, 0, "{r:?}");
    let host = nix::unistd::gethostname().unwrap();
    assert!(!r.stdout.contains(host.to_str().unwrap()) || host == "jail-7", "host name leaked: {r:?}");
    assert!(r.stdout.starts_with("jail-7\njail-7\n"), "{r:?}");
    assert!(r.stdout.contains("Connection refused"), "loopback mode: lo is up: {r:?}");
    assert_eq!(r.stdout.lines().last().unwrap().trim(), "lo:", "no interface but lo: {r:?}");

    let (_d2, none) = policy("default", "[network]\nmode = \"none\"");
    let r = sh(&none, "bash -c 'exec 3<>/dev/tcp/127.0.0.1/9' 2>&1");
    assert!(r.stdout.contains("Network is unreachable"), "none mode: lo is down: {r:?}");
}

#[test]
fn the_network_namespace_is_new_and_owned_by_the_jails_user_namespace() {
    // It comes with the clone: a new namespace, owned by the jail's user namespace, in every mode.
    let host_net = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/self/ns/net").unwrap());
    let probe = "import fcntl, os\n\
                 net = os.open('/proc/self/ns/net', os.O_RDONLY)\n\
                 owner = fcntl.ioctl(net, 0xb701)  # NS_GET_USERNS\n\
                 print(os.fstat(net).st_ino, os.fstat(owner).st_ino, os.stat('/proc/self/ns/user').st_ino)";
    for mode in ["loopback", "none"] {
        let (_d, p) = policy("default", &format!("[network]\nmode = \"{mode}\""));
        let r = sh(&p, &format!("python3 -c \"{probe}\""));
        assert_eq!(r.code, 0, "{mode}: {r:?}");
        let ino: Vec<u64> = r.stdout.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert_eq!(ino.len(), 3, "{mode}: {r:?}");
        assert_ne!(ino[0], host_net, "{mode}: the jail shares the host's network namespace");
        assert_eq!(ino[1], ino[2], "{mode}: the network namespace's owner is not the jail's user namespace");
    }
}

// ---------- step 4: fds and environment ----------

#[test]
fn only_stdio_reaches_the_command() {
    let (_d, p) = policy("default", "");
    // The outer shell opens fds 7 and 9 that Stockade inherits; none may reach the jail.
    let script = format!(
        "exec 7</etc/hostname 9</etc/passwd; exec {STOCKADE} run --policy {} -- /bin/sh -c 'ls /proc/self/fd | tr \"\\n\" \" \"'",
        p.display()
    );
    let r = to_run(Command::new("/bin/sh").arg("-c").arg(script).stdin(Stdio::null()).output().unwrap());
    assert_eq!(r.code, 0, "{r:?}");
    // 0 1 2, plus the fd `ls` itself uses to read the directory
    assert_eq!(r.stdout.trim(), "0 1 2 3", "{r:?}");
}

#[test]
fn planted_secrets_never_reach_the_jail() {
    let (_d, p) = policy("default", "[env]\npass_add = [\"VISIBLE_VAR\"]");
    let mut c = Command::new(STOCKADE);
    c.args([
        "run",
        "--policy",
        p.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "env; cat /proc/1/environ; cat /proc/1/cmdline",
    ])
    .env("ANTHROPIC_API_KEY", "sk-planted-org-key")
    .env("ANTHROPIC_ENVIRONMENT_KEY", "sk-planted-env-key")
    .env("GITHUB_TOKEN", "ghp-planted")
    .env("AWS_SECRET_ACCESS_KEY", "aws-planted")
    .env("VISIBLE_VAR", "passes")
    .stdin(Stdio::null());
    let r = to_run(c.output().unwrap());
    assert!(!r.stdout.contains("planted") && !r.stderr.contains("planted"), "{r:?}");
    assert!(r.stdout.contains("VISIBLE_VAR=passes"), "{r:?}");
    assert!(r.stdout.contains("HOME=/workspace"), "{r:?}");
    assert!(r.stderr.contains("/proc/1/environ: Permission denied"), "init's environ must be unreadable: {r:?}");

    let r = stockade_run(&["--env", "MY_TOKEN=x"], &["/bin/true"]);
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("MY_TOKEN") && r.stderr.contains("env.allow_secrets"), "{r:?}");
}

// ---------- step 5: rlimits and cgroups ----------

#[test]
fn rlimits_follow_the_policy() {
    let (_d, p) = policy("default", "[limits]\nnofile = 321\nfsize = \"1M\"\nnproc = 77");
    let r = sh(
        &p,
        "grep -E 'Max (open files|file size|processes|core file size)' /proc/self/limits | awk '{print $(NF-2)}'; \
                    head -c 2000000 /dev/zero > /tmp/big; echo \"rc=$?\"; stat -c %s /tmp/big",
    );
    let v: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(&v[..4], ["1048576", "0", "77", "321"], "fsize, core, nproc, nofile: {r:?}");
    assert_eq!(v[4], "rc=153", "SIGXFSZ (128+25) when a file outgrows fsize: {r:?}");
    assert_eq!(v[5], "1048576", "{r:?}");
}

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    if needs_root() {
        return;
    }
    let (_d, p) = policy("default", "[limits]\npids = 24\nnproc = 10000");
    let r = probe(&p, &["fork-bomb"]);
    // init and the probe itself count against the 24.
    assert!(r.stdout.starts_with("fork-bomb stopped after 22 forks\n"), "{r:?}");
    assert!(r.stdout.trim_end().ends_with("EAGAIN"), "{r:?}");
}

#[test]
fn memory_hog_is_killed_inside_the_jail() {
    if needs_root() {
        return;
    }
    let (_d, p) = policy("default", "[limits]\nmemory = \"48M\"");
    let t = Instant::now();
    let r = sh(&p, "tail /dev/zero; echo \"tail status $?\"");
    assert!(r.stdout.contains("tail status 137"), "OOM-killed with SIGKILL: {r:?}");
    assert_eq!(r.code, 0, "the shell survives its child's OOM kill: {r:?}");
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn tmp_is_size_limited() {
    let (_d, p) = policy("default", "[limits]\ntmp_size = \"4M\"");
    let r = sh(&p, "head -c 8000000 /dev/zero > /tmp/fill 2>&1; echo rc=$?; stat -c %s /tmp/fill");
    assert!(r.stdout.contains("rc=1"), "{r:?}");
    let size: u64 = r.stdout.lines().last().unwrap().parse().unwrap();
    assert!(size <= 4 << 20, "{r:?}");
    // One budget for every scratch area (jail::mounts::scratch_dir): what /tmp took, /dev/shm and
    // a workspace without a host directory no longer have.
    let r = sh(
        &p,
        "head -c 3000000 /dev/zero > /tmp/a && echo tmp-ok; \
         head -c 3000000 /dev/zero > /dev/shm/b 2>/dev/null || echo shm-full; \
         rm /dev/shm/b; head -c 3000000 /dev/zero > /workspace/c 2>/dev/null || echo workspace-full; \
         rm /tmp/a; head -c 3000000 /dev/zero > /workspace/c && echo workspace-ok",
    );
    assert_eq!(r.stdout, "tmp-ok\nshm-full\nworkspace-full\nworkspace-ok\n", "{r:?}");
}

#[test]
fn cgroup_is_created_and_removed() {
    if needs_root() {
        return;
    }
    let (_d, p) = policy("default", "[limits]\npids = 99");
    let marker = format!("2.{}{}", std::process::id(), fastrand::u32(..1000));
    let run = std::process::Command::new(STOCKADE)
        .args(["run", "--policy", p.to_str().unwrap(), "--", "/bin/sh", "-c"])
        .arg(format!("grep pids /proc/self/cgroup; sleep {marker}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The jailed sleep, seen from the host: its cgroup is the jail's, named after this run.
    let t = std::time::Instant::now();
    let sleeper = loop {
        if let Some(l) = host_processes_matching(&format!("sleep {marker}")).first() {
            break l.split_whitespace().next().unwrap().to_owned();
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "the jailed command never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let host_view = std::fs::read_to_string(format!("/proc/{sleeper}/cgroup")).unwrap();
    let dir = cgroup_dir(&host_view, "pids").unwrap_or_else(|| panic!("no pids cgroup in {host_view}"));
    assert!(
        dir.to_string_lossy().contains(&format!("stockade-{}-", run.id())),
        "the jail's cgroup is named after its `stockade run` ({}): {}",
        run.id(),
        dir.display()
    );
    // The positive control: the cgroup is there, with the policy's limit, while the jail runs.
    assert_eq!(std::fs::read_to_string(dir.join("pids.max")).unwrap().trim(), "99");
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // Inside, the cgroup namespace makes the jail's cgroup its root.
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().ends_with(":pids:/")
            || String::from_utf8_lossy(&out.stdout).trim() == "0::/"
    );
    // And after it, the cgroup is gone.
    assert!(!dir.exists(), "{} outlived its jail", dir.display());
}

// ---------- step 6: capabilities ----------

#[test]
fn no_capabilities_and_no_new_privs_even_as_uid_0_inside() {
    let (_d, p) = policy("default", "");
    for uid in ["1000", "0"] {
        let r = stockade_run(
            &["--policy", p.to_str().unwrap(), "--uid", uid],
            &["/bin/sh", "-c", "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status; id -u"],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        for l in &lines[..5] {
            assert!(l.ends_with("0000000000000000"), "uid {uid}: {l}");
        }
        assert_eq!(lines[5].split_whitespace().last(), Some("1"), "uid {uid}: {r:?}");
        assert_eq!(lines[6], uid);
    }
}

// ---------- step 7: landlock ----------

#[test]
fn landlock_denies_what_the_mounts_would_allow() {
    let (_d, p) = policy("default", "");
    // /proc is a writable mount and /proc/self/comm belongs to the caller: only landlock stops this.
    let r = sh(&p, "echo pwned > /proc/self/comm && echo WROTE; grep -c . /proc/self/comm");
    assert!(!r.stdout.contains("WROTE"), "{r:?}");
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
}

#[test]
fn landlock_hard_refuses_an_older_abi_and_best_effort_reports_the_drop() {
    let (_d, p) = policy("default", "");
    let r = to_run(
        Command::new(STOCKADE)
            .args(["run", "--policy", p.to_str().unwrap(), "--", "/bin/true"])
            .env("STOCKADE_LANDLOCK_ABI_CAP", "3")
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("landlock: kernel ABI 3 < required 6"), "{r:?}");

    let (_d2, be) = policy("default", "[landlock]\ncompatibility = \"best_effort\"");
    let r = to_run(
        Command::new(STOCKADE)
            .args([
                "run",
                "--report",
                "--policy",
                be.to_str().unwrap(),
                "--",
                "/bin/sh",
                "-c",
                "echo pwned > /proc/self/comm && echo still-confined-fs",
            ])
            .env("STOCKADE_LANDLOCK_ABI_CAP", "3")
            .output()
            .unwrap(),
    );
    assert!(r.stderr.contains("cannot create /proc/self/comm: Permission denied"), "{r:?}");
    assert!(r.stderr.contains("kernel ABI 3") && r.stderr.contains("dropped: ioctl on devices (ABI 5)"), "{r:?}");
    assert!(!r.stdout.contains("still-confined-fs"), "ABI 3 still enforces filesystem rules: {r:?}");

    // Without --report, at the default log level, the downgrade is still said.
    let r = to_run(
        Command::new(STOCKADE)
            .args(["run", "--policy", be.to_str().unwrap(), "--", "/bin/true"])
            .env("STOCKADE_LANDLOCK_ABI_CAP", "3")
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("WARN") && r.stderr.contains("best_effort") && r.stderr.contains("ioctl on devices (ABI 5)"),
        "{r:?}"
    );
}

// ---------- step 8: seccomp ----------

#[test]
fn every_excluded_syscall_is_refused_with_eperm() {
    let (_d, p) = policy("default", "");
    let names: Vec<&str> = stockade::probe::SYSCALL_PROBES.iter().copied().filter(|n| *n != "int80-getpid").collect();
    let r = probe(&p, &names);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.lines().count(), names.len(), "{r:?}");
    for line in r.stdout.lines() {
        let (name, result) = line.split_once(' ').unwrap();
        let want = if name == "clone3" { "ENOSYS" } else { "EPERM" };
        assert_eq!(result, want, "{name}: {r:?}");
    }
    let r = probe(&p, stockade::probe::ALLOWED_PROBES);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.lines().all(|l| l.contains(" ok ")), "allowed calls must work: {r:?}");
}

#[test]
fn kill_policy_kills_on_each_excluded_syscall() {
    let (_d, p) = policy("default", "[seccomp]\ndefault_action = \"kill\"");
    for name in stockade::probe::SYSCALL_PROBES {
        if *name == "clone3" {
            continue; // always ENOSYS, so libc falls back to clone
        }
        let r = probe(&p, &[name]);
        assert_eq!(r.code, 128 + libc::SIGSYS, "{name} was not killed: {r:?}");
    }
    let r = probe(&p, stockade::probe::ALLOWED_PROBES);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn foreign_abis_are_refused() {
    let (_d, p) = policy("default", "");
    let r = probe(&p, &["x32-getpid"]);
    assert_eq!(r.stdout.trim(), "x32-getpid EPERM", "{r:?}");
    let r = probe(&p, &["int80-getpid"]);
    assert_eq!(r.code, 128 + libc::SIGSYS, "int 0x80 must die on the arch check: {r:?}");
}

// ---------- step 9: init, exit codes, signals, teardown ----------

#[test]
fn exit_codes_and_signals_propagate() {
    assert_eq!(stockade_run(&[], &["/bin/sh", "-c", "exit 42"]).code, 42);
    assert_eq!(stockade_run(&[], &["/bin/true"]).code, 0);
    assert_eq!(stockade_run(&[], &["/bin/sh", "-c", "kill -KILL $$"]).code, 137);
    assert_eq!(stockade_run(&[], &["/bin/sh", "-c", "kill -TERM $$"]).code, 143);
    let r = stockade_run(&[], &["no-such-command"]);
    assert_eq!(r.code, 127, "{r:?}");
    assert!(r.stderr.contains("exec: no-such-command: command not found"), "{r:?}");
    let r = stockade_run(&[], &["/etc/passwd"]);
    assert_eq!(r.code, 126, "{r:?}");
    assert!(r.stderr.contains("exec: /etc/passwd: Permission denied"), "{r:?}");
}

#[test]
fn the_command_starts_as_a_session_leader_in_the_workspace_with_no_signal_blocked() {
    // The command's own view: grep is the command here.
    let r = stockade_run(&[], &["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]);
    assert_eq!(r.code, 0, "{r:?}");
    let field = |name: &str| {
        let v = r.stdout.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("{name}: {r:?}"));
        u64::from_str_radix(v.trim(), 16).unwrap()
    };
    assert_eq!(field("SigBlk:"), 0, "no signal blocked: {r:?}");
    // Stockade's own runtime ignores SIGPIPE; the command must not inherit that.
    assert_eq!(field("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{r:?}");

    let r = stockade_run(
        &[],
        &[
            "/bin/bash",
            "-c",
            "echo $$ $(cut -d' ' -f6 /proc/$$/stat); pwd; n=0; for f in /proc/$$/fd/*; do n=$((n+1)); done; echo $n; \
             yes | head -n 1 >/dev/null; echo ${PIPESTATUS[0]}",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    let ids: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(ids[0], ids[1], "session id is the command's pid: {r:?}");
    assert_eq!(lines[1], "/workspace");
    // stdin, stdout, stderr and the directory the glob reads. Counted by the shell itself: a
    // pipeline (`ls | grep`) would also count the shell's own pipe ends, open while it forks.
    assert!(lines[2].parse::<u32>().unwrap() <= 4, "{r:?}");
    assert_eq!(lines[3], "141", "`yes` dies of SIGPIPE once `head` is done: {r:?}");
}

#[test]
fn stdio_passes_through() {
    use std::io::Write;
    let mut child = Command::new(STOCKADE)
        .args(["run", "--", "/bin/sh", "-c", "tr a-z A-Z; echo err >&2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello jail\n").unwrap();
    let r = to_run(child.wait_with_output().unwrap());
    assert_eq!(r.stdout, "HELLO JAIL\n");
    assert_eq!(r.stderr, "err\n");
}

#[test]
fn timeout_kills_everything_including_daemons() {
    let marker = format!("{}.{}", 4000 + std::process::id() % 1000, std::process::id());
    let before = jail_shaped_host_mounts();
    let t = Instant::now();
    let r = stockade_run(
        &["--timeout", "1s"],
        &[
            "/bin/sh",
            "-c",
            &format!(
                "sleep {marker} & (setsid sleep {marker} &) ; nohup sleep {marker} >/dev/null 2>&1 & sleep {marker}"
            ),
        ],
    );
    assert_eq!(r.code, 124, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(host_processes_matching(&format!("sleep {marker}")), Vec::<String>::new());
    assert_eq!(jail_shaped_host_mounts(), before, "a jail's mount reached the host's mount table");
}

/// The host's mounts where a jail's would land if one leaked out of its namespace: its staging
/// root `/tmp` and the tree it builds there (`/tmp/usr`, `/tmp/workspace`, …), in order. Not the
/// whole table, which other jails and workers on the host change as they come and go.
fn jail_shaped_host_mounts() -> Vec<String> {
    const TREE: &[&str] = &[
        "",
        "usr",
        "bin",
        "lib",
        "lib64",
        "lib32",
        "sbin",
        "opt",
        "etc",
        "workspace",
        "mnt",
        "proc",
        "dev",
        "sys",
        "tmp",
        "run",
    ];
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            let point = l.split_whitespace().nth(4).unwrap_or("");
            point == "/tmp"
                || point.strip_prefix("/tmp/").is_some_and(|rest| TREE.contains(&rest.split('/').next().unwrap_or("")))
        })
        .map(str::to_owned)
        .collect()
}

/// A timeout longer than the clock can count to (from a policy, `--timeout` or a session's
/// metadata) means no deadline: the command runs, rather than the supervisor overflowing.
#[test]
fn a_timeout_past_the_clocks_range_is_no_deadline() {
    let r = stockade_run(&["--timeout", "213503982334601d"], &["/bin/sh", "-c", "exit 7"]);
    assert_eq!(r.code, 7, "{r:?}");
}

/// A `/tmp` size as large as a size can be is no limit on the root tmpfs; adding what the root
/// already holds to it overflowed in the jail's PID 1.
#[test]
fn a_tmp_size_at_the_top_of_the_range_is_no_overflow() {
    let (_d, p) = policy("default", "[limits]\ntmp_size = \"18446744073709551615\"");
    let r = stockade_run(&["--policy", p.to_str().unwrap()], &["/bin/sh", "-c", "echo x > /tmp/f && cat /tmp/f"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "x\n"), "{r:?}");
}

#[test]
fn killing_stockade_kills_the_jail() {
    let marker = format!("{}.{}", 5000 + std::process::id() % 1000, std::process::id());
    let mut child = Command::new(STOCKADE)
        .args(["run", "--", "/bin/sh", "-c", &format!("(setsid sleep {marker} &); sleep {marker}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while host_processes_matching(&format!("sleep {marker}")).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(host_processes_matching(&format!("sleep {marker}")).len(), 2, "jail did not start");
    // Seen while the jail runs, so that a concurrent test's jail start removing the leftover
    // early cannot be mistaken for a cgroup that never existed.
    let stale = format!("stockade-{}-", child.id());
    // The jail's own cgroups, seen while it runs: only these are checked after (a Stockade in
    // another pid namespace may have this pid too).
    let mine: Vec<String> = find_stockade_cgroups().into_iter().filter(|c| c.contains(&stale)).collect();
    if is_root() {
        assert!(!mine.is_empty(), "the jail has no cgroup");
    }
    child.kill().unwrap(); // SIGKILL: no cleanup code runs in Stockade
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !host_processes_matching(&format!("sleep {marker}")).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(host_processes_matching(&format!("sleep {marker}")), Vec::<String>::new());
    // Its cgroup could not be removed by the killed Stockade; the next jail removes it once it
    // has stood empty for a second (a younger one may be another Stockade's jail in the making).
    if is_root() {
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(stockade_run(&[], &["/bin/true"]).code, 0);
        let left: Vec<&String> = mine.iter().filter(|c| std::path::Path::new(c.as_str()).exists()).collect();
        assert_eq!(left, Vec::<&String>::new());
    }
}

#[test]
fn sigterm_to_stockade_is_forwarded_then_enforced() {
    let mut child = Command::new(STOCKADE)
        .args([
            "run",
            "--",
            "/bin/sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut buf).unwrap();
    assert_eq!(&buf, b"ready\n");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(status.code(), Some(3));
}

// ---------- policies ----------

#[test]
fn malformed_and_hostile_policies_fail_with_located_errors() {
    let d = TempDir::new("bad");
    // A policy that does not load is an input error (2); one this host cannot build a jail from
    // (a bind source it lacks) is a jail that could not be built (125).
    for (text, needle, code) in [
        ("[limits]\nmemroy = \"1G\"\n", "policy.toml:3:1: unknown field `memroy`", 2),
        ("[seccomp]\nallow = [\"@sytem-service\"]\n", "did you mean `@system-service`", 2),
        ("[filesystem]\nread_only = [\"/nonexistent-stockade-path\"]\n", "mounts: /nonexistent-stockade-path", 125),
        (
            "[filesystem]\nread_write = [\"/:/host\"]\n[landlock]\ncompatibility = \"strict\"\n",
            "unknown variant `strict`",
            2,
        ),
    ] {
        let p = d.path().join("policy.toml");
        // A base named on purpose, so that only the error under test is said.
        std::fs::write(&p, format!("extends = \"none\"\n{text}")).unwrap();
        let r = stockade_run(&["--policy", p.to_str().unwrap()], &["/bin/true"]);
        assert_eq!(r.code, code, "{text:?}: {r:?}");
        assert!(r.stderr.contains(needle), "{text:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "one-line error: {r:?}");
    }
}

#[test]
fn policy_show_resolves_extends() {
    let (_d, p) = policy("strict", "hostname = \"shown\"");
    let o = Command::new(STOCKADE).args(["policy", "show", p.to_str().unwrap()]).output().unwrap();
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success());
    assert!(
        s.contains("hostname = \"shown\"")
            && s.contains("default_action = \"kill\"")
            && s.contains("memory = \"512M\""),
        "{s}"
    );
    // --json is JSON alone.
    let o = Command::new(STOCKADE).args(["policy", "show", p.to_str().unwrap(), "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("policy show --json prints only JSON");
    assert_eq!(v["hostname"], "shown");
    // What it prints loads back as the same policy, silently.
    let d = TempDir::new("policy-show");
    let saved = d.path().join("saved.toml");
    std::fs::write(&saved, &s).unwrap();
    let o = Command::new(STOCKADE).args(["policy", "show", saved.to_str().unwrap(), "--json"]).output().unwrap();
    assert!(o.status.success() && o.stderr.is_empty(), "{o:?}");
    let mut again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut first = v.clone();
    // Only where it came from differs.
    for x in [&mut again, &mut first] {
        x.as_object_mut().unwrap().remove("source");
    }
    assert_eq!(again, first);
}

/// A reader that stops early (`| head`) ends the listing quietly: no panic, no backtrace.
#[test]
fn a_closed_pipe_ends_a_listing_quietly() {
    let mut child = Command::new(STOCKADE)
        .args(["policy", "groups"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before the first line
    let out = child.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

// ---------- rootless ----------

#[test]
fn rootless_jail_as_an_unprivileged_user() {
    if needs_root() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let (_d, p) = policy("default", "[limits]\nenforcement = \"best_effort\"\n[network]\nmode = \"none\"");
    let p_str = p.to_str().unwrap().to_owned();
    let perms = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(p.parent().unwrap(), perms).unwrap();
    let r = to_run(
        Command::new(STOCKADE)
            .args([
                "run",
                "--report",
                "--policy",
                &p_str,
                "--",
                "/bin/sh",
                "-c",
                "id -u; cat /proc/self/uid_map; grep CapEff /proc/self/status; touch /workspace/x && echo ws-ok",
            ])
            .uid(65534)
            .gid(65534)
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["1000", "65534", "1"]);
    assert!(lines[2].ends_with("0000000000000000"));
    assert_eq!(lines[3], "ws-ok");
    assert!(r.stderr.contains("NOT applied"), "best_effort reports the skipped cgroup limits: {r:?}");
    // And says so in the log, once for each of the default's three limits, report or not.
    let warned = r.stderr.lines().filter(|l| l.contains("WARN") && l.contains("a limit was not applied")).count();
    assert_eq!(warned, 3, "{r:?}");

    // With the default (hard) enforcement, missing cgroup delegation is a refusal, not a silent run.
    let (_d2, hard) = policy("default", "[network]\nmode = \"none\"");
    std::fs::set_permissions(hard.parent().unwrap(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let r = to_run(
        Command::new(STOCKADE)
            .args(["run", "--policy", hard.to_str().unwrap(), "--", "/bin/true"])
            .uid(65534)
            .gid(65534)
            .env_clear()
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.starts_with("stockade: cgroups:") && r.stderr.contains("best_effort"), "{r:?}");
}

/// What a user without root gets from the shipped built-ins, as they would try it: `check` says
/// the default cannot run here and names `rootless`, which then runs a command, a session (a
/// bash call included: the shell is spawned by its thread's lane) and the demo; a trail that
/// asks for execs is refused at once, saying why, rather than failing every program.
#[test]
fn a_user_without_root_gets_a_working_jail_from_the_rootless_built_in() {
    if needs_root() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("rootless-home");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let as_nobody = |args: &[&str], stdin: &str| -> Run {
        let mut c = Command::new(STOCKADE);
        c.args(args)
            .uid(65534)
            .gid(65534)
            .env_clear()
            .env("HOME", dir.path())
            .env("TMPDIR", dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
        to_run(child.wait_with_output().unwrap())
    };
    let r = as_nobody(&["check"], "");
    assert_eq!(r.code, 1, "{r:?}");
    let line =
        |name: &str| r.stdout.lines().find(|l| l[5..].starts_with(name)).unwrap_or_else(|| panic!("{name}: {r:?}"));
    assert!(line("cgroup memory").starts_with("NO "), "a cgroup this user cannot make is not ok: {r:?}");
    assert!(line("policy").starts_with("NO ") && line("policy").contains("default"), "{r:?}");
    assert!(line("instead").contains("`rootless`"), "{r:?}");
    let r = as_nobody(&["check", "--policy", "rootless"], "");
    assert_eq!(r.code, 0, "rootless runs here, whatever the lines it does not need say: {r:?}");

    let r = as_nobody(&["run", "--policy", "rootless", "--", "/bin/sh", "-c", "id -u; ulimit -v"], "");
    assert_eq!((r.code, r.stdout.as_str()), (0, "1000\n4194304\n"), "{r:?}");
    let r = as_nobody(
        &["session", "--policy", "rootless"],
        "{\"id\":\"1\",\"name\":\"bash\",\"input\":{\"command\":\"echo shell-ok\"}}\n",
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("shell-ok") && !r.stdout.contains("\"is_error\":true"), "{r:?}");
    let r = as_nobody(&["run", "--policy", "rootless", "--trail", "t.jsonl", "--", "/bin/true"], "");
    // rootless records no execs; the default asks for them, which needs root.
    assert_eq!(r.code, 0, "{r:?}");
    let r = as_nobody(&["run", "--policy", "default", "--trail", "t.jsonl", "--", "/bin/true"], "");
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("trail.exec = true needs Stockade to run as root"), "{r:?}");

    let r = as_nobody(&["demo"], "");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("(policy: rootless)") && r.stdout.contains("demo finished"), "{r:?}");
    assert!(!r.stdout.contains("error: bash"), "{r:?}");
}

// ---------- rootfs ----------

#[test]
fn rootfs_replaces_the_hosts_system_directories() {
    if needs_root() {
        return;
    }
    // A tiny tool image: dash and the libraries it links, nothing else.
    let root = TempDir::new("rootfs");
    let r = root.path();
    for (from, to) in [
        ("/bin/dash", "usr/bin/sh"),
        ("/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6"),
        ("/lib64/ld-linux-x86-64.so.2", "usr/lib64/ld-linux-x86-64.so.2"),
    ] {
        std::fs::create_dir_all(r.join(to).parent().unwrap()).unwrap();
        std::fs::copy(from, r.join(to)).unwrap();
    }
    for (link, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        std::os::unix::fs::symlink(target, r.join(link)).unwrap();
    }
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::write(r.join("etc/image-release"), "tiny 1\n").unwrap();
    let d = TempDir::new("policy");
    let p = d.path().join("rootfs.toml");
    std::fs::write(
        &p,
        format!(
            "extends = \"default\"\n[filesystem]\nrootfs = \"{}\"\nread_only = [\"/usr\", \"-/bin\", \"-/lib\", \"-/lib64\", \"-/opt\"]\netc = [\"/etc/image-release\"]\n",
            r.display()
        ),
    )
    .unwrap();
    let out = stockade_run(
        &["--policy", p.to_str().unwrap()],
        &["/bin/sh", "-c", "echo /usr/bin/*; read l < /etc/image-release; echo $l; [ -e /opt ] || echo no-opt"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "/usr/bin/sh\ntiny 1\nno-opt\n", "only the image's files: {out:?}");
}

#[test]
fn landlock_tcp_rules_admit_only_listed_ports() {
    let (_d, p) = policy("default", "[landlock]\ntcp_connect = [9]\ntcp_bind = []");
    let r = sh(
        &p,
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/9' 2>&1; bash -c 'exec 3<>/dev/tcp/127.0.0.1/10' 2>&1; \
         python3 -c 'import socket; socket.socket().bind((\"127.0.0.1\", 8080))' 2>&1 | tail -1",
    );
    assert!(
        r.stdout.contains("/dev/tcp/127.0.0.1/9: Connection refused"),
        "port 9 is allowed (nothing listens): {r:?}"
    );
    assert!(r.stdout.contains("/dev/tcp/127.0.0.1/10: Permission denied"), "port 10 is refused by landlock: {r:?}");
    assert!(r.stdout.contains("PermissionError"), "bind refused: {r:?}");
}

/// Landlock's port rules govern TCP only: where a policy sets them, an MPTCP or SCTP socket,
/// which would bind and connect past them, cannot be made; without them, MPTCP works as before
/// (the positive control that the protocol is there to refuse).
#[test]
fn with_landlock_tcp_rules_mptcp_and_sctp_sockets_are_refused() {
    let probe = "python3 - <<'EOF'
import socket
for name, kind, proto in [('tcp', socket.SOCK_STREAM, 0), ('mptcp', socket.SOCK_STREAM, 262),
                          ('sctp', socket.SOCK_SEQPACKET, 132), ('sctp-stream', socket.SOCK_STREAM, 132)]:
    try:
        s = socket.socket(socket.AF_INET, kind, proto)
        s.bind(('127.0.0.1', 0))
        print(name, 'bound')
    except OSError as e:
        print(name, 'refused' if e.errno in (1, 13) else 'unsupported' if e.errno in (93, 94, 97) else e.errno)
EOF";
    let (_d, ruled) = policy("default", "[landlock]\ntcp_connect = [9]\ntcp_bind = []");
    let r = sh(&ruled, probe);
    assert!(r.stdout.contains("tcp refused"), "landlock refuses the TCP bind: {r:?}");
    assert!(r.stdout.contains("mptcp refused"), "{r:?}");
    assert!(r.stdout.contains("sctp refused") && r.stdout.contains("sctp-stream refused"), "{r:?}");
    let (_d2, open) = policy("default", "");
    let r = sh(&open, probe);
    assert!(r.stdout.contains("tcp bound"), "{r:?}");
    // The kernel may lack MPTCP; where it has it, the socket is made without landlock rules.
    assert!(r.stdout.contains("mptcp bound") || r.stdout.contains("mptcp unsupported"), "{r:?}");
}

#[test]
fn sys_read_only_is_masked_and_unwritable() {
    let (_d, p) = policy("default", "[filesystem]\nsys = \"read_only\"");
    let r = sh(
        &p,
        "find /sys/kernel/security /sys/firmware -mindepth 1 | wc -l; ls /sys/class >/dev/null && echo class-ok; \
                    if echo 1 > /sys/kernel/mm/ksm/run 2>/dev/null; then echo WROTE; fi; \
                    bash -c 'exec 3<>/dev/tcp/127.0.0.1/9' 2>&1 | grep -o 'Connection refused' | head -1",
    );
    assert_eq!(r.code, 0, "{r:?}");
    // A /sys needs the network namespace to come with the clone; loopback is still up.
    assert_eq!(r.stdout, "0\nclass-ok\nConnection refused\n", "{r:?}");
}

#[test]
fn foreign_owned_workspace_is_id_mapped_and_system_owned_needs_setid_refused() {
    if needs_root() {
        return;
    }
    let ws = TempDir::new("idmap");
    std::fs::write(ws.path().join("existing"), "hi\n").unwrap();
    for p in [ws.path().to_path_buf(), ws.path().join("existing")] {
        std::os::unix::fs::chown(&p, Some(4321), Some(4322)).unwrap();
    }
    let (_d, p) = policy_for_host_dirs("default", "");
    let r = stockade_run(
        &["--policy", p.to_str().unwrap(), "--workspace", ws.path().to_str().unwrap()],
        &[
            "/bin/sh",
            "-c",
            "stat -c '%u:%g' existing; echo more >> existing; echo new > new.txt; stat -c '%u:%g' new.txt",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "1000:1000\n1000:1000\n", "the owner appears as the jail user: {r:?}");
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(ws.path().join("new.txt")).unwrap();
    assert_eq!((m.uid(), m.gid()), (4321, 4322), "created files belong to the directory's owner");
    assert_eq!(std::fs::read_to_string(ws.path().join("existing")).unwrap(), "hi\nmore\n");

    // A system account's directory (root's here) is mapped too, since the default allowlist
    // refuses setuid/setgid modes: what the jail makes there is root's, and never setuid.
    let root_owned = TempDir::new("idmap-root");
    let r = stockade_run(
        &["--policy", p.to_str().unwrap(), "--workspace", root_owned.path().to_str().unwrap()],
        &[
            "/bin/sh",
            "-c",
            "echo x > made; stat -c '%u:%g' made; chmod u+s made || echo refused; mkdir -m 2755 d || echo refused",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "1000:1000\nrefused\nrefused\n", "{r:?}");
    let m = std::fs::metadata(root_owned.path().join("made")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o6000), (0, 0, 0));
    // A policy that lets the jail make setuid files may not map a system account's directory.
    let (_d2, loose) = policy_for_host_dirs("default", "[seccomp]\nallow_add = [\"openat2\"]");
    let r = stockade_run(
        &["--policy", loose.to_str().unwrap(), "--workspace", root_owned.path().to_str().unwrap()],
        &["/bin/true"],
    );
    assert_eq!(r.code, 125, "{r:?}");
    assert!(
        r.stderr.contains("refusing to id-map it onto a system account (uid 0, gid 0)") && r.stderr.contains("openat2"),
        "{r:?}"
    );
}

/// The CI use as a new user tries it: the shipped `ci` policy as it is, a checkout and a results
/// directory just made by root on an ordinary (large) disk. The job runs, what it writes lands in
/// the checkout and the results as root's files, and the audit says what bounds the disk.
#[test]
fn the_ci_policy_runs_a_job_on_a_checkout_root_just_made() {
    if needs_root() {
        return;
    }
    let repo = TempDir::new("ci-repo");
    let results = TempDir::new("ci-results");
    std::fs::write(repo.path().join("Makefile"), "test:\n\techo ok > build.log\n").unwrap();
    let r = stockade_run(
        &[
            "--policy",
            "ci",
            "--workspace",
            repo.path().to_str().unwrap(),
            "--outputs",
            results.path().to_str().unwrap(),
        ],
        &[
            "/bin/sh",
            "-c",
            "sh -c 'cat Makefile >/dev/null; echo ok > build.log' && cp build.log /mnt/session/outputs/",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    use std::os::unix::fs::MetadataExt;
    for f in [repo.path().join("build.log"), results.path().join("build.log")] {
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "ok\n");
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), 0, "{}", f.display());
    }
    let a = Command::new(STOCKADE).args(["audit", "ci"]).output().unwrap();
    let text = String::from_utf8_lossy(&a.stdout);
    assert!(text.contains("partial limits.workspace_size") && text.contains("fill the filesystem it is on"), "{text}");
}

#[test]
fn small_etc_directories_are_copied_and_larger_or_odd_ones_bound() {
    let src = TempDir::new("etc-dirs");
    let s = src.path();
    // As /etc is: readable by the jail's setup user, which copies.
    std::fs::set_permissions(s, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // small: a file, a symlink and a subdirectory with a file: copied as they are.
    std::fs::create_dir_all(s.join("small/sub")).unwrap();
    std::fs::write(s.join("small/conf"), "a = 1\n").unwrap();
    std::os::unix::fs::symlink("/usr/share/zoneinfo/UTC", s.join("small/link")).unwrap();
    std::fs::write(s.join("small/sub/hook"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(s.join("small/sub/hook"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // many: more entries than a copy takes; odd: a FIFO inside.
    std::fs::create_dir(s.join("many")).unwrap();
    for i in 0..12 {
        std::fs::write(s.join(format!("many/f{i}")), "x").unwrap();
    }
    std::fs::create_dir(s.join("odd")).unwrap();
    nix::unistd::mkfifo(&s.join("odd/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let entries: Vec<String> =
        ["small", "many", "odd"].iter().map(|n| format!("\"{}:/etc/{n}\"", s.join(n).display())).collect();
    let (_d, p) = policy("default", &format!("[filesystem]\netc = [{}]", entries.join(", ")));
    let r = sh(
        &p,
        "cat /etc/small/conf; readlink /etc/small/link; stat -c %a /etc/small/sub/hook; ls /etc/many | wc -l; \
         [ -p /etc/odd/fifo ] && echo fifo; touch /etc/small/new 2>/dev/null || echo read-only; \
         for d in small many odd; do grep -q \" /etc/$d \" /proc/self/mountinfo && echo bound $d; done",
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "a = 1\n/usr/share/zoneinfo/UTC\n755\n12\nfifo\nread-only\nbound many\nbound odd\n", "{r:?}");
}

#[test]
fn small_etc_files_are_copied_and_fifos_and_large_files_bound() {
    let src = TempDir::new("etc-src");
    let s = src.path();
    std::fs::write(s.join("small"), "hello etc\n").unwrap();
    std::fs::write(s.join("big"), vec![b'x'; 40_000]).unwrap();
    // Opening a FIFO to copy it would block the jail's start for good.
    nix::unistd::mkfifo(&s.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let mut entries: Vec<String> =
        ["small", "big", "fifo"].iter().map(|n| format!("\"{}:/etc/{n}\"", s.join(n).display())).collect();
    // A destination whose directories the generated /etc lacks: they are made for it.
    entries.push(format!("\"{}:/etc/nested/deeper/small\"", s.join("small").display()));
    let (_d, p) = policy("default", &format!("[filesystem]\netc = [{}]", entries.join(", ")));
    let r = sh(
        &p,
        "cat /etc/small; wc -c < /etc/big; [ -p /etc/fifo ] && echo fifo; cat /etc/nested/deeper/small; \
         for f in small big fifo nested/deeper/small; do grep -q \" /etc/$f \" /proc/self/mountinfo && echo bound $f; done; true",
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "hello etc\n40000\nfifo\nhello etc\nbound big\nbound fifo\n", "{r:?}");
}

/// A jail cgroup whose owner's pid is not alive here may belong to a Stockade in another pid
/// namespace: the sweep leaves it, and what it holds, alone.
#[test]
fn the_sweep_never_touches_a_cgroup_that_holds_processes() {
    if needs_root() {
        return;
    }
    // Where this process's jails go: the pids hierarchy (v1 or v2, whichever has it), beside our
    // own cgroup.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let parent = cgroup_dir(&own, "pids").unwrap_or_else(|| panic!("no cgroup hierarchy in {own}"));
    // A pid no process here has: the "owner" lives in another pid namespace. Near pid_max, and
    // chosen per run, so that two runs of the suite on one host do not share it.
    let owner = (0..300)
        .map(|i| 4_194_000 + (std::process::id() + i) % 300)
        .find(|n| {
            !std::path::Path::new(&format!("/proc/{n}")).exists() && !parent.join(format!("stockade-{n}-0")).exists()
        })
        .expect("a free pid near pid_max");
    let foreign = parent.join(format!("stockade-{owner}-0"));
    std::fs::create_dir(&foreign).unwrap();
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(foreign.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(stockade_run(&[], &["/bin/true"]).code, 0);
    assert!(sleeper.try_wait().unwrap().is_none(), "the sweep killed another Stockade's jail");
    assert!(foreign.exists(), "the sweep removed a cgroup that holds processes");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    // Empty now, and old enough: the next sweep takes it.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(stockade_run(&[], &["/bin/true"]).code, 0);
    assert!(!foreign.exists(), "an empty leftover stayed");
}

/// Without --policy, a command uses $STOCKADE_POLICY (then /etc/stockade/policy.toml, then the
/// built-in default: see the unit test of that order); a bad one is a usage error that says where
/// the name came from.
#[test]
fn the_default_policy_comes_from_stockade_policy() {
    let run = |env: &str| {
        Command::new(STOCKADE)
            .args(["run", "--report", "--", "/bin/true"])
            .env("STOCKADE_POLICY", env)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run("strict");
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("confined by policy builtin:strict"), "{o:?}");
    let o = run("strct");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("$STOCKADE_POLICY: "), "{o:?}");
    // --policy wins over the variable.
    let o = Command::new(STOCKADE)
        .args(["run", "--report", "--policy", "ci", "--", "/bin/true"])
        .env("STOCKADE_POLICY", "strct")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("confined by policy builtin:ci"), "{o:?}");
}

/// A policy file without `extends` starts from nothing: that is said, unless written on purpose.
#[test]
fn a_policy_without_extends_is_warned_about() {
    let d = TempDir::new("bare-policy");
    let bare = d.path().join("bare.toml");
    std::fs::write(&bare, "hostname = \"bare\"\n").unwrap();
    let o = Command::new(STOCKADE).args(["policy", "show", bare.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("WARN") && err.contains("no `extends`"), "{err}");
    let explicit = d.path().join("explicit.toml");
    std::fs::write(&explicit, "extends = \"none\"\nhostname = \"bare\"\n").unwrap();
    let o = Command::new(STOCKADE).args(["policy", "show", explicit.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success() && o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hostname = \"bare\""));
}

/// The report is what the jail saw of itself, not what the policy says: a workspace the policy
/// makes read-only is not listed writable, a host directory it binds read-write is, with the
/// device it comes from; `--report-format json` gives the same view to tools; `--dry-run` runs
/// nothing and says so.
#[test]
fn the_report_is_the_jails_own_view() {
    if needs_root() {
        return;
    }
    let data = TempDir::new("report-data");
    let (_d, p) = policy_for_host_dirs(
        "default",
        &format!("[filesystem]\nworkspace = \"read_only\"\nread_write_add = [\"{}:/data\"]", data.path().display()),
    );
    let r = stockade_run(&["--report", "--policy", p.to_str().unwrap()], &["/bin/true"]);
    assert_eq!(r.code, 0, "{r:?}");
    let fs = r.stderr.lines().find(|l| l.trim_start().starts_with("filesystem")).unwrap_or_else(|| panic!("{r:?}"));
    assert!(fs.contains("read-only; rw: ") && fs.contains("/data (/dev/"), "{fs}");
    assert!(!fs.contains("/workspace"), "the read-only workspace is not writable: {fs}");
    assert!(r.stderr.contains("no_new_privs") && r.stderr.contains("filters on the command"), "{r:?}");

    let r = stockade_run(&["--report-format", "json", "--policy", p.to_str().unwrap()], &["/bin/true"]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(r.stderr.lines().last().unwrap()).unwrap();
    let mounts = v["seen"]["mounts"].as_array().unwrap();
    let at = |path: &str| mounts.iter().find(|m| m["path"] == path).unwrap_or_else(|| panic!("{path}: {v}"));
    assert_eq!((at("/data")["writable"].as_bool(), at("/workspace")["writable"].as_bool()), (Some(true), Some(false)));
    assert_eq!(at("/")["writable"], false);
    assert_eq!(v["seen"]["no_new_privs"], true);
    assert_eq!(v["status"]["exited"], 0);

    let marker = data.path().join("ran");
    let r = stockade_run(&["--dry-run", "--policy", p.to_str().unwrap()], &["/bin/touch", "/data/ran"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("plan of policy") && r.stdout.contains("nothing was run"), "{r:?}");
    assert!(!marker.exists(), "--dry-run ran the command");
}

/// `run -t` gives the command a terminal of its own, a pty Stockade relays: an interactive shell
/// there has job control, while the caller's stdin (here /dev/null) is no terminal at all.
#[test]
fn run_t_gives_the_command_a_terminal_of_its_own() {
    if needs_root() {
        return;
    }
    let script = "case $- in *m*) echo job-control;; esac; [ -t 0 ] && echo stdin-is-a-tty; sleep 30 & jobs; kill %1";
    let o =
        Command::new(STOCKADE).args(["run", "-it", "--", "bash", "-ic", script]).stdin(Stdio::null()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).replace('\r', "");
    assert!(o.status.success(), "{o:?}");
    assert!(out.contains("job-control\nstdin-is-a-tty\n"), "{out}");
    assert!(out.contains("Running") && out.contains("sleep 30 &"), "{out}");
    // Without -t the command has what the caller gave it: no terminal.
    let o = Command::new(STOCKADE)
        .args(["run", "--", "bash", "-c", "[ -t 0 ] && echo tty || echo no-tty"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "no-tty\n");
}

/// People read the policy file's spellings, never Rust's Debug forms.
#[test]
fn reports_use_the_policy_files_spellings() {
    let (_d, p) = policy("default", "[capabilities]\nkeep = [\"CAP_NET_BIND_SERVICE\"]");
    let r = stockade_run(&["--report", "--policy", p.to_str().unwrap()], &["/bin/true"]);
    assert_eq!(r.code, 0, "{r:?}");
    for debug in ["Loopback", "Hard", "Errno", "BestEffort"] {
        assert!(!r.stderr.contains(debug), "{debug} in {r:?}");
    }
    assert!(r.stderr.contains("network      loopback") && r.stderr.contains("default errno"), "{r:?}");
    assert!(r.stderr.contains("capabilities kept: CAP_NET_BIND_SERVICE"), "{r:?}");
    let o = Command::new(STOCKADE).args(["policy", "groups", "@process"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("clone[no namespace flags]") && !text.contains("NoNamespaceFlags"), "{text}");
}

/// A command the seccomp filter kills (`default_action = "kill"`) dies of SIGSYS, and Stockade
/// says which system call did it, from the kernel's log, rather than leave a bare status 159.
#[test]
fn a_command_killed_by_seccomp_is_told_which_system_call() {
    if needs_root() {
        return;
    }
    let (_d, p) = policy("default", "[seccomp]\ndefault_action = \"kill\"");
    // mount(2) is outside every shipped allowlist; perl makes the raw call (165 on x86_64).
    let r = stockade_run(&["--policy", p.to_str().unwrap()], &["/usr/bin/perl", "-e", "syscall(165, 0, 0, 0, 0, 0)"]);
    assert_eq!(r.code, 128 + libc::SIGSYS, "{r:?}");
    assert!(
        r.stderr.contains("killed by the seccomp filter (SIGSYS) at mount (165)")
            && r.stderr.contains("seccomp.default_action = \"kill\""),
        "{r:?}"
    );
}

/// `check --policy P` answers whether this host enforces P — by building a jail from it — and
/// says so in its exit status, for CI preflights and `ExecStartPre=`.
#[test]
fn check_with_a_policy_is_a_preflight() {
    let ok = Command::new(STOCKADE).args(["check", "--policy", "default", "--json"]).output().unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let items: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    let last = items.as_array().unwrap().last().unwrap();
    assert_eq!((last["name"].as_str(), last["ok"].as_bool()), (Some("policy"), Some(true)), "{items}");

    let refused = Command::new(STOCKADE)
        .args(["check", "--policy", "default"])
        .env("STOCKADE_LANDLOCK_ABI_CAP", "3")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let out = String::from_utf8_lossy(&refused.stdout);
    assert!(out.contains("NO   policy") && out.contains("cannot enforce it: landlock"), "{out}");

    let missing = Command::new(STOCKADE).args(["check", "--policy", "/nonexistent/p.toml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

/// The supervisor attaches the workspace from a descriptor: the jail user never walks the host
/// path, so a private (0700) parent directory does not stop it.
#[test]
fn a_workspace_under_a_private_parent_is_attached() {
    if needs_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let parent = TempDir::new("private-parent");
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let ws = parent.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(101000), Some(101000)).unwrap();
    std::fs::write(ws.join("f.txt"), "hi\n").unwrap();
    let (_d, p) = policy_for_host_dirs("default", "");
    let r = stockade_run(
        &["--policy", p.to_str().unwrap(), "--workspace", ws.to_str().unwrap()],
        &["/bin/sh", "-c", "cat f.txt && echo made > g.txt"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "hi\n");
    assert_eq!(std::fs::read_to_string(ws.join("g.txt")).unwrap(), "made\n");
}

/// The supervisor's work on a session's execs (reading and recording them) is held to half the
/// session's `limits.cpu`: an exec flood with long argvs under `cpu = 0.25` made it burn about
/// 0.35 of a core beside the jail's 0.25; now the flood slows itself instead.
#[test]
fn an_exec_flood_cannot_work_the_supervisor_past_its_share() {
    let (d, p) = policy("default", "[limits]\ncpu = 0.25\n");
    let trail = d.path().join("trail.jsonl");
    let mut run = Command::new(STOCKADE)
        .args(["run", "--policy", p.to_str().unwrap(), "--trail", trail.to_str().unwrap(), "--", "/bin/sh", "-c"])
        .arg(
            "a=$(head -c 2000 /dev/zero | tr '\\0' x); i=0; while [ $i -lt 700 ]; do /bin/true $a $a; i=$((i+1)); done",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let tck = 100.0; // USER_HZ, what /proc/PID/stat counts in
    let t = Instant::now();
    let mut cpu = 0.0;
    while run.try_wait().unwrap().is_none() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", run.id())) {
            let f: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
            cpu = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tck;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t.elapsed().as_secs_f64();
    let records = std::fs::read_to_string(&trail).unwrap().lines().filter(|l| l.contains("\"event\":\"exec\"")).count();
    assert!(records >= 700, "the flood was recorded: {records} exec records");
    // Half of 0.25, with room for the supervisor's own start and end.
    assert!(cpu / wall < 0.2, "the supervisor used {cpu:.2} s of CPU in {wall:.2} s");
}

/// Whether the jail's loopback carries a connection.
const LOOPBACK: &str = "import socket\ntry:\n    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n    \
                        socket.create_connection(s.getsockname(), 1); print('loopback up')\nexcept OSError:\n    \
                        print('loopback down')";

/// The common knobs on the command line (`--net`, `--ro-bind`, `--bind`, `--memory`, `--pids`):
/// a policy extending the chosen one, so the jail has them, `--report` names them, `audit` scores
/// them, and a bad value is the policy's usage error naming the flag.
#[test]
fn command_line_overrides_reach_the_jail_the_report_and_the_audit() {
    if needs_root() {
        return;
    }
    let d = TempDir::new("overrides");
    std::fs::write(d.path().join("seen.txt"), "bound\n").unwrap();
    let bind = format!("{}:/data", d.path().display());
    let o = Command::new(STOCKADE)
        .args(["run", "--report", "--policy", "default", "--net", "none", "--memory", "256M", "--pids", "50"])
        .args(["--ro-bind", &bind, "--", "python3", "-c"])
        .arg(format!(
            "print(open('/data/seen.txt').read().strip())\n{LOOPBACK}\n\
             try:\n    open('/data/new', 'w')\nexcept OSError as e:\n    print('read-only', e.errno)"
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out, "bound\nloopback down\nread-only 30\n", "{err}");
    assert!(err.contains("confined by policy default + command line (--net none --ro-bind"), "{err}");
    assert!(err.contains("memory 256M") && err.contains("pids 50"), "{err}");
    // Without the flag the same policy has its loopback up: the flag did it.
    let o = Command::new(STOCKADE)
        .args(["run", "--policy", "default", "--", "python3", "-c", LOOPBACK])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "loopback up\n", "{o:?}");
    // The audit scores what a run with the same flags would use.
    let o = Command::new(STOCKADE)
        .args(["audit", "default", "--ro-bind", "/root/.ssh", "--format", "json"])
        .output()
        .unwrap();
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = a[0]["findings"].as_array().unwrap().iter().find(|f| f["id"] == "filesystem.credentials").unwrap();
    assert_ne!(f["verdict"], "pass", "{f}");
    // A bad value: the usage status, and the flag named.
    let o = Command::new(STOCKADE).args(["run", "--memory", "lots", "--", "/bin/true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--memory lots") && err.contains("limits.memory"), "{err}");
}
