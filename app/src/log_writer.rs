//! Where log lines go: stdout, in batches rather than one `write` per line.
//!
//! A line at INFO or below is appended to a buffer that a thread of its own writes out every
//! [`FLUSH_EVERY`], or that the thread logging writes out at once when it holds [`FLUSH_AT`]
//! bytes. A WARN or ERROR line is written at once, after whatever was buffered before it, so
//! that it is neither late nor lost. Lines keep their order. With a request line per request the
//! `write` per line cost a read about 2.5 µs of system time, 4% of its CPU (bench/NOTES.md,
//! issue 23); now it is one `write` per batch. The price: an INFO line reaches stdout up to
//! [`FLUSH_EVERY`] late, and a process killed by SIGKILL loses the INFO lines of its last
//! [`FLUSH_EVERY`]. The process flushes on its way out ([`Batched::flush`] in `cli::main`) and on a
//! panic.
//!
//! Not tracing-appender's `non_blocking`: it hands each line to its writer thread as a message of
//! its own (an allocation, and a wake-up of that thread, a system call, whenever it sleeps), has
//! no notion of a line that must go out at once, and drops lines when its queue is full.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long an INFO line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// A buffer this full is written out by the thread that filled it.
pub const FLUSH_AT: usize = 64 * 1024;

/// Lines bound for one output, buffered. Cheap to clone: the clones share the buffer.
pub struct Batched<W> {
    buffer: Arc<Mutex<Vec<u8>>>,
    out: Arc<Mutex<W>>,
    /// Every line written at once: there is no thread to write the buffer out.
    direct: bool,
}

impl<W> Clone for Batched<W> {
    fn clone(&self) -> Self {
        Batched {
            buffer: Arc::clone(&self.buffer),
            out: Arc::clone(&self.out),
            direct: self.direct,
        }
    }
}

impl Batched<io::Stdout> {
    /// Lines for stdout: in batches, with the thread that writes them out every
    /// [`FLUSH_EVERY`], for a server; each at once for a command that prints its own output
    /// between them.
    pub fn stdout(batches: bool) -> Batched<io::Stdout> {
        let lines = Batched::new(io::stdout());
        match batches {
            true => lines.with_flusher(),
            false => lines.unbatched(),
        }
    }
}

impl<W: Write> Batched<W> {
    /// Lines for `out`, written when [`Batched::flush`] is called (or urgent, or
    /// [`FLUSH_AT`] bytes of them).
    pub fn new(out: W) -> Batched<W> {
        Batched {
            buffer: Arc::new(Mutex::new(Vec::with_capacity(FLUSH_AT))),
            out: Arc::new(Mutex::new(out)),
            direct: false,
        }
    }

    /// Starts the thread that writes the buffer out every [`FLUSH_EVERY`]. Without it (the
    /// system refused a thread) every line is written when it is logged.
    pub fn with_flusher(self) -> Batched<W>
    where
        W: Send + 'static,
    {
        let flusher = self.clone();
        let spawned = std::thread::Builder::new()
            .name("log-flush".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flusher.flush();
                }
            });
        match spawned {
            Ok(_) => self,
            Err(e) => {
                eprintln!(
                    "logging: no thread to write log lines in batches ({e}); each is written at once"
                );
                self.unbatched()
            }
        }
    }

    /// Every line written when it is logged.
    fn unbatched(self) -> Batched<W> {
        Batched {
            direct: true,
            ..self
        }
    }

    /// Writes out what is buffered. The output is taken before the buffer, and held while the
    /// batch is written, so that batches reach it in the order they were taken.
    pub fn flush(&self) {
        let mut out = lock(&self.out);
        let batch = {
            let mut buffer = lock(&self.buffer);
            if buffer.is_empty() {
                return;
            }
            // Room for the next batch (none when each line is written at once).
            let room = if self.direct { 0 } else { FLUSH_AT };
            std::mem::replace(&mut *buffer, Vec::with_capacity(room))
        };
        // A log line that cannot be written has nowhere to be reported.
        let _ = out.write_all(&batch);
        let _ = out.flush();
    }

    fn append(&self, line: &[u8], urgent: bool) {
        let full = {
            let mut buffer = lock(&self.buffer);
            buffer.extend_from_slice(line);
            buffer.len() >= FLUSH_AT
        };
        if urgent || full || self.direct {
            self.flush();
        }
    }
}

/// A poisoned lock still holds bytes worth writing: a panic while appending leaves whole lines.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One event's writer: its line is appended, and written at once when `urgent`.
pub struct Line<'a, W: Write> {
    batched: &'a Batched<W>,
    urgent: bool,
}

impl<W: Write> Write for Line<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.batched.append(bytes, self.urgent);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.batched.flush();
        Ok(())
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for Batched<W> {
    type Writer = Line<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            batched: self,
            urgent: true,
        }
    }

    /// WARN and ERROR are urgent (tracing orders levels by verbosity: ERROR is the least).
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Line {
            batched: self,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that records each `write` it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            lock(&self.0).push(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log(batched: &Batched<Writes>, level: Level, text: &str) {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(batched.clone())
            .with_max_level(Level::TRACE)
            .without_time()
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || match level {
            Level::ERROR => tracing::error!("{text}"),
            Level::WARN => tracing::warn!("{text}"),
            Level::INFO => tracing::info!("{text}"),
            Level::DEBUG => tracing::debug!("{text}"),
            _ => tracing::trace!("{text}"),
        });
    }

    fn written(writes: &Writes) -> Vec<String> {
        lock(&writes.0)
            .iter()
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect()
    }

    #[test]
    fn info_lines_wait_for_the_flush_and_go_out_in_one_write_in_order() {
        let writes = Writes::default();
        let batched = Batched::new(writes.clone());
        for i in 0..3 {
            log(&batched, Level::INFO, &format!("line {i}"));
        }
        log(&batched, Level::DEBUG, "line 3");
        assert!(written(&writes).is_empty(), "{:?}", written(&writes));
        batched.flush();
        let writes = written(&writes);
        assert_eq!(writes.len(), 1, "{writes:?}");
        let lines: Vec<&str> = writes[0].lines().collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        for (i, line) in lines.iter().enumerate() {
            assert!(line.ends_with(&format!("line {i}")), "{line}");
        }
    }

    #[test]
    fn a_warning_or_an_error_goes_out_at_once_after_the_lines_before_it() {
        let writes = Writes::default();
        let batched = Batched::new(writes.clone());
        log(&batched, Level::INFO, "before");
        log(&batched, Level::WARN, "warned");
        let after_warn = written(&writes);
        assert_eq!(after_warn.len(), 1, "{after_warn:?}");
        assert!(after_warn[0].contains("before") && after_warn[0].contains("warned"));
        assert!(after_warn[0].find("before") < after_warn[0].find("warned"));
        log(&batched, Level::ERROR, "failed");
        let all = written(&writes);
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[1].contains("failed"));
    }

    #[test]
    fn a_full_buffer_is_written_by_the_thread_that_filled_it() {
        let writes = Writes::default();
        let batched = Batched::new(writes.clone());
        let line = "x".repeat(1000);
        let mut logged = 0;
        while written(&writes).is_empty() {
            assert!(
                logged <= FLUSH_AT / 1000,
                "still buffered after {logged} lines"
            );
            log(&batched, Level::INFO, &line);
            logged += 1;
        }
        let first = written(&writes);
        assert_eq!(first.len(), 1);
        assert!(first[0].len() >= FLUSH_AT, "{} bytes", first[0].len());
        assert_eq!(first[0].lines().count(), logged, "every line logged so far");
    }

    #[test]
    fn without_its_thread_every_line_is_written_at_once() {
        let writes = Writes::default();
        let batched = Batched::new(writes.clone()).unbatched();
        log(&batched, Level::INFO, "one");
        log(&batched, Level::INFO, "two");
        assert_eq!(written(&writes).len(), 2);
    }

    #[test]
    fn its_thread_writes_an_info_line_out_within_its_period() {
        let writes = Writes::default();
        let batched = Batched::new(writes.clone()).with_flusher();
        assert!(!batched.direct);
        log(&batched, Level::INFO, "soon");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while written(&writes).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "never written by the flushing thread"
            );
            std::thread::yield_now();
        }
        assert!(written(&writes)[0].contains("soon"));
    }
}
