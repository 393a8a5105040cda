//! `wasmctl describe KIND NAME`: the object's metadata, spec and status as an indented
//! report, followed by the events about it.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::Value;
use wasmctl_api::registry;

#[derive(Args)]
pub struct DescribeArgs {
    /// Kind (`pod`, `deploy`, ...), or `KIND/NAME`.
    pub kind: String,
    pub names: Vec<String>,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

/// `maxUnavailable` → `Max Unavailable`, `podIP` → `Pod IP`.
fn title(key: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = key.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if i == 0 {
            out.extend(c.to_uppercase());
            continue;
        }
        let prev = chars[i - 1];
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
        if c.is_uppercase() && (prev.is_lowercase() || (prev.is_uppercase() && next_lower)) {
            out.push(' ');
        }
        out.push(*c);
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".into(),
        other => other.to_string(),
    }
}

fn render(out: &mut String, v: &Value, indent: usize) {
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                match val {
                    Value::Object(inner) if inner.is_empty() => {
                        let _ = writeln!(out, "{pad}{}:  <none>", title(k));
                    }
                    Value::Object(_) => {
                        let _ = writeln!(out, "{pad}{}:", title(k));
                        render(out, val, indent + 1);
                    }
                    Value::Array(a) if a.is_empty() => {
                        let _ = writeln!(out, "{pad}{}:  <none>", title(k));
                    }
                    Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
                        let items: Vec<String> = a.iter().map(scalar).collect();
                        let _ = writeln!(out, "{pad}{}:  {}", title(k), items.join(", "));
                    }
                    Value::Array(a) => {
                        let _ = writeln!(out, "{pad}{}:", title(k));
                        for item in a {
                            // Name list items by their `name` or `type` when they have one.
                            let label = item.get("name").or_else(|| item.get("type")).map(scalar);
                            match label {
                                Some(l) => {
                                    let _ = writeln!(out, "{pad}  {l}:");
                                    let mut rest = item.clone();
                                    if let Some(o) = rest.as_object_mut() {
                                        if o.contains_key("name") {
                                            o.remove("name");
                                        } else {
                                            o.remove("type");
                                        }
                                    }
                                    render(out, &rest, indent + 2);
                                }
                                None => {
                                    let _ = writeln!(out, "{pad}  -");
                                    render(out, item, indent + 2);
                                }
                            }
                        }
                    }
                    other => {
                        let _ = writeln!(out, "{pad}{}:  {}", title(k), scalar(other));
                    }
                }
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{}", scalar(other));
        }
    }
}

fn map_line(v: &Value) -> String {
    match v.as_object() {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar(v)))
            .collect::<Vec<_>>()
            .join("\n              "),
        _ => "<none>".into(),
    }
}

pub fn describe_object(obj: &Value, events: &[Value]) -> String {
    let meta = &obj["metadata"];
    let mut out = String::new();
    let _ = writeln!(out, "Name:         {}", scalar(&meta["name"]));
    if let Some(ns) = meta["namespace"].as_str() {
        let _ = writeln!(out, "Namespace:    {ns}");
    }
    let _ = writeln!(out, "Kind:         {}", scalar(&obj["kind"]));
    let _ = writeln!(out, "Labels:       {}", map_line(&meta["labels"]));
    let mut ann = meta["annotations"].clone();
    if let Some(a) = ann.as_object_mut() {
        a.remove(wasmctl_api::keys::LAST_APPLIED);
    }
    let _ = writeln!(out, "Annotations:  {}", map_line(&ann));
    let _ = writeln!(out, "Created:      {}", scalar(&meta["creationTimestamp"]));
    let _ = writeln!(out, "UID:          {}", scalar(&meta["uid"]));
    let _ = writeln!(out, "Version:      {}", scalar(&meta["resourceVersion"]));
    if let Some(d) = meta["deletionTimestamp"].as_str() {
        let _ = writeln!(out, "Terminating:  since {d}");
    }
    if let Some(owners) = meta["ownerReferences"].as_array() {
        for o in owners {
            let _ = writeln!(
                out,
                "Controlled By:  {}/{}",
                scalar(&o["kind"]),
                scalar(&o["name"])
            );
        }
    }
    let skip = ["apiVersion", "kind", "metadata"];
    if let Some(m) = obj.as_object() {
        for (k, v) in m.iter().filter(|(k, _)| !skip.contains(&k.as_str())) {
            let mut one = serde_json::Map::new();
            one.insert(k.clone(), v.clone());
            render(&mut out, &Value::Object(one), 0);
        }
    }
    if events.is_empty() {
        let _ = writeln!(out, "Events:       <none>");
    } else {
        let _ = writeln!(out, "Events:");
        let mut rows = vec![vec![
            "Type".to_string(),
            "Reason".into(),
            "Count".into(),
            "Last Seen".into(),
            "From".into(),
            "Message".into(),
        ]];
        for e in events {
            rows.push(vec![
                scalar(&e["type"]),
                scalar(&e["reason"]),
                scalar(&e["count"]),
                e["lastTimestamp"]
                    .as_str()
                    .or(e["eventTime"].as_str())
                    .unwrap_or("")
                    .to_string(),
                e["source"]["component"]
                    .as_str()
                    .or(e["reportingComponent"].as_str())
                    .unwrap_or("")
                    .to_string(),
                scalar(&e["message"]),
            ]);
        }
        let widths: Vec<usize> = (0..6)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        for r in rows {
            let mut line = String::from("  ");
            for (c, cell) in r.iter().enumerate() {
                line.push_str(cell);
                if c < 5 {
                    line.push_str(&" ".repeat(widths[c] - cell.len() + 2));
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

pub async fn run(kubeconfig: Option<&Path>, mut args: DescribeArgs) -> Result<ExitCode> {
    if let Some((k, n)) = args.kind.clone().split_once('/') {
        args.kind = k.to_string();
        args.names.insert(0, n.to_string());
    }
    let info = super::get::resolve_kind(&args.kind)?;
    if args.names.is_empty() {
        anyhow::bail!("describe needs a name: wasmctl describe {} NAME", args.kind);
    }
    let client = super::client(kubeconfig)?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.namespace.clone());
    let events_info = registry::resolve("events").expect("served");
    for (i, name) in args.names.iter().enumerate() {
        let obj = client.get(&info.item_path(Some(&ns), name)).await?;
        let obj_ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or(&ns)
            .to_string();
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair(
            "fieldSelector",
            &format!(
                "involvedObject.name={name},involvedObject.kind={}",
                info.kind
            ),
        );
        let events_ns = if info.namespaced {
            obj_ns.as_str()
        } else {
            "default"
        };
        let list = client
            .get(&format!(
                "{}?{}",
                events_info.collection_path(Some(events_ns)),
                q.finish()
            ))
            .await?;
        let events = list["items"].as_array().cloned().unwrap_or_default();
        if i > 0 {
            println!();
        }
        print!("{}", describe_object(&obj, &events));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles() {
        assert_eq!(title("maxUnavailable"), "Max Unavailable");
        assert_eq!(title("podIP"), "Pod IP");
        assert_eq!(title("replicas"), "Replicas");
    }
}
