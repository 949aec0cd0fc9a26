//! The decode suites' shared half: decode problems (sequences of different lengths in a
//! fragmented paged cache), and the check of a decode's result against the oracle on the
//! cache's stored rows. Used by `cube_decode.rs` (the GPU kernel) and `cpu.rs`.

use gqa::cache::{KvCache, KvStorage, Layout};
use gqa::oracle::{self, compare};
use gqa::{AttentionSpec, DType, Element, Mask};
use ndarray::{Array3, Array4, Axis, s};
use proptest::prelude::*;

use super::tensor;

/// The spec a storage's test uses: each storage exercises a different specialisation.
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    Causal,
    CausalSoftcap,
    WindowAlibi,
    Everything,
}

pub fn spec_for(
    variant: Variant,
    hq: usize,
    hkv: usize,
    d: usize,
) -> impl Strategy<Value = AttentionSpec> {
    (
        0..120usize,
        1.0f32..30.0,
        proptest::collection::vec(0.0f32..0.5, hq),
        -1.0f32..1.0,
    )
        .prop_map(move |(left, cap, slopes, scale)| {
            let spec = AttentionSpec::try_new(hq, hkv, d).unwrap();
            match variant {
                Variant::Causal => spec.with_mask(Mask::NONE.causal()),
                Variant::CausalSoftcap => spec
                    .with_mask(Mask::NONE.causal())
                    .try_with_softcap(cap)
                    .unwrap(),
                Variant::WindowAlibi => spec
                    .with_mask(Mask::NONE.causal().window(left, 0))
                    .try_with_alibi_slopes(&slopes)
                    .unwrap(),
                Variant::Everything => spec
                    .with_mask(Mask::NONE.causal().window(left, 0))
                    .try_with_scale(scale)
                    .unwrap()
                    .try_with_softcap(cap)
                    .unwrap()
                    .with_alibi(),
            }
        })
}

/// One decode problem: per sequence its keys/values `[HKV, len, D]` and new queries.
#[derive(Debug, Clone)]
pub struct Case {
    pub spec: AttentionSpec,
    pub page_size: usize,
    pub seq_q: usize,
    pub kv: Vec<(Array3<f32>, Array3<f32>)>,
    pub q: Array4<f64>,
}

pub fn length() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(1usize), 2 => 2..=70usize, 1 => prop::sample::select(vec![63, 64, 65, 153, 154]), 2 => 71..=300usize]
}

pub fn case(variant: Variant, hq: usize, hkv: usize, d: usize) -> impl Strategy<Value = Case> {
    (
        spec_for(variant, hq, hkv, d),
        proptest::collection::vec(length(), 1..=3),
        prop_oneof![3 => 1..=4usize, 1 => Just(16usize)],
        prop_oneof![1 => Just(1usize), 2 => 2..=32usize, 1 => Just(16usize)],
    )
        .prop_flat_map(move |(spec, lens, seq_q, page_size)| {
            let kv = lens
                .iter()
                .map(|&len| {
                    let rows = move || {
                        tensor([1, hkv, len, d])
                            .prop_map(|x| x.index_axis_move(Axis(0), 0).mapv(|v| v as f32))
                    };
                    (rows(), rows())
                })
                .collect::<Vec<_>>();
            (
                Just(spec),
                kv,
                tensor([lens.len(), hq, seq_q, d]),
                Just(page_size),
            )
                .prop_map(move |(spec, kv, q, page_size)| Case {
                    spec,
                    page_size,
                    seq_q,
                    kv,
                    q,
                })
        })
}

/// Fills a paged cache with the case's sequences in interleaved chunks, with a filler
/// sequence dropped halfway so that pages are reused out of order.
pub fn fill<const HKV: usize, const D: usize, S: KvStorage>(
    case: &Case,
) -> (KvCache<HKV, D, S>, Vec<gqa::cache::SeqId>)
where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    let total: usize = case.kv.iter().map(|(k, _)| k.shape()[1]).sum();
    let pages = total.div_ceil(case.page_size) + case.kv.len() + 4;
    let mut cache = KvCache::<HKV, D, S>::new(Layout::Paged {
        page_size: case.page_size,
        pages,
    });
    let filler = cache.try_add_sequence().unwrap();
    let noise = Array3::<f32>::from_elem((HKV, 3 * case.page_size, D), 9.0);
    cache
        .try_append(filler, noise.view(), noise.view())
        .unwrap();
    let seqs: Vec<_> = case
        .kv
        .iter()
        .map(|_| cache.try_add_sequence().unwrap())
        .collect();
    let longest = case.kv.iter().map(|(k, _)| k.shape()[1]).max().unwrap();
    let chunk = 37;
    for start in (0..longest).step_by(chunk) {
        for ((k, v), &seq) in case.kv.iter().zip(&seqs) {
            let end = (start + chunk).min(k.shape()[1]);
            if start < end {
                cache
                    .try_append(
                        seq,
                        k.slice(s![.., start..end, ..]),
                        v.slice(s![.., start..end, ..]),
                    )
                    .unwrap();
            }
        }
        if start == 0 {
            cache.try_drop_sequence(filler).unwrap();
        }
    }
    (cache, seqs)
}

/// The tolerance rule for one decoded sequence: `o_b` (in `dtype`) and `lse_b` (f32) against
/// the oracle run on the cache's stored rows, exactly (a quantized lane times its scale, in
/// f64), with the same oracle computed in `dtype` as the yardstick.
pub fn compare_sequence<const HKV: usize, const D: usize, S: KvStorage>(
    spec: &AttentionSpec,
    q_b: &Array4<f64>,
    cache: &KvCache<HKV, D, S>,
    seq: gqa::cache::SeqId,
    (o_b, lse_b): (&[f64], &[f64]),
    dtype: DType,
) -> (oracle::Comparison, oracle::Comparison)
where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    let (k, v) = cache.read_exact(seq).unwrap();
    let (k, v) = (k.insert_axis(Axis(0)), v.insert_axis(Axis(0)));
    let exact = oracle::forward(spec, q_b.view(), k.view(), v.view());
    let rounded = oracle::try_forward_rounded(spec, q_b.view(), k.view(), v.view(), dtype).unwrap();
    (
        compare(&exact.o, &rounded.o, o_b, dtype),
        compare(&exact.lse, &rounded.lse, lse_b, DType::F32),
    )
}

/// Max errors seen: o vs the oracle on stored rows, lse, o vs the oracle on the input.
pub type Worst = (f64, f64, f64);

/// Runs `runner` over the decode cases of `variant` for `(hq, hkv, d)`, checking each with
/// `check` (a case's worst errors, or its failure), and prints the worst over all cases.
pub fn run_cases<T: Element, S: KvStorage>(
    mut runner: proptest::test_runner::TestRunner,
    label: &str,
    variant: Variant,
    (hq, hkv, d): (usize, usize, usize),
    check: impl Fn(Case) -> Result<Worst, TestCaseError>,
) {
    let worst = std::cell::Cell::new((0.0f64, 0.0f64, 0.0f64));
    runner
        .run(&case(variant, hq, hkv, d), |case| {
            let w = check(case)?;
            let old = worst.get();
            worst.set((old.0.max(w.0), old.1.max(w.1), old.2.max(w.2)));
            Ok(())
        })
        .unwrap();
    let w = worst.get();
    eprintln!(
        "{label} {hq}/{hkv} d{d} {:?} cache, {} queries, {variant:?}: max |o error| {:.2e}, max |lse error| {:.2e}, vs input {:.2e}",
        S::KIND,
        T::DTYPE,
        w.0,
        w.1,
        w.2
    );
}

/// Checks a decode's results (`o: [B, HQ, Lq, D]` in `T`, `lse` in f32) for every sequence of
/// the case under the tolerance rule; returns the worst errors, including the error against
/// the unquantized input (reported, not bounded).
pub fn check_decoded<T: Element, const HKV: usize, const D: usize, S: KvStorage>(
    case: &Case,
    (cache, seqs): (&KvCache<HKV, D, S>, &[gqa::cache::SeqId]),
    q: &Array4<T>,
    (o, lse): (&Array4<T>, &Array3<f32>),
) -> Result<Worst, TestCaseError>
where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    let mut worst: Worst = (0.0, 0.0, 0.0);
    for (b, &seq) in seqs.iter().enumerate() {
        let q_b = q.slice(s![b..b + 1, .., .., ..]).mapv(|x| x.widen());
        let o_b: Vec<f64> = o
            .slice(s![b, .., .., ..])
            .iter()
            .map(|x| x.widen())
            .collect();
        let lse_b: Vec<f64> = lse
            .slice(s![b, .., ..])
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let (o_check, lse_check) =
            compare_sequence(&case.spec, &q_b, cache, seq, (&o_b, &lse_b), T::DTYPE);
        prop_assert!(
            o_check.passed(),
            "o of sequence {b}: {o_check}\nspec {:?}, lens {:?}, seq_q {}, page size {}",
            case.spec,
            case.kv
                .iter()
                .map(|(k, _)| k.shape()[1])
                .collect::<Vec<_>>(),
            case.seq_q,
            case.page_size
        );
        prop_assert!(
            lse_check.passed(),
            "lse of sequence {b}: {lse_check}\nspec {:?}",
            case.spec
        );
        // Against the unquantized input: reported only.
        let widen4 = |x: &Array3<f32>| x.mapv(f64::from).insert_axis(Axis(0));
        let (k_in, v_in) = (widen4(&case.kv[b].0), widen4(&case.kv[b].1));
        let input = oracle::forward(&case.spec, q_b.view(), k_in.view(), v_in.view());
        let vs_input = input
            .o
            .iter()
            .zip(&o_b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        worst = (
            worst.0.max(o_check.max_error),
            worst.1.max(lse_check.max_error),
            worst.2.max(vs_input),
        );
    }
    Ok(worst)
}

/// Checks every sequence of an f32 partial (`o: [B, HQ, Lq, D]`, `lse` in f64) over `keys`
/// against the oracle's partial over the same keys, under the tolerance rule for f32.
pub fn check_partial<const HKV: usize, const D: usize, S: KvStorage>(
    spec: &AttentionSpec,
    q: &Array4<f32>,
    (cache, seqs): (&KvCache<HKV, D, S>, &[gqa::cache::SeqId]),
    keys: std::ops::Range<usize>,
    (o, lse): (&Array4<f32>, &Array3<f64>),
) -> Result<(), TestCaseError>
where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    for (b, &seq) in seqs.iter().enumerate() {
        let (k, v) = cache.read_exact(seq).unwrap();
        let (k, v) = (k.insert_axis(Axis(0)), v.insert_axis(Axis(0)));
        let q_b = q.slice(s![b..b + 1, .., .., ..]).mapv(f64::from);
        let (qv, kv, vv) = (q_b.view(), k.view(), v.view());
        let exact = oracle::try_forward_keys(spec, qv, kv, vv, keys.clone()).unwrap();
        let rounded =
            oracle::try_forward_rounded_keys(spec, qv, kv, vv, DType::F32, keys.clone()).unwrap();
        let o_b = o.slice(s![b, .., .., ..]).mapv(f64::from);
        let lse_b = lse.slice(s![b, .., ..]).to_owned();
        let o_check = compare(&exact.o, &rounded.o, &o_b, DType::F32);
        let lse_check = compare(&exact.lse, &rounded.lse, &lse_b, DType::F32);
        prop_assert!(o_check.passed(), "keys {keys:?}, sequence {b}: o {o_check}");
        prop_assert!(
            lse_check.passed(),
            "keys {keys:?}, sequence {b}: lse {lse_check}"
        );
    }
    Ok(())
}
