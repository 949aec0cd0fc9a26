//! Which values a KV-cache storage must refuse, restated from the definitions rather than taken
//! from `StorageKind::represents`: the cache suite and the fuzzer (which includes this file with
//! `#[path]`) both judge the cache against it.

use gqa::cache::StorageKind;

/// Whether storage `kind` must refuse `value`: quantized storage holds no NaN or ∞; every
/// storage rounds to f32 first (max ≈ 3.4e38); f16's largest finite value is 65504 (from 65520
/// on, rounding gives ∞); bf16 keeps f32's exponent but rounds its top half-ulp to ∞; a quantized
/// row whose dequantized value `q · (|x| / q)` would overflow (near f32::MAX) cannot be stored.
pub fn must_refuse(kind: StorageKind, value: f64) -> bool {
    if !value.is_finite() {
        return kind.is_quantized();
    }
    // Rounding to nearest reaches ∞ from half an ulp above the largest finite value:
    // f16 65504 + 16; bf16 (2 − 2⁻⁷)·2¹²⁷ + 2¹¹⁹; f32 (after the f64 → f32 rounding) its own.
    let x = value.abs();
    let q = kind.quant_max() as f32;
    (x as f32).is_infinite()
        || (kind.is_quantized() && (q * ((x as f32) / q)).is_infinite())
        || (kind == StorageKind::Float16 && x >= 65520.0)
        || (kind == StorageKind::BFloat16
            && f64::from(x as f32) >= (2.0 - 2f64.powi(-8)) * 2f64.powi(127))
}
