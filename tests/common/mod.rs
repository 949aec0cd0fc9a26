//! Shared pieces of the test suites: the configuration list, proptest strategies for specs and
//! problems, and small tensor helpers. No assertions live here.

#![allow(dead_code)]

#[macro_use]
pub mod runner;
#[macro_use]
pub mod configs;
pub mod backward;
pub mod cube;
pub mod decode;
pub mod forward;
pub mod mods;
pub mod refusal;
pub mod varlen;

use gqa::{Alignment, AttentionSpec, Mask};
use ndarray::{Array4, Axis};
use proptest::prelude::*;

/// One attention problem: a spec and its inputs, in `f64`.
#[derive(Debug, Clone)]
pub struct Problem {
    pub spec: AttentionSpec,
    pub q: Array4<f64>,
    pub k: Array4<f64>,
    pub v: Array4<f64>,
}

impl Problem {
    pub fn seq_q(&self) -> usize {
        self.q.shape()[2]
    }
    pub fn seq_k(&self) -> usize {
        self.k.shape()[2]
    }
}

/// Sizes small enough for the naive oracle, large enough to show groups, ragged masks and
/// `seq_q > seq_k`.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub head_dim: usize,
}

pub fn sizes() -> impl Strategy<Value = Sizes> {
    (
        1..=2usize,
        1..=3usize,
        1..=3usize,
        0..=7usize,
        0..=9usize,
        1..=6usize,
    )
        .prop_map(|(batch, kv_heads, group, seq_q, seq_k, head_dim)| Sizes {
            batch,
            kv_heads,
            group,
            seq_q,
            seq_k,
            head_dim,
        })
}

/// Every mask shape: none, causal (both alignments), windows (small and huge sides), causal ∧
/// window, and one-sided bands.
pub fn mask() -> impl Strategy<Value = Mask> {
    let side =
        prop_oneof![4 => 0..6usize, 1 => Just(usize::MAX), 1 => (usize::MAX - 8)..=usize::MAX];
    (0..6u8, side.clone(), side, any::<bool>()).prop_map(|(kind, left, right, top_left)| {
        let mask = match kind {
            0 => Mask::NONE,
            1 => Mask::NONE.causal(),
            2 => Mask::NONE.window(left, right),
            3 => Mask::NONE.causal().window(left, right),
            4 => Mask::band(Some(left), None, Alignment::BottomRight),
            _ => Mask::band(None, Some(right), Alignment::BottomRight),
        };
        if top_left {
            mask.aligned(Alignment::TopLeft)
        } else {
            mask
        }
    })
}

/// The mask's diagonal, restated: `diag(i) = i + seq_k − seq_q` (bottom-right) or `i`.
fn diagonal_by_definition(mask: Mask, i: usize, seq_q: usize, seq_k: usize) -> i128 {
    match mask.alignment() {
        Alignment::BottomRight => i as i128 + seq_k as i128 - seq_q as i128,
        Alignment::TopLeft => i as i128,
    }
}

/// The mask's definition, restated independently of `Mask::visible_keys`: query `i` sees key
/// `j` when `diag(i) - left <= j <= diag(i) + right`.
pub fn visible_by_definition(mask: Mask, i: usize, j: usize, seq_q: usize, seq_k: usize) -> bool {
    let diag = diagonal_by_definition(mask, i, seq_q, seq_k);
    let j = j as i128;
    mask.left().is_none_or(|left| j >= diag - left as i128)
        && mask.right().is_none_or(|right| j <= diag + right as i128)
}

/// Whether query `i` sees no key at all, by the same definition (in O(1): the band
/// `[diag − left, diag + right]` misses `0..seq_k`).
pub fn row_is_fully_masked(mask: Mask, i: usize, seq_q: usize, seq_k: usize) -> bool {
    let diag = diagonal_by_definition(mask, i, seq_q, seq_k);
    let lo = mask.left().map_or(0, |l| (diag - l as i128).max(0));
    let hi = mask.right().map_or(seq_k as i128 - 1, |r| {
        (diag + r as i128).min(seq_k as i128 - 1)
    });
    lo > hi
}

/// The score's definition, restated independently of the oracle: `scale · q·k`, then the
/// softcap, then ALiBi's `−slope_h · |diag(i) − j|`.
pub fn score_by_definition(p: &Problem, (b, h, i, j): (usize, usize, usize, usize)) -> f64 {
    let spec = &p.spec;
    let g = h / (spec.q_heads() / spec.kv_heads());
    let dot: f64 = (0..spec.head_dim())
        .map(|c| p.q[[b, h, i, c]] * p.k[[b, g, j, c]])
        .sum();
    let mut s = spec.scale() * dot;
    if let Some(cap) = spec.softcap() {
        s = f64::from(cap) * (s / f64::from(cap)).tanh();
    }
    if let Some(alibi) = spec.alibi() {
        let diag = match spec.mask().alignment() {
            Alignment::BottomRight => i as f64 + p.seq_k() as f64 - p.seq_q() as f64,
            Alignment::TopLeft => i as f64,
        };
        s -= f64::from(alibi.slope(h)) * (diag - j as f64).abs();
    }
    s
}

/// Attention restated from its definition, independently of the oracle: for each row the
/// visible keys ([`visible_by_definition`]), their scores ([`score_by_definition`]),
/// `p_j = exp(s_j − max) / Σ exp(s − max)`, `o = Σ p_j v_j`, `lse = max + ln Σ exp(s − max)`;
/// 0 and −∞ for a row that sees nothing. `(o [B, HQ, Lq, D], lse [B, HQ, Lq])`.
pub fn attention_by_definition(p: &Problem) -> (Array4<f64>, ndarray::Array3<f64>) {
    let spec = &p.spec;
    let (batch, hq, d) = (p.q.shape()[0], spec.q_heads(), spec.head_dim());
    let (seq_q, seq_k) = (p.seq_q(), p.seq_k());
    let g = hq / spec.kv_heads();
    let mut o = Array4::zeros((batch, hq, seq_q, d));
    let mut lse = ndarray::Array3::from_elem((batch, hq, seq_q), f64::NEG_INFINITY);
    for b in 0..batch {
        for h in 0..hq {
            for i in 0..seq_q {
                let keys: Vec<usize> = (0..seq_k)
                    .filter(|&j| visible_by_definition(spec.mask(), i, j, seq_q, seq_k))
                    .collect();
                if keys.is_empty() {
                    continue;
                }
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| score_by_definition(p, (b, h, i, j)))
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                lse[[b, h, i]] = max + total.ln();
                for (&j, s) in keys.iter().zip(&scores) {
                    let weight = (s - max).exp() / total;
                    for c in 0..d {
                        o[[b, h, i, c]] += weight * p.v[[b, h / g, j, c]];
                    }
                }
            }
        }
    }
    (o, lse)
}

/// The score modifiers, each present or not: a custom scale, a softcap, ALiBi (geometric or user
/// slopes).
#[derive(Debug, Clone)]
pub struct Modifiers {
    pub scale: Option<f64>,
    pub softcap: Option<f32>,
    pub alibi: Option<Option<Vec<f32>>>,
}

pub fn modifiers(q_heads: usize) -> impl Strategy<Value = Modifiers> {
    (
        proptest::option::of(-2.0f64..2.0),
        proptest::option::of(0.25f32..20.0),
        proptest::option::of(proptest::option::of(proptest::collection::vec(
            0.0f32..1.0,
            q_heads,
        ))),
    )
        .prop_map(|(scale, softcap, alibi)| Modifiers {
            scale,
            softcap,
            alibi,
        })
}

/// Builds a spec through the public builder.
pub fn build_spec(
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    mask: Mask,
    mods: &Modifiers,
) -> AttentionSpec {
    let mut spec = AttentionSpec::try_new(q_heads, kv_heads, head_dim)
        .unwrap()
        .with_mask(mask);
    if let Some(scale) = mods.scale {
        spec = spec.try_with_scale(scale).unwrap();
    }
    if let Some(cap) = mods.softcap {
        spec = spec.try_with_softcap(cap).unwrap();
    }
    match &mods.alibi {
        Some(Some(slopes)) => spec = spec.try_with_alibi_slopes(slopes).unwrap(),
        Some(None) => spec = spec.with_alibi(),
        None => {}
    }
    spec
}

/// A tensor of the given shape with entries drawn from `-3.0..3.0`.
pub fn tensor(shape: [usize; 4]) -> impl Strategy<Value = Array4<f64>> {
    let len = shape.iter().product::<usize>();
    proptest::collection::vec(-3.0f64..3.0, len)
        .prop_map(move |data| Array4::from_shape_vec(shape, data).expect("length matches shape"))
}

/// A random problem: sizes, then mask, modifiers and data; in one case of five the queries are
/// scaled up so that scores reach the hundreds.
pub fn problem() -> impl Strategy<Value = Problem> {
    (sizes(), forward::query_gain()).prop_flat_map(|(s, gain)| {
        let q_heads = s.kv_heads * s.group;
        (
            mask(),
            modifiers(q_heads),
            tensor([s.batch, q_heads, s.seq_q, s.head_dim]).prop_map(move |q| q * gain),
            tensor([s.batch, s.kv_heads, s.seq_k, s.head_dim]),
            tensor([s.batch, s.kv_heads, s.seq_k, s.head_dim]),
        )
            .prop_map(move |(mask, mods, q, k, v)| Problem {
                spec: build_spec(q_heads, s.kv_heads, s.head_dim, mask, &mods),
                q,
                k,
                v,
            })
    })
}

/// Repeats each KV head `group` times along the head axis: what MHA would have stored.
pub fn repeat_kv(x: &Array4<f64>, group: usize) -> Array4<f64> {
    let heads: Vec<_> = x
        .axis_iter(Axis(1))
        .flat_map(|head| std::iter::repeat_n(head, group))
        .collect();
    ndarray::stack(Axis(1), &heads).expect("heads have equal shapes")
}

/// `x` interleaved into a NaN-filled tensor of size `2n + 1` in every dimension (data at odd
/// indices), returned as the backing tensor; [`nan_padded_view`] gives the view of the data.
pub fn nan_padded(x: &Array4<f64>) -> Array4<f64> {
    let s = x.shape();
    let mut big = Array4::from_elem(
        (2 * s[0] + 1, 2 * s[1] + 1, 2 * s[2] + 1, 2 * s[3] + 1),
        f64::NAN,
    );
    nan_padded_view_mut(&mut big, s).assign(x);
    big
}

fn window_of(
    s: &[usize],
) -> ndarray::SliceInfo<[ndarray::SliceInfoElem; 4], ndarray::Ix4, ndarray::Ix4> {
    // Odd indices of every axis: a NaN on each side of every element, and non-unit strides.
    ndarray::s![1..2 * s[0]; 2, 1..2 * s[1]; 2, 1..2 * s[2]; 2, 1..2 * s[3]; 2]
}

fn nan_padded_view_mut<'a>(
    big: &'a mut Array4<f64>,
    s: &[usize],
) -> ndarray::ArrayViewMut4<'a, f64> {
    big.slice_mut(window_of(s))
}

/// The data inside a [`nan_padded`] tensor, as a strided view.
pub fn nan_padded_view<'a, A>(big: &'a Array4<A>, s: &[usize]) -> ndarray::ArrayView4<'a, A> {
    big.slice(window_of(s))
}

/// The concurrency law: `calls` calls `call(&mut state, n)` made one by one give, bit for bit
/// (`R` holds bit patterns), what the same calls give when `threads` threads make them at once —
/// thread `t` making calls `t, t + 1, …` (mod `calls`), `per_thread` of them, each thread with a
/// state of its own from `state()` (a device copy of a cache, say).
pub fn concurrent_calls_equal_one_by_one<S, R: PartialEq + Send>(
    (calls, threads, per_thread): (usize, usize, usize),
    state: impl Fn() -> S + Sync,
    call: impl Fn(&mut S, usize) -> R + Sync,
) -> Result<(), proptest::test_runner::TestCaseError> {
    let mut alone = state();
    let one_by_one: Vec<R> = (0..calls).map(|n| call(&mut alone, n)).collect();
    let (state, call) = (&state, &call);
    let together: Vec<Vec<R>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut own = state();
                    (0..per_thread)
                        .map(|r| call(&mut own, (t + r) % calls))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, results) in together.iter().enumerate() {
        for (r, result) in results.iter().enumerate() {
            prop_assert!(
                *result == one_by_one[(t + r) % calls],
                "thread {t}, call {r} (call {} of the sequence) differs from the same call made alone",
                (t + r) % calls
            );
        }
    }
    Ok(())
}
