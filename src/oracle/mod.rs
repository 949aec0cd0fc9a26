//! The oracle: attention computed the obvious way, in `f64`, from the spec's definitions.
//!
//! It is never optimised — it is the truth every other executor is compared with. For each
//! batch, query head `h` (reading KV head `h / group_size`) and query `i`:
//!
//! 1. the visible keys are the range [`Mask::visible_keys`](crate::spec::Mask::visible_keys);
//! 2. each visible key's score is `scale · q·k`, then softcap, then ALiBi ([`score`]);
//! 3. `lse = max + ln Σ exp(s − max)`, `o = Σ exp(s − lse) · v`;
//! 4. a row with no visible key gets `o = 0` and `lse = −∞` (never NaN).
//!
//! Masked keys are never read, so NaNs placed there cannot leak into a result.
//!
//! The backward ([`try_backward`], [`try_backward_with`]) follows the same definition to the
//! gradients of `q`, `k`, `v` (module `backward`'s docs); [`compare_gradients`] judges an
//! executor's gradients against it.

mod backward;
mod low_precision;
mod tolerance;

pub use backward::{
    GradientTerms, Gradients, try_backward, try_backward_rounded_with, try_backward_with,
    try_gradient_terms_with,
};

pub use low_precision::{try_forward_rounded, try_forward_rounded_keys, try_forward_rounded_with};
pub use tolerance::{Comparison, compare, compare_gradients, compare_lse, compare_rows};

use std::ops::Range;

use ndarray::{Array3, Array4, ArrayView1, ArrayView4, Axis, s};

use crate::cache::{KvCache, KvStorage, SeqId};
use crate::dsl::{MaskMod, Mods, Position, ScoreMod};
use crate::element::Element;
use crate::error::Result;
use crate::heads::{Rule, Supported};
use crate::spec::{AttentionSpec, ProblemShape, Varlen};

/// The oracle's result, in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// `[batch, q_heads, seq_q, head_dim]`.
    pub o: Array4<f64>,
    /// Natural-log log-sum-exp of each row's scores, `[batch, q_heads, seq_q]`; `−∞` for a
    /// fully masked row.
    pub lse: Array3<f64>,
}

/// Attention of `q: [batch, q_heads, seq_q, head_dim]` over `k`, `v: [batch, kv_heads, seq_k,
/// head_dim]` as `spec` defines it. Any element type (`f32`, `f64`, `f16`, `bf16`); any
/// `seq_q`, `seq_k` (0 included).
///
/// # Examples
/// ```
/// use gqa::{Gqa, oracle};
/// use ndarray::Array4;
/// let attention = Gqa::<4, 2, 8>::new().causal();
/// let q = Array4::<f32>::ones((1, 4, 3, 8));
/// let kv = Array4::<f32>::ones((1, 2, 5, 8));
/// let out = oracle::forward(attention.spec(), q.view(), kv.view(), kv.view());
/// assert_eq!(out.o.shape(), &[1, 4, 3, 8]);
/// assert!((out.o[[0, 3, 2, 7]] - 1.0).abs() < 1e-12);
/// ```
///
/// # Panics
/// If the shapes do not fit the spec; [`try_forward`] returns the error instead.
#[track_caller]
pub fn forward<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
) -> Output {
    match try_forward(spec, q, k, v) {
        Ok(output) => output,
        Err(error) => panic!("{error}"),
    }
}

/// [`forward`], returning [`Error::Shape`](crate::Error::Shape) when the shapes do not fit.
pub fn try_forward<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
) -> Result<Output> {
    try_forward_keys(spec, q, k, v, 0..usize::MAX)
}

/// The partial result over the keys in `keys` only (positions keep their meaning: masks and
/// ALiBi distances are those of the whole problem): what one split of a split-KV decode
/// computes. [`merge`] of the partials over disjoint ranges covering all keys is
/// [`try_forward`].
pub fn try_forward_keys<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    keys: Range<usize>,
) -> Result<Output> {
    forward_keys_dyn(spec, &Mods::none(), q, k, v, keys)
}

/// [`try_forward`] with user mods ([`crate::dsl`]): a key is visible when the spec's band and
/// the mask mod both allow it, and the score mod applies after the spec's modifiers — all in
/// `f64`.
pub fn try_forward_with<T: Element, M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
) -> Result<Output> {
    forward_keys_dyn(spec, mods, q, k, v, 0..usize::MAX)
}

/// [`try_forward_keys`] with user mods.
pub fn try_forward_keys_with<T: Element, M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    keys: Range<usize>,
) -> Result<Output> {
    forward_keys_dyn(spec, mods, q, k, v, keys)
}

fn forward_keys_dyn<T: Element>(
    spec: &AttentionSpec,
    mods: &dyn DynMods,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    keys: Range<usize>,
) -> Result<Output> {
    let shape = spec.check_shapes("oracle::forward", q.shape(), k.shape(), v.shape())?;
    let ProblemShape {
        batch,
        seq_q,
        seq_k,
    } = shape;
    let mut o = Array4::zeros((batch, spec.q_heads(), seq_q, spec.head_dim()));
    let mut lse = Array3::from_elem((batch, spec.q_heads(), seq_q), f64::NEG_INFINITY);
    let mut row = Vec::with_capacity(seq_k);
    for b in 0..batch {
        for h in 0..spec.q_heads() {
            let g = spec.kv_head_of(h);
            for i in 0..seq_q {
                row_scores(spec, mods, shape, &q, &k, (b, h, i), &keys, &mut row);
                if row.is_empty() {
                    continue; // fully masked: o = 0, lse = −∞
                }
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &(_, s)| m.max(s));
                let row_lse = max + row.iter().map(|&(_, s)| (s - max).exp()).sum::<f64>().ln();
                lse[[b, h, i]] = row_lse;
                let mut out = o.slice_mut(s![b, h, i, ..]);
                for &(j, s) in &row {
                    let p = (s - row_lse).exp();
                    out.zip_mut_with(&v.slice(s![b, g, j, ..]), |acc, &x| *acc += p * x.widen());
                }
            }
        }
    }
    Ok(Output { o, lse })
}

/// Attention of variable-length sequences packed along one axis ([`Varlen`]): `q: [1,
/// q_heads, total_q, head_dim]`, `k`, `v: [1, kv_heads, total_k, head_dim]`. Each sequence is
/// its own problem (its queries see only its keys; masks and ALiBi distances in its own
/// positions); a query of a sequence without keys gets `o = 0`, `lse = −∞`.
///
/// Errors: [`Error::Shape`](crate::Error::Shape) when the shapes do not fit the spec, or are
/// not a batch of one as long as the offsets say.
pub fn try_forward_varlen<T: Element>(
    spec: &AttentionSpec,
    packing: &Varlen,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
) -> Result<Output> {
    per_sequence(
        "oracle::forward_varlen",
        spec,
        packing,
        (q, k, v),
        |q, k, v| try_forward(spec, q, k, v),
    )
}

/// Runs `forward` on each sequence of a packed problem (a batch of one of its own) and packs
/// the results the same way: the varlen oracle, and its low-precision yardstick.
fn per_sequence<T: Element>(
    op: &'static str,
    spec: &AttentionSpec,
    packing: &Varlen,
    (q, k, v): (ArrayView4<T>, ArrayView4<T>, ArrayView4<T>),
    forward: impl Fn(ArrayView4<T>, ArrayView4<T>, ArrayView4<T>) -> Result<Output>,
) -> Result<Output> {
    let shape = spec.check_shapes(op, q.shape(), k.shape(), v.shape())?;
    packing.check_packed(op, shape)?;
    let mut o = Array4::zeros((1, spec.q_heads(), shape.seq_q, spec.head_dim()));
    let mut lse = Array3::from_elem((1, spec.q_heads(), shape.seq_q), f64::NEG_INFINITY);
    for seq in 0..packing.sequences() {
        let (rows, keys) = (packing.queries(seq), packing.keys(seq));
        let out = forward(
            q.slice(s![.., .., rows.clone(), ..]),
            k.slice(s![.., .., keys.clone(), ..]),
            v.slice(s![.., .., keys, ..]),
        )?;
        o.slice_mut(s![.., .., rows.clone(), ..]).assign(&out.o);
        lse.slice_mut(s![.., .., rows]).assign(&out.lse);
    }
    Ok(Output { o, lse })
}

/// [`try_forward_varlen`] computed as [`try_forward_rounded`] computes it: the yardstick of
/// the tolerance rule for a varlen forward in `dtype`.
pub fn try_forward_rounded_varlen<T: Element>(
    spec: &AttentionSpec,
    packing: &Varlen,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    dtype: crate::element::DType,
) -> Result<Output> {
    per_sequence(
        "oracle::forward_rounded_varlen",
        spec,
        packing,
        (q, k, v),
        |q, k, v| try_forward_rounded(spec, q, k, v, dtype),
    )
}

/// Merges partial results over disjoint key sets (e.g. [`try_forward_keys`] of the splits of
/// a split-KV decode) into the result over their union: `lse = log Σ exp(lse_s)` and
/// `o = Σ exp(lse_s − lse) · o_s`. Rows no part sees stay `o = 0`, `lse = −∞`.
///
/// # Panics
/// If `parts` is empty or their shapes differ.
#[track_caller]
pub fn merge(parts: &[Output]) -> Output {
    let first = parts.first().expect("merge needs at least one part");
    assert!(
        parts.iter().all(|p| p.o.shape() == first.o.shape()),
        "merge: the parts' shapes differ"
    );
    let (o, lse) = crate::partial::merge_rows(
        &parts.iter().map(|p| p.o.view()).collect::<Vec<_>>(),
        &parts.iter().map(|p| p.lse.view()).collect::<Vec<_>>(),
    );
    Output { o, lse }
}

/// Decode against a KV cache, in `f64`: `q: [sequences, q_heads, seq_q, head_dim]` holds the
/// newest `seq_q` queries of each listed sequence, and row `b` attends to everything sequence
/// `seqs[b]` has cached — as `spec` defines it, with the queries aligned to the cache's end
/// (bottom-right). The keys and values are the cache's stored rows, exactly ([`KvCache::read_exact`]), so this is
/// the exact answer for what the cache holds; each row is the last rows of a forward over it.
///
/// Errors: [`Error::ConfigMismatch`](crate::Error::ConfigMismatch) when the spec's KV heads or
/// head dim are not the cache's, [`Error::Shape`](crate::Error::Shape),
/// [`Error::UnknownSequence`](crate::Error::UnknownSequence).
pub fn try_decode<T: Element, const HKV: usize, const D: usize, S: KvStorage>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    cache: &KvCache<HKV, D, S>,
    seqs: &[SeqId],
) -> Result<Output>
where
    Rule: Supported<HKV, HKV, D>,
{
    try_decode_keys(spec, q, cache, seqs, 0..usize::MAX)
}

/// [`try_decode`] over the cached keys at positions in `keys` only (masks and ALiBi distances
/// keep their meaning): one partial of a split decode, which [`merge`] combines.
pub fn try_decode_keys<T: Element, const HKV: usize, const D: usize, S: KvStorage>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    cache: &KvCache<HKV, D, S>,
    seqs: &[SeqId],
    keys: Range<usize>,
) -> Result<Output>
where
    Rule: Supported<HKV, HKV, D>,
{
    decode_keys_dyn(spec, &Mods::none(), q, cache, seqs, keys)
}

/// [`try_decode`] with user mods ([`crate::dsl`]): row `b`'s positions are those of sequence
/// `seqs[b]`'s step — `at.b = b`, `at.q` the query's index among the `seq_q` newest, `at.k` the
/// cache position, `at.seq_k` the cached length (so `at.q + at.seq_k − at.seq_q` is the
/// query's own cache position).
pub fn try_decode_with<
    T: Element,
    M: MaskMod,
    Sc: ScoreMod,
    const HKV: usize,
    const D: usize,
    S: KvStorage,
>(
    spec: &AttentionSpec,
    mods: &Mods<M, Sc>,
    q: ArrayView4<T>,
    cache: &KvCache<HKV, D, S>,
    seqs: &[SeqId],
) -> Result<Output>
where
    Rule: Supported<HKV, HKV, D>,
{
    decode_keys_dyn(spec, mods, q, cache, seqs, 0..usize::MAX)
}

/// Mods seen from one sequence of a decode: the oracle runs each sequence as a batch of one,
/// whose positions carry the sequence's index in the decode's batch.
struct Shifted<'a> {
    mods: &'a dyn DynMods,
    b: i64,
}

impl DynMods for Shifted<'_> {
    fn visible(&self, at: Position) -> bool {
        self.mods.visible(Position {
            b: at.b + self.b,
            ..at
        })
    }
    fn score_f64(&self, s: f64, at: Position) -> f64 {
        self.mods.score_f64(
            s,
            Position {
                b: at.b + self.b,
                ..at
            },
        )
    }
    fn score_f32(&self, s: f32, at: Position) -> f32 {
        self.mods.score_f32(
            s,
            Position {
                b: at.b + self.b,
                ..at
            },
        )
    }
    fn derivative(&self, s: f64, at: Position) -> f64 {
        self.mods.derivative(
            s,
            Position {
                b: at.b + self.b,
                ..at
            },
        )
    }
}

fn decode_keys_dyn<T: Element, const HKV: usize, const D: usize, S: KvStorage>(
    spec: &AttentionSpec,
    mods: &dyn DynMods,
    q: ArrayView4<T>,
    cache: &KvCache<HKV, D, S>,
    seqs: &[SeqId],
    keys: Range<usize>,
) -> Result<Output>
where
    Rule: Supported<HKV, HKV, D>,
{
    check_cache_spec(spec, HKV, D)?;
    if q.shape()[0] != seqs.len() {
        return Err(crate::Error::Shape {
            op: "oracle::decode",
            tensor: "q",
            got: q.shape().to_vec(),
            expected: format!(
                "one row of the batch per sequence ({} sequences)",
                seqs.len()
            ),
        });
    }
    let (hq, lq, d) = (q.shape()[1], q.shape()[2], q.shape()[3]);
    let mut o = Array4::zeros((seqs.len(), hq, lq, d));
    let mut lse = Array3::from_elem((seqs.len(), hq, lq), f64::NEG_INFINITY);
    // Widened to f64, exactly.
    let q = q.mapv(|x| x.widen());
    for (b, &seq) in seqs.iter().enumerate() {
        let (k, v) = cache.read_exact(seq)?;
        let out = forward_keys_dyn(
            spec,
            &Shifted { mods, b: b as i64 },
            q.slice(s![b..b + 1, .., .., ..]),
            k.insert_axis(Axis(0)).view(),
            v.insert_axis(Axis(0)).view(),
            keys.clone(),
        )?;
        o.slice_mut(s![b..b + 1, .., .., ..]).assign(&out.o);
        lse.slice_mut(s![b..b + 1, .., ..]).assign(&out.lse);
    }
    Ok(Output { o, lse })
}

/// The spec's KV heads and head dim must be the cache's.
pub(crate) fn check_cache_spec(
    spec: &AttentionSpec,
    kv_heads: usize,
    head_dim: usize,
) -> Result<()> {
    if spec.kv_heads() != kv_heads {
        return Err(crate::Error::ConfigMismatch {
            field: "kv_heads",
            found: spec.kv_heads(),
            expected: kv_heads,
        });
    }
    if spec.head_dim() != head_dim {
        return Err(crate::Error::ConfigMismatch {
            field: "head_dim",
            found: spec.head_dim(),
            expected: head_dim,
        });
    }
    Ok(())
}

/// The scores `[batch, q_heads, seq_q, seq_k]` after every modifier, `−∞` where masked: the
/// softmax input, exposed so tests can check laws on it (e.g. `Σ exp(s − lse) = 1`).
pub fn try_scores<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
) -> Result<Array4<f64>> {
    try_scores_with(spec, &Mods::none(), q, k)
}

/// [`try_scores`] with user mods.
pub fn try_scores_with<T: Element, M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
) -> Result<Array4<f64>> {
    let shape = spec.check_shapes("oracle::scores", q.shape(), k.shape(), k.shape())?;
    Ok(scores_of_checked(spec, mods, shape, &q, &k))
}

/// Per row `[batch, q_heads, seq_q]`, the magnitudes its result is computed from, over the keys
/// it sees (0 for a row that sees none): they set the scale of an honest computation's
/// rounding, which the tolerance rule's per-row form uses ([`compare_rows`], [`compare_lse`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RowTerms {
    /// The largest `|scale| · Σ_d |q_d · k_d| + |ALiBi's bias|`: the terms a score is summed from
    /// (an LSE is a soft maximum of scores).
    pub scores: Array3<f64>,
    /// The largest `|v_d|`: the terms of the output's convex combination.
    pub values: Array3<f64>,
}

impl RowTerms {
    /// The scale of an output row's rounding: `V · max(1, T)` (values times score terms). An
    /// output averages values of magnitude up to `V` with weights `e^s`, and a score off by
    /// `δ` moves it by up to `2Vδ` — an honest score is off by about one rounding of its terms,
    /// `u·T`. ([`compare_rows`] takes this per row.)
    pub fn outputs(&self) -> Array3<f64> {
        let mut out = self.values.clone();
        out.zip_mut_with(&self.scores, |v, &t| *v *= t.max(1.0));
        out
    }
}

/// The [`RowTerms`] of a problem (shapes as [`try_forward`]).
pub fn try_row_terms<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
) -> Result<RowTerms> {
    try_row_terms_keys(spec, q, k, v, 0..usize::MAX)
}

/// [`try_row_terms`] over the keys in `keys` only (a partial's).
pub fn try_row_terms_keys<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    keys: Range<usize>,
) -> Result<RowTerms> {
    row_terms_dyn(spec, &Mods::none(), q, k, v, keys)
}

/// [`try_row_terms`] with user mods: over the keys the mask mod leaves visible, and with a
/// score mod `f` a score's terms are `max(T · max(1, |f′(s)|), |f(s)|)` — what `f` makes of
/// the rounding of its input, and the scale of its output.
pub fn try_row_terms_with<T: Element, M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
) -> Result<RowTerms> {
    row_terms_dyn(spec, mods, q, k, v, 0..usize::MAX)
}

fn row_terms_dyn<T: Element>(
    spec: &AttentionSpec,
    mods: &dyn DynMods,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    keys: Range<usize>,
) -> Result<RowTerms> {
    let shape = spec.check_shapes("oracle::row_terms", q.shape(), k.shape(), v.shape())?;
    let ProblemShape {
        batch,
        seq_q,
        seq_k,
    } = shape;
    let mut scores = Array3::zeros((batch, spec.q_heads(), seq_q));
    let mut values = Array3::zeros((batch, spec.q_heads(), seq_q));
    for ((b, h, i), t) in scores.indexed_iter_mut() {
        let visible = spec.mask().visible_keys(i, seq_q, seq_k);
        let g = spec.kv_head_of(h);
        for j in visible.start.max(keys.start)..visible.end.min(keys.end) {
            let at = position(shape, b, h, i, j);
            if !mods.visible(at) {
                continue;
            }
            let sum: f64 = q
                .slice(s![b, h, i, ..])
                .iter()
                .zip(k.slice(s![b, g, j, ..]))
                .map(|(x, y)| (x.widen() * y.widen()).abs())
                .sum();
            // The score's terms: the products, and ALiBi's bias, which the score adds to them.
            let mut terms =
                spec.scale().abs() * sum + alibi_bias(spec, h, i, j, seq_q, seq_k).abs();
            let dot = dot(q.slice(s![b, h, i, ..]), k.slice(s![b, g, j, ..]));
            let before = score(spec, h, i, j, seq_q, seq_k, dot);
            let slope = mods.derivative(before, at).abs();
            let after = mods.score_f64(before, at).abs();
            if slope != 1.0 || after != before.abs() {
                terms = f64::max(terms * slope.max(1.0), after);
            }
            *t = f64::max(*t, terms);
            let largest = v
                .slice(s![b, g, j, ..])
                .iter()
                .fold(0.0f64, |m, x| m.max(x.widen().abs()));
            values[[b, h, i]] = f64::max(values[[b, h, i]], largest);
        }
    }
    Ok(RowTerms { scores, values })
}

fn scores_of_checked<T: Element>(
    spec: &AttentionSpec,
    mods: &dyn DynMods,
    shape: ProblemShape,
    q: &ArrayView4<T>,
    k: &ArrayView4<T>,
) -> Array4<f64> {
    let ProblemShape {
        batch,
        seq_q,
        seq_k,
    } = shape;
    let mut scores = Array4::from_elem((batch, spec.q_heads(), seq_q, seq_k), f64::NEG_INFINITY);
    let mut row = Vec::with_capacity(seq_k);
    for b in 0..batch {
        for h in 0..spec.q_heads() {
            for i in 0..seq_q {
                row_scores(
                    spec,
                    mods,
                    shape,
                    q,
                    k,
                    (b, h, i),
                    &(0..usize::MAX),
                    &mut row,
                );
                for &(j, s) in &row {
                    scores[[b, h, i, j]] = s;
                }
            }
        }
    }
    scores
}

/// The keys query `i` of head `h` in batch entry `b` sees among `keys` — the spec's band and
/// the user mask — with their scores, into `row` (cleared first), in key order.
#[allow(clippy::too_many_arguments)]
fn row_scores<T: Element>(
    spec: &AttentionSpec,
    mods: &dyn DynMods,
    shape: ProblemShape,
    q: &ArrayView4<T>,
    k: &ArrayView4<T>,
    (b, h, i): (usize, usize, usize),
    keys: &Range<usize>,
    row: &mut Vec<(usize, f64)>,
) {
    let ProblemShape { seq_q, seq_k, .. } = shape;
    let band = spec.mask().visible_keys(i, seq_q, seq_k);
    let band = band.start.max(keys.start)..band.end.min(keys.end);
    let g = spec.kv_head_of(h);
    row.clear();
    for j in band {
        let at = position(shape, b, h, i, j);
        if !mods.visible(at) {
            continue;
        }
        let dot = dot(q.slice(s![b, h, i, ..]), k.slice(s![b, g, j, ..]));
        let s = score(spec, h, i, j, seq_q, seq_k, dot);
        row.push((j, mods.score_f64(s, at)));
    }
}

/// The DSL's position of a score.
pub(crate) fn position(shape: ProblemShape, b: usize, h: usize, i: usize, j: usize) -> Position {
    Position {
        b: b as i64,
        h: h as i64,
        q: i as i64,
        k: j as i64,
        seq_q: shape.seq_q as i64,
        seq_k: shape.seq_k as i64,
    }
}

/// A pair of user mods behind a trait object: the oracle is not specialised per mod (it is
/// never optimised), so one copy of its loops serves every mod type.
pub(crate) trait DynMods {
    fn visible(&self, at: Position) -> bool;
    fn score_f64(&self, s: f64, at: Position) -> f64;
    fn score_f32(&self, s: f32, at: Position) -> f32;
    fn derivative(&self, s: f64, at: Position) -> f64;
}

impl<M: MaskMod, S: ScoreMod> DynMods for Mods<M, S> {
    fn visible(&self, at: Position) -> bool {
        Mods::visible(self, at)
    }
    fn score_f64(&self, s: f64, at: Position) -> f64 {
        self.score_at(s, at)
    }
    fn score_f32(&self, s: f32, at: Position) -> f32 {
        self.score_at(s, at)
    }
    fn derivative(&self, s: f64, at: Position) -> f64 {
        if S::TRIVIAL {
            1.0
        } else {
            self.score().derivative(s, at)
        }
    }
}

fn dot<T: Element>(a: ArrayView1<T>, b: ArrayView1<T>) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.widen() * y.widen()).sum()
}

/// The score of query `i` (head `h`) against key `j` given their dot product: scale, then
/// softcap, then ALiBi — the definition in [`crate::spec`], in `f64`.
pub fn score(
    spec: &AttentionSpec,
    h: usize,
    i: usize,
    j: usize,
    seq_q: usize,
    seq_k: usize,
    dot: f64,
) -> f64 {
    let mut s = spec.scale() * dot;
    if let Some(cap) = spec.softcap() {
        let cap = f64::from(cap);
        s = cap * (s / cap).tanh();
    }
    s - alibi_bias(spec, h, i, j, seq_q, seq_k)
}

/// ALiBi's term of the score of query `i` (head `h`) against key `j`: `slope_h · |diagonal(i) −
/// j|`, subtracted from the score (0 without ALiBi).
fn alibi_bias(
    spec: &AttentionSpec,
    h: usize,
    i: usize,
    j: usize,
    seq_q: usize,
    seq_k: usize,
) -> f64 {
    spec.alibi().map_or(0.0, |alibi| {
        let distance = (spec.mask().diagonal(i, seq_q, seq_k) - j as i128).unsigned_abs();
        f64::from(alibi.slope(h)) * distance as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    /// ALiBi's bias is one of the terms a score is summed from: with `q · k = 0`, a causal
    /// row's terms are the largest `slope · distance` it sees (here 0.5 · 5 for its sixth
    /// query), not 0 — its scores round at that magnitude in `f32`.
    #[test]
    fn row_terms_count_alibi_bias() {
        let attention = crate::Attention::<1, 1, 1>::new()
            .causal()
            .alibi_slopes(&[0.5]);
        let spec = attention.spec();
        let zeros = Array4::<f64>::zeros((1, 1, 6, 1));
        let terms = try_row_terms(spec, zeros.view(), zeros.view(), zeros.view()).unwrap();
        assert_eq!(terms.scores[[0, 0, 5]], 2.5);
        assert_eq!(terms.scores[[0, 0, 0]], 0.0);
    }
}
