//! The varlen suites' shared half (`gqa::spec::Varlen`): packed problems and the check of one
//! backend's varlen forward against the oracle, sequence by sequence. Used by `cpu.rs` and
//! `cube_forward.rs`.
//!
//! A packed problem's sequences draw their lengths from 0 (an empty sequence, a sequence
//! without keys) to past the kernels' tiles (64, 65, 129); half of them are self-attention
//! packings (the same offsets for queries and keys), the others pair any query length with
//! any key length. In a third of the cases one sequence is poisoned: its queries, keys and
//! values are all NaN. Every other sequence must still match the oracle — a tile that strays
//! past its sequence's rows or keys reads NaN and fails the rule.

use gqa::backend::Backend;
use gqa::spec::Varlen;
use gqa::{Element, oracle};
use ndarray::{Array4, s};
use proptest::prelude::*;

use super::forward::{Variant, check_output, query_gain, run_worst, spec_for};
use super::{Problem, runner, tensor};

/// A packed problem: `problem` is the batch of one holding every sequence end to end.
#[derive(Debug, Clone)]
pub struct Packed {
    pub problem: Problem,
    pub packing: Varlen,
    /// The sequence whose inputs are all NaN, if any (its rows are not checked).
    pub poisoned: Option<usize>,
}

/// One sequence's length: 0, 1, tile edges, or up to 150.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        1 => Just(1usize),
        3 => 2..=70usize,
        1 => prop::sample::select(vec![63, 64, 65, 128, 129]),
        1 => 71..=150usize,
    ]
}

/// 0 to 4 sequences; self-attention (equal lengths) in half the cases.
pub fn packings() -> impl Strategy<Value = Varlen> {
    (
        any::<bool>(),
        proptest::collection::vec((length(), length()), 0..=4),
    )
        .prop_map(|(same, lengths)| {
            let cu = |pick: &dyn Fn(&(usize, usize)) -> usize| {
                let mut cu = vec![0];
                for pair in &lengths {
                    cu.push(cu.last().unwrap() + pick(pair));
                }
                cu
            };
            let q = cu(&|&(q, _)| q);
            let k = if same { q.clone() } else { cu(&|&(_, k)| k) };
            Varlen::try_new(&q, &k).expect("offsets from lengths")
        })
}

/// Packed problems of `variant` (specs as the forward suites draw them).
pub fn problems(
    variant: Variant,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> impl Strategy<Value = Packed> {
    (
        packings(),
        spec_for(variant, q_heads, kv_heads, head_dim),
        query_gain(),
        prop::bool::weighted(1.0 / 3.0),
        any::<prop::sample::Index>(),
    )
        .prop_flat_map(move |(packing, spec, gain, poison, which)| {
            let poisoned =
                (poison && packing.sequences() > 0).then(|| which.index(packing.sequences()));
            let (total_q, total_k) = (packing.total_q(), packing.total_k());
            (
                tensor([1, q_heads, total_q, head_dim]).prop_map(move |q| q * gain),
                tensor([1, kv_heads, total_k, head_dim]),
                tensor([1, kv_heads, total_k, head_dim]),
            )
                .prop_map(move |(mut q, mut k, mut v)| {
                    if let Some(seq) = poisoned {
                        q.slice_mut(s![.., .., packing.queries(seq), ..])
                            .fill(f64::NAN);
                        for x in [&mut k, &mut v] {
                            x.slice_mut(s![.., .., packing.keys(seq), ..])
                                .fill(f64::NAN);
                        }
                    }
                    Packed {
                        problem: Problem { spec, q, k, v },
                        packing: packing.clone(),
                        poisoned,
                    }
                })
        })
}

/// The case's distinct shape, for `GQA_CASE_LOG`.
pub fn case_key(p: &Packed) -> String {
    format!(
        "varlen q{:?} k{:?} {:?}",
        p.packing.cu_seqlens_q(),
        p.packing.cu_seqlens_k(),
        p.problem.spec.mask()
    )
}

/// Runs `backend`'s varlen forward on `p` (inputs narrowed to `T`) and checks every sequence
/// but the poisoned one against the oracle of that sequence alone, a batch of one (the rule of
/// `forward::check_output`). Returns the worst errors (o, lse).
pub fn check<T: Element, B: Backend<T>>(
    backend: &B,
    p: &Packed,
) -> Result<(f64, f64), TestCaseError> {
    runner::log_case(case_key(p));
    let narrow = |x: &Array4<f64>| x.mapv(T::narrow);
    let Problem { spec, q, k, v } = &p.problem;
    let (q, k, v) = (narrow(q), narrow(k), narrow(v));
    let out = backend
        .try_forward_varlen(spec, &p.packing, q.view(), k.view(), v.view())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let rows = [1, spec.q_heads(), p.packing.total_q()];
    prop_assert_eq!(out.lse.shape(), &rows[..]);
    prop_assert_eq!(
        out.o.shape(),
        &[rows[0], rows[1], rows[2], spec.head_dim()][..]
    );
    // The varlen oracle packs what the oracle makes of each sequence alone, bit for bit.
    let packed =
        oracle::try_forward_varlen(spec, &p.packing, q.view(), k.view(), v.view()).unwrap();
    let mut worst = (0.0f64, 0.0f64);
    for seq in (0..p.packing.sequences()).filter(|&seq| Some(seq) != p.poisoned) {
        let (rows, keys) = (p.packing.queries(seq), p.packing.keys(seq));
        let one = |x: &Array4<T>, range: std::ops::Range<usize>| {
            x.slice(s![.., .., range, ..]).to_owned()
        };
        let (q_s, k_s, v_s) = (one(&q, rows.clone()), one(&k, keys.clone()), one(&v, keys));
        let wide = |x: &Array4<T>| x.mapv(|x| x.widen());
        let alone = Problem {
            spec: *spec,
            q: wide(&q_s),
            k: wide(&k_s),
            v: wide(&v_s),
        };
        let exact = oracle::try_forward(spec, q_s.view(), k_s.view(), v_s.view()).unwrap();
        prop_assert_eq!(
            &exact.o,
            &packed.o.slice(s![.., .., rows.clone(), ..]),
            "oracle::try_forward_varlen, sequence {}",
            seq
        );
        prop_assert_eq!(&exact.lse, &packed.lse.slice(s![.., .., rows.clone()]));
        let o = one(&out.o, rows.clone());
        let lse = out.lse.slice(s![.., .., rows]).to_owned();
        let (o_err, lse_err) = check_output(&alone, (&q_s, &k_s, &v_s), &o, &lse)
            .map_err(|e| TestCaseError::fail(format!("sequence {seq} of {:?}: {e}", p.packing)))?;
        worst = (worst.0.max(o_err), worst.1.max(lse_err));
    }
    Ok(worst)
}

/// Runs `cases` packed problems of `variant` through `backend` (the seed of test `test`) and
/// prints the worst errors.
pub fn run_variant<T: Element, B: Backend<T>>(
    backend: &B,
    (test, cases): (&str, u32),
    label: &str,
    variant: Variant,
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
) {
    let worst = run_worst(
        (test, cases),
        problems(variant, q_heads, kv_heads, head_dim),
        |p| check::<T, B>(backend, &p),
    );
    eprintln!(
        "{label} varlen {variant:?} {q_heads}/{kv_heads} d{head_dim} {}: max |o error| {:.2e}, max |lse error| {:.2e}",
        T::DTYPE,
        worst.0,
        worst.1
    );
}

/// Tensors that are not a packing's are typed errors on `backend` and the oracle: a query or
/// key axis of another length than the offsets', a batch of two, a spec's wrong head count.
pub fn check_refusals<B: Backend<f32>>(backend: &B) {
    use gqa::{AttentionSpec, Error};
    let spec = AttentionSpec::try_new(4, 2, 8).unwrap();
    let packing = Varlen::try_new(&[0, 3, 5], &[0, 4, 9]).unwrap();
    let zeros = |b, h, l| Array4::<f32>::zeros((b, h, l, 8));
    let cases = [
        ("queries", zeros(1, 4, 6), zeros(1, 2, 9), "q, k"),
        ("keys", zeros(1, 4, 5), zeros(1, 2, 8), "q, k"),
        ("batch", zeros(2, 4, 5), zeros(2, 2, 9), "q, k"),
        ("heads", zeros(1, 2, 5), zeros(1, 2, 9), "q"),
    ];
    for (what, q, k, tensor) in cases {
        let got = backend.try_forward_varlen(&spec, &packing, q.view(), k.view(), k.view());
        assert!(
            matches!(&got, Err(Error::Shape { tensor: t, .. }) if *t == tensor),
            "{what}: {got:?}"
        );
        let got = oracle::try_forward_varlen(&spec, &packing, q.view(), k.view(), k.view());
        assert!(
            matches!(&got, Err(Error::Shape { tensor: t, .. }) if *t == tensor),
            "oracle, {what}: {got:?}"
        );
    }
    let right = backend.try_forward_varlen(
        &spec,
        &packing,
        zeros(1, 4, 5).view(),
        zeros(1, 2, 9).view(),
        zeros(1, 2, 9).view(),
    );
    assert!(right.is_ok(), "the packing's own shapes: {right:?}");
}
