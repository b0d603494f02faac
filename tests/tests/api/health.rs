//! Health endpoints, metrics and the OpenAPI document.

use serde_json::Value;

use std::time::Duration;

use crate::support::process::Binary;
use crate::support::replica::ReplicaPair;
use crate::support::{TestApp, spawn_app};

#[tokio::test]
async fn liveness_and_readiness_report_ok_with_pool_statistics() {
    let app = spawn_app().await;
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), 200);
    assert_eq!(
        live.json::<Value>().await.unwrap(),
        serde_json::json!({"status": "ok"})
    );

    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["database"]["status"], "up");
    assert_eq!(body["database"]["backend"], "postgres");
    assert!(body["database"]["latency_ms"].as_f64().unwrap() >= 0.0);
    let pool = &body["database"]["pool"];
    assert_eq!(
        (pool["min"].as_u64(), pool["max"].as_u64()),
        (Some(2), Some(10))
    );
    assert_eq!(
        pool["size"].as_u64().unwrap(),
        pool["idle"].as_u64().unwrap() + pool["in_use"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn every_response_carries_a_request_id_echoed_when_valid() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/health/live"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123");
    let generated = app.get("/no/such/route").await;
    let id = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 32);
    let res = app
        .client
        .get(app.url("/health/live"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    assert_ne!(
        res.headers()["x-request-id"].to_str().unwrap(),
        "x".repeat(500),
        "too long: replaced"
    );
}

#[tokio::test]
async fn metrics_expose_every_contract_series_from_start_up() {
    let app = spawn_app().await;
    let text = app.get("/metrics").await.text().await.unwrap();
    for series in [
        "db_pool_connections{state=\"idle\"}",
        "db_pool_connections{state=\"in_use\"}",
        "db_pool_max_connections ",
        "db_pool_acquire_seconds_bucket",
        "db_transactions_total{outcome=\"commit\"}",
        "db_transactions_total{outcome=\"rollback\"}",
        "db_transaction_retries_total ",
        "db_abandoned_backends_terminated_total ",
        "db_failovers_total ",
        "db_connections_evicted_total ",
        "db_primary_unavailable_seconds_total ",
        "db_requests_rerun_total{reason=\"primary_lost\"}",
        "http_requests_total{method=\"GET\",status=\"2xx\"}",
        "http_request_duration_seconds_bucket",
        "db_reads_total{target=\"replica\"}",
        "db_reads_total{target=\"primary\"}",
        "db_replica_lag_seconds ",
        "db_replica_pool_connections{state=\"idle\"}",
        "db_replica_pool_max_connections ",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    app.warehouse("M").await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("db_transactions_total{outcome=\"commit\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("route=\"/warehouses\""),
        "route patterns label latencies"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_endpoint() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/openapi.json",
        "/warehouses",
        "/warehouses/{id}",
        "/warehouses/{id}/stock",
        "/products",
        "/products/{id}",
        "/products/{id}/stock",
        "/receipts",
        "/shipments",
        "/transfers",
        "/movements",
    ] {
        assert!(paths.contains_key(path), "{path} missing");
    }
}

/// Readiness means a writable primary: an app whose `DATABASE_URL` reaches a server that
/// answers but is a standby in recovery (a demoted primary looks the same) is not ready, while
/// it is alive; the same database on the primary is ready.
#[tokio::test]
async fn readiness_is_503_while_no_writable_primary_is_reachable_and_liveness_stays_200() {
    let pair = ReplicaPair::shared();
    let on_primary = TestApp::builder().replica(pair).spawn().await;
    assert_eq!(on_primary.get("/health/ready").await.status(), 200);

    // The binary, started as an operator would (the test builder migrates, which a standby
    // refuses).
    let standby_url = pair.replica.url(&on_primary.database_name());
    let on_standby = Binary::start(
        &std::env::temp_dir(),
        &[
            ("DATABASE_URL", &standby_url),
            ("DB_AUTO_MIGRATE", "false"),
            ("DB_CONNECT_TIMEOUT", "2"),
        ],
    );
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{}{path}", on_standby.base())).send();
    let live = get("/health/live").await.expect("an answer");
    assert_eq!(live.status(), 200, "alive");
    let ready = get("/health/ready").await.expect("an answer");
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["database"]["status"], "down", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no writable primary")),
        "{body}"
    );
    let (status, binary) = on_standby.stop(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", binary.output());
}
