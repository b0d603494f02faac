//! One integration-test binary, a module per area. Every test runs the real application against
//! its own fresh PostgreSQL database (see `helpers`).

mod catalog;
mod cli;
mod database;
mod errors;
mod health;
mod helpers;
mod operations;
mod pgbouncer;
mod pooler;
mod process;
mod stock;
mod tls;
mod tls_server;
mod transactions;
