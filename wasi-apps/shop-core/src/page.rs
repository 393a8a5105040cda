//! The front end's HTML page: the catalog's products and a checkout form (which calls
//! `/api/checkout` from the browser).

use crate::catalog::{format_price, Product};

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const HEAD: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>wasmctl shop</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #ddd; }
td.price { text-align: right; }
input[type=number] { width: 4rem; }
pre { background: #f4f4f4; padding: .6rem; white-space: pre-wrap; }
</style>
</head>
<body>
<h1>wasmctl shop</h1>
"#;

const TAIL: &str = r#"<script>
document.getElementById('checkout').addEventListener('submit', async (e) => {
  e.preventDefault();
  const form = new FormData(e.target);
  const items = [];
  for (const [k, v] of form) if (k !== 'token' && Number(v) > 0) items.push(k + ':' + v);
  const url = '/api/checkout?token=' + encodeURIComponent(form.get('token'))
    + '&items=' + encodeURIComponent(items.join(','));
  const out = document.getElementById('result');
  try {
    const r = await fetch(url);
    out.textContent = 'GET ' + url + '\n' + r.status + ' (served by '
      + r.headers.get('x-served-by') + ')\n' + await r.text();
  } catch (err) {
    out.textContent = 'GET ' + url + ' failed: ' + err;
  }
});
</script>
</body>
</html>
"#;

/// The page for `GET /`.
pub fn index_html(products: &[Product], served_by: &str) -> String {
    let mut h = String::from(HEAD);
    h.push_str(&format!(
        "<p>Four WebAssembly services (frontend, catalog, cart, auth) calling each other by \
         Service name. This page was served by <code>{}</code>.</p>\n",
        escape_html(served_by)
    ));
    h.push_str(
        "<form id=\"checkout\">\n<table>\n<thead><tr><th>id</th><th>product</th>\
         <th>price</th><th>qty</th></tr></thead>\n<tbody>\n",
    );
    for p in products {
        let id = escape_html(&p.id);
        h.push_str(&format!(
            "<tr><td><code>{id}</code></td><td>{}</td><td class=\"price\">{}</td>\
             <td><input type=\"number\" name=\"{id}\" min=\"0\" max=\"1000\" value=\"0\"></td></tr>\n",
            escape_html(&p.name),
            format_price(p.price),
        ));
    }
    h.push_str(
        "</tbody>\n</table>\n<p><label>token <input name=\"token\" value=\"alice-token\"></label>\n\
         <button type=\"submit\">check out</button></p>\n</form>\n<pre id=\"result\"></pre>\n",
    );
    h.push_str(TAIL);
    h
}

/// The page when the catalog cannot be reached (served with a 502).
pub fn error_html(message: &str) -> String {
    format!(
        "{HEAD}<p>The catalog is unavailable: <code>{}</code></p>\n</body>\n</html>\n",
        escape_html(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::products;

    #[test]
    fn escapes() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn lists_every_product() {
        let html = index_html(&products(), "frontend-abc");
        for p in products() {
            assert!(html.contains(&format!("<code>{}</code>", p.id)), "{}", p.id);
            assert!(html.contains(&escape_html(&p.name)), "{}", p.name);
            assert!(html.contains(&format_price(p.price)), "{}", p.price);
            assert!(html.contains(&format!("name=\"{}\"", p.id)), "{}", p.id);
        }
        assert!(html.contains("served by <code>frontend-abc</code>"));
        assert!(html.ends_with("</html>\n"));
    }

    #[test]
    fn product_text_is_escaped() {
        let evil = Product {
            id: "p1".into(),
            name: "<script>alert(1)</script>".into(),
            price: 1,
        };
        let html = index_html(&[evil], "<b>");
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("<code>&lt;b&gt;</code>"));
        assert!(error_html("<x>").contains("<code>&lt;x&gt;</code>"));
    }
}
