//! Nested transactions (savepoints) and streamed queries inside the request's transaction,
//! through SeaORM's own API on [`Tx`] (`TransactionTrait::begin`, `commit`, `rollback`,
//! `transaction`, `Entity::find().stream(&tx)`), in test-only routes mounted on the real
//! middleware. Every test runs on PostgreSQL, MariaDB, SQLite and PostgreSQL behind PgBouncer in
//! transaction mode (`savepoints::postgres::…`, `savepoints::mariadb::…`, …).

use actix_web::{HttpResponse, web};
use app::domain::catalog::create_warehouse;
use app::domain::values::{Name, WarehouseCode};
use app::problem::ApiError;
use entity::warehouse;
use futures_util::TryStreamExt as _;
use sea_orm::{
    AccessMode, ConnectionTrait, DbErr, EntityTrait, IsolationLevel, Set, TransactionTrait,
};
use sea_orm_actix_tx::{Layer, Tx};
use serde_json::{Value, json};

use crate::support::{TestApp, on_every_backend, problem};

on_every_backend!(
    routes = crate::savepoints::routes;
    a_committed_savepoint_commits_with_the_request,
    a_rolled_back_or_dropped_savepoint_leaves_only_the_outer_writes,
    a_failure_inside_a_rolled_back_savepoint_does_not_poison_the_request,
    a_failure_outside_any_savepoint_or_in_a_released_one_forbids_the_commit,
    savepoints_nest_two_levels_deep,
    a_stream_of_a_thousand_rows_sees_the_requests_own_uncommitted_writes,
    a_read_only_request_takes_savepoints_and_streams,
    a_savepoint_cannot_change_the_isolation_or_access_mode,
);

pub(crate) fn routes(cfg: &mut web::ServiceConfig, layer: &Layer) {
    let tx = layer.transactional();
    cfg.route("/test/sp/commit", web::post().to(commit).wrap(tx.clone()))
        .route("/test/sp/end/{how}", web::post().to(end).wrap(tx.clone()))
        .route(
            "/test/sp/forgiven",
            web::post().to(forgiven).wrap(tx.clone()),
        )
        .route(
            "/test/sp/unforgiven/{where}",
            web::post().to(unforgiven).wrap(tx.clone()),
        )
        .route("/test/sp/nested", web::post().to(nested).wrap(tx.clone()))
        .route(
            "/test/sp/stream/{rows}",
            web::post().to(stream).wrap(tx.clone()),
        )
        .route("/test/sp/read", web::get().to(read).wrap(tx.clone()))
        .route("/test/sp/config", web::post().to(config).wrap(tx.clone()));
}

/// A warehouse coded `code`, through any connection: the request's transaction or a savepoint.
async fn create(db: &impl ConnectionTrait, code: &str) -> Result<(), ApiError> {
    create_warehouse(db, &WarehouseCode::parse(code)?, &Name::parse("test")?).await?;
    Ok(())
}

/// The first statement of the request is the savepoint's: the transaction begins under it.
async fn commit(tx: Tx) -> Result<HttpResponse, ApiError> {
    let savepoint = tx.begin().await?;
    create(&savepoint, "SP-COMMITTED").await?;
    savepoint.commit().await?;
    create(&tx, "SP-AFTER").await?;
    Ok(HttpResponse::Created().finish())
}

/// A savepoint ended by `rollback` or by being dropped, then a write outside it.
async fn end(tx: Tx, how: web::Path<String>) -> Result<HttpResponse, ApiError> {
    create(&tx, "OUTER-BEFORE").await?;
    let savepoint = tx.begin().await?;
    create(&savepoint, "SP-UNDONE").await?;
    match how.as_str() {
        "rollback" => savepoint.rollback().await?,
        _ => drop(savepoint),
    }
    create(&tx, "OUTER-AFTER").await?;
    Ok(HttpResponse::Created().finish())
}

/// A unique violation inside a savepoint that is rolled back; the request's other writes stand.
async fn forgiven(tx: Tx) -> Result<HttpResponse, ApiError> {
    create(&tx, "TAKEN").await?;
    let savepoint = tx.begin().await?;
    let duplicate = create(&savepoint, "TAKEN").await;
    assert!(duplicate.is_err(), "the duplicate fails");
    savepoint.rollback().await?;
    // The same through SeaORM's closure API: an `Err` rolls the savepoint back.
    let closure = tx
        .transaction::<_, (), DbErr>(|savepoint| {
            Box::pin(async move {
                warehouse::Entity::insert(warehouse::ActiveModel {
                    code: Set("TAKEN".to_owned()),
                    name: Set("test".to_owned()),
                    created_at: Set(chrono::Utc::now()),
                    ..Default::default()
                })
                .exec(savepoint)
                .await?;
                Ok(())
            })
        })
        .await;
    assert!(closure.is_err(), "the closure's duplicate fails");
    create(&tx, "AFTER-FORGIVEN").await?;
    Ok(HttpResponse::Created().finish())
}

/// A unique violation the handler ignores, outside any savepoint (`outside`) or inside one that
/// it then commits (`released`); it answers 201 all the same.
async fn unforgiven(tx: Tx, place: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let savepoint = tx.begin().await?;
    create(&savepoint, "SP-KEPT").await?;
    savepoint.commit().await?;
    create(&tx, "DUP").await?;
    if place.as_str() == "released" {
        let savepoint = tx.begin().await?;
        let _ignored = create(&savepoint, "DUP").await;
        // PostgreSQL refuses the RELEASE of an aborted savepoint, MariaDB and SQLite accept it:
        // the request must not commit either way.
        let _ignored = savepoint.commit().await;
    } else {
        let _ignored = create(&tx, "DUP").await;
    }
    Ok(HttpResponse::Created().finish())
}

/// Two levels: level 1 kept, a failing level 2 rolled back (explicitly, then by the closure API),
/// another level 2 committed; a level-2 handle begun from the outer one nests too.
async fn nested(tx: Tx) -> Result<HttpResponse, ApiError> {
    let level1 = tx.begin().await?;
    create(&level1, "L1").await?;
    let level2 = level1.begin().await?;
    create(&level2, "L2-UNDONE").await?;
    assert!(create(&level2, "L1").await.is_err(), "the duplicate fails");
    level2.rollback().await?;
    let closure = level1
        .transaction::<_, (), ApiError>(|level2| {
            Box::pin(async move {
                create(level2, "L2-CLOSURE").await?;
                Err(ApiError::Layer(sea_orm_actix_tx::Error::Internal))
            })
        })
        .await;
    assert!(closure.is_err(), "the closure's error rolls it back");
    let level2 = level1.begin().await?;
    create(&level2, "L2-KEPT").await?;
    let level3 = level2.begin().await?;
    create(&level3, "L3-KEPT").await?;
    level3.commit().await?;
    level2.commit().await?;
    // Committing level 1 with a level 2 still open rolls the level 2 back first.
    let open = level1.begin().await?;
    create(&open, "L2-LEFT-OPEN").await?;
    level1.commit().await?;
    // Its handle outlives it: dropping it is nothing more to do.
    drop(open);
    Ok(HttpResponse::Created().finish())
}

/// `rows` warehouses written, uncommitted, then read back as a stream, in the transaction and in
/// a savepoint; then another statement on the same connection.
async fn stream(tx: Tx, rows: web::Path<usize>) -> Result<HttpResponse, ApiError> {
    let now = chrono::Utc::now();
    let models = (0..*rows).map(|i| warehouse::ActiveModel {
        code: Set(format!("S{i:05}")),
        name: Set("streamed".to_owned()),
        created_at: Set(now),
        ..Default::default()
    });
    warehouse::Entity::insert_many(models).exec(&tx).await?;
    let mut streamed = 0;
    let mut rows_of = warehouse::Entity::find().stream(&tx).await?;
    while let Some(row) = rows_of.try_next().await? {
        assert_eq!(row.name, "streamed");
        streamed += 1;
    }
    drop(rows_of);
    // A stream dropped before its end leaves the connection usable.
    let mut partly = warehouse::Entity::find().stream(&tx).await?;
    for _ in 0..10 {
        partly.try_next().await?;
    }
    drop(partly);
    let savepoint = tx.begin().await?;
    create(&savepoint, "IN-SAVEPOINT").await?;
    let in_savepoint: Vec<warehouse::Model> = warehouse::Entity::find()
        .stream(&savepoint)
        .await?
        .try_collect()
        .await?;
    savepoint.commit().await?;
    let counted = warehouse::Entity::find().all(&tx).await?.len();
    Ok(HttpResponse::Created().json(json!({
        "streamed": streamed,
        "in_savepoint": in_savepoint.len(),
        "counted": counted,
    })))
}

/// A `READ ONLY` request: a savepoint and a stream in it.
async fn read(tx: Tx) -> Result<HttpResponse, ApiError> {
    let savepoint = tx.begin().await?;
    let rows: Vec<warehouse::Model> = warehouse::Entity::find()
        .stream(&savepoint)
        .await?
        .try_collect()
        .await?;
    savepoint.commit().await?;
    Ok(HttpResponse::Ok().json(json!({"rows": rows.len()})))
}

/// A savepoint asked with another access mode or isolation level is refused before anything is
/// sent; one asked with the request's own is begun.
async fn config(tx: Tx) -> Result<HttpResponse, ApiError> {
    let read_only_refused = tx
        .begin_with_config(None, Some(AccessMode::ReadOnly))
        .await
        .is_err();
    // Begun on SQLite (one isolation level), and dropped at once: rolled back.
    let serializable_refused = tx
        .begin_with_config(Some(IsolationLevel::Serializable), None)
        .await
        .is_err();
    let own = tx
        .begin_with_config(None, Some(AccessMode::ReadWrite))
        .await?;
    create(&own, "CONFIG").await?;
    own.commit().await?;
    Ok(HttpResponse::Created().json(json!({
        "read_only_refused": read_only_refused,
        "serializable_refused": serializable_refused,
    })))
}

async fn codes(app: &TestApp) -> Vec<String> {
    let rows = app
        .db
        .query_all_raw(sea_orm::Statement::from_string(
            app.db.get_database_backend(),
            "SELECT code FROM warehouse ORDER BY code",
        ))
        .await
        .expect("query runs");
    rows.iter()
        .map(|r| r.try_get_by_index::<String>(0).expect("text"))
        .collect()
}

async fn post(app: &TestApp, path: &str) -> reqwest::Response {
    app.post(path, &json!({})).await
}

/// The JSON body (or `null`) of a response, after checking its status.
async fn answered(res: reqwest::Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let text = res.text().await.expect("a body");
    assert_eq!(got, status, "{text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn a_committed_savepoint_commits_with_the_request(app: TestApp) {
    answered(post(&app, "/test/sp/commit").await, 201).await;
    assert_eq!(codes(&app).await, ["SP-AFTER", "SP-COMMITTED"]);
}

async fn a_rolled_back_or_dropped_savepoint_leaves_only_the_outer_writes(app: TestApp) {
    for how in ["rollback", "drop"] {
        answered(post(&app, &format!("/test/sp/end/{how}")).await, 201).await;
        assert_eq!(codes(&app).await, ["OUTER-AFTER", "OUTER-BEFORE"], "{how}");
        app.db
            .execute_unprepared("DELETE FROM warehouse")
            .await
            .expect("cleared");
    }
}

async fn a_failure_inside_a_rolled_back_savepoint_does_not_poison_the_request(app: TestApp) {
    answered(post(&app, "/test/sp/forgiven").await, 201).await;
    assert_eq!(codes(&app).await, ["AFTER-FORGIVEN", "TAKEN"]);
}

async fn a_failure_outside_any_savepoint_or_in_a_released_one_forbids_the_commit(app: TestApp) {
    for place in ["outside", "released"] {
        let res = post(&app, &format!("/test/sp/unforgiven/{place}")).await;
        let (status, body) = problem(res).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("already_exists")),
            "{place}: {body}"
        );
        assert!(codes(&app).await.is_empty(), "{place}: nothing committed");
    }
}

async fn savepoints_nest_two_levels_deep(app: TestApp) {
    answered(post(&app, "/test/sp/nested").await, 201).await;
    assert_eq!(codes(&app).await, ["L1", "L2-KEPT", "L3-KEPT"]);
}

async fn a_stream_of_a_thousand_rows_sees_the_requests_own_uncommitted_writes(app: TestApp) {
    let body = answered(post(&app, "/test/sp/stream/1000").await, 201).await;
    assert_eq!(
        body,
        json!({"streamed": 1000, "in_savepoint": 1001, "counted": 1001})
    );
    assert_eq!(app.scalar("SELECT count(*) FROM warehouse").await, 1001);
}

async fn a_read_only_request_takes_savepoints_and_streams(app: TestApp) {
    app.warehouse("R1").await;
    app.warehouse("R2").await;
    let body = answered(app.get("/test/sp/read").await, 200).await;
    assert_eq!(body, json!({"rows": 2}));
}

async fn a_savepoint_cannot_change_the_isolation_or_access_mode(app: TestApp) {
    let body = answered(post(&app, "/test/sp/config").await, 201).await;
    // SQLite has one isolation level: asking for another is not an error there (as in SeaORM).
    let sqlite = app.db.get_database_backend() == sea_orm::DbBackend::Sqlite;
    assert_eq!(
        body,
        json!({"read_only_refused": true, "serializable_refused": !sqlite})
    );
    assert_eq!(codes(&app).await, ["CONFIG"]);
}
