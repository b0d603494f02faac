//! The `app` binary: parse the command line, read the settings, run the command.

use std::process::ExitCode;

fn main() -> ExitCode {
    app::cli::main()
}
