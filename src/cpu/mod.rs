//! The CPU backend: prefill and decode on the host, fast (the [oracle](crate::oracle) is
//! deliberately slow).
//!
//! - **Prefill** ([`Cpu::try_forward`]): FlashAttention's blocked online softmax. A tile stacks
//!   the query heads of one KV group (`group × block_q` rows), so each K/V block is read once
//!   per group; its scores `Q·Kᵀ` and its update `P·V` are matrix products by the `gemm` crate
//!   (cache-blocked, SIMD chosen at run time); key blocks outside every row's mask are
//!   skipped and blocks inside every row's mask skip the mask. Scratch is per worker; nothing is
//!   allocated inside the key loop. Packed variable-length sequences
//!   ([`Cpu::try_forward_varlen`]) run the same tiles, each sequence's starting at its first
//!   query and reading only its keys.
//! - **Decode** ([`Cpu::try_decode`]): a few queries per sequence against a
//!   [`KvCache`] of any storage. The cached keys are split across threads (Flash-Decoding);
//!   each split streams its rows once for all query heads of the group (quantized rows are
//!   dequantized into a row buffer, f32 rows are read in place), keeps the state (max score,
//!   sum of exponentials, output) and the splits are merged in `f64`.
//! - **Backward** ([`Cpu::try_backward_with`], module `backward`): FlashAttention-2's tiles
//!   from the forward's saved LSE, group-aware and without atomics — with enough (batch, KV
//!   head) pairs one task per pair stacks its group's query heads so that each K/V tile serves
//!   the group in one product, and owns its group's `dQ`; below that, a pass per key tile for
//!   `dK`, `dV` and one per query tile for `dQ`. Deterministic whatever the thread count.
//! - **Threads**: rayon, over batch × KV heads × query blocks (prefill) or splits (decode);
//!   [`Cpu::new`] uses rayon's global pool (`RAYON_NUM_THREADS`), [`Cpu::with_threads`] a pool
//!   of its own.
//!
//! Compute is `f32` for every storage type; `f16`/`bf16` inputs are widened to `f32` once
//! before the computation (a copy of the inputs), and `f32` inputs that are not row-major are
//! copied to row-major: any strides are accepted, and the result is the same bit for bit. Results are proven against the oracle by the
//! same property suites and tolerance rule as the GPU kernels (`tests/cpu.rs`).
//!
//! **Non-finite values** follow the oracle, which never reads a masked key: a NaN or ±∞ at a
//! key a row cannot see leaves that row unchanged, bit for bit. Masked scores are replaced
//! (selected), never multiplied by 0; and where a block of keys is seen by some rows of a tile
//! and hidden from others, a non-finite value among its hidden values sends the block through
//! a row-by-row product over each row's own visible keys, so that `0 · NaN` never reaches a
//! row (`prefill::Tile::accumulate_values`, `decode`'s value pass). What a row that *sees* a
//! non-finite value gets is not specified (usually NaN). The weights are summed unnormalised
//! (`Σ e^{s−max}·v`, divided once at the end), so values within a factor of a row's key count of
//! `f32::MAX` may overflow to ±∞.

mod backward;
mod decode;
mod prefill;
mod simd;
mod tiles;

/// Rows' running softmax state (prefill's per tile, decode's per split): unnormalised
/// outputs (`rows × D`), maxima, and sums of `exp(s − m)` in f64.
struct RowState<'a> {
    acc: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f64],
}

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};
use ndarray::{
    Array3, Array4, ArrayView3, ArrayView4, ArrayViewMut3, ArrayViewMut4, CowArray, Ix4,
};

use crate::backend::{Backend, Backward, HostGradients, HostOutput};
use crate::cache::{KvCache, KvStorage, SeqId};
use crate::dsl::{MaskMod, Mods, Position, ScoreMod};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::heads::{Rule, Supported};
use crate::oracle::check_cache_spec;
use crate::spec::{AttentionSpec, Varlen};

/// The element types the CPU backend takes and returns (computing in `f32`).
pub trait CpuElement: Element {
    /// The tensor as `f32` in standard (row-major) layout: borrowed for a row-major `f32`
    /// view, copied otherwise — so that results do not depend on the inputs' strides (gemm
    /// sums in another order for other layouts) and zero or negative strides never reach it.
    fn as_f32(x: ArrayView4<'_, Self>) -> CowArray<'_, f32, Ix4>;

    /// An f32 result in this type: moved as it is for `f32` (no copy of the output), rounded
    /// once per element otherwise.
    fn from_f32(x: Array4<f32>) -> Array4<Self>;
}

impl CpuElement for f32 {
    fn as_f32(x: ArrayView4<'_, f32>) -> CowArray<'_, f32, Ix4> {
        if x.is_standard_layout() {
            CowArray::from(x)
        } else {
            CowArray::from(x.as_standard_layout().into_owned())
        }
    }

    fn from_f32(x: Array4<f32>) -> Array4<f32> {
        x
    }
}

impl CpuElement for f16 {
    fn as_f32(x: ArrayView4<'_, f16>) -> CowArray<'_, f32, Ix4> {
        standard(x.mapv(f16::to_f32))
    }

    fn from_f32(x: Array4<f32>) -> Array4<f16> {
        x.mapv(f16::from_f32)
    }
}

impl CpuElement for bf16 {
    fn as_f32(x: ArrayView4<'_, bf16>) -> CowArray<'_, f32, Ix4> {
        standard(x.mapv(bf16::to_f32))
    }

    fn from_f32(x: Array4<f32>) -> Array4<bf16> {
        x.mapv(bf16::from_f32)
    }
}

/// `x` in row-major layout (`mapv` keeps a contiguous input's memory order, reversed axes
/// included).
fn standard(x: Array4<f32>) -> CowArray<'static, f32, Ix4> {
    if x.is_standard_layout() {
        CowArray::from(x)
    } else {
        CowArray::from(x.as_standard_layout().into_owned())
    }
}

/// The CPU executor: which threads run the work. Cheap to clone.
#[derive(Clone, Default)]
pub struct Cpu {
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu")
            .field("threads", &self.threads())
            .finish()
    }
}

impl Cpu {
    /// Runs on rayon's global pool (its size follows `RAYON_NUM_THREADS`, else the cores).
    pub fn new() -> Cpu {
        Cpu { pool: None }
    }

    /// Runs on a pool of its own of `threads` threads. Errors: [`Error::DeviceLimit`] when the
    /// pool cannot be built (0 threads, or the OS refuses).
    pub fn with_threads(threads: usize) -> Result<Cpu> {
        let fail = |reason: String| Error::DeviceLimit {
            op: "Cpu::with_threads",
            reason,
        };
        if threads == 0 {
            return Err(fail("a pool needs at least one thread".into()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(Cpu {
            pool: Some(Arc::new(pool)),
        })
    }

    /// The number of threads work is divided over.
    pub fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// Attention of `q: [batch, q_heads, seq_q, head_dim]` over `k`, `v: [batch, kv_heads,
    /// seq_k, head_dim]` as `spec` defines it, any strides. Errors: [`Error::Shape`].
    ///
    /// ```
    /// use gqa::{Gqa, cpu::Cpu};
    /// use ndarray::Array4;
    /// let attention = Gqa::<4, 2, 8>::new().causal();
    /// let q = Array4::<f32>::ones((1, 4, 3, 8));
    /// let kv = Array4::<f32>::ones((1, 2, 5, 8));
    /// let out = attention.try_forward(&Cpu::new(), q.view(), kv.view(), kv.view())?;
    /// assert!((out.o[[0, 3, 2, 7]] - 1.0).abs() < 1e-6);
    /// # Ok::<(), gqa::Error>(())
    /// ```
    pub fn try_forward<T: CpuElement>(
        &self,
        spec: &AttentionSpec,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        self.try_forward_with(spec, &Mods::none(), q, k, v)
    }

    /// The tiles `(queries, keys)` in which a forward of `spec` with `seq_q` queries classifies
    /// a user mask ([`crate::dsl::block`]): a tile's queries of every head of a KV group, and
    /// the key blocks of the tile loop.
    pub fn block_mask_tiles(&self, spec: &AttentionSpec, seq_q: usize) -> (usize, usize) {
        prefill::block_mask_tiles(spec.group_size(), seq_q)
    }

    /// [`Cpu::try_forward`] with user mods ([`crate::dsl`]), monomorphised per mod type: the
    /// mask and score mod run inside the tile loop, per score; with a block mask
    /// ([`crate::dsl::block`], on by default) empty key blocks are skipped and full ones run
    /// without the mask.
    pub fn try_forward_with<T: CpuElement, M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        let shape = spec.check_shapes("cpu::forward", q.shape(), k.shape(), v.shape())?;
        let (q, k, v) = (T::as_f32(q), T::as_f32(k), T::as_f32(v));
        let mut o =
            Array4::<f32>::zeros((shape.batch, spec.q_heads(), shape.seq_q, spec.head_dim()));
        let mut lse = Array3::<f32>::zeros((shape.batch, spec.q_heads(), shape.seq_q));
        let inputs = (q.view(), k.view(), v.view());
        self.install(|| {
            prefill::forward_into(spec, mods, shape, inputs, o.view_mut(), lse.view_mut())
        });
        Ok(HostOutput {
            o: T::from_f32(o),
            lse,
        })
    }

    /// The gradients of attention ([`crate::oracle::try_backward`] defines them) given the
    /// forward's output `forward` for the same problem, spec and mods, and the upstream
    /// gradients `d_o` (the shape of `q`) and optionally `d_lse` (`[batch, q_heads, seq_q]`).
    /// The forward's `LSE` is reused; `P` is recomputed per tile (module docs of
    /// `cpu::backward`: tasks per key tile for `dK`, `dV` — the group's sum inside the task —
    /// and per query tile for `dQ`; deterministic, whatever the thread count).
    /// Errors: [`Error::Shape`], naming the tensor.
    ///
    /// ```
    /// use gqa::{Gqa, cpu::Cpu};
    /// use ndarray::Array4;
    /// let attention = Gqa::<4, 2, 8>::new().causal();
    /// let q = Array4::<f32>::from_shape_fn((1, 4, 3, 8), |(_, h, i, d)| (h + i + d) as f32 / 9.0);
    /// let kv = Array4::<f32>::from_shape_fn((1, 2, 5, 8), |(_, g, j, d)| (g * j + d) as f32 / 7.0);
    /// let cpu = Cpu::new();
    /// let out = attention.try_forward(&cpu, q.view(), kv.view(), kv.view())?;
    /// let d_o = Array4::<f32>::ones((1, 4, 3, 8));
    /// let grads = attention.try_backward(&cpu, q.view(), kv.view(), kv.view(), &out, d_o.view())?;
    /// assert_eq!(grads.dk.shape(), &[1, 2, 5, 8]); // one gradient per KV head
    /// # Ok::<(), gqa::Error>(())
    /// ```
    pub fn try_backward_with<T: CpuElement, M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        [q, k, v]: [ArrayView4<T>; 3],
        forward: &HostOutput<T>,
        d_o: ArrayView4<T>,
        d_lse: Option<ArrayView3<f32>>,
    ) -> Result<HostGradients<T>> {
        const OP: &str = "cpu::backward";
        let shape = spec.check_backward_shapes(
            OP,
            [q.shape(), k.shape(), v.shape()],
            forward.o.shape(),
            forward.lse.shape(),
            d_o.shape(),
            d_lse.as_ref().map(|d| d.shape()),
        )?;
        let (q, k, v) = (T::as_f32(q), T::as_f32(k), T::as_f32(v));
        let (o, d_o) = (T::as_f32(forward.o.view()), T::as_f32(d_o));
        let inputs = backward::Inputs {
            q: q.view(),
            k: k.view(),
            v: v.view(),
            o: o.view(),
            lse: forward.lse.view(),
            d_o: d_o.view(),
            d_lse,
        };
        let mut dq = Array4::<f32>::zeros(q.raw_dim());
        let mut dk = Array4::<f32>::zeros(k.raw_dim());
        let mut dv = Array4::<f32>::zeros(v.raw_dim());
        let grads = [dq.view_mut(), dk.view_mut(), dv.view_mut()];
        self.install(|| backward::backward_into(spec, mods, shape, &inputs, grads));
        Ok(HostGradients {
            dq: T::from_f32(dq),
            dk: T::from_f32(dk),
            dv: T::from_f32(dv),
        })
    }

    /// Attention of variable-length sequences packed along one axis ([`Varlen`], as
    /// [`crate::oracle::try_forward_varlen`] defines it): `q: [1, q_heads, total_q, head_dim]`,
    /// `k`, `v: [1, kv_heads, total_k, head_dim]`, any strides; outputs `[1, q_heads, total_q,
    /// ..]`. Each sequence's tiles start at its first query and read only its keys: no
    /// padding, and no work on pairs across sequences. Errors: [`Error::Shape`].
    pub fn try_forward_varlen<T: CpuElement>(
        &self,
        spec: &AttentionSpec,
        packing: &Varlen,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        const OP: &str = "cpu::forward_varlen";
        let shape = spec.check_shapes(OP, q.shape(), k.shape(), v.shape())?;
        packing.check_packed(OP, shape)?;
        let (q, k, v) = (T::as_f32(q), T::as_f32(k), T::as_f32(v));
        let mut o = Array4::<f32>::zeros((1, spec.q_heads(), shape.seq_q, spec.head_dim()));
        let mut lse = Array3::<f32>::zeros((1, spec.q_heads(), shape.seq_q));
        let inputs = (q.view(), k.view(), v.view());
        self.install(|| {
            prefill::forward_varlen_into(spec, packing, inputs, o.view_mut(), lse.view_mut())
        });
        Ok(HostOutput {
            o: T::from_f32(o),
            lse,
        })
    }

    /// [`Cpu::try_forward`] in f32 into outputs the caller owns — `o: [batch, q_heads, seq_q,
    /// head_dim]`, `lse: [batch, q_heads, seq_q]`, any strides; every element is written —
    /// so that a loop (a benchmark, a layer stack) allocates nothing per call but the workers'
    /// scratch. Errors: [`Error::Shape`].
    pub fn try_forward_into(
        &self,
        spec: &AttentionSpec,
        (q, k, v): (ArrayView4<f32>, ArrayView4<f32>, ArrayView4<f32>),
        o: ArrayViewMut4<f32>,
        lse: ArrayViewMut3<f32>,
    ) -> Result<()> {
        const OP: &str = "cpu::forward_into";
        let shape = spec.check_shapes(OP, q.shape(), k.shape(), v.shape())?;
        let rows = [shape.batch, spec.q_heads(), shape.seq_q];
        let o_rows = [rows[0], rows[1], rows[2], spec.head_dim()];
        for (tensor, got, expected) in [
            ("o", o.shape(), o_rows.as_slice()),
            ("lse", lse.shape(), rows.as_slice()),
        ] {
            if got != expected {
                return Err(Error::Shape {
                    op: OP,
                    tensor,
                    got: got.to_vec(),
                    expected: format!("{expected:?}"),
                });
            }
        }
        let (q, k, v) = (f32::as_f32(q), f32::as_f32(k), f32::as_f32(v));
        let inputs = (q.view(), k.view(), v.view());
        self.install(|| prefill::forward_into(spec, &Mods::none(), shape, inputs, o, lse));
        Ok(())
    }

    /// Decode against a KV cache: `q: [sequences, q_heads, seq_q, head_dim]` holds the newest
    /// `seq_q` queries of each sequence in `seqs`; row `b` attends to everything `seqs[b]` has
    /// cached, as `spec` defines it (as [`crate::oracle::try_decode`]). Any storage; any
    /// `seq_q` (the split strategy is made for few). Errors: [`Error::ConfigMismatch`] (spec
    /// vs cache), [`Error::Shape`], [`Error::UnknownSequence`].
    pub fn try_decode<T: CpuElement, const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        spec: &AttentionSpec,
        q: ArrayView4<T>,
        cache: &KvCache<HKV, D, S>,
        seqs: &[SeqId],
    ) -> Result<HostOutput<T>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        self.try_decode_with(spec, &Mods::none(), q, cache, seqs)
    }

    /// [`Cpu::try_decode`] with user mods ([`crate::dsl`]), positions as
    /// [`crate::oracle::try_decode_with`] defines them.
    pub fn try_decode_with<
        T: CpuElement,
        M: MaskMod,
        Sc: ScoreMod,
        const HKV: usize,
        const D: usize,
        S: KvStorage,
    >(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, Sc>,
        q: ArrayView4<T>,
        cache: &KvCache<HKV, D, S>,
        seqs: &[SeqId],
    ) -> Result<HostOutput<T>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let user = UserMods(mods);
        let user: Option<&dyn RowMods> = if mods.is_trivial() { None } else { Some(&user) };
        let state =
            self.decode_state("cpu::decode", (spec, user), q, cache, seqs, 0..usize::MAX)?;
        Ok(HostOutput {
            o: T::from_f32(state.o),
            lse: state.lse.mapv(|x| x as f32),
        })
    }

    /// [`Cpu::try_decode`] over the keys at positions in `keys` only: the output normalised
    /// over them and their LSE in `f64`, for [`crate::partial::Partial`].
    pub(crate) fn decode_keys<T: CpuElement, const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        spec: &AttentionSpec,
        q: ArrayView4<T>,
        cache: &KvCache<HKV, D, S>,
        seqs: &[SeqId],
        keys: Range<usize>,
    ) -> Result<(Array4<f32>, Array3<f64>)>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let state = self.decode_state("cpu::decode_partial", (spec, None), q, cache, seqs, keys)?;
        Ok((state.o, state.lse))
    }

    fn decode_state<T: CpuElement, const HKV: usize, const D: usize, S: KvStorage>(
        &self,
        op: &'static str,
        (spec, mods): (&AttentionSpec, Option<&dyn RowMods>),
        q: ArrayView4<T>,
        cache: &KvCache<HKV, D, S>,
        seqs: &[SeqId],
        keys: Range<usize>,
    ) -> Result<decode::Merged>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        check_cache_spec(spec, HKV, D)?;
        let shape = q.shape();
        if shape[0] != seqs.len() || shape[1] != spec.q_heads() || shape[3] != D {
            return Err(Error::Shape {
                op,
                tensor: "q",
                got: shape.to_vec(),
                expected: format!("[{}, {}, seq_q, {D}]", seqs.len(), spec.q_heads()),
            });
        }
        let mut sequences = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            sequences.push(decode::Sequence {
                len: cache.len(seq)?,
                pages: Cow::Borrowed(cache.pages(seq)?),
            });
        }
        let (k, v, k_scale, v_scale) = cache.raw();
        let pool = decode::Pool {
            storage: S::KIND,
            kv_heads: HKV,
            head_dim: D,
            page_size: cache.layout().page_size(),
            k,
            v,
            k_scale,
            v_scale,
        };
        let q = T::as_f32(q);
        let threads = self.threads();
        Ok(self.install(|| decode::decode(spec, mods, q.view(), &pool, &sequences, keys, threads)))
    }
}

/// A score row's place, for the user mods: batch entry, query head, query index, and the
/// problem's lengths.
#[derive(Clone, Copy)]
pub(super) struct RowAt {
    pub b: usize,
    pub h: usize,
    pub i: usize,
    pub seq_q: usize,
    pub seq_k: usize,
}

impl RowAt {
    fn at(self, j: usize) -> Position {
        Position {
            b: self.b as i64,
            h: self.h as i64,
            q: self.i as i64,
            k: j as i64,
            seq_q: self.seq_q as i64,
            seq_k: self.seq_k as i64,
        }
    }
}

/// The user mods ([`crate::dsl`]) as the tile loops (prefill and decode) apply them: once per
/// row and key block through one dynamic call, per score through the mods' monomorphised code.
pub(super) trait RowMods: Sync {
    /// Applies the score mod, then with `mask` the mask (−∞ where it hides), to the scores
    /// of row `row` against keys `j0 ..`.
    fn apply(&self, row: RowAt, j0: usize, scores: &mut [f32], mask: bool);
    /// Whether the mask mod lets row `row` see key `j`.
    fn visible(&self, row: RowAt, j: usize) -> bool;
    /// Whether the mask mod may hide anything.
    fn masks(&self) -> bool;
    /// The keys the mask lets query `row.i` see, for every query head of `heads`, when known
    /// as one interval without evaluating it ([`Mods::row_keys`]).
    fn row_keys(&self, row: RowAt, heads: std::ops::Range<usize>)
    -> Option<std::ops::Range<usize>>;
}

/// [`RowMods`] of a pair of mods.
pub(super) struct UserMods<'a, M, S>(pub &'a Mods<M, S>);

impl<M: MaskMod, S: ScoreMod> RowMods for UserMods<'_, M, S> {
    fn apply(&self, row: RowAt, j0: usize, scores: &mut [f32], mask: bool) {
        for (jj, s) in scores.iter_mut().enumerate() {
            let at = row.at(j0 + jj);
            if !S::TRIVIAL {
                *s = self.0.score().apply(*s, at);
            }
            if mask && !M::TRIVIAL && !self.0.mask().visible(at) {
                *s = f32::NEG_INFINITY;
            }
        }
    }

    fn visible(&self, row: RowAt, j: usize) -> bool {
        self.0.visible(row.at(j))
    }

    fn masks(&self) -> bool {
        !M::TRIVIAL
    }

    fn row_keys(
        &self,
        row: RowAt,
        heads: std::ops::Range<usize>,
    ) -> Option<std::ops::Range<usize>> {
        self.0.row_keys(&crate::dsl::block::Row {
            b: row.b,
            heads,
            q: row.i,
            seq_q: row.seq_q,
            seq_k: row.seq_k,
        })
    }
}

impl<T: CpuElement> Backend<T> for Cpu {
    fn try_forward(
        &self,
        spec: &AttentionSpec,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        Cpu::try_forward(self, spec, q, k, v)
    }

    fn try_forward_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        Cpu::try_forward_with(self, spec, mods, q, k, v)
    }

    fn try_forward_varlen(
        &self,
        spec: &AttentionSpec,
        packing: &Varlen,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        Cpu::try_forward_varlen(self, spec, packing, q, k, v)
    }
}

impl<T: CpuElement> Backward<T> for Cpu {
    fn try_backward_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        inputs: [ArrayView4<T>; 3],
        forward: &HostOutput<T>,
        d_o: ArrayView4<T>,
        d_lse: Option<ArrayView3<f32>>,
    ) -> Result<HostGradients<T>> {
        Cpu::try_backward_with(self, spec, mods, inputs, forward, d_o, d_lse)
    }
}
