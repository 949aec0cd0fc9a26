//! The KV cache on the host, and the oracle's decode and merge.
//!
//! - a stateful property test: random interleavings of add / append / drop / read across
//!   several sequences, on paged and contiguous caches, against a model kept in plain `Vec`s
//!   (what was appended, which appends must be refused);
//! - paged equals contiguous, for every storage;
//! - quantized rows are within half a quantization step of the input;
//! - exact sizes: GQA 32/8 is 1/4 of MHA 32/32, int8 is 1/4 of f32 plus its scales;
//! - the oracle: decode is the last rows of a forward over the cache; merging split partials
//!   gives the unsplit result; merge is associative.

#[macro_use]
mod common;

use common::refusal::must_refuse;
use common::{build_spec, mask, modifiers, runner, tensor};
use gqa::cache::{
    BFloat16, Float16, Float32, Int4, Int8, KvCache, KvStorage, Layout, SeqId, StorageKind,
};
use gqa::{Error, Gqa, Mha, oracle};
use ndarray::{Array3, Axis, s};
use proptest::prelude::*;

const HKV: usize = 2;
const D: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Add,
    /// Append `tokens` tokens to the `which`-th live sequence (modulo their count).
    Append {
        which: usize,
        tokens: usize,
        seed: u32,
    },
    /// Append one token to every live sequence at once (a decode step of a batch).
    AppendAll {
        seed: u32,
    },
    Drop {
        which: usize,
    },
    Read {
        which: usize,
    },
    /// Append a batch to every live sequence in which one value is one the storage must refuse
    /// (`bad`: NaN, ±∞, 7e4, 1e39 as an f64); it must be refused whole, changing nothing.
    AppendBad {
        tokens: usize,
        bad: usize,
        at: usize,
    },
}

/// Values some storage cannot hold: non-finite (quantized storage refuses them), and finite
/// values that would be stored as ∞ (f16 above 65504; beyond f32 everywhere).
const BAD_VALUES: [f64; 5] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 7.0e4, 1.0e39];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Add),
        4 => (0..8usize, 0..9usize, any::<u32>()).prop_map(|(which, tokens, seed)| Op::Append { which, tokens, seed }),
        2 => any::<u32>().prop_map(|seed| Op::AppendAll { seed }),
        1 => (0..8usize).prop_map(|which| Op::Drop { which }),
        2 => (0..8usize).prop_map(|which| Op::Read { which }),
        1 => (1..5usize, 0..BAD_VALUES.len(), any::<usize>()).prop_map(|(tokens, bad, at)| Op::AppendBad { tokens, bad, at }),
    ]
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        (1..6usize, 1..12usize).prop_map(|(page_size, pages)| Layout::Paged { page_size, pages }),
        (1..4usize, 1..16usize).prop_map(|(sequences, capacity)| Layout::Contiguous {
            sequences,
            capacity
        }),
    ]
}

/// Deterministic rows `[HKV, tokens, D]` from a seed.
fn rows(tokens: usize, seed: u32) -> Array3<f32> {
    Array3::from_shape_fn((HKV, tokens, D), |(h, t, c)| {
        ((seed as f32) * 0.001 + (h * 31 + t * 7 + c) as f32 * 0.37).sin() * 2.0
    })
}

/// Keys and values of one append to one sequence, `[HKV, tokens, D]` each.
type Chunk = (Array3<f32>, Array3<f32>);

/// The model: each live sequence's appended chunks.
#[derive(Debug, Default)]
struct Model {
    seqs: Vec<(SeqId, Vec<Chunk>)>,
}

impl Model {
    fn len(&self, n: usize) -> usize {
        self.seqs[n].1.iter().map(|r| r.0.shape()[1]).sum()
    }

    /// Keys (`value = false`) or values of sequence `n`, concatenated.
    fn contents(&self, n: usize, value: bool) -> Array3<f32> {
        let views: Vec<_> = self.seqs[n]
            .1
            .iter()
            .map(|(k, v)| if value { v.view() } else { k.view() })
            .collect();
        if views.is_empty() {
            return Array3::zeros((HKV, 0, D));
        }
        ndarray::concatenate(Axis(1), &views).unwrap()
    }

    /// Whether growing sequence `n` by `extra[n]` fits (pages or capacity), restated from the
    /// layout's definition.
    fn fits(&self, layout: Layout, extra: &[usize]) -> bool {
        match layout {
            Layout::Contiguous { capacity, .. } => {
                (0..self.seqs.len()).all(|n| self.len(n) + extra[n] <= capacity)
            }
            Layout::Paged { page_size, pages } => {
                let needed: usize = (0..self.seqs.len())
                    .map(|n| (self.len(n) + extra[n]).div_ceil(page_size))
                    .sum();
                needed <= pages
            }
        }
    }
}

/// `stored` equals what was appended, stored through `S` (exact for f32; within the storage's
/// rounding otherwise; NaN and ±∞, which float storage keeps, as they were).
fn assert_stored(kind: StorageKind, appended: &Array3<f32>, stored: &Array3<f32>) {
    assert_eq!(appended.shape(), stored.shape());
    for h in 0..HKV {
        for t in 0..appended.shape()[1] {
            let x = appended.slice(s![h, t, ..]);
            let y = stored.slice(s![h, t, ..]);
            for (a, b) in x.iter().zip(y).filter(|(a, _)| !a.is_finite()) {
                assert!(
                    (a.is_nan() && b.is_nan()) || a == b,
                    "{kind:?}: stored {b}, appended {a}"
                );
            }
            let x: Vec<f32> = x.iter().copied().filter(|a| a.is_finite()).collect();
            let y: Vec<f32> = y
                .iter()
                .zip(appended.slice(s![h, t, ..]))
                .filter(|(_, a)| a.is_finite())
                .map(|(b, _)| *b)
                .collect();
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let bound = match kind {
                StorageKind::Float32 => 0.0,
                StorageKind::Float16 => amax * 2f32.powi(-11),
                StorageKind::BFloat16 => amax * 2f32.powi(-8),
                StorageKind::Int8 | StorageKind::Int4 => {
                    0.5 * amax / kind.quant_max() as f32 * (1.0 + 1e-5)
                }
            };
            for (a, b) in x.iter().zip(y) {
                assert!(
                    (a - b).abs() <= bound,
                    "{kind:?}: stored {b}, appended {a}, bound {bound}"
                );
            }
        }
    }
}

fn run_ops<S: KvStorage>(layout: Layout, ops: &[Op]) {
    let mut cache = KvCache::<HKV, D, S>::try_new(layout).unwrap();
    let mut model = Model::default();
    let mut dropped = Vec::new();
    for op in ops {
        match *op {
            Op::Add => {
                let room = match layout {
                    Layout::Contiguous { sequences, .. } => model.seqs.len() < sequences,
                    Layout::Paged { .. } => true,
                };
                match cache.try_add_sequence() {
                    Ok(id) => {
                        assert!(room, "a full contiguous cache accepted a sequence");
                        model.seqs.push((id, Vec::new()));
                    }
                    Err(Error::CacheFull { .. }) => assert!(!room, "refused with room left"),
                    Err(e) => panic!("{e}"),
                }
            }
            Op::Append {
                which,
                tokens,
                seed,
            } if !model.seqs.is_empty() => {
                let n = which % model.seqs.len();
                let mut extra = vec![0; model.seqs.len()];
                extra[n] = tokens;
                let fits = model.fits(layout, &extra);
                let x = rows(tokens, seed);
                let y = rows(tokens, seed ^ 0xdead);
                match cache.try_append(model.seqs[n].0, x.view(), y.view()) {
                    Ok(()) => {
                        assert!(fits, "an append beyond the pool was accepted");
                        model.seqs[n].1.push((x, y));
                    }
                    Err(Error::CacheFull { .. }) => assert!(!fits, "refused an append that fits"),
                    Err(e) => panic!("{e}"),
                }
            }
            Op::AppendAll { seed } if !model.seqs.is_empty() => {
                let extra = vec![1; model.seqs.len()];
                let fits = model.fits(layout, &extra);
                let xs: Vec<_> = (0..model.seqs.len())
                    .map(|n| (rows(1, seed + n as u32), rows(1, !seed - n as u32)))
                    .collect();
                let items: Vec<_> = model
                    .seqs
                    .iter()
                    .zip(&xs)
                    .map(|((id, _), (x, y))| (*id, x.view(), y.view()))
                    .collect();
                match cache.try_append_batch(&items) {
                    Ok(()) => {
                        assert!(fits, "a batch append beyond the pool was accepted");
                        for (seq, x) in model.seqs.iter_mut().zip(xs) {
                            seq.1.push(x);
                        }
                    }
                    Err(Error::CacheFull { .. }) => assert!(!fits, "refused a batch that fits"),
                    Err(e) => panic!("{e}"),
                }
            }
            Op::Drop { which } if !model.seqs.is_empty() => {
                let (id, _) = model.seqs.remove(which % model.seqs.len());
                cache.try_drop_sequence(id).unwrap();
                dropped.push(id);
            }
            Op::AppendBad { tokens, bad, at } if !model.seqs.is_empty() => {
                let value = BAD_VALUES[bad];
                let before = cache.clone();
                let xs: Vec<ndarray::Array3<f64>> = (0..model.seqs.len())
                    .map(|n| rows(tokens, n as u32 + 77).mapv(f64::from))
                    .collect();
                let mut xs = xs;
                let n = at % xs.len();
                let len = xs[n].len();
                xs[n].as_slice_mut().unwrap()[(at / 7) % len] = value;
                let items: Vec<_> = model
                    .seqs
                    .iter()
                    .zip(&xs)
                    .map(|((id, _), x)| (*id, x.view(), x.view()))
                    .collect();
                let result = cache.try_append_batch(&items);
                if must_refuse(S::KIND, value) {
                    assert!(
                        matches!(
                            result,
                            Err(Error::NonFinite { .. } | Error::Unrepresentable { .. })
                        ),
                        "{:?} accepted {value}: {result:?}",
                        S::KIND
                    );
                    assert!(
                        cache.same_contents(&before),
                        "a refused append changed the cache"
                    );
                } else {
                    // Float storage keeps NaN and ∞ as they are: accepted, unless the pool is
                    // full, which also changes nothing.
                    match result {
                        Ok(()) => {
                            for (seq, x) in model.seqs.iter_mut().zip(xs) {
                                let x = x.mapv(|v| v as f32);
                                seq.1.push((x.clone(), x));
                            }
                        }
                        Err(Error::CacheFull { .. }) => {
                            assert!(
                                cache.same_contents(&before),
                                "a refused append changed the cache"
                            )
                        }
                        Err(e) => panic!("{:?} refused {value}: {e}", S::KIND),
                    }
                }
            }
            Op::Read { which } if !model.seqs.is_empty() => {
                let n = which % model.seqs.len();
                let (k, v) = cache.read(model.seqs[n].0).unwrap();
                assert_stored(S::KIND, &model.contents(n, false), &k);
                assert_stored(S::KIND, &model.contents(n, true), &v);
            }
            _ => {}
        }
        // Invariants after every step: lengths, contents, stale ids, free pages.
        assert_eq!(
            cache.sequences(),
            model.seqs.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        for n in 0..model.seqs.len() {
            assert_eq!(cache.len(model.seqs[n].0).unwrap(), model.len(n));
        }
        for &id in &dropped {
            assert!(matches!(cache.len(id), Err(Error::UnknownSequence { .. })));
        }
        let owned = match layout {
            Layout::Contiguous { .. } => model.seqs.len(),
            Layout::Paged { page_size, .. } => (0..model.seqs.len())
                .map(|n| model.len(n).div_ceil(page_size))
                .sum(),
        };
        let total = match layout {
            Layout::Contiguous { sequences, .. } => sequences,
            Layout::Paged { pages, .. } => pages,
        };
        assert_eq!(cache.free_pages(), total - owned);
    }
    // At the end every live sequence reads back whole, keys and values.
    for n in 0..model.seqs.len() {
        let (k, v) = cache.read(model.seqs[n].0).unwrap();
        assert_stored(S::KIND, &model.contents(n, false), &k);
        assert_stored(S::KIND, &model.contents(n, true), &v);
    }
}

properties! {
    cases = runner::env_count("PROPTEST_CASES", 64), persist;

    fn interleaved_operations_match_a_plain_model(
        layout in layout(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run_ops::<Float32>(layout, &ops);
        run_ops::<Int8>(layout, &ops);
    }

    fn every_storage_keeps_its_rounding_promise(
        layout in layout(),
        ops in proptest::collection::vec(op(), 1..25),
    ) {
        run_ops::<Float16>(layout, &ops);
        run_ops::<BFloat16>(layout, &ops);
        run_ops::<Int4>(layout, &ops);
    }

    fn paged_equals_contiguous(
        lens in proptest::collection::vec(0..20usize, 1..4),
        page_size in 1..7usize,
        seed in any::<u32>(),
    ) {
        fn check<S: KvStorage>(lens: &[usize], page_size: usize, seed: u32) {
            let pages = lens.iter().map(|l| l.div_ceil(page_size)).sum::<usize>().max(1);
            let mut paged = KvCache::<HKV, D, S>::new(Layout::Paged { page_size, pages });
            let mut contiguous = KvCache::<HKV, D, S>::new(Layout::Contiguous { sequences: lens.len(), capacity: 20 });
            let mut ids = Vec::new();
            for _ in lens {
                ids.push((paged.try_add_sequence().unwrap(), contiguous.try_add_sequence().unwrap()));
            }
            // Tokens arrive in interleaved chunks of 3, as a scheduler would feed them.
            for start in (0..20).step_by(3) {
                for (n, &len) in lens.iter().enumerate() {
                    let chunk = len.saturating_sub(start).min(3);
                    let x = rows(chunk, seed + (start * 7 + n) as u32);
                    paged.try_append(ids[n].0, x.view(), x.view()).unwrap();
                    contiguous.try_append(ids[n].1, x.view(), x.view()).unwrap();
                }
            }
            for &(p, c) in &ids {
                let (pk, pv) = paged.read(p).unwrap();
                let (ck, cv) = contiguous.read(c).unwrap();
                // Bit-identical: the same rows went through the same encoding.
                assert_eq!(pk.mapv(f32::to_bits), ck.mapv(f32::to_bits));
                assert_eq!(pv.mapv(f32::to_bits), cv.mapv(f32::to_bits));
            }
        }
        check::<Float32>(&lens, page_size, seed);
        check::<Float16>(&lens, page_size, seed);
        check::<Int8>(&lens, page_size, seed);
        check::<Int4>(&lens, page_size, seed);
    }
}

#[test]
fn a_refused_append_changes_nothing() {
    let mut cache = KvCache::<HKV, D, Int8>::new(Layout::Paged {
        page_size: 4,
        pages: 2,
    });
    let a = cache.try_add_sequence().unwrap();
    let b = cache.try_add_sequence().unwrap();
    cache
        .try_append(a, rows(5, 1).view(), rows(5, 2).view())
        .unwrap();
    let before = cache.read(a).unwrap();
    // `a` would need no page for 3 more tokens, `b` one page for 1: together 1 page, but b's 6 need 2.
    let (x, y) = (rows(3, 3), rows(6, 4));
    let err = cache.try_append_batch(&[(a, x.view(), x.view()), (b, y.view(), y.view())]);
    assert!(matches!(err, Err(Error::CacheFull { .. })), "{err:?}");
    assert_eq!(cache.read(a).unwrap(), before);
    assert_eq!(cache.len(b).unwrap(), 0);
    // Wrong shapes and non-finite values are typed errors too, and also append nothing.
    let wrong = Array3::<f32>::zeros((HKV, 1, D + 1));
    assert!(matches!(
        cache.try_append(a, wrong.view(), wrong.view()),
        Err(Error::Shape { .. })
    ));
    let mut nan = rows(1, 5);
    nan[[1, 0, 2]] = f32::NAN;
    assert!(matches!(
        cache.try_append(a, nan.view(), nan.view()),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(cache.len(a).unwrap(), 5);
}

/// f16 storage refuses a finite value above its range (it would be stored as ∞), with the
/// value and the storage in the message, and appends nothing — not even the valid rows of the
/// same batch; the same value in f32 storage is kept exactly.
/// The comparison that "a refused call changes nothing" rests on sees every kind of change:
/// a token, a sequence, a dropped sequence, a scale's bits.
#[test]
fn same_contents_sees_every_change() {
    let mut cache = KvCache::<HKV, D, Int8>::new(Layout::Paged {
        page_size: 4,
        pages: 4,
    });
    let a = cache.try_add_sequence().unwrap();
    let x = rows(3, 5);
    cache.try_append(a, x.view(), x.view()).unwrap();
    let before = cache.clone();
    assert!(cache.same_contents(&before), "a clone holds the same");
    let mut appended = cache.clone();
    appended.try_append(a, x.view(), x.view()).unwrap();
    assert!(!appended.same_contents(&before), "one more token");
    let mut added = cache.clone();
    let b = added.try_add_sequence().unwrap();
    assert!(!added.same_contents(&before), "one more sequence");
    added.try_drop_sequence(b).unwrap();
    assert!(!added.same_contents(&before), "a sequence id was used up");
    let mut dropped = cache.clone();
    dropped.try_drop_sequence(a).unwrap();
    assert!(!dropped.same_contents(&before), "a dropped sequence");
    // The same token written again with a value that changes only the scale of its row.
    let mut rescaled = KvCache::<HKV, D, Int8>::new(Layout::Paged {
        page_size: 4,
        pages: 4,
    });
    let c = rescaled.try_add_sequence().unwrap();
    rescaled
        .try_append(c, x.mapv(|v| v * 2.0).view(), x.view())
        .unwrap();
    let (k, _, ks, _) = rescaled.raw();
    let (k0, _, ks0, _) = cache.raw();
    assert_eq!(k, k0, "the words are the same: only the scales differ");
    assert_ne!(ks, ks0);
    assert!(!rescaled.same_contents(&cache), "a scale's bits");
}

#[test]
fn a_value_beyond_f16_is_refused_not_stored_as_infinity() {
    let mut cache = KvCache::<HKV, D, Float16>::new(Layout::Paged {
        page_size: 4,
        pages: 4,
    });
    let (a, b) = (
        cache.try_add_sequence().unwrap(),
        cache.try_add_sequence().unwrap(),
    );
    let fine = rows(2, 1);
    let mut big = rows(2, 2);
    big[[1, 1, 3]] = 70000.0;
    let before = cache.clone();
    let err = cache
        .try_append_batch(&[(a, fine.view(), fine.view()), (b, fine.view(), big.view())])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "KvCache::append: `v` holds 70000, which f16 storage cannot represent (it would be stored as infinity)"
    );
    assert!(cache.same_contents(&before));
    assert_eq!((cache.len(a).unwrap(), cache.len(b).unwrap()), (0, 0));
    // 65504 is f16's largest value: kept.
    big[[1, 1, 3]] = 65504.0;
    cache.try_append(b, big.view(), big.view()).unwrap();
    assert_eq!(cache.read(b).unwrap().1[[1, 1, 3]], 65504.0);
    let mut wide = KvCache::<HKV, D, Float32>::new(Layout::Paged {
        page_size: 4,
        pages: 4,
    });
    let seq = wide.try_add_sequence().unwrap();
    big[[1, 1, 3]] = 70000.0;
    wide.try_append(seq, big.view(), big.view()).unwrap();
    assert_eq!(wide.read(seq).unwrap().1[[1, 1, 3]], 70000.0);
}

/// A pool no allocator can provide (a pebibyte) is a typed error, not an abort.
#[test]
fn a_pool_too_large_to_allocate_is_a_typed_error() {
    let layout = Layout::Paged {
        page_size: 1 << 16,
        pages: (1 << 16) - 1,
    };
    let err = KvCache::<256, 256, Float32>::try_new(layout).unwrap_err();
    assert!(
        matches!(err, Error::CacheLayout { .. }) && err.to_string().contains("cannot allocate"),
        "{err}"
    );
}

#[test]
fn sizes_are_exact() {
    let layout = Layout::Paged {
        page_size: 16,
        pages: 10,
    };
    let gqa = KvCache::<8, 128, Float16>::new(layout);
    let mha = KvCache::<32, 128, Float16>::new(layout);
    assert_eq!(mha.bytes(), 4 * gqa.bytes());
    // 10 pages · 16 tokens · 8 heads · 128 channels · 2 bytes, for K and V.
    assert_eq!(gqa.bytes(), 2 * 10 * 16 * 8 * 128 * 2);
    let f32_cache = KvCache::<8, 128, Float32>::new(layout);
    let int8 = KvCache::<8, 128, Int8>::new(layout);
    let int4 = KvCache::<8, 128, Int4>::new(layout);
    let rows = 2 * 10 * 16 * 8; // K and V rows in the pool
    assert_eq!(int8.bytes(), f32_cache.bytes() / 4 + 4 * rows);
    assert_eq!(int4.bytes(), f32_cache.bytes() / 8 + 4 * rows);
    // The typed footprint agrees with the allocated pool for float storage.
    let per_token = Gqa::<32, 8, 128>::new()
        .kv_cache(gqa::DType::F16)
        .bytes_per_token_per_layer();
    assert_eq!(gqa.bytes() as u128, per_token * 160);
    let mha_per_token = Mha::<32, 128>::new()
        .kv_cache(gqa::DType::F16)
        .bytes_per_token_per_layer();
    assert_eq!(mha.bytes() as u128, mha_per_token * 160);
}

properties! {
    cases = runner::env_count("PROPTEST_CASES", 48), persist;

    /// Decode against a cache equals the last rows of a forward over the same tokens.
    fn decode_is_the_last_rows_of_a_forward(
        len in 1..12usize,
        seq_q in 1..4usize,
        group in 1..4usize,
        mask in mask(),
        mods in modifiers(HKV * 3),
        data in tensor([1, HKV * 3, 12, D]),
        seed in any::<u32>(),
    ) {
        let seq_q = seq_q.min(len);
        let hq = HKV * group;
        let mods = common::Modifiers {
            alibi: mods.alibi.map(|slopes| slopes.map(|s| s[..hq].to_vec())),
            ..mods
        };
        // Decode attends from the cache's end: the mask is read bottom-right.
        let mask = mask.aligned(gqa::Alignment::BottomRight);
        let spec = build_spec(hq, HKV, D, mask, &mods);
        let mut cache = KvCache::<HKV, D, Float32>::new(Layout::Paged { page_size: 3, pages: 4 });
        let seq = cache.try_add_sequence().unwrap();
        let (k, v) = (rows(len, seed), rows(len, seed ^ 1));
        cache.try_append(seq, k.view(), v.view()).unwrap();
        let q_full = data.slice(s![.., ..hq, ..len, ..]).to_owned();
        let q_new = q_full.slice(s![.., .., len - seq_q.., ..]);
        let decoded = oracle::try_decode(&spec, q_new, &cache, &[seq]).unwrap();
        let k4 = k.mapv(f64::from).insert_axis(Axis(0));
        let v4 = v.mapv(f64::from).insert_axis(Axis(0));
        let full = oracle::forward(&spec, q_full.view(), k4.view(), v4.view());
        prop_assert_eq!(&decoded.o, &full.o.slice(s![.., .., len - seq_q.., ..]).to_owned());
        prop_assert_eq!(&decoded.lse, &full.lse.slice(s![.., .., len - seq_q..]).to_owned());
    }

    /// Merging partials over a split of the keys gives the unsplit result, and merge is
    /// associative.
    fn merged_splits_equal_the_whole_and_merge_is_associative(
        problem in common::problem(),
        cuts in (0..10usize, 0..10usize),
    ) {
        let n = problem.seq_k();
        let (a, b) = (cuts.0.min(n), cuts.1.min(n));
        let (a, b) = (a.min(b), a.max(b));
        let part = |r: std::ops::Range<usize>| {
            oracle::try_forward_keys(&problem.spec, problem.q.view(), problem.k.view(), problem.v.view(), r).unwrap()
        };
        let (p1, p2, p3) = (part(0..a), part(a..b), part(b..n));
        let whole = oracle::forward(&problem.spec, problem.q.view(), problem.k.view(), problem.v.view());
        let merged = oracle::merge(&[p1.clone(), p2.clone(), p3.clone()]);
        let left = oracle::merge(&[oracle::merge(&[p1.clone(), p2.clone()]), p3.clone()]);
        let right = oracle::merge(&[p1, oracle::merge(&[p2, p3])]);
        for out in [&merged, &left, &right] {
            for (x, y) in out.lse.iter().zip(&whole.lse) {
                prop_assert!(x == y || (x - y).abs() <= 1e-12 * (1.0 + y.abs()), "lse {} vs {}", x, y);
            }
            for (x, y) in out.o.iter().zip(&whole.o) {
                prop_assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "o {} vs {}", x, y);
            }
        }
    }
}

properties! {
    cases = runner::env_count("PROPTEST_CASES", 32), persist;

    /// Typed partials (`gqa::partial`) of the oracle's decode over a 3-way cut of the keys
    /// merge, in either grouping, into the decode itself; only the full union is complete.
    fn typed_partials_merge_into_the_decode_in_any_grouping(
        lens in proptest::collection::vec(1..12usize, 1..3),
        cuts in (0..14usize, 0..14usize),
        mask in mask(),
        data in tensor([2, 6, 2, D]),
        seed in any::<u32>(),
    ) {
        use gqa::partial::Partial;
        let attention = Gqa::<6, HKV, D>::try_from(
            Gqa::<6, HKV, D>::new().spec().with_mask(mask.aligned(gqa::Alignment::BottomRight)),
        ).unwrap();
        let mut cache = attention.try_new_cache::<Float32>(Layout::Paged { page_size: 2, pages: 16 }).unwrap();
        let mut seqs = Vec::new();
        for (n, &len) in lens.iter().enumerate() {
            let seq = cache.try_add_sequence().unwrap();
            let (k, v) = (rows(len, seed ^ (n as u32 * 7)), rows(len, seed ^ (n as u32 * 7 + 1)));
            cache.try_append(seq, k.view(), v.view()).unwrap();
            seqs.push(seq);
        }
        let q = data.slice(s![..lens.len(), .., .., ..]).to_owned();
        let (a, b) = (cuts.0.min(cuts.1), cuts.0.max(cuts.1));
        let part = |r: std::ops::Range<usize>| {
            attention.try_decode_partial_oracle(q.view(), &cache, &seqs, r).unwrap()
        };
        let (p1, p2, p3) = (part(0..a), part(a..b), part(b..usize::MAX));
        prop_assert!(!Partial::try_merge(&[p1.clone(), p2.clone()]).unwrap().is_complete() || b >= *lens.iter().max().unwrap());
        let whole = attention.try_decode_oracle(q.view(), &cache, &seqs).unwrap();
        let left = Partial::try_merge(&[Partial::try_merge(&[p1.clone(), p2.clone()]).unwrap(), p3.clone()]).unwrap();
        let right = Partial::try_merge(&[p3.clone(), Partial::try_merge(&[p2.clone(), p1.clone()]).unwrap()]).unwrap();
        for out in [&left, &right] {
            prop_assert!(out.is_complete());
            prop_assert_eq!(out.keys().len(), 1);
            for (x, y) in out.lse().iter().zip(&whole.lse) {
                prop_assert!(x == y || (x - y).abs() <= 1e-12 * (1.0 + y.abs()), "lse {} vs {}", x, y);
            }
            for (x, y) in out.o().iter().zip(&whole.o) {
                prop_assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "o {} vs {}", x, y);
            }
        }
        // A key counted twice is refused.
        if !p2.keys().is_empty() {
            let err = Partial::try_merge(&[p1, p2.clone(), p2]).unwrap_err();
            prop_assert!(matches!(err, Error::Partial { .. }), "{}", err);
        }
    }
}

#[test]
fn decode_checks_the_cache_against_the_spec() {
    let cache = KvCache::<HKV, D, Float32>::new(Layout::Paged {
        page_size: 2,
        pages: 2,
    });
    let spec = *Gqa::<4, 4, D>::new().spec();
    let q = ndarray::Array4::<f32>::zeros((0, 4, 1, D));
    let err = oracle::try_decode(&spec, q.view(), &cache, &[]);
    assert!(
        matches!(
            err,
            Err(Error::ConfigMismatch {
                field: "kv_heads",
                ..
            })
        ),
        "{err:?}"
    );
}
