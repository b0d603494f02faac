//! Assertions over the service's answers: problem+json bodies and 503s.

use serde_json::Value;

/// The `code` of a problem+json response, after checking its content type and shape.
/// Asserts a 503 `database_unavailable` with `Retry-After: 1` (nothing committed, retry later).
pub async fn assert_unavailable(res: reqwest::Response, why: &str) {
    assert_503(res, "database_unavailable", why).await;
}

/// A statement stopped by `DB_STATEMENT_TIMEOUT_MS`: 503 `statement_timeout` with Retry-After.
pub async fn assert_statement_timeout(res: reqwest::Response, why: &str) {
    assert_503(res, "statement_timeout", why).await;
}

/// No connection within `DB_POOL_TIMEOUT`: 503 `pool_timeout` with Retry-After.
pub async fn assert_pool_timeout(res: reqwest::Response, why: &str) {
    assert_503(res, "pool_timeout", why).await;
}

/// A `COMMIT` whose outcome could not be learned: 500 `commit_outcome_unknown`, without
/// `Retry-After` (a retry without the same Idempotency-Key could apply the writes twice).
pub async fn assert_commit_outcome_unknown(res: reqwest::Response, why: &str) {
    assert!(
        res.headers().get("retry-after").is_none(),
        "{why}: no Retry-After"
    );
    let (status, body) = problem(res).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (500, Some("commit_outcome_unknown")),
        "{why}: {body}"
    );
}

async fn assert_503(res: reqwest::Response, code: &str, why: &str) {
    assert_eq!(
        res.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "{why}: Retry-After"
    );
    let (status, body) = problem(res).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some(code)),
        "{why}: {body}"
    );
}

pub async fn problem(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json", "status {status}");
    let body: Value = res.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["type"], "about:blank", "{body}");
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    (status, body)
}
