//! The cubecl forward kernel against the f64 oracle, on whatever device `CubeDevice::try_default`
//! finds (Mesa's lavapipe in CI).
//!
//! Every configuration of the shared list runs five kernel specialisations — no mask; a
//! right-bounded band with softcap; a left-bounded band; a two-sided window with ALiBi (all
//! f32); and everything at once in f16 — each over drawn batch sizes (0 included), lengths
//! (0..=300, `seq_q > seq_k`, rows that see nothing), window sides up to `i64::MAX`, both
//! alignments, scales, caps, slopes and query magnitudes that give scores in the hundreds: all
//! runtime values of one compiled kernel, so the number of kernels compiled stays one per
//! configuration and specialisation (plus the split copy for long keys). Every result must pass
//! the tolerance rule per row (`gqa::oracle::compare_rows`).
//!
//! Without a device: in CI (`CI` set) the tests fail; elsewhere they say loudly that they were
//! skipped and which package provides a software device.
//!
//! `GQA_CUBE_CASES` sets the cases per configuration and specialisation (default 3); seeds come
//! from each test's name (`GQA_SEED`, `GQA_RANDOM=1`: see `tests/common/runner.rs`).

#[macro_use]
mod common;

use common::cube::{cases, device};
use common::forward::{self, Variant};
use common::runner::{self, Persist};
use common::varlen;
use common::*;
use gqa::cube::{CubeDevice, CubeElement, ForwardTile, KvLoads};
use gqa::{AttentionSpec, DType, Error, Mask};
use half::f16;
use ndarray::Array4;
use proptest::prelude::*;

fn run_variant<T: CubeElement>(test: &str, variant: Variant, config: (usize, usize, usize)) {
    let Some(device) = device() else { return };
    if !device.supports(T::DTYPE) {
        panic!(
            "{} does not support {}: the suite needs it",
            device.name(),
            T::DTYPE
        );
    }
    forward::run_variant::<T, CubeDevice>(device, (test, cases()), "cube", variant, config);
}

macro_rules! kernel_tests {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            #[test]
            fn [<$name _plain_f32_matches_the_oracle>]() {
                run_variant::<f32>(stringify!([<$name _plain_f32_matches_the_oracle>]), Variant::Plain, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _right_softcap_f32_matches_the_oracle>]() {
                run_variant::<f32>(stringify!([<$name _right_softcap_f32_matches_the_oracle>]), Variant::RightSoftcap, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _left_band_f32_matches_the_oracle>]() {
                run_variant::<f32>(stringify!([<$name _left_band_f32_matches_the_oracle>]), Variant::LeftBand, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _window_alibi_f32_matches_the_oracle>]() {
                run_variant::<f32>(stringify!([<$name _window_alibi_f32_matches_the_oracle>]), Variant::WindowAlibi, ($hq, $hkv, $d));
            }
            #[test]
            fn [<$name _everything_f16_matches_the_oracle>]() {
                run_variant::<f16>(stringify!([<$name _everything_f16_matches_the_oracle>]), Variant::Everything, ($hq, $hkv, $d));
            }
        }
    };
}

for_each_config!(kernel_tests);

/// The untuned tile is what every test above runs; these run the kernel cut otherwise — one row
/// and one key per unit, a tile that divides neither the head dims nor the lengths, and every
/// tile autotune times (at head dims up to 128; above, the same shapes with fewer rows), with
/// each way of loading K and V the device runs — over every mask side, softcap and ALiBi
/// (`Variant::Everything`, f16) and with none. The configurations include a group of 3 (plane
/// loads pad its cube with units that own no rows) and head dims of 5 and 12 (padded to whole
/// chunks of 8 channels).
#[test]
fn every_forward_tile_matches_the_oracle() {
    let Some(device) = device() else { return };
    let mut loads = vec![KvLoads::Uniform];
    if device.plane_loads() {
        loads.push(KvLoads::Plane);
    } else {
        eprintln!(
            "{}: plane loads do not run here; only uniform tiles tested",
            device.name()
        );
    }
    let mut tiles = Vec::new();
    for loads in loads {
        tiles.push(ForwardTile {
            rows: 1,
            block_n: 1,
            loads,
        });
        tiles.push(ForwardTile {
            rows: 3,
            block_n: 5,
            loads,
        });
    }
    tiles.extend(
        ForwardTile::candidates(64)
            .into_iter()
            .filter(|tile| tile.loads == KvLoads::Uniform || device.plane_loads()),
    );
    for tile in tiles {
        let tiled = CubeDevice::try_default()
            .and_then(|device| device.try_with_forward_tile(tile))
            .expect("the device again, with a tile");
        assert_eq!(tiled.pinned_forward_tile(), Some(tile));
        for config in [(4, 2, 8), (3, 1, 5), (6, 2, 12), (8, 2, 64)] {
            let test = format!("every_forward_tile_matches_the_oracle/{tile}/{config:?}");
            forward::run_variant::<f32, CubeDevice>(
                &tiled,
                (&test, cases()),
                "cube tile",
                Variant::Plain,
                config,
            );
            forward::run_variant::<f16, CubeDevice>(
                &tiled,
                (&test, cases()),
                "cube tile",
                Variant::Everything,
                config,
            );
        }
    }
}

/// lavapipe's subgroup broadcasts work, so the probe run when a device opens must find plane
/// loads there, and the untuned tile must use them: were the probe to stop finding so, every
/// launch would fall back to uniform loads, twice as slow there, and no other test would notice.
#[test]
fn lavapipe_runs_plane_loads() {
    let Some(device) = device() else { return };
    if !device.name().contains("llvmpipe") {
        eprintln!("{}: not lavapipe; nothing to check", device.name());
        return;
    }
    assert!(device.plane_loads(), "{}", device.name());
    for head_dim in [1, 64, 128, 256] {
        assert_eq!(device.untuned_forward_tile(head_dim).loads, KvLoads::Plane);
    }
}

/// `try_forward_into` overwrites every element of outputs it is handed (here: outputs that hold
/// another problem's result) with exactly what `try_forward_device` returns, launch after launch;
/// outputs of the wrong shape are a typed error.
#[test]
fn forward_into_reused_outputs_equals_forward() {
    let Some(device) = device() else { return };
    let spec = AttentionSpec::try_new(6, 2, 24)
        .unwrap()
        .with_mask(Mask::NONE.causal())
        .with_alibi();
    let host = |seed: usize, heads: usize, len: usize| {
        Array4::from_shape_fn((2, heads, len, 24), |(b, h, i, d)| {
            ((b * 7 + h * 5 + i * 3 + d + seed) % 23) as f64 / 11.0 - 1.0
        })
    };
    let input = |seed: usize, heads: usize, len: usize| {
        device
            .try_upload(f32s(&host(seed, heads, len)).view())
            .unwrap()
    };
    let bits = |x: &gqa::cube::DeviceTensor<f32>| -> Vec<u32> {
        device
            .try_download(x)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let mut out = device.try_forward_output::<f32>(&spec, 2, 40).unwrap();
    for seed in 0..3 {
        // The fresh path against the oracle (the tolerance rule), then the reused outputs
        // against the fresh path, bit for bit.
        let problem = Problem {
            spec,
            q: host(seed, 6, 40),
            k: host(seed + 1, 2, 70),
            v: host(seed + 2, 2, 70),
        };
        forward::check::<f32, CubeDevice>(device, &problem).unwrap();
        let (q, k, v) = (
            input(seed, 6, 40),
            input(seed + 1, 2, 70),
            input(seed + 2, 2, 70),
        );
        device
            .try_forward_into(&spec, &q, &k, &v, &mut out)
            .unwrap();
        let fresh = device.try_forward_device(&spec, &q, &k, &v).unwrap();
        assert_eq!(bits(&out.o), bits(&fresh.o), "o, launch {seed}");
        assert_eq!(bits(&out.lse), bits(&fresh.lse), "lse, launch {seed}");
    }
    let (q, k) = (input(0, 6, 41), input(1, 2, 70));
    let refused = device.try_forward_into(&spec, &q, &k, &k, &mut out);
    assert!(
        matches!(refused, Err(Error::Shape { tensor: "o", .. })),
        "{refused:?}"
    );
}

/// A tile of no rows or keys, or larger than the kernel takes, is refused.
#[test]
fn a_forward_tile_out_of_range_is_refused() {
    let Some(_) = device() else { return };
    for (rows, block_n) in [(0, 4), (4, 0), (17, 4), (4, 17)] {
        let tile = ForwardTile {
            rows,
            block_n,
            loads: KvLoads::Uniform,
        };
        let refused = CubeDevice::try_default()
            .unwrap()
            .try_with_forward_tile(tile);
        assert!(
            matches!(refused, Err(Error::DeviceLimit { .. })),
            "{tile:?}: {refused:?}"
        );
    }
}

/// Autotune, the default: a key's first launch times the candidate tiles and settles on one of
/// them, whose results pass the tolerance rule (drawn problems, each a key, and a second
/// problem of a tuned key); f16 is another key; a device with a pinned tile never tunes.
#[test]
fn autotune_settles_on_a_candidate_that_matches_the_oracle() {
    let Some(_) = device() else { return };
    let tuned = CubeDevice::try_default().unwrap();
    assert_eq!(tuned.pinned_forward_tile(), None);
    let test = "autotune_settles_on_a_candidate_that_matches_the_oracle";
    forward::run_variant::<f32, CubeDevice>(
        &tuned,
        (test, cases()),
        "cube autotune",
        Variant::Plain,
        (4, 2, 8),
    );
    let spec = AttentionSpec::try_new(6, 2, 24)
        .unwrap()
        .with_mask(Mask::NONE.causal());
    let host = |seed: usize, heads: usize, len: usize| {
        Array4::from_shape_fn((2, heads, len, 24), |(b, h, i, d)| {
            ((b * 7 + h * 5 + i * 3 + d + seed) % 23) as f64 / 11.0 - 1.0
        })
    };
    assert_eq!(tuned.tuned_forward_tile::<f32>(&spec, 2, 40, 70), None);
    for (seed, (seq_q, seq_k)) in [(40, 70), (33, 65)].into_iter().enumerate() {
        let problem = Problem {
            spec,
            q: host(seed, 6, seq_q),
            k: host(seed + 1, 2, seq_k),
            v: host(seed + 2, 2, seq_k),
        };
        forward::check::<f32, CubeDevice>(&tuned, &problem).unwrap();
    }
    // (40, 70) and (33, 65) share a key: lengths are bucketed by powers of two.
    let tile = tuned.tuned_forward_tile::<f32>(&spec, 2, 40, 70);
    assert!(
        tile.is_some_and(|tile| ForwardTile::candidates(24).contains(&tile)),
        "{tile:?}"
    );
    assert_eq!(tuned.tuned_forward_tile::<f32>(&spec, 2, 33, 65), tile);
    assert_eq!(tuned.tuned_forward_tile::<f16>(&spec, 2, 40, 70), None);

    let pinned = CubeDevice::try_default()
        .and_then(|device| {
            device.try_with_forward_tile(ForwardTile {
                rows: 2,
                block_n: 4,
                loads: KvLoads::Uniform,
            })
        })
        .unwrap();
    let problem = Problem {
        spec,
        q: host(0, 6, 200),
        k: host(1, 2, 10),
        v: host(2, 2, 10),
    };
    forward::check::<f32, CubeDevice>(&pinned, &problem).unwrap();
    assert_eq!(tuned.tuned_forward_tile::<f32>(&spec, 2, 200, 10), None);
}

fn f32s(x: &Array4<f64>) -> Array4<f32> {
    x.mapv(|y| y as f32)
}

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

/// `x` on the device as a view into a NaN-filled buffer, with padded strides on every axis
/// after a NaN prefix.
fn upload_nan_padded(device: &CubeDevice, x: &Array4<f64>) -> gqa::cube::DeviceTensor<f32> {
    let big = nan_padded(x).mapv(|y| y as f32);
    let shape: Vec<usize> = big.shape().to_vec();
    let strides: Vec<usize> = (0..4)
        .map(|a| 2 * shape[a + 1..].iter().product::<usize>())
        .collect();
    let offset: usize = strides.iter().map(|s| s / 2).sum();
    let buffer: Vec<f32> = big.iter().copied().collect();
    device
        .try_upload_strided(&buffer, offset, x.shape(), &strides)
        .unwrap()
}

/// Inputs placed inside larger NaN-filled buffers, with padded strides on every axis, give
/// results bit-identical to contiguous inputs, on drawn shapes (more queries than keys, rows
/// that see nothing, zero sizes): no read outside the views.
#[test]
fn nan_padded_inputs_give_the_contiguous_result_bit_for_bit() {
    let Some(device) = device() else { return };
    // Specialisations the configuration tests compile anyway: no new kernel.
    let strategy = prop_oneof![
        forward::problems(Variant::WindowAlibi, 12, 4, 80),
        forward::problems(Variant::RightSoftcap, 9, 3, 3),
    ];
    runner::check(
        "nan_padded_inputs_give_the_contiguous_result_bit_for_bit",
        2 * cases(),
        Persist::No,
        strategy,
        |p| {
            runner::log_case(forward::case_key(&p));
            let (q, k, v) = (f32s(&p.q), f32s(&p.k), f32s(&p.v));
            let contiguous = device
                .try_forward(&p.spec, q.view(), k.view(), v.view())
                .unwrap();
            let (qd, kd, vd) = (
                upload_nan_padded(device, &p.q),
                upload_nan_padded(device, &p.k),
                upload_nan_padded(device, &p.v),
            );
            let out = device.try_forward_device(&p.spec, &qd, &kd, &vd).unwrap();
            let o = device.try_download(&out.o).unwrap();
            let lse = device.try_download(&out.lse).unwrap();
            prop_assert_eq!(
                o.mapv(f32::to_bits),
                contiguous.o.mapv(f32::to_bits).into_dyn()
            );
            prop_assert_eq!(
                lse.mapv(f32::to_bits),
                contiguous.lse.mapv(f32::to_bits).into_dyn()
            );
            forward::check_output(&p, (&q, &k, &v), &contiguous.o, &contiguous.lse)?;
            Ok(())
        },
    );
}

/// The NaN contract, bit for bit: NaN or ±∞ at keys a row cannot see — loaded into the same
/// shared-memory tiles as the keys it sees — leave that row exactly as the clean input gives it.
#[test]
fn hidden_non_finite_keys_change_no_row_that_cannot_see_them() {
    let Some(device) = device() else { return };
    let strategy = prop_oneof![
        forward::hidden_key_problems(Variant::WindowAlibi, (8, 2, 64)),
        forward::hidden_key_problems(Variant::LeftBand, (9, 3, 3)),
        forward::hidden_key_problems(Variant::RightSoftcap, (16, 2, 200)),
    ];
    runner::check(
        "hidden_non_finite_keys_change_no_row_that_cannot_see_them",
        2 * cases(),
        Persist::No,
        strategy,
        |(p, offset, stride)| {
            runner::log_case(forward::case_key(&p));
            let (poisoned, sees) = forward::poison_hidden_keys(&p, offset, stride);
            let run = |p: &Problem| {
                let (q, k, v) = (f32s(&p.q), f32s(&p.k), f32s(&p.v));
                device
                    .try_forward(&p.spec, q.view(), k.view(), v.view())
                    .unwrap()
            };
            let (clean, dirty) = (run(&p), run(&poisoned));
            forward::unseen_rows_are_bit_identical(
                &sees,
                (&clean.o, &clean.lse),
                (&dirty.o, &dirty.lse),
            )?;
            let (q, k, v) = (f32s(&p.q), f32s(&p.k), f32s(&p.v));
            forward::check_output(&p, (&q, &k, &v), &clean.o, &clean.lse)?;
            Ok(())
        },
    );
}

/// Rows that see no key (bottom-right causal with more queries than keys) give 0 and LSE −∞
/// (by hand; the suites also force such rows in a quarter of their cases).
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
/// oracle like short ones: prefill over 30 000 keys (two splits of the untuned tile at head dim
/// 64 on lavapipe), a decode step over 30 000, and 8000 keys at head dim 256 (two splits).
#[test]
fn long_key_ranges_match_the_oracle() {
    let Some(device) = device() else { return };
    for (n, (spec, seq_q, seq_k)) in [
        (
            AttentionSpec::try_new(8, 2, 64)
                .unwrap()
                .with_mask(Mask::NONE.causal()),
            37,
            30_000,
        ),
        (
            AttentionSpec::try_new(8, 2, 64)
                .unwrap()
                .with_mask(Mask::NONE.causal())
                .with_alibi(),
            1,
            30_000,
        ),
        (
            AttentionSpec::try_new(4, 4, 256)
                .unwrap()
                .try_with_softcap(30.0)
                .unwrap(),
            5,
            8000,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (hq, hkv, d) = (spec.q_heads(), spec.kv_heads(), spec.head_dim());
        // The split path is what this test is for: on lavapipe every case must split (lengths
        // that stopped splitting after a change of tile once left it untested).
        let splits = device
            .forward_key_splits(&spec, device.untuned_forward_tile(d), seq_k)
            .unwrap();
        if device.name().contains("llvmpipe") {
            assert!(splits > 1, "case {n}: {seq_k} keys in one split");
        }
        let strategy = (
            tensor([1, hq, seq_q, d]),
            tensor([1, hkv, seq_k, d]),
            tensor([1, hkv, seq_k, d]),
        )
            .prop_map(move |(q, k, v)| Problem { spec, q, k, v });
        runner::check(
            &format!("long_key_ranges_match_the_oracle/{n}"),
            1,
            Persist::No,
            strategy,
            |p| forward::check::<f32, CubeDevice>(device, &p).map(|_| ()),
        );
    }
}

/// Packed variable-length prefill (`try_forward_varlen`): one kernel specialisation per line,
/// each a different configuration (MHA, GQA, MQA; head dims 3 to 128), over drawn packings —
/// empty sequences, sequences without keys, query and key lengths paired freely, tile edges —
/// with one sequence's inputs all NaN in a third of the cases (every other sequence must still
/// match its oracle: no tile strays past its sequence).
#[test]
fn varlen_matches_the_oracle_sequence_by_sequence() {
    let Some(device) = device() else { return };
    let test = "varlen_matches_the_oracle_sequence_by_sequence";
    let run = |n: usize, variant, config| {
        let test = format!("{test}/{n}");
        varlen::run_variant::<f32, CubeDevice>(device, (&test, cases()), "cube", variant, config)
    };
    run(0, Variant::RightSoftcap, (8, 2, 64));
    run(1, Variant::WindowAlibi, (9, 3, 3));
    run(2, Variant::Plain, (16, 1, 17));
    run(3, Variant::LeftBand, (32, 8, 128));
    let test = format!("{test}/4");
    varlen::run_variant::<f16, CubeDevice>(
        device,
        (&test, cases()),
        "cube",
        Variant::Everything,
        (4, 4, 32),
    );
}

/// Packed tensors that are not the packing's are typed errors (and the packing's own run).
#[test]
fn varlen_bad_input_is_a_typed_error() {
    let Some(device) = device() else { return };
    varlen::check_refusals(device);
}

/// A packed sequence longer than one split (lavapipe's loop limit) is split and merged like a
/// batch entry: 30 000 keys in the second of three sequences, causal in both alignments.
#[test]
fn varlen_long_sequences_are_split_and_match_the_oracle() {
    let Some(device) = device() else { return };
    for (n, mask) in [
        Mask::NONE.causal(),
        Mask::NONE.causal().aligned(gqa::Alignment::TopLeft),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = AttentionSpec::try_new(8, 2, 64).unwrap().with_mask(mask);
        if device.name().contains("llvmpipe") {
            let splits = device
                .forward_key_splits(&spec, device.untuned_forward_tile(64), 30_000)
                .unwrap();
            assert!(splits > 1, "30 000 keys in one split");
        }
        let packing =
            gqa::spec::Varlen::try_new(&[0, 5, 42, 50], &[0, 70, 30_070, 30_100]).unwrap();
        let strategy = (
            tensor([1, 8, packing.total_q(), 64]),
            tensor([1, 2, packing.total_k(), 64]),
            tensor([1, 2, packing.total_k(), 64]),
        )
            .prop_map(move |(q, k, v)| varlen::Packed {
                problem: Problem { spec, q, k, v },
                packing: packing.clone(),
                poisoned: None,
            });
        runner::check(
            &format!("varlen_long_sequences_are_split_and_match_the_oracle/{n}"),
            1,
            Persist::No,
            strategy,
            |p| varlen::check::<f32, CubeDevice>(device, &p).map(|_| ()),
        );
    }
}

/// One `CubeDevice` used from several threads at once gives bit-identical results to the same
/// launches made one by one.
#[test]
fn launches_from_several_threads_equal_the_same_launches_one_by_one() {
    let Some(device) = device() else { return };
    let strategy = proptest::collection::vec(forward::problems(Variant::WindowAlibi, 8, 2, 64), 4);
    runner::check(
        "launches_from_several_threads_equal_the_same_launches_one_by_one",
        1,
        Persist::No,
        strategy,
        |problems| {
            let run = |n: usize| {
                let p = &problems[n];
                let (q, k, v) = (f32s(&p.q), f32s(&p.k), f32s(&p.v));
                let out = device
                    .try_forward(&p.spec, q.view(), k.view(), v.view())
                    .unwrap();
                (out.o.mapv(f32::to_bits), out.lse.mapv(f32::to_bits))
            };
            common::concurrent_calls_equal_one_by_one((4, 4, 4), || (), |_, n| run(n))
        },
    );
}
