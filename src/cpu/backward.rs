//! The CPU backward: FlashAttention-2's tiling, group-aware and without atomics.
//!
//! - `δ = rowsum(dO ∘ O)` per query row, first (in f64, stored in f32).
//! - **dK, dV**: one task per (batch, KV head, key tile). It loops over the group's query heads
//!   and the query tiles that see the key tile, recomputes `P = exp(S − LSE)` from the forward's
//!   saved LSE, and accumulates `dV += Pᵀ·dO` and `dK += scale · dSᵀ·Q` in its own registers —
//!   the group's reduction stays inside the task, and each KV head's gradient is written once.
//! - **dQ**: one task per (batch, query head, query tile), looping over the key tiles it sees:
//!   `dQ += scale · dS·K`.
//!
//! Each product is a `gemm` call on a tile; tasks run in a fixed order inside, so results do not
//! depend on the thread count. Hidden pairs (the band, a mask mod, a fully masked row) get
//! `P = dS = 0` by selection (where the mods' classifier gives a row's keys as one interval,
//! its row keys, the mask folds into the row's band instead of being tested per score: the
//! same zeros), and a tile whose other operand holds a non-finite value is
//! multiplied term by term, skipping zero weights: as in the oracle, a value at a pair a row
//! cannot see never reaches its gradients.

use std::ops::Range;

use ndarray::{
    Array2, Array3, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis, s,
};
use rayon::prelude::*;

use multiversion::multiversion;

use super::prefill::{chunks, matmul};
use super::simd;
use crate::dsl::block::{BlockMask, Row, TileState};
use crate::dsl::{MaskMod, Mods, Position, ScoreMod};
use crate::spec::{AttentionSpec, ProblemShape};

/// Queries and keys per tile.
const BLOCK: usize = 64;
/// Key tiles per sweep of the fused backward (512 keys: their `dK`, `dV` fit in L2).
const KEY_SWEEP: usize = 8;
/// Stacked rows (queries × the group's heads) per tile of the fused backward, at most.
const TILE_ROWS: usize = 256;
/// From this many (batch, KV head) pairs on, one task per pair computes all three gradients
/// (five products per tile); below it, two passes share the work more finely (seven).
const FUSED_TASKS: usize = 8;

/// The backward's inputs, as f32 row-major views: the problem, the forward's output and LSE,
/// and the upstream gradients.
pub(super) struct Inputs<'a> {
    pub q: ArrayView4<'a, f32>,
    pub k: ArrayView4<'a, f32>,
    pub v: ArrayView4<'a, f32>,
    pub o: ArrayView4<'a, f32>,
    pub lse: ArrayView3<'a, f32>,
    pub d_o: ArrayView4<'a, f32>,
    pub d_lse: Option<ArrayView3<'a, f32>>,
}

/// What every task reads.
struct Context<'a, 'i, M, S> {
    spec: &'a AttentionSpec,
    mods: &'a Mods<M, S>,
    shape: ProblemShape,
    inputs: &'a Inputs<'i>,
    /// `rowsum(dO ∘ O)`, `[B, HQ, Lq]`.
    delta: Array3<f32>,
    blocks: Option<std::sync::Arc<BlockMask>>,
    /// Queries per tile (of each head): the block mask's query tiles.
    block_q: usize,
}

/// Per-task scratch: a tile's scores then probabilities, and its `dP` then `dS`.
struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    /// A row's score slopes `f′`.
    slopes: Vec<f32>,
    /// The tile's rows, `(query head, query)`.
    rows: Vec<(usize, usize)>,
}

impl Scratch {
    /// The last tile's `P` and `dS`, `nq × nk`.
    fn tile(&self, nq: usize, nk: usize) -> (ArrayView2<'_, f32>, ArrayView2<'_, f32>) {
        let p = ArrayView2::from_shape((nq, nk), &self.p[..nq * nk]).expect("nq × nk");
        let ds = ArrayView2::from_shape((nq, nk), &self.ds[..nq * nk]).expect("nq × nk");
        (p, ds)
    }

    fn new() -> Scratch {
        Scratch {
            p: vec![0.0; TILE_ROWS.max(BLOCK) * BLOCK],
            ds: vec![0.0; TILE_ROWS.max(BLOCK) * BLOCK],
            slopes: vec![0.0; BLOCK],
            rows: Vec::with_capacity(TILE_ROWS.max(BLOCK)),
        }
    }
}

/// The `[L, D]` matrices of `x: [B, H, L, D]` (row-major), batch-major: disjoint mutable views.
fn heads<'a>(x: ArrayViewMut4<'a, f32>) -> Vec<ArrayViewMut2<'a, f32>> {
    let [b, h, l, d] = [0, 1, 2, 3].map(|axis| x.len_of(Axis(axis)));
    if b * h == 0 {
        return Vec::new();
    }
    let flat = x
        .into_shape_with_order((b * h, l, d))
        .expect("gradients are row-major");
    let matrices = chunks(flat, Axis(0), 1).into_iter();
    matrices.map(|m| m.index_axis_move(Axis(0), 0)).collect()
}

/// Writes every element of `dq: [B, HQ, Lq, D]`, `dk`, `dv: [B, HKV, Lk, D]`.
pub(super) fn backward_into<M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    shape: ProblemShape,
    inputs: &Inputs<'_>,
    [mut dq, mut dk, mut dv]: [ArrayViewMut4<f32>; 3],
) {
    let delta = row_dots(&inputs.o, &inputs.d_o);
    let fuse = shape.batch * spec.kv_heads() >= FUSED_TASKS;
    let block_q = if fuse {
        (TILE_ROWS / spec.group_size()).clamp(1, BLOCK)
    } else {
        BLOCK
    };
    let blocks =
        (!M::TRIVIAL && mods.block_masks()).then(|| mods.block_mask(spec, shape, (block_q, BLOCK)));
    let ctx = Context {
        spec,
        mods,
        shape,
        inputs,
        delta,
        blocks,
        block_q,
    };
    if fuse {
        fused(&ctx, [dq, dk, dv]);
        return;
    }
    let group = spec.group_size();

    // dK and dV: one task per (batch, KV head, key tile).
    let mut items = Vec::new();
    let (kv_heads, seq_k) = (spec.kv_heads(), shape.seq_k);
    for (bg, (dk_h, dv_h)) in heads(dk.view_mut())
        .into_iter()
        .zip(heads(dv.view_mut()))
        .enumerate()
    {
        if seq_k == 0 {
            break;
        }
        let tiles = chunks(dk_h, Axis(0), BLOCK)
            .into_iter()
            .zip(chunks(dv_h, Axis(0), BLOCK));
        for (kt, (dk_t, dv_t)) in tiles.enumerate() {
            items.push((bg / kv_heads, bg % kv_heads, kt, dk_t, dv_t));
        }
    }
    items
        .into_par_iter()
        .for_each_init(Scratch::new, |scratch, (b, g, kt, mut dk_t, mut dv_t)| {
            let k0 = kt * BLOCK;
            let keys = k0..k0 + dk_t.nrows();
            dk_t.fill(0.0);
            dv_t.fill(0.0);
            let q_tiles = shape.seq_q.div_ceil(BLOCK);
            for hh in 0..group {
                let h = g * group + hh;
                for qt in 0..q_tiles {
                    let rows = qt * BLOCK..((qt + 1) * BLOCK).min(shape.seq_q);
                    let Some((q_t, d_o_t)) = ctx.head_tile(scratch, (b, h, qt, kt), &rows, &keys)
                    else {
                        continue;
                    };
                    let (p, ds) = scratch.tile(rows.len(), keys.len());
                    product(&mut dv_t, &p.t(), &d_o_t, 1.0, all_finite(&d_o_t));
                    product(&mut dk_t, &ds.t(), &q_t, spec.scale_f32(), all_finite(&q_t));
                }
            }
        });

    // dQ: one task per (batch, query head, query tile).
    let mut items = Vec::new();
    for (bh, dq_h) in heads(dq.view_mut()).into_iter().enumerate() {
        if shape.seq_q == 0 {
            break;
        }
        for (qt, dq_t) in chunks(dq_h, Axis(0), BLOCK).into_iter().enumerate() {
            items.push((bh / spec.q_heads(), bh % spec.q_heads(), qt, dq_t));
        }
    }
    items
        .into_par_iter()
        .for_each_init(Scratch::new, |scratch, (b, h, qt, mut dq_t)| {
            let rows = qt * BLOCK..qt * BLOCK + dq_t.nrows();
            dq_t.fill(0.0);
            let g = spec.kv_head_of(h);
            for kt in 0..shape.seq_k.div_ceil(BLOCK) {
                let keys = kt * BLOCK..((kt + 1) * BLOCK).min(shape.seq_k);
                if ctx
                    .head_tile(scratch, (b, h, qt, kt), &rows, &keys)
                    .is_none()
                {
                    continue;
                }
                let (_, ds) = scratch.tile(rows.len(), keys.len());
                let k_t = ctx.inputs.k.slice(s![b, g, keys.clone(), ..]);
                product(&mut dq_t, &ds, &k_t, spec.scale_f32(), all_finite(&k_t));
            }
        });
}

/// `δ = rowsum(dO ∘ O)` per query row, `[B, HQ, Lq]`: summed in f64 in channel order, stored
/// in f32; one task per (batch entry, query head).
fn row_dots(o: &ArrayView4<f32>, d_o: &ArrayView4<f32>) -> Array3<f32> {
    let [batch, heads, len, _] = [0, 1, 2, 3].map(|axis| o.len_of(Axis(axis)));
    let mut delta = vec![0.0f32; batch * heads * len];
    if len > 0 {
        delta
            .par_chunks_mut(len)
            .enumerate()
            .for_each(|(bh, rows)| {
                let (b, h) = (bh / heads, bh % heads);
                let (o, d_o) = (o.slice(s![b, h, .., ..]), d_o.slice(s![b, h, .., ..]));
                for ((d, o), d_o) in rows.iter_mut().zip(o.outer_iter()).zip(d_o.outer_iter()) {
                    *d = o
                        .iter()
                        .zip(d_o)
                        .map(|(&x, &y)| f64::from(x) * f64::from(y))
                        .sum::<f64>() as f32;
                }
            });
    }
    Array3::from_shape_vec((batch, heads, len), delta).expect("B × HQ × Lq")
}

impl<M: MaskMod, S: ScoreMod> Context<'_, '_, M, S> {
    /// The tile's state, or `None` when no pair of it is visible: no row's band meets its
    /// keys, or the block mask calls it empty.
    fn tile_state(
        &self,
        b: usize,
        g: usize,
        qt: usize,
        kt: usize,
        rows: &Range<usize>,
        keys: &Range<usize>,
    ) -> Option<TileState> {
        let ProblemShape { seq_q, seq_k, .. } = self.shape;
        let mask = self.spec.mask();
        let meets = rows.clone().any(|i| {
            let band = mask.visible_keys(i, seq_q, seq_k);
            band.start < keys.end && keys.start < band.end
        });
        if !meets {
            return None;
        }
        let state = match &self.blocks {
            Some(blocks) => blocks.state(b, g, qt, kt),
            None if M::TRIVIAL => TileState::Full,
            None => TileState::Partial,
        };
        (state != TileState::Empty).then_some(state)
    }

    /// One query head's tile `(b, h, qt, kt)` of rows `rows` and keys `keys` into the scratch
    /// ([`Self::terms`]): its `q` and `dO` rows, or `None` when no pair of it is live.
    fn head_tile(
        &self,
        scratch: &mut Scratch,
        (b, h, qt, kt): (usize, usize, usize, usize),
        rows: &Range<usize>,
        keys: &Range<usize>,
    ) -> Option<(ArrayView2<'_, f32>, ArrayView2<'_, f32>)> {
        let state = self.tile_state(b, self.spec.kv_head_of(h), qt, kt, rows, keys)?;
        let q_t = self.inputs.q.slice(s![b, h, rows.clone(), ..]);
        let d_o_t = self.inputs.d_o.slice(s![b, h, rows.clone(), ..]);
        let mut list = std::mem::take(&mut scratch.rows);
        list.clear();
        list.extend(rows.clone().map(|i| (h, i)));
        let live = self.terms(scratch, b, &list, (q_t, d_o_t), keys, state);
        scratch.rows = list;
        live.then_some((q_t, d_o_t))
    }

    /// Fills the scratch with a tile's `P` (`rows × keys`) and `dS · f′` (not yet times the
    /// scale), 0 at every hidden pair. The tile's rows are `rows` (`(query head, query)` each,
    /// in batch entry `b`), whose queries and upstream gradients are the rows of `q_t` and
    /// `d_o_t`. Returns whether any pair is live.
    fn terms(
        &self,
        scratch: &mut Scratch,
        b: usize,
        rows: &[(usize, usize)],
        (q_t, d_o_t): (ArrayView2<f32>, ArrayView2<f32>),
        keys: &Range<usize>,
        state: TileState,
    ) -> bool {
        let Inputs {
            k, v, lse, d_lse, ..
        } = self.inputs;
        let spec = self.spec;
        let ProblemShape { seq_q, seq_k, .. } = self.shape;
        let Some(&(h0, _)) = rows.first() else {
            return false;
        };
        let g = spec.kv_head_of(h0);
        let (nq, nk) = (rows.len(), keys.len());
        let k_t = k.slice(s![b, g, keys.clone(), ..]);
        let v_t = v.slice(s![b, g, keys.clone(), ..]);
        {
            let mut scores =
                ArrayViewMut2::from_shape((nq, nk), &mut scratch.p[..nq * nk]).expect("nq × nk");
            matmul(&mut scores, &q_t, &k_t.t(), spec.scale_f32(), false);
            let mut dp =
                ArrayViewMut2::from_shape((nq, nk), &mut scratch.ds[..nq * nk]).expect("nq × nk");
            matmul(&mut dp, &d_o_t, &v_t.t(), 1.0, false);
        }
        let user_mask = !M::TRIVIAL && state != TileState::Full;
        let heads = g * spec.group_size()..(g + 1) * spec.group_size();
        let mask = spec.mask();
        let cap = spec.softcap();
        // Slopes f′ per key, where a modifier makes them other than 1.
        let sloped = cap.is_some() || !S::TRIVIAL;
        let mut any = false;
        for (ii, &(h, i)) in rows.iter().enumerate() {
            let alibi = spec.alibi().map(|a| a.slope(h));
            let p_row = &mut scratch.p[ii * nk..][..nk];
            let ds_row = &mut scratch.ds[ii * nk..][..nk];
            let row_lse = lse[[b, h, i]];
            let mut band = mask.visible_keys(i, seq_q, seq_k);
            // Where the classifier knows the row's keys as one interval (its row keys), the
            // mask folds into the band: the same zeros, without a test per score.
            let mut row_mask = user_mask;
            if user_mask {
                let row = Row {
                    b,
                    heads: heads.clone(),
                    q: i,
                    seq_q,
                    seq_k,
                };
                if let Some(keys) = self.mods.row_keys(&row) {
                    band = band.start.max(keys.start)..band.end.min(keys.end);
                    row_mask = false;
                }
            }
            let lo = band.start.clamp(keys.start, keys.end) - keys.start;
            let hi = band.end.clamp(keys.start, keys.end) - keys.start;
            if !row_lse.is_finite() || lo >= hi {
                p_row.fill(0.0);
                ds_row.fill(0.0);
                continue;
            }
            p_row[..lo].fill(0.0);
            p_row[hi..].fill(0.0);
            ds_row[..lo].fill(0.0);
            ds_row[hi..].fill(0.0);
            let live = &mut p_row[lo..hi];
            let slopes = &mut scratch.slopes[..hi - lo];
            if let Some(cap) = cap {
                simd::softcap(live, cap);
                for (f, &s) in slopes.iter_mut().zip(live.iter()) {
                    let t = s / cap;
                    *f = 1.0 - t * t;
                }
            } else if sloped {
                slopes.fill(1.0);
            }
            if let Some(alibi) = alibi {
                let diag = mask.diagonal(i, seq_q, seq_k);
                for (jj, s) in live.iter_mut().enumerate() {
                    let j = keys.start + lo + jj;
                    *s -= alibi * (diag - j as i128).unsigned_abs() as f32;
                }
            }
            if row_mask || !S::TRIVIAL {
                for (jj, (s, f)) in live.iter_mut().zip(slopes.iter_mut()).enumerate() {
                    let at = Position {
                        b: b as i64,
                        h: h as i64,
                        q: i as i64,
                        k: (keys.start + lo + jj) as i64,
                        seq_q: seq_q as i64,
                        seq_k: seq_k as i64,
                    };
                    if row_mask && !self.mods.visible(at) {
                        *s = f32::NEG_INFINITY; // P = 0
                        *f = 0.0;
                        continue;
                    }
                    if !S::TRIVIAL {
                        *f *= self.mods.score().derivative(f64::from(*s), at) as f32;
                        *s = self.mods.score_at(*s, at);
                    }
                }
            }
            let shift = self.delta[[b, h, i]] - d_lse.as_ref().map_or(0.0, |d| d[[b, h, i]]);
            let slopes = sloped.then_some(&*slopes);
            any |= probabilities_and_ds(live, &mut ds_row[lo..hi], row_lse, shift, slopes);
        }
        any
    }
}

/// `p ← exp(s − lse)` (0 where `s = −∞`) and `ds ← p · (dp − shift) · f′` over one row's live
/// keys (`ds` holding `dP` on entry, `slopes` the `f′`, 1 when absent); `ds` is selected to 0
/// where `p` is 0, so that a hidden key's non-finite `dP` goes nowhere. Returns whether any
/// key is live.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn probabilities_and_ds(
    p: &mut [f32],
    ds: &mut [f32],
    lse: f32,
    shift: f32,
    slopes: Option<&[f32]>,
) -> bool {
    for v in p.iter_mut() {
        *v = simd::exp(*v - lse);
    }
    match slopes {
        Some(slopes) => {
            for ((d, &p), &f) in ds.iter_mut().zip(p.iter()).zip(slopes) {
                *d = if p == 0.0 { 0.0 } else { p * (*d - shift) * f };
            }
        }
        None => {
            for (d, &p) in ds.iter_mut().zip(p.iter()) {
                *d = if p == 0.0 { 0.0 } else { p * (*d - shift) };
            }
        }
    }
    !p.is_empty()
}

/// `dst += beta · lhs · rhs`: one `gemm` when `rhs` is finite (`finite`, which the caller
/// checked: [`all_finite`]); otherwise term by term, skipping the zero weights of `lhs`
/// (hidden pairs), so that a non-finite value a pair cannot see never reaches it (`0 · NaN`).
fn product(
    dst: &mut ArrayViewMut2<f32>,
    lhs: &ArrayView2<f32>,
    rhs: &ArrayView2<f32>,
    beta: f32,
    finite: bool,
) {
    if finite {
        matmul(dst, lhs, rhs, beta, true);
        return;
    }
    let mut row = Array2::<f32>::zeros((1, rhs.ncols()));
    for (r, weights) in lhs.outer_iter().enumerate() {
        row.fill(0.0);
        for (c, &w) in weights.iter().enumerate() {
            if w != 0.0 {
                row.row_mut(0)
                    .zip_mut_with(&rhs.row(c), |acc, &x| *acc += w * x);
            }
        }
        dst.row_mut(r)
            .zip_mut_with(&row.row(0), |d, &x| *d += beta * x);
    }
}

/// The backward with one task per (batch, KV head). The task stacks its group's query heads:
/// `q` and `dO` rows `(query i, head hh)` at `i · group + hh`, so that a tile of `block_q`
/// queries is `block_q · group` rows sharing one K/V tile in each product (the group's reuse of
/// K and V). For each key tile (in sweeps of [`KEY_SWEEP`] tiles, each query tile streaming
/// past once per sweep), over the query tiles that see it: `dV += Pᵀ·dO`, `dK += scale ·
/// dSᵀ·Q` and `dQ += scale · dS·K` into the task's own stacked `dQ` — five products per tile,
/// each gradient summed in a fixed order, no atomics. Chosen by the problem's shape alone
/// ([`FUSED_TASKS`]), never by the thread count, so results stay independent of it.
fn fused<M: MaskMod, S: ScoreMod>(
    ctx: &Context<'_, '_, M, S>,
    [dq, dk, dv]: [ArrayViewMut4<f32>; 3],
) {
    let Context {
        spec,
        shape,
        block_q,
        ..
    } = *ctx;
    let (group, dim) = (spec.group_size(), spec.head_dim());
    let (batch, kv_heads, seq_q) = (shape.batch, spec.kv_heads(), shape.seq_q);
    let dq_groups = dq
        .into_shape_with_order((batch * kv_heads, group, seq_q, dim))
        .expect("gradients are row-major");
    let dq_groups = chunks(dq_groups, Axis(0), 1)
        .into_iter()
        .map(|x| x.index_axis_move(Axis(0), 0));
    let items: Vec<_> = dq_groups
        .zip(heads(dk))
        .zip(heads(dv))
        .enumerate()
        .map(|(bg, ((dq_g, dk_h), dv_h))| (bg, dq_g, dk_h, dv_h))
        .collect();
    items.into_par_iter().for_each_init(
        Scratch::new,
        |scratch, (bg, mut dq_g, mut dk_h, mut dv_h)| {
            let (b, g) = (bg / kv_heads, bg % kv_heads);
            let heads = g * group..(g + 1) * group;
            // The group's rows, stacked query-major.
            let stack = |x: &ArrayView4<f32>| {
                let x = x.slice(s![b, heads.clone(), .., ..]);
                let x = x.permuted_axes([1, 0, 2]);
                x.as_standard_layout()
                    .into_owned()
                    .into_shape_with_order((seq_q * group, dim))
                    .expect("row-major")
            };
            let (q_s, d_o_s) = (stack(&ctx.inputs.q), stack(&ctx.inputs.d_o));
            let mut dq_s = Array2::<f32>::zeros((seq_q * group, dim));
            dk_h.fill(0.0);
            dv_h.fill(0.0);
            let mut list = Vec::with_capacity(block_q * group);
            let key_tiles = shape.seq_k.div_ceil(BLOCK);
            let query_tiles = seq_q.div_ceil(block_q);
            // Which tiles of the products' right-hand sides are finite, checked once each
            // (not once per product).
            let finite_tiles = |x: &Array2<f32>| -> Vec<bool> {
                (0..query_tiles)
                    .map(|qt| {
                        let stacked = qt * block_q * group..((qt + 1) * block_q).min(seq_q) * group;
                        all_finite(&x.slice(s![stacked, ..]))
                    })
                    .collect()
            };
            let (q_finite, d_o_finite) = (finite_tiles(&q_s), finite_tiles(&d_o_s));
            let k_finite: Vec<bool> = (0..key_tiles)
                .map(|kt| {
                    let keys = kt * BLOCK..((kt + 1) * BLOCK).min(shape.seq_k);
                    all_finite(&ctx.inputs.k.slice(s![b, g, keys, ..]))
                })
                .collect();
            // Key tiles in sweeps of KEY_SWEEP: their dK, dV stay in cache while the query
            // tiles stream past once per sweep (not once per key tile).
            for sweep in (0..key_tiles).step_by(KEY_SWEEP) {
                for qt in 0..query_tiles {
                    let queries = qt * block_q..((qt + 1) * block_q).min(seq_q);
                    let stacked = queries.start * group..queries.end * group;
                    let q_t = q_s.slice(s![stacked.clone(), ..]);
                    let d_o_t = d_o_s.slice(s![stacked.clone(), ..]);
                    list.clear();
                    list.extend(
                        queries
                            .clone()
                            .flat_map(|i| heads.clone().map(move |h| (h, i))),
                    );
                    let sweep_tiles = k_finite.iter().enumerate().skip(sweep).take(KEY_SWEEP);
                    for (kt, &k_finite) in sweep_tiles {
                        let keys = kt * BLOCK..((kt + 1) * BLOCK).min(shape.seq_k);
                        let Some(state) = ctx.tile_state(b, g, qt, kt, &queries, &keys) else {
                            continue;
                        };
                        if !ctx.terms(scratch, b, &list, (q_t, d_o_t), &keys, state) {
                            continue;
                        }
                        let (p, ds) = scratch.tile(stacked.len(), keys.len());
                        let k_t = ctx.inputs.k.slice(s![b, g, keys.clone(), ..]);
                        let mut dv_t = dv_h.slice_mut(s![keys.clone(), ..]);
                        product(&mut dv_t, &p.t(), &d_o_t, 1.0, d_o_finite[qt]);
                        let mut dk_t = dk_h.slice_mut(s![keys.clone(), ..]);
                        product(&mut dk_t, &ds.t(), &q_t, spec.scale_f32(), q_finite[qt]);
                        let mut dq_t = dq_s.slice_mut(s![stacked.clone(), ..]);
                        product(&mut dq_t, &ds, &k_t, spec.scale_f32(), k_finite);
                    }
                }
            }
            let dq_s = dq_s
                .into_shape_with_order((seq_q, group, dim))
                .expect("row-major");
            dq_g.assign(&dq_s.permuted_axes([1, 0, 2]));
        },
    );
}

/// Whether every element of `x` is finite: over the contiguous memory when there is one, in a
/// loop without early exit (so that it vectorises).
fn all_finite(x: &ArrayView2<f32>) -> bool {
    match x.as_slice_memory_order() {
        Some(data) => finite_slice(data),
        None => x.iter().all(|v| v.is_finite()),
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn finite_slice(data: &[f32]) -> bool {
    // |v| < ∞ is false for ±∞ and NaN; the lanes fold with `&` so the loop has no branch.
    data.chunks(256).all(|chunk| {
        chunk
            .iter()
            .fold(true, |ok, v| ok & (v.abs() < f32::INFINITY))
    })
}
