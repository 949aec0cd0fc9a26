//! The forward kernel: a register tile per unit, the query heads of one KV group packed into
//! one cube, specialised per spec.
//!
//! **Work.** One cube computes `block_m` queries for *all* `group` query heads of one KV head
//! of one batch entry: `CUBE_POS_X` = query tile, `CUBE_POS_Y` = KV head, `CUBE_POS_Z = split ·
//! batch + b`. Its units are `group × head_units`: unit `u` serves query head
//! `kv_head · group + u / head_units` and owns `rows` consecutive queries of it (so
//! `block_m = head_units · rows`). Every unit of the cube walks the same keys, so a key or value
//! element it loads has the same address in every unit: one load serves every query head of
//! the group and every row the unit owns (FlashAttention-3's and FlashInfer's "pack GQA"). On
//! lavapipe such a uniform load is one scalar load for the whole SIMD group; on a GPU, one
//! broadcast. KV heads are never repeated, in memory or in loads, and no shared memory or
//! barrier is needed.
//!
//! A varlen launch (packed sequences, `crate::spec::Varlen`) has one cube per query tile of a
//! sequence instead: `CUBE_POS_X` indexes a table of (sequence, tile) pairs, `CUBE_POS_Z` is the
//! split, and the cube reads its sequence's offsets and lengths from the same buffer.
//!
//! **Tile products.** The two products of a key block, `S = Q·Kᵀ` and `O ← α·O + P·V`, and the
//! unit state they keep (query rows, accumulators) are a [`TileProducts`] (`products.rs`): the
//! seam for a matrix-core implementation. What follows describes [`super::products::RegisterProducts`],
//! the one the host launches today.
//!
//! **Register tile.** Per key block of `block_n` keys, a unit holds the `rows × block_n` scores
//! and probabilities, its rows' running max and sum, and one K (then V) element per key, in
//! arrays indexed only by unrolled (compile-time) loop counters, so that they become registers.
//! The head dimension is a run-time loop, `chunk` channels per iteration (unrolled); per
//! channel, `block_n` loads of K feed `rows · block_n` FMAs, and for P·V `block_n` loads of V
//! feed as many. The query rows and the f32 output accumulators (`rows × head_dim` each) are
//! arrays indexed by the uniform channel counter.
//!
//! **Softmax.** Online, branch-free: per block, `m' = max(m, max s)`, `α = e^{m − m'}`
//! (exactly 1 when the max did not move), `l ← α·l + Σ p`, and the rescale `acc ← α·acc` is
//! folded into the P·V pass (one read and one write of the accumulator per block). The output
//! is normalised once at the end. Storage may be f16/bf16; arithmetic is f32.
//!
//! **Masks.** Key blocks entirely outside the cube's band are never visited; blocks entirely
//! inside it skip the mask test (a uniform branch); only boundary blocks evaluate it.
//!
//! **User mods** (`crate::dsl`, generic `M`, `S`, captures in `aux`). The score mod applies
//! after the built-in modifiers, the mask mod per score. With a user mask the launch carries a
//! block mask (`blocks`: a state per (batch, KV head, query tile = this cube's rows, key tile =
//! one register block), then per row of tiles its live key range): a cube walks only its live
//! range, skips empty blocks, runs full ones without the mask test, and tests only partial
//! ones — where, as on boundary blocks, a hidden key's value is skipped, not multiplied by 0.
//!
//! **Specialisation.** Everything that changes code is `#[comptime]` ([`KernelConfig`]): head
//! dim, group, tile sizes, which mask sides are bounded, softcap, ALiBi. Lengths, scale, cap,
//! window sides, slopes and strides are runtime arguments, so one compiled kernel serves every
//! sequence length and window size.
//!
//! **Bounds.** The kernel is launched unchecked (no per-access bounds test). Every index it
//! forms is in bounds by construction: query rows are clamped to `seq_q − 1` and keys to
//! `seq_k − 1` before they address memory (their results are discarded or masked), the views
//! were checked against their buffers on the host (`check_view`, when each `DeviceTensor` was
//! made), and the outputs hold exactly the rows the grid covers (`host` sizes them).
//!
//! **Split keys.** Mesa's lavapipe silently stops a shader invocation's loops after about 65 000
//! iterations in total (its `LP_MAX_TGSI_LOOP_ITERATIONS`), which a long key range exceeds. The
//! host then splits the keys over several cubes (`KernelConfig::split`), each writing an f32
//! partial output and LSE, and [`super::merge::combine_splits`] merges them.
//!
//! WGSL cannot spell infinity, so the running max starts at a finite sentinel and a fully
//! masked row's LSE is written as the bit pattern of −∞.

use cubecl::prelude::*;

use super::math::{NEG_BIG, accurate_exp, accurate_tanh};
use super::products::TileProducts;
use crate::dsl::cube::{CubeMask, CubeScore};

/// Everything that changes the generated code; one compiled kernel per distinct value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct KernelConfig {
    pub head_dim: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Consecutive query rows one unit owns.
    pub rows: usize,
    /// Keys per register block.
    pub block_n: usize,
    /// Channels per iteration of the head-dim loops (unrolled; divides `padded_dim`).
    pub chunk: usize,
    /// `head_dim` rounded up to a multiple of `chunk`: the length of a unit's query rows and
    /// accumulators (the channels past `head_dim` hold zeros in the query rows, so they add
    /// nothing to a score, and are never written out).
    pub padded_dim: usize,
    /// Units per query head; the cube's first `group · head_units` units own query rows.
    pub head_units: usize,
    /// How K and V reach the units ([`super::products::RegisterProducts`]): `false`, every
    /// unit loads every element (one address across the cube); `true`, the lanes of a plane
    /// load `chunk` consecutive channels, one each, and hand them to each other with
    /// `plane_broadcast` (see the module docs).
    pub plane_loads: bool,
    /// The mask bounds keys before the diagonal (`diag - left <= j`).
    pub left_bounded: bool,
    /// The mask bounds keys after the diagonal (`j <= diag + right`; causal is `right = 0`).
    pub right_bounded: bool,
    pub softcap: bool,
    pub alibi: bool,
    /// A user mask mod (`crate::dsl`) is evaluated on every block (its captures in `aux`).
    pub mask_mod: bool,
    /// A user score mod is applied after the built-in modifiers (its captures in `aux` after
    /// the mask's).
    pub score_mod: bool,
    /// A block mask (`blocks`: one state per (batch, KV head, query tile, key tile), query
    /// tiles of the cube's rows, key tiles of `tile_blocks` register blocks, `k_tiles` per
    /// row of tiles) says which key blocks are empty (skipped) and full (no user mask).
    pub block_mask: bool,
    /// Variable-length sequences packed along one axis (`crate::spec::Varlen`): the batch
    /// index is the sequence's, whose offsets and lengths come from `seqs`; `seq_q`, `seq_k`
    /// are the packed lengths and `diag_offset` is 1 for bottom-right alignment (each
    /// sequence's own `len_k − len_q`) or 0 for top-left.
    pub varlen: bool,
    /// The key range is split over several cubes (`CUBE_POS_Z = split · batch + b`): write f32
    /// partial results for `combine_splits` instead of the final output.
    pub split: bool,
}

/// Runtime numbers of one launch (the kernel's `u32`/`i32`/`f32` scalars, packed as a struct
/// for the host side only).
#[derive(Clone, Copy, Debug)]
pub struct LaunchScalars {
    pub q_heads: u32,
    pub seq_q: u32,
    pub seq_k: u32,
    /// `diag(i) = i + diag_offset` (`seq_k - seq_q` bottom-right, 0 top-left).
    pub diag_offset: i32,
    pub left: i32,
    pub right: i32,
    pub scale: f32,
    pub softcap: f32,
    pub batch: u32,
    /// Keys per split (a multiple of `block_n`); `seq_k` or more when not split.
    pub keys_per_split: u32,
}

/// Attention forward. `layout` holds `[offset, stride_b, stride_h, stride_s, stride_d]` of q, k
/// and v (in elements, in that order); `o` is contiguous `[B, HQ, Lq, D]`, `lse` contiguous
/// `[B, HQ, Lq]`; `slopes` has one ALiBi slope per query head (a dummy when ALiBi is off);
/// `aux` holds the user mods' captures (`crate::dsl::Mods::captured_words`); `seqs`, for a
/// varlen launch, the query offsets then the key offsets of the `batch_size` sequences
/// (`cu_seqlens_q`, `cu_seqlens_k`: `batch_size + 1` words each), then per cube of the grid's
/// x axis its sequence and query tile (`CUBE_POS_Z` is then the split); `o`, `lse` are then
/// `[HQ, total_q, D]`, `[HQ, total_q]`.
#[cube(launch_unchecked)]
// Kernel code keeps to the operations cubecl expands (no `div_ceil`), and a comptime `if` stays
// apart from the runtime one it guards.
#[allow(
    clippy::too_many_arguments,
    clippy::manual_div_ceil,
    clippy::collapsible_if
)]
pub fn tile_forward<F: Float, P: TileProducts, M: CubeMask, S: CubeScore>(
    q: &[F],
    k: &[F],
    v: &[F],
    layout: &[u32],
    slopes: &[f32],
    aux: &[u32],
    blocks: &[u32],
    seqs: &[u32],
    o: &mut [F],
    lse: &mut [f32],
    o_partial: &mut [f32],
    lse_partial: &mut [f32],
    q_heads: u32,
    seq_q: u32,
    seq_k: u32,
    diag_offset: i32,
    left: i32,
    right: i32,
    scale: f32,
    softcap: f32,
    batch_size: u32,
    keys_per_split: u32,
    k_tiles: u32,
    tile_blocks: u32,
    #[comptime] cfg: KernelConfig,
) {
    let rows = cfg.rows;
    let block_n = cfg.block_n;
    let head_units = cfg.head_units as u32;
    let block_m = head_units * rows as u32;

    let mut q_tile = CUBE_POS_X;
    let kv_head = CUBE_POS_Y;
    let mut batch = CUBE_POS_Z % batch_size;
    let mut split = CUBE_POS_Z / batch_size;
    if cfg.varlen {
        // The cube's (sequence, query tile), from the tiles' table after the offsets.
        let at = (2 * (batch_size + 1 + CUBE_POS_X)) as usize;
        batch = seqs[at];
        q_tile = seqs[at + 1];
        split = CUBE_POS_Z;
    }
    // Units past the group's (a cube padded to whole planes for plane loads) repeat the last
    // head's rows, load their share of K and V, and write nothing.
    let owner = UNIT_POS < cfg.group as u32 * head_units;

    // This cube's problem: batch entry `batch`, or packed sequence `batch` (its first query
    // and key on the packed axes, its lengths, its diagonal). `seq_q`, `seq_k` stay the
    // lengths of the axes in memory (what rows and keys are clamped to).
    let mut b_in = batch; // the batch index of the tensors in memory
    let mut q_start = 0u32;
    let mut k_start = 0u32;
    let mut len_q = seq_q;
    let mut len_k = seq_k;
    let mut diag_offset = diag_offset;
    if cfg.varlen {
        b_in = 0u32;
        q_start = seqs[batch as usize];
        len_q = seqs[(batch + 1) as usize] - q_start;
        k_start = seqs[(batch_size + 1 + batch) as usize];
        len_k = seqs[(batch_size + 2 + batch) as usize] - k_start;
        diag_offset *= len_k as i32 - len_q as i32;
    }
    let head = kv_head * cfg.group as u32 + min(UNIT_POS / head_units, cfg.group as u32 - 1);
    let row0 = q_tile * block_m + (UNIT_POS % head_units) * rows as u32;

    // The band of keys any row of this cube may see, and which keys are inside it for every row
    // (blocks of those skip the mask test). Uniform over the cube: every unit walks the same
    // key blocks, which is what makes each K/V load one load for the whole group.
    let first_row = (q_tile * block_m) as i32;
    let last_row = min(len_q, (q_tile + 1) * block_m) as i32 - 1;
    let mut band_lo = (split * keys_per_split) as i32;
    let mut band_hi = min(len_k, (split + 1) * keys_per_split) as i32; // exclusive
    let mut inside_lo = band_lo; // keys >= inside_lo are right of every row's left bound
    let mut inside_hi = band_hi; // keys < inside_hi are left of every row's right bound
    if cfg.left_bounded {
        band_lo = max(band_lo, first_row + diag_offset - left);
        inside_lo = max(inside_lo, last_row + diag_offset - left);
    }
    if cfg.right_bounded {
        band_hi = min(band_hi, last_row + diag_offset + right + 1);
        inside_hi = min(inside_hi, first_row + diag_offset + right + 1);
    }
    let mut tile_lo = 0u32;
    let mut tile_hi = 0u32;
    if band_hi > band_lo {
        tile_lo = band_lo as u32 / block_n as u32;
        tile_hi = (band_hi as u32 + block_n as u32 - 1) / block_n as u32;
    }

    // The block mask's live key tiles of this cube's row of tiles (after its states).
    if cfg.block_mask {
        let row = (batch * CUBE_COUNT_Y + kv_head) * CUBE_COUNT_X + q_tile;
        let ranges = batch_size * CUBE_COUNT_Y * CUBE_COUNT_X * k_tiles;
        tile_lo = max(tile_lo, blocks[(ranges + 2 * row) as usize] * tile_blocks);
        tile_hi = min(
            tile_hi,
            blocks[(ranges + 2 * row + 1) as usize] * tile_blocks,
        );
        tile_hi = max(tile_hi, tile_lo);
    }

    let (q_s, q_d) = (layout[3], layout[4]);
    let k_base = layout[5] + b_in * layout[6] + kv_head * layout[7];
    let (k_s, k_d) = (layout[8], layout[9]);
    let v_base = layout[10] + b_in * layout[11] + kv_head * layout[12];
    let (v_s, v_d) = (layout[13], layout[14]);

    // The unit's query rows (rows past the axis read its last row: in bounds, never written) and
    // its f32 output accumulators, kept by the tile products. (The scale multiplies the dot
    // product, as the definition has it: pre-scaling q would add a rounding per element.)
    let q_base = layout[0] + b_in * layout[1] + head * layout[2];
    let mut q_at = Array::<u32>::new(rows);
    #[unroll]
    for i in 0..rows {
        q_at[i] = q_base + min(q_start + row0 + i as u32, seq_q - 1) * q_s;
    }
    let mut tile = P::load_query::<F>(q, &q_at, q_d, cfg);
    let mut slope = 0.0f32;
    if cfg.alibi {
        slope = slopes[head as usize];
    }

    // Registers (every index below is an unrolled counter).
    let mut m = Array::<f32>::new(rows);
    let mut l = Array::<f32>::new(rows);
    let mut alpha = Array::<f32>::new(rows);
    let mut s = Array::<f32>::new(rows * block_n);
    let mut k_at = Array::<u32>::new(block_n);
    let mut v_at = Array::<u32>::new(block_n);
    #[unroll]
    for i in 0..rows {
        m[i] = NEG_BIG.runtime();
        l[i] = 0.0f32;
    }

    for t in tile_lo..tile_hi {
        // The block mask (`crate::dsl::block`): an empty tile is skipped, a full one runs
        // without the user mask. Uniform over the cube (one tile per cube and key tile).
        let mut state = 1u32;
        if cfg.block_mask {
            let kt = t / tile_blocks;
            state = blocks[(((batch * CUBE_COUNT_Y + kv_head) * CUBE_COUNT_X + q_tile) * k_tiles
                + kt) as usize];
        }
        let user_full = state == 2;
        if state != 0 {
            let key0 = t * block_n as u32;
            // Keys past the sequence's read its last key (in bounds) and are masked below.
            #[unroll]
            for j in 0..block_n {
                let key = k_start + min(key0 + j as u32, len_k - 1);
                k_at[j] = k_base + key * k_s;
                v_at[j] = v_base + key * v_s;
            }
            // S = Q·Kᵀ for the block.
            P::scores::<F>(&mut tile, k, &k_at, k_d, &mut s, cfg);

            // Scores, mask (boundary blocks only), online softmax.
            let inside = key0 as i32 >= inside_lo && (key0 + block_n as u32) as i32 <= inside_hi;
            #[unroll]
            for i in 0..rows {
                let diag = (row0 + i as u32) as i32 + diag_offset;
                let mut m_new = m[i];
                #[unroll]
                for j in 0..block_n {
                    let key = key0 + j as u32;
                    let mut x = scale * s[i * block_n + j];
                    if cfg.softcap {
                        x = softcap * accurate_tanh(x / softcap);
                    }
                    if cfg.alibi {
                        x -= slope * f32::cast_from(diag - key as i32).abs();
                    }
                    let q_pos = (row0 + i as u32) as i32;
                    if cfg.score_mod {
                        x = S::apply(
                            aux,
                            x,
                            batch as i32,
                            head as i32,
                            q_pos,
                            key as i32,
                            len_q as i32,
                            len_k as i32,
                            comptime!(M::SLOTS),
                        );
                    }
                    if cfg.mask_mod {
                        // A full tile's pairs are all visible: no test (a uniform branch).
                        if !user_full {
                            let seen = M::visible(
                                aux,
                                batch as i32,
                                head as i32,
                                q_pos,
                                key as i32,
                                len_q as i32,
                                len_k as i32,
                                0u32,
                            );
                            x = select(seen, x, NEG_BIG);
                        }
                    }
                    if !inside {
                        let kj = key as i32;
                        let mut visible = key < len_k;
                        if cfg.left_bounded {
                            visible = visible && kj >= diag - left;
                        }
                        if cfg.right_bounded {
                            visible = visible && kj <= diag + right;
                        }
                        x = select(visible, x, NEG_BIG);
                    }
                    s[i * block_n + j] = x;
                    m_new = max(m_new, x);
                }
                // Exactly 1 when the max did not move (e^0 is exact), 0 from the sentinel.
                let a = accurate_exp(m[i] - m_new);
                let mut sum = 0.0f32;
                #[unroll]
                for j in 0..block_n {
                    let x = s[i * block_n + j];
                    let p = select(x > NEG_BIG, accurate_exp(x - m_new), 0.0f32);
                    s[i * block_n + j] = p;
                    sum += p;
                }
                alpha[i] = a;
                l[i] = a * l[i] + sum;
                m[i] = m_new;
            }

            // acc ← α·acc + P·V. On a boundary block a masked key's value is skipped, not
            // multiplied by its zero probability: 0 · NaN would leak a hidden key's non-finite value
            // into a row that cannot see it. Blocks inside the band need no such test, unless a user
            // mask may hide keys anywhere.
            if inside && (!cfg.mask_mod || user_full) {
                P::accumulate::<F>(&mut tile, v, &v_at, v_d, &s, &alpha, cfg, false);
            } else {
                P::accumulate::<F>(&mut tile, v, &v_at, v_d, &s, &alpha, cfg, true);
            }
        }
    }

    // Output rows: `[B, HQ, Lq]`, or `[HQ, total_q]` packed.
    let mut all_rows = batch_size * q_heads * seq_q;
    let mut head_row0 = (batch * q_heads + head) * seq_q;
    if cfg.varlen {
        all_rows = q_heads * seq_q;
        head_row0 = head * seq_q + q_start;
    }
    #[unroll]
    for i in 0..rows {
        let row = row0 + i as u32;
        if owner && row < len_q {
            let out_row = (head_row0 + row) as usize;
            P::write::<F>(
                &tile,
                i,
                m[i],
                l[i],
                out_row,
                (split * all_rows) as usize + out_row,
                o,
                lse,
                o_partial,
                lse_partial,
                cfg,
            );
        }
    }
}
