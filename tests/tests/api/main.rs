//! One integration-test binary, a module per area. Every test runs the real application against
//! its own fresh database, PostgreSQL unless it says otherwise (MariaDB, SQLite; see `helpers`).

mod catalog;
mod cli;
mod commit_outcome;
mod contract;
mod database;
mod errors;
mod fault_proxy;
mod health;
mod helpers;
mod idempotency;
mod json_schema;
mod mariadb;
mod migrate;
mod operations;
mod partition;
mod pgbouncer;
mod pooler;
mod process;
mod reads;
mod replica;
mod savepoints;
mod stock;
mod storm;
mod tls;
mod tls_server;
mod transactions;
