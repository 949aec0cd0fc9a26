//! What every executor of an [`AttentionSpec`] offers the front ends: [`Backend`], implemented
//! by the GPU device ([`crate::cube::CubeDevice`]) and the CPU ([`crate::cpu::Cpu`]), so that
//! `attention.try_forward(&backend, q, k, v)` runs on either.

use ndarray::{Array3, Array4, ArrayView4};

use crate::dsl::{MaskMod, Mods, ScoreMod};
use crate::element::Element;
use crate::error::Result;
use crate::spec::{AttentionSpec, Varlen};

/// An executor's result on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostOutput<T> {
    /// `[batch, q_heads, seq_q, head_dim]`.
    pub o: Array4<T>,
    /// `[batch, q_heads, seq_q]`, natural log, `−∞` for fully masked rows.
    pub lse: Array3<f32>,
}

/// Runs attention as a spec defines it, on host arrays, with elements `T`.
pub trait Backend<T: Element> {
    /// Attention of `q: [batch, q_heads, seq_q, head_dim]` over `k`, `v: [batch, kv_heads,
    /// seq_k, head_dim]` (any strides). Errors: [`crate::Error::Shape`], and the backend's
    /// own (a missing device, a dtype it cannot store, a limit).
    fn try_forward(
        &self,
        spec: &AttentionSpec,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>>;

    /// [`Backend::try_forward`] with user mods ([`crate::dsl`]): the mask mod intersected with
    /// the spec's band, the score mod after the spec's modifiers.
    fn try_forward_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>>;

    /// Attention of variable-length sequences packed along one axis ([`Varlen`]): `q: [1,
    /// q_heads, total_q, head_dim]`, `k`, `v: [1, kv_heads, total_k, head_dim]`, as
    /// [`crate::oracle::try_forward_varlen`] defines it.
    fn try_forward_varlen(
        &self,
        spec: &AttentionSpec,
        packing: &Varlen,
        q: ArrayView4<T>,
        k: ArrayView4<T>,
        v: ArrayView4<T>,
    ) -> Result<HostOutput<T>>;
}
