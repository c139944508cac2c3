//! The host side of `stockade probe`: sets up the targets probes aim at (only on loopback and in
//! the harness's own namespaces), runs the battery as the jailed command of `stockade run` with
//! the policy under test, and collects the reports.

use std::io::BufRead;
use std::os::linux::net::SocketAddrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{catalogue, Ctx, Outcome, ProbeReport};

/// Where the stockade binary is bound inside the probe jail.
pub(crate) const JAILED_EXE: &str = "/.stockade/stockade";
pub(crate) const PLANTED_ENV: &str = "STOCKADE_PROBE_PLANTED_SECRET";

pub struct Options {
    /// Policy file or built-in name; None for the default.
    pub policy: Option<String>,
    /// Run only these probes (all when empty).
    pub only: Vec<String>,
    /// The `stockade` binary to run the jail with.
    pub exe: PathBuf,
}

/// Why the battery did not run, or its output could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("--only: no probe {name:?}{}", .nearest.map(|n| format!(" (did you mean {n}?)")).unwrap_or_default())]
    UnknownProbe { name: String, nearest: Option<&'static str> },
    /// A host-side target or file the battery needs (named by `what`) could not be made.
    #[error("{what}: {source}")]
    Setup { what: String, source: std::io::Error },
    #[error("unreadable probe output {line:?}: {source}")]
    Output { line: String, source: serde_json::Error },
    #[error("the probe jail failed ({0}); see the error above")]
    JailFailed(std::process::ExitStatus),
}

fn setup(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> HarnessError {
    move |source| HarnessError::Setup { what: what.to_string(), source }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Battery {
    pub policy: String,
    pub reports: Vec<ProbeReport>,
}

/// Host-side targets, removed on drop.
struct Targets {
    _abstract: std::os::unix::net::UnixListener,
    _tcp: std::net::TcpListener,
    sysv_id: i32,
    shm: PathBuf,
    ctx: Ctx,
}

impl Targets {
    fn new(policy: &crate::policy::Policy) -> Result<Targets, HarnessError> {
        let pid = std::process::id();
        let abstract_name = format!("stockade-probe-{pid}");
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .map_err(setup("abstract socket name"))?;
        let abs = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(setup("abstract socket"))?;
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").map_err(setup("loopback listener"))?;
        let port = tcp.local_addr().map_err(setup("loopback listener"))?.port();
        let sysv_key = 0x5354_0000 | (pid & 0xffff) as i32;
        // SAFETY: msgget with integer arguments creates a private queue the harness removes on drop.
        let sysv_id = unsafe { libc::msgget(sysv_key, libc::IPC_CREAT | 0o600) };
        if sysv_id < 0 {
            return Err(setup("SysV queue")(std::io::Error::last_os_error()));
        }
        let shm_name = format!("stockade-probe-{pid}");
        let shm = Path::new("/dev/shm").join(&shm_name);
        std::fs::write(&shm, b"host shm").map_err(setup(shm.display()))?;
        let l = &policy.limits;
        let ctx = Ctx {
            host_pid: pid,
            abstract_name,
            sysv_key,
            shm_name,
            listener_port: port,
            planted_env: PLANTED_ENV.into(),
            memory_limit: l.memory.map(|m| m.0),
            tmp_size: l.tmp_size.0,
            fsize: l.fsize.map(|f| f.0),
            network: crate::policy::spelling(&policy.network.mode),
            landlock_tcp: policy.landlock.tcp_bind.is_some() || policy.landlock.tcp_connect.is_some(),
            startup_fds: Vec::new(),
            control: false,
        };
        Ok(Targets { _abstract: abs, _tcp: tcp, sysv_id, shm, ctx })
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        // SAFETY: removes the queue this harness created.
        unsafe { libc::msgctl(self.sysv_id, libc::IPC_RMID, std::ptr::null_mut()) };
        let _ = std::fs::remove_file(&self.shm);
    }
}

/// The probe names of `--only`, each checked against the catalogue.
pub fn check_only(only: &[String]) -> Result<(), HarnessError> {
    let all = catalogue();
    for id in only {
        if !all.iter().any(|(i, _, _)| i == id) {
            let nearest = crate::util::nearest(id, all.iter().map(|(i, _, _)| *i));
            return Err(HarnessError::UnknownProbe { name: id.clone(), nearest });
        }
    }
    Ok(())
}

pub fn run(opts: &Options) -> Result<Battery, HarnessError> {
    let (policy, _) = crate::policy::load(opts.policy.as_deref())?;
    check_only(&opts.only)?;
    let ids = selected(&opts.only);
    let targets = Targets::new(&policy)?;
    // The policy under test, plus the stockade binary bound in read-only to run the battery.
    let dir = std::env::temp_dir().join(format!("stockade-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(setup(dir.display()))?;
    let base = match opts.policy.as_deref() {
        None => "default".to_owned(),
        Some(p) if crate::policy::builtin_text(p).is_some() && !Path::new(p).exists() => p.to_owned(),
        Some(p) => std::fs::canonicalize(p).map_err(setup(p))?.display().to_string(),
    };
    let exe = std::fs::canonicalize(&opts.exe).map_err(setup(opts.exe.display()))?;
    let file = dir.join("probe-policy.toml");
    let text = format!(
        "extends = {}\n[filesystem]\nread_only_add = [{}]\n",
        crate::policy::toml_string(&base),
        crate::policy::toml_string(&format!("{}:{JAILED_EXE}", exe.display()))
    );
    std::fs::write(&file, text).map_err(setup(file.display()))?;
    let ctx = serde_json::to_string(&targets.ctx).expect("serialises");
    let file = file.display().to_string();
    let out = watch(
        battery(&exe, &["run", "--policy", &file, "--", JAILED_EXE, "__probe", "--battery", "--ctx", &ctx], &ids),
        LINE_WAIT,
    )
    .map_err(setup("running the jail"))?;
    let _ = std::fs::remove_dir_all(&dir);
    drop(targets);
    collect(out, &ids, policy.source.clone())
}

/// The positive control: the battery outside any jail, in the throwaway environment of
/// `control`, where every probe must report "escaped".
pub fn run_control(only: &[String], exe: &Path) -> Result<Battery, HarnessError> {
    super::control::prerequisites()
        .map_err(|e| HarnessError::Setup { what: "--control".into(), source: std::io::Error::other(e.to_string()) })?;
    check_only(only)?;
    let ids = selected(only);
    let (policy, _) = crate::policy::load(None)?;
    let mut targets = Targets::new(&policy)?;
    super::control::pretend_limits(&mut targets.ctx);
    let ctx = serde_json::to_string(&targets.ctx).expect("serialises");
    let out = watch(battery(exe, &["__probe", "--battery", "--ctx", &ctx], &ids), LINE_WAIT)
        .map_err(setup("running the control"))?;
    drop(targets);
    collect(out, &ids, "the positive control (no jail; every probe must escape)".into())
}

/// The battery's process: `args`, then the probe ids, with a fresh secret planted in its
/// environment for `proc-env-secret` to look for.
fn battery(exe: &Path, args: &[&str], ids: &[String]) -> Command {
    let mut c = Command::new(exe);
    c.args(args)
        .args(ids)
        .env(PLANTED_ENV, crate::control_plane::random_token("planted-"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

fn selected(only: &[String]) -> Vec<String> {
    catalogue().iter().map(|(i, _, _)| i.to_string()).filter(|i| only.is_empty() || only.contains(i)).collect()
}

/// How long the harness waits for the battery's next report: a probe's own bound, the battery's
/// wait for it and room for the jail to start.
const LINE_WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// What a battery printed, and how it ended.
struct Finished {
    lines: Vec<String>,
    status: std::process::ExitStatus,
    /// The battery gave no report within `LINE_WAIT` and was killed.
    stalled: bool,
}

/// Runs the battery, reading its reports as they come; a battery silent for `limit` is
/// killed (with it the jail), so a probe that hangs is a report, never a harness that waits on.
fn watch(mut cmd: Command, limit: std::time::Duration) -> std::io::Result<Finished> {
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    // Not joined: a process the battery left behind may hold its stdout open after it exits.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let mut stalled = false;
    loop {
        match rx.recv_timeout(limit) {
            Ok(Ok(l)) => lines.push(l),
            Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_none() {
                    stalled = true;
                    // The control's battery leads a session of its own, and its probes are in
                    // its group: they go with it, not to hold the caller's stderr open. (A
                    // jail's processes die with its `stockade run`.)
                    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.kill();
                }
                break;
            }
        }
    }
    let status = child.wait()?;
    Ok(Finished { lines, status, stalled })
}

/// The reports of a finished battery: one per probe asked for, even if it died part-way.
fn collect(out: Finished, ids: &[String], policy: String) -> Result<Battery, HarnessError> {
    let mut reports: Vec<ProbeReport> = Vec::new();
    for line in out.lines {
        match serde_json::from_str::<ProbeReport>(&line) {
            Ok(r) => reports.push(r),
            Err(source) => return Err(HarnessError::Output { line, source }),
        }
    }
    if reports.is_empty() && !out.status.success() && !out.stalled {
        return Err(HarnessError::JailFailed(out.status));
    }
    let mut first_missing = true;
    for (id, cat, what) in catalogue().iter().filter(|(i, _, _)| ids.iter().any(|x| x == i)) {
        if !reports.iter().any(|r| r.id == *id) {
            let why = if out.stalled && first_missing {
                format!("no report within {} s: the battery stalled in this probe and was killed", LINE_WAIT.as_secs())
            } else if out.stalled {
                "not run: the battery was killed in an earlier probe".to_owned()
            } else {
                format!("no report (the battery exited with {})", out.status)
            };
            first_missing = false;
            reports.push(ProbeReport {
                id: id.to_string(),
                category: cat.to_string(),
                what: what.clone(),
                outcome: Outcome::Error(why),
            });
        }
    }
    Ok(Battery { policy, reports })
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// What a run expects of each probe.
pub enum Expect<'a> {
    /// Blocked, except these probes, which may escape (`--expect-fail`).
    Blocked { except: &'a [String] },
    /// Escaped: the positive control.
    Escaped,
}

impl Expect<'_> {
    /// The kind of failure this report is, or None when it is what was expected.
    fn failure(&self, r: &ProbeReport) -> Option<&'static str> {
        match (&r.outcome, self) {
            (Outcome::Error(_), _) => Some("error"),
            (Outcome::Escaped(_), Expect::Blocked { except }) if !except.contains(&r.id) => Some("escaped"),
            (Outcome::Blocked(_), Expect::Escaped) => Some("not-seen"),
            _ => None,
        }
    }
}

pub fn table(b: &Battery, expect: &Expect) -> String {
    use std::fmt::Write;
    let mut s = match expect {
        Expect::Blocked { .. } => format!("probes inside a jail built from {}\n", b.policy),
        Expect::Escaped => format!("probes in {}\n", b.policy),
    };
    for r in &b.reports {
        let failed = expect.failure(r).is_some();
        let (mark, ev) = match &r.outcome {
            Outcome::Blocked(e) if failed => ("NOT SEEN", e),
            Outcome::Blocked(e) => ("blocked", e),
            Outcome::Escaped(e) if failed => ("ESCAPED", e),
            Outcome::Escaped(e) if matches!(expect, Expect::Escaped) => ("escaped", e),
            Outcome::Escaped(e) => ("ESCAPED (expected)", e),
            Outcome::Error(e) => ("ERROR", e),
        };
        let _ = writeln!(s, "  {mark:<8} {:<11} {:<24} {}: {ev}", r.category, r.id, r.what);
    }
    let n = |f: fn(&Outcome) -> bool| b.reports.iter().filter(|r| f(&r.outcome)).count();
    let _ = writeln!(
        s,
        "{} probes: {} blocked, {} escaped, {} errors",
        b.reports.len(),
        n(|o| matches!(o, Outcome::Blocked(_))),
        n(|o| matches!(o, Outcome::Escaped(_))),
        n(|o| matches!(o, Outcome::Error(_)))
    );
    s
}

pub fn junit(b: &Battery, expect: &Expect) -> String {
    use std::fmt::Write;
    let failures = b.reports.iter().filter(|r| expect.failure(r).is_some()).count();
    let mut s = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"stockade probe\">\n  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\">\n",
        xml_escape(&b.policy),
        b.reports.len()
    );
    for r in &b.reports {
        let _ = write!(s, "    <testcase classname=\"{}\" name=\"{}\"", xml_escape(&r.category), xml_escape(&r.id));
        let (Outcome::Blocked(e) | Outcome::Escaped(e) | Outcome::Error(e)) = &r.outcome;
        match expect.failure(r) {
            Some(kind) => {
                let _ = writeln!(
                    s,
                    ">\n      <failure type=\"{kind}\" message=\"{}\">{}</failure>\n    </testcase>",
                    xml_escape(e),
                    xml_escape(&r.what)
                );
            }
            None => {
                let _ = writeln!(s, ">\n      <system-out>{}</system-out>\n    </testcase>", xml_escape(e));
            }
        }
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}

/// Exit status: 0 when every probe did what was expected of it, 1 otherwise.
pub fn exit_code(b: &Battery, expect: &Expect) -> i32 {
    i32::from(b.reports.iter().any(|r| expect.failure(r).is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn battery(outcomes: &[Outcome]) -> Battery {
        let reports = outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| ProbeReport {
                id: format!("p{i}"),
                category: "c".into(),
                what: "w".into(),
                outcome: o.clone(),
            })
            .collect();
        Battery { policy: "test".into(), reports }
    }

    /// A battery that stops answering is killed, and the probe it stalled in is named.
    #[test]
    fn a_stalled_battery_is_killed_and_its_probe_named() {
        let mut cmd = Command::new("sh");
        let first = r#"{"id":"fs-write-usr","category":"filesystem","what":"x","outcome":"blocked","evidence":"e"}"#;
        cmd.args(["-c", &format!("echo '{first}'; exec sleep 60")]).stdout(Stdio::piped());
        let t = std::time::Instant::now();
        let out = watch(cmd, std::time::Duration::from_millis(500)).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "{:?}", t.elapsed());
        assert!(out.stalled);
        let ids: Vec<String> = ["fs-write-usr", "fs-write-root", "fs-write-etc"].map(String::from).to_vec();
        let b = collect(out, &ids, "p".into()).unwrap();
        let why = |id: &str| match &b.reports.iter().find(|r| r.id == id).unwrap().outcome {
            Outcome::Error(e) => e.clone(),
            o => panic!("{id}: {o:?}"),
        };
        assert!(matches!(b.reports[0].outcome, Outcome::Blocked(_)));
        assert!(why("fs-write-root").contains("stalled in this probe"), "{}", why("fs-write-root"));
        assert!(why("fs-write-etc").contains("earlier probe"), "{}", why("fs-write-etc"));
    }

    #[test]
    fn a_blocked_probe_fails_the_control_and_an_escape_fails_a_policy_run() {
        let b = battery(&[Outcome::Escaped("e".into()), Outcome::Blocked("b".into())]);
        assert_eq!(exit_code(&b, &Expect::Escaped), 1);
        assert!(table(&b, &Expect::Escaped).contains("NOT SEEN"));
        assert!(junit(&b, &Expect::Escaped).contains("type=\"not-seen\""));
        assert_eq!(exit_code(&b, &Expect::Blocked { except: &[] }), 1);
        assert_eq!(exit_code(&b, &Expect::Blocked { except: &["p0".into()] }), 0);
        let all = battery(&[Outcome::Escaped("e".into())]);
        assert_eq!(exit_code(&all, &Expect::Escaped), 0);
        let err = battery(&[Outcome::Error("x".into())]);
        assert_eq!(exit_code(&err, &Expect::Escaped), 1);
        assert_eq!(exit_code(&err, &Expect::Blocked { except: &[] }), 1);
    }
}
