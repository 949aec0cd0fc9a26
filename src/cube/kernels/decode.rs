//! The decode kernel: a few new queries per sequence (Lq ≤ 16) against a paged, possibly
//! quantized KV cache ([`crate::cache::KvCache`]), split over the keys (Flash-Decoding).
//!
//! **Work.** One cube serves one KV head of one sequence over one split of its keys:
//! `CUBE_POS_X` = query tile, `CUBE_POS_Y` = KV head, `CUBE_POS_Z = split · batch + b`. Its
//! `group · lq_tile` units each own one (query head, query) row, so all query heads of a KV
//! group run in the same cube. Every unit walks the same keys (the union of the cube's rows'
//! visible keys; a row masks the ones it cannot see), so each cached word is one load for the
//! whole group — on lavapipe one scalar load per SIMD group. There is no shared memory: decode
//! has no reuse beyond the group, and rows are read straight from the pool.
//!
//! **Cache.** Row `(page · kv_heads + kv_head) · page_size + slot` of the word pool holds one
//! token of one KV head, packed per [`crate::cache::storage`]; a sequence's block table maps
//! its token `t` to page `table[t / page_size]`. A row is read a whole 32-bit word at a time
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

use super::math::{NEG_BIG, accurate_exp, accurate_tanh};
use super::merge::write_row;

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
    pub left_bounded: bool,
    pub right_bounded: bool,
    pub softcap: bool,
    pub alibi: bool,
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

/// Decode attention over a paged cache. `q`: `[B, HQ, Lq, D]` contiguous; `block_table`:
/// `[B, table_stride]`; `seq_lens`: `[B]`; scales are f32 bits (one word per row; a dummy for
/// float storage); `o`: `[B, HQ, Lq, D]`, `lse`: `[B, HQ, Lq]`. Only keys in `key_lo..key_hi`
/// are read (positions keep their meaning): the whole cache, or the keys of one partial.
/// `bottom_right` (1 or 0) places the diagonal at `i + len − Lq` or at `i`, `lq_tile` is the
/// number of queries per cube and head, and `partial_out` (1 or 0) writes the f32 partial state
/// (split launches, and partials) instead of the final output: runtime numbers, as lengths and
/// window sides are, so that one compiled kernel serves both alignments, every query count and
/// both outputs (each distinct comptime configuration costs a compile).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn paged_decode<F: Float>(
    q: &[F],
    k_words: &[u32],
    v_words: &[u32],
    k_scale: &[u32],
    v_scale: &[u32],
    block_table: &[u32],
    seq_lens: &[u32],
    slopes: &[f32],
    o: &mut [F],
    lse: &mut [f32],
    o_partial: &mut [f32],
    lse_partial: &mut [f32],
    q_heads: u32,
    seq_q: u32,
    kv_heads: u32,
    page_size: u32,
    table_stride: u32,
    lq_tile: u32,
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
    let padded = row_words * lanes;
    let quantized = cfg.storage == STORAGE_INT8 || cfg.storage == STORAGE_INT4;

    let kv_head = CUBE_POS_Y;
    let batch = CUBE_POS_Z % batch_size;
    let split = CUBE_POS_Z / batch_size;
    let head = kv_head * cfg.group as u32 + UNIT_POS / lq_tile;
    let first_query = CUBE_POS_X * lq_tile;
    let query = first_query + UNIT_POS % lq_tile;
    let active = query < seq_q;
    // Units past the last query compute a copy of it (in bounds), which is never written.
    let i = min(query, seq_q - 1);
    let last_query = min(seq_q, first_query + lq_tile) - 1;

    let len = seq_lens[batch as usize];
    let shift = bottom_right as i32 * (len as i32 - seq_q as i32);
    let diag = i as i32 + shift;
    // This split's keys, then this row's visible ones and the cube's (the union over its rows,
    // whose diagonals grow with the query index). Every unit walks the cube's keys, so each
    // cached word is one load for the whole group; a row masks the keys it cannot see.
    let split_lo = (key_lo + split * keys_per_split) as i32;
    let split_hi = min(min(len, key_hi), key_lo + (split + 1) * keys_per_split) as i32;
    let mut lo = split_lo;
    let mut hi = split_hi;
    let mut band_lo = split_lo;
    let mut band_hi = split_hi;
    if cfg.left_bounded {
        lo = max(lo, diag - left);
        band_lo = max(band_lo, first_query as i32 + shift - left);
    }
    if cfg.right_bounded {
        hi = min(hi, diag + right + 1);
        band_hi = min(band_hi, last_query as i32 + shift + right + 1);
    }

    // The query row and the f32 accumulator, padded to whole words with zeros.
    let mut q_row = Array::<f32>::new(padded);
    let mut acc = Array::<f32>::new(padded);
    let q_at = (((batch * q_heads + head) * seq_q + i) as usize) * dim;
    for c in 0..padded {
        let mut x = 0.0f32;
        if c < dim {
            x = f32::cast_from(q[q_at + c]);
        }
        q_row[c] = x;
        acc[c] = 0.0f32;
    }
    let mut slope = 0.0f32;
    if cfg.alibi {
        slope = slopes[head as usize];
    }
    let mut m = NEG_BIG.runtime();
    let mut l = 0.0f32;
    let table_at = batch * table_stride;

    // Registers (indexed by unrolled counters only).
    let mut s = Array::<f32>::new(block);
    let mut row_at = Array::<u32>::new(block);
    let mut row_scale = Array::<f32>::new(block);
    let mut words = Array::<u32>::new(block);

    let mut start = band_lo;
    loop {
        if start >= band_hi {
            break;
        }
        // The block's cached rows: a key past the band reads the band's first (in bounds, and
        // masked below).
        #[unroll]
        for j in 0..block {
            let t = start + j as i32;
            let token = select(t < band_hi, t, band_lo) as u32;
            let page = block_table[(table_at + token / page_size) as usize];
            let row = (page * kv_heads + kv_head) * page_size + token % page_size;
            row_at[j] = row;
            let mut k_row_scale = 1.0f32;
            if quantized {
                k_row_scale = f32::reinterpret(k_scale[row as usize]);
            }
            row_scale[j] = k_row_scale;
            s[j] = 0.0f32;
        }
        // Scores: one load per cached word, dequantised lane by lane in registers.
        for w in 0..row_words {
            #[unroll]
            for j in 0..block {
                words[j] = k_words[(row_at[j] * row_words as u32 + w as u32) as usize];
            }
            #[unroll]
            for e in 0..lanes {
                let qc = q_row[w * lanes + e];
                #[unroll]
                for j in 0..block {
                    s[j] += qc * (unpack(words[j], e, cfg.storage) * row_scale[j]);
                }
            }
        }
        let mut m_new = m;
        #[unroll]
        for j in 0..block {
            let t = start + j as i32;
            let mut x = scale * s[j];
            if cfg.softcap {
                x = softcap * accurate_tanh(x / softcap);
            }
            if cfg.alibi {
                x -= slope * f32::cast_from(diag - t).abs();
            }
            x = select(t >= lo && t < hi, x, NEG_BIG);
            s[j] = x;
            m_new = max(m_new, x);
        }
        // Branch-free online softmax: α is exactly 1 when the max did not move.
        let alpha = accurate_exp(m - m_new);
        let mut sum = 0.0f32;
        #[unroll]
        for j in 0..block {
            let x = s[j];
            let p = select(x > NEG_BIG, accurate_exp(x - m_new), 0.0f32);
            s[j] = p;
            sum += p;
        }
        l = alpha * l + sum;
        m = m_new;
        #[unroll]
        for j in 0..block {
            let mut v_row_scale = 1.0f32;
            if quantized {
                v_row_scale = f32::reinterpret(v_scale[row_at[j] as usize]);
            }
            row_scale[j] = v_row_scale;
        }
        // acc ← α·acc + P·V; a key the row cannot see adds nothing (not 0 · its value).
        for w in 0..row_words {
            #[unroll]
            for j in 0..block {
                words[j] = v_words[(row_at[j] * row_words as u32 + w as u32) as usize];
            }
            #[unroll]
            for e in 0..lanes {
                let c = w * lanes + e;
                let mut a = alpha * acc[c];
                #[unroll]
                for j in 0..block {
                    let p = s[j];
                    a += select(
                        p > 0.0f32,
                        p * (unpack(words[j], e, cfg.storage) * row_scale[j]),
                        0.0f32,
                    );
                }
                acc[c] = a;
            }
        }
        start += block as i32;
    }

    if active {
        let out_row = ((batch * q_heads + head) * seq_q + i) as usize;
        let rows = (batch_size * q_heads * seq_q) as usize;
        let partial_row = split as usize * rows + out_row;
        if partial_out == 1 {
            write_row::<F>(
                &acc,
                0usize,
                m,
                l,
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
                0usize,
                m,
                l,
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
