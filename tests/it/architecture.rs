//! ARCHITECTURE.md is a map: every file or directory it names must exist.

use std::path::{Path, PathBuf};

/// The backticked tokens of `text` that name a file (a known extension) or a directory
/// (a trailing `/`).
fn named_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, chunk) in text.split('`').enumerate() {
        if i % 2 == 0 || chunk.contains([' ', '{', ':', '=', '*']) || chunk.starts_with('/') {
            continue;
        }
        let is_file = [".rs", ".md", ".sh", ".toml", ".yaml"]
            .iter()
            .any(|ext| chunk.ends_with(ext));
        if is_file || (chunk.ends_with('/') && chunk.len() > 1) {
            out.push(chunk.to_string());
        }
    }
    out
}

/// Every file and directory of the repository (relative, `/`-separated; dirs end with `/`),
/// skipping build output and VCS data.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name == "target" || name.starts_with('.') {
                continue;
            }
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if p.is_dir() {
                out.push(format!("{rel}/"));
                stack.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out
}

/// A named path exists when it is a path from the root, or — for the short names inside a
/// crate's entry (`allocator.rs`, `proxy/pool.rs`) — the end of some real path.
fn missing<'a>(named: &'a [String], tree: &[String]) -> Vec<&'a String> {
    named
        .iter()
        .filter(|n| {
            !tree
                .iter()
                .any(|t| t == *n || t.ends_with(&format!("/{n}")))
        })
        .collect()
}

#[test]
fn every_path_the_map_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let named = named_paths(&map);
    assert!(named.len() >= 30, "the map names its files: {named:?}");
    let tree = tree(root);
    assert_eq!(
        missing(&named, &tree),
        Vec::<&String>::new(),
        "ARCHITECTURE.md names paths that do not exist"
    );

    // The check itself tells a real path from a stale one.
    let probe = named_paths(
        "`store/src/lib.rs`, `nowhere/gone.rs`, `net.rs`, `proxy/`, `a b.rs`, `meta/v1`",
    );
    assert_eq!(
        probe,
        ["store/src/lib.rs", "nowhere/gone.rs", "net.rs", "proxy/"]
    );
    assert_eq!(missing(&probe, &tree), [&"nowhere/gone.rs".to_string()]);
}
