//! The cubecl forward kernel against the f64 oracle, on whatever device `CubeDevice::try_default`
//! finds (Mesa's lavapipe in CI).
//!
//! Every configuration of the shared list runs four kernel specialisations — no mask; causal +
//! softcap; sliding window + ALiBi (both in f32); and everything at once in f16 — each over
//! random batch sizes, lengths (1..=300, `seq_q = 1` and `seq_q > seq_k` included), window sides,
//! scales, caps, slopes and alignments, all of which are runtime values of one compiled kernel.
//! Every result must pass the tolerance rule (`gqa::oracle::compare`).
//!
//! Without a device: in CI (`CI` set) the tests fail; elsewhere they say loudly that they were
//! skipped and which package provides a software device.
//!
//! `GQA_CUBE_CASES` sets the cases per configuration and specialisation (default 3);
//! `GQA_CUBE_RANDOM=1` draws fresh cases instead of the fixed-seed ones CI runs.

#[macro_use]
mod common;

use common::cube::{cases, device, runner};
use common::forward::{self, Variant};
use common::*;
use gqa::cube::{CubeDevice, CubeElement};
use gqa::{AttentionSpec, DType, Error, Mask};
use half::f16;
use ndarray::Array4;
use proptest::prelude::*;

fn run_variant<T: CubeElement>(variant: Variant, q_heads: usize, kv_heads: usize, head_dim: usize) {
    let Some(device) = device() else { return };
    if !device.supports(T::DTYPE) {
        panic!(
            "{} does not support {}: the suite needs it",
            device.name(),
            T::DTYPE
        );
    }
    forward::run_variant::<T, CubeDevice>(
        device,
        runner(cases()),
        "cube",
        variant,
        (q_heads, kv_heads, head_dim),
    );
}

macro_rules! kernel_tests {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            #[test]
            fn [<$name _plain_f32_matches_the_oracle>]() {
                run_variant::<f32>(Variant::Plain, $hq, $hkv, $d);
            }
            #[test]
            fn [<$name _causal_softcap_f32_matches_the_oracle>]() {
                run_variant::<f32>(Variant::CausalSoftcap, $hq, $hkv, $d);
            }
            #[test]
            fn [<$name _window_alibi_f32_matches_the_oracle>]() {
                run_variant::<f32>(Variant::WindowAlibi, $hq, $hkv, $d);
            }
            #[test]
            fn [<$name _everything_f16_matches_the_oracle>]() {
                run_variant::<f16>(Variant::Everything, $hq, $hkv, $d);
            }
        }
    };
}

for_each_config!(kernel_tests);

/// Two launches of the same problem give bit-identical results.
#[test]
fn launches_are_deterministic() {
    let Some(device) = device() else { return };
    let spec = AttentionSpec::try_new(8, 2, 64)
        .unwrap()
        .with_mask(Mask::NONE.causal())
        .try_with_softcap(20.0)
        .unwrap();
    let q = Array4::from_shape_fn((2, 8, 77, 64), |(b, h, i, d)| {
        ((b * 7 + h * 5 + i * 3 + d) % 17) as f32 / 8.0 - 1.0
    });
    let kv = Array4::from_shape_fn((2, 2, 131, 64), |(b, h, i, d)| {
        ((b + h * 3 + i * 7 + d * 5) % 13) as f32 / 6.0 - 1.0
    });
    let first = device
        .try_forward(&spec, q.view(), kv.view(), kv.view())
        .unwrap();
    let second = device
        .try_forward(&spec, q.view(), kv.view(), kv.view())
        .unwrap();
    assert!(
        first
            .o
            .iter()
            .zip(&second.o)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(
        first
            .lse
            .iter()
            .zip(&second.lse)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

/// Inputs placed inside larger NaN-filled buffers, with padded strides on every axis, give
/// finite results identical to contiguous inputs: no read outside the views.
#[test]
fn nan_padded_inputs_give_the_contiguous_result() {
    let Some(device) = device() else { return };
    let spec = AttentionSpec::try_new(12, 4, 80)
        .unwrap()
        .with_mask(Mask::NONE.causal().window(9, 0))
        .with_alibi();
    let q = Array4::from_shape_fn((2, 12, 45, 80), |(b, h, i, d)| {
        ((b * 3 + h * 7 + i * 11 + d * 13) % 19) as f32 / 9.0 - 1.0
    });
    let k = Array4::from_shape_fn((2, 4, 70, 80), |(b, h, i, d)| {
        ((b * 5 + h * 3 + i * 7 + d) % 23) as f32 / 11.0 - 1.0
    });
    let v = k.mapv(|x| 0.5 - x);
    let contiguous = device
        .try_forward(&spec, q.view(), k.view(), v.view())
        .unwrap();
    let padded = |x: &Array4<f32>| {
        // Data at odd indices of a (2n + 1)-sized NaN buffer on every axis, after a NaN prefix.
        let big = nan_padded(&x.mapv(f64::from)).mapv(|y| y as f32);
        let shape: Vec<usize> = big.shape().to_vec();
        let strides: Vec<usize> = (0..4)
            .map(|a| 2 * shape[a + 1..].iter().product::<usize>())
            .collect();
        let offset: usize = strides.iter().map(|s| s / 2).sum();
        let buffer: Vec<f32> = big.iter().copied().collect();
        device
            .try_upload_strided(&buffer, offset, x.shape(), &strides)
            .unwrap()
    };
    let (qd, kd, vd) = (padded(&q), padded(&k), padded(&v));
    let out = device.try_forward_device(&spec, &qd, &kd, &vd).unwrap();
    let o = device.try_download(&out.o).unwrap();
    let lse = device.try_download(&out.lse).unwrap();
    assert!(o.iter().all(|x| x.is_finite()));
    assert_eq!(
        o.into_dimensionality::<ndarray::Ix4>().unwrap(),
        contiguous.o
    );
    assert_eq!(
        lse.into_dimensionality::<ndarray::Ix3>().unwrap(),
        contiguous.lse
    );
}

/// Rows that see no key (bottom-right causal with more queries than keys) give 0 and LSE −∞.
#[test]
fn fully_masked_rows_are_zero_with_minus_infinity_lse() {
    let Some(device) = device() else { return };
    let spec = AttentionSpec::try_new(4, 1, 32)
        .unwrap()
        .with_mask(Mask::NONE.causal());
    let q = Array4::<f32>::ones((1, 4, 10, 32));
    let kv = Array4::<f32>::ones((1, 1, 3, 32));
    let out = device
        .try_forward(&spec, q.view(), kv.view(), kv.view())
        .unwrap();
    for h in 0..4 {
        for i in 0..7 {
            assert!(
                out.o
                    .slice(ndarray::s![0, h, i, ..])
                    .iter()
                    .all(|&x| x == 0.0)
            );
            assert_eq!(out.lse[[0, h, i]], f32::NEG_INFINITY);
        }
        assert_eq!(out.o[[0, h, 9, 0]], 1.0);
    }
}

/// Bad input is a typed error, checked before anything runs.
#[test]
fn bad_input_is_a_typed_error() {
    let Some(device) = device() else { return };
    let spec = AttentionSpec::try_new(8, 2, 16).unwrap();
    let q = Array4::<f32>::zeros((1, 8, 4, 16));
    let k = Array4::<f32>::zeros((1, 4, 4, 16));
    assert!(matches!(
        device.try_forward(&spec, q.view(), k.view(), k.view()),
        Err(Error::Shape { tensor: "k", .. })
    ));
    let outside = device.try_upload_strided(&[0f32; 10], 4, &[1, 1, 2, 4], &[8, 8, 4, 1]);
    assert!(
        matches!(outside, Err(Error::Shape { tensor: "view", .. })),
        "{outside:?}"
    );
    if !device.supports(DType::BF16) {
        let q = Array4::<half::bf16>::zeros((1, 8, 4, 16));
        let k = Array4::<half::bf16>::zeros((1, 2, 4, 16));
        let err = device
            .try_forward(&spec, q.view(), k.view(), k.view())
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnsupportedDType {
                    dtype: DType::BF16,
                    ..
                }
            ),
            "{err}"
        );
    }
}

/// Long key ranges (which lavapipe makes the host split over several cubes and merge) match the
/// oracle like short ones: prefill over 3000 keys and a decode step over 5000.
#[test]
fn long_key_ranges_match_the_oracle() {
    let Some(device) = device() else { return };
    for (spec, seq_q, seq_k) in [
        (
            AttentionSpec::try_new(8, 2, 64)
                .unwrap()
                .with_mask(Mask::NONE.causal()),
            37,
            3000,
        ),
        (
            AttentionSpec::try_new(8, 2, 64)
                .unwrap()
                .with_mask(Mask::NONE.causal())
                .with_alibi(),
            1,
            5000,
        ),
        (
            AttentionSpec::try_new(4, 4, 256)
                .unwrap()
                .try_with_softcap(30.0)
                .unwrap(),
            5,
            700,
        ),
    ] {
        let (hq, hkv, d) = (spec.q_heads(), spec.kv_heads(), spec.head_dim());
        let mut runner = runner(1);
        let strategy = (
            tensor([1, hq, seq_q, d]),
            tensor([1, hkv, seq_k, d]),
            tensor([1, hkv, seq_k, d]),
        )
            .prop_map(move |(q, k, v)| Problem { spec, q, k, v });
        runner
            .run(&strategy, |p| {
                forward::check::<f32, CubeDevice>(device, &p).map(|_| ())
            })
            .unwrap();
    }
}
