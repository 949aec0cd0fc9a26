//! The decode kernel: a few new queries per sequence (Lq ≤ 16) against a paged, possibly
//! quantized KV cache ([`crate::cache::KvCache`]), split over the keys (Flash-Decoding).
//!
//! **Work.** One cube serves one KV head of one sequence over one split of its keys:
//! `CUBE_POS_X` = query tile, `CUBE_POS_Y` = KV head, `CUBE_POS_Z = split · batch + b`. Its
//! `group · lq_tile` units each own one (query head, query) row, so all query heads of a KV
//! group run in the same cube and each cached row is fetched once per group (the units of
//! the cube read the same row together; there is no shared memory — decode has no reuse
//! beyond the group, and the rows are read straight from the pool).
//!
//! **Cache.** Row `(page · kv_heads + kv_head) · page_size + slot` of the word pool holds one
//! token of one KV head, packed per [`crate::cache::storage`]; a sequence's block table maps
//! its token `t` to page `table[t / page_size]`. Quantized rows are dequantized in registers,
//! channel by channel (`lane · scale`), never into a copy of the cache.
//!
//! **Masks** are per row: each unit loops exactly over its visible keys within its split
//! (no mask test in the loop). Keys are taken in chunks of `block`: their scores first, then one
//! online-softmax rescale per chunk.
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
    /// Keys scored before each online-softmax rescale.
    pub block: usize,
    pub left_bounded: bool,
    pub right_bounded: bool,
    pub softcap: bool,
    pub alibi: bool,
}

/// IEEE half bits (in the low 16 bits) to f32, exactly: normals by moving the fields,
/// subnormals by scaling the mantissa, infinities and NaNs by the all-ones exponent.
#[cube]
fn half_bits_to_f32(bits: u32) -> f32 {
    let sign = (bits >> 15) & 1;
    let exponent = (bits >> 10) & 0x1f;
    let mantissa = bits & 0x3ff;
    let magnitude = if exponent == 0 {
        f32::cast_from(mantissa) * 5.960_464_5e-8f32 // 2^-24
    } else if exponent == 31 {
        f32::reinterpret(0x7f80_0000u32 | (mantissa << 13))
    } else {
        f32::reinterpret(((exponent + 112) << 23) | (mantissa << 13))
    };
    if sign == 1 { -magnitude } else { magnitude }
}

/// Channel `c` of the row starting at word `base`: the float value, or the integer lane of a
/// quantized row (the caller multiplies by the row's scale).
#[cube]
fn lane(words: &[u32], base: usize, c: usize, #[comptime] storage: u32) -> f32 {
    if storage == STORAGE_F32 {
        f32::reinterpret(words[base + c])
    } else if storage == STORAGE_F16 {
        let word = words[base + c / 2];
        half_bits_to_f32((word >> (((c % 2) * 16) as u32)) & 0xffff)
    } else if storage == STORAGE_BF16 {
        let word = words[base + c / 2];
        f32::reinterpret(((word >> (((c % 2) * 16) as u32)) & 0xffff) << 16)
    } else if storage == STORAGE_INT8 {
        // Two's complement byte: subtract 256 from the upper half.
        let bits = (words[base + c / 4] >> (((c % 4) * 8) as u32)) & 0xff;
        f32::cast_from(bits) - f32::cast_from(bits >> 7) * 256.0f32
    } else {
        let bits = (words[base + c / 8] >> (((c % 8) * 4) as u32)) & 0xf;
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
    let quantized = cfg.storage == STORAGE_INT8 || cfg.storage == STORAGE_INT4;

    let kv_head = CUBE_POS_Y;
    let batch = CUBE_POS_Z % batch_size;
    let split = CUBE_POS_Z / batch_size;
    let head = kv_head * cfg.group as u32 + UNIT_POS / lq_tile;
    let i = CUBE_POS_X * lq_tile + UNIT_POS % lq_tile;

    if i < seq_q {
        let len = seq_lens[batch as usize];
        let diag = i as i32 + bottom_right as i32 * (len as i32 - seq_q as i32);
        // This row's visible keys within this split of the keys `key_lo..key_hi`.
        let mut lo = (key_lo + split * keys_per_split) as i32;
        let mut hi = min(min(len, key_hi), key_lo + (split + 1) * keys_per_split) as i32;
        if cfg.left_bounded {
            lo = max(lo, diag - left);
        }
        if cfg.right_bounded {
            hi = min(hi, diag + right + 1);
        }

        let mut q_row = Array::<f32>::new(dim);
        let mut acc = Array::<f32>::new(dim);
        let q_at = (((batch * q_heads + head) * seq_q + i) as usize) * dim;
        for c in 0..dim {
            q_row[c] = f32::cast_from(q[q_at + c]);
            acc[c] = 0.0f32;
        }
        let mut slope = 0.0f32;
        if cfg.alibi {
            slope = slopes[head as usize];
        }
        let mut m = NEG_BIG.runtime();
        let mut l = 0.0f32;
        let table_at = batch * table_stride;

        // Keys in chunks of `block`: scores first, then one rescale per chunk (a rescale per key
        // would round the accumulator once for every new maximum).
        let block = cfg.block;
        let mut scores = Array::<f32>::new(block);
        let mut rows = Array::<u32>::new(block);
        let mut part = Array::<f32>::new(2usize);
        let mut start = lo;
        loop {
            if start >= hi {
                break;
            }
            let mut m_chunk = NEG_BIG.runtime();
            for j in 0..block {
                let t = start + j as i32;
                let mut s = NEG_BIG.runtime();
                if t < hi {
                    let token = t as u32;
                    let page = block_table[(table_at + token / page_size) as usize];
                    let row = (page * kv_heads + kv_head) * page_size + token % page_size;
                    rows[j] = row;
                    let base = row as usize * row_words;
                    // Dequantized channel by channel (`lane · scale`, the values the cache
                    // stores); four partial sums as in the forward kernel's `tile_scores`.
                    let mut k_row_scale = 1.0f32;
                    if quantized {
                        k_row_scale = f32::reinterpret(k_scale[row as usize]);
                    }
                    part[0] = 0.0f32;
                    part[1] = 0.0f32;
                    for c in 0..dim {
                        part[0] += q_row[c] * (lane(k_words, base, c, cfg.storage) * k_row_scale);
                    }
                    let dot = part[0];
                    s = scale * dot;
                    if cfg.softcap {
                        s = softcap * accurate_tanh(s / softcap);
                    }
                    if cfg.alibi {
                        s -= slope * f32::cast_from(diag - t).abs();
                    }
                    m_chunk = max(m_chunk, s);
                }
                scores[j] = s;
            }
            if m_chunk > m {
                let alpha = accurate_exp(m - m_chunk);
                l *= alpha;
                for c in 0..dim {
                    acc[c] *= alpha;
                }
                m = m_chunk;
            }
            for j in 0..block {
                let s = scores[j];
                if s > NEG_BIG {
                    let row = rows[j];
                    let p = accurate_exp(s - m);
                    l += p;
                    let base = row as usize * row_words;
                    let mut v_row_scale = 1.0f32;
                    if quantized {
                        v_row_scale = f32::reinterpret(v_scale[row as usize]);
                    }
                    for c in 0..dim {
                        acc[c] += p * (lane(v_words, base, c, cfg.storage) * v_row_scale);
                    }
                }
            }
            start += block as i32;
        }

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
