//! `stockade control-plane session|memory-store ...`: the organisation's calls to a running local
//! control plane — scripted sessions (with skills and memory stores) and memory stores.

use clap::{Args, Subcommand};
use std::path::PathBuf;

use stockade::control_plane::local::{self, CreateSession, SessionView};

use super::ops::{org_client, runtime, transcript};
use super::{fail, usage};

#[derive(Args)]
pub(super) struct OrgAccess {
    /// API base URL (the local control plane's by default).
    #[arg(
        long = "base-url",
        visible_alias = "api-url",
        value_name = "URL",
        env = "ANTHROPIC_BASE_URL",
        default_value = "http://127.0.0.1:8787"
    )]
    api_url: String,
    /// File holding the organisation key; otherwise $ANTHROPIC_API_KEY.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(super) enum CpCommand {
    /// Sessions of a running local control plane.
    Session {
        #[command(subcommand)]
        command: SessionCommand,
    },
    /// Memory stores of a running local control plane (the API's `/v1/memory_stores`).
    MemoryStore {
        #[command(subcommand)]
        command: MemoryStoreCommand,
    },
}

#[derive(Subcommand)]
pub(super) enum MemoryStoreCommand {
    /// Create a memory store; prints it (its `id` is what `session create --memory-store` takes).
    Create {
        /// Its name; its default mount path is /mnt/memory/ and the name lowercased, every run
        /// of other characters than letters and digits one hyphen.
        #[arg(long)]
        name: String,
        /// What it holds, for the agent's prompt.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        access: OrgAccess,
    },
    /// Write a memory: PATH (e.g. /notes/todo.md) with the content of FILE, or of standard input.
    Put {
        /// The store (memstore_…).
        store: String,
        /// The memory's path in the store, starting with /.
        path: String,
        /// Read the content from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        access: OrgAccess,
    },
    /// Print a store's memories: path, size and SHA-256, or with --json every memory whole.
    Show {
        /// The store (memstore_…).
        store: String,
        /// The memories as JSON, content included.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: OrgAccess,
    },
}

#[derive(Subcommand)]
pub(super) enum SessionCommand {
    /// Create a session driven by a JSON-lines script of tool calls
    /// (`{"name": "bash", "input": {"command": "ls"}}` per line; `"end_session": true` ends early).
    Create {
        /// The script: one tool call per line.
        #[arg(long)]
        script: PathBuf,
        /// A skill of the session's agent, NAME=ARCHIVE (a zip or tar file, any compression);
        /// repeatable.
        #[arg(long = "skill", value_name = "NAME=ARCHIVE")]
        skills: Vec<String>,
        /// Attach a memory store (`stockade control-plane memory-store create`): its id, the path
        /// it is mounted at [default: /mnt/memory/<its name>], and `read_only`; repeatable.
        #[arg(long = "memory-store", value_name = "STORE_ID[:MOUNT_PATH][:read_only]")]
        memory_stores: Vec<String>,
        /// The environment whose queue gets the session's work item [env: ANTHROPIC_ENVIRONMENT_ID].
        #[arg(long, env = "ANTHROPIC_ENVIRONMENT_ID", default_value = local::DEFAULT_ENVIRONMENT)]
        environment_id: String,
        #[command(flatten)]
        access: OrgAccess,
    },
    /// Print a session's transcript: calls, results, timings.
    Show {
        /// The session (sesn_…).
        id: String,
        /// Print the session's view as JSON (calls, results, work state).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        access: OrgAccess,
    },
}

/// Every item of a listing, page after page.
async fn all_pages<F, Fut>(call: &F, list: &str) -> Result<Vec<serde_json::Value>, String>
where
    F: Fn(reqwest::Method, String, Option<serde_json::Value>) -> Fut,
    Fut: std::future::Future<Output = Result<Option<serde_json::Value>, stockade::control_plane::ApiError>>,
{
    let mut all = Vec::new();
    let mut page = list.to_owned();
    loop {
        let v = call(reqwest::Method::GET, page, None).await.map_err(|e| e.to_string())?.ok_or("empty answer")?;
        all.extend(v["data"].as_array().cloned().unwrap_or_default());
        match v["next_page"].as_str() {
            Some(n) => page = format!("{list}&page={n}"),
            None => return Ok(all),
        }
    }
}

pub(super) fn memory_store_command(c: MemoryStoreCommand) -> i32 {
    let access = match &c {
        MemoryStoreCommand::Create { access, .. }
        | MemoryStoreCommand::Put { access, .. }
        | MemoryStoreCommand::Show { access, .. } => access,
    };
    let client = match org_client(&access.api_url, access.api_key_file.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let client = client.clone();
        async move { local::admin::<serde_json::Value, _>(&client, method, &path, body.as_ref()).await }
    };
    runtime().block_on(async move {
        match c {
            MemoryStoreCommand::Create { name, description, .. } => {
                let body = serde_json::json!({"name": name, "description": description});
                match call(reqwest::Method::POST, "/v1/memory_stores".into(), Some(body)).await {
                    Ok(Some(v)) => {
                        println!("{v}");
                        0
                    }
                    Ok(None) => fail("empty answer"),
                    Err(e) => fail(e),
                }
            }
            MemoryStoreCommand::Put { store, path, file, .. } => {
                let content = match &file {
                    Some(f) => std::fs::read_to_string(f).map_err(|e| format!("--file {}: {e}", f.display())),
                    None => std::io::read_to_string(std::io::stdin()).map_err(|e| format!("standard input: {e}")),
                };
                let content = match content {
                    Ok(c) => c,
                    Err(e) => return usage(e),
                };
                let found = match all_pages(&call, &format!("/v1/memory_stores/{store}/memories?limit=100")).await {
                    Ok(all) => all.into_iter().find(|m| m["path"] == path.as_str()),
                    Err(e) => return fail(e),
                };
                let r = match found {
                    Some(m) => {
                        let p = format!("/v1/memory_stores/{store}/memories/{}", m["id"].as_str().unwrap_or(""));
                        call(reqwest::Method::POST, p, Some(serde_json::json!({"content": content}))).await
                    }
                    None => {
                        let p = format!("/v1/memory_stores/{store}/memories");
                        call(reqwest::Method::POST, p, Some(serde_json::json!({"path": path, "content": content})))
                            .await
                    }
                };
                match r {
                    Ok(Some(v)) => {
                        println!("{v}");
                        0
                    }
                    Ok(None) => fail("empty answer"),
                    Err(e) => fail(e),
                }
            }
            MemoryStoreCommand::Show { store, json, .. } => {
                let all =
                    match all_pages(&call, &format!("/v1/memory_stores/{store}/memories?view=full&limit=20")).await {
                        Ok(all) => all,
                        Err(e) => return fail(e),
                    };
                if json {
                    println!("{}", serde_json::to_string_pretty(&all).expect("serialises"));
                } else {
                    for m in &all {
                        println!(
                            "{}  {} bytes  sha256 {}",
                            m["path"].as_str().unwrap_or(""),
                            m["content_size_bytes"],
                            m["content_sha256"].as_str().unwrap_or("")
                        );
                    }
                }
                0
            }
        }
    })
}

pub(super) fn session_command(c: SessionCommand) -> i32 {
    let access = match &c {
        SessionCommand::Create { access, .. } | SessionCommand::Show { access, .. } => access,
    };
    let client = match org_client(&access.api_url, access.api_key_file.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    runtime().block_on(async move {
        match c {
            SessionCommand::Create { script, skills, memory_stores, environment_id, .. } => {
                let mut attached = Vec::new();
                for spec in &memory_stores {
                    match local::memory::Attached::parse(spec) {
                        Ok(a) => attached.push(a),
                        Err(e) => return usage(format!("--memory-store {e}")),
                    }
                }
                let text = match std::fs::read_to_string(&script) {
                    Ok(t) => t,
                    Err(e) => return usage(format!("--script {}: {e}", script.display())),
                };
                let steps = match local::parse_script(&text, &script.display().to_string()) {
                    Ok(s) => s,
                    Err(e) => return usage(e),
                };
                let mut local_skills = Vec::new();
                for spec in skills {
                    use base64::Engine;
                    let Some((name, file)) = spec.split_once('=') else {
                        return usage(format!("--skill {spec}: expected NAME=ARCHIVE"));
                    };
                    match std::fs::read(file) {
                        Ok(b) => local_skills.push(local::LocalSkill {
                            name: name.to_owned(),
                            archive_base64: base64::engine::general_purpose::STANDARD.encode(b),
                        }),
                        Err(e) => return usage(format!("--skill {spec}: {file}: {e}")),
                    }
                }
                let req = CreateSession {
                    environment_id,
                    script: steps,
                    metadata: Default::default(),
                    skills: local_skills,
                    memory_stores: attached,
                    no_secret: false,
                };
                match local::admin::<local::CreatedSession, _>(
                    &client,
                    reqwest::Method::POST,
                    "/v1/local/sessions",
                    Some(&req),
                )
                .await
                {
                    Ok(Some(s)) => {
                        println!("{}", serde_json::to_string(&s).expect("serialises"));
                        0
                    }
                    Ok(None) => fail("empty answer"),
                    Err(e) => fail(e),
                }
            }
            SessionCommand::Show { id, json, .. } => {
                let p = format!("/v1/local/sessions/{id}");
                match local::admin::<SessionView, ()>(&client, reqwest::Method::GET, &p, None).await {
                    Ok(Some(v)) if json => {
                        println!("{}", serde_json::to_string_pretty(&v).expect("serialises"));
                        0
                    }
                    Ok(Some(v)) => {
                        print!("{}", transcript(&v));
                        0
                    }
                    Ok(None) => fail("empty answer"),
                    Err(e) => fail(e),
                }
            }
        }
    })
}
