//! `hello`: a small wasi:http/proxy component used for demos and for the
//! orchestrator's tests (status codes, env, latency, memory and CPU limits).

use std::io::Write as _;

use wasi::clocks::monotonic_clock;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasi::http::proxy::export!(Hello);

struct Hello;

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let full = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let path = full.split('?').next().unwrap_or("/");
        let (status, body) = route(path);
        respond(out, status, body.as_bytes());
    }
}

fn route(path: &str) -> (u16, String) {
    if path == "/" || path.is_empty() {
        let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".to_string());
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".to_string());
        return (200, format!("{greeting} from {host}\n"));
    }
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let head = parts.next().unwrap_or("");
    let arg = parts.next().unwrap_or("");
    match head {
        "status" => match arg.parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => (code, format!("status {code}\n")),
            _ => (400, format!("bad status code {arg:?}\n")),
        },
        "env" if !arg.is_empty() => match std::env::var(arg) {
            Ok(v) => (200, v),
            Err(_) => (404, format!("env {arg} not set\n")),
        },
        "sleep" => match arg.parse::<u64>() {
            Ok(ms) => {
                println!("sleeping {ms} ms");
                monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
                (200, format!("slept {ms} ms\n"))
            }
            Err(_) => (400, format!("bad duration {arg:?}\n")),
        },
        "alloc" => match arg.parse::<usize>() {
            Ok(mib) => {
                let sum = alloc_and_touch(mib);
                (200, format!("allocated {mib} MiB (checksum {sum})\n"))
            }
            Err(_) => (400, format!("bad size {arg:?}\n")),
        },
        "spin" => match arg.parse::<u64>() {
            Ok(ms) => {
                let n = spin(ms);
                (200, format!("spun {ms} ms ({n} iterations)\n"))
            }
            Err(_) => (400, format!("bad duration {arg:?}\n")),
        },
        _ => (404, "not found\n".to_string()),
    }
}

/// Allocates `mib` MiB and writes one byte per 4 KiB page so the memory is
/// really grown/touched (the host's memory limit must see it).
fn alloc_and_touch(mib: usize) -> u64 {
    let len = mib.saturating_mul(1 << 20);
    let mut v: Vec<u8> = Vec::with_capacity(len);
    v.resize(len, 0);
    let mut i = 0;
    while i < len {
        v[i] = (i >> 12) as u8 | 1;
        i += 4096;
    }
    let v = std::hint::black_box(v);
    let mut sum = 0u64;
    let mut i = 0;
    while i < len {
        sum = sum.wrapping_add(v[i] as u64);
        i += 4096;
    }
    sum
}

/// Busy-loops for `ms` milliseconds of monotonic wall time.
fn spin(ms: u64) -> u64 {
    let deadline = monotonic_clock::now().saturating_add(ms.saturating_mul(1_000_000));
    let mut n: u64 = 0;
    while monotonic_clock::now() < deadline {
        for _ in 0..1000 {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    n
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
