//! `TELEMETRY=on`: what a service written by hand adds to every request before it goes to
//! production, with the components such a service reaches for, set up the way their docs
//! show: one JSON log line per request (`tracing` with `tracing-subscriber`'s JSON format,
//! filtered by `RUST_LOG` as the app is, to stdout, the subscriber's default writer), a
//! latency histogram and a request counter (`prometheus-client`, the app's labels and buckets,
//! served at `/metrics`) and an `X-Request-Id` on the response. The app has all of these by
//! default; so the app against this control is what the layer itself costs, and the bare
//! control against this one is what the telemetry costs (bench/NOTES.md, *Sixth pass*).

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

/// The metrics, shared by the workers.
pub struct Telemetry {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Installs the log subscriber and registers the metrics.
pub fn init() -> web::Data<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .init();
    let mut registry = Registry::default();
    let requests = Family::<RequestLabels, Counter>::default();
    registry.register("http_requests", "HTTP requests", requests.clone());
    let durations: Family<RouteLabels, Histogram, fn() -> Histogram> =
        Family::new_with_constructor(latency_histogram);
    registry.register(
        "http_request_duration_seconds",
        "HTTP request latency",
        durations.clone(),
    );
    let telemetry = Telemetry {
        requests,
        durations,
        registry,
    };
    web::Data::new(telemetry)
}

/// The middleware (`actix_web::middleware::from_fn`).
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", fastrand::u128(..)));
    let method = req.method().to_string();
    let telemetry = req.app_data::<web::Data<Telemetry>>().cloned();
    let mut res = next.call(req).await?;
    let elapsed = started.elapsed();
    let status = res.status();
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    tracing::info!(
        request_id = %id,
        method = %method,
        route = %route,
        status = status.as_u16(),
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    if let Some(telemetry) = telemetry {
        let class =
            ["1xx", "2xx", "3xx", "4xx", "5xx"][usize::from(status.as_u16() / 100 - 1).min(4)];
        let labels = RequestLabels {
            method: method.clone(),
            status: class,
        };
        telemetry.requests.get_or_create(&labels).inc();
        let labels = RouteLabels { method, route };
        let histogram = telemetry.durations.get_or_create(&labels);
        histogram.observe(elapsed.as_secs_f64());
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(res)
}

/// `GET /metrics`: the Prometheus text format.
pub async fn metrics(telemetry: web::Data<Telemetry>) -> HttpResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &telemetry.registry) {
        Ok(()) => HttpResponse::Ok()
            .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
            .body(text),
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}
