//! Statements of the busiest routes rendered once per backend, their values bound per call.
//! Rendering a SeaORM query (building the sea-query tree, writing its SQL) cost more CPU per
//! request than the rest of a handler (bench/NOTES.md, issue 23); the text of these statements
//! never depends on their values, so the builder runs once per backend and each call only
//! supplies the values, in the builder's order. Debug builds (the tests) check every call
//! against the builder: the text and the values must be exactly what it would send. Their rows
//! can be read by column place ([`by_place`]), which skips SeaORM's lookups by name.

use std::fmt::Debug;
use std::sync::OnceLock;

use sea_orm::{DbBackend, DbErr, FromQueryResult, QueryResult, Statement, Value, Values};

/// One statement's text for each backend, rendered on first use.
pub(super) struct Rendered([OnceLock<String>; 3]);

impl Rendered {
    pub(super) const fn new() -> Rendered {
        Rendered([OnceLock::new(), OnceLock::new(), OnceLock::new()])
    }

    /// The statement `build` renders for `backend`, with `values` (in the order of its
    /// placeholders) instead of the ones it was first rendered with.
    pub(super) fn statement<const N: usize>(
        &self,
        backend: DbBackend,
        build: impl Fn() -> Statement,
        values: [Value; N],
    ) -> Statement {
        let slot = match backend {
            DbBackend::Postgres => 0,
            DbBackend::MySql => 1,
            _ => 2,
        };
        let sql = self.0[slot].get_or_init(|| build().sql);
        let statement = Statement {
            sql: sql.clone(),
            values: Some(Values(values.into())),
            db_backend: backend,
        };
        debug_assert_eq!(
            statement,
            build(),
            "a rendered statement is what its builder sends"
        );
        statement
    }
}

/// A model read from `row` by column place (`read`): a lookup by name hashes the name, once
/// per column (bench/NOTES.md, issue 23). The statement must select the columns in the
/// entity's order; debug builds (the tests) check the model against SeaORM's reading by name.
pub(super) fn by_place<M: FromQueryResult + PartialEq + Debug>(
    row: &QueryResult,
    read: impl FnOnce(&QueryResult) -> Result<M, DbErr>,
) -> Result<M, DbErr> {
    let model = read(row)?;
    debug_assert_eq!(
        M::from_query_result(row, "").ok().as_ref(),
        Some(&model),
        "the columns are read in the statement's order"
    );
    Ok(model)
}
