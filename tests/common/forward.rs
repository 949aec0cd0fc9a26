//! The forward suites' shared half: which specialisations run, the random problems, and the
//! check of one backend's result against the oracle under the tolerance rule. Used by
//! `cube_forward.rs` (the GPU kernels) and `cpu.rs` (the CPU backend), so that both backends
//! face the same problems and the same rule.
//!
//! What the problems reach, each with real probability (see [`problems`]): batch 0, `Lq = 0`,
//! `Lk = 0`, `Lq > Lk`, rows that see no key (forced in a quarter of the cases), window sides
//! from 0 to `i64::MAX`, one-sided bands in both alignments, and scores in the hundreds (where
//! a softmax without its running maximum overflows).

use gqa::backend::Backend;
use gqa::dsl::{MaskMod, Mods, ScoreMod};
use gqa::oracle::{self, compare_lse, compare_rows};
use gqa::{Alignment, AttentionSpec, DType, Element, Mask};
use ndarray::{Array4, Axis};
use proptest::prelude::*;

use super::{Problem, row_is_fully_masked, runner, tensor};

/// A length in 0..=300, weighted towards the edges that break kernels: 0, 1, tile boundaries.
pub fn length() -> impl Strategy<Value = usize> {
    length_up_to(300)
}

/// [`length`] in `0..=max` (`max` above 129: the tile edges stay in).
pub fn length_up_to(max: usize) -> impl Strategy<Value = usize> {
    assert!(max > 129, "the tile edges up to 129 stay in");
    prop_oneof![
        1 => Just(0usize),
        2 => Just(1usize),
        3 => 2..=70usize,
        1 => prop::sample::select(vec![63, 64, 65, 127, 128, 129]),
        2 => 71..=max,
    ]
}

/// A batch size: mostly 1 or 2, sometimes 0.
pub fn batch() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 6 => 1..=2usize]
}

/// A window side, from 0 to `i64::MAX` (the largest a builder takes): small, about the
/// lengths, past the kernel's old clamp of 80, far past every length, and huge.
pub fn side() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0..8usize,
        3 => 8..80usize,
        3 => 80..400usize,
        1 => 400..100_000usize,
        1 => prop::sample::select(vec![i64::MAX as usize - 1, i64::MAX as usize]),
    ]
}

/// Which specialisation a test exercises (for the kernels: which code is compiled); the
/// runtime values inside it — lengths, sides, alignment, scale, cap, slopes — are drawn.
#[derive(Debug, Clone, Copy)]
pub enum Variant {
    /// No mask, no modifier but the scale.
    Plain,
    /// A right-bounded band (causal is its side 0) with a softcap.
    RightSoftcap,
    /// A left-bounded band (no right bound), no modifier but the scale.
    LeftBand,
    /// A two-sided window with ALiBi (user slopes).
    WindowAlibi,
    /// Causal ∧ window, scale, softcap and ALiBi at once.
    Everything,
}

pub fn spec_for(
    variant: Variant,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> impl Strategy<Value = AttentionSpec> {
    (
        (side(), side(), prop_oneof![1 => Just(0usize), 1 => side()]),
        any::<bool>(),
        prop_oneof![1 => Just(None), 2 => (-1.5f64..1.5).prop_map(Some)],
        1.0f32..30.0,
        proptest::collection::vec(0.0f32..0.5, q_heads),
    )
        .prop_map(
            move |((left, right, right_or_causal), top_left, scale, cap, slopes)| {
                let mut spec = AttentionSpec::try_new(q_heads, kv_heads, head_dim).unwrap();
                let align = if top_left {
                    Alignment::TopLeft
                } else {
                    Alignment::BottomRight
                };
                let band = |l: Option<usize>, r: Option<usize>| Mask::band(l, r, align);
                spec = match variant {
                    Variant::Plain => spec,
                    Variant::RightSoftcap => spec
                        .with_mask(band(None, Some(right_or_causal)))
                        .try_with_softcap(cap)
                        .unwrap(),
                    Variant::LeftBand => spec.with_mask(band(Some(left), None)),
                    Variant::WindowAlibi => spec
                        .with_mask(band(Some(left), Some(right)))
                        .try_with_alibi_slopes(&slopes)
                        .unwrap(),
                    Variant::Everything => spec
                        .with_mask(band(Some(left), Some(right)).causal())
                        .try_with_softcap(cap)
                        .unwrap()
                        .with_alibi(),
                };
                match scale {
                    Some(scale) if !matches!(variant, Variant::WindowAlibi) => {
                        spec.try_with_scale(scale).unwrap()
                    }
                    _ => spec,
                }
            },
        )
}

/// Lengths (at most 300 queries) that make at least one row of `mask` see no key, near
/// `(seq_q, seq_k)`: more queries than keys where the mask's geometry allows it, else no keys
/// at all.
pub fn with_a_fully_masked_row(mask: Mask, seq_q: usize, seq_k: usize) -> (usize, usize) {
    for keys in [seq_k, seq_k / 2, 7, 1] {
        for queries in seq_q.max(1)..=300 {
            if (0..queries).any(|i| row_is_fully_masked(mask, i, queries, keys)) {
                return (queries, keys);
            }
        }
    }
    (seq_q.max(1), 0)
}

/// A multiplier for the queries: 1 in most cases; in one case of five, 20–60, so that scores
/// reach the hundreds (a softmax that skipped its running max would overflow `exp`).
pub fn query_gain() -> impl Strategy<Value = f64> {
    prop_oneof![4 => Just(1.0f64), 1 => 20.0f64..60.0]
}

/// Problems of a configuration: batch from [`batch`], lengths from [`length`], a spec of
/// `variant`; in a quarter of the cases lengths that leave some row fully masked.
pub fn problems(
    variant: Variant,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> impl Strategy<Value = Problem> {
    problems_up_to(variant, q_heads, kv_heads, head_dim, 300)
}

/// [`problems`] with lengths from [`length_up_to`]`(max)` (lengths that leave a row fully
/// masked may still reach 300).
pub fn problems_up_to(
    variant: Variant,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max: usize,
) -> impl Strategy<Value = Problem> {
    (
        batch(),
        length_up_to(max),
        length_up_to(max),
        spec_for(variant, q_heads, kv_heads, head_dim),
        prop::bool::weighted(0.25),
        query_gain(),
    )
        .prop_flat_map(move |(batch, seq_q, seq_k, spec, mask_a_row, gain)| {
            let (seq_q, seq_k) = if mask_a_row {
                with_a_fully_masked_row(spec.mask(), seq_q, seq_k)
            } else {
                (seq_q, seq_k)
            };
            (
                Just(spec),
                tensor([batch, q_heads, seq_q, head_dim]).prop_map(move |q| q * gain),
                tensor([batch, kv_heads, seq_k, head_dim]),
                tensor([batch, kv_heads, seq_k, head_dim]),
            )
                .prop_map(|(spec, q, k, v)| Problem { spec, q, k, v })
        })
}

/// The case's distinct shape, for `GQA_CASE_LOG`: batch, lengths, mask.
pub fn case_key(p: &Problem) -> String {
    format!(
        "B{} Lq{} Lk{} {:?}",
        p.q.shape()[0],
        p.seq_q(),
        p.seq_k(),
        p.spec.mask()
    )
}

/// What one backend's result is checked for against the oracle on the same (narrowed) inputs:
/// the output under the tolerance rule per row with the storage dtype's yardstick; the `f32`
/// LSE per row with the `f32` oracle's as yardstick (`compare_lse`); rows that see no key exactly 0 with LSE
/// −∞; everything else finite. Returns the worst errors (o, lse).
pub fn check_output<T: Element>(
    p: &Problem,
    inputs: (&Array4<T>, &Array4<T>, &Array4<T>),
    o: &Array4<T>,
    lse: &ndarray::Array3<f32>,
) -> Result<(f64, f64), TestCaseError> {
    check_output_with(p, &Mods::none(), inputs, o, lse)
}

/// [`check_output`] of a problem with user mods: the oracle and its yardsticks run the same
/// mods.
pub fn check_output_with<T: Element, M: MaskMod, S: ScoreMod>(
    p: &Problem,
    mods: &Mods<M, S>,
    (q, k, v): (&Array4<T>, &Array4<T>, &Array4<T>),
    o: &Array4<T>,
    lse: &ndarray::Array3<f32>,
) -> Result<(f64, f64), TestCaseError> {
    let exact = oracle::try_forward_with(&p.spec, mods, q.view(), k.view(), v.view()).unwrap();
    let in_dtype =
        oracle::try_forward_rounded_with(&p.spec, mods, q.view(), k.view(), v.view(), T::DTYPE)
            .unwrap();
    let in_f32 = if T::DTYPE == DType::F32 {
        in_dtype.clone()
    } else {
        oracle::try_forward_rounded_with(&p.spec, mods, q.view(), k.view(), v.view(), DType::F32)
            .unwrap()
    };
    let context = || {
        format!(
            "spec {:?}, mods {:?}, q {:?} k {:?} ({})",
            p.spec,
            mods,
            p.q.shape(),
            p.k.shape(),
            T::DTYPE
        )
    };
    prop_assert_eq!(o.shape(), exact.o.shape(), "o's shape; {}", context());
    prop_assert_eq!(lse.shape(), exact.lse.shape(), "lse's shape; {}", context());
    let o_wide: Vec<f64> = o.iter().map(|x| x.widen()).collect();
    let terms = oracle::try_row_terms_with(&p.spec, mods, q.view(), k.view(), v.view()).unwrap();
    let o_check = compare_rows(
        &exact.o,
        &in_dtype.o,
        &o_wide,
        T::DTYPE,
        p.spec.head_dim(),
        &terms.outputs(),
    );
    prop_assert!(o_check.passed(), "o: {o_check}\n{}", context());
    let lse_wide: Vec<f64> = lse.iter().map(|&x| f64::from(x)).collect();
    let lse_check = compare_lse(&exact.lse, &in_f32.lse, &lse_wide, &terms.scores);
    prop_assert!(lse_check.passed(), "lse: {lse_check}\n{}", context());
    for (((b, h, i), &reference), &got) in exact.lse.indexed_iter().zip(lse) {
        let row = o.index_axis(Axis(0), b);
        let row = row.index_axis(Axis(0), h);
        let row = row.index_axis(Axis(0), i);
        if reference == f64::NEG_INFINITY {
            prop_assert!(
                got == f32::NEG_INFINITY && row.iter().all(|x| x.widen() == 0.0),
                "row ({b}, {h}, {i}) sees no key: o must be 0 and lse −∞, got lse {got}; {}",
                context()
            );
        } else {
            prop_assert!(
                got.is_finite() && row.iter().all(|x| x.widen().is_finite()),
                "row ({b}, {h}, {i}) is not finite; {}",
                context()
            );
        }
    }
    Ok((o_check.max_error, lse_check.max_error))
}

/// Runs `backend` on one problem (inputs narrowed to `T`) and checks it ([`check_output`]).
pub fn check<T: Element, B: Backend<T>>(
    backend: &B,
    p: &Problem,
) -> Result<(f64, f64), TestCaseError> {
    check_with(backend, p, &Mods::none())
}

/// [`check`] with user mods.
pub fn check_with<T: Element, B: Backend<T>, M: MaskMod, S: ScoreMod>(
    backend: &B,
    p: &Problem,
    mods: &Mods<M, S>,
) -> Result<(f64, f64), TestCaseError> {
    runner::log_case(case_key(p));
    let narrow = |x: &Array4<f64>| x.mapv(T::narrow);
    let (q, k, v) = (narrow(&p.q), narrow(&p.k), narrow(&p.v));
    let out = if mods.is_trivial() {
        backend.try_forward(&p.spec, q.view(), k.view(), v.view())
    } else {
        backend.try_forward_with(&p.spec, mods, q.view(), k.view(), v.view())
    }
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_output_with(p, mods, (&q, &k, &v), &out.o, &out.lse)
}

/// Runs `cases` problems of `variant` through `backend` (the seed of test `test`) and prints
/// the worst errors (`label` names the backend in the line).
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
        "{label} {variant:?} {q_heads}/{kv_heads} d{head_dim} {}: max |o error| {:.2e}, max |lse error| {:.2e}",
        T::DTYPE,
        worst.0,
        worst.1
    );
}

/// Runs `cases` cases of `strategy` through `check` (the seed of test `test`) and returns the
/// worst errors (o, lse) it reported.
pub fn run_worst<S: Strategy>(
    (test, cases): (&str, u32),
    strategy: S,
    check: impl Fn(S::Value) -> Result<(f64, f64), TestCaseError>,
) -> (f64, f64)
where
    S::Value: std::fmt::Debug,
{
    let worst = std::cell::Cell::new((0.0f64, 0.0f64));
    runner::check(test, cases, runner::Persist::No, strategy, |p| {
        let (o, lse) = check(p)?;
        let w = worst.get();
        worst.set((w.0.max(o), w.1.max(lse)));
        Ok(())
    });
    worst.get()
}

/// The NaN contract's problem: `p` with non-finite values (NaN, +∞, −∞ in turn; in K, in V or in
/// both) at every `stride`-th key, from `offset`, among the keys that some row with visible keys
/// cannot see — in every batch entry and KV head. Returns it and, per `(b, h, i)`, whether row
/// `i` sees a poisoned key (those rows may come out non-finite; no other row may change).
pub fn poison_hidden_keys(
    p: &Problem,
    offset: usize,
    stride: usize,
) -> (Problem, ndarray::Array3<bool>) {
    let (seq_q, seq_k) = (p.seq_q(), p.seq_k());
    let mask = p.spec.mask();
    let live: Vec<usize> = (0..seq_q)
        .filter(|&i| !row_is_fully_masked(mask, i, seq_q, seq_k))
        .collect();
    let hidden: Vec<usize> = (0..seq_k)
        .filter(|&j| {
            live.iter()
                .any(|&i| !super::visible_by_definition(mask, i, j, seq_q, seq_k))
        })
        .collect();
    let poisoned: Vec<usize> = hidden
        .iter()
        .copied()
        .skip(offset % stride.max(1))
        .step_by(stride.max(1))
        .collect();
    let mut out = p.clone();
    for (n, &j) in poisoned.iter().enumerate() {
        let value = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][n % 3];
        let (in_k, in_v) = [(true, true), (true, false), (false, true)][(n / 3) % 3];
        for b in 0..p.q.shape()[0] {
            for g in 0..p.spec.kv_heads() {
                for c in 0..p.spec.head_dim() {
                    if in_k {
                        out.k[[b, g, j, c]] = value;
                    }
                    if in_v {
                        out.v[[b, g, j, c]] = value;
                    }
                }
            }
        }
    }
    let sees =
        ndarray::Array3::from_shape_fn((p.q.shape()[0], p.spec.q_heads(), seq_q), |(_, _, i)| {
            poisoned
                .iter()
                .any(|&j| super::visible_by_definition(mask, i, j, seq_q, seq_k))
        });
    (out, sees)
}

/// The problems of the NaN contract's tests: problems of `variant` (one with a mask) whose
/// rows do not all see the same keys, with the poison's offset and stride.
pub fn hidden_key_problems(
    variant: Variant,
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
) -> impl Strategy<Value = (Problem, usize, usize)> {
    (
        problems(variant, q_heads, kv_heads, head_dim),
        0..4usize,
        1..4usize,
    )
}

/// Rows that see no poisoned key, bit for bit: `poisoned` equals `clean` there.
pub fn unseen_rows_are_bit_identical<T: Element>(
    sees: &ndarray::Array3<bool>,
    (clean_o, clean_lse): (&Array4<T>, &ndarray::Array3<f32>),
    (o, lse): (&Array4<T>, &ndarray::Array3<f32>),
) -> Result<usize, TestCaseError> {
    let mut unseen = 0;
    for ((b, h, i), &seen) in sees.indexed_iter() {
        if seen {
            continue;
        }
        unseen += 1;
        let bits = |x: &Array4<T>| -> Vec<u64> {
            x.slice(ndarray::s![b, h, i, ..])
                .iter()
                .map(|v| v.widen().to_bits())
                .collect()
        };
        prop_assert_eq!(
            (bits(o), lse[[b, h, i]].to_bits()),
            (bits(clean_o), clean_lse[[b, h, i]].to_bits()),
            "row ({}, {}, {}) sees no poisoned key, yet changed",
            b,
            h,
            i
        );
    }
    Ok(unseen)
}
