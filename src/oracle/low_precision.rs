//! The oracle's algorithm carried out in low precision — the yardstick of the tolerance rule.
//!
//! It is what a straightforward framework implementation does in a storage type (FlashAttention's
//! `attention_ref` without upcasting): products and sums in `f32`; the scores, the softmax
//! probabilities and the output rounded to the storage type; the LSE kept in `f32`. Its error
//! against the `f64` oracle is the error an honest implementation in that type is entitled to;
//! [`super::compare`] lets a kernel have twice that, plus a floor.

use std::ops::Range;

use ndarray::{Array3, Array4, ArrayView1, ArrayView4, s};

use super::{DynMods, Output};
use crate::dsl::{MaskMod, Mods, ScoreMod};
use crate::element::{DType, Element};
use crate::error::Result;
use crate::spec::{AttentionSpec, ProblemShape};

/// Attention as [`super::forward`] defines it, computed in `f32` with the scores,
/// probabilities and output rounded to `dtype` (for `dtype = F32`: plain `f32` arithmetic;
/// for `F64`: the oracle itself). Results are widened to `f64` for comparison.
pub fn try_forward_rounded<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    dtype: DType,
) -> Result<Output> {
    try_forward_rounded_keys(spec, q, k, v, dtype, 0..usize::MAX)
}

/// [`try_forward_rounded`] over the keys in `keys` only, as [`super::try_forward_keys`]: the
/// yardstick for a partial.
pub fn try_forward_rounded_keys<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    dtype: DType,
    keys: Range<usize>,
) -> Result<Output> {
    rounded_dyn(spec, &Mods::none(), q, k, v, dtype, keys)
}

/// [`try_forward_rounded`] with user mods (the score mod applied in `f32`, as `f32` executors
/// do): the yardstick for [`super::try_forward_with`].
pub fn try_forward_rounded_with<T: Element, M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    dtype: DType,
) -> Result<Output> {
    if dtype == DType::F64 {
        return super::try_forward_with(spec, mods, q, k, v);
    }
    rounded_dyn(spec, mods, q, k, v, dtype, 0..usize::MAX)
}

pub(super) fn rounded_dyn<T: Element>(
    spec: &AttentionSpec,
    mods: &dyn DynMods,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    dtype: DType,
    keys: Range<usize>,
) -> Result<Output> {
    if dtype == DType::F64 {
        return super::forward_keys_dyn(spec, mods, q, k, v, keys);
    }
    let shape = spec.check_shapes("oracle::forward_rounded", q.shape(), k.shape(), v.shape())?;
    let ProblemShape {
        batch,
        seq_q,
        seq_k,
    } = shape;
    let to_dtype = |x: f32| dtype.round(f64::from(x)) as f32;
    let mut o = Array4::zeros((batch, spec.q_heads(), seq_q, spec.head_dim()));
    let mut lse = Array3::from_elem((batch, spec.q_heads(), seq_q), f64::NEG_INFINITY);
    let mut scores: Vec<f32> = Vec::with_capacity(seq_k);
    let mut visible: Vec<usize> = Vec::with_capacity(seq_k);
    for b in 0..batch {
        for h in 0..spec.q_heads() {
            let g = spec.kv_head_of(h);
            for i in 0..seq_q {
                let band = spec.mask().visible_keys(i, seq_q, seq_k);
                let band = band.start.max(keys.start)..band.end.min(keys.end);
                scores.clear();
                visible.clear();
                for j in band {
                    let at = super::position(shape, b, h, i, j);
                    if !mods.visible(at) {
                        continue;
                    }
                    let q_row = q.slice(s![b, h, i, ..]);
                    let k_row = k.slice(s![b, g, j, ..]);
                    let (s, _) = score_f32(spec, h, i, j, shape, q_row, k_row, Order::Forward);
                    visible.push(j);
                    scores.push(to_dtype(mods.score_f32(s, at)));
                }
                if visible.is_empty() {
                    continue;
                }
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let sum: f32 = scores.iter().map(|&s| (s - max).exp()).sum();
                lse[[b, h, i]] = f64::from(max + sum.ln());
                let mut out = vec![0f32; spec.head_dim()];
                for (&j, &s) in visible.iter().zip(&scores) {
                    let p = to_dtype((s - max).exp() / sum);
                    for (acc, x) in out.iter_mut().zip(v.slice(s![b, g, j, ..])) {
                        *acc += p * x.widen() as f32;
                    }
                }
                for (dst, x) in o.slice_mut(s![b, h, i, ..]).iter_mut().zip(out) {
                    *dst = f64::from(to_dtype(x));
                }
            }
        }
    }
    Ok(Output { o, lse })
}

/// The order a low-precision dot product is summed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    /// Along the head dim, first to last: the forward's.
    Forward,
    /// Last to first: the backward's recomputation ([`super::try_backward_rounded_with`]).
    Reverse,
}

/// The score of query `i` (head `h`) against key `j` after the spec's modifiers, in `f32` (the
/// dot product summed in `order`), and the raw `scale · q·k` it came from.
#[allow(clippy::too_many_arguments)]
pub(super) fn score_f32<T: Element>(
    spec: &AttentionSpec,
    h: usize,
    i: usize,
    j: usize,
    shape: ProblemShape,
    q_row: ArrayView1<T>,
    k_row: ArrayView1<T>,
    order: Order,
) -> (f32, f32) {
    let product = |(x, y): (&T, &T)| x.widen() as f32 * y.widen() as f32;
    let pairs = q_row.iter().zip(k_row);
    let dot = match order {
        Order::Forward => pairs.map(product).fold(0f32, |acc, p| acc + p),
        Order::Reverse => pairs.rev().map(product).fold(0f32, |acc, p| acc + p),
    };
    let raw = spec.scale_f32() * dot;
    let mut s = raw;
    if let Some(cap) = spec.softcap() {
        s = cap * (s / cap).tanh();
    }
    if let Some(alibi) = spec.alibi() {
        let diag = spec.mask().diagonal(i, shape.seq_q, shape.seq_k);
        let distance = (diag - j as i128).unsigned_abs() as f32;
        s = match order {
            Order::Forward => s - alibi.slope(h) * distance,
            // The recomputation subtracts the bias with one rounding, as a compiler that
            // contracts it into a fused multiply-add does: where the dot product has one term
            // (head dim 1) the reversed sum alone would round the score exactly as the
            // forward did, which no separately compiled recomputation promises.
            Order::Reverse => (-alibi.slope(h)).mul_add(distance, s),
        };
    }
    (s, raw)
}
