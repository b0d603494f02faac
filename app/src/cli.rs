//! The command line of API.md §7: `serve` (the default), `migrate [up|down|status|fresh]`,
//! `check-config` and `ping`. Exit codes: 0 success, 1 failure, 2 bad configuration.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use config::{Pooler, Settings};
use migration::{Migrator, MigratorTrait};

use crate::{Application, TxConfig, db, telemetry};

/// Why `app migrate` refuses to run through a transaction-mode pooler (one line).
pub const POOLER_MIGRATE: &str = "migrations cannot run through a transaction-mode pooler \
    (DB_POOLER=transaction): run `app migrate` with DATABASE_URL set to the database's direct URL \
    and DB_POOLER unset";

#[derive(Parser)]
#[command(
    name = "app",
    about = "Inventory service over actix-web and SeaORM",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply or inspect migrations on DATABASE_URL.
    Migrate {
        #[arg(value_enum, default_value_t = MigrateAction::Up)]
        action: MigrateAction,
    },
    /// Print the effective settings (the password as ***) and exit.
    CheckConfig,
    /// Connect, run SELECT 1, print the latency; exit 0 or 1.
    Ping,
}

#[derive(Clone, Copy, ValueEnum)]
enum MigrateAction {
    Up,
    Down,
    Status,
    Fresh,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::CheckConfig = command {
        print!("{}", settings.report());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = telemetry::init(settings.log.format, std::io::stdout) {
        eprintln!("logging: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Serve => serve(settings).await,
            Command::Migrate { action } => migrate(settings, action).await,
            Command::Ping => ping(settings).await,
            Command::CheckConfig => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let app = Application::build(settings)
        .await
        .map_err(|e| e.to_string())?;
    app.run_until_stopped().await.map_err(|e| e.to_string())
}

async fn migrate(settings: Settings, action: MigrateAction) -> Result<(), String> {
    if settings.database.pooler == Pooler::Transaction {
        return Err(POOLER_MIGRATE.to_owned());
    }
    let mut database = settings.database;
    database.connect_retries = 1;
    let db = db::connect(&database).await.map_err(|e| e.to_string())?;
    let result = match action {
        MigrateAction::Up => Migrator::up(&db, None).await,
        MigrateAction::Down => Migrator::down(&db, None).await,
        MigrateAction::Status => Migrator::status(&db).await,
        MigrateAction::Fresh => Migrator::fresh(&db).await,
    };
    let _ = db.close().await;
    result.map_err(|e| format!("migration failed: {e}"))
}

async fn ping(settings: Settings) -> Result<(), String> {
    let mut database = settings.database;
    database.connect_retries = 1;
    let session = TxConfig::new(&database, settings.server.body_limit).session;
    let db = db::connect(&database).await.map_err(|e| e.to_string())?;
    let latency = db::ping(&db, session.ping_sql(), None, Duration::from_secs(5)).await?;
    println!(
        "ok: {} answered SELECT 1 in {:.2} ms",
        db::backend_name(&db),
        latency.as_secs_f64() * 1000.0
    );
    let _ = db.close().await;
    Ok(())
}
