//! The DSL suites' shared half: mods written in a user crate (this one) with the attribute
//! macros, a family of composed mods (library mods under `&`, `|`, `!`, `then`), the drawn
//! captures they take, and the run of one family on a backend against the oracle. Used by
//! `dsl.rs` (the oracle and the CPU backend) and `cube_mods.rs` (the kernels).

use gqa::cache::{Float32, KvCache, Layout, SeqId};
use gqa::dsl::{MaskMod, Mods, NoMask, NoScore, Position, ScoreMod};
use gqa::{AttentionSpec, Element, backend::Backend, oracle};
use ndarray::{Array3, Array4, s};
use proptest::prelude::*;

use super::forward::{self, Variant};
use super::{Problem, runner, tensor};

/// A mask mod written outside `gqa` (the attribute's paths must resolve in a user crate):
/// a checkerboard of `period`-blocks that shifts with the batch entry, plus the diagonal.
#[gqa::mask_mod]
pub fn checker(period: i32, at: Position) -> bool {
    (at.q / period + at.k / period + at.b) % 2 == 0 || at.q == at.k
}

/// A score mod written outside `gqa`, reaching most of the language: `let`, casts, `if`
/// chains, integer and float functions, a scalar capture, the query head.
#[gqa::score_mod]
pub fn wobble(gain: f32, s: f32, at: Position) -> f32 {
    let d = (at.q - at.k) as f32;
    if at.h % 3 == 0 {
        s * gain + sqrt(abs(d)) * 0.125
    } else if at.h % 3 == 1 {
        max(s, 0.0 - d * 0.25) - floor(d / 7.0)
    } else {
        clamp(s, -4.0, 4.0) + exp(0.0 - abs(d) / 16.0) - ln(1.0 + abs(d))
    }
}

/// A mask mod that hangs on the sign of a remainder: Rust's `%` takes the dividend's (`-5 % 3 ==
/// -2`), so keys `k < q` with `(k − q) % period == 1 − period` are hidden; a remainder with the
/// divisor's sign (GLSL's `%` on Mesa) would hide none.
#[gqa::mask_mod]
pub fn remainder_stripes(period: i32, at: Position) -> bool {
    (at.k - at.q) % period != 1 - period
}

/// A score mod with a float remainder of a negative dividend: a sawtooth of the distance.
#[gqa::score_mod]
pub fn remainder_ramp(gain: f32, s: f32, at: Position) -> f32 {
    s + gain * ((at.k - at.q) as f32 % 2.5)
}

/// A score mod that divides by a capture: `s + ((k + 1) / z + (k + 1) % z)`. With `z = 0` the
/// host panics and kernels add 0 (the `gqa::dsl` docs, "Integer division by zero").
#[gqa::score_mod]
pub fn plus_quotients(z: i32, s: f32, at: Position) -> f32 {
    s + ((at.k + 1) / z + (at.k + 1) % z) as f32
}

/// The captures a family draws, sized for a problem (tables cover every position of both
/// lengths).
#[derive(Debug, Clone)]
pub struct Captures {
    /// Sorted document ids, one per position.
    pub docs: Vec<i32>,
    /// A length-like number: a prefix, a window.
    pub a: i32,
    /// A small positive number: sinks, a dilation, a block, a period.
    pub b: i32,
    /// A bias table of `q_heads · buckets`.
    pub table: Vec<f32>,
    pub buckets: i32,
    pub cap: f32,
    /// One ALiBi slope per query head.
    pub slopes: Vec<f32>,
    pub gain: f32,
}

/// Captures for a problem of `positions` positions and `q_heads` query heads.
pub fn captures(positions: usize, q_heads: usize) -> impl Strategy<Value = Captures> {
    let n = positions.max(1);
    (
        proptest::collection::vec(prop::bool::weighted(0.08), n),
        0..=(n as i32 + 2),
        1..=9i32,
        1..=16i32,
        1.0f32..30.0,
        proptest::collection::vec(0.0f32..0.5, q_heads),
        0.25f32..2.0,
    )
        .prop_flat_map(move |(starts, a, b, buckets, cap, slopes, gain)| {
            let docs: Vec<i32> = starts
                .iter()
                .scan(0i32, |doc, &start| {
                    *doc += i32::from(start);
                    Some(*doc)
                })
                .collect();
            proptest::collection::vec(-2.0f32..2.0, q_heads * buckets as usize).prop_map(
                move |table| Captures {
                    docs: docs.clone(),
                    a,
                    b,
                    table,
                    buckets,
                    cap,
                    slopes: slopes.clone(),
                    gain,
                },
            )
        })
}

/// A problem of `variant` with captures for it. Lengths are 1..=200 (the edge lengths are the
/// forward suites' business; here the mods must have positions to act on), batch 1 or 2.
pub fn cases(
    variant: Variant,
    (q_heads, kv_heads, head_dim): (usize, usize, usize),
) -> impl Strategy<Value = (Problem, Captures)> {
    let length = || prop_oneof![1 => 1..=16usize, 2 => 17..=200usize];
    (
        1..=2usize,
        length(),
        length(),
        forward::spec_for(variant, q_heads, kv_heads, head_dim),
        forward::query_gain(),
    )
        .prop_flat_map(move |(batch, seq_q, seq_k, spec, gain)| {
            (
                Just(spec),
                tensor([batch, q_heads, seq_q, head_dim]).prop_map(move |q| q * gain),
                tensor([batch, kv_heads, seq_k, head_dim]),
                tensor([batch, kv_heads, seq_k, head_dim]),
                captures(seq_q.max(seq_k), q_heads),
            )
                .prop_map(|(spec, q, k, v, c)| (Problem { spec, q, k, v }, c))
        })
}

/// Whether `mods` change anything in `p`: a pair the band shows that the mask hides, or a
/// score the score mod moves.
pub fn acts<M: MaskMod, S: ScoreMod>(p: &Problem, mods: &Mods<M, S>) -> bool {
    let plain = oracle::try_scores(&p.spec, p.q.view(), p.k.view()).unwrap();
    let modded = oracle::try_scores_with(&p.spec, mods, p.q.view(), p.k.view()).unwrap();
    plain.iter().zip(&modded).any(|(a, b)| a != b)
}

/// Runs `cases` problems of `variant` with the mods `make` builds from their captures on
/// `backend`, each checked against the oracle with the same mods (`forward::check_with`).
/// The mods must act (hide a pair or move a score) in at least half of the cases: a family
/// whose drawn captures did nothing would prove nothing.
pub fn run_family<T: Element, B: Backend<T>, M: MaskMod, S: ScoreMod>(
    backend: &B,
    (test, cases_per_test): (&str, u32),
    variant: Variant,
    config: (usize, usize, usize),
    make: impl Fn(&Captures) -> Mods<M, S>,
) {
    let acted = std::cell::Cell::new(0u32);
    runner::check(
        test,
        cases_per_test,
        runner::Persist::No,
        cases(variant, config),
        |(p, c)| {
            let mods = make(&c);
            acted.set(acted.get() + u32::from(acts(&p, &mods)));
            forward::check_with::<T, B, M, S>(backend, &p, &mods).map(|_| ())
        },
    );
    assert!(
        2 * acted.get() >= cases_per_test,
        "{test}: the mods acted in only {} of {cases_per_test} cases",
        acted.get()
    );
}

/// The family of composed mods every backend is checked on: `$m!(name, variant, |c| mods)`
/// once per member. Each member is its own mod type, so each compiles its own kernel.
#[macro_export]
macro_rules! for_each_mod_family {
    ($m:ident) => {
        $m!(document_causal, Variant::Plain, |c: &Captures| Mods::new(
            library::document(Aux::new(c.docs.clone())) & library::causal(),
            NoScore
        ));
        $m!(prefix_lm, Variant::Plain, |c: &Captures| Mods::new(
            library::prefix_lm(c.a),
            NoScore
        ));
        $m!(streaming, Variant::Plain, |c: &Captures| Mods::new(
            library::streaming(c.b, c.a),
            NoScore
        ));
        $m!(not_dilated_or_sinks, Variant::LeftBand, |c: &Captures| {
            Mods::new(!library::dilated(c.b) | library::sinks(c.b), NoScore)
        });
        $m!(
            block_strided_outside_documents,
            Variant::Plain,
            |c: &Captures| Mods::new(
                library::block_strided(c.b) & !library::document(Aux::new(c.docs.clone())),
                NoScore
            )
        );
        $m!(
            relative_bias_then_softcap,
            Variant::Plain,
            |c: &Captures| {
                Mods::new(
                    NoMask,
                    library::relative_bias(Aux::new(c.table.clone()), c.buckets)
                        .then(library::softcap(c.cap)),
                )
            }
        );
        $m!(
            document_with_alibi,
            Variant::RightSoftcap,
            |c: &Captures| {
                Mods::new(
                    library::document(Aux::new(c.docs.clone())),
                    library::alibi(Aux::new(c.slopes.clone())),
                )
            }
        );
        $m!(
            user_checker_and_wobble,
            Variant::WindowAlibi,
            |c: &Captures| { Mods::new(checker(c.b), wobble(c.gain)) }
        );
        $m!(user_remainders, Variant::Plain, |c: &Captures| Mods::new(
            common::mods::remainder_stripes(c.b + 1),
            common::mods::remainder_ramp(c.gain)
        ));
    };
}

/// The spec built-ins are untouched by the mods helpers (silences the import when a suite
/// uses only some of them).
pub fn _uses(_: AttentionSpec, _: NoMask, _: NoScore) {}

/// A decode problem: `seqs` sequences of one length in a paged f32 cache (appended in
/// interleaved halves, so pages are not in order), and their newest queries.
#[derive(Debug, Clone)]
pub struct DecodeCase {
    pub p: Problem,
    pub page_size: usize,
    pub captures: Captures,
}

/// Decode cases of `variant` at `(q_heads, 2, 8)`: 1–3 sequences of 1–150 tokens, 1–4 queries.
pub fn decode_cases(variant: Variant, q_heads: usize) -> impl Strategy<Value = DecodeCase> {
    (
        1..=3usize,
        1..=150usize,
        1..=4usize,
        2..=16usize,
        forward::spec_for(variant, q_heads, 2, 8),
    )
        .prop_flat_map(move |(seqs, len, seq_q, page_size, spec)| {
            let seq_q = seq_q.min(len);
            (
                Just(spec),
                tensor([seqs, q_heads, seq_q, 8]),
                tensor([seqs, 2, len, 8]),
                tensor([seqs, 2, len, 8]),
                Just(page_size),
                captures(len, q_heads),
            )
                .prop_map(|(spec, q, k, v, page_size, captures)| DecodeCase {
                    p: Problem { spec, q, k, v },
                    page_size,
                    captures,
                })
        })
}

/// The paged f32 cache of a decode case, and its sequences (in the case's order).
pub fn decode_cache(case: &DecodeCase) -> (KvCache<2, 8, Float32>, Vec<SeqId>) {
    let (seqs, len) = (case.p.k.shape()[0], case.p.k.shape()[2]);
    let pages = seqs * (len.div_ceil(case.page_size) + 1);
    let mut cache = KvCache::<2, 8, Float32>::new(Layout::Paged {
        page_size: case.page_size,
        pages,
    });
    let ids: Vec<SeqId> = (0..seqs)
        .map(|_| cache.try_add_sequence().unwrap())
        .collect();
    let half = len / 2;
    for range in [0..half, half..len] {
        for (b, &id) in ids.iter().enumerate() {
            let k = case
                .p
                .k
                .slice(s![b, .., range.clone(), ..])
                .mapv(|x| x as f32);
            let v = case
                .p
                .v
                .slice(s![b, .., range.clone(), ..])
                .mapv(|x| x as f32);
            cache.try_append(id, k.view(), v.view()).unwrap();
        }
    }
    (cache, ids)
}

/// A backend that decodes with user mods.
pub trait ModDecode {
    fn decode_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: &Array4<f32>,
        cache: &KvCache<2, 8, Float32>,
        seqs: &[SeqId],
    ) -> (Array4<f32>, Array3<f32>);
}

/// Decodes `cases` drawn cases with the mods `make` builds on `backend`, each checked as the
/// forward problem it is (every sequence's cache contents as its keys and values) against the
/// oracle with the same mods: decode positions are forward positions (`forward::check_with`'s
/// rule). The mods must act in at least half of the cases.
pub fn run_decode_family<B: ModDecode, M: MaskMod, S: ScoreMod>(
    backend: &B,
    (test, cases_per_test): (&str, u32),
    variant: Variant,
    q_heads: usize,
    make: impl Fn(&Captures) -> Mods<M, S>,
) {
    let acted = std::cell::Cell::new(0u32);
    runner::check(
        test,
        cases_per_test,
        runner::Persist::No,
        decode_cases(variant, q_heads),
        |case| {
            let mods = make(&case.captures);
            acted.set(acted.get() + u32::from(acts(&case.p, &mods)));
            let (cache, seqs) = decode_cache(&case);
            let narrow = |x: &Array4<f64>| x.mapv(|x| x as f32);
            let (q, k, v) = (narrow(&case.p.q), narrow(&case.p.k), narrow(&case.p.v));
            let (o, lse) = backend.decode_with(&case.p.spec, &mods, &q, &cache, &seqs);
            forward::check_output_with(&case.p, &mods, (&q, &k, &v), &o, &lse).map(|_| ())
        },
    );
    assert!(
        2 * acted.get() >= cases_per_test,
        "{test}: the mods acted in only {} of {cases_per_test} cases",
        acted.get()
    );
}

impl ModDecode for gqa::cpu::Cpu {
    fn decode_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: &Array4<f32>,
        cache: &KvCache<2, 8, Float32>,
        seqs: &[SeqId],
    ) -> (Array4<f32>, Array3<f32>) {
        let out = self
            .try_decode_with(spec, mods, q.view(), cache, seqs)
            .unwrap();
        (out.o, out.lse)
    }
}

impl ModDecode for gqa::cube::CubeDevice {
    fn decode_with<M: MaskMod, S: ScoreMod>(
        &self,
        spec: &AttentionSpec,
        mods: &Mods<M, S>,
        q: &Array4<f32>,
        cache: &KvCache<2, 8, Float32>,
        seqs: &[SeqId],
    ) -> (Array4<f32>, Array3<f32>) {
        let mut copy = self.try_upload_cache(cache).unwrap();
        let q = self.try_upload(q.view()).unwrap();
        let out = self
            .try_decode_with(spec, mods, &q, cache, &mut copy, seqs)
            .unwrap();
        let o = self
            .try_download(&out.o)
            .unwrap()
            .into_dimensionality()
            .unwrap();
        let lse = self
            .try_download(&out.lse)
            .unwrap()
            .into_dimensionality()
            .unwrap();
        (o, lse)
    }
}

/// The members of the family that decode runs: `$m!(name, variant, |c| mods)`.
#[macro_export]
macro_rules! for_each_decode_family {
    ($m:ident) => {
        $m!(document_causal, Variant::Plain, |c: &Captures| Mods::new(
            library::document(Aux::new(c.docs.clone())) & library::causal(),
            NoScore
        ));
        $m!(streaming, Variant::RightSoftcap, |c: &Captures| Mods::new(
            library::streaming(c.b, c.a),
            NoScore
        ));
        $m!(
            relative_bias_then_softcap,
            Variant::WindowAlibi,
            |c: &Captures| {
                Mods::new(
                    NoMask,
                    library::relative_bias(Aux::new(c.table.clone()), c.buckets)
                        .then(library::softcap(c.cap)),
                )
            }
        );
        $m!(user_checker_and_wobble, Variant::Plain, |c: &Captures| {
            Mods::new(checker(c.b), wobble(c.gain))
        });
    };
}

/// Runs `cases` problems of `variant` with the mods `make` builds on `backend` twice — with
/// block masks and without (every tile partial) — and asks for bit-identical outputs: a block
/// mask may only skip work whose result is nothing and drop mask tests that pass anyway.
/// Returns the tiles seen (empty, partial, full) at the tiles `tiles` gives for a problem (the
/// backend's own), so a caller can check the cases reached every kind.
pub fn run_block_mask_identity<T: Element, B: Backend<T>, M: MaskMod, S: ScoreMod>(
    backend: &B,
    (test, cases_per_test): (&str, u32),
    variant: Variant,
    config: (usize, usize, usize),
    tiles: impl Fn(&Problem) -> (usize, usize),
    make: impl Fn(&Captures) -> Mods<M, S>,
) -> (usize, usize, usize) {
    let seen = std::cell::Cell::new((0, 0, 0));
    runner::check(
        test,
        cases_per_test,
        runner::Persist::No,
        cases(variant, config),
        |(p, c)| {
            let mods = make(&c);
            let shape = p
                .spec
                .check_shapes("test", p.q.shape(), p.k.shape(), p.v.shape())
                .unwrap();
            let (e, pa, f) = mods.block_mask(&p.spec, shape, tiles(&p)).counts();
            let s = seen.get();
            seen.set((s.0 + e, s.1 + pa, s.2 + f));
            let narrow = |x: &Array4<f64>| x.mapv(T::narrow);
            let (q, k, v) = (narrow(&p.q), narrow(&p.k), narrow(&p.v));
            let with = backend
                .try_forward_with(&p.spec, &mods, q.view(), k.view(), v.view())
                .unwrap();
            let without = backend
                .try_forward_with(
                    &p.spec,
                    &mods.clone().without_block_masks(),
                    q.view(),
                    k.view(),
                    v.view(),
                )
                .unwrap();
            let bits = |o: &Array4<T>| o.iter().map(|x| x.widen().to_bits()).collect::<Vec<_>>();
            prop_assert!(
                bits(&with.o) == bits(&without.o),
                "o differs with and without the block mask"
            );
            let lse_bits = |l: &Array3<f32>| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert!(
                lse_bits(&with.lse) == lse_bits(&without.lse),
                "lse differs with and without the block mask"
            );
            Ok(())
        },
    );
    seen.get()
}
