//! Partials over arbitrary key ranges (inverted ones included) and merges of arbitrary lists
//! of them: a merge succeeds exactly when its parts are non-empty, of one spec, cache and set
//! of sequences, and pairwise disjoint in keys; a complete merge equals the decode (to f64
//! rounding for the oracle's partials, under the tolerance rule for the CPU's).

use std::ops::Range;

use crate::Trace;
use arbitrary::{Result, Unstructured};
use gqa::cache::{Float32, KvCache, Layout};
use gqa::partial::Partial;
use gqa::{Error, Gqa};
use ndarray::{Array3, Array4};

use super::{data, mask};

const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 3;

pub fn run(u: &mut Unstructured, t: &mut Trace) -> Result<()> {
    let attention =
        Gqa::<HQ, HKV, D>::try_from(Gqa::<HQ, HKV, D>::new().spec().with_mask(mask(u)?)).unwrap();
    let mut cache = KvCache::<HKV, D, Float32>::new(Layout::Paged {
        page_size: 3,
        pages: 32,
    });
    let mut seqs = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let seq = cache.try_add_sequence().unwrap();
        let len = u.int_in_range(0..=20)?;
        let values = |u: &mut Unstructured| -> Result<Array3<f32>> {
            let data = data(u, HKV * len * D, 1.0)?
                .into_iter()
                .map(|x| x as f32)
                .collect::<Vec<_>>();
            Ok(Array3::from_shape_vec((HKV, len, D), data).unwrap())
        };
        let (k, v) = (values(u)?, values(u)?);
        cache.try_append(seq, k.view(), v.view()).unwrap();
        seqs.push(seq);
    }
    let seq_q = u.int_in_range(0..=3)?;
    let n = seqs.len() * HQ * seq_q * D;
    let q = Array4::from_shape_vec((seqs.len(), HQ, seq_q, D), data(u, n, 1.0)?).unwrap();
    let longest = seqs
        .iter()
        .map(|&s| cache.len(s).unwrap())
        .max()
        .unwrap_or(0);
    // Partials over drawn ranges; an inverted range is refused.
    let mut parts: Vec<(Partial<HQ, HKV, D, f64>, Range<usize>)> = Vec::new();
    for _ in 0..u.int_in_range(0..=5)? {
        let range = u.int_in_range(0..=24)?..u.int_in_range(0..=24)?;
        let range = if u.ratio(1, 6)? {
            range.start..usize::MAX
        } else {
            range
        };
        match attention.try_decode_partial_oracle(q.view(), &cache, &seqs, range.clone()) {
            Ok(part) => {
                let clipped = range.start.min(longest)..range.end.min(longest);
                assert_eq!(
                    part.keys(),
                    if clipped.is_empty() {
                        &[][..]
                    } else {
                        std::slice::from_ref(&clipped)
                    }
                );
                parts.push((part, clipped));
            }
            Err(e) => {
                assert!(
                    range.start > range.end && matches!(e, Error::Partial { .. }),
                    "{range:?}: {e}"
                );
                t.mark("inverted range");
            }
        }
    }
    // A merge of a drawn list (repeats and any order).
    let mut chosen = Vec::new();
    for _ in 0..u.int_in_range(0..=5)? {
        if parts.is_empty() {
            break;
        }
        chosen.push(u.choose_index(parts.len())?);
    }
    let list: Vec<_> = chosen.iter().map(|&i| parts[i].0.clone()).collect();
    let result = Partial::try_merge(&list);
    let ranges: Vec<&Range<usize>> = chosen
        .iter()
        .map(|&i| &parts[i].1)
        .filter(|r| !r.is_empty())
        .collect();
    let overlap = ranges.iter().enumerate().any(|(a, ra)| {
        ranges[..a]
            .iter()
            .any(|rb| ra.start < rb.end && rb.start < ra.end)
    });
    match result {
        Ok(merged) => {
            assert!(
                !list.is_empty() && !overlap,
                "a merge that must fail succeeded ({} parts, overlap {overlap})",
                list.len()
            );
            let covered: usize = ranges.iter().map(|r| r.len()).sum();
            assert_eq!(
                merged.is_complete(),
                covered == longest,
                "completeness of {ranges:?} over {longest} keys"
            );
            if merged.is_complete() {
                let whole = attention
                    .try_decode_oracle(q.view(), &cache, &seqs)
                    .unwrap();
                for (x, y) in merged.lse().iter().zip(&whole.lse) {
                    assert!(
                        x == y || (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                        "lse {x} vs {y}"
                    );
                }
                for (x, y) in merged.o().iter().zip(&whole.o) {
                    assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "o {x} vs {y}");
                }
                t.mark("complete");
            } else {
                t.mark("merged");
            }
        }
        Err(e) => {
            assert!(list.is_empty() || overlap, "a valid merge failed: {e}");
            assert!(matches!(e, Error::Partial { .. }), "{e}");
            t.mark(if list.is_empty() {
                "empty merge"
            } else {
                "overlap"
            });
        }
    }
    // Partials of another spec or after an append never merge with these.
    if let Some((first, range)) = parts.first()
        && !seqs.is_empty()
    {
        let other = attention.causal().window(1, 0);
        if *other.spec() != *attention.spec() {
            let theirs = Gqa::<HQ, HKV, D>::try_from(*other.spec())
                .unwrap()
                .try_decode_partial_oracle(q.view(), &cache, &seqs, range.end..usize::MAX)
                .unwrap();
            assert!(matches!(
                Partial::try_merge(&[first.clone(), theirs]),
                Err(Error::Partial { .. })
            ));
        }
        let one = ndarray::Array3::<f32>::zeros((HKV, 1, D));
        cache.try_append(seqs[0], one.view(), one.view()).unwrap();
        let later = attention
            .try_decode_partial_oracle(q.view(), &cache, &seqs, longest + 1..usize::MAX)
            .unwrap();
        assert!(
            matches!(
                Partial::try_merge(&[first.clone(), later]),
                Err(Error::Partial { .. })
            ),
            "a partial taken before an append merged with one after"
        );
        t.mark("stale");
    }
    Ok(())
}
