//! The HTTPS client of the wasmctl API server, used by the CLI and the node agent:
//! kubeconfig loading, JSON requests that turn error responses into `Status`, and watch
//! streams.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
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

/// A connection to one API server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    pub namespace: String,
}

pub const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

impl Client {
    pub fn new(kc: &Kubeconfig) -> Result<Client, ClientError> {
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
            base: kc.server.clone(),
            token: kc.token.clone(),
            namespace: kc.namespace.clone(),
        })
    }

    pub fn from_kubeconfig(explicit: Option<&Path>) -> Result<Client, ClientError> {
        Client::new(&Kubeconfig::load(explicit)?)
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: reqwest::Error) -> ClientError {
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        ClientError::Unreachable {
            server: self.base.clone(),
            detail,
        }
    }

    fn builder(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    async fn finish(&self, resp: reqwest::Response) -> Result<Value, ClientError> {
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
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
        let mut rb = self.builder(method, path);
        if let Some(b) = body {
            rb = rb
                .header(
                    reqwest::header::CONTENT_TYPE,
                    content_type.unwrap_or("application/json"),
                )
                .body(serde_json::to_vec(b).expect("JSON values serialise"));
        }
        rb = rb.header(
            reqwest::header::ACCEPT,
            accept.unwrap_or("application/json"),
        );
        let resp = rb.send().await.map_err(|e| self.unreachable(e))?;
        self.finish(resp).await
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
        let resp = self.get_stream(path, None).await?;
        if resp.content_length().is_some_and(|n| n > max_bytes) {
            return Err(ClientError::Decode(format!(
                "{path}: the body is larger than the {max_bytes}-byte limit"
            )));
        }
        let mut resp = resp;
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
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
        let resp = self
            .builder(Method::GET, path)
            .header(reqwest::header::ACCEPT, accept.unwrap_or("*/*"))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
            return Err(status_error(status, &bytes));
        }
        Ok(resp)
    }

    /// POST a raw body (module uploads) and decode the JSON answer.
    pub async fn post_bytes(
        &self,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<Value, ClientError> {
        let resp = self
            .builder(Method::POST, path)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp).await
    }

    /// Open a watch (`path` must already carry `watch=1` and any selectors) and stream its
    /// events as JSON values.
    pub async fn watch(
        &self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Value, ClientError>> + use<>, ClientError> {
        let resp = self
            .get_stream(path, Some(accept.unwrap_or("application/json")))
            .await?;
        let server = self.base.clone();
        let bytes = resp.bytes_stream();
        Ok(futures_util::stream::unfold(
            (bytes, Vec::<u8>::new(), server),
            |(mut bytes, mut buf, server)| async move {
                loop {
                    if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let item = serde_json::from_slice::<Value>(&line)
                            .map_err(|e| ClientError::Decode(format!("watch event: {e}")));
                        return Some((item, (bytes, buf, server)));
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            let err = ClientError::Unreachable {
                                server: server.clone(),
                                detail: format!("watch stream broke: {e}"),
                            };
                            return Some((Err(err), (bytes, Vec::new(), server)));
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
