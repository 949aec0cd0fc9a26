//! Empty: this package exists for its test, `compile_fail.rs` (see `Cargo.toml`).
