//! Keep-alive HTTP/1.1 connections to endpoints on other nodes (`podIP:port`, served by that
//! node's agent). A pool per endpoint address, bounded; a request only goes to a pooled
//! connection that is idle, and it comes back unsent when the connection could not take it,
//! so the balancer can try another endpoint.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Mutex;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;
use wasmtime_wasi_http::WasiBody;

/// Idle-or-busy connections kept per endpoint; more concurrent requests open connections
/// that close after their exchange.
pub const MAX_POOLED_PER_ENDPOINT: usize = 128;

/// How long a connect to an endpoint may take before the next endpoint is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request got no response.
pub enum SendError {
    /// Nothing was sent (connect failed, or the connection refused the request before writing
    /// it): the request is returned.
    NotSent(Box<Request<WasiBody>>, String),
    /// The request (or part of it) was sent; the exchange failed.
    Failed(String),
}

#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<SocketAddrV4, Vec<SendRequest<WasiBody>>>>,
    /// The connection tasks, so shutdown can wait for them.
    tasks: TaskTracker,
}

impl Pool {
    /// An idle pooled connection to `addr` (closed ones are dropped on the way).
    fn checkout(&self, addr: SocketAddrV4) -> Option<SendRequest<WasiBody>> {
        let mut conns = self.conns.lock().expect("pool lock");
        let list = conns.get_mut(&addr)?;
        list.retain(|s| !s.is_closed());
        let idle = list.iter().position(SendRequest::is_ready);
        let sender = idle.map(|i| list.swap_remove(i));
        if list.is_empty() {
            conns.remove(&addr);
        }
        sender
    }

    /// Keeps `sender` for later requests (it becomes idle once its response is read).
    fn checkin(&self, addr: SocketAddrV4, sender: SendRequest<WasiBody>) {
        let mut conns = self.conns.lock().expect("pool lock");
        let list = conns.entry(addr).or_default();
        if list.len() < MAX_POOLED_PER_ENDPOINT {
            list.push(sender);
        }
    }

    /// Drops the pooled connections of endpoints not in `keep` (they left every Service).
    pub fn retain(&self, keep: &dyn Fn(&SocketAddrV4) -> bool) {
        self.conns
            .lock()
            .expect("pool lock")
            .retain(|addr, _| keep(addr));
    }

    /// Closes every pooled connection and waits (bounded) for their tasks.
    pub async fn shutdown(&self) {
        self.conns.lock().expect("pool lock").clear();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }

    async fn connect(&self, addr: SocketAddrV4) -> Result<SendRequest<WasiBody>, String> {
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(format!("connect {addr}: {e}")),
                Err(_) => {
                    return Err(format!(
                        "connect {addr}: timed out after {CONNECT_TIMEOUT:?}"
                    ))
                }
            };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake with {addr}: {e}"))?;
        self.tasks.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %addr, error = %e, "endpoint connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, `Host` set) to `addr` over a pooled or new connection.
    pub async fn send(
        &self,
        addr: SocketAddrV4,
        mut req: Request<WasiBody>,
    ) -> Result<Response<Incoming>, SendError> {
        // A connection can be closed by the server at the moment we write to it (the
        // keep-alive race; a pod shutting down closes idle connections). A request that was
        // not written is tried again; so is a bodiless safe one (GET, HEAD, OPTIONS) that was:
        // on the next pooled or a new connection, or, after a new connection failed, on
        // another endpoint. Anything else fails as it would through any proxy.
        let replayable = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
            && req.body().is_end_stream();
        loop {
            let (mut sender, reused) = match self.checkout(addr) {
                Some(s) => (s, true),
                None => match self.connect(addr).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err(SendError::NotSent(Box::new(req), e)),
                },
            };
            let copy = replayable.then(|| head_copy(&req));
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.checkin(addr, sender);
                    return Ok(resp);
                }
                Err(mut e) => match (e.take_message().or(copy), reused) {
                    // A pooled connection failed: the next pooled one, or a new one.
                    (Some(r), true) => req = r,
                    // A new connection failed (the endpoint is going away): another endpoint.
                    (Some(r), false) => {
                        return Err(SendError::NotSent(Box::new(r), e.into_error().to_string()))
                    }
                    (None, _) => return Err(SendError::Failed(e.into_error().to_string())),
                },
            }
        }
    }
}

/// A copy of a bodiless request.
fn head_copy(req: &Request<WasiBody>) -> Request<WasiBody> {
    use http_body_util::BodyExt;
    let mut r = Request::new(
        http_body_util::Empty::new()
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed_unsync(),
    );
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}
