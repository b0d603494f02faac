//! Logging and the per-request telemetry middleware. The subscriber is set up once by the binary
//! (`RUST_LOG`, `LOG_FORMAT=pretty|json`). [`RequestTelemetry`] wraps the whole app: it takes or
//! makes the `X-Request-Id`, runs the request inside a span that carries it (so every log line of
//! the request has it), returns it on the response, writes one log line per request (method,
//! route, status, latency, transaction outcome, retries) and counts the request in the metrics.

use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::rc::Rc;
use std::time::Instant;

use actix_web::HttpMessage;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header::{HeaderName, HeaderValue};
use config::LogFormat;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use sea_orm_actix_tx::{TxOutcome, TxReport};

use crate::json_log::in_request;

use crate::metrics::{HttpMetrics, MethodLabel};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const MAX_REQUEST_ID_LEN: usize = 128;

/// What `RUST_LOG` is when it is unset or empty: `info`, with PostgreSQL's NOTICE messages (such
/// as "relation … already exists, skipping" from every migration run) kept to WARN.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx::postgres::notice=warn";

/// `RUST_LOG` is set but is not a valid filter.
#[derive(Debug, thiserror::Error)]
#[error("invalid RUST_LOG={value:?}: {reason} (e.g. RUST_LOG=info or RUST_LOG=app=debug,info)")]
pub struct LogFilterError {
    value: String,
    reason: String,
}

/// The filter `RUST_LOG` asks for, or [`DEFAULT_LOG_FILTER`] when it is unset or empty. An
/// invalid one is an error (bad configuration), never silently replaced.
pub fn log_filter() -> Result<EnvFilter, LogFilterError> {
    let value = std::env::var("RUST_LOG").unwrap_or_default();
    parse_log_filter(&value)
}

fn parse_log_filter(value: &str) -> Result<EnvFilter, LogFilterError> {
    let directives = if value.trim().is_empty() {
        DEFAULT_LOG_FILTER
    } else {
        value
    };
    EnvFilter::builder()
        .parse(directives)
        .map_err(|e| LogFilterError {
            value: value.to_owned(),
            reason: e.to_string(),
        })
}

/// Sets the global subscriber: `filter` (from [`log_filter`]) filters, `format` picks the
/// layout. Fails if a global subscriber is already set.
pub fn init<W>(format: LogFormat, filter: EnvFilter, writer: W) -> Result<(), String>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let result = match format {
        LogFormat::Json => builder
            .fmt_fields(crate::json_log::JsonFields)
            .event_format(crate::json_log::JsonLine)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// A client's id is kept when it is 1..=128 visible ASCII characters; otherwise a new one is made.
fn request_id(req: &ServiceRequest) -> String {
    let given = req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok());
    let valid = |v: &&str| {
        !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN && v.bytes().all(|b| b.is_ascii_graphic())
    };
    given
        .filter(valid)
        .map_or_else(new_request_id, str::to_owned)
}

/// 32 random lowercase hex digits (`format!("{:032x}")` of a random `u128`, by table).
fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..);
    let mut digits = [0u8; 32];
    for (i, digit) in digits.iter_mut().rev().enumerate() {
        *digit = HEX[(n >> (4 * i)) as usize & 0xf];
    }
    // Hex digits are ASCII: this never falls back.
    std::str::from_utf8(&digits).unwrap_or("0").to_owned()
}

/// The request id, the request's log line and its HTTP metrics; wraps the whole app.
#[derive(Clone)]
pub struct RequestTelemetry {
    metrics: HttpMetrics,
    format: LogFormat,
}

impl RequestTelemetry {
    /// `format` is the service's `LOG_FORMAT`: how the request's span is kept while it runs.
    pub fn new(metrics: HttpMetrics, format: LogFormat) -> RequestTelemetry {
        RequestTelemetry { metrics, format }
    }
}

impl<S, B> Transform<S, ServiceRequest> for RequestTelemetry
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = RequestTelemetryService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RequestTelemetryService {
            service: Rc::new(service),
            metrics: self.metrics.clone(),
            format: self.format,
        }))
    }
}

pub struct RequestTelemetryService<S> {
    service: Rc<S>,
    metrics: HttpMetrics,
    format: LogFormat,
}

/// What the lines logged while a request runs carry of it.
enum LogContext {
    /// `LOG_FORMAT=json`: the request's fields, rendered once (json_log.rs). No span is made per
    /// request.
    Fields(Rc<str>),
    /// `LOG_FORMAT=pretty`: the span the request runs in.
    Span(tracing::Span),
}

impl<S> RequestTelemetryService<S> {
    /// The request's log context.
    fn context(&self, req: &ServiceRequest, id: &str, method: &'static str) -> LogContext {
        let path = req.path();
        match self.format {
            LogFormat::Json => {
                LogContext::Fields(crate::json_log::request_fields(id, method, path))
            }
            LogFormat::Pretty => LogContext::Span(tracing::info_span!(
                "request",
                request_id = id,
                method,
                path
            )),
        }
    }
}

impl<S, B> Service<ServiceRequest> for RequestTelemetryService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let started = Instant::now();
        let id = request_id(&req);
        let label = MethodLabel::of(req.method());
        let method = label.as_str();
        let metrics = self.metrics.clone();
        let context = self.context(&req, &id, method);
        let service = Rc::clone(&self.service);
        let request = async move {
            let result = service.call(req).await;
            let elapsed = started.elapsed();
            let mut res = match result {
                Ok(res) => res,
                Err(e) => {
                    tracing::error!(request_id = %id, error = %e, "request failed in middleware");
                    return Err(e);
                }
            };
            let status = res.status().as_u16();
            let route = res
                .request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".to_owned());
            let report = res.request().extensions().get::<TxReport>().copied();
            let (outcome, retries) =
                report.map_or((TxOutcome::None, 0), |r| (r.outcome, r.retries));
            // The message as a `&str` field rather than format arguments: the same line in
            // both formats, without a trip through `core::fmt` to write one word.
            tracing::info!(
                message = "request",
                request_id = id.as_str(),
                method,
                route = route.as_str(),
                status,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                tx = outcome.as_str(),
                retries,
            );
            metrics.observe_request(label, route, status, elapsed);
            // The id's own bytes, not a copy.
            let id = actix_web::web::Bytes::from(id);
            if let Ok(value) = HeaderValue::from_maybe_shared(id) {
                res.headers_mut().insert(REQUEST_ID, value);
            }
            Ok(res)
        };
        match context {
            LogContext::Fields(fields) => Box::pin(in_request(fields, request)),
            LogContext::Span(span) => Box::pin(request.instrument(span)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_request_id_is_32_lowercase_hex_digits_of_a_random_number() {
        let (a, b) = (new_request_id(), new_request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), 32, "{id}");
            let n = u128::from_str_radix(id, 16).expect("hex");
            assert_eq!(&format!("{n:032x}"), id);
        }
        assert_ne!(a, b);
    }

    #[test]
    fn an_unset_or_empty_rust_log_is_the_default_filter() {
        for value in ["", "  "] {
            let filter = parse_log_filter(value).expect("the default parses");
            assert_eq!(
                filter.to_string(),
                parse_log_filter(DEFAULT_LOG_FILTER).unwrap().to_string()
            );
        }
    }

    #[test]
    fn a_valid_rust_log_is_taken_as_written() {
        let filter = parse_log_filter("app=debug,warn").expect("valid");
        let shown = filter.to_string();
        assert!(
            shown.contains("app=debug") && shown.contains("warn"),
            "{shown}"
        );
    }

    #[test]
    fn an_invalid_rust_log_is_an_error_naming_it_and_the_value() {
        for value in ["nonsense::[", "app=loud"] {
            let error = parse_log_filter(value).expect_err(value).to_string();
            assert!(error.starts_with("invalid RUST_LOG="), "{error}");
            assert!(error.contains(value), "{error}");
        }
    }
}
