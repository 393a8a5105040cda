//! Container logs: every line a component writes to stdout/stderr is timestamped and kept in a
//! bounded in-memory ring (for `logs`, `logs --tail` and `logs -f`) and appended to a file that
//! rotates at a size limit (one previous file kept), CRI-style:
//! `2026-11-24T19:50:19.123456789Z stdout F text`.
//!
//! Bounds: the ring charges each line its real size ([`LINE_OVERHEAD`] + its text's heap
//! bytes) and keeps at most [`LogLimits::ring_lines`] lines; the file is written by a bounded,
//! buffered writer task ([`FileLog`]), and a guest whose lines the writer has not caught up
//! with waits (its stdout is not writable) instead of queueing more.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// A line longer than this is split (bounds the partial-line buffer a guest can grow).
pub const MAX_LINE: usize = 16 * 1024;

/// What a kept line costs the ring besides its text's heap bytes: its slot in the ring (the
/// [`LogLine`]: sequence number, timestamp, stream and the `String` header). Without it an empty
/// line cost nothing and was never evicted: a guest printing newlines grew the agent's heap
/// without bound.
pub const LINE_OVERHEAD: usize = std::mem::size_of::<LogLine>();

/// Bytes a guest may hand over per `check-write` permit (wasi's `blocking-write-and-flush`
/// writes at most 4,096 at once): bounds what one stream queues past [`FILE_QUEUE_BYTES`].
const WRITE_PERMIT: usize = 4096;

/// File records formatted but not yet written past which the guest's stdout/stderr stops being
/// writable (`check-write` answers 0, `ready` waits for the writer). One stream can add at
/// most one [`WRITE_PERMIT`] of input beyond it (each input byte becomes at most one record:
/// the 41-byte prefix and newline, the byte, and its 8-byte queue entry).
const FILE_QUEUE_BYTES: usize = 256 * 1024;
/// What the file queue may hold at all. Guest writes wait for room below
/// [`FILE_QUEUE_BYTES`] and so never reach it; the agent's own lines about a container (a
/// failed request's error, pushed with [`ContainerLog::push`] without waiting) are dropped from
/// the file past it — counted, and reported by one line when the writer caught up — instead
/// of growing the queue while the disk stalls. The ring keeps them either way.
const FILE_QUEUE_HARD_BYTES: usize = 2 * FILE_QUEUE_BYTES;

/// The writer's buffer: a burst of short lines is one write syscall, not one per line.
const FILE_BUFFER: usize = 64 * 1024;

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

    /// The bytes this line holds in the ring: its slot plus its text's allocation.
    pub fn cost(&self) -> usize {
        LINE_OVERHEAD + self.text.capacity()
    }
}

/// Limits of one container's log.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// Bytes the kept lines take in memory ([`LogLine::cost`]: text plus a per-line overhead).
    pub ring_bytes: usize,
    /// Lines kept in memory, whatever their size.
    pub ring_lines: usize,
    /// Size at which the file rotates.
    pub file_bytes: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            ring_bytes: 256 * 1024,
            ring_lines: 4096,
            file_bytes: 10 * 1024 * 1024,
        }
    }
}

struct Inner {
    lines: VecDeque<LogLine>,
    /// Sum of the kept lines' [`LogLine::cost`].
    bytes: usize,
    next_seq: u64,
    closed: bool,
}

/// The log of one container (across its restarts, like a kubelet's current log).
pub struct ContainerLog {
    inner: Mutex<Inner>,
    notify: Notify,
    file: Option<Arc<FileLog>>,
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
                closed: false,
            }),
            notify: Notify::new(),
            file: path.map(|path| {
                Arc::new(FileLog {
                    path,
                    max_bytes: limits.file_bytes,
                    queue: Mutex::new(FileQueue::default()),
                    drained: Notify::new(),
                    out: Mutex::new(FileOut { file: None, len: 0 }),
                    failed: AtomicBool::new(false),
                })
            }),
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
        // Queued under the ring's lock: the file has the lines in `seq` order.
        if let Some(file) = &self.file {
            file.enqueue(time, stream, &text);
        }
        let line = LogLine {
            seq,
            time,
            stream,
            text,
        };
        g.bytes += line.cost();
        g.lines.push_back(line);
        while (g.bytes > self.limits.ring_bytes || g.lines.len() > self.limits.ring_lines)
            && g.lines.len() > 1
        {
            if let Some(old) = g.lines.pop_front() {
                g.bytes -= old.cost();
            }
        }
        drop(g);
        self.notify.notify_waiters();
    }

    /// Whether the file writer has room for more lines (always, without a file).
    fn writable(&self) -> bool {
        self.file.as_ref().is_none_or(|f| f.has_room())
    }

    /// Waits until [`Self::writable`].
    async fn wait_writable(&self) {
        let Some(f) = &self.file else { return };
        loop {
            let drained = f.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if f.has_room() {
                return;
            }
            drained.await;
        }
    }

    /// Waits until every line pushed so far is in the file (written and flushed).
    pub async fn flushed(&self) {
        let Some(f) = &self.file else { return };
        loop {
            let drained = f.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if f.idle() {
                return;
            }
            drained.await;
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

/// The log file of one container: lines are formatted into a bounded queue by the pushing
/// (guest's) task and written by one writer at a time on the blocking pool through a
/// [`BufWriter`], rotating per record so the file never exceeds its size limit.
struct FileLog {
    path: PathBuf,
    max_bytes: u64,
    queue: Mutex<FileQueue>,
    /// Notified whenever the writer finished a batch (room again) or went idle.
    drained: Notify,
    /// The open file; held by the running writer while it writes a batch.
    out: Mutex<FileOut>,
    /// Opening failed once (warned): keep the log in memory only.
    failed: AtomicBool,
}

#[derive(Default)]
struct FileQueue {
    /// Formatted records, back to back.
    buf: Vec<u8>,
    /// Where each record in `buf` ends.
    ends: Vec<usize>,
    /// Bytes of the batch the writer is writing now (still in memory).
    in_flight: usize,
    /// A writer is running (or about to): it takes whatever is queued before it stops.
    writing: bool,
    /// Records dropped since the queue last had room ([`FILE_QUEUE_HARD_BYTES`]).
    dropped: u64,
}

impl FileQueue {
    fn queued(&self) -> usize {
        self.buf.len() + self.ends.len() * std::mem::size_of::<usize>() + self.in_flight
    }
}

struct FileOut {
    /// Opened on the first line: an idle container holds no file descriptor.
    file: Option<BufWriter<File>>,
    len: u64,
}

impl FileLog {
    fn has_room(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
            || self.queue.lock().expect("log file queue").queued() < FILE_QUEUE_BYTES
    }

    fn idle(&self) -> bool {
        let q = self.queue.lock().expect("log file queue");
        !q.writing && q.ends.is_empty()
    }

    /// Queues one record and makes sure a writer runs.
    fn enqueue(self: &Arc<Self>, time: DateTime<Utc>, stream: Stream, text: &str) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let mut q = self.queue.lock().expect("log file queue");
        if q.queued() + text.len() + 64 > FILE_QUEUE_HARD_BYTES {
            q.dropped += 1;
            return;
        }
        if q.dropped > 0 {
            let dropped = std::mem::take(&mut q.dropped);
            let _ = writeln!(
                q.buf,
                "{} stderr F wasmctl: {dropped} log lines were not written to this file: the writer fell behind",
                time.to_rfc3339_opts(SecondsFormat::Nanos, true),
            );
            let end = q.buf.len();
            q.ends.push(end);
        }
        let _ = writeln!(
            q.buf,
            "{} {} F {}",
            time.to_rfc3339_opts(SecondsFormat::Nanos, true),
            stream.as_str(),
            text
        );
        let end = q.buf.len();
        q.ends.push(end);
        if q.writing {
            return;
        }
        q.writing = true;
        drop(q);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let me = self.clone();
                rt.spawn_blocking(move || me.drain());
            }
            // Outside the runtime (tools, tests): write on the caller's thread.
            Err(_) => self.drain(),
        }
    }

    /// The writer: writes batches until the queue is empty, then stops.
    fn drain(&self) {
        let mut out = self.out.lock().expect("log file");
        loop {
            let (buf, ends) = {
                let mut q = self.queue.lock().expect("log file queue");
                if q.ends.is_empty() {
                    q.writing = false;
                    break;
                }
                let buf = std::mem::take(&mut q.buf);
                let ends = std::mem::take(&mut q.ends);
                q.in_flight = buf.len() + ends.len() * std::mem::size_of::<usize>();
                (buf, ends)
            };
            if !self.failed.load(Ordering::Relaxed) {
                let mut start = 0;
                for end in ends {
                    self.write_record(&mut out, &buf[start..end]);
                    start = end;
                }
                if let Some(f) = out.file.as_mut() {
                    let _ = f.flush();
                }
            }
            self.queue.lock().expect("log file queue").in_flight = 0;
            self.drained.notify_waiters();
        }
        drop(out);
        self.drained.notify_waiters();
    }

    fn write_record(&self, out: &mut FileOut, rec: &[u8]) {
        let open = |path: &PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        };
        if out.file.is_none() {
            match open(&self.path) {
                Ok(f) => {
                    out.len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    out.file = Some(BufWriter::with_capacity(FILE_BUFFER, f));
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot open the container log file; keeping logs in memory only");
                    self.failed.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
        if out.len + rec.len() as u64 > self.max_bytes {
            let rotated = self.path.with_extension("log.1");
            if let Some(mut f) = out.file.take() {
                let _ = f.flush();
            }
            let _ = std::fs::rename(&self.path, &rotated);
            out.file = open(&self.path)
                .ok()
                .map(|f| BufWriter::with_capacity(FILE_BUFFER, f));
            out.len = 0;
        }
        if let Some(f) = out.file.as_mut() {
            if f.write_all(rec).is_ok() {
                out.len += rec.len() as u64;
            }
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
    /// Used by wasmtime-wasi only for WASIp3 (not enabled); WASIp2 guests get
    /// [`Self::p2_stream`].
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.line_writer())
    }

    /// The guest's stdout/stderr: a [`LogStream`] doing its work inside the guest's calls.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogStream {
            writer: self.line_writer(),
            permit: 0,
        })
    }
}

impl LogSink {
    fn line_writer(&self) -> LineWriter {
        LineWriter {
            log: self.log.clone(),
            stream: self.stream,
            partial: Vec::new(),
        }
    }
}

/// A WASIp2 `output-stream` into the log that splits and stores lines synchronously, inside
/// the guest's `write` call.
///
/// This is how the pod's CPU quota pays for its logging. wasmtime-wasi's default `p2_stream`
/// (`AsyncWriteStream`) hands every write to a separately spawned tokio task
/// (wasmtime-wasi 48.0.2 `src/p2/write_stream.rs`: `AsyncWriteStream::new` →
/// `crate::runtime::spawn(async move { w.work(writer).await })`), where the line splitting,
/// the ring and the file write ran outside any Store, on nobody's budget. Here `write` runs
/// on the guest's own task while its Store executes: the epoch keeps advancing by wall clock
/// meanwhile (one tick per `EPOCH_TICK`, runtime/mod.rs), and at the guest's next epoch
/// check its Store's deadline callback (runtime/pod.rs `new_store` → runtime/cpu.rs
/// `CpuGate::on_tick`) charges the tick to the pod's `PodBudget` (runtime/limits.rs
/// `charge_tick`) and parks the guest once its quota is spent, so a throttled pod logs no
/// faster than it runs. One call does a bounded amount of work (at most
/// one [`WRITE_PERMIT`]), so charging per tick at the next check loses at most a tick per call.
/// Only the file write itself runs on the blocking pool, and it cannot get ahead of the
/// guest: past [`FILE_QUEUE_BYTES`] queued, `check-write` answers 0 and `ready` waits for
/// the writer.
struct LogStream {
    writer: LineWriter,
    /// Bytes the last `check-write` allowed and not yet written.
    permit: usize,
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {
        self.writer.log.wait_writable().await;
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        match self.permit.checked_sub(bytes.len()) {
            Some(left) => self.permit = left,
            None => return Err(StreamError::trap("write exceeded the check-write permit")),
        }
        self.writer.feed(&bytes);
        Ok(())
    }

    /// Complete lines are stored as soon as they are written; a partial line stays partial
    /// (as in a pipe) until its newline, [`MAX_LINE`] or the stream's end.
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.permit = if self.writer.log.writable() {
            WRITE_PERMIT
        } else {
            0
        };
        Ok(self.permit)
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
                ring_bytes: 100 + 2 * LINE_OVERHEAD,
                file_bytes: 400,
                ..LogLimits::default()
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
        assert!(kept.iter().map(LogLine::cost).sum::<usize>() <= 100 + 2 * LINE_OVERHEAD);
        assert_eq!(kept.last().unwrap().text, "line 49");
        assert_eq!(log.snapshot(Some(2)).len(), 2);
        log.flushed().await;
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

    /// Item 3 (issue 11): an empty line used to cost the ring 0 bytes, so 10 million `"\n"`
    /// were all kept (~0.5 GB of `LogLine`s). Each line now costs its real size and the ring
    /// keeps at most `ring_lines`.
    #[test]
    fn empty_lines_are_charged_and_bounded() {
        let limits = LogLimits::default();
        let log = ContainerLog::new(None, limits);
        for round in 1..=10u64 {
            for _ in 0..1_000_000 {
                log.push(Stream::Stdout, b"");
            }
            let g = log.inner.lock().unwrap();
            let real: usize = g
                .lines
                .iter()
                .map(|l| std::mem::size_of::<LogLine>() + l.text.capacity())
                .sum();
            assert!(
                g.lines.len() <= limits.ring_lines,
                "{} lines kept after {round}M empty lines (cap {})",
                g.lines.len(),
                limits.ring_lines
            );
            assert_eq!(g.bytes, real, "the ring accounts the lines' real size");
            assert!(real <= limits.ring_bytes, "{real} bytes kept");
            // The ring's allocation stays bounded too (a VecDeque at most doubles).
            assert!(
                g.lines.capacity() <= 2 * limits.ring_lines.max(limits.ring_bytes / LINE_OVERHEAD)
            );
            assert_eq!(g.lines.back().unwrap().seq, round * 1_000_000 - 1);
        }
        // Longer lines are bounded by bytes before the line cap.
        let log = ContainerLog::new(None, limits);
        for _ in 0..100_000 {
            log.push(Stream::Stderr, &[b'x'; 200]);
        }
        let kept = log.snapshot(None);
        assert!(kept.iter().map(LogLine::cost).sum::<usize>() <= limits.ring_bytes);
        assert_eq!(kept.len(), limits.ring_bytes / (LINE_OVERHEAD + 200));
    }

    /// A guest's write is split and stored inside its own call (so its Store's CPU budget pays
    /// for it), and a guest cannot queue file writes faster than the writer writes them.
    #[tokio::test]
    async fn guest_writes_are_stored_in_the_call_and_file_writes_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let log = ContainerLog::new(Some(path.clone()), LogLimits::default());
        let mut out = log.sink(Stream::Stdout).p2_stream();
        assert_eq!(out.check_write().unwrap(), WRITE_PERMIT);
        out.write(Bytes::from_static(b"a\nb\npart")).unwrap();
        // No await in between: the lines are in the ring when `write` returns.
        let got: Vec<String> = log.snapshot(None).into_iter().map(|l| l.text).collect();
        assert_eq!(got, ["a", "b"]);
        log.flushed().await;

        // A stalled disk: the writer cannot take the file.
        let file = log.file.clone().unwrap();
        let stalled = file.out.lock().unwrap();
        let mut lines = 2u64;
        loop {
            let n = out.check_write().unwrap();
            if n == 0 {
                break;
            }
            out.write(Bytes::from(vec![b'\n'; n])).unwrap();
            lines += n as u64;
            assert!(lines < 1_000_000, "the queue never filled");
        }
        let queued = file.queue.lock().unwrap().queued();
        assert!(queued >= FILE_QUEUE_BYTES);
        assert!(queued <= FILE_QUEUE_BYTES + WRITE_PERMIT * (41 + 1 + 8));
        // Writing past the permit is refused, not queued.
        assert!(out.write(Bytes::from_static(b"\n")).is_err());
        drop(stalled);
        tokio::time::timeout(std::time::Duration::from_secs(10), out.ready())
            .await
            .expect("writable again once the writer caught up");
        assert_eq!(out.check_write().unwrap(), WRITE_PERMIT);
        log.flushed().await;
        let text = std::fs::read_to_string(&path).unwrap();
        // Every line reached the file, in order (the first newline ended "part").
        assert_eq!(text.lines().count() as u64, lines);
        let first: Vec<&str> = text.lines().take(3).collect();
        assert!(first[0].ends_with(" stdout F a") && first[1].ends_with(" stdout F b"));
        assert!(first[2].ends_with(" stdout F part"));
        assert!(text.lines().all(|l| l.contains(" stdout F ")));
        out.write(Bytes::from_static(b"tail")).unwrap();
        drop(out);
        log.flushed().await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with(" stdout F tail\n"),
            "the partial line ends the stream"
        );
    }

    /// The agent's own lines (`push`, e.g. a failed request's error) do not wait for the
    /// writer: against a stalled disk the file queue stays bounded, the ring keeps them, and
    /// the file says how many it missed.
    #[tokio::test]
    async fn the_agents_own_lines_cannot_grow_the_file_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let log = ContainerLog::new(Some(path.clone()), LogLimits::default());
        let file = log.file.clone().unwrap();
        let stalled = file.out.lock().unwrap();
        let line = [b'x'; 200];
        for _ in 0..20_000 {
            log.push(Stream::Stderr, &line);
        }
        let queued = file.queue.lock().unwrap().queued();
        assert!(queued <= FILE_QUEUE_HARD_BYTES, "queued {queued} bytes");
        let dropped = file.queue.lock().unwrap().dropped;
        assert!(dropped > 15_000, "only {dropped} dropped");
        assert_eq!(log.next_seq(), 20_000, "the ring saw every line");
        drop(stalled);
        log.flushed().await;
        log.push(Stream::Stderr, b"after");
        log.flushed().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let tail: Vec<&str> = text.lines().rev().take(2).collect();
        assert!(tail[0].ends_with(" stderr F after"), "{}", tail[0]);
        assert!(
            tail[1].ends_with(&format!(
                " stderr F wasmctl: {dropped} log lines were not written to this file: the writer fell behind"
            )),
            "{}",
            tail[1]
        );
    }
}
