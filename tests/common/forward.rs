//! The forward suites' shared half: which specialisations run, the random problems, and the
//! check of one backend's result against the oracle under the tolerance rule. Used by
//! `cube_forward.rs` (the GPU kernels) and `cpu.rs` (the CPU backend), so that both backends
//! face the same problems and the same rule.

use gqa::backend::Backend;
use gqa::oracle::{self, compare};
use gqa::{AttentionSpec, DType, Element, Mask};
use ndarray::Array4;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

use super::{Problem, tensor};

/// A length in 1..=300, weighted towards the edges that break kernels: 1, tile boundaries, short.
pub fn length() -> impl Strategy<Value = usize> {
    prop_oneof![2 => Just(1usize), 3 => 2..=70usize, 1 => prop::sample::select(vec![63, 64, 65, 127, 128, 129]), 2 => 71..=300usize]
}

/// Which specialisation a test exercises; the runtime values inside it are drawn.
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    Plain,
    CausalSoftcap,
    WindowAlibi,
    Everything,
}

pub fn spec_for(
    variant: Variant,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> impl Strategy<Value = AttentionSpec> {
    let sides = (0..80usize, 0..80usize);
    (
        sides,
        any::<bool>(),
        -1.0f32..1.0,
        1.0f32..30.0,
        proptest::collection::vec(0.0f32..0.5, q_heads),
    )
        .prop_map(move |((left, right), top_left, scale, cap, slopes)| {
            let spec = AttentionSpec::try_new(q_heads, kv_heads, head_dim).unwrap();
            let align = if top_left {
                gqa::Alignment::TopLeft
            } else {
                gqa::Alignment::BottomRight
            };
            match variant {
                Variant::Plain => spec,
                Variant::CausalSoftcap => spec
                    .with_mask(Mask::NONE.causal().aligned(align))
                    .try_with_softcap(cap)
                    .unwrap(),
                Variant::WindowAlibi => spec
                    .with_mask(Mask::NONE.window(left, right).aligned(align))
                    .try_with_alibi_slopes(&slopes)
                    .unwrap(),
                Variant::Everything => spec
                    .with_mask(Mask::NONE.causal().window(left, right).aligned(align))
                    .try_with_scale(scale)
                    .unwrap()
                    .try_with_softcap(cap)
                    .unwrap()
                    .with_alibi(),
            }
        })
}

/// Problems of a configuration: batch 1–2, lengths from [`length`], a spec of `variant`.
pub fn problems(
    variant: Variant,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> impl Strategy<Value = Problem> {
    (
        1..=2usize,
        length(),
        length(),
        spec_for(variant, q_heads, kv_heads, head_dim),
    )
        .prop_flat_map(move |(batch, seq_q, seq_k, spec)| {
            (
                Just(spec),
                tensor([batch, q_heads, seq_q, head_dim]),
                tensor([batch, kv_heads, seq_k, head_dim]),
                tensor([batch, kv_heads, seq_k, head_dim]),
            )
                .prop_map(|(spec, q, k, v)| Problem { spec, q, k, v })
        })
}

/// Runs `backend` on one problem (inputs narrowed to `T`) and checks O and LSE under the
/// tolerance rule; returns the worst errors.
pub fn check<T: Element, B: Backend<T>>(
    backend: &B,
    p: &Problem,
) -> Result<(f64, f64), TestCaseError> {
    let narrow = |x: &Array4<f64>| x.mapv(T::narrow);
    let (q, k, v) = (narrow(&p.q), narrow(&p.k), narrow(&p.v));
    let out = backend
        .try_forward(&p.spec, q.view(), k.view(), v.view())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let exact = oracle::forward(&p.spec, q.view(), k.view(), v.view());
    let rounded =
        oracle::try_forward_rounded(&p.spec, q.view(), k.view(), v.view(), T::DTYPE).unwrap();
    let o: Vec<f64> = out.o.iter().map(|x| x.widen()).collect();
    let o_check = compare(&exact.o, &rounded.o, &o, T::DTYPE);
    prop_assert!(
        o_check.passed(),
        "o: {o_check}\nspec {:?}, shapes q {:?} k {:?}",
        p.spec,
        p.q.shape(),
        p.k.shape()
    );
    let lse: Vec<f64> = out.lse.iter().map(|&x| f64::from(x)).collect();
    let lse_check = compare(&exact.lse, &rounded.lse, &lse, DType::F32);
    prop_assert!(lse_check.passed(), "lse: {lse_check}\nspec {:?}", p.spec);
    prop_assert!(o.iter().all(|x| x.is_finite()), "non-finite output");
    Ok((o_check.max_error, lse_check.max_error))
}

/// Runs `runner` over [`problems`] on `backend` and prints the worst errors (`label` names the
/// backend in the line).
pub fn run_variant<T: Element, B: Backend<T>>(
    backend: &B,
    mut runner: TestRunner,
    label: &str,
    variant: Variant,
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
) {
    let worst = std::cell::Cell::new((0.0f64, 0.0f64));
    runner
        .run(&problems(variant, q_heads, kv_heads, head_dim), |p| {
            let (o, lse) = check::<T, B>(backend, &p)?;
            let w = worst.get();
            worst.set((w.0.max(o), w.1.max(lse)));
            Ok(())
        })
        .unwrap();
    let worst = worst.get();
    eprintln!(
        "{label} {variant:?} {q_heads}/{kv_heads} d{head_dim} {}: max |o error| {:.2e}, max |lse error| {:.2e}",
        T::DTYPE,
        worst.0,
        worst.1
    );
}
