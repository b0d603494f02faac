//! The `app` binary, built inside the test package so that integration tests can run it as a
//! real child process (`CARGO_BIN_EXE_inventory-app`). Same entry point as `app/src/main.rs`.

fn main() -> std::process::ExitCode {
    app::cli::main()
}
