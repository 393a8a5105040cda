//! Request targets: path and query splitting, query parameters, percent-encoding.

/// `/a/b?x=1` → (`/a/b`, `x=1`); an empty path is `/`.
pub fn split_target(target: &str) -> (&str, &str) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    (if path.is_empty() { "/" } else { path }, query)
}

/// The first value of `name` in a query string, percent-decoded (`+` is a space). A
/// parameter given without `=` has the empty value.
pub fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes and `+`; a malformed escape is kept as it is; invalid UTF-8 is
/// replaced (U+FFFD).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (b.get(i + 1).and_then(hex), b.get(i + 2).and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: &u8) -> Option<u8> {
    (*c as char).to_digit(16).map(|d| d as u8)
}

/// Encodes a query value: everything but RFC 3986's unreserved characters is `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(split_target("/a/b?x=1&y"), ("/a/b", "x=1&y"));
        assert_eq!(split_target("/a"), ("/a", ""));
        assert_eq!(split_target(""), ("/", ""));
        assert_eq!(split_target("?x=1"), ("/", "x=1"));
    }

    #[test]
    fn params() {
        let q = "token=alice-token&items=p1%3A2%2Cp2:1&empty&sp=a+b%20c&token=second";
        assert_eq!(param(q, "token").as_deref(), Some("alice-token"));
        assert_eq!(param(q, "items").as_deref(), Some("p1:2,p2:1"));
        assert_eq!(param(q, "empty").as_deref(), Some(""));
        assert_eq!(param(q, "sp").as_deref(), Some("a b c"));
        assert_eq!(param(q, "missing"), None);
        assert_eq!(param("", "token"), None);
        assert_eq!(param("to%6Ben=x", "token").as_deref(), Some("x"));
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("%41%62c"), "Abc");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%C3%A9"), "é");
        assert_eq!(percent_decode("%FF"), "\u{FFFD}");
    }

    #[test]
    fn encoding_round_trips() {
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(percent_encode("alice-token_1.~"), "alice-token_1.~");
        for s in ["", "x y+z", "%%", "p1:2,p2:1", "ünï&?#"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
    }
}
