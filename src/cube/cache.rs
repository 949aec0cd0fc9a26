//! A KV cache's device copy, and decode against it.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use super::runtime::{self, Buffer};
use super::{
    CubeDevice, CubeElement, DecodeInputs, DeviceOutput, DeviceTensor, contiguous_strides,
};
use crate::cache::{KvCache, KvStorage, SeqId};
use crate::dsl::{MaskMod, Mods, ScoreMod};
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
    /// The sequences' lengths and block tables on the device.
    tables: BlockTables,
    storage: PhantomData<S>,
}

impl<const HKV: usize, const D: usize, S: KvStorage> DeviceKvCache<HKV, D, S>
where
    Rule: Supported<HKV, HKV, D>,
{
    /// A launch over this (synced) copy's sequences `seqs`, whose slots are `slots`, reading
    /// queries `q`: `(seq_q, keys, partial)` as [`DecodeInputs`] has them.
    fn inputs<'a>(
        &'a self,
        cache: &KvCache<HKV, D, S>,
        q: &'a Buffer,
        slots: &'a Buffer,
        seqs: &[SeqId],
        (seq_q, keys, partial): (usize, std::ops::Range<usize>, bool),
        (aux, mask_mod, score_mod): (&'a Buffer, bool, bool),
    ) -> Result<DecodeInputs<'a>> {
        let mut max_len = 0;
        for &seq in seqs {
            max_len = max_len.max(cache.len(seq)?);
        }
        Ok(DecodeInputs {
            q,
            k: &self.k,
            v: &self.v,
            k_scale: &self.k_scale,
            v_scale: &self.v_scale,
            tables: self.tables.buffer.as_ref().expect("made by the sync"),
            table_base: self.tables.slots,
            table_stride: self.tables.width,
            slots,
            batch: seqs.len(),
            max_len,
            seq_q,
            head_dim: D,
            page_size: cache.layout().page_size(),
            storage: S::KIND,
            keys,
            partial,
            aux,
            mask_mod,
            score_mod,
        })
    }
}

/// The device copy of a cache's sequence lengths and block tables, kept in step like its rows:
/// a sync writes only the lengths that changed and the pages added since the last one.
///
/// One buffer of `slots + slots · width` words: each live sequence has a slot, its length at
/// word `slot` and its pages from word `slots + slot · width`. A sequence that outgrows `width`
/// pages, or more live sequences than `slots`, makes a new buffer of twice the size, written
/// whole (amortised: a doubling per growth by half). A decode names its sequences by slot
/// (`batch`, re-uploaded only when the list of sequences changes).
struct BlockTables {
    buffer: Option<Buffer>,
    slots: usize,
    width: usize,
    slot_of: BTreeMap<SeqId, usize>,
    /// Per sequence: (length, pages) as last written.
    written: BTreeMap<SeqId, (usize, usize)>,
    /// The sequences of the last decode and their slots on the device.
    batch: Option<(Vec<SeqId>, Buffer)>,
}

impl BlockTables {
    fn new() -> BlockTables {
        BlockTables {
            buffer: None,
            slots: 0,
            width: 0,
            slot_of: BTreeMap::new(),
            written: BTreeMap::new(),
            batch: None,
        }
    }

    /// Brings lengths and tables up to `cache`'s live sequences.
    fn sync<const HKV: usize, const D: usize, S: KvStorage>(
        &mut self,
        device: &runtime::Device,
        op: &'static str,
        cache: &KvCache<HKV, D, S>,
        live: &[SeqId],
    ) -> Result<()>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let live_set: std::collections::BTreeSet<SeqId> = live.iter().copied().collect();
        self.slot_of.retain(|seq, _| live_set.contains(seq));
        self.written.retain(|seq, _| live_set.contains(seq));
        let mut taken: Vec<bool> = vec![false; self.slots.max(live.len())];
        for &slot in self.slot_of.values() {
            taken[slot] = true;
        }
        let mut free = (0..taken.len()).filter(|&s| !taken[s]);
        for &seq in live {
            self.slot_of
                .entry(seq)
                .or_insert_with(|| free.next().expect("as many slots as live sequences"));
        }
        let needed_slots = self.slot_of.values().map(|s| s + 1).max().unwrap_or(0);
        let mut needed_width = 0;
        for &seq in live {
            needed_width = needed_width.max(cache.pages(seq)?.len());
        }
        if self.buffer.is_none() || needed_slots > self.slots || needed_width > self.width {
            // Grow (or make) the buffer: twice what is needed, written whole.
            self.slots = needed_slots.max(self.slots).max(1).next_power_of_two();
            self.width = needed_width.max(self.width).max(1).next_power_of_two();
            let mut words = vec![0u32; self.slots + self.slots * self.width];
            self.written.clear();
            for &seq in live {
                let slot = self.slot_of[&seq];
                let (len, pages) = (cache.len(seq)?, cache.pages(seq)?);
                words[slot] = len as u32;
                words[self.slots + slot * self.width..][..pages.len()].copy_from_slice(pages);
                self.written.insert(seq, (len, pages.len()));
            }
            self.buffer = Some(device.upload(op, &words)?);
            self.batch = None;
            return Ok(());
        }
        let (mut at, mut values) = (Vec::new(), Vec::new());
        for &seq in live {
            let slot = self.slot_of[&seq];
            let (len, pages) = (cache.len(seq)?, cache.pages(seq)?);
            let (old_len, old_pages) = self.written.get(&seq).copied().unwrap_or((usize::MAX, 0));
            if len != old_len {
                at.push(slot as u32);
                values.push(len as u32);
            }
            for (n, &page) in pages.iter().enumerate().skip(old_pages) {
                at.push((self.slots + slot * self.width + n) as u32);
                values.push(page);
            }
            self.written.insert(seq, (len, pages.len()));
        }
        let buffer = self.buffer.as_ref().expect("made above");
        device.scatter_rows(op, buffer, &values, &at, 1)
    }

    /// The slots of `seqs` on the device (uploaded when the list changed since the last call).
    fn batch(
        &mut self,
        device: &runtime::Device,
        op: &'static str,
        seqs: &[SeqId],
    ) -> Result<Buffer> {
        if let Some((last, buffer)) = &self.batch
            && last.as_slice() == seqs
        {
            return Ok(buffer.clone());
        }
        let slots: Vec<u32> = seqs.iter().map(|seq| self.slot_of[seq] as u32).collect();
        let buffer = device.upload(op, &slots)?;
        self.batch = Some((seqs.to_vec(), buffer.clone()));
        Ok(buffer)
    }
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
            tables: BlockTables::new(),
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
        for &seq in &live {
            copy.synced.insert(seq, cache.len(seq)?);
        }
        copy.tables.sync(&self.inner, OP, cache, &live)
    }

    /// Decode: `q: [sequences, q_heads, seq_q, head_dim]` (contiguous, `1 <= seq_q <= 16`)
    /// holds the newest queries of each sequence in `seqs`; row `b` attends to everything
    /// `seqs[b]` has cached, as `spec` defines it (masks aligned to the cache's end unless the
    /// spec says top-left). Syncs `copy` first. Long sequences are split over several cubes and
    /// merged (Flash-Decoding); the split count follows the longest sequence and the device.
    /// Allocates its outputs: a serving loop reuses them with [`CubeDevice::try_decode_into`].
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
        self.try_decode_with(spec, &Mods::none(), q, cache, copy, seqs)
    }

    /// [`CubeDevice::try_decode`] with user mods ([`crate::dsl`]): positions are those of the
    /// step — `at.q` the query's index among its `seq_q` newest queries, `at.k` the cache
    /// position, `at.seq_k` the cached length, `at.b` the index in `seqs` — so a mod written
    /// with the bottom-right diagonal `at.q + at.seq_k − at.seq_q` sees cache positions.
    pub fn try_decode_with<
        T: CubeElement,
        M: MaskMod,
        Sc: ScoreMod,
        const HKV: usize,
        const D: usize,
        S: KvStorage,
    >(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, Sc>,
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
    ) -> Result<DeviceOutput<T>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let seq_q = q.shape().get(2).copied().unwrap_or(0);
        let mut out = self.try_forward_output(spec, seqs.len(), seq_q)?;
        self.try_decode_into_with(spec, mods, q, cache, copy, seqs, &mut out)?;
        Ok(out)
    }

    /// [`CubeDevice::try_decode`] writing into `out`: the contiguous `o: [sequences, q_heads,
    /// seq_q, head_dim]` and `lse: [sequences, q_heads, seq_q]` made by
    /// [`CubeDevice::try_forward_output`]`(spec, seqs.len(), seq_q)`, or returned by an earlier
    /// decode of the same shape. The sync uploads only what changed (new rows, lengths, pages);
    /// launch constants are reused, and the list of sequences is uploaded only when it changes,
    /// so a steady-state step uploads the new token's rows and lengths and allocates nothing
    /// except the f32 partials of a split launch, which come from cubecl's memory pool.
    ///
    /// Errors: as [`CubeDevice::try_decode`], and [`Error::Shape`] when `out` is not this
    /// decode's contiguous `o` and `lse`.
    pub fn try_decode_into<T: CubeElement, const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        spec: &AttentionSpec,
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
        out: &mut DeviceOutput<T>,
    ) -> Result<()>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        self.try_decode_into_with(spec, &Mods::none(), q, cache, copy, seqs, out)
    }

    /// [`CubeDevice::try_decode_into`] with user mods (positions as
    /// [`CubeDevice::try_decode_with`] says).
    #[allow(clippy::too_many_arguments)]
    pub fn try_decode_into_with<
        T: CubeElement,
        M: MaskMod,
        Sc: ScoreMod,
        const HKV: usize,
        const D: usize,
        S: KvStorage,
    >(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, Sc>,
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
        out: &mut DeviceOutput<T>,
    ) -> Result<()>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        const OP: &str = "cube::decode";
        let seq_q = self.check_decode(OP, spec, q, seqs, HKV, D)?;
        self.check_output(
            OP,
            out,
            [seqs.len(), spec.q_heads(), seq_q],
            spec.head_dim(),
        )?;
        self.decode_keys(
            OP,
            (spec, mods),
            q,
            cache,
            copy,
            seqs,
            0..usize::MAX,
            (&out.o, &out.lse),
            false,
        )
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
        const OP: &str = "cube::decode_partial";
        if keys.start > keys.end {
            return Err(Error::Partial {
                op: OP,
                reason: format!("{}..{} is not a key range", keys.start, keys.end),
            });
        }
        let seq_q = self.check_decode(OP, spec, q, seqs, HKV, D)?;
        let shape = [seqs.len(), spec.q_heads(), seq_q, D];
        let rows = shape[..3].iter().product::<usize>();
        let key = self.inner.key().clone();
        let out = DeviceOutput {
            o: DeviceTensor::contiguous(
                self.inner.empty(OP, rows * D, size_of::<f32>())?,
                key.clone(),
                shape.to_vec(),
            ),
            lse: DeviceTensor::contiguous(
                self.inner.empty(OP, rows * 2, size_of::<f32>())?,
                key,
                vec![shape[0], shape[1], shape[2], 2],
            ),
        };
        self.decode_keys(
            OP,
            (spec, &Mods::none()),
            q,
            cache,
            copy,
            seqs,
            keys,
            (&out.o, &out.lse),
            true,
        )?;
        Ok(out)
    }

    /// Reads every cached word (and scale) of the sequences `seqs` once, and nothing else: the
    /// memory traffic of a decode step over them without its arithmetic, which `benches/decode`
    /// measures decode against. Syncs `copy` first; returns the bytes read.
    ///
    /// Errors: [`Error::UnknownSequence`], [`Error::DeviceLimit`], [`Error::CacheMismatch`],
    /// [`Error::WrongDevice`].
    pub fn try_stream_cache<const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
    ) -> Result<usize>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        const OP: &str = "cube::stream_cache";
        self.check_owns(OP, &copy.device)?;
        self.try_sync_cache(copy, cache)?;
        let mut tokens = 0;
        for &seq in seqs {
            tokens += cache.len(seq)?;
        }
        let slots = copy.tables.batch(&self.inner, OP, seqs)?;
        let aux = self.inner.constant(OP, &[0])?;
        let input = copy.inputs(
            cache,
            &copy.k,
            &slots,
            seqs,
            (0, 0..usize::MAX, false),
            (&aux, false, false),
        )?;
        self.inner.stream(OP, HKV, input)?;
        Ok(2 * tokens * HKV * S::KIND.bytes_per_row(D))
    }

    /// Checks a decode's spec (against the cache's `kv_heads`, `head_dim`), `q` and element
    /// type; returns `seq_q`.
    fn check_decode<T: CubeElement>(
        &self,
        op: &'static str,
        spec: &AttentionSpec,
        q: &DeviceTensor<T>,
        seqs: &[SeqId],
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<usize> {
        check_cache_spec(spec, kv_heads, head_dim)?;
        self.check_owns(op, &q.device)?;
        let shape = q.shape();
        if shape.len() != 4
            || shape[0] != seqs.len()
            || shape[1] != spec.q_heads()
            || shape[2] > MAX_DECODE_QUERIES
            || shape[3] != head_dim
            || (q.strides() != contiguous_strides(shape).as_slice() && !shape.contains(&0))
            || q.offset != 0
        {
            return Err(Error::Shape {
                op,
                tensor: "q",
                got: shape.to_vec(),
                expected: format!(
                    "[{}, {}, 1..={MAX_DECODE_QUERIES}, {head_dim}], contiguous",
                    seqs.len(),
                    spec.q_heads()
                ),
            });
        }
        if !self.supports(T::DTYPE) {
            return Err(Error::UnsupportedDType {
                op,
                dtype: T::DTYPE,
                device: self.name().to_string(),
            });
        }
        Ok(shape[2])
    }

    /// The decode launch behind all three, into `o` and `lse`: the `T` output, or with
    /// `partial` the f32 partial state (`U` = f32, `lse` holding a pair per row).
    #[allow(clippy::too_many_arguments)]
    fn decode_keys<
        T: CubeElement,
        U: CubeElement,
        M: MaskMod,
        Sc: ScoreMod,
        const HKV: usize,
        const D: usize,
        S: KvStorage,
    >(
        &self,
        op: &'static str,
        (spec, mods): (&AttentionSpec, &Mods<M, Sc>),
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
        keys: std::ops::Range<usize>,
        (o, lse): (&DeviceTensor<U>, &DeviceTensor<f32>),
        partial: bool,
    ) -> Result<()>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        self.check_owns(op, &copy.device)?;
        self.try_sync_cache(copy, cache)?;
        let slots = copy.tables.batch(&self.inner, op, seqs)?;
        let aux = self.inner.constant(op, &mods.captured_words())?;
        let input = copy.inputs(
            cache,
            &q.buffer,
            &slots,
            seqs,
            (q.shape()[2], keys, partial),
            (&aux, !M::TRIVIAL, !Sc::TRIVIAL),
        )?;
        self.inner
            .decode::<T, M, Sc>(op, spec, input, (&o.buffer, &lse.buffer))
    }
}
