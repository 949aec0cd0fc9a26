//! The GPU backend: attention kernels written once in cubecl and compiled, per spec, for wgpu
//! (Vulkan, Metal, DX12; Mesa's lavapipe without a GPU), CUDA and HIP.
//!
//! ```no_run
//! use gqa::{cube::CubeDevice, Gqa};
//! use ndarray::Array4;
//! let device = CubeDevice::try_default()?;
//! let attention = Gqa::<32, 8, 128>::new().causal();
//! let q = Array4::<f32>::zeros((1, 32, 256, 128));
//! let kv = Array4::<f32>::zeros((1, 8, 256, 128));
//! let out = attention.try_forward(&device, q.view(), kv.view(), kv.view())?; // out.o, out.lse
//! # Ok::<(), gqa::Error>(())
//! ```
//!
//! The forward kernel (its docs are in `kernels/forward.rs`) is FlashAttention-2-shaped and
//! GQA-aware: a cube holds every query head of one KV group, each unit a register tile of query
//! rows of one head, and every K/V element loaded serves the whole group. Its compile-time
//! configuration comes from the [`AttentionSpec`] (head dim, group, which mask sides, softcap,
//! ALiBi) and the [`ForwardTile`] (rows per unit, keys per block, how K and V are loaded).
//! Packed variable-length sequences ([`CubeDevice::try_forward_varlen`]) run the same kernel
//! with one cube per query tile of a sequence.
//!
//! The decode kernels (`kernels/decode.rs`) run a few queries against the KV cache's device copy
//! ([`DeviceKvCache`]): with the lanes of a plane across the head dim where the device's plane
//! sums work ([`CubeDevice::plane_decode_lanes`]), with rows per unit elsewhere.
//!
//! The backward ([`CubeDevice::try_backward_with`], on device tensors
//! [`CubeDevice::try_backward_device_with`] and, into kept gradients,
//! [`CubeDevice::try_backward_into_with`]; docs in `kernels/backward.rs`) is three kernels: a
//! row prepass, `dK`/`dV` with one cube per key tile and KV head that sums the group's query
//! heads in its registers, and `dQ` laid out like the forward; no atomics.
//!
//! What a device's planes do is found, not assumed: a probe kernel runs when a device opens
//! (cubecl's own plane flag is off for CPU adapters such as lavapipe, whose subgroup operations
//! work and are what makes both kernels fast there).
//!
//! The room's layout: this file and `cache.rs` are the public API; `runtime.rs` the host side
//! (device, buffers, launch plans, probes; `runtime/backward.rs` the backward's); `tune.rs` the forward tile's autotune; `kernels/`
//! the kernel side (`#[cube]` code only).
//!
//! The API is the same in every build: with no cubecl runtime feature on,
//! [`CubeDevice::try_default`] returns [`Error::NotCompiledWith`] and nothing else can be
//! reached.
//!
//! Element types: `f32`, `f16` and `bf16` storage with `f32` arithmetic; a device without the
//! type (lavapipe has no bf16) is an [`Error::UnsupportedDType`], checked before launch. The LSE
//! is always `f32`; a fully masked row gets output 0 and LSE −∞.

mod cache;
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]
mod kernels;
/// The kernels' accurate `exp`, `ln`, `tanh`, which DSL mods call in kernels.
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]
pub(crate) use kernels::math as kernel_math;
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]
mod runtime;
#[cfg(not(any(feature = "wgpu", feature = "cuda", feature = "hip")))]
#[path = "disabled.rs"]
mod runtime;
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]
mod tune;

use std::marker::PhantomData;

pub use cache::{DeviceKvCache, MAX_DECODE_QUERIES};

/// The backward's `dS` stage limit a device starts with
/// ([`CubeDevice::with_backward_stage_bytes`]): none, `dQ`'s kernel recomputes `S` and `dP`.
pub const DEFAULT_BACKWARD_STAGE_BYTES: usize = 0;

use ndarray::{Array4, ArrayView3, ArrayView4, Dimension};

use crate::dsl::{MaskMod, Mods, NoMask, NoScore, ScoreMod};
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::spec::{AttentionSpec, ProblemShape, Varlen};

/// An element type the kernels run on: `f32`, [`half::f16`], [`half::bf16`].
pub trait CubeElement: Element + runtime::KernelElement {}
impl CubeElement for f32 {}
impl CubeElement for half::f16 {}
impl CubeElement for half::bf16 {}

/// A device the kernels run on, with its cubecl client.
pub struct CubeDevice {
    inner: runtime::Device,
}

impl CubeDevice {
    /// The best device this build can reach (see the crate's feature table): CUDA or ROCm where
    /// compiled in and present, else wgpu's default adapter — a discrete GPU, an integrated
    /// one, or a software one such as lavapipe.
    ///
    /// Errors: [`Error::NotCompiledWith`] without a cubecl runtime feature, [`Error::NoDevice`]
    /// when none is present.
    pub fn try_default() -> Result<CubeDevice> {
        Ok(CubeDevice {
            inner: runtime::Device::open_default()?,
        })
    }

    /// What cubecl calls the device.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// The tile every forward launch on this device uses, if one was pinned with
    /// [`CubeDevice::try_with_forward_tile`]. Without one, each launch uses the tile autotune
    /// measured fastest for its problem ([`CubeDevice::tuned_forward_tile`]), or
    /// [`CubeDevice::untuned_forward_tile`] on a device made [`CubeDevice::untuned`].
    pub fn pinned_forward_tile(&self) -> Option<ForwardTile> {
        self.inner.pinned_forward_tile()
    }

    /// This device with the forward kernel's tile chosen without measuring
    /// ([`CubeDevice::untuned_forward_tile`]): one compile per specialisation and no timing on
    /// a key's first launch. The kernel suites run so; serving code wants the autotuned default.
    pub fn untuned(mut self) -> CubeDevice {
        self.inner.set_untuned();
        self
    }

    /// The tile used without measuring at `head_dim`: [`ForwardTile::untuned`] with
    /// [`KvLoads::Plane`] where this device runs plane loads, else with [`KvLoads::Uniform`].
    pub fn untuned_forward_tile(&self, head_dim: usize) -> ForwardTile {
        self.inner.untuned_forward_tile(head_dim)
    }

    /// How many lanes of a plane share each row of the cache in decode, where the plane decode
    /// kernel runs: the device's planes all have that many lanes and a probe kernel, run when
    /// the device was opened, found their sums and broadcasts right. `None` where it does not
    /// run (or after [`CubeDevice::with_unit_decode`]): decode then gives each unit rows of its
    /// own (`src/cube/kernels/decode.rs` has both layouts).
    pub fn plane_decode_lanes(&self) -> Option<usize> {
        self.inner.plane_decode_lanes()
    }

    /// This device decoding with the per-unit layout even where the plane kernel runs: the
    /// layout devices without plane reductions get, to prove or measure it on one that has them.
    pub fn with_unit_decode(mut self) -> CubeDevice {
        self.inner.set_unit_decode();
        self
    }

    /// This device with the backward's `dS` stage allowed up to `bytes` of device memory per
    /// call (0, the default: no stage). With a stage, the `dK`/`dV` kernel writes each pair's
    /// `dS` for a chunk of query rows (`batch · q_heads · rows · seq_k` f32 words; at least
    /// one tile of rows, whatever the limit) and the `dQ` kernel reads it back, for five block
    /// products per pair instead of seven; longer problems run in chunks, a launch pair each
    /// (`src/cube/kernels/backward.rs`). On lavapipe (32/8/128, L 1024: a 128 MiB stage) the
    /// staged backward took 0.80–0.92 of the default's time (`benches/backward.rs`, four
    /// runs). The gradients are the same under the oracle's tolerance, and their bits do not
    /// depend on the chunking.
    pub fn with_backward_stage_bytes(mut self, bytes: usize) -> CubeDevice {
        self.inner.set_backward_stage_bytes(bytes);
        self
    }

    /// The most bytes the backward's `dS` stage takes on this device
    /// ([`CubeDevice::with_backward_stage_bytes`]).
    pub fn backward_stage_bytes(&self) -> usize {
        self.inner.backward_stage_bytes()
    }

    /// Whether forward tiles with [`KvLoads::Plane`] run on this device: its planes have at
    /// least 8 lanes, and a probe kernel, run when the device was opened, found their
    /// broadcasts right.
    pub fn plane_loads(&self) -> bool {
        self.inner.plane_loads()
    }

    /// The tile autotune settled on for a forward of `spec` over `T` with these sizes (their
    /// key: see `src/cube/tune.rs`), or `None` while no launch of that key has been tuned.
    pub fn tuned_forward_tile<T: CubeElement>(
        &self,
        spec: &AttentionSpec,
        batch: usize,
        seq_q: usize,
        seq_k: usize,
    ) -> Option<ForwardTile> {
        self.inner.tuned_forward_tile::<T>(
            spec,
            ProblemShape {
                batch,
                seq_q,
                seq_k,
            },
        )
    }

    /// How many cubes the keys of a forward of `seq_k` keys cut into `tile` are split over (and
    /// their partial results merged): more than one only where a shader invocation's loops are
    /// limited (lavapipe stops looping after about 65 000 iterations; `kernels/forward.rs`).
    ///
    /// Errors: [`Error::DeviceLimit`] for a tile the device cannot run.
    pub fn forward_key_splits(
        &self,
        spec: &AttentionSpec,
        tile: ForwardTile,
        seq_k: usize,
    ) -> Result<usize> {
        self.inner.forward_key_splits(spec, tile, seq_k)
    }

    /// The tiles `(query rows, keys)` in which a forward of `spec` cut into `tile` classifies
    /// a user mask ([`crate::dsl::block`]): the cube's query rows, and whole register blocks
    /// of at least 64 keys.
    ///
    /// Errors: [`Error::DeviceLimit`] for a tile the device cannot run.
    pub fn block_mask_tiles(
        &self,
        spec: &AttentionSpec,
        tile: ForwardTile,
    ) -> Result<(usize, usize)> {
        self.inner.block_mask_tiles(spec, tile)
    }

    /// The tiles `(query rows, keys)` in which the backward of `spec` classifies a user mask
    /// ([`crate::dsl::block`]): tiles holding whole cubes and blocks of both of its main
    /// kernels (docs in `kernels/backward.rs`).
    ///
    /// Errors: [`Error::DeviceLimit`] for a group the device cannot run.
    pub fn backward_block_mask_tiles(&self, spec: &AttentionSpec) -> Result<(usize, usize)> {
        self.inner.backward_block_mask_tiles(spec)
    }

    /// The cooperative-matrix products (`m`, `n`, `k`) the device reports for `dtype` operands
    /// with f32 accumulators: what a matrix-core path of the forward kernel could use. Empty on
    /// lavapipe. No such path is in this crate yet (the forward kernel's tile-product seam,
    /// `src/cube/kernels/products.rs`, says why); every launch uses the register products.
    pub fn matrix_core_shapes(&self, dtype: DType) -> Vec<(u32, u32, u32)> {
        self.inner.matrix_core_shapes(dtype)
    }

    /// This device with the forward kernel cut into `tile` for every head dim: to compare
    /// tiles (benchmarks do) or to prove one against the oracle (the kernel suites do).
    ///
    /// Errors: [`Error::DeviceLimit`] unless `1 <= rows <= 16` and `1 <= block_n <= 16` (larger
    /// register tiles spill, and compile for minutes on lavapipe).
    pub fn try_with_forward_tile(mut self, tile: ForwardTile) -> Result<CubeDevice> {
        let valid = 1..=ForwardTile::MAX;
        if !valid.contains(&tile.rows) || !valid.contains(&tile.block_n) {
            return Err(Error::DeviceLimit {
                op: "cube::forward_tile",
                reason: format!(
                    "a forward tile needs 1..={} rows and keys per block, got {tile:?}",
                    ForwardTile::MAX
                ),
            });
        }
        self.inner.set_forward_tile(tile);
        Ok(self)
    }

    /// Whether kernels can run on `dtype` here (`f64` never: it is the oracle's precision).
    pub fn supports(&self, dtype: DType) -> bool {
        self.inner.supports(dtype)
    }

    /// Waits until every launch queued on the device has finished; an error a launch raised
    /// (a kernel that failed to compile, a device fault) surfaces here. Launches are
    /// asynchronous: time them with this (benchmarks do).
    pub fn try_sync(&self) -> Result<()> {
        self.inner.sync("sync")
    }

    /// Copies a host tensor to the device (contiguous, row-major).
    pub fn try_upload<T: CubeElement>(&self, x: ArrayView4<T>) -> Result<DeviceTensor<T>> {
        let data: Vec<T> = x.iter().copied().collect();
        let shape = x.shape().to_vec();
        let strides = contiguous_strides(&shape);
        self.try_upload_strided(&data, 0, &shape, &strides)
    }

    /// Places `buffer` on the device and views it as a tensor of `shape` starting at element
    /// `offset` with element `strides` — a view into a larger allocation, as a model's packed
    /// QKV projection produces. Every element of the view must lie inside `buffer`.
    pub fn try_upload_strided<T: CubeElement>(
        &self,
        buffer: &[T],
        offset: usize,
        shape: &[usize],
        strides: &[usize],
    ) -> Result<DeviceTensor<T>> {
        check_view("upload", buffer.len(), offset, shape, strides)?;
        Ok(DeviceTensor {
            buffer: self.inner.upload("upload", buffer)?,
            device: self.inner.key().clone(),
            offset,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            element: PhantomData,
        })
    }

    /// Copies a device tensor back to the host.
    pub fn try_download<T: CubeElement>(&self, x: &DeviceTensor<T>) -> Result<ndarray::ArrayD<T>> {
        self.check_owns("download", &x.device)?;
        let data = self.inner.download::<T>("download", &x.buffer)?;
        let gathered = ndarray::ArrayD::from_shape_fn(x.shape.clone(), |index| {
            let at = x.offset
                + index
                    .slice()
                    .iter()
                    .zip(&x.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            data[at]
        });
        Ok(gathered)
    }

    /// Attention of device tensors `q: [batch, q_heads, seq_q, head_dim]`, `k`, `v: [batch,
    /// kv_heads, seq_k, head_dim]` (any strides) as `spec` defines it. Returns contiguous `o`
    /// and an `f32` LSE `[batch, q_heads, seq_q]`, allocated here: a serving loop reuses its
    /// outputs with [`CubeDevice::try_forward_into`] instead.
    pub fn try_forward_device<T: CubeElement>(
        &self,
        spec: &AttentionSpec,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        v: &DeviceTensor<T>,
    ) -> Result<DeviceOutput<T>> {
        self.try_forward_device_with(spec, &Mods::none(), q, k, v)
    }

    /// [`CubeDevice::try_forward_device`] with user mods ([`crate::dsl`]): one kernel is
    /// compiled per mod type (and per spec specialisation), its captures uploaded per call.
    pub fn try_forward_device_with<T: CubeElement, M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        v: &DeviceTensor<T>,
    ) -> Result<DeviceOutput<T>> {
        let shape = spec.check_shapes("cube::forward", &q.shape, &k.shape, &v.shape)?;
        let mut out = self.try_forward_output(spec, shape.batch, shape.seq_q)?;
        self.try_forward_into_with(spec, mods, q, k, v, &mut out)?;
        Ok(out)
    }

    /// Outputs for [`CubeDevice::try_forward_into`]: contiguous `o: [batch, q_heads, seq_q,
    /// head_dim]` and `lse: [batch, q_heads, seq_q]`, uninitialised until a forward writes them.
    pub fn try_forward_output<T: CubeElement>(
        &self,
        spec: &AttentionSpec,
        batch: usize,
        seq_q: usize,
    ) -> Result<DeviceOutput<T>> {
        const OP: &str = "cube::forward_output";
        let rows = [batch, spec.q_heads(), seq_q];
        let lens = (rows.iter().try_fold(1usize, |n, &x| n.checked_mul(x)))
            .and_then(|n| Some((n, n.checked_mul(spec.head_dim())?)));
        let Some((lse_len, o_len)) = lens else {
            return Err(Error::DeviceLimit {
                op: OP,
                reason: format!(
                    "an output of {rows:?} rows of {} overflows",
                    spec.head_dim()
                ),
            });
        };
        let key = self.inner.key().clone();
        let o_shape = vec![batch, spec.q_heads(), seq_q, spec.head_dim()];
        Ok(DeviceOutput {
            o: DeviceTensor::contiguous(
                self.inner.empty(OP, o_len, size_of::<T>())?,
                key.clone(),
                o_shape,
            ),
            lse: DeviceTensor::contiguous(
                self.inner.empty(OP, lse_len, size_of::<f32>())?,
                key,
                rows.to_vec(),
            ),
        })
    }

    /// [`CubeDevice::try_forward_device`] writing into `out` (made by
    /// [`CubeDevice::try_forward_output`] for this problem's batch and `seq_q`, or returned by
    /// an earlier forward of the same shape). Launch constants (strides, ALiBi slopes) are
    /// uploaded on first use and reused, so a steady-state call allocates and uploads nothing,
    /// except the f32 partials of a key range split over several cubes (lavapipe's loop limit,
    /// see the kernel's docs), which come from cubecl's memory pool.
    ///
    /// Errors: as [`CubeDevice::try_forward_device`], and [`Error::Shape`] when `out` is not
    /// the contiguous `o` and `lse` of this problem.
    pub fn try_forward_into<T: CubeElement>(
        &self,
        spec: &AttentionSpec,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        v: &DeviceTensor<T>,
        out: &mut DeviceOutput<T>,
    ) -> Result<()> {
        self.try_forward_into_with(spec, &Mods::none(), q, k, v, out)
    }

    /// [`CubeDevice::try_forward_into`] with user mods ([`crate::dsl`]). The captures are a
    /// launch constant like the strides: uploaded when they change, reused otherwise.
    pub fn try_forward_into_with<T: CubeElement, M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        v: &DeviceTensor<T>,
        out: &mut DeviceOutput<T>,
    ) -> Result<()> {
        const OP: &str = "cube::forward";
        let shape = spec.check_shapes(OP, &q.shape, &k.shape, &v.shape)?;
        for tensor in [q, k, v] {
            self.check_owns(OP, &tensor.device)?;
        }
        self.check_output(
            OP,
            out,
            [shape.batch, spec.q_heads(), shape.seq_q],
            spec.head_dim(),
        )?;
        let layout = self.input_layout(OP, [q, k, v])?;
        let aux = self.inner.constant(OP, &mods.captured_words())?;
        self.inner.forward::<T, M, S>(ForwardCall {
            op: OP,
            spec,
            shape,
            q: &q.buffer,
            k: &k.buffer,
            v: &v.buffer,
            layout,
            o: &out.o.buffer,
            lse: &out.lse.buffer,
            aux: &aux,
            mask_mod: !M::TRIVIAL,
            score_mod: !S::TRIVIAL,
            blocks: (!M::TRIVIAL && mods.block_masks()).then_some(mods as &dyn BlockSource),
            packed: None,
        })
    }

    /// Attention of variable-length sequences packed along one axis ([`Varlen`], as
    /// [`crate::oracle::try_forward_varlen`] defines it), on device tensors `q: [1, q_heads,
    /// total_q, head_dim]`, `k`, `v: [1, kv_heads, total_k, head_dim]` (any strides), into
    /// `out` (of [`CubeDevice::try_forward_output`] for a batch of one and `total_q` queries).
    /// One cube per (query tile of a sequence, KV head): a cube's tiles start at its
    /// sequence's first query and read only its keys, and no cube is launched past a
    /// sequence's end. The offsets and the tiles' table are a launch constant (uploaded once
    /// per packing and tile, then reused).
    ///
    /// Errors: as [`CubeDevice::try_forward_into`], [`Error::Shape`] when the tensors are not
    /// the packing's, and [`Error::DeviceLimit`] past 32-bit offsets.
    pub fn try_forward_varlen_into<T: CubeElement>(
        &self,
        spec: &AttentionSpec,
        packing: &Varlen,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        v: &DeviceTensor<T>,
        out: &mut DeviceOutput<T>,
    ) -> Result<()> {
        const OP: &str = "cube::forward_varlen";
        let shape = spec.check_shapes(OP, &q.shape, &k.shape, &v.shape)?;
        packing.check_packed(OP, shape)?;
        for tensor in [q, k, v] {
            self.check_owns(OP, &tensor.device)?;
        }
        self.check_output(OP, out, [1, spec.q_heads(), shape.seq_q], spec.head_dim())?;
        let layout = self.input_layout(OP, [q, k, v])?;
        let offsets = packing.cu_seqlens_q().iter().chain(packing.cu_seqlens_k());
        let cu = offsets
            .map(|&x| u32::try_from(x))
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| Error::DeviceLimit {
                op: OP,
                reason: "packed offsets must fit in 32 bits".into(),
            })?;
        let aux = self.inner.constant(OP, &Mods::none().captured_words())?;
        self.inner.forward::<T, NoMask, NoScore>(ForwardCall {
            op: OP,
            spec,
            shape: crate::spec::ProblemShape {
                batch: packing.sequences(),
                seq_q: packing.max_seq_q(),
                seq_k: packing.max_seq_k(),
            },
            q: &q.buffer,
            k: &k.buffer,
            v: &v.buffer,
            layout,
            o: &out.o.buffer,
            lse: &out.lse.buffer,
            aux: &aux,
            mask_mod: false,
            score_mod: false,
            blocks: None,
            packed: Some(Packed {
                cu: &cu,
                total_q: shape.seq_q,
                total_k: shape.seq_k,
            }),
        })
    }

    /// [`CubeDevice::try_forward_varlen_into`] on host arrays: uploads, runs, downloads.
    pub fn try_forward_varlen<T: CubeElement>(
        &self,
        spec: &AttentionSpec,
        packing: &Varlen,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        const OP: &str = "cube::forward_varlen";
        let shape = spec.check_shapes(OP, q.shape(), k.shape(), v.shape())?;
        packing.check_packed(OP, shape)?;
        let (q, k, v) = (
            self.try_upload(q)?,
            self.try_upload(k)?,
            self.try_upload(v)?,
        );
        let mut out = self.try_forward_output(spec, 1, shape.seq_q)?;
        self.try_forward_varlen_into(spec, packing, &q, &k, &v, &mut out)?;
        self.download_output(&out)
    }

    /// The dtype check and the `[offset, strides..]` words of q, k and v for a launch.
    fn input_layout<T: CubeElement>(
        &self,
        op: &'static str,
        tensors: [&DeviceTensor<T>; 3],
    ) -> Result<[u32; 15]> {
        if !self.supports(T::DTYPE) {
            return Err(Error::UnsupportedDType {
                op,
                dtype: T::DTYPE,
                device: self.name().to_string(),
            });
        }
        let mut layout = [0u32; 15];
        for (slot, tensor) in layout.chunks_mut(5).zip(tensors) {
            let fields = std::iter::once(tensor.offset).chain(tensor.strides.iter().copied());
            for (dst, value) in slot.iter_mut().zip(fields) {
                *dst = u32::try_from(value).map_err(|_| Error::DeviceLimit {
                    op,
                    reason: format!("tensor offsets and strides must fit in 32 bits, got {value}"),
                })?;
            }
        }
        Ok(layout)
    }

    /// A forward's outputs, downloaded.
    fn download_output<T: CubeElement>(&self, out: &DeviceOutput<T>) -> Result<HostOutput<T>> {
        let o = self
            .try_download(&out.o)?
            .into_dimensionality()
            .expect("o is 4-D");
        let lse = self
            .try_download(&out.lse)?
            .into_dimensionality()
            .expect("lse is 3-D");
        Ok(HostOutput { o, lse })
    }

    /// Checks that `out` is this device's contiguous `o: [rows.., head_dim]` and `lse: [rows..]`
    /// (the outputs of a forward or decode of `rows = [batch, q_heads, seq_q]`).
    pub(crate) fn check_output<T: CubeElement>(
        &self,
        op: &'static str,
        out: &DeviceOutput<T>,
        rows: [usize; 3],
        head_dim: usize,
    ) -> Result<()> {
        self.check_owns(op, &out.o.device)?;
        self.check_owns(op, &out.lse.device)?;
        let o_shape = [rows[0], rows[1], rows[2], head_dim];
        let check = |name: &'static str,
                     shape: &Vec<usize>,
                     offset: usize,
                     strides: &Vec<usize>,
                     expected: &[usize]| {
            if shape.as_slice() != expected
                || offset != 0
                || *strides != contiguous_strides(expected)
            {
                return Err(Error::Shape {
                    op,
                    tensor: name,
                    got: shape.clone(),
                    expected: format!("{expected:?}, contiguous"),
                });
            }
            Ok(())
        };
        check("o", &out.o.shape, out.o.offset, &out.o.strides, &o_shape)?;
        check(
            "lse",
            &out.lse.shape,
            out.lse.offset,
            &out.lse.strides,
            &rows,
        )
    }

    /// [`CubeDevice::try_forward_device`] on host arrays: uploads, runs, downloads.
    pub fn try_forward<T: CubeElement>(
        &self,
        spec: &AttentionSpec,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        self.try_forward_with(spec, &Mods::none(), q, k, v)
    }

    /// [`CubeDevice::try_forward`] with user mods ([`crate::dsl`]).
    pub fn try_forward_with<T: CubeElement, M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        // Shapes are checked before anything is copied.
        spec.check_shapes("cube::forward", q.shape(), k.shape(), v.shape())?;
        let (q, k, v) = (
            self.try_upload(q)?,
            self.try_upload(k)?,
            self.try_upload(v)?,
        );
        let out = self.try_forward_device_with(spec, mods, &q, &k, &v)?;
        self.download_output(&out)
    }

    /// The gradients of attention ([`crate::oracle::try_backward`] defines them) on the
    /// device, given the forward's output `forward` for the same problem, spec and mods, the
    /// upstream gradient `d_o` (the shape of `q`) and optionally `d_lse` (`[batch, q_heads,
    /// seq_q]`). The forward's `O` and LSE are reused, not recomputed. Three kernels (docs in
    /// `kernels/backward.rs`): a row prepass, `dK`/`dV` with one cube per (key tile, KV head,
    /// batch entry) that sums the group in its registers and writes each KV head's gradient
    /// once, and `dQ` laid out like the forward; no atomics, the same bits on
    /// every launch (a device with [`CubeDevice::with_backward_stage_bytes`] stages `dS` for
    /// `dQ` instead of recomputing it).
    ///
    /// Errors: [`Error::Shape`] naming the tensor; [`Error::UnsupportedDType`];
    /// [`Error::DeviceLimit`] past the device's limits.
    ///
    /// ```no_run
    /// use gqa::{cube::CubeDevice, Gqa};
    /// use ndarray::Array4;
    /// let device = CubeDevice::try_default()?;
    /// let attention = Gqa::<4, 2, 8>::new().causal();
    /// let q = Array4::<f32>::from_elem((1, 4, 3, 8), 0.5);
    /// let kv = Array4::<f32>::from_elem((1, 2, 5, 8), 0.25);
    /// let out = attention.try_forward(&device, q.view(), kv.view(), kv.view())?;
    /// let d_o = Array4::<f32>::ones((1, 4, 3, 8));
    /// let grads = attention.try_backward(&device, q.view(), kv.view(), kv.view(), &out, d_o.view())?;
    /// assert_eq!(grads.dk.shape(), &[1, 2, 5, 8]); // one gradient per KV head
    /// # Ok::<(), gqa::Error>(())
    /// ```
    pub fn try_backward_with<T: CubeElement, M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        [q, k, v]: [ArrayView4<T>; 3],
        forward: &HostOutput<T>,
        d_o: ArrayView4<T>,
        d_lse: Option<ArrayView3<f32>>,
    ) -> Result<HostGradients<T>> {
        const OP: &str = "cube::backward";
        // Shapes are checked before anything is copied.
        spec.check_backward_shapes(
            OP,
            [q.shape(), k.shape(), v.shape()],
            forward.o.shape(),
            forward.lse.shape(),
            d_o.shape(),
            d_lse.as_ref().map(|d| d.shape()),
        )?;
        let upload_f32 = |x: ArrayView3<f32>| {
            let data: Vec<f32> = x.iter().copied().collect();
            let shape = x.shape().to_vec();
            let strides = contiguous_strides(&shape);
            self.try_upload_strided(&data, 0, &shape, &strides)
        };
        let (q, k, v, d_o) = (
            self.try_upload(q)?,
            self.try_upload(k)?,
            self.try_upload(v)?,
            self.try_upload(d_o)?,
        );
        let forward = DeviceOutput {
            o: self.try_upload(forward.o.view())?,
            lse: upload_f32(forward.lse.view())?,
        };
        let d_lse = d_lse.map(upload_f32).transpose()?;
        let grads = self.try_backward_device_with(
            spec,
            mods,
            [&q, &k, &v],
            &forward,
            &d_o,
            d_lse.as_ref(),
        )?;
        let download = |x: &DeviceTensor<T>| -> Result<Array4<T>> {
            Ok(self
                .try_download(x)?
                .into_dimensionality()
                .expect("gradients are 4-D"))
        };
        Ok(HostGradients {
            dq: download(&grads.dq)?,
            dk: download(&grads.dk)?,
            dv: download(&grads.dv)?,
        })
    }

    /// [`CubeDevice::try_backward_with`] on device tensors: `q`, `k`, `v`, `d_o` and `d_lse`
    /// must be contiguous (as [`CubeDevice::try_upload`] makes them), `forward` a forward's
    /// outputs for them. Returns contiguous gradients, allocated here (a training loop reuses
    /// them with [`CubeDevice::try_backward_into_with`]). Errors: as
    /// [`CubeDevice::try_backward_with`], and [`Error::Shape`] for a strided input.
    pub fn try_backward_device_with<T: CubeElement, M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        [q, k, v]: [&DeviceTensor<T>; 3],
        forward: &DeviceOutput<T>,
        d_o: &DeviceTensor<T>,
        d_lse: Option<&DeviceTensor<f32>>,
    ) -> Result<DeviceGradients<T>> {
        let shape = spec.check_shapes("cube::backward", &q.shape, &k.shape, &v.shape)?;
        let mut grads = self.try_gradients(spec, shape.batch, shape.seq_q, shape.seq_k)?;
        self.try_backward_into_with(spec, mods, [q, k, v], forward, d_o, d_lse, &mut grads)?;
        Ok(grads)
    }

    /// Gradients for [`CubeDevice::try_backward_into_with`]: contiguous `dq: [batch, q_heads,
    /// seq_q, head_dim]`, `dk`, `dv: [batch, kv_heads, seq_k, head_dim]`, uninitialised until a
    /// backward writes them.
    pub fn try_gradients<T: CubeElement>(
        &self,
        spec: &AttentionSpec,
        batch: usize,
        seq_q: usize,
        seq_k: usize,
    ) -> Result<DeviceGradients<T>> {
        const OP: &str = "cube::gradients";
        let d = spec.head_dim();
        let make = |heads: usize, len: usize| -> Result<DeviceTensor<T>> {
            let shape = vec![batch, heads, len, d];
            let elements = shape.iter().try_fold(1usize, |n, &x| n.checked_mul(x));
            let elements = elements.ok_or_else(|| Error::DeviceLimit {
                op: OP,
                reason: format!("a gradient of shape {shape:?} overflows"),
            })?;
            let buffer = self.inner.empty(OP, elements, size_of::<T>())?;
            Ok(DeviceTensor::contiguous(
                buffer,
                self.inner.key().clone(),
                shape,
            ))
        };
        Ok(DeviceGradients {
            dq: make(spec.q_heads(), seq_q)?,
            dk: make(spec.kv_heads(), seq_k)?,
            dv: make(spec.kv_heads(), seq_k)?,
        })
    }

    /// [`CubeDevice::try_backward_device_with`] writing into `grads` (made by
    /// [`CubeDevice::try_gradients`] for this problem, or returned by an earlier backward of
    /// the same shape): every element is written, zeros where no pair reaches it. The
    /// launches' own f32 partials, row statistics and `dS` stage (if any) come from cubecl's
    /// memory pool. Errors: as
    /// [`CubeDevice::try_backward_device_with`], and [`Error::Shape`] when a gradient is not
    /// the contiguous tensor of this problem's shape.
    #[allow(clippy::too_many_arguments)]
    pub fn try_backward_into_with<T: CubeElement, M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        [q, k, v]: [&DeviceTensor<T>; 3],
        forward: &DeviceOutput<T>,
        d_o: &DeviceTensor<T>,
        d_lse: Option<&DeviceTensor<f32>>,
        grads: &mut DeviceGradients<T>,
    ) -> Result<()> {
        const OP: &str = "cube::backward";
        let shape = spec.check_shapes(OP, &q.shape, &k.shape, &v.shape)?;
        spec.check_like_q(OP, shape, "d_o", &d_o.shape)?;
        if let Some(d_lse) = d_lse {
            spec.check_like_lse(OP, shape, "d_lse", &d_lse.shape)?;
        }
        self.check_output(
            OP,
            forward,
            [shape.batch, spec.q_heads(), shape.seq_q],
            spec.head_dim(),
        )?;
        for (name, tensor) in [("q", q), ("k", k), ("v", v), ("d_o", d_o)] {
            self.check_owns(OP, &tensor.device)?;
            check_contiguous(OP, name, &tensor.shape, tensor.offset, &tensor.strides)?;
        }
        if let Some(d_lse) = d_lse {
            self.check_owns(OP, &d_lse.device)?;
            check_contiguous(OP, "d_lse", &d_lse.shape, d_lse.offset, &d_lse.strides)?;
        }
        for (name, grad, like) in [
            ("dq", &grads.dq, q),
            ("dk", &grads.dk, k),
            ("dv", &grads.dv, v),
        ] {
            self.check_owns(OP, &grad.device)?;
            if grad.shape != like.shape || grad.offset != 0 || grad.strides != like.strides {
                return Err(Error::Shape {
                    op: OP,
                    tensor: name,
                    got: grad.shape.clone(),
                    expected: format!("{:?}, contiguous", like.shape),
                });
            }
        }
        if !self.supports(T::DTYPE) {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: T::DTYPE,
                device: self.name().to_string(),
            });
        }
        let buffers = [&grads.dq.buffer, &grads.dk.buffer, &grads.dv.buffer];
        // No pair at all: every gradient is 0, and nothing else is launched.
        if shape.batch == 0 || shape.seq_q == 0 || shape.seq_k == 0 {
            for buffer in buffers {
                self.inner.fill_zeros::<T>(OP, buffer)?;
            }
            return Ok(());
        }
        let aux = mods.captured_words();
        self.inner.backward::<T, M, S>(BackwardCall {
            op: OP,
            spec,
            shape,
            inputs: [
                &q.buffer,
                &k.buffer,
                &v.buffer,
                &forward.o.buffer,
                &d_o.buffer,
            ],
            lse: &forward.lse.buffer,
            d_lse: d_lse.map(|d| &d.buffer),
            aux: &aux,
            mask_mod: !M::TRIVIAL,
            score_mod: !S::TRIVIAL,
            blocks: (!M::TRIVIAL && mods.block_masks()).then_some(mods as &dyn BlockSource),
            grads: buffers,
        })
    }

    fn check_owns(&self, op: &'static str, device: &std::sync::Arc<()>) -> Result<()> {
        if std::sync::Arc::ptr_eq(device, self.inner.key()) {
            Ok(())
        } else {
            Err(Error::WrongDevice { op })
        }
    }
}

impl std::fmt::Debug for CubeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CubeDevice")
            .field("name", &self.name())
            .finish()
    }
}

/// How the forward kernel cuts its work: each unit owns `rows` consecutive query rows of one
/// query head and scores `block_n` keys per register block, and K and V reach the units as
/// `loads` says (see the kernel's docs in `src/cube/kernels/forward.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ForwardTile {
    pub rows: usize,
    pub block_n: usize,
    pub loads: KvLoads,
}

/// How the forward kernel's units get the K and V elements every one of them needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvLoads {
    /// Every unit loads every element, at the same address across the cube: one broadcast load
    /// on a GPU.
    Uniform,
    /// The lanes of a plane (SIMD group, warp) load 8 consecutive channels of a key, one each,
    /// and hand them to each other with plane broadcasts: each element is loaded once per plane.
    /// What pays on a device whose every load is per lane whatever its address (lavapipe: a
    /// loop over the SIMD lanes, for a uniform address too). It runs where the device's planes
    /// have at least 8 lanes and a probe found their broadcasts right
    /// ([`CubeDevice::plane_loads`]); elsewhere a tile with it is [`Error::DeviceLimit`].
    Plane,
}

impl ForwardTile {
    /// The largest `rows` and `block_n` accepted.
    pub const MAX: usize = 16;

    /// The tile used without measuring ([`CubeDevice::untuned`]; the device picks `loads`:
    /// [`KvLoads::Plane`] where it runs). More rows feed more FMAs from each K/V element loaded
    /// but compile longer: lavapipe's compile time grows with `rows · head_dim`.
    ///
    /// - Plane loads: 4 rows per unit up to head dim 128 (fewer above, about 512 query values
    ///   per unit), 8 keys per block. Measured on lavapipe in one run, GQA 32/8/128 unmasked,
    ///   L 512 (`GQA_JIT_TILES=8x4u,4x8p,8x8p,2x16p cargo bench --profile dev --bench jit`,
    ///   shader cache off): 4x8p 0.196 s (compile 6.5 s), 8x8p 0.173 s (17.2 s), 2x16p 0.207 s
    ///   (3.6 s); uniform 8x4u 0.437 s (14.8 s). The suites compile every specialisation, hence
    ///   the 4-row tile; autotune may pick 8 rows.
    /// - Uniform loads: 8 rows up to head dim 128 (fewer above), 4 keys per block; on lavapipe
    ///   4 rows took 0.49 s and 8 rows 0.366 s in another run.
    pub fn untuned(head_dim: usize, loads: KvLoads) -> ForwardTile {
        let (rows, block_n) = match loads {
            KvLoads::Plane => (4.min(512 / head_dim).max(1), 8),
            KvLoads::Uniform => (8.min(512 / head_dim).max(1), 4),
        };
        ForwardTile {
            rows,
            block_n,
            loads,
        }
    }

    /// The tiles autotune times at `head_dim`: the untuned tile with plane loads and one of
    /// twice its rows, then the untuned tile with uniform loads. A device skips the ones it
    /// cannot run (plane loads where they do not run).
    pub fn candidates(head_dim: usize) -> Vec<ForwardTile> {
        let plane = ForwardTile::untuned(head_dim, KvLoads::Plane);
        let more_rows = ForwardTile {
            rows: (2 * plane.rows).min(ForwardTile::MAX),
            ..plane
        };
        let mut tiles = vec![plane];
        for tile in [more_rows, ForwardTile::untuned(head_dim, KvLoads::Uniform)] {
            if !tiles.contains(&tile) {
                tiles.push(tile);
            }
        }
        tiles
    }
}

impl std::fmt::Display for ForwardTile {
    /// `4x8p`: rows × keys per block, then `p` for plane loads or `u` for uniform ones.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loads = match self.loads {
            KvLoads::Plane => 'p',
            KvLoads::Uniform => 'u',
        };
        write!(f, "{}x{}{loads}", self.rows, self.block_n)
    }
}

/// A tensor on a [`CubeDevice`]: a buffer and a strided view of it.
pub struct DeviceTensor<T> {
    buffer: runtime::Buffer,
    device: std::sync::Arc<()>,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
    element: PhantomData<T>,
}

impl<T> DeviceTensor<T> {
    fn contiguous(buffer: runtime::Buffer, device: std::sync::Arc<()>, shape: Vec<usize>) -> Self {
        let strides = contiguous_strides(&shape);
        DeviceTensor {
            buffer,
            device,
            offset: 0,
            shape,
            strides,
            element: PhantomData,
        }
    }

    /// The view's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The view's strides, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
}

impl<T> std::fmt::Debug for DeviceTensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("shape", &self.shape)
            .field("strides", &self.strides)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// The kernel's result on the device.
#[derive(Debug)]
pub struct DeviceOutput<T> {
    /// `[batch, q_heads, seq_q, head_dim]`, contiguous.
    pub o: DeviceTensor<T>,
    /// `[batch, q_heads, seq_q]`, natural log, `−∞` for fully masked rows.
    pub lse: DeviceTensor<f32>,
}

pub use crate::backend::{HostGradients, HostOutput};

/// The gradients of a backward on the device ([`CubeDevice::try_backward_device_with`]),
/// contiguous: `dq` like `q`, `dk` and `dv` like `k` (each KV head's, summed over its group).
#[derive(Debug)]
pub struct DeviceGradients<T> {
    pub dq: DeviceTensor<T>,
    pub dk: DeviceTensor<T>,
    pub dv: DeviceTensor<T>,
}

/// [`Error::Shape`] unless the view `(shape, offset, strides)` is contiguous from element 0.
fn check_contiguous(
    op: &'static str,
    tensor: &'static str,
    shape: &[usize],
    offset: usize,
    strides: &[usize],
) -> Result<()> {
    if offset != 0 || strides != contiguous_strides(shape).as_slice() {
        return Err(Error::Shape {
            op,
            tensor,
            got: shape.to_vec(),
            expected: format!("{shape:?}, contiguous (the backward kernels read packed rows)"),
        });
    }
    Ok(())
}

/// One forward launch: the spec, the problem, the q, k, v buffers and their layout (`[offset,
/// stride_b, stride_h, stride_s, stride_d]` of each), and the contiguous outputs the caller
/// sized.
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda", feature = "hip")),
    allow(dead_code)
)]
pub(crate) struct ForwardCall<'a> {
    pub op: &'static str,
    pub spec: &'a AttentionSpec,
    pub shape: crate::spec::ProblemShape,
    pub q: &'a runtime::Buffer,
    pub k: &'a runtime::Buffer,
    pub v: &'a runtime::Buffer,
    pub layout: [u32; 15],
    pub o: &'a runtime::Buffer,
    pub lse: &'a runtime::Buffer,
    /// The user mods' captures (`crate::dsl::Mods::captured_words`).
    pub aux: &'a runtime::Buffer,
    /// Whether the kernel evaluates the user mask mod, and applies the user score mod.
    pub mask_mod: bool,
    pub score_mod: bool,
    /// Where the launch's block mask comes from (with a user mask and block masks on).
    pub blocks: Option<&'a dyn BlockSource>,
    /// A varlen launch ([`crate::spec::Varlen`]): `shape` is then the grid's (`batch` the
    /// sequences, `seq_q`, `seq_k` the longest sequence's lengths) and this the packing.
    pub packed: Option<Packed<'a>>,
}

/// One backward launch ([`CubeDevice::try_backward_with`]): contiguous uploads of the inputs,
/// the forward's outputs and the upstream gradients, and the gradient buffers the caller sized
/// (`dq` like `q`, `dk`, `dv` like `k`), in the storage type.
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda", feature = "hip")),
    allow(dead_code)
)]
pub(crate) struct BackwardCall<'a> {
    pub op: &'static str,
    pub spec: &'a AttentionSpec,
    pub shape: crate::spec::ProblemShape,
    /// `q`, `k`, `v`, `o`, `d_o`, contiguous.
    pub inputs: [&'a runtime::Buffer; 5],
    /// The forward's LSE and `∂L/∂LSE`, f32, contiguous `[B, HQ, Lq]`.
    pub lse: &'a runtime::Buffer,
    pub d_lse: Option<&'a runtime::Buffer>,
    /// The user mods' captures (`crate::dsl::Mods::captured_words`); `mask_mod`, `score_mod`:
    /// the kernels apply the user's; `blocks`: the mask's block mask is used.
    pub aux: &'a [u32],
    pub mask_mod: bool,
    pub score_mod: bool,
    pub blocks: Option<&'a dyn BlockSource>,
    /// `dq`, `dk`, `dv`.
    pub grads: [&'a runtime::Buffer; 3],
}

/// The packing of a varlen launch.
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda", feature = "hip")),
    allow(dead_code)
)]
pub(crate) struct Packed<'a> {
    /// `cu_seqlens_q` then `cu_seqlens_k`, as `u32` (checked to fit).
    pub cu: &'a [u32],
    pub total_q: usize,
    pub total_k: usize,
}

impl ForwardCall<'_> {
    /// The output rows the launch writes (`[B, HQ, Lq]`, or `[HQ, total_q]` packed).
    #[cfg_attr(
        not(any(feature = "wgpu", feature = "cuda", feature = "hip")),
        allow(dead_code)
    )]
    pub fn rows(&self) -> usize {
        match self.packed {
            Some(packed) => self.spec.q_heads() * packed.total_q,
            None => self.shape.batch * self.spec.q_heads() * self.shape.seq_q,
        }
    }
}

/// What makes a launch's block mask ([`crate::dsl::block`]): the mods, for the tiles the
/// launch is cut into.
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda", feature = "hip")),
    allow(dead_code)
)]
pub(crate) trait BlockSource: Sync {
    fn block_mask(
        &self,
        spec: &AttentionSpec,
        shape: ProblemShape,
        tiles: (usize, usize),
    ) -> std::sync::Arc<crate::dsl::block::BlockMask>;
}

impl<M: MaskMod, S: ScoreMod> BlockSource for Mods<M, S> {
    fn block_mask(
        &self,
        spec: &AttentionSpec,
        shape: ProblemShape,
        tiles: (usize, usize),
    ) -> std::sync::Arc<crate::dsl::block::BlockMask> {
        Mods::block_mask(self, spec, shape, tiles)
    }
}

/// What a decode launch reads (the runtime's side of [`CubeDevice::try_decode`]).
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda", feature = "hip")),
    allow(dead_code)
)]
pub(crate) struct DecodeInputs<'a> {
    pub q: &'a runtime::Buffer,
    pub k: &'a runtime::Buffer,
    pub v: &'a runtime::Buffer,
    pub k_scale: &'a runtime::Buffer,
    pub v_scale: &'a runtime::Buffer,
    /// The cache's lengths and block tables ([`cache`]'s `BlockTables`): sequence lengths at
    /// `slot`, pages from `table_base + slot · table_stride`.
    pub tables: &'a runtime::Buffer,
    pub table_base: usize,
    pub table_stride: usize,
    /// `[batch]`: the slot of each decoded sequence.
    pub slots: &'a runtime::Buffer,
    pub batch: usize,
    /// The longest decoded sequence.
    pub max_len: usize,
    pub seq_q: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub storage: crate::cache::StorageKind,
    /// Only these key positions are read (`0..usize::MAX`: all of them).
    pub keys: std::ops::Range<usize>,
    /// The output is an f32 partial (output and LSE, for a later merge) rather than `T`.
    pub partial: bool,
    /// The user mods' captures (`crate::dsl::Mods::captured_words`).
    pub aux: &'a runtime::Buffer,
    /// Whether the kernel evaluates the user mask mod, and applies the user score mod.
    pub mask_mod: bool,
    pub score_mod: bool,
}

impl<T: CubeElement> crate::backend::Backward<T> for CubeDevice {
    fn try_backward_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        inputs: [ArrayView4<T>; 3],
        forward: &HostOutput<T>,
        d_o: ArrayView4<T>,
        d_lse: Option<ArrayView3<f32>>,
    ) -> Result<HostGradients<T>> {
        CubeDevice::try_backward_with(self, spec, mods, inputs, forward, d_o, d_lse)
    }
}

impl<T: CubeElement> crate::backend::Backend<T> for CubeDevice {
    fn try_forward(
        &self,
        spec: &AttentionSpec,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        CubeDevice::try_forward(self, spec, q, k, v)
    }

    fn try_forward_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        CubeDevice::try_forward_with(self, spec, mods, q, k, v)
    }

    fn try_forward_varlen(
        &self,
        spec: &AttentionSpec,
        packing: &Varlen,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        CubeDevice::try_forward_varlen(self, spec, packing, q, k, v)
    }
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for axis in (0..shape.len().saturating_sub(1)).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1];
    }
    strides
}

/// Every element of the view `offset + Σ index·stride` must lie inside a buffer of `len`.
fn check_view(
    op: &'static str,
    len: usize,
    offset: usize,
    shape: &[usize],
    strides: &[usize],
) -> Result<()> {
    if shape.len() != strides.len() {
        return Err(Error::Shape {
            op,
            tensor: "strides",
            got: strides.to_vec(),
            expected: format!("{} strides, one per dimension of {shape:?}", shape.len()),
        });
    }
    if shape.contains(&0) {
        return Ok(());
    }
    let last = shape.iter().zip(strides).try_fold(offset, |at, (&n, &s)| {
        (n - 1).checked_mul(s).and_then(|x| x.checked_add(at))
    });
    match last {
        Some(last) if last < len => Ok(()),
        _ => Err(Error::Shape {
            op,
            tensor: "view",
            got: shape.to_vec(),
            expected: format!(
                "a view (offset {offset}, strides {strides:?}) inside a buffer of {len} elements"
            ),
        }),
    }
}
