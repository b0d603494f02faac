use sea_orm_migration::prelude::*;

/// `sea-orm-cli migrate …` runs this. Migrations prepare named statements outside any request
/// transaction, which a transaction-mode pooler cannot carry: with `DB_POOLER=transaction` (in
/// the environment or `.env`) it refuses with one line and exit code 2 (bad configuration)
/// instead of failing half-way.
#[tokio::main]
async fn main() {
    match config::pooler_from_env() {
        Ok(config::Pooler::Transaction) => {
            eprintln!(
                "error: migrations cannot run through a transaction-mode pooler \
                 (DB_POOLER=transaction): run them with DATABASE_URL set to the database's \
                 direct URL and DB_POOLER unset"
            );
            std::process::exit(2);
        }
        Ok(config::Pooler::None) => {}
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
    cli::run_cli(migration::Migrator).await;
}
