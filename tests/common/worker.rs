//! The local control plane and `stockade worker` as the worker tests drive them.

use super::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stockade::control_plane::client::AuthScheme;
use stockade::control_plane::local::{
    CreateSession, Fault, LocalConfig, LocalControlPlane, LocalSkill, ScriptStep, SessionView, DEFAULT_ENVIRONMENT,
};
use stockade::control_plane::wire::WorkState;
use stockade::control_plane::{Client, Secret};

/// A local control plane on a loopback port, with its own runtime.
pub(crate) struct Cp {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) cp: LocalControlPlane,
    pub(crate) url: String,
    pub(crate) dir: TempDir,
}

impl Cp {
    pub(crate) fn start(lease: Duration) -> Cp {
        Cp::start_with(LocalConfig { lease, ..LocalConfig::default() })
    }

    pub(crate) fn start_with(cfg: LocalConfig) -> Cp {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let cp = LocalControlPlane::new(cfg).unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        rt.spawn(cp.clone().serve(listener, std::future::pending()));
        let dir = TempDir::new("cp");
        cp.write_keys(dir.path()).unwrap();
        Cp { rt, cp, url, dir }
    }

    pub(crate) fn key_file(&self) -> PathBuf {
        self.dir.path().join(format!("{DEFAULT_ENVIRONMENT}.key"))
    }

    pub(crate) fn env_key(&self) -> String {
        std::fs::read_to_string(self.key_file()).unwrap()
    }

    pub(crate) fn client(&self, key: Secret, auth: AuthScheme) -> Client {
        let mut c = Client::new(&self.url, key, auth).unwrap();
        c.timeout = Duration::from_secs(3);
        c
    }

    pub(crate) fn org(&self) -> Client {
        self.client(self.cp.org_key(), AuthScheme::XApiKey)
    }

    /// A client with the environment key, as a worker holds it.
    pub(crate) fn env(&self) -> Client {
        self.client(Secret::new(self.env_key()), AuthScheme::Bearer)
    }

    pub(crate) fn session(&self, steps: Vec<ScriptStep>) -> (String, String) {
        self.session_full(steps, serde_json::Map::new())
    }

    pub(crate) fn session_full(
        &self,
        steps: Vec<ScriptStep>,
        metadata: serde_json::Map<String, serde_json::Value>,
    ) -> (String, String) {
        self.session_with_skills(steps, metadata, Vec::new())
    }

    pub(crate) fn session_with_skills(
        &self,
        steps: Vec<ScriptStep>,
        metadata: serde_json::Map<String, serde_json::Value>,
        skills: Vec<LocalSkill>,
    ) -> (String, String) {
        self.session_with(steps, metadata, skills, Vec::new())
    }

    /// A session with memory stores attached whose item carries no sessions token.
    pub(crate) fn session_without_token(
        &self,
        steps: Vec<ScriptStep>,
        memory_stores: Vec<stockade::control_plane::local::memory::Attached>,
    ) -> (String, String) {
        self.create(CreateSession { memory_stores, no_secret: true, ..self.request(steps, serde_json::Map::new()) })
    }

    /// A session with skills and memory stores attached.
    pub(crate) fn session_with(
        &self,
        steps: Vec<ScriptStep>,
        metadata: serde_json::Map<String, serde_json::Value>,
        skills: Vec<LocalSkill>,
        memory_stores: Vec<stockade::control_plane::local::memory::Attached>,
    ) -> (String, String) {
        self.create(CreateSession { skills, memory_stores, ..self.request(steps, metadata) })
    }

    fn request(&self, steps: Vec<ScriptStep>, metadata: serde_json::Map<String, serde_json::Value>) -> CreateSession {
        CreateSession {
            environment_id: DEFAULT_ENVIRONMENT.into(),
            script: steps,
            metadata,
            skills: Vec::new(),
            memory_stores: Vec::new(),
            no_secret: false,
        }
    }

    fn create(&self, req: CreateSession) -> (String, String) {
        let c = self.cp.create_session(req).unwrap();
        (c.session_id, c.work_id)
    }

    pub(crate) fn view(&self, session: &str) -> SessionView {
        self.cp.session_view(session).unwrap()
    }

    /// Waits until the session's work item has been stopped (or `limit` passes).
    pub(crate) fn wait_ended(&self, session: &str, limit: Duration) -> SessionView {
        let t = Instant::now();
        loop {
            let v = self.view(session);
            if v.work_state == WorkState::Stopped || t.elapsed() > limit {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn wait_for(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < limit, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Once a command matching `marker` runs on the host, the session's `thread` goes idle
    /// without listing its running call: the subagent no longer waits on it. (A scripted delay
    /// would race the worker's start on a slow machine, and could stop a call that never ran.)
    pub(crate) fn stop_waiting_once_running(&self, session: &str, thread: &str, marker: &str) {
        self.wait_for("the subagent's command to start", Duration::from_secs(30), || {
            !host_processes_matching(marker).is_empty()
        });
        self.cp
            .push_raw_event(
                session,
                serde_json::json!({"type": "session.thread_status_idle", "session_thread_id": thread,
                                   "stop_reason": {"type": "end_turn"}}),
            )
            .unwrap();
    }

    pub(crate) fn faults(&self, faults: Vec<Fault>) {
        let org = self.org();
        let body = stockade::control_plane::local::Faults { faults };
        self.rt
            .block_on(stockade::control_plane::local::admin::<serde_json::Value, _>(
                &org,
                reqwest::Method::POST,
                "/v1/local/faults",
                Some(&body),
            ))
            .unwrap();
    }

    /// The faults not injected yet.
    pub(crate) fn pending_faults(&self) -> Vec<Fault> {
        let org = self.org();
        let f: stockade::control_plane::local::Faults = self
            .rt
            .block_on(stockade::control_plane::local::admin::<_, ()>(
                &org,
                reqwest::Method::GET,
                "/v1/local/faults",
                None,
            ))
            .unwrap()
            .expect("a body");
        f.faults
    }

    pub(crate) fn clear_faults(&self) {
        let org = self.org();
        self.rt
            .block_on(stockade::control_plane::local::admin::<serde_json::Value, ()>(
                &org,
                reqwest::Method::DELETE,
                "/v1/local/faults",
                None,
            ))
            .unwrap();
    }
}

pub(crate) fn bash(cmd: &str) -> ScriptStep {
    ScriptStep::call("bash", json!({ "command": cmd }))
}

pub(crate) fn step(name: &str, input: serde_json::Value) -> ScriptStep {
    ScriptStep::call(name, input)
}

/// The item ended because the agent's turn did: every call answered, stopped by the worker.
pub(crate) fn completed(v: &SessionView) -> bool {
    v.work_state == WorkState::Stopped && v.finished
}

pub(crate) struct Worker {
    pub(crate) child: Child,
}

impl Worker {
    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn sigterm(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The worker as the tests run it: `--max-idle 1s` unless `extra` sets it.
pub(crate) fn worker_cmd(cp: &Cp, state: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(STOCKADE);
    c.args(["-v", "worker", "--environment-id", DEFAULT_ENVIRONMENT, "--api-url", &cp.url, "--state-dir"])
        .arg(state)
        .args(["--shutdown-timeout", "20s"])
        .args(extra)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_ENVIRONMENT_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if !extra.contains(&"--max-idle") {
        c.args(["--max-idle", "1s"]);
    }
    if !extra.contains(&"--api-timeout") {
        c.args(["--api-timeout", "2s"]);
    }
    c
}

pub(crate) fn start_worker(cp: &Cp, state: &Path, extra: &[&str]) -> Worker {
    let key = cp.key_file();
    let mut c = worker_cmd(cp, state, extra);
    c.arg("--environment-key-file").arg(&key);
    Worker { child: c.spawn().unwrap() }
}

pub(crate) fn result_of(v: &SessionView, i: usize) -> &str {
    v.calls.get(i).and_then(|c| c.result.as_deref()).unwrap_or("<none>")
}
