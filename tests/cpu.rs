//! The CPU backend (`gqa::cpu`) against the f64 oracle: the same problems and tolerance rule as
//! the GPU kernels (`tests/common/forward.rs`, `tests/common/decode.rs`), every configuration
//! of the shared list, plus strided NaN-padded inputs, fully masked rows, long key ranges,
//! thread counts, decode against every cache storage and typed partials.
//!
//! `GQA_CPU_CASES` sets the cases per configuration and variant (default 4); `GQA_CPU_RANDOM=1`
//! draws fresh cases instead of the fixed-seed ones CI runs.

#[macro_use]
mod common;

use common::decode::{self as dec, Case, check_decoded, fill};
use common::forward::{self, Variant};
use common::{Problem, nan_padded, nan_padded_view, tensor};
use gqa::cache::{BFloat16, Float16, Float32, Int4, Int8, KvStorage, Layout};
use gqa::cpu::{Cpu, CpuElement};
use gqa::partial::Partial;
use gqa::{AttentionSpec, Error, Gqa, Mask};
use half::{bf16, f16};
use ndarray::{Array3, Array4, s};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn runner() -> TestRunner {
    common::seeded_runner(common::env_cases("GQA_CPU_CASES", 4), "GQA_CPU_RANDOM")
}

fn run_forward<T: CpuElement>(variant: Variant, config: (usize, usize, usize)) {
    forward::run_variant::<T, Cpu>(&Cpu::new(), runner(), "cpu", variant, config);
}

fn run_decode<T: CpuElement, const HQ: usize, const HKV: usize, const D: usize, S: KvStorage>(
    variant: dec::Variant,
) where
    gqa::heads::Rule: gqa::heads::Supported<HQ, HKV, D> + gqa::heads::Supported<HKV, HKV, D>,
{
    let cpu = Cpu::new();
    dec::run_cases::<T, S>(
        runner(),
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
                run_forward::<f32>(Variant::Plain, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _causal_softcap_f32>]() {
                run_forward::<f32>(Variant::CausalSoftcap, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _window_alibi_f32>]() {
                run_forward::<f32>(Variant::WindowAlibi, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _everything_f16>]() {
                run_forward::<f16>(Variant::Everything, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _everything_bf16>]() {
                run_forward::<bf16>(Variant::Everything, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _decode_f32_cache>]() {
                run_decode::<f32, $hq, $hkv, $d, Float32>(dec::Variant::Causal);
            }
            #[test]
            fn [<$name _decode_f16_cache>]() {
                run_decode::<f32, $hq, $hkv, $d, Float16>(dec::Variant::CausalSoftcap);
            }
            #[test]
            fn [<$name _decode_bf16_cache>]() {
                run_decode::<f32, $hq, $hkv, $d, BFloat16>(dec::Variant::WindowAlibi);
            }
            #[test]
            fn [<$name _decode_int8_cache_f16_queries>]() {
                run_decode::<f16, $hq, $hkv, $d, Int8>(dec::Variant::Everything);
            }
            #[test]
            fn [<$name _decode_int4_cache>]() {
                run_decode::<f32, $hq, $hkv, $d, Int4>(dec::Variant::Causal);
            }
        }
    };
}

for_each_config!(cpu_tests);

/// Inputs as strided views into NaN-filled buffers give finite results identical to contiguous
/// inputs: nothing outside the views is read.
#[test]
fn nan_padded_inputs_give_the_contiguous_result() {
    let spec = AttentionSpec::try_new(12, 4, 80)
        .unwrap()
        .with_mask(Mask::NONE.causal().window(9, 0))
        .with_alibi();
    let q = Array4::from_shape_fn((2, 12, 45, 80), |(b, h, i, d)| {
        ((b * 3 + h * 7 + i * 11 + d * 13) % 19) as f64 / 9.0 - 1.0
    });
    let k = Array4::from_shape_fn((2, 4, 300, 80), |(b, h, i, d)| {
        ((b * 5 + h * 3 + i * 7 + d) % 23) as f64 / 11.0 - 1.0
    });
    let v = k.mapv(|x| 0.5 - x);
    let f32s = |x: &Array4<f64>| x.mapv(|y| y as f32);
    let cpu = Cpu::new();
    let contiguous = cpu
        .try_forward(&spec, f32s(&q).view(), f32s(&k).view(), f32s(&v).view())
        .unwrap();
    let (bq, bk, bv) = (
        f32s(&nan_padded(&q)),
        f32s(&nan_padded(&k)),
        f32s(&nan_padded(&v)),
    );
    let padded = cpu
        .try_forward(
            &spec,
            nan_padded_view(&bq, q.shape()),
            nan_padded_view(&bk, k.shape()),
            nan_padded_view(&bv, v.shape()),
        )
        .unwrap();
    assert!(padded.o.iter().all(|x| x.is_finite()));
    assert_eq!(padded.o, contiguous.o);
    assert_eq!(padded.lse, contiguous.lse);
}

/// Rows that see no key (bottom-right causal with more queries than keys) give 0 and LSE −∞.
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
    for (spec, seq_q, seq_k) in [
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
    ] {
        let (hq, hkv, d) = (spec.q_heads(), spec.kv_heads(), spec.head_dim());
        let strategy = (
            tensor([1, hq, seq_q, d]),
            tensor([1, hkv, seq_k, d]),
            tensor([1, hkv, seq_k, d]),
        )
            .prop_map(move |(q, k, v)| Problem { spec, q, k, v });
        let mut runner = TestRunner::new_with_rng(
            Config::with_cases(1),
            TestRng::deterministic_rng(RngAlgorithm::ChaCha),
        );
        runner
            .run(&strategy, |p| {
                let one = Cpu::with_threads(1).unwrap();
                let two = Cpu::with_threads(2).unwrap();
                forward::check::<f32, Cpu>(&two, &p)?;
                let f = |x: &Array4<f64>| x.mapv(|y| y as f32);
                let (q, k, v) = (f(&p.q), f(&p.k), f(&p.v));
                let a = one
                    .try_forward(&p.spec, q.view(), k.view(), v.view())
                    .unwrap();
                let b = two
                    .try_forward(&p.spec, q.view(), k.view(), v.view())
                    .unwrap();
                prop_assert_eq!(a, b);
                Ok(())
            })
            .unwrap();
    }
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
    let mut runner = TestRunner::new_with_rng(
        Config::with_cases(2),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    runner
        .run(&strategy, |(case, cut1, cut2)| {
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
        })
        .unwrap();
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
