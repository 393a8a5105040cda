//! `cart`, the shop's pricing: `POST /cart/total` with `{"items":[{"id":"p1","qty":2}]}`
//! looks up each distinct product at the catalog service (`GET $CATALOG_URL/products/ID`,
//! default `http://catalog`, all lookups in flight at once) and answers
//! `{"items":[{"id","name","qty","price","lineTotal"}],"total":N}` (cents). A bad body or an
//! unknown product is a 400 naming the problem; an unreachable or failing catalog a 502.
//!
//! Nothing is stored: each request gets a fresh instance of this component.

use std::collections::BTreeMap;

use shop_core::cart::{distinct_ids, parse_cart_request, price_cart};
use shop_core::catalog::Product;
use shop_http::{Method, Request, Response};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

wasi::http::proxy::export!(Cart);

struct Cart;

impl wasi::exports::http::incoming_handler::Guest for Cart {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        shop_http::serve("cart", request, out, route);
    }
}

fn route(req: &Request) -> Response {
    match req.path.as_str() {
        "/cart/total" if req.is_post() => total(req),
        "/cart/total" => Response::method_not_allowed("POST"),
        "/" => Response::text(
            200,
            "cart: POST /cart/total {\"items\":[{\"id\":\"p1\",\"qty\":2}]}\n",
        ),
        path => Response::not_found(path),
    }
}

fn total(req: &Request) -> Response {
    let body = match req.read_body() {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let cart = match parse_cart_request(&body) {
        Ok(c) => c,
        Err(msg) => return Response::error(400, &msg),
    };
    let products = match look_up(&distinct_ids(&cart.items)) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("cart: {msg}");
            return Response::error(502, &msg);
        }
    };
    match price_cart(&cart.items, &products) {
        Ok(t) => Response::json(200, &t),
        Err(msg) => Response::error(400, &msg),
    }
}

/// id → product for every id the catalog knows (a 404 leaves the id out: unknown).
fn look_up(ids: &[&str]) -> Result<BTreeMap<String, Product>, String> {
    let base = shop_http::service_url("CATALOG_URL", "http://catalog");
    let pending = ids
        .iter()
        .map(|id| shop_http::start(Method::Get, &format!("{base}/products/{id}"), None))
        .collect::<Result<Vec<_>, _>>()?;
    let mut products = BTreeMap::new();
    for (id, p) in ids.iter().zip(pending) {
        let reply = p.wait()?;
        match reply.status {
            200 => {
                let product: Product = serde_json::from_slice(&reply.body)
                    .map_err(|e| format!("catalog sent a bad product for {id}: {e}"))?;
                if product.id != *id {
                    return Err(format!(
                        "catalog answered product {:?} for {id}",
                        product.id
                    ));
                }
                products.insert(product.id.clone(), product);
            }
            404 => {}
            status => {
                return Err(format!(
                    "catalog answered {status} for {id}: {}",
                    reply.error_message()
                ))
            }
        }
    }
    Ok(products)
}
