//! `frontend`: a wasi:http component that talks to its pod siblings.
//!
//! - `/http`: outgoing wasi:http GET to `GREETER_URL` (default
//!   `http://localhost:8081/`, the `greeter` sibling, routed in-process by the host).
//! - `/tcp`: TCP to `ECHO_ADDR` (default `127.0.0.1:9000`, the `echo` sibling),
//!   sends `ping\n`, reads one line.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

wasi::http::proxy::export!(Frontend);

struct Frontend;

const DEFAULT_GREETER_URL: &str = "http://localhost:8081/";
const DEFAULT_ECHO_ADDR: &str = "127.0.0.1:9000";

impl wasi::exports::http::incoming_handler::Guest for Frontend {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let full = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let path = full.split('?').next().unwrap_or("/");
        let (status, body) = match path {
            "/http" => {
                let url = env_or("GREETER_URL", DEFAULT_GREETER_URL);
                match http_get(&url) {
                    Ok(b) => (200, format!("frontend got: {b}")),
                    Err(e) => (502, format!("frontend: GET {url} failed: {e}\n")),
                }
            }
            "/tcp" => {
                let addr = env_or("ECHO_ADDR", DEFAULT_ECHO_ADDR);
                match tcp_ping(&addr) {
                    Ok(line) => (200, format!("frontend got: {line}")),
                    Err(e) => (502, format!("frontend: tcp {addr} failed: {e}\n")),
                }
            }
            "/" => (200, "frontend: try /http or /tcp\n".to_string()),
            _ => (404, "not found\n".to_string()),
        };
        respond(out, status, body.as_bytes());
    }
}

fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => default.to_string(),
    }
}

/// Splits `scheme://authority/path?query` into its parts.
fn parse_url(url: &str) -> Result<(Scheme, String, String), String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", r)) => (Scheme::Http, r),
        Some(("https", r)) => (Scheme::Https, r),
        Some((s, _)) => return Err(format!("unsupported scheme {s:?}")),
        None => (Scheme::Http, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("no host in {url:?}"));
    }
    Ok((scheme, authority.to_string(), path.to_string()))
}

fn http_get(url: &str) -> Result<String, String> {
    let (scheme, authority, path) = parse_url(url)?;
    let req = OutgoingRequest::new(Fields::new());
    req.set_method(&Method::Get).map_err(|_| "bad method")?;
    req.set_scheme(Some(&scheme)).map_err(|_| "bad scheme")?;
    req.set_authority(Some(&authority))
        .map_err(|_| format!("bad authority {authority:?}"))?;
    req.set_path_with_query(Some(&path))
        .map_err(|_| format!("bad path {path:?}"))?;
    // No body is taken for a GET: the host then sends an empty body.
    let future = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;

    let resp = loop {
        match future.get() {
            Some(Ok(Ok(resp))) => break resp,
            Some(Ok(Err(e))) => return Err(format!("{e:?}")),
            Some(Err(())) => return Err("response already taken".to_string()),
            None => future.subscribe().block(),
        }
    };
    let status = resp.status();
    let body = resp.consume().map_err(|_| "response body unavailable")?;
    let mut bytes = Vec::new();
    {
        let mut stream = body.stream().map_err(|_| "response stream unavailable")?;
        stream
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading body: {e}"))?;
    }
    let _ = IncomingBody::finish(body);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if !(200..300).contains(&status) {
        return Err(format!("status {status}: {text}"));
    }
    Ok(text)
}

fn tcp_ping(addr: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    // Best effort: not every WASI implementation supports socket timeouts.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    stream
        .write_all(b"ping\n")
        .map_err(|e| format!("write: {e}"))?;
    stream.flush().map_err(|e| format!("flush: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    if line.is_empty() {
        return Err("connection closed before a line was received".to_string());
    }
    if !line.ends_with('\n') {
        line.push('\n');
    }
    Ok(line)
}

fn respond(out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"text/plain; charset=utf-8".to_vec()]);
    let _ = headers.set("content-length", &[body.len().to_string().into_bytes()]);
    let resp = OutgoingResponse::new(headers);
    let _ = resp.set_status_code(status);
    let Ok(out_body) = resp.body() else { return };
    ResponseOutparam::set(out, Ok(resp));
    if let Ok(mut stream) = out_body.write() {
        let _ = stream.write_all(body);
        let _ = stream.flush();
    }
    let _ = OutgoingBody::finish(out_body, None);
}
