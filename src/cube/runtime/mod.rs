//! The cubecl side of the backend: device, buffers, kernel configuration and launch. Compiled
//! when a cubecl runtime feature (`wgpu`, `vulkan`, `cuda`, `hip`) is on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cubecl::prelude::*;
use cubecl::server::Handle;

mod backward;

use super::kernels::decode::{
    DecodeConfig, STORAGE_BF16, STORAGE_F16, STORAGE_F32, STORAGE_INT4, STORAGE_INT8, paged_decode,
    plane_decode, scatter_rows, stream_cache,
};
use super::kernels::forward::{KernelConfig, LaunchScalars, tile_forward};
use super::kernels::merge::combine_splits;
use super::kernels::probe::{PLANE_LOAD_LANES, plane_probe};
use super::kernels::products::RegisterProducts;
use super::{DecodeInputs, ForwardCall};
use super::{ForwardTile, KvLoads};
use crate::cache::StorageKind;
use crate::dsl::block::BlockMask;
use crate::dsl::cube::{CubeMask, CubeScore};
use crate::element::DType;
use crate::error::{Error, Result};
use crate::spec::{AttentionSpec, ProblemShape};

/// The element types the kernels are instantiated for.
pub trait KernelElement: Float + CubeElement {}
impl KernelElement for f32 {}
impl KernelElement for half::f16 {}
impl KernelElement for half::bf16 {}

/// An opened device: its client and what it reported about itself.
pub struct Device {
    client: Client,
    name: String,
    /// Distinguishes devices so that buffers of one are never handed to another.
    key: Arc<()>,
    /// How the forward kernel's tile is chosen.
    tiles: TilePolicy,
    /// Launch constants by content (see [`Device::constant`]).
    constants: Mutex<HashMap<Vec<u32>, Buffer>>,
    /// Block masks on the device, by the host block mask they were uploaded from (the block-mask
    /// cache hands out one `Arc` per problem): a steady-state launch neither rebuilds nor hashes
    /// their words. At most [`BLOCK_MASKS_KEPT`].
    block_masks: Mutex<Vec<(Arc<BlockMask>, Buffer)>>,
    /// The backward's captures-and-block-mask buffers, by block mask and captures
    /// ([`Device::aux_and_block_mask`]). At most [`BLOCK_MASKS_KEPT`].
    backward_masks: Mutex<Vec<KeptAux>>,
    /// Two one-word buffers bound as the partial outputs of launches that write none (an
    /// unsplit forward or decode): allocated once, never written.
    scratch: (Buffer, Buffer),
    /// What the device's planes were found to do ([`probe_planes`]).
    planes: Planes,
    /// The most bytes the backward's `dS` stage may take (`runtime/backward.rs`).
    backward_stage_bytes: usize,
}

/// What a device's planes (subgroups, warps) were found to do by [`probe_planes`].
#[derive(Clone, Copy, Debug, Default)]
struct Planes {
    /// The forward kernel's plane loads run: planes of at least [`PLANE_LOAD_LANES`] lanes
    /// whose broadcasts are right.
    loads: bool,
    /// The plane decode kernel runs, with planes of this many lanes: every plane has exactly
    /// this many (the reported minimum and maximum agree), numbered `UNIT_POS % lanes`, and
    /// their sums are right.
    decode_lanes: Option<usize>,
}

/// How many launch constants a device keeps (each a few words to a few hundred).
const CONSTANTS_KEPT: usize = 256;

impl Device {
    /// The best device this build can reach: CUDA or ROCm when compiled in and present,
    /// otherwise wgpu's default adapter (a discrete GPU before an integrated one before a
    /// software one such as lavapipe); with the `vulkan` feature, wgpu on Vulkan (SPIR-V).
    pub fn open_default() -> Result<Device> {
        let device = pick_device()?;
        let client = device.client();
        let adapter = client.properties().identity.name.clone();
        let name = format!("{adapter} ({device:?})");
        let planes = probe_planes(&client);
        Ok(Device {
            name,
            planes,
            key: Arc::new(()),
            tiles: TilePolicy::Autotune,
            backward_stage_bytes: crate::cube::DEFAULT_BACKWARD_STAGE_BYTES,
            constants: Mutex::new(HashMap::new()),
            block_masks: Mutex::new(Vec::new()),
            backward_masks: Mutex::new(Vec::new()),
            scratch: (
                Buffer {
                    handle: client.empty(size_of::<f32>()),
                    len: 0,
                },
                Buffer {
                    handle: client.empty(size_of::<f32>()),
                    len: 0,
                },
            ),
            client,
        })
    }

    /// The tile every forward launch uses, when one is pinned.
    pub fn pinned_forward_tile(&self) -> Option<ForwardTile> {
        match self.tiles {
            TilePolicy::Pinned(tile) => Some(tile),
            TilePolicy::Untuned | TilePolicy::Autotune => None,
        }
    }

    pub fn set_forward_tile(&mut self, tile: ForwardTile) {
        self.tiles = TilePolicy::Pinned(tile);
    }

    pub fn set_untuned(&mut self) {
        self.tiles = TilePolicy::Untuned;
    }

    /// Whether forward tiles with [`KvLoads::Plane`] run here.
    pub fn plane_loads(&self) -> bool {
        self.planes.loads
    }

    /// The lanes per plane of the plane decode kernel, where it runs ([`Planes`]).
    pub fn plane_decode_lanes(&self) -> Option<usize> {
        self.planes.decode_lanes
    }

    /// Decode with [`paged_decode`] (rows per unit) even where the plane kernel runs.
    pub fn set_unit_decode(&mut self) {
        self.planes.decode_lanes = None;
    }

    pub fn set_backward_stage_bytes(&mut self, bytes: usize) {
        self.backward_stage_bytes = bytes;
    }

    pub fn backward_stage_bytes(&self) -> usize {
        self.backward_stage_bytes
    }

    /// The tile used without measuring: [`ForwardTile::untuned`] with plane loads where they
    /// run, uniform loads elsewhere.
    pub fn untuned_forward_tile(&self, head_dim: usize) -> ForwardTile {
        let loads = if self.planes.loads {
            KvLoads::Plane
        } else {
            KvLoads::Uniform
        };
        ForwardTile::untuned(head_dim, loads)
    }

    pub fn tuned_forward_tile<T: KernelElement>(
        &self,
        spec: &AttentionSpec,
        shape: ProblemShape,
    ) -> Option<ForwardTile> {
        super::tune::tuned_tile::<T>(self, spec, shape)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// What the device says its matrix cores multiply: `(m, n, k)` of each cooperative-matrix
    /// product with `dtype` operands and f32 accumulators (none on lavapipe).
    pub fn matrix_core_shapes(&self, dtype: DType) -> Vec<(u32, u32, u32)> {
        use cubecl::ir::{ElemType, FloatKind};
        let operand = ElemType::Float(match dtype {
            DType::F16 => FloatKind::F16,
            DType::BF16 => FloatKind::BF16,
            DType::F32 => FloatKind::F32,
            DType::F64 => return Vec::new(),
        });
        let accumulator = ElemType::Float(FloatKind::F32);
        let cmma = &self.client.properties().features.matmul.cmma;
        cmma.iter()
            .filter(|c| c.a_type == operand && c.b_type == operand && c.cd_type == accumulator)
            .map(|c| (c.m, c.n, c.k))
            .collect()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key(&self) -> &Arc<()> {
        &self.key
    }

    pub fn supports(&self, dtype: DType) -> bool {
        let client = &self.client;
        match dtype {
            DType::F32 => !f32::supported_uses(client).is_empty(),
            DType::F16 => !half::f16::supported_uses(client).is_empty(),
            DType::BF16 => !half::bf16::supported_uses(client).is_empty(),
            DType::F64 => false, // no f64 kernel: f64 is the oracle's precision
        }
    }

    /// A buffer holding `data`. Errors: [`Error::DeviceLimit`] when it is larger than one
    /// buffer binding of the device may be (wgpu would otherwise fail the launch silently).
    pub fn upload<T: CubeElement>(&self, op: &'static str, data: &[T]) -> Result<Buffer> {
        if data.is_empty() {
            // A zero-length buffer cannot be bound on every backend; its one element is never read.
            return self.empty(op, 0, size_of::<T>());
        }
        self.check_buffer(op, size_of_val(data))?;
        Ok(Buffer {
            handle: self.client.create_from_slice(T::as_bytes(data)),
            len: data.len(),
        })
    }

    fn check_buffer(&self, op: &'static str, bytes: usize) -> Result<()> {
        let max = self.client.properties().memory.max_page_size;
        if bytes as u64 > max {
            return Err(Error::DeviceLimit {
                op,
                reason: format!(
                    "a buffer of {bytes} bytes; {} binds at most {max} bytes per buffer",
                    self.name
                ),
            });
        }
        Ok(())
    }

    pub fn download<T: KernelElement>(&self, op: &'static str, buffer: &Buffer) -> Result<Vec<T>> {
        if buffer.len == 0 {
            return Ok(Vec::new());
        }
        let bytes = self
            .client
            .read_one(buffer.handle.clone())
            .map_err(|e| kernel_error(op, e))?;
        Ok(T::from_bytes(&bytes)[..buffer.len].to_vec())
    }

    pub fn sync(&self, op: &'static str) -> Result<()> {
        cubecl::future::block_on(self.client.sync()).map_err(|e| kernel_error(op, format!("{e:?}")))
    }

    /// A buffer of `len` elements of `element_bytes` each, uninitialised.
    pub fn empty(&self, op: &'static str, len: usize, element_bytes: usize) -> Result<Buffer> {
        let bytes = len.max(1) * element_bytes;
        self.check_buffer(op, bytes)?;
        Ok(Buffer {
            handle: self.client.empty(bytes),
            len,
        })
    }

    /// A launch constant (a layout, ALiBi slopes) on the device: uploaded on first use and
    /// reused by every later launch that needs the same words, so that steady-state calls
    /// upload nothing. At most [`CONSTANTS_KEPT`] are kept (then the table starts afresh).
    pub fn constant(&self, op: &'static str, words: &[u32]) -> Result<Buffer> {
        let mut table = self.constants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(buffer) = table.get(words) {
            return Ok(buffer.clone());
        }
        if table.len() >= CONSTANTS_KEPT {
            table.clear();
        }
        let buffer = self.upload(op, words)?;
        table.insert(words.to_vec(), buffer.clone());
        Ok(buffer)
    }

    /// `mask` on the device: uploaded on its first launch, then reused while the host's block
    /// mask cache keeps handing out the same one.
    fn block_mask_buffer(&self, op: &'static str, mask: &Arc<BlockMask>) -> Result<Buffer> {
        let mut kept = self.block_masks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, buffer)) = kept.iter().find(|(m, _)| Arc::ptr_eq(m, mask)) {
            return Ok(buffer.clone());
        }
        if kept.len() >= BLOCK_MASKS_KEPT {
            kept.clear();
        }
        let buffer = self.upload(op, &mask.words())?;
        kept.push((mask.clone(), buffer.clone()));
        Ok(buffer)
    }

    /// The backward's `aux` binding with a block mask (`kernels/backward.rs`,
    /// `BackwardConfig::block_mask`): the captures `aux`, then `mask`'s words (states, live key
    /// tiles per query tile), then its live query tiles per key tile. Uploaded on first use,
    /// then reused while the host's block mask cache hands out the same mask.
    pub(super) fn aux_and_block_mask(
        &self,
        op: &'static str,
        aux: &[u32],
        mask: &Arc<BlockMask>,
    ) -> Result<Buffer> {
        let mut kept = self
            .backward_masks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let found = kept
            .iter()
            .find(|(m, a, _)| Arc::ptr_eq(m, mask) && a == aux);
        if let Some((_, _, buffer)) = found {
            return Ok(buffer.clone());
        }
        if kept.len() >= BLOCK_MASKS_KEPT {
            kept.clear();
        }
        let mut words = aux.to_vec();
        words.extend(mask.words());
        for range in mask.live_query_ranges() {
            words.extend([range.start as u32, range.end as u32]);
        }
        let buffer = self.upload(op, &words)?;
        kept.push((mask.clone(), aux.to_vec(), buffer.clone()));
        Ok(buffer)
    }

    /// The f32 partial outputs and state pairs of `rows` rows for a split launch, or the
    /// never-written scratch pair when the launch writes none.
    fn partials(
        &self,
        op: &'static str,
        needed: bool,
        rows: usize,
        head_dim: usize,
    ) -> Result<(Buffer, Buffer)> {
        if !needed {
            return Ok(self.scratch.clone());
        }
        Ok((
            self.empty(op, rows * head_dim, size_of::<f32>())?,
            self.empty(op, 2 * rows, size_of::<f32>())?,
        ))
    }

    /// The ALiBi slopes of `spec` (one per query head; a dummy without ALiBi) as a constant.
    fn slopes(&self, op: &'static str, spec: &AttentionSpec) -> Result<Buffer> {
        let bits: Vec<u32> = match spec.alibi() {
            Some(alibi) => alibi.to_vec().iter().map(|s| s.to_bits()).collect(),
            None => vec![0],
        };
        self.constant(op, &bits)
    }

    /// Launches the forward kernel, writing the contiguous `o` (`[B, HQ, Lq, D]`) and `lse`
    /// (`[B, HQ, Lq]`) buffers, which the caller sized. `layout` is `[offset, stride_b,
    /// stride_h, stride_s, stride_d]` for q, k and v. The tile is the pinned one
    /// ([`Device::set_forward_tile`]), the untuned rule's ([`Device::set_untuned`]), or the one
    /// autotune measured fastest for the problem's key (`super::tune`).
    pub fn forward<T: KernelElement, M: CubeMask, S: CubeScore>(
        &self,
        call: ForwardCall<'_>,
    ) -> Result<()> {
        let rows = call.rows();
        debug_assert!(call.o.len == rows * call.spec.head_dim() && call.lse.len == rows);
        if rows == 0 {
            return Ok(());
        }
        match self.tiles {
            TilePolicy::Pinned(tile) => self.forward_tiled::<T, M, S>(&call, tile),
            TilePolicy::Untuned => self
                .forward_tiled::<T, M, S>(&call, self.untuned_forward_tile(call.spec.head_dim())),
            TilePolicy::Autotune => super::tune::forward::<T, M, S>(self, call),
        }
    }

    /// Checks on the host everything [`Device::forward_tiled`] would refuse for `call` cut into
    /// `tile`, launching and allocating nothing.
    pub(super) fn check_forward_tile(
        &self,
        call: &ForwardCall<'_>,
        tile: ForwardTile,
    ) -> Result<()> {
        self.forward_launch(call, tile).map(|_| ())
    }

    /// How `call` cut into `tile` is launched, checked against the device's limits.
    fn forward_launch(&self, call: &ForwardCall<'_>, tile: ForwardTile) -> Result<ForwardLaunch> {
        let &ForwardCall {
            op, spec, shape, ..
        } = call;
        let ProblemShape { batch, seq_q, .. } = shape;
        let rows = call.rows();
        let plan = self.forward_plan(op, spec, tile)?;
        let mut config = plan.config;
        config.mask_mod = call.mask_mod;
        config.score_mod = call.score_mod;
        config.varlen = call.packed.is_some();
        let keys_per_split = self.keys_per_split(&plan, shape.seq_k);
        let splits = shape.seq_k.div_ceil(keys_per_split).max(1);
        config.split = splits > 1;
        if config.split {
            let partial = (splits * rows * spec.head_dim()).checked_mul(size_of::<f32>());
            self.check_buffer(op, partial.unwrap_or(usize::MAX))?;
        }
        let block_m = config.head_units * config.rows;
        // Packed: one cube per query tile of a sequence (`varlen_tiles`), splits along z.
        let grid = match call.packed {
            Some(packed) => [
                varlen_tiles(packed.cu, block_m).len(),
                spec.kv_heads(),
                splits,
            ],
            None => [seq_q.div_ceil(block_m), spec.kv_heads(), splits * batch],
        };
        Ok(ForwardLaunch {
            config,
            splits,
            scalars: launch_scalars(spec, shape, call.packed, keys_per_split, op)?,
            cubes: self.grid(op, grid)?,
            combine_cubes: self.grid_1d(op, rows.div_ceil(64))?,
            units: CubeDim::new_1d(plan.units as u32),
        })
    }

    /// The forward launch cut into `tile`.
    pub(super) fn forward_tiled<T: KernelElement, M: CubeMask, S: CubeScore>(
        &self,
        call: &ForwardCall<'_>,
        tile: ForwardTile,
    ) -> Result<()> {
        let &ForwardCall {
            op,
            spec,
            shape,
            q,
            k,
            v,
            layout,
            o,
            lse,
            aux,
            blocks: block_source,
            packed,
            ..
        } = call;
        let rows = call.rows();
        let ForwardLaunch {
            config,
            splits,
            scalars,
            cubes,
            combine_cubes,
            units,
        } = self.forward_launch(call, tile)?;
        let mut config = config;
        // The block mask, in tiles of the cube's query rows and of whole register blocks of
        // at least BLOCK_MASK_KEYS keys.
        let block_m = config.head_units * config.rows; // as `block_mask_tiles` says
        let tile_blocks = BLOCK_MASK_KEYS.div_ceil(config.block_n);
        let (blocks, k_tiles) = match block_source {
            Some(source) => {
                let mask = source.block_mask(spec, shape, (block_m, tile_blocks * config.block_n));
                config.block_mask = true;
                (self.block_mask_buffer(op, &mask)?, mask.tiles().1)
            }
            None => (self.scratch.0.clone(), 0),
        };
        let layout = self.constant(op, &layout)?;
        let slopes = self.slopes(op, spec)?;
        let seqs = match packed {
            Some(packed) => {
                let block_m = config.head_units * config.rows;
                let tiles = varlen_tiles(packed.cu, block_m);
                let words: Vec<u32> = packed
                    .cu
                    .iter()
                    .copied()
                    .chain(tiles.into_iter().flatten())
                    .collect();
                self.constant(op, &words)?
            }
            None => self.scratch.0.clone(),
        };
        // Split launches need f32 partials: from cubecl's memory pool, per call.
        let (o_partial, lse_partial) =
            self.partials(op, config.split, splits * rows, spec.head_dim())?;
        // SAFETY: the kernel is launched unchecked. It clamps every query row to `seq_q - 1`
        // and every key to `seq_k - 1` before forming an address, and the q, k, v views (offset
        // plus index times stride, for every index inside their shapes) were checked against
        // their buffers when each `DeviceTensor` was made (`check_view`); `o`, `lse` and the
        // partial buffers hold exactly the rows the grid covers, and rows past `seq_q` are not
        // written. `layout` holds 15 words and `slopes` one per query head (or a dummy).
        unsafe {
            tile_forward::launch_unchecked::<T, RegisterProducts, M, S>(
                &self.client,
                cubes,
                units,
                arg(q),
                arg(k),
                arg(v),
                arg(&layout),
                arg(&slopes),
                arg(aux),
                arg(&blocks),
                arg(&seqs),
                arg(o),
                arg(lse),
                arg(&o_partial),
                arg(&lse_partial),
                scalars.q_heads,
                scalars.seq_q,
                scalars.seq_k,
                scalars.diag_offset,
                scalars.left,
                scalars.right,
                scalars.scale,
                scalars.softcap,
                scalars.batch,
                scalars.keys_per_split,
                k_tiles as u32,
                tile_blocks as u32,
                config,
            );
            if config.split {
                self.combine::<T>(
                    combine_cubes,
                    (&o_partial, &lse_partial),
                    (o, lse),
                    (rows, splits, spec.head_dim()),
                    false,
                );
            }
        }
        Ok(())
    }

    /// The tiles (query rows, keys) of the block masks a forward of `spec` cut into `tile`
    /// uses here: the cube's query rows, and whole register blocks of at least
    /// [`BLOCK_MASK_KEYS`] keys.
    pub fn block_mask_tiles(
        &self,
        spec: &AttentionSpec,
        tile: ForwardTile,
    ) -> Result<(usize, usize)> {
        let plan = self.forward_plan("cube::block_mask_tiles", spec, tile)?;
        let config = plan.config;
        Ok((
            config.head_units * config.rows,
            BLOCK_MASK_KEYS.div_ceil(config.block_n) * config.block_n,
        ))
    }

    /// How many key splits a forward of `seq_k` keys cut into `tile` launches here.
    pub fn forward_key_splits(
        &self,
        spec: &AttentionSpec,
        tile: ForwardTile,
        seq_k: usize,
    ) -> Result<usize> {
        let plan = self.forward_plan("cube::forward_key_splits", spec, tile)?;
        Ok(seq_k.div_ceil(self.keys_per_split(&plan, seq_k)).max(1))
    }

    /// Keys one cube may process. On lavapipe, whose shader invocations silently stop looping
    /// after 65 535 iterations in all, as many key blocks as keep a unit's loop count under
    /// 60 000 (the kernel docs say why); elsewhere the whole key range.
    fn keys_per_split(&self, plan: &ForwardPlan, seq_k: usize) -> usize {
        let config = &plan.config;
        let whole = seq_k.max(1).next_multiple_of(config.block_n);
        if !self.loops_limited() {
            return whole;
        }
        let blocks = blocks_within_loop_budget(config.rows, config.padded_dim, config.chunk);
        (blocks * config.block_n).min(whole)
    }

    /// The most units a cube may have, checked to hold one unit per query head of a KV group
    /// of `group` (both prefill kernels' cubes do): [`Error::DeviceLimit`] otherwise.
    pub(super) fn units_for_group(&self, op: &'static str, group: usize) -> Result<usize> {
        let max_units = self.client.properties().hardware.max_units_per_cube as usize;
        if group > max_units {
            return Err(Error::DeviceLimit {
                op,
                reason: format!(
                    "a KV group of {group} query heads needs {group} units per cube; {} allows {max_units}",
                    self.name
                ),
            });
        }
        Ok(max_units)
    }

    /// `units` (a cube serving a KV group of `group` query heads) padded to whole planes of
    /// `plane` for plane loads, checked against the `max_units` a cube may have:
    /// [`Error::DeviceLimit`] otherwise. Both prefill plans pad their cubes so.
    pub(super) fn whole_planes(
        &self,
        op: &'static str,
        group: usize,
        units: usize,
        (plane, max_units): (usize, usize),
    ) -> Result<usize> {
        let units = units.next_multiple_of(plane);
        if units > max_units {
            return Err(Error::DeviceLimit {
                op,
                reason: format!(
                    "plane loads for a KV group of {group} query heads need {units} units per cube (whole planes of {plane}); {} allows {max_units}",
                    self.name
                ),
            });
        }
        Ok(units)
    }

    /// Whether the device's shader invocations silently stop looping after 65 535 iterations
    /// in all (Mesa's lavapipe; the forward kernel's docs): its kernels then split their work
    /// ([`blocks_within_loop_budget`]).
    pub(super) fn loops_limited(&self) -> bool {
        self.name.contains("llvmpipe")
    }

    /// The forward kernel's tiles for `spec` on this device. A unit owns `rows` query rows of
    /// one head and scores `block_n` keys at a time; `head_units` units per query head make a
    /// cube of `group · head_units` units, about one plane (SIMD group) or more. Plane loads
    /// pad the cube to whole planes (the extra units load their share of K and V and write
    /// nothing) and the head dim to whole chunks of [`PLANE_LOAD_LANES`] channels.
    fn forward_plan(
        &self,
        op: &'static str,
        spec: &AttentionSpec,
        tile: ForwardTile,
    ) -> Result<ForwardPlan> {
        let hardware = &self.client.properties().hardware;
        let head_dim = spec.head_dim();
        let group = spec.group_size();
        let max_units = self.units_for_group(op, group)?;
        let ForwardTile {
            rows,
            block_n,
            loads,
        } = tile;
        let plane = (hardware.plane_size_max as usize).max(1);
        let head_units = (plane / group).clamp(1, max_units / group);
        let plane_loads = loads == KvLoads::Plane;
        let (chunk, units) = if plane_loads {
            if !self.planes.loads {
                return Err(Error::DeviceLimit {
                    op,
                    reason: format!(
                        "the forward tile {tile} loads K and V through plane broadcasts, which {} does not run (use uniform loads)",
                        self.name
                    ),
                });
            }
            let units = self.whole_planes(op, group, group * head_units, (plane, max_units))?;
            (PLANE_LOAD_LANES as usize, units)
        } else {
            let chunk = [4, 2, 1]
                .into_iter()
                .find(|c| head_dim.is_multiple_of(*c))
                .expect("1 divides every head dim");
            (chunk, group * head_units)
        };
        let mask = spec.mask();
        Ok(ForwardPlan {
            units,
            config: KernelConfig {
                head_dim,
                group,
                rows,
                block_n,
                chunk,
                padded_dim: head_dim.next_multiple_of(chunk),
                head_units,
                plane_loads,
                left_bounded: mask.left().is_some(),
                right_bounded: mask.right().is_some(),
                softcap: spec.softcap().is_some(),
                alibi: spec.alibi().is_some(),
                mask_mod: false,
                score_mod: false,
                block_mask: false,
                varlen: false,
                split: false,
            },
        })
    }
}

/// A backward's captures-and-block-mask buffer, by the block mask and the captures.
type KeptAux = (Arc<BlockMask>, Vec<u32>, Buffer);

/// Device block masks a device keeps ([`Device::block_mask_buffer`]).
const BLOCK_MASKS_KEPT: usize = 16;

/// Keys per block-mask tile at least (rounded up to whole register blocks). One register block
/// (1): the kernel reads a block's state once per block whatever the tile, and finer tiles
/// leave fewer keys in partial tiles. Measured on lavapipe (benches/dsl, same run pairs, 32/8/128):
/// with 64-key tiles the causal document mask ran at 0.55 of causal's visible FLOP/s and DSL
/// causal at 1.08 of built-in causal's time.
const BLOCK_MASK_KEYS: usize = 1;

/// How a device chooses the forward kernel's tile.
#[derive(Clone, Copy, Debug)]
enum TilePolicy {
    /// The tile autotune measured fastest for the problem's key (the default).
    Autotune,
    /// [`ForwardTile::untuned`], measuring nothing (the kernel suites, to keep one compile per
    /// specialisation).
    Untuned,
    /// One tile for every launch.
    Pinned(ForwardTile),
}

/// A forward launch's grid and numbers, checked against the device's limits.
struct ForwardLaunch {
    config: KernelConfig,
    splits: usize,
    scalars: LaunchScalars,
    cubes: CubeCount,
    combine_cubes: CubeCount,
    units: CubeDim,
}

/// How a forward launch is cut: the kernel's configuration and the units per cube.
#[derive(Clone, Copy, Debug)]
struct ForwardPlan {
    config: KernelConfig,
    units: usize,
}

impl Device {
    /// Writes `src` (whole rows of `row_words` words, packed) to the rows `rows` of `dst`.
    pub fn scatter_rows(
        &self,
        op: &'static str,
        dst: &Buffer,
        src: &[u32],
        rows: &[u32],
        row_words: usize,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let words = rows.len() * row_words;
        let cubes = self.grid_1d(op, words.div_ceil(256))?;
        let (src, rows_buffer) = (self.upload(op, src)?, self.upload(op, rows)?);
        // SAFETY: `rows` index rows of `dst` (pool rows of the cache `dst` mirrors, which has
        // the same size); the kernel guards `at < count · row_words = src.len`.
        unsafe {
            scatter_rows::launch(
                &self.client,
                cubes,
                CubeDim::new_1d(256),
                arg(&src),
                arg(&rows_buffer),
                arg(dst),
                rows.len() as u32,
                row_words,
            );
        }
        Ok(())
    }

    /// Launches decode over a paged cache into the contiguous `o` (`T`, or f32 for a partial)
    /// and `lse` (per row one f32, or a partial's state pair), which the caller sized.
    pub fn decode<T: KernelElement, M: CubeMask, S: CubeScore>(
        &self,
        op: &'static str,
        spec: &AttentionSpec,
        input: DecodeInputs<'_>,
        (o, lse): (&Buffer, &Buffer),
    ) -> Result<()> {
        let batch = input.batch;
        let seq_q = input.seq_q;
        let (head_dim, group) = (spec.head_dim(), spec.group_size());
        let rows = batch * spec.q_heads() * seq_q;
        if rows == 0 {
            return Ok(());
        }
        let hardware = &self.client.properties().hardware;
        let max_units = hardware.max_units_per_cube as usize;
        if group > max_units {
            return Err(Error::DeviceLimit {
                op,
                reason: format!(
                    "a KV group of {group} query heads needs {group} units per cube; {} allows {max_units}",
                    self.name
                ),
            });
        }
        let layout = match self.planes.decode_lanes {
            Some(lanes) => {
                // All (query, query head) rows of a KV head in one plane, up to a bound that
                // keeps the unrolled tile's compile time in check; a power of two, so that the
                // query counts (1 to 16) share few specialisations.
                let rows = (group * seq_q).next_power_of_two().min(DECODE_PLANE_ROWS);
                DecodeLayout::Plane {
                    lanes,
                    rows,
                    row_tiles: (group * seq_q).div_ceil(rows),
                }
            }
            None => {
                let lq_tile = seq_q.min(max_units / group).max(1);
                let plane = hardware.plane_size_max as usize;
                let unit_rows = decode_unit_rows(group * lq_tile, plane);
                let units_per_head = lq_tile * group / unit_rows;
                DecodeLayout::Units {
                    lq_tile,
                    unit_rows,
                    units_per_head,
                    heads_per_cube: decode_heads_per_cube(
                        spec.kv_heads(),
                        units_per_head,
                        plane,
                        max_units,
                    ),
                }
            }
        };
        // The grid's first two dimensions.
        let (tiles, head_cubes) = match layout {
            DecodeLayout::Plane { row_tiles, .. } => (row_tiles, spec.kv_heads()),
            DecodeLayout::Units {
                lq_tile,
                heads_per_cube,
                ..
            } => (seq_q.div_ceil(lq_tile), spec.kv_heads() / heads_per_cube),
        };
        let max_len = input.max_len;
        // The keys read: `key_lo..key_hi`, within the longest sequence.
        let key_hi = input.keys.end.min(max_len);
        let key_lo = input.keys.start.min(key_hi);
        let span = key_hi - key_lo;
        let keys_per_split =
            self.decode_keys_per_split(&layout, head_dim, span, tiles * head_cubes * batch);
        let splits = span.div_ceil(keys_per_split).max(1);
        let mask = spec.mask();
        let row_words = input.storage.words_per_row(head_dim);
        let config = DecodeConfig {
            head_dim,
            group,
            storage: match input.storage {
                StorageKind::Float32 => STORAGE_F32,
                StorageKind::Float16 => STORAGE_F16,
                StorageKind::BFloat16 => STORAGE_BF16,
                StorageKind::Int8 => STORAGE_INT8,
                StorageKind::Int4 => STORAGE_INT4,
            },
            row_words,
            lanes: match input.storage {
                StorageKind::Float32 => 1,
                StorageKind::Float16 | StorageKind::BFloat16 => 2,
                StorageKind::Int8 => 4,
                StorageKind::Int4 => 8,
            },
            // Keys per register block. The plane kernel unrolls its every loop: one key at a
            // time keeps the unrolled body small enough for the CPU's instruction caches on
            // lavapipe (f32 cache, B 1, Lk 4096, same run: MHA 22.8 / 25.6 / 37.6 / 44.9 ms
            // and GQA 32/8 8.0 / 8.8 / 11.5 / 16.2 ms at 1 / 2 / 4 / 8 keys per block).
            block: match layout {
                DecodeLayout::Plane { .. } => 1,
                DecodeLayout::Units { .. } => 4,
            },
            rows: match layout {
                DecodeLayout::Plane { rows, .. } => rows,
                DecodeLayout::Units { unit_rows, .. } => unit_rows,
            },
            plane: match layout {
                DecodeLayout::Plane { lanes, .. } => lanes,
                DecodeLayout::Units { .. } => 0,
            },
            words_per_lane: match layout {
                DecodeLayout::Plane { lanes, .. } => row_words.div_ceil(lanes),
                DecodeLayout::Units { .. } => 0,
            },
            left_bounded: mask.left().is_some(),
            right_bounded: mask.right().is_some(),
            softcap: spec.softcap().is_some(),
            alibi: spec.alibi().is_some(),
            mask_mod: input.mask_mod,
            score_mod: input.score_mod,
        };
        // A partial is written by the split path (f32 output and LSE) even unsplit.
        let partial_out = splits > 1 || input.partial;
        let limit = i32::MAX as usize / 4;
        if max_len > limit {
            return Err(Error::DeviceLimit {
                op,
                reason: format!("sequence lengths above {limit} (got {max_len})"),
            });
        }
        let side = |s: Option<usize>| s.map_or(0, |s| s.min(max_len + seq_q) as i32);
        let slopes = self.slopes(op, spec)?;
        // An unsplit partial is written straight into `o` and `lse` (both f32 then).
        let direct = input.partial && splits == 1;
        let (o_partial, lse_partial) =
            self.partials(op, partial_out && !direct, splits * rows, head_dim)?;
        let (o_split, lse_split) = if direct {
            (o, lse)
        } else {
            (&o_partial, &lse_partial)
        };
        let decode_cubes = self.grid(op, [tiles, head_cubes, splits * batch])?;
        let bottom_right = u32::from(mask.alignment() == crate::spec::Alignment::BottomRight);
        let combine_cubes = self.grid_1d(op, rows.div_ceil(64))?;
        // SAFETY: the kernel reads q rows `< batch · q_heads · seq_q` (q was checked to be that
        // contiguous shape), the lengths and tables of the slots named (the copy's tables hold
        // every live sequence), pool rows of the pages named by those tables (pages of the cache
        // the copy mirrors, slots clamped to the page) and writes only the rows the grid covers,
        // into outputs the caller sized for them.
        unsafe {
            match layout {
                DecodeLayout::Plane { lanes, .. } => plane_decode::launch::<T, M, S>(
                    &self.client,
                    decode_cubes,
                    CubeDim::new_1d(lanes as u32),
                    arg(input.q),
                    arg(input.k),
                    arg(input.v),
                    arg(input.k_scale),
                    arg(input.v_scale),
                    arg(input.tables),
                    arg(input.slots),
                    arg(&slopes),
                    arg(input.aux),
                    arg(o),
                    arg(lse),
                    arg(o_split),
                    arg(lse_split),
                    spec.q_heads() as u32,
                    seq_q as u32,
                    spec.kv_heads() as u32,
                    input.page_size as u32,
                    input.table_base as u32,
                    input.table_stride as u32,
                    bottom_right,
                    side(mask.left()),
                    side(mask.right()),
                    spec.scale_f32(),
                    spec.softcap().unwrap_or(1.0),
                    batch as u32,
                    key_lo as u32,
                    key_hi as u32,
                    keys_per_split as u32,
                    u32::from(partial_out),
                    config,
                ),
                DecodeLayout::Units {
                    lq_tile,
                    units_per_head,
                    heads_per_cube,
                    ..
                } => paged_decode::launch::<T, M, S>(
                    &self.client,
                    decode_cubes,
                    CubeDim::new_1d((heads_per_cube * units_per_head) as u32),
                    arg(input.q),
                    arg(input.k),
                    arg(input.v),
                    arg(input.k_scale),
                    arg(input.v_scale),
                    arg(input.tables),
                    arg(input.slots),
                    arg(&slopes),
                    arg(input.aux),
                    arg(o),
                    arg(lse),
                    arg(o_split),
                    arg(lse_split),
                    spec.q_heads() as u32,
                    seq_q as u32,
                    spec.kv_heads() as u32,
                    input.page_size as u32,
                    input.table_base as u32,
                    input.table_stride as u32,
                    lq_tile as u32,
                    heads_per_cube as u32,
                    bottom_right,
                    side(mask.left()),
                    side(mask.right()),
                    spec.scale_f32(),
                    spec.softcap().unwrap_or(1.0),
                    batch as u32,
                    key_lo as u32,
                    key_hi as u32,
                    keys_per_split as u32,
                    u32::from(partial_out),
                    config,
                ),
            }
            if partial_out && !direct {
                let (partials, out) = ((&o_partial, &lse_partial), (o, lse));
                let shape = (rows, splits, head_dim);
                if input.partial {
                    self.combine::<f32>(combine_cubes, partials, out, shape, true);
                } else {
                    self.combine::<T>(combine_cubes, partials, out, shape, false);
                }
            }
        }
        Ok(())
    }

    /// Launches [`stream_cache`] over the sequences of `input` (its `q`, `seq_q`, `keys` and
    /// `partial` unused): every cached word and scale of them read once, into a scratch sink.
    pub fn stream(&self, op: &'static str, kv_heads: usize, input: DecodeInputs<'_>) -> Result<()> {
        if input.batch == 0 || input.max_len == 0 {
            return Ok(());
        }
        let row_words = input.storage.words_per_row(input.head_dim);
        // The plane decode kernel's layout (its lanes, or 8 where it does not run), over as many
        // cubes as its splits would make.
        let lanes = self.planes.decode_lanes.unwrap_or(READ_LANES);
        let layout = DecodeLayout::Plane {
            lanes,
            rows: 1,
            row_tiles: 1,
        };
        let keys_per_cube = self.decode_keys_per_split(
            &layout,
            input.head_dim,
            input.max_len,
            kv_heads * input.batch,
        );
        let chunks = input.max_len.div_ceil(keys_per_cube);
        let cubes = self.grid(op, [chunks, kv_heads, input.batch])?;
        let sink = self.empty(
            op,
            chunks * kv_heads * input.batch * lanes,
            size_of::<u32>(),
        )?;
        // SAFETY: the kernel reads the tables of the slots named (every live sequence has one),
        // pool rows of the pages they name (tokens below each length, words clamped into the
        // row), and writes one sink word per unit of the grid, which `sink` holds.
        unsafe {
            stream_cache::launch(
                &self.client,
                cubes,
                CubeDim::new_1d(lanes as u32),
                arg(input.k),
                arg(input.v),
                arg(input.k_scale),
                arg(input.v_scale),
                arg(input.tables),
                arg(input.slots),
                arg(&sink),
                kv_heads as u32,
                input.page_size as u32,
                input.table_base as u32,
                input.table_stride as u32,
                keys_per_cube as u32,
                row_words,
                lanes,
                input.storage.is_quantized(),
            );
        }
        Ok(())
    }

    /// Merges `splits` f32 partial states of `rows` rows into `o` and `lse`, or into `o` and
    /// the merged state pairs with `pair_out` (see `combine_splits`).
    ///
    /// # Safety
    /// The partial buffers hold `splits · rows` rows (outputs, and state pairs); `o` holds
    /// `rows` rows and `lse` `rows` values (pairs with `pair_out`); `cubes` covers `rows` units
    /// in cubes of 64.
    unsafe fn combine<T: KernelElement>(
        &self,
        cubes: CubeCount,
        (o_partial, lse_partial): (&Buffer, &Buffer),
        (o, lse): (&Buffer, &Buffer),
        (rows, splits, head_dim): (usize, usize, usize),
        pair_out: bool,
    ) {
        // SAFETY: the caller's contract above.
        unsafe {
            combine_splits::launch::<T>(
                &self.client,
                cubes,
                CubeDim::new_1d(64),
                arg(o_partial),
                arg(lse_partial),
                arg(o),
                arg(lse),
                rows as u32,
                splits as u32,
                head_dim,
                pair_out,
            );
        }
    }

    /// A grid of `[x, y, z]` cubes, or [`Error::DeviceLimit`] when a dimension exceeds what the
    /// device dispatches (65 535 per dimension on wgpu).
    fn grid(&self, op: &'static str, [x, y, z]: [usize; 3]) -> Result<CubeCount> {
        let (mx, my, mz) = self.client.properties().hardware.max_cube_count;
        if x > mx as usize || y > my as usize || z > mz as usize {
            return Err(Error::DeviceLimit {
                op,
                reason: format!(
                    "a grid of {x} x {y} x {z} cubes; {} dispatches at most {mx} x {my} x {mz}",
                    self.name
                ),
            });
        }
        Ok(CubeCount::Static(x as u32, y as u32, z as u32))
    }

    /// `cubes` cubes laid out over the grid's x and y dimensions (kernels index them as
    /// `CUBE_POS_Y · CUBE_COUNT_X + CUBE_POS_X`).
    fn grid_1d(&self, op: &'static str, cubes: usize) -> Result<CubeCount> {
        let max_x = (self.client.properties().hardware.max_cube_count.0 as usize).max(1);
        let x = cubes.clamp(1, max_x);
        self.grid(op, [x, cubes.div_ceil(x).max(1), 1])
    }

    /// Keys per decode split: enough cubes to fill the device (about four per core or
    /// multiprocessor it reports, 64 when it reports neither), at least 256 keys each (a shorter
    /// split costs a merge and buys little); on
    /// lavapipe also few enough keys that a unit stays under its loop limit (see
    /// `kernels/forward.rs`): a key costs about `2 · head_dim` loop iterations, plus the rescale
    /// of a chunk.
    fn decode_keys_per_split(
        &self,
        layout: &DecodeLayout,
        head_dim: usize,
        max_len: usize,
        cubes: usize,
    ) -> usize {
        let hardware = &self.client.properties().hardware;
        let cores = hardware
            .num_streaming_multiprocessors
            .or(hardware.num_cpu_cores)
            .map_or(64, |n| 4 * n as usize);
        let splits = (cores / cubes.max(1)).max(1);
        let mut keys = max_len.div_ceil(splits).max(256);
        if self.loops_limited() {
            keys = keys.min(match layout {
                // Three run-time loop iterations per key at most, with pages of one key: the
                // page loop's, the block loop's, and the block loop's test that ends it; 48 000
                // in all, the forward's budget. A precaution: 50 000 keys in pages of one came
                // out right unsplit (`long_sequences_in_pages_of_one_key_...`).
                DecodeLayout::Plane { .. } => 16_000,
                // Per key, the two head-dim loops and the loading of q and writing of o.
                DecodeLayout::Units { .. } => 60_000 / (3 * head_dim + 8),
            });
        }
        keys.max(1)
    }
}

/// Units per cube of the bytes-once read ([`stream_cache`]) where the plane decode kernel does
/// not run (it needs no plane operations of its own).
const READ_LANES: usize = 8;

/// The most rows a plane decode cube holds. Every row's query and accumulator channels are
/// registers of every lane, unrolled: the compile grows with the rows, and past a point the
/// spills cost more than the K/V loads a second cube repeats. Measured on lavapipe, MQA 32/1,
/// D 128, f32 cache, Lk 4096 (first launch, shader cache off; then the median step):
/// 8 rows 5.5 s, 11.4 ms; 16 rows 19 s, 6.8 ms; 32 rows 79 s, 10.5 ms. The kernel suites
/// compile every row count up to the cap for several configurations, hence 8.
const DECODE_PLANE_ROWS: usize = 8;

/// How a decode launch lays rows on units.
#[derive(Clone, Copy, Debug)]
enum DecodeLayout {
    /// [`plane_decode`]: one plane per cube, its lanes across the head dim, `rows` rows of one
    /// KV head per cube, `row_tiles` cubes per KV head.
    Plane {
        lanes: usize,
        rows: usize,
        row_tiles: usize,
    },
    /// [`paged_decode`]: `unit_rows` rows per unit, `units_per_head` units per KV head,
    /// `heads_per_cube` KV heads and `lq_tile` queries per cube.
    Units {
        lq_tile: usize,
        unit_rows: usize,
        units_per_head: usize,
        heads_per_cube: usize,
    },
}

/// Rows per decode unit for a cube of `cube_rows` (query head, query) rows on a device whose
/// planes (SIMD groups, warps) hold `plane` lanes: one while the rows fill a plane, so that no
/// lane idles; beyond that up to 4, so that a plane's units share each key's load and dequant
/// among more rows instead of the cube running several planes that repeat them. It divides
/// `cube_rows`.
fn decode_unit_rows(cube_rows: usize, plane: usize) -> usize {
    [4, 2]
        .into_iter()
        .find(|&r| cube_rows.is_multiple_of(r) && cube_rows / r >= plane.max(1))
        .unwrap_or(1)
}

/// What `client`'s device's planes do, found by running [`plane_probe`] on a cube of two
/// planes (see [`Planes`]). cubecl's own plane feature flag is not asked: it is off for CPU
/// adapters such as lavapipe, whose subgroup operations work (and are what makes plane loads
/// and plane decode pay there). A probe that fails to compile or to run finds nothing.
fn probe_planes(client: &Client) -> Planes {
    let hardware = &client.properties().hardware;
    let (min, max) = (hardware.plane_size_min, hardware.plane_size_max);
    let units = (2 * max).min(hardware.max_units_per_cube);
    if max == 0 || units < max {
        return Planes::default();
    }
    let words = 3 * units as usize;
    let out = client.empty(words * size_of::<u32>());
    // SAFETY: one cube of `units` units, each writing its own three words of `out`.
    unsafe {
        plane_probe::launch(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(units),
            BufferArg::from_raw_parts(out.clone(), words),
        );
    }
    let Ok(bytes) = client.read_one(out) else {
        return Planes::default();
    };
    let found = &u32::from_bytes(&bytes)[..words];
    let units = found.chunks(3);
    let loads = min >= PLANE_LOAD_LANES
        && max.is_multiple_of(PLANE_LOAD_LANES)
        && units.clone().all(|unit| unit[0] == 1);
    let lanes = max as usize;
    let full_sum = (lanes * (lanes + 1) / 2) as u32;
    let decode = min == max
        && units
            .enumerate()
            .all(|(u, unit)| unit[1] == full_sum && unit[2] as usize == u % lanes);
    Planes {
        loads,
        decode_lanes: decode.then_some(lanes),
    }
}

/// `buffer` as a kernel argument (a zero-length buffer binds its one placeholder element).
///
/// # Safety
/// As [`BufferArg::from_raw_parts`]: the kernel it is bound to must not access past `len`
/// elements (the launches' SAFETY comments say why each does not).
unsafe fn arg(buffer: &Buffer) -> BufferArg {
    unsafe { BufferArg::from_raw_parts(buffer.handle.clone(), buffer.len.max(1)) }
}

/// KV heads per decode cube, for KV heads of `units_per_head` units each on a device whose
/// planes hold `plane` lanes: one when a head's units fill a plane; otherwise the largest
/// divisor of `kv_heads` whose units still fit in one plane (and the device's cube), so that
/// the lanes a lone head would leave idle serve other heads (MHA's one row per head at Lq 1: a
/// plane of 8 heads on lavapipe instead of 8 planes with one live lane each).
fn decode_heads_per_cube(
    kv_heads: usize,
    units_per_head: usize,
    plane: usize,
    max_units: usize,
) -> usize {
    let fit = plane.min(max_units) / units_per_head.max(1);
    (1..=fit.min(kv_heads))
        .rev()
        .find(|&h| kv_heads.is_multiple_of(h))
        .unwrap_or(1)
}

/// A device buffer of `len` elements (a clone is another handle to the same memory).
#[derive(Clone)]
pub struct Buffer {
    handle: Handle,
    len: usize,
}

/// The launch's runtime numbers. The kernel does its index arithmetic in 32 bits; window sides
/// wider than both sequences are clamped to `seq_q + seq_k`, where they no longer hide anything.
/// The query tiles of a packed launch, a pair of words per cube of the grid's x axis: the
/// sequence `s` and the tile `t` within it (`cu` holds `cu_seqlens_q` in its first half).
/// Sequences in order, each's tiles in order: consecutive cubes walk the same sequence's keys.
fn varlen_tiles(cu: &[u32], block_m: usize) -> Vec<[u32; 2]> {
    let cu_q = &cu[..cu.len() / 2];
    let mut tiles = Vec::new();
    for (s, w) in cu_q.windows(2).enumerate() {
        let n = (w[1] - w[0]).div_ceil(block_m as u32);
        tiles.extend((0..n).map(|t| [s as u32, t]));
    }
    tiles
}

fn launch_scalars(
    spec: &AttentionSpec,
    shape: ProblemShape,
    packed: Option<super::Packed<'_>>,
    keys_per_split: usize,
    op: &'static str,
) -> Result<LaunchScalars> {
    // Packed: the axes' lengths are the totals (the grid's `shape` has the longest sequence's).
    let ProblemShape {
        batch,
        seq_q,
        seq_k,
    } = match packed {
        Some(packed) => ProblemShape {
            batch: shape.batch,
            seq_q: packed.total_q,
            seq_k: packed.total_k,
        },
        None => shape,
    };
    let limit = i32::MAX as usize / 4;
    if seq_q > limit || seq_k > limit {
        return Err(Error::DeviceLimit {
            op,
            reason: format!("sequence lengths above {limit} (got {seq_q} and {seq_k})"),
        });
    }
    let mask = spec.mask();
    let side = |s: Option<usize>| s.map_or(0, |s| s.min(seq_q + seq_k) as i32);
    Ok(LaunchScalars {
        q_heads: spec.q_heads() as u32,
        seq_q: seq_q as u32,
        seq_k: seq_k as u32,
        // Packed, the kernel takes each sequence's diagonal: 1 asks for bottom-right.
        diag_offset: match packed {
            Some(_) => i32::from(mask.alignment() == crate::spec::Alignment::BottomRight),
            None => mask.diagonal(0, seq_q, seq_k) as i32,
        },
        left: side(mask.left()),
        right: side(mask.right()),
        scale: spec.scale_f32(),
        softcap: spec.softcap().unwrap_or(1.0),
        batch: batch as u32,
        keys_per_split: keys_per_split as u32,
    })
}

fn kernel_error(op: &'static str, error: impl std::fmt::Display) -> Error {
    Error::Kernel {
        op,
        reason: error.to_string(),
    }
}

#[cfg(any(feature = "cuda", feature = "hip"))]
fn pick_native() -> Option<cubecl::Device> {
    #[cfg(feature = "cuda")]
    if let Ok(device) = cubecl::Device::cuda(0) {
        return Some(device);
    }
    #[cfg(feature = "hip")]
    if let Ok(device) = cubecl::Device::rocm(0) {
        return Some(device);
    }
    None
}

fn pick_device() -> Result<cubecl::Device> {
    #[cfg(any(feature = "cuda", feature = "hip"))]
    if let Some(device) = pick_native() {
        return Ok(device);
    }
    #[cfg(feature = "wgpu")]
    {
        use cubecl::device::WgpuDeviceKind;
        #[cfg(feature = "vulkan")]
        let device = cubecl::Device::vulkan(WgpuDeviceKind::DefaultDevice);
        #[cfg(not(feature = "vulkan"))]
        let device = cubecl::Device::wgpu(WgpuDeviceKind::DefaultDevice);
        return device.map_err(|e| Error::NoDevice {
            backend: "wgpu",
            reason: format!("{e} (on Linux without a GPU, Mesa's lavapipe provides a software Vulkan device: apt-get install mesa-vulkan-drivers)"),
        });
    }
    #[allow(unreachable_code)]
    Err(Error::NoDevice {
        backend: "cubecl",
        reason: "no CUDA or ROCm device found".into(),
    })
}

/// Blocks of the other side one unit of a prefill kernel (the forward, or either main kernel of
/// the backward) may walk on a device whose loops are limited ([`Device::loops_limited`]),
/// when it owns `rows` register rows of `padded_dim` channels and walks the head dim in chunks
/// of `chunk`. Run-time loop iterations, each loop counting one more than its trips (the test
/// that ends it): loading and writing the rows, `rows · (padded_dim + 1)` each; per block, two
/// head-dim loops of `padded_dim / chunk + 1` and the block loop's own. The count misses
/// something: with the forward's 4x8p tile at head dim 64, 30 000 keys came out wrong when a
/// split held 64 500 counted iterations and right at 60 000 (`long_key_ranges_...` in
/// tests/cube_forward.rs); a budget of 50 000 leaves a margin.
pub(super) fn blocks_within_loop_budget(rows: usize, padded_dim: usize, chunk: usize) -> usize {
    const BUDGET: usize = 50_000;
    let fixed = 2 * rows * (padded_dim + 1) + 16;
    let per_block = 2 * (padded_dim / chunk + 1) + 1;
    (BUDGET.saturating_sub(fixed) / per_block).max(1)
}
