//! The CPU backward (`Cpu::try_backward_with`) against the f64 oracle's gradients, under the
//! tolerance rule for gradients (`oracle::compare_gradients`): every configuration of the shared
//! list with the forward suites' problems (lengths 0..=300 across tile edges, rows that see no
//! key, scores in the hundreds, every band in both alignments, softcap, ALiBi), f32, f16 and
//! bf16, NaN-padded strided inputs; the library's mod families; non-finite values at keys no row
//! sees; determinism across calls and thread counts; typed errors.
//!
//! `GQA_CPU_CASES` sets the cases per configuration and variant (default 4); seeds per test
//! (`tests/common/runner.rs`).

#[macro_use]
mod common;

use common::Problem;
use common::backward::{check_backward, upstream};
use common::forward::{self, Variant};
use common::mods::{Captures, checker, wobble};
use common::runner::{self, Persist, env_count};
use gqa::cpu::{Cpu, CpuElement};
use gqa::dsl::ScoreMod;
use gqa::dsl::block::SortedDocuments;
use gqa::dsl::{Aux, Mods, NoMask, NoScore, library};
use gqa::{Error, Gqa};
use half::{bf16, f16};
use ndarray::{Array3, Array4, s};
use proptest::prelude::*;

fn cases() -> u32 {
    env_count("GQA_CPU_CASES", 4)
}

fn run<T: CpuElement>(test: &str, variant: Variant, (hq, hkv, d): (usize, usize, usize)) {
    let strategy =
        forward::problems(variant, hq, hkv, d).prop_flat_map(|p| (Just(p.clone()), upstream(&p)));
    runner::check(test, cases(), Persist::No, strategy, |(p, up)| {
        runner::log_case(format!("{test} {}", forward::case_key(&p)));
        check_backward::<T, Cpu, _, _>(&Cpu::new(), &p, &Mods::none(), &up).map(|_| ())
    });
}

macro_rules! backward_tests {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            #[test]
            fn [<$name _backward_right_softcap_f32>]() {
                run::<f32>(stringify!([<$name _backward_right_softcap_f32>]), Variant::RightSoftcap, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _backward_window_alibi_f32>]() {
                run::<f32>(stringify!([<$name _backward_window_alibi_f32>]), Variant::WindowAlibi, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _backward_everything_bf16>]() {
                run::<bf16>(stringify!([<$name _backward_everything_bf16>]), Variant::Everything, ($hq, $hkv, $d));
            }
        }
    };
}

for_each_config!(backward_tests);

#[test]
fn backward_plain_f16_left_band_f32() {
    let test = "backward_plain_f16_left_band_f32";
    run::<f16>(&format!("{test}/plain"), Variant::Plain, (8, 2, 64));
    run::<f32>(&format!("{test}/left"), Variant::LeftBand, (12, 4, 80));
}

/// The library's mod families (and a user mod pair with kinks) through the CPU backward.
macro_rules! family_tests {
    ($name:ident, $variant:expr, $make:expr) => {
        paste::paste! {
            #[test]
            fn [<backward_ $name _matches_the_oracle>]() {
                let make = $make;
                for config in [(6, 2, 8), (8, 2, 64)] {
                    let test = format!("{}/{config:?}", stringify!([<backward_ $name _matches_the_oracle>]));
                    let strategy = common::mods::cases($variant, config)
                        .prop_flat_map(|(p, c)| (Just((p.clone(), c)), upstream(&p)));
                    runner::check(&test, cases(), Persist::No, strategy, |((p, c), up)| {
                        check_backward::<f32, Cpu, _, _>(&Cpu::new(), &p, &make(&c), &up).map(|_| ())
                    });
                }
            }
        }
    };
}

for_each_mod_family!(family_tests);

fn bits<T: Copy + Into<f64>>(x: &Array4<T>) -> Vec<u64> {
    x.iter().map(|&v| v.into().to_bits()).collect()
}

/// Key ranges past one sweep of key tiles (more than 512 keys) with few queries, on a
/// configuration whose 8 KV heads take the one-task-per-pair schedule: every sweep's last tile
/// and the sweeps' seams are reached.
#[test]
fn long_key_ranges_cross_the_key_sweeps() {
    let test = "long_key_ranges_cross_the_key_sweeps";
    let (hq, hkv, d) = (16, 8, 16);
    let problems = (
        1..=80usize,
        520..=1200usize,
        forward::spec_for(Variant::Everything, hq, hkv, d),
    )
        .prop_flat_map(move |(seq_q, seq_k, spec)| {
            (
                Just(spec),
                common::tensor([1, hq, seq_q, d]),
                common::tensor([1, hkv, seq_k, d]),
                common::tensor([1, hkv, seq_k, d]),
            )
                .prop_map(|(spec, q, k, v)| Problem { spec, q, k, v })
        });
    let strategy = problems.prop_flat_map(|p| (Just(p.clone()), upstream(&p)));
    runner::check(test, cases(), Persist::No, strategy, |(p, up)| {
        check_backward::<f32, Cpu, _, _>(&Cpu::new(), &p, &Mods::none(), &up).map(|_| ())
    });
}

/// Repeated calls give the same bits, and so do 1, 2 and 3 threads: every task sums in a
/// fixed order (no atomics, no thread-dependent split). Both schedules: two passes (8/2/64,
/// batch ≤ 2: under 8 (batch, KV head) pairs) and one task per pair (32/8/128).
#[test]
fn backward_is_deterministic_across_calls_and_thread_counts() {
    for (hq, hkv, d) in [(8, 2, 64), (32, 8, 128)] {
        let test =
            format!("backward_is_deterministic_across_calls_and_thread_counts/{hq}_{hkv}_{d}");
        let strategy = forward::problems(Variant::Everything, hq, hkv, d)
            .prop_flat_map(|p| (Just(p.clone()), upstream(&p)));
        runner::check(&test, cases(), Persist::No, strategy, |(p, up)| {
            let narrow = |x: &Array4<f64>| x.mapv(|x| x as f32);
            let (q, k, v, d_o) = (narrow(&p.q), narrow(&p.k), narrow(&p.v), narrow(&up.d_o));
            let run = |cpu: &Cpu| {
                let out = cpu
                    .try_forward(&p.spec, q.view(), k.view(), v.view())
                    .unwrap();
                let d_lse = up.d_lse.as_ref().map(|d| d.view());
                let inputs = [q.view(), k.view(), v.view()];
                let g = cpu
                    .try_backward_with(&p.spec, &Mods::none(), inputs, &out, d_o.view(), d_lse)
                    .unwrap();
                [bits(&g.dq), bits(&g.dk), bits(&g.dv)]
            };
            let first = run(&Cpu::new());
            prop_assert!(first == run(&Cpu::new()), "two calls differ");
            for threads in 1..=3 {
                let cpu = Cpu::with_threads(threads).unwrap();
                prop_assert!(first == run(&cpu), "{threads} threads differ");
            }
            Ok(())
        });
    }
}

/// Block masks and the classifier's row keys change no bit of the backward: the document mask
/// with `SortedDocuments` (empty tiles skipped, full ones run without the mask, each row's
/// keys folded into its band) against the same mods without them (every tile partial, the
/// mask tested per score), from one forward output; both schedules (two passes at 8/2, one
/// task per (batch, KV head) at 32/8).
#[test]
fn block_masks_and_row_keys_change_no_bit_of_the_backward() {
    for config in [(8, 2, 16), (32, 8, 16)] {
        let test = format!("block_masks_and_row_keys_change_no_bit_of_the_backward/{config:?}");
        let strategy = common::mods::cases(Variant::RightSoftcap, config)
            .prop_flat_map(|(p, c)| (Just((p.clone(), c)), upstream(&p)));
        runner::check(&test, cases() + 4, Persist::No, strategy, |((p, c), up)| {
            let docs: Vec<i32> = c.docs.iter().map(|d| d / 4).collect();
            let mods = Mods::new(library::document(Aux::new(docs.clone())), wobble(c.gain))
                .with_classifier(SortedDocuments::new(&docs));
            let plain = mods.clone().without_block_masks();
            let narrow = |x: &Array4<f64>| x.mapv(|x| x as f32);
            let (q, k, v, d_o) = (narrow(&p.q), narrow(&p.k), narrow(&p.v), narrow(&up.d_o));
            let cpu = Cpu::new();
            let out = cpu
                .try_forward_with(&p.spec, &plain, q.view(), k.view(), v.view())
                .unwrap();
            let d_lse = up.d_lse.as_ref().map(|d| d.view());
            let run = |mods: &Mods<_, _>| {
                let inputs = [q.view(), k.view(), v.view()];
                let g = cpu
                    .try_backward_with(&p.spec, mods, inputs, &out, d_o.view(), d_lse)
                    .unwrap();
                [bits(&g.dq), bits(&g.dk), bits(&g.dv)]
            };
            prop_assert!(
                run(&mods) == run(&plain),
                "the gradients differ with and without block masks and row keys"
            );
            Ok(())
        });
    }
}

/// NaN and ∞ at keys no row sees (and at the queries and upstream gradients of rows that see
/// no key) reach no gradient: the result still passes the rule against the oracle of the clean
/// problem.
#[test]
fn non_finite_values_rows_cannot_see_leave_the_gradients_alone() {
    // Both schedules: two passes (8/2, under 8 (batch, KV head) pairs) and one task per pair
    // (32/8, under a window: keys on both sides that no row sees).
    for (variant, (hq, hkv, d)) in [
        (Variant::RightSoftcap, (8, 2, 16)),
        (Variant::WindowAlibi, (32, 8, 16)),
    ] {
        let test =
            format!("non_finite_values_rows_cannot_see_leave_the_gradients_alone/{hq}_{hkv}_{d}");
        non_finite_values_rows_cannot_see(&test, variant, (hq, hkv, d));
    }
}

fn non_finite_values_rows_cannot_see(
    test: &str,
    variant: Variant,
    (hq, hkv, d): (usize, usize, usize),
) {
    let strategy =
        forward::problems(variant, hq, hkv, d).prop_flat_map(|p| (Just(p.clone()), upstream(&p)));
    runner::check(test, cases() * 4, Persist::No, strategy, |(p, up)| {
        let (seq_q, seq_k) = (p.seq_q(), p.seq_k());
        let mask = p.spec.mask();
        let seen = |j: usize| (0..seq_q).any(|i| mask.visible_keys(i, seq_q, seq_k).contains(&j));
        let blind = |i: usize| mask.visible_keys(i, seq_q, seq_k).is_empty();
        check_backward::<f32, Cpu, _, _>(&Cpu::new(), &p, &Mods::none(), &up)?;
        let mut dirty = p.clone();
        for j in (0..seq_k).filter(|&j| !seen(j)) {
            dirty.k.slice_mut(s![.., .., j, ..]).fill(f64::NAN);
            dirty.v.slice_mut(s![.., .., j, ..]).fill(f64::INFINITY);
        }
        let mut dirty_up = up.clone();
        for i in (0..seq_q).filter(|&i| blind(i)) {
            dirty.q.slice_mut(s![.., .., i, ..]).fill(f64::NAN);
            dirty_up.d_o.slice_mut(s![.., .., i, ..]).fill(f64::NAN);
        }
        // The oracle never reads them, so its gradients of `dirty` are those of `p`.
        check_backward::<f32, Cpu, _, _>(&Cpu::new(), &dirty, &Mods::none(), &dirty_up)?;
        Ok(())
    });
}

#[test]
fn bad_backward_inputs_are_typed_errors_naming_the_tensor() {
    let attention = Gqa::<4, 2, 8>::new().causal();
    let cpu = Cpu::new();
    let q = Array4::<f32>::zeros((1, 4, 3, 8));
    let kv = Array4::<f32>::zeros((1, 2, 5, 8));
    let out = attention
        .try_forward(&cpu, q.view(), kv.view(), kv.view())
        .unwrap();
    let d_o = Array4::<f32>::zeros((1, 4, 3, 8));
    let message = |e: Error| e.to_string();
    let bad_d_o = Array4::<f32>::zeros((1, 4, 3, 7));
    assert_eq!(
        message(
            attention
                .try_backward(&cpu, q.view(), kv.view(), kv.view(), &out, bad_d_o.view())
                .unwrap_err()
        ),
        "cpu::backward: `d_o` has shape [1, 4, 3, 7], expected [1, 4, 3, 8] ([batch, q_heads, seq_q, head_dim])"
    );
    let other = Array4::<f32>::zeros((1, 4, 2, 8));
    let wrong = cpu
        .try_forward(attention.spec(), other.view(), kv.view(), kv.view())
        .unwrap();
    assert_eq!(
        message(
            attention
                .try_backward(&cpu, q.view(), kv.view(), kv.view(), &wrong, d_o.view())
                .unwrap_err()
        ),
        "cpu::backward: `o` has shape [1, 4, 2, 8], expected [1, 4, 3, 8] ([batch, q_heads, seq_q, head_dim])"
    );
    let d_lse = Array3::<f32>::zeros((1, 4, 4));
    assert_eq!(
        message(
            attention
                .try_backward_lse(
                    &cpu,
                    q.view(),
                    kv.view(),
                    kv.view(),
                    &out,
                    d_o.view(),
                    d_lse.view()
                )
                .unwrap_err()
        ),
        "cpu::backward: `d_lse` has shape [1, 4, 4], expected [1, 4, 3] ([batch, q_heads, seq_q])"
    );
    let short_k = Array4::<f32>::zeros((1, 2, 4, 8));
    assert!(
        message(
            attention
                .try_backward(&cpu, q.view(), short_k.view(), kv.view(), &out, d_o.view())
                .unwrap_err()
        )
        .contains("`v`")
    );
}
