//! Composition: masks combine with `&`, `|`, `!`; score mods chain with `then`. Generic
//! structs, so a composed mod is a type like any other (one kernel per composed type).

use std::ops::{BitAnd, BitOr, Not as NotOp};

use super::{Captures, MaskMod, Position, Real, ScoreMod};

/// No user mask: every key the spec's band allows is visible.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NoMask;

/// No user score mod: the identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NoScore;

/// Visible where both masks allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct And<A, B>(pub A, pub B);

/// Visible where either mask allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Or<A, B>(pub A, pub B);

/// Visible where the mask hides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Not<A>(pub A);

/// The first score mod, then the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Then<A, B>(pub A, pub B);

impl Captures for NoMask {
    const SLOTS: u32 = 0;
    fn captured_words(&self, _: &mut Vec<Vec<u32>>) {}
}

impl Captures for NoScore {
    const SLOTS: u32 = 0;
    fn captured_words(&self, _: &mut Vec<Vec<u32>>) {}
}

impl<A: Captures, B: Captures> Captures for And<A, B> {
    const SLOTS: u32 = A::SLOTS + B::SLOTS;
    fn captured_words(&self, slots: &mut Vec<Vec<u32>>) {
        self.0.captured_words(slots);
        self.1.captured_words(slots);
    }
}

impl<A: Captures, B: Captures> Captures for Or<A, B> {
    const SLOTS: u32 = A::SLOTS + B::SLOTS;
    fn captured_words(&self, slots: &mut Vec<Vec<u32>>) {
        self.0.captured_words(slots);
        self.1.captured_words(slots);
    }
}

impl<A: Captures> Captures for Not<A> {
    const SLOTS: u32 = A::SLOTS;
    fn captured_words(&self, slots: &mut Vec<Vec<u32>>) {
        self.0.captured_words(slots);
    }
}

impl<A: Captures, B: Captures> Captures for Then<A, B> {
    const SLOTS: u32 = A::SLOTS + B::SLOTS;
    fn captured_words(&self, slots: &mut Vec<Vec<u32>>) {
        self.0.captured_words(slots);
        self.1.captured_words(slots);
    }
}

impl MaskMod for NoMask {
    const TRIVIAL: bool = true;
    fn name(&self) -> String {
        "true".into()
    }
    fn visible(&self, _: Position) -> bool {
        true
    }
}

impl ScoreMod for NoScore {
    const TRIVIAL: bool = true;
    fn name(&self) -> String {
        "identity".into()
    }
    fn apply<N: Real>(&self, s: N, _: Position) -> N {
        s
    }
}

impl<A: MaskMod, B: MaskMod> MaskMod for And<A, B> {
    fn name(&self) -> String {
        format!("({} & {})", self.0.name(), self.1.name())
    }
    fn visible(&self, at: Position) -> bool {
        self.0.visible(at) && self.1.visible(at)
    }
}

impl<A: MaskMod, B: MaskMod> MaskMod for Or<A, B> {
    fn name(&self) -> String {
        format!("({} | {})", self.0.name(), self.1.name())
    }
    fn visible(&self, at: Position) -> bool {
        self.0.visible(at) || self.1.visible(at)
    }
}

impl<A: MaskMod> MaskMod for Not<A> {
    fn name(&self) -> String {
        format!("!{}", self.0.name())
    }
    fn visible(&self, at: Position) -> bool {
        !self.0.visible(at)
    }
}

impl<A: ScoreMod, B: ScoreMod> ScoreMod for Then<A, B> {
    fn name(&self) -> String {
        format!("{}.then({})", self.0.name(), self.1.name())
    }
    fn apply<N: Real>(&self, s: N, at: Position) -> N {
        self.1.apply(self.0.apply(s, at), at)
    }
}

/// `&`, `|`, `!` for a mask type (the attribute macro emits the same for each user mask).
macro_rules! mask_operators {
    ($([$($generics:tt)*] $ty:ty),* $(,)?) => {$(
        impl<$($generics)* Rhs: MaskMod> BitAnd<Rhs> for $ty {
            type Output = And<Self, Rhs>;
            fn bitand(self, rhs: Rhs) -> And<Self, Rhs> {
                And(self, rhs)
            }
        }
        impl<$($generics)* Rhs: MaskMod> BitOr<Rhs> for $ty {
            type Output = Or<Self, Rhs>;
            fn bitor(self, rhs: Rhs) -> Or<Self, Rhs> {
                Or(self, rhs)
            }
        }
        impl<$($generics)*> NotOp for $ty {
            type Output = Not<Self>;
            fn not(self) -> Not<Self> {
                Not(self)
            }
        }
    )*};
}

mask_operators!(
    [] NoMask,
    [A: MaskMod, B: MaskMod,] And<A, B>,
    [A: MaskMod, B: MaskMod,] Or<A, B>,
    [A: MaskMod,] Not<A>,
);
