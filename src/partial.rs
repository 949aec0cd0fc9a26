//! Partial attention results over a subset of the keys, and their merge (the algebra of
//! split-KV / Flash-Decoding, given to the user).
//!
//! A [`Partial`] is what attention over the keys in some ranges computes: for each row the
//! output normalised over those keys and their log-sum-exp. Partials over disjoint key sets merge
//! into the partial over their union — `lse = log Σ exp(lse_s)`, `o = Σ exp(lse_s − lse) · o_s`
//! — and the partial over every key is the attention itself. Decode kernels do this internally
//! over splits of a long cache; [`Partial`] lets a caller do it across calls (for instance
//! decode the first keys of a long cache on one device and the rest elsewhere, or overlap
//! work on the old keys with the arrival of new ones).
//!
//! **What can be merged is typed.** A `Partial<HQ, HKV, D, E>` merges only with partials of the
//! same type — same head counts, head dim and element — so partials of different
//! configurations do not compile together. What the type cannot hold is checked at run time
//! ([`Error::Partial`]): the same spec (mask, scale, score modifiers), the same cache, the
//! same sequences at the same lengths, the same shapes, and keys that no two parts share
//! (a key counted twice would weigh twice).
//!
//! ```
//! use gqa::Gqa;
//! use gqa::cache::{Float32, Layout};
//! use ndarray::Array3;
//! let attention = Gqa::<4, 2, 8>::new().causal();
//! let mut cache = attention.try_new_cache::<Float32>(Layout::Paged { page_size: 4, pages: 8 })?;
//! let seq = cache.try_add_sequence()?;
//! let kv = Array3::from_shape_fn((2, 10, 8), |(h, t, c)| ((h + 3 * t + c) % 7) as f32 / 7.0);
//! cache.try_append(seq, kv.view(), kv.view())?;
//! let q = ndarray::Array4::from_elem((1, 4, 1, 8), 0.5f32);
//! let old = attention.try_decode_partial_oracle(q.view(), &cache, &[seq], 0..6)?;
//! let new = attention.try_decode_partial_oracle(q.view(), &cache, &[seq], 6..10)?;
//! let whole = gqa::partial::Partial::try_merge(&[old, new])?;
//! assert!(whole.is_complete());
//! let direct = attention.try_decode_oracle(q.view(), &cache, &[seq])?;
//! assert!((whole.o()[[0, 3, 0, 5]] - direct.o[[0, 3, 0, 5]]).abs() < 1e-12);
//! # Ok::<(), gqa::Error>(())
//! ```

use std::ops::Range;

use ndarray::{Array3, Array4, ArrayView3, ArrayView4};
use num_traits::Float;

use crate::cache::SeqId;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::heads::{Rule, Supported};
use crate::spec::AttentionSpec;

/// The element types partials are kept in: `f32` (kernels) and `f64` (the oracle).
pub trait PartialElement: Element + Float {}
impl PartialElement for f32 {}
impl PartialElement for f64 {}

/// Where a partial's rows come from: two partials merge only when this is equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    /// The cache's unique id.
    pub cache: u64,
    /// Each row of the batch: its sequence and that sequence's length when decoded.
    pub seqs: Vec<(SeqId, usize)>,
}

impl Source {
    /// The longest sequence's length.
    pub fn longest(&self) -> usize {
        self.seqs.iter().map(|&(_, len)| len).max().unwrap_or(0)
    }
}

/// Attention over the keys in [`Partial::keys`] only, for `HQ` query heads sharing `HKV` KV
/// heads of dimension `D`, kept in `E`. See the [module](self) for what merges.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial<const HQ: usize, const HKV: usize, const D: usize, E = f32>
where
    Rule: Supported<HQ, HKV, D>,
{
    spec: AttentionSpec,
    source: Source,
    /// Sorted, disjoint, non-empty, non-adjacent ranges.
    keys: Vec<Range<usize>>,
    o: Array4<E>,
    /// Kept in `f64` whatever `E` is, so that merges do not round it again.
    lse: Array3<f64>,
}

impl<const HQ: usize, const HKV: usize, const D: usize, E: PartialElement> Partial<HQ, HKV, D, E>
where
    Rule: Supported<HQ, HKV, D>,
{
    /// A partial over `keys` (already clipped to the longest sequence) of the rows `o`, `lse`.
    pub(crate) fn new(
        spec: AttentionSpec,
        source: Source,
        keys: Range<usize>,
        o: Array4<E>,
        lse: Array3<f64>,
    ) -> Self {
        let keys = if keys.is_empty() { vec![] } else { vec![keys] };
        Partial {
            spec,
            source,
            keys,
            o,
            lse,
        }
    }

    /// The spec the partial was computed with.
    pub fn spec(&self) -> &AttentionSpec {
        &self.spec
    }

    /// The key positions covered, as sorted disjoint ranges (each sequence's keys are those
    /// below its length).
    pub fn keys(&self) -> &[Range<usize>] {
        &self.keys
    }

    /// The sequences of the batch, in its order.
    pub fn sequences(&self) -> Vec<SeqId> {
        self.source.seqs.iter().map(|&(seq, _)| seq).collect()
    }

    /// Whether the partial covers every key of every sequence: it is then the attention itself.
    pub fn is_complete(&self) -> bool {
        let longest = self.source.longest();
        match self.keys.as_slice() {
            [] => longest == 0,
            [only] => only.start == 0 && only.end >= longest,
            _ => false,
        }
    }

    /// `[batch, q_heads, seq_q, head_dim]`, normalised over the covered keys (0 for a row that
    /// sees none of them).
    pub fn o(&self) -> &Array4<E> {
        &self.o
    }

    /// `[batch, q_heads, seq_q]`, natural log over the covered keys (`−∞` for a row that sees
    /// none of them). In `f64` for every `E`: a kernel's partial state is its max score and
    /// its sum of exponentials (f32 each), whose `max + ln sum` would lose bits in f32 — each
    /// merge would round it again.
    pub fn lse(&self) -> &Array3<f64> {
        &self.lse
    }

    /// The output and LSE.
    pub fn into_parts(self) -> (Array4<E>, Array3<f64>) {
        (self.o, self.lse)
    }

    /// Merges partials over disjoint keys into the partial over their union (in any order and
    /// grouping: merge is associative and commutative up to rounding). Accumulates in `f64`.
    ///
    /// Errors ([`Error::Partial`]): no parts; parts of different specs, caches, sequences or
    /// lengths, or shapes; a key in two parts.
    pub fn try_merge(parts: &[Self]) -> Result<Self> {
        const OP: &str = "Partial::try_merge";
        let fail = |reason: String| Err(Error::Partial { op: OP, reason });
        let Some(first) = parts.first() else {
            return fail("no partials to merge".into());
        };
        for part in parts {
            if part.spec != first.spec {
                return fail("the partials were computed with different specs".into());
            }
            if part.source != first.source {
                return fail(format!(
                    "the partials come from different caches, sequences or lengths ({:?} vs {:?})",
                    part.source.seqs, first.source.seqs
                ));
            }
            if part.o.shape() != first.o.shape() {
                return fail(format!(
                    "the partials' shapes differ ({:?} vs {:?})",
                    part.o.shape(),
                    first.o.shape()
                ));
            }
        }
        let mut keys: Vec<Range<usize>> = parts.iter().flat_map(|p| p.keys.clone()).collect();
        keys.sort_by_key(|r| r.start);
        let mut union: Vec<Range<usize>> = Vec::with_capacity(keys.len());
        for range in keys {
            match union.last_mut() {
                Some(last) if range.start < last.end => {
                    return fail(format!(
                        "keys {}..{} are in two partials",
                        range.start,
                        range.end.min(last.end)
                    ));
                }
                Some(last) if range.start == last.end => last.end = range.end,
                _ => union.push(range),
            }
        }
        let (o, lse) = merge_rows(
            &parts.iter().map(|p| p.o.view()).collect::<Vec<_>>(),
            &parts.iter().map(|p| p.lse.view()).collect::<Vec<_>>(),
        );
        Ok(Partial {
            spec: first.spec,
            source: first.source.clone(),
            keys: union,
            o,
            lse,
        })
    }
}

/// Clips a caller's key range to `0..longest`; an inverted range is an error.
pub(crate) fn clip_keys(
    op: &'static str,
    keys: Range<usize>,
    longest: usize,
) -> Result<Range<usize>> {
    if keys.start > keys.end {
        return Err(Error::Partial {
            op,
            reason: format!("{}..{} is not a key range", keys.start, keys.end),
        });
    }
    Ok(keys.start.min(longest)..keys.end.min(longest))
}

/// The merge of one row's states over disjoint key sets: `parts[s] = (m_s, l_s)`, a max
/// score and the sum of `exp(score − m_s)` (an LSE is the state `(lse, 1)`; `l_s = 0`: the
/// part saw no key). Returns the row's LSE `M + ln Σ exp(m_s − M) · l_s` (`−∞` when no part
/// saw a key) and leaves in `weights[s]` the weight `exp(m_s − lse) · l_s` of part `s`'s
/// normalised output. The one implementation of the merge algebra on the host: partial
/// merges ([`Partial::try_merge`], [`crate::oracle::merge`]) and the CPU backend's split-KV.
pub(crate) fn merge_state(parts: &[(f64, f64)], weights: &mut Vec<f64>) -> f64 {
    weights.clear();
    let seen = |&&(m, l): &&(f64, f64)| l > 0.0 && m > f64::NEG_INFINITY;
    let max = parts
        .iter()
        .filter(seen)
        .map(|&(m, _)| m)
        .fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        weights.resize(parts.len(), 0.0);
        return f64::NEG_INFINITY;
    }
    let sum: f64 = parts
        .iter()
        .filter(seen)
        .map(|&(m, l)| (m - max).exp() * l)
        .sum();
    let lse = max + sum.ln();
    weights.extend(parts.iter().map(|part| {
        if seen(&part) {
            (part.0 - lse).exp() * part.1
        } else {
            0.0
        }
    }));
    lse
}

/// The merge of rows computed over disjoint key sets, accumulated in `f64` (by
/// [`merge_state`]); a row no part sees stays `o = 0`, `lse = −∞`. The caller checks that the
/// shapes agree.
pub(crate) fn merge_rows<E: PartialElement>(
    os: &[ArrayView4<E>],
    lses: &[ArrayView3<f64>],
) -> (Array4<E>, Array3<f64>) {
    let dim = os[0].shape()[3];
    let mut o = Array4::<E>::zeros(os[0].raw_dim());
    let mut lse = Array3::from_elem(lses[0].raw_dim(), f64::NEG_INFINITY);
    let (mut states, mut weights) = (Vec::new(), Vec::new());
    let mut row = vec![0.0f64; dim];
    for ((b, h, i), out) in lse.indexed_iter_mut() {
        states.clear();
        states.extend(lses.iter().map(|l| (l[[b, h, i]], 1.0)));
        *out = merge_state(&states, &mut weights);
        row.fill(0.0);
        for (part, &w) in os.iter().zip(&weights) {
            if w > 0.0 {
                for (acc, x) in row.iter_mut().zip(part.slice(ndarray::s![b, h, i, ..])) {
                    *acc += w * x.widen();
                }
            }
        }
        for (dst, &x) in o.slice_mut(ndarray::s![b, h, i, ..]).iter_mut().zip(&row) {
            *dst = E::narrow(x);
        }
    }
    (o, lse)
}
