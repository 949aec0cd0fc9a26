//! The backward kernels: FlashAttention-2's structure without its atomics, GQA-aware.
//!
//! 1. [`backward_rows`], the prepass: per query row, `δ − dLSE` with `δ = Σ_d dO·O` (f32), next
//!    to the forward's saved LSE, in one f32 buffer `stats = [lse; rows | δ − dLSE; rows |
//!    ALiBi slopes]` that the two main kernels read (one binding instead of three).
//! 2. [`backward_dkv`]: one cube per (key tile, KV head, batch entry). Each unit owns `rows`
//!    consecutive keys — their K and V rows and their f32 `dK`, `dV` accumulators — and every
//!    unit of the cube walks the same (query block, query head of the group) items: the query
//!    blocks the mask lets see the cube's keys, each for the group's heads one after another.
//!    A query element it loads has the same address in every unit (one load for the cube, as
//!    the forward's K/V loads). The group's sum of `dK` and `dV` therefore happens in the
//!    unit's registers, and each KV head's gradient is written once: no repeat of K/V, no
//!    atomics, the same bits on every launch.
//! 3. `dQ`, laid out like the forward (one cube per query tile, KV head and batch entry, units
//!    `group × head_units`, each `rows` query rows of one head), walking the key blocks its band
//!    allows, in one of two ways:
//!    - [`backward_dq`] (the default) recomputes `S` and `dP` per block and adds `dS·K`;
//!    - [`backward_dq_staged`] reads `dS` from a stage [`backward_dkv`] wrote (`cfg.stage`) and
//!      adds `dS·K`: five block products in all instead of seven, FlashAttention-2's count
//!      without its atomic `dQ` sums, for `batch · q_heads · rows · seq_k` f32 words of device
//!      memory (`CubeDevice::with_backward_stage_bytes`; longer problems run in chunks of query
//!      rows, the host launching the pair of kernels once per chunk). Its loads of `dS` are a
//!      unit's own (not one address across the cube), which lavapipe issues lane by lane, so
//!      it saves less than the two products: on lavapipe (32/8/128, L 1024, `benches/
//!      backward.rs`) the staged backward took 0.80–0.92 of the default's time in four runs.
//!      Opt-in: the stage is memory a training step may not have to spare (128 MiB there), and
//!      no GPU has measured it yet.
//!
//! Per block [`backward_dkv`] (and [`backward_dq`]) make two passes over the head dim: the
//! first forms `S = Q·Kᵀ` and `dP = dO·Vᵀ` together; then per pair `P = exp(mod(scale·S) −
//! LSE)` and `dS = P ∘ (dP − δ + dLSE) · mod′` (softcap's `1 − tanh²`, ALiBi's 1); the second
//! pass adds `Pᵀ·dO` to `dV` and `dSᵀ·Q` to `dK` (or `dS·K` to `dQ`). `scale` multiplies `dK`
//! and `dQ` once, when the partials are summed. A pair the mask hides, or of a row that sees
//! no key (LSE −∞), has `P = dS = 0` and its products are skipped, not multiplied by 0: a NaN
//! at a position no visible pair reads never reaches a gradient.
//!
//! **Chunks.** [`backward_dkv`] takes the query blocks of one chunk of rows per launch (one
//! chunk covering all rows without a stage) and carries its sums across chunks through its
//! partials, in the same order as one launch would: the gradients' bits do not depend on the
//! chunking.
//!
//! **Splits.** Lavapipe silently stops a shader invocation's loops after about 65 000
//! iterations (see `forward.rs`). Each main kernel therefore takes a share of its work items
//! per split (its cube's slot, [`cube_slot`]) and writes an f32 partial of its rows;
//! [`sum_splits`] adds the partials in split order and casts to the storage type. Every launch
//! goes through the partials (one split elsewhere): one code path, deterministic sums.
//!
//! **User mods.** A mask mod comes with its block mask (`BackwardConfig::block_mask`): empty
//! tiles are skipped — `backward_dkv` walks only the query tiles that see its key tile (the
//! mask's live ranges transposed), the `dQ` kernels only the key tiles its query tile sees —
//! full ones run without the mask, and partial ones evaluate it per pair (`backward_dkv`
//! stages `dS = 0` for the pairs it hides: `backward_dq_staged` has no mod code). A score mod
//! is applied as in the forward, and `dS` is multiplied by its derivative, which
//! `#[score_mod]` generates as kernel code ([`CubeScore::tangent`], forward mode over the
//! mod's expression).
//!
//! **Where the time goes on lavapipe** (causal 32/8/128, L 1024, f32, with the stage; measured
//! by ablation in one process, each variant timed in turn with the unchanged kernels, all
//! relative to the unchanged staged backward): without `backward_dkv`'s second pass (`dV`,
//! `dK`) 0.52; without its first pass (`S`, `dP`) 0.75; without the stage's writes 0.965;
//! without its reads in `backward_dq_staged` 0.977. The products that accumulate into a unit's
//! register rows (`dV`, `dK`, `dQ`, as the forward's `P·V`) cost about twice those that
//! accumulate into the block's scores. Tried and measured as no faster, so not kept: the
//! second pass without the `P > 0` guard on blocks every pair of which is visible (0.995–
//! 0.997; 0.98 with the guard as a `select` of the sum), one product per head-dim loop instead
//! of two (1.10: slower), 8 keys per unit or 16 query rows per block in `backward_dkv` (0.99–
//! 1.0). So the backward runs 5 (staged) or 7 block products against the forward's 2, most of
//! them of the costly kind: about 3.3–4.7 times the forward's time there, not 2.5.
//!
//! Why the register rows cost that much, as Mesa's source reads (`lp_bld_nir_soa.c`, read at 21.3;
//! 22.3 runs here): lavapipe runs 8 invocations as the lanes of one SIMD vector, and a private
//! array indexed by a run-time value (here the channel, `c · chunk + e`) is read by a gather of 8
//! scalar loads and written by a scatter of 8 masked scalar stores, where a constant index is a
//! register. A score product reads the unit's rows (a gather per channel and row); a register-row
//! product reads and writes them. The remedy, constant indices, means unrolling the head-dim loops,
//! which was measured too, with `backward_dkv`'s head-dim loops unrolled. Compiling it then took
//! minutes in three places, one after another (`perf`): cubecl-opt's `mem2reg`, which orders uses
//! by a linear walk of their block (pliron's `strictly_precedes_in_block`, quadratic in a block as
//! long as the unrolled loops: each unrolled chunk in a branch of its own cured it); naga's debug
//! info, which finds each statement's line by scanning the WGSL text (quadratic too; only where
//! wgpu-types has debug assertions, which `Cargo.toml` now turns off in the test profile, as
//! release builds have it); and lavapipe's LLVM, in its instruction scheduler and use lists, about
//! 2 minutes for the default kernel and 5 for the staged one (not cured). It ran 18–21% faster:
//! default backward 2025 → 1596 ms (backward / forward 5.26 → 4.03), staged 1790 → 1473 ms (4.65 →
//! 3.72; two processes, forwards 385 and 396 ms). Not kept: minutes of compile per kernel, for a
//! ratio still far from 2.5 (see **Loop bounds**).
//!
//! **Loop bounds.** The head-dim loops run to a runtime bound (`dims`, the padded head dim):
//! with a constant one, Mesa unrolls them (up to ~32 iterations), and the unrolled kernel for a
//! head dim of 256 took lavapipe minutes to compile.
//!
//! **Bounds.** Launched unchecked: the inputs are contiguous uploads the host sized; query rows
//! are clamped to `seq_q − 1` and keys to `seq_k − 1` before they form an address (the host
//! launches nothing when either is 0); rows past the sequences are not written.

use cubecl::prelude::*;

use super::math::{NEG_INFINITY_BITS, accurate_exp, accurate_tanh};
use crate::dsl::cube::{CubeMask, CubeScore};

/// Everything that changes the generated code of [`backward_dkv`] and [`backward_dq`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct BackwardConfig {
    pub head_dim: usize,
    /// Channels per iteration of the head-dim loops (unrolled; divides `padded_dim`).
    pub chunk: usize,
    /// `head_dim` rounded up to whole chunks: the length of a unit's register rows (channels
    /// past `head_dim` hold zeros where they would reach a product, and are never written).
    pub padded_dim: usize,
    /// How the block's rows reach the units: `false`, every unit loads every element (one
    /// address across the cube); `true`, lane `p` of each plane loads channel `p` of each row of
    /// the chunk and `plane_broadcast` hands it to the others (as the forward's plane loads;
    /// `chunk` is then a plane's [`super::probe::PLANE_LOAD_LANES`] and the cube whole planes).
    pub plane_loads: bool,
    /// Query heads per KV head.
    pub group: usize,
    /// Rows a unit owns: keys in `backward_dkv`, query rows in `backward_dq`.
    pub rows: usize,
    /// Rows of the other side per block: queries in `backward_dkv`, keys in `backward_dq`.
    pub block: usize,
    /// `backward_dkv`: units per cube; `backward_dq`: units per query head (a cube has
    /// `group · head_units` that own rows, and with plane loads idle ones up to a whole plane).
    pub units: usize,
    pub left_bounded: bool,
    pub right_bounded: bool,
    pub softcap: bool,
    pub alibi: bool,
    /// A user mask mod is evaluated on every pair (its captures in `aux`).
    pub mask_mod: bool,
    /// A user score mod is applied after softcap and ALiBi, as in the forward, and its
    /// generated derivative ([`CubeScore::tangent`]) multiplies `dS` (its captures in `aux`
    /// after the mask mod's).
    pub score_mod: bool,
    /// The user mask's block mask (`crate::dsl::block`) follows the captures in `aux`, from word
    /// `mask_at`: its states in tiles of `mask_tiles = (queries, keys)`, then per (batch
    /// entry, KV head, query tile) the live key tiles, then per (batch entry, KV head, key tile)
    /// the live query tiles. Both kernels skip empty tiles and do not evaluate the mask on full
    /// ones; `backward_dkv` walks only its key tile's live query tiles, `backward_dq` only its
    /// query tile's live key tiles. A mask tile holds whole blocks and cubes of either kernel.
    pub block_mask: bool,
    pub mask_tiles: (usize, usize),
    /// `backward_dkv` writes each pair's `dS` to the stage [`backward_dq_staged`] reads.
    pub stage: bool,
}

/// The prepass: `stats[r] = lse[r]`, `stats[rows + r] = Σ_d dO[r, d]·O[r, d] − dLSE[r]` for
/// the `rows` rows of the contiguous `o` and `d_o` (`d_lse` read only with `has_d_lse`), and
/// the `q_heads` ALiBi slopes after them (with `alibi`). One unit per row.
#[cube(launch_unchecked)]
// A comptime `if` stays apart from the runtime one it guards.
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
pub fn backward_rows<F: Float>(
    o: &[F],
    d_o: &[F],
    lse: &[f32],
    d_lse: &[f32],
    slopes: &[f32],
    stats: &mut [f32],
    rows: u32,
    q_heads: u32,
    #[comptime] head_dim: usize,
    #[comptime] has_d_lse: bool,
    #[comptime] alibi: bool,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    if row < rows {
        let base = row as usize * head_dim;
        let mut delta = 0.0f32;
        for d in 0..head_dim {
            delta += f32::cast_from(d_o[base + d]) * f32::cast_from(o[base + d]);
        }
        if has_d_lse {
            delta -= d_lse[row as usize];
        }
        stats[row as usize] = lse[row as usize];
        stats[(rows + row) as usize] = delta;
    }
    if alibi {
        if row < q_heads {
            stats[(2 * rows + row) as usize] = slopes[row as usize];
        }
    }
}

/// One pair's `P` and `dS` (see the module docs), in place: `s[at]` holds `q·k` and becomes
/// `P`, `dp[at]` holds `dO·v` and becomes `dS` (without `scale`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn pair<M: CubeMask, S: CubeScore>(
    s: &mut Array<f32>,
    dp: &mut Array<f32>,
    #[comptime] at: usize,
    lse: f32,
    dd: f32,
    slope: f32,
    aux: &[u32],
    batch: u32,
    head: u32,
    i: u32,
    j: u32,
    seq_q: u32,
    seq_k: u32,
    diag_offset: i32,
    left: i32,
    right: i32,
    scale: f32,
    softcap: f32,
    user_full: bool,
    #[comptime] cfg: BackwardConfig,
) {
    let diag = i as i32 + diag_offset;
    let kj = j as i32;
    let mut x = scale * s[at];
    let mut d_score = 1.0f32;
    if cfg.softcap {
        let t = accurate_tanh(x / softcap);
        x = softcap * t;
        d_score = 1.0f32 - t * t;
    }
    if cfg.alibi {
        x -= slope * f32::cast_from(diag - kj).abs();
    }
    if cfg.score_mod {
        // The chain rule in forward mode: the mod's derivative at its input times softcap's.
        let before = x;
        let (b, h, q) = (batch as i32, head as i32, i as i32);
        let (n_q, n_k) = (seq_q as i32, seq_k as i32);
        x = S::apply(aux, before, b, h, q, kj, n_q, n_k, comptime!(M::SLOTS));
        d_score = S::tangent(
            aux,
            before,
            d_score,
            b,
            h,
            q,
            kj,
            n_q,
            n_k,
            comptime!(M::SLOTS),
        );
    }
    // A row that sees no key has LSE −∞ (its bits: the comparison must not depend on how the
    // driver treats infinities).
    let mut visible = i < seq_q && j < seq_k && u32::reinterpret(lse) != NEG_INFINITY_BITS;
    visible = visible && in_band(i, j, diag_offset, left, right, cfg);
    if cfg.mask_mod {
        // A full tile of the block mask needs no evaluation (a uniform branch).
        if !user_full {
            let seen = M::visible(
                aux,
                batch as i32,
                head as i32,
                i as i32,
                kj,
                seq_q as i32,
                seq_k as i32,
                0u32,
            );
            visible = visible && seen;
        }
    }
    let p = select(visible, accurate_exp(x - lse), 0.0f32);
    s[at] = p;
    dp[at] = select(p > 0.0f32, p * (dp[at] - dd) * d_score, 0.0f32);
}

/// Whether key `j` is inside query row `i`'s band (the spec's mask without the user's).
#[cube]
fn in_band(
    i: u32,
    j: u32,
    diag_offset: i32,
    left: i32,
    right: i32,
    #[comptime] cfg: BackwardConfig,
) -> bool {
    let diag = i as i32 + diag_offset;
    let kj = j as i32;
    let mut inside = true;
    if cfg.left_bounded {
        inside = kj >= diag - left;
    }
    if cfg.right_bounded {
        inside = inside && kj <= diag + right;
    }
    inside
}

/// `dK` (without `scale`) and `dV` of one key tile of one KV head, summed over the group's
/// query heads, as f32 partials `out[split][0 = dK, 1 = dV][B, HKV, Lk, D]`, and `dS` of the
/// query rows of this launch's chunk into the stage `out[stage_at..]` for
/// [`backward_dq_staged`] (with `cfg.stage`). The inputs are contiguous `[B, H, L, D]`;
/// `stats` is [`backward_rows`]'s.
///
/// A cube's work items are its (query block, query head) pairs, block-major; split `s` takes
/// items `s·items_per_split..(s + 1)·items_per_split`, and a launch the items of its chunk's
/// query blocks `chunk_block_lo..chunk_block_hi`. The first chunk's launch (`first`) starts
/// the partials from zero and writes all of them; each later one reads back the partials of
/// the cubes with items in its chunk and continues the same sums. The f32 operations of a
/// split are therefore the same, in the same order, whatever the chunks: the chunking does
/// not change a bit of the gradients.
///
/// The stage holds `dS` (without `scale`) at `((batch · q_heads + head) · chunk_rows + row −
/// chunk_block_lo · block) · seq_k + key` for every pair of every item walked: 0 where the
/// pair is hidden. Pairs of blocks no item walks (outside the band, or empty in the block
/// mask) are not written.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, clippy::manual_div_ceil)]
pub fn backward_dkv<F: Float, M: CubeMask, S: CubeScore>(
    q: &[F],
    k: &[F],
    v: &[F],
    d_o: &[F],
    stats: &[f32],
    aux: &[u32],
    out: &mut [f32],
    q_heads: u32,
    seq_q: u32,
    seq_k: u32,
    diag_offset: i32,
    left: i32,
    right: i32,
    scale: f32,
    softcap: f32,
    batch_size: u32,
    items_per_split: u32,
    splits: u32,
    dims: u32,
    mask_at: u32,
    chunk_block_lo: u32,
    chunk_block_hi: u32,
    chunk_rows: u32,
    stage_at: u32,
    first: u32,
    #[comptime] cfg: BackwardConfig,
) {
    let dim = cfg.head_dim;
    let chunk = cfg.chunk;
    let rows = cfg.rows;
    let bm = cfg.block;
    let group = cfg.group as u32;
    let block_k = (cfg.units * rows) as u32;

    let kv_heads = q_heads / group;
    let slot = cube_slot(
        (seq_k + block_k - 1) / block_k,
        kv_heads,
        splits,
        batch_size,
    );
    let (kv_head, batch, split) = (slot.kv_head, slot.batch, slot.split);
    let tile0 = slot.tile * block_k;
    let key0 = tile0 + UNIT_POS_X * rows as u32;
    let all_rows = batch_size * q_heads * seq_q;

    // The query rows that may see a key of this tile (uniform over the cube).
    let tile_last = min(tile0 + block_k, seq_k) as i32 - 1;
    let mut q_lo = 0i32;
    let mut q_hi = seq_q as i32; // exclusive
    if cfg.right_bounded {
        q_lo = max(q_lo, tile0 as i32 - diag_offset - right);
    }
    if cfg.left_bounded {
        q_hi = min(q_hi, tile_last - diag_offset + left + 1);
    }
    let mut qb_lo = 0u32;
    let mut qb_hi = 0u32;
    if q_hi > q_lo {
        qb_lo = q_lo as u32 / bm as u32;
        qb_hi = (q_hi as u32 + bm as u32 - 1) / bm as u32;
    }
    // The block mask's live query tiles of this key tile (`cfg.block_mask`).
    let (tq, tk) = cfg.mask_tiles;
    let mask_q_tiles = (seq_q + tq as u32 - 1) / tq as u32;
    let mask_k_tiles = (seq_k + tk as u32 - 1) / tk as u32;
    let mask_kt = tile0 / tk as u32;
    let mask_row0 = (batch * kv_heads + kv_head) * mask_q_tiles;
    if cfg.block_mask {
        let states = batch_size * kv_heads * mask_q_tiles * mask_k_tiles;
        let rows = batch_size * kv_heads * mask_q_tiles;
        let at = mask_at
            + states
            + 2 * rows
            + 2 * ((batch * kv_heads + kv_head) * mask_k_tiles + mask_kt);
        let per_tile = (tq / bm) as u32;
        qb_lo = max(qb_lo, aux[at as usize] * per_tile);
        qb_hi = min(qb_hi, aux[(at + 1) as usize] * per_tile);
        qb_hi = max(qb_hi, qb_lo);
    }
    // This split's items, then those of them in this launch's chunk.
    let blocks = qb_hi - qb_lo;
    let items = group * blocks;
    let split_lo = min(items, split * items_per_split);
    let split_hi = min(items, (split + 1) * items_per_split);
    let chunk_lo = (min(max(chunk_block_lo, qb_lo), qb_hi) - qb_lo) * group;
    let chunk_hi = (min(max(chunk_block_hi, qb_lo), qb_hi) - qb_lo) * group;
    let item_lo = min(max(chunk_lo, split_lo), split_hi);
    let mut item_hi = min(max(chunk_hi, split_lo), split_hi);
    if !slot.valid {
        item_hi = item_lo;
    }
    let walks = item_hi > item_lo;

    // The unit's K and V rows (keys past the sequence read its last: in bounds, never
    // written), and its partial sums so far.
    let kv_base = (batch * kv_heads + kv_head) * seq_k;
    let all = (batch_size * kv_heads * seq_k) as usize * dim;
    let out0 = split as usize * 2 * all;
    let padded = cfg.padded_dim;
    let mut k_reg = Array::<f32>::new(rows * padded);
    let mut v_reg = Array::<f32>::new(rows * padded);
    let mut dk = Array::<f32>::new(rows * padded);
    let mut dv = Array::<f32>::new(rows * padded);
    #[unroll]
    for r in 0..rows {
        let key = min(key0 + r as u32, seq_k - 1);
        let at = ((kv_base + key) as usize) * dim;
        // Only a unit whose own key is in the sequence has partial sums to continue.
        let resume = first == 0 && walks && key0 + (r as u32) < seq_k;
        for du in 0..dims {
            let d = du as usize;
            let mut kx = 0.0f32;
            let mut vx = 0.0f32;
            let mut dkx = 0.0f32;
            let mut dvx = 0.0f32;
            if d < dim {
                kx = f32::cast_from(k[at + d]);
                vx = f32::cast_from(v[at + d]);
                if resume {
                    dkx = out[out0 + at + d];
                    dvx = out[out0 + all + at + d];
                }
            }
            k_reg[r * padded + d] = kx;
            v_reg[r * padded + d] = vx;
            dk[r * padded + d] = dkx;
            dv[r * padded + d] = dvx;
        }
    }

    let mut s = Array::<f32>::new(rows * bm);
    let mut dp = Array::<f32>::new(rows * bm);
    let mut qc = Array::<f32>::new(bm * chunk);
    let mut oc = Array::<f32>::new(bm * chunk);
    let mut q_at = Array::<u32>::new(bm);
    let mut lse = Array::<f32>::new(bm);
    let mut dd = Array::<f32>::new(bm);
    let chunk_row0 = chunk_block_lo * bm as u32;

    for item in item_lo..item_hi {
        let head = kv_head * group + item % group;
        let q_row0 = (qb_lo + item / group) * bm as u32;
        // The block mask: an empty tile is skipped, a full one runs without the user mask.
        let mut state = 1u32;
        if cfg.block_mask {
            let qt = q_row0 / tq as u32;
            state = aux[(mask_at + (mask_row0 + qt) * mask_k_tiles + mask_kt) as usize];
        }
        let user_full = state == 2;
        if state != 0 {
            let row_base = (batch * q_heads + head) * seq_q;
            let mut slope = 0.0f32;
            if cfg.alibi {
                slope = stats[(2 * all_rows + head) as usize];
            }
            #[unroll]
            for j in 0..bm {
                let row = row_base + min(q_row0 + j as u32, seq_q - 1);
                q_at[j] = row * dim as u32;
                lse[j] = stats[row as usize];
                dd[j] = stats[(all_rows + row) as usize];
            }
            #[unroll]
            for x in 0..rows * bm {
                s[x] = 0.0f32;
                dp[x] = 0.0f32;
            }
            // S = K·Qᵀ and dP = V·dOᵀ for the block.
            for cu in 0..dims / chunk as u32 {
                let c = cu as usize;
                load_rows::<F>(q, &q_at, c * chunk, &mut qc, bm, cfg);
                load_rows::<F>(d_o, &q_at, c * chunk, &mut oc, bm, cfg);
                chunk_products(&k_reg, &v_reg, c, &qc, &oc, &mut s, &mut dp, rows, bm, cfg);
            }
            let stage_row0 = stage_at + ((batch * q_heads + head) * chunk_rows) * seq_k;
            #[unroll]
            for r in 0..rows {
                #[unroll]
                for j in 0..bm {
                    let (i, key) = (q_row0 + j as u32, key0 + r as u32);
                    pair::<M, S>(
                        &mut s,
                        &mut dp,
                        r * bm + j,
                        lse[j],
                        dd[j],
                        slope,
                        aux,
                        batch,
                        head,
                        i,
                        key,
                        seq_q,
                        seq_k,
                        diag_offset,
                        left,
                        right,
                        scale,
                        softcap,
                        user_full,
                        cfg,
                    );
                    if cfg.stage && i < seq_q && key < seq_k {
                        out[(stage_row0 + (i - chunk_row0) * seq_k + key) as usize] =
                            dp[r * bm + j];
                    }
                }
            }
            // dV += Pᵀ·dO, dK += dSᵀ·Q (hidden pairs skipped).
            for cu in 0..dims / chunk as u32 {
                let c = cu as usize;
                load_rows::<F>(q, &q_at, c * chunk, &mut qc, bm, cfg);
                load_rows::<F>(d_o, &q_at, c * chunk, &mut oc, bm, cfg);
                #[unroll]
                for r in 0..rows {
                    #[unroll]
                    for e in 0..chunk {
                        let at = r * padded + c * chunk + e;
                        let mut a = dv[at];
                        let mut b = dk[at];
                        #[unroll]
                        for j in 0..bm {
                            let p = s[r * bm + j];
                            a += select(p > 0.0f32, p * oc[j * chunk + e], 0.0f32);
                            b += select(p > 0.0f32, dp[r * bm + j] * qc[j * chunk + e], 0.0f32);
                        }
                        dv[at] = a;
                        dk[at] = b;
                    }
                }
            }
        }
    }

    if first == 1 || walks {
        #[unroll]
        for r in 0..rows {
            let key = key0 + r as u32;
            if slot.valid && key < seq_k {
                let at = ((kv_base + key) as usize) * dim;
                for du in 0..dims {
                    let d = du as usize;
                    if d < dim {
                        out[out0 + at + d] = dk[r * padded + d];
                        out[out0 + all + at + d] = dv[r * padded + d];
                    }
                }
            }
        }
    }
}

/// `dQ` (without `scale`) of one query tile of one KV group, as f32 partials `partial[split][B,
/// HQ, Lq, D]`, with `S` and `dP` of each block recomputed (three block products); split `s` takes keys `s·keys_per_split..(s + 1)·keys_per_split` (a multiple of
/// `block`). Inputs as [`backward_dkv`]'s.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, clippy::manual_div_ceil)]
pub fn backward_dq<F: Float, M: CubeMask, S: CubeScore>(
    q: &[F],
    k: &[F],
    v: &[F],
    d_o: &[F],
    stats: &[f32],
    aux: &[u32],
    partial: &mut [f32],
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
    splits: u32,
    dims: u32,
    mask_at: u32,
    #[comptime] cfg: BackwardConfig,
) {
    let dim = cfg.head_dim;
    let chunk = cfg.chunk;
    let rows = cfg.rows;
    let bn = cfg.block;
    let head_units = cfg.units as u32;
    let block_m = head_units * rows as u32;

    let kv_heads = q_heads / cfg.group as u32;
    let slot = cube_slot(
        (seq_q + block_m - 1) / block_m,
        kv_heads,
        splits,
        batch_size,
    );
    let (q_tile, kv_head, batch, split) = (slot.tile, slot.kv_head, slot.batch, slot.split);
    // Units past the group's (a cube padded to whole planes for plane loads) repeat the last
    // head's rows, load their share, and write nothing.
    let owner = UNIT_POS_X < cfg.group as u32 * head_units;
    let head = kv_head * cfg.group as u32 + min(UNIT_POS_X / head_units, cfg.group as u32 - 1);
    let row0 = q_tile * block_m + (UNIT_POS_X % head_units) * rows as u32;
    let row_base = (batch * q_heads + head) * seq_q;
    let all_rows = batch_size * q_heads * seq_q;

    let padded = cfg.padded_dim;
    let mut q_reg = Array::<f32>::new(rows * padded);
    let mut o_reg = Array::<f32>::new(rows * padded);
    let mut dq = Array::<f32>::new(rows * padded);
    let mut lse = Array::<f32>::new(rows);
    let mut dd = Array::<f32>::new(rows);
    #[unroll]
    for i in 0..rows {
        let row = row_base + min(row0 + i as u32, seq_q - 1);
        let at = row as usize * dim;
        for du in 0..dims {
            let d = du as usize;
            let mut qx = 0.0f32;
            let mut ox = 0.0f32;
            if d < dim {
                qx = f32::cast_from(q[at + d]);
                ox = f32::cast_from(d_o[at + d]);
            }
            q_reg[i * padded + d] = qx;
            o_reg[i * padded + d] = ox;
            dq[i * padded + d] = 0.0f32;
        }
        lse[i] = stats[row as usize];
        dd[i] = stats[(all_rows + row) as usize];
    }
    let mut slope = 0.0f32;
    if cfg.alibi {
        slope = stats[(2 * all_rows + head) as usize];
    }

    // The key blocks any row of this cube may see, within this split (uniform over the cube).
    let blocks = key_blocks(
        q_tile,
        block_m,
        seq_q,
        seq_k,
        split,
        keys_per_split,
        diag_offset,
        left,
        right,
        batch,
        kv_head,
        kv_heads,
        batch_size,
        slot.valid,
        aux,
        mask_at,
        cfg,
    );

    let kv_base = (batch * kv_heads + kv_head) * seq_k;
    let mut s = Array::<f32>::new(rows * bn);
    let mut dp = Array::<f32>::new(rows * bn);
    let mut kc = Array::<f32>::new(bn * chunk);
    let mut vc = Array::<f32>::new(bn * chunk);
    let mut k_at = Array::<u32>::new(bn);
    for t in blocks.lo..blocks.hi {
        let key0 = t * bn as u32;
        // The block mask: an empty tile is skipped, a full one runs without the user mask.
        let state = key_block_state(aux, &blocks, mask_at, t, cfg);
        let user_full = state == 2;
        if state != 0 {
            #[unroll]
            for j in 0..bn {
                k_at[j] = (kv_base + min(key0 + j as u32, seq_k - 1)) * dim as u32;
            }
            #[unroll]
            for x in 0..rows * bn {
                s[x] = 0.0f32;
                dp[x] = 0.0f32;
            }
            // S = Q·Kᵀ and dP = dO·Vᵀ for the block.
            for cu in 0..dims / chunk as u32 {
                let c = cu as usize;
                load_rows::<F>(k, &k_at, c * chunk, &mut kc, bn, cfg);
                load_rows::<F>(v, &k_at, c * chunk, &mut vc, bn, cfg);
                chunk_products(&q_reg, &o_reg, c, &kc, &vc, &mut s, &mut dp, rows, bn, cfg);
            }
            #[unroll]
            for i in 0..rows {
                #[unroll]
                for j in 0..bn {
                    pair::<M, S>(
                        &mut s,
                        &mut dp,
                        i * bn + j,
                        lse[i],
                        dd[i],
                        slope,
                        aux,
                        batch,
                        head,
                        row0 + i as u32,
                        key0 + j as u32,
                        seq_q,
                        seq_k,
                        diag_offset,
                        left,
                        right,
                        scale,
                        softcap,
                        user_full,
                        cfg,
                    );
                }
            }
            // dQ += dS·K (hidden pairs skipped).
            for cu in 0..dims / chunk as u32 {
                let c = cu as usize;
                load_rows::<F>(k, &k_at, c * chunk, &mut kc, bn, cfg);
                #[unroll]
                for i in 0..rows {
                    #[unroll]
                    for e in 0..chunk {
                        let at = i * padded + c * chunk + e;
                        let mut a = dq[at];
                        #[unroll]
                        for j in 0..bn {
                            let p = s[i * bn + j];
                            a += select(p > 0.0f32, dp[i * bn + j] * kc[j * chunk + e], 0.0f32);
                        }
                        dq[at] = a;
                    }
                }
            }
        }
    }

    let out0 = split as usize * all_rows as usize * dim;
    let writes = owner && slot.valid;
    write_dq_rows(partial, &dq, out0, row_base, row0, seq_q, dims, writes, cfg);
}

/// `dQ` (without `scale`) of one query tile of one KV group, as f32 partials `partial[split][B,
/// HQ, Lq, D]`: `dS · K` over the keys the band and the block mask let the tile see, with `dS`
/// read from the stage [`backward_dkv`] wrote for this launch's chunk of query rows (from row
/// `chunk_row0`, `chunk_rows` of them). The chunk's tiles are `tile_lo..tile_lo + tiles`; split
/// `s` takes keys `s·keys_per_split..(s + 1)·keys_per_split` (a multiple of `block`). A pair
/// outside the band reads no stage word (none was written there).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, clippy::manual_div_ceil)]
pub fn backward_dq_staged<F: Float>(
    k: &[F],
    aux: &[u32],
    stage: &[f32],
    partial: &mut [f32],
    q_heads: u32,
    seq_q: u32,
    seq_k: u32,
    diag_offset: i32,
    left: i32,
    right: i32,
    batch_size: u32,
    keys_per_split: u32,
    splits: u32,
    dims: u32,
    mask_at: u32,
    tile_lo: u32,
    tiles: u32,
    chunk_row0: u32,
    chunk_rows: u32,
    stage_at: u32,
    #[comptime] cfg: BackwardConfig,
) {
    let dim = cfg.head_dim;
    let chunk = cfg.chunk;
    let rows = cfg.rows;
    let bn = cfg.block;
    let head_units = cfg.units as u32;
    let block_m = head_units * rows as u32;

    let kv_heads = q_heads / cfg.group as u32;
    let slot = cube_slot(tiles, kv_heads, splits, batch_size);
    let (kv_head, batch, split) = (slot.kv_head, slot.batch, slot.split);
    let q_tile = tile_lo + slot.tile;
    // Units past the group's (a cube padded to whole planes for plane loads) repeat the last
    // head's rows, load their share, and write nothing.
    let owner = UNIT_POS_X < cfg.group as u32 * head_units;
    let head = kv_head * cfg.group as u32 + min(UNIT_POS_X / head_units, cfg.group as u32 - 1);
    let row0 = q_tile * block_m + (UNIT_POS_X % head_units) * rows as u32;
    let row_base = (batch * q_heads + head) * seq_q;
    let all_rows = batch_size * q_heads * seq_q;
    let stage_base = stage_at + (batch * q_heads + head) * chunk_rows * seq_k;

    let padded = cfg.padded_dim;
    let mut dq = Array::<f32>::new(rows * padded);
    let mut stage_at_row = Array::<u32>::new(rows);
    #[unroll]
    for i in 0..rows {
        for du in 0..dims {
            dq[i * padded + du as usize] = 0.0f32;
        }
        // Rows past the sequence read its last (in the chunk: the chunk holds a real row).
        let row = min(row0 + i as u32, seq_q - 1);
        stage_at_row[i] = stage_base + (row - chunk_row0) * seq_k;
    }

    // The key blocks any row of this cube may see, within this split (uniform over the cube).
    let blocks = key_blocks(
        q_tile,
        block_m,
        seq_q,
        seq_k,
        split,
        keys_per_split,
        diag_offset,
        left,
        right,
        batch,
        kv_head,
        kv_heads,
        batch_size,
        slot.valid,
        aux,
        mask_at,
        cfg,
    );

    let kv_base = (batch * kv_heads + kv_head) * seq_k;
    let mut ds = Array::<f32>::new(rows * bn);
    let mut kc = Array::<f32>::new(bn * chunk);
    let mut k_at = Array::<u32>::new(bn);
    for t in blocks.lo..blocks.hi {
        let key0 = t * bn as u32;
        // The block mask: `backward_dkv` wrote no `dS` of an empty tile.
        let state = key_block_state(aux, &blocks, mask_at, t, cfg);
        if state != 0 {
            #[unroll]
            for j in 0..bn {
                let key = min(key0 + j as u32, seq_k - 1);
                k_at[j] = (kv_base + key) * dim as u32;
                #[unroll]
                for i in 0..rows {
                    let inside = key0 + (j as u32) < seq_k
                        && in_band(
                            row0 + i as u32,
                            key0 + j as u32,
                            diag_offset,
                            left,
                            right,
                            cfg,
                        );
                    let word = stage[(stage_at_row[i] + key) as usize];
                    ds[i * bn + j] = select(inside, word, 0.0f32);
                }
            }
            // dQ += dS·K (hidden pairs skipped).
            for cu in 0..dims / chunk as u32 {
                let c = cu as usize;
                load_rows::<F>(k, &k_at, c * chunk, &mut kc, bn, cfg);
                #[unroll]
                for i in 0..rows {
                    #[unroll]
                    for e in 0..chunk {
                        let at = i * padded + c * chunk + e;
                        let mut a = dq[at];
                        #[unroll]
                        for j in 0..bn {
                            let g = ds[i * bn + j];
                            a += select(g != 0.0f32, g * kc[j * chunk + e], 0.0f32);
                        }
                        dq[at] = a;
                    }
                }
            }
        }
    }

    let out0 = split as usize * all_rows as usize * dim;
    let writes = owner && slot.valid;
    write_dq_rows(partial, &dq, out0, row_base, row0, seq_q, dims, writes, cfg);
}

/// A `dQ` unit's `rows` f32 rows (`padded_dim` apart in `dq`) into `partial` from `out0`, at
/// its rows of the head whose rows start at `row_base`: rows past the sequence, and every row
/// of a unit that does not `write`, are not written.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_dq_rows(
    partial: &mut [f32],
    dq: &Array<f32>,
    out0: usize,
    row_base: u32,
    row0: u32,
    seq_q: u32,
    dims: u32,
    write: bool,
    #[comptime] cfg: BackwardConfig,
) {
    let dim = cfg.head_dim;
    #[unroll]
    for i in 0..cfg.rows {
        let row = row0 + i as u32;
        if write && row < seq_q {
            let at = out0 + (row_base + row) as usize * dim;
            for du in 0..dims {
                let d = du as usize;
                if d < dim {
                    partial[at + d] = dq[i * cfg.padded_dim + d];
                }
            }
        }
    }
}

/// The key blocks a `dQ` cube walks: those of its split that any row of its query tile may
/// see (the band), within the block mask's live key tiles of the tile
/// (`cfg.block_mask`); and where the block mask's states of the tile's row lie.
#[derive(CubeType)]
struct KeyBlocks {
    lo: u32,
    hi: u32,
    mask_row: u32,
    mask_k_tiles: u32,
    /// Key blocks per block-mask tile.
    per_tile: u32,
}

/// [`KeyBlocks`] of query tile `q_tile` (of `block_m` rows) in `split`; none for a cube past
/// the grid's slots (`valid` false).
#[cube]
#[allow(clippy::too_many_arguments, clippy::manual_div_ceil)]
fn key_blocks(
    q_tile: u32,
    block_m: u32,
    seq_q: u32,
    seq_k: u32,
    split: u32,
    keys_per_split: u32,
    diag_offset: i32,
    left: i32,
    right: i32,
    batch: u32,
    kv_head: u32,
    kv_heads: u32,
    batch_size: u32,
    valid: bool,
    aux: &[u32],
    mask_at: u32,
    #[comptime] cfg: BackwardConfig,
) -> KeyBlocks {
    let bn = cfg.block as u32;
    let first_row = (q_tile * block_m) as i32;
    let last_row = min(seq_q, (q_tile + 1) * block_m) as i32 - 1;
    let mut band_lo = (split * keys_per_split) as i32;
    let mut band_hi = min(seq_k, (split + 1) * keys_per_split) as i32; // exclusive
    if cfg.left_bounded {
        band_lo = max(band_lo, first_row + diag_offset - left);
    }
    if cfg.right_bounded {
        band_hi = min(band_hi, last_row + diag_offset + right + 1);
    }
    let mut lo = 0u32;
    let mut hi = 0u32;
    if band_hi > band_lo {
        lo = band_lo as u32 / bn;
        hi = (band_hi as u32 + bn - 1) / bn;
    }
    let (tq, tk) = cfg.mask_tiles;
    let mask_q_tiles = (seq_q + tq as u32 - 1) / tq as u32;
    let mask_k_tiles = (seq_k + tk as u32 - 1) / tk as u32;
    let mask_row = (batch * kv_heads + kv_head) * mask_q_tiles + first_row as u32 / tq as u32;
    let per_tile = tk as u32 / bn;
    if cfg.block_mask {
        let at = mask_at + batch_size * kv_heads * mask_q_tiles * mask_k_tiles + 2 * mask_row;
        lo = max(lo, aux[at as usize] * per_tile);
        hi = min(hi, aux[(at + 1) as usize] * per_tile);
        hi = max(hi, lo);
    }
    if !valid {
        hi = lo;
    }
    KeyBlocks {
        lo,
        hi,
        mask_row,
        mask_k_tiles,
        per_tile,
    }
}

/// The block mask's state of key block `t` in [`KeyBlocks`]' row: 0 empty, 1 partial, 2 full
/// (1 without a block mask).
#[cube]
fn key_block_state(
    aux: &[u32],
    blocks: &KeyBlocks,
    mask_at: u32,
    t: u32,
    #[comptime] cfg: BackwardConfig,
) -> u32 {
    let mut state = 1u32;
    if cfg.block_mask {
        let tile = t / blocks.per_tile;
        state = aux[(mask_at + blocks.mask_row * blocks.mask_k_tiles + tile) as usize];
    }
    state
}

/// What one cube of a main kernel works on: a tile (of keys in `backward_dkv`, of queries in
/// `backward_dq`), a KV head, a batch entry and a split; `valid` is false for the cubes past
/// them that a grid of whole rows adds (they work on the last slot and write nothing).
#[derive(CubeType)]
struct CubeSlot {
    tile: u32,
    kv_head: u32,
    batch: u32,
    split: u32,
    valid: bool,
}

/// The slot of this cube in a linear grid of `tiles · kv_heads · splits · batch` cubes (laid
/// out by `grid_1d`). lavapipe hands each of its threads one contiguous run of cubes (Mesa's
/// `lp_cs_tpool` gives a thread `cubes / threads` consecutive ones), so the order makes every
/// run an even share of the work: splits vary fastest (the first ones hold most of it), then
/// tiles in a zigzag `0, T − 1, 1, T − 2, …` (under a causal band early key tiles, and late
/// query tiles, see the most pairs), then heads, then batch entries.
#[cube]
#[allow(clippy::manual_is_multiple_of)] // kernel code: `%`
fn cube_slot(tiles: u32, kv_heads: u32, splits: u32, batch_size: u32) -> CubeSlot {
    let total = tiles * kv_heads * splits * batch_size;
    let linear = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let valid = linear < total;
    let at = min(linear, total - 1);
    let split = at % splits;
    let rest = at / splits;
    let zig = rest % tiles;
    let tile = select(zig % 2 == 0, zig / 2, tiles - 1 - zig / 2);
    let rest = rest / tiles;
    CubeSlot {
        tile,
        kv_head: rest % kv_heads,
        batch: rest / kv_heads,
        split,
        valid,
    }
}

/// One chunk of the first pass's products, for either kernel: `s[r·n + j] += a_r · x_j` and
/// `dp[r·n + j] += b_r · y_j` over channels `c·chunk..(c + 1)·chunk`, where `a`, `b` hold the
/// unit's `rows` register rows (`padded_dim` apart: K and V, or Q and dO) and `x`, `y` the
/// block's `n` loaded rows (`chunk` apart: Q and dO, or K and V).
#[cube]
#[allow(clippy::too_many_arguments)]
fn chunk_products(
    a: &Array<f32>,
    b: &Array<f32>,
    c: usize,
    x: &Array<f32>,
    y: &Array<f32>,
    s: &mut Array<f32>,
    dp: &mut Array<f32>,
    #[comptime] rows: usize,
    #[comptime] n: usize,
    #[comptime] cfg: BackwardConfig,
) {
    let chunk = cfg.chunk;
    let padded = cfg.padded_dim;
    #[unroll]
    for r in 0..rows {
        #[unroll]
        for e in 0..chunk {
            let ad = a[r * padded + c * chunk + e];
            let bd = b[r * padded + c * chunk + e];
            #[unroll]
            for j in 0..n {
                s[r * n + j] += ad * x[j * chunk + e];
                dp[r * n + j] += bd * y[j * chunk + e];
            }
        }
    }
}

/// Channels `c0..c0 + chunk` of `n` contiguous rows of `x` starting at `at[j]`, into
/// `out[j·chunk + e]` as f32: the loads the block products share (the same addresses in every
/// unit of a cube). Channels past the head dim (the last chunk of a padded row) read the row's
/// last channel, in bounds; the registers' zeros cancel them. With plane loads, lane `p` of
/// each plane loads channel `c0 + p` of each row and `plane_broadcast` hands it to the others: a
/// device whose loads are per-lane whatever their addresses (lavapipe) issues `1 / chunk` as
/// many.
#[cube]
fn load_rows<F: Float>(
    x: &[F],
    at: &Array<u32>,
    c0: usize,
    out: &mut Array<f32>,
    #[comptime] n: usize,
    #[comptime] cfg: BackwardConfig,
) {
    let chunk = cfg.chunk;
    let last = cfg.head_dim as u32 - 1;
    if cfg.plane_loads {
        let d = min(c0 as u32 + UNIT_POS_PLANE % chunk as u32, last);
        #[unroll]
        for j in 0..n {
            let mine = f32::cast_from(x[(at[j] + d) as usize]);
            #[unroll]
            for e in 0..chunk {
                out[j * chunk + e] = plane_broadcast(mine, e as u32);
            }
        }
    } else {
        #[unroll]
        for j in 0..n {
            #[unroll]
            for e in 0..chunk {
                let d = min(c0 as u32 + e as u32, last);
                out[j * chunk + e] = f32::cast_from(x[(at[j] + d) as usize]);
            }
        }
    }
}

/// `out[x] = factor · Σ_s partial[offset + s·stride + x]` for `x < len`, in split order, cast
/// to the storage type: the final gradients from the main kernels' partials (`factor`: the
/// softmax scale for `dQ` and `dK`, 1 for `dV`). One unit per element.
#[cube(launch_unchecked)]
pub fn sum_splits<F: Float>(
    partial: &[f32],
    out: &mut [F],
    len: u32,
    offset: u32,
    stride: u32,
    splits: u32,
    factor: f32,
) {
    let x = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    if x < len {
        let mut acc = 0.0f32;
        for s in 0..splits {
            acc += partial[(offset + s * stride + x) as usize];
        }
        out[x as usize] = F::cast_from(factor * acc);
    }
}
