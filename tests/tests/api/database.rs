//! What the configuration does to real PostgreSQL connections.

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::support::TestApp;

fn hold_route(cfg: &mut actix_web::web::ServiceConfig, layer: &sea_orm_actix_tx::Layer) {
    use actix_web::{HttpResponse, web};
    use sea_orm::ConnectionTrait;
    async fn hold(tx: sea_orm_actix_tx::Tx) -> Result<HttpResponse, app::problem::ApiError> {
        tx.execute_unprepared("SELECT pg_sleep(0.4)").await?;
        let row = tx
            .query_one_raw(sea_orm::Statement::from_string(
                tx.get_database_backend(),
                "SELECT current_setting('jit') || ',' || current_setting('statement_timeout') || ',' \
                 || current_setting('idle_in_transaction_session_timeout')",
            ))
            .await?
            .ok_or(app::problem::ApiError::Layer(
                sea_orm_actix_tx::Error::Internal,
            ))?;
        let settings: String = row
            .try_get_by_index(0)
            .map_err(|_| app::problem::ApiError::Layer(sea_orm_actix_tx::Error::Internal))?;
        Ok(HttpResponse::Ok().json(json!({"settings": settings})))
    }
    cfg.route(
        "/test/hold",
        web::post().to(hold).wrap(layer.transactional()),
    );
}

#[tokio::test]
async fn the_pool_keeps_its_minimum_and_never_exceeds_its_maximum() {
    let app = TestApp::builder()
        .env(&[
            ("DB_POOL_SIZE", "3"),
            ("DB_MAX_OVERFLOW", "2"),
            ("DB_APPLICATION_NAME", "pool-bounds-test"),
        ])
        .routes(hold_route)
        .spawn()
        .await;
    let pool = app.pool.clone();
    app.wait_until("the pool opens its minimum", || {
        let size = sea_orm_actix_tx::db::pool_stats(&pool, 3, 5).size;
        async move { size >= 3 }
    })
    .await;
    let requests = (0..12).map(|_| app.send_json("/test/hold", json!({})));
    let counting = async {
        let mut peak = 0;
        for _ in 0..20 {
            let n = app
                .scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pool-bounds-test'")
                .await;
            peak = peak.max(n);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        peak
    };
    let (responses, peak) = tokio::join!(join_all(requests), counting);
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(peak, 5, "the pool grew to size + overflow and no further");
}

#[tokio::test]
async fn connections_carry_application_name_jit_and_the_timeouts() {
    let app = TestApp::builder()
        .env(&[
            ("DB_APPLICATION_NAME", "settings-test"),
            ("DB_STATEMENT_TIMEOUT_MS", "1500"),
            ("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", "7000"),
        ])
        .routes(hold_route)
        .spawn()
        .await;
    let res: Value = app
        .send_json("/test/hold", json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(res["settings"], "off,1500ms,7s");
    let seen = app
        .scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'settings-test'")
        .await;
    assert!(seen >= 1);
}

#[tokio::test]
async fn a_statement_over_the_statement_timeout_is_cancelled_and_rolled_back() {
    let app = TestApp::builder()
        .env(&[("DB_STATEMENT_TIMEOUT_MS", "100")])
        .routes(hold_route)
        .spawn()
        .await;
    let res = app.send_json("/test/hold", json!({})).await;
    crate::support::assert_statement_timeout(res, "pg_sleep(0.4) is cancelled at 100 ms").await;
}

#[tokio::test]
async fn serverless_mode_keeps_no_idle_connections() {
    let app = TestApp::builder()
        .env(&[("DB_POOL_MODE", "serverless")])
        .routes(hold_route)
        .spawn()
        .await;
    assert_eq!(app.send_json("/test/hold", json!({})).await.status(), 200);
    let pool = app.pool.clone();
    app.wait_until("every connection is closed after use", || {
        let stats = sea_orm_actix_tx::db::pool_stats(&pool, 0, 10);
        async move { stats.size == 0 && stats.idle == 0 }
    })
    .await;
}
