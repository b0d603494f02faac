//! `example-todo`: reads the settings from the environment (`DATABASE_URL`, `DB_*`, `APP_*`;
//! `docs/configuration.md`) and serves the to-do list until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use sea_orm_actix_tx::settings::Settings;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    // Before the runtime starts its threads: loading removes libpq's PG* variables.
    let settings = match Settings::load(&example_todo::DEFAULTS) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    // actix's `System` (as `#[actix_web::main]` builds it): the HTTP workers run their requests
    // in a `LocalSet`, where wake-ups from the thread that opened the pool's first connections
    // coalesce (docs/adopting.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = actix_web::rt::System::with_tokio_rt(move || runtime).block_on(async {
        let (server, port) = example_todo::start(&settings).await?;
        tracing::info!(port, "listening");
        Ok::<_, Box<dyn std::error::Error>>(server.await?)
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
