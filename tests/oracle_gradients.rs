//! Laws of the oracle's backward (`oracle::try_backward*`): its gradients are the derivatives of
//! the forward, checked against finite differences of the `f64` forward (directionally on drawn
//! problems of every mask, modifier and library mod; element by element on tiny ones), and the
//! GQA law — a group's K/V gradient is the sum of what MHA on repeated K/V gives its heads.
//!
//! Cases per law: `PROPTEST_CASES` (default 128); seeds per test (`tests/common/runner.rs`).

#[macro_use]
mod common;

use common::forward::Variant;
use common::mods::{Captures, checker, wobble};
use common::runner::{self, Persist, env_count};
use common::{Problem, problem, repeat_kv, tensor};
use gqa::dsl::{Aux, MaskMod, Mods, NoMask, NoScore, ScoreMod, library};
use gqa::oracle::{self, Gradients};
use ndarray::{Array3, Array4, Axis, Zip, s};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

fn cases() -> u32 {
    env_count("PROPTEST_CASES", 128)
}

/// What a law differentiates: the upstream gradients `G = ∂L/∂O` and, in half of the cases,
/// `g = ∂L/∂LSE`, so that `L = ⟨G, O⟩ + ⟨g, LSE⟩` (over rows whose LSE is finite).
#[derive(Debug, Clone)]
struct Upstream {
    d_o: Array4<f64>,
    d_lse: Option<Array3<f32>>,
}

/// The perturbation of a directional law: one direction per input.
#[derive(Debug, Clone)]
struct Direction {
    q: Array4<f64>,
    k: Array4<f64>,
    v: Array4<f64>,
}

fn shape4(x: &Array4<f64>) -> [usize; 4] {
    let s = x.shape();
    [s[0], s[1], s[2], s[3]]
}

fn upstream_and_direction(p: &Problem) -> impl Strategy<Value = (Upstream, Direction)> + use<> {
    let (q, kv) = (shape4(&p.q), shape4(&p.k));
    let rows = q[0] * q[1] * q[2];
    (
        tensor(q),
        proptest::option::of(proptest::collection::vec(-2.0f32..2.0, rows)),
        tensor(q),
        tensor(kv),
        tensor(kv),
    )
        .prop_map(move |(d_o, d_lse, dq, dk, dv)| {
            let d_lse = d_lse.map(|d| Array3::from_shape_vec((q[0], q[1], q[2]), d).unwrap());
            (
                Upstream { d_o, d_lse },
                Direction {
                    q: dq / 3.0,
                    k: dk / 3.0,
                    v: dv / 3.0,
                },
            )
        })
}

/// `L = ⟨G, O⟩ + ⟨g, LSE⟩` of the `f64` forward at `(q, k, v)` (rows of `LSE = −∞` are
/// constants and left out).
fn loss<M: MaskMod, S: ScoreMod>(
    p: &Problem,
    mods: &Mods<M, S>,
    [q, k, v]: [&Array4<f64>; 3],
    up: &Upstream,
) -> f64 {
    let out = oracle::try_forward_with(&p.spec, mods, q.view(), k.view(), v.view()).unwrap();
    let mut total: f64 = out.o.iter().zip(&up.d_o).map(|(o, g)| o * g).sum();
    if let Some(d_lse) = &up.d_lse {
        total += out
            .lse
            .iter()
            .zip(d_lse)
            .filter(|(lse, _)| lse.is_finite())
            .map(|(lse, &g)| lse * f64::from(g))
            .sum::<f64>();
    }
    total
}

fn backward<M: MaskMod, S: ScoreMod>(p: &Problem, mods: &Mods<M, S>, up: &Upstream) -> Gradients {
    oracle::try_backward_with(
        &p.spec,
        mods,
        [p.q.view(), p.k.view(), p.v.view(), up.d_o.view()],
        up.d_lse.as_ref().map(|d| d.view()),
    )
    .unwrap()
}

/// A step that moves every score by about 10⁻⁴ at most: `|Δs| ≲ h · |scale| · D · (max|q| +
/// max|k|)` for directions of entries within 1.
fn step(p: &Problem) -> f64 {
    let largest = |x: &Array4<f64>| x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let reach = p.spec.scale().abs() * p.spec.head_dim() as f64 * (largest(&p.q) + largest(&p.k));
    1e-4 / (1.0 + reach)
}

/// The central difference of `L` along `dir` with step `h`, extrapolated (Richardson: the
/// `h²` term cancels between steps `h` and `h/2`).
fn directional_difference<M: MaskMod, S: ScoreMod>(
    p: &Problem,
    mods: &Mods<M, S>,
    dir: &Direction,
    up: &Upstream,
    h: f64,
) -> f64 {
    let central = |h: f64| {
        let at = |t: f64| {
            let q = &p.q + &(&dir.q * t);
            let k = &p.k + &(&dir.k * t);
            let v = &p.v + &(&dir.v * t);
            loss(p, mods, [&q, &k, &v], up)
        };
        (at(h) - at(-h)) / (2.0 * h)
    };
    (4.0 * central(h / 2.0) - central(h)) / 3.0
}

/// `⟨dQ, R_Q⟩ + ⟨dK, R_K⟩ + ⟨dV, R_V⟩` and the sum of the magnitudes of its terms.
fn directional_derivative(grads: &Gradients, dir: &Direction) -> (f64, f64) {
    let pairs = [
        (&grads.dq, &dir.q),
        (&grads.dk, &dir.k),
        (&grads.dv, &dir.v),
    ];
    pairs.iter().fold((0.0, 0.0), |(sum, mag), (g, r)| {
        let terms = g.iter().zip(r.iter()).map(|(a, b)| a * b);
        terms.fold((sum, mag), |(s, m), t| (s + t, m + t.abs()))
    })
}

/// The directional law on one problem: the gradients' directional derivative equals the
/// finite difference within `1e-6` of the scale of its terms (and of the loss).
fn check_directional<M: MaskMod, S: ScoreMod>(
    p: &Problem,
    mods: &Mods<M, S>,
    up: &Upstream,
    dir: &Direction,
) -> Result<(), TestCaseError> {
    let grads = backward(p, mods, up);
    let (analytic, magnitude) = directional_derivative(&grads, dir);
    let h = step(p);
    let numeric = directional_difference(p, mods, dir, up, h);
    let scale = 1.0 + magnitude + loss(p, mods, [&p.q, &p.k, &p.v], up).abs();
    prop_assert!(
        (analytic - numeric).abs() <= 1e-6 * scale,
        "directional derivative {analytic} vs finite difference {numeric} (step {h:e}, scale {scale})"
    );
    Ok(())
}

#[test]
fn gradients_are_the_directional_derivative_of_the_loss() {
    let name = "gradients_are_the_directional_derivative_of_the_loss";
    let strategy = problem().prop_flat_map(|p| (Just(p.clone()), upstream_and_direction(&p)));
    runner::check(name, cases(), Persist::No, strategy, |(p, (up, dir))| {
        check_directional(&p, &Mods::none(), &up, &dir)
    });
}

/// The same law through every library mod family (masks, composed masks, score mods and their
/// chains, with the spec's variants), on problems of 1..=200 positions.
macro_rules! directional_with_mods {
    ($name:ident, $variant:expr, $make:expr) => {
        paste::paste! {
            #[test]
            fn [<gradients_with_ $name _are_the_directional_derivative>]() {
                let name = stringify!([<gradients_with_ $name _are_the_directional_derivative>]);
                let strategy = common::mods::cases($variant, (6, 2, 4))
                    .prop_flat_map(|(p, c)| (Just((p.clone(), c)), upstream_and_direction(&p)));
                let make = $make;
                runner::check(name, cases().div_ceil(4), Persist::No, strategy, |((p, c), (up, dir))| {
                    check_directional(&p, &make(&c), &up, &dir)
                });
            }
        }
    };
}

for_each_mod_family!(directional_with_mods);

/// Every element of `dQ`, `dK`, `dV` against the finite difference of `L` along that element
/// alone, on problems of at most 2 × 3 heads × 3 × 4 positions × head dim 3.
#[test]
fn each_gradient_element_is_the_partial_derivative() {
    let name = "each_gradient_element_is_the_partial_derivative";
    let tiny = problem().prop_filter("tiny", |p| {
        p.q.len() + p.k.len() <= 60 && p.spec.head_dim() <= 3
    });
    let strategy = tiny.prop_flat_map(|p| (Just(p.clone()), upstream_and_direction(&p)));
    runner::check(name, cases(), Persist::No, strategy, |(p, (up, _))| {
        let mods = Mods::none();
        let grads = backward(&p, &mods, &up);
        let zero = |x: &Array4<f64>| Array4::zeros(x.raw_dim());
        let h = step(&p);
        for (which, grad) in [("dq", &grads.dq), ("dk", &grads.dk), ("dv", &grads.dv)] {
            for (index, &g) in grad.indexed_iter() {
                let mut dir = Direction {
                    q: zero(&p.q),
                    k: zero(&p.k),
                    v: zero(&p.v),
                };
                let target = match which {
                    "dq" => &mut dir.q,
                    "dk" => &mut dir.k,
                    _ => &mut dir.v,
                };
                target[index] = 1.0;
                let numeric = directional_difference(&p, &mods, &dir, &up, h);
                prop_assert!(
                    (g - numeric).abs() <= 1e-6 * (1.0 + g.abs()),
                    "{which}{index:?} = {g} vs finite difference {numeric}"
                );
            }
        }
        Ok(())
    });
}

/// `x` summed over each group of `group` consecutive heads: `[B, H·group, L, D] → [B, H, L, D]`.
fn sum_groups(x: &Array4<f64>, group: usize) -> Array4<f64> {
    let s = x.shape();
    let mut out = Array4::zeros((s[0], s[1] / group, s[2], s[3]));
    for (h, head) in x.axis_iter(Axis(1)).enumerate() {
        let mut dst = out.slice_mut(s![.., h / group, .., ..]);
        dst += &head;
    }
    out
}

/// The GQA law: the backward with `kv_heads` heads is the MHA backward on K/V repeated over
/// each group, with each group's `dK`, `dV` summed over its query heads; `dQ` is the same.
#[test]
fn gqa_gradients_are_group_sums_of_mha_on_repeated_kv() {
    let name = "gqa_gradients_are_group_sums_of_mha_on_repeated_kv";
    let strategy = problem().prop_flat_map(|p| (Just(p.clone()), upstream_and_direction(&p)));
    runner::check(name, cases(), Persist::No, strategy, |(p, (up, _))| {
        let group = p.spec.group_size();
        let gqa = backward(&p, &Mods::none(), &up);
        let mha = Problem {
            spec: p.spec.try_with_kv_heads(p.spec.q_heads()).unwrap(),
            q: p.q.clone(),
            k: repeat_kv(&p.k, group),
            v: repeat_kv(&p.v, group),
        };
        let full = backward(&mha, &Mods::none(), &up);
        let pairs = [
            ("dq", &gqa.dq, full.dq.clone()),
            ("dk", &gqa.dk, sum_groups(&full.dk, group)),
            ("dv", &gqa.dv, sum_groups(&full.dv, group)),
        ];
        for (which, ours, theirs) in pairs {
            let scale = 1.0 + theirs.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let mut worst = 0.0f64;
            Zip::from(ours)
                .and(&theirs)
                .for_each(|a, b| worst = worst.max((a - b).abs()));
            prop_assert!(
                worst <= 1e-12 * scale * group as f64,
                "{which}: GQA and the group-summed MHA differ by {worst} (scale {scale})"
            );
        }
        Ok(())
    });
}

/// Keys no row sees contribute nothing and get zero `dK`, `dV` — NaN there changes no other
/// gradient, bit for bit — and rows that see no key get zero `dQ`.
#[test]
fn masked_keys_and_rows_get_no_gradient_and_leak_nothing() {
    let name = "masked_keys_and_rows_get_no_gradient_and_leak_nothing";
    let strategy = problem().prop_flat_map(|p| (Just(p.clone()), upstream_and_direction(&p)));
    runner::check(name, cases(), Persist::No, strategy, |(p, (up, _))| {
        let (seq_q, seq_k) = (p.seq_q(), p.seq_k());
        let mask = p.spec.mask();
        let seen = |j: usize| (0..seq_q).any(|i| mask.visible_keys(i, seq_q, seq_k).contains(&j));
        let clean = backward(&p, &Mods::none(), &up);
        let mut poisoned = p.clone();
        for j in (0..seq_k).filter(|&j| !seen(j)) {
            poisoned.k.slice_mut(s![.., .., j, ..]).fill(f64::NAN);
            poisoned.v.slice_mut(s![.., .., j, ..]).fill(f64::NAN);
        }
        let dirty = backward(&poisoned, &Mods::none(), &up);
        let bits = |x: &Array4<f64>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&clean.dq), bits(&dirty.dq));
        prop_assert_eq!(bits(&clean.dk), bits(&dirty.dk));
        prop_assert_eq!(bits(&clean.dv), bits(&dirty.dv));
        for j in (0..seq_k).filter(|&j| !seen(j)) {
            for grad in [&clean.dk, &clean.dv] {
                prop_assert!(grad.slice(s![.., .., j, ..]).iter().all(|&x| x == 0.0));
            }
        }
        for i in (0..seq_q).filter(|&i| mask.visible_keys(i, seq_q, seq_k).is_empty()) {
            prop_assert!(clean.dq.slice(s![.., .., i, ..]).iter().all(|&x| x == 0.0));
        }
        Ok(())
    });
}

/// The low-precision backward in `F64` is the oracle's, bit for bit, and in `F32` it stays
/// close to it (it is a yardstick, not a different definition).
#[test]
fn the_rounded_backward_is_the_oracle_computed_in_low_precision() {
    let name = "the_rounded_backward_is_the_oracle_computed_in_low_precision";
    let strategy = problem().prop_flat_map(|p| (Just(p.clone()), upstream_and_direction(&p)));
    runner::check(name, cases(), Persist::No, strategy, |(p, (up, _))| {
        let mods = Mods::none();
        let exact = backward(&p, &mods, &up);
        let inputs = [p.q.view(), p.k.view(), p.v.view(), up.d_o.view()];
        let d_lse = up.d_lse.as_ref().map(|d| d.view());
        let rounded = |dtype| {
            oracle::try_backward_rounded_with(&p.spec, &mods, inputs, d_lse, dtype).unwrap()
        };
        prop_assert_eq!(&rounded(gqa::DType::F64), &exact);
        let low = rounded(gqa::DType::F32);
        // The f32 computation rounds, but it is the same definition: within a relative 1e-2
        // of each tensor's scale, and finite.
        for (ours, theirs) in [
            (&low.dq, &exact.dq),
            (&low.dk, &exact.dk),
            (&low.dv, &exact.dv),
        ] {
            prop_assert!(
                ours.iter().all(|x| x.is_finite()),
                "the f32 yardstick is not finite"
            );
            let scale = 1.0 + theirs.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let worst = ours
                .iter()
                .zip(theirs)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            prop_assert!(
                worst <= 1e-2 * scale,
                "f32 yardstick off by {worst} (scale {scale})"
            );
        }
        Ok(())
    });
}

#[test]
fn bad_backward_shapes_are_typed_errors_naming_the_tensor() {
    let spec = gqa::Gqa::<4, 2, 8>::new().causal();
    let q = Array4::<f32>::zeros((1, 4, 3, 8));
    let kv = Array4::<f32>::zeros((1, 2, 5, 8));
    let bad_d_o = Array4::<f32>::zeros((1, 4, 2, 8));
    let error = oracle::try_backward(spec.spec(), q.view(), kv.view(), kv.view(), bad_d_o.view())
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "oracle::backward: `d_o` has shape [1, 4, 2, 8], expected [1, 4, 3, 8] ([batch, q_heads, seq_q, head_dim])"
    );
    let d_o = Array4::<f32>::zeros((1, 4, 3, 8));
    let d_lse = Array3::<f32>::zeros((1, 2, 3));
    let error = oracle::try_backward_with(
        spec.spec(),
        &Mods::none(),
        [q.view(), kv.view(), kv.view(), d_o.view()],
        Some(d_lse.view()),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "oracle::backward: `d_lse` has shape [1, 2, 3], expected [1, 4, 3] ([batch, q_heads, seq_q])"
    );
}
