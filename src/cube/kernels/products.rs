//! The forward kernel's two tile products, `S = Q·Kᵀ` and `O ← α·O + P·V`, behind one trait:
//! the seam where a matrix-core implementation plugs in beside the register one.
//!
//! [`super::forward::tile_forward`] owns everything else — which keys a cube walks, the mask,
//! the online softmax, the key splits — and asks a [`TileProducts`] only for the products and
//! for the per-unit state they work on ([`TileProducts::Tile`]: the unit's query rows and its
//! output accumulators). The softmax reads and writes the block's scores as a unit-local
//! `rows × block_n` register array, whichever implementation produced them.
//!
//! - [`RegisterProducts`] (the only one in this crate today): f32 FMAs on registers, one K/V
//!   load feeding every row of the unit (docs on `tile_forward`).
//! - A matrix-core implementation (cubecl's `cmma`, SPIR-V `KHR_cooperative_matrix` on Vulkan)
//!   would keep `Tile` as a query fragment and an accumulator fragment, stage K, V and P through
//!   shared memory, and hand each unit its rows of `S` after the first product. The host chooses
//!   it from the device's reported matrix sizes (`Device::matrix_core_shapes`). It is not in this
//!   crate: lavapipe, the only device these suites have run on, has no cooperative matrices, and
//!   a path that has not passed the kernel suites against the oracle on a GPU is not shipped.

use cubecl::prelude::*;

use super::forward::KernelConfig;
use super::merge::write_row;

/// The two tile products of one key block, and the unit state they keep across blocks.
#[cube]
pub trait TileProducts: 'static + Send + Sync {
    /// What a unit keeps across key blocks: its query rows and f32 output accumulators.
    type Tile: CubeType;

    /// The unit's `cfg.rows` query rows from `q` (row `i` at `q_at[i]`, channels `q_d` apart)
    /// and zeroed accumulators.
    fn load_query<F: Float>(
        q: &[F],
        q_at: &Array<u32>,
        q_d: u32,
        #[comptime] cfg: KernelConfig,
    ) -> Self::Tile;

    /// `s[i·block_n + j] = q_i · k_j` (unscaled) for the block's keys, key `j`'s row at
    /// `k_at[j]` in `k`, channels `k_d` apart.
    fn scores<F: Float>(
        tile: &mut Self::Tile,
        k: &[F],
        k_at: &Array<u32>,
        k_d: u32,
        s: &mut Array<f32>,
        #[comptime] cfg: KernelConfig,
    );

    /// `o_i ← alpha[i]·o_i + Σ_j p[i·block_n + j]·v_j`. `guarded`: a zero probability adds
    /// nothing (not `0 · v`, which would let a masked key's NaN or infinity through).
    #[allow(clippy::too_many_arguments)]
    fn accumulate<F: Float>(
        tile: &mut Self::Tile,
        v: &[F],
        v_at: &Array<u32>,
        v_d: u32,
        p: &Array<f32>,
        alpha: &Array<f32>,
        #[comptime] cfg: KernelConfig,
        #[comptime] guarded: bool,
    );

    /// Writes row `i` of the tile, normalised by `l` (see [`write_row`]).
    #[allow(clippy::too_many_arguments)]
    fn write<F: Float>(
        tile: &Self::Tile,
        i: usize,
        m: f32,
        l: f32,
        out_row: usize,
        partial_row: usize,
        o: &mut [F],
        lse: &mut [f32],
        o_partial: &mut [f32],
        lse_partial: &mut [f32],
        #[comptime] cfg: KernelConfig,
    );
}

/// Both products as f32 FMAs on a unit's registers.
pub struct RegisterProducts;

/// A unit's state under [`RegisterProducts`]: `rows` query rows and output accumulators of
/// `head_dim` f32 each, and the `block_n × chunk` K (then V) values one channel chunk loads.
#[derive(CubeType)]
pub struct RegisterTile {
    q: Sequence<Array<f32>>,
    acc: Sequence<Array<f32>>,
    kv: Array<f32>,
}

#[cube]
impl TileProducts for RegisterProducts {
    type Tile = RegisterTile;

    fn load_query<F: Float>(
        q: &[F],
        q_at: &Array<u32>,
        q_d: u32,
        #[comptime] cfg: KernelConfig,
    ) -> RegisterTile {
        let dim = cfg.head_dim;
        let padded = cfg.padded_dim;
        let mut q_reg = Sequence::<Array<f32>>::new();
        let mut acc = Sequence::<Array<f32>>::new();
        #[unroll]
        for i in 0..cfg.rows {
            let mut q_row = Array::<f32>::new(padded);
            let mut acc_row = Array::<f32>::new(padded);
            for d in 0..padded {
                let mut x = 0.0f32;
                if d < dim {
                    x = f32::cast_from(q[(q_at[i] + d as u32 * q_d) as usize]);
                }
                q_row[d] = x;
                acc_row[d] = 0.0f32;
            }
            q_reg.push(q_row);
            acc.push(acc_row);
        }
        RegisterTile {
            q: q_reg,
            acc,
            kv: Array::<f32>::new(cfg.block_n * cfg.chunk),
        }
    }

    fn scores<F: Float>(
        tile: &mut RegisterTile,
        k: &[F],
        k_at: &Array<u32>,
        k_d: u32,
        s: &mut Array<f32>,
        #[comptime] cfg: KernelConfig,
    ) {
        let chunk = cfg.chunk;
        let block_n = cfg.block_n;
        #[unroll]
        for x in 0..cfg.rows * block_n {
            s[x] = 0.0f32;
        }
        // Per channel, `block_n` loads feed `rows · block_n` FMAs.
        for c in 0..cfg.padded_dim / chunk {
            load_chunk::<F>(k, k_at, k_d, c, &mut tile.kv, cfg);
            #[unroll]
            for i in 0..cfg.rows {
                #[unroll]
                for e in 0..chunk {
                    let qd = tile.q.index(i)[c * chunk + e];
                    #[unroll]
                    for j in 0..block_n {
                        s[i * block_n + j] += qd * tile.kv[j * chunk + e];
                    }
                }
            }
        }
    }

    fn accumulate<F: Float>(
        tile: &mut RegisterTile,
        v: &[F],
        v_at: &Array<u32>,
        v_d: u32,
        p: &Array<f32>,
        alpha: &Array<f32>,
        #[comptime] cfg: KernelConfig,
        #[comptime] guarded: bool,
    ) {
        let chunk = cfg.chunk;
        let block_n = cfg.block_n;
        // Per channel, `block_n` loads of V feed `rows · block_n` FMAs; the rescale by α is
        // folded in (one read and one write of the accumulator per block).
        for c in 0..cfg.padded_dim / chunk {
            load_chunk::<F>(v, v_at, v_d, c, &mut tile.kv, cfg);
            #[unroll]
            for i in 0..cfg.rows {
                #[unroll]
                for e in 0..chunk {
                    let at = c * chunk + e;
                    let acc_row = tile.acc.index_mut(i);
                    let mut a = alpha[i] * acc_row[at];
                    #[unroll]
                    for j in 0..block_n {
                        let p_ij = p[i * block_n + j];
                        if guarded {
                            a += select(p_ij > 0.0f32, p_ij * tile.kv[j * chunk + e], 0.0f32);
                        } else {
                            a += p_ij * tile.kv[j * chunk + e];
                        }
                    }
                    acc_row[at] = a;
                }
            }
        }
    }

    fn write<F: Float>(
        tile: &RegisterTile,
        i: usize,
        m: f32,
        l: f32,
        out_row: usize,
        partial_row: usize,
        o: &mut [F],
        lse: &mut [f32],
        o_partial: &mut [f32],
        lse_partial: &mut [f32],
        #[comptime] cfg: KernelConfig,
    ) {
        write_row::<F>(
            tile.acc.index(i),
            0usize,
            m,
            l,
            out_row,
            partial_row,
            o,
            lse,
            o_partial,
            lse_partial,
            cfg.head_dim,
            cfg.split,
        );
    }
}

/// Channels `c·chunk..(c + 1)·chunk` of the block's `block_n` key (or value) rows, whose offsets
/// in `x` are `at`, into `kv[j·chunk + e]` as f32: the loads both products share. Channels past
/// the head dim (the last chunk of a padded row) read the row's last channel, in bounds; the
/// query's zeros cancel them in `S`, and their accumulators are never written.
///
/// - Uniform loads: every unit loads all `block_n · chunk` elements, at the same addresses
///   across the cube (a GPU broadcasts such a load).
/// - Plane loads (`cfg.plane_loads`): lane `p` of each plane loads channel `c·chunk + p` of each
///   of the block's keys, and `plane_broadcast` hands lane `e`'s value to every lane. A device
///   whose loads are per-lane scalar loads whatever their addresses (lavapipe: a loop over its
///   8 lanes for every load) then issues `1 / chunk` as many; the host launches this only where
///   it verified that the device's planes broadcast (`Device::plane_broadcast_works`), with
///   `chunk` no more than a plane's lanes and whole planes per cube.
#[cube]
fn load_chunk<F: Float>(
    x: &[F],
    at: &Array<u32>,
    stride_d: u32,
    c: usize,
    kv: &mut Array<f32>,
    #[comptime] cfg: KernelConfig,
) {
    let chunk = cfg.chunk;
    let last = cfg.head_dim as u32 - 1;
    let padded = cfg.padded_dim > cfg.head_dim;
    if cfg.plane_loads {
        let mut d = c as u32 * chunk as u32 + UNIT_POS_PLANE % chunk as u32;
        if padded {
            d = min(d, last);
        }
        #[unroll]
        for j in 0..cfg.block_n {
            let mine = f32::cast_from(x[(at[j] + d * stride_d) as usize]);
            #[unroll]
            for e in 0..chunk {
                kv[j * chunk + e] = plane_broadcast(mine, e as u32);
            }
        }
    } else {
        #[unroll]
        for e in 0..chunk {
            let mut d = (c * chunk + e) as u32;
            if padded {
                d = min(d, last);
            }
            #[unroll]
            for j in 0..cfg.block_n {
                kv[j * chunk + e] = f32::cast_from(x[(at[j] + d * stride_d) as usize]);
            }
        }
    }
}
