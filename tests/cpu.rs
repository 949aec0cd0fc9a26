//! The CPU backend (`gqa::cpu`) against the f64 oracle: the same problems and tolerance rule as
//! the GPU kernels (`tests/common/forward.rs`, `tests/common/decode.rs`), every configuration
//! of the shared list, plus strided NaN-padded inputs, hidden non-finite keys, fully masked
//! rows, long key ranges, thread counts, decode against every cache storage, typed partials and
//! calls from several threads at once.
//!
//! `GQA_CPU_CASES` sets the cases per configuration and variant (default 4); every test draws
//! its own cases from a seed derived from its name (`GQA_SEED`, `GQA_RANDOM=1`: see
//! `tests/common/runner.rs`).

#[macro_use]
mod common;

use common::decode::{self as dec, Case, check_decoded, fill};
use common::forward::{self, Variant};
use common::runner::{self, Persist, env_count};
use common::varlen;
use common::{Problem, nan_padded, nan_padded_view, tensor};
use gqa::cache::{BFloat16, Float16, Float32, Int4, Int8, KvStorage, Layout};
use gqa::cpu::{Cpu, CpuElement};
use gqa::partial::Partial;
use gqa::{AttentionSpec, Error, Gqa, Mask};
use half::{bf16, f16};
use ndarray::{Array3, Array4, s};
use proptest::prelude::*;

fn cases() -> u32 {
    env_count("GQA_CPU_CASES", 4)
}

fn run_forward<T: CpuElement>(test: &str, variant: Variant, config: (usize, usize, usize)) {
    forward::run_variant::<T, Cpu>(&Cpu::new(), (test, cases()), "cpu", variant, config);
}

fn run_varlen<T: CpuElement>(test: &str, variant: Variant, config: (usize, usize, usize)) {
    varlen::run_variant::<T, Cpu>(&Cpu::new(), (test, cases()), "cpu", variant, config);
}

fn run_decode<T: CpuElement, const HQ: usize, const HKV: usize, const D: usize, S: KvStorage>(
    test: &str,
    variant: dec::Variant,
) where
    gqa::heads::Rule: gqa::heads::Supported<HQ, HKV, D> + gqa::heads::Supported<HKV, HKV, D>,
{
    let cpu = Cpu::new();
    dec::run_cases::<T, S>(
        (test, cases()),
        "cpu decode",
        variant,
        (HQ, HKV, D),
        |case: Case| {
            let (cache, seqs) = fill::<HKV, D, S>(&case);
            let q = case.q.mapv(T::narrow);
            let attention = Gqa::<HQ, HKV, D>::try_from(case.spec).unwrap();
            let out = attention
                .try_decode_cpu(&cpu, q.view(), &cache, &seqs)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            check_decoded(&case, (&cache, &seqs), &q, (&out.o, &out.lse))
        },
    );
}

macro_rules! cpu_tests {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            #[test]
            fn [<$name _plain_f32>]() {
                run_forward::<f32>(stringify!([<$name _plain_f32>]), Variant::Plain, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _right_softcap_f32>]() {
                run_forward::<f32>(stringify!([<$name _right_softcap_f32>]), Variant::RightSoftcap, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _left_band_f32>]() {
                run_forward::<f32>(stringify!([<$name _left_band_f32>]), Variant::LeftBand, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _window_alibi_f32>]() {
                run_forward::<f32>(stringify!([<$name _window_alibi_f32>]), Variant::WindowAlibi, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _everything_f16>]() {
                run_forward::<f16>(stringify!([<$name _everything_f16>]), Variant::Everything, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _everything_bf16>]() {
                run_forward::<bf16>(stringify!([<$name _everything_bf16>]), Variant::Everything, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _varlen_window_alibi_f32>]() {
                run_varlen::<f32>(stringify!([<$name _varlen_window_alibi_f32>]), Variant::WindowAlibi, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _varlen_everything_bf16>]() {
                run_varlen::<bf16>(stringify!([<$name _varlen_everything_bf16>]), Variant::Everything, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _decode_f32_cache>]() {
                run_decode::<f32, $hq, $hkv, $d, Float32>(stringify!([<$name _decode_f32_cache>]), dec::Variant::NoMask);
            }
            #[test]
            fn [<$name _decode_f16_cache>]() {
                run_decode::<f32, $hq, $hkv, $d, Float16>(stringify!([<$name _decode_f16_cache>]), dec::Variant::RightSoftcap);
            }
            #[test]
            fn [<$name _decode_bf16_cache>]() {
                run_decode::<f32, $hq, $hkv, $d, BFloat16>(stringify!([<$name _decode_bf16_cache>]), dec::Variant::LeftAlibi);
            }
            #[test]
            fn [<$name _decode_int8_cache_f16_queries>]() {
                run_decode::<f16, $hq, $hkv, $d, Int8>(stringify!([<$name _decode_int8_cache_f16_queries>]), dec::Variant::Everything);
            }
            #[test]
            fn [<$name _decode_int4_cache>]() {
                run_decode::<f32, $hq, $hkv, $d, Int4>(stringify!([<$name _decode_int4_cache>]), dec::Variant::Window);
            }
        }
    };
}

for_each_config!(cpu_tests);

fn f32s(x: &Array4<f64>) -> Array4<f32> {
    x.mapv(|y| y as f32)
}

/// Drawn problems of three configurations (ragged head dims, groups of 3, 16 and 1).
fn mixed_problems() -> impl Strategy<Value = Problem> {
    prop_oneof![
        forward::problems(Variant::WindowAlibi, 12, 4, 80),
        forward::problems(Variant::Everything, 9, 3, 3),
        forward::problems(Variant::RightSoftcap, 16, 1, 17),
    ]
}

/// Inputs as strided views into NaN-filled buffers give results bit-identical to contiguous
/// inputs, on drawn shapes (more queries than keys, rows that see nothing, zero sizes):
/// nothing outside the views is read.
#[test]
fn nan_padded_inputs_give_the_contiguous_result_bit_for_bit() {
    let cpu = Cpu::new();
    runner::check(
        "nan_padded_inputs_give_the_contiguous_result_bit_for_bit",
        2 * cases(),
        Persist::No,
        mixed_problems(),
        |p| {
            runner::log_case(forward::case_key(&p));
            let (q, k, v) = (f32s(&p.q), f32s(&p.k), f32s(&p.v));
            let contiguous = cpu
                .try_forward(&p.spec, q.view(), k.view(), v.view())
                .unwrap();
            let (bq, bk, bv) = (
                f32s(&nan_padded(&p.q)),
                f32s(&nan_padded(&p.k)),
                f32s(&nan_padded(&p.v)),
            );
            let padded = cpu
                .try_forward(
                    &p.spec,
                    nan_padded_view(&bq, p.q.shape()),
                    nan_padded_view(&bk, p.k.shape()),
                    nan_padded_view(&bv, p.v.shape()),
                )
                .unwrap();
            let bits = |x: &Array4<f32>| x.mapv(f32::to_bits);
            prop_assert_eq!(bits(&padded.o), bits(&contiguous.o));
            prop_assert_eq!(
                padded.lse.mapv(f32::to_bits),
                contiguous.lse.mapv(f32::to_bits)
            );
            forward::check_output(&p, (&q, &k, &v), &padded.o, &padded.lse)?;
            Ok(())
        },
    );
}

/// The NaN contract: NaN or ±∞ at keys a row cannot see leaves that row as the oracle has it —
/// finite and within the tolerance rule of the unpoisoned problem — however the poisoned keys
/// share key blocks with rows that see them. (Not bit for bit: a block holding hidden
/// non-finite values is summed row by row, in another order than the tile's product.)
#[test]
fn hidden_non_finite_keys_change_no_row_that_cannot_see_them() {
    let cpu = Cpu::new();
    let strategy = prop_oneof![
        forward::hidden_key_problems(Variant::WindowAlibi, (8, 2, 64)),
        forward::hidden_key_problems(Variant::RightSoftcap, (9, 3, 3)),
        forward::hidden_key_problems(Variant::LeftBand, (16, 2, 200)),
    ];
    runner::check(
        "hidden_non_finite_keys_change_no_row_that_cannot_see_them",
        3 * cases(),
        Persist::No,
        strategy,
        |(p, offset, stride)| {
            let (poisoned, sees) = forward::poison_hidden_keys(&p, offset, stride);
            let (q, k, v) = (f32s(&poisoned.q), f32s(&poisoned.k), f32s(&poisoned.v));
            let out = cpu
                .try_forward(&p.spec, q.view(), k.view(), v.view())
                .unwrap();
            // Rows that see a poisoned key take the oracle's values here, so that the check of
            // the others is the ordinary one against the clean problem.
            let (cq, ck, cv) = (f32s(&p.q), f32s(&p.k), f32s(&p.v));
            let exact = gqa::oracle::forward(&p.spec, cq.view(), ck.view(), cv.view());
            let (mut o, mut lse) = (out.o.clone(), out.lse.clone());
            for ((b, h, i), &seen) in sees.indexed_iter() {
                if seen {
                    o.slice_mut(s![b, h, i, ..])
                        .zip_mut_with(&exact.o.slice(s![b, h, i, ..]), |x, &e| *x = e as f32);
                    lse[[b, h, i]] = exact.lse[[b, h, i]] as f32;
                }
            }
            forward::check_output(&p, (&cq, &ck, &cv), &o, &lse)?;
            Ok(())
        },
    );
}

/// Decode's NaN contract, bit for bit: an f32 cache holding NaN or ±∞ at keys some rows cannot
/// see gives those rows exactly what the same cache with the clean values gives.
#[test]
fn hidden_non_finite_cached_keys_change_no_row_that_cannot_see_them() {
    const HQ: usize = 8;
    const HKV: usize = 2;
    const D: usize = 72;
    let cpu = Cpu::new();
    let strategy = (
        prop_oneof![
            dec::case(dec::Variant::Window, HQ, HKV, D),
            dec::case(dec::Variant::RightSoftcap, HQ, HKV, D),
            dec::case(dec::Variant::LeftAlibi, HQ, HKV, D),
        ],
        0..4usize,
        1..4usize,
    );
    runner::check(
        "hidden_non_finite_cached_keys_change_no_row_that_cannot_see_them",
        3 * cases(),
        Persist::No,
        strategy,
        |(case, offset, stride)| {
            runner::log_case(dec::case_key(&case));
            let (poisoned, sees) = dec::poison_hidden_keys(&case, offset, stride);
            let q = case.q.mapv(|x| x as f32);
            let attention = Gqa::<HQ, HKV, D>::try_from(case.spec).unwrap();
            let run = |case: &Case| {
                let (cache, seqs) = fill::<HKV, D, Float32>(case);
                attention
                    .try_decode_cpu(&cpu, q.view(), &cache, &seqs)
                    .unwrap()
            };
            let (clean, dirty) = (run(&case), run(&poisoned));
            forward::unseen_rows_are_bit_identical(
                &sees,
                (&clean.o, &clean.lse),
                (&dirty.o, &dirty.lse),
            )?;
            let (cache, seqs) = fill::<HKV, D, Float32>(&case);
            check_decoded(&case, (&cache, &seqs), &q, (&clean.o, &clean.lse))?;
            Ok(())
        },
    );
}

/// Decode reads its queries through any strides: a query view inside a NaN-filled buffer gives
/// the contiguous result bit for bit.
#[test]
fn decode_of_nan_padded_queries_is_the_contiguous_result_bit_for_bit() {
    const HQ: usize = 9;
    const HKV: usize = 3;
    const D: usize = 3;
    let cpu = Cpu::new();
    runner::check(
        "decode_of_nan_padded_queries_is_the_contiguous_result_bit_for_bit",
        cases(),
        Persist::No,
        dec::case(dec::Variant::Everything, HQ, HKV, D),
        |case| {
            runner::log_case(dec::case_key(&case));
            let (cache, seqs) = fill::<HKV, D, Int8>(&case);
            let attention = Gqa::<HQ, HKV, D>::try_from(case.spec).unwrap();
            let q = f32s(&case.q);
            let big = f32s(&nan_padded(&case.q));
            let padded = nan_padded_view(&big, case.q.shape());
            let a = attention
                .try_decode_cpu(&cpu, q.view(), &cache, &seqs)
                .unwrap();
            let b = attention
                .try_decode_cpu(&cpu, padded, &cache, &seqs)
                .unwrap();
            prop_assert_eq!(a.o.mapv(f32::to_bits), b.o.mapv(f32::to_bits));
            prop_assert_eq!(a.lse.mapv(f32::to_bits), b.lse.mapv(f32::to_bits));
            Ok(())
        },
    );
}

/// Rows that see no key (bottom-right causal with more queries than keys) give 0 and LSE −∞
/// (by hand; the suites also force such rows in a quarter of their cases).
#[test]
fn fully_masked_rows_are_zero_with_minus_infinity_lse() {
    let spec = AttentionSpec::try_new(4, 1, 32)
        .unwrap()
        .with_mask(Mask::NONE.causal());
    let q = Array4::<f32>::ones((1, 4, 10, 32));
    let kv = Array4::<f32>::ones((1, 1, 3, 32));
    let out = Cpu::new()
        .try_forward(&spec, q.view(), kv.view(), kv.view())
        .unwrap();
    for h in 0..4 {
        for i in 0..7 {
            assert!(out.o.slice(s![0, h, i, ..]).iter().all(|&x| x == 0.0));
            assert_eq!(out.lse[[0, h, i]], f32::NEG_INFINITY);
        }
        assert_eq!(out.o[[0, h, 9, 0]], 1.0);
    }
}

/// Long key ranges (many key blocks, several query blocks per head, grouped and not) match
/// the oracle, on 1 and 2 threads with identical results.
#[test]
fn long_sequences_match_the_oracle_on_any_thread_count() {
    for (n, (spec, seq_q, seq_k)) in [
        (
            AttentionSpec::try_new(8, 2, 64)
                .unwrap()
                .with_mask(Mask::NONE.causal()),
            600,
            1500,
        ),
        (
            AttentionSpec::try_new(4, 4, 128)
                .unwrap()
                .with_mask(Mask::NONE.causal().window(700, 0))
                .with_alibi(),
            300,
            2000,
        ),
        (
            AttentionSpec::try_new(32, 1, 32)
                .unwrap()
                .try_with_softcap(30.0)
                .unwrap(),
            9,
            1100,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (hq, hkv, d) = (spec.q_heads(), spec.kv_heads(), spec.head_dim());
        let strategy = (
            tensor([1, hq, seq_q, d]),
            tensor([1, hkv, seq_k, d]),
            tensor([1, hkv, seq_k, d]),
        )
            .prop_map(move |(q, k, v)| Problem { spec, q, k, v });
        runner::check(
            &format!("long_sequences_match_the_oracle_on_any_thread_count/{n}"),
            1,
            Persist::No,
            strategy,
            |p| {
                let one = Cpu::with_threads(1).unwrap();
                let two = Cpu::with_threads(2).unwrap();
                forward::check::<f32, Cpu>(&two, &p)?;
                let (q, k, v) = (f32s(&p.q), f32s(&p.k), f32s(&p.v));
                let a = one
                    .try_forward(&p.spec, q.view(), k.view(), v.view())
                    .unwrap();
                let b = two
                    .try_forward(&p.spec, q.view(), k.view(), v.view())
                    .unwrap();
                prop_assert_eq!(a, b);
                Ok(())
            },
        );
    }
}

/// Packed tensors that are not the packing's are typed errors (and the packing's own run).
#[test]
fn varlen_bad_input_is_a_typed_error() {
    varlen::check_refusals(&Cpu::new());
}

/// Bad input is a typed error.
#[test]
fn bad_input_is_a_typed_error() {
    let cpu = Cpu::new();
    let spec = AttentionSpec::try_new(8, 2, 16).unwrap();
    let q = Array4::<f32>::zeros((1, 8, 4, 16));
    let k = Array4::<f32>::zeros((1, 4, 4, 16));
    assert!(matches!(
        cpu.try_forward(&spec, q.view(), k.view(), k.view()),
        Err(Error::Shape { tensor: "k", .. })
    ));
    assert!(matches!(
        Cpu::with_threads(0),
        Err(Error::DeviceLimit { .. })
    ));
    let attention = Gqa::<4, 2, 8>::new();
    let mut cache = attention
        .try_new_cache::<Int8>(Layout::Paged {
            page_size: 4,
            pages: 4,
        })
        .unwrap();
    let seq = cache.try_add_sequence().unwrap();
    let wrong = Array4::<f32>::zeros((2, 4, 1, 8));
    assert!(matches!(
        attention.try_decode_cpu(&cpu, wrong.view(), &cache, &[seq]),
        Err(Error::Shape { tensor: "q", .. })
    ));
    let wrong_spec = AttentionSpec::try_new(4, 4, 8).unwrap();
    let q = Array4::<f32>::zeros((1, 4, 1, 8));
    assert!(matches!(
        cpu.try_decode(&wrong_spec, q.view(), &cache, &[seq]),
        Err(Error::ConfigMismatch { .. })
    ));
    cache.try_drop_sequence(seq).unwrap();
    assert!(matches!(
        attention.try_decode_cpu(&cpu, q.view(), &cache, &[seq]),
        Err(Error::UnknownSequence { .. })
    ));
}

/// Long cached sequences (split over threads and merged) and typed partials: the CPU's
/// partials over a 3-way cut merge into its decode, which matches the oracle.
#[test]
fn split_decode_and_partials_match_the_oracle() {
    const HQ: usize = 8;
    const HKV: usize = 2;
    const D: usize = 64;
    let attention = Gqa::<HQ, HKV, D>::new().causal().window(1500, 0).alibi();
    let spec = *attention.spec();
    let lens = [3000usize, 37, 1200];
    let strategy = (
        proptest::collection::vec(tensor([1, HKV, 3000, D]), 2),
        tensor([3, HQ, 2, D]),
        0..3100usize,
        0..3100usize,
    )
        .prop_map(move |(kv, q, a, b)| {
            let kv = lens
                .iter()
                .map(|&len| {
                    let cut = |x: &Array4<f64>| x.slice(s![0, .., ..len, ..]).mapv(|y| y as f32);
                    (cut(&kv[0]), cut(&kv[1]))
                })
                .collect::<Vec<(Array3<f32>, Array3<f32>)>>();
            (
                Case {
                    spec,
                    page_size: 16,
                    seq_q: 2,
                    kv,
                    q,
                },
                a.min(b),
                a.max(b),
            )
        });
    runner::check(
        "split_decode_and_partials_match_the_oracle",
        2,
        Persist::No,
        strategy,
        |(case, cut1, cut2)| {
            let (cache, seqs) = fill::<HKV, D, Int8>(&case);
            let q = case.q.mapv(|x| x as f32);
            for threads in [1, 2] {
                let cpu = Cpu::with_threads(threads).unwrap();
                let out = attention
                    .try_decode_cpu(&cpu, q.view(), &cache, &seqs)
                    .unwrap();
                check_decoded(&case, (&cache, &seqs), &q, (&out.o, &out.lse))?;
                let parts: Vec<_> = [0..cut1, cut1..cut2, cut2..usize::MAX]
                    .into_iter()
                    .map(|keys| {
                        attention
                            .try_decode_partial_cpu(&cpu, q.view(), &cache, &seqs, keys)
                            .unwrap()
                    })
                    .collect();
                let whole = Partial::try_merge(&parts).unwrap();
                prop_assert!(whole.is_complete());
                let lse = whole.lse().mapv(|x| x as f32);
                check_decoded(&case, (&cache, &seqs), &q, (whole.o(), &lse))?;
                // Each partial against the oracle's partial over the same keys.
                for (part, keys) in parts.iter().zip([0..cut1, cut1..cut2, cut2..usize::MAX]) {
                    dec::check_partial(&spec, &q, (&cache, &seqs), keys, (part.o(), part.lse()))?;
                }
            }
            Ok(())
        },
    );
}

/// `try_forward_into` writes every element of outputs the caller owns (strided, pre-filled
/// with NaN) and gives `try_forward`'s result; wrong output shapes are typed errors.
#[test]
fn forward_into_caller_outputs_equals_forward() {
    let spec = AttentionSpec::try_new(6, 2, 16)
        .unwrap()
        .with_mask(Mask::NONE.causal());
    let q = Array4::from_shape_fn((2, 6, 9, 16), |(b, h, i, d)| {
        ((b + h * 3 + i * 5 + d) % 7) as f32 / 3.0 - 1.0
    });
    let kv = Array4::from_shape_fn((2, 2, 5, 16), |(b, h, i, d)| {
        ((b * 2 + h + i * 3 + d) % 5) as f32 / 2.0 - 1.0
    });
    let cpu = Cpu::new();
    let expected = cpu
        .try_forward(&spec, q.view(), kv.view(), kv.view())
        .unwrap();
    let mut o_big = Array4::<f32>::from_elem((2, 6, 9, 32), f32::NAN);
    let mut lse = Array3::<f32>::from_elem((2, 6, 9), f32::NAN);
    let inputs = (q.view(), kv.view(), kv.view());
    cpu.try_forward_into(
        &spec,
        inputs,
        o_big.slice_mut(s![.., .., .., ..;2]),
        lse.view_mut(),
    )
    .unwrap();
    assert_eq!(o_big.slice(s![.., .., .., ..;2]), expected.o);
    assert!(
        o_big
            .slice(s![.., .., .., 1..;2])
            .iter()
            .all(|x| x.is_nan())
    );
    assert_eq!(lse, expected.lse);
    let mut small = Array4::<f32>::zeros((2, 6, 8, 16));
    assert!(matches!(
        cpu.try_forward_into(&spec, inputs, small.view_mut(), lse.view_mut()),
        Err(Error::Shape { tensor: "o", .. })
    ));
}

/// One `Cpu` used from several threads at once — forwards and decodes interleaved, every
/// decode reading the same cache — gives bit-identical results to the same calls made one by
/// one.
#[test]
fn calls_from_several_threads_equal_the_same_calls_one_by_one() {
    const HQ: usize = 8;
    const HKV: usize = 2;
    const D: usize = 64;
    // Long enough that a tile's keys span several key blocks (where state shared between calls,
    // such as a block size, would change the rounding).
    let attention = Gqa::<HQ, HKV, D>::new().causal().softcap(20.0);
    let spec = *attention.spec();
    let strategy = || {
        (
            proptest::collection::vec(
                (
                    tensor([1, HQ, 40, D]),
                    tensor([1, HKV, 600, D]),
                    tensor([1, HKV, 600, D]),
                ),
                3,
            ),
            dec::case(dec::Variant::Everything, HQ, HKV, D),
        )
    };
    for cpu in [Cpu::new(), Cpu::with_threads(2).unwrap()] {
        runner::check(
            "calls_from_several_threads_equal_the_same_calls_one_by_one",
            1,
            Persist::No,
            strategy(),
            |(problems, case)| {
                let (cache, seqs) = fill::<HKV, D, Int4>(&case);
                let decode_spec = Gqa::<HQ, HKV, D>::try_from(case.spec).unwrap();
                let q_dec = f32s(&case.q);
                let forward = |n: usize| {
                    let (q, k, v) = &problems[n];
                    let (q, k, v) = (f32s(q), f32s(k), f32s(v));
                    let out = cpu
                        .try_forward(&spec, q.view(), k.view(), v.view())
                        .unwrap();
                    (out.o.mapv(f32::to_bits), out.lse.mapv(f32::to_bits))
                };
                let decode = || {
                    let out = decode_spec
                        .try_decode_cpu(&cpu, q_dec.view(), &cache, &seqs)
                        .unwrap();
                    (out.o.mapv(f32::to_bits), out.lse.mapv(f32::to_bits))
                };
                // Calls 0-2 are forwards, call 3 the decode of the shared cache.
                common::concurrent_calls_equal_one_by_one(
                    (4, 4, 3),
                    || (),
                    |_, n| if n == 3 { decode() } else { forward(n) },
                )
            },
        );
    }
}
