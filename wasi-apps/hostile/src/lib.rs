//! `hostile`: a wasi:http component that does what a hostile tenant would try, one request
//! per attempt, and answers what happened (200 `ok: …` when the attempt worked, 502
//! `refused: …` when the host refused it). The sandbox hardening tests drive it.
//!
//! - `/connect?addr=HOST:PORT`: a TCP connect (wasi:sockets, names resolved by the host);
//! - `/http?url=URL`: an outgoing wasi:http GET, answering the response body;
//! - `/resolve?name=NAME`: `ip-name-lookup`, answering the addresses;
//! - `/sockets?n=N&hold_ms=M`: binds up to N TCP sockets on `127.0.0.1:0` at once (each
//!   holds an ephemeral port), keeps them M ms (printing `holding K sockets` first), answering how many it got and the
//!   first error;
//! - `/newlines?n=N`: prints N empty lines on stdout;
//! - `/trap`: traps (`unreachable`), so the host must answer 500 without the backtrace;
//! - `/spin?ms=N`: burns CPU for N ms; with `&trace=1` it answers when it actually ran:
//!   `START-END` pairs of wall-clock nanoseconds, split wherever the guest was paused for more
//!   than 1 ms (so a test can count how many guests ran at once);
//! - `/fill?path=P&bytes=N`: writes N bytes (not zeros) to the file P (an emptyDir mount);
//! - `/files?dir=D&n=N`: creates N empty files in the directory D;
//! - `/fields?n=N&size=S&hold_ms=M`: creates up to N wasi:http `fields`, each with one S-byte
//!   header value (host memory, not the guest's), holds them all for M ms, and answers how
//!   many it got and the first error;
//! - `/hold?ms=N`: answers after N ms (keeps its instance alive meanwhile).

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
            "/sockets" => Ok(sockets(num("n") as usize, num("hold_ms"))),
            "/newlines" => {
                let mut out = std::io::stdout().lock();
                for _ in 0..num("n") {
                    let _ = out.write_all(b"\n");
                }
                let _ = out.flush();
                Ok(format!("printed {} empty lines", num("n")))
            }
            "/trap" => trap(),
            "/fields" => Ok(fields(
                num("n") as usize,
                num("size") as usize,
                num("hold_ms"),
            )),
            "/hold" => {
                std::thread::sleep(Duration::from_millis(num("ms")));
                Ok(format!("held {} ms", num("ms")))
            }
            "/fill" => fill(&arg("path"), num("bytes")),
            "/files" => files(&arg("dir"), num("n")),
            "/spin" if arg("trace") == "1" => Ok(spin_traced(num("ms"))),
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

fn fill(path: &str, bytes: u64) -> Result<String, String> {
    let mut f = std::fs::File::create(path).map_err(|e| format!("create {path}: {e}"))?;
    let chunk = [0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .map_err(|e| format!("write {path} after {} bytes: {e}", bytes - left))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| format!("sync {path}: {e}"))?;
    Ok(format!("wrote {bytes} bytes to {path}"))
}

fn files(dir: &str, n: u64) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    for i in 0..n {
        std::fs::File::create(format!("{dir}/f{i}"))
            .map_err(|e| format!("create file {i} in {dir}: {e}"))?;
    }
    Ok(format!("created {n} files in {dir}"))
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

fn sockets(n: usize, hold_ms: u64) -> String {
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
    if hold_ms > 0 {
        println!("holding {} sockets", held.len());
        std::thread::sleep(Duration::from_millis(hold_ms));
    }
    format!("held {} sockets; first error: {first_err}", held.len())
}

fn fields(n: usize, size: usize, hold_ms: u64) -> String {
    let value = vec![b'x'; size];
    let mut held = Vec::new();
    let mut first_err = String::new();
    for _ in 0..n {
        let f = Fields::new();
        if let Err(e) = f.set("x-fill", std::slice::from_ref(&value)) {
            first_err = format!("{e:?}");
            break;
        }
        held.push(f);
    }
    std::thread::sleep(Duration::from_millis(hold_ms));
    format!("held {} fields; first error: {first_err}", held.len())
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

/// Spins for `ms` of wall time and answers the intervals it ran in (see `/spin?trace=1`).
fn spin_traced(ms: u64) -> String {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    let start = now();
    let end = start + ms * 1_000_000;
    let (mut from, mut last) = (start, start);
    let mut slices = Vec::new();
    let mut x: u64 = 0;
    while last < end {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let t = now();
        if t - last > 1_000_000 {
            slices.push(format!("{from}-{last}"));
            from = t;
        }
        last = t;
    }
    slices.push(format!("{from}-{last}"));
    format!("{} {}", x & 1, slices.join(" "))
}
