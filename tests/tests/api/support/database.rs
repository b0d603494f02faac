//! The databases tests run on: a fresh database per test on the run's PostgreSQL
//! (`TEST_DATABASE_URL`) or MariaDB (`TEST_MARIADB_URL`), dropped when the test ends, or an SQLite
//! file in the temporary directory, deleted when the test ends.

use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_MARIADB_ADMIN_URL: &str = "mysql://root@127.0.0.1:3306/mysql";

/// The server every test database is created on.
pub fn admin_url() -> String {
    Server::Postgres.admin_url()
}

/// A database server the tests create their databases on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Postgres,
    Mariadb,
}

impl Server {
    pub fn admin_url(self) -> String {
        let (variable, default) = match self {
            Server::Postgres => ("TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
            Server::Mariadb => ("TEST_MARIADB_URL", DEFAULT_MARIADB_ADMIN_URL),
        };
        std::env::var(variable).unwrap_or_else(|_| default.to_owned())
    }

    fn create_sql(self, name: &str) -> String {
        match self {
            Server::Postgres => format!("CREATE DATABASE \"{name}\""),
            Server::Mariadb => format!("CREATE DATABASE `{name}`"),
        }
    }

    fn drop_sql(self, name: &str) -> String {
        match self {
            Server::Postgres => format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            Server::Mariadb => format!("DROP DATABASE IF EXISTS `{name}`"),
        }
    }

    fn unreachable_message(self, url: &str, err: &dyn std::fmt::Display) -> String {
        match self {
            Server::Postgres => format!(
                "PostgreSQL is not reachable at {url} ({err}).\n\
                 Start it (e.g. `pg_ctlcluster --skip-systemctl-redirect 15 main start`) or point \
                 TEST_DATABASE_URL at a server where this user may CREATE DATABASE; `.ci/run` \
                 does both."
            ),
            Server::Mariadb => format!(
                "MariaDB is not reachable at {url} ({err}).\n\
                 Start it (`start-stop-daemon --start --oknodo --background --exec \
                 /usr/sbin/mariadbd`) or point TEST_MARIADB_URL at a server where this user may \
                 CREATE DATABASE; `scripts/test` does both."
            ),
        }
    }
}

async fn admin_at(server: Server, url: &str) -> DatabaseConnection {
    let url = url.to_owned();
    let mut options = sea_orm::ConnectOptions::new(url.clone());
    options
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    match Database::connect(options).await {
        Ok(db) => db,
        Err(e) => panic!("{}", server.unreachable_message(&url, &e)),
    }
}

/// A fresh, empty database, dropped (with its connections) when this value is dropped.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    server: Server,
    /// The server's maintenance database, where it was created and is dropped.
    admin: String,
}

impl TestDatabase {
    /// On PostgreSQL.
    pub async fn create() -> TestDatabase {
        TestDatabase::create_on(Server::Postgres).await
    }

    /// On the run's server of that kind (`TEST_DATABASE_URL`, `TEST_MARIADB_URL`).
    pub async fn create_on(server: Server) -> TestDatabase {
        TestDatabase::create_at(server, &server.admin_url()).await
    }

    /// On the server of `admin` (a URL of its maintenance database), e.g. a test's own.
    pub async fn create_at(server: Server, admin: &str) -> TestDatabase {
        let name = format!("inventory_test_{:016x}", fastrand::u64(..));
        let db = admin_at(server, admin).await;
        db.execute_unprepared(&server.create_sql(&name))
            .await
            .unwrap_or_else(|e| panic!("{}", server.unreachable_message(admin, &e)));
        let _ = db.close().await;
        let mut url = url::Url::parse(admin).expect("the test server's URL is valid");
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        TestDatabase {
            name,
            url,
            server,
            admin: admin.to_owned(),
        }
    }

    /// A small separate pool on the test database, for assertions behind the app's back.
    pub async fn connect(&self) -> DatabaseConnection {
        connect_to(&self.url).await
    }
}

/// A small pool of the test's own on `url`, for assertions behind the app's back.
pub async fn connect_to(url: &str) -> DatabaseConnection {
    let mut options = sea_orm::ConnectOptions::new(url.to_owned());
    options
        .max_connections(2)
        .min_connections(0)
        .sqlx_logging(false);
    Database::connect(options)
        .await
        .expect("test database reachable")
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = self.server;
        let admin = self.admin.clone();
        // Drop runs inside a test's runtime, which cannot block on itself: use a thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let db = admin_at(server, &admin).await;
                let _ = db.execute_unprepared(&server.drop_sql(&name)).await;
                let _ = db.close().await;
            });
        })
        .join();
    }
}

/// An SQLite database file in the temporary directory, deleted (with its WAL) when dropped.
pub struct SqliteFile(std::path::PathBuf);

impl Drop for SqliteFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

impl SqliteFile {
    /// A new file name in the temporary directory (the file is made by its first connection),
    /// and its `sqlite://…?mode=rwc` URL.
    pub fn new() -> (SqliteFile, String) {
        let path =
            std::env::temp_dir().join(format!("inventory-test-{:016x}.db", fastrand::u64(..)));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        (SqliteFile(path), url)
    }
}
