//! `docs/adopting.md` shows this crate's source in blocks fenced `rust,ignore`, each after a
//! paragraph naming its file ("From `examples/todo/src/….rs`:"). Those are not doc-tests: this
//! test checks that each is a verbatim excerpt of the file it names, so the guide shows code
//! that compiles. The guide's other Rust blocks are doc-tests (`cargo test --doc`).

use std::path::Path;

#[test]
fn the_guides_excerpts_are_verbatim_source() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let guide = std::fs::read_to_string(root.join("docs/adopting.md")).expect("docs/adopting.md");
    let mut checked = 0;
    let mut prose = String::new();
    let mut lines = guide.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with("```") {
            // Joined with spaces: "From" may end a line and the path begin the next.
            prose.push_str(line);
            prose.push(' ');
            continue;
        }
        let fence = line.trim_start_matches('`');
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        if fence == "rust,ignore" {
            // The file named last before the block, in "From `path`:".
            let named = prose
                .rsplit("From `")
                .next()
                .and_then(|rest| rest.split('`').next())
                .filter(|path| path.starts_with("examples/todo/"))
                .unwrap_or_else(|| panic!("no \"From `examples/todo/…`\" before {block:?}"));
            let source = std::fs::read_to_string(root.join(named))
                .unwrap_or_else(|e| panic!("{named}: {e}"));
            let excerpt = block.join("\n");
            assert!(
                source.contains(&excerpt),
                "docs/adopting.md shows code that is not in {named} (copy it again):\n{excerpt}"
            );
            checked += 1;
        } else {
            assert!(
                ["rust", "rust,no_run", "toml", "sh", "text"].contains(&fence),
                "a block fenced {fence:?}: Rust blocks are doc-tests or checked excerpts"
            );
        }
        prose.clear();
    }
    assert!(checked >= 5, "only {checked} excerpts found");
}
