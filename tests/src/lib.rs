//! Integration tests live in `tests/api/` (one test binary, a module per area).
//! The helpers here are shared by the test binaries (`tests/api/`, `tests/failover/`).

use std::path::PathBuf;

/// The directory of `initdb` and `pg_ctl`: Debian keeps PostgreSQL's binaries
/// out of PATH, under `/usr/lib/postgresql/<version>/bin`; the newest version is used.
pub fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin"))
}
