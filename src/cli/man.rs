//! Man pages: `stockade(1)`, one `stockade-SUB(1)` per subcommand (nested ones too, e.g.
//! `stockade-policy-show(1)`), and `stockade.toml(5)` for the policy format.

use std::io::Write;
use std::path::Path;

/// What every page says about exit status (the table in `stockade --help`).
const EXIT_STATUS: &str = "0 on success. 1 when the work failed or the answer is no (check with a NO line, audit \
over --fail-above, probe with an escape, an API error). 2 on a usage or input error (a bad flag or value, a policy \
that does not load, an unknown name): nothing was attempted. run and session: 125 when Stockade could not build the \
jail. run: otherwise the command's own status; 128+N when it died of signal N, 124 on timeout, 126 when it is not \
executable, 127 when it is not found.";

/// Examples, by page name.
fn examples(page: &str) -> &'static [&'static str] {
    match page {
        "stockade" => &["sudo stockade demo", "sudo stockade run -- sh -c 'id; ls /'", "stockade audit default strict"],
        "stockade-run" => &[
            "sudo stockade run --workspace ./proj --policy my.toml -- make test",
            "sudo stockade run --report --policy strict -- python3 -c 'print(1)'",
        ],
        "stockade-session" => &[
            "printf '%s\\n' '{\"id\":\"1\",\"name\":\"bash\",\"input\":{\"command\":\"ls\"}}' | sudo stockade session",
        ],
        "stockade-check" => &["stockade check", "sudo stockade check --policy strict"],
        "stockade-worker" | "stockade-worker-poll" => {
            &["sudo stockade worker --environment-id env_01 --environment-key-file /etc/stockade/env.key"]
        }
        "stockade-worker-run" => &["ant beta:worker poll --on-work 'stockade worker run'"],
        "stockade-audit" => {
            &["stockade audit default strict ci", "stockade audit --diff old.toml new.toml --fail-on-weaker"]
        }
        "stockade-probe" => &["sudo stockade probe --policy strict --format junit > probe.xml"],
        "stockade-policy-show" => &["stockade policy show policies/ci.toml"],
        "stockade-policy-groups" => &["stockade policy groups @system-service"],
        "stockade-man" => &["stockade man --out /usr/local/share/man/man1"],
        _ => &[],
    }
}

/// Files a page's command reads or writes.
fn files(page: &str) -> &'static str {
    if page.starts_with("stockade-worker") || page == "stockade-webhook" {
        "The state directory (--state-dir): worker.lock, worker-id, items/WORK/ (item.json, workspace/ and \
         outputs/ with their workspace.img and outputs.img when the policy limits their size, outbox/), outputs/ \
         (kept outputs of ended sessions). Policies: a path, or a built-in name (default, strict, ci)."
    } else if page.starts_with("stockade-control-plane") {
        "The state directory (--state): the environment and organisation keys, webhook.key."
    } else {
        "Policy files (TOML, see stockade.toml(5)); the built-in default, strict and ci policies are embedded in \
         the binary, and policies/*.toml in the source holds the same text."
    }
}

/// Escapes text for a roff line.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

fn page(cmd: &clap::Command, name: &str, out: &mut Vec<u8>) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(out)?;
    }
    writeln!(out, ".SH \"EXIT STATUS\"\n{}", roff(EXIT_STATUS))?;
    let mut env: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| {
            let flag = a.get_long().map(|l| format!("--{l}")).unwrap_or_else(|| a.get_id().to_string().to_uppercase());
            a.get_env().map(|e| format!("{}: {flag}", e.to_string_lossy()))
        })
        .collect();
    if name.starts_with("stockade-worker") || name == "stockade-webhook" {
        env.push(
            "ANTHROPIC_ENVIRONMENT_KEY: the environment key, unless --environment-key or \
             --environment-key-file gives it; removed from the process's environment at start"
                .into(),
        );
    }
    if ["stockade-stats", "stockade-stop", "stockade-work"].iter().any(|p| name.starts_with(p))
        || name.starts_with("stockade-control-plane-session")
    {
        env.push("ANTHROPIC_API_KEY: the organisation key, unless --api-key-file gives it".into());
    }
    env.push("RUST_LOG: the log filter; overrides -v".into());
    writeln!(out, ".SH ENVIRONMENT")?;
    for e in env {
        writeln!(out, ".TP\n{}", roff(&e))?;
    }
    writeln!(out, ".SH FILES\n{}", roff(files(name)))?;
    let ex = examples(name);
    writeln!(out, ".SH EXAMPLES")?;
    if ex.is_empty() {
        writeln!(out, "See {}.", roff(&format!("{} --help", name.replace('-', " "))))?;
    }
    for e in ex {
        writeln!(out, ".PP\n.nf\n{}\n.fi", roff(e))?;
    }
    writeln!(out, ".SH \"SEE ALSO\"\nstockade(1), stockade.toml(5)")?;
    Ok(())
}

/// Every page as (file name, text): the command, each visible subcommand at any depth, and the
/// policy format.
pub(super) fn pages(root: &clap::Command) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut v = Vec::new();
    fn walk(cmd: &clap::Command, name: &str, bin: &str, v: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        let c = cmd.clone().name(name.to_owned()).display_name(name.to_owned()).bin_name(bin.to_owned());
        let mut out = Vec::new();
        page(&c, name, &mut out)?;
        v.push((format!("{name}.1"), out));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            walk(sub, &format!("{name}-{}", sub.get_name()), &format!("{bin} {}", sub.get_name()), v)?;
        }
        Ok(())
    }
    let mut root = root.clone();
    root.build();
    walk(&root, "stockade", "stockade", &mut v)?;
    v.push(("stockade.toml.5".into(), POLICY_PAGE.as_bytes().to_vec()));
    Ok(v)
}

/// Writes every page into `dir`; returns their names.
/// Writes every page into an installable tree under `dir`: `man1/NAME.1`, `man5/NAME.5` (so
/// `stockade man --out /usr/local/share/man` installs them, and `man -M DIR` reads them).
/// Returns the paths written, relative to `dir`.
pub(super) fn write_all(root: &clap::Command, dir: &Path) -> std::io::Result<Vec<String>> {
    let mut written = Vec::new();
    for (name, text) in pages(root)? {
        let section = name.rsplit('.').next().unwrap_or("1");
        let sub = dir.join(format!("man{section}"));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(&name), text)?;
        written.push(format!("man{section}/{name}"));
    }
    Ok(written)
}

const POLICY_PAGE: &str = r#".TH stockade.toml 5 "" "stockade" "File Formats"
.SH NAME
stockade.toml \- Stockade jail policy
.SH SYNOPSIS
.nf
extends = "default"
[user] [filesystem] [env] [limits] [network] [landlock] [seccomp] [capabilities] [tools]
.fi
.SH DESCRIPTION
A policy says what a jail built by stockade run, stockade session or the worker may do. It is TOML.
\fBextends\fR names the policy this one starts from: a built\-in name (default, strict, ci), a path
relative to this file, or "none" for an empty, unlimited start. Scalars override what the extended
policy set, maps merge key by key, and every list field X is replaced when written as X, or edited
with X_add = [...] and X_remove = [...]. Errors name the file, line and column, the field and the
reason. \fBstockade policy show FILE\fR prints the resolved policy; \fBstockade audit FILE\fR scores it.
.SH SECTIONS
.TP
\fBhostname\fR
The jail's host name.
.TP
\fB[user]\fR uid, gid, name, host_id_base
The jail user, and (as root) where its ids map on the host.
.TP
\fB[filesystem]\fR read_only, read_write, etc, rootfs, sys, workspace
Binds ("SRC" or "SRC:DST"; a leading \- skips a path the host lacks), /etc entries, a tool image
as the source of read\-only binds, /sys ("none" or "read_only"), and whether /workspace is
read_write or read_only.
.TP
\fB[env]\fR set, pass, allow_secrets
Variables set, passed from the host, and secret\-looking names allowed through.
.TP
\fB[limits]\fR memory, pids, cpu, nofile, nproc, fsize, address_space, tmp_size, timeout, enforcement, workspace_size, outputs_size
cgroup limits (memory, pids, cpu), rlimits, the scratch tmpfs, a wall\-clock timeout,
"hard" (refuse) or "best_effort" when a cgroup limit cannot be applied, and the size of the
filesystems behind /workspace and /mnt/session/outputs. Any of them may be "none", which lifts
what an extended policy sets.
.TP
\fB[network]\fR mode, allow, allow_domains, upstream_dns, pool, on_deny
"none", "loopback" or "veth"; in veth mode the egress allowlist ("CIDR[:PORT[\-PORT]][/tcp|/udp]"),
names resolved through Stockade's DNS allowlist, the upstream resolvers, the address pool, and
whether denied connections are rejected ("reject") or dropped ("drop").
.TP
\fB[landlock]\fR compatibility, tcp_bind, tcp_connect
"hard" (refuse unless every landlock right is enforced) or "best_effort"; TCP port rules.
.TP
\fB[seccomp]\fR default_action, allow, deny, socket_families
The syscall allowlist by group (stockade policy groups) or name, what a violation gets ("errno",
"kill", "log"), and the socket families allowed.
.TP
\fB[capabilities]\fR keep
Capabilities kept (none by default).
.TP
\fB[tools]\fR confine_paths
true: the agent's file tools refuse paths outside /workspace, as the official runner does.
.TP
\fB[trail]\fR exec, argv_max, input_max, max_size, max_rate, on_full, redact, ship
The session audit trail (stockade\-trail(1)): record every program executed (a seccomp user
notification answered outside the jail), how much of argv and of tool inputs to keep, the most a
trail may hold and what a full one does ("truncate", or "fail": no program starts, no call
runs), regular expressions redacted, and where records are also sent ("stdout", "syslog", or an
OTLP/HTTP logs URL).
.TP
\fB[retention]\fR outputs, workspaces, trails
How long a worker keeps what a session leaves behind: "session_end", "keep" or a duration ("7d").
.TP
\fB[provision]\fR git_url_key, git_ref_key, git_allow, copy_key, copy_from, allow, allow_domains, credentials, timeout
Prepare /workspace before the agent's first call from session metadata, which only chooses among
what is declared: a repository under one of the git_allow URL prefixes, or a copy_from directory
by name. It runs in a jail of its own with its own egress allowlist and git credentials (a file,
or "credential:NAME"); anything else is refused and every call of the session says why.
.SH EXAMPLES
.nf
extends = "default"
[limits]
memory = "1G"
workspace_size = "2G"
[network]
mode = "veth"
allow_domains = ["pypi.org", "files.pythonhosted.org"]
.fi
.SH FILES
policies/default.toml, strict.toml and ci.toml in the source: the built\-in policies, commented.
.SH "SEE ALSO"
stockade(1), stockade\-audit(1), stockade\-policy\-show(1)
"#;
