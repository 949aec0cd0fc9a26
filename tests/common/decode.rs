//! The decode suites' shared half: decode problems (sequences of different lengths in a
//! fragmented paged cache), and the check of a decode's result against the oracle on the
//! cache's stored rows. Used by `cube_decode.rs` (the GPU kernel) and `cpu.rs`.
//!
//! What the cases reach, each with real probability: no sequence at all, empty sequences, one
//! to sixteen queries (and none), rows that see no key (forced in a quarter of the cases), no
//! mask, one-sided bands and windows in both alignments with sides up to `i64::MAX`, scores in
//! the hundreds; and pages around every sequence's rows that hold NaN (float storage) or huge
//! values (quantized storage) left by a dropped sequence, so that a read outside a sequence's
//! rows shows.

use gqa::cache::{KvCache, KvStorage, Layout, StorageKind};
use gqa::oracle::{self, compare_lse, compare_rows};
use gqa::{Alignment, AttentionSpec, DType, Element, Mask};
use ndarray::{Array3, Array4, Axis, s};
use proptest::prelude::*;

use super::forward::{query_gain, side};
use super::{row_is_fully_masked, runner, tensor};

/// The spec a storage's test uses: each storage exercises a different specialisation of the
/// decode kernel; the alignment and the sides are drawn (they are runtime values).
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    /// No mask; a drawn scale.
    NoMask,
    /// A right-bounded band (causal is side 0) and a softcap.
    RightSoftcap,
    /// A left-bounded band and ALiBi (user slopes).
    LeftAlibi,
    /// A two-sided window.
    Window,
    /// Causal ∧ window, scale, softcap and ALiBi at once.
    Everything,
}

pub fn spec_for(
    variant: Variant,
    hq: usize,
    hkv: usize,
    d: usize,
) -> impl Strategy<Value = AttentionSpec> {
    (
        (side(), side(), prop_oneof![1 => Just(0usize), 1 => side()]),
        prop::bool::weighted(0.3),
        1.0f32..30.0,
        proptest::collection::vec(0.0f32..0.5, hq),
        -1.5f64..1.5,
    )
        .prop_map(
            move |((left, right, right_or_causal), top_left, cap, slopes, scale)| {
                let spec = AttentionSpec::try_new(hq, hkv, d).unwrap();
                let align = if top_left {
                    Alignment::TopLeft
                } else {
                    Alignment::BottomRight
                };
                let band = |l: Option<usize>, r: Option<usize>| Mask::band(l, r, align);
                match variant {
                    Variant::NoMask => spec.try_with_scale(scale).unwrap(),
                    Variant::RightSoftcap => spec
                        .with_mask(band(None, Some(right_or_causal)))
                        .try_with_softcap(cap)
                        .unwrap(),
                    Variant::LeftAlibi => spec
                        .with_mask(band(Some(left), None))
                        .try_with_alibi_slopes(&slopes)
                        .unwrap(),
                    Variant::Window => spec.with_mask(band(Some(left), Some(right))),
                    Variant::Everything => spec
                        .with_mask(band(Some(left), Some(right)).causal())
                        .try_with_scale(scale)
                        .unwrap()
                        .try_with_softcap(cap)
                        .unwrap()
                        .with_alibi(),
                }
            },
        )
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

impl Case {
    pub fn lens(&self) -> Vec<usize> {
        self.kv.iter().map(|(k, _)| k.shape()[1]).collect()
    }
}

/// A cached length: 0 to 300, with the edges of the kernels' chunks and splits.
pub fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        1 => Just(1usize),
        2 => 2..=70usize,
        1 => prop::sample::select(vec![63, 64, 65, 153, 154]),
        2 => 71..=300usize,
    ]
}

/// Queries per sequence: 1–4 or 16 (each count is its own kernel tile on the GPU), rarely 0.
pub fn queries() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 12 => 1..=4usize, 4 => Just(16usize)]
}

/// The first sequence shortened (down to 0 keys) until some row of `spec`'s mask sees nothing.
fn with_a_fully_masked_row(mask: Mask, seq_q: usize, mut lens: Vec<usize>) -> Vec<usize> {
    if let Some(first) = lens.first_mut() {
        while *first > 0 && !(0..seq_q).any(|i| row_is_fully_masked(mask, i, seq_q, *first)) {
            *first = if *first > 40 { *first / 2 } else { *first - 1 };
        }
    }
    lens
}

pub fn case(variant: Variant, hq: usize, hkv: usize, d: usize) -> impl Strategy<Value = Case> {
    (
        spec_for(variant, hq, hkv, d),
        prop_oneof![1 => Just(0usize), 12 => 1..=3usize]
            .prop_flat_map(|n| proptest::collection::vec(length(), n)),
        queries(),
        prop_oneof![1 => Just(1usize), 2 => 2..=32usize, 1 => Just(16usize)],
        prop::bool::weighted(0.25),
        query_gain(),
    )
        .prop_flat_map(move |(spec, lens, seq_q, page_size, mask_a_row, gain)| {
            let lens = if mask_a_row {
                with_a_fully_masked_row(spec.mask(), seq_q.max(1), lens)
            } else {
                lens
            };
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
                tensor([lens.len(), hq, seq_q, d]).prop_map(move |q| q * gain),
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

/// The case's distinct shape, for `GQA_CASE_LOG`: sequences, queries, lengths, mask.
pub fn case_key(case: &Case) -> String {
    format!(
        "B{} Lq{} lens{:?} page{} {:?}",
        case.kv.len(),
        case.seq_q,
        case.lens(),
        case.page_size,
        case.spec.mask()
    )
}

/// What a dropped sequence leaves in the pages it gave back: NaN for float storage (which keeps
/// it), values of 1e30 for quantized storage (which cannot hold NaN) — either shows in a result
/// that reads a row outside its sequence.
pub fn poison(kind: StorageKind) -> f32 {
    if kind.is_quantized() { 1e30 } else { f32::NAN }
}

/// Fills a paged cache with the case's sequences in interleaved chunks, with a poisoned filler
/// sequence ([`poison`]) dropped after the first chunks so that pages are reused out of order
/// and the slots around the sequences' rows hold its poison.
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
    let noise = Array3::<f32>::from_elem((HKV, 3 * case.page_size, D), poison(S::KIND));
    cache
        .try_append(filler, noise.view(), noise.view())
        .unwrap();
    let seqs: Vec<_> = case
        .kv
        .iter()
        .map(|_| cache.try_add_sequence().unwrap())
        .collect();
    let longest = case.kv.iter().map(|(k, _)| k.shape()[1]).max().unwrap_or(0);
    let chunk = 37;
    for start in (0..longest.max(1)).step_by(chunk) {
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

/// The tolerance rule for one decoded sequence, per row: `o_b` (in `dtype`) against the oracle
/// run on the cache's stored rows, exactly (a quantized lane times its scale, in f64), with the
/// oracle computed in `dtype` as the yardstick; `lse_b` (f32) with the oracle computed in f32.
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
    let (qv, kv, vv) = (q_b.view(), k.view(), v.view());
    let exact = oracle::forward(spec, qv, kv, vv);
    let in_dtype = oracle::try_forward_rounded(spec, qv, kv, vv, dtype).unwrap();
    let in_f32 = oracle::try_forward_rounded(spec, qv, kv, vv, DType::F32).unwrap();
    let terms = oracle::try_row_terms(spec, qv, kv, vv).unwrap();
    (
        compare_rows(&exact.o, &in_dtype.o, o_b, dtype, D, &terms.outputs()),
        compare_lse(&exact.lse, &in_f32.lse, lse_b, &terms.scores),
    )
}

/// The largest error storing one input row can make, per channel, by the storage's definition
/// (not by the code under test): 0 for f32; half an ulp of each value for f16 and bf16 (with
/// f16's subnormal spacing as a floor); half a quantization step `max|x| / 127` (or `/ 7`) for
/// int8 and int4, with room for the `f32` rounding of the scale and the quotient.
pub fn storage_error(kind: StorageKind, row: &[f32]) -> f64 {
    let amax = row.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
    match kind {
        StorageKind::Float32 => 0.0,
        StorageKind::Float16 => amax * 2f64.powi(-11) + 2f64.powi(-25),
        StorageKind::BFloat16 => amax * 2f64.powi(-8) + 2f64.powi(-134),
        StorageKind::Int8 | StorageKind::Int4 => {
            0.5 * amax / f64::from(kind.quant_max()) * (1.0 + 1e-5)
        }
    }
}

/// The derived bound on how far attention over the *stored* rows may be from attention over
/// the *input* rows, for one query row (`o`'s channels and the LSE).
///
/// With `ε_k(j)`, `ε_v(j)` the storage error of key and value row `j` ([`storage_error`]): the
/// score of key `j` moves by at most `δ_j = |scale| · Σ_c |q_c| · ε_k(j)` (softcap is
/// 1-Lipschitz, ALiBi does not see the data), so with `δ = max δ_j` over the visible keys:
/// - `|Δlse| ≤ δ` (log-sum-exp is 1-Lipschitz in the max norm);
/// - `o(k̂, v̂) − o(k, v) = Σ p̂_j (v̂_j − v_j) + Σ (p̂_j − p_j) v_j`. The first term is at most
///   `max ε_v(j)`. For the second, the weights' ratios `p̂_j / p_j` lie within a factor `e^{2δ}`
///   of each other, so their total variation is at most `tanh(δ / 2)`, and with `v` centred on
///   its mid-range the term is at most `tanh(δ / 2) · range_c(v)`.
pub fn storage_bound(
    kind: StorageKind,
    scale: f64,
    q_row: &[f64],
    visible: &[(&[f32], &[f32])],
) -> (Vec<f64>, f64) {
    let d = q_row.len();
    let q_l1: f64 = q_row.iter().map(|x| x.abs()).sum();
    let delta = visible
        .iter()
        .map(|(k, _)| scale.abs() * q_l1 * storage_error(kind, k))
        .fold(0.0f64, f64::max);
    let eps_v = visible
        .iter()
        .map(|(_, v)| storage_error(kind, v))
        .fold(0.0f64, f64::max);
    let bound = (0..d)
        .map(|c| {
            let (lo, hi) = visible
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), (_, v)| {
                    (l.min(f64::from(v[c])), h.max(f64::from(v[c])))
                });
            let range = if visible.is_empty() { 0.0 } else { hi - lo };
            eps_v + (delta / 2.0).tanh() * range
        })
        .collect();
    (bound, delta)
}

/// Max errors seen: o vs the oracle on stored rows, lse, o vs the oracle on the input.
pub type Worst = (f64, f64, f64);

/// Runs `cases` decode cases of `variant` for `(hq, hkv, d)` with the seed of test `test`,
/// checking each with `check` (a case's worst errors, or its failure), and prints the worst.
pub fn run_cases<T: Element, S: KvStorage>(
    (test, cases): (&str, u32),
    label: &str,
    variant: Variant,
    (hq, hkv, d): (usize, usize, usize),
    check: impl Fn(Case) -> Result<Worst, TestCaseError>,
) {
    let worst = std::cell::Cell::new((0.0f64, 0.0f64, 0.0f64));
    runner::check(
        test,
        cases,
        runner::Persist::No,
        case(variant, hq, hkv, d),
        |case| {
            runner::log_case(case_key(&case));
            let w = check(case)?;
            let old = worst.get();
            worst.set((old.0.max(w.0), old.1.max(w.1), old.2.max(w.2)));
            Ok(())
        },
    );
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
/// the case: under the tolerance rule per row against the oracle on the stored rows; rows that
/// see nothing exactly 0 with LSE −∞; and against the oracle on the *unquantized input* within
/// [`storage_bound`] plus the rule's bound. Returns the worst errors.
pub fn check_decoded<T: Element, const HKV: usize, const D: usize, S: KvStorage>(
    case: &Case,
    (cache, seqs): (&KvCache<HKV, D, S>, &[gqa::cache::SeqId]),
    q: &Array4<T>,
    (o, lse): (&Array4<T>, &ndarray::Array3<f32>),
) -> Result<Worst, TestCaseError>
where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    let spec = &case.spec;
    let (hq, seq_q) = (spec.q_heads(), q.shape()[2]);
    let group = spec.group_size();
    prop_assert_eq!(o.shape(), &[seqs.len(), hq, seq_q, D][..]);
    prop_assert_eq!(lse.shape(), &[seqs.len(), hq, seq_q][..]);
    let context = || {
        format!(
            "spec {:?}, lens {:?}, seq_q {}, page size {}",
            case.spec,
            case.lens(),
            case.seq_q,
            case.page_size
        )
    };
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
            compare_sequence(spec, &q_b, cache, seq, (&o_b, &lse_b), T::DTYPE);
        prop_assert!(
            o_check.passed(),
            "o of sequence {b}: {o_check}\n{}",
            context()
        );
        prop_assert!(
            lse_check.passed(),
            "lse of sequence {b}: {lse_check}\n{}",
            context()
        );
        // Against the unquantized input: `|o − o(input)| ≤ |o − o(stored)| + |o(stored) −
        // o(input)|`, the first bounded by the rule above, the second by the storage's derived
        // bound; a failure here means the stored rows are further from the input than the
        // storage's definition allows.
        let (k_in, v_in) = (&case.kv[b].0, &case.kv[b].1);
        let len = k_in.shape()[1];
        let widen4 = |x: &Array3<f32>| x.mapv(f64::from).insert_axis(Axis(0));
        let input = oracle::forward(spec, q_b.view(), widen4(k_in).view(), widen4(v_in).view());
        let (k_st, v_st) = cache.read_exact(seq).unwrap();
        let stored = oracle::forward(
            spec,
            q_b.view(),
            k_st.insert_axis(Axis(0)).view(),
            v_st.insert_axis(Axis(0)).view(),
        );
        for h in 0..hq {
            let g = h / group;
            for i in 0..seq_q {
                let row = (h * seq_q + i) * D;
                let visible: Vec<usize> = spec.mask().visible_keys(i, seq_q, len).collect();
                let rows: Vec<(&[f32], &[f32])> = visible
                    .iter()
                    .map(|&j| {
                        (
                            k_in.slice(s![g, j, ..]).to_slice().unwrap(),
                            v_in.slice(s![g, j, ..]).to_slice().unwrap(),
                        )
                    })
                    .collect();
                let q_row: Vec<f64> = q_b.slice(s![0, h, i, ..]).to_vec();
                let (bound, delta) = storage_bound(S::KIND, spec.scale(), &q_row, &rows);
                if visible.is_empty() {
                    prop_assert!(
                        lse_b[h * seq_q + i] == f64::NEG_INFINITY
                            && o_b[row..row + D].iter().all(|&x| x == 0.0),
                        "sequence {b}, row ({h}, {i}) sees no key: o must be 0 and lse −∞\n{}",
                        context()
                    );
                    continue;
                }
                // The two f64 oracles' own rounding: far below every bound that matters.
                let slack = |x: f64| 1e-12 * (1.0 + x.abs());
                for c in 0..D {
                    let (got, want) = (o_b[row + c], input.o[[0, h, i, c]]);
                    let err = (got - want).abs();
                    let allowed = (got - stored.o[[0, h, i, c]]).abs() + bound[c] + slack(want);
                    prop_assert!(
                        err <= allowed,
                        "sequence {b}, row ({h}, {i}), channel {c}: {err:.3e} from the unquantized input's \
                         attention, over its error against the stored rows plus the derived storage bound \
                         {:.3e} (δ {delta:.3e})\n{}",
                        bound[c],
                        context()
                    );
                    worst.2 = worst.2.max(err);
                }
                let (got, want) = (lse_b[h * seq_q + i], input.lse[[0, h, i]]);
                let allowed = (got - stored.lse[[0, h, i]]).abs() + delta + slack(want);
                prop_assert!(
                    (got - want).abs() <= allowed,
                    "sequence {b}, row ({h}, {i}): lse {:.3e} from the unquantized input's, over δ {delta:.3e}\n{}",
                    (got - want).abs(),
                    context()
                );
            }
        }
        worst = (
            worst.0.max(o_check.max_error),
            worst.1.max(lse_check.max_error),
            worst.2,
        );
    }
    Ok(worst)
}

/// Checks every sequence of an f32 partial (`o: [B, HQ, Lq, D]`, `lse` in f64) over `keys`
/// against the oracle's partial over the same keys, under the tolerance rule for f32, per row.
pub fn check_partial<const HKV: usize, const D: usize, S: KvStorage>(
    spec: &AttentionSpec,
    q: &Array4<f32>,
    (cache, seqs): (&KvCache<HKV, D, S>, &[gqa::cache::SeqId]),
    keys: std::ops::Range<usize>,
    (o, lse): (&Array4<f32>, &ndarray::Array3<f64>),
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
        let terms = oracle::try_row_terms_keys(spec, qv, kv, vv, keys.clone()).unwrap();
        let o_check = compare_rows(&exact.o, &rounded.o, &o_b, DType::F32, D, &terms.outputs());
        let lse_check = compare_lse(&exact.lse, &rounded.lse, &lse_b, &terms.scores);
        prop_assert!(o_check.passed(), "keys {keys:?}, sequence {b}: o {o_check}");
        prop_assert!(
            lse_check.passed(),
            "keys {keys:?}, sequence {b}: lse {lse_check}"
        );
    }
    Ok(())
}

/// The NaN contract's decode case: `case` with non-finite values (NaN, +∞, −∞ in turn; in K, V
/// or both) at every `stride`-th key, from `offset`, among the keys of each sequence that some
/// row with visible keys cannot see. Returns it and, per `(b, h, i)`, whether row `i` of
/// sequence `b` sees a poisoned key.
pub fn poison_hidden_keys(
    case: &Case,
    offset: usize,
    stride: usize,
) -> (Case, ndarray::Array3<bool>) {
    let mask = case.spec.mask();
    let seq_q = case.seq_q;
    let mut out = case.clone();
    let mut sees = ndarray::Array3::from_elem((case.kv.len(), case.spec.q_heads(), seq_q), false);
    for (b, (k, v)) in out.kv.iter_mut().enumerate() {
        let len = k.shape()[1];
        let live: Vec<usize> = (0..seq_q)
            .filter(|&i| !row_is_fully_masked(mask, i, seq_q, len))
            .collect();
        let hidden = (0..len).filter(|&j| {
            live.iter()
                .any(|&i| !super::visible_by_definition(mask, i, j, seq_q, len))
        });
        let poisoned: Vec<usize> = hidden
            .skip(offset % stride.max(1))
            .step_by(stride.max(1))
            .collect();
        for (n, &j) in poisoned.iter().enumerate() {
            let value = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][n % 3];
            let (in_k, in_v) = [(true, true), (true, false), (false, true)][(n / 3) % 3];
            if in_k {
                k.slice_mut(s![.., j, ..]).fill(value);
            }
            if in_v {
                v.slice_mut(s![.., j, ..]).fill(value);
            }
        }
        for i in 0..seq_q {
            let seen = poisoned
                .iter()
                .any(|&j| super::visible_by_definition(mask, i, j, seq_q, len));
            sees.slice_mut(s![b, .., i]).fill(seen);
        }
    }
    (out, sees)
}
