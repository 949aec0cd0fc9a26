//! KV-cache size accounting, in integers so that ratios are exact.

use crate::element::DType;

/// What the KV cache of one attention configuration costs.
///
/// # Examples
/// Llama-3-8B keeps 8 KV heads for its 32 query heads: a quarter of the multi-head cache.
/// ```
/// use gqa::{DType, Gqa, Mha};
/// let gqa = Gqa::<32, 8, 128>::new().kv_cache(DType::BF16);
/// let mha = Mha::<32, 128>::new().kv_cache(DType::BF16);
/// assert_eq!(gqa.bytes_per_token_per_layer(), 4096); // 2 (K and V) · 8 heads · 128 · 2 bytes
/// assert_eq!(mha.bytes(32, 1, 8192), 4 * gqa.bytes(32, 1, 8192));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvCacheFootprint {
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
}

impl KvCacheFootprint {
    pub(crate) fn new(q_heads: usize, kv_heads: usize, head_dim: usize, dtype: DType) -> Self {
        KvCacheFootprint {
            q_heads,
            kv_heads,
            head_dim,
            dtype,
        }
    }

    /// The element type the cache stores.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes one token adds to one layer's cache: a key and a value vector per KV head.
    pub fn bytes_per_token_per_layer(&self) -> u128 {
        2 * self.kv_heads as u128 * self.head_dim as u128 * self.dtype.size_bytes() as u128
    }

    /// Bytes one token adds across `layers` layers.
    ///
    /// # Panics
    /// If the count does not fit in a `u128` (above 3.4 · 10³⁸ bytes), as for [`Self::bytes`].
    #[track_caller]
    pub fn bytes_per_token(&self, layers: usize) -> u128 {
        times(layers, self.bytes_per_token_per_layer())
    }

    /// Bytes of one sequence of `context` tokens across `layers` layers.
    ///
    /// # Panics
    /// If the count does not fit in a `u128`, as for [`Self::bytes`].
    #[track_caller]
    pub fn bytes_per_sequence(&self, layers: usize, context: usize) -> u128 {
        times(context, self.bytes_per_token(layers))
    }

    /// Bytes of a whole model's cache: `layers` layers, `batch` sequences of `context` tokens.
    ///
    /// # Panics
    /// If the count does not fit in a `u128` (above 3.4 · 10³⁸ bytes: only numbers far
    /// beyond any machine get there), rather than wrapping around to a wrong size.
    #[track_caller]
    pub fn bytes(&self, layers: usize, batch: usize, context: usize) -> u128 {
        times(batch, self.bytes_per_sequence(layers, context))
    }

    /// The same cache if every query head kept its own KV head (multi-head attention).
    pub fn mha_equivalent(&self) -> KvCacheFootprint {
        KvCacheFootprint {
            kv_heads: self.q_heads,
            ..*self
        }
    }

    /// How many times smaller than the multi-head cache this one is: `q_heads / kv_heads`, exact.
    pub fn reduction_vs_mha(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// `n · bytes`, or the documented panic of [`KvCacheFootprint::bytes`].
#[track_caller]
fn times(n: usize, bytes: u128) -> u128 {
    (n as u128)
        .checked_mul(bytes)
        .unwrap_or_else(|| panic!("KV-cache size overflows u128: {n} × {bytes} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gqa_cache_is_mha_cache_divided_by_the_group() {
        let gqa = KvCacheFootprint::new(32, 8, 128, DType::F16);
        let mha = gqa.mha_equivalent();
        let mqa = KvCacheFootprint::new(32, 1, 128, DType::F16);
        assert_eq!(mha.bytes_per_token_per_layer(), 16384);
        assert_eq!(gqa.bytes_per_token_per_layer(), 4096);
        assert_eq!(mqa.bytes_per_token_per_layer(), 512);
        // 32 layers · 8192 tokens · 4096 bytes = 1 GiB.
        assert_eq!(gqa.bytes_per_sequence(32, 8192), 1 << 30);
        assert_eq!(gqa.reduction_vs_mha(), 4);
        assert_eq!(mqa.reduction_vs_mha(), 32);
        for (layers, batch, context) in [(1, 1, 1), (32, 8, 8192), (80, 64, 131072)] {
            assert_eq!(
                mha.bytes(layers, batch, context),
                4 * gqa.bytes(layers, batch, context)
            );
            assert_eq!(
                mha.bytes(layers, batch, context),
                32 * mqa.bytes(layers, batch, context)
            );
        }
    }

    #[test]
    fn totals_do_not_overflow_at_extreme_sizes() {
        let big = KvCacheFootprint::new(256, 256, 256, DType::F64);
        assert_eq!(
            big.bytes(1 << 12, 1 << 16, 1 << 24),
            (2u128 * 256 * 256 * 8) << (12 + 16 + 24)
        );
    }

    #[test]
    #[should_panic(expected = "KV-cache size overflows u128")]
    fn a_size_beyond_u128_is_a_documented_panic_not_a_wrapped_number() {
        KvCacheFootprint::new(256, 256, 256, DType::F64).bytes(usize::MAX, usize::MAX, usize::MAX);
    }
}
