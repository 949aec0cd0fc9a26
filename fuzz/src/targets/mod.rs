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

/// A finite, modest value for tensor data: `[-4, 4)`, times 50 in one case of eight (scores
/// in the hundreds).
pub fn datum(u: &mut Unstructured, gain: f64) -> Result<f64> {
    Ok(f64::from(u.int_in_range(-128i32..=127)?) / 32.0 * gain)
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
