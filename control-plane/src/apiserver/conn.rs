//! Connection lifetimes of the API server: the deadlines that end a connection (and free its
//! `max_connections` permit) once its client has gone quiet — TLS handshake, the first
//! request's header, a header begun on a kept-alive connection, keep-alive idleness, a write
//! the client never accepts — plus TCP and HTTP/2 keepalive. A connection with a request in
//! flight (a watch being served) is never idle, however long it lasts.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Body;

/// How long a client has to complete the TLS handshake, from the TCP accept (Go's
/// `http.Transport.TLSHandshakeTimeout`, which kubectl and client-go use, is also 10 s).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has, after the TLS handshake, to send its first request's complete
/// header; and on a kept-alive HTTP/1 connection, to complete a header once its first byte
/// arrived. Real clients send the header in one write right after connecting, so this only
/// ends connections that were opened and left (or dribbled, slowloris-style). Go's
/// `ReadHeaderTimeout`; kube-apiserver sets 32 s, we take 10 s like the handshake.
pub const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may stay open with no request in flight after its last response
/// (HTTP/1 keep-alive and HTTP/2 alike): kube-apiserver's `IdleTimeout`, which is also the
/// idle timeout of the clients' own connection pools (Go's `http.DefaultTransport`, reqwest).
/// A watch is a request in flight: it is never cut by this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a write to the client may make no progress at all (the client's TCP window
/// stays closed: it stopped reading) before the connection is dropped, whatever it is
/// serving — otherwise a client that asks for a large list or a busy watch and never reads
/// it keeps its connection permit forever. nginx's `send_timeout` is also 60 s.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// After the idle timeout, how long a connection may take to close gracefully (an HTTP/2
/// GOAWAY, a request that raced it) before it is dropped.
pub(super) const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// HTTP/2: a PING after this long without a frame from the client (client-go's
/// `ReadIdleTimeout` is also 30 s)...
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection is closed if it is not answered within this (client-go's
/// `PingTimeout`). Ends HTTP/2 connections, watches included, whose peer vanished.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// TCP keepalive: the first probe after this long without traffic, then one every
/// [`TCP_KEEPALIVE_INTERVAL`], and the kernel resets the connection after
/// [`TCP_KEEPALIVE_RETRIES`] unanswered ones — a peer that vanished (powered off,
/// partitioned) is noticed within two minutes, also on a quiet HTTP/1 watch.
/// (kube-apiserver probes every 3 min; Go's default is 15 s.)
pub const TCP_KEEPALIVE_TIME: Duration = Duration::from_secs(60);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub const TCP_KEEPALIVE_RETRIES: u32 = 4;

/// How long a request body may take to arrive in full (kube-apiserver's default
/// `--request-timeout` for requests that are not long-running, 60 s): a client trickling its
/// body holds a connection permit no longer than that, then gets 504 `Timeout`.
pub const REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// The per-connection deadlines (the constants above by default; shorter in tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// [`TLS_HANDSHAKE_TIMEOUT`].
    pub tls_handshake: Duration,
    /// [`REQUEST_HEADER_TIMEOUT`].
    pub request_header: Duration,
    /// [`IDLE_TIMEOUT`].
    pub idle: Duration,
    /// [`WRITE_STALL_TIMEOUT`].
    pub write_stall: Duration,
    /// [`REQUEST_BODY_TIMEOUT`].
    pub request_body: Duration,
}

impl Default for ConnTimeouts {
    fn default() -> Self {
        ConnTimeouts {
            tls_handshake: TLS_HANDSHAKE_TIMEOUT,
            request_header: REQUEST_HEADER_TIMEOUT,
            idle: IDLE_TIMEOUT,
            write_stall: WRITE_STALL_TIMEOUT,
            request_body: REQUEST_BODY_TIMEOUT,
        }
    }
}

/// Turn on TCP keepalive on an accepted connection.
pub(super) fn set_tcp_keepalive(tcp: &TcpStream) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_TIME)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&ka)
}

/// Why a connection's deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expiry {
    /// No complete request header in time (none at all on a new connection).
    RequestHeader,
    /// No request for the idle timeout after the last response.
    Idle,
    /// The client accepted none of our bytes for the write-stall timeout.
    WriteStall,
}

/// What a connection has been doing, for its deadlines.
struct Activity {
    /// When the TLS handshake completed.
    opened: Instant,
    /// Requests started so far.
    requests: u64,
    /// Requests whose response body has not been sent (or dropped) yet.
    in_flight: usize,
    /// Whether the connection speaks HTTP/2 (known from its first request).
    http2: bool,
    /// When `in_flight` last dropped to 0.
    idle_since: Instant,
    /// When the first bytes arrived while no request was in flight (a header begun).
    read_while_idle: Option<Instant>,
    /// Since when writes to the socket have been pending without any progress.
    write_blocked_since: Option<Instant>,
}

impl Activity {
    fn deadline(&self, t: &ConnTimeouts) -> Option<(Instant, Expiry)> {
        let mut next: Option<(Instant, Expiry)> = None;
        let mut consider = |at: Instant, why: Expiry| {
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, why));
            }
        };
        if let Some(since) = self.write_blocked_since {
            consider(since + t.write_stall, Expiry::WriteStall);
        }
        if self.in_flight == 0 {
            if self.requests == 0 {
                consider(self.opened + t.request_header, Expiry::RequestHeader);
            } else {
                consider(self.idle_since + t.idle, Expiry::Idle);
                // HTTP/2 reads frames (PING acks, WINDOW_UPDATEs) between requests too; its
                // header frames are bounded by h2 itself.
                if let (Some(at), false) = (self.read_while_idle, self.http2) {
                    consider(at + t.request_header, Expiry::RequestHeader);
                }
            }
        }
        next
    }
}

/// The deadlines of one connection, fed by [`TrackedIo`] (bytes read and written) and by
/// [`InFlight`] guards (requests).
pub(super) struct ConnTracker {
    timeouts: ConnTimeouts,
    activity: Mutex<Activity>,
    /// Set while no request is in flight and no byte has been read since: the next read
    /// marks a header begun (so reads cost an atomic load, not a lock, otherwise).
    idle_read_armed: AtomicBool,
    changed: Notify,
}

impl ConnTracker {
    pub(super) fn new(timeouts: ConnTimeouts) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(ConnTracker {
            timeouts,
            activity: Mutex::new(Activity {
                opened: now,
                requests: 0,
                in_flight: 0,
                http2: false,
                idle_since: now,
                read_while_idle: None,
                write_blocked_since: None,
            }),
            idle_read_armed: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    fn activity(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The TLS handshake completed: the first request's header is due from now.
    pub(super) fn handshake_done(&self) {
        self.activity().opened = Instant::now();
        self.changed.notify_one();
    }

    /// A request arrived; the connection is busy until the returned guard (moved into the
    /// response body) is dropped.
    pub(super) fn request_started(self: &Arc<Self>, http2: bool) -> InFlight {
        self.idle_read_armed.store(false, Ordering::Relaxed);
        let mut a = self.activity();
        a.requests += 1;
        a.in_flight += 1;
        a.http2 = http2;
        a.read_while_idle = None;
        drop(a);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    fn on_read(&self) {
        if self.idle_read_armed.load(Ordering::Relaxed)
            && self.idle_read_armed.swap(false, Ordering::Relaxed)
        {
            let mut a = self.activity();
            if a.in_flight == 0 && a.read_while_idle.is_none() {
                a.read_while_idle = Some(Instant::now());
                drop(a);
                self.changed.notify_one();
            }
        }
    }

    fn set_write_blocked(&self, blocked: bool) {
        let mut a = self.activity();
        a.write_blocked_since = blocked.then(Instant::now);
        drop(a);
        if blocked {
            self.changed.notify_one();
        }
    }

    /// Resolves when one of the connection's deadlines has passed.
    pub(super) async fn expired(&self) -> Expiry {
        loop {
            // `notify_one` leaves a permit when nobody waits, so a change between reading
            // the deadline and awaiting is not lost.
            let changed = self.changed.notified();
            let next = self.activity().deadline(&self.timeouts);
            match next {
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// One request in flight on a connection; dropped with its response body.
pub(super) struct InFlight(Arc<ConnTracker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let t = &self.0;
        let mut a = t.activity();
        a.in_flight -= 1;
        if a.in_flight == 0 {
            a.idle_since = Instant::now();
            a.read_while_idle = None;
            t.idle_read_armed.store(true, Ordering::Relaxed);
            drop(a);
            t.changed.notify_one();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is done.
pub(super) struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl TrackedBody {
    pub(super) fn new(inner: Body, in_flight: InFlight) -> Self {
        TrackedBody {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The TCP stream under TLS, reporting reads and write stalls to its [`ConnTracker`].
pub(super) struct TrackedIo {
    inner: TcpStream,
    tracker: Arc<ConnTracker>,
    write_blocked: bool,
}

impl TrackedIo {
    pub(super) fn new(inner: TcpStream, tracker: Arc<ConnTracker>) -> Self {
        TrackedIo {
            inner,
            tracker,
            write_blocked: false,
        }
    }

    fn wrote(&mut self, r: &Poll<io::Result<usize>>) {
        let blocked = match r {
            Poll::Pending => true,
            Poll::Ready(Ok(n)) if *n > 0 => false,
            // Errors end the connection anyway; a zero-length write says nothing.
            Poll::Ready(_) => return,
        };
        if blocked != self.write_blocked {
            self.write_blocked = blocked;
            self.tracker.set_write_blocked(blocked);
        }
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.tracker.on_read();
        }
        r
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Duration = Duration::from_secs(2);
    const IDLE: Duration = Duration::from_secs(5);
    const STALL: Duration = Duration::from_secs(3);

    fn tracker() -> Arc<ConnTracker> {
        ConnTracker::new(ConnTimeouts {
            tls_handshake: Duration::from_secs(10),
            request_header: HEADER,
            idle: IDLE,
            write_stall: STALL,
            request_body: REQUEST_BODY_TIMEOUT,
        })
    }

    /// The next deadline, checked to be `after` from some instant in `[lo, now]`.
    fn deadline_after(t: &ConnTracker, lo: Instant, after: Duration) -> Expiry {
        let (at, why) = t.activity().deadline(&t.timeouts).expect("a deadline");
        assert!(
            at >= lo + after && at <= Instant::now() + after,
            "{why:?} deadline not {after:?} after the event"
        );
        why
    }

    fn no_deadline(t: &ConnTracker) -> bool {
        t.activity().deadline(&t.timeouts).is_none()
    }

    #[test]
    fn a_new_connection_must_send_a_request_header_in_time() {
        let t = tracker();
        let lo = Instant::now();
        t.handshake_done();
        assert_eq!(deadline_after(&t, lo, HEADER), Expiry::RequestHeader);
        // Bytes of a first header do not extend it.
        t.on_read();
        assert_eq!(deadline_after(&t, lo, HEADER), Expiry::RequestHeader);
    }

    #[test]
    fn a_request_in_flight_has_no_deadline_then_idleness_does() {
        let t = tracker();
        t.handshake_done();
        let a = t.request_started(false);
        let b = t.request_started(false);
        assert!(no_deadline(&t), "a watch being served is never idle");
        drop(a);
        assert!(no_deadline(&t), "still one in flight");
        let lo = Instant::now();
        drop(b);
        assert_eq!(deadline_after(&t, lo, IDLE), Expiry::Idle);
    }

    #[test]
    fn a_header_begun_on_an_idle_http1_connection_must_complete_in_time() {
        let t = tracker();
        drop(t.request_started(false));
        let lo = Instant::now();
        t.on_read();
        assert_eq!(deadline_after(&t, lo, HEADER), Expiry::RequestHeader);
        // The request it began: busy again, then idle from its end.
        let req = t.request_started(false);
        assert!(no_deadline(&t));
        let lo = Instant::now();
        drop(req);
        assert_eq!(deadline_after(&t, lo, IDLE), Expiry::Idle);

        // HTTP/2 reads frames (PING acks) between requests: only idleness counts there.
        let t = tracker();
        let lo = Instant::now();
        drop(t.request_started(true));
        t.on_read();
        assert_eq!(deadline_after(&t, lo, IDLE), Expiry::Idle);
    }

    #[test]
    fn a_write_without_progress_ends_even_a_busy_connection() {
        let t = tracker();
        let _req = t.request_started(false);
        let lo = Instant::now();
        t.set_write_blocked(true);
        assert_eq!(deadline_after(&t, lo, STALL), Expiry::WriteStall);
        t.set_write_blocked(false);
        assert!(no_deadline(&t), "progress resets the stall");
    }

    #[tokio::test]
    async fn expired_wakes_for_an_earlier_deadline() {
        let t = ConnTracker::new(ConnTimeouts {
            tls_handshake: Duration::from_secs(10),
            request_header: Duration::from_millis(50),
            idle: Duration::from_secs(3600),
            write_stall: Duration::from_secs(3600),
            request_body: REQUEST_BODY_TIMEOUT,
        });
        drop(t.request_started(false));
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.expired().await }
        });
        // The watchdog sleeps towards the idle deadline; a header begun moves it earlier.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        t.on_read();
        let why = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken for the header deadline")
            .unwrap();
        assert_eq!(why, Expiry::RequestHeader);
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
