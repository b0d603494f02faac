//! One integration-test binary, a module per area. Every test runs the real application against
//! its own fresh database, PostgreSQL unless it says otherwise (MariaDB, SQLite); test support
//! (starting the service, the databases, the servers the suite starts) is in `support`.

mod abandoned;
mod catalog;
mod cli;
mod commit_outcome;
mod contract;
mod database;
mod errors;
mod health;
mod idempotency;
mod mariadb;
mod migrate;
mod operations;
mod partition;
mod pooled_defaults;
mod pooler;
mod primary_lost;
mod read_only_end;
mod reads;
mod savepoints;
mod stock;
mod storm;
mod support;
mod tls;
mod transactions;
