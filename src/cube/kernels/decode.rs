//! The decode kernels: a few new queries per sequence (Lq ≤ 16) against a paged, possibly
//! quantized KV cache ([`crate::cache::KvCache`]), split over the keys (Flash-Decoding).
//!
//! Two layouts of the same computation, chosen by the host per device:
//! - [`plane_decode`] (where the device's planes reduce, as a probe finds when it opens: GPUs
//!   and lavapipe): the lanes of a plane across the head dim, every row of a KV head in every
//!   lane, each word of a cached row loaded once per cube. Its docs are on the function.
//! - [`paged_decode`] (everywhere else): rows per unit, described below.
//!
//! **Work ([`paged_decode`]).** One cube serves `heads_per_cube` KV heads (1 unless a KV head's rows leave most of
//! a plane idle) of one sequence over one split of its keys: `CUBE_POS_X` = query tile,
//! `CUBE_POS_Y` = KV heads `y · heads_per_cube ..`, `CUBE_POS_Z = split · batch + b`. A KV
//! head's `group · lq_tile` (query head, query) rows are packed `R` per unit
//! (`DecodeConfig::rows`: 1 while the rows fill a plane, up to 4 beyond, so that MQA's 32 rows
//! take one 8-lane plane on lavapipe rather than four that each repeat the loads), so all query
//! heads of a KV group run in the same cube and each dequantised lane feeds `R` rows from
//! registers. Every unit of a KV head walks the same keys (the union of the cube's rows'
//! visible keys; a row masks the ones it cannot see), so each cached word is one load for the
//! whole group — on lavapipe one scalar load per SIMD group. Where a KV head has fewer rows
//! than a plane has lanes (MHA: one row at Lq 1; GQA 32/8: four), the host packs several KV
//! heads into the cube (`heads_per_cube`, a divisor of `kv_heads`) so that the lanes that would
//! idle serve other heads; their loads then differ per lane. There is no shared memory: decode
//! has no reuse beyond the group, and rows are read straight from the pool.
//!
//! **Cache.** Row `(page · kv_heads + kv_head) · page_size + slot` of the word pool holds one
//! token of one KV head, packed per [`crate::cache::storage`]; a sequence's block table maps
//! its token `t` to page `table[t / page_size]`, looked up once per page: the kernel walks the
//! keys page by page, and a page's rows are consecutive in the pool. A row is read a whole 32-bit word at a time
//! (one f32, two f16/bf16, four int8, eight int4 lanes) and dequantized in registers
//! (`lane · scale`), never into a copy of the cache.
//!
//! **Blocks.** Keys are taken `block` at a time, held in registers (every index an unrolled
//! counter): their scores, then one branch-free online-softmax update (`α = e^{m − m'}`,
//! exactly 1 when the max did not move, folded into the P·V pass).
//!
//! **Splits.** With more than one split each cube writes an f32 partial (output, LSE) and the
//! forward kernel's `combine_splits` merges them.

use cubecl::prelude::*;

use super::math::{NEG_BIG, NEG_INFINITY_BITS, accurate_exp, accurate_ln, accurate_tanh};
use super::merge::write_row;
use crate::dsl::cube::{CubeMask, CubeScore};

/// How rows are packed; `StorageKind` as the kernel's comptime number.
pub const STORAGE_F32: u32 = 0;
pub const STORAGE_F16: u32 = 1;
pub const STORAGE_BF16: u32 = 2;
pub const STORAGE_INT8: u32 = 3;
pub const STORAGE_INT4: u32 = 4;

/// Everything that changes the generated decode code.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct DecodeConfig {
    pub head_dim: usize,
    pub group: usize,
    /// One of the `STORAGE_*` numbers.
    pub storage: u32,
    /// Words per cached row (`⌈head_dim / lanes⌉`).
    pub row_words: usize,
    /// Channels per storage word (1 for f32, 2 for f16/bf16, 4 for int8, 8 for int4).
    pub lanes: usize,
    /// Keys per register block (scored together, then one online-softmax update).
    pub block: usize,
    /// [`paged_decode`]: rows (query head, query) per unit; divides the cube's `group · lq_tile`
    /// rows. [`plane_decode`]: rows per cube (one plane).
    pub rows: usize,
    /// [`plane_decode`]: lanes per plane, across the head dim (0 for [`paged_decode`]).
    pub plane: usize,
    /// [`plane_decode`]: storage words of a row each lane loads (`⌈row_words / plane⌉`).
    pub words_per_lane: usize,
    pub left_bounded: bool,
    pub right_bounded: bool,
    pub softcap: bool,
    pub alibi: bool,
    /// A user mask mod (`crate::dsl`) is evaluated per score (its captures in `aux`).
    pub mask_mod: bool,
    /// A user score mod is applied after the built-in modifiers.
    pub score_mod: bool,
}

/// IEEE half bits (in the low 16 bits) to f32, exactly and branch-free (it runs unrolled in the
/// kernel's inner loops): normals by moving the fields, subnormals by scaling the mantissa,
/// infinities and NaNs by the all-ones exponent.
#[cube]
fn half_bits_to_f32(bits: u32) -> f32 {
    let exponent = (bits >> 10) & 0x1f;
    let mantissa = bits & 0x3ff;
    let subnormal = f32::cast_from(mantissa) * 5.960_464_5e-8f32; // 2^-24
    let special = f32::reinterpret(0x7f80_0000u32 | (mantissa << 13));
    let normal = f32::reinterpret(((exponent + 112) << 23) | (mantissa << 13));
    let magnitude = select(
        exponent == 0,
        subnormal,
        select(exponent == 31, special, normal),
    );
    select(((bits >> 15) & 1) == 1, -magnitude, magnitude)
}

/// Lane `e` of a storage word: the float value, or the integer lane of a quantized row (the
/// caller multiplies by the row's scale).
#[cube]
fn unpack(word: u32, #[comptime] e: usize, #[comptime] storage: u32) -> f32 {
    if storage == STORAGE_F32 {
        f32::reinterpret(word)
    } else if storage == STORAGE_F16 {
        half_bits_to_f32((word >> (e * 16) as u32) & 0xffff)
    } else if storage == STORAGE_BF16 {
        f32::reinterpret(((word >> (e * 16) as u32) & 0xffff) << 16)
    } else if storage == STORAGE_INT8 {
        // Two's complement byte: subtract 256 from the upper half.
        let bits = (word >> (e * 8) as u32) & 0xff;
        f32::cast_from(bits) - f32::cast_from(bits >> 7) * 256.0f32
    } else {
        let bits = (word >> (e * 4) as u32) & 0xf;
        f32::cast_from(bits) - f32::cast_from(bits >> 3) * 16.0f32
    }
}

/// One online-softmax step of row `r` over a block of `cfg.block` keys from key `start`, whose
/// raw dot products are `s[r·block ..]` (both decode layouts). Each score is scaled, capped,
/// biased (ALiBi) and masked to the row's visible keys (`lo[r] <= t < hi[r]`, `t < end`), then
/// replaced by its probability `e^{x − m'}` (0 for a hidden key); row `r`'s running max `m`,
/// sum `l` and rescale `alpha` follow. Branch-free: `α = e^{m − m'}` is exactly 1 when the max
/// did not move. `at` is the row's position for the user mods: batch entry, query head, query
/// index, query count, cached length (captures in `aux`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn softmax_step<M: CubeMask, S: CubeScore>(
    s: &mut Array<f32>,
    m: &mut Array<f32>,
    l: &mut Array<f32>,
    alpha: &mut Array<f32>,
    lo: &Array<i32>,
    hi: &Array<i32>,
    diag: &Array<i32>,
    slope: &Array<f32>,
    #[comptime] r: usize,
    start: i32,
    end: i32,
    scale: f32,
    softcap: f32,
    aux: &[u32],
    at: Array<i32>,
    #[comptime] cfg: DecodeConfig,
) {
    let block = cfg.block;
    let mut m_new = m[r];
    #[unroll]
    for j in 0..block {
        let t = start + j as i32;
        let mut x = scale * s[r * block + j];
        if cfg.softcap {
            x = softcap * accurate_tanh(x / softcap);
        }
        if cfg.alibi {
            x -= slope[r] * f32::cast_from(diag[r] - t).abs();
        }
        if cfg.score_mod {
            x = S::apply(
                aux,
                x,
                at[0],
                at[1],
                at[2],
                t,
                at[3],
                at[4],
                comptime!(M::SLOTS),
            );
        }
        let mut seen = t >= lo[r] && t < hi[r] && t < end;
        if cfg.mask_mod {
            seen = seen && M::visible(aux, at[0], at[1], at[2], t, at[3], at[4], 0u32);
        }
        x = select(seen, x, NEG_BIG);
        s[r * block + j] = x;
        m_new = max(m_new, x);
    }
    alpha[r] = accurate_exp(m[r] - m_new);
    let mut sum = 0.0f32;
    #[unroll]
    for j in 0..block {
        let x = s[r * block + j];
        let p = select(x > NEG_BIG, accurate_exp(x - m_new), 0.0f32);
        s[r * block + j] = p;
        sum += p;
    }
    l[r] = alpha[r] * l[r] + sum;
    m[r] = m_new;
}

/// Decode attention over a paged cache. `q`: `[B, HQ, Lq, D]` contiguous; sequence `b` is the
/// cache's slot `seq_slots[b]`, of `tables[slot]` tokens in the pages listed from
/// `tables[table_base + slot · table_stride]`; scales are f32 bits (one word per row; a dummy for
/// float storage); `o`: `[B, HQ, Lq, D]`, `lse`: `[B, HQ, Lq]`. Only keys in `key_lo..key_hi`
/// are read (positions keep their meaning): the whole cache, or the keys of one partial.
/// `bottom_right` (1 or 0) places the diagonal at `i + len − Lq` or at `i`, `lq_tile` is the
/// number of queries per cube and head, and `partial_out` (1 or 0) writes the f32 partial state
/// (split launches, and partials) instead of the final output: runtime numbers, as lengths and
/// window sides are, so that one compiled kernel serves both alignments, every query count and
/// both outputs (each distinct comptime configuration costs a compile).
///
/// A KV head's rows are `group · lq_tile` (query head, query) pairs, row `r` being head
/// `r / lq_tile`, query `r % lq_tile` of the tile; the cube's units are `heads_per_cube` runs of
/// `units_per_head`, one run per KV head, and unit `u` of a run owns rows `u · R .. u · R + R`
/// (`R = cfg.rows`, which divides the row count). Every KV head of a cube walks the same keys
/// (the loop bounds depend on the sequence, split and queries only), so branches stay uniform;
/// only the addresses of the rows read differ between the runs. Each key's lanes are dequantised once per unit
/// and feed its `R` rows from registers.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn paged_decode<F: Float, M: CubeMask, S: CubeScore>(
    q: &[F],
    k_words: &[u32],
    v_words: &[u32],
    k_scale: &[u32],
    v_scale: &[u32],
    tables: &[u32],
    seq_slots: &[u32],
    slopes: &[f32],
    aux: &[u32],
    o: &mut [F],
    lse: &mut [f32],
    o_partial: &mut [f32],
    lse_partial: &mut [f32],
    q_heads: u32,
    seq_q: u32,
    kv_heads: u32,
    page_size: u32,
    table_base: u32,
    table_stride: u32,
    lq_tile: u32,
    heads_per_cube: u32,
    bottom_right: u32,
    left: i32,
    right: i32,
    scale: f32,
    softcap: f32,
    batch_size: u32,
    key_lo: u32,
    key_hi: u32,
    keys_per_split: u32,
    partial_out: u32,
    #[comptime] cfg: DecodeConfig,
) {
    let dim = cfg.head_dim;
    let row_words = cfg.row_words;
    let lanes = cfg.lanes;
    let block = cfg.block;
    let rows = cfg.rows;
    let padded = row_words * lanes;
    let quantized = cfg.storage == STORAGE_INT8 || cfg.storage == STORAGE_INT4;

    // `heads_per_cube` KV heads share the cube, each `units_per_head` consecutive units.
    let units_per_head = CUBE_DIM / heads_per_cube;
    let kv_head = CUBE_POS_Y * heads_per_cube + UNIT_POS / units_per_head;
    let head_unit = UNIT_POS % units_per_head;
    let batch = CUBE_POS_Z % batch_size;
    let split = CUBE_POS_Z / batch_size;
    let first_query = CUBE_POS_X * lq_tile;
    let last_query = min(seq_q, first_query + lq_tile) - 1;

    let slot = seq_slots[batch as usize];
    let len = tables[slot as usize];
    let shift = bottom_right as i32 * (len as i32 - seq_q as i32);
    // This split's keys, then the cube's (the union over its rows, whose diagonals grow with
    // the query index). Every unit walks the cube's keys, so each cached word is one load for
    // the whole group; a row masks the keys it cannot see.
    let split_lo = (key_lo + split * keys_per_split) as i32;
    let split_hi = min(min(len, key_hi), key_lo + (split + 1) * keys_per_split) as i32;
    let mut band_lo = split_lo;
    let mut band_hi = split_hi;
    if cfg.left_bounded {
        band_lo = max(band_lo, first_query as i32 + shift - left);
    }
    if cfg.right_bounded {
        band_hi = min(band_hi, last_query as i32 + shift + right + 1);
    }

    // Per row (indexed by unrolled counters only): its query, diagonal, visible keys
    // `lo..hi` (within the band: `band_lo <= lo`, `hi <= band_hi`), slope and softmax state.
    let mut head = Array::<u32>::new(rows);
    let mut query = Array::<u32>::new(rows);
    let mut diag = Array::<i32>::new(rows);
    let mut lo = Array::<i32>::new(rows);
    let mut hi = Array::<i32>::new(rows);
    let mut slope = Array::<f32>::new(rows);
    let mut m = Array::<f32>::new(rows);
    let mut l = Array::<f32>::new(rows);
    let mut alpha = Array::<f32>::new(rows);
    // The query rows and the f32 accumulators, `padded` channels each (zeros past `dim`).
    let mut q_row = Array::<f32>::new(rows * padded);
    let mut acc = Array::<f32>::new(rows * padded);
    #[unroll]
    for r in 0..rows {
        let row = head_unit * rows as u32 + r as u32;
        let h = kv_head * cfg.group as u32 + row / lq_tile;
        // A row past the last query computes a copy of it (in bounds), which is never written.
        let qi = first_query + row % lq_tile;
        let i = min(qi, seq_q - 1);
        head[r] = h;
        query[r] = qi;
        let d = i as i32 + shift;
        diag[r] = d;
        let mut row_lo = split_lo;
        let mut row_hi = split_hi;
        if cfg.left_bounded {
            row_lo = max(row_lo, d - left);
        }
        if cfg.right_bounded {
            row_hi = min(row_hi, d + right + 1);
        }
        lo[r] = row_lo;
        hi[r] = row_hi;
        let mut sl = 0.0f32;
        if cfg.alibi {
            sl = slopes[h as usize];
        }
        slope[r] = sl;
        m[r] = NEG_BIG;
        l[r] = 0.0f32;
        let q_at = (((batch * q_heads + h) * seq_q + i) as usize) * dim;
        for c in 0..padded {
            let mut x = 0.0f32;
            if c < dim {
                x = f32::cast_from(q[q_at + c]);
            }
            q_row[r * padded + c] = x;
            acc[r * padded + c] = 0.0f32;
        }
    }
    let table_at = table_base + slot * table_stride;

    // Registers (indexed by unrolled counters only): a block's scores per row, its keys' scales,
    // words and dequantised lanes.
    let mut s = Array::<f32>::new(rows * block);
    let mut row_scale = Array::<f32>::new(block);
    let mut words = Array::<u32>::new(block);
    let mut lane = Array::<f32>::new(block);

    // Page by page: one block-table lookup per page; within it, blocks of `block` keys whose
    // rows are consecutive in the pool. A block's keys outside the band, or past the page's end,
    // read a row of the same page (in the pool: slots are clamped to the page) and are masked.
    let mut page_start = band_lo - band_lo % page_size as i32;
    loop {
        if page_start >= band_hi {
            break;
        }
        let page_end = min(page_start + page_size as i32, band_hi);
        let page = tables[(table_at + page_start as u32 / page_size) as usize];
        let page_row = (page * kv_heads + kv_head) * page_size;
        let last_slot = page_size - 1;
        let first = max(band_lo, page_start);
        let mut start = first - (first - page_start) % block as i32;
        loop {
            if start >= page_end {
                break;
            }
            let slot = (start - page_start) as u32;
            #[unroll]
            for j in 0..block {
                let mut k_row_scale = 1.0f32;
                if quantized {
                    let row = page_row + min(slot + j as u32, last_slot);
                    k_row_scale = f32::reinterpret(k_scale[row as usize]);
                }
                row_scale[j] = k_row_scale;
                #[unroll]
                for r in 0..rows {
                    s[r * block + j] = 0.0f32;
                }
            }
            // Scores: one load per cached word, its lanes dequantised once for all rows.
            for w in 0..row_words {
                #[unroll]
                for j in 0..block {
                    let row = page_row + min(slot + j as u32, last_slot);
                    words[j] = k_words[(row * row_words as u32 + w as u32) as usize];
                }
                #[unroll]
                for e in 0..lanes {
                    #[unroll]
                    for j in 0..block {
                        lane[j] = unpack(words[j], e, cfg.storage) * row_scale[j];
                    }
                    #[unroll]
                    for r in 0..rows {
                        let qc = q_row[r * padded + w * lanes + e];
                        #[unroll]
                        for j in 0..block {
                            s[r * block + j] += qc * lane[j];
                        }
                    }
                }
            }
            #[unroll]
            for r in 0..rows {
                let mut at = Array::<i32>::new(5usize);
                at[0] = batch as i32;
                at[1] = head[r] as i32;
                at[2] = query[r] as i32;
                at[3] = seq_q as i32;
                at[4] = len as i32;
                softmax_step::<M, S>(
                    &mut s, &mut m, &mut l, &mut alpha, &lo, &hi, &diag, &slope, r, start,
                    page_end, scale, softcap, aux, at, cfg,
                );
            }
            #[unroll]
            for j in 0..block {
                let mut v_row_scale = 1.0f32;
                if quantized {
                    let row = page_row + min(slot + j as u32, last_slot);
                    v_row_scale = f32::reinterpret(v_scale[row as usize]);
                }
                row_scale[j] = v_row_scale;
            }
            // acc ← α·acc + P·V; a key a row cannot see adds nothing (not 0 · its value).
            for w in 0..row_words {
                #[unroll]
                for j in 0..block {
                    let row = page_row + min(slot + j as u32, last_slot);
                    words[j] = v_words[(row * row_words as u32 + w as u32) as usize];
                }
                #[unroll]
                for e in 0..lanes {
                    let c = w * lanes + e;
                    #[unroll]
                    for j in 0..block {
                        lane[j] = unpack(words[j], e, cfg.storage) * row_scale[j];
                    }
                    #[unroll]
                    for r in 0..rows {
                        let mut a = alpha[r] * acc[r * padded + c];
                        #[unroll]
                        for j in 0..block {
                            let p = s[r * block + j];
                            a += select(p > 0.0f32, p * lane[j], 0.0f32);
                        }
                        acc[r * padded + c] = a;
                    }
                }
            }
            start += block as i32;
        }
        page_start += page_size as i32;
    }

    let out_rows = (batch_size * q_heads * seq_q) as usize;
    #[unroll]
    for r in 0..rows {
        if query[r] < seq_q {
            let out_row = ((batch * q_heads + head[r]) * seq_q + query[r]) as usize;
            let partial_row = split as usize * out_rows + out_row;
            if partial_out == 1 {
                write_row::<F>(
                    &acc,
                    r * padded,
                    m[r],
                    l[r],
                    out_row,
                    partial_row,
                    o,
                    lse,
                    o_partial,
                    lse_partial,
                    dim,
                    true,
                );
            } else {
                write_row::<F>(
                    &acc,
                    r * padded,
                    m[r],
                    l[r],
                    out_row,
                    partial_row,
                    o,
                    lse,
                    o_partial,
                    lse_partial,
                    dim,
                    false,
                );
            }
        }
    }
}

/// Copies whole rows of `row_words` words from `src` (packed, row after row) to the rows
/// `rows[r]` of `dst`: how appended cache rows reach the device copy. One unit per word.
#[cube(launch)]
pub fn scatter_rows(
    src: &[u32],
    rows: &[u32],
    dst: &mut [u32],
    count: u32,
    #[comptime] row_words: usize,
) {
    // A 2-D grid of 1-D cubes (one dimension of the grid may be too small for every word).
    let at = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    let words = row_words as u32;
    if at < count * words {
        let r = at / words;
        let w = at % words;
        dst[(rows[r as usize] * words + w) as usize] = src[at as usize];
    }
}

/// Decode with the lanes of a plane across the head dimension: the layout for devices whose
/// planes reduce (`plane_sum`) — the default wherever the host's probe found they do.
///
/// **Work.** One cube is one plane of `cfg.plane` lanes serving `cfg.rows` (query, query head)
/// rows of one KV head, of one sequence, over one split of its keys: `CUBE_POS_X` = row tile,
/// `CUBE_POS_Y` = KV head, `CUBE_POS_Z = split · batch + b`. Row `t · rows + i` of a KV head is
/// query `r / group`, query head `kv_head · group + r % group` (the group's heads of one query,
/// then the next query's: FlashAttention-3's "pack GQA"); rows past `group · seq_q` repeat the
/// last one and write nothing.
///
/// **Lanes over the head dim.** Lane `p` owns the storage words `p, p + plane, …` of every row
/// (`cfg.words_per_lane` of them, the last clamped into the row): it loads those words of each
/// key — consecutive words across the plane, so every word of a row is loaded once for all of
/// the cube's rows and the loads coalesce on a GPU — dequantises their lanes in registers, and
/// keeps the matching channels of every row's query and accumulator. A score is the plane's sum
/// of the lanes' partial dot products (`plane_sum`); the online softmax then runs alike in
/// every lane, and P·V needs no exchange: each lane accumulates its own channels. Every array
/// is indexed by unrolled counters only, so it lives in registers (on lavapipe, a run-time
/// index would send it to per-lane scratch memory, a loop over the SIMD lanes per access).
///
/// Cache layout, pages, blocks, masks and splits as in [`paged_decode`].
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn plane_decode<F: Float, M: CubeMask, S: CubeScore>(
    q: &[F],
    k_words: &[u32],
    v_words: &[u32],
    k_scale: &[u32],
    v_scale: &[u32],
    tables: &[u32],
    seq_slots: &[u32],
    slopes: &[f32],
    aux: &[u32],
    o: &mut [F],
    lse: &mut [f32],
    o_partial: &mut [f32],
    lse_partial: &mut [f32],
    q_heads: u32,
    seq_q: u32,
    kv_heads: u32,
    page_size: u32,
    table_base: u32,
    table_stride: u32,
    bottom_right: u32,
    left: i32,
    right: i32,
    scale: f32,
    softcap: f32,
    batch_size: u32,
    key_lo: u32,
    key_hi: u32,
    keys_per_split: u32,
    partial_out: u32,
    #[comptime] cfg: DecodeConfig,
) {
    let dim = cfg.head_dim as u32;
    let row_words = cfg.row_words as u32;
    let lanes = cfg.lanes;
    let block = cfg.block;
    let rows = cfg.rows;
    let plane = cfg.plane as u32;
    let per_lane = cfg.words_per_lane;
    let channels = per_lane * lanes; // a lane's channels of one row
    let quantized = cfg.storage == STORAGE_INT8 || cfg.storage == STORAGE_INT4;

    let lane = UNIT_POS_PLANE;
    let kv_head = CUBE_POS_Y;
    let batch = CUBE_POS_Z % batch_size;
    let split = CUBE_POS_Z / batch_size;
    let all_rows = cfg.group as u32 * seq_q;

    let slot = seq_slots[batch as usize];
    let len = tables[slot as usize];
    let shift = bottom_right as i32 * (len as i32 - seq_q as i32);
    let split_lo = (key_lo + split * keys_per_split) as i32;
    let split_hi = min(min(len, key_hi), key_lo + (split + 1) * keys_per_split) as i32;

    // The lane's words of a row (`word[k]`, clamped into the row) and their first channels.
    let mut word = Array::<u32>::new(per_lane);
    let mut first_channel = Array::<u32>::new(per_lane);
    #[unroll]
    for k in 0..per_lane {
        let w = lane + k as u32 * plane;
        word[k] = min(w, row_words - 1);
        first_channel[k] = w * lanes as u32;
    }

    // Per row (indexed by unrolled counters only): query, head, diagonal, visible keys, slope,
    // softmax state, and the lane's channels of its query (zeros past the head dim) and
    // accumulator.
    let mut head = Array::<u32>::new(rows);
    let mut query = Array::<u32>::new(rows);
    let mut diag = Array::<i32>::new(rows);
    let mut lo = Array::<i32>::new(rows);
    let mut hi = Array::<i32>::new(rows);
    let mut slope = Array::<f32>::new(rows);
    let mut m = Array::<f32>::new(rows);
    let mut l = Array::<f32>::new(rows);
    let mut alpha = Array::<f32>::new(rows);
    let mut q_part = Array::<f32>::new(rows * channels);
    let mut acc = Array::<f32>::new(rows * channels);
    let mut band_lo = split_hi;
    let mut band_hi = split_lo;
    #[unroll]
    for i in 0..rows {
        let tile_row = CUBE_POS_X * rows as u32 + i as u32;
        let r = min(tile_row, all_rows - 1);
        let h = kv_head * cfg.group as u32 + r % cfg.group as u32;
        let qi = r / cfg.group as u32;
        head[i] = h;
        // A row past the last one computes a copy of it and is never written.
        query[i] = select(tile_row < all_rows, qi, seq_q);
        let d = qi as i32 + shift;
        diag[i] = d;
        let mut row_lo = split_lo;
        let mut row_hi = split_hi;
        if cfg.left_bounded {
            row_lo = max(row_lo, d - left);
        }
        if cfg.right_bounded {
            row_hi = min(row_hi, d + right + 1);
        }
        lo[i] = row_lo;
        hi[i] = row_hi;
        band_lo = min(band_lo, row_lo);
        band_hi = max(band_hi, row_hi);
        let mut sl = 0.0f32;
        if cfg.alibi {
            sl = slopes[h as usize];
        }
        slope[i] = sl;
        m[i] = NEG_BIG;
        l[i] = 0.0f32;
        let q_at = ((batch * q_heads + h) * seq_q + qi) * dim;
        #[unroll]
        for k in 0..per_lane {
            #[unroll]
            for e in 0..lanes {
                let c = first_channel[k] + e as u32;
                let mut x = 0.0f32;
                if c < dim {
                    x = f32::cast_from(q[(q_at + c) as usize]);
                }
                q_part[i * channels + k * lanes + e] = x;
                acc[i * channels + k * lanes + e] = 0.0f32;
            }
        }
    }
    let table_at = table_base + slot * table_stride;

    // A block's keys: their scales, dequantised channels (the lane's), and scores.
    let mut row_scale = Array::<f32>::new(block);
    let mut kv = Array::<f32>::new(block * channels);
    let mut s = Array::<f32>::new(rows * block);

    let mut page_start = band_lo - band_lo % page_size as i32;
    loop {
        if page_start >= band_hi {
            break;
        }
        let page_end = min(page_start + page_size as i32, band_hi);
        let page = tables[(table_at + page_start as u32 / page_size) as usize];
        let page_row = (page * kv_heads + kv_head) * page_size;
        let last_slot = page_size - 1;
        let first = max(band_lo, page_start);
        let mut start = first - (first - page_start) % block as i32;
        loop {
            if start >= page_end {
                break;
            }
            let slot = (start - page_start) as u32;
            // K: each lane its words of each key, dequantised; partial dots; the plane's sums.
            #[unroll]
            for j in 0..block {
                let key_row = page_row + min(slot + j as u32, last_slot);
                let mut k_row_scale = 1.0f32;
                if quantized {
                    k_row_scale = f32::reinterpret(k_scale[key_row as usize]);
                }
                #[unroll]
                for k in 0..per_lane {
                    let bits = k_words[(key_row * row_words + word[k]) as usize];
                    #[unroll]
                    for e in 0..lanes {
                        kv[j * channels + k * lanes + e] =
                            unpack(bits, e, cfg.storage) * k_row_scale;
                    }
                }
            }
            #[unroll]
            for i in 0..rows {
                #[unroll]
                for j in 0..block {
                    let mut dot = 0.0f32;
                    #[unroll]
                    for c in 0..channels {
                        dot += q_part[i * channels + c] * kv[j * channels + c];
                    }
                    s[i * block + j] = plane_sum(dot);
                }
            }
            // Scores and the online softmax, alike in every lane.
            #[unroll]
            for i in 0..rows {
                let mut at = Array::<i32>::new(5usize);
                at[0] = batch as i32;
                at[1] = head[i] as i32;
                at[2] = query[i] as i32;
                at[3] = seq_q as i32;
                at[4] = len as i32;
                softmax_step::<M, S>(
                    &mut s, &mut m, &mut l, &mut alpha, &lo, &hi, &diag, &slope, i, start,
                    page_end, scale, softcap, aux, at, cfg,
                );
            }
            // V: each lane its channels; acc ← α·acc + P·V, a key a row cannot see adding
            // nothing (not 0 · its value).
            #[unroll]
            for j in 0..block {
                let key_row = page_row + min(slot + j as u32, last_slot);
                let mut v_row_scale = 1.0f32;
                if quantized {
                    v_row_scale = f32::reinterpret(v_scale[key_row as usize]);
                }
                row_scale[j] = v_row_scale;
                #[unroll]
                for k in 0..per_lane {
                    let bits = v_words[(key_row * row_words + word[k]) as usize];
                    #[unroll]
                    for e in 0..lanes {
                        kv[j * channels + k * lanes + e] =
                            unpack(bits, e, cfg.storage) * v_row_scale;
                    }
                }
            }
            #[unroll]
            for i in 0..rows {
                #[unroll]
                for c in 0..channels {
                    let mut a = alpha[i] * acc[i * channels + c];
                    #[unroll]
                    for j in 0..block {
                        let p = s[i * block + j];
                        a += select(p > 0.0f32, p * kv[j * channels + c], 0.0f32);
                    }
                    acc[i * channels + c] = a;
                }
            }
            start += block as i32;
        }
        page_start += page_size as i32;
    }

    // Each lane writes its channels of each row; lane 0 the row's LSE or softmax state.
    let out_rows = batch_size * q_heads * seq_q;
    #[unroll]
    for i in 0..rows {
        if query[i] < seq_q {
            let out_row = (batch * q_heads + head[i]) * seq_q + query[i];
            let partial_row = split * out_rows + out_row;
            let denom = select(l[i] > 0.0f32, l[i], 1.0f32);
            #[unroll]
            for k in 0..per_lane {
                #[unroll]
                for e in 0..lanes {
                    let c = first_channel[k] + e as u32;
                    if c < dim {
                        let x = acc[i * channels + k * lanes + e] / denom;
                        if partial_out == 1 {
                            o_partial[(partial_row * dim + c) as usize] = x;
                        } else {
                            o[(out_row * dim + c) as usize] = F::cast_from(x);
                        }
                    }
                }
            }
            if lane == 0 {
                if partial_out == 1 {
                    lse_partial[(2 * partial_row) as usize] = m[i];
                    lse_partial[(2 * partial_row + 1) as usize] = l[i];
                } else {
                    lse[out_row as usize] = if l[i] > 0.0f32 {
                        m[i] + accurate_ln(l[i])
                    } else {
                        f32::reinterpret(NEG_INFINITY_BITS)
                    };
                }
            }
        }
    }
}

/// The memory floor of a decode step, for the benches to measure decode against: every cached
/// word and scale of each sequence's keys read once, in [`plane_decode`]'s layout — `lanes`
/// units per cube, unit `p` reading words `p, p + lanes, …` of each row, keys walked page by page
/// with one block-table lookup per page — and nothing else (the words fold into `sink`, one word
/// per unit, so that the reads are not optimised away). It uses no plane operations, so every
/// device runs it. `CUBE_POS_X` = chunk of `keys_per_cube` tokens, `CUBE_POS_Y` = KV head,
/// `CUBE_POS_Z` = sequence.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn stream_cache(
    k_words: &[u32],
    v_words: &[u32],
    k_scale: &[u32],
    v_scale: &[u32],
    tables: &[u32],
    seq_slots: &[u32],
    sink: &mut [u32],
    kv_heads: u32,
    page_size: u32,
    table_base: u32,
    table_stride: u32,
    keys_per_cube: u32,
    #[comptime] row_words: usize,
    #[comptime] lanes: usize,
    #[comptime] quantized: bool,
) {
    let kv_head = CUBE_POS_Y;
    let slot = seq_slots[CUBE_POS_Z as usize];
    let len = tables[slot as usize];
    let lo = (CUBE_POS_X * keys_per_cube) as i32;
    let hi = min(len, (CUBE_POS_X + 1) * keys_per_cube) as i32;
    let per_lane = row_words.div_ceil(lanes);
    let mut word = Array::<u32>::new(per_lane);
    #[unroll]
    for k in 0..per_lane {
        word[k] = min(UNIT_POS + (k * lanes) as u32, row_words as u32 - 1);
    }
    let mut folded = 0u32;
    let mut page_start = lo - lo % page_size as i32;
    loop {
        if page_start >= hi {
            break;
        }
        let page_end = min(page_start + page_size as i32, hi);
        let page =
            tables[(table_base + slot * table_stride + page_start as u32 / page_size) as usize];
        let page_row = (page * kv_heads + kv_head) * page_size;
        let mut t = max(lo, page_start);
        loop {
            if t >= page_end {
                break;
            }
            let row = page_row + (t - page_start) as u32;
            if quantized {
                folded ^= k_scale[row as usize] ^ v_scale[row as usize];
            }
            #[unroll]
            for k in 0..per_lane {
                let at = (row * row_words as u32 + word[k]) as usize;
                folded ^= k_words[at] ^ v_words[at];
            }
            t += 1;
        }
        page_start += page_size as i32;
    }
    let cube = (CUBE_POS_Z * CUBE_COUNT_Y + CUBE_POS_Y) * CUBE_COUNT_X + CUBE_POS_X;
    sink[(cube * CUBE_DIM_X + UNIT_POS) as usize] = folded;
}
