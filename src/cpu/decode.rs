//! Decode on the CPU against a [`crate::cache::KvCache`]: split-KV over threads, each split
//! streaming its cached rows once for every query of the KV group, merged in `f64`.
//!
//! **Work.** Item `(b, g, split)` owns the `group · seq_q` query rows of KV head `g` of
//! sequence `b` (row `hh · seq_q + ii`) over one contiguous run of that sequence's keys, in two
//! passes over blocks of rows that lie within one page (consecutive in the pool: f32 rows are
//! read in place, others dequantized block by block into a buffer):
//! 1. scores: each block of key rows crosses every query row of the group in register tiles
//!    ([`super::tiles::dots`]: sums widened to f64, times the scale, rounded once); then score
//!    modifiers and the mask row by row, and with the split's exact max per row the scores
//!    become probabilities (no online rescale, so no rounding of the output by it);
//! 2. values: each block of value rows is added to every row that weighs it
//!    ([`super::tiles::weighted_sum`]).
//!
//! While a block is computed, the tiles ask for the next block's rows a row at a time
//! ([`super::tiles::Ahead`]), so that the memory stays busy while the arithmetic runs. The
//! scores of a split are scratch of the worker (`rows × keys` floats), grown when needed.
//!
//! **Merge.** Each split keeps (max score `m`, `l = Σ exp(s − m)`, output / `l`); the splits of
//! a row merge by [`crate::partial::merge_state`], in `f64`.

use std::borrow::Cow;
use std::ops::Range;

use ndarray::{Array3, Array4, ArrayView4, s};
use rayon::prelude::*;

use super::{RowAt, RowMods, RowState, simd, tiles};
use crate::cache::StorageKind;
use crate::spec::AttentionSpec;

/// The fewest keys worth a split of their own.
const MIN_SPLIT: usize = 256;
/// Keys per block of the score pass and of the value pass: a block's rows are fetched together
/// and cross the tiles together. The value pass reloads its accumulators once per block, hence
/// the longer blocks (64 rows of D 128 in f32 are 32 KiB, most of an L1 data cache).
const BLOCK_K: usize = 16;
const BLOCK_V: usize = 64;
/// How many blocks ahead each pass asks for rows (measured on a 2-core AVX-512 machine with
/// `benches/cpu.rs`: 2 and 1 kept GQA decode closest to a streaming read).
const AHEAD_K: usize = 2;
const AHEAD_V: usize = 1;
/// The dequantization buffer's rows.
const BLOCK: usize = if BLOCK_K > BLOCK_V { BLOCK_K } else { BLOCK_V };

/// One sequence of the batch: its length and block table.
pub(super) struct Sequence<'a> {
    pub len: usize,
    pub pages: Cow<'a, [u32]>,
}

/// The cache's word pool, as [`crate::cache::KvCache::raw`] gives it.
pub(super) struct Pool<'a> {
    pub storage: StorageKind,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub k: &'a [u32],
    pub v: &'a [u32],
    pub k_scale: &'a [f32],
    pub v_scale: &'a [f32],
}

impl Pool<'_> {
    /// Pool row of token `t` of a sequence with block table `pages`, KV head `g`.
    #[inline(always)]
    fn row(&self, pages: &[u32], t: usize, g: usize) -> usize {
        let page = pages[t / self.page_size] as usize;
        (page * self.kv_heads + g) * self.page_size + t % self.page_size
    }

    /// The blocks of `keys` (of a sequence with block table `pages`, KV head `g`): `(offset
    /// in keys, first pool row, count)`, each within one page (so its rows are consecutive in
    /// the pool) and at most `most` long. Divides once per block, not per key.
    fn blocks<'b>(
        &'b self,
        pages: &'b [u32],
        g: usize,
        keys: Range<usize>,
        most: usize,
    ) -> impl Iterator<Item = (usize, usize, usize)> + 'b {
        let mut t = keys.start;
        std::iter::from_fn(move || {
            if t >= keys.end {
                return None;
            }
            let in_page = self.page_size - t % self.page_size;
            let count = in_page.min(keys.end - t).min(most);
            let block = (t - keys.start, self.row(pages, t, g), count);
            t += count;
            Some(block)
        })
    }

    /// Pool rows `row..row + count` of `words`, to be asked for ahead of their use.
    fn ahead<'b>(&self, words: &'b [u32], row: usize, count: usize) -> tiles::Ahead<'b> {
        let per_row = self.storage.words_per_row(self.head_dim);
        tiles::Ahead {
            bytes: bytemuck::cast_slice(&words[row * per_row..][..count * per_row]),
            per_key: 4 * per_row,
        }
    }

    /// Pool rows `row..row + count` of `words` as f32, `count × head_dim`: in place for f32
    /// storage, else dequantized into `buf`.
    #[inline(always)]
    fn fetch<'b>(
        &'b self,
        words: &'b [u32],
        scales: &[f32],
        row: usize,
        count: usize,
        buf: &'b mut [f32],
    ) -> &'b [f32] {
        let dim = self.head_dim;
        let per_row = self.storage.words_per_row(dim);
        let rows = words[row * per_row..][..count * per_row].chunks_exact(per_row);
        let buf = &mut buf[..count * dim];
        let outs = buf.chunks_exact_mut(dim);
        match self.storage {
            StorageKind::Float32 => {
                return bytemuck::cast_slice(&words[row * per_row..][..count * per_row]);
            }
            StorageKind::Float16 => {
                for (words, out) in rows.zip(outs) {
                    unpack(words, 16, out, half_to_f32);
                }
            }
            StorageKind::BFloat16 => {
                for (words, out) in rows.zip(outs) {
                    unpack(words, 16, out, |bits| f32::from_bits(bits << 16));
                }
            }
            StorageKind::Int8 => {
                for ((words, out), &scale) in rows.zip(outs).zip(&scales[row..row + count]) {
                    unpack(words, 8, out, |bits| f32::from(bits as u8 as i8) * scale);
                }
            }
            StorageKind::Int4 => {
                for ((words, out), &scale) in rows.zip(outs).zip(&scales[row..row + count]) {
                    // Sign-extend the nibble: shift it to the top of a byte, then back as i8.
                    unpack(words, 4, out, |bits| {
                        f32::from(((bits << 4) as u8 as i8) >> 4) * scale
                    });
                }
            }
        }
        buf
    }
}

/// Lane `c` of a packed row is bits `bits · (c % per_word)..` of word `c / per_word` (see
/// [`crate::cache::storage`]); `out[c] = f(lane)`.
#[inline(always)]
fn unpack(words: &[u32], bits: u32, out: &mut [f32], f: impl Fn(u32) -> f32) {
    // In little-endian memory lane `c` is simply the `c`-th field of `bits` bits: read as
    // bytes or halves, the loops vectorise (the word-and-shift loop below does not).
    #[cfg(target_endian = "little")]
    match bits {
        16 => {
            let lanes: &[u16] = bytemuck::cast_slice(words);
            for (value, &lane) in out.iter_mut().zip(lanes) {
                *value = f(u32::from(lane));
            }
            return;
        }
        8 => {
            let lanes: &[u8] = bytemuck::cast_slice(words);
            for (value, &lane) in out.iter_mut().zip(lanes) {
                *value = f(u32::from(lane));
            }
            return;
        }
        4 => {
            let bytes: &[u8] = bytemuck::cast_slice(words);
            for (pair, &byte) in out.chunks_mut(2).zip(bytes) {
                pair[0] = f(u32::from(byte & 0xf));
                if let Some(high) = pair.get_mut(1) {
                    *high = f(u32::from(byte >> 4));
                }
            }
            return;
        }
        _ => {}
    }
    let per_word = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    for (w, chunk) in words.iter().zip(out.chunks_mut(per_word)) {
        for (lane, value) in chunk.iter_mut().enumerate() {
            *value = f((w >> (bits * lane as u32)) & mask);
        }
    }
}

/// IEEE half bits to f32, exactly (normals by moving the fields, subnormals by scaling the
/// mantissa, infinities and NaN through the all-ones exponent), branch-free.
#[inline(always)]
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000) << 16;
    let exponent = (h >> 10) & 0x1f;
    let mantissa = h & 0x3ff;
    let normal = f32::from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
    let special = f32::from_bits(sign | 0x7f80_0000 | (mantissa << 13));
    let subnormal = f32::from_bits(sign | (mantissa as f32 * 5.960_464_5e-8).to_bits());
    match exponent {
        0 => subnormal,
        31 => special,
        _ => normal,
    }
}

/// The merged result: `o: [B, HQ, Lq, D]` (f32, normalised over the keys read), `lse: [B, HQ,
/// Lq]` (f64).
pub(super) struct Merged {
    pub o: Array4<f32>,
    pub lse: Array3<f64>,
}

/// What a split reads.
struct Split<'a> {
    spec: &'a AttentionSpec,
    pool: &'a Pool<'a>,
    pages: &'a [u32],
    seq_q: usize,
    len: usize,
    b: usize,
    g: usize,
    keys: Range<usize>,
    mods: Option<&'a dyn RowMods>,
}

pub(super) fn decode(
    spec: &AttentionSpec,
    mods: Option<&dyn RowMods>,
    q: ArrayView4<f32>,
    pool: &Pool<'_>,
    seqs: &[Sequence<'_>],
    keys: Range<usize>,
    threads: usize,
) -> Merged {
    let (batch, seq_q, dim) = (seqs.len(), q.shape()[2], pool.head_dim);
    let (hq, hkv, group) = (spec.q_heads(), spec.kv_heads(), spec.group_size());
    let rows = group * seq_q;
    let mask = spec.mask();
    // Each sequence's keys worth reading: the requested ones its rows can see.
    let spans: Vec<Range<usize>> = seqs
        .iter()
        .map(|seq| {
            let (mut lo, mut hi) = (usize::MAX, 0);
            for i in 0..seq_q {
                let r = mask.visible_keys(i, seq_q, seq.len);
                let (a, b) = (r.start.max(keys.start), r.end.min(keys.end));
                if a < b {
                    lo = lo.min(a);
                    hi = hi.max(b);
                }
            }
            if lo < hi { lo..hi } else { 0..0 }
        })
        .collect();
    let longest = spans.iter().map(|r| r.len()).max().unwrap_or(0);
    let splits = (4 * threads)
        .div_ceil((batch * hkv).max(1))
        .clamp(1, longest.div_ceil(MIN_SPLIT).max(1));
    let items = batch * hkv * splits;
    let mut o_parts = vec![0.0f32; items * rows * dim];
    let mut m_parts = vec![f32::NEG_INFINITY; items * rows];
    let mut l_parts = vec![0.0f64; items * rows];
    if items > 0 && rows > 0 && dim > 0 {
        o_parts
            .par_chunks_mut(rows * dim)
            .zip(m_parts.par_chunks_mut(rows))
            .zip(l_parts.par_chunks_mut(rows))
            .enumerate()
            .for_each_init(
                || Scratch {
                    q_rows: vec![0.0f32; rows * dim],
                    scores: Vec::new(),
                    block: vec![0.0f32; BLOCK * dim],
                    visible: Vec::with_capacity(seq_q),
                },
                |scratch, (item, ((o, m), l))| {
                    let (b, rest) = (item / (hkv * splits), item % (hkv * splits));
                    let (g, split) = (rest / splits, rest % splits);
                    let span = &spans[b];
                    let per_split = span.len().div_ceil(splits);
                    let start = (span.start + split * per_split).min(span.end);
                    let end = (start + per_split).min(span.end);
                    for hh in 0..group {
                        for ii in 0..seq_q {
                            let dst = &mut scratch.q_rows[(hh * seq_q + ii) * dim..][..dim];
                            for (d, &x) in
                                dst.iter_mut().zip(q.slice(s![b, g * group + hh, ii, ..]))
                            {
                                *d = x;
                            }
                        }
                    }
                    let split = Split {
                        spec,
                        pool,
                        pages: &seqs[b].pages,
                        seq_q,
                        len: seqs[b].len,
                        b,
                        g,
                        keys: start..end,
                        mods,
                    };
                    pulp::Arch::new().dispatch(SplitRun {
                        split: &split,
                        scratch,
                        state: RowState { acc: o, m, l },
                    });
                },
            );
    }
    // Merge the splits of each row.
    let mut o = Array4::<f32>::zeros((batch, hq, seq_q, dim));
    let mut lse = Array3::<f64>::from_elem((batch, hq, seq_q), f64::NEG_INFINITY);
    let mut states = Vec::with_capacity(splits);
    let mut weights = Vec::with_capacity(splits);
    let mut out = vec![0.0f64; dim];
    for b in 0..batch {
        for g in 0..hkv {
            for r in 0..rows {
                let (hh, ii) = (r / seq_q, r % seq_q);
                let at = |split: usize| ((b * hkv + g) * splits + split) * rows + r;
                states.clear();
                states.extend((0..splits).map(|s| (f64::from(m_parts[at(s)]), l_parts[at(s)])));
                let row_lse = crate::partial::merge_state(&states, &mut weights);
                if row_lse == f64::NEG_INFINITY {
                    continue;
                }
                out.fill(0.0);
                for (split, &w) in weights.iter().enumerate() {
                    if w > 0.0 {
                        for (acc, &x) in out.iter_mut().zip(&o_parts[at(split) * dim..][..dim]) {
                            *acc += w * f64::from(x);
                        }
                    }
                }
                let head = g * group + hh;
                for (dst, &x) in o.slice_mut(s![b, head, ii, ..]).iter_mut().zip(&out) {
                    *dst = x as f32;
                }
                lse[[b, head, ii]] = row_lse;
            }
        }
    }
    Merged { o, lse }
}

/// A worker's scratch, reused from split to split: the group's query rows, the split's scores
/// (`rows × keys`, grown when needed) and one block of dequantized rows.
struct Scratch {
    q_rows: Vec<f32>,
    scores: Vec<f32>,
    block: Vec<f32>,
    /// Per query index, its visible keys within the split (offsets from the split's start).
    visible: Vec<Range<usize>>,
}

/// One split: every row of the group at once, in two passes over its keys, under the
/// instruction set `pulp` chose.
struct SplitRun<'a> {
    split: &'a Split<'a>,
    scratch: &'a mut Scratch,
    state: RowState<'a>,
}

impl pulp::WithSimd for SplitRun<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let SplitRun {
            split,
            scratch,
            state,
        } = self;
        let Scratch {
            q_rows,
            scores,
            block,
            visible: ranges,
        } = scratch;
        let spec = split.spec;
        let pool = split.pool;
        let (dim, seq_q, group) = (pool.head_dim, split.seq_q, spec.group_size());
        let rows = group * seq_q;
        let mask = spec.mask();
        let RowState { acc, m, l } = state;
        acc.fill(0.0);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        let (t0, n) = (split.keys.start, split.keys.len());
        if scores.len() < rows * n {
            scores.resize(rows * n, 0.0);
        }
        let scores = &mut scores[..rows * n];
        // Pass 1, scores: each block of key rows once, against every row of the group.
        // Ahead of the last key blocks, the first value rows of pass 2.
        let blocks = |size| pool.blocks(split.pages, split.g, split.keys.clone(), size);
        let mut ahead = (blocks(BLOCK_K).skip(AHEAD_K).map(|b| (pool.k, b)))
            .chain(blocks(BLOCK_K).map(|b| (pool.v, b)));
        for (j0, row, count) in blocks(BLOCK_K) {
            let next = ahead
                .next()
                .map_or(tiles::Ahead::NONE, |(words, (_, row, count))| {
                    pool.ahead(words, row, count)
                });
            let k = pool.fetch(pool.k, pool.k_scale, row, count, block);
            tiles::dots(
                simd,
                q_rows,
                k,
                dim,
                spec.scale_f32(),
                &mut scores[j0..],
                n,
                next,
            );
        }
        // Score modifiers and the mask, row by row; then the split's exact max per row, so no
        // rescale: scores become probabilities.
        ranges.clear();
        for ii in 0..seq_q {
            let visible = mask.visible_keys(ii, seq_q, split.len);
            let diag = mask.diagonal(ii, seq_q, split.len);
            let (lo, hi) = (
                visible.start.clamp(t0, t0 + n) - t0,
                visible.end.clamp(t0, t0 + n) - t0,
            );
            ranges.push(lo..hi.max(lo));
            for hh in 0..group {
                let r = hh * seq_q + ii;
                let row = &mut scores[r * n..][..n];
                if let Some(cap) = spec.softcap() {
                    simd::softcap(row, cap);
                }
                if let Some(alibi) = spec.alibi() {
                    let slope = alibi.slope(split.g * group + hh);
                    for (j, s) in row.iter_mut().enumerate() {
                        *s -= slope * (diag - (t0 + j) as i128).unsigned_abs() as f32;
                    }
                }
                if let (Some(mods), true) = (split.mods, lo < hi) {
                    let row_at = RowAt {
                        b: split.b,
                        h: split.g * group + hh,
                        i: ii,
                        seq_q,
                        seq_k: split.len,
                    };
                    mods.apply(row_at, t0 + lo, &mut row[lo..hi], true);
                }
                if lo >= hi {
                    row.fill(f32::NEG_INFINITY);
                } else {
                    row[..lo].fill(f32::NEG_INFINITY);
                    row[hi..].fill(f32::NEG_INFINITY);
                }
                m[r] = simd::max(row);
                if m[r] == f32::NEG_INFINITY {
                    row.fill(0.0);
                } else {
                    l[r] = simd::exp_shifted_sum(row, m[r]);
                }
            }
        }
        // Pass 2, values: each block of value rows once, into every row that weighs it. The
        // keys every row with a visible key sees are `common`; in a block reaching outside it,
        // a hidden row's weight is 0 and 0 · NaN is NaN, so where float storage holds a
        // non-finite value at such a key the block goes row by row over each row's visible
        // keys (quantized rows are finite by construction).
        let common = ranges
            .iter()
            .filter(|r| !r.is_empty())
            .fold(0..usize::MAX, |c, r| c.start.max(r.start)..c.end.min(r.end));
        let mut ahead = blocks(BLOCK_V).skip(AHEAD_V);
        for (j0, row, count) in blocks(BLOCK_V) {
            let next = ahead.next().map_or(tiles::Ahead::NONE, |(_, row, count)| {
                pool.ahead(pool.v, row, count)
            });
            let v = pool.fetch(pool.v, pool.v_scale, row, count, block);
            let inside = common.start <= j0 && j0 + count <= common.end;
            let user_mask = split.mods.filter(|m| m.masks());
            let hidden_non_finite = !pool.storage.is_quantized()
                && match user_mask {
                    // A user mask may hide any key from some row.
                    Some(_) => v.iter().any(|x| !x.is_finite()),
                    None => {
                        !inside
                            && v.chunks_exact(dim)
                                .enumerate()
                                .filter(|(j, _)| !common.contains(&(j0 + j)))
                                .any(|(_, values)| values.iter().any(|x| !x.is_finite()))
                    }
                };
            if !hidden_non_finite {
                tiles::weighted_sum(simd, &scores[j0..], n, v, dim, acc, next);
                continue;
            }
            if let Some(mods) = user_mask {
                // Key by key, the keys each row sees (rare: blocks holding non-finite values).
                for (ii, range) in ranges.iter().enumerate() {
                    for hh in 0..group {
                        let r = hh * seq_q + ii;
                        let row_at = RowAt {
                            b: split.b,
                            h: split.g * group + hh,
                            i: ii,
                            seq_q,
                            seq_k: split.len,
                        };
                        for j in range.start.max(j0)..range.end.min(j0 + count) {
                            if mods.visible(row_at, t0 + j) {
                                let p = scores[r * n + j];
                                let values = &v[(j - j0) * dim..][..dim];
                                for (o, &x) in acc[r * dim..][..dim].iter_mut().zip(values) {
                                    *o += p * x;
                                }
                            }
                        }
                    }
                }
                continue;
            }
            for (ii, range) in ranges.iter().enumerate() {
                let (a, b) = (
                    range.start.clamp(j0, j0 + count),
                    range.end.clamp(j0, j0 + count),
                );
                if a >= b {
                    continue;
                }
                let values = &v[(a - j0) * dim..(b - j0) * dim];
                for hh in 0..group {
                    let r = hh * seq_q + ii;
                    let weights = &scores[r * n + a..];
                    let out = &mut acc[r * dim..][..dim];
                    tiles::weighted_sum(simd, weights, n, values, dim, out, tiles::Ahead::NONE);
                }
            }
        }
        for r in 0..rows {
            if l[r] > 0.0 {
                // Divided, not multiplied by 1/l: one rounding.
                let l_r = l[r] as f32;
                for x in &mut acc[r * dim..][..dim] {
                    *x /= l_r;
                }
            }
        }
    }
}
