//! Element types: the storage types attention reads (`f64`, `f32`, `f16`, `bf16`) and their
//! names as values ([`DType`]). Arithmetic precision is a backend's choice; the oracle widens
//! everything to `f64` through `num-traits`.

use half::{bf16, f16};
use num_traits::{NumCast, ToPrimitive};

/// A storage type, as a value: what a KV cache stores and what a kernel is specialised on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes one element occupies.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name a Hugging Face `config.json` uses for it (`torch_dtype`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Parses a `torch_dtype` name (`"bfloat16"`, `"float16"`, `"float32"`, `"float64"`,
    /// with or without a `torch.` prefix).
    pub fn from_name(name: &str) -> Option<DType> {
        match name.trim_start_matches("torch.") {
            "float64" | "double" => Some(DType::F64),
            "float32" | "float" => Some(DType::F32),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Rounds an `f64` to this type and widens it back: the value a tensor of this type would
    /// hold. The tolerance rule uses it to measure the oracle's own rounding error.
    pub fn round(self, x: f64) -> f64 {
        match self {
            DType::F64 => x,
            DType::F32 => x as f32 as f64,
            DType::F16 => f16::from_f64(x).to_f64(),
            DType::BF16 => bf16::from_f64(x).to_f64(),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A storage element type. Implemented for `f64`, `f32`, [`half::f16`] and [`half::bf16`].
pub trait Element: Copy + Send + Sync + std::fmt::Debug + ToPrimitive + NumCast + 'static {
    /// This type as a value.
    const DTYPE: DType;

    /// Widens to `f64` (exact for every implementor).
    fn widen(self) -> f64 {
        ToPrimitive::to_f64(&self).expect("every gqa element type widens to f64")
    }

    /// Rounds an `f64` to the nearest value of this type.
    fn narrow(x: f64) -> Self {
        <Self as NumCast>::from(x)
            .expect("every f64 rounds to a gqa element type (NaN and inf included)")
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_keeps_each_types_significant_bits() {
        // 1 + 1/3 = 1.010101...b. f32 keeps 23 fraction bits: 1 + 2796203/2^23 (the 24th bit is 1
        // and rounds up); f16 keeps 10: 1 + 341/1024 (the 11th is 0, round down); bf16 keeps 7:
        // 1 + 43/128 (42.67 rounds up); f64 is unchanged.
        let x = 1.0 + 1.0 / 3.0;
        assert_eq!(DType::F32.round(x), 1.0 + 2796203.0 / 8388608.0);
        assert_eq!(DType::F16.round(x), 1.0 + 341.0 / 1024.0);
        assert_eq!(DType::BF16.round(x), 1.0 + 43.0 / 128.0);
        assert_eq!(DType::F64.round(x), x);
    }

    #[test]
    fn special_values_convert() {
        assert!(<f16 as Element>::narrow(f64::NAN).widen().is_nan());
        assert_eq!(
            <bf16 as Element>::narrow(f64::NEG_INFINITY).widen(),
            f64::NEG_INFINITY
        );
        assert_eq!(<f32 as Element>::narrow(1e300), f32::INFINITY);
    }

    #[test]
    fn names_round_trip() {
        for d in [DType::F64, DType::F32, DType::F16, DType::BF16] {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_name(&format!("torch.{}", d.name())), Some(d));
        }
        assert_eq!(DType::from_name("int8"), None);
    }
}
