//! `app migrate` on PostgreSQL, MariaDB and SQLite with rows in the tables: `down` reverts one
//! migration unless `-n` says more, `up -n` applies that many, and the commands that destroy
//! data (`fresh`, `refresh`, `reset`) refuse without `--yes`, exit 2 and change nothing. The
//! inventory has three migrations: its own tables, the layer's `idempotency_key`, and the
//! layer's scoping of that table.

use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};

use crate::support::process::run_binary;
use crate::support::{Server, SqliteFile, TestDatabase, connect_to};

/// A database of one backend, its URL and a pool on it for the assertions.
struct Target {
    url: String,
    db: DatabaseConnection,
    _keep: Box<dyn std::any::Any + Send>,
}

impl Target {
    async fn new(backend: &str) -> Target {
        let (url, keep): (String, Box<dyn std::any::Any + Send>) = match backend {
            "postgres" | "mariadb" => {
                let server = if backend == "postgres" {
                    Server::Postgres
                } else {
                    Server::Mariadb
                };
                let database = TestDatabase::create_on(server).await;
                (database.url.clone(), Box::new(database))
            }
            _ => {
                let (file, url) = SqliteFile::new();
                (url, Box::new(file))
            }
        };
        let db = connect_to(&url).await;
        Target {
            url,
            db,
            _keep: keep,
        }
    }

    /// Runs `app migrate <args>`; returns the exit code and stderr.
    fn migrate(&self, args: &[&str]) -> (Option<i32>, String) {
        self.migrate_at(&self.url, args)
    }

    fn migrate_at(&self, url: &str, args: &[&str]) -> (Option<i32>, String) {
        let mut all = vec!["migrate"];
        all.extend_from_slice(args);
        let output = run_binary(&all, &[("DATABASE_URL", url)]);
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn run(&self, args: &[&str]) {
        let (code, stderr) = self.migrate(args);
        assert_eq!(code, Some(0), "app migrate {args:?}: {stderr}");
    }

    /// `SELECT count(*) FROM table`, or `None` when the table does not exist.
    async fn rows(&self, table: &str) -> Option<i64> {
        let sql = format!("SELECT count(*) FROM {table}");
        let statement = Statement::from_string(self.db.get_database_backend(), sql);
        let row = self.db.query_one_raw(statement).await.ok()??;
        row.try_get_by_index::<i64>(0).ok()
    }

    async fn applied(&self) -> i64 {
        self.rows("seaql_migrations").await.unwrap_or(0)
    }

    /// Whether `table` has `column`.
    async fn has_column(&self, table: &str, column: &str) -> bool {
        let sql = format!("SELECT count({column}) FROM {table}");
        let statement = Statement::from_string(self.db.get_database_backend(), sql);
        self.db.query_one_raw(statement).await.is_ok()
    }

    /// Stores a live `Idempotency-Key` row for `key` in `scope` (`None`: before the scope
    /// migration, without the column).
    async fn store_key(&self, scope: Option<&str>, key: &str) {
        let backend = self.db.get_database_backend();
        let now = Utc::now();
        let mut values = vec![
            Value::from(key.to_owned()),
            Value::from("0".repeat(64)),
            Value::from(201),
            Value::from("application/json".to_owned()),
            Value::from(b"{}".to_vec()),
            Value::from(now),
            Value::from(now + chrono::Duration::hours(1)),
        ];
        let columns =
            "request_key, fingerprint, status, content_type, body, created_at, expires_at";
        let (columns, count) = match scope {
            Some(scope) => {
                values.insert(0, Value::from(scope.to_owned()));
                (format!("scope, {columns}"), 8)
            }
            None => (columns.to_owned(), 7),
        };
        let placeholders: Vec<String> = (1..=count)
            .map(|i| {
                if backend == DbBackend::Postgres {
                    format!("${i}")
                } else {
                    "?".to_owned()
                }
            })
            .collect();
        let sql = format!(
            "INSERT INTO idempotency_key ({columns}) VALUES ({})",
            placeholders.join(", ")
        );
        self.db
            .execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await
            .expect("insert a key");
    }

    fn is_sqlite(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Sqlite
    }

    async fn keep_a_warehouse(&self) {
        let statement = Statement::from_string(
            self.db.get_database_backend(),
            "INSERT INTO warehouse (code, name) VALUES ('KEEP', 'Kept')",
        );
        self.db.execute_raw(statement).await.expect("insert");
    }

    /// The same URL with a password in it (no server here asks for one: `fresh` without
    /// `--yes` must refuse before it connects, and never print it).
    fn url_with_password(&self, password: &str) -> Option<String> {
        let (scheme, rest) = self.url.split_once("://")?;
        let (user, host) = rest.split_once('@')?;
        (!user.contains(':')).then(|| format!("{scheme}://{user}:{password}@{host}"))
    }
}

async fn down_reverts_one_migration_and_keeps_the_other_tables_rows(backend: &str) {
    let target = Target::new(backend).await;
    target.run(&["up"]);
    assert_eq!(target.applied().await, 3);
    assert!(target.has_column("idempotency_key", "scope").await);
    target.keep_a_warehouse().await;
    // One key in two scopes: the unscoped table cannot hold both.
    target.store_key(Some(""), "kept").await;
    target.store_key(Some("alice"), "kept").await;

    target.run(&["down"]);
    assert_eq!(target.applied().await, 2, "down reverts exactly one");
    assert!(
        !target.has_column("idempotency_key", "scope").await,
        "the newest (the scope) is reverted"
    );
    let kept = if target.is_sqlite() { 0 } else { 1 };
    assert_eq!(
        target.rows("idempotency_key").await,
        Some(kept),
        "the default scope's key is kept (SQLite's table is created again, empty)"
    );
    // The unscoped primary key is back: the same key again is refused.
    target.store_key(None, "other").await;
    let again = Statement::from_string(
        target.db.get_database_backend(),
        "INSERT INTO idempotency_key (request_key, fingerprint, status, content_type, body, \
         created_at, expires_at) SELECT request_key, fingerprint, status, content_type, body, \
         created_at, expires_at FROM idempotency_key WHERE request_key = 'other'",
    );
    assert!(
        target.db.execute_raw(again).await.is_err(),
        "request_key alone is the primary key again"
    );

    target.run(&["down"]);
    assert_eq!(target.applied().await, 1);
    assert_eq!(target.rows("idempotency_key").await, None);
    assert_eq!(
        target.rows("warehouse").await,
        Some(1),
        "the first's rows survive"
    );

    target.run(&["up", "-n", "1"]);
    assert_eq!(target.applied().await, 2, "up -n 1 applies one");
    assert_eq!(target.rows("idempotency_key").await, Some(0));
    assert!(!target.has_column("idempotency_key", "scope").await);
    target.store_key(None, "before-the-scope").await;

    target.run(&["up", "-n", "1"]);
    assert_eq!(target.applied().await, 3);
    assert!(target.has_column("idempotency_key", "scope").await);
    let kept = if target.is_sqlite() { 0 } else { 1 };
    assert_eq!(
        target.rows("idempotency_key").await,
        Some(kept),
        "a stored key moves to the default scope (SQLite's table is created again, empty)"
    );
    target.store_key(Some("alice"), "before-the-scope").await;
    target.store_key(Some("bob"), "before-the-scope").await;

    target.run(&["down", "-n", "3"]);
    assert_eq!(target.applied().await, 0, "down -n 3 reverts three");
    assert_eq!(target.rows("warehouse").await, None);

    target.run(&["up", "-n", "1"]);
    assert_eq!(target.applied().await, 1, "up -n 1 applies only the first");
    target.run(&[]);
    assert_eq!(target.applied().await, 3, "migrate alone applies the rest");
}

async fn destructive_commands_refuse_without_yes_and_change_nothing(backend: &str) {
    let target = Target::new(backend).await;
    target.run(&["up"]);
    target.keep_a_warehouse().await;
    let password = "never-printed-7f3a";
    let url = target
        .url_with_password(password)
        .unwrap_or_else(|| target.url.clone());
    for command in ["fresh", "refresh", "reset"] {
        let (code, stderr) = target.migrate_at(&url, &[command]);
        assert_eq!(code, Some(2), "{command} without --yes: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains("--yes") && !stderr.contains(password),
            "{stderr}"
        );
        let names_the_database = match backend {
            "sqlite" => stderr.contains("SQLite file"),
            _ => stderr.contains("inventory_test_") && stderr.contains(":"),
        };
        assert!(names_the_database, "{stderr}");
        assert_eq!(target.applied().await, 3, "{command} changed nothing");
        assert_eq!(target.rows("warehouse").await, Some(1), "{command}");
    }

    target.run(&["fresh", "--yes"]);
    assert_eq!(
        target.applied().await,
        3,
        "fresh --yes re-applies everything"
    );
    assert_eq!(
        target.rows("warehouse").await,
        Some(0),
        "and drops the rows"
    );
    target.keep_a_warehouse().await;
    target.run(&["reset", "--yes"]);
    assert_eq!(target.applied().await, 0);
    assert_eq!(target.rows("warehouse").await, None);
}

#[tokio::test]
async fn down_reverts_one_migration_on_postgres() {
    down_reverts_one_migration_and_keeps_the_other_tables_rows("postgres").await;
}

#[tokio::test]
async fn down_reverts_one_migration_on_mariadb() {
    down_reverts_one_migration_and_keeps_the_other_tables_rows("mariadb").await;
}

#[tokio::test]
async fn down_reverts_one_migration_on_sqlite() {
    down_reverts_one_migration_and_keeps_the_other_tables_rows("sqlite").await;
}

#[tokio::test]
async fn fresh_refresh_and_reset_need_yes_on_postgres() {
    destructive_commands_refuse_without_yes_and_change_nothing("postgres").await;
}

#[tokio::test]
async fn fresh_refresh_and_reset_need_yes_on_mariadb() {
    destructive_commands_refuse_without_yes_and_change_nothing("mariadb").await;
}

#[tokio::test]
async fn fresh_refresh_and_reset_need_yes_on_sqlite() {
    destructive_commands_refuse_without_yes_and_change_nothing("sqlite").await;
}

#[test]
fn migrate_help_says_how_many_down_reverts() {
    let output = run_binary(&["migrate", "--help"], &[]);
    let help = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{help}");
    assert!(
        help.contains("LAST applied migration only") && help.contains("-n"),
        "{help}"
    );
    let output = run_binary(&["migrate", "down", "--help"], &[]);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("-n, --num <N>") && help.contains("default: 1"),
        "{help}"
    );
    let output = run_binary(&["migrate", "down", "-n", "0"], &[]);
    assert_eq!(output.status.code(), Some(2), "-n 0 is a usage error");
}
