//! The forward kernel: FlashAttention-2's structure, GQA-aware, specialised per spec.
//!
//! **Work.** One cube computes one tile of `block_m` queries for *all* `group` query heads of
//! one KV head of one batch entry: `CUBE_POS_X` = query tile, `CUBE_POS_Y` = KV head,
//! `CUBE_POS_Z` = batch entry. Its `block_m · group` units each own one (query head, query row)
//! pair. K and V stream through shared memory in tiles of `block_n` keys, loaded cooperatively
//! **once per group**, and every query head of the group reads them there: KV heads are never
//! repeated, in memory or in loads. (Where cubecl cannot compile shared memory for the device,
//! [`KernelConfig::shared_kv`] is off and each unit reads its keys and values from global memory.)
//!
//! **Softmax.** Each unit keeps its query row, an f32 output accumulator, the
//! running max `m` and running sum `l` in registers (online softmax); the accumulator is
//! rescaled only when the max moves and normalised once at the end. Storage may be f16/bf16;
//! arithmetic is f32.
//!
//! **Specialisation.** Everything that changes code is `#[comptime]` ([`KernelConfig`]): head
//! dim, group, tile sizes, which mask sides are bounded, softcap, ALiBi. Values that only change
//! numbers (lengths, scale, cap, window sides, slopes, strides) are runtime arguments, so one
//! compiled kernel serves every sequence length and window size. Key tiles entirely outside the
//! cube's mask band are never visited; tiles entirely inside it run a copy of the inner loop
//! compiled without the mask test.
//!
//! **Split keys.** Mesa's lavapipe silently stops a shader invocation's loops after about 65 000
//! iterations in total (its `LP_MAX_TGSI_LOOP_ITERATIONS`), which a long key range exceeds. The
//! host then splits the keys over several cubes (`KernelConfig::split`), each writing an f32
//! partial output and LSE, and [`combine_splits`] merges them — Flash-Decoding's algebra.
//! (Unrolling the head-dim loops would cut the count, but makes lavapipe's LLVM compile for
//! minutes: its barriers become coroutines holding the unrolled registers.)
//!
//! **Reductions** are per unit (one unit, one query row), so the kernel needs neither plane
//! (subgroup) operations nor a particular plane size: only shared memory and `sync_cube`.
//!
//! WGSL cannot spell infinity, so the running max starts at a finite sentinel and a fully
//! masked row's LSE is written as the bit pattern of −∞.

use cubecl::prelude::*;

/// A finite stand-in for −∞ in running maxima (WGSL has no infinity literal). Scores are f32
/// and bounded far below this in magnitude for any finite input.
pub(super) const NEG_BIG: f32 = -1.0e30;
/// The bits of f32 −∞, written for the LSE of rows that see no key.
pub(super) const NEG_INFINITY_BITS: u32 = 0xff80_0000;

/// Everything that changes the generated code; one compiled kernel per distinct value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct KernelConfig {
    pub head_dim: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Queries per cube and per head.
    pub block_m: usize,
    /// Keys per shared-memory tile.
    pub block_n: usize,
    /// The mask bounds keys before the diagonal (`diag - left <= j`).
    pub left_bounded: bool,
    /// The mask bounds keys after the diagonal (`j <= diag + right`; causal is `right = 0`).
    pub right_bounded: bool,
    pub softcap: bool,
    pub alibi: bool,
    /// K/V tiles go through shared memory, loaded once per cube for the whole group. When
    /// false, each unit reads its keys and values from global memory instead: for devices where
    /// cubecl cannot compile shared memory (its SPIR-V compiler on Vulkan drivers without
    /// `VK_KHR_workgroup_memory_explicit_layout`, such as Mesa 22's lavapipe).
    pub shared_kv: bool,
    /// The key range is split over several cubes (`CUBE_POS_Z = split · batch + b`): write f32
    /// partial results for [`combine_splits`] instead of the final output.
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

/// Index of element `(b, h, s, d)` of a strided tensor whose layout sits at `layout[at..at + 5]`
/// as `[offset, stride_b, stride_h, stride_s, stride_d]`.
#[cube]
fn strided_index(layout: &[u32], #[comptime] at: usize, b: u32, h: u32, s: u32, d: u32) -> usize {
    let index = layout[at]
        + b * layout[at + 1]
        + h * layout[at + 2]
        + s * layout[at + 3]
        + d * layout[at + 4];
    index as usize
}

/// `e^x` to about an ulp where softmax needs it. Device `exp` may be coarser — measured on
/// lavapipe over [−3, 0]: 2.9 ulp (0.7 here), absolute error 1.5 ε (0.5 here) — and softmax
/// probabilities inherit its error, enough to break the tolerance rule. Here: `x = k·ln2 + r`
/// with `|r| <= ln2/2` (ln 2 split in two so that `k·LN2_HI` is exact), a degree-7 Taylor
/// polynomial for `e^r` (truncation below 2^-27 relative), and `2^k` built from its bits.
/// (A driver free to reassociate float arithmetic, as Mesa's is, may merge the split: far from
/// 0 the result then loses a few ulps, on terms that are below 2^-20 of the row's largest.)
/// Results below `2^-126` (x < −87.3) flush to 0, above `f32::MAX` give +∞.
#[cube]
pub(super) fn accurate_exp(x: f32) -> f32 {
    let clamped = clamp(x, -100.0f32, 100.0f32);
    let k = (clamped * core::f32::consts::LOG2_E).round();
    let r = (clamped - k * 0.693_145_75_f32) - k * 1.428_606_8e-6_f32;
    let poly = 1.0f32
        + r * (1.0f32
            + r * (0.5f32
                + r * (0.166_666_67_f32
                    + r * (0.041_666_668_f32
                        + r * (0.008_333_334_f32
                            + r * (0.001_388_888_9_f32 + r * 0.000_198_412_7_f32))))));
    let ki = i32::cast_from(k);
    if ki < -126 {
        0.0f32
    } else if ki > 127 {
        f32::reinterpret(0x7f80_0000u32)
    } else {
        poly * f32::reinterpret(u32::cast_from(ki + 127) << 23)
    }
}

/// `ln x` for positive normal `x`, to about an ulp. The device's `ln` may be coarser (measured
/// on lavapipe over [1, 300]: up to 4.9 ε absolute, against 0.5 for a correctly rounded one),
/// and a row's LSE is `m + ln l`. Here: `x = 2^e · m` with `m` in [√½, √2),
/// `ln m = 2 atanh((m − 1)/(m + 1))` by its series to `f^9` (truncation below 2^-26 relative),
/// plus `e · ln 2` in two parts.
#[cube]
pub(super) fn accurate_ln(x: f32) -> f32 {
    let bits = u32::reinterpret(x);
    let mut e = i32::cast_from((bits >> 23) & 0xff) - 127;
    let mut m = f32::reinterpret((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > core::f32::consts::SQRT_2 {
        m *= 0.5f32;
        e += 1;
    }
    let f = (m - 1.0f32) / (m + 1.0f32);
    let s = f * f;
    let tail = s * (0.333_333_34f32 + s * (0.2f32 + s * (0.142_857_15f32 + s * 0.111_111_11f32)));
    let log_m = 2.0f32 * f + 2.0f32 * f * tail;
    let ef = f32::cast_from(e);
    ef * 0.693_145_75_f32 + (log_m + ef * 1.428_606_8e-6_f32)
}

/// `e^x − 1` for `x >= 0`, to about an ulp: `x = k·ln2 + r` as in [`accurate_exp`], then
/// `2^k · (e^r − 1) + (2^k − 1)` with `e^r − 1` by its Taylor series (degree 8), so that no
/// step subtracts nearly equal numbers. Above `x = 88` the result is +∞.
#[cube]
fn accurate_expm1(x: f32) -> f32 {
    let clamped = min(x, 100.0f32);
    let k = (clamped * core::f32::consts::LOG2_E).round();
    let r = (clamped - k * 0.693_145_75_f32) - k * 1.428_606_8e-6_f32;
    let em1 = r
        * (1.0f32
            + r * (0.5f32
                + r * (0.166_666_67_f32
                    + r * (0.041_666_668_f32
                        + r * (0.008_333_334_f32
                            + r * (0.001_388_888_9_f32
                                + r * (0.000_198_412_7_f32 + r * 0.000_024_801_587_f32)))))));
    let ki = i32::cast_from(k);
    if ki > 127 {
        f32::reinterpret(0x7f80_0000u32)
    } else {
        let two_k = f32::reinterpret(u32::cast_from(ki + 127) << 23);
        two_k * em1 + (two_k - 1.0f32)
    }
}

/// `tanh` to about an ulp (measured in f32 emulation over [−3, 3]: 1.2 ulp). The device's own
/// `tanh` may lose absolute accuracy near 0 (measured on lavapipe: softcapped f32 scores off by
/// several ulps, outside the tolerance rule). Near 0 a Taylor polynomial (its first omitted
/// term is below 2^-28 relative for |y| < 0.4); elsewhere `t / (t + 2)` with
/// `t = e^{2|y|} − 1` ([`accurate_expm1`]), which has no cancellation; 1 from |y| = 9 on.
#[cube]
pub(super) fn accurate_tanh(y: f32) -> f32 {
    let a = y.abs();
    let p = y * y;
    if a < 0.4f32 {
        let poly = -0.333_333_34f32
            + p * (0.133_333_34f32
                + p * (-0.053_968_254f32
                    + p * (0.021_869_488f32 + p * (-0.008_863_235f32 + p * 0.003_592_128f32))));
        y + y * p * poly
    } else {
        // Beyond 9, tanh rounds to 1 in f32 (and t / (t + 2) would overflow to ∞ / ∞ past 44).
        let t = accurate_expm1(2.0f32 * min(a, 9.0f32));
        let mut magnitude = t / (t + 2.0f32);
        if a >= 9.0f32 {
            magnitude = 1.0f32;
        }
        if y < 0.0f32 { -magnitude } else { magnitude }
    }
}

/// The scores of one unit's query row against the current key tile, into `scores`, and the
/// tile's row maximum, returned. Key `j` of the tile, channel `d`, is `k[k_at + j·k_row +
/// d·k_col]`. `masked = false` is the copy for tiles the mask cannot touch.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_scores<F: Float>(
    q_row: &Array<f32>,
    k: &[F],
    k_at: usize,
    k_row: usize,
    k_col: usize,
    scores: &mut Array<f32>,
    key0: u32,
    seq_k: u32,
    diag: i32,
    left: i32,
    right: i32,
    slope: f32,
    scale: f32,
    softcap: f32,
    #[comptime] cfg: KernelConfig,
    #[comptime] masked: bool,
) -> f32 {
    let dim = cfg.head_dim;
    let mut m_tile = NEG_BIG.runtime();
    for j in 0..cfg.block_n {
        let key = key0 + j as u32;
        let mut visible = true;
        if masked {
            let kj = key as i32;
            visible = key < seq_k;
            if cfg.left_bounded {
                visible = visible && kj >= diag - left;
            }
            if cfg.right_bounded {
                visible = visible && kj <= diag + right;
            }
        }
        let mut s = NEG_BIG.runtime();
        if visible {
            // Four partial sums, added pairwise: the dot product's rounding error, which exp
            // amplifies, is several times smaller than one running sum's (and the four chains
            // are independent work).
            let at = k_at + j * k_row;
            let mut part = Array::<f32>::new(2usize);
            part[0] = 0.0f32;
            part[1] = 0.0f32;
            for d in 0..dim {
                part[0] += q_row[d] * f32::cast_from(k[at + d * k_col]);
            }
            let dot = part[0];
            s = scale * dot;
            if cfg.softcap {
                s = softcap * accurate_tanh(s / softcap);
            }
            if cfg.alibi {
                s -= slope * f32::cast_from(diag - key as i32).abs();
            }
            m_tile = max(m_tile, s);
        }
        scores[j] = s;
    }
    m_tile
}

/// Folds one key tile into a unit's online softmax: scores (the masked copy unless the tile is
/// `inside` the band for every row), rescale of `acc` and `state = [m, l]` when the max moves,
/// then `acc += p · v`. Keys and values are read as in [`tile_scores`]: `(j, d)` at
/// `at + j·row + d·col` of their slice.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fold_tile<F: Float>(
    q_row: &Array<f32>,
    k: &[F],
    k_at: usize,
    k_row: usize,
    k_col: usize,
    v: &[F],
    v_at: usize,
    v_row: usize,
    v_col: usize,
    scores: &mut Array<f32>,
    acc: &mut Array<f32>,
    state: &mut Array<f32>,
    key0: u32,
    inside: bool,
    seq_k: u32,
    diag: i32,
    left: i32,
    right: i32,
    slope: f32,
    scale: f32,
    softcap: f32,
    #[comptime] cfg: KernelConfig,
) {
    let dim = cfg.head_dim;
    let m_tile = if inside {
        tile_scores::<F>(
            q_row, k, k_at, k_row, k_col, scores, key0, seq_k, diag, left, right, slope, scale,
            softcap, cfg, false,
        )
    } else {
        tile_scores::<F>(
            q_row, k, k_at, k_row, k_col, scores, key0, seq_k, diag, left, right, slope, scale,
            softcap, cfg, true,
        )
    };
    let mut m = state[0];
    let mut l = state[1];
    if m_tile > m {
        let alpha = accurate_exp(m - m_tile);
        l *= alpha;
        for d in 0..dim {
            acc[d] *= alpha;
        }
        m = m_tile;
    }
    for j in 0..cfg.block_n {
        let s = scores[j];
        if s > NEG_BIG {
            let p = accurate_exp(s - m);
            l += p;
            let at = v_at + j * v_row;
            for d in 0..dim {
                acc[d] += p * f32::cast_from(v[at + d * v_col]);
            }
        }
    }
    state[0] = m;
    state[1] = l;
}

/// Attention forward. `layout` holds `[offset, stride_b, stride_h, stride_s, stride_d]` of q, k
/// and v (in elements, in that order); `o` is contiguous `[B, HQ, Lq, D]`, `lse` contiguous
/// `[B, HQ, Lq]`; `slopes` has one ALiBi slope per query head (a dummy when ALiBi is off).
#[cube(launch)]
// Kernel code keeps to the operations cubecl expands (no `div_ceil`), and a comptime `if` stays
// apart from the runtime one it guards.
#[allow(
    clippy::too_many_arguments,
    clippy::manual_div_ceil,
    clippy::collapsible_if
)]
pub fn flash_forward<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    layout: &[u32],
    slopes: &[f32],
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
    #[comptime] cfg: KernelConfig,
) {
    let dim = cfg.head_dim;
    let block_m = cfg.block_m as u32;
    let block_n = cfg.block_n as u32;

    let q_tile = CUBE_POS_X;
    let kv_head = CUBE_POS_Y;
    let batch = CUBE_POS_Z % batch_size;
    let split = CUBE_POS_Z / batch_size;
    let head = kv_head * cfg.group as u32 + UNIT_POS / block_m;
    let row = q_tile * block_m + UNIT_POS % block_m;
    let active = row < seq_q;
    let diag = row as i32 + diag_offset;

    // The band of keys any row of this tile may see, and which key tiles are entirely inside
    // it for every row (those skip the mask test). Uniform over the cube, so every unit runs
    // the same tiles and the barriers below are never divergent.
    let first_row = (q_tile * block_m) as i32;
    let last_row = min(seq_q, (q_tile + 1) * block_m) as i32 - 1;
    let mut band_lo = (split * keys_per_split) as i32;
    let mut band_hi = min(seq_k, (split + 1) * keys_per_split) as i32; // exclusive
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
        tile_lo = band_lo as u32 / block_n;
        tile_hi = (band_hi as u32 + block_n - 1) / block_n;
    }

    // Registers: the query row and the output accumulator. (The scale multiplies the dot
    // product, as the definition has it: pre-scaling q would add a rounding per element.)
    let mut q_row = Array::<f32>::new(dim);
    let mut acc = Array::<f32>::new(dim);
    let q_at = strided_index(layout, 0usize, batch, head, row, 0);
    let q_step = layout[4] as usize;
    for d in 0..dim {
        let mut x = 0.0f32;
        if active {
            x = f32::cast_from(q[q_at + d * q_step]);
        }
        q_row[d] = x;
        acc[d] = 0.0f32;
    }
    let mut slope = 0.0f32;
    if cfg.alibi {
        if active {
            slope = slopes[head as usize];
        }
    }
    let mut scores = Array::<f32>::new(cfg.block_n);
    // The running max and sum of the online softmax: `state[0]` = m, `state[1]` = l.
    let mut state = Array::<f32>::new(2usize);
    state[0] = NEG_BIG.runtime();
    state[1] = 0.0f32;

    if cfg.shared_kv {
        let mut k_tile = Shared::<[F]>::new_slice(cfg.block_n * dim);
        let mut v_tile = Shared::<[F]>::new_slice(cfg.block_n * dim);
        let tile_len = cfg.block_n * dim;
        for t in tile_lo..tile_hi {
            let key0 = t * block_n;
            sync_cube(); // everyone is done with the previous tile
            let mut idx = UNIT_POS as usize;
            loop {
                if idx >= tile_len {
                    break;
                }
                let key = key0 + (idx / dim) as u32;
                let d = (idx % dim) as u32;
                let mut kx = F::new(0.0);
                let mut vx = F::new(0.0);
                if key < seq_k {
                    kx = k[strided_index(layout, 5usize, batch, kv_head, key, d)];
                    vx = v[strided_index(layout, 10usize, batch, kv_head, key, d)];
                }
                k_tile[idx] = kx;
                v_tile[idx] = vx;
                idx += CUBE_DIM as usize;
            }
            sync_cube();
            if active {
                let inside = key0 as i32 >= inside_lo && (key0 + block_n) as i32 <= inside_hi;
                fold_tile::<F>(
                    &q_row,
                    k_tile.inner_ref(),
                    0usize,
                    dim,
                    1usize,
                    v_tile.inner_ref(),
                    0usize,
                    dim,
                    1usize,
                    &mut scores,
                    &mut acc,
                    &mut state,
                    key0,
                    inside,
                    seq_k,
                    diag,
                    left,
                    right,
                    slope,
                    scale,
                    softcap,
                    cfg,
                );
            }
        }
    } else {
        // No shared memory: every unit reads its keys and values from global memory (see
        // `KernelConfig::shared_kv`). Only visible keys are read.
        let (k_row, k_col) = (layout[8] as usize, layout[9] as usize);
        let (v_row, v_col) = (layout[13] as usize, layout[14] as usize);
        if active {
            for t in tile_lo..tile_hi {
                let key0 = t * block_n;
                let inside = key0 as i32 >= inside_lo && (key0 + block_n) as i32 <= inside_hi;
                fold_tile::<F>(
                    &q_row,
                    k,
                    strided_index(layout, 5usize, batch, kv_head, key0, 0),
                    k_row,
                    k_col,
                    v,
                    strided_index(layout, 10usize, batch, kv_head, key0, 0),
                    v_row,
                    v_col,
                    &mut scores,
                    &mut acc,
                    &mut state,
                    key0,
                    inside,
                    seq_k,
                    diag,
                    left,
                    right,
                    slope,
                    scale,
                    softcap,
                    cfg,
                );
            }
        }
    }
    let m = state[0];
    let l = state[1];

    if active {
        let out_row = ((batch * q_heads + head) * seq_q + row) as usize;
        let rows = (batch_size * q_heads * seq_q) as usize;
        write_row::<F>(
            &acc,
            m,
            l,
            out_row,
            split as usize * rows + out_row,
            o,
            lse,
            o_partial,
            lse_partial,
            dim,
            cfg.split,
        );
    }
}

/// Writes one finished row: `acc / l` and its LSE `m + ln l` to the final `o`, `lse` at
/// `out_row`; or, for a split launch, `acc / l` and the pair `(m, l)` to the f32 partial state
/// at `partial_row` (see [`combine_splits`]). A row that saw no
/// key (`l = 0`, `acc = 0`) gets 0 and LSE −∞. The output is divided by `l` rather than
/// multiplied by `1/l`: one rounding instead of two.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_row<F: Float>(
    acc: &Array<f32>,
    m: f32,
    l: f32,
    out_row: usize,
    partial_row: usize,
    o: &mut [F],
    lse: &mut [f32],
    o_partial: &mut [f32],
    lse_partial: &mut [f32],
    #[comptime] dim: usize,
    #[comptime] split: bool,
) {
    let denom = if l > 0.0f32 { l } else { 1.0f32 };
    if split {
        // The state itself, not its LSE: (max score, Σ exp(s − max)) merges without rounding
        // `max + ln l` to f32 once per split.
        for d in 0..dim {
            o_partial[partial_row * dim + d] = acc[d] / denom;
        }
        lse_partial[2 * partial_row] = m;
        lse_partial[2 * partial_row + 1] = l;
    } else {
        for d in 0..dim {
            o[out_row * dim + d] = F::cast_from(acc[d] / denom);
        }
        lse[out_row] = if l > 0.0f32 {
            m + accurate_ln(l)
        } else {
            f32::reinterpret(NEG_INFINITY_BITS)
        };
    }
}

/// Merges the f32 partial states of `splits` key ranges: `state` holds per split and row the
/// pair (max score `m_s`, `l_s = Σ exp(s − m_s)`), `o_partial` the output normalised by `l_s`.
/// With `M = max m_s` and `L = Σ exp(m_s − M) · l_s`, the output is
/// `Σ exp(m_s − M) · l_s · o_s / L` and the LSE `M + ln L` — or, with `pair_out`, the pair
/// `(M, L)` itself (a partial for a later merge). One unit per row.
#[cube(launch)]
pub fn combine_splits<F: Float>(
    o_partial: &[f32],
    state: &[f32],
    o: &mut [F],
    lse: &mut [f32],
    rows: u32,
    splits: u32,
    #[comptime] head_dim: usize,
    #[comptime] pair_out: bool,
) {
    // A 2-D grid of 1-D cubes (one dimension of the grid may be too small for every row).
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    if row < rows {
        let mut m = NEG_BIG.runtime();
        for s in 0..splits {
            let at = ((s * rows + row) * 2) as usize;
            if state[at + 1] > 0.0f32 {
                m = max(m, state[at]);
            }
        }
        let mut total = 0.0f32;
        for s in 0..splits {
            let at = ((s * rows + row) * 2) as usize;
            if state[at + 1] > 0.0f32 {
                total += accurate_exp(state[at] - m) * state[at + 1];
            }
        }
        let mut inv = 0.0f32;
        if total > 0.0f32 {
            inv = 1.0f32 / total;
        }
        for d in 0..head_dim {
            let mut acc = 0.0f32;
            for s in 0..splits {
                let at = (s * rows + row) as usize;
                let l_s = state[2 * at + 1];
                if l_s > 0.0f32 {
                    acc += accurate_exp(state[2 * at] - m) * l_s * o_partial[at * head_dim + d];
                }
            }
            o[row as usize * head_dim + d] = F::cast_from(acc * inv);
        }
        if pair_out {
            lse[2 * row as usize] = m;
            lse[2 * row as usize + 1] = total;
        } else {
            lse[row as usize] = if total > 0.0f32 {
                m + accurate_ln(total)
            } else {
                f32::reinterpret(NEG_INFINITY_BITS)
            };
        }
    }
}
