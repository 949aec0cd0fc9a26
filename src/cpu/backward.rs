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
//! `P = dS = 0` by selection, and a tile whose other operand holds a non-finite value is
//! multiplied term by term, skipping zero weights: as in the oracle, a value at a pair a row
//! cannot see never reaches its gradients.

use std::ops::Range;

use ndarray::{
    Array2, Array3, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis, s,
};
use rayon::prelude::*;

use super::prefill::{chunks, matmul};
use crate::dsl::block::{BlockMask, TileState};
use crate::dsl::{MaskMod, Mods, Position, ScoreMod};
use crate::spec::{AttentionSpec, ProblemShape};

/// Queries and keys per tile.
const BLOCK: usize = 64;

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
}

/// Per-task scratch: a tile's scores then probabilities, and its `dP` then `dS`.
struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            p: vec![0.0; BLOCK * BLOCK],
            ds: vec![0.0; BLOCK * BLOCK],
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
    let mut delta = Array3::<f32>::zeros(inputs.lse.raw_dim());
    delta.indexed_iter_mut().for_each(|((b, h, i), d)| {
        let (o, d_o) = (
            inputs.o.slice(s![b, h, i, ..]),
            inputs.d_o.slice(s![b, h, i, ..]),
        );
        *d = o
            .iter()
            .zip(d_o)
            .map(|(&x, &y)| f64::from(x) * f64::from(y))
            .sum::<f64>() as f32;
    });
    let blocks =
        (!M::TRIVIAL && mods.block_masks()).then(|| mods.block_mask(spec, shape, (BLOCK, BLOCK)));
    let ctx = Context {
        spec,
        mods,
        shape,
        inputs,
        delta,
        blocks,
    };
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
                    let Some(state) = ctx.tile_state(b, g, qt, kt, &rows, &keys) else {
                        continue;
                    };
                    if !ctx.terms(scratch, (b, h), &rows, &keys, state) {
                        continue;
                    }
                    let (nq, nk) = (rows.len(), keys.len());
                    let p =
                        ArrayView2::from_shape((nq, nk), &scratch.p[..nq * nk]).expect("nq × nk");
                    let ds =
                        ArrayView2::from_shape((nq, nk), &scratch.ds[..nq * nk]).expect("nq × nk");
                    let q_t = ctx.inputs.q.slice(s![b, h, rows.clone(), ..]);
                    let d_o_t = ctx.inputs.d_o.slice(s![b, h, rows.clone(), ..]);
                    product(&mut dv_t, &p.t(), &d_o_t, 1.0);
                    product(&mut dk_t, &ds.t(), &q_t, spec.scale_f32());
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
                let Some(state) = ctx.tile_state(b, g, qt, kt, &rows, &keys) else {
                    continue;
                };
                if !ctx.terms(scratch, (b, h), &rows, &keys, state) {
                    continue;
                }
                let (nq, nk) = (rows.len(), keys.len());
                let ds = ArrayView2::from_shape((nq, nk), &scratch.ds[..nq * nk]).expect("nq × nk");
                let k_t = ctx.inputs.k.slice(s![b, g, keys.clone(), ..]);
                product(&mut dq_t, &ds, &k_t, spec.scale_f32());
            }
        });
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

    /// Fills the scratch with the tile's `P` (`rows × keys`) and `dS · f′` (not yet times the
    /// scale), 0 at every hidden pair. Returns whether any pair is visible.
    fn terms(
        &self,
        scratch: &mut Scratch,
        (b, h): (usize, usize),
        rows: &Range<usize>,
        keys: &Range<usize>,
        state: TileState,
    ) -> bool {
        let Inputs {
            q,
            k,
            v,
            lse,
            d_o,
            d_lse,
            ..
        } = self.inputs;
        let spec = self.spec;
        let ProblemShape { seq_q, seq_k, .. } = self.shape;
        let g = spec.kv_head_of(h);
        let (nq, nk) = (rows.len(), keys.len());
        let q_t = q.slice(s![b, h, rows.clone(), ..]);
        let k_t = k.slice(s![b, g, keys.clone(), ..]);
        let v_t = v.slice(s![b, g, keys.clone(), ..]);
        let d_o_t = d_o.slice(s![b, h, rows.clone(), ..]);
        {
            let mut scores =
                ArrayViewMut2::from_shape((nq, nk), &mut scratch.p[..nq * nk]).expect("nq × nk");
            matmul(&mut scores, &q_t, &k_t.t(), spec.scale_f32(), false);
            let mut dp =
                ArrayViewMut2::from_shape((nq, nk), &mut scratch.ds[..nq * nk]).expect("nq × nk");
            matmul(&mut dp, &d_o_t, &v_t.t(), 1.0, false);
        }
        let user_mask = !M::TRIVIAL && state != TileState::Full;
        let mask = spec.mask();
        let mut any = false;
        for (ii, i) in rows.clone().enumerate() {
            let p_row = &mut scratch.p[ii * nk..][..nk];
            let ds_row = &mut scratch.ds[ii * nk..][..nk];
            let row_lse = lse[[b, h, i]];
            let band = mask.visible_keys(i, seq_q, seq_k);
            if row_lse == f32::NEG_INFINITY || !row_lse.is_finite() {
                p_row.fill(0.0);
                ds_row.fill(0.0);
                continue;
            }
            let delta = self.delta[[b, h, i]];
            let g_lse = d_lse.as_ref().map_or(0.0, |d| d[[b, h, i]]);
            let diag = mask.diagonal(i, seq_q, seq_k);
            let slope_h = spec.alibi().map(|a| a.slope(h));
            for (jj, j) in keys.clone().enumerate() {
                let at = Position {
                    b: b as i64,
                    h: h as i64,
                    q: i as i64,
                    k: j as i64,
                    seq_q: seq_q as i64,
                    seq_k: seq_k as i64,
                };
                if !band.contains(&j) || (user_mask && !self.mods.visible(at)) {
                    p_row[jj] = 0.0;
                    ds_row[jj] = 0.0;
                    continue;
                }
                let raw = p_row[jj];
                let (mut score, mut slope) = match spec.softcap() {
                    Some(cap) => {
                        let t = (raw / cap).tanh();
                        (cap * t, 1.0 - t * t)
                    }
                    None => (raw, 1.0),
                };
                if let Some(alibi) = slope_h {
                    score -= alibi * (diag - j as i128).unsigned_abs() as f32;
                }
                if !S::TRIVIAL {
                    slope *= self.mods.score().derivative(f64::from(score), at) as f32;
                    score = self.mods.score_at(score, at);
                }
                let p = (score - row_lse).exp();
                p_row[jj] = p;
                ds_row[jj] = p * (ds_row[jj] - delta + g_lse) * slope;
                any = true;
            }
        }
        any
    }
}

/// `dst += beta · lhs · rhs`: one `gemm` when `rhs` is finite; otherwise term by term,
/// skipping the zero weights of `lhs` (hidden pairs), so that a non-finite value a pair cannot
/// see never reaches it (`0 · NaN`).
fn product(dst: &mut ArrayViewMut2<f32>, lhs: &ArrayView2<f32>, rhs: &ArrayView2<f32>, beta: f32) {
    if rhs.iter().all(|x| x.is_finite()) {
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
