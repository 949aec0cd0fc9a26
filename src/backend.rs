//! What every executor of an [`AttentionSpec`] offers the front ends: [`Backend`], implemented
//! by the GPU device ([`crate::cube::CubeDevice`]) and the CPU ([`crate::cpu::Cpu`]), so that
//! `attention.try_forward(&backend, q, k, v)` runs on either.

use ndarray::{Array3, Array4, ArrayView3, ArrayView4};

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

/// Gradients computed by an executor, on the host, in the inputs' element type.
#[derive(Debug, Clone, PartialEq)]
pub struct HostGradients<T> {
    /// `∂L/∂q`, `[batch, q_heads, seq_q, head_dim]`.
    pub dq: Array4<T>,
    /// `∂L/∂k`, `[batch, kv_heads, seq_k, head_dim]`: each KV head's, summed over its group.
    pub dk: Array4<T>,
    /// `∂L/∂v`, `[batch, kv_heads, seq_k, head_dim]`: each KV head's, summed over its group.
    pub dv: Array4<T>,
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

/// An executor that also computes attention's gradients ([`crate::oracle::try_backward`]
/// defines them): from the problem, the forward's output (its `O` and `LSE` are reused, the
/// forward is not recomputed) and the upstream gradient `dO = ∂L/∂O`.
pub trait Backward<T: Element>: Backend<T> {
    /// The gradients of `q: [batch, q_heads, seq_q, head_dim]`, `k`, `v: [batch, kv_heads,
    /// seq_k, head_dim]` given `forward` (this backend's output for them with the same spec
    /// and mods), `d_o` (the shape of `q`) and optionally `d_lse = ∂L/∂LSE` (`[batch,
    /// q_heads, seq_q]`). Errors: [`crate::Error::Shape`], naming the tensor.
    fn try_backward_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        inputs: [ArrayView4<T>; 3],
        forward: &HostOutput<T>,
        d_o: ArrayView4<T>,
        d_lse: Option<ArrayView3<f32>>,
    ) -> Result<HostGradients<T>>;

    /// [`Backward::try_backward_with`] without mods or `d_lse`.
    fn try_backward(
        &self,
        spec: &AttentionSpec,
        inputs: [ArrayView4<T>; 3],
        forward: &HostOutput<T>,
        d_o: ArrayView4<T>,
    ) -> Result<HostGradients<T>> {
        self.try_backward_with(spec, &Mods::none(), inputs, forward, d_o, None)
    }
}
