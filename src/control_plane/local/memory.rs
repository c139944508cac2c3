//! Memory stores, as the real API serves them under `/v1/memory_stores` (`beta.memory_stores` in
//! the official clients): stores, their memories (`view=basic|full`, cursor pages, `path_prefix`
//! and `depth`), updates and deletes guarded by content hashes, and each memory's versions.
//! A session's item token may use the stores its session has attached; the organisation key may
//! use any; an environment key none (the real endpoints refuse it).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::BTreeMap;

use super::{authorize, conflict, invalid, not_found, now_ms, ts, ApiErr, ApiResult, Db, LocalControlPlane, Need};

/// The API's bounds: a memory's content, a path, a path's segments, a store's memories.
pub const MAX_CONTENT_BYTES: usize = 102_400;
pub const MAX_PATH_BYTES: usize = 1024;
const MAX_SEGMENTS: usize = 20;
pub const MAX_MEMORIES: usize = 2000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoreRec {
    id: String,
    name: String,
    description: String,
    metadata: BTreeMap<String, String>,
    created_ms: u64,
    updated_ms: u64,
    archived_ms: Option<u64>,
    /// By memory id.
    memories: BTreeMap<String, MemRec>,
    versions: Vec<VersionRec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemRec {
    id: String,
    path: String,
    content: String,
    sha: String,
    created_ms: u64,
    updated_ms: u64,
    version_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VersionRec {
    id: String,
    memory_id: String,
    operation: String,
    path: String,
    /// None for a deletion.
    content: Option<String>,
    created_ms: u64,
    /// The session whose token made the change; none for the organisation key.
    session_id: Option<String>,
}

/// A memory store attached to a session: what `resources[]` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attached {
    pub memory_store_id: String,
    /// Where it is mounted; none for the store's default (`/mnt/memory/<slug of its name>`), and
    /// empty for a resource without one.
    #[serde(default)]
    pub mount_path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

impl Attached {
    /// `STORE_ID[:MOUNT_PATH][:read_only]`, as the command line spells one.
    pub fn parse(s: &str) -> Result<Attached, String> {
        let mut parts: Vec<&str> = s.split(':').collect();
        let read_only = match parts.last() {
            Some(&"read_only") if parts.len() > 1 => {
                parts.pop();
                true
            }
            Some(&"read_write") if parts.len() > 1 => {
                parts.pop();
                false
            }
            _ => false,
        };
        match parts.as_slice() {
            [id] if !id.is_empty() => Ok(Attached { memory_store_id: id.to_string(), mount_path: None, read_only }),
            [id, path] if !id.is_empty() && !path.is_empty() => {
                Ok(Attached { memory_store_id: id.to_string(), mount_path: Some(path.to_string()), read_only })
            }
            _ => Err(format!("{s:?}: expected STORE_ID[:MOUNT_PATH][:read_only]")),
        }
    }
}

pub(crate) fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// The store's directory name under `/mnt/memory/`: its name lowercased, every run of
/// characters other than ASCII letters and digits one hyphen.
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out
}

/// The `resources[]` entry of an attached store, as the session read shows it.
pub(super) fn resource(db: &Db, a: &Attached) -> Value {
    let store = db.memory_stores.get(&a.memory_store_id);
    let name = store.map(|s| s.name.clone());
    // An empty mount_path stands for a resource that carries none (the worker's fallback).
    let mount = match a.mount_path.as_deref() {
        Some("") => None,
        Some(p) => Some(p.to_owned()),
        None => name.as_ref().map(|n| format!("/mnt/memory/{}", slug(n))),
    };
    json!({
        "type": "memory_store", "memory_store_id": a.memory_store_id,
        "access": if a.read_only { "read_only" } else { "read_write" },
        "mount_path": mount, "name": name,
        "description": store.map(|s| s.description.clone()).unwrap_or_default(),
        "instructions": null,
    })
}

fn store_json(s: &StoreRec) -> Value {
    json!({
        "type": "memory_store", "id": s.id, "name": s.name, "description": s.description,
        "metadata": s.metadata, "created_at": ts(s.created_ms), "updated_at": ts(s.updated_ms),
        "archived_at": s.archived_ms.map(ts),
    })
}

fn memory_json(store: &str, m: &MemRec, full: bool) -> Value {
    json!({
        "type": "memory", "id": m.id, "memory_store_id": store, "path": m.path,
        "content": if full { Some(&m.content) } else { None },
        "content_sha256": m.sha, "content_size_bytes": m.content.len(),
        "memory_version_id": m.version_id,
        "created_at": ts(m.created_ms), "updated_at": ts(m.updated_ms),
    })
}

fn version_json(store: &str, v: &VersionRec, full: bool) -> Value {
    let actor = match &v.session_id {
        Some(s) => json!({"type": "session_actor", "session_id": s}),
        None => json!({"type": "api_actor", "api_key_id": "apikey_local"}),
    };
    json!({
        "type": "memory_version", "id": v.id, "memory_id": v.memory_id, "memory_store_id": store,
        "operation": v.operation, "path": v.path,
        "content": if full { v.content.clone() } else { None },
        "content_sha256": v.content.as_deref().map(|c| sha256_hex(c.as_bytes())),
        "content_size_bytes": v.content.as_deref().map(str::len),
        "created_at": ts(v.created_ms), "created_by": actor, "redacted_at": null, "redacted_by": null,
    })
}

/// The API's rules for a memory's path.
fn check_path(p: &str) -> ApiResult<()> {
    let bad = |why: &str| Err(invalid(format!("path: {why}: {p:?}")));
    if !p.starts_with('/') {
        return bad("must start with /");
    }
    if p.len() > MAX_PATH_BYTES {
        return bad("longer than 1,024 bytes");
    }
    let segs: Vec<&str> = p[1..].split('/').collect();
    if segs.len() > MAX_SEGMENTS {
        return bad("more than 20 segments");
    }
    if segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return bad("a segment is empty, . or ..");
    }
    if p.chars().any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}' || c == '\u{feff}') {
        return bad("control or format characters");
    }
    Ok(())
}

fn check_content(c: &str) -> ApiResult<()> {
    if c.len() > MAX_CONTENT_BYTES {
        return Err(ApiErr(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("content: {} bytes; the maximum is 100 kB (102,400 bytes)", c.len()),
            None,
        ));
    }
    Ok(())
}

/// Who may use store `id`: the organisation key, or the token of an item whose session has it
/// attached. The session's id is returned for the versions' `created_by`.
fn authorize_store(db: &Db, h: &HeaderMap, id: &str) -> ApiResult<Option<String>> {
    if authorize(db, h, Need::Org).is_ok() {
        return Ok(None);
    }
    for s in db.sessions.values().filter(|s| s.memory_stores.iter().any(|a| a.memory_store_id == id)) {
        let env = s.env.clone();
        if authorize(db, h, Need::ItemToken(&env, &s.work_id)).is_ok() {
            return Ok(Some(s.id.clone()));
        }
    }
    // An environment key is a valid key, refused here, as the real endpoints refuse it.
    authorize(db, h, Need::Any)?;
    Err(ApiErr(
        StatusCode::FORBIDDEN,
        "permission_error",
        format!("this credential may not use memory store {id}"),
        None,
    ))
}

fn store_ref<'a>(db: &'a Db, id: &str) -> ApiResult<&'a StoreRec> {
    db.memory_stores.get(id).ok_or_else(|| not_found(format!("memory store {id} not found")))
}

fn store_mut<'a>(db: &'a mut Db, id: &str) -> ApiResult<&'a mut StoreRec> {
    db.memory_stores.get_mut(id).ok_or_else(|| not_found(format!("memory store {id} not found")))
}

/// One page of a listing: 20 items unless `limit` says otherwise, at most `max`.
fn page(all: &[Value], limit: Option<usize>, page: Option<String>, max: usize) -> ApiResult<Json<Value>> {
    let q = super::PageQuery { limit, page, order: None };
    Ok(Json(serde_json::to_value(super::page_of(all, &q, 20, max)?).expect("serialises")))
}

#[derive(Debug, Default, Deserialize)]
struct ViewQuery {
    view: Option<String>,
}

fn full_view(v: &Option<String>, default_full: bool) -> ApiResult<bool> {
    match v.as_deref() {
        None => Ok(default_full),
        Some("full") => Ok(true),
        Some("basic") => Ok(false),
        Some(o) => Err(invalid(format!("view: must be basic or full, got {o:?}"))),
    }
}

#[derive(Debug, Deserialize)]
struct CreateStore {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl LocalControlPlane {
    /// Makes a memory store; returns its id.
    pub fn create_memory_store(&self, name: &str, description: &str) -> Result<String, String> {
        let v = new_store(&mut self.db(), name, description, BTreeMap::new()).map_err(|e| e.2)?;
        self.save();
        Ok(v["id"].as_str().unwrap_or("").to_owned())
    }

    /// Puts a memory into a store, as the organisation (a seed for tests and the demo).
    pub fn put_memory(&self, store: &str, path: &str, content: &str) -> Result<(), String> {
        {
            let mut db = self.db();
            let s = store_mut(&mut db, store).map_err(|e| e.2)?;
            match s.memories.values().find(|m| m.path == path).map(|m| m.id.clone()) {
                Some(m) => update(&mut db, store, &m, Some(content.to_owned()), None, None, None).map_err(|e| e.2)?,
                None => create(&mut db, store, path, content, None).map(|_| ()).map_err(|e| e.2)?,
            }
        }
        self.save();
        Ok(())
    }

    /// A store's memories, path → content.
    pub fn memories(&self, store: &str) -> Option<BTreeMap<String, String>> {
        let db = self.db();
        let s = db.memory_stores.get(store)?;
        Some(s.memories.values().map(|m| (m.path.clone(), m.content.clone())).collect())
    }
}

fn new_store(db: &mut Db, name: &str, description: &str, metadata: BTreeMap<String, String>) -> ApiResult<Value> {
    if name.is_empty() || name.chars().count() > 255 || name.chars().any(char::is_control) {
        return Err(invalid(format!("name: 1 to 255 characters without control characters, got {name:?}")));
    }
    if description.chars().count() > 1024 {
        return Err(invalid("description: at most 1,024 characters"));
    }
    let id = db.next_id("memstore");
    let now = now_ms();
    let s = StoreRec {
        id: id.clone(),
        name: name.to_owned(),
        description: description.to_owned(),
        metadata,
        created_ms: now,
        updated_ms: now,
        archived_ms: None,
        memories: BTreeMap::new(),
        versions: Vec::new(),
    };
    let v = store_json(&s);
    db.memory_stores.insert(id, s);
    Ok(v)
}

fn create(db: &mut Db, store: &str, path: &str, content: &str, session: Option<String>) -> ApiResult<Value> {
    check_path(path)?;
    check_content(content)?;
    let mem_id = db.next_id("mem");
    let ver_id = db.next_id("memver");
    let s = store_mut(db, store)?;
    if s.archived_ms.is_some() {
        return Err(invalid(format!("memory store {store} is archived")));
    }
    if s.memories.values().any(|m| m.path == path) {
        return Err(conflict(format!("a memory already exists at {path}")));
    }
    if s.memories.len() >= MAX_MEMORIES {
        return Err(invalid(format!("memory store {store} holds {MAX_MEMORIES} memories, the most a store may")));
    }
    let now = now_ms();
    let m = MemRec {
        id: mem_id.clone(),
        path: path.to_owned(),
        sha: sha256_hex(content.as_bytes()),
        content: content.to_owned(),
        created_ms: now,
        updated_ms: now,
        version_id: ver_id.clone(),
    };
    s.versions.push(VersionRec {
        id: ver_id,
        memory_id: mem_id.clone(),
        operation: "created".into(),
        path: path.to_owned(),
        content: Some(content.to_owned()),
        created_ms: now,
        session_id: session,
    });
    let v = memory_json(store, &m, false);
    s.memories.insert(mem_id, m);
    Ok(v)
}

fn update(
    db: &mut Db,
    store: &str,
    mem: &str,
    content: Option<String>,
    path: Option<String>,
    expect_sha: Option<String>,
    session: Option<String>,
) -> ApiResult<()> {
    if let Some(p) = &path {
        check_path(p)?;
    }
    if let Some(c) = &content {
        check_content(c)?;
    }
    let ver_id = db.next_id("memver");
    let s = store_mut(db, store)?;
    if s.archived_ms.is_some() {
        return Err(invalid(format!("memory store {store} is archived")));
    }
    let taken = path.as_ref().is_some_and(|p| s.memories.values().any(|m| &m.path == p && m.id != mem));
    let m = s.memories.get_mut(mem).ok_or_else(|| not_found(format!("memory {mem} not found")))?;
    if let Some(want) = expect_sha {
        if m.sha != want {
            return Err(conflict(format!("content_sha256 precondition failed: the memory's is {}", m.sha)));
        }
    }
    if taken {
        return Err(conflict(format!("a memory already exists at {}", path.unwrap_or_default())));
    }
    let changed = content.as_ref().is_some_and(|c| *c != m.content) || path.as_ref().is_some_and(|p| *p != m.path);
    if !changed {
        return Ok(());
    }
    if let Some(c) = content {
        m.sha = sha256_hex(c.as_bytes());
        m.content = c;
    }
    if let Some(p) = path {
        m.path = p;
    }
    let now = now_ms();
    m.updated_ms = now;
    m.version_id = ver_id.clone();
    let rec = VersionRec {
        id: ver_id,
        memory_id: m.id.clone(),
        operation: "modified".into(),
        path: m.path.clone(),
        content: Some(m.content.clone()),
        created_ms: now,
        session_id: session,
    };
    s.versions.push(rec);
    Ok(())
}

pub(super) fn routes() -> Router<LocalControlPlane> {
    Router::new()
        .route("/v1/memory_stores", get(list_stores).post(create_store))
        .route("/v1/memory_stores/{store}", get(get_store).post(update_store).delete(delete_store))
        .route("/v1/memory_stores/{store}/archive", post(archive_store))
        .route("/v1/memory_stores/{store}/memories", get(list_memories).post(create_memory))
        .route("/v1/memory_stores/{store}/memories/{mem}", get(get_memory).post(update_memory).delete(delete_memory))
        .route("/v1/memory_stores/{store}/memory_versions", get(list_versions))
        .route("/v1/memory_stores/{store}/memory_versions/{ver}", get(get_version))
}

async fn create_store(
    State(cp): State<LocalControlPlane>,
    h: HeaderMap,
    Json(req): Json<CreateStore>,
) -> ApiResult<Json<Value>> {
    let v = {
        let mut db = cp.db();
        authorize(&db, &h, Need::Org)?;
        new_store(&mut db, &req.name, &req.description, req.metadata)?
    };
    cp.save();
    Ok(Json(v))
}

#[derive(Debug, Default, Deserialize)]
struct StoreListQuery {
    limit: Option<usize>,
    page: Option<String>,
    include_archived: Option<bool>,
}

async fn list_stores(
    State(cp): State<LocalControlPlane>,
    Query(q): Query<StoreListQuery>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let db = cp.db();
    authorize(&db, &h, Need::Org)?;
    let all: Vec<Value> = db
        .memory_stores
        .values()
        .filter(|s| q.include_archived.unwrap_or(false) || s.archived_ms.is_none())
        .map(store_json)
        .collect();
    page(&all, q.limit, q.page, 100)
}

async fn get_store(
    State(cp): State<LocalControlPlane>,
    Path(store): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let db = cp.db();
    authorize_store(&db, &h, &store)?;
    store_ref(&db, &store).map(|s| Json(store_json(s)))
}

#[derive(Debug, Deserialize)]
struct UpdateStore {
    name: Option<String>,
    description: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

async fn update_store(
    State(cp): State<LocalControlPlane>,
    Path(store): Path<String>,
    h: HeaderMap,
    Json(req): Json<UpdateStore>,
) -> ApiResult<Json<Value>> {
    let v = {
        let mut db = cp.db();
        authorize(&db, &h, Need::Org)?;
        let s = store_mut(&mut db, &store)?;
        if s.archived_ms.is_some() {
            return Err(invalid(format!("memory store {store} is archived")));
        }
        if let Some(n) = req.name {
            s.name = n;
        }
        if let Some(d) = req.description {
            s.description = d;
        }
        if let Some(m) = req.metadata {
            s.metadata = m;
        }
        s.updated_ms = now_ms();
        store_json(s)
    };
    cp.save();
    Ok(Json(v))
}

async fn delete_store(
    State(cp): State<LocalControlPlane>,
    Path(store): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    {
        let mut db = cp.db();
        authorize(&db, &h, Need::Org)?;
        db.memory_stores.remove(&store).ok_or_else(|| not_found(format!("memory store {store} not found")))?;
    }
    cp.save();
    Ok(Json(json!({"type": "memory_store_deleted", "id": store})))
}

async fn archive_store(
    State(cp): State<LocalControlPlane>,
    Path(store): Path<String>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let v = {
        let mut db = cp.db();
        authorize(&db, &h, Need::Org)?;
        let s = store_mut(&mut db, &store)?;
        let now = now_ms();
        s.archived_ms.get_or_insert(now);
        s.updated_ms = now;
        store_json(s)
    };
    cp.save();
    Ok(Json(v))
}

#[derive(Debug, Default, Deserialize)]
struct MemoryListQuery {
    limit: Option<usize>,
    page: Option<String>,
    view: Option<String>,
    path_prefix: Option<String>,
    depth: Option<usize>,
}

async fn list_memories(
    State(cp): State<LocalControlPlane>,
    Path(store): Path<String>,
    Query(q): Query<MemoryListQuery>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let db = cp.db();
    authorize_store(&db, &h, &store)?;
    let s = store_ref(&db, &store)?;
    let full = full_view(&q.view, false)?;
    let prefix = q.path_prefix.clone().unwrap_or_else(|| "/".into());
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(invalid(format!("path_prefix: must start and end with /, got {prefix:?}")));
    }
    let mut mems: Vec<&MemRec> = s.memories.values().filter(|m| m.path.starts_with(&prefix)).collect();
    mems.sort_by(|a, b| a.path.cmp(&b.path));
    let mut all: Vec<Value> = Vec::new();
    let mut prefixes = std::collections::BTreeSet::new();
    for m in mems {
        let rest = &m.path[prefix.len()..];
        match (q.depth.unwrap_or(0), rest.find('/')) {
            (1, Some(i)) => {
                let p = format!("{prefix}{}/", &rest[..i]);
                if prefixes.insert(p.clone()) {
                    all.push(json!({"type": "memory_prefix", "path": p}));
                }
            }
            _ => all.push(memory_json(&store, m, full)),
        }
    }
    page(&all, q.limit, q.page, if full { 20 } else { 100 })
}

#[derive(Debug, Deserialize)]
struct CreateMemory {
    path: String,
    content: Option<String>,
}

async fn create_memory(
    State(cp): State<LocalControlPlane>,
    Path(store): Path<String>,
    Query(q): Query<ViewQuery>,
    h: HeaderMap,
    Json(req): Json<CreateMemory>,
) -> ApiResult<Json<Value>> {
    let v = {
        let mut db = cp.db();
        let session = authorize_store(&db, &h, &store)?;
        let full = full_view(&q.view, false)?;
        let content = req.content.unwrap_or_default();
        let mut v = create(&mut db, &store, &req.path, &content, session)?;
        if full {
            v["content"] = Value::String(content);
        }
        v
    };
    cp.save();
    Ok(Json(v))
}

async fn get_memory(
    State(cp): State<LocalControlPlane>,
    Path((store, mem)): Path<(String, String)>,
    Query(q): Query<ViewQuery>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let db = cp.db();
    authorize_store(&db, &h, &store)?;
    let full = full_view(&q.view, true)?;
    let s = store_ref(&db, &store)?;
    let m = s.memories.get(&mem).ok_or_else(|| not_found(format!("memory {mem} not found")))?;
    Ok(Json(memory_json(&store, m, full)))
}

#[derive(Debug, Deserialize)]
struct Precondition {
    #[serde(rename = "type")]
    kind: String,
    content_sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UpdateMemory {
    content: Option<String>,
    path: Option<String>,
    precondition: Option<Precondition>,
}

async fn update_memory(
    State(cp): State<LocalControlPlane>,
    Path((store, mem)): Path<(String, String)>,
    Query(q): Query<ViewQuery>,
    h: HeaderMap,
    Json(req): Json<UpdateMemory>,
) -> ApiResult<Json<Value>> {
    let v = {
        let mut db = cp.db();
        let session = authorize_store(&db, &h, &store)?;
        let full = full_view(&q.view, false)?;
        let expect = match req.precondition {
            None => None,
            Some(Precondition { kind, content_sha256: Some(sha) }) if kind == "content_sha256" => Some(sha),
            Some(p) => return Err(invalid(format!("precondition: unsupported {:?} or no content_sha256", p.kind))),
        };
        update(&mut db, &store, &mem, req.content, req.path, expect, session)?;
        let s = &db.memory_stores[&store];
        memory_json(&store, &s.memories[&mem], full)
    };
    cp.save();
    Ok(Json(v))
}

#[derive(Debug, Default, Deserialize)]
struct DeleteQuery {
    expected_content_sha256: Option<String>,
}

async fn delete_memory(
    State(cp): State<LocalControlPlane>,
    Path((store, mem)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    {
        let mut db = cp.db();
        let session = authorize_store(&db, &h, &store)?;
        let ver_id = db.next_id("memver");
        let s = store_mut(&mut db, &store)?;
        let m = s.memories.get(&mem).ok_or_else(|| not_found(format!("memory {mem} not found")))?;
        if let Some(want) = q.expected_content_sha256 {
            if m.sha != want {
                return Err(conflict(format!("expected_content_sha256 does not match: the memory's is {}", m.sha)));
            }
        }
        let m = s.memories.remove(&mem).expect("present");
        s.versions.push(VersionRec {
            id: ver_id,
            memory_id: mem.clone(),
            operation: "deleted".into(),
            path: m.path,
            content: None,
            created_ms: now_ms(),
            session_id: session,
        });
    }
    cp.save();
    Ok(Json(json!({"type": "memory_deleted", "id": mem})))
}

#[derive(Debug, Default, Deserialize)]
struct VersionListQuery {
    limit: Option<usize>,
    page: Option<String>,
    view: Option<String>,
    memory_id: Option<String>,
    session_id: Option<String>,
    operation: Option<String>,
}

async fn list_versions(
    State(cp): State<LocalControlPlane>,
    Path(store): Path<String>,
    Query(q): Query<VersionListQuery>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let db = cp.db();
    authorize_store(&db, &h, &store)?;
    let full = full_view(&q.view, false)?;
    let s = store_ref(&db, &store)?;
    let all: Vec<Value> = s
        .versions
        .iter()
        .rev()
        .filter(|v| q.memory_id.as_ref().is_none_or(|m| *m == v.memory_id))
        .filter(|v| q.session_id.is_none() || q.session_id == v.session_id)
        .filter(|v| q.operation.as_deref().is_none_or(|o| o == v.operation))
        .map(|v| version_json(&store, v, full))
        .collect();
    page(&all, q.limit, q.page, if full { 20 } else { 100 })
}

async fn get_version(
    State(cp): State<LocalControlPlane>,
    Path((store, ver)): Path<(String, String)>,
    Query(q): Query<ViewQuery>,
    h: HeaderMap,
) -> ApiResult<Json<Value>> {
    let db = cp.db();
    authorize_store(&db, &h, &store)?;
    let full = full_view(&q.view, true)?;
    let s = store_ref(&db, &store)?;
    let v = s.versions.iter().find(|v| v.id == ver).ok_or_else(|| not_found(format!("version {ver} not found")))?;
    Ok(Json(version_json(&store, v, full)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_attachments_read_as_the_api_and_the_command_line_spell_them() {
        assert_eq!(slug("User Preferences (v2)"), "user-preferences-v2-");
        assert_eq!(slug("notes"), "notes");
        let a = Attached::parse("memstore_1:/mnt/memory/x:read_only").unwrap();
        assert_eq!(a.mount_path.as_deref(), Some("/mnt/memory/x"));
        assert!(a.read_only);
        let b = Attached::parse("memstore_2:read_only").unwrap();
        assert_eq!((b.mount_path, b.read_only), (None, true));
        assert!(Attached::parse(":x").is_err());
        assert!(check_path("/a/b.md").is_ok());
        for bad in ["a", "/a//b", "/a/../b", "/a/\u{7}", "/"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }
}
