//! The agent's own HTTP endpoint (the kubelet's port 10250 role), on the node IP:
//! `GET /containerLogs/{namespace}/{pod}/{container}?follow=&tailLines=&timestamps=&limitBytes=`
//! and `GET /healthz`. The API server proxies `pods/{name}/log` here and authenticates with the
//! cluster token (compared in constant time); every other caller needs the same bearer token,
//! and the agent refuses to start without one. A connection must send its request head within
//! [`HEADER_READ_TIMEOUT`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::runtime::logs::ContainerLog;
use crate::AgentCtx;

type Body = BoxBody<Bytes, Infallible>;

/// Concurrent connections the endpoint accepts (each `-f` follower holds one).
const MAX_CONNECTIONS: usize = 256;

/// How long a connection may take to send a request head (also between keep-alive requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(ctx: Arc<AgentCtx>, listener: TcpListener, shutdown: CancellationToken) {
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let sock = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "agent endpoint accept failed");
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client must send its request head within HEADER_READ_TIMEOUT (the permit it
            // holds is one of MAX_CONNECTIONS).
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(sock), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed
/// token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ x);
    }
    diff == 0
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(msg)).boxed())
        .expect("valid response")
}

async fn handle(ctx: &AgentCtx, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok".into());
    }
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), ctx.token.as_bytes())) {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized\n".into());
    }
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["containerLogs", ns, pod, container] => {
            let Some(log) = ctx.logs.get(ns, pod, container) else {
                let known = ctx.logs.containers(ns, pod);
                let msg = if known.is_empty() {
                    format!("pod {ns}/{pod} is not running on node {}\n", ctx.cfg.name)
                } else {
                    format!("container {container:?} is not valid for pod {pod}: choose one of {known:?}\n")
                };
                return text(StatusCode::NOT_FOUND, msg);
            };
            let opts = LogOptions::parse(&query);
            match opts {
                Ok(o) => logs_response(log, o),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => text(StatusCode::NOT_FOUND, format!("no handler for {path}\n")),
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LogOptions {
    pub follow: bool,
    pub tail: Option<usize>,
    pub timestamps: bool,
    pub limit_bytes: Option<usize>,
}

impl LogOptions {
    pub fn parse(q: &HashMap<String, String>) -> Result<LogOptions, String> {
        let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
        let num = |k: &str| -> Result<Option<i64>, String> {
            q.get(k)
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| format!("{k}: must be an integer (got {v:?})"))
                })
                .transpose()
        };
        let tail = num("tailLines")?;
        let limit = num("limitBytes")?;
        if limit.is_some_and(|l| l <= 0) {
            return Err("limitBytes: must be greater than 0".into());
        }
        Ok(LogOptions {
            follow: flag("follow"),
            // Negative tailLines means "all", as kubectl sends -1.
            tail: tail.filter(|t| *t >= 0).map(|t| t as usize),
            timestamps: flag("timestamps"),
            limit_bytes: limit.map(|l| l as usize),
        })
    }
}

fn logs_response(log: Arc<ContainerLog>, o: LogOptions) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut sent = 0usize;
        let mut send = |s: String| {
            let tx = tx.clone();
            let mut b = Bytes::from(s);
            if let Some(limit) = o.limit_bytes {
                let left = limit.saturating_sub(sent);
                b.truncate(left);
            }
            sent += b.len();
            async move { !b.is_empty() && tx.send(b).await.is_ok() }
        };
        let first = log.snapshot(o.tail);
        let mut next = first.last().map_or_else(|| log.next_seq(), |l| l.seq + 1);
        for l in first {
            if !send(l.render(o.timestamps)).await {
                return;
            }
        }
        if !o.follow {
            return;
        }
        loop {
            tokio::select! {
                _ = log.wait_after(next) => {}
                _ = tx.closed() => return,
            }
            let (lines, closed) = log.since(next);
            for l in lines {
                next = l.seq + 1;
                if !send(l.render(o.timestamps)).await {
                    return;
                }
            }
            if closed {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; charset=utf-8")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}
