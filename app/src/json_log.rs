//! `LOG_FORMAT=json`: one JSON object per line, written straight into the subscriber's line
//! buffer. The same object as `tracing-subscriber`'s JSON format with the event flattened and
//! the current span (`{"timestamp":…,"level":…,"message":…,<fields>,"target":…,"span":{<its
//! fields>,"name":…}}`), without going through `serde_json` (whose writer adaptor checks each
//! of the dozens of pieces of a line as UTF-8): the request log line is written on every
//! request, and this costs about a third of what that did (bench/NOTES.md, issue 23). A span's
//! fields are rendered once, when it is created, and copied into each line logged inside it.
//!
//! A request has no tracing span in this format ([`in_request`]): sqlx wraps every statement's
//! future in the current span, and entering and leaving the request's on each poll cost more
//! than the rest of the logging; making the span and rendering its fields cost about as much
//! as the request line itself (bench/NOTES.md, issue 23). Instead the request's fields are
//! rendered once, kept in a thread-local while the request's future is polled, and a line
//! logged with no span current is written with them: the same object as if the request's span
//! were current. The layer logs what it logs for a request (the leak warning among it) from the
//! request's own future, so its lines carry the request's fields too.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::rc::Rc;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

thread_local! {
    /// The fields of the request being polled on this thread ([`in_request`]), rendered as its
    /// span's would be.
    static REQUEST: RefCell<Option<Rc<str>>> = const { RefCell::new(None) };
}

/// Runs a request's future with its fields ([`request_fields`]) as the span of the lines
/// logged without one: they are in the thread-local while it is polled. The future is pinned
/// in this one's state, not boxed apart.
pub async fn in_request<F: Future>(fields: Rc<str>, request: F) -> F::Output {
    let mut request = pin!(request);
    poll_fn(|cx| {
        let outer = REQUEST.replace(Some(Rc::clone(&fields)));
        let polled = request.as_mut().poll(cx);
        REQUEST.set(outer);
        polled
    })
    .await
}

/// The request's fields as the `"span"` object of a line holds them: what
/// `info_span!("request", request_id, method, path)` shows.
pub fn request_fields(request_id: &str, method: &str, path: &str) -> Rc<str> {
    let mut text = String::with_capacity(80 + request_id.len() + path.len());
    let w = &mut text;
    let rendered = (|| {
        for (key, value) in [
            ("\"request_id\":", request_id),
            ("\"method\":", method),
            ("\"path\":", path),
        ] {
            w.write_str(key)?;
            string(w, value)?;
            w.write_char(',')?;
        }
        w.write_str("\"name\":\"request\"")
    })();
    // Writing into a `String` cannot fail.
    debug_assert!(rendered.is_ok());
    text.into()
}

/// Room for a request line without growing.
const LINE_CAPACITY: usize = 512;

thread_local! {
    /// The line being put together on this thread, kept between lines.
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(LINE_CAPACITY));
}

/// The event format of `LOG_FORMAT=json`.
pub struct JsonLine;

/// How a span's fields are kept: `"name":value` pairs, comma-separated, ready to be copied.
pub struct JsonFields;

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Fields::new(&mut writer, false);
        fields.record(&mut visitor);
        visitor.result
    }

    /// Fields recorded on a span after it was created join the ones it has (the default would
    /// separate them with a space).
    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if !current.fields.is_empty() {
            current.fields.push(',');
        }
        self.format_fields(current.as_writer(), fields)
    }
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The line is put together in a `String` of this thread's and handed over in one piece:
        // the subscriber's `Writer` costs a dynamic call per piece, and a line has dozens.
        LINE.with(|kept| {
            // A line written while this thread's is (tracing drops an event logged from inside
            // another's dispatch today, but a subscriber need not) gets a `String` of its own.
            let (mut kept, mut own) = (kept.try_borrow_mut().ok(), String::new());
            let line = kept.as_deref_mut().unwrap_or(&mut own);
            line.clear();
            write_line(ctx, event, line)?;
            let written = out.write_str(line);
            if line.capacity() > 64 * LINE_CAPACITY {
                // One huge line (a long statement logged by `DB_ECHO`) is not kept.
                *line = String::with_capacity(LINE_CAPACITY);
            }
            written
        })
    }
}

/// One line of `event`: its timestamp, level, fields, target and span.
fn write_line<S, N>(
    ctx: &FmtContext<'_, S, N>,
    event: &Event<'_>,
    writer: &mut String,
) -> fmt::Result
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    writer.push_str("{\"timestamp\":\"");
    timestamp(writer, std::time::SystemTime::now())?;
    writer.push_str("\",\"level\":\"");
    writer.push_str(event.metadata().level().as_str());
    writer.push('"');
    let mut fields = Fields::new(writer, true);
    event.record(&mut fields);
    fields.result?;
    writer.write_str(",\"target\":")?;
    name(writer, event.metadata().target())?;
    if let Some(span) = ctx.lookup_current() {
        writer.write_str(",\"span\":{")?;
        let extensions = span.extensions();
        if let Some(fields) = extensions.get::<FormattedFields<N>>()
            && !fields.fields.is_empty()
        {
            writer.write_str(&fields.fields)?;
            writer.write_char(',')?;
        }
        writer.write_str("\"name\":")?;
        name(writer, span.name())?;
        writer.write_char('}')?;
    } else {
        REQUEST.with_borrow(|request| match request {
            Some(fields) => {
                writer.write_str(",\"span\":{")?;
                writer.write_str(fields)?;
                writer.write_char('}')
            }
            None => Ok(()),
        })?;
    }
    writer.write_str("}\n")
}

/// Writes fields as `"name":value` pairs, each preceded by a comma when `leading` (inside an
/// object already begun), else separated by commas.
struct Fields<'a, W> {
    writer: &'a mut W,
    leading: bool,
    first: bool,
    result: fmt::Result,
}

impl<'a, W: fmt::Write> Fields<'a, W> {
    fn new(writer: &'a mut W, leading: bool) -> Self {
        Fields {
            writer,
            leading,
            first: true,
            result: Ok(()),
        }
    }

    fn field(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if self.leading || !self.first {
                self.writer.write_char(',')?;
            }
            self.first = false;
            name(self.writer, field.name())?;
            self.writer.write_char(':')?;
            value(self.writer)
        })();
    }
}

impl<W: fmt::Write> Visit for Fields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |w| string(w, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity (serde_json writes null for them too). A finite one is
        // written as serde_json writes it (by `ryu`: `1.0`, `0.523417`, `1e-7`).
        self.field(field, |w| match value.is_finite() {
            true => w.write_str(ryu::Buffer::new().format_finite(value)),
            false => w.write_str("null"),
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

thread_local! {
    /// The second of the last line written on this thread, and its date and time of day.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `now` in RFC 3339, UTC, with microseconds (`2026-12-04T21:29:00.123456Z`, as
/// tracing-subscriber's `SystemTime` writes it). The date and time of day are formatted once per
/// second per thread: at a line per request, formatting them each time cost more than the rest
/// of the timestamp (bench/NOTES.md, issue 23).
fn timestamp(w: &mut impl fmt::Write, now: std::time::SystemTime) -> fmt::Result {
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            *text = date_and_time(secs);
        }
        w.write_str(text)
    })?;
    let mut buffer = itoa::Buffer::new();
    let micros = buffer.format(since_epoch.subsec_micros());
    w.write_char('.')?;
    w.write_str(&"000000"[micros.len()..])?;
    w.write_str(micros)?;
    w.write_char('Z')
}

/// `YYYY-MM-DDTHH:MM:SS` of a time in seconds since the Unix epoch, in UTC.
fn date_and_time(secs: u64) -> String {
    let at = i64::try_from(secs)
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .unwrap_or_default();
    at.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// A field's, target's or span's name as a JSON string: short, and (an identifier or a module
/// path) with nothing to escape, so checked in one pass and written whole rather than through
/// the escaper (a dozen names per request line).
fn name(w: &mut impl fmt::Write, name: &str) -> fmt::Result {
    if name.bytes().any(|b| ESCAPED[usize::from(b)]) {
        return string(w, name);
    }
    w.write_char('"')?;
    w.write_str(name)?;
    w.write_char('"')
}

/// `text` as a JSON string.
fn string(w: &mut impl fmt::Write, text: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(text)?;
    w.write_char('"')
}

/// Writes what it is given escaped for the inside of a JSON string (RFC 8259: `"`, `\` and
/// the control characters).
struct Escaped<'a, W>(&'a mut W);

/// The bytes a JSON string escapes, `"`, `\` and the control characters, looked up rather than
/// compared: the scan runs over every byte of a line.
const ESCAPED: [bool; 256] = {
    let mut escaped = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        escaped[byte] = true;
        byte += 1;
    }
    escaped[b'"' as usize] = true;
    escaped[b'\\' as usize] = true;
    escaped
};

/// Where the first byte of `bytes` that [`ESCAPED`] marks is. Eight bytes at a time: a word
/// with none of them is passed over in a few instructions, and the bytes of a line mostly need
/// no escaping.
fn first_escaped(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Whether some byte of `word` is below `n` (n ≤ 0x80): a byte at or above it never borrows.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH != 0;
    let marked = |word: u64| {
        below(word, 0x20) || below(word ^ (ONES * 0x22), 1) || below(word ^ (ONES * 0x5c), 1)
    };
    let clean = bytes.chunks_exact(8).take_while(|chunk| {
        // A chunk is eight bytes; were it not, 0 sends it to the byte-by-byte scan.
        !marked(<[u8; 8]>::try_from(*chunk).map_or(0, u64::from_ne_bytes))
    });
    let at = clean.count() * 8;
    let found = bytes[at..].iter().position(|&b| ESCAPED[usize::from(b)]);
    found.map(|i| at + i)
}

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        // Every byte that needs escaping is ASCII, so `at` is always a character boundary.
        while let Some(at) = first_escaped(rest.as_bytes()) {
            self.0.write_str(&rest[..at])?;
            let c = rest.as_bytes()[at];
            match c {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{c:04x}")?,
            }
            rest = &rest[at + 1..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    fn logged(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .fmt_fields(JsonFields)
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    #[test]
    fn the_timestamp_is_what_tracing_subscriber_writes() {
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        let ours = |secs: u64, micros: u32| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::new(secs, micros * 1_000);
            let mut text = String::new();
            timestamp(&mut Writer::new(&mut text), at).unwrap();
            text
        };
        assert_eq!(ours(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(ours(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(ours(1_796_420_940, 123_456), "2026-12-04T21:49:00.123456Z");
        assert_eq!(ours(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        // Against tracing-subscriber's own, now: the same to the second as one of the two
        // moments read around it.
        let second = |at: std::time::SystemTime| {
            let secs = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            ours(secs, 0)[..19].to_owned()
        };
        let before = std::time::SystemTime::now();
        let mut theirs = String::new();
        SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        let after = std::time::SystemTime::now();
        assert_eq!(
            theirs.len(),
            "1970-01-01T00:00:00.000000Z".len(),
            "{theirs}"
        );
        assert!(
            [second(before), second(after)].contains(&theirs[..19].to_owned()),
            "{theirs}"
        );
    }

    #[test]
    fn an_event_is_one_json_object_with_its_fields_its_target_and_its_span() {
        let lines = logged(|| {
            let span = tracing::info_span!("request", request_id = "r-1", method = "GET");
            let _entered = span.enter();
            tracing::info!(
                status = 200u16,
                latency_ms = 1.5,
                retries = 0u32,
                ok = true,
                delta = -3i64,
                route = %"/products/{id}",
                "request"
            );
        });
        let [line] = lines.as_slice() else {
            panic!("one line: {lines:?}")
        };
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request");
        assert_eq!(line["status"], 200);
        assert_eq!(line["latency_ms"], 1.5);
        assert_eq!(line["retries"], 0);
        assert_eq!(line["ok"], true);
        assert_eq!(line["delta"], -3);
        assert_eq!(line["route"], "/products/{id}");
        assert_eq!(line["target"], module_path!());
        assert_eq!(
            line["span"],
            serde_json::json!({"request_id": "r-1", "method": "GET", "name": "request"})
        );
        let timestamp = line["timestamp"].as_str().unwrap_or_default();
        assert!(
            timestamp.ends_with('Z') && timestamp.len() > 20,
            "{timestamp}"
        );
    }

    #[test]
    fn every_escaped_byte_is_found_at_every_place_in_a_word() {
        for byte in 0..=u8::MAX {
            for at in 0..20 {
                let mut bytes = vec![b'a'; 20];
                bytes[at] = byte;
                let expected = ESCAPED[usize::from(byte)].then_some(at);
                assert_eq!(first_escaped(&bytes), expected, "byte {byte:#x} at {at}");
            }
        }
        assert_eq!(first_escaped("é\u{7f}ü\"".as_bytes()), Some(5));
    }

    #[test]
    fn a_value_whose_debug_logs_while_its_line_is_written_leaves_the_line_whole() {
        struct Noisy;
        impl fmt::Debug for Noisy {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                tracing::warn!("from inside Debug");
                f.write_str("noisy")
            }
        }
        let lines = logged(|| tracing::info!(value = ?Noisy, "outer"));
        let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
        assert!(messages.contains(&"outer"), "{lines:?}");
        let outer = lines
            .iter()
            .find(|l| l["message"] == "outer")
            .expect("outer");
        assert_eq!(outer["value"], "noisy");
    }

    #[test]
    fn strings_are_escaped_and_an_event_outside_a_span_has_none() {
        let nasty = "quote \" backslash \\ newline \n tab \t bell \u{7} é";
        let lines = logged(|| tracing::warn!(value = nasty, "{}", nasty));
        assert_eq!(lines[0]["value"], nasty);
        assert_eq!(lines[0]["message"], nasty);
        assert_eq!(lines[0]["level"], "WARN");
        assert!(lines[0].get("span").is_none());
    }

    #[test]
    fn a_line_logged_in_a_request_polled_in_its_span_carries_the_span_and_one_outside_does_not() {
        let lines = logged(|| {
            let fields = request_fields("r-\"2", "GET", "/products/1");
            let request = in_request(fields, async { tracing::info!("inside") });
            futures_executor_block_on(request);
            tracing::info!("outside");
        });
        assert_eq!(lines[0]["message"], "inside");
        assert_eq!(
            lines[0]["span"],
            serde_json::json!({"request_id": "r-\"2", "method": "GET", "path": "/products/1", "name": "request"})
        );
        assert_eq!(lines[1]["message"], "outside");
        assert!(lines[1].get("span").is_none(), "{}", lines[1]);
        let in_a_span = logged(|| {
            let span = tracing::info_span!(
                "request",
                request_id = "r-\"2",
                method = "GET",
                path = "/products/1"
            );
            span.in_scope(|| tracing::info!("inside"));
        });
        assert_eq!(
            lines[0]["span"], in_a_span[0]["span"],
            "the same as the span's"
        );
    }

    /// Polls `future` to its end on this thread.
    fn futures_executor_block_on<F: Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        runtime.block_on(future)
    }

    #[test]
    fn a_span_without_fields_and_a_number_json_cannot_hold() {
        let lines = logged(|| {
            let _entered = tracing::info_span!("job").entered();
            tracing::info!(ratio = f64::NAN, "x");
        });
        assert_eq!(lines[0]["span"], serde_json::json!({"name": "job"}));
        assert!(lines[0]["ratio"].is_null());
    }
}
