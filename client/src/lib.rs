//! The HTTPS client of the wasmctl API servers, used by the CLI and the node agent:
//! kubeconfig loading, JSON requests that turn error responses into `Status`, watch streams,
//! and failover between the API servers of an HA control plane ([`Client`], [`may_retry`]).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasmctl_api::Status;

/// Where `wasmctl server` and `wasmctl up` keep state unless told otherwise.
pub fn default_data_dir() -> PathBuf {
    home().join(".wasmctl")
}

/// The kubeconfig used when neither `--kubeconfig` nor `KUBECONFIG` is given.
pub fn default_kubeconfig_path() -> PathBuf {
    default_data_dir().join("kubeconfig.yaml")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(String),
    #[error("cannot reach the API server at {server}: {detail}")]
    Unreachable { server: String, detail: String },
    #[error("{}", .0.message)]
    Status(Box<Status>),
    #[error("unexpected response from the API server: {0}")]
    Decode(String),
}

impl ClientError {
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Status(s) => Some(s.code),
            _ => None,
        }
    }
    pub fn reason(&self) -> Option<&str> {
        match self {
            ClientError::Status(s) => Some(&s.reason),
            _ => None,
        }
    }
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }
}

/// The parts of a kubeconfig that a client needs.
#[derive(Clone, Debug)]
pub struct Kubeconfig {
    pub path: PathBuf,
    pub server: String,
    pub ca_pem: Option<Vec<u8>>,
    pub insecure: bool,
    pub token: Option<String>,
    pub namespace: String,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    clusters: Vec<Named<RawCluster>>,
    #[serde(default)]
    users: Vec<Named<RawUser>>,
    #[serde(default)]
    contexts: Vec<Named<RawContext>>,
    #[serde(rename = "current-context", default)]
    current_context: String,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: Option<T>,
}

#[derive(Deserialize)]
struct RawCluster {
    server: String,
    #[serde(rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(rename = "certificate-authority")]
    ca_file: Option<PathBuf>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure: bool,
}

#[derive(Deserialize)]
struct RawUser {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawContext {
    cluster: String,
    user: Option<String>,
    namespace: Option<String>,
}

impl Kubeconfig {
    /// `explicit` (from `--kubeconfig`), else `KUBECONFIG` (first entry), else the default.
    pub fn locate(explicit: Option<&Path>) -> PathBuf {
        if let Some(p) = explicit {
            return p.to_path_buf();
        }
        if let Some(k) = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
            if let Some(first) = std::env::split_paths(&k).next() {
                return first;
            }
        }
        default_kubeconfig_path()
    }

    pub fn load(explicit: Option<&Path>) -> Result<Kubeconfig, ClientError> {
        let path = Self::locate(explicit);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ClientError::Config(format!(
                "cannot read kubeconfig {}: {e} (pass --kubeconfig FILE, set KUBECONFIG, or start a \
                 cluster with `wasmctl up`, which writes {})",
                path.display(),
                default_kubeconfig_path().display()
            ))
        })?;
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Kubeconfig, ClientError> {
        let bad = |m: String| ClientError::Config(format!("kubeconfig {}: {m}", path.display()));
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let ctx_name = if raw.current_context.is_empty() {
            raw.contexts
                .first()
                .map(|c| c.name.clone())
                .unwrap_or_default()
        } else {
            raw.current_context.clone()
        };
        let ctx = raw
            .contexts
            .iter()
            .find(|c| c.name == ctx_name)
            .and_then(|c| c.value.as_ref())
            .ok_or_else(|| bad(format!("context {ctx_name:?} not found")))?;
        let cluster = raw
            .clusters
            .iter()
            .find(|c| c.name == ctx.cluster)
            .and_then(|c| c.value.as_ref())
            .ok_or_else(|| bad(format!("cluster {:?} not found", ctx.cluster)))?;
        let user = ctx
            .user
            .as_ref()
            .and_then(|u| raw.users.iter().find(|x| &x.name == u))
            .and_then(|u| u.value.as_ref());
        let ca_pem = match (&cluster.ca_data, &cluster.ca_file) {
            (Some(d), _) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(d.trim())
                    .map_err(|e| bad(format!("certificate-authority-data: {e}")))?,
            ),
            (None, Some(f)) => {
                Some(std::fs::read(f).map_err(|e| bad(format!("{}: {e}", f.display())))?)
            }
            (None, None) => None,
        };
        let token = match user {
            Some(RawUser { token: Some(t), .. }) => Some(t.clone()),
            Some(RawUser {
                token_file: Some(f),
                ..
            }) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| bad(format!("{}: {e}", f.display())))?
                    .trim()
                    .to_string(),
            ),
            _ => None,
        };
        Ok(Kubeconfig {
            path: path.to_path_buf(),
            server: cluster.server.trim_end_matches('/').to_string(),
            ca_pem,
            insecure: cluster.insecure,
            token,
            namespace: ctx.namespace.clone().unwrap_or_else(|| "default".into()),
        })
    }
}

// ---------------------------------------------------------------- failover

/// At most this many API servers are known to a client: the kubeconfig's and learned ones.
pub const MAX_SERVERS: usize = 7;
/// Where the API servers are listed (kept by the servers; see `wasmctl server`).
pub const SERVERS_PATH: &str = "/api/v1/namespaces/default/endpoints/kubernetes";
/// The learned servers are refreshed after a request once they are this old...
const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// ...or after a failover, but never more often than this.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(2);
/// ... or this old while they name only one server.
const REFRESH_ALONE: Duration = Duration::from_secs(5);
/// The bound of one refresh.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
/// A cache file larger than this is ignored.
const MAX_CACHE_BYTES: u64 = 64 * 1024;

/// Why one attempt of a request on one server failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection was made (refused, unreachable, connect timeout, TLS handshake): the
    /// request provably never left.
    Connect,
    /// The connection broke once the request may have been sent (reset, closed before the
    /// answer, a body cut short): the server may have acted on it.
    AfterSend,
    /// The server answered 503 Service Unavailable (no quorum behind it, say).
    Unavailable,
}

/// Whether a request may go to the next server after `failure` on one: always when it never
/// left; otherwise reads (GET, including lists and watches) always, a create (POST) never (it
/// may have been carried out: a retry's `AlreadyExists` could be our own create), and
/// PUT/PATCH/DELETE only when `cas` (the body pins `metadata.resourceVersion`, or
/// `preconditions.resourceVersion` for a DELETE), so that a retry of a write that did happen
/// fails with a `Conflict` instead of being applied twice.
pub fn may_retry(method: &Method, cas: bool, failure: Failure) -> bool {
    if failure == Failure::Connect {
        return true;
    }
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS => true,
        Method::PUT | Method::PATCH | Method::DELETE => cas,
        _ => false,
    }
}

/// Whether `body` makes the write `method` a compare-and-swap (see [`may_retry`]).
pub fn is_cas(method: &Method, body: Option<&Value>) -> bool {
    let Some(b) = body else {
        return false;
    };
    let pinned = |v: &Value| v.as_str().is_some_and(|rv| !rv.is_empty());
    match *method {
        Method::PUT | Method::PATCH => pinned(&b["metadata"]["resourceVersion"]),
        Method::DELETE => pinned(&b["preconditions"]["resourceVersion"]),
        _ => false,
    }
}

/// The base URLs the Endpoints `default/kubernetes` list (`scheme://ip:port`, the port named
/// `https` of each subset, else its only one), in their order, without duplicates.
pub fn servers_from_endpoints(ep: &Value, scheme: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for ss in ep["subsets"].as_array().into_iter().flatten() {
        let ports = ss["ports"].as_array().cloned().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p["name"] == "https")
            .or(if ports.len() == 1 {
                ports.first()
            } else {
                None
            })
            .and_then(|p| p["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        let Some(port) = port else {
            continue;
        };
        for a in ss["addresses"].as_array().into_iter().flatten() {
            let Some(ip) = a["ip"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) else {
                continue;
            };
            let url = format!("{scheme}://{}", SocketAddr::new(ip, port));
            if !out.contains(&url) {
                out.push(url);
            }
        }
    }
    out
}

/// The servers to try, in order: `primary` (the kubeconfig's), `keep` (the one in use, if
/// any), then `learned`; no duplicates, at most [`MAX_SERVERS`].
fn compose(primary: &str, keep: Option<&str>, learned: &[String]) -> Vec<String> {
    let mut out = vec![primary.to_string()];
    for s in keep.into_iter().chain(learned.iter().map(String::as_str)) {
        if out.len() >= MAX_SERVERS {
            break;
        }
        if !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

fn scheme_of(url: &str) -> &str {
    url.split_once("://").map_or("https", |(s, _)| s)
}

/// What a client knows of the API servers; shared by its clones.
struct Servers {
    primary: String,
    /// The learned servers are kept here (beside the kubeconfig) for the next process.
    cache_path: Option<PathBuf>,
    state: Mutex<ServerState>,
    refreshing: AtomicBool,
}

struct ServerState {
    /// `primary` first; at most [`MAX_SERVERS`].
    list: Vec<String>,
    /// The server requests start at (the last that answered).
    current: usize,
    /// When the learned list was last answered for.
    refreshed: Option<Instant>,
    /// When a refresh was last tried.
    attempted: Option<Instant>,
    /// A failover happened since the last refresh.
    stale: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile {
    servers: Vec<String>,
    refreshed_unix_ms: u64,
}

/// FNV-1a: a stable name for a cache file.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(b"\n") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Servers {
    fn new(primary: String, cache_path: Option<PathBuf>) -> Servers {
        let mut st = ServerState {
            list: vec![primary.clone()],
            current: 0,
            refreshed: None,
            attempted: None,
            stale: false,
        };
        if let Some(c) = cache_path.as_deref().and_then(read_cache) {
            let scheme = format!("{}://", scheme_of(&primary));
            let learned: Vec<String> = c
                .servers
                .into_iter()
                .filter(|s| s.starts_with(&scheme) && s.len() < 256)
                .collect();
            st.list = compose(&primary, None, &learned);
            let age = unix_ms().checked_sub(c.refreshed_unix_ms);
            st.refreshed = age.and_then(|a| Instant::now().checked_sub(Duration::from_millis(a)));
        }
        Servers {
            primary,
            cache_path,
            state: Mutex::new(st),
            refreshing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The servers in the order to try them.
    fn order(&self) -> Vec<String> {
        let st = self.lock();
        let n = st.list.len();
        (0..n)
            .map(|k| st.list[(st.current + k) % n].clone())
            .collect()
    }

    fn current(&self) -> String {
        let st = self.lock();
        st.list[st.current].clone()
    }

    /// `base` answered; `failed_over`: after another server failed.
    fn answered(&self, base: &str, failed_over: bool) {
        let mut st = self.lock();
        if let Some(i) = st.list.iter().position(|s| s == base) {
            st.current = i;
        }
        st.stale |= failed_over;
    }

    /// `base` failed: requests start at the next server.
    fn failed(&self, base: &str) {
        let mut st = self.lock();
        if st.list[st.current] == base {
            st.current = (st.current + 1) % st.list.len();
        }
    }

    fn refresh_due(&self) -> bool {
        let st = self.lock();
        let now = Instant::now();
        let gap_ok = st
            .attempted
            .is_none_or(|t| now.duration_since(t) >= MIN_REFRESH_GAP);
        // While only one server is known (a cluster still forming, or a single server),
        // look more often: the others may have joined since.
        let every = if st.list.len() <= 1 {
            REFRESH_ALONE
        } else {
            REFRESH_EVERY
        };
        let old = st.refreshed.is_none_or(|t| now.duration_since(t) >= every);
        gap_ok && (old || st.stale)
    }

    /// A refresh was answered: `learned` (`None`: the servers are not listed there).
    fn learned(&self, learned: Option<Vec<String>>) {
        let mut st = self.lock();
        st.refreshed = Some(Instant::now());
        st.stale = false;
        let Some(learned) = learned.filter(|l| !l.is_empty()) else {
            return;
        };
        let current = st.list[st.current].clone();
        st.list = compose(&self.primary, Some(&current), &learned);
        st.current = st.list.iter().position(|s| *s == current).unwrap_or(0);
        drop(st);
        if let Some(path) = &self.cache_path {
            write_cache(path, &learned);
        }
    }
}

fn read_cache(path: &Path) -> Option<CacheFile> {
    let f = std::fs::File::open(path).ok()?;
    if f.metadata().ok()?.len() > MAX_CACHE_BYTES {
        return None;
    }
    let c: CacheFile = serde_json::from_reader(std::io::BufReader::new(f)).ok()?;
    Some(CacheFile {
        servers: c.servers.into_iter().take(MAX_SERVERS).collect(),
        refreshed_unix_ms: c.refreshed_unix_ms,
    })
}

/// Best effort: a directory that cannot be written only costs the next process its failover.
fn write_cache(path: &Path, servers: &[String]) {
    let c = CacheFile {
        servers: servers.iter().take(MAX_SERVERS).cloned().collect(),
        refreshed_unix_ms: unix_ms(),
    };
    let Ok(bytes) = serde_json::to_vec(&c) else {
        return;
    };
    let Some(dir) = path.parent() else {
        return;
    };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Where the servers learned for `kc` are cached: `cache/servers-HASH.json` beside the
/// kubeconfig (as kubectl keeps `~/.kube/cache` beside `~/.kube/config`), one file per server
/// URL and CA.
fn cache_path(kc: &Kubeconfig) -> PathBuf {
    let dir = kc
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let h = fnv1a(&[
        kc.server.as_bytes(),
        kc.ca_pem.as_deref().unwrap_or_default(),
    ]);
    dir.join("cache").join(format!("servers-{h:016x}.json"))
}

/// Resets [`Servers::refreshing`] however the refresh ends (its future may be dropped).
struct Refreshing<'a>(&'a AtomicBool);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One request, as each attempt sends it.
struct Req<'a> {
    method: Method,
    path: &'a str,
    body: Option<bytes::Bytes>,
    content_type: Option<&'a str>,
    accept: &'a str,
    cas: bool,
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut detail = e.to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        detail = format!("{detail}: {s}");
        src = s.source();
    }
    detail
}

// ---------------------------------------------------------------- the client

/// A connection to the API servers of one cluster: the kubeconfig's `server` first, then the
/// servers the Endpoints `default/kubernetes` list (learned after the first answer, refreshed
/// at most every 30 s and after a failover, cached beside the kubeconfig for the next
/// process). A request that cannot reach one server, or gets 503, goes to the next, by the
/// rules of [`may_retry`]; one pass over at most [`MAX_SERVERS`] servers per request. Every
/// server presents a certificate of the one cluster CA naming its own address, so one TLS
/// configuration serves them all. Clones share what is known of the servers.
///
/// A create (POST) goes to the next server only when it provably never left. A caller that
/// retries a create whose answer was lost (a connection reset after sending) may get
/// `AlreadyExists` for its own first attempt: it is returned as is, for the caller to decide
/// (read the object, compare). Only connecting has a deadline (5 s): a server that accepts
/// a connection and then hangs holds the request.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    servers: Arc<Servers>,
    token: Option<String>,
    pub namespace: String,
}

pub const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

impl Client {
    pub fn new(kc: &Kubeconfig) -> Result<Client, ClientError> {
        Self::build(kc, Some(cache_path(kc)))
    }

    fn build(kc: &Kubeconfig, cache: Option<PathBuf>) -> Result<Client, ClientError> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64);
        if let Some(ca) = &kc.ca_pem {
            let cert = reqwest::Certificate::from_pem(ca)
                .map_err(|e| ClientError::Config(format!("invalid CA certificate: {e}")))?;
            b = b.add_root_certificate(cert);
        }
        if kc.insecure {
            b = b.danger_accept_invalid_certs(true);
        }
        let http = b
            .build()
            .map_err(|e| ClientError::Config(format!("building the HTTP client: {e}")))?;
        Ok(Client {
            http,
            servers: Arc::new(Servers::new(kc.server.clone(), cache)),
            token: kc.token.clone(),
            namespace: kc.namespace.clone(),
        })
    }

    pub fn from_kubeconfig(explicit: Option<&Path>) -> Result<Client, ClientError> {
        Client::new(&Kubeconfig::load(explicit)?)
    }

    /// The server requests go to now (the last that answered).
    pub fn server(&self) -> String {
        self.servers.current()
    }

    /// Every server known, in the order the next request would try them.
    pub fn servers(&self) -> Vec<String> {
        self.servers.order()
    }

    fn unreachable(base: &str, e: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            server: base.to_string(),
            detail: error_chain(&e),
        }
    }

    fn builder(&self, base: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{base}{path}"));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    /// One attempt of `req` on `base`.
    async fn attempt(
        &self,
        base: &str,
        req: &Req<'_>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut rb = self
            .builder(base, req.method.clone(), req.path)
            .header(reqwest::header::ACCEPT, req.accept);
        if let Some(b) = &req.body {
            rb = rb
                .header(
                    reqwest::header::CONTENT_TYPE,
                    req.content_type.unwrap_or("application/json"),
                )
                .body(b.clone());
        }
        rb.send().await
    }

    /// Sends `req` to the servers in turn until one answers (anything but a 503 the rules let
    /// go elsewhere) or the rules stop it; returns the server that answered and its answer.
    async fn send(&self, req: &Req<'_>) -> Result<(String, reqwest::Response), ClientError> {
        let order = self.servers.order();
        let n = order.len();
        // (server, what went wrong) of the attempts that failed.
        let mut failed: Vec<(String, String)> = Vec::new();
        for (k, base) in order.iter().enumerate() {
            let last = k + 1 == n;
            let failure = match self.attempt(base, req).await {
                Ok(resp) => {
                    if resp.status() != StatusCode::SERVICE_UNAVAILABLE
                        || last
                        || !may_retry(&req.method, req.cas, Failure::Unavailable)
                    {
                        self.servers.answered(base, k > 0);
                        self.maybe_refresh(base).await;
                        return Ok((base.clone(), resp));
                    }
                    (Failure::Unavailable, "503 Service Unavailable".to_string())
                }
                Err(e) => {
                    let f = if e.is_connect() {
                        Failure::Connect
                    } else {
                        Failure::AfterSend
                    };
                    (f, error_chain(&e))
                }
            };
            self.servers.failed(base);
            let retry = !last && may_retry(&req.method, req.cas, failure.0);
            if retry {
                tracing::info!(server = %base, next = %order[k + 1], error = %failure.1,
                    "API server failed; trying the next one");
            }
            failed.push((base.clone(), failure.1));
            if !retry {
                break;
            }
        }
        let (server, mut detail) = failed.remove(0);
        if !failed.is_empty() {
            let others: Vec<String> = failed.iter().map(|(s, d)| format!("{s}: {d}")).collect();
            detail = format!("{detail} (also tried {})", others.join("; "));
        }
        Err(ClientError::Unreachable { server, detail })
    }

    /// Learns the servers from `base` (which has just answered) if it is time to.
    async fn maybe_refresh(&self, base: &str) {
        if !self.servers.refresh_due()
            || self
                .servers
                .refreshing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let _reset = Refreshing(&self.servers.refreshing);
        self.servers.lock().attempted = Some(Instant::now());
        let req = Req {
            method: Method::GET,
            path: SERVERS_PATH,
            body: None,
            content_type: None,
            accept: "application/json",
            cas: false,
        };
        let answer = tokio::time::timeout(REFRESH_TIMEOUT, async {
            let resp = self.attempt(base, &req).await.ok()?;
            let status = resp.status();
            let bytes = resp.bytes().await.ok()?;
            Some((status, bytes))
        })
        .await;
        match answer {
            Ok(Some((status, bytes))) if status.is_success() => {
                let ep: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let learned = servers_from_endpoints(&ep, scheme_of(base));
                self.servers.learned(Some(learned));
            }
            // Answered without the list (a server without it, a token that may not read it):
            // asked again in REFRESH_EVERY.
            Ok(Some((status, _))) if status != StatusCode::SERVICE_UNAVAILABLE => {
                self.servers.learned(None)
            }
            _ => {}
        }
    }

    async fn finish(base: &str, resp: reqwest::Response) -> Result<Value, ClientError> {
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| Self::unreachable(base, e))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()));
        }
        Err(status_error(status, &bytes))
    }

    /// Send a request; `content_type` defaults to JSON when a body is given.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        content_type: Option<&str>,
        accept: Option<&str>,
    ) -> Result<Value, ClientError> {
        let req = Req {
            cas: is_cas(&method, body),
            method,
            path,
            body: body.map(|b| serde_json::to_vec(b).expect("JSON values serialise").into()),
            content_type,
            accept: accept.unwrap_or("application/json"),
        };
        let (base, resp) = self.send(&req).await?;
        Self::finish(&base, resp).await
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, None, None, None).await
    }
    pub async fn get_table(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, None, None, Some(TABLE_ACCEPT))
            .await
    }
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request(Method::POST, path, Some(body), None, None)
            .await
    }
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request(Method::PUT, path, Some(body), None, None)
            .await
    }
    pub async fn merge_patch(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request(
            Method::PATCH,
            path,
            Some(body),
            Some("application/merge-patch+json"),
            None,
        )
        .await
    }
    pub async fn delete(&self, path: &str, opts: Option<&Value>) -> Result<Value, ClientError> {
        self.request(Method::DELETE, path, opts, None, None).await
    }

    /// GET a non-JSON body (module blobs), refusing bodies over `max_bytes`.
    pub async fn get_bytes(&self, path: &str, max_bytes: u64) -> Result<bytes::Bytes, ClientError> {
        let (base, resp) = self.stream(path, None).await?;
        if resp.content_length().is_some_and(|n| n > max_bytes) {
            return Err(ClientError::Decode(format!(
                "{path}: the body is larger than the {max_bytes}-byte limit"
            )));
        }
        let mut resp = resp;
        let mut buf = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Self::unreachable(&base, e))?
        {
            if (buf.len() + chunk.len()) as u64 > max_bytes {
                return Err(ClientError::Decode(format!(
                    "{path}: the body is larger than the {max_bytes}-byte limit"
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.into())
    }

    /// GET a streamed body (logs, `-f`); errors are decoded from `Status` objects.
    pub async fn get_stream(
        &self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        Ok(self.stream(path, accept).await?.1)
    }

    async fn stream(
        &self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<(String, reqwest::Response), ClientError> {
        let req = Req {
            method: Method::GET,
            path,
            body: None,
            content_type: None,
            accept: accept.unwrap_or("*/*"),
            cas: false,
        };
        let (base, resp) = self.send(&req).await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| Self::unreachable(&base, e))?;
            return Err(status_error(status, &bytes));
        }
        Ok((base, resp))
    }

    /// POST a raw body (module uploads) and decode the JSON answer.
    pub async fn post_bytes(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<Value, ClientError> {
        let req = Req {
            method: Method::POST,
            path,
            body: Some(body.into()),
            content_type: Some(content_type),
            accept: "application/json",
            cas: false,
        };
        let (base, resp) = self.send(&req).await?;
        Self::finish(&base, resp).await
    }

    /// Open a watch (`path` must already carry `watch=1` and any selectors) and stream its
    /// events as JSON values. Opening fails over like any GET; a stream that breaks ends with
    /// an `Unreachable` error and sends the next request to the next server (resume from the
    /// last `resourceVersion` seen).
    pub async fn watch(
        &self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Value, ClientError>> + use<>, ClientError> {
        let (server, resp) = self
            .stream(path, Some(accept.unwrap_or("application/json")))
            .await?;
        let servers = self.servers.clone();
        let bytes = resp.bytes_stream();
        Ok(futures_util::stream::unfold(
            (bytes, Vec::<u8>::new(), server, servers),
            |(mut bytes, mut buf, server, servers)| async move {
                loop {
                    if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let item = serde_json::from_slice::<Value>(&line)
                            .map_err(|e| ClientError::Decode(format!("watch event: {e}")));
                        return Some((item, (bytes, buf, server, servers)));
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            servers.failed(&server);
                            let err = ClientError::Unreachable {
                                server: server.clone(),
                                detail: format!("watch stream broke: {}", error_chain(&e)),
                            };
                            return Some((Err(err), (bytes, Vec::new(), server, servers)));
                        }
                        None => return None,
                    }
                }
            },
        )
        .boxed())
    }
}

fn status_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<Status>(bytes) {
        Ok(st) if st.kind == "Status" => ClientError::Status(Box::new(st)),
        _ => ClientError::Status(Box::new(Status::failure(
            status.as_u16(),
            status.canonical_reason().unwrap_or("Unknown"),
            format!(
                "the server responded {}: {}",
                status,
                String::from_utf8_lossy(bytes).trim()
            ),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    #[test]
    fn which_requests_go_to_the_next_server() {
        use Failure::*;
        let (get, post, put, patch, delete) = (
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        );
        // Never left: anything may go elsewhere.
        for m in [&get, &post, &put, &patch, &delete] {
            assert!(may_retry(m, false, Connect), "{m}");
        }
        // Reads (lists and watches are GETs) always.
        assert!(may_retry(&get, false, AfterSend));
        assert!(may_retry(&get, false, Unavailable));
        // A create that may have happened: never.
        assert!(!may_retry(&post, false, AfterSend));
        assert!(!may_retry(&post, false, Unavailable));
        assert!(!may_retry(&post, true, AfterSend));
        // Writes only as a compare-and-swap.
        for m in [&put, &patch, &delete] {
            assert!(!may_retry(m, false, AfterSend), "{m}");
            assert!(!may_retry(m, false, Unavailable), "{m}");
            assert!(may_retry(m, true, AfterSend), "{m}");
            assert!(may_retry(m, true, Unavailable), "{m}");
        }
    }

    #[test]
    fn a_write_is_a_cas_when_it_pins_the_resource_version() {
        let pinned = json!({"metadata": {"name": "x", "resourceVersion": "42"}});
        let unpinned = json!({"metadata": {"name": "x"}});
        let empty = json!({"metadata": {"resourceVersion": ""}});
        assert!(is_cas(&Method::PUT, Some(&pinned)));
        assert!(is_cas(&Method::PATCH, Some(&pinned)));
        assert!(!is_cas(&Method::PUT, Some(&unpinned)));
        assert!(!is_cas(&Method::PUT, Some(&empty)));
        assert!(!is_cas(&Method::PUT, None));
        // A JSON patch (an array) pins nothing.
        assert!(!is_cas(&Method::PATCH, Some(&json!([{"op": "add"}]))));
        assert!(is_cas(
            &Method::DELETE,
            Some(&json!({"preconditions": {"resourceVersion": "7"}}))
        ));
        assert!(!is_cas(
            &Method::DELETE,
            Some(&json!({"preconditions": {"uid": "u"}}))
        ));
        assert!(!is_cas(&Method::DELETE, Some(&pinned)));
        assert!(!is_cas(&Method::POST, Some(&pinned)));
    }

    #[test]
    fn the_servers_come_from_the_kubernetes_endpoints() {
        let ep = json!({"subsets": [
            {"addresses": [{"ip": "127.0.0.1"}, {"ip": "127.0.0.2"}],
             "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]},
            {"addresses": [{"ip": "::1"}, {"ip": "not-an-ip"}],
             "ports": [{"name": "other", "port": 1}, {"name": "https", "port": 7443}]},
            // No port named https among several: skipped.
            {"addresses": [{"ip": "10.0.0.1"}], "ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]},
            // A single unnamed port is the one.
            {"addresses": [{"ip": "10.0.0.2"}, {"ip": "127.0.0.1"}], "ports": [{"port": 8443}]},
            {"addresses": [{"ip": "10.0.0.3"}], "ports": [{"port": 0}]},
        ]});
        assert_eq!(
            servers_from_endpoints(&ep, "https"),
            [
                "https://127.0.0.1:6443",
                "https://127.0.0.2:6443",
                "https://[::1]:7443",
                "https://10.0.0.2:8443",
                "https://127.0.0.1:8443",
            ]
        );
        assert!(servers_from_endpoints(&json!({}), "https").is_empty());
    }

    #[test]
    fn at_most_seven_servers_the_kubeconfigs_first() {
        let learned: Vec<String> = (1..=20)
            .map(|i| format!("https://10.0.0.{i}:6443"))
            .collect();
        let l = compose("https://10.0.0.5:6443", None, &learned);
        assert_eq!(l.len(), MAX_SERVERS);
        assert_eq!(l[0], "https://10.0.0.5:6443");
        assert_eq!(l.iter().filter(|s| s.ends_with(".5:6443")).count(), 1);
        // The server in use stays, right after the kubeconfig's.
        let l = compose("https://p", Some("https://k"), &learned);
        assert_eq!(l[..2], ["https://p", "https://k"]);
        assert_eq!(l.len(), MAX_SERVERS);
    }

    #[test]
    fn the_learned_servers_are_cached_beside_the_kubeconfig() {
        let dir = std::env::temp_dir().join(format!(
            "wasmctl-client-cache-{}-{}",
            std::process::id(),
            unix_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = kubeconfig("https://127.0.0.1:6443", Some(&dir.join("kubeconfig.yaml")));
        let path = cache_path(&kc);
        assert!(path.starts_with(dir.join("cache")), "{}", path.display());
        let s = Servers::new(kc.server.clone(), Some(path.clone()));
        assert_eq!(s.order(), ["https://127.0.0.1:6443"]);
        assert!(s.refresh_due());
        s.learned(Some(vec![
            "https://127.0.0.1:6443".into(),
            "https://127.0.0.2:6443".into(),
        ]));
        assert!(!s.refresh_due());
        // The next process starts with them, and knows how old they are.
        let next = Servers::new(kc.server.clone(), Some(path.clone()));
        assert_eq!(
            next.order(),
            ["https://127.0.0.1:6443", "https://127.0.0.2:6443"]
        );
        assert!(!next.refresh_due());
        // Another cluster's CA at the same address has a cache of its own.
        let mut other = kc.clone();
        other.ca_pem = Some(b"another CA".to_vec());
        assert_ne!(cache_path(&other), path);
        // A failover asks again (after the minimum gap).
        next.answered("https://127.0.0.2:6443", true);
        assert!(next.refresh_due());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // ------------------------------------------------------------ fake servers

    #[derive(Clone, Copy, PartialEq)]
    enum Act {
        /// 200 with a JSON object (a watch: one event, then the connection breaks).
        Answer,
        /// 503 with a Status.
        Unavailable,
        /// Reads the request, then closes without answering.
        Drop,
    }

    struct Fake {
        url: String,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl Fake {
        /// The requests it got, but the refreshes of the server list.
        fn seen(&self) -> Vec<String> {
            let seen = self.seen.lock().unwrap();
            seen.iter()
                .filter(|r| !r.contains(SERVERS_PATH))
                .cloned()
                .collect()
        }
    }

    async fn fake(act: Act) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut r = BufReader::new(sock);
                    let mut first = String::new();
                    if r.read_line(&mut first).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let line = first
                        .split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ");
                    log.lock().unwrap().push(line.clone());
                    let mut sock = r.into_inner();
                    if line.contains(SERVERS_PATH) {
                        let _ = sock
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                            .await;
                        return;
                    }
                    match act {
                        Act::Drop => {}
                        Act::Unavailable => {
                            let b = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"no quorum","reason":"ServiceUnavailable","code":503}"#;
                            let _ = sock
                                .write_all(format!("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}", b.len()).as_bytes())
                                .await;
                        }
                        Act::Answer if line.contains("watch=1") => {
                            let ev = "{\"type\":\"ADDED\",\"object\":{}}\n";
                            let _ = sock
                                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{ev}\r\n", ev.len()).as_bytes())
                                .await;
                            let _ = sock.flush().await;
                            // Then the server dies mid-stream.
                        }
                        Act::Answer => {
                            let b = r#"{"kind":"Namespace","metadata":{"name":"x"}}"#;
                            let _ = sock
                                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}", b.len()).as_bytes())
                                .await;
                        }
                    }
                });
            }
        });
        Fake { url, seen }
    }

    /// A port nothing listens on.
    async fn dead() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        url
    }

    fn kubeconfig(server: &str, path: Option<&Path>) -> Kubeconfig {
        Kubeconfig {
            path: path.map(Path::to_path_buf).unwrap_or_default(),
            server: server.to_string(),
            ca_pem: None,
            insecure: false,
            token: Some("t".into()),
            namespace: "default".into(),
        }
    }

    /// A client of `servers` (the first is the kubeconfig's), no cache file.
    fn client(servers: &[&str]) -> Client {
        let c = Client::build(&kubeconfig(servers[0], None), None).unwrap();
        c.servers
            .learned(Some(servers[1..].iter().map(|s| s.to_string()).collect()));
        assert_eq!(c.servers(), servers);
        c
    }

    #[tokio::test]
    async fn a_dead_server_is_skipped_for_every_kind_of_request() {
        let primary = dead().await;
        let live = fake(Act::Answer).await;
        let c = client(&[&primary, &live.url]);
        c.get("/api/v1/namespaces/x").await.unwrap();
        assert_eq!(c.server(), live.url, "the server that answered is current");
        // Requests now start there; a create that never left may go elsewhere too.
        let c = client(&[&primary, &live.url]);
        c.post("/api/v1/namespaces", &json!({"metadata": {"name": "x"}}))
            .await
            .unwrap();
        c.delete("/api/v1/namespaces/x", None).await.unwrap();
        assert_eq!(
            live.seen(),
            [
                "GET /api/v1/namespaces/x",
                "POST /api/v1/namespaces",
                "DELETE /api/v1/namespaces/x"
            ]
        );
    }

    #[tokio::test]
    async fn a_503_sends_reads_and_cas_writes_on_but_not_creates() {
        let sick = fake(Act::Unavailable).await;
        let live = fake(Act::Answer).await;
        client(&[&sick.url, &live.url])
            .get("/api/v1/pods")
            .await
            .unwrap();
        let e = client(&[&sick.url, &live.url])
            .post("/api/v1/namespaces", &json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(503), "{e}");
        let e = client(&[&sick.url, &live.url])
            .merge_patch("/api/v1/nodes/n/status", &json!({"status": {}}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(503), "{e}");
        client(&[&sick.url, &live.url])
            .put(
                "/api/v1/namespaces/x",
                &json!({"metadata": {"resourceVersion": "5"}}),
            )
            .await
            .unwrap();
        assert_eq!(
            live.seen(),
            ["GET /api/v1/pods", "PUT /api/v1/namespaces/x"]
        );
        assert_eq!(sick.seen().len(), 4);
    }

    #[tokio::test]
    async fn a_connection_lost_after_sending_is_retried_only_when_safe() {
        let flaky = fake(Act::Drop).await;
        let live = fake(Act::Answer).await;
        client(&[&flaky.url, &live.url])
            .get("/api/v1/pods")
            .await
            .unwrap();
        let e = client(&[&flaky.url, &live.url])
            .post("/api/v1/namespaces", &json!({}))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains(&flaky.url), "{e}");
        let e = client(&[&flaky.url, &live.url])
            .delete("/api/v1/namespaces/x", None)
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
        client(&[&flaky.url, &live.url])
            .delete(
                "/api/v1/namespaces/x",
                Some(&json!({"preconditions": {"resourceVersion": "3"}})),
            )
            .await
            .unwrap();
        assert_eq!(
            live.seen(),
            ["GET /api/v1/pods", "DELETE /api/v1/namespaces/x"]
        );
    }

    #[tokio::test]
    async fn one_pass_then_the_first_error() {
        let (a, b) = (dead().await, dead().await);
        let c = client(&[&a, &b]);
        let e = c.get("/api/v1/pods").await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("cannot reach the API server at {a}: ")),
            "{msg}"
        );
        assert!(msg.contains(&format!("(also tried {b}: ")), "{msg}");
    }

    #[tokio::test]
    async fn a_broken_watch_sends_the_next_request_to_the_next_server() {
        let first = fake(Act::Answer).await;
        let second = fake(Act::Answer).await;
        let c = client(&[&first.url, &second.url]);
        let mut w = Box::pin(c.watch("/api/v1/pods?watch=1", None).await.unwrap());
        assert_eq!(w.next().await.unwrap().unwrap()["type"], "ADDED");
        let e = w.next().await.unwrap().unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
        assert_eq!(c.server(), second.url);
        let mut w = Box::pin(c.watch("/api/v1/pods?watch=1", None).await.unwrap());
        assert_eq!(w.next().await.unwrap().unwrap()["type"], "ADDED");
        assert_eq!(second.seen(), ["GET /api/v1/pods?watch=1"]);
    }
}
