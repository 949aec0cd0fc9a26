//! The backward pass, by its definition, in `f64`: the gradients of a loss
//! `L(O, LSE)` with respect to `q`, `k` and `v`, given `dO = ∂L/∂O` and optionally
//! `dLSE = ∂L/∂LSE`.
//!
//! For each batch entry, query head `h` (KV head `g = h / group_size`) and query `i`, over the
//! keys `j` the row sees (the band and the mask mod; masked keys are never read):
//!
//! - `raw_j = scale · q_i·k_j`, and the score `s_j = f(raw_j)` after softcap, ALiBi and the score
//!   mod ([`super::score`]); `f′(raw_j) = (1 − tanh²(raw_j / c)) · mod′(·)` (softcap's
//!   derivative, ALiBi's is 1, a mod's is its generated one, [`crate::dsl::ScoreMod::derivative`]);
//! - `P_j = exp(s_j − lse)`, `O = Σ_j P_j v_j` (the forward);
//! - `dV_j += P_j · dO`, `dP_j = dO · v_j`, `δ = Σ_d dO_d · O_d` (`= Σ_j P_j dP_j`);
//! - `dS_j = P_j · (dP_j − δ + dLSE)`, `dRaw_j = dS_j · f′(raw_j)`;
//! - `dQ_i += scale · dRaw_j · k_j`, `dK_j += scale · dRaw_j · q_i`.
//!
//! `dK` and `dV` of a KV head sum the contributions of every query head of its group: the
//! gradient of the K/V a group shares. A row that sees no key contributes nothing (its `O = 0`
//! and `LSE = −∞` are constants), so fully masked rows get `dQ = 0`.

use ndarray::{Array4, ArrayView1, ArrayView3, ArrayView4, s};

use super::{DynMods, Output};
use crate::dsl::{MaskMod, Mods, ScoreMod};
use crate::element::{DType, Element};
use crate::error::Result;
use crate::spec::{AttentionSpec, ProblemShape};

/// Gradients of a loss with respect to the inputs of attention, in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// `∂L/∂q`, `[batch, q_heads, seq_q, head_dim]`.
    pub dq: Array4<f64>,
    /// `∂L/∂k`, `[batch, kv_heads, seq_k, head_dim]`: summed over each group's query heads.
    pub dk: Array4<f64>,
    /// `∂L/∂v`, `[batch, kv_heads, seq_k, head_dim]`: summed over each group's query heads.
    pub dv: Array4<f64>,
}

/// The gradients of `L` given `d_o = ∂L/∂O` (`[batch, q_heads, seq_q, head_dim]`, the shape of
/// `q`), for attention as [`super::try_forward`] defines it (module docs).
///
/// # Examples
/// ```
/// use gqa::{Gqa, oracle};
/// use ndarray::Array4;
/// // With equal keys every query averages the values, so dV sums dO/2 over the queries that see
/// // each key — over both query heads of the KV head. Moving q moves every score alike, which
/// // changes nothing (dQ = 0); moving one key trades weight with the other (dK₀ = −dK₁).
/// let attention = Gqa::<2, 1, 4>::new();
/// let q = Array4::<f32>::from_elem((1, 2, 3, 4), 0.5);
/// let k = Array4::<f32>::ones((1, 1, 2, 4));
/// let v = Array4::<f32>::from_shape_fn((1, 1, 2, 4), |(_, _, j, _)| j as f32);
/// let d_o = Array4::<f32>::ones((1, 2, 3, 4));
/// let grads = oracle::try_backward(attention.spec(), q.view(), k.view(), v.view(), d_o.view())?;
/// assert!((grads.dv[[0, 0, 1, 0]] - 3.0).abs() < 1e-12); // 2 heads · 3 queries · ½
/// assert!(grads.dq.iter().all(|x| x.abs() < 1e-12));
/// assert!((grads.dk[[0, 0, 0, 2]] + grads.dk[[0, 0, 1, 2]]).abs() < 1e-12);
/// assert!(grads.dk[[0, 0, 0, 2]].abs() > 0.1);
/// # Ok::<(), gqa::Error>(())
/// ```
///
/// Errors: [`Error::Shape`](crate::Error::Shape) when a shape does not fit (`d_o` named).
pub fn try_backward<T: Element>(
    spec: &AttentionSpec,
    q: ArrayView4<T>,
    k: ArrayView4<T>,
    v: ArrayView4<T>,
    d_o: ArrayView4<T>,
) -> Result<Gradients> {
    backward_dyn(spec, &Mods::none(), [q, k, v, d_o], None, DType::F64)
}

/// [`try_backward`] with user mods and an optional `d_lse = ∂L/∂LSE` (`[batch, q_heads,
/// seq_q]`): the mask mod hides pairs, the score mod's derivative multiplies `dS`.
pub fn try_backward_with<T: Element, M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    [q, k, v, d_o]: [ArrayView4<T>; 4],
    d_lse: Option<ArrayView3<f32>>,
) -> Result<Gradients> {
    backward_dyn(spec, mods, [q, k, v, d_o], d_lse, DType::F64)
}

/// The backward carried out in low precision — the tolerance rule's yardstick for gradients
/// ([`super::compare`]): the forward as [`super::try_forward_rounded`] computes it (scores,
/// probabilities and `O` rounded to `dtype`), then every step above in `f32` with `dP`, `dS`
/// and the gradients rounded to `dtype` — what autograd does through a framework's attention
/// in that type. For `F64`, [`try_backward_with`] itself.
pub fn try_backward_rounded_with<T: Element, M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    [q, k, v, d_o]: [ArrayView4<T>; 4],
    d_lse: Option<ArrayView3<f32>>,
    dtype: DType,
) -> Result<Gradients> {
    backward_dyn(spec, mods, [q, k, v, d_o], d_lse, dtype)
}

/// The problem's shape, after checking `q`, `k`, `v`, `d_o` and `d_lse` against `spec`.
fn check_shapes<T: Element>(
    op: &'static str,
    spec: &AttentionSpec,
    [q, k, v, d_o]: [&ArrayView4<T>; 4],
    d_lse: Option<&ArrayView3<f32>>,
) -> Result<ProblemShape> {
    let shape = spec.check_shapes(op, q.shape(), k.shape(), v.shape())?;
    spec.check_like_q(op, shape, "d_o", d_o.shape())?;
    if let Some(d_lse) = d_lse {
        spec.check_like_lse(op, shape, "d_lse", d_lse.shape())?;
    }
    Ok(shape)
}

/// One visible key of a row: its index, its score (after every modifier) and `f′(raw)`.
struct Term {
    j: usize,
    score: f64,
    slope: f64,
}

fn backward_dyn<T: Element>(
    spec: &AttentionSpec,
    mods: &dyn DynMods,
    [q, k, v, d_o]: [ArrayView4<T>; 4],
    d_lse: Option<ArrayView3<f32>>,
    dtype: DType,
) -> Result<Gradients> {
    let shape = check_shapes("oracle::backward", spec, [&q, &k, &v, &d_o], d_lse.as_ref())?;
    let Output { o, lse } = if dtype == DType::F64 {
        super::forward_keys_dyn(spec, mods, q, k, v, 0..usize::MAX)?
    } else {
        super::low_precision::rounded_dyn(spec, mods, q, k, v, dtype, 0..usize::MAX)?
    };
    // In f64 every step is exact to f64; in low precision each step is an f32 operation and
    // the named intermediates are rounded to `dtype` (`round` is the identity for F64).
    let f32_or_f64 = |x: f64| {
        if dtype == DType::F64 {
            x
        } else {
            x as f32 as f64
        }
    };
    let round = |x: f64| dtype.round(f32_or_f64(x));
    let dot = |a: ArrayView1<T>, b: ArrayView1<f64>| {
        a.iter()
            .zip(b)
            .fold(0.0, |acc, (x, &y)| f32_or_f64(acc + x.widen() * y))
    };
    let ProblemShape {
        batch,
        seq_q,
        seq_k,
    } = shape;
    let mut dq = Array4::zeros(q.raw_dim());
    let mut dk = Array4::zeros(k.raw_dim());
    let mut dv = Array4::zeros(v.raw_dim());
    let mut terms = Vec::with_capacity(seq_k);
    let scale = f32_or_f64(if dtype == DType::F64 {
        spec.scale()
    } else {
        f64::from(spec.scale_f32())
    });
    for b in 0..batch {
        for h in 0..spec.q_heads() {
            let g = spec.kv_head_of(h);
            for i in 0..seq_q {
                row_terms(spec, mods, shape, [&q, &k], (b, h, i), dtype, &mut terms);
                let row_lse = lse[[b, h, i]];
                if terms.is_empty() || row_lse == f64::NEG_INFINITY {
                    continue;
                }
                let d_out = d_o.slice(s![b, h, i, ..]);
                let delta = dot(d_out, o.slice(s![b, h, i, ..]));
                let g_lse = d_lse.as_ref().map_or(0.0, |d| f64::from(d[[b, h, i]]));
                for &Term { j, score, slope } in &terms {
                    let p = round((score - row_lse).exp());
                    let v_row = v.slice(s![b, g, j, ..]);
                    let dp = round(
                        d_out
                            .iter()
                            .zip(v_row)
                            .fold(0.0, |acc, (x, y)| f32_or_f64(acc + x.widen() * y.widen())),
                    );
                    let ds = round(p * f32_or_f64(f32_or_f64(dp - delta) + g_lse));
                    let d_raw = f32_or_f64(scale * f32_or_f64(ds * slope));
                    dv.slice_mut(s![b, g, j, ..])
                        .zip_mut_with(&d_out, |acc, &x| *acc = f32_or_f64(*acc + p * x.widen()));
                    dq.slice_mut(s![b, h, i, ..])
                        .zip_mut_with(&k.slice(s![b, g, j, ..]), |acc, &x| {
                            *acc = f32_or_f64(*acc + d_raw * x.widen())
                        });
                    dk.slice_mut(s![b, g, j, ..])
                        .zip_mut_with(&q.slice(s![b, h, i, ..]), |acc, &x| {
                            *acc = f32_or_f64(*acc + d_raw * x.widen())
                        });
                }
            }
        }
    }
    for grad in [&mut dq, &mut dk, &mut dv] {
        grad.mapv_inplace(|x| dtype.round(x));
    }
    Ok(Gradients { dq, dk, dv })
}

/// The keys row `(b, h, i)` sees, with their scores and `f′(raw)`, into `terms` (cleared
/// first), in key order; in low precision, scores as [`super::try_forward_rounded`] has them.
fn row_terms<T: Element>(
    spec: &AttentionSpec,
    mods: &dyn DynMods,
    shape: ProblemShape,
    [q, k]: [&ArrayView4<T>; 2],
    (b, h, i): (usize, usize, usize),
    dtype: DType,
    terms: &mut Vec<Term>,
) {
    let ProblemShape { seq_q, seq_k, .. } = shape;
    let g = spec.kv_head_of(h);
    terms.clear();
    for j in spec.mask().visible_keys(i, seq_q, seq_k) {
        let at = super::position(shape, b, h, i, j);
        if !mods.visible(at) {
            continue;
        }
        let (q_row, k_row) = (q.slice(s![b, h, i, ..]), k.slice(s![b, g, j, ..]));
        // `before`: the score after the spec's modifiers, the score mod's input.
        let (before, raw, score) = if dtype == DType::F64 {
            let dot = super::dot(q_row, k_row);
            let before = super::score(spec, h, i, j, seq_q, seq_k, dot);
            (before, spec.scale() * dot, mods.score_f64(before, at))
        } else {
            // Summed in the other order than the forward's: an executor recomputes the scores
            // in its backward, and its `P = exp(S − LSE)` carries the difference between two
            // honest roundings of each score (FlashAttention's kernels do; a yardstick whose
            // backward reused the forward's very roundings would be luckier than any of them).
            let order = super::low_precision::Order::Reverse;
            let (before, raw) =
                super::low_precision::score_f32(spec, h, i, j, shape, q_row, k_row, order);
            let score = dtype.round(f64::from(mods.score_f32(before, at)));
            (f64::from(before), f64::from(raw), score)
        };
        // f′: the score mod's derivative at its input, times softcap's at the raw score.
        let mut slope = mods.derivative(before, at);
        if let Some(cap) = spec.softcap() {
            slope *= if dtype == DType::F64 {
                let t = (raw / f64::from(cap)).tanh();
                1.0 - t * t
            } else {
                // As an f32 executor computes it: `1 − t²` cancels where `t` nears ±1, and
                // rounds at the scale of 1, not of the result.
                let t = (raw as f32 / cap).tanh();
                f64::from(1.0 - t * t)
            };
        }
        terms.push(Term { j, score, slope });
    }
}

/// Per gradient row, the magnitudes an honest computation of it rounds at (the tolerance
/// rule's per-row scales for gradients, [`super::compare_gradients`]; derived in the rule's
/// module docs): `dq: [batch, q_heads, seq_q]`, `dk`, `dv: [batch, kv_heads, seq_k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientTerms {
    pub dq: ndarray::Array3<f64>,
    pub dk: ndarray::Array3<f64>,
    pub dv: ndarray::Array3<f64>,
}

/// The [`GradientTerms`] of a backward problem (arguments as [`try_backward_with`]). For each
/// row `i` that sees keys: `T_i` its score terms ([`super::RowTerms::scores`]), `C_i` the
/// largest of `Σ_d |dO_id · v_jd|` over its keys and `Σ_d |dO_id| · max_j |v_jd|` (the terms of
/// `dP_ij` and of `δ_i`), and `E_i = max(1, T_i) · (2·C_i + |dLSE_i|)` — the scale of the
/// error of `dS_ij / P_ij`. Then, with `f′` the score's slope and `P` the oracle's
/// probabilities: `dq_i = |scale| · E_i · max(1, max_j |f′_ij|) · max_j |k_j|`, `dk_j = |scale| · Σ_i
/// P_ij · E_i · max(1, |f′_ij|) · max|q_i|` and `dv_j = Σ_i P_ij · max(1, T_i) · max|dO_i|` (over the
/// rows of every query head of the group that see key `j`).
pub fn try_gradient_terms_with<T: Element, M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    [q, k, v, d_o]: [ArrayView4<T>; 4],
    d_lse: Option<ArrayView3<f32>>,
) -> Result<GradientTerms> {
    let shape = check_shapes(
        "oracle::gradient_terms",
        spec,
        [&q, &k, &v, &d_o],
        d_lse.as_ref(),
    )?;
    let forward = super::forward_keys_dyn(spec, mods, q, k, v, 0..usize::MAX)?;
    let rows = super::row_terms_dyn(spec, mods, q, k, v, 0..usize::MAX)?;
    let ProblemShape {
        batch,
        seq_q,
        seq_k,
    } = shape;
    let largest = |x: ArrayView1<T>| x.iter().fold(0.0f64, |m, e| m.max(e.widen().abs()));
    let mut dq = ndarray::Array3::zeros((batch, spec.q_heads(), seq_q));
    let mut dk = ndarray::Array3::zeros((batch, spec.kv_heads(), seq_k));
    let mut dv = ndarray::Array3::zeros((batch, spec.kv_heads(), seq_k));
    let mut terms = Vec::with_capacity(seq_k);
    for b in 0..batch {
        for h in 0..spec.q_heads() {
            let g = spec.kv_head_of(h);
            for i in 0..seq_q {
                row_terms(
                    spec,
                    mods,
                    shape,
                    [&q, &k],
                    (b, h, i),
                    DType::F64,
                    &mut terms,
                );
                let lse = forward.lse[[b, h, i]];
                if terms.is_empty() || !lse.is_finite() {
                    continue;
                }
                let d_out = d_o.slice(s![b, h, i, ..]);
                let d_out_sum: f64 = d_out.iter().map(|x| x.widen().abs()).sum();
                let mut c = 0.0f64;
                let mut v_max = 0.0f64;
                let mut k_max = 0.0f64;
                let mut slope_max = 0.0f64;
                for term in &terms {
                    let v_row = v.slice(s![b, g, term.j, ..]);
                    let products = d_out
                        .iter()
                        .zip(v_row)
                        .map(|(x, y)| (x.widen() * y.widen()).abs());
                    c = c.max(products.sum());
                    v_max = v_max.max(largest(v_row));
                    k_max = k_max.max(largest(k.slice(s![b, g, term.j, ..])));
                    slope_max = slope_max.max(term.slope.abs().max(1.0));
                }
                c = c.max(d_out_sum * v_max);
                let t = rows.scores[[b, h, i]].max(1.0);
                let g_lse = d_lse
                    .as_ref()
                    .map_or(0.0, |d| f64::from(d[[b, h, i]]).abs());
                let e = t * (2.0 * c + g_lse);
                dq[[b, h, i]] = spec.scale().abs() * e * slope_max * k_max;
                let (q_max, d_o_max) = (largest(q.slice(s![b, h, i, ..])), largest(d_out));
                for term in &terms {
                    let p = (term.score - lse).exp();
                    let slope = term.slope.abs().max(1.0);
                    dk[[b, g, term.j]] += spec.scale().abs() * p * e * slope * q_max;
                    dv[[b, g, term.j]] += p * t * d_o_max;
                }
            }
        }
    }
    Ok(GradientTerms { dq, dk, dv })
}
