//! Empty: Cargo requires a package to have a library or binary target. The benchmark itself is
//! `benches/cubek.rs` (run with `cargo bench --manifest-path benches/peers/Cargo.toml`).
