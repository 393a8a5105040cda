//! `hostile`: a wasi:http component that does what a hostile tenant would try, one request
//! per attempt, and answers what happened (200 `ok: …` when the attempt worked, 502
//! `refused: …` when the host refused it). The sandbox hardening tests drive it.
//!
//! - `/connect?addr=HOST:PORT`: a TCP connect (wasi:sockets, names resolved by the host);
//! - `/http?url=URL`: an outgoing wasi:http GET, answering the response body;
//! - `/resolve?name=NAME`: `ip-name-lookup`, answering the addresses;
//! - `/sockets?n=N`: binds up to N TCP sockets on `127.0.0.1:0` at once (each holds an
//!   ephemeral port), answering how many it got and the first error;
//! - `/newlines?n=N`: prints N empty lines on stdout;
//! - `/trap`: traps (`unreachable`), so the host must answer 500 without the backtrace;
//! - `/spin?ms=N`: burns CPU for N ms.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

wasi::http::proxy::export!(Hostile);

struct Hostile;

impl wasi::exports::http::incoming_handler::Guest for Hostile {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let full = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let (path, query) = full.split_once('?').unwrap_or((&full, ""));
        let arg = |k: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        };
        let num = |k: &str| arg(k).parse::<u64>().unwrap_or(0);
        let result: Result<String, String> = match path {
            "/connect" => connect(&arg("addr")),
            "/http" => http_get(&arg("url")),
            "/resolve" => resolve(&arg("name")),
            "/sockets" => Ok(sockets(num("n") as usize)),
            "/newlines" => {
                let mut out = std::io::stdout().lock();
                for _ in 0..num("n") {
                    let _ = out.write_all(b"\n");
                }
                let _ = out.flush();
                Ok(format!("printed {} empty lines", num("n")))
            }
            "/trap" => trap(),
            "/spin" => {
                let end = Instant::now() + Duration::from_millis(num("ms"));
                let mut x: u64 = 0;
                while Instant::now() < end {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                Ok(format!("spun {x}"))
            }
            _ => Err("unknown attempt".to_string()),
        };
        match result {
            Ok(s) => respond(out, 200, format!("ok: {s}\n").as_bytes()),
            Err(e) => respond(out, 502, format!("refused: {e}\n").as_bytes()),
        }
    }
}

#[inline(never)]
fn trap() -> Result<String, String> {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    unreachable!()
}

fn connect(addr: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    // Read whatever the other side says first (a banner), if anything, briefly.
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    Ok(format!(
        "connected to {addr}: {}",
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
    ))
}

fn resolve(name: &str) -> Result<String, String> {
    let addrs: Vec<String> = (name, 0)
        .to_socket_addrs()
        .map_err(|e| format!("resolve {name}: {e}"))?
        .map(|a| a.ip().to_string())
        .collect();
    Ok(addrs.join(","))
}

fn sockets(n: usize) -> String {
    let mut held = Vec::new();
    let mut first_err = String::new();
    for _ in 0..n {
        match TcpListener::bind("127.0.0.1:0") {
            Ok(l) => held.push(l),
            Err(e) => {
                first_err = e.to_string();
                break;
            }
        }
    }
    format!("held {} sockets; first error: {first_err}", held.len())
}

fn http_get(url: &str) -> Result<String, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", r)) => (Scheme::Http, r),
        Some(("https", r)) => (Scheme::Https, r),
        _ => return Err(format!("bad url {url:?}")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let req = OutgoingRequest::new(Fields::new());
    req.set_method(&Method::Get).map_err(|_| "bad method")?;
    req.set_scheme(Some(&scheme)).map_err(|_| "bad scheme")?;
    req.set_authority(Some(authority))
        .map_err(|_| format!("bad authority {authority:?}"))?;
    req.set_path_with_query(Some(path))
        .map_err(|_| format!("bad path {path:?}"))?;
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
        let _ = stream.read_to_end(&mut bytes);
    }
    let _ = IncomingBody::finish(body);
    Ok(format!(
        "status {status}: {}",
        String::from_utf8_lossy(&bytes).trim_end()
    ))
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
