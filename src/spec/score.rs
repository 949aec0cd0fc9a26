//! Score modifiers: what happens to a query·key dot product before the softmax.
//!
//! In order, for query head `h`, query `i`, key `j` (`diag(i)` as in [`super::mask`]):
//!
//! 1. scale: `s = scale · (q_i · k_j)`, `scale` defaulting to `1/√head_dim`;
//! 2. logit softcap (Gemma 2, Grok): `s = cap · tanh(s / cap)`;
//! 3. ALiBi: `s = s − slope_h · |diag(i) − j|` (bottom-right: `|i + seq_k − seq_q − j|`).
//!
//! The scale is stored as `f64`, so that the oracle computes the definition in `f64` end to end
//! (the default `1/√head_dim` is not an `f32` number for most head dims); `f32` executors take
//! it rounded once ([`crate::AttentionSpec::scale_f32`]). Caps and slopes are `f32` values,
//! exact in `f64`, which every executor reads alike.

use crate::error::{Error, Result};
use crate::heads::MAX_Q_HEADS;

/// A finite `f32` compared and hashed by value (`-0.0` is stored as `0.0`), so specs holding one
/// can be `Eq + Hash`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Finite32(u32);

impl Finite32 {
    /// `None` for NaN and ±∞.
    pub(crate) fn new(x: f32) -> Option<Finite32> {
        x.is_finite().then(|| Finite32((x + 0.0).to_bits()))
    }

    pub(crate) fn get(self) -> f32 {
        f32::from_bits(self.0)
    }
}

/// A finite `f64` that is also finite rounded to `f32` (what `f32` executors multiply by),
/// compared and hashed by value (`-0.0` is stored as `0.0`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Finite64(u64);

impl Finite64 {
    /// `None` for NaN, ±∞ and magnitudes that overflow `f32`.
    pub(crate) fn new(x: f64) -> Option<Finite64> {
        (x.is_finite() && (x as f32).is_finite()).then(|| Finite64((x + 0.0).to_bits()))
    }

    pub(crate) fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl std::fmt::Debug for Finite64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl std::fmt::Debug for Finite32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// One ALiBi slope per query head, stored inline so that a spec stays `Copy`.
///
/// [`AlibiSlopes::geometric`] gives the standard slopes of Press et al. (2022) — for `n` a power
/// of two, head `h` gets `2^(−8(h+1)/n)`; otherwise the `2^⌊log₂n⌋` slopes followed by every other
/// slope of the next power of two — the sequence BLOOM, MPT and FlashAttention use.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AlibiSlopes {
    len: usize,
    slopes: [Finite32; MAX_Q_HEADS],
}

impl AlibiSlopes {
    /// The standard geometric slopes for `q_heads` heads (`1 <= q_heads <= 256`).
    ///
    /// # Panics
    /// If `q_heads` is 0 or above [`MAX_Q_HEADS`].
    #[track_caller]
    pub fn geometric(q_heads: usize) -> AlibiSlopes {
        assert!(
            (1..=MAX_Q_HEADS).contains(&q_heads),
            "ALiBi slopes need 1..={MAX_Q_HEADS} query heads, got {q_heads}"
        );
        let power_of_two_slopes =
            |n: usize| (0..n).map(move |h| (-8.0 * (h + 1) as f64 / n as f64).exp2());
        let base = 1usize << q_heads.ilog2();
        let slopes: Vec<f32> = power_of_two_slopes(base)
            .chain(
                power_of_two_slopes(2 * base)
                    .step_by(2)
                    .take(q_heads - base),
            )
            .map(|s| s as f32)
            .collect();
        AlibiSlopes::try_new(q_heads, &slopes).expect("geometric slopes are finite, one per head")
    }

    /// User slopes, one per query head: `slopes.len()` must equal `q_heads`.
    pub fn try_new(q_heads: usize, slopes: &[f32]) -> Result<AlibiSlopes> {
        if slopes.len() != q_heads || q_heads == 0 || q_heads > MAX_Q_HEADS {
            return Err(Error::AlibiSlopeCount {
                q_heads,
                slopes: slopes.len(),
            });
        }
        let mut stored = [Finite32(0); MAX_Q_HEADS];
        for (head, (&slope, slot)) in slopes.iter().zip(&mut stored).enumerate() {
            *slot = Finite32::new(slope).ok_or(Error::InvalidAlibiSlope { head, slope })?;
        }
        Ok(AlibiSlopes {
            len: q_heads,
            slopes: stored,
        })
    }

    /// The number of slopes (= query heads).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a slope table has at least one head.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slope of query head `head`.
    ///
    /// # Panics
    /// If `head >= self.len()`.
    #[track_caller]
    pub fn slope(&self, head: usize) -> f32 {
        assert!(
            head < self.len,
            "ALiBi slope of head {head} requested, but there are {} heads",
            self.len
        );
        self.slopes[head].get()
    }

    /// All slopes, head 0 first.
    pub fn to_vec(&self) -> Vec<f32> {
        self.slopes[..self.len].iter().map(|s| s.get()).collect()
    }
}

impl std::fmt::Debug for AlibiSlopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.slopes[..self.len]).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_slopes_for_a_power_of_two() {
        // Press et al.: 8 heads get 1/2, 1/4, ..., 1/256.
        let expected: Vec<f32> = (1..=8).map(|k| 1.0 / (1u32 << k) as f32).collect();
        assert_eq!(AlibiSlopes::geometric(8).to_vec(), expected);
    }

    #[test]
    fn geometric_slopes_for_twelve_heads_interleave_the_next_power() {
        // 8 power-of-two slopes 2^-1..2^-8, then every other slope of 16 heads: 2^-0.5, 2^-1.5, ...
        let mut expected: Vec<f32> = (1..=8).map(|k| 1.0 / (1u32 << k) as f32).collect();
        expected.extend([0.5f64, 1.5, 2.5, 3.5].map(|e| (2f64).powf(-e) as f32));
        assert_eq!(AlibiSlopes::geometric(12).to_vec(), expected);
    }

    #[test]
    fn one_head_gets_slope_one_over_256() {
        assert_eq!(AlibiSlopes::geometric(1).to_vec(), vec![1.0 / 256.0]);
    }

    #[test]
    fn non_finite_user_slopes_are_rejected() {
        assert_eq!(
            AlibiSlopes::try_new(2, &[0.5, f32::NAN])
                .map(|_| ())
                .unwrap_err()
                .to_string(),
            "ALiBi slope of query head 1 must be finite, got NaN"
        );
    }

    #[test]
    fn slope_count_must_match_the_heads() {
        assert_eq!(
            AlibiSlopes::try_new(4, &[0.5; 3])
                .map(|_| ())
                .unwrap_err()
                .to_string(),
            "ALiBi needs one slope per query head: 4 query heads, 3 slopes given"
        );
    }

    #[test]
    fn negative_zero_equals_zero() {
        assert_eq!(Finite32::new(-0.0), Finite32::new(0.0));
        assert_eq!(Finite32::new(f32::INFINITY), None);
        assert_eq!(Finite64::new(-0.0), Finite64::new(0.0));
        assert_eq!(Finite64::new(f64::NAN), None);
    }

    #[test]
    fn a_scale_must_stay_finite_in_f32() {
        assert!(Finite64::new(f64::from(f32::MAX)).is_some());
        assert_eq!(Finite64::new(1e39), None);
        assert_eq!(Finite64::new(-1e300), None);
        // Below f32's range is fine: it rounds to a (sub)normal or zero, never to ±∞.
        assert!(Finite64::new(1e-50).is_some());
    }
}
