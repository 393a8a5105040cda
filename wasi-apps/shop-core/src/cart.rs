//! The `cart` service: a cart is computed from the request, never stored (an HTTP component
//! gets a fresh instance per request, so nothing survives between requests).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::catalog::{is_valid_id, Product};

/// Lines a cart may have.
pub const MAX_ITEMS: usize = 50;
/// Largest quantity of one line.
pub const MAX_QTY: u32 = 1000;

/// `POST /cart/total`'s body: `{"items":[{"id":"p1","qty":2}]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CartRequest {
    pub items: Vec<CartItem>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CartItem {
    pub id: String,
    pub qty: u32,
}

/// One priced line of the answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CartLine {
    pub id: String,
    pub name: String,
    pub qty: u32,
    /// Unit price in cents.
    pub price: u64,
    /// `price × qty`, in cents.
    pub line_total: u64,
}

/// `POST /cart/total`'s answer: `{"items":[...],"total":N}` (cents).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartTotal {
    pub items: Vec<CartLine>,
    pub total: u64,
}

/// The front end's `GET /api/checkout` answer: who, the total (cents) and the priced lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    pub user: String,
    pub total: u64,
    pub items: Vec<CartLine>,
}

/// Decodes and validates a cart request body. The error is the message for a 400.
pub fn parse_cart_request(body: &[u8]) -> Result<CartRequest, String> {
    let req: CartRequest = serde_json::from_slice(body).map_err(|e| {
        format!(r#"invalid cart JSON ({e}); expected {{"items":[{{"id":"p1","qty":2}}]}}"#)
    })?;
    validate_items(&req.items)?;
    Ok(req)
}

/// Every line has a valid id and a quantity in 1..=MAX_QTY; 1..=MAX_ITEMS lines.
pub fn validate_items(items: &[CartItem]) -> Result<(), String> {
    if items.is_empty() {
        return Err("the cart has no items".to_string());
    }
    if items.len() > MAX_ITEMS {
        return Err(format!(
            "the cart has {} items, at most {MAX_ITEMS} are allowed",
            items.len()
        ));
    }
    for item in items {
        if !is_valid_id(&item.id) {
            return Err(format!(
                "invalid product id {:?} (1-32 letters, digits, '-' or '_')",
                item.id
            ));
        }
        if item.qty == 0 || item.qty > MAX_QTY {
            return Err(format!(
                "quantity {} of {} is out of range 1..={MAX_QTY}",
                item.qty, item.id
            ));
        }
    }
    Ok(())
}

/// Parses the front end's `items=p1:2,p2:1` (`ID[:QTY]`, QTY 1 when left out; spaces and
/// empty entries are ignored) and validates the result like a cart request.
pub fn parse_items(s: &str) -> Result<Vec<CartItem>, String> {
    let mut items = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, qty) = match entry.split_once(':') {
            Some((id, qty)) => {
                let id = id.trim();
                let qty = qty.trim().parse::<u32>().map_err(|_| {
                    format!("bad quantity {:?} for {id:?} (expected ID:QTY)", qty.trim())
                })?;
                (id, qty)
            }
            None => (entry, 1),
        };
        items.push(CartItem {
            id: id.to_string(),
            qty,
        });
        if items.len() > MAX_ITEMS {
            break; // validate_items reports it
        }
    }
    validate_items(&items)?;
    Ok(items)
}

/// The distinct product ids of a cart, in first-seen order: what to look up.
pub fn distinct_ids(items: &[CartItem]) -> Vec<&str> {
    let mut ids: Vec<&str> = Vec::new();
    for item in items {
        if !ids.contains(&item.id.as_str()) {
            ids.push(&item.id);
        }
    }
    ids
}

/// Prices a cart from the looked-up products (id → product; an id missing from `products` is
/// unknown to the catalog). Lines keep the request's order; repeated ids stay separate lines.
pub fn price_cart(
    items: &[CartItem],
    products: &BTreeMap<String, Product>,
) -> Result<CartTotal, String> {
    let unknown: Vec<String> = distinct_ids(items)
        .into_iter()
        .filter(|id| !products.contains_key(*id))
        .map(|id| format!("{id:?}"))
        .collect();
    match unknown.len() {
        0 => {}
        1 => return Err(format!("unknown product {}", unknown[0])),
        _ => return Err(format!("unknown products {}", unknown.join(", "))),
    }
    let mut lines = Vec::with_capacity(items.len());
    let mut total: u64 = 0;
    for item in items {
        let p = &products[&item.id];
        let line_total = p
            .price
            .checked_mul(u64::from(item.qty))
            .ok_or_else(|| format!("line total of {} overflows", item.id))?;
        total = total
            .checked_add(line_total)
            .ok_or_else(|| "cart total overflows".to_string())?;
        lines.push(CartLine {
            id: item.id.clone(),
            name: p.name.clone(),
            qty: item.qty,
            price: p.price,
            line_total,
        });
    }
    Ok(CartTotal {
        items: lines,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;

    fn item(id: &str, qty: u32) -> CartItem {
        CartItem {
            id: id.to_string(),
            qty,
        }
    }

    fn all_products() -> BTreeMap<String, Product> {
        catalog::products()
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect()
    }

    #[test]
    fn parses_a_cart_request() {
        let req =
            parse_cart_request(br#"{"items":[{"id":"p1","qty":2},{"id":"p3","qty":1}]}"#).unwrap();
        assert_eq!(req.items, vec![item("p1", 2), item("p3", 1)]);
    }

    #[test]
    fn rejects_bad_cart_requests() {
        let err = |body: &str| parse_cart_request(body.as_bytes()).unwrap_err();
        assert!(err("").starts_with("invalid cart JSON"), "{}", err(""));
        assert!(err("{").starts_with("invalid cart JSON"));
        assert!(err(r#"{"items":"p1"}"#).starts_with("invalid cart JSON"));
        assert!(err(r#"{"items":[{"id":"p1"}]}"#).contains("missing field `qty`"));
        assert!(err(r#"{"items":[{"id":"p1","qty":-1}]}"#).starts_with("invalid cart JSON"));
        assert!(err(r#"{"items":[{"id":"p1","qty":1.5}]}"#).starts_with("invalid cart JSON"));
        assert!(err(r#"{"items":[{"id":"p1","qty":1,"x":1}]}"#).contains("unknown field"));
        assert_eq!(err(r#"{"items":[]}"#), "the cart has no items");
        assert_eq!(
            err(r#"{"items":[{"id":"p1","qty":0}]}"#),
            "quantity 0 of p1 is out of range 1..=1000"
        );
        assert_eq!(
            err(r#"{"items":[{"id":"p1","qty":1001}]}"#),
            "quantity 1001 of p1 is out of range 1..=1000"
        );
        assert!(err(r#"{"items":[{"id":"../x","qty":1}]}"#).starts_with("invalid product id"));
        let many = format!(
            r#"{{"items":[{}]}}"#,
            vec![r#"{"id":"p1","qty":1}"#; MAX_ITEMS + 1].join(",")
        );
        assert_eq!(err(&many), "the cart has 51 items, at most 50 are allowed");
    }

    #[test]
    fn parses_items() {
        assert_eq!(
            parse_items("p1:2,p2:1").unwrap(),
            vec![item("p1", 2), item("p2", 1)]
        );
        assert_eq!(
            parse_items(" p1 : 3 , p4,").unwrap(),
            vec![item("p1", 3), item("p4", 1)]
        );
        assert_eq!(
            parse_items("p1:2,p1:1").unwrap(),
            vec![item("p1", 2), item("p1", 1)]
        );
    }

    #[test]
    fn rejects_bad_items() {
        assert_eq!(parse_items("").unwrap_err(), "the cart has no items");
        assert_eq!(parse_items(" , ").unwrap_err(), "the cart has no items");
        assert_eq!(
            parse_items("p1:x").unwrap_err(),
            r#"bad quantity "x" for "p1" (expected ID:QTY)"#
        );
        assert!(parse_items("p1:-1")
            .unwrap_err()
            .starts_with("bad quantity"));
        assert_eq!(
            parse_items("p1:0").unwrap_err(),
            "quantity 0 of p1 is out of range 1..=1000"
        );
        assert!(parse_items(":2")
            .unwrap_err()
            .starts_with("invalid product id"));
        assert!(parse_items("p/1:2")
            .unwrap_err()
            .starts_with("invalid product id"));
        let many = vec!["p1"; 200].join(",");
        assert_eq!(
            parse_items(&many).unwrap_err(),
            "the cart has 51 items, at most 50 are allowed"
        );
    }

    #[test]
    fn distinct_ids_keep_first_seen_order() {
        let items = [item("p2", 1), item("p1", 1), item("p2", 3)];
        assert_eq!(distinct_ids(&items), vec!["p2", "p1"]);
    }

    #[test]
    fn prices_a_cart() {
        let items = [item("p1", 2), item("p2", 1), item("p1", 1)];
        let t = price_cart(&items, &all_products()).unwrap();
        assert_eq!(t.total, 450 * 2 + 1250 + 450);
        assert_eq!(t.items.len(), 3);
        assert_eq!(
            t.items[0],
            CartLine {
                id: "p1".into(),
                name: "Wasm sticker pack".into(),
                qty: 2,
                price: 450,
                line_total: 900,
            }
        );
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["items"][1]["lineTotal"], 1250);
        assert_eq!(v["total"], 2600);
    }

    #[test]
    fn unknown_products_are_named() {
        let products = all_products();
        assert_eq!(
            price_cart(&[item("p1", 1), item("p9", 1)], &products).unwrap_err(),
            r#"unknown product "p9""#
        );
        assert_eq!(
            price_cart(
                &[item("x", 1), item("p1", 1), item("y", 2), item("x", 1)],
                &products
            )
            .unwrap_err(),
            r#"unknown products "x", "y""#
        );
    }

    #[test]
    fn overflow_is_an_error() {
        let mut products = BTreeMap::new();
        products.insert(
            "big".to_string(),
            Product {
                id: "big".into(),
                name: "big".into(),
                price: u64::MAX / 2,
            },
        );
        assert_eq!(
            price_cart(&[item("big", 3)], &products).unwrap_err(),
            "line total of big overflows"
        );
        assert_eq!(
            price_cart(&[item("big", 1), item("big", 1), item("big", 1)], &products).unwrap_err(),
            "cart total overflows"
        );
    }
}
