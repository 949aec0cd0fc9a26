//! Laws of the oracle, as proptest properties. Each test's name states its law; together they pin
//! down what "attention" means in this crate independently of how the oracle computes it.
//!
//! Case counts follow proptest's defaults (raise them with `PROPTEST_CASES=...`).

mod common;

use common::*;
use gqa::oracle::{self, Output};
use gqa::spec::Mask;
use ndarray::{Array4, Axis, s};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn run(p: &Problem) -> Output {
    oracle::forward(&p.spec, p.q.view(), p.k.view(), p.v.view())
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    /// GQA is MHA whose KV heads happen to be equal within each group: repeating every KV head
    /// `group` times and running MHA gives the same result, bit for bit.
    #[test]
    fn gqa_equals_mha_on_repeated_kv(p in problem()) {
        let group = p.spec.group_size();
        let mha = p.spec.try_with_kv_heads(p.spec.q_heads()).unwrap();
        let (k, v) = (repeat_kv(&p.k, group), repeat_kv(&p.v, group));
        let expected = oracle::forward(&mha, p.q.view(), k.view(), v.view());
        prop_assert_eq!(run(&p), expected);
    }

    /// MQA is MHA with one KV head broadcast to every query head.
    #[test]
    fn mqa_equals_broadcasting_one_kv_head(p in problem()) {
        let mqa = p.spec.try_with_kv_heads(1).unwrap();
        let (k1, v1) = (p.k.slice(s![.., 0..1, .., ..]).to_owned(), p.v.slice(s![.., 0..1, .., ..]).to_owned());
        let out = oracle::forward(&mqa, p.q.view(), k1.view(), v1.view());
        let mha = p.spec.try_with_kv_heads(p.spec.q_heads()).unwrap();
        let (k, v) = (repeat_kv(&k1, p.spec.q_heads()), repeat_kv(&v1, p.spec.q_heads()));
        prop_assert_eq!(out, oracle::forward(&mha, p.q.view(), k.view(), v.view()));
    }

    /// The output is a convex combination of the visible values: each coordinate lies within
    /// their [min, max]. A row with nothing visible is exactly 0 with LSE −∞. (Visibility comes
    /// from the mask's definition, not from the code under test.)
    #[test]
    fn output_lies_within_the_visible_values(p in problem()) {
        let out = run(&p);
        let (seq_q, seq_k) = (p.seq_q(), p.seq_k());
        let group = p.spec.q_heads() / p.spec.kv_heads();
        for ((b, h, i), &lse) in out.lse.indexed_iter() {
            let row = out.o.slice(s![b, h, i, ..]);
            let visible: Vec<usize> = (0..seq_k).filter(|&j| visible_by_definition(p.spec.mask(), i, j, seq_q, seq_k)).collect();
            if visible.is_empty() {
                prop_assert!(row.iter().all(|&x| x == 0.0) && lse == f64::NEG_INFINITY);
                continue;
            }
            prop_assert!(lse.is_finite());
            for (c, &o) in row.iter().enumerate() {
                let col = visible.iter().map(|&j| p.v[[b, h / group, j, c]]);
                let (lo, hi) = col.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, u), x| (l.min(x), u.max(x)));
                let slack = 1e-12 * (1.0 + lo.abs().max(hi.abs()));
                prop_assert!(lo - slack <= o && o <= hi + slack, "o[{b},{h},{i},{c}] = {o} outside [{lo}, {hi}]");
            }
        }
    }

    /// Without a mask or ALiBi, attention is a function of the *set* of (key, value) pairs:
    /// permuting them together changes nothing but rounding.
    #[test]
    fn permuting_keys_and_values_leaves_a_maskless_result_unchanged(
        (p, perm) in problem().prop_flat_map(|p| {
            let n = p.seq_k();
            (Just(p), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        })
    ) {
        let plain = p.spec.with_mask(Mask::NONE).without_alibi();
        let k = p.k.select(Axis(2), &perm);
        let v = p.v.select(Axis(2), &perm);
        let a = oracle::forward(&plain, p.q.view(), p.k.view(), p.v.view());
        let b = oracle::forward(&plain, p.q.view(), k.view(), v.view());
        assert_close(&a.o, &b.o, 1e-12)?;
        prop_assert!(a.lse.iter().zip(&b.lse).all(|(x, y)| x == y || (x - y).abs() <= 1e-12 * (1.0 + x.abs())));
    }

    /// A window wider than both sequences hides nothing: it equals the same spec without it.
    #[test]
    fn a_window_wider_than_the_sequence_equals_no_window(p in problem(), extra in 0..4usize, causal in any::<bool>()) {
        let base_mask = if causal { Mask::NONE.causal() } else { Mask::NONE }.aligned(p.spec.mask().alignment());
        let base = p.spec.with_mask(base_mask);
        let wide = (p.seq_q() + p.seq_k() + extra) as i64;
        let windowed = base.try_with_window(wide, wide).unwrap();
        let a = oracle::forward(&base, p.q.view(), p.k.view(), p.v.view());
        let b = oracle::forward(&windowed, p.q.view(), p.k.view(), p.v.view());
        prop_assert_eq!(a, b);
    }

    /// `cap·tanh(s/cap) → s` as the cap grows, with the error bounded by the tanh remainder
    /// `|s|³ / (3 cap²)` pushed through the softmax: `|Δo| <= (e^{2δ} − 1) · max|v|`.
    #[test]
    fn softcap_tends_to_identity_as_the_cap_grows(p in problem(), cap_exp in 2..6i32) {
        let uncapped_spec = p.spec.without_softcap();
        let cap = 10f32.powi(cap_exp);
        let capped_spec = uncapped_spec.try_with_softcap(cap).unwrap();
        let scores = oracle::try_scores(&uncapped_spec, p.q.view(), p.k.view()).unwrap();
        let max_score = scores.iter().filter(|s| s.is_finite()).fold(0.0f64, |m, s| m.max(s.abs()));
        let delta = max_score.powi(3) / (3.0 * f64::from(cap).powi(2));
        let max_v = p.v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let bound = ((2.0 * delta).exp() - 1.0) * max_v + 1e-12;
        let a = oracle::forward(&uncapped_spec, p.q.view(), p.k.view(), p.v.view());
        let b = oracle::forward(&capped_spec, p.q.view(), p.k.view(), p.v.view());
        assert_close(&a.o, &b.o, bound)?;
    }

    /// `exp(s − lse)` is a probability distribution over the visible keys of every row, with
    /// the scores `s` and the visible set taken from their definitions, independently of the
    /// oracle, and `lse` from the oracle.
    #[test]
    fn softmax_of_scores_sums_to_one_over_visible_keys(p in problem()) {
        let out = run(&p);
        for ((b, h, i), &lse) in out.lse.indexed_iter() {
            let visible = (0..p.seq_k()).filter(|&j| visible_by_definition(p.spec.mask(), i, j, p.seq_q(), p.seq_k()));
            let total: f64 = visible.map(|j| (score_by_definition(&p, (b, h, i, j)) - lse).exp()).sum();
            if lse == f64::NEG_INFINITY {
                prop_assert_eq!(total, 0.0, "row ({}, {}, {}) has LSE −∞ but visible keys", b, h, i);
            } else {
                prop_assert!((total - 1.0).abs() <= 1e-12, "row ({b},{h},{i}) sums to {total}");
            }
        }
    }

    /// The oracle's exposed scores are the definition's on visible keys and −∞ elsewhere.
    #[test]
    fn scores_follow_the_definition(p in problem()) {
        let scores = oracle::try_scores(&p.spec, p.q.view(), p.k.view()).unwrap();
        for ((b, h, i, j), &s) in scores.indexed_iter() {
            if visible_by_definition(p.spec.mask(), i, j, p.seq_q(), p.seq_k()) {
                let expected = score_by_definition(&p, (b, h, i, j));
                prop_assert!((s - expected).abs() <= 1e-12 * (1.0 + expected.abs()), "({b},{h},{i},{j}): {s} vs {expected}");
            } else {
                prop_assert_eq!(s, f64::NEG_INFINITY);
            }
        }
    }

    /// `Mask::visible_keys` is the definition's set, as a range, even for huge sides.
    #[test]
    fn visible_keys_equal_the_masks_definition(mask in mask(), seq_q in 0..12usize, seq_k in 0..12usize) {
        for i in 0..seq_q {
            let expected: Vec<usize> = (0..seq_k).filter(|&j| visible_by_definition(mask, i, j, seq_q, seq_k)).collect();
            let got: Vec<usize> = mask.visible_keys(i, seq_q, seq_k).collect();
            prop_assert_eq!(got, expected, "row {} of {:?}", i, mask);
        }
    }

    /// With `seq_q == seq_k` and a causal mask, the first query sees only the first key, so its
    /// output is exactly that key's value, whatever the modifiers.
    #[test]
    fn causal_row_zero_with_equal_lengths_equals_v0(p in problem().prop_filter("seq_q, seq_k >= 1", |p| p.seq_q() >= 1 && p.seq_k() >= 1)) {
        let n = p.seq_k();
        let q = p.q.slice(s![.., .., 0..1, ..]).to_owned();
        let q = ndarray::concatenate(Axis(2), &vec![q.view(); n]).unwrap();
        let spec = p.spec.with_mask(p.spec.mask().causal());
        let out = oracle::forward(&spec, q.view(), p.k.view(), p.v.view());
        for b in 0..q.shape()[0] {
            for h in 0..spec.q_heads() {
                prop_assert_eq!(out.o.slice(s![b, h, 0, ..]), p.v.slice(s![b, spec.kv_head_of(h), 0, ..]));
            }
        }
    }

    /// The oracle reads through strides and never outside its views: inputs interleaved with NaNs
    /// give exactly the contiguous result.
    #[test]
    fn nan_padded_strided_inputs_give_the_contiguous_result(p in problem()) {
        let (qp, kp, vp) = (nan_padded(&p.q), nan_padded(&p.k), nan_padded(&p.v));
        let out = oracle::forward(
            &p.spec,
            nan_padded_view(&qp, p.q.shape()),
            nan_padded_view(&kp, p.k.shape()),
            nan_padded_view(&vp, p.v.shape()),
        );
        prop_assert_eq!(out, run(&p));
    }

    /// Storage type only changes the inputs' values: f16 inputs give exactly what their widened
    /// f64 values give.
    #[test]
    fn f16_inputs_equal_their_widened_f64_values(p in problem()) {
        let narrow = |x: &Array4<f64>| x.mapv(half::f16::from_f64);
        let (q, k, v) = (narrow(&p.q), narrow(&p.k), narrow(&p.v));
        let widen = |x: &Array4<half::f16>| x.mapv(half::f16::to_f64);
        let a = oracle::forward(&p.spec, q.view(), k.view(), v.view());
        let b = oracle::forward(&p.spec, widen(&q).view(), widen(&k).view(), widen(&v).view());
        prop_assert_eq!(a, b);
    }

    /// Batch entries do not interact: each one alone gives its slice of the batched result.
    #[test]
    fn batch_entries_are_independent(p in problem()) {
        let out = run(&p);
        for b in 0..p.q.shape()[0] {
            let one = |x: &Array4<f64>| x.slice(s![b..b + 1, .., .., ..]).to_owned();
            let alone = oracle::forward(&p.spec, one(&p.q).view(), one(&p.k).view(), one(&p.v).view());
            prop_assert_eq!(alone.o.index_axis(Axis(0), 0), out.o.index_axis(Axis(0), b));
        }
    }
}

fn assert_close(a: &Array4<f64>, b: &Array4<f64>, tol: f64) -> Result<(), TestCaseError> {
    for (idx, (x, y)) in a
        .indexed_iter()
        .zip(b.iter())
        .map(|((i, x), y)| (i, (x, y)))
    {
        prop_assert!(
            (x - y).abs() <= tol,
            "at {idx:?}: {x} vs {y} (tolerance {tol})"
        );
    }
    Ok(())
}
