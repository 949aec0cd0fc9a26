//! The kernel side of the DSL: the `#[cube]` traits the kernels are generic over, their
//! implementations for the combinators, and what the generated kernel code calls.
//!
//! A mod's captures reach a kernel as one buffer of 32-bit words ([`super::Mods::captured_words`]):
//! a header of `[offset, len]` per slot, then the data. Each mod reads its slots from a
//! compile-time `base` (a combinator passes its second part `base + first::SLOTS`), so a
//! composed mod's parts never collide. Positions are `i32`.

use cubecl::prelude::*;

use super::{And, Captures, NoMask, NoScore, Not, Or, Then};

pub use crate::cube::kernel_math::{accurate_exp as exp, accurate_ln as ln, accurate_tanh as tanh};

/// A mask mod's kernel implementation.
#[cube]
#[allow(clippy::too_many_arguments)]
pub trait CubeMask: Captures + 'static + Send + Sync {
    /// Whether query `q` of query head `h` in batch entry `b` sees key `k`; its captures are
    /// slots `base..base + SLOTS` of `aux`.
    fn visible(
        aux: &[u32],
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> bool;
}

/// A score mod's kernel implementation.
#[cube]
#[allow(clippy::too_many_arguments)]
pub trait CubeScore: Captures + 'static + Send + Sync {
    /// The modified score `s` at the position; captures as in [`CubeMask::visible`].
    fn apply(
        aux: &[u32],
        s: f32,
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> f32;

    /// `apply′(s) · t`, the derivative of [`CubeScore::apply`] with respect to the score at
    /// `s`, times the tangent `t` (forward mode: a chain of mods passes each one's tangent on).
    /// The same rules as the host's [`crate::dsl::Dual`], so that the kernels' backward and the
    /// oracle's differentiate a mod alike.
    fn tangent(
        aux: &[u32],
        s: f32,
        t: f32,
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> f32;
}

/// `t · factor`, with a zero tangent staying zero (the host's `Dual` rule: a sub-expression
/// that does not depend on the score has derivative 0 even where `factor` is not finite).
#[cube]
pub fn chain(t: f32, factor: f32) -> f32 {
    select(t == 0.0f32, 0.0f32, t * factor)
}

/// Word `index` of slot `slot`, the index clamped into the slot (never outside the buffer).
#[cube]
pub fn read_word(aux: &[u32], index: i32, #[comptime] slot: u32) -> u32 {
    let offset = aux[comptime!((2 * slot) as usize)];
    let len = aux[comptime!((2 * slot + 1) as usize)];
    let i = clamp(index, 0i32, i32::cast_from(len) - 1i32);
    aux[(offset + u32::cast_from(i)) as usize]
}

/// Element `index` of an integer table (`i32` or `u32`), or an integer scalar (`index` 0).
#[cube]
pub fn read_int(aux: &[u32], index: i32, #[comptime] slot: u32) -> i32 {
    i32::reinterpret(read_word(aux, index, slot))
}

/// Element `index` of an `f32` table, or an `f32` scalar (`index` 0).
#[cube]
pub fn read_float(aux: &[u32], index: i32, #[comptime] slot: u32) -> f32 {
    f32::reinterpret(read_word(aux, index, slot))
}

/// `x` rounded toward zero.
#[cube]
pub fn trunc(x: f32) -> f32 {
    select(x < 0.0f32, -(-x).floor(), x.floor())
}

/// `|x|` of an integer.
#[cube]
pub fn abs_int(x: i32) -> i32 {
    select(x < 0i32, 0i32 - x, x)
}

/// `a / b` of integers as Rust defines it (toward zero), and 0 for `b == 0`, where Rust panics
/// (the host side of a mod: the oracle rejects such a mod) and shading languages differ (SPIR-V
/// leaves it undefined). The divisor is replaced before it divides.
#[cube]
pub fn div_int(a: i32, b: i32) -> i32 {
    let zero = b == 0i32;
    select(zero, 0i32, a / select(zero, 1i32, b))
}

/// `a % b` of integers as Rust defines it (the sign of `a`), and 0 for `b == 0` (as
/// [`div_int`]), spelled with a division so that every shading language agrees: WGSL's and
/// SPIR-V's `%` are this remainder, but GLSL leaves `%` undefined for negative operands, and
/// naga writes WGSL's `%` to GLSL as it is. On wgpu's GL backend (Mesa's llvmpipe) the DSL's
/// `block_strided` and `dilated` masks were then wrong wherever the dividend was negative.
/// Integer division truncates toward zero in WGSL, SPIR-V and Mesa's GLSL (the GL pass of the
/// mod families checks it there).
#[cube]
pub fn rem_int(a: i32, b: i32) -> i32 {
    let zero = b == 0i32;
    let d = select(zero, 1i32, b);
    select(zero, 0i32, a - (a / d) * d)
}

#[cube]
impl CubeMask for NoMask {
    #[allow(unused_variables)]
    fn visible(
        aux: &[u32],
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> bool {
        true
    }
}

#[cube]
impl CubeScore for NoScore {
    #[allow(unused_variables)]
    fn apply(
        aux: &[u32],
        s: f32,
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> f32 {
        s
    }

    #[allow(unused_variables)]
    fn tangent(
        aux: &[u32],
        s: f32,
        t: f32,
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> f32 {
        t
    }
}

#[cube]
impl<A: CubeMask, B: CubeMask> CubeMask for And<A, B> {
    fn visible(
        aux: &[u32],
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> bool {
        let first = A::visible(aux, b, h, q, k, seq_q, seq_k, base);
        let second = B::visible(aux, b, h, q, k, seq_q, seq_k, comptime!(base + A::SLOTS));
        first && second
    }
}

#[cube]
impl<A: CubeMask, B: CubeMask> CubeMask for Or<A, B> {
    fn visible(
        aux: &[u32],
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> bool {
        let first = A::visible(aux, b, h, q, k, seq_q, seq_k, base);
        let second = B::visible(aux, b, h, q, k, seq_q, seq_k, comptime!(base + A::SLOTS));
        first || second
    }
}

#[cube]
impl<A: CubeMask> CubeMask for Not<A> {
    fn visible(
        aux: &[u32],
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> bool {
        !A::visible(aux, b, h, q, k, seq_q, seq_k, base)
    }
}

#[cube]
impl<A: CubeScore, B: CubeScore> CubeScore for Then<A, B> {
    fn apply(
        aux: &[u32],
        s: f32,
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> f32 {
        let first = A::apply(aux, s, b, h, q, k, seq_q, seq_k, base);
        B::apply(
            aux,
            first,
            b,
            h,
            q,
            k,
            seq_q,
            seq_k,
            comptime!(base + A::SLOTS),
        )
    }

    fn tangent(
        aux: &[u32],
        s: f32,
        t: f32,
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        seq_q: i32,
        seq_k: i32,
        #[comptime] base: u32,
    ) -> f32 {
        let first = A::apply(aux, s, b, h, q, k, seq_q, seq_k, base);
        let first_t = A::tangent(aux, s, t, b, h, q, k, seq_q, seq_k, base);
        B::tangent(
            aux,
            first,
            first_t,
            b,
            h,
            q,
            k,
            seq_q,
            seq_k,
            comptime!(base + A::SLOTS),
        )
    }
}
