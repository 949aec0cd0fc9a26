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

use crate::element::DType;

/// The outcome of a comparison: the numbers, so a failure message can show them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// `max |candidate − oracle|` (∞ for a NaN or an infinity mismatch).
    pub max_error: f64,
    /// Where it occurred (flat index).
    pub worst_index: usize,
    /// `max |oracle_in_dtype − oracle|`, the yardstick.
    pub low_precision_error: f64,
    /// The bound `max_error` must not exceed.
    pub bound: f64,
    pub dtype: DType,
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
            "{}: max error {:.3e} at flat index {} vs bound {:.3e} (2 × the {} oracle's error {:.3e} + floor)",
            if self.passed() {
                "within tolerance"
            } else {
                "OUT OF TOLERANCE"
            },
            self.max_error,
            self.worst_index,
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
/// `f64` oracle's `reference` under the rule above, `low_precision` being the oracle's result
/// computed in `dtype` ([`super::try_forward_rounded`]).
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
    let (_, low_precision_error) = worst(&low_precision);
    let (worst_index, max_error) = worst(&candidate);
    let magnitude = reference
        .iter()
        .filter(|r| r.is_finite())
        .fold(1.0f64, |m, r| m.max(r.abs()));
    Comparison {
        max_error,
        worst_index,
        low_precision_error,
        bound: 2.0 * low_precision_error + unit_roundoff(dtype) * magnitude,
        dtype,
    }
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
