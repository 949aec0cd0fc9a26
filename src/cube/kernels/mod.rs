//! The kernel side of the cube backend: `#[cube]` code only, one file per kernel family. What
//! launches them (configurations, grids, buffers) lives in `super::host`.
//!
//! - [`forward`]: prefill/forward attention, a register tile per unit, GQA groups packed.
//! - [`decode`]: a few queries against a paged, possibly quantized KV cache.
//! - [`merge`]: writing finished rows and merging key splits (shared by both).
//! - [`math`]: ulp-accurate `exp`, `ln`, `tanh`, and the sentinels WGSL needs.

pub mod decode;
pub mod forward;
pub mod math;
pub mod merge;
