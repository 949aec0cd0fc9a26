//! # gqa — attention as a typed, compile-time-checked language
//!
//! Multi-head (MHA), grouped-query (GQA) and multi-query (MQA) attention are one dial:
//! `q_heads` query heads share `kv_heads` key/value heads in groups of `q_heads / kv_heads`.
//! Fewer KV heads shrink the KV cache by exactly that factor. In `gqa` the dial is a type:
//!
//! ```
//! use gqa::{DType, Gqa, Mha};
//! let llama3_8b = Gqa::<32, 8, 128>::new().causal();      // 4 query heads per KV head
//! assert_eq!(Gqa::<32, 8, 128>::GROUP, 4);
//! assert_eq!(
//!     Mha::<32, 128>::new().kv_cache(DType::BF16).bytes(32, 1, 8192),
//!     4 * llama3_8b.kv_cache(DType::BF16).bytes(32, 1, 8192),
//! );
//! ```
//! and a configuration that cannot work does not compile, under `cargo check` as under
//! `cargo build`:
//! ```compile_fail
//! let broken = gqa::Gqa::<32, 6, 128>::new(); // error: 32 query heads cannot be shared evenly by 6 key/value heads
//! ```
//!
//! ## Pieces
//! - [`heads`]: the configuration rule, in one place (run time, `cargo check`, `cargo build`).
//! - [`Attention`] (aliases [`Mha`], [`Gqa`], [`Mqa`]) and [`DynAttention`]: the front ends and
//!   their builder (`causal`, `window`, `scale`, `softcap`, `alibi`, ...).
//! - [`spec`]: [`AttentionSpec`], the plain value both front ends lower to — masks and score
//!   modifiers, defined there.
//! - [`oracle`]: the `f64` reference every executor is proven against, and the tolerance rule.
//! - [`cpu`]: the CPU backend — blocked online softmax over `gemm` tiles (prefill) and split-KV
//!   decode against a [`cache::KvCache`], on rayon threads.
//! - [`cube`]: the GPU backend — cubecl kernels specialised per spec (forward, and decode against
//!   a paged, quantized cache), run through [`cube::CubeDevice`] or the front ends'
//!   `try_forward(&device, q, k, v)`.
//! - [`cache`]: the KV cache — its exact size, and [`cache::KvCache`] (contiguous or paged;
//!   f32, f16, bf16, int8 or 4-bit rows), which [`cube::CubeDevice::try_decode`] and
//!   [`oracle::try_decode`] decode against.
//! - [`partial`]: typed partial results over a subset of the keys, and their merge (split-KV
//!   decode across calls).
//! - [`layer`]: an attention layer's projections typed by their head counts, the conversion of
//!   a multi-head layer into GQA (mean-pooling, the GQA paper's uptraining start), and
//!   Hugging Face–layout checkpoints ([`layer::checkpoint`]).
//! - [`dispatch!`]: a configuration read at run time (a `config.json`) into a call of code
//!   generic over `Attention<HQ, HKV, D>`, for the configurations the call site lists.
//! - [`ModelConfig`]: a model's `num_attention_heads` / `num_key_value_heads` / `head_dim` from
//!   its `config.json`.
//!
//! Tensors at the API are `[batch, heads, seq, head_dim]` (PyTorch SDPA order).
//!
//! ## Features
//! | feature | what it turns on |
//! |---|---|
//! | `cpu` (default) | the CPU backend ([`cpu::Cpu`]: `gemm`, `rayon`, `multiversion`) |
//! | `wgpu` (default) | the cubecl kernels through wgpu: WGSL for Vulkan, Metal and DX12 (and Mesa's lavapipe without a GPU) |
//! | `vulkan` | wgpu on Vulkan with cubecl's SPIR-V compiler |
//! | `cuda`, `hip` | cubecl's CUDA and ROCm runtimes (cubecl 0.11 downloads LLVM to build them: not offline) |
//!
//! With none of them the GPU API is still there and answers [`Error::NotCompiledWith`].

pub mod backend;
pub mod cache;
#[cfg(feature = "cpu")]
pub mod cpu;
pub mod cube;
mod dispatch;
pub mod dsl;
pub mod element;
pub mod error;
pub mod heads;
pub mod layer;
pub mod model_config;
pub mod oracle;
pub mod partial;
pub mod spec;

mod attention;

// The DSL's macros name this crate `::gqa`, in user crates and in its own library of mods.
extern crate self as gqa;

pub use gqa_macros::{mask_mod, score_mod};

pub use attention::{Attention, DynAttention, Front, Gqa, Mha, Modded, Mqa};
pub use cache::KvCacheFootprint;
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use model_config::ModelConfig;
pub use spec::{Alignment, AttentionSpec, Mask};

/// The README's code blocks, compiled and run as doctests so the preview cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
