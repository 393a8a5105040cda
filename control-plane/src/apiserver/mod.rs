//! The HTTPS API server: TLS, bearer-token authentication, Kubernetes paths and verbs.
//!
//! Only this module knows HTTP. It decodes requests, calls [`Objects`], and encodes results
//! and errors as Kubernetes JSON (`Status` for every failure).

mod conn;
mod discovery;
mod internal;
mod scale;
mod watch;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmctl_api::meta::DeleteOptions;
use wasmctl_api::registry::{self, ResourceInfo};
use wasmctl_api::table::{self, IncludeObject};
use wasmctl_api::{FieldSelector, Selector};

use crate::error::ApiError;
use crate::modules::{self, ModuleError, ModuleRegistry, TagRef};
use crate::objects::{ListGate, ListOptions, Objects, Subresource};
use conn::{ConnTracker, Expiry, TrackedBody, TrackedIo, IDLE_CLOSE_GRACE};

pub use conn::ConnTimeouts;
pub use discovery::arch;

/// Largest request body accepted (kube-apiserver's limit is 3 MiB).
const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub type Body = BoxBody<Bytes, Infallible>;

/// Tunables of the API server.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Open connections at once; further connections wait in the accept queue.
    pub max_connections: usize,
    /// Concurrent watches; more get 429.
    pub max_watches: usize,
    /// Lists served at once (`--max-lists`); more wait a little, then get 429.
    pub max_lists: usize,
    /// Interval between bookmarks for watches that ask for them.
    pub bookmark_interval: Duration,
    /// Upper bound of a watch's lifetime when the client gives no `timeoutSeconds`.
    pub max_watch_duration: Duration,
    /// Per-connection deadlines: TLS handshake, request header, idle, write stall.
    pub timeouts: ConnTimeouts,
}

impl ApiConfig {
    pub fn new(listen: SocketAddr) -> Self {
        ApiConfig {
            listen,
            max_connections: 1024,
            max_watches: 2048,
            max_lists: 32,
            bookmark_interval: Duration::from_secs(60),
            max_watch_duration: Duration::from_secs(1800),
            timeouts: ConnTimeouts::default(),
        }
    }
}

pub struct ApiState {
    pub objects: Objects,
    /// `wasmctl push` storage.
    pub modules: Arc<ModuleRegistry>,
    /// Client for proxying `pods/{name}/log` to the node agents.
    pub agents: reqwest::Client,
    pub token: String,
    pub config: ApiConfig,
    pub watches: Arc<Semaphore>,
    /// Lists in progress, up to `max_lists`.
    pub lists: ListGate,
    pub shutdown: CancellationToken,
    pub server_address: String,
    /// The cluster CA (PEM), served at `/cacerts`.
    pub ca_pem: String,
    /// This server's part in an HA cluster (`None`: a single server that takes no peers).
    pub cluster: Option<crate::cluster::SharedCluster>,
}

/// Serve until `shutdown` fires, then stop accepting, end watches, and wait for in-flight
/// requests.
///
/// Every connection holds one of `max_connections` permits until it ends, so each ends on
/// its own once its client goes quiet (`conn.rs` has the deadlines and why): the handshake,
/// the first request's header and a header begun later are bounded, a connection with no
/// request in flight closes after the idle timeout, and one whose client stops accepting
/// our writes is dropped; HTTP/2 PINGs and TCP keepalive end connections whose peer
/// vanished.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ApiState>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let conns = Arc::new(Semaphore::new(
        state.config.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let timeouts = state.config.timeouts;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own HTTP/1 header timeout also runs while a kept-alive connection waits for
    // its next request (it would be the idle timeout too), and never while the protocol is
    // still being sniffed: the connection's deadlines are ours (`ConnTracker`).
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(conn::H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(conn::H2_KEEPALIVE_TIMEOUT);
    let tracker = TaskTracker::new();
    let shutdown = state.shutdown.clone();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = conns.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        if let Err(e) = conn::set_tcp_keepalive(&tcp) {
            tracing::debug!(%peer, error = %e, "cannot set TCP keepalive");
        }
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let activity = ConnTracker::new(timeouts);
            let io = TrackedIo::new(tcp, activity.clone());
            let handshake = acceptor.accept(io);
            let tls = match tokio::time::timeout(timeouts.tls_handshake, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            activity.handshake_done();
            let requests = activity.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let in_flight = requests.request_started(req.version() == http::Version::HTTP_2);
                async move {
                    let resp = handle(state, req).await;
                    Ok::<_, Infallible>(resp.map(|b| TrackedBody::new(b, in_flight)))
                }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                }
                why = activity.expired() => {
                    tracing::debug!(%peer, ?why, "closing the connection");
                    if why == Expiry::Idle {
                        // Nothing in flight: an HTTP/1 connection closes at once, HTTP/2
                        // sends GOAWAY. Half-read headers and stalled writes are dropped.
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await;
                    }
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A list's answer: `v` encoded off the async workers, sent in frames so that `permit` (its
/// [`ListGate`] slot) is held until all but the last frame has been taken by the connection.
async fn list_response(
    v: impl FnOnce() -> Value + Send + 'static,
    permit: OwnedSemaphorePermit,
) -> Result<Response<Body>, ApiError> {
    const FRAME: usize = 64 * 1024;
    let body = tokio::task::spawn_blocking(move || {
        let mut body = serde_json::to_vec(&v()).expect("JSON values serialise");
        body.push(b'\n');
        Bytes::from(body)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("encoding a list: {e}")))?;
    let frames = futures_util::stream::unfold((body, permit), |(mut rest, permit)| async move {
        if rest.is_empty() {
            return None;
        }
        let frame = rest.split_to(FRAME.min(rest.len()));
        Some((
            Ok::<_, Infallible>(http_body::Frame::data(frame)),
            (rest, permit),
        ))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(http_body_util::StreamBody::new(frames).boxed())
        .expect("valid response"))
}

pub fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(v).expect("JSON values serialise");
    body.push(b'\n');
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("valid response")
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let st = e.to_status();
    let code = StatusCode::from_u16(st.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(code, &serde_json::to_value(&st).expect("status serialises"));
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"wasmctl\""),
        );
    }
    // As kube-apiserver: a Status that says when to retry says it in `Retry-After` too.
    if let Some(secs) = st.details.as_ref().and_then(|d| d.retry_after_seconds) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// The bearer token of a request (`Authorization: Bearer T`), if it has one.
fn bearer_token(req: &Request<Incoming>) -> Option<&str> {
    let h = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    h.strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .map(str::trim)
}

fn authorized(state: &ApiState, req: &Request<Incoming>) -> bool {
    bearer_token(req).is_some_and(|t| crate::cluster::secret_matches(t, &state.token))
}

async fn handle(state: Arc<ApiState>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let start = std::time::Instant::now();
    let resp = match route_request(state, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_us = start.elapsed().as_micros() as u64, "request");
    resp
}

/// What a path names.
enum Route {
    Health,
    Version,
    Api,
    Apis,
    Group(String),
    Resources(String, String),
    /// `/wasm/v1/...`: the module registry.
    Modules(Vec<String>),
    Collection {
        info: &'static ResourceInfo,
        ns: Option<String>,
    },
    Item {
        info: &'static ResourceInfo,
        ns: Option<String>,
        name: String,
        sub: Option<String>,
    },
}

fn parse_route(path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["healthz" | "livez" | "readyz", ..] => Ok(Route::Health),
        ["version"] => Ok(Route::Version),
        ["api"] => Ok(Route::Api),
        ["api", v] => Ok(Route::Resources(String::new(), v.to_string())),
        ["api", v, rest @ ..] => resource_route("", v, rest),
        ["apis"] => Ok(Route::Apis),
        ["apis", g] => Ok(Route::Group(g.to_string())),
        ["apis", g, v] => Ok(Route::Resources(g.to_string(), v.to_string())),
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest),
        ["wasm", "v1", rest @ ..] => {
            Ok(Route::Modules(rest.iter().map(|s| s.to_string()).collect()))
        }
        _ => Err(ApiError::UnknownPath),
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Result<Route, ApiError> {
    let lookup =
        |plural: &str| registry::by_plural(group, version, plural).ok_or(ApiError::UnknownPath);
    if let ["namespaces", ns, plural, tail @ ..] = rest {
        if let Some(info) = registry::by_plural(group, version, plural).filter(|i| i.namespaced) {
            let ns = Some(ns.to_string());
            return match tail {
                [] => Ok(Route::Collection { info, ns }),
                [name] => Ok(Route::Item {
                    info,
                    ns,
                    name: name.to_string(),
                    sub: None,
                }),
                [name, sub] => Ok(Route::Item {
                    info,
                    ns,
                    name: name.to_string(),
                    sub: Some(sub.to_string()),
                }),
                _ => Err(ApiError::UnknownPath),
            };
        }
    }
    match rest {
        [plural] => Ok(Route::Collection {
            info: lookup(plural)?,
            ns: None,
        }),
        [plural, name] => {
            let info = lookup(plural)?;
            if info.namespaced {
                return Err(ApiError::UnknownPath);
            }
            Ok(Route::Item {
                info,
                ns: None,
                name: name.to_string(),
                sub: None,
            })
        }
        [plural, name, sub] => {
            let info = lookup(plural)?;
            if info.namespaced {
                return Err(ApiError::UnknownPath);
            }
            Ok(Route::Item {
                info,
                ns: None,
                name: name.to_string(),
                sub: Some(sub.to_string()),
            })
        }
        _ => Err(ApiError::UnknownPath),
    }
}

/// Query parameters of a request.
pub struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("1" | "true" | "True"))
    }
    pub fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        self.get(k)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::BadRequest(format!("{k}: invalid integer {v:?}")))
            })
            .transpose()
    }
}

fn list_options(q: &Query) -> Result<ListOptions, ApiError> {
    let labels = Selector::parse(q.get("labelSelector").unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("unable to parse requirement: {e}")))?;
    let fields =
        FieldSelector::parse(q.get("fieldSelector").unwrap_or("")).map_err(ApiError::BadRequest)?;
    let limit = q.int("limit")?.unwrap_or(0);
    if limit < 0 {
        return Err(ApiError::BadRequest(format!(
            "limit: must be >= 0, got {limit}"
        )));
    }
    Ok(ListOptions {
        labels,
        fields,
        limit: limit as usize,
        continue_token: q
            .get("continue")
            .filter(|c| !c.is_empty())
            .map(String::from),
        min_revision: resource_version(q)?.unwrap_or(0),
    })
}

/// The request's `resourceVersion`, if it names one ("" is none).
fn resource_version(q: &Query) -> Result<Option<u64>, ApiError> {
    q.get("resourceVersion")
        .filter(|v| !v.is_empty())
        .map(|rv| {
            rv.parse::<u64>()
                .map_err(|_| ApiError::BadRequest(format!("resourceVersion: invalid value {rv:?}")))
        })
        .transpose()
}

/// Does the client ask for a `Table` (`kubectl get`, `wasmctl get`)?
fn wants_table(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

fn include_object(q: &Query) -> IncludeObject {
    match q.get("includeObject") {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    }
}

async fn read_body(
    req: Request<Incoming>,
    within: Duration,
) -> Result<(Option<String>, Bytes), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let body = collect_body(req.into_body(), MAX_BODY_BYTES, within, "the request body").await?;
    Ok((ct, body))
}

/// The whole of `body`: at most `limit` bytes (else 413), arrived within `within` (else 504
/// `Timeout`: a trickling client holds its connection no longer than that).
async fn collect_body(
    body: Incoming,
    limit: usize,
    within: Duration,
    what: &str,
) -> Result<Bytes, ApiError> {
    let collected = tokio::time::timeout(within, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            ApiError::Timeout(format!(
                "{what} did not arrive within {}s",
                within.as_secs()
            ))
        })?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::TooLarge(format!("{what} exceeds {limit} bytes")))
        }
        Err(e) => Err(ApiError::BadRequest(format!("reading {what}: {e}"))),
    }
}

fn parse_json_body(ct: Option<&str>, body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest("the request body is empty".into()));
    }
    match ct {
        Some("application/yaml") => serde_yaml::from_slice::<Value>(body)
            .map_err(|e| ApiError::BadRequest(format!("the request body is not valid YAML: {e}"))),
        _ => serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}"))),
    }
}

async fn route_request(
    state: Arc<ApiState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if internal::is_internal(req.uri().path()) {
        return internal::route(state, req).await;
    }
    let route = parse_route(req.uri().path())?;
    if matches!(route, Route::Health) {
        // As kube-apiserver's readyz checks etcd: ready once the store has a leader (a
        // member of a cluster without quorum serves, but is not ready).
        if req.uri().path().trim_end_matches('/') == "/readyz"
            && state.objects.store().status().current_leader.is_none()
        {
            return Ok(Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(full("the cluster store has no leader"))
                .expect("valid response"));
        }
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(full("ok"))
            .expect("valid response"));
    }
    if matches!(route, Route::Version) {
        // Like kube-apiserver's system:public-info-viewer: the version is public.
        return Ok(json_response(StatusCode::OK, &discovery::version()));
    }
    if !authorized(&state, &req) {
        return Err(ApiError::Unauthorized);
    }
    let q = Query::parse(req.uri().query());
    let method = req.method().clone();
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match route {
        Route::Health => unreachable!("handled above"),
        Route::Version => ok(discovery::version()),
        Route::Api => ok(discovery::api_versions(&state.server_address)),
        Route::Apis => ok(discovery::api_group_list()),
        Route::Group(g) => discovery::api_group(&g).map_or(Err(ApiError::UnknownPath), ok),
        Route::Modules(rest) => modules_route(&state, req, &rest, &q).await,
        Route::Resources(g, v) => {
            discovery::resource_list(&g, &v).map_or(Err(ApiError::UnknownPath), ok)
        }
        Route::Collection { info, ns } => {
            let ns = ns.as_deref();
            match method {
                Method::GET if q.flag("watch") => {
                    watch::watch(state, info, ns, &q, wants_table(&req)).await
                }
                Method::GET => {
                    let opts = list_options(&q)?;
                    let as_table = wants_table(&req);
                    let include = include_object(&q);
                    // A list from a revision ahead of the store waits for it (up to 3 s)
                    // before it takes a list slot, so such lists cannot starve the others.
                    if opts.min_revision > 0 && opts.continue_token.is_none() {
                        state.objects.wait_for_revision(opts.min_revision).await?;
                    }
                    let permit = state.lists.enter().await?;
                    let page = state.objects.list(info, ns, &opts).await?;
                    list_response(
                        move || {
                            if as_table {
                                return table::table(
                                    info,
                                    &page.items,
                                    &page.resource_version.to_string(),
                                    page.continue_token.as_deref(),
                                    include,
                                    chrono::Utc::now(),
                                );
                            }
                            let mut meta =
                                json!({"resourceVersion": page.resource_version.to_string()});
                            if let Some(c) = page.continue_token {
                                meta["continue"] = json!(c);
                            }
                            json!({
                                "kind": format!("{}List", info.kind),
                                "apiVersion": info.api_version(),
                                "metadata": meta,
                                "items": page.items,
                            })
                        },
                        permit,
                    )
                    .await
                }
                Method::POST => {
                    let dry_run = q.get("dryRun").is_some();
                    if dry_run {
                        return Err(ApiError::BadRequest("dryRun is not supported".into()));
                    }
                    let (ct, body) = read_body(req, state.config.timeouts.request_body).await?;
                    let v = parse_json_body(ct.as_deref(), &body)?;
                    let created = state.objects.create(info, ns, v).await?;
                    Ok(json_response(StatusCode::CREATED, &created))
                }
                Method::DELETE => {
                    let opts = list_options(&q)?;
                    let (_, body) = read_body(req, state.config.timeouts.request_body).await?;
                    let dopts = delete_options(&q, &body)?;
                    let _permit = state.lists.enter().await?;
                    let page = state.objects.list(info, ns, &opts).await?;
                    let mut deleted = Vec::new();
                    for item in page.items {
                        let name = item["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        let item_ns = item["metadata"]["namespace"].as_str().map(String::from);
                        match state
                            .objects
                            .delete(info, item_ns.as_deref(), &name, &dopts)
                            .await
                        {
                            Ok(v) => deleted.push(v),
                            Err(ApiError::NotFound { .. }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    ok(json!({
                        "kind": format!("{}List", info.kind),
                        "apiVersion": info.api_version(),
                        "metadata": {"resourceVersion": state.objects.store().revision().to_string()},
                        "items": deleted,
                    }))
                }
                _ => Err(ApiError::MethodNotAllowed),
            }
        }
        Route::Item {
            info,
            ns,
            name,
            sub,
        } => {
            let ns = ns.as_deref();
            if sub.as_deref() == Some("binding") && info.kind == "Pod" {
                if method != Method::POST {
                    return Err(ApiError::MethodNotAllowed);
                }
                let (ct, body) = read_body(req, state.config.timeouts.request_body).await?;
                let binding = parse_json_body(ct.as_deref(), &body)?;
                let pod = bind_pod(&state, ns.unwrap_or("default"), &name, &binding).await?;
                tracing::debug!(pod = %name, node = %pod["spec"]["nodeName"], "bound");
                return Ok(json_response(
                    StatusCode::CREATED,
                    &serde_json::to_value(wasmctl_api::Status::success())
                        .map_err(|e| ApiError::Internal(e.to_string()))?,
                ));
            }
            if sub.as_deref() == Some("log") && info.kind == "Pod" {
                if method != Method::GET {
                    return Err(ApiError::MethodNotAllowed);
                }
                return pod_logs(&state, info, ns.unwrap_or("default"), &name, &q).await;
            }
            if sub.as_deref() == Some("scale") && scale::has_scale(info) {
                return match method {
                    Method::GET => ok(scale::to_scale(&state.objects.get(info, ns, &name).await?)),
                    Method::PUT | Method::PATCH => {
                        let is_patch = method == Method::PATCH;
                        let (ct, body) = read_body(req, state.config.timeouts.request_body).await?;
                        let v = parse_json_body(
                            if is_patch {
                                Some("application/json")
                            } else {
                                ct.as_deref()
                            },
                            &body,
                        )?;
                        ok(scale::update(&state.objects, info, ns, &name, &v, is_patch).await?)
                    }
                    _ => Err(ApiError::MethodNotAllowed),
                };
            }
            let sub = match sub.as_deref() {
                None => Subresource::Main,
                Some("status") if info.status_subresource => Subresource::Status,
                Some(_) => return Err(ApiError::UnknownPath),
            };
            match method {
                Method::GET => {
                    let obj = state.objects.get(info, ns, &name).await?;
                    if wants_table(&req) {
                        let rv = obj["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or("")
                            .to_string();
                        return ok(table::table(
                            info,
                            &[obj],
                            &rv,
                            None,
                            include_object(&q),
                            chrono::Utc::now(),
                        ));
                    }
                    ok(obj)
                }
                Method::PUT => {
                    let (ct, body) = read_body(req, state.config.timeouts.request_body).await?;
                    let v = parse_json_body(ct.as_deref(), &body)?;
                    ok(state.objects.update(info, ns, &name, v, sub).await?)
                }
                Method::PATCH => {
                    let (ct, body) = read_body(req, state.config.timeouts.request_body).await?;
                    let patch = parse_json_body(Some("application/json"), &body)?;
                    match ct.as_deref() {
                        Some(
                            "application/merge-patch+json"
                            | "application/strategic-merge-patch+json",
                        ) => ok(state.objects.patch(info, ns, &name, patch, sub).await?),
                        Some("application/json-patch+json") => ok(state
                            .objects
                            .json_patch(info, ns, &name, patch, sub)
                            .await?),
                        other => Err(ApiError::UnsupportedMediaType(format!(
                            "the body of the request was in an unknown format ({}); accepted: \
                             application/merge-patch+json, application/strategic-merge-patch+json \
                             (applied as a merge patch), application/json-patch+json",
                            other.unwrap_or("none")
                        ))),
                    }
                }
                Method::DELETE => {
                    if sub != Subresource::Main {
                        return Err(ApiError::MethodNotAllowed);
                    }
                    let (_, body) = read_body(req, state.config.timeouts.request_body).await?;
                    let opts = delete_options(&q, &body)?;
                    ok(state.objects.delete(info, ns, &name, &opts).await?)
                }
                _ => Err(ApiError::MethodNotAllowed),
            }
        }
    }
}

impl From<ModuleError> for ApiError {
    fn from(e: ModuleError) -> Self {
        match e {
            ModuleError::InvalidRef(..) | ModuleError::Invalid(_) => {
                ApiError::BadRequest(e.to_string())
            }
            ModuleError::NotFound(name) => ApiError::NotFound {
                resource: "modules.wasmctl.dev".into(),
                kind: "modules".into(),
                group: "wasmctl.dev".into(),
                name,
            },
            ModuleError::TooLarge => ApiError::TooLarge(e.to_string()),
            ModuleError::Store(e) => e.into(),
            ModuleError::Corrupt { .. } => ApiError::Internal(e.to_string()),
            ModuleError::Io(e) => ApiError::Internal(format!("module storage: {e}")),
        }
    }
}

/// `POST /wasm/v1/push?ref=NAME:TAG` (body: the module), `GET /wasm/v1/resolve?ref=NAME:TAG`,
/// `GET /wasm/v1/blobs/sha256:HEX`. The registry keeps modules in the cluster store
/// (`modules.rs`): a push is answered once a majority has it; any server serves a pull.
async fn modules_route(
    state: &ApiState,
    req: Request<Incoming>,
    rest: &[String],
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let parts: Vec<&str> = rest.iter().map(String::as_str).collect();
    let tag_ref = || -> Result<TagRef, ApiError> {
        let r = q.get("ref").ok_or_else(|| {
            ApiError::BadRequest("the ref query parameter (NAME:TAG) is required".into())
        })?;
        Ok(TagRef::parse(r)?)
    };
    match (req.method().clone(), parts.as_slice()) {
        (Method::POST, ["push"]) => {
            let r = tag_ref()?;
            // A module may be large: the body gets ten times the usual time.
            let within = state.config.timeouts.request_body * 10;
            let mut upload = state.modules.upload().await?;
            spool_module(req.into_body(), &mut upload, within).await?;
            let (digest, size) = state.modules.push(&r, upload).await?;
            tracing::info!(module = %r, %digest, size, "module pushed");
            Ok(json_response(
                StatusCode::CREATED,
                &json!({ "ref": r.to_string(), "digest": digest, "size": size }),
            ))
        }
        (Method::GET, ["resolve"]) => {
            let r = tag_ref()?;
            let (digest, size) = state.modules.resolve(&r).await?;
            Ok(json_response(
                StatusCode::OK,
                &json!({ "ref": r.to_string(), "digest": digest, "size": size }),
            ))
        }
        (Method::GET, ["blobs", digest]) => {
            let hex = modules::parse_digest(digest)?;
            let blob = state.modules.open_blob(&hex).await?;
            // Streamed from the cache file; a read error ends the body short of its
            // Content-Length, which the client sees as a failed transfer.
            let frames = futures_util::stream::unfold(Some(blob.file), |file| async move {
                use tokio::io::AsyncReadExt;
                let mut file = file?;
                let mut buf = bytes::BytesMut::with_capacity(modules::PULL_FRAME_BYTES);
                match file.read_buf(&mut buf).await {
                    Ok(0) => None,
                    Ok(_) => Some((
                        Ok::<_, Infallible>(http_body::Frame::data(buf.freeze())),
                        Some(file),
                    )),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading a cached module");
                        None
                    }
                }
            });
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/wasm")
                .header(header::CONTENT_LENGTH, blob.size)
                .header("docker-content-digest", *digest)
                .body(http_body_util::StreamBody::new(frames).boxed())
                .expect("valid response"))
        }
        (_, ["push"] | ["resolve"] | ["blobs", _]) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::UnknownPath),
    }
}

/// Spools a push's body into `upload` as it arrives: at most [`modules::MAX_MODULE_BYTES`]
/// (else 413), all of it within `within` (else 504), refused at its first bytes if it is not
/// WebAssembly.
async fn spool_module(
    body: Incoming,
    upload: &mut modules::Upload,
    within: Duration,
) -> Result<(), ApiError> {
    let spool = async {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ApiError::BadRequest(format!("reading the module: {e}")))?;
            if let Ok(data) = frame.into_data() {
                upload.write(&data).await?;
            }
        }
        Ok(())
    };
    tokio::time::timeout(within, spool).await.map_err(|_| {
        ApiError::Timeout(format!(
            "the module did not arrive within {}s",
            within.as_secs()
        ))
    })?
}

/// `POST .../pods/{name}/binding` (a `v1/Binding`): sets `spec.nodeName` only if the pod is
/// still unbound — the scheduler's compare-and-set; 409 Conflict otherwise.
async fn bind_pod(
    state: &ApiState,
    ns: &str,
    name: &str,
    binding: &Value,
) -> Result<Value, ApiError> {
    let invalid = |field: &str, reason: &str| {
        ApiError::BadRequest(format!("Binding {name:?} is invalid: {field}: {reason}"))
    };
    if binding["kind"].as_str().is_some_and(|k| k != "Binding") {
        return Err(invalid("kind", "must be Binding"));
    }
    if let Some(n) = binding["metadata"]["name"].as_str() {
        if n != name {
            return Err(invalid("metadata.name", "must match the pod's name"));
        }
    }
    let target = &binding["target"];
    if target["kind"].as_str().is_some_and(|k| k != "Node") {
        return Err(invalid("target.kind", "must be Node"));
    }
    let node = target["name"].as_str().unwrap_or_default().to_string();
    if node.is_empty() {
        return Err(invalid("target.name", "Required value"));
    }
    crate::scheduling::bind(&state.objects, ns, name, &node).await
}

/// `GET .../pods/{name}/log`: proxied to the agent of the pod's node, streamed back.
async fn pod_logs(
    state: &ApiState,
    info: &'static ResourceInfo,
    ns: &str,
    name: &str,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let pod = state.objects.get(info, Some(ns), name).await?;
    let containers: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let container = match q.get("container") {
        Some(c) if containers.iter().any(|x| x == c) => c.to_string(),
        Some(c) => {
            return Err(ApiError::BadRequest(format!(
                "container {c} is not valid for pod {name}"
            )))
        }
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(ApiError::BadRequest(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            )))
        }
    };
    let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    if node.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let nodes = registry::by_kind("v1", "Node").ok_or(ApiError::UnknownPath)?;
    let node_obj = state.objects.get(nodes, None, node).await?;
    let ip = node_obj["status"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
        .and_then(|x| x["address"].as_str())
        .unwrap_or_default()
        .to_string();
    let port = node_obj["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap_or(10250);
    if ip.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "node {node} reports no InternalIP"
        )));
    }
    let forwarded = {
        let mut fwd = url::form_urlencoded::Serializer::new(String::new());
        for k in ["follow", "tailLines", "timestamps", "limitBytes"] {
            if let Some(v) = q.get(k) {
                fwd.append_pair(k, v);
            }
        }
        fwd.finish()
    };
    let url = format!("http://{ip}:{port}/containerLogs/{ns}/{name}/{container}?{forwarded}");
    let resp = state
        .agents
        .get(&url)
        .bearer_auth(&state.token)
        .send()
        .await
        .map_err(|e| ApiError::Unavailable(format!("Get {url:?}: {e}")))?;
    if !resp.status().is_success() {
        let code = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(match code.as_u16() {
            404 | 400 => ApiError::BadRequest(text.trim().to_string()),
            _ => ApiError::Internal(format!("node {node}: {code}: {}", text.trim())),
        });
    }
    use futures_util::StreamExt;
    let stream = resp
        .bytes_stream()
        .take_while(|r| std::future::ready(r.is_ok()))
        .filter_map(|r| std::future::ready(r.ok()))
        .map(|b| Ok::<_, Infallible>(hyper::body::Frame::data(b)));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
        .expect("valid response"))
}

fn delete_options(q: &Query, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let mut opts: DeleteOptions = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteOptions::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid DeleteOptions: {e}")))?
    };
    if let Some(g) = q.int("gracePeriodSeconds")? {
        opts.grace_period_seconds = Some(g);
    }
    if let Some(p) = q.get("propagationPolicy") {
        opts.propagation_policy = Some(p.to_string());
    }
    if !opts.dry_run.is_empty() || q.get("dryRun").is_some() {
        return Err(ApiError::BadRequest("dryRun is not supported".into()));
    }
    Ok(opts)
}
