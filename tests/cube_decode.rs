//! The cubecl decode kernel against the f64 oracle, on whatever device `CubeDevice::try_default`
//! finds (Mesa's lavapipe in CI).
//!
//! For every configuration of the shared list and every cache storage (f32, f16, bf16, int8,
//! int4): a batch of 0–3 sequences of different lengths (0..=300 tokens) in a paged cache
//! (page size 1..=32, pages interleaved between sequences and fragmented by a dropped, poisoned
//! one), 0–16 new queries per sequence, and one kernel specialisation per storage (no mask; a
//! right-bounded band with softcap; a left-bounded band with ALiBi; everything; a two-sided
//! window), with the alignment, the sides (up to `i64::MAX`), scales and magnitudes drawn. Long
//! sequences are split over several cubes and merged, so split-KV is exercised wherever the
//! device's split rule cuts (on lavapipe: above 256 keys, and above ~150 keys at D = 128).
//!
//! The yardstick is the oracle run on the cache's *stored* (dequantized) rows, under the
//! tolerance rule per row; against the unquantized input the error must stay within the
//! storage's derived bound (`tests/common/decode.rs::storage_bound`).
//!
//! `GQA_CUBE_CASES`, `GQA_SEED` and `GQA_RANDOM` work as in `cube_forward.rs`.

#[macro_use]
mod common;

use common::cube::{cases, device};
use common::decode::*;
use common::runner::{self, Persist};
use gqa::cache::{BFloat16, Float16, Float32, Int4, Int8, KvCache, KvStorage, Layout};
use gqa::cube::{CubeDevice, CubeElement};
use gqa::{AttentionSpec, DType, Error, Mask};
use half::f16;
use ndarray::{Array3, Array4, s};
use proptest::prelude::*;

/// A filled cache, its sequences, and a decode's (o, lse) on the host.
type Decoded<const HKV: usize, const D: usize, S, T> = (
    KvCache<HKV, D, S>,
    Vec<gqa::cache::SeqId>,
    Array4<T>,
    Array3<f32>,
);

/// Decodes `case` on the device from a cache filled by `fill`: (o, lse) on the host.
fn decode<T: CubeElement, const HKV: usize, const D: usize, S: KvStorage>(
    device: &CubeDevice,
    case: &Case,
    q: &Array4<T>,
) -> Result<Decoded<HKV, D, S, T>, TestCaseError>
where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    let (cache, seqs) = fill::<HKV, D, S>(case);
    let mut copy = device.try_upload_cache(&cache).unwrap();
    let q_device = device.try_upload(q.view()).unwrap();
    let out = device
        .try_decode(&case.spec, &q_device, &cache, &mut copy, &seqs)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let o = device
        .try_download(&out.o)
        .unwrap()
        .into_dimensionality()
        .unwrap();
    let lse = device
        .try_download(&out.lse)
        .unwrap()
        .into_dimensionality()
        .unwrap();
    Ok((cache, seqs, o, lse))
}

fn check<T: CubeElement, const HKV: usize, const D: usize, S: KvStorage>(
    device: &CubeDevice,
    case: &Case,
) -> Result<Worst, TestCaseError>
where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    let q = case.q.mapv(T::narrow);
    let (cache, seqs, o, lse) = decode::<T, HKV, D, S>(device, case, &q)?;
    check_decoded(case, (&cache, &seqs), &q, (&o, &lse))
}

fn run<T: CubeElement, const HQ: usize, const HKV: usize, const D: usize, S: KvStorage>(
    test: &str,
    variant: Variant,
) where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    let Some(device) = device() else { return };
    run_on::<T, HQ, HKV, D, S>(device, "decode", test, variant);
}

fn run_on<T: CubeElement, const HQ: usize, const HKV: usize, const D: usize, S: KvStorage>(
    device: &CubeDevice,
    label: &str,
    test: &str,
    variant: Variant,
) where
    gqa::heads::Rule: gqa::heads::Supported<HKV, HKV, D>,
{
    run_cases::<T, S>((test, cases()), label, variant, (HQ, HKV, D), |c| {
        check::<T, HKV, D, S>(device, &c)
    });
}

/// The tests above run the device's default decode layout: on lavapipe (and wherever a probe
/// finds the device's plane sums right) the plane kernel, its lanes across the head dim. The
/// per-unit layout, what devices without plane reductions run, is forced here on a few
/// configurations and storages: an MHA, two GQA groups, an MQA of 16 query heads with a head
/// dim of 17 (a partial last word in every packed row) and every mask variant.
#[test]
fn unit_layout_decodes_match_the_oracle() {
    let Some(device) = device() else { return };
    if device.plane_decode_lanes().is_none() {
        eprintln!(
            "{}: the suite's default layout is the unit one already",
            device.name()
        );
    }
    let unit = CubeDevice::try_default()
        .expect("the device again")
        .untuned()
        .with_unit_decode();
    assert_eq!(unit.plane_decode_lanes(), None);
    let test = "unit_layout_decodes_match_the_oracle";
    run_on::<f32, 4, 4, 32, Float16>(&unit, "decode unit", test, Variant::RightSoftcap);
    run_on::<f32, 8, 2, 64, Float32>(&unit, "decode unit", test, Variant::NoMask);
    run_on::<f16, 12, 4, 80, Int8>(&unit, "decode unit", test, Variant::Everything);
    run_on::<f32, 16, 1, 17, Int4>(&unit, "decode unit", test, Variant::Window);
    run_on::<f32, 10, 5, 72, Float32>(&unit, "decode unit", test, Variant::LeftAlibi);
}

/// Sequences long enough that lavapipe's loop limit decides how decode splits them, in pages of
/// one key (the most loop iterations per key), against the oracle with both layouts: four
/// sequences of 50 000 tokens at head dim 8, so that the split rule has cubes enough without
/// splitting and the loop-limit rule alone cuts them (into splits of 16 000 keys for the plane
/// kernel, a precaution: unsplit, these 50 000 keys also came out right; the forward kernel's
/// limit is the measured one).
#[test]
fn long_sequences_in_pages_of_one_key_match_the_oracle() {
    let Some(device) = device() else { return };
    let spec = AttentionSpec::try_new(4, 2, 8)
        .unwrap()
        .with_mask(Mask::NONE.causal());
    let (batch, len, seq_q) = (4, 50_000, 2);
    let value = |seed: usize| {
        Array3::from_shape_fn((2, len, 8), |(h, t, c)| {
            (((h * 31 + t * 7 + c * 3 + seed) % 97) as f32 / 48.0 - 1.0) * 2.0
        })
    };
    let case = Case {
        spec,
        page_size: 1,
        seq_q,
        kv: (0..batch).map(|b| (value(b), value(b + 50))).collect(),
        q: Array4::from_shape_fn((batch, 4, seq_q, 8), |(b, h, i, c)| {
            ((b * 5 + h * 3 + i * 11 + c) % 13) as f64 / 6.0 - 1.0
        }),
    };
    let unit = CubeDevice::try_default()
        .expect("the device again")
        .untuned()
        .with_unit_decode();
    for (layout, device) in [("default", device), ("unit", &unit)] {
        check::<f32, 2, 8, Float32>(device, &case)
            .unwrap_or_else(|e| panic!("{layout} layout: {e}"));
    }
}

/// lavapipe's subgroup sums and broadcasts work, so the probe run when a device opens must find
/// the plane decode kernel runs there, with its 8 lanes: were the probe to stop finding so,
/// decode would fall back to the unit layout, three times as slow there for GQA, and no other
/// test would notice.
#[test]
fn lavapipe_runs_plane_decode() {
    let Some(device) = device() else { return };
    if !device.name().contains("llvmpipe") {
        eprintln!("{}: not lavapipe; nothing to check", device.name());
        return;
    }
    assert_eq!(device.plane_decode_lanes(), Some(8), "{}", device.name());
}

macro_rules! decode_tests {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            #[test]
            fn [<$name _decode_f32_cache>]() {
                run::<f32, $hq, $hkv, $d, Float32>(stringify!([<$name _decode_f32_cache>]), Variant::NoMask);
            }
            #[test]
            fn [<$name _decode_f16_cache>]() {
                run::<f32, $hq, $hkv, $d, Float16>(stringify!([<$name _decode_f16_cache>]), Variant::RightSoftcap);
            }
            #[test]
            fn [<$name _decode_bf16_cache>]() {
                run::<f32, $hq, $hkv, $d, BFloat16>(stringify!([<$name _decode_bf16_cache>]), Variant::LeftAlibi);
            }
            #[test]
            fn [<$name _decode_int8_cache_f16_queries>]() {
                run::<f16, $hq, $hkv, $d, Int8>(stringify!([<$name _decode_int8_cache_f16_queries>]), Variant::Everything);
            }
            #[test]
            fn [<$name _decode_int4_cache>]() {
                run::<f32, $hq, $hkv, $d, Int4>(stringify!([<$name _decode_int4_cache>]), Variant::Window);
            }
        }
    };
}

for_each_config!(decode_tests);

/// Decode's NaN contract, bit for bit: a cache holding NaN or ±∞ at keys some rows cannot see
/// gives those rows exactly what the same cache with the clean values gives. (On the f16 and
/// bf16 kernels the suite compiles for `gqa_10_5_d72` anyway: float storage keeps NaN.)
#[test]
fn hidden_non_finite_cached_keys_change_no_row_that_cannot_see_them() {
    fn hidden<S: KvStorage>(test: &str, variant: Variant) {
        let Some(device) = device() else { return };
        const HQ: usize = 10;
        const HKV: usize = 5;
        const D: usize = 72;
        let strategy = (case(variant, HQ, HKV, D), 0..4usize, 1..4usize);
        runner::check(
            test,
            2 * cases(),
            Persist::No,
            strategy,
            |(case, offset, stride)| {
                runner::log_case(case_key(&case));
                let (poisoned, sees) = poison_hidden_keys(&case, offset, stride);
                let q = case.q.mapv(|x| x as f32);
                let (cache, seqs, o, lse) = decode::<f32, HKV, D, S>(device, &case, &q)?;
                let (_, _, dirty_o, dirty_lse) = decode::<f32, HKV, D, S>(device, &poisoned, &q)?;
                common::forward::unseen_rows_are_bit_identical(
                    &sees,
                    (&o, &lse),
                    (&dirty_o, &dirty_lse),
                )?;
                check_decoded(&case, (&cache, &seqs), &q, (&o, &lse))?;
                Ok(())
            },
        );
    }
    hidden::<Float16>(
        "hidden_non_finite_cached_keys_change_no_row_that_cannot_see_them/f16",
        Variant::RightSoftcap,
    );
    hidden::<BFloat16>(
        "hidden_non_finite_cached_keys_change_no_row_that_cannot_see_them/bf16",
        Variant::LeftAlibi,
    );
}

/// One `CubeDevice` decoding from several threads at once — each thread with its own device
/// copy of one shared host cache — gives bit-identical results to the same decodes one by one.
#[test]
fn decodes_from_several_threads_equal_the_same_decodes_one_by_one() {
    let Some(device) = device() else { return };
    const HQ: usize = 8;
    const HKV: usize = 2;
    const D: usize = 64;
    let strategy = (
        case(Variant::NoMask, HQ, HKV, D),
        proptest::collection::vec(tensor_q(HQ, D), 3),
    );
    runner::check(
        "decodes_from_several_threads_equal_the_same_decodes_one_by_one",
        1,
        Persist::No,
        strategy,
        |(case, queries)| {
            let (cache, seqs) = fill::<HKV, D, Float32>(&case);
            let run = |n: usize, copy: &mut gqa::cube::DeviceKvCache<HKV, D, Float32>| {
                let q = queries[n]
                    .slice(s![..seqs.len(), .., ..case.seq_q, ..])
                    .mapv(|x| x as f32);
                let q = device.try_upload(q.view()).unwrap();
                let out = device
                    .try_decode(&case.spec, &q, &cache, copy, &seqs)
                    .unwrap();
                let o = device.try_download(&out.o).unwrap().mapv(f32::to_bits);
                let lse = device.try_download(&out.lse).unwrap().mapv(f32::to_bits);
                (o, lse)
            };
            // Each thread decodes through a device copy of its own of the one host cache.
            common::concurrent_calls_equal_one_by_one(
                (3, 3, 3),
                || device.try_upload_cache(&cache).unwrap(),
                |copy, n| run(n, copy),
            )
        },
    );
}

/// Queries for up to 3 sequences and 16 queries each (cut to a case's shape).
fn tensor_q(hq: usize, d: usize) -> impl Strategy<Value = Array4<f64>> {
    common::tensor([3, hq, 16, d])
}

/// A generation loop: prefill, then a few tokens at a time — append, sync (only the new rows,
/// lengths and pages travel), decode into reused outputs — each step against the oracle. On the
/// way a sequence is dropped and another takes its place (its slot on the device reused), the
/// batch changes order and grows, and a sequence outgrows the device's block-table width.
#[test]
fn generation_steps_match_the_oracle() {
    let Some(device) = device() else { return };
    const HQ: usize = 8;
    const HKV: usize = 2;
    const D: usize = 64;
    let spec = *gqa::Gqa::<HQ, HKV, D>::new().causal().spec();
    let mut cache = KvCache::<HKV, D, Int8>::new(Layout::Paged {
        page_size: 7,
        pages: 16,
    });
    let x = |n: usize, phase: f32| {
        Array3::from_shape_fn((HKV, n, D), |(h, t, c)| {
            ((h * 17 + t * 5 + c) as f32 * 0.21 + phase).sin()
        })
    };
    let add = |cache: &mut KvCache<HKV, D, Int8>, n: usize, phase: f32| {
        let seq = cache.try_add_sequence().unwrap();
        cache
            .try_append(seq, x(n, phase).view(), x(n, phase + 1.0).view())
            .unwrap();
        seq
    };
    let mut live = vec![add(&mut cache, 20, 0.0), add(&mut cache, 5, 2.0)];
    let mut copy = device.try_upload_cache(&cache).unwrap();
    let mut out = device.try_forward_output::<f32>(&spec, 2, 1).unwrap();
    for step in 0..6 {
        if step == 2 {
            cache.try_drop_sequence(live[0]).unwrap();
            live = vec![live[1], add(&mut cache, 3, 4.0)];
        }
        if step == 4 {
            live.push(add(&mut cache, 10, 5.0));
            out = device.try_forward_output(&spec, live.len(), 1).unwrap();
        }
        let q = Array4::from_shape_fn((live.len(), HQ, 1, D), |(b, h, _, c)| {
            ((b * 3 + h * 7 + c + step) as f32 * 0.13).cos()
        });
        let q_device = device.try_upload(q.view()).unwrap();
        device
            .try_decode_into(&spec, &q_device, &cache, &mut copy, &live, &mut out)
            .unwrap();
        let o = device.try_download(&out.o).unwrap();
        let lse = device.try_download(&out.lse).unwrap();
        for (b, &seq) in live.iter().enumerate() {
            let q_b = q.slice(s![b..b + 1, .., .., ..]).mapv(f64::from);
            let o_b: Vec<f64> = o
                .slice(s![b, .., .., ..])
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let lse_b: Vec<f64> = lse
                .slice(s![b, .., ..])
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let (o_check, lse_check) =
                compare_sequence(&spec, &q_b, &cache, seq, (&o_b, &lse_b), DType::F32);
            assert!(o_check.passed(), "step {step}, sequence {b}: o {o_check}");
            assert!(
                lse_check.passed(),
                "step {step}, sequence {b}: lse {lse_check}"
            );
        }
        if step < 5 {
            for &seq in &live {
                let t = x(6, step as f32);
                cache.try_append(seq, t.view(), t.view()).unwrap();
            }
        }
    }
    // The bytes-once reference reads K and V rows of every token, an int8 row being D bytes and
    // one f32 scale.
    let tokens: usize = live.iter().map(|&seq| cache.len(seq).unwrap()).sum();
    assert_eq!(
        device.try_stream_cache(&cache, &mut copy, &live).unwrap(),
        2 * tokens * HKV * (D + 4)
    );
    // A decode into outputs of another shape is refused, naming the tensor.
    let q = device
        .try_upload(Array4::<f32>::zeros((live.len(), HQ, 2, D)).view())
        .unwrap();
    let err = device.try_decode_into(&spec, &q, &cache, &mut copy, &live, &mut out);
    assert!(
        matches!(err, Err(Error::Shape { tensor: "o", .. })),
        "{err:?}"
    );
}

#[test]
fn bad_decode_input_is_a_typed_error() {
    let Some(device) = device() else { return };
    let spec = *gqa::Gqa::<4, 2, 8>::new().causal().spec();
    let mut cache = KvCache::<2, 8, Float32>::new(Layout::Paged {
        page_size: 4,
        pages: 4,
    });
    let seq = cache.try_add_sequence().unwrap();
    let mut copy = device.try_upload_cache(&cache).unwrap();
    let too_many = device
        .try_upload(Array4::<f32>::zeros((1, 4, 17, 8)).view())
        .unwrap();
    let err = device.try_decode(&spec, &too_many, &cache, &mut copy, &[seq]);
    assert!(matches!(err, Err(Error::Shape { .. })), "{err:?}");
    let q = device
        .try_upload(Array4::<f32>::zeros((1, 4, 1, 8)).view())
        .unwrap();
    let other = KvCache::<2, 8, Float32>::new(Layout::Paged {
        page_size: 4,
        pages: 4,
    });
    let err = device.try_decode(&spec, &q, &other, &mut copy, &[seq]);
    assert!(matches!(err, Err(Error::CacheMismatch { .. })), "{err:?}");
    let wrong_spec = *gqa::Gqa::<4, 4, 8>::new().spec();
    let err = device.try_decode(&wrong_spec, &q, &cache, &mut copy, &[seq]);
    assert!(matches!(err, Err(Error::ConfigMismatch { .. })), "{err:?}");
    // An empty sequence: every row sees nothing — zero output, LSE −∞.
    let out = device
        .try_decode(&spec, &q, &cache, &mut copy, &[seq])
        .unwrap();
    let lse = device.try_download(&out.lse).unwrap();
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(
        device
            .try_download(&out.o)
            .unwrap()
            .iter()
            .all(|&x| x == 0.0)
    );
}

/// Typed partials: the device's decode over three key ranges, each against the oracle's
/// partial over the same keys (tolerance rule, f32), merged back into the whole decode
/// (tolerance rule against the oracle's full decode). Cut points fall anywhere, inside the
/// device's own splits and past the end of shorter sequences.
#[test]
fn partials_over_key_ranges_merge_into_the_decode() {
    let Some(device) = device() else { return };
    const HQ: usize = 8;
    const HKV: usize = 2;
    const D: usize = 128;
    type Config = gqa::Gqa<HQ, HKV, D>;
    let strategy = case(Variant::Everything, HQ, HKV, D).prop_flat_map(|case| {
        let longest = case.kv.iter().map(|(k, _)| k.shape()[1]).max().unwrap_or(0);
        (Just(case), 0..=longest + 2, 0..=longest + 2)
    });
    runner::check(
        "partials_over_key_ranges_merge_into_the_decode",
        cases(),
        Persist::No,
        strategy,
        |(case, a, b)| {
            let (cut1, cut2) = (a.min(b), a.max(b));
            let (cache, seqs) = fill::<HKV, D, Int8>(&case);
            let mut copy = device.try_upload_cache(&cache).unwrap();
            let q = case.q.mapv(|x| x as f32);
            let q_device = device.try_upload(q.view()).unwrap();
            let attention = Config::try_from(case.spec).unwrap();
            let ranges = [0..cut1, cut1..cut2, cut2..usize::MAX];
            let mut parts = Vec::new();
            for range in ranges {
                let part = attention
                    .try_decode_partial(device, &q_device, &cache, &mut copy, &seqs, range.clone())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (o, lse) = (part.o(), part.lse());
                check_partial(&case.spec, &q, (&cache, &seqs), range, (o, lse))?;
                parts.push(part);
            }
            // Merged in another order than computed: merge does not care.
            parts.rotate_left(1);
            let whole = gqa::partial::Partial::try_merge(&parts).unwrap();
            prop_assert!(whole.is_complete());
            for (b, &seq) in seqs.iter().enumerate() {
                let q_b = q.slice(s![b..b + 1, .., .., ..]).mapv(f64::from);
                let o_b: Vec<f64> = whole
                    .o()
                    .slice(s![b, .., .., ..])
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let lse_b: Vec<f64> = whole.lse().slice(s![b, .., ..]).iter().copied().collect();
                let (o_check, lse_check) =
                    compare_sequence(&case.spec, &q_b, &cache, seq, (&o_b, &lse_b), DType::F32);
                prop_assert!(o_check.passed(), "merged, sequence {b}: o {o_check}");
                prop_assert!(lse_check.passed(), "merged, sequence {b}: lse {lse_check}");
            }
            Ok(())
        },
    );
}

/// Partials merge only when the type and the run-time facts agree; everything else is a
/// typed error, and nothing is merged.
#[test]
fn partials_that_cannot_merge_are_typed_errors() {
    let Some(device) = device() else { return };
    let attention = gqa::Gqa::<4, 2, 8>::new().causal();
    let mut cache = attention
        .try_new_cache::<Float32>(Layout::Paged {
            page_size: 3,
            pages: 8,
        })
        .unwrap();
    let (one, two) = (
        cache.try_add_sequence().unwrap(),
        cache.try_add_sequence().unwrap(),
    );
    let kv = Array3::from_shape_fn((2, 7, 8), |(h, t, c)| ((h + t * 3 + c) as f32 * 0.3).sin());
    cache.try_append(one, kv.view(), kv.view()).unwrap();
    cache.try_append(two, kv.view(), kv.view()).unwrap();
    let mut copy = device.try_upload_cache(&cache).unwrap();
    let q = device
        .try_upload(Array4::<f32>::ones((1, 4, 1, 8)).view())
        .unwrap();
    let mut partial =
        |seq, keys| attention.try_decode_partial(device, &q, &cache, &mut copy, &[seq], keys);
    let (a, b) = (partial(one, 0..4).unwrap(), partial(one, 3..7).unwrap());
    let merge = gqa::partial::Partial::try_merge;
    let err = merge(&[a.clone(), b]).unwrap_err();
    assert!(
        err.to_string().contains("keys 3..4 are in two partials"),
        "{err}"
    );
    let other_sequence = partial(two, 4..7).unwrap();
    let err = merge(&[a.clone(), other_sequence]).unwrap_err();
    assert!(matches!(err, Error::Partial { .. }), "{err}");
    #[allow(clippy::reversed_empty_ranges)]
    let err = partial(one, 5..2).unwrap_err();
    assert!(err.to_string().contains("5..2 is not a key range"), "{err}");
    assert!(matches!(merge(&[]), Err(Error::Partial { .. })));
    // A partial taken before an append does not merge with one taken after.
    let c = partial(one, 4..7).unwrap();
    assert!(merge(&[a.clone(), c.clone()]).unwrap().is_complete());
    let t = Array3::<f32>::ones((2, 1, 8));
    cache.try_append(one, t.view(), t.view()).unwrap();
    let after = attention
        .try_decode_partial(device, &q, &cache, &mut copy, &[one], 4..8)
        .unwrap();
    assert!(matches!(
        merge(&[a.clone(), after]),
        Err(Error::Partial { .. })
    ));
    // Another spec of the same configuration.
    let window = attention.window(2, 0);
    let w = window
        .try_decode_partial(device, &q, &cache, &mut copy, &[one], 4..8)
        .unwrap();
    assert!(matches!(merge(&[a, w]), Err(Error::Partial { .. })));
}
