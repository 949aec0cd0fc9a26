//! The tolerance rule — its one home. Every comparison of an executor with the oracle goes
//! through [`compare`].
//!
//! A result stored as `dtype` passes when its largest error against the `f64` oracle is at most
//! **twice the error of the oracle's own computation carried out in `dtype`**
//! ([`super::try_forward_rounded`]), plus a floor of one unit roundoff of `dtype` (`u` = `2^-24`
//! for f32, `2^-11` for f16, `2^-8` for bf16, `2^-53` for f64) at the scale of the values:
//!
//! `max |candidate − oracle| <= 2 · max |oracle_in_dtype − oracle| + u_dtype · max(1, max |oracle|)`
//!
//! This is FlashAttention's rule (its reference run without upcasting is the yardstick). The
//! floor is what storing the largest value in `dtype` may cost: without it a small tensor whose
//! low-precision oracle happens to land within a fraction of an ulp (a row that sees a single
//! key has `lse = s` exactly, for instance) would demand bit-exactness — and the device's own
//! `exp`/`tanh`, a few ulps from the host's, would fail it. Measured on lavapipe: an LSE of
//! magnitude ~15 off by 1.72e-6 (under 2 ulps) against a yardstick error of 8.3e-7. Equal values pass (so `−∞ == −∞` in an LSE). NaN anywhere — candidate or
//! either reference — fails, and so does a low-precision reference that overflowed: an infinite
//! yardstick would pass anything.
//!
//! **Per row.** [`compare_rows`] holds each query row (the `D` outputs of one (batch, head,
//! query)) to a bound at its own scale, so that short rows with large outputs do not set the
//! bound for the others:
//!
//! `max_r |candidate − oracle| <= (2ρ + 2u_dtype) · m_r`, with `m_r = max(1, max_r |oracle|, V_r)`
//! and `ρ = max over the tensor's rows of (max_r |oracle_in_dtype − oracle|) / m_r`,
//!
//! where `V_r` is the largest `|v|` among the values the row averages
//! ([`super::RowTerms::values`], scaled as below: an output is a convex combination of them, and where their
//! signs differ it is much smaller than they are, but rounds at their scale), and `ρ` is the
//! yardstick's largest error *relative to its row's scale*, anywhere in the tensor. Why the
//! tensor's relative error and not the row's own: one row's yardstick is one sample of an
//! honest low-precision computation's error, and can be exact by luck (a row that sees one key;
//! a summation order that happens to round well); "twice the row's own yardstick" then demands
//! bit-luck of the candidate. Measured on the CPU backend's suite (305 cases; ratio = error /
//! bound): outputs failed in 68 cases with the row's own yardstick (worst 41×), in none with
//! the tensor's relative one (worst 0.82), and in none over the whole tensor (worst 0.81).
//! Without `V_r`, one more case failed in the decode suite: a row of head dim 1 and `|o| < 1`
//! averaging values of magnitude up to 3, off by 2.3 · 10⁻⁷ against a bound of 1.4 · 10⁻⁷.
//!
//! `V_r` is taken times `max(1, T_r)`, `T_r` being the row's score terms (below,
//! [`super::RowTerms::outputs`]): an output's weights `e^{s − lse}` are computed from scores that
//! round at the scale of *their* terms, and a score off by `δ` moves the output by up to `2·V·δ`.
//! Found by the fuzzer: with head dim 2, terms of 10²–10³ that cancel to scores near 0 left the
//! `f32` yardstick nearly exact while the CPU (another summation order, equally honest) was
//! 1.2–4.9× the bound with `V_r` alone. What the factor loosens, measured on the suites' worst
//! case per dtype (error / bound): `f32` 0.80 → 0.39, `f16` 0.14 → 0.13, `bf16` 0.13 → 0.08.
//!
//! The floor is one ulp of the row's scale (`2u · m_r`), where the tensor-wide rule has half
//! of one at the tensor's: found by the fuzzer on problems of a few rows whose data are
//! multiples of 1/32, where the `f32` yardstick's dot products are exact and `ρ` is nearly 0 —
//! there the CPU's decode, honest (it sums in another order), was 1.5–2.5 ulp from the oracle,
//! 1.00–1.23× a half-ulp floor, in 22 of 10.4 million inputs.
//!
//! [`compare_lse`] does the same for log-sum-exps (rows of one value, stored in `f32`, judged
//! against the oracle computed in `f32`), with one change to the scale: `m_r = max(1,
//! |lse_r|, T_r)`, where `T_r` is the largest `|scale| · Σ_d |q_d · k_d| + |b_ij|` over the
//! row's visible keys, `b_ij` ALiBi's bias ([`super::RowTerms::scores`]): the bias is a term
//! of the score's sum like the products, and with small heads it dominates (found by
//! `GQA_SEED=6 GQA_CUBE_CASES=12 cargo test --test cube_backward gqa_4_2_d1`: head dim 1,
//! slopes up to 0.28 over ~300 keys, a kernel `dQ` error of 1.49 · 10⁻⁶ against a bound of
//! 1.30 · 10⁻⁶ with the products alone; a 10⁻⁴ relative error in the kernel's slope still
//! fails that test at 180× its bound). An LSE is a soft maximum of scores and inherits
//! their rounding, which is relative to the terms a score is summed from, not to the result:
//! measured, a one-key row with `lse = −23.04` computed from terms of magnitude 5.2 · 10⁴ was
//! off by 1.3 · 10⁻⁴ — 0.04 of one rounding of its terms — while the yardstick had been lucky
//! (6.5 · 10⁻⁶). With `m_r = max(1, |lse_r|)` alone, 4 of those 305 cases failed (worst 21×).
//!
//! **Gradients.** [`compare_gradients`] holds `dQ`, `dK` and `dV` to the per-row rule above
//! (rows of `head_dim`: one query's `dQ`, one key's `dK`, `dV`), with two changes that follow
//! from how a backward rounds.
//!
//! *The yardstick* is the oracle's backward computed in the storage dtype
//! ([`super::try_backward_rounded_with`]): its forward as above, then `dP`, `dS` and the
//! gradients rounded to the dtype, products and sums in `f32` — and the scores of its backward
//! summed in the reverse order of its forward's. Every executor that saves the LSE recomputes
//! `S` in its backward with other products than its forward's (other tiles, other `gemm`
//! shapes), so its `P = exp(S − LSE)` carries the difference of two honest roundings of each
//! score; a yardstick that reused its forward's very roundings would get `P` near 1 almost
//! exactly where the executor cannot. Measured on the CPU backward (8/2/64, 60 problems): the
//! worst `dV` ratio (error / bound) was 0.69 with a same-order yardstick, 0.25 with this one;
//! the CPU given the exact forward's `O` and `LSE` instead of its own read 0.59, so the gap is
//! the recomputation, not the saved forward.
//!
//! *The row scales* are the magnitudes each gradient is summed from ([`super::GradientTerms`]),
//! not its value. `dS_ij = P_ij · (dP_ij − δ_i + dLSE_i)` cancels: with one key, `dP = δ`
//! exactly and `dQ = 0`, while an honest `dP` and `δ` (two dot products of size `head_dim`)
//! differ by a rounding of their terms `C_i` — measured, a `dQ` of 0 came out as 1.4 · 10⁻⁵
//! from the CPU, against a bound of 6 · 10⁻⁸ at the scale of the result. And `P` is off,
//! relatively, by the scores' rounding `u · T_i`. So `dS_ij / P_ij` rounds at
//! `E_i = max(1, T_i) · (2 C_i + |dLSE_i|)`, and the rows' scales are that error carried
//! through the last product: `|scale| · E_i · max(1, |f′|) · max|k|` for `dQ_i`, the `P`-weighted
//! sums of `|scale| · E_i · max(1, |f′|) · max|q_i|` (for `dK_j`) and `max(1, T_i) · max|dO_i|`
//! (for `dV_j`) over the rows that see key `j`. The score's slope `f′` enters as at least 1:
//! softcap's `1 − tanh²(s/c)` computed in `f32` cancels where `tanh` nears ±1 and is off by
//! about `u`, not by `u · f′` (found on the first run: `dQ` errors of 3 · 10⁻⁶ against
//! bounds of 1.2 · 10⁻⁷ in saturated softcaps, with the slope taken as it is).

use super::{GradientTerms, Gradients};
use crate::element::DType;

/// The outcome of a comparison: the numbers, so a failure message can show them. For a
/// per-row comparison ([`compare_rows`]), the numbers are those of the row that came closest to
/// (or went furthest past) its bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// `max |candidate − oracle|` (∞ for a NaN or an infinity mismatch).
    pub max_error: f64,
    /// Where it occurred (flat index).
    pub worst_index: usize,
    /// `max |oracle_in_dtype − oracle|`, the yardstick (for a per-row comparison: the
    /// tensor's relative yardstick error at this row's scale, `ρ · m_r`).
    pub low_precision_error: f64,
    /// The bound `max_error` must not exceed.
    pub bound: f64,
    pub dtype: DType,
    /// The elements one bound covers: the whole tensor for [`compare`], a row for
    /// [`compare_rows`].
    pub row_len: usize,
}

impl Comparison {
    /// Whether the candidate is within the bound (never, if the yardstick itself was infinite
    /// or NaN).
    pub fn passed(&self) -> bool {
        self.bound.is_finite() && self.max_error <= self.bound
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: max error {:.3e} at flat index {} (row {}, rows of {}) vs bound {:.3e} (2 × the {} oracle's error {:.3e} + floor)",
            if self.passed() {
                "within tolerance"
            } else {
                "OUT OF TOLERANCE"
            },
            self.max_error,
            self.worst_index,
            self.worst_index / self.row_len.max(1),
            self.row_len,
            self.bound,
            self.dtype,
            self.low_precision_error
        )
    }
}

/// The unit roundoff of `dtype`: the absolute floor of the rule.
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f64::from(f32::EPSILON) / 2.0,
        DType::F16 => half::f16::EPSILON.to_f64() / 2.0,
        DType::BF16 => half::bf16::EPSILON.to_f64() / 2.0,
    }
}

/// Compares `candidate` (an executor's result, stored as `dtype`, widened to `f64`) with the
/// `f64` oracle's `reference` under the rule above, over the whole tensor, `low_precision` being
/// the oracle's result computed in `dtype` ([`super::try_forward_rounded`]).
///
/// # Panics
/// If the three have different lengths.
#[track_caller]
pub fn compare<'a>(
    reference: impl IntoIterator<Item = &'a f64>,
    low_precision: impl IntoIterator<Item = &'a f64>,
    candidate: impl IntoIterator<Item = &'a f64>,
    dtype: DType,
) -> Comparison {
    let (reference, low_precision, candidate) = collect(reference, low_precision, candidate);
    let len = reference.len();
    rule(&reference, &low_precision, &candidate, dtype, 0, len.max(1))
}

/// The per-row rule (module docs) over rows of `row_len` consecutive elements (`head_dim` for
/// outputs `[.., head_dim]`), `value_terms[r]` being row `r`'s value scale `V_r · max(1, T_r)`
/// ([`super::RowTerms::outputs`]). The result describes the row with the largest
/// `error / bound` (a failing one if any).
///
/// # Panics
/// If the three have different lengths, `row_len` is 0 or does not divide them, or there is
/// not one value-term magnitude per row.
#[track_caller]
pub fn compare_rows<'a>(
    reference: impl IntoIterator<Item = &'a f64>,
    low_precision: impl IntoIterator<Item = &'a f64>,
    candidate: impl IntoIterator<Item = &'a f64>,
    dtype: DType,
    row_len: usize,
    value_terms: impl IntoIterator<Item = &'a f64>,
) -> Comparison {
    let (reference, low_precision, candidate) = collect(reference, low_precision, candidate);
    let terms: Vec<f64> = value_terms.into_iter().copied().collect();
    assert_eq!(
        terms.len() * row_len.max(1),
        reference.len(),
        "compare_rows: one value-term magnitude per row"
    );
    per_row(
        &reference,
        &low_precision,
        &candidate,
        dtype,
        row_len,
        Some(&terms),
    )
}

/// The per-row rule for log-sum-exps (module docs): one row per value, the `f32` oracle's LSE
/// as `low_precision`, and `score_terms[r]` the largest `|scale| · Σ_d |q_d k_d|` over row `r`'s
/// visible keys ([`super::RowTerms::scores`]), which sets the row's scale with `|lse_r|`.
///
/// # Panics
/// If the four have different lengths.
#[track_caller]
pub fn compare_lse<'a>(
    reference: impl IntoIterator<Item = &'a f64>,
    low_precision: impl IntoIterator<Item = &'a f64>,
    candidate: impl IntoIterator<Item = &'a f64>,
    score_terms: impl IntoIterator<Item = &'a f64>,
) -> Comparison {
    let (reference, low_precision, candidate) = collect(reference, low_precision, candidate);
    let terms: Vec<f64> = score_terms.into_iter().copied().collect();
    assert_eq!(
        terms.len(),
        reference.len(),
        "compare_lse: one score-term magnitude per row"
    );
    per_row(
        &reference,
        &low_precision,
        &candidate,
        DType::F32,
        1,
        Some(&terms),
    )
}

#[track_caller]
fn per_row(
    reference: &[f64],
    low_precision: &[f64],
    candidate: &[f64],
    dtype: DType,
    row_len: usize,
    terms: Option<&[f64]>,
) -> Comparison {
    assert!(
        row_len > 0 && reference.len().is_multiple_of(row_len),
        "compare_rows: rows of {row_len} do not tile {} elements",
        reference.len()
    );
    let rows = reference.len() / row_len;
    let row = |r: usize| r * row_len..(r + 1) * row_len;
    // Each row's scale: its largest finite reference value (at least 1), or its scores' terms.
    let scale: Vec<f64> = (0..rows)
        .map(|r| {
            let values = reference[row(r)].iter().filter(|x| x.is_finite());
            let m = values.fold(1.0f64, |m, x| m.max(x.abs()));
            terms.map_or(m, |t| m.max(t[r]))
        })
        .collect();
    let error = |a: f64, b: f64| match (a, b) {
        _ if a.is_nan() || b.is_nan() => f64::INFINITY,
        _ if a == b => 0.0,
        _ => (a - b).abs(),
    };
    let worst = |values: &[f64], r: usize| {
        row(r).map(|i| (i, error(values[i], reference[i]))).fold(
            (r * row_len, 0.0),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        )
    };
    // The yardstick's largest error relative to its row's scale (∞ if it overflowed: then no
    // bound is finite and nothing passes).
    let rho = (0..rows)
        .map(|r| worst(low_precision, r).1 / scale[r])
        .fold(0.0f64, f64::max);
    let ratio = |c: &Comparison| match (c.max_error, c.bound) {
        (0.0, _) => 0.0,
        (e, b) if b.is_nan() || e.is_nan() || b <= 0.0 => f64::INFINITY,
        (e, b) => e / b,
    };
    (0..rows)
        .map(|r| {
            let (worst_index, max_error) = worst(candidate, r);
            Comparison {
                max_error,
                worst_index,
                low_precision_error: rho * scale[r],
                bound: 2.0 * (rho + unit_roundoff(dtype)) * scale[r],
                dtype,
                row_len,
            }
        })
        .fold(None, |w: Option<Comparison>, c| match w {
            Some(w) if ratio(&w) >= ratio(&c) => Some(w),
            _ => Some(c),
        })
        .unwrap_or(Comparison {
            max_error: 0.0,
            worst_index: 0,
            low_precision_error: 0.0,
            bound: unit_roundoff(dtype),
            dtype,
            row_len,
        })
}

#[track_caller]
fn collect<'a>(
    reference: impl IntoIterator<Item = &'a f64>,
    low_precision: impl IntoIterator<Item = &'a f64>,
    candidate: impl IntoIterator<Item = &'a f64>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let reference: Vec<f64> = reference.into_iter().copied().collect();
    let low_precision: Vec<f64> = low_precision.into_iter().copied().collect();
    let candidate: Vec<f64> = candidate.into_iter().copied().collect();
    assert_eq!(
        reference.len(),
        candidate.len(),
        "compare: reference and candidate lengths differ"
    );
    assert_eq!(
        reference.len(),
        low_precision.len(),
        "compare: reference and low-precision lengths differ"
    );
    (reference, low_precision, candidate)
}

/// The rule over one set of elements (a tensor or a row) starting at flat index `first`.
fn rule(
    reference: &[f64],
    low_precision: &[f64],
    candidate: &[f64],
    dtype: DType,
    first: usize,
    row_len: usize,
) -> Comparison {
    let error = |a: f64, b: f64| match (a, b) {
        _ if a.is_nan() || b.is_nan() => f64::INFINITY,
        _ if a == b => 0.0,
        _ => (a - b).abs(),
    };
    let worst = |values: &[f64]| {
        reference
            .iter()
            .zip(values)
            .map(|(&r, &x)| error(x, r))
            .enumerate()
            .fold(
                (0, 0.0),
                |best, (i, e)| if e > best.1 { (i, e) } else { best },
            )
    };
    let (_, low_precision_error) = worst(low_precision);
    let (worst_index, max_error) = worst(candidate);
    let magnitude = reference
        .iter()
        .filter(|r| r.is_finite())
        .fold(1.0f64, |m, r| m.max(r.abs()));
    Comparison {
        max_error,
        worst_index: first + worst_index,
        low_precision_error,
        bound: 2.0 * low_precision_error + unit_roundoff(dtype) * magnitude,
        dtype,
        row_len,
    }
}

/// The rule for gradients (module docs, *Gradients*): `dQ`, `dK` and `dV` each under the
/// per-row rule ([`compare_rows`]: rows of `head_dim`), the yardstick being the oracle's
/// backward computed in `dtype` ([`super::try_backward_rounded_with`]) and each row's scale
/// its [`super::GradientTerms`]. Returns the three comparisons, in that order.
pub fn compare_gradients(
    reference: &Gradients,
    low_precision: &Gradients,
    candidate: &Gradients,
    terms: &GradientTerms,
    dtype: DType,
) -> [Comparison; 3] {
    let (reference, low_precision, candidate) = (
        [&reference.dq, &reference.dk, &reference.dv],
        [&low_precision.dq, &low_precision.dk, &low_precision.dv],
        [&candidate.dq, &candidate.dk, &candidate.dv],
    );
    let scales = [&terms.dq, &terms.dk, &terms.dv];
    [0, 1, 2].map(|i| {
        let row_len = reference[i].shape()[3];
        if reference[i].is_empty() || row_len == 0 {
            return compare(reference[i], low_precision[i], candidate[i], dtype);
        }
        compare_rows(
            reference[i],
            low_precision[i],
            candidate[i],
            dtype,
            row_len,
            scales[i],
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twice_the_low_precision_error_passes_and_three_times_fails() {
        let reference = [0.25, 0.5, 0.75];
        let low = [0.25 + 1e-3, 0.5, 0.75];
        let bound = 2e-3 + unit_roundoff(DType::F16); // magnitudes <= 1: the floor is one u
        let within = [0.25, 0.5 - 0.99 * bound, 0.75];
        assert!(compare(&reference, &low, &within, DType::F16).passed());
        let result = compare(&reference, &low, &[0.25, 0.5, 0.75 + 3e-3], DType::F16);
        assert!(!result.passed(), "{result}");
        assert_eq!(result.worst_index, 2);
    }

    /// Whether `candidate` passes against an exact f32 yardstick (`low_precision == reference`).
    fn passes_exact_f32(reference: &[f64], candidate: &[f64]) -> bool {
        compare(reference, reference, candidate, DType::F32).passed()
    }

    #[test]
    fn an_exact_low_precision_reference_leaves_only_the_floor() {
        let reference = [0.5, 0.25];
        assert!(passes_exact_f32(&reference, &[0.5 + 2f64.powi(-25), 0.25]));
        assert!(!passes_exact_f32(&reference, &[0.5 + 2f64.powi(-22), 0.25]));
    }

    #[test]
    fn the_floor_scales_with_the_values() {
        // An exact yardstick at magnitude 16, where an f32 ulp is 2^-19: the floor 16 · 2^-24 =
        // 2^-20 admits half an ulp, not a whole one.
        let reference = [16.0, 1.0];
        assert!(passes_exact_f32(&reference, &[16.0 + 2f64.powi(-20), 1.0]));
        assert!(!passes_exact_f32(&reference, &[16.0 + 2f64.powi(-19), 1.0]));
    }

    #[test]
    fn an_overflowed_yardstick_does_not_pass_everything() {
        let reference = [70000.0, 1.0];
        let low = [f64::INFINITY, 1.0]; // 70000 overflows f16
        let result = compare(&reference, &low, &[70000.0, 123.0], DType::F16);
        assert!(!result.passed(), "{result}");
    }

    #[test]
    fn per_row_bounds_scale_with_each_row() {
        // Row 0 is large (magnitude 100) with a loose yardstick; row 1 is small and exact. Over
        // the tensor, row 0 lets row 1 be off by ~2e-3; per row, row 1 is held to its own
        // scale (1) times the tensor's relative yardstick error (1e-5) and the floor (2u).
        let reference = [100.0, 100.0, 0.5, 0.25];
        let low = [100.0 + 1e-3, 100.0, 0.5, 0.25];
        let candidate = [100.0, 100.0 + 1.5e-3, 0.5 + 1e-3, 0.25];
        assert!(compare(&reference, &low, &candidate, DType::F16).passed());
        let rows = compare_rows(&reference, &low, &candidate, DType::F16, 2, &[0.0, 0.0]);
        assert!(!rows.passed(), "{rows}");
        assert_eq!((rows.worst_index, rows.row_len), (2, 2));
        let u = unit_roundoff(DType::F16);
        assert!((rows.bound - 2.0 * (1e-5 + u)).abs() < 1e-12, "{rows}");
        let fine = [100.0, 100.0 + 1.5e-3, 0.5 + 1.9 * u, 0.25];
        assert!(compare_rows(&reference, &low, &fine, DType::F16, 2, &[0.0, 0.0]).passed());
        // A lucky row (its yardstick exact) still gets the tensor's relative error.
        let even = [1.0, 2.0];
        let lucky = compare_rows(
            &even,
            &[1.0 + 1e-3, 2.0],
            &[1.0, 2.0 + 3e-3],
            DType::F16,
            1,
            &[0.0, 0.0],
        );
        assert!(lucky.passed(), "{lucky}");
    }

    #[test]
    fn an_output_is_scaled_by_the_values_it_averages() {
        // o = 0.01 from values of magnitude 3 (opposite signs): an f32 error of 3.5e-7 is within
        // one ulp of the values (3 · 2^-23 ≈ 3.6e-7) plus twice the tensor's relative yardstick
        // error (2e-8 / 3 here) and passes; scaled by |o| alone (bound 1.6e-7) it would not.
        let (reference, low) = ([0.01], [0.01 + 2e-8]);
        let candidate = [0.01 + 3.5e-7];
        assert!(compare_rows(&reference, &low, &candidate, DType::F32, 1, &[3.0]).passed());
        assert!(!compare_rows(&reference, &low, &candidate, DType::F32, 1, &[0.0]).passed());
    }

    #[test]
    fn an_lse_is_scaled_by_its_scores_terms() {
        // lse = 0.5 from terms of magnitude 1000 (cancellation): an f32 error of 1e-5 is 0.08
        // of one ulp of the terms, and passes; with terms of magnitude 1 it does not.
        let (reference, low) = ([0.5, 2.0], [0.5, 2.0]);
        let candidate = [0.5 + 1e-5, 2.0];
        assert!(compare_lse(&reference, &low, &candidate, &[1000.0, 1.0]).passed());
        assert!(!compare_lse(&reference, &low, &candidate, &[1.0, 1.0]).passed());
        // Fully masked rows: −∞ equals −∞; anything else fails.
        let masked = [f64::NEG_INFINITY];
        assert!(compare_lse(&masked, &masked, &masked, &[0.0]).passed());
        assert!(!compare_lse(&masked, &masked, &[0.0], &[0.0]).passed());
    }

    #[test]
    fn nan_fails_and_equal_infinities_pass() {
        let reference = [f64::NEG_INFINITY, 1.0];
        assert!(passes_exact_f32(&reference, &[f64::NEG_INFINITY, 1.0]));
        assert!(!passes_exact_f32(
            &reference,
            &[f64::NEG_INFINITY, f64::NAN]
        ));
        assert!(!compare(&reference, &reference, &[0.0, 1.0], DType::F32).passed());
        assert!(!compare(&[f64::NAN], &[f64::NAN], &[f64::NAN], DType::F32).passed());
    }
}
