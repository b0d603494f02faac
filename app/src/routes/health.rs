//! Health and metrics: routes that opt out of the transaction middleware. `/health/live` never
//! touches the database; `/health/ready` runs `SELECT 1` through the pool and answers within
//! [`READY_BUDGET`] even when the database is down or the pool is exhausted.

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::http::header::{self, ContentType};
use actix_web::{HttpResponse, web};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use sea_orm_actix_tx::db::{self, PoolStats};
use sea_orm_actix_tx::{Admission, Layer};
use serde::Serialize;
use utoipa::ToSchema;

/// How long `/health/ready` may wait for the database: well under the 2 s a probe allows.
pub const READY_BUDGET: Duration = Duration::from_millis(1500);

/// At most as many readiness checks query at once as the pool has connections; the others wait
/// their turn within [`READY_BUDGET`], so a flood of probes queues here instead of in the pool.
pub struct ReadyQueue(pub Admission);

/// The registry `/metrics` renders: the database layer's series and the service's own.
pub struct MetricsRegistry(pub Registry);

#[derive(Serialize, ToSchema)]
pub struct Live {
    /// Always `ok`.
    pub status: &'static str,
}

#[utoipa::path(get, path = "/health/live", responses((status = 200, body = Live)))]
pub async fn live() -> web::Json<Live> {
    web::Json(Live { status: "ok" })
}

#[derive(Serialize, ToSchema)]
pub struct DatabaseHealth {
    /// `up` or `down`
    pub status: &'static str,
    /// `postgres`, `mysql` (MariaDB) or `sqlite`
    pub backend: &'static str,
    /// Round trip of `SELECT 1`, when it answered.
    pub latency_ms: Option<f64>,
    pub pool: PoolStats,
}

/// The read replica, when one is configured. Its state never makes the service unready: while
/// it is down, reads go to the primary.
#[derive(Serialize, ToSchema)]
pub struct ReplicaHealth {
    /// `up` or `down`
    pub status: &'static str,
    /// How far its replay is behind the primary, in seconds; null when it did not answer.
    pub lag_seconds: Option<f64>,
    pub pool: PoolStats,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ok` or `unavailable`
    pub status: &'static str,
    pub database: DatabaseHealth,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaHealth>,
    /// Why the service is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[utoipa::path(get, path = "/health/ready", responses(
    (status = 200, body = Ready), (status = 503, body = Ready)))]
pub async fn ready(layer: web::Data<Layer>, queue: Option<web::Data<ReadyQueue>>) -> HttpResponse {
    let (db, config) = (layer.db(), layer.config());
    let (min, max) = layer.metrics().pool_limits();
    let (min, max) = (min as u32, max as u32);
    let started = Instant::now();
    let availability = Some(layer.availability());
    // The replica is checked beside the primary, within its own shorter budget.
    let replica_check = async {
        match &config.replica {
            Some(replica) => Some(replica.check().await),
            None => None,
        }
    };
    let primary_check = async {
        match queue.as_ref().map(|q| &q.0) {
            Some(queue) => match queue.enter().await {
                Ok(_turn) => {
                    let left = READY_BUDGET.saturating_sub(started.elapsed());
                    db::ping(db, config.session.ping_sql(), availability, left).await
                }
                Err(_) => Err("no pooled connection became free in time".to_owned()),
            },
            None => db::ping(db, config.session.ping_sql(), availability, READY_BUDGET).await,
        }
    };
    let (result, replica_state) = tokio::join!(primary_check, replica_check);
    let pool = db::pool_stats(db, min, max);
    let backend = db::backend_name(db);
    let replica = match (&config.replica, replica_state) {
        (Some(replica), Some(state)) => Some(ReplicaHealth {
            status: if state.up { "up" } else { "down" },
            lag_seconds: state.lag_seconds,
            pool: db::pool_stats(replica.db(), min, max),
        }),
        _ => None,
    };
    let (status, body) = match result {
        Ok(latency) => (
            StatusCode::OK,
            Ready {
                status: "ok",
                database: DatabaseHealth {
                    status: "up",
                    backend,
                    latency_ms: Some((latency.as_secs_f64() * 1e5).round() / 100.0),
                    pool,
                },
                replica,
                detail: None,
            },
        ),
        Err(detail) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Ready {
                status: "unavailable",
                database: DatabaseHealth {
                    status: "down",
                    backend,
                    latency_ms: None,
                    pool,
                },
                replica,
                detail: Some(detail),
            },
        ),
    };
    let mut response = HttpResponse::build(status);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.insert_header((header::RETRY_AFTER, "1"));
    }
    response.json(body)
}

#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(
    layer: web::Data<Layer>,
    registry: web::Data<MetricsRegistry>,
) -> HttpResponse {
    layer.refresh_metrics();
    HttpResponse::Ok()
        .insert_header(ContentType(
            "text/plain; version=0.0.4; charset=utf-8"
                .parse()
                .unwrap_or(mime::TEXT_PLAIN_UTF_8),
        ))
        .body(render(&registry.0))
}

/// The exposition in Prometheus text format.
fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}
