//! A KV cache's device copy, and decode against it.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use super::runtime::{self, Buffer};
use super::{
    CubeDevice, CubeElement, DecodeInputs, DeviceOutput, DeviceTensor, contiguous_strides,
};
use crate::cache::{KvCache, KvStorage, SeqId};
use crate::error::{Error, Result};
use crate::heads::{Rule, Supported};
use crate::oracle::check_cache_spec;
use crate::spec::AttentionSpec;

/// The most queries per sequence one decode call takes (speculative decoding's drafts).
pub const MAX_DECODE_QUERIES: usize = 16;

/// The device copy of a [`KvCache`]: the same word pool, kept in step with the host cache by
/// [`CubeDevice::try_sync_cache`] (which uploads only the tokens the copy has not seen).
///
/// Rows nothing was written to hold NaN (quantized storage: a NaN scale), so a read outside a
/// sequence's tokens shows up in results instead of passing for data.
pub struct DeviceKvCache<const HKV: usize, const D: usize, S: KvStorage>
where
    Rule: Supported<HKV, HKV, D>,
{
    k: runtime::Buffer,
    v: runtime::Buffer,
    k_scale: runtime::Buffer,
    v_scale: runtime::Buffer,
    cache_id: u64,
    device: Arc<()>,
    /// Tokens of each sequence already on the device.
    synced: BTreeMap<SeqId, usize>,
    storage: PhantomData<S>,
}

impl<const HKV: usize, const D: usize, S: KvStorage> std::fmt::Debug for DeviceKvCache<HKV, D, S>
where
    Rule: Supported<HKV, HKV, D>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKvCache")
            .field("storage", &S::KIND)
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

/// The NaN word of a storage: every lane a NaN (quantized storages have NaN scales instead).
fn nan_word(kind: crate::cache::StorageKind) -> u32 {
    use crate::cache::StorageKind::*;
    match kind {
        Float32 => 0x7fc0_0000,
        Float16 => 0x7e00_7e00,
        BFloat16 => 0x7fc0_7fc0,
        Int8 | Int4 => 0,
    }
}

impl CubeDevice {
    /// Allocates the device copy of `cache`'s pool and uploads every token it holds.
    pub fn try_upload_cache<const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        cache: &KvCache<HKV, D, S>,
    ) -> Result<DeviceKvCache<HKV, D, S>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        const OP: &str = "cube::upload_cache";
        let (k, v, k_scale, _) = cache.raw();
        let fill = vec![nan_word(S::KIND); k.len()];
        let scales = vec![f32::NAN.to_bits(); k_scale.len().max(1)];
        debug_assert_eq!(k.len(), v.len());
        let mut copy = DeviceKvCache {
            k: self.inner.upload(OP, &fill)?,
            v: self.inner.upload(OP, &fill)?,
            k_scale: self.inner.upload(OP, &scales)?,
            v_scale: self.inner.upload(OP, &scales)?,
            cache_id: cache.id(),
            device: self.inner.key().clone(),
            synced: BTreeMap::new(),
            storage: PhantomData,
        };
        self.try_sync_cache(&mut copy, cache)?;
        Ok(copy)
    }

    /// Brings the device copy up to date: uploads the tokens appended since the last sync and
    /// forgets dropped sequences. Errors: [`Error::CacheMismatch`] when the copy was made from
    /// another cache, [`Error::WrongDevice`].
    pub fn try_sync_cache<const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        copy: &mut DeviceKvCache<HKV, D, S>,
        cache: &KvCache<HKV, D, S>,
    ) -> Result<()>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        const OP: &str = "cube::sync_cache";
        self.check_owns(OP, &copy.device)?;
        if copy.cache_id != cache.id() {
            return Err(Error::CacheMismatch { op: OP });
        }
        let live = cache.sequences();
        let live_set: std::collections::BTreeSet<SeqId> = live.iter().copied().collect();
        copy.synced.retain(|seq, _| live_set.contains(seq));
        let mut rows = Vec::new();
        for &seq in &live {
            let len = cache.len(seq)?;
            let seen = copy.synced.get(&seq).copied().unwrap_or(0);
            if len > seen {
                rows.extend(cache.rows_of(OP, seq, seen..len)?);
            }
        }
        if !rows.is_empty() {
            let words = KvCache::<HKV, D, S>::ROW_WORDS;
            let (k, v, k_scale, v_scale) = cache.raw();
            let gather = |pool: &[u32], width: usize| -> Vec<u32> {
                rows.iter()
                    .flat_map(|&r| &pool[r as usize * width..][..width])
                    .copied()
                    .collect()
            };
            self.inner
                .scatter_rows(OP, &copy.k, &gather(k, words), &rows, words)?;
            self.inner
                .scatter_rows(OP, &copy.v, &gather(v, words), &rows, words)?;
            if S::KIND.is_quantized() {
                let bits = |x: &[f32]| x.iter().map(|s| s.to_bits()).collect::<Vec<u32>>();
                self.inner
                    .scatter_rows(OP, &copy.k_scale, &gather(&bits(k_scale), 1), &rows, 1)?;
                self.inner
                    .scatter_rows(OP, &copy.v_scale, &gather(&bits(v_scale), 1), &rows, 1)?;
            }
        }
        for seq in live {
            copy.synced.insert(seq, cache.len(seq)?);
        }
        Ok(())
    }

    /// Decode: `q: [sequences, q_heads, seq_q, head_dim]` (contiguous, `1 <= seq_q <= 16`)
    /// holds the newest queries of each sequence in `seqs`; row `b` attends to everything
    /// `seqs[b]` has cached, as `spec` defines it (masks aligned to the cache's end unless the
    /// spec says top-left). Syncs `copy` first. Long sequences are split over several cubes and
    /// merged (Flash-Decoding); the split count follows the longest sequence and the device.
    ///
    /// Errors: [`Error::ConfigMismatch`] (spec vs cache), [`Error::Shape`],
    /// [`Error::UnknownSequence`], [`Error::UnsupportedDType`], [`Error::DeviceLimit`],
    /// [`Error::CacheMismatch`], [`Error::WrongDevice`].
    pub fn try_decode<T: CubeElement, const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        spec: &AttentionSpec,
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
    ) -> Result<DeviceOutput<T>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let decoded = self.decode_keys(
            "cube::decode",
            spec,
            q,
            cache,
            copy,
            seqs,
            0..usize::MAX,
            false,
        )?;
        Ok(self.decoded(decoded, false))
    }

    /// [`CubeDevice::try_decode`] over the cached keys at positions in `keys` only, as an f32
    /// partial state for a later merge: the output normalised over those keys, `[B, HQ, Lq,
    /// D]`, and per row the pair (max score, Σ exp(score − max)), `[B, HQ, Lq, 2]`. The typed
    /// front end is [`crate::Attention::try_decode_partial`]. Inverted ranges are
    /// [`Error::Partial`].
    pub(crate) fn try_decode_partial<
        T: CubeElement,
        const HKV: usize,
        const D: usize,
        S: KvStorage,
    >(
        &self,
        spec: &AttentionSpec,
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
        keys: std::ops::Range<usize>,
    ) -> Result<DeviceOutput<f32>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let decoded = self.decode_keys(
            "cube::decode_partial",
            spec,
            q,
            cache,
            copy,
            seqs,
            keys,
            true,
        )?;
        Ok(self.decoded(decoded, true))
    }

    /// The decode launch behind both: `T` output, or f32 partial when `partial`.
    #[allow(clippy::too_many_arguments)]
    fn decode_keys<T: CubeElement, const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        op: &'static str,
        spec: &AttentionSpec,
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
        keys: std::ops::Range<usize>,
        partial: bool,
    ) -> Result<(Buffer, Buffer, [usize; 4])>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        if keys.start > keys.end {
            return Err(Error::Partial {
                op,
                reason: format!("{}..{} is not a key range", keys.start, keys.end),
            });
        }
        check_cache_spec(spec, HKV, D)?;
        self.check_owns(op, &q.device)?;
        let expected = || {
            format!(
                "[{}, {}, 1..={MAX_DECODE_QUERIES}, {D}], contiguous",
                seqs.len(),
                spec.q_heads()
            )
        };
        let shape = q.shape();
        if shape.len() != 4
            || shape[0] != seqs.len()
            || shape[1] != spec.q_heads()
            || shape[2] > MAX_DECODE_QUERIES
            || shape[3] != D
            || (q.strides() != contiguous_strides(shape).as_slice() && !shape.contains(&0))
            || q.offset != 0
        {
            return Err(Error::Shape {
                op,
                tensor: "q",
                got: shape.to_vec(),
                expected: expected(),
            });
        }
        if !self.supports(T::DTYPE) {
            return Err(Error::UnsupportedDType {
                op,
                dtype: T::DTYPE,
                device: self.name().to_string(),
            });
        }
        self.try_sync_cache(copy, cache)?;
        let mut lens = Vec::with_capacity(seqs.len());
        let mut tables = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            lens.push(cache.len(seq)? as u32);
            tables.push(cache.pages(seq)?.to_vec());
        }
        let stride = tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut table = vec![0u32; stride * seqs.len().max(1)];
        for (b, pages) in tables.iter().enumerate() {
            table[b * stride..][..pages.len()].copy_from_slice(pages);
        }
        let seq_q = shape[2];
        let (o, lse) = self.inner.decode::<T>(
            op,
            spec,
            DecodeInputs {
                q: &q.buffer,
                k: &copy.k,
                v: &copy.v,
                k_scale: &copy.k_scale,
                v_scale: &copy.v_scale,
                table: &table,
                table_stride: stride,
                lens: &lens,
                seq_q,
                page_size: cache.layout().page_size(),
                storage: S::KIND,
                keys,
                partial,
            },
        )?;
        Ok((o, lse, [seqs.len(), spec.q_heads(), seq_q, D]))
    }

    /// The output and LSE buffers of `decode_keys` as tensors of `shape` (`[B, HQ, Lq, D]`);
    /// `pairs`: the LSE buffer holds two numbers per row.
    fn decoded<T: CubeElement>(
        &self,
        (o, lse, shape): (Buffer, Buffer, [usize; 4]),
        pairs: bool,
    ) -> DeviceOutput<T> {
        let key = self.inner.key().clone();
        let mut lse_shape = shape[..3].to_vec();
        if pairs {
            lse_shape.push(2);
        }
        DeviceOutput {
            o: DeviceTensor::contiguous(o, key.clone(), shape.to_vec()),
            lse: DeviceTensor::contiguous(lse, key, lse_shape),
        }
    }
}
