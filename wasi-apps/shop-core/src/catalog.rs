//! The `catalog` service's products.

use serde::{Deserialize, Serialize};

/// A product as the catalog serves it: `{"id":"p1","name":"...","price":1250}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub id: String,
    pub name: String,
    /// In cents.
    pub price: u64,
}

/// (id, name, price in cents).
const PRODUCTS: &[(&str, &str, u64)] = &[
    ("p1", "Wasm sticker pack", 450),
    ("p2", "Component model mug", 1250),
    ("p3", "WASI hoodie", 4900),
    ("p4", "Pod plushie", 2200),
    ("p5", "Cluster in a box (poster)", 1800),
];

/// Every product, in id order.
pub fn products() -> Vec<Product> {
    PRODUCTS.iter().map(|p| to_product(*p)).collect()
}

/// One product by id.
pub fn product(id: &str) -> Option<Product> {
    PRODUCTS
        .iter()
        .find(|(pid, _, _)| *pid == id)
        .map(|p| to_product(*p))
}

fn to_product((id, name, price): (&str, &str, u64)) -> Product {
    Product {
        id: id.to_string(),
        name: name.to_string(),
        price,
    }
}

/// A product id as the shop accepts it: 1–32 ASCII letters, digits, `-` or `_` (so it can
/// go into a URL path unescaped).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `$12.50` for 1250 cents.
pub fn format_price(cents: u64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup() {
        assert_eq!(products().len(), PRODUCTS.len());
        let p = product("p2").unwrap();
        assert_eq!(p.name, "Component model mug");
        assert_eq!(p.price, 1250);
        assert_eq!(product("p9"), None);
        assert_eq!(product(""), None);
    }

    #[test]
    fn ids_are_unique_and_valid() {
        let all = products();
        for (i, p) in all.iter().enumerate() {
            assert!(is_valid_id(&p.id), "{}", p.id);
            assert!(all[i + 1..].iter().all(|q| q.id != p.id), "{}", p.id);
        }
    }

    #[test]
    fn json_shape() {
        let v = serde_json::to_value(product("p1").unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "p1", "name": "Wasm sticker pack", "price": 450})
        );
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("p1"));
        assert!(is_valid_id("a-b_C9"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("p1/x"));
        assert!(!is_valid_id("p 1"));
        assert!(!is_valid_id("p1?"));
        assert!(!is_valid_id(&"x".repeat(33)));
    }

    #[test]
    fn prices() {
        assert_eq!(format_price(0), "$0.00");
        assert_eq!(format_price(5), "$0.05");
        assert_eq!(format_price(1250), "$12.50");
        assert_eq!(format_price(100_000), "$1000.00");
    }
}
