//! `wasmctl get`: server-side tables printed like kubectl's, or YAML/JSON, optionally
//! followed by a watch.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use serde_json::{json, Value};
use wasmctl_api::registry::{self, ResourceInfo};
use wasmctl_client::{Client, TABLE_ACCEPT};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Wide,
    Yaml,
    Json,
    Name,
}

#[derive(Args)]
pub struct GetArgs {
    /// Kind(s), comma separated (`pods`, `deploy`, `nodes,pods`), optionally `KIND/NAME`.
    pub kind: String,
    /// Names of objects to show.
    pub names: Vec<String>,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// List across all namespaces.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Label selector (`app=web,tier!=db`).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Field selector (`spec.nodeName=node-1`).
    #[arg(long)]
    pub field_selector: Option<String>,
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
    /// After listing, watch for changes.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

pub fn resolve_kind(kind: &str) -> Result<&'static ResourceInfo> {
    match registry::resolve(kind) {
        Some(i) => Ok(i),
        None => bail!(
            "the server doesn't have a resource type {kind:?} (served: {})",
            registry::RESOURCES
                .iter()
                .map(|r| r.plural)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn query(args: &GetArgs, extra: &[(&str, String)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    if let Some(l) = &args.selector {
        q.append_pair("labelSelector", l);
    }
    if let Some(f) = &args.field_selector {
        q.append_pair("fieldSelector", f);
    }
    for (k, v) in extra {
        q.append_pair(k, v);
    }
    let s = q.finish();
    if s.is_empty() {
        s
    } else {
        format!("?{s}")
    }
}

/// Render a `Table` as kubectl does: upper-case headers, columns padded by three spaces.
pub fn render_table(
    table: &Value,
    wide: bool,
    namespace_col: bool,
    kind_prefix: Option<&str>,
    header: bool,
) -> String {
    let defs: Vec<&Value> = table["columnDefinitions"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let shown: Vec<usize> = defs
        .iter()
        .enumerate()
        .filter(|(_, d)| wide || d["priority"].as_i64().unwrap_or(0) == 0)
        .map(|(i, _)| i)
        .collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    if header {
        let mut h = Vec::new();
        if namespace_col {
            h.push("NAMESPACE".to_string());
        }
        h.extend(
            shown
                .iter()
                .map(|i| defs[*i]["name"].as_str().unwrap_or("").to_uppercase()),
        );
        rows.push(h);
    }
    for r in table["rows"].as_array().into_iter().flatten() {
        let cells = r["cells"].as_array().cloned().unwrap_or_default();
        let mut line = Vec::new();
        if namespace_col {
            line.push(
                r["object"]["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
        for (pos, i) in shown.iter().enumerate() {
            let mut c = match cells.get(*i) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            if pos == 0 {
                if let Some(p) = kind_prefix {
                    c = format!("{p}/{c}");
                }
            }
            line.push(c);
        }
        rows.push(line);
    }
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..ncols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn print_objects(objs: Vec<Value>, single: bool, output: Output) -> Result<()> {
    let doc = if single && objs.len() == 1 {
        objs.into_iter().next().expect("one object")
    } else {
        json!({"apiVersion": "v1", "kind": "List", "items": objs, "metadata": {"resourceVersion": ""}})
    };
    let mut stdout = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&doc)?)?,
        _ => write!(stdout, "{}", serde_yaml::to_string(&doc)?)?,
    }
    Ok(())
}

pub async fn run(kubeconfig: Option<&Path>, mut args: GetArgs) -> Result<ExitCode> {
    // `get deploy/web` form.
    let mut kinds: Vec<String> = args.kind.split(',').map(String::from).collect();
    if kinds.len() == 1 {
        if let Some((k, n)) = args.kind.clone().split_once('/') {
            kinds = vec![k.to_string()];
            args.names.insert(0, n.to_string());
        }
    }
    let infos: Vec<&'static ResourceInfo> = kinds
        .iter()
        .map(|k| resolve_kind(k))
        .collect::<Result<_>>()?;
    if args.watch && infos.len() > 1 {
        bail!("you may only specify a single resource type with --watch");
    }
    let client = super::client(kubeconfig)?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.namespace.clone());
    let multi = infos.len() > 1;
    let wide = args.output == Some(Output::Wide);
    let mut collected = Vec::new();
    let mut printed_any = false;
    let mut last_rv = String::new();
    for info in &infos {
        let list_ns = if info.namespaced && !args.all_namespaces {
            Some(ns.as_str())
        } else {
            None
        };
        let ns_col = info.namespaced && args.all_namespaces;
        let prefix = multi.then(|| info.qualified_singular());
        let structured = matches!(args.output, Some(Output::Yaml | Output::Json));
        if !args.names.is_empty() {
            for name in &args.names {
                let path = info.item_path(list_ns.or(Some(ns.as_str())), name);
                if structured {
                    collected.push(client.get(&path).await?);
                } else if args.output == Some(Output::Name) {
                    client.get(&path).await?;
                    println!("{}/{name}", info.qualified_singular());
                } else {
                    let t = client.get_table(&path).await?;
                    print!(
                        "{}",
                        render_table(&t, wide, false, prefix.as_deref(), !printed_any)
                    );
                    printed_any = true;
                }
            }
            continue;
        }
        let path = format!("{}{}", info.collection_path(list_ns), query(&args, &[]));
        if structured {
            let list = client.get(&path).await?;
            last_rv = list["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let kind = info.kind;
            for mut item in list["items"].as_array().cloned().unwrap_or_default() {
                item["apiVersion"] = json!(info.api_version());
                item["kind"] = json!(kind);
                collected.push(item);
            }
            continue;
        }
        let t = client.get_table(&path).await?;
        last_rv = t["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let rows = t["rows"].as_array().map_or(0, Vec::len);
        if rows == 0 {
            continue;
        }
        if args.output == Some(Output::Name) {
            for r in t["rows"].as_array().into_iter().flatten() {
                println!(
                    "{}/{}",
                    info.qualified_singular(),
                    r["object"]["metadata"]["name"].as_str().unwrap_or("")
                );
            }
            continue;
        }
        if printed_any {
            println!();
        }
        print!(
            "{}",
            render_table(&t, wide, ns_col, prefix.as_deref(), true)
        );
        printed_any = true;
    }
    if matches!(args.output, Some(Output::Yaml | Output::Json)) {
        print_objects(
            collected,
            !args.names.is_empty() && args.names.len() * infos.len() == 1,
            args.output.expect("set"),
        )?;
    } else if !printed_any
        && args.names.is_empty()
        && !args.watch
        && args.output != Some(Output::Name)
    {
        if infos.iter().any(|i| i.namespaced) && !args.all_namespaces {
            eprintln!("No resources found in {ns} namespace.");
        } else {
            eprintln!("No resources found");
        }
    }
    std::io::stdout().flush()?;
    if args.watch {
        let info = infos[0];
        let list_ns = if info.namespaced && !args.all_namespaces {
            Some(ns.as_str())
        } else {
            None
        };
        watch(&client, info, list_ns, &args, &last_rv, wide, printed_any).await?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn watch(
    client: &Client,
    info: &ResourceInfo,
    ns: Option<&str>,
    args: &GetArgs,
    rv: &str,
    wide: bool,
    header_printed: bool,
) -> Result<()> {
    let mut extra = vec![
        ("watch", "1".to_string()),
        ("resourceVersion", rv.to_string()),
    ];
    if args.names.len() == 1 {
        extra.push(("fieldSelector", format!("metadata.name={}", args.names[0])));
    }
    let path = format!("{}{}", info.collection_path(ns), query(args, &extra));
    let structured = matches!(args.output, Some(Output::Yaml | Output::Json));
    let accept = if structured { None } else { Some(TABLE_ACCEPT) };
    let mut stream = client.watch(&path, accept).await?;
    let mut columns: Option<Value> = None;
    let mut header = !header_printed;
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        match ev["type"].as_str() {
            Some("BOOKMARK") => continue,
            Some("ERROR") => bail!(
                "watch ended: {}",
                ev["object"]["message"].as_str().unwrap_or("error")
            ),
            _ => {}
        }
        let obj = &ev["object"];
        if structured {
            if args.output == Some(Output::Json) {
                println!("{}", serde_json::to_string_pretty(obj)?);
            } else {
                print!("---\n{}", serde_yaml::to_string(obj)?);
            }
        } else {
            let mut t = obj.clone();
            if t["columnDefinitions"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
            {
                columns = Some(t["columnDefinitions"].clone());
            } else if let Some(c) = &columns {
                t["columnDefinitions"] = c.clone();
            }
            print!(
                "{}",
                render_table(
                    &t,
                    wide,
                    args.all_namespaces && info.namespaced,
                    None,
                    header
                )
            );
            header = false;
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_kubectl() {
        let t = json!({
            "columnDefinitions": [
                {"name": "Name", "priority": 0}, {"name": "Ready", "priority": 0},
                {"name": "Node", "priority": 1}
            ],
            "rows": [
                {"cells": ["web-1", "1/1", "n1"], "object": {"metadata": {"namespace": "default"}}},
                {"cells": ["api", "0/1", "n2"], "object": {"metadata": {"namespace": "shop"}}}
            ]
        });
        assert_eq!(
            render_table(&t, false, false, None, true),
            "NAME    READY\nweb-1   1/1\napi     0/1\n"
        );
        assert_eq!(
            render_table(&t, true, true, None, true),
            "NAMESPACE   NAME    READY   NODE\ndefault     web-1   1/1     n1\nshop        api     0/1     n2\n"
        );
    }
}
