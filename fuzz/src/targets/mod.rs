//! The targets, and what they draw their numbers from.

pub mod cache;
pub mod forward;
pub mod merge;
pub mod model_config;
pub mod spec;

use arbitrary::{Result, Unstructured};
use gqa::{Alignment, Mask};

/// A count as a caller might pass one: small most of the time, sometimes any `usize`.
pub fn count(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0u8..=9)? {
        0..=5 => u.int_in_range(0..=300)?,
        6..=7 => u.int_in_range(0..=70_000)?,
        8 => usize::MAX - u.int_in_range(0..=3)?,
        _ => u.arbitrary::<u64>()? as usize,
    })
}

/// A float a caller might pass: ordinary values, special ones, or any bit pattern.
pub fn float(u: &mut Unstructured) -> Result<f64> {
    Ok(match u.int_in_range(0u8..=9)? {
        0..=5 => f64::from(u.int_in_range(-32768i32..=32767)?) / 4096.0,
        6..=7 => *u.choose(&[
            0.0,
            -0.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN_POSITIVE,
            1e39,
            -1e39,
            1e-50,
            f64::from(f32::MAX),
            65504.0,
            65520.0,
            7e4,
        ])?,
        _ => f64::from_bits(u.arbitrary()?),
    })
}

/// `n` finite, modest values for tensor data: multiples of 1/32 in `[-4, 4)`, times `gain`. They
/// come from the input while it lasts, then from a generator seeded by what was read: an input
/// that runs out would otherwise give constant tensors (every value the range's lower end), which
/// explore little but the rounding of exactly computable sums.
pub fn data(u: &mut Unstructured, n: usize, gain: f64) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..n {
        let step = if u.is_empty() {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % 256) as i32 - 128
        } else {
            let x = u.int_in_range(-128i32..=127)?;
            state = state.rotate_left(7) ^ x as u64;
            x
        };
        out.push(f64::from(step) / 32.0 * gain);
    }
    Ok(out)
}

/// A window side: small, about the lengths, or huge.
pub fn side(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0u8..=5)? {
        0..=3 => u.int_in_range(0..=16)?,
        4 => u.int_in_range(0..=4000)?,
        _ => *u.choose(&[i64::MAX as usize, usize::MAX, i64::MAX as usize - 1])?,
    })
}

/// A mask of any shape: none, either side, both, causal, either alignment.
pub fn mask(u: &mut Unstructured) -> Result<Mask> {
    let left = if u.arbitrary()? { Some(side(u)?) } else { None };
    let right = match u.int_in_range(0u8..=2)? {
        0 => None,
        1 => Some(0),
        _ => Some(side(u)?),
    };
    let alignment = if u.arbitrary()? {
        Alignment::TopLeft
    } else {
        Alignment::BottomRight
    };
    Ok(Mask::band(left, right, alignment))
}
