//! Variable-length sequences packed along one axis (FlashAttention's varlen API): sequence `s`
//! holds the queries `cu_seqlens_q[s]..cu_seqlens_q[s + 1]` and the keys
//! `cu_seqlens_k[s]..cu_seqlens_k[s + 1]` of one packed problem.
//!
//! A packed problem is a batch of one, `q: [1, q_heads, total_q, head_dim]` and `k`, `v: [1,
//! kv_heads, total_k, head_dim]` (any strides: a token-major `[total, heads, head_dim]` array is
//! `permuted_axes([1, 0, 2]).insert_axis(Axis(0))` of it, without a copy). Each sequence is
//! its own attention problem: its queries see only its keys, and the spec's mask and ALiBi
//! distances are taken in the sequence's own positions (a bottom-right mask aligns each
//! sequence's last query with its last key). For self-attention (the same offsets for queries
//! and keys) this is the packed problem under a causal document mask
//! ([`crate::dsl::library::document`]), with none of its work on pairs across documents.
//!
//! The varlen entry points take a spec's mask and modifiers, not user mods ([`crate::dsl`]):
//! a mod over packed sequences is the document mask's problem ([`crate::Front`]'s
//! `.mask_mod(..)` on the packed batch of one).

use std::ops::Range;

use super::ProblemShape;
use crate::error::{Error, Result};

/// The offsets of sequences packed along one axis, checked: both lists start at 0, never
/// decrease, and have one entry more than there are sequences.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Varlen {
    q: Vec<usize>,
    k: Vec<usize>,
}

impl Varlen {
    /// The packing with query offsets `cu_seqlens_q` and key offsets `cu_seqlens_k` (each
    /// `[0, end of sequence 0, end of sequence 1, ..]`).
    ///
    /// Errors: [`Error::Varlen`] when a list is empty, does not start at 0 or decreases, or the
    /// two count different sequences.
    ///
    /// ```
    /// let packing = gqa::spec::Varlen::try_new(&[0, 3, 3, 7], &[0, 5, 6, 10])?;
    /// assert_eq!(packing.sequences(), 3);
    /// assert_eq!(packing.queries(1), 3..3);
    /// assert_eq!((packing.max_seq_q(), packing.max_seq_k()), (4, 5));
    /// # Ok::<(), gqa::Error>(())
    /// ```
    pub fn try_new(cu_seqlens_q: &[usize], cu_seqlens_k: &[usize]) -> Result<Varlen> {
        for (name, cu) in [
            ("cu_seqlens_q", cu_seqlens_q),
            ("cu_seqlens_k", cu_seqlens_k),
        ] {
            if cu.first() != Some(&0) {
                return Err(Error::Varlen {
                    reason: format!("{name} must start at 0, got {cu:?}"),
                });
            }
            if let Some(at) = cu.windows(2).position(|w| w[1] < w[0]) {
                return Err(Error::Varlen {
                    reason: format!(
                        "{name} decreases from {} to {} at entry {}",
                        cu[at],
                        cu[at + 1],
                        at + 1
                    ),
                });
            }
        }
        if cu_seqlens_q.len() != cu_seqlens_k.len() {
            return Err(Error::Varlen {
                reason: format!(
                    "cu_seqlens_q counts {} sequences, cu_seqlens_k {}",
                    cu_seqlens_q.len() - 1,
                    cu_seqlens_k.len() - 1
                ),
            });
        }
        Ok(Varlen {
            q: cu_seqlens_q.to_vec(),
            k: cu_seqlens_k.to_vec(),
        })
    }

    /// Self-attention packing: sequence `s` has `lengths[s]` queries and as many keys.
    pub fn from_lengths(lengths: &[usize]) -> Varlen {
        let mut cu = Vec::with_capacity(lengths.len() + 1);
        cu.push(0);
        for &len in lengths {
            cu.push(cu.last().unwrap() + len);
        }
        Varlen {
            q: cu.clone(),
            k: cu,
        }
    }

    /// The number of sequences.
    pub fn sequences(&self) -> usize {
        self.q.len() - 1
    }

    /// The offsets of the queries, `[0, .., total_q]`.
    pub fn cu_seqlens_q(&self) -> &[usize] {
        &self.q
    }

    /// The offsets of the keys, `[0, .., total_k]`.
    pub fn cu_seqlens_k(&self) -> &[usize] {
        &self.k
    }

    /// Sequence `s`'s rows of the packed query axis.
    pub fn queries(&self, s: usize) -> Range<usize> {
        self.q[s]..self.q[s + 1]
    }

    /// Sequence `s`'s rows of the packed key axis.
    pub fn keys(&self, s: usize) -> Range<usize> {
        self.k[s]..self.k[s + 1]
    }

    /// The packed query length (the last query offset).
    pub fn total_q(&self) -> usize {
        *self.q.last().expect("checked non-empty")
    }

    /// The packed key length (the last key offset).
    pub fn total_k(&self) -> usize {
        *self.k.last().expect("checked non-empty")
    }

    /// The longest sequence's query count (0 without sequences).
    pub fn max_seq_q(&self) -> usize {
        self.q.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    /// The longest sequence's key count (0 without sequences).
    pub fn max_seq_k(&self) -> usize {
        self.k.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
    }

    /// Sequence `s` as a problem of its own (a batch of one).
    pub fn shape(&self, s: usize) -> ProblemShape {
        ProblemShape {
            batch: 1,
            seq_q: self.queries(s).len(),
            seq_k: self.keys(s).len(),
        }
    }

    /// Checks that `shape` (of [`super::AttentionSpec::check_shapes`]) is this packing's: a
    /// batch of one whose query and key axes are as long as the offsets say.
    pub fn check_packed(&self, op: &'static str, shape: ProblemShape) -> Result<()> {
        if shape.batch != 1 || shape.seq_q != self.total_q() || shape.seq_k != self.total_k() {
            return Err(Error::Shape {
                op,
                tensor: "q, k",
                got: vec![shape.batch, shape.seq_q, shape.seq_k],
                expected: format!(
                    "a packed batch of one: [batch 1, {} queries, {} keys] as the offsets say",
                    self.total_q(),
                    self.total_k()
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_checked_with_named_lists() {
        let err = |q: &[usize], k: &[usize]| Varlen::try_new(q, k).unwrap_err().to_string();
        assert_eq!(
            err(&[], &[]),
            "varlen offsets: cu_seqlens_q must start at 0, got []"
        );
        assert_eq!(
            err(&[0, 2], &[1, 2]),
            "varlen offsets: cu_seqlens_k must start at 0, got [1, 2]"
        );
        assert_eq!(
            err(&[0, 4, 3], &[0, 1, 2]),
            "varlen offsets: cu_seqlens_q decreases from 4 to 3 at entry 2"
        );
        assert_eq!(
            err(&[0, 4], &[0, 1, 2]),
            "varlen offsets: cu_seqlens_q counts 1 sequences, cu_seqlens_k 2"
        );
        let none = Varlen::try_new(&[0], &[0]).unwrap();
        assert_eq!(
            (none.sequences(), none.max_seq_q(), none.total_k()),
            (0, 0, 0)
        );
        let packing = Varlen::from_lengths(&[2, 0, 5]);
        assert_eq!(packing.cu_seqlens_q(), &[0, 2, 2, 7]);
        assert_eq!(packing.keys(2), 2..7);
        assert!(
            packing
                .check_packed(
                    "f",
                    ProblemShape {
                        batch: 1,
                        seq_q: 7,
                        seq_k: 6
                    }
                )
                .is_err()
        );
    }
}
