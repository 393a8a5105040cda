//! The `auth` service's fixed token table.

use serde::{Deserialize, Serialize};

/// `GET /verify`'s answer for a known token: `{"user":"alice"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub user: String,
}

/// token → user. A demo table, not a credential store.
pub const TOKENS: &[(&str, &str)] = &[("alice-token", "alice"), ("bob-token", "bob")];

/// The user a bearer token belongs to, if any.
pub fn user_for_token(token: &str) -> Option<&'static str> {
    TOKENS
        .iter()
        .find(|(t, _)| *t == token)
        .map(|(_, user)| *user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_tokens() {
        assert_eq!(user_for_token("alice-token"), Some("alice"));
        assert_eq!(user_for_token("bob-token"), Some("bob"));
    }

    #[test]
    fn unknown_tokens() {
        assert_eq!(user_for_token(""), None);
        assert_eq!(user_for_token("alice"), None);
        assert_eq!(user_for_token("ALICE-TOKEN"), None);
        assert_eq!(user_for_token("alice-token "), None);
    }
}
