//! Command-line interface. Errors are reported here, with context, as one line on stderr.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;

use stockade::jail::{self, JailError, JailSpec, Step, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_SETUP_FAILED};
use stockade::policy::{self, syscalls, Policy};

mod cp;
mod man;
mod ops;
mod overrides;
mod tty;
use ops::{ControlPlaneArgs, StatsArgs, StopArgs, WebhookArgs, WorkArgs, WorkerArgs};

#[derive(Parser)]
#[command(name = "stockade", version, about = "A self-hosted tool-execution sandbox for AI agent sessions")]
#[command(after_help = "Exit status, every subcommand: 0 success; 1 the work failed or the answer is no (`check` \
with a NO line, `audit` over --fail-above, `probe` with an escape, an API error); 2 a usage or input error \
(a bad flag or value, a policy that does not load, an unknown name): nothing was attempted.\n\
`run` and `session` also: 125 Stockade could not build the jail; and `run`: the command's own status, 128+N \
when it died of signal N, 124 on timeout, 126 when it is not executable, 127 when it is not found.")]
pub(crate) struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct GlobalArgs {
    /// Log format on stderr.
    // Shown after each subcommand's own options.
    #[arg(
        long,
        visible_alias = "log-format",
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        display_order = 1000
    )]
    log: LogFormat,
    /// More output (-v: info, -vv: debug; worker, webhook and control-plane log at info without
    /// it, and -v gives them debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, display_order = 1001)]
    verbose: u8,
}

/// `stockade run` alone: what [`Cli`] parses for it, without the other subcommands. Building
/// clap's whole command tree is most of a jail start's argument parsing, and `run` is the
/// command whose start-up time matters. Anything it does not accept (help, errors, other
/// commands) goes to the full parser, so messages are the same either way.
#[derive(Parser)]
#[command(name = "stockade")]
struct RunOnly {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: RunOnlyCommand,
}

#[derive(Subcommand)]
enum RunOnlyCommand {
    Run(RunArgs),
}

impl Cli {
    fn parse_args() -> Cli {
        if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
            if let Ok(RunOnly { global, command: RunOnlyCommand::Run(args) }) = RunOnly::try_parse() {
                return Cli { global, command: Command::Run(args) };
            }
        }
        Cli::parse()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process; boxing the larger variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a command in a fresh jail built from a policy.
    Run(RunArgs),
    /// Report what this host can enforce (user namespaces, landlock ABI, seccomp, cgroups, nft).
    ///
    /// Exits 1 when any line is NO. With --policy, also builds a jail from that policy (running
    /// /bin/true) and exits 1 when the host cannot enforce it: a CI preflight, or `ExecStartPre=`.
    Check {
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        /// Can this host enforce this policy (a file or a built-in name)?
        #[arg(long, short = 'p', value_name = "POLICY")]
        policy: Option<String>,
    },
    /// Inspect policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run a session: tool calls as JSON lines on stdin, results as JSON lines on stdout.
    Session(SessionArgs),
    /// Run the main job end to end: a local control plane and a worker in one process, a bundled
    /// scripted session in a default-policy jail; prints the transcript.
    Demo,
    /// Static hardening audit of policies: weighted checks, an exposure score 0.0-10.0.
    Audit(AuditArgs),
    /// Claim sessions from an environment's work queue and run them in jails (always-on);
    /// `worker run` serves one session already claimed (as `ant beta:worker run` does).
    #[command(args_conflicts_with_subcommands = true)]
    Worker(WorkerArgs),
    /// The worker, woken by signed webhook deliveries instead of long-polling.
    Webhook(WebhookArgs),
    /// The local control plane: the Work API and scripted sessions on loopback.
    #[command(name = "control-plane", args_conflicts_with_subcommands = true)]
    ControlPlane(ControlPlaneArgs),
    /// Read a session's audit trail: its tool calls, the programs its jail ran, its connection
    /// attempts, its outputs, its start and end.
    Trail(ops::TrailArgs),
    /// Work queue statistics of an environment (organisation key).
    Stats(StatsArgs),
    /// Ask the worker holding a work item to stop it (organisation key).
    Stop(StopArgs),
    /// List or show an environment's work items (organisation key).
    Work(WorkArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to write the script for.
        shell: clap_complete::Shell,
    },
    /// Print the man page stockade(1) (roff), or write every page: one per subcommand and
    /// stockade.toml(5).
    Man {
        /// Write stockade.1, stockade-SUB.1 for every subcommand (nested ones too) and
        /// stockade.toml.5 into this directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Run the escape-probe battery inside a jail built from a policy; exit 1 on any escape.
    #[command(name = "probe")]
    ProbeBattery(ProbeArgs),
    /// Internal: run escape probes in the current process (used inside jails by tests and `probe`).
    #[command(name = "__probe", hide = true)]
    Probe {
        /// Run each probe in a child and print JSON reports (the in-jail half of `probe`).
        #[arg(long)]
        battery: bool,
        #[arg(long, requires = "battery")]
        ctx: Option<String>,
        names: Vec<String>,
    },
}

/// Where a jail's policy, workspace and outputs come from (run and session).
#[derive(Args)]
struct JailArgs {
    /// Policy file, or a built-in name (default, strict, ci) [default: $STOCKADE_POLICY, then
    /// /etc/stockade/policy.toml if it exists, then the built-in default].
    #[arg(long, short = 'p')]
    policy: Option<String>,
    #[command(flatten)]
    overrides: overrides::Overrides,
    /// Host directory mounted read-write at /workspace (default: an empty tmpfs).
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Host directory mounted read-write at /mnt/session/outputs (default: an empty tmpfs).
    #[arg(long)]
    outputs: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    jail: JailArgs,
    /// Extra environment variable for the command (repeatable); secret-looking names are refused.
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Kill the whole jail after this long (e.g. 30s, 5m); overrides limits.timeout.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Uid of the command inside the jail; overrides user.uid.
    #[arg(long)]
    uid: Option<u32>,
    /// Print what confined the command on stderr when it ends, as the jail saw itself (its
    /// mount table, credentials, limits) and as the supervisor applied it (cgroups, network).
    #[arg(long)]
    report: bool,
    /// The report's form: text for people, json for tools (implies --report).
    #[arg(long, value_enum, value_name = "FORMAT")]
    report_format: Option<ReportFormat>,
    /// Print the plan the policy makes for this command, and run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Give the command a terminal of its own: a pty Stockade relays to this one (which is put
    /// in raw mode meanwhile), never the caller's terminal itself. An interactive shell gets job
    /// control. The window size is the caller's at the start.
    #[arg(long, short = 't')]
    tty: bool,
    /// Keep stdin open for the command (it always is; accepted so that `-it` reads as it does
    /// elsewhere).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Record every program the command runs in this audit trail (JSON lines, appended; see
    /// `[trail]` in stockade.toml(5)).
    #[arg(long, value_name = "FILE")]
    trail: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Args)]
struct SessionArgs {
    #[command(flatten)]
    jail: JailArgs,
    /// Print `{"ready": true, "pid": N}` once the jail is built (for the worker).
    #[arg(long)]
    announce: bool,
    /// Narrow the policy for this session (JSON: network, memory, pids, cpu, timeout, tmp_size,
    /// workspace); asking for more than the policy allows keeps the policy's value.
    #[arg(long, value_name = "JSON")]
    narrow: Option<String>,
    /// The longest request line accepted; a longer one is answered with an error result (and
    /// never held in memory whole), and the session goes on.
    #[arg(long, default_value = "64MiB", value_parser = stockade::util::parse_size)]
    max_request_bytes: u64,
    /// Keep an audit trail of the session in this file (JSON lines, appended; see `[trail]` in
    /// stockade.toml(5)): tool calls, every program executed in the jail, connection attempts.
    #[arg(long, value_name = "FILE")]
    trail: Option<PathBuf>,
    /// With --trail: leave tool calls to the caller, which records them itself (the worker).
    #[arg(long, requires = "trail", hide = true)]
    trail_no_calls: bool,
    /// A memory store's folder: HOST_DIR bound at JAIL_DIR, read-only with `:ro`; repeatable.
    /// The file tools reach it even with `confine_paths`, and a `write` or `edit` into a
    /// writable one is not made but answered with a `memory_write` for the caller to save
    /// (the worker saves it to the store, then writes the file).
    #[arg(long = "memory-store", value_name = "HOST_DIR:JAIL_DIR[:ro]")]
    memory_stores: Vec<String>,
    /// Started by this worker: leave its session, close its descriptors, die with it.
    #[arg(long, hide = true, value_name = "PID")]
    worker_pid: Option<i32>,
    /// With --worker-pid: the open-file limit to take back, SOFT:HARD.
    #[arg(long, hide = true, value_name = "SOFT:HARD", requires = "worker_pid")]
    nofile: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProbeFormat {
    Table,
    Json,
    Junit,
}

#[derive(Args)]
struct ProbeArgs {
    /// Policy file or built-in name [default: $STOCKADE_POLICY, then /etc/stockade/policy.toml if
    /// it exists, then the built-in default].
    #[arg(long, short = 'p')]
    policy: Option<String>,
    /// Report format: a table for people, JSON, or JUnit XML for CI.
    #[arg(long, value_enum, default_value_t = ProbeFormat::Table)]
    format: ProbeFormat,
    /// Only these probes (comma-separated ids; see --list).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    only: Vec<String>,
    /// Probes expected to escape under this policy: reported, but not failing the run.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    expect_fail: Vec<String>,
    /// List the probes and exit.
    #[arg(long)]
    list: bool,
    /// The positive control: run every probe outside any jail, as root, in a throwaway
    /// environment arranged for each to escape (decoy files, private namespaces, no filter);
    /// exit 1 unless every probe reports "escaped". Shows the battery can see what it guards.
    #[arg(long, conflicts_with_all = ["policy", "expect_fail"])]
    control: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuditFormat {
    Table,
    Json,
    Sarif,
    Junit,
}

#[derive(Args)]
struct AuditArgs {
    /// Policy files or built-in names (default, strict, ci).
    #[arg(required = true, value_name = "POLICY")]
    policies: Vec<String>,
    /// Report format: a table for people, JSON, SARIF for code scanning, or JUnit XML for CI.
    #[arg(long, value_enum, default_value_t = AuditFormat::Table)]
    format: AuditFormat,
    /// Exit 1 when a policy's exposure is above this score.
    #[arg(long, value_name = "SCORE")]
    fail_above: Option<f64>,
    /// Compare two policies (OLD NEW): list the checks that became weaker or stronger.
    #[arg(long)]
    diff: bool,
    /// With --diff: exit 1 when anything became weaker.
    #[arg(long, requires = "diff")]
    fail_on_weaker: bool,
    /// The same overrides `run` takes, applied to each policy: audit what a run would use.
    #[command(flatten)]
    overrides: overrides::Overrides,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the fully resolved policy (after `extends`).
    Show {
        /// Policy file or built-in name.
        file: String,
        /// Print the resolved policy as JSON (TOML otherwise).
        #[arg(long)]
        json: bool,
    },
    /// List the syscall groups and their members.
    Groups {
        /// Show only this group.
        name: Option<String>,
    },
}

pub(crate) fn main() -> i32 {
    let cli = Cli::parse_args();
    if prints_for_a_pipe(&cli.command) {
        // A command whose output is cut short by its reader (`stockade policy groups | head`)
        // ends quietly, as Unix tools do, instead of panicking on EPIPE.
        // SAFETY: signal(2) with SIG_DFL installs no handler; no other thread exists yet.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let log = cli.global.log;
    // A service's operators need to see it work: it says at the default level what it started
    // with, what it claimed and how that ended. A command run by hand says only what went wrong.
    let service = matches!(cli.command, Command::Worker(_) | Command::Webhook(_) | Command::ControlPlane(_));
    init_logging(log, cli.global.verbose.saturating_add(u8::from(service)));
    match cli.command {
        Command::Run(args) => cmd_run(args),
        Command::Check { json, policy } => cmd_check(json, policy),
        Command::Policy { command } => cmd_policy(command),
        Command::Session(a) => cmd_session(a),
        Command::Demo => ops::demo(),
        Command::Trail(a) => ops::trail(a),
        Command::Audit(a) => cmd_audit(a),
        Command::Worker(a) => ops::worker(a, None, log),
        Command::Webhook(a) => ops::webhook(a, log),
        Command::ControlPlane(a) => ops::control_plane(a),
        Command::Stats(a) => ops::stats(a),
        Command::Stop(a) => ops::stop(a),
        Command::Work(a) => ops::work(a),
        Command::Probe { battery: false, names, .. } => stockade::probe::main(&names),
        Command::Probe { battery: true, ctx, names } => {
            stockade::probe::battery(ctx.as_deref().unwrap_or("{}"), &names)
        }
        Command::ProbeBattery(a) => cmd_probe(a),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "stockade",
                &mut std::io::stdout(),
            );
            0
        }
        Command::Man { out } => cmd_man(out.as_deref()),
    }
}

fn init_logging(format: LogFormat, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.with_target(false).init(),
    }
}

/// Exit status of a command that failed at its work (an API error, a session that did not
/// complete); `run` and `session` use 125 for a jail they could not build (`jail_exit_code`).
pub(crate) const EXIT_FAILURE: i32 = 1;
/// Exit status of a usage or input error: a bad flag value, a policy that does not load, an
/// unknown name. Nothing was attempted.
pub(crate) const EXIT_USAGE: i32 = 2;

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("stockade: {msg}");
    EXIT_FAILURE
}

fn usage(msg: impl std::fmt::Display) -> i32 {
    eprintln!("stockade: {msg}");
    EXIT_USAGE
}

fn load_policy(spec: Option<&str>, over: &overrides::Overrides) -> Result<Policy, i32> {
    let from_env = spec.is_none() && std::env::var_os(POLICY_ENV).is_some_and(|v| !v.is_empty());
    over.load(policy_spec(spec).as_deref()).map(|(p, _)| p).map_err(|e| {
        if from_env {
            usage(format!("${POLICY_ENV}: {e}"))
        } else {
            usage(e)
        }
    })
}

/// The variable naming the policy a command uses when it is given no --policy.
pub(crate) const POLICY_ENV: &str = "STOCKADE_POLICY";
/// The host's own default policy, when it has one.
pub(crate) const SYSTEM_POLICY: &str = "/etc/stockade/policy.toml";

/// The policy a command uses: --policy; else $STOCKADE_POLICY; else /etc/stockade/policy.toml
/// when it exists; else (None) the built-in default.
pub(crate) fn policy_spec(explicit: Option<&str>) -> Option<String> {
    resolve_policy_spec(explicit, std::env::var(POLICY_ENV).ok(), std::path::Path::new(SYSTEM_POLICY))
}

fn resolve_policy_spec(explicit: Option<&str>, env: Option<String>, system: &std::path::Path) -> Option<String> {
    explicit
        .map(str::to_owned)
        .or_else(|| env.filter(|v| !v.is_empty()))
        .or_else(|| system.is_file().then(|| system.display().to_string()))
}

fn jail_exit_code(e: &JailError) -> i32 {
    match (e.step, e.errno) {
        (Step::Exec, Some(libc::ENOENT)) => EXIT_NOT_FOUND,
        (Step::Exec, Some(_)) => EXIT_NOT_EXECUTABLE,
        _ => EXIT_SETUP_FAILED,
    }
}

fn cmd_run(a: RunArgs) -> i32 {
    let mut policy = match load_policy(a.jail.policy.as_deref(), &a.jail.overrides) {
        Ok(p) => p,
        Err(c) => return c,
    };
    if let Some(uid) = a.uid {
        if uid >= 65536 {
            return usage(format!("--uid {uid}: outside the jail's id range 0..65536"));
        }
        policy.user.uid = uid;
    }
    let mut env = Vec::new();
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_owned(), v.to_owned())),
            _ => return usage(format!("--env {kv:?}: expected K=V")),
        }
    }
    let timeout = match a.timeout.as_deref().map(stockade::util::parse_duration) {
        None => None,
        Some(Ok(d)) if !d.is_zero() => Some(d),
        Some(Ok(_)) => return usage("--timeout must be greater than zero"),
        Some(Err(e)) => return usage(format!("--timeout: {e}")),
    };
    let watcher = match &a.trail {
        None => None,
        Some(path) => match stockade::session::trail::TrailWriter::open(path, &policy.trail, Vec::new()) {
            Ok(t) => Some(stockade::session::trail::watcher(std::sync::Arc::new(t), &policy)),
            Err(e) => return fail(format!("--trail: {e}")),
        },
    };
    let spec = JailSpec {
        policy,
        workspace: a.jail.workspace,
        outputs: a.jail.outputs,
        argv: a.command,
        env,
        timeout,
        sweep_stale: true,
        watcher,
        observe: a.report || a.report_format.is_some(),
        tty: None,
        id_mapped: Vec::new(),
    };
    if a.dry_run {
        print!("{}", plan(&spec));
        return 0;
    }
    let _ = a.interactive;
    let pty = match a.tty.then(tty::open).transpose() {
        Ok(p) => p,
        Err(e) => return fail(format!("-t: a pty for the command: {e}")),
    };
    let mut spec = spec;
    spec.tty = pty.as_ref().map(|(_, slave)| std::os::fd::AsRawFd::as_raw_fd(slave));
    let ran = jail::Jail::start(&spec, jail::Payload::Command).and_then(|j| {
        let Some((master, slave)) = pty else { return j.wait() };
        // The jail has its copies; ours would keep the master from ever seeing the end.
        drop(slave);
        let relay = match tty::Relay::start(master) {
            Ok(r) => r,
            Err(e) => {
                let mut j = j;
                j.kill();
                return Err(jail::JailError::new(jail::Step::Supervise, format!("relaying the pty: {e}")));
            }
        };
        let out = j.wait();
        relay.finish();
        out
    });
    match ran {
        Ok(out) => {
            tracing::info!(status = ?out.status, "jail finished");
            match a.report_format {
                Some(ReportFormat::Json) => eprintln!("{}", report_json(&spec.policy, &out)),
                Some(ReportFormat::Text) => eprint!("{}", describe(&spec.policy, &out.report)),
                None if a.report => eprint!("{}", describe(&spec.policy, &out.report)),
                None => {}
            }
            if out.status == jail::Status::TimedOut {
                eprintln!("stockade: timed out; the jail was killed");
            }
            if let Some(call) = &out.report.seccomp_kill {
                eprintln!(
                    "stockade: the command was killed by the seccomp filter (SIGSYS) at {call}, which seccomp.allow does \
                     not admit (seccomp.default_action = \"{}\")",
                    stockade::policy::spelling(&spec.policy.seccomp.default_action)
                );
            }
            out.status.code()
        }
        Err(e) => {
            eprintln!("stockade: {e}");
            jail_exit_code(&e)
        }
    }
}

/// What the policy would do with a command, without building anything (`run --dry-run`).
fn plan(spec: &JailSpec) -> String {
    use std::fmt::Write;
    let p = &spec.policy;
    let mut s = String::new();
    let _ = writeln!(s, "plan of policy {} (nothing was run; `--report` says what a run did):", p.source);
    let _ =
        writeln!(s, "  command      {}", spec.argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let _ = writeln!(s, "  namespaces   user, mount, pid, ipc, uts, net, cgroup; hostname \"{}\"", p.hostname);
    let host = |d: &Option<PathBuf>| d.as_ref().map_or("a tmpfs".to_owned(), |d| d.display().to_string());
    let _ = writeln!(
        s,
        "  filesystem   tmpfs root, read-only; /workspace {} from {}; /mnt/session/outputs from {}",
        policy::spelling(&p.filesystem.workspace),
        host(&spec.workspace),
        host(&spec.outputs)
    );
    for b in &p.filesystem.read_write {
        let _ = writeln!(s, "               rw bind {b}");
    }
    let _ = writeln!(s, "  network      {}", policy::spelling(&p.network.mode));
    let _ = writeln!(
        s,
        "  seccomp      allow {}, default {}",
        p.seccomp.allow.join(" "),
        policy::spelling(&p.seccomp.default_action)
    );
    let l = &p.limits;
    let size = |v: Option<policy::Size>| v.map_or_else(|| "none".to_owned(), |v| stockade::util::format_size(v.0));
    let _ = writeln!(
        s,
        "  limits       memory {}, pids {}, cpu {}, timeout {} ({})",
        size(l.memory),
        l.pids.map_or_else(|| "none".to_owned(), |n| n.to_string()),
        l.cpu.map_or_else(|| "none".to_owned(), |c| c.to_string()),
        spec.timeout.or(l.timeout.map(|t| t.0)).map_or_else(|| "none".to_owned(), stockade::util::format_duration),
        policy::spelling(&l.enforcement)
    );
    s
}

/// The report as JSON: the jail's own view (`seen`), what the supervisor applied, the status.
fn report_json(p: &Policy, out: &jail::Outcome) -> String {
    let r = &out.report;
    serde_json::json!({
        "policy": p.source,
        "status": match out.status {
            jail::Status::Exited(c) => serde_json::json!({"exited": c}),
            jail::Status::Signaled(s) => serde_json::json!({"signaled": s}),
            jail::Status::TimedOut => serde_json::json!("timed_out"),
        },
        "seen": r.seen,
        "identity": r.id_mapping,
        "landlock": {"abi": r.landlock_abi, "dropped": r.landlock_dropped, "compatibility": policy::spelling(&p.landlock.compatibility)},
        "seccomp": {"allowed": r.seccomp_allowed, "default_action": policy::spelling(&p.seccomp.default_action), "killed_at": r.seccomp_kill},
        "cgroup": {"applied": r.cgroup.applied, "not_applied": r.cgroup.skipped},
        "network": r.network.clone().unwrap_or_else(|| policy::spelling(&p.network.mode)),
    })
    .to_string()
}

/// A human summary of what confined a jail: its own view where it gave one (mounts,
/// credentials, limits), what the supervisor applied (cgroups, network), the policy's words for
/// the rest.
fn describe(p: &Policy, r: &jail::Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "confined by policy {}:", p.source);
    let _ = writeln!(s, "  namespaces   user, mount, pid, ipc, uts, net, cgroup; hostname \"{}\"", p.hostname);
    let _ = writeln!(s, "  identity     {}", r.id_mapping);
    match &r.seen {
        Some(seen) => {
            let root = seen.mounts.iter().find(|m| m.path == "/");
            let root = root.map_or("no root seen".to_owned(), |m| {
                format!("{} root, {}", m.fstype, if m.writable { "WRITABLE" } else { "read-only" })
            });
            let _ = writeln!(s, "  filesystem   {root}; rw: {}", seen.writable().join(", "));
        }
        None => {
            let _ = writeln!(s, "  filesystem   (not observed)");
        }
    }
    match &r.network {
        Some(n) => {
            let _ = writeln!(s, "  network      {n}");
        }
        None => {
            let _ = writeln!(s, "  network      {}", policy::spelling(&p.network.mode));
        }
    }
    match &r.seen {
        Some(seen) if seen.no_capabilities() => {
            let nnp = if seen.no_new_privs { "no_new_privs" } else { "NO no_new_privs" };
            let _ = writeln!(s, "  capabilities none (all five sets empty), {nnp}");
        }
        Some(seen) => {
            let sets: Vec<String> = seen.capabilities.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let nnp = if seen.no_new_privs { "no_new_privs" } else { "NO no_new_privs" };
            let _ = writeln!(
                s,
                "  capabilities kept: {} (as the command has them: {}); {nnp}",
                p.capabilities.keep.join(", "),
                sets.join(", ")
            );
        }
        None => {}
    }
    let dropped = if r.landlock_dropped.is_empty() {
        String::new()
    } else {
        format!(", dropped: {}", r.landlock_dropped.join(", "))
    };
    let _ = writeln!(
        s,
        "  landlock     kernel ABI {}, {}{dropped}",
        r.landlock_abi,
        policy::spelling(&p.landlock.compatibility)
    );
    let filters = match &r.seen {
        Some(seen) if seen.seccomp_mode == 2 => format!("; {} filters on the command", seen.seccomp_filters),
        Some(_) => "; NO seccomp filter on the command".to_owned(),
        None => String::new(),
    };
    let _ = writeln!(
        s,
        "  seccomp      {} syscalls allowed ({}), default {}, x32/ia32 refused{filters}",
        r.seccomp_allowed,
        p.seccomp.allow.join(" "),
        policy::spelling(&p.seccomp.default_action)
    );
    let cg = if r.cgroup.applied.is_empty() { "none".to_owned() } else { r.cgroup.applied.join(", ") };
    let _ = writeln!(s, "  cgroup       {cg}");
    if !r.cgroup.skipped.is_empty() {
        let _ = writeln!(s, "  NOT applied  {} (best_effort)", r.cgroup.skipped.join("; "));
    }
    if let Some(seen) = &r.seen {
        let lim = |name: &str| seen.limit(name).unwrap_or("?").to_owned();
        let _ = writeln!(
            s,
            "  rlimits      nofile {}, nproc {}, fsize {}, as {}, core {}",
            lim("Max open files"),
            lim("Max processes"),
            lim("Max file size"),
            lim("Max address space"),
            lim("Max core file size")
        );
    }
    let _ = writeln!(s, "  /tmp         {}", stockade::util::format_size(p.limits.tmp_size.0));
    s
}

fn cmd_session(a: SessionArgs) -> i32 {
    if let Some(worker) = a.worker_pid {
        // A limit that does not parse is refused, not dropped: the jails would keep the worker's
        // raised one.
        let nofile = match a
            .nofile
            .as_deref()
            .map(|n| n.split_once(':').and_then(|(s, h)| Some((s.parse::<u64>().ok()?, h.parse::<u64>().ok()?))))
        {
            None => None,
            Some(Some(l)) => Some(l),
            Some(None) => return usage(format!("--nofile {}: expected SOFT:HARD", a.nofile.unwrap_or_default())),
        };
        if let Err(e) = stockade::worker::become_session_process(worker, nofile) {
            return fail(e);
        }
    }
    let mut policy = match load_policy(a.jail.policy.as_deref(), &a.jail.overrides) {
        Ok(p) => p,
        Err(c) => return c,
    };
    if let Some(j) = &a.narrow {
        let n = serde_json::from_str(j).map_err(|e| e.to_string()).and_then(|v| {
            policy::narrow::Narrowing::from_json(&v)
                .and_then(|n| policy::narrow::apply(&mut policy, &n))
                .map_err(|e| e.to_string())
        });
        match n {
            Ok(kept) => {
                for k in kept {
                    tracing::warn!("narrowing: {k}; kept the policy's value");
                }
            }
            Err(e) => return usage(format!("--narrow: {e}")),
        }
    }
    let mut id_mapped = Vec::new();
    for spec in &a.memory_stores {
        let (rest, read_only) = match spec.strip_suffix(":ro") {
            Some(r) => (r, true),
            None => (spec.as_str(), false),
        };
        // The jail path is absolute: the last ":/" ends the host path, which may hold a colon.
        let Some((host, jail)) = rest.rfind(":/").map(|i| (&rest[..i], &rest[i + 1..])) else {
            return usage(format!("--memory-store {spec}: expected HOST_DIR:JAIL_DIR[:ro]"));
        };
        let jail = PathBuf::from(jail);
        let clean = jail.is_absolute()
            && jail.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)));
        if !clean || jail == std::path::Path::new("/") {
            return usage(format!("--memory-store {spec}: {} is not a clean absolute path below /", jail.display()));
        }
        if !std::path::Path::new(host).is_dir() {
            return usage(format!("--memory-store {spec}: {host} is not a directory"));
        }
        let bind = policy::Bind { src: host.into(), dst: jail.clone(), optional: false };
        id_mapped.push(std::path::PathBuf::from(host));
        if read_only {
            policy.filesystem.read_only.push(bind);
        } else {
            policy.filesystem.read_write.push(bind);
        }
        policy.tools.memory.push(policy::MemoryMount { path: jail, read_only });
    }
    let trail = match &a.trail {
        None => None,
        Some(path) => match stockade::session::trail::TrailWriter::open(path, &policy.trail, Vec::new()) {
            Ok(t) => Some(std::sync::Arc::new(t)),
            Err(e) => return fail(format!("--trail: {e}")),
        },
    };
    let watcher = trail.as_ref().map(|t| stockade::session::trail::watcher(t.clone(), &policy));
    let spec = JailSpec {
        policy,
        workspace: a.jail.workspace,
        outputs: a.jail.outputs,
        argv: Vec::new(),
        env: Vec::new(),
        timeout: None,
        // A worker's session (announced) leaves the sweep to the worker.
        sweep_stale: !a.announce,
        watcher,
        observe: false,
        tty: None,
        id_mapped,
    };
    // Unbuffered, so that what waits in a buffer is never missed by a wait for the descriptor.
    let stdin = match std::os::fd::AsFd::as_fd(&std::io::stdin()).try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => return fail(format!("standard input: {e}")),
    };
    let stdout = std::io::stdout();
    let trail = trail.as_deref().map(|t| (t, !a.trail_no_calls));
    match stockade::session::run_json_lines(&spec, stdin, stdout, a.announce, a.max_request_bytes as usize, trail) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("stockade: {e}");
            jail_exit_code(&e)
        }
    }
}

/// `stockade check`: what the host offers, line by line, then the verdict that matters — whether
/// `run` with the policy in effect (`--policy`, else the one `run` would pick) works here, found by
/// building a jail from it. When it does not, the built-ins are tried and the first that works
/// is named. The exit status is that verdict: a line `run` does not need (nftables without veth,
/// the worker's disk limits) does not fail it.
fn cmd_check(json: bool, policy: Option<String>) -> i32 {
    let mut items = jail::check::run();
    let name = policy_spec(policy.as_deref()).unwrap_or_else(|| "default".into());
    let verdict = enforce_check(&name);
    let works = verdict.ok;
    items.push(verdict);
    if !works {
        let instead = policy::BUILTIN_NAMES.iter().filter(|b| **b != name).find(|b| enforce_check(b).ok);
        items.push(jail::check::Item {
            name: "instead",
            ok: instead.is_some(),
            detail: match instead {
                Some(b) => format!("the built-in policy `{b}` runs here: stockade run --policy {b} -- …"),
                None => "no built-in policy runs here; the lines above say what is missing".into(),
            },
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&items).unwrap_or_default());
    } else {
        for i in &items {
            println!("{:<4} {:<16} {}", if i.ok { "ok" } else { "NO" }, i.name, i.detail);
        }
    }
    i32::from(!works)
}

/// Whether this host enforces `name`: the only sure answer is a jail built from it, since every
/// protection the policy asks for is refused, not weakened, when the host cannot apply it.
fn enforce_check(name: &str) -> jail::check::Item {
    let item = |ok, detail: String| jail::check::Item { name: "policy", ok, detail };
    let p = match policy::load(Some(name)) {
        Ok((p, _)) => p,
        Err(e) => return item(false, e.to_string()),
    };
    let spec = JailSpec {
        policy: p,
        workspace: None,
        outputs: None,
        argv: vec!["/bin/true".into()],
        env: Vec::new(),
        timeout: Some(std::time::Duration::from_secs(30)),
        sweep_stale: false,
        watcher: None,
        observe: false,
        tty: None,
        id_mapped: Vec::new(),
    };
    match jail::Jail::start(&spec, jail::Payload::Command).and_then(jail::Jail::wait) {
        Ok(o) if o.status.code() == 0 => item(true, format!("{name}: a jail built from it ran /bin/true")),
        Ok(o) => item(false, format!("{name}: the jail was built but /bin/true exited {}", o.status.code())),
        Err(e) => item(false, format!("{name}: this host cannot enforce it: {e}")),
    }
}

/// The commands whose output is a report for a person or a pipe. The worker, the session server
/// and the control plane keep SIGPIPE ignored: they see a closed peer as an error and handle it.
fn prints_for_a_pipe(c: &Command) -> bool {
    matches!(
        c,
        Command::Check { .. }
            | Command::Policy { .. }
            | Command::Audit(_)
            | Command::Stats(_)
            | Command::Work(_)
            | Command::Completions { .. }
            | Command::Man { .. }
            | Command::ProbeBattery(_)
    )
}

fn cmd_policy(c: PolicyCommand) -> i32 {
    match c {
        PolicyCommand::Show { file, json } => {
            let p = match load_policy(Some(&file), &overrides::Overrides::default()) {
                Ok(p) => p,
                Err(c) => return c,
            };
            let out = if json {
                serde_json::to_string_pretty(&p).map_err(|e| e.to_string())
            } else {
                toml::to_string(&p).map_err(|e| e.to_string())
            };
            match out {
                // JSON has no comments: its output is the document alone, for tools to parse.
                Ok(s) if json => {
                    println!("{s}");
                    0
                }
                // Everything is resolved, so it extends nothing: saved to a file, it loads back as
                // the same policy, without the warning a policy with no `extends` gets.
                Ok(s) => {
                    println!("# resolved from {}\nextends = \"none\"\n{s}", p.source);
                    0
                }
                Err(e) => fail(e),
            }
        }
        PolicyCommand::Groups { name } => {
            let mut shown = 0;
            for g in syscalls::GROUPS.iter().filter(|g| name.as_deref().is_none_or(|n| n == g.name)) {
                shown += 1;
                println!("{}{}  {}", g.name, if g.dangerous { " (dangerous)" } else { "" }, g.description);
                if !g.includes.is_empty() {
                    println!("    includes: {}", g.includes.join(" "));
                }
                let members: Vec<String> = g
                    .members
                    .iter()
                    .map(|m| match m.cond {
                        Some(c) => format!("{}[{}]", m.name, c.describe()),
                        None => m.name.to_owned(),
                    })
                    .collect();
                if !members.is_empty() {
                    println!("    {}", members.join(" "));
                }
            }
            if shown == 0 {
                return usage(format!("unknown group {}", name.unwrap_or_default()));
            }
            0
        }
    }
}

fn cmd_audit(a: AuditArgs) -> i32 {
    use stockade::policy::audit;
    let mut reports = Vec::new();
    for spec in &a.policies {
        match a.overrides.load(Some(spec)) {
            Ok((p, origins)) => reports.push(audit::audit(&p, &origins)),
            Err(e) => return usage(e),
        }
    }
    if a.diff {
        let [old, new] = &reports[..] else {
            return usage(format!("--diff takes exactly two policies (OLD NEW), got {}", reports.len()));
        };
        let changes = audit::diff(old, new);
        if a.format == AuditFormat::Json {
            println!("{}", serde_json::json!({"old": old.exposure, "new": new.exposure, "changes": changes}));
        } else {
            println!("{} -> {}: exposure {:.1} -> {:.1}", old.policy, new.policy, old.exposure, new.exposure);
            for c in &changes {
                let tag = if c.weaker {
                    "WEAKER  "
                } else if c.after < c.before {
                    "stronger"
                } else {
                    "changed "
                };
                let v = |v: &Option<stockade::policy::audit::Verdict>| {
                    v.as_ref().map(policy::spelling).unwrap_or_else(|| "absent".into())
                };
                println!("  {tag} {:<27} {} -> {}: {}", c.id, v(&c.before), v(&c.after), c.reason);
            }
        }
        return i32::from(a.fail_on_weaker && changes.iter().any(|c| c.weaker));
    }
    match a.format {
        AuditFormat::Table => print!("{}", audit::table(&reports)),
        AuditFormat::Json => println!("{}", serde_json::to_string_pretty(&reports).expect("serialises")),
        AuditFormat::Sarif => {
            println!("{}", serde_json::to_string_pretty(&audit::sarif(&reports)).expect("serialises"))
        }
        AuditFormat::Junit => print!("{}", audit::junit(&reports)),
    }
    match a.fail_above {
        Some(max) if reports.iter().any(|r| r.exposure > max) => 1,
        _ => 0,
    }
}

fn cmd_probe(a: ProbeArgs) -> i32 {
    use stockade::probe::harness;
    if a.list {
        for (id, cat, what) in stockade::probe::catalogue() {
            println!("{cat:<11} {id:<24} {what}");
        }
        return 0;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("locating the stockade binary: {e}")),
    };
    // Input errors first: they get the usage status, a battery that could not run gets 1.
    let spec = if a.control { None } else { policy_spec(a.policy.as_deref()) };
    if let Err(e) =
        policy::load(spec.as_deref()).map_err(harness::HarnessError::from).and_then(|_| harness::check_only(&a.only))
    {
        return usage(e);
    }
    let (b, expect) = if a.control {
        match harness::run_control(&a.only, &exe) {
            Ok(b) => (b, harness::Expect::Escaped),
            Err(e) => return fail(e),
        }
    } else {
        let opts = harness::Options { policy: spec, only: a.only.clone(), exe };
        match harness::run(&opts) {
            Ok(b) => (b, harness::Expect::Blocked { except: &a.expect_fail }),
            Err(e) => return fail(e),
        }
    };
    match a.format {
        ProbeFormat::Table => print!("{}", harness::table(&b, &expect)),
        ProbeFormat::Json => println!("{}", serde_json::to_string_pretty(&b).expect("serialises")),
        ProbeFormat::Junit => print!("{}", harness::junit(&b, &expect)),
    }
    harness::exit_code(&b, &expect)
}

/// One roff document: the top-level page, then a section per subcommand.
fn cmd_man(out: Option<&std::path::Path>) -> i32 {
    use std::io::Write;
    let cmd = <Cli as clap::CommandFactory>::command();
    if let Some(dir) = out {
        return match man::write_all(&cmd, dir) {
            Ok(names) => {
                println!("wrote {} pages to {}", names.len(), dir.display());
                0
            }
            Err(e) => fail(format!("writing man pages to {}: {e}", dir.display())),
        };
    }
    let page = match man::pages(&cmd) {
        Ok(pages) => pages.into_iter().next().map(|(_, text)| text).unwrap_or_default(),
        Err(e) => return fail(format!("rendering the man page: {e}")),
    };
    match std::io::stdout().write_all(&page) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_policy_is_the_flag_then_the_variable_then_the_system_file_then_the_built_in() {
        let dir = std::env::temp_dir().join(format!("stockade-policy-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let system = dir.join("policy.toml");
        let r = resolve_policy_spec;
        assert_eq!(r(None, None, &system), None, "no system file: the built-in default");
        std::fs::write(&system, "extends = \"strict\"\n").unwrap();
        assert_eq!(r(None, None, &system).as_deref(), Some(system.to_str().unwrap()));
        assert_eq!(r(None, Some("ci".into()), &system).as_deref(), Some("ci"));
        let empty = r(None, Some(String::new()), &system);
        assert_eq!(empty.as_deref(), Some(system.to_str().unwrap()), "an empty variable is unset");
        assert_eq!(r(Some("default"), Some("ci".into()), &system).as_deref(), Some("default"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_name() == "help" || sub.is_hide_set() {
                continue;
            }
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    #[test]
    fn global_options_come_after_a_subcommands_own() {
        let mut cmd = Cli::command();
        cmd.build();
        for name in ["run", "session", "worker", "audit"] {
            let help = cmd.find_subcommand_mut(name).unwrap().render_help().to_string();
            let (own, global) = (help.find("--policy").or(help.find("--format")), help.find("--log"));
            assert!(own.is_some() && global.is_some() && own < global, "{name}:\n{help}");
        }
    }

    #[test]
    fn every_flag_and_argument_has_help_text() {
        let mut missing = Vec::new();
        walk(&Cli::command(), "stockade", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }
}
