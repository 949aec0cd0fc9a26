//! Laws of the oracle, as proptest properties. Each test's name states its law; together they pin
//! down what "attention" means in this crate independently of how the oracle computes it.
//!
//! 256 cases per law (`PROPTEST_CASES` changes it); each law draws its own cases from a seed
//! derived from its name (`GQA_SEED`, `GQA_RANDOM=1`: see `tests/common/runner.rs`).

#[macro_use]
mod common;

use common::*;
use gqa::oracle::{self, Output};
use gqa::spec::Mask;
use half::{bf16, f16};
use ndarray::{Array4, Axis, s};
use proptest::prelude::*;

fn run(p: &Problem) -> Output {
    oracle::forward(&p.spec, p.q.view(), p.k.view(), p.v.view())
}

fn cases() -> u32 {
    runner::env_count("PROPTEST_CASES", 256)
}

/// An f16 value from its bits by the IEEE 754 binary16 definition, in f64: sign, 5 exponent
/// bits (bias 15; 0 is subnormal, 31 is ∞/NaN), 10 fraction bits. Independent of `half`.
fn f16_by_definition(bits: u16) -> f64 {
    let sign = if bits >> 15 == 1 { -1.0 } else { 1.0 };
    let (exponent, fraction) = (i32::from((bits >> 10) & 0x1f), f64::from(bits & 0x3ff));
    sign * match exponent {
        0 => fraction * 2f64.powi(-24),
        31 if fraction == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + fraction / 1024.0) * 2f64.powi(e - 15),
    }
}

/// A bf16 value from its bits by definition: the top half of an f32's bits.
fn bf16_by_definition(bits: u16) -> f64 {
    f64::from(f32::from_bits(u32::from(bits) << 16))
}

properties! {
    cases = cases(), persist;

    /// GQA is MHA whose KV heads happen to be equal within each group: repeating every KV head
    /// `group` times and running MHA gives the same result, bit for bit.
    fn gqa_equals_mha_on_repeated_kv(p in problem()) {
        let group = p.spec.group_size();
        let mha = p.spec.try_with_kv_heads(p.spec.q_heads()).unwrap();
        let (k, v) = (repeat_kv(&p.k, group), repeat_kv(&p.v, group));
        let expected = oracle::forward(&mha, p.q.view(), k.view(), v.view());
        prop_assert_eq!(run(&p), expected);
    }

    /// MQA is MHA with one KV head broadcast to every query head.
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
    fn a_window_wider_than_the_sequence_equals_no_window(p in problem(), extra in 0..4usize, causal in any::<bool>()) {
        let base_mask = if causal { Mask::NONE.causal() } else { Mask::NONE }.aligned(p.spec.mask().alignment());
        let base = p.spec.with_mask(base_mask);
        let wide = (p.seq_q() + p.seq_k() + extra) as i64;
        let windowed = base.try_with_window(wide, wide).unwrap();
        let a = oracle::forward(&base, p.q.view(), p.k.view(), p.v.view());
        let b = oracle::forward(&windowed, p.q.view(), p.k.view(), p.v.view());
        prop_assert_eq!(a, b);
    }

    /// `cap·tanh(t/cap) → t` as the cap grows: each score moves by at most
    /// `δ = max |t − cap·tanh(t/cap)|` over the visible scaled scores `t` (computed exactly here;
    /// ALiBi is added after the cap and cancels), so each output channel moves by at most
    /// `tanh(δ/2) · range(v)` (the total variation of softmax weights under a perturbation of
    /// width `2δ`). The cap is drawn so that the Taylor remainder `t³/(3cap²)` of the largest
    /// score is a target `τ` between 1e-1 and 1e-6: the bound stays far below the trivial
    /// `range(v)` whatever the scores' size (hundreds included).
    fn softcap_tends_to_identity_as_the_cap_grows(p in problem(), tau in prop::sample::select(vec![1e-1f64, 1e-3, 1e-6])) {
        let uncapped_spec = p.spec.without_softcap();
        let scaled = oracle::try_scores(&uncapped_spec.without_alibi(), p.q.view(), p.k.view()).unwrap();
        let max_score = scaled.iter().filter(|s| s.is_finite()).fold(0.0f64, |m, s| m.max(s.abs()));
        let cap = (max_score.powi(3) / (3.0 * tau)).sqrt().max(max_score).max(1.0) as f32;
        let capped_spec = uncapped_spec.try_with_softcap(cap).unwrap();
        let cap = f64::from(cap);
        let delta = scaled.iter().filter(|s| s.is_finite()).fold(0.0f64, |m, &t| m.max((t - cap * (t / cap).tanh()).abs()));
        let weight = (delta / 2.0).tanh();
        prop_assert!(weight <= 0.1, "the law would say little: δ {delta}, cap {cap}, max score {max_score}");
        let a = oracle::forward(&uncapped_spec, p.q.view(), p.k.view(), p.v.view());
        let b = oracle::forward(&capped_spec, p.q.view(), p.k.view(), p.v.view());
        for ((idx, &x), &y) in a.o.indexed_iter().zip(&b.o) {
            let (bb, h, i, c) = idx;
            let g = h / p.spec.group_size();
            let column = (0..p.seq_k())
                .filter(|&j| visible_by_definition(p.spec.mask(), i, j, p.seq_q(), p.seq_k()))
                .map(|j| p.v[[bb, g, j, c]]);
            let (lo, hi) = column.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, u), v| (l.min(v), u.max(v)));
            let range = if hi >= lo { hi - lo } else { 0.0 };
            let bound = weight * range + 1e-12 * (1.0 + x.abs());
            prop_assert!((x - y).abs() <= bound, "at {:?}: {} vs {} (δ {:.3e}, bound {:.3e})", idx, x, y, delta, bound);
        }
    }

    /// `exp(s − lse)` is a probability distribution over the visible keys of every row, with
    /// the scores `s` and the visible set taken from their definitions, independently of the
    /// oracle, and `lse` from the oracle.
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
    fn visible_keys_equal_the_masks_definition(mask in mask(), seq_q in 0..12usize, seq_k in 0..12usize) {
        for i in 0..seq_q {
            let expected: Vec<usize> = (0..seq_k).filter(|&j| visible_by_definition(mask, i, j, seq_q, seq_k)).collect();
            let got: Vec<usize> = mask.visible_keys(i, seq_q, seq_k).collect();
            prop_assert_eq!(got, expected, "row {} of {:?}", i, mask);
        }
    }

    /// With `seq_q == seq_k` and a causal mask, the first query sees only the first key, so its
    /// output is exactly that key's value, whatever the modifiers.
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

    /// The oracle reads low-precision inputs exactly: f16 and bf16 tensors give bit for bit what
    /// f64 tensors of their values give, with the values decoded from the bits by the formats'
    /// definitions (not by the conversion the oracle uses).
    fn low_precision_inputs_are_read_as_their_exact_values(p in problem(), as_bf16 in any::<bool>()) {
        let by_definition = |x: &Array4<f64>| -> (Array4<f64>, Array4<f64>) {
            if as_bf16 {
                let bits = x.mapv(|v| bf16::from_f64(v).to_bits());
                (bits.mapv(bf16_by_definition), bits.mapv(|b| bf16::from_bits(b).to_f64()))
            } else {
                let bits = x.mapv(|v| f16::from_f64(v).to_bits());
                (bits.mapv(f16_by_definition), bits.mapv(|b| f16::from_bits(b).to_f64()))
            }
        };
        let ((q, _), (k, _), (v, _)) = (by_definition(&p.q), by_definition(&p.k), by_definition(&p.v));
        let expected = oracle::forward(&p.spec, q.view(), k.view(), v.view());
        let got = if as_bf16 {
            let n = |x: &Array4<f64>| x.mapv(bf16::from_f64);
            oracle::forward(&p.spec, n(&p.q).view(), n(&p.k).view(), n(&p.v).view())
        } else {
            let n = |x: &Array4<f64>| x.mapv(f16::from_f64);
            oracle::forward(&p.spec, n(&p.q).view(), n(&p.k).view(), n(&p.v).view())
        };
        prop_assert_eq!(got.o.mapv(f64::to_bits), expected.o.mapv(f64::to_bits));
        prop_assert_eq!(got.lse.mapv(f64::to_bits), expected.lse.mapv(f64::to_bits));
    }

    /// The oracle computes the definition: `o = Σ softmax(s)_j · v_j` and `lse = log Σ e^{s_j}`
    /// over the visible keys, with scores and visibility restated in the test
    /// (`attention_by_definition`), to f64 rounding.
    fn output_is_the_softmax_weighted_sum_of_visible_values(p in problem()) {
        let out = run(&p);
        let (o, lse) = attention_by_definition(&p);
        for ((idx, &x), &y) in out.lse.indexed_iter().zip(&lse) {
            prop_assert!(x == y || (x - y).abs() <= 1e-12 * (1.0 + y.abs()), "lse at {:?}: {} vs {}", idx, x, y);
        }
        let scale = p.v.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        assert_close(&out.o, &o, 1e-12 * scale)?;
    }

    /// The oracle's scale is the spec's `f64` scale, not its `f32` rounding: with head dims whose
    /// `1/√D` is not an `f32` number, a one-key row's LSE is `scale · q·k` in f64 exactly.
    fn the_default_scale_is_used_in_f64(d in prop::sample::select(vec![3usize, 5, 17, 72, 200]), x in -3.0f64..3.0) {
        let spec = gqa::AttentionSpec::try_new(1, 1, d).unwrap();
        let q = Array4::from_elem((1, 1, 1, d), x);
        let k = Array4::from_elem((1, 1, 1, d), 1.0);
        let out = oracle::forward(&spec, q.view(), k.view(), k.view());
        let dot: f64 = (0..d).map(|_| x).sum();
        // `scale · q·k` with `scale = 1/√D` in f64: bit for bit (an f32 scale is off by ~1e-8).
        prop_assert_eq!(out.lse[[0, 0, 0]], (1.0 / (d as f64).sqrt()) * dot);
    }

    /// Batch entries do not interact: each one alone gives its slice of the batched result.
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
