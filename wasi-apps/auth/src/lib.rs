//! `auth`, the shop's token check: `GET /verify?token=T` → 200 `{"user":"alice"}` for a
//! token of the fixed table (`alice-token`, `bob-token`), 401 `{"error":...}` otherwise.

use shop_core::auth::{user_for_token, Verified};
use shop_http::{Request, Response};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

wasi::http::proxy::export!(Auth);

struct Auth;

impl wasi::exports::http::incoming_handler::Guest for Auth {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        shop_http::serve("auth", request, out, route);
    }
}

fn route(req: &Request) -> Response {
    match req.path.as_str() {
        "/verify" if req.is_get() => verify(req.param("token").as_deref().unwrap_or("")),
        "/verify" => Response::method_not_allowed("GET"),
        "/" => Response::text(200, "auth: GET /verify?token=T\n"),
        path => Response::not_found(path),
    }
}

fn verify(token: &str) -> Response {
    match user_for_token(token) {
        Some(user) => Response::json(
            200,
            &Verified {
                user: user.to_string(),
            },
        ),
        None => {
            let message = if token.is_empty() {
                "missing token"
            } else {
                "invalid token"
            };
            let mut r = Response::error(401, message);
            r.headers.push(("www-authenticate", "Bearer".to_string()));
            r
        }
    }
}
