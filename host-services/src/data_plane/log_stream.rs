//! Lines a microVM sends, every byte of which the guest chooses: the
//! function's log stream (vsock port 9002), and the VMM's serial console
//! and stderr. They are cut into lines with a bound on each, so that a
//! guest cannot make the worker buffer without limit.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::Notify;

const TAIL_LINES: usize = 20;
const END_PREFIX: &str = "END RequestId: ";
/// Lambda cuts log lines at 256 KiB; so does the worker.
const MAX_LINE: usize = 256 << 10;
/// How long the log may lag behind a result; the guest writes the END
/// line before it posts, so this only covers the reader's scheduling.
const LOG_LAG: Duration = Duration::from_millis(200);

/// Cuts a byte stream into lines at `\n`, dropping trailing `\r`s. A line
/// longer than the limit keeps its first `limit` bytes and loses the rest
/// up to its newline, wherever the stream's reads happen to end.
pub struct LineSplitter {
    line: Vec<u8>,
    limit: usize,
}

impl LineSplitter {
    pub fn new(limit: usize) -> Self {
        LineSplitter {
            line: Vec::new(),
            limit,
        }
    }

    /// Takes `chunk`'s bytes up to and including its first newline:
    /// returns how many it took and the line they complete, if they do.
    pub fn feed(&mut self, chunk: &[u8]) -> (usize, Option<String>) {
        let (used, content) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, &chunk[..i]),
            None => (chunk.len(), chunk),
        };
        let room = self.limit.saturating_sub(self.line.len());
        self.line
            .extend_from_slice(&content[..content.len().min(room)]);
        let complete = used > content.len();
        (used, complete.then(|| self.take()))
    }

    /// The last line, if the stream ended without a newline.
    pub fn finish(mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| self.take())
    }

    /// The bytes held for the line not yet complete.
    pub fn pending(&self) -> usize {
        self.line.len()
    }

    fn take(&mut self) -> String {
        while self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        line
    }
}

/// The lines of one stream: the function's log stream (its lines, and
/// the `END RequestId:` line the guest writes before it posts each
/// result), or the VMM's serial console and stderr, kept for error
/// reports.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<LinesSoFar>,
    changed: Notify,
    is_log_stream: bool,
}

#[derive(Default)]
struct LinesSoFar {
    function: Vec<String>,
    ended: Option<String>,
    /// The last lines, for error reports.
    tail: VecDeque<String>,
}

impl Lines {
    pub fn log_stream() -> Self {
        Lines {
            is_log_stream: true,
            ..Lines::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinesSoFar> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The function's lines since the last call.
    pub fn take_function_lines(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().function)
    }

    /// The last lines, joined.
    pub fn tail(&self) -> String {
        self.lock()
            .tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The request id of the last `END RequestId:` line.
    pub fn ended(&self) -> Option<String> {
        self.lock().ended.clone()
    }

    /// Waits, a short while at most, for the END line of `request_id`.
    pub async fn wait_for_end(&self, request_id: &str) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if self.lock().ended.as_deref() == Some(request_id) {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(LOG_LAG, wait).await;
    }

    pub fn push(&self, line: String) {
        let mut lines = self.lock();
        if self.is_log_stream {
            match line.strip_prefix(END_PREFIX) {
                Some(id) => lines.ended = Some(id.trim().to_string()),
                None => lines.function.push(line.clone()),
            }
        }
        if lines.tail.len() == TAIL_LINES {
            lines.tail.pop_front();
        }
        lines.tail.push_back(line);
        drop(lines);
        self.changed.notify_waiters();
    }
}

/// Feeds `stream`'s lines to `sink`, lossily decoded, cut at [`MAX_LINE`];
/// with `log_as`, each line also goes to the worker's log under that name.
pub fn read_lines(
    stream: impl AsyncRead + Unpin + Send + 'static,
    sink: Arc<Lines>,
    log_as: Option<String>,
) {
    let push = move |line: String| {
        if let Some(name) = &log_as {
            tracing::warn!("{name}: {line}");
        }
        sink.push(line);
    };
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream);
        let mut splitter = LineSplitter::new(MAX_LINE);
        loop {
            let chunk = match reader.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(chunk) => chunk,
            };
            let (used, line) = splitter.feed(chunk);
            reader.consume(used);
            if let Some(line) = line {
                push(line);
            }
        }
        if let Some(line) = splitter.finish() {
            push(line);
        }
    });
}
