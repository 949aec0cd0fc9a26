//! DSL mods in the cubecl forward kernel against the f64 oracle: every member of the composed
//! family (`tests/common/mods.rs`: library mods under `&`, `|`, `!` and `then`, and two mods
//! written in this crate with the attribute macros) on a GQA configuration in f32, and one
//! member in f16 with every built-in at once. Each member is its own mod type, so its own
//! kernel: the suite's time is mostly their compiles (head dims are small to keep them short).
//!
//! Without a device: as `cube_forward.rs` (fails under `CI`, says it skipped elsewhere).

#[macro_use]
mod common;

use common::cube::{cases, device};
use common::forward::Variant;
use common::mods::{Captures, checker, plus_quotients, run_family, wobble};
use gqa::cube::CubeDevice;
use gqa::dsl::{Aux, Mods, NoMask, NoScore, ScoreMod, library};
use half::f16;

macro_rules! family_tests {
    ($name:ident, $variant:expr, $make:expr) => {
        paste::paste! {
            #[test]
            fn [<$name _matches_the_oracle>]() {
                let Some(device) = device() else { return };
                run_family::<f32, CubeDevice, _, _>(
                    device,
                    (stringify!([<$name _matches_the_oracle>]), cases()),
                    $variant,
                    (6, 2, 8),
                    $make,
                );
            }
        }
    };
}

for_each_mod_family!(family_tests);

/// One member in f16 with a causal window, softcap and ALiBi underneath, at a head dim that is
/// not a multiple of the plane-load chunk.
#[test]
fn document_and_bias_in_f16_with_every_built_in_matches_the_oracle() {
    let Some(device) = device() else { return };
    run_family::<f16, CubeDevice, _, _>(
        device,
        (
            "document_and_bias_in_f16_with_every_built_in_matches_the_oracle",
            cases(),
        ),
        Variant::Everything,
        (3, 1, 12),
        |c: &Captures| {
            Mods::new(
                library::document(Aux::new(c.docs.clone())),
                library::relative_bias(Aux::new(c.table.clone()), c.buckets),
            )
        },
    );
}

macro_rules! decode_family_tests {
    ($name:ident, $variant:expr, $make:expr) => {
        paste::paste! {
            #[test]
            fn [<decode_ $name _matches_the_oracle>]() {
                let Some(device) = device() else { return };
                common::mods::run_decode_family(
                    device,
                    (stringify!([<decode_ $name _matches_the_oracle>]), cases()),
                    $variant,
                    6,
                    $make,
                );
            }
        }
    };
}

for_each_decode_family!(decode_family_tests);

/// Block masks change nothing but the work done: with and without them the kernel's outputs
/// are bit-identical, on masks whose tiles come out empty, partial and full (the causal
/// document mask with its analytic classifier, and a user mask classified by brute force).
/// The tiles counted are the ones the untuned tile's launch uses (`block_mask_tiles`).
#[test]
fn block_masks_change_no_bit_of_the_kernel_output() {
    let Some(device) = device() else { return };
    let spec = gqa::AttentionSpec::try_new(6, 2, 8).unwrap();
    let tiles = device
        .block_mask_tiles(&spec, device.untuned_forward_tile(8))
        .unwrap();
    let tiles = move |_: &common::Problem| tiles;
    let seen = common::mods::run_block_mask_identity::<f32, CubeDevice, _, _>(
        device,
        (
            "block_masks_change_no_bit_of_the_kernel_output/document",
            cases() + 3,
        ),
        Variant::RightSoftcap,
        (6, 2, 8),
        tiles,
        |c: &Captures| {
            // Documents of about 100 tokens, so that whole tiles fall inside one.
            let docs: Vec<i32> = c.docs.iter().map(|d| d / 8).collect();
            Mods::new(library::document(Aux::new(docs.clone())), NoScore)
                .with_classifier(gqa::dsl::block::SortedDocuments::new(&docs))
        },
    );
    let also = common::mods::run_block_mask_identity::<f32, CubeDevice, _, _>(
        device,
        (
            "block_masks_change_no_bit_of_the_kernel_output/checker",
            cases(),
        ),
        Variant::Plain,
        (6, 2, 8),
        tiles,
        |c: &Captures| Mods::new(checker(c.b + 8), wobble(c.gain)),
    );
    eprintln!("tiles (empty, partial, full): document {seen:?}, checker {also:?}");
    assert!(
        seen.0 > 0 && seen.1 > 0 && seen.2 > 0,
        "tiles of every kind: {seen:?}"
    );
}

/// The unit decode layout (`paged_decode`, what devices without plane sums run) with mods: a
/// user mask and a user score mod, against the oracle.
#[test]
fn unit_layout_decodes_with_mods_match_the_oracle() {
    if device().is_none() {
        return;
    }
    let unit = CubeDevice::try_default()
        .expect("the device again")
        .untuned()
        .with_unit_decode();
    common::mods::run_decode_family(
        &unit,
        ("unit_layout_decodes_with_mods_match_the_oracle", cases()),
        Variant::Plain,
        6,
        |c: &Captures| Mods::new(checker(c.b), wobble(c.gain)),
    );
}

/// Integer `/` and `%` by zero give 0 in kernels (the `gqa::dsl` docs; the host panics, and
/// shading languages leave it undefined or give the dividend): `plus_quotients(0)` leaves the
/// forward's output and LSE those of the problem without a score mod, on every pass of this
/// suite (WGSL, SPIR-V); `plus_quotients(7)`, a divisor the mod does use, moves them. (On
/// lavapipe every path already gives 0 for an integer `/` by zero, so there this sees the `%`
/// guard: without it, `a − (a / 0)·0` is `a`.)
#[test]
fn integer_division_by_zero_gives_zero_in_kernels() {
    let Some(device) = device() else { return };
    let spec = gqa::Gqa::<4, 2, 8>::new().causal();
    let spec = spec.spec();
    let wave = |shape: (usize, usize, usize, usize), seed: usize| {
        ndarray::Array4::from_shape_fn(shape, |(_, h, i, d)| {
            ((h * 131 + i * 17 + d * 5 + seed) as f32 * 0.618).sin()
        })
    };
    let (q, k, v) = (
        wave((1, 4, 37, 8), 1),
        wave((1, 2, 45, 8), 2),
        wave((1, 2, 45, 8), 3),
    );
    let run = |mods: &Mods<NoMask, _>| {
        device
            .try_forward_with(spec, mods, q.view(), k.view(), v.view())
            .unwrap()
    };
    let plain = device
        .try_forward_with(spec, &Mods::none(), q.view(), k.view(), v.view())
        .unwrap();
    let largest = |out: &gqa::cube::HostOutput<f32>| {
        let o = (&out.o - &plain.o)
            .mapv(f32::abs)
            .fold(0f32, |a, &b| a.max(b));
        let lse = (&out.lse - &plain.lse)
            .mapv(f32::abs)
            .fold(0f32, |a, &b| a.max(b));
        o.max(lse)
    };
    let by_zero = largest(&run(&Mods::new(NoMask, plus_quotients(0))));
    assert!(
        by_zero <= 1e-6,
        "a zero divisor moved the output by {by_zero}"
    );
    let by_seven = largest(&run(&Mods::new(NoMask, plus_quotients(7))));
    assert!(
        by_seven > 1e-2,
        "a divisor of 7 moved the output by only {by_seven}"
    );
}
