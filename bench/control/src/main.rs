//! The benchmark's control: `GET /products/{id}` (W1) and `POST /transfers` (W2) written the
//! shortest way on actix-web and sqlx, with nothing of the app's layer (no ORM, no middleware,
//! no admission queue, no retries, no metrics). It sends PostgreSQL the app's statements, text
//! for text and with the same parameter types (bench/NOTES.md), over a pool of the app's size
//! with the app's startup parameters, and answers with the app's JSON. So the difference
//! between the app and this server in one run is what the app's layer costs.
//!
//! Environment: `DATABASE_URL` (required), `APP_PORT` (default 8080), `APP_WORKERS` (default
//! 2), `DB_APPLICATION_NAME` (default `control`), `READ_ONLY_END=drop` (see [`State`]) and
//! `DB_POOLER=transaction` (behind PgBouncer: no named prepared statements, no startup
//! parameters, the isolation in every `BEGIN`). `TELEMETRY=on` adds what a service written by
//! hand logs and counts per request (`telemetry.rs`); off by default, and then none of it runs.

mod telemetry;

use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, http::StatusCode, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

// The statements the app sends (bench/NOTES.md), byte for byte.
const SELECT_PRODUCT: &str = r#"SELECT "product"."id", "product"."sku", "product"."name", "product"."created_at" FROM "product" WHERE "product"."id" = $1 LIMIT $2"#;
// Creates a missing empty row and locks both, in warehouse order (the app's `lock_stock_rows`).
const LOCK_STOCK: &str = r#"INSERT INTO "stock_level" ("warehouse_id", "product_id", "quantity", "updated_at") SELECT "w"."id", "p"."id", 0, $1 FROM "warehouse" AS "w" JOIN "product" AS "p" ON "p"."id" = $2 WHERE "w"."id" IN ($3, $4) ORDER BY "w"."id" ON CONFLICT ("warehouse_id", "product_id") DO UPDATE SET "quantity" = "stock_level"."quantity""#;
const DEBIT: &str = r#"UPDATE "stock_level" SET "quantity" = "quantity" - $1, "updated_at" = $2 WHERE "stock_level"."warehouse_id" = $3 AND "stock_level"."product_id" = $4 AND "stock_level"."quantity" >= $5"#;
const CREDIT: &str = r#"INSERT INTO "stock_level" ("warehouse_id", "product_id", "quantity", "updated_at") VALUES ($1, $2, $3, $4) ON CONFLICT ("warehouse_id", "product_id") DO UPDATE SET "quantity" = "stock_level"."quantity" + $5, "updated_at" = $6"#;
const RECORD: &str = r#"INSERT INTO "movement" ("kind", "product_id", "from_warehouse_id", "to_warehouse_id", "quantity", "created_at") VALUES ($1, $2, $3, $4, $5, $6) RETURNING "id", "kind", "product_id", "from_warehouse_id", "to_warehouse_id", "quantity", "created_at""#;
// Only on the failure path: which of the two is missing.
const EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM warehouse WHERE id = $1), EXISTS (SELECT 1 FROM product WHERE id = $2)";

struct State {
    pool: PgPool,
    begin_read_only: &'static str,
    begin_write: &'static str,
    /// Named prepared statements, cached per connection (not behind PgBouncer).
    persistent: bool,
    /// `READ_ONLY_END=drop`: end W1's transaction by dropping it, which queues a `ROLLBACK`
    /// that goes out with the pool's release check, instead of awaiting a `COMMIT` (lever (b)
    /// of issue 14; equivalent for a READ ONLY transaction below SERIALIZABLE).
    drop_read_only: bool,
}

#[derive(Serialize)]
struct Product {
    id: i64,
    sku: String,
    name: String,
    created_at: DateTime<Utc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTransfer {
    from_warehouse_id: i64,
    to_warehouse_id: i64,
    product_id: i64,
    quantity: i64,
}

#[derive(Serialize)]
struct Movement {
    id: i64,
    kind: String,
    product_id: i64,
    from_warehouse_id: Option<i64>,
    to_warehouse_id: Option<i64>,
    quantity: i64,
    created_at: DateTime<Utc>,
}

/// An answer other than success, as RFC 9457 problem details like the app's.
struct Problem(StatusCode, &'static str, String);

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut => Problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "pool_timeout",
                "no database connection available".into(),
            ),
            other => {
                eprintln!("database error: {other}");
                Problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error".into(),
                )
            }
        }
    }
}

impl Problem {
    fn response(self) -> HttpResponse {
        let Problem(status, code, detail) = self;
        HttpResponse::build(status).json(serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or(""),
            "status": status.as_u16(),
            "detail": detail,
            "code": code,
        }))
    }
}

fn answer<T: Serialize>(status: StatusCode, result: Result<T, Problem>) -> HttpResponse {
    match result {
        Ok(body) => HttpResponse::build(status).json(body),
        Err(problem) => problem.response(),
    }
}

async fn get_product(state: web::Data<State>, id: web::Path<i64>) -> HttpResponse {
    answer(StatusCode::OK, product(&state, id.into_inner()).await)
}

async fn product(state: &State, id: i64) -> Result<Product, Problem> {
    let mut tx = state.pool.begin_with(state.begin_read_only).await?;
    let row = sqlx::query(SELECT_PRODUCT)
        .persistent(state.persistent)
        .bind(id)
        .bind(1_i64)
        .fetch_optional(&mut *tx)
        .await?;
    if state.drop_read_only {
        drop(tx);
    } else {
        tx.commit().await?;
    }
    let row = row.ok_or_else(|| {
        Problem(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("product {id} not found"),
        )
    })?;
    Ok(Product {
        id: row.try_get(0)?,
        sku: row.try_get(1)?,
        name: row.try_get(2)?,
        created_at: row.try_get(3)?,
    })
}

async fn post_transfer(state: web::Data<State>, body: web::Json<NewTransfer>) -> HttpResponse {
    answer(
        StatusCode::CREATED,
        transfer(&state, body.into_inner()).await,
    )
}

async fn transfer(state: &State, t: NewTransfer) -> Result<Movement, Problem> {
    if t.from_warehouse_id == t.to_warehouse_id || !(1..=1_000_000_000).contains(&t.quantity) {
        return Err(Problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "two different warehouses and a quantity of 1..=1000000000".into(),
        ));
    }
    let at = Utc::now();
    let mut tx = state.pool.begin_with(state.begin_write).await?;
    sqlx::query(LOCK_STOCK)
        .persistent(state.persistent)
        .bind(at)
        .bind(t.product_id)
        .bind(t.from_warehouse_id)
        .bind(t.to_warehouse_id)
        .execute(&mut *tx)
        .await?;
    let debited = sqlx::query(DEBIT)
        .persistent(state.persistent)
        .bind(t.quantity)
        .bind(at)
        .bind(t.from_warehouse_id)
        .bind(t.product_id)
        .bind(t.quantity)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if debited != 1 {
        let (warehouse, product): (bool, bool) = sqlx::query_as(EXISTS)
            .persistent(state.persistent)
            .bind(t.from_warehouse_id)
            .bind(t.product_id)
            .fetch_one(&mut *tx)
            .await?;
        // Dropping `tx` rolls back.
        return Err(match (warehouse, product) {
            (false, _) => not_found("warehouse", t.from_warehouse_id),
            (_, false) => not_found("product", t.product_id),
            _ => Problem(
                StatusCode::CONFLICT,
                "insufficient_stock",
                format!(
                    "warehouse {} holds less than {} of product {}",
                    t.from_warehouse_id, t.quantity, t.product_id
                ),
            ),
        });
    }
    let credited = sqlx::query(CREDIT)
        .persistent(state.persistent)
        .bind(t.to_warehouse_id)
        .bind(t.product_id)
        .bind(t.quantity)
        .bind(at)
        .bind(t.quantity)
        .bind(at)
        .execute(&mut *tx)
        .await;
    if let Err(sqlx::Error::Database(e)) = &credited
        && e.code().as_deref() == Some("23503")
    {
        // The source held the product, so a missing reference is the destination.
        return Err(not_found("warehouse", t.to_warehouse_id));
    }
    credited?;
    let m = sqlx::query(RECORD)
        .persistent(state.persistent)
        .bind("transfer")
        .bind(t.product_id)
        .bind(Some(t.from_warehouse_id))
        .bind(Some(t.to_warehouse_id))
        .bind(t.quantity)
        .bind(at)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Movement {
        id: m.try_get(0)?,
        kind: m.try_get(1)?,
        product_id: m.try_get(2)?,
        from_warehouse_id: m.try_get(3)?,
        to_warehouse_id: m.try_get(4)?,
        quantity: m.try_get(5)?,
        created_at: m.try_get(6)?,
    })
}

fn not_found(what: &str, id: i64) -> Problem {
    Problem(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("{what} {id} not found"),
    )
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|_| format!("{name}: cannot parse {v:?}")),
        Err(_) => Ok(default),
    }
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is required")?;
    let port: u16 = env_or("APP_PORT", 8080)?;
    let workers: usize = env_or("APP_WORKERS", 2)?;
    let pooled = std::env::var("DB_POOLER").is_ok_and(|v| v == "transaction");
    let drop_read_only = std::env::var("READ_ONLY_END").is_ok_and(|v| v == "drop");

    let name = std::env::var("DB_APPLICATION_NAME").unwrap_or_else(|_| "control".into());
    let mut connect: PgConnectOptions = url.parse()?;
    connect = connect.application_name(&name);
    let state = if pooled {
        // PgBouncer in transaction mode: unnamed statements only, no startup `options`, and the
        // isolation level the app's connections get at startup goes into each BEGIN instead.
        connect = connect.extra_float_digits(None);
        State {
            pool: pool(connect).await?,
            begin_read_only: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            begin_write: "BEGIN ISOLATION LEVEL READ COMMITTED",
            persistent: false,
            drop_read_only,
        }
    } else {
        // The app's startup parameters.
        connect = connect.options([
            ("jit", "off"),
            ("default_transaction_isolation", "repeatable read"),
        ]);
        State {
            pool: pool(connect).await?,
            begin_read_only: "BEGIN READ ONLY",
            begin_write: "BEGIN ISOLATION LEVEL READ COMMITTED",
            persistent: true,
            drop_read_only,
        }
    };
    let state = web::Data::new(state);
    let server = if std::env::var("TELEMETRY").is_ok_and(|v| v == "on") {
        let telemetry = telemetry::init();
        HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(telemetry::observe))
                .app_data(state.clone())
                .app_data(telemetry.clone())
                .configure(routes)
                .route("/metrics", web::get().to(telemetry::metrics))
        })
        .workers(workers)
        .bind(("127.0.0.1", port))?
        .run()
        .await
    } else {
        HttpServer::new(move || App::new().app_data(state.clone()).configure(routes))
            .workers(workers)
            .bind(("127.0.0.1", port))?
            .run()
            .await
    };
    Ok(server?)
}

fn routes(cfg: &mut web::ServiceConfig) {
    // Grouped by first segment as the app's routes are (app/src/routes/mod.rs): actix matches a
    // `{param}` by a regex over what the scope leaves of the path.
    cfg.service(web::scope("/products").route("/{id}", web::get().to(get_product)))
        .route("/transfers", web::post().to(post_transfer))
        .route("/health/ready", web::get().to(HttpResponse::Ok));
}

/// The app's pool: 10 kept open, 30 at most, 30 s to wait for one, and no ping on checkout (the
/// app pings only a connection idle for a second, which never happens under load).
async fn pool(connect: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .min_connections(10)
        .max_connections(30)
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire(false)
        .connect_with(connect)
        .await
}
