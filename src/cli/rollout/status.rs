//! `wasmctl rollout status`: kubectl's `DeploymentStatusViewer`, driven by a watch on the
//! one deployment (re-opened when the server ends it, re-listed when its revision expired).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{ArgAction, Args};
use futures_util::StreamExt;
use serde_json::Value;
use wasmctl_api::apps::{Deployment, DeploymentStatus};
use wasmctl_client::ClientError;

use super::{decode, revision, Target, TargetArgs};

/// The exit status when `--timeout` passes first (as coreutils' `timeout`).
const TIMED_OUT: u8 = 124;

pub const EXIT_CODES: &str = "\
Exit status:
  0    the rollout completed (with --watch=false: the status was printed, complete or not)
  1    the rollout failed (progress deadline exceeded, --revision mismatch), or the
       deployment does not exist, was deleted, or the API server failed
  124  --timeout passed first (error: timed out waiting for the condition)";

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Stop waiting after this long (`30s`, `5m`); 0 waits forever.
    #[arg(long, default_value = "0", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
    /// Watch until the rollout completes; `--watch=false` prints the current status once.
    #[arg(
        short = 'w',
        long,
        action = ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_value_t = true,
        default_missing_value = "true"
    )]
    pub watch: bool,
    /// Fail unless the deployment is at this revision (0: any).
    #[arg(long, default_value_t = 0)]
    pub revision: i64,
}

/// Where a rollout stands, with kubectl's message for it.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Waiting(String),
    Complete(String),
}

/// kubectl's `DeploymentStatusViewer.Status`: the progress of `d`, or why the rollout failed.
pub fn progress(d: &Deployment, want_revision: i64) -> Result<Progress> {
    let name = &d.metadata.name;
    if want_revision > 0 {
        let running = revision(&d.metadata)?;
        if running != want_revision {
            bail!("desired revision ({want_revision}) is different from the running revision ({running})");
        }
    }
    let unset = DeploymentStatus::default();
    let status = d.status.as_ref().unwrap_or(&unset);
    if d.metadata.generation.unwrap_or(0) > status.observed_generation.unwrap_or(0) {
        return Ok(Progress::Waiting(
            "Waiting for deployment spec update to be observed...".into(),
        ));
    }
    let deadline_exceeded = status.conditions.iter().any(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if deadline_exceeded {
        bail!("deployment {name:?} exceeded its progress deadline");
    }
    let replicas = status.replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let waiting = |what: String| {
        Ok(Progress::Waiting(format!(
            "Waiting for deployment {name:?} rollout to finish: {what}..."
        )))
    };
    match d.spec.replicas {
        Some(want) if updated < want => waiting(format!(
            "{updated} out of {want} new replicas have been updated"
        )),
        _ if replicas > updated => waiting(format!(
            "{} old replicas are pending termination",
            replicas - updated
        )),
        _ if available < updated => waiting(format!(
            "{available} of {updated} updated replicas are available"
        )),
        _ => Ok(Progress::Complete(format!(
            "deployment {name:?} successfully rolled out"
        ))),
    }
}

pub async fn run(kubeconfig: Option<&Path>, args: StatusArgs) -> Result<ExitCode> {
    let t = Target::open(kubeconfig, &args.target, "status viewer")?;
    let wait = follow(&t, args.revision, args.watch);
    if args.timeout.is_zero() {
        wait.await?;
        return Ok(ExitCode::SUCCESS);
    }
    match tokio::time::timeout(args.timeout, wait).await {
        Ok(done) => done.map(|()| ExitCode::SUCCESS),
        Err(_) => {
            eprintln!("error: timed out waiting for the condition");
            Ok(ExitCode::from(TIMED_OUT))
        }
    }
}

/// Prints each new progress message; remembers the last one so a message is printed once.
struct Reporter {
    want_revision: i64,
    last: Option<String>,
}

impl Reporter {
    /// Report `d`; true when its rollout is complete.
    fn observe(&mut self, d: &Deployment) -> Result<bool> {
        let (message, complete) = match progress(d, self.want_revision)? {
            Progress::Waiting(m) => (m, false),
            Progress::Complete(m) => (m, true),
        };
        if self.last.as_deref() != Some(message.as_str()) {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{message}")?;
            out.flush()?;
            self.last = Some(message);
        }
        Ok(complete)
    }
}

/// How one watch connection ended.
enum WatchEnd {
    Complete,
    /// The server closed it; resume from this resourceVersion.
    Closed(String),
    /// The resourceVersion is too old (410): list again.
    Expired,
}

/// A decoded watch event.
enum Event {
    Changed(Box<Deployment>),
    Deleted,
    Bookmark(String),
    Expired,
    Failed(String),
}

fn classify(mut ev: Value) -> Result<Event> {
    let object = ev["object"].take();
    Ok(match ev["type"].as_str() {
        Some("ADDED" | "MODIFIED") => Event::Changed(Box::new(decode(object)?)),
        Some("DELETED") => Event::Deleted,
        Some("BOOKMARK") => Event::Bookmark(
            object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
        Some("ERROR") if object["code"].as_u64() == Some(410) => Event::Expired,
        Some("ERROR") => Event::Failed(object["message"].as_str().unwrap_or("error").into()),
        other => Event::Failed(format!("unexpected watch event type {other:?}")),
    })
}

/// Report the rollout until it completes (or once, without `watch`).
async fn follow(t: &Target, want_revision: i64, watch: bool) -> Result<()> {
    let mut reporter = Reporter {
        want_revision,
        last: None,
    };
    let mut resume_from: Option<String> = None;
    loop {
        let rv = match resume_from.take() {
            Some(rv) => rv,
            None => {
                let (d, rv) = list(t).await?;
                if reporter.observe(&d)? || !watch {
                    return Ok(());
                }
                rv
            }
        };
        match watch_from(t, rv, &mut reporter).await? {
            WatchEnd::Complete => return Ok(()),
            WatchEnd::Closed(rv) => resume_from = Some(rv),
            WatchEnd::Expired => {}
        }
    }
}

fn query(t: &Target, extra: &[(&str, &str)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("fieldSelector", &format!("metadata.name={}", t.obj.name));
    for (k, v) in extra {
        q.append_pair(k, v);
    }
    format!("{}?{}", t.obj.info.collection_path(Some(&t.ns)), q.finish())
}

/// The deployment and the list's resourceVersion to watch from.
async fn list(t: &Target) -> Result<(Deployment, String)> {
    let mut list = t.client.get(&query(t, &[])).await?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let Some(item) = list["items"].as_array_mut().and_then(|i| i.pop()) else {
        // The server's own NotFound error, as kubectl prints it.
        t.client.get(&t.path()).await?;
        bail!("{} {:?} not found", t.obj.info.group_resource(), t.obj.name);
    };
    Ok((decode(item)?, rv))
}

async fn watch_from(t: &Target, mut rv: String, reporter: &mut Reporter) -> Result<WatchEnd> {
    let path = query(
        t,
        &[
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", &rv),
        ],
    );
    let mut events = match t.client.watch(&path, None).await {
        Ok(events) => events,
        Err(e) if e.code() == Some(410) => return Ok(WatchEnd::Expired),
        Err(e) => return Err(e.into()),
    };
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            // The connection broke: reconnect from what was seen.
            Err(ClientError::Unreachable { .. }) => break,
            Err(e) => return Err(e.into()),
        };
        match classify(ev)? {
            Event::Changed(d) => {
                if let Some(v) = &d.metadata.resource_version {
                    rv.clone_from(v);
                }
                if reporter.observe(&d)? {
                    return Ok(WatchEnd::Complete);
                }
            }
            Event::Bookmark(v) if !v.is_empty() => rv = v,
            Event::Bookmark(_) => {}
            Event::Deleted => bail!("object has been deleted"),
            Event::Expired => return Ok(WatchEnd::Expired),
            Event::Failed(message) => bail!("watching {}: {message}", t.obj.display()),
        }
    }
    Ok(WatchEnd::Closed(rv))
}

#[cfg(test)]
mod tests {
    use super::super::tests::deployment;
    use super::*;
    use serde_json::json;

    fn at(status: Value) -> Deployment {
        deployment(json!({"status": status}))
    }

    fn waiting(m: &str) -> Progress {
        Progress::Waiting(format!(
            "Waiting for deployment \"web\" rollout to finish: {m}..."
        ))
    }

    #[test]
    fn reports_like_kubectl() {
        let observed = |extra: Value| {
            let mut s = json!({"observedGeneration": 1});
            s.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            progress(&at(s), 0).unwrap()
        };
        assert_eq!(
            progress(&at(json!({})), 0).unwrap(),
            Progress::Waiting("Waiting for deployment spec update to be observed...".into())
        );
        assert_eq!(
            observed(json!({"replicas": 3, "updatedReplicas": 1})),
            waiting("1 out of 3 new replicas have been updated")
        );
        assert_eq!(
            observed(json!({"replicas": 5, "updatedReplicas": 3})),
            waiting("2 old replicas are pending termination")
        );
        assert_eq!(
            observed(json!({"replicas": 3, "updatedReplicas": 3, "availableReplicas": 2})),
            waiting("2 of 3 updated replicas are available")
        );
        assert_eq!(
            observed(json!({"replicas": 3, "updatedReplicas": 3, "availableReplicas": 3})),
            Progress::Complete("deployment \"web\" successfully rolled out".into())
        );
    }

    #[test]
    fn scaled_to_zero_is_complete() {
        let d = deployment(json!({"spec": {"replicas": 0}, "status": {"observedGeneration": 1}}));
        assert_eq!(
            progress(&d, 0).unwrap(),
            Progress::Complete("deployment \"web\" successfully rolled out".into())
        );
    }

    #[test]
    fn fails_past_the_progress_deadline() {
        let d = at(json!({"observedGeneration": 1, "conditions": [
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ]}));
        assert_eq!(
            progress(&d, 0).unwrap_err().to_string(),
            "deployment \"web\" exceeded its progress deadline"
        );
        // Not yet observed: the old condition does not count.
        let mut newer = d.clone();
        newer.metadata.generation = Some(2);
        assert!(matches!(progress(&newer, 0), Ok(Progress::Waiting(_))));
    }

    #[test]
    fn checks_the_revision() {
        let d = deployment(json!({
            "metadata": {"annotations": {"deployment.kubernetes.io/revision": "3"}},
            "status": {"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3,
                       "availableReplicas": 3}
        }));
        assert!(matches!(progress(&d, 3), Ok(Progress::Complete(_))));
        assert_eq!(
            progress(&d, 2).unwrap_err().to_string(),
            "desired revision (2) is different from the running revision (3)"
        );
        assert_eq!(
            progress(&at(json!({})), 1).unwrap_err().to_string(),
            "desired revision (1) is different from the running revision (0)"
        );
    }

    #[test]
    fn classifies_watch_events() {
        let d = serde_json::to_value(deployment(json!({}))).unwrap();
        assert!(matches!(
            classify(json!({"type": "MODIFIED", "object": d})),
            Ok(Event::Changed(_))
        ));
        assert!(matches!(
            classify(json!({"type": "DELETED", "object": d})),
            Ok(Event::Deleted)
        ));
        assert!(matches!(
            classify(json!({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "42"}}})),
            Ok(Event::Bookmark(rv)) if rv == "42"
        ));
        assert!(matches!(
            classify(json!({"type": "ERROR", "object": {"kind": "Status", "code": 410}})),
            Ok(Event::Expired)
        ));
        assert!(matches!(
            classify(json!({"type": "ERROR", "object": {"code": 500, "message": "boom"}})),
            Ok(Event::Failed(m)) if m == "boom"
        ));
    }
}
