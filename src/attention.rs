//! The front ends: [`Attention`], whose head counts and head dim are const generics checked at
//! compile time, and [`DynAttention`], its runtime-checked twin for numbers read at run time.
//! Both are thin wrappers over an [`AttentionSpec`] and share one builder (the methods below).

use std::ops::Range;

use ndarray::{ArrayView3, ArrayView4};

use crate::backend::{Backend, Backward, HostGradients, HostOutput};
use crate::cache::{KvCache, KvCacheFootprint, KvStorage, Layout, SeqId};
use crate::cube::{CubeDevice, CubeElement, DeviceKvCache, DeviceOutput, DeviceTensor};
use crate::dsl::{MaskMod, Mods, NoMask, NoScore, ScoreMod};
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::heads::{Rule, Supported, assert_config};
use crate::model_config::ModelConfig;
use crate::partial::{Partial, Source, clip_keys};
use crate::spec::Varlen;
use crate::spec::{Alignment, AttentionSpec};

/// Attention with `HQ` query heads sharing `HKV` key/value heads, each of dimension `D`.
///
/// The configuration rule ([`crate::heads`]) is part of the type: `Attention<32, 6, 128>` is
/// not a type at all, so naming it — to construct it, read its [`Attention::GROUP`], or alias
/// it — fails `cargo check` with the numbers in the message. Generic code passes the rule on
/// with `where Rule: Supported<HQ, HKV, D>`. A `const` assertion on the same rule backs the
/// table up under `cargo build`.
///
/// ```
/// use gqa::{Gqa, Mha, Mqa};
/// let llama3_8b = Gqa::<32, 8, 128>::new().causal();
/// assert_eq!(Gqa::<32, 8, 128>::GROUP, 4);
/// assert_eq!(Mha::<32, 128>::KV_CACHE_REDUCTION, 1);
/// assert_eq!(Mqa::<32, 128>::KV_CACHE_REDUCTION, 32);
/// assert_eq!(llama3_8b.spec().group_size(), 4);
/// ```
///
/// 32 query heads cannot be shared by 6 KV heads:
/// ```compile_fail
/// let attention = gqa::Gqa::<32, 6, 128>::new();
/// ```
/// Nor can a head dim be 0, or generic code use a configuration without passing the rule on:
/// ```compile_fail
/// let group = gqa::Mha::<8, 0>::GROUP;
/// ```
/// ```compile_fail
/// fn group<const HQ: usize, const HKV: usize>() -> usize { gqa::Gqa::<HQ, HKV, 64>::GROUP }
/// ```
/// ```
/// use gqa::heads::{Rule, Supported};
/// fn group<const HQ: usize, const HKV: usize>() -> usize
/// where
///     Rule: Supported<HQ, HKV, 64>,
/// {
///     gqa::Gqa::<HQ, HKV, 64>::GROUP
/// }
/// assert_eq!(group::<32, 8>(), 4);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attention<const HQ: usize, const HKV: usize, const D: usize>
where
    Rule: Supported<HQ, HKV, D>,
{
    spec: AttentionSpec,
}

/// Multi-head attention: every query head has its own key/value head.
pub type Mha<const H: usize, const D: usize> = Attention<H, H, D>;
/// Grouped-query attention: `HQ / HKV` query heads share each key/value head.
pub type Gqa<const HQ: usize, const HKV: usize, const D: usize> = Attention<HQ, HKV, D>;
/// Multi-query attention: all query heads share one key/value head.
pub type Mqa<const H: usize, const D: usize> = Attention<H, 1, D>;

/// The builder shared by [`Attention`] and [`DynAttention`]: each method refines the wrapped
/// spec through the matching `AttentionSpec` method, so the two front ends cannot diverge.
macro_rules! spec_builder_methods {
    () => {
        /// The spec this attention lowers to.
        pub fn spec(&self) -> &AttentionSpec {
            &self.spec
        }

        /// Adds a causal mask, bottom-right aligned by default: query `i` sees keys
        /// `j <= i + seq_k - seq_q` (see [`crate::spec::Mask`]).
        pub fn causal(self) -> Self {
            Self {
                spec: self.spec.with_mask(self.spec.mask().causal()),
            }
        }

        /// Measures the mask (causal, window) and ALiBi distances from the top-left diagonal
        /// `diag(i) = i` instead of the default bottom-right one.
        pub fn top_left(self) -> Self {
            Self {
                spec: self
                    .spec
                    .with_mask(self.spec.mask().aligned(Alignment::TopLeft)),
            }
        }

        /// Causal with PyTorch's top-left alignment: `.causal().top_left()`.
        pub fn causal_top_left(self) -> Self {
            self.causal().top_left()
        }

        /// Restricts each query to `left` keys before and `right` keys after its diagonal
        /// (composes with `causal` by intersection; Mistral's `sliding_window = w` is
        /// `.causal().window(w - 1, 0)`).
        ///
        /// # Panics
        /// If a side is negative; [`Self::try_window`] returns the error instead.
        #[track_caller]
        pub fn window(self, left: i64, right: i64) -> Self {
            match self.try_window(left, right) {
                Ok(attention) => attention,
                Err(error) => panic!("{error}"),
            }
        }

        /// [`Self::window`], returning [`Error::InvalidWindow`] for a negative side.
        pub fn try_window(self, left: i64, right: i64) -> Result<Self> {
            Ok(Self {
                spec: self.spec.try_with_window(left, right)?,
            })
        }

        /// Sets the softmax scale applied to `q·k` (default `1/√head_dim`).
        ///
        /// # Panics
        /// If `scale` is NaN, infinite or beyond `f32`'s range; [`Self::try_scale`] returns
        /// the error instead.
        #[track_caller]
        pub fn scale(self, scale: f64) -> Self {
            match self.try_scale(scale) {
                Ok(attention) => attention,
                Err(error) => panic!("{error}"),
            }
        }

        /// [`Self::scale`], returning [`Error::InvalidScale`] for NaN, infinity or a value
        /// beyond `f32`'s range.
        pub fn try_scale(self, scale: f64) -> Result<Self> {
            Ok(Self {
                spec: self.spec.try_with_scale(scale)?,
            })
        }

        /// Caps scores smoothly to `(-cap, cap)`: `cap · tanh(s / cap)`, after scaling.
        ///
        /// # Panics
        /// If `cap` is not finite and `> 0`; [`Self::try_softcap`] returns the error instead.
        #[track_caller]
        pub fn softcap(self, cap: f32) -> Self {
            match self.try_softcap(cap) {
                Ok(attention) => attention,
                Err(error) => panic!("{error}"),
            }
        }

        /// [`Self::softcap`], returning [`Error::InvalidSoftcap`].
        pub fn try_softcap(self, cap: f32) -> Result<Self> {
            Ok(Self {
                spec: self.spec.try_with_softcap(cap)?,
            })
        }

        /// Adds ALiBi with the standard geometric slopes for the query heads.
        pub fn alibi(self) -> Self {
            Self {
                spec: self.spec.with_alibi(),
            }
        }

        /// Adds ALiBi with user slopes, one per query head.
        ///
        /// # Panics
        /// If the count is not the number of query heads or a slope is not finite;
        /// [`Self::try_alibi_slopes`] returns the error instead.
        #[track_caller]
        pub fn alibi_slopes(self, slopes: &[f32]) -> Self {
            match self.try_alibi_slopes(slopes) {
                Ok(attention) => attention,
                Err(error) => panic!("{error}"),
            }
        }

        /// [`Self::alibi_slopes`], returning [`Error::AlibiSlopeCount`] or
        /// [`Error::InvalidAlibiSlope`].
        pub fn try_alibi_slopes(self, slopes: &[f32]) -> Result<Self> {
            Ok(Self {
                spec: self.spec.try_with_alibi_slopes(slopes)?,
            })
        }

        /// Runs this attention on `backend` — a GPU device ([`crate::cube::CubeDevice`]) or
        /// the CPU ([`crate::cpu::Cpu`]): host arrays in, host arrays out.
        pub fn try_forward<T: Element, B: Backend<T>>(
            &self,
            backend: &B,
            q: ArrayView4<T>,
            k: ArrayView4<T>,
            v: ArrayView4<T>,
        ) -> Result<HostOutput<T>> {
            backend.try_forward(&self.spec, q, k, v)
        }

        /// [`Self::try_forward`], panicking on error.
        ///
        /// # Panics
        /// If the shapes do not fit, the backend lacks the element type, or the kernel fails.
        #[track_caller]
        pub fn forward<T: Element, B: Backend<T>>(
            &self,
            backend: &B,
            q: ArrayView4<T>,
            k: ArrayView4<T>,
            v: ArrayView4<T>,
        ) -> HostOutput<T> {
            match self.try_forward(backend, q, k, v) {
                Ok(output) => output,
                Err(error) => panic!("{error}"),
            }
        }

        /// Runs this attention over variable-length sequences packed along one axis
        /// ([`Varlen`]: FlashAttention's `cu_seqlens`), on `backend`: `q: [1, q_heads,
        /// total_q, head_dim]`, `k`, `v: [1, kv_heads, total_k, head_dim]`; each sequence is
        /// its own problem ([`crate::oracle::try_forward_varlen`]).
        ///
        /// ```
        /// use gqa::{Gqa, cpu::Cpu, spec::Varlen};
        /// use ndarray::Array4;
        /// // Three documents of 3, 1 and 4 tokens, packed; causal within each.
        /// let packing = Varlen::from_lengths(&[3, 1, 4]);
        /// let attention = Gqa::<4, 2, 8>::new().causal();
        /// let q = Array4::<f32>::ones((1, 4, 8, 8));
        /// let kv = Array4::<f32>::ones((1, 2, 8, 8));
        /// let out = attention.try_forward_varlen(&Cpu::new(), &packing, q.view(), kv.view(), kv.view())?;
        /// // Every score is 8 / √8 = √8: the third document's first token sees itself only
        /// // (LSE √8), its last sees its document's 4 tokens (LSE √8 + ln 4).
        /// let s = 8f32.sqrt();
        /// assert!((out.lse[[0, 0, 4]] - s).abs() < 1e-5);
        /// assert!((out.lse[[0, 0, 7]] - (s + 4f32.ln())).abs() < 1e-5);
        /// # Ok::<(), gqa::Error>(())
        /// ```
        pub fn try_forward_varlen<T: Element, B: Backend<T>>(
            &self,
            backend: &B,
            packing: &Varlen,
            q: ArrayView4<T>,
            k: ArrayView4<T>,
            v: ArrayView4<T>,
        ) -> Result<HostOutput<T>> {
            backend.try_forward_varlen(&self.spec, packing, q, k, v)
        }

        /// The gradients of this attention on `backend` ([`crate::oracle::try_backward`]
        /// defines them): `q`, `k`, `v` as the forward took them, `forward` the forward's
        /// output on the same backend (its `O` and `LSE` are reused), `d_o = ∂L/∂O` (the shape
        /// of `q`). `dK`, `dV` are per KV head, summed over each group's query heads.
        ///
        /// ```
        /// use gqa::{Gqa, cpu::Cpu};
        /// use ndarray::Array4;
        /// let attention = Gqa::<8, 2, 16>::new().causal();
        /// let q = Array4::<f32>::from_shape_fn((1, 8, 4, 16), |(_, h, i, d)| ((h * i + d) % 5) as f32 / 4.0);
        /// let kv = Array4::<f32>::from_shape_fn((1, 2, 4, 16), |(_, g, j, d)| ((g + j * d) % 3) as f32 / 2.0);
        /// let cpu = Cpu::new();
        /// let out = attention.try_forward(&cpu, q.view(), kv.view(), kv.view())?;
        /// let d_o = Array4::<f32>::ones((1, 8, 4, 16));
        /// let grads = attention.try_backward(&cpu, q.view(), kv.view(), kv.view(), &out, d_o.view())?;
        /// let exact = gqa::oracle::try_backward(attention.spec(), q.view(), kv.view(), kv.view(), d_o.view())?;
        /// let worst = grads.dk.iter().zip(&exact.dk).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
        /// assert!(worst < 1e-5);
        /// # Ok::<(), gqa::Error>(())
        /// ```
        pub fn try_backward<T: Element, B: Backward<T>>(
            &self,
            backend: &B,
            q: ArrayView4<T>,
            k: ArrayView4<T>,
            v: ArrayView4<T>,
            forward: &HostOutput<T>,
            d_o: ArrayView4<T>,
        ) -> Result<HostGradients<T>> {
            backend.try_backward(&self.spec, [q, k, v], forward, d_o)
        }

        /// [`Self::try_backward`] with `d_lse = ∂L/∂LSE` (`[batch, q_heads, seq_q]`): for a
        /// loss that also reads the forward's log-sum-exps.
        #[allow(clippy::too_many_arguments)]
        pub fn try_backward_lse<T: Element, B: Backward<T>>(
            &self,
            backend: &B,
            q: ArrayView4<T>,
            k: ArrayView4<T>,
            v: ArrayView4<T>,
            forward: &HostOutput<T>,
            d_o: ArrayView4<T>,
            d_lse: ArrayView3<f32>,
        ) -> Result<HostGradients<T>> {
            let mods = Mods::none();
            backend.try_backward_with(&self.spec, &mods, [q, k, v], forward, d_o, Some(d_lse))
        }

        /// Runs this attention on tensors already on the device.
        pub fn try_forward_device<T: CubeElement>(
            &self,
            device: &CubeDevice,
            q: &DeviceTensor<T>,
            k: &DeviceTensor<T>,
            v: &DeviceTensor<T>,
        ) -> Result<DeviceOutput<T>> {
            device.try_forward_device(&self.spec, q, k, v)
        }

        /// The size of this configuration's KV cache, stored as `dtype`.
        pub fn kv_cache(&self, dtype: DType) -> KvCacheFootprint {
            self.spec.kv_cache(dtype)
        }

        /// This attention with a user mask mod ([`crate::dsl`]), intersected with its band
        /// mask: a key is visible when both allow it. Set the built-in modifiers first.
        ///
        /// ```
        /// use gqa::{Gqa, cpu::Cpu, dsl::{library, Aux}};
        /// use ndarray::Array4;
        /// // Two packed documents of 3 and 2 tokens, causal within each.
        /// let attention = Gqa::<4, 2, 8>::new()
        ///     .causal()
        ///     .mask_mod(library::document(Aux::new(vec![0, 0, 0, 1, 1])));
        /// let x = Array4::<f32>::ones((1, 4, 5, 8));
        /// let kv = Array4::<f32>::ones((1, 2, 5, 8));
        /// let out = attention.try_forward(&Cpu::new(), x.view(), kv.view(), kv.view())?;
        /// // Every score is √8: token 3 sees itself only, token 4 sees tokens 3 and 4.
        /// assert!((out.lse[[0, 0, 3]] - 8f32.sqrt()).abs() < 1e-6);
        /// assert!((out.lse[[0, 0, 4]] - 8f32.sqrt() - 2f32.ln()).abs() < 1e-6);
        /// # Ok::<(), gqa::Error>(())
        /// ```
        pub fn mask_mod<M: MaskMod>(self, mask: M) -> Modded<Self, M, NoScore> {
            Modded {
                attention: self,
                mods: Mods::new(mask, NoScore),
            }
        }

        /// This attention with a user score mod ([`crate::dsl`]), applied after its scale,
        /// softcap and ALiBi. Set the built-in modifiers first.
        pub fn score_mod<S: ScoreMod>(self, score: S) -> Modded<Self, NoMask, S> {
            Modded {
                attention: self,
                mods: Mods::new(NoMask, score),
            }
        }
    };
}

/// An attention ([`Attention`] or [`DynAttention`]) with user mods ([`crate::dsl`]): what
/// `.mask_mod(m)` and `.score_mod(s)` return. More mods compose: `.mask_mod` intersects,
/// `.score_mod` chains.
#[derive(Debug, Clone)]
pub struct Modded<A, M, S> {
    attention: A,
    mods: Mods<M, S>,
}

/// The spec of a front end (implemented by [`Attention`] and [`DynAttention`]).
pub trait Front {
    /// The spec this front end lowers to.
    fn front_spec(&self) -> &AttentionSpec;
}

impl<A: Front, M: MaskMod, S: ScoreMod> Modded<A, M, S> {
    /// The attention without its mods.
    pub fn attention(&self) -> &A {
        &self.attention
    }

    /// Its spec (the built-ins).
    pub fn spec(&self) -> &AttentionSpec {
        self.attention.front_spec()
    }

    /// Its user mods.
    pub fn mods(&self) -> &Mods<M, S> {
        &self.mods
    }

    /// These mods with `mask` intersected into the mask.
    pub fn mask_mod<M2: MaskMod>(self, mask: M2) -> Modded<A, crate::dsl::And<M, M2>, S> {
        Modded {
            attention: self.attention,
            mods: self.mods.and_mask(mask),
        }
    }

    /// These mods with `score` applied after the score mod.
    pub fn score_mod<S2: ScoreMod>(self, score: S2) -> Modded<A, M, crate::dsl::Then<S, S2>> {
        Modded {
            attention: self.attention,
            mods: self.mods.then_score(score),
        }
    }

    /// Runs this attention on `backend` (the GPU or the CPU), host arrays in and out.
    pub fn try_forward<T: Element, B: Backend<T>>(
        &self,
        backend: &B,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>> {
        backend.try_forward_with(self.spec(), &self.mods, q, k, v)
    }

    /// [`Self::try_forward`], panicking on error.
    ///
    /// # Panics
    /// If the shapes do not fit, the backend lacks the element type, or the kernel fails.
    #[track_caller]
    pub fn forward<T: Element, B: Backend<T>>(
        &self,
        backend: &B,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> HostOutput<T> {
        match self.try_forward(backend, q, k, v) {
            Ok(output) => output,
            Err(error) => panic!("{error}"),
        }
    }

    /// The gradients on `backend` with these mods (the score mod's generated derivative in
    /// the chain rule), as [`Attention::try_backward`]; `d_lse = ∂L/∂LSE` is optional.
    #[allow(clippy::too_many_arguments)]
    pub fn try_backward<T: Element, B: Backward<T>>(
        &self,
        backend: &B,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
        forward: &HostOutput<T>,
        d_o: ArrayView4<T>,
        d_lse: Option<ArrayView3<f32>>,
    ) -> Result<HostGradients<T>> {
        backend.try_backward_with(self.spec(), &self.mods, [q, k, v], forward, d_o, d_lse)
    }

    /// The `f64` oracle's answer ([`crate::oracle::try_forward_with`]).
    pub fn try_forward_oracle<T: Element>(
        &self,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<crate::oracle::Output> {
        crate::oracle::try_forward_with(self.spec(), &self.mods, q, k, v)
    }

    /// Runs this attention on tensors already on the device.
    pub fn try_forward_device<T: CubeElement>(
        &self,
        device: &CubeDevice,
        q: &DeviceTensor<T>,
        k: &DeviceTensor<T>,
        v: &DeviceTensor<T>,
    ) -> Result<DeviceOutput<T>> {
        device.try_forward_device_with(self.spec(), &self.mods, q, k, v)
    }
}

impl<const HQ: usize, const HKV: usize, const D: usize> Front for Attention<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    fn front_spec(&self) -> &AttentionSpec {
        &self.spec
    }
}

impl Front for DynAttention {
    fn front_spec(&self) -> &AttentionSpec {
        &self.spec
    }
}

impl<const HQ: usize, const HKV: usize, const D: usize> Attention<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    /// The build-time backstop of the configuration rule. Every constructor and associated
    /// const evaluates it, so should the trait table ever accept an invalid configuration,
    /// `cargo build` still fails, naming `Attention::<HQ, HKV, D>`.
    const VALID: () = assert_config(HQ, HKV, D);

    /// Query heads.
    pub const Q_HEADS: usize = {
        let () = Self::VALID;
        HQ
    };
    /// Key/value heads.
    pub const KV_HEADS: usize = {
        let () = Self::VALID;
        HKV
    };
    /// Head dimension.
    pub const HEAD_DIM: usize = {
        let () = Self::VALID;
        D
    };
    /// Query heads per key/value head.
    pub const GROUP: usize = {
        let () = Self::VALID;
        HQ / HKV
    };
    /// How many times smaller this configuration's KV cache is than multi-head attention's with
    /// the same query heads (`HQ / HKV`: 1 for MHA, `HQ` for MQA).
    pub const KV_CACHE_REDUCTION: usize = Self::GROUP;

    /// A maskless attention with the default scale `1/√D`.
    pub fn new() -> Self {
        let () = Self::VALID;
        let spec = AttentionSpec::try_new(HQ, HKV, D)
            .expect("the bounds and VALID enforce the configuration rule");
        Attention { spec }
    }

    /// Checks a model's configuration against this type: `Gqa::<32, 8, 128>::try_from_model_config`
    /// of a Llama-3-8B `config.json` succeeds, of a Llama-2-7B one it fails with
    /// [`Error::ConfigMismatch`] naming `kv_heads`.
    pub fn try_from_model_config(config: &ModelConfig) -> Result<Self> {
        DynAttention::try_from_model_config(config)?.try_into()
    }

    /// Forgets the const parameters (the spec is unchanged).
    pub fn into_dyn(self) -> DynAttention {
        DynAttention { spec: self.spec }
    }

    /// A KV cache for this attention: `HKV` KV heads of dimension `D`, rows stored as `S`.
    /// Errors: [`Error::CacheLayout`].
    pub fn try_new_cache<S: KvStorage>(&self, layout: Layout) -> Result<KvCache<HKV, D, S>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        KvCache::try_new(layout)
    }

    /// Decode on `device` (see [`CubeDevice::try_decode`]). The cache's KV heads and head dim
    /// are this attention's by type: a cache of another configuration does not compile.
    pub fn try_decode<T: CubeElement, S: KvStorage>(
        &self,
        device: &CubeDevice,
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
    ) -> Result<DeviceOutput<T>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        device.try_decode(&self.spec, q, cache, copy, seqs)
    }

    /// Decode in the `f64` oracle (see [`crate::oracle::try_decode`]), typed like
    /// [`Attention::try_decode`].
    pub fn try_decode_oracle<T: Element, S: KvStorage>(
        &self,
        q: ArrayView4<T>,
        cache: &KvCache<HKV, D, S>,
        seqs: &[SeqId],
    ) -> Result<crate::oracle::Output>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        crate::oracle::try_decode(&self.spec, q, cache, seqs)
    }

    /// [`Attention::try_decode`] over the cached keys at positions in `keys` only, downloaded as
    /// a typed f32 [`Partial`] that merges with partials of this configuration (see
    /// [`crate::partial`]).
    pub fn try_decode_partial<T: CubeElement, S: KvStorage>(
        &self,
        device: &CubeDevice,
        q: &DeviceTensor<T>,
        cache: &KvCache<HKV, D, S>,
        copy: &mut DeviceKvCache<HKV, D, S>,
        seqs: &[SeqId],
        keys: Range<usize>,
    ) -> Result<Partial<HQ, HKV, D, f32>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let source = partial_source(cache, seqs)?;
        let keys = clip_keys("Attention::try_decode_partial", keys, source.longest())?;
        let out = device.try_decode_partial(&self.spec, q, cache, copy, seqs, keys.clone())?;
        let o = device
            .try_download(&out.o)?
            .into_dimensionality()
            .expect("o is 4-D");
        // The state pairs (max score, Σ exp(s − max)) → the LSE, in f64.
        let state = device.try_download(&out.lse)?;
        let lse = ndarray::Array3::from_shape_fn(
            (seqs.len(), self.spec.q_heads(), o.shape()[2]),
            |(b, h, i)| {
                let (m, l) = (state[[b, h, i, 0]], state[[b, h, i, 1]]);
                if l > 0.0 {
                    f64::from(m) + f64::from(l).ln()
                } else {
                    f64::NEG_INFINITY
                }
            },
        );
        Ok(Partial::new(self.spec, source, keys, o, lse))
    }

    /// Decode on the CPU (see [`crate::cpu::Cpu::try_decode`]), typed like
    /// [`Attention::try_decode`].
    #[cfg(feature = "cpu")]
    pub fn try_decode_cpu<T: crate::cpu::CpuElement, S: KvStorage>(
        &self,
        cpu: &crate::cpu::Cpu,
        q: ArrayView4<T>,
        cache: &KvCache<HKV, D, S>,
        seqs: &[SeqId],
    ) -> Result<HostOutput<T>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        cpu.try_decode(&self.spec, q, cache, seqs)
    }

    /// The CPU's [`Attention::try_decode_partial`]: an f32 [`Partial`] (LSE in f64).
    #[cfg(feature = "cpu")]
    pub fn try_decode_partial_cpu<T: crate::cpu::CpuElement, S: KvStorage>(
        &self,
        cpu: &crate::cpu::Cpu,
        q: ArrayView4<T>,
        cache: &KvCache<HKV, D, S>,
        seqs: &[SeqId],
        keys: Range<usize>,
    ) -> Result<Partial<HQ, HKV, D, f32>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let source = partial_source(cache, seqs)?;
        let keys = clip_keys("Attention::try_decode_partial_cpu", keys, source.longest())?;
        let (o, lse) = cpu.decode_keys(&self.spec, q, cache, seqs, keys.clone())?;
        Ok(Partial::new(self.spec, source, keys, o, lse))
    }

    /// The oracle's [`Attention::try_decode_partial`], in `f64`.
    pub fn try_decode_partial_oracle<T: Element, S: KvStorage>(
        &self,
        q: ArrayView4<T>,
        cache: &KvCache<HKV, D, S>,
        seqs: &[SeqId],
        keys: Range<usize>,
    ) -> Result<Partial<HQ, HKV, D, f64>>
    where
        Rule: Supported<HKV, HKV, D>,
    {
        let source = partial_source(cache, seqs)?;
        let keys = clip_keys(
            "Attention::try_decode_partial_oracle",
            keys,
            source.longest(),
        )?;
        let out = crate::oracle::try_decode_keys(&self.spec, q, cache, seqs, keys.clone())?;
        Ok(Partial::new(self.spec, source, keys, out.o, out.lse))
    }

    spec_builder_methods!();
}

impl<const HQ: usize, const HKV: usize, const D: usize> Default for Attention<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    fn default() -> Self {
        Self::new()
    }
}

/// The runtime-checked twin of [`Attention`], for configurations known only at run time (for
/// instance read from a model's `config.json`). Same rule, same builder, same spec; invalid
/// numbers are a typed [`Error`] instead of a compile error.
///
/// ```
/// use gqa::{DynAttention, Gqa};
/// let attention = DynAttention::try_new(32, 8, 128)?.causal();
/// assert_eq!(attention.spec(), Gqa::<32, 8, 128>::new().causal().spec());
/// assert_eq!(
///     DynAttention::try_new(32, 6, 128).unwrap_err().to_string(),
///     "32 query heads cannot be shared evenly by 6 key/value heads"
/// );
/// # Ok::<(), gqa::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DynAttention {
    spec: AttentionSpec,
}

impl DynAttention {
    /// A maskless attention with the default scale, after checking the configuration rule.
    pub fn try_new(q_heads: usize, kv_heads: usize, head_dim: usize) -> Result<Self> {
        Ok(DynAttention {
            spec: AttentionSpec::try_new(q_heads, kv_heads, head_dim)?,
        })
    }

    /// [`DynAttention::try_new`] for numbers known to be valid.
    ///
    /// # Panics
    /// If the configuration breaks the rule of [`crate::heads`].
    #[track_caller]
    pub fn new(q_heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        match Self::try_new(q_heads, kv_heads, head_dim) {
            Ok(attention) => attention,
            Err(error) => panic!("{error}"),
        }
    }

    /// The attention a model's configuration describes: its head counts and head dim, maskless
    /// (add `.causal()` for a decoder; window and softcap are left to the caller, since models
    /// disagree on how to read them).
    pub fn try_from_model_config(config: &ModelConfig) -> Result<Self> {
        Self::try_new(
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
    }

    spec_builder_methods!();
}

impl<const HQ: usize, const HKV: usize, const D: usize> From<Attention<HQ, HKV, D>> for DynAttention
where
    Rule: Supported<HQ, HKV, D>,
{
    fn from(attention: Attention<HQ, HKV, D>) -> Self {
        attention.into_dyn()
    }
}

/// Every spec is a valid configuration ([`AttentionSpec::try_new`] checks the rule).
impl From<AttentionSpec> for DynAttention {
    fn from(spec: AttentionSpec) -> Self {
        DynAttention { spec }
    }
}

/// Succeeds when the spec's numbers are the type's (see `TryFrom<DynAttention>`).
impl<const HQ: usize, const HKV: usize, const D: usize> TryFrom<AttentionSpec>
    for Attention<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    type Error = Error;

    fn try_from(spec: AttentionSpec) -> Result<Self> {
        DynAttention::from(spec).try_into()
    }
}

impl<const HQ: usize, const HKV: usize, const D: usize> TryFrom<DynAttention>
    for Attention<HQ, HKV, D>
where
    Rule: Supported<HQ, HKV, D>,
{
    type Error = Error;

    /// Succeeds when the runtime numbers are the type's; keeps the dynamic spec's mask and
    /// modifiers.
    fn try_from(attention: DynAttention) -> Result<Self> {
        let spec = attention.spec;
        for (field, expected, found) in [
            ("q_heads", HQ, spec.q_heads()),
            ("kv_heads", HKV, spec.kv_heads()),
            ("head_dim", D, spec.head_dim()),
        ] {
            if expected != found {
                return Err(Error::ConfigMismatch {
                    field,
                    expected,
                    found,
                });
            }
        }
        let () = Self::VALID;
        Ok(Attention { spec })
    }
}

/// The batch a decode partial is computed for: the cache and each sequence's current length.
fn partial_source<const HKV: usize, const D: usize, S: KvStorage>(
    cache: &KvCache<HKV, D, S>,
    seqs: &[SeqId],
) -> Result<Source>
where
    Rule: Supported<HKV, HKV, D>,
{
    Ok(Source {
        cache: cache.id(),
        seqs: seqs
            .iter()
            .map(|&seq| Ok((seq, cache.len(seq)?)))
            .collect::<Result<_>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_and_dynamic_lower_to_the_same_spec() {
        let typed = Gqa::<12, 4, 80>::new()
            .causal()
            .window(16, 0)
            .softcap(30.0)
            .alibi()
            .scale(0.5);
        let dynamic = DynAttention::new(12, 4, 80)
            .causal()
            .window(16, 0)
            .softcap(30.0)
            .alibi()
            .scale(0.5);
        assert_eq!(typed.spec(), dynamic.spec());
        assert_eq!(typed.into_dyn(), dynamic);
        assert_eq!(Attention::<12, 4, 80>::try_from(dynamic), Ok(typed));
    }

    #[test]
    fn dynamic_to_typed_names_the_mismatch() {
        assert_eq!(
            Gqa::<32, 8, 128>::try_from(DynAttention::new(32, 32, 128)),
            Err(Error::ConfigMismatch {
                field: "kv_heads",
                expected: 8,
                found: 32
            })
        );
    }

    #[test]
    fn associated_consts() {
        assert_eq!(
            (
                Gqa::<32, 8, 128>::GROUP,
                Gqa::<32, 8, 128>::KV_CACHE_REDUCTION
            ),
            (4, 4)
        );
        assert_eq!((Mqa::<16, 64>::GROUP, Mha::<16, 64>::GROUP), (16, 1));
        assert_eq!(
            (
                Gqa::<20, 4, 96>::Q_HEADS,
                Gqa::<20, 4, 96>::KV_HEADS,
                Gqa::<20, 4, 96>::HEAD_DIM
            ),
            (20, 4, 96)
        );
    }

    #[test]
    #[should_panic(expected = "sliding window sides must be >= 0, got (left -1, right 0)")]
    fn negative_window_panics_with_the_error() {
        let _ = Mha::<4, 32>::new().window(-1, 0);
    }

    #[test]
    fn dynamic_rejects_what_the_types_reject() {
        for (hq, hkv, d) in [
            (32, 6, 128),
            (0, 1, 64),
            (8, 0, 64),
            (8, 8, 0),
            (8, 8, 257),
            (4, 8, 64),
            (512, 8, 64),
        ] {
            assert!(
                DynAttention::try_new(hq, hkv, d).is_err(),
                "{hq}/{hkv}/{d} accepted"
            );
        }
    }
}
