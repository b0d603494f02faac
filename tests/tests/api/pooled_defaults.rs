//! Behind PgBouncer (`DB_POOLER=transaction`) a transaction's `BEGIN` sets only what differs
//! from the server's defaults, learned once at start-up through the pooler
//! (`docs/scale-out.md`, *Settings at no cost*). Where a setting's value came from is read
//! inside the transaction (`pg_settings.source`: `session` after a `SET LOCAL`, `database` from
//! `ALTER DATABASE … SET`), beside what the layer says it learned.

use actix_web::{HttpResponse, web};
use futures_util::future::join_all;
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};
use sea_orm_actix_tx::transaction::Session;
use sea_orm_actix_tx::{Layer, Tx};
use serde_json::{Value, json};

use crate::support::{TestApp, TestDatabase};

const SETTINGS: &str = "SELECT current_setting('transaction_isolation'), \
     current_setting('jit'), current_setting('statement_timeout'), \
     (SELECT source FROM pg_settings WHERE name = 'jit'), \
     (SELECT source FROM pg_settings WHERE name = 'statement_timeout'), \
     current_setting('idle_in_transaction_session_timeout')";

/// `GET /test/setting-sources`: the settings in force inside the request's transaction, where
/// each came from, and what the layer learned of the server's defaults.
fn routes(cfg: &mut web::ServiceConfig, layer: &Layer) {
    let session = layer.config().session.clone();
    cfg.route(
        "/test/setting-sources",
        web::get()
            .to(move |tx: Tx| setting_sources(tx, session.clone()))
            .wrap(layer.transactional()),
    );
}

async fn setting_sources(tx: Tx, session: Session) -> HttpResponse {
    let row = tx
        .query_one_raw(Statement::from_string(DatabaseBackend::Postgres, SETTINGS))
        .await;
    let Ok(Some(row)) = row else {
        return HttpResponse::InternalServerError().json(json!({"error": format!("{row:?}")}));
    };
    let text = |i: usize| row.try_get_by_index::<String>(i).unwrap_or_default();
    let (set_local, server_isolation) = match &session {
        Session::Pooled(pooled) => (
            pooled.set_local().map(<[_]>::to_vec),
            pooled.server_isolation().map(|level| format!("{level:?}")),
        ),
        Session::Direct { .. } => (None, None),
    };
    HttpResponse::Ok().json(json!({
        "transaction_isolation": text(0),
        "jit": text(1),
        "statement_timeout": text(2),
        "jit_source": text(3),
        "statement_timeout_source": text(4),
        "idle_in_transaction_session_timeout": text(5),
        "set_local": set_local,
        "server_isolation": server_isolation,
    }))
}

/// A fresh database with `defaults` (`ALTER DATABASE … SET`), and the app behind PgBouncer over
/// it with `DB_STATEMENT_TIMEOUT_MS=1500` (and the default `repeatable_read`, `DB_JIT=false`),
/// once the layer has learned the server's defaults.
async fn pooled_app_over(defaults: &[&str]) -> TestApp {
    let database = TestDatabase::create().await;
    let admin = database.connect().await;
    for setting in defaults {
        admin
            .execute_unprepared(&format!(
                "ALTER DATABASE \"{}\" SET {setting}",
                database.name
            ))
            .await
            .expect("ALTER DATABASE … SET");
    }
    let _ = admin.close().await;
    let app = TestApp::builder()
        .database(database)
        .pooled()
        .env(&[("DB_STATEMENT_TIMEOUT_MS", "1500")])
        .routes(routes)
        .spawn()
        .await;
    app.wait_until("the layer learned the server's defaults", || async {
        let res = app.get("/test/setting-sources").await;
        res.json::<Value>()
            .await
            .is_ok_and(|body| !body["set_local"].is_null())
    })
    .await;
    app
}

/// The settings seen inside transactions, from more concurrent requests than PgBouncer has
/// server connections (so that several server connections answer).
async fn seen(app: &TestApp) -> Vec<Value> {
    let responses = join_all((0..12).map(|_| app.get("/test/setting-sources"))).await;
    let mut seen = Vec::new();
    for res in responses {
        assert_eq!(res.status(), 200);
        seen.push(res.json().await.expect("json"));
    }
    seen
}

#[tokio::test]
async fn behind_pgbouncer_a_database_with_the_services_settings_as_defaults_gets_no_set_local() {
    let app = pooled_app_over(&[
        "default_transaction_isolation = 'repeatable read'",
        "jit = off",
        "statement_timeout = 1500",
        "idle_in_transaction_session_timeout = 30000",
    ])
    .await;

    for body in seen(&app).await {
        assert_eq!(body["set_local"], json!([]), "nothing differs: {body}");
        assert_eq!(body["server_isolation"], "RepeatableRead", "{body}");
        // In force, and from the database's defaults, not from a SET LOCAL.
        assert_eq!(body["transaction_isolation"], "repeatable read", "{body}");
        assert_eq!(body["jit"], "off", "{body}");
        assert_eq!(body["statement_timeout"], "1500ms", "{body}");
        assert_eq!(body["jit_source"], "database", "{body}");
        assert_eq!(body["statement_timeout_source"], "database", "{body}");
        assert_eq!(body["idle_in_transaction_session_timeout"], "30s", "{body}");
    }
}

#[tokio::test]
async fn behind_pgbouncer_settings_that_differ_from_the_servers_defaults_are_still_set() {
    // The server's default level is READ COMMITTED, its statement_timeout and
    // idle_in_transaction_session_timeout 0; only jit matches the service's settings.
    let app = pooled_app_over(&["jit = off"]).await;

    for body in seen(&app).await {
        assert_eq!(
            body["set_local"],
            json!(["statement_timeout", "idle_in_transaction_session_timeout"]),
            "{body}"
        );
        assert_eq!(body["idle_in_transaction_session_timeout"], "30s", "{body}");
        assert_eq!(body["server_isolation"], "ReadCommitted", "{body}");
        assert_eq!(
            body["transaction_isolation"], "repeatable read",
            "the configured level, named in the BEGIN: {body}"
        );
        assert_eq!(body["statement_timeout"], "1500ms", "{body}");
        assert_eq!(body["statement_timeout_source"], "session", "{body}");
        assert_eq!(body["jit"], "off", "{body}");
        assert_eq!(body["jit_source"], "database", "not set again: {body}");
    }
}
