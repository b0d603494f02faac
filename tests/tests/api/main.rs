//! One integration-test binary, a module per area. Every test runs the real application against
//! its own fresh database, PostgreSQL unless it says otherwise (MariaDB, SQLite; see `helpers`).

mod catalog;
mod cli;
mod database;
mod errors;
mod health;
mod helpers;
mod mariadb;
mod operations;
mod process;
mod stock;
mod transactions;
