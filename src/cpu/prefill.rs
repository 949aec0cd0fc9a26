//! Prefill on the CPU: blocked online softmax over tiles that stack the query heads of one KV
//! group, with `Q·Kᵀ` and `P·V` as `gemm` matrix products.
//!
//! **Tiles.** Work item `(b, g, qb)` writes its own sub-views of the output and covers queries
//! `qb·block_q ..` of every query head of KV head `g` of batch `b`: `rows = group · block_q`
//! rows, row `hh · block_q + ii` being query head `g · group + hh`, query `qb · block_q + ii`.
//! Its keys are the union of its rows' visible ranges, in blocks of `BLOCK_K`; a block every
//! row sees whole skips the mask.
//!
//! **User masks.** In blocks of the block mask's key tiles (`MASK_BLOCK_K`): empty ones
//! skipped, full ones run without the mask, partial ones test it per score. Where the
//! mods' classifier knows every row's keys as one interval (its row keys: packed sorted
//! documents), the mask folds into the rows' ranges instead and the tile runs as under the
//! band alone.
//!
//! **State.** Per row the running max `m`, the sum `l` of `exp(s − m)` and the unnormalised
//! output; each block rescales a row by `exp(m_old − m_new)` only when its max grows.

use multiversion::multiversion;
use ndarray::{
    ArrayView2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut3, ArrayViewMut4, Axis, s,
};
use rayon::prelude::*;

use super::{RowAt, RowMods, RowState, UserMods, simd};
use crate::dsl::block::{BlockMask, TileState};
use crate::dsl::{MaskMod, Mods, ScoreMod};
use crate::spec::{AttentionSpec, ProblemShape};

/// Keys per block.
const BLOCK_K: usize = 256;
/// Keys per block under a user mask: the block mask's key tiles. Smaller, so that partial
/// tiles (a document's edges, the diagonal) waste less of their products on hidden pairs.
const MASK_BLOCK_K: usize = 64;
/// Target rows of a tile (`group · block_q`).
const TILE_ROWS: usize = 128;

/// Per-worker scratch, allocated once per rayon job, never in the key loop.
struct Scratch {
    /// The tile's queries, `rows × D`.
    q: Vec<f32>,
    /// Scores, then probabilities, `rows × BLOCK_K`.
    s: Vec<f32>,
    /// Unnormalised outputs, `rows × D`.
    acc: Vec<f32>,
    m: Vec<f32>,
    /// Sums of exponentials, in f64 (see [`simd::exp_shifted_sum`]).
    l: Vec<f64>,
}

/// Writes `o: [B, HQ, Lq, D]` and `lse: [B, HQ, Lq]` (f32; every element, whatever they
/// held). Each work item owns the disjoint sub-views of its rows.
pub(super) fn forward_into<M: MaskMod, S: ScoreMod>(
    spec: &AttentionSpec,
    mods: &Mods<M, S>,
    shape: ProblemShape,
    (q, k, v): (ArrayView4<f32>, ArrayView4<f32>, ArrayView4<f32>),
    mut o: ArrayViewMut4<f32>,
    mut lse: ArrayViewMut3<f32>,
) {
    let user = UserMods(mods);
    let blocks = (!M::TRIVIAL && mods.block_masks()).then(|| {
        let block_q = block_q(spec.group_size(), shape.seq_q);
        mods.block_mask(spec, shape, (block_q, MASK_BLOCK_K))
    });
    let user: Option<&dyn RowMods> = if mods.is_trivial() { None } else { Some(&user) };
    let segments = o
        .outer_iter_mut()
        .zip(lse.outer_iter_mut())
        .enumerate()
        .map(|(b, (o, lse))| Segment {
            b,
            q: q.index_axis(Axis(0), b),
            k: k.index_axis(Axis(0), b),
            v: v.index_axis(Axis(0), b),
            o,
            lse,
        })
        .collect();
    run_segments(spec, user, blocks.as_deref(), shape.seq_q, segments);
}

/// The varlen forward ([`crate::spec::Varlen`]): `q: [1, HQ, total_q, D]`, `k`, `v: [1, HKV,
/// total_k, D]` packed, each sequence a problem of its own whose tiles start at its first
/// query and whose keys are its own (no tile straddles two sequences); writes every element of
/// `o: [1, HQ, total_q, D]` and `lse: [1, HQ, total_q]`.
pub(super) fn forward_varlen_into(
    spec: &AttentionSpec,
    packing: &crate::spec::Varlen,
    (q, k, v): (ArrayView4<f32>, ArrayView4<f32>, ArrayView4<f32>),
    o: ArrayViewMut4<f32>,
    lse: ArrayViewMut3<f32>,
) {
    let (mut o, mut lse) = (
        o.index_axis_move(Axis(0), 0),
        lse.index_axis_move(Axis(0), 0),
    );
    let (q, k, v) = (
        q.index_axis_move(Axis(0), 0),
        k.index_axis_move(Axis(0), 0),
        v.index_axis_move(Axis(0), 0),
    );
    let mut segments = Vec::with_capacity(packing.sequences());
    for b in 0..packing.sequences() {
        let (rows, keys) = (packing.queries(b), packing.keys(b));
        let (o_b, o_rest) = o.split_at(Axis(1), rows.len());
        let (lse_b, lse_rest) = lse.split_at(Axis(1), rows.len());
        (o, lse) = (o_rest, lse_rest);
        segments.push(Segment {
            b,
            q: q.slice_move(s![.., rows, ..]),
            k: k.slice_move(s![.., keys.clone(), ..]),
            v: v.slice_move(s![.., keys, ..]),
            o: o_b,
            lse: lse_b,
        });
    }
    run_segments(spec, None, None, packing.max_seq_q(), segments);
}

/// One problem of a run: batch row `b` of a batch, or sequence `b` of a packing. `q: [HQ, Lq,
/// D]`, `k`, `v: [HKV, Lk, D]`, and its outputs `o: [HQ, Lq, D]`, `lse: [HQ, Lq]`.
struct Segment<'a> {
    b: usize,
    q: ArrayView3<'a, f32>,
    k: ArrayView3<'a, f32>,
    v: ArrayView3<'a, f32>,
    o: ArrayViewMut3<'a, f32>,
    lse: ArrayViewMut2<'a, f32>,
}

/// Runs every tile of `segments` on the pool, in tiles of `block_q(group, longest)` queries.
fn run_segments(
    spec: &AttentionSpec,
    user: Option<&dyn RowMods>,
    blocks: Option<&BlockMask>,
    longest: usize,
    segments: Vec<Segment<'_>>,
) {
    let (dim, group) = (spec.head_dim(), spec.group_size());
    let block_q = block_q(group, longest);
    let rows = group * block_q;
    // (the segment's inputs, b, g, first query, its rows of o, its rows of lse), one per
    // work item.
    let mut items = Vec::new();
    for segment in segments {
        let Segment { b, q, k, v, o, lse } = segment;
        let (seq_q, seq_k) = (q.len_of(Axis(1)), k.len_of(Axis(1)));
        if seq_q == 0 {
            continue;
        }
        if dim == 0 {
            let mut lse = lse;
            lse.fill(f32::NEG_INFINITY);
            continue;
        }
        let heads = chunks(o, Axis(0), group)
            .into_iter()
            .zip(chunks(lse, Axis(0), group));
        for (g, (o_g, lse_g)) in heads.enumerate() {
            let tiles =
                chunks(o_g, Axis(1), block_q)
                    .into_iter()
                    .zip(chunks(lse_g, Axis(1), block_q));
            for (qb, (o_tile, lse_tile)) in tiles.enumerate() {
                let tile = Tile {
                    spec,
                    mods: user,
                    seq_q,
                    seq_k,
                    b,
                    g,
                    blocks,
                    block_q,
                    i0: qb * block_q,
                    i1: ((qb + 1) * block_q).min(seq_q),
                };
                let inputs = (
                    q,
                    k.index_axis_move(Axis(0), g),
                    v.index_axis_move(Axis(0), g),
                );
                items.push((tile, inputs, o_tile, lse_tile));
            }
        }
    }
    items.into_par_iter().for_each_init(
        || Scratch {
            q: vec![0.0; rows * dim],
            s: vec![0.0; rows * BLOCK_K],
            acc: vec![0.0; rows * dim],
            m: vec![0.0; rows],
            l: vec![0.0; rows],
        },
        |scratch, (tile, inputs, o_tile, lse_tile)| tile.run(scratch, inputs, o_tile, lse_tile),
    );
}

/// Queries per tile: `TILE_ROWS` rows of the group's heads.
pub(super) fn block_q(group: usize, seq_q: usize) -> usize {
    (TILE_ROWS / group).clamp(1, seq_q.max(1))
}

/// The tiles `(queries, keys)` of the block masks of a prefill with `group` heads per KV head
/// and `seq_q` queries.
pub(super) fn block_mask_tiles(group: usize, seq_q: usize) -> (usize, usize) {
    (block_q(group, seq_q), MASK_BLOCK_K)
}

/// `view` cut along `axis` into consecutive pieces of `size` (the last one shorter).
pub(super) fn chunks<'a, A, D: ndarray::Dimension>(
    mut view: ndarray::ArrayViewMut<'a, A, D>,
    axis: Axis,
    size: usize,
) -> Vec<ndarray::ArrayViewMut<'a, A, D>> {
    let mut pieces = Vec::with_capacity(view.len_of(axis).div_ceil(size));
    while view.len_of(axis) > size {
        let (head, rest) = view.split_at(axis, size);
        pieces.push(head);
        view = rest;
    }
    pieces.push(view);
    pieces
}

/// One work item's place in the problem.
struct Tile<'a> {
    spec: &'a AttentionSpec,
    mods: Option<&'a dyn RowMods>,
    seq_q: usize,
    seq_k: usize,
    b: usize,
    g: usize,
    /// The user mask's block mask, in tiles of `block_q` queries and `BLOCK_K` keys.
    blocks: Option<&'a BlockMask>,
    block_q: usize,
    i0: usize,
    i1: usize,
}

impl Tile<'_> {
    /// `q: [HQ, Lq, D]`, `k`, `v: [Lk, D]` of this batch row (and KV head).
    fn run(
        &self,
        scratch: &mut Scratch,
        (q, k, v): (ArrayView3<f32>, ArrayView2<f32>, ArrayView2<f32>),
        mut o_tile: ArrayViewMut3<f32>,
        mut lse_tile: ArrayViewMut2<f32>,
    ) {
        let spec = self.spec;
        let (group, dim, block_q) = (spec.group_size(), spec.head_dim(), self.block_q);
        let rows = group * block_q;
        let mask = spec.mask();
        let mut visible: Vec<_> = (self.i0..self.i1)
            .map(|i| mask.visible_keys(i, self.seq_q, self.seq_k))
            .collect();
        // Where the classifier knows every row's keys as one interval, the user mask folds
        // into the rows' ranges: the tile then runs as under the band alone (no block mask,
        // no test per score, blocks of `BLOCK_K` from the first visible key).
        let exact = self.fold_row_keys(&mut visible);
        // The union of the rows' visible keys.
        let lo = visible
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| r.start)
            .min();
        let hi = visible.iter().map(|r| r.end).max().unwrap_or(0);
        let Some(lo) = lo else {
            // Every row fully masked: o = 0, lse = −∞.
            o_tile.fill(0.0);
            lse_tile.fill(f32::NEG_INFINITY);
            return;
        };
        for hh in 0..group {
            for ii in 0..block_q {
                let row = &mut scratch.q[(hh * block_q + ii) * dim..][..dim];
                if self.i0 + ii < self.i1 {
                    let src = q.slice(s![self.g * group + hh, self.i0 + ii, ..]);
                    // A plain copy where the row is contiguous (it usually is), else by element.
                    match src.as_slice() {
                        Some(src) => row.copy_from_slice(src),
                        None => row.iter_mut().zip(src).for_each(|(dst, &x)| *dst = x),
                    }
                } else {
                    row.fill(0.0);
                }
            }
        }
        scratch.acc.fill(0.0);
        scratch.m.fill(f32::NEG_INFINITY);
        scratch.l.fill(0.0);
        let Scratch {
            q: q_buf,
            s: s_buf,
            acc: acc_buf,
            m: m_buf,
            l: l_buf,
        } = scratch;
        let q_tile = ArrayView2::from_shape((rows, dim), &q_buf[..]).expect("rows × D");
        // The keys every row that sees any key sees: outside them a block is a boundary block,
        // whose masked probabilities are 0 — but 0 · NaN is NaN, so `P·V` must not multiply
        // a non-finite value there (see `accumulate_values`).
        let live = visible.iter().filter(|r| !r.is_empty());
        let common = live.fold(0..usize::MAX, |c, r| c.start.max(r.start)..c.end.min(r.end));
        // With a user mask, key blocks are the block mask's tiles (MASK_BLOCK_K keys, aligned),
        // with it or without it (so that both cut the sums alike).
        let user_mask = self.mods.is_some_and(|m| m.masks()) && !exact;
        let block_k = if user_mask { MASK_BLOCK_K } else { BLOCK_K };
        let mut j0 = if user_mask { lo - lo % block_k } else { lo };
        while j0 < hi {
            let n = block_k.min(hi - j0);
            let state = match self.blocks {
                _ if exact => TileState::Full,
                Some(blocks) => blocks.state(self.b, self.g, self.i0 / block_q, j0 / block_k),
                None => TileState::Partial,
            };
            if state == TileState::Empty {
                j0 += n;
                continue;
            }
            let k_block = k.slice(s![j0..j0 + n, ..]);
            let v_block = v.slice(s![j0..j0 + n, ..]);
            {
                let scores = ArrayViewMut2::from_shape((rows, BLOCK_K), &mut s_buf[..])
                    .expect("rows × BLOCK_K");
                let mut scores = scores.slice_move(s![.., ..n]);
                matmul(&mut scores, &q_tile, &k_block.t(), spec.scale_f32(), false);
            }
            let row_state = RowState {
                acc: acc_buf,
                m: m_buf,
                l: l_buf,
            };
            softmax_block(
                self,
                &visible,
                (j0, n),
                state != TileState::Full,
                s_buf,
                row_state,
            );
            let probs =
                ArrayView2::from_shape((rows, BLOCK_K), &s_buf[..]).expect("rows × BLOCK_K");
            let mut acc =
                ArrayViewMut2::from_shape((rows, dim), &mut acc_buf[..]).expect("rows × D");
            let probs = probs.slice(s![.., ..n]);
            self.accumulate_values(&mut acc, &probs, &v_block, (j0, state), &visible, &common);
            j0 += n;
        }
        for hh in 0..group {
            for ii in 0..self.i1 - self.i0 {
                let r = hh * block_q + ii;
                let (m, l) = (m_buf[r], l_buf[r]);
                let mut out = o_tile.slice_mut(s![hh, ii, ..]);
                if l > 0.0 {
                    let l32 = l as f32;
                    let acc = &acc_buf[r * dim..][..dim];
                    // Divided, not multiplied by 1/l: one rounding. Slices where the row is
                    // contiguous, so that the loop vectorises.
                    match out.as_slice_mut() {
                        Some(out) => out.iter_mut().zip(acc).for_each(|(o, &a)| *o = a / l32),
                        None => out.iter_mut().zip(acc).for_each(|(o, &a)| *o = a / l32),
                    }
                    lse_tile[[hh, ii]] = (f64::from(m) + l.ln()) as f32;
                } else {
                    out.fill(0.0);
                    lse_tile[[hh, ii]] = f32::NEG_INFINITY;
                }
            }
        }
    }
}

impl Tile<'_> {
    /// Intersects each row's band `visible[ii]` (query `i0 + ii`) with the keys the user
    /// mask lets it see, when the mods know them for every row of the tile as one interval
    /// ([`RowMods::row_keys`]); an empty intersection becomes `0..0`. Returns whether it did
    /// (else `visible` is untouched and the mask is evaluated per score).
    fn fold_row_keys(&self, visible: &mut [std::ops::Range<usize>]) -> bool {
        let Some(mods) = self.mods.filter(|m| m.masks()) else {
            return false;
        };
        let group = self.spec.group_size();
        let heads = self.g * group..(self.g + 1) * group;
        let keys: Option<Vec<_>> = (self.i0..self.i1)
            .map(|i| {
                let row = RowAt {
                    b: self.b,
                    h: heads.start,
                    i,
                    seq_q: self.seq_q,
                    seq_k: self.seq_k,
                };
                mods.row_keys(row, heads.clone())
            })
            .collect();
        let Some(keys) = keys else {
            return false;
        };
        for (band, keys) in visible.iter_mut().zip(keys) {
            let both = band.start.max(keys.start)..band.end.min(keys.end);
            *band = if both.is_empty() { 0..0 } else { both };
        }
        true
    }

    /// `acc += P · V` for the block of keys `j0 ..` (`probs` is `rows × n`, 0 where masked).
    ///
    /// One product for the whole tile, unless the block holds a non-finite value at a key
    /// that some row cannot see (outside `common`, the keys every row with any visible key
    /// sees): then `0 · NaN` would reach that row, so each row is summed over its own visible
    /// keys only. The oracle never reads a masked key; this keeps the CPU's rows equal to it
    /// whatever the hidden keys hold. Checking costs a scan of the block's values outside
    /// `common`, on boundary blocks only.
    fn accumulate_values(
        &self,
        acc: &mut ArrayViewMut2<f32>,
        probs: &ArrayView2<f32>,
        v_block: &ArrayView2<f32>,
        (j0, state): (usize, TileState),
        visible: &[std::ops::Range<usize>],
        common: &std::ops::Range<usize>,
    ) {
        let n = v_block.nrows();
        let inside = common.start <= j0 && j0 + n <= common.end;
        // In a full tile the user mask hides nothing: only the band's test remains.
        let user_mask = self.mods.filter(|m| m.masks() && state != TileState::Full);
        let hidden_non_finite = match user_mask {
            // A user mask may hide any key: any non-finite value is a hidden one for some row.
            Some(_) => v_block.iter().any(|x| !x.is_finite()),
            None => {
                !inside
                    && v_block
                        .outer_iter()
                        .enumerate()
                        .filter(|(j, _)| !common.contains(&(j0 + j)))
                        .any(|(_, row)| row.iter().any(|x| !x.is_finite()))
            }
        };
        if !hidden_non_finite {
            matmul(acc, probs, v_block, 1.0, true);
            return;
        }
        let (group, block_q) = (self.spec.group_size(), self.block_q);
        if let Some(mods) = user_mask {
            // Key by key, the keys each row sees (rare: only blocks holding non-finite values).
            for (ii, range) in visible.iter().enumerate() {
                for hh in 0..group {
                    let (r, head) = (hh * block_q + ii, self.g * group + hh);
                    for j in range.start.max(j0)..range.end.min(j0 + n) {
                        let row_at = RowAt {
                            b: self.b,
                            h: head,
                            i: self.i0 + ii,
                            seq_q: self.seq_q,
                            seq_k: self.seq_k,
                        };
                        if mods.visible(row_at, j) {
                            let p = probs[[r, j - j0]];
                            let mut out = acc.row_mut(r);
                            out.zip_mut_with(&v_block.row(j - j0), |o, &x| *o += p * x);
                        }
                    }
                }
            }
            return;
        }
        for (ii, range) in visible.iter().enumerate() {
            let a = range.start.clamp(j0, j0 + n) - j0;
            let b = range.end.clamp(j0, j0 + n) - j0;
            if a >= b {
                continue;
            }
            for hh in 0..group {
                let r = hh * block_q + ii;
                matmul(
                    &mut acc.slice_mut(s![r..r + 1, ..]),
                    &probs.slice(s![r..r + 1, a..b]),
                    &v_block.slice(s![a..b, ..]),
                    1.0,
                    true,
                );
            }
        }
    }
}

/// Turns the block's scores (`scratch.s`, columns `..n` for keys `j0..j0 + n`) into
/// probabilities `exp(s − m_new)` row by row — softcap, ALiBi and the mask applied first — and
/// rescales each row's output and sum when its max grows.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn softmax_block(
    tile: &Tile<'_>,
    visible: &[std::ops::Range<usize>],
    (j0, n): (usize, usize),
    user_mask: bool,
    scores: &mut [f32],
    state: RowState<'_>,
) {
    let RowState { acc, m, l } = state;
    let spec = tile.spec;
    let (group, dim, block_q) = (spec.group_size(), spec.head_dim(), tile.block_q);
    let mask = spec.mask();
    for hh in 0..group {
        let head = tile.g * group + hh;
        for ii in 0..block_q {
            let r = hh * block_q + ii;
            let row = &mut scores[r * BLOCK_K..][..n];
            let Some(range) = visible.get(ii) else {
                row.fill(0.0); // a padding row of the last tile
                continue;
            };
            let lo = range.start.clamp(j0, j0 + n) - j0;
            let hi = range.end.clamp(j0, j0 + n) - j0;
            if lo >= hi {
                row.fill(0.0);
                continue;
            }
            let live = &mut row[lo..hi];
            if let Some(cap) = spec.softcap() {
                simd::softcap(live, cap);
            }
            if let Some(alibi) = spec.alibi() {
                let slope = alibi.slope(head);
                let diag = mask.diagonal(tile.i0 + ii, tile.seq_q, tile.seq_k);
                for (j, s) in live.iter_mut().enumerate() {
                    let key = (j0 + lo + j) as i128;
                    *s -= slope * (diag - key).unsigned_abs() as f32;
                }
            }
            if let Some(mods) = tile.mods {
                let row_at = RowAt {
                    b: tile.b,
                    h: head,
                    i: tile.i0 + ii,
                    seq_q: tile.seq_q,
                    seq_k: tile.seq_k,
                };
                mods.apply(row_at, j0 + lo, live, user_mask);
            }
            let block_max = simd::max(live);
            if block_max == f32::NEG_INFINITY {
                row.fill(0.0); // every key of the block hidden from this row by the user mask
                continue;
            }
            let m_old = m[r];
            let m_new = m_old.max(block_max);
            if m_new > m_old {
                if m_old > f32::NEG_INFINITY {
                    let alpha = simd::exp(m_old - m_new);
                    l[r] *= f64::from(alpha);
                    simd::scale(alpha, &mut acc[r * dim..][..dim]);
                }
                m[r] = m_new;
            }
            l[r] += simd::exp_shifted_sum(live, m_new);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
        }
    }
}

/// `dst = beta · lhs · rhs`, or `dst += beta · lhs · rhs` with `accumulate`, by the `gemm`
/// crate (single-threaded: the work items are the parallelism).
pub(super) fn matmul(
    dst: &mut ArrayViewMut2<f32>,
    lhs: &ArrayView2<f32>,
    rhs: &ArrayView2<f32>,
    beta: f32,
    accumulate: bool,
) {
    let (m, depth) = lhs.dim();
    let (depth_rhs, n) = rhs.dim();
    assert_eq!(depth, depth_rhs, "matmul: inner dimensions differ");
    assert_eq!(dst.dim(), (m, n), "matmul: destination shape");
    if m == 0 || n == 0 {
        return;
    }
    if depth == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let (dst_rs, dst_cs) = (dst.strides()[0], dst.strides()[1]);
    let (lhs_rs, lhs_cs) = (lhs.strides()[0], lhs.strides()[1]);
    let (rhs_rs, rhs_cs) = (rhs.strides()[0], rhs.strides()[1]);
    // SAFETY: the three pointers and strides come from ndarray views of the stated shapes
    // (checked above), so every element gemm addresses, `ptr + i·rs + j·cs` for `i < rows`,
    // `j < cols`, lies inside its view; `dst` is a unique (mutable) view that overlaps neither
    // input (they are borrowed immutably at the same time).
    unsafe {
        gemm::gemm(
            m,
            n,
            depth,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// `matmul` on strided and transposed views, overwriting and accumulating, against the
    /// definition in f64.
    #[test]
    fn matmul_follows_the_definition_on_strided_views() {
        let a = Array2::from_shape_fn((7, 10), |(i, j)| ((i * 3 + j * 5) % 11) as f32 - 5.0);
        let b = Array2::from_shape_fn((9, 10), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.25);
        let lhs = a.slice(s![..;2, ..]); // 4 × 10, row stride 20
        let rhs = b.t(); // 10 × 9, transposed
        let mut big = Array2::<f32>::from_elem((4, 12), 1.0);
        let mut dst = big.slice_mut(s![.., 1..10]);
        matmul(&mut dst, &lhs, &rhs, 0.5, true);
        for i in 0..4 {
            for j in 0..9 {
                let exact: f64 = (0..10)
                    .map(|c| f64::from(lhs[[i, c]]) * f64::from(rhs[[c, j]]))
                    .sum();
                let got = f64::from(big[[i, j + 1]]);
                assert!((got - (1.0 + 0.5 * exact)).abs() < 1e-4, "{got} vs {exact}");
            }
            assert_eq!(big[[i, 0]], 1.0);
            assert_eq!(big[[i, 10]], 1.0);
        }
        let mut dst = big.slice_mut(s![.., 1..10]);
        matmul(&mut dst, &lhs, &rhs, 1.0, false);
        assert!(
            (big[[0, 1]] - (0..10).map(|c| lhs[[0, c]] * rhs[[c, 0]]).sum::<f32>()).abs() < 1e-4
        );
    }
}
