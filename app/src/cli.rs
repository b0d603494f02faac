//! The command line (docs/cli.md): `serve` (the default), `migrate`, `check-config` and `ping`.
//!
//! Exit codes: 0 success, 1 a failure at run time, 2 bad configuration or usage (clap's own
//! usage errors, an invalid setting or `RUST_LOG`, a destructive command without `--yes`).
//! A fatal error is printed once: one line on stderr with `LOG_FORMAT=pretty`, one JSON event on
//! the log stream (stdout) with `LOG_FORMAT=json`. Errors found before logging is set up (bad
//! settings, usage) always go to stderr.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use config::{LogFormat, Pooler, Settings};
use migration::{Migrator, MigratorTrait};

use sea_orm_actix_tx::{TxConfig, db};

use crate::{Application, log_writer, telemetry};

/// Why `app migrate` refuses to run through a transaction-mode pooler (one line).
pub const POOLER_MIGRATE: &str = "migrations cannot run through a transaction-mode pooler \
    (DB_POOLER=transaction): run `app migrate` with DATABASE_URL set to the database's direct URL \
    and DB_POOLER unset";

const USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "app",
    about = "Inventory service over actix-web and SeaORM, on PostgreSQL, MariaDB or SQLite",
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
    /// Apply, revert or inspect migrations on DATABASE_URL (default: `up`).
    Migrate {
        #[command(subcommand)]
        action: Option<Migrate>,
    },
    /// Print the effective settings (the password as ***), whichever the backend, and exit.
    CheckConfig,
    /// Connect to the database (PostgreSQL, MariaDB or SQLite), run SELECT 1, print the
    /// latency; exit 0 or 1.
    Ping,
}

#[derive(Clone, Copy, Subcommand)]
enum Migrate {
    /// Apply all pending migrations, or only the first N with -n.
    Up {
        /// Apply at most N pending migrations.
        #[arg(short = 'n', long = "num", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        num: Option<u32>,
    },
    /// Revert the LAST applied migration only, or the last N with -n.
    Down {
        /// Revert the last N applied migrations.
        #[arg(short = 'n', long = "num", value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        num: u32,
    },
    /// List the migrations and whether each is applied.
    Status,
    /// Drop EVERY table of the database (not only the migrations' own) and apply all migrations
    /// again. Refuses without --yes.
    Fresh(Confirm),
    /// Revert every applied migration, then apply them all again. Refuses without --yes.
    Refresh(Confirm),
    /// Revert every applied migration. Refuses without --yes.
    Reset(Confirm),
}

#[derive(Clone, Copy, Args)]
struct Confirm {
    /// Confirm that the data may be destroyed.
    #[arg(long)]
    yes: bool,
}

impl Migrate {
    /// What a destructive action would destroy, when it is one and `--yes` was not given.
    fn unconfirmed_loss(self) -> Option<&'static str> {
        match self {
            Migrate::Fresh(Confirm { yes: false }) => Some("drop every table of"),
            Migrate::Refresh(Confirm { yes: false }) => {
                Some("revert every migration (dropping their tables and rows) and re-apply them on")
            }
            Migrate::Reset(Confirm { yes: false }) => {
                Some("revert every migration (dropping their tables and rows) on")
            }
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Migrate::Up { .. } => "up",
            Migrate::Down { .. } => "down",
            Migrate::Status => "status",
            Migrate::Fresh(_) => "fresh",
            Migrate::Refresh(_) => "refresh",
            Migrate::Reset(_) => "reset",
        }
    }
}

/// A failure that ends the process, with the exit code it ends with.
struct Fatal {
    code: u8,
    message: String,
}

impl Fatal {
    fn usage(message: String) -> Fatal {
        Fatal {
            code: USAGE,
            message,
        }
    }

    fn runtime(message: String) -> Fatal {
        Fatal { code: 1, message }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    let (settings, filter) = match Settings::load(&crate::DEFAULTS)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            let filter = telemetry::log_filter().map_err(|e| e.to_string())?;
            Ok((s, filter))
        }) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(USAGE);
        }
    };
    if let Command::CheckConfig = command {
        print!("{}", settings.report());
        return ExitCode::SUCCESS;
    }
    if let Command::Migrate {
        action: Some(action),
    } = command
        && let Some(loss) = action.unconfirmed_loss()
    {
        eprintln!(
            "refusing `app migrate {}` without --yes: it would {loss} {}",
            action.name(),
            settings.database.url.describe()
        );
        return ExitCode::from(USAGE);
    }
    let format = settings.log.format;
    let log = log_writer::Batched::stdout(matches!(command, Command::Serve));
    if let Err(e) = telemetry::init(format, filter, log.clone()) {
        eprintln!("logging: {e}");
    }
    // The lines still buffered are written before a panic's message.
    let on_panic = log.clone();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        on_panic.flush();
        report(info);
    }));
    // actix's `System` on a current-thread runtime, as `#[actix_web::main]` builds it. Its HTTP
    // workers are actix arbiters, which run request tasks in a `LocalSet`: the wake-ups a worker
    // gets from another thread's reactor (the pool's first connections are opened on this one)
    // coalesce there. Under a plain Tokio runtime actix-server gives each worker a Tokio local
    // runtime instead, where each such wake-up is a write to the worker's eventfd: W2 made 3
    // more system calls per request that way (bench/NOTES.md, *Third pass*).
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => actix_web::rt::System::with_tokio_rt(move || runtime).block_on(async move {
            match command {
                Command::Serve => serve(settings).await,
                Command::Migrate { action } => {
                    migrate(settings, action.unwrap_or(Migrate::Up { num: None })).await
                }
                Command::Ping => ping(settings).await,
                Command::CheckConfig => Ok(()),
            }
        }),
        Err(e) => Err(Fatal::runtime(format!("cannot start the runtime: {e}"))),
    };
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            match format {
                LogFormat::Json => tracing::error!(exit_code = fatal.code, "{}", fatal.message),
                LogFormat::Pretty => eprintln!("error: {}", fatal.message),
            }
            ExitCode::from(fatal.code)
        }
    };
    log.flush();
    code
}

async fn serve(settings: Settings) -> Result<(), Fatal> {
    let app = Application::build(settings)
        .await
        .map_err(|e| Fatal::runtime(e.to_string()))?;
    app.run_until_stopped()
        .await
        .map_err(|e| Fatal::runtime(e.to_string()))
}

async fn migrate(settings: Settings, action: Migrate) -> Result<(), Fatal> {
    if settings.database.pooler == Pooler::Transaction {
        return Err(Fatal::usage(POOLER_MIGRATE.to_owned()));
    }
    let mut database = settings.database;
    database.connect_retries = 1;
    let db = db::connect(&database)
        .await
        .map_err(|e| Fatal::runtime(e.to_string()))?;
    let result = match action {
        Migrate::Up { num } => Migrator::up(&db, num).await,
        Migrate::Down { num } => Migrator::down(&db, Some(num)).await,
        Migrate::Status => Migrator::status(&db).await,
        Migrate::Fresh(_) => Migrator::fresh(&db).await,
        Migrate::Refresh(_) => Migrator::refresh(&db).await,
        Migrate::Reset(_) => Migrator::reset(&db).await,
    };
    let _ = db.close().await;
    result.map_err(|e| Fatal::runtime(format!("migration failed: {e}")))
}

async fn ping(settings: Settings) -> Result<(), Fatal> {
    let mut database = settings.database;
    database.connect_retries = 1;
    let session = TxConfig::new(&database, settings.server.body_limit).session;
    let db = db::connect(&database)
        .await
        .map_err(|e| Fatal::runtime(e.to_string()))?;
    let latency = db::ping(&db, session.ping_sql(), None, Duration::from_secs(5))
        .await
        .map_err(Fatal::runtime)?;
    println!(
        "ok: {} answered SELECT 1 in {:.2} ms",
        db::backend_name(&db),
        latency.as_secs_f64() * 1000.0
    );
    let _ = db.close().await;
    Ok(())
}
