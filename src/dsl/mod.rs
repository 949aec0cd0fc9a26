//! The DSL proper: user-written mask and score functions — one definition, checked by the
//! compiler, monomorphised into the `f64` oracle, the CPU backend and a cubecl kernel.
//!
//! A **mask mod** answers "may query `at.q` of query head `at.h` in batch entry `at.b` see key
//! `at.k`?"; a **score mod** maps a score at such a position to another. Both are written as one
//! restricted Rust function under an attribute:
//!
//! ```
//! use gqa::dsl::{Aux, Position};
//!
//! /// Packed sequences: a query sees only the keys of its own document.
//! #[gqa::mask_mod]
//! fn same_document(doc: &Aux<i32>, at: Position) -> bool {
//!     doc[at.q] == doc[at.k]
//! }
//!
//! /// A relative-position bias per query head, from a table of 64 distances.
//! #[gqa::score_mod]
//! fn rel_bias(bias: &Aux<f32>, s: f32, at: Position) -> f32 {
//!     s + bias[at.h * 64 + min(abs(at.q - at.k), 63)]
//! }
//!
//! use gqa::dsl::{MaskMod, ScoreMod};
//! let mask = same_document(Aux::new(vec![0, 0, 1, 1]));
//! assert!(mask.visible(Position { b: 0, h: 0, q: 1, k: 0, seq_q: 4, seq_k: 4 }));
//! assert!(!mask.visible(Position { b: 0, h: 0, q: 2, k: 1, seq_q: 4, seq_k: 4 }));
//! let bias = rel_bias(Aux::new(vec![0.25f32; 64]));
//! let at = Position { b: 0, h: 0, q: 3, k: 1, seq_q: 4, seq_k: 4 };
//! assert_eq!(bias.apply(1.0f64, at), 1.25);
//! assert_eq!(bias.derivative(1.0, at), 1.0);
//! ```
//!
//! Each attribute turns the function into a constructor (`same_document(doc)`, taking the
//! captures — every parameter before the score and the position — by value) of a type named
//! in CamelCase (`SameDocument`) that implements [`MaskMod`] or [`ScoreMod`]:
//! - a host implementation generic over the number type ([`Real`]: `f64` for the oracle, `f32`
//!   for the CPU backend and the tolerance rule's yardstick, [`Dual`] for derivatives);
//! - the `#[cube]` implementation the kernels are generic over (in builds with a cubecl
//!   runtime), compiled once per mod type;
//! - for a score mod, its derivative in the score, forward-mode over the function's expression
//!   tree: on the host by evaluating it on [`Dual`] numbers ([`ScoreMod::derivative`]), and as
//!   kernel code (`cube::CubeScore::tangent`, the same rules) for the kernels' backward.
//!
//! **The language.** Parameters: `&Aux<i32>`, `&Aux<u32>`, `&Aux<f32>` (read-only tables),
//! `i32`, `u32`, `f32` (scalars), then for a score mod the score `f32`, then the [`Position`].
//! The body is `let` statements and one final expression over: integer and float literals
//! (finite), `true`/`false`, the position's fields, the captures (tables indexed by an integer
//! expression), `+ - * / %`, comparisons, `&& || !`, `if c { a } else { b }` (both arms
//! evaluated), `as f32` (integer → float) and `as i32` (float → integer, toward zero), and the
//! functions `min max abs exp ln tanh sqrt floor clamp`. Integers are `i64` on the host and
//! `i32` in kernels (positions below 2³¹); floats `f64`/`f32` on the host, `f32` in kernels.
//! Anything else — loops, `return`, method calls, other functions, paths such as
//! `f32::INFINITY`, a literal that is not finite in `f32`, integer/float mixing without a cast —
//! is a compile error at the offending tokens.
//!
//! **Tables out of range.** On the host a table read outside `0..len` panics, naming the mod,
//! the table and the index (so the oracle rejects such a mod); a kernel clamps the index into
//! the table (never reads outside its buffer).
//!
//! **Integer division by zero.** On the host an integer `/` or `%` by zero panics as Rust does
//! (its message, located at the mod's attribute), so the oracle rejects such a mod; a kernel
//! gives 0 for both (never a value its shading language leaves undefined).
//!
//! **Semantics.** A user mask is *intersected* with the spec's built-in band mask (causal,
//! window): a key is visible when both allow it. A user score mod applies *after* the built-in
//! modifiers (scale, softcap, ALiBi: [`crate::spec::score`]). Positions are those of the
//! problem: in a forward pass `0 <= q < seq_q`, `0 <= k < seq_k`, `h` the *query* head (under
//! GQA several query heads share a KV head, as in FlexAttention).
//!
//! **Composition.** Masks combine with `&`, `|`, `!` ([`And`], [`Or`], [`Not`]); score mods
//! chain with [`ScoreMod::then`] ([`Then`]). All are generic structs: zero cost, one kernel per
//! composed type. [`Mods`] carries one mask and one score mod to an executor.

pub mod block;
mod compose;
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]
pub mod cube;
pub mod library;
mod real;

pub use compose::{And, NoMask, NoScore, Not, Or, Then};
pub use real::{Dual, Real};

use std::sync::Arc;

use crate::error::{Error, Result};

/// Where a score sits: batch entry, *query* head, query and key positions, and both lengths.
/// Signed, so that differences such as `at.q - at.k` are plain integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// Batch entry.
    pub b: i64,
    /// Query head (under GQA, the query head — not the KV head it reads).
    pub h: i64,
    /// Query position, `0 <= q < seq_q`.
    pub q: i64,
    /// Key position, `0 <= k < seq_k`.
    pub k: i64,
    /// Queries in the problem.
    pub seq_q: i64,
    /// Keys in the problem.
    pub seq_k: i64,
}

/// An element type a table ([`Aux`]) may hold: stored as 32-bit words on devices.
pub trait AuxElement: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The word a device buffer holds for this value (the bits of an `f32`, two's complement).
    fn to_word(self) -> u32;
    /// Whether kernels read this value as the host does: integers are `i32` in kernels, so a
    /// `u32` above `i32::MAX` would read negative there.
    fn fits(self) -> bool {
        true
    }
}

impl AuxElement for i32 {
    fn to_word(self) -> u32 {
        self as u32
    }
}

impl AuxElement for u32 {
    fn to_word(self) -> u32 {
        self
    }
    fn fits(self) -> bool {
        i32::try_from(self).is_ok()
    }
}

impl AuxElement for f32 {
    fn to_word(self) -> u32 {
        self.to_bits()
    }
}

/// A read-only table a mod captures (document ids, a bias table, ...), shared, never copied
/// when the mod is cloned. Never empty.
#[derive(Clone, PartialEq)]
pub struct Aux<T> {
    data: Arc<[T]>,
}

impl<T: AuxElement> Aux<T> {
    /// A table of `data`.
    ///
    /// # Panics
    /// If `data` is empty, longer than `i32::MAX`, or holds a `u32` above `i32::MAX`
    /// ([`Aux::try_new`] returns the error).
    #[track_caller]
    pub fn new(data: impl Into<Vec<T>>) -> Aux<T> {
        match Aux::try_new(data) {
            Ok(aux) => aux,
            Err(error) => panic!("{error}"),
        }
    }

    /// [`Aux::new`], returning [`Error::Aux`] for an empty or too long table, or a `u32` value
    /// above `i32::MAX` (kernels compute integers in `i32`).
    pub fn try_new(data: impl Into<Vec<T>>) -> Result<Aux<T>> {
        let data: Vec<T> = data.into();
        if data.is_empty() || data.len() > i32::MAX as usize {
            return Err(Error::Aux {
                reason: format!(
                    "a table must hold 1..=2^31-1 elements (kernels index it with i32), got {}",
                    data.len()
                ),
            });
        }
        if let Some(index) = data.iter().position(|x| !x.fits()) {
            return Err(Error::Aux {
                reason: format!(
                    "element {index} is {:?}: kernels compute integers in i32, so a table's values must fit in it",
                    data[index]
                ),
            });
        }
        Ok(Aux { data: data.into() })
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }

    /// Element `index`, as a mod's host code reads it.
    ///
    /// # Panics
    /// Outside `0..len`, naming the mod and the table.
    #[track_caller]
    pub fn read(&self, index: i64, r#mod: &str, table: &str) -> T {
        match usize::try_from(index).ok().and_then(|i| self.data.get(i)) {
            Some(&x) => x,
            None => panic!(
                "mod `{mod}` read `{table}[{index}]`, outside its {} elements",
                self.data.len(),
                r#mod = r#mod
            ),
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Aux<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aux[{}]", self.data.len())
    }
}

/// What a mod captures, in the order its kernel reads it: one slot per table or scalar.
/// Implemented by the attribute macros and the combinators.
pub trait Captures {
    /// Slots this mod reads (tables and scalars, combinators summing their parts').
    const SLOTS: u32;
    /// Appends this mod's slots, in order, as device words.
    fn captured_words(&self, slots: &mut Vec<Vec<u32>>);
}

#[cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]
mod kernel_bound {
    /// In builds with a cubecl runtime: a mask mod also has a kernel implementation.
    pub trait MaskKernel: super::cube::CubeMask {}
    impl<T: super::cube::CubeMask> MaskKernel for T {}
    /// In builds with a cubecl runtime: a score mod also has a kernel implementation.
    pub trait ScoreKernel: super::cube::CubeScore {}
    impl<T: super::cube::CubeScore> ScoreKernel for T {}
}
#[cfg(not(any(feature = "wgpu", feature = "cuda", feature = "hip")))]
mod kernel_bound {
    /// In builds without a cubecl runtime: nothing more.
    pub trait MaskKernel {}
    impl<T> MaskKernel for T {}
    /// In builds without a cubecl runtime: nothing more.
    pub trait ScoreKernel {}
    impl<T> ScoreKernel for T {}
}
pub use kernel_bound::{MaskKernel, ScoreKernel};

/// A user mask: which keys a query may see (intersected with the spec's band mask). Made by
/// `#[gqa::mask_mod]`, the [`library`], or composition with `&`, `|`, `!`.
pub trait MaskMod: Captures + MaskKernel + Clone + Send + Sync + std::fmt::Debug + 'static {
    /// True when this mask hides nothing by construction ([`NoMask`]): executors skip it.
    const TRIVIAL: bool = false;
    /// A name for messages.
    fn name(&self) -> String;
    /// Whether the query at `at` may see the key at `at`.
    fn visible(&self, at: Position) -> bool;
}

/// A user score mod: a function of the score (after the spec's built-in modifiers) and its
/// position. Made by `#[gqa::score_mod]`, the [`library`], or chained with [`ScoreMod::then`].
pub trait ScoreMod:
    Captures + ScoreKernel + Clone + Send + Sync + std::fmt::Debug + 'static
{
    /// True when this mod is the identity by construction ([`NoScore`]): executors skip it.
    const TRIVIAL: bool = false;
    /// A name for messages.
    fn name(&self) -> String;
    /// The modified score, in any [`Real`] number type.
    fn apply<N: Real>(&self, s: N, at: Position) -> N;

    /// `d apply(s, at) / ds`, by forward-mode differentiation ([`Dual`]).
    fn derivative(&self, s: f64, at: Position) -> f64 {
        self.apply(Dual::variable(s), at).d
    }

    /// `self`, then `next`: `next.apply(self.apply(s, at), at)`.
    fn then<B: ScoreMod>(self, next: B) -> Then<Self, B> {
        Then(self, next)
    }
}

/// One mask mod and one score mod, as the executors take them, and optionally a
/// [`block::Classifier`] for the mask (how its tiles are classified without brute force).
#[derive(Debug, Clone)]
pub struct Mods<M = NoMask, S = NoScore> {
    mask: M,
    score: S,
    classifier: Option<Arc<dyn block::Classifier>>,
    /// Whether executors classify the mask's tiles ([`block`]); off, every tile is partial.
    block_masks: bool,
}

impl Mods<NoMask, NoScore> {
    /// No user mods: the spec alone.
    pub fn none() -> Mods<NoMask, NoScore> {
        Mods {
            mask: NoMask,
            score: NoScore,
            classifier: None,
            block_masks: true,
        }
    }
}

impl Default for Mods<NoMask, NoScore> {
    fn default() -> Self {
        Mods::none()
    }
}

impl<M: MaskMod, S: ScoreMod> Mods<M, S> {
    /// `mask` and `score`.
    pub fn new(mask: M, score: S) -> Mods<M, S> {
        Mods {
            mask,
            score,
            classifier: None,
            block_masks: true,
        }
    }

    /// These mods without block masks: every tile is partial, the mask evaluated per score
    /// everywhere the band allows (what a block mask must not change: the suites compare the
    /// two bit for bit). The classifier's row keys ([`Mods::row_keys`]) go too; they are not
    /// held to that law in the CPU prefill, where folding the mask into each row's band also
    /// cuts the sums in other blocks (the same values, rounded otherwise; the CPU backward
    /// keeps the bits).
    pub fn without_block_masks(self) -> Mods<M, S> {
        Mods {
            block_masks: false,
            ..self
        }
    }

    /// Whether executors use block masks for these mods.
    pub fn block_masks(&self) -> bool {
        self.block_masks
    }

    /// These mods with `classifier` classifying the mask's tiles ([`block`]): it must never
    /// call a tile full or empty that the mask does not make so.
    pub fn with_classifier(self, classifier: impl block::Classifier + 'static) -> Mods<M, S> {
        Mods {
            classifier: Some(Arc::new(classifier)),
            ..self
        }
    }

    /// The block mask of these mods' mask for a problem, cut in tiles of `(q_tile, k_tile)`
    /// (cached: the same problem is classified once).
    pub fn block_mask(
        &self,
        spec: &crate::AttentionSpec,
        shape: crate::spec::ProblemShape,
        tiles: (usize, usize),
    ) -> Arc<block::BlockMask> {
        block::cached(spec, &self.mask, self.classifier.as_ref(), shape, tiles)
    }

    /// The keys the mask lets `row` see, when the classifier knows them as one interval
    /// ([`block::Classifier::row_keys`]) and these mods use block masks; `None` otherwise.
    pub fn row_keys(&self, row: &block::Row) -> Option<std::ops::Range<usize>> {
        if M::TRIVIAL || !self.block_masks {
            return None;
        }
        self.classifier.as_deref()?.row_keys(row)
    }

    /// The mask mod.
    pub fn mask(&self) -> &M {
        &self.mask
    }

    /// The score mod.
    pub fn score(&self) -> &S {
        &self.score
    }

    /// These mods with `mask` intersected into the mask.
    pub fn and_mask<M2: MaskMod>(self, mask: M2) -> Mods<And<M, M2>, S> {
        Mods {
            mask: And(self.mask, mask),
            score: self.score,
            // A classifier of the old mask says nothing about the intersection's full tiles.
            classifier: None,
            block_masks: self.block_masks,
        }
    }

    /// These mods with `score` applied after the score mod.
    pub fn then_score<S2: ScoreMod>(self, score: S2) -> Mods<M, Then<S, S2>> {
        Mods {
            mask: self.mask,
            score: Then(self.score, score),
            classifier: self.classifier,
            block_masks: self.block_masks,
        }
    }

    /// True when neither mod does anything ([`Mods::none`]).
    pub fn is_trivial(&self) -> bool {
        M::TRIVIAL && S::TRIVIAL
    }

    /// The words a kernel reads its captures from: a header of `[offset, len]` per slot (the
    /// mask's slots first, then the score's), then the slots' data. Never empty.
    pub fn captured_words(&self) -> Vec<u32> {
        let mut slots = Vec::new();
        self.mask.captured_words(&mut slots);
        self.score.captured_words(&mut slots);
        debug_assert_eq!(slots.len(), (M::SLOTS + S::SLOTS) as usize);
        let mut words =
            Vec::with_capacity(2 * slots.len() + slots.iter().map(Vec::len).sum::<usize>() + 1);
        let mut offset = 2 * slots.len();
        for slot in &slots {
            words.extend([offset as u32, slot.len() as u32]);
            offset += slot.len();
        }
        for slot in slots {
            words.extend(slot);
        }
        if words.is_empty() {
            words.push(0);
        }
        words
    }

    /// Whether the key at `at` is visible under the user mask (not the spec's band).
    pub fn visible(&self, at: Position) -> bool {
        M::TRIVIAL || self.mask.visible(at)
    }

    /// The user score mod at `at`.
    pub fn score_at<N: Real>(&self, s: N, at: Position) -> N {
        if S::TRIVIAL {
            s
        } else {
            self.score.apply(s, at)
        }
    }
}

/// Support for the code `#[gqa::mask_mod]` and `#[gqa::score_mod]` generate. Not public API.
#[doc(hidden)]
pub mod __private {
    pub use super::{Aux, AuxElement, Captures, MaskMod, Position, Real, ScoreMod};
    #[cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]
    pub use ::cubecl;

    /// Reads element `index` of a table as an integer.
    #[track_caller]
    pub fn read_int<T: AuxElement + Into<i64>>(
        table: &Aux<T>,
        index: i64,
        m: &str,
        name: &str,
    ) -> i64 {
        table.read(index, m, name).into()
    }

    /// Reads element `index` of a float table.
    #[track_caller]
    pub fn read_float<N: Real>(table: &Aux<f32>, index: i64, m: &str, name: &str) -> N {
        N::from_f32(table.read(index, m, name))
    }

    /// A table's device words.
    pub fn table_words<T: AuxElement>(table: &Aux<T>) -> Vec<u32> {
        table.as_slice().iter().map(|&x| x.to_word()).collect()
    }
}

/// Expands to its input in builds with a cubecl runtime, to nothing otherwise: how the mods'
/// generated kernel code follows `gqa`'s features, not the user crate's.
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "hip"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __with_cube {
    ($($item:tt)*) => { $($item)* };
}

/// Expands to its input in builds with a cubecl runtime, to nothing otherwise.
#[cfg(not(any(feature = "wgpu", feature = "cuda", feature = "hip")))]
#[doc(hidden)]
#[macro_export]
macro_rules! __with_cube {
    ($($item:tt)*) => {};
}
