//! Name and label syntax (DNS-1123 names, qualified names, label values), the object metadata
//! every kind carries, and the small field checks the per-kind validators share (non-negative
//! numbers, port numbers and named ports, enumerations).

use std::collections::BTreeMap;

use crate::meta::{IntOrString, ObjectMeta};

use super::Errors;

// ---------------------------------------------------------------- name and label syntax

/// DNS-1123 subdomain: lowercase alphanumerics, '-' and '.', at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("must be 1 to 253 characters, got {}", s.len()));
    }
    for label in s.split('.') {
        is_dns1123_label_chars(label).map_err(|_| {
            format!(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
                 '-' or '.', and must start and end with an alphanumeric character (got {s:?})"
            )
        })?;
    }
    Ok(())
}

/// DNS-1123 label: lowercase alphanumerics and '-', at most 63 characters.
pub fn is_dns1123_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!(
            "must be 1 to 63 characters, got {} ({s:?})",
            s.len()
        ));
    }
    is_dns1123_label_chars(s).map_err(|_| {
        format!(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
             and must start and end with an alphanumeric character (got {s:?})"
        )
    })
}

fn is_dns1123_label_chars(s: &str) -> Result<(), ()> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let b = s.as_bytes();
    if s.is_empty()
        || !s.chars().all(ok_char)
        || !b[0].is_ascii_alphanumeric()
        || !b[b.len() - 1].is_ascii_alphanumeric()
    {
        return Err(());
    }
    Ok(())
}

pub(super) fn is_qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        is_dns1123_subdomain(p).map_err(|e| format!("prefix part {e}"))?;
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(format!(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start \
             and end with an alphanumeric character, at most 63 characters (got {s:?})"
        ));
    }
    Ok(())
}

fn is_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    is_qualified_name(v).map_err(|_| {
        format!(
            "a valid label value must be 63 characters or less and must be empty or begin and \
             end with an alphanumeric character, with '-', '_' or '.' between (got {v:?})"
        )
    })
}

pub(super) fn validate_labels(labels: &BTreeMap<String, String>, path: &str, errs: &mut Errors) {
    for (k, v) in labels {
        if let Err(e) = is_qualified_name(k) {
            errs.invalid(format!("{path}[{k}]"), format!("invalid label key: {e}"));
        }
        if let Err(e) = is_label_value(v) {
            errs.invalid(format!("{path}[{k}]"), e);
        }
    }
}

/// Validate the metadata every object has (the name may be empty when `generateName` is set;
/// the server fills it before validating again).
pub fn validate_object_meta(meta: &ObjectMeta, errs: &mut Errors) {
    validate_meta_at(meta, "metadata", errs, true);
}

pub(super) fn validate_meta_at(meta: &ObjectMeta, path: &str, errs: &mut Errors, need_name: bool) {
    if meta.name.is_empty() {
        if need_name && meta.generate_name.as_deref().unwrap_or("").is_empty() {
            errs.required(format!("{path}.name"), "name or generateName is required");
        }
    } else if let Err(e) = is_dns1123_subdomain(&meta.name) {
        errs.invalid(format!("{path}.name"), e);
    }
    validate_labels(&meta.labels, &format!("{path}.labels"), errs);
    let total: usize = meta
        .annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if total > 256 * 1024 {
        errs.invalid(
            format!("{path}.annotations"),
            format!("must have at most 262144 bytes, got {total}"),
        );
    }
    for k in meta.annotations.keys() {
        if let Err(e) = is_qualified_name(k) {
            errs.invalid(
                format!("{path}.annotations[{k}]"),
                format!("invalid annotation key: {e}"),
            );
        }
    }
    if let Some(g) = meta.generation {
        if g < 0 {
            errs.invalid(
                format!("{path}.generation"),
                format!("must be >= 0, got {g}"),
            );
        }
    }
}

pub(super) fn non_negative(v: Option<i64>, field: &str, errs: &mut Errors) {
    if let Some(v) = v {
        if v < 0 {
            errs.invalid(field, format!("must be >= 0, got {v}"));
        }
    }
}

pub(super) fn port_number(p: i32, field: &str, errs: &mut Errors) {
    if !(1..=65535).contains(&p) {
        errs.invalid(
            field,
            format!("must be between 1 and 65535, inclusive, got {p}"),
        );
    }
}

pub(super) fn one_of(v: Option<&str>, field: &str, allowed: &[&str], errs: &mut Errors) {
    if let Some(v) = v {
        if !allowed.contains(&v) {
            errs.not_supported(field, v, allowed);
        }
    }
}

pub(super) fn validate_port_ref(p: &IntOrString, field: &str, errs: &mut Errors) {
    match p {
        IntOrString::Int(n) => port_number(*n, field, errs),
        IntOrString::String(s) => {
            if s.is_empty() || s.len() > 15 || is_dns1123_label(s).is_err() {
                errs.invalid(
                    field,
                    format!("must be a port number or an IANA_SVC_NAME, got {s:?}"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::normalize;
    use crate::registry::resolve;
    use serde_json::json;

    #[test]
    fn bad_names() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "Bad_Name"},
                         "spec": {"containers": [{"name": "c", "image": "x"}]}});
        let err = normalize(resolve("pod").unwrap(), pod).unwrap_err();
        assert_eq!(err.errors[0].field, "metadata.name");
    }
}
