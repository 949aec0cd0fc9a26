//! Launching the backward kernels (`kernels/backward.rs`): their tiles, the splits lavapipe's
//! loop limit needs, and the device limits they are checked against.

use cubecl::prelude::*;

use super::{Buffer, Device, PLANE_LOAD_LANES, arg};
use crate::cube::BackwardCall;
use crate::cube::kernels::backward::{
    BackwardConfig, backward_dkv, backward_dq, backward_dq_staged, backward_rows, sum_splits,
};
use crate::dsl::cube::{CubeMask, CubeScore};
use crate::error::{Error, Result};
use crate::spec::{AttentionSpec, ProblemShape};

use super::KernelElement;

/// Keys a unit of the `dK`/`dV` kernel owns, and queries per block it walks.
const DKV_ROWS: usize = 4;
const DKV_BLOCK: usize = 8;
/// Query rows a unit of the `dQ` kernel owns, and keys per block it walks.
const DQ_ROWS: usize = 4;
const DQ_BLOCK: usize = 8;
/// Buffers the main kernels bind: q, k, v, dO, stats, aux, partials.
const BINDINGS: u32 = 7;
/// Units per cube of the prepass and of the split sums.
const LINE_UNITS: usize = 64;

impl Device {
    /// The gradients of one problem into `call.grads` (module docs of `kernels/backward.rs`).
    /// The caller checked the shapes and that no length is 0.
    pub fn backward<T: KernelElement, M: CubeMask, S: CubeScore>(
        &self,
        call: BackwardCall<'_>,
    ) -> Result<()> {
        let BackwardCall {
            op,
            spec,
            shape,
            inputs: [q, k, v, o, d_o],
            lse,
            d_lse,
            aux,
            mask_mod,
            score_mod,
            blocks,
            grads: [dq, dk, dv],
        } = call;
        let ProblemShape {
            batch,
            seq_q,
            seq_k,
        } = shape;
        let limit = i32::MAX as usize / 4;
        if seq_q > limit || seq_k > limit {
            return Err(Error::DeviceLimit {
                op,
                reason: format!("sequence lengths above {limit} (got {seq_q} and {seq_k})"),
            });
        }
        let BackwardPlan {
            dkv,
            dq: dq_config,
            dq_units,
            mask_tiles,
        } = self.backward_plan(op, spec, mask_mod, score_mod)?;
        let (head_dim, group) = (spec.head_dim(), spec.group_size());
        let (block_k, block_m) = (dkv.units * dkv.rows, dq_config.units * dq_config.rows);

        let (aux, mask_at, dkv, dq_config) = match blocks {
            Some(source) => {
                let mask = source.block_mask(spec, shape, mask_tiles);
                let with = |config: BackwardConfig| BackwardConfig {
                    block_mask: true,
                    mask_tiles,
                    ..config
                };
                let buffer = self.aux_and_block_mask(op, aux, &mask)?;
                (buffer, aux.len(), with(dkv), with(dq_config))
            }
            None => (self.constant(op, aux)?, 0, dkv, dq_config),
        };
        let words = |n: usize| {
            u32::try_from(n).map_err(|_| Error::DeviceLimit {
                op,
                reason: "the block mask needs more than 2^32 words".into(),
            })
        };
        let mask_at = words(mask_at)?;

        // Work per split: items of (query block, query head) for dK/dV, keys for dQ.
        let items = group * seq_q.div_ceil(DKV_BLOCK);
        let items_per_split = self.backward_items_per_split(&dkv).min(items).max(1);
        let dkv_splits = items.div_ceil(items_per_split).max(1);
        let keys = seq_k.next_multiple_of(DQ_BLOCK);
        let keys_per_split = (self.backward_items_per_split(&dq_config))
            .saturating_mul(DQ_BLOCK)
            .min(keys);
        let dq_splits = keys.div_ceil(keys_per_split).max(1);

        let q_rows = batch * spec.q_heads() * seq_q;
        let kv_len = batch * spec.kv_heads() * seq_k * head_dim;
        let q_len = q_rows * head_dim;
        let too_many = || Error::DeviceLimit {
            op,
            reason: "the backward's partial gradients need more than 2^32 elements".into(),
        };
        let words = |n: Option<usize>| n.filter(|&n| n <= u32::MAX as usize).ok_or_else(too_many);
        let dkv_partial_len = words(dkv_splits.checked_mul(2 * kv_len))?;
        let dq_partial_len = words(dq_splits.checked_mul(q_len))?;

        // With a stage (`backward_stage_bytes` > 0), `dS` after the dK/dV partials in one
        // buffer (the kernels' bindings stay seven), in chunks of whole block-mask tiles of
        // query rows (which hold whole blocks and tiles of both kernels): as many as the stage
        // limit and the device's buffer limit allow, and at least one tile. Without, one chunk.
        let staged = self.backward_stage_bytes > 0;
        let row_words = batch * spec.q_heads() * seq_k;
        let tile_rows = mask_tiles.0;
        let all_rows = seq_q.next_multiple_of(tile_rows);
        let chunk_rows = if staged {
            let max_buffer = usize::try_from(self.client.properties().memory.max_page_size)
                .unwrap_or(usize::MAX);
            let stage_words = (self.backward_stage_bytes.min(max_buffer) / size_of::<f32>())
                .min(u32::MAX as usize)
                .saturating_sub(dkv_partial_len);
            (stage_words / row_words / tile_rows * tile_rows)
                .max(tile_rows)
                .min(all_rows)
        } else {
            all_rows
        };
        let stage_len = if staged {
            row_words.checked_mul(chunk_rows)
        } else {
            Some(0)
        };
        let out_len = words(stage_len.and_then(|n| n.checked_add(dkv_partial_len)))?;
        let dkv = BackwardConfig {
            stage: staged,
            ..dkv
        };
        // The staged `dQ` kernel reads `dS`: the mods and the score's terms do not change its
        // code (one compile for all of them).
        let dq_staged = BackwardConfig {
            softcap: false,
            alibi: false,
            mask_mod: false,
            score_mod: false,
            ..dq_config
        };
        let stats_len = 2 * q_rows + spec.q_heads();
        let stats = self.empty(op, stats_len, size_of::<f32>())?;
        let dkv_out = self.empty(op, out_len, size_of::<f32>())?;
        let dq_partial = self.empty(op, dq_partial_len, size_of::<f32>())?;
        let slopes = self.slopes(op, spec)?;
        let scalars = super::launch_scalars(spec, shape, None, keys_per_split, op)?;

        // Linear grids in the order `cube_slot` reads them (kernels/backward.rs).
        let cubes = |tiles: usize, splits: usize| {
            let n = [spec.kv_heads(), splits, batch]
                .into_iter()
                .try_fold(tiles, usize::checked_mul)
                .filter(|&n| n <= u32::MAX as usize)
                .ok_or_else(|| Error::DeviceLimit {
                    op,
                    reason: "the backward needs more than 2^32 cubes".into(),
                })?;
            self.grid_1d(op, n)
        };
        let dkv_cubes = cubes(seq_k.div_ceil(block_k), dkv_splits)?;
        let line = |n: usize| self.grid_1d(op, n.div_ceil(LINE_UNITS));
        let rows_cubes = line(q_rows.max(spec.q_heads()))?;
        let (dq_cubes_sum, dkv_cubes_sum) = (line(q_len)?, line(kv_len)?);
        let line_dim = CubeDim::new_1d(LINE_UNITS as u32);
        let d_lse = d_lse.unwrap_or(&self.scratch.0);
        let chunks: Vec<(usize, usize)> = (0..seq_q)
            .step_by(chunk_rows)
            .map(|row0| (row0, (row0 + chunk_rows).min(seq_q)))
            .collect();
        let dq_grids = chunks
            .iter()
            .map(|&(row0, row1)| cubes((row1 - row0).div_ceil(block_m), dq_splits))
            .collect::<Result<Vec<_>>>()?;
        let stage_at = dkv_partial_len as u32;

        // SAFETY: launched unchecked (module docs of `kernels/backward.rs`). The inputs are the
        // contiguous uploads of `[batch, heads, len, head_dim]` tensors the caller checked
        // against `spec` and `shape` (`lse`, `d_lse` of `q_rows` rows; `d_lse` read only when
        // given); no length is 0, so the kernels' clamped rows and keys are in bounds. `stats`
        // holds `2 · q_rows + q_heads` words, written by the prepass before the main kernels
        // read them (one stream: launches run in order). `dkv_out` holds `dkv_splits` copies of
        // dK and dV, every element written by exactly one cube in the first chunk's launch and
        // read back and written only by that cube in later ones, then (`staged`) the stage of
        // `batch · q_heads · chunk_rows · seq_k` words: a chunk's rows start at a multiple of
        // `chunk_rows` (of `block_m` and `DKV_BLOCK`), so `row − chunk_row0 < chunk_rows`, and
        // `backward_dq_staged` reads only the words of pairs in the band of blocks
        // `backward_dkv` walked in the same chunk, launched just before it (without a stage,
        // `backward_dkv` writes none, and one chunk covers every row). The dQ partials hold
        // `dq_splits` copies, every element of a chunk's rows written by exactly one cube of
        // its launch; every index fits in u32 (`words`). The grids of the prepass and the sums
        // cover their lengths in cubes of `LINE_UNITS`.
        unsafe {
            backward_rows::launch_unchecked::<T>(
                &self.client,
                rows_cubes,
                line_dim,
                arg(o),
                arg(d_o),
                arg(lse),
                arg(d_lse),
                arg(&slopes),
                arg(&stats),
                q_rows as u32,
                spec.q_heads() as u32,
                head_dim,
                call.d_lse.is_some(),
                dkv.alibi,
            );
            for (&(row0, row1), dq_cubes) in chunks.iter().zip(dq_grids) {
                backward_dkv::launch_unchecked::<T, M, S>(
                    &self.client,
                    dkv_cubes.clone(),
                    CubeDim::new_1d(dkv.units as u32),
                    arg(q),
                    arg(k),
                    arg(v),
                    arg(d_o),
                    arg(&stats),
                    arg(&aux),
                    arg(&dkv_out),
                    scalars.q_heads,
                    scalars.seq_q,
                    scalars.seq_k,
                    scalars.diag_offset,
                    scalars.left,
                    scalars.right,
                    scalars.scale,
                    scalars.softcap,
                    scalars.batch,
                    items_per_split as u32,
                    dkv_splits as u32,
                    dkv.padded_dim as u32,
                    mask_at,
                    (row0 / DKV_BLOCK) as u32,
                    row1.div_ceil(DKV_BLOCK) as u32,
                    chunk_rows as u32,
                    stage_at,
                    u32::from(row0 == 0),
                    dkv,
                );
                if staged {
                    backward_dq_staged::launch_unchecked::<T>(
                        &self.client,
                        dq_cubes,
                        CubeDim::new_1d(dq_units as u32),
                        arg(k),
                        arg(&aux),
                        arg(&dkv_out),
                        arg(&dq_partial),
                        scalars.q_heads,
                        scalars.seq_q,
                        scalars.seq_k,
                        scalars.diag_offset,
                        scalars.left,
                        scalars.right,
                        scalars.batch,
                        keys_per_split as u32,
                        dq_splits as u32,
                        dq_config.padded_dim as u32,
                        mask_at,
                        (row0 / block_m) as u32,
                        (row1 - row0).div_ceil(block_m) as u32,
                        row0 as u32,
                        chunk_rows as u32,
                        stage_at,
                        dq_staged,
                    );
                } else {
                    backward_dq::launch_unchecked::<T, M, S>(
                        &self.client,
                        dq_cubes,
                        CubeDim::new_1d(dq_units as u32),
                        arg(q),
                        arg(k),
                        arg(v),
                        arg(d_o),
                        arg(&stats),
                        arg(&aux),
                        arg(&dq_partial),
                        scalars.q_heads,
                        scalars.seq_q,
                        scalars.seq_k,
                        scalars.diag_offset,
                        scalars.left,
                        scalars.right,
                        scalars.scale,
                        scalars.softcap,
                        scalars.batch,
                        keys_per_split as u32,
                        dq_splits as u32,
                        dq_config.padded_dim as u32,
                        mask_at,
                        dq_config,
                    );
                }
            }
            let scale = scalars.scale;
            let sums: [(&Buffer, &Buffer, &CubeCount, usize, usize, usize, f32); 3] = [
                (&dq_partial, dq, &dq_cubes_sum, 0, q_len, dq_splits, scale),
                (
                    &dkv_out,
                    dk,
                    &dkv_cubes_sum,
                    0,
                    2 * kv_len,
                    dkv_splits,
                    scale,
                ),
                (
                    &dkv_out,
                    dv,
                    &dkv_cubes_sum,
                    kv_len,
                    2 * kv_len,
                    dkv_splits,
                    1.0,
                ),
            ];
            for (partial, out, cubes, offset, stride, splits, factor) in sums {
                sum_splits::launch_unchecked::<T>(
                    &self.client,
                    cubes.clone(),
                    line_dim,
                    arg(partial),
                    arg(out),
                    out.len as u32,
                    offset as u32,
                    stride as u32,
                    splits as u32,
                    factor,
                );
            }
        }
        Ok(())
    }

    /// The tiles of the two main kernels on this device for `spec` (module docs of
    /// `kernels/backward.rs`), without a block mask yet, and the block mask's tiles.
    fn backward_plan(
        &self,
        op: &'static str,
        spec: &AttentionSpec,
        mask_mod: bool,
        score_mod: bool,
    ) -> Result<BackwardPlan> {
        let hardware = &self.client.properties().hardware;
        if hardware.max_bindings < BINDINGS {
            return Err(Error::DeviceLimit {
                op,
                reason: format!(
                    "the backward kernels bind {BINDINGS} storage buffers; {} allows {}",
                    self.name, hardware.max_bindings
                ),
            });
        }
        let (head_dim, group) = (spec.head_dim(), spec.group_size());
        let max_units = self.units_for_group(op, group)?;
        let plane = (hardware.plane_size_max as usize).clamp(1, max_units);
        // Plane loads where the device's plane broadcasts were found to work (as the
        // forward's; `probe_planes`), in chunks of a plane's lanes; uniform loads elsewhere.
        let plane_loads = self.planes.loads;
        let chunk = if plane_loads {
            PLANE_LOAD_LANES as usize
        } else {
            [4, 2, 1]
                .into_iter()
                .find(|c| head_dim.is_multiple_of(*c))
                .expect("1 divides every head dim")
        };
        let mask = spec.mask();
        let base = BackwardConfig {
            head_dim,
            chunk,
            padded_dim: head_dim.next_multiple_of(chunk),
            plane_loads,
            group,
            rows: 0,
            block: 0,
            units: 0,
            left_bounded: mask.left().is_some(),
            right_bounded: mask.right().is_some(),
            softcap: spec.softcap().is_some(),
            alibi: spec.alibi().is_some(),
            mask_mod,
            score_mod,
            block_mask: false,
            mask_tiles: (1, 1),
            stage: false,
        };
        // Rows per unit: fewer at large head dims, where lavapipe's compile time grows with
        // the units' register rows (measured: 20/4/256 and 16/2/200 took it minutes).
        let rows = |most: usize| {
            if base.padded_dim > 128 {
                most / 2
            } else {
                most
            }
        };
        let dkv = BackwardConfig {
            rows: rows(DKV_ROWS),
            block: DKV_BLOCK,
            units: plane,
            ..base
        };
        let dq_config = BackwardConfig {
            rows: rows(DQ_ROWS),
            block: DQ_BLOCK,
            units: (plane / group).clamp(1, max_units / group),
            ..base
        };
        let mut dq_units = group * dq_config.units;
        if plane_loads {
            dq_units = self.whole_planes(op, group, dq_units, (plane, max_units))?;
        }

        // One block mask for both kernels, in tiles that hold whole cubes and blocks of each:
        // `backward_dkv`'s key tiles and query blocks, `backward_dq`'s query tiles and key blocks.
        let (block_k, block_m) = (dkv.units * dkv.rows, dq_config.units * dq_config.rows);
        Ok(BackwardPlan {
            dkv,
            dq: dq_config,
            dq_units,
            mask_tiles: (lcm(block_m, DKV_BLOCK), lcm(block_k, DQ_BLOCK)),
        })
    }

    /// The tiles `(queries, keys)` of the block mask the backward of `spec` uses here.
    pub fn backward_block_mask_tiles(&self, spec: &AttentionSpec) -> Result<(usize, usize)> {
        Ok(self
            .backward_plan("cube::backward_block_mask_tiles", spec, true, false)?
            .mask_tiles)
    }

    /// Zeros into every element of `out` (of `T`): [`sum_splits`] over no split.
    pub fn fill_zeros<T: KernelElement>(&self, op: &'static str, out: &Buffer) -> Result<()> {
        if out.len == 0 {
            return Ok(());
        }
        if out.len > u32::MAX as usize {
            return Err(Error::DeviceLimit {
                op,
                reason: format!("a gradient of {} elements (more than 2^32)", out.len),
            });
        }
        let cubes = self.grid_1d(op, out.len.div_ceil(LINE_UNITS))?;
        // SAFETY: with no split, `sum_splits` reads no partial and writes elements `0..len` of
        // `out`, which holds `len` elements; the grid covers them in cubes of `LINE_UNITS`.
        unsafe {
            sum_splits::launch_unchecked::<T>(
                &self.client,
                cubes,
                CubeDim::new_1d(LINE_UNITS as u32),
                arg(&self.scratch.0),
                arg(out),
                out.len as u32,
                0,
                0,
                0,
                1.0,
            );
        }
        Ok(())
    }

    /// Blocks one unit of a backward kernel cut as `config` may walk: all of them, except
    /// where the device's loops are limited ([`super::blocks_within_loop_budget`]).
    fn backward_items_per_split(&self, config: &BackwardConfig) -> usize {
        if !self.loops_limited() {
            return usize::MAX / 4;
        }
        super::blocks_within_loop_budget(config.rows, config.padded_dim, config.chunk)
    }
}

/// The main kernels' configurations (see [`Device::backward_plan`]).
struct BackwardPlan {
    dkv: BackwardConfig,
    dq: BackwardConfig,
    /// Units per cube of `backward_dq` (`group · dq.units`, whole planes with plane loads).
    dq_units: usize,
    /// The block mask's `(queries, keys)` per tile.
    mask_tiles: (usize, usize),
}

/// The least common multiple of two positive numbers.
fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut x: usize, mut y: usize| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    a / gcd(a, b) * b
}
