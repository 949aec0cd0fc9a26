//! The element-wise loops of the CPU backend, written so that LLVM vectorises them. They are
//! `#[inline(always)]`: the hot loops that call them are compiled once per instruction set with
//! `multiversion` (AVX-512, AVX2+FMA, the baseline) and pick the best at run time, and an
//! inlined helper is compiled with its caller's instruction set. No `unsafe`, no intrinsics:
//! lanes are explicit arrays of partial sums where the order of a reduction matters.

/// Lanes of the explicit partial sums (one AVX-512 register of f32).
const LANES: usize = 16;

/// `y *= a`.
#[inline(always)]
pub fn scale(a: f32, y: &mut [f32]) {
    for y in y.iter_mut() {
        *y *= a;
    }
}

/// The largest element (`−∞` for none); NaN-free input assumed (scores of finite data).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (body, tail) = x.split_at(x.len() / LANES * LANES);
    for chunk in body.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = if chunk[l] > acc[l] { chunk[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in tail {
        m = if v > m { v } else { m };
    }
    for v in acc {
        m = if v > m { v } else { m };
    }
    m
}

/// `x ← cap · tanh(x / cap)` for every element, computed in `f64` and rounded once. In `f32`
/// (three roundings and `tanhf`'s own error) a capped score is off by up to ~2 ulps, which a
/// row's LSE inherits: found by the fuzzer, a decode LSE of 10.98 off by 2.44e-6 (2.6 ulps)
/// against a bound of 2.31e-6; 5.3e-7 with this. Not vectorised (`tanh` is a libm call), like
/// the `f32` loop it replaces.
#[inline(always)]
pub fn softcap(x: &mut [f32], cap: f32) {
    let cap = f64::from(cap);
    for v in x.iter_mut() {
        *v = (cap * (f64::from(*v) / cap).tanh()) as f32;
    }
}

/// `x ← exp(x − m)` for every element, and returns their sum, accumulated in `f64` lanes (a
/// row's LSE is `m + ln sum`: the sum's rounding would be the LSE's largest error in f32).
/// `exp` is [`exp`] below: about 1 ulp, 0 for arguments below −104 (−∞ included).
#[inline(always)]
pub fn exp_shifted_sum(x: &mut [f32], m: f32) -> f64 {
    // A plain element-wise loop (LLVM vectorises it whole), then the sum in explicit lanes.
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    const WIDE: usize = LANES / 2;
    let mut acc = [0.0f64; WIDE];
    let (body, tail) = x.split_at(x.len() / WIDE * WIDE);
    for chunk in body.chunks_exact(WIDE) {
        for l in 0..WIDE {
            acc[l] += f64::from(chunk[l]);
        }
    }
    let mut rest = 0.0f64;
    for &v in tail {
        rest += f64::from(v);
    }
    acc.iter().sum::<f64>() + rest
}

/// `e^x` in f32 from arithmetic only (so that it vectorises): `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2` (Cody–Waite, two-part ln 2), `e^r` by its degree-7 Taylor polynomial
/// (truncation below 2⁻²⁸ relative), times `2^n` built from the exponent bits. About 1 ulp
/// over the range the softmax uses (x ≤ 0); 0 below −104 (−∞ and NaN-free masked scores
/// included); arguments above 88.72 (none in a softmax, where x ≤ 0) are clamped to it.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 to 16 bits: n · LN2_HI is exact for |n| < 256
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by the 1.5 · 2²³ trick (vectorises; no rounding instruction needed).
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-104.0, 88.72);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    // Horner with fused multiply-adds (one rounding per step; the callers are compiled with
    // FMA wherever the CPU has it).
    let mut p = 1.0f32 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // n as an integer from the bits of `shifted` (1.5 · 2²³ + n keeps n in its low mantissa
    // bits): a float-to-int conversion would be scalarised for its NaN and overflow checks.
    // 2^n in two factors so that n down to −150 (subnormal results) stays representable.
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let half = n >> 1;
    let a = f32::from_bits(((half + 127) as u32) << 23);
    let b = f32::from_bits(((n - half + 127) as u32) << 23);
    let y = p * a * b;
    if x < -104.0 { 0.0 } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = f64::from(f32::from_bits(b32.abs().to_bits() + 1) - b32.abs());
        (f64::from(a) - b).abs() / ulp
    }

    /// The worst error of `exp` in ulps over `n + 1` evenly spaced points of `[lo, hi]`, where
    /// the result is a normal f32.
    fn worst_ulps(lo: f64, hi: f64, n: u32) -> f64 {
        let mut worst: f64 = 0.0;
        for i in 0..=n {
            let x32 = (lo + (hi - lo) * f64::from(i) / f64::from(n)) as f32;
            let exact = f64::from(x32).exp();
            if exact > f64::from(f32::MIN_POSITIVE) && exact < f64::from(f32::MAX) {
                worst = worst.max(ulps(exp(x32), exact));
            }
        }
        worst
    }

    #[test]
    fn exp_is_within_one_ulp_where_the_softmax_uses_it() {
        let worst = worst_ulps(-103.0, 0.0, 200_000);
        eprintln!("exp on [-103, 0]: worst {worst} ulp");
        assert!(worst <= 1.0, "worst {worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// Positive arguments (a rescale's `exp(m_old − m_new)` never has one, but the function
    /// promises them up to its clamp): as accurate, checked in both directions.
    #[test]
    fn exp_is_within_one_ulp_on_positive_arguments() {
        let worst = worst_ulps(0.0, 88.5, 100_000);
        eprintln!("exp on [0, 88.5]: worst {worst} ulp");
        assert!(worst <= 1.0, "worst {worst} ulp");
        for (x, expected) in [
            (1.0f32, std::f32::consts::E),
            (2.0, 7.389_056),
            (-1.0, 0.367_879_45),
        ] {
            assert!(
                ulps(exp(x), f64::from(expected)) <= 1.0,
                "exp({x}) = {}",
                exp(x)
            );
        }
        // Clamped at 88.72, just below f32::MAX: never ∞.
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 3.0e38);
    }

    #[test]
    fn reductions_match_their_definitions() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        assert_eq!(max(&a), a.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mut x = a.clone();
        let sum = exp_shifted_sum(&mut x, 1.0);
        let exact: f64 = a.iter().map(|&v| (f64::from(v) - 1.0).exp()).sum();
        assert!((sum - exact).abs() < 1e-6 * exact);
        let mut y = b.clone();
        scale(0.5, &mut y);
        let before = b;
        assert!(y.iter().zip(&before).all(|(y, b)| *y == 0.5 * b));
    }
}
