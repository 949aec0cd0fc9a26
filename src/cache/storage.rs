//! How a KV cache stores one row — one token's key (or value) vector of one KV head.
//!
//! Every storage packs a row into whole 32-bit words (a row starts on a word boundary), so
//! that the same word buffers serve the host and a GPU. Quantized storages keep one `f32`
//! scale per row:
//!
//! | storage | a row of `D` channels | scale |
//! |---|---|---|
//! | [`Float32`] | `D` words | — |
//! | [`Float16`], [`BFloat16`] | `⌈D/2⌉` words, two per word, channel `2w` in the low half | — |
//! | [`Int8`] | `⌈D/4⌉` words, four signed bytes per word, channel `4w` in the low byte | `max|x| / 127` |
//! | [`Int4`] | `⌈D/8⌉` words, eight signed nibbles per word, channel `8w` in the low nibble | `max|x| / 7` |
//!
//! **Quantization** is symmetric with one scale per (token, KV head): `q = round(x / scale)`,
//! clamped to `±127` (int8) or `±7` (4-bit), and `x ≈ q · scale`. A row of zeros has scale 0.
//! Why per (token, head) rather than per group of channels: a decode step then reads one scale
//! per key row it reads, and the scales cost 4 bytes per row — 3 % of an int8 row and 6 % of a
//! 4-bit row at `D = 128`, where 32-channel groups would cost 4× that. The price is accuracy
//! when one channel of a row is an outlier; the error figures are reported by the tests and
//! benches against the unquantized input.

use std::fmt::Debug;

use half::{bf16, f16};

/// A storage kind as a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageKind {
    Float32,
    Float16,
    BFloat16,
    Int8,
    Int4,
}

impl StorageKind {
    /// Every storage kind, for tests and tables.
    pub const ALL: [StorageKind; 5] = [
        StorageKind::Float32,
        StorageKind::Float16,
        StorageKind::BFloat16,
        StorageKind::Int8,
        StorageKind::Int4,
    ];

    /// Channels packed into one 32-bit word.
    pub const fn channels_per_word(self) -> usize {
        match self {
            StorageKind::Float32 => 1,
            StorageKind::Float16 | StorageKind::BFloat16 => 2,
            StorageKind::Int8 => 4,
            StorageKind::Int4 => 8,
        }
    }

    /// Words one row of `head_dim` channels occupies.
    pub const fn words_per_row(self, head_dim: usize) -> usize {
        head_dim.div_ceil(self.channels_per_word())
    }

    /// Whether rows carry an `f32` scale.
    pub const fn is_quantized(self) -> bool {
        matches!(self, StorageKind::Int8 | StorageKind::Int4)
    }

    /// Exact bytes of one row, its scale included.
    pub const fn bytes_per_row(self, head_dim: usize) -> usize {
        4 * self.words_per_row(head_dim) + if self.is_quantized() { 4 } else { 0 }
    }

    /// The largest quantized magnitude (`127` or `7`); 0 for float storage.
    pub const fn quant_max(self) -> i32 {
        match self {
            StorageKind::Int8 => 127,
            StorageKind::Int4 => 7,
            _ => 0,
        }
    }

    /// A short name for tables: `f32`, `f16`, `bf16`, `int8`, `int4`.
    pub const fn name(self) -> &'static str {
        match self {
            StorageKind::Float32 => "f32",
            StorageKind::Float16 => "f16",
            StorageKind::BFloat16 => "bf16",
            StorageKind::Int8 => "int8",
            StorageKind::Int4 => "int4",
        }
    }

    /// Whether a finite input value `x` stays finite once stored and read back: f16 (largest
    /// finite value 65504) and bf16 round it from its `f32` value as the cache does
    /// (`f64 → f32 → storage`); every storage first rounds to `f32`; a quantized row holding `x`
    /// as its largest magnitude dequantizes it as `quant_max · (|x| / quant_max)` in `f32`,
    /// which rounds up to ∞ within a few ulps of `f32::MAX`. A finite value that would become
    /// ±∞ is one the storage cannot represent;
    /// [`KvCache::try_append`](super::KvCache::try_append) refuses it.
    pub fn represents(self, x: f64) -> bool {
        let wide = x as f32;
        match self {
            _ if !x.is_finite() || !wide.is_finite() => false,
            StorageKind::Float16 => f16::from_f32(wide).is_finite(),
            StorageKind::BFloat16 => bf16::from_f32(wide).is_finite(),
            StorageKind::Float32 => true,
            StorageKind::Int8 | StorageKind::Int4 => {
                let max = self.quant_max() as f32;
                (max * (wide.abs() / max)).is_finite()
            }
        }
    }

    /// Packs `x` (one row) into `words` (`words_per_row(x.len())` of them) and returns the
    /// row's scale (1 for float storage). Quantized storage needs finite input: the caller
    /// checks (a non-finite value has no scale).
    pub fn encode_row(self, x: &[f32], words: &mut [u32]) -> f32 {
        debug_assert_eq!(words.len(), self.words_per_row(x.len()));
        words.fill(0);
        let per_word = self.channels_per_word();
        let bits = 32 / per_word;
        let scale = if self.is_quantized() {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            amax / self.quant_max() as f32
        } else {
            1.0
        };
        for (c, &value) in x.iter().enumerate() {
            let lane: u32 = match self {
                StorageKind::Float32 => value.to_bits(),
                StorageKind::Float16 => u32::from(f16::from_f32(value).to_bits()),
                StorageKind::BFloat16 => u32::from(bf16::from_f32(value).to_bits()),
                StorageKind::Int8 | StorageKind::Int4 => {
                    let q = quantize(value, scale, self.quant_max());
                    (q as u32) & ((1u32 << bits) - 1)
                }
            };
            words[c / per_word] |= lane << (bits * (c % per_word));
        }
        scale
    }

    /// Unpacks one row of `out.len()` channels from `words`, multiplying quantized values by
    /// `scale`, rounded to `f32` (as a kernel holding the dequantized value in a register would
    /// see it). [`StorageKind::decode_row_exact`] gives the stored value itself.
    pub fn decode_row(self, words: &[u32], scale: f32, out: &mut [f32]) {
        for (c, value) in out.iter_mut().enumerate() {
            *value = self.channel(words, scale, c) as f32;
        }
    }

    /// The stored values exactly, in `f64` (a quantized lane times its `f32` scale is exact in
    /// `f64`): what an oracle compares against.
    pub fn decode_row_exact(self, words: &[u32], scale: f32, out: &mut [f64]) {
        for (c, value) in out.iter_mut().enumerate() {
            *value = self.channel(words, scale, c);
        }
    }

    fn channel(self, words: &[u32], scale: f32, c: usize) -> f64 {
        let per_word = self.channels_per_word();
        let bits = 32 / per_word;
        let word = words[c / per_word];
        let lane = if bits == 32 {
            word
        } else {
            (word >> (bits * (c % per_word))) & ((1u32 << bits) - 1)
        };
        match self {
            StorageKind::Float32 => f64::from(f32::from_bits(lane)),
            StorageKind::Float16 => f16::from_bits(lane as u16).to_f64(),
            StorageKind::BFloat16 => bf16::from_bits(lane as u16).to_f64(),
            // Sign-extend the lane, then scale.
            StorageKind::Int8 | StorageKind::Int4 => {
                let shift = 32 - bits;
                f64::from(((lane << shift) as i32) >> shift) * f64::from(scale)
            }
        }
    }
}

/// `round(x / scale)` clamped to `±max`; 0 when the scale is 0 (an all-zero row).
fn quantize(x: f32, scale: f32, max: i32) -> i32 {
    if scale == 0.0 {
        return 0;
    }
    ((x / scale).round() as i32).clamp(-max, max)
}

mod sealed {
    pub trait Sealed {}
}

/// A storage type for [`KvCache`](super::KvCache): [`Float32`], [`Float16`], [`BFloat16`],
/// [`Int8`], [`Int4`].
pub trait KvStorage: sealed::Sealed + Copy + Debug + Default + Send + Sync + 'static {
    const KIND: StorageKind;
}

macro_rules! storage {
    ($($(#[$doc:meta])* $name:ident => $kind:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $name;
        impl sealed::Sealed for $name {}
        impl KvStorage for $name {
            const KIND: StorageKind = StorageKind::$kind;
        }
    )*};
}

storage! {
    /// `f32` rows.
    Float32 => Float32;
    /// IEEE half rows (round to nearest even).
    Float16 => Float16;
    /// bfloat16 rows (round to nearest even).
    BFloat16 => BFloat16;
    /// Symmetric int8 with an `f32` scale per (token, KV head).
    Int8 => Int8;
    /// Symmetric 4-bit, two channels per byte, with an `f32` scale per (token, KV head).
    Int4 => Int4;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(kind: StorageKind, x: &[f32]) -> Vec<f32> {
        let mut words = vec![0; kind.words_per_row(x.len())];
        let scale = kind.encode_row(x, &mut words);
        let mut out = vec![0.0; x.len()];
        kind.decode_row(&words, scale, &mut out);
        out
    }

    #[test]
    fn float_storage_rounds_like_the_dtype() {
        let x = [1.0f32, -2.5, 1.0e-3, 3.140_625, 65504.0, -0.0, 7.0];
        assert_eq!(roundtrip(StorageKind::Float32, &x), x);
        for (kind, round) in [
            (
                StorageKind::Float16,
                (|v| f16::from_f32(v).to_f32()) as fn(f32) -> f32,
            ),
            (StorageKind::BFloat16, |v| bf16::from_f32(v).to_f32()),
        ] {
            let expected: Vec<f32> = x.iter().map(|&v| round(v)).collect();
            assert_eq!(roundtrip(kind, &x), expected, "{kind:?}");
        }
    }

    #[test]
    fn quantized_rows_are_within_half_a_step() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7) as f32 * 0.31).sin() * 3.0)
            .collect();
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for kind in [StorageKind::Int8, StorageKind::Int4] {
            let step = amax / kind.quant_max() as f32;
            let y = roundtrip(kind, &x);
            for (a, b) in x.iter().zip(&y) {
                assert!(
                    (a - b).abs() <= 0.5 * step * (1.0 + 1e-5),
                    "{kind:?}: {a} vs {b}"
                );
            }
            // The extreme channel is represented exactly up to f32 rounding.
            let at = x.iter().position(|v| v.abs() == amax).unwrap();
            assert!((y[at] - x[at]).abs() <= amax * 1e-6);
        }
    }

    #[test]
    fn negative_lanes_are_sign_extended_and_zero_rows_stay_zero() {
        assert_eq!(
            roundtrip(StorageKind::Int4, &[-7.0, 7.0, -1.0, 0.0, 3.0]),
            [-7.0, 7.0, -1.0, 0.0, 3.0]
        );
        assert_eq!(roundtrip(StorageKind::Int8, &[0.0; 9]), [0.0; 9]);
        assert_eq!(roundtrip(StorageKind::Int4, &[0.0; 3]), [0.0; 3]);
    }

    #[test]
    fn finite_values_beyond_a_storages_range_are_not_represented() {
        use StorageKind::*;
        // f16's largest finite value is 65504; from 65520 on, round-to-nearest gives ∞.
        assert!(Float16.represents(65504.0) && Float16.represents(65519.0));
        assert!(!Float16.represents(65520.0) && !Float16.represents(-1e5));
        // bf16 keeps f32's exponent: only the last half-ulp below f32::MAX rounds to ∞.
        assert!(BFloat16.represents(3.0e38) && !BFloat16.represents(f64::from(f32::MAX)));
        // Found by the fuzzer: int8 of f32::MAX has scale MAX/127 (rounded up), and 127 · scale
        // is ∞ in f32. (For int4, 7 · (MAX/7) happens to round back to MAX.)
        assert!(Float32.represents(f64::from(f32::MAX)) && Int4.represents(f64::from(f32::MAX)));
        assert!(!Int8.represents(f64::from(f32::MAX)));
        assert!(Int8.represents(1e38) && Int4.represents(3.0e38));
        let mut words = [0u32; 1];
        let scale = Int8.encode_row(&[1e38, -5.0], &mut words);
        let mut back = [0.0f32; 2];
        Int8.decode_row(&words, scale, &mut back);
        assert!(back[0].is_finite());
        // Every storage rounds to f32 first: an f64 beyond its range is lost everywhere.
        for kind in StorageKind::ALL {
            assert!(!kind.represents(1e300), "{kind:?}");
            assert!(!kind.represents(f64::NAN), "{kind:?}");
            assert!(kind.represents(1.5), "{kind:?}");
        }
    }

    #[test]
    fn row_sizes_are_exact() {
        // D = 128: f32 512 B, f16 256 B, int8 128 + 4 B, int4 64 + 4 B.
        let bytes: Vec<usize> = StorageKind::ALL
            .iter()
            .map(|k| k.bytes_per_row(128))
            .collect();
        assert_eq!(bytes, [512, 256, 256, 132, 68]);
        // Odd head dims round up to whole words.
        assert_eq!(StorageKind::Int4.words_per_row(9), 2);
        assert_eq!(StorageKind::Float16.words_per_row(3), 2);
    }
}
