//! The attention language: one plain value, [`AttentionSpec`], that says exactly which attention
//! to compute.
//!
//! The typed front end ([`crate::Attention`]) and its runtime twin ([`crate::DynAttention`])
//! both lower to it; the oracle interprets it; kernels will take it as their compile-time
//! configuration. One spec, every executor: semantics cannot drift.
//!
//! A spec is always valid: it can only be made through [`AttentionSpec::try_new`] and the
//! `try_with_*` methods, each of which checks what it adds. It is `Copy + Eq + Hash`.

pub mod mask;
pub mod score;
mod shape;
mod varlen;

pub use mask::{Alignment, Mask};
pub use score::AlibiSlopes;
pub use shape::ProblemShape;
pub use varlen::Varlen;

use crate::cache::KvCacheFootprint;
use crate::element::DType;
use crate::error::{Error, Result};
use crate::heads::check_config;
use score::{Finite32, Finite64};

/// Which attention to compute: heads, head dim, mask and score modifiers (see [`score`] for the
/// order in which modifiers apply, [`mask`] for the masks and their alignment).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionSpec {
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    mask: Mask,
    scale: Finite64,
    softcap: Option<Finite32>,
    alibi: Option<AlibiSlopes>,
}

impl AttentionSpec {
    /// A maskless spec with the default scale `1/√head_dim`, after checking the configuration
    /// rule ([`crate::heads::check_config`]).
    pub fn try_new(q_heads: usize, kv_heads: usize, head_dim: usize) -> Result<AttentionSpec> {
        check_config(q_heads, kv_heads, head_dim)?;
        // In f64: the oracle computes the definition, and 1/√D is not an f32 number for most D.
        let scale = 1.0 / (head_dim as f64).sqrt();
        Ok(AttentionSpec {
            q_heads,
            kv_heads,
            head_dim,
            mask: Mask::NONE,
            scale: Finite64::new(scale).expect("1/sqrt(head_dim) is finite for head_dim >= 1"),
            softcap: None,
            alibi: None,
        })
    }

    /// Query heads.
    pub fn q_heads(&self) -> usize {
        self.q_heads
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Query heads per key/value head (`q_heads / kv_heads`).
    pub fn group_size(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// The key/value head that query head `q_head` reads.
    pub fn kv_head_of(&self, q_head: usize) -> usize {
        q_head / self.group_size()
    }

    /// The dimension of each query, key and value vector.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The mask.
    pub fn mask(&self) -> Mask {
        self.mask
    }

    /// The factor applied to `q·k` (default `1/√head_dim`), in `f64`: what the oracle uses.
    pub fn scale(&self) -> f64 {
        self.scale.get()
    }

    /// [`AttentionSpec::scale`] rounded to `f32`, once: what `f32` executors (the kernels, the
    /// CPU backend) multiply by. Always finite ([`AttentionSpec::try_with_scale`] checks).
    pub fn scale_f32(&self) -> f32 {
        self.scale.get() as f32
    }

    /// The logit softcap, if any.
    pub fn softcap(&self) -> Option<f32> {
        self.softcap.map(Finite32::get)
    }

    /// The ALiBi slopes, if any (one per query head).
    pub fn alibi(&self) -> Option<&AlibiSlopes> {
        self.alibi.as_ref()
    }

    /// This spec with another mask. Infallible: every [`Mask`] value is valid.
    pub fn with_mask(self, mask: Mask) -> AttentionSpec {
        AttentionSpec { mask, ..self }
    }

    /// This spec with its mask further restricted to `left` keys before and `right` keys after
    /// the diagonal. Negative sides are an [`Error::InvalidWindow`].
    pub fn try_with_window(self, left: i64, right: i64) -> Result<AttentionSpec> {
        match (usize::try_from(left), usize::try_from(right)) {
            (Ok(l), Ok(r)) => Ok(self.with_mask(self.mask.window(l, r))),
            _ => Err(Error::InvalidWindow { left, right }),
        }
    }

    /// This spec with a custom softmax scale: any value that is finite in `f32` as well (the
    /// precision `f32` executors use), else [`Error::InvalidScale`].
    pub fn try_with_scale(self, scale: f64) -> Result<AttentionSpec> {
        let scale = Finite64::new(scale).ok_or(Error::InvalidScale { scale })?;
        Ok(AttentionSpec { scale, ..self })
    }

    /// This spec with a logit softcap `cap · tanh(s / cap)` (finite, `> 0`).
    pub fn try_with_softcap(self, cap: f32) -> Result<AttentionSpec> {
        match Finite32::new(cap) {
            Some(finite) if cap > 0.0 => Ok(AttentionSpec {
                softcap: Some(finite),
                ..self
            }),
            _ => Err(Error::InvalidSoftcap { cap }),
        }
    }

    /// This spec with ALiBi using the standard geometric slopes for its query heads.
    pub fn with_alibi(self) -> AttentionSpec {
        AttentionSpec {
            alibi: Some(AlibiSlopes::geometric(self.q_heads)),
            ..self
        }
    }

    /// This spec with ALiBi using `slopes`, one per query head.
    pub fn try_with_alibi_slopes(self, slopes: &[f32]) -> Result<AttentionSpec> {
        Ok(AttentionSpec {
            alibi: Some(AlibiSlopes::try_new(self.q_heads, slopes)?),
            ..self
        })
    }

    /// The same spec — mask, scale, softcap, ALiBi slopes — with another number of KV heads,
    /// after checking the configuration rule. (How the MHA twin of a GQA spec is made.)
    pub fn try_with_kv_heads(self, kv_heads: usize) -> Result<AttentionSpec> {
        check_config(self.q_heads, kv_heads, self.head_dim)?;
        Ok(AttentionSpec { kv_heads, ..self })
    }

    /// This spec without its softcap.
    pub fn without_softcap(self) -> AttentionSpec {
        AttentionSpec {
            softcap: None,
            ..self
        }
    }

    /// This spec without ALiBi.
    pub fn without_alibi(self) -> AttentionSpec {
        AttentionSpec {
            alibi: None,
            ..self
        }
    }

    /// What a KV cache for this configuration costs, stored as `dtype`.
    pub fn kv_cache(&self, dtype: DType) -> KvCacheFootprint {
        KvCacheFootprint::new(self.q_heads, self.kv_heads, self.head_dim, dtype)
    }
}

impl std::fmt::Debug for AttentionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("AttentionSpec");
        s.field("q_heads", &self.q_heads)
            .field("kv_heads", &self.kv_heads)
            .field("head_dim", &self.head_dim)
            .field("mask", &self.mask)
            .field("scale", &self.scale);
        if let Some(cap) = &self.softcap {
            s.field("softcap", cap);
        }
        if let Some(alibi) = &self.alibi {
            s.field("alibi", alibi);
        }
        s.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AttentionSpec {
        AttentionSpec::try_new(8, 2, 64).unwrap()
    }

    #[test]
    fn defaults_are_maskless_with_inverse_sqrt_scale() {
        let s = spec();
        assert_eq!((s.scale(), s.scale_f32()), (0.125, 0.125));
        // Not an f32 number: kept in f64 for the oracle, rounded once for f32 executors.
        let odd = AttentionSpec::try_new(4, 2, 72).unwrap();
        assert_eq!(odd.scale(), 1.0 / 72f64.sqrt());
        assert_eq!(odd.scale_f32(), (1.0 / 72f64.sqrt()) as f32);
        assert_ne!(odd.scale(), f64::from(odd.scale_f32()));
        assert_eq!(
            (s.group_size(), s.kv_head_of(3), s.kv_head_of(4)),
            (4, 0, 1)
        );
        assert!(s.mask().is_none() && s.softcap().is_none() && s.alibi().is_none());
    }

    #[test]
    fn bad_modifiers_are_typed_errors() {
        assert_eq!(
            spec().try_with_window(-1, 0),
            Err(Error::InvalidWindow { left: -1, right: 0 })
        );
        assert_eq!(
            spec().try_with_window(3, -2),
            Err(Error::InvalidWindow { left: 3, right: -2 })
        );
        assert!(matches!(
            spec().try_with_scale(f64::NAN),
            Err(Error::InvalidScale { .. })
        ));
        assert!(matches!(
            spec().try_with_scale(f64::INFINITY),
            Err(Error::InvalidScale { .. })
        ));
        assert_eq!(
            spec().try_with_scale(1e39),
            Err(Error::InvalidScale { scale: 1e39 })
        );
        assert_eq!(
            spec().try_with_softcap(0.0),
            Err(Error::InvalidSoftcap { cap: 0.0 })
        );
        assert_eq!(
            spec().try_with_softcap(-5.0),
            Err(Error::InvalidSoftcap { cap: -5.0 })
        );
        assert!(matches!(
            spec().try_with_softcap(f32::NAN),
            Err(Error::InvalidSoftcap { .. })
        ));
        assert!(matches!(spec().try_with_kv_heads(3), Err(Error::Config(_))));
        assert_eq!(
            spec().try_with_alibi_slopes(&[0.5; 7]),
            Err(Error::AlibiSlopeCount {
                q_heads: 8,
                slopes: 7
            })
        );
    }

    #[test]
    fn equal_semantics_hash_equal() {
        use std::collections::HashSet;
        let a = spec()
            .try_with_window(4, 0)
            .unwrap()
            .with_mask(spec().mask().causal().window(4, 0));
        let b = spec()
            .with_mask(Mask::NONE.causal())
            .try_with_window(4, 9)
            .unwrap();
        assert_eq!(a, b);
        let set: HashSet<_> = [
            a,
            b,
            spec().try_with_scale(-0.0).unwrap(),
            spec().try_with_scale(0.0).unwrap(),
        ]
        .into();
        assert_eq!(set.len(), 2);
    }
}
