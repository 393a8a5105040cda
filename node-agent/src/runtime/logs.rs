//! Container logs: every line a component writes to stdout/stderr is timestamped and kept in a
//! bounded in-memory ring (for `logs`, `logs --tail` and `logs -f`) and appended to a file that
//! rotates at a size limit (one previous file kept), CRI-style:
//! `2026-11-24T19:50:19.123456789Z stdout F text`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// A line longer than this is split (bounds the partial-line buffer a guest can grow).
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogLine {
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub stream: Stream,
    pub text: String,
}

impl LogLine {
    /// The line as `kubectl logs` shows it, optionally with its RFC 3339 timestamp.
    pub fn render(&self, timestamps: bool) -> String {
        if timestamps {
            format!(
                "{} {}\n",
                self.time.to_rfc3339_opts(SecondsFormat::Nanos, true),
                self.text
            )
        } else {
            format!("{}\n", self.text)
        }
    }
}

/// Limits of one container's log.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// Bytes of text kept in memory.
    pub ring_bytes: usize,
    /// Size at which the file rotates.
    pub file_bytes: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            ring_bytes: 256 * 1024,
            file_bytes: 10 * 1024 * 1024,
        }
    }
}

struct Inner {
    lines: VecDeque<LogLine>,
    bytes: usize,
    next_seq: u64,
    /// Opened on the first line: an idle container holds no file descriptor.
    file: Option<File>,
    file_len: u64,
    /// Opening failed once (warned): keep the log in memory only.
    file_failed: bool,
    closed: bool,
}

/// The log of one container (across its restarts, like a kubelet's current log).
pub struct ContainerLog {
    inner: Mutex<Inner>,
    notify: Notify,
    path: Option<PathBuf>,
    limits: LogLimits,
}

impl ContainerLog {
    /// `path`: the log file (its parent must exist); `None` keeps logs in memory only.
    pub fn new(path: Option<PathBuf>, limits: LogLimits) -> Arc<ContainerLog> {
        Arc::new(ContainerLog {
            inner: Mutex::new(Inner {
                lines: VecDeque::new(),
                bytes: 0,
                next_seq: 0,
                file: None,
                file_len: 0,
                file_failed: false,
                closed: false,
            }),
            notify: Notify::new(),
            path,
            limits,
        })
    }

    /// Appends one line (without its newline).
    pub fn push(&self, stream: Stream, text: &[u8]) {
        let text = String::from_utf8_lossy(text).into_owned();
        let time = Utc::now();
        let mut g = self.inner.lock().expect("log lock");
        let seq = g.next_seq;
        g.next_seq += 1;
        if self.path.is_some() && !g.file_failed {
            let rec = format!(
                "{} {} F {}\n",
                time.to_rfc3339_opts(SecondsFormat::Nanos, true),
                stream.as_str(),
                text
            );
            self.write_file(&mut g, rec.as_bytes());
        }
        g.bytes += text.len();
        g.lines.push_back(LogLine {
            seq,
            time,
            stream,
            text,
        });
        while g.bytes > self.limits.ring_bytes && g.lines.len() > 1 {
            if let Some(old) = g.lines.pop_front() {
                g.bytes -= old.text.len();
            }
        }
        drop(g);
        self.notify.notify_waiters();
    }

    fn write_file(&self, g: &mut Inner, rec: &[u8]) {
        let Some(path) = &self.path else { return };
        if g.file.is_none() {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => {
                    g.file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    g.file = Some(f);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open the container log file; keeping logs in memory only");
                    g.file_failed = true;
                    return;
                }
            }
        }
        if g.file_len + rec.len() as u64 > self.limits.file_bytes {
            if let Some(p) = &self.path {
                let rotated = p.with_extension("log.1");
                g.file = None;
                let _ = std::fs::rename(p, &rotated);
                g.file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok();
                g.file_len = 0;
            }
        }
        if let Some(f) = g.file.as_mut() {
            if f.write_all(rec).is_ok() {
                g.file_len += rec.len() as u64;
            }
        }
    }

    /// The last `tail` lines kept (all kept lines if `None`).
    pub fn snapshot(&self, tail: Option<usize>) -> Vec<LogLine> {
        let g = self.inner.lock().expect("log lock");
        let skip = tail.map_or(0, |t| g.lines.len().saturating_sub(t));
        g.lines.iter().skip(skip).cloned().collect()
    }

    /// Lines with `seq >= from` (the oldest kept ones if `from` fell out of the ring), and
    /// whether the log is closed (the pod is gone).
    pub fn since(&self, from: u64) -> (Vec<LogLine>, bool) {
        let g = self.inner.lock().expect("log lock");
        let lines = g.lines.iter().filter(|l| l.seq >= from).cloned().collect();
        (lines, g.closed)
    }

    /// Sequence number the next line will get.
    pub fn next_seq(&self) -> u64 {
        self.inner.lock().expect("log lock").next_seq
    }

    /// Waits until a line after `from` exists or the log closes.
    pub async fn wait_after(&self, from: u64) {
        loop {
            let notified = self.notify.notified();
            {
                let g = self.inner.lock().expect("log lock");
                if g.next_seq > from || g.closed {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Marks the log finished: followers see the end of the stream.
    pub fn close(&self) {
        self.inner.lock().expect("log lock").closed = true;
        self.notify.notify_waiters();
    }

    /// A wasi stdout/stderr that writes into this log.
    pub fn sink(self: &Arc<Self>, stream: Stream) -> LogSink {
        LogSink {
            log: self.clone(),
            stream,
        }
    }
}

/// `StdoutStream` for wasmtime-wasi.
pub struct LogSink {
    log: Arc<ContainerLog>,
    stream: Stream,
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            log: self.log.clone(),
            stream: self.stream,
            partial: Vec::new(),
        })
    }
}

struct LineWriter {
    log: Arc<ContainerLog>,
    stream: Stream,
    partial: Vec<u8>,
}

impl LineWriter {
    fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            match buf.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&buf[..i]);
                    self.emit();
                    buf = &buf[i + 1..];
                }
                None => {
                    let room = MAX_LINE - self.partial.len();
                    let take = room.min(buf.len());
                    self.partial.extend_from_slice(&buf[..take]);
                    buf = &buf[take..];
                    if self.partial.len() >= MAX_LINE {
                        self.emit();
                    }
                }
            }
        }
    }

    fn emit(&mut self) {
        let mut line = std::mem::take(&mut self.partial);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        self.log.push(self.stream, &line);
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.emit();
        }
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.feed(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn lines_are_split_bounded_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let log = ContainerLog::new(
            Some(path.clone()),
            LogLimits {
                ring_bytes: 100,
                file_bytes: 400,
            },
        );
        let mut w = Box::into_pin(log.sink(Stream::Stdout).async_stream());
        w.write_all(b"hello\nwor").await.unwrap();
        w.write_all(b"ld\r\n").await.unwrap();
        let got: Vec<String> = log.snapshot(None).into_iter().map(|l| l.text).collect();
        assert_eq!(got, ["hello", "world"]);
        for i in 0..50 {
            w.write_all(format!("line {i}\n").as_bytes()).await.unwrap();
        }
        let kept = log.snapshot(None);
        assert!(kept.iter().map(|l| l.text.len()).sum::<usize>() <= 100);
        assert_eq!(kept.last().unwrap().text, "line 49");
        assert_eq!(log.snapshot(Some(2)).len(), 2);
        assert!(path.with_extension("log.1").exists(), "file rotated");
        assert!(std::fs::metadata(&path).unwrap().len() <= 400);
        // An endless line is cut at MAX_LINE.
        let log = ContainerLog::new(None, LogLimits::default());
        let mut w = Box::into_pin(log.sink(Stream::Stderr).async_stream());
        w.write_all(&vec![b'x'; MAX_LINE * 2 + 5]).await.unwrap();
        drop(w);
        let tail = log.snapshot(Some(3));
        assert_eq!(tail[0].text.len(), MAX_LINE);
        assert_eq!(tail[2].text.len(), 5);
    }
}
