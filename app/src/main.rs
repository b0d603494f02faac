//! The `app` binary: parse the command line, read the settings, run the command.

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: a request allocates and frees a few hundred small
/// blocks, and mimalloc's thread-local free lists cost fewer instructions for each
/// (bench/NOTES.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    app::cli::main()
}
