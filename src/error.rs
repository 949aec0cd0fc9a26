//! The crate's errors: one `#[non_exhaustive]` enum whose messages carry the operation and the
//! numbers involved, so that a log line alone says what was wrong.

use crate::heads::ConfigError;

/// Everything that can go wrong in `gqa`, as a value.
///
/// Each `try_*` function returns this; its panicking twin panics with the same message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The head counts or the head dim break the configuration rule (see [`crate::heads`]).
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A sliding window side was negative. Both sides count keys, so they are `>= 0`.
    #[error("sliding window sides must be >= 0, got (left {left}, right {right})")]
    InvalidWindow { left: i64, right: i64 },

    /// The softmax scale was NaN or infinite, or too large for `f32` (the precision the kernels
    /// and the CPU backend multiply in).
    #[error("softmax scale must be finite, and finite in f32, got {scale}")]
    InvalidScale { scale: f64 },

    /// The logit softcap was not a finite number `> 0`.
    #[error("logit softcap must be finite and > 0, got {cap}")]
    InvalidSoftcap { cap: f32 },

    /// User ALiBi slopes were given, but not one per query head.
    #[error("ALiBi needs one slope per query head: {q_heads} query heads, {slopes} slopes given")]
    AlibiSlopeCount { q_heads: usize, slopes: usize },

    /// A user ALiBi slope was NaN or infinite.
    #[error("ALiBi slope of query head {head} must be finite, got {slope}")]
    InvalidAlibiSlope { head: usize, slope: f32 },

    /// A tensor's shape does not fit the configuration or the other tensors.
    #[error("{op}: `{tensor}` has shape {got:?}, expected {expected}")]
    Shape {
        op: &'static str,
        tensor: &'static str,
        got: Vec<usize>,
        /// The expected shape, in words and numbers, e.g. `[2, 8, _, 64] ([batch, kv_heads, seq_k, head_dim])`.
        expected: String,
    },

    /// A runtime configuration (a `DynAttention`, a model's config) disagrees with a typed
    /// attention's const parameters.
    #[error("{field} mismatch: the configuration has {found}, the attention type has {expected}")]
    ConfigMismatch {
        field: &'static str,
        expected: usize,
        found: usize,
    },

    /// The backend was left out of this build (its cargo feature is off).
    #[error(
        "gqa was built without the `{feature}` feature, so the {backend} backend is not available"
    )]
    NotCompiledWith {
        backend: &'static str,
        feature: &'static str,
    },

    /// No device could be opened for a backend that was compiled in.
    #[error("no {backend} device: {reason}")]
    NoDevice {
        backend: &'static str,
        reason: String,
    },

    /// The device cannot compute in this element type (lavapipe has no bf16, for instance).
    #[error("{op}: the device {device} does not support {dtype}")]
    UnsupportedDType {
        op: &'static str,
        dtype: crate::DType,
        device: String,
    },

    /// The problem needs more of the device than it has (shared memory, units per cube).
    #[error("{op}: {reason}")]
    DeviceLimit { op: &'static str, reason: String },

    /// A device tensor was handed to a device other than the one that holds it.
    #[error("{op}: the tensor lives on another device")]
    WrongDevice { op: &'static str },

    /// A kernel failed to compile or to run on the device.
    #[error("{op}: the kernel failed on the device: {reason}")]
    Kernel { op: &'static str, reason: String },

    /// A KV-cache layout that cannot hold anything.
    #[error("{op}: invalid cache layout: {reason}")]
    CacheLayout { op: &'static str, reason: String },

    /// The KV cache has no room for what was asked; nothing was written.
    #[error("{op}: KV cache full: {reason}")]
    CacheFull { op: &'static str, reason: String },

    /// A sequence id the cache does not hold (never created, or dropped).
    #[error("{op}: the cache holds no sequence {sequence}")]
    UnknownSequence { op: &'static str, sequence: u64 },

    /// A device copy of a KV cache used with another cache than the one it was made from.
    #[error("{op}: this device copy was made from another KV cache")]
    CacheMismatch { op: &'static str },

    /// A quantized cache cannot scale a row holding NaN or ±∞.
    #[error("{op}: `{tensor}` holds a non-finite value, which quantized storage cannot represent")]
    NonFinite {
        op: &'static str,
        tensor: &'static str,
    },

    /// A finite value that the storage would turn into ±∞ (f16 above 65504, any storage beyond
    /// `f32`); nothing was written.
    #[error(
        "{op}: `{tensor}` holds {value}, which {storage} storage cannot represent (it would be stored as infinity)"
    )]
    Unrepresentable {
        op: &'static str,
        tensor: &'static str,
        value: f64,
        storage: &'static str,
    },

    /// Partials that cannot be merged (different spec, cache, sequences or shapes, or keys
    /// counted twice), or a key range that is not one.
    #[error("{op}: {reason}")]
    Partial { op: &'static str, reason: String },

    /// Offsets of packed variable-length sequences (`cu_seqlens`, [`crate::spec::Varlen`])
    /// that do not describe a packing.
    #[error("varlen offsets: {reason}")]
    Varlen { reason: String },

    /// A table a DSL mod captures (`gqa::dsl::Aux`) cannot be used.
    #[error("mod table: {reason}")]
    Aux { reason: String },

    /// A model configuration (e.g. a Hugging Face `config.json`) could not be read, or holds a
    /// field of the wrong type or an unknown value.
    #[error("model config: {reason}")]
    ModelConfig { reason: String },

    /// A checkpoint file (`config.json`, a safetensors file or its index) that cannot be read,
    /// parsed or written.
    #[error("checkpoint {file}: {reason}")]
    Checkpoint { file: String, reason: String },

    /// A checkpoint tensor that is missing, or whose shape or storage type does not fit the
    /// layer.
    #[error("checkpoint {file}: tensor `{tensor}` {reason}")]
    CheckpointTensor {
        file: String,
        tensor: String,
        reason: String,
    },

    /// A configuration read at run time that [`crate::dispatch!`] was not given a type for.
    #[error(
        "no attention type was compiled for {q_heads} query heads, {kv_heads} key/value heads and head dim {head_dim} (compiled: {compiled})"
    )]
    NotDispatched {
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        /// The configurations the call site lists, as `(HQ, HKV, D)` tuples.
        compiled: String,
    },
}

/// Shorthand for `Result<T, gqa::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
