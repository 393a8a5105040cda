//! The shop's logic, shared by its four components (`auth`, `catalog`, `cart`,
//! `shop-frontend`) and free of WASI imports, so it is unit-tested on the host
//! (`cargo test -p shop-core`). The components only add wasi:http around it.

pub mod auth;
pub mod cart;
pub mod catalog;
pub mod page;
pub mod query;

use serde::Serialize;

/// The shop's error body: `{"error":"MESSAGE"}`.
pub fn error_json(message: &str) -> String {
    #[derive(Serialize)]
    struct Error<'a> {
        error: &'a str,
    }
    serde_json::to_string(&Error { error: message }).unwrap_or_else(|_| "{}".to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_json_escapes() {
        assert_eq!(super::error_json("bad \"x\""), r#"{"error":"bad \"x\""}"#);
    }
}
