//! Integration tests live in `tests/api/` (one test binary, a module per area).
