//! The wasi:http plumbing the shop's components share: [`serve`] turns an incoming request
//! into a [`Request`], answers `GET /healthz` (the readiness probe) itself, and writes the
//! handler's [`Response`] with `content-length` and `x-served-by`; [`get`] / [`post_json`]
//! (or [`start`] + [`Pending::wait`] for several requests at once) call other services.
//!
//! Other services are addressed by their Service's short name (`http://catalog/...`): the
//! node agent routes a pod's outgoing wasi:http request for `NAME[.NS[.svc.cluster.local]]`
//! to one of the Service's ready pods. [`service_url`] lets an env var override the base URL
//! (e.g. to run a component alone under `wasmtime serve`).

use std::io::{Read as _, Write as _};

use serde::Serialize;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, FutureIncomingResponse, IncomingBody, IncomingRequest, OutgoingBody, OutgoingRequest,
    OutgoingResponse, RequestOptions, ResponseOutparam, Scheme,
};

pub use wasi::http::types::Method;

/// Largest request body a component reads.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Largest response body read from another service.
pub const MAX_REPLY_BODY: usize = 1024 * 1024;

/// Nanoseconds in a second.
const SECOND: u64 = 1_000_000_000;

/// The value of the `x-served-by` header: the pod's name (`$POD_NAME`, or `$HOSTNAME`, which
/// the agent sets to it), else the component's name.
pub fn served_by(component: &str) -> String {
    // The agent sets HOSTNAME to the pod name, as a kubelet does.
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| component.to_string())
}

/// The base URL of another service: `$ENV` if set (trailing `/` removed), else `default`
/// (e.g. `http://catalog`).
pub fn service_url(env: &str, default: &str) -> String {
    match std::env::var(env) {
        Ok(v) if !v.trim().is_empty() => v.trim().trim_end_matches('/').to_string(),
        _ => default.to_string(),
    }
}

/// An incoming request, split into what the handlers look at.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    inner: IncomingRequest,
}

impl Request {
    fn new(inner: IncomingRequest) -> Self {
        let target = inner.path_with_query().unwrap_or_else(|| "/".to_string());
        let (path, query) = shop_core::query::split_target(&target);
        Request {
            method: inner.method(),
            path: path.to_string(),
            query: query.to_string(),
            inner,
        }
    }

    /// A query parameter, percent-decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        shop_core::query::param(&self.query, name)
    }

    pub fn is_get(&self) -> bool {
        matches!(self.method, Method::Get)
    }

    pub fn is_post(&self) -> bool {
        matches!(self.method, Method::Post)
    }

    /// The body, at most [`MAX_REQUEST_BODY`] bytes; the error is the response to send.
    pub fn read_body(&self) -> Result<Vec<u8>, Response> {
        let body = self
            .inner
            .consume()
            .map_err(|_| Response::error(400, "request body unavailable"))?;
        let mut bytes = Vec::new();
        {
            let stream = body
                .stream()
                .map_err(|_| Response::error(400, "request body unavailable"))?;
            stream
                .take(MAX_REQUEST_BODY as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| Response::error(400, &format!("reading the request body: {e}")))?;
        }
        let _ = IncomingBody::finish(body);
        if bytes.len() > MAX_REQUEST_BODY {
            return Err(Response::error(
                413,
                &format!("request body larger than {MAX_REQUEST_BODY} bytes"),
            ));
        }
        Ok(bytes)
    }
}

/// A response to write.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn json(status: u16, value: &impl Serialize) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response::new(status, "application/json", body),
            Err(e) => Response::error(500, &format!("encoding JSON: {e}")),
        }
    }

    /// `{"error":"MESSAGE"}`.
    pub fn error(status: u16, message: &str) -> Self {
        Response::new(status, "application/json", shop_core::error_json(message))
    }

    pub fn html(status: u16, body: String) -> Self {
        Response::new(status, "text/html; charset=utf-8", body)
    }

    pub fn text(status: u16, body: &str) -> Self {
        Response::new(status, "text/plain; charset=utf-8", body)
    }

    pub fn not_found(path: &str) -> Self {
        Response::error(404, &format!("no route for {path}"))
    }

    /// 405 with `allow`.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut r = Response::error(405, &format!("method not allowed (allowed: {allow})"));
        r.headers.push(("allow", allow.to_string()));
        r
    }
}

/// Handles one incoming request: `GET /healthz` → 200 `ok`, anything else → `handler`.
/// Every response carries `x-served-by` ([`served_by`]).
pub fn serve(
    component: &str,
    request: IncomingRequest,
    out: ResponseOutparam,
    handler: impl FnOnce(&Request) -> Response,
) {
    let req = Request::new(request);
    let resp = if req.path == "/healthz" {
        if req.is_get() {
            Response::text(200, "ok\n")
        } else {
            Response::method_not_allowed("GET")
        }
    } else {
        handler(&req)
    };
    write_response(out, &served_by(component), resp);
}

fn write_response(out: ResponseOutparam, served_by: &str, resp: Response) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[resp.content_type.as_bytes().to_vec()]);
    let _ = headers.set(
        "content-length",
        &[resp.body.len().to_string().into_bytes()],
    );
    let _ = headers.set("x-served-by", &[served_by.as_bytes().to_vec()]);
    for (name, value) in &resp.headers {
        let _ = headers.append(name, value.as_bytes());
    }
    let outgoing = OutgoingResponse::new(headers);
    let _ = outgoing.set_status_code(resp.status);
    let Ok(body) = outgoing.body() else { return };
    ResponseOutparam::set(out, Ok(outgoing));
    if let Ok(mut stream) = body.write() {
        if stream.write_all(&resp.body).is_ok() {
            let _ = stream.blocking_flush();
        }
    }
    let _ = OutgoingBody::finish(body, None);
}

/// Another service's answer.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy), for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }

    /// The `error` of a `{"error":"..."}` body, else the body as text.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or_else(|| self.text())
    }
}

/// An outgoing request in flight.
pub struct Pending {
    what: String,
    future: FutureIncomingResponse,
}

/// `GET url`.
pub fn get(url: &str) -> Result<Reply, String> {
    start(Method::Get, url, None)?.wait()
}

/// `POST url` with a JSON body.
pub fn post_json(url: &str, body: &[u8]) -> Result<Reply, String> {
    start(Method::Post, url, Some(("application/json", body)))?.wait()
}

/// Sends a request (and its body, if any) and returns without waiting for the answer, so
/// several requests can be in flight at once. Errors are messages naming the request.
pub fn start(method: Method, url: &str, body: Option<(&str, &[u8])>) -> Result<Pending, String> {
    let what = format!("{} {url}", method_name(&method));
    let fail = |e: String| format!("{what}: {e}");
    let (scheme, authority, path) = split_url(url).map_err(fail)?;
    let headers = Fields::new();
    if let Some((content_type, _)) = body {
        let _ = headers.set("content-type", &[content_type.as_bytes().to_vec()]);
    }
    let req = OutgoingRequest::new(headers);
    req.set_method(&method)
        .map_err(|_| fail("bad method".into()))?;
    req.set_scheme(Some(&scheme))
        .map_err(|_| fail("bad scheme".into()))?;
    req.set_authority(Some(&authority))
        .map_err(|_| fail(format!("bad authority {authority:?}")))?;
    req.set_path_with_query(Some(&path))
        .map_err(|_| fail(format!("bad path {path:?}")))?;
    let out_body = match body {
        Some(_) => Some(
            req.body()
                .map_err(|_| fail("request body unavailable".into()))?,
        ),
        None => None,
    };
    // Best effort: a host that does not support a timeout refuses to set it.
    let options = RequestOptions::new();
    let _ = options.set_connect_timeout(Some(5 * SECOND));
    let _ = options.set_first_byte_timeout(Some(10 * SECOND));
    let future =
        outgoing_handler::handle(req, Some(options)).map_err(|e| fail(format!("{e:?}")))?;
    if let (Some(out_body), Some((_, bytes))) = (out_body, body) {
        {
            let mut stream = out_body
                .write()
                .map_err(|_| fail("request body stream unavailable".into()))?;
            stream
                .write_all(bytes)
                .map_err(|e| fail(format!("writing the request body: {e}")))?;
            stream
                .blocking_flush()
                .map_err(|e| fail(format!("writing the request body: {e:?}")))?;
        }
        OutgoingBody::finish(out_body, None)
            .map_err(|e| fail(format!("finishing the request body: {e:?}")))?;
    }
    Ok(Pending { what, future })
}

impl Pending {
    /// Waits for the answer and reads its body (at most [`MAX_REPLY_BODY`] bytes).
    pub fn wait(self) -> Result<Reply, String> {
        let what = &self.what;
        let resp = loop {
            match self.future.get() {
                Some(Ok(Ok(resp))) => break resp,
                Some(Ok(Err(e))) => return Err(format!("{what}: {e:?}")),
                Some(Err(())) => return Err(format!("{what}: response already taken")),
                None => self.future.subscribe().block(),
            }
        };
        let status = resp.status();
        let body = resp
            .consume()
            .map_err(|_| format!("{what}: response body unavailable"))?;
        let mut bytes = Vec::new();
        {
            let stream = body
                .stream()
                .map_err(|_| format!("{what}: response body unavailable"))?;
            stream
                .take(MAX_REPLY_BODY as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("{what}: reading the response body: {e}"))?;
        }
        let _ = IncomingBody::finish(body);
        if bytes.len() > MAX_REPLY_BODY {
            return Err(format!(
                "{what}: response body larger than {MAX_REPLY_BODY} bytes"
            ));
        }
        Ok(Reply {
            status,
            body: bytes,
        })
    }
}

fn method_name(m: &Method) -> &str {
    match m {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(s) => s,
    }
}

/// `http://authority/path?query` → its parts (no scheme means http).
fn split_url(url: &str) -> Result<(Scheme, String, String), String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", r)) => (Scheme::Http, r),
        Some(("https", r)) => (Scheme::Https, r),
        Some((s, _)) => return Err(format!("unsupported scheme {s:?}")),
        None => (Scheme::Http, url),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() {
        return Err("no host in the URL".to_string());
    }
    Ok((scheme, authority.to_string(), path))
}
