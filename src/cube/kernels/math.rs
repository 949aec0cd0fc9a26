//! Scalar functions the kernels share, accurate to about an ulp where the device's own are
//! coarser (measured on lavapipe), and the sentinels that stand in for infinities (WGSL cannot
//! spell one).

use cubecl::prelude::*;

/// A finite stand-in for −∞ in running maxima (WGSL has no infinity literal). Scores are f32
/// and bounded far below this in magnitude for any finite input.
pub const NEG_BIG: f32 = -1.0e30;
/// The bits of f32 −∞, written for the LSE of rows that see no key.
pub const NEG_INFINITY_BITS: u32 = 0xff80_0000;

/// `e^x` to about an ulp where softmax needs it. Device `exp` may be coarser — measured on
/// lavapipe over [−3, 0]: 2.9 ulp (0.7 here), absolute error 1.5 ε (0.5 here) — and softmax
/// probabilities inherit its error, enough to break the tolerance rule. Here: `x = k·ln2 + r`
/// with `|r| <= ln2/2` (ln 2 split in two so that `k·LN2_HI` is exact), a degree-7 Taylor
/// polynomial for `e^r` (truncation below 2^-27 relative), and `2^k` built from its bits.
/// (A driver free to reassociate float arithmetic, as Mesa's is, may merge the split: far from
/// 0 the result then loses a few ulps, on terms that are below 2^-20 of the row's largest.)
/// Results below `2^-126` (x < −87.3) flush to 0, above `f32::MAX` give +∞.
#[cube]
pub fn accurate_exp(x: f32) -> f32 {
    let clamped = clamp(x, -100.0f32, 100.0f32);
    let k = (clamped * core::f32::consts::LOG2_E).round();
    let r = (clamped - k * 0.693_145_75_f32) - k * 1.428_606_8e-6_f32;
    let poly = 1.0f32
        + r * (1.0f32
            + r * (0.5f32
                + r * (0.166_666_67_f32
                    + r * (0.041_666_668_f32
                        + r * (0.008_333_334_f32
                            + r * (0.001_388_888_9_f32 + r * 0.000_198_412_7_f32))))));
    // 2^k from its bits, branch-free (this runs unrolled in the kernels' inner loops): the
    // exponent field clamped to 0 gives 0 (k < −126), to 255 gives +∞ (k > 127).
    let field = clamp(i32::cast_from(k) + 127, 0i32, 255i32);
    poly * f32::reinterpret(u32::cast_from(field) << 23)
}

/// `ln x` for positive normal `x`, to about an ulp. The device's `ln` may be coarser (measured
/// on lavapipe over [1, 300]: up to 4.9 ε absolute, against 0.5 for a correctly rounded one),
/// and a row's LSE is `m + ln l`. Here: `x = 2^e · m` with `m` in [√½, √2),
/// `ln m = 2 atanh((m − 1)/(m + 1))` by its series to `f^9` (truncation below 2^-26 relative),
/// plus `e · ln 2` in two parts.
#[cube]
pub fn accurate_ln(x: f32) -> f32 {
    let bits = u32::reinterpret(x);
    let mut e = i32::cast_from((bits >> 23) & 0xff) - 127;
    let mut m = f32::reinterpret((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > core::f32::consts::SQRT_2 {
        m *= 0.5f32;
        e += 1;
    }
    let f = (m - 1.0f32) / (m + 1.0f32);
    let s = f * f;
    let tail = s * (0.333_333_34f32 + s * (0.2f32 + s * (0.142_857_15f32 + s * 0.111_111_11f32)));
    let log_m = 2.0f32 * f + 2.0f32 * f * tail;
    let ef = f32::cast_from(e);
    ef * 0.693_145_75_f32 + (log_m + ef * 1.428_606_8e-6_f32)
}

/// `e^x − 1` for `x >= 0`, to about an ulp: `x = k·ln2 + r` as in [`accurate_exp`], then
/// `2^k · (e^r − 1) + (2^k − 1)` with `e^r − 1` by its Taylor series (degree 8), so that no
/// step subtracts nearly equal numbers. Above `x = 88` the result is +∞.
#[cube]
fn accurate_expm1(x: f32) -> f32 {
    let clamped = min(x, 100.0f32);
    let k = (clamped * core::f32::consts::LOG2_E).round();
    let r = (clamped - k * 0.693_145_75_f32) - k * 1.428_606_8e-6_f32;
    let em1 = r
        * (1.0f32
            + r * (0.5f32
                + r * (0.166_666_67_f32
                    + r * (0.041_666_668_f32
                        + r * (0.008_333_334_f32
                            + r * (0.001_388_888_9_f32
                                + r * (0.000_198_412_7_f32 + r * 0.000_024_801_587_f32)))))));
    let ki = i32::cast_from(k);
    if ki > 127 {
        f32::reinterpret(0x7f80_0000u32)
    } else {
        let two_k = f32::reinterpret(u32::cast_from(ki + 127) << 23);
        two_k * em1 + (two_k - 1.0f32)
    }
}

/// `tanh` to about an ulp (measured in f32 emulation over [−3, 3]: 1.2 ulp). The device's own
/// `tanh` may lose absolute accuracy near 0 (measured on lavapipe: softcapped f32 scores off by
/// several ulps, outside the tolerance rule). Near 0 a Taylor polynomial (its first omitted
/// term is below 2^-28 relative for |y| < 0.4); elsewhere `t / (t + 2)` with
/// `t = e^{2|y|} − 1` (`accurate_expm1`), which has no cancellation; 1 from |y| = 9 on.
#[cube]
pub fn accurate_tanh(y: f32) -> f32 {
    let a = y.abs();
    let p = y * y;
    if a < 0.4f32 {
        let poly = -0.333_333_34f32
            + p * (0.133_333_34f32
                + p * (-0.053_968_254f32
                    + p * (0.021_869_488f32 + p * (-0.008_863_235f32 + p * 0.003_592_128f32))));
        y + y * p * poly
    } else {
        // Beyond 9, tanh rounds to 1 in f32 (and t / (t + 2) would overflow to ∞ / ∞ past 44).
        let t = accurate_expm1(2.0f32 * min(a, 9.0f32));
        let mut magnitude = t / (t + 2.0f32);
        if a >= 9.0f32 {
            magnitude = 1.0f32;
        }
        if y < 0.0f32 { -magnitude } else { magnitude }
    }
}
