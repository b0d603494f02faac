//! Writes the variable table of `docs/configuration.md` and the whole `.env.example` from the
//! settings' declaration (`config/src/variables.rs`) with the inventory's defaults:
//!
//! ```text
//! cargo run -p app --example config_reference            # rewrite both files
//! cargo run -p app --example config_reference -- --check # exit 1 when either differs (CI)
//! ```

use std::path::Path;
use std::process::ExitCode;

const TABLE_HEADER: &str = "| variable | default | allowed | meaning |";

fn main() -> ExitCode {
    let check = std::env::args().any(|arg| arg == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = root.join("docs/configuration.md");
    let example = root.join(".env.example");
    let written = std::fs::read_to_string(&docs).map_err(|e| format!("{}: {e}", docs.display()));
    let result = written.and_then(|current| {
        let table = config::reference_table(&app::DEFAULTS);
        let docs_text = with_table(&current, &table)
            .ok_or_else(|| format!("{}: no `{TABLE_HEADER}` table", docs.display()))?;
        let example_text = config::env_example(&app::DEFAULTS);
        let mut stale = Vec::new();
        for (path, text) in [(&docs, docs_text), (&example, example_text)] {
            if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
                continue;
            }
            if check {
                stale.push(path.display().to_string());
            } else {
                std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        match stale.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "{} differ from config/src/variables.rs; run `cargo run -p app --example config_reference`",
                stale.join(" and ")
            )),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("config_reference: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `doc` with the table that starts at [`TABLE_HEADER`] (up to the first line that is not a
/// table row) replaced by `table`.
fn with_table(doc: &str, table: &str) -> Option<String> {
    let start = doc.find(TABLE_HEADER)?;
    let rest = &doc[start..];
    let end = rest
        .split_inclusive('\n')
        .take_while(|line| line.starts_with('|'))
        .map(str::len)
        .sum::<usize>();
    Some(format!("{}{table}{}", &doc[..start], &rest[end..]))
}
