//! The service's HTTP metrics (`docs/operations.md`, *Metrics*): requests by method and status
//! class, and latency by route pattern, registered beside the database layer's in the one
//! registry `/metrics` renders. Every series exists from start-up.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    /// Status class (`2xx` … `5xx`): bounded cardinality.
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    /// The route pattern (`/products/{id}`), never the raw path.
    route: String,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms … 8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

pub const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `http_requests_total`'s series by method (in the order of [`METHODS`], then `OTHER`) and
/// status class, each looked up in its family once: a lookup hashes its labels.
type RequestCounters = [[OnceLock<Counter>; STATUS_CLASSES.len()]; METHODS.len() + 1];

/// Cheap to clone: every field shares its series.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    counters: Arc<RequestCounters>,
    durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl HttpMetrics {
    /// Registers `http_requests_total` and `http_request_duration_seconds` in `registry`.
    pub fn register(registry: &mut Registry) -> HttpMetrics {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method and status class",
            requests.clone(),
        );
        let durations: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method and route pattern",
            durations.clone(),
        );
        for method in ["GET", "POST"] {
            for status in ["2xx", "4xx", "5xx"] {
                let _ = requests.get_or_create(&RequestLabels { method, status });
            }
        }
        let _ = durations.get_or_create(&RouteLabels {
            method: "GET",
            route: "/health/ready".to_owned(),
        });
        HttpMetrics {
            requests,
            counters: Arc::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| OnceLock::new())
            })),
            durations,
        }
    }

    /// Records one finished request.
    pub fn observe_request(
        &self,
        label: MethodLabel,
        route: String,
        status: u16,
        elapsed: Duration,
    ) {
        let (class, method) = (
            usize::from(status / 100).saturating_sub(1).min(4),
            label.as_str(),
        );
        let counter = self.counters[label.0][class].get_or_init(|| {
            let status = STATUS_CLASSES[class];
            self.requests
                .get_or_create(&RequestLabels { method, status })
                .clone()
        });
        counter.inc();
        self.durations
            .get_or_create(&RouteLabels { method, route })
            .observe(elapsed.as_secs_f64());
    }
}

/// A request's method as a bounded label: one of [`METHODS`] (its place there), or `OTHER`.
/// Found once per request, for the log line and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodLabel(usize);

impl MethodLabel {
    pub fn of(method: &actix_web::http::Method) -> MethodLabel {
        let place = METHODS.iter().position(|m| *m == method.as_str());
        MethodLabel(place.unwrap_or(METHODS.len()))
    }

    pub fn as_str(self) -> &'static str {
        METHODS.get(self.0).copied().unwrap_or("OTHER")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_counts_in_its_method_and_status_class_series() {
        let mut registry = Registry::default();
        let metrics = HttpMetrics::register(&mut registry);
        let route = || "/products/{id}".to_owned();
        let (get, post) = (actix_web::http::Method::GET, actix_web::http::Method::POST);
        let other = actix_web::http::Method::from_bytes(b"PURGE").expect("a method");
        for (method, status) in [(&get, 200), (&get, 204), (&post, 503), (&other, 700)] {
            let label = MethodLabel::of(method);
            metrics.observe_request(label, route(), status, Duration::from_millis(1));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for line in [
            "http_requests_total{method=\"GET\",status=\"2xx\"} 2",
            "http_requests_total{method=\"POST\",status=\"5xx\"} 1",
            "http_requests_total{method=\"OTHER\",status=\"5xx\"} 1",
            "http_requests_total{method=\"GET\",status=\"4xx\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
