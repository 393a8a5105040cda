//! `catalog`, the shop's products: `GET /products` → `[{"id","name","price"}]` (price in
//! cents), `GET /products/ID` → one product or 404.

use shop_core::catalog;
use shop_http::{Request, Response};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

wasi::http::proxy::export!(Catalog);

struct Catalog;

impl wasi::exports::http::incoming_handler::Guest for Catalog {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        shop_http::serve("catalog", request, out, route);
    }
}

fn route(req: &Request) -> Response {
    let path = req.path.as_str();
    if path == "/" {
        return Response::text(200, "catalog: GET /products, GET /products/ID\n");
    }
    let id = match path.strip_prefix("/products") {
        Some("" | "/") => None,
        Some(rest) if rest.starts_with('/') => Some(&rest[1..]),
        _ => return Response::not_found(path),
    };
    if !req.is_get() {
        return Response::method_not_allowed("GET");
    }
    match id {
        None => Response::json(200, &catalog::products()),
        Some(id) => match catalog::product(id) {
            Some(p) => Response::json(200, &p),
            None => Response::error(404, &format!("no product {id:?}")),
        },
    }
}
