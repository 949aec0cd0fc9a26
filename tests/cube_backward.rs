//! The kernels' backward (`CubeDevice::try_backward_with`) against the f64 oracle's gradients,
//! under the tolerance rule for gradients (`oracle::compare_gradients`), on whatever device
//! `CubeDevice::try_default` finds (Mesa's lavapipe in CI).
//!
//! Every configuration of the shared list runs one kernel specialisation — right band with
//! softcap (f32), a two-sided window with ALiBi (f32), or everything at once (f16), in turn —
//! over the forward suites' problems (batch 0 included, lengths 0..=160 across tile edges, rows
//! that see nothing, both alignments, scores in the hundreds) with NaN-padded strided inputs;
//! then the DSL suites' mod families (mask mods, score mods and their generated derivatives, a
//! user pair with kinks), key and query ranges long enough to split on lavapipe, non-finite
//! values at positions no visible pair reads, bit-identical repeats, and typed errors. Each distinct specialisation is a kernel compile, so the set is deliberate.
//!
//! Without a device: in CI (`CI` set) the tests fail; elsewhere they say loudly that they were
//! skipped. `GQA_CUBE_CASES` sets the cases per test (default 3); seeds per test
//! (`tests/common/runner.rs`).

#[macro_use]
mod common;

use common::Problem;
use common::backward::{check_backward, upstream};
use common::cube::{cases, device};
use common::forward::{self, Variant};
use common::mods::{Captures, checker, wobble};
use common::runner::{self, Persist};
use gqa::Gqa;
use gqa::cube::{CubeDevice, CubeElement};
use gqa::dsl::{Aux, Mods, NoMask, NoScore, ScoreMod, library};
use half::f16;
use ndarray::{Array4, s};
use proptest::prelude::*;

/// Lengths up to this (the forward suites go to 300): lavapipe runs the backward of a 300 × 300
/// problem with 20 heads of 256 in about a minute, and the tile edges end at 129.
const MAX_LEN: usize = 160;

fn run<T: CubeElement>(test: &str, variant: Variant, (hq, hkv, d): (usize, usize, usize)) {
    let Some(device) = device() else { return };
    let strategy = forward::problems_up_to(variant, hq, hkv, d, MAX_LEN)
        .prop_flat_map(|p| (Just(p.clone()), upstream(&p)));
    runner::check(test, cases(), Persist::No, strategy, |(p, up)| {
        runner::log_case(format!("{test} {}", forward::case_key(&p)));
        check_backward::<T, CubeDevice, _, _>(device, &p, &Mods::none(), &up).map(|_| ())
    });
}

/// One specialisation per configuration, the three in turn down the list (`$variant`).
macro_rules! backward_tests {
    ($name:ident, $hq:literal, $hkv:literal, $d:literal) => {
        paste::paste! {
            #[test]
            fn [<$name _backward_matches_the_oracle>]() {
                let test = stringify!([<$name _backward_matches_the_oracle>]);
                match ($hq * 31 + $hkv * 7 + $d) % 3 {
                    0 => run::<f32>(test, Variant::RightSoftcap, ($hq, $hkv, $d)),
                    1 => run::<f32>(test, Variant::WindowAlibi, ($hq, $hkv, $d)),
                    _ => run::<f16>(test, Variant::Everything, ($hq, $hkv, $d)),
                }
            }
        }
    };
}

for_each_config!(backward_tests);

/// The specialisations the list above leaves out, on one configuration each.
#[test]
fn backward_plain_and_left_band() {
    let test = "backward_plain_and_left_band";
    run::<f32>(&format!("{test}/plain"), Variant::Plain, (8, 2, 64));
    run::<f32>(&format!("{test}/left"), Variant::LeftBand, (12, 4, 80));
}

/// The mod families of the DSL suites (`tests/common/mods.rs`): library mask mods under `&`,
/// `|`, `!` (through their block masks), score mods chained with `then` after the built-in softcap and
/// ALiBi (their derivative generated as kernel code by `#[score_mod]`), and a user mod pair
/// with kinks (`max`, `clamp`, `abs`, `floor`, `if` chains).
macro_rules! family_tests {
    ($name:ident, $variant:expr, $make:expr) => {
        paste::paste! {
            #[test]
            fn [<backward_ $name _matches_the_oracle>]() {
                let Some(device) = device() else { return };
                let make = $make;
                let test = stringify!([<backward_ $name _matches_the_oracle>]);
                let strategy = common::mods::cases($variant, (6, 2, 8))
                    .prop_flat_map(|(p, c)| (Just((p.clone(), c)), upstream(&p)));
                runner::check(test, cases(), Persist::No, strategy, |((p, c), up)| {
                    check_backward::<f32, CubeDevice, _, _>(device, &p, &make(&c), &up).map(|_| ())
                });
            }
        }
    };
}

for_each_mod_family!(family_tests);

// A chain whose first mod's derivative is not 1 (the shared list's chain starts with a bias):
// the kernels' `then` passes the first mod's tangent on.
family_tests!(softcap_then_wobble, Variant::Plain, |c: &Captures| {
    Mods::new(NoMask, library::softcap(c.cap).then(wobble(c.gain)))
});

/// Runs `cases` problems of `variant` with the mods `make` builds, backward with block masks
/// and without (`without_block_masks`), and asks for bit-identical gradients: a block mask may
/// only skip work whose result is nothing and drop mask tests that pass anyway. Returns the
/// tiles seen (empty, partial, full) in the backward's own tiles.
fn block_mask_identity<M: gqa::dsl::MaskMod, S: ScoreMod>(
    device: &CubeDevice,
    test: &str,
    cases: u32,
    variant: Variant,
    make: impl Fn(&Captures) -> Mods<M, S>,
) -> (usize, usize, usize) {
    let seen = std::cell::Cell::new((0, 0, 0));
    let strategy = common::mods::cases(variant, (6, 2, 8))
        .prop_flat_map(|(p, c)| (Just((p.clone(), c)), upstream(&p)));
    runner::check(test, cases, Persist::No, strategy, |((p, c), up)| {
        let mods = make(&c);
        let shape = p
            .spec
            .check_shapes("test", p.q.shape(), p.k.shape(), p.v.shape())
            .unwrap();
        let tiles = device.backward_block_mask_tiles(&p.spec).unwrap();
        let (e, pa, f) = mods.block_mask(&p.spec, shape, tiles).counts();
        let s = seen.get();
        seen.set((s.0 + e, s.1 + pa, s.2 + f));
        let narrow = |x: &Array4<f64>| x.mapv(|x| x as f32);
        let (q, k, v, d_o) = (narrow(&p.q), narrow(&p.k), narrow(&p.v), narrow(&up.d_o));
        let out = device
            .try_forward_with(&p.spec, &mods, q.view(), k.view(), v.view())
            .unwrap();
        let gradients = |mods: &Mods<M, S>| {
            let d_lse = up.d_lse.as_ref().map(|d| d.view());
            let inputs = [q.view(), k.view(), v.view()];
            let g = device
                .try_backward_with(&p.spec, mods, inputs, &out, d_o.view(), d_lse)
                .unwrap();
            [bits(&g.dq), bits(&g.dk), bits(&g.dv)]
        };
        let with = gradients(&mods);
        let without = gradients(&mods.clone().without_block_masks());
        for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(with.iter().zip(&without)) {
            prop_assert!(a == b, "{} differs with and without the block mask", name);
        }
        Ok(())
    });
    seen.get()
}

/// Block masks change no bit of the gradients, over tiles of every kind: the causal document
/// mask with its analytic classifier (documents of about 100 tokens, so that whole tiles fall
/// inside one), and a user mask classified by brute force, under a user score mod.
#[test]
fn block_masks_change_no_bit_of_the_gradients() {
    let Some(device) = device() else { return };
    let test = "block_masks_change_no_bit_of_the_gradients";
    let seen = block_mask_identity(
        device,
        &format!("{test}/document"),
        cases() + 3,
        Variant::RightSoftcap,
        |c: &Captures| {
            let docs: Vec<i32> = c.docs.iter().map(|d| d / 8).collect();
            Mods::new(library::document(Aux::new(docs.clone())), NoScore)
                .with_classifier(gqa::dsl::block::SortedDocuments::new(&docs))
        },
    );
    let also = block_mask_identity(
        device,
        &format!("{test}/checker"),
        cases(),
        Variant::Plain,
        |c: &Captures| Mods::new(checker(c.b + 8), wobble(c.gain)),
    );
    eprintln!("backward tiles (empty, partial, full): document {seen:?}, checker {also:?}");
    assert!(
        seen.0 > 0 && seen.1 > 0 && seen.2 > 0,
        "tiles of every kind: {seen:?}"
    );
}

/// Ranges long enough that on lavapipe each main kernel splits its work (its loop limit) and
/// the splits' partials are summed: at head dim 256 (two rows per unit, chunks of 8 channels),
/// a split walks at most 730 blocks, so 1500–1800 queries of a group of 4 split `dK`/`dV`
/// (4 · 188 blocks or more) and 5900–6500 keys split `dQ` (730 blocks of 8 keys).
#[test]
fn long_ranges_split_and_sum() {
    let Some(device) = device() else { return };
    let (hq, hkv, d) = (4, 1, 256);
    for (name, queries, keys) in [
        ("queries", 1500..=1800usize, 1..=64usize),
        ("keys", 1..=16, 5900..=6500),
    ] {
        let test = format!("long_ranges_split_and_sum/{name}");
        let problems = (queries, keys, forward::spec_for(Variant::Plain, hq, hkv, d))
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
        runner::check(&test, 2, Persist::No, strategy, |(p, up)| {
            check_backward::<f32, CubeDevice, _, _>(device, &p, &Mods::none(), &up).map(|_| ())
        });
    }
}

/// The opt-in `dS` stage (`with_backward_stage_bytes`), against the oracle, in one chunk and
/// in chunks of one tile of query rows (the least a stage takes): the two give the same bits
/// (the `dK`/`dV` sums carried across chunks through the partials keep their order), and
/// their `dK`, `dV` are the default device's bits (the same kernel, which only also writes
/// `dS`). Over a band with ALiBi, a document mask under a score mod, and sinks with a sliding
/// window (block masks: tiles skipped — between the sinks and the window, inside a query
/// tile's live range — full and partial).
#[test]
fn staged_backward_matches_the_oracle_and_its_chunks_change_no_bit() {
    let Some(device) = device() else { return };
    let staged = |bytes| {
        CubeDevice::try_default()
            .expect("the device opened twice")
            .untuned()
            .with_backward_stage_bytes(bytes)
    };
    let (whole, tiles) = (staged(1 << 30), staged(1));
    let test = "staged_backward_matches_the_oracle_and_its_chunks_change_no_bit";
    let devices = [device, &whole, &tiles];
    let mut chunks = staged_case(
        devices,
        &format!("{test}/window_alibi"),
        Variant::WindowAlibi,
        |_| Mods::none(),
    );
    chunks = chunks.max(staged_case(
        devices,
        &format!("{test}/document"),
        Variant::RightSoftcap,
        |c| {
            let docs: Vec<i32> = c.docs.iter().map(|d| d / 8).collect();
            Mods::new(library::document(Aux::new(docs)), wobble(c.gain))
        },
    ));
    chunks = chunks.max(staged_case(
        devices,
        &format!("{test}/streaming"),
        Variant::Plain,
        |c| Mods::new(library::streaming(c.b, c.a.min(24)), NoScore),
    ));
    assert!(chunks >= 3, "no case ran in 3 chunks or more");
}

/// One family of [`staged_backward_matches_the_oracle_and_its_chunks_change_no_bit`]:
/// `[default, staged in one chunk, staged in tiles]`; returns the most chunks a case ran in.
fn staged_case<M: gqa::dsl::MaskMod, S: ScoreMod>(
    [default, whole, tiles]: [&CubeDevice; 3],
    test: &str,
    variant: Variant,
    make: impl Fn(&Captures) -> Mods<M, S>,
) -> usize {
    let most_chunks = std::cell::Cell::new(0);
    let strategy = common::mods::cases(variant, (8, 2, 16))
        .prop_flat_map(|(p, c)| (Just((p.clone(), c)), upstream(&p)));
    runner::check(test, cases() + 2, Persist::No, strategy, |((p, c), up)| {
        let mods = make(&c);
        let tile_rows = tiles.backward_block_mask_tiles(&p.spec).unwrap().0;
        most_chunks.set(most_chunks.get().max(p.seq_q().div_ceil(tile_rows)));
        check_backward::<f32, CubeDevice, _, _>(tiles, &p, &mods, &up)?;
        let narrow = |x: &Array4<f64>| x.mapv(|x| x as f32);
        let (q, k, v, d_o) = (narrow(&p.q), narrow(&p.k), narrow(&p.v), narrow(&up.d_o));
        let gradients = |device: &CubeDevice| {
            let d_lse = up.d_lse.as_ref().map(|d| d.view());
            let out = device
                .try_forward_with(&p.spec, &mods, q.view(), k.view(), v.view())
                .unwrap();
            let inputs = [q.view(), k.view(), v.view()];
            let g = device
                .try_backward_with(&p.spec, &mods, inputs, &out, d_o.view(), d_lse)
                .unwrap();
            [bits(&g.dq), bits(&g.dk), bits(&g.dv)]
        };
        let (one, many, plain) = (gradients(whole), gradients(tiles), gradients(default));
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            prop_assert!(
                one[i] == many[i],
                "{} differs with the stage in chunks",
                name
            );
            if i > 0 {
                prop_assert!(one[i] == plain[i], "{} differs with a stage", name);
            }
        }
        Ok(())
    });
    most_chunks.get()
}

fn bits<T: Copy + Into<f64>>(x: &Array4<T>) -> Vec<u64> {
    x.iter().map(|&v| v.into().to_bits()).collect()
}

/// NaN and ∞ at keys no row sees, and at queries and upstream gradients of rows that see no
/// key, reach no gradient; and a second launch gives the same bits (no atomics). A band on
/// each side (and a right band alone) leave keys no row sees at both ends.
#[test]
fn non_finite_values_rows_cannot_see_leave_the_gradients_alone_and_repeats_agree() {
    let Some(device) = device() else { return };
    for variant in [Variant::RightSoftcap, Variant::WindowAlibi] {
        let test = format!(
            "non_finite_values_rows_cannot_see_leave_the_gradients_alone_and_repeats_agree/{variant:?}"
        );
        let strategy =
            forward::problems(variant, 8, 2, 16).prop_flat_map(|p| (Just(p.clone()), upstream(&p)));
        runner::check(&test, cases() * 3, Persist::No, strategy, |(p, up)| {
            let (seq_q, seq_k) = (p.seq_q(), p.seq_k());
            let mask = p.spec.mask();
            let seen =
                |j: usize| (0..seq_q).any(|i| mask.visible_keys(i, seq_q, seq_k).contains(&j));
            let blind = |i: usize| mask.visible_keys(i, seq_q, seq_k).is_empty();
            let (mut dirty, mut dirty_up) = (p.clone(), up.clone());
            for j in (0..seq_k).filter(|&j| !seen(j)) {
                dirty.k.slice_mut(s![.., .., j, ..]).fill(f64::NAN);
                dirty.v.slice_mut(s![.., .., j, ..]).fill(f64::INFINITY);
            }
            for i in (0..seq_q).filter(|&i| blind(i)) {
                dirty.q.slice_mut(s![.., .., i, ..]).fill(f64::NAN);
                dirty_up.d_o.slice_mut(s![.., .., i, ..]).fill(f64::NAN);
            }
            // The oracle never reads them, so its gradients of `dirty` are those of `p`.
            check_backward::<f32, CubeDevice, _, _>(device, &dirty, &Mods::none(), &dirty_up)?;

            let narrow = |x: &Array4<f64>| x.mapv(|x| x as f32);
            let (q, k, v, d_o) = (narrow(&p.q), narrow(&p.k), narrow(&p.v), narrow(&up.d_o));
            let out = device
                .try_forward(&p.spec, q.view(), k.view(), v.view())
                .unwrap();
            let run = || {
                let d_lse = up.d_lse.as_ref().map(|d| d.view());
                let inputs = [q.view(), k.view(), v.view()];
                let g = device
                    .try_backward_with(&p.spec, &Mods::none(), inputs, &out, d_o.view(), d_lse)
                    .unwrap();
                [bits(&g.dq), bits(&g.dk), bits(&g.dv)]
            };
            prop_assert!(run() == run(), "two launches differ");
            Ok(())
        });
    }
}

#[test]
fn bad_backward_inputs_are_typed_errors() {
    let Some(device) = device() else { return };
    let attention = Gqa::<4, 2, 8>::new().causal();
    let q = Array4::<f32>::zeros((1, 4, 3, 8));
    let kv = Array4::<f32>::zeros((1, 2, 5, 8));
    let out = attention
        .try_forward(device, q.view(), kv.view(), kv.view())
        .unwrap();
    let bad_d_o = Array4::<f32>::zeros((1, 4, 3, 7));
    assert_eq!(
        attention
            .try_backward(device, q.view(), kv.view(), kv.view(), &out, bad_d_o.view())
            .unwrap_err()
            .to_string(),
        "cube::backward: `d_o` has shape [1, 4, 3, 7], expected [1, 4, 3, 8] ([batch, q_heads, seq_q, head_dim])"
    );
}

/// Gradients written into buffers a caller keeps (`try_backward_into_with`, as a training
/// loop reuses them) are the bits of fresh ones, whatever the buffers held; a problem with no
/// key still writes zeros over stale values; a gradient of another shape is a typed error.
#[test]
fn gradients_written_into_kept_buffers_are_those_of_fresh_ones() {
    let Some(device) = device() else { return };
    let spec = *Gqa::<4, 2, 8>::new().causal().spec();
    let mods = Mods::none();
    let tensor = |shape: (usize, usize, usize, usize), salt: usize| {
        Array4::from_shape_fn(shape, |(b, h, i, d)| {
            (((b * 5 + h * 31 + i * 17 + d * 7 + salt) % 23) as f32 - 11.0) / 7.0
        })
    };
    let upload = |x: &Array4<f32>| device.try_upload(x.view()).unwrap();
    let problem = |salt: usize, seq_k: usize| {
        let q = upload(&tensor((2, 4, 5, 8), salt));
        let k = upload(&tensor((2, 2, seq_k, 8), salt + 1));
        let v = upload(&tensor((2, 2, seq_k, 8), salt + 2));
        let d_o = upload(&tensor((2, 4, 5, 8), salt + 3));
        let out = device.try_forward_device(&spec, &q, &k, &v).unwrap();
        (q, k, v, d_o, out)
    };
    let bits = |g: &gqa::cube::DeviceGradients<f32>| {
        [&g.dq, &g.dk, &g.dv].map(|x| {
            let x = device.try_download(x).unwrap();
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        })
    };
    let (a, b) = (problem(0, 7), problem(9, 7));
    let backward_into = |(q, k, v, d_o, out): &(_, _, _, _, _), grads: &mut _| {
        device.try_backward_into_with(&spec, &mods, [q, k, v], out, d_o, None, grads)
    };
    let mut kept = device
        .try_backward_device_with(&spec, &mods, [&a.0, &a.1, &a.2], &a.4, &a.3, None)
        .unwrap();
    backward_into(&b, &mut kept).unwrap();
    let fresh = device
        .try_backward_device_with(&spec, &mods, [&b.0, &b.1, &b.2], &b.4, &b.3, None)
        .unwrap();
    assert!(
        bits(&kept) == bits(&fresh),
        "kept buffers differ from fresh ones"
    );
    assert!(bits(&kept)[0].iter().any(|&x| x != 0), "a trivial problem");

    // No key: `dq` is all zeros, over the values it held.
    let blind = problem(3, 0);
    let empty = device.try_gradients::<f32>(&spec, 2, 5, 0).unwrap();
    let mut stale = gqa::cube::DeviceGradients {
        dq: kept.dq,
        dk: empty.dk,
        dv: empty.dv,
    };
    backward_into(&blind, &mut stale).unwrap();
    assert!(
        bits(&stale)[0].iter().all(|&x| x == 0),
        "stale values left in dq"
    );

    // A gradient of another shape (keys 7 instead of 0) is refused, naming it.
    let mut wrong = gqa::cube::DeviceGradients {
        dq: stale.dq,
        dk: fresh.dk,
        dv: stale.dv,
    };
    let error = backward_into(&blind, &mut wrong).unwrap_err().to_string();
    assert_eq!(
        error,
        "cube::backward: `dk` has shape [2, 2, 7, 8], expected [2, 2, 0, 8], contiguous"
    );
}
