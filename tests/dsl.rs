//! The DSL on the host: mask algebra laws and generated derivatives (pointwise, drawn), the
//! library's twins of the built-ins against the built-ins in the oracle (bit for bit), tables
//! read out of range, and the CPU backend on the composed family (`tests/common/mods.rs`)
//! against the oracle with the one tolerance rule. The kernels' half is `cube_mods.rs`.
//!
//! `PROPTEST_CASES` sets the cases of the laws (default 256), `GQA_CPU_CASES` those of the CPU
//! runs (default 4 per family and configuration); seeds come from each test's name
//! (`GQA_SEED`, `GQA_RANDOM=1`: see `tests/common/runner.rs`).

#[macro_use]
mod common;

use common::forward::Variant;
use common::mods::{Captures, checker, run_family, wobble};
use common::runner::{self, Persist, env_count};
use common::tensor;
use gqa::cpu::Cpu;
use gqa::dsl::block::{Band, Classifier, Row, SortedDocuments, TileState};
use gqa::dsl::{Aux, MaskMod, Mods, NoMask, NoScore, Position, ScoreMod, library};
use gqa::{AttentionSpec, Mask, oracle};
use proptest::prelude::*;

fn law_cases() -> u32 {
    env_count("PROPTEST_CASES", 256)
}

fn cpu_cases() -> u32 {
    env_count("GQA_CPU_CASES", 4)
}

/// A position in a problem of up to 64 × 64 tokens, 4 query heads, 2 batch entries.
fn position() -> impl Strategy<Value = Position> {
    (1..=64i64, 1..=64i64, 0..2i64, 0..4i64).prop_flat_map(|(seq_q, seq_k, b, h)| {
        (0..seq_q, 0..seq_k).prop_map(move |(q, k)| Position {
            b,
            h,
            q,
            k,
            seq_q,
            seq_k,
        })
    })
}

/// De Morgan (both), commutativity (both), double negation and the definitions of `&`, `|`,
/// `!`, pointwise on drawn positions, for masks `a` and `b` made from drawn captures.
macro_rules! mask_laws {
    ($name:ident, |$c:ident| $a:expr, $b:expr) => {
        #[test]
        fn $name() {
            runner::check(
                stringify!($name),
                law_cases(),
                Persist::No,
                (common::mods::captures(64, 4), position()),
                |($c, at)| {
                    let (a, b) = ($a, $b);
                    let (va, vb) = (a.visible(at), b.visible(at));
                    let laws = [
                        ("a & b", (a.clone() & b.clone()).visible(at), va && vb),
                        ("a | b", (a.clone() | b.clone()).visible(at), va || vb),
                        ("!a", (!a.clone()).visible(at), !va),
                        (
                            "!(a & b) = !a | !b",
                            (!(a.clone() & b.clone())).visible(at),
                            (!a.clone() | !b.clone()).visible(at),
                        ),
                        (
                            "!(a | b) = !a & !b",
                            (!(a.clone() | b.clone())).visible(at),
                            (!a.clone() & !b.clone()).visible(at),
                        ),
                        (
                            "a & b = b & a",
                            (a.clone() & b.clone()).visible(at),
                            (b.clone() & a.clone()).visible(at),
                        ),
                        (
                            "a | b = b | a",
                            (a.clone() | b.clone()).visible(at),
                            (b.clone() | a.clone()).visible(at),
                        ),
                        ("!!a = a", (!!a.clone()).visible(at), va),
                    ];
                    for (law, lhs, rhs) in laws {
                        prop_assert_eq!(
                            lhs,
                            rhs,
                            "{} at {:?} (a = {}, b = {})",
                            law,
                            at,
                            a.name(),
                            b.name()
                        );
                    }
                    Ok(())
                },
            );
        }
    };
}

mask_laws!(
    document_and_streaming_obey_the_mask_laws,
    |c| library::document(Aux::new(c.docs.clone())),
    library::streaming(c.b, c.a)
);
mask_laws!(
    prefix_lm_and_a_user_mask_obey_the_mask_laws,
    |c| library::prefix_lm(c.a),
    checker(c.b)
);
mask_laws!(
    dilated_and_block_strided_obey_the_mask_laws,
    |c| library::dilated(c.b),
    library::block_strided(c.b) & library::causal()
);

/// `derivative` (forward mode over the expression tree) against the central difference of the
/// `f64` host function, at drawn scores and positions. Points within `4h` of a kink (where the
/// one-sided differences disagree: `max`, `clamp`, `abs`) are skipped, and at most a quarter of
/// the cases may be.
macro_rules! derivative_law {
    ($name:ident, |$c:ident| $mod:expr) => {
        #[test]
        fn $name() {
            let skipped = std::cell::Cell::new(0u32);
            runner::check(
                stringify!($name),
                law_cases(),
                Persist::No,
                (common::mods::captures(64, 4), position(), -40.0f64..40.0),
                |($c, at, s)| {
                    let m = $mod;
                    let f = |x: f64| m.apply(x, at);
                    let h = 1e-5 * s.abs().max(1.0);
                    let central = (f(s + h) - f(s - h)) / (2.0 * h);
                    let (left, right) = (
                        (f(s) - f(s - 4.0 * h)) / (4.0 * h),
                        (f(s + 4.0 * h) - f(s)) / (4.0 * h),
                    );
                    if (left - right).abs() > 1e-3 * (1.0 + left.abs()) {
                        skipped.set(skipped.get() + 1);
                        return Ok(());
                    }
                    let d = m.derivative(s, at);
                    prop_assert!(
                        (d - central).abs() <= 1e-6 * (1.0 + d.abs()),
                        "{}: derivative {} vs central difference {} at s = {}, {:?}",
                        m.name(),
                        d,
                        central,
                        s,
                        at
                    );
                    Ok(())
                },
            );
            assert!(
                4 * skipped.get() <= law_cases(),
                "{} of the points were at kinks",
                skipped.get()
            );
        }
    };
}

derivative_law!(softcap_derivative_is_the_central_difference, |c| {
    library::softcap(c.cap)
});
derivative_law!(
    relative_bias_then_softcap_derivative_is_the_central_difference,
    |c| {
        library::relative_bias(Aux::new(c.table.clone()), c.buckets).then(library::softcap(c.cap))
    }
);
derivative_law!(user_score_mod_derivative_is_the_central_difference, |c| {
    wobble(c.gain)
});
derivative_law!(
    alibi_then_user_mod_derivative_is_the_central_difference,
    |c| { library::alibi(Aux::new(c.slopes.clone())).then(wobble(c.gain)) }
);

/// The library's twins of the built-ins give the built-ins' results in the oracle, bit for bit
/// (the same keys, the same arithmetic in the same order): causal, a window, softcap, ALiBi.
#[test]
fn library_twins_of_the_built_ins_are_the_built_ins_in_the_oracle() {
    runner::check(
        "library_twins_of_the_built_ins_are_the_built_ins_in_the_oracle",
        64,
        Persist::No,
        (
            1..=40usize,
            1..=40usize,
            0..12usize,
            0..12usize,
            1.0f32..30.0,
        )
            .prop_flat_map(|(seq_q, seq_k, left, right, cap)| {
                (
                    tensor([1, 4, seq_q, 8]),
                    tensor([1, 2, seq_k, 8]),
                    tensor([1, 2, seq_k, 8]),
                    Just((left, right, cap)),
                )
            }),
        |(q, k, v, (left, right, cap))| {
            let base = AttentionSpec::try_new(4, 2, 8).unwrap();
            let slopes = base.with_alibi().alibi().unwrap().to_vec();
            let same = |built_in: &AttentionSpec, twin: oracle::Output| {
                let reference = oracle::forward(built_in, q.view(), k.view(), v.view());
                prop_assert_eq!(&reference, &twin, "{:?}", built_in);
                Ok(())
            };
            let fwd = |mods: &Mods<_, _>| {
                oracle::try_forward_with(&base, mods, q.view(), k.view(), v.view()).unwrap()
            };
            same(
                &base.with_mask(Mask::NONE.causal()),
                fwd(&Mods::new(library::causal(), NoScore)),
            )?;
            let window = base.try_with_window(left as i64, right as i64).unwrap();
            let twin = oracle::try_forward_with(
                &base,
                &Mods::new(library::sliding_window(left as i32, right as i32), NoScore),
                q.view(),
                k.view(),
                v.view(),
            )
            .unwrap();
            same(&window, twin)?;
            let twin = oracle::try_forward_with(
                &base,
                &Mods::new(NoMask, library::softcap(cap)),
                q.view(),
                k.view(),
                v.view(),
            )
            .unwrap();
            same(&base.try_with_softcap(cap).unwrap(), twin)?;
            let twin = oracle::try_forward_with(
                &base,
                &Mods::new(NoMask, library::alibi(Aux::new(slopes.clone()))),
                q.view(),
                k.view(),
                v.view(),
            )
            .unwrap();
            same(&base.with_alibi(), twin)
        },
    );
}

/// An integer division by zero in a mod panics on the host, with Rust's message, located at the
/// mod's attribute (kernels give 0 instead: `tests/cube_mods.rs`).
#[test]
#[should_panic(expected = "attempt to divide by zero")]
fn an_integer_division_by_zero_panics_on_the_host() {
    let at = Position {
        b: 0,
        h: 0,
        q: 0,
        k: 3,
        seq_q: 1,
        seq_k: 4,
    };
    let _ = common::mods::plus_quotients(0).apply(1.0f64, at);
}

/// A table read outside its elements is a panic on the host that names the mod, the table and
/// the index (kernels clamp instead: they cannot panic).
#[test]
#[should_panic(expected = "mod `relative_bias` read `bias[")]
fn a_table_read_out_of_range_names_the_mod_and_the_table() {
    let bias = library::relative_bias(Aux::new(vec![0.5f32; 4]), 4); // 1 head's worth
    let at = Position {
        b: 0,
        h: 3,
        q: 0,
        k: 0,
        seq_q: 1,
        seq_k: 1,
    };
    let _ = bias.apply(1.0f64, at);
}

#[test]
fn empty_tables_and_values_kernels_cannot_read_are_typed_errors() {
    let error = Aux::<i32>::try_new(Vec::new()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "mod table: a table must hold 1..=2^31-1 elements (kernels index it with i32), got 0"
    );
    let error = Aux::<u32>::try_new(vec![0, 1 << 31]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "mod table: element 1 is 2147483648: kernels compute integers in i32, so a table's values must fit in it"
    );
    assert!(Aux::<u32>::try_new(vec![0, i32::MAX as u32]).is_ok());
}

macro_rules! cpu_family_tests {
    ($name:ident, $variant:expr, $make:expr) => {
        paste::paste! {
            #[test]
            fn [<cpu_ $name _matches_the_oracle>]() {
                for config in [(6, 2, 8), (8, 2, 64)] {
                    let test = format!("{}/{config:?}", stringify!([<cpu_ $name _matches_the_oracle>]));
                    run_family::<f32, Cpu, _, _>(&Cpu::new(), (&test, cpu_cases()), $variant, config, $make);
                }
            }
        }
    };
}

for_each_mod_family!(cpu_family_tests);

macro_rules! cpu_decode_family_tests {
    ($name:ident, $variant:expr, $make:expr) => {
        paste::paste! {
            #[test]
            fn [<cpu_decode_ $name _matches_the_oracle>]() {
                common::mods::run_decode_family(
                    &Cpu::new(),
                    (stringify!([<cpu_decode_ $name _matches_the_oracle>]), cpu_cases()),
                    $variant,
                    6,
                    $make,
                );
            }
        }
    };
}

for_each_decode_family!(cpu_decode_family_tests);

/// The oracle's decode with mods is its forward on the cache's contents, bit for bit, with
/// every sequence's index as its batch entry (the user mask here depends on it).
#[test]
fn oracle_decode_with_mods_is_the_forward_on_the_cache() {
    runner::check(
        "oracle_decode_with_mods_is_the_forward_on_the_cache",
        32,
        Persist::No,
        common::mods::decode_cases(Variant::RightSoftcap, 4),
        |case| {
            let mods = Mods::new(checker(case.captures.b), wobble(case.captures.gain));
            let (cache, seqs) = common::mods::decode_cache(&case);
            let q = case.p.q.mapv(|x| x as f32);
            let k = case.p.k.mapv(|x| x as f32);
            let v = case.p.v.mapv(|x| x as f32);
            let forward =
                oracle::try_forward_with(&case.p.spec, &mods, q.view(), k.view(), v.view())
                    .unwrap();
            let decode =
                oracle::try_decode_with(&case.p.spec, &mods, q.view(), &cache, &seqs).unwrap();
            prop_assert_eq!(forward, decode);
            Ok(())
        },
    );
}

/// [`SortedDocuments`]' tile classification alone, without its row keys: what the block-mask
/// law below runs (row keys fold the mask into the rows' bands, which changes the order of
/// the sums: their own test is `cpu_document_row_keys_match_the_oracle`).
#[derive(Debug)]
struct TilesOnly(SortedDocuments);

impl Classifier for TilesOnly {
    fn classify(&self, tile: &gqa::dsl::block::Tile) -> Option<gqa::dsl::block::TileState> {
        self.0.classify(tile)
    }
}

/// Block masks change nothing but the work done on the CPU: bit-identical outputs with and
/// without them, over tiles of every kind (the causal document mask with its classifier's
/// tiles), and a user mask classified by brute force.
#[test]
fn block_masks_change_no_bit_of_the_cpu_output() {
    let cpu = Cpu::new();
    let mut seen = (0, 0, 0);
    for config in [(6, 2, 8), (8, 2, 64)] {
        // The CPU's tiles: 128 rows of the group and 256 keys; documents of ~100 tokens over
        // lengths up to 200 give empty, partial and full tiles.
        let tiles = |p: &common::Problem| cpu.block_mask_tiles(&p.spec, p.seq_q());
        let documents = |c: &Captures| {
            let docs: Vec<i32> = c.docs.iter().map(|d| d / 8).collect();
            Mods::new(library::document(Aux::new(docs.clone())), NoScore)
                .with_classifier(TilesOnly(SortedDocuments::new(&docs)))
        };
        // The documents under a right band; then under a window, where a row's band may
        // start inside a tile the block mask skips and the sums must still be cut alike
        // (rare in drawn problems: about 1 in 30 reaches it, hence the cases).
        for (family, variant, cases) in [
            ("document", Variant::RightSoftcap, cpu_cases() + 4),
            ("window", Variant::WindowAlibi, cpu_cases() * 16),
        ] {
            let test = format!("block_masks_change_no_bit_of_the_cpu_output/{family}/{config:?}");
            let s = common::mods::run_block_mask_identity::<f32, Cpu, _, _>(
                &cpu,
                (&test, cases),
                variant,
                config,
                tiles,
                documents,
            );
            seen = (seen.0 + s.0, seen.1 + s.1, seen.2 + s.2);
        }
        common::mods::run_block_mask_identity::<f32, Cpu, _, _>(
            &cpu,
            (
                &format!("block_masks_change_no_bit_of_the_cpu_output/streaming/{config:?}"),
                cpu_cases(),
            ),
            Variant::Plain,
            config,
            tiles,
            |c: &Captures| Mods::new(library::streaming(c.b, c.a), wobble(c.gain)),
        );
    }
    eprintln!("CPU tiles (empty, partial, full): {seen:?}");
    assert!(
        seen.0 > 0 && seen.1 > 0 && seen.2 > 0,
        "tiles of every kind: {seen:?}"
    );
}

/// [`Band`] against the masks it describes, by brute force over every pair of drawn problems
/// (`seq_q > seq_k` and bands that miss every key included): its row keys are exactly the keys
/// `library::causal()` or `library::sliding_window(left, right)` shows each query, and a tile
/// it calls empty has no visible pair, one it calls full no hidden one.
#[test]
fn band_row_keys_and_tiles_are_what_the_mask_sees() {
    runner::check(
        "band_row_keys_and_tiles_are_what_the_mask_sees",
        law_cases(),
        Persist::No,
        (
            1..=60usize,
            1..=60usize,
            prop_oneof![Just(None), (-6..=40i32, -6..=40i32).prop_map(Some)],
            1..=24usize,
            1..=24usize,
        ),
        |(seq_q, seq_k, window, q_tile, k_tile)| {
            let (band, mask): (Band, Box<dyn Fn(Position) -> bool>) = match window {
                None => (Band::causal(), Box::new(|at| library::causal().visible(at))),
                Some((left, right)) => (
                    Band::window(left, right),
                    Box::new(move |at| library::sliding_window(left, right).visible(at)),
                ),
            };
            let at = |q: usize, k: usize| Position {
                b: 0,
                h: 1,
                q: q as i64,
                k: k as i64,
                seq_q: seq_q as i64,
                seq_k: seq_k as i64,
            };
            for q in 0..seq_q {
                let row = Row {
                    b: 0,
                    heads: 0..2,
                    q,
                    seq_q,
                    seq_k,
                };
                let Some(keys) = band.row_keys(&row) else {
                    return Err(TestCaseError::fail(format!("no row keys for query {q}")));
                };
                prop_assert!(keys.end <= seq_k, "keys {:?} past {}", keys, seq_k);
                for k in 0..seq_k {
                    prop_assert_eq!(
                        keys.contains(&k),
                        mask(at(q, k)),
                        "query {} key {}: row keys {:?}",
                        q,
                        k,
                        keys
                    );
                }
            }
            for q0 in (0..seq_q).step_by(q_tile) {
                for k0 in (0..seq_k).step_by(k_tile) {
                    let tile = gqa::dsl::block::Tile {
                        b: 0,
                        heads: 0..2,
                        q: q0..(q0 + q_tile).min(seq_q),
                        k: k0..(k0 + k_tile).min(seq_k),
                        seq_q,
                        seq_k,
                    };
                    let seen: Vec<bool> = tile
                        .q
                        .clone()
                        .flat_map(|q| tile.k.clone().map(move |k| (q, k)))
                        .map(|(q, k)| mask(at(q, k)))
                        .collect();
                    match band.classify(&tile) {
                        Some(TileState::Empty) => {
                            prop_assert!(!seen.contains(&true), "{:?} called empty", tile)
                        }
                        Some(TileState::Full) => {
                            prop_assert!(!seen.contains(&false), "{:?} called full", tile)
                        }
                        _ => {}
                    }
                }
            }
            Ok(())
        },
    );
}

/// Zero cost by construction on the CPU: a band written with the DSL and given its [`Band`]
/// classifier runs the built-in band's arithmetic — the same output and LSE, bit for bit —
/// for causal and windows (one side possibly 0), drawn lengths (`seq_q > seq_k` included) and
/// GQA shapes.
#[test]
fn dsl_bands_with_their_classifier_are_the_built_in_bands_bit_for_bit() {
    let cpu = Cpu::new();
    runner::check(
        "dsl_bands_with_their_classifier_are_the_built_in_bands_bit_for_bit",
        cpu_cases() + 4,
        Persist::No,
        (
            1..=300usize,
            1..=300usize,
            prop_oneof![Just(None), (0..=70usize, 0..=70usize).prop_map(Some)],
        )
            .prop_flat_map(|(seq_q, seq_k, window)| {
                (
                    Just(window),
                    tensor([1, 6, seq_q, 8]),
                    tensor([1, 2, seq_k, 8]),
                    tensor([1, 2, seq_k, 8]),
                )
            }),
        |(window, q, k, v)| {
            let spec = *gqa::Gqa::<6, 2, 8>::new().spec();
            let (q, k, v) = (
                q.mapv(|x| x as f32),
                k.mapv(|x| x as f32),
                v.mapv(|x| x as f32),
            );
            let (built_in, written) = match window {
                None => {
                    let mods =
                        Mods::new(library::causal(), NoScore).with_classifier(Band::causal());
                    (
                        cpu.try_forward(
                            &spec.with_mask(Mask::NONE.causal()),
                            q.view(),
                            k.view(),
                            v.view(),
                        ),
                        cpu.try_forward_with(&spec, &mods, q.view(), k.view(), v.view()),
                    )
                }
                Some((left, right)) => {
                    let (l, r) = (left as i32, right as i32);
                    let mods = Mods::new(library::sliding_window(l, r), NoScore)
                        .with_classifier(Band::window(l, r));
                    (
                        cpu.try_forward(
                            &spec.with_mask(Mask::NONE.window(left, right)),
                            q.view(),
                            k.view(),
                            v.view(),
                        ),
                        cpu.try_forward_with(&spec, &mods, q.view(), k.view(), v.view()),
                    )
                }
            };
            let (built_in, written) = (built_in.unwrap(), written.unwrap());
            let bits = |x: &ndarray::ArrayD<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert!(
                bits(&built_in.o.into_dyn()) == bits(&written.o.into_dyn()),
                "outputs differ"
            );
            prop_assert!(
                bits(&built_in.lse.into_dyn()) == bits(&written.lse.into_dyn()),
                "LSEs differ"
            );
            Ok(())
        },
    );
}

/// A band written with the DSL and its [`Band`] classifier (row keys: the CPU prefill folds
/// the mask into each row's band) against the oracle under every mask variant of the spec,
/// with a score mod on top.
#[test]
fn cpu_band_row_keys_match_the_oracle() {
    let variants = [
        (Variant::Plain, (6, 2, 8)),
        (Variant::RightSoftcap, (8, 2, 64)),
        (Variant::WindowAlibi, (6, 3, 8)),
    ];
    cpu_against_the_oracle(
        "cpu_band_row_keys_match_the_oracle/causal",
        &variants,
        |c| Mods::new(library::causal(), wobble(c.gain)).with_classifier(Band::causal()),
    );
    cpu_against_the_oracle(
        "cpu_band_row_keys_match_the_oracle/window",
        &variants,
        |c| {
            let (left, right) = (c.a - 2, c.b - 3);
            Mods::new(library::sliding_window(left, right), wobble(c.gain))
                .with_classifier(Band::window(left, right))
        },
    );
}

/// `make`'s mods on the CPU against the oracle, one family per (variant, config), each named
/// `{name}/{variant}/{config}` (its seed).
fn cpu_against_the_oracle<M: MaskMod, S: ScoreMod>(
    name: &str,
    variants: &[(Variant, (usize, usize, usize))],
    make: impl Fn(&Captures) -> Mods<M, S> + Copy,
) {
    for &(variant, config) in variants {
        let test = format!("{name}/{variant:?}/{config:?}");
        run_family::<f32, Cpu, _, _>(&Cpu::new(), (&test, cpu_cases() + 4), variant, config, make);
    }
}

/// [`SortedDocuments`]' row keys are exactly the keys the document mask shows each query —
/// by brute force over every key, for every query of drawn problems (queries before the keys,
/// `seq_q > seq_k`, included) — and it says nothing for unsorted ids or a table shorter than
/// the keys (where the mask itself would panic).
#[test]
fn document_row_keys_are_what_the_mask_sees() {
    runner::check(
        "document_row_keys_are_what_the_mask_sees",
        law_cases(),
        Persist::No,
        (
            common::mods::captures(80, 4),
            1..=80usize,
            1..=80usize,
            0..2usize,
            0..4usize,
        ),
        |(c, seq_q, seq_k, b, spread)| {
            // Documents of ~12, ~25, ~50 or ~100 tokens.
            let docs: Vec<i32> = c.docs.iter().map(|d| d >> spread).collect();
            let mask = library::document(Aux::new(docs.clone()));
            let classifier = SortedDocuments::new(&docs);
            for q in 0..seq_q {
                let row = Row {
                    b,
                    heads: 0..4,
                    q,
                    seq_q,
                    seq_k,
                };
                let keys = classifier.row_keys(&row);
                let at = |k: usize| Position {
                    b: b as i64,
                    h: 2,
                    q: q as i64,
                    k: k as i64,
                    seq_q: seq_q as i64,
                    seq_k: seq_k as i64,
                };
                if seq_k > docs.len() {
                    prop_assert_eq!(keys, None, "a table shorter than the keys");
                    continue;
                }
                let Some(keys) = keys else {
                    return Err(TestCaseError::fail(format!("no row keys for query {q}")));
                };
                prop_assert!(keys.end <= seq_k, "keys {:?} past {}", keys, seq_k);
                for k in 0..seq_k {
                    prop_assert_eq!(
                        keys.contains(&k),
                        mask.visible(at(k)),
                        "query {} key {}: row keys {:?}",
                        q,
                        k,
                        keys
                    );
                }
            }
            // Mods hand them on with block masks on, and never without them.
            let mods = Mods::new(mask.clone(), NoScore).with_classifier(classifier.clone());
            let row = Row {
                b,
                heads: 0..4,
                q: seq_q - 1,
                seq_q,
                seq_k,
            };
            prop_assert_eq!(mods.row_keys(&row), classifier.row_keys(&row));
            prop_assert_eq!(mods.without_block_masks().row_keys(&row), None);
            // Unsorted ids: nothing (brute force, or the mask per score, decides).
            let mut unsorted = docs.clone();
            unsorted.reverse();
            if unsorted.windows(2).any(|w| w[0] > w[1]) {
                let row = Row {
                    b,
                    heads: 0..4,
                    q: 0,
                    seq_q,
                    seq_k: seq_k.min(unsorted.len()),
                };
                prop_assert_eq!(SortedDocuments::new(&unsorted).row_keys(&row), None);
            }
            Ok(())
        },
    );
}

/// The CPU prefill with the document classifier's row keys (the mask folded into each row's
/// band, evaluated nowhere) against the oracle with the one tolerance rule: sorted documents
/// of drawn lengths under no band, a right band with softcap, a window with ALiBi and all of
/// them at once, with a score mod on top.
#[test]
fn cpu_document_row_keys_match_the_oracle() {
    let variants = [
        (Variant::Plain, (6, 2, 8)),
        (Variant::RightSoftcap, (8, 2, 64)),
        (Variant::WindowAlibi, (6, 3, 8)),
        (Variant::Everything, (4, 4, 16)),
    ];
    cpu_against_the_oracle("cpu_document_row_keys_match_the_oracle", &variants, |c| {
        let docs: Vec<i32> = c.docs.iter().map(|d| d / 2).collect();
        Mods::new(library::document(Aux::new(docs.clone())), wobble(c.gain))
            .with_classifier(SortedDocuments::new(&docs))
    });
}

/// The block-mask cache tells classifiers apart: one mask and one problem, classified first
/// with a classifier that breaks its contract (it calls every tile empty), then by brute
/// force, then with the first again — each gets its own classification, whichever came first
/// (a wrong classifier must not reach mods that do not use it, nor hide behind a right one).
#[test]
fn block_masks_are_cached_per_classifier() {
    #[derive(Debug)]
    struct Liar;
    impl Classifier for Liar {
        fn classify(&self, _: &gqa::dsl::block::Tile) -> Option<gqa::dsl::block::TileState> {
            Some(gqa::dsl::block::TileState::Empty)
        }
    }
    let spec = *gqa::Gqa::<4, 2, 8>::new().spec();
    // Documents of 20 tokens, ids this suite uses nowhere else (a cache entry of their own).
    let docs: Vec<i32> = (0..96).map(|t| 7000 + t / 20).collect();
    let mask = library::document(Aux::new(docs));
    let shape = gqa::spec::ProblemShape {
        batch: 1,
        seq_q: 96,
        seq_k: 96,
    };
    let liar = Mods::new(mask.clone(), NoScore).with_classifier(Liar);
    let all = 2 * 12 * 12;
    assert_eq!(liar.block_mask(&spec, shape, (8, 8)).counts(), (all, 0, 0));
    let (empty, partial, full) = Mods::new(mask, NoScore)
        .block_mask(&spec, shape, (8, 8))
        .counts();
    assert!(
        empty < all && partial > 0 && full > 0 && empty + partial + full == all,
        "brute force: {:?}",
        (empty, partial, full)
    );
    assert_eq!(liar.block_mask(&spec, shape, (8, 8)).counts(), (all, 0, 0));
}

/// The block-mask laws by brute force: a tile called full has every pair of every head of its
/// group visible (band and mask), one called empty none, and the live ranges (per row of tiles
/// and per column) run from the first tile not empty to the last — for classified masks (the sorted
/// documents' classifier, its composition with the band) and brute-force ones, at drawn tile
/// sizes.
#[test]
fn block_mask_states_are_what_brute_force_sees() {
    runner::check(
        "block_mask_states_are_what_brute_force_sees",
        64,
        Persist::No,
        (
            common::mods::cases(Variant::RightSoftcap, (6, 2, 8)),
            1..=40usize,
            1..=70usize,
            0..4usize,
        ),
        |((p, c), q_tile, k_tile, which)| {
            let shape = p
                .spec
                .check_shapes("test", p.q.shape(), p.k.shape(), p.v.shape())
                .unwrap();
            let docs: Vec<i32> = c.docs.iter().map(|d| d / 4).collect();
            let check = |mask: &dyn Fn(Position) -> bool, blocks: &gqa::dsl::block::BlockMask| {
                let (q_tiles, k_tiles) = blocks.tiles();
                for b in 0..shape.batch {
                    for g in 0..2 {
                        for qt in 0..q_tiles {
                            for kt in 0..k_tiles {
                                let (mut any, mut all) = (false, true);
                                for h in g * 3..g * 3 + 3 {
                                    for i in qt * q_tile..((qt + 1) * q_tile).min(shape.seq_q) {
                                        for j in kt * k_tile..((kt + 1) * k_tile).min(shape.seq_k) {
                                            let at = Position {
                                                b: b as i64,
                                                h: h as i64,
                                                q: i as i64,
                                                k: j as i64,
                                                seq_q: shape.seq_q as i64,
                                                seq_k: shape.seq_k as i64,
                                            };
                                            let seen = p.spec.mask().is_visible(
                                                i,
                                                j,
                                                shape.seq_q,
                                                shape.seq_k,
                                            ) && mask(at);
                                            any |= seen;
                                            all &= seen;
                                        }
                                    }
                                }
                                let state = blocks.state(b, g, qt, kt);
                                use gqa::dsl::block::TileState::*;
                                let expected = match (any, all) {
                                    (false, _) => Empty,
                                    (true, true) => Full,
                                    _ => Partial,
                                };
                                prop_assert_eq!(
                                    state,
                                    expected,
                                    "tile ({}, {}, {}, {})",
                                    b,
                                    g,
                                    qt,
                                    kt
                                );
                            }
                        }
                    }
                }
                // The live ranges, rows of tiles and their transpose: from the first tile not
                // empty to the last (`0..0` when all are).
                let live = |tiles: &mut dyn Iterator<Item = (usize, bool)>| {
                    let seen: Vec<usize> = tiles.filter(|t| t.1).map(|t| t.0).collect();
                    match (seen.first(), seen.last()) {
                        (Some(&a), Some(&z)) => a..z + 1,
                        _ => 0..0,
                    }
                };
                let not_empty =
                    |b, g, qt, kt| blocks.state(b, g, qt, kt) != gqa::dsl::block::TileState::Empty;
                let (rows, columns) = (blocks.live_ranges(), blocks.live_query_ranges());
                let (mut r, mut c) = (rows.iter(), columns.iter());
                for b in 0..shape.batch {
                    for g in 0..2 {
                        for qt in 0..q_tiles {
                            let want =
                                live(&mut (0..k_tiles).map(|kt| (kt, not_empty(b, g, qt, kt))));
                            prop_assert_eq!(r.next(), Some(&want), "live key tiles");
                        }
                        for kt in 0..k_tiles {
                            let want =
                                live(&mut (0..q_tiles).map(|qt| (qt, not_empty(b, g, qt, kt))));
                            prop_assert_eq!(c.next(), Some(&want), "live query tiles");
                        }
                    }
                }
                prop_assert_eq!((r.next(), c.next()), (None, None), "ranges left over");
                Ok(())
            };
            match which {
                0 => {
                    let m = library::document(Aux::new(docs.clone()));
                    let mods = Mods::new(m.clone(), NoScore)
                        .with_classifier(gqa::dsl::block::SortedDocuments::new(&docs));
                    check(
                        &|at| m.visible(at),
                        &mods.block_mask(&p.spec, shape, (q_tile, k_tile)),
                    )
                }
                1 => {
                    let m = library::streaming(c.b, c.a);
                    let mods = Mods::new(m.clone(), NoScore);
                    check(
                        &|at| m.visible(at),
                        &mods.block_mask(&p.spec, shape, (q_tile, k_tile)),
                    )
                }
                2 => {
                    // A window written with the DSL, with its analytic classifier.
                    let (left, right) = (c.a - 2, c.b - 3);
                    let m = library::sliding_window(left, right);
                    let mods =
                        Mods::new(m.clone(), NoScore).with_classifier(Band::window(left, right));
                    check(
                        &|at| m.visible(at),
                        &mods.block_mask(&p.spec, shape, (q_tile, k_tile)),
                    )
                }
                _ => {
                    let m = checker(c.b) | library::prefix(c.a);
                    let mods = Mods::new(m.clone(), NoScore);
                    check(
                        &|at| m.visible(at),
                        &mods.block_mask(&p.spec, shape, (q_tile, k_tile)),
                    )
                }
            }
        },
    );
}

/// The varlen oracle is the document mask's problem: for self-attention packings (the same
/// offsets for queries and keys), `oracle::try_forward_varlen` equals the packed batch of one
/// under `library::document` with the spec's band, bit for bit — for every mask side, both
/// alignments, softcap and ALiBi (a document's positions are its own in both: its diagonal and
/// its distances do not move).
#[test]
fn varlen_is_the_document_mask_problem() {
    let strategy = (
        proptest::collection::vec(0..=40usize, 0..=5),
        prop_oneof![
            Just(Variant::Plain),
            Just(Variant::RightSoftcap),
            Just(Variant::LeftBand),
            Just(Variant::WindowAlibi),
            Just(Variant::Everything),
        ],
    )
        .prop_flat_map(|(lengths, variant)| {
            let total: usize = lengths.iter().sum();
            (
                Just(lengths),
                common::forward::spec_for(variant, 6, 2, 8),
                tensor([1, 6, total, 8]),
                tensor([1, 2, total, 8]),
                tensor([1, 2, total, 8]),
            )
        });
    runner::check(
        "varlen_is_the_document_mask_problem",
        law_cases() / 4,
        Persist::No,
        strategy,
        |(lengths, spec, q, k, v)| {
            let packing = gqa::spec::Varlen::from_lengths(&lengths);
            let docs: Vec<i32> = (0..lengths.len())
                .flat_map(|d| std::iter::repeat_n(d as i32, lengths[d]))
                .collect();
            let varlen =
                oracle::try_forward_varlen(&spec, &packing, q.view(), k.view(), v.view()).unwrap();
            // (A table is never empty; without tokens its one entry is never read.)
            let docs = if docs.is_empty() { vec![0] } else { docs };
            let mods = Mods::new(library::document(Aux::new(docs)), NoScore);
            let document =
                oracle::try_forward_with(&spec, &mods, q.view(), k.view(), v.view()).unwrap();
            prop_assert_eq!(varlen, document, "lengths {:?}, spec {:?}", lengths, spec);
            Ok(())
        },
    );
}
