//! `shop-frontend`, the shop's web front end:
//! - `GET /` → an HTML page of the catalog's products (`GET $CATALOG_URL/products`) with a
//!   checkout form;
//! - `GET /api/checkout?token=T&items=p1:2,p2:1` → checks the token at auth
//!   (`GET $AUTH_URL/verify?token=T`), prices the items at cart (`POST $CART_URL/cart/total`)
//!   and answers `{"user","total","items"}`; 401 if auth refuses the token, 400 for bad items
//!   or an unknown product, 502 if a service fails.
//!
//! The services default to their Service names in the same namespace (`http://catalog`,
//! `http://auth`, `http://cart`).

use shop_core::auth::Verified;
use shop_core::cart::{parse_items, CartRequest, CartTotal, Checkout};
use shop_core::catalog::Product;
use shop_core::page;
use shop_core::query::percent_encode;
use shop_http::{Request, Response};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

wasi::http::proxy::export!(Frontend);

struct Frontend;

const NAME: &str = "shop-frontend";

impl wasi::exports::http::incoming_handler::Guest for Frontend {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        shop_http::serve(NAME, request, out, route);
    }
}

fn route(req: &Request) -> Response {
    let handler: fn(&Request) -> Response = match req.path.as_str() {
        "/" | "/index.html" => index,
        "/api/checkout" => checkout,
        path => return Response::not_found(path),
    };
    if !req.is_get() {
        return Response::method_not_allowed("GET");
    }
    handler(req)
}

fn index(_req: &Request) -> Response {
    let url = format!(
        "{}/products",
        shop_http::service_url("CATALOG_URL", "http://catalog")
    );
    let products = shop_http::get(&url).and_then(|reply| {
        if !reply.is_success() {
            return Err(format!(
                "GET {url}: {} {}",
                reply.status,
                reply.error_message()
            ));
        }
        serde_json::from_slice::<Vec<Product>>(&reply.body)
            .map_err(|e| format!("GET {url}: bad product list: {e}"))
    });
    match products {
        Ok(products) => Response::html(
            200,
            page::index_html(&products, &shop_http::served_by(NAME)),
        ),
        Err(msg) => {
            eprintln!("{NAME}: {msg}");
            Response::html(502, page::error_html(&msg))
        }
    }
}

fn checkout(req: &Request) -> Response {
    // 1. Who is it?
    let token = req.param("token").unwrap_or_default();
    if token.is_empty() {
        return Response::error(401, "missing token (add ?token=...)");
    }
    let url = format!(
        "{}/verify?token={}",
        shop_http::service_url("AUTH_URL", "http://auth"),
        percent_encode(&token)
    );
    let user = match shop_http::get(&url) {
        Ok(reply) if reply.status == 200 => match serde_json::from_slice::<Verified>(&reply.body) {
            Ok(v) => v.user,
            Err(e) => return upstream_failed(format!("auth sent a bad answer: {e}")),
        },
        Ok(reply) if reply.status == 401 => {
            return Response::error(401, &format!("auth: {}", reply.error_message()))
        }
        Ok(reply) => {
            return upstream_failed(format!(
                "auth answered {}: {}",
                reply.status,
                reply.error_message()
            ))
        }
        Err(e) => return upstream_failed(e),
    };

    // 2. What does it cost?
    let items = match parse_items(&req.param("items").unwrap_or_default()) {
        Ok(items) => items,
        Err(msg) => return Response::error(400, &format!("items: {msg}; e.g. items=p1:2,p2:1")),
    };
    let body = match serde_json::to_vec(&CartRequest { items }) {
        Ok(b) => b,
        Err(e) => return Response::error(500, &format!("encoding the cart: {e}")),
    };
    let url = format!(
        "{}/cart/total",
        shop_http::service_url("CART_URL", "http://cart")
    );
    let total = match shop_http::post_json(&url, &body) {
        Ok(reply) if reply.status == 200 => {
            match serde_json::from_slice::<CartTotal>(&reply.body) {
                Ok(t) => t,
                Err(e) => return upstream_failed(format!("cart sent a bad answer: {e}")),
            }
        }
        Ok(reply) if reply.status == 400 => {
            return Response::error(400, &format!("cart: {}", reply.error_message()))
        }
        Ok(reply) => {
            return upstream_failed(format!(
                "cart answered {}: {}",
                reply.status,
                reply.error_message()
            ))
        }
        Err(e) => return upstream_failed(e),
    };
    Response::json(
        200,
        &Checkout {
            user,
            total: total.total,
            items: total.items,
        },
    )
}

fn upstream_failed(msg: String) -> Response {
    eprintln!("{NAME}: {msg}");
    Response::error(502, &msg)
}
