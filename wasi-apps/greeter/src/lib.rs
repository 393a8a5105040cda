//! `greeter`: a wasi:http component; the `frontend` sibling calls it at
//! http://localhost:8081/ (routed in-process by the host).

use std::io::Write as _;

use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasi::http::proxy::export!(Greeter);

struct Greeter;

impl wasi::exports::http::incoming_handler::Guest for Greeter {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let full = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let path = full.split('?').next().unwrap_or("/");
        let (status, body): (u16, &[u8]) = if path == "/" || path.is_empty() {
            (200, b"greetings from greeter\n")
        } else {
            (404, b"not found\n")
        };
        respond(out, status, body);
    }
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
