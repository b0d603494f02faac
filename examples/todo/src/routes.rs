//! The HTTP API: `POST /todos`, `GET /todos/{id}`, `POST /todos/{id}/done`, each in the
//! request's transaction (`Tx`), and `GET /metrics` outside any. Errors are problem+json with a
//! stable `code`: the layer's own, and the list's (`not_found`, `validation_failed`,
//! `title_taken`, `malformed_json`).

use actix_web::http::StatusCode;
use actix_web::http::header::{ContentType, LOCATION};
use actix_web::{HttpRequest, HttpResponse, ResponseError, error, web};
use chrono::Utc;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, ConnectionTrait, DbErr, EntityTrait};
use sea_orm_actix_tx::{DbFailure, FailureKind, Layer, Tx, problem_response};
use serde::Deserialize;

use crate::todo;

/// The name of the unique index on `todo.title`.
pub const TITLE_KEY: &str = "todo_title_key";

/// The list's own errors, and the layer's.
#[derive(Debug, thiserror::Error)]
pub enum TodoError {
    #[error("todo {0} not found")]
    NotFound(i64),
    #[error("title: must be 1 to 200 characters and not blank")]
    InvalidTitle,
    #[error("a todo with this title exists")]
    TitleTaken,
    #[error(transparent)]
    Layer(#[from] sea_orm_actix_tx::Error),
}

impl TodoError {
    /// What a database failure means to the list, when it means something: the constraints
    /// it knows by name. `None` leaves the failure to the layer. Used twice: by the handlers'
    /// `?` (below), and by the layer's `on_failure` for a failure no handler answered (a
    /// statement error the handler ignored, a `COMMIT` that failed).
    pub fn of_failure(failure: &DbFailure) -> Option<TodoError> {
        match &failure.kind {
            // SQLite does not name the constraint; `title` is the table's only unique key.
            FailureKind::UniqueViolation(name)
                if name.as_deref().is_none_or(|n| n.ends_with(TITLE_KEY)) =>
            {
                Some(TodoError::TitleTaken)
            }
            _ => None,
        }
    }
}

impl From<DbErr> for TodoError {
    fn from(err: DbErr) -> TodoError {
        let failure = DbFailure::classify(&err);
        TodoError::of_failure(&failure).unwrap_or_else(|| TodoError::Layer(failure.into()))
    }
}

impl ResponseError for TodoError {
    fn status_code(&self) -> StatusCode {
        match self {
            TodoError::NotFound(_) => StatusCode::NOT_FOUND,
            TodoError::InvalidTitle => StatusCode::UNPROCESSABLE_ENTITY,
            TodoError::TitleTaken => StatusCode::CONFLICT,
            TodoError::Layer(e) => e.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            TodoError::NotFound(_) => "not_found",
            TodoError::InvalidTitle => "validation_failed",
            TodoError::TitleTaken => "title_taken",
            TodoError::Layer(e) => return e.error_response(),
        };
        problem_response(self.status_code(), code, self.to_string())
    }
}

#[derive(Debug, Deserialize)]
pub struct NewTodo {
    pub title: String,
}

/// The service's own series, beside the layer's in the same registry.
#[derive(Clone, Debug, Default)]
pub struct TodoMetrics {
    created: Counter,
}

impl TodoMetrics {
    pub fn register(registry: &mut Registry) -> TodoMetrics {
        let metrics = TodoMetrics::default();
        registry.register("todos_created", "To-dos created", metrics.created.clone());
        metrics
    }
}

/// The routes, each transactional one wrapped in the layer's middleware.
pub fn configure(cfg: &mut web::ServiceConfig, layer: &Layer) {
    let tx = layer.transactional();
    cfg.app_data(web::JsonConfig::default().error_handler(malformed_json))
        .app_data(web::PathConfig::default().error_handler(no_such_path))
        .route("/todos", web::post().to(create).wrap(tx.clone()))
        .route("/todos/{id}", web::get().to(get).wrap(tx.clone()))
        .route("/todos/{id}/done", web::post().to(mark_done).wrap(tx))
        .route("/metrics", web::get().to(metrics));
}

pub async fn create(
    tx: Tx,
    body: web::Json<NewTodo>,
    metrics: web::Data<TodoMetrics>,
) -> Result<HttpResponse, TodoError> {
    let title = body.title.trim();
    if title.is_empty() || title.chars().count() > 200 {
        return Err(TodoError::InvalidTitle);
    }
    let created = insert(&tx, title).await?;
    // Counted once the transaction has committed: never for a rollback, once per request.
    let counter = metrics.created.clone();
    tx.on_commit(move || {
        counter.inc();
    });
    Ok(HttpResponse::Created()
        .insert_header((LOCATION, format!("/todos/{}", created.id)))
        .json(created))
}

pub async fn get(tx: Tx, id: web::Path<i64>) -> Result<web::Json<todo::Model>, TodoError> {
    let id = id.into_inner();
    let found = todo::Entity::find_by_id(id).one(&tx).await?;
    found.map(web::Json).ok_or(TodoError::NotFound(id))
}

pub async fn mark_done(tx: Tx, id: web::Path<i64>) -> Result<web::Json<todo::Model>, TodoError> {
    let id = id.into_inner();
    let found = todo::Entity::find_by_id(id).one(&tx).await?;
    let mut todo: todo::ActiveModel = found.ok_or(TodoError::NotFound(id))?.into();
    todo.done = Set(true);
    Ok(web::Json(todo.update(&tx).await?))
}

/// Inserts a to-do. Takes any connection: the request's `Tx`, or a pool in a job.
pub async fn insert(db: &impl ConnectionTrait, title: &str) -> Result<todo::Model, DbErr> {
    todo::ActiveModel {
        title: Set(title.to_owned()),
        done: Set(false),
        created_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert(db)
    .await
}

/// Prometheus text: the layer's series (the pool's refreshed first) and the service's.
pub async fn metrics(layer: web::Data<Layer>, registry: web::Data<Registry>) -> HttpResponse {
    layer.refresh_metrics();
    let mut body = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut body, &registry);
    HttpResponse::Ok()
        .insert_header(ContentType::plaintext())
        .body(body)
}

fn malformed_json(err: error::JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let response = problem_response(StatusCode::BAD_REQUEST, "malformed_json", err.to_string());
    error::InternalError::from_response(err, response).into()
}

/// An id that is not an integer names no to-do.
fn no_such_path(err: error::PathError, req: &HttpRequest) -> actix_web::Error {
    let detail = format!("{} not found", req.path());
    let response = problem_response(StatusCode::NOT_FOUND, "not_found", detail);
    error::InternalError::from_response(err, response).into()
}
