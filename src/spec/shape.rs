//! Tensor shapes at the public API, `[batch, heads, seq, head_dim]` (PyTorch SDPA order), and the
//! one check every executor runs before touching data.

use super::AttentionSpec;
use crate::error::{Error, Result};

/// The sizes of one attention problem, once its tensors have been checked against a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProblemShape {
    pub batch: usize,
    pub seq_q: usize,
    pub seq_k: usize,
}

impl AttentionSpec {
    /// Checks `q: [batch, q_heads, seq_q, head_dim]`, `k: [batch, kv_heads, seq_k, head_dim]`
    /// and `v` (the shape of `k`) against this spec. `op` names the caller in the error.
    pub fn check_shapes(
        &self,
        op: &'static str,
        q: &[usize],
        k: &[usize],
        v: &[usize],
    ) -> Result<ProblemShape> {
        let fits = |got: &[usize], want: [Option<usize>; 4]| {
            got.len() == 4 && got.iter().zip(want).all(|(&g, w)| w.is_none_or(|w| w == g))
        };
        let show = |want: [Option<usize>; 4], names: &str| {
            let dims: Vec<String> = want
                .iter()
                .map(|w| w.map_or("_".into(), |w| w.to_string()))
                .collect();
            format!("[{}] ({names})", dims.join(", "))
        };
        let q_want = [None, Some(self.q_heads()), None, Some(self.head_dim())];
        if !fits(q, q_want) {
            return Err(Error::Shape {
                op,
                tensor: "q",
                got: q.to_vec(),
                expected: show(q_want, "[batch, q_heads, seq_q, head_dim]"),
            });
        }
        let k_want = [
            Some(q[0]),
            Some(self.kv_heads()),
            None,
            Some(self.head_dim()),
        ];
        if !fits(k, k_want) {
            return Err(Error::Shape {
                op,
                tensor: "k",
                got: k.to_vec(),
                expected: show(k_want, "[batch, kv_heads, seq_k, head_dim]"),
            });
        }
        if v != k {
            return Err(Error::Shape {
                op,
                tensor: "v",
                got: v.to_vec(),
                expected: format!("{k:?} (the shape of k)"),
            });
        }
        Ok(ProblemShape {
            batch: q[0],
            seq_q: q[2],
            seq_k: k[2],
        })
    }

    /// Checks a tensor laid out like the outputs (`d_o`, `o`, `dq`): `[batch, q_heads, seq_q,
    /// head_dim]` of the problem `shape` ([`Self::check_shapes`]).
    pub fn check_like_q(
        &self,
        op: &'static str,
        shape: ProblemShape,
        tensor: &'static str,
        got: &[usize],
    ) -> Result<()> {
        let want = [shape.batch, self.q_heads(), shape.seq_q, self.head_dim()];
        check_exact(op, tensor, got, &want, "[batch, q_heads, seq_q, head_dim]")
    }

    /// Checks a tensor of one value per query row (`lse`, `d_lse`): `[batch, q_heads, seq_q]`
    /// of the problem `shape`.
    pub fn check_like_lse(
        &self,
        op: &'static str,
        shape: ProblemShape,
        tensor: &'static str,
        got: &[usize],
    ) -> Result<()> {
        let want = [shape.batch, self.q_heads(), shape.seq_q];
        check_exact(op, tensor, got, &want, "[batch, q_heads, seq_q]")
    }

    /// The backward's shape checks ([`crate::backend::Backward`]): the problem `q`, `k`, `v`,
    /// the forward's `o` and `lse`, the upstream `d_o` and, when given, `d_lse`. Returns the
    /// problem's shape; [`Error::Shape`] names the first tensor that disagrees.
    #[allow(clippy::too_many_arguments)]
    pub fn check_backward_shapes(
        &self,
        op: &'static str,
        [q, k, v]: [&[usize]; 3],
        o: &[usize],
        lse: &[usize],
        d_o: &[usize],
        d_lse: Option<&[usize]>,
    ) -> Result<ProblemShape> {
        let shape = self.check_shapes(op, q, k, v)?;
        self.check_like_q(op, shape, "o", o)?;
        self.check_like_lse(op, shape, "lse", lse)?;
        self.check_like_q(op, shape, "d_o", d_o)?;
        if let Some(d_lse) = d_lse {
            self.check_like_lse(op, shape, "d_lse", d_lse)?;
        }
        Ok(shape)
    }
}

fn check_exact(
    op: &'static str,
    tensor: &'static str,
    got: &[usize],
    want: &[usize],
    names: &str,
) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::Shape {
        op,
        tensor,
        got: got.to_vec(),
        expected: format!("{want:?} ({names})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_with_named_dims() {
        let spec = AttentionSpec::try_new(8, 2, 64).unwrap();
        assert_eq!(
            spec.check_shapes("forward", &[2, 8, 5, 64], &[2, 2, 7, 64], &[2, 2, 7, 64]),
            Ok(ProblemShape {
                batch: 2,
                seq_q: 5,
                seq_k: 7
            })
        );
        let err = |q: &[usize], k: &[usize], v: &[usize]| {
            spec.check_shapes("forward", q, k, v)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&[2, 6, 5, 64], &[2, 2, 7, 64], &[2, 2, 7, 64]),
            "forward: `q` has shape [2, 6, 5, 64], expected [_, 8, _, 64] ([batch, q_heads, seq_q, head_dim])"
        );
        assert_eq!(
            err(&[2, 8, 5, 64], &[1, 2, 7, 64], &[2, 2, 7, 64]),
            "forward: `k` has shape [1, 2, 7, 64], expected [2, 2, _, 64] ([batch, kv_heads, seq_k, head_dim])"
        );
        assert_eq!(
            err(&[2, 8, 5, 64], &[2, 2, 7, 64], &[2, 2, 6, 64]),
            "forward: `v` has shape [2, 2, 6, 64], expected [2, 2, 7, 64] (the shape of k)"
        );
        assert!(
            err(&[2, 8, 5], &[2, 2, 7, 64], &[2, 2, 7, 64]).contains("`q` has shape [2, 8, 5]")
        );
    }
}
