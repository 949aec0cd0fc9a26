//! Mods written with the DSL: the masks and score modifiers attention models use, each one
//! definition for the oracle, the CPU backend and the kernels.
//!
//! Positions follow the crate's bottom-right convention: query `q`'s diagonal is key
//! `q + seq_k − seq_q` (the last query lines up with the last key), so these mods mean the same
//! in prefill, chunked prefill and decode.
//!
//! ```
//! use gqa::dsl::{library, Aux, MaskMod, Position};
//! // Three packed documents of lengths 2, 3 and 1, causal within each.
//! let mask = library::document(Aux::new(vec![0, 0, 1, 1, 1, 2])) & library::causal();
//! let at = |q, k| Position { b: 0, h: 0, q, k, seq_q: 6, seq_k: 6 };
//! assert!(mask.visible(at(4, 2)) && !mask.visible(at(4, 1)) && !mask.visible(at(2, 3)));
//! // StreamingLLM: 4 sink tokens and a window of 8 keys, causal.
//! let streaming = library::streaming(4, 8);
//! let at = |q, k| Position { b: 0, h: 0, q, k, seq_q: 100, seq_k: 100 };
//! assert!(streaming.visible(at(99, 2)) && streaming.visible(at(99, 92)));
//! assert!(!streaming.visible(at(99, 50)) && !streaming.visible(at(50, 51)));
//! ```

use super::{And, Aux, Or, Position};

/// Causal, bottom-right aligned: key `k` is visible to query `q` when `k <= q + seq_k − seq_q`
/// (the built-in `.causal()`, written as a mod). Its analytic classifier is
/// [`super::block::Band::causal`].
#[crate::mask_mod]
pub fn causal(at: Position) -> bool {
    at.k <= at.q + at.seq_k - at.seq_q
}

/// A band around the diagonal: `left` keys before it and `right` after it (the built-in
/// `.window(left, right)`, written as a mod). Its analytic classifier is
/// [`super::block::Band::window`].
#[crate::mask_mod]
pub fn sliding_window(left: i32, right: i32, at: Position) -> bool {
    let diag = at.q + at.seq_k - at.seq_q;
    at.k >= diag - left && at.k <= diag + right
}

/// Packed sequences (self-attention over one packed axis): a query sees the keys of its own
/// document, `doc[t]` being token `t`'s document id. The query's token is its diagonal
/// `t = q + seq_k − seq_q` (itself when `seq_q = seq_k`; in decode, its cache position); a
/// query with `t < 0` (more queries than keys) has no token and sees nothing. `doc` needs
/// `seq_k` entries. Compose with [`causal()`] for causal documents.
#[crate::mask_mod]
pub fn document(doc: &Aux<i32>, at: Position) -> bool {
    let t = at.q + at.seq_k - at.seq_q;
    t >= 0 && doc[max(t, 0)] == doc[at.k]
}

/// Prefix-LM: the first `prefix` keys are visible to every query (a bidirectional prefix);
/// compose with [`causal()`] by `|` for the usual prefix-LM mask.
#[crate::mask_mod]
pub fn prefix(prefix: i32, at: Position) -> bool {
    at.k < prefix
}

/// Attention sinks: the first `sinks` keys.
#[crate::mask_mod]
pub fn sinks(sinks: i32, at: Position) -> bool {
    at.k < sinks
}

/// Dilated attention: keys whose distance from the diagonal is a multiple of `dilation`.
#[crate::mask_mod]
pub fn dilated(dilation: i32, at: Position) -> bool {
    (at.q + at.seq_k - at.seq_q - at.k) % dilation == 0
}

/// The Sparse Transformer's fixed pattern: keys in the query's own block of `block` positions,
/// and the last key of every block (a summary column).
#[crate::mask_mod]
pub fn block_strided(block: i32, at: Position) -> bool {
    let diag = at.q + at.seq_k - at.seq_q;
    (diag - diag % block) == (at.k - at.k % block) || at.k % block == block - 1
}

/// A per-query-head relative-position bias from a table: `bias[h · buckets + min(|d|,
/// buckets − 1)]` added to the score, `d` the key's distance from the diagonal.
#[crate::score_mod]
pub fn relative_bias(bias: &Aux<f32>, buckets: i32, s: f32, at: Position) -> f32 {
    let distance = abs(at.q + at.seq_k - at.seq_q - at.k);
    s + bias[at.h * buckets + min(distance, buckets - 1)]
}

/// The logit softcap `cap · tanh(s / cap)` (the built-in `.softcap(cap)`, written as a mod).
#[crate::score_mod]
pub fn softcap(cap: f32, s: f32, at: Position) -> f32 {
    cap * tanh(s / cap)
}

/// ALiBi with one slope per query head (the built-in `.alibi()`, written as a mod).
#[crate::score_mod]
pub fn alibi(slopes: &Aux<f32>, s: f32, at: Position) -> f32 {
    s - slopes[at.h] * (abs(at.q + at.seq_k - at.seq_q - at.k) as f32)
}

/// Prefix-LM: a bidirectional `prefix`, causal after it.
pub fn prefix_lm(prefix_len: i32) -> Or<Prefix, Causal> {
    prefix(prefix_len) | causal()
}

/// StreamingLLM: `sinks` sink keys and a causal window of `window` keys before the diagonal.
pub fn streaming(sink_count: i32, window: i32) -> And<Or<Sinks, SlidingWindow>, Causal> {
    (sinks(sink_count) | sliding_window(window, 0)) & causal()
}
