//! The tolerance rule — its one home. Every comparison of an executor with the oracle goes
//! through [`compare`].
//!
//! A result stored as `dtype` passes when its largest error against the `f64` oracle is at most
//! **twice the oracle's own error after rounding to `dtype`**, plus a floor of one unit roundoff
//! of `dtype` (`2^-24` for f32, `2^-11` for f16, `2^-8` for bf16, `2^-53` for f64):
//!
//! `max |candidate − oracle| <= 2 · max |round_dtype(oracle) − oracle| + u_dtype`
//!
//! The doubling is FlashAttention's rule; the floor keeps outputs that happen to be exactly
//! representable (zero rounding error) from demanding bit-exactness. Equal values pass (so
//! `−∞ == −∞` in an LSE). NaN anywhere — candidate or reference — fails, and a reference value
//! outside the dtype's range does not widen the bound (its rounding error would be infinite);
//! a candidate can only match it by being equal.

use crate::element::DType;

/// The outcome of a comparison: the numbers, so a failure message can show them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// `max |candidate − oracle|` (∞ for a NaN or an infinity mismatch).
    pub max_error: f64,
    /// Where it occurred (flat index).
    pub worst_index: usize,
    /// `max |round_dtype(oracle) − oracle|`.
    pub oracle_rounding_error: f64,
    /// The bound `max_error` must not exceed.
    pub bound: f64,
    pub dtype: DType,
}

impl Comparison {
    /// Whether the candidate is within the bound.
    pub fn passed(&self) -> bool {
        self.max_error <= self.bound
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: max error {:.3e} at flat index {} vs bound {:.3e} (2 × oracle's {} rounding error {:.3e} + floor)",
            if self.passed() {
                "within tolerance"
            } else {
                "OUT OF TOLERANCE"
            },
            self.max_error,
            self.worst_index,
            self.bound,
            self.dtype,
            self.oracle_rounding_error
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
/// oracle's `reference` under the rule above.
///
/// # Panics
/// If the two have different lengths.
#[track_caller]
pub fn compare<'a>(
    reference: impl IntoIterator<Item = &'a f64>,
    candidate: impl IntoIterator<Item = &'a f64>,
    dtype: DType,
) -> Comparison {
    let reference: Vec<f64> = reference.into_iter().copied().collect();
    let candidate: Vec<f64> = candidate.into_iter().copied().collect();
    assert_eq!(
        reference.len(),
        candidate.len(),
        "compare: reference and candidate lengths differ"
    );
    let error = |a: f64, b: f64| match (a, b) {
        _ if a.is_nan() || b.is_nan() => f64::INFINITY,
        _ if a == b => 0.0,
        _ => (a - b).abs(),
    };
    let oracle_rounding_error = reference
        .iter()
        .map(|&r| error(dtype.round(r), r))
        .filter(|e| e.is_finite())
        .fold(0.0, f64::max);
    let (worst_index, max_error) = reference
        .iter()
        .zip(&candidate)
        .map(|(&r, &c)| error(c, r))
        .enumerate()
        .fold(
            (0, 0.0),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        );
    Comparison {
        max_error,
        worst_index,
        oracle_rounding_error,
        bound: 2.0 * oracle_rounding_error + unit_roundoff(dtype),
        dtype,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oracle_rounded_to_the_dtype_passes() {
        let reference = [0.1, -1.0 / 3.0, 2.0 / 7.0, 1e-3];
        let rounded = reference.map(|r| DType::F16.round(r));
        assert!(compare(&reference, &rounded, DType::F16).passed());
    }

    #[test]
    fn three_times_the_rounding_error_fails() {
        let reference = [1.0 / 3.0, 0.5];
        let rounding = (DType::F16.round(1.0 / 3.0) - 1.0 / 3.0).abs();
        assert!(rounding > 0.0);
        let off = [1.0 / 3.0 + 3.0 * rounding + unit_roundoff(DType::F16), 0.5];
        let result = compare(&reference, &off, DType::F16);
        assert!(!result.passed(), "{result}");
        assert_eq!(result.worst_index, 0);
    }

    #[test]
    fn exact_references_still_get_the_floor() {
        // 0.5 and 0.25 are exact in f32: rounding error 0, so only the floor is left.
        let reference = [0.5, 0.25];
        assert!(compare(&reference, &[0.5 + 2f64.powi(-25), 0.25], DType::F32).passed());
        assert!(!compare(&reference, &[0.5 + 2f64.powi(-22), 0.25], DType::F32).passed());
    }

    #[test]
    fn a_reference_outside_the_dtype_range_does_not_widen_the_bound() {
        // 70000 overflows f16: its rounding error is infinite and must not become the bound.
        let reference = [70000.0, 1.0];
        let result = compare(&reference, &[70000.0, 123.0], DType::F16);
        assert!(!result.passed(), "{result}");
        assert!(result.bound.is_finite());
    }

    #[test]
    fn a_nan_reference_fails_even_against_nan() {
        assert!(!compare(&[f64::NAN], &[f64::NAN], DType::F32).passed());
    }

    #[test]
    fn nan_fails_and_equal_infinities_pass() {
        let reference = [f64::NEG_INFINITY, 1.0];
        assert!(compare(&reference, &[f64::NEG_INFINITY, 1.0], DType::F32).passed());
        assert!(!compare(&reference, &[f64::NEG_INFINITY, f64::NAN], DType::F32).passed());
        assert!(!compare(&reference, &[0.0, 1.0], DType::F32).passed());
    }
}
