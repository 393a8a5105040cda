//! Reading manifests: files, directories or stdin; multi-document YAML (or JSON); every
//! document checked before anything is sent, so a bad file writes nothing.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use wasmctl_api::registry::{self, ResourceInfo, RESOURCES};

/// One object from a manifest, with where it came from.
pub struct Manifest {
    pub source: String,
    pub document: usize,
    pub info: &'static ResourceInfo,
    pub object: Value,
}

impl Manifest {
    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or("")
    }
    pub fn namespace(&self) -> Option<&str> {
        self.object["metadata"]["namespace"].as_str()
    }
}

#[derive(Debug)]
pub struct ManifestError(pub String);

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ManifestError {}

fn files_in(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    if path.is_dir() {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(path)
            .map_err(|e| ManifestError(format!("error: reading {}: {e}", path.display())))?;
        for entry in rd {
            let p = entry
                .map_err(|e| ManifestError(format!("error: reading {}: {e}", path.display())))?
                .path();
            if p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// Load every `-f` argument. Nothing is returned unless every document is well-formed and of
/// a served kind.
pub fn load(args: &[PathBuf]) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for arg in args {
        if arg.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| ManifestError(format!("error: reading stdin: {e}")))?;
            out.extend(parse("<stdin>", &text)?);
            continue;
        }
        if !arg.exists() {
            return Err(ManifestError(format!(
                "error: the path {:?} does not exist",
                arg.display().to_string()
            )));
        }
        for file in files_in(arg)? {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| ManifestError(format!("error: reading {}: {e}", file.display())))?;
            out.extend(parse(&file.display().to_string(), &text)?);
        }
    }
    if out.is_empty() {
        return Err(ManifestError("error: no objects passed to apply".into()));
    }
    Ok(out)
}

/// Parse one file's text into objects.
pub fn parse(source: &str, text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let docno = i + 1;
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                let at = e
                    .location()
                    .map(|l| format!("line {}, column {}", l.line(), l.column()))
                    .unwrap_or_else(|| "unknown position".into());
                let msg = e.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                return Err(ManifestError(format!(
                    "error: {source}: document {docno}: invalid YAML at {at}: {msg}"
                )));
            }
        };
        if value.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        // A `kind: List` carries items.
        if value["kind"] == "List" {
            for (j, item) in value["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                out.push(check(source, docno, Some(j), item)?);
            }
            continue;
        }
        out.push(check(source, docno, None, value)?);
    }
    Ok(out)
}

fn check(
    source: &str,
    docno: usize,
    item: Option<usize>,
    v: Value,
) -> Result<Manifest, ManifestError> {
    let whr = match item {
        Some(j) => format!("{source}: document {docno}, item {j}"),
        None => format!("{source}: document {docno}"),
    };
    if !v.is_object() {
        return Err(ManifestError(format!(
            "error: {whr}: expected a mapping (an object), got {v}"
        )));
    }
    let api_version = v["apiVersion"].as_str().unwrap_or("");
    let kind = v["kind"].as_str().unwrap_or("");
    if api_version.is_empty() || kind.is_empty() {
        return Err(ManifestError(format!(
            "error: {whr}: apiVersion and kind are required (got apiVersion {api_version:?}, kind {kind:?})"
        )));
    }
    let info = registry::by_kind(api_version, kind).ok_or_else(|| {
        let served: Vec<String> = RESOURCES
            .iter()
            .map(|r| format!("{}/{}", r.api_version(), r.kind))
            .collect();
        ManifestError(format!(
            "error: {whr}: unknown kind {kind:?} in apiVersion {api_version:?}; served kinds: {}",
            served.join(", ")
        ))
    })?;
    let name = v["metadata"]["name"].as_str().unwrap_or("");
    if name.is_empty() {
        return Err(ManifestError(format!(
            "error: {whr}: metadata.name is required"
        )));
    }
    Ok(Manifest {
        source: source.to_string(),
        document: docno,
        info,
        object: v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_line_and_column_of_the_right_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: b: c\n";
        let err = parse("x.yaml", text).err().unwrap().0;
        assert!(err.contains("document 2"), "{err}");
        assert!(err.contains("line 9"), "{err}");
    }

    #[test]
    fn unknown_kind() {
        let err = parse(
            "x.yaml",
            "apiVersion: v1\nkind: Widget\nmetadata: {name: a}\n",
        )
        .err()
        .unwrap()
        .0;
        assert!(err.contains("unknown kind \"Widget\""), "{err}");
    }

    #[test]
    fn multi_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b}\n";
        let m = parse("x.yaml", text).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].info.kind, "Deployment");
    }
}
