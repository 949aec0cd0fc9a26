//! The kernel side of the cube backend: `#[cube]` code only, one file per kernel family. What
//! launches them (configurations, grids, buffers, autotune) lives in `super::runtime`.
//!
//! - [`backward`]: the gradients: a row prepass, `dK`/`dV` per key tile (the group summed in
//!   registers), `dQ` per query tile, and the sum of their key/query splits.
//! - [`forward`]: prefill/forward attention, a register tile per unit, GQA groups packed.
//! - [`decode`]: a few queries against a paged, possibly quantized KV cache.
//! - [`products`]: the forward kernel's two tile products behind a trait (the matrix-core seam).
//! - [`merge`]: writing finished rows and merging key splits (shared by both).
//! - [`math`]: ulp-accurate `exp`, `ln`, `tanh`, and the sentinels WGSL needs.
//! - [`probe`]: tiny kernels that check what a device does (plane broadcasts).

pub mod backward;
pub mod decode;
pub mod forward;
pub mod math;
pub mod merge;
pub mod probe;
pub mod products;
