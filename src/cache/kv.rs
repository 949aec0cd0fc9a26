//! The typed KV cache: storage, layout and the token data.

use std::marker::PhantomData;

use ndarray::{Array3, ArrayView3, Axis};

use super::pages::{Layout, PageTable, SeqId};
use super::storage::{KvStorage, StorageKind};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::heads::{Rule, Supported};

/// A KV cache for attention with `HKV` KV heads of dimension `D`, storing rows as `S`
/// ([`Float32`](super::Float32), [`Float16`](super::Float16), [`BFloat16`](super::BFloat16),
/// [`Int8`](super::Int8), [`Int4`](super::Int4)).
///
/// Only an attention with the same `HKV` and `D` can read it — a mismatch does not compile.
/// The pool is laid out page by page, then KV head, then token slot: the rows of one KV head
/// within a page are adjacent, which is how a decode kernel reads them. Keys and values are
/// quantized when appended ([`KvCache::try_append`]); [`KvCache::read`] dequantizes (for tests
/// and inspection — decoding reads the stored rows directly).
///
/// # Examples
/// ```
/// use gqa::cache::{Int8, KvCache, Layout};
/// use ndarray::Array3;
/// // Pages of 16 tokens, 64 pages, for 8 KV heads of dimension 128.
/// let mut cache = KvCache::<8, 128, Int8>::try_new(Layout::Paged { page_size: 16, pages: 64 })?;
/// let seq = cache.try_add_sequence()?;
/// let prompt = Array3::<f32>::from_elem((8, 20, 128), 0.5); // [kv_heads, tokens, head_dim]
/// cache.try_append(seq, prompt.view(), prompt.view())?;
/// assert_eq!(cache.len(seq)?, 20);
/// assert_eq!(cache.free_pages(), 62); // 20 tokens take 2 pages of 16
/// // Exact memory: 64 pages · 16 tokens · 8 heads · (128 + 4) bytes, for K and for V.
/// assert_eq!(cache.bytes(), 2 * 64 * 16 * 8 * 132);
/// # Ok::<(), gqa::Error>(())
/// ```
#[derive(Debug)]
pub struct KvCache<const HKV: usize, const D: usize, S: KvStorage>
where
    Rule: Supported<HKV, HKV, D>,
{
    table: PageTable,
    /// Unique per cache (clones included): device copies record which cache they mirror.
    id: u64,
    k: Vec<u32>,
    v: Vec<u32>,
    k_scale: Vec<f32>,
    v_scale: Vec<f32>,
    storage: PhantomData<S>,
}

impl<const HKV: usize, const D: usize, S: KvStorage> KvCache<HKV, D, S>
where
    Rule: Supported<HKV, HKV, D>,
{
    /// Words of one row.
    pub const ROW_WORDS: usize = S::KIND.words_per_row(D);

    /// A cache with its whole pool allocated (zeroed). Errors: [`Error::CacheLayout`] for a
    /// page size or page count of 0, more than 2^32 token slots, or a pool the allocator
    /// cannot provide (never an abort).
    pub fn try_new(layout: Layout) -> Result<Self> {
        const OP: &str = "KvCache::try_new";
        let table = PageTable::try_new(OP, layout)?;
        let rows = layout.pages() * layout.page_size() * HKV;
        let scales = if S::KIND.is_quantized() { rows } else { 0 };
        let words = rows
            .checked_mul(Self::ROW_WORDS)
            .ok_or_else(|| Error::CacheLayout {
                op: OP,
                reason: format!("{layout:?}: the pool's size overflows"),
            })?;
        Ok(KvCache {
            table,
            id: next_cache_id(),
            k: zeroed(OP, words)?,
            v: zeroed(OP, words)?,
            k_scale: zeroed(OP, scales)?,
            v_scale: zeroed(OP, scales)?,
            storage: PhantomData,
        })
    }

    /// [`KvCache::try_new`], panicking on a bad layout.
    #[track_caller]
    pub fn new(layout: Layout) -> Self {
        Self::try_new(layout).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn layout(&self) -> Layout {
        self.table.layout()
    }

    pub fn storage(&self) -> StorageKind {
        S::KIND
    }

    /// Exact bytes of the pool: keys, values and their scales, for every page (used or not).
    pub fn bytes(&self) -> usize {
        4 * (self.k.len() + self.v.len() + self.k_scale.len() + self.v_scale.len())
    }

    /// Pages not owned by any sequence (sequence slots, for a contiguous cache).
    pub fn free_pages(&self) -> usize {
        self.table.free_pages()
    }

    /// The live sequences, oldest first.
    pub fn sequences(&self) -> Vec<SeqId> {
        self.table.ids().collect()
    }

    /// Starts an empty sequence. Errors: [`Error::CacheFull`] when a contiguous cache has no
    /// free sequence slot (a paged cache takes pages only as tokens arrive).
    pub fn try_add_sequence(&mut self) -> Result<SeqId> {
        self.table.add("KvCache::add_sequence")
    }

    /// Tokens a sequence holds. Errors: [`Error::UnknownSequence`].
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        self.table.len("KvCache::len", seq)
    }

    /// Whether a sequence holds no token. Errors: [`Error::UnknownSequence`].
    pub fn is_empty(&self, seq: SeqId) -> Result<bool> {
        Ok(self.len(seq)? == 0)
    }

    /// Appends tokens to one sequence: `k`, `v: [HKV, tokens, D]` (a prefill chunk, or one
    /// token). See [`KvCache::try_append_batch`].
    pub fn try_append<T: Element>(
        &mut self,
        seq: SeqId,
        k: ArrayView3<T>,
        v: ArrayView3<T>,
    ) -> Result<()> {
        self.try_append_batch(&[(seq, k, v)])
    }

    /// Appends to several sequences at once, each its own number of tokens. Everything is
    /// checked first — shapes, values the storage can hold, that every sequence exists and that
    /// the pool has room for all of it — and on any error nothing is appended.
    ///
    /// Values: float storage keeps NaN and ±∞ as they are (a NaN appended is a NaN read back),
    /// but a *finite* value it would turn into ±∞ (above 65504 for f16, beyond `f32` for every
    /// storage) is [`Error::Unrepresentable`]; quantized storage cannot scale a row holding NaN
    /// or ±∞ ([`Error::NonFinite`]).
    ///
    /// Errors: [`Error::Shape`], [`Error::NonFinite`], [`Error::Unrepresentable`],
    /// [`Error::UnknownSequence`], [`Error::CacheFull`].
    pub fn try_append_batch<T: Element>(
        &mut self,
        items: &[(SeqId, ArrayView3<T>, ArrayView3<T>)],
    ) -> Result<()> {
        const OP: &str = "KvCache::append";
        let mut requests = Vec::with_capacity(items.len());
        for (seq, k, v) in items {
            for (name, x) in [("k", k), ("v", v)] {
                if x.shape()[0] != HKV || x.shape()[2] != D || x.shape()[1] != k.shape()[1] {
                    return Err(Error::Shape {
                        op: OP,
                        tensor: name,
                        got: x.shape().to_vec(),
                        expected: format!("[{HKV}, tokens, {D}] (k and v alike)"),
                    });
                }
                for e in x.iter() {
                    let value = e.widen();
                    if !value.is_finite() {
                        if S::KIND.is_quantized() {
                            return Err(Error::NonFinite {
                                op: OP,
                                tensor: name,
                            });
                        }
                    } else if !S::KIND.represents(value) {
                        return Err(Error::Unrepresentable {
                            op: OP,
                            tensor: name,
                            value,
                            storage: S::KIND.name(),
                        });
                    }
                }
            }
            requests.push((*seq, k.shape()[1]));
        }
        let slots = self.table.grow(OP, &requests)?;
        let page_size = self.table.page_size();
        let mut row = vec![0.0f32; D];
        for ((_, k, v), slots) in items.iter().zip(slots) {
            for (t, &slot) in slots.iter().enumerate() {
                for h in 0..HKV {
                    let at = row_index::<HKV>(slot as usize, h, page_size);
                    for (x, words, scales) in [
                        (k, &mut self.k, &mut self.k_scale),
                        (v, &mut self.v, &mut self.v_scale),
                    ] {
                        for (dst, src) in row
                            .iter_mut()
                            .zip(x.index_axis(Axis(0), h).index_axis(Axis(0), t))
                        {
                            *dst = src.widen() as f32;
                        }
                        let scale = S::KIND.encode_row(
                            &row,
                            &mut words[at * Self::ROW_WORDS..][..Self::ROW_WORDS],
                        );
                        if S::KIND.is_quantized() {
                            scales[at] = scale;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The stored keys and values of a sequence, dequantized to `f32`: `[HKV, len, D]` each.
    /// Errors: [`Error::UnknownSequence`].
    pub fn read(&self, seq: SeqId) -> Result<(Array3<f32>, Array3<f32>)> {
        let (k, v) = self.read_exact(seq)?;
        Ok((k.mapv(|x| x as f32), v.mapv(|x| x as f32)))
    }

    /// The stored keys and values of a sequence exactly, in `f64` (a quantized lane times its
    /// scale is exact there; [`KvCache::read`] rounds that product to `f32`): `[HKV, len, D]`.
    /// Errors: [`Error::UnknownSequence`].
    pub fn read_exact(&self, seq: SeqId) -> Result<(Array3<f64>, Array3<f64>)> {
        const OP: &str = "KvCache::read";
        let len = self.table.len(OP, seq)?;
        let page_size = self.table.page_size();
        let mut k = Array3::zeros((HKV, len, D));
        let mut v = Array3::zeros((HKV, len, D));
        for t in 0..len {
            let slot = self.table.slot(OP, seq, t)? as usize;
            for h in 0..HKV {
                let at = row_index::<HKV>(slot, h, page_size);
                for (out, words, scales) in [
                    (&mut k, &self.k, &self.k_scale),
                    (&mut v, &self.v, &self.v_scale),
                ] {
                    // Quantized pools hold one scale per row (a missing one would be a bug
                    // of this type, and panics); float rows have none and are not scaled.
                    let scale = if S::KIND.is_quantized() {
                        scales[at]
                    } else {
                        1.0
                    };
                    let mut row = out.index_axis_mut(Axis(0), h);
                    let mut row = row.index_axis_mut(Axis(0), t);
                    S::KIND.decode_row_exact(
                        &words[at * Self::ROW_WORDS..][..Self::ROW_WORDS],
                        scale,
                        row.as_slice_mut().expect("a fresh array is contiguous"),
                    );
                }
            }
        }
        Ok((k, v))
    }

    /// Drops a sequence; its pages return to the pool (their contents are overwritten by later
    /// appends). Errors: [`Error::UnknownSequence`].
    pub fn try_drop_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.table.remove("KvCache::drop_sequence", seq)
    }

    /// The block table of a sequence: its pages in token order.
    pub fn pages(&self, seq: SeqId) -> Result<&[u32]> {
        self.table.pages_of("KvCache::pages", seq)
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Pool rows of tokens `tokens` of a sequence, token-major then KV head.
    pub(crate) fn rows_of(
        &self,
        op: &'static str,
        seq: SeqId,
        tokens: std::ops::Range<usize>,
    ) -> Result<Vec<u32>> {
        let page_size = self.table.page_size();
        let mut rows = Vec::with_capacity(tokens.len() * HKV);
        for t in tokens {
            let slot = self.table.slot(op, seq, t)? as usize;
            rows.extend((0..HKV).map(|h| row_index::<HKV>(slot, h, page_size) as u32));
        }
        Ok(rows)
    }

    /// The raw pool, for executors: key words, value words, key scales, value scales (empty
    /// for float storage). Row `(page · HKV + head) · page_size + slot` starts at word
    /// `row · ROW_WORDS`.
    pub fn raw(&self) -> (&[u32], &[u32], &[f32], &[f32]) {
        (&self.k, &self.v, &self.k_scale, &self.v_scale)
    }

    /// Whether two caches hold the same thing, bit for bit: the same sequences with the same
    /// lengths and pages, the same free pages in the same order, the same next sequence id, and
    /// the same pool words and scales (scales compared as bits, so a NaN equals itself). Their
    /// identities — which device copies mirror them — are not compared. This is what "a refused
    /// call changes nothing" means:
    ///
    /// ```
    /// use gqa::cache::{Float16, KvCache, Layout};
    /// use ndarray::Array3;
    ///
    /// let mut cache = KvCache::<2, 8, Float16>::try_new(Layout::Paged { page_size: 4, pages: 2 })?;
    /// let seq = cache.try_add_sequence()?;
    /// let before = cache.clone();
    /// let too_big = Array3::from_elem((2, 1, 8), 1e5_f32); // beyond f16's 65504
    /// assert!(cache.try_append(seq, too_big.view(), too_big.view()).is_err());
    /// assert!(cache.same_contents(&before));
    /// # Ok::<(), gqa::Error>(())
    /// ```
    pub fn same_contents(&self, other: &Self) -> bool {
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        self.table == other.table
            && self.k == other.k
            && self.v == other.v
            && bits(&self.k_scale) == bits(&other.k_scale)
            && bits(&self.v_scale) == bits(&other.v_scale)
    }
}

/// `len` zeros, allocated as `vec![0; len]` would be (zeroed pages, touched only when used), but
/// with a refusal from the allocator as an error instead of an abort.
fn zeroed<T: bytemuck::Zeroable>(op: &'static str, len: usize) -> Result<Vec<T>> {
    let refuse = |what: String| Error::CacheLayout {
        op,
        reason: format!("cannot allocate the pool: {what}"),
    };
    if len == 0 || size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len)
        .map_err(|_| refuse(format!("{len} elements overflow the address space")))?;
    // SAFETY: `layout` has a non-zero size (len > 0, T not zero-sized). The pointer, if not
    // null, comes from the global allocator with exactly the layout `Vec<T>` uses for a
    // capacity of `len`, and all-zero bytes are a valid `T` (`Zeroable`), so the vector owns
    // `len` initialised elements and frees them with the same layout.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<T>();
        if ptr.is_null() {
            return Err(refuse(format!("{} bytes", layout.size())));
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}

fn next_cache_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl<const HKV: usize, const D: usize, S: KvStorage> Clone for KvCache<HKV, D, S>
where
    Rule: Supported<HKV, HKV, D>,
{
    /// An independent copy (a new identity: device copies of the original do not mirror it).
    fn clone(&self) -> Self {
        KvCache {
            table: self.table.clone(),
            id: next_cache_id(),
            k: self.k.clone(),
            v: self.v.clone(),
            k_scale: self.k_scale.clone(),
            v_scale: self.v_scale.clone(),
            storage: PhantomData,
        }
    }
}

/// The pool row of token slot `slot` (= page · page_size + offset) and KV head `h`.
pub(crate) fn row_index<const HKV: usize>(slot: usize, h: usize, page_size: usize) -> usize {
    let (page, offset) = (slot / page_size, slot % page_size);
    (page * HKV + h) * page_size + offset
}
